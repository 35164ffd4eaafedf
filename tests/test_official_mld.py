"""The released MLD's architecture (sopo_ext.official.mld), checked against the official classes,
and its Lightning checkpoint read without letting it run code.

Fixtures (tests/fixtures/official/mld_small*) were made by
``tests/fixtures/official/make_mld_fixtures.py --repo <ChenFengYe/motion-latent-diffusion checkout>``
(commit and torch version in ``mld_small.json``): the official ``MldVae`` and ``MldDenoiser``
with the HumanML3D release's ablation (SKIP_CONNECT, PE_TYPE / DIFF_PE_TYPE 'mld', no MLP_DIST)
built at a small size (latent [1, 16], ff 32, 4 heads; VAE 3 layers, denoiser 5) right after
``torch.manual_seed(0)`` each, saved as a Lightning checkpoint (``state_dict`` with ``vae.*`` /
``denoiser.*``, ``epoch``, plain-dict ``hyper_parameters``), their outputs in eval mode (VAE
encode's mu / std and a seeded sample, decode, the denoiser with pooled and per-token text
features and a 0-d timestep), and the key -> shape tables of the release-size modules. Nothing of
the official code was stubbed (only the ``ablation`` config is a namespace).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sopo_ext.checkpoint import CheckpointError
from sopo_ext.official import mld as M
from sopo_ext.official.mld import (OfficialMLDDenoiser, OfficialMLDDenoiserConfig, OfficialMLDVae,
                                   OfficialMLDVaeConfig, load_lightning_state_dict, load_mld_release)
from sopo_ext.safe_load import UnsafeFileError

FIX = Path(__file__).resolve().parent / "fixtures" / "official"
CKPT = FIX / "mld_small_humanml3d.ckpt"
META = json.loads((FIX / "mld_small.json").read_text())
# cloned: safetensors hands out buffers that are not 64-byte aligned, and an unaligned input can
# take another SIMD path (a float32 ulp apart; the official decode shows the same on such a buffer)
IO = {k: v.clone() for k, v in load_file(str(FIX / "mld_small_io.safetensors")).items()}
TOL = dict(rtol=1e-5, atol=1e-5)


def small_state() -> dict:
    return torch.load(CKPT, weights_only=True)["state_dict"]


def small_configs():
    """The small sizes the fixture script built the official classes with."""
    v, d = META["small"]["vae"], META["small"]["denoiser"]
    return (OfficialMLDVaeConfig(nfeats=v["nfeats"], latent_size=v["latent_dim"][0], latent_dim=v["latent_dim"][1],
                                 ff_size=v["ff_size"], num_layers=v["num_layers"], num_heads=v["num_heads"]),
            OfficialMLDDenoiserConfig(latent_dim=d["latent_dim"][1], text_encoded_dim=d["text_encoded_dim"],
                                      ff_size=d["ff_size"], num_layers=d["num_layers"], num_heads=d["num_heads"]))


# ---------------------------------------------------------------------------------- (a) keys
def test_release_size_keys_shapes_and_order_are_the_official_ones():
    for part, module in (("vae", OfficialMLDVae()), ("denoiser", OfficialMLDDenoiser())):
        ours = [(k, list(v.shape)) for k, v in module.state_dict().items()]
        assert ours == list(META["release_size_keys"][part].items()), part
    assert OfficialMLDVae().num_parameters() == sum(
        torch.Size(s).numel() for s in META["release_size_keys"]["vae"].values())


# -------------------------------------------------------------------------- (b) the forwards
def test_the_fixture_checkpoint_loads_and_matches_the_official_outputs():
    r = load_mld_release(CKPT)
    assert not r.vae.training and not r.denoiser.training and r.ignored == []
    assert (r.vae.config.num_layers, r.denoiser.config.num_layers, r.vae.config.latent_dim) == (3, 5, 16)
    assert r.sampling["guidance_scale"] == 7.5 and r.sampling["sampler"]["steps"] == 50
    feats, lengths = IO["vae_features"], IO["vae_encode_lengths"]
    with torch.no_grad():
        mu, dist = r.vae.encode(feats, lengths, sample_mean=True)
        torch.testing.assert_close(mu, IO["vae_mu"], **TOL)
        torch.testing.assert_close(dist.scale, IO["vae_std"], **TOL)
        torch.manual_seed(7)  # the release samples z = dist.rsample(): same draw, same latent
        z, _ = r.vae.encode(feats, lengths.tolist())
        torch.testing.assert_close(z, IO["vae_z_sampled_seed7"], **TOL)
        dec = r.vae.decode(IO["vae_z"], IO["vae_decode_lengths"].tolist())
        torch.testing.assert_close(dec, IO["vae_decoded"], **TOL)
        assert dec.shape == (3, 6, 263) and (dec[1, 5:] == 0).all() and (dec[2, 3:] == 0).all()
        for out, t, text in (("den_out_pooled", IO["den_timesteps"], IO["den_text_pooled"]),
                             ("den_out_tokens", IO["den_timesteps"], IO["den_text_tokens"]),
                             ("den_out_scalar_t", IO["den_timestep_scalar"], IO["den_text_pooled"])):
            res = r.denoiser(sample=IO["den_sample"], timestep=t, encoder_hidden_states=text,
                             lengths=[6, 5, 3, 4], return_dict=False)
            assert isinstance(res, tuple) and len(res) == 1  # the release's (sample,)
            torch.testing.assert_close(res[0], IO[out], **TOL)


def test_where_the_official_code_fails_the_numbers_stay_its_own():
    r = load_mld_release(CKPT)
    feats, lengths = IO["vae_features"], [4, 4, 2]
    with torch.no_grad():
        # extra padded frames (the release's encode needs max(lengths) == T) change nothing
        padded = torch.cat([feats[:, :4], torch.randn(3, 5, 263)], dim=1)
        torch.testing.assert_close(r.vae.encode(padded, lengths, sample_mean=True)[0],
                                   r.vae.encode(feats[:, :4], lengths, sample_mean=True)[0], rtol=1e-6, atol=1e-6)
        assert r.vae.decode(IO["vae_z"], [1, 1, 1]).shape == (3, 1, 263)  # the release's squeeze(0) fails here
    with pytest.raises(ValueError, match="exceed the 6 frames"):
        r.vae.encode(feats, [7, 6, 6])
    with pytest.raises(ValueError, match="sequence-first"):
        r.vae.decode(IO["vae_z"].permute(1, 0, 2), [6, 5, 3])
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        r.denoiser(IO["den_sample"], IO["den_timesteps"], IO["den_text_pooled"][:, 0])
    with pytest.raises(ValueError, match="odd"):
        OfficialMLDVaeConfig(num_layers=8)


def test_extra_parts_of_the_state_dict_are_set_aside(tmp_path):
    state = small_state()
    state["t2m_textencoder.input_emb.weight"] = torch.zeros(2, 2)
    state["t2m_moveencoder.main.0.weight"] = torch.zeros(2, 2)
    torch.save({"state_dict": state, "epoch": 1}, tmp_path / "a.ckpt")
    r = load_mld_release(tmp_path)  # the directory holding one .ckpt
    assert r.ignored == ["t2m_moveencoder", "t2m_textencoder"] and r.path == tmp_path / "a.ckpt"


# ----------------------------------------------------------------------------- (c) the init
def test_a_seeded_init_is_the_official_one():
    vae_cfg, den_cfg = small_configs()
    state = small_state()
    torch.manual_seed(META["seed"])
    vae = OfficialMLDVae(vae_cfg)
    torch.manual_seed(META["seed"])
    den = OfficialMLDDenoiser(den_cfg)
    for prefix, module in (("vae.", vae), ("denoiser.", den)):
        ours = module.state_dict()
        assert [prefix + k for k in ours] == [k for k in state if k.startswith(prefix)]
        for k, v in ours.items():
            assert torch.equal(v, state[prefix + k]), prefix + k


# ------------------------------------------------------------------ (d) a file that runs code
class _RunsShell:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _RunsSubprocess(_RunsShell):
    def __reduce__(self):
        return (subprocess.call, (["touch", str(self.marker)],))


class _RunsExec(_RunsShell):
    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


class _OpensAFile(_RunsShell):
    """Not a name anyone would refuse; the real class would create the marker when called."""

    def __reduce__(self):
        return (logging.FileHandler, (str(self.marker),))


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "retried"])
@pytest.mark.parametrize("payload,named", [(_RunsShell, "system"), (_RunsSubprocess, "subprocess.call"),
                                           (_RunsExec, "builtins.exec")])
def test_a_planted_pickle_is_refused_and_never_runs(tmp_path, monkeypatch, scan, payload, named):
    if not scan:  # the retry path alone (what a file the opcode scan cannot read goes through)
        monkeypatch.setattr(M, "_scan_globals", lambda path: [])
    marker, f = tmp_path / "pwned", tmp_path / "mld.ckpt"
    torch.save({"state_dict": small_state(), "hyper_parameters": {"cfg": payload(marker)}}, f)
    with pytest.raises(UnsafeFileError, match=rf"refused to load MLD checkpoint .*mld\.ckpt.*{named}"):
        load_mld_release(f)
    assert not marker.exists()


def test_a_stand_in_never_calls_what_it_stands_for(tmp_path):
    marker, f = tmp_path / "created", tmp_path / "mld.ckpt"
    torch.save({"state_dict": small_state(), "hyper_parameters": {"log": _OpensAFile(marker)}}, f)
    assert set(load_lightning_state_dict(f)) == set(small_state())
    assert not marker.exists()


# ----------------------------------------------------------- (e) hyper-parameters of any kind
class _Config:
    """Like omegaconf's DictConfig: state set after construction."""

    def __init__(self, **content):
        self.content = content


