"""Property-based fuzzing of every public op and of SparseLinear construction and loading (hypothesis).

Each example builds a valid random case (CSR pattern, x, values, bias, ...: random sizes, dtypes,
index dtypes, layouts, a quarter of them empty) and applies one mutation of a named class: malformed
CSR, index dtypes, wrong lengths and shapes, wrong dtypes, 0-d / empty tensors, NaN/Inf,
non-contiguous inputs, huge claimed sizes. Every (op, class) pair is its own parametrized test, so
each class is tried a fixed number of times. The oracle: a ValueError or TypeError whose message names
the problem, or a result equal to a float64 reference computed on the same stored entries (NaN/Inf
propagate as they do there; finite entries within the rounding bound of the sum).

The contract being tested (docs/kernels.md, "Checks on every call"): spmm, sddmm and sparse_linear
check shapes, dtypes and devices on every call (O(1)); the O(nnz) structural check (crow starting at
0, non-decreasing, ending at nnz, columns in range) runs in validate_csr, in csr_transpose (whose ATen
index conversions write through the indices) and when a SparseLinear is built or loaded, and on CPU spmm / sddmm / sparse_linear
also check the structure their kernels follow on every call (one pass over raw memory), so there
structural corruption is an error too. The CUDA kernels trust the pattern (a per-call check would
synchronize); structural corruption is fed to them only through the guarded entry points.

Counting: EXAMPLES counts the examples each property ran, CLASSES the examples per (property, input
class, outcome); test_zz_example_counts, the last test here, prints both and writes them as JSON to
$SPARSEADAPTER_FUZZ_COUNTS when that is set. $SPARSEADAPTER_FUZZ_SCALE multiplies every example
budget (default 1: about 3,900 examples, about 10 s on one CPU thread).
"""

import collections
import json
import math
import os
import re

import pytest
import torch
from conftest import DEVICES, DTYPES, INDEX_DTYPES

import sparseadapter_ext as ops
from sparseadapter import SparseLinear

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

SCALE = float(os.environ.get("SPARSEADAPTER_FUZZ_SCALE", "1"))
INT32_MAX = 2**31 - 1

EXAMPLES = collections.Counter()  # property -> examples run
CLASSES = collections.Counter()  # (property, input class, outcome) -> examples


