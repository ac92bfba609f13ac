"""The dense path (the CSR weight expanded per call, then the vendor GEMM) and the choice between it
and the CSR kernels. The numerics of both paths are in test_ops_numerics.py and test_fused_adapter.py
(their `path` fixture); here: the expansion ops themselves, and the path choice."""

import os
import subprocess
import sys

import pytest
import torch
from conftest import DTYPES, INDEX_DTYPES, PATTERN_CASES, Pattern

import sparseadapter_ext as ops


@pytest.mark.parametrize("case", list(PATTERN_CASES))
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_csr_to_dense_and_gather_are_exact(case, dtype, index_dtype, device, seed):
    out_f, in_f, density, _ = PATTERN_CASES[case]
    p = Pattern(out_f, in_f, density, device=device, index_dtype=index_dtype, seed=seed)
    values = p.values64.to(dtype)
    dense = ops.csr_to_dense(values, p.crow, p.col, in_f)
    assert dense.shape == p.shape and dense.dtype == dtype and dense.device == values.device
    assert torch.equal(dense, p.weight64.to(dtype))  # data movement only: bit for bit
    other = torch.randn(p.shape, dtype=torch.float64, device=device).to(dtype)
    assert torch.equal(ops.csr_gather(other, p.crow, p.col), other[p.mask.to(device)])


def test_expansion_gradients(device, seed):
    p = Pattern(7, 11, 0.4, device=device, seed=seed)
    values = p.values64.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda v: ops.csr_to_dense(v, p.crow, p.col, 11), (values,))
    dense = p.weight64.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda d: ops.csr_gather(d, p.crow, p.col), (dense,))
    torch.library.opcheck(torch.ops.sparseadapter.csr_to_dense.default, (p.values64, p.crow, p.col, 11))
    torch.library.opcheck(torch.ops.sparseadapter.csr_gather.default, (p.weight64, p.crow, p.col))


def test_expansion_bad_inputs_are_named(seed):
    p = Pattern(5, 9, 0.5, seed=seed)
    with pytest.raises(ValueError, match="csr_to_dense: values has 3 entries but col_indices has"):
        ops.csr_to_dense(p.values64[:3], p.crow, p.col, 9)
    with pytest.raises(ValueError, match=r"csr_to_dense: col_indices\[\d+\] = \d+ is out of range for 4 columns"):
        ops.csr_to_dense(p.values64, p.crow, p.col, 4)
    with pytest.raises(ValueError, match="num_cols must be >= 0"):
        ops.csr_to_dense(p.values64, p.crow, p.col, -1)
    with pytest.raises(TypeError, match="csr_to_dense: values must be float32"):
        ops.csr_to_dense(p.values64.long(), p.crow, p.col, 9)
    with pytest.raises(ValueError, match="csr_gather: dense has 4 rows but the pattern has 5"):
        ops.csr_gather(p.weight64[:4], p.crow, p.col)
    with pytest.raises(ValueError, match="csr_gather: dense must be 2-D"):
        ops.csr_gather(p.weight64.flatten(), p.crow, p.col)


def _layer_problem(device, dtype):
    p = Pattern(24, 40, 0.3, device=device)
    x = torch.randn(300, 40, device=device, dtype=torch.float64).to(dtype)
    values = p.values64.to(dtype)
    return p, x, values


def test_forced_modes_run_their_path_and_are_counted(device):
    p, x, values = _layer_problem(device, torch.float32)
    ops.clear_path_decisions()
    results = {}
    for mode in ("sparse", "dense"):
        assert ops.set_path_mode(mode) in ops.PATH_MODES
        assert ops.path_mode() == mode
        results[mode] = [ops.spmm(x, values, p.crow, p.col) for _ in range(3)]
        (d,) = [d for d in ops.path_decisions() if d["op"] == "spmm"]
        assert (d["path"], d["source"], d["calls"], d["ms_sparse"]) == (mode, "forced", 3, None)
        assert d["dims"] == (24, 40, p.nnz, 0, 0, 0) and d["tokens"] == 512 and d["device"] == str(x.device)
    torch.testing.assert_close(results["sparse"][0], results["dense"][0])


