"""The shared shape of the package's command-line entry points."""
from __future__ import annotations

import sys
from typing import Callable


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
