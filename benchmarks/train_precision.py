"""Training step time of the default `sparseadapter train` run (MiniLM, BBC News, Houlsby SNIP 40%) in fp32
and bf16, interleaved: one Run, the same batches, the precision switched between steps in alternating
order (fp32 bf16, bf16 fp32, ...), so that load from other work on the machine hits both alike. The
whole runs (accuracy, step times as each run sees them) are `sparseadapter train --precision ...`;
BENCHMARKS.md ("CPU bf16 training") has both.

    OMP_NUM_THREADS=1 python benchmarks/train_precision.py --pairs 16
"""

import argparse
import json
import statistics
import tempfile
import time

from sparseadapter.training.config import TrainConfig
from sparseadapter.training.run import Run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=16, help="timed (fp32, bf16) step pairs")
    parser.add_argument("--precisions", nargs=2, default=["fp32", "bf16"], choices=("fp32", "bf16"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(output_dir=out, overwrite=True, progress=False, max_steps=200, seed=0)
        run = Run(cfg, log=print)
        run.setup()
        run.model.train()
        run.train_step(0)  # warm-up, not timed
        times = {p: [] for p in args.precisions}
        for i in range(args.pairs):
            for p in args.precisions if i % 2 == 0 else args.precisions[::-1]:
                cfg.precision = p  # train_step reads it at each step (the scaler stays off: no fp16 here)
                start = time.perf_counter()
                run.train_step(1 + i)  # the same batch for both
                times[p].append(time.perf_counter() - start)
    a, b = args.precisions
    medians = {p: statistics.median(v) for p, v in times.items()}
    print(
        json.dumps(
            {
                "pairs": args.pairs,
                "median_s": medians,
                f"{b}_over_{a}": medians[b] / medians[a],
                "per_pair_ratio_median": statistics.median(y / x for x, y in zip(times[a], times[b])),
                "times_s": times,
            }
        )
    )


if __name__ == "__main__":
    main()
