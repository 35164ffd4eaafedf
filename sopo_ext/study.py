"""The alignment study: ``python -m sopo_ext.study``.

Fine-tunes the base model with every method (and SoPo with a tau sweep and K in {2, 4}), for
several seeds, with the same budget of steps, evaluates every result with
``python -m sopo_ext.evaluate`` (and the base model too), and writes a table of mean +/- 95% CI
over seeds plus a plot of alignment (R-precision top1) against FID:

    python -m sopo_ext.study --out docs/study --jobs 2            # everything, 2 runs at a time
    python -m sopo_ext.study --backbones mdm --methods sopo dsopo --seeds 0 1 2 --taus --ks
    python -m sopo_ext.study --out steps --backbones mdm --methods sopo --taus --ks --sampling 2 4 8 16
    python -m sopo_ext.study --out rewards --methods sopo --taus --ks --saturating --rewards reward-detail oracle

Each run lives in ``<out>/runs/<backbone>/<label>-s<seed>/``; a run whose ``eval.json`` exists is
not repeated, so an interrupted study continues where it stopped. ``--dry-run`` lists the runs;
``--report-only`` writes the table from the runs done so far and starts none (safe to call while
another process is still running the study).
Results: ``<out>/results.json``, ``<out>/results.md``, ``<out>/alignment_vs_fid.png`` (and with
``--sampling``, ``<out>/sampling_tradeoff.png``).
"""
from __future__ import annotations

import argparse
import csv
import json
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from . import metrics
from ._cli import command_line, run_cli
from .checkpoint import atomic_write_text
from .methods import METHODS
from .study_curve import CURVE_METRICS, curve_table, plot_curve, read_curve

__all__ = ["main", "parse_args", "run", "plan"]

COLUMNS = ["R-precision top1", "R-precision top3", "MM-Dist", "FID", "Diversity",
           "detail accuracy", "judged details", "reward", "valuable in training", "train s",
           "train cpu s"]


@dataclass
class Run:
    backbone: str
    label: str  # "base", a method, "sopo tau=0.50", "sopo K=2", "sopo reward=oracle"
    seed: int
    train_args: List[str] = field(default_factory=list)  # empty: evaluate the base model

    def dir(self, out: Path) -> Path:
        safe = self.label.replace(" ", "_").replace("=", "").replace("/", "_").replace(":", "_")
        return out / "runs" / self.backbone / f"{safe}-s{self.seed}"


def plan(args) -> List[Run]:
    runs: List[Run] = []
    for bb in args.backbones:
        for s in args.seeds:
            runs.append(Run(bb, "base", s))
            for m in args.methods:
                runs.append(Run(bb, m, s, ["--method", m]))
            for tau in args.taus:
                if abs(tau - 0.45) > 1e-9:  # 0.45 is the sopo run itself
                    runs.append(Run(bb, f"sopo tau={tau:.2f}", s, ["--method", "sopo", "--tau", str(tau)]))
            for k in args.ks:
                if k != 4:
                    runs.append(Run(bb, f"sopo K={k}", s, ["--method", "sopo", "--k", str(k)]))
            for n in args.sampling:
                if n != 8:  # 8 is the sopo run itself
                    runs.append(Run(bb, f"sopo steps={n}", s, ["--method", "sopo", "--sampling-steps", str(n)]))
            for m in args.saturating:  # the same method in the sigmoid's saturating regime
                runs.append(Run(bb, f"{m} scale=dpo", s, ["--method", m, "--scale-regime", "diffusion-dpo"]))
            for reward in args.rewards:  # trained with another reward, evaluated as every run
                for m in args.reward_methods:
                    runs.append(Run(bb, f"{m} reward={reward}", s, ["--method", m, "--reward", reward]))
                for m in args.reward_saturating:
                    runs.append(Run(bb, f"{m} scale=dpo reward={reward}", s,
                                    ["--method", m, "--scale-regime", "diffusion-dpo", "--reward", reward]))
    return runs


