"""Evaluation metrics in plain Python (float64), so the library needs neither numpy nor sklearn/scipy.

Every function takes two equally long 1-D sequences (lists, tuples or tensors): predictions first,
then gold labels. Classification metrics expect class ids (take the argmax of the logits first).
All metrics are "higher is better". Where a metric is undefined (a constant input to a correlation,
no positive examples for F1) it is 0.0 rather than NaN, so model selection can always compare;
NaN or infinite inputs to the correlations raise ValueError instead (a diverged model, not a score).
ROUGE (generation tasks) is the exception: it comes from the rouge-score package.
"""

import math
import numbers
from collections import Counter
from functools import lru_cache
from typing import Callable, Dict, List, Optional, Sequence

import torch

from .tasks import TaskSpec


def _as_list(values, what: str) -> List:
    if isinstance(values, torch.Tensor):
        if values.dim() != 1:
            raise ValueError(
                f"{what} must be 1-D, got shape {tuple(values.shape)}"
                + (" (take the argmax of the logits first)" if values.dim() == 2 else "")
            )
        return values.detach().cpu().tolist()
    values = list(values)
    if any(isinstance(v, (list, tuple)) or getattr(v, "ndim", 0) > 0 for v in values):
        raise ValueError(f"{what} must be 1-D")
    return values


def _pair(predictions, labels):
    p, y = _as_list(predictions, "predictions"), _as_list(labels, "labels")
    if len(p) != len(y):
        raise ValueError(f"{len(p)} predictions but {len(y)} labels")
    if not p:
        raise ValueError("no predictions to score")
    if any(v is None for v in y):
        raise ValueError("labels contain None (unlabelled examples cannot be scored)")
    return p, y


def _floats(values, what: str) -> List[float]:
    out = [float(v) for v in values]
    if not all(math.isfinite(v) for v in out):
        # A NaN prediction means a diverged model; say so instead of returning a meaningless score.
        raise ValueError(f"{what} contain NaN or infinity")
    return out


def accuracy(predictions, labels) -> float:
    p, y = _pair(predictions, labels)
    return sum(a == b for a, b in zip(p, y)) / len(p)


def _f1(p, y, cls) -> float:
    tp = sum(a == cls and b == cls for a, b in zip(p, y))
    fp = sum(a == cls and b != cls for a, b in zip(p, y))
    fn = sum(a != cls and b == cls for a, b in zip(p, y))
    # 2tp / (2tp + fp + fn) equals 2PR / (P + R) and has no 0/0 unless the class never occurs.
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0


def f1(predictions, labels) -> float:
    """Binary F1 of class 1 (0.0 when class 1 is neither predicted nor present, as sklearn)."""
    p, y = _pair(predictions, labels)
    return _f1(p, y, 1)


def macro_f1(predictions, labels) -> float:
    """Unweighted mean of per-class F1 over the classes seen in labels or predictions (sklearn's set)."""
    p, y = _pair(predictions, labels)
    classes = set(p) | set(y)
    return math.fsum(_f1(p, y, c) for c in classes) / len(classes)


def matthews_corrcoef(predictions, labels) -> float:
    """Matthews correlation; for K classes Gorodkin's R_K (what sklearn computes), 0.0 when undefined.

    With n examples, c correct, t_k true and p_k predicted counts of class k:
        (c*n - sum_k p_k t_k) / sqrt((n^2 - sum_k p_k^2) * (n^2 - sum_k t_k^2))
    which for two classes is the usual (tp*tn - fp*fn) / sqrt(...).
    """
    p, y = _pair(predictions, labels)
    n = len(p)
    c = sum(a == b for a, b in zip(p, y))
    pc, tc = Counter(p), Counter(y)
    # Integer arithmetic until the last step: exact, and no overflow in Python.
    cov = c * n - sum(pc[k] * tc[k] for k in pc)
    var_p = n * n - sum(v * v for v in pc.values())
    var_t = n * n - sum(v * v for v in tc.values())
    if var_p == 0 or var_t == 0:  # all predictions (or all labels) one class
        return 0.0
    return cov / math.sqrt(var_p * var_t)


