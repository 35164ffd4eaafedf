"""The Python trainer API: SoPoConfig (every flag, validated) and SoPoTrainer (the run the CLI
makes, with objects instead of names and overridable steps), and the README's example."""
from __future__ import annotations

import dataclasses
import functools
import json
import runpy
import sys
from pathlib import Path

import pytest
import torch

import sopo_ext
from sopo_ext import SoPoConfig, SoPoTrainer, train
from sopo_ext import checkpoint as C
from sopo_ext.config import ConfigError, PRESETS
from sopo_ext.data.humanml3d import HumanML3D

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def assets(tiny_assets):
    return tiny_assets


def tiny(assets, out, **kw) -> dict:
    """The settings of tests/test_train.py's targv as SoPoConfig fields."""
    d = dict(method="sopo", backbone="mdm", data=str(assets["data"]), base=str(assets["mdm"]),
             reward=str(assets["reward"]), evaluator="none", out=str(out), steps=2, batch_size=4,
             k=2, sampling_steps=2, warmup=1, lr=1e-3, progress=False, threads=1, animation=False,
             eval_steps=2)
    d.update(kw)
    return d


def cli_argv(settings: dict) -> list:
    argv = []
    for k, v in settings.items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            argv += [] if v else ["--no-" + k.replace("_", "-")]
        else:
            argv += [flag, str(v)]
    return argv


def weights(path) -> dict:
    return C.load_checkpoint(path).model.state_dict()


def assert_same_weights(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=0, msg=k)


# ------------------------------------------------------------------------------ SoPoConfig
def test_every_flag_is_a_config_field_with_the_same_default():
    ns = train.build_parser().parse_args([])
    fields = {f.name for f in dataclasses.fields(SoPoConfig)}
    assert set(vars(ns)) == fields - {"step_version"}
    cli, api = train.parse_args([]), SoPoConfig()
    for name in fields:
        assert getattr(cli, name) == getattr(api, name), name
    assert (api.method, api.k, api.sampler, api.sampling_steps, api.out) == ("sopo", 4, "ddim", 8, "runs/train-sopo-mdm")


def test_presets_fill_only_what_is_not_given():
    c = SoPoConfig(preset="official-loss", k=3)
    assert (c.k, c.noise, c.sampler, c.sampling_steps) == (3, PRESETS["official-loss"]["noise"], "ddpm", 50)
    assert SoPoConfig(preset="diffusion-dpo").method == "modipo"


@pytest.mark.parametrize("kwargs, field, message", [
    (dict(steps=0), "steps", "must be >= 1"),
    (dict(lr=float("nan")), "lr", "must be positive"),
    (dict(method="ppo"), "method", "must be one of"),
    (dict(method="diffusion-dpo"), "method", "now called 'modipo'"),
    (dict(preset="official"), "preset", "official-loss"),
    (dict(cond_drop=1.0), "cond_drop", "must be in [0, 1)"),
    (dict(scale_regime="paper", scale=2.0), "scale", "sets the scale itself"),
    (dict(eval_samples=8), "eval_samples", "must be >= 32"),
    (dict(tau=float("inf")), "tau", "must be finite"),
])
def test_config_names_the_bad_field(kwargs, field, message):
    with pytest.raises(ConfigError) as e:
        SoPoConfig(**kwargs)
    assert e.value.field == field and message in str(e.value)


def test_command_reproduces_the_config():
    c = SoPoConfig(backbone="mld", preset="official-loss", k=3, lr=3e-4, eval_before=False)
    cmd = c.command()
    assert cmd.startswith("python -m sopo_ext.train ")
    again = train.parse_args(cmd.split()[3:])
    for f in dataclasses.fields(SoPoConfig):
        assert getattr(again, f.name) == getattr(c, f.name), f.name


