"""`sparseadapter prune`: prune an adapter at initialization and report what each matrix keeps."""

from pathlib import Path
from typing import Dict, List, Optional

from .. import adapters as sa_adapters
from ..pruning.api import PRUNABLE_ATTR
from ..pruning.scores import DATA_METHODS
from ..sparse_linear import SparseLinear
from .config import FILE_TASKS, TrainConfig
from .engine import (
    add_pruned_adapter,
    encode_splits,
    load_examples,
    load_task_model,
    prepare_head,
    resolve_device,
    resolve_model_path,
    save_adapter_dir,
    set_threads,
    train_order,
)


def prune_report(cfg: TrainConfig, save: Optional[str] = None) -> Dict:
    """Build the model and the adapter, prune it exactly as `train` would, and count what is kept."""
    import torch

    device = resolve_device(cfg.device)
    set_threads(cfg, device)
    adapter_cfg = cfg.adapter_config()
    needs_data = adapter_cfg.is_sparse and adapter_cfg.pruner in DATA_METHODS
    if cfg.task in FILE_TASKS:  # question answering: the span model, scored on training windows
        from .qa import encode_split, load_qa_model, read_qa_files

        tokenizer, model = load_qa_model(resolve_model_path(cfg.model), cfg.seed)
        model.to(device)
        train_split = encode_split(tokenizer, read_qa_files(cfg)["train"], cfg)
        order = train_order(cfg, len(train_split))
    else:
        task, examples = load_examples(cfg)
        tokenizer, model, _ = load_task_model(cfg, task, resolve_model_path(cfg.model))
        model.to(device)
        prepare_head(model, task, [e.label for e in examples["train"]], cfg.seed)  # as `train` does, before pruning
        train_split = (
            encode_splits(cfg, task, tokenizer, model, {"train": examples["train"]})["train"] if needs_data else None
        )
        order = train_order(cfg, len(examples["train"]))
    add_pruned_adapter(model, cfg, train_split, order, tokenizer.pad_token_id, device)

    rows: List[Dict] = []
    for prefix, module in sa_adapters.adapter_modules(model, cfg.adapter_name).items():
        for sub, layer in module.named_modules():
            if isinstance(layer, SparseLinear):
                rows.append(
                    dict(
                        name=f"{prefix}.{sub}",
                        shape=(layer.out_features, layer.in_features),
                        kept=layer.nnz,
                        size=layer.out_features * layer.in_features,
                    )
                )
            elif isinstance(layer, torch.nn.Linear) and getattr(layer, PRUNABLE_ATTR, False):
                rows.append(
                    dict(
                        name=f"{prefix}.{sub}",
                        shape=tuple(layer.weight.shape),
                        kept=layer.weight.numel(),
                        size=layer.weight.numel(),
                    )
                )
    record = sa_adapters.pruning_record(model, cfg.adapter_name)
    if save:
        save_adapter_dir(model, Path(save), cfg)
    return dict(
        config=cfg,
        adapter=adapter_cfg,
        rows=rows,
        record=record.to_dict() if record else None,
        budget=sa_adapters.parameter_budget(adapter_cfg, model),
        counts=sa_adapters.trainable_parameters(model),
        saved=save,
    )


def format_prune_report(report: Dict) -> str:
    cfg, adapter_cfg, rows = report["config"], report["adapter"], report["rows"]
    kept = sum(r["kept"] for r in rows)
    size = sum(r["size"] for r in rows)
    width = max([len(r["name"]) for r in rows] + [6])
    lines = [
        f"{cfg.kind} adapter on {cfg.model}: width {adapter_cfg.effective_bottleneck}, "
        f"target sparsity {adapter_cfg.effective_sparsity:.3f} ({cfg.pruner}, {cfg.scope})",
        "",
        f"{'matrix':<{width}}  {'shape':>10}  {'kept':>8}  {'of':>8}  sparsity",
    ]
    for r in rows:
        shape = "x".join(map(str, r["shape"]))
        lines.append(
            f"{r['name']:<{width}}  {shape:>10}  {r['kept']:>8,}  {r['size']:>8,}  {1 - r['kept'] / r['size']:.3f}"
        )
    lines.append(f"{'total':<{width}}  {'':>10}  {kept:>8,}  {size:>8,}  {1 - kept / max(size, 1):.3f}")
    b = report["budget"]
    lines += [
        "",
        f"kept weights {kept:,} (budget {b['weights_kept']:,}) + biases {b['biases']:,}"
        + (f" + prefix {b['prefix']:,}" if b["prefix"] else ""),
    ]
    if report["saved"]:
        lines.append(f"saved the pruned (untrained) adapter to {report['saved']}")
    return "\n".join(lines)
