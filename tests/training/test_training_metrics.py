"""Metrics against values worked out by hand (in the comments), plus optional sklearn/scipy cross-checks."""

import math

import pytest
import torch

from sparseadapter.training import (
    METRICS,
    TaskSpec,
    accuracy,
    compute_metrics,
    f1,
    get_task,
    macro_f1,
    matthews_corrcoef,
    pearson,
    spearman,
)
from sparseadapter.training.tasks import METRIC_NAMES

# Three classes: per class (tp, fp, fn) = 0: (3, 1, 0), 1: (1, 0, 2), 2: (0, 1, 0).
P3 = [0, 0, 0, 0, 1, 2]
Y3 = [0, 0, 0, 1, 1, 1]


def test_every_metric_name_has_an_implementation():
    assert set(METRICS) == set(METRIC_NAMES)


def test_accuracy():
    assert accuracy([0, 1, 1, 0, 1], [0, 1, 0, 0, 0]) == pytest.approx(3 / 5)
    assert accuracy(P3, Y3) == pytest.approx(4 / 6)


def test_binary_f1():
    # tp = 1 (index 1), fp = 2 (indices 2, 4), fn = 0: 2*1 / (2*1 + 2 + 0) = 0.5
    assert f1([0, 1, 1, 0, 1], [0, 1, 0, 0, 0]) == pytest.approx(0.5)
    # tp = 2, fp = 1, fn = 1: 4 / 6
    assert f1([1, 1, 0, 0, 1, 0], [1, 0, 0, 0, 1, 1]) == pytest.approx(2 / 3)
    assert f1([0, 0], [0, 0]) == 0.0  # class 1 never occurs: 0.0, as sklearn
    assert f1([1, 1], [0, 0]) == 0.0


def test_macro_f1_averages_the_classes_seen():
    # F1 per class: 0: 6/7, 1: 2/4, 2: 0/1 -> (6/7 + 1/2 + 0) / 3 = 19/42
    assert macro_f1(P3, Y3) == pytest.approx(19 / 42)
    assert macro_f1([2, 0], [2, 0]) == 1.0  # class 1 appears nowhere and is not averaged in


def test_matthews_binary():
    # tp = 2, fp = 1, tn = 2, fn = 1: (2*2 - 1*1) / sqrt(3*3*3*3) = 1/3
    assert matthews_corrcoef([1, 1, 0, 0, 1, 0], [1, 0, 0, 0, 1, 1]) == pytest.approx(1 / 3)
    assert matthews_corrcoef([1, 0, 1], [1, 0, 1]) == pytest.approx(1.0)
    assert matthews_corrcoef([0, 1, 0], [1, 0, 1]) == pytest.approx(-1.0)


def test_matthews_multiclass():
    # n = 6, correct c = 4, predicted counts p = (4, 1, 1), true counts t = (3, 3, 0):
    # (c*n - sum p_k t_k) / sqrt((n^2 - sum p_k^2) (n^2 - sum t_k^2)) = (24 - 15) / sqrt(18 * 18) = 0.5
    assert matthews_corrcoef(P3, Y3) == pytest.approx(0.5)


def test_matthews_undefined_is_zero():
    assert matthews_corrcoef([1, 1, 1], [0, 1, 0]) == 0.0  # one predicted class
    assert matthews_corrcoef([0, 1, 0], [1, 1, 1]) == 0.0  # one true class


def test_pearson():
    # means 2.5 and 5; deviations (-1.5, -.5, .5, 1.5) and (-3, -1, 0, 4): 11 / sqrt(5 * 26)
    assert pearson([1, 2, 3, 4], [2, 4, 5, 9]) == pytest.approx(11 / math.sqrt(130))
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)


def test_spearman_averages_tied_ranks():
    # ranks (1, 2.5, 2.5, 4) and (1, 3, 2, 4); deviations (-1.5, 0, 0, 1.5), (-1.5, .5, -.5, 1.5):
    # 4.5 / sqrt(4.5 * 5) = sqrt(0.9)
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(math.sqrt(0.9))
    # monotone but not linear: rank correlation 1, Pearson below 1
    assert spearman([1, 2, 3, 4], [1, 8, 27, 64]) == pytest.approx(1.0)
    assert pearson([1, 2, 3, 4], [1, 8, 27, 64]) < 0.99


