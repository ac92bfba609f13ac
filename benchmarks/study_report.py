"""Tables and plots of the SparseAdapter study (benchmarks/study.py) from its JSON-lines results.

    python benchmarks/study_report.py --results benchmarks/study/study_results.jsonl

prints the Markdown tables (test scores, mean ± std over seeds) and writes the plots, one PNG per task
(accuracy vs sparsity per pruner, the dense adapter as a line: the paper's Figure 2), to --figures.
docs/study.md quotes both; the prose there is written from them.
"""

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

from sparseadapter.pruning import METHODS

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("houlsby", "pfeiffer", "lora")
PRUNERS = METHODS  # the columns of the grid tables
SPARSITIES = (0.4, 0.6, 0.8, 0.9)
TASK_TITLES = {"sst2": "SST-2", "mrpc": "MRPC"}


def load(path: Path):
    """(runs, refusals): a refusal is a cell whose pruning the library refused (the error is recorded)."""
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if "error" not in r], [r for r in records if "error" in r]


def score(record: dict, split: str = "test") -> float:
    """The task's reported number: accuracy for SST-2, the mean of accuracy and F1 for MRPC (GLUE)."""
    metrics = record["metrics"]
    return 100.0 * sum(record[split][m] for m in metrics) / len(metrics)


def chosen_lr(results, task, kind):
    runs = [
        r for r in results if r["cell"]["phase"] == "lr" and r["cell"]["task"] == task and r["cell"]["kind"] == kind
    ]
    return max(runs, key=lambda r: score(r, "validation"))["cell"]["lr"] if runs else None


def group(results):
    """(task, kind, sparsity, pruner, large_sparse) -> test scores over seeds, at the chosen lr."""
    cells = defaultdict(list)
    for r in results:
        c = r["cell"]
        if c["lr"] != chosen_lr(results, c["task"], c["kind"]) or "train_examples" in c:
            continue  # the budget stage is reported on its own
        pruner = c["pruner"] if (c["sparsity"] > 0 or c["large_sparse"] > 1) else "dense"
        cells[(c["task"], c["kind"], c["sparsity"], pruner, c["large_sparse"])].append(score(r))
    return cells


REFUSED = set()  # cells whose pruning the library refused (it would have emptied whole matrices)


def fmt(values, key=None) -> str:
    """mean ± sample std over seeds, with the number of seeds when more than one ran."""
    if not values:
        return "refused" if key in REFUSED else "–"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f} ({len(values)})"


def collapsed(record: dict) -> bool:
    """The run predicts one class for every test example: its accuracy is a class's share of the test set."""
    shares = {"sst2": (444 / 872, 428 / 872)}.get(record["cell"]["task"], ())
    return any(abs(record["test"]["accuracy"] - share) < 1e-9 for share in shares)


