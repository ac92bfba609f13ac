"""Typed wrappers over torch.ops.sparseadapter, their fake kernels (for torch.compile / export) and
the autograd formula of sparse_linear. Schemas and their meaning: csrc/sparseadapter.cpp."""

import functools
import inspect
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .autocast import autocast_inputs
from .grad_slots import GradRoute, GradSlots, backward_output_mask, backward_outputs
from .multi_pack import MultiPackCache, pack_adapters

_ops = torch.ops.sparseadapter


def spmm(
    x: Tensor,
    values: Tensor,
    crow_indices: Tensor,
    col_indices: Tensor,
    row_order: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
) -> Tensor:
    """`x @ W.T + bias` for `x` of shape `[..., in_features]` and `W` in CSR. Not differentiable:
    use `sparse_linear` for training."""
    return _ops.spmm.default(x, values, crow_indices, col_indices, row_order, bias)


def sddmm(grad_out: Tensor, x: Tensor, crow_indices: Tensor, col_indices: Tensor) -> Tensor:
    """`out[e] = sum_n grad_out[n, row(e)] * x[n, col(e)]`: the gradient of spmm's values."""
    return _ops.sddmm.default(grad_out, x, crow_indices, col_indices)


def csr_transpose(crow_indices: Tensor, col_indices: Tensor, num_cols: int) -> Tuple[Tensor, Tensor, Tensor]:
    """CSR of `W.T` and `perm` with `values_t = values[perm]`."""
    return _ops.csr_transpose.default(crow_indices, col_indices, num_cols)


def csr_row_order(crow_indices: Tensor) -> Tensor:
    """Rows by decreasing nnz (stable), the CUDA kernels' load-balancing order."""
    return _ops.csr_row_order.default(crow_indices)


def validate_csr(crow_indices: Tensor, col_indices: Tensor, num_rows: int, num_cols: int) -> None:
    """Raise ValueError naming the first structural problem of a CSR pattern (O(nnz))."""
    _ops.validate_csr.default(crow_indices, col_indices, num_rows, num_cols)


def sparse_linear(
    x: Tensor,
    values: Tensor,
    bias: Optional[Tensor],
    crow_indices: Tensor,
    col_indices: Tensor,
    row_order: Tensor,
    crow_indices_t: Tensor,
    col_indices_t: Tensor,
    perm_t: Tensor,
    row_order_t: Tensor,
) -> Tensor:
    """Differentiable `x @ W.T + bias`; the transposed pattern and row orders come from
    `csr_transpose` and `csr_row_order` and are computed once per pattern."""
    pattern = (crow_indices, col_indices, row_order, crow_indices_t, col_indices_t, perm_t, row_order_t)
    if _eager_autograd(x, values, bias):
        x, values, bias = autocast_inputs(x.device.type, x, values, bias)
        return _SparseLinearFunction.apply(x, values, bias, pattern)
    keys = _inference_keys(x, values, bias, *pattern)
    if keys is not None:
        with torch._C._AutoDispatchBelowAutograd():
            return _ops.sparse_linear.default.redispatch(keys, x, values, bias, *pattern)
    return _ops.sparse_linear.default(x, values, bias, *pattern)


def csr_to_dense(values: Tensor, crow_indices: Tensor, col_indices: Tensor, num_cols: int) -> Tensor:
    """The dense matrix `[num_rows, num_cols]` of a CSR pattern and its values, zeros elsewhere;
    differentiable with respect to `values` (the gradient is `csr_gather` of the dense gradient)."""
    return _ops.csr_to_dense.default(values, crow_indices, col_indices, num_cols)


def csr_gather(dense: Tensor, crow_indices: Tensor, col_indices: Tensor) -> Tensor:
    """`dense` at the pattern: `out[e] = dense[row(e), col_indices[e]]`; differentiable."""
    return _ops.csr_gather.default(dense, crow_indices, col_indices)


PATH_MODES = ("auto", "sparse", "dense")


def set_path_mode(mode: str) -> str:
    """Which path spmm, sddmm, sparse_linear and sparse_adapter run: "sparse" (the CSR kernels),
    "dense" (the weight expanded per call into a dense scratch, then the vendor GEMM) or "auto" (both
    timed at the first call of each problem on this machine, the faster kept for the process; the
    sparse path only where it is faster by `sparse_path_margin()`, since the dense path never costs
    much more than the vendor's product while the sparse path's cost has no such bound).
    Returns the previous mode. The environment variable SPARSEADAPTER_PATH sets the initial mode."""
    from . import _C

    if mode not in PATH_MODES:
        raise ValueError(f"path mode must be one of {', '.join(PATH_MODES)}, got {mode!r}")
    return _C.set_path_mode(mode)


def path_mode() -> str:
    from . import _C

    return _C.path_mode()


def path_decisions() -> List[dict]:
    """One dict per problem this process ran: op, device, dtype, dims (op-specific sizes: spmm and
    sddmm (out, in, nnz, has_bias, 0, 0), with 1 in the fifth for sparse_linear's grad_x multiplied by the
    weight its forward expanded; sparse_adapter (in, bottleneck, out, nnz_down, nnz_up,
    flags)), tokens (rounded up to a power of two), path ("sparse" or "dense"), source ("measured",
    "cached": measured by an earlier process on this machine (path_cache), "forced"), ms_sparse and
    ms_dense (the measured medians, else None), calls."""
    from . import _C

    return _C.path_decisions()


def sparse_path_margin() -> float:
    """The fraction by which the sparse path's median time must be below the dense path's for auto
    mode to choose it (0.03: at most 97% of the dense path's time)."""
    from . import _C

    return _C.sparse_path_margin()


