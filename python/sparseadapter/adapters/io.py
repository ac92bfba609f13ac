"""save_adapter / load_adapter: one folder per adapter, `adapter_config.json` + its tensor file.

The safetensors file holds the adapter's tensors under their module names in the model; a sparse
weight is stored as its CSR arrays (`values`, `crow_indices`, `col_indices`), the indices in the
narrowest integer type that holds them, so the file grows with nnz, not with the dense size. The
JSON holds the config, the sites, the pruning record (`sparseadapter_pruning`), the library version,
and the name and SHA-256 of the tensor file. With the head, the file holds the adapter's own task head
(heads.py: one per adapter, active or not) and the JSON describes it ("head"). A regression head's target
normalization (head.py) is two of the head's tensors (`head.<head>.target_mean`, `.target_scale`),
loaded with it. Loading checks everything against the model and the config before the model is touched.

Integrity: the config carries `config_sha256`, the SHA-256 of its own canonical JSON without that
field, and `weights_sha256`, that of the tensor file: an edited or corrupted setting (scale,
activation, sizes, ...) is refused like a damaged tensor file. (A config without `config_sha256`,
from a library before 0.5, loads with a warning.) A checksum is not a signature: whoever can write
the folder can recompute it.

Crash safety: the tensor file is named by its content (`adapter-<sha256 prefix>.safetensors`), written
whole under a temporary name and renamed; then the config is replaced the same way, and that rename
is the commit. A process killed at any point leaves the folder's config naming a complete tensor file:
the previous adapter until the commit, the new one after. Files no config names are removed by the
next save.

Concurrency: a save holds an exclusive `flock` on the folder from its first write to its cleanup, and
a load holds a shared one while it reads the config and the tensor file: saves to one folder, from
threads or processes, run one after the other (none deletes another's files), and a load reads one
whole adapter, the one before a save or the one after. (On a platform without `fcntl`, or a file
system without `flock`, there is no lock: one writer at a time is then the caller's business.)

Memory: loading builds the adapter's modules on the meta device first and checks the sizes the config
declares (bottleneck, large_sparse, prefix length and width) against the tensors in the file; the
modules are then made from the file's tensors, so a load allocates what the file holds, never what a
config claims.
"""

import contextlib
import hashlib
import json
import os
import re
import secrets
import warnings
from typing import Dict, Optional

import torch
from torch import Tensor, nn

import sparseadapter_ext

from ..csr import index_dtype_for
from ..pruning.api import PRUNABLE_ATTR, PruningRecord
from ..sparse_linear import SparseLinear
from ..version import __version__
from . import heads
from .api import (
    HEAD_NAMES,
    adapter_modules,
    attach_adapter,
    build_adapter,
    check_attachable,
    check_new_name,
    freeze_base,
    pruning_record,
    set_active_adapters,
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
    if include_head:  # the adapter's own head (heads.py), active or not
        for head, module in heads.saved_heads(model, name):
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
    head = heads.describe_saved_head(model, name) if include_head else None
    record = pruning_record(model, name)
    blob = save(tensors)
    digest = hashlib.sha256(blob).hexdigest()
    weights_file = f"adapter-{digest[:16]}.safetensors"
    os.makedirs(path, exist_ok=True)
    with folder_lock(path, shared=False):
        _write_folder(model, path, name, e, record, tensors, blob, digest, weights_file, head)
    return path


def _write_folder(model, path, name, e, record, tensors, blob, digest, weights_file, head) -> None:
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
        "head": head,
        "base_model": base_model_record(model),  # what sa.load_pretrained loads the adapter onto
    }
    meta = json.loads(json.dumps(meta))  # the values as a reader will see them
    meta["config_sha256"] = config_digest(meta)
    text = json.dumps(meta, indent=2, sort_keys=True).encode()
    try:
        atomic_write(os.path.join(path, CONFIG_FILE), text)  # the commit
    except BaseException:
        _remove_unreferenced(path)
        raise
    _remove_unreferenced(path)
    write_model_card(path)


