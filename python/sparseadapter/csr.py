"""CSR helpers for sparse weights: conversion from a dense weight and a mask, and back."""

from typing import Optional, Tuple

import torch
from torch import Tensor

import sparseadapter_ext

_INT32_MAX = torch.iinfo(torch.int32).max


def index_dtype_for(shape: Tuple[int, int], nnz: int) -> torch.dtype:
    """int32 unless nnz or a dimension needs int64 (the index rule of docs/design.md)."""
    return torch.int32 if max(shape[0], shape[1], nnz) <= _INT32_MAX else torch.int64


def mask_to_csr(mask: Tensor, index_dtype: Optional[torch.dtype] = None) -> Tuple[Tensor, Tensor]:
    """`(crow_indices, col_indices)` of the nonzeros of a 2-D mask, columns sorted within rows."""
    if mask.dim() != 2:
        raise ValueError(f"mask must be 2-D [out_features, in_features], got shape {tuple(mask.shape)}")
    dtype = index_dtype or index_dtype_for(tuple(mask.shape), int(mask.count_nonzero()))
    return sparseadapter_ext.mask_to_csr(mask, dtype)


def csr_to_dense(crow_indices: Tensor, col_indices: Tensor, values: Tensor, shape: Tuple[int, int]) -> Tensor:
    """The dense weight (differentiable with respect to `values`)."""
    if crow_indices.numel() != shape[0] + 1:
        raise ValueError(
            f"shape {tuple(shape)} has {shape[0]} rows but crow_indices has {crow_indices.numel()} entries"
        )
    return sparseadapter_ext.csr_to_dense(values, crow_indices, col_indices, shape[1])
