"""Loads the operator library (the schemas and CPU / CUDA kernels of csrc/) into the running torch.

Two sources, tried in this order:

1. ``sopo_ext._C``, compiled by ``pip install --no-build-isolation -e .``; used only when the
   ``_C_build.json`` beside it names the running torch version (a library built against another
   torch would fail to load, or worse, load and misbehave).
2. A build on first import (``pip install -e .`` / ``pip install .`` under pip's build isolation
   install no library): csrc/ is compiled with ``torch.utils.cpp_extension.load`` against the
   running torch, into a cache keyed by torch version, Python version and device, so it happens
   once per environment (about a minute on 2 CPU cores; several with CUDA). The CUDA kernels are
   compiled only when a GPU is visible, for that GPU's architecture.

Environment:
  SOPO_EXT_CACHE       the package's cache (default ~/.cache/sopo_ext); builds go to its ops/
  SOPO_EXT_FORCE_JIT=1 ignore sopo_ext._C and build on first import
  SOPO_EXT_FORCE_CPU=1 compile the CPU kernels only
  SOPO_EXT_VERBOSE=1   show the compiler's output
  MAX_JOBS             parallel compile jobs
"""
from __future__ import annotations

import importlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from . import _build_flags as B

PACKAGE = Path(__file__).resolve().parent
JIT_NAME = "sopo_ext_C"

#: How the library was loaded: {"source": "aot" | "jit", "path": ..., "with_cuda": bool, ...}.
loaded: dict = {}


class BuildError(ImportError):
    """The operator library could not be loaded or compiled (the message says why and what to do)."""


def aot_build_info() -> Optional[dict]:
    """What _C_build.json says about the ahead-of-time library, or None when there is none."""
    path = PACKAGE / "_C_build.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def aot_library() -> Optional[Path]:
    found = sorted(PACKAGE.glob("_C*.so")) + sorted(PACKAGE.glob("_C*.pyd"))
    return found[0] if found else None


def aot_usable(info: Optional[dict], library: Optional[Path], torch_version: str) -> tuple:
    """(usable, why not): the ahead-of-time library is used only with the torch it was built for."""
    if B.flag("SOPO_EXT_FORCE_JIT"):
        return False, "SOPO_EXT_FORCE_JIT=1"
    if library is None:
        return False, "no ahead-of-time build (pip install -e . under build isolation)"
    if info is None:
        return False, f"{library.name} has no _C_build.json (built by an older setup.py?)"
    if info.get("torch") != torch_version:
        return False, (f"{library.name} was built against torch {info.get('torch')}, "
                       f"this is torch {torch_version}")
    return True, ""


def csrc_dir() -> Path:
    """The C++ / CUDA sources: the repository's csrc/ (editable install) or the copy a wheel
    ships in sopo_ext/_csrc/."""
    for candidate in (PACKAGE.parent / "csrc", PACKAGE / "_csrc"):
        if (candidate / "ops.cpp").is_file():
            return candidate
    raise BuildError(
        f"sopo_ext: the C++ sources are missing (looked for {PACKAGE.parent / 'csrc'} and "
        f"{PACKAGE / '_csrc'}): reinstall sopo_ext (pip install .) from its source tree")


def cache_root() -> Path:
    """Where first-import builds go: ``$SOPO_EXT_CACHE/ops`` (the cache the text embeddings and
    the built-in data also use; default ``~/.cache/sopo_ext``)."""
    return Path(os.environ.get("SOPO_EXT_CACHE") or Path.home() / ".cache" / "sopo_ext").expanduser() / "ops"


def _gpu_arch() -> Optional[str]:
    if not torch.cuda.is_available():
        return None
    caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    return "_".join(f"sm{major}{minor}" for major, minor in caps)


def build_key(with_cuda: bool) -> str:
    """The cache directory's name: one build per torch, Python and device kind."""
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    device = f"cuda{torch.version.cuda}-{_gpu_arch()}" if with_cuda else "cpu"
    return f"torch{torch.__version__}-{py}-{device}".replace("+", "_")


def find_cxx() -> Optional[str]:
    """The C++ compiler torch.utils.cpp_extension will call ($CXX, else c++)."""
    cxx = os.environ.get("CXX", "c++")
    return shutil.which(cxx.split()[0]) if cxx else None


