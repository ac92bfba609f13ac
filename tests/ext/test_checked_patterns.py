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


# What the kernels derive from a checked pattern (the bf16 kernel's column pairs, the expansion's
# column masks) is kept with its entry: built at the first call, rebuilt after any change.


def _has_vbmi2():
    try:
        with open("/proc/cpuinfo") as f:
            return "avx512_vbmi2" in f.read()
    except OSError:
        return False


def _changed_column(p):
    """An in-place change of one column to another valid one, keeping its row's columns increasing:
    the last entry of a row whose last column is not the last column moves one to the right."""
    for r in range(p.shape[0]):
        end = int(p.crow[r + 1])
        if end > int(p.crow[r]) and int(p.col[end - 1]) < p.shape[1] - 1:
            p.col[end - 1] += 1
            return
    raise AssertionError("no column can move")


def _reference(p, values, x):
    w = ops.csr_to_dense(values.double(), p.crow, p.col, p.shape[1])
    return x.double() @ w.T


@pytest.mark.skipif(ops.cpu_isa() != "avx512bf16", reason="the bf16 pair kernel runs on avx512bf16 CPUs only")
def test_the_bf16_pairs_are_built_once_per_pattern_and_again_after_a_change(seed):
    p = Pattern(12, 20, 0.5, seed=seed)
    values = p.values64.bfloat16()
    x = torch.randn(40, 20).bfloat16()  # more tokens than the few-token products take
    previous = ops.set_path_mode("sparse")
    try:
        before = _stats()
        first = ops.spmm(x, values, p.crow, p.col)
        assert _stats()["derived_builds"] == before["derived_builds"] + 1
        before = _stats()
        assert torch.equal(ops.spmm(x, values, p.crow, p.col), first)
        assert _stats()["derived_builds"] == before["derived_builds"]
        # new values, same pattern: nothing rebuilt, and the new values are used
        assert torch.equal(ops.spmm(x, values * 2, p.crow, p.col), first * 2)
        assert _stats()["derived_builds"] == before["derived_builds"]

        _changed_column(p)
        before = _stats()
        changed = ops.spmm(x, values, p.crow, p.col)
        after = _stats()
        assert after["checks"] == before["checks"] + 1 and after["derived_builds"] == before["derived_builds"] + 1
        torch.testing.assert_close(changed.double(), _reference(p, values, x), rtol=2e-2, atol=2e-2)

        p.col[0] = 100  # a changed pattern is still checked before the pairs are built from it
        with pytest.raises(ValueError, match=r"spmm: col_indices\[0\] = 100 is out of range for 20 columns"):
            ops.spmm(x, values, p.crow, p.col)
    finally:
        ops.set_path_mode(previous)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_expansion_follows_a_changed_pattern(dtype, seed):
    p = Pattern(9, 70, 0.4, seed=seed)  # 70 columns: a partial last word of 32
    values = p.values64.to(dtype)
    ops.csr_to_dense(values, p.crow, p.col, 70)
    before = _stats()
    ops.csr_to_dense(values, p.crow, p.col, 70)
    assert _stats()["derived_builds"] == before["derived_builds"]
    _changed_column(p)
    mask = torch.zeros(p.shape, dtype=torch.bool)
    rows = torch.repeat_interleave(torch.arange(9), p.crow.diff().long())
    mask[rows, p.col.long()] = True
    dense = torch.zeros(p.shape, dtype=dtype)
    dense[mask] = values
    before = _stats()
    assert torch.equal(ops.csr_to_dense(values, p.crow, p.col, 70), dense)
    other = torch.randn(p.shape).to(dtype)
    assert torch.equal(ops.csr_gather(other, p.crow, p.col), other[mask])
    if ops.cpu_isa().startswith("avx512") and _has_vbmi2():  # the masks are built where they are used
        assert _stats()["derived_builds"] == before["derived_builds"] + 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_expansion_of_unsorted_columns_is_exact(dtype):
    """Columns out of order within a row (allowed by the checks) take the loop over the entries."""
    crow = torch.tensor([0, 3, 3, 5])
    col = torch.tensor([40, 2, 33, 1, 0])
    values = torch.arange(1, 6, dtype=dtype)
    dense = ops.csr_to_dense(values, crow, col, 41)
    want = torch.zeros(3, 41, dtype=dtype)
    want[0, 40], want[0, 2], want[0, 33], want[2, 1], want[2, 0] = 1, 2, 3, 4, 5
    assert torch.equal(dense, want)
    assert torch.equal(ops.csr_gather(want * 3, crow, col), values * 3)


