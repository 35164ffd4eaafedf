"""python -m sopo_ext.study on tiny models: the grid it plans, the runs it executes (and skips
when done), and the table of mean +/- CI over seeds it writes."""
from __future__ import annotations

import json

from pathlib import Path

import pytest

from sopo_ext import study


@pytest.fixture(scope="module")
def assets(tiny_assets):
    return tiny_assets


def test_plan_covers_methods_seeds_and_sweeps():
    a = study.parse_args(["--backbones", "mdm", "mld", "--seeds", "0", "1", "2"])
    runs = study.plan(a)
    labels = {(r.backbone, r.label) for r in runs}
    # base, 7 methods, 4 other taus, K=2, SoPo and MoDiPO at the saturating scale
    assert len(runs) == 2 * 3 * (1 + 7 + 4 + 1 + 2)
    assert ("mdm", "modipo") in labels and ("mdm", "diffusion-dpo") not in labels
    sat = [r for r in runs if r.label == "sopo scale=dpo"]
    assert sat and sat[0].train_args == ["--method", "sopo", "--scale-regime", "diffusion-dpo"]
    assert ("mld", "sopo tau=0.60") in labels and ("mdm", "sopo K=2") in labels
    assert ("mdm", "sopo tau=0.45") not in labels  # that is the sopo run itself
    assert all(r.train_args == [] for r in runs if r.label == "base")
    steps = study.plan(study.parse_args(["--backbones", "mdm", "--seeds", "0", "--methods", "sopo",
                                         "--taus", "--ks", "--sampling", "2", "8", "16",
                                         "--saturating"]))
    assert [r.label for r in steps] == ["base", "sopo", "sopo steps=2", "sopo steps=16"]
    assert steps[-1].train_args == ["--method", "sopo", "--sampling-steps", "16"]
    with pytest.raises(SystemExit):
        study.parse_args(["--sampling", "0"])
    rewards = study.plan(study.parse_args(["--backbones", "mdm", "--seeds", "0", "--methods", "sopo",
                                           "--taus", "--ks", "--saturating", "--rewards", "reward-detail",
                                           "oracle:/tmp/r", "--reward-methods", "sopo", "dsopo"]))
    assert [r.label for r in rewards] == ["base", "sopo", "sopo reward=reward-detail",
                                          "dsopo reward=reward-detail", "sopo reward=oracle:/tmp/r",
                                          "dsopo reward=oracle:/tmp/r"]
    assert rewards[2].train_args == ["--method", "sopo", "--reward", "reward-detail"]
    assert rewards[-1].dir(Path("/o")).name == "dsopo_rewardoracle__tmp_r-s0"


