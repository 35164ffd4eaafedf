"""The online sampling loop (issue 17): plain vs fast, against the machine's matrix-product speed.

    pytest benchmarks/test_bench_sampling.py --benchmark-only

Groups, all in one run so their ratios are comparable:

    fp32 matmul probe    a 1024^3 fp32 matrix product: the machine's speed on the operation
                         that dominates the denoiser (its GFLOP/s is the ceiling the forwards
                         are read against)
    MDM forward          one bundled-MDM forward on 64 rows (16 captions x K 4) x 196 frames,
                         as the trainer's CPU sampling runs it (nn.TransformerEncoder's fused
                         path off): ``forward`` = model(...), ``plan`` = one call of
                         model.sampling_plan(...) (the per-loop constants made once)
    MDM / MLD loop       GaussianDiffusion.sample with 8 DDIM steps, no CFG, the same rows:
                         ``plain`` (fast=False, the loop before issue 17) and ``fast`` (the
                         default); ``fast-cfg`` / ``plain-cfg`` with guidance 2.5 (two rows per
                         sample)

FLOPs per call come from ``torch.utils.flop_counter.FlopCounterMode`` with the fused path off
(with it on, the fused encoder layers are not counted and a forward looks 4x smaller than it
is). conftest.py prints GFLOP/s, the share of the probe and plain / variant for each group.
"""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from sopo_ext import checkpoint as ckpt_io
from sopo_ext.methods import _no_transformer_fastpath
from sopo_ext.sampling import diffusion_from_meta


@pytest.fixture(scope="module")
def backbones():
    out = {}
    for kind in ("mdm", "mld"):
        c = ckpt_io.load_checkpoint(kind, kind)
        out[kind] = (c.model.eval(), diffusion_from_meta(c.meta))
    return out


def _rows(sizes):
    """(rows, frames, sampling steps): the trainer's default batch, or a tiny one in quick mode."""
    return (8, 24, 2) if sizes.quick else (64, 196, 8)


def _inputs(rows: int, frames: int, text_dim: int = 384):
    g = torch.Generator().manual_seed(0)
    text = torch.nn.functional.normalize(torch.randn(rows, text_dim, generator=g), dim=-1)
    lengths = torch.randint(max(1, frames // 5), frames + 1, (rows,), generator=g)  # 40-196 as the data
    return text, torch.arange(frames)[None, :] < lengths[:, None]


def _flops(fn) -> int:
    with torch.no_grad(), _no_transformer_fastpath(), FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


def _bench(benchmark, sizes, group, variant, fn, flops, rounds=5):
    benchmark.group = group
    benchmark.extra_info.update(variant=variant, kind="sampling", flops=flops)

    def call():
        with torch.no_grad(), _no_transformer_fastpath():
            return fn()
    call()  # warm-up: schedule tables, allocator, oneDNN primitives
    if benchmark.disabled or sizes.quick:
        benchmark(call)
    else:
        benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=1)


def test_matmul_probe(benchmark, sizes):
    n = 256 if sizes.quick else 1024
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    _bench(benchmark, sizes, "fp32 matmul probe", "matmul", lambda: a @ b, 2 * n ** 3, rounds=30)


@pytest.mark.parametrize("variant", ["forward", "plan"])
def test_mdm_forward(benchmark, sizes, backbones, variant):
    model, _ = backbones["mdm"]
    rows, frames, _ = _rows(sizes)
    text, mask = _inputs(rows, frames)
    x = torch.randn(rows, frames, model.config.nfeats, generator=torch.Generator().manual_seed(1)) * mask[..., None]
    t = torch.full((rows,), 500)
    if variant == "forward":
        def fn():
            return model(x, t, text, mask)
    else:
        with torch.no_grad(), _no_transformer_fastpath():
            plan = model.sampling_plan(x, text, mask)

        def fn():
            return plan(x, t)
    flops = _flops(fn)
    _bench(benchmark, sizes, f"MDM forward, {rows} rows x {frames} frames", variant, fn, flops)


@pytest.mark.parametrize("variant", ["plain", "fast", "plain-cfg", "fast-cfg"])
@pytest.mark.parametrize("kind", ["mdm", "mld"])
def test_sampling_loop(benchmark, sizes, backbones, kind, variant):
    model, diffusion = backbones[kind]
    rows, frames, steps = _rows(sizes)
    text, mask = _inputs(rows, frames)
    shape = (rows, frames, model.config.nfeats) if kind == "mdm" else (rows,) + tuple(model.latent_shape)
    s = 2.5 if variant.endswith("cfg") else 1.0

    def fn():
        return diffusion.sample(model, shape, text, mask if kind == "mdm" else None, steps=steps,
                                guidance_scale=s, fast=variant.startswith("fast"),
                                generator=torch.Generator().manual_seed(1))
    # the loop's FLOPs: the denoiser calls (MLD: the decode is not part of the loop)
    flops = _flops(fn)
    _bench(benchmark, sizes, f"{kind.upper()} sampling loop, {rows} rows x {frames} frames, "
                             f"{steps} DDIM steps", variant, fn, flops, rounds=3)


def test_profile_and_ab_scripts_run(capsys, tmp_path):
    """The two measuring scripts of docs/performance.md run (tiny sizes; not a benchmark, so
    --benchmark-only skips it and CI's quick run checks it)."""
    import ab_sampling
    import profile_sampling
    profile_sampling.main(["--backbone", "mdm", "--rows", "4", "--frames", "12", "--steps", "2", "--top", "3"])
    profile_sampling.main(["--backbone", "mld", "--rows", "4", "--frames", "12", "--steps", "2", "--plain"])
    ab_sampling.main(["--rows", "4", "--frames", "12", "--steps", "2", "--rounds", "2",
                      "--json", str(tmp_path / "ab.json")])
    out = capsys.readouterr().out
    assert out.count("# sampling loop profile") == 2 and "plain loop" in out and "fast loop" in out
    assert out.count("| mdm |") == 1 and out.count("| mld |") == 1
    import json
    rec = json.loads((tmp_path / "ab.json").read_text())
    for kind in ("mdm", "mld"):
        r = rec["backbones"][kind]
        assert len(r["ratios"]) == len(r["plain_s"]) == len(r["fast_s"]) == 2
        assert r["ci95"][0] <= r["geometric_mean"] <= r["ci95"][1]
