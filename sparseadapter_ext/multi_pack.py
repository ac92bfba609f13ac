"""sparse_adapter_multi's arguments: several adapters' CSR arrays concatenated (pack_adapters), and a
cache that packs them once per state of the adapters (MultiPackCache).

A mixed-adapter batch runs one op per adapted site and call. Concatenating every adapter's arrays at
each call costs host time and memory traffic that grow with the adapters, and freshly concatenated
index arrays are new tensors, so the op checks their structure again (its check-once cache keys on
the tensors). A MultiPackCache keeps the concatenated pattern while every adapter's index tensors
are the same tensors with the same version counter and data pointer, so the op is passed the same
arrays again and checks them once; with no gradient needed it also keeps the concatenated values and
biases, on the same terms. A pack whose tensors changed in place (an optimizer step, `copy_`), were
replaced (load_state_dict, pruning, `.to()`) or whose adapters differ (added, removed, replaced,
another order) is made anew. Writes that bypass the version counter (numpy, raw pointers) are not
seen, as in the op's own cache.
"""

import operator
import threading
import warnings
from collections import OrderedDict
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ._library import _C

# The positions in a layer's csr_buffers() 8-tuple.
_VALUES, _BIAS, _CROW, _COL = 0, 1, 2, 3
_TRANSPOSED = (4, 5, 6, 7)  # crow_t, col_t, perm_t, row_order_t


def pack_adapters(adapters: Sequence[Tuple], out_features: int, like: Tensor, transposed: bool = False):
    """The arguments of sparse_adapter_multi for `adapters`, each `(down, up, activation, scale)` with
    down and up the 8-tuples of `SparseLinear.csr_buffers()`: a dict with the concatenated values,
    biases (None where no adapter has one, zeros for those without where some have), patterns (index
    dtype: the adapters' own, int64 when they differ), the per-adapter sizes, and with `transposed`
    the eight arrays of the backward."""
    if torch.jit.is_tracing():  # the sizes below are the parameters' own: constants of a trace, rightly
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            return dict(_pack_pattern(adapters, out_features, like, transposed), **_pack_values(adapters, out_features))
    return dict(_pack_pattern(adapters, out_features, like, transposed), **_pack_values(adapters, out_features))


def _cat(ts, like: Tensor, dtype=None) -> Tensor:
    ts = [t if dtype is None else t.to(dtype) for t in ts]
    if not ts:
        return torch.empty(0, dtype=dtype or like.dtype, device=like.device)
    return ts[0] if len(ts) == 1 else torch.cat(ts)


def _index_dtype(adapters) -> torch.dtype:
    dtypes = {t.dtype for a in adapters for t in (a[0][_CROW], a[1][_CROW])}
    return dtypes.pop() if len(dtypes) == 1 else torch.long


def _pack_pattern(adapters, out_features, like, transposed) -> Dict:
    """The pack's index arrays and sizes (everything but the values and biases)."""
    downs = [a[0] for a in adapters]
    ups = [a[1] for a in adapters]
    index_dtype = _index_dtype(adapters)
    packed = dict(
        down_crow=_cat([d[_CROW] for d in downs], like, index_dtype),
        down_col=_cat([d[_COL] for d in downs], like, index_dtype),
        up_crow=_cat([u[_CROW] for u in ups], like, index_dtype),
        up_col=_cat([u[_COL] for u in ups], like, index_dtype),
        bottleneck=[int(d[_CROW].shape[0]) - 1 for d in downs],
        down_nnz=[int(d[_COL].shape[0]) for d in downs],
        up_nnz=[int(u[_COL].shape[0]) for u in ups],
        out_features=int(out_features),
        activation=",".join(str(a[2]) for a in adapters),
        scale=[float(a[3]) for a in adapters],
    )
    if transposed:
        packed["transposed"] = _pack_transposed(adapters, like)
    return packed


def _pack_transposed(adapters, like) -> Tuple[Tensor, ...]:
    index_dtype = _index_dtype(adapters)
    return tuple(_cat([a[side][i] for a in adapters], like, index_dtype) for side in (0, 1) for i in _TRANSPOSED)


def _pack_values(adapters, out_features) -> Dict:
    """The pack's values and biases: differentiable concatenations of the adapters' own tensors."""
    downs = [a[0] for a in adapters]
    ups = [a[1] for a in adapters]
    like = downs[0][_VALUES] if downs else torch.empty(0)

    def biases(layers, sizes):
        if all(layer[_BIAS] is None for layer in layers):
            return None
        return _cat(
            [
                layer[_BIAS] if layer[_BIAS] is not None else layer[_VALUES].new_zeros(n)
                for layer, n in zip(layers, sizes)
            ],
            like,
        )

    return dict(
        down_values=_cat([d[_VALUES] for d in downs], like),
        down_bias=biases(downs, [int(d[_CROW].shape[0]) - 1 for d in downs]),
        up_values=_cat([u[_VALUES] for u in ups], like),
        up_bias=biases(ups, [int(out_features)] * len(ups)),
    )


