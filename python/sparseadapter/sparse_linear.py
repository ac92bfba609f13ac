"""SparseLinear: a CSR-backed drop-in for nn.Linear whose pattern is fixed and whose values train.

Threads. Forwards of one layer may run on several threads at once (they only read). `load_state_dict`
may run while other threads run forwards: each forward computes with the whole old state (pattern,
values, bias) or the whole new one, never a mix. A new pattern and its transposed buffers are built
and checked off to the side; the layer then waits for the forwards in flight to leave, holds new ones
back for as long as the new tensors take to swap in (values and bias keep their Parameter objects, so
an optimizer built before the load still holds them), and lets them go. Not thread-safe: a backward
or an optimizer step racing a load (autograd keeps the tensors of the forward; training and loading
one module at once is not supported), `.to()` / `.cuda()` and other module-wide changes, and in-place
writes to the tensors while forwards run.
"""

import math
import threading
import time
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

import sparseadapter_ext

from .csr import csr_to_dense, mask_to_csr

# Buffers derived from the pattern alone: rebuilt whenever the pattern changes, never saved.
_DERIVED_BUFFERS = ("row_order", "crow_indices_t", "col_indices_t", "perm_t", "row_order_t")

# Guards every layer's _Pins (a few integer updates per forward; never held while computing).
_PINS_LOCK = threading.Lock()
_WAIT_S = 1e-4


class _Pins:
    """Forwards in flight on a layer, the thread swapping a new state in (None when none), and the
    generation of the layer's state: bumped after every change of its tensors (a load, `.to()` and
    the like, an attribute set), so that a PreparedPair made from an older state is seen as stale."""

    __slots__ = ("readers", "writer", "generation")

    def __init__(self) -> None:
        self.readers = 0
        self.writer: Optional[int] = None
        self.generation = 0

    def __deepcopy__(self, memo) -> "_Pins":  # a copy starts with nothing in flight
        return _Pins()

    def __reduce__(self):
        return (_Pins, ())


