"""The SparseAdapter study: do sparse adapters match dense ones, which pruner wins, and does Large-Sparse
beat the standard adapter at the same budget? MiniLM (all-MiniLM-L6-v2) on SST-2 and MRPC, every run
through `sparseadapter.training.train`.

The GLUE files are not part of the repository: pass the folder holding SST-2/ and MRPC/ (each with
train.tsv, validation.tsv, test.tsv) as --glue-dir, or set SPARSEADAPTER_DATA_DIR to a folder holding
glue/. Without either the study stops with a message saying so.

Cells (each one run; results are appended to --results as JSON lines, and cells already there are
skipped, so the study resumes where it stopped), in this order so that a study cut short still answers
the main questions on both tasks:
  lr      dense Houlsby, Pfeiffer and LoRA at each learning rate of LR_GRID (seed 0); the best on
          validation (the task's main metric) becomes that kind's learning rate for every later cell
  dense   the dense adapters at that learning rate (the reference line)
  large   Large-Sparse: 2x width at 50% and 4x width at 75% sparsity (SNIP), the same kept weights as
          the dense standard adapter
  grid    each kind x pruner (PRUNERS) at sparsity 0.8, then 0.4, 0.9, 0.6
  budget  Houlsby dense vs 80% sparse (SNIP, random) with 4x the training examples (seed 0)
--seeds 0 1 2 repeats every cell but the lr sweep with each seed (the data subset is the same for every
seed; the seed moves initialization, pruning ties, data order and dropout).

    python benchmarks/study.py --seeds 0
    python benchmarks/study_report.py        # docs/study.md tables and PNG plots from the results
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from sparseadapter.pruning import METHODS
from sparseadapter.training import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR_ENV = "SPARSEADAPTER_DATA_DIR"  # a folder holding glue/ (and sick/SICK.txt for benchmarks/sick.py)
KINDS = ("houlsby", "pfeiffer", "lora")
SPARSITIES = (0.8, 0.4, 0.9, 0.6)  # the order they run in
PRUNERS = METHODS  # every pruner, in the order the grid runs them
LR_GRID = {"houlsby": (1e-3, 3e-3), "pfeiffer": (1e-3, 3e-3), "lora": (3e-3, 1e-2)}
LARGE_SPARSE = ((2, 0.5), (4, 0.75))
BUDGET_EXAMPLES = 4096  # the budget stage: 256 steps instead of 64  # (width factor, sparsity of the widened adapter)
# Per task: the fixed subset sizes and sequence length that keep the study within about two hours at
# one thread on the 2-vCPU machine (measured step and eval costs are in docs/study.md).
# Validation and test: SST-2 872 of 6,735 / all 872; MRPC all 500 / 600 of 1,725 (fixed seeded subsets).
TASKS = {
    "sst2": dict(data_dir="SST-2", max_train_examples=1024, max_eval_examples=872, max_length=64),
    "mrpc": dict(data_dir="MRPC", max_train_examples=1024, max_eval_examples=600, max_length=96),
}
COMMON = dict(
    model="minilm",
    epochs=1.0,
    batch_size=16,
    eval_batch_size=64,
    warmup_ratio=0.06,
    calibration_batches=4,
    checkpoint_every=0,
    progress=False,
    threads=1,
)


def cell_key(c: dict) -> str:
    """What a run computes; the phase is left out, so the lr sweep's run at the chosen lr is the dense cell."""
    return json.dumps({k: c[k] for k in sorted(c) if k != "phase"}, sort_keys=True)


def glue_score(record: dict, split: str = "validation") -> float:
    """GLUE's convention: the mean of the task's metrics (MRPC: accuracy and F1)."""
    return sum(record[split][m] for m in record["metrics"]) / len(record["metrics"])


def cell(task, kind, seed, lr, phase, sparsity=0.0, pruner="snip", large_sparse=1):
    return dict(
        task=task, kind=kind, sparsity=sparsity, pruner=pruner, large_sparse=large_sparse, lr=lr, seed=seed, phase=phase
    )


def lr_cells(task, seed, lrs=None):
    return [cell(task, k, 0, lr, "lr") for k in KINDS for lr in LR_GRID[k]] if seed == 0 else []


def dense_cells(task, seed, lrs):
    return [cell(task, k, seed, lrs[k], "grid") for k in KINDS]


def large_cells(task, seed, lrs):
    # large_sparse=k at sparsity 0 builds k x the width at 1 - 1/k: the kept weights of the dense adapter.
    return [cell(task, k, seed, lrs[k], "large", large_sparse=f) for k in KINDS for f, _ in LARGE_SPARSE]


def sparse_cells(sparsity):
    def make(task, seed, lrs):
        return [cell(task, k, seed, lrs[k], "grid", sparsity, p) for k in KINDS for p in PRUNERS]

    return make


def budget_cells(task, seed, lrs):
    """Houlsby dense vs 80% sparse (SNIP, random) on BUDGET_EXAMPLES training examples (4x the steps),
    seed 0: does the gap close with more training?"""
    if seed != 0:
        return []
    cells = [cell(task, "houlsby", seed, lrs["houlsby"], "budget")] + [
        cell(task, "houlsby", seed, lrs["houlsby"], "budget", 0.8, p) for p in ("snip", "random")
    ]
    for c in cells:
        c["train_examples"] = BUDGET_EXAMPLES
    return cells


