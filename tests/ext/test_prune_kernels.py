"""The pruning kernels: prune_score, topk_masks, mask_to_csr against plain PyTorch
references, on every device in conftest.DEVICES."""

import pytest
import torch

import sparseadapter_ext as ext

SCORE_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------------
# prune_score


def _score_reference(method, w, g, hg):
    out = torch.float64 if w.dtype == torch.float64 else torch.float32
    w, g, hg = w.to(out), g.to(out), hg.to(out)
    return {
        "magnitude": w.abs(),
        "snip": (g * w).abs(),
        "grasp": w * hg,  # keep the highest w*Hg = remove the highest GraSP S = -w*Hg
        "synflow": (w * g).abs(),
    }[method]


@pytest.mark.parametrize("dtype", SCORE_DTYPES)
@pytest.mark.parametrize("method", ["magnitude", "snip", "grasp", "synflow"])
def test_prune_score_matches_formula(device, dtype, method, seed):
    gen = _gen(seed)
    w, g, hg = (torch.randn(37, 53, generator=gen).to(dtype).to(device) for _ in range(3))
    w[0, :5] = torch.tensor([0.0, -0.0, 1.0, -1.0, 2.5], dtype=dtype)
    out = ext.prune_score(w, g, hg, method)
    ref = _score_reference(method, w, g, hg)
    assert out.dtype == ref.dtype and out.shape == w.shape and out.device == w.device
    # One product of two values rounded once: the same bits as the PyTorch formula in that dtype.
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_prune_score_non_contiguous_and_empty(device):
    w = torch.randn(20, 30, device=device).t()
    g = torch.randn(30, 20, device=device)
    torch.testing.assert_close(ext.prune_score(w, g, None, "snip"), (g * w).abs(), rtol=0, atol=0)
    e = torch.empty(0, 7, device=device)
    assert ext.prune_score(e, e, e, "grasp").shape == (0, 7)


def test_prune_score_bad_inputs(device):
    w = torch.randn(4, 5, device=device)
    with pytest.raises(ValueError, match="unknown method 'obd'"):
        ext.prune_score(w, w, w, "obd")
    with pytest.raises(ValueError, match="'snip' needs grad"):
        ext.prune_score(w, None, None, "snip")
    with pytest.raises(ValueError, match="'synflow' needs grad"):
        ext.prune_score(w, None, w, "synflow")
    with pytest.raises(ValueError, match="'grasp' needs hess_grad"):
        ext.prune_score(w, w, None, "grasp")
    with pytest.raises(ValueError, match="grad has shape"):
        ext.prune_score(w, torch.randn(5, 4, device=device), None, "snip")
    with pytest.raises(TypeError, match="grad has dtype"):
        ext.prune_score(w, w.double(), None, "snip")
    with pytest.raises(TypeError, match="weight must be float"):
        ext.prune_score(w.int(), None, None, "magnitude")


# ------------------------------------------------------------------------------------------------
# topk_masks


def _topk_reference(scores, k):
    """Concatenate, stable sort by descending score (ties in list then flat order), first k, split."""
    flat = [s.reshape(-1) for s in scores]
    cat = torch.cat(flat) if flat else torch.empty(0)
    cat = torch.where(cat == 0, torch.zeros_like(cat), cat)  # -0.0 ties with +0.0
    keep = torch.zeros(cat.numel(), dtype=torch.bool, device=cat.device)
    keep[torch.sort(-cat, stable=True).indices[:k]] = True
    return [m.view(s.shape) for m, s in zip(keep.split([f.numel() for f in flat]), scores)]


def _check_topk(scores, k):
    masks = ext.topk_masks(scores, k)
    ref = _topk_reference(scores, k)
    assert len(masks) == len(scores)
    for i, (m, r, s) in enumerate(zip(masks, ref, scores)):
        assert m.dtype == torch.bool and m.shape == s.shape and m.device == s.device
        assert torch.equal(m, r), f"mask {i} differs from the reference (k={k})"
    assert sum(int(m.sum()) for m in masks) == k