class _Node:
    """Built by calling the class with arguments (a __reduce__ of its own)."""

    def __init__(self, value, kind):
        self.value, self.kind = value, kind

    def __reduce__(self):
        return (_Node, (self.value, self.kind))


class _DictLike(dict):
    pass


def _lightning_file(path: Path, hparams) -> Path:
    torch.save({"epoch": 12, "global_step": 3400, "pytorch-lightning_version": "1.7.7",
                "state_dict": small_state(), "loops": {"fit_loop": {"epoch_progress": {"total": 12}}},
                "callbacks": {"ModelCheckpoint": {"best_model_score": torch.tensor(0.41)}},
                "optimizer_states": [{"state": {}, "param_groups": [{"lr": 1e-4}]}], "lr_schedulers": [],
                "hyper_parameters": hparams, "hparams_type": _Config}, path)
    return path


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "retried"])
def test_unknown_hyper_parameter_classes_still_yield_the_state_dict(tmp_path, monkeypatch, scan):
    if not scan:
        monkeypatch.setattr(M, "_scan_globals", lambda path: [])
    f = _lightning_file(tmp_path / "mld.ckpt", {
        "cfg": _Config(model={"latent_dim": [1, 256]}, node=_Node(3, int), types=[dict, list]),
        "path": Path("/data/humanml3d")})
    state = load_lightning_state_dict(f)
    assert list(state) == list(small_state())
    assert all(torch.equal(state[k], v) for k, v in small_state().items())
    r = load_mld_release(f)
    with torch.no_grad():
        out = r.denoiser(IO["den_sample"], IO["den_timesteps"], IO["den_text_pooled"])[0]
    torch.testing.assert_close(out, IO["den_out_pooled"], **TOL)


