"""Shared fixtures: devices under test, random sparse patterns, the numerical test rule and the
CMake build of the C++ side.

Layout: a test lives in the folder of what it tests, mirroring the packages: ext/ (sparseadapter_ext:
ops, kernels, CPU ISA, autocast, autograd, the numerical oracle), adapters/, pruning/, training/,
serving/ (the C++ side included), bench/; tests/ itself holds the top-level modules' tests (SparseLinear,
the CLI) and the cross-cutting ones (README, version, build state, processes). pytest's default import
mode puts this folder on sys.path when it loads this file, so the support modules beside it (*_support.py,
repo_paths.py) import from every subfolder; test file names stay unique across folders (that mode
imports each by its base name)."""

import math
import os
import sys
import zlib

# The suite tests our CSR kernels unless SPARSEADAPTER_PATH says otherwise (=dense runs it on the
# dense path); the numerics tests take the `path` fixture to run both, and the path choice's own
# tests set the mode themselves. Subprocesses inherit the variable.
os.environ.setdefault("SPARSEADAPTER_PATH", "sparse")
# No test reads or writes the user's path-decision cache (tests of the cache give their own files).
os.environ["SPARSEADAPTER_CACHE_DIR"] = ""

import cmake_support
import pytest
import torch

import sparseadapter_ext

# pytest rewrites the asserts of every test module when it imports it (after this file) and keeps the
# result in __pycache__, unless bytecode writing is off (PYTHONDONTWRITEBYTECODE, common in containers):
# then it redoes all of them on every start, about 20 s of the suite's start-up on 2 cores. The cache
# holds only this repository's compiled modules and changes no result.
sys.dont_write_bytecode = False


PATHS = ["sparse", "dense"]


def _devices():
    devices = ["cpu"]
    if torch.cuda.is_available() and sparseadapter_ext.has_cuda_kernels():
        devices.append("cuda")
    return devices


DEVICES = _devices()
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
INDEX_DTYPES = [torch.int32, torch.int64]

# (out_features, in_features, density, tokens): odd sizes, empty rows, nnz = 0, fully dense, one row,
# one token, one column, no tokens.
PATTERN_CASES = {
    "odd": (37, 53, 0.3, 71),
    "empty_rows": (29, 45, 0.15, 33),
    "nnz0": (17, 23, 0.0, 9),
    "dense": (19, 21, 1.0, 35),
    "one_row": (1, 77, 0.5, 40),
    "one_token": (33, 65, 0.4, 1),
    # the CPU kernels' few-token products (few_tokens.h) up to their limit of 8 tokens
    "eight_tokens": (45, 130, 0.3, 8),
    "one_col": (24, 1, 0.7, 50),
    "wide": (5, 1031, 0.1, 67),
    "no_tokens": (16, 24, 0.5, 0),
    # enough tokens and features for the CPU kernels' block order (tile.h; the SpMM's column blocks,
    # column_blocks.h): several row and column blocks, a partial last tile and column block; the second
    # with mostly empty rows and blocks
    "blocked": (100, 700, 0.2, 1100),
    "blocked_sparse": (70, 520, 0.03, 1030),
    # more outputs than the SpMM stages column block by column block (column_blocks.h): the whole tile
    # staged, then walked in block order
    "blocked_many_outputs": (150, 300, 0.1, 530),
    # column blocks without nonzeros are skipped: the output is the bias alone
    "blocked_nnz0": (60, 600, 0.0, 600),
    # narrow inputs take the SpMM's 64-token tiles (spmm_cpu.cpp) when there is one per thread: features
    # not a multiple of 16 and a partial last tile; whole tiles with mostly empty rows; no nonzeros
    "wide_tiles": (45, 100, 0.3, 200),
    "wide_tiles_whole": (40, 128, 0.02, 256),
    "wide_tiles_nnz0": (20, 40, 0.0, 130),
}


def pytest_generate_tests(metafunc):
    if "device" in metafunc.fixturenames:
        metafunc.parametrize("device", DEVICES)


class Pattern:
    """A random CSR pattern with its float64 dense weight, for reference computations."""

    def __init__(self, out_features, in_features, density, *, device="cpu", index_dtype=torch.int32, seed=0):
        gen = torch.Generator().manual_seed(seed)
        mask = torch.rand(out_features, in_features, generator=gen) < density
        if 0.0 < density < 1.0 and out_features > 2:
            mask[1] = False  # always an empty row
        self.shape = (out_features, in_features)
        self.mask = mask
        self.weight64 = torch.randn(out_features, in_features, generator=gen, dtype=torch.float64) * mask
        crow = torch.zeros(out_features + 1, dtype=torch.int64)
        crow[1:] = mask.sum(1).cumsum(0)
        self.crow = crow.to(index_dtype).to(device)
        self.col = mask.nonzero()[:, 1].to(index_dtype).to(device)
        self.values64 = self.weight64[mask].to(device)
        self.weight64 = self.weight64.to(device)
        self.device = device

    @property
    def nnz(self):
        return self.col.numel()

    def transposed(self):
        crow_t, col_t, perm_t = sparseadapter_ext.csr_transpose(self.crow, self.col, self.shape[1])
        return crow_t, col_t, perm_t

    def linear_args(self, values, bias):
        """The argument list of sparse_linear after x."""
        crow_t, col_t, perm_t = self.transposed()
        return (
            values,
            bias,
            self.crow,
            self.col,
            sparseadapter_ext.csr_row_order(self.crow),
            crow_t,
            col_t,
            perm_t,
            sparseadapter_ext.csr_row_order(crow_t),
        )


