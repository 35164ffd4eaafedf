"""python -m sopo_ext.evaluate on tiny models: the protocol's numbers are aggregated correctly
(mean and Student-t interval over replications, "n/a" with one), written as JSON, and bad input is reported."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from sopo_ext import evaluate


@pytest.fixture(scope="module")
def assets(tiny_assets):
    return tiny_assets


def argv(assets, backbone, out, *extra):
    return ["--ckpt", str(assets[backbone]), "--data", str(assets["data"]),
            "--evaluator", str(assets["evaluator"]), "--reward", str(assets["reward"]),
            "--samples", "32", "--replications", "3", "--steps", "2", "--mm-captions", "2",
            "--mm-repeats", "3", "--threads", "1", "--json", str(out), *extra]


@pytest.mark.parametrize("backbone", ["mdm", "mld"])
def test_protocol_summary_and_json(assets, tmp_path, backbone, capsys):
    out = tmp_path / "eval.json"
    assert evaluate.main(argv(assets, backbone, out)) == 0
    doc = json.loads(out.read_text())
    assert doc["replications"] == 3 and doc["command"].startswith("python -m sopo_ext.evaluate ")
    per, summ = doc["per_replication"], doc["summary"]
    for key in ("R-precision top1", "R-precision top3", "MM-Dist", "FID", "Diversity",
                "MultiModality", "reward", "frac reward >= 0.45", "detail accuracy",
                "judged details", "judged side", "judged count", "reward detail accuracy",
                "reward detail margin", "real reward detail accuracy"):
        v = np.asarray(per[key], dtype=np.float64)
        assert len(v) == 3 and np.isfinite(v).all(), key
        assert summ[key]["mean"] == pytest.approx(v.mean())
        # t_{0.975, 2} = 4.3027 with the sample std
        assert summ[key]["ci95"] == pytest.approx(4.302653 * v.std(ddof=1) / math.sqrt(3), rel=1e-6)
        assert summ[key]["values"] == pytest.approx(list(v)) and summ[key]["n"] == 3
    assert 0 <= summ["R-precision top1"]["mean"] <= summ["R-precision top3"]["mean"] <= 1
    assert 0 <= summ["judged details"]["mean"] <= 1  # the tiny data is built-in: it has ground truth
    # replications differ (own captions and noise), so the interval is not degenerate
    assert summ["FID"]["ci95"] > 0
    assert "95% CI" in capsys.readouterr().out


def test_one_replication_has_no_interval(assets, tmp_path, capsys):
    out = tmp_path / "one.json"
    assert evaluate.main(argv(assets, "mdm", out, "--replications", "1", "--mm-captions", "0")) == 0
    text = out.read_text()
    assert "NaN" not in text  # strict JSON
    summ = json.loads(text)["summary"]
    assert all(v["ci95"] is None and v["n"] == 1 for v in summ.values())
    table = capsys.readouterr().out.split("95% CI", 1)[1]
    assert "n/a" in table and " 0.0000\n" not in table


def test_same_seed_same_numbers(assets, tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    assert evaluate.main(argv(assets, "mdm", a, "--mm-captions", "0")) == 0
    assert evaluate.main(argv(assets, "mdm", b, "--mm-captions", "0")) == 0
    assert json.loads(a.read_text())["summary"] == json.loads(b.read_text())["summary"]


def test_wrong_checkpoint_kind_is_reported(assets, tmp_path, capsys):
    a = argv(assets, "mdm", tmp_path / "x.json")
    a[a.index("--ckpt") + 1] = str(assets["reward"])
    assert evaluate.main(a) == 2
    assert "'mdm' or 'mld' backbone" in capsys.readouterr().err


def test_bad_flags():
    with pytest.raises(SystemExit, match="--samples must be >= 32"):
        evaluate.parse_args(["--samples", "8"])
    with pytest.raises(SystemExit, match="--replications must be >= 1"):
        evaluate.parse_args(["--replications", "0"])


def test_the_oracle_is_not_an_evaluation_reward(assets, tmp_path, capsys):
    a = argv(assets, "mdm", tmp_path / "x.json")
    a += ["--reward", "oracle"]
    assert evaluate.main(a) == 2
    assert "training-time diagnostic" in capsys.readouterr().err
    assert evaluate.main(argv(assets, "mdm", tmp_path / "y.json") + ["--also-reward", "oracle"]) == 2
    assert "'judged details'" in capsys.readouterr().err
    assert not (tmp_path / "y.json").exists()