def fuzz(examples):
    """Reproducible settings: a fixed example sequence (derandomize), no example database on disk."""
    return settings(
        max_examples=max(1, int(examples * SCALE)),
        deadline=None,
        derandomize=True,
        database=None,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


def record(prop, cls, outcome):
    EXAMPLES[prop] += 1
    CLASSES[(prop, cls, outcome)] += 1


def expect_error(fn, exc, pattern, what):
    """fn() must raise exc (a type or tuple) with a message matching `pattern`; returns the message."""
    try:
        fn()
    except exc as err:
        msg = str(err)
        assert "INTERNAL ASSERT" not in msg, f"{what}: internal assertion instead of a clear error: {msg}"
        assert re.search(pattern, msg), f"{what}: message {msg!r} does not match {pattern!r}"
        return msg
    except Exception as err:  # noqa: BLE001 - report the wrong type with its message
        raise AssertionError(f"{what}: expected {exc} matching {pattern!r}, got {type(err).__name__}: {err}") from err
    raise AssertionError(f"{what}: expected {exc} matching {pattern!r}, but the call succeeded")


# ------------------------------------------------------------------------------------------------
# Valid cases and float64 references


class Case:
    """A valid random CSR weight [rows, cols] with x [*lead, cols] (and grad_out [*lead, rows])."""

    def __init__(self, rows, cols, density, lead, dtype, index_dtype, seed, special, layout, device, need_entry=False):
        gen = torch.Generator().manual_seed(seed)
        self.gen, self.rows, self.cols, self.lead = gen, rows, cols, tuple(lead)
        self.dtype, self.index_dtype, self.device, self.special = dtype, index_dtype, device, special
        mask = torch.rand(rows, cols, generator=gen) < density
        if need_entry:
            mask[0, 0] = True
        crow = torch.zeros(rows + 1, dtype=torch.int64)
        crow[1:] = mask.sum(1).cumsum(0)
        self.mask = mask
        self.crow = crow.to(index_dtype).to(device)
        self.col = mask.nonzero()[:, 1].to(index_dtype).to(device)
        values = torch.randn(self.nnz, generator=gen, dtype=torch.float64).to(dtype)
        x = torch.randn(*lead, cols, generator=gen, dtype=torch.float64).to(dtype)
        grad = torch.randn(*lead, rows, generator=gen, dtype=torch.float64).to(dtype)
        self.bias = torch.randn(rows, generator=gen, dtype=torch.float64).to(dtype).to(device)
        if special == "nan_x":
            poison(x, gen, "nan")
        elif special == "inf_x":
            poison(x, gen, "inf")
        elif special == "nan_values":
            poison(values, gen, "nan")
        elif special == "inf_values":
            poison(values, gen, "inf")
        elif special == "inf_x_zero_values":  # a stored zero times inf is NaN: stored entries are multiplied
            poison(x, gen, "inf")
            poison(values, gen, "zero")
        elif special == "inf_grad":
            poison(grad, gen, "inf")
        self.values = values.to(device)
        self.x = relayout(x.to(device), layout)
        self.grad = relayout(grad.to(device), layout)

    def __repr__(self):  # what hypothesis prints for a failing example
        return (
            f"Case(rows={self.rows}, cols={self.cols}, nnz={self.nnz}, lead={self.lead}, dtype={self.dtype}, "
            f"index_dtype={self.index_dtype}, special={self.special!r}, x.stride={self.x.stride()})"
        )

    @property
    def nnz(self):
        return self.col.numel()

    def row_of(self):
        counts = (self.crow[1:] - self.crow[:-1]).long()
        return torch.repeat_interleave(torch.arange(self.rows, device=self.device), counts)

    def linear_args(self, values, bias):
        crow_t, col_t, perm_t = ops.csr_transpose(self.crow, self.col, self.cols)
        return [
            values,
            bias,
            self.crow,
            self.col,
            ops.csr_row_order(self.crow),
            crow_t,
            col_t,
            perm_t,
            ops.csr_row_order(crow_t),
        ]


def poison(t, gen, kind):
    """Write NaN, +-Inf or exact zeros into about a tenth of t's entries (in place)."""
    if t.numel() == 0:
        return
    n = max(1, t.numel() // 10)
    idx = torch.randint(t.numel(), (n,), generator=gen)
    flat = t.view(-1)
    if kind == "nan":
        flat[idx] = float("nan")
    elif kind == "inf":
        sign = torch.where(torch.rand(n, generator=gen) < 0.5, 1.0, -1.0)
        flat[idx] = (sign * math.inf).to(t.dtype)
    else:
        flat[idx] = 0.0


def relayout(t, layout):
    """The same values in another memory layout: transposed storage, a stride-2 slice, stride 0."""
    if layout == "transposed" and t.dim() >= 1:
        return t.movedim(-1, 0).contiguous().movedim(0, -1)
    if layout == "strided" and t.dim() >= 1:
        wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
        wide[..., ::2] = t
        return wide[..., ::2]
    if layout == "expanded" and t.dim() >= 2 and t.numel() > 0:  # every token the same row, stride 0
        return t.reshape(-1, t.shape[-1])[:1].expand(*t.shape)
    return t


# Token shapes: x 1-D, one token, 33 and 65 tokens (a full tile plus a partial one: spmm tiles 32
# tokens, sddmm 64), two leading dims; and the empty ones.
LEADS = [(), (1,), (7,), (33,), (65,), (2, 5)]
EMPTY_LEADS = [(0,), (3, 0, 2)]


@st.composite
def cases(draw, device, dtypes=DTYPES, special="none", min_rows=0, need_entry=False, need_lead=False):
    """A valid Case: three times in four with rows, columns, tokens and entries, otherwise an empty one
    (0 rows, 0 columns, 0 tokens or nnz 0) as far as the requirements allow."""
    empty = draw(st.integers(0, 3)) == 0
    if empty and not need_entry:
        what = draw(st.sampled_from(["rows", "cols", "tokens", "nnz"]))
    elif empty:
        what = "tokens"
    else:
        what = None
    rows = 0 if what == "rows" and min_rows == 0 else draw(st.integers(max(1, min_rows), 24))
    cols = 0 if what == "cols" else draw(st.integers(1, 40))
    density = 0.0 if what == "nnz" else draw(st.sampled_from([0.1, 0.5, 1.0]) | st.floats(0.02, 1.0))
    leads = [lead for lead in (EMPTY_LEADS if what == "tokens" else LEADS) if lead or not need_lead]
    lead = draw(st.sampled_from(leads))
    dtype = draw(st.sampled_from(dtypes))
    index_dtype = draw(st.sampled_from(INDEX_DTYPES))
    seed = draw(st.integers(0, 2**31 - 1))
    layout = draw(st.sampled_from(["contiguous", "contiguous", "transposed", "strided", "expanded"]))
    return Case(
        rows,
        cols,
        density,
        lead,
        dtype,
        index_dtype,
        seed,
        special,
        layout,
        device,
        need_entry=need_entry and rows > 0 and cols > 0,
    )


def case_class(c):
    if 0 in (c.rows, c.cols, c.nnz) or 0 in c.lead:
        return "empty (0 rows, cols, tokens or nnz)"
    return "x 1-D" if not c.lead else "x with tokens"


def spmm_reference(x, values, crow, col, rows, bias=None):
    """float64 x @ W.T + bias over the stored entries only (a pruned weight never meets x)."""
    x64 = x.double().reshape(math.prod(x.shape[:-1]), x.shape[-1])
    counts = (crow[1:] - crow[:-1]).long()
    row_of = torch.repeat_interleave(torch.arange(rows, device=x.device), counts)
    prods = x64[:, col.long()] * values.double()
    y = torch.zeros(x64.shape[0], rows, dtype=torch.float64, device=x.device).index_add_(1, row_of, prods)
    yabs = torch.zeros_like(y).index_add_(1, row_of, prods.abs())
    if bias is not None:
        y += bias.double()
        yabs += bias.double().abs()
    return y.reshape(*x.shape[:-1], rows), yabs.reshape(*x.shape[:-1], rows)


def assert_matches(out, ref, ref_abs, terms, what):
    """out (any float dtype) against the float64 reference: NaN exactly where it has NaN, the same
    infinities, and elsewhere an error within the rounding bound of a `terms`-long sum accumulated in
    float32 (float64 for float64) plus the final rounding to out's dtype."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    o = out.double()
    special = ~torch.isfinite(ref)
    torch.testing.assert_close(
        o.where(special, 0.0),
        ref.where(special, 0.0),
        rtol=0,
        atol=0,
        equal_nan=True,
        msg=lambda m: f"{what}: NaN/Inf differ from the reference\n{m}",
    )
    acc_eps = torch.finfo(torch.float64 if out.dtype == torch.float64 else torch.float32).eps
    out = torch.finfo(out.dtype)
    # accumulation error + rounding to out's dtype (relative; absolute below its smallest normal)
    tol = 2 * (terms + 2) * acc_eps * ref_abs + out.eps * ref.abs() + out.tiny * out.eps
    assert torch.isfinite(o.where(~special, 0.0)).all(), f"{what}: Inf/NaN where the reference is finite"
    excess = ((o - ref).abs() - tol).where(~special, 0.0)
    if (excess > 0).any():
        i = int(excess.flatten().argmax())
        raise AssertionError(
            f"{what}: {int((excess > 0).sum())} entries beyond the rounding bound, worst: got "
            f"{o.flatten()[i].item()!r}, float64 reference {ref.flatten()[i].item()!r}, bound {tol.flatten()[i].item():.3g}"
        )


# ------------------------------------------------------------------------------------------------
# Valid inputs (empty, 1-D x, non-contiguous, NaN/Inf): results equal the float64 reference


@pytest.mark.parametrize("special", ["none", "nan_x", "inf_x", "nan_values", "inf_values", "inf_x_zero_values"])
@fuzz(100)
@given(data=st.data())
def test_spmm_valid_inputs_match_reference(device, special, data):
    c = data.draw(cases(device, special=special))
    bias = c.bias if data.draw(st.booleans()) else None
    order = ops.csr_row_order(c.crow) if data.draw(st.booleans()) else None
    y = ops.spmm(c.x, c.values, c.crow, c.col, order, bias)
    assert y.dtype == c.dtype and y.device == c.x.device
    ref, ref_abs = spmm_reference(c.x, c.values, c.crow, c.col, c.rows, bias)
    assert_matches(y, ref, ref_abs, c.cols, f"spmm {case_class(c)} {special}")
    record("spmm valid", f"{special}: {case_class(c)}", "equals float64 reference")


@pytest.mark.parametrize("special", ["none", "nan_x", "inf_x", "inf_grad"])
@fuzz(100)
@given(data=st.data())
def test_sddmm_valid_inputs_match_reference(device, special, data):
    c = data.draw(cases(device, special=special))
    out = ops.sddmm(c.grad, c.x, c.crow, c.col)
    assert out.shape == (c.nnz,) and out.dtype == c.dtype
    tokens = math.prod(c.lead)
    g64 = c.grad.double().reshape(tokens, c.rows)[:, c.row_of()]
    x64 = c.x.double().reshape(tokens, c.cols)[:, c.col.long()]
    assert_matches(out, (g64 * x64).sum(0), (g64 * x64).abs().sum(0), tokens, f"sddmm {case_class(c)} {special}")
    record("sddmm valid", f"{special}: {case_class(c)}", "equals float64 reference")


@pytest.mark.parametrize("special", ["none", "nan_x", "inf_x", "inf_values", "inf_grad"])
@fuzz(80)
@given(data=st.data())
def test_sparse_linear_forward_backward_match_reference(device, special, data):
    c = data.draw(cases(device, special=special))
    with_bias = data.draw(st.booleans())
    x = c.x.detach().clone().requires_grad_()
    values = c.values.clone().requires_grad_()
    bias = c.bias.clone().requires_grad_() if with_bias else None
    y = ops.sparse_linear(x, *c.linear_args(values, bias))
    ref, ref_abs = spmm_reference(c.x, c.values, c.crow, c.col, c.rows, bias.detach() if with_bias else None)
    assert_matches(y.detach(), ref, ref_abs, c.cols, f"sparse_linear forward {case_class(c)}")
    y.backward(c.grad)
    tokens = math.prod(c.lead)
    g = c.grad.double().reshape(tokens, c.rows)
    xs = c.x.double().reshape(tokens, c.cols)
    row_of, col = c.row_of(), c.col.long()
    gx = g[:, row_of] * c.values.double()
    grad_x = torch.zeros(tokens, c.cols, dtype=torch.float64, device=device).index_add_(1, col, gx)
    grad_x_abs = torch.zeros_like(grad_x).index_add_(1, col, gx.abs())
    assert_matches(x.grad.reshape(tokens, c.cols), grad_x, grad_x_abs, c.rows, "grad x")
    gv = g[:, row_of] * xs[:, col]
    assert_matches(values.grad, gv.sum(0), gv.abs().sum(0), tokens, "grad values")
    if with_bias:
        assert_matches(bias.grad, g.sum(0), g.abs().sum(0), tokens, "grad bias")
    record("sparse_linear fwd+bwd valid", f"{special}: {case_class(c)}", "equals float64 reference")


def test_sparse_linear_bias_gradient_without_rows(device):
    c = Case(0, 5, 0.5, (3,), torch.float32, torch.int32, 4, "none", "contiguous", device)
    bias = c.bias.clone().requires_grad_()
    y = ops.sparse_linear(c.x, *c.linear_args(c.values, bias))
    y.sum().backward()
    assert bias.grad.shape == (0,)


# ------------------------------------------------------------------------------------------------
# O(1) mutations: every call of spmm / sddmm / sparse_linear must reject them with a clear error


def _other_float(dtype):
    return torch.float64 if dtype != torch.float64 else torch.float32


def _other_index(dtype):
    return torch.int64 if dtype == torch.int32 else torch.int32


# name -> (ops it applies to, expected exception, message regex, mutate(args dict, case))
# args holds the named arguments of the op; mutate edits it in place.
def _m_crow_float(a, c):
    a["crow"] = a["crow"].float()


def _m_col_float(a, c):
    a["col"] = a["col"].double()


def _m_index_int16(a, c):
    a["crow"], a["col"] = a["crow"].short(), a["col"].short()


def _m_index_dtypes_differ(a, c):
    a["col"] = a["col"].to(_other_index(a["col"].dtype))


def _m_crow_2d(a, c):
    a["crow"] = a["crow"][None]


def _m_col_2d(a, c):
    a["col"] = a["col"].reshape(1, -1)


def _m_crow_empty(a, c):
    a["crow"] = a["crow"][:0]


def _m_values_length(a, c):
    v = a["values"]
    a["values"] = v[:-1] if c.nnz % 2 else torch.cat([v, v.new_zeros(1)])  # one short or one long


def _m_values_2d(a, c):
    a["values"] = a["values"][None]


def _m_values_dtype(a, c):
    a["values"] = a["values"].to(_other_float(c.dtype))


def _m_x_int(a, c):
    a["x"] = a["x"].long()
    if "values" in a:
        a["values"] = a["values"].long()
    if "grad" in a:
        a["grad"] = a["grad"].long()


def _m_x_bool(a, c):
    a["x"] = a["x"] != 0


def _m_x_0d(a, c):
    a["x"] = torch.tensor(1.0, dtype=c.dtype, device=c.device)
    if "grad" in a:
        a["grad"] = torch.tensor(1.0, dtype=c.dtype, device=c.device)


def _m_bias_shape(a, c):
    a["bias"] = torch.zeros(c.rows + 1, dtype=c.dtype, device=c.device)


def _m_bias_2d(a, c):
    a["bias"] = torch.zeros(1, c.rows, dtype=c.dtype, device=c.device)


def _m_bias_dtype(a, c):
    a["bias"] = torch.zeros(c.rows, dtype=_other_float(c.dtype), device=c.device)


def _m_row_order_len(a, c):
    a["row_order"] = torch.arange(c.rows + 1, dtype=c.index_dtype, device=c.device)


def _m_row_order_dtype(a, c):
    a["row_order"] = torch.arange(c.rows, dtype=_other_index(c.index_dtype), device=c.device)


def _m_row_order_float(a, c):
    a["row_order"] = torch.arange(c.rows, device=c.device).float()


def _m_x_huge_features(a, c):  # 2**31 features, no memory: 0 tokens
    a["x"] = torch.empty(0, 2**31, dtype=c.dtype, device=c.device)
    a["crow"], a["col"] = a["crow"].int(), a["col"].int()


def _m_grad_last_dim(a, c):
    a["grad"] = torch.zeros(*c.lead, c.rows + 1, dtype=c.dtype, device=c.device)


def _m_grad_leading(a, c):
    a["grad"] = torch.zeros(*c.lead[:-1], c.lead[-1] + 1, c.rows, dtype=c.dtype, device=c.device)


def _m_grad_extra_dim(a, c):
    a["grad"] = a["grad"][None]


def _m_grad_dtype(a, c):
    a["grad"] = a["grad"].to(_other_float(c.dtype))


def _m_x_features(a, c):
    a["x"] = torch.zeros(*c.lead, c.cols + 1, dtype=c.dtype, device=c.device)


def _m_col_t_len(a, c):
    a["col_t"] = torch.cat([a["col_t"], a["col_t"].new_zeros(1)])


def _m_perm_t_len(a, c):
    a["perm_t"] = torch.cat([a["perm_t"], a["perm_t"].new_zeros(1)])


def _m_perm_t_dtype(a, c):
    a["perm_t"] = a["perm_t"].to(_other_index(c.index_dtype))


def _m_row_order_t_len(a, c):
    a["row_order_t"] = torch.cat([a["row_order_t"], a["row_order_t"].new_zeros(1)])


def _m_pattern_t_dtype(a, c):
    a["crow_t"], a["col_t"] = a["crow_t"].to(_other_index(c.index_dtype)), a["col_t"].to(_other_index(c.index_dtype))


def _m_device(a, c):  # values on the other device type
    other = "cpu" if c.device == "cuda" else "cuda"
    key = "values" if "values" in a else "crow"
    a[key] = a[key].to(other)


SPMM, SDDMM, LINEAR = "spmm", "sddmm", "sparse_linear"
ALL = (SPMM, SDDMM, LINEAR)
O1_MUTATIONS = {
    "crow float dtype": (ALL, TypeError, r"crow_indices must be int32 or int64", _m_crow_float),
    "col float dtype": (ALL, TypeError, r"col_indices must be int32 or int64", _m_col_float),
    "index dtype int16": (ALL, TypeError, r"crow_indices must be int32 or int64", _m_index_int16),
    "crow/col dtypes differ": (
        ALL,
        TypeError,
        r"col_indices has dtype \w+ but crow_indices has dtype",
        _m_index_dtypes_differ,
    ),
    "crow 2-D": (ALL, ValueError, r"crow_indices must be 1-D", _m_crow_2d),
    "col 2-D": (ALL, ValueError, r"col_indices must be 1-D", _m_col_2d),
    "crow empty (0 entries)": (ALL, ValueError, r"crow_indices must have num_rows \+ 1 >= 1 entries", _m_crow_empty),
    "values length != nnz": (
        (SPMM, LINEAR),
        ValueError,
        r"values has \d+ entries but col_indices has \d+",
        _m_values_length,
    ),
    "values 2-D": ((SPMM, LINEAR), ValueError, r"values must be 1-D", _m_values_2d),
    "values dtype != x dtype": ((SPMM, LINEAR), TypeError, r"values has dtype \w+ but x has dtype", _m_values_dtype),
    "x integer dtype": (ALL, TypeError, r"x must be float32, float16, bfloat16 or float64, got Long", _m_x_int),
    "x bool dtype": (ALL, TypeError, r"x must be float32, float16, bfloat16 or float64, got Bool", _m_x_bool),
    "x 0-d": (ALL, ValueError, r"x must have shape \[\.\.\., in_features\], got a 0-d tensor", _m_x_0d),
    "bias wrong length": ((SPMM, LINEAR), ValueError, r"bias must have shape \[\d+\]", _m_bias_shape),
    "bias 2-D": ((SPMM, LINEAR), ValueError, r"bias must have shape \[\d+\]", _m_bias_2d),
    "bias dtype != x dtype": ((SPMM, LINEAR), TypeError, r"bias has dtype \w+ but x has dtype", _m_bias_dtype),
    "row_order wrong length": (
        (SPMM, LINEAR),
        ValueError,
        r"row_order has \d+ entries but the pattern has \d+ rows",
        _m_row_order_len,
    ),
    "row_order index dtype differs": (
        (SPMM, LINEAR),
        TypeError,
        r"row_order has dtype \w+ but crow_indices has dtype",
        _m_row_order_dtype,
    ),
    "row_order float": ((SPMM, LINEAR), TypeError, r"row_order must be int32 or int64", _m_row_order_float),
    "x 2**31 features, int32 indices": (
        (SPMM,),
        ValueError,
        r"in_features = 2147483648 does not fit int32 indices",
        _m_x_huge_features,
    ),
    "grad_out last dim != rows": (
        (SDDMM,),
        ValueError,
        r"grad_out's last dim is \d+ but the pattern has \d+ rows",
        _m_grad_last_dim,
    ),
    "grad_out leading dims differ": ((SDDMM,), ValueError, r"they must share leading dims", _m_grad_leading),
    "grad_out extra dim": ((SDDMM,), ValueError, r"they must share leading dims", _m_grad_extra_dim),
    "grad_out dtype != x dtype": ((SDDMM,), TypeError, r"grad_out has dtype \w+ but x has dtype", _m_grad_dtype),
    "x last dim != in_features": (
        (LINEAR,),
        ValueError,
        r"x has \d+ features but the weight has \d+ columns",
        _m_x_features,
    ),
    "col_indices_t wrong length": (
        (LINEAR,),
        ValueError,
        r"col_indices_t has \d+ entries but the pattern has nnz = \d+",
        _m_col_t_len,
    ),
    "perm_t wrong length": (
        (LINEAR,),
        ValueError,
        r"perm_t has \d+ entries but the pattern has nnz = \d+",
        _m_perm_t_len,
    ),
    "perm_t index dtype differs": (
        (LINEAR,),
        TypeError,
        r"perm_t has dtype \w+ but crow_indices has dtype",
        _m_perm_t_dtype,
    ),
    "row_order_t wrong length": (
        (LINEAR,),
        ValueError,
        r"row_order_t has \d+ entries but the weight has \d+ columns",
        _m_row_order_t_len,
    ),
    "transposed pattern index dtype differs": (
        (LINEAR,),
        TypeError,
        r"crow_indices_t has dtype \w+ but crow_indices has dtype",
        _m_pattern_t_dtype,
    ),
}
if "cuda" in DEVICES:
    # values (crow for sddmm) on the other device type; with x on the CPU the CUDA kernel is chosen
    O1_MUTATIONS["argument on another device"] = (
        ALL,
        ValueError,
        r"is on cuda:?\d* but x is on cpu|is on cpu but x is on cuda|x is on cpu but this kernel runs on",
        _m_device,
    )


O1_CASES = [(op, name) for name, (for_ops, *_) in O1_MUTATIONS.items() for op in for_ops]


@pytest.mark.parametrize("op,name", O1_CASES)
@fuzz(12)
@given(data=st.data())
def test_o1_mutations_raise_clear_errors(device, op, name, data):
    c = data.draw(cases(device, need_lead=name == "grad_out leading dims differ"))
    _, exc, pattern, mutate = O1_MUTATIONS[name]
    if op == SPMM:
        a = dict(x=c.x, values=c.values, crow=c.crow, col=c.col, row_order=ops.csr_row_order(c.crow), bias=c.bias)
        mutate(a, c)
        fn = lambda: ops.spmm(a["x"], a["values"], a["crow"], a["col"], a["row_order"], a["bias"])  # noqa: E731
    elif op == SDDMM:
        a = dict(grad=c.grad, x=c.x, crow=c.crow, col=c.col)
        mutate(a, c)
        fn = lambda: ops.sddmm(a["grad"], a["x"], a["crow"], a["col"])  # noqa: E731
    else:
        values, bias, crow, col, order, crow_t, col_t, perm_t, order_t = c.linear_args(c.values, c.bias)
        a = dict(
            x=c.x,
            values=values,
            bias=bias,
            crow=crow,
            col=col,
            row_order=order,
            crow_t=crow_t,
            col_t=col_t,
            perm_t=perm_t,
            row_order_t=order_t,
        )
        mutate(a, c)
        fn = lambda: ops.sparse_linear(  # noqa: E731
            a["x"],
            a["values"],
            a["bias"],
            a["crow"],
            a["col"],
            a["row_order"],
            a["crow_t"],
            a["col_t"],
            a["perm_t"],
            a["row_order_t"],
        )
    expect_error(fn, exc, rf"^{op}: .*{pattern}", f"{op} with {name}")
    record(f"{op} O(1) mutations", name, f"{exc.__name__} naming it")


# ------------------------------------------------------------------------------------------------
# Structural (O(nnz)) mutations: validate_csr, csr_transpose, SparseLinear(...) and load_state_dict
# must reject them; raw spmm/sddmm are not promised to (see the module docstring)


def structural_problem(crow, col, num_rows, num_cols, op="validate_csr"):
    """(exception type, message regex) of the first problem `op` must report, or None when the
    pattern is valid. Mirrors the documented order of checks in csrc/pattern.cpp."""
    for name, t in (("crow_indices", crow), ("col_indices", col)):
        if t.dtype not in (torch.int32, torch.int64):
            return TypeError, rf"{op}: {name} must be int32 or int64"
        if t.dim() != 1:
            return ValueError, rf"{op}: {name} must be 1-D"
    if op == "csr_transpose":
        if num_cols < 0:
            return ValueError, rf"{op}: num_cols must be >= 0"
        if crow.numel() == 0:
            return ValueError, rf"{op}: crow_indices must have num_rows \+ 1 >= 1 entries, got 0"
        num_rows = crow.numel() - 1
    if crow.dtype != col.dtype:
        return TypeError, rf"{op}: col_indices has dtype \w+ but crow_indices has dtype"
    if num_rows < 0 or num_cols < 0:
        return ValueError, rf"{op}: shape \[-?\d+, -?\d+\] must be non-negative"
    if crow.numel() != num_rows + 1:
        return ValueError, rf"{op}: crow_indices has {crow.numel()} entries but a pattern with {num_rows} rows needs"
    c = crow.long().tolist()
    if c[0] != 0:
        return ValueError, rf"{op}: crow_indices\[0\] must be 0, got {c[0]}"
    if c[-1] != col.numel():
        return ValueError, rf"{op}: crow_indices\[-1\] = {c[-1]} but col_indices has {col.numel()} entries"
    for r in range(num_rows):
        if c[r + 1] < c[r]:
            return (
                ValueError,
                rf"{op}: crow_indices must be non-decreasing, but crow_indices\[{r + 1}\] < crow_indices\[{r}\]",
            )
    for e, j in enumerate(col.long().tolist()):
        if not 0 <= j < num_cols:
            return ValueError, rf"{op}: col_indices\[{e}\] = {j} is out of range for {num_cols} columns"
    return None


def _pick(data, n):
    return data.draw(st.integers(0, n - 1)) if n > 0 else None


STRUCTURAL_KINDS = [
    "crow not monotone",
    "crow[0] != 0",
    "crow[-1] > nnz",
    "crow[-1] < nnz",
    "crow claims nnz 2**31-1",
    "crow claims nnz 2**40 (int64)",
    "crow negative entry",
    "crow one entry short",
    "crow one entry long",
    "col >= num_cols",
    "col negative",
    "col int32 min",
    "crow/col dtypes differ",
    "float index dtype",
    "crow 2-D",
    "crow empty",
    "num_rows negative",
    "num_cols negative",
    "num_cols > int32 max (valid)",
    "unmutated (valid)",
]


def structural_case(data, device, kind, dtypes=(torch.float32, torch.float64)):
    """A valid case with what `kind` needs to apply (rows to reorder, an entry to corrupt)."""
    needs_entry = kind in ("crow[-1] < nnz", "col >= num_cols", "col negative", "col int32 min")
    min_rows = 2 if kind == "crow not monotone" else 1 if kind == "crow negative entry" else 0
    return data.draw(cases(device, dtypes=list(dtypes), min_rows=min_rows, need_entry=needs_entry))


def mutate_structure(data, c, kind):
    """(kind, crow, col, num_rows, num_cols) with the structural mutation `kind` of the valid case c."""
    crow, col, rows, cols = c.crow.clone(), c.col.clone(), c.rows, c.cols
    big = data.draw(st.sampled_from([1, 2, 1000, INT32_MAX - max(cols, c.nnz)]))
    if kind == "crow not monotone" and rows >= 2:
        r = data.draw(st.integers(1, rows - 1))
        crow[r] = crow[r + 1] + data.draw(st.integers(1, 5))
    elif kind == "crow[0] != 0":
        crow[0] = data.draw(st.sampled_from([1, -1, big]))
    elif kind == "crow[-1] > nnz":
        crow[-1] = c.nnz + big
    elif kind == "crow[-1] < nnz" and c.nnz > 0:
        col = col[:-1]  # crow still claims the old nnz
    elif kind == "crow claims nnz 2**31-1":
        crow[-1] = INT32_MAX
    elif kind == "crow claims nnz 2**40 (int64)":
        crow = crow.long()
        col = col.long()
        crow[-1] = 2**40
    elif kind == "crow negative entry" and rows >= 1:
        crow[data.draw(st.integers(1, rows))] = -data.draw(st.sampled_from([1, big]))
    elif kind == "crow one entry short":
        crow = crow[:-1]
    elif kind == "crow one entry long":
        crow = torch.cat([crow, crow[-1:]])
    elif kind == "col >= num_cols" and c.nnz > 0:
        col[_pick(data, c.nnz)] = cols + data.draw(st.sampled_from([0, 1, big]))
    elif kind == "col negative" and c.nnz > 0:
        col[_pick(data, c.nnz)] = -data.draw(st.sampled_from([1, big]))
    elif kind == "col int32 min" and c.nnz > 0:
        col[_pick(data, c.nnz)] = -(2**31)
    elif kind == "crow/col dtypes differ":
        col = col.to(_other_index(col.dtype))
    elif kind == "float index dtype":
        if data.draw(st.booleans()):
            crow = crow.float()
        else:
            col = col.double()
    elif kind == "crow 2-D":
        crow = crow[None]
    elif kind == "crow empty":
        crow = crow[:0]
    elif kind == "num_rows negative":
        rows = -1 - rows
    elif kind == "num_cols negative":
        cols = -1 - cols
    elif kind == "num_cols > int32 max (valid)":
        cols = cols + data.draw(st.sampled_from([2**31, 2**32, 2**32 + 1, 2**40]))
    elif kind != "unmutated (valid)":
        raise AssertionError(f"{kind} does not apply to {c}")  # structural_case provides what it needs
    return kind, crow, col, rows, cols


def transpose_reference(crow, col, num_cols):
    counts = (crow[1:] - crow[:-1]).long()
    row_of = torch.repeat_interleave(torch.arange(crow.numel() - 1, device=crow.device), counts)
    perm = torch.sort(col.long(), stable=True).indices
    crow_t = torch.zeros(num_cols + 1, dtype=torch.int64, device=crow.device)
    crow_t[1:] = torch.bincount(col.long(), minlength=num_cols).cumsum(0)
    return crow_t, row_of[perm], perm


def _same_state(a, b):
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


ENTRIES = ["validate_csr", "csr_transpose", "SparseLinear(...)", "load_state_dict"]
# "num_cols > int32 max" only for validate_csr: the others allocate num_cols + 1 entries (W.T's crow)
STRUCTURAL_CASES = [
    (entry, kind)
    for kind in STRUCTURAL_KINDS
    for entry in ENTRIES
    if entry == "validate_csr" or kind != "num_cols > int32 max (valid)"
]


@pytest.mark.parametrize("entry,kind", STRUCTURAL_CASES)
@fuzz(10)
@given(data=st.data())
def test_structural_mutations_rejected_by_guarded_entry_points(device, entry, kind, data):
    c = structural_case(data, device, kind)
    kind, crow, col, rows, cols = mutate_structure(data, c, kind)
    if entry == "validate_csr":
        problem = structural_problem(crow, col, rows, cols)
        if problem:
            expect_error(lambda: ops.validate_csr(crow, col, rows, cols), *problem, f"validate_csr, {kind}")
        else:
            ops.validate_csr(crow, col, rows, cols)
    elif entry == "csr_transpose":
        problem = structural_problem(crow, col, rows, cols, op="csr_transpose")
        if problem:
            expect_error(lambda: ops.csr_transpose(crow, col, cols), *problem, f"csr_transpose, {kind}")
        else:
            crow_t, col_t, perm = ops.csr_transpose(crow, col, cols)
            ref = transpose_reference(crow, col, cols)
            for got, want in zip((crow_t, col_t, perm), ref):
                assert got.dtype == crow.dtype and torch.equal(got.long(), want), f"csr_transpose, {kind}"
        record("csr_transpose structural", kind, "ValueError/TypeError naming it" if problem else "equals reference")
    else:
        problem = structural_problem(crow, col, max(rows, 0), max(cols, 0))
        if entry == "SparseLinear(...)" and (rows < 0 or cols < 0):
            problem = (ValueError, r"shape \[-?\d+, -?\d+\] must be non-negative")  # a layer of negative size
        nnz = col.numel() if col.dim() == 1 else 0
        values = torch.randn(nnz, dtype=c.dtype, device=device)
        if entry == "SparseLinear(...)":
            build = lambda: SparseLinear(cols, rows, crow, col, values, bias=True)  # noqa: E731
            if problem:
                expect_error(build, *problem, f"SparseLinear, {kind}")
            else:
                layer = build()
                layer.validate()
        else:
            # A layer with another valid pattern of the same shape; load the mutated one into it.
            base = Case(max(rows, 0), max(cols, 0), 0.5, (3,), c.dtype, c.index_dtype, 7, "none", "contiguous", device)
            layer = SparseLinear(base.cols, base.rows, base.crow, base.col, base.values, bias=base.bias)
            before = {k: v.clone() for k, v in layer.state_dict().items()}
            state = {"values": values, "bias": layer.bias.detach().clone(), "crow_indices": crow, "col_indices": col}
            if problem:
                expect_error(
                    lambda: layer.load_state_dict(state),
                    RuntimeError,
                    r"invalid sparse pattern in state_dict: " + problem[1],
                    f"load_state_dict, {kind}",
                )
                assert _same_state(layer.state_dict(), before), f"load_state_dict, {kind}: module changed"
                layer.validate()
            else:
                layer.load_state_dict(state)
                layer.validate()
                assert torch.equal(layer.col_indices, col)
        if not problem:  # the built / loaded layer computes with the new pattern
            x = torch.randn(4, max(cols, 0), dtype=c.dtype, device=device)
            ref, ref_abs = spmm_reference(
                x, layer.values.detach(), layer.crow_indices, layer.col_indices, layer.out_features, layer.bias.detach()
            )
            assert_matches(layer(x).detach(), ref, ref_abs, max(cols, 0), f"{entry}, {kind}")
    if entry != "csr_transpose":
        record(f"{entry} structural", kind, "ValueError/TypeError naming it" if problem else "valid, correct result")


RAW_KINDS = [k for k in STRUCTURAL_KINDS if not k.startswith(("num_rows", "num_cols"))]


@pytest.mark.parametrize("op,kind", [(op, k) for op in ("spmm", "sddmm") for k in RAW_KINDS])
@fuzz(10)
@given(data=st.data())
def test_raw_cpu_ops_refuse_a_corrupt_pattern(op, kind, data):
    """On CPU each call checks the structure its kernel follows (crow from 0 to nnz, non-decreasing;
    columns within x): a corrupt pattern is an error naming it, never an out-of-bounds access. The
    kernels' shape (out_features) is crow's length, so a crow one entry short or long is a valid
    pattern of another size when its entries allow."""
    c = structural_case(data, "cpu", kind)
    kind, crow, col, _, cols = mutate_structure(data, c, kind)
    rows = crow.numel() - 1 if crow.dim() == 1 and crow.numel() > 0 else 0
    values = torch.randn(col.numel() if col.dim() == 1 else 0, dtype=c.dtype)
    tokens = math.prod(c.lead)
    problem = crow.dim() != 1 or crow.numel() == 0 or structural_problem(crow, col, rows, cols)
    if op == "spmm":
        call = lambda: ops.spmm(c.x, values, crow, col)  # noqa: E731
    else:
        grad = torch.randn(*c.lead, rows, dtype=c.dtype)
        call = lambda: ops.sddmm(grad, c.x, crow, col)  # noqa: E731
    if problem:
        expect_error(call, (ValueError, TypeError), rf"{op}: .*(crow_indices|col_indices)", f"{op}, {kind}")
    else:
        out = call()
        if op == "spmm":
            ref, ref_abs = spmm_reference(c.x, values, crow, col, rows)
            assert_matches(out, ref, ref_abs, cols, f"spmm, {kind}")
        else:
            row_of = torch.repeat_interleave(torch.arange(rows), (crow[1:] - crow[:-1]).long())
            g64 = grad.double().reshape(tokens, rows)[:, row_of]
            x64 = c.x.double().reshape(tokens, cols)[:, col.long()]
            assert_matches(out, (g64 * x64).sum(0), (g64 * x64).abs().sum(0), tokens, f"sddmm, {kind}")
    record(f"raw {op} (CPU) structural", kind, "ValueError/TypeError naming it" if problem else "valid, correct result")


def _unchecked_transpose_args(crow, col, cols):
    """Transposed-pattern arguments of the right lengths and dtype for a pattern that may be corrupt
    (the forward never reads them; only their lengths are checked)."""
    index = crow.dtype if crow.dtype in (torch.int32, torch.int64) else torch.int32
    nnz = col.numel() if col.dim() == 1 else 0
    return (
        torch.zeros(max(cols, 0) + 1, dtype=index),
        torch.zeros(nnz, dtype=index),
        torch.zeros(nnz, dtype=index),
        torch.zeros(max(cols, 0), dtype=index),
    )


@pytest.mark.parametrize("side,kind", [(side, k) for side in ("down", "up") for k in RAW_KINDS])
@fuzz(6)
@given(data=st.data())
def test_fused_adapter_refuses_a_corrupt_pattern(side, kind, data):
    """The fused adapter on CPU checks both patterns its kernel follows on every call, like spmm: a
    corrupt down or up projection is an error naming which, a valid one gives the composed result."""
    c = structural_case(data, "cpu", kind)
    kind, crow, col, _, cols = mutate_structure(data, c, kind)
    rows = crow.numel() - 1 if crow.dim() == 1 and crow.numel() > 0 else 0
    values = torch.randn(col.numel() if col.dim() == 1 else 0, dtype=c.dtype)
    problem = crow.dim() != 1 or crow.numel() == 0 or structural_problem(crow, col, rows, cols)
    corrupt = (values, None, crow, col, *_unchecked_transpose_args(crow, col, cols))
    # the other projection: valid, dense, shaped to fit (down [rows, d_in] -> up [cols, rows])
    other_shape = (cols, rows) if side == "down" else (cols, 7)
    index_dtype = crow.dtype if crow.dtype in (torch.int32, torch.int64) else torch.int32
    other = SparseLinear.from_dense(
        torch.randn(other_shape, dtype=c.dtype), torch.ones(other_shape, dtype=torch.bool), index_dtype=index_dtype
    )
    if side == "down":
        x, down, up = c.x.cpu(), corrupt, other.csr_buffers()
    else:
        x, down, up = torch.randn(3, 7, dtype=c.dtype), other.csr_buffers(), corrupt
    call = lambda: ops.sparse_adapter(x, None, down, up, "relu", 1.0)  # noqa: E731
    if problem:
        expect_error(
            call,
            (ValueError, TypeError),
            rf"sparse_adapter \({side}\): .*(crow_indices|col_indices)",
            f"sparse_adapter {side}, {kind}",
        )
    else:
        down_spmm = ops.spmm(x.double(), down[0].double(), down[2], down[3])
        want = ops.spmm(torch.relu(down_spmm), up[0].double(), up[2], up[3])
        got = call()
        assert got.shape == want.shape and torch.allclose(got.double(), want, rtol=1e-4, atol=1e-4), kind
    record(
        f"raw sparse_adapter {side} (CPU) structural",
        kind,
        "ValueError/TypeError naming it" if problem else "valid, correct result",
    )


@pytest.mark.parametrize("kind", [k for k in STRUCTURAL_KINDS if not k.startswith(("num_rows", "num_cols"))])
@fuzz(12)
@given(data=st.data())
def test_csr_row_order_any_crow(device, kind, data):
    """csr_row_order reads only crow: any integer crow, even corrupt, gives a permutation of the rows."""
    c = structural_case(data, device, kind, dtypes=[torch.float32])
    kind, crow, _, _, _ = mutate_structure(data, c, kind)
    problem = None
    if crow.dtype not in (torch.int32, torch.int64):
        problem = (TypeError, r"csr_row_order: crow_indices must be int32 or int64")
    elif crow.dim() != 1:
        problem = (ValueError, r"csr_row_order: crow_indices must be 1-D")
    elif crow.numel() == 0:
        problem = (ValueError, r"csr_row_order: crow_indices must have num_rows \+ 1 >= 1 entries")
    if problem:
        expect_error(lambda: ops.csr_row_order(crow), *problem, f"csr_row_order, {kind}")
    else:
        order = ops.csr_row_order(crow)
        counts = (crow[1:] - crow[:-1]).long()
        assert order.dtype == crow.dtype
        if (counts >= 0).all():  # a valid crow: rows by decreasing nnz, stable
            assert torch.equal(order.long(), torch.argsort(counts, stable=True, descending=True))
        else:  # a corrupt one (int32 differences may wrap): still a permutation of the rows
            assert torch.equal(order.long().sort().values, torch.arange(counts.numel(), device=crow.device))
    record("csr_row_order", kind, "TypeError/ValueError naming it" if problem else "a permutation of the rows")


# ------------------------------------------------------------------------------------------------
# SparseLinear.from_dense


@pytest.mark.parametrize(
    "kind",
    [
        "valid",
        "NaN/Inf weights",
        "float mask",
        "bias",
        "int64 indices",
        "weight 1-D",
        "weight 3-D",
        "mask shape differs",
        "bias wrong length",
    ],
)
@fuzz(20)
@given(data=st.data())
def test_from_dense_fuzz(device, kind, data):
    special = data.draw(st.sampled_from(["nan_values", "inf_values"])) if kind == "NaN/Inf weights" else "none"
    c = data.draw(cases(device, special=special))
    gen = c.gen
    weight = torch.zeros(c.rows, c.cols, dtype=c.dtype, device=device)
    weight[c.mask.to(device)] = c.values
    mask = c.mask.to(device)
    bias, index_dtype, problem = None, None, None
    if kind == "float mask":
        mask = mask.to(c.dtype) * torch.randn(c.rows, c.cols, generator=gen).to(c.dtype).to(device)
        mask[~c.mask.to(device)] = 0
    elif kind == "bias":
        bias = c.bias
    elif kind == "int64 indices":
        index_dtype = torch.int64
    elif kind == "weight 1-D":
        weight, mask, problem = weight.reshape(-1), mask.reshape(-1), r"weight must be 2-D"
    elif kind == "weight 3-D":
        weight, mask, problem = weight[None], mask[None], r"weight must be 2-D"
    elif kind == "mask shape differs":
        mask, problem = torch.ones(c.rows + 1, c.cols, dtype=torch.bool, device=device), r"mask has shape"
    elif kind == "bias wrong length":
        bias, problem = torch.zeros(c.rows + 2, dtype=c.dtype, device=device), r"bias must have shape"
    build = lambda: SparseLinear.from_dense(weight, mask, bias, index_dtype=index_dtype)  # noqa: E731
    if problem:
        expect_error(build, ValueError, problem, f"from_dense, {kind}")
        record("SparseLinear.from_dense", kind, "ValueError naming it")
        return
    layer = build()
    layer.validate()
    keep = mask != 0
    assert layer.nnz == int(keep.sum())
    dense = torch.where(keep, weight, torch.zeros((), dtype=c.dtype, device=device))
    torch.testing.assert_close(layer.to_dense(), dense, rtol=0, atol=0, equal_nan=True)
    if index_dtype is not None:
        assert layer.crow_indices.dtype == index_dtype
    x = c.x
    y = layer(x)
    ref, ref_abs = spmm_reference(
        x,
        layer.values.detach(),
        layer.crow_indices,
        layer.col_indices,
        c.rows,
        layer.bias.detach() if layer.bias is not None else None,
    )
    assert_matches(y.detach(), ref, ref_abs, c.cols, f"from_dense forward, {kind}")
    record("SparseLinear.from_dense", kind, "valid, correct layer")


def test_load_state_dict_round_trip_keeps_derived_buffers(device):
    """The regression guard for the guarded path: a valid other pattern loads and is used."""
    a = Case(9, 13, 0.3, (5,), torch.float32, torch.int32, 1, "none", "contiguous", device)
    b = Case(9, 13, 0.7, (5,), torch.float32, torch.int64, 2, "none", "contiguous", device)
    layer = SparseLinear(13, 9, a.crow, a.col, a.values, bias=a.bias)
    layer.load_state_dict({"values": b.values, "bias": b.bias, "crow_indices": b.crow, "col_indices": b.col})
    ref, ref_abs = spmm_reference(b.x, b.values, b.crow, b.col, 9, b.bias)
    assert_matches(layer(b.x).detach(), ref, ref_abs, 13, "loaded layer")


@pytest.mark.parametrize("strict", [False, True])
def test_load_state_dict_without_values_cannot_install_a_corrupt_pattern(device, strict):
    c = Case(6, 8, 0.5, (3,), torch.float32, torch.int32, 3, "none", "contiguous", device)
    layer = SparseLinear(8, 6, c.crow, c.col, c.values, bias=c.bias)
    col = c.col.clone()
    col[0] = 10**6
    before = [t.clone() for t in (layer.crow_indices, layer.col_indices, layer.values.detach())]
    with pytest.raises(RuntimeError, match="a new sparse pattern loads whole"):
        layer.load_state_dict({"crow_indices": c.crow, "col_indices": col, "bias": c.bias}, strict=strict)
    layer.validate()
    after = (layer.crow_indices, layer.col_indices, layer.values.detach())
    assert all(torch.equal(a, b) for a, b in zip(before, after)), "a refused load leaves the layer as it was"


# ------------------------------------------------------------------------------------------------
# Pruning ops: prune_score, topk_masks, mask_to_csr

SCORE_METHODS = ["magnitude", "snip", "grasp", "synflow"]


@st.composite
def float_tensors(draw, dtypes, max_dims=3, specials=("none", "nan", "inf"), nonempty=False):
    shape = tuple(draw(st.lists(st.integers(1 if nonempty else 0, 9), min_size=0, max_size=max_dims)))
    dtype = draw(st.sampled_from(dtypes))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    if draw(st.booleans()):  # ties: a few distinct values, signed zeros and infinities included
        pool = torch.tensor([0.0, -0.0, 1.0, -1.0, 2.5, math.inf, -math.inf], dtype=torch.float64)
        t = pool[torch.randint(len(pool), shape, generator=gen)]
    else:
        t = torch.randn(shape, generator=gen, dtype=torch.float64)
    t = t.to(dtype)
    special = draw(st.sampled_from(specials))
    if special != "none":
        poison(t, gen, special)
    if draw(st.booleans()) and t.dim() >= 2:
        t = t.transpose(0, 1).contiguous().transpose(0, 1)  # same values, non-contiguous
    return t


def _score_reference(method, w, g, hg):
    out = torch.float64 if w.dtype == torch.float64 else torch.float32
    w, g, hg = w.to(out), g.to(out), hg.to(out)
    return {"magnitude": w.abs(), "snip": (g * w).abs(), "grasp": w * hg, "synflow": (w * g).abs()}[method]


@pytest.mark.parametrize(
    "kind",
    ["valid", "unknown method", "operand missing", "operand shape", "operand dtype", "weight integer", "weight bool"],
)
@fuzz(30)
@given(data=st.data())
def test_prune_score_fuzz(device, kind, data):
    w = data.draw(float_tensors(DTYPES)).to(device)
    needs_operand = kind.startswith("operand")
    method = data.draw(st.sampled_from(SCORE_METHODS[1:] if needs_operand else SCORE_METHODS))
    g = torch.randn(w.shape, dtype=torch.float64).to(w.dtype).to(device)
    hg = torch.randn(w.shape, dtype=torch.float64).to(w.dtype).to(device)
    needs = {"snip": "grad", "synflow": "grad", "grasp": "hess_grad"}.get(method)
    problem = None
    if kind == "unknown method":
        method, problem = "obd", (ValueError, r"prune_score: unknown method 'obd'")
    elif kind == "weight integer":
        w, problem = w.long(), (TypeError, r"prune_score: weight must be float32, float16, bfloat16 or float64")
    elif kind == "weight bool":
        w, problem = w != 0, (TypeError, r"prune_score: weight must be float32, float16, bfloat16 or float64")
    elif needs and kind == "operand missing":
        g, hg = (None, hg) if needs == "grad" else (g, None)
        problem = (ValueError, rf"prune_score: method '{method}' needs {needs}")
    elif needs and kind == "operand shape":
        bad = torch.zeros(w.numel() + 1, dtype=w.dtype, device=device)
        g, hg = (bad, hg) if needs == "grad" else (g, bad)
        problem = (ValueError, rf"prune_score: {needs} has shape")
    elif needs and kind == "operand dtype":
        bad = torch.zeros(w.shape, dtype=_other_float(w.dtype), device=device)
        g, hg = (bad, hg) if needs == "grad" else (g, bad)
        problem = (TypeError, rf"prune_score: {needs} has dtype")
    if problem:
        expect_error(lambda: ops.prune_score(w, g, hg, method), *problem, f"prune_score, {kind}")
        record("prune_score", kind, f"{problem[0].__name__} naming it")
        return
    out = ops.prune_score(w, g, hg, method)
    ref = _score_reference(method, w, g, hg)
    assert out.dtype == ref.dtype and out.shape == w.shape
    torch.testing.assert_close(out, ref, rtol=0, atol=0, equal_nan=True)
    record("prune_score", "valid (NaN/Inf, +-0, empty, non-contiguous)", "equals reference")


def topk_reference(scores, k):
    flat = torch.cat([s.reshape(-1).double() for s in scores]) if scores else torch.zeros(0, dtype=torch.float64)
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[torch.sort(flat.cpu(), descending=True, stable=True).indices[:k]] = True
    out, start = [], 0
    for s in scores:
        out.append(keep[start : start + s.numel()].reshape(s.shape).to(s.device))
        start += s.numel()
    return out


@pytest.mark.parametrize(
    "kind", ["valid", "k negative", "k > total", "NaN score", "float16 scores", "mixed dtypes", "integer scores"]
)
@fuzz(30)
@given(data=st.data())
def test_topk_masks_fuzz(device, kind, data):
    dtype = data.draw(st.sampled_from([torch.float32, torch.float64]))
    min_size = 2 if kind == "mixed dtypes" else 1 if kind in ("float16 scores", "integer scores", "NaN score") else 0
    tensors = st.lists(
        float_tensors([dtype], specials=("none",), nonempty=kind == "NaN score"), min_size=min_size, max_size=3
    )
    scores = [t.to(device) for t in data.draw(tensors)]
    total = sum(s.numel() for s in scores)
    k = data.draw(st.integers(0, total))
    problem = None
    if kind == "k negative":
        k, problem = -data.draw(st.integers(1, 2**40)), (ValueError, r"topk_masks: k = -\d+ must be in \[0, \d+\]")
    elif kind == "k > total":
        k, problem = (
            total + data.draw(st.integers(1, 2**40)),
            (ValueError, r"topk_masks: k = \d+ must be in \[0, \d+\]"),
        )
    elif kind == "NaN score" and total > 0:
        i = next(j for j, s in enumerate(scores) if s.numel() > 0)
        scores[i] = scores[i].clone()
        scores[i][(0,) * scores[i].dim()] = math.nan  # the first entry in flat (logical) order
        problem = (ValueError, rf"topk_masks: scores\[{i}\] contains \d+ NaN")
    elif kind == "float16 scores" and scores:
        scores[0], problem = scores[0].half(), (TypeError, r"topk_masks: scores\[0\] must be float32 or float64")
    elif kind == "mixed dtypes" and len(scores) >= 2:
        scores[1], problem = scores[1].to(_other_float(dtype)), (TypeError, r"topk_masks: scores\[1\] has dtype")
    elif kind == "integer scores" and scores:
        scores[0], problem = scores[0].long(), (TypeError, r"topk_masks: scores\[0\] must be float32 or float64")
    if problem:
        expect_error(lambda: ops.topk_masks(scores, k), *problem, f"topk_masks, {kind}")
        record("topk_masks", kind, f"{problem[0].__name__} naming it")
        return
    masks = ops.topk_masks(scores, k)
    assert sum(int(m.sum()) for m in masks) == k
    for m, want in zip(masks, topk_reference(scores, k)):
        assert m.dtype == torch.bool and torch.equal(m, want)
    record("topk_masks", "valid (ties, +-0, +-Inf, empty)", "equals reference")


@pytest.mark.parametrize(
    "kind",
    [
        "bool",
        "uint8",
        "float with NaN",
        "non-contiguous",
        "1-D mask",
        "3-D mask",
        "index dtype int16",
        "index dtype float",
        "int32 overflow shape",
    ],
)
@fuzz(20)
@given(data=st.data())
def test_mask_to_csr_fuzz(device, kind, data):
    rows, cols = data.draw(st.integers(0, 20)), data.draw(st.integers(0, 40))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    density = data.draw(st.sampled_from([0.0, 0.3, 1.0]) | st.floats(0.0, 1.0))
    mask = torch.rand(rows, cols, generator=gen) < density
    index_dtype = data.draw(st.sampled_from(INDEX_DTYPES))
    m, problem = mask, None
    if kind == "uint8":
        m = mask.to(torch.uint8) * 3
    elif kind == "float with NaN":
        m = mask.float()
        poison(m, gen, "nan")  # NaN != 0: kept
    elif kind == "non-contiguous":
        m = mask.t().contiguous().t()
    elif kind == "1-D mask":
        m, problem = mask.reshape(-1), (ValueError, r"mask_to_csr: mask must be 2-D")
    elif kind == "3-D mask":
        m, problem = mask[None], (ValueError, r"mask_to_csr: mask must be 2-D")
    elif kind == "index dtype int16":
        index_dtype, problem = torch.int16, (TypeError, r"mask_to_csr: index_dtype must be int32 or int64")
    elif kind == "index dtype float":
        index_dtype, problem = torch.float32, (TypeError, r"mask_to_csr: index_dtype must be int32 or int64")
    elif kind == "int32 overflow shape":  # no memory: 0 rows
        m, index_dtype = torch.zeros(0, 2**31, dtype=torch.bool), torch.int32
        problem = (ValueError, r"mask_to_csr: shape \[0, 2147483648\] does not fit int32 indices")
    m = m.to(device)
    if problem:
        expect_error(lambda: ops.mask_to_csr(m, index_dtype), *problem, f"mask_to_csr, {kind}")
        record("mask_to_csr", kind, f"{problem[0].__name__} naming it")
        return
    crow, col = ops.mask_to_csr(m, index_dtype)
    keep = (m != 0).cpu()
    ref_crow = torch.zeros(rows + 1, dtype=torch.int64)
    ref_crow[1:] = keep.sum(1).cumsum(0)
    assert crow.dtype == col.dtype == index_dtype
    assert torch.equal(crow.cpu().long(), ref_crow) and torch.equal(col.cpu().long(), keep.nonzero()[:, 1])
    ops.validate_csr(crow, col, rows, cols)
    record("mask_to_csr", kind, "equals reference")


# ------------------------------------------------------------------------------------------------


def test_zz_example_counts(capsys):
    """Print how many examples each property ran (this module's tests run in file order: last)."""
    lines = [f"fuzz examples: {sum(EXAMPLES.values())} in total"]
    lines += [f"  {n:6d}  {prop}" for prop, n in sorted(EXAMPLES.items())]
    lines.append("per input class:")
    lines += [f"  {n:6d}  {prop} | {cls} | {outcome}" for (prop, cls, outcome), n in sorted(CLASSES.items())]
    with capsys.disabled():
        print("\n" + "\n".join(lines))
    path = os.environ.get("SPARSEADAPTER_FUZZ_COUNTS")
    if path:
        with open(path, "w") as f:
            json.dump(
                {"examples": dict(EXAMPLES), "classes": [[p, c, o, n] for (p, c, o), n in sorted(CLASSES.items())]},
                f,
                indent=1,
            )
