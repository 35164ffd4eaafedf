"""Builds the sopo_ext._C extension: `pip install --no-build-isolation -e .` with torch installed.

A CUDAExtension is built when the installed torch is a CUDA build and nvcc is found (a GPU is
not needed to compile); otherwise, or with SOPO_EXT_FORCE_CPU=1, a CppExtension. Other switches:
  TORCH_CUDA_ARCH_LIST   GPU architectures (default "8.0;9.0": A100, H100)
  SOPO_EXT_STRICT_CUDA=1 ptxas spills and host/device warnings become build errors (CI sets it)
  MAX_JOBS               parallel compile jobs (ninja)
"""
import glob
import os
import shutil
import sys
import sysconfig

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _resolve_cuda_home():
    """A directory holding both bin/nvcc and include/cuda_runtime.h, or None.

    torch guesses CUDA_HOME from `which nvcc`, which on these machines is a wrapper script in
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


try:
    import torch  # noqa: F401
except ImportError:
    sys.exit(
        "sopo_ext needs PyTorch installed before it is built: pip install torch==2.14.1, then "
        "pip install --no-build-isolation -e ."
    )

CUDA_HOME = None if _flag("SOPO_EXT_FORCE_CPU") else _resolve_cuda_home()
if CUDA_HOME:
    os.environ["CUDA_HOME"] = CUDA_HOME
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")

from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

USE_CUDA = bool(CUDA_HOME) and torch.version.cuda is not None


def _nvidia_include_dirs():
    """cuBLAS / cuSPARSE / ... headers ship inside the nvidia-* wheels torch depends on."""
    site = sysconfig.get_paths()["purelib"]
    return sorted(
        glob.glob(os.path.join(site, "nvidia", "*", "include"))
        + glob.glob(os.path.join(site, "nvidia", "cu*", "*", "include"))
    )


def _extension():
    csrc = os.path.join(HERE, "csrc")
    sources = sorted(glob.glob(os.path.join(csrc, "*.cpp")) + glob.glob(os.path.join(csrc, "cpu", "*.cpp")))
    # -fopenmp: at::parallel_for's OpenMP backend is inline in the ATen headers, so without it
    # the CPU kernels would silently run on one thread.
    # -ffp-contract=off: no FMA contraction, so the AVX-512 / AVX2 / baseline clones of the
    # kernels (csrc/cpu/rows.h) round identically and results do not depend on the CPU model.
    cxx = ["-O3", "-fopenmp", "-ffp-contract=off", "-Wall", "-Wextra", "-Wno-unused-parameter"]
    args = dict(
        name="sopo_ext._C",
        sources=[os.path.relpath(s, HERE) for s in sources],
        include_dirs=[csrc],
        extra_compile_args={"cxx": cxx},
        extra_link_args=["-fopenmp"],
    )
    if not USE_CUDA:
        return CppExtension(**args)
    cu = sorted(glob.glob(os.path.join(csrc, "cuda", "*.cu")))
    args["sources"] += [os.path.relpath(s, HERE) for s in cu]
    args["include_dirs"] += _nvidia_include_dirs()
    nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
    if _flag("SOPO_EXT_STRICT_CUDA"):
        nvcc += ["-Xptxas", "-v,--warn-on-spills,--warning-as-error", "-Werror", "all-warnings"]
    args["extra_compile_args"]["nvcc"] = nvcc
    args["define_macros"] = [("SOPO_WITH_CUDA", "1")]
    return CUDAExtension(**args)


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension},
)
