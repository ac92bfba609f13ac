"""Turn a trained model with adapters into its inference form, without touching the caller's model.

What training needs and inference does not is folded away: dropout (eval mode), prefix MLPs (the
prefixes they compute), LoRA (merged into the frozen weight it adapts, which costs nothing per token).
A bottleneck adapter whose two layers are sparse stays one fused sparse kernel or becomes two dense
nn.Linear layers, and every other SparseLinear keeps our CSR kernel or becomes a dense nn.Linear,
whichever `sparseadapter.path_choice` measured faster for its shape and density at the expected rows
per call.
"""

import copy
from dataclasses import dataclass
from typing import List, Optional

import torch
from torch import nn

import sparseadapter_ext

from ..adapters import api as adapters_api
from ..adapters.modules import BottleneckAdapter
from ..adapters.registry import PREFIX_ROOT, REGISTRY_ATTR
from ..adapters.slot import slots
from ..path_choice import choose_path
from ..sparse_linear import SparseLinear

DEFAULT_TOKENS = 32 * 128  # a batch of 32 sentences of 128 tokens


@dataclass
class LayerChoice:
    name: str
    shape: "tuple[int, int]"  # (in_features, out_features)
    density: float
    path: str  # "fused" (the adapter's sparse kernel), "sparse" or "dense"


@dataclass
class InferencePlan:
    layers: List[LayerChoice]
    merged_lora: List[str]
    folded_prefixes: List[str]

    def describe(self) -> str:
        count = {p: sum(c.path == p for c in self.layers) for p in ("fused", "sparse", "dense")}
        lines = [
            f"of {len(self.layers)} sparse layers, {count['fused']} run in fused sparse adapters, "
            f"{count['sparse']} as CSR layers, {count['dense']} as dense GEMMs"
        ]
        if self.merged_lora:
            lines.append(f"LoRA merged into the base weights: {', '.join(self.merged_lora)}")
        if self.folded_prefixes:
            lines.append(f"prefixes folded: {', '.join(self.folded_prefixes)}")
        return "\n".join(lines)


def densify(layer: SparseLinear) -> nn.Linear:
    """The same map as a dense nn.Linear (zeros where pruned)."""
    dense = nn.Linear(
        layer.in_features,
        layer.out_features,
        bias=layer.bias is not None,
        device=layer.values.device,
        dtype=layer.values.dtype,
    )
    with torch.no_grad():
        dense.weight.copy_(layer.to_dense())
        if layer.bias is not None:
            dense.bias.copy_(layer.bias)
    return dense


def _fold_and_merge(model: nn.Module, merge_lora: bool) -> "tuple[List[str], List[str]]":
    if REGISTRY_ATTR not in model.__dict__:
        return [], []
    prefixes = getattr(model, PREFIX_ROOT, None)
    folded = list(prefixes or [])
    adapters_api.fold_prefix(model)
    merged = []
    if merge_lora:
        reg = adapters_api.registry(model)
        merged = [n for n in reg.active if reg.adapters[n].config.kind == "lora"]
        adapters_api.merge(model, merged)
    return merged, folded


def keep_routed_packs(model: nn.Module, enabled: bool = True) -> None:
    """Whether each adapted site of `model` keeps the last mixed batch's adapters' arrays concatenated
    (sparseadapter_ext.MultiPackCache) while they are unchanged, instead of concatenating them at
    every `adapter_names=` call: faster routed calls with many adapters, for one more copy of those
    adapters' CSR values and indices in memory. Off by default."""
    for slot in slots(model).values():
        slot.__dict__["multi_packs"] = sparseadapter_ext.MultiPackCache(max_entries=1) if enabled else None


def prepare_for_inference(
    model: nn.Module,
    *,
    path: Optional[str] = None,
    tokens: int = DEFAULT_TOKENS,
    merge_lora: bool = True,
    inplace: bool = False,
    routed_packs: bool = False,
) -> "tuple[nn.Module, InferencePlan]":
    """The model in inference form and what was done to it.

    path:   "auto" (measured crossover), "sparse" or "dense" for every SparseLinear; None reads the
            SPARSEADAPTER_PATH environment variable, else "auto".
    tokens: rows per call the choice is made for (batch x sequence length).
    routed_packs: keep_routed_packs(model, routed_packs): see there.
    """
    if tokens < 1:
        raise ValueError(f"tokens must be positive, got {tokens}")
    if not inplace:
        model = copy.deepcopy(model)
    model.eval()
    keep_routed_packs(model, routed_packs)
    merged, folded = _fold_and_merge(model, merge_lora)
    idle = {id(m) for slot in slots(model).values() for n in slot.merged for m in slot.adapters[n].modules()}
    choices = []

    def decide(name, layer, chosen):
        choices.append(LayerChoice(name, (layer.in_features, layer.out_features), layer.density, chosen))
        if chosen == "dense":
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, densify(layer))

    decided = set()
    for name, adapter in list(model.named_modules()):
        if isinstance(adapter, BottleneckAdapter) and adapter.runs_fused():
            down, up = adapter.down, adapter.up
            density = (down.nnz + up.nnz) / (down.in_features * down.out_features + up.in_features * up.out_features)
            chosen = choose_path(
                down.in_features,
                down.out_features,
                density,
                tokens,
                device=down.values.device.type,
                dtype=down.values.dtype,
                path=path,
                kind="adapter",
            )
            for child, layer in (("down", down), ("up", up)):
                decide(f"{name}.{child}", layer, "fused" if chosen == "sparse" else "dense")
                decided.add(id(layer))
    for name, layer in list(model.named_modules()):
        if not isinstance(layer, SparseLinear) or id(layer) in idle or id(layer) in decided:
            continue  # idle: merged LoRA, never called
        decide(
            name,
            layer,
            choose_path(
                layer.in_features,
                layer.out_features,
                layer.density,
                tokens,
                device=layer.values.device.type,
                dtype=layer.values.dtype,
                path=path,
            ),
        )
    model.requires_grad_(False)
    return model, InferencePlan(choices, merged, folded)
