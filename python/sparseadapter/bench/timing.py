"""Interleaved timing: every candidate is timed once per round, in rotating order, so load from other
processes falls on all of them alike; each candidate's blocks are merged and the median reported."""

import time
from typing import Callable, Dict, List, Tuple

import torch
from torch.utils import benchmark


def time_interleaved(
    fns: Dict[str, Callable[[], object]], *, rounds: int, min_run_time: float, threads: int, cuda: bool = False
) -> Dict[str, float]:
    """Median seconds per call of each fn (CUDA: synchronized after each call)."""
    names = list(fns)
    for fn in fns.values():  # warm-up (allocator, lazy init), untimed
        fn()
    blocks = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            fn = fns[name]
            stmt = "fn(); torch.cuda.synchronize()" if cuda else "fn()"
            timer = benchmark.Timer(stmt, globals={"fn": fn, "torch": torch}, num_threads=threads)
            blocks[name].append(timer.blocked_autorange(min_run_time=min_run_time / rounds))
    return {name: benchmark.Measurement.merge(ms)[0].median for name, ms in blocks.items()}


def time_calls_interleaved(
    fns: Dict[str, Callable[[], object]], *, rounds: int, warmup: int = 0, cuda: bool = False
) -> Tuple[Dict[str, List[float]], Dict[str, BaseException]]:
    """Exactly `warmup` untimed calls, then `rounds` timed calls of each fn, one per round in rotating
    order; for long calls (a training step), where one call is one sample.

    Returns the seconds of each timed call by name, and the exception of every fn that raised: it is
    dropped from the later rounds, the others go on. CUDA: synchronized before and after each call.
    """
    names = list(fns)
    samples: Dict[str, List[float]] = {name: [] for name in names}
    errors: Dict[str, BaseException] = {}
    for r in range(warmup + rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            if name in errors:
                continue
            try:
                if cuda:
                    torch.cuda.synchronize()
                start = time.perf_counter()
                fns[name]()
                if cuda:
                    torch.cuda.synchronize()
                elapsed = time.perf_counter() - start
            except Exception as err:  # noqa: BLE001 (reported by the caller, the other fns go on)
                errors[name] = err.with_traceback(None)  # frees the failed call's tensors
                continue
            if r >= warmup:
                samples[name].append(elapsed)
    return samples, errors
