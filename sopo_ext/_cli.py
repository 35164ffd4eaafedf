"""What the package's command-line entry points (pretrain, train, evaluate, study) share."""
from __future__ import annotations

import shlex
import sys
from typing import Callable, Iterable, Sequence

import torch

#: flags that only say how a run was interrupted or continued, not what it computes.
_INTERRUPTION_FLAGS = {"--resume": 0, "--stop-after": 1}  # flag -> number of values it takes


def run_cli(parse_args: Callable, run: Callable, argv=None) -> int:
    """Parse, run, and turn the errors a user can fix (missing files, bad values, a diverged
    loss) into one line on stderr and exit code 2 instead of a traceback."""
    args = parse_args(argv)
    try:
        run(args)
    except (FileNotFoundError, ValueError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def resolve_device(arg: str, local_rank: int = 0) -> torch.device:
    """``auto``: this process's GPU when there is one, else the CPU; otherwise ``arg`` as given."""
    if arg == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    return torch.device(arg)


def command_line(prog: str, argv: Sequence[str]) -> str:
    """The command that makes a run's result: ``argv`` without --resume / --stop-after N, so an
    interrupted and resumed run records the same command as an uninterrupted one. Arguments are
    shell-quoted, so the recorded command can be pasted back into a shell."""
    out, skip = [], 0
    for a in argv:
        if skip:
            skip -= 1
        elif a in _INTERRUPTION_FLAGS:
            skip = _INTERRUPTION_FLAGS[a]
        else:
            out.append(a)
    return " ".join(["python -m", prog, *(shlex.quote(a) for a in out)])


def fingerprint(args, free: Iterable[str]) -> dict:
    """The settings that determine a run's result (all parsed flags but the ``free`` ones)."""
    free = set(free)
    return {k: v for k, v in vars(args).items() if k not in free}


def check_resume_settings(saved: dict, args, free: Iterable[str]) -> None:
    """ValueError naming every flag whose value differs from the interrupted run's."""
    diff = {k: (saved.get(k), v) for k, v in fingerprint(args, free).items() if saved.get(k) != v}
    if diff:
        raise ValueError("--resume with different settings than the interrupted run: " +
                         ", ".join(f"--{k.replace('_', '-')} was {a!r}, now {b!r}"
                                   for k, (a, b) in sorted(diff.items())))
