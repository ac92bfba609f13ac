"""Routed calls reuse each slot's packed adapters (MultiPackCache) and still see every change of the
model: values updated in place (an optimizer step), an adapter deleted, added or replaced under the
same name, a dtype move, a state dict loaded. After each, every row equals the model run with only
that row's adapter active."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
from hf_support import one_thread, tiny_bert_classifier  # noqa: E402,F401

import sparseadapter as sa  # noqa: E402
from sparseadapter import SparseLinear  # noqa: E402
from sparseadapter.adapters.slot import slots  # noqa: E402
from sparseadapter.serving import prepare_for_inference  # noqa: E402

NAMES = ["b", "a", None, "c", "a", "b"]


def make_model():
    model = tiny_bert_classifier()
    for seed, name in enumerate("abc"):
        add(model, name, seed)
    model, _ = prepare_for_inference(model, path="sparse", merge_lora=False, inplace=True, routed_packs=True)
    return model


def add(model, name, seed):
    config = sa.SparseAdapterConfig(kind="lora", bottleneck=4 + 2 * seed, sparsity=0.5, pruner="random", seed=seed)
    sa.add_adapter(model, name, config)
    randomize(model, name, seed)


def randomize(model, name, seed):
    gen = torch.Generator().manual_seed(100 + seed)
    with torch.no_grad():
        for module_name, module in model.named_modules():
            if isinstance(module, SparseLinear) and f".{name}." in module_name:
                module.values.copy_(torch.randn(module.values.shape, generator=gen).to(module.values.dtype) * 0.3)


def data(length=20):  # 20 tokens per row: the op's in-place row runs
    ids = torch.randint(1, 40, (len(NAMES), length), generator=torch.Generator().manual_seed(1))
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids))


def check_rows(model, batch, names=NAMES):
    with torch.no_grad():
        got = model(**batch, adapter_names=names).logits
        want = []
        for i, name in enumerate(names):
            row = {k: v[i : i + 1] for k, v in batch.items()}
            if name is None:
                with sa.disable_adapter(model):
                    want.append(model(**row).logits)
            else:
                sa.set_active_adapters(model, [name])
                want.append(model(**row).logits)
    torch.testing.assert_close(got, torch.cat(want), rtol=1e-5, atol=1e-5)


def packs_made(model):
    return sum(s.multi_packs.made for s in slots(model).values() if s.multi_packs is not None)


def test_packing_is_asked_for():
    """Without routed_packs a slot keeps no copy of its adapters' arrays (memory follows the
    adapters alone); prepare_for_inference without it drops the packs again."""
    model = make_model()
    assert all(s.multi_packs is not None for s in slots(model).values() if len(s.adapters))
    prepare_for_inference(model, path="sparse", merge_lora=False, inplace=True)
    assert all(s.multi_packs is None for s in slots(model).values())
    check_rows(model, data())


def test_a_second_routed_call_reuses_the_packs():
    model, batch = make_model(), data()
    check_rows(model, batch)
    made = packs_made(model)
    assert made > 0
    check_rows(model, batch)
    assert packs_made(model) == made


def test_another_row_order_of_the_same_adapters_reuses_the_packs():
    """A slot gets the adapters of a call in its own order, not in the rows' order of first
    appearance: a batch naming the same adapters in another order is served by the same packs."""
    model, batch = make_model(), data()
    check_rows(model, batch)
    made = packs_made(model)
    check_rows(model, batch, ["c", None, "a", "b", "b", "a"])
    assert packs_made(model) == made


def test_values_changed_in_place_are_seen():
    model, batch = make_model(), data()
    check_rows(model, batch)
    randomize(model, "a", 7)  # copy_ into the values: what an optimizer step does
    check_rows(model, batch)


def test_adapters_deleted_added_or_replaced_are_seen():
    model, batch = make_model(), data()
    check_rows(model, batch)
    sa.delete_adapter(model, "c")
    check_rows(model, batch, ["b", "a", None, "a", "a", "b"])
    add(model, "c", 5)  # the same name, another adapter
    check_rows(model, batch)
    add(model, "d", 6)
    check_rows(model, batch, ["d", "a", None, "c", "d", "b"])


def test_a_dtype_move_and_a_loaded_state_are_seen():
    model, batch = make_model(), data()
    check_rows(model, batch)
    model.double()
    check_rows(model, batch)
    other = make_model().double()
    randomize(other, "b", 9)
    model.load_state_dict(other.state_dict())
    check_rows(model, batch)
