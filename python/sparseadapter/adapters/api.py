"""The user-facing adapter API: add, activate, train, delete, merge, fuse.

    model = sa.add_adapter(model, "sst2", sa.SparseAdapterConfig(kind="houlsby", sparsity=0.4), data=batches)
    sa.train_adapter(model, "sst2")      # freezes everything but this adapter (and the task head)
    sa.set_active_adapters(model, ["sst2", "other"])

Adapters live in `AdapterSlot`s (see slot.py) attached to the modules they adapt; the model keeps a
registry of names, configs, sites and pruning records.
"""

import contextlib
import re
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..pruning.api import PRUNABLE_ATTR, prune
from . import heads, routing
from . import prefix as prefix_attention
from .config import SparseAdapterConfig
from .modules import AdapterFusion, BottleneckAdapter, LoRAAdapter, PrefixGenerator
from .placement import Site, hidden_size, is_conv1d, resolve_sites
from .registry import PREFIX_ROOT, REGISTRY_ATTR, AdapterEntry, entry, registry
from .registry import router as registry_router
from .slot import SLOT_ATTR, AdapterSlot, slots

Names = Union[str, Sequence[str]]
_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")
# Task heads trained with an adapter (peft's modules_to_save for classification).
HEAD_NAMES = ("classifier", "score", "qa_outputs", "classification_head")


def _as_list(names: Names) -> List[str]:
    return [names] if isinstance(names, str) else list(names)


def _device_dtype(model: nn.Module, host: nn.Module):
    for module in (host, model):
        for p in module.parameters():
            if p.is_floating_point():
                return p.device, p.dtype
    return torch.device("cpu"), torch.get_default_dtype()


def _build(config: SparseAdapterConfig, site: Site) -> nn.Module:
    if site.mode == "lora":
        return LoRAAdapter(
            site.in_features,
            site.out_features,
            config.effective_bottleneck,
            alpha=config.lora_alpha,
            dropout=config.dropout,
            init=config.init,
        )
    return BottleneckAdapter(
        site.in_features,
        site.out_features,
        config.effective_bottleneck,
        activation=config.activation,
        dropout=config.dropout,
        layer_norm=config.layer_norm,
        scale=config.scale,
        init=config.init,
    )


def _slot_for(model: nn.Module, site: Site) -> AdapterSlot:
    host = model.get_submodule(site.host)
    slot = getattr(host, SLOT_ATTR, None)
    if slot is None:
        slot = AdapterSlot(site.mode, site.in_features, site.out_features)
        slot.attach(host, model.get_submodule(site.span_start) if site.span_start else None)
    elif slot.mode != site.mode:
        raise ValueError(f"{site.host!r} already holds {slot.mode} adapters; a {site.mode} adapter cannot share it")
    if slot.__dict__.get("router") is None:
        slot.__dict__["router"] = registry_router(model)
    return slot


def adapter_modules(model: nn.Module, name: str) -> Dict[str, nn.Module]:
    """The modules of adapter `name`, by their full module name in the model."""
    found = {}
    for part, sites in entry(model, name).sites.items():
        for site in sites:
            if part == "prefix":
                continue
            found[f"{site.host}.{SLOT_ATTR}.adapters.{name}"] = model.get_submodule(site.host).sparseadapter.adapters[
                name
            ]
    prefixes = getattr(model, PREFIX_ROOT, None)
    if prefixes is not None and name in prefixes:
        found[f"{PREFIX_ROOT}.{name}"] = prefixes[name]
    return found


