"""One task head per adapter: two adapters for two tasks (a 3-way classifier and a regressor with target
normalization) live in one model, each answers with its own head, before and after save/load; adding or
training one adapter never changes another's head; the kinds a model can hold are checked; and
`sparseadapter train --adapter-name` saves the adapter under its name."""

import json

import pytest
import torch
from hf_support import one_thread, tiny_bert_classifier  # noqa: F401
from training_support import sentiment_files, tiny_model, train_args  # noqa: F401

import sparseadapter as sa
from sparseadapter.adapters import adapter_modules
from sparseadapter.cli import main

transformers = pytest.importorskip("transformers")

HOULSBY = dict(kind="houlsby", bottleneck=8, sparsity=0.5, pruner="random")


def make_model(num_labels=3, seed=0):
    return tiny_bert_classifier(seed, num_labels, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


@pytest.fixture
def batch():
    gen = torch.Generator().manual_seed(0)
    return {
        "input_ids": torch.randint(5, 40, (4, 9), generator=gen),
        "attention_mask": torch.ones(4, 9, dtype=torch.long),
    }


def randomize(model, name, seed):
    """Random values in the adapter and its head (a zero-initialized part would hide a lost tensor)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        modules = list(adapter_modules(model, name).values()) + [sa.adapter_head(model, name).module]
        for module in modules:
            for p in module.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def head_state(model, name):
    return {k: v.clone() for k, v in sa.adapter_head(model, name).module.state_dict().items()}


def answer(model, name, batch):
    sa.set_active_adapters(model, name)
    with torch.no_grad():
        return model(**batch).logits


def two_task_model():
    model = make_model(num_labels=3)
    sa.add_adapter(model, "a", sa.SparseAdapterConfig(**HOULSBY, seed=1))
    randomize(model, "a", 1)
    sa.add_adapter(model, "b", sa.SparseAdapterConfig(**HOULSBY, seed=2), head=sa.HeadConfig("regression"))
    sa.set_target_normalization(model, 3.0, 2.0)  # b is active: its head answers in label units
    randomize(model, "b", 2)
    return model


def test_two_adapters_answer_with_their_own_heads(batch):
    model = two_task_model()
    a, b = sa.adapter_head(model, "a"), sa.adapter_head(model, "b")
    assert (a.kind, a.outputs, b.kind, b.outputs) == ("classification", 3, "regression", 1)
    assert a.module is not b.module
    logits_a = answer(model, "a", batch)
    assert logits_a.shape == (4, 3) and model.classifier is a.module and model.num_labels == 3
    assert sa.target_normalization(model) is None
    logits_b = answer(model, "b", batch)
    assert logits_b.shape == (4, 1) and model.classifier is b.module and model.num_labels == 1
    assert model.config.problem_type == "regression" and sa.target_normalization(model) == (3.0, 2.0)
    # each head's loss: cross-entropy over 3 classes for a, MSE for b
    sa.set_active_adapters(model, "a")
    assert torch.isfinite(model(**batch, labels=torch.tensor([0, 1, 2, 1])).loss)
    sa.set_active_adapters(model, "b")
    loss = model(**batch, labels=torch.tensor([1.0, 2.0, 3.0, 4.0])).loss
    assert float(loss.detach()) == pytest.approx(
        float(((logits_b.squeeze(-1) - torch.tensor([1.0, 2.0, 3.0, 4.0])) ** 2).mean())
    )
    assert torch.equal(answer(model, "a", batch), logits_a)  # switching back gives a's answers again


def test_heads_survive_save_and_load(batch, tmp_path):
    model = two_task_model()
    want = {name: answer(model, name, batch) for name in ("a", "b")}
    for name in ("a", "b"):
        sa.save_adapter(model, str(tmp_path / name), name)  # each adapter's own head, active or not
    meta = {n: json.loads((tmp_path / n / "adapter_config.json").read_text())["head"] for n in ("a", "b")}
    assert meta["a"]["kind"] == "classification" and meta["a"]["outputs"] == 3
    assert meta["b"]["kind"] == "regression" and meta["b"]["problem_type"] == "regression"

    fresh = make_model(num_labels=3)
    with torch.no_grad():  # another random head, owned by no adapter
        for p in fresh.classifier.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(7)))
    sa.load_adapter(fresh, str(tmp_path / "a"))
    sa.load_adapter(fresh, str(tmp_path / "b"))
    for name in ("a", "b"):
        assert torch.allclose(answer(fresh, name, batch), want[name], atol=1e-6), name
    assert sa.target_normalization(fresh) == (3.0, 2.0)  # b is active
    sa.set_active_adapters(fresh, "a")
    assert sa.target_normalization(fresh) is None and fresh.config.num_labels == 3
    # the loaded adapters' heads are theirs: a took the model's own head, b got a new one
    assert sa.adapter_head(fresh, "a").module is not sa.adapter_head(fresh, "b").module
    # the regression adapter saved again from the new model is the same file content
    sa.save_adapter(fresh, str(tmp_path / "b2"), "b")
    from sparseadapter.adapters.io import weights_path

    safetensors = pytest.importorskip("safetensors.torch")
    one, two = (safetensors.load_file(weights_path(str(tmp_path / d))) for d in ("b", "b2"))
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)


def test_heads_survive_save_pretrained_and_load_pretrained(batch, tmp_path):
    """The Hugging Face round trip: a base model saved by transformers, adapters a (classification) and b
    (regression, active: the recorded config has one label) saved with model.save_pretrained, loaded with
    sa.load_pretrained from the folder alone; each answers its task with its own head."""
    base = tmp_path / "base"
    make_model(num_labels=3).save_pretrained(str(base))
    model = transformers.BertForSequenceClassification.from_pretrained(str(base)).eval()
    sa.add_adapter(model, "a", sa.SparseAdapterConfig(**HOULSBY, seed=1))
    randomize(model, "a", 1)
    sa.add_adapter(model, "b", sa.SparseAdapterConfig(**HOULSBY, seed=2), head=sa.HeadConfig("regression"))
    sa.set_target_normalization(model, 3.0, 2.0)
    randomize(model, "b", 2)
    want = {name: answer(model, name, batch) for name in ("a", "b")}
    sa.set_active_adapters(model, "b")
    model.save_pretrained(str(tmp_path / "both"))

    loaded = sa.load_pretrained(str(tmp_path / "both"))
    assert sa.active_adapters(loaded) == ["b"] and loaded.config.num_labels == 1
    for name in ("a", "b"):
        assert torch.allclose(answer(loaded, name, batch), want[name], atol=1e-6), name
    assert (sa.adapter_head(loaded, "a").kind, sa.adapter_head(loaded, "b").kind) == ("classification", "regression")
    sa.set_active_adapters(loaded, "b")
    assert sa.target_normalization(loaded) == (3.0, 2.0)
    sa.set_active_adapters(loaded, "a")
    assert sa.target_normalization(loaded) is None and loaded.config.num_labels == 3


def test_language_models_answer_with_the_shared_lm_head():
    """A causal LM has no task head to own: its adapters share the base model's (frozen) LM head, and
    asking for a task head is refused with a message that says so."""
    config = transformers.LlamaConfig(
        vocab_size=40,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    lm = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(0))
    sa.add_adapter(lm, "one", sa.SparseAdapterConfig(**HOULSBY, seed=1))
    sa.add_adapter(lm, "two", sa.SparseAdapterConfig(**HOULSBY, seed=2))
    assert sa.adapter_head(lm, "one") is None and sa.adapter_head(lm, "two") is None
    outs = {}
    for seed, name in enumerate(("one", "two"), 1):  # random adapter values: a zero up-projection is a no-op
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for module in adapter_modules(lm, name).values():
                for p in module.parameters():
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        sa.set_active_adapters(lm, name)
        with torch.no_grad():
            outs[name] = lm(input_ids=ids).logits
    assert outs["one"].shape == (2, 7, 40) and not torch.allclose(outs["one"], outs["two"])
    assert not lm.lm_head.weight.requires_grad
    with pytest.raises(ValueError, match="language-model head"):
        sa.add_adapter(lm, "cls", sa.SparseAdapterConfig(**HOULSBY), head="classification")


def test_adding_or_training_an_adapter_never_changes_another_head(batch):
    model = make_model(num_labels=3)
    sa.add_adapter(model, "a", sa.SparseAdapterConfig(**HOULSBY, seed=1))
    randomize(model, "a", 1)
    before = head_state(model, "a")
    want = answer(model, "a", batch)
    sa.add_adapter(model, "c", sa.SparseAdapterConfig(**HOULSBY, seed=3))  # default: a copy of the current head
    c = sa.adapter_head(model, "c")
    assert c.module is not sa.adapter_head(model, "a").module
    assert all(torch.equal(c.module.state_dict()[k], v) for k, v in before.items())
    sa.add_adapter(
        model, "d", sa.SparseAdapterConfig(**HOULSBY, seed=4), head=sa.HeadConfig("classification", 5), activate=False
    )
    assert sa.adapter_head(model, "d").outputs == 5 and model.classifier is c.module  # not activated
    sa.train_adapter(model, "c")
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    model.train()
    model(**batch, labels=torch.tensor([0, 1, 2, 0])).loss.backward()
    optimizer.step()
    model.eval()
    assert not all(torch.equal(c.module.state_dict()[k], v) for k, v in before.items())  # c's head learnt
    assert all(torch.equal(head_state(model, "a")[k], v) for k, v in before.items())  # a's did not move
    assert torch.equal(answer(model, "a", batch), want)
    assert answer(model, "d", batch).shape == (4, 5) and model.config.num_labels == 5


def test_head_kinds_are_checked(batch, tmp_path):
    model = make_model(num_labels=2)
    with pytest.raises(ValueError, match="a span head needs a question-answering model"):
        sa.add_adapter(model, "s", sa.SparseAdapterConfig(**HOULSBY), head="span")
    with pytest.raises(ValueError, match="has one output"):
        sa.HeadConfig("regression", 3)
    with pytest.raises(ValueError, match="num_labels >= 2"):
        sa.HeadConfig("classification", 1)
    qa = transformers.BertForQuestionAnswering(make_model().config)
    with pytest.raises(ValueError, match="a classification head needs a sequence-level task model"):
        sa.add_adapter(qa, "c", sa.SparseAdapterConfig(**HOULSBY), head=sa.HeadConfig("classification", 3))
    sa.add_adapter(qa, "s", sa.SparseAdapterConfig(**HOULSBY))
    assert sa.adapter_head(qa, "s").kind == "span"
    encoder = transformers.BertModel(make_model().config)
    sa.add_adapter(encoder, "plain", sa.SparseAdapterConfig(**HOULSBY))  # no task head: none to own
    assert sa.adapter_head(encoder, "plain") is None
    with pytest.raises(ValueError, match="no task head"):
        sa.add_adapter(encoder, "r", sa.SparseAdapterConfig(**HOULSBY), head="regression")
    # a saved head of another number of labels does not load onto a model head owned by no adapter
    sa.add_adapter(model, "two", sa.SparseAdapterConfig(**HOULSBY))
    sa.save_adapter(model, str(tmp_path / "two"), "two")
    with pytest.raises(ValueError, match="another number of labels"):
        sa.load_adapter(make_model(num_labels=3), str(tmp_path / "two"))


def test_head_info_travels_with_the_head(tmp_path):
    model = make_model(num_labels=2)
    sa.add_adapter(model, "a", sa.SparseAdapterConfig(**HOULSBY))
    sa.set_head_info(model, "a", note="kept", threshold=1.25)
    sa.save_adapter(model, str(tmp_path / "a"), "a")
    fresh = make_model(num_labels=2)
    sa.load_adapter(fresh, str(tmp_path / "a"), "renamed")
    assert sa.head_info(fresh, "renamed") == {"note": "kept", "threshold": 1.25}


def test_train_adapter_name_flag(tiny_model, sentiment_files, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(
        train_args(
            tiny_model,
            sentiment_files,
            out,
            "--adapter-name",
            "sentiment",
            "--max-steps",
            "4",
            "--bottleneck",
            "8",
            "--sparsity",
            "0.5",
            "--pruner",
            "random",
        )
    )
    assert code == 0, capsys.readouterr().err
    meta = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert meta["name"] == "sentiment" and meta["head"]["kind"] == "classification"
    assert json.loads((out / "adapter" / "train_config.json").read_text())["adapter_name"] == "sentiment"
    capsys.readouterr()
    assert main(["eval", "--adapter", str(out / "adapter"), "--json", "--no-progress"]) == 0
    assert 0 <= json.loads(capsys.readouterr().out)["accuracy"] <= 1