STAGES = (
    [("lr", lr_cells), ("dense", dense_cells), ("large", large_cells)]
    + [(f"sparsity {s}", sparse_cells(s)) for s in SPARSITIES]
    + [("budget", budget_cells)]
)


def best_lrs(results, task):
    """Per kind, the lr whose dense run (seed 0) scored best on validation (glue_score)."""
    out = {}
    for kind in KINDS:
        runs = [
            r
            for r in results
            if r["cell"]["phase"] == "lr"
            and r["cell"]["task"] == task
            and r["cell"]["kind"] == kind
            and r["cell"]["seed"] == 0
            and "error" not in r
        ]
        if not runs:
            return None
        best = max(runs, key=glue_score)
        out[kind] = best["cell"]["lr"]
    return out


def run_cell(c: dict, glue_dir: Path, work: Path) -> dict:
    task_opts = dict(TASKS[c["task"]])
    task_opts["data_dir"] = str(glue_dir / task_opts["data_dir"])
    if "train_examples" in c:
        task_opts["max_train_examples"] = c["train_examples"]
    cfg = TrainConfig(
        task=c["task"],
        kind=c["kind"],
        sparsity=c["sparsity"],
        pruner=c["pruner"],
        large_sparse=c["large_sparse"],
        lr=c["lr"],
        seed=c["seed"],
        output_dir=str(work / "run"),
        overwrite=True,
        **task_opts,
        **COMMON,
    )
    start = time.perf_counter()
    result = train(cfg, log=lambda *_: None)
    return {
        "cell": c,
        "main_metric": result.task.main_metric,
        "metrics": list(result.task.metrics),
        "validation": result.validation,
        "test": result.test,
        "parameters": result.counts,
        "effective_sparsity": cfg.adapter_config().effective_sparsity,
        "width": cfg.adapter_config().effective_bottleneck,
        "steps": result.steps,
        "timings": result.timings,
        "wall_s": time.perf_counter() - start,
        "torch": torch.__version__,
    }


def default_glue_dir() -> Path | None:
    root = os.environ.get(DATA_DIR_ENV)
    return Path(root) / "glue" if root else None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--glue-dir",
        type=Path,
        default=default_glue_dir(),
        help=f"the folder holding SST-2/ and MRPC/ (default: ${DATA_DIR_ENV}/glue)",
    )
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "study" / "study_results.jsonl")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--stages", nargs="+", default=[name for name, _ in STAGES], help="a subset of the stages")
    args = p.parse_args(argv)
    if args.glue_dir is None:
        sys.exit(f"no GLUE data: pass --glue-dir (the folder holding SST-2/ and MRPC/) or set {DATA_DIR_ENV}")
    missing = [
        d
        for d in ("SST-2", "MRPC")
        if d in {TASKS[t]["data_dir"] for t in args.tasks} and not (args.glue_dir / d).is_dir()
    ]
    if missing:
        sys.exit(f"GLUE data not found: {args.glue_dir} has no {', '.join(missing)} folder")
    torch.set_num_threads(1)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    results = [json.loads(line) for line in args.results.read_text().splitlines()] if args.results.exists() else []
    done = {cell_key(r["cell"]) for r in results}
    with tempfile.TemporaryDirectory(prefix="sparseadapter-study-") as work:
        for stage, make in STAGES:
            if stage not in args.stages:
                continue
            for seed in args.seeds:
                for task in args.tasks:
                    lrs = best_lrs(results, task)
                    if stage != "lr" and lrs is None:
                        sys.exit(f"{task}: the lr stage has not run yet")
                    for c in make(task, seed, lrs):
                        if cell_key(c) in done:
                            continue
                        try:
                            record = run_cell(c, args.glue_dir, Path(work))
                        except ValueError as err:  # e.g. a pruner that would empty a whole matrix: a result too
                            record = {"cell": c, "error": str(err), "torch": torch.__version__}
                        results.append(record)
                        done.add(cell_key(c))
                        with open(args.results, "a", encoding="utf-8") as f:
                            f.write(json.dumps(record, sort_keys=True) + "\n")
                        if "error" in record:
                            print(
                                f"{task} {stage:<12} {c['kind']:<8} s={c['sparsity']:.1f} {c['pruner']:<9} "
                                f"seed={seed}: refused: {record['error'][:160]}",
                                flush=True,
                            )
                            continue
                        m = record["main_metric"]
                        print(
                            f"{task} {stage:<12} {c['kind']:<8} s={c['sparsity']:.1f} {c['pruner']:<9} "
                            f"k={c['large_sparse']} lr={c['lr']:g} seed={seed}: "
                            f"val {m} {record['validation'][m]:.4f}  test {m} {record['test'][m]:.4f}  "
                            f"({record['wall_s']:.0f} s)",
                            flush=True,
                        )


if __name__ == "__main__":
    main()