def add_adapter(
    model: nn.Module,
    name: str,
    config: SparseAdapterConfig,
    *,
    data: Optional[Iterable] = None,
    loss_fn=None,
    activate: bool = True,
    calibration_batches: Optional[int] = None,
    head=None,
) -> nn.Module:
    """Add adapter `name` to `model` in place and return the model.

    The base model's parameters are frozen. A sparse config (`sparsity > 0` or `large_sparse > 1`) is
    pruned here, once, with `config.pruner`, scored through the new adapter's head. SNIP and GraSP need
    calibration `data`, an iterable of batches (a list, a generator, a torch DataLoader):

    - dicts of tensors the model takes as `model(**batch)`, with labels (the default loss is
      `model(**batch).loss`), e.g. `dict(tokenizer(texts, padding=True, return_tensors="pt"), labels=y)`;
    - anything else, e.g. `(inputs, labels)` tuples, with `loss_fn(model, batch)` -> scalar loss.

    `calibration_batches=k` reads only the first k batches of `data` (None: all); the data-free
    pruners (random, magnitude, synflow) read none. A batch of another form raises ValueError naming
    what was received. With `activate`, the new adapter becomes the only active one.

    The adapter owns a task head (heads.py): the model's head when no adapter owns it yet, else a copy
    of the current head; `head=HeadConfig(kind, num_labels)` (or a kind name: "classification",
    "regression", "span") draws a new one of that kind. Other adapters' heads are never changed.
    """
    if not isinstance(config, SparseAdapterConfig):
        raise TypeError(f"config must be a SparseAdapterConfig, got {type(config).__name__}")
    check_new_name(model, name)
    parts = build_adapter(model, config)
    check_attachable(model, parts, activate)
    planned = heads.plan_head(model, head, seed=config.seed)
    attach_adapter(model, name, config, parts)
    heads.attach_planned_head(model, name, planned)
    if config.is_sparse:
        _prune_adapter(model, name, config, data, loss_fn, calibration_batches)
    freeze_base(model)
    if activate:
        set_active_adapters(model, [name])
    return model


def check_new_name(model: nn.Module, name: str) -> None:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"adapter name must be letters, digits, '_' or '-', got {name!r}")
    reg = model.__dict__.get(REGISTRY_ATTR)
    if reg is not None and (name in reg.adapters or name in reg.fusions):
        raise ValueError(f"the model already has an adapter named {name!r}")


def check_attachable(model: nn.Module, parts: "BuiltAdapter", activate: bool) -> None:
    """Everything attach_adapter (and activating) could refuse, checked before the model changes."""
    for sites in parts.sites.values():
        for site in sites:
            slot = getattr(model.get_submodule(site.host), SLOT_ATTR, None)
            if slot is not None and slot.mode != site.mode:
                raise ValueError(
                    f"{site.host!r} already holds {slot.mode} adapters; this adapter needs a {site.mode} slot there"
                )
    if parts.prefix is not None:
        prefix_attention.check_installable(model)
    if activate:
        for host, slot in slots(model).items():
            if slot.merged:
                raise ValueError(
                    f"adapter {slot.merged[0]!r} is merged into {host!r} and would be deactivated; "
                    "unmerge it first, or pass activate=False"
                )


@dataclass
class BuiltAdapter:
    """An adapter's modules, built off the model: attach_adapter puts them in place."""

    sites: Dict[str, List[Site]]
    modules: List[Tuple[Site, nn.Module]]
    prefix: Optional[PrefixGenerator]
    # where each module (then the prefix) belongs: its device and dtype. The modules are there unless
    # built on the meta device (build_adapter(on_meta=True)), which allocates nothing.
    placement: Optional[List[Tuple[torch.device, torch.dtype]]] = None


def build_adapter(
    model: nn.Module, config: SparseAdapterConfig, prefix_sites: Optional[List[Site]] = None, *, on_meta: bool = False
) -> BuiltAdapter:
    """Resolve the sites and build the modules, seeded, on each host's device and dtype; the model is
    not touched. `prefix_sites` replaces the prefix sites resolved (loading a file that lists fewer).
    `on_meta`: build them on the meta device in their dtypes (shapes only, no memory, no random
    draws); `placement` says where each belongs (load_adapter materializes them from a file)."""
    sites = resolve_sites(model, config.kind, config.target_modules, config.lora_targets)
    if prefix_sites is not None and "prefix" in sites:
        sites["prefix"] = list(prefix_sites)
    kv_dims = {
        site.host: prefix_attention.check_attention_module(site.host, model.get_submodule(site.host))
        for site in sites.get("prefix", [])
    }
    if len(set(kv_dims.values())) > 1:
        raise ValueError("prefix tuning needs one key/value width across attention layers")
    modules, placement = [], []
    generator = None
    with torch.random.fork_rng(devices=[]), torch.device("meta") if on_meta else contextlib.nullcontext():
        torch.manual_seed(config.seed)
        for part in ("bottleneck", "lora"):
            for site in sites.get(part, []):
                device, dtype = _device_dtype(model, model.get_submodule(site.host))
                placement.append((device, dtype))
                modules.append((site, _build(config, site).to("meta" if on_meta else device, dtype)))
        if kv_dims:
            device, dtype = _device_dtype(model, model)
            placement.append((device, dtype))
            generator = PrefixGenerator(
                len(kv_dims),
                hidden_size(model),
                next(iter(kv_dims.values())),
                config.prefix_length,
                config.prefix_mid_dim,
            ).to("meta" if on_meta else device, dtype)
    return BuiltAdapter(sites, modules, generator, placement)