SHAPES = [(37, 53), (0,), (64, 7), (1,), (3, 0, 4), (129,), (5, 11, 3)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["random", "ties", "signed_zeros", "extremes"])
def test_topk_masks_matches_reference(device, dtype, kind, seed):
    gen = _gen(seed)
    scores = []
    for shape in SHAPES:
        if kind == "random":
            s = torch.randn(shape, generator=gen, dtype=dtype)
        elif kind == "ties":  # a few integer values: almost every threshold is a tie
            s = torch.randint(-2, 3, shape, generator=gen).to(dtype)
        elif kind == "signed_zeros":
            s = torch.randint(0, 3, shape, generator=gen).to(dtype) - 1.0
            s = torch.where(s == 0, torch.where(torch.rand(shape, generator=gen) < 0.5, -0.0, 0.0).to(dtype), s)
        else:  # denormals, infinities, huge and tiny values
            pool = torch.tensor(
                [float("inf"), -float("inf"), 1e-45, -1e-45, 3e38, -3e38, 1e-300, 1.0, 0.0], dtype=torch.float64
            ).to(dtype)
            s = pool[torch.randint(0, pool.numel(), shape, generator=gen)]
        scores.append(s.to(device))
    total = sum(s.numel() for s in scores)
    ks = sorted(
        {0, 1, 2, total // 3, total // 2, total - 1, total}
        | set(torch.randint(0, total + 1, (4,), generator=gen).tolist())
    )
    for k in ks:
        _check_topk(scores, k)


def test_topk_masks_large_and_many(device, seed):
    """Adapter-like sizes (several parallel chunks per tensor on the CPU) with ties over chunks."""
    gen = _gen(seed)
    scores = [torch.randint(0, 50, (300, 257), generator=gen).float().to(device) for _ in range(5)]
    total = sum(s.numel() for s in scores)
    for k in [total // 10, total // 2 + 17, total - 5]:
        _check_topk(scores, k)
    cont = [torch.rand(200, 300, generator=gen, dtype=torch.float64).to(device) for _ in range(3)]
    _check_topk(cont, 90000)


def test_topk_masks_edge_cases(device):
    assert ext.topk_masks([], 0) == []
    _check_topk([torch.empty(0, device=device)], 0)
    one = [torch.tensor([1.0, 1.0, 1.0], device=device), torch.tensor([1.0], device=device)]
    _check_topk(one, 2)
    nc = torch.randn(30, 40, device=device).t()  # non-contiguous: flat index is of the logical shape
    _check_topk([nc], 500)


def test_topk_masks_errors(device):
    a = torch.randn(10, device=device)
    b = torch.randn(4, 5, device=device)
    b[2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"scores\[1\] contains 1 NaN"):
        ext.topk_masks([a, b], 5)
    for k in (0, 30):
        with pytest.raises(ValueError, match=r"scores\[1\] contains"):
            ext.topk_masks([a, b], k)
    with pytest.raises(ValueError, match="k = 31 must be in"):
        ext.topk_masks([a, torch.randn(20, device=device)], 31)
    with pytest.raises(ValueError, match="k = -1"):
        ext.topk_masks([a], -1)
    with pytest.raises(TypeError, match="float32 or float64"):
        ext.topk_masks([a.half()], 1)
    with pytest.raises(TypeError, match="one dtype"):
        ext.topk_masks([a, a.double()], 1)


# ------------------------------------------------------------------------------------------------
# mask_to_csr


def mask_to_csr_reference(mask, index_dtype):
    """Plain PyTorch: row counts, their running sum, and the column of every nonzero in row-major order."""
    keep = mask != 0
    crow = torch.zeros(keep.shape[0] + 1, dtype=torch.int64, device=keep.device)
    crow[1:] = keep.sum(1).cumsum(0)
    return crow.to(index_dtype), keep.nonzero()[:, 1].to(index_dtype)


MASK_CASES = {
    "random": (37, 53, 0.3),
    "empty_rows": (29, 45, 0.15),
    "all_false": (17, 23, 0.0),
    "all_true": (19, 21, 1.0),
    "one_row": (1, 77, 0.5),
    "one_col": (24, 1, 0.7),
    "wide": (5, 1031, 0.1),
    "no_rows": (0, 8, 0.5),
    "no_cols": (6, 0, 0.5),
}


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("case", list(MASK_CASES))
def test_mask_to_csr_matches_reference(device, case, index_dtype, seed):
    rows, cols, density = MASK_CASES[case]
    mask = torch.rand(rows, cols, generator=_gen(seed)) < density
    if rows > 2 and 0 < density < 1:
        mask[1] = False
    mask = mask.to(device)
    crow, col = ext.mask_to_csr(mask, index_dtype)
    ref_crow, ref_col = mask_to_csr_reference(mask, index_dtype)
    assert crow.dtype == col.dtype == index_dtype and crow.device == mask.device
    assert torch.equal(crow, ref_crow) and torch.equal(col, ref_col)


def test_mask_to_csr_non_bool_and_errors(device):
    w = torch.randn(6, 9, device=device) * (torch.rand(6, 9, device=device) < 0.5)
    crow, col = ext.mask_to_csr(w, torch.int64)
    ref = mask_to_csr_reference(w != 0, torch.int64)
    assert torch.equal(crow, ref[0]) and torch.equal(col, ref[1])
    with pytest.raises(ValueError, match="must be 2-D"):
        ext.mask_to_csr(torch.ones(3, device=device, dtype=torch.bool), torch.int32)
    with pytest.raises(TypeError, match="int32 or int64"):
        ext.mask_to_csr(torch.ones(3, 3, device=device, dtype=torch.bool), torch.int16)


# ------------------------------------------------------------------------------------------------
# opcheck: schemas, fake kernels, dispatcher registration


def test_opcheck(device):
    w = torch.randn(8, 12, device=device)
    g = torch.randn(8, 12, device=device)
    for method in ["magnitude", "snip", "grasp", "synflow"]:
        torch.library.opcheck(torch.ops.sparseadapter.prune_score.default, (w, g, g, method))
    scores = [torch.randn(8, 12, device=device), torch.randn(5, device=device), torch.randn(0, device=device)]
    torch.library.opcheck(torch.ops.sparseadapter.topk_masks.default, (scores, 40))
    mask = torch.rand(9, 13, device=device) < 0.4
    for index_dtype in [torch.int32, torch.int64]:
        torch.library.opcheck(torch.ops.sparseadapter.mask_to_csr.default, (mask, index_dtype))
