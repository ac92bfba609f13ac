"""Builds sparseadapter_ext._C: the CPU kernels always, the CUDA kernels when torch has CUDA and a
CUDA toolkit is found (FORCE_CUDA=1 requires them, FORCE_CPU=1 skips them).

Build with `pip install --no-build-isolation .` so the extension compiles against the torch that is
installed, not a fresh copy in an isolated build environment.

SPARSEADAPTER_NO_EXTENSION=1 installs the Python packages without compiling: scripts/install.sh does
so, then builds the extension with `setup.py build_ext --inplace`, whose build folder (build/) persists,
so that ninja recompiles only the sources that changed.
"""
import glob
import os

import torch
from setuptools import find_packages, setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.getenv(name, "0") == "1"


def _cuda_home():
    """The toolkit root. torch guesses it from the `nvcc` on PATH, which may be a wrapper script
    outside the toolkit: accept only a folder that holds the toolkit's headers."""
    home = cpp_extension.CUDA_HOME
    if home and os.path.isfile(os.path.join(home, "include", "cuda_runtime.h")):
        return home
    return None


def _with_cuda():
    if _flag("FORCE_CPU"):
        return False
    if _flag("FORCE_CUDA"):
        if torch.version.cuda is None:
            raise RuntimeError(
                f"FORCE_CUDA=1, but torch {torch.__version__} is a CPU-only build; install a CUDA build of torch")
        if _cuda_home() is None:
            raise RuntimeError(
                "FORCE_CUDA=1, but no CUDA toolkit was found (torch guessed CUDA_HOME="
                f"{cpp_extension.CUDA_HOME!r}); set CUDA_HOME to the toolkit root, the folder holding "
                "bin/nvcc and include/cuda_runtime.h")
        return True
    return torch.version.cuda is not None and _cuda_home() is not None


def _openmp_flags():
    # at::parallel_for is inline code that only runs in parallel when compiled with OpenMP.
    return ["-fopenmp"] if "OpenMP" in torch.__config__.parallel_info() else []


def extension():
    with_cuda = _with_cuda()
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    cxx_flags = ["-O3", "-Wno-psabi"] + _openmp_flags()
    extra = {"cxx": cxx_flags}
    define_macros = []
    builder = cpp_extension.CppExtension
    if with_cuda:
        os.environ["CUDA_HOME"] = _cuda_home()
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cpp")) + glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        define_macros.append(("SPARSEADAPTER_WITH_CUDA", None))
        extra["nvcc"] = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
        builder = cpp_extension.CUDAExtension
    print(f"sparseadapter: building with{'' if with_cuda else 'out'} CUDA kernels")
    return builder(
        name="sparseadapter_ext._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        define_macros=define_macros,
        extra_compile_args=extra,
        extra_link_args=_openmp_flags(),
    )


setup(
    packages=find_packages("python") + ["sparseadapter_ext"],
    package_dir={"sparseadapter": "python/sparseadapter", "sparseadapter_ext": "sparseadapter_ext"},
    package_data={"sparseadapter": ["calibration/*.json"]},
    ext_modules=[] if _flag("SPARSEADAPTER_NO_EXTENSION") else [extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