def _tiles_for_every_thread(tiles, tile_tokens=32):
    """Tokens for at least `tiles` tiles and one per thread (fewer split rows instead), plus a
    partial tile."""
    return tile_tokens * max(tiles, torch.get_num_threads()) + 5


# (out, in, tokens): the fp32 SpMM staging its tile by column blocks (few outputs, from two tiles on
# when the blocks are kept; 64-token tiles once there is one per thread), and walking a block order
# (more outputs, from 16 tiles on).
TILE_ORDER_CASES = {
    "column_blocks": (20, 300, _tiles_for_every_thread(2)),
    "column_blocks_wide_tiles": (20, 300, _tiles_for_every_thread(2, tile_tokens=64)),
    "block_order": (200, 300, _tiles_for_every_thread(16)),
}


@pytest.mark.parametrize("case", TILE_ORDER_CASES)
def test_the_tile_orders_are_built_once_per_pattern_and_again_after_a_change(case, seed):
    out_f, in_f, tokens = TILE_ORDER_CASES[case]
    p = Pattern(out_f, in_f, 0.3, seed=seed)
    values = p.values64.float()
    x = torch.randn(tokens, in_f)
    previous = ops.set_path_mode("sparse")
    try:
        before = _stats()["derived_builds"]
        first = ops.spmm(x, values, p.crow, p.col)
        assert _stats()["derived_builds"] == before + 1
        torch.testing.assert_close(first.double(), _reference(p, values, x), rtol=1e-4, atol=1e-4)
        assert torch.equal(ops.spmm(x, values, p.crow, p.col), first)
        assert torch.equal(ops.spmm(x, values * 2, p.crow, p.col), first * 2)  # new values, same order
        assert _stats()["derived_builds"] == before + 1

        _changed_column(p)
        changed = ops.spmm(x, values, p.crow, p.col)
        assert _stats()["derived_builds"] == before + 2
        torch.testing.assert_close(changed.double(), _reference(p, values, x), rtol=1e-4, atol=1e-4)

        # A pattern the cache cannot keep (inference tensors) is sorted per call where the order pays
        # off within one call (many tiles), else multiplied in CSR order.
        with torch.inference_mode():
            crow, col = p.crow.clone(), p.col.clone()
        before = _stats()["derived_builds"]
        for _ in range(2):
            torch.testing.assert_close(ops.spmm(x, values, crow, col), changed, rtol=1e-5, atol=1e-4)
        assert _stats()["derived_builds"] == before + (2 if case == "block_order" else 0)
    finally:
        ops.set_path_mode(previous)


def test_the_sddmm_keeps_an_order_per_block_shape(seed):
    """Few tiles take CSR order and many the block order: two orders of one pattern, each built once."""
    p = Pattern(20, 300, 0.3, seed=seed)
    previous = ops.set_path_mode("sparse")
    try:
        for tokens in (100, 64 * 16 + 3):
            x, grad_out = torch.randn(tokens, 300), torch.randn(tokens, 20)
            want = (grad_out.double().T @ x.double())[p.mask]
            before = _stats()["derived_builds"]
            torch.testing.assert_close(ops.sddmm(grad_out, x, p.crow, p.col).double(), want, rtol=1e-4, atol=1e-4)
            assert _stats()["derived_builds"] == before + 1
            ops.sddmm(grad_out, x, p.crow, p.col)
            assert _stats()["derived_builds"] == before + 1
        _changed_column(p)
        mask = ops.csr_to_dense(torch.ones(p.nnz), p.crow, p.col, 300).bool()
        before = _stats()["derived_builds"]
        torch.testing.assert_close(
            ops.sddmm(grad_out, x, p.crow, p.col).double(),
            (grad_out.double().T @ x.double())[mask],
            rtol=1e-4,
            atol=1e-4,
        )
        assert _stats()["derived_builds"] == before + 1
    finally:
        ops.set_path_mode(previous)


