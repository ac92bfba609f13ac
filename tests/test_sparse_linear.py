"""SparseLinear: construction, conversion, state_dict round trip, pattern loading, devices, dtypes."""

import threading

import pytest
import torch
from conftest import Pattern

from sparseadapter import SparseLinear, csr_to_dense, mask_to_csr
from sparseadapter.sparse_linear import pinned_pair


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


# Loading while other threads run forwards (SparseLinear's module docstring): every forward computes
# with the whole old state or the whole new one.


def _race_loads_and_forwards(module, states, x, refs, seconds=1.5):
    import threading
    import time

    stop, seen, bad, errors = threading.Event(), set(), [], []
    module.load_state_dict(states[0])  # a forward that runs before the loader's first load sees a known state

    def loader():
        try:
            i = 0
            while not stop.is_set():
                module.load_state_dict(states[i % len(states)])
                i += 1
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    def forwards():
        try:
            with torch.no_grad():
                while not stop.is_set():
                    out = module(x)
                    match = [i for i, ref in enumerate(refs) if torch.equal(out, ref)]
                    if match:
                        seen.add(match[0])
                    else:
                        bad.append(out)
        except BaseException as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=loader)] + [threading.Thread(target=forwards) for _ in range(2)]
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    assert not bad, f"{len(bad)} forwards matched neither state"
    return seen


def test_load_state_dict_racing_forwards_sees_old_or_new_pattern():
    torch.manual_seed(0)
    layers = []
    for density, seed in ((0.2, 1), (0.7, 2)):
        p = Pattern(64, 96, density, seed=seed)
        layers.append(SparseLinear.from_dense(p.weight64.float(), p.mask, torch.randn(64)))
    states = [{k: v.clone() for k, v in layer.state_dict().items()} for layer in layers]
    x = torch.randn(32, 96)
    with torch.no_grad():
        refs = [layer(x) for layer in layers]
    target = SparseLinear.from_dense(torch.zeros(64, 96), torch.ones(64, 96, dtype=torch.bool), torch.zeros(64))
    values = target.values
    seen = _race_loads_and_forwards(target, states, x, refs)
    assert seen, "no forward completed"
    assert target.values is values  # the Parameter an optimizer holds is kept


def test_load_state_dict_racing_fused_adapter_forwards():
    from sparseadapter.adapters.modules import BottleneckAdapter

    adapters, torch_seed = [], 0
    for density in (0.3, 0.8):
        torch.manual_seed(torch_seed)
        torch_seed += 1
        a = BottleneckAdapter(48, 48, 16)
        for name in ("down", "up"):
            lin = getattr(a, name)
            mask = torch.rand_like(lin.weight) < density
            setattr(a, name, SparseLinear.from_dense(lin.weight.detach(), mask, torch.randn(lin.out_features)))
        a.eval()
        assert a.runs_fused()
        adapters.append(a)
    states = [{k: v.clone() for k, v in a.state_dict().items()} for a in adapters]
    x = torch.randn(20, 48)
    # The guarantee is per SparseLinear: a load of the adapter swaps down, then up, so a forward may
    # combine either state of each layer, but never a torn layer.
    import copy

    refs = []
    with torch.no_grad():
        for down in adapters:
            for up in adapters:
                mixed = copy.deepcopy(adapters[0])
                mixed.down.load_state_dict(down.down.state_dict())
                mixed.up.load_state_dict(up.up.state_dict())
                refs.append(mixed(x))
    target = adapters[0]
    assert _race_loads_and_forwards(target, states, x, refs)


def test_failed_load_leaves_the_layer_whole():
    p, q = Pattern(8, 12, 0.5, seed=3), Pattern(8, 12, 0.2, seed=4)
    layer = SparseLinear.from_dense(p.weight64, p.mask, torch.ones(8, dtype=torch.float64))
    other = SparseLinear.from_dense(q.weight64, q.mask, torch.ones(8, dtype=torch.float64))
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    bad = dict(other.state_dict(), bias=torch.ones(9, dtype=torch.float64))  # valid pattern, bias wrong
    with pytest.raises(RuntimeError, match="bias"):
        layer.load_state_dict(bad)
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), k
    layer.validate()
    x = torch.randn(3, 12, dtype=torch.float64)
    torch.testing.assert_close(layer(x), x @ p.weight64.T * 1 + 1)


# A tensor on the meta device beside real ones: the dispatcher runs the ops' Meta kernel (the fake),
# never the C++ kernel and its device checks; the fakes check the devices themselves.


