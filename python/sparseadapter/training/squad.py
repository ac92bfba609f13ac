"""SQuAD: the JSON format of extractive question answering (v1.1 and v2.0), and its official scores.

Reading: `read_squad(path)` gives one `QAExample` per question, its context and reference answers (the
character span of each in the context), and whether the file is v2.0 (questions may be unanswerable:
`is_impossible`, no answers). Bad input raises `DataError` naming the file and the article, paragraph
and question where it is.

Scoring (`squad_scores`), exactly as the official evaluation script of SQuAD v2.0 (which scores v1.1
the same way on answerable questions): answers are normalized (lower case, punctuation and the articles
a/an/the removed, whitespace collapsed); exact match is 1 when the normalized prediction equals a
normalized reference; F1 is the harmonic mean of token precision and recall over whitespace tokens,
bag-of-words; each question takes its best over its references; an unanswerable question (no non-empty
reference) is right, exact and F1 both 1, only for an empty prediction, and an empty prediction scores 0
on an answerable one. Scores are percentages (0-100), as the official script prints them.
"""

import collections
import json
import math
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

from .data.example import DataError
from .data.files import read_text

PathLike = Union[str, Path]


@dataclass(frozen=True)
class Answer:
    text: str
    start: int  # character offset in the context

    @property
    def end(self) -> int:
        return self.start + len(self.text)


@dataclass(frozen=True)
class QAExample:
    """One question on one context. answers: the reference answers, () for an unanswerable question;
    None when the file gives none for an answerable one (unlabelled data, e.g. for `predict`)."""

    id: str
    question: str
    context: str
    answers: Optional[Tuple[Answer, ...]]
    is_impossible: bool = False
    title: str = ""

    @property
    def labelled(self) -> bool:
        return self.answers is not None

    @property
    def reference_texts(self) -> List[str]:
        """The official script's gold answers: the non-empty reference texts, or [""] when there are none."""
        texts = [a.text for a in (self.answers or ()) if normalize_answer(a.text)]
        return texts or [""]


@dataclass(frozen=True)
class SquadFile:
    examples: Tuple[QAExample, ...]
    version_2: bool  # the file is v2.0 (or has unanswerable questions)
    realigned: int = 0  # answers whose answer_start did not match their text, moved to the nearest match

    def titles(self) -> List[str]:
        return list(dict.fromkeys(e.title for e in self.examples))


def _where(article: int, paragraph: Optional[int] = None, question: Optional[int] = None, title: str = "") -> str:
    text = f"article {article + 1}" + (f" ({title!r})" if title else "")
    if paragraph is not None:
        text += f", paragraph {paragraph + 1}"
    if question is not None:
        text += f", question {question + 1}"
    return text


def _align(context: str, text: str, start) -> Optional[int]:
    """The answer's start: `start` when the context holds `text` there, else the nearest place it does."""
    if isinstance(start, int) and not isinstance(start, bool) and context[start : start + len(text)] == text:
        return start
    places = [m.start() for m in re.finditer(re.escape(text), context)]
    if not places:
        return None
    near = start if isinstance(start, int) and not isinstance(start, bool) else 0
    return min(places, key=lambda p: (abs(p - near), p))


