"""Every op against a float64 dense reference: all dtypes, index dtypes, devices and pattern shapes."""

import pytest
import torch
from conftest import DTYPES, INDEX_DTYPES, PATTERN_CASES, Pattern, assert_close_to_reference, float64_reference

import sparseadapter_ext as ops
from sparseadapter import csr_to_dense


def _inputs(case, device, dtype, index_dtype, seed):
    out_f, in_f, density, tokens = PATTERN_CASES[case]
    p = Pattern(out_f, in_f, density, device=device, index_dtype=index_dtype, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    x64 = torch.randn(tokens, in_f, generator=gen, dtype=torch.float64).to(device)
    bias64 = torch.randn(out_f, generator=gen, dtype=torch.float64).to(device)
    return p, x64, bias64


@pytest.mark.parametrize("case", list(PATTERN_CASES))
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_spmm_matches_dense_reference(case, dtype, index_dtype, device, seed, path):
    p, x64, bias64 = _inputs(case, device, dtype, index_dtype, seed)
    x, values, bias = x64.to(dtype), p.values64.to(dtype), bias64.to(dtype)
    w = p.weight64.to(dtype)
    y = ops.spmm(x, values, p.crow, p.col, ops.csr_row_order(p.crow), bias)
    assert y.dtype == dtype and y.device == x.device
    in_f = p.shape[1]
    ref64, abs64 = float64_reference(torch.nn.functional.linear, x, w, bias)
    dense = torch.nn.functional.linear(x, w, bias)
    assert_close_to_reference(y, ref64, abs64, in_f + 1, dense, f"spmm {case}")
    # without bias and without row order
    y0 = ops.spmm(x, values, p.crow, p.col)
    ref64, abs64 = float64_reference(torch.nn.functional.linear, x, w)
    assert_close_to_reference(y0, ref64, abs64, in_f, torch.nn.functional.linear(x, w), f"spmm {case} no bias")


@pytest.mark.parametrize("case", list(PATTERN_CASES))
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_sddmm_matches_dense_reference(case, dtype, index_dtype, device, seed, path):
    p, x64, _ = _inputs(case, device, dtype, index_dtype, seed)
    gen = torch.Generator().manual_seed(seed + 2)
    g64 = torch.randn(x64.shape[0], p.shape[0], generator=gen, dtype=torch.float64).to(device)
    x, g = x64.to(dtype), g64.to(dtype)
    out = ops.sddmm(g, x, p.crow, p.col)
    assert out.shape == (p.nnz,) and out.dtype == dtype
    mask = p.mask.to(device)
    ref64, abs64 = float64_reference(lambda g, x: (g.T @ x)[mask], g, x)
    assert_close_to_reference(out, ref64, abs64, x.shape[0], (g.T @ x)[mask], f"sddmm {case}")


@pytest.mark.parametrize("case", ["odd", "empty_rows", "dense", "one_token", "wide", "blocked"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_sparse_linear_forward_backward(case, dtype, device, seed, path):
    p, x64, bias64 = _inputs(case, device, dtype, torch.int32, seed)
    x = x64.to(dtype).requires_grad_()
    values = p.values64.to(dtype).requires_grad_()
    bias = bias64.to(dtype).requires_grad_()
    y = ops.sparse_linear(x, *p.linear_args(values, bias))
    gen = torch.Generator().manual_seed(seed + 3)
    gy = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(device).to(dtype)
    y.backward(gy)

    mask = p.mask.to(device)

    def linear_and_grads(x, w, b, gy):
        """y and the gradients of x, the stored weights and the bias, by dense PyTorch in x's dtype."""
        x, w, b = (t.detach().requires_grad_() for t in (x, w, b))
        y = torch.nn.functional.linear(x, w, b)
        gx, gw, gb = torch.autograd.grad(y, (x, w, b), gy)
        return y.detach(), gx, gw[mask], gb

    w = p.weight64.to(dtype)
    ref64, abs64 = float64_reference(linear_and_grads, x, w, bias, gy)
    dense = linear_and_grads(x, w, bias, gy)
    tokens, (out_f, in_f) = x.shape[0], p.shape
    checks = {
        "forward": (y.detach(), in_f + 1),
        "grad x": (x.grad, out_f),
        "grad values": (values.grad, tokens),
        "grad bias": (bias.grad, tokens),
    }
    for i, (name, (got, terms)) in enumerate(checks.items()):
        assert_close_to_reference(got, ref64[i], abs64[i], terms, dense[i], name)


def test_leading_dims_and_non_contiguous_inputs(device, seed, path):
    p = Pattern(40, 36, 0.3, device=device, seed=seed)
    base = torch.randn(36, 5, 3, 2, dtype=torch.float64, device=device)
    x = base.permute(2, 1, 3, 0)[:, :, 0, :]  # [3, 5, 36], non-contiguous
    assert not x.is_contiguous()
    values = p.values64
    y = ops.spmm(x, values, p.crow, p.col)
    assert y.shape == (3, 5, 40)
    torch.testing.assert_close(y, x @ p.weight64.T)
    g = torch.randn(3, 5, 40, dtype=torch.float64, device=device).transpose(0, 1)  # [5, 3, 40] non-contig
    xt = x.transpose(0, 1)
    out = ops.sddmm(g, xt, p.crow, p.col)
    torch.testing.assert_close(out, (g.reshape(-1, 40).T @ xt.reshape(-1, 36))[p.mask.to(device)])
    # non-contiguous values (a strided view)
    vals2 = torch.stack([values, values], 1)[:, 0]
    torch.testing.assert_close(ops.spmm(x, vals2, p.crow, p.col), y)


@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
def test_csr_transpose_is_the_transposed_pattern(index_dtype, device, seed):
    p = Pattern(23, 31, 0.3, device=device, index_dtype=index_dtype, seed=seed)
    crow_t, col_t, perm = ops.csr_transpose(p.crow, p.col, 31)
    assert crow_t.dtype == col_t.dtype == perm.dtype == index_dtype
    dense_t = csr_to_dense(crow_t, col_t, p.values64[perm.long()], (31, 23))
    torch.testing.assert_close(dense_t, p.weight64.T)
    # columns of W.T (rows of W) are sorted within each row of W.T
    for r in range(31):
        seg = col_t[crow_t[r] : crow_t[r + 1]]
        assert torch.all(seg[1:] > seg[:-1])


def test_csr_row_order_sorts_rows_by_length(device, seed):
    p = Pattern(50, 40, 0.3, device=device, seed=seed)
    order = ops.csr_row_order(p.crow)
    lengths = (p.crow[1:] - p.crow[:-1])[order.long()]
    assert torch.all(lengths[:-1] >= lengths[1:])
    assert sorted(order.tolist()) == list(range(50))


def test_row_order_does_not_change_the_result(device, seed):
    p = Pattern(64, 48, 0.4, device=device, seed=seed)
    x = torch.randn(100, 48, dtype=torch.float32, device=device)
    values = p.values64.float()
    shuffled = torch.randperm(64, generator=torch.Generator().manual_seed(seed)).to(p.crow.dtype).to(device)
    a = ops.spmm(x, values, p.crow, p.col)
    b = ops.spmm(x, values, p.crow, p.col, shuffled)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_results_are_deterministic(device, seed):
    p = Pattern(64, 96, 0.3, device=device, seed=seed)
    x = torch.randn(517, 96, device=device)
    g = torch.randn(517, 64, device=device)
    v = p.values64.float()
    assert torch.equal(ops.spmm(x, v, p.crow, p.col), ops.spmm(x, v, p.crow, p.col))
    a, b = ops.sddmm(g, x, p.crow, p.col), ops.sddmm(g, x, p.crow, p.col)
    if device == "cpu":
        assert torch.equal(a, b)
    else:  # atomics may reorder float additions across blocks
        torch.testing.assert_close(a, b)
