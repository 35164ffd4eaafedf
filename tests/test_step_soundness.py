"""The step's soundness (issue 14): one policy forward for every method (SFT included), noised
inputs zero at padding, non-finite rewards left out of the selection, the scale regimes, and
the flags that name them."""
from __future__ import annotations

import math

import pytest
import torch

from sopo_ext import functional as SF
from sopo_ext import reference as R
from sopo_ext import train
from sopo_ext.methods import METHODS, StepConfig

from test_train import _tiny_step, targv, train_rows


@pytest.fixture(scope="module")
def assets(tiny_assets):
    return tiny_assets


# ---------------------------------------------------------------------------- SFT, the control
def _sft_by_hand(step, batch, seed, cond_drop=0.0):
    x0, text, mask = batch["motion"], batch["text_emb"], batch["mask"]
    B = x0.shape[0]
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, step.diffusion.num_steps, (B,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    drop = (torch.rand(B, generator=g) < cond_drop) if cond_drop > 0 else torch.zeros(B, dtype=torch.bool)
    x_t = step.diffusion.q_sample(x0, t, noise) * mask[..., None]
    step.policy.eval()
    with torch.no_grad():
        out = step.policy(x_t, t, text, mask, drop)
    step.policy.train()
    return R.masked_mse(out.double(), x0.double(), mask[..., None].expand_as(x0)).mean(), drop


@pytest.mark.parametrize("cond_drop", [0.0, 0.5])
def test_sft_runs_the_policy_forward_of_the_preference_methods(cond_drop, assets):
    """SFT: eval mode (no dropout), captions dropped only by the shared cond_drop rule, x_t zero
    at padding; so it differs from the preference methods in the loss alone."""
    step, batch = _tiny_step(assets, "sft", cond_drop=cond_drop)
    step.policy.train()  # the trainer's mode: the step must not use dropout anyway
    loss, stats = step(batch, torch.Generator().manual_seed(7))
    expected, drop = _sft_by_hand(step, batch, 7, cond_drop)
    torch.testing.assert_close(loss.detach().double(), expected, rtol=1e-5, atol=1e-7)
    if cond_drop:
        assert drop.any() and not drop.all(), drop  # both kinds of rows were compared
    # a function of the step's generator only: no dropout, no text drop from the global RNG
    torch.manual_seed(12345)
    again, _ = step(batch, torch.Generator().manual_seed(7))
    assert torch.equal(loss.detach(), again.detach())
    assert stats == {}


def test_sft_with_cond_drop_trains_the_null_branch_only_where_drawn(assets):
    """cond_drop > 0 drops the rows the generator draws: with every row kept the result differs."""
    step, batch = _tiny_step(assets, "sft", cond_drop=0.5)
    with_drop, _ = step(batch, torch.Generator().manual_seed(7))
    plain, _ = _tiny_step(assets, "sft")
    without, _ = plain(batch, torch.Generator().manual_seed(7))
    assert not torch.equal(with_drop.detach(), without.detach())


# ---------------------------------------------------------------------------- inputs at padding
@pytest.mark.parametrize("noise", ["shared", "fresh"])
def test_noised_inputs_are_zero_at_padding_and_policy_equals_reference(noise, assets):
    step, batch = _tiny_step(assets, "sopo", noise=noise)
    mask = batch["mask"]
    assert not mask.all(), "the batch needs padded frames"
    seen = {}

    def grab(name):
        def hook(module, args):
            seen[name] = args[0].detach().clone()
        return hook

    h1 = step.policy.register_forward_pre_hook(grab("policy"))
    h2 = step.reference.register_forward_pre_hook(grab("reference"))
    try:
        # the sampler calls the policy too; the last calls are the loss forwards
        step(batch, torch.Generator().manual_seed(3))
    finally:
        h1.remove()
        h2.remove()
    pad = ~torch.cat([mask, mask])
    for name in ("policy", "reference"):
        assert seen[name].shape[0] == 2 * mask.shape[0]
        assert torch.count_nonzero(seen[name][pad]) == 0, name
    if noise == "shared":  # bit-identical inputs: d = 0 exactly when the weights are equal
        assert torch.equal(seen["policy"], seen["reference"])
    else:
        assert not torch.equal(seen["policy"], seen["reference"])


# ---------------------------------------------------------------------------- non-finite rewards
def _poison_rewards(step, monkeypatch, nan_rows):
    """Make the reward embeddings of the given generated rows (caption * K + k) NaN."""
    real = step.reward.encode_motion

    def encode(motion, mask):
        out = real(motion, mask)
        if motion.shape[0] == 4 * step.cfg.k:  # the B*K generated motions, not the dataset's
            out = out.clone()
            out[list(nan_rows)] = float("nan")
        return out

    monkeypatch.setattr(step.reward, "encode_motion", encode)


@pytest.mark.parametrize("method", ["sopo", "sopo-no-vu", "online-dpo"])
def test_a_nan_reward_is_never_selected_and_is_counted(method, assets, monkeypatch):
    step, batch = _tiny_step(assets, method, tau=1.0)  # tau 1: every finite worst is valuable
    k = step.cfg.k
    nan_rows = {0 * k + 0, 0 * k + 2} | {2 * k + j for j in range(k)}  # caption 2: no finite reward
    _poison_rewards(step, monkeypatch, nan_rows)
    captured = {}
    real = SF.sopo_loss_and_stats

    def spy(*args, **kwargs):
        captured["args"], captured["kwargs"] = args, kwargs
        return real(*args, **kwargs)

    monkeypatch.setattr(SF, "sopo_loss_and_stats", spy)
    sampled = {}
    real_sample = step.sample

    def sample(*a, **kw):
        sampled["out"] = real_sample(*a, **kw)
        return sampled["out"]

    monkeypatch.setattr(step, "sample", sample)
    loss, stats = step(batch, torch.Generator().manual_seed(11))
    assert math.isfinite(loss.item())
    assert float(stats["nan rewards"]) == len(nan_rows)
    assert math.isfinite(float(stats["reward"])) and math.isfinite(float(stats["worst reward"]))
    x_gen = sampled["out"][0].view(4, k, *sampled["out"][0].shape[1:])
    args, kw = captured["args"], captured["kwargs"]
    # caption 0: samples 0 and 2 have no reward, so sample 1 is both the worst and the best
    assert torch.equal(args[5][0], x_gen[0, 1])
    if method == "online-dpo":
        assert torch.equal(args[2][0], x_gen[0, 1])
    # caption 2: no pair at all -- no unpreferred term, no preferred weight, no gradient
    assert not bool(kw["valuable"][2]) and bool(kw["valuable"][0])
    assert float(torch.as_tensor(kw["beta_w"]).expand(4)[2]) == 0.0
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in step.policy.parameters() if p.grad is not None)