def _execute(run: Run, args, out: Path) -> Optional[str]:
    d = run.dir(out)
    if (d / "eval.json").is_file():
        return None
    d.mkdir(parents=True, exist_ok=True)
    py = [sys.executable, "-m"]
    common = ["--data", args.data, "--threads", str(args.threads)]
    ckpt = args.base.get(run.backbone) or run.backbone
    if run.train_args:
        cmd = py + ["sopo_ext.train", *run.train_args, "--backbone", run.backbone, "--base", ckpt,
                    "--seed", str(run.seed), "--steps", str(args.steps), "--out", str(d / "train"),
                    "--evaluator", "none", "--no-animation", "--no-progress", "--resume",
                    *common, *(["--reward", args.reward] if args.reward and "--reward" not in run.train_args else []),
                    *(_curve_flags(args) if args.curve_every else []), *shlex.split(args.train_extra)]
        with open(d / "train.log", "a") as log:
            rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)
        if rc != 0:
            return f"{run.backbone}/{run.label}/s{run.seed}: training failed (exit {rc}, see {d / 'train.log'})"
        ckpt = str(d / "train" / "model")
    cmd = py + ["sopo_ext.evaluate", "--ckpt", ckpt, "--seed", str(run.seed), "--replications", "1",
                "--json", str(d / "eval.json"), *common,
                *(["--evaluator", args.evaluator] if args.evaluator else []),
                *(["--reward", args.reward] if args.reward else []),
                *[f for name in args.eval_rewards for f in ("--also-reward", name)], *shlex.split(args.eval_extra)]
    with open(d / "eval.log", "a") as log:
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)
    if rc != 0:
        return f"{run.backbone}/{run.label}/s{run.seed}: evaluation failed (exit {rc}, see {d / 'eval.log'})"
    return None


def _curve_flags(args) -> List[str]:
    """The trainer's flags of a training-length curve: evaluate with the study's evaluator every
    --curve-every steps at the evaluation's 50 DDIM steps (the step-0 row is the base model)."""
    return ["--eval-every", str(args.curve_every), "--evaluator", args.evaluator or "evaluator",
            "--eval-steps", "50"]


def _summaries(runs: List[Run], out: Path) -> List[Tuple[Run, Dict[str, float]]]:
    """[(run, {metric: value})] for every run with an eval.json: its evaluation means plus
    ``train s`` (training wall time) and ``train cpu s`` (CPU time) from its summary.json and
    ``valuable in training`` (the fraction of captions whose worst sample scored below tau, so
    that the unpreferred term was used, over all steps) from its metrics.csv."""
    found: List[Tuple[Run, Dict[str, float]]] = []
    for r in runs:
        f = r.dir(out) / "eval.json"
        if not f.is_file():
            continue
        vals = {k: v["mean"] for k, v in json.loads(f.read_text())["summary"].items()}
        train_summary = r.dir(out) / "train" / "summary.json"
        ts = json.loads(train_summary.read_text()) if train_summary.is_file() else None
        if ts is not None and not _timed_after_resume_only(r.dir(out), ts):
            vals["train s"] = float(ts["train seconds"])
            if "train cpu seconds" in ts:  # older trainers recorded wall time only
                vals["train cpu s"] = float(ts["train cpu seconds"])
        valuable = _mean_column(r.dir(out) / "train" / "metrics.csv", "valuable")
        if valuable is not None:
            vals["valuable in training"] = valuable
        found.append((r, vals))
    return found


def _curves(runs: List[Run], out: Path) -> Dict[str, Dict[int, Dict[str, float]]]:
    """{"<backbone>/<label> s<seed>": {step: {metric: value}}} of the trained runs that logged
    evaluations during training (``--curve-every``)."""
    found = {}
    for r in runs:
        c = read_curve(r.dir(out) / "train" / "metrics.csv") if r.train_args else {}
        if len(c) > 1:
            found[f"{r.backbone}/{r.label} s{r.seed}"] = c
    return found


def _timed_after_resume_only(run_dir: Path, train_summary: dict) -> bool:
    """True for a run that was resumed by a trainer older than the one that carries its clock
    across resumes: its summary.json times only the part after the last resume, so its time is
    left out of the table rather than reported too small."""
    log = run_dir / "train.log"
    resumed = log.is_file() and "[train] resumed from" in log.read_text(errors="replace")
    return resumed and "resumed at steps" not in train_summary


def _mean_column(path: Path, column: str) -> Optional[float]:
    """Mean of a column of the trainer's metrics.csv over its steps (None: no file, no column, or
    a method that does not log it, such as SFT's empty cells)."""
    if not path.is_file():
        return None
    with open(path, newline="") as f:
        vals = [float(row[column]) for row in csv.DictReader(f) if row.get(column) not in (None, "")]
    return float(np.mean(vals)) if vals else None


