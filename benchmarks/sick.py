"""SICK relatedness (regression) with sparse adapters: MiniLM + Houlsby, dense and SNIP-pruned.

SICK (Marelli et al., 2014; SemEval-2014 Task 1) gives 9,840 sentence pairs a relatedness score from
1 to 5. Its one file (`SICK.txt`, tab-separated, a `SemEval_set` column naming the split) is not the
text / text_pair / label table that `sparseadapter train --task custom` reads, so this script writes
those tables first (TRAIN -> train.tsv, TRIAL -> validation.tsv, TEST -> test.tsv, in a folder of the
caller's choosing, outside the repository), then trains each cell through `sparseadapter.training.train`
and appends its result to --results (JSON lines; cells already there are skipped, so a cut-short
study resumes).

    python benchmarks/sick.py convert PATH/TO/SICK.txt OUT_DIR          # the tables only
    python benchmarks/sick.py run --data PATH/TO/SICK.txt               # dense, SNIP 40%, SNIP 80%

The data never enters the repository: the script reads it from the path it is given (--data, or
$SPARSEADAPTER_DATA_DIR/sick/SICK.txt when that variable is set) and stops with a message without it.
"""

import argparse
import csv
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR_ENV = "SPARSEADAPTER_DATA_DIR"  # a folder holding sick/SICK.txt (and glue/ for benchmarks/study.py)
SPLITS = {"TRAIN": "train", "TRIAL": "validation", "TEST": "test"}
COLUMNS = ("sentence_A", "sentence_B", "relatedness_score", "SemEval_set")
# (name, sparsity): the Houlsby adapter dense, and SNIP-pruned at initialization to 40% and 80%
CELLS = (("dense", 0.0), ("snip40", 0.4), ("snip80", 0.8))
COMMON = dict(
    model="minilm",
    task="custom",
    regression=True,
    kind="houlsby",
    pruner="snip",
    lr=3e-3,
    batch_size=32,
    eval_batch_size=64,
    warmup_ratio=0.06,
    calibration_batches=4,
    checkpoint_every=0,
    progress=False,
    threads=1,
    seed=0,
)


