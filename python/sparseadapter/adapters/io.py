"""save_adapter / load_adapter: one folder per adapter, `adapter_config.json` + its tensor file.

The safetensors file holds the adapter's tensors under their module names in the model; a sparse
weight is stored as its CSR arrays (`values`, `crow_indices`, `col_indices`), the indices in the
narrowest integer type that holds them, so the file grows with nnz, not with the dense size. The
JSON holds the config, the sites, the pruning record (`sparseadapter_pruning`), the library version,
and the name and SHA-256 of the tensor file. Loading checks everything against the model and the
config before the model is touched.

Crash safety: the tensor file is named by its content (`adapter-<sha256 prefix>.safetensors`), written
whole under a temporary name and renamed; then the config is replaced the same way, and that rename
is the commit. A process killed at any point leaves the folder's config naming a complete tensor file:
the previous adapter until the commit, the new one after. Files no config names are removed by the
next save.
"""
import hashlib
import json
import os
import re
import secrets
from typing import Dict, Optional

import torch
from torch import Tensor, nn

import sparseadapter_ext

from ..csr import index_dtype_for
from ..pruning.api import PRUNABLE_ATTR, PruningRecord
from ..version import __version__
from ..sparse_linear import SparseLinear
from .api import (
    HEAD_NAMES, adapter_modules, attach_adapter, build_adapter, check_attachable, check_new_name, freeze_base,
    pruning_record, set_active_adapters,
)
from .card import write_model_card
from .config import SparseAdapterConfig
from .placement import Site, model_type, resolve_sites
from .pretrained import base_model_record
from .registry import entry, registry

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter.safetensors"  # the name before content naming; still read
_WEIGHTS_NAME = re.compile(r"adapter(-[0-9a-f]{16})?\.safetensors")
FORMAT = "sparseadapter"
FORMAT_VERSION = 1
_CONFIG_LIMIT = 16 << 20
_INDEX_DTYPES = (torch.uint8, torch.int16, torch.int32, torch.int64)  # on disk; int32/int64 in memory
_VALUE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def atomic_write(path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never a part."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{secrets.token_hex(8)}")
    # not mkstemp: its files are 0600, so a saved adapter could not be shared; os.open gives the
    # permissions of any new file (0666 less the umask)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(folder)


def fsync_dir(folder) -> None:
    """Make a rename in `folder` durable."""
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _narrow(t: Tensor, largest: int) -> Tensor:
    """`t` in the narrowest integer type that holds 0..largest: at 80% sparsity, int32 column indices
    would take as much room as the float32 values they index."""
    for dtype in (torch.uint8, torch.int16, torch.int32):
        if largest <= torch.iinfo(dtype).max:
            return t.to(dtype)
    return t


def _adapter_tensors(model: nn.Module, name: str, include_head: bool) -> Dict[str, Tensor]:
    tensors = {}
    for prefix, module in adapter_modules(model, name).items():
        for key, t in module.state_dict().items():
            tensors[f"{prefix}.{key}"] = t
        for sub, layer in module.named_modules():
            if isinstance(layer, SparseLinear):
                key = f"{prefix}.{sub}" if sub else prefix
                tensors[f"{key}.crow_indices"] = _narrow(layer.crow_indices, layer.nnz)
                tensors[f"{key}.col_indices"] = _narrow(layer.col_indices, layer.in_features - 1)
    if include_head:
        for head in HEAD_NAMES:
            module = getattr(model, head, None)
            if isinstance(module, nn.Module):
                for key, t in module.state_dict().items():
                    tensors[f"head.{head}.{key}"] = t
    return {k: t.detach().to("cpu").contiguous() for k, t in tensors.items()}


