"""Mixed-adapter batches through a model: `model(**batch, adapter_names=[...])` gives each row what the
model gives it with only that row's adapter active (or none, for `None` / "__base__"), for every kind
with per-token compute (houlsby, pfeiffer, parallel, LoRA, prefix, MAM); each adapted site runs one
`sparse_adapter_multi` op over the batch; several adapters train in one batch with the gradients of
their own rows; bad names are refused by name; generation routes rows too."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
from hf_support import needs_attention_interface, one_thread, tiny_bert_classifier  # noqa: E402,F401

import sparseadapter as sa  # noqa: E402
import sparseadapter_ext  # noqa: E402
from sparseadapter import SparseLinear  # noqa: E402

KINDS = ("houlsby", "pfeiffer", "parallel", "lora", "prefix")
NAMES = ("a", "b", "c")


def make_model(seed=0):
    return tiny_bert_classifier(seed)


def config_of(kind, seed):
    if kind == "prefix":
        return sa.SparseAdapterConfig(kind="prefix", prefix_length=2 + seed, prefix_mid_dim=8, seed=seed)
    if kind == "mam":  # prefix tuning plus a parallel adapter
        return sa.SparseAdapterConfig(
            kind="mam",
            prefix_length=2 + seed,
            prefix_mid_dim=8,
            bottleneck=4 + 2 * seed,
            sparsity=0.5,
            pruner="random",
            seed=seed,
        )
    return sa.SparseAdapterConfig(kind=kind, bottleneck=4 + 2 * seed, sparsity=0.5, pruner="random", seed=seed)


def with_adapters(kind, names=NAMES):
    """A model holding `names` of `kind`, each with nonzero values of its own (LoRA's B starts at zero)."""
    model = make_model()
    for seed, name in enumerate(names):
        sa.add_adapter(model, name, config_of(kind, seed))
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, SparseLinear):
                module.values.copy_(torch.randn(module.values.shape, generator=gen) * 0.3)
    return model.eval()


def batch(rows, seed=1, length=9):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 40, (rows, length), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, length - 3 :] = 0  # a padded row: its padding must stay masked under per-row prefixes
    return dict(input_ids=ids, attention_mask=mask)


def alone(model, data, name):
    """The batch's logits with only `name` active (None: the bare model)."""
    with torch.no_grad():
        if name is None:
            with sa.disable_adapter(model):
                return model(**data).logits
        sa.set_active_adapters(model, [name])
        return model(**data).logits


def per_row_reference(model, data, names):
    wanted = {n if n != "__base__" else None for n in names}
    outs = {n: alone(model, data, n) for n in wanted}
    return torch.stack([outs[n if n != "__base__" else None][i] for i, n in enumerate(names)])


def count_multi_calls(monkeypatch):
    calls = []
    real = sparseadapter_ext.sparse_adapter_multi

    def counting(x, index, *args, **kw):
        calls.append(x.shape[0])
        return real(x, index, *args, **kw)

    import sparseadapter.adapters.slot as slot_module

    monkeypatch.setattr(slot_module.sparseadapter_ext, "sparse_adapter_multi", counting)
    return calls


ROUTES = {
    "mixed": ["b", "a", None, "c", "a", "__base__", "b"],  # 7 rows, shuffled, with bare rows
    "one_adapter": ["c"] * 5,
    "all_base": [None, "__base__", None],
    "odd": ["a", "c", "b", "b", "c"],
}


@pytest.mark.parametrize(
    "kind",
    [k for k in KINDS if k != "prefix"] + [pytest.param(k, marks=needs_attention_interface) for k in ("prefix", "mam")],
)
@pytest.mark.parametrize("route", list(ROUTES))
def test_each_row_equals_its_adapter_alone(kind, route, monkeypatch):
    model = with_adapters(kind)
    names = ROUTES[route]
    data = batch(len(names))
    want = per_row_reference(model, data, names)
    sa.set_active_adapters(model, ["a"])  # the routing replaces the active adapters for the call
    calls = count_multi_calls(monkeypatch)
    with torch.no_grad():
        got = model(**data, adapter_names=names).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    sites = {"houlsby": 4, "pfeiffer": 2, "parallel": 2, "lora": 4, "prefix": 0, "mam": 2}[kind]
    if any(n not in (None, "__base__") for n in names):
        assert calls == [len(names)] * sites  # one op per adapted site, over the whole batch
    else:
        assert calls == []
    with torch.no_grad():  # the call left no routing behind: the active adapter runs again
        torch.testing.assert_close(model(**data).logits, alone(model, data, "a"))


def test_unknown_and_malformed_names_are_refused_by_name():
    model = with_adapters("pfeiffer")
    fusion = sa.add_fusion(model, ["a", "b"])
    data = batch(3)
    with pytest.raises(
        ValueError, match=r"adapter_names\[1\] = 'zz' is not an adapter of this model \(adapters: a, b, c"
    ):
        model(**data, adapter_names=["a", "zz", None])
    with pytest.raises(ValueError, match=r"adapter_names\[0\] = .* is a fusion, not an adapter"):
        model(**data, adapter_names=[fusion, "a", "a"])
    with pytest.raises(ValueError, match="adapter_names has 2 entries but the batch has 3 rows"):
        model(**data, adapter_names=["a", "b"])
    with pytest.raises(ValueError, match="adapter_names must be a list"):
        model(**data, adapter_names="a")
    with pytest.raises(ValueError, match=r"adapter_names\[2\] must be an adapter name or None, got int"):
        model(**data, adapter_names=["a", "b", 3])
    with torch.no_grad():  # a refused call leaves nothing routed behind
        sa.set_active_adapters(model, ["b"])
        torch.testing.assert_close(model(**data).logits, alone(model, data, "b"))
    model(**data, adapter_names=None)  # peft's default: the active adapters