def convert(sick_file: Path, out_dir: Path) -> dict:
    """Write train.tsv / validation.tsv / test.tsv (text, text_pair, label) from SICK.txt; returns
    {split: path} and the row counts."""
    rows = {name: [] for name in SPLITS.values()}
    with open(sick_file, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = [c.strip() for c in next(reader)]
        missing = [c for c in COLUMNS if c not in header]
        if missing:
            raise ValueError(f"{sick_file}: no column(s) {missing}; the header has {header}")
        index = {c: header.index(c) for c in COLUMNS}
        for line, fields in enumerate(reader, 2):
            if not fields or fields == [""]:
                continue
            if len(fields) != len(header):
                raise ValueError(f"{sick_file}:{line}: {len(fields)} fields, the header has {len(header)}")
            split = fields[index["SemEval_set"]].strip()  # one row carries a trailing character
            if split not in SPLITS:
                raise ValueError(f"{sick_file}:{line}: unknown SemEval_set {split!r}")
            a, b = fields[index["sentence_A"]].strip(), fields[index["sentence_B"]].strip()
            score = float(fields[index["relatedness_score"]])
            rows[SPLITS[split]].append((a, b, repr(score)))
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, split_rows in rows.items():
        path = out_dir / f"{name}.tsv"
        with open(path, "w", encoding="utf-8", newline="") as f:
            f.write("text\ttext_pair\tlabel\n")
            for a, b, score in split_rows:
                f.write(f"{a}\t{b}\t{score}\n")
        files[name] = str(path)
    return {"files": files, "counts": {k: len(v) for k, v in rows.items()}}


def portable(config: dict) -> dict:
    """The config as recorded: the converted tables by file name, no temporary output folder."""
    out = dict(config)
    for key in ("train_file", "validation_file", "test_file"):
        if out.get(key):
            out[key] = Path(out[key]).name
    out.pop("output_dir", None)
    return out


def run_cell(name: str, sparsity: float, files: dict, args, work: Path) -> dict:
    from sparseadapter.training import TrainConfig, train
    from sparseadapter.training.report import warnings

    cfg = TrainConfig(
        train_file=files["train"],
        validation_file=files["validation"],
        test_file=files["test"],
        sparsity=sparsity,
        epochs=args.epochs,
        max_length=args.max_length,
        max_eval_examples=args.max_eval_examples,
        output_dir=str(work / name),
        overwrite=True,
        **COMMON,
    )
    start = time.perf_counter()
    result = train(cfg, log=lambda *_: None)
    return {
        "cell": name,
        "sparsity": sparsity,
        "config": portable(cfg.to_dict()),
        "validation": result.validation,
        "test": result.test,
        "steps": result.steps,
        "best_step": result.best_step,
        "target_normalization": result.target_normalization,
        "warnings": warnings(result),
        "parameters": result.counts,
        "timings": result.timings,
        "wall_s": time.perf_counter() - start,
        "torch": torch.__version__,
        "sizes": result.sizes,
    }


def table(results) -> str:
    lines = [
        "| adapter | test Pearson | test Spearman | validation Pearson | prediction std / label std (test) "
        "| steps | wall s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        t, v = r["test"], r["validation"]
        lines.append(
            f"| Houlsby {r['cell']} | {t['pearson']:.4f} | {t['spearman']:.4f} | {v['pearson']:.4f} | "
            f"{t['prediction_std']:.3f} / {t['label_std']:.3f} | {r['steps']} | {r['wall_s']:.0f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert", help="write the train/validation/test tables only")
    c.add_argument("sick_file", type=Path)
    c.add_argument("out_dir", type=Path)
    r = sub.add_parser("run", help="convert, then train and score each cell")
    data_dir = os.environ.get(DATA_DIR_ENV)
    r.add_argument(
        "--data",
        type=Path,
        default=Path(data_dir) / "sick" / "SICK.txt" if data_dir else None,
        help=f"SICK.txt (default: ${DATA_DIR_ENV}/sick/SICK.txt)",
    )
    r.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "study" / "sick_results.jsonl")
    r.add_argument("--cells", nargs="+", default=[n for n, _ in CELLS], choices=[n for n, _ in CELLS])
    r.add_argument("--epochs", type=float, default=2.0)
    r.add_argument("--max-length", type=int, default=64)
    r.add_argument(
        "--max-eval-examples",
        type=int,
        default=None,
        help="score a fixed seeded subset of TRIAL and TEST (default: all of them)",
    )
    args = p.parse_args(argv)
    if args.command == "convert":
        info = convert(args.sick_file, args.out_dir)
        print(json.dumps(info, indent=2))
        return 0
    if args.data is None:
        sys.exit(f"no SICK data: pass --data PATH/TO/SICK.txt or set {DATA_DIR_ENV}")
    if not args.data.is_file():
        sys.exit(f"SICK data not found at {args.data}")
    torch.set_num_threads(1)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    results = [json.loads(line) for line in args.results.read_text().splitlines()] if args.results.exists() else []
    done = {r["cell"] for r in results}
    with tempfile.TemporaryDirectory(prefix="sparseadapter-sick-") as work:
        info = convert(args.data, Path(work) / "data")
        print(f"SICK: {info['counts']}", flush=True)
        for name, sparsity in CELLS:
            if name not in args.cells or name in done:
                continue
            record = run_cell(name, sparsity, info["files"], args, Path(work))
            results.append(record)
            with open(args.results, "a", encoding="utf-8") as f:
                f.write(json.dumps(record, sort_keys=True) + "\n")
            print(
                f"{name}: test pearson {record['test']['pearson']:.4f} spearman {record['test']['spearman']:.4f}"
                f" | validation pearson {record['validation']['pearson']:.4f} ({record['wall_s']:.0f} s)"
                + "".join(f"\n  WARNING {w}" for w in record["warnings"]),
                flush=True,
            )
    print(table([r for r in results if r["cell"] in args.cells]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