# (bottleneck, tokens): the fused adapter's down projection 300 -> bottleneck staging x by column
# blocks (a bottleneck tile within L1, from two tiles on) or walking a block order (from 16 tiles on).
ADAPTER_ORDER_CASES = {"column_blocks": (20, 32 * 2 + 5), "block_order": (200, 32 * 16 + 5)}


@pytest.mark.parametrize("case", ADAPTER_ORDER_CASES)
def test_the_fused_adapter_keeps_its_tile_order(case, seed):
    bottleneck, tokens = ADAPTER_ORDER_CASES[case]
    down, up = Pattern(bottleneck, 300, 0.3, seed=seed), Pattern(300, bottleneck, 0.3, seed=seed + 1)

    def buffers(p):
        args = p.linear_args(p.values64.float(), None)
        return args[:4] + args[5:]  # without the forward row order

    x = torch.randn(tokens, 300)
    previous = ops.set_path_mode("sparse")
    try:
        before = _stats()["derived_builds"]
        first = ops.sparse_adapter(x, x, buffers(down), buffers(up), "relu", 1.0)
        assert _stats()["derived_builds"] == before + 1
        want = x.double() + torch.relu(x.double() @ down.weight64.T) @ up.weight64.T
        torch.testing.assert_close(first.double(), want, rtol=1e-4, atol=1e-4)
        assert torch.equal(ops.sparse_adapter(x, x, buffers(down), buffers(up), "relu", 1.0), first)
        assert _stats()["derived_builds"] == before + 1
    finally:
        ops.set_path_mode(previous)


def _row_across_column_blocks():
    """A pattern [3, 600] whose row 1 ends one column block and starts the next (the other rows are
    empty there), for 128- and 256-column blocks alike."""
    crow = torch.tensor([0, 2, 6, 6], dtype=torch.int32)
    col = torch.tensor([3, 100, 200, 250, 300, 520], dtype=torch.int32)
    return crow, col, torch.randn(6, dtype=torch.float64)


@pytest.mark.parametrize("tokens", [2 * 32 + 1, 64 * 4 + 1, 32 * 16 + 1])
def test_a_row_across_column_blocks_is_split_at_each_block(tokens):
    """Each block is staged on its own, so a row's run of nonzeros must end at a block's end: merged
    into one run, the next block's nonzeros were read from the previous block's staged columns."""
    crow, col, values64 = _row_across_column_blocks()
    w = ops.csr_to_dense(values64, crow, col, 600)
    x = torch.randn(tokens, 600)
    previous = ops.set_path_mode("sparse")
    try:
        want = x.double() @ w.T
        torch.testing.assert_close(ops.spmm(x, values64.float(), crow, col).double(), want, rtol=1e-5, atol=1e-4)
        with torch.inference_mode():  # built for the call, not kept
            y = ops.spmm(x, values64.float(), crow.clone(), col.clone())
        torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-4)
        up = Pattern(600, 3, 0.7, seed=tokens)
        down = (values64.float(), None, crow, col, *ops.csr_transpose(crow, col, 600))
        down += (ops.csr_row_order(down[4]),)
        up_args = up.linear_args(up.values64.float(), None)
        got = ops.sparse_adapter(x, None, down, up_args[:4] + up_args[5:], "identity", 1.0)
        torch.testing.assert_close(got.double(), want @ up.weight64.T, rtol=1e-5, atol=1e-4)
    finally:
        ops.set_path_mode(previous)
