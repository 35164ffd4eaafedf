"""The released MDM, checked against the official code's own outputs.

The fixtures in tests/fixtures/official/mdm_* were made by
``tests/fixtures/official/make_mdm_fixtures.py --repo <GuyTevet/motion-diffusion-model checkout>``,
which builds the official ``model/mdm.py`` ``MDM`` through the release's ``get_model_args`` (CLIP,
DistilBERT and SMPL stubbed: none of them is in a release checkpoint or in these fixtures):
  * ``mdm_<variant>.json``: the official commit, the small config's ``args.json`` fields, and the
    key -> shape table of the release-size model (latent 512, 8 layers, ff 1024);
  * ``mdm_<variant>_model000000000.pt``: ``torch.manual_seed(0)`` init of the small config, saved
    as the release saves it (state dict without CLIP);
  * ``mdm_<variant>_io.safetensors``: inputs and the official forward's outputs in eval mode, with
    the text condition and with ``uncond=True``.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sopo_ext import checkpoint as C
from sopo_ext.checkpoint import CheckpointError
from sopo_ext.official.mdm import OfficialMDM, OfficialMDMConfig
from sopo_ext.official.release import is_mdm_release, load_mdm_release, mdm_config_from_args

FIX = Path(__file__).resolve().parent / "fixtures" / "official"
VARIANTS = ["trans_enc", "trans_enc_maskframes", "trans_dec_emb", "trans_dec_bert"]


def fixture(variant):
    meta = json.loads((FIX / f"mdm_{variant}.json").read_text())
    io = load_file(str(FIX / f"mdm_{variant}_io.safetensors"))
    weights = "trans_enc" if variant == "trans_enc_maskframes" else variant
    return meta, io, FIX / f"mdm_{weights}_model000000000.pt"


def release_dir(tmp_path, variant, state=None, args_extra=None, name=None):
    """A save directory in the release's layout made from the fixture."""
    meta, io, pt = fixture(variant)
    d = tmp_path / (name or f"save_{variant}")
    d.mkdir()
    (d / "args.json").write_text(json.dumps({**meta["args"], **(args_extra or {})}))
    if state is None:
        shutil.copy(pt, d / "model000000000.pt")
    else:
        torch.save(state, d / "model000000000.pt")
    return d


def y_of(io, uncond=False):
    if "text_valid" in io:
        text = (io["text_feats"], ~io["text_valid"])
    else:
        text = io["text_feats"]
    return {"text_embed": text, "mask": io["mask"], "uncond": uncond}