def _route_adapter_names(model: nn.Module, args, kwargs):
    """Forward pre-hook on the model root: peft's per-row `adapter_names=` (routing.py). Takes the
    argument out of the call and routes each row through the adapter it names. (A module-level
    function, so deepcopy and pickling of the model keep working.)"""
    reg = model.__dict__.get(REGISTRY_ATTR)
    if reg is None:
        return None
    router = registry_router(model)
    router.enter_call()  # first: _leave_routed_call pops it whatever happens next
    if "adapter_names" not in kwargs:
        return None
    kwargs = dict(kwargs)
    names = kwargs.pop("adapter_names")
    if names is not None:
        rows, device = routing.batch_size(args, kwargs)
        router.route(routing.rows_of(names, list(reg.adapters), list(reg.fusions), rows, device))
    return args, kwargs


@contextlib.contextmanager
def per_row_adapters(model: nn.Module, adapter_names: Sequence[Optional[str]]):
    """`with sa.per_row_adapters(model, ["a", None, "b"]): model.generate(...)`: every forward inside
    routes row i through adapter_names[i] (None or "__base__": the bare model), as
    `model(..., adapter_names=...)` does for one call; generated beams and returned sequences take
    their row's adapter. For `generate`, which refuses `adapter_names=` (transformers checks its keywords
    against the model's forward)."""
    reg = registry(model)
    router = registry_router(model)
    routed = routing.rows_of(
        adapter_names, list(reg.adapters), list(reg.fusions), None, _parameter_device(model), expand=True
    )
    router.enter_call()
    router.route(routed)
    try:
        yield model
    finally:
        router.leave_call()


def _parameter_device(model: nn.Module) -> torch.device:
    return next(iter(model.parameters()), torch.empty(0)).device


def _leave_routed_call(model: nn.Module, args, kwargs, output):
    """Forward hook (always called, also after an exception) paired with _route_adapter_names."""
    if REGISTRY_ATTR in model.__dict__:
        registry_router(model).leave_call()
    return None


def guard_forward(model: nn.Module) -> None:
    """Install `_route_adapter_names` and `_leave_routed_call` on the model root, once."""
    if any(fn is _route_adapter_names for fn in model._forward_pre_hooks.values()):
        return
    model.register_forward_pre_hook(_route_adapter_names, with_kwargs=True)
    model.register_forward_hook(_leave_routed_call, with_kwargs=True, always_call=True)


def attach_adapter(model: nn.Module, name: str, config: SparseAdapterConfig, parts: BuiltAdapter) -> None:
    from . import pretrained  # save_pretrained and adapter checkpoints (imports io, which imports this module)

    reg = registry(model, create=True)
    guard_forward(model)
    pretrained.install(model)
    if parts.prefix is not None:  # first: the one step that can still refuse
        prefix_attention.install(model)
    for site, module in parts.modules:
        _slot_for(model, site).adapters[name] = module
    if parts.prefix is not None:
        if getattr(model, PREFIX_ROOT, None) is None:
            setattr(model, PREFIX_ROOT, nn.ModuleDict())
        getattr(model, PREFIX_ROOT)[name] = parts.prefix
        for layer, site in enumerate(parts.sites["prefix"]):
            slot = _slot_for(model, site)
            slot.layer_index = layer
            slot.prefixes[name] = parts.prefix
    reg.adapters[name] = AdapterEntry(config, parts.sites)


