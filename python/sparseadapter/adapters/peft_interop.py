"""peft interop for LoRA: `from_peft` imports a peft LoRA folder as a (pruned) sparse adapter, `to_peft`
writes a sparse LoRA back as a peft folder (densified: zeros where pruned).

Both read and write peft's files directly (`adapter_config.json`, `adapter_model.safetensors` with
keys `base_model.model.<module>.lora_A.weight` / `lora_B.weight`, task heads as `modules_to_save`), so
peft itself is needed only to use the folder on the peft side.
"""

import json
import math
import os
import re
from typing import Dict, Iterable, List, Optional

import torch
from torch import nn

from . import heads

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_WEIGHTS_BIN = "adapter_model.bin"
_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<host>.+)\.lora_(?P<which>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")
_TASK_TYPES = (
    ("ForSequenceClassification", "SEQ_CLS"),
    ("ForTokenClassification", "TOKEN_CLS"),
    ("ForQuestionAnswering", "QUESTION_ANS"),
    ("ForCausalLM", "CAUSAL_LM"),
    ("ForConditionalGeneration", "SEQ_2_SEQ_LM"),
    ("ForSeq2SeqLM", "SEQ_2_SEQ_LM"),
)


def _read_peft(path: str):
    config_path = os.path.join(path, PEFT_CONFIG)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"from_peft: {config_path} does not exist (not a peft adapter folder)")
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    if config.get("format") == "sparseadapter":
        raise ValueError(
            f"from_peft: {path} is a sparseadapter folder; load it with sa.load_adapter or sa.load_pretrained"
        )
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise ValueError(f"from_peft: {path} holds a {peft_type} adapter; only peft's LoRA maps onto a sparse adapter")
    unsupported = [(key, config.get(key)) for key in ("use_dora", "lora_bias") if config.get(key)]
    if config.get("bias", "none") != "none":
        unsupported.append(("bias", config["bias"]))
    unsupported += [(key, config[key]) for key in ("rank_pattern", "alpha_pattern") if config.get(key)]
    if unsupported:
        raise ValueError(
            f"from_peft: {path} uses {', '.join(f'{k}={v!r}' for k, v in unsupported)}, which a sparse "
            "LoRA adapter does not have (plain LoRA: one rank and alpha, no DoRA, no trained biases)"
        )
    weights = os.path.join(path, PEFT_WEIGHTS)
    if os.path.isfile(weights):
        from safetensors.torch import load_file

        tensors = load_file(weights)
    elif os.path.isfile(os.path.join(path, PEFT_WEIGHTS_BIN)):
        tensors = torch.load(os.path.join(path, PEFT_WEIGHTS_BIN), map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"from_peft: {path} has neither {PEFT_WEIGHTS} nor {PEFT_WEIGHTS_BIN}")
    return config, {k[len(_PREFIX) :] if k.startswith(_PREFIX) else k: v for k, v in tensors.items()}


def from_peft(
    model: nn.Module,
    peft_dir: str,
    name: str = "default",
    *,
    sparsity: float = 0.0,
    pruner: str = "magnitude",
    scope: str = "layer",
    data: Optional[Iterable] = None,
    loss_fn=None,
    calibration_batches: Optional[int] = None,
    seed: int = 0,
    load_head: bool = True,
    activate: bool = True,
) -> nn.Module:
    """Add the LoRA adapter of peft folder `peft_dir` to `model` (its base model) as adapter `name`,
    pruned once to `sparsity` with `pruner` (default: magnitude per matrix, data-free; SNIP and GraSP
    take `data`), and return the model.

    The peft weights are the starting point: at `sparsity=0` the model computes what the peft model
    computes; pruned, each matrix keeps its highest-scoring weights (`scope="layer"`: a trained B is
    far smaller than A, so a global ranking would empty it). peft's `modules_to_save` task head is
    loaded too (`load_head`). Plain LoRA only: DoRA, trained biases, per-module ranks are refused;
    rsLoRA's scale alpha / sqrt(r) is kept.
    """
    from .api import (
        _prune_adapter,
        attach_adapter,
        build_adapter,
        check_attachable,
        check_new_name,
        freeze_base,
        set_active_adapters,
    )
    from .config import SparseAdapterConfig

    config, tensors = _read_peft(peft_dir)
    check_new_name(model, name)
    pairs: Dict[str, Dict[str, torch.Tensor]] = {}
    others = {}
    for key, t in tensors.items():
        match = _LORA_KEY.match(key)
        if match:
            pairs.setdefault(match["host"], {})[match["which"]] = t
        elif "lora_" in key:
            raise ValueError(
                f"from_peft: {peft_dir} holds {key!r}, a LoRA part a sparse adapter has not "
                "(embedding LoRA, magnitude vectors, ...)"
            )
        else:
            others[key] = t
    if not pairs:
        raise ValueError(f"from_peft: {peft_dir} holds no LoRA weights")
    modules = dict(model.named_modules())
    missing = [h for h in pairs if h not in modules]
    if missing:
        raise ValueError(f"from_peft: the adapter adapts {missing[0]!r}, which this model lacks (another base model?)")
    incomplete = [h for h, p in pairs.items() if set(p) != {"A", "B"}]
    if incomplete:
        raise ValueError(f"from_peft: {incomplete[0]!r} lacks its lora_A or lora_B weight")
    ranks = {p["A"].shape[0] for p in pairs.values()}
    if len(ranks) != 1:
        raise ValueError(f"from_peft: the LoRA matrices have several ranks {sorted(ranks)}; one rank is supported")
    r = ranks.pop()
    alpha = float(config.get("lora_alpha", r))
    if config.get("use_rslora"):
        alpha = alpha * math.sqrt(r)  # peft scales by alpha / sqrt(r); ours is alpha / r
    hosts = [h for h in modules if h in pairs]  # model order
    cfg = SparseAdapterConfig(
        kind="lora",
        bottleneck=r,
        lora_alpha=alpha,
        dropout=float(config.get("lora_dropout", 0.0)),
        lora_targets=[f"^{re.escape(h)}$" for h in hosts],
        sparsity=sparsity,
        pruner=pruner,
        scope=scope,
        seed=seed,
        init="lora",
    )
    parts = build_adapter(model, cfg)
    with torch.no_grad():
        for site, module in parts.modules:
            a, b = pairs[site.host]["A"], pairs[site.host]["B"]
            for layer, t, which in ((module.lora_A, a, "lora_A"), (module.lora_B, b, "lora_B")):
                if tuple(t.shape) != tuple(layer.weight.shape):
                    raise ValueError(
                        f"from_peft: {site.host}.{which} has shape {tuple(t.shape)}, this model's layer "
                        f"needs {tuple(layer.weight.shape)}"
                    )
                layer.weight.copy_(t.to(layer.weight.dtype))
    head_states = _peft_heads(model, others, peft_dir) if load_head else {}
    check_attachable(model, parts, activate)
    planned = heads.plan_head(model, None, seed=seed)  # the adapter's own head (heads.py), as add_adapter's
    attach_adapter(model, name, cfg, parts)
    heads.attach_planned_head(model, name, planned)
    with torch.no_grad():  # into the new adapter's head, never another adapter's
        for state in head_states.values():
            planned.record.module.load_state_dict(state, strict=True)
    if cfg.is_sparse:  # scored through the loaded head
        _prune_adapter(model, name, cfg, data, loss_fn, calibration_batches)
    freeze_base(model)
    if activate:
        set_active_adapters(model, [name])
    return model


