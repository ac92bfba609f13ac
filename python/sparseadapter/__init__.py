"""SparseAdapter: sparse adapters with real CSR kernels.

The compiled ops live in `sparseadapter_ext` (torch.ops.sparseadapter); this package holds what users
touch: `SparseLinear` and the CSR helpers, pruning at initialization (`prune`); adapters and training
as they land.
"""
from .csr import csr_to_dense, mask_to_csr
from .pruning import PruningRecord, compute_prune_masks, prune
from .sparse_linear import SparseLinear

__version__ = "0.1.0"

__all__ = [
    "PruningRecord", "SparseLinear", "compute_prune_masks", "csr_to_dense", "mask_to_csr", "prune", "__version__",
]