def config_digest(meta: dict) -> str:
    """The SHA-256 of an adapter config's canonical JSON (sorted keys, no spaces) without the field
    `config_sha256` that holds it."""
    body = {k: v for k, v in meta.items() if k != "config_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@contextlib.contextmanager
def folder_lock(path: str, *, shared: bool):
    """An advisory `flock` on the adapter folder itself (no lock file): exclusive for a save, shared
    for a load. No lock where the platform or the file system has none."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # no folder (the read reports it) or not a folder
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        except OSError:  # a file system without flock
            pass
        yield
    finally:
        os.close(fd)  # releases the lock


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
        raise ValueError(
            f"load_adapter: {config_path} is {os.path.getsize(config_path):,} bytes; an adapter config "
            f"is a few kilobytes (limit {_CONFIG_LIMIT:,})"
        )
    try:
        with open(config_path, "rb") as f:
            meta = json.loads(f.read().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"load_adapter: {config_path} is not valid JSON (corrupted or truncated): {err}") from None
    except RecursionError:
        raise ValueError(f"load_adapter: {config_path} is nested too deeply to be an adapter config") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"load_adapter: {config_path} is not a sparseadapter adapter config")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"load_adapter: format version {meta.get('format_version')!r} is not supported "
            f"(this library reads version {FORMAT_VERSION})"
        )
    for key in ("name", "config", "sites", "weights_sha256"):
        if key not in meta:
            raise ValueError(f"load_adapter: {config_path} lacks the field {key!r}")
    digest = meta.get("config_sha256")
    if digest is None:
        warnings.warn(
            f"load_adapter: {config_path} has no config_sha256 (saved by sparseadapter before 0.5): its "
            "settings are not covered by a checksum; save the adapter again to add one",
            UserWarning,
            stacklevel=3,
        )
    elif digest != config_digest(meta):
        raise ValueError(
            f"load_adapter: {config_path} does not match its own checksum (config_sha256): a setting "
            "was edited or the file is corrupted; save the adapter again rather than editing it"
        )
    return meta


def check_adapter_files(path: str) -> None:
    """Without a model: the folder's config reads (checksum and all) and its tensor file is there and
    matches the config's checksum. ValueError or FileNotFoundError otherwise."""
    with folder_lock(path, shared=True):
        meta = _read_meta(path)
        weights = os.path.join(path, _weights_file(meta, path))
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"load_adapter: {weights} does not exist")
        digest = hashlib.sha256()
        with open(weights, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    if digest.hexdigest() != meta["weights_sha256"]:
        raise ValueError(
            f"load_adapter: {weights} does not match its config's checksum: the file is corrupted, "
            "truncated, or from another save"
        )


def _size_limit(model: nn.Module, parts) -> int:
    """The most bytes a tensor file of this adapter can hold: every weight dense in float64 with int64
    indices, the head, and room for the header. A larger file is not ours, and is not read."""
    entries = sum(p.numel() for _, module in parts.modules for p in module.parameters())
    entries += sum(p.numel() for p in parts.prefix.parameters()) if parts.prefix is not None else 0
    entries += sum(
        p.numel()
        for n in HEAD_NAMES
        if isinstance(getattr(model, n, None), nn.Module)
        for p in getattr(model, n).parameters()
    )
    return 24 * entries + (1 << 20)


def _read_tensors(path: str, meta: dict, limit: int) -> Dict[str, Tensor]:
    from safetensors.torch import load

    weights = os.path.join(path, _weights_file(meta, path))
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"load_adapter: {weights} does not exist")
    size = os.path.getsize(weights)
    if size > limit:
        raise ValueError(
            f"load_adapter: {weights} is {size:,} bytes, more than this adapter's config can take "
            f"({limit:,}): not this adapter's tensors"
        )
    with open(weights, "rb") as f:
        blob = f.read()
    if hashlib.sha256(blob).hexdigest() != meta["weights_sha256"]:
        raise ValueError(
            f"load_adapter: {weights} does not match its config's checksum: the file is corrupted, "
            "truncated, or from another save"
        )
    try:
        return load(blob)
    except Exception as err:  # safetensors raises its own error types
        raise ValueError(f"load_adapter: {weights} is not a readable safetensors file: {err}") from None