def _ci(groups: Dict[str, Dict[str, List[Tuple[int, float]]]]) -> Dict[str, Dict[str, dict]]:
    """{name: {metric: {"mean", "ci95", "n", "values", "seeds"}}}: Student-t intervals over seeds
    with the per-seed values and their seeds beside them (``ci95`` None with one seed)."""
    return {name: {k: {**metrics.ci_record([v for _, v in sv]), "seeds": [s for s, _ in sv]}
                   for k, sv in g.items()} for name, g in groups.items()}


def aggregate(found: List[Tuple[Run, Dict[str, float]]]) -> Dict[str, Dict[str, dict]]:
    """{backbone/label: {metric: {"mean", "ci95", "n"}}} over seeds (missing runs are skipped).
    ``train s`` is the training wall time of the run and ``train cpu s`` its CPU time (from its
    summary.json): runs go two at a time on a shared machine, so compare them between runs of
    one study, not with benchmarks; the CPU time does not count waiting for a core."""
    groups: Dict[str, Dict[str, List[Tuple[int, float]]]] = {}
    for r, vals in found:
        g = groups.setdefault(f"{r.backbone}/{r.label}", {})
        for k, v in vals.items():
            g.setdefault(k, []).append((r.seed, v))
    return _ci(groups)


PAIRED = ["R-precision top1", "FID", "detail accuracy", "judged details", "reward"]


def paired_vs(found: List[Tuple[Run, Dict[str, float]]], control: str = "base") -> Dict[str, Dict[str, dict]]:
    """{backbone/label: {metric: t interval of (run - control)}} over the seeds where both exist,
    with the per-seed differences. Against ``base``: the evaluation of a run and of the base model
    at the same seed draws the same captions and noise, so the difference cancels much of the
    evaluation's own sampling noise, which on a 300-caption test split is as large as the effects
    (FID of the base moves 3.6 -> 4.2 between evaluation seeds). Against ``sft``: the same
    training batches and evaluation draw too, so the difference is the preference term's."""
    ctrl = {(r.backbone, r.seed): v for r, v in found if r.label == control}
    groups: Dict[str, Dict[str, List[Tuple[int, float]]]] = {}
    for r, vals in found:
        b = ctrl.get((r.backbone, r.seed))
        if r.label in ("base", control) or b is None:
            continue
        g = groups.setdefault(f"{r.backbone}/{r.label}", {})
        for k in PAIRED:
            if k in vals and k in b:
                g.setdefault(k, []).append((r.seed, vals[k] - b[k]))
    return _ci(groups)


def paired_vs_base(found: List[Tuple[Run, Dict[str, float]]]) -> Dict[str, Dict[str, dict]]:
    return paired_vs(found, "base")


def _cell(rec: dict, fmt: str = "{:.3f}", signed: bool = False) -> str:
    return metrics.format_ci(rec["mean"], rec.get("ci95"), fmt, signed)


