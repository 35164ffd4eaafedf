"""The command a run records (summary.json, eval.json, results.md, gallery.md): without the
interruption flags, and shell-quoted so it can be pasted back."""
from __future__ import annotations

import shlex

from sopo_ext._cli import command_line


def test_recorded_command_round_trips_through_a_shell():
    argv = ["--base-label", "MLD base", "--train-extra", "--batch-size 4 --k 2", "--out", "runs/a b"]
    cmd = command_line("sopo_ext.gallery", argv)
    assert cmd.startswith("python -m sopo_ext.gallery ")
    assert shlex.split(cmd)[3:] == argv


def test_interruption_flags_are_left_out():
    cmd = command_line("sopo_ext.train", ["--steps", "10", "--resume", "--stop-after", "3", "--seed", "1"])
    assert cmd == "python -m sopo_ext.train --steps 10 --seed 1"