def test_study_runs_evaluates_and_aggregates(assets, tmp_path, capsys):
    out = tmp_path / "study"
    argv = ["--out", str(out), "--backbones", "mdm", "--methods", "sopo", "--seeds", "0", "1",
            "--taus", "0.5", "--ks", "--sampling", "1", "8", "--saturating", "--steps", "1", "--jobs", "2",
            "--data", str(assets["data"]),
            "--mdm-base", str(assets["mdm"]), "--reward", str(assets["reward"]),
            "--evaluator", str(assets["evaluator"]),
            "--train-extra", "--batch-size 4 --k 2 --sampling-steps 2 --warmup 1",
            "--eval-extra", "--samples 32 --steps 2 --mm-captions 0"]
    assert study.main(argv) == 0, capsys.readouterr()
    doc = json.loads((out / "results.json").read_text())
    res = doc["results"]
    assert set(res) == {"mdm/base", "mdm/sopo", "mdm/sopo tau=0.50", "mdm/sopo steps=1"}
    assert doc["errors"] == []
    for name, r in res.items():
        assert r["FID"]["n"] == 2 and r["FID"]["ci95"] >= 0 and len(r["FID"]["values"]) == 2, name
        assert 0 <= r["R-precision top1"]["mean"] <= 1
        # the training wall time of each fine-tuned run, from its summary.json
        # (summary.json rounds to 0.1 s, so a 1-step tiny run may record 0.0)
        assert ("train s" in r) == (name != "mdm/base") and r.get("train s", {"mean": 0})["mean"] >= 0
        assert ("train cpu s" in r) == (name != "mdm/base")
    md = (out / "results.md").read_text()
    assert "| mdm/sopo | 2 |" in md and "python -m sopo_ext.study" in md
    # paired by seed: the run minus the base model at the same evaluation seed
    fid = {d.name: json.loads((d / "eval.json").read_text())["summary"]["FID"]["mean"]
           for d in (out / "runs" / "mdm").iterdir()}
    diffs = [fid[f"sopo-s{s}"] - fid[f"base-s{s}"] for s in (0, 1)]
    paired = doc["paired vs base"]
    assert "mdm/base" not in paired and paired["mdm/sopo"]["FID"]["n"] == 2
    assert paired["mdm/sopo"]["FID"]["mean"] == pytest.approx(sum(diffs) / 2)
    # t_{0.975, 1} = 12.706 and the sample std of two values |a - b| / sqrt(2)
    assert paired["mdm/sopo"]["FID"]["ci95"] == pytest.approx(12.7062 * abs(diffs[0] - diffs[1]) / 2, rel=1e-4)
    assert paired["mdm/sopo"]["FID"]["values"] == pytest.approx(diffs)
    assert "Student-t" in md and "intervals in this table" in md and "seeds better (lower)" in md
    assert paired["mdm/sopo"]["FID"]["seeds"] == [0, 1]
    assert "| mdm/sopo | 2 | " in md.split("Paired by seed")[1]
    # the fraction of captions whose unpreferred term was used, over each run's training steps
    import csv
    per_seed = []
    for s in (0, 1):
        with open(out / "runs" / "mdm" / f"sopo-s{s}" / "train" / "metrics.csv") as f:
            col = [float(row["valuable"]) for row in csv.DictReader(f)]
        per_seed.append(sum(col) / len(col))
    assert res["mdm/sopo"]["valuable in training"]["mean"] == pytest.approx(sum(per_seed) / 2)
    assert "valuable in training" not in res["mdm/base"]
    assert (out / "alignment_vs_fid.png").stat().st_size > 1000
    assert (out / "sampling_tradeoff.png").stat().st_size > 1000
    # a second call finds every run done and only re-aggregates
    assert study.main(argv) == 0
    assert "8 runs, 8 already done" in capsys.readouterr().out
    # --report-only on a larger grid tabulates the runs done and starts none of the others
    before = {f for f in out.rglob("*") if f.is_file()}
    assert study.main(argv[:argv.index("--seeds") + 1] + ["0", "1", "2"]
                      + argv[argv.index("--seeds") + 3:] + ["--report-only"]) == 0
    assert "12 runs, 8 done; reporting those, 4 not run" in capsys.readouterr().out
    assert not (out / "runs" / "mdm" / "base-s2").exists()
    partial = json.loads((out / "results.json").read_text())
    assert len(partial["missing runs"]) == 4 and partial["results"]["mdm/sopo"]["FID"]["n"] == 2
    assert partial["results"]["mdm/sopo"]["FID"] == res["mdm/sopo"]["FID"]
    md = (out / "results.md").read_text()
    assert "Partial: 4 of 12 runs" in md and "--report-only`)" in md
    assert {f for f in out.rglob("*") if f.is_file()} - before == set()  # no new run files


