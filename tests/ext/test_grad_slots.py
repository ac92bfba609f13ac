"""Gradients by name (sparseadapter_ext.grad_slots): each backward puts a gradient at its input's
position, taken from the op's schema, and a mismatch between the names and a signature is an error."""

import pytest
import torch
from conftest import Pattern

from sparseadapter_ext import ops
from sparseadapter_ext.grad_slots import GradRoute, GradSlots, backward_output_mask, backward_outputs

_ops = torch.ops.sparseadapter


class _Ctx:
    def __init__(self, needs_input_grad):
        self.needs_input_grad = needs_input_grad


def test_positions_come_from_the_op_schema():
    slots = GradSlots.of_op(_ops.sparse_adapter_multi.default, ("x", "residual", "up_bias"))
    names = [a.name for a in _ops.sparse_adapter_multi.default._schema.arguments]
    grads = slots.pack({"x": "gx", "residual": "gr", "up_bias": "gub"})
    assert len(grads) == len(names)
    assert {names[i]: g for i, g in enumerate(grads) if g is not None} == {
        "x": "gx",
        "residual": "gr",
        "up_bias": "gub",
    }


def test_needed_reads_each_input_at_its_position():
    slots = GradSlots.of_op(_ops.sparse_linear.default, ("x", "values", "bias"))
    assert slots.needed(_Ctx((False, True, False) + (False,) * 7)) == {"x": False, "values": True, "bias": False}


def test_function_slots_follow_forward_signature():
    slots = GradSlots.of_function(ops._SparseAdapterMultiFunction, ops._ADAPTER_DIFFERENTIABLE)
    assert slots.inputs[:7] == ("x", "residual", "down_values", "down_bias", "up_values", "up_bias", "adapter_index")
    assert slots.pack(dict.fromkeys(ops._ADAPTER_DIFFERENTIABLE, 1)) == (1,) * 6 + (None, None)


def test_unknown_input_name_is_an_error():
    with pytest.raises(ValueError, match="not among its inputs"):
        GradSlots.of_op(_ops.sparse_linear.default, ("x", "weight"))


@pytest.mark.parametrize("grads", [{"x": 1}, {"x": 1, "values": 2, "bias": 3, "crow_indices": 4}])
def test_pack_needs_exactly_the_differentiable_names(grads):
    slots = GradSlots.of_op(_ops.sparse_linear.default, ("x", "values", "bias"))
    with pytest.raises(RuntimeError, match="expected"):
        slots.pack(grads)


def test_backward_op_outputs_map_to_forward_inputs():
    op = _ops.sparse_adapter_backward.default
    needed = {"x": True, "residual": True, "down_values": False, "down_bias": True, "up_values": False, "up_bias": True}
    mask = backward_output_mask(op, needed)
    assert mask == [True, False, True, False, True]
    assert backward_outputs(op, ("gx", "gdv", "gdb", "guv", "gub"), mask) == {
        "x": "gx",
        "down_values": None,
        "down_bias": "gdb",
        "up_values": None,
        "up_bias": "gub",
    }


def test_a_route_puts_each_backward_output_at_its_input():
    """sparse_linear's Function: the backward op's outputs (grad_x, grad_values, grad_bias) go to the
    Function's inputs of those names, and only where the mask asked for them."""
    slots = GradSlots.of_function(ops._SparseLinearFunction, ("x", "values", "bias"))
    route = GradRoute(slots, _ops.sparse_linear_backward.default)
    assert slots.inputs == ("x", "values", "bias", "pattern")
    mask = route.mask(_Ctx((True, False, True, False)))
    assert mask == [True, False, True]
    assert route.pack(("gx", "gv", "gb"), mask) == ("gx", None, "gb", None)


def test_a_route_to_an_input_without_gradient_is_an_error():
    slots = GradSlots.of_function(ops._SparseLinearFunction, ("x", "values"))
    with pytest.raises(ValueError, match=r"returns gradients of \['bias'\], which take none"):
        GradRoute(slots, _ops.sparse_linear_backward.default)


def test_op_backward_gives_each_input_its_own_gradient():
    """Through the op's registered autograd (not the eager Function): bias gradient equals the
    output gradient summed over tokens, the residual's is the output gradient, and x's has x's shape."""
    down, up = Pattern(4, 6, 0.5, seed=1), Pattern(5, 4, 0.5, seed=2)
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    res = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    ub = torch.randn(5, dtype=torch.float64, requires_grad=True)
    db = torch.randn(4, dtype=torch.float64, requires_grad=True)

    def buffers(p, values, bias):
        crow_t, col_t, perm_t = ops.csr_transpose(p.crow, p.col, p.shape[1])
        return (values, bias, p.crow, p.col, crow_t, col_t, perm_t, ops.csr_row_order(crow_t))

    out, _ = _ops.sparse_adapter.default(
        x, res, *buffers(down, down.values64, db), *buffers(up, up.values64, ub), "relu", 0.5, True
    )
    g = torch.randn_like(out)
    gx, gres, gdb, gub = torch.autograd.grad(out, (x, res, db, ub), g)
    assert gx.shape == x.shape and gdb.shape == db.shape
    torch.testing.assert_close(gres, g)
    torch.testing.assert_close(gub, 0.5 * g.sum(0))
