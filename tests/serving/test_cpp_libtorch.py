"""The C++ side: CMakeLists.txt builds libsparseadapter + sparseadapter_run against the installed
torch, TorchScript models from Python run there with the same results, and the installed CMake
package works for a consumer through find_package(SparseAdapter).

The project is built once per session by conftest.py's `cmake_build` fixture (cmake_support.py).
"""

import subprocess
import textwrap

import pytest
import torch
from cmake_support import BUILD_TIMEOUT_S, CONFIGURE_TIMEOUT_S, PARALLEL, REPO, run_step

import sparseadapter as sa

RUN_TIMEOUT_S = 120


@pytest.fixture(scope="module")
def runner(cmake_build):
    exe = cmake_build[1] / "sparseadapter_run"
    assert exe.is_file(), f"{exe} was not built"
    return exe


class _TensorHolder(torch.nn.Module):
    """The input file format of sparseadapter_run: a TorchScript module whose buffer `x` is the
    tensor (no pickled Python objects)."""

    def __init__(self, x):
        super().__init__()
        self.register_buffer("x", x)

    def forward(self) -> torch.Tensor:
        return self.x


class _RawSpmm(torch.nn.Module):
    """The plain op, not the module: CSR arrays as buffers, row_order left out."""

    def __init__(self, values, crow, col, bias):
        super().__init__()
        self.register_buffer("values", values)
        self.register_buffer("crow", crow)
        self.register_buffer("col", col)
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.sparseadapter.spmm(x, self.values, self.crow, self.col, None, self.bias)


def _sparse_linear(out_features, in_features, density, *, dtype=torch.float32, index_dtype=torch.int32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=gen)
    mask = torch.rand(out_features, in_features, generator=gen) < density
    mask[1] = False  # an empty row
    bias = torch.randn(out_features, generator=gen)
    layer = sa.SparseLinear.from_dense(weight, mask, bias, index_dtype=index_dtype)
    return layer.to(dtype).eval()


def _save_input(path, x, how="holder"):
    if how == "holder":
        torch.jit.script(_TensorHolder(x)).save(str(path))
    else:
        torch.save(x, str(path))


def _run_cpp(runner, model_path, x, tmp_path, how="holder"):
    inp, out = tmp_path / "input.pt", tmp_path / "output.pt"
    _save_input(inp, x, how)
    proc = subprocess.run(
        [str(runner), str(model_path), str(inp), str(out)], capture_output=True, text=True, timeout=RUN_TIMEOUT_S
    )
    assert proc.returncode == 0, f"sparseadapter_run failed ({proc.returncode}): {proc.stderr}"
    return torch.load(str(out), weights_only=True)


def _assert_same(y_cpp, y_py):
    assert y_cpp.dtype == y_py.dtype and y_cpp.shape == y_py.shape
    # Same CPU kernel on both sides: equal up to rounding.
    tol = 1e-6 if y_py.dtype in (torch.float32, torch.float64) else 1e-2
    torch.testing.assert_close(y_cpp, y_py, rtol=tol, atol=tol)


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("how", ["holder", "torch_save"])
def test_scripted_sparse_linear_matches_python(runner, tmp_path, index_dtype, how):
    layer = _sparse_linear(37, 53, 0.3, index_dtype=index_dtype, seed=1)
    path = tmp_path / "model.pt"
    torch.jit.script(layer).save(str(path))
    x = torch.randn(4, 7, 53, generator=torch.Generator().manual_seed(2))  # leading dims kept
    with torch.no_grad():
        y_py = layer(x)
    _assert_same(_run_cpp(runner, path, x, tmp_path, how), y_py)