def test_linear_grad_x_on_each_path(device, seed):
    """sparse_linear's grad_x = grad_y @ W is decided as spmm through the transposed pattern: the CSR
    kernel there, while the dense path expands W from the forward pattern (no transposed copy);
    both give the float64 reference, and a forward pattern that does not fit grad_y is named."""
    p = Pattern(24, 40, 0.3, device=device, seed=seed)
    crow_t, col_t, perm_t = ops.csr_transpose(p.crow, p.col, 40)
    transposed = (crow_t, col_t, perm_t, ops.csr_row_order(crow_t))
    grad_y = torch.randn(3, 100, 24, dtype=torch.float64, device=device)
    op = torch.ops.sparseadapter.sparse_linear_backward.default
    for mode in ("sparse", "dense"):
        ops.set_path_mode(mode)
        ops.clear_path_decisions()
        grad_x, _, _ = op(grad_y, None, p.values64, p.crow, p.col, *transposed, [True, False, False])
        torch.testing.assert_close(grad_x, grad_y @ p.weight64)
        (d,) = ops.path_decisions()
        assert (d["op"], d["path"], d["dims"], d["tokens"]) == ("spmm", mode, (40, 24, p.nnz, 0, 0, 0), 512)
    with pytest.raises(ValueError, match="sparse_linear_backward: grad_y has 24 features but the weight has 23 rows"):
        op(grad_y, None, p.values64, p.crow[:-1], p.col, *transposed, [True, False, False])
    with pytest.raises(ValueError, match="sparse_linear_backward: col_indices has 1 entries but values has"):
        op(grad_y, None, p.values64, p.crow, p.col[:1], *transposed, [True, False, False])


def test_auto_measures_each_problem_once_and_keeps_the_faster(device):
    """The first call of a problem times both paths and records the medians, the sparse path chosen
    only where it is faster by the margin; later calls, also with another token count in the same
    power-of-two bucket, reuse the decision; the output is the chosen path's result whichever ran
    last."""
    p, x, values = _layer_problem(device, torch.float32)
    ops.set_path_mode("sparse")
    expected = ops.spmm(x, values, p.crow, p.col)
    ops.set_path_mode("auto")
    ops.clear_path_decisions()
    y = ops.spmm(x, values, p.crow, p.col)
    (d,) = ops.path_decisions()
    assert d["source"] == "measured" and d["calls"] == 1
    assert d["ms_sparse"] > 0 and d["ms_dense"] > 0
    margin = ops.sparse_path_margin()
    assert 0 < margin < 0.1
    assert d["path"] == ("sparse" if d["ms_sparse"] <= (1 - margin) * d["ms_dense"] else "dense")
    torch.testing.assert_close(y, expected)
    ops.spmm(x[:260], values, p.crow, p.col)  # 260 tokens: the same bucket (512) as 300
    (again,) = ops.path_decisions()
    assert again["calls"] == 2 and again["ms_sparse"] == d["ms_sparse"]
    ops.spmm(x[:100], values, p.crow, p.col)  # another bucket: measured apart
    assert sorted(d["tokens"] for d in ops.path_decisions()) == [128, 512]


