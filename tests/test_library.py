"""How the operator library is found or built (sopo_ext/_library.py): the ahead-of-time
sopo_ext._C only with the torch it was built against, else a build on first import, cached per
torch / Python / device, with clear errors when it cannot be built."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import sopo_ext
from sopo_ext import _library as L

ROOT = Path(__file__).resolve().parents[1]


def test_the_loaded_library_has_every_op():
    info = L.load()
    assert info["source"] in ("aot", "jit") and Path(info["path"]).is_file()
    for op in ("reward_scores", "min_cosine_similarity", "sopo_loss_forward", "sopo_loss_backward",
               "sopo_loss_forward_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"sopo_ext::{op}", "CPU"), op
    if info["source"] == "aot":  # setup.py recorded the torch it was built against: this one
        assert L.aot_build_info()["torch"] == torch.__version__


@pytest.mark.parametrize("info, lib, env, usable, why", [
    (None, None, {}, False, "no ahead-of-time build"),
    (None, "_C.so", {}, False, "no _C_build.json"),
    ({"torch": "2.13.0"}, "_C.so", {}, False, "built against torch 2.13.0, this is torch 2.14.1"),
    ({"torch": "2.14.1"}, "_C.so", {}, True, ""),
    ({"torch": "2.14.1"}, "_C.so", {"SOPO_EXT_FORCE_JIT": "1"}, False, "SOPO_EXT_FORCE_JIT=1"),
])
def test_the_ahead_of_time_library_only_with_its_own_torch(info, lib, env, usable, why, monkeypatch):
    monkeypatch.delenv("SOPO_EXT_FORCE_JIT", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    ok, reason = L.aot_usable(info, Path(lib) if lib else None, "2.14.1")
    assert ok is usable and why in reason


def test_the_build_key_names_torch_python_and_device(monkeypatch):
    key = L.build_key(with_cuda=False)
    assert key == (f"torch{torch.__version__}-py{sys.version_info.major}{sys.version_info.minor}-cpu"
                   .replace("+", "_"))
    monkeypatch.setenv("SOPO_EXT_CACHE", "/somewhere")
    assert L.cache_root() == Path("/somewhere/ops")


def test_no_compiler_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", "no-such-compiler-xyz")
    monkeypatch.setenv("SOPO_EXT_CACHE", str(tmp_path))
    with pytest.raises(L.BuildError, match=r"no C\+\+ compiler found.*apt install g\+\+"):
        L.jit_build()
    assert not (tmp_path / "ops").exists()  # nothing half-built left behind


def test_missing_sources_are_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(L, "PACKAGE", tmp_path / "sopo_ext")
    with pytest.raises(L.BuildError, match="C\\+\\+ sources are missing.*reinstall"):
        L.csrc_dir()


def test_a_wheel_ships_every_source_file():
    """setup.py copies csrc/ into the wheel (sopo_ext/_csrc): every file a build reads."""
    from sopo_ext import _build_flags as B
    files = B.source_files(str(ROOT / "csrc"))
    built = [os.path.relpath(s, ROOT / "csrc") for s in B.sources(str(ROOT / "csrc"), with_cuda=True)]
    assert set(built) <= set(files)
    assert {"sopo.h", "checks.h", "cpu/rows.h", "cuda/common.cuh", "cuda/loss_kernels.cuh"} <= set(files)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("SOPO_EXT_SKIP_JIT_TEST") == "1",
                    reason="CI checks the first-import build in .ci/fresh_install.sh")
def test_first_import_build_matches_the_reference(tmp_path):
    """A real build on first import (SOPO_EXT_FORCE_JIT=1, empty cache; ~1 min), in a fresh
    process: its ops equal the reference, and a second import finds the build in the cache."""
    code = textwrap.dedent("""
        import json, torch, sopo_ext
        from sopo_ext import _library, functional as SF, reference as R
        g = torch.Generator().manual_seed(0)
        te, me = torch.randn(3, 8, generator=g, dtype=torch.float64), torch.randn(3, 4, 8, generator=g, dtype=torch.float64)
        a, b = SF.reward_scores(te, me, 0.4), R.reward_scores(te, me, 0.4)
        pw, rw, tw, pl, rl, tl = (torch.randn(3, 50, generator=g, dtype=torch.float64) for _ in range(6))
        bw, v = torch.rand(3, dtype=torch.float64, generator=g), torch.tensor([True, False, True])
        fused = SF.sopo_loss(pw, rw, tw, pl, rl, tl, beta_w=bw, valuable=v, reduction="none")
        ref = R.sopo_loss(pw, rw, tw, pl, rl, tl, beta_w=bw, valuable=v, reduction="none")
        print(json.dumps({"loaded": _library.loaded,
                          "reward": torch.allclose(a.scores, b.scores) and torch.equal(a.worst_index, b.worst_index),
                          "cosine": torch.allclose(SF.min_cosine_similarity(te, me), R.min_cosine_similarity(te, me)),
                          "loss": torch.allclose(fused, ref)}))
    """)
    env = dict(os.environ, SOPO_EXT_FORCE_JIT="1", SOPO_EXT_CACHE=str(tmp_path), MAX_JOBS="2")
    runs = []
    for _ in range(2):
        p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                           timeout=900, cwd=tmp_path)
        assert p.returncode == 0, p.stderr[-3000:]
        runs.append((json.loads(p.stdout.strip().splitlines()[-1]), p.stderr))
    (first, err1), (second, err2) = runs
    assert first["loaded"]["source"] == "jit" and first["reward"] and first["cosine"] and first["loss"]
    assert Path(first["loaded"]["path"]).is_file() and str(tmp_path) in first["loaded"]["path"]
    assert "compiling the CPU" in err1 and "compiled in" in err1  # the progress message
    assert "compiling" not in err2 and second["loaded"]["path"] == first["loaded"]["path"]  # cached


def test_an_unwritable_cache_is_a_clear_error(monkeypatch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("SOPO_EXT_CACHE", str(blocker))
    with pytest.raises(L.BuildError, match="cannot create the build directory.*SOPO_EXT_CACHE"):
        L.jit_build()
