"""SparseAdapter's compiled ops: `torch.ops.sparseadapter.*` with typed wrappers, fake kernels and
autograd. This package knows tensors only; modules live in `sparseadapter`."""

import torch  # noqa: F401  (first: _C links against libtorch, which torch loads)

from . import (
    _C,  # noqa: F401  (loading the library registers torch.ops.sparseadapter)
    autocast,  # noqa: E402,F401  (after ops: registers autocast for the ops in autocast.LOWER_PRECISION_OPS)
)
from .ops import (
    ADAPTER_ACTIVATIONS,
    PATH_MODES,
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
    sparse_adapter_multi,
    sparse_linear,
    spmm,
    topk_masks,
    validate_csr,
)
from .path_cache import install as _install_path_cache
from .path_cache import load_path_decisions, save_path_decisions

_install_path_cache()  # this machine's path measurements in, this process's out at exit
if not hasattr(_C, "__version__"):
    raise ImportError(
        f"{_C.__file__} was built from older sources than this package; rebuild it "
        "(bash scripts/install.sh, or python setup.py build_ext --inplace)"
    )
__version__ = _C.__version__  # the repository's VERSION, compiled in (setup.py)

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
    "path_decisions",
    "path_mode",
    "prune_score",
    "save_path_decisions",
    "set_path_mode",
    "sddmm",
    "pack_adapters",
    "sparse_adapter",
    "sparse_adapter_multi",
    "sparse_linear",
    "spmm",
    "topk_masks",
    "validate_csr",
]
