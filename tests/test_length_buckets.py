"""Online sampling in length buckets (PreferenceStep.sample with host-side lengths): every sample
lands in its own row, cut at its caption's length, and a model that ignores the noise gives
exactly what one loop over the whole padded batch gives."""
from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from sopo_ext import checkpoint as C
from sopo_ext.diffusion import DiffusionConfig, GaussianDiffusion
from sopo_ext.methods import PreferenceStep, StepConfig
from sopo_ext.sampling import diffusion_from_meta


class NoiseBlind(nn.Module):
    """x0 prediction that depends on the caption and the frame index only (never on x_t), so a
    deterministic DDIM sample is exactly this output wherever and in whatever batch it is drawn."""
    kind, prediction = "mdm", "x0"

    def __init__(self, F=5, D=8):
        super().__init__()
        self.config = SimpleNamespace(nfeats=F)
        self.proj = nn.Linear(D, F)

    def forward(self, x_t, t, text_emb, mask=None, uncond=None):
        T = x_t.shape[1]
        frames = torch.arange(T, dtype=x_t.dtype, device=x_t.device)[None, :, None]
        out = self.proj(text_emb)[:, None, :] * (1 + 0.01 * frames)
        return out * mask[..., None].to(out.dtype)


def _inputs(B=7, T=30, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([30, 4, 17, 9, 30, 12, 1])[:B]
    mask = torch.arange(T)[None] < lengths[:, None]
    return torch.randn(B, D, generator=g), mask, lengths


@pytest.mark.parametrize("buckets", [2, 3, 4, 7, 16])
def test_buckets_place_every_sample_in_its_row(buckets):
    model = NoiseBlind().eval()
    diff = GaussianDiffusion(DiffusionConfig(num_steps=20))
    text, mask, lengths = _inputs()
    outs = {}
    for nb, lens in ((1, None), (buckets, lengths)):
        step = PreferenceStep(model, copy.deepcopy(model), diff, nn.Identity(),
                              StepConfig(k=3, sampling_steps=4, length_buckets=nb,
                                                         min_bucket_rows=1))
        x, motions, mask_k = step.sample(model, text, mask, 3, torch.Generator().manual_seed(1), lens)
        outs[nb] = x
        assert x.shape == (21, 30, 5) and torch.equal(mask_k, mask.repeat_interleave(3, 0))
        assert (x[~mask_k] == 0).all()
    torch.testing.assert_close(outs[buckets], outs[1], rtol=1e-6, atol=1e-6)


def test_real_mdm_buckets_are_padded_and_finite(tiny_assets):
    base = C.load_checkpoint(tiny_assets["mdm"])
    model = base.model.eval()
    text, mask, lengths = _inputs(D=model.config.text_dim)
    F = model.config.nfeats
    step = PreferenceStep(model, copy.deepcopy(model), diffusion_from_meta(base.meta), nn.Identity(),
                          StepConfig(k=2, sampling_steps=3, length_buckets=3, min_bucket_rows=1))
    x, _, mask_k = step.sample(model, text, mask, 2, torch.Generator().manual_seed(0), lengths)
    assert x.shape == (14, 30, F) and torch.isfinite(x).all()
    assert (x[~mask_k] == 0).all() and (x[mask_k].abs().sum(-1) > 0).all()
    # deterministic for a seed
    x2, _, _ = step.sample(model, text, mask, 2, torch.Generator().manual_seed(0), lengths)
    assert torch.equal(x, x2)


def test_device_lengths_or_one_bucket_fall_back_to_one_loop():
    model = NoiseBlind()
    step = PreferenceStep(model, copy.deepcopy(model), GaussianDiffusion(DiffusionConfig(num_steps=5)),
                          nn.Identity(), StepConfig(k=2, length_buckets=4, min_bucket_rows=1))
    lens = torch.tensor([3, 1, 2, 5, 4])
    assert step._length_groups(None, 5, 2) is None
    assert step._length_groups(lens.to("meta"), 5, 2) is None
    assert step._length_groups(lens, 5, 2) == [([1, 2], 2), ([0, 4], 4), ([3], 5)]
    step.cfg.min_bucket_rows = 4  # 10 samples: 2 groups of >= 4
    assert step._length_groups(lens, 5, 2) == [([1, 2, 0], 3), ([4, 3], 5)]
    step.cfg.min_bucket_rows = 16  # too few samples to split at all
    assert step._length_groups(lens, 5, 2) is None
    for bad in ({"length_buckets": 0}, {"min_bucket_rows": 0}, {"min_bucket_rows": True}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            StepConfig(**bad)