def collapse_table(results, task) -> str:
    """How many runs per (kind, sparsity) ended predicting a single class."""
    counts = defaultdict(lambda: [0, 0])
    for r in results:
        c = r["cell"]
        if (
            c["task"] != task
            or c["lr"] != chosen_lr(results, task, c["kind"])
            or c["large_sparse"] != 1
            or "train_examples" in c
        ):
            continue
        key = (c["kind"], c["sparsity"])
        counts[key][0] += collapsed(r)
        counts[key][1] += 1
    sparsities = (0.0,) + SPARSITIES
    lines = [
        "| adapter | " + " | ".join("dense" if s == 0 else f"{s:.0%}" for s in sparsities) + " |",
        "|---|" + "---|" * len(sparsities),
    ]
    for kind in KINDS:
        row = [f"{counts[(kind, s)][0]} / {counts[(kind, s)][1]}" if counts[(kind, s)][1] else "–" for s in sparsities]
        lines.append(f"| {kind} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def mean(values):
    return statistics.mean(values) if values else None


def grid_table(cells, task) -> str:
    head = "| adapter | pruner | dense | " + " | ".join(f"{s:.0%}" for s in SPARSITIES) + " |"
    lines = [head, "|---|---|---|" + "---|" * len(SPARSITIES)]
    for kind in KINDS:
        dense = fmt(cells.get((task, kind, 0.0, "dense", 1), []))
        for pruner in PRUNERS:
            row = [fmt(cells.get((task, kind, s, pruner, 1), []), (task, kind, s, pruner, 1)) for s in SPARSITIES]
            lines.append(f"| {kind} | {pruner} | {dense} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def large_table(cells, task, results) -> str:
    lines = [
        "| adapter | standard (r, dense) | 2x r, 50% sparse | 4x r, 75% sparse | kept weights |",
        "|---|---|---|---|---|",
    ]
    for kind in KINDS:
        nnz = {
            r["cell"]["large_sparse"]: r["parameters"]["sparse_nnz"] or r["parameters"]["trainable"]
            for r in results
            if r["cell"]["task"] == task and r["cell"]["kind"] == kind and r["cell"]["sparsity"] == 0.0
        }
        kept = sorted({v for k, v in nnz.items() if k > 1})
        row = [fmt(cells.get((task, kind, 0.0, "dense", 1), []))] + [
            fmt(cells.get((task, kind, 0.0, "snip", k), [])) for k in (2, 4)
        ]
        lines.append(f"| {kind} | " + " | ".join(row) + f" | {', '.join(f'{k:,}' for k in kept) or '–'} |")
    return "\n".join(lines)


def pruner_ranking(cells, task) -> str:
    """Mean test score over kinds and sparsities, and how many (kind, sparsity) cells each pruner wins."""
    wins = defaultdict(int)
    totals = defaultdict(list)
    for kind in KINDS:
        for s in SPARSITIES:
            row = {p: mean(cells.get((task, kind, s, p, 1), [])) for p in PRUNERS}
            row = {p: v for p, v in row.items() if v is not None}
            if len(row) == len(PRUNERS):
                best = max(row.values())
                for p, v in row.items():
                    totals[p].append(v)
                    wins[p] += v == best
    lines = ["| pruner | mean test score | cells won (ties count for each) |", "|---|---|---|"]
    for p in sorted(totals, key=lambda p: -statistics.mean(totals[p])):
        lines.append(f"| {p} | {statistics.mean(totals[p]):.2f} | {wins[p]} of {len(totals[p])} |")
    return "\n".join(lines)


def gap_table(cells, task) -> str:
    """Sparse minus dense, per kind and sparsity: the best pruner and the mean over pruners."""
    lines = [
        "| adapter | " + " | ".join(f"{s:.0%}: best / mean" for s in SPARSITIES) + " |",
        "|---|" + "---|" * len(SPARSITIES),
    ]
    for kind in KINDS:
        dense = mean(cells.get((task, kind, 0.0, "dense", 1), []))
        row = []
        for s in SPARSITIES:
            vals = [mean(cells.get((task, kind, s, p, 1), [])) for p in PRUNERS]
            vals = [v for v in vals if v is not None]
            row.append(f"{max(vals) - dense:+.1f} / {statistics.mean(vals) - dense:+.1f}" if vals and dense else "–")
        lines.append(f"| {kind} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def budget_table(results, cells, task) -> str:
    """Houlsby dense vs 80% sparse at the grid's budget and with more training examples (seed 0)."""
    runs = [r for r in results if r["cell"]["task"] == task and "train_examples" in r["cell"]]
    if not runs:
        return ""
    steps = max(r["steps"] for r in runs)  # the task may have fewer examples than asked for
    lines = [
        f"| houlsby | 1,024 examples (64 steps), seed 0 | {steps * 16:,} examples at most ({steps} steps), seed 0 |",
        "|---|---|---|",
    ]
    for label, sparsity, pruner in (("dense", 0.0, "dense"), ("80% SNIP", 0.8, "snip"), ("80% random", 0.8, "random")):
        small = [
            score(r)
            for r in results
            if r["cell"]["task"] == task
            and r["cell"]["kind"] == "houlsby"
            and r["cell"]["seed"] == 0
            and "train_examples" not in r["cell"]
            and r["cell"]["phase"] != "lr"
            and r["cell"]["large_sparse"] == 1
            and r["cell"]["sparsity"] == sparsity
            and (sparsity == 0.0 or r["cell"]["pruner"] == pruner)
        ]
        if sparsity == 0.0:
            small = [
                score(r)
                for r in results
                if r["cell"]["task"] == task
                and r["cell"]["kind"] == "houlsby"
                and r["cell"]["seed"] == 0
                and r["cell"]["phase"] == "lr"
                and r["cell"]["lr"] == chosen_lr(results, task, "houlsby")
            ]
        big = [
            score(r)
            for r in runs
            if r["cell"]["sparsity"] == sparsity and (sparsity == 0.0 or r["cell"]["pruner"] == pruner)
        ]
        lines.append(f"| {label} | {fmt(small)} | {fmt(big)} |")
    return "\n".join(lines)


def plot(cells, task, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(KINDS), figsize=(4.2 * len(KINDS), 3.6), sharey=True)
    for ax, kind in zip(axes, KINDS):
        dense_runs = cells.get((task, kind, 0.0, "dense", 1), [])
        if dense_runs:
            dense = mean(dense_runs)
            ax.axhline(dense, color="black", linestyle="--", linewidth=1.2, label="dense adapter (± std)")
            if len(dense_runs) > 1:
                spread = statistics.stdev(dense_runs)
                ax.axhspan(dense - spread, dense + spread, color="black", alpha=0.08)
        if task == "sst2":
            ax.axhline(100 * 444 / 872, color="gray", linestyle=":", linewidth=1, label="one class (50.9)")
        for pruner in PRUNERS:
            xs = [s for s in SPARSITIES if cells.get((task, kind, s, pruner, 1))]
            runs = [cells[(task, kind, s, pruner, 1)] for s in xs]
            if xs:
                ax.errorbar(
                    [100 * x for x in xs],
                    [mean(r) for r in runs],
                    marker="o",
                    capsize=3,
                    yerr=[statistics.stdev(r) if len(r) > 1 else 0.0 for r in runs],
                    label=pruner,
                )
        ax.set_title(f"{TASK_TITLES[task]} – {kind}")
        ax.set_xlabel("sparsity (%)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test " + ("accuracy" if task == "sst2" else "(accuracy + F1) / 2"))
    axes[-1].legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "study" / "study_results.jsonl")
    p.add_argument("--figures", type=Path, default=ROOT / "benchmarks" / "study")
    args = p.parse_args(argv)
    results, refusals = load(args.results)
    cells = group(results)
    for r in refusals:  # shown in the grid as "refused"
        c = r["cell"]
        cells.setdefault((c["task"], c["kind"], c["sparsity"], c["pruner"], c["large_sparse"]), [])
        REFUSED.add((c["task"], c["kind"], c["sparsity"], c["pruner"], c["large_sparse"]))
    tasks = [t for t in TASK_TITLES if any(r["cell"]["task"] == t for r in results)]
    seeds = sorted({r["cell"]["seed"] for r in results})
    hours = sum(r["wall_s"] for r in results) / 3600
    print(f"{len(results)} runs, seeds {seeds}, {hours:.2f} h of compute\n")
    for r in refusals:
        c = r["cell"]
        print(
            f"refused: {c['task']} {c['kind']} {c['pruner']} at {c['sparsity']:.0%} seed {c['seed']}: {r['error'][:200]}"
        )
    for task in tasks:
        print(f"## {TASK_TITLES[task]}\n")
        lrs = {k: chosen_lr(results, task, k) for k in KINDS}
        print("lr sweep (validation):")
        for r in results:
            if r["cell"]["phase"] == "lr" and r["cell"]["task"] == task:
                print(
                    f"  {r['cell']['kind']:<8} lr {r['cell']['lr']:g}: validation {score(r, 'validation'):.1f}, "
                    f"test {score(r):.1f}{'  <- chosen' if lrs[r['cell']['kind']] == r['cell']['lr'] else ''}"
                )
        print(
            f"\n{grid_table(cells, task)}\n\n{gap_table(cells, task)}\n\n{pruner_ranking(cells, task)}\n\n"
            f"{large_table(cells, task, results)}\n"
        )
        if task == "sst2":
            print(f"runs that predict one class on test (all pruners, all seeds):\n\n{collapse_table(results, task)}\n")
        budget = budget_table(results, cells, task)
        if budget:
            print(f"training budget (test score):\n\n{budget}\n")
        args.figures.mkdir(parents=True, exist_ok=True)
        plot(cells, task, args.figures / f"{task}_accuracy_vs_sparsity.png")


if __name__ == "__main__":
    main()
