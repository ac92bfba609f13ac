"""Regression that learns whatever the label range, and runs that say so when their predictions collapse.

The same data with labels in 0-1, 1-5 and 0-100 trains the same model (the head learns standardized
targets and answers in label units), starts at a loss of about 1, and learns an easy task in a few
dozen steps; the normalization is stored with the head through save/load, checkpoints and resume, and
`eval` and exported models answer in label units. A run whose predictions are one constant (one class)
says so in its summary and results.md, beside the majority-class / mean-prediction baseline."""

import contextlib
import hashlib
import io
import json
import random

import pytest
import torch
from hf_support import one_thread  # noqa: F401
from repo_paths import REPO
from training_support import NEGATIVE, POSITIVE, VOCAB, tiny_model, write_csv, write_tiny_model  # noqa: F401

import sparseadapter as sa
from sparseadapter.adapters import SparseAdapterConfig, add_adapter
from sparseadapter.adapters.head import target_stats
from sparseadapter.adapters.io import config_digest, weights_path
from sparseadapter.cli import main
from sparseadapter.serving import ServingModel, example_inputs, export_model, prepare_for_inference, serving_metadata
from sparseadapter.training.batching import TrainOrder
from sparseadapter.training.engine import load_saved
from sparseadapter.training.metrics import (
    COLLAPSE_STD_FRACTION,
    baseline_prediction,
    collapse_warning,
    prediction_diagnostics,
)
from sparseadapter.training.tasks import TaskSpec

transformers = pytest.importorskip("transformers")
safetensors = pytest.importorskip("safetensors.torch")

RANGES = {"0-1": (1.0, 0.0), "1-5": (4.0, 1.0), "0-100": (100.0, 0.0)}  # label = scale * positive + shift
STEPS = 48
REGRESSION = TaskSpec("r", 1, metrics=("pearson", "spearman"), main_metric="pearson")
CLASSES = TaskSpec("c", 3, ("neg", "neu", "pos"), ("accuracy", "macro_f1"))


def word_rows(count, seed, scale=1.0, shift=0.0, same_text=False):
    """One sentiment word per row; the label is whether it is positive (an integer class, or scale * that
    + shift). same_text: every row reads the same, the labels still alternate, so no model can tell
    them apart and its predictions must be one constant."""
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        positive = i % 2
        text = "the film was good" if same_text else rng.choice(POSITIVE if positive else NEGATIVE)
        rows.append({"text": text, "label": positive if scale is None else scale * positive + shift})
    return rows


def write_splits(folder, scale=1.0, shift=0.0, constant_test=False):
    folder.mkdir(parents=True, exist_ok=True)
    sizes = (("train", 96, 1), ("validation", 32, 2), ("test", 40, 3))
    return {
        split: write_csv(folder / f"{split}.csv", word_rows(n, seed, scale, shift, split == "test" and constant_test))
        for split, n, seed in sizes
    }


def run_cli(argv):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(argv)
    assert code == 0, out.getvalue()
    return out.getvalue()


def train_argv(model, files, out, *extra):
    return [
        "train",
        "--model",
        model,
        "--task",
        "custom",
        "--train-file",
        files["train"],
        "--validation-file",
        files["validation"],
        "--test-file",
        files["test"],
        "--output-dir",
        str(out),
        "--batch-size",
        "8",
        "--max-length",
        "16",
        "--lr",
        "1e-2",
        "--no-progress",
        "--threads",
        "1",
        "--kind",
        "houlsby",
        "--bottleneck",
        "8",
        "--sparsity",
        "0.5",
        "--pruner",
        "snip",
        *extra,
    ]


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def learner(tmp_path_factory):
    """The tiny BERT at a smaller initializer range and without dropout: its pooled sentence vectors
    differ from word to word, so the word tasks here are learnt in a few dozen steps."""
    return write_tiny_model(tmp_path_factory.mktemp("learner"), dropout=0.0, initializer_range=0.2)