def _meta_cases():
    x = torch.randn(3, 4)
    crow, col, v = torch.tensor([0, 1, 2]), torch.tensor([0, 3]), torch.randn(2)
    bias = torch.zeros(2)
    m = lambda t: t.to("meta")  # noqa: E731
    import sparseadapter_ext as ext

    crow_t, col_t, perm_t = ext.csr_transpose(crow, col, 4)
    row_order, row_order_t = ext.csr_row_order(crow), ext.csr_row_order(crow_t)
    lin = lambda **kw: ext.sparse_linear(
        **{
            **dict(  # noqa: E731
                x=x,
                values=v,
                bias=bias,
                crow_indices=crow,
                col_indices=col,
                row_order=row_order,
                crow_indices_t=crow_t,
                col_indices_t=col_t,
                perm_t=perm_t,
                row_order_t=row_order_t,
            ),
            **kw,
        }
    )
    return [
        ("spmm crow", lambda: ext.spmm(x, v, m(crow), col), "crow_indices is on meta"),
        ("spmm col", lambda: ext.spmm(x, v, crow, m(col)), "col_indices is on meta"),
        ("spmm values", lambda: ext.spmm(x, m(v), crow, col), "values is on meta"),
        ("spmm bias", lambda: ext.spmm(x, v, crow, col, bias=m(bias)), "bias is on meta"),
        ("spmm row_order", lambda: ext.spmm(x, v, crow, col, row_order=m(row_order)), "row_order is on meta"),
        ("spmm x", lambda: ext.spmm(m(x), v, crow, col), "values is on cpu but x is on meta"),
        ("sddmm crow", lambda: ext.sddmm(torch.randn(3, 2), x, m(crow), col), "crow_indices is on meta"),
        ("sddmm x", lambda: ext.sddmm(torch.randn(3, 2), m(x), crow, col), "x is on meta"),
        ("sparse_linear crow_t", lambda: lin(crow_indices_t=m(crow_t)), "crow_indices_t is on meta"),
        ("sparse_linear values", lambda: lin(values=m(v)), "values is on meta"),
        ("sparse_linear bias", lambda: lin(bias=m(bias)), "bias is on meta"),
        ("validate_csr col", lambda: ext.validate_csr(crow, m(col), 2, 4), "col_indices is on meta"),
        ("csr_transpose col", lambda: ext.csr_transpose(crow, m(col), 4), "col_indices is on meta"),
        ("csr_to_dense crow", lambda: ext.csr_to_dense(v, m(crow), col, 4), "crow_indices is on meta"),
    ]


@pytest.mark.parametrize("case", range(len(_meta_cases())))
def test_a_meta_tensor_beside_real_ones_is_refused(case):
    name, call, message = _meta_cases()[case]
    with pytest.raises(ValueError, match=message + ".*move all arguments to one device"):
        call()


@pytest.mark.parametrize("buffer", ["crow_indices", "col_indices", "perm_t", "values"])
def test_sparse_linear_with_a_buffer_on_meta_is_refused(buffer):
    p = Pattern(6, 8, 0.5, seed=5)
    layer = SparseLinear.from_dense(p.weight64.float(), p.mask)
    if buffer == "values":
        layer.values = torch.nn.Parameter(layer.values.detach().to("meta"))
    else:
        setattr(layer, buffer, getattr(layer, buffer).to("meta"))
    x = torch.randn(2, 8, requires_grad=True)
    for grad in (False, True):
        with torch.set_grad_enabled(grad), pytest.raises(ValueError, match="is on meta but x is on cpu"):
            layer(x)


def test_all_meta_is_a_shape_computation():
    import sparseadapter_ext as ext

    out = ext.spmm(
        torch.empty(3, 4, device="meta"),
        torch.empty(2, device="meta"),
        torch.tensor([0, 1, 2], device="meta"),
        torch.empty(2, dtype=torch.int64, device="meta"),
    )
    assert out.device.type == "meta" and out.shape == (3, 2)


# pinned_pair: a fused adapter pins both projections under one acquisition of the lock


def _small_layer(seed):
    torch.manual_seed(seed)
    return SparseLinear.from_dense(torch.randn(4, 6), torch.rand(4, 6) < 0.5, torch.randn(4))


def test_pinned_pair_holds_both_layers_for_the_block_only(seed):
    a, b = _small_layer(seed), _small_layer(seed + 1)
    with pinned_pair(a, b) as (buffers_a, buffers_b):
        assert (a._pins.readers, b._pins.readers) == (1, 1)
        assert all(x is y for x, y in zip(buffers_a, a.csr_buffers()))
        assert all(x is y for x, y in zip(buffers_b, b.csr_buffers()))
    assert (a._pins.readers, b._pins.readers) == (0, 0)
    with pytest.raises(RuntimeError, match="inside"):
        with pinned_pair(a, b):
            raise RuntimeError("inside")
    assert (a._pins.readers, b._pins.readers) == (0, 0)


def test_pinned_pair_waits_while_either_layer_is_being_swapped(seed):
    a, b = _small_layer(seed), _small_layer(seed + 1)
    entered = threading.Event()

    def reader():
        with pinned_pair(a, b):
            entered.set()

    b._swap_begin()  # this thread swaps a new state into b
    thread = threading.Thread(target=reader)
    thread.start()
    assert not entered.wait(0.2), "pinned_pair entered while b was being swapped"
    assert a._pins.readers == 0  # nothing pinned while it waits: a's swaps are not held back
    b._swap_end()
    assert entered.wait(10)
    thread.join()
    assert (a._pins.readers, b._pins.readers) == (0, 0)
