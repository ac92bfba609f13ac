"""Shared fixtures: devices under test, random sparse patterns, the numerical test rule and the
CMake build of the C++ side."""
import zlib

import pytest
import torch

import cmake_support
import sparseadapter_ext


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
    "one_col": (24, 1, 0.7, 50),
    "wide": (5, 1031, 0.1, 67),
    "no_tokens": (16, 24, 0.5, 0),
    # enough tokens and features for the CPU kernels' block order (tile.h): several row and column
    # blocks, a partial last tile; the second with mostly empty rows and blocks
    "blocked": (100, 700, 0.2, 1100),
    "blocked_sparse": (70, 520, 0.03, 1030),
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
        return (values, bias, self.crow, self.col, sparseadapter_ext.csr_row_order(self.crow),
                crow_t, col_t, perm_t, sparseadapter_ext.csr_row_order(crow_t))


def assert_close_to_reference(out, ref64, same_precision_dense, what=""):
    """The numerical rule (as in flash-attention's tests): the kernel's error against the float64
    reference may be at most twice the error of the same-precision dense PyTorch computation, plus a
    few ulps of the result's scale for the cases where that error is zero (an exact zero result
    must come out exactly zero)."""
    assert out.shape == ref64.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert not torch.isnan(out).any(), f"{what}: NaN in output"
    if ref64.numel() == 0:
        return
    err = (out.double() - ref64).abs().max().item()
    dense_err = (same_precision_dense.double() - ref64).abs().max().item()
    eps = torch.finfo(out.dtype).eps
    floor = 4 * eps * ref64.abs().max().item()
    assert err <= 2 * dense_err + floor, (
        f"{what}: max error {err:.3g} > 2 x dense error {dense_err:.3g} + {floor:.3g} ({out.dtype})")


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