def test_a_nan_sample_does_not_poison_the_batch(assets, monkeypatch):
    """A generated motion that is itself NaN (so its reward is too) is left out; the loss stays
    finite because nothing of it reaches the loss."""
    step, batch = _tiny_step(assets, "dsopo")
    real_sample = step.sample

    def sample(*a, **kw):
        x, motions, mk = real_sample(*a, **kw)
        x, motions = x.clone(), motions.clone()
        k = step.cfg.k
        x[k:2 * k] = float("nan")  # every sample of caption 1
        motions[k:2 * k] = float("nan")
        return x, motions, mk

    monkeypatch.setattr(step, "sample", sample)
    loss, stats = step(batch, torch.Generator().manual_seed(11))
    assert math.isfinite(loss.item()) and float(stats["nan rewards"]) == step.cfg.k
    loss.backward()


def test_a_nan_prediction_still_makes_the_loss_nan(assets, monkeypatch):
    step, batch = _tiny_step(assets, "sopo")
    real = step.policy.forward

    def forward(x_t, *a, **kw):
        out = real(x_t, *a, **kw)
        return out if not torch.is_grad_enabled() else out + float("nan")

    monkeypatch.setattr(step.policy, "forward", forward)
    loss, _ = step(batch, torch.Generator().manual_seed(11))
    assert math.isnan(loss.item())


