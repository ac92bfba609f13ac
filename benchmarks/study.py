"""The SparseAdapter study: do sparse adapters match dense ones, which pruner wins, and does Large-Sparse
beat the standard adapter at the same budget? MiniLM (all-MiniLM-L6-v2) on SST-2 and MRPC from the
GLUE copy in ../shared/glue, every run through `sparseadapter.training.train`.

Phases (each cell is one run; results are appended to --results as JSON lines, and cells already there
are skipped, so the study resumes where it stopped):
  lr      dense Houlsby, Pfeiffer and LoRA at each learning rate of LR_GRID; the best on validation
          (task's main metric) becomes that kind's learning rate for every later cell of the task
  grid    each kind x sparsity (SPARSITIES) x pruner (PRUNERS), plus the dense adapter, at that lr
  large   Large-Sparse: 2x width at 50% and 4x width at 75% (SNIP), same kept weights as the dense
          standard adapter
Seeds: --seeds 0 1 2 runs every cell of the chosen phases with each seed (the data subset is the same
for every seed; the seed moves initialization, pruning ties, data order and dropout).

    python benchmarks/study.py --phases lr grid large --seeds 0
    python benchmarks/study_report.py        # STUDY.md tables and PNG plots from the results
"""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from sparseadapter.training import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("houlsby", "pfeiffer", "lora")
SPARSITIES = (0.4, 0.6, 0.8, 0.9)
PRUNERS = ("random", "magnitude", "snip", "grasp", "synflow")
LR_GRID = {"houlsby": (1e-3, 3e-3), "pfeiffer": (1e-3, 3e-3), "lora": (1e-3, 3e-3)}
LARGE_SPARSE = ((2, 0.5), (4, 0.75))  # (width factor, sparsity of the widened adapter)
# Per task: the fixed subset sizes and sequence length that keep the study within about two hours at
# one thread on the 2-vCPU machine (measured step and eval costs are in STUDY.md).
TASKS = {
    "sst2": dict(data_dir="SST-2", max_train_examples=2048, max_eval_examples=872, max_length=64),
    "mrpc": dict(data_dir="MRPC", max_train_examples=2048, max_eval_examples=872, max_length=96),
}
COMMON = dict(model="minilm", epochs=1.0, batch_size=32, eval_batch_size=64, warmup_ratio=0.06,
              calibration_batches=4, checkpoint_every=0, progress=False, threads=1)


def cell_key(cell: dict) -> str:
    return json.dumps({k: cell[k] for k in sorted(cell)}, sort_keys=True)


def lr_cells(task, seed):
    return [dict(task=task, kind=k, sparsity=0.0, pruner="snip", large_sparse=1, lr=lr, seed=seed, phase="lr")
            for k in KINDS for lr in LR_GRID[k]]


def grid_cells(task, seed, lrs):
    cells = []
    for kind in KINDS:
        cells.append(dict(task=task, kind=kind, sparsity=0.0, pruner="snip", large_sparse=1, lr=lrs[kind],
                          seed=seed, phase="grid"))
        cells += [dict(task=task, kind=kind, sparsity=s, pruner=p, large_sparse=1, lr=lrs[kind], seed=seed,
                       phase="grid") for s in SPARSITIES for p in PRUNERS]
    return cells


def large_cells(task, seed, lrs):
    # large_sparse=k with standard sparsity s0 gives width k*r at 1-(1-s0)/k; s0 = 0 keeps the dense budget.
    return [dict(task=task, kind=kind, sparsity=0.0, pruner="snip", large_sparse=k, lr=lrs[kind], seed=seed,
                 phase="large") for kind in KINDS for k, _ in LARGE_SPARSE]


def best_lrs(results, task):
    """Per kind, the lr whose dense run (seed 0) scored best on validation."""
    out = {}
    for kind in KINDS:
        runs = [r for r in results if r["cell"]["phase"] == "lr" and r["cell"]["task"] == task
                and r["cell"]["kind"] == kind and r["cell"]["seed"] == 0]
        if not runs:
            return None
        best = max(runs, key=lambda r: r["validation"][r["main_metric"]])
        out[kind] = best["cell"]["lr"]
    return out


def run_cell(cell, glue_dir: Path, work: Path) -> dict:
    task_opts = dict(TASKS[cell["task"]])
    task_opts["data_dir"] = str(glue_dir / task_opts["data_dir"])
    cfg = TrainConfig(task=cell["task"], kind=cell["kind"], sparsity=cell["sparsity"], pruner=cell["pruner"],
                      large_sparse=cell["large_sparse"], lr=cell["lr"], seed=cell["seed"],
                      output_dir=str(work / "run"), overwrite=True, **task_opts, **COMMON)
    start = time.perf_counter()
    result = train(cfg, log=lambda *_: None)
    return {
        "cell": cell, "main_metric": result.task.main_metric, "validation": result.validation, "test": result.test,
        "parameters": result.counts, "effective_sparsity": cfg.adapter_config().effective_sparsity,
        "width": cfg.adapter_config().effective_bottleneck, "steps": result.steps, "timings": result.timings,
        "wall_s": time.perf_counter() - start, "torch": torch.__version__,
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--glue-dir", type=Path, default=ROOT.parent / "shared" / "glue")
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "study_results.jsonl")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    p.add_argument("--phases", nargs="+", default=["lr", "grid", "large"], choices=["lr", "grid", "large"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--only-sparsity", nargs="+", type=float, help="grid: restrict to these sparsities")
    p.add_argument("--only-pruner", nargs="+", help="grid: restrict to these pruners")
    p.add_argument("--only-kind", nargs="+", help="restrict to these adapter kinds")
    args = p.parse_args(argv)
    if not args.glue_dir.is_dir():
        sys.exit(f"GLUE data not found at {args.glue_dir} (see ../shared/glue/README.md)")
    torch.set_num_threads(1)
    results = [json.loads(line) for line in args.results.read_text().splitlines()] if args.results.exists() else []
    done = {cell_key(r["cell"]) for r in results}
    with tempfile.TemporaryDirectory(prefix="sparseadapter-study-") as work:
        for task in args.tasks:
            for phase in args.phases:
                for seed in args.seeds:
                    if phase == "lr":
                        cells = lr_cells(task, 0) if seed == 0 else []
                    else:
                        lrs = best_lrs(results, task)
                        if lrs is None:
                            print(f"{task}: run the lr phase first", file=sys.stderr)
                            break
                        cells = (grid_cells if phase == "grid" else large_cells)(task, seed, lrs)
                    cells = [c for c in cells if (not args.only_sparsity or c["sparsity"] in args.only_sparsity
                                                  or c["sparsity"] == 0.0)
                             and (not args.only_pruner or c["pruner"] in args.only_pruner or c["sparsity"] == 0.0)
                             and (not args.only_kind or c["kind"] in args.only_kind)]
                    for cell in cells:
                        if cell_key(cell) in done:
                            continue
                        record = run_cell(cell, args.glue_dir, Path(work))
                        results.append(record)
                        done.add(cell_key(cell))
                        with open(args.results, "a", encoding="utf-8") as f:
                            f.write(json.dumps(record, sort_keys=True) + "\n")
                        m = record["main_metric"]
                        print(f"{task} {phase} {cell['kind']:<8} s={cell['sparsity']:.1f} {cell['pruner']:<9} "
                              f"k={cell['large_sparse']} lr={cell['lr']:g} seed={seed}: "
                              f"val {m} {record['validation'][m]:.4f}  test {m} {record['test'][m]:.4f}  "
                              f"({record['wall_s']:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
