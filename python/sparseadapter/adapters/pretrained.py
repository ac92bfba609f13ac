"""Hugging Face conventions for a model with sparse adapters: `save_pretrained`, `load_pretrained`,
the base-model record, and Trainer checkpoints that hold the adapter, not the model.

`model.save_pretrained(d)` on a model with adapters writes the adapters, as peft does, not the whole
model (the base weights did not change): `d` is an adapter folder (`adapter_config.json`, the CSR
tensor file, a model card), with the other adapters of the model in subfolders, plus a
`model.safetensors` of the adapter and head tensors under their names in the model, which is what
`Trainer` reads back when resuming (`resume_from_checkpoint`) or loading the best checkpoint. There
is no `config.json`, so transformers' `from_pretrained(d)` raises instead of returning the base model
without the adapter; `sa.load_pretrained(d)` loads the base model the folder records and the adapters.

Every adapter folder records its base model (`base_model` in adapter_config.json): the name or path
it was loaded from, the model class and config (task head size, labels), the dtype, and the hub
revision or, for a local folder, the SHA-256 of its weight files.
"""

import functools
import hashlib
import json
import os
from typing import Dict, List, Optional, Union

import torch
from torch import nn

from .registry import PREFIX_ROOT, REGISTRY_ATTR
from .slot import SLOT_ATTR

MODEL_FILE = "sparseadapter_model.json"  # which adapters a save_pretrained folder holds, which are active
STATE_FILE = "model.safetensors"  # the adapter and head tensors, for Trainer
MARKER_KEY = "__sparseadapter_adapter_state__"
_HASH_LIMIT = 4 << 30  # base weights hashed up to this total size
_WEIGHT_SUFFIXES = (".safetensors", ".bin")


# -- the base-model record -------------------------------------------------------------------------------
def _weight_files(folder: str) -> List[str]:
    return sorted(
        f
        for f in os.listdir(folder)
        if f.endswith(_WEIGHT_SUFFIXES) and not f.startswith("adapter") and os.path.isfile(os.path.join(folder, f))
    )


