"""The mixed-adapter op (`sparseadapter::sparse_adapter_multi`): several bottleneck adapters, one per
row of the batch, in one call. Row by row it must compute what `sparse_adapter` computes for the
row's adapter alone (bit for bit on the CSR path, where every token is computed the same way), rows
without an adapter get the residual; its gradients equal those of the adapters run one by one on their
rows; adapters of different widths, activations, scales, biases and index dtypes mix; bad inputs are
named; the op traces, exports and compiles."""

import pytest
import torch
from conftest import Pattern

import sparseadapter_ext as ops
from sparseadapter import SparseLinear

_ops = torch.ops.sparseadapter
IN, OUT = 24, 20
# (bottleneck, activation, scale, biases): widths that differ, every activation, a LoRA-like adapter
SPECS = [
    (8, "relu", 1.0, True),
    (12, "gelu", 0.5, True),
    (4, "identity", 2.0, False),
    (16, "silu", 1.5, True),
    (5, "tanh", 0.25, True),
]


def projection(out_f, in_f, density, seed, dtype, bias, index_dtype=torch.int32, device="cpu"):
    p = Pattern(out_f, in_f, density, seed=seed, index_dtype=index_dtype, device=device)
    g = torch.Generator().manual_seed(seed + 7)
    b = torch.randn(out_f, generator=g, dtype=torch.float64).to(device, dtype) if bias else None
    layer = SparseLinear(in_f, out_f, p.crow, p.col, p.values64.to(dtype), b if bias else False)
    return layer


def adapters(seed, dtype=torch.float32, specs=SPECS, index_dtypes=None, device="cpu"):
    out = []
    for k, (b, act, scale, bias) in enumerate(specs):
        idt = index_dtypes[k] if index_dtypes else torch.int32
        down = projection(b, IN, 0.5, seed + 10 * k, dtype, bias, idt, device)
        up = projection(OUT, b, 0.6, seed + 10 * k + 5, dtype, bias, idt, device)
        out.append((down, up, act, scale))
    return out


def specs_of(layers):
    return [(d.csr_buffers(), u.csr_buffers(), act, scale) for d, u, act, scale in layers]


def alone(x, residual, layer):
    d, u, act, scale = layer
    return ops.sparse_adapter(x, residual, d.csr_buffers(), u.csr_buffers(), act, scale)


def row_reference(x, residual, index, layers):
    rows = []
    for r, k in enumerate(index.tolist()):
        res = None if residual is None else residual[r : r + 1]
        if k < 0:
            rows.append(res if res is not None else torch.zeros(1, *x.shape[1:-1], OUT, dtype=x.dtype))
        else:
            rows.append(alone(x[r : r + 1], res, layers[k]))
    return torch.cat(rows)


@pytest.mark.parametrize("order", ["sorted", "shuffled", "one_adapter", "all_base", "with_base"])
@pytest.mark.parametrize("residual", [True, False])
def test_each_row_equals_its_adapter_alone(seed, order, residual, path):
    layers = adapters(seed)
    gen = torch.Generator().manual_seed(seed)
    index = {
        "sorted": torch.tensor([0, 0, 1, 2, 2, 2, 3, 4]),
        "shuffled": torch.tensor([3, 0, 4, 1, 0, 2, 4, 1]),
        "one_adapter": torch.full((8,), 1),
        "all_base": torch.full((8,), -1),
        "with_base": torch.tensor([2, -1, 0, -1, 4, 4, -1, 3]),
    }[order]
    x = torch.randn(8, 7, IN, generator=gen)
    res = torch.randn(8, 7, OUT, generator=gen) if residual else None
    with torch.no_grad():
        out = ops.sparse_adapter_multi(x, index, res, specs_of(layers))
        want = row_reference(x, res, index, layers)
    # A group runs its rows' tokens in one call, which may take another CPU kernel than a row alone
    # (the few-token kernel up to 8 tokens, the tiled one above): the same sums in another order.
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_dtypes_and_index_dtypes(seed, dtype):
    layers = adapters(seed, dtype, index_dtypes=[torch.int32, torch.int64, torch.int32, torch.int64, torch.int32])
    gen = torch.Generator().manual_seed(seed)
    index = torch.tensor([4, 1, 1, -1, 0, 3, 2], dtype=torch.int32)
    x = torch.randn(7, 3, IN, generator=gen).to(dtype)
    res = torch.randn(7, 3, OUT, generator=gen).to(dtype)
    with torch.no_grad():
        out = ops.sparse_adapter_multi(x, index, res, specs_of(layers))  # index dtypes differ: made int64
        want = row_reference(x, res, index.long(), layers)
    torch.testing.assert_close(out, want)  # grouped rows may take another kernel than a row alone (see above)


