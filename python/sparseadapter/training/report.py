"""What a run reports: results.json and results.md in the run folder, and the one-screen summary."""
import json
from typing import List

from .generation import rouge_markdown, rouge_rows, table_rows
from .run import RunResult


def _percent(part: int, whole: int) -> str:
    return f"{100.0 * part / whole:.2f}%" if whole else "n/a"


def describe_adapter(result: RunResult) -> str:
    cfg = result.config
    text = f"{cfg.kind} adapter"
    if cfg.large_sparse > 1:
        text += f", Large-Sparse x{cfg.large_sparse}"
    adapter_cfg = cfg.adapter_config()
    if adapter_cfg.is_sparse:
        text += f", {adapter_cfg.effective_sparsity:.0%} sparse ({cfg.pruner}, {cfg.scope})"
    else:
        text += ", dense"
    return text


def results_dict(result: RunResult) -> dict:
    return {
        "task": result.task.name, "model": result.config.model, "adapter": describe_adapter(result),
        "examples": result.sizes, "steps": result.steps, "best_step": result.best_step,
        "validation": result.validation, "test": result.test, "parameters": result.counts,
        "timings_s": result.timings, "adapter_dir": str(result.adapter_dir), "config": result.config.to_dict(),
        "objective": result.objective, "baselines": result.baselines,
    }


def _rouge_table_rows(result: RunResult) -> list:
    rows = []
    if result.validation is not None:
        rows.append(("adapter, validation", result.validation))
    if result.test is not None:
        rows += table_rows(result.test, result.baselines, "adapter, test")
    return rows


def rouge_table(result: RunResult, indent: str = "") -> List[str]:
    """Generation runs: ROUGE F1 x 100 of the adapter on validation and test, and on test the lead
    baseline and the base model zero-shot beside it."""
    rows = _rouge_table_rows(result)
    return rouge_rows(rows, indent) if rows else []


def results_table(result: RunResult) -> str:
    if result.task.generation:
        rows = _rouge_table_rows(result)
        return ("ROUGE F1 x 100 (rouge-score, stemmed); baselines on the same test examples\n\n"
                + rouge_markdown(rows)) if rows else ""
    metrics = ["loss", *result.task.metrics]
    lines = ["| split | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
    for split, values in (("validation", result.validation), ("test", result.test)):
        if values is not None:
            lines.append(f"| {split} | " + " | ".join(f"{values[m]:.4f}" for m in metrics) + " |")
    return "\n".join(lines)


def write_results(result: RunResult) -> None:
    out = result.output_dir
    (out / "results.json").write_text(json.dumps(results_dict(result), indent=2, sort_keys=True))
    (out / "results.md").write_text(
        f"# {result.task.name}: {describe_adapter(result)} on {result.config.model}\n\n"
        f"{results_table(result)}\n\n{parameter_line(result)}\n")


def parameter_line(result: RunResult) -> str:
    c = result.counts
    adapter = c["trainable"] - c["head"]
    line = f"trainable {c['trainable']:,} = adapter {adapter:,} + task head {c['head']:,} " \
           f"({_percent(c['trainable'], c['total'])} of {c['total']:,})"
    if c["sparse_dense_size"]:
        line += (f"; adapter weights {c['sparse_nnz']:,} nonzeros of {c['sparse_dense_size']:,} "
                 f"(sparsity {1 - c['sparse_nnz'] / c['sparse_dense_size']:.3f})")
    return line


def summary(result: RunResult) -> str:
    """The one screen the main job ends with."""
    t = result.timings
    rows: List[str] = [
        f"SparseAdapter: {describe_adapter(result)} on {result.config.model}, task {result.task.name}",
        "  data        " + " / ".join(f"{k} {n:,}" for k, n in result.sizes.items()) + " examples",
        f"  parameters  {parameter_line(result)}",
        f"  time        prune {t['prune_s']:.1f} s | train {t['train_s']:.1f} s ({result.steps} steps) | "
        f"eval {t['eval_s']:.1f} s",
    ]
    if result.task.generation:
        table = rouge_table(result, indent="    ")
        if table:
            rows += ["  ROUGE       F1 x 100; baselines on the same test examples"] + table
    for split, values in (("validation", result.validation), ("test", result.test)):
        if values is not None and not result.task.generation:
            rows.append(f"  {split:<11} " + "  ".join(f"{k} {values[k]:.4f}" for k in result.task.metrics)
                        + f"  (loss {values['loss']:.4f})")
    if result.best_step is not None:
        rows.append(f"  selected    step {result.best_step} (best validation {result.task.main_metric})")
    rows += [
        f"  saved       {result.adapter_dir}   (sa.load_adapter(model, path) or `sparseadapter eval --adapter`)",
        f"  run folder  {result.output_dir}: metrics.jsonl, results.md, config.json, checkpoint/"
        + (", predictions.jsonl" if result.task.generation and result.test is not None else ""),
    ]
    return "\n".join(rows)
