"""What the package's command-line entry points (pretrain, train, evaluate, study) share."""
from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
import typing
from typing import Callable, Dict, Optional, Sequence

import torch

#: flags that only say how a run was interrupted or continued, not what it computes.
_INTERRUPTION_FLAGS = {"--resume": 0, "--stop-after": 1}  # flag -> number of values it takes


def run_cli(parse_args: Callable, run: Callable, argv=None) -> int:
    """Parse, run, and turn the errors a user can fix (missing files, bad values, a diverged
    loss) into one line on stderr and exit code 2 instead of a traceback."""
    args = parse_args(argv)
    try:
        run(args)
    except (FileNotFoundError, ValueError, FloatingPointError, ImportError) as e:
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


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def renamed_choice(renamed: Dict[str, str]):
    """argparse type: a name that was renamed is an error that says what it is called now."""
    def check(value: str) -> str:
        if value in renamed:
            raise argparse.ArgumentTypeError(renamed[value])
        return value
    check.__name__ = "name"
    return check


def _base_type(hint):
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def add_dataclass_flags(parser: argparse.ArgumentParser, cls, renamed: Optional[Dict[str, Dict[str, str]]] = None):
    """One flag per field of the dataclass ``cls`` (``sampling_steps`` -> ``--sampling-steps``),
    its help from the field's ``metadata["help"]``: the config class is the single source of the
    flags. A bool field that defaults to True becomes ``--no-<name>``; ``metadata["cli"]`` is
    "flag", "hidden" (no --help entry) or "none" (no flag)."""
    hints = typing.get_type_hints(cls)
    renamed = renamed or {}
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if "help" not in meta or meta.get("cli") == "none":
            continue
        kind = _base_type(hints[f.name])
        help_text = argparse.SUPPRESS if meta.get("cli") == "hidden" else meta["help"]
        if kind is bool:
            if f.default is None:  # three states: --x, --no-x, or neither (decided elsewhere)
                parser.add_argument(_flag(f.name), dest=f.name, default=None,
                                    action=argparse.BooleanOptionalAction, help=help_text)
            elif f.default:
                parser.add_argument("--no-" + f.name.replace("_", "-"), dest=f.name,
                                    action="store_false", help=help_text if help_text == argparse.SUPPRESS
                                    else f"do not: {help_text}")
            else:
                parser.add_argument(_flag(f.name), dest=f.name, action="store_true", help=help_text)
            continue
        if help_text is not argparse.SUPPRESS and f.default is not None:
            help_text += f" (default {f.default})"
        parser.add_argument(_flag(f.name), dest=f.name, default=f.default,
                            type=renamed_choice(renamed[f.name]) if f.name in renamed else kind,
                            choices=meta.get("choices"), help=help_text)
    return parser


def config_flags(config, reference, only: Optional[Sequence[str]] = None) -> list:
    """The flags that turn the dataclass ``reference`` into ``config`` (the fields that differ,
    among ``only`` when given)."""
    out = []
    for f in dataclasses.fields(config):
        if f.metadata.get("cli", "flag") != "flag" or "help" not in f.metadata or (only and f.name not in only):
            continue
        value, base = getattr(config, f.name), getattr(reference, f.name)
        if value == base:
            continue
        if isinstance(value, bool):
            out.append(_flag(f.name) if value else "--no-" + f.name.replace("_", "-"))
        else:
            out += [_flag(f.name), str(value)]
    return out