# ---------------------------------------------------------------------------- scale regimes
def test_the_saturating_regime_scales_z_by_beta_dpo_over_2(assets, tmp_path):
    """Step 1 starts from policy == reference (z = 0) and Adam's first update does not depend on
    the gradient's scale, so step 2 has the same policy, t and noise in both runs: z differs by
    exactly the factor 2500 and the regime shows in metrics.csv."""
    runs = {}
    for regime in ("constant", "diffusion-dpo"):
        out = tmp_path / regime
        assert train.main(targv(assets, out, "sopo", "mdm", "--scale-regime", regime, steps=2)) == 0
        runs[regime] = train_rows(out)
    lin, sat = runs["constant"][1], runs["diffusion-dpo"][1]
    for col in ("|z| p10", "|z| p50", "|z| p90", "z mean", "sigmoid(-z)", "accuracy"):
        assert col in lin and col in sat
    assert float(sat["|z| p50"]) == pytest.approx(2500 * float(lin["|z| p50"]), rel=2e-2)
    assert float(lin["|z| p90"]) < 0.05 and float(lin["sigmoid(-z)"]) == pytest.approx(0.5, abs=0.02)
    assert float(sat["accuracy"]) == float(lin["accuracy"])  # the sign of z is the same


def test_the_paper_regime_is_T_times_snr_on_x0_and_T_on_eps(assets):
    for backbone, expect in (("mdm", "snr"), ("mld", "T")):
        step, _ = _tiny_step(assets, "sopo", backbone=backbone, scale_regime="paper", scale=1.0)
        t = torch.tensor([0, 10, 500, step.diffusion.num_steps - 1])
        got = torch.as_tensor(step._scale(t)).float().expand(4)
        T = step.diffusion.num_steps
        want = T * step.diffusion.snr(t).float() if expect == "snr" else torch.full((4,), float(T))
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


@pytest.mark.parametrize("kwargs, message", [
    (dict(method="diffusion-dpo"), "now called 'modipo'"),
    (dict(scale_regime="huge"), "scale_regime must be one of"),
    (dict(scale_regime="paper", scale=2.0), "sets the scale itself"),
    (dict(beta_dpo=0.0), "beta_dpo must be a positive"),
    (dict(scale=float("nan")), "scale must be a positive"),
])
def test_step_config_names_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        StepConfig(**kwargs)


# ---------------------------------------------------------------------------- the flags
def test_presets_and_regime_flags():
    d = train.parse_args(["--preset", "diffusion-dpo"])
    assert (d.method, d.scale_regime, d.beta_dpo, d.noise) == ("modipo", "diffusion-dpo", 5000.0, "shared")
    assert d.out == "runs/train-modipo-mdm"
    o = train.parse_args(["--preset", "official-loss"])
    assert (o.k, o.noise, o.guidance_scale, o.sampler, o.sampling_steps) == (2, "fresh", 1.0, "ddpm", 50)
    a = train.parse_args([])
    assert (a.method, a.scale_regime, a.scale, a.cond_drop) == ("sopo", "constant", 1.0, 0.0)
    assert "modipo" in METHODS and "diffusion-dpo" not in METHODS


@pytest.mark.parametrize("argv, message", [
    (["--method", "diffusion-dpo"], "now called 'modipo'"),
    (["--preset", "official"], "official-loss"),
    (["--scale-regime", "paper", "--scale", "3"], "sets the scale itself"),
    (["--beta-dpo", "-1"], "--beta-dpo must be positive"),
    (["--cond-drop", "1.5"], "--cond-drop must be in"),
])
def test_renamed_and_bad_flags_say_what_to_use(argv, message, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(argv)
    # argparse type errors go to stderr; our own checks are the SystemExit message
    err = capsys.readouterr().err
    try:
        train.parse_args(argv)
    except SystemExit as e:
        text = err + str(e)
    assert message in text


def test_help_lists_modipo_and_the_regimes(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    out = capsys.readouterr().out
    for word in ("modipo", "--scale-regime", "diffusion-dpo", "paper", "--beta-dpo", "official-loss"):
        assert word in out, word


def test_a_run_of_an_older_step_is_not_resumed(assets, tmp_path, capsys):
    """A checkpoint written before the step changed (no step_version) would mix two different
    steps in one run: --resume refuses it and says why."""
    from sopo_ext import checkpoint as C
    out = tmp_path / "run"
    assert train.main(targv(assets, out, "sopo", "mdm", "--stop-after", "1", steps=2)) == 0
    state_file = out / "last" / C.TRAIN_STATE
    state = torch.load(state_file, weights_only=True)
    assert state["args"]["step_version"] == train.STEP_VERSION
    del state["args"]["step_version"]
    torch.save(state, state_file)
    assert train.main(targv(assets, out, "sopo", "mdm", "--resume", steps=2)) == 2
    assert "older trainer (step version 1" in capsys.readouterr().err
