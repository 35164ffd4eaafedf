"""SoPoLoss inside an MDM-style training step, end to end, on the CPU in a few seconds.

    python examples/mdm_sopo_step.py

Everything a real trainer has is here in miniature:
  - a transformer denoiser that predicts x0 (as MDM does) for motions [B, 263, 1, T],
    conditioned on a text embedding and the diffusion timestep;
  - padding masks [B, 1, 1, T] from per-sample lengths (MDM's layout);
  - a frozen reference copy of the initial policy;
  - a cosine noise schedule with q_sample;
  - K samples per caption from the current policy, without grad, all B*K in one batched
    few-step DDIM sampler;
  - a reward model (a toy stand-in for TMR) embedding captions and motions;
  - the SoPo step: select the unpreferred sample, noise both sides at one t, predict with the
    policy and the reference, SoPoLoss, backward, AdamW.

Sizes are tiny and the "dataset", the text embeddings and the reward model are random, so the
numbers mean nothing; the shapes, the order of operations and the calls are the real thing.
Only torch and sopo_ext are needed.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
from torch import nn

import sopo_ext

NFEATS = 263  # HumanML3D features per frame
T = 24  # padded number of frames (MDM: up to 196)
B = 4  # captions per batch
K = 2  # online samples per caption (official SoPo MDM code: 2; paper: 4)
TEXT_DIM = 16  # text-condition size (MDM: 512-d CLIP ViT-B/32)
REWARD_DIM = 8  # reward-model latent size (TMR: 256)
NUM_STEPS = 50  # diffusion steps of the model (the released 50-step MDM)
SAMPLE_STEPS = 4  # DDIM steps used to generate the K online samples
NUM_CAPTIONS = 32  # size of the toy dataset


# ---- diffusion: cosine schedule, q_sample, a few-step DDIM sampler for an x0-predictor -----------

def cosine_alphas_cumprod(num_steps: int, s: float = 0.008) -> torch.Tensor:
    """alpha_bar_t of the cosine schedule (Nichol & Dhariwal), betas clipped at 0.999 like MDM."""
    f = lambda t: math.cos((t / num_steps + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    betas = torch.tensor([min(1 - f(i + 1) / f(i), 0.999) for i in range(num_steps)], dtype=torch.float64)
    return torch.cumprod(1 - betas, dim=0).float()


ALPHAS_CUMPROD = cosine_alphas_cumprod(NUM_STEPS)


def _abar(t: torch.Tensor) -> torch.Tensor:
    """alpha_bar at integer timesteps t [N], shaped [N, 1, 1, 1] to broadcast over motions."""
    return ALPHAS_CUMPROD[t].view(-1, 1, 1, 1)


def q_sample(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise."""
    a = _abar(t)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


@torch.no_grad()
def ddim_sample(model: nn.Module, cond: torch.Tensor, mask: torch.Tensor, steps: int = SAMPLE_STEPS) -> torch.Tensor:
    """Deterministic DDIM (eta = 0) for an x0-predicting model: N motions [N, 263, 1, T]."""
    N = cond.shape[0]
    x = torch.randn(N, NFEATS, 1, mask.shape[-1])
    timesteps = torch.linspace(NUM_STEPS - 1, 0, steps).round().long().tolist()
    for i, t in enumerate(timesteps):
        tt = torch.full((N,), t, dtype=torch.long)
        x0 = model(x, tt, cond, mask)
        if i == len(timesteps) - 1:
            x = x0
            break
        a_t, a_prev = _abar(tt), _abar(torch.full((N,), timesteps[i + 1], dtype=torch.long))
        eps = (x - a_t.sqrt() * x0) / (1 - a_t).sqrt()  # the noise implied by the x0 prediction
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    return x * mask  # padded frames are meaningless; keep them at zero


# ---- the denoiser: a tiny MDM ----------------------------------------------------------------

def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps [N] -> [N, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], dim=1)


