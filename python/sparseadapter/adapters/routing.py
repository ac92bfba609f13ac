"""Mixed-adapter batches: `model(**batch, adapter_names=[...])`, one adapter per row (peft's API).

The model root's forward pre-hook takes `adapter_names` out of the call (the Hugging Face forward
never sees it) and pushes a `Routing` for the duration of the call: the adapters named, in order of
first appearance, and one index per row into them (-1: the bare model, from `None` or `"__base__"`).
Each slot met during the forward reads it: the rows of its adapters go through ONE op over the whole
batch (`sparseadapter_ext.sparse_adapter_multi`: the adapters' CSR arrays concatenated, an adapter
index per row, the rows grouped by adapter inside the op; each slot keeps the concatenation while the
adapters' tensors are unchanged, sparseadapter_ext.MultiPackCache), rows of other adapters and of the bare
model get the slot's input back unchanged; prefix slots give each row its adapter's prefix. The
active adapters (and any active fusion) are ignored for such a call: each row runs exactly the
adapter it names. The routing lives on the calling thread, so threads may run differently routed
batches through one model at once.
"""

import threading
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

BASE = "__base__"  # peft's name for the bare model in adapter_names


class Routing:
    """One call's rows: `names[rows[i]]` is row i's adapter (`rows[i] == -1`: none)."""

    def __init__(self, names: Sequence[str], rows: Tensor, expand: bool = False) -> None:
        self.names = list(names)
        self.rows = rows
        # generation repeats each input row for its beams / returned sequences (consecutively): a
        # batch of a multiple of the rows then gives each copy its row's adapter
        self.expand = expand
        self._local: Dict[Tuple[int, Tuple[str, ...], int], Tuple[List[str], Tensor]] = {}
        self._named = frozenset(self.names)

    def local(self, held, batch: Optional[int] = None) -> Tuple[List[str], Tensor]:
        """The adapters of this call that `held` (an ordered container of names) holds, in held's order
        (so batches naming the same adapters in another row order pass a slot the same adapters: its
        packed arrays stay valid), and each row's index into them (-1 for rows of other adapters and of
        the bare model), for a batch of `batch` rows (None: the routed rows; ValueError when the batch
        does not match them)."""
        named = self._named
        names = [n for n in held if n in named]
        # a symbolic batch size (torch.export) is not a key: computed anew each time
        key = (id(held), tuple(names), batch or 0) if batch is None or type(batch) is int else None
        hit = self._local.get(key) if key is not None else None
        if hit is not None:
            return hit
        if names == self.names:
            local = self.rows
        else:
            position = {n: i for i, n in enumerate(names)}
            lut = torch.tensor(
                [-1] + [position.get(n, -1) for n in self.names], dtype=torch.long, device=self.rows.device
            )
            local = lut.index_select(0, self.rows + 1)
        n = local.shape[0]
        if batch is not None and batch != n:
            if not (self.expand and n > 0 and batch % n == 0):
                raise ValueError(
                    f"adapter_names has {n} entries but the adapted module's input has {batch} rows; "
                    "give one adapter name (or None) per row of the batch"
                )
            local = local.repeat_interleave(batch // n)
        if key is not None:
            self._local[key] = (names, local)
        return names, local


class Router:
    """Per model: the routing of the call in progress on each thread (a stack: calls may nest)."""

    def __init__(self) -> None:
        self._state = threading.local()

    def _stacks(self):
        state = self._state
        if not hasattr(state, "frames"):
            state.frames, state.routings = [], []
        return state

    def current(self) -> Optional[Routing]:
        state = self._state
        routings = getattr(state, "routings", None)
        return routings[-1] if routings else None

    def enter_call(self) -> None:
        self._stacks().frames.append(False)

    def route(self, routing: Routing) -> None:
        state = self._stacks()
        state.routings.append(routing)
        state.frames[-1] = True

    def leave_call(self) -> None:
        state = self._stacks()
        if state.frames and state.frames.pop():
            state.routings.pop()

    def __deepcopy__(self, memo) -> "Router":  # a copy of the model starts with no call in progress
        return Router()

    def __reduce__(self):
        return (Router, ())


def rows_of(
    adapter_names, known: Sequence[str], fusions: Sequence[str], batch: Optional[int], device, expand: bool = False
) -> Routing:
    """The Routing of `adapter_names` (one entry per row: an adapter's name, None or "__base__"), checked
    against the model's adapters `known`; ValueError naming what is wrong."""
    if isinstance(adapter_names, (str, bytes)) or not isinstance(adapter_names, (list, tuple)):
        raise ValueError(
            f"adapter_names must be a list with one adapter name (or None) per row of the batch, "
            f"got {type(adapter_names).__name__} {adapter_names!r}"
        )
    if batch is not None and len(adapter_names) != batch:
        raise ValueError(
            f"adapter_names has {len(adapter_names)} entries but the batch has {batch} rows; give one "
            "adapter name (or None for the bare model) per row"
        )
    names: List[str] = []
    index: Dict[str, int] = {}
    rows = []
    for i, name in enumerate(adapter_names):
        if name is None or name == BASE:
            rows.append(-1)
            continue
        if not isinstance(name, str):
            raise ValueError(f"adapter_names[{i}] must be an adapter name or None, got {type(name).__name__} {name!r}")
        if name not in index:
            if name not in known:
                what = "a fusion, not an adapter" if name in fusions else "not an adapter of this model"
                raise ValueError(
                    f"adapter_names[{i}] = {name!r} is {what} (adapters: {', '.join(sorted(known)) or 'none'}; "
                    f"None or {BASE!r} for the bare model)"
                )
            index[name] = len(names)
            names.append(name)
        rows.append(index[name])
    return Routing(names, torch.tensor(rows, dtype=torch.long, device=device), expand)


def batch_size(args, kwargs) -> Tuple[Optional[int], Optional[torch.device]]:
    """The rows and device of a Hugging Face call's input: input_ids, inputs_embeds, or the first
    positional tensor."""
    for key in ("input_ids", "inputs_embeds", "decoder_input_ids", "pixel_values"):
        t = kwargs.get(key)
        if isinstance(t, Tensor) and t.dim() >= 1:
            return t.shape[0], t.device
    for t in args:
        if isinstance(t, Tensor) and t.dim() >= 1:
            return t.shape[0], t.device
    return None, None
