"""Gaussian diffusion (DDPM training, DDIM / DDPM sampling) for motion and latent denoisers.

Design
------
* One class, :class:`GaussianDiffusion`, configured by the JSON-able :class:`DiffusionConfig`,
  serves both backbones: MDM denoises motions ``x [B, T, F]`` with a frame mask ``[B, T]`` and
  predicts x0 (MDM's ``predict_xstart``, cosine schedule); MLD denoises latents ``[B, L, D]``
  without a mask and predicts eps (scaled-linear betas 0.00085-0.012). Nothing assumes F = 263.
* Schedules are computed once in float64 (CPU) and gathered per call to the input's dtype and
  device, so the conversions are exact to float64 rounding when the inputs are float64.
* The model is any denoiser with the shared forward
  ``model(x_t, t, text_emb, mask=None, uncond=None) -> like x_t``; ``t`` is always the ORIGINAL
  training timestep index in ``[0, num_steps)``, also during respaced sampling (as
  improved-diffusion's ``_WrappedModel`` maps respaced indices back).
* Parameterizations: with ``prediction="x0"`` the output is x0_hat and the training target is x0;
  with ``"eps"`` it is eps_hat / noise. Both are converted exactly into each other through
  ``x_t = sqrt(abar) x0 + sqrt(1 - abar) eps``. Since
  ``eps_hat - eps = -sqrt(abar / (1 - abar)) (x0_hat - x0)`` for a fixed x_t,
  ``||eps_hat - eps||^2 = SNR(t) ||x0_hat - x0||^2`` with ``SNR = abar / (1 - abar)``: an x0 loss
  is an eps loss weighted by ``1 / SNR(t)`` (:meth:`GaussianDiffusion.loss_weight`).
* Classifier-free guidance runs ONE forward on 2B rows (conditional rows, then rows with
  ``uncond=True``) and combines the raw model outputs ``uncond + s (cond - uncond)``, as MDM's
  ``ClassifierFreeSampleModel`` / MLD do; ``s == 1`` is a single conditional forward on B rows.
* Respaced sampling picks ``steps`` evenly spaced training timesteps including ``T - 1`` and 0
  (improved-diffusion's ``space_timesteps`` with one section). DDIM uses abar at those steps;
  DDPM ancestral sampling uses the betas of the sub-chain, ``1 - abar_i / abar_prev``, with the
  posterior mean and the fixed-small posterior variance.
* With a mask, padded frames of x_T and of every intermediate x are set to zero so padding never
  leaks into valid frames (MDM masks its inputs the same way).

Batched online sampling for SoPo: the trainer draws K motions per caption in one loop by
repeating every row K times with :func:`repeat_interleave_batch` (text_emb, mask, lengths).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

__all__ = ["DiffusionConfig", "GaussianDiffusion", "repeat_interleave_batch", "make_betas",
           "SCHEDULES", "PREDICTIONS", "SAMPLERS"]

SCHEDULES = ("cosine", "scaled_linear", "linear")
PREDICTIONS = ("x0", "eps")
SAMPLERS = ("ddim", "ddpm")
SPACINGS = ("linspace", "leading")


# ----------------------------------------------------------------------------------- config
@dataclass
class DiffusionConfig:
    """Diffusion settings (plain JSON-able fields).

    ``beta_start`` / ``beta_end`` are used by the "scaled_linear" and "linear" schedules; the
    cosine schedule (Nichol & Dhariwal, s = 0.008, betas clipped at 0.999) ignores them.
    """
    num_steps: int = 1000
    schedule: str = "cosine"
    prediction: str = "x0"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    #: which training timesteps a respaced sampler visits: "linspace" (improved-diffusion's, both
    #: ends included: 999 ... 0) or "leading" (diffusers' DDIMScheduler with steps_offset=1 and
    #: set_alpha_to_one=False, as the released MLD samples: 981, 961, ..., 1 for 50 of 1000, the
    #: last step going to abar_0 instead of 1)
    spacing: str = "linspace"

    def __post_init__(self) -> None:
        if isinstance(self.num_steps, bool) or not isinstance(self.num_steps, int) \
                or self.num_steps < 1:
            raise ValueError(f"num_steps must be an int >= 1, got {self.num_steps!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {self.prediction!r}")
        for name in ("beta_start", "beta_end"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 < v < 1.0:
                raise ValueError(f"{name} must be a float in (0, 1), got {v!r}")
        if self.spacing not in SPACINGS:
            raise ValueError(f"spacing must be one of {SPACINGS}, got {self.spacing!r}")
        if self.beta_start > self.beta_end:
            raise ValueError(f"beta_start ({self.beta_start}) must be <= beta_end "
                             f"({self.beta_end})")


def make_betas(schedule: str, num_steps: int, beta_start: float = 0.00085,
               beta_end: float = 0.012) -> Tensor:
    """float64 betas [num_steps] of the named schedule."""
    T = num_steps
    if schedule == "cosine":
        # abar(u) = cos^2((u + s) / (1 + s) * pi / 2); beta_i = 1 - abar((i+1)/T) / abar(i/T).
        s = 0.008
        u = torch.arange(T + 1, dtype=torch.float64) / T
        f = torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2
        return (1 - f[1:] / f[:-1]).clamp(max=0.999)
    if schedule == "scaled_linear":
        # LDM / MLD / diffusers: linear in sqrt(beta).
        return torch.linspace(math.sqrt(beta_start), math.sqrt(beta_end), T,
                              dtype=torch.float64) ** 2
    if schedule == "linear":
        return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")


def repeat_interleave_batch(x, k: int):
    """Repeat every batch row ``k`` times in place order: row ``i * k + j`` is copy j of row i.

    Used to sample K motions per caption in one loop: apply it to text_emb ``[B, D]``, mask
    ``[B, T]`` and lengths ``[B]`` (all give B*K rows), then reshape samples ``[B*K, ...]`` to
    ``[B, K, ...]``. Accepts a tensor (dim 0 is the batch), a list/tuple (e.g. captions), or
    None (returned as is).
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    if x is None:
        return None
    if isinstance(x, Tensor):
        if x.dim() == 0:
            raise ValueError("x must have a batch dimension, got a 0-d tensor")
        return x.repeat_interleave(k, dim=0)
    if isinstance(x, (list, tuple)):
        return type(x)(item for item in x for _ in range(k))
    raise ValueError(f"x must be a tensor, a list/tuple or None, got {type(x).__name__}")