@pytest.fixture(scope="module")
def ranged_runs(learner, tmp_path_factory):
    """One run per label range, same data, seed and steps; evaluated after every step."""
    root = tmp_path_factory.mktemp("ranges")
    runs = {}
    with torch.random.fork_rng():
        torch.set_num_threads(1)
        for name, (scale, shift) in RANGES.items():
            files = write_splits(root / f"data-{name}", scale, shift)
            out = root / f"run-{name}"
            stdout = run_cli(
                train_argv(
                    learner,
                    files,
                    out,
                    "--regression",
                    "--max-steps",
                    str(STEPS),
                    "--eval-every",
                    "1",
                    "--checkpoint-every",
                    "0",
                )
            )
            runs[name] = dict(
                dir=out,
                files=files,
                stdout=stdout,
                scale=scale,
                shift=shift,
                results=json.loads((out / "results.json").read_text()),
            )
    return runs


# ------------------------------------------------------------------------------ learning, any range


def test_first_loss_is_about_one_for_every_label_range(ranged_runs):
    """In standardized units the loss starts near 1 (predicting the training mean). A head in label
    units started near 0: a first loss of about 10 for labels 1-5 and about 3,000 for 0-100."""
    for name, run in ranged_runs.items():
        first = records(run["dir"])[0]
        assert first["step"] == 1
        assert 0.5 < first["train_loss"] < 1.5, (name, first["train_loss"])
        norm = run["results"]["target_normalization"]
        # balanced 0/1 classes: mean shift + scale/2, standard deviation scale/2
        assert norm["mean"] == pytest.approx(run["shift"] + run["scale"] / 2)
        assert norm["scale"] == pytest.approx(run["scale"] / 2)


def test_every_label_range_learns_the_same_model(ranged_runs):
    tests = {name: run["results"]["test"] for name, run in ranged_runs.items()}
    for name, test in tests.items():
        run = ranged_runs[name]
        assert test["pearson"] > 0.9, (name, test)
        # predictions are in label units and spread like the labels: not a constant
        label_mean = run["shift"] + run["scale"] / 2
        assert abs(test["prediction_mean"] - label_mean) < 0.2 * test["label_std"], (name, test)
        assert test["prediction_std"] > 0.5 * test["label_std"], (name, test)
        assert run["results"]["warnings"] == [] and "WARNING" not in run["stdout"]
        assert "Warning" not in (run["dir"] / "results.md").read_text()
    reference = tests["0-1"]
    for name, test in tests.items():  # the same weights up to rounding: the same scores within noise
        for key in ("pearson", "spearman", "loss"):
            assert test[key] == pytest.approx(reference[key], abs=1e-3), (name, key)
    steps = [[r["train_loss"] for r in records(run["dir"]) if "train_loss" in r] for run in ranged_runs.values()]
    for losses in steps[1:]:
        assert losses == pytest.approx(steps[0], rel=1e-3, abs=1e-4)


def test_summary_and_results_show_targets_and_baseline(ranged_runs):
    run = ranged_runs["0-100"]
    assert "targets     standardized: mean 50, std 50" in run["stdout"]
    assert "baseline    test, predicting the training mean (50): pearson 0.0000" in run["stdout"]
    md = (run["dir"] / "results.md").read_text()
    assert "| test, baseline: mean of train (50) | 1.0000 | 0.0000 | 0.0000 |" in md
    assert "standard deviation 50" in md


