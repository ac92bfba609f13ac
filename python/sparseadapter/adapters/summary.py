"""Parameter counts that count what is stored: nonzeros of sparse weights, not their dense size."""

from typing import Dict

from torch import nn

from ..pruning.api import PRUNABLE_ATTR
from ..pruning.selection import keep_count
from ..sparse_linear import SparseLinear
from .api import build_adapter
from .config import SparseAdapterConfig


def trainable_parameters(model: nn.Module) -> Dict[str, int]:
    """{"trainable", "total", "sparse_nnz", "sparse_dense_size"}: stored parameter counts.

    A SparseLinear's weight counts its nnz (what is stored, trained and saved); `sparse_dense_size`
    is what those weights would take dense, for comparison.
    """
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    sparse = [m for m in model.modules() if isinstance(m, SparseLinear)]
    return {
        "trainable": trainable,
        "total": total,
        "sparse_nnz": sum(m.nnz for m in sparse),
        "sparse_dense_size": sum(m.in_features * m.out_features for m in sparse),
    }


def print_trainable_parameters(model: nn.Module) -> None:
    c = trainable_parameters(model)
    line = (
        f"trainable params: {c['trainable']:,} || all params: {c['total']:,} || "
        f"trainable%: {100.0 * c['trainable'] / max(c['total'], 1):.4f}"
    )
    if c["sparse_dense_size"]:
        line += (
            f" || sparse weights: {c['sparse_nnz']:,} nonzeros of {c['sparse_dense_size']:,} "
            f"(sparsity {1 - c['sparse_nnz'] / c['sparse_dense_size']:.3f})"
        )
    print(line)


def parameter_budget(config: SparseAdapterConfig, model: nn.Module) -> Dict[str, int]:
    """What adapter `config` adds to `model`, counted on the modules it would build (the model is not
    changed).

    weights_dense: adapter weight entries at the built width (bottleneck x large_sparse);
    weights_kept:  of those, the nonzeros pruning keeps (exactly what `prune` keeps, per scope);
    biases, prefix: the dense parameters beside them (never pruned).
    """
    parts = build_adapter(model, config)
    matrices = [
        layer.weight.numel()
        for _, module in parts.modules
        for layer in module.modules()
        if getattr(layer, PRUNABLE_ATTR, False)
    ]
    others = sum(p.numel() for _, module in parts.modules for p in module.parameters()) - sum(matrices)
    dense = sum(matrices)
    if not config.is_sparse:
        kept = dense
    elif config.scope == "global":
        kept = keep_count(dense, config.effective_sparsity)
    else:
        kept = sum(keep_count(n, config.effective_sparsity) for n in matrices)
    prefix = sum(p.numel() for p in parts.prefix.parameters()) if parts.prefix is not None else 0
    return {"weights_dense": dense, "weights_kept": kept, "biases": others, "prefix": prefix}