def _pattern_tensors(adapters, transposed: bool):
    """The index tensors a pack's pattern is made of (the transposed ones when it has them)."""
    positions = (_CROW, _COL) + (_TRANSPOSED if transposed else ())
    return [a[side][i] for a in adapters for side in (0, 1) for i in positions]


def _value_tensors(adapters):
    return [a[side][i] for a in adapters for side in (0, 1) for i in (_VALUES, _BIAS)]


class _Seen:
    """What a pack was made from: the tensors themselves (held, so that no new tensor reuses their
    identity), their version counters and data pointers (`_C.tensor_states`). Inference tensors have
    no version counter: a pack of them is never reused."""

    __slots__ = ("tensors", "states")

    def __init__(self, tensors) -> None:
        self.tensors = tensors
        self.states = _C.tensor_states(tensors)

    def still(self, tensors) -> bool:
        return (
            self.states is not None
            and len(tensors) == len(self.tensors)
            and all(map(operator.is_, tensors, self.tensors))
            and _C.tensor_states(tensors) == self.states
        )


class _Entry:
    __slots__ = ("pattern", "pattern_seen", "values")

    def __init__(self, pattern, pattern_seen) -> None:
        self.pattern, self.pattern_seen = pattern, pattern_seen
        # (concatenated values and biases, _Seen of the tensors), swapped whole: threads may share it
        self.values: Optional[Tuple[Dict, _Seen]] = None


class MultiPackCache:
    """sparse_adapter_multi's packs for one call site (an adapter slot), made once per state of the
    adapters (see the module docstring): `pack(...)` returns what pack_adapters would, reusing the
    concatenations of an earlier call when their tensors are unchanged. Keeps the packs of the last
    `max_entries` adapter tuples (a server routing several combinations of adapters through a site).
    Threads may share it (a server's threads routing batches through one model): two may both make
    a pack, and the later one stays."""

    def __init__(self, max_entries: int = 4) -> None:
        if max_entries < 1:
            raise ValueError(f"MultiPackCache: max_entries must be >= 1, got {max_entries}")
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple, _Entry] = OrderedDict()
        self._lock = threading.Lock()  # the dict's order and size; never held while packing
        self.made = 0  # patterns packed (a miss), for tests and profiling
        self.values_made = 0

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def pack(self, adapters: Sequence[Tuple], out_features: int, like: Tensor, transposed: bool, values: bool):
        """The pack of `adapters` (as pack_adapters) with the backward's arrays when `transposed`; the
        values and biases come from the cache when `values` (no gradient will be needed: the cached
        concatenations are not connected to the adapters' parameters), else are concatenated anew."""
        key = (
            tuple(map(id, _pattern_tensors(adapters, False))),
            tuple((str(a[2]), float(a[3])) for a in adapters),
            int(out_features),
            like.dtype,
            like.device,
        )
        entries = self._entries
        with self._lock:
            entry = entries.get(key)
            if entry is not None:
                entries.move_to_end(key)
        if entry is not None:
            has_transposed = "transposed" in entry.pattern
            if (transposed and not has_transposed) or not entry.pattern_seen.still(
                _pattern_tensors(adapters, has_transposed)
            ):
                entry = None
        if entry is None:
            entry = self._make_pattern(adapters, out_features, like, transposed)
            with self._lock:
                entries[key] = entry
                entries.move_to_end(key)
                while len(entries) > self.max_entries:
                    entries.popitem(last=False)
        if not values:
            return dict(entry.pattern, **_pack_values(adapters, out_features))
        value_tensors = _value_tensors(adapters)
        cached = entry.values
        if cached is None or not cached[1].still(value_tensors):
            seen = _Seen(value_tensors)  # before the tensors: a write in between leaves it stale, never wrong
            with torch.inference_mode(False), torch.no_grad():
                cached = entry.values = (_pack_values(adapters, out_features), seen)
            self.values_made += 1
        return dict(entry.pattern, **cached[0])

    def _make_pattern(self, adapters, out_features, like, transposed) -> _Entry:
        # Outside inference mode: an inference tensor has no version counter, so the op's check-once
        # cache could not track the concatenations and would check them at every call.
        seen = _Seen(_pattern_tensors(adapters, transposed))  # before the tensors, as for the values
        with torch.inference_mode(False):
            pattern = _pack_pattern(adapters, out_features, like, transposed)
        self.made += 1
        return _Entry(pattern, seen)

    # A copy of the owner (deepcopy, pickling) starts empty: its adapters are other tensors.
    def __deepcopy__(self, memo) -> "MultiPackCache":
        return MultiPackCache(self.max_entries)

    def __reduce__(self):
        return (MultiPackCache, (self.max_entries,))