def test_eval_and_export_answer_in_label_units(ranged_runs, tmp_path):
    run = ranged_runs["0-100"]
    adapter = run["dir"] / "adapter"
    again = json.loads(run_cli(["eval", "--adapter", str(adapter), "--json", "--no-progress"]))
    test = run["results"]["test"]
    for key in ("pearson", "spearman", "loss", "prediction_mean", "prediction_std"):
        assert again[key] == pytest.approx(test[key], rel=1e-5, abs=1e-6), key
    printed = run_cli(["eval", "--adapter", str(adapter), "--no-progress"])
    assert "baseline: predicting the training mean (50)" in printed and "WARNING" not in printed

    out = tmp_path / "served.pt"
    assert main(["export", "--adapter", str(adapter), "--output", str(out), "--path", "sparse"]) == 0
    extra = {"sparseadapter.json": ""}
    loaded = torch.jit.load(str(out), _extra_files=extra)
    meta = json.loads(extra["sparseadapter.json"])
    assert meta["task"] == "regression"
    assert (meta["target_normalization"]["mean"], meta["target_normalization"]["scale"]) == pytest.approx((50, 50))
    _, _, tokenizer, model = load_saved(str(adapter))
    enc = tokenizer(["good film", "awful plot"], padding=True, return_tensors="pt")
    inputs = (enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
    with torch.inference_mode():
        served, eager = loaded(*inputs), ServingModel(model.eval())(*inputs)
    assert torch.allclose(served, eager, rtol=1e-4, atol=1e-3)
    assert served[0, 0] > 75 and served[1, 0] < 25  # label units: positive near 100, negative near 0


# ------------------------------------------------------------------------------ save, load, resume


def _regressor(model_dir, mean, scale, seed=0):
    torch.manual_seed(seed)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        model_dir, num_labels=1, problem_type="regression"
    )
    add_adapter(model, "task", SparseAdapterConfig(kind="houlsby", bottleneck=8, sparsity=0.5, pruner="random"))
    if mean is not None:
        sa.set_target_normalization(model, mean, scale)
    return model.eval()


def test_normalization_round_trips_through_save_and_load(tiny_model, tmp_path):
    model = _regressor(tiny_model, 2.75, 0.8)
    inputs = example_inputs({"vocab_size": len(VOCAB), "pad_token_id": 0}, 3, 7)
    with torch.no_grad():
        want = ServingModel(model)(*inputs)
        sa.clear_target_normalization(model)
        raw = ServingModel(model)(*inputs)
        sa.set_target_normalization(model, 2.75, 0.8)
    assert torch.allclose(want, raw * 0.8 + 2.75, atol=1e-6)
    sa.save_adapter(model, str(tmp_path / "a"), "task")
    stored = safetensors.load_file(weights_path(str(tmp_path / "a")))
    assert float(stored["head.classifier.target_mean"]) == 2.75
    assert float(stored["head.classifier.target_scale"]) == pytest.approx(0.8)

    fresh = _regressor(tiny_model, None, None, seed=1)  # another head, no normalization
    assert sa.target_normalization(fresh) is None
    with torch.no_grad():
        sa.load_adapter(fresh, str(tmp_path / "a"), "again")
        assert sa.target_normalization(fresh) == pytest.approx((2.75, 0.8))
        sa.set_active_adapters(fresh, ["again"])
        assert torch.allclose(ServingModel(fresh.eval())(*inputs), want, atol=1e-6)

    # a head saved in raw units replaces a normalized one whole
    plain = _regressor(tiny_model, None, None, seed=2)
    sa.save_adapter(plain, str(tmp_path / "plain"), "task")
    other = _regressor(tiny_model, 10.0, 3.0, seed=3)
    sa.load_adapter(other, str(tmp_path / "plain"), "p")
    assert sa.target_normalization(other) is None

    # the inference form and its TorchScript keep the normalization in the graph
    served, _ = prepare_for_inference(fresh, path="sparse")
    meta = serving_metadata(served)
    assert meta["target_normalization"]["mean"] == pytest.approx(2.75)
    export_model(served, str(tmp_path / "m.pt"), meta=meta)
    with torch.inference_mode():
        assert torch.allclose(torch.jit.load(str(tmp_path / "m.pt"))(*inputs), want, atol=1e-5)


def test_load_refuses_a_broken_normalization(tiny_model, tmp_path):
    model = _regressor(tiny_model, 1.0, 2.0)
    sa.save_adapter(model, str(tmp_path / "a"), "task")
    path = weights_path(str(tmp_path / "a"))
    tensors = safetensors.load_file(path)
    tensors["head.classifier.target_scale"] = torch.tensor(-1.0)
    blob = safetensors.save(tensors)
    with open(path, "wb") as f:
        f.write(blob)
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    config["weights_sha256"] = hashlib.sha256(blob).hexdigest()
    config["config_sha256"] = config_digest(config)  # a forged but self-consistent folder
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(config))
    fresh = _regressor(tiny_model, None, None)
    with pytest.raises(ValueError, match="invalid target_scale"):
        sa.load_adapter(fresh, str(tmp_path / "a"), "b")
    assert sa.target_normalization(fresh) is None and "b" not in sa.active_adapters(fresh)


