"""CSR helpers for sparse weights: conversion from a dense weight and a mask, and back."""
from typing import Optional, Tuple

import torch
from torch import Tensor

import sparseadapter_ext

_INT32_MAX = torch.iinfo(torch.int32).max


def index_dtype_for(shape: Tuple[int, int], nnz: int) -> torch.dtype:
    """int32 unless nnz or a dimension needs int64 (the DESIGN.md contract)."""
    return torch.int32 if max(shape[0], shape[1], nnz) <= _INT32_MAX else torch.int64


def mask_to_csr(mask: Tensor, index_dtype: Optional[torch.dtype] = None) -> Tuple[Tensor, Tensor]:
    """`(crow_indices, col_indices)` of the nonzeros of a 2-D mask, columns sorted within rows."""
    if mask.dim() != 2:
        raise ValueError(f"mask must be 2-D [out_features, in_features], got shape {tuple(mask.shape)}")
    dtype = index_dtype or index_dtype_for(tuple(mask.shape), int(mask.count_nonzero()))
    return sparseadapter_ext.mask_to_csr(mask, dtype)


def csr_row_indices(crow_indices: Tensor) -> Tensor:
    """The row of every stored entry (COO rows), int64."""
    counts = (crow_indices[1:] - crow_indices[:-1]).long()
    rows = torch.arange(counts.numel(), device=crow_indices.device)
    return torch.repeat_interleave(rows, counts)


def csr_to_dense(crow_indices: Tensor, col_indices: Tensor, values: Tensor, shape: Tuple[int, int]) -> Tensor:
    """The dense weight (differentiable with respect to `values`): for inspection and export only,
    never on a compute path."""
    dense = values.new_zeros(shape)
    return dense.index_put((csr_row_indices(crow_indices), col_indices.long()), values)
