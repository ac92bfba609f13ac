"""sparse_linear's eager training forward keeps the weight it expanded on the dense path, and the
backward's grad_x multiplies by it instead of expanding again (sparse_linear_forward /
sparse_linear_backward's `weight`). The gradients must equal those of the path that re-expands,
and follow the values through in-place updates between steps."""

import pytest
import torch
from conftest import Pattern

import sparseadapter_ext as ops
from sparseadapter import SparseLinear

_forward = torch.ops.sparseadapter.sparse_linear_forward.default
_backward = torch.ops.sparseadapter.sparse_linear_backward.default


@pytest.fixture(autouse=True)
def _restore_path_mode():
    previous = ops.path_mode()
    yield
    ops.set_path_mode(previous)
    ops.clear_path_decisions()


def _with_saved_weight(decisions):
    """The grad_x problems decided with the forward's expanded weight in hand (dims[4] = 1)."""
    return [d for d in decisions if d["op"] == "spmm" and d["dims"][4] == 1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_forward_keeps_its_expansion_on_the_dense_path_only(dtype, seed):
    p = Pattern(24, 40, 0.3, seed=seed)
    x = torch.randn(5, 40, dtype=torch.float64).to(dtype)
    values = p.values64.to(dtype)
    args = p.linear_args(values, None)
    for mode, kept in (("dense", True), ("sparse", False)):
        ops.set_path_mode(mode)
        y, weight = _forward(x, *args, True)
        assert torch.equal(y, ops.sparse_linear(x, *args))
        if kept:
            assert torch.equal(weight, ops.csr_to_dense(values, p.crow, p.col, 40))
        else:
            assert weight.numel() == 0
        assert _forward(x, *args, False)[1].numel() == 0  # not asked: nothing kept


@pytest.mark.parametrize("mode", ["dense", "auto"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_with_the_saved_weight_match_the_reference(dtype, mode, seed):
    """Within the numerical rule: twice the error of PyTorch's dense layer in the same dtype, both
    against float64."""
    ops.set_path_mode(mode)
    p = Pattern(48, 80, 0.4, seed=seed)
    layer = SparseLinear(80, 48, p.crow, p.col, p.values64.to(dtype), bias=True)
    x64 = torch.randn(3, 70, 80, dtype=torch.float64)
    g64 = torch.randn(3, 70, 48, dtype=torch.float64)
    x = x64.to(dtype).requires_grad_()
    torch.autograd.backward(layer(x), g64.to(dtype))

    xr = x.detach().double().requires_grad_()
    w_ref = layer.values.detach().double().new_zeros(p.shape)
    w_ref[p.mask] = layer.values.detach().double()
    w_ref.requires_grad_()
    torch.autograd.backward(torch.nn.functional.linear(xr, w_ref, layer.bias.detach().double()), g64)
    # PyTorch's own error in this dtype
    xd = x.detach().clone().requires_grad_()
    wd = w_ref.detach().to(dtype).requires_grad_()
    torch.autograd.backward(torch.nn.functional.linear(xd, wd, layer.bias.detach()), g64.to(dtype))
    for got, torch_own, want in (
        (x.grad, xd.grad, xr.grad),
        (layer.values.grad, wd.grad[p.mask], w_ref.grad[p.mask]),
    ):
        own_err = (torch_own.double() - want).abs().max().item()
        err = (got.double() - want).abs().max().item()
        assert err <= 2 * own_err + 1e-12, (err, own_err)
    if mode == "dense":
        assert _with_saved_weight(ops.path_decisions()), "grad_x did not use the forward's weight"


def test_in_place_value_updates_between_steps_reach_the_gradients(seed):
    """Each forward expands the values it sees; an optimizer step between two steps changes the next
    step's weight, and grad_x follows it exactly (float64, dense path)."""
    ops.set_path_mode("dense")
    p = Pattern(16, 30, 0.5, seed=seed)
    layer = SparseLinear(30, 16, p.crow, p.col, p.values64, bias=False)
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    for _ in range(3):
        x = torch.randn(7, 30, dtype=torch.float64, requires_grad=True)
        g = torch.randn(7, 16, dtype=torch.float64)
        opt.zero_grad()
        torch.autograd.backward(layer(x), g)
        w = ops.csr_to_dense(layer.values.detach(), p.crow, p.col, 30)
        torch.testing.assert_close(x.grad, g @ w, rtol=0, atol=1e-12)
        torch.testing.assert_close(layer.values.grad, (g.T @ x.detach())[p.mask], rtol=0, atol=1e-12)
        opt.step()  # in place: the next forward expands the new values
    assert _with_saved_weight(ops.path_decisions())


def test_values_changed_before_the_backward_are_reported_as_on_every_path(seed):
    ops.set_path_mode("dense")
    p = Pattern(8, 12, 0.5, seed=seed)
    layer = SparseLinear(12, 8, p.crow, p.col, p.values64, bias=False)
    x = torch.randn(4, 12, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    with torch.no_grad():
        layer.values.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_a_weight_that_does_not_fit_is_named(seed):
    p = Pattern(24, 40, 0.3, seed=seed)
    crow_t, col_t, perm_t = ops.csr_transpose(p.crow, p.col, 40)
    transposed = (crow_t, col_t, perm_t, ops.csr_row_order(crow_t))
    grad_y = torch.randn(6, 24, dtype=torch.float64)
    mask = [True, False, False]
    with pytest.raises(ValueError, match=r"sparse_linear_backward: weight must be the expanded \[24, 40\] weight"):
        _backward(grad_y, None, p.values64, p.crow, p.col, *transposed, mask, p.weight64.T.contiguous())
    with pytest.raises(TypeError, match="sparse_linear_backward: weight has dtype Float but values has dtype Double"):
        _backward(grad_y, None, p.values64, p.crow, p.col, *transposed, mask, p.weight64.float())
    # the weight it is given is the one it multiplies by (on the dense path)
    ops.set_path_mode("dense")
    other = torch.randn(24, 40, dtype=torch.float64)
    grad_x, _, _ = _backward(grad_y, None, p.values64, p.crow, p.col, *transposed, mask, other)
    torch.testing.assert_close(grad_x, grad_y @ other)


def test_the_training_forward_cannot_be_traced(seed):
    p = Pattern(4, 6, 0.5, seed=seed)
    args = p.linear_args(p.values64, None)
    with pytest.raises(RuntimeError, match="sparse_linear_forward is the eager training forward"):
        with torch._subclasses.FakeTensorMode() as mode:
            fake = [mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in args]
            _forward(mode.from_tensor(torch.randn(2, 6, dtype=torch.float64)), *fake, True)