def test_auto_training_step_matches_the_sparse_path(device, seed):
    """A whole adapter step in auto mode (every op measured at its first call) gives the sparse
    path's result within rounding, and every op of the step is on record."""
    import sparseadapter as sa

    torch.manual_seed(seed)
    adapter = sa.adapters.modules.BottleneckAdapter(48, 48, 16, activation="gelu").to(device)
    for name in ("down", "up"):
        layer = getattr(adapter, name)
        mask = torch.rand_like(layer.weight) < 0.3
        setattr(adapter, name, sa.SparseLinear.from_dense(layer.weight.detach(), mask, layer.bias.detach()))
    x = torch.randn(2, 70, 48, device=device, requires_grad=True)
    grads = {}
    for mode in ("sparse", "auto"):
        ops.set_path_mode(mode)
        ops.clear_path_decisions()
        adapter.zero_grad()
        x.grad = None
        out = adapter(x, x)
        out.square().sum().backward()
        grads[mode] = [out.detach(), x.grad.clone()] + [p.grad.clone() for p in adapter.parameters()]
    for a, b in zip(grads["sparse"], grads["auto"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    ops_seen = {(d["op"], d["source"]) for d in ops.path_decisions()}
    assert ops_seen == {("sparse_adapter", "measured"), ("sparse_adapter_backward", "measured")}


def test_bad_modes_are_named():
    with pytest.raises(ValueError, match="path mode must be one of auto, sparse, dense"):
        ops.set_path_mode("fastest")
    env = dict(os.environ, SPARSEADAPTER_PATH="fastest")
    code = (
        "import torch, sparseadapter_ext as ops\n"
        "ops.spmm(torch.ones(2, 3), torch.ones(1), torch.tensor([0, 1], dtype=torch.int32), "
        "torch.tensor([2], dtype=torch.int32))"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "SPARSEADAPTER_PATH=fastest: path mode must be one of auto, sparse, dense" in proc.stderr


def test_measurements_are_kept_per_machine(tmp_path):
    """save_path_decisions writes this process's measurements; load_path_decisions makes them this
    process's decisions ("cached"), which auto mode then runs without measuring again."""
    import json

    p, x, values = _layer_problem("cpu", torch.float32)
    ops.set_path_mode("auto")
    ops.clear_path_decisions()
    ops.spmm(x, values, p.crow, p.col)
    (measured,) = ops.path_decisions()
    path = ops.save_path_decisions(tmp_path / "paths.json")
    saved = json.loads(path.read_text())
    assert saved["machine"]["cpu_isa"] == ops.cpu_isa() and len(saved["decisions"]) == 1
    ops.clear_path_decisions()
    assert ops.load_path_decisions(path) == 1
    (cached,) = ops.path_decisions()
    assert cached["source"] == "cached" and cached["calls"] == 0
    assert (cached["path"], cached["ms_sparse"], cached["ms_dense"]) == (
        measured["path"],
        measured["ms_sparse"],
        measured["ms_dense"],
    )
    ops.spmm(x, values, p.crow, p.col)
    (used,) = ops.path_decisions()
    assert used["source"] == "cached" and used["calls"] == 1


def test_measurements_of_another_machine_or_malformed_are_refused(tmp_path):
    import json

    ops.set_path_mode("auto")
    ops.clear_path_decisions()
    p, x, values = _layer_problem("cpu", torch.float32)
    ops.spmm(x, values, p.crow, p.col)
    path = ops.save_path_decisions(tmp_path / "paths.json")
    data = json.loads(path.read_text())
    data["machine"]["cpu"] = "another CPU"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="measured on another machine or build"):
        ops.load_path_decisions(path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not a path-decision file"):
        ops.load_path_decisions(path)


def test_the_cache_folder_carries_measurements_to_the_next_process(tmp_path):
    """With SPARSEADAPTER_CACHE_DIR set, a process saves its measurements at exit and the next one
    starts with them; an unreadable cache file is a warning, not a failed import."""
    env = dict(os.environ, SPARSEADAPTER_CACHE_DIR=str(tmp_path), SPARSEADAPTER_PATH="auto")
    first = (
        "import torch, sparseadapter_ext as ops\n"
        "crow = torch.tensor([0, 2, 3], dtype=torch.int32); col = torch.tensor([0, 2, 1], dtype=torch.int32)\n"
        "ops.spmm(torch.randn(40, 3), torch.randn(3), crow, col)\n"
        "assert [d['source'] for d in ops.path_decisions()] == ['measured']\n"
    )
    second = "import sparseadapter_ext as ops\nprint([(d['op'], d['source']) for d in ops.path_decisions()])\n"
    for code in (first, second):
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[('spmm', 'cached')]"
    (cache_file,) = tmp_path.glob("path-decisions-*.json")
    cache_file.write_text("garbage")
    proc = subprocess.run(
        [sys.executable, "-W", "always", "-c", second], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "[]"
    assert "path-decision cache not used" in proc.stderr


@pytest.mark.parametrize("shape", [(70, 30), (30, 70)])
def test_the_dense_weight_gradient_in_either_orientation(shape, seed):
    """sddmm's dense path computes its product with the wider output (on CPU, x.T @ grad_out for a
    layer with more outputs than inputs) and gathers at the pattern from it either way."""
    out_f, in_f = shape
    p = Pattern(out_f, in_f, 0.4, seed=seed)
    g = torch.randn(2, 50, out_f, dtype=torch.float64)
    x = torch.randn(2, 50, in_f, dtype=torch.float64)
    want = torch.einsum("bno,bni->oi", g, x)[p.mask]
    previous = ops.set_path_mode("dense")
    try:
        torch.testing.assert_close(ops.sddmm(g, x, p.crow, p.col), want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ops.sddmm(g.float(), x.float(), p.crow, p.col).double(), want, rtol=1e-4, atol=1e-4)
    finally:
        ops.set_path_mode(previous)
