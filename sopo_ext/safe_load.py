"""Loading ``torch.save`` files without letting them run code.

A ``.pt`` / ``.tar`` / ``.ckpt`` file is a pickle, and a pickle can name any Python callable to
be called while it loads (``os.system`` included). Released checkpoints are downloaded from the
internet and resume files are shared between machines, so every ``torch.load`` in this package
goes through :func:`load_weights`: ``torch.load(weights_only=True)``, whose unpickler only builds
tensors, containers and numbers, plus the few named globals a caller allow-lists for a known
file format (``allow``). Anything else is refused with :class:`UnsafeFileError`, which says which
file and which global, instead of torch's generic message.
"""
from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any, Iterable, Union

import numpy as np
import torch

__all__ = ["UnsafeFileError", "load_weights", "NUMPY_ARRAYS"]

#: what a plain numpy array needs (numpy's RNG state in resume files written before the
#: plain-values format, and the numpy scalars / arrays some released checkpoints carry):
#: ndarray reconstruction and dtypes, no callable that runs anything else
NUMPY_ARRAYS = (np._core.multiarray._reconstruct, np.ndarray, np.dtype,
                type(np.dtype(np.uint32)), type(np.dtype(np.float32)), type(np.dtype(np.float64)),
                type(np.dtype(np.int64)), np._core.multiarray.scalar)


class UnsafeFileError(ValueError):
    """A file that ``torch.load(weights_only=True)`` refuses: it asks to build (or call) a
    Python object outside the allowed set, which a plain weights file never needs."""


def load_weights(path: Union[str, Path], map_location: Any = "cpu", allow: Iterable = (),
                 what: str = "file") -> Any:
    """``torch.load(path, weights_only=True)`` with the globals in ``allow`` permitted too.

    Raises FileNotFoundError naming ``what`` when the file is missing, and
    :class:`UnsafeFileError` when the file needs anything else: it is never executed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        with torch.serialization.safe_globals(list(allow)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e)
        # torch words it "Unsupported global: GLOBAL x.y ..." or "unsupported GLOBAL x.y whose
        # module x is blocked" depending on the module
        found = re.search(r"GLOBAL ([\w.<>]+)", msg)
        name = found.group(1) if found else "an object outside the allowed set"
        raise UnsafeFileError(
            f"refused to load {what} {path}: it asks to build or call {name}, which a weights file "
            f"does not need, and loading it could run code (torch.load with weights_only=True "
            f"refused it). If you made this file yourself and trust it, re-save its tensors "
            f"(torch.save(dict_of_tensors) or safetensors); sopo_ext does not unpickle arbitrary "
            f"objects") from None
