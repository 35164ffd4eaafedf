"""A downloaded or shared file cannot run code: every torch.load of the package goes through
sopo_ext.safe_load (weights_only=True), resume files are written so that they load that way, and
a planted pickle that would execute something is refused with an error naming file and global."""
from __future__ import annotations

import ast
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from sopo_ext import checkpoint as C
from sopo_ext.optim import rng_state, set_rng_state
from sopo_ext.safe_load import NUMPY_ARRAYS, UnsafeFileError, load_weights

PACKAGE = Path(__file__).resolve().parents[1] / "sopo_ext"


class _RunsCode:
    """Unpickling this calls os.system: what a malicious checkpoint does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _plant(path: Path, marker: Path) -> None:
    torch.save({"weights": torch.ones(2), "payload": _RunsCode(marker)}, path)


def test_a_pickle_that_would_run_code_is_refused_and_never_runs(tmp_path):
    marker, f = tmp_path / "pwned", tmp_path / "model.pt"
    _plant(f, marker)
    with pytest.raises(UnsafeFileError, match=r"refused to load released checkpoint .*model\.pt.*system"):
        load_weights(f, what="released checkpoint")
    assert not marker.exists()
    # allowing numpy's array types does not open the door
    with pytest.raises(UnsafeFileError):
        load_weights(f, allow=NUMPY_ARRAYS)
    assert not marker.exists()
    with pytest.raises(FileNotFoundError, match="released checkpoint not found"):
        load_weights(tmp_path / "absent.pt", what="released checkpoint")


def test_a_planted_resume_state_is_refused_by_the_trainer(tiny_assets, tmp_path, capsys):
    from sopo_ext import train
    out, marker = tmp_path / "run", tmp_path / "pwned"
    a = tiny_assets
    argv = ["--data", str(a["data"]), "--base", str(a["mdm"]), "--reward", str(a["reward"]),
            "--evaluator", "none", "--out", str(out), "--steps", "2", "--batch-size", "4", "--k", "2",
            "--sampling-steps", "2", "--warmup", "1", "--no-animation", "--no-progress", "--threads", "1"]
    assert train.main(argv + ["--stop-after", "1"]) == 0
    state_file = out / "last" / C.TRAIN_STATE
    state = torch.load(state_file, weights_only=True)  # the trainer's own file: plain values only
    assert state["step"] == 1 and isinstance(state["rng"]["numpy"]["keys"], torch.Tensor)
    state["payload"] = _RunsCode(marker)
    torch.save(state, state_file)
    capsys.readouterr()
    assert train.main(argv + ["--resume"]) == 2
    err = capsys.readouterr().err
    assert "refused to load resume state" in err and "train_state.pt" in err and "system" in err
    assert not marker.exists() and not (out / "model").exists()


def test_rng_state_round_trips_and_loads_weights_only(tmp_path):
    torch.manual_seed(3), np.random.seed(4), random.seed(5)
    np.random.standard_normal()  # a cached gaussian is part of numpy's state
    st = rng_state()
    torch.save(st, tmp_path / "s.pt")
    want = (torch.rand(3), np.random.standard_normal(3), random.random())
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    set_rng_state(torch.load(tmp_path / "s.pt", weights_only=True))
    got = (torch.rand(3), np.random.standard_normal(3), random.random())
    assert torch.equal(want[0], got[0]) and np.array_equal(want[1], got[1]) and want[2] == got[2]


def test_resume_files_of_the_older_format_still_load(tmp_path):
    """Before this format numpy's RNG state was pickled as numpy's own tuple (an ndarray inside)."""
    np.random.seed(11)
    old = {"step": 3, "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                              "python": random.getstate()}}
    want = np.random.random(4)
    d = tmp_path / "ckpt"
    d.mkdir()
    torch.save(old, d / C.TRAIN_STATE)
    ck = C.Checkpoint(model=torch.nn.Linear(1, 1), kind="x", config=None, meta={}, path=d)
    state = ck.train_state()
    np.random.seed(0)
    set_rng_state(state["rng"])
    assert np.array_equal(np.random.random(4), want)


def _load_calls(tree: ast.AST):
    """(line, name) of every call of torch.load, torch.serialization.load or pickle.load(s)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            name = ast.unparse(node.func)
            if name in ("torch.load", "torch.serialization.load", "pickle.load", "pickle.loads"):
                yield node.lineno, name, node


def test_no_torch_load_in_the_package_bypasses_safe_load():
    """Every torch.load call of sopo_ext is safe_load's, and that one passes weights_only=True."""
    offenders = []
    for f in PACKAGE.rglob("*.py"):
        for line, name, node in _load_calls(ast.parse(f.read_text())):
            if f.name != "safe_load.py":
                offenders.append(f"{f.relative_to(PACKAGE.parent)}:{line}: {name}")
            else:
                kw = {k.arg: k.value for k in node.keywords}
                assert name == "torch.load" and isinstance(kw.get("weights_only"), ast.Constant) \
                    and kw["weights_only"].value is True
    assert offenders == []
