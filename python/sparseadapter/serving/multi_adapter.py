"""Several adapters in one served model: `forward(input_ids, attention_mask, token_type_ids, adapter_index)`,
row i answered by adapter `adapter_index[i]` (an index into the metadata's `adapters` list).

The adapters run as a mixed-adapter batch (adapters/routing.py: one `sparse_adapter_multi` op per
adapted site over the whole batch); each adapter keeps the task head saved with it, and `RowHeads`
answers each row with its adapter's head. LoRA stays unmerged (a merge would reach every row) and every
sparse layer stays CSR (the op runs CSR arrays), whatever the path choice would say.
"""

import copy
import os
from typing import List, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..adapters import load_adapter, set_active_adapters
from ..adapters.api import HEAD_NAMES
from ..adapters.head import installed
from ..adapters.heads import adapter_head
from ..adapters.registry import router as registry_router
from ..adapters.routing import Routing
from .export import ServingModel, example_inputs


class RowHeads(nn.Module):
    """Each row through its adapter's head: heads[k] for the rows the model's routing gives adapter k."""

    def __init__(self, heads: Sequence[nn.Module], model: nn.Module) -> None:
        super().__init__()
        self.heads = nn.ModuleList(heads)
        self.__dict__["router"] = registry_router(model)

    def forward(self, x: Tensor) -> Tensor:
        routing = self.__dict__["router"].current()
        if routing is None:
            raise RuntimeError("RowHeads: called outside a routed call (MultiAdapterServingModel sets the routing)")
        out = torch.stack([head(x) for head in self.heads], dim=1)  # [batch, K, labels]
        pick = routing.rows.view(-1, 1, 1).expand(-1, 1, out.shape[-1])
        return out.gather(1, pick).squeeze(1)


class MultiAdapterServingModel(ServingModel):
    """ServingModel plus an adapter index per row (int64 [batch], 0 .. len(adapters) - 1)."""

    def __init__(self, model: nn.Module, adapters: Sequence[str]) -> None:
        super().__init__(model)
        self.adapters = list(adapters)
        self.__dict__["router"] = registry_router(model)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        token_type_ids: Tensor,  # type: ignore[override]
        adapter_index: Tensor,
    ) -> Tensor:
        router = self.__dict__["router"]
        router.enter_call()
        router.route(Routing(self.adapters, adapter_index))
        try:
            return super().forward(input_ids, attention_mask, token_type_ids)
        finally:
            router.leave_call()

    def example(self, meta, batch: int, length: int, seed: int = 0) -> Tuple[Tensor, ...]:
        """example_inputs plus adapter indices that use every adapter (when the batch allows)."""
        index = torch.arange(batch, dtype=torch.long).flip(0) % len(self.adapters)
        return (*example_inputs(meta, batch, length, seed), index)


def adapter_name_of(path: str) -> str:
    """An adapter's name in a multi-adapter export and in requests: its folder's name."""
    return os.path.basename(os.path.normpath(path))


def load_adapters(model: nn.Module, paths: Sequence[str]) -> List[str]:
    """Load every adapter folder into `model` under its folder name, each with its own task head (the
    model's head becomes a RowHeads); returns the names in index order. The folders must be distinct
    adapters of one task on this base model (load_adapter checks each against the model)."""
    names = [adapter_name_of(p) for p in paths]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(
            f"several adapters are named {repeated[0]!r} (a folder's name names its adapter); "
            "give each adapter folder its own name"
        )
    head_name = next((h for h in HEAD_NAMES if isinstance(getattr(model, h, None), nn.Module)), None)
    if head_name is None:
        raise ValueError(f"the model has no task head ({', '.join(HEAD_NAMES)}) to answer each adapter's rows with")
    heads = []
    for name, path in zip(names, paths):
        load_adapter(model, path, name, load_head=True, activate=False)
        # an inactive adapter's head is not at the model's head attribute: take its own record
        record = adapter_head(model, name)
        if record is not None and record.attr != head_name:
            raise ValueError(
                f"adapter {name!r} answers through {record.attr!r}, the model through {head_name!r}; "
                "adapters served together answer one task"
            )
        head = record.module if record is not None else getattr(model, head_name)
        if installed(head) is not None:
            raise ValueError(
                f"adapter {name!r}: a regression head on standardized targets cannot be served "
                "with other adapters yet; export it alone"
            )
        heads.append(copy.deepcopy(head))
    setattr(model, head_name, RowHeads(heads, model))
    set_active_adapters(model, [])
    return names