def save_adapter(model: nn.Module, path: str, name: Optional[str] = None, *, include_head: bool = True) -> str:
    """Write adapter `name` (default: the only active one) to folder `path`; returns the folder.

    With `include_head`, the task head (classifier) is saved too, so the folder is enough to serve
    the task on the base model.
    """
    from safetensors.torch import save

    reg = registry(model)
    if name is None:
        if len(reg.active) != 1:
            raise ValueError(f"save_adapter: name the adapter to save (active: {reg.active})")
        name = reg.active[0]
    e = entry(model, name)
    for slot_host, slot in ((s.host, model.get_submodule(s.host).sparseadapter) for s in e.sites.get("lora", [])):
        if name in slot.merged:
            raise ValueError(f"save_adapter: {name!r} is merged into {slot_host!r}; unmerge it first")
    tensors = _adapter_tensors(model, name, include_head)
    record = pruning_record(model, name)
    blob = save(tensors)
    digest = hashlib.sha256(blob).hexdigest()
    weights_file = f"adapter-{digest[:16]}.safetensors"
    os.makedirs(path, exist_ok=True)
    atomic_write(os.path.join(path, weights_file), blob)
    prefix = getattr(model, "sparseadapter_prefix", None)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "torch_version": torch.__version__,
        "name": name,
        "model_type": model_type(model),
        "config": e.config.to_dict(),
        "sites": {part: [vars(s) for s in sites] for part, sites in e.sites.items()},
        "prefix_folded": bool(prefix is not None and name in prefix and prefix[name].is_folded),
        "sparseadapter_pruning": record.to_dict() if record is not None else None,
        "nnz": sum(int(t.numel()) for k, t in tensors.items() if k.endswith(".values")),
        "weights_file": weights_file,
        "weights_sha256": digest,
        "base_model": base_model_record(model),  # what sa.load_pretrained loads the adapter onto
    }
    text = json.dumps(meta, indent=2, sort_keys=True).encode()
    try:
        atomic_write(os.path.join(path, CONFIG_FILE), text)  # the commit
    except BaseException:
        _remove_unreferenced(path)
        raise
    _remove_unreferenced(path)
    write_model_card(path)
    return path


def weights_path(path: str) -> str:
    """The tensor file that the adapter folder `path` holds (named in its config)."""
    return os.path.join(path, _weights_file(_read_meta(path), path))


def _weights_file(meta: dict, path: str) -> str:
    name = meta.get("weights_file", WEIGHTS_FILE)
    if not isinstance(name, str) or not _WEIGHTS_NAME.fullmatch(name):
        # a plain file name of ours, never a path: a config must not point outside its folder
        raise ValueError(f"load_adapter: {os.path.join(path, CONFIG_FILE)} names an unexpected weights file {name!r}")
    return name


def _remove_unreferenced(path: str) -> None:
    """Tensor files the config does not name, and temporaries of interrupted saves."""
    try:
        keep = _weights_file(_read_meta(path), path)
    except (OSError, ValueError):
        return  # no readable config: leave everything for the user to look at
    for entry_name in os.listdir(path):
        stale_tmp = entry_name.startswith(".adapter") and ".tmp-" in entry_name
        if (_WEIGHTS_NAME.fullmatch(entry_name) and entry_name != keep) or stale_tmp:
            try:
                os.unlink(os.path.join(path, entry_name))
            except FileNotFoundError:
                pass


def _read_meta(path: str) -> dict:
    config_path = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"load_adapter: {config_path} does not exist")
    if os.path.getsize(config_path) > _CONFIG_LIMIT:
        raise ValueError(f"load_adapter: {config_path} is {os.path.getsize(config_path):,} bytes; an adapter config "
                         f"is a few kilobytes (limit {_CONFIG_LIMIT:,})")
    try:
        with open(config_path, "rb") as f:
            meta = json.loads(f.read().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"load_adapter: {config_path} is not valid JSON (corrupted or truncated): {err}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"load_adapter: {config_path} is not a sparseadapter adapter config")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"load_adapter: format version {meta.get('format_version')!r} is not supported "
                         f"(this library reads version {FORMAT_VERSION})")
    for key in ("name", "config", "sites", "weights_sha256"):
        if key not in meta:
            raise ValueError(f"load_adapter: {config_path} lacks the field {key!r}")
    return meta


def _size_limit(model: nn.Module, parts) -> int:
    """The most bytes a tensor file of this adapter can hold: every weight dense in float64 with int64
    indices, the head, and room for the header. A larger file is not ours, and is not read."""
    entries = sum(p.numel() for _, module in parts.modules for p in module.parameters())
    entries += sum(p.numel() for p in parts.prefix.parameters()) if parts.prefix is not None else 0
    entries += sum(p.numel() for n in HEAD_NAMES if isinstance(getattr(model, n, None), nn.Module)
                   for p in getattr(model, n).parameters())
    return 24 * entries + (1 << 20)


def _read_tensors(path: str, meta: dict, limit: int) -> Dict[str, Tensor]:
    from safetensors.torch import load

    weights = os.path.join(path, _weights_file(meta, path))
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"load_adapter: {weights} does not exist")
    size = os.path.getsize(weights)
    if size > limit:
        raise ValueError(f"load_adapter: {weights} is {size:,} bytes, more than this adapter's config can take "
                         f"({limit:,}): not this adapter's tensors")
    with open(weights, "rb") as f:
        blob = f.read()
    if hashlib.sha256(blob).hexdigest() != meta["weights_sha256"]:
        raise ValueError(f"load_adapter: {weights} does not match its config's checksum: the file is corrupted, "
                         "truncated, or from another save")
    try:
        return load(blob)
    except Exception as err:  # safetensors raises its own error types
        raise ValueError(f"load_adapter: {weights} is not a readable safetensors file: {err}") from None


