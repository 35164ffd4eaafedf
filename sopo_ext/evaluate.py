"""The standard text-to-motion evaluation of a backbone: ``python -m sopo_ext.evaluate``.

    python -m sopo_ext.evaluate --ckpt mdm                          # the bundled MDM
    python -m sopo_ext.evaluate --ckpt runs/train-sopo-mdm/model    # a fine-tuned one
    python -m sopo_ext.evaluate --ckpt runs/mine/model --data /data/HumanML3D --replications 20

The protocol of T2M / MDM (``eval_humanml.py``): on the test split, generate one motion per
caption at the real motion's length, embed texts, generated and real motions with the
evaluator, and compute R-precision top-1/2/3 within batches of 32, MM-Dist, FID against the real
motions, and Diversity over 300 pairs; repeat for several replications (each with its own
caption choice and sampling noise) and report the mean and the 95% Student-t confidence
interval over replications (t_{n-1} s / sqrt(n), sample std; "n/a" with one replication; the
original prints 1.96 std / sqrt(n) with the population std, too narrow for few replications). MultiModality generates ``--mm-repeats`` motions for each of
``--mm-captions`` captions and averages the distance of 10 random pairs per caption. On top:
the mean reward of the reward model, the fraction of samples with reward >= tau, and the
detail accuracy (:func:`sopo_ext.evaluation.detail_accuracy`), and on the built-in dataset the
``judged`` accuracies: hand / leg / direction, heading and count checked by geometry against the
ground truth (:func:`sopo_ext.evaluation.judged_accuracy`); and the reward model's own grip on
details, how often it scores a motion higher with its caption than with a near miss and by how
much (:func:`sopo_ext.evaluation.reward_detail_accuracy`, on generated and on real motions).
``--also-reward NAME`` scores the same generated motions with more reward models (their mean
reward and detail accuracy / margin, keys suffixed `` [NAME]``): how well the reward a policy was
trained with sees the details of that policy's samples. Output: a table on stdout and, with
``--json``, a JSON file.

Defaults are sized for a CPU (3 replications, 50 DDIM steps); the original uses 20
replications of 1000 samples.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch

from . import checkpoint as ckpt_io
from . import metrics
from .models import family
from ._cli import command_line, resolve_device, run_cli
from .data.batches import MotionTextBatches
from .data.builtin import resolve_data_root
from .data.humanml3d import HumanML3D
from .data import judge
from .rewards import is_oracle
from .evaluation import (generate_split, generation_metrics, judged_accuracy, reward_detail_accuracy,
                         reward_of_split)
from .sampling import diffusion_from_meta

__all__ = ["main", "parse_args", "run", "format_table"]

T2M_PREFIX = "t2m-official:"


def _multimodality(model, diffusion, evaluator, batches, args, device) -> float:
    """--mm-captions captions, --mm-repeats generations each, 10 random pairs per caption."""
    caps: List[dict] = []
    for b in batches:
        for i in range(len(b["captions"])):
            if len(caps) < args.mm_captions:
                caps.append({k: v[i:i + 1] for k, v in b.items()})
    embs = []
    for j, one in enumerate(caps):
        L = int(one["lengths"][0])
        rep = {"text_emb": one["text_emb"].repeat(args.mm_repeats, 1),
               "mask": one["mask"][:, :L].repeat(args.mm_repeats, 1),
               "tokens": one["tokens"] * args.mm_repeats}
        gen = generate_split(model, diffusion, [rep], steps=args.steps, guidance_scale=args.guidance,
                             seed=args.seed + 10_000 + j)
        with torch.no_grad():
            embs.append(evaluator.encode_motion(gen[0].to(device), rep["mask"].to(device)).float().cpu())
    return metrics.multimodality(torch.stack(embs), n_pairs=min(10, args.mm_repeats), seed=args.seed)


def format_table(summary: Dict[str, Dict[str, float]]) -> str:
    w = max([28, *map(len, summary)])
    lines = [f"{'metric':{w}s} {'mean':>10s} {'95% CI':>9s}"]
    for k, v in summary.items():
        ci = v.get("ci95")
        lines.append(f"{k:{w}s} {v['mean']:10.4f} " + (f"{ci:9.4f}" if ci is not None and math.isfinite(ci)
                                                      else f"{'n/a':>9s}"))
    return "\n".join(lines)


def run(args) -> Dict[str, Dict[str, float]]:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    root = resolve_data_root(args.data)
    split = HumanML3D(root, args.split, seed=args.seed, max_len=args.max_len)
    what = f"the dataset at {root}"
    from .official.release import is_mdm_release, load_mdm_release
    if is_mdm_release(args.ckpt):  # a released MDM save directory (or its model*.pt)
        base = load_mdm_release(args.ckpt, mask_frames=args.mask_frames)
    elif str(args.ckpt).endswith(".ckpt"):  # the released MLD's Lightning checkpoint
        from .official.mld_backbone import load_official_mld
        base = load_official_mld(args.ckpt)
    else:
        base = ckpt_io.load_checkpoint(args.ckpt)
        if args.mask_frames is not None:
            if base.kind != "mdm_official":
                raise ValueError(f"--mask-frames is a released MDM's switch; {args.ckpt} is a {base.kind!r} model")
            base.model.config = base.config = dataclasses.replace(base.config, mask_frames=args.mask_frames)
    if family(base) not in ("mdm", "mld"):
        raise ValueError(f"--ckpt must be an 'mdm' or 'mld' backbone, got a {base.kind!r} checkpoint")
    ckpt_io.check_normalization(base, split.mean, split.std_safe, what=what)
    if args.evaluator.startswith(T2M_PREFIX):  # the standard T2M evaluator, in its release's files
        from .official.t2m import load_t2m_evaluator
        t2m = load_t2m_evaluator(args.evaluator[len(T2M_PREFIX):]).set_data_normalization(split.mean, split.std_safe)
        ev = ckpt_io.Checkpoint(model=t2m, kind=t2m.kind, config=None, meta={}, path=Path(t2m.source))
    else:
        ev = ckpt_io.load_checkpoint(args.evaluator, "evaluator")
        ckpt_io.check_normalization(ev, split.mean, split.std_safe, what=what)
    rw = None
    if is_oracle(args.reward):
        raise ValueError("--reward oracle is a training-time diagnostic (python -m sopo_ext.train "
                         "--reward oracle); the evaluation reports what it measures directly as "
                         "'judged details' on the built-in data. Evaluate with a reward model "
                         "(the default, a bundled name or a checkpoint) or 'none'")
    from .official.tmr import is_official_tmr, official_reward_checkpoint

    def load_reward(spec):
        if is_official_tmr(spec):  # the released TMR, in its own normalization
            return official_reward_checkpoint(spec, split.mean, split.std_safe)
        c = ckpt_io.load_checkpoint(spec, "tmr")
        ckpt_io.check_normalization(c, split.mean, split.std_safe, what=what)
        return c
    if args.reward != "none":
        rw = load_reward(args.reward)
    also = []  # (name, checkpoint) of every --also-reward
    for name in args.also_reward:
        if is_oracle(name) or name == "none":
            raise ValueError(f"--also-reward {name!r}: give a reward model (a bundled name or a "
                             "checkpoint); the oracle's view is 'judged details'")
        also.append((name, load_reward(name)))
    from .official.text_side import prepare_backbone_text, text_encoders
    base_name = base.meta.get("text_encoder")
    # the reward's own text encoder when it is not the backbone's (a released MDM reads CLIP)
    enc, own = text_encoders(base_name or args.text_encoder, base_name,
                             [c.meta.get("text_encoder") for c in [rw] + [c for _, c in also] if c is not None],
                             clip_weights=args.clip_weights, clip_precision=args.clip_precision,
                             distilbert=args.distilbert)
    reward_enc = own if own is not None else enc  # (a text encoder with an empty cache is falsy)
    prepare_backbone_text(base.model, enc, args.distilbert, device)
    if args.guidance is None:  # the backbone's own: 7.5 for the released MLD, else MDM's 2.5
        args.guidance = float(base.meta.get("guidance", 2.5))
    batcher = MotionTextBatches(split, enc, batch_size=32, seed=args.seed, drop_last=False,
                                reward_text_encoder=own)
    model, diffusion = base.model.to(device).eval(), diffusion_from_meta(base.meta)
    evaluator = ev.model.to(device).eval()
    reward = rw.model.to(device).eval() if rw else None
    also_models = [(name, c.model.to(device).eval()) for name, c in also]

    # the built-in dataset knows what every motion does: judge the details by geometry too
    specs = judge.load_specs(root) if (Path(root) / "specs.json").is_file() else None
    per_rep: Dict[str, List[float]] = {}
    t0 = time.perf_counter()
    for r in range(args.replications):
        batches = batcher.eval_batches(32, epoch=r)  # each replication draws its own captions
        if args.samples and args.samples < len(split):
            if args.random_subset:  # the original: the first N of a shuffled loader, anew each time
                pick = np.random.default_rng([args.seed, r, 11]).permutation(len(split))[:args.samples]
                batches = [batcher.collate(sorted(pick[i:i + 32].tolist()), epoch=r)
                           for i in range(0, len(pick), 32)]
            else:
                batches = batches[:max(1, -(-args.samples // 32))]
        gen = generate_split(model, diffusion, batches, steps=args.steps, guidance_scale=args.guidance,
                             seed=args.seed + r)
        m = generation_metrics(gen, batches, evaluator, reward, tau=args.tau, seed=args.seed + r)
        if specs is not None:
            m.update(judged_accuracy(gen, batches, specs, split.mean, split.std_safe))
        if reward is not None:
            m.update(reward_detail_accuracy(reward, batches, reward_enc, gen))
            m.update({f"real {k}": v for k, v in reward_detail_accuracy(reward, batches, reward_enc).items()})
        for name, extra in also_models:
            m[f"reward [{name}]"] = float(np.nanmean(reward_of_split(extra, batches, gen)))
            m.update({f"{k} [{name}]": v for k, v in reward_detail_accuracy(extra, batches, reward_enc, gen).items()})
        for k, v in m.items():
            per_rep.setdefault(k, []).append(v)
        print(f"[evaluate] replication {r + 1}/{args.replications}: " + ", ".join(
            f"{k}={m[k]:.4f}" for k in ("R-precision top1", "MM-Dist", "FID") if k in m), flush=True)
    if args.mm_captions and args.mm_repeats >= 2:
        mm = [_multimodality(model, diffusion, evaluator, batcher.eval_batches(32, epoch=r), args, device)
              for r in range(args.replications)]
        per_rep["MultiModality"] = mm
    # Student-t interval over replications (none with one replication: "n/a" / null)
    summary = {k: metrics.ci_record(v) for k, v in per_rep.items()}
    print(f"\n[evaluate] {args.ckpt} on {root} ({args.split}), {args.replications} replications, "
          f"{time.perf_counter() - t0:.0f} s")
    print(format_table(summary))
    if args.json:
        doc = {"ckpt": str(base.path), "data": str(root), "split": args.split,
               "replications": args.replications, "steps": args.steps, "guidance": args.guidance,
               "seed": args.seed, "summary": summary, "per_replication": per_rep,
               "command": command_line("sopo_ext.evaluate", args.argv)}
        ckpt_io.atomic_write_text(Path(args.json), json.dumps(doc, indent=1) + "\n")
    return summary


def parse_args(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="python -m sopo_ext.evaluate", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    a = ap.add_argument
    a("--ckpt", default="mdm", help="backbone checkpoint directory or bundled name (mdm, mld)")
    a("--data", default="builtin")
    a("--split", default="test")
    a("--evaluator", default="evaluator", help="evaluator checkpoint (default: bundled), or "
      "t2m-official:DIR for the standard T2M evaluator from its released files (DIR: MDM's repository "
      "root after prepare/download_t2m_evaluators.sh and download_glove.sh); with it the defaults "
      "become the original protocol's: 20 replications of 1000 random samples, MultiModality 100 x 30")
    a("--reward", default="reward", help="reward checkpoint (default: bundled; 'none' skips), or "
      "tmr-official:DIR for the released TMR (its run directory, models/tmr_humanml3d_guoh3dfeats)")
    a("--also-reward", action="append", default=[], metavar="NAME",
      help="also score the generated motions with this reward model (repeatable): its mean reward "
           "and detail accuracy / margin, keys suffixed ' [NAME]'")
    a("--text-encoder", default="minilm")
    a("--distilbert", default="distilbert-base-uncased", help="--reward tmr-official:DIR: the DistilBERT "
      "its text side reads (a Hugging Face name or a local copy)")
    a("--clip-precision", default="fp32", choices=("fp32", "fp16"),
      help="a released MDM: CLIP's matrices in fp16 (the release's numerics on its GPU) or fp32")
    a("--clip-weights", default=None, help="a released MDM's CLIP ViT-B/32 weights, a local file "
      "(default: downloaded from the Hugging Face hub on first use)")
    a("--mask-frames", default=None, action=argparse.BooleanOptionalAction,
      help="a released MDM: mask padded frames in attention (default: as its args.json says)")
    a("--replications", type=int, default=None,
      help="default 3; 20 with the T2M evaluator, as the original")
    a("--samples", type=int, default=None, help="N samples of the split per replication: the first N "
      "(default: all), or N random ones per replication with --random-subset (the T2M evaluator's "
      "default: 1000 random)")
    a("--random-subset", default=None, action=argparse.BooleanOptionalAction,
      help="with --samples: a new random subset per replication, as the original's shuffled loader")
    a("--steps", type=int, default=50, help="DDIM steps")
    a("--guidance", type=float, default=None, help="classifier-free guidance scale (default: the "
      "backbone's own, 2.5; the released MLD's 7.5)")
    a("--mm-captions", type=int, default=None, help="MultiModality captions (default 30; the original "
      "and the T2M evaluator's default: 100; 0 skips)")
    a("--mm-repeats", type=int, default=None, help="generations per MultiModality caption (default 10; "
      "the original and the T2M evaluator's default: 30)")
    a("--tau", type=float, default=0.45)
    a("--max-len", type=int, default=196)
    a("--seed", type=int, default=0)
    a("--json", default=None, help="write the results here")
    a("--device", default="auto")
    a("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    # the protocol's sizes: sized for a CPU by default, the original's with the T2M evaluator
    official = args.evaluator.startswith(T2M_PREFIX)
    for k, ours, original in (("replications", 3, 20), ("mm_captions", 30, 100), ("mm_repeats", 10, 30),
                              ("samples", None, 1000), ("random_subset", False, True)):
        if getattr(args, k) is None:
            setattr(args, k, original if official else ours)
    for k in ("replications", "steps"):
        if getattr(args, k) < 1:
            raise SystemExit(f"error: --{k} must be >= 1, got {getattr(args, k)}")
    if args.samples is not None and args.samples < 32:
        raise SystemExit("error: --samples must be >= 32 (R-precision uses batches of 32)")
    args.argv = argv
    return args


def main(argv=None) -> int:
    return run_cli(parse_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