def weights_digest(folder: str) -> Optional[str]:
    """SHA-256 over a local model folder's weight files (names and contents, in name order); None when
    there are none or they are larger than _HASH_LIMIT together."""
    files = _weight_files(folder)
    if not files or sum(os.path.getsize(os.path.join(folder, f)) for f in files) > _HASH_LIMIT:
        return None
    digest = hashlib.sha256()
    for name in files:
        digest.update(name.encode() + b"\0")
        with open(os.path.join(folder, name), "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


def _config_dict(config) -> dict:
    data = json.loads(config.to_json_string(use_diff=False))
    # our prefix tuning renames the attention implementation; the base model is loaded with its own
    return {k: v for k, v in data.items() if "attn_implementation" not in k and not k.startswith("_")}


def base_model_record(model: nn.Module) -> Optional[dict]:
    """What the adapter folder says about the base model (None for a model without a Hugging Face config)."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_json_string"):
        return None
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.get_default_dtype())
    name = getattr(model, "name_or_path", None) or getattr(config, "_name_or_path", None) or None
    record = {
        "name_or_path": name,
        "class": type(model).__name__,
        "dtype": str(dtype).replace("torch.", ""),
        "model_type": getattr(config, "model_type", None),
    }
    try:
        record["config"] = _config_dict(config)
    except (TypeError, ValueError):  # a config holding objects JSON cannot spell: the base's own is used
        pass
    revision = getattr(config, "_commit_hash", None)
    if revision:
        record["revision"] = revision
    if name and os.path.isdir(name):
        cache = model.__dict__.setdefault("_sparseadapter_base_digest", {})
        if name not in cache:  # once per model and folder: a Trainer saves many checkpoints
            cache[name] = weights_digest(name)
        if cache[name]:
            record["weights_sha256"] = cache[name]
    try:
        import transformers

        record["transformers_version"] = transformers.__version__
    except ImportError:
        pass
    return record


# -- save_pretrained --------------------------------------------------------------------------------------
def _owned_keys(model: nn.Module) -> List[str]:
    """State-dict keys that are not the frozen base model's: adapters, prefixes, task heads, and any
    parameter that trains."""
    from .api import HEAD_NAMES

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    keys = []
    for key in model.state_dict():
        if (
            f".{SLOT_ATTR}." in f".{key}"
            or key.startswith(PREFIX_ROOT + ".")
            or key.split(".", 1)[0] in HEAD_NAMES
            or key in trainable
        ):
            keys.append(key)
    return keys


def adapter_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The tensors a checkpoint of the model needs (see _owned_keys), with the marker that lets
    `model.load_state_dict` take them without the base model's."""
    state = model.state_dict()
    out = {k: _narrow_index(k, state[k].detach().to("cpu").contiguous().clone()) for k in _owned_keys(model)}
    out[MARKER_KEY] = torch.ones(1, dtype=torch.uint8)
    return out


_INDEX_KEYS = (".crow_indices", ".col_indices")


def _narrow_index(key: str, t: torch.Tensor) -> torch.Tensor:
    """CSR index arrays in int16 when they fit (adapter widths and per-matrix nnz mostly do): a quarter
    less to write per checkpoint; `_adapter_state_pre_hook` widens them back."""
    if (
        key.endswith(_INDEX_KEYS)
        and t.dtype in (torch.int32, torch.int64)
        and (t.numel() == 0 or (int(t.min()) >= 0 and int(t.max()) <= torch.iinfo(torch.int16).max))
    ):
        return t.to(torch.int16)
    return t


def save_pretrained(
    model: nn.Module,
    save_directory: Union[str, os.PathLike],
    is_main_process: bool = True,
    state_dict=None,
    push_to_hub: bool = False,
    **kwargs,
) -> str:
    """Write the model's adapters to `save_directory` (see the module docstring); returns the folder.

    The first active adapter (or the only one) goes to the folder itself, every other adapter to a
    subfolder of its name. Trainer's arguments (`state_dict`, `safe_serialization`, ...) are accepted;
    the tensors always come from the model. A model whose adapters were all deleted saves as a plain
    model (transformers' own save_pretrained).
    """
    from safetensors.torch import save_file

    from .io import atomic_write, save_adapter

    reg = model.__dict__.get(REGISTRY_ATTR)
    if reg is None or not reg.adapters:
        return type(model).save_pretrained(
            model,
            save_directory,
            is_main_process=is_main_process,
            state_dict=state_dict,
            push_to_hub=push_to_hub,
            **kwargs,
        )
    if push_to_hub:
        raise ValueError(
            "save_pretrained: push_to_hub is not supported for sparse adapters; save the folder, "
            "then upload it with huggingface_hub.upload_folder"
        )
    path = os.fspath(save_directory)
    if not is_main_process:
        return path
    if reg.fusions:
        raise ValueError(
            f"save_pretrained: the model has AdapterFusion layers ({', '.join(reg.fusions)}), which "
            "are not saved; save the adapters with sa.save_adapter and keep the fusion weights yourself"
        )
    names = list(reg.adapters)
    main = next((n for n in reg.active if n in reg.adapters), names[0])
    os.makedirs(path, exist_ok=True)
    folders = {}
    for name in [main] + [n for n in names if n != main]:
        folder = path if name == main else os.path.join(path, name)
        save_adapter(model, folder, name, include_head=True)
        folders[name] = "." if name == main else name
    save_file(adapter_state_dict(model), os.path.join(path, STATE_FILE), metadata={"format": "pt"})
    atomic_write(
        os.path.join(path, MODEL_FILE),
        json.dumps(
            {"format": "sparseadapter-model", "version": 1, "adapters": folders, "active": list(reg.active)},
            indent=2,
            sort_keys=True,
        ).encode(),
    )
    return path


# -- what a model with adapters carries: save_pretrained, and load_state_dict of an adapter checkpoint ---
def _adapter_state_pre_hook(
    module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
):
    if prefix == "" and MARKER_KEY in state_dict:
        state_dict.pop(MARKER_KEY)
        module.__dict__["_sparseadapter_loading_adapter_state"] = True
        for key, t in list(state_dict.items()):
            if key.endswith(_INDEX_KEYS) and t.dtype in (torch.uint8, torch.int16):
                state_dict[key] = t.to(torch.int32)  # the library's index type (int64 only beyond int32)


def _adapter_state_post_hook(module, incompatible_keys):
    """An adapter checkpoint leaves out the frozen base model: its keys are not missing."""
    if module.__dict__.pop("_sparseadapter_loading_adapter_state", False):
        owned = set(_owned_keys(module))
        kept = [k for k in incompatible_keys.missing_keys if k in owned]
        incompatible_keys.missing_keys[:] = kept


def install(model: nn.Module) -> None:
    """On a model that gets adapters: `save_pretrained` writes them (an instance attribute, so the class
    and other models are untouched), and `load_state_dict` takes an adapter checkpoint."""
    if callable(getattr(type(model), "save_pretrained", None)) and "save_pretrained" not in model.__dict__:
        model.__dict__["save_pretrained"] = functools.partial(save_pretrained, model)
    if not model.__dict__.get("_sparseadapter_state_hooks"):
        model.register_load_state_dict_pre_hook(_adapter_state_pre_hook)
        model.register_load_state_dict_post_hook(_adapter_state_post_hook)
        model.__dict__["_sparseadapter_state_hooks"] = True


def uninstall(model: nn.Module) -> None:
    """After `unload`: the model saves and loads as a plain model again."""
    if isinstance(model.__dict__.get("save_pretrained"), functools.partial):
        del model.__dict__["save_pretrained"]


# -- load_pretrained --------------------------------------------------------------------------------------
def _read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _transformers_dtype_kw(dtype: torch.dtype) -> dict:
    import transformers

    return {"dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype": dtype}


def load_base_model(
    record: Optional[dict],
    base_model: Optional[str] = None,
    *,
    dtype=None,
    check_base: bool = True,
    **from_pretrained_kwargs,
) -> nn.Module:
    """The base model an adapter folder records (or `base_model`, a name or path, in its place), with
    the recorded config (task head size, labels) and dtype."""
    import transformers

    record = record or {}
    name = base_model or record.get("name_or_path")
    if not name:
        raise ValueError(
            "load_pretrained: the adapter folder does not record its base model (it was saved from "
            "a model not loaded with from_pretrained); pass base_model='name or path'"
        )
    cls_name = record.get("class") or "AutoModelForSequenceClassification"
    cls = getattr(transformers, cls_name, None)
    if cls is None:
        raise ValueError(
            f"load_pretrained: the base model class {cls_name!r} is not in transformers "
            f"{transformers.__version__}; load the base model yourself and use sa.load_adapter"
        )
    kwargs = dict(from_pretrained_kwargs)
    if record.get("config") and "config" not in kwargs:
        # the recorded head size is the saved adapter's (its head replaces the base's, as in `train`): a base
        # checkpoint whose head has another size loads with that head drawn anew, then the adapter's fills it
        kwargs.setdefault("ignore_mismatched_sizes", True)
        config_cls = getattr(cls, "config_class", None) or transformers.AutoConfig
        if config_cls is transformers.AutoConfig:
            kwargs["config"] = transformers.AutoConfig.for_model(**record["config"])
        else:
            kwargs["config"] = config_cls.from_dict(record["config"])
    if dtype is None and record.get("dtype"):
        dtype = getattr(torch, record["dtype"], None)
    if dtype is not None:
        kwargs.update(_transformers_dtype_kw(dtype))
    local = os.path.isdir(os.path.expanduser(str(name)))
    if not local and record.get("revision") and "revision" not in kwargs and base_model is None:
        kwargs["revision"] = record["revision"]
    if check_base and local and record.get("weights_sha256") and base_model is None:
        found = weights_digest(os.path.expanduser(name))
        if found != record["weights_sha256"]:
            raise ValueError(
                f"load_pretrained: the weights in {name} are not those the adapter was saved with "
                f"(sha256 {str(found)[:16]}... != {record['weights_sha256'][:16]}...); the base model "
                "changed. Pass check_base=False to load it anyway"
            )
    model = cls.from_pretrained(os.path.expanduser(str(name)) if local else name, **kwargs)
    return model


def load_pretrained(
    path: Union[str, os.PathLike],
    base_model: Optional[Union[str, nn.Module]] = None,
    *,
    dtype: Optional[torch.dtype] = None,
    device=None,
    check_base: bool = True,
    **from_pretrained_kwargs,
) -> nn.Module:
    """The base model recorded in adapter folder `path` with the adapter (and its task head) loaded, in
    eval mode: one call, as peft's `AutoPeftModel.from_pretrained`.

    `path` is a folder written by `sa.save_adapter`, `model.save_pretrained`, `sparseadapter train` or a
    Trainer checkpoint; a `save_pretrained` folder brings back every adapter it holds and which were
    active. `base_model` replaces the recorded one (a name or path, or a model already loaded, which is
    changed in place). With `check_base`, a local base folder whose weights differ from the recorded
    SHA-256 is refused.
    """
    from .api import set_active_adapters
    from .io import CONFIG_FILE, load_adapter

    path = os.fspath(path)
    config_path = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"load_pretrained: {config_path} does not exist (not an adapter folder)")
    meta = _read_json(config_path)
    if isinstance(base_model, nn.Module):
        model = base_model
    else:
        model = load_base_model(
            meta.get("base_model"), base_model, dtype=dtype, check_base=check_base, **from_pretrained_kwargs
        )
    layout = os.path.join(path, MODEL_FILE)
    if os.path.isfile(layout):
        saved = _read_json(layout)
        folders, active = saved.get("adapters", {}), saved.get("active", [])
    else:
        folders, active = {meta.get("name"): "."}, [meta.get("name")]
    # the folder's own adapter first: the base model was built with its head size, which it takes
    for name, sub in sorted(folders.items(), key=lambda item: os.path.normpath(item[1]) != "."):
        folder = os.path.normpath(os.path.join(path, sub))
        if os.path.dirname(os.path.relpath(folder, path)) not in ("", "."):
            raise ValueError(f"load_pretrained: {layout} names a folder outside {path}: {sub!r}")
        load_adapter(model, folder, name, load_head=True, activate=False)
    set_active_adapters(model, [n for n in active if n in folders])
    if device is not None:
        model.to(device)
    return model.eval()