class TinyMDM(nn.Module):
    """MDM in miniature: one condition token (timestep + text) followed by the frames, a
    transformer encoder, and a linear head that predicts x0 for every frame."""

    def __init__(self, d_model: int = 32, n_layers: int = 2, n_heads: int = 4, max_frames: int = T):
        super().__init__()
        self.d_model = d_model
        self.motion_in = nn.Linear(NFEATS, d_model)
        self.time_mlp = nn.Sequential(nn.Linear(d_model, d_model), nn.SiLU(), nn.Linear(d_model, d_model))
        self.text_in = nn.Linear(TEXT_DIM, d_model)
        self.pos = nn.Parameter(0.02 * torch.randn(max_frames + 1, d_model))
        # dropout 0: the policy (train mode) and the reference must give identical predictions
        # while they still have identical weights, so the loss starts at exactly log 2.
        layer = nn.TransformerEncoderLayer(d_model, n_heads, dim_feedforward=4 * d_model, dropout=0.0,
                                           batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.motion_out = nn.Linear(d_model, NFEATS)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x_t [N, 263, 1, T], t [N], cond [N, TEXT_DIM], mask [N, 1, 1, T] bool -> x0 [N, 263, 1, T]."""
        N, _, _, frames = x_t.shape
        h = self.motion_in(x_t[:, :, 0].transpose(1, 2))  # [N, T, d]
        c = self.time_mlp(timestep_embedding(t, self.d_model)) + self.text_in(cond)  # [N, d]
        seq = torch.cat([c[:, None], h], dim=1) + self.pos[: frames + 1]
        ignore = torch.cat([torch.zeros(N, 1, dtype=torch.bool), ~mask.view(N, frames)], dim=1)
        out = self.encoder(seq, src_key_padding_mask=ignore)[:, 1:]  # drop the condition token
        return self.motion_out(out).transpose(1, 2).unsqueeze(2)


# ---- the reward model: a STAND-IN for TMR ----------------------------------------------------

class ToyRewardModel(nn.Module):
    """NOT a real reward model: fixed random linear text and motion encoders into a shared
    REWARD_DIM latent, standing in for TMR (a contrastively trained text-motion retrieval model
    with 256-d latents). SoPoLoss only needs its embeddings: reward = (cos(text, motion) + 1) / 2."""

    def __init__(self):
        super().__init__()
        self.text_enc = nn.Linear(TEXT_DIM, REWARD_DIM)
        self.motion_enc = nn.Linear(NFEATS, REWARD_DIM)
        self.requires_grad_(False)

    def encode_text(self, cond: torch.Tensor) -> torch.Tensor:
        return self.text_enc(cond)

    def encode_motion(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x [N, 263, 1, T] -> [N, REWARD_DIM] from the mean over valid frames."""
        m = mask.float()
        pooled = (x * m).sum(dim=(2, 3)) / m.sum(dim=(2, 3))
        return self.motion_enc(pooled)


# ---- a toy dataset: one (motion, caption embedding, length) per caption -----------------------

def make_dataset(g: torch.Generator):
    cond = torch.randn(NUM_CAPTIONS, TEXT_DIM, generator=g)  # stand-in for cached CLIP embeddings
    frames = torch.arange(T, dtype=torch.float32)
    freq = 0.1 + 0.4 * torch.rand(NUM_CAPTIONS, 1, 1, 1, generator=g)
    phase = 2 * math.pi * torch.rand(NUM_CAPTIONS, NFEATS, 1, 1, generator=g)
    motions = torch.sin(freq * frames + phase)  # smooth per-feature signals, [N, 263, 1, T]
    lengths = torch.randint(T // 2, T + 1, (NUM_CAPTIONS,), generator=g)
    return motions, cond, lengths


def padding_mask(lengths: torch.Tensor, frames: int = T) -> torch.Tensor:
    """Per-sample lengths [N] -> MDM's bool mask [N, 1, 1, T] (True = a real frame)."""
    return (torch.arange(frames)[None, :] < lengths[:, None]).view(-1, 1, 1, frames)


# ---- the SoPo step ---------------------------------------------------------------------------

@dataclass
class Example:
    policy: TinyMDM
    reference: TinyMDM
    reward: ToyRewardModel
    loss_fn: sopo_ext.SoPoLoss
    opt: torch.optim.Optimizer
    data: tuple
    gen: torch.Generator
    last: dict = field(default_factory=dict)  # the last step's logging values
    first_step: bool = True  # check the drop-in traps once


def build(seed: int = 0, d_model: int = 32) -> Example:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    policy = TinyMDM(d_model=d_model)
    # The frozen reference: a copy of the initial policy that never trains. With dropout (MDM
    # uses 0.1) it belongs in eval(); this model has none, and in train mode it runs the same
    # code as the policy (under no_grad, an eval-mode nn.TransformerEncoder switches to a fused
    # fast path that rounds differently, so d_w, d_l would start at ~1e-9 instead of exactly 0).
    reference = copy.deepcopy(policy).requires_grad_(False)
    loss_fn = sopo_ext.SoPoLoss(tau=0.45, beta=1.0, C=2.0)  # the paper's settings
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-4)  # the official default
    return Example(policy, reference, ToyRewardModel(), loss_fn, opt, make_dataset(g), g)


def sopo_step(ex: Example) -> torch.Tensor:
    motions, conds, lengths = ex.data
    idx = torch.randint(0, NUM_CAPTIONS, (B,), generator=ex.gen)
    x_w, cond, mask = motions[idx], conds[idx], padding_mask(lengths[idx])  # x_w: the dataset motions

    # 1. K samples per caption from the current policy, no grad, all B*K in one batch.
    ex.policy.eval()
    samples = ddim_sample(ex.policy, cond.repeat_interleave(K, 0), mask.repeat_interleave(K, 0))
    samples = samples.view(B, K, NFEATS, 1, T)
    ex.policy.train()

    # 2. Reward-model embeddings of the captions, the generated motions and the dataset motions.
    with torch.no_grad():
        text_emb = ex.reward.encode_text(cond)  # [B, D]
        gen_emb = ex.reward.encode_motion(samples.flatten(0, 1), mask.repeat_interleave(K, 0)).view(B, K, -1)
        data_emb = ex.reward.encode_motion(x_w, mask)  # [B, D]

    # 3. SoPo's selection: rewards, the worst sample x_l, "valuable" (worst reward < tau) and
    #    beta_w = beta * (C - S) with S the min similarity of x_w to the generated motions.
    sel = ex.loss_fn.select(text_emb, gen_emb, data_emb)
    x_l = sel.gather(samples)  # [B, 263, 1, T]
    mask_l = mask  # x_l was generated for the same caption at the same length

    # 4. Noise both sides at one shared t (per sample), each with fresh noise. Policy and
    #    reference see the same x_t here (as Diffusion-DPO does; the official SoPo code draws
    #    separate noise for the reference, which only adds variance).
    t = torch.randint(0, NUM_STEPS, (B,), generator=ex.gen)
    # zero at padded frames, as the sampler leaves them (MDM's forward does not mask its input)
    xt_w = q_sample(x_w, t, torch.randn_like(x_w)) * mask
    xt_l = q_sample(x_l, t, torch.randn_like(x_l)) * mask_l
    if ex.first_step:  # the drop-in traps (README): same function, same inputs, zero padding
        for x_t, m in ((xt_w, mask), (xt_l, mask_l)):  # both models get these very tensors below
            ex.loss_fn.check(ex.policy, ex.reference, x_policy=x_t, x_reference=x_t, mask=m, strict=True)
        ex.first_step = False
    pred_w = ex.policy(xt_w, t, cond, mask)
    pred_l = ex.policy(xt_l, t, cond, mask_l)
    with torch.no_grad():
        ref_pred_w = ex.reference(xt_w, t, cond, mask)
        ref_pred_l = ex.reference(xt_l, t, cond, mask_l)

    # 5. The loss on x0 predictions (MDM predicts x0, so the targets are x_w and x_l), masked
    #    over the valid frames, then an ordinary optimizer step.
    loss = ex.loss_fn(pred_w, ref_pred_w, x_w, pred_l, ref_pred_l, x_l, sel, mask_w=mask, mask_l=mask_l)
    ex.opt.zero_grad(set_to_none=True)
    loss.backward()
    ex.opt.step()

    # For logging (what a trainer would send to its logger).
    ex.last = dict(
        valuable=sel.valuable.float().mean().item(),
        beta_w=sel.beta_w.mean().item(),
        accuracy=(ex.loss_fn.last_stats.z > 0).float().mean().item(),  # Diffusion-DPO's implicit accuracy
    )
    return loss.detach()


def main(steps: int = 20, seed: int = 0, example: Example | None = None, verbose: bool = True) -> list[float]:
    """Run `steps` SoPo steps; returns the losses. Pass `example` (from build()) to inspect the
    models afterwards; otherwise a fresh one is built from `seed`."""
    ex = example if example is not None else build(seed)
    losses = []
    for step in range(1, steps + 1):
        loss = sopo_step(ex).item()
        losses.append(loss)
        if verbose:
            s = ex.last
            print(f"step {step:3d}  loss {loss:.6f}  valuable {s['valuable']:.2f}  "
                  f"beta_w {s['beta_w']:.3f}  implicit acc {s['accuracy']:.2f}")
    return losses


if __name__ == "__main__":
    main()