def test_scripted_bfloat16_round_trips(runner, tmp_path):
    layer = _sparse_linear(24, 40, 0.5, dtype=torch.bfloat16, seed=3)
    path = tmp_path / "model.pt"
    torch.jit.script(layer).save(str(path))
    x = torch.randn(9, 40, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    with torch.no_grad():
        y_py = layer(x)
    _assert_same(_run_cpp(runner, path, x, tmp_path), y_py)


def test_traced_model_matches_python(runner, tmp_path):
    torch.manual_seed(5)
    model = torch.nn.Sequential(
        torch.nn.Linear(32, 48), torch.nn.ReLU(), _sparse_linear(20, 48, 0.2, seed=6), torch.nn.Tanh()
    ).eval()
    x = torch.randn(11, 32)
    with torch.no_grad():
        traced = torch.jit.trace(model, (x,))
        y_py = model(x)
    path = tmp_path / "model.pt"
    traced.save(str(path))
    x2 = torch.randn(3, 32)  # another batch size than the one traced
    with torch.no_grad():
        y2_py = model(x2)
    _assert_same(_run_cpp(runner, path, x, tmp_path), y_py)
    _assert_same(_run_cpp(runner, path, x2, tmp_path), y2_py)


def test_raw_spmm_op_matches_python(runner, tmp_path):
    layer = _sparse_linear(15, 26, 0.4, seed=7)
    raw = _RawSpmm(layer.values.detach(), layer.crow_indices, layer.col_indices, layer.bias.detach())
    path = tmp_path / "model.pt"
    torch.jit.script(raw).save(str(path))
    x = torch.randn(6, 26, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        y_py = raw(x)
    torch.testing.assert_close(y_py, x @ layer.to_dense().T + layer.bias, rtol=1e-5, atol=1e-5)
    _assert_same(_run_cpp(runner, path, x, tmp_path), y_py)


def test_runner_reports_errors(runner, tmp_path):
    layer = _sparse_linear(8, 12, 0.5)
    model = tmp_path / "model.pt"
    torch.jit.script(layer).save(str(model))
    good_input = tmp_path / "x.pt"
    _save_input(good_input, torch.randn(2, 12))
    wrong_input = tmp_path / "wrong.pt"
    _save_input(wrong_input, torch.randn(2, 13))  # in_features mismatch
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a zip archive")
    out = tmp_path / "out.pt"

    def run(*args):
        return subprocess.run([str(runner), *map(str, args)], capture_output=True, text=True, timeout=RUN_TIMEOUT_S)

    usage = run(model)
    assert usage.returncode == 2 and "usage" in usage.stderr
    cases = [
        ((tmp_path / "missing.pt", good_input), "cannot open model"),
        ((garbage, good_input), "not a loadable TorchScript model"),
        ((model, tmp_path / "missing.pt"), "cannot open input"),
        ((model, garbage), "cannot read input"),
        ((model, model), "without an attribute 'x'"),
        ((model, wrong_input), "running the model failed"),
    ]
    for (model_arg, input_arg), message in cases:
        proc = run(model_arg, input_arg, out)
        assert proc.returncode == 1, (model_arg, input_arg, proc.returncode, proc.stderr)
        assert message in proc.stderr, proc.stderr
        assert not out.exists(), "a failed run must not write an output"
    assert "sparseadapter" in run(model, wrong_input, out).stderr  # the op's own message comes through
    bad_out = run(model, good_input, tmp_path / "no-such-dir" / "out.pt")
    assert bad_out.returncode == 1 and "cannot write output" in bad_out.stderr


# The exact version of VERSION: the installed package carries the one version source.
CONSUMER_CMAKE = """\
cmake_minimum_required(VERSION 3.18)
project(sparseadapter_consumer LANGUAGES CXX)
find_package(SparseAdapter @VERSION@ EXACT REQUIRED)
add_executable(consumer main.cpp)
# torch first: its link items end in -Wl,--as-needed, the case that would drop an unwrapped library.
target_link_libraries(consumer PRIVATE ${TORCH_LIBRARIES} SparseAdapter::sparseadapter)
"""

# Uses no symbol of libsparseadapter: only the dispatcher, as a served model would.
CONSUMER_MAIN = """\
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <iostream>
#include <optional>
#include <vector>

int main() {
  auto handle = c10::Dispatcher::singleton().findSchema({"sparseadapter::spmm", ""});
  if (!handle) {
    std::cerr << "sparseadapter::spmm is not registered\\n";
    return 1;
  }
  auto spmm = handle->typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                       const at::Tensor&, const std::optional<at::Tensor>&,
                                       const std::optional<at::Tensor>&)>();
  // W = [[1, 0, 2], [0, 3, 0]] in CSR, x = [1, 1, 1]: y = x @ W.T = [3, 3].
  auto values = at::tensor(std::vector<float>{1.f, 2.f, 3.f});
  auto crow = at::tensor(std::vector<int32_t>{0, 2, 3});
  auto col = at::tensor(std::vector<int32_t>{0, 2, 1});
  auto y = spmm.call(at::ones({1, 3}), values, crow, col, std::nullopt, std::nullopt);
  std::cout << "y = " << y[0][0].item<float>() << " " << y[0][1].item<float>() << std::endl;
  return 0;
}
"""


def test_install_and_find_package(cmake_build, runner, tmp_path):
    cmake, build, args = cmake_build
    prefix = tmp_path / "prefix"
    run_step([cmake, "--install", str(build), "--prefix", str(prefix)], "cmake --install", CONFIGURE_TIMEOUT_S)
    configs = list(prefix.glob("lib*/cmake/SparseAdapter/SparseAdapterConfig.cmake"))
    assert configs, f"no SparseAdapterConfig.cmake under {prefix}"
    assert (configs[0].parent / "SparseAdapterConfigVersion.cmake").is_file()

    # The installed runner finds the installed library through its RPATH.
    layer = _sparse_linear(10, 14, 0.5, seed=9)
    model = tmp_path / "model.pt"
    torch.jit.script(layer).save(str(model))
    x = torch.randn(5, 14)
    with torch.no_grad():
        y_py = layer(x)
    installed_runner = prefix / "bin" / "sparseadapter_run"
    _assert_same(_run_cpp(installed_runner, model, x, tmp_path), y_py)

    src, cbuild = tmp_path / "consumer", tmp_path / "consumer-build"
    src.mkdir()
    version = (REPO / "VERSION").read_text(encoding="utf-8").strip()
    (src / "CMakeLists.txt").write_text(CONSUMER_CMAKE.replace("@VERSION@", version))
    (src / "main.cpp").write_text(textwrap.dedent(CONSUMER_MAIN))
    consumer_args = [a for a in args if not a.startswith("-DCMAKE_PREFIX_PATH=")]
    run_step(
        [
            cmake,
            "-S",
            str(src),
            "-B",
            str(cbuild),
            *consumer_args,
            f"-DCMAKE_PREFIX_PATH={prefix};{torch.utils.cmake_prefix_path}",
            # What Ubuntu's toolchain does by default: the package must undo it for its library.
            "-DCMAKE_EXE_LINKER_FLAGS=-Wl,--as-needed",
        ],
        "consumer configure",
        CONFIGURE_TIMEOUT_S,
    )
    run_step([cmake, "--build", str(cbuild), "--parallel", PARALLEL], "consumer build", BUILD_TIMEOUT_S)
    ninja_file = cbuild / "build.ninja"
    if ninja_file.is_file():  # the package wraps its library in --no-as-needed by itself
        assert "--push-state,--no-as-needed" in ninja_file.read_text()
    exe = cbuild / "consumer"
    proc = subprocess.run([str(exe)], capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert proc.returncode == 0, f"consumer failed ({proc.returncode}): {proc.stdout}\n{proc.stderr}"
    assert proc.stdout.strip() == "y = 3 3", proc.stdout
