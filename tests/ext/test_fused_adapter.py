"""The fused sparse adapter (`sparseadapter::sparse_adapter`): forward and gradients against a float64
reference by the numerical rule, every activation and dtype, partial tiles and empty cases, graph
capture, the module paths (fused or not, same result) and clear errors for bad inputs."""

import pytest
import torch
import torch.nn.functional as F
from conftest import DTYPES, Pattern, assert_close_to_reference, float64_reference

import sparseadapter_ext as ops
from sparseadapter import SparseLinear
from sparseadapter.adapters import BottleneckAdapter

_ops = torch.ops.sparseadapter
ACTIVATIONS = list(ops.ADAPTER_ACTIVATIONS)
REFERENCE_ACT = {"identity": lambda h: h, "relu": torch.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}
# sup |act'| and sup |act''|, rounded up (relu's kink, a pre-activation within rounding of 0, is
# left out: it is no rounding error to bound, and rare with these inputs)
ACT_BOUNDS = {"identity": (1.0, 0.0), "relu": (1.0, 0.0), "gelu": (1.13, 0.8), "silu": (1.1, 0.5), "tanh": (1.0, 0.77)}


class _AbsActivation(torch.autograd.Function):
    """The activation in the pass on absolute values (float64_reference). Forward: sup|act'| * S_h,
    S_h the pre-activation's S: its rounding error moves act(h) by at most sup|act'| times as much,
    and |act(h)| <= |h| <= S_h enters the up projection's sum (K counts both sums' roundings).
    Backward: act' taken at the computed pre-activation is off by at most sup|act''| times its
    error, so the gradient's S becomes S_grad * (sup|act'| + sup|act''| * S_h)."""

    @staticmethod
    def forward(ctx, s, activation):
        ctx.save_for_backward(s)
        ctx.bounds = ACT_BOUNDS[activation]
        return ctx.bounds[0] * s

    @staticmethod
    def backward(ctx, grad):
        (s,) = ctx.saved_tensors
        return grad * (ctx.bounds[0] + ctx.bounds[1] * s), None


def absolute_activation(activation):
    return lambda s: _AbsActivation.apply(s, activation)


class Projection:
    """A random sparse projection as float64 weight (reference) and as the op's buffer tuple."""

    def __init__(self, out_f, in_f, density, device, seed, bias=True):
        self.p = Pattern(out_f, in_f, density, device=device, seed=seed)
        g = torch.Generator().manual_seed(seed + 1)
        self.bias64 = torch.randn(out_f, generator=g, dtype=torch.float64).to(device) if bias else None

    def buffers(self, dtype, requires_grad=False):
        values = self.p.values64.to(dtype).requires_grad_(requires_grad)
        bias = None if self.bias64 is None else self.bias64.to(dtype).requires_grad_(requires_grad)
        args = self.p.linear_args(
            values, bias
        )  # values, bias, crow, col, row_order, crow_t, col_t, perm_t, row_order_t
        return (args[0], args[1], args[2], args[3], args[5], args[6], args[7], args[8])

    def linear(self, x, values, bias):
        """The same projection through dense PyTorch, in x's dtype."""
        w = torch.zeros(self.p.shape, dtype=x.dtype, device=x.device)
        w[self.p.mask.to(x.device)] = values
        return F.linear(x, w, bias)


def reference(x, residual, down, up, d_buf, u_buf, act, scale):
    h = act(down.linear(x, d_buf[0], d_buf[1]))
    out = up.linear(h, u_buf[0], u_buf[1]) * scale
    return out if residual is None else residual + out


