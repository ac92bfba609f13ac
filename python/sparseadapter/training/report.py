"""What a run reports: results.json and results.md in the run folder, and the one-screen summary."""

import json
from typing import List, Optional

from .generation import rouge_markdown, rouge_rows, table_rows
from .metrics import class_name, collapse_warning, describe_baseline
from .result import RunResult


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


def warnings(result: RunResult) -> List[str]:
    """Plain sentences about results that must not be read as they stand (collapsed predictions)."""
    out = []
    for split, values in (("validation", result.validation), ("test", result.test)):
        message = collapse_warning(result.task, values, split) if values is not None else None
        if message:
            out.append(message)
    return out


def _normalization(result: RunResult) -> Optional[dict]:
    norm = result.target_normalization
    return {"mean": norm[0], "scale": norm[1]} if norm else None


def results_dict(result: RunResult) -> dict:
    return {
        "task": result.task.name,
        "model": result.config.model,
        "adapter": describe_adapter(result),
        "examples": result.sizes,
        "steps": result.steps,
        "best_step": result.best_step,
        "validation": result.validation,
        "test": result.test,
        "parameters": result.counts,
        "timings_s": result.timings,
        "adapter_dir": str(result.adapter_dir),
        "config": result.config.to_dict(),
        "target_normalization": _normalization(result),
        "warnings": warnings(result),
        "objective": result.objective,
        "baselines": result.baselines,
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


def _baseline_name(result: RunResult, values: dict) -> str:
    if result.task.is_regression:
        return f"mean of train ({values['baseline']:.4g})"
    return f"majority class of train ({class_name(result.task, values['baseline'])})"


def results_table(result: RunResult) -> str:
    """The selected adapter's scores per split, each beside what a constant prediction scores there;
    for generation, ROUGE beside the lead and zero-shot baselines (rouge_table)."""
    if result.task.generation:
        rows = _rouge_table_rows(result)
        return (
            ("ROUGE F1 x 100 (rouge-score, stemmed); baselines on the same test examples\n\n" + rouge_markdown(rows))
            if rows
            else ""
        )
    metrics = ["loss", *result.task.metrics]
    lines = ["| split | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
    for split, values in (("validation", result.validation), ("test", result.test)):
        if values is not None:
            lines.append(f"| {split} | " + " | ".join(f"{values[m]:.4f}" for m in metrics) + " |")
            if "baseline" in values:
                cells = [f"{values[f'baseline_{m}']:.4f}" if f"baseline_{m}" in values else "-" for m in metrics]
                lines.append(f"| {split}, baseline: {_baseline_name(result, values)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(result: RunResult) -> None:
    out = result.output_dir
    (out / "results.json").write_text(json.dumps(results_dict(result), indent=2, sort_keys=True))
    text = f"# {result.task.name}: {describe_adapter(result)} on {result.config.model}\n\n"
    notes = warnings(result)
    if notes:
        text += "".join(f"**Warning: {note}.**\n\n" for note in notes)
    text += f"{results_table(result)}\n\n{parameter_line(result)}\n"
    if result.target_normalization:
        mean, scale = result.target_normalization
        text += (
            f"\nRegression targets standardized with the training labels' mean {mean:.6g} and standard "
            f"deviation {scale:.6g} (stored with the head; predictions are in label units; loss is the "
            f"MSE in standardized units, 1.0 being as good as predicting the mean).\n"
        )
    (out / "results.md").write_text(text)


def parameter_line(result: RunResult) -> str:
    c = result.counts
    adapter = c["trainable"] - c["head"]
    line = (
        f"trainable {c['trainable']:,} = adapter {adapter:,} + task head {c['head']:,} "
        f"({_percent(c['trainable'], c['total'])} of {c['total']:,})"
    )
    if c["sparse_dense_size"]:
        line += (
            f"; adapter weights {c['sparse_nnz']:,} nonzeros of {c['sparse_dense_size']:,} "
            f"(sparsity {1 - c['sparse_nnz'] / c['sparse_dense_size']:.3f})"
        )
    return line


def _steps(result: RunResult) -> str:
    """ "98 steps, median 1.41 s/step, bf16; compile 31.2 s" (what shaped the train time)."""
    t, cfg = result.timings, result.config
    text = f"{result.steps} steps"
    if "step_median_s" in t:
        text += f", median {t['step_median_s']:.3g} s/step"
    if cfg.grad_accumulation > 1:
        text += f" of {cfg.grad_accumulation} x {cfg.batch_size}"
    if cfg.precision != "fp32":
        text += f", {cfg.precision}"
    if "compile_s" in t:
        text += f"; compile {t['compile_s']:.1f} s"
        if t.get("recompile_steps"):
            text += f" + {t['recompile_s']:.1f} s in {t['recompile_steps']:.0f} recompiling steps"
    return text


def summary(result: RunResult) -> str:
    """The one screen the main job ends with."""
    t = result.timings
    rows: List[str] = [
        f"SparseAdapter: {describe_adapter(result)} on {result.config.model}, task {result.task.name}",
        "  data        " + " / ".join(f"{k} {n:,}" for k, n in result.sizes.items()) + " examples",
        f"  parameters  {parameter_line(result)}",
        f"  time        prune {t['prune_s']:.1f} s | train {t['train_s']:.1f} s ({_steps(result)}) | "
        f"eval {t['eval_s']:.1f} s",
    ]
    if result.task.generation:
        table = rouge_table(result, indent="    ")
        if table:
            rows += ["  ROUGE       F1 x 100; baselines on the same test examples"] + table
    if result.target_normalization:
        mean, scale = result.target_normalization
        rows.append(
            f"  targets     standardized: mean {mean:.4g}, std {scale:.4g} of the training labels "
            "(loss in standardized units)"
        )
    shown = None
    for split, values in (("validation", result.validation), ("test", result.test)):
        if values is not None and not result.task.generation:
            rows.append(
                f"  {split:<11} "
                + "  ".join(f"{k} {values[k]:.4f}" for k in result.task.metrics)
                + f"  (loss {values['loss']:.4f})"
            )
            shown = (split, values)
    if shown is not None and describe_baseline(result.task, shown[1]):
        rows.append(f"  baseline    {shown[0]}, {describe_baseline(result.task, shown[1])}")
    for note in warnings(result):
        rows.append(f"  WARNING     {note}")
    if result.best_step is not None:
        rows.append(f"  selected    step {result.best_step} (best validation {result.task.main_metric})")
    rows += [
        f"  saved       {result.adapter_dir}   (sa.load_adapter(model, path) or `sparseadapter eval --adapter`)",
        f"  run folder  {result.output_dir}: metrics.jsonl, results.md, config.json, checkpoint/"
        + (", predictions.jsonl" if result.task.generation and result.test is not None else ""),
    ]
    return "\n".join(rows)