def _check_sites(meta: dict, parts) -> None:
    saved = meta["sites"]
    if not isinstance(saved, dict) or sorted(saved) != sorted(parts.sites):
        raise ValueError(
            f"load_adapter: the file's adapter parts {sorted(saved) if isinstance(saved, dict) else saved} "
            f"do not match the model's {sorted(parts.sites)}"
        )
    for part, sites in parts.sites.items():
        try:
            theirs = [Site(**s) for s in saved[part]]
        except TypeError:
            raise ValueError(f"load_adapter: malformed site list for {part!r}") from None
        if theirs != sites:
            for mine, other in zip(sites, theirs):
                if mine != other:
                    raise ValueError(
                        f"load_adapter: the adapter was saved for {other} but this model has {mine} "
                        "(another model or architecture?)"
                    )
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


def _sparse_layer(key: str, tensors: Dict[str, Tensor], layer: nn.Linear, device: torch.device) -> SparseLinear:
    """The SparseLinear stored under `key` (`layer`, its dense form, may be on the meta device), made
    on `device`; its indices in `tensors` are widened to the in-memory type."""
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
    return sparse.to(device, layer.weight.dtype)


def _owners(parts, name: str, meta: dict):
    """(name prefix in the file, module, device it belongs on) of every built module."""
    owners = [(f"{site.host}.sparseadapter.adapters.{name}", module) for site, module in parts.modules]
    if parts.prefix is not None:
        if meta.get("prefix_folded"):
            parts.prefix.fold()
        owners.append((f"sparseadapter_prefix.{name}", parts.prefix))
    return [(prefix, module, device) for (prefix, module), (device, _) in zip(owners, parts.placement)]


def _sparse_keys(module: nn.Module, prefix: str, tensors: Dict[str, Tensor]):
    """(sub-name, layer) of the prunable layers that the file stores as CSR."""
    return [
        (sub, layer)
        for sub, layer in module.named_modules()
        if getattr(layer, PRUNABLE_ATTR, False) and f"{prefix}.{sub}.crow_indices" in tensors
    ]


def _check_declared_sizes(
    parts, name: str, meta: dict, config: SparseAdapterConfig, tensors: Dict[str, Tensor], config_path: str
) -> None:
    """The sizes the config declares against the file's tensors, on the meta-built modules: a
    mismatch names the config's size fields before anything is allocated."""
    fields = f"bottleneck={config.bottleneck}, large_sparse={config.large_sparse}"
    if parts.prefix is not None:
        fields += f", prefix_length={config.prefix_length}, prefix_mid_dim={config.prefix_mid_dim}"

    def refuse(what: str) -> None:
        raise ValueError(
            f"load_adapter: {config_path} declares sizes ({fields}) that do not match its tensor file: {what}"
        )

    for prefix, module, _ in _owners(parts, name, meta):
        sparse = _sparse_keys(module, prefix, tensors)
        for sub, layer in sparse:
            crow = tensors[f"{prefix}.{sub}.crow_indices"]
            if crow.dim() != 1 or crow.numel() != layer.out_features + 1:
                refuse(
                    f"{prefix}.{sub} is a sparse matrix of {crow.numel() - 1} rows, the config builds "
                    f"{layer.out_features}"
                )
        stored_sparse = {f"{sub}.weight" for sub, _ in sparse}
        for key, target in module.state_dict().items():
            t = tensors.get(f"{prefix}.{key}")
            if key not in stored_sparse and t is not None and tuple(t.shape) != tuple(target.shape):
                refuse(f"{prefix}.{key} has shape {tuple(t.shape)}, the config builds {tuple(target.shape)}")


def _materialize(module: nn.Module, device: torch.device) -> None:
    """Give every parameter still on the meta device uninitialized memory on `device` (the file's
    tensors are loaded into them next)."""
    for sub in module.modules():
        for key, p in list(sub._parameters.items()):
            if p is not None and p.is_meta:
                sub._parameters[key] = nn.Parameter(torch.empty_like(p, device=device), requires_grad=p.requires_grad)
        for key, b in list(sub._buffers.items()):
            if b is not None and b.is_meta:
                sub._buffers[key] = torch.empty_like(b, device=device)


