"""Generation study: SmolLM2-135M-Instruct on bbc-headlines with sparse Houlsby and sparse LoRA adapters.

The grid is 2 kinds (houlsby, lora) x 5 cells (dense; random and SNIP pruning at 40% and 80%) x seeds.
Each run is a short `sparseadapter.training.train` job at fixed settings (below, all recorded in the
results): a fixed number of steps, the last step's adapter scored on a fixed seeded subset of the test
articles with greedy decoding. No validation split is used (nothing is selected), so the train and test
splits of bbc-headlines are written as source/target tables into a temporary folder and trained as
`--task custom` with the task's instruction; the split is bbc-headlines' own (a hash of each article).
The lead and zero-shot baselines are scored once, on the same test subset, in the first run.

Each run appends one JSON line to --results; runs already there are skipped, so a cut-short study
resumes where it stopped. The grid goes seed by seed, so a partial study holds whole seeds first;
--shard I/N splits it between N processes (each appends its own runs).

    python benchmarks/generation_study.py run                 # the grid (long: minutes per run)
    python benchmarks/generation_study.py table               # the table of what --results holds
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
KINDS = ("houlsby", "lora")
# (cell, pruner, sparsity); the dense cell has nothing to prune
CELLS = (
    ("dense", "random", 0.0),
    ("random40", "random", 0.4),
    ("snip40", "snip", 0.4),
    ("random80", "random", 0.8),
    ("snip80", "snip", 0.8),
)
BASELINE_RUN = ("houlsby", "dense", 0)  # the run that also scores the lead and zero-shot baselines


def write_tables(folder: Path) -> dict:
    """bbc-headlines' train and test splits as source/target JSON lines; returns {split: path}."""
    from sparseadapter.training.data.bbc import read_bbc_headlines

    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for split in ("train", "test"):
        path = folder / f"{split}.jsonl"
        with open(path, "w", encoding="utf-8") as f:
            for ex in read_bbc_headlines(split):
                f.write(json.dumps({"source": ex.text, "target": ex.label}, ensure_ascii=False) + "\n")
        files[split] = str(path)
    return files


def settings(args) -> dict:
    """The options every run shares (besides kind, cell and seed)."""
    from sparseadapter.training.tasks import HEADLINE_PROMPT

    return dict(
        model="smollm2",
        task="custom",
        prompt=HEADLINE_PROMPT,
        objective="causal-lm",
        max_steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup_ratio=0.06,
        max_length=args.max_length,
        max_target_length=args.max_target_length,
        max_new_tokens=args.max_new_tokens,
        eval_batch_size=args.eval_batch_size,
        max_eval_examples=args.eval_examples,
        calibration_batches=args.calibration_batches,
        precision=args.precision,
        checkpoint_every=0,
        progress=False,
        threads=1,
    )


def run_one(kind: str, cell: str, seed: int, files: dict, args, work: Path) -> dict:
    from sparseadapter.training import TrainConfig, train

    pruner, sparsity = next((p, s) for name, p, s in CELLS if name == cell)
    common = settings(args)
    cfg = TrainConfig(
        kind=kind,
        pruner=pruner,
        sparsity=sparsity,
        seed=seed,
        train_file=files["train"],
        test_file=files["test"],
        baselines=(kind, cell, seed) == BASELINE_RUN,
        output_dir=str(work / f"{kind}-{cell}-{seed}"),
        overwrite=True,
        **common,
    )
    start = time.perf_counter()
    result = train(cfg, log=lambda *_: None)
    record = {
        "kind": kind,
        "cell": cell,
        "pruner": pruner,
        "sparsity": sparsity,
        "seed": seed,
        "settings": common,
        "test": result.test,
        "steps": result.steps,
        "parameters": result.counts,
        "timings": result.timings,
        "wall_s": time.perf_counter() - start,
        "torch": torch.__version__,
    }
    if result.baselines:
        record["baselines"] = result.baselines
    return record


