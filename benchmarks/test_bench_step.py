"""One whole SoPo training step: the project's trainer step vs the official loop, on the CPU.

Variants, all with the bundled MDM and reward model, the same batch of built-in captions and
motions, the same K and number of sampling steps, AdamW, each call = loss + backward + update:

    official         benchmarks/official_loop.py: K separate ancestral loops, captions
                     re-encoded by the text encoder in every model call, one reward call per
                     sample, four separate unfused loss terms with fresh noise
    official-cached  the same loop with every caption encoded once (what text caching alone buys)
    project          sopo_ext.methods.PreferenceStep as python -m sopo_ext.train runs it: cached
                     caption embeddings, B*K samples in one loop, batched reward scoring, the
                     reference without autograd, the fused loss (plus the trainer's clipping)
    project-1loop    the project's step with all B*K samples in one loop padded to the batch's
                     longest motion (length_buckets=1), to show what length bucketing buys
    project-bf16     the project's step under CPU bf16 autocast
    project-plain-sampling
                     the project's step with the sampling loop before issue 17
                     (StepConfig.fast_sampling=False: one model call per step, out-of-place
                     updates); the same samples, so "today's main" of issue 17's target

Configurations: the official preset (K=2, 50 ancestral steps, the release's settings) and the
trainer's default (K=4, 8 steps; the project samples with DDIM, the official loop ancestrally:
one model call per step either way). Every phase (sampling, reward, selection, loss, backward,
optimizer; "encode" for the project's caption lookup) is timed with sopo_ext.profiling's
ranges, which are NVTX ranges too; conftest.py prints the per-phase table and official / project.
"""
from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch

from official_loop import OfficialStep
from sopo_ext import checkpoint as ckpt_io
from sopo_ext.data import skeleton as sk, synthetic
from sopo_ext.data.humanml3d import collate_motions
from sopo_ext.methods import PreferenceStep, StepConfig
from sopo_ext.optim import make_adamw
from sopo_ext.profiling import phase, phase_times, reset_phase_times
from sopo_ext.sampling import diffusion_from_meta
from sopo_ext.trainer import cpu_has_native_bf16
from torch.utils.flop_counter import FlopCounterMode

STEP_VARIANTS = ("official", "official-cached", "project-1loop", "project-plain-sampling", "project",
                 "project-bf16")
CONFIGS = {  # name: (K, sampling steps, project sampler)
    "official preset K=2, 50 steps": (2, 50, "ddpm"),
    "trainer default K=4, 8 steps": (4, 8, "ddim"),
}
ROUNDS = int(os.environ.get("SOPO_BENCH_STEP_ROUNDS", "3"))


def _batch(B: int, frames: int, mean, std, seed: int = 0) -> dict:
    """B built-in motions (generated on the fly, cropped to ``frames``) with one caption each."""
    rng = np.random.default_rng(seed)
    items = []
    for i, spec in enumerate(synthetic.sample_specs(B, seed=seed)):
        feats = sk.features_from_joints(synthetic.synthesize_joints(spec, seed=i), fix_heading_wrap=True)
        x = ((feats[:frames] - mean.double()) / std.double()).float()
        cap = synthetic.captions_for(spec, rng, k=1)[0]
        items.append({"motion": x, "caption": cap, "tokens": [], "id": str(i)})
    return collate_motions(items)


@pytest.fixture(scope="module")
def assets():
    base = ckpt_io.load_checkpoint("mdm", "mdm")
    reward = ckpt_io.load_checkpoint("reward", "tmr").model.eval()
    from sopo_ext.models.text import CachedTextEncoder, MiniLMEncoder
    raw = MiniLMEncoder()
    raw.encode(["warm up the text encoder"])
    return {"base": base, "reward": reward, "raw_text": raw, "CachedTextEncoder": CachedTextEncoder}


def _step_fn(variant, assets, K, steps, sampler, batch):
    base = assets["base"]
    diffusion = diffusion_from_meta(base.meta)
    policy = copy.deepcopy(base.model).train()
    reference = copy.deepcopy(base.model).eval()
    for p in reference.parameters():
        p.requires_grad_(False)
    opt = make_adamw(policy.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    if variant.startswith("official"):
        step = OfficialStep(policy, reference, diffusion, assets["reward"], assets["raw_text"], k=K,
                            steps=steps, cache_text=variant == "official-cached")

        def loss_fn():
            return step(batch, gen)
        clip = False
    else:
        cfg = StepConfig(method="sopo", k=K, sampling_steps=steps, sampler=sampler,
                         bf16=variant == "project-bf16",
                         fast_sampling=variant != "project-plain-sampling",
                         length_buckets=1 if variant == "project-1loop" else StepConfig.length_buckets)
        step = PreferenceStep(policy, reference, diffusion, assets["reward"], cfg)
        cached = assets["CachedTextEncoder"](assets["raw_text"], persist=False)
        cached.precompute(batch["captions"])  # the trainer's cache is filled once per caption

        def loss_fn():
            with phase("encode"):
                b = dict(batch, text_emb=cached.encode(batch["captions"]))
            return step(b, gen)[0]
        clip = True

    def one_step():
        loss = loss_fn()
        with phase("backward"):
            opt.zero_grad(set_to_none=True)
            loss.backward()
        with phase("optimizer"):
            if clip:
                torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
            opt.step()
        return loss
    return one_step


@pytest.mark.parametrize("variant", STEP_VARIANTS)
@pytest.mark.parametrize("config", list(CONFIGS))
def test_step(benchmark, assets, variant, config, sizes):
    K, steps, sampler = CONFIGS[config]
    if variant == "project-bf16" and not cpu_has_native_bf16():
        pytest.skip("this CPU has no native bf16 matrix products (no AVX512-BF16 / AMX): bf16 "
                    "autocast would emulate them, tens of times slower than fp32")
    B, frames = (16, 196) if not sizes.quick else (2, 40)
    if sizes.quick:
        steps = min(steps, 2)
    base = assets["base"]
    batch = _batch(B, frames, base.mean, base.std)
    fn = _step_fn(variant, assets, K, steps, sampler, batch)
    group = f"SoPo step ({config}), B={B}, {frames} frames"
    benchmark.group = group
    benchmark.extra_info.update(variant=variant, kind="step", K=K, steps=steps, B=B)
    loss = fn()  # untimed warm-up (allocator, oneDNN primitives)
    assert torch.isfinite(loss)
    with FlopCounterMode(display=False) as fc:  # one more step, counted (not timed)
        fn()
    benchmark.extra_info["flops"] = fc.get_total_flops()
    rounds = 1 if benchmark.disabled or sizes.quick else ROUNDS
    reset_phase_times()
    benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=0)
    benchmark.extra_info["phases"] = {k: v / rounds for k, v in phase_times().items()}