def test_two_dim_input_one_token_per_row(seed):
    layers = adapters(seed)
    x = torch.randn(6, IN)
    index = torch.tensor([1, 0, 1, 3, -1, 0])
    with torch.no_grad():
        torch.testing.assert_close(
            ops.sparse_adapter_multi(x, index, x[:, :OUT], specs_of(layers)),
            row_reference(x, x[:, :OUT], index, layers),
            rtol=0,
            atol=0,
        )


def test_empty_batches_and_no_adapters(seed):
    layers = adapters(seed)
    for shape in ((0, 5, IN), (3, 0, IN)):
        x = torch.randn(*shape)
        index = torch.zeros(shape[0], dtype=torch.long)
        assert ops.sparse_adapter_multi(x, index, None, specs_of(layers)).shape == (*shape[:-1], OUT)
    x, res = torch.randn(3, 4, IN), torch.randn(3, 4, OUT)
    assert torch.equal(ops.sparse_adapter_multi(x, torch.full((3,), -1), res, []), res)
    assert not ops.sparse_adapter_multi(x, torch.full((3,), -1), None, [], out_features=OUT).any()


@pytest.mark.parametrize("order", ["shuffled", "with_base", "sorted"])
def test_gradients_equal_the_adapters_run_one_by_one(seed, order, path):
    layers = adapters(seed, torch.float64)
    index = {
        "shuffled": torch.tensor([3, 0, 4, 1, 0, 2, 4, 1]),
        "sorted": torch.tensor([0, 0, 1, 1, 2, 3, 3, 4]),
        "with_base": torch.tensor([2, -1, 0, -1, 4, 4, -1, 0]),
    }[order]
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randn(8, 5, IN, generator=gen, dtype=torch.float64)
    r0 = torch.randn(8, 5, OUT, generator=gen, dtype=torch.float64)
    weight = torch.randn(8, 5, OUT, generator=gen, dtype=torch.float64)
    params = [p for d, u, _, _ in layers for p in (*d.parameters(), *u.parameters())]

    def grads(run):
        for p in params:
            p.grad = None
        x, r = x0.clone().requires_grad_(), r0.clone().requires_grad_()
        (run(x, r) * weight).sum().backward()
        return [x.grad, r.grad] + [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]

    mixed = grads(lambda x, r: ops.sparse_adapter_multi(x, index, r, specs_of(layers)))
    unused = [k for k in range(len(layers)) if k not in index.tolist()]
    for k in unused:  # an adapter without rows gets zero gradients (not none: it was in the op)
        assert layers[k][0].values.grad is not None and not layers[k][0].values.grad.any()
    one_by_one = grads(lambda x, r: row_reference(x, r, index, layers))
    for got, want in zip(mixed, one_by_one):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_gradcheck(seed):
    layers = adapters(seed, torch.float64, specs=SPECS[:3])
    index = torch.tensor([2, 0, -1, 1, 0])
    x = torch.randn(5, 3, IN, dtype=torch.float64, requires_grad=True)
    r = torch.randn(5, 3, OUT, dtype=torch.float64, requires_grad=True)
    values = [t for d, u, _, _ in layers for t in (d.values, d.bias, u.values, u.bias) if t is not None]

    def run(x, r, *vals):
        it = iter(vals)
        specs = []
        for d, u, act, scale in layers:
            db = d.csr_buffers()
            ub = u.csr_buffers()
            dv, dbias = next(it), (next(it) if db[1] is not None else None)
            uv, ubias = next(it), (next(it) if ub[1] is not None else None)
            specs.append(((dv, dbias) + db[2:], (uv, ubias) + ub[2:], act, scale))
        return ops.sparse_adapter_multi(x, index, r, specs)

    torch.autograd.gradcheck(run, (x, r, *[v.detach().requires_grad_() for v in values]))


