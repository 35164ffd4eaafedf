"""No host syncs in a training step: nothing in PreferenceStep (sampling, reward, selection, loss,
backward) reads a tensor value back to Python, except the fused backward's exactness check,
which runs only for CPU tensors (where there is no device to wait for). On a GPU every such read
(.item(), int(t), .tolist(), bool(x.all())) stalls the pipeline; on the CPU they all dispatch
aten::_local_scalar_dense, so counting that op finds them without a GPU."""
from __future__ import annotations

import copy
import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import sopo_ext._ops as ops_mod
from sopo_ext import checkpoint as C
from sopo_ext.diffusion import DiffusionConfig, GaussianDiffusion
from sopo_ext.methods import PreferenceStep, StepConfig
from sopo_ext.sampling import diffusion_from_meta

# functions allowed to read values because they only ever read CPU tensors (both check the device):
# the fused backward's exactness check and the length grouping of the host-side batch lengths
CPU_ONLY_READS = {"_fused_backward", "_length_groups"}


class ValueReads(TorchDispatchMode):
    """Records the calling package function of every tensor -> Python value read: the ones that
    dispatch aten::_local_scalar_dense (.item(), int(), float(), bool()) and .tolist() /
    .numpy(), which read the data without dispatching (patched while the mode is active)."""

    def __init__(self):
        super().__init__()
        self.sites = []
        self._saved = {}

    def _record(self):
        frames = [f for f in traceback.extract_stack()[:-2] if "sopo_ext" in f.filename]
        self.sites.append(f"{frames[-1].name} ({frames[-1].filename.rsplit('/', 1)[-1]}:"
                          f"{frames[-1].lineno})" if frames else "outside sopo_ext")

    def __enter__(self):
        for name in ("tolist", "numpy"):
            orig = self._saved[name] = getattr(torch.Tensor, name)

            def patched(t, *a, _orig=orig, **k):
                self._record()
                return _orig(t, *a, **k)
            setattr(torch.Tensor, name, patched)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, orig in self._saved.items():
            setattr(torch.Tensor, name, orig)
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self._record()
        return func(*args, **(kwargs or {}))


def _batch(B=3, T=24, F=263, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 17:] = False
    mask[2, 9:] = False
    return {"text_emb": torch.nn.functional.normalize(torch.randn(B, 64, generator=g), dim=-1),
            "motion": torch.randn(B, T, F, generator=g) * mask[..., None], "mask": mask,
            "lengths": mask.sum(1), "indices": torch.arange(B)}


@pytest.mark.parametrize("method,backbone,extra", [
    ("sopo", "mdm", {}), ("usopo", "mdm", {}), ("sopo-no-vu", "mdm", {}), ("dsopo", "mdm", {}),
    ("online-dpo", "mdm", {}), ("sft", "mdm", {"cond_drop": 0.5}), ("sopo", "mld", {}),
    ("sopo", "mdm", {"scale_regime": "paper"}), ("sopo", "mld", {"scale_regime": "diffusion-dpo"}),
    ("sopo", "mdm", {"nan_reward": True})])
@pytest.mark.parametrize("sampler,guidance", [("ddim", 1.0), ("ddpm", 2.5)])
def test_step_reads_no_values(tiny_assets, method, backbone, extra, sampler, guidance, monkeypatch):
    extra = dict(extra)
    nan_reward = extra.pop("nan_reward", False)
    base = C.load_checkpoint(tiny_assets[backbone])
    reward = C.load_checkpoint(tiny_assets["reward"]).model.eval()
    policy, reference = copy.deepcopy(base.model).train(), copy.deepcopy(base.model).eval()
    cfg = StepConfig(method=method, k=2, sampling_steps=3, sampler=sampler, guidance_scale=guidance,
                     min_bucket_rows=1, **extra)  # length buckets even for this small batch
    step = PreferenceStep(policy, reference, diffusion_from_meta(base.meta), reward, cfg)
    batch = _batch()
    if nan_reward:  # the non-finite-reward path (one sample, and a caption with none) reads nothing
        real = reward.encode_motion

        def encode(motion, mask):
            out = real(motion, mask)
            if motion.shape[0] == 6:
                out = out.clone()
                out[[0, 4, 5]] = float("nan")
            return out
        monkeypatch.setattr(reward, "encode_motion", encode)
    step(batch, torch.Generator().manual_seed(0))  # first call: per-steps schedule tables are made
    with ValueReads() as reads:
        loss, stats = step(batch, torch.Generator().manual_seed(1))
        loss.backward()
    assert torch.isfinite(loss)
    bad = [s for s in reads.sites if s.split(" ")[0] not in CPU_ONLY_READS]
    assert not bad, f"value reads in the step: {bad}"


