"""Sparse adapters on real models: Houlsby, Pfeiffer, parallel, LoRA, prefix tuning, MAM, AdapterFusion."""

from .api import (
    active_adapters,
    adapter_modules,
    add_adapter,
    add_fusion,
    delete_adapter,
    disable_adapter,
    fold_prefix,
    merge,
    per_row_adapters,
    pruning_record,
    set_active_adapters,
    set_active_fusion,
    train_adapter,
    train_fusion,
    unload,
    unmerge,
)
from .card import write_model_card
from .config import KINDS, SparseAdapterConfig
from .head import clear_target_normalization, set_target_normalization, target_normalization, target_stats
from .heads import HeadConfig, adapter_head, head_info, set_head_info
from .io import load_adapter, save_adapter
from .modules import AdapterFusion, BottleneckAdapter, LoRAAdapter, PrefixGenerator
from .peft_interop import from_peft, to_peft
from .pretrained import load_pretrained, save_pretrained
from .summary import parameter_budget, print_trainable_parameters, trainable_parameters

__all__ = [
    "AdapterFusion",
    "BottleneckAdapter",
    "HeadConfig",
    "adapter_head",
    "head_info",
    "set_head_info",
    "KINDS",
    "LoRAAdapter",
    "PrefixGenerator",
    "SparseAdapterConfig",
    "active_adapters",
    "adapter_modules",
    "add_adapter",
    "add_fusion",
    "clear_target_normalization",
    "delete_adapter",
    "disable_adapter",
    "fold_prefix",
    "from_peft",
    "load_adapter",
    "load_pretrained",
    "merge",
    "parameter_budget",
    "per_row_adapters",
    "pruning_record",
    "print_trainable_parameters",
    "save_adapter",
    "save_pretrained",
    "set_active_adapters",
    "set_active_fusion",
    "set_target_normalization",
    "target_normalization",
    "target_stats",
    "to_peft",
    "train_adapter",
    "train_fusion",
    "trainable_parameters",
    "unload",
    "unmerge",
    "write_model_card",
]
