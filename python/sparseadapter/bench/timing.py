"""Interleaved timing: every candidate is timed once per round, in rotating order, so load from other
processes falls on all of them alike; each candidate's blocks are merged and the median reported."""
from typing import Callable, Dict

import torch
from torch.utils import benchmark


def time_interleaved(fns: Dict[str, Callable[[], object]], *, rounds: int, min_run_time: float,
                     threads: int, cuda: bool = False) -> Dict[str, float]:
    """Median seconds per call of each fn (CUDA: synchronized after each call)."""
    names = list(fns)
    for fn in fns.values():  # warm-up (allocator, lazy init), untimed
        fn()
    blocks = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            fn = fns[name]
            stmt = "fn(); torch.cuda.synchronize()" if cuda else "fn()"
            timer = benchmark.Timer(stmt, globals={"fn": fn, "torch": torch}, num_threads=threads)
            blocks[name].append(timer.blocked_autorange(min_run_time=min_run_time / rounds))
    return {name: benchmark.Measurement.merge(ms)[0].median for name, ms in blocks.items()}
