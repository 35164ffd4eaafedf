"""Builds sopo_ext. Two ways, both giving ops compiled against the torch that runs them:

* `pip install -e .` / `pip install .` (pip's default build isolation hides the installed torch):
  the package is installed without a compiled library and the ops are compiled on first import
  against the running torch, cached per torch version and device (sopo_ext/_library.py).
* `pip install --no-build-isolation -e .` with torch installed (the fast path, and CI's strict
  CUDA build): the operator library sopo_ext._C is compiled now, and _C_build.json next to it
  records the torch it was built against; on import it is used only with that torch.

Ahead of time a CUDAExtension is built when the installed torch is a CUDA build and nvcc is
found (a GPU is not needed to compile); otherwise, or with SOPO_EXT_FORCE_CPU=1, a CppExtension.
Switches:
  TORCH_CUDA_ARCH_LIST   GPU architectures (default "8.0;9.0+PTX": sm_80 / sm_90 machine code,
                         compute_90 PTX for newer GPUs)
  SOPO_EXT_STRICT_CUDA=1 ptxas spills and host/device warnings become build errors (CI sets it)
  SOPO_EXT_NO_BUILD=1    never compile here, even with torch visible (compile on first import)
  MAX_JOBS               parallel compile jobs (ninja)
"""
import importlib.util
import json
import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(HERE, "csrc")


def _load_build_flags():
    spec = importlib.util.spec_from_file_location(
        "_sopo_build_flags", os.path.join(HERE, "sopo_ext", "_build_flags.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


B = _load_build_flags()


class BuildPyWithSources(build_py):
    """Ships csrc/ inside the wheel as sopo_ext/_csrc/, so that an installed package can compile
    its ops on first import (an editable install reads the repository's csrc/ directly)."""

    def run(self):
        super().run()
        target = os.path.join(self.build_lib, "sopo_ext", "_csrc")
        for rel in B.source_files(CSRC):
            dst = os.path.join(target, rel)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shutil.copyfile(os.path.join(CSRC, rel), dst)


def _torch():
    if B.flag("SOPO_EXT_NO_BUILD"):
        return None
    try:
        import torch
    except ImportError:
        print("sopo_ext: torch is not visible to this build (pip's build isolation): installing "
              "without a compiled library; the ops are compiled on first import against the "
              "running torch. With torch installed, `pip install --no-build-isolation -e .` "
              "compiles them now.")
        return None
    return torch


torch = _torch()
cmdclass = {"build_py": BuildPyWithSources}
ext_modules = []

if torch is not None:
    CUDA_HOME = None if B.flag("SOPO_EXT_FORCE_CPU") else B.resolve_cuda_home()
    if CUDA_HOME:
        os.environ["CUDA_HOME"] = CUDA_HOME
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", B.DEFAULT_CUDA_ARCHS)

    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    USE_CUDA = bool(CUDA_HOME) and torch.version.cuda is not None

    class BuildExtensionWithInfo(BuildExtension):
        """Writes _C_build.json beside the library: the torch (and CUDA) it was compiled
        against, so that sopo_ext._library never loads it into another torch. Beside the built
        library and, for an editable install (the library is copied into the source tree),
        beside that copy too; listed in the outputs so that a wheel carries it."""

        INFO = "_C_build.json"

        def _write_info(self, directory):
            os.makedirs(directory, exist_ok=True)
            with open(os.path.join(directory, self.INFO), "w") as f:
                json.dump({"torch": torch.__version__, "torch_cuda": torch.version.cuda,
                           "with_cuda": USE_CUDA,
                           "cuda_archs": os.environ["TORCH_CUDA_ARCH_LIST"] if USE_CUDA else None},
                          f, indent=1)

        def build_extension(self, ext):
            super().build_extension(ext)
            self._write_info(os.path.dirname(self.get_ext_fullpath(ext.name)))

        def copy_extensions_to_source(self):
            super().copy_extensions_to_source()
            build_py = self.get_finalized_command("build_py")
            for ext in self.extensions:
                inplace_file, _ = self._get_inplace_equivalent(build_py, ext)
                self._write_info(os.path.dirname(os.path.abspath(inplace_file)))

        def get_outputs(self):
            return super().get_outputs() + [
                os.path.join(os.path.dirname(self.get_ext_fullpath(ext.name)), self.INFO)
                for ext in self.extensions]

    args = dict(
        name="sopo_ext._C",
        sources=[os.path.relpath(s, HERE) for s in B.sources(CSRC, USE_CUDA)],
        include_dirs=[CSRC],
        extra_compile_args={"cxx": list(B.CXX_FLAGS)},
        extra_link_args=list(B.LD_FLAGS),
    )
    if USE_CUDA:
        args["include_dirs"] += B.nvidia_include_dirs(os.path.dirname(os.path.dirname(torch.__file__)))
        args["extra_compile_args"]["nvcc"] = B.nvcc_flags(B.flag("SOPO_EXT_STRICT_CUDA"))
        args["define_macros"] = [("SOPO_WITH_CUDA", "1")]
        ext_modules = [CUDAExtension(**args)]
    else:
        ext_modules = [CppExtension(**args)]
    cmdclass["build_ext"] = BuildExtensionWithInfo

setup(ext_modules=ext_modules, cmdclass=cmdclass)