def clear_path_decisions() -> None:
    """Forget every decision: the next call of each problem measures again (in auto mode)."""
    from . import _C

    _C.clear_path_decisions()


def cpu_isa() -> str:
    """The x86 vector variant the CPU kernels run: "avx512bf16" (AVX-512 with the bf16 dot product,
    which the bfloat16 SpMM uses), "avx512", "avx2" or "baseline": the widest the CPU supports,
    capped by the environment variable SPARSEADAPTER_CPU_ISA, read once."""
    from . import _C

    return _C.cpu_isa()


def has_cuda_kernels() -> bool:
    """Whether this build of the extension carries the CUDA kernels."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("sparseadapter::spmm", "CUDA")


# Fake kernels: output metadata only, so graphs can be traced without running the ops.
#
# The fake kernels are also the ops' Meta kernels, and the dispatcher picks the Meta kernel for a call
# in which any tensor is on the meta device (Meta ranks above CPU and CUDA): `spmm(x_cpu, v, crow_meta,
# col)` never reaches the C++ kernel and its device checks, and a fake that allocated its output like
# x returned uninitialized CPU memory. So every fake checks, before anything else, that all its tensor
# arguments share the reference argument's device, with the C++ checks' message (ValueError). A call
# with every tensor on meta is a shape computation and stays allowed.


def _check_one_device(op: str, reference: str, named) -> None:
    ref = None
    for name, t in named:
        if isinstance(t, (list, tuple)):
            items = [(f"{name}[{i}]", u) for i, u in enumerate(t)]
        else:
            items = [(name, t)]
        for item_name, u in items:
            if not isinstance(u, Tensor):
                continue
            if ref is None:
                ref = u.device
                ref_name = reference
            elif u.device != ref:
                raise ValueError(
                    f"{op}: {item_name} is on {u.device} but {ref_name} is on {ref}; move all arguments to one device"
                )


def _fake(qualname: str, reference: str, exempt: Tuple[str, ...] = ()):
    """register_fake with the device check above; `reference` names the first tensor argument, the one
    the others are compared with (the C++ checks' reference); `exempt` names arguments that may live
    elsewhere (an adapter index read on the host may be on the CPU)."""
    op = qualname.split("::")[1]

    def register(fn):
        names = list(inspect.signature(fn).parameters)

        @functools.wraps(fn)
        def checked(*args, **kwargs):
            named = [(n, a) for n, a in list(zip(names, args)) + list(kwargs.items()) if n not in exempt]
            _check_one_device(op, reference, named)
            return fn(*args, **kwargs)

        torch.library.register_fake(qualname)(checked)
        return fn

    return register


def _linear_output(x: Tensor, crow_indices: Tensor) -> Tensor:
    torch._check(x.dim() >= 1, lambda: "x must have shape [..., in_features]")
    return x.new_empty((*x.shape[:-1], crow_indices.shape[0] - 1))


@_fake("sparseadapter::spmm", "x")
def _spmm_fake(x, values, crow_indices, col_indices, row_order=None, bias=None):
    return _linear_output(x, crow_indices)


@_fake("sparseadapter::sparse_linear", "x")
def _sparse_linear_fake(
    x, values, bias, crow_indices, col_indices, row_order, crow_indices_t, col_indices_t, perm_t, row_order_t
):
    torch._check(
        x.shape[-1] == crow_indices_t.shape[0] - 1,
        lambda: f"sparse_linear: x has {x.shape[-1]} features but the weight has {crow_indices_t.shape[0] - 1} columns",
    )
    return _linear_output(x, crow_indices)


@_fake("sparseadapter::sddmm", "grad_out")
def _sddmm_fake(grad_out, x, crow_indices, col_indices):
    return x.new_empty(col_indices.shape)


@_fake("sparseadapter::csr_transpose", "crow_indices")
def _csr_transpose_fake(crow_indices, col_indices, num_cols):
    return (
        crow_indices.new_empty((num_cols + 1,)),
        col_indices.new_empty(col_indices.shape),
        col_indices.new_empty(col_indices.shape),
    )


@_fake("sparseadapter::csr_row_order", "crow_indices")
def _csr_row_order_fake(crow_indices):
    return crow_indices.new_empty((crow_indices.shape[0] - 1,))


@_fake("sparseadapter::csr_to_dense", "values")
def _csr_to_dense_fake(values, crow_indices, col_indices, num_cols):
    return values.new_empty((crow_indices.shape[0] - 1, num_cols))


@_fake("sparseadapter::csr_gather", "dense")
def _csr_gather_fake(dense, crow_indices, col_indices):
    torch._check(dense.dim() == 2, lambda: "csr_gather: dense must be 2-D")
    return dense.new_empty(col_indices.shape)


def _pattern_setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[1], inputs[2])
    ctx.num_cols = inputs[3] if len(inputs) == 4 else inputs[0].shape[1]


_CSR_TO_DENSE_SLOTS = GradSlots.of_op(_ops.csr_to_dense.default, ("values",))
_CSR_GATHER_SLOTS = GradSlots.of_op(_ops.csr_gather.default, ("dense",))


def _csr_to_dense_backward(ctx, grad):
    crow, col = ctx.saved_tensors
    return _CSR_TO_DENSE_SLOTS.pack({"values": _ops.csr_gather.default(grad.contiguous(), crow, col)})


def _csr_gather_backward(ctx, grad):
    crow, col = ctx.saved_tensors
    return _CSR_GATHER_SLOTS.pack({"dense": _ops.csr_to_dense.default(grad, crow, col, ctx.num_cols)})


torch.library.register_autograd(
    "sparseadapter::csr_to_dense", _csr_to_dense_backward, setup_context=_pattern_setup_context
)
torch.library.register_autograd("sparseadapter::csr_gather", _csr_gather_backward, setup_context=_pattern_setup_context)


@_fake("sparseadapter::validate_csr", "crow_indices")
def _validate_csr_fake(crow_indices, col_indices, num_rows, num_cols):
    return None


# Autograd of sparse_linear: one backward op (grad_x = grad_y @ W through the transposed pattern,
# grad_values by SDDMM, grad_bias by a sum). Registered on the op (torch.compile, torch.export, direct
# op calls) and, with less host time per call, as the eager autograd.Function of the Python wrappers
# (_eager_autograd): both call sparse_linear_backward, the Function with the weight its forward
# expanded on the dense path (sparse_linear_forward). Index tensors get no gradient.


def capturing_graph() -> bool:
    """Whether torch.jit.trace or torch.compile / torch.export is capturing this call. (The
    private `torch._C._is_tracing` is what `torch.jit.is_tracing` returns outside TorchScript, at a
    hundredth of its cost: these checks run on every adapter call of every decoding step. Dynamo
    reads is_compiling() as a constant and cannot trace _is_tracing, hence this order.)"""
    return torch.compiler.is_compiling() or torch._C._is_tracing()


def _eager_autograd(*tensors: Optional[Tensor]) -> bool:
    """Whether a wrapper call records its own autograd.Function: in eager mode when a gradient will be
    needed. torch.library's autograd wrapper costs about 0.1 ms of host time per call (measured on a
    CPU), which an eager training step on a GPU pays on every layer; graphs (compile, trace) take the
    op's registration. The wrapper applies autocast's casts itself (autocast_inputs), outside the
    function, as the op's autocast kernel would before its autograd."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors) and not capturing_graph()