def test_correlations_of_a_constant_side_are_zero():
    for fn in (pearson, spearman):
        assert fn([2.0, 2.0, 2.0], [1.0, 2.0, 3.0]) == 0.0
        assert fn([1.0, 2.0, 3.0], [5, 5, 5]) == 0.0
        assert fn([7.0], [3.0]) == 0.0


def test_tensors_and_lists_agree():
    p, y = torch.tensor(P3), torch.tensor(Y3)
    assert macro_f1(p, y) == macro_f1(P3, Y3)
    assert pearson(torch.tensor([1.0, 2.0, 3.0, 4.0]), [2, 4, 5, 9]) == pytest.approx(11 / math.sqrt(130))


def test_compute_metrics_follows_the_task():
    assert compute_metrics(get_task("mrpc"), [0, 1, 1, 0, 1], [0, 1, 0, 0, 0]) == pytest.approx(
        {"accuracy": 0.6, "f1": 0.5}
    )
    assert compute_metrics(
        get_task("cola"), torch.tensor([1, 1, 0, 0, 1, 0]), torch.tensor([1, 0, 0, 0, 1, 1])
    ) == pytest.approx({"matthews": 1 / 3})
    got = compute_metrics(get_task("stsb"), torch.tensor([1.0, 2.0, 2.0, 3.0]), [1.0, 3.0, 2.0, 4.0])
    assert list(got) == ["pearson", "spearman"]
    assert got["spearman"] == pytest.approx(math.sqrt(0.9))
    assert all(type(v) is float for v in got.values())
    assert compute_metrics(get_task("bbc-news"), P3, Y3) == pytest.approx({"accuracy": 4 / 6, "macro_f1": 19 / 42})


@pytest.mark.parametrize(
    "predictions, labels, message",
    [
        ([0, 1], [0], "2 predictions but 1 labels"),
        ([], [], "no predictions"),
        (torch.zeros(3, 2), [0, 1, 0], "argmax"),
        ([0.2, 0.9], [0, 1], "class ids"),
        ([True, False], [1, 0], "class ids"),
        ([0, 1], [0, None], "unlabelled"),
    ],
)
def test_compute_metrics_rejects_bad_classification_input(predictions, labels, message):
    with pytest.raises(ValueError, match=message):
        compute_metrics(get_task("sst2"), predictions, labels)


def test_compute_metrics_rejects_non_finite_regression_predictions():
    with pytest.raises(ValueError, match="NaN"):
        compute_metrics(get_task("stsb"), [1.0, float("nan")], [1.0, 2.0])


def test_custom_task_metrics():
    task = TaskSpec("custom", 3, ("a", "b", "c"), ("accuracy", "macro_f1", "matthews"), "macro_f1")
    assert compute_metrics(task, P3, Y3) == pytest.approx({"accuracy": 4 / 6, "macro_f1": 19 / 42, "matthews": 0.5})


# Cross-checks against the reference implementations, where installed (not needed by the library).


def _random_classes(n, k, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(k, (n,), generator=g).tolist(), torch.randint(k, (n,), generator=g).tolist()


@pytest.mark.parametrize("k", [2, 3, 5])
def test_against_sklearn(k):
    skm = pytest.importorskip("sklearn.metrics")
    for seed in range(5):
        p, y = _random_classes(50, k, seed)
        assert accuracy(p, y) == pytest.approx(skm.accuracy_score(y, p))
        assert macro_f1(p, y) == pytest.approx(skm.f1_score(y, p, average="macro"))
        assert matthews_corrcoef(p, y) == pytest.approx(skm.matthews_corrcoef(y, p))
        if k == 2:
            assert f1(p, y) == pytest.approx(skm.f1_score(y, p))


def test_against_scipy():
    stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        x = torch.randint(6, (40,), generator=g).double().tolist()  # many ties
        y = (torch.randn(40, generator=g, dtype=torch.float64) + torch.tensor(x)).tolist()
        assert pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0])
        assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0])