def test_stand_ins_are_capped_and_other_refusals_stay_refused(tmp_path):
    f = _lightning_file(tmp_path / "mld.ckpt", {"a": _Config(), "b": _Node(1, "x")})
    with pytest.raises(UnsafeFileError, match="more than 1 objects"):
        load_lightning_state_dict(f, max_stand_ins=1)
    # a dict subclass with items needs its own SETITEMS: a stand-in cannot take it, so the
    # refusal stands (no endless retrying)
    g = _lightning_file(tmp_path / "dictlike.ckpt", {"a": _DictLike(x=1)})
    with pytest.raises(UnsafeFileError, match="refused to load"):
        load_lightning_state_dict(g)


# ----------------------------------------------------------------------- (f) clear errors
def test_missing_or_wrong_files_say_what_and_where(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"not found: .*absent\.ckpt.*1222_mld_humanml3d_FID041\.ckpt"
                                                r".*download_pretrained_models\.sh"):
        load_mld_release(tmp_path / "absent.ckpt")
    with pytest.raises(FileNotFoundError, match="no .ckpt file.*download_pretrained_models"):
        load_mld_release(tmp_path)
    for name in ("a.ckpt", "b.ckpt"):
        shutil.copy(CKPT, tmp_path / name)
    with pytest.raises(FileNotFoundError, match="several .ckpt files"):
        load_mld_release(tmp_path)

    state = small_state()
    no_vae = {k: v for k, v in state.items() if not k.startswith("vae.")}
    no_vae["t2m_textencoder.w"] = torch.zeros(1)
    torch.save({"state_dict": no_vae}, tmp_path / "novae.ckpt")
    with pytest.raises(CheckpointError, match=r"novae\.ckpt holds no 'vae\.\*' weights \(the motion VAE\).*"
                                              r"t2m_textencoder.*download_pretrained_models"):
        load_mld_release(tmp_path / "novae.ckpt")
    torch.save(state, tmp_path / "bare.ckpt")  # a state dict, not a Lightning checkpoint
    with pytest.raises(CheckpointError, match="not a PyTorch Lightning checkpoint: it has no 'state_dict'"):
        load_mld_release(tmp_path / "bare.ckpt")
    bad = dict(state)
    bad["denoiser.encoder.middle_block.linear2.weight"] = torch.zeros(3, 3)
    torch.save({"state_dict": bad}, tmp_path / "bad.ckpt")
    with pytest.raises(CheckpointError, match=r"'denoiser\.\*' weights do not fit.*linear2\.weight"):
        load_mld_release(tmp_path / "bad.ckpt")
    action = dict(state)
    action["denoiser.emb_proj.action_embedding"] = torch.zeros(12, 16)
    torch.save({"state_dict": action}, tmp_path / "action.ckpt")
    with pytest.raises(CheckpointError, match="action-conditioned"):
        load_mld_release(tmp_path / "action.ckpt")