class SparseLinear(nn.Module):
    """`y = x @ W.T + bias` with `W` of shape `[out_features, in_features]` stored as CSR.

    `values` (nnz) is the only weight parameter; `crow_indices` and `col_indices` are buffers, so the
    sparsity pattern never changes in training. The transposed pattern and the row orders used by
    the backward pass and the CUDA kernels are computed once per pattern.
    """

    __jit_unused_properties__ = ["nnz", "sparsity", "density"]
    _pins = _Pins()  # for a layer unpickled from a version without them; __init__ gives each its own

    def __init__(
        self,
        in_features: int,
        out_features: int,
        crow_indices: Tensor,
        col_indices: Tensor,
        values: Optional[Tensor] = None,
        bias: Union[Tensor, bool, None] = True,
        *,
        validate: bool = True,
    ) -> None:
        super().__init__()
        self._pins = _Pins()
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        if validate:
            sparseadapter_ext.validate_csr(crow_indices, col_indices, self.out_features, self.in_features)
        device = crow_indices.device
        if values is None:
            # nn.Linear's default scale: uniform in +-1/sqrt(in_features).
            bound = 1.0 / math.sqrt(self.in_features) if self.in_features > 0 else 0.0
            values = torch.empty(col_indices.numel(), device=device).uniform_(-bound, bound)
        elif values.shape != col_indices.shape:
            raise ValueError(f"values has shape {tuple(values.shape)} but the pattern has nnz = {col_indices.numel()}")
        elif values.device != device:
            raise ValueError(f"values is on {values.device} but the pattern is on {device}")
        self.values = nn.Parameter(values.detach().clone())
        if isinstance(bias, bool):
            bias = torch.zeros(self.out_features, dtype=values.dtype, device=device) if bias else None
        if bias is not None:
            if bias.shape != (self.out_features,):
                raise ValueError(f"bias must have shape ({self.out_features},), got {tuple(bias.shape)}")
            if bias.device != device:
                raise ValueError(f"bias is on {bias.device} but the pattern is on {device}")
            self.bias = nn.Parameter(bias.detach().clone())
        else:
            self.register_parameter("bias", None)
        self.register_buffer("crow_indices", crow_indices.detach().clone())
        self.register_buffer("col_indices", col_indices.detach().clone())
        for name in _DERIVED_BUFFERS:
            self.register_buffer(name, torch.empty(0, dtype=crow_indices.dtype, device=device), persistent=False)
        self._build_derived_buffers()

    @classmethod
    def from_dense(
        cls,
        weight: Tensor,
        mask: Tensor,
        bias: Optional[Tensor] = None,
        *,
        index_dtype: Optional[torch.dtype] = None,
    ) -> "SparseLinear":
        """Keep `weight[mask]`. `weight` is an nn.Linear weight `[out_features, in_features]`; `mask`
        has the same shape (bool, or nonzero = keep). The layer lives on weight's device and dtype;
        mask and bias are moved there."""
        if weight.dim() != 2:
            raise ValueError(f"weight must be 2-D [out_features, in_features], got shape {tuple(weight.shape)}")
        if mask.shape != weight.shape:
            raise ValueError(f"mask has shape {tuple(mask.shape)} but weight has shape {tuple(weight.shape)}")
        keep = (mask if mask.dtype == torch.bool else mask != 0).to(weight.device)
        crow, col = mask_to_csr(keep, index_dtype)
        out_features, in_features = weight.shape
        if bias is not None:
            bias = bias.to(weight.device, weight.dtype)
        return cls(in_features, out_features, crow, col, weight.detach()[keep], bias, validate=False)

    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            return torch.ops.sparseadapter.sparse_linear(
                x,
                self.values,
                self.bias,
                self.crow_indices,
                self.col_indices,
                self.row_order,
                self.crow_indices_t,
                self.col_indices_t,
                self.perm_t,
                self.row_order_t,
            )
        return self._forward_python(x)

    @torch.jit.unused
    def _forward_python(self, x: Tensor) -> Tensor:
        """Through the Python wrapper, whose eager autograd costs less host time per call."""
        if _tracing():
            return sparseadapter_ext.sparse_linear(x, *self._linear_args())
        self._pin()
        try:
            return sparseadapter_ext.sparse_linear(x, *self._linear_args())
        finally:
            self._unpin()

    # The tensors are read from the module's dicts: nn.Module.__getattr__ costs about 0.4 us per
    # parameter or buffer, and a decoding step reads ten of them per layer for one token.
    @torch.jit.unused
    def _linear_args(self):
        """sparse_linear's arguments after x: values, bias, then the pattern's buffers."""
        p, b = self._parameters, self._buffers
        return (
            p["values"],
            p["bias"],
            b["crow_indices"],
            b["col_indices"],
            b["row_order"],
            b["crow_indices_t"],
            b["col_indices_t"],
            b["perm_t"],
            b["row_order_t"],
        )

    def csr_buffers(self):
        """`(values, bias, crow_indices, col_indices, crow_indices_t, col_indices_t, perm_t, row_order_t)`:
        this layer as one projection of `sparseadapter_ext.sparse_adapter`. A caller that computes
        with them while another thread may load a state into the layer holds `pinned()` around both."""
        if torch.jit.is_scripting():
            return (
                self.values,
                self.bias,
                self.crow_indices,
                self.col_indices,
                self.crow_indices_t,
                self.col_indices_t,
                self.perm_t,
                self.row_order_t,
            )
        p, b = self._parameters, self._buffers
        return (
            p["values"],
            p["bias"],
            b["crow_indices"],
            b["col_indices"],
            b["crow_indices_t"],
            b["col_indices_t"],
            b["perm_t"],
            b["row_order_t"],
        )

    @torch.jit.unused
    def pinned(self) -> "_Pinned":
        """`with layer.pinned() as buffers:` the layer's `csr_buffers()`, which no `load_state_dict`
        on another thread replaces until the block ends."""
        return _Pinned(self)

    @torch.jit.unused
    def _pin(self) -> None:
        pins, me = self._pins, threading.get_ident()
        while True:
            with _PINS_LOCK:
                if pins.writer is None or pins.writer == me:
                    pins.readers += 1
                    return
            time.sleep(_WAIT_S)

    @torch.jit.unused
    def _unpin(self) -> None:
        with _PINS_LOCK:
            self._pins.readers -= 1

    @torch.jit.unused
    def _swap_begin(self) -> None:
        """Hold new forwards back, then wait for those in flight to leave."""
        pins, me = self._pins, threading.get_ident()
        while True:
            with _PINS_LOCK:
                if pins.writer is None:
                    pins.writer = me
                    break
            time.sleep(_WAIT_S)
        while True:
            with _PINS_LOCK:
                if pins.readers == 0:
                    return
            time.sleep(_WAIT_S)

    @torch.jit.unused
    def _swap_end(self) -> None:
        with _PINS_LOCK:
            self._pins.writer = None
            self._pins.generation += 1

    # Every other change of the layer's tensors or attributes also makes a new generation (see _Pins).
    @torch.jit.unused
    def _state_changed(self) -> None:
        with _PINS_LOCK:
            self._pins.generation += 1

    def __setattr__(self, name, value) -> None:
        super().__setattr__(name, value)  # a parameter or buffer replaced, a size changed, ...
        self._state_changed()

    def _apply(self, fn, recurse=True):
        result = super()._apply(fn, recurse)  # .to(), .cuda(), .half(), ...: new tensors in place
        self._state_changed()
        return result

    def to_dense(self) -> Tensor:
        """The dense weight `[out_features, in_features]`, zeros where pruned."""
        return csr_to_dense(self.crow_indices, self.col_indices, self.values, (self.out_features, self.in_features))

    @property
    def nnz(self) -> int:
        return self.col_indices.numel()

    @property
    def density(self) -> float:
        total = self.out_features * self.in_features
        return self.nnz / total if total else 1.0

    @property
    def sparsity(self) -> float:
        """Fraction of weights removed (0.9 = 90% zeros)."""
        return 1.0 - self.density

    def validate(self) -> None:
        """The full O(nnz) check of the pattern; raises ValueError naming the problem."""
        sparseadapter_ext.validate_csr(self.crow_indices, self.col_indices, self.out_features, self.in_features)
        if self.values.numel() != self.nnz:
            raise ValueError(f"values has {self.values.numel()} entries but the pattern has nnz = {self.nnz}")

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"sparsity={self.sparsity:.3f}, nnz={self.nnz}, bias={self.bias is not None}"
        )

    def _derived_buffers(self, crow: Tensor, col: Tensor) -> Tuple[Tensor, ...]:
        """The buffers of _DERIVED_BUFFERS for a pattern, in that order."""
        crow_t, col_t, perm_t = sparseadapter_ext.csr_transpose(crow, col, self.in_features)
        return (sparseadapter_ext.csr_row_order(crow), crow_t, col_t, perm_t, sparseadapter_ext.csr_row_order(crow_t))

    def _build_derived_buffers(self) -> None:
        for name, t in zip(_DERIVED_BUFFERS, self._derived_buffers(self.crow_indices, self.col_indices)):
            setattr(self, name, t)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # A saved module may carry another pattern (another nnz): check it whole and build every tensor
        # it needs (indices on this layer's device, transposed buffers, values) before anything of the
        # layer changes; then swap them in while no forward runs (see the module docstring). A bad
        # pattern, or any other error of the load, leaves the module as it was.
        crow = state_dict.get(prefix + "crow_indices")
        col = state_dict.get(prefix + "col_indices")
        values = state_dict.get(prefix + "values")
        new_pattern = crow is not None and col is not None and values is not None
        if (crow is not None or col is not None) and not new_pattern:
            # values alone keep the pattern; new indices without all three would pair a pattern with
            # values it was not made for
            given = [k for k, v in (("crow_indices", crow), ("col_indices", col), ("values", values)) if v is not None]
            error_msgs.append(
                f"{prefix or 'SparseLinear'}: a new sparse pattern loads whole: crow_indices, "
                f"col_indices and values together (the state_dict has only {', '.join(given)})"
            )
            return
        built = None
        if new_pattern:
            try:
                sparseadapter_ext.validate_csr(crow, col, self.out_features, self.in_features)
                if values.shape != col.shape:
                    raise ValueError(f"values has shape {tuple(values.shape)} but the pattern has nnz = {col.numel()}")
                if not torch.is_floating_point(values):
                    raise TypeError(f"values must be a floating-point tensor, got {values.dtype}")
                device = self.crow_indices.device
                new_crow = crow.detach().to(device=device, copy=True)
                new_col = col.detach().to(device=device, copy=True)
                new_values = values.detach().to(device=self.values.device, dtype=self.values.dtype, copy=True)
                built = (new_crow, new_col, new_values, self._derived_buffers(new_crow, new_col))
            except (ValueError, TypeError, RuntimeError) as err:
                error_msgs.append(f"{prefix or 'SparseLinear'}: invalid sparse pattern in state_dict: {err}")
                return
        self._swap_begin()
        try:
            old = (
                self.crow_indices,
                self.col_indices,
                self.values.data,
                None if self.bias is None else self.bias.data.clone(),
                tuple(getattr(self, name) for name in _DERIVED_BUFFERS),
            )
            if built is not None:
                new_crow, new_col, new_values, derived = built
                self.crow_indices, self.col_indices = new_crow, new_col
                self.values.data = new_values
                for name, t in zip(_DERIVED_BUFFERS, derived):
                    setattr(self, name, t)
            errors_before = len(error_msgs)
            try:
                super()._load_from_state_dict(
                    state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
                )
            except BaseException:
                self._restore(old)
                raise
            if len(error_msgs) != errors_before:
                self._restore(old)
        finally:
            self._swap_end()

    def _restore(self, old) -> None:
        crow, col, values, bias, derived = old
        self.crow_indices, self.col_indices = crow, col
        self.values.data = values
        if bias is not None:
            self.bias.data = bias
        for name, t in zip(_DERIVED_BUFFERS, derived):
            setattr(self, name, t)


