"""Prefix tuning inside Hugging Face attention, through transformers' AttentionInterface.

The model's attention implementation (sdpa or eager) is wrapped by one that prepends the active
prefixes of the calling module's slot to its keys and values and widens the attention mask to match,
then calls the original implementation. Modules without prefixes pass through unchanged.

The wrapper runs after the attention module has applied rotary embeddings and updated the KV cache,
so the prefixes never enter the cache: every forward, the first of a generation or a cached step,
sees `[prefix, cached keys, new keys]`. Positions, the cache's length and the masks the model builds
stay those of the base model; the prefixes are learned directly as (post-rotary) keys, visible to
every query: causal self-attention, sliding windows, padding and cross-attention alike. They are
built with the module's key/value heads, so grouped-query attention (fewer key/value heads than
query heads) takes them as it takes its own keys.
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


def _widen_mask(attention_mask, n_prefix: int, query, key, module, base: str, is_causal):
    """The attention mask over `[prefix, keys]`: the model's mask with the prefix columns visible.

    Without a mask, sdpa would run its own causal masking (`is_causal`, top-left aligned, which may
    also crop the keys to the queries), which knows nothing of the prefix: the equivalent explicit
    mask is built instead. An eager implementation without a mask masks nothing, nor need we."""
    if attention_mask is not None:
        # prefixes are visible to every query: True in a boolean mask, 0 in an additive one
        fill = True if attention_mask.dtype == torch.bool else 0.0
        return F.pad(attention_mask, (n_prefix, 0), value=fill)
    q_len, kv_len = query.shape[2], key.shape[2]
    causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    if base != "sdpa" or q_len == 1 or not causal:
        return None
    keys = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril()
    prefix = torch.ones(q_len, n_prefix, dtype=torch.bool, device=query.device)
    return torch.cat([prefix, keys], dim=-1)[None, None]


def _widen_mask_rows(attention_mask, valid, query, key, module, base: str, is_causal):
    """The attention mask over `[prefix, keys]` of a routed call, where each row has its own prefix:
    `valid` [batch, L] says which prefix columns a row sees (its adapter's prefix; none for the bare
    model). Always explicit, since rows differ; additive (0 / the dtype's minimum) for eager attention
    or a float mask, boolean for sdpa."""
    batch, n_prefix = valid.shape
    q_len, kv_len = query.shape[2], key.shape[2]
    if attention_mask is None:
        causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
        keys = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device)
        if causal:
            keys = keys.tril(diagonal=kv_len - q_len)  # the last query sees every key
        keys = keys[None, None].expand(batch, 1, q_len, kv_len)
    else:
        keys = (
            attention_mask.expand(batch, *attention_mask.shape[1:]) if attention_mask.shape[0] == 1 else attention_mask
        )
    prefix = valid[:, None, None, :].expand(batch, keys.shape[1], keys.shape[2], n_prefix)
    if keys.dtype == torch.bool and (base == "sdpa" or attention_mask is not None):
        return torch.cat([prefix, keys], dim=-1)
    dtype = keys.dtype if keys.dtype != torch.bool else query.dtype
    lowest = torch.finfo(dtype).min
    if keys.dtype == torch.bool:
        keys = torch.zeros(keys.shape, dtype=dtype, device=query.device).masked_fill(~keys, lowest)
    prefix = torch.zeros(prefix.shape, dtype=dtype, device=query.device).masked_fill(~prefix, lowest)
    return torch.cat([prefix, keys], dim=-1)


def _make_attention(base: str) -> Callable:
    def prefix_attention(module, query, key, value, attention_mask, **kwargs):
        slot = getattr(module, SLOT_ATTR, None)
        routing = slot._routing() if slot is not None else None
        if routing is not None:  # a mixed-adapter call: each row its adapter's prefix
            rows = slot.prefix_kv_rows(routing, key.shape[1], key.shape[-1], key)
            if rows is not None:
                k_rows, v_rows, valid = rows
                attention_mask = _widen_mask_rows(
                    attention_mask, valid, query, key, module, base, kwargs.get("is_causal")
                )
                key = torch.cat([k_rows, key], dim=2)
                value = torch.cat([v_rows.to(value.dtype), value], dim=2)
                if kwargs.get("position_bias") is not None:
                    kwargs["position_bias"] = F.pad(kwargs["position_bias"], (valid.shape[1], 0), value=0.0)
                if base == "sdpa" and kwargs.get("is_causal") is not None:
                    kwargs["is_causal"] = False  # the explicit mask above says it all
            return _base_function(base, module)(module, query, key, value, attention_mask, **kwargs)
        kv = slot.prefix_kv(key.shape[0], key.shape[1], key.shape[-1], key) if slot is not None else None
        if kv is not None:
            n_prefix = kv[0].shape[2]
            attention_mask = _widen_mask(attention_mask, n_prefix, query, key, module, base, kwargs.get("is_causal"))
            key = torch.cat([kv[0], key], dim=2)
            value = torch.cat([kv[1], value], dim=2)
            if kwargs.get("position_bias") is not None:
                # T5's relative position bias covers the keys too; prefixes have no position, so no bias
                kwargs["position_bias"] = F.pad(kwargs["position_bias"], (n_prefix, 0), value=0.0)
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
        raise ValueError(
            f"prefix tuning wraps the 'sdpa' or 'eager' attention; this model uses {current!r} "
            "(load it with attn_implementation='sdpa')"
        )


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
        raise ValueError(
            f"{type(model).__name__} does not let its attention implementation change, which prefix tuning needs"
        )


def uninstall(model: nn.Module) -> None:
    current = model.config._attn_implementation
    if current.startswith(PREFIX):
        model.set_attn_implementation(current[len(PREFIX) :])


def check_attention_module(name: str, module: nn.Module) -> int:
    """The key/value width (key/value heads x head size) of an attention module that can take prefixes."""
    source = inspect.getsource(type(module).forward)
    if "ALL_ATTENTION_FUNCTIONS" not in source:
        raise ValueError(
            f"{type(module).__name__} does not dispatch through transformers' AttentionInterface, "
            "so prefixes cannot be added to it (upgrade transformers to 5.x)"
        )
    config = getattr(module, "config", None)
    if getattr(module, "reorder_and_upcast_attn", False) and getattr(config, "_attn_implementation", None) in (
        "eager",
        PREFIX + "eager",
    ):
        # GPT-2 runs its upcast attention instead of the interface only when the implementation is named
        # "eager"; under the prefix implementation it would silently switch to the plain one
        raise ValueError(
            f"prefix tuning cannot go into {name!r} ({type(module).__name__}) with "
            "reorder_and_upcast_attn=True under eager attention: that attention bypasses the "
            "AttentionInterface; load the model with attn_implementation='sdpa' or set "
            "reorder_and_upcast_attn=False"
        )
    for child in ("key", "k_proj", "k"):
        layer = getattr(module, child, None)
        if isinstance(layer, nn.Linear):
            return layer.out_features
    # a fused query-key-value projection (Phi-3's qkv_proj, GPT-2's c_attn): heads x head size
    head_dim = getattr(module, "head_dim", None)
    heads = (
        getattr(module, "num_key_value_heads", None)
        or getattr(config, "num_key_value_heads", None)
        or getattr(module, "num_heads", None)
        or getattr(config, "num_attention_heads", None)
    )
    if isinstance(head_dim, int) and isinstance(heads, int):
        return heads * head_dim
    raise ValueError(
        f"cannot tell the key/value width of {name!r}: no key projection (key, k_proj, k) and no "
        "head_dim with a number of key/value heads"
    )
