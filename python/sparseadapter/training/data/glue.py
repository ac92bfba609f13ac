"""GLUE: a task's split from the official-style TSV files, or from the Hugging Face hub (the `datasets`
package)."""

import csv
import itertools
from pathlib import Path
from typing import List, NamedTuple, Optional, Tuple, Union

from ..tasks import TaskSpec, normalize_task_name
from .example import DataError, Example, PathLike, as_task, check_split
from .files import delimited
from .labels import convert_label

# ------------------------------------------------------------------------------------------ TSV files


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
    spec = as_task(task)
    check_split(split)
    if spec.name not in _GLUE:
        raise ValueError(f"{spec.name} is not a GLUE task; GLUE tasks: {', '.join(_GLUE)}")
    layout = _GLUE[spec.name]
    path = _glue_file(spec, Path(data_dir), split)
    records = delimited(path, "\t", csv.QUOTE_NONE)
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
                label = convert_label(raw, spec)
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
    spec = as_task(task)
    check_split(split)
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
            label = None if raw == -1 else convert_label(raw, spec)
        except ValueError as e:
            raise DataError(f"row {i}: {e}", source) from None
        out.append(Example(text, pair, label))
    return out
