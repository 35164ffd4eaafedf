"""python -m sopo_ext.pretrain on a tiny generated dataset: every model trains, writes a loadable
checkpoint, resumes bit-exactly, and fails clearly on bad input."""
from __future__ import annotations

import json

import pytest
import torch
from tiny_configs import TINY

from sopo_ext import checkpoint as C
from sopo_ext import pretrain
from sopo_ext.data import synthetic



@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_data")
    synthetic.generate(d, num=48, seed=1)
    return d


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SOPO_EXT_CACHE", str(tmp_path / "cache"))


def argv(model, data_dir, out, *extra, steps=4):
    a = [model, "--data", str(data_dir), "--out", str(out), "--steps", str(steps),
         "--batch-size", "8", "--text-encoder", "hash", "--no-progress", "--threads", "1",
         "--val-every", "2", "--ckpt-every", "2", "--warmup", "1", "--evaluator", "none",
         "--reward", "none", "--set", *TINY[model]]
    if model == "mld":
        a[a.index("--set"):a.index("--set")] = ["--vae-steps", "3"]
    return a + list(extra)


def _kind(model):
    return {"reward": "tmr", "evaluator": "evaluator", "mdm": "mdm", "mld": "mld"}[model]


@pytest.mark.parametrize("model", ["reward", "evaluator", "mdm", "mld"])
def test_each_model_trains_and_writes_a_loadable_checkpoint(model, data_dir, tmp_path):
    out = tmp_path / "run"
    assert pretrain.main(argv(model, data_dir, out)) == 0
    c = C.load_checkpoint(out / "model", _kind(model))
    assert c.meta["steps"] == 4 + (3 if model == "mld" else 0)
    assert c.meta["made_by"].startswith(f"python -m sopo_ext.pretrain {model} ")
    assert c.mean is not None and c.std is not None and c.mean.shape == (263,)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics and all(isinstance(v, (int, float)) for v in metrics.values())
    if model in ("reward", "evaluator"):
        assert 0.0 <= metrics["test R@1"] <= metrics["test R@3"] <= 1.0
    else:
        assert metrics["val loss"] > 0
    rows = (out / "log.csv").read_text().splitlines()
    assert rows[0].startswith("step,") and len(rows) == 1 + c.meta["steps"]
    if model == "mld":  # the diffusion runs on standardized latents
        assert float(c.model.latent_std.min()) > 0
    if model in ("mdm", "mld"):
        assert c.meta["diffusion"]["prediction"] == ("x0" if model == "mdm" else "eps")


@pytest.mark.parametrize("model, stop", [("mdm", 2), ("mdm", 3), ("mld", 2), ("mld", 3), ("mld", 4)])
def test_resume_gives_the_same_weights_as_an_uninterrupted_run(model, stop, data_dir, tmp_path):
    full = tmp_path / "full"
    assert pretrain.main(argv(model, data_dir, full, steps=5)) == 0
    part = tmp_path / "part"
    assert pretrain.main(argv(model, data_dir, part, "--stop-after", str(stop), steps=5)) == 0
    assert not (part / "model").exists()
    assert pretrain.main(argv(model, data_dir, part, "--resume", steps=5)) == 0
    a = C.load_checkpoint(full / "model").model.state_dict()
    b = C.load_checkpoint(part / "model").model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert (full / "log.csv").read_text() == (part / "log.csv").read_text()


def test_resume_with_other_settings_is_refused(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert pretrain.main(argv("mdm", data_dir, out, "--stop-after", "2")) == 0
    assert pretrain.main(argv("mdm", data_dir, out, "--resume", "--lr", "0.5")) == 2
    assert "--lr was" in capsys.readouterr().err


def test_resume_without_checkpoint_starts_fresh(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert pretrain.main(argv("reward", data_dir, out, "--resume", steps=2)) == 0
    assert "starting from scratch" in capsys.readouterr().out
    assert (out / "model" / "config.json").is_file()


def test_export_writes_the_same_checkpoint(data_dir, tmp_path):
    out, exp = tmp_path / "run", tmp_path / "exported"
    assert pretrain.main(argv("reward", data_dir, out, "--export", str(exp), steps=2)) == 0
    a, b = C.load_checkpoint(out / "model"), C.load_checkpoint(exp)
    assert a.meta == b.meta
    assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))


@pytest.mark.parametrize("extra, message", [
    (["--set", "d_model=15"], "d_model"),
    (["--set", "nonexistent=1"], "unknown field 'nonexistent'"),
    (["--set", "oops"], "expects field=value"),
    (["--batch-size", "1000"], "fewer than batch_size"),
])
def test_bad_settings_are_reported(extra, message, data_dir, tmp_path, capsys):
    a = argv("mdm", data_dir, tmp_path / "run")
    if extra[0] == "--set":
        a = a[:a.index("--set")] + extra
    else:
        a += extra
    assert pretrain.main(a) == 2
    assert message in capsys.readouterr().err


def test_missing_data_directory(tmp_path, capsys):
    assert pretrain.main(["mdm", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 2
    assert "data directory not found" in capsys.readouterr().err


def test_numeric_flags_are_checked(tmp_path):
    with pytest.raises(SystemExit, match="--steps must be >= 1"):
        pretrain.parse_args(["mdm", "--steps", "0"])
