"""Pruning scores against hand-computed references on tiny float64 networks, and compute_masks.

References are independent of the code under test: closed-form gradients of a tanh network with a
squared-error loss, finite differences for H g, exact gradient-norm changes for the GraSP sign, and
explicit path enumeration for SynFlow.
"""

import itertools

import pytest
import torch
from torch import nn

from sparseadapter.pruning.scores import DATA_METHODS, METHODS, compute_masks, compute_scores
from sparseadapter.pruning.selection import keep_count, select_global

F64 = torch.float64


class TinyNet:
    """x -> tanh(x W1^T + b1) W2^T + b2, loss 0.5 * sum((out - y)^2), two batches."""

    def __init__(self, seed=0, small_fraction=0.0):
        gen = torch.Generator().manual_seed(seed)
        self.l1, self.l2 = nn.Linear(4, 6).double(), nn.Linear(6, 3).double()
        with torch.no_grad():
            for p in (self.l1.weight, self.l2.weight):
                p.copy_(torch.randn(p.shape, generator=gen, dtype=F64) * 0.5)
                if small_fraction:  # some tiny weights, where removing them is a small step
                    self.small = getattr(self, "small", []) + [torch.rand(p.shape, generator=gen) < small_fraction]
                    p[self.small[-1]] *= 1e-3
            for p in (self.l1.bias, self.l2.bias):
                p.copy_(torch.randn(p.shape, generator=gen, dtype=F64) * 0.1)
        self.batches = [
            (torch.randn(5, 4, generator=gen, dtype=F64), torch.randn(5, 3, generator=gen, dtype=F64)) for _ in range(2)
        ]
        self.weights = {"l1": self.l1.weight, "l2": self.l2.weight}

    def closure(self, batch):
        x, y = batch
        return 0.5 * ((self.l2(torch.tanh(self.l1(x))) - y) ** 2).sum()

    def grads(self, w1=None, w2=None):
        """Closed-form dL/dW1, dL/dW2 summed over the batches (no autograd)."""
        w1 = self.l1.weight.detach() if w1 is None else w1
        w2 = self.l2.weight.detach() if w2 is None else w2
        b1, b2 = self.l1.bias.detach(), self.l2.bias.detach()
        g1, g2 = torch.zeros_like(w1), torch.zeros_like(w2)
        for x, y in self.batches:
            h = torch.tanh(x @ w1.T + b1)
            e = h @ w2.T + b2 - y
            g2 += e.T @ h
            g1 += ((e @ w2) * (1 - h**2)).T @ x
        return g1, g2

    def hg(self, eps=1e-5):
        """H g by central differences of the closed-form gradient along g."""
        w1, w2 = self.l1.weight.detach(), self.l2.weight.detach()
        g1, g2 = self.grads()
        p1, p2 = self.grads(w1 + eps * g1, w2 + eps * g2)
        m1, m2 = self.grads(w1 - eps * g1, w2 - eps * g2)
        return (p1 - m1) / (2 * eps), (p2 - m2) / (2 * eps)


def _kw(net):
    return dict(loss_closure=net.closure, data=net.batches)


# ---------------------------------------------------------------------------------------------- scores


def test_magnitude_is_abs_weight():
    net = TinyNet(1)
    s = compute_scores("magnitude", net.weights)
    for n, w in net.weights.items():
        assert s[n].dtype == F64 and torch.equal(s[n], w.detach().abs())
    w32 = {"a": nn.Parameter(torch.tensor([[-2.0, 0.5]], dtype=torch.bfloat16))}
    s = compute_scores("magnitude", w32)["a"]
    assert s.dtype == torch.float32 and s.tolist() == [[2.0, 0.5]]


def test_random_seeded_and_device_independent_recipe():
    net = TinyNet(2)
    a = compute_scores("random", net.weights, seed=7)
    b = compute_scores("random", net.weights, seed=7)
    c = compute_scores("random", net.weights, seed=8)
    gen = torch.Generator().manual_seed(7)  # the documented recipe: one CPU generator, mapping order
    for n, w in net.weights.items():
        assert a[n].dtype == torch.float32 and a[n].shape == w.shape
        assert torch.equal(a[n], b[n]) and not torch.equal(a[n], c[n])
        assert torch.equal(a[n], torch.rand(tuple(w.shape), generator=gen))
        assert bool(((a[n] >= 0) & (a[n] < 1)).all())


def test_snip_matches_closed_form_gradient():
    net = TinyNet(3)
    s = compute_scores("snip", net.weights, **_kw(net))
    for g, (n, w) in zip(net.grads(), net.weights.items()):
        assert s[n].dtype == F64
        torch.testing.assert_close(s[n], (g * w.detach()).abs(), rtol=1e-12, atol=1e-14)


