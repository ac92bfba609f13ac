"""Configuring and building the CMake project (libsparseadapter, sparseadapter_run,
sparseadapter_serve) against the installed torch, for the C++ tests. conftest.py's session fixture
`cmake_build` builds it once per pytest session (about a minute on 2 cores); set
SPARSEADAPTER_CMAKE_BUILD_DIR to reuse a build folder between runs."""

import glob
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from repo_paths import REPO

CONFIGURE_TIMEOUT_S = 300
BUILD_TIMEOUT_S = 900
PARALLEL = str(min(4, max(2, os.cpu_count() or 2)))


def _tail(text, lines=60):
    return "\n".join(text.splitlines()[-lines:])


def run_step(cmd, what, timeout, **kwargs):
    """Run a build step; a failure fails the test with the step's output."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"{what} timed out after {timeout}s: {' '.join(map(str, cmd))}\n{_tail(err.stdout or '')}")
    if proc.returncode != 0:
        pytest.fail(
            f"{what} failed (exit {proc.returncode}): {' '.join(map(str, cmd))}\n"
            f"{_tail(proc.stdout)}\n{_tail(proc.stderr)}"
        )
    return proc


def _cuda_toolkit_args():
    """A CUDA build of torch makes find_package(Torch) look for the toolkit even for a CPU-only
    library. The nvcc on PATH may be a wrapper outside the toolkit, so name the toolkit itself, and
    take libnvrtc from the nvidia pip wheels when the toolkit lacks it."""
    from torch.utils import cpp_extension

    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or cpp_extension.CUDA_HOME
    candidates = [home, "/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    home = next(
        (
            h
            for h in candidates
            if h
            and os.path.isfile(os.path.join(h, "include", "cuda_runtime.h"))
            and os.path.isfile(os.path.join(h, "bin", "nvcc"))
        ),
        None,
    )
    if home is None:
        pytest.skip(
            f"torch {torch.__version__} is a CUDA build and its CMake config needs a CUDA toolkit; "
            "none found (set CUDA_HOME)"
        )
    args = [f"-DCMAKE_CUDA_COMPILER={home}/bin/nvcc", f"-DCUDA_TOOLKIT_ROOT_DIR={home}"]
    if not glob.glob(os.path.join(home, "lib*", "libnvrtc.so*")):
        site = Path(torch.__file__).resolve().parents[1]
        nvrtc = sorted(glob.glob(str(site / "nvidia" / "*" / "lib" / "libnvrtc.so*")))
        nvrtc = [p for p in nvrtc if "builtins" not in p and ".alt." not in p]
        if not nvrtc:
            pytest.skip(f"no libnvrtc in the CUDA toolkit at {home} nor in the nvidia pip wheels")
        args.append(f"-DCUDA_nvrtc_LIBRARY={nvrtc[0]}")
    return args


def _generator_args():
    ninja = shutil.which("ninja") or shutil.which("ninja", path=os.path.dirname(sys.executable))
    return ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"] if ninja else []


def _configure_args():
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake is not installed")
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        pytest.skip(f"no C++ compiler ({cxx!r} not found; set CXX)")
    args = _generator_args() + ["-DCMAKE_BUILD_TYPE=Release", f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"]
    if torch.version.cuda is not None:
        args += _cuda_toolkit_args()
    return cmake, args


def build_project(tmp_path_factory):
    """Configure and build the project: returns (cmake, build dir, configure args)."""
    cmake, args = _configure_args()
    build = os.environ.get("SPARSEADAPTER_CMAKE_BUILD_DIR")
    build = Path(build) if build else tmp_path_factory.mktemp("cmake-build")
    run_step([cmake, "-S", str(REPO), "-B", str(build), *args], "cmake configure", CONFIGURE_TIMEOUT_S)
    run_step([cmake, "--build", str(build), "--parallel", PARALLEL], "cmake build", BUILD_TIMEOUT_S)
    return cmake, build, args


SERVE_TIMEOUT_S = 180


def serve_lines(binary, model, lines, *extra, code=0):
    """Run `sparseadapter_serve --model model --threads 1 *extra` on `lines` (JSON lines on stdin);
    the exit status must be `code`. Returns (the answers, parsed, one per stdout line; stderr)."""
    proc = subprocess.run(
        [str(binary), "--model", str(model), "--threads", "1", *extra],
        input="\n".join(lines) + "\n",
        capture_output=True,
        text=True,
        timeout=SERVE_TIMEOUT_S,
    )
    assert proc.returncode == code, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines()], proc.stderr
