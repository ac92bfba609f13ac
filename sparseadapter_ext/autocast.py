"""Autocast (automatic mixed precision) for the ops of `torch.ops.sparseadapter`.

The ops listed in `LOWER_PRECISION_OPS` follow the rule of `aten::linear`, a "lower precision" op:
inside `torch.autocast(device_type, dtype=...)` every floating-point tensor argument on that device
type, except float64, is cast to the autocast dtype (bf16 or fp16) and the op runs in it, so its
outputs come out in that dtype. Integer and bool tensors (the CSR indices, the row orders, the
permutations), tensors on another device type, None and non-tensor arguments pass through
unchanged. Outside autocast nothing is cast. The casts are ordinary differentiable ops recorded by
autograd, so the gradients of fp32 parameters come back in fp32.

Adding an op is one line: its name in `LOWER_PRECISION_OPS`.

Why not `torch.library.register_autocast`: it takes the target dtype at registration
(`cast_inputs`), so an op registered for bf16 would also be cast to bf16 under
`torch.autocast(dtype=torch.float16)`, unlike `aten::linear`, which reads the autocast dtype at
each call. This module registers the same two kernels as register_autocast (one for the C++
dispatcher, used in eager mode, one for the Python dispatcher, used when torch.compile and
torch.export trace the op) but reads the dtype with `torch.get_autocast_dtype` at call time.

Unlike aten's autocast, casts of parameters are not cached across calls within one autocast region
(each call casts its inputs), and the kernels are registered from Python: a C++ program that loads
the library without Python (libtorch) gets no autocast rule for these ops.
"""

from typing import Any, Callable, Dict, Tuple

import torch

# Ops whose floating inputs autocast casts to the autocast dtype (aten::linear's rule). Their
# schemas: csrc/sparseadapter.cpp.
LOWER_PRECISION_OPS = (
    "spmm",
    "sddmm",
    "sparse_linear",
    "sparse_adapter",
    "sparse_adapter_infer",
    "sparse_adapter_multi",
)

# The device types whose autocast the ops follow.
DEVICE_TYPES = ("cpu", "cuda")

_NAMESPACE = "sparseadapter"
_lib = torch.library.Library(_NAMESPACE, "IMPL")  # kept alive for the lifetime of the process
_registered: Dict[Tuple[str, str], Callable] = {}


def _cast(value: Any, device_type: str, dtype: torch.dtype) -> Any:
    """aten's autocast eligibility: a floating tensor on `device_type` that is not float64."""
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() and value.device.type == device_type and value.dtype != torch.float64:
            return value.to(dtype)
        return value
    if isinstance(value, (list, tuple)):  # Tensor[] / Tensor?[] arguments
        return type(value)(_cast(v, device_type, dtype) for v in value)
    return value


def autocast_inputs(device_type: str, *tensors: Any) -> Tuple[Any, ...]:
    """`tensors` as the autocast kernel of a lower-precision op on `device_type` casts them (unchanged
    outside autocast): for callers that record their own autograd.Function around the op, so that
    autograd sees the casts and the function sees the dtypes the op runs in."""
    if not torch.is_autocast_enabled(device_type):
        return tensors
    return _cast(tensors, device_type, torch.get_autocast_dtype(device_type))


def _lower_precision_kernel(op: torch._ops.OpOverload, device_type: str) -> Callable:
    key = getattr(torch._C.DispatchKey, "Autocast" + torch._C._dispatch_key_for_device(device_type))
    excluded = torch._C.DispatchKeySet(key)

    def kernel(*args, **kwargs):
        dtype = torch.get_autocast_dtype(device_type)
        args = _cast(args, device_type, dtype)
        kwargs = {k: _cast(v, device_type, dtype) for k, v in kwargs.items()}
        with torch._C._ExcludeDispatchKeyGuard(excluded):
            return op(*args, **kwargs)

    return kernel


def _drop_keyset(kernel: Callable) -> Callable:
    def with_keyset(_keyset, *args, **kwargs):
        return kernel(*args, **kwargs)

    return with_keyset


def register_lower_precision(name: str, device_types: Tuple[str, ...] = DEVICE_TYPES) -> None:
    """Give `sparseadapter::<name>` (overload `default`) aten::linear's autocast rule on each device
    type. Registering the same op and device type again is a no-op."""
    op = getattr(getattr(torch.ops, _NAMESPACE), name).default
    for device_type in device_types:
        if (name, device_type) in _registered:
            continue
        if not torch._C._is_autocast_available(device_type):
            raise ValueError(f"autocast is not available for device type {device_type!r}")
        key_name = "Autocast" + torch._C._dispatch_key_for_device(device_type)
        kernel = _lower_precision_kernel(op, device_type)
        # The Python dispatcher (tracing by torch.compile / torch.export) looks here ...
        op.py_impl(getattr(torch._C.DispatchKey, key_name))(kernel)
        # ... the C++ dispatcher (eager mode) here.
        _lib.impl(name, _drop_keyset(kernel), key_name, with_keyset=True)
        _registered[(name, device_type)] = kernel


for _name in LOWER_PRECISION_OPS:
    register_lower_precision(_name)
