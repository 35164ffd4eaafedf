"""Tests of sopo_ext.diffusion: schedules, forward process, conversions, CFG, samplers, masks."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sopo_ext.diffusion import (DiffusionConfig, GaussianDiffusion, make_betas,
                                repeat_interleave_batch)

F64 = torch.float64


# ------------------------------------------------------------------------------ toy models
class OracleModel(nn.Module):
    """Data is the single point x*: the exact x0 is x*, the exact eps follows from x_t."""

    def __init__(self, x_star: torch.Tensor, diffusion: GaussianDiffusion, prediction: str):
        super().__init__()
        self.x_star, self.diffusion, self.prediction = x_star, diffusion, prediction
        self.calls = []

    def forward(self, x_t, t, text_emb, mask=None, uncond=None):
        self.calls.append(t.clone())
        x0 = self.x_star.expand_as(x_t)
        if self.prediction == "x0":
            return x0.clone()
        return self.diffusion.eps_from_x0(x_t, t, x0)


class GaussianOracle(nn.Module):
    """Data ~ N(0, s^2 I): exact E[x0 | x_t] = sqrt(a) s^2 / (a s^2 + 1 - a) x_t."""
    prediction = "x0"

    def __init__(self, diffusion: GaussianDiffusion, s: float):
        super().__init__()
        self.d, self.s2 = diffusion, s * s

    def forward(self, x_t, t, text_emb, mask=None, uncond=None):
        a = self.d.alphas_cumprod[t].to(x_t.dtype).view(-1, *([1] * (x_t.dim() - 1)))
        return a.sqrt() * self.s2 / (a * self.s2 + 1 - a) * x_t


class CondToy(nn.Module):
    """Output depends on x_t, t, text and uncond; counts calls and rows."""

    def __init__(self, prediction="x0"):
        super().__init__()
        self.prediction = prediction
        self.calls = []

    def forward(self, x_t, t, text_emb, mask=None, uncond=None):
        self.calls.append((x_t.shape[0], None if uncond is None else uncond.clone()))
        cond = text_emb.sum(-1).view(-1, 1, 1).to(x_t.dtype)
        if uncond is not None:
            cond = torch.where(uncond.view(-1, 1, 1), torch.full_like(cond, -0.7), cond)
        return 0.5 * x_t + cond + 1e-3 * t.view(-1, 1, 1).to(x_t.dtype)


class MixingToy(nn.Module):
    """Mixes information across frames of valid positions only (respects the mask)."""
    prediction = "x0"

    def forward(self, x_t, t, text_emb, mask=None, uncond=None):
        m = mask.unsqueeze(-1).to(x_t.dtype)
        mean = (x_t * m).sum(1, keepdim=True) / m.sum(1, keepdim=True)
        return 0.3 * x_t + 0.2 * mean + text_emb[:, :1].unsqueeze(1)


def _diff(**kw):
    return GaussianDiffusion(DiffusionConfig(**kw))


# ------------------------------------------------------------------------------- schedules
@pytest.mark.parametrize("schedule", ["cosine", "scaled_linear", "linear"])
def test_alphas_cumprod_monotone_in_unit_interval(schedule):
    d = _diff(schedule=schedule)
    ab = d.alphas_cumprod
    assert ab.dtype == F64 and ab.shape == (1000,)
    assert bool((ab > 0).all()) and bool((ab < 1).all())
    assert bool((ab[1:] < ab[:-1]).all())
    assert d.alphas_cumprod_prev[0] == 1.0
    torch.testing.assert_close(d.alphas_cumprod_prev[1:], ab[:-1], rtol=0, atol=0)


def test_cosine_schedule_endpoints():
    d = _diff(schedule="cosine", num_steps=1000)
    s = 0.008
    f = lambda u: math.cos((u + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    assert d.betas[0].item() == pytest.approx(1 - f(1 / 1000) / f(0), rel=1e-12)
    assert d.alphas_cumprod[0].item() == pytest.approx(f(1 / 1000) / f(0), rel=1e-12)
    assert d.betas[-1].item() == 0.999  # clipped
    assert float(d.betas.max()) <= 0.999
    assert d.alphas_cumprod[-1].item() < 1e-6
    mid = d.alphas_cumprod[499].item()
    assert mid == pytest.approx(f(500 / 1000) / f(0), rel=1e-9)


def test_scaled_linear_matches_formula():
    d = _diff(schedule="scaled_linear", num_steps=1000, prediction="eps")
    T = 1000
    for i in (0, 1, 500, 999):
        r = math.sqrt(0.00085) + (math.sqrt(0.012) - math.sqrt(0.00085)) * i / (T - 1)
        assert d.betas[i].item() == pytest.approx(r * r, rel=1e-12)
    assert d.betas[0].item() == pytest.approx(0.00085, rel=1e-12)
    assert d.betas[-1].item() == pytest.approx(0.012, rel=1e-12)
    torch.testing.assert_close(d.alphas_cumprod, torch.cumprod(1 - d.betas, 0))
    lin = make_betas("linear", 10, 0.001, 0.01)
    torch.testing.assert_close(lin, torch.linspace(0.001, 0.01, 10, dtype=F64))


# ------------------------------------------------------------------------ forward process
@pytest.mark.parametrize("t_int", [10, 400, 900])
def test_q_sample_statistics(t_int):
    d = _diff(num_steps=1000)
    g = torch.Generator().manual_seed(0)
    N = 20000
    x0 = torch.tensor([1.5, -0.5, 0.0], dtype=F64)
    xb = x0.expand(N, 1, 3)
    noise = torch.randn(N, 1, 3, generator=g, dtype=F64)
    xt = d.q_sample(xb, torch.full((N,), t_int), noise)
    ab = d.alphas_cumprod[t_int].item()
    mean, var = xt.mean(0).squeeze(0), xt.var(0).squeeze(0)
    se_mean = math.sqrt((1 - ab) / N)
    se_var = (1 - ab) * math.sqrt(2 / (N - 1))
    torch.testing.assert_close(mean, math.sqrt(ab) * x0, rtol=0, atol=5 * se_mean)
    torch.testing.assert_close(var, torch.full((3,), 1 - ab, dtype=F64), rtol=0, atol=5 * se_var)


def test_q_sample_is_exact_formula_and_keeps_dtype():
    d = _diff(num_steps=50)
    x0 = torch.randn(4, 6, 5)
    n = torch.randn(4, 6, 5)
    t = torch.tensor([0, 10, 20, 49])
    xt = d.q_sample(x0, t, n)
    assert xt.dtype == torch.float32
    a = d.alphas_cumprod[t].float().view(4, 1, 1)
    torch.testing.assert_close(xt, a.sqrt() * x0 + (1 - a).sqrt() * n)


# ---------------------------------------------------------------------------- conversions
@pytest.mark.parametrize("prediction", ["x0", "eps"])
@pytest.mark.parametrize("schedule", ["cosine", "scaled_linear"])
def test_conversions_round_trip(prediction, schedule):
    d = _diff(num_steps=1000, schedule=schedule, prediction=prediction)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(5, 7, 4, generator=g, dtype=F64)
    eps = torch.randn(5, 7, 4, generator=g, dtype=F64)
    t = torch.tensor([0, 1, 250, 700, 990])
    xt = d.q_sample(x0, t, eps)
    torch.testing.assert_close(d.x0_from_eps(xt, t, d.eps_from_x0(xt, t, x0)), x0,
                               rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(d.eps_from_x0(xt, t, x0), eps, rtol=1e-10, atol=1e-10)
    out = d.target(x0, eps)
    assert out is (x0 if prediction == "x0" else eps)
    x0_hat, eps_hat = d.x0_eps_from_output(out, xt, t)
    torch.testing.assert_close(x0_hat, x0, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(eps_hat, eps, rtol=1e-10, atol=1e-10)


def test_snr_identity_and_loss_weight():
    d = _diff(num_steps=1000)
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(6, 8, 3, generator=g, dtype=F64)
    eps = torch.randn(6, 8, 3, generator=g, dtype=F64)
    t = torch.tensor([0, 3, 100, 500, 800, 950])
    xt = d.q_sample(x0, t, eps)
    x0_hat = x0 + 0.3 * torch.randn(6, 8, 3, generator=g, dtype=F64)
    eps_hat = d.eps_from_x0(xt, t, x0_hat)
    l_eps = ((eps_hat - eps) ** 2).sum((1, 2))
    l_x0 = ((x0_hat - x0) ** 2).sum((1, 2))
    snr = d.snr(t)
    ab = d.alphas_cumprod[t]
    torch.testing.assert_close(snr, ab / (1 - ab), rtol=1e-14, atol=0)
    torch.testing.assert_close(l_eps, snr * l_x0, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(d.loss_weight(t, "eps") * l_x0, l_eps, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(d.loss_weight(t, towards="x0") * l_eps, l_x0, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="towards"):
        d.loss_weight(t, towards="v")


# ---------------------------------------------------------------------------- respacing
@pytest.mark.parametrize("T,steps", [(1000, 50), (1000, 1000), (1000, 1), (1000, 2), (50, 7),
                                     (100, 99)])
def test_sampling_timesteps(T, steps):
    d = _diff(num_steps=T)
    ts = d.sampling_timesteps(steps)
    assert len(ts) == steps and ts[0] == T - 1
    assert all(a > b for a, b in zip(ts, ts[1:]))
    assert all(0 <= x < T for x in ts)
    if steps > 1:
        assert ts[-1] == 0
    if steps == T:
        assert ts == list(range(T - 1, -1, -1))


def test_sampling_timesteps_even_spacing():
    ts = _diff(num_steps=1000).sampling_timesteps(50)
    gaps = [a - b for a, b in zip(ts, ts[1:])]
    assert set(gaps) <= {20, 21}


def test_full_respacing_reproduces_original_chain():
    d = _diff(num_steps=200, schedule="scaled_linear", prediction="eps")
    sch = d.respaced_schedule(200)
    torch.testing.assert_close(sch["betas"], d.betas.flip(0), rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(sch["posterior_variance"][:-1], d.posterior_variance.flip(0)[:-1],
                               rtol=1e-9, atol=1e-14)
    # Respaced betas reproduce abar of the sub-chain.
    sub = d.respaced_schedule(13)
    torch.testing.assert_close(torch.cumprod((1 - sub["betas"]).flip(0), 0).flip(0),
                               sub["alphas_cumprod"], rtol=1e-12, atol=0)
    # Sampling with steps == T equals steps=None, for both samplers.
    model = CondToy("eps")
    x_T = torch.randn(2, 3, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    text = torch.randn(2, 4, dtype=F64)
    for sampler in ("ddim", "ddpm"):
        a = d.sample(model, x_T, text, steps=None, sampler=sampler,
                     generator=torch.Generator().manual_seed(5))
        b = d.sample(model, x_T, text, steps=200, sampler=sampler,
                     generator=torch.Generator().manual_seed(5))
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------ sampling
def test_ddim_eta0_deterministic_given_x_T():
    d = _diff(num_steps=100)
    model = CondToy()
    x_T = torch.randn(3, 5, 2)
    text = torch.randn(3, 4)
    a = d.sample(model, x_T, text, steps=10, generator=torch.Generator().manual_seed(0))
    b = d.sample(model, x_T.clone(), text, steps=10, generator=torch.Generator().manual_seed(99))
    assert torch.equal(a, b)
    # Model called with the ORIGINAL training timesteps, once per step.
    assert len(model.calls) == 20
    c = d.sample(model, noise=x_T, shape_or_x_T=(3, 5, 2), text_emb=text, steps=10)
    assert torch.equal(a, c)


def test_sample_with_generator_is_reproducible_and_shapes():
    d = _diff(num_steps=50, prediction="eps", schedule="scaled_linear")
    model = CondToy("eps")
    text = torch.randn(4, 3)
    a = d.sample(model, (4, 1, 6), text, sampler="ddpm", steps=8,
                 generator=torch.Generator().manual_seed(3))
    b = d.sample(model, (4, 1, 6), text, sampler="ddpm", steps=8,
                 generator=torch.Generator().manual_seed(3))
    assert a.shape == (4, 1, 6) and a.dtype == torch.float32 and torch.equal(a, b)
    c = d.sample(model, (4, 1, 6), text, sampler="ddpm", steps=8,
                 generator=torch.Generator().manual_seed(4))
    assert not torch.equal(a, c)
    assert not a.requires_grad


@pytest.mark.parametrize("prediction,schedule", [("x0", "cosine"), ("eps", "scaled_linear"),
                                                 ("eps", "cosine")])
@pytest.mark.parametrize("sampler,eta", [("ddim", 0.0), ("ddim", 1.0), ("ddpm", 0.0)])
@pytest.mark.parametrize("steps", [None, 25, 1])
def test_oracle_single_point_recovered(prediction, schedule, sampler, eta, steps):
    d = _diff(num_steps=100, schedule=schedule, prediction=prediction)
    x_star = torch.tensor([[0.7, -1.2, 2.0]], dtype=F64)
    model = OracleModel(x_star, d, prediction)
    text = torch.zeros(4, 2, dtype=F64)
    out = d.sample(model, (4, 1, 3), text, steps=steps, sampler=sampler, eta=eta,
                   generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, x_star.expand(4, 1, 3), rtol=1e-8, atol=1e-8)
    expected = d.sampling_timesteps(steps)
    assert [int(c[0]) for c in model.calls] == expected


@pytest.mark.parametrize("sampler,eta", [("ddim", 0.0), ("ddim", 1.0), ("ddpm", 0.0)])
def test_gaussian_data_variance_is_recovered(sampler, eta):
    # Exact posterior-mean denoiser for N(0, s^2) data: samples have std close to s.
    d = _diff(num_steps=1000)
    s = 0.5
    out = d.sample(GaussianOracle(d, s), torch.randn(4000, 1, 2, dtype=F64,
                                                     generator=torch.Generator().manual_seed(1)),
                   torch.zeros(4000, 1, dtype=F64), steps=100, sampler=sampler, eta=eta,
                   generator=torch.Generator().manual_seed(2))
    assert abs(out.mean().item()) < 0.03
    assert out.std().item() == pytest.approx(s, rel=0.08)


# ------------------------------------------------------------------------------------ CFG
def test_cfg_scale_one_is_the_conditional_model_in_one_call():
    d = _diff(num_steps=20)
    model = CondToy()
    x = torch.randn(3, 4, 2, dtype=F64)
    t = torch.tensor([1, 5, 19])
    text = torch.randn(3, 5, dtype=F64)
    x0_hat, eps_hat = d.model_predictions(model, x, t, text, guidance_scale=1.0)
    assert len(model.calls) == 1 and model.calls[0][0] == 3
    assert not bool(model.calls[0][1].any())
    ref = model(x, t, text, uncond=torch.zeros(3, dtype=torch.bool))
    assert torch.equal(x0_hat, ref)
    torch.testing.assert_close(eps_hat, d.eps_from_x0(x, t, ref), rtol=0, atol=0)


@pytest.mark.parametrize("scale", [0.0, 2.5, 7.5])
@pytest.mark.parametrize("prediction", ["x0", "eps"])
def test_cfg_combines_outputs_in_one_forward(scale, prediction):
    d = _diff(num_steps=20, prediction=prediction)
    model = CondToy(prediction)
    x = torch.randn(3, 4, 2, dtype=F64)
    t = torch.tensor([0, 7, 19])
    text = torch.randn(3, 5, dtype=F64)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    x0_hat, eps_hat = d.model_predictions(model, x, t, text, mask, guidance_scale=scale)
    assert len(model.calls) == 1 and model.calls[0][0] == 6
    assert model.calls[0][1].tolist() == [False] * 3 + [True] * 3
    cond = model(x, t, text, uncond=torch.zeros(3, dtype=torch.bool))
    unc = model(x, t, text, uncond=torch.ones(3, dtype=torch.bool))
    assert not torch.allclose(cond, unc)
    out = unc + scale * (cond - unc)
    ref_x0, ref_eps = d.x0_eps_from_output(out, x, t)
    torch.testing.assert_close(x0_hat, ref_x0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(eps_hat, ref_eps, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------- padding
@pytest.mark.parametrize("sampler,eta", [("ddim", 0.0), ("ddim", 0.5), ("ddpm", 0.0)])
def test_padding_is_zero_and_does_not_leak(sampler, eta):
    d = _diff(num_steps=40)
    B, T, F = 3, 6, 4
    mask = torch.zeros(B, T, dtype=torch.bool)
    for i, n in enumerate([6, 4, 1]):
        mask[i, :n] = True
    text = torch.randn(B, 2)
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(B, T, F, generator=g)
    junk = x_T.clone()
    junk[~mask] = 1e3 * torch.randn(int((~mask).sum()), F, generator=g)
    kw = dict(steps=10, sampler=sampler, eta=eta, guidance_scale=2.0)
    a = d.sample(MixingToy(), x_T, text, mask, generator=torch.Generator().manual_seed(1), **kw)
    b = d.sample(MixingToy(), junk, text, mask, generator=torch.Generator().manual_seed(1), **kw)
    assert bool((a[~mask] == 0).all()) and bool((b[~mask] == 0).all())
    assert torch.equal(a, b)
    assert torch.isfinite(a).all()
    # Shape-only sampling with a mask also zeroes padding.
    c = d.sample(MixingToy(), (B, T, F), text, mask, generator=torch.Generator().manual_seed(1),
                 **kw)
    assert bool((c[~mask] == 0).all())


def test_repeat_interleave_batch():
    x = torch.arange(6).view(3, 2)
    r = repeat_interleave_batch(x, 2)
    assert r.tolist() == [[0, 1], [0, 1], [2, 3], [2, 3], [4, 5], [4, 5]]
    assert repeat_interleave_batch(["a", "b"], 3) == ["a", "a", "a", "b", "b", "b"]
    assert repeat_interleave_batch(None, 2) is None
    with pytest.raises(ValueError, match="k must be"):
        repeat_interleave_batch(x, 0)
    # Sampling B*K in one loop equals sampling each row separately with the same x_T rows.
    d = _diff(num_steps=20)
    text = torch.randn(2, 3)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    tk, mk = repeat_interleave_batch(text, 2), repeat_interleave_batch(mask, 2)
    x_T = torch.randn(4, 3, 2)
    out = d.sample(MixingToy(), x_T, tk, mk, steps=5)
    for row in range(4):
        one = d.sample(MixingToy(), x_T[row:row + 1], text[row // 2:row // 2 + 1],
                       mask[row // 2:row // 2 + 1], steps=5)
        torch.testing.assert_close(out[row:row + 1], one)


# ------------------------------------------------------------------------------ training
def test_training_losses_hand_computation():
    d = _diff(num_steps=30)
    model = CondToy()
    B, T, F = 2, 4, 3
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(B, T, F, generator=g, dtype=F64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    x0 = x0 * mask.unsqueeze(-1)
    noise = torch.randn(B, T, F, generator=g, dtype=F64)
    t = torch.tensor([3, 29])
    text = torch.randn(B, 2, dtype=F64)
    res = d.training_losses(model, x0, text, mask, t=t, noise=noise)
    a = d.alphas_cumprod[t].view(B, 1, 1)
    xt = (a.sqrt() * x0 + (1 - a).sqrt() * noise) * mask.unsqueeze(-1)
    torch.testing.assert_close(res["x_t"], xt)
    assert model.calls[-1][1] is None  # model drops text itself during training
    out = 0.5 * xt + text.sum(-1).view(B, 1, 1) + 1e-3 * t.view(B, 1, 1).to(F64)
    for b in range(B):
        n = int(mask[b].sum())
        expect = ((out[b, :n] - x0[b, :n]) ** 2).sum() / (n * F)
        assert res["loss"][b].item() == pytest.approx(expect.item(), rel=1e-12)
    assert torch.equal(res["t"], t)
    # eps parameterization targets the noise; no mask = plain mean.
    de = _diff(num_steps=30, prediction="eps")
    res_e = de.training_losses(CondToy("eps"), x0, text, None, t=t, noise=noise)
    out_e = (0.5 * de.q_sample(x0, t, noise) + text.sum(-1).view(B, 1, 1)
             + 1e-3 * t.view(B, 1, 1).to(F64))
    torch.testing.assert_close(res_e["loss"], ((out_e - noise) ** 2).mean((1, 2)))


def test_training_losses_sampled_t_and_gradients():
    d = _diff(num_steps=30)

    class Lin(nn.Module):
        prediction = "x0"

        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x_t, t, text_emb, mask=None, uncond=None):
            return self.lin(x_t)

    model = Lin()
    x0 = torch.randn(5, 4, 3)
    g = torch.Generator().manual_seed(0)
    r1 = d.training_losses(model, x0, torch.randn(5, 2), generator=g)
    r2 = d.training_losses(model, x0, torch.randn(5, 2),
                           generator=torch.Generator().manual_seed(0))
    assert torch.equal(r1["t"], r2["t"]) and torch.equal(r1["noise"], r2["noise"])
    assert r1["loss"].shape == (5,) and bool(((r1["t"] >= 0) & (r1["t"] < 30)).all())
    r1["loss"].mean().backward()
    assert model.lin.weight.grad is not None and model.lin.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------- validation
def test_config_validation():
    with pytest.raises(ValueError, match="schedule"):
        DiffusionConfig(schedule="quadratic")
    with pytest.raises(ValueError, match="prediction"):
        DiffusionConfig(prediction="v")
    with pytest.raises(ValueError, match="num_steps"):
        DiffusionConfig(num_steps=0)
    with pytest.raises(ValueError, match="beta_start"):
        DiffusionConfig(beta_start=0.02, beta_end=0.01)
    with pytest.raises(ValueError, match="beta_end"):
        DiffusionConfig(beta_end=1.5)
    import dataclasses
    import json
    cfg = DiffusionConfig(num_steps=50, schedule="scaled_linear", prediction="eps")
    assert DiffusionConfig(**json.loads(json.dumps(dataclasses.asdict(cfg)))) == cfg


def test_error_messages():
    d = _diff(num_steps=20)
    model = CondToy()
    x = torch.randn(2, 3, 4)
    text = torch.randn(2, 5)
    with pytest.raises(ValueError, match="steps"):
        d.sample(model, x, text, steps=21)
    with pytest.raises(ValueError, match="steps"):
        d.sample(model, x, text, steps=0)
    with pytest.raises(ValueError, match=r"t must be in \[0, 20\)"):
        d.q_sample(x, torch.tensor([0, 20]), x)
    with pytest.raises(ValueError, match="t must be in"):
        d.training_losses(model, x, text, t=torch.tensor([-1, 0]))
    with pytest.raises(ValueError, match="text_emb batch"):
        d.sample(model, x, torch.randn(3, 5))
    with pytest.raises(ValueError, match="text_emb batch"):
        d.training_losses(model, x, torch.randn(3, 5))
    with pytest.raises(ValueError, match="mask shape"):
        d.sample(model, x, text, torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask shape"):
        d.training_losses(model, x, text, torch.ones(3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="eta"):
        d.sample(model, x, text, eta=-0.1)
    with pytest.raises(ValueError, match="guidance_scale"):
        d.sample(model, x, text, guidance_scale=-1.0)
    with pytest.raises(ValueError, match="guidance_scale"):
        d.model_predictions(model, x, torch.tensor([0, 1]), text, guidance_scale=-2)
    with pytest.raises(ValueError, match="sampler"):
        d.sample(model, x, text, sampler="euler")
    with pytest.raises(ValueError, match="prediction"):
        d.sample(CondToy("eps"), x, text)
    with pytest.raises(ValueError, match="t must have shape"):
        d.q_sample(x, torch.tensor([0, 1, 2]), x)
    with pytest.raises(ValueError, match="no valid frame"):
        d.training_losses(model, x, text, torch.tensor([[1, 1, 1], [0, 0, 0]], dtype=torch.bool))
    with pytest.raises(ValueError, match="x_T either"):
        d.sample(model, x, text, noise=x)