def _inference_keys(x: Tensor, *tensors: Optional[Tensor]):
    """The dispatch keys below autograd for a call on `x` and `tensors` (all its other tensor
    arguments) that needs no gradient, when the call may go straight there; else None.

    At inference (generation: 1-16 tokens per call) an op call's host time is most of its cost, and
    under torch.no_grad a call still passes the Python autograd kernel that torch.library registers
    for the op (it only finds that no gradient is needed, then redispatches). This goes to the same
    kernel directly, as that kernel does (torch._library.autograd), when nothing above autograd has
    work to do: no gradient, no tracing or compiling, no autocast on x's device type (its casts run
    above autograd), no torch function or dispatch mode, no functorch transform, plain tensors all on
    x's device type (a meta tensor among them takes the dispatcher to the fake kernel's checks).
    Parameters count as plain (nn.Parameter disables torch function): a module's weights are."""
    if type(x) not in _PLAIN_TENSORS:
        return None
    cpu = x.is_cpu
    if not (cpu or x.is_cuda):
        return None
    kind = "cpu" if cpu else "cuda"
    if not _nothing_above_autograd(kind):
        return None
    grad = torch.is_grad_enabled()
    if grad and x.requires_grad:
        return None
    for t in tensors:  # (Tensor.is_cpu costs a fifth of Tensor.device.type)
        if t is not None and (
            type(t) not in _PLAIN_TENSORS or (not t.is_cpu if cpu else not t.is_cuda) or (grad and t.requires_grad)
        ):
            return None
    return _BACKEND_KEYS[kind]


def _nothing_above_autograd(kind: str) -> bool:
    """Whether no state of this thread gives the layers above autograd work for a call on device type
    `kind`: no autocast there, no tracing or compiling, no torch function or dispatch mode, no
    functorch transform."""
    return not (
        torch.is_autocast_enabled(kind)
        or capturing_graph()
        or torch._C._len_torch_dispatch_stack() > 0
        or torch._C._is_torch_function_mode_enabled()
        or torch._C._are_functorch_transforms_active()
    )


_PLAIN_TENSORS = frozenset((Tensor, torch.nn.Parameter))

# The kernels an inference call goes to (the ops' C++ kernels); other devices take the dispatcher.
_BACKEND_KEYS = {
    "cpu": torch._C.DispatchKeySet(torch._C.DispatchKey.CPU),
    "cuda": torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA),
}


# The inputs of sparse_linear that take a gradient (the same names in the op and its Function).
_LINEAR_DIFFERENTIABLE = ("x", "values", "bias")


def _linear_grads(grad_y, x, values, crow, col, crow_t, col_t, perm_t, row_order_t, needed):
    """The gradients of x, values and bias by name, None where `needed` says no."""
    op = _ops.sparse_linear_backward.default
    mask = backward_output_mask(op, needed)
    computed = op(grad_y, x, values, crow, col, crow_t, col_t, perm_t, row_order_t, mask)
    return backward_outputs(op, computed, mask)


class _SparseLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, values, bias, pattern):
        ctx.pattern = pattern
        # On the dense path the forward's expanded W is kept for grad_x (one dense weight per layer
        # until the backward; empty on the sparse path). values stays saved even then, so that an
        # in-place change of it before the backward is reported as for every other path.
        y, weight = _ops.sparse_linear_forward.default(x, values, bias, *pattern, x.requires_grad)
        # x is needed for the values' gradient only, values for x's only.
        ctx.save_for_backward(
            x if values.requires_grad else None,
            values if x.requires_grad else None,
            weight if weight.numel() else None,
        )
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, values, weight = ctx.saved_tensors
        crow, col, _row_order, crow_t, col_t, perm_t, row_order_t = ctx.pattern
        route = _LINEAR_FUNCTION_ROUTE  # (every training step: no dicts by name)
        mask = route.mask(ctx)
        computed = _ops.sparse_linear_backward.default(
            grad_y, x, values, crow, col, crow_t, col_t, perm_t, row_order_t, mask, weight
        )
        return route.pack(computed, mask)