def test_target_stats_and_bad_normalizations(tiny_model):
    assert target_stats([1.0, 3.0]) == (2.0, 1.0)
    assert target_stats([7.0, 7.0, 7.0]) == (7.0, 1.0)  # no spread to standardize by
    model = _regressor(tiny_model, None, None)
    for mean, scale in ((0.0, 0.0), (0.0, -1.0), (float("nan"), 1.0)):
        with pytest.raises(ValueError, match="positive finite scale"):
            sa.set_target_normalization(model, mean, scale)
    with pytest.raises(ValueError, match="no task head"):
        sa.set_target_normalization(torch.nn.Linear(2, 1), 0.0, 1.0)


def test_killed_regression_run_resumes_with_its_normalization(learner, tmp_path, monkeypatch):
    files = write_splits(tmp_path / "data", 100.0, 0.0)
    common = ("--regression", "--max-steps", "12", "--eval-every", "5", "--checkpoint-every", "3")
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    run_cli(train_argv(learner, files, straight, *common))
    real_batch = TrainOrder.batch

    def batch_or_die(self, step):
        if step == 7 and self.batch_size == 8:
            raise KeyboardInterrupt
        return real_batch(self, step)

    monkeypatch.setattr(TrainOrder, "batch", batch_or_die)
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        assert main(train_argv(learner, files, interrupted, *common)) == 130
    checkpoint = safetensors.load_file(weights_path(str(interrupted / "checkpoint" / "adapter")))
    assert float(checkpoint["head.classifier.target_mean"]) == 50.0
    monkeypatch.setattr(TrainOrder, "batch", real_batch)
    run_cli(train_argv(learner, files, interrupted, *common, "--resume"))
    a = safetensors.load_file(weights_path(str(straight / "adapter")))
    b = safetensors.load_file(weights_path(str(interrupted / "adapter")))
    assert a.keys() == b.keys() and "head.classifier.target_scale" in a
    assert all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (straight, interrupted))
    assert ra["test"] == rb["test"]


# ------------------------------------------------------------------------------ collapse warnings


def test_collapse_warning_rules():
    labels = [0.0, 1.0, 2.0, 3.0]
    constant = prediction_diagnostics(REGRESSION, [1.5] * 4, labels, baseline=1.5)
    message = collapse_warning(REGRESSION, constant, "test")
    assert message.startswith("test predictions collapsed") and "predicting the training mean (1.5)" in message
    spread = 1.01 * COLLAPSE_STD_FRACTION * 1.25**0.5  # just above the threshold (label std of 0..3)
    almost = prediction_diagnostics(REGRESSION, [1.5 - spread, 1.5 + spread] * 2, labels)
    assert collapse_warning(REGRESSION, almost) is None
    tight = prediction_diagnostics(REGRESSION, [1.5 - spread / 2, 1.5 + spread / 2] * 2, labels)
    assert "collapsed" in collapse_warning(REGRESSION, tight)
    assert collapse_warning(REGRESSION, prediction_diagnostics(REGRESSION, [1.0] * 4, [2.0] * 4)) is None

    assert baseline_prediction(CLASSES, [2, 0, 2, 1]) == 2 and baseline_prediction(CLASSES, [1, 0]) == 0
    one = prediction_diagnostics(CLASSES, [2, 2, 2], [0, 1, 2], baseline=2)
    message = collapse_warning(CLASSES, one, "validation")
    assert "every example gets class 'pos'" in message and "majority class 'pos'" in message
    assert "accuracy 0.3333" in message
    assert collapse_warning(CLASSES, prediction_diagnostics(CLASSES, [2, 1, 2], [0, 1, 2])) is None
    # one class among the labels too: predicting it is no collapse
    assert collapse_warning(CLASSES, prediction_diagnostics(CLASSES, [1, 1], [1, 1])) is None