def _prune_adapter(model, name, config, data, loss_fn, calibration_batches=None) -> None:
    reg = registry(model)
    targets = [
        f"{prefix}.{sub}" if sub else prefix
        for prefix, module in adapter_modules(model, name).items()
        for sub, layer in module.named_modules()
        if getattr(layer, PRUNABLE_ATTR, False)
    ]
    saved = (list(reg.active), reg.active_fusion)
    try:
        _set_active(model, [name], None)  # LoRA adapters merged into base weights stay there
        prune(
            model,
            method=config.pruner,
            sparsity=config.effective_sparsity,
            scope=config.scope,
            data=data,
            loss_fn=loss_fn,
            seed=config.seed,
            rounds=config.pruner_rounds,
            targets=targets,
            calibration_batches=calibration_batches,
        )
    except Exception:
        delete_adapter(model, name)  # leave the model as it was
        raise
    finally:
        _set_active(model, *saved)


def pruning_record(model: nn.Module, name: str):
    """How adapter `name` was pruned (the record `prune` or `load_adapter` put on its sparse layers);
    None if it is dense."""
    for module in adapter_modules(model, name).values():
        for layer in module.modules():
            record = getattr(layer, "sparseadapter_pruning", None)
            if record is not None:
                return record
    return None


def freeze_base(model: nn.Module) -> None:
    """Every parameter that is not an adapter's (nor a task head's) stops training."""
    keep = {id(p) for slot in slots(model).values() for p in slot.parameters()}
    keep |= {id(p) for p in getattr(model, PREFIX_ROOT, nn.Module()).parameters()}
    keep |= {id(p) for p in head_parameters(model)}
    for p in model.parameters():
        if id(p) not in keep:
            p.requires_grad_(False)


def _set_active(model: nn.Module, names: List[str], fusion: Optional[str]) -> None:
    reg = registry(model)
    for slot in slots(model).values():
        slot.active = [n for n in names if n in slot.adapters or n in slot.prefixes]
        slot.active_fusion = fusion if fusion in slot.fusions else None
    reg.active, reg.active_fusion = list(names), fusion
    heads.activate_head(model, list(names))  # the model answers with the head of the active adapter


def set_active_adapters(model: nn.Module, names: Names) -> nn.Module:
    """Run these adapters (stacked in this order where they share a place); others are skipped."""
    names = _as_list(names)
    for n in names:
        entry(model, n)
    for host, slot in slots(model).items():
        for merged in slot.merged:
            if merged not in names:
                raise ValueError(f"adapter {merged!r} is merged into {host!r}; unmerge it before deactivating it")
    _set_active(model, names, None)
    return model


def active_adapters(model: nn.Module) -> List[str]:
    return list(registry(model).active)


@contextlib.contextmanager
def disable_adapter(model: nn.Module):
    """`with sa.disable_adapter(model):` runs the base model: no adapter, fusion or prefix is active
    inside, and LoRA adapters merged into base weights are taken out for the duration. On leaving
    (also by an exception) the active adapters, the fusion and the merges are as they were: a merge is
    redone from the kept original weight, so the weights come back bit for bit."""
    if REGISTRY_ATTR not in model.__dict__:  # no adapters: the model is the base model already
        yield model
        return
    reg = registry(model)
    active, fusion = list(reg.active), reg.active_fusion
    merged = {host: list(slot.merged) for host, slot in slots(model).items() if slot.merged}
    names = list(dict.fromkeys(n for ns in merged.values() for n in ns))
    if names:
        unmerge(model, names)
    try:
        _set_active(model, [], None)
        yield model
    finally:
        _set_active(model, active, fusion)
        if names:
            # merge in the original order: the same additions on the same original weight
            with torch.no_grad():
                for host_name, order in merged.items():
                    host = model.get_submodule(host_name)
                    slot = host.sparseadapter
                    slot.__dict__["original_weight"] = host.weight.detach().clone()
                    for n in order:
                        host.weight.add_(_weight_delta(host, slot.adapters[n]))
                    slot.merged = list(order)


def head_parameters(model: nn.Module) -> List[nn.Parameter]:
    return [
        p for n in HEAD_NAMES if isinstance(getattr(model, n, None), nn.Module) for p in getattr(model, n).parameters()
    ]


def train_adapter(model: nn.Module, names: Names, *, train_head: bool = True) -> nn.Module:
    """Activate `names` and make them (and the task head, with `train_head`) the only trainable parameters."""
    names = _as_list(names)
    set_active_adapters(model, names)
    for p in model.parameters():
        p.requires_grad_(False)
    for n in names:
        for module in adapter_modules(model, n).values():
            for p in module.parameters():
                p.requires_grad_(True)
    if train_head:
        for p in head_parameters(model):
            p.requires_grad_(True)
    return model


