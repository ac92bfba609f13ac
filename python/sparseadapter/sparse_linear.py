"""SparseLinear: a CSR-backed drop-in for nn.Linear whose pattern is fixed and whose values train."""
import math
from typing import Optional, Union

import torch
from torch import Tensor, nn

import sparseadapter_ext

from .csr import csr_to_dense, mask_to_csr

# Buffers derived from the pattern alone: rebuilt whenever the pattern changes, never saved.
_DERIVED_BUFFERS = ("row_order", "crow_indices_t", "col_indices_t", "perm_t", "row_order_t")


class SparseLinear(nn.Module):
    """`y = x @ W.T + bias` with `W` of shape `[out_features, in_features]` stored as CSR.

    `values` (nnz) is the only weight parameter; `crow_indices` and `col_indices` are buffers, so the
    sparsity pattern never changes in training. The transposed pattern and the row orders used by
    the backward pass and the CUDA kernels are computed once per pattern.
    """

    __jit_unused_properties__ = ["nnz", "sparsity", "density"]

    def __init__(
        self,
        in_features: int,
        out_features: int,
        crow_indices: Tensor,
        col_indices: Tensor,
        values: Optional[Tensor] = None,
        bias: Union[Tensor, bool, None] = True,
        *,
        validate: bool = True,
    ) -> None:
        super().__init__()
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        if validate:
            sparseadapter_ext.validate_csr(crow_indices, col_indices, self.out_features, self.in_features)
        device = crow_indices.device
        if values is None:
            # nn.Linear's default scale: uniform in +-1/sqrt(in_features).
            bound = 1.0 / math.sqrt(self.in_features) if self.in_features > 0 else 0.0
            values = torch.empty(col_indices.numel(), device=device).uniform_(-bound, bound)
        elif values.shape != col_indices.shape:
            raise ValueError(
                f"values has shape {tuple(values.shape)} but the pattern has nnz = {col_indices.numel()}")
        elif values.device != device:
            raise ValueError(f"values is on {values.device} but the pattern is on {device}")
        self.values = nn.Parameter(values.detach().clone())
        if isinstance(bias, bool):
            bias = torch.zeros(self.out_features, dtype=values.dtype, device=device) if bias else None
        if bias is not None:
            if bias.shape != (self.out_features,):
                raise ValueError(f"bias must have shape ({self.out_features},), got {tuple(bias.shape)}")
            if bias.device != device:
                raise ValueError(f"bias is on {bias.device} but the pattern is on {device}")
            self.bias = nn.Parameter(bias.detach().clone())
        else:
            self.register_parameter("bias", None)
        self.register_buffer("crow_indices", crow_indices.detach().clone())
        self.register_buffer("col_indices", col_indices.detach().clone())
        for name in _DERIVED_BUFFERS:
            self.register_buffer(name, torch.empty(0, dtype=crow_indices.dtype, device=device), persistent=False)
        self._build_derived_buffers()

    @classmethod
    def from_dense(
        cls,
        weight: Tensor,
        mask: Tensor,
        bias: Optional[Tensor] = None,
        *,
        index_dtype: Optional[torch.dtype] = None,
    ) -> "SparseLinear":
        """Keep `weight[mask]`. `weight` is an nn.Linear weight `[out_features, in_features]`; `mask`
        has the same shape (bool, or nonzero = keep). The layer lives on weight's device and dtype;
        mask and bias are moved there."""
        if weight.dim() != 2:
            raise ValueError(f"weight must be 2-D [out_features, in_features], got shape {tuple(weight.shape)}")
        if mask.shape != weight.shape:
            raise ValueError(f"mask has shape {tuple(mask.shape)} but weight has shape {tuple(weight.shape)}")
        keep = (mask if mask.dtype == torch.bool else mask != 0).to(weight.device)
        crow, col = mask_to_csr(keep, index_dtype)
        out_features, in_features = weight.shape
        if bias is not None:
            bias = bias.to(weight.device, weight.dtype)
        return cls(in_features, out_features, crow, col, weight.detach()[keep], bias, validate=False)

    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            return torch.ops.sparseadapter.sparse_linear(
                x, self.values, self.bias, self.crow_indices, self.col_indices, self.row_order,
                self.crow_indices_t, self.col_indices_t, self.perm_t, self.row_order_t,
            )
        return self._forward_python(x)

    @torch.jit.unused
    def _forward_python(self, x: Tensor) -> Tensor:
        """Through the Python wrapper, whose eager autograd costs less host time per call."""
        return sparseadapter_ext.sparse_linear(
            x, self.values, self.bias, self.crow_indices, self.col_indices, self.row_order,
            self.crow_indices_t, self.col_indices_t, self.perm_t, self.row_order_t,
        )

    def csr_buffers(self):
        """`(values, bias, crow_indices, col_indices, crow_indices_t, col_indices_t, perm_t, row_order_t)`:
        this layer as one projection of `sparseadapter_ext.sparse_adapter`."""
        return (self.values, self.bias, self.crow_indices, self.col_indices, self.crow_indices_t,
                self.col_indices_t, self.perm_t, self.row_order_t)

    def to_dense(self) -> Tensor:
        """The dense weight `[out_features, in_features]`, zeros where pruned."""
        return csr_to_dense(self.crow_indices, self.col_indices, self.values, (self.out_features, self.in_features))

    @property
    def nnz(self) -> int:
        return self.col_indices.numel()

    @property
    def density(self) -> float:
        total = self.out_features * self.in_features
        return self.nnz / total if total else 1.0

    @property
    def sparsity(self) -> float:
        """Fraction of weights removed (0.9 = 90% zeros)."""
        return 1.0 - self.density

    def validate(self) -> None:
        """The full O(nnz) check of the pattern; raises ValueError naming the problem."""
        sparseadapter_ext.validate_csr(self.crow_indices, self.col_indices, self.out_features, self.in_features)
        if self.values.numel() != self.nnz:
            raise ValueError(f"values has {self.values.numel()} entries but the pattern has nnz = {self.nnz}")

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"sparsity={self.sparsity:.3f}, nnz={self.nnz}, bias={self.bias is not None}")

    def _build_derived_buffers(self) -> None:
        crow_t, col_t, perm_t = sparseadapter_ext.csr_transpose(self.crow_indices, self.col_indices, self.in_features)
        self.row_order = sparseadapter_ext.csr_row_order(self.crow_indices)
        self.crow_indices_t, self.col_indices_t, self.perm_t = crow_t, col_t, perm_t
        self.row_order_t = sparseadapter_ext.csr_row_order(crow_t)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # A saved module may carry another pattern (another nnz): check it whole, then adopt its
        # shapes so the copy below fits. A bad pattern is reported and leaves the module untouched.
        crow = state_dict.get(prefix + "crow_indices")
        col = state_dict.get(prefix + "col_indices")
        values = state_dict.get(prefix + "values")
        new_pattern = crow is not None and col is not None and values is not None
        if (crow is not None or col is not None) and not new_pattern:
            # values alone keep the pattern; new indices without all three would pair a pattern with
            # values it was not made for
            given = [k for k, v in (("crow_indices", crow), ("col_indices", col), ("values", values)) if v is not None]
            error_msgs.append(f"{prefix or 'SparseLinear'}: a new sparse pattern loads whole: crow_indices, "
                              f"col_indices and values together (the state_dict has only {', '.join(given)})")
            return
        if new_pattern:
            try:
                sparseadapter_ext.validate_csr(crow, col, self.out_features, self.in_features)
                if values.shape != col.shape:
                    raise ValueError(f"values has shape {tuple(values.shape)} but the pattern has nnz = {col.numel()}")
            except (ValueError, TypeError, RuntimeError) as err:
                error_msgs.append(f"{prefix or 'SparseLinear'}: invalid sparse pattern in state_dict: {err}")
                return
            device = self.crow_indices.device
            self.crow_indices = torch.empty_like(crow, device=device)
            self.col_indices = torch.empty_like(col, device=device)
            self.values.data = torch.empty(values.shape, dtype=self.values.dtype, device=self.values.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        if new_pattern:
            self._build_derived_buffers()