def _jit_with_cuda() -> tuple:
    """(with CUDA kernels, a note when a GPU is visible but they cannot be compiled)."""
    if B.flag("SOPO_EXT_FORCE_CPU") or not torch.cuda.is_available() or torch.version.cuda is None:
        return False, None
    cuda_home = B.resolve_cuda_home()
    if cuda_home is None:
        return False, ("a GPU is visible but nvcc was not found (set CUDA_HOME to a CUDA toolkit "
                       "matching torch's CUDA " f"{torch.version.cuda}): compiling the CPU kernels only; "
                       "sopo_ext ops on CUDA tensors will fail")
    os.environ["CUDA_HOME"] = cuda_home
    return True, None


def jit_build() -> Path:
    """Compiles csrc/ against the running torch (or finds it in the cache) and loads it."""
    with_cuda, note = _jit_with_cuda()
    if note:
        print(f"sopo_ext: {note}", file=sys.stderr)
    if find_cxx() is None:
        raise BuildError(
            "sopo_ext: no C++ compiler found (looked for $CXX, else `c++`). The ops are compiled "
            "on first import against the installed torch: install a compiler (Debian/Ubuntu: apt "
            "install g++; conda: conda install gxx_linux-64) or set CXX, then import again.")
    try:
        import ninja  # noqa: F401  (cpp_extension.load drives ninja)
    except ImportError:
        if shutil.which("ninja") is None:
            raise BuildError("sopo_ext: ninja is needed to compile the ops on first import: "
                             "pip install ninja") from None
    csrc = csrc_dir()
    build_dir = cache_root() / build_key(with_cuda)
    try:
        build_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BuildError(f"sopo_ext: cannot create the build directory {build_dir} ({e}); set "
                         f"SOPO_EXT_CACHE to a writable directory") from e
    import logging
    quiet = logging.getLogger("torch.utils.cpp_extension")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # "No CUDA runtime is found" on a machine without a GPU: expected here
    try:
        from torch.utils import cpp_extension
    finally:
        quiet.setLevel(level)

    library = build_dir / f"{JIT_NAME}.so"
    fresh = not library.is_file()
    if fresh:
        kinds = "CPU and CUDA" if with_cuda else "CPU"
        print(f"sopo_ext: compiling the {kinds} ops for torch {torch.__version__} into {build_dir} "
              f"(once per environment; about {'5-10 minutes' if with_cuda else '1 minute'} on 2 cores, "
              "MAX_JOBS sets the parallel jobs) ...", file=sys.stderr, flush=True)
    t0 = time.time()
    kwargs = dict(
        name=JIT_NAME,
        sources=[str(s) for s in B.sources(str(csrc), with_cuda)],
        extra_cflags=list(B.CXX_FLAGS),
        extra_ldflags=list(B.LD_FLAGS),
        extra_include_paths=[str(csrc)],
        build_directory=str(build_dir),
        is_python_module=False,
        with_cuda=with_cuda,
        verbose=B.flag("SOPO_EXT_VERBOSE"),
    )
    if with_cuda:
        kwargs["extra_cuda_cflags"] = B.nvcc_flags(strict=False)
        kwargs["extra_include_paths"] += B.nvidia_include_dirs(os.path.dirname(os.path.dirname(torch.__file__)))
    try:
        cpp_extension.load(**kwargs)
    except Exception as e:  # a compiler error: say where the log is and how to see it all
        raise BuildError(
            f"sopo_ext: compiling the ops in {build_dir} failed ({type(e).__name__}). Run again with "
            f"SOPO_EXT_VERBOSE=1 to see the compiler's output, or install with torch present: "
            f"pip install --no-build-isolation -e .\n{e}") from e
    if fresh:
        print(f"sopo_ext: compiled in {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    loaded.update(source="jit", path=str(library), with_cuda=with_cuda, build_dir=str(build_dir))
    return library


def load() -> dict:
    """Loads the operator library once; returns ``loaded`` (where it came from)."""
    if loaded:
        return loaded
    info, library = aot_build_info(), aot_library()
    usable, why = aot_usable(info, library, torch.__version__)
    if usable:
        importlib.import_module(f"{__package__}._C")
        loaded.update(source="aot", path=str(library), with_cuda=bool(info.get("with_cuda")))
        return loaded
    if library is not None and B.flag("SOPO_EXT_VERBOSE"):
        print(f"sopo_ext: not using {library.name}: {why}", file=sys.stderr)
    jit_build()
    loaded["why_not_aot"] = why
    return loaded