def test_one_seed_tables_say_n_a(tmp_path):
    found = [(study.Run("mdm", "base", 0), {"FID": 3.0, "R-precision top1": 0.3}),
             (study.Run("mdm", "sopo", 0, ["--method", "sopo"]), {"FID": 2.5, "R-precision top1": 0.35}),
             (study.Run("mdm", "sft", 0, ["--method", "sft"]), {"FID": 2.7, "R-precision top1": 0.31})]
    res = study.aggregate(found)
    assert res["mdm/sopo"]["FID"]["ci95"] is None and res["mdm/sopo"]["FID"]["values"] == [2.5]
    assert "2.500 ± n/a" in study.table(res)
    vs_sft = study.paired_vs(found, "sft")
    assert set(vs_sft) == {"mdm/sopo"}
    assert vs_sft["mdm/sopo"]["FID"]["mean"] == pytest.approx(-0.2)
    assert "-0.200 ± n/a" in study.paired_table(vs_sft, "sft")
    # per-seed columns are labelled by seed id, and "better" follows the metric's direction
    deltas = {"mdm/sopo": {"FID": {"values": [-0.5, 0.2], "seeds": [3, 7]},
                           "R-precision top1": {"values": [-0.01, 0.02], "seeds": [3, 7]}}}
    fid = study.per_seed_table(deltas, "FID")
    assert "| seed 3 | seed 7 |" in fid and "| mdm/sopo | -0.500 | +0.200 | 1 of 2 |" in fid
    assert "seeds better (higher)" in study.per_seed_table(deltas, "R-precision top1")


def test_report_only_without_runs_says_so(tmp_path, capsys):
    assert study.main(["--out", str(tmp_path / "nothing"), "--backbones", "mdm", "--report-only"]) == 2
    assert "none of the" in capsys.readouterr().err


def test_failed_runs_are_reported(assets, tmp_path, capsys):
    argv = ["--out", str(tmp_path / "s"), "--backbones", "mdm", "--methods", "sopo", "--seeds", "0",
            "--taus", "--ks", "--steps", "1", "--data", str(assets["data"]),
            "--mdm-base", str(tmp_path / "missing"), "--eval-extra", "--samples 32 --steps 2"]
    assert study.main(argv) == 2
    assert "training failed" in capsys.readouterr().err


def test_times_of_runs_resumed_by_an_older_trainer_are_left_out(tmp_path):
    """Before the trainer carried its clock across resumes, summary.json timed only the last
    part: such a run's time is not put in the table (it would look too fast)."""
    run = tmp_path / "r"
    (run / "train").mkdir(parents=True)
    (run / "train.log").write_text("[train] resumed from x/last at step 200\n")
    assert study._timed_after_resume_only(run, {"train seconds": 0.0})
    assert not study._timed_after_resume_only(run, {"train seconds": 210.0, "resumed at steps": [200]})
    (run / "train.log").write_text("[train] --resume: no checkpoint in x/last yet\n")
    assert not study._timed_after_resume_only(run, {"train seconds": 210.0})


def test_retabulate_a_legacy_study_gives_the_exact_t_intervals(tmp_path):
    """Results files from before the t intervals stored 1.96 x population std / sqrt(n) and no
    per-seed values; --retabulate recomputes the t interval exactly and renames old methods."""
    import math

    import numpy as np

    from sopo_ext import metrics

    v = np.array([0.31, 0.27, 0.36])
    z_cell = {"mean": float(v.mean()), "ci95": 1.96 * float(v.std()) / math.sqrt(3), "n": 3}
    legacy = {"command": "python -m sopo_ext.study --out x --report-only", "steps": 200,
              "results": {"mdm/diffusion-dpo": {"FID": dict(z_cell)}, "mdm/sopo tau=0.50": {"FID": dict(z_cell)},
                          "mdm/base": {"FID": {"mean": 3.0, "ci95": 0.0, "n": 1}}},
              "paired vs base": {"mdm/diffusion-dpo": {"FID": dict(z_cell)}}}
    src = tmp_path / "old.json"
    src.write_text(json.dumps(legacy))
    assert study.main(["--retabulate", str(src), "--out", str(tmp_path / "new")]) == 0
    doc = json.loads((tmp_path / "new" / "results.json").read_text())
    cell = doc["results"]["mdm/modipo"]["FID"]
    assert cell["ci95"] == pytest.approx(metrics.mean_ci(v)[1], rel=1e-9)
    assert cell["ci95 (z)"] == z_cell["ci95"] and cell["values"] is None
    assert "mdm/sopo tau=0.50" in doc["results"] and "mdm/diffusion-dpo" not in doc["results"]
    assert doc["results"]["mdm/base"]["FID"]["ci95"] is None  # one seed: no interval
    assert doc["paired vs base"]["mdm/modipo"]["FID"]["ci95"] == pytest.approx(cell["ci95"])
    md = (tmp_path / "new" / "results.md").read_text()
    assert "Student-t" in md and "| mdm/modipo | 3 |" in md and "3.000 ± n/a" in md
    # a file that already has per-seed values is left as it is, and --retabulate refuses it
    assert study.retabulate_legacy({"results": {"a/b": {"FID": {**cell}}}})["results"]["a/b"]["FID"] == cell
    src.write_text((tmp_path / "new" / "results.json").read_text())
    assert study.main(["--retabulate", str(src), "--out", str(tmp_path / "again")]) == 2
    (tmp_path / "x.json").write_text("{}")
    assert study.main(["--retabulate", str(tmp_path / "x.json"), "--out", str(tmp_path / "x")]) == 2