_tracing = sparseadapter_ext.ops.capturing_graph


class _Pinned:
    """The context manager of SparseLinear.pinned()."""

    __slots__ = ("layer", "pinned")

    def __init__(self, layer: SparseLinear) -> None:
        self.layer = layer
        self.pinned = False

    def __enter__(self):
        self.pinned = not _tracing()
        if self.pinned:
            self.layer._pin()
        return self.layer.csr_buffers()

    def __exit__(self, *exc) -> None:
        if self.pinned:
            self.layer._unpin()


class pinned_layers:  # noqa: N801 (used as a function: `with pinned_layers(layers) as buffers:`)
    """`layer.pinned()` for every layer of `layers` under one acquisition of the lock: each layer's
    `csr_buffers()`, in order, which no `load_state_dict` on another thread replaces until the block
    ends. A fused adapter pins its two projections at every call (one per token when decoding), a
    mixed-adapter batch the two of each adapter at each adapted site."""

    __slots__ = ("layers", "pinned")

    def __init__(self, layers: Sequence[SparseLinear]) -> None:
        self.layers = layers
        self.pinned = False

    def __enter__(self) -> List[Tuple]:
        layers = self.layers
        if not _tracing():
            pins, me = [layer._pins for layer in layers], threading.get_ident()
            while True:
                with _PINS_LOCK:
                    if all(p.writer is None or p.writer == me for p in pins):
                        for p in pins:
                            p.readers += 1
                        self.pinned = True
                        break
                time.sleep(_WAIT_S)
        return [layer.csr_buffers() for layer in layers]

    def __exit__(self, *exc) -> None:
        if self.pinned:
            with _PINS_LOCK:
                for layer in self.layers:
                    layer._pins.readers -= 1


