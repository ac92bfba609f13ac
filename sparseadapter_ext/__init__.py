"""SparseAdapter's compiled ops: `torch.ops.sparseadapter.*` with typed wrappers, fake kernels and
autograd. This package knows tensors only; modules live in `sparseadapter`."""

import torch  # noqa: F401  (first: _C links against libtorch, which torch loads)

from . import (
    _library,  # first: loads the library (registering torch.ops.sparseadapter) and checks its version
    autocast,  # noqa: F401  (after the library: registers autocast for the ops in autocast.LOWER_PRECISION_OPS)
)
from .multi_pack import MultiPackCache
from .ops import (
    ADAPTER_ACTIVATIONS,
    PATH_MODES,
    PreparedAdapter,
    clear_path_decisions,
    cpu_isa,
    csr_gather,
    csr_row_order,
    csr_to_dense,
    csr_transpose,
    has_cuda_kernels,
    mask_to_csr,
    pack_adapters,
    path_decisions,
    path_mode,
    prune_score,
    sddmm,
    set_path_mode,
    sparse_adapter,
    sparse_adapter_infer,
    sparse_adapter_multi,
    sparse_linear,
    sparse_path_margin,
    spmm,
    topk_masks,
    validate_csr,
)
from .path_cache import install as _install_path_cache
from .path_cache import load_path_decisions, save_path_decisions

_install_path_cache()  # this machine's path measurements in, this process's out at exit
__version__ = _library._C.__version__  # the repository's VERSION, compiled in (setup.py)

__all__ = [
    "__version__",
    "ADAPTER_ACTIVATIONS",
    "PATH_MODES",
    "clear_path_decisions",
    "cpu_isa",
    "csr_gather",
    "csr_row_order",
    "csr_to_dense",
    "csr_transpose",
    "has_cuda_kernels",
    "load_path_decisions",
    "mask_to_csr",
    "MultiPackCache",
    "path_decisions",
    "path_mode",
    "prune_score",
    "save_path_decisions",
    "set_path_mode",
    "sddmm",
    "pack_adapters",
    "PreparedAdapter",
    "sparse_adapter",
    "sparse_adapter_infer",
    "sparse_adapter_multi",
    "sparse_linear",
    "sparse_path_margin",
    "spmm",
    "topk_masks",
    "validate_csr",
]