def paired_table(deltas: Dict[str, Dict[str, dict]], control: str = "base") -> str:
    lines = [f"| run - {control} | seeds | " + " | ".join(f"Δ {c}" for c in PAIRED) + " |",
             "|" + "---|" * (len(PAIRED) + 2)]
    for name, res in deltas.items():
        n = max((v["n"] for v in res.values()), default=0)
        cells = [_cell(res[c], signed=True) if c in res else "" for c in PAIRED]
        lines.append(f"| {name} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


#: metrics where a smaller value is the better one (the rest: larger is better)
LOWER_IS_BETTER = {"FID", "MM-Dist"}


def per_seed_table(deltas: Dict[str, Dict[str, dict]], metric: str) -> str:
    """Each seed's paired difference of one metric, columns labelled by seed, and how many seeds
    moved the better way ("3 of 3 seeds improved" is a statement about seeds, not a confidence
    interval: with 3 seeds a two-sided sign test cannot reach p < 0.25)."""
    seeds = sorted({s for res in deltas.values() if metric in res
                    for s in (res[metric].get("seeds") or [])})
    better = "lower" if metric in LOWER_IS_BETTER else "higher"
    lines = [f"| Δ {metric} | " + " | ".join(f"seed {s}" for s in seeds) + f" | seeds better ({better}) |",
             "|" + "---|" * (len(seeds) + 2)]
    for name, res in deltas.items():
        rec = res.get(metric) or {}
        vals = dict(zip(rec.get("seeds") or [], rec.get("values") or []))
        if not vals:
            continue
        cells = [f"{vals[s]:+.3f}" if s in vals else "" for s in seeds]
        n_better = sum((v < 0) if metric in LOWER_IS_BETTER else (v > 0) for v in vals.values())
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {n_better} of {len(vals)} |")
    return "\n".join(lines)


def _columns(results: Dict[str, Dict[str, dict]]) -> List[str]:
    """COLUMNS, then the detail accuracy of every reward the runs were also scored with
    (``--eval-rewards``: how well that reward sees the details of each policy's samples)."""
    extra = sorted({k for res in results.values() for k in res
                    if k.startswith("reward detail accuracy [")})
    return COLUMNS + extra


def table(results: Dict[str, Dict[str, dict]]) -> str:
    cols = _columns(results)
    head = "| run | seeds | " + " | ".join(cols) + " |"
    lines = [head, "|" + "---|" * (len(cols) + 2)]
    for name, res in results.items():
        n = max((v["n"] for v in res.values()), default=0)
        cells = [_cell(res[c], "{:.0f}" if c.startswith("train") else "{:.3f}")
                 + (f" (n={res[c]['n']})" if res[c]["n"] < n else "") if c in res else ""
                 for c in cols]
        lines.append(f"| {name} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _err(rec: dict) -> float:
    """The error bar of a cell: its CI half width, 0 when it has none (one seed)."""
    return rec["ci95"] if rec.get("ci95") is not None else 0.0


def _collapsed(results: Dict[str, Dict[str, dict]], name: str) -> bool:
    """A run whose FID is over 3x its backbone's base model: listed beside the plot, not drawn,
    so it does not squash every other point into a corner."""
    base = results.get(name.split("/", 1)[0] + "/base", {}).get("FID")
    fid = results.get(name, {}).get("FID")
    return base is not None and fid is not None and fid["mean"] > 3 * base["mean"]


def plot(results: Dict[str, Dict[str, dict]], path: Path,
         deltas: Optional[Dict[str, Dict[str, dict]]] = None) -> Optional[str]:
    """R-precision top1 against FID per run (mean and CI over seeds); with ``deltas``, a second
    panel of the same against the base model at the same seed (paired differences)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    panels = [(results, "FID (lower is better)", "R-precision top1 (higher is better)",
               "alignment vs quality, mean and 95% CI over seeds")]
    if deltas:
        panels.append((deltas, "Δ FID vs base at the same seed (lower is better)",
                       "Δ R-precision top1 vs base (higher is better)",
                       "paired with the base model, mean and 95% CI"))
    colors = {name: f"C{i % 10}" for i, name in enumerate(results)}
    markers = {name: "osD^v"[(i // 10) % 5] for i, name in enumerate(results)}
    off = [n for n in results if _collapsed(results, n)]
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 5.5), squeeze=False)
    for ax, (res_all, xlabel, ylabel, title) in zip(axes[0], panels):
        for name, res in res_all.items():
            if "FID" not in res or "R-precision top1" not in res or name in off:
                continue
            x, y = res["FID"], res["R-precision top1"]
            ax.errorbar(x["mean"], y["mean"], xerr=_err(x), yerr=_err(y), fmt=markers[name],
                        color=colors[name], capsize=3, label=name)
        if res_all is deltas:
            ax.axhline(0, color="grey", lw=0.8)
            ax.axvline(0, color="grey", lw=0.8)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
    handles, labels = axes[0][0].get_legend_handles_labels()
    note = "not drawn (FID > 3x base): " + ", ".join(
        f"{n} (FID {results[n]['FID']['mean']:.1f})" for n in off) if off else None
    fig.legend(handles, labels, loc="lower center", ncol=5, fontsize=7, frameon=False,
               title=note, title_fontsize=7)
    fig.tight_layout(rect=(0, 0.05 + 0.03 * ((len(labels) + 4) // 5), 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def _sampling_points(results: Dict[str, Dict[str, dict]]) -> Dict[str, List[tuple]]:
    """{backbone: [(online sampling steps, result)]} for sopo and its ``steps=N`` runs."""
    pts: Dict[str, List[tuple]] = {}
    for name, res in results.items():
        bb, label = name.split("/", 1)
        if label == "sopo":
            pts.setdefault(bb, []).append((8, res))
        elif label.startswith("sopo steps="):
            pts.setdefault(bb, []).append((int(label.split("=")[1]), res))
    return {bb: sorted(p, key=lambda x: x[0]) for bb, p in pts.items() if len(p) > 1}


def plot_sampling(results: Dict[str, Dict[str, dict]], path: Path) -> Optional[str]:
    """Alignment and training time against the number of online sampling steps (``--sampling``)."""
    pts = _sampling_points(results)
    if not pts:
        return None
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.8))
    for bb, p in pts.items():
        steps = [n for n, _ in p]
        time_key = "train cpu s" if all("train cpu s" in r for _, r in p) else "train s"
        for ax, key in zip(axes, ("R-precision top1", "FID", "judged details", time_key)):
            vals = [r[key] for _, r in p if key in r]
            if len(vals) != len(steps):
                continue
            ax.errorbar(steps, [v["mean"] for v in vals], yerr=[_err(v) for v in vals], fmt="o-",
                        capsize=3, label=bb)
            ax.set_xlabel("online sampling steps")
            ax.set_title({"train s": "training wall time (s)",
                          "train cpu s": "training CPU time (s)"}.get(key, key))
            ax.set_xscale("log", base=2)
            ax.set_xticks(steps, [str(n) for n in steps])
            ax.minorticks_off()
    axes[0].legend()
    fig.suptitle("SoPo: fewer online sampling steps, mean and 95% CI over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def run(args) -> Dict[str, Dict[str, dict]]:
    out = Path(args.out)
    if args.retabulate:
        print(retabulate(Path(args.retabulate), out))
        return {}
    runs = plan(args)
    if args.dry_run:
        for r in runs:
            print(f"{r.backbone:4s} {r.label:20s} seed {r.seed}  -> {r.dir(out)}")
        return {}
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    todo = [r for r in runs if not (r.dir(out) / "eval.json").is_file()]
    if args.report_only:
        if len(todo) == len(runs):
            raise ValueError(f"--report-only: none of the {len(runs)} planned runs has an eval.json "
                             f"under {out / 'runs'} (wrong --out, or a different grid?)")
        print(f"[study] {len(runs)} runs, {len(runs) - len(todo)} done; reporting those, "
              f"{len(todo)} not run", flush=True)
        errors = []
    else:
        print(f"[study] {len(runs)} runs, {len(runs) - len(todo)} already done, {args.jobs} at a time",
              flush=True)
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            errors = [e for e in pool.map(lambda r: _execute(r, args, out), todo) if e]
    found = _summaries(runs, out)  # every run's files are read once, for both tables
    results = aggregate(found)
    deltas = paired_vs_base(found)
    vs_sft = paired_vs(found, "sft")
    missing = [str(r.dir(out)) for r in todo] if args.report_only else []
    doc = {"command": command_line("sopo_ext.study", args.argv), "steps": args.steps,
           "seeds": args.seeds,
           "statistics": "mean and 95% Student-t interval over seeds (t_{n-1} s / sqrt(n), sample "
                         "std); 'values' are the per-seed numbers; ci95 null when n = 1",
           "results": results, "paired vs base": deltas, "paired vs sft": vs_sft,
           "errors": errors, "missing runs": missing, "seconds": round(time.perf_counter() - t0, 1)}
    curves = _curves(runs, out) if args.curve_every else {}
    if curves:
        doc["curves"] = {k: {str(st): v for st, v in c.items()} for k, c in curves.items()}
    name = args.results_name
    atomic_write_text(out / f"{name}.json", json.dumps(doc, indent=1) + "\n")
    # the runs are made by the command without --report-only; say which call tabulated them
    made_by = command_line("sopo_ext.study", [a for a in args.argv if a != "--report-only"])
    n_cmp = sum(len(v) for v in deltas.values())
    md = (f"Made by `{made_by}`" + (" (tabulated with `--report-only`)" if args.report_only else "")
          + f": mean ± 95% Student-t interval over seeds (t_(n-1) s / sqrt(n), sample std; "
          f"'n/a' with one seed), {args.steps} training steps per run; per-seed values in "
          f"{name}.json."
          + (f" **Partial: {len(missing)} of {len(runs)} runs not done yet.**" if missing else "")
          + "\n\n" + table(results) + "\n\n"
          "Paired by seed: each run minus the base model evaluated at the same seed (same captions "
          f"and noise), mean ± 95% t interval over seeds. {n_cmp} intervals in this table: at 95% "
          "each, about one in 20 excludes 0 by chance alone.\n\n" + paired_table(deltas) + "\n\n"
          + "Per seed, run minus base:\n\n" + per_seed_table(deltas, "R-precision top1") + "\n\n"
          + per_seed_table(deltas, "FID") + "\n"
          + (("\nPaired with SFT at the same seed (same training batches and evaluation draw: the "
              "difference is the preference term's):\n\n" + paired_table(vs_sft, "sft") + "\n")
             if vs_sft else ""))
    if curves:
        md += (f"\nTraining-length curve: every run evaluated every {args.curve_every} steps by the "
               "trainer (the same test captions and noise at every step; step 0 is the base model; "
               "one seed, so no intervals; '- sft' columns are the paired difference at the same "
               "step):\n\n" + "\n\n".join(curve_table(curves, m, "sft") for m in CURVE_METRICS) + "\n")
        plot_curve(curves, out / f"{name}_curve.png")
    suffix = "" if name == "results" else "_" + name
    atomic_write_text(out / f"{name}.md", md)
    png = plot(results, out / f"alignment_vs_fid{suffix}.png", deltas)
    plot_sampling(results, out / f"sampling_tradeoff{suffix}.png")
    print(table(results))
    if errors:
        raise ValueError("some runs failed:\n" + "\n".join(errors))
    print(f"[study] results: {out / (name + '.md')}" + (f", {png}" if png else ""))
    return results


#: labels of results files written before a method was renamed
LEGACY_LABELS = {"diffusion-dpo": "modipo"}


def retabulate_legacy(doc: dict) -> dict:
    """A results.json written before the t intervals (``ci95`` = 1.96 x population std / sqrt(n),
    no per-seed values) with every interval recomputed exactly as the Student-t interval
    (:func:`sopo_ext.metrics.t_from_z_interval`), the old one kept as ``ci95 (z)``, and renamed
    methods under their current names. Files with per-seed values are returned unchanged."""
    def fix_name(name: str) -> str:
        bb, _, label = name.partition("/")
        head, sep, tail = label.partition(" ")
        return f"{bb}/{LEGACY_LABELS.get(head, head)}{sep}{tail}"

    def fix_cell(c: dict) -> dict:
        if "values" in c:
            return c
        return {"mean": c["mean"], "ci95": (None if c["n"] < 2 else
                                            metrics.t_from_z_interval(c["ci95"], c["n"])),
                "n": c["n"], "values": None, "ci95 (z)": c["ci95"]}

    out = dict(doc)
    for section in ("results", "paired vs base"):
        if section in doc:
            out[section] = {fix_name(name): {k: fix_cell(c) for k, c in cells.items()}
                            for name, cells in doc[section].items()}
    out["statistics"] = ("re-tabulated: mean and 95% Student-t interval over seeds, recomputed "
                         "exactly from the stored 1.96 x population-std interval (kept as 'ci95 (z)'); "
                         "per-seed values were not stored by this study")
    return out


def retabulate(path: Path, out: Path) -> str:
    """``--retabulate FILE``: rewrite a legacy results.json / results.md pair (and the plot) with
    t intervals into ``out``."""
    raw = json.loads(Path(path).read_text())
    if any("values" in c for cells in raw.get("results", {}).values() for c in cells.values()):
        raise ValueError(f"{path} already has per-seed values and t intervals: re-tabulate it with "
                         f"--report-only from its runs instead")
    if "results" not in raw:
        raise ValueError(f"{path} is not a results.json of python -m sopo_ext.study (no 'results')")
    doc = retabulate_legacy(raw)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "results.json", json.dumps(doc, indent=1) + "\n")
    deltas = doc.get("paired vs base", {})
    n_cmp = sum(len(v) for v in deltas.values())
    md = (f"Runs made by `{doc.get('command', '(not recorded)').replace(' --report-only', '')}`, "
          f"{doc.get('steps', '?')} training "
          "steps per run; re-tabulated by `python -m sopo_ext.study --retabulate` with the 95% "
          "Student-t interval over seeds (t_(n-1) s / sqrt(n), sample std), recomputed exactly from "
          "the 1.96 x population-std interval first published (x2.69 for 3 seeds). Per-seed values "
          "were not stored by this study. `modipo` is the row first published as `diffusion-dpo`."
          "\n\n" + table(doc["results"]) + "\n\n"
          "Paired by seed: each run minus the base model evaluated at the same seed, mean ± 95% t "
          f"interval over seeds. {n_cmp} intervals in this table: at 95% each, about one in 20 "
          "excludes 0 by chance alone.\n\n" + paired_table(deltas) + "\n")
    atomic_write_text(out / "results.md", md)
    plot(doc["results"], out / "alignment_vs_fid.png", deltas)
    plot_sampling(doc["results"], out / "sampling_tradeoff.png")
    return md


def parse_args(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="python -m sopo_ext.study", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    a = ap.add_argument
    a("--out", default="docs/study")
    a("--backbones", nargs="+", default=["mdm", "mld"], choices=("mdm", "mld"))
    a("--methods", nargs="*", default=["sopo", "dsopo", "usopo", "sopo-no-vu", "modipo",
                                       "online-dpo", "sft"], choices=sorted(METHODS))
    a("--saturating", nargs="*", default=["sopo", "modipo"], choices=sorted(METHODS),
      help="these methods again with --scale-regime diffusion-dpo (scale 2500: the sigmoid's "
           "saturating regime), labelled '<method> scale=dpo'")
    a("--rewards", nargs="*", default=[],
      help="--reward-methods again, each trained with each of these rewards (a bundled name such as "
           "reward-detail, a checkpoint, or 'oracle', the diagnostic), labelled '<method> "
           "reward=<name>'; every run is still evaluated with --reward, so the rows compare")
    a("--reward-methods", nargs="*", default=["sopo"], choices=sorted(METHODS))
    a("--reward-saturating", nargs="*", default=[], choices=sorted(METHODS),
      help="these methods with each of --rewards at the saturating scale, labelled "
           "'<method> scale=dpo reward=<name>'")
    a("--eval-rewards", nargs="*", default=None,
      help="score every run's evaluation samples with these reward models too (their detail "
           "accuracy becomes a column); default: the reward models among --rewards")
    a("--curve-every", type=int, default=0,
      help="every trained run also evaluates every N steps (a training-length curve; use with a "
           "long --steps); the curve is tabulated and plotted beside the results")
    a("--results-name", default="results",
      help="stem of the results files, so that several grids can share one --out (and its runs: "
           "a run done by one grid is not repeated by another)")
    a("--seeds", nargs="+", type=int, default=[0, 1, 2])
    a("--taus", nargs="*", type=float, default=[0.40, 0.45, 0.50, 0.55, 0.60])
    a("--ks", nargs="*", type=int, default=[2, 4])
    a("--sampling", nargs="*", type=int, default=[8],
      help="SoPo with these numbers of online sampling steps (the cost / alignment trade-off)")
    a("--steps", type=int, default=200, help="the same training budget for every run")
    a("--jobs", type=int, default=2, help="runs at a time")
    a("--threads", type=int, default=1, help="torch threads per run")
    a("--data", default="builtin")
    a("--mdm-base", default=None)
    a("--mld-base", default=None)
    a("--reward", default=None)
    a("--evaluator", default=None)
    a("--train-extra", default="", help="more flags for every python -m sopo_ext.train")
    a("--eval-extra", default="", help="more flags for every python -m sopo_ext.evaluate")
    a("--dry-run", action="store_true")
    a("--report-only", action="store_true",
      help="aggregate the runs done so far into the table and plots; start no run")
    a("--retabulate", default=None, metavar="RESULTS_JSON",
      help="rewrite a results.json of an older study (z intervals, no per-seed values) with "
           "Student-t intervals into --out; starts no run")
    args = ap.parse_args(argv)
    if args.jobs < 1 or args.threads < 1 or args.steps < 1:
        raise SystemExit("error: --jobs, --threads and --steps must be >= 1")
    if args.curve_every < 0:
        raise SystemExit("error: --curve-every must be >= 0")
    if not args.results_name or "/" in args.results_name:
        raise SystemExit("error: --results-name must be a plain file stem")
    if args.eval_rewards is None:
        args.eval_rewards = [r for r in args.rewards if not r.startswith("oracle")]
    if any(r.startswith("oracle") for r in args.eval_rewards):
        raise SystemExit("error: --eval-rewards takes reward models; the oracle's view is 'judged details'")
    if any(n < 1 for n in args.sampling):
        raise SystemExit("error: --sampling values must be >= 1")
    args.base = {"mdm": args.mdm_base, "mld": args.mld_base}
    args.argv = argv
    return args


def main(argv=None) -> int:
    return run_cli(parse_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