def parse_squad(data, source: PathLike = "squad") -> SquadFile:
    """SquadFile from the parsed JSON of a SQuAD file (see read_squad)."""
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise DataError('not a SQuAD file: expected a JSON object with a "data" list of articles', source)
    version = str(data.get("version", ""))
    examples: List[QAExample] = []
    seen: Dict[str, str] = {}
    realigned = 0
    impossible_any = False
    for a, article in enumerate(data["data"]):
        if not isinstance(article, dict) or not isinstance(article.get("paragraphs"), list):
            raise DataError(f'{_where(a)}: expected an object with a "paragraphs" list', source)
        title = article.get("title", "")
        title = title if isinstance(title, str) else str(title)
        for p, paragraph in enumerate(article["paragraphs"]):
            where = _where(a, p, title=title)
            if not isinstance(paragraph, dict):
                raise DataError(f'{where}: expected an object with "context" and "qas"', source)
            context = paragraph.get("context")
            if not isinstance(context, str) or not context.strip():
                raise DataError(f'{where}: missing or empty "context"', source)
            qas = paragraph.get("qas")
            if not isinstance(qas, list):
                raise DataError(f'{where}: "qas" must be a list of questions', source)
            for q, qa in enumerate(qas):
                where = _where(a, p, q, title)
                if not isinstance(qa, dict):
                    raise DataError(f'{where}: expected an object with "id", "question" and "answers"', source)
                qid, question = qa.get("id"), qa.get("question")
                if not isinstance(qid, str) or not qid:
                    raise DataError(f'{where}: missing "id"', source)
                if qid in seen:
                    raise DataError(f"{where}: id {qid!r} repeats ({seen[qid]})", source)
                seen[qid] = where
                if not isinstance(question, str) or not question.strip():
                    raise DataError(f'{where} ({qid}): missing or empty "question"', source)
                impossible = qa.get("is_impossible", False)
                if not isinstance(impossible, bool):
                    raise DataError(f'{where} ({qid}): "is_impossible" must be true or false', source)
                raw = qa.get("answers", [])
                if not isinstance(raw, list):
                    raise DataError(f'{where} ({qid}): "answers" must be a list', source)
                answers = []
                for r in raw:
                    if not isinstance(r, dict) or not isinstance(r.get("text"), str):
                        raise DataError(f'{where} ({qid}): each answer needs a "text" and an "answer_start"', source)
                    text = r["text"]
                    if not text.strip():
                        continue
                    start = _align(context, text, r.get("answer_start"))
                    if start is None:
                        raise DataError(f"{where} ({qid}): the answer {text!r} is not in the context", source)
                    realigned += start != r.get("answer_start")
                    answers.append(Answer(text, start))
                if impossible and answers:
                    raise DataError(f"{where} ({qid}): an unanswerable question (is_impossible) with answers", source)
                impossible_any |= impossible
                labels = tuple(answers) if answers or impossible else None
                examples.append(QAExample(qid, question.strip(), context, labels, impossible, title))
    if not examples:
        raise DataError("no questions", source)
    return SquadFile(tuple(examples), version.startswith("v2") or version.startswith("2") or impossible_any, realigned)


def read_squad(path: PathLike) -> SquadFile:
    """The questions of a SQuAD JSON file (v1.1 or v2.0; `{"version", "data": [{"title", "paragraphs":
    [{"context", "qas": [{"id", "question", "answers": [{"text", "answer_start"}], "is_impossible"}]}]}]}`).

    An answer whose answer_start does not point at its text is moved to the nearest place the context
    holds it (counted in `realigned`); one the context does not hold at all is an error. A question
    with no answers is unanswerable when `is_impossible` says so, else unlabelled (answers None).
    """
    path = Path(path)
    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError as err:
        raise DataError(f"not valid JSON: {err}", path) from None
    return parse_squad(data, path)


def split_by_title(squad: SquadFile, titles: Sequence[str]) -> Tuple[List[QAExample], List[QAExample]]:
    """(questions of the articles named in `titles`, the others)."""
    chosen = set(titles)
    unknown = chosen - set(squad.titles())
    if unknown:
        raise ValueError(f"no article titled {sorted(unknown)[0]!r}; articles: {', '.join(squad.titles())}")
    inside = [e for e in squad.examples if e.title in chosen]
    return inside, [e for e in squad.examples if e.title not in chosen]


def to_squad_json(examples: Sequence[QAExample], version_2: bool = True) -> dict:
    """Questions back in the SQuAD JSON layout (articles by title, paragraphs by context, in first-seen order)."""
    articles: Dict[str, Dict[str, List[dict]]] = {}
    for e in examples:
        qa = {
            "id": e.id,
            "question": e.question,
            "answers": [{"text": a.text, "answer_start": a.start} for a in (e.answers or ())],
        }
        if version_2:
            qa["is_impossible"] = e.is_impossible
        articles.setdefault(e.title, {}).setdefault(e.context, []).append(qa)
    return {
        "version": "v2.0" if version_2 else "1.1",
        "data": [
            {"title": t, "paragraphs": [{"context": c, "qas": q} for c, q in paragraphs.items()]}
            for t, paragraphs in articles.items()
        ],
    }


