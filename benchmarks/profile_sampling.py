"""Where the online sampling loop's time goes (issue 17, step 1): a profile, not a benchmark.

    python benchmarks/profile_sampling.py --backbone mdm     # or mld; --rows 64 --frames 196 --steps 8
    python benchmarks/profile_sampling.py --backbone mdm --plain   # the loop before issue 17

Runs the trainer's sampling loop (``GaussianDiffusion.sample``: DDIM, the bundled backbone,
B*K rows at the trainer's defaults, nn.TransformerEncoder's fused inference path off as the
trainer's CPU sampling has it; ``--mha-fastpath`` turns it on) under ``torch.profiler`` and
prints: the loop's wall time,
one model forward's FLOPs (``FlopCounterMode``) and GFLOP/s, a plain fp32 matrix product's
GFLOP/s measured in the same run (the machine's ceiling on the dominant op), and the profile's
self CPU time grouped by kind (matrix products, attention, normalization, activations,
elementwise, copies / layout, other), with the top ops and the matrix products' shapes.
Nothing is asserted; the output goes into docs/performance.md with this command.

FLOPs are counted with the fused path off whatever ``--mha-fastpath`` says: FlopCounterMode has
no formula for the fused encoder layer, so with it on a forward looks 4x smaller than it is
(the mistake in issue 17's first figures: 1.70 instead of 6.73 GFLOP for the MDM forward).
"""
from __future__ import annotations

import argparse
import collections
import time

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from sopo_ext.checkpoint import load_checkpoint
from sopo_ext.methods import _no_transformer_fastpath
from sopo_ext.sampling import diffusion_from_meta

KINDS = [
    ("matrix products", ("addmm", "mm", "bmm", "baddbmm", "matmul", "linear", "_addmm_activation")),
    ("attention", ("attention", "softmax", "_masked_softmax", "_transform_bias_rescale_qkv",
                   "_native_multi_head_attention", "_transformer_encoder_layer_fwd")),
    ("normalization", ("layer_norm", "native_layer_norm", "group_norm")),
    ("activations", ("gelu", "relu", "silu", "tanh", "sigmoid")),
    ("copies / layout", ("copy_", "clone", "contiguous", "cat", "stack", "index", "gather",
                         "repeat", "expand", "permute", "transpose", "view", "reshape", "to", "_to_copy",
                         "empty", "zeros", "fill_", "select", "slice", "unbind", "split", "chunk")),
    ("elementwise", ("add", "mul", "sub", "div", "where", "masked_fill", "rsqrt", "sqrt", "exp",
                     "clamp", "neg", "pow", "sin", "cos", "lerp", "addcmul")),
]


def kind_of(name: str) -> str:
    op = name.split("::")[-1]
    for kind, keys in KINDS:
        if any(op == k or op.startswith(k + "_") or op == "_" + k for k in keys) or \
                (kind == "attention" and "attention" in op):
            return kind
    return "other"


def matmul_gflops(n: int = 1024, reps: int = 20) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e9


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backbone", default="mdm", choices=("mdm", "mld"))
    ap.add_argument("--rows", type=int, default=64, help="B*K rows (trainer default 16 x 4)")
    ap.add_argument("--frames", type=int, default=196)
    ap.add_argument("--steps", type=int, default=8, help="DDIM steps (trainer default 8)")
    ap.add_argument("--guidance", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--plain", action="store_true", help="the plain loop (fast=False), as before issue 17")
    ap.add_argument("--mha-fastpath", action="store_true",
                    help="leave nn.TransformerEncoder's fused inference path on (PyTorch's default)")
    args = ap.parse_args(argv)
    was = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(args.mha_fastpath)
    try:
        _profile(args)
    finally:
        torch.backends.mha.set_fastpath_enabled(was)


def _profile(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    c = load_checkpoint(args.backbone, args.backbone)
    model = c.model.eval()
    diffusion = diffusion_from_meta(c.meta)
    text_dim = model.config.text_dim if args.backbone == "mdm" else model.denoiser.config.text_dim
    g = torch.Generator().manual_seed(0)
    text = torch.nn.functional.normalize(torch.randn(args.rows, text_dim, generator=g), dim=-1)
    lengths = torch.randint(args.frames // 2, args.frames + 1, (args.rows,), generator=g)
    mask = torch.arange(args.frames)[None, :] < lengths[:, None]

    shape = (args.rows, args.frames, model.config.nfeats) if args.backbone == "mdm" else \
        (args.rows,) + tuple(model.latent_shape)

    def loop():  # the denoising loop itself (an MLD's decode is not part of it)
        return diffusion.sample(model, shape, text, mask if args.backbone == "mdm" else None,
                                steps=args.steps, sampler="ddim", guidance_scale=args.guidance,
                                fast=not args.plain, generator=torch.Generator().manual_seed(1))

    loop()  # warm-up (schedule tables, allocator)
    t0 = time.perf_counter()
    loop()
    wall = time.perf_counter() - t0

    # one denoiser call at the loop's shapes (the plan's call for the fast loop): FLOPs and time
    if args.backbone == "mdm":
        x = torch.randn(args.rows, args.frames, model.config.nfeats, generator=g) * mask[..., None]
        m = mask
    else:
        x = torch.randn(args.rows, *model.latent_shape, generator=g)
        m = None
    t10 = torch.full((args.rows,), 10)
    if args.plain:
        fwd = lambda: model(x, t10, text, m, None)  # noqa: E731
    else:
        with torch.no_grad():
            plan = model.sampling_plan(x, text, m)
        fwd = lambda: plan(x, t10)  # noqa: E731
    with torch.no_grad():
        with FlopCounterMode(display=False) as fc, _no_transformer_fastpath():
            fwd()
        flops = fc.get_total_flops()
        fwd()
        t0 = time.perf_counter()
        for _ in range(5):
            fwd()
        t_fwd = (time.perf_counter() - t0) / 5
    mm = matmul_gflops()

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        loop()
    events = prof.key_averages(group_by_input_shape=True)
    total = sum(e.self_cpu_time_total for e in events)
    by_kind = collections.Counter()
    for e in events:
        by_kind[kind_of(e.key)] += e.self_cpu_time_total
    print(f"# sampling loop profile: {args.backbone}, {args.rows} rows x {args.frames} frames, "
          f"{args.steps} DDIM steps, CFG {args.guidance}, {'plain' if args.plain else 'fast'} loop, "
          f"MHA fast path {'on' if args.mha_fastpath else 'off'}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"loop wall time: {wall * 1e3:.0f} ms ({wall / args.steps * 1e3:.1f} ms per step)")
    print(f"one forward: {flops / 1e9:.2f} GFLOP in {t_fwd * 1e3:.1f} ms = {flops / t_fwd / 1e9:.1f} GFLOP/s; "
          f"fp32 1024^3 matrix product in the same run: {mm:.1f} GFLOP/s "
          f"(forward at {flops / t_fwd / 1e9 / mm * 100:.0f}% of it)")
    print("\n| kind | self CPU ms | share |\n|---|---:|---:|")
    for kind, us in by_kind.most_common():
        print(f"| {kind} | {us / 1e3:.1f} | {us / total * 100:.1f}% |")
    print("\n| op | kind | input shapes | calls | self CPU ms | share |\n|---|---|---|---:|---:|---:|")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:args.top]:
        shapes = str(e.input_shapes)[:70].replace("|", "/")
        print(f"| {e.key} | {kind_of(e.key)} | {shapes} | {e.count} | {e.self_cpu_time_total / 1e3:.1f} | "
              f"{e.self_cpu_time_total / total * 100:.1f}% |")


if __name__ == "__main__":
    main()
