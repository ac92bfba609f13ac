"""Exact-k selection, tie-breaking, ERK densities and the empty-matrix check (pure PyTorch reference)."""

import math

import pytest
import torch

from sparseadapter.pruning.selection import check_no_empty, erk_densities, keep_count, select_global, select_per_tensor

SHAPES = {"a": (3, 7), "b": (5, 11), "c": (13, 1), "d": (2, 2)}  # 21 + 55 + 13 + 4 = 93 weights
SPARSITIES = [0.0, 0.1, 0.37, 0.5, 0.99]


def _scores(seed, shapes=SHAPES, dtype=torch.float64, levels=None):
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for n, s in shapes.items():
        x = torch.randn(s, generator=gen, dtype=torch.float64)
        if levels:  # few distinct values: many ties
            x = torch.randint(levels, s, generator=gen).to(torch.float64)
        out[n] = x.to(dtype)
    return out


def _reference(scores, ks_by_group):
    """Brute force: sort (-score, tensor position, flat index) in Python, keep the first k of each group."""
    masks = {n: torch.zeros(s.shape, dtype=torch.bool) for n, s in scores.items()}
    for group, k in ks_by_group:
        entries = [
            (-float(v), ti, j, n)
            for ti, n in enumerate(scores)
            if n in group
            for j, v in enumerate(scores[n].reshape(-1).tolist())
        ]
        for _, _, j, n in sorted(entries)[:k]:
            masks[n].view(-1)[j] = True
    return masks


def test_keep_count_values_and_rounding():
    assert keep_count(10, 0.0) == 10
    assert keep_count(100, 0.99) == 1
    assert keep_count(93, 0.37) == round(0.63 * 93) == 59
    assert keep_count(5, 0.5) == 2  # 2.5 rounds half to even
    assert keep_count(7, 0.5) == 4  # 3.5 rounds half to even
    assert keep_count(0, 0.5) == 0
    assert keep_count(1, 0.6) == 0


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5, float("nan"), "x"])
def test_keep_count_rejects_bad_sparsity(bad):
    with pytest.raises(ValueError, match="sparsity"):
        keep_count(10, bad)


def test_keep_count_rejects_bad_total():
    with pytest.raises(ValueError, match="total"):
        keep_count(-1, 0.5)


@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("levels", [None, 3])
def test_select_global_exact_k_matches_brute_force(sparsity, levels):
    scores = _scores(11, levels=levels)
    masks = select_global(scores, sparsity)
    k = keep_count(93, sparsity)
    assert sum(int(m.sum()) for m in masks.values()) == k
    ref = _reference(scores, [(set(scores), k)])
    for n in scores:
        assert masks[n].dtype == torch.bool and masks[n].shape == scores[n].shape
        assert torch.equal(masks[n], ref[n]), n


@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("levels", [None, 2])
def test_select_per_tensor_exact_k_matches_brute_force(sparsity, levels):
    scores = _scores(12, levels=levels)
    dens = {n: 1 - sparsity for n in scores}
    masks = select_per_tensor(scores, dens)
    for n, s in scores.items():
        k = round((1 - sparsity) * s.numel())
        assert int(masks[n].sum()) == k
        assert torch.equal(masks[n], _reference({n: s}, [({n}, k)])[n]), n


def test_tie_breaking_mapping_order_then_flat_index():
    scores = {"a": torch.ones(2, 3), "b": torch.ones(3, 2)}
    masks = select_global(scores, 0.5)  # keep 6: all of "a"
    assert masks["a"].all() and not masks["b"].any()
    masks = select_global(scores, 1 - 4 / 12)  # keep 4: the first four of "a" in row-major order
    assert masks["a"].reshape(-1).tolist() == [True] * 4 + [False] * 2 and not masks["b"].any()
    # reversed mapping order: "b" first
    masks = select_global({"b": scores["b"], "a": scores["a"]}, 0.5)
    assert masks["b"].all() and not masks["a"].any()
    masks = select_per_tensor({"a": torch.zeros(2, 3)}, {"a": 0.5})
    assert masks["a"].reshape(-1).tolist() == [True] * 3 + [False] * 3


def test_ties_at_threshold_only_take_what_is_needed():
    scores = {"x": torch.tensor([[1.0, 5.0, 3.0, 3.0, 3.0, 0.0]])}
    masks = select_global(scores, 0.5)  # keep 3: 5, then the first two 3s
    assert masks["x"].reshape(-1).tolist() == [False, True, True, True, False, False]
    # -0.0 and +0.0 are equal: the earlier wins
    masks = select_global({"x": torch.tensor([[-0.0, 0.0, -1.0]])}, 1 - 1 / 3)
    assert masks["x"].reshape(-1).tolist() == [True, False, False]