# ------------------------------------------------------------------------------------------ official scores

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """The official normalization: lower case, punctuation removed, articles removed, whitespace collapsed."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> int:
    return int(normalize_answer(prediction) == normalize_answer(reference))


def f1_score(prediction: str, reference: str) -> float:
    """Token F1 of the normalized answers (bag of words); when either is empty, 1 if both are, else 0."""
    pred, gold = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not gold:
        return float(pred == gold)
    common = collections.Counter(pred) & collections.Counter(gold)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def best_scores(prediction: str, example: QAExample) -> Tuple[int, float]:
    """(exact, F1) of one prediction, the best over the question's references."""
    refs = example.reference_texts
    return max(exact_match(prediction, r) for r in refs), max(f1_score(prediction, r) for r in refs)


def squad_scores(examples: Sequence[QAExample], predictions: Mapping[str, str]) -> Dict[str, float]:
    """The official scores of `predictions` ({id: answer text}, "" for no answer) on labelled `examples`:
    exact and f1 (percent) over all questions, and has_answer_* / no_answer_* on each part. A question
    without a prediction scores 0."""
    labelled = [e for e in examples if e.labelled]
    if not labelled:
        raise ValueError("no labelled questions to score")
    per = {e.id: best_scores(predictions[e.id], e) if e.id in predictions else (0, 0.0) for e in labelled}
    out = _totals(per, [e.id for e in labelled], "")
    # the official script's split: by whether the question lists answers at all
    out.update(_totals(per, [e.id for e in labelled if e.answers], "has_answer_"))
    out.update(_totals(per, [e.id for e in labelled if not e.answers], "no_answer_"))
    return out


def _totals(per: Dict[str, Tuple[int, float]], ids: List[str], prefix: str) -> Dict[str, float]:
    if not ids:
        return {f"{prefix}total": 0}
    return {
        f"{prefix}exact": 100.0 * math.fsum(per[i][0] for i in ids) / len(ids),
        f"{prefix}f1": 100.0 * math.fsum(per[i][1] for i in ids) / len(ids),
        f"{prefix}total": len(ids),
    }


def best_null_threshold(
    examples: Sequence[QAExample], best_text: Mapping[str, str], null_margin: Mapping[str, float]
) -> Tuple[float, float, float]:
    """The null-answer threshold that maximizes F1 (then exact match) on labelled `examples`.

    A question is answered "" when its null_margin (null score minus the best span's score) is above
    the threshold, else with best_text. Every distinct outcome is tried (all null, none null, and a cut
    between each pair of neighbouring margins, at their midpoint); among equally good cuts the one
    nearest 0 wins. Returns (threshold, f1, exact) in percent.
    """
    labelled = [e for e in examples if e.labelled]
    if not labelled:
        raise ValueError("no labelled questions to choose a null threshold on")
    rows = []
    for e in labelled:
        span = best_scores(best_text.get(e.id, ""), e)
        empty = best_scores("", e)
        rows.append((float(null_margin[e.id]), span, empty))
    rows.sort(key=lambda r: r[0])
    margins = [r[0] for r in rows]
    # threshold below every margin: everything null
    f1 = math.fsum(r[2][1] for r in rows)
    em = math.fsum(r[2][0] for r in rows)
    candidates = [(f1, em, margins[0] - 1.0)]
    for k, (margin, span, empty) in enumerate(rows):
        # raising the threshold past `margin` turns question k from null to its span
        f1 += span[1] - empty[1]
        em += span[0] - empty[0]
        if k + 1 < len(rows) and margins[k + 1] == margin:
            continue  # a tie: the next question flips at the same threshold
        cut = (margin + margins[k + 1]) / 2 if k + 1 < len(rows) else margin + 1.0
        candidates.append((f1, em, cut))
    best_f1, best_em, threshold = max(candidates, key=lambda c: (round(c[0], 9), round(c[1], 9), -abs(c[2])))
    n = len(rows)
    return threshold, 100.0 * best_f1 / n, 100.0 * best_em / n