@pytest.mark.parametrize("variant", VARIANTS)
def test_release_size_state_dict_keys_and_shapes_are_the_official_ones(variant):
    meta, _, _ = fixture(variant)
    a = {**meta["args"], "latent_dim": 512, "layers": 8, "pos_embed_max_len": 5000}
    a.pop("ff_size")  # the release's get_model_args fixes 1024
    model = OfficialMDM(mdm_config_from_args(a))
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours == meta["release_size_keys"]
    assert list(ours) == list(meta["release_size_keys"])  # the same order too


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_release_directory_loads_and_matches_the_official_forward(variant, tmp_path):
    meta, io, _ = fixture(variant)
    d = release_dir(tmp_path, variant)
    assert is_mdm_release(d) and is_mdm_release(d / "model000000000.pt")
    ck = load_mdm_release(d)
    assert ck.kind == "mdm_official" and not ck.model.training
    assert ck.meta["diffusion"] == {"num_steps": 50, "schedule": "cosine", "prediction": "x0"}
    assert ck.config.mask_frames == meta["args"]["mask_frames"]
    with torch.no_grad():
        cond = ck.model.forward_official(io["x"], io["timesteps"], y_of(io))
        unc = ck.model.forward_official(io["x"], io["timesteps"], y_of(io, True))
    torch.testing.assert_close(cond, io["out_cond"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(unc, io["out_uncond"], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(cond, unc)  # the fixture can tell the condition apart


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_seeded_init_gives_the_official_weights(variant):
    """Modules are registered in the official order: the same seed draws the same weights."""
    meta, _, pt = fixture(variant)
    torch.manual_seed(0)
    model = OfficialMDM(mdm_config_from_args(meta["args"]))
    ref = torch.load(pt, weights_only=True)
    ours = model.state_dict()
    assert list(ours) == list(ref)
    for k, v in ref.items():
        assert torch.equal(ours[k], v), k


def test_mask_frames_changes_only_what_padding_reaches():
    """With the release's default (no frame mask) padded frames change valid outputs; with
    mask_frames they do not, and the fixture of each setting is its own."""
    _, io, _ = fixture("trans_enc")
    _, io_m, _ = fixture("trans_enc_maskframes")
    assert not torch.allclose(io["out_cond"], io_m["out_cond"])
    lengths = io["mask"].sum(-1).flatten()
    full = bool(lengths[0] == io["x"].shape[-1])
    assert full and torch.allclose(io["out_cond"][0], io_m["out_cond"][0], atol=1e-6)  # no padding: same


@pytest.mark.parametrize("variant", ["trans_enc", "trans_enc_maskframes", "trans_dec_emb"])
def test_the_package_interface_is_the_official_forward_transposed(variant, tmp_path):
    _, io, _ = fixture(variant)
    model = load_mdm_release(release_dir(tmp_path, variant)).model
    B, F, _, T = io["x"].shape
    x_t = io["x"][:, :, 0, :].permute(0, 2, 1)  # [B, T, 263]
    mask = io["mask"][:, 0, 0, :]
    text = io["text_feats"][0]
    with torch.no_grad():
        out = model(x_t, io["timesteps"], text, mask)
        torch.testing.assert_close(out, io["out_cond"][:, :, 0, :].permute(0, 2, 1), rtol=1e-5, atol=1e-5)
        # a per-row null condition: the forced rows get what the official all-null call gives
        u = torch.tensor([True, False, True])
        mixed = model(x_t, io["timesteps"], text, mask, uncond=u)
        want = torch.where(u[:, None, None], io["out_uncond"][:, :, 0, :].permute(0, 2, 1),
                           io["out_cond"][:, :, 0, :].permute(0, 2, 1))
        torch.testing.assert_close(mixed, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(x_t, io["timesteps"], None, mask),
                                   io["out_uncond"][:, :, 0, :].permute(0, 2, 1), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="text_emb must be"):
        model(x_t, io["timesteps"], text[:, :10], mask)


def test_bert_variant_reads_token_ids_through_an_attached_distilbert(tmp_path):
    _, io, _ = fixture("trans_dec_bert")
    model = load_mdm_release(release_dir(tmp_path, "trans_dec_bert")).model
    x = io["x"][:, :, 0, :].permute(0, 2, 1)
    with pytest.raises(ValueError, match="attach_text_model"):  # no DistilBERT given yet
        model(x, io["timesteps"], torch.zeros(3, 8))
    with pytest.raises(ValueError, match="token ids and mask"):
        model(x, io["timesteps"], torch.zeros(3, 7))
    # the attached model's features go where the release's BERT wrapper puts them
    feats, valid = io["text_feats"].permute(1, 0, 2), io["text_valid"]
    model.attach_text_model(lambda ids, v: feats[:, :ids.shape[1]])
    L = valid.shape[1]
    tokens = torch.cat([torch.arange(3 * L).view(3, L).float(), valid.float()], dim=1)
    with torch.no_grad():
        out = model(x, io["timesteps"], tokens, io["mask"][:, 0, 0, :])
    torch.testing.assert_close(out, io["out_cond"][:, :, 0, :].permute(0, 2, 1), rtol=1e-5, atol=1e-5)


def test_ema_releases_load_the_average_weights(tmp_path):
    _, io, pt = fixture("trans_enc")
    state = torch.load(pt, weights_only=True)
    zeros = {k: torch.zeros_like(v) for k, v in state.items()}
    d = release_dir(tmp_path, "trans_enc", state={"model": zeros, "model_avg": state},
                    args_extra={"use_ema": True})
    with torch.no_grad():
        out = load_mdm_release(d).model.forward_official(io["x"], io["timesteps"], y_of(io))
    torch.testing.assert_close(out, io["out_cond"], rtol=1e-5, atol=1e-5)
    assert load_mdm_release(d, use_avg=False).model.embed_text.weight.abs().sum() == 0


def test_older_releases_without_new_args_and_with_other_pe_lengths_load(tmp_path):
    """The first releases' args.json lacks mask_frames / text_encoder_type / pos_embed_max_len,
    and their saved pe tables may have another length: load_model_wo_clip drops them."""
    meta, io, pt = fixture("trans_enc")
    state = torch.load(pt, weights_only=True)
    state["sequence_pos_encoder.pe"] = torch.zeros(10, 1, 16)
    state["embed_timestep.sequence_pos_encoder.pe"] = torch.zeros(10, 1, 16)
    d = release_dir(tmp_path, "trans_enc", state=state)
    a = json.loads((d / "args.json").read_text())
    for k in ("mask_frames", "text_encoder_type", "emb_trans_dec"):
        a.pop(k)
    (d / "args.json").write_text(json.dumps(a))
    ck = load_mdm_release(d)
    assert ck.config.mask_frames is False and ck.config.text_encoder_type == "clip"
    with torch.no_grad():
        out = ck.model.forward_official(io["x"], io["timesteps"], y_of(io))
    torch.testing.assert_close(out, io["out_cond"], rtol=1e-5, atol=1e-5)
    assert load_mdm_release(d, mask_frames=True).config.mask_frames is True


def test_release_errors_say_what_is_missing_and_where_it_comes_from(tmp_path):
    with pytest.raises(FileNotFoundError, match="motion-diffusion-model"):
        load_mdm_release(tmp_path / "nothing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no model.*pt in"):
        load_mdm_release(empty)
    d = release_dir(tmp_path, "trans_enc")
    (d / "args.json").unlink()
    with pytest.raises(FileNotFoundError, match="args.json is missing"):
        load_mdm_release(d / "model000000000.pt")
    _, _, pt = fixture("trans_enc")
    state = torch.load(pt, weights_only=True)
    state["embed_text.weight"] = torch.zeros(16, 500)
    with pytest.raises(CheckpointError, match="wrong shape.*embed_text.weight"):
        load_mdm_release(release_dir(tmp_path, "trans_enc", state=state, name="b"))
    with pytest.raises(CheckpointError, match="action-conditioned"):
        mdm_config_from_args({"dataset": "humanact12"})
    with pytest.raises(CheckpointError, match="DiP"):
        mdm_config_from_args({"context_len": 20})
    with pytest.raises(CheckpointError, match="pos_embed_max_len"):
        load_mdm_release(release_dir(tmp_path, "trans_enc", args_extra={"diffusion_steps": 1000}, name="c"))


def test_a_fine_tuned_official_mdm_saves_and_loads_in_the_package_format(tmp_path):
    _, io, _ = fixture("trans_enc")
    ck = load_mdm_release(release_dir(tmp_path, "trans_enc"))
    C.save_checkpoint(tmp_path / "tuned", ck.model, meta=ck.meta)
    back = C.load_checkpoint(tmp_path / "tuned", "mdm_official")
    assert isinstance(back.model, OfficialMDM) and back.config == ck.config
    with torch.no_grad():
        out = back.model.forward_official(io["x"], io["timesteps"], y_of(io))
    torch.testing.assert_close(out, io["out_cond"], rtol=1e-5, atol=1e-5)


def test_config_validation():
    with pytest.raises(ValueError, match="DistilBERT"):
        OfficialMDMConfig(arch="trans_enc", text_encoder_type="bert")
    with pytest.raises(ValueError, match="gru"):
        OfficialMDMConfig(arch="gru")