_LINEAR_FUNCTION_SLOTS = GradSlots.of_function(_SparseLinearFunction, _LINEAR_DIFFERENTIABLE)
_LINEAR_FUNCTION_ROUTE = GradRoute(_LINEAR_FUNCTION_SLOTS, _ops.sparse_linear_backward.default)
_LINEAR_OP_SLOTS = GradSlots.of_op(_ops.sparse_linear.default, _LINEAR_DIFFERENTIABLE)


def _sparse_linear_setup_context(ctx, inputs, output):
    x, values, bias, crow, col, _row_order, crow_t, col_t, perm_t, row_order_t = inputs
    needed = _LINEAR_OP_SLOTS.needed(ctx)
    ctx.save_for_backward(
        x if needed["values"] else None,
        values if needed["x"] else None,
        crow,
        col,
        crow_t,
        col_t,
        perm_t,
        row_order_t,
    )


def _sparse_linear_backward(ctx, grad_y):
    return _LINEAR_OP_SLOTS.pack(_linear_grads(grad_y, *ctx.saved_tensors, _LINEAR_OP_SLOTS.needed(ctx)))


@_fake("sparseadapter::sparse_linear_forward", "x")
def _sparse_linear_forward_fake(
    x,
    values,
    bias,
    crow_indices,
    col_indices,
    row_order,
    crow_indices_t,
    col_indices_t,
    perm_t,
    row_order_t,
    keep_weight,
):
    # The weight's shape depends on the path chosen at run time, which a graph cannot know.
    raise RuntimeError(
        "sparse_linear_forward is the eager training forward and cannot be traced; graphs use sparse_linear "
        "(whose registered autograd expands the weight in the backward)"
    )


@_fake("sparseadapter::sparse_linear_backward", "grad_y")
def _sparse_linear_backward_fake(
    grad_y,
    x,
    values,
    crow_indices,
    col_indices,
    crow_indices_t,
    col_indices_t,
    perm_t,
    row_order_t,
    output_mask,
    weight=None,
):
    none = grad_y.new_empty((0,))
    grad_x = grad_y.new_empty((*grad_y.shape[:-1], crow_indices_t.shape[0] - 1)) if output_mask[0] else none
    grad_values = grad_y.new_empty(col_indices.shape) if output_mask[1] else none
    grad_bias = grad_y.new_empty(grad_y.shape[-1:]) if output_mask[2] else none
    return grad_x, grad_values, grad_bias


torch.library.register_autograd(
    "sparseadapter::sparse_linear", _sparse_linear_backward, setup_context=_sparse_linear_setup_context
)


# The fused bottleneck adapter: out = residual + scale * up(act(down(x))), down and up in CSR.

ADAPTER_ACTIVATIONS = ("identity", "relu", "gelu", "silu", "tanh")


def sparse_adapter(
    x: Tensor,
    residual: Optional[Tensor],
    down: Tuple[Tensor, ...],
    up: Tuple[Tensor, ...],
    activation: str,
    scale: float,
) -> Tensor:
    """Differentiable `residual + scale * (act(x @ D.T + bd) @ U.T + bu)`. `down` and `up` are each
    `(values, bias or None, crow_indices, col_indices, crow_indices_t, col_indices_t, perm_t,
    row_order_t)`, the buffers of a SparseLinear. The pre-activation is kept for the backward only
    when a gradient will be needed."""
    if _eager_autograd(x, residual, down[0], down[1], up[0], up[1]):
        cast = autocast_inputs(x.device.type, x, residual, down[0], down[1], up[0], up[1])
        return _SparseAdapterFunction.apply(*cast, down[2:], up[2:], activation, float(scale))
    keys = _inference_keys(x, residual, *down, *up)
    if keys is not None:
        with torch._C._AutoDispatchBelowAutograd():
            out, _ = _ops.sparse_adapter.default.redispatch(
                keys, x, residual, *down, *up, activation, float(scale), False
            )
        return out
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, residual, down[0], down[1], up[0], up[1])
    )
    out, _ = _ops.sparse_adapter.default(x, residual, *down, *up, activation, float(scale), needs_grad)
    return out


@_fake("sparseadapter::sparse_adapter", "x")
def _sparse_adapter_fake(
    x,
    residual,
    down_values,
    down_bias,
    down_crow,
    down_col,
    down_crow_t,
    down_col_t,
    down_perm_t,
    down_row_order_t,
    up_values,
    up_bias,
    up_crow,
    up_col,
    up_crow_t,
    up_col_t,
    up_perm_t,
    up_row_order_t,
    activation,
    scale,
    save_hidden,
):
    torch._check(activation in ADAPTER_ACTIVATIONS, lambda: f"sparse_adapter: unknown activation {activation!r}")
    torch._check(
        x.shape[-1] == down_crow_t.shape[0] - 1,
        lambda: f"sparse_adapter: x has {x.shape[-1]} features but down has {down_crow_t.shape[0] - 1} columns",
    )
    bottleneck = down_crow.shape[0] - 1
    out = x.new_empty((*x.shape[:-1], up_crow.shape[0] - 1))
    hidden = x.new_empty((*x.shape[:-1], bottleneck)) if save_hidden else x.new_empty((0,))
    return out, hidden