def float64_reference(fn, *inputs, absolute=None):
    """(fn(inputs), absolute(|inputs|)), both on float64 copies (None passes through; absolute is fn
    unless given): the reference and, for a computation made of sums of products, S, each output's
    sum of the absolute values of its terms, which sizes the rounding floor of
    assert_close_to_reference. fn may return a tensor or a sequence of tensors; a constant in it (a
    scale) must not be negative."""

    def run(f, cast):
        return f(*(None if t is None else cast(t.detach().double()) for t in inputs))

    return run(fn, lambda t: t), run(absolute or fn, torch.abs)


def assert_close_to_reference(out, ref64, abs64, terms, same_precision_dense, what=""):
    """The numerical rule (as in flash-attention's tests): elementwise, the kernel's error against the
    float64 reference `ref64` may be at most twice the largest error of the same-precision dense
    PyTorch computation, plus a floor for summing in another order, which that error need not show
    (in float64 both often come from the same library and it is exactly 0):

        floor_i = 2 * eps_acc * sqrt(K) * S_i + eps_out * |ref_i|

    S_i (`abs64`, from float64_reference) is the sum of the absolute values of output i's terms, K
    (`terms`) the longest chain of roundings a term goes through (the length of the sum, or a bound
    on it), eps_acc the epsilon of the type the kernels accumulate in (at::opmath_type: float32 for
    float16/bfloat16/float32), eps_out that of out's dtype (the final rounding).

    Why sqrt(K) and 2: in any order the sum's error is sum_j delta_j * s_j over its roundings, with
    |delta_j| <= u = eps_acc / 2, every partial result |s_j| <= S_i and at most K of them on a
    term's way, so sum_j s_j^2 <= K * S_i^2. The worst case, K * u * S_i, is within the floor up to
    K = 16. Beyond, with rounding errors independent and of mean 0, the error's standard deviation
    is at most sqrt(K / 3) * u * S_i and the floor 7 of them (Bernstein's inequality: exceeded with
    probability about 1e-5 per output at K = 17, less beyond). Randomly signed terms (randn inputs)
    do far better, their partial results being far below S_i: measured errors stay under
    0.4 * eps_acc * sqrt(K) * S_i, also with the terms summed in sorted order. Yet a dropped or
    wrong term (about S_i / K) fails while K^1.5 < 1 / (2 * eps_acc), and an error of K ulps of the
    largest output (about 4 * sqrt(K) for randn inputs, where S_i is about 0.64 * K) by a factor of
    about 3. An exact zero (S_i = 0) must come out exactly zero."""
    assert out.shape == ref64.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert not torch.isnan(out).any(), f"{what}: NaN in output"
    if ref64.numel() == 0:
        return
    err = (out.double() - ref64).abs()
    dense_err = (same_precision_dense.double() - ref64).abs().max().item()
    eps_acc = torch.finfo(torch.float64 if out.dtype == torch.float64 else torch.float32).eps
    floor = 2 * eps_acc * math.sqrt(terms) * abs64 + torch.finfo(out.dtype).eps * ref64.abs()
    excess = err - (2 * dense_err + floor)
    if (excess > 0).any():
        i = int(excess.flatten().argmax())
        raise AssertionError(
            f"{what}: {int((excess > 0).sum())} of {excess.numel()} beyond the rule, worst: error "
            f"{err.flatten()[i].item():.3g} > 2 x dense error {dense_err:.3g} + floor {floor.flatten()[i].item():.3g} "
            f"(S = {abs64.flatten()[i].item():.3g}, K = {terms}, {out.dtype})"
        )


@pytest.fixture(autouse=True)
def _restore_path_mode():
    """A test that sets the path mode leaves the suite's mode behind it."""
    mode = sparseadapter_ext.path_mode()
    yield
    sparseadapter_ext.set_path_mode(mode)


@pytest.fixture(params=PATHS)
def path(request):
    """Runs a test on each path of the ops: the CSR kernels and the expansion + dense GEMM."""
    sparseadapter_ext.set_path_mode(request.param)
    return request.param


@pytest.fixture
def seed(request):
    """A distinct seed per test case: inputs differ between cases, and a failure reproduces."""
    return zlib.crc32(request.node.nodeid.encode())


@pytest.fixture(autouse=True)
def _seeded_global_rng(request):
    """torch's global generator seeded per test case, for tests that draw from it: reproducible."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(scope="session")
def cmake_build(tmp_path_factory):
    """The CMake project (library, sparseadapter_run, sparseadapter_serve), configured and built once
    per session: (cmake, build dir, configure args)."""
    return cmake_support.build_project(tmp_path_factory)
