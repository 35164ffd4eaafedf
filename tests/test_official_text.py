"""The released MDM's text encoder (sopo_ext.official.text): tokens as the release's
clip_encode_text makes them, features equal to a whole CLIP model's encode_text with the same
weights, and errors that say which weights are missing and where they are published."""
from __future__ import annotations

import pytest
import torch

open_clip = pytest.importorskip("open_clip")

from sopo_ext.official.text import CLIP_HUB_REPO, MDMClipEncoder, mdm_text_encoder  # noqa: E402

TINY = dict(width=64, heads=1, layers=2)  # the shape the encoder reads off the weights


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    """A whole CLIP (image tower included, as the released files are) with random weights."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
    torch.manual_seed(0)
    clip = CLIP(512, CLIPVisionCfg(layers=1, width=32, patch_size=16, image_size=32, head_width=16),
                CLIPTextCfg(context_length=77, vocab_size=49408, **TINY), quick_gelu=True).eval()
    path = tmp_path_factory.mktemp("clip") / "open_clip_model.safetensors"
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(path))
    return clip, path


def test_tokens_are_cut_to_22_with_the_end_token_and_padded_to_77(tiny_weights):
    enc = MDMClipEncoder(tiny_weights[1], text_cfg=TINY)
    long = "a person " + "walks forward slowly and " * 10 + "stops"
    t = enc.tokenize(["a person waves", long])
    assert t.shape == (2, 77) and t.dtype == torch.long
    sot, eot = 49406, 49407
    assert t[0, 0] == sot and t[0, 4] == eot and (t[0, 5:] == 0).all()
    assert t[1, 0] == sot and t[1, 21] == eot and (t[1, 22:] == 0).all() and (t[1, 1:21] != 0).all()


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_features_equal_the_whole_clip_models_encode_text(tiny_weights, precision):
    clip, path = tiny_weights
    enc = MDMClipEncoder(path, text_cfg=TINY, precision=precision)
    caps = ["a person walks forward", "someone raises the left hand twice", "jumping"]
    got = enc.encode(caps)
    assert got.shape == (3, 512) and got.dtype == torch.float32
    ref_model = clip
    if precision == "fp16":
        import copy
        ref_model = copy.deepcopy(clip)
        open_clip.model.convert_weights_to_lp(ref_model, torch.float16)
    with torch.no_grad():
        want = ref_model.encode_text(enc.tokenize(caps)).float()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if precision == "fp16":  # half-precision matrices: close to, not equal to, fp32
        fp32 = MDMClipEncoder(path, text_cfg=TINY).encode(caps)
        assert not torch.equal(got, fp32) and torch.allclose(got, fp32, rtol=0.05, atol=0.05)


def test_names_identify_weights_and_settings(tiny_weights, tmp_path):
    _, path = tiny_weights
    a = MDMClipEncoder(path, text_cfg=TINY)
    assert a.name == MDMClipEncoder(path, text_cfg=TINY).name
    assert a.name != MDMClipEncoder(path, text_cfg=TINY, precision="fp16").name
    assert MDMClipEncoder().name == "mdm-clip-vit-b32-openai-ctx22-fp32"
    assert mdm_text_encoder(f"mdm-clip:{path}", text_cfg=TINY).name == a.name


def test_missing_weights_say_what_and_where(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=f"huggingface.co/{CLIP_HUB_REPO}"):
        MDMClipEncoder(tmp_path / "absent.safetensors")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(FileNotFoundError, match="open_clip_model.safetensors"):
        MDMClipEncoder(text_cfg=TINY).encode(["a person walks"])