# ------------------------------------------------------------------------------ SoPoTrainer
def test_trainer_run_equals_the_cli_run(assets, tmp_path):
    api_out, cli_out = tmp_path / "api", tmp_path / "cli"
    summary = SoPoTrainer(SoPoConfig(**tiny(assets, api_out))).train()
    assert summary["steps"] == 2 and summary["before"] is None and summary["after"] is None
    assert json.loads((api_out / "summary.json").read_text()) == summary
    assert summary["command"].startswith("python -m sopo_ext.train ")
    assert train.main(cli_argv(tiny(assets, cli_out))) == 0
    assert_same_weights(api_out / "model", cli_out / "model")
    # the recorded command is a command line that makes the same config
    rec = train.parse_args(summary["command"].split()[3:])
    assert rec.fingerprint() == SoPoConfig(**tiny(assets, api_out)).fingerprint()


def test_objects_instead_of_names(assets, tmp_path):
    by_name, by_object = tmp_path / "names", tmp_path / "objects"
    SoPoTrainer(SoPoConfig(**tiny(assets, by_name))).train()
    cfg = SoPoConfig(**tiny(assets, by_object, base=None, reward=None))
    trainer = SoPoTrainer(
        cfg, base=C.load_checkpoint(assets["mdm"], "mdm"), reward=C.load_checkpoint(assets["reward"], "tmr"),
        train_dataset=HumanML3D(assets["data"], "train", seed=cfg.seed, max_len=cfg.max_len),
        test_dataset=HumanML3D(assets["data"], "test", seed=cfg.seed, max_len=cfg.max_len))
    trainer.train()
    assert_same_weights(by_name / "model", by_object / "model")


def test_a_wrong_model_kind_is_refused(assets, tmp_path):
    with pytest.raises(C.CheckpointError, match="'tmr'"):
        SoPoTrainer(SoPoConfig(**tiny(assets, tmp_path / "x")),
                    reward=C.load_checkpoint(assets["mdm"], "mdm")).train()


def test_overridden_steps_are_used(assets, tmp_path):
    class Frozen(SoPoTrainer):
        """A zero loss: AdamW (no weight decay) leaves every weight where it was."""
        calls = 0

        def training_step(self, step):
            Frozen.calls += 1
            loss, stats = super().training_step(step)
            return loss * 0.0, stats

    out = tmp_path / "frozen"
    Frozen(SoPoConfig(**tiny(assets, out, steps=3))).train()
    assert Frozen.calls == 3
    base = weights(assets["mdm"])
    tuned = weights(out / "model")
    for k in base:
        torch.testing.assert_close(tuned[k], base[k], rtol=0, atol=0, msg=k)


def test_the_readme_example_runs(assets, tmp_path, monkeypatch, capsys):
    """examples/train_with_api.py (the README's example) line by line, on the tiny assets."""
    small = tiny(assets, tmp_path / "unused", evaluator=str(assets["evaluator"]), eval_samples=32)
    small.pop("out")
    given = {}

    def config(**kw):
        given.update(kw)
        return SoPoConfig(**{**kw, **small, "steps": 2})

    monkeypatch.setattr(sopo_ext, "SoPoConfig", config)
    monkeypatch.setattr(sys, "argv", ["train_with_api.py", str(tmp_path / "example")])
    runpy.run_path(str(ROOT / "examples" / "train_with_api.py"), run_name="__main__")
    assert given["method"] == "sopo" and given["out"] == str(tmp_path / "example")
    assert (tmp_path / "example" / "model").is_dir()
    assert "R-precision top1" in capsys.readouterr().out


@pytest.mark.parametrize("native", [False, True])
def test_bf16_on_a_cpu_without_native_bf16_is_warned(assets, tmp_path, monkeypatch, capsys, native):
    """On an AVX2 machine bf16 autocast emulates the matrix products (1.3 vs 98 GFLOP/s measured
    here): the trainer says so before it starts, and only then."""
    import sopo_ext.trainer as T
    monkeypatch.setattr(T, "cpu_has_native_bf16", lambda: native)
    SoPoTrainer(SoPoConfig(**tiny(assets, tmp_path / "bf16", steps=1, bf16=True))).train()
    assert ("without native bf16" in capsys.readouterr().err) == (not native)
