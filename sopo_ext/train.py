"""SoPo fine-tuning: ``python -m sopo_ext.train``.

With no arguments it fine-tunes the bundled MDM-style model on the built-in dataset with SoPo,
judged by the bundled TMR-style reward model, on the CPU, evaluates before and after with the
bundled evaluator, and prints what changed. Everything else is a flag (``--help``):

    python -m sopo_ext.train                                   # SoPo, MDM, built-in data
    python -m sopo_ext.train --backbone mld --method usopo     # another backbone / method
    python -m sopo_ext.train --preset official-loss            # the official release's loss and sampler
    python -m sopo_ext.train --preset diffusion-dpo            # Wallace et al. on offline pairs
    python -m sopo_ext.train --out runs/sopo --resume          # continue after a kill
    torchrun --nproc_per_node=2 -m sopo_ext.train --steps 50   # data-parallel (gloo on CPU)

The flags are the fields of ``sopo_ext.SoPoConfig`` and the run is ``sopo_ext.SoPoTrainer``: the same
run from Python is ``SoPoTrainer(SoPoConfig(...)).train()``.

Output in ``--out`` (default ``runs/train-<method>-<backbone>``): ``metrics.csv`` (one row per
step, evaluation rows added), TensorBoard events in ``tb/``, ``last/`` (checkpoint + training
state for ``--resume``), ``model/`` (the fine-tuned checkpoint, safetensors + config),
``summary.json`` and ``compare_*.gif`` (base vs fine-tuned on a few captions).
"""
from __future__ import annotations

import argparse
import sys

from ._cli import add_dataclass_flags, command_line, run_cli
from .config import (PRESETS, RENAMED_PRESETS, RESUME_FREE, STEP_VERSION, ConfigError,  # noqa: F401
                     SoPoConfig)
from .methods import RENAMED_METHODS
from .trainer import SoPoTrainer

__all__ = ["main", "build_parser", "parse_args", "run", "PRESETS", "STEP_VERSION"]

def build_parser() -> argparse.ArgumentParser:
    """One flag per ``SoPoConfig`` field, its help the field's documentation."""
    ap = argparse.ArgumentParser(prog="python -m sopo_ext.train", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    return add_dataclass_flags(ap, SoPoConfig,
                               renamed={"method": RENAMED_METHODS, "preset": RENAMED_PRESETS})


def parse_args(argv=None) -> SoPoConfig:
    """The flags as a validated ``SoPoConfig``; a bad value exits with a message naming its flag.
    ``config.argv`` keeps the command line (recorded with the run)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    ns = build_parser().parse_args(argv)
    try:
        config = SoPoConfig(**vars(ns))
    except ConfigError as e:
        raise SystemExit(f"error: --{e.field.replace('_', '-')} {e.message}") from None
    config.argv = argv
    return config


def run(config: SoPoConfig) -> dict:
    """Runs the trainer; returns its summary."""
    argv = getattr(config, "argv", None)
    command = command_line("sopo_ext.train", argv) if argv is not None else None
    return SoPoTrainer(config, command=command).train()


def main(argv=None) -> int:
    return run_cli(parse_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