def pinned_pair(a: SparseLinear, b: SparseLinear) -> pinned_layers:
    """`with pinned_pair(a, b) as (buffers_a, buffers_b):` both layers pinned (pinned_layers)."""
    return pinned_layers((a, b))


def _unprepared() -> None:
    return None


class PreparedPair:
    """The inference call of a fused adapter over two sparse layers, made once per state of the layers:
    `prepared(x, residual)` runs `sparseadapter_ext.PreparedAdapter` with both layers pinned (as
    pinned_pair does), or returns None where the caller must take its general path: the call needs the
    dispatcher (PreparedAdapter), a load is swapping a layer's state in, or a layer changed since
    (`stale()`; its owner then makes a new one)."""

    __slots__ = ("call", "pins", "generations")

    def __init__(self, a: SparseLinear, b: SparseLinear, activation: str, scale: float) -> None:
        self.pins = (a._pins, b._pins)
        # read before the tensors: a change between the two reads leaves this stale, never wrong
        self.generations = (a._pins.generation, b._pins.generation)
        self.call = sparseadapter_ext.PreparedAdapter(a.csr_buffers()[:4], b.csr_buffers()[:4], activation, scale)

    def stale(self) -> bool:
        pa, pb = self.pins
        return (pa.generation, pb.generation) != self.generations

    def __call__(self, x: Tensor, residual: Optional[Tensor]) -> Optional[Tensor]:
        pa, pb = self.pins
        ga, gb = self.generations
        with _PINS_LOCK:
            if pa.generation != ga or pb.generation != gb or pa.writer is not None or pb.writer is not None:
                return None
            pa.readers += 1
            pb.readers += 1
        try:
            return self.call(x, residual)
        finally:
            with _PINS_LOCK:
                pa.readers -= 1
                pb.readers -= 1

    # A copy of the module makes its own (its layers have their own pins and tensors).
    def __deepcopy__(self, memo) -> None:
        return None

    def __reduce__(self):
        return (_unprepared, ())