def _sparse_adapter_setup_context(ctx, inputs, output):
    (
        x,
        residual,
        d_values,
        _d_bias,
        d_crow,
        d_col,
        d_crow_t,
        d_col_t,
        d_perm_t,
        d_row_order_t,
        u_values,
        _u_bias,
        u_crow,
        u_col,
        u_crow_t,
        u_col_t,
        u_perm_t,
        u_row_order_t,
        activation,
        scale,
        save_hidden,
    ) = inputs
    if any(ctx.needs_input_grad) and not save_hidden:
        raise RuntimeError(
            "sparse_adapter: call it with save_hidden=True when gradients are needed "
            "(sparseadapter_ext.sparse_adapter does)"
        )
    ctx.activation, ctx.scale = activation, scale
    ctx.save_for_backward(
        x,
        output[1],
        d_values,
        d_crow,
        d_col,
        d_crow_t,
        d_col_t,
        d_perm_t,
        d_row_order_t,
        u_values,
        u_crow,
        u_col,
        u_crow_t,
        u_col_t,
        u_perm_t,
        u_row_order_t,
    )


# The inputs of sparse_adapter and sparse_adapter_multi that take a gradient (the same names in the
# ops and their Functions); the backward ops return those of all but the residual, whose gradient is
# grad_out itself.
_ADAPTER_DIFFERENTIABLE = ("x", "residual", "down_values", "down_bias", "up_values", "up_bias")


def _with_residual_grad(grads, grad_out, needed):
    """`grads` (a backward op's, by name) plus the residual's: out = residual + ..., so grad_out."""
    grads["residual"] = grad_out if needed["residual"] else None
    return grads


def _adapter_grads(grad_out, x, pre, d_values, down_pattern, u_values, up_pattern, activation, scale, needed):
    """The gradients of the adapter's differentiable inputs by name, None where `needed` says no: one
    backward op from the saved pre-activation, which recomputes no forward product."""
    op = _ops.sparse_adapter_backward.default
    mask = backward_output_mask(op, needed)
    grads = dict.fromkeys(needed)
    if any(mask):
        computed = op(grad_out, x, pre, d_values, *down_pattern, u_values, *up_pattern, activation, scale, mask)
        grads.update(backward_outputs(op, computed, mask))
    return _with_residual_grad(grads, grad_out, needed)


class _SparseAdapterFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, x, residual, down_values, down_bias, up_values, up_bias, down_pattern, up_pattern, activation, scale
    ):
        out, pre = _ops.sparse_adapter.default(
            x,
            residual,
            down_values,
            down_bias,
            *down_pattern,
            up_values,
            up_bias,
            *up_pattern,
            activation,
            scale,
            True,
        )
        ctx.patterns, ctx.activation, ctx.scale = (down_pattern, up_pattern), activation, scale
        ctx.save_for_backward(x, pre, down_values, up_values)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, pre, d_values, u_values = ctx.saved_tensors
        down_pattern, up_pattern = ctx.patterns
        grads = _adapter_grads(
            grad_out,
            x,
            pre,
            d_values,
            down_pattern,
            u_values,
            up_pattern,
            ctx.activation,
            ctx.scale,
            _ADAPTER_FUNCTION_SLOTS.needed(ctx),
        )
        return _ADAPTER_FUNCTION_SLOTS.pack(grads)


_ADAPTER_FUNCTION_SLOTS = GradSlots.of_function(_SparseAdapterFunction, _ADAPTER_DIFFERENTIABLE)
_ADAPTER_OP_SLOTS = GradSlots.of_op(_ops.sparse_adapter.default, _ADAPTER_DIFFERENTIABLE)


def _sparse_adapter_backward(ctx, grad_out, _grad_hidden):
    (
        x,
        pre,
        d_values,
        d_crow,
        d_col,
        d_crow_t,
        d_col_t,
        d_perm_t,
        d_row_order_t,
        u_values,
        u_crow,
        u_col,
        u_crow_t,
        u_col_t,
        u_perm_t,
        u_row_order_t,
    ) = ctx.saved_tensors
    grads = _adapter_grads(
        grad_out,
        x,
        pre,
        d_values,
        (d_crow, d_col, d_crow_t, d_col_t, d_perm_t, d_row_order_t),
        u_values,
        (u_crow, u_col, u_crow_t, u_col_t, u_perm_t, u_row_order_t),
        ctx.activation,
        ctx.scale,
        _ADAPTER_OP_SLOTS.needed(ctx),
    )
    return _ADAPTER_OP_SLOTS.pack(grads)


@_fake("sparseadapter::sparse_adapter_backward", "grad_out")
def _sparse_adapter_backward_fake(
    grad_out,
    x,
    hidden_pre,
    down_values,
    down_crow,
    down_col,
    down_crow_t,
    down_col_t,
    down_perm_t,
    down_row_order_t,
    up_values,
    up_crow,
    up_col,
    up_crow_t,
    up_col_t,
    up_perm_t,
    up_row_order_t,
    activation,
    scale,
    output_mask,
):
    none = grad_out.new_empty((0,))
    shapes = (x.shape, down_col.shape, (down_crow.shape[0] - 1,), up_col.shape, (up_crow.shape[0] - 1,))
    return tuple(grad_out.new_empty(shape) if m else none for shape, m in zip(shapes, output_mask))


torch.library.register_autograd(
    "sparseadapter::sparse_adapter", _sparse_adapter_backward, setup_context=_sparse_adapter_setup_context
)