def _randn(shape, generator: Optional[torch.Generator], device, dtype) -> Tensor:
    # Draw on the generator's device (a CPU generator cannot fill a CUDA tensor), then move.
    gen_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gen_device, dtype=dtype).to(device)


# ------------------------------------------------------------------------------- diffusion
class GaussianDiffusion:
    """DDPM forward process, losses and DDIM / DDPM samplers (see the module docstring)."""

    def __init__(self, config: Optional[DiffusionConfig] = None) -> None:
        if config is None:
            config = DiffusionConfig()
        if not isinstance(config, DiffusionConfig):
            raise ValueError(f"config must be a DiffusionConfig, got {type(config).__name__}")
        self.config = config
        self.num_steps = config.num_steps
        self.prediction = config.prediction
        c = config
        # float64 on CPU; gathered to the input's dtype / device on use.
        self.betas = make_betas(c.schedule, c.num_steps, c.beta_start, c.beta_end)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64),
                                              self.alphas_cumprod[:-1]])
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()
        self.posterior_variance = (self.betas * (1.0 - self.alphas_cumprod_prev)
                                   / (1.0 - self.alphas_cumprod))
        # (table id, device) -> float64 copy there; ("floats", steps) -> respaced schedule lists
        self._tables: Dict[tuple, object] = {}
        self._check_values = True

    def __repr__(self) -> str:
        return f"GaussianDiffusion({self.config})"

    # ---------------------------------------------------------------------------- helpers
    def _check_t(self, t, batch: int, device=None) -> Tensor:
        if isinstance(t, int) and not isinstance(t, bool):
            t = torch.full((batch,), t, dtype=torch.long, device=device)
        if not isinstance(t, Tensor) or t.dtype.is_floating_point or t.dtype == torch.bool:
            raise ValueError(f"t must be an integer tensor [B], got "
                             f"{t.dtype if isinstance(t, Tensor) else type(t).__name__}")
        if t.dim() == 0:
            t = t.expand(batch)
        if t.dim() != 1 or t.shape[0] != batch:
            raise ValueError(f"t must have shape [B] = [{batch}], got {tuple(t.shape)}")
        # Reading t's range back is a host sync on a GPU: skipped for timesteps the package
        # made itself (``trusted``), kept for everything a caller passes in.
        if self._check_values and t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.num_steps):
            raise ValueError(f"t must be in [0, {self.num_steps}), got values in "
                             f"[{int(t.min())}, {int(t.max())}]")
        return t.long()

    @contextlib.contextmanager
    def trusted(self):
        """Inside this block the value checks that read a tensor back to the host (a GPU sync)
        are skipped: the range of t and masks without a valid frame. For callers that made the
        inputs themselves, like the sampler (t from its own schedule) and ``PreferenceStep``
        (t drawn in [0, num_steps), masks of dataset motions). Shapes and dtypes are still checked."""
        prev, self._check_values = self._check_values, False
        try:
            yield
        finally:
            self._check_values = prev

    def _gather(self, arr: Tensor, t: Tensor, x: Tensor) -> Tensor:
        """arr[t] shaped [B, 1, ..., 1] to broadcast against x, in x's dtype and device."""
        key = (id(arr), t.device)
        table = self._tables.get(key)
        if table is None:  # one copy per device, so indexing never moves t to the host
            table = self._tables[key] = arr.to(t.device)
        v = table.index_select(0, t.detach().reshape(-1)).to(device=x.device, dtype=x.dtype)
        return v.view(-1, *([1] * (x.dim() - 1)))

    @staticmethod
    def _check_x(x, name: str = "x") -> None:
        if not isinstance(x, Tensor) or not x.dtype.is_floating_point:
            raise ValueError(f"{name} must be a floating-point tensor [B, ...], got "
                             f"{x.dtype if isinstance(x, Tensor) else type(x).__name__}")
        if x.dim() < 2:
            raise ValueError(f"{name} must be [B, T, F] or [B, L, D], got {tuple(x.shape)}")

    @staticmethod
    def _check_mask(mask, x: Tensor, name: str = "x") -> Optional[Tensor]:
        if mask is None:
            return None
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool tensor [B, T], got "
                             f"{mask.dtype if isinstance(mask, Tensor) else type(mask).__name__}")
        if x.dim() < 3 or mask.shape != x.shape[:2]:
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match {name} shape "
                             f"{tuple(x.shape)} (expected [B, T] of {name} [B, T, F])")
        return mask.to(x.device)

    @staticmethod
    def _check_text(text_emb, batch: int) -> None:
        if text_emb is None:
            return
        if not isinstance(text_emb, Tensor):
            raise ValueError(f"text_emb must be a tensor [B, D] or None, got "
                             f"{type(text_emb).__name__}")
        if text_emb.dim() < 1 or text_emb.shape[0] != batch:
            raise ValueError(f"text_emb batch {tuple(text_emb.shape)} does not match the "
                             f"batch size {batch} of x")

    def _check_model(self, model) -> None:
        pred = getattr(model, "prediction", None)
        if pred is not None and pred != self.prediction:
            raise ValueError(f"model.prediction={pred!r} does not match the diffusion's "
                             f"prediction={self.prediction!r}")

    @staticmethod
    def _apply_mask(x: Tensor, mask: Optional[Tensor]) -> Tensor:
        if mask is None:
            return x
        return x * mask.unsqueeze(-1).to(x.dtype)

    # -------------------------------------------------------------------- forward process
    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise."""
        self._check_x(x0, "x0")
        if noise.shape != x0.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} must equal x0 shape "
                             f"{tuple(x0.shape)}")
        t = self._check_t(t, x0.shape[0], x0.device)
        return (self._gather(self.sqrt_alphas_cumprod, t, x0) * x0
                + self._gather(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise)

    def snr(self, t: Tensor) -> Tensor:
        """SNR(t) = abar_t / (1 - abar_t), float64 [B] on t's device."""
        t = self._check_t(t, t.shape[0] if isinstance(t, Tensor) and t.dim() else 1)
        key = (id(self.alphas_cumprod), t.device)
        table = self._tables.get(key)
        if table is None:  # one copy per device: indexing never moves t to the host (a GPU sync)
            table = self._tables[key] = self.alphas_cumprod.to(t.device)
        abar = table.index_select(0, t.detach().reshape(-1)).reshape(t.shape)
        return abar / (1.0 - abar)

    def loss_weight(self, t: Tensor, towards: str = "eps") -> Tensor:
        """Factor w_t (float64 [B]) converting a per-sample MSE between parameterizations.

        For one x_t, ``||eps_hat - eps||^2 = SNR(t) ||x0_hat - x0||^2``. ``towards="eps"`` gives
        SNR(t) (x0-MSE * w = eps-MSE); ``towards="x0"`` gives 1 / SNR(t) (eps-MSE * w = x0-MSE),
        i.e. an x0 loss is an eps loss with omega_t = 1 / SNR(t).
        """
        if towards == "eps":
            return self.snr(t)
        if towards == "x0":
            return 1.0 / self.snr(t)
        raise ValueError(f"towards must be 'eps' or 'x0', got {towards!r}")

    # -------------------------------------------------------------------- conversions
    def x0_from_eps(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar)."""
        t = self._check_t(t, x_t.shape[0], x_t.device)
        return ((x_t - self._gather(self.sqrt_one_minus_alphas_cumprod, t, x_t) * eps)
                / self._gather(self.sqrt_alphas_cumprod, t, x_t))

    def eps_from_x0(self, x_t: Tensor, t: Tensor, x0: Tensor) -> Tensor:
        """eps = (x_t - sqrt(abar) x0) / sqrt(1 - abar)."""
        t = self._check_t(t, x_t.shape[0], x_t.device)
        return ((x_t - self._gather(self.sqrt_alphas_cumprod, t, x_t) * x0)
                / self._gather(self.sqrt_one_minus_alphas_cumprod, t, x_t))

    def x0_eps_from_output(self, output: Tensor, x_t: Tensor, t: Tensor) -> Tuple[Tensor, Tensor]:
        """(x0_hat, eps_hat) from a raw model output, by the configured prediction type."""
        if output.shape != x_t.shape:
            raise ValueError(f"model output shape {tuple(output.shape)} must equal x_t shape "
                             f"{tuple(x_t.shape)}")
        if self.prediction == "x0":
            return output, self.eps_from_x0(x_t, t, output)
        return self.x0_from_eps(x_t, t, output), output

    def target(self, x0: Tensor, noise: Tensor) -> Tensor:
        """The training target of the parameterization: x0 ("x0") or the noise ("eps")."""
        return x0 if self.prediction == "x0" else noise

    # -------------------------------------------------------------------------- training
    def training_losses(self, model, x0: Tensor, text_emb: Optional[Tensor],
                        mask: Optional[Tensor] = None, t: Optional[Tensor] = None,
                        noise: Optional[Tensor] = None,
                        generator: Optional[torch.Generator] = None) -> Dict[str, Tensor]:
        """Per-sample masked MSE between the model output and the target.

        Returns a dict:
          ``loss`` float32 [B]: ``sum(m (out - target)^2) / sum(m)`` per sample, m = the frame
          mask broadcast over features (a plain mean over all non-batch dims without a mask);
          ``t`` [B] (uniform in [0, T) when not given), ``noise``, ``x_t``, ``output``, ``target``.
        x_t is zero at padded frames (inputs follow the padding convention). The model is called
        with ``uncond=None``, so in training mode it drops the text itself (CFG training).
        """
        self._check_x(x0, "x0")
        self._check_model(model)
        B = x0.shape[0]
        self._check_text(text_emb, B)
        mask = self._check_mask(mask, x0, "x0")
        if t is None:
            gen_device = generator.device if generator is not None else x0.device
            t = torch.randint(0, self.num_steps, (B,), generator=generator,
                              device=gen_device).to(x0.device)
        t = self._check_t(t, B, x0.device)
        if noise is None:
            noise = _randn(x0.shape, generator, x0.device, x0.dtype)
        elif noise.shape != x0.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} must equal x0 shape "
                             f"{tuple(x0.shape)}")
        x_t = self._apply_mask(self.q_sample(x0, t, noise), mask)
        output = model(x_t, t, text_emb, mask=mask)
        if output.shape != x0.shape:
            raise ValueError(f"model output shape {tuple(output.shape)} must equal x0 shape "
                             f"{tuple(x0.shape)}")
        target = self.target(x0, noise)
        # float32 (or wider) accumulation, also under autocast.
        acc = torch.promote_types(torch.float32, x0.dtype)
        sq = (output.to(acc) - target.to(acc)) ** 2
        if mask is None:
            loss = sq.reshape(B, -1).mean(dim=1)
        else:
            m = mask.unsqueeze(-1).to(acc).expand_as(sq)
            denom = m.reshape(B, -1).sum(dim=1)
            if self._check_values and bool((denom == 0).any()):
                raise ValueError("mask has a row with no valid frame; every sample needs at "
                                 "least one valid frame")
            loss = (sq * m).reshape(B, -1).sum(dim=1) / denom
        return {"loss": loss, "t": t, "noise": noise, "x_t": x_t, "output": output,
                "target": target}

    # ---------------------------------------------------------------------- predictions
    def model_predictions(self, model, x_t: Tensor, t: Tensor, text_emb: Optional[Tensor],
                          mask: Optional[Tensor] = None,
                          guidance_scale: float = 1.0) -> Tuple[Tensor, Tensor]:
        """(x0_hat, eps_hat) at (x_t, t), with classifier-free guidance on the raw output.

        ``guidance_scale == 1``: one forward on B rows with ``uncond`` all False (exactly the
        conditional model). Otherwise one forward on 2B rows [cond; uncond] and
        ``out = uncond + s (cond - uncond)``. ``text_emb=None`` means an unconditional model
        (one forward with ``uncond`` all True; the scale has no effect).
        """
        self._check_x(x_t, "x_t")
        B = x_t.shape[0]
        self._check_text(text_emb, B)
        mask = self._check_mask(mask, x_t, "x_t")
        t = self._check_t(t, B, x_t.device)
        s = self._check_guidance(guidance_scale)
        return self.x0_eps_from_output(self._guided_output(model, x_t, t, text_emb, mask, s), x_t, t)

    def _guided_output(self, model, x_t: Tensor, t: Tensor, text_emb: Optional[Tensor],
                       mask: Optional[Tensor], s: float) -> Tensor:
        """The raw model output (x0 or eps) with classifier-free guidance, inputs checked."""
        B = x_t.shape[0]
        if text_emb is None:
            out = model(x_t, t, None, mask=mask,
                        uncond=torch.ones(B, dtype=torch.bool, device=x_t.device))
        elif s == 1.0:
            out = model(x_t, t, text_emb, mask=mask,
                        uncond=torch.zeros(B, dtype=torch.bool, device=x_t.device))
        else:
            text2, mask2, uncond = self._doubled_condition(text_emb, mask, x_t.device)
            out_c, out_u = self._split_guided(
                model(torch.cat([x_t, x_t]), torch.cat([t, t]), text2, mask=mask2, uncond=uncond), B)
            out = out_u + s * (out_c - out_u)
        return out.to(x_t.dtype)

    @staticmethod
    def _doubled_condition(text_emb: Tensor, mask: Optional[Tensor], device):
        """(text, mask, uncond) of a CFG batch: the B rows conditional, then the same B rows
        unconditional."""
        B = text_emb.shape[0]
        uncond = torch.cat([torch.zeros(B, dtype=torch.bool, device=device),
                            torch.ones(B, dtype=torch.bool, device=device)])
        return torch.cat([text_emb, text_emb]), None if mask is None else torch.cat([mask, mask]), uncond

    @staticmethod
    def _split_guided(out: Tensor, B: int) -> Tuple[Tensor, Tensor]:
        """(conditional, unconditional) rows of a CFG batch's output."""
        if out.shape[0] != 2 * B:
            raise ValueError(f"model returned {out.shape[0]} rows for a batch of {2 * B}")
        return out[:B], out[B:]

    def _loop_denoiser(self, model, x_T: Tensor, text_emb: Optional[Tensor], mask: Optional[Tensor],
                       s: float):
        """``_guided_output`` for a whole sampling loop from the model's ``sampling_plan``: the
        conditional and, with guidance, the unconditional inputs are prepared once. None when
        the model has no plan or is in training mode (the loop then calls the model)."""
        make_plan = getattr(model, "sampling_plan", None)
        if make_plan is None or getattr(model, "training", False):
            return None
        B = x_T.shape[0]
        dev = x_T.device
        if text_emb is None or s == 1.0:
            plan = make_plan(x_T, text_emb, mask, torch.full((B,), text_emb is None, dtype=torch.bool, device=dev))

            def denoise(x: Tensor, t: Tensor) -> Tensor:
                return plan(x, t).to(x.dtype)
        else:
            both = torch.cat([x_T, x_T])
            plan = make_plan(both, *self._doubled_condition(text_emb, mask, dev))

            def denoise(x: Tensor, t: Tensor) -> Tensor:
                torch.cat([x, x], out=both)
                out_c, out_u = self._split_guided(plan(both, torch.cat([t, t])), B)
                # out_u + s (out_c - out_u), written into the plan's fresh output (the same
                # values: IEEE + and * commute) instead of three new [B, T, F] tensors
                return out_c.sub_(out_u).mul_(s).add_(out_u).to(x.dtype)
        denoise.masks_output = plan.masks_output
        denoise.mask = None if mask is None else mask.unsqueeze(-1).to(x_T.dtype)
        return denoise

    @staticmethod
    def _check_guidance(guidance_scale) -> float:
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) \
                or math.isnan(guidance_scale) or guidance_scale < 0:
            raise ValueError(f"guidance_scale must be a number >= 0, got {guidance_scale!r}")
        return float(guidance_scale)

    # ----------------------------------------------------------------------- respacing
    def sampling_timesteps(self, steps: Optional[int] = None) -> List[int]:
        """Training timesteps visited by a ``steps``-step sampler, in sampling order.

        ``spacing="linspace"`` (the default): evenly spaced over [0, T-1] including both ends
        (improved-diffusion's ``space_timesteps`` with one section); strictly decreasing, starting
        at T - 1. ``steps=None`` or ``steps == T`` is the full chain T-1, ..., 0.
        ``spacing="leading"``: diffusers' ``(arange(steps) * (T // steps))[::-1] + 1``.
        """
        T = self.num_steps
        if steps is None:
            steps = T
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= T:
            raise ValueError(f"steps must be an int in [1, num_steps={T}], got {steps!r}")
        if self.config.spacing == "leading":  # diffusers: (arange(steps) * (T // steps))[::-1] + 1
            ratio = T // steps
            ts = [i * ratio + 1 for i in range(steps)][::-1]
            if ts[0] > T - 1:
                raise ValueError(f"'leading' spacing with steps_offset 1 needs steps < num_steps={T}, got {steps}")
            return ts
        if steps == 1:
            return [T - 1]
        stride = (T - 1) / (steps - 1)
        ts = sorted({int(round(i * stride)) for i in range(steps)})
        assert len(ts) == steps and ts[-1] == T - 1
        return ts[::-1]

    def respaced_schedule(self, steps: Optional[int] = None) -> Dict[str, Tensor]:
        """The sub-chain of a respaced sampler (float64, in sampling order).

        ``timesteps`` int64, ``alphas_cumprod`` at them, ``alphas_cumprod_prev`` (abar of the next
        visited step, 1 after the last), ``betas`` = 1 - abar / abar_prev and the fixed-small
        ``posterior_variance`` = beta (1 - abar_prev) / (1 - abar).
        """
        ts = torch.tensor(self.sampling_timesteps(steps), dtype=torch.long)
        abar = self.alphas_cumprod[ts]
        # after the last step: abar = 1 (a clean sample); diffusers' set_alpha_to_one=False ends
        # at abar_0 instead, as the released MLD does
        final = self.alphas_cumprod[:1] if self.config.spacing == "leading" else torch.ones(1, dtype=torch.float64)
        abar_prev = torch.cat([abar[1:], final])
        betas = 1.0 - abar / abar_prev
        var = betas * (1.0 - abar_prev) / (1.0 - abar)
        return {"timesteps": ts, "alphas_cumprod": abar, "alphas_cumprod_prev": abar_prev,
                "betas": betas, "posterior_variance": var}

    def _schedule_floats(self, steps: Optional[int]) -> Dict[str, list]:
        """``respaced_schedule`` as Python floats, made once per number of steps: the sampling
        loop then never reads a tensor back."""
        key = ("floats", steps)
        if key not in self._tables:
            self._tables[key] = {k: v.tolist() for k, v in self.respaced_schedule(steps).items()}
        return self._tables[key]

    # ------------------------------------------------------------------------- sampling
    @torch.no_grad()
    def sample(self, model, shape_or_x_T: Union[Sequence[int], Tensor],
               text_emb: Optional[Tensor], mask: Optional[Tensor] = None, *,
               steps: Optional[int] = None, sampler: str = "ddim", eta: float = 0.0,
               guidance_scale: float = 1.0, generator: Optional[torch.Generator] = None,
               noise: Optional[Tensor] = None, clip_denoised: Optional[float] = None,
               progress: bool = False, fast: bool = True) -> Tensor:
        """Draw x0 samples (no grad; the model is used in whatever mode it is in).

        shape_or_x_T: the sample shape ([B, T, F] or latent [B, L, D]; B must equal text_emb's
          rows) or the initial noise x_T itself. ``noise`` is an alternative way to pass x_T.
          New noise is drawn with ``generator`` in text_emb's dtype (float32 if not floating)
          and device.
        steps: number of respaced steps (None = all num_steps); the model always receives the
          original training timesteps.
        sampler: "ddim" (eta = 0 deterministic, eta = 1 ~ DDPM-like variance) or "ddpm"
          (ancestral, fixed-small posterior variance of the respaced chain; eta is ignored).
        clip_denoised: None, or c > 0 to clamp x0_hat to [-c, c] at every step (eps is then
          recomputed from the clamped x0, as improved-diffusion does).
        mask: bool [B, T]; padded frames are zero in x_T, after every step and in the result.
        fast: use the model's ``sampling_plan`` (when it has one and is in eval mode: the text
          projection, masks and CFG inputs made once per loop instead of once per step) and
          update x in place; the samples equal those of ``fast=False`` (the plain loop: one
          ``model(...)`` call per step, kept as the reference) value for value
          (tests/test_fast_sampling.py).
        """
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        if isinstance(eta, bool) or not isinstance(eta, (int, float)) or math.isnan(eta) \
                or eta < 0:
            raise ValueError(f"eta must be a number >= 0, got {eta!r}")
        s = self._check_guidance(guidance_scale)
        if clip_denoised is not None and (isinstance(clip_denoised, bool)
                                          or not isinstance(clip_denoised, (int, float))
                                          or not clip_denoised > 0):
            raise ValueError(f"clip_denoised must be None or a number > 0, got {clip_denoised!r}")
        self._check_model(model)
        timesteps = self.sampling_timesteps(steps)

        if isinstance(shape_or_x_T, Tensor):
            if noise is not None:
                raise ValueError("pass x_T either as shape_or_x_T or as noise, not both")
            noise = shape_or_x_T
        if noise is not None:
            self._check_x(noise, "x_T")
            if not isinstance(shape_or_x_T, Tensor) and tuple(shape_or_x_T) != tuple(noise.shape):
                raise ValueError(f"noise shape {tuple(noise.shape)} does not match the "
                                 f"requested shape {tuple(shape_or_x_T)}")
            x = noise.clone()
        else:
            shape = tuple(int(d) for d in shape_or_x_T)
            if len(shape) < 2 or any(d < 1 for d in shape):
                raise ValueError(f"shape must be [B, T, F] or [B, L, D] with positive sizes, "
                                 f"got {shape}")
            if isinstance(text_emb, Tensor):
                device = text_emb.device
                dtype = text_emb.dtype if text_emb.dtype.is_floating_point else torch.float32
            else:
                device, dtype = torch.device("cpu"), torch.float32
            x = _randn(shape, generator, device, dtype)
        B = x.shape[0]
        self._check_text(text_emb, B)
        mask = self._check_mask(mask, x, "x_T")
        x = self._apply_mask(x, mask)

        sched = self._schedule_floats(steps)
        denoise = self._loop_denoiser(model, x, text_emb, mask, s) if fast else None
        iterator = range(len(timesteps))
        if progress:
            from tqdm.auto import tqdm
            iterator = tqdm(iterator, desc=f"{sampler} x{len(timesteps)}", leave=False)
        for i in iterator:
            t_int = timesteps[i]
            t = torch.full((B,), t_int, dtype=torch.long, device=x.device)
            abar = sched["alphas_cumprod"][i]
            abar_prev = sched["alphas_cumprod_prev"][i]
            last = i == len(timesteps) - 1
            noise_std = 0.0
            # x_prev = c_x0 * x0_hat + c_eps * eps_hat + c_xt * x_t (+ noise_std * z)
            if sampler == "ddim":
                # Song et al. (12)/(16): sigma^2 = eta^2 (1-abar_prev)/(1-abar) (1-abar/abar_prev).
                sigma = eta * math.sqrt((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev))
                c_x0, c_eps, c_xt = math.sqrt(abar_prev), math.sqrt(max(1 - abar_prev - sigma ** 2, 0.0)), 0.0
                noise_std = sigma
            else:
                # Posterior q(x_prev | x_t, x0_hat) of the respaced chain (fixed-small variance).
                beta = sched["betas"][i]
                c_x0 = math.sqrt(abar_prev) * beta / (1 - abar)
                c_eps, c_xt = 0.0, math.sqrt(1 - beta) * (1 - abar_prev) / (1 - abar)
                noise_std = math.sqrt(max(sched["posterior_variance"][i], 0.0))
            add_noise = noise_std > 0 and not last
            if denoise is None:
                with self.trusted():
                    out = self._guided_output(model, x, t, text_emb, mask, s)
            else:
                out = denoise(x, t)  # a fresh tensor of x's dtype: updated in place below
            if clip_denoised is None:
                # x0_hat and eps_hat are both linear in (out, x_t): fold the update onto the raw
                # output, two elementwise passes instead of seven
                sa, sq = math.sqrt(abar), math.sqrt(1 - abar)
                if self.prediction == "x0":  # eps = (x_t - sa x0) / sq
                    a_out, a_xt = c_x0 - c_eps * sa / sq, c_xt + c_eps / sq
                else:  # x0 = (x_t - sq eps) / sa
                    a_out, a_xt = c_eps - c_x0 * sq / sa, c_xt + c_x0 / sa
                if denoise is None:
                    x = torch.add(out * a_out, x, alpha=a_xt)
                else:  # the same two operations, without two [B, T, F] allocations
                    x = out.mul_(a_out).add_(x, alpha=a_xt)
            else:
                with self.trusted():
                    x0_hat, _ = self.x0_eps_from_output(out, x, t)
                    x0_hat = x0_hat.clamp(-float(clip_denoised), float(clip_denoised))
                    eps_hat = self.eps_from_x0(x, t, x0_hat)
                x = c_x0 * x0_hat + c_eps * eps_hat + c_xt * x
            if add_noise:
                z = _randn(x.shape, generator, x.device, x.dtype)
                x = x + noise_std * z if denoise is None else x.add_(z.mul_(noise_std))
            if denoise is None:
                x = self._apply_mask(x, mask)
            elif mask is not None and (add_noise or not denoise.masks_output):
                # otherwise x is already zero at padded frames: the output is (the plan masks
                # it) and so was x_t, and a x_t + b out keeps a zero a zero
                x = x.mul_(denoise.mask)
        return x.contiguous()  # an MDM plan's output can be a view cropped from whole patches
