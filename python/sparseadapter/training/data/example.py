"""What every reader returns (`Example`), the error it raises (`DataError`, naming file and line), and
the splits they read."""

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from ..tasks import TaskSpec, get_task

SPLITS = ("train", "validation", "test")

PathLike = Union[str, Path]


@dataclass(frozen=True)
class Example:
    text: str
    text_pair: Optional[str]
    label: Optional[Union[int, float, str]]  # class id, float score (regression), target text (generation),
    #                                          or None when unlabelled


class DataError(ValueError):
    """Unreadable or inconsistent data; the message starts with `file:line:` where there is one."""

    def __init__(self, message: str, path: Optional[PathLike] = None, line: Optional[int] = None):
        where = "" if path is None else f"{path}:{line}: " if line is not None else f"{path}: "
        super().__init__(where + message)
        self.path, self.line = path, line


def as_task(task: Union[str, TaskSpec]) -> TaskSpec:
    """A task given by name or spec, as its spec."""
    return task if isinstance(task, TaskSpec) else get_task(task)


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {SPLITS}")
