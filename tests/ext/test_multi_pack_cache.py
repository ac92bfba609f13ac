"""sparse_adapter_multi with a MultiPackCache: the adapters' arrays are concatenated once per state and
the op checks the concatenated pattern once, yet every change of an adapter is seen: values written in
place, a pattern written in place or replaced (pruning, load_state_dict), adapters added, removed,
replaced or reordered, a dtype move. Each result equals the uncached op's (which packs at every call),
and gradients reach every adapter's own values. Also the op's in-place row runs (rows of 16 tokens or
more, shuffled), row by row equal to each adapter alone, forward and backward."""

import threading

import pytest
import torch
from conftest import Pattern

import sparseadapter_ext as ops
from sparseadapter import SparseLinear
from sparseadapter_ext import _C

IN, OUT = 24, 20
SPECS = [(8, "relu", 1.0, True), (4, "identity", 2.0, False), (6, "gelu", 0.5, True)]


def projection(out_f, in_f, seed, bias, dtype=torch.float32):
    p = Pattern(out_f, in_f, 0.5, seed=seed)
    b = torch.randn(out_f, generator=torch.Generator().manual_seed(seed + 3)).to(dtype) if bias else False
    return SparseLinear(in_f, out_f, p.crow, p.col, p.values64.to(dtype), b)


def make_adapters(seed, specs=SPECS, dtype=torch.float32):
    return [
        [projection(b, IN, seed + 10 * k, bias, dtype), projection(OUT, b, seed + 10 * k + 5, bias, dtype), act, s]
        for k, (b, act, s, bias) in enumerate(specs)
    ]


def specs_of(layers):
    return [(d.csr_buffers(), u.csr_buffers(), act, scale) for d, u, act, scale in layers]


def inputs(seed, rows=6, tokens=5, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, tokens, IN, generator=gen).to(dtype)
    res = torch.randn(rows, tokens, OUT, generator=gen).to(dtype)
    return x, res


INDEX = torch.tensor([2, 0, -1, 1, 0, 2])


def cached_and_plain(cache, x, res, layers, index=INDEX):
    with torch.no_grad():
        cached = ops.sparse_adapter_multi(x, index, res, specs_of(layers), pack_cache=cache)
        plain = ops.sparse_adapter_multi(x, index, res, specs_of(layers))
    return cached, plain


def stats():
    return _C.checked_pattern_stats()


def test_a_second_call_reuses_the_pack_and_skips_the_pattern_check(seed):
    layers, cache = make_adapters(seed), ops.MultiPackCache()
    x, res = inputs(seed)
    first, plain = cached_and_plain(cache, x, res, layers)
    assert torch.equal(first, plain)
    before = stats()
    with torch.no_grad():
        second = ops.sparse_adapter_multi(x, INDEX, res, specs_of(layers), pack_cache=cache)
    after = stats()
    assert torch.equal(second, plain)
    assert (cache.made, cache.values_made) == (1, 1)
    assert after["checks"] == before["checks"]
    assert after["hits"] > before["hits"]


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_values_and_biases_written_in_place_are_seen(seed, mode):
    layers, cache = make_adapters(seed), ops.MultiPackCache()
    x, res = inputs(seed)
    cached_and_plain(cache, x, res, layers)
    ctx = torch.no_grad if mode == "no_grad" else torch.inference_mode

    def swap_data():  # as a load does: the same Parameter, new memory, no version bump of its own
        layers[0][1].values.data = layers[0][1].values.data * 2.0

    for write in (lambda: layers[1][1].values.mul_(3.0), lambda: layers[2][0].bias.add_(1.0), swap_data):
        with torch.no_grad():
            write()
        with ctx():
            cached = ops.sparse_adapter_multi(x, INDEX, res, specs_of(layers), pack_cache=cache)
        _, plain = cached_and_plain(None, x, res, layers)
        assert torch.equal(cached, plain)
    assert cache.made == 1 and cache.values_made == 4


def test_a_pattern_written_in_place_is_seen_and_checked_again(seed):
    layers, cache = make_adapters(seed), ops.MultiPackCache()
    x, res = inputs(seed)
    first, _ = cached_and_plain(cache, x, res, layers)
    down = layers[0][0]
    with torch.no_grad():
        down.col_indices[0] = (down.col_indices[0] + 1) % IN  # another column: another product
    cached, plain = cached_and_plain(cache, x, res, layers)
    assert not torch.equal(plain, first)
    assert torch.equal(cached, plain)
    assert cache.made == 2
    with torch.no_grad():
        down.col_indices[1] = 1000  # corrupt: the op must see it, not the pack of the earlier state
    with pytest.raises(ValueError, match="out of range"):
        with torch.no_grad():
            ops.sparse_adapter_multi(x, INDEX, res, specs_of(layers), pack_cache=cache)


