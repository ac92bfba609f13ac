"""BottleneckAdapter's prepared inference call (PreparedPair): made once per state of the adapter and
its layers, used in eval mode only, and dropped on every change that could make it wrong: a load
(same or new pattern), `.to()`, pruning (a layer replaced), train/eval, a parameter or buffer
replaced, fused / scale / activation set. Each test checks the output against the op called on the
layers' current tensors, so a stale call fails it."""

import copy
import io

import pytest
import torch
from torch import nn

import sparseadapter_ext as ops
from sparseadapter import SparseLinear
from sparseadapter.adapters import BottleneckAdapter
from sparseadapter.sparse_linear import PreparedPair


def _sparse(layer, seed, density=0.4):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(layer.weight.shape, generator=g) < density
    return SparseLinear.from_dense(layer.weight.detach() + 0.1, mask, layer.bias.detach() + 0.1)


def _adapter(seed, activation="gelu"):
    torch.manual_seed(seed % 2**31)
    adapter = BottleneckAdapter(24, 24, 8, activation=activation, scale=0.5)
    adapter.down = _sparse(adapter.down, seed)
    adapter.up = _sparse(adapter.up, seed + 1)
    return adapter.eval()


def _expected(adapter, x, residual):
    """The op on the layers' current tensors (what the adapter must compute)."""
    return ops.sparse_adapter(
        x, residual, adapter.down.csr_buffers(), adapter.up.csr_buffers(), adapter.activation_name, adapter.scale
    )


@pytest.fixture
def calls(monkeypatch):
    """How many calls went through PreparedAdapter (the prepared path)."""
    count = [0]
    original = ops.PreparedAdapter.__call__

    def counted(self, x, residual):
        count[0] += 1
        return original(self, x, residual)

    monkeypatch.setattr(ops.PreparedAdapter, "__call__", counted)
    return count


def _check(adapter, x, residual=None):
    with torch.no_grad():
        out = adapter(x, residual)
        torch.testing.assert_close(out, _expected(adapter, x, residual), rtol=0, atol=0)
    return out


def test_made_once_and_used_in_eval(seed, calls):
    adapter = _adapter(seed)
    x = torch.randn(1, 1, 24)
    _check(adapter, x, x)
    prepared = adapter._prepared
    assert isinstance(prepared, PreparedPair)
    _check(adapter, x)
    assert adapter._prepared is prepared and calls[0] == 2


def test_training_is_not_prepared_and_keeps_autograd(seed, calls):
    adapter = _adapter(seed).train()
    x = torch.randn(3, 24, requires_grad=True)
    out = adapter(x, x)
    assert adapter._prepared is False and calls[0] == 0
    out.sum().backward()
    assert adapter.down.values.grad is not None and x.grad is not None
    # eval with grad mode on and parameters requiring grad: the general path, gradients intact
    adapter.eval()
    x.grad = None
    out = adapter(x, x)
    assert out.requires_grad
    out.sum().backward()
    assert x.grad is not None
    adapter.train()
    assert adapter._prepared is None  # train() dropped the eval-mode call
    _check(adapter.eval(), x.detach())


def test_load_state_dict_same_and_new_pattern(seed):
    adapter, other = _adapter(seed), _adapter(seed + 100)
    x = torch.randn(2, 24)
    _check(adapter, x, x)
    state = adapter.state_dict()
    state["down.values"] = state["down.values"] * 3  # same pattern, new values
    adapter.load_state_dict(state)
    _check(adapter, x, x)
    assert torch.equal(adapter.down.values, state["down.values"])
    adapter.load_state_dict(other.state_dict())  # new patterns (other nnz)
    assert adapter.down.nnz == other.down.nnz
    torch.testing.assert_close(_check(adapter, x, x), other(x, x), rtol=0, atol=0)


def test_to_another_dtype(seed):
    adapter = _adapter(seed)
    _check(adapter, torch.randn(1, 24))
    prepared = adapter._prepared
    adapter.to(torch.float64)
    assert adapter._prepared is None and prepared.stale()
    out = _check(adapter, torch.randn(1, 24, dtype=torch.float64))
    assert out.dtype == torch.float64
    adapter.down.to(torch.float32)  # one layer alone: its generation changes
    with pytest.raises(TypeError, match="dtype"):
        adapter(torch.randn(1, 24, dtype=torch.float64))  # the op's own check, as without the prepared call


def test_pruning_replaces_a_layer(seed):
    adapter = _adapter(seed)
    x = torch.randn(1, 24)
    before = _check(adapter, x, x)
    dense = nn.Linear(8, 24)
    adapter.up = _sparse(dense, seed + 5, density=0.9)
    after = _check(adapter, x, x)
    assert not torch.equal(before, after)
    adapter.up = dense  # no longer fused: the layers one by one
    with torch.no_grad():
        out = adapter(x, x)
    assert adapter._prepared is False
    torch.testing.assert_close(out, x + 0.5 * dense(torch.nn.functional.gelu(adapter.down(x))))


def test_parameter_and_buffer_swap(seed):
    adapter = _adapter(seed)
    x = torch.randn(1, 24)
    _check(adapter, x, x)
    adapter.down.values = nn.Parameter(adapter.down.values.detach() * -2)
    _check(adapter, x, x)
    adapter.up.bias = nn.Parameter(torch.randn(24))
    _check(adapter, x, x)
    adapter.up.bias = None
    _check(adapter, x, x)


@pytest.mark.parametrize(
    "change", [lambda a: setattr(a, "scale", 2.5), lambda a: setattr(a, "activation_name", "tanh")]
)
def test_settings(seed, change):
    adapter = _adapter(seed)
    x = torch.randn(1, 24)
    _check(adapter, x, x)
    change(adapter)
    _check(adapter, x, x)


def test_not_fused_is_not_prepared(seed, calls):
    adapter = _adapter(seed)
    adapter.fused = False
    with torch.no_grad():
        out = adapter(torch.ones(1, 24))
    assert adapter._prepared is False and calls[0] == 0
    adapter.fused = True
    torch.testing.assert_close(_check(adapter, torch.ones(1, 24)), out, rtol=1e-5, atol=1e-6)


def test_copies_have_their_own(seed):
    adapter = _adapter(seed)
    x = torch.randn(1, 24)
    _check(adapter, x, x)
    clone = copy.deepcopy(adapter)
    assert clone._prepared is None
    with torch.no_grad():
        clone.down.values.mul_(2)
    _check(clone, x, x)
    _check(adapter, x, x)
    buffer = io.BytesIO()
    torch.save(adapter, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert loaded._prepared is None
    torch.testing.assert_close(_check(loaded, x, x), _check(adapter, x, x), rtol=0, atol=0)


def test_a_load_in_progress_takes_the_general_path(seed, calls):
    adapter = _adapter(seed)
    x = torch.randn(1, 24)
    _check(adapter, x, x)
    prepared = adapter._prepared
    prepared.pins[0].writer = -1  # as _swap_begin on another thread leaves it
    try:
        assert prepared(x, x) is None and not prepared.stale()
    finally:
        prepared.pins[0].writer = None
    assert prepared.pins[0].readers == 0 and prepared.pins[1].readers == 0
    _check(adapter, x, x)
    assert adapter._prepared is prepared
