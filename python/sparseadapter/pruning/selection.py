"""Exact-k selection of the weights to keep, from scores (higher score = keep).

These functions are the reference semantics; the fused selection kernels must give the same masks.

Semantics, exactly:

- Counts. `keep_count(total, sparsity) = round((1.0 - sparsity) * total)`, evaluated in IEEE double
  and rounded half to even (Python's `round`; C++ `std::nearbyint` in the default rounding mode).
  Global selection keeps exactly `keep_count(sum of numel, sparsity)` entries over all tensors
  together; per-tensor selection keeps exactly `round(density * numel)` in each tensor.
- Order. Scores are compared as float64 real numbers (every float dtype converts exactly;
  -0.0 == +0.0). The kept entries are the k largest.
- Ties. Among equal scores, the entry that comes first in (mapping iteration order, then row-major
  flat index within the tensor) is kept. Equivalently: sort by (score descending, tensor position
  ascending, flat index ascending) and keep the first k.
- Scores must be finite: NaN or +-Inf anywhere raises ValueError naming the tensor.
- Masks are bool tensors with the scores' shapes, each on its scores' device.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

import torch
from torch import Tensor

import sparseadapter_ext


def keep_count(total: int, sparsity: float) -> int:
    """How many of `total` weights survive at `sparsity` (the fraction removed):
    `round((1 - sparsity) * total)`, rounded half to even."""
    if isinstance(total, bool) or not isinstance(total, int) or total < 0:
        raise ValueError(f"total must be a non-negative int, got {total!r}")
    sparsity = check_fraction(sparsity, "sparsity")
    if not sparsity < 1.0:
        raise ValueError(f"sparsity must satisfy 0 <= sparsity < 1 (the fraction removed), got {sparsity}")
    return int(round((1.0 - sparsity) * total))


def select_global(scores: Mapping[str, Tensor], sparsity: float) -> dict[str, Tensor]:
    """Keep the `keep_count(total, sparsity)` highest scores over all tensors together.

    One threshold for all tensors: a tensor may end up with no kept weight if its scores are all
    low (e.g. all zero); see `check_no_empty`. Tie-breaking as in the module docstring."""
    flats = validated_flats(scores)
    total = sum(f.numel() for f in flats)
    return select_global_k(scores, flats, keep_count(total, sparsity))


def select_per_tensor(scores: Mapping[str, Tensor], densities: Mapping[str, float]) -> dict[str, Tensor]:
    """Keep exactly `round(densities[name] * numel)` highest scores in each tensor (0 <= density <= 1).

    `densities` must have exactly the keys of `scores`."""
    flats = validated_flats(scores)
    missing = [n for n in scores if n not in densities]
    extra = [n for n in densities if n not in scores]
    if missing or extra:
        raise ValueError(f"densities must name exactly the scored tensors; missing {missing}, unknown {extra}")
    ks = []
    for name, flat in zip(scores, flats):
        d = check_fraction(densities[name], f"density of {name!r}")
        ks.append(int(round(d * flat.numel())))
    return select_per_tensor_k(scores, flats, ks)


def check_no_empty(masks: Mapping[str, Tensor]) -> None:
    """Raise ValueError naming every non-empty matrix whose mask keeps nothing, when anything at all
    is kept (an overall density of 0 is what the user asked for; a single emptied matrix is not)."""
    kept = {name: int(m.count_nonzero()) for name, m in masks.items()}
    if sum(kept.values()) == 0:
        return
    empty = [name for name, m in masks.items() if m.numel() > 0 and kept[name] == 0]
    if empty:
        raise ValueError(
            f"pruning would remove every weight of {empty} while keeping weights elsewhere. All-zero "
            "scores usually mean a zero-initialized matrix (LoRA's B, an up-projection at 0): its "
            "magnitude scores are zero, and for SNIP/GraSP its partner matrix's scores are zero too, so "
            "a global threshold drops it whole. Initialize the adapters with small random values "
            "(e.g. N(0, 0.02)) before pruning, or use scope='layer'."
        )


def erk_densities(shapes: Mapping[str, Sequence[int]], sparsity: float) -> dict[str, float]:
    """Erdos-Renyi-Kernel densities (Evci et al. 2020, "Rigging the Lottery: Making All Tickets
    Winners", Sec. 3 / Appendix; RigL's `get_sparsities_erdos_renyi`).

    The density of tensor l is `eps * sum(shape_l) / prod(shape_l)`; for an nn.Linear weight
    [n_out, n_in] that is `eps * (n_in + n_out) / (n_in * n_out)`. `eps` is chosen so the kept
    counts add up to `K = keep_count(total, sparsity)`. A tensor whose density would exceed 1 is made
    dense and `eps` is re-solved for the rest, until no density exceeds 1 (making a tensor dense only
    frees budget, so every tensor over 1 can be fixed in the same pass).

    To keep exactly K weights in all, the real targets `eps * raw_l * numel_l` are apportioned to
    integers by largest remainder (ties: the earlier tensor wins) and the returned density is
    `count_l / numel_l`, so `select_per_tensor` keeps exactly `count_l` in tensor l and K in total.
    Empty tensors get density 1.0 (they keep nothing either way)."""
    names = list(shapes)
    numel = {n: math.prod(int(s) for s in shapes[n]) for n in names}
    if any(v < 0 for v in numel.values()):
        raise ValueError(f"shapes must be non-negative, got {dict(shapes)}")
    k_total = keep_count(sum(numel.values()), sparsity)
    live = [n for n in names if numel[n] > 0]
    raw = {n: sum(int(s) for s in shapes[n]) / numel[n] for n in live}

    dense: set[str] = set()
    eps = 0.0
    while True:
        rest = [n for n in live if n not in dense]
        if not rest:
            break
        budget = k_total - sum(numel[n] for n in dense)
        eps = max(budget, 0) / sum(raw[n] * numel[n] for n in rest)
        over = [n for n in rest if eps * raw[n] > 1.0]
        if not over:
            break
        dense.update(over)

    target = {n: float(numel[n]) if n in dense else eps * raw[n] * numel[n] for n in live}
    count = {n: min(numel[n], int(math.floor(target[n]))) for n in live}
    left = k_total - sum(count.values())
    # Largest remainder first; sorted() is stable, so equal remainders go in mapping order.
    for n in sorted((n for n in live if count[n] < numel[n]), key=lambda n: -(target[n] - count[n])):
        if left <= 0:
            break
        count[n] += 1
        left -= 1
    return {n: (count[n] / numel[n] if numel[n] > 0 else 1.0) for n in names}


# ----------------------------------------------------------------------------------------------------
# Helpers shared with scores.compute_masks (which also restricts later rounds to the kept entries).


def check_fraction(x: float, what: str) -> float:
    """x as a float in [0, 1]; a ValueError naming `what` otherwise."""
    try:
        x = float(x)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number, got {x!r}") from None
    if not 0.0 <= x <= 1.0:  # also rejects NaN
        raise ValueError(f"{what} must be in [0, 1], got {x}")
    return x


def validated_flats(scores: Mapping[str, Tensor]) -> list[Tensor]:
    """Flat float64 views of the scores, after checking they are finite floating tensors."""
    flats = []
    for name, s in scores.items():
        if not isinstance(s, Tensor) or not s.is_floating_point():
            raise ValueError(
                f"scores for {name!r} must be a floating-point tensor, got {getattr(s, 'dtype', type(s).__name__)}"
            )
        if s.numel() and not bool(torch.isfinite(s).all()):
            raise ValueError(
                f"scores for {name!r} contain NaN or Inf; cannot rank them "
                "(check the loss and the weights for overflow)"
            )
        flats.append(s.detach().reshape(-1).to(torch.float64))
    return flats


def _top_k(flat: Tensor, k: int, eligible: Optional[Tensor] = None) -> Tensor:
    """Bool mask of the k largest entries of a 1-D float64 tensor; ties go to the lower index.
    Entries where `eligible` is False are never kept (k must not exceed the eligible count)."""
    return select_global_k({"": flat}, [flat], k, None if eligible is None else {"": eligible})[""]


def select_global_k(
    scores: Mapping[str, Tensor], flats: list[Tensor], k: int, eligible: Optional[Mapping[str, Tensor]] = None
) -> dict[str, Tensor]:
    """The k largest over all tensors with the fused radix-select kernel (`topk_masks`), which keeps
    the tie rule of the module docstring and never concatenates the tensors."""
    if not flats:
        return {}
    device = flats[0].device
    flats = [f.to(device) for f in flats]
    if eligible is not None:  # never-eligible entries rank below every finite score
        flats = [f.masked_fill(~eligible[n].reshape(-1).to(device), -math.inf) for n, f in zip(scores, flats)]
    keep = sparseadapter_ext.topk_masks(flats, k)
    return {name: m.view(s.shape).to(s.device) for (name, s), m in zip(scores.items(), keep)}


def select_per_tensor_k(
    scores: Mapping[str, Tensor],
    flats: list[Tensor],
    ks: Sequence[int],
    eligible: Optional[Mapping[str, Tensor]] = None,
) -> dict[str, Tensor]:
    """The ks[i] largest of each tensor on its own, with the same tie rule."""
    out = {}
    for (name, s), f, k in zip(scores.items(), flats, ks):
        elig = None if eligible is None else eligible[name].reshape(-1).to(f.device)
        out[name] = _top_k(f, k, elig).view(s.shape)
    return out