def delete_adapter(model: nn.Module, name: str) -> nn.Module:
    reg = registry(model)
    entry(model, name)
    users = [f for f, members in reg.fusions.items() if name in members]
    if users:
        raise ValueError(f"adapter {name!r} is part of fusion {users[0]!r}; delete the fusion first")
    for host, slot in slots(model).items():
        if name in slot.merged:
            raise ValueError(f"adapter {name!r} is merged into {host!r}; unmerge it before deleting it")
    for host, slot in slots(model).items():
        if name in slot.adapters:
            del slot.adapters[name]
        slot.prefixes.pop(name, None)
        if name in slot.active:
            slot.active.remove(name)
        if not len(slot.adapters) and not slot.prefixes:
            slot.detach(model.get_submodule(host))
    prefixes = getattr(model, PREFIX_ROOT, None)
    if prefixes is not None and name in prefixes:
        del prefixes[name]
        if not len(prefixes):
            delattr(model, PREFIX_ROOT)
            prefix_attention.uninstall(model)
    del reg.adapters[name]
    if name in reg.active:
        reg.active.remove(name)
    return model


# -- LoRA merging -------------------------------------------------------------------------------
def _lora_slots(model: nn.Module, name: str):
    config = entry(model, name).config
    if config.kind != "lora":
        raise ValueError(
            f"adapter {name!r} is {config.kind}: only LoRA folds into the base weights "
            "(a bottleneck adapter's nonlinearity does not)"
        )
    return [(site.host, model.get_submodule(site.host)) for site in entry(model, name).sites["lora"]]


def _weight_delta(host: nn.Module, adapter: LoRAAdapter) -> torch.Tensor:
    """The LoRA update in the layout of the host's weight: [out, in] for nn.Linear, [in, out] for Conv1D."""
    delta = adapter.delta_weight()
    return (delta.t() if is_conv1d(host) else delta).to(host.weight.dtype)


MERGEABLE_KINDS = ("lora",)


def merge(model: nn.Module, names: Optional[Names] = None) -> nn.Module:
    """Fold LoRA adapters (default: the active ones) into their base weights: `W += (alpha/r) B A`.

    The original weight is kept aside, so `unmerge` restores it bit for bit. Only LoRA folds into a
    weight: naming another kind, or calling without names while another kind is active (or nothing
    is), raises ValueError rather than leaving an adapter unmerged without a word.
    """
    reg = registry(model)
    if names is None:
        others = [n for n in reg.active if reg.adapters[n].config.kind not in MERGEABLE_KINDS]
        if others:
            kind = reg.adapters[others[0]].config.kind
            raise ValueError(
                f"merge: the active adapter {others[0]!r} is {kind}: only LoRA adapters fold into the "
                "base weights (a bottleneck adapter's nonlinearity does not, nor do prefixes); pass "
                "names=[...] of the LoRA adapters to merge, or deactivate the others"
            )
        if not reg.active:
            raise ValueError(
                "merge: no adapter is active, so there is nothing to merge; activate the LoRA "
                "adapters first (sa.set_active_adapters) or pass names=[...]"
            )
    names = _as_list(names) if names is not None else list(reg.active)
    for n in names:
        if n not in reg.active:
            raise ValueError(f"adapter {n!r} is not active; activate it before merging it")
        _lora_slots(model, n)
    with torch.no_grad():
        for n in names:
            for _, host in _lora_slots(model, n):
                slot = host.sparseadapter
                if n in slot.merged:
                    continue
                if not slot.merged:
                    slot.__dict__["original_weight"] = host.weight.detach().clone()
                host.weight.add_(_weight_delta(host, slot.adapters[n]))
                slot.merged.append(n)
    return model


def unmerge(model: nn.Module, names: Optional[Names] = None) -> nn.Module:
    """Undo `merge` exactly: restore the kept original weight and re-add any adapters still merged."""
    with torch.no_grad():
        for host_name, slot in slots(model).items():
            if slot.mode != "lora" or not slot.merged:
                continue
            remove = slot.merged if names is None else [n for n in _as_list(names) if n in slot.merged]
            if not remove:
                continue
            host = model.get_submodule(host_name)
            slot.merged = [n for n in slot.merged if n not in remove]
            host.weight.copy_(slot.__dict__["original_weight"])
            for n in slot.merged:
                host.weight.add_(_weight_delta(host, slot.adapters[n]))
            if not slot.merged:
                del slot.__dict__["original_weight"]
    return model


