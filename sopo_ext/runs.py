"""A run directory, as ``train`` and ``pretrain`` (and ``SoPoTrainer``) keep it: the CSV log
that survives a kill and a resume, and the resume check (the interrupted run's training state,
refused when the settings that change the result differ).
"""
from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Iterable, Mapping, Optional

from . import checkpoint as ckpt_io

__all__ = ["CsvLog", "fingerprint", "check_resume_settings", "resume_state"]


class CsvLog:
    """Append-only CSV whose columns may grow (rewritten when a new column appears).

    ``resume_step``: keep the rows of an existing file up to that step (a resumed run drops the
    rows past its checkpoint, which the resumed run writes again); ``None`` or a new file starts
    empty. ``flush`` replaces the file atomically, so a kill never leaves half a log.
    """

    def __init__(self, path: Path, resume_step: Optional[int] = None):
        self.path, self.rows, self.cols = Path(path), [], ["step"]
        if resume_step is not None and self.path.is_file():
            with open(self.path, newline="") as fh:
                for r in csv.DictReader(fh):
                    if int(r["step"]) <= resume_step:
                        self.rows.append(r)
            for r in self.rows:
                self.cols += [k for k in r if k not in self.cols]

    def add(self, row: dict) -> None:
        row = {k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()}
        self.rows.append(row)
        self.cols += [k for k in row if k not in self.cols]

    def flush(self) -> None:
        tmp = self.path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=self.cols)
            w.writeheader()
            w.writerows(self.rows)
        os.replace(tmp, self.path)


def fingerprint(settings, free: Iterable[str]) -> dict:
    """The settings that determine a run's result: all of ``settings`` (an argparse namespace or
    a mapping) but the ``free`` ones."""
    free = set(free)
    items = settings.items() if isinstance(settings, Mapping) else vars(settings).items()
    return {k: v for k, v in items if k not in free}


def check_resume_settings(saved: dict, current: dict) -> None:
    """ValueError naming every setting whose value differs from the interrupted run's."""
    diff = {k: (saved.get(k), v) for k, v in current.items() if saved.get(k) != v}
    if diff:
        raise ValueError("--resume with different settings than the interrupted run: " +
                         ", ".join(f"--{k.replace('_', '-')} was {a!r}, now {b!r}"
                                   for k, (a, b) in sorted(diff.items())))


def resume_state(last: Path, current: dict, kind: Optional[str] = None, *,
                 step_version: Optional[int] = None, who: str = "train"):
    """The checkpoint and training state in ``last`` to resume from, or ``(None, None)`` when
    nothing was saved yet. Raises when the state is missing, was written by another step version
    (``step_version``: resuming would mix two different steps) or with other settings."""
    ckpt_io.recover(last)
    if not (last / ckpt_io.CONFIG).is_file():
        print(f"[{who}] --resume: no checkpoint in {last} yet, starting from scratch")
        return None, None
    c = ckpt_io.load_checkpoint(last, kind)
    state = c.train_state()
    if state is None:
        raise ckpt_io.CheckpointError(f"{last} has no training state to resume from")
    if step_version is not None and state["args"].get("step_version") != step_version:
        raise ValueError(
            f"{last} was written by an older trainer (step version "
            f"{state['args'].get('step_version', 1)}, now {step_version}: SFT's forward, the "
            f"padding of x_t and the scale regimes changed), so resuming it would mix two "
            f"different steps; start a new run with another --out")
    check_resume_settings(state["args"], current)
    return c, state