def test_a_layer_replaced_or_loaded_is_seen(seed):
    layers, cache = make_adapters(seed), ops.MultiPackCache()
    x, res = inputs(seed)
    cached_and_plain(cache, x, res, layers)
    layers[1][0] = projection(4, IN, seed + 99, False)  # pruned anew: another pattern
    cached, plain = cached_and_plain(cache, x, res, layers)
    assert torch.equal(cached, plain)
    other = projection(OUT, 6, seed + 77, True)
    layers[2][1].load_state_dict(other.state_dict())  # another pattern and values, same Parameter objects
    cached, plain = cached_and_plain(cache, x, res, layers)
    assert torch.equal(cached, plain)
    layers[0][1].load_state_dict({"values": torch.ones_like(layers[0][1].values)}, strict=False)
    cached, plain = cached_and_plain(cache, x, res, layers)
    assert torch.equal(cached, plain)


def test_adapters_added_removed_replaced_or_reordered_are_packs_of_their_own(seed):
    layers, cache = make_adapters(seed), ops.MultiPackCache()
    extra = make_adapters(seed + 1, specs=[(5, "tanh", 1.5, True)])
    x, res = inputs(seed)
    index3 = torch.tensor([3, 0, -1, 1, 3, 2])
    for combo, index in (
        (layers, INDEX),
        (layers + extra, index3),  # added
        (layers[:2], torch.tensor([1, 0, -1, 1, 0, 0])),  # removed
        ([layers[0], extra[0], layers[2]], INDEX),  # replaced
        (layers[::-1], INDEX),  # reordered
        (layers, INDEX),  # the first again
    ):
        cached, plain = cached_and_plain(cache, x, res, combo, index)
        assert torch.equal(cached, plain)
    assert cache.made == 6  # the first pack was evicted (4 kept): made again


def test_scale_and_activation_are_part_of_the_pack(seed):
    layers, cache = make_adapters(seed), ops.MultiPackCache()
    x, res = inputs(seed)
    cached_and_plain(cache, x, res, layers)
    layers[0][3] = 3.0
    layers[2][2] = "silu"
    cached, plain = cached_and_plain(cache, x, res, layers)
    assert torch.equal(cached, plain)


def test_a_dtype_move_is_seen(seed):
    layers, cache = make_adapters(seed), ops.MultiPackCache()
    x, res = inputs(seed)
    cached_and_plain(cache, x, res, layers)
    for d, u, _, _ in layers:
        d.double()
        u.double()
    cached, plain = cached_and_plain(cache, x.double(), res.double(), layers)
    assert cached.dtype == torch.float64
    assert torch.equal(cached, plain)


def test_gradients_reach_each_adapters_values_through_a_cached_pattern(seed):
    layers, cache = make_adapters(seed), ops.MultiPackCache()
    x, res = inputs(seed)

    def grads(pack_cache):
        for d, u, _, _ in layers:
            for p in (*d.parameters(), *u.parameters()):
                p.grad = None
        out = ops.sparse_adapter_multi(x, INDEX, res, specs_of(layers), pack_cache=pack_cache)
        (out * torch.linspace(-1, 1, OUT)).sum().backward()
        return [p.grad.clone() for d, u, _, _ in layers for p in (*d.parameters(), *u.parameters())]

    for _ in range(3):
        cached, plain = grads(cache), grads(None)
        for a, b in zip(cached, plain):
            assert torch.equal(a, b)
        with torch.no_grad():  # an optimizer step: the values change in place
            for d, u, _, _ in layers:
                d.values.sub_(0.1 * d.values.grad)
                u.values.sub_(0.1 * u.values.grad)
    assert cache.made == 1 and cache.values_made == 0  # the values are concatenated per call when training


def test_a_traced_call_does_not_use_the_cache(seed):
    layers, cache = make_adapters(seed), ops.MultiPackCache()
    for d, u, _, _ in layers:  # a trace keeps tensors that need no gradient as its constants
        d.requires_grad_(False)
        u.requires_grad_(False)
    x, res = inputs(seed)
    with torch.no_grad():
        traced = torch.jit.trace(
            lambda x, r: ops.sparse_adapter_multi(x, INDEX, r, specs_of(layers), pack_cache=cache),
            (x, res),
            check_trace=False,
        )
    assert cache.made == 0
    with torch.no_grad():
        layers[0][0].values.mul_(2.0)
        assert torch.equal(traced(x, res), cached_and_plain(None, x, res, layers)[1])


