"""peft interop: a peft LoRA folder imported (and pruned) as a sparse adapter, and a sparse LoRA written
back as a peft folder (densified) that peft loads to the same outputs. Skipped without peft."""

import json
import math

import pytest
import torch
from hf_support import one_thread, tiny_bert_classifier  # noqa: F401

import sparseadapter as sa
from sparseadapter import SparseLinear

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def base_model(seed=0):
    transformers.logging.set_verbosity_error()
    return tiny_bert_classifier(seed)


IDS = torch.randint(0, 40, (4, 9), generator=torch.Generator().manual_seed(1))


def logits(model):
    model.eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits


def trained_peft_folder(tmp_path, trained=True, **lora):
    model = peft.get_peft_model(
        base_model(),
        peft.LoraConfig(
            **{
                **dict(r=4, lora_alpha=8, target_modules=["query", "value"], lora_dropout=0.1, task_type="SEQ_CLS"),
                **lora,
            }
        ),
    )
    if trained:  # where training would take B and the head
        with torch.no_grad():
            gen = torch.Generator().manual_seed(2)
            for name, p in model.named_parameters():
                if "lora_B" in name or "modules_to_save" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    folder = tmp_path / "peft"
    model.save_pretrained(folder)
    return folder, logits(model)


@pytest.mark.parametrize("rslora", [False, True])
def test_a_dense_import_computes_what_peft_computes(tmp_path, rslora):
    folder, expected = trained_peft_folder(tmp_path, use_rslora=rslora)
    model = sa.from_peft(base_model(), str(folder))
    torch.testing.assert_close(logits(model), expected, rtol=1e-5, atol=1e-6)
    lora = model.bert.encoder.layer[0].attention.self.query.sparseadapter.adapters["default"]
    assert lora.scaling == pytest.approx(8 / (math.sqrt(4) if rslora else 4))
    assert lora.dropout.p == 0.1


def test_import_prunes_into_a_sparse_adapter_and_exports_back_to_peft(tmp_path):
    folder, peft_logits = trained_peft_folder(tmp_path)
    model = sa.from_peft(base_model(), str(folder), "task", sparsity=0.5, pruner="magnitude")
    sparse = [m for n, m in model.named_modules() if isinstance(m, SparseLinear)]
    assert len(sparse) == 8 and all(m.nnz == m.in_features * m.out_features // 2 for m in sparse)
    record = sa.pruning_record(model, "task")
    assert (record.method, record.sparsity, record.scope) == ("magnitude", 0.5, "layer")
    # magnitude pruning keeps the largest entries of the peft matrices, with their values
    b = model.bert.encoder.layer[0].attention.self.query.sparseadapter.adapters["task"].lora_B
    peft_b = sa.adapters.peft_interop._read_peft(str(folder))[1][
        "bert.encoder.layer.0.attention.self.query.lora_B.weight"
    ]
    kept = b.to_dense() != 0
    assert torch.equal(b.to_dense()[kept], peft_b[kept])
    assert peft_b[kept].abs().min() >= peft_b[~kept].abs().max()
    ours = logits(model)
    assert not torch.allclose(ours, peft_logits)  # half of it is gone

    out = tmp_path / "back"
    sa.to_peft(model, str(out))
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"], config["modules_to_save"]) == (
        "LORA",
        4,
        8.0,
        ["classifier"],
    )
    reloaded = peft.PeftModel.from_pretrained(base_model(), str(out))
    torch.testing.assert_close(logits(reloaded), ours, rtol=1e-5, atol=1e-6)


def test_an_untrained_peft_adapter_stays_a_no_op_after_pruning(tmp_path):
    folder, _ = trained_peft_folder(tmp_path, trained=False)
    base = base_model()
    head = {k: v.clone() for k, v in base.classifier.state_dict().items()}
    model = sa.from_peft(base_model(), str(folder), sparsity=0.75, pruner="magnitude", load_head=False)
    with torch.no_grad():
        model.classifier.load_state_dict(head)
    assert torch.equal(logits(model), logits(base))


def test_what_a_sparse_adapter_cannot_take_is_refused(tmp_path):
    folder, _ = trained_peft_folder(tmp_path, use_dora=True)
    with pytest.raises(ValueError, match="use_dora=True"):
        sa.from_peft(base_model(), str(folder))
    ia3 = peft.get_peft_model(
        base_model(), peft.IA3Config(target_modules=["key", "value"], feedforward_modules=[], task_type="SEQ_CLS")
    )
    ia3.save_pretrained(tmp_path / "ia3")
    with pytest.raises(ValueError, match="IA3 adapter; only peft's LoRA"):
        sa.from_peft(base_model(), str(tmp_path / "ia3"))
    model = sa.add_adapter(base_model(), "h", sa.SparseAdapterConfig(kind="houlsby", bottleneck=4))
    with pytest.raises(ValueError, match="LoRA adapters only"):
        sa.to_peft(model, str(tmp_path / "nope"))
    other = transformers.BertForSequenceClassification(
        transformers.BertConfig(
            vocab_size=40,
            hidden_size=48,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=32,
            num_labels=3,
        )
    )
    (tmp_path / "again").mkdir()
    folder, _ = trained_peft_folder(tmp_path / "again")
    with pytest.raises(ValueError, match="shape"):
        sa.from_peft(other, str(folder))


def test_an_import_gets_its_own_head_and_exports_it(tmp_path):
    """A peft folder imported beside another adapter fills a head of its own: the other adapter's head
    and answers stay as they were, and to_peft writes each adapter's own head, active or not."""
    folder, expected = trained_peft_folder(tmp_path)
    model = base_model()
    sa.add_adapter(model, "mine", sa.SparseAdapterConfig(kind="lora", bottleneck=4, sparsity=0.5, pruner="random"))
    with torch.no_grad():
        sa.adapter_head(model, "mine").module.weight.mul_(3.0)
    mine = logits(model)
    head_before = {k: v.clone() for k, v in sa.adapter_head(model, "mine").module.state_dict().items()}
    sa.from_peft(model, str(folder), "imported")
    torch.testing.assert_close(logits(model), expected, rtol=1e-5, atol=1e-6)  # imported is active
    assert sa.adapter_head(model, "imported").module is not sa.adapter_head(model, "mine").module
    after = sa.adapter_head(model, "mine").module.state_dict()
    assert all(torch.equal(after[k], head_before[k]) for k in head_before)
    sa.set_active_adapters(model, "mine")
    assert torch.equal(logits(model), mine)
    sa.to_peft(model, str(tmp_path / "back"), "imported")  # not active: its own head still goes out
    reloaded = peft.PeftModel.from_pretrained(base_model(), str(tmp_path / "back"))
    torch.testing.assert_close(logits(reloaded), expected, rtol=1e-5, atol=1e-6)
