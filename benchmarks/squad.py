"""Extractive QA on a SQuAD file, rotated by article: sparse adapters (MiniLM + Houlsby, dense and SNIP-pruned).

For each rotation k one article is the test set and the others train; of the training articles every
`--validation-every`-th paragraph (by its position in the article) is held out as the validation set,
on which the best step and the v2.0 null-answer threshold are chosen. Each (rotation, cell) trains
through `sparseadapter.training.train` (`--task squad`) and appends its record to --results (JSON lines;
pairs already there are skipped, so a cut-short study resumes). The split files go to a temporary
folder: the data never enters the repository, the script reads it from the path it is given.

    python benchmarks/squad.py run --data PATH/TO/squad.json                   # every rotation, 3 cells
    python benchmarks/squad.py run --data PATH/TO/squad.json --rotations 0 1 --cells dense snip40
    python benchmarks/squad.py table --results benchmarks/study/squad_results.jsonl
    python benchmarks/squad.py split --data PATH/TO/squad.json --rotation 0 OUT_DIR   # the files only
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))

# (name, sparsity): the Houlsby adapter dense, and SNIP-pruned at initialization to 40% and 80%
CELLS = (("dense", 0.0), ("snip40", 0.4), ("snip80", 0.8))
COMMON = dict(
    model="minilm",
    task="squad",
    kind="houlsby",
    pruner="snip",
    batch_size=16,
    eval_batch_size=64,
    warmup_ratio=0.06,
    calibration_batches=4,
    checkpoint_every=0,
    eval_every=0,
    progress=False,
    threads=1,
    seed=0,
)


def split_files(data: dict, rotation: int, out_dir: Path, validation_every: int) -> dict:
    """Write train.json / validation.json / test.json for one rotation; returns paths, titles and counts."""
    articles = data["data"]
    if not 0 <= rotation < len(articles):
        raise ValueError(f"rotation {rotation}: the file has {len(articles)} articles (0..{len(articles) - 1})")
    test = [articles[rotation]]
    train, validation = [], []
    for a, article in enumerate(articles):
        if a == rotation:
            continue
        keep = [p for i, p in enumerate(article["paragraphs"]) if (i + 1) % validation_every]
        held = [p for i, p in enumerate(article["paragraphs"]) if not (i + 1) % validation_every]
        train.append(dict(article, paragraphs=keep))
        if held:
            validation.append(dict(article, paragraphs=held))
    out_dir.mkdir(parents=True, exist_ok=True)
    files, counts = {}, {}
    for name, part in (("train", train), ("validation", validation), ("test", test)):
        path = out_dir / f"{name}.json"
        path.write_text(json.dumps(dict(data, data=part), ensure_ascii=False), encoding="utf-8")
        files[name] = str(path)
        counts[name] = sum(len(p["qas"]) for article in part for p in article["paragraphs"])
    return {"files": files, "counts": counts, "test_title": articles[rotation]["title"]}


def portable(config: dict) -> dict:
    out = dict(config)
    for key in ("train_file", "validation_file", "test_file"):
        if out.get(key):
            out[key] = Path(out[key]).name
    out.pop("output_dir", None)
    return out


def run_cell(name: str, sparsity: float, split: dict, args, work: Path) -> dict:
    from sparseadapter.training import TrainConfig, train

    files = split["files"]
    cfg = TrainConfig(
        train_file=files["train"],
        validation_file=files["validation"],
        test_file=files["test"],
        sparsity=sparsity,
        epochs=args.epochs,
        max_length=args.max_length,
        doc_stride=args.doc_stride,
        precision=args.precision,
        lr=args.lr,
        output_dir=str(work / name),
        overwrite=True,
        **COMMON,
    )
    start, cpu = time.perf_counter(), time.process_time()
    result = train(cfg, log=lambda *_: None)
    return {
        "cell": name,
        "sparsity": sparsity,
        "rotation": args.current_rotation,
        "test_title": split["test_title"],
        "counts": split["counts"],
        "config": portable(cfg.to_dict()),
        "validation": result.validation,
        "test": result.test,
        "steps": result.steps,
        "best_step": result.best_step,
        "parameters": result.counts,
        "timings": result.timings,
        "wall_s": time.perf_counter() - start,
        "cpu_s": time.process_time() - cpu,
        "torch": torch.__version__,
    }


def _mean(values):
    values = list(values)
    return statistics.fmean(values) if values else float("nan")


def table(results) -> str:
    """Per cell: test EM / F1 (mean over its rotations), answerable F1, unanswerable EM, the always-null
    baseline; then one row per rotation."""
    cells = [c for c, _ in CELLS if any(r["cell"] == c for r in results)]
    lines = [
        "| Houlsby adapter | rotations | test EM | test F1 | answerable F1 | unanswerable EM | always-null EM / F1 "
        "| answerable F1, best spans | validation F1 (own threshold) | CPU min |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for cell in cells:
        rs = sorted((r for r in results if r["cell"] == cell), key=lambda r: r["rotation"])
        t = [r["test"] for r in rs]
        lines.append(
            f"| {cell} | {','.join(str(r['rotation']) for r in rs)} | {_mean(x['exact'] for x in t):.2f} | "
            f"{_mean(x['f1'] for x in t):.2f} | {_mean(x['has_answer_f1'] for x in t):.2f} | "
            f"{_mean(x['no_answer_exact'] for x in t):.2f} | {_mean(x['baseline_exact'] for x in t):.2f} / "
            f"{_mean(x['baseline_f1'] for x in t):.2f} | {_mean(x.get('has_answer_span_f1', float('nan')) for x in t):.2f} | "
            f"{_mean(r['validation']['f1'] for r in rs):.2f} | "
            f"{sum(r['cpu_s'] for r in rs) / 60:.1f} |"
        )
    lines += [
        "",
        "| rotation (test article) | adapter | test EM | test F1 | answerable F1 | unanswerable EM | "
        "answerable F1, best spans | null threshold | steps | CPU s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(results, key=lambda r: (r["rotation"], [c for c, _ in CELLS].index(r["cell"]))):
        t = r["test"]
        lines.append(
            f"| {r['rotation']} ({r['test_title']}) | {r['cell']} | {t['exact']:.2f} | {t['f1']:.2f} | "
            f"{t['has_answer_f1']:.2f} | {t['no_answer_exact']:.2f} | {t.get('has_answer_span_f1', float('nan')):.2f} | "
            f"{t['null_threshold']:.3g} | "
            f"{r['steps']} | {r['cpu_s']:.0f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("split", help="write one rotation's train/validation/test files only")
    s.add_argument("--data", type=Path, required=True)
    s.add_argument("--rotation", type=int, required=True)
    s.add_argument("--validation-every", type=int, default=8)
    s.add_argument("out_dir", type=Path)
    r = sub.add_parser("run", help="split, then train and score each (rotation, cell)")
    r.add_argument("--data", type=Path, required=True, help="a SQuAD JSON file with several articles")
    r.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "study" / "squad_results.jsonl")
    r.add_argument("--cells", nargs="+", default=[n for n, _ in CELLS], choices=[n for n, _ in CELLS])
    r.add_argument("--rotations", nargs="+", type=int, default=None, help="test articles by index (default: all)")
    r.add_argument(
        "--validation-every",
        type=int,
        default=8,
        help="hold out every N-th paragraph of the training articles for validation",
    )
    r.add_argument("--epochs", type=float, default=3.0)
    r.add_argument("--lr", type=float, default=5e-3)
    r.add_argument("--max-length", type=int, default=256)
    r.add_argument("--doc-stride", type=int, default=128)
    r.add_argument("--precision", default="bf16", choices=("fp32", "bf16"))
    t = sub.add_parser("table", help="print the results table")
    t.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "study" / "squad_results.jsonl")
    args = p.parse_args(argv)
    if args.command == "table":
        print(table([json.loads(line) for line in args.results.read_text().splitlines()]))
        return 0
    if not args.data.is_file():
        sys.exit(
            f"SQuAD data not found at {args.data}: this study reads evaluation data kept outside the "
            "repository; pass --data with the path of a SQuAD JSON file of several articles"
        )
    data = json.loads(args.data.read_text(encoding="utf-8"))
    if args.command == "split":
        print(json.dumps(split_files(data, args.rotation, args.out_dir, args.validation_every), indent=2))
        return 0
    torch.set_num_threads(1)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    results = [json.loads(line) for line in args.results.read_text().splitlines()] if args.results.exists() else []
    done = {(r["rotation"], r["cell"]) for r in results}
    rotations = args.rotations if args.rotations is not None else list(range(len(data["data"])))
    with tempfile.TemporaryDirectory(prefix="sparseadapter-squad-") as work:
        for rotation in rotations:
            split = split_files(data, rotation, Path(work) / f"data-{rotation}", args.validation_every)
            print(f"rotation {rotation}: test {split['test_title']!r}, questions {split['counts']}", flush=True)
            for name, sparsity in CELLS:
                if name not in args.cells or (rotation, name) in done:
                    continue
                args.current_rotation = rotation
                record = run_cell(name, sparsity, split, args, Path(work) / f"run-{rotation}")
                results.append(record)
                with open(args.results, "a", encoding="utf-8") as f:
                    f.write(json.dumps(record, sort_keys=True) + "\n")
                t = record["test"]
                print(
                    f"  {name}: test EM {t['exact']:.2f} F1 {t['f1']:.2f} (answerable F1 {t['has_answer_f1']:.2f}, "
                    f"best spans {t.get('has_answer_span_f1', float('nan')):.2f}, "
                    f"unanswerable EM {t['no_answer_exact']:.2f}, always-null {t['baseline_f1']:.2f}) | "
                    f"validation F1 {record['validation']['f1']:.2f} | {record['steps']} steps, "
                    f"{record['cpu_s']:.0f} s CPU, {record['wall_s']:.0f} s wall",
                    flush=True,
                )
    chosen = [r for r in results if r["cell"] in args.cells and r["rotation"] in rotations]
    print(table(chosen))
    return 0


if __name__ == "__main__":
    sys.exit(main())