def _check_sites(meta: dict, parts) -> None:
    saved = meta["sites"]
    if not isinstance(saved, dict) or sorted(saved) != sorted(parts.sites):
        raise ValueError(f"load_adapter: the file's adapter parts {sorted(saved) if isinstance(saved, dict) else saved} "
                         f"do not match the model's {sorted(parts.sites)}")
    for part, sites in parts.sites.items():
        try:
            theirs = [Site(**s) for s in saved[part]]
        except TypeError:
            raise ValueError(f"load_adapter: malformed site list for {part!r}") from None
        if theirs != sites:
            for mine, other in zip(sites, theirs):
                if mine != other:
                    raise ValueError(f"load_adapter: the adapter was saved for {other} but this model has {mine} "
                                     "(another model or architecture?)")
            raise ValueError(f"load_adapter: the adapter has {len(theirs)} {part} sites, the model {len(sites)}")


def _earlier_prefix_sites(model: nn.Module, config: SparseAdapterConfig, meta: dict):
    """The file's prefix sites when they are some of the model's, in order: BART and T5 prefixes were
    in the encoder only before they went into the decoder's self- and cross-attention too, and such a
    file still loads as it was trained. None otherwise (the site check then judges the file)."""
    saved = meta.get("sites")
    if config.kind not in ("prefix", "mam") or not isinstance(saved, dict):
        return None
    if not isinstance(saved.get("prefix"), list):
        return None
    mine = resolve_sites(model, config.kind, config.target_modules, config.lora_targets)["prefix"]
    position = {site: i for i, site in enumerate(mine)}
    try:
        theirs = [Site(**s) for s in saved["prefix"]]
        order = [position.get(site) for site in theirs]
    except TypeError:  # not site records, or unhashable fields: malformed, for the site check to report
        return None
    if theirs and theirs != mine and None not in order and order == sorted(set(order)):
        return theirs
    return None


def _sparse_layer(key: str, tensors: Dict[str, Tensor], layer: nn.Linear) -> SparseLinear:
    """The SparseLinear stored under `key`; its indices in `tensors` are widened to the in-memory type."""
    crow, col, values = (tensors.get(f"{key}.{k}") for k in ("crow_indices", "col_indices", "values"))
    if crow is None or col is None or values is None:
        raise ValueError(f"load_adapter: {key} lacks some of crow_indices, col_indices, values")
    if crow.dtype not in _INDEX_DTYPES or col.dtype not in _INDEX_DTYPES:
        raise ValueError(f"load_adapter: {key} index dtypes {crow.dtype}, {col.dtype} (need integers)")
    if values.dtype not in _VALUE_DTYPES:
        raise ValueError(f"load_adapter: {key}.values has dtype {values.dtype}")
    bias = tensors.get(f"{key}.bias")
    if (bias is None) != (layer.bias is None):
        raise ValueError(f"load_adapter: {key}.bias is {'missing' if bias is None else 'unexpected'}")
    try:
        # validate the file's values exactly (int64), before the cast to the library's index type
        # (int32 unless the pattern needs int64, as pruning makes it), which could wrap bad ones
        crow, col = crow.to(torch.int64), col.to(torch.int64)
        sparseadapter_ext.validate_csr(crow, col, layer.out_features, layer.in_features)
        dtype = index_dtype_for((layer.out_features, layer.in_features), col.numel())
        crow, col = crow.to(dtype), col.to(dtype)
        sparse = SparseLinear(layer.in_features, layer.out_features, crow, col, values, bias, validate=False)
    except (ValueError, TypeError, RuntimeError) as err:
        raise ValueError(f"load_adapter: {key} holds an invalid sparse matrix: {err}") from None
    tensors[f"{key}.crow_indices"], tensors[f"{key}.col_indices"] = crow, col
    return sparse.to(layer.weight.device, layer.weight.dtype)


