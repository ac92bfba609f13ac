"""Pruning at initialization: score adapter weights once, keep the best, store them as CSR.

`prune` is the entry point; `compute_prune_masks` gives the masks without converting (for studies);
`scores` and `selection` hold the score formulas and the exact-k selection.
"""

from .api import PRUNABLE_ATTR, PruningRecord, compute_prune_masks, find_targets, prune
from .scores import DATA_METHODS, METHODS, compute_masks, compute_scores
from .selection import check_no_empty, erk_densities, keep_count, select_global, select_per_tensor

__all__ = [
    "DATA_METHODS",
    "METHODS",
    "PRUNABLE_ATTR",
    "PruningRecord",
    "check_no_empty",
    "compute_masks",
    "compute_prune_masks",
    "compute_scores",
    "erk_densities",
    "find_targets",
    "keep_count",
    "prune",
    "select_global",
    "select_per_tensor",
]