def _peft_heads(model: nn.Module, tensors: Dict[str, torch.Tensor], path: str) -> Dict[str, Dict[str, torch.Tensor]]:
    """peft's modules_to_save (the task head), checked against the model's."""
    heads: Dict[str, Dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        key = key.replace(".modules_to_save.default.", ".")
        head, _, param = key.partition(".")
        module = getattr(model, head, None)
        target = module.state_dict().get(param) if isinstance(module, nn.Module) else None
        if target is None:
            raise ValueError(f"from_peft: {path} holds {key!r}, which this model has no place for")
        if target.shape != t.shape:
            raise ValueError(
                f"from_peft: {key} has shape {tuple(t.shape)}, the model's is {tuple(target.shape)} "
                "(another number of labels?)"
            )
        heads.setdefault(head, {})[param] = t.to(target.dtype)
    for head, state in heads.items():
        missing = sorted(set(getattr(model, head).state_dict()) - set(state))
        if missing:
            raise ValueError(f"from_peft: the file's {head!r} lacks {missing[0]!r}")
    return heads


def to_peft(
    model: nn.Module,
    path: str,
    name: Optional[str] = None,
    *,
    include_head: bool = True,
    base_model_name_or_path: Optional[str] = None,
) -> str:
    """Write LoRA adapter `name` (default: the only active one) as a peft LoRA folder at `path`: the
    sparse matrices densified (zeros where pruned), the task head as `modules_to_save`. Loading it
    with `peft.PeftModel.from_pretrained(base, path)` gives the model's outputs. Returns the folder."""
    from safetensors.torch import save_file

    from .modules import dense_weight
    from .placement import is_conv1d
    from .pretrained import base_model_record
    from .registry import entry, registry

    reg = registry(model)
    if name is None:
        if len(reg.active) != 1:
            raise ValueError(f"to_peft: name the adapter to write (active: {reg.active})")
        name = reg.active[0]
    e = entry(model, name)
    if e.config.kind != "lora":
        raise ValueError(f"to_peft: adapter {name!r} is {e.config.kind}; peft's LoRA format holds LoRA adapters only")
    tensors: Dict[str, torch.Tensor] = {}
    hosts: List[str] = []
    conv1d = False
    for site in e.sites["lora"]:
        host = model.get_submodule(site.host)
        slot = host.sparseadapter
        if name in slot.merged:
            raise ValueError(f"to_peft: {name!r} is merged into {site.host!r}; unmerge it first")
        adapter = slot.adapters[name]
        hosts.append(site.host)
        conv1d = conv1d or is_conv1d(host)
        for which in ("lora_A", "lora_B"):
            tensors[f"{_PREFIX}{site.host}.{which}.weight"] = (
                dense_weight(getattr(adapter, which)).detach().to("cpu").contiguous().clone()
            )
    own = heads.saved_heads(model, name) if include_head else []  # the adapter's own head, active or not
    for head, module in own:
        for key, t in module.state_dict().items():
            tensors[f"{_PREFIX}{head}.{key}"] = t.detach().to("cpu").contiguous().clone()
    record = base_model_record(model) or {}
    task_type = next((t for suffix, t in _TASK_TYPES if type(model).__name__.endswith(suffix)), None)
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "r": e.config.effective_bottleneck,
        "lora_alpha": e.config.lora_alpha,
        "lora_dropout": e.config.dropout,
        "target_modules": hosts,
        "bias": "none",
        "fan_in_fan_out": conv1d,
        "modules_to_save": [h for h, _ in own] or None,
        "base_model_name_or_path": base_model_name_or_path or record.get("name_or_path"),
        "revision": record.get("revision"),
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "rank_pattern": {},
        "alpha_pattern": {},
        "layers_to_transform": None,
        "layers_pattern": None,
    }
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, PEFT_WEIGHTS), metadata={"format": "pt"})
    with open(os.path.join(path, PEFT_CONFIG), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    return path
