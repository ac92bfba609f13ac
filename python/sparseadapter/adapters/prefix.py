"""Prefix tuning inside Hugging Face attention, through transformers' AttentionInterface.

The model's attention implementation (sdpa or eager) is wrapped by one that prepends the active
prefixes of the calling module's slot to its keys and values and widens the attention mask to match,
then calls the original implementation. Modules without prefixes pass through unchanged. Only
non-causal (encoder) self-attention takes prefixes.
"""
import inspect
import sys
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .slot import SLOT_ATTR

WRAPPED = {"sdpa", "eager"}
PREFIX = "sparseadapter_prefix_"


def _base_function(base: str, module: nn.Module) -> Callable:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if base == "eager":  # each model family defines its own eager function
        fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if fn is None:
            raise RuntimeError(f"sparseadapter: {type(module).__name__} has no eager_attention_forward")
        return fn
    return ALL_ATTENTION_FUNCTIONS[base]


def _make_attention(base: str) -> Callable:
    def prefix_attention(module, query, key, value, attention_mask, **kwargs):
        slot = getattr(module, SLOT_ATTR, None)
        kv = slot.prefix_kv(key.shape[0], key.shape[1], key.shape[-1], key) if slot is not None else None
        if kv is not None:
            key = torch.cat([kv[0], key], dim=2)
            value = torch.cat([kv[1], value], dim=2)
            if attention_mask is not None:
                # prefixes are visible to every query: True in a boolean mask, 0 in an additive one
                fill = True if attention_mask.dtype == torch.bool else 0.0
                attention_mask = F.pad(attention_mask, (kv[0].shape[2], 0), value=fill)
            if kwargs.get("position_bias") is not None:
                # T5's relative position bias covers the keys too; prefixes have no position, so no bias
                kwargs["position_bias"] = F.pad(kwargs["position_bias"], (kv[0].shape[2], 0), value=0.0)
        return _base_function(base, module)(module, query, key, value, attention_mask, **kwargs)

    return prefix_attention


def check_installable(model: nn.Module) -> None:
    """Raise, before anything changes, if `install` would refuse this model."""
    try:
        import transformers.masking_utils  # noqa: F401
        from transformers import AttentionInterface  # noqa: F401
    except ImportError as err:
        raise ValueError("prefix tuning needs transformers >= 5 (its AttentionInterface)") from err
    current = model.config._attn_implementation
    if not current.startswith(PREFIX) and current not in WRAPPED:
        raise ValueError(f"prefix tuning wraps the 'sdpa' or 'eager' attention; this model uses {current!r} "
                         "(load it with attn_implementation='sdpa')")


def install(model: nn.Module) -> None:
    """Switch `model` to the prefix-aware attention (idempotent)."""
    check_installable(model)
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    current = model.config._attn_implementation
    if current.startswith(PREFIX):
        return
    name = PREFIX + current
    AttentionInterface.register(name, _make_attention(current))
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[current])
    model.set_attn_implementation(name)
    if model.config._attn_implementation != name:
        raise ValueError(f"{type(model).__name__} does not let its attention implementation change, which prefix "
                         "tuning needs")


def uninstall(model: nn.Module) -> None:
    current = model.config._attn_implementation
    if current.startswith(PREFIX):
        model.set_attn_implementation(current[len(PREFIX):])


def check_attention_module(name: str, module: nn.Module) -> int:
    """The key/value width of a self-attention module that can take prefixes."""
    if getattr(module, "is_causal", False) or getattr(module, "is_decoder", False):
        raise ValueError(f"prefix tuning here covers encoder self-attention; {name!r} is causal")
    source = inspect.getsource(type(module).forward)
    if "ALL_ATTENTION_FUNCTIONS" not in source:
        raise ValueError(f"{type(module).__name__} does not dispatch through transformers' AttentionInterface, "
                         "so prefixes cannot be added to it (upgrade transformers to 5.x)")
    for child in ("key", "k_proj", "k"):
        layer = getattr(module, child, None)
        if isinstance(layer, nn.Linear):
            return layer.out_features
    raise ValueError(f"cannot find the key projection of {name!r} (looked for key, k_proj, k)")