def test_rewards_grid_scores_every_run_with_the_training_rewards_and_draws_a_curve(assets, tmp_path, capsys):
    """--rewards with --reward-saturating and --eval-rewards, --curve-every and --results-name: the
    labels, the extra reward column (the same checkpoint as --reward gives the same numbers), and
    the training-length curve that starts at the base model for every run."""
    out = tmp_path / "v2"
    rw = str(assets["reward"])
    argv = ["--out", str(out), "--backbones", "mld", "--methods", "sft", "--seeds", "0", "--taus",
            "--ks", "--saturating", "--rewards", rw, "--reward-saturating", "sopo", "--steps", "2",
            "--curve-every", "1", "--results-name", "v2", "--jobs", "2",
            "--data", str(assets["data"]), "--mld-base", str(assets["mld"]), "--reward", rw,
            "--evaluator", str(assets["evaluator"]),
            "--train-extra", "--batch-size 4 --k 2 --sampling-steps 2 --warmup 1 --eval-samples 32 --eval-steps 2",
            "--eval-extra", "--samples 32 --steps 2 --mm-captions 0"]
    assert study.main(argv) == 0, capsys.readouterr()
    assert not (out / "results.json").exists()  # --results-name: the grid's own files
    doc = json.loads((out / "v2.json").read_text())
    label = f"mld/sopo scale=dpo reward={rw}"
    assert set(doc["results"]) == {"mld/base", "mld/sft", f"mld/sopo reward={rw}", label}
    run_dir = study.Run("mld", label.split("/", 1)[1], 0).dir(out)
    cmd = (run_dir / "train" / "summary.json").read_text()
    assert "diffusion-dpo" in cmd and "--eval-every" in cmd
    ev = json.loads((run_dir / "eval.json").read_text())["summary"]
    assert ev[f"reward [{rw}]"]["mean"] == pytest.approx(ev["reward"]["mean"], rel=1e-6)
    assert ev[f"reward detail accuracy [{rw}]"]["mean"] == ev["reward detail accuracy"]["mean"]
    md = (out / "v2.md").read_text()
    assert f"reward detail accuracy [{rw}]" in md.splitlines()[2]
    curves = doc["curves"]
    assert set(curves) == {"mld/sft s0", f"mld/sopo reward={rw} s0", f"{label} s0"}
    assert all(sorted(c, key=int) == ["0", "1", "2"] for c in curves.values())
    base_rp = {c["0"]["R-precision top1"] for c in curves.values()}
    assert len(base_rp) == 1  # step 0 is the base model, the same draw for every run
    sopo, sft = curves[f"{label} s0"], curves["mld/sft s0"]
    diff = sopo["2"]["FID"] - sft["2"]["FID"]
    assert f"{label} s0 - mld/sft s0" in md and f"{diff:+.3f}" in md.split("FID:")[1]
    assert (out / "v2_curve.png").stat().st_size > 1000
    assert (out / "alignment_vs_fid_v2.png").is_file()
    with pytest.raises(SystemExit):
        study.parse_args(["--eval-rewards", "oracle"])
