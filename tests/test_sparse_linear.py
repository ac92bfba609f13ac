"""SparseLinear: construction, conversion, state_dict round trip, pattern loading, devices, dtypes."""
import pytest
import torch

from conftest import Pattern
from sparseadapter import SparseLinear, csr_to_dense, mask_to_csr


def test_from_dense_keeps_masked_weights(device, seed):
    p = Pattern(12, 20, 0.25, device=device, seed=seed)
    weight = torch.randn(12, 20, dtype=torch.float64, device=device)
    layer = SparseLinear.from_dense(weight, p.mask.to(device), torch.ones(12, dtype=torch.float64, device=device))
    torch.testing.assert_close(layer.to_dense(), weight * p.mask.to(device))
    assert layer.nnz == int(p.mask.sum())
    assert layer.sparsity == pytest.approx(1 - layer.nnz / 240)
    assert layer.density == pytest.approx(layer.nnz / 240)
    assert layer.crow_indices.dtype == torch.int32
    assert not layer.crow_indices.requires_grad and layer.values.requires_grad
    x = torch.randn(3, 20, dtype=torch.float64, device=device)
    torch.testing.assert_close(layer(x), x @ (weight * p.mask.to(device)).T + 1)
    assert f"sparsity={layer.sparsity:.3f}" in repr(layer) and "in_features=20, out_features=12" in repr(layer)


def test_parameters_and_buffers(device, seed):
    p = Pattern(8, 10, 0.5, device=device, seed=seed)
    layer = SparseLinear.from_dense(p.weight64, p.mask)
    assert [n for n, _ in layer.named_parameters()] == ["values"]
    assert set(layer.state_dict()) == {"values", "crow_indices", "col_indices"}


def test_state_dict_round_trip_with_another_pattern(device, seed):
    a = Pattern(16, 24, 0.2, device=device, seed=seed)
    b = Pattern(16, 24, 0.6, device=device, seed=seed + 1)
    src = SparseLinear.from_dense(a.weight64, a.mask, torch.randn(16, dtype=torch.float64))
    dst = SparseLinear.from_dense(b.weight64, b.mask, torch.zeros(16, dtype=torch.float64))
    assert dst.nnz != src.nnz
    dst.load_state_dict(src.state_dict())
    x = torch.randn(5, 24, dtype=torch.float64, device=device, requires_grad=True)
    torch.testing.assert_close(dst(x), src(x))
    dst(x).sum().backward()  # the derived (transposed) pattern was rebuilt too
    torch.testing.assert_close(x.grad, torch.ones(5, 16, dtype=torch.float64, device=device) @ src.to_dense())


def test_corrupted_state_dict_is_rejected_and_module_untouched(device, seed):
    p = Pattern(16, 24, 0.3, device=device, seed=seed)
    layer = SparseLinear.from_dense(p.weight64, p.mask)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    bad = {k: v.clone() for k, v in before.items()}
    bad["col_indices"][0] = 99
    with pytest.raises(RuntimeError, match="invalid sparse pattern.*out of range"):
        layer.load_state_dict(bad)
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k])


def test_constructor_validates_the_pattern(device):
    crow = torch.tensor([0, 2, 1], dtype=torch.int32, device=device)
    col = torch.tensor([0, 1], dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="non-decreasing|must agree"):
        SparseLinear(4, 2, crow, col)


def test_from_dense_rejects_mismatched_mask():
    with pytest.raises(ValueError, match=r"mask has shape \(3, 4\) but weight has shape \(4, 3\)"):
        SparseLinear.from_dense(torch.randn(4, 3), torch.ones(3, 4, dtype=torch.bool))


def test_dtype_conversion_and_training_step(device, seed):
    p = Pattern(32, 48, 0.3, device=device, seed=seed)
    layer = SparseLinear.from_dense(p.weight64.float(), p.mask, torch.zeros(32)).to(device)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    x, target = torch.randn(64, 48, device=device), torch.randn(64, 32, device=device)
    losses = []
    for _ in range(20):
        loss = torch.nn.functional.mse_loss(layer(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    pattern = layer.to_dense() != 0
    assert not (pattern & ~p.mask.to(device)).any(), "training must never grow the pattern"
    half = layer.to(torch.bfloat16)
    assert half.values.dtype == torch.bfloat16 and half.crow_indices.dtype == torch.int32
    assert half(x.bfloat16()).dtype == torch.bfloat16


def test_mask_to_csr_and_back(device, seed):
    p = Pattern(9, 14, 0.4, device=device, seed=seed)
    crow, col = mask_to_csr(p.mask.to(device), torch.int64)
    assert crow.dtype == torch.int64
    assert torch.equal(crow.cpu(), p.crow.long().cpu()) and torch.equal(col.cpu(), p.col.long().cpu())
    torch.testing.assert_close(csr_to_dense(crow, col, p.values64, (9, 14)), p.weight64)