# sparse_adapter at inference: the forward tensors only (schema: csrc/sparseadapter.cpp).


def sparse_adapter_infer(
    x: Tensor,
    residual: Optional[Tensor],
    down: Tuple[Optional[Tensor], ...],
    up: Tuple[Optional[Tensor], ...],
    activation: str,
    scale: float,
) -> Tensor:
    """`residual + scale * (act(x @ D.T + bd) @ U.T + bu)` without gradients. `down` and `up` are each
    `(values, bias or None, crow_indices, col_indices)`. A call that needs a gradient raises (use
    sparse_adapter); autocast applies as to sparse_adapter."""
    return _ops.sparse_adapter_infer.default(x, residual, *down, *up, activation, float(scale))


@_fake("sparseadapter::sparse_adapter_infer", "x")
def _sparse_adapter_infer_fake(
    x, residual, down_values, down_bias, down_crow, down_col, up_values, up_bias, up_crow, up_col, activation, scale
):
    torch._check(activation in ADAPTER_ACTIVATIONS, lambda: f"sparse_adapter_infer: unknown activation {activation!r}")
    return x.new_empty((*x.shape[:-1], up_crow.shape[0] - 1))


def _sparse_adapter_infer_setup_context(ctx, inputs, output):
    # called only when a gradient is needed (torch.library's autograd kernel): refused at the call
    raise RuntimeError(
        "sparse_adapter_infer computes no gradient, but an input requires one under grad mode; "
        "use sparseadapter_ext.sparse_adapter, or call it under torch.no_grad()"
    )


def _sparse_adapter_infer_backward(ctx, grad_out):
    raise RuntimeError("sparse_adapter_infer has no backward")  # unreachable: setup_context refuses first


torch.library.register_autograd(
    "sparseadapter::sparse_adapter_infer",
    _sparse_adapter_infer_backward,
    setup_context=_sparse_adapter_infer_setup_context,
)

_INFER_REDISPATCH = _ops.sparse_adapter_infer.default.redispatch


class PreparedAdapter:
    """One adapter's inference call with its own tensors fixed: `prepared(x, residual)` is
    `sparse_adapter_infer(x, residual, down, up, activation, scale)` straight to the back end's kernel,
    or None where that call must take the dispatcher (the caller then takes its general path).

    Made once per state of the module (its owner rebuilds it when the module changes): what can be
    known of the module's tensors alone is decided here once (plain tensors, all on the CPU or all on
    CUDA); each call checks only x, the residual, the thread's state (_nothing_above_autograd) and,
    under grad mode, that nothing requires a gradient. Every check of the tensors themselves stays in
    the op (csrc/validation.cpp)."""

    __slots__ = ("args", "cpu", "keys", "weights")

    def __init__(self, down, up, activation: str, scale: float) -> None:
        if len(down) != 4 or len(up) != 4:
            raise ValueError("PreparedAdapter: down and up are each (values, bias or None, crow_indices, col_indices)")
        tensors = [t for t in (*down, *up) if t is not None]
        self.args = (*down, *up, activation, float(scale))
        self.weights = (down[0], down[1], up[0], up[1])
        first = tensors[0]
        self.cpu = first.is_cpu
        same = all(t.is_cpu for t in tensors) if self.cpu else all(t.is_cuda for t in tensors)
        plain = all(type(t) in _PLAIN_TENSORS for t in tensors)
        self.keys = _BACKEND_KEYS["cpu" if self.cpu else "cuda"] if plain and same else None

    def __call__(self, x: Tensor, residual: Optional[Tensor]) -> Optional[Tensor]:
        keys, cpu = self.keys, self.cpu
        if keys is None or type(x) not in _PLAIN_TENSORS or (not x.is_cpu if cpu else not x.is_cuda):
            return None
        if residual is not None and (
            type(residual) not in _PLAIN_TENSORS or (not residual.is_cpu if cpu else not residual.is_cuda)
        ):
            return None
        if not _nothing_above_autograd("cpu" if cpu else "cuda"):
            return None
        if torch.is_grad_enabled() and (
            x.requires_grad
            or (residual is not None and residual.requires_grad)
            or any(t is not None and t.requires_grad for t in self.weights)
        ):
            return None
        with torch._C._AutoDispatchBelowAutograd():
            return _INFER_REDISPATCH(keys, x, residual, *self.args)


# Several adapters in one batch, one per row: the adapters' arrays concatenated, an index per row.


