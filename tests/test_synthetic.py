"""Tests of the built-in procedural text-motion dataset (sopo_ext.data.synthetic)."""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sopo_ext.data import skeleton as sk
from sopo_ext.data import synthetic as S
from sopo_ext.data.humanml3d import HumanML3D

REPO = Path(__file__).resolve().parents[1]
POS_TAGS = {"NOUN", "VERB", "ADJ", "ADV", "ADP", "DET", "NUM", "PRON", "CCONJ", "OTHER"}


@pytest.fixture(scope="module")
def gen60(tmp_path_factory):
    out = tmp_path_factory.mktemp("syn60")
    summary = S.generate(out, num=60, seed=0)
    return out, summary


def _files(root: Path):
    return sorted(p for p in root.rglob("*") if p.is_file())


def _spec(family, frames=120, **params):
    return {"family": family, "params": params, "frames": frames}


def _heading(j):
    f = sk._forward_direction(j)
    return torch.atan2(f[..., 0], f[..., 2])


# ------------------------------------------------------------------ layout / loader
def test_loads_all_splits(gen60):
    out, summary = gen60
    assert summary["num"] == 60 and summary["splits"] == {"train": 48, "val": 6, "test": 6}
    seen = set()
    for split in ("train", "val", "test"):
        ds = HumanML3D(out, split=split)
        ids = (out / f"{split}.txt").read_text().split()
        assert len(ds) == len(ids)  # nothing filtered out by the loader
        seen |= set(ids)
        for i in range(len(ds)):
            item = ds[i]
            T = item["length"]
            assert 40 <= T <= 196
            assert item["motion"].shape == (T, 263)
            assert torch.isfinite(item["motion"]).all()
            assert item["caption"] and item["tokens"]
            assert item["start"] == 0.0 and item["end"] == 0.0
    assert seen == {f"{i:06d}" for i in range(60)}
    assert (out / "README.txt").read_text().startswith("sopo_ext built-in synthetic")