def test_the_detector_sees_reads():
    with ValueReads() as reads:
        x = torch.ones(3)
        float(x.sum())
        x.tolist()
        x.numpy()
    assert len(reads.sites) == 3


def test_rescaled_precomputed_gradients_match_a_recompute():
    g = torch.Generator().manual_seed(0)
    B, N = 5, 37
    pw, rw, tw, pl, rl, tl = (torch.randn(B, N, generator=g, dtype=torch.float64) for _ in range(6))
    args = (pw, rw, tw, pl, rl, tl, torch.full((B,), 1.3, dtype=torch.float64),
            torch.tensor([True, False, True, True, False]), torch.ones(B, dtype=torch.float64), 1.0,
            None, None)
    _, stats, gw, gl = ops_mod.ops.sopo_loss_forward_backward(*args, 1.0 / B)
    grad_loss = torch.rand(B, generator=g, dtype=torch.float64)
    want_w, want_l = ops_mod.ops.sopo_loss_backward(grad_loss, pw, tw, pl, tl, None, None, stats)
    got_w, got_l = ops_mod.rescale_precomputed(gw, gl, grad_loss, 1.0 / B)
    torch.testing.assert_close(got_w, want_w, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(got_l, want_l, rtol=1e-6, atol=1e-12)
    # the usual case, grad_loss == grad_scale: exactly the precomputed gradients
    same_w, same_l = ops_mod.rescale_precomputed(gw.float(), gl.float(), torch.full((B,), 1.0 / B), 1.0 / B)
    assert torch.equal(same_w, gw.float()) and torch.equal(same_l, gl.float())


def test_user_timesteps_are_still_range_checked():
    d = GaussianDiffusion(DiffusionConfig(num_steps=10))
    x = torch.zeros(2, 4, 3)
    with pytest.raises(ValueError, match=r"t must be in \[0, 10\)"):
        d.q_sample(x, torch.tensor([0, 10]), x)
    with d.trusted():
        with ValueReads() as reads:
            d.q_sample(x, torch.tensor([0, 9]), x)
    assert reads.sites == []
    with pytest.raises(ValueError, match=r"t must be in"):  # the check is back after the block
        d.q_sample(x, torch.tensor([-1, 0]), x)


# ------------------------------------------------------------------ the GPU backward's rescale path
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16],
                         ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_the_device_rescale_path_is_exact_with_non_dyadic_weights(dtype, reduction, monkeypatch):
    """On a GPU the fused backward never reads grad_loss on the host: it rescales the gradients
    the forward precomputed. Drive that path on the CPU (as if reading were a sync) with output
    gradients that are not exact in binary (a weighted loss, gradient accumulation) and compare
    with the float64 reference at the dtype's tolerance: the factor and product must be computed
    in the accumulation dtype (an fp32 factor is ~5e-8 off in float64, past its 1e-10)."""
    from conftest import fused_vs_reference, make_loss_tensors, mixed_valuable, per_sample
    calls = []
    real = ops_mod.rescale_precomputed

    def counted(*a):
        calls.append(1)
        return real(*a)

    monkeypatch.setattr(ops_mod, "_reading_is_free", lambda t: False)
    monkeypatch.setattr(ops_mod, "rescale_precomputed", counted)
    B = 7
    tensors = make_loss_tensors((B, 3, 41), dtype, seed=11)
    weights = (torch.tensor([0.1, 0.37, 1.3, 2.0 / 3.0, 0.9, 1.1, 0.01], dtype=torch.float64)
               if reduction == "none" else torch.tensor(0.3, dtype=torch.float64))
    fused_vs_reference(tensors, grad_out=weights, beta_w=per_sample(B, 3, 1.0, 2.0),
                       valuable=mixed_valuable(B), reduction=reduction, same_dtype_check=False)
    assert calls, "the device rescale path was not taken"


def test_snr_and_loss_weights_read_no_values():
    """diffusion.snr indexed a host copy of the schedule with t.cpu() (a device-to-host copy on a
    GPU); it now indexes a per-device table."""
    d = GaussianDiffusion(DiffusionConfig(num_steps=10))
    t = torch.tensor([0, 3, 9])
    with d.trusted():
        with ValueReads() as reads:
            snr = d.snr(t)
            w = d.loss_weight(t, towards="x0")
    assert not reads.sites, reads.sites
    abar = d.alphas_cumprod[t]
    torch.testing.assert_close(snr, abar / (1 - abar), rtol=0, atol=0)
    torch.testing.assert_close(w, (1 - abar) / abar, rtol=1e-15, atol=0)
    assert snr.dtype == torch.float64 and snr.shape == (3,)
