"""Progress bars for the long steps (scoring, training, evaluation), on stderr so stdout stays the report."""
import sys

from tqdm.auto import tqdm


def progress_bar(iterable=None, *, desc: str, enabled: bool = True, **kwargs):
    """A tqdm bar; disabled, it is a silent pass-through with the same methods."""
    return tqdm(iterable, desc=desc, disable=not enabled, file=sys.stderr, dynamic_ncols=True,
                leave=False, **kwargs)
