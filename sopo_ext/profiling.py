"""Named phases of a training step: NVTX ranges in the ``sopo_ext`` domain (so an Nsight
Systems or ``nsys``-style profile shows where the time goes) plus wall-clock totals per phase.

    with phase("sampling"):
        ...
    phase_times()   # {"sampling": seconds, ...} accumulated since reset_phase_times()

The wall-clock totals are host time: on a GPU they include only what the host waits for (no
synchronization is added, which would slow the step); on the CPU they are the real cost.
"""
from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from typing import Dict, Iterator

__all__ = ["phase", "phase_times", "reset_phase_times", "DOMAIN"]

DOMAIN = "sopo_ext"
_TIMES: Dict[str, float] = defaultdict(float)

try:  # the nvtx package is a no-op unless a profiler is attached
    import nvtx as _nvtx
except ImportError:  # pragma: no cover - nvtx is a dependency, this only guards odd installs
    _nvtx = None


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    rng = _nvtx.annotate(name, domain=DOMAIN) if _nvtx is not None else contextlib.nullcontext()
    t0 = time.perf_counter()
    with rng:
        try:
            yield
        finally:
            _TIMES[name] += time.perf_counter() - t0


def phase_times() -> Dict[str, float]:
    return dict(_TIMES)


def reset_phase_times() -> None:
    _TIMES.clear()