def _pearson(x: List[float], y: List[float]) -> float:
    n = len(x)
    mx, my = math.fsum(x) / n, math.fsum(y) / n
    dx = [v - mx for v in x]
    dy = [v - my for v in y]
    sxx = math.fsum(v * v for v in dx)
    syy = math.fsum(v * v for v in dy)
    if sxx == 0.0 or syy == 0.0:  # a constant side: correlation undefined, reported as 0.0
        return 0.0
    r = math.fsum(a * b for a, b in zip(dx, dy)) / math.sqrt(sxx * syy)
    return max(-1.0, min(1.0, r))  # rounding can step just past +-1


def pearson(predictions, labels) -> float:
    """Pearson's r; 0.0 when either side is constant."""
    p, y = _pair(predictions, labels)
    return _pearson(_floats(p, "predictions"), _floats(y, "labels"))


def _ranks(values: List[float]) -> List[float]:
    """1-based ranks, ties sharing the average of the ranks they span (scipy's 'average')."""
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(predictions, labels) -> float:
    """Spearman's rho (Pearson on average ranks); 0.0 when either side is constant."""
    p, y = _pair(predictions, labels)
    return _pearson(_ranks(_floats(p, "predictions")), _ranks(_floats(y, "labels")))


METRICS: Dict[str, Callable[[Sequence, Sequence], float]] = {
    "accuracy": accuracy,
    "f1": f1,
    "macro_f1": macro_f1,
    "matthews": matthews_corrcoef,
    "pearson": pearson,
    "spearman": spearman,
}


# ------------------------------------------------------------------------------------------------ ROUGE

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


@lru_cache(maxsize=1)
def _rouge_scorer():
    try:
        from rouge_score import rouge_scorer
    except ImportError as err:
        raise ValueError(f"ROUGE needs the rouge-score package (pip install rouge-score): {err}") from None
    # rougeL is the sentence-level LCS (rougeLsum would split on newlines; targets here are one passage)
    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)


def rouge(predictions: Sequence[str], references: Sequence[str]) -> Dict[str, float]:
    """Mean ROUGE-1, ROUGE-2 and ROUGE-L F1 over the examples, in [0, 1] (x100 for the usual scale).

    The rouge-score package's scoring (Lin 2004, as in Google's reference implementation): lower-cased,
    non-alphanumerics as separators, Porter stemming. An empty prediction scores 0 against any reference.
    """
    p, y = list(predictions), list(references)
    if len(p) != len(y):
        raise ValueError(f"{len(p)} predictions but {len(y)} references")
    if not p:
        raise ValueError("no predictions to score")
    for what, values in (("predictions", p), ("references", y)):
        bad = next((v for v in values if not isinstance(v, str)), None)
        if bad is not None:
            raise ValueError(f"ROUGE scores text: {what} must be strings, got {bad!r}")
    scorer = _rouge_scorer()
    sums = {k: [] for k in ROUGE_TYPES}
    for pred, ref in zip(p, y):
        scores = scorer.score(ref, pred)  # (target, prediction)
        for k in ROUGE_TYPES:
            sums[k].append(scores[k].fmeasure)
    return {k: math.fsum(v) / len(v) for k, v in sums.items()}


def _is_class_id(v) -> bool:
    # numbers.Real also admits numpy scalars; bool is excluded because True/False are no class ids.
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) and v == int(v) and v >= 0


def compute_metrics(task: TaskSpec, predictions, labels) -> Dict[str, float]:
    """{metric: value} for every metric in task.metrics, in that order."""
    if getattr(task, "generation", False):
        return {name: value for name, value in rouge(predictions, labels).items() if name in task.metrics}
    p, y = _pair(predictions, labels)
    if not task.is_regression:
        # Scores or probabilities passed by mistake would otherwise give a silently wrong accuracy.
        for what, values in (("predictions", p), ("labels", y)):
            bad = next((v for v in values if not _is_class_id(v)), None)
            if bad is not None:
                raise ValueError(f"{task.name}: {what} must be class ids, got {bad!r}")
    return {name: float(METRICS[name](p, y)) for name in task.metrics}


# ---------------------------------------------------------------- collapse diagnostics and baselines

# Predictions "collapse" when a classifier predicts one class for every example, or when a regressor's
# predictions spread less than this fraction of the labels' standard deviation: the model answers (about)
# one constant, and its metrics (0.000 correlation, majority-class accuracy) say nothing about the data.
COLLAPSE_STD_FRACTION = 0.05
# Keys that evaluate() adds beside the task's metrics: what the predictions look like, and what a constant
# baseline (the training majority class / the training mean) scores on the same examples.
DIAGNOSTIC_KEYS = (
    "prediction_mean",
    "prediction_std",
    "label_std",
    "predicted_classes",
    "label_classes",
    "top_class",
    "top_class_share",
    "baseline",
    # question answering (qa.py): counts, and the unanswerable part's F1 (its exact match again)
    "total",
    "has_answer_total",
    "no_answer_total",
    "no_answer_f1",
    "has_answer_span_exact",
)


