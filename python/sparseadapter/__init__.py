"""SparseAdapter: sparse adapters with real CSR kernels.

The compiled ops live in `sparseadapter_ext` (torch.ops.sparseadapter); this package holds what users
touch: `SparseLinear` and the CSR helpers today, adapters, pruning and training as they land.
"""
from .csr import csr_to_dense, mask_to_csr
from .sparse_linear import SparseLinear

__version__ = "0.1.0"

__all__ = ["SparseLinear", "csr_to_dense", "mask_to_csr", "__version__"]
