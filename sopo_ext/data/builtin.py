"""The built-in dataset, generated once on first use and cached on disk.

``builtin_root()`` returns a directory in the HumanML3D layout holding the procedural dataset of
:mod:`sopo_ext.data.synthetic` (3000 motions, seed 0 by default, about 500 MB, about 15 s to
make). It lives under ``$SOPO_EXT_CACHE`` (default ``~/.cache/sopo_ext``) as
``builtin-n<num>-s<seed>-v<VERSION>``. Generation goes to a temporary sibling that is renamed
into place, under a file lock, so concurrent processes (torchrun ranks, parallel test workers)
generate it once and never see half a dataset.

The bundled checkpoints were trained on ``builtin_root()`` with the defaults: a different
``num`` or ``seed`` gives other data (and another Mean/Std), which loading those checkpoints
detects (:func:`sopo_ext.checkpoint.check_normalization`).
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Union

__all__ = ["cache_dir", "builtin_root", "resolve_data_root", "VERSION", "DEFAULT_NUM", "DEFAULT_SEED"]

#: bump when synthetic.py changes its output, so stale caches are not reused.
VERSION = 1
DEFAULT_NUM = 3000
DEFAULT_SEED = 0
_DONE = ".complete.json"


def cache_dir() -> Path:
    """``$SOPO_EXT_CACHE`` or ``~/.cache/sopo_ext`` (created)."""
    p = Path(os.environ.get("SOPO_EXT_CACHE") or Path.home() / ".cache" / "sopo_ext")
    p.mkdir(parents=True, exist_ok=True)
    return p


def builtin_root(num: int = DEFAULT_NUM, seed: int = DEFAULT_SEED, root: Optional[Union[str, Path]] = None,
                 verbose: bool = True) -> Path:
    """The cached built-in dataset directory, generated if missing."""
    from . import synthetic

    base = Path(root) if root is not None else cache_dir()
    base.mkdir(parents=True, exist_ok=True)
    final = base / f"builtin-n{int(num)}-s{int(seed)}-v{VERSION}"
    if (final / _DONE).is_file():
        return final
    with open(base / f".{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one generator; the others wait and then reuse it
        if (final / _DONE).is_file():
            return final
        if final.exists():  # an incomplete leftover from an older layout or a manual copy
            shutil.rmtree(final)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=base))
        try:
            if verbose:
                print(f"sopo_ext: generating the built-in dataset ({num} motions, seed {seed}) "
                      f"into {final} (once, ~15 s)", flush=True)
            summary = synthetic.generate(tmp, num=num, seed=seed)
            (tmp / _DONE).write_text(json.dumps(summary, indent=1), encoding="utf-8")
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def resolve_data_root(data: Optional[Union[str, Path]]) -> Path:
    """``None`` / ``"builtin"`` -> :func:`builtin_root`; anything else must be a HumanML3D-layout
    directory (checked by the loader)."""
    if data is None or str(data) == "builtin":
        return builtin_root()
    p = Path(data).expanduser()
    if not p.is_dir():
        raise FileNotFoundError(f"data directory not found: {p} (pass a HumanML3D-layout "
                                f"directory or 'builtin')")
    return p