# (tokens, in, bottleneck, out, density): partial tiles, one token, no tokens, the CPU kernel's
# few-token products at their limit of 8 tokens with long rows ("eight_wide") and the tiles just past
# it ("nine"), empty bottleneck rows, nnz = 0, wide and narrow; "chunked": on CUDA x is staged in two column chunks and the up
# projection runs in two row chunks (the fused kernel's shared memory plan); "few": four tokens take
# CUDA's separate one-token kernels; "blocked": on CPU both projections walk their nonzeros in block
# order (tile.h); "tensor_cores": widths the CUDA dense path's tensor-core kernel serves, with partial
# warp tiles and fewer column steps than its pipeline stages; "*_wide", "*_256": wider bottlenecks,
# which take the cuBLAS products
CASES = {
    "tiles": (70, 48, 16, 48, 0.4),
    "one": (1, 33, 8, 33, 0.5),
    "none": (0, 24, 8, 24, 0.5),
    "eight_wide": (8, 700, 40, 650, 0.3),
    "nine": (9, 40, 12, 40, 0.5),
    "nnz0": (9, 20, 6, 20, 0.0),
    "dense": (33, 17, 5, 17, 1.0),
    "wide": (40, 300, 64, 300, 0.1),
    "not_square": (35, 40, 12, 24, 0.3),
    "chunked": (70, 2000, 96, 1900, 0.02),
    "few": (4, 40, 8, 40, 0.5),
    "blocked": (600, 400, 300, 400, 0.1),
    "tensor_cores": (77, 96, 64, 128, 0.3),
    "tensor_cores_wide": (150, 256, 160, 64, 0.2),
    "tensor_cores_256": (40, 64, 256, 32, 0.25),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_forward_and_gradients_match_float64(device, seed, case, activation, path):
    n, d_in, r, d_out, density = CASES[case]
    down, up = Projection(r, d_in, density, device, seed), Projection(d_out, r, density, device, seed + 7)
    x64 = torch.randn(n, d_in, dtype=torch.float64, device=device)
    res64 = torch.randn(n, d_out, dtype=torch.float64, device=device)
    g64 = torch.randn(n, d_out, dtype=torch.float64, device=device)

    def adapter(act):
        """Dense PyTorch in the inputs' dtype: out and the gradients of x, residual and the four
        parameters, from those and out's gradient."""

        def fn(x, residual, dv, db, uv, ub, g):
            leaves = [t.detach().requires_grad_() for t in (x, residual, dv, db, uv, ub)]
            out = reference(leaves[0], leaves[1], down, up, leaves[2:4], leaves[4:6], act, 0.7)
            return [out.detach(), *torch.autograd.grad(out, leaves, g)]

        return fn

    # any output's chain of roundings: the sums over the tokens and each feature dimension, at most
    # once each, plus a bias, the activation, the scale and the residual
    terms = n + d_in + r + d_out + 4
    names = ["out", "grad_x", "grad_residual", "grad_down_values", "grad_down_bias", "grad_up_values", "grad_up_bias"]
    for dtype in (torch.float32, torch.bfloat16):
        x, res, g = x64.to(dtype).requires_grad_(), res64.to(dtype).requires_grad_(), g64.to(dtype)
        d_buf, u_buf = down.buffers(dtype, True), up.buffers(dtype, True)
        inputs = (x, res, d_buf[0], d_buf[1], u_buf[0], u_buf[1])
        out = ops.sparse_adapter(x, res, d_buf, u_buf, activation, 0.7)
        fused = [out.detach(), *torch.autograd.grad(out, inputs, g, allow_unused=True)]
        ref64, abs64 = float64_reference(
            adapter(REFERENCE_ACT[activation]), *inputs, g, absolute=adapter(absolute_activation(activation))
        )
        dense = adapter(REFERENCE_ACT[activation])(*inputs, g)
        for i, name in enumerate(names):
            what = f"{case}/{activation}/{dtype}/{name}"
            assert_close_to_reference(fused[i], ref64[i], abs64[i], terms, dense[i], what)


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_dtype_and_no_residual_no_bias(device, seed, dtype, path):
    down, up = Projection(12, 40, 0.3, device, seed, bias=False), Projection(40, 12, 0.3, device, seed + 1, bias=False)
    x = torch.randn(3, 11, 40, dtype=torch.float64, device=device).to(dtype)  # leading dims are kept
    d_buf, u_buf = down.buffers(dtype), up.buffers(dtype)

    def adapter(act):
        return lambda x, dv, uv: reference(x, None, down, up, (dv, None), (uv, None), act, 2.0)

    want, s = float64_reference(adapter(F.gelu), x, d_buf[0], u_buf[0], absolute=adapter(absolute_activation("gelu")))
    got = ops.sparse_adapter(x, None, d_buf, u_buf, "gelu", 2.0)
    assert got.shape == (3, 11, 40)
    terms = 40 + 12 + 2  # the two sums, the activation and the scale
    assert_close_to_reference(got, want, s, terms, adapter(F.gelu)(x, d_buf[0], u_buf[0]), str(dtype))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bias,residual", [(True, True), (False, False), (True, False)])
def test_half_dtypes_at_tensor_core_widths(device, seed, dtype, bias, residual, path):
    """bf16 and fp16 at widths the CUDA tensor-core kernel serves, with and without biases and residual."""
    n, d_in, r, d_out = 131, 64, 32, 96
    down = Projection(r, d_in, 0.5, device, seed, bias=bias)
    up = Projection(d_out, r, 0.5, device, seed + 1, bias=bias)
    x = torch.randn(n, d_in, dtype=torch.float64, device=device).to(dtype)
    res = torch.randn(n, d_out, dtype=torch.float64, device=device).to(dtype) if residual else None
    d_buf, u_buf = down.buffers(dtype), up.buffers(dtype)

    def adapter(act):
        return lambda x, dv, db, uv, ub: reference(x, res, down, up, (dv, db), (uv, ub), act, 0.5)

    args = (x, d_buf[0], d_buf[1], u_buf[0], u_buf[1])
    want, s = float64_reference(adapter(F.silu), *args, absolute=adapter(absolute_activation("silu")))
    got = ops.sparse_adapter(x, res, d_buf, u_buf, "silu", 0.5)
    terms = d_in + r + 5  # the two sums, two biases, the activation, the scale, the residual
    assert_close_to_reference(got, want, s, terms, adapter(F.silu)(*args), f"{dtype}")


def test_gradcheck_float64(device, seed, path):
    down, up = Projection(6, 9, 0.5, device, seed), Projection(9, 6, 0.5, device, seed + 1)
    d_buf, u_buf = down.buffers(torch.float64, True), up.buffers(torch.float64, True)
    x = torch.randn(2, 5, 9, dtype=torch.float64, device=device, requires_grad=True)
    res = torch.randn(2, 5, 9, dtype=torch.float64, device=device, requires_grad=True)

    def fn(x, res, dv, db, uv, ub):
        return ops.sparse_adapter(x, res, (dv, db) + d_buf[2:], (uv, ub) + u_buf[2:], "tanh", 1.5)

    assert torch.autograd.gradcheck(fn, (x, res, d_buf[0], d_buf[1], u_buf[0], u_buf[1]))


def test_hidden_is_kept_only_for_gradients(device, seed):
    down, up = Projection(8, 16, 0.5, device, seed), Projection(16, 8, 0.5, device, seed + 1)
    x = torch.randn(5, 16, device=device)
    args = (x, None, *down.buffers(torch.float32), *up.buffers(torch.float32), "relu", 1.0)
    out, hidden = _ops.sparse_adapter.default(*args, False)
    assert hidden.numel() == 0
    out2, hidden = _ops.sparse_adapter.default(*args, True)
    assert torch.equal(out, out2)
    torch.testing.assert_close(hidden, down.linear(x, *down.buffers(torch.float32)[:2]))
    leaf = x.clone().requires_grad_()
    with pytest.raises(RuntimeError, match="save_hidden=True"):
        _ops.sparse_adapter.default(leaf, *args[1:], False)


def test_opcheck(device, seed):
    down, up = Projection(8, 16, 0.5, device, seed), Projection(16, 8, 0.5, device, seed + 1)
    x = torch.randn(2, 5, 16, device=device, requires_grad=True)
    res = torch.randn(2, 5, 16, device=device, requires_grad=True)
    torch.library.opcheck(
        _ops.sparse_adapter.default,
        (x, res, *down.buffers(torch.float32, True), *up.buffers(torch.float32, True), "silu", 0.5, True),
    )


def _adapter(device, seed, fused=True, activation="relu"):
    torch.manual_seed(seed % 2**31)
    adapter = BottleneckAdapter(32, 32, 8, activation=activation, scale=0.5)
    for name in ("down", "up"):
        layer = getattr(adapter, name)
        mask = torch.rand(layer.weight.shape) < 0.4
        setattr(adapter, name, SparseLinear.from_dense(layer.weight.detach() + 0.1, mask, layer.bias.detach() + 0.1))
    adapter.fused = fused
    return adapter.to(device)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_module_fused_equals_unfused(device, seed, activation, path):
    fused, plain = _adapter(device, seed, activation=activation), _adapter(device, seed, False, activation)
    assert fused.runs_fused() and not plain.runs_fused()
    x = torch.randn(4, 9, 32, device=device, requires_grad=True)
    outs = [a(x, x) for a in (fused, plain)]
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)
    grads = [torch.autograd.grad(o.square().sum(), [x, *a.parameters()]) for o, a in zip(outs, (fused, plain))]
    for g_fused, g_plain in zip(*grads):
        torch.testing.assert_close(g_fused, g_plain, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused(x), plain(x), rtol=1e-5, atol=1e-6)  # no residual: delta alone


