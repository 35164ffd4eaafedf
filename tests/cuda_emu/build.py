"""Compile and run C++ test programs of the CUDA-on-CPU emulation (emu.h), with a build cache.

``build`` compiles with ``g++ -std=c++20 -O1 -g -pthread -Wall -Wextra -Werror`` plus the chosen
sanitizer into ``tests/cuda_emu/.build/`` and compiles again only when the compiler, the flags,
the sources or a header they include changed: every header outside the compiler's own system
directories is tracked (the ``-MMD`` dependency list, so project and torch headers are), compared
by mtime and size first and by content hash when those differ, so touching a file without
changing it costs no rebuild.

``sanitize``: ``None``; ``"thread"`` (TSan: run with ``EMU_MODE=threads``, the default under
TSan); ``"address,undefined"`` (ASan + UBSan, recovery disabled so the first report aborts).
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
BUILD_DIR = HERE / ".build"
CXX = os.environ.get("CXX", "g++")

# -Wno-unknown-pragmas: CUDA's `#pragma unroll` means nothing to g++ (and g++ 12 ignores a
# `#pragma GCC diagnostic` about it, so emu.h cannot silence it).
BASE_FLAGS = ("-std=c++20", "-O1", "-g", "-pthread", "-fno-omit-frame-pointer", "-Wall", "-Wextra", "-Werror",
              "-Wno-unknown-pragmas")
SANITIZER_FLAGS = {
    None: (),
    "thread": ("-fsanitize=thread",),
    "address,undefined": ("-fsanitize=address,undefined", "-fno-sanitize-recover=all"),
}
_LABELS = {None: "plain", "thread": "tsan", "address,undefined": "asan-ubsan"}  # cache directory names


class BuildError(RuntimeError):
    """The compiler failed; the message holds the command and the compiler's output."""


@functools.cache
def _compiler_identity() -> str:
    path = shutil.which(CXX)
    if path is None:
        raise BuildError(f"compiler {CXX!r} not found")
    version = subprocess.run([path, "--version"], capture_output=True, text=True, check=True).stdout
    return f"{path}\n{version}"


def torch_include_dirs() -> list[str]:
    """torch's C++ include directories (for c10::Half / c10::BFloat16 in kernels)."""
    from torch.utils.cpp_extension import include_paths

    return include_paths()


def _file_record(path: Path) -> dict:
    stat = path.stat()
    return {"mtime_ns": stat.st_mtime_ns, "size": stat.st_size,
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def _unchanged(path: Path, record: dict) -> bool:
    try:
        stat = path.stat()
    except FileNotFoundError:
        return False
    if (stat.st_mtime_ns, stat.st_size) == (record["mtime_ns"], record["size"]):
        return True
    return hashlib.sha256(path.read_bytes()).hexdigest() == record["sha256"]


def _dependencies(depfile: Path) -> list[Path]:
    """The files a ``-MMD`` dependency file lists (its first word is the target)."""
    words = depfile.read_text().replace("\\\n", " ").split()
    return [Path(w).resolve() for w in words[1:]]


def _compile(command: list[str]) -> None:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise BuildError(f"compilation failed (exit {result.returncode}):\n{' '.join(command)}\n"
                         f"{result.stdout}{result.stderr}")


def build(sources: Sequence[str | os.PathLike], out_name: str, sanitize: str | None = None,
          extra_flags: Sequence[str] = (), include_dirs: Sequence[str | os.PathLike] = (),
          cache_dir: Path = BUILD_DIR) -> Path:
    """Compile ``sources`` into the executable ``out_name`` and return its path (cached).

    ``tests/cuda_emu`` and ``include_dirs`` (e.g. ``torch_include_dirs()``, ``csrc``) are on the
    include path, so sources can ``#include "emu.h"``. ``extra_flags`` come last and can override
    defaults (e.g. ``-Wno-error``).
    """
    if sanitize not in SANITIZER_FLAGS:
        raise ValueError(f"sanitize must be one of {list(SANITIZER_FLAGS)}, got {sanitize!r}")
    sources = [Path(s).resolve() for s in sources]
    flags = [*BASE_FLAGS, *SANITIZER_FLAGS[sanitize], f"-I{HERE}", *(f"-I{Path(d).resolve()}" for d in include_dirs),
             *extra_flags]
    key = hashlib.sha256(json.dumps([_compiler_identity(), flags, [str(s) for s in sources]]).encode())
    out_dir = Path(cache_dir) / f"{out_name}-{_LABELS[sanitize]}-{key.hexdigest()[:16]}"
    exe, manifest = out_dir / out_name, out_dir / "dependencies.json"
    if exe.exists() and manifest.exists():
        records = json.loads(manifest.read_text())
        if all(_unchanged(Path(p), r) for p, r in records.items()):
            return exe

    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir) as scratch:
        objects, dependencies = [], set()
        for i, source in enumerate(sources):
            obj, depfile = Path(scratch) / f"{i}-{source.stem}.o", Path(scratch) / f"{i}-{source.stem}.d"
            _compile([CXX, *flags, "-MMD", "-MF", str(depfile), "-c", str(source), "-o", str(obj)])
            objects.append(str(obj))
            dependencies.update(_dependencies(depfile))
        linked = Path(scratch) / out_name
        _compile([CXX, *flags, *objects, "-o", str(linked)])
        os.replace(linked, exe)
    records = {str(p): _file_record(p) for p in sorted(dependencies)}
    manifest.write_text(json.dumps(records, indent=1))
    return exe


def run(exe: str | os.PathLike, args: Sequence[str] = (), env: Mapping[str, str] | None = None,
        timeout: float = 60) -> subprocess.CompletedProcess:
    """Run ``exe args...`` with ``env`` added to the environment; output captured as text."""
    return subprocess.run([str(exe), *args], env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout)
