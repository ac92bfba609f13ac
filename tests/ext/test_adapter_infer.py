"""The inference-only fused adapter (`sparseadapter::sparse_adapter_infer`) and PreparedAdapter: the
same output as sparse_adapter from the forward tensors only, within the numerical rule of a float64
reference at odd sizes, every check of sparse_adapter's forward tensors, and a refusal when a
gradient is needed (autocast: tests/ext/test_autocast.py)."""

import pytest
import torch
import torch.nn.functional as F
from conftest import Pattern, assert_close_to_reference, float64_reference

import sparseadapter_ext as ops

_ops = torch.ops.sparseadapter
ACT = {"identity": lambda h: h, "relu": torch.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}


class Projection:
    def __init__(self, out_f, in_f, density, device, seed, bias=True):
        self.p = Pattern(out_f, in_f, density, device=device, seed=seed)
        g = torch.Generator().manual_seed(seed + 1)
        self.bias64 = torch.randn(out_f, generator=g, dtype=torch.float64).to(device) if bias else None

    def full(self, dtype):
        """sparse_adapter's 8 tensors of this projection."""
        args = self.p.linear_args(self.p.values64.to(dtype), None if self.bias64 is None else self.bias64.to(dtype))
        return (args[0], args[1], args[2], args[3], args[5], args[6], args[7], args[8])

    def linear(self, x, values, bias):
        w = torch.zeros(self.p.shape, dtype=x.dtype, device=x.device)
        w[self.p.mask.to(x.device)] = values
        return F.linear(x, w, bias)


def _problem(device, seed, n, d_in, r, d_out, density, bias=True):
    down = Projection(r, d_in, density, device, seed, bias)
    up = Projection(d_out, r, density, device, seed + 7, bias)
    x = torch.randn(n, d_in, dtype=torch.float64, device=device)
    res = torch.randn(n, d_out, dtype=torch.float64, device=device)
    return down, up, x, res


# (tokens, in, bottleneck, out, density): one token (decoding), odd sizes, partial tiles, nnz = 0, none
SIZES = {"one": (1, 33, 7, 29, 0.5), "odd": (13, 47, 11, 31, 0.3), "tiles": (70, 48, 16, 48, 0.4)}
SIZES.update({"nnz0": (5, 20, 6, 20, 0.0), "none": (0, 24, 8, 24, 0.5)})


@pytest.mark.parametrize("case", list(SIZES))
@pytest.mark.parametrize("activation", list(ops.ADAPTER_ACTIVATIONS))
def test_matches_sparse_adapter_and_float64(device, seed, case, activation, path):
    n, d_in, r, d_out, density = SIZES[case]
    down, up, x64, res64 = _problem(device, seed, n, d_in, r, d_out, density)
    for dtype in (torch.float32, torch.bfloat16):
        x, res = x64.to(dtype), res64.to(dtype)
        d_full, u_full = down.full(dtype), up.full(dtype)
        got = ops.sparse_adapter_infer(x, res, d_full[:4], u_full[:4], activation, 0.7)
        # the same kernel on the same path as sparse_adapter without saving the pre-activation
        assert torch.equal(got, ops.sparse_adapter(x, res, d_full, u_full, activation, 0.7))

        def fn(act):
            return lambda xi, ri, dv, db, uv, ub: ri + 0.7 * up.linear(act(down.linear(xi, dv, db)), uv, ub)

        inputs = (x, res, d_full[0], d_full[1], u_full[0], u_full[1])
        want, s = float64_reference(fn(ACT[activation]), *inputs)
        terms = d_in + r + 5
        assert_close_to_reference(got, want, s, terms, fn(ACT[activation])(*inputs), f"{case}/{activation}/{dtype}")


def test_leading_dims_no_residual_no_bias(device, seed):
    down, up, _, _ = _problem(device, seed, 1, 40, 12, 40, 0.3, bias=False)
    x = torch.randn(3, 5, 40, device=device)
    d, u = down.full(torch.float32), up.full(torch.float32)
    got = ops.sparse_adapter_infer(x, None, d[:4], u[:4], "gelu", 2.0)
    assert got.shape == (3, 5, 40)
    assert torch.equal(got, ops.sparse_adapter(x, None, d, u, "gelu", 2.0))