def unload(model: nn.Module) -> nn.Module:
    """Merge the active LoRA adapters and remove every adapter: a plain model again.

    Refuses when a non-LoRA adapter would be lost (delete it explicitly first).
    """
    reg = registry(model)
    for n, e in reg.adapters.items():
        if e.config.kind != "lora":
            raise ValueError(f"adapter {n!r} ({e.config.kind}) cannot be merged; delete_adapter it first")
    merge(model, list(reg.active))
    for slot in slots(model).values():
        slot.__dict__.pop("original_weight", None)
        slot.merged = []
    for fusion in list(reg.fusions):
        del reg.fusions[fusion]
    for n in list(reg.adapters):
        delete_adapter(model, n)
    del model.__dict__["sparseadapter_registry"]
    for key in [k for k, fn in model._forward_pre_hooks.items() if fn is _route_adapter_names]:
        del model._forward_pre_hooks[key]
        model._forward_pre_hooks_with_kwargs.pop(key, None)
    for key in [k for k, fn in model._forward_hooks.items() if fn is _leave_routed_call]:
        del model._forward_hooks[key]
        model._forward_hooks_with_kwargs.pop(key, None)
        model._forward_hooks_always_called.pop(key, None)
    from . import pretrained

    pretrained.uninstall(model)
    return model


# -- Fusion ---------------------------------------------------------------------------------------
def add_fusion(model: nn.Module, names: Sequence[str], fusion_name: Optional[str] = None, *, seed: int = 0) -> str:
    """Add an AdapterFusion layer over sequential bottleneck adapters `names` at every place they share."""
    reg = registry(model)
    names = list(names)
    if len(names) < 2:
        raise ValueError("a fusion combines at least two adapters")
    for n in names:
        if entry(model, n).config.kind not in ("houlsby", "pfeiffer"):
            raise ValueError(f"fusion combines houlsby or pfeiffer adapters; {n!r} is {reg.adapters[n].config.kind}")
    fusion_name = fusion_name or ",".join(names)
    if fusion_name in reg.fusions or fusion_name in reg.adapters or "." in fusion_name:
        raise ValueError(f"fusion name {fusion_name!r} is taken or invalid")
    shared = [(h, s) for h, s in slots(model).items() if s.mode == "after" and all(n in s.adapters for n in names)]
    if not shared:
        raise ValueError(f"adapters {names} share no place in the model to fuse")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _host, slot in shared:
            device, dtype = _device_dtype(model, slot.adapters[names[0]])
            slot.fusions[fusion_name] = AdapterFusion(slot.out_features, names).to(device, dtype)
    reg.fusions[fusion_name] = names
    return fusion_name


def set_active_fusion(model: nn.Module, fusion_name: str) -> nn.Module:
    reg = registry(model)
    if fusion_name not in reg.fusions:
        raise ValueError(f"the model has no fusion named {fusion_name!r}")
    _set_active(model, reg.fusions[fusion_name], fusion_name)
    return model


def train_fusion(model: nn.Module, fusion_name: str, *, train_head: bool = True) -> nn.Module:
    """Activate the fusion and train only its weights (and the head): the fused adapters stay frozen."""
    set_active_fusion(model, fusion_name)
    for p in model.parameters():
        p.requires_grad_(False)
    for slot in slots(model).values():
        if fusion_name in slot.fusions:
            for p in slot.fusions[fusion_name].parameters():
                p.requires_grad_(True)
    if train_head:
        for p in head_parameters(model):
            p.requires_grad_(True)
    return model


def fold_prefix(model: nn.Module, names: Optional[Names] = None) -> nn.Module:
    """Replace each prefix adapter's reparameterization MLP by the prefixes it computes (after training)."""
    prefixes = getattr(model, PREFIX_ROOT, None)
    names = _as_list(names) if names is not None else list(prefixes or [])
    for n in names:
        if prefixes is None or n not in prefixes:
            raise ValueError(f"adapter {n!r} has no prefix to fold")
        prefixes[n].fold()
    return model
