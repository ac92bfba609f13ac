"""Progress for the long steps (scoring, training, evaluation), on stderr so stdout stays the report.

On a terminal (or in a notebook) a tqdm bar. Otherwise (a log file, a pipe, a batch job) plain lines,
one every PLAIN_INTERVAL_S seconds and one when the step ends: no carriage returns and no cursor
escape codes (`\\x1b[A`, which nested tqdm bars write), so logs stay readable.
"""

import sys
import time

from tqdm.auto import tqdm
from tqdm.autonotebook import tqdm as _chosen
from tqdm.std import tqdm as std_tqdm

PLAIN_INTERVAL_S = 30.0


def _interactive(stream) -> bool:
    if _chosen is not std_tqdm:  # tqdm.auto chose the notebook widget
        return True
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def progress_bar(iterable=None, *, desc: str, enabled: bool = True, stream=None, **kwargs):
    """A tqdm bar on a terminal, plain lines elsewhere; disabled, a silent pass-through with the same methods."""
    stream = stream if stream is not None else sys.stderr
    if enabled and not _interactive(stream):
        return PlainProgress(iterable, desc=desc, stream=stream, **kwargs)
    return tqdm(iterable, desc=desc, disable=not enabled, file=stream, dynamic_ncols=True, leave=False, **kwargs)


class PlainProgress:
    """The part of tqdm's interface the runs use, written as whole lines:

        train: 40/120 steps (33%), 12.1 s, 0.30 s/step, loss=0.4120

    The rate leaves out the time between `unpause()` and the update before it (evaluation, checkpoints)."""

    def __init__(
        self,
        iterable=None,
        *,
        desc: str,
        stream=None,
        total=None,
        initial: int = 0,
        unit: str = "it",
        interval: float = PLAIN_INTERVAL_S,
        **_ignored,
    ):
        self.iterable, self.desc, self.unit = iterable, desc, unit
        self.stream = stream if stream is not None else sys.stderr
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total, self.n, self.initial, self.interval = total, initial, initial, interval
        self.postfix = ""
        self.start = self.last_print = time.perf_counter()
        self.paused = 0.0
        self.last_update = self.start
        self.closed = False

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __len__(self):
        return self.total or 0

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        self.last_update = now
        if now - self.last_print >= self.interval:
            self._line(now)

    def unpause(self) -> None:
        """Leave the time since the last update out of the rate (it was spent on something else)."""
        now = time.perf_counter()
        self.paused += now - self.last_update
        self.last_update = now

    def set_postfix(self, refresh: bool = True, **values) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def set_description(self, desc: str, refresh: bool = True) -> None:
        self.desc = desc

    def refresh(self) -> None:
        pass

    def write(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.n > self.initial:
            self._line(time.perf_counter(), done=True)

    def _line(self, now: float, done: bool = False) -> None:
        self.last_print = now
        elapsed = now - self.start
        count = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        if self.total and not done:
            count += f" ({100 * self.n / self.total:.0f}%)"
        unit = self.unit if self.n == 1 else self.unit + ("es" if self.unit.endswith(("ch", "s", "sh", "x")) else "s")
        parts = [f"{self.desc}: {count} {unit}", f"{elapsed:.1f} s"]
        done_here = self.n - self.initial
        busy = self.last_update - self.start - self.paused
        if done_here > 0 and busy > 0:
            per = busy / done_here
            parts.append(f"{per:.3g} s/{self.unit}" if per >= 1 else f"{1000 * per:.3g} ms/{self.unit}")
        if self.postfix:
            parts.append(self.postfix)
        self.write(", ".join(parts))
