"""The benchmark's re-implementation of the official SoPo step (benchmarks/official_loop.py) is
a faithful baseline: it samples exactly what the package's ancestral sampler samples, and its
unfused loss is the reference SoPo loss."""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

import sopo_ext.reference as R
from sopo_ext.diffusion import DiffusionConfig, GaussianDiffusion
from sopo_ext.models import build_model
from sopo_ext.models.text import HashEncoder

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import official_loop as OL  # noqa: E402


def _setup(seed=0):
    torch.manual_seed(seed)
    enc = HashEncoder(dim=32)
    mdm = build_model("mdm", nfeats=12, text_dim=32, d_model=16, num_layers=1, num_heads=2,
                      ff_size=32, max_frames=24, dropout=0.0)
    rw = build_model("tmr", nfeats=12, text_dim=32, d_model=16, num_layers=1, num_heads=2,
                     ff_size=32, latent_dim=8, text_hidden=16).eval()
    diff = GaussianDiffusion(DiffusionConfig(num_steps=50))
    caps = ["a person walks forward", "someone waves the left hand twice", "a man jumps"]
    mask = torch.zeros(3, 24, dtype=torch.bool)
    for i, L in enumerate((24, 17, 9)):
        mask[i, :L] = True
    motion = torch.randn(3, 24, 12) * mask[..., None]
    return enc, mdm, rw, diff, {"captions": caps, "motion": motion, "mask": mask}


@pytest.mark.parametrize("steps", [1, 7, 50])
def test_sampler_draws_what_the_package_sampler_draws(steps):
    enc, mdm, rw, diff, b = _setup()
    step = OL.OfficialStep(mdm, copy.deepcopy(mdm), diff, rw, enc, k=2, steps=steps)
    got = step.p_sample_loop(b["captions"], b["mask"], torch.Generator().manual_seed(3))
    mdm.eval()
    want = diff.sample(mdm, (3, 24, 12), enc.encode(b["captions"]), b["mask"], steps=steps,
                       sampler="ddpm", generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_loss_is_the_reference_sopo_loss():
    g = torch.Generator().manual_seed(0)
    B, T, F = 4, 10, 6
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 7:] = False
    mask[3, 2:] = False
    xs = [torch.randn(B, T, F, generator=g) * mask[..., None] for _ in range(6)]
    pw, rw_, xw, pl, rl, xl = xs
    p = torch.rand(B, generator=g)
    mask_l = torch.tensor([1.0, 0.0, 1.0, 0.0])
    got = OL.official_loss(OL.masked_l2(pw, xw, mask), OL.masked_l2(rw_, xw, mask),
                           OL.masked_l2(pl, xl, mask), OL.masked_l2(rl, xl, mask), p, mask_l)
    m = mask[..., None].expand(B, T, F)
    want = R.sopo_loss(pw, rw_, xw, pl, rl, xl, beta_w=2.0 - p, valuable=mask_l.bool(),
                       beta=1.0, scale=1.0, mask_w=m, mask_l=m)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_step_runs_backward_and_text_caching_changes_only_the_cost():
    enc, mdm, rw, diff, b = _setup()
    losses = []
    for cache in (False, True):
        pol = copy.deepcopy(mdm).train()
        step = OL.OfficialStep(pol, copy.deepcopy(mdm), diff, rw, enc, k=3, steps=4, cache_text=cache)
        loss = step(b, torch.Generator().manual_seed(5))
        loss.backward()
        assert torch.isfinite(loss) and any(p.grad is not None for p in pol.parameters())
        assert all(p.grad is None for p in step.reference.parameters())
        losses.append(loss.detach())
    assert torch.equal(losses[0], losses[1])
    # policy == reference at step 0 but the four terms draw fresh noise: the loss is not log 2
    assert abs(float(losses[0]) - 0.6931) > 1e-4
