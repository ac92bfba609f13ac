"""Labels as written in a file (cell text or JSON value) to a task's class id or float score."""

import math
from typing import Optional, Union

from ..tasks import TaskSpec


def class_id(value) -> Optional[int]:
    """The class id `value` spells ("3", 3, 3.0, "3.0"), or None; pandas likes writing ids as floats."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    try:
        f = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        return None
    return int(f) if math.isfinite(f) and f == int(f) else None


def convert_label(value, task: TaskSpec) -> Union[int, float]:
    """A raw label (file cell or JSON value) as the task's class id or float; ValueError says why not."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"label {value!r} is neither a number nor a string")
    if task.is_regression:
        try:
            f = float(value.strip() if isinstance(value, str) else value)
        except ValueError:
            raise ValueError(f"label {value!r} is not a number (task {task.name} is a regression)") from None
        if not math.isfinite(f):
            raise ValueError(f"label {value!r} is not finite")
        return f
    if task.label_names is not None:
        # Names first: for a custom task whose names are ("1", "bad"), the value 1 means "1", not id 1.
        key = str(value).strip()
        if key in task.label_names:
            return task.label_names.index(key)
        folded = [n.lower() for n in task.label_names]
        if key.lower() in folded:
            return folded.index(key.lower())
    i = class_id(value)
    if i is None:
        names = f" or one of {', '.join(task.label_names)}" if task.label_names else ""
        raise ValueError(f"unknown label {value!r} for task {task.name} (expected 0..{task.num_labels - 1}{names})")
    if not 0 <= i < task.num_labels:
        raise ValueError(f"label {i} is out of range for task {task.name} with {task.num_labels} classes")
    return i
