"""SparseAdapter: sparse adapters with real CSR kernels.

The compiled ops live in `sparseadapter_ext` (torch.ops.sparseadapter); this package holds what users
touch: `SparseLinear` and the CSR helpers, pruning at initialization (`prune`), and adapters on
Hugging Face models (`add_adapter`, `save_adapter`, ...).
"""
from .adapters import (
    SparseAdapterConfig, active_adapters, add_adapter, add_fusion, clear_target_normalization, delete_adapter,
    disable_adapter, fold_prefix, from_peft, load_adapter, load_pretrained, merge, parameter_budget,
    per_row_adapters, print_trainable_parameters, pruning_record, save_adapter, set_active_adapters, set_active_fusion,
    set_target_normalization, target_normalization, to_peft, train_adapter, train_fusion, trainable_parameters,
    unload, unmerge, write_model_card,
)
from .adapters import HeadConfig, adapter_head, head_info, set_head_info
from .csr import csr_to_dense, mask_to_csr
from .pruning import PruningRecord, compute_prune_masks, prune
from .sparse_linear import SparseLinear
from .version import __version__

__all__ = [
    "HeadConfig", "adapter_head", "head_info", "set_head_info",
    "PruningRecord", "SparseAdapterConfig", "SparseLinear", "__version__", "active_adapters", "add_adapter",
    "add_fusion", "clear_target_normalization", "compute_prune_masks", "csr_to_dense", "delete_adapter",
    "disable_adapter", "fold_prefix", "from_peft", "load_adapter", "load_pretrained", "mask_to_csr", "merge",
    "parameter_budget", "per_row_adapters", "print_trainable_parameters", "prune", "pruning_record", "save_adapter",
    "set_active_adapters", "set_active_fusion", "set_target_normalization", "target_normalization", "to_peft",
    "train_adapter", "train_fusion", "trainable_parameters", "unload", "unmerge", "write_model_card",
]
