"""The one-shot GPU check (.ci/gpu, sopo_ext/gpu_check.py): its plan, arguments, step runner,
torch-version rule and report format, on the CPU (the GPU parts run where there is a GPU)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sopo_ext import gpu_check as G

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["env", "build", "tests", "bench", "train", "graphs", "sanitizer"]


def test_dry_run_writes_the_plan(tmp_path):
    p = subprocess.run(["bash", str(ROOT / ".ci" / "gpu"), "--dry-run", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=120, env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"})
    assert p.returncode == 0, p.stderr
    doc = json.loads((tmp_path / "gpu_report.json").read_text())
    assert [s["name"] for s in doc["steps"]] == STEPS
    assert all(s["status"] == "planned" and s["commands"] for s in doc["steps"])
    md = (tmp_path / "gpu_report.md").read_text()
    assert "| step | status | seconds | figures | what |" in md and "dry run" in md
    build = next(s for s in doc["steps"] if s["name"] == "build")
    assert "--no-build-isolation" in build["commands"][0] and "--no-index" in build["commands"][0]
    san = next(s for s in doc["steps"] if s["name"] == "sanitizer")
    assert [t for t in ("memcheck", "racecheck", "initcheck") if any(t in c for c in san["commands"])] == \
        ["memcheck", "racecheck", "initcheck"]
    train = next(s for s in doc["steps"] if s["name"] == "train")
    assert sum("--device cuda --steps 20" in c for c in train["commands"]) == 2


def test_only_and_bad_arguments(tmp_path, capsys):
    assert G.main(["--dry-run", "--only", "tests,train", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "gpu_report.json").read_text())
    assert [s["name"] for s in doc["steps"]] == ["tests", "train"]
    with pytest.raises(SystemExit):
        G.main(["--only", "nope", "--out", str(tmp_path)])
    assert "unknown step(s) ['nope']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        G.main(["--budget", "0", "--out", str(tmp_path)])


@pytest.mark.parametrize("version, ok", [("2.11.0+cu130", True), ("2.14.1", True), ("3.0.0", True),
                                         ("2.10.1", False), ("1.13.1", False), ("nightly", False)])
def test_torch_version_rule(version, ok):
    assert G.torch_supported(version) is ok


def test_the_step_runner_reports_every_outcome():
    py = sys.executable
    steps = [
        G.Step("good", "passes", [[py, "-c", "print('3 passed, 1 skipped in 0.1s')"]], 30),
        G.Step("bad", "fails", [[py, "-c", "import sys; print('1 failed, 2 passed'); sys.exit(3)"]], 30),
        G.Step("slow", "times out", [[py, "-c", "import time; time.sleep(30)"]], 2),
        G.Step("missing", "no such tool", [["no-such-tool-xyz", "--version"]], 30),
        G.Step("san", "sanitizer output", [[py, "-c", "print('========= ERROR SUMMARY: 2 errors')"]], 30),
    ]
    steps[4].name = "sanitizer"
    res = {r.name: r for r in G.run_steps(steps, log=lambda *a: None)}
    assert res["good"].status == "ok" and res["good"].figures == {"passed": 3, "skipped": 1}
    assert res["bad"].status == "failed" and res["bad"].returncodes == [3]
    assert res["bad"].figures == {"passed": 2, "failed": 1}
    assert res["slow"].status == "timeout" and res["slow"].returncodes == [124] and res["slow"].seconds < 20
    assert res["missing"].status == "failed" and "not found" in res["missing"].tail
    assert res["sanitizer"].figures["errors reported"] == 2
    md = G.render_markdown(list(res.values()), {"mode": "test"})
    for name, status in (("good", "ok"), ("bad", "failed"), ("slow", "timeout")):
        assert f"| {name} | {status} |" in md and f"## {name}: {status}" in md


def test_a_spent_budget_skips_the_rest():
    py = sys.executable
    steps = [G.Step("a", "sleeps", [[py, "-c", "import time; time.sleep(1.5)"]], 30),
             G.Step("b", "never runs", [[py, "-c", "print(1)"]], 30)]
    res = G.run_steps(steps, budget=11.0, log=lambda *a: None)
    assert res[0].status == "ok" and res[1].status == "skipped" and "budget" in res[1].tail


def test_the_env_workload_says_why_on_a_machine_without_a_gpu():
    p = subprocess.run([sys.executable, str(ROOT / "sopo_ext" / "gpu_check.py"), "workload", "env"],
                       capture_output=True, text=True, timeout=120)
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert p.returncode != 0 and "torch sees no CUDA device" in p.stderr
    assert f"gpu_check torch: {torch.__version__}" in p.stdout