def sparse_adapter_multi(
    x: Tensor,
    adapter_index: Tensor,
    residual: Optional[Tensor],
    adapters: Sequence[Tuple],
    out_features: Optional[int] = None,
    pack_cache: Optional[MultiPackCache] = None,
) -> Tensor:
    """Differentiable mixed-adapter bottleneck: row `i` of `x` (`[rows, ..., in]`) gets
    `residual[i] + scale_k * (act_k(x[i] @ D_k.T + bd_k) @ U_k.T + bu_k)` with `k = adapter_index[i]`,
    and `residual[i]` (zeros without a residual) where `k == -1`. `adapters[k]` is
    `(down, up, activation, scale)`, down and up the buffers of a SparseLinear (`csr_buffers()`); a
    LoRA adapter is `(A, B, "identity", alpha / r)`. One op over the batch: the rows are grouped by
    adapter inside it, each group running its adapter's kernel. Gradients reach x, the residual and
    every adapter's values and biases. `pack_cache` (a MultiPackCache owned by the call site) keeps the
    concatenated arrays from call to call while the adapters' tensors are unchanged."""
    if out_features is None:
        if adapters:
            out_features = adapters[0][1][2].numel() - 1
        elif residual is not None:
            out_features = int(residual.shape[-1])
        else:
            raise ValueError("sparse_adapter_multi: out_features is needed without adapters and without a residual")
    params = [t for a in adapters for t in (a[0][0], a[0][1], a[1][0], a[1][1])]
    if pack_cache is not None and capturing_graph():  # a graph records the concatenations, not a cache's
        pack_cache = None
    if _eager_autograd(x, residual, *params):
        packed = _packed(pack_cache, adapters, out_features, x, transposed=True, values_cached=False)
        cast = autocast_inputs(
            x.device.type,
            x,
            residual,
            packed["down_values"],
            packed["down_bias"],
            packed["up_values"],
            packed["up_bias"],
        )
        return _SparseAdapterMultiFunction.apply(*cast, adapter_index, _multi_static(packed))
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, residual, *params))
    packed = _packed(pack_cache, adapters, out_features, x, transposed=needs_grad, values_cached=not needs_grad)
    out, _ = _ops.sparse_adapter_multi.default(
        x,
        adapter_index,
        residual,
        packed["down_values"],
        packed["down_bias"],
        packed["down_crow"],
        packed["down_col"],
        packed["up_values"],
        packed["up_bias"],
        packed["up_crow"],
        packed["up_col"],
        packed["bottleneck"],
        packed["down_nnz"],
        packed["up_nnz"],
        packed["out_features"],
        packed["activation"],
        packed["scale"],
        needs_grad,
        *packed.get("transposed", (None,) * 8),
    )
    return out


def _packed(pack_cache, adapters, out_features, x, transposed, values_cached):
    if pack_cache is None:
        return pack_adapters(adapters, out_features, x, transposed)
    return pack_cache.pack(adapters, out_features, x, transposed, values=values_cached)


def _multi_static(packed):
    """What the autograd function keeps of a pack besides the differentiable tensors."""
    return (
        packed["down_crow"],
        packed["down_col"],
        packed["up_crow"],
        packed["up_col"],
        packed["transposed"],
        (
            packed["bottleneck"],
            packed["down_nnz"],
            packed["up_nnz"],
            packed["out_features"],
            packed["activation"],
            packed["scale"],
        ),
    )


def _multi_grads(
    grad_out, x, adapter_index, pre, d_values, d_crow, d_col, d_t, u_values, u_crow, u_col, u_t, sizes, needed
):
    """The gradients of the adapters' differentiable inputs by name, None where `needed` says no
    (one backward op)."""
    op = _ops.sparse_adapter_multi_backward.default
    mask = backward_output_mask(op, needed)
    grads = dict.fromkeys(needed)
    if any(mask):
        computed = op(
            grad_out, x, adapter_index, pre, d_values, d_crow, d_col, *d_t, u_values, u_crow, u_col, *u_t, *sizes, mask
        )
        grads.update(backward_outputs(op, computed, mask))
    return _with_residual_grad(grads, grad_out, needed)


class _SparseAdapterMultiFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, down_values, down_bias, up_values, up_bias, adapter_index, static):
        d_crow, d_col, u_crow, u_col, transposed, sizes = static
        out, pre = _ops.sparse_adapter_multi.default(
            x,
            adapter_index,
            residual,
            down_values,
            down_bias,
            d_crow,
            d_col,
            up_values,
            up_bias,
            u_crow,
            u_col,
            *sizes,
            True,
        )
        ctx.static = static
        ctx.save_for_backward(x, pre, down_values, up_values, adapter_index)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, pre, d_values, u_values, adapter_index = ctx.saved_tensors
        d_crow, d_col, u_crow, u_col, transposed, sizes = ctx.static
        grads = _multi_grads(
            grad_out,
            x,
            adapter_index,
            pre,
            d_values,
            d_crow,
            d_col,
            transposed[:4],
            u_values,
            u_crow,
            u_col,
            transposed[4:],
            sizes,
            _MULTI_FUNCTION_SLOTS.needed(ctx),
        )
        return _MULTI_FUNCTION_SLOTS.pack(grads)


_MULTI_FUNCTION_SLOTS = GradSlots.of_function(_SparseAdapterMultiFunction, _ADAPTER_DIFFERENTIABLE)
_MULTI_OP_SLOTS = GradSlots.of_op(_ops.sparse_adapter_multi.default, _ADAPTER_DIFFERENTIABLE)


@_fake("sparseadapter::sparse_adapter_multi", "x", exempt=("adapter_index",))
def _sparse_adapter_multi_fake(
    x,
    adapter_index,
    residual,
    down_values,
    down_bias,
    down_crow,
    down_col,
    up_values,
    up_bias,
    up_crow,
    up_col,
    bottleneck,
    down_nnz,
    up_nnz,
    out_features,
    activation,
    scale,
    save_hidden,
    down_crow_t=None,
    down_col_t=None,
    down_perm_t=None,
    down_row_order_t=None,
    up_crow_t=None,
    up_col_t=None,
    up_perm_t=None,
    up_row_order_t=None,
):
    for a in activation.split(",") if activation else ():
        torch._check(a in ADAPTER_ACTIVATIONS, lambda a=a: f"sparse_adapter_multi: unknown activation {a!r}")
    torch._check(x.dim() >= 2, lambda: "sparse_adapter_multi: x must have shape [rows, ..., in_features]")
    out = x.new_empty((*x.shape[:-1], out_features))
    tokens = 1
    for d in x.shape[:-1]:
        tokens = tokens * d
    hidden = x.new_empty((tokens, max(bottleneck, default=0))) if save_hidden else x.new_empty((0,))
    return out, hidden