def _fill(parts, name: str, meta: dict, tensors: Dict[str, Tensor]) -> None:
    """Load the file's tensors into the built (not yet attached) modules; sparse layers become SparseLinear."""
    expected = set()
    owners = [(f"{site.host}.sparseadapter.adapters.{name}", module) for site, module in parts.modules]
    if parts.prefix is not None:
        if meta.get("prefix_folded"):
            parts.prefix.fold()
        owners.append((f"sparseadapter_prefix.{name}", parts.prefix))
    for prefix, module in owners:
        for sub, layer in list(module.named_modules()):
            if getattr(layer, PRUNABLE_ATTR, False) and f"{prefix}.{sub}.crow_indices" in tensors:
                parent, _, child = sub.rpartition(".")
                setattr(module.get_submodule(parent) if parent else module, child,
                        _sparse_layer(f"{prefix}.{sub}", tensors, layer))
        state = {}
        for key, target in module.state_dict().items():
            full = f"{prefix}.{key}"
            expected.add(full)
            if full not in tensors:
                raise ValueError(f"load_adapter: the file lacks {full}")
            t = tensors[full]
            if t.shape != target.shape:
                raise ValueError(f"load_adapter: {full} has shape {tuple(t.shape)}, the model needs {tuple(target.shape)}")
            if t.is_floating_point() != target.is_floating_point():
                raise ValueError(f"load_adapter: {full} has dtype {t.dtype}, the model needs {target.dtype}")
            state[key] = t
        module.load_state_dict(state, strict=True)
    unexpected = sorted(k for k in tensors if k not in expected and not k.startswith("head."))
    if unexpected:
        raise ValueError(f"load_adapter: the file holds tensors this adapter does not have, e.g. {unexpected[0]}")


def _head_state(model: nn.Module, tensors: Dict[str, Tensor]) -> Dict[str, Dict[str, Tensor]]:
    heads = {}
    for key, t in tensors.items():
        if not key.startswith("head."):
            continue
        head, _, param = key[len("head."):].partition(".")
        module = getattr(model, head, None)
        if head not in HEAD_NAMES or not isinstance(module, nn.Module):
            raise ValueError(f"load_adapter: the file has a head {head!r} this model lacks")
        target = module.state_dict().get(param)
        if target is None or target.shape != t.shape:
            raise ValueError(f"load_adapter: head tensor {key} has shape {tuple(t.shape)}, the model's is "
                             f"{None if target is None else tuple(target.shape)} (another number of labels?)")
        heads.setdefault(head, {})[param] = t
    for head, state in heads.items():  # a head is saved whole: a partial one would load half a head
        missing = sorted(set(getattr(model, head).state_dict()) - set(state))
        if missing:
            raise ValueError(f"load_adapter: the file's head {head!r} lacks {missing[0]!r}")
    return heads


def load_adapter(model: nn.Module, path: str, name: Optional[str] = None, *, load_head: bool = True,
                 activate: bool = True) -> nn.Module:
    """Add the adapter saved in folder `path` to `model` (as `name`, default the saved name).

    Checks the checksum, the config, every site, shape, dtype and CSR index against the model before
    changing it; any mismatch raises ValueError and leaves the model as it was.
    """
    name, config, parts, heads = _prepare(model, path, name, load_head, activate)
    attach_adapter(model, name, config, parts)
    with torch.no_grad():
        for head, state in heads.items():
            getattr(model, head).load_state_dict(state, strict=True)
    freeze_base(model)
    if activate:
        set_active_adapters(model, [name])
    return model


def _prepare(model: nn.Module, path: str, name: Optional[str], load_head: bool, activate: bool):
    """Read and check everything and build the filled modules, off the model."""
    meta = _read_meta(path)
    try:
        config = SparseAdapterConfig.from_dict(meta["config"])
    except ValueError as err:
        raise ValueError(f"load_adapter: {os.path.join(path, CONFIG_FILE)}: {err}") from None
    name = name or meta["name"]
    check_new_name(model, name)
    saved_type = meta.get("model_type")
    if saved_type is not None and saved_type != model_type(model):
        raise ValueError(f"load_adapter: the adapter was saved for a {saved_type!r} model, this one is "
                         f"{model_type(model)!r}")
    parts = build_adapter(model, config, prefix_sites=_earlier_prefix_sites(model, config, meta))
    tensors = _read_tensors(path, meta, _size_limit(model, parts))
    pruning = None
    if meta.get("sparseadapter_pruning"):
        try:
            pruning = PruningRecord(**meta["sparseadapter_pruning"])
        except TypeError:
            raise ValueError("load_adapter: malformed sparseadapter_pruning record") from None
    _check_sites(meta, parts)
    _fill(parts, meta["name"], meta, tensors)  # the file names tensors by the saved name
    for _, module in parts.modules:  # the provenance travels with the sparse layers, as after `prune`
        for layer in module.modules():
            if isinstance(layer, SparseLinear) and pruning is not None:
                layer.sparseadapter_pruning = pruning
    heads = _head_state(model, tensors) if load_head else {}
    check_attachable(model, parts, activate)
    return name, config, parts, heads