def test_mixed_dtypes_compare_exactly():
    # float32 and float64 scores compared as float64: 0.1 (float32) > 0.1 (float64)
    masks = select_global(
        {"a": torch.tensor([0.1], dtype=torch.float64), "b": torch.tensor([0.1], dtype=torch.float32)}, 0.5
    )
    assert not masks["a"].any() and masks["b"].all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_scores_raise_naming_tensor(bad):
    scores = _scores(3)
    scores["b"][1, 2] = bad
    with pytest.raises(ValueError, match="'b'.*NaN or Inf"):
        select_global(scores, 0.5)
    with pytest.raises(ValueError, match="'b'"):
        select_per_tensor(scores, {n: 0.5 for n in scores})


def test_per_tensor_density_validation():
    scores = _scores(4)
    with pytest.raises(ValueError, match="missing"):
        select_per_tensor(scores, {"a": 0.5})
    with pytest.raises(ValueError, match="density"):
        select_per_tensor(scores, {n: 1.5 for n in scores})
    masks = select_per_tensor(scores, {n: 1.0 for n in scores})
    assert all(m.all() for m in masks.values())


def test_empty_and_zero_numel():
    assert select_global({}, 0.5) == {}
    masks = select_global({"e": torch.zeros(0, 4), "a": torch.ones(2, 2)}, 0.5)
    assert masks["e"].shape == (0, 4) and int(masks["a"].sum()) == 2


def test_check_no_empty_names_zero_scored_matrix():
    gen = torch.Generator().manual_seed(0)
    scores = {"l0.down": torch.rand(8, 16, generator=gen) + 0.1, "l0.up": torch.zeros(16, 8)}
    masks = select_global(scores, 0.5)  # the all-zero matrix loses every weight
    assert not masks["l0.up"].any()
    with pytest.raises(ValueError, match=r"'l0\.up'.*zero-initialized"):
        check_no_empty(masks)
    check_no_empty(select_per_tensor(scores, {n: 0.5 for n in scores}))  # layer scope keeps some
    check_no_empty({"a": torch.zeros(3, 3, dtype=torch.bool), "b": torch.zeros(2, 2, dtype=torch.bool)})
    check_no_empty({"a": torch.ones(3, 3, dtype=torch.bool), "e": torch.zeros(0, 3, dtype=torch.bool)})


def _erk_kept(shapes, dens):
    return sum(round(dens[n] * math.prod(s)) for n, s in shapes.items())


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.8, 0.99])
def test_erk_counts_bounds_and_order(sparsity):
    shapes = {"q.down": (64, 384), "q.up": (384, 64), "small": (8, 16), "odd": (17, 33), "big": (512, 1536)}
    dens = erk_densities(shapes, sparsity)
    total = sum(math.prod(s) for s in shapes.values())
    assert _erk_kept(shapes, dens) == keep_count(total, sparsity)
    assert all(0.0 <= d <= 1.0 for d in dens.values())
    if sparsity > 0:
        # small layers get higher density (non-strict where several are capped at dense)
        assert dens["small"] >= dens["odd"] >= dens["q.down"] >= dens["big"]
        assert dens["small"] > dens["big"] and dens["big"] < 1.0
        assert abs(dens["q.down"] - dens["q.up"]) * 64 * 384 <= 1  # same (n_in + n_out) / (n_in n_out)
    else:
        assert all(d == 1.0 for d in dens.values())


def test_erk_formula_without_dense_layers():
    shapes = {"a": (40, 50), "b": (30, 70), "c": (100, 20)}
    dens = erk_densities(shapes, 0.9)
    k = keep_count(2000 + 2100 + 2000, 0.9)
    eps = k / sum(sum(s) for s in shapes.values())  # raw * numel = n_in + n_out
    for n, s in shapes.items():
        assert abs(dens[n] * math.prod(s) - eps * sum(s)) < 1.0 + 1e-9  # apportioned to integers


def test_erk_makes_tiny_layer_dense_and_rescales_the_rest():
    shapes = {"tiny": (2, 2), "big": (200, 300)}
    dens = erk_densities(shapes, 0.5)
    assert dens["tiny"] == 1.0  # eps * raw would be ~ 60 / 1 > 1
    assert round(dens["big"] * 60000) == keep_count(60004, 0.5) - 4


def test_erk_selection_keeps_exact_total():
    shapes = {"a": (7, 13), "b": (13, 7), "c": (31, 5)}
    scores = _scores(5, shapes=shapes)
    for sparsity in (0.2, 0.77, 0.99):
        dens = erk_densities(shapes, sparsity)
        masks = select_per_tensor(scores, dens)
        assert sum(int(m.sum()) for m in masks.values()) == keep_count(91 + 91 + 155, sparsity)
