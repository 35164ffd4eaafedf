"""Per-kernel resources of the compiled CUDA kernels (no GPU needed: read from the fatbinary).

Checks that no kernel uses local memory or stack (a register spill; the strict build already
fails on ptxas spill warnings) and that csrc/cuda/RESOURCES.md, the table the README shows, is
the one this build produces (when the same nvcc and cuobjdump made it). Skipped when the extension was
built without CUDA or cuobjdump is missing (pip install nvidia-cuda-cuobjdump).
"""
from __future__ import annotations

import pytest
import torch

import sopo_ext  # noqa: F401
from sopo_ext import _cuda_resources as res

pytestmark = pytest.mark.skipif(
    not torch._C._dispatch_has_kernel_for_dispatch_key("sopo_ext::sopo_loss_forward", "CUDA"),
    reason="extension built without CUDA kernels")


@pytest.fixture(scope="module")
def tool():
    t = res.find_cuobjdump()
    if t is None:
        pytest.skip("cuobjdump not found (pip install nvidia-cuda-cuobjdump)")
    return t


@pytest.fixture(scope="module")
def usage(tool):
    return res.read_usage(tool, res.extension_path())


def test_newer_gpus_get_ptx(tool):
    """TORCH_CUDA_ARCH_LIST "8.0;9.0+PTX": compute_90 PTX rides along, so a Blackwell GPU (sm_100,
    sm_120) JIT-compiles the kernels at first launch instead of failing with "no kernel image"."""
    from sopo_ext import _library
    if _library.load()["source"] != "aot":
        pytest.skip("a build on first import targets the visible GPU only")
    assert res.embedded_ptx(tool, res.extension_path()) == ["sm_90"]


def test_every_kernel_for_both_architectures(usage):
    kernels = {u.kernel for u in usage}
    names = {k.split("<")[0] for k in kernels}
    assert names == {"loss_partials_kernel", "loss_finalize_kernel", "loss_grad_kernel",
                     "reward_scores_kernel", "min_cosine_partials_kernel", "min_cosine_finalize_kernel"}
    for k in kernels:
        assert {u.arch for u in usage if u.kernel == k} == {"sm_80", "sm_90"}, k
    assert len(kernels) == 6 * 4  # four dtypes each


def test_no_spills(usage):
    spilled = [u for u in usage if u.local or u.stack]
    assert not spilled, f"kernels using local memory / stack: {spilled}"


def test_committed_table_is_current(tool, usage):
    version = res.tool_versions(tool)
    committed = res.TABLE.read_text() if res.TABLE.exists() else ""
    if version not in committed:
        pytest.skip(f"RESOURCES.md was made with other tools than {version!r}")
    assert committed == res.render(usage, version), (
        "csrc/cuda/RESOURCES.md is stale: python -m sopo_ext._cuda_resources --write")
