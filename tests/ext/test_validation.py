"""Bad input gets a clear exception naming the problem, never a crash or a silent wrong answer."""

import pytest
import torch
from conftest import Pattern

import sparseadapter_ext as ops
from sparseadapter import SparseLinear


@pytest.fixture
def p(device, seed):
    return Pattern(6, 8, 0.5, device=device, seed=seed)


def _x(p, tokens=4, dtype=torch.float32):
    return torch.randn(tokens, p.shape[1], dtype=dtype, device=p.device)


# validate_csr: the O(nnz) structural check


def test_validate_accepts_a_good_pattern(p):
    ops.validate_csr(p.crow, p.col, 6, 8)


def test_crow_not_monotone(p):
    crow = p.crow.clone()
    crow[3] = crow[4] + 1  # crow[4] < crow[3]
    with pytest.raises(ValueError, match=r"non-decreasing, but crow_indices\[4\] < crow_indices\[3\]"):
        ops.validate_csr(crow, p.col, 6, 8)


def test_crow_wrong_length(p):
    with pytest.raises(ValueError, match="crow_indices has 6 entries but a pattern with 6 rows needs 7"):
        ops.validate_csr(p.crow[:-1], p.col, 6, 8)


def test_crow_first_entry_not_zero(p):
    crow = p.crow.clone()
    crow[0] = 1
    with pytest.raises(ValueError, match=r"crow_indices\[0\] must be 0"):
        ops.validate_csr(crow, p.col, 6, 8)


def test_crow_last_entry_disagrees_with_nnz(p):
    with pytest.raises(ValueError, match="they must agree"):
        ops.validate_csr(p.crow, p.col[:-1], 6, 8)


@pytest.mark.parametrize("bad", [8, -1, 1000])
def test_col_out_of_range(p, bad):
    col = p.col.clone()
    col[2] = bad
    with pytest.raises(ValueError, match=rf"col_indices\[2\] = {bad} is out of range for 8 columns"):
        ops.validate_csr(p.crow, col, 6, 8)


def test_float_indices_rejected(p):
    with pytest.raises(TypeError, match="crow_indices must be int32 or int64"):
        ops.validate_csr(p.crow.float(), p.col, 6, 8)


# spmm / sddmm / sparse_linear: the per-call O(1) checks


def test_values_and_col_lengths_disagree(p):
    with pytest.raises(ValueError, match="values has .* entries but col_indices has"):
        ops.spmm(_x(p), p.values64.float()[:-1], p.crow, p.col)


def test_integer_x_rejected(p):
    with pytest.raises(TypeError, match="x must be float32, float16, bfloat16 or float64"):
        ops.spmm(_x(p).long(), p.values64.long(), p.crow, p.col)


def test_values_dtype_differs_from_x(p):
    with pytest.raises(TypeError, match="values has dtype Double but x has dtype Float"):
        ops.spmm(_x(p), p.values64, p.crow, p.col)


def test_index_dtypes_differ(p):
    with pytest.raises(TypeError, match="col_indices has dtype Long but crow_indices has dtype Int"):
        ops.spmm(_x(p), p.values64.float(), p.crow.int(), p.col.long())


def test_two_dimensional_crow_rejected(p):
    with pytest.raises(ValueError, match="crow_indices must be 1-D"):
        ops.spmm(_x(p), p.values64.float(), p.crow[None], p.col)


def test_empty_crow_rejected(p):
    with pytest.raises(ValueError, match="crow_indices must have num_rows \\+ 1 >= 1 entries"):
        ops.spmm(_x(p), p.values64.float(), p.crow[:0], p.col)


def test_bias_wrong_shape(p):
    with pytest.raises(ValueError, match=r"bias must have shape \[6\]"):
        ops.spmm(_x(p), p.values64.float(), p.crow, p.col, None, torch.zeros(5, device=p.device))


def test_row_order_wrong_length(p):
    with pytest.raises(ValueError, match="row_order has 5 entries but the pattern has 6 rows"):
        ops.spmm(_x(p), p.values64.float(), p.crow, p.col, ops.csr_row_order(p.crow)[:5])


def test_scalar_x_rejected(p):
    with pytest.raises(ValueError, match="x must have shape"):
        ops.spmm(torch.tensor(1.0, device=p.device), p.values64.float(), p.crow, p.col)


