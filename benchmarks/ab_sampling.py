"""Plain vs fast sampling loop, interleaved and paired: the speed-up with a t interval.

    python benchmarks/ab_sampling.py --rounds 12          # MDM and MLD, 64 rows x 196 frames, 8 DDIM steps

pytest-benchmark (benchmarks/test_bench_sampling.py) times each variant's rounds one after the
other, so on a shared VM a slow minute lands on one variant only; medians of the same pair
moved between 1.01x and 1.25x over three runs on 2026-12-02. Here each round runs both loops
back to back (their order alternating), and the figure is the per-round ratio plain / fast:
its geometric mean with a 95% Student-t interval over the rounds (on log ratios, sample std),
plus each variant's median and minimum; ``--json`` stores every round's values. Both loops draw the same samples (checked once here,
and by tests/test_fast_sampling.py). Nothing is asserted; the table goes into
docs/performance.md with this command.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from sopo_ext.checkpoint import load_checkpoint
from sopo_ext.methods import _no_transformer_fastpath
from sopo_ext.metrics import mean_ci
from sopo_ext.sampling import diffusion_from_meta


def paired_rounds(loop, rounds: int):
    """{fast: [seconds]} and the per-round ratios plain / fast, alternating the order."""
    times = {False: [], True: []}
    ratios = []
    for r in range(rounds):
        this = {}
        for fast in ((False, True) if r % 2 == 0 else (True, False)):
            t0 = time.perf_counter()
            loop(fast)
            this[fast] = time.perf_counter() - t0
            times[fast].append(this[fast])
        ratios.append(this[False] / this[True])
    return times, ratios


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backbones", nargs="+", default=["mdm", "mld"], choices=("mdm", "mld"))
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--frames", type=int, default=196)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--guidance", type=float, default=1.0)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None, help="also write every round's times and ratio here")
    args = ap.parse_args(argv)
    if args.rounds < 2:
        ap.error("--rounds must be at least 2 (an interval needs two ratios)")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# plain vs fast sampling loop, {args.rows} rows x {args.frames} frames, {args.steps} DDIM "
          f"steps, CFG {args.guidance}, {args.rounds} interleaved rounds, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, MHA fast path off (the trainer's CPU sampling)\n")
    print("| backbone | plain median | plain min | fast median | fast min | plain / fast: geometric "
          "mean [95% t interval] | per-round range |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    record = {"command": "python benchmarks/ab_sampling.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "torch": torch.__version__, "threads": torch.get_num_threads(), "backbones": {}}
    for kind in args.backbones:
        c = load_checkpoint(kind, kind)
        model, diffusion = c.model.eval(), diffusion_from_meta(c.meta)
        g = torch.Generator().manual_seed(0)
        text = torch.nn.functional.normalize(torch.randn(args.rows, 384, generator=g), dim=-1)
        lengths = torch.randint(max(1, args.frames // 5), args.frames + 1, (args.rows,), generator=g)
        mask = torch.arange(args.frames)[None, :] < lengths[:, None]
        shape = (args.rows, args.frames, model.config.nfeats) if kind == "mdm" else \
            (args.rows,) + tuple(model.latent_shape)

        def loop(fast):
            return diffusion.sample(model, shape, text, mask if kind == "mdm" else None,
                                    steps=args.steps, guidance_scale=args.guidance, fast=fast,
                                    generator=torch.Generator().manual_seed(1))
        with _no_transformer_fastpath():
            a, b = loop(False), loop(True)  # also the warm-up
            scale = a.abs().max().item()
            if not (a - b).abs().max().item() <= 1e-5 * scale:
                raise SystemExit(f"{kind}: the fast loop's samples differ from the plain loop's")
            times, ratios = paired_rounds(loop, args.rounds)
        logs = [math.log(r) for r in ratios]
        m, h = mean_ci(logs)
        print(f"| {kind} | {statistics.median(times[False]) * 1e3:.0f} ms | {min(times[False]) * 1e3:.0f} ms "
              f"| {statistics.median(times[True]) * 1e3:.0f} ms | {min(times[True]) * 1e3:.0f} ms "
              f"| {math.exp(m):.3f}x [{math.exp(m - h):.3f}, {math.exp(m + h):.3f}] "
              f"| {min(ratios):.2f}-{max(ratios):.2f}x |")
        record["backbones"][kind] = {"plain_s": times[False], "fast_s": times[True], "ratios": ratios,
                                     "geometric_mean": math.exp(m), "ci95": [math.exp(m - h), math.exp(m + h)]}
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