def test_opcheck(seed):
    layers = adapters(seed, specs=SPECS[:3])
    packed = ops.pack_adapters(specs_of(layers), OUT, torch.empty(0), transposed=True)
    x = torch.randn(4, 3, IN, requires_grad=True)
    res = torch.randn(4, 3, OUT, requires_grad=True)
    dv = packed["down_values"].detach().requires_grad_()
    uv = packed["up_values"].detach().requires_grad_()
    args = (
        x,
        torch.tensor([1, -1, 0, 2]),
        res,
        dv,
        None,
        packed["down_crow"],
        packed["down_col"],
        uv,
        None,
        packed["up_crow"],
        packed["up_col"],
        packed["bottleneck"],
        packed["down_nnz"],
        packed["up_nnz"],
        OUT,
        packed["activation"],
        packed["scale"],
        True,
        *packed["transposed"],
    )
    torch.library.opcheck(_ops.sparse_adapter_multi.default, args)


def test_compile_trace_and_export(seed, tmp_path):
    layers = adapters(seed, specs=SPECS[:3])

    class Mixed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([m for d, u, _, _ in layers for m in (d, u)])

        def forward(self, x, index):
            return ops.sparse_adapter_multi(x, index, x[..., :OUT], specs_of(layers))

    module = Mixed().eval()
    x, index = torch.randn(4, 6, IN), torch.tensor([0, 2, -1, 1])
    y, other = torch.randn(3, 9, IN), torch.tensor([2, 2, 0])
    with torch.no_grad():
        traced = torch.jit.trace(module, (x, index))
        traced.save(str(tmp_path / "m.pt"))
        loaded = torch.jit.load(str(tmp_path / "m.pt"))
        assert "sparseadapter::sparse_adapter_multi" in str(loaded.inlined_graph)
        torch.testing.assert_close(loaded(y, other), module(y, other))  # another batch and other adapters
        program = torch.export.export(module, (x, index))
        torch.testing.assert_close(program.module()(x, index), module(x, index))
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True)
    xg = x.clone().requires_grad_()
    torch.testing.assert_close(compiled(xg, index), module(x, index))
    g = torch.autograd.grad(compiled(xg, index).sum(), xg)[0]
    torch.testing.assert_close(g, torch.autograd.grad(module(xg, index).sum(), xg)[0])