def test_adapters_made_in_inference_mode_are_packed_at_every_call(seed):
    """Inference tensors carry no version counter: a change could not be seen, so nothing is reused."""
    with torch.inference_mode():
        layers, cache = make_adapters(seed), ops.MultiPackCache()
        x, res = inputs(seed)
        for k in range(3):
            layers[0][0].values.mul_(2.0)
            cached = ops.sparse_adapter_multi(x, INDEX, res, specs_of(layers), pack_cache=cache)
            assert torch.equal(cached, ops.sparse_adapter_multi(x, INDEX, res, specs_of(layers)))
            assert cache.made == k + 1


def test_max_entries_must_be_positive():
    with pytest.raises(ValueError, match="max_entries must be >= 1"):
        ops.MultiPackCache(0)


def row_reference(x, res, index, layers):
    rows = []
    for r, k in enumerate(index.tolist()):
        if k < 0:
            rows.append(res[r : r + 1])
        else:
            d, u, act, scale = layers[k]
            rows.append(ops.sparse_adapter(x[r : r + 1], res[r : r + 1], d.csr_buffers(), u.csr_buffers(), act, scale))
    return torch.cat(rows)


@pytest.mark.parametrize("tokens", [16, 21])
def test_rows_run_in_place_equal_each_adapter_alone(seed, tokens):
    """Rows of 16 tokens or more run one run of consecutive rows at a time on slices of x and out."""
    layers = make_adapters(seed)
    index = torch.tensor([2, 2, 0, -1, 1, 0, 0, 2, -1, 1])
    x, res = inputs(seed, rows=10, tokens=tokens)
    with torch.no_grad():
        out = ops.sparse_adapter_multi(x, index, res, specs_of(layers), pack_cache=ops.MultiPackCache())
    assert torch.equal(out, row_reference(x, res, index, layers))

    def grads(fn):
        xg, rg = x.clone().requires_grad_(), res.clone().requires_grad_()
        params = [p for d, u, _, _ in layers for p in (*d.parameters(), *u.parameters())]
        for p in params:
            p.grad = None
        (fn(xg, rg) * torch.linspace(-1, 1, OUT)).sum().backward()
        return [xg.grad, rg.grad] + [p.grad.clone() for p in params]

    mixed = grads(lambda xg, rg: ops.sparse_adapter_multi(xg, index, rg, specs_of(layers)))
    alone = grads(lambda xg, rg: row_reference(xg, rg, index, layers))
    for a, b in zip(mixed, alone):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_tensor_states_see_writes_and_new_memory_and_refuse_other_objects():
    a, b = torch.zeros(3), torch.ones(2)
    first = _C.tensor_states([a, None, b])
    assert isinstance(first, bytes) and first == _C.tensor_states((a, None, b))
    a.add_(1.0)
    assert _C.tensor_states([a, None, b]) != first
    second = _C.tensor_states([a, None, b])
    b.data = torch.ones(2)
    assert _C.tensor_states([a, None, b]) != second
    with torch.inference_mode():
        assert _C.tensor_states([a, torch.zeros(1)]) is None
    with pytest.raises(TypeError, match="item 1 is int, not a tensor or None"):
        _C.tensor_states([a, 3])


def test_threads_share_a_cache_that_evicts_while_they_run(seed):
    """Threads routing different adapter tuples through one small cache: each result stays right."""
    layers, cache = make_adapters(seed), ops.MultiPackCache(max_entries=1)
    x, res = inputs(seed)
    combos = [(layers, INDEX), (layers[::-1], INDEX), (layers[:2], torch.tensor([1, 0, -1, 1, 0, 0]))]
    wanted = [cached_and_plain(None, x, res, c, i)[1] for c, i in combos]
    errors = []

    def work(k):
        try:
            for _ in range(30):
                combo, index = combos[k % len(combos)]
                with torch.no_grad():
                    got = ops.sparse_adapter_multi(x, index, res, specs_of(combo), pack_cache=cache)
                assert torch.equal(got, wanted[k % len(combos)])
        except Exception as err:  # reported below: a thread's assertion does not fail the test itself
            errors.append(err)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