def test_mean_std(gen60):
    out, _ = gen60
    mean, std = np.load(out / "Mean.npy"), np.load(out / "Std.npy")
    assert mean.shape == (263,) and std.shape == (263,)
    assert mean.dtype == np.float32 and std.dtype == np.float32
    assert np.isfinite(mean).all() and np.isfinite(std).all()
    assert (std >= S.STD_FLOOR * (1 - 1e-6)).all()
    train = (out / "train.txt").read_text().split()
    x = np.concatenate([np.load(out / "new_joint_vecs" / f"{i}.npy") for i in train])
    x = x.astype(np.float64)
    np.testing.assert_allclose(mean, x.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(std, np.maximum(x.std(0), S.STD_FLOOR), rtol=1e-4, atol=1e-6)


def test_caption_lines_format(gen60):
    out, _ = gen60
    for p in (out / "texts").glob("*.txt"):
        lines = [l for l in p.read_text().splitlines() if l.strip()]
        assert len(lines) >= 3
        assert len(set(l.split("#")[0] for l in lines)) >= 2
        for l in lines:
            cap, toks, st, en = l.split("#")
            assert st == "0.0" and en == "0.0"
            for t in toks.split(" "):
                w, pos = t.rsplit("/", 1)
                assert w and pos in POS_TAGS


def test_features_roundtrip_and_contacts(gen60):
    out, _ = gen60
    for i in range(0, 60, 7):
        f = torch.from_numpy(np.load(out / "new_joint_vecs" / f"{i:06d}.npy")).double()
        j = torch.from_numpy(np.load(out / "new_joints" / f"{i:06d}.npy")).double()
        assert j.shape[0] == f.shape[0] + 1
        rec = sk.joints_from_features(f)
        assert (rec - j[:-1]).abs().max() < 2e-3
        assert j[..., 1].min().abs() < 1e-5  # on the floor
        fc = f[:, sk.FOOT_CONTACT]
        assert set(fc.unique().tolist()) <= {0.0, 1.0}


# ------------------------------------------------------------------ determinism
def test_determinism(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    S.generate(a, num=12, seed=3)
    S.generate(b, num=12, seed=3)
    S.generate(c, num=12, seed=4)
    fa, fb = _files(a), _files(b)
    assert [p.relative_to(a) for p in fa] == [p.relative_to(b) for p in fb]
    for pa, pb in zip(fa, fb):
        assert pa.read_bytes() == pb.read_bytes(), pa
    diff = [(a / "new_joint_vecs" / n).read_bytes() != (c / "new_joint_vecs" / n).read_bytes()
            for n in (p.name for p in (a / "new_joint_vecs").iterdir())]
    assert sum(diff) >= 10
    assert (a / "texts" / "000000.txt").read_bytes() != (c / "texts" / "000000.txt").read_bytes() \
        or (a / "texts" / "000001.txt").read_bytes() != (c / "texts" / "000001.txt").read_bytes()


# ------------------------------------------------------------------ specs and captions
def test_every_family_and_parameter_appears():
    specs = S.sample_specs(3000, seed=0)
    fams = {s["family"] for s in specs}
    assert fams == set(S.FAMILIES) | {"composition"}
    assert len(S.FAMILIES) >= 12
    for fam, params in S.SPEC.items():
        for k, vals in params.items():
            got = {s["params"][k] for s in specs if s["family"] == fam}
            assert got == set(vals), (fam, k)
    for s in specs:
        assert S.MIN_LEN <= s["frames"] <= S.MAX_LEN
        if s["family"] == "composition":
            assert sum(p["frames"] for p in s["parts"]) == s["frames"]


@pytest.mark.parametrize("family,key", [("wave", "hand"), ("kick", "leg"),
                                        ("side_step", "direction")])
def test_captions_state_side(family, key):
    rng = np.random.default_rng(0)
    for v in S.SPEC[family][key]:
        other = ({"left", "right"} - {v}).pop()
        p = {k: vals[0] for k, vals in S.SPEC[family].items()}
        p[key] = v
        caps = S.captions_for(_spec(family, **p), rng, k=4)
        assert len(set(caps)) >= 3
        for c in caps:
            words = c.rstrip(".").replace(",", " ").split()
            assert v in words and other not in words, c


def test_captions_state_count_and_turn():
    rng = np.random.default_rng(1)
    for cnt in (1, 2, 3, 4):
        caps = S.captions_for(_spec("jump", count=cnt, direction="in place"), rng, k=4)
        words = {1: ("once", "one"), 2: ("twice", "two"), 3: ("three",), 4: ("four",)}[cnt]
        assert all(any(w in c for w in words) for c in caps), caps
    for fam, d in (("turn_left", "left"), ("turn_right", "right")):
        caps = S.captions_for(_spec(fam, angle=90, speed="normal"), rng, k=4)
        assert all(d in c for c in caps)
    comp = {"family": "composition", "frames": 120,
            "parts": [_spec("walk_forward", 60, speed="normal"),
                      _spec("turn_left", 60, angle=90, speed="normal")]}
    caps = S.captions_for(comp, rng, k=3)
    assert all("then" in c or "after" in c for c in caps) and all("left" in c for c in caps)
    # different families get different captions
    a = set(S.captions_for(_spec("squat", count=2, speed="normal"), rng, k=4))
    b = set(S.captions_for(_spec("sit_down", speed="normal"), rng, k=4))
    assert not a & b


# ------------------------------------------------------------------ physics
def test_walk_forward_and_backward():
    for fam, sign in (("walk_forward", 1), ("run", 1), ("walk_backward", -1)):
        j = S.synthesize_joints(_spec(fam, 120, speed="normal"))
        root = j[:, 0]
        assert sign * (root[-1, 2] - root[0, 2]) > 1.0  # along the facing (+z)
        assert (root[-1, 0] - root[0, 0]).abs() < 0.2
        f = sk.features_from_joints(j, fix_heading_wrap=True)
        c = f[:, sk.FOOT_CONTACT]
        # alternating gait: frames with only the left or only the right foot planted
        assert ((c[:, 0] > 0) & (c[:, 2] == 0)).float().mean() > 0.2
        assert ((c[:, 2] > 0) & (c[:, 0] == 0)).float().mean() > 0.2
    fast = S.synthesize_joints(_spec("walk_forward", 120, speed="fast"))[:, 0, 2]
    slow = S.synthesize_joints(_spec("walk_forward", 120, speed="slow"))[:, 0, 2]
    assert fast[-1] > slow[-1]


def test_side_step_direction():
    for d, sign in (("left", 1), ("right", -1)):
        root = S.synthesize_joints(_spec("side_step", 120, direction=d, speed="normal"))[:, 0]
        assert sign * (root[-1, 0] - root[0, 0]) > 0.5  # +x is the body's left


@pytest.mark.parametrize("angle", [45, 90, 180])
def test_turn_heading(angle):
    for fam, sign in (("turn_left", 1), ("turn_right", -1)):
        j = S.synthesize_joints(_spec(fam, 120, angle=angle, speed="normal"))
        h = _heading(j)
        d = math.degrees((h[-1] - h[0]).item())
        d = (d + 180 + sign * 1e-9) % 360 - 180 if angle < 180 else abs(d) * sign
        assert sign * d > 0 and abs(abs(d) - angle) < 0.1 * angle + 2, (fam, angle, d)
        # the features' integrated heading agrees (half angles)
        f = sk.features_from_joints(j, fix_heading_wrap=True)
        fd = -math.degrees(2 * f[:, 0].sum().item())
        assert abs(fd - d) < 3


def test_jump_squat_sit_heights():
    stand = S.synthesize_joints(_spec("wave", 100, hand="left", count=2))[:, 0, 1]
    assert (stand.max() - stand.min()) < 1e-6
    base = stand[0]
    jump = S.synthesize_joints(_spec("jump", 100, count=2, direction="in place"))[:, 0, 1]
    assert jump.max() > base + 0.1
    squat = S.synthesize_joints(_spec("squat", 120, count=2, speed="normal"))[:, 0, 1]
    assert squat.min() < base - 0.25 and abs(squat[-1] - base) < 0.05
    sit = S.synthesize_joints(_spec("sit_down", 120, speed="normal"))[:, 0, 1]
    assert sit[-1] < base - 0.25 and abs(sit[0] - base) < 0.02


def test_wave_and_kick_use_the_stated_limb():
    for hand, wrist, other in (("left", 20, 21), ("right", 21, 20)):
        j = S.synthesize_joints(_spec("wave", 100, hand=hand, count=2))
        assert j[:, wrist, 1].max() > j[:, 15, 1].max() - 0.1  # hand up near the head
        assert j[:, other, 1].max() < j[:, 0, 1].max()          # the other hangs down
    for leg, ankle, other in (("left", 7, 8), ("right", 8, 7)):
        j = S.synthesize_joints(_spec("kick", 100, leg=leg, count=1))
        assert j[:, ankle, 1].max() > 0.4 and j[:, other, 1].max() < 0.15


def test_no_nan_over_many_specs():
    specs = S.sample_specs(150, seed=5)
    for s in specs:
        j = S.synthesize_joints(s)
        assert j.shape == (s["frames"] + 1, 22, 3) and torch.isfinite(j).all()
        assert torch.isfinite(sk.features_from_joints(j, fix_heading_wrap=True)).all()


# ------------------------------------------------------------------ CLI
def test_cli(tmp_path):
    out = tmp_path / "cli"
    r = subprocess.run([sys.executable, "-m", "sopo_ext.data.synthetic", "--out", str(out),
                        "--num", "30", "--seed", "1"], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert '"num": 30' in r.stdout
    assert len(list((out / "new_joint_vecs").glob("*.npy"))) == 30
    assert len(HumanML3D(out, split="test")) == 3