def test_autocast(seed):
    layers = adapters(seed, specs=SPECS[:2])
    x = torch.randn(3, 4, IN, requires_grad=True)
    index = torch.tensor([1, 0, 1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ops.sparse_adapter_multi(x, index, None, specs_of(layers))
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert x.grad.dtype == torch.float32 and layers[0][0].values.grad.dtype == torch.float32


def test_bad_inputs_are_named(seed):
    layers = adapters(seed, specs=SPECS[:2])
    specs = specs_of(layers)
    x = torch.randn(3, 4, IN)
    with pytest.raises(ValueError, match=r"adapter_index\[1\] = 2 is out of range for 2 adapter"):
        ops.sparse_adapter_multi(x, torch.tensor([0, 2, -1]), None, specs)
    with pytest.raises(ValueError, match=r"adapter_index\[0\] = -2"):
        ops.sparse_adapter_multi(x, torch.tensor([-2, 0, 0]), None, specs)
    with pytest.raises(ValueError, match="adapter_index has 2 entries but x has 3 rows"):
        ops.sparse_adapter_multi(x, torch.tensor([0, 1]), None, specs)
    with pytest.raises(TypeError, match="adapter_index must be int32 or int64"):
        ops.sparse_adapter_multi(x, torch.tensor([0.0, 1.0, 1.0]), None, specs)
    with pytest.raises(ValueError, match=r"x must have shape \[rows, \.\.\., in_features\]"):
        ops.sparse_adapter_multi(torch.randn(IN), torch.tensor([0]), None, specs)
    with pytest.raises(ValueError, match="residual must have the output's shape"):
        ops.sparse_adapter_multi(x, torch.tensor([0, 1, 1]), torch.randn(3, 4, OUT + 1), specs)
    with pytest.raises(ValueError, match="adapter 1: .*activation must be one of"):
        ops.sparse_adapter_multi(x, torch.tensor([0, 1, 1]), None, [specs[0], specs[1][:2] + ("swish", 1.0)])
    with pytest.raises(ValueError, match=r"\(adapter 1\): col_indices.*out of range for 24 columns \(x's last dim\)"):
        wrong = adapters(seed, specs=SPECS[:1])[0]
        wrong_in = projection(8, IN + 1, 0.5, seed, torch.float32, True)
        ops.sparse_adapter_multi(
            x, torch.tensor([0, 1, 1]), None, [specs[0], (wrong_in.csr_buffers(), wrong[1].csr_buffers(), "relu", 1.0)]
        )
    # a pattern that reads outside its adapter's bottleneck: refused naming the adapter
    d, u = specs[1][0], specs[1][1]
    bad_col = u[3].clone()
    bad_col[0] = SPECS[1][0]
    with pytest.raises(ValueError, match=r"sparse_adapter_multi \(adapter 1\): col_indices\[0\]"):
        ops.sparse_adapter_multi(
            x, torch.tensor([0, 1, 1]), None, [specs[0], (d, u[:3] + (bad_col,) + u[4:], "relu", 1.0)]
        )
    packed = ops.pack_adapters(specs, OUT, x)
    with pytest.raises(
        ValueError,
        match=r"bottleneck, down_nnz, up_nnz, activation \(names separated by commas\) and scale must have one entry",
    ):
        _ops.sparse_adapter_multi.default(
            x,
            torch.tensor([0, 1, 1]),
            None,
            packed["down_values"],
            None,
            packed["down_crow"],
            packed["down_col"],
            packed["up_values"],
            None,
            packed["up_crow"],
            packed["up_col"],
            packed["bottleneck"],
            packed["down_nnz"][:1],
            packed["up_nnz"],
            OUT,
            packed["activation"],
            packed["scale"],
            False,
        )
    with pytest.raises(ValueError, match="down_col_indices has .* entries but the adapters' down_nnz make"):
        _ops.sparse_adapter_multi.default(
            x,
            torch.tensor([0, 1, 1]),
            None,
            packed["down_values"],
            None,
            packed["down_crow"],
            packed["down_col"][1:],
            packed["up_values"],
            None,
            packed["up_crow"],
            packed["up_col"],
            packed["bottleneck"],
            packed["down_nnz"],
            packed["up_nnz"],
            OUT,
            packed["activation"],
            packed["scale"],
            False,
        )
    with pytest.raises(ValueError, match="given whole or not at all"):
        _ops.sparse_adapter_multi.default(
            x,
            torch.tensor([0, 1, 1]),
            None,
            packed["down_values"],
            None,
            packed["down_crow"],
            packed["down_col"],
            packed["up_values"],
            None,
            packed["up_crow"],
            packed["up_col"],
            packed["bottleneck"],
            packed["down_nnz"],
            packed["up_nnz"],
            OUT,
            packed["activation"],
            packed["scale"],
            False,
            packed["down_crow"],
        )