def test_dropout_in_training_is_not_fused(device, seed):
    adapter = _adapter(device, seed)
    adapter.dropout.p = 0.1
    assert not adapter.train().runs_fused()
    assert adapter.eval().runs_fused()


def test_compile_fullgraph(device, seed):
    torch._dynamo.reset()
    adapter = _adapter(device, seed)
    assert adapter.runs_fused()
    compiled = torch.compile(adapter, fullgraph=True)
    for tokens in (17, 40):
        x = torch.randn(tokens, 32, device=device, requires_grad=True)
        torch.testing.assert_close(compiled(x, x), adapter(x, x))
        g = torch.autograd.grad(compiled(x, x).sum(), x)[0]
        torch.testing.assert_close(g, torch.autograd.grad(adapter(x, x).sum(), x)[0])


def test_trace_and_export(device, seed, tmp_path):
    adapter = _adapter(device, seed).eval()

    class Residual(torch.nn.Module):
        def __init__(self, a):
            super().__init__()
            self.a = a

        def forward(self, x):
            return self.a(x, x)

    module = Residual(adapter)
    x = torch.randn(5, 32, device=device)
    with torch.no_grad():
        traced = torch.jit.trace(module, (x,))
    traced.save(str(tmp_path / "m.pt"))
    loaded = torch.jit.load(str(tmp_path / "m.pt"))
    assert "sparseadapter::sparse_adapter" in str(loaded.inlined_graph)
    program = torch.export.export(module, (x,))
    y = torch.randn(9, 32, device=device)
    with torch.no_grad():
        torch.testing.assert_close(loaded(y), module(y))
        torch.testing.assert_close(program.module()(x), module(x))


