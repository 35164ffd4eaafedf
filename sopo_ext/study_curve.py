"""The training-length curve of the study (``python -m sopo_ext.study --curve-every N``).

A run trained with ``--eval-every N`` evaluates the policy on the same test captions and the
same sampling noise at step 0 (the base model), N, 2N, ... and at the end; its ``metrics.csv``
holds those rows as ``eval <metric>`` columns. This module reads them back, tabulates them per
run and against a control trained the same way (SoPo minus SFT at the same step and seed: the
same evaluation draw, so the difference is the training's), and plots them: does the effect grow,
saturate or collapse with training?
"""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Dict, List, Optional

__all__ = ["CURVE_METRICS", "read_curve", "curve_table", "plot_curve"]

#: the metrics the curve follows (the trainer's evaluation has no MultiModality)
CURVE_METRICS = ["R-precision top1", "MM-Dist", "FID", "judged details", "detail accuracy", "reward"]
#: scored by the run's own reward model (the trainer's evaluation uses the training reward), so
#: not paired across runs trained with different rewards
OWN_REWARD = {"reward"}


def read_curve(metrics_csv: Path) -> Dict[int, Dict[str, float]]:
    """{step: {metric: value}} of the evaluation rows of a trainer's metrics.csv ({} if none)."""
    out: Dict[int, Dict[str, float]] = {}
    if not Path(metrics_csv).is_file():
        return out
    with open(metrics_csv, newline="") as fh:
        for row in csv.DictReader(fh):
            vals = {}
            for k in CURVE_METRICS:
                v = row.get(f"eval {k}")
                if v not in (None, ""):
                    vals[k] = float(v)
            if vals:
                out.setdefault(int(float(row["step"])), {}).update(vals)
    return dict(sorted(out.items()))


def _fmt(v: Optional[float], signed: bool = False) -> str:
    if v is None or not math.isfinite(v):
        return ""
    return f"{v:+.3f}" if signed else f"{v:.3f}"


def curve_table(curves: Dict[str, Dict[int, Dict[str, float]]], metric: str,
                control: Optional[str] = None) -> str:
    """Markdown: one row per evaluated step, one column per run, plus run minus control for
    each run whose control ran at the same backbone and seed. Curves are keyed
    ``"<backbone>/<label> s<seed>"``; ``control`` is a label (``"sft"``)."""
    names = list(curves)
    steps = sorted({s for c in curves.values() for s in c})
    pairs = []
    if control is not None and metric not in OWN_REWARD:
        for n in names:
            bb, rest = n.split("/", 1)
            seed = rest.rsplit(" ", 1)[1]
            ctrl = f"{bb}/{control} {seed}"
            if n != ctrl and ctrl in curves:
                pairs.append((n, ctrl))
    head = ["step", *names, *[f"{a} - {b}" for a, b in pairs]]
    title = f"{metric} (each run's own training reward: not comparable across rewards)" \
        if metric in OWN_REWARD else metric
    lines = [f"{title}:", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in steps:
        cells = [_fmt(curves[n].get(s, {}).get(metric)) for n in names]
        for a, b in pairs:
            va, vb = curves[a].get(s, {}).get(metric), curves[b].get(s, {}).get(metric)
            cells.append(_fmt(va - vb if va is not None and vb is not None else None, signed=True))
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_curve(curves: Dict[str, Dict[int, Dict[str, float]]], path: Path,
               metrics: List[str] = ("R-precision top1", "FID", "judged details", "reward")) -> Optional[str]:
    """One panel per metric, one line per run, against the training step."""
    if not curves:
        return None
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.8))
    for ax, key in zip(axes, metrics):
        for name, c in curves.items():
            pts = [(s, v[key]) for s, v in c.items() if key in v]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", ms=3, label=name)
        ax.set_xlabel("training step")
        ax.set_title(key + (" (lower is better)" if key in ("FID", "MM-Dist") else "")
                     + (" (own reward)" if key in OWN_REWARD else ""), fontsize=10)
    axes[0].legend(fontsize=7)
    fig.suptitle("training-length curve (one seed; same evaluation captions and noise at every step)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)
