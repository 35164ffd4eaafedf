"""Tests of the MLD-style models (sopo_ext.models.mld): motion VAE, latent denoiser, MLD bundle."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from sopo_ext.models.layers import lengths_to_mask
from sopo_ext.models.mld import (MLD, LatentDenoiser, LatentDenoiserConfig, MLDConfig, MotionVAE,
                                 MotionVAEConfig)

NF = 263
TEXT = 16


def vae_config(**kw) -> MotionVAEConfig:
    base = dict(latent_dim=8, n_latent=2, d_model=32, encoder_layers=1, decoder_layers=2,
                num_heads=4, ff_size=64, frames_per_token=4, max_frames=64)
    base.update(kw)
    return MotionVAEConfig(**base)


def den_config(**kw) -> LatentDenoiserConfig:
    base = dict(latent_dim=8, n_latent=2, text_dim=TEXT, d_model=32, num_layers=2, num_heads=4,
                ff_size=64)
    base.update(kw)
    return LatentDenoiserConfig(**base)


def make_mld(seed=0, vae_kw=None, den_kw=None) -> MLD:
    torch.manual_seed(seed)
    return MLD(MLDConfig(vae=vae_config(**(vae_kw or {})), denoiser=den_config(**(den_kw or {}))))


def motions(batch=3, frames=37, seed=1):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([frames, 20, 5, 30][:batch])
    mask = lengths_to_mask(lengths, frames)
    x = torch.randn(batch, frames, NF, generator=g) * mask.unsqueeze(-1)
    return x, mask, lengths


def latents(batch=3, seed=2):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, 2, 8, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    text = torch.randn(batch, TEXT, generator=g)
    return z, t, text


def no_grad_params(module):
    return [n for n, p in module.named_parameters()
            if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]


# ------------------------------------------------------------------ configs


def test_defaults_kinds_and_json_roundtrip():
    c = MLDConfig()
    assert (c.vae.latent_dim, c.vae.n_latent, c.vae.d_model, c.vae.encoder_layers,
            c.vae.decoder_layers, c.vae.frames_per_token) == (64, 2, 128, 3, 3, 4)
    assert (c.denoiser.d_model, c.denoiser.num_layers, c.denoiser.cond_drop_prob) == (192, 4, 0.1)
    d = json.loads(json.dumps(dataclasses.asdict(c)))
    assert MLDConfig(**d) == c
    assert (MotionVAE.kind, LatentDenoiser.kind, MLD.kind) == ("mld_vae", "mld_denoiser", "mld")
    assert LatentDenoiser.prediction == "eps" and MLD.prediction == "eps"


@pytest.mark.parametrize("factory, kw, field", [
    (vae_config, dict(d_model=30), "d_model"),
    (vae_config, dict(frames_per_token=0), "frames_per_token"),
    (vae_config, dict(n_latent=0), "n_latent"),
    (vae_config, dict(dropout=2.0), "dropout"),
    (den_config, dict(d_model=33), "d_model"),
    (den_config, dict(cond_drop_prob=1.5), "cond_drop_prob"),
    (den_config, dict(latent_dim=0), "latent_dim"),
])
def test_config_validation(factory, kw, field):
    with pytest.raises(ValueError, match=field):
        factory(**kw)


def test_mld_config_mismatch():
    with pytest.raises(ValueError, match="latent_dim"):
        MLDConfig(vae=vae_config(latent_dim=8), denoiser=den_config(latent_dim=16))


# ------------------------------------------------------------------ VAE


def test_vae_encode_decode_shapes_and_masking():
    mld = make_mld().eval()
    x, mask, lengths = motions()
    with torch.no_grad():
        mu, logvar = mld.vae.encode_dist(x, mask)
        assert mu.shape == logvar.shape == (3, 2, 8)
        out = mld.vae(x, mask)
        assert torch.equal(out["z"], mu)  # eval: deterministic z = mu
        assert out["recon"].shape == (3, 37, NF)
        assert torch.equal(out["recon"][~mask], torch.zeros_like(out["recon"][~mask]))
        z = mld.encode(x, mask)
        assert z.shape == (3, 2, 8)
        assert torch.allclose(mld.decode(z, mask), out["recon"], atol=1e-5)


def test_vae_padding_invariance():
    mld = make_mld().eval()
    x, mask, _ = motions()
    junk = x + 50 * torch.randn_like(x) * (~mask).unsqueeze(-1)
    with torch.no_grad():
        a, b = mld.vae(x, mask), mld.vae(junk, mask)
    assert torch.allclose(a["mu"], b["mu"], atol=1e-5)
    assert torch.allclose(a["recon"], b["recon"], atol=1e-5)


def test_vae_train_mode_samples():
    mld = make_mld(vae_kw=dict(dropout=0.0)).train()
    x, mask, _ = motions()
    torch.manual_seed(0)
    a = mld.vae(x, mask)
    torch.manual_seed(0)
    b = mld.vae(x, mask)
    c = mld.vae(x, mask)
    assert torch.equal(a["z"], b["z"]) and not torch.equal(a["z"], c["z"])
    assert not torch.equal(a["z"], a["mu"])


def test_kl_zero_at_standard_normal():
    zero = torch.zeros(4, 2, 8)
    assert MotionVAE.kl_divergence(zero, zero).item() == 0.0
    kl = MotionVAE.kl_divergence(torch.ones(4, 2, 8), zero)
    assert torch.isclose(kl, torch.tensor(0.5))  # 0.5 * mu^2 per element


def test_vae_loss_terms_and_gradients():
    mld = make_mld()
    vae = mld.vae.train()
    x, mask, _ = motions()
    out = vae.vae_loss(x, mask, kl_weight=0.5)
    assert set(out) == {"loss", "recon", "kl"}
    assert torch.isclose(out["loss"], out["recon"] + 0.5 * out["kl"])
    out["loss"].backward()
    assert no_grad_params(vae) == []


def test_vae_overfits_four_motions():
    torch.manual_seed(0)
    vae = MotionVAE(vae_config(latent_dim=8, n_latent=1, d_model=32, encoder_layers=1,
                               decoder_layers=1, ff_size=64, dropout=0.0))
    frames = 24
    tt = torch.arange(frames).float()[None, :, None]
    g = torch.Generator().manual_seed(3)
    freq = torch.rand(4, 1, NF, generator=g) * 0.5 + 0.05
    phase = torch.rand(4, 1, NF, generator=g) * 6.28
    amp = torch.randn(4, 1, NF, generator=g)
    mask = lengths_to_mask(torch.tensor([24, 20, 16, 24]), frames)
    x = amp * torch.sin(freq * tt + phase) * mask.unsqueeze(-1)
    vae.eval()
    with torch.no_grad():
        before = vae.vae_loss(x, mask)["recon"].item()
    opt = torch.optim.Adam(vae.parameters(), lr=5e-3)
    vae.train()
    for _ in range(200):
        loss = vae.vae_loss(x, mask)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    vae.eval()
    with torch.no_grad():
        after = vae.vae_loss(x, mask)["recon"].item()
    assert after < before / 10, (before, after)


def test_vae_input_validation():
    mld = make_mld()
    x, mask, _ = motions()
    with pytest.raises(ValueError, match=r"motion.*263.*\(3, 37, 200\)"):
        mld.vae.encode_dist(x[..., :200], mask)
    with pytest.raises(ValueError, match=r"mask.*\(3, 30\)"):
        mld.encode(x, mask[:, :30])
    with pytest.raises(ValueError, match=r"z must have shape.*\[B, 2, 8\]"):
        mld.decode(torch.zeros(3, 1, 8), mask)
    with pytest.raises(ValueError, match="lengths_or_mask"):
        mld.decode(torch.zeros(3, 2, 8), torch.ones(3))
    with pytest.raises(ValueError, match="max_frames"):
        mld.decode(torch.zeros(3, 2, 8), torch.tensor([10, 65, 3]))


# ------------------------------------------------------------------ latent stats, decode lengths


def test_set_latent_stats_normalizes():
    mld = make_mld()
    raw = torch.randn(64, 2, 8) * torch.linspace(0.1, 5, 8) + 3.0
    mld.set_latent_stats(raw)
    z = (raw - mld.latent_mean) / mld.latent_std
    assert z.mean(0).abs().max() < 1e-5
    assert (z.std(0) - 1).abs().max() < 1e-4
    mld.set_latent_stats(raw, per_dim=False)
    z = (raw - mld.latent_mean) / mld.latent_std
    assert abs(z.mean().item()) < 1e-5 and abs(z.std().item() - 1) < 1e-4
    # encode() applies the stats: encoded latents of a batch become ~N(0, 1) per dim
    x, mask, _ = motions(batch=4, frames=24)
    mld.eval()
    x = torch.cat([x, motions(batch=4, frames=24, seed=7)[0]]) * 3
    mask = torch.cat([mask, mask])
    with torch.no_grad():
        mld.set_latent_stats(mld.vae.encode_dist(x, mask)[0])
        z = mld.encode(x, mask)
    assert z.mean(0).abs().max() < 1e-4 and (z.std(0) - 1).abs().max() < 1e-3
    assert "latent_mean" in mld.state_dict() and "latent_std" in mld.state_dict()


def test_decode_lengths_masking():
    mld = make_mld().eval()
    z = torch.randn(3, 2, 8)
    lengths = torch.tensor([9, 17, 4])
    with torch.no_grad():
        y = mld.decode(z, lengths)
        mask = lengths_to_mask(lengths)
        y_mask = mld.decode(z, mask)
        y_long = mld.decode(z, lengths_to_mask(lengths, 30))
    assert y.shape == (3, 17, NF) and y_long.shape == (3, 30, NF)
    assert torch.equal(y[~mask], torch.zeros_like(y[~mask]))
    assert (y[mask].abs().sum(-1) > 0).all()
    assert torch.allclose(y, y_mask)
    assert torch.allclose(y_long[:, :17], y, atol=1e-5)  # only lengths matter, not the width


# ------------------------------------------------------------------ latent denoiser / MLD forward


def test_denoiser_shape_mask_ignored_and_mld_forward():
    mld = make_mld().eval()
    z, t, text = latents()
    with torch.no_grad():
        eps = mld(z, t, text)
        assert eps.shape == z.shape and torch.isfinite(eps).all()
        assert torch.equal(mld.denoiser(z, t, text), eps)
        assert torch.equal(mld(z, t, text, mask=torch.zeros(3, 5, dtype=torch.bool)), eps)


def test_denoiser_uncond():
    mld = make_mld().eval()
    z, t, text = latents()
    on, off = torch.zeros(3, dtype=torch.bool), torch.ones(3, dtype=torch.bool)
    with torch.no_grad():
        c = mld(z, t, text, uncond=on)
        u = mld(z, t, text, uncond=off)
        u2 = mld(z, t, torch.randn_like(text), uncond=off)
        u3 = mld(z, t, None)
        mixed = mld(z, t, text, uncond=torch.tensor([True, False, False]))
    assert (c - u).abs().max() > 1e-3
    assert torch.equal(u, u2) and torch.equal(u, u3)
    with torch.no_grad():
        assert torch.equal(mld(z, t, text), c)  # eval never drops the text
    assert torch.allclose(mixed[0], u[0]) and torch.allclose(mixed[1:], c[1:])


def test_denoiser_cond_drop_rate():
    mld = make_mld(den_kw=dict(dropout=0.0, cond_drop_prob=0.3))
    n = 1000
    z, t, text = latents(batch=1)
    z, t, text = z.expand(n, -1, -1), t.expand(n), text.expand(n, -1)
    with torch.no_grad():
        mld.train()
        torch.manual_seed(4)
        y = mld(z, t, text)
        mld.eval()
        y_u = mld(z[:1], t[:1], text[:1], uncond=True)
        y_c = mld(z[:1], t[:1], text[:1])
        y_eval = mld(z, t, text)
    dropped = (y - y_u).flatten(1).abs().amax(1) < 1e-5
    kept = (y - y_c).flatten(1).abs().amax(1) < 1e-5
    assert torch.all(dropped ^ kept)
    assert abs(dropped.float().mean().item() - 0.3) < 0.07
    assert torch.allclose(y_eval, y_c.expand_as(y_eval), atol=1e-5)


def test_denoiser_determinism_and_gradients():
    z, t, text = latents()
    outs = []
    for _ in range(2):
        mld = make_mld(seed=3).train()
        torch.manual_seed(11)
        outs.append(mld(z, t, text, uncond=torch.tensor([True, False, False])))
    assert torch.equal(outs[0], outs[1])
    (outs[1] - z).pow(2).mean().backward()
    assert no_grad_params(mld.denoiser) == []


def test_bf16_autocast_close_to_fp32():
    mld = make_mld().eval()
    z, t, text = latents()
    x, mask, lengths = motions()
    with torch.no_grad():
        e32, r32 = mld(z, t, text), mld.vae(x, mask)["recon"]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            e16, r16 = mld(z, t, text), mld.vae(x, mask)["recon"]
            d16 = mld.decode(mld.encode(x, mask), lengths)
    assert torch.isfinite(e16).all() and torch.isfinite(r16).all() and torch.isfinite(d16).all()
    assert ((e16.float() - e32).abs().max() / e32.abs().max()) < 0.1
    assert ((r16.float() - r32).abs().max() / r32.abs().max()) < 0.1


def test_denoiser_input_validation():
    mld = make_mld()
    z, t, text = latents()
    with pytest.raises(ValueError, match=r"x_t must have shape.*\[B, 2, 8\].*\(3, 2, 7\)"):
        mld(z[..., :7], t, text)
    with pytest.raises(ValueError, match=r"text_emb.*\[3, 16\].*\(3, 10\)"):
        mld(z, t, text[:, :10])
    with pytest.raises(ValueError, match=r"t must have shape \[B\]"):
        mld(z, t[:1], text)


# ------------------------------------------------------------------ SoPo fine-tuning helpers


def test_freeze_encoder_and_trainable_parameters():
    mld = make_mld()
    assert mld.freeze_encoder() is mld
    assert all(not p.requires_grad for p in mld.vae.encoder.parameters())
    assert all(p.requires_grad for p in mld.vae.decoder.parameters())
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    with_dec = ids(mld.trainable_parameters(decoder=True))
    without = ids(mld.trainable_parameters(decoder=False))
    assert without == ids(mld.denoiser.parameters())
    assert with_dec == without | ids(mld.vae.decoder.parameters())
    assert not with_dec & ids(mld.vae.encoder.parameters())
    # a decode-through loss reaches the decoder, not the frozen encoder
    x, mask, lengths = motions()
    mld.decode(mld.encode(x, mask), lengths).pow(2).mean().backward()
    assert all(p.grad is None for p in mld.vae.encoder.parameters())
    assert no_grad_params(mld.vae.decoder) == []