def test_bad_inputs_are_named(seed):
    down, up = Projection(8, 16, 0.5, "cpu", seed), Projection(16, 8, 0.5, "cpu", seed + 1)
    d, u = down.buffers(torch.float32), up.buffers(torch.float32)
    x = torch.randn(4, 16)
    with pytest.raises(ValueError, match="activation must be one of"):
        ops.sparse_adapter(x, None, d, u, "swish", 1.0)
    with pytest.raises(ValueError, match="residual must have the output's shape"):
        ops.sparse_adapter(x, torch.randn(4, 15), d, u, "relu", 1.0)
    with pytest.raises(TypeError, match="residual has dtype"):
        ops.sparse_adapter(x, x.double(), d, u, "relu", 1.0)
    with pytest.raises(ValueError, match=r"sparse_adapter \(down\).*features|sparse_adapter \(down\)"):
        ops.sparse_adapter(torch.randn(4, 15), None, d, u, "relu", 1.0)
    with pytest.raises(ValueError, match="scale must be finite"):
        ops.sparse_adapter(x, None, d, u, "relu", float("nan"))
    # up's pattern must read only the bottleneck's 8 columns
    bad_col = u[3].clone()
    bad_col[0] = 8
    with pytest.raises(ValueError, match=r"sparse_adapter \(up\)"):
        ops.sparse_adapter(x, None, d, u[:3] + (bad_col,) + u[4:], "relu", 1.0)
    with pytest.raises(TypeError, match="use one index dtype for both"):
        ops.sparse_adapter(x, None, d, tuple(t.long() if i >= 2 else t for i, t in enumerate(u)), "relu", 1.0)
    with pytest.raises(TypeError, match=r"sparse_adapter \(up\).*dtype"):
        ops.sparse_adapter(x, None, d, (u[0].double(),) + u[1:], "relu", 1.0)


