"""A sparse LoRA adapter in eval mode runs as the fused adapter op (identity activation, no biases,
scale alpha / r) through the same prepared call as the bottleneck adapters (SparsePairModule): made
once per state, dropped on every change that could make it wrong. Each check compares with the op
called on the layers' current tensors (so a stale call fails) and with the unfused LoRA math."""

import pytest
import torch
from torch import nn

import sparseadapter_ext as ops
from sparseadapter import SparseLinear
from sparseadapter.adapters import LoRAAdapter
from sparseadapter.sparse_linear import PreparedPair


def _sparse(layer, seed, density=0.5):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(layer.weight.shape, generator=g) < density
    return SparseLinear.from_dense(layer.weight.detach() + 0.1, mask)


def _lora(seed):
    torch.manual_seed(seed % 2**31)
    lora = LoRAAdapter(20, 12, 6, alpha=12.0)
    lora.lora_A = _sparse(lora.lora_A, seed)
    lora.lora_B = _sparse(lora.lora_B, seed + 1)
    return lora.eval()


def _unfused(lora, x, residual):
    delta = lora.lora_B(lora.lora_A(x)) * lora.scaling
    return delta if residual is None else residual + delta


def _check(lora, x, residual=None):
    with torch.no_grad():
        out = lora(x, residual)
        op = ops.sparse_adapter(
            x, residual, lora.lora_A.csr_buffers(), lora.lora_B.csr_buffers(), "identity", lora.scaling
        )
        torch.testing.assert_close(out, op, rtol=0, atol=0)
        torch.testing.assert_close(out, _unfused(lora, x, residual), rtol=1e-5, atol=1e-6)
    return out


def test_eval_runs_the_prepared_fused_call(seed):
    lora = _lora(seed)
    x, residual = torch.randn(3, 20), torch.randn(3, 12)
    _check(lora, x, residual)
    prepared = lora._prepared
    assert isinstance(prepared, PreparedPair)
    _check(lora, x)
    assert lora._prepared is prepared


def test_training_keeps_the_layers_and_autograd(seed):
    lora = _lora(seed).train()
    x = torch.randn(2, 20, requires_grad=True)
    out = lora(x, None)
    assert lora._prepared is False
    out.sum().backward()
    assert lora.lora_A.values.grad is not None and x.grad is not None
    assert lora.eval()._prepared is None


def test_changes_drop_or_stale_the_call(seed):
    lora = _lora(seed)
    x, residual = torch.randn(2, 20), torch.randn(2, 12)
    _check(lora, x, residual)
    lora.scaling = 0.25  # a setting
    _check(lora, x, residual)
    state = lora.state_dict()
    state["lora_B.values"] = state["lora_B.values"] * -3  # a load: new values, same pattern
    lora.load_state_dict(state)
    _check(lora, x, residual)
    lora.lora_A.values = nn.Parameter(lora.lora_A.values.detach() * 2)  # a parameter swap
    _check(lora, x, residual)
    lora.to(torch.float64)
    out = _check(lora, x.double(), residual.double())
    assert out.dtype == torch.float64


def test_a_dense_matrix_is_not_fused(seed):
    lora = _lora(seed)
    x = torch.randn(2, 20)
    _check(lora, x)
    lora.lora_B = nn.Linear(6, 12, bias=False)  # no longer both sparse
    with torch.no_grad():
        out = lora(x)
    assert lora._prepared is False
    torch.testing.assert_close(out, _unfused(lora, x, None))


@pytest.mark.parametrize("tokens", [1, 7])
def test_a_routed_batch_agrees_with_the_prepared_call(seed, tokens):
    """The mixed-batch op (sparse_adapter_multi) and the single adapter's prepared call give one answer."""
    lora = _lora(seed)
    x, residual = torch.randn(2, tokens, 20), torch.randn(2, tokens, 12)
    with torch.no_grad():
        one = _check(lora, x, residual)
        multi = ops.sparse_adapter_multi(
            x,
            torch.zeros(2, dtype=torch.long),
            residual,
            [(lora.lora_A.csr_buffers(), lora.lora_B.csr_buffers(), "identity", lora.scaling)],
        )
    torch.testing.assert_close(multi, one, rtol=1e-5, atol=1e-6)
