"""The Python half of serving: the inference form of a model (prefixes folded, LoRA merged, each sparse
layer on the measured-faster kernel) computes what the trained model computes, and every export format
reproduces it on shapes it was not traced or exported with, carrying the metadata a server needs."""

import json
import zipfile

import pytest
import torch
from hf_support import needs_attention_interface, one_thread  # noqa: F401
from training_support import VOCAB, sentiment_files, tiny_model, train_args  # noqa: F401

import sparseadapter as sa
from sparseadapter import path_choice
from sparseadapter.adapters import SparseAdapterConfig, add_adapter, set_active_adapters
from sparseadapter.cli import main
from sparseadapter.serving import (
    ServingModel,
    densify,
    example_inputs,
    export_model,
    prepare_for_inference,
    serving_metadata,
)

transformers = pytest.importorskip("transformers")
RTOL = 1e-5  # flash-attention's rule, made strict: fp32 on CPU, same kernels on both sides


def assert_close(got, want, rtol=RTOL):
    scale = want.abs().max().item()
    err = (got - want).abs().max().item()
    assert got.shape == want.shape and err <= rtol * max(scale, 1e-6), f"max abs err {err:.3g} at scale {scale:.3g}"


def randomize_adapters(model, seed=0):
    """Trained-looking adapters: random values everywhere (LoRA's B starts at zero otherwise)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "sparseadapter" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.fixture
def classifier(tiny_model):
    torch.manual_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=3)
    add_adapter(model, "houlsby", SparseAdapterConfig(kind="houlsby", bottleneck=16, sparsity=0.8, pruner="random"))
    add_adapter(
        model, "lora", SparseAdapterConfig(kind="lora", bottleneck=8, sparsity=0.5, pruner="random"), activate=False
    )
    set_active_adapters(model, ["houlsby", "lora"])
    randomize_adapters(model)
    return model.eval()


def logits(model, inputs):
    with torch.inference_mode():
        return ServingModel(model)(*inputs)


META = {"vocab_size": len(VOCAB), "pad_token_id": 0}
SHAPES = [(1, 1), (1, 9), (4, 13), (7, 30)]


@pytest.mark.parametrize("path", ["sparse", "dense", "auto"])
def test_inference_form_matches_the_model(classifier, path):
    before = {k: v.clone() for k, v in classifier.state_dict().items()}
    served, plan = prepare_for_inference(classifier, path=path)
    allowed = {"sparse": {"fused"}, "dense": {"dense"}, "auto": {"fused", "sparse", "dense"}}[path]
    assert {c.path for c in plan.layers} <= allowed  # Houlsby adapters are whole: fused or dense
    assert len(plan.layers) == 2 * 2 * 2  # 2 layers x 2 Houlsby slots x (down, up); merged LoRA left out
    assert plan.merged_lora == ["lora"]
    for choice in plan.layers:
        want = torch.nn.Linear if choice.path == "dense" else sa.SparseLinear
        assert type(served.get_submodule(choice.name)) is want
    for batch, length in SHAPES:
        inputs = example_inputs(META, batch, length, seed=batch)
        assert_close(logits(served, inputs), logits(classifier, inputs))
    # the caller's model is untouched: still unmerged, same tensors, still trainable adapters
    assert all(torch.equal(before[k], v) for k, v in classifier.state_dict().items())
    assert any(p.requires_grad for p in classifier.parameters())
    assert not any(p.requires_grad for p in served.parameters())


def test_keeping_lora_unmerged_runs_it_sparse(classifier):
    served, plan = prepare_for_inference(classifier, path="sparse", merge_lora=False)
    assert plan.merged_lora == [] and len(plan.layers) == 8 + 2 * 2 * 2  # + LoRA on query and value
    assert sorted(c.path for c in plan.layers) == ["fused"] * 8 + ["sparse"] * 8
    inputs = example_inputs(META, 3, 11)
    assert_close(logits(served, inputs), logits(classifier, inputs))


@needs_attention_interface
def test_prefixes_are_folded(tiny_model):
    torch.manual_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=2)
    add_adapter(
        model, "mam", SparseAdapterConfig(kind="mam", sparsity=0.6, pruner="random", prefix_length=4, prefix_mid_dim=16)
    )
    randomize_adapters(model)
    model.eval()
    served, plan = prepare_for_inference(model, path="sparse")
    assert plan.folded_prefixes == ["mam"]
    assert not any("mlp_in" in n for n, _ in served.named_parameters())
    inputs = example_inputs(META, 2, 7)
    assert_close(logits(served, inputs), logits(model, inputs))


def test_densify_is_the_same_map():
    layer = sa.SparseLinear.from_dense(torch.randn(6, 10), torch.rand(6, 10) < 0.3, torch.randn(6))
    x = torch.randn(5, 10)
    assert_close(densify(layer)(x), layer(x))


def test_auto_follows_the_crossover_table(tmp_path, monkeypatch):
    monkeypatch.setenv(path_choice.PATH_ENV, "auto")  # the suite runs with SPARSEADAPTER_PATH=sparse
    table = path_choice.CrossoverTable(
        "cpu",
        "float32",
        [
            {"kind": "linear", "in_features": 64, "out_features": 16, "tokens": 100, "crossover_density": 0.5},
            {"kind": "linear", "in_features": 64, "out_features": 16, "tokens": 10000, "crossover_density": 0.1},
        ],
    )
    file = tmp_path / "table.json"
    file.write_text(table.to_json())
    monkeypatch.setenv(path_choice.TABLE_ENV, str(file))
    choose = path_choice.choose_path
    assert choose(64, 16, 0.3, 128) == "sparse"  # nearest point: tokens 100, crossover 0.5
    assert choose(64, 16, 0.3, 8192) == "dense"  # nearest point: tokens 10000, crossover 0.1
    assert choose(64, 16, 0.3, 8192, path="sparse") == "sparse"
    # whole adapters have their own points; none of that kind measured: the sparse kernel
    assert choose(64, 16, 0.3, 8192, kind="adapter") == "sparse"
    table.points.append(
        {"kind": "adapter", "in_features": 64, "out_features": 16, "tokens": 100, "crossover_density": 0.2}
    )
    file.write_text(table.to_json())
    assert choose(64, 16, 0.3, 8192, kind="adapter") == "dense"
    assert choose(64, 16, 0.1, 8192, kind="adapter") == "sparse"
    monkeypatch.setenv(path_choice.PATH_ENV, "dense")
    assert choose(64, 16, 0.01, 128) == "dense"
    monkeypatch.setenv(path_choice.PATH_ENV, "fast")
    with pytest.raises(ValueError, match="path must be one of"):
        choose(64, 16, 0.3, 128)


def test_bad_crossover_tables_are_named(tmp_path, monkeypatch):
    monkeypatch.setenv(path_choice.PATH_ENV, "auto")  # the suite runs with SPARSEADAPTER_PATH=sparse
    monkeypatch.setenv(path_choice.TABLE_ENV, str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="no such file"):
        path_choice.choose_path(64, 16, 0.3, 128)
    bad = tmp_path / "bad.json"
    bad.write_text('{"device": "cpu", "points": [{"in_features": 1}]}')
    monkeypatch.setenv(path_choice.TABLE_ENV, str(bad))
    with pytest.raises(ValueError, match="not a crossover table"):
        path_choice.choose_path(64, 16, 0.3, 128)


def test_shipped_table_covers_the_adapter_shapes():
    table = path_choice.load_table("cpu", torch.float32)
    assert table is not None and table.meta.get("torch")
    shapes = {(p["in_features"], p["out_features"]) for p in table.points}
    assert {(384, 64), (64, 384), (768, 64), (64, 768)} <= shapes
    assert {(p["in_features"], p["out_features"]) for p in table.points if p["kind"] == "adapter"} >= {(384, 64)}
    assert all(0.0 <= p["crossover_density"] <= 1.0 for p in table.points)


def test_calibrate_writes_a_table_path_choice_reads(tmp_path, monkeypatch, capsys):
    out = tmp_path / "cal.json"
    assert main(["bench", "--calibrate", "--quick", "--output", str(out)]) == 0
    table = path_choice.CrossoverTable.from_json(out.read_text(), str(out))
    assert [p["kind"] for p in table.points] == ["linear", "adapter"] and table.points[0]["in_features"] == 48
    assert "crossover" in capsys.readouterr().out


def test_metadata(classifier):
    meta = serving_metadata(classifier, labels=["a", "b", "c"])
    assert meta["format"] == "sparseadapter-serving" and meta["version"] == 1
    assert (meta["task"], meta["num_labels"], meta["labels"]) == ("classification", 3, ["a", "b", "c"])
    assert (meta["vocab_size"], meta["max_length"], meta["type_vocab_size"]) == (len(VOCAB), 64, 2)
    with pytest.raises(ValueError, match="2 label names for a model with 3 outputs"):
        serving_metadata(classifier, labels=["a", "b"])
    classifier.config.problem_type, classifier.config.num_labels = "regression", 1
    meta = serving_metadata(classifier)
    assert meta["task"] == "regression" and meta["labels"] is None


def _read_metadata(path):
    with zipfile.ZipFile(path) as z:
        name = next(n for n in z.namelist() if n.endswith("sparseadapter.json"))
        return json.loads(z.read(name))


@pytest.mark.parametrize("fmt", ["torchscript", "export"])
def test_export_reproduces_the_model(classifier, tmp_path, fmt):
    served, _ = prepare_for_inference(classifier, path="sparse")
    path = tmp_path / f"model.{'pt' if fmt == 'torchscript' else 'pt2'}"
    meta = export_model(served, str(path), fmt=fmt)
    assert _read_metadata(path) == meta
    if fmt == "torchscript":
        loaded = torch.jit.load(str(path))
        assert "sparseadapter::sparse_adapter" in str(loaded.inlined_graph)  # Houlsby: one fused call
    else:
        program = torch.export.load(str(path))
        assert "sparseadapter.sparse_adapter" in str(program.graph)
        loaded = program.module()
    for batch, length in SHAPES:
        inputs = example_inputs(META, batch, length, seed=length)
        with torch.inference_mode():
            assert_close(loaded(*inputs), logits(classifier, inputs))


def test_aoti_package_reproduces_the_model(classifier, tmp_path):
    pytest.importorskip("torch._inductor")
    served, _ = prepare_for_inference(classifier, path="sparse")
    path = tmp_path / "model.pt2"
    meta = export_model(served, str(path), fmt="aoti")
    assert json.loads((tmp_path / "model.pt2.json").read_text()) == meta
    runner = torch._inductor.aoti_load_package(str(path))
    for batch, length in SHAPES[1:]:
        inputs = example_inputs(META, batch, length, seed=length)
        with torch.inference_mode():
            assert_close(runner(*inputs), logits(classifier, inputs))


def test_export_refuses_unknown_format(classifier, tmp_path):
    with pytest.raises(ValueError, match="format must be one of"):
        export_model(classifier, str(tmp_path / "m"), fmt="onnx")


def test_cli_exports_a_trained_adapter(tiny_model, sentiment_files, tmp_path, capsys):
    run = tmp_path / "run"
    assert (
        main(train_args(tiny_model, sentiment_files, run, "--epochs", "1", "--sparsity", "0.8", "--pruner", "random"))
        == 0
    )
    out = tmp_path / "served.pt"
    assert main(["export", "--adapter", str(run / "best"), "--output", str(out), "--path", "sparse"]) == 0
    printed = capsys.readouterr().out
    assert "run in fused sparse adapters" in printed and f"wrote {out}" in printed
    meta = _read_metadata(out)
    assert meta["labels"] == ["0", "1"] and meta["max_length"] == 64
    assert main(["export", "--adapter", str(tmp_path / "nowhere"), "--output", str(out)]) == 2
    assert "no train_config.json" in capsys.readouterr().err
