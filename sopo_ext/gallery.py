"""Base vs fine-tuned pictures where the base model got a detail wrong: ``python -m sopo_ext.gallery``.

    python -m sopo_ext.gallery --tuned runs/sopo/model --out docs/gallery
    python -m sopo_ext.gallery --tuned runs/sopo/model --base mdm --n 6 --label SoPo --gif

On the test split of the built-in dataset, both models generate one motion per caption from the
same initial noise (DDIM, classifier-free guidance, as ``sopo_ext.evaluate``). Every caption that
states a hand, leg, direction or count is judged by geometry against the dataset's ground truth
(``sopo_ext.data.judge``, not the evaluator network). The tool writes

* ``gallery.md`` / ``gallery.json``: per detail kind, how often each model is right, how many the
  fine-tune fixed and how many it broke;
* ``<n>`` side-by-side key-frame strips (``.png``; ``--gif`` adds animations) for captions where
  the base model was wrong, taken in test-split order and spread over detail kinds, whether the
  fine-tune fixed them or not: the picture shows both outcomes.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List

import torch

from . import checkpoint as ckpt_io
from ._cli import command_line, resolve_device, run_cli
from .data.batches import MotionTextBatches
from .data.builtin import resolve_data_root
from .data.judge import load_specs
from .data.humanml3d import HumanML3D
from .evaluation import generate_split, judge_split
from .sampling import diffusion_from_meta

__all__ = ["main", "parse_args", "run", "tally", "pick"]


def tally(records: List[dict], base: str, tuned: str) -> Dict[str, Dict[str, int]]:
    """Per detail kind: judged, base right, tuned right, fixed (base wrong, tuned right), broken."""
    t: Dict[str, Dict[str, int]] = {}
    for r in records:
        for d, vb in r["verdicts"][base].items():
            vt = r["verdicts"][tuned][d]
            c = t.setdefault(d, dict(judged=0, base_right=0, tuned_right=0, fixed=0, broken=0))
            c["judged"] += 1
            c["base_right"] += vb["correct"]
            c["tuned_right"] += vt["correct"]
            c["fixed"] += (not vb["correct"]) and vt["correct"]
            c["broken"] += vb["correct"] and not vt["correct"]
    if t:
        t["all"] = {k: sum(c[k] for c in list(t.values())) for k in next(iter(t.values()))}
    return t


def pick(records: List[dict], base: str, n: int) -> List[dict]:
    """Up to ``n`` captions the base model got wrong, in split order, taking one per
    (detail kind, family) in turn so the picture covers hands, directions and counts.
    Nothing about the fine-tuned model enters the choice."""
    wrong = [r for r in records if any(not v["correct"] for v in r["verdicts"][base].values())]
    groups: Dict[tuple, List[dict]] = {}
    for r in wrong:
        kind = next(d for d, v in r["verdicts"][base].items() if not v["correct"])
        groups.setdefault((kind, r["family"]), []).append(r)
    order = sorted(groups, key=lambda k: (["side", "heading", "count"].index(k[0]), k[1]))
    chosen: List[dict] = []
    while len(chosen) < n and any(groups[k] for k in order):
        for k in order:
            if groups[k] and len(chosen) < n:
                chosen.append(groups[k].pop(0))
    return chosen


def _describe(verdict: dict) -> str:
    return ", ".join(f"{d} {v['measured']} ({'right' if v['correct'] else 'wrong'})"
                     for d, v in verdict.items())


def _markdown(doc: dict, base: str, tuned: str) -> str:
    lines = [f"# {tuned} vs {base}: details the base model got wrong", "",
             f"Made by `{doc['command']}`.", "",
             "Test split of the built-in dataset, one motion per caption from the same initial noise "
             f"for both models (DDIM {doc['steps']} steps, guidance {doc['guidance']}). Details are "
             "judged by geometry against the dataset's ground truth (`sopo_ext/data/judge.py`).", "",
             f"| detail | judged | {base} right | {tuned} right | fixed by {tuned} | broken by {tuned} |",
             "|---|---:|---:|---:|---:|---:|"]
    for d, c in doc["tally"].items():
        lines.append(f"| {d} | {c['judged']} | {c['base_right']} | {c['tuned_right']} | "
                     f"{c['fixed']} | {c['broken']} |")
    lines += ["", f"Captions where {base} was wrong, in test order, one per detail kind and family in "
              "turn (the fine-tuned model plays no part in the choice):", ""]
    for p in doc["pictures"]:
        want = ", ".join(f"{d} {v['expected']}" for d, v in p["verdicts"][base].items())
        lines += [f"## \"{p['caption']}\" (`{p['id']}`)", "",
                  f"Asked for: {want}. {base}: {_describe(p['verdicts'][base])}. "
                  f"{tuned}: {_describe(p['verdicts'][tuned])}.", "",
                  f"![{p['caption']}]({p['png']})", ""]
    return "\n".join(lines)


def run(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    root = resolve_data_root(args.data)
    specs = load_specs(root)
    split = HumanML3D(root, "test", seed=args.seed)
    what = f"the dataset at {root}"
    models = {}
    for name, path in ((args.base_label, args.base), (args.label, args.tuned)):
        ck = ckpt_io.load_checkpoint(path)
        if ck.kind not in ("mdm", "mld"):
            raise ValueError(f"{path}: needs an 'mdm' or 'mld' backbone, got a {ck.kind!r} checkpoint")
        ckpt_io.check_normalization(ck, split.mean, split.std_safe, what=what)
        models[name] = ck
    kinds = {ck.kind for ck in models.values()}
    if len(kinds) != 1:
        raise ValueError(f"--base and --tuned must be the same backbone kind, got {sorted(kinds)}")
    from .models.text import get_text_encoder
    enc = get_text_encoder(models[args.base_label].meta.get("text_encoder") or "minilm")
    batches = MotionTextBatches(split, enc, batch_size=32, seed=args.seed, drop_last=False).eval_batches(32)
    generated = {}
    for name, ck in models.items():
        model = ck.model.to(device).eval()
        # the same seed gives both models the same initial noise for every caption
        generated[name] = generate_split(model, diffusion_from_meta(ck.meta), batches, steps=args.steps,
                                         guidance_scale=args.guidance, seed=args.seed)
    records = judge_split(generated, batches, specs, split.mean, split.std_safe)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    chosen = pick(records, args.base_label, args.n)
    from . import viz
    pictures = []
    for j, r in enumerate(chosen):
        b, row = batches[r["batch"]], r["row"]
        L = int(b["lengths"][row])
        motions = [generated[name][r["batch"]][row, :L].numpy() for name in models]
        stem = f"{j:02d}_{r['family']}"
        viz.save_comparison(motions, list(models), str(out / f"{stem}.png"), caption=r["caption"],
                            gif=False, num_frames=args.frames, mean=split.mean, std=split.std_safe)
        if args.gif:
            viz.save_comparison(motions, list(models), str(out / f"{stem}.gif"), caption=r["caption"],
                                mean=split.mean, std=split.std_safe, stride=2, fps=10)
        pictures.append({**{k: r[k] for k in ("id", "caption", "family", "verdicts")}, "png": f"{stem}.png"})
    doc = {"command": command_line("sopo_ext.gallery", args.argv), "base": str(args.base),
           "tuned": str(args.tuned), "steps": args.steps, "guidance": args.guidance, "seed": args.seed,
           "tally": tally(records, args.base_label, args.label), "pictures": pictures}
    ckpt_io.atomic_write_text(out / "gallery.json", json.dumps(doc, indent=1) + "\n")
    ckpt_io.atomic_write_text(out / "gallery.md", _markdown(doc, args.base_label, args.label) + "\n")
    for d, c in doc["tally"].items():
        print(f"[gallery] {d:8s} judged {c['judged']:4d}  {args.base_label} right {c['base_right']:4d}  "
              f"{args.label} right {c['tuned_right']:4d}  fixed {c['fixed']:3d}  broken {c['broken']:3d}")
    print(f"[gallery] {len(pictures)} pictures in {out} (gallery.md)")
    return doc


def parse_args(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="python -m sopo_ext.gallery", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    a = ap.add_argument
    a("--tuned", required=True, help="the fine-tuned backbone checkpoint (e.g. RUN/model)")
    a("--base", default="mdm", help="the base backbone checkpoint or bundled name (default: mdm)")
    a("--label", default="SoPo", help="name of the fine-tuned model in pictures and tables")
    a("--base-label", default="base")
    a("--data", default="builtin", help="the built-in dataset (its specs.json is the ground truth)")
    a("--out", default="docs/gallery")
    a("--n", type=int, default=6, help="pictures to draw")
    a("--frames", type=int, default=6, help="key frames per strip")
    a("--gif", action="store_true", help="also write animated GIFs")
    a("--steps", type=int, default=50, help="DDIM steps")
    a("--guidance", type=float, default=2.5)
    a("--seed", type=int, default=0)
    a("--device", default="auto")
    a("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.n < 0 or args.steps < 1 or args.frames < 1:
        raise SystemExit("error: --n must be >= 0, --steps and --frames >= 1")
    if args.label == args.base_label:
        raise SystemExit("error: --label and --base-label must differ")
    args.argv = argv
    return args


def main(argv=None) -> int:
    return run_cli(parse_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
