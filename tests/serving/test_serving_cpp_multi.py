"""sparseadapter_serve on a model exported with several adapters: requests name their adapter
("adapter": "name"), requests for different adapters are answered from one forward, each row with
what Python gives it with its adapter; a request naming an unknown adapter, or none, gets an error line
and the others in its batch are answered."""

import json

import pytest
import torch
from cmake_support import serve_lines
from hf_support import one_thread  # noqa: F401
from runtime_adapters_support import save_random_adapter
from training_support import tiny_model  # noqa: F401

from sparseadapter.adapters import SparseAdapterConfig
from sparseadapter.serving import (
    MultiAdapterServingModel,
    export_model,
    load_adapters,
    prepare_for_inference,
    serving_metadata,
)

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def exported(tiny_model, tmp_path_factory):
    """A model serving a LoRA adapter "alpha" and a Houlsby adapter "beta" (each with its own head), the
    Python module it was traced from, and its metadata."""
    root = tmp_path_factory.mktemp("multi-serve")
    for seed, (name, kind) in enumerate((("alpha", "lora"), ("beta", "houlsby"))):
        torch.manual_seed(seed)
        model = transformers.AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=3)
        config = SparseAdapterConfig(kind=kind, bottleneck=8, sparsity=0.6, pruner="random", seed=seed)
        save_random_adapter(model, name, config, seed, root / name)
    torch.manual_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=3)
    names = load_adapters(model, [str(root / "alpha"), str(root / "beta")])
    model, _ = prepare_for_inference(model, path="sparse", merge_lora=False, inplace=True)
    meta = serving_metadata(model, labels=["a", "b", "c"])
    meta["adapters"] = names
    serving = MultiAdapterServingModel(model, names)
    export_model(model, str(root / "both.pt"), meta=meta, serving=serving)
    return root / "both.pt", serving, meta


def test_mixed_requests_are_answered_each_by_its_adapter(cmake_build, exported):
    binary = cmake_build[1] / "sparseadapter_serve"
    path, serving, meta = exported
    gen = torch.Generator().manual_seed(5)
    sentences = [torch.randint(3, meta["vocab_size"], (n,), generator=gen).tolist() for n in (5, 9, 3, 7, 6)]
    adapters = ["beta", "alpha", "alpha", "beta", "alpha"]
    lines = [json.dumps({"id": i, "input_ids": s, "adapter": a}) for i, (s, a) in enumerate(zip(sentences, adapters))]
    lines.insert(2, json.dumps({"id": "x", "input_ids": sentences[0], "adapter": "gamma"}))
    lines.insert(4, json.dumps({"id": "y", "input_ids": sentences[0]}))
    lines.append(json.dumps({"id": "b", "input_ids": [sentences[1], sentences[2]], "adapter": "beta"}))
    answers, _ = serve_lines(binary, path, lines, "--batch-size", "16")
    assert [a.get("id") for a in answers] == [0, 1, "x", 2, "y", 3, 4, "b"]
    by_id = {a["id"]: a for a in answers}
    assert by_id["x"]["error"] == 'unknown adapter "gamma" (this model serves alpha, beta)'
    assert 'missing "adapter"' in by_id["y"]["error"] and "alpha, beta" in by_id["y"]["error"]
    for i, (s, a) in enumerate(zip(sentences, adapters)):
        ids = torch.tensor([s])
        with torch.inference_mode():
            want = serving(ids, torch.ones_like(ids), torch.zeros_like(ids), torch.tensor([meta["adapters"].index(a)]))
        torch.testing.assert_close(torch.tensor(by_id[i]["logits"]), want[0], rtol=1e-4, atol=1e-5)
        assert by_id[i]["label_name"] == "abc"[int(want[0].argmax())]
    pad = len(sentences[1]) - len(sentences[2])  # the batch request's second row, padded by the server
    batch = torch.tensor([sentences[1], sentences[2] + [meta["pad_token_id"]] * pad])
    mask = torch.tensor([[1] * len(sentences[1]), [1] * len(sentences[2]) + [0] * pad])
    with torch.inference_mode():
        want = serving(batch, mask, torch.zeros_like(batch), torch.tensor([1, 1]))
    torch.testing.assert_close(torch.tensor(by_id["b"]["logits"]), want, rtol=1e-4, atol=1e-5)


def test_adapter_must_be_a_name(cmake_build, exported):
    binary = cmake_build[1] / "sparseadapter_serve"
    path, _, _ = exported
    answers, _ = serve_lines(
        binary,
        path,
        [json.dumps({"input_ids": [4, 5], "adapter": 3}), json.dumps({"input_ids": [4, 5], "adapter": "alpha"})],
    )
    assert answers[0]["error"] == '"adapter" must be an adapter\'s name (a string)'
    assert "error" not in answers[1] and len(answers[1]["logits"]) == 3


def test_a_single_adapter_model_refuses_the_adapter_key(cmake_build, tmp_path):
    from test_serving_cpp import TinyClassifier, metadata, save

    binary = cmake_build[1] / "sparseadapter_serve"
    path = save(TinyClassifier(), tmp_path / "one.pt", metadata())
    answers, _ = serve_lines(
        binary, path, [json.dumps({"input_ids": [4, 5], "adapter": "alpha"}), json.dumps({"input_ids": [4, 5]})]
    )
    assert "this model was exported with one adapter" in answers[0]["error"]
    assert "error" not in answers[1]