def test_merged_lora_refuses_routing():
    model = with_adapters("lora")
    sa.set_active_adapters(model, ["a"])
    sa.merge(model, "a")
    with pytest.raises(ValueError, match="merged into the base weight"):
        model(**batch(3), adapter_names=["a", "b", None])


@pytest.mark.parametrize("kind", ["houlsby", "lora", pytest.param("prefix", marks=needs_attention_interface)])
def test_several_adapters_train_in_one_batch(kind):
    """The gradients of a mixed batch's loss equal the sums of each adapter's gradients on its own rows."""
    model = with_adapters(kind)
    names = ["b", "a", None, "c", "a", "b"]
    data = batch(len(names))
    labels = torch.tensor([0, 1, 2, 1, 0, 2])
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}

    def grads(run):
        model.zero_grad()
        run().backward()
        return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in params.items()}

    loss_fn = torch.nn.CrossEntropyLoss(reduction="sum")
    mixed = grads(lambda: loss_fn(model(**data, adapter_names=names).logits, labels))

    def one_by_one():
        total = 0
        for name in {n for n in names if n is not None}:
            rows = torch.tensor([i for i, n in enumerate(names) if n == name])
            sa.set_active_adapters(model, [name])
            sub = {k: v.index_select(0, rows) for k, v in data.items()}
            total = total + loss_fn(model(**sub).logits, labels.index_select(0, rows))
        return total

    separate = grads(one_by_one)
    moved = [n for n, g in mixed.items() if g.any()]
    assert any(".a." in n or n.startswith("sparseadapter_prefix.a") for n in moved)
    assert any(".c." in n or n.startswith("sparseadapter_prefix.c") for n in moved)
    for n in params:
        if ".sparseadapter." in n or n.startswith("sparseadapter_prefix"):
            torch.testing.assert_close(mixed[n], separate[n], rtol=1e-4, atol=1e-5, msg=n)


def test_dense_and_layer_norm_adapters_fall_back_per_adapter():
    """Adapters the op cannot run (a layer norm inside) still route, each on its own rows."""
    model = make_model()
    sa.add_adapter(
        model, "a", sa.SparseAdapterConfig(kind="pfeiffer", bottleneck=4, sparsity=0.5, seed=0, pruner="random")
    )
    sa.add_adapter(
        model,
        "n",
        sa.SparseAdapterConfig(kind="pfeiffer", bottleneck=4, sparsity=0.5, seed=1, pruner="random", layer_norm=True),
    )
    names = ["n", "a", None, "n"]
    data = batch(4)
    want = per_row_reference(model, data, names)
    with torch.no_grad():
        torch.testing.assert_close(model(**data, adapter_names=names).logits, want, rtol=1e-5, atol=1e-5)


def test_threads_route_independently():
    import threading

    model = with_adapters("parallel")
    data = batch(4)
    routes = [["a", "b", "c", None], ["c", "c", "a", "b"]]
    want = [per_row_reference(model, data, r) for r in routes]
    got = [None, None]

    def run(i):
        with torch.no_grad():
            for _ in range(3):
                got[i] = model(**data, adapter_names=routes[i]).logits

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


# -- generation: model.generate refuses unknown keywords, so rows route through a context manager ------
@pytest.mark.parametrize("family", ["llama", "t5"])
@pytest.mark.parametrize("kind", ["lora", "houlsby", pytest.param("prefix", marks=needs_attention_interface)])
def test_generate_routes_rows_and_beams(family, kind):
    from test_adapters_decoders import adapter_config, make

    model = make(family)
    for seed, name in enumerate(("a", "b")):
        sa.add_adapter(model, name, adapter_config(kind, seed=seed))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, SparseLinear):
                module.values.copy_(torch.randn(module.values.shape, generator=gen) * 0.5)
    ids = torch.randint(3, 128, (3, 6), generator=gen)
    names = ["b", None, "a"]
    for kw in (
        dict(max_new_tokens=4, do_sample=False),
        dict(max_new_tokens=3, do_sample=False, num_beams=2, num_return_sequences=2),
    ):
        with sa.per_row_adapters(model, names):
            got = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)
        per = got.shape[0] // len(names)
        for i, name in enumerate(names):
            row = dict(input_ids=ids[i : i + 1], attention_mask=torch.ones_like(ids[i : i + 1]))
            if name is None:
                with sa.disable_adapter(model):
                    want = model.generate(**row, **kw)
            else:
                sa.set_active_adapters(model, [name])
                want = model.generate(**row, **kw)
            assert torch.equal(got[i * per : (i + 1) * per, : want.shape[1]], want), (i, name, kw)
    with pytest.raises(ValueError, match="adapter_names"):  # transformers' own check names the keyword
        model.generate(input_ids=ids, adapter_names=names, max_new_tokens=2)
    with pytest.raises(ValueError, match=r"adapter_names\[0\] = 'zz' is not an adapter"):
        with sa.per_row_adapters(model, ["zz", None, "a"]):
            pass
    with pytest.raises(ValueError, match="adapter_names has 3 entries but the adapted module's input has 2 rows"):
        with sa.per_row_adapters(model, names):
            model(input_ids=ids[:2])