def test_collapsed_regression_says_so(learner, tmp_path):
    files = write_splits(tmp_path / "data", 4.0, 1.0, constant_test=True)
    out = tmp_path / "run"
    stdout = run_cli(train_argv(learner, files, out, "--regression", "--max-steps", str(STEPS)))
    results = json.loads((out / "results.json").read_text())
    assert len(results["warnings"]) == 1 and results["warnings"][0].startswith("test predictions collapsed")
    assert results["test"]["prediction_std"] < 1e-3 and results["test"]["pearson"] == 0.0
    assert "WARNING     test predictions collapsed" in stdout
    assert "predicting the training mean (3)" in stdout
    md = (out / "results.md").read_text()
    assert "**Warning: test predictions collapsed" in md and "| test, baseline: mean of train (3) |" in md
    printed = run_cli(["eval", "--adapter", str(out / "adapter"), "--no-progress"])
    assert "WARNING: test predictions collapsed" in printed


def test_collapsed_classifier_says_so(learner, tmp_path):
    files = write_splits(tmp_path / "data", None, constant_test=True)
    out = tmp_path / "run"
    stdout = run_cli(train_argv(learner, files, out, "--max-steps", str(STEPS)))
    results = json.loads((out / "results.json").read_text())
    assert results["validation"]["predicted_classes"] == 2  # a learnt classifier: no warning there
    assert len(results["warnings"]) == 1 and "every example gets class" in results["warnings"][0]
    assert "WARNING     test predictions collapsed: every example gets class" in stdout
    assert "always predicting the training majority class '0'" in stdout
    md = (out / "results.md").read_text()
    assert "**Warning: test predictions collapsed" in md
    assert "| test, baseline: majority class of train (0) | - | 0.5000 |" in md


# ------------------------------------------------------------------------------ the SICK converter


def test_sick_converter_writes_tables_the_custom_task_reads(tmp_path):
    """benchmarks/sick.py on a file laid out like SICK.txt (written here; the real one is evaluation data
    outside the repository): splits by SemEval_set, whitespace stripped, scores kept exactly."""
    import importlib.util

    from sparseadapter.training import infer_table_task, read_table

    script = REPO / "benchmarks" / "sick.py"
    spec = importlib.util.spec_from_file_location("sick_benchmark", script)
    sick = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sick)
    header = (
        "pair_ID\tsentence_A\tsentence_B\tentailment_label\trelatedness_score\tentailment_AB\tentailment_BA\t"
        "sentence_A_original\tsentence_B_original\tsentence_A_dataset\tsentence_B_dataset\tSemEval_set"
    )
    rows = [
        ("1", "A man plays", "A man is playing", "4.5", "TRAIN"),
        ("2", "A dog runs", 'A "cat" sleeps', "1.2", "TRIAL"),
        ("3", "Kids swim", "Children swim", "4.9", "TEST "),  # SICK has a row with a trailing character
        ("4", "A cat", "A car", "2", "TRAIN"),
    ]
    text = (
        header
        + "\n"
        + "".join(
            f"{i}\t{a}\t{b}\tNEUTRAL\t{s}\tx\ty\t{a}\t{b}\tFLICKR\tFLICKR\t{split}\n" for i, a, b, s, split in rows
        )
    )
    (tmp_path / "SICK.txt").write_text(text)
    info = sick.convert(tmp_path / "SICK.txt", tmp_path / "tables")
    assert info["counts"] == {"train": 2, "validation": 1, "test": 1}
    task = infer_table_task(list(info["files"].values()), regression=True)
    assert task.pair and task.is_regression
    train = read_table(info["files"]["train"], task)
    assert [(e.text, e.text_pair, e.label) for e in train] == [
        ("A man plays", "A man is playing", 4.5),
        ("A cat", "A car", 2.0),
    ]
    assert read_table(info["files"]["validation"], task)[0].text_pair == 'A "cat" sleeps'
    (tmp_path / "bad.txt").write_text(text.replace("TRIAL", "DEV"))
    with pytest.raises(ValueError, match="unknown SemEval_set 'DEV'"):
        sick.convert(tmp_path / "bad.txt", tmp_path / "bad")
