"""Autograd and graph capture: gradcheck, opcheck on every op, torch.compile(fullgraph=True),
torch.export, TorchScript script/trace with a save/load round trip."""

import io

import pytest
import torch
from conftest import Pattern

import sparseadapter_ext as ops
from sparseadapter import SparseLinear

_ops = torch.ops.sparseadapter


def _module(device, seed, dtype=torch.float32, shape=(24, 40), density=0.3):
    p = Pattern(*shape, density, device=device, seed=seed)
    bias = torch.randn(shape[0], dtype=torch.float64, device=device)
    return SparseLinear.from_dense(p.weight64, p.mask.to(device), bias).to(dtype)


def test_gradcheck_float64(device, seed):
    p = Pattern(11, 13, 0.4, device=device, seed=seed)
    x = torch.randn(2, 5, 13, dtype=torch.float64, device=device, requires_grad=True)
    values = p.values64.clone().requires_grad_()
    bias = torch.randn(11, dtype=torch.float64, device=device, requires_grad=True)
    rest = p.linear_args(values, bias)[2:]
    assert torch.autograd.gradcheck(lambda x, v, b: ops.sparse_linear(x, v, b, *rest), (x, values, bias))


def _opcheck_cases(device, seed):
    p = Pattern(19, 27, 0.3, device=device, seed=seed)
    x = torch.randn(3, 7, 27, device=device)
    g = torch.randn(3, 7, 19, device=device)
    v = p.values64.float()
    b = torch.randn(19, device=device)
    order = ops.csr_row_order(p.crow)
    linear_args = p.linear_args(v.clone().requires_grad_(), b.clone().requires_grad_())
    return {
        "spmm": (_ops.spmm.default, (x, v, p.crow, p.col, order, b)),
        "spmm_no_bias": (_ops.spmm.default, (x, v, p.crow, p.col, None, None)),
        "sddmm": (_ops.sddmm.default, (g, x, p.crow, p.col)),
        "csr_transpose": (_ops.csr_transpose.default, (p.crow, p.col, 27)),
        "csr_row_order": (_ops.csr_row_order.default, (p.crow,)),
        "validate_csr": (_ops.validate_csr.default, (p.crow, p.col, 19, 27)),
        "sparse_linear": (_ops.sparse_linear.default, (x.clone().requires_grad_(), *linear_args)),
    }


@pytest.mark.parametrize(
    "name", ["spmm", "spmm_no_bias", "sddmm", "csr_transpose", "csr_row_order", "validate_csr", "sparse_linear"]
)
def test_opcheck(name, device, seed):
    op, args = _opcheck_cases(device, seed)[name]
    torch.library.opcheck(op, args)


def test_compile_fullgraph_forward_and_backward(device, seed):
    torch._dynamo.reset()
    module = _module(device, seed)
    compiled = torch.compile(module, fullgraph=True)
    for tokens in (17, 33):  # a second shape exercises recompilation / dynamic shapes
        x = torch.randn(tokens, 40, device=device, requires_grad=True)
        y_eager = module(x)
        y_eager.sum().backward()
        grads_eager = (x.grad.clone(), module.values.grad.clone(), module.bias.grad.clone())
        x.grad = None
        module.zero_grad()
        y = compiled(x)
        y.sum().backward()
        torch.testing.assert_close(y, y_eager)
        for a, b in zip((x.grad, module.values.grad, module.bias.grad), grads_eager):
            torch.testing.assert_close(a, b)
        module.zero_grad()


def test_compile_inside_a_larger_model(device, seed):
    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Linear(40, 40), torch.nn.GELU(), _module(device, seed)).to(device)
    x = torch.randn(9, 40, device=device)
    torch.testing.assert_close(torch.compile(model, fullgraph=True, dynamic=True)(x), model(x))


def test_export_round_trip(device, seed):
    module = _module(device, seed)
    x = torch.randn(6, 40, device=device)
    exported = torch.export.export(module, (x,))
    assert any("sparseadapter.sparse_linear" in str(n.target) for n in exported.graph.nodes)
    torch.testing.assert_close(exported.module()(x), module(x))
    buf = io.BytesIO()
    torch.export.save(exported, buf)
    buf.seek(0)
    torch.testing.assert_close(torch.export.load(buf).module()(x), module(x))


@pytest.mark.parametrize("mode", ["script", "trace"])
def test_torchscript_save_load(mode, device, seed):
    module = _module(device, seed).eval()
    x = torch.randn(2, 7, 40, device=device)
    scripted = torch.jit.script(module) if mode == "script" else torch.jit.trace(module, (x,))
    buf = io.BytesIO()
    torch.jit.save(scripted, buf)
    buf.seek(0)
    loaded = torch.jit.load(buf, map_location=device)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), module(x), rtol=0, atol=0)
        x2 = torch.randn(5, 40, device=device)  # another shape than the trace saw
        torch.testing.assert_close(loaded(x2), module(x2), rtol=0, atol=0)
