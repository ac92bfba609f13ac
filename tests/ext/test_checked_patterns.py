"""CPU op calls check a pattern's structure once while its tensors stay unchanged; any change is seen.

The O(nnz) pass (every crow_indices entry and every column in range) runs at the first call of a
pattern; later calls with the same tensors skip it (`_C.checked_pattern_stats()` counts both). An
in-place write through torch bumps the tensors' version counters, so a pattern corrupted after a cached
call is still rejected, as are new tensors and a narrower x.
"""

import pytest
import torch
from conftest import Pattern

import sparseadapter_ext as ops
from sparseadapter import SparseLinear
from sparseadapter_ext import _C


def _stats():
    return _C.checked_pattern_stats()


def _pattern(seed):
    return Pattern(6, 8, 0.5, seed=seed)


def _spmm(p, x, crow=None, col=None):
    crow = p.crow if crow is None else crow
    col = p.col if col is None else col
    return ops.spmm(x, p.values64.float(), crow, col)


def test_a_second_call_skips_the_pass_and_gives_the_same_result(seed):
    p = _pattern(seed)
    x = torch.randn(3, 8)
    first = _spmm(p, x)
    before = _stats()
    second = _spmm(p, x)
    after = _stats()
    assert after["hits"] == before["hits"] + 1
    assert after["checks"] == before["checks"]
    assert torch.equal(first, second)


@pytest.mark.parametrize("mode", ["plain", "no_grad", "inference_mode"])
def test_a_column_corrupted_after_a_cached_call_is_rejected(seed, mode):
    p = _pattern(seed)
    x = torch.randn(3, 8)
    _spmm(p, x)
    _spmm(p, x)  # cached now
    ctx = {"plain": torch.enable_grad, "no_grad": torch.no_grad, "inference_mode": torch.inference_mode}[mode]
    with ctx():
        p.col[2] = 100
        with pytest.raises(ValueError, match=r"spmm: col_indices\[2\] = 100 is out of range for 8 columns"):
            _spmm(p, x)


def test_crow_corrupted_through_a_view_is_rejected(seed):
    p = _pattern(seed)
    x = torch.randn(3, 8)
    _spmm(p, x)
    view = p.crow[3:5]  # a view shares the version counter of its base
    view[0] = view[1] + 1
    with pytest.raises(ValueError, match=r"non-decreasing, but crow_indices\[4\] < crow_indices\[3\]"):
        _spmm(p, x)


def test_a_repaired_pattern_runs_again(seed):
    p = _pattern(seed)
    x = torch.randn(3, 8)
    expected = _spmm(p, x)
    good = p.col[2].item()
    p.col[2] = 100
    with pytest.raises(ValueError, match="out of range"):
        _spmm(p, x)
    p.col[2] = good
    torch.testing.assert_close(_spmm(p, x), expected, rtol=0, atol=0)


def test_new_tensors_with_the_same_contents_are_checked(seed):
    p = _pattern(seed)
    x = torch.randn(3, 8)
    _spmm(p, x)
    before = _stats()
    _spmm(p, x, crow=p.crow.clone(), col=p.col.clone())
    assert _stats()["checks"] == before["checks"] + 1


def test_a_narrower_x_is_checked_against_the_columns(seed):
    p = _pattern(seed)
    _spmm(p, torch.randn(3, 8))  # cached for 8 columns
    widest = int(p.col.max())
    with pytest.raises(ValueError, match=f"is out of range for {widest} columns"):
        ops.spmm(torch.randn(3, widest), p.values64.float(), p.crow, p.col)


def test_inference_tensors_are_checked_on_every_call(seed):
    p = _pattern(seed)
    with torch.inference_mode():
        crow, col = p.crow.clone(), p.col.clone()  # inference tensors: no version counter
        x = torch.randn(3, 8)
        _spmm(p, x, crow, col)
        before = _stats()
        _spmm(p, x, crow, col)
        assert _stats()["checks"] == before["checks"] + 1
        col[2] = 100
        with pytest.raises(ValueError, match="out of range"):
            _spmm(p, x, crow, col)


def test_a_fused_adapter_corrupted_after_a_cached_call_is_rejected(seed):
    torch.manual_seed(seed)
    down = SparseLinear.from_dense(torch.randn(4, 8), torch.rand(4, 8) < 0.5, torch.randn(4))
    up = SparseLinear.from_dense(torch.randn(8, 4), torch.rand(8, 4) < 0.5, torch.randn(8))
    x = torch.randn(1, 1, 8)
    with torch.inference_mode():
        ops.sparse_adapter(x, x, down.csr_buffers(), up.csr_buffers(), "relu", 1.0)
        before = _stats()
        ops.sparse_adapter(x, x, down.csr_buffers(), up.csr_buffers(), "relu", 1.0)
        assert _stats()["hits"] == before["hits"] + 2  # down and up
        up.col_indices[0] = 7  # the bottleneck is 4 wide
        with pytest.raises(ValueError, match=r"sparse_adapter \(up\): col_indices\[0\] = 7 is out of range"):
            ops.sparse_adapter(x, x, down.csr_buffers(), up.csr_buffers(), "relu", 1.0)


def test_a_sparse_linear_layer_corrupted_after_a_cached_call_is_rejected(seed):
    torch.manual_seed(seed)
    layer = SparseLinear.from_dense(torch.randn(6, 8), torch.rand(6, 8) < 0.5, torch.randn(6))
    x = torch.randn(2, 8)
    with torch.no_grad():
        layer(x)
        layer(x)
        layer.crow_indices[0] = 1
    with pytest.raises(ValueError, match=r"sparse_linear: crow_indices\[0\] must be 0, got 1"):
        layer(x)