def test_grasp_matches_finite_difference_hessian_gradient_product():
    net = TinyNet(4)
    s = compute_scores("grasp", net.weights, **_kw(net))
    for hg, (n, w) in zip(net.hg(), net.weights.items()):
        torch.testing.assert_close(s[n], w.detach() * hg, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grasp_sign_keeps_weights_whose_removal_reduces_gradient_norm_most(seed):
    net = TinyNet(seed, small_fraction=0.5)
    s = compute_scores("grasp", net.weights, **_kw(net))
    w1, w2 = net.l1.weight.detach(), net.l2.weight.detach()
    norm0 = sum((g**2).sum() for g in net.grads())
    delta = []  # exact change of ||g||^2 when each weight alone is set to zero
    for which, w in ((0, w1), (1, w2)):
        d = torch.empty_like(w)
        for i in range(w.numel()):
            wz = w.clone()
            wz.view(-1)[i] = 0
            d.view(-1)[i] = (
                sum((g**2).sum() for g in (net.grads(wz, None) if which == 0 else net.grads(None, wz))) - norm0
            )
        delta.append(d.reshape(-1))
    delta = torch.cat(delta)
    score = torch.cat([s["l1"].reshape(-1), s["l2"].reshape(-1)])
    small = torch.cat([m.reshape(-1) for m in net.small])

    def rank(x):
        return x.argsort().argsort().to(F64)

    # small weights: linearization holds, score = -delta / 2 and the rankings agree
    torch.testing.assert_close(score[small], -delta[small] / 2, rtol=0, atol=0.02 * delta[small].abs().max().item())
    assert torch.corrcoef(torch.stack([rank(score[small]), rank(-delta[small])]))[0, 1] > 0.999
    half = int(small.sum()) // 2
    kept = set(score[small].argsort(descending=True)[:half].tolist())
    most_reducing = set(delta[small].argsort()[:half].tolist())
    assert kept == most_reducing
    # all weights: still strongly positive rank agreement (the wrong sign gives a negative one)
    assert torch.corrcoef(torch.stack([rank(score), rank(-delta)]))[0, 1] > 0.7


def _path_scores(ws):
    """SynFlow by enumerating every input-to-output path of a chain of |W| ([out, in] layout)."""
    a = [w.detach().to(F64).abs() for w in ws]
    dims = [a[0].shape[1]] + [x.shape[0] for x in a]
    scores = [torch.zeros_like(x) for x in a]
    for path in itertools.product(*[range(d) for d in dims]):
        p = 1.0
        for k, x in enumerate(a):
            p *= x[path[k + 1], path[k]].item()
        for k in range(len(a)):
            scores[k][path[k + 1], path[k]] += p
    return scores


def _chain_weights(dims, seed, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    return [
        nn.Parameter(torch.randn(dims[i + 1], dims[i], generator=gen, dtype=F64).to(dtype))
        for i in range(len(dims) - 1)
    ]


def test_synflow_matches_path_enumeration_with_chains_masks_and_singletons():
    c1 = _chain_weights([2, 3, 3, 2], 5)
    c2 = _chain_weights([3, 2], 6, torch.float32)
    lone = nn.Parameter(torch.randn(2, 4, dtype=F64))
    weights = {"a0": c1[0], "b0": c2[0], "a1": c1[1], "lone": lone, "a2": c1[2]}
    s = compute_scores("synflow", weights, chains=[["a0", "a1", "a2"], ["b0"]])
    assert list(s) == list(weights) and all(v.dtype == F64 for v in s.values())
    for n, ref in zip(["a0", "a1", "a2"], _path_scores(c1)):
        torch.testing.assert_close(s[n], ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(s["b0"], c2[0].detach().double().abs())  # a chain of one: |W|
    torch.testing.assert_close(s["lone"], lone.detach().abs())
    # masks: the masked network's paths
    gen = torch.Generator().manual_seed(9)
    masks = {n: torch.rand(c1[k].shape, generator=gen) < 0.6 for k, n in enumerate(["a0", "a1", "a2"])}
    s = compute_scores("synflow", weights, chains=[["a0", "a1", "a2"]], masks=masks)
    refs = _path_scores([c1[k].detach() * masks[n] for k, n in enumerate(["a0", "a1", "a2"])])
    for n, ref in zip(["a0", "a1", "a2"], refs):
        torch.testing.assert_close(s[n], ref, rtol=1e-12, atol=0)


def test_synflow_conservation_per_layer():
    ws = _chain_weights([7, 5, 9, 3, 4], 10)
    names = [f"l{i}" for i in range(len(ws))]
    s = compute_scores("synflow", dict(zip(names, ws)), chains=[names])
    sums = torch.stack([s[n].sum() for n in names])
    torch.testing.assert_close(sums, sums[0].expand_as(sums), rtol=1e-13, atol=0)


def test_synflow_float64_stable_on_deep_chain():
    gen = torch.Generator().manual_seed(0)
    ws = [nn.Parameter(torch.randn(64, 64, generator=gen)) for _ in range(30)]  # float32 weights
    v = torch.ones(64)
    for w in ws:
        v = w.detach().abs() @ v
    assert torch.isinf(v).any()  # the float32 flow overflows: the test is meaningful
    names = [f"l{i}" for i in range(30)]
    s = compute_scores("synflow", dict(zip(names, ws)), chains=[names])
    sums = torch.stack([s[n].sum() for n in names])
    assert all(bool(torch.isfinite(s[n]).all()) for n in names) and sums[0] > 1e40
    torch.testing.assert_close(sums, sums[0].expand_as(sums), rtol=1e-12, atol=0)
    masks = compute_masks("synflow", dict(zip(names, ws)), 0.9, chains=[names], rounds=10)
    assert sum(int(m.sum()) for m in masks.values()) == keep_count(30 * 64 * 64, 0.9)


# ------------------------------------------------------------------------------- contract and errors


@pytest.mark.parametrize("method", DATA_METHODS)
def test_data_methods_require_data_and_closure(method):
    net = TinyNet(0)
    with pytest.raises(ValueError, match="data=.*data is missing"):
        compute_scores(method, net.weights, loss_closure=net.closure)
    with pytest.raises(ValueError, match="loss_closure is missing"):
        compute_scores(method, net.weights, data=net.batches)
    with pytest.raises(ValueError, match="empty"):
        compute_masks(method, net.weights, 0.5, loss_closure=net.closure, data=[])
    with pytest.raises(ValueError, match="loss_closure"):
        compute_masks(method, net.weights, 0.5, data=net.batches)


def test_bad_arguments_raise():
    net = TinyNet(0)
    with pytest.raises(ValueError, match="unknown pruning method"):
        compute_scores("taylor", net.weights)
    with pytest.raises(ValueError, match="scope"):
        compute_masks("magnitude", net.weights, 0.5, scope="row")
    with pytest.raises(ValueError, match="erk"):
        compute_masks("magnitude", net.weights, 0.5, erk=True)
    with pytest.raises(ValueError, match="rounds"):
        compute_masks("magnitude", net.weights, 0.5, rounds=0)
    with pytest.raises(ValueError, match="sparsity"):
        compute_masks("magnitude", net.weights, 1.0)
    with pytest.raises(ValueError, match="'l1' takes 4 inputs but 'l2' gives 3 outputs"):
        compute_scores("synflow", net.weights, chains=[["l2", "l1"]])
    with pytest.raises(ValueError, match="scalar"):
        compute_scores("snip", net.weights, loss_closure=lambda b: net.l1(b[0]), data=net.batches)


def test_non_finite_weights_give_a_named_error():
    net = TinyNet(0)
    with torch.no_grad():
        net.l2.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="'l2'.*NaN or Inf"):
        compute_masks("magnitude", net.weights, 0.5)


@pytest.mark.parametrize("method", METHODS)
def test_weights_values_flags_and_grads_restored(method):
    net = TinyNet(5)
    net.l1.weight.requires_grad_(False)
    sentinel = torch.full_like(net.l2.weight, 3.0)
    net.l2.weight.grad = sentinel
    bias_grad = torch.full_like(net.l1.bias, 2.0)
    net.l1.bias.grad = bias_grad
    before = {n: w.detach().clone() for n, w in net.weights.items()}
    masks = {"l2": torch.rand(net.l2.weight.shape) < 0.5}
    compute_scores(method, net.weights, **_kw(net), masks=masks)
    compute_masks(method, net.weights, 0.6, **_kw(net), rounds=3)
    for n, w in net.weights.items():
        assert torch.equal(w.detach(), before[n])
    assert not net.l1.weight.requires_grad and net.l2.weight.requires_grad
    assert net.l1.weight.grad is None and net.l2.weight.grad is sentinel and bool((sentinel == 3).all())
    assert net.l1.bias.grad is bias_grad and bool((bias_grad == 2).all()) and net.l2.bias.grad is None


def test_weights_restored_when_the_closure_fails():
    net = TinyNet(6)
    net.l1.weight.requires_grad_(False)
    before = net.l2.weight.detach().clone()
    calls = []

    def closure(batch):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return net.closure(batch)

    with pytest.raises(RuntimeError, match="boom"):
        compute_scores(
            "grasp",
            net.weights,
            loss_closure=closure,
            data=net.batches,
            masks={"l2": torch.zeros(net.l2.weight.shape, dtype=torch.bool)},
        )
    assert torch.equal(net.l2.weight.detach(), before) and not net.l1.weight.requires_grad


def test_data_iterator_is_read_for_every_pass():
    net = TinyNet(7)
    ref = compute_scores("grasp", net.weights, **_kw(net))
    once = compute_scores("grasp", net.weights, loss_closure=net.closure, data=iter(net.batches))
    for n in ref:
        torch.testing.assert_close(once[n], ref[n])


# ------------------------------------------------------------------------------------- compute_masks


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("sparsity", [0.0, 0.37, 0.99])
def test_compute_masks_exact_counts(method, sparsity):
    net = TinyNet(8)
    rounds = 5 if method == "synflow" else None
    g = compute_masks(method, net.weights, sparsity, **_kw(net), chains=[["l1", "l2"]], rounds=rounds)
    assert sum(int(m.sum()) for m in g.values()) == keep_count(24 + 18, sparsity)
    lay = compute_masks(method, net.weights, sparsity, scope="layer", **_kw(net), rounds=rounds)
    for n, w in net.weights.items():
        assert lay[n].dtype == torch.bool and lay[n].shape == w.shape
        assert int(lay[n].sum()) == round((1 - sparsity) * w.numel())


def test_compute_masks_erk_counts():
    ws = {
        "a": nn.Parameter(torch.randn(4, 50)),
        "b": nn.Parameter(torch.randn(50, 4)),
        "c": nn.Parameter(torch.randn(40, 40)),
    }
    m = compute_masks("magnitude", ws, 0.8, scope="layer", erk=True)
    assert sum(int(x.sum()) for x in m.values()) == keep_count(2000, 0.8)
    assert m["a"].float().mean() > m["c"].float().mean()


def test_one_shot_masks_are_selection_of_scores():
    net = TinyNet(9)
    for method in METHODS:
        scores = compute_scores(method, net.weights, **_kw(net), seed=3)
        masks = compute_masks(method, net.weights, 0.5, **_kw(net), seed=3, rounds=1)
        ref = select_global(scores, 0.5)
        assert all(torch.equal(masks[n], ref[n]) for n in ref), method


def test_iterative_magnitude_and_random_equal_one_shot():
    net = TinyNet(10)
    for method in ("magnitude", "random"):
        one = compute_masks(method, net.weights, 0.8, seed=1)
        many = compute_masks(method, net.weights, 0.8, seed=1, rounds=7)
        assert all(torch.equal(one[n], many[n]) for n in one), method


def _top(scores, k, allowed):
    """Brute-force global top-k among the allowed entries: sort (-score, tensor position, flat index)."""
    flat = [
        (-float(v), ti, j)
        for ti, n in enumerate(scores)
        for j, v in enumerate(scores[n].reshape(-1).tolist())
        if allowed is None or allowed[n].reshape(-1)[j]
    ]
    keep = {n: torch.zeros(s.shape, dtype=torch.bool) for n, s in scores.items()}
    for _, ti, j in sorted(flat)[:k]:
        keep[list(scores)[ti]].view(-1)[j] = True
    return keep


def test_synflow_exponential_schedule_two_rounds():
    ws = dict(zip(["a", "b", "c"], _chain_weights([6, 5, 7, 4], 11)))
    chains = [["a", "b", "c"]]
    total, sparsity = 30 + 35 + 28, 0.75
    masks = compute_masks("synflow", ws, sparsity, chains=chains, rounds=2)
    # by hand: round 1 keeps round(0.25 ** 0.5 * 93) = 46 by the unmasked scores, round 2 rescores the
    # masked chain and keeps keep_count(93, 0.75) = 23 of those 46
    m1 = _top(compute_scores("synflow", ws, chains=chains), round(0.25**0.5 * total), None)
    m2 = _top(compute_scores("synflow", ws, chains=chains, masks=m1), keep_count(total, sparsity), m1)
    assert all(torch.equal(masks[n], m2[n]) for n in ws)
    one_shot = compute_masks("synflow", ws, sparsity, chains=chains, rounds=1)
    assert sum(int(m.sum()) for m in masks.values()) == 23
    assert any(not torch.equal(masks[n], one_shot[n]) for n in ws)  # iterating changes the masks here


def test_iterative_grasp_never_revives_pruned_weights():
    net = TinyNet(12)
    masks = compute_masks("grasp", net.weights, 0.3, **_kw(net), rounds=2)
    # by hand: round 1 keeps round(0.7 ** 0.5 * 42) = 35, round 2 keeps keep_count(42, 0.3) = 29 of them
    m1 = _top(compute_scores("grasp", net.weights, **_kw(net)), 35, None)
    s2 = compute_scores("grasp", net.weights, **_kw(net), masks=m1)
    # fewer than 29 kept entries score >= 0, so the pruned entries (score 0) would come back if allowed
    assert sum(int((s2[n][m1[n]] >= 0).sum()) for n in s2) < 29
    m2 = _top(s2, 29, m1)
    assert all(torch.equal(masks[n], m2[n]) and not (masks[n] & ~m1[n]).any() for n in masks)
