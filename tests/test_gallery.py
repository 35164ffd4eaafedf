"""python -m sopo_ext.gallery on tiny models: the picture choice depends only on the base model,
the tallies add up, the files are written, and a dataset without ground truth is refused."""
from __future__ import annotations

import json

import pytest

from sopo_ext import gallery


def _rec(i, fam, base_ok, tuned_ok, kind="side"):
    v = lambda ok: {kind: {"expected": "left", "measured": "left" if ok else "right", "correct": ok}}
    return {"batch": 0, "row": i, "id": f"{i:06d}", "caption": f"c{i}", "family": fam,
            "verdicts": {"base": v(base_ok), "SoPo": v(tuned_ok)}}


def test_pick_spreads_over_kinds_and_ignores_the_tuned_model():
    recs = [_rec(0, "wave", False, True), _rec(1, "wave", False, False), _rec(2, "kick", True, True),
            _rec(3, "squat", False, True, "count"), _rec(4, "kick", False, False)]
    chosen = [r["id"] for r in gallery.pick(recs, "base", 3)]
    assert chosen == ["000004", "000000", "000003"]  # side/kick, side/wave, count/squat
    for r in recs:  # flipping every tuned verdict changes nothing
        for v in r["verdicts"]["SoPo"].values():
            v["correct"] = not v["correct"]
    assert [r["id"] for r in gallery.pick(recs, "base", 3)] == chosen
    assert len(gallery.pick(recs, "base", 10)) == 4  # only the base-wrong ones
    assert gallery.pick(recs, "base", 0) == []


def test_tally_counts_fixed_and_broken():
    recs = [_rec(0, "wave", False, True), _rec(1, "wave", True, False), _rec(2, "kick", True, True),
            _rec(3, "squat", False, False, "count")]
    t = gallery.tally(recs, "base", "SoPo")
    assert t["side"] == dict(judged=3, base_right=2, tuned_right=2, fixed=1, broken=1)
    assert t["count"] == dict(judged=1, base_right=0, tuned_right=0, fixed=0, broken=0)
    assert t["all"] == dict(judged=4, base_right=2, tuned_right=2, fixed=1, broken=1)


def test_gallery_end_to_end(tiny_assets, tmp_path, capsys):
    out = tmp_path / "gallery"
    argv = ["--base", str(tiny_assets["mdm"]), "--tuned", str(tiny_assets["mdm"]), "--data",
            str(tiny_assets["data"]), "--out", str(out), "--n", "2", "--steps", "2", "--threads", "1",
            "--frames", "3"]
    assert gallery.main(argv) == 0
    doc = json.loads((out / "gallery.json").read_text())
    assert doc["command"].startswith("python -m sopo_ext.gallery ")
    allc = doc["tally"]["all"]
    # the same checkpoint and noise on both sides: identical verdicts
    assert allc["judged"] > 0 and allc["fixed"] == allc["broken"] == 0
    assert allc["base_right"] == allc["tuned_right"]
    assert len(doc["pictures"]) == min(2, allc["judged"] - allc["base_right"])
    md = (out / "gallery.md").read_text()
    for p in doc["pictures"]:
        assert (out / p["png"]).stat().st_size > 1000 and p["png"] in md
        assert any(not v["correct"] for v in p["verdicts"]["base"].values())


def test_refuses_a_dataset_without_ground_truth(tiny_assets, tmp_path, capsys):
    import shutil
    data = tmp_path / "data"
    shutil.copytree(tiny_assets["data"], data)
    (data / "specs.json").unlink()
    argv = ["--tuned", str(tiny_assets["mdm"]), "--base", str(tiny_assets["mdm"]), "--data", str(data),
            "--out", str(tmp_path / "g"), "--steps", "2"]
    assert gallery.main(argv) == 2
    assert "specs.json" in capsys.readouterr().err


def test_bad_flags():
    with pytest.raises(SystemExit):
        gallery.parse_args(["--tuned", "x", "--label", "base"])
    with pytest.raises(SystemExit):
        gallery.parse_args(["--tuned", "x", "--n", "-1"])


def test_judged_accuracy_is_one_on_real_motions_and_zero_sided_when_mirrored(tiny_assets):
    import torch
    from sopo_ext.data import skeleton as sk
    from sopo_ext.data.batches import MotionTextBatches
    from sopo_ext.data.humanml3d import HumanML3D
    from sopo_ext.data.judge import load_specs
    from sopo_ext.evaluation import judged_accuracy
    from sopo_ext.models.text import HashEncoder
    split = HumanML3D(tiny_assets["data"], "test")
    batches = MotionTextBatches(split, HashEncoder(), batch_size=16, drop_last=False).eval_batches(16)
    specs = load_specs(tiny_assets["data"])
    real = [b["motion"] for b in batches]
    acc = judged_accuracy(real, batches, specs, split.mean, split.std_safe)
    assert acc["judged details"] == 1.0 and all(v == 1.0 for v in acc.values())
    mean = torch.as_tensor(split.mean, dtype=torch.float64)
    std = torch.as_tensor(split.std_safe, dtype=torch.float64)
    mirrored = []
    for b in batches:
        x = sk.mirror_features(b["motion"].double() * std + mean)
        mirrored.append(((x - mean) / std).float())
    acc_m = judged_accuracy(mirrored, batches, specs, split.mean, split.std_safe)
    assert acc_m["judged side"] == 0.0
    assert acc_m.get("judged count", 1.0) == 1.0  # mirroring keeps repetitions
