"""A whole preference step on a GPU with no host sync (skipped on machines without one).

tests/test_step_syncs.py proves the step reads no tensor value on the CPU; this runs the same
step on CUDA under torch.cuda.set_sync_debug_mode("error"), which raises at any synchronizing
call (a device-to-host copy, .item(), a stream wait), so the GPU path itself is checked: the
sampling loop, the reward, the selection, the fused loss and its backward.
"""
from __future__ import annotations

import copy

import pytest
import torch

from sopo_ext import checkpoint as C
from sopo_ext.methods import PreferenceStep, StepConfig
from sopo_ext.sampling import diffusion_from_meta

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(not torch._C._dispatch_has_kernel_for_dispatch_key("sopo_ext::sopo_loss_forward", "CUDA"),
                       reason="extension built without CUDA kernels"),
]


def _cuda_batch(B=3, T=24, F=263, D=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 17:] = False
    mask[2, 9:] = False
    lengths = mask.sum(1)
    return {"text_emb": torch.nn.functional.normalize(torch.randn(B, D, generator=g), dim=-1).cuda(),
            "motion": (torch.randn(B, T, F, generator=g) * mask[..., None]).cuda(), "mask": mask.cuda(),
            # host-side like the trainer's batches (HOST_KEYS): reading them never waits for the GPU
            "lengths": lengths, "indices": torch.arange(B)}


@pytest.mark.parametrize("method,backbone,extra", [
    ("sopo", "mdm", {}), ("sopo", "mld", {}), ("online-dpo", "mdm", {}), ("sft", "mdm", {"cond_drop": 0.5}),
    ("sopo", "mdm", {"scale_regime": "paper"}), ("sopo", "mdm", {"sampler": "ddpm", "guidance_scale": 2.5})])
def test_a_whole_step_has_no_host_sync(tiny_assets, method, backbone, extra):
    base = C.load_checkpoint(tiny_assets[backbone])
    reward = C.load_checkpoint(tiny_assets["reward"]).model.cuda().eval()
    policy = copy.deepcopy(base.model).cuda().train()
    reference = copy.deepcopy(base.model).cuda().eval().requires_grad_(False)
    cfg = StepConfig(method=method, k=2, sampling_steps=3, min_bucket_rows=1, **extra)
    step = PreferenceStep(policy, reference, diffusion_from_meta(base.meta), reward, cfg)
    batch = _cuda_batch()
    # the first call makes the per-device schedule tables (host-to-device copies, not syncs)
    loss, _ = step(batch, torch.Generator(device="cuda").manual_seed(0))
    loss.backward()
    policy.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss, stats = step(batch, torch.Generator(device="cuda").manual_seed(1))
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss).item()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in policy.parameters())
