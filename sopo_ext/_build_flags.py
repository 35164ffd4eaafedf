"""How the operator library is compiled: one place for setup.py (ahead of time) and
sopo_ext._library (on first import). Standard library only: setup.py loads this file by path,
before torch or the package can be imported.
"""
from __future__ import annotations

import glob
import os
import shutil
import sysconfig
from typing import List, Optional

# -fopenmp: at::parallel_for's OpenMP backend is inline in the ATen headers, so without it the
# CPU kernels would silently run on one thread.
# -ffp-contract=off: no FMA contraction, so the AVX-512 / AVX2 / baseline clones of the kernels
# (csrc/cpu/rows.h) round identically and results do not depend on the CPU model.
CXX_FLAGS = ["-O3", "-fopenmp", "-ffp-contract=off", "-Wall", "-Wextra", "-Wno-unused-parameter"]
LD_FLAGS = ["-fopenmp"]
#: GPU architectures of an ahead-of-time build when TORCH_CUDA_ARCH_LIST is not set: machine code
#: for sm_80 (which also runs on sm_86 / sm_89: A10, A40, L4, L40, RTX 30xx / 40xx) and sm_90
#: (H100, H200), plus compute_90 PTX that the driver compiles at first launch on newer GPUs
#: (Blackwell: B200 sm_100, RTX 50xx sm_120). Older GPUs (V100, T4) are not supported.
#: A build on first import compiles for the GPU it runs on instead.
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"


def flag(name: str) -> bool:
    """An environment switch: 1 / true / yes / on."""
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def nvcc_flags(strict: bool) -> List[str]:
    """strict (SOPO_EXT_STRICT_CUDA=1, CI): ptxas spills and every CUDA warning are errors."""
    flags = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
    if strict:
        flags += ["-Xptxas", "-v,--warn-on-spills,--warning-as-error", "-Werror", "all-warnings"]
    return flags


def resolve_cuda_home() -> Optional[str]:
    """A directory holding both bin/nvcc and include/cuda_runtime.h, or None.

    torch guesses CUDA_HOME from `which nvcc`, which on some machines is a wrapper script in
    /usr/local/bin, so it guesses /usr/local and the build fails on missing headers. Resolve it
    before torch.utils.cpp_extension is imported (it reads CUDA_HOME at import time).
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates += sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for c in candidates:
        if c and os.path.isfile(os.path.join(c, "bin", "nvcc")) and os.path.isfile(
            os.path.join(c, "include", "cuda_runtime.h")
        ):
            return c
    return None


def nvidia_include_dirs(torch_site: Optional[str] = None) -> List[str]:
    """cuBLAS / cuSPARSE / ... headers ship inside the nvidia-* wheels torch depends on: look
    beside torch (``torch_site``, the directory holding the torch package) and in this
    interpreter's site-packages."""
    found = set()
    for site in {torch_site, sysconfig.get_paths()["purelib"]} - {None}:
        found.update(glob.glob(os.path.join(site, "nvidia", "*", "include"))
                     + glob.glob(os.path.join(site, "nvidia", "cu*", "*", "include")))
    return sorted(found)


def sources(csrc: str, with_cuda: bool) -> List[str]:
    """The translation units under csrc/: the schemas, the CPU kernels and (with_cuda) the CUDA ones."""
    found = sorted(glob.glob(os.path.join(csrc, "*.cpp")) + glob.glob(os.path.join(csrc, "cpu", "*.cpp")))
    if with_cuda:
        found += sorted(glob.glob(os.path.join(csrc, "cuda", "*.cu")))
    return found


def source_files(csrc: str) -> List[str]:
    """Every file a build reads (sources and headers), relative to csrc: what a wheel ships."""
    out = []
    for pattern in ("*.cpp", "*.h", "*.cu", "*.cuh"):
        out += glob.glob(os.path.join(csrc, "**", pattern), recursive=True)
    return sorted(os.path.relpath(p, csrc) for p in out)
