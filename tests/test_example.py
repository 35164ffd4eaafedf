"""examples/mdm_sopo_step.py runs: a few SoPo steps give finite losses, train the policy and
leave the frozen reference untouched."""
from __future__ import annotations

import importlib.util
import math
import pathlib
import sys

import pytest
import torch

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "mdm_sopo_step.py"


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("mdm_sopo_step", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up in sys.modules
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_main_runs_and_trains_policy_only(example, capsys):
    ex = example.build(seed=0)
    policy0, reference0 = _snapshot(ex.policy), _snapshot(ex.reference)
    assert all(not p.requires_grad for p in ex.reference.parameters())

    losses = example.main(steps=3, seed=0, example=ex)

    assert len(losses) == 3
    assert all(math.isfinite(x) for x in losses), losses
    # Policy == reference before the first update: d_w = d_l = 0, so the loss is exactly log 2.
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6)
    after = ex.policy.state_dict()
    assert any(not torch.equal(policy0[k], after[k]) for k in policy0), "policy did not change"
    for k, v in ex.reference.state_dict().items():
        assert torch.equal(reference0[k], v), f"reference parameter {k} changed"
    assert all(p.grad is None for p in ex.reference.parameters())
    # the per-step log line
    out = capsys.readouterr().out
    assert out.count("step ") == 3 and "valuable" in out and "implicit acc" in out


def test_main_default_build_is_seeded(example):
    a = example.main(steps=2, seed=1, verbose=False)
    b = example.main(steps=2, seed=1, verbose=False)
    assert a == b and all(math.isfinite(x) for x in a)