def _args(device, seed):
    down, up, x, res = _problem(device, seed, 3, 16, 8, 12, 0.5)
    return [x.float(), res.float(), *down.full(torch.float32)[:4], *up.full(torch.float32)[:4], "relu", 1.0]


@pytest.mark.parametrize(
    "index,value,error,match",
    [
        (0, lambda a: a[0][:, :15], ValueError, "x's last dim|features|columns"),
        (1, lambda a: a[1][:, :11], ValueError, "residual must have the output's shape"),
        (1, lambda a: a[1].double(), TypeError, "residual has dtype"),
        (2, lambda a: a[2].double(), TypeError, "dtype"),
        (3, lambda a: a[3][:5], ValueError, "bias"),
        (6, lambda a: a[6][:-1], ValueError, "values|nnz"),
        (9, lambda a: a[9].long(), TypeError, "index dtype|dtype"),
        (10, lambda a: "softmax", ValueError, "activation"),
        (11, lambda a: float("nan"), ValueError, "scale must be finite"),
    ],
)
def test_bad_inputs_name_the_problem(device, seed, index, value, error, match):
    args = _args(device, seed)
    args[index] = value(args)
    with pytest.raises(error, match=match):
        _ops.sparse_adapter_infer.default(*args)


def test_bad_pattern_bounds_are_caught_on_cpu(seed):
    args = _args("cpu", seed)
    col = args[5].clone()
    col[0] = 16  # x has 16 features: one past the last column
    args[5] = col
    with pytest.raises(ValueError, match="sparse_adapter \\(down\\)"):
        _ops.sparse_adapter_infer.default(*args)


def test_a_needed_gradient_is_refused(device, seed):
    args = _args(device, seed)
    args[2] = args[2].clone().requires_grad_()
    with pytest.raises(RuntimeError, match="computes no gradient"):
        _ops.sparse_adapter_infer.default(*args)
    with torch.no_grad():
        _ops.sparse_adapter_infer.default(*args)  # no gradient needed: runs


def test_opcheck_and_meta(device, seed):
    args = _args(device, seed)
    torch.library.opcheck(_ops.sparse_adapter_infer.default, tuple(args))
    meta = [a.to("meta") if isinstance(a, torch.Tensor) else a for a in args]
    assert _ops.sparse_adapter_infer.default(*meta).shape == (3, 12)
    mixed = list(args)
    mixed[4] = mixed[4].to("meta")
    with pytest.raises(ValueError, match="one device"):
        _ops.sparse_adapter_infer.default(*mixed)


def test_prepared_adapter_takes_its_fast_path_only_where_allowed(device, seed):
    args = _args(device, seed)
    x, res = args[0], args[1]
    prepared = ops.PreparedAdapter(tuple(args[2:6]), tuple(args[6:10]), "relu", 1.0)
    want = _ops.sparse_adapter_infer.default(*args)
    assert torch.equal(prepared(x, res), want)
    assert torch.equal(prepared(x, None), _ops.sparse_adapter_infer.default(x, None, *args[2:]))
    # what needs the dispatcher or a gradient: None, and the caller takes its general path
    assert prepared(x.clone().requires_grad_(), res) is None
    assert prepared(x.to("meta"), res) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (prepared(x, res) is None) == (device == "cpu")
    with torch.no_grad():
        assert torch.equal(prepared(x, res), want)
    weights = list(args)
    weights[2] = weights[2].clone().requires_grad_()
    needs_grad = ops.PreparedAdapter(tuple(weights[2:6]), tuple(weights[6:10]), "relu", 1.0)
    assert needs_grad(x, res) is None
    with torch.no_grad():
        assert torch.equal(needs_grad(x, res), want)
    on_meta = ops.PreparedAdapter(tuple(a.to("meta") for a in args[2:6]), tuple(args[6:10]), "relu", 1.0)
    assert on_meta.keys is None and on_meta(x, res) is None
    with pytest.raises(ValueError, match="each \\(values, bias or None, crow_indices, col_indices\\)"):
        ops.PreparedAdapter(tuple(args[2:5]), tuple(args[6:10]), "relu", 1.0)
