"""Tests of the MDM-style x0 denoiser (sopo_ext.models.mdm) and the shared layers."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from sopo_ext.models.layers import (lengths_to_mask, patchify, token_mask_from_frames,
                                    unpatchify)
from sopo_ext.models.mdm import MDM, MDMConfig

NF = 263


def tiny_config(**kw) -> MDMConfig:
    base = dict(d_model=32, num_layers=2, num_heads=4, ff_size=64, text_dim=16,
                frames_per_token=4, max_frames=64)
    base.update(kw)
    return MDMConfig(**base)


def make_model(seed=0, **kw) -> MDM:
    torch.manual_seed(seed)
    return MDM(tiny_config(**kw))


def make_inputs(batch=3, frames=37, text_dim=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, frames, NF, generator=g)
    t = torch.randint(0, 50, (batch,), generator=g)
    text = torch.randn(batch, text_dim, generator=g)
    lengths = torch.tensor([frames, 20, 5][:batch])
    mask = lengths_to_mask(lengths, frames)
    x = x * mask.unsqueeze(-1)
    return x, t, text, mask


# ------------------------------------------------------------------ layers


def test_patchify_roundtrip_and_token_mask():
    x = torch.randn(2, 37, 5)
    p = patchify(x, 4)
    assert p.shape == (2, 10, 20)
    assert torch.equal(p[:, -1, 5:], torch.zeros(2, 15))  # 3 zero-padded frames
    assert torch.equal(unpatchify(p, 4, 5, 37), x)
    mask = lengths_to_mask(torch.tensor([37, 5]), 37)
    tm = token_mask_from_frames(mask, 4)
    assert tm[0].all()
    assert tm[1].tolist() == [True, True] + [False] * 8  # frame 4 valid -> token 1 valid


def test_defaults_and_config_json_roundtrip():
    c = MDMConfig()
    assert (c.d_model, c.num_layers, c.num_heads, c.ff_size, c.frames_per_token,
            c.max_frames, c.nfeats, c.text_dim, c.cond_drop_prob, c.norm_first) == \
        (128, 4, 4, 512, 4, 196, 263, 384, 0.1, True)
    d = json.loads(json.dumps(dataclasses.asdict(c)))
    assert MDMConfig(**d) == c
    assert MDM.kind == "mdm" and MDM.prediction == "x0"


# ------------------------------------------------------------------ shapes and masks


@pytest.mark.parametrize("fpt", [1, 4, 5])
def test_output_shape_odd_T(fpt):
    m = make_model(frames_per_token=fpt).eval()
    x, t, text, mask = make_inputs(frames=37)
    with torch.no_grad():
        y = m(x, t, text, mask)
    assert y.shape == (3, 37, NF)
    assert torch.isfinite(y).all()
    assert torch.equal(y[~mask], torch.zeros_like(y[~mask]))  # padded frames zeroed


def test_no_mask_means_all_valid():
    m = make_model().eval()
    x, t, text, _ = make_inputs()
    full = torch.ones(x.shape[:2], dtype=torch.bool)
    with torch.no_grad():
        assert torch.allclose(m(x, t, text), m(x, t, text, full), atol=1e-6)


def test_padded_content_does_not_change_valid_outputs():
    m = make_model().eval()
    x, t, text, mask = make_inputs()
    junk = x + 100.0 * torch.randn_like(x) * (~mask).unsqueeze(-1)
    with torch.no_grad():
        y1, y2 = m(x, t, text, mask), m(junk, t, text, mask)
    assert torch.isfinite(y2).all()
    assert torch.allclose(y1[mask], y2[mask], atol=1e-5)


def test_extra_padding_frames_do_not_change_valid_outputs():
    # The same sample padded to a longer T gives the same valid outputs.
    m = make_model().eval()
    x, t, text, mask = make_inputs(batch=2, frames=37)
    x_long = torch.cat([x, torch.randn(2, 11, NF)], dim=1)
    mask_long = torch.cat([mask, torch.zeros(2, 11, dtype=torch.bool)], dim=1)
    with torch.no_grad():
        y, y_long = m(x, t, text, mask), m(x_long, t, text, mask_long)
    assert torch.allclose(y[mask], y_long[:, :37][mask], atol=1e-5)


# ------------------------------------------------------------------ conditioning


def test_uncond_differs_and_ignores_text():
    m = make_model().eval()
    x, t, text, mask = make_inputs()
    on = torch.zeros(3, dtype=torch.bool)
    off = torch.ones(3, dtype=torch.bool)
    with torch.no_grad():
        y_c = m(x, t, text, mask, uncond=on)
        y_u = m(x, t, text, mask, uncond=off)
        y_u2 = m(x, t, torch.randn_like(text) * 10, mask, uncond=off)
        y_nan = m(x, t, torch.full_like(text, float("nan")), mask, uncond=off)
        y_none = m(x, t, None, mask)
        y_eval = m(x, t, text, mask)
    assert (y_c - y_u)[mask].abs().max() > 1e-3
    assert torch.equal(y_u, y_u2)
    assert torch.equal(y_u, y_nan)
    assert torch.equal(y_u, y_none)
    assert torch.equal(y_eval, y_c)  # eval mode never drops the text


def test_uncond_per_sample():
    m = make_model().eval()
    x, t, text, mask = make_inputs()
    u = torch.tensor([True, False, True])
    with torch.no_grad():
        y = m(x, t, text, mask, uncond=u)
        y_c = m(x, t, text, mask, uncond=torch.zeros(3, dtype=torch.bool))
        y_u = m(x, t, text, mask, uncond=torch.ones(3, dtype=torch.bool))
    assert torch.allclose(y[0], y_u[0]) and torch.allclose(y[1], y_c[1])
    assert torch.allclose(y[2], y_u[2])


def test_cond_drop_rate_in_training():
    # dropout=0 so that the only randomness is the condition drop; with a one-sample "batch"
    # repeated, each row is either the cond or the uncond output.
    m = make_model(dropout=0.0, cond_drop_prob=0.25)
    n = 800
    x = torch.randn(1, 8, NF).expand(n, -1, -1)
    t = torch.full((n,), 7)
    text = torch.randn(1, 16).expand(n, -1)
    with torch.no_grad():
        m.train()
        torch.manual_seed(123)
        y = m(x, t, text)
        m.eval()
        y_u = m(x[:1], t[:1], text[:1], uncond=torch.ones(1, dtype=torch.bool))
        y_c = m(x[:1], t[:1], text[:1])
    d_u = (y - y_u).flatten(1).abs().amax(1)
    d_c = (y - y_c).flatten(1).abs().amax(1)
    dropped = d_u < 1e-4
    assert torch.all(dropped ^ (d_c < 1e-4))  # every row is exactly one of the two
    rate = dropped.float().mean().item()
    assert abs(rate - 0.25) < 0.06, rate  # ~5 sigma for n=800
    # eval mode never drops, even with the same seed
    with torch.no_grad():
        torch.manual_seed(123)
        y_eval = m(x, t, text)
    assert torch.allclose(y_eval, y_c.expand_as(y_eval), atol=1e-5)


def test_cond_drop_prob_zero_and_explicit_uncond_in_training():
    m = make_model(dropout=0.0, cond_drop_prob=0.0).train()
    x, t, text, mask = make_inputs()
    with torch.no_grad():
        y_train = m(x, t, text, mask)
        y_expl = m(x, t, text, mask, uncond=torch.zeros(3, dtype=torch.bool))
        m.eval()
        y_eval = m(x, t, text, mask)
    assert torch.allclose(y_train, y_eval, atol=1e-5)
    assert torch.allclose(y_expl, y_eval, atol=1e-5)


# ------------------------------------------------------------------ determinism, grads, dtypes


def test_determinism_under_seed():
    x, t, text, mask = make_inputs()
    outs = []
    for _ in range(2):
        m = make_model(seed=5).train()
        torch.manual_seed(9)
        outs.append(m(x, t, text, mask))
    assert torch.equal(outs[0], outs[1])
    m2 = make_model(seed=6)
    assert not torch.equal(next(m2.parameters()), next(make_model(seed=5).parameters()))


def test_gradients_reach_all_parameters():
    m = make_model().train()
    x, t, text, mask = make_inputs()
    u = torch.tensor([True, False, False])  # both the null and the text projection are used
    y = m(x, t, text, mask, uncond=u)
    ((y - x) ** 2)[mask].mean().backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []
    assert m.num_parameters() == sum(p.numel() for p in m.parameters())


def test_bf16_autocast_close_to_fp32():
    m = make_model().eval()
    x, t, text, mask = make_inputs()
    with torch.no_grad():
        y32 = m(x, t, text, mask)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y16 = m(x, t, text, mask)
    assert torch.isfinite(y16).all()
    err = (y16.float() - y32)[mask].abs().max() / y32[mask].abs().max()
    assert err < 0.1, err


# ------------------------------------------------------------------ validation


@pytest.mark.parametrize("kw, field", [
    (dict(d_model=30, num_heads=4), "d_model"),
    (dict(frames_per_token=0), "frames_per_token"),
    (dict(num_layers=0), "num_layers"),
    (dict(dropout=1.5), "dropout"),
    (dict(cond_drop_prob=-0.1), "cond_drop_prob"),
    (dict(activation="tanh"), "activation"),
])
def test_config_validation(kw, field):
    with pytest.raises(ValueError, match=field):
        tiny_config(**kw)


def test_input_validation():
    m = make_model().eval()
    x, t, text, mask = make_inputs()
    with pytest.raises(ValueError, match=r"x_t.*263.*\(3, 37, 262\)"):
        m(x[..., :-1], t, text, mask)
    with pytest.raises(ValueError, match=r"mask.*\[3, 37\].*\(3, 36\)"):
        m(x, t, text, mask[:, :-1])
    with pytest.raises(ValueError, match=r"text_emb.*\[3, 16\].*\(3, 15\)"):
        m(x, t, text[:, :-1], mask)
    with pytest.raises(ValueError, match=r"t must have shape \[B\]"):
        m(x, t[:2], text, mask)
    with pytest.raises(ValueError, match=r"uncond.*\[3\]"):
        m(x, t, text, mask, uncond=torch.zeros(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="max_frames=64"):
        m(torch.zeros(1, 65, NF), t[:1], text[:1])
