"""The model-level record of its adapters: configs, sites, pruning provenance, activation."""

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from torch import nn

from .config import SparseAdapterConfig
from .placement import Site
from .routing import Router

REGISTRY_ATTR = "sparseadapter_registry"
PREFIX_ROOT = "sparseadapter_prefix"  # ModuleDict on the model root: name -> PrefixGenerator


@dataclass
class AdapterEntry:
    config: SparseAdapterConfig
    sites: Dict[str, List[Site]]  # part ("bottleneck", "lora", "prefix") -> sites
    head: Optional[Any] = None  # its task head, a heads.HeadRecord (None: the model has none)


@dataclass
class AdapterRegistry:
    adapters: Dict[str, AdapterEntry] = field(default_factory=dict)
    fusions: Dict[str, List[str]] = field(default_factory=dict)
    active: List[str] = field(default_factory=list)
    active_fusion: Optional[str] = None
    router: Router = field(default_factory=Router, compare=False, repr=False)  # mixed-adapter batches (routing.py)


def router(model: nn.Module) -> Router:
    """The model's Router, added to a registry made before routers existed (an older pickle)."""
    reg = registry(model)
    if not isinstance(getattr(reg, "router", None), Router):
        reg.router = Router()
    return reg.router


def registry(model: nn.Module, create: bool = False) -> AdapterRegistry:
    reg = model.__dict__.get(REGISTRY_ATTR)
    if reg is None:
        if not create:
            raise ValueError("the model has no sparse adapters; add one with sparseadapter.add_adapter")
        reg = AdapterRegistry()
        model.__dict__[REGISTRY_ATTR] = reg
    return reg


def entry(model: nn.Module, name: str) -> AdapterEntry:
    reg = registry(model)
    if name not in reg.adapters:
        known = ", ".join(sorted(reg.adapters)) or "none"
        raise ValueError(f"the model has no adapter named {name!r} (adapters: {known})")
    return reg.adapters[name]
