"""The task your own table files define: its classes (ids or names) or a regression, from the labels
they hold, with every label that would silently change the classifier refused."""

import math
from pathlib import Path
from typing import Dict, List, Sequence, Tuple, Union

from ..tasks import TaskSpec
from .example import DataError, PathLike
from .labels import class_id, convert_label
from .tables import table_rows


def infer_table_task(paths: Union[PathLike, Sequence[PathLike]], regression: bool = False) -> TaskSpec:
    """A "custom" TaskSpec for your own table files, from the labels they hold. The first path is the
    training file; the others (validation, test) may be unlabelled.

    Integer labels (all of them) are class ids 0..num_labels-1, num_labels = max + 1. Otherwise labels
    are names, and the classes are the sorted distinct names. regression=True makes float labels and
    num_labels 1. pair is True when any row has a text_pair.

    Refused, with the file and line (each of these would silently change the classifier's outputs):
    a class (id or name) with no example in the training file, so also a far-off id (0, 1 and
    1000000000000 would make a 10^12-class head); names that differ only in case or surrounding
    space ("Pos" and "pos"); numbers that are not class ids (1.5, NaN) among the labels.
    """
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    labelled, pair = [], False
    for path in paths:
        for r in table_rows(path):
            pair = pair or r.text_pair is not None
            if r.label is not None:
                labelled.append((path, r.line, r.label))
    if not labelled:
        raise DataError(f"no labels in {', '.join(map(str, paths))}; cannot infer the task")
    if regression:
        probe = TaskSpec("custom", 1, metrics=("pearson", "spearman"), main_metric="pearson", pair=pair)
        for path, line, raw in labelled:
            try:
                convert_label(raw, probe)
            except ValueError as e:
                raise DataError(str(e), path, line) from None
        return probe
    train = paths[0]
    ids = [class_id(raw) for _, _, raw in labelled]
    if all(i is not None for i in ids):
        for (path, line, raw), i in zip(labelled, ids):
            if i < 0:
                raise DataError(f"negative class id {raw!r}", path, line)
        n = max(ids) + 1
        if n < 2:
            raise DataError(
                "every label is 0; a classifier needs at least two classes (labels are ids 0..num_labels-1)",
                labelled[0][0],
            )
        present = set(ids)
        if len(present) < n:
            gaps = [i for i in range(min(n, len(present) + 3)) if i not in present][:3]
            (path, line, raw), top = max(zip(labelled, ids), key=lambda x: x[1])[0], n - 1
            raise DataError(
                f"label {raw!r} makes {n:,} classes (ids 0..{top:,}), but {n - len(present):,} of those ids "
                f"(e.g. {', '.join(map(str, gaps))}) have no example: integer labels are class ids 0..num_labels-1. "
                f"Renumber the classes, or write the labels as names (e.g. 'c{raw}') to have them mapped to ids",
                path,
                line,
            )
        _check_trained(labelled, [str(i) for i in ids], train, lambda k: f"class id {k}")
        return TaskSpec("custom", n, metrics=("accuracy", "macro_f1"), pair=pair)
    path, line, raw = next(x for x, i in zip(labelled, ids) if i is None)
    if all(isinstance(r, (int, float)) or _is_float(r) for _, _, r in labelled):
        raise DataError(f"label {raw!r} is a number but not a class id; pass regression=True for scores", path, line)
    for (path, line, raw), i in zip(labelled, ids):
        if i is None and _is_float(raw):
            why = "not an integer" if math.isfinite(float(raw)) else "not finite"
            raise DataError(
                f"label {raw!r} is a number that is not a class id ({why}) among class names: a missing "
                "or corrupted value?",
                path,
                line,
            )
    names = [str(r).strip() for _, _, r in labelled]
    spelled: Dict[str, Tuple[str, PathLike, int]] = {}
    for (path, line, _), name in zip(labelled, names):
        first = spelled.setdefault(name.casefold(), (name, path, line))
        if first[0] != name:
            raise DataError(
                f"label {name!r} and label {first[0]!r} ({first[1]}:{first[2]}) differ only in case: "
                "one class or two? Spell each class one way",
                path,
                line,
            )
    distinct = tuple(sorted(set(names)))
    if len(distinct) < 2:
        raise DataError(f"every label is {distinct[0]!r}; a classifier needs at least two classes", labelled[0][0])
    _check_trained(labelled, names, train, lambda k: f"class {k!r}")
    return TaskSpec("custom", len(distinct), distinct, ("accuracy", "macro_f1"), pair=pair)


def _check_trained(labelled, keys: List[str], train: PathLike, spell) -> None:
    """Every class occurs in the training file: a class seen only in validation or test data gets an
    output the model cannot learn, and counts in macro-F1."""
    trained = {k for (path, _, _), k in zip(labelled, keys) if path == train}
    for (path, line, _), k in zip(labelled, keys):
        if k not in trained:
            raise DataError(
                f"{spell(k)} does not occur in the training file {train}: the model could not learn "
                "it. Fix the label, or add training examples of it",
                path,
                line,
            )


def _is_float(value) -> bool:
    try:
        float(value)
        return True
    except (TypeError, ValueError):
        return False
