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