def _sparse_adapter_multi_setup_context(ctx, inputs, output):
    (
        x,
        adapter_index,
        residual,
        d_values,
        _d_bias,
        d_crow,
        d_col,
        u_values,
        _u_bias,
        u_crow,
        u_col,
        bottleneck,
        down_nnz,
        up_nnz,
        out_features,
        activation,
        scale,
        save_hidden,
        *transposed,
    ) = inputs
    if any(ctx.needs_input_grad) and (not save_hidden or any(t is None for t in transposed)):
        raise RuntimeError(
            "sparse_adapter_multi: call it with save_hidden=True and the transposed patterns when "
            "gradients are needed (sparseadapter_ext.sparse_adapter_multi does)"
        )
    ctx.sizes = (list(bottleneck), list(down_nnz), list(up_nnz), out_features, activation, list(scale))
    ctx.save_for_backward(
        x,
        output[1],
        adapter_index,
        d_values,
        d_crow,
        d_col,
        u_values,
        u_crow,
        u_col,
        *(t if t is not None else x.new_empty(0) for t in transposed),
    )


def _sparse_adapter_multi_backward(ctx, grad_out, _grad_hidden):
    x, pre, adapter_index, d_values, d_crow, d_col, u_values, u_crow, u_col, *transposed = ctx.saved_tensors
    grads = _multi_grads(
        grad_out,
        x,
        adapter_index,
        pre,
        d_values,
        d_crow,
        d_col,
        transposed[:4],
        u_values,
        u_crow,
        u_col,
        transposed[4:],
        ctx.sizes,
        _MULTI_OP_SLOTS.needed(ctx),
    )
    return _MULTI_OP_SLOTS.pack(grads)


@_fake("sparseadapter::sparse_adapter_multi_backward", "grad_out", exempt=("adapter_index",))
def _sparse_adapter_multi_backward_fake(
    grad_out,
    x,
    adapter_index,
    hidden_pre,
    down_values,
    down_crow,
    down_col,
    down_crow_t,
    down_col_t,
    down_perm_t,
    down_row_order_t,
    up_values,
    up_crow,
    up_col,
    up_crow_t,
    up_col_t,
    up_perm_t,
    up_row_order_t,
    bottleneck,
    down_nnz,
    up_nnz,
    out_features,
    activation,
    scale,
    output_mask,
):
    none = grad_out.new_empty((0,))
    shapes = (x.shape, down_values.shape, (sum(bottleneck),), up_values.shape, (len(bottleneck) * out_features,))
    return tuple(grad_out.new_empty(shape) if m else none for shape, m in zip(shapes, output_mask))


torch.library.register_autograd(
    "sparseadapter::sparse_adapter_multi",
    _sparse_adapter_multi_backward,
    setup_context=_sparse_adapter_multi_setup_context,
)


# Pruning at initialization: fused score, exact-k global selection, mask -> CSR.


def prune_score(
    weight: Tensor, grad: Optional[Tensor] = None, hess_grad: Optional[Tensor] = None, method: str = "magnitude"
) -> Tensor:
    """Keep-score of every weight in one pass (higher = keep): "magnitude" `|w|`, "snip" `|g * w|`,
    "grasp" `w * Hg` (keeping the highest `w * Hg` removes the highest GraSP `S = -w * Hg`),
    "synflow" `|w * g|` with `g = dR/dw`. float32 for float32/16/bf16 inputs, float64 for float64."""
    return _ops.prune_score.default(weight, grad, hess_grad, method)


def topk_masks(scores: List[Tensor], k: int) -> List[Tensor]:
    """Bool masks (the scores' shapes and device) with exactly `k` True in total: the `k` highest
    scores over all tensors, found by radix select without concatenating them. Among equal scores the
    entry first in (list order, flat row-major index) is kept. NaN scores raise ValueError."""
    if len(scores) == 0:  # no tensor to dispatch on
        if k != 0:
            raise ValueError(f"topk_masks: k = {k} must be in [0, 0] (the total number of scores)")
        return []
    return _ops.topk_masks.default(scores, k)


def mask_to_csr(mask: Tensor, index_dtype: torch.dtype = torch.int32) -> Tuple[Tensor, Tensor]:
    """`(crow_indices, col_indices)` of the True entries of a 2-D mask, on its device, columns sorted
    within rows (the same arrays as `sparseadapter.csr.mask_to_csr`)."""
    return _ops.mask_to_csr.default(mask, index_dtype)


@_fake("sparseadapter::prune_score", "weight")
def _prune_score_fake(weight, grad, hess_grad, method):
    if method not in ("magnitude", "snip", "grasp", "synflow"):
        raise ValueError(f"prune_score: unknown method {method!r}")
    return weight.new_empty(weight.shape, dtype=torch.float64 if weight.dtype == torch.float64 else torch.float32)


@_fake("sparseadapter::topk_masks", "scores[0]")
def _topk_masks_fake(scores, k):
    return [s.new_empty(s.shape, dtype=torch.bool) for s in scores]


@_fake("sparseadapter::mask_to_csr", "mask")
def _mask_to_csr_fake(mask, index_dtype):
    torch._check(mask.dim() == 2, lambda: "mask_to_csr: mask must be 2-D")
    nnz = torch.library.get_ctx().new_dynamic_size()
    return mask.new_empty((mask.shape[0] + 1,), dtype=index_dtype), mask.new_empty((nnz,), dtype=index_dtype)
