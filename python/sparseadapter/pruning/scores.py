"""Pruning-at-initialization scores (higher score = keep) and the masks they give.

`compute_scores` gives one score tensor per weight; `compute_masks` runs the exact-k selection of
`selection.py` on them, in one shot or over several rounds. These are the reference semantics for
the fused kernels.

Conventions shared by every method:

- `weights` is an ordered mapping name -> the live Parameter of each weight matrix. Nothing about
  them is changed when a function returns, also on error: values, `requires_grad` and `.grad` are
  restored. Gradients are taken with `torch.autograd.grad` with respect to these weights only, so no
  other parameter's `.grad` is touched.
- `masks` (optional, name -> bool, missing = all kept) scores the masked network `w * mask`; pruned
  entries then score 0 (random: the uniform score times the mask). `compute_masks` never brings a
  pruned entry back, whatever its score.
- Scores come back on the weights' device, float64 for float64 weights and for synflow, else float32.
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import sparseadapter_ext

from .selection import check_fraction, erk_densities, keep_count, select_global_k, select_per_tensor_k, validated_flats

METHODS = ("random", "magnitude", "snip", "grasp", "synflow")
DATA_METHODS = ("snip", "grasp")
SCOPES = ("global", "layer")
SYNFLOW_ROUNDS = 100


def compute_scores(
    method: str,
    weights: Mapping[str, nn.Parameter],
    *,
    loss_closure: Optional[Callable[[object], Tensor]] = None,
    data: Optional[Iterable] = None,
    chains: Optional[Sequence[Sequence[str]]] = None,
    seed: int = 0,
    masks: Optional[Mapping[str, Tensor]] = None,
) -> dict[str, Tensor]:
    """Score every weight; higher = keep.

    - "random": `U[0, 1)` drawn in float32 from one CPU `torch.Generator` seeded with `seed`, one
      tensor after another in mapping order, then moved to the weight's device (so the scores do not
      depend on the device).
    - "magnitude": `|w|`.
    - "snip" (Lee et al. 2019, "SNIP: Single-shot Network Pruning based on Connection Sensitivity",
      eq. 6 up to the normalization, which does not change the ranking): `|g * w|`, with
      `g = sum over batches of dL(batch)/dw`.
    - "grasp" (Wang et al. 2020, "Picking Winning Tickets Before Training by Preserving Gradient
      Flow", eq. 8): keep-score `w * (H g)`, with `g` the summed gradient of a first pass (detached)
      and `H g = sum over batches of d/dw (g . dL(batch)/dw)` (double backward).
      Sign: the gradient norm is `G = ||g||^2`, `dG/dw = 2 H g`, so setting weight i to zero
      (a step of `-w_i`) changes it by about `-2 w_i (H g)_i`. GraSP scores `S(-w) = -w * Hg` and
      removes the highest S: the weights whose removal reduces the gradient norm least (or raises it
      most). Keeping the highest `w * Hg` (Synaptic-Flow's form) is the same selection: a kept weight
      is one whose removal would reduce the gradient flow most. Scores can be negative.
    - "synflow" (Tanaka et al. 2020, "Pruning neural networks without any data by iteratively
      conserving synaptic flow", eq. 2): data-free. On float64 copies `A = |w| (* mask)`,
      `R = sum over chains of 1^T A_K ... A_1 1` (nn.Linear layout [out, in]: start from ones(in_1),
      multiply by A_1, ..., A_K, sum). The score is `A * dR/dA`, i.e. for layer k of a chain
      `score[a, b] = (1^T A_K ... A_{k+1})[a] * A_k[a, b] * (A_{k-1} ... A_1 1)[b]`: the summed
      product of |w| over every input-to-output path through that weight. `chains` lists the weight
      names of each chain in forward order; a weight in no chain is a chain of its own. Within a chain
      the summed scores of every layer equal that chain's R (conservation).

    `loss_closure(batch)` returns a scalar loss, evaluated in whatever mode the caller set the model
    to (eval mode makes SNIP/GraSP deterministic); `data` is an iterable of batches (GraSP reads it
    twice, so a one-shot iterator is materialized into a list).
    """
    if method not in METHODS:
        raise ValueError(f"unknown pruning method {method!r}; choose one of {', '.join(METHODS)}")
    _check_weights(weights)
    masks = _check_masks(masks, weights)
    if method in DATA_METHODS:
        data = _require_data(method, loss_closure, data)

    if method == "random":
        gen = torch.Generator().manual_seed(int(seed))
        out = {}
        for name, w in weights.items():
            s = torch.rand(tuple(w.shape), generator=gen, dtype=torch.float32).to(w.device)
            out[name] = s * masks[name] if name in masks else s
        return out
    if method == "magnitude":
        return {
            name: sparseadapter_ext.prune_score(_masked(w.detach(), masks.get(name)), None, None, "magnitude")
            for name, w in weights.items()
        }
    if method == "synflow":
        return _synflow(weights, chains, masks)
    return _with_weights_restored(
        weights,
        masks,
        lambda: _snip(weights, loss_closure, data) if method == "snip" else _grasp(weights, loss_closure, data),
    )


def compute_masks(
    method: str,
    weights: Mapping[str, nn.Parameter],
    sparsity: float,
    *,
    scope: str = "global",
    loss_closure: Optional[Callable[[object], Tensor]] = None,
    data: Optional[Iterable] = None,
    chains: Optional[Sequence[Sequence[str]]] = None,
    seed: int = 0,
    rounds: Optional[int] = None,
    erk: bool = False,
) -> dict[str, Tensor]:
    """Bool keep-masks (same shapes, on the weights' devices) keeping exactly
    `keep_count(total, sparsity)` weights in all (`scope="global"`: one ranking over every tensor) or
    `round(density_l * numel_l)` in each tensor (`scope="layer"`: `density_l = 1 - sparsity`, or the
    ERK densities of `erk_densities` when `erk=True`).

    Rounds (Synaptic-Flow's "exponential" schedule): `rounds` defaults to 100 for synflow and 1 (one
    shot) otherwise. After round r (1-based) the kept density is `density ** (r / rounds)`
    (per tensor for scope="layer"), i.e. `round(density ** (r / rounds) * n)` weights; each round
    rescores the network masked by the previous round's masks and selects only among the entries
    still kept. The last round keeps exactly the final count. It does not call `check_no_empty`.
    """
    if method not in METHODS:
        raise ValueError(f"unknown pruning method {method!r}; choose one of {', '.join(METHODS)}")
    if scope not in SCOPES:
        raise ValueError(
            f"scope must be 'global' (one ranking over all weights) or 'layer' (the same "
            f"density in every matrix), got {scope!r}"
        )
    if erk and scope != "layer":
        raise ValueError("erk=True allocates a density per matrix; use it with scope='layer'")
    if rounds is None:
        rounds = SYNFLOW_ROUNDS if method == "synflow" else 1
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be an int >= 1, got {rounds!r}")
    _check_weights(weights)
    total = sum(w.numel() for w in weights.values())
    final_k = keep_count(total, sparsity)  # validates sparsity
    if method in DATA_METHODS:
        data = _require_data(method, loss_closure, data)  # a list: read once per round

    names = list(weights)
    if scope == "layer":
        if erk:
            dens = erk_densities({n: tuple(weights[n].shape) for n in names}, sparsity)
        else:
            dens = {n: 1.0 - float(sparsity) for n in names}

    masks = None
    for r in range(1, rounds + 1):
        scores = compute_scores(
            method, weights, loss_closure=loss_closure, data=data, chains=chains, seed=seed, masks=masks
        )
        flats = validated_flats(scores)
        frac = r / rounds  # == 1.0 exactly in the last round, so d ** frac == d there
        if scope == "global":
            k = final_k if r == rounds else int(round((1.0 - float(sparsity)) ** frac * total))
            masks = select_global_k(scores, flats, k, eligible=masks)
        else:
            ks = [int(round(check_fraction(dens[n], "density") ** frac * weights[n].numel())) for n in names]
            masks = select_per_tensor_k(scores, flats, ks, eligible=masks)
    return masks


# ----------------------------------------------------------------------------------------------------


def _score_dtype(w: Tensor) -> torch.dtype:
    return torch.float64 if w.dtype == torch.float64 else torch.float32


def _masked(w: Tensor, mask: Optional[Tensor]) -> Tensor:
    return w if mask is None else w * mask


def _check_weights(weights: Mapping[str, Tensor]) -> None:
    if not isinstance(weights, Mapping):
        raise ValueError(f"weights must be a mapping name -> Parameter, got {type(weights).__name__}")
    for name, w in weights.items():
        if not isinstance(w, Tensor) or not w.is_floating_point():
            raise ValueError(
                f"weight {name!r} must be a floating-point tensor, got {getattr(w, 'dtype', type(w).__name__)}"
            )


def _check_masks(masks, weights) -> dict:
    if masks is None:
        return {}
    for name, m in masks.items():
        if name not in weights:
            raise ValueError(f"mask for {name!r}, which is not one of the scored weights")
        if m.dtype != torch.bool or tuple(m.shape) != tuple(weights[name].shape):
            raise ValueError(
                f"mask for {name!r} must be bool with shape {tuple(weights[name].shape)}, "
                f"got {m.dtype} {tuple(m.shape)}"
            )
    return {n: m.to(weights[n].device) for n, m in masks.items()}


def _require_data(method, loss_closure, data) -> list:
    if loss_closure is None or data is None:
        raise ValueError(
            f"'{method}' scores weights with gradients of a loss: pass loss_closure=fn(batch) -> scalar "
            "loss and data=[batch, ...] (calibration batches)"
            + ("" if data is not None else "; data is missing")
            + ("" if loss_closure is not None else "; loss_closure is missing")
        )
    batches = data if isinstance(data, list) else list(data)
    if not batches:
        raise ValueError(f"'{method}' needs at least one calibration batch; data is empty")
    return batches


def _with_weights_restored(weights, masks, fn):
    """Run fn with every weight requiring grad and masked (in place) by `masks`; put back values,
    requires_grad and .grad afterwards, also on error."""
    saved = [(w, w.requires_grad, w.grad) for w in weights.values()]
    originals = {n: weights[n].detach().clone() for n in masks}
    try:
        with torch.no_grad():
            for n, m in masks.items():
                weights[n].mul_(m)
        for w in weights.values():
            if not w.requires_grad:
                w.requires_grad_(True)
        with torch.enable_grad():
            return fn()
    finally:
        with torch.no_grad():
            for n, orig in originals.items():
                weights[n].copy_(orig)
        for w, requires_grad, grad in saved:
            if w.requires_grad != requires_grad:
                w.requires_grad_(requires_grad)
            if w.grad is not grad:
                w.grad = grad


def _loss(loss_closure, batch) -> Tensor:
    loss = loss_closure(batch)
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise ValueError(
            f"loss_closure must return a scalar tensor, got "
            f"{tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__}"
        )
    if not loss.requires_grad:
        raise ValueError(
            "the loss does not depend on the weights being scored (was it computed under "
            "torch.no_grad(), or with other parameters?)"
        )
    return loss.reshape(())


def _summed_grads(weights, loss_closure, batches) -> list[Tensor]:
    ws = list(weights.values())
    acc = [torch.zeros(w.shape, dtype=_score_dtype(w), device=w.device) for w in ws]
    for batch in batches:
        grads = torch.autograd.grad(_loss(loss_closure, batch), ws, allow_unused=True)
        for a, g in zip(acc, grads):
            if g is not None:
                a += g
    return acc


def _snip(weights, loss_closure, batches):
    grads = _summed_grads(weights, loss_closure, batches)
    return {
        n: sparseadapter_ext.prune_score(w.detach().to(g.dtype), g, None, "snip")
        for (n, w), g in zip(weights.items(), grads)
    }


def _grasp(weights, loss_closure, batches):
    ws = list(weights.values())
    g = [a.to(w.dtype) for a, w in zip(_summed_grads(weights, loss_closure, batches), ws)]
    hg = [torch.zeros(w.shape, dtype=_score_dtype(w), device=w.device) for w in ws]
    for batch in batches:
        # H g needs a second derivative through attention: the fused SDPA kernels (flash on CPU and GPU,
        # memory-efficient) have none, so GraSP's graph is built with the math backend
        with sdpa_kernel([SDPBackend.MATH]):
            loss = _loss(loss_closure, batch)
        grads = torch.autograd.grad(loss, ws, create_graph=True, allow_unused=True)
        terms = [(gi * di).sum() for gi, di in zip(g, grads) if di is not None]
        z = sum(terms) if terms else None
        if z is None or not z.requires_grad:  # the gradient does not depend on the weights: H g = 0
            continue
        for a, h in zip(hg, torch.autograd.grad(z, ws, allow_unused=True)):
            if h is not None:
                a += h
    return {
        n: sparseadapter_ext.prune_score(w.detach().to(h.dtype), None, h, "grasp")
        for (n, w), h in zip(weights.items(), hg)
    }


def _synflow_chains(weights, chains) -> list[list[str]]:
    seen: set[str] = set()
    out = []
    for chain in chains or []:
        chain = list(chain)
        for n in chain:
            if n not in weights:
                raise ValueError(f"synflow chain entry {n!r} is not one of the scored weights")
            if n in seen:
                raise ValueError(f"synflow: weight {n!r} appears in more than one chain position")
            if weights[n].dim() != 2:
                raise ValueError(f"synflow: {n!r} must be a 2-D [out, in] matrix, got {tuple(weights[n].shape)}")
            seen.add(n)
        for prev, nxt in zip(chain, chain[1:]):
            if weights[nxt].shape[1] != weights[prev].shape[0]:
                raise ValueError(
                    f"synflow chain {chain}: {nxt!r} takes {weights[nxt].shape[1]} inputs but "
                    f"{prev!r} gives {weights[prev].shape[0]} outputs"
                )
        if chain:
            out.append(chain)
    for n, w in weights.items():
        if n not in seen:
            if w.dim() != 2:
                raise ValueError(f"synflow: {n!r} must be a 2-D [out, in] matrix, got {tuple(w.shape)}")
            out.append([n])
    return out


def _synflow(weights, chains, masks):
    out = {}
    with torch.no_grad():
        for chain in _synflow_chains(weights, chains):
            a = [_masked(weights[n].detach().to(torch.float64).abs(), masks.get(n)) for n in chain]
            # fwd[k] = A_{k-1} ... A_1 1 (input of layer k); bwd[k] = 1^T A_K ... A_{k+1} (output side)
            fwd = [torch.ones(a[0].shape[1], dtype=torch.float64, device=a[0].device)]
            for ak in a[:-1]:
                fwd.append(ak @ fwd[-1])
            bwd = [torch.ones(a[-1].shape[0], dtype=torch.float64, device=a[-1].device)]
            for ak in reversed(a[1:]):
                bwd.append(bwd[-1] @ ak)
            bwd.reverse()
            for n, ak, f, b in zip(chain, a, fwd, bwd):
                out[n] = b[:, None] * ak * f[None, :]
    return {n: out[n] for n in weights}  # mapping order