def is_diagnostic(key: str) -> bool:
    return key in DIAGNOSTIC_KEYS or key.startswith("baseline_")


def baseline_prediction(task: TaskSpec, train_labels) -> Optional[float]:
    """The constant a model that learned nothing would answer: the most common training class (the smallest
    id among ties) or the mean training label. None for generation tasks, whose baselines are texts (the
    lead sentence and the base model zero-shot, in generation.py)."""
    if getattr(task, "generation", False):
        return None
    y = _as_list(train_labels, "labels")
    if not y:
        raise ValueError("no training labels for a baseline")
    if task.is_regression:
        return math.fsum(_floats(y, "labels")) / len(y)
    counts = Counter(int(v) for v in y)
    return min(counts, key=lambda c: (-counts[c], c))


def _std(values: List[float]) -> float:
    mean = math.fsum(values) / len(values)
    return math.sqrt(math.fsum((v - mean) ** 2 for v in values) / len(values))


def prediction_diagnostics(task: TaskSpec, predictions, labels, baseline=None) -> Dict[str, float]:
    """How the predictions spread and, with `baseline` (see baseline_prediction), the task's metrics of
    that constant on these labels, as baseline_<metric>."""
    p, y = _pair(predictions, labels)
    if task.is_regression:
        pf, yf = _floats(p, "predictions"), _floats(y, "labels")
        out = {"prediction_mean": math.fsum(pf) / len(pf), "prediction_std": _std(pf), "label_std": _std(yf)}
    else:
        counts = Counter(int(v) for v in p)
        top = min(counts, key=lambda c: (-counts[c], c))
        out = {
            "predicted_classes": len(counts),
            "label_classes": len(set(int(v) for v in y)),
            "top_class": top,
            "top_class_share": counts[top] / len(p),
        }
    if baseline is not None:
        out["baseline"] = baseline
        constant = [baseline] * len(y)
        out.update({f"baseline_{k}": v for k, v in compute_metrics(task, constant, y).items()})
    return out


def class_name(task: TaskSpec, class_id) -> str:
    i = int(class_id)
    return task.label_names[i] if task.label_names and 0 <= i < len(task.label_names) else str(i)


def describe_baseline(task: TaskSpec, values: Dict[str, float]) -> Optional[str]:
    """'always <majority class>' / 'the training mean 2.74' with what it scores, from evaluate()'s keys."""
    if "baseline" not in values:
        return None
    what = (
        f"predicting the training mean ({values['baseline']:.4g})"
        if task.is_regression
        else f"always predicting the training majority class {class_name(task, values['baseline'])!r}"
    )
    scores = "  ".join(f"{m} {values[f'baseline_{m}']:.4f}" for m in task.metrics if f"baseline_{m}" in values)
    if "baseline_loss" in values:
        scores += f"  (loss {values['baseline_loss']:.4f})"
    return f"{what}: {scores}"


def collapse_warning(task: TaskSpec, values: Dict[str, float], split: str = "") -> Optional[str]:
    """A plain sentence when evaluate()'s predictions collapsed to (about) one answer, else None."""
    where = f"{split} " if split else ""
    baseline = describe_baseline(task, values)
    tail = f"; compare the baseline, {baseline}" if baseline else ""
    if task.is_regression:
        if "prediction_std" not in values:
            return None
        spread, label_spread = values["prediction_std"], values["label_std"]
        if label_spread > 0 and spread < COLLAPSE_STD_FRACTION * label_spread:
            return (
                f"{where}predictions collapsed: they spread {spread:.4g} (std), {spread / label_spread:.1%} of "
                f"the labels' {label_spread:.4g}; the model answers about {values['prediction_mean']:.4g} "
                f"for every example, so its correlations mean nothing{tail}"
            )
        return None
    if values.get("predicted_classes") == 1 and values.get("label_classes", 2) > 1:
        return (
            f"{where}predictions collapsed: every example gets class "
            f"{class_name(task, values['top_class'])!r}, so the scores are those of a constant{tail}"
        )
    return None