def test_sddmm_grad_shape_mismatch(p):
    x = _x(p)
    with pytest.raises(ValueError, match="grad_out's last dim is 5 but the pattern has 6 rows"):
        ops.sddmm(torch.randn(4, 5, device=p.device), x, p.crow, p.col)
    with pytest.raises(ValueError, match="they must share leading dims"):
        ops.sddmm(torch.randn(3, 6, device=p.device), x, p.crow, p.col)


def test_sparse_linear_wrong_feature_count(p):
    args = p.linear_args(p.values64.float(), None)
    with pytest.raises(ValueError, match="x has 7 features but the weight has 8 columns"):
        ops.sparse_linear(torch.randn(4, 7, device=p.device), *args)


def test_module_wrong_feature_count(p):
    layer = SparseLinear.from_dense(p.weight64.float(), p.mask)
    with pytest.raises(ValueError, match="x has 9 features but the weight has 8 columns"):
        layer(torch.randn(2, 9, device=p.device))


def test_device_mix_rejected(p):
    if p.device != "cuda":
        pytest.skip("needs a second device type")
    with pytest.raises(ValueError, match="is on cpu but x is on cuda"):
        ops.spmm(_x(p), p.values64.float().cpu(), p.crow, p.col)


# empty inputs are valid and give empty or bias-only results


def test_empty_inputs(p):
    v = p.values64.float()
    assert ops.spmm(_x(p, tokens=0), v, p.crow, p.col).shape == (0, 6)
    assert ops.spmm(torch.randn(2, 0, 8, device=p.device), v, p.crow, p.col).shape == (2, 0, 6)
    assert ops.sddmm(torch.randn(0, 6, device=p.device), _x(p, tokens=0), p.crow, p.col).eq(0).all()
    bias = torch.randn(6, device=p.device)
    none = torch.zeros(7, dtype=p.crow.dtype, device=p.device)
    empty = torch.zeros(0, dtype=p.crow.dtype, device=p.device)
    y = ops.spmm(_x(p), torch.zeros(0, device=p.device), none, empty, None, bias)
    torch.testing.assert_close(y, bias.expand(4, 6))


# Sizes from the caller: refused with a ValueError naming them, never an allocator error or an
# overflowed number in the message.


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("num_cols", [2**40, 2**62, 2**63 - 1])
def test_csr_transpose_refuses_a_num_cols_it_cannot_allocate(index_dtype, num_cols):
    crow = torch.tensor([0, 1, 2], dtype=index_dtype)
    col = torch.tensor([0, 1], dtype=index_dtype)
    match = (
        "does not fit int32 indices"
        if index_dtype == torch.int32
        else r"num_cols.*(more than this machine's \d+ bytes of memory|not allocatable|too large)"
    )
    with pytest.raises(ValueError, match="csr_transpose: .*" + match):
        ops.csr_transpose(crow, col, num_cols)


def test_csr_transpose_past_the_int32_limit_is_refused():
    crow = torch.tensor([0, 1], dtype=torch.int32)
    col = torch.tensor([0], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"num_cols = 2147483648 does not fit int32 indices"):
        ops.csr_transpose(crow, col, 2**31)


def test_csr_to_dense_refuses_a_size_it_cannot_allocate():
    crow = torch.tensor([0, 1, 2])
    col = torch.tensor([0, 1])
    with pytest.raises(ValueError, match=r"csr_to_dense: .*more than this machine's|csr_to_dense: .*2\^63"):
        ops.csr_to_dense(torch.ones(2), crow, col, 2**40)
    with pytest.raises(
        ValueError,
        match=r"csr_to_dense: the dense matrix \[2, 4611686018427387904\] has more than "
        r"2\^63 entries",
    ):
        ops.csr_to_dense(torch.ones(2), crow, col, 2**62)


@pytest.mark.parametrize(
    "num_rows,needs", [(2**63 - 1, "9223372036854775808"), (2**62, "4611686018427387905"), (5, "6")]
)
def test_validate_csr_message_names_the_row_count_without_overflow(num_rows, needs):
    crow = torch.tensor([0, 1, 2])
    col = torch.tensor([0, 1])
    with pytest.raises(
        ValueError, match=rf"crow_indices has 3 entries but a pattern with {num_rows} rows needs {needs}$"
    ):
        ops.validate_csr(crow, col, num_rows, 6)