def _fill(parts, name: str, meta: dict, tensors: Dict[str, Tensor]) -> None:
    """Load the file's tensors into the built (not yet attached, meta-device) modules; sparse layers
    become SparseLinear, made from the file's arrays; the rest get memory on their device and the
    file's values."""
    expected = set()
    for prefix, module, device in _owners(parts, name, meta):
        for sub, layer in _sparse_keys(module, prefix, tensors):
            parent, _, child = sub.rpartition(".")
            setattr(
                module.get_submodule(parent) if parent else module,
                child,
                _sparse_layer(f"{prefix}.{sub}", tensors, layer, device),
            )
        _materialize(module, device)
        state = {}
        for key, target in module.state_dict().items():
            full = f"{prefix}.{key}"
            expected.add(full)
            if full not in tensors:
                raise ValueError(f"load_adapter: the file lacks {full}")
            t = tensors[full]
            if t.shape != target.shape:
                raise ValueError(
                    f"load_adapter: {full} has shape {tuple(t.shape)}, the model needs {tuple(target.shape)}"
                )
            if t.is_floating_point() != target.is_floating_point():
                raise ValueError(f"load_adapter: {full} has dtype {t.dtype}, the model needs {target.dtype}")
            state[key] = t
        module.load_state_dict(state, strict=True)
    unexpected = sorted(k for k in tensors if k not in expected and not k.startswith("head."))
    if unexpected:
        raise ValueError(f"load_adapter: the file holds tensors this adapter does not have, e.g. {unexpected[0]}")


def load_adapter(
    model: nn.Module, path: str, name: Optional[str] = None, *, load_head: bool = True, activate: bool = True
) -> nn.Module:
    """Add the adapter saved in folder `path` to `model` (as `name`, default the saved name).

    Checks the checksum, the config, every site, shape, dtype and CSR index against the model before
    changing it; any mismatch raises ValueError and leaves the model as it was.
    """
    name, config, parts, head = _prepare(model, path, name, load_head, activate)
    attach_adapter(model, name, config, parts)
    heads.attach_planned_head(model, name, head)
    freeze_base(model)
    if activate:
        set_active_adapters(model, [name])
    return model


def _prepare(model: nn.Module, path: str, name: Optional[str], load_head: bool, activate: bool):
    """Read and check everything and build the filled modules, off the model."""
    with folder_lock(path, shared=True):  # the config and the tensor file of one save
        meta = _read_meta(path)
        try:
            config = SparseAdapterConfig.from_dict(meta["config"])
        except ValueError as err:
            raise ValueError(f"load_adapter: {os.path.join(path, CONFIG_FILE)}: {err}") from None
        name = name or meta["name"]
        check_new_name(model, name)
        saved_type = meta.get("model_type")
        if saved_type is not None and saved_type != model_type(model):
            raise ValueError(
                f"load_adapter: the adapter was saved for a {saved_type!r} model, this one is {model_type(model)!r}"
            )
        # shapes only: nothing is allocated from the config's sizes
        parts = build_adapter(model, config, prefix_sites=_earlier_prefix_sites(model, config, meta), on_meta=True)
        tensors = _read_tensors(path, meta, _size_limit(model, parts))
    pruning = None
    if meta.get("sparseadapter_pruning"):
        try:
            pruning = PruningRecord(**meta["sparseadapter_pruning"])
        except TypeError:
            raise ValueError("load_adapter: malformed sparseadapter_pruning record") from None
    _check_sites(meta, parts)
    _check_declared_sizes(parts, meta["name"], meta, config, tensors, os.path.join(path, CONFIG_FILE))
    _fill(parts, meta["name"], meta, tensors)  # the file names tensors by the saved name
    for _, module in parts.modules:  # the provenance travels with the sparse layers, as after `prune`
        for layer in module.modules():
            if isinstance(layer, SparseLinear) and pruning is not None:
                layer.sparseadapter_pruning = pruning
    # the adapter's own head: the file's (checked here, before the model changes), or as add_adapter gives one
    head = heads.plan_loaded_head(model, tensors, meta.get("head")) if load_head else None
    if head is None:
        head = heads.plan_head(model, None)
    check_attachable(model, parts, activate)
    return name, config, parts, head