def test_inference_calls_compute_what_the_dispatcher_computes(device, seed):
    """Without gradients the wrappers go straight to the ops' kernels (sparseadapter_ext.ops
    _inference_keys): the same result bit for bit as the call through the dispatcher; and they do
    not under autocast (its casts still apply) or a dispatch mode (which still sees the op)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    down, up = Projection(8, 16, 0.5, device, seed), Projection(16, 8, 0.5, device, seed + 1)
    d, u = down.buffers(torch.float32, True), up.buffers(torch.float32, True)
    x = torch.randn(3, 16, device=device)
    res = torch.randn(3, 16, device=device)
    linear_args = down.p.linear_args(d[0], d[1])
    with torch.no_grad():
        assert ops.ops._inference_keys(x, res, *d, *u) is not None
        through_dispatcher = _ops.sparse_adapter.default(x, res, *d, *u, "gelu", 0.7, False)[0]
        assert torch.equal(ops.sparse_adapter(x, res, d, u, "gelu", 0.7), through_dispatcher)
        assert torch.equal(ops.sparse_linear(x, *linear_args), _ops.sparse_linear.default(x, *linear_args))
        device_type = torch.device(device).type
        with torch.autocast(device_type, dtype=torch.bfloat16):
            assert ops.ops._inference_keys(x, res, *d, *u) is None
            assert ops.sparse_adapter(x, res, d, u, "gelu", 0.7).dtype == torch.bfloat16
            assert ops.sparse_linear(x, *linear_args).dtype == torch.bfloat16

        class Seen(TorchDispatchMode):
            def __init__(self):
                super().__init__()
                self.ops = []

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                self.ops.append(str(func))
                return func(*args, **(kwargs or {}))

        with Seen() as seen:
            ops.sparse_adapter(x, res, d, u, "gelu", 0.7)
            ops.sparse_linear(x, *linear_args)
        assert seen.ops == ["sparseadapter.sparse_adapter.default", "sparseadapter.sparse_linear.default"]
    # with a gradient to compute, the autograd path (and its result)
    out = ops.sparse_adapter(x, res, d, u, "gelu", 0.7)
    assert out.requires_grad and torch.equal(out.detach(), through_dispatcher)


def test_inference_calls_with_a_modules_parameters_go_straight_to_the_kernel(seed):
    """A module's weights are nn.Parameters: under no_grad a call with them skips the autograd kernel
    too (nn.Parameter disables torch function, as a plain tensor), with the dispatcher's result; a
    tensor subclass still goes through the dispatcher."""
    torch.manual_seed(seed)
    down = SparseLinear.from_dense(torch.randn(8, 16), torch.rand(8, 16) < 0.5, torch.randn(8))
    up = SparseLinear.from_dense(torch.randn(16, 8), torch.rand(16, 8) < 0.5, torch.randn(16))
    d, u = down.csr_buffers(), up.csr_buffers()
    assert type(d[0]) is torch.nn.Parameter and d[0].requires_grad
    x, res = torch.randn(1, 1, 16), torch.randn(1, 1, 16)

    class Marked(torch.Tensor):
        pass

    with torch.no_grad():
        assert ops.ops._inference_keys(x, res, *d, *u) is not None
        assert ops.ops._inference_keys(x.as_subclass(Marked), res, *d, *u) is None
        assert ops.ops._inference_keys(x, res.as_subclass(Marked), *d, *u) is None
        through_dispatcher = _ops.sparse_adapter.default(x, res, *d, *u, "relu", 1.0, False)[0]
        assert torch.equal(ops.sparse_adapter(x, res, d, u, "relu", 1.0), through_dispatcher)
        assert torch.equal(down(x), _ops.sparse_linear.default(x, *down._linear_args()))