def _mean_spread(values):
    """Mean and spread (sample standard deviation; 0 for one value) of ROUGE F1 x 100."""
    values = [100 * v for v in values]
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def table(results) -> str:
    lines = [
        "| adapter | cell | seeds | ROUGE-1 | ROUGE-2 | ROUGE-L | ROUGE-L per seed | ROUGE-L - dense, same seed "
        "| words | wall s / run |",
        "|---|---|---:|---:|---:|---:|---|---|---:|---:|",
    ]
    dense = {(r["kind"], r["seed"]): r["test"]["rougeL"] for r in results if r["cell"] == "dense"}
    for kind in KINDS:
        for cell, _, _ in CELLS:
            runs = sorted((r for r in results if r["kind"] == kind and r["cell"] == cell), key=lambda r: r["seed"])
            if not runs:
                continue
            cols = []
            for metric in ("rouge1", "rouge2", "rougeL"):
                mean, spread = _mean_spread([r["test"][metric] for r in runs])
                cols.append(f"{mean:.2f} ± {spread:.2f}")
            per_seed = ", ".join(f"{100 * r['test']['rougeL']:.2f}" for r in runs)
            paired = [r["test"]["rougeL"] - dense[(kind, r["seed"])] for r in runs if (kind, r["seed"]) in dense]
            delta = (
                "-"
                if cell == "dense" or not paired
                else (f"{100 * statistics.mean(paired):+.2f} ({', '.join(f'{100 * d:+.2f}' for d in paired)})")
            )
            words = statistics.mean(r["test"].get("words", float("nan")) for r in runs)
            wall = statistics.median(r["wall_s"] for r in runs)
            lines.append(
                f"| {kind} | {cell} | {len(runs)} | "
                + " | ".join(cols)
                + f" | {per_seed} | {delta} | {words:.1f} | {wall:.0f} |"
            )
    for r in results:
        for name, label in (("lead", "lead baseline (first sentence)"), ("zero_shot", "zero-shot (adapter off)")):
            if name in r.get("baselines", {}):
                m = r["baselines"][name]
                lines.append(
                    f"| {label} | - | - | {100 * m['rouge1']:.2f} | {100 * m['rouge2']:.2f} | "
                    f"{100 * m['rougeL']:.2f} | - | - | {m.get('words', float('nan')):.1f} | - |"
                )
    return "\n".join(lines)


def read_results(path: Path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="train and score each run of the grid not yet in --results")
    t = sub.add_parser("table", help="print the table of --results")
    for q in (r, t):
        q.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "study" / "generation_results.jsonl")
    r.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    r.add_argument("--cells", nargs="+", default=[c for c, _, _ in CELLS], choices=[c for c, _, _ in CELLS])
    r.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    r.add_argument("--steps", type=int, default=20)
    r.add_argument("--batch-size", type=int, default=8)
    r.add_argument("--lr", type=float, default=2e-3)
    r.add_argument("--max-length", type=int, default=64, help="body tokens per example")
    r.add_argument("--max-target-length", type=int, default=24)
    r.add_argument("--max-new-tokens", type=int, default=16)
    r.add_argument("--eval-examples", type=int, default=60, help="the fixed seeded test subset")
    r.add_argument("--eval-batch-size", type=int, default=16)
    r.add_argument("--calibration-batches", type=int, default=2)
    r.add_argument("--precision", default="bf16", choices=("fp32", "bf16"))
    r.add_argument(
        "--shard",
        default="0/1",
        metavar="I/N",
        help="run only the I-th of every N runs of the grid (0-based), so N processes share it",
    )
    args = p.parse_args(argv)
    results = read_results(args.results)
    if args.command == "table":
        print(table(results))
        return 0
    torch.set_num_threads(1)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    common = settings(args)
    clash = [x for x in results if x["settings"] != common]
    if clash:
        sys.exit(f"{args.results} holds {len(clash)} run(s) with other settings than these; give another --results")
    try:
        shard, shards = (int(v) for v in args.shard.split("/"))
    except ValueError:
        sys.exit(f"--shard must be I/N (two integers), got {args.shard!r}")
    if not 0 <= shard < shards:
        sys.exit(f"--shard {args.shard}: I must be in [0, N)")
    grid = [(kind, cell, seed) for seed in args.seeds for kind in args.kinds for cell in args.cells]
    done = {(x["kind"], x["cell"], x["seed"]) for x in results}
    with tempfile.TemporaryDirectory(prefix="sparseadapter-generation-study-") as work:
        files = write_tables(Path(work) / "data")
        for i, (kind, cell, seed) in enumerate(grid):
            if i % shards == shard and (kind, cell, seed) not in done:
                record = run_one(kind, cell, seed, files, args, Path(work))
                with open(args.results, "a", encoding="utf-8") as f:  # one write per line: shards append safely
                    f.write(json.dumps(record, sort_keys=True) + "\n")
                results.append(record)
                print(
                    f"{kind} {cell} seed {seed}: test ROUGE-L {100 * record['test']['rougeL']:.2f} "
                    f"({record['wall_s']:.0f} s)",
                    flush=True,
                )
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
