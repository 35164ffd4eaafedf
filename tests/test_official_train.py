"""The released MDM in the package's jobs: python -m sopo_ext.train --backbone mdm-official
--base <save directory in the release's format> and python -m sopo_ext.evaluate on it, on the tiny
data; the reward keeps its own text encoder while the backbone reads CLIP features."""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("open_clip")

from sopo_ext import checkpoint as C  # noqa: E402
from sopo_ext import evaluate, train  # noqa: E402
from sopo_ext.official.mdm import OfficialMDM  # noqa: E402
from sopo_ext.official.release import load_mdm_release  # noqa: E402

from official_helpers import make_clip_weights, make_release  # noqa: E402


@pytest.fixture(scope="module")
def official(tiny_assets, tmp_path_factory):
    root = tmp_path_factory.mktemp("official")
    clip = make_clip_weights(root / "open_clip_model.safetensors")
    return {**tiny_assets, "release": make_release(root / "save" / "humanml_tiny"), "clip": clip}


def targv(a, out, *extra):
    return ["--backbone", "mdm-official", "--base", str(a["release"]), "--clip-weights", str(a["clip"]),
            "--data", str(a["data"]), "--reward", str(a["reward"]), "--evaluator", str(a["evaluator"]),
            "--out", str(out), "--steps", "2", "--batch-size", "4", "--k", "2", "--sampling-steps", "2",
            "--warmup", "1", "--eval-samples", "32", "--eval-steps", "2", "--no-animation", "--no-progress",
            "--threads", "1", *extra]


def test_train_fine_tunes_the_released_mdm_and_evaluate_reads_both(official, tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(targv(official, out)) == 0, capsys.readouterr().err
    tuned = C.load_checkpoint(out / "model", "mdm_official")
    assert isinstance(tuned.model, OfficialMDM) and tuned.meta["text_encoder"] == "mdm-clip"
    base = load_mdm_release(official["release"]).model
    moved = [k for k, v in tuned.model.state_dict().items() if not torch.equal(v, base.state_dict()[k])]
    assert moved and all("pe" not in k for k in moved)  # trained, the fixed tables untouched
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and "R-precision top1" in summary["after"]
    capsys.readouterr()
    for ckpt in (out / "model", official["release"]):  # the fine-tune, and the release itself
        j = tmp_path / f"eval-{ckpt.name}.json"
        rc = evaluate.main(["--ckpt", str(ckpt), "--clip-weights", str(official["clip"]), "--data",
                            str(official["data"]), "--evaluator", str(official["evaluator"]), "--reward",
                            str(official["reward"]), "--samples", "32", "--steps", "2", "--mm-captions", "0",
                            "--replications", "1", "--json", str(j), "--threads", "1"])
        assert rc == 0, capsys.readouterr().err
        s = json.loads(j.read_text())["summary"]
        assert 0 <= s["R-precision top1"]["mean"] <= 1 and 0 <= s["reward detail accuracy"]["mean"] <= 1


def test_the_reward_reads_its_own_text_encoder(official, tmp_path):
    from sopo_ext.trainer import Dist, SoPoTrainer
    from sopo_ext.config import SoPoConfig
    cfg = SoPoConfig(backbone="mdm-official", base=str(official["release"]), clip_weights=str(official["clip"]),
                     data=str(official["data"]), reward=str(official["reward"]), evaluator="none",
                     out=str(tmp_path / "t"), steps=1, batch_size=4, k=2, sampling_steps=2, warmup=0,
                     progress=False, animation=False)
    t = SoPoTrainer(cfg)
    t.dist = Dist("cpu")
    try:
        t.setup()
    finally:
        t.dist.close()
    b = t.batches.batch(0)
    assert b["text_emb"].shape[1] == 512 and b["reward_text_emb"].shape[1] == 64  # CLIP / hash
    assert t.text_encoder.name.startswith("mdm-clip") and t.reward_text_encoder.name.startswith("hash")
    torch.testing.assert_close(b["reward_text_emb"], t.reward_text_encoder.encode(b["captions"]))


def test_mask_frames_and_missing_base_are_clear(official, tmp_path, capsys):
    assert train.main(targv(official, tmp_path / "m", "--mask-frames", "--stop-after", "1")) == 0
    ck = C.load_checkpoint(tmp_path / "m" / "last", "mdm_official")
    assert ck.config.mask_frames is True
    a = targv(official, tmp_path / "x")
    a[a.index("--base") + 1] = str(tmp_path / "nowhere")
    assert train.main(a) == 2
    assert "motion-diffusion-model" in capsys.readouterr().err


def test_the_distilbert_mdm_trains_on_cached_tokens(official, tmp_path, capsys):
    """humanml_trans_dec_512_bert: the cache holds DistilBERT's tokens, the model runs the frozen
    DistilBERT on them; its forward equals the release's on features computed as the release's
    BERT wrapper computes them (padding to the batch's longest caption)."""
    from test_official_tmr import tiny_distilbert
    from sopo_ext.official.text import DistilBertFeatures, MDMBertTokens
    bert = tiny_distilbert(tmp_path / "distilbert", 768)
    args = {**__import__("official_helpers").RELEASE_ARGS, "arch": "trans_dec", "text_encoder_type": "bert",
            "mask_frames": True}
    release = make_release(tmp_path / "save" / "humanml_trans_dec_512_bert", args)
    model = load_mdm_release(release).model
    model.attach_text_model(DistilBertFeatures(str(bert)))
    caps = ["a person walks forward", "a person raises the left hand slowly and turns around"]
    tokens = MDMBertTokens(str(bert)).encode(caps)
    from transformers import AutoModel, AutoTokenizer
    enc = AutoTokenizer.from_pretrained(str(bert))(caps, return_tensors="pt", padding=True)
    with torch.no_grad():
        feats = AutoModel.from_pretrained(str(bert))(**enc).last_hidden_state
        x = torch.randn(2, 9, 263)
        mask = torch.arange(9)[None] < torch.tensor([9, 6])[:, None]
        t = torch.tensor([3, 40])
        ours = model(x, t, tokens, mask, uncond=torch.tensor([False, True]))
        y = {"text_embed": (feats.permute(1, 0, 2), ~enc["attention_mask"].bool()), "mask": mask[:, None, None, :]}
        cond = model.forward_official(x.permute(0, 2, 1).unsqueeze(2), t, y)
        unc = model.forward_official(x.permute(0, 2, 1).unsqueeze(2), t, {**y, "uncond": True})
    torch.testing.assert_close(ours[0], cond[0, :, 0].T, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours[1], unc[1, :, 0].T, rtol=1e-5, atol=1e-5)
    out = tmp_path / "run"
    a = targv({**official, "release": release}, out, "--distilbert", str(bert))
    assert train.main(a) == 0, capsys.readouterr().err
    tuned = C.load_checkpoint(out / "model", "mdm_official")
    assert tuned.config.text_encoder_type == "bert" and tuned.meta["text_encoder"] == "mdm-bert"
