"""`sparseadapter train / eval / prune / demo` end to end on a tiny random BERT and tables written here:
the run writes what it promises, a killed run resumes to the bitwise same adapter, saved adapters score
the same in `eval`, and bad options, files and rows end in one clear line and exit status 2."""

import json
import os

import pytest
import torch
from hf_support import one_thread  # noqa: F401
from training_support import sentiment_files, sentiment_rows, tiny_model, train_args, write_csv  # noqa: F401

from sparseadapter.adapters.io import weights_path
from sparseadapter.cli import main
from sparseadapter.training.batching import TrainOrder
from sparseadapter.training.config import TrainConfig, read_config_file

safetensors = pytest.importorskip("safetensors.torch")


def run_ok(argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    assert code == 0, out.err
    return out.out


def run_error(argv, capsys, *needles):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and "error:" in err, err  # one line, not a traceback
    for needle in needles:
        assert needle in err, err
    return err


def adapter_tensors(folder):
    return safetensors.load_file(weights_path(str(folder)))


def test_train_writes_the_run_and_eval_reproduces_it(tiny_model, sentiment_files, tmp_path, capsys):
    out_dir = tmp_path / "run"
    stdout = run_ok(
        train_args(
            tiny_model,
            sentiment_files,
            out_dir,
            "--kind",
            "houlsby",
            "--bottleneck",
            "8",
            "--sparsity",
            "0.5",
            "--pruner",
            "snip",
            "--max-steps",
            "24",
            "--eval-every",
            "8",
        ),
        capsys,
    )
    for name in (
        "config.json",
        "metrics.jsonl",
        "results.json",
        "results.md",
        "adapter/adapter_config.json",
        "adapter/train_config.json",
        "checkpoint/trainer_state.pt",
    ):
        assert (out_dir / name).is_file(), name
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    periodic = [r for r in records if not r.get("final")]
    assert [r["step"] for r in periodic] == [8, 16, 24]
    assert all(r["split"] == "validation" and 0 <= r["accuracy"] <= 1 for r in periodic)
    results = json.loads((out_dir / "results.json").read_text())
    assert results["best_step"] in (8, 16, 24)
    assert 0 <= results["test"]["accuracy"] <= 1  # learning is checked on real data (test_training_demo.py)
    assert results["examples"] == {"train": 96, "validation": 32, "test": 40}
    # the adapter is really sparse: half of every adapter matrix's weights are gone
    params = results["parameters"]
    assert params["sparse_nnz"] == round(0.5 * params["sparse_dense_size"])
    assert "test" in stdout and "saved" in stdout and str(out_dir / "adapter") in stdout

    best = [r for r in periodic if r["step"] == results["best_step"]][0]
    assert results["validation"]["accuracy"] == pytest.approx(best["accuracy"])
    stdout = run_ok(
        ["eval", "--adapter", str(out_dir / "adapter"), "--split", "test", "--json", "--no-progress"], capsys
    )
    again = json.loads(stdout)
    assert again["accuracy"] == results["test"]["accuracy"]
    assert again["loss"] == pytest.approx(results["test"]["loss"], rel=1e-5)


def test_killed_run_resumes_to_the_same_adapter(tiny_model, sentiment_files, tmp_path, capsys, monkeypatch):
    """Interrupt at step 7 (checkpoints every 3 steps), resume: same adapter, bit for bit, as a run
    that never stopped; the data order, dropout RNG, optimizer and LR schedule all carry over."""
    common = (
        "--kind",
        "houlsby",
        "--bottleneck",
        "8",
        "--sparsity",
        "0.6",
        "--pruner",
        "snip",
        "--max-steps",
        "12",
        "--eval-every",
        "5",
        "--checkpoint-every",
        "3",
        "--adapter-dropout",
        "0.1",
    )
    straight = tmp_path / "straight"
    run_ok(train_args(tiny_model, sentiment_files, straight, *common), capsys)

    interrupted = tmp_path / "interrupted"
    real_batch = TrainOrder.batch

    def batch_or_die(self, step):
        if step == 7 and self.batch_size == 8:
            raise KeyboardInterrupt
        return real_batch(self, step)

    monkeypatch.setattr(TrainOrder, "batch", batch_or_die)
    assert main(train_args(tiny_model, sentiment_files, interrupted, *common)) == 130
    assert "--resume" in capsys.readouterr().err
    assert torch.load(interrupted / "checkpoint" / "trainer_state.pt", weights_only=True)["step"] == 6
    monkeypatch.setattr(TrainOrder, "batch", real_batch)
    run_ok(train_args(tiny_model, sentiment_files, interrupted, *common, "--resume"), capsys)

    a, b = adapter_tensors(straight / "adapter"), adapter_tensors(interrupted / "adapter")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    for name in ("checkpoint/adapter", "best"):
        last_a, last_b = adapter_tensors(straight / name), adapter_tensors(interrupted / name)
        assert all(torch.equal(last_a[k], last_b[k]) for k in last_a), name
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (straight, interrupted))
    assert ra["test"] == rb["test"] and ra["best_step"] == rb["best_step"]


def test_regression_and_pairs_from_jsonl(tiny_model, tmp_path, capsys):
    rows = sentiment_rows(48, seed=5, pairs=True)
    for r in rows:
        r["label"] = 2.5 * r["label"] + 0.5
    files = {
        "train": write_csv(tmp_path / "train.csv", rows),
        "validation": write_csv(tmp_path / "v.csv", rows[:16]),
        "test": write_csv(tmp_path / "t.csv", rows[16:32]),
    }
    out_dir = tmp_path / "run"
    run_ok(
        train_args(
            tiny_model,
            files,
            out_dir,
            "--regression",
            "--kind",
            "lora",
            "--sparsity",
            "0.5",
            "--pruner",
            "magnitude",
            "--max-steps",
            "4",
        ),
        capsys,
    )
    results = json.loads((out_dir / "results.json").read_text())
    metrics = {k for k in results["test"] if not k.startswith("baseline")}
    assert metrics == {"loss", "pearson", "spearman", "prediction_mean", "prediction_std", "label_std"}
    assert {"baseline", "baseline_loss", "baseline_pearson", "baseline_spearman"} <= set(results["test"])


def test_prune_reports_what_is_kept(tiny_model, sentiment_files, tmp_path, capsys):
    stdout = run_ok(
        [
            "prune",
            "--model",
            tiny_model,
            "--task",
            "custom",
            "--train-file",
            sentiment_files["train"],
            "--kind",
            "houlsby",
            "--bottleneck",
            "8",
            "--sparsity",
            "0.75",
            "--pruner",
            "synflow",
            "--no-progress",
            "--save",
            str(tmp_path / "pruned"),
        ],
        capsys,
    )
    total = [line for line in stdout.splitlines() if line.startswith("total")][0].split()
    # 2 layers x 2 sites x (32x8 + 8x32) weights, 25% kept
    assert total[1:] == ["512", "2,048", "0.750"]
    assert "budget 512" in stdout
    assert os.path.isfile(weights_path(str(tmp_path / "pruned")))


def test_config_file_then_flags(tmp_path):
    from sparseadapter.cli import build_config, make_parser

    (tmp_path / "run.yaml").write_text("kind: lora\nsparsity: 0.8\nlr: 3e-4\nepochs: 2\n")
    (tmp_path / "run.json").write_text(json.dumps({"kind": "pfeiffer", "large-sparse": 2, "batch_size": 16.0}))
    args = make_parser().parse_args(["train", "--config", str(tmp_path / "run.yaml"), "--sparsity", "0.9"])
    cfg = build_config(args)
    assert (cfg.kind, cfg.sparsity, cfg.lr, cfg.epochs) == ("lora", 0.9, 3e-4, 2.0)
    cfg = build_config(make_parser().parse_args(["train", "--config", str(tmp_path / "run.json")]))
    assert (cfg.kind, cfg.large_sparse, cfg.batch_size) == ("pfeiffer", 2, 16)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    assert read_config_file(str(tmp_path / "run.json"))["kind"] == "pfeiffer"


@pytest.mark.parametrize(
    "argv, needles",
    [
        (["train", "--sparsity", "1.5"], ["sparsity must be in [0, 1)"]),
        (["train", "--batch-size", "0"], ["batch_size must be a positive int"]),
        (["train", "--task", "custom"], ["task 'custom' needs train_file"]),
        (["train", "--task", "nope"], ["nope"]),
        (["train", "--config", "/nonexistent/run.yaml"], ["config file not found"]),
        (["train", "--resume", "--overwrite"], ["resume and overwrite exclude each other"]),
        (["eval", "--adapter", "/nonexistent/adapter"], ["train_config.json"]),
    ],
)
def test_bad_options_give_one_clear_line(argv, needles, tmp_path, capsys):
    argv = argv + ["--output-dir", str(tmp_path / "out")] if argv[0] == "train" else argv
    run_error(argv, capsys, *needles)


def test_bad_config_files(tmp_path, capsys):
    (tmp_path / "unknown.json").write_text('{"kind": "houlsby", "learning_rate": 0.1}')
    run_error(["train", "--config", str(tmp_path / "unknown.json")], capsys, "unknown options ['learning_rate']")
    (tmp_path / "broken.yaml").write_text("kind: [houlsby\n")
    run_error(["train", "--config", str(tmp_path / "broken.yaml")], capsys, "not valid YAML")
    (tmp_path / "list.json").write_text("[1, 2]")
    run_error(["train", "--config", str(tmp_path / "list.json")], capsys, "expected a mapping")
    (tmp_path / "type.json").write_text('{"resume": "yes"}')
    run_error(["train", "--config", str(tmp_path / "type.json")], capsys, "resume must be true or false")


def test_argparse_rejects_bad_flags(capsys):
    for argv in (["train", "--kind", "dense"], ["train", "--lr", "fast"], ["train", "--no-such-flag"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        assert "error:" in capsys.readouterr().err


def test_help_lists_sections(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for needle in ("data:", "adapter and pruning:", "optimization:", "run:", "--large-sparse", "--resume"):
        assert needle in text


def test_bad_data_and_run_folders(tiny_model, sentiment_files, tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("text,label\ngood movie,1\n,0\n")
    files = dict(sentiment_files, train=str(bad))
    run_error(train_args(tiny_model, files, tmp_path / "a", "--max-steps", "1"), capsys, "bad.csv:3", "empty text")

    files = dict(sentiment_files, train=str(tmp_path / "missing.csv"))
    run_error(train_args(tiny_model, files, tmp_path / "b", "--max-steps", "1"), capsys, "missing.csv")

    out_dir = tmp_path / "c"
    run_error(train_args(tiny_model, sentiment_files, out_dir, "--max-steps", "2", "--resume"), capsys, "no checkpoint")
    run_ok(train_args(tiny_model, sentiment_files, out_dir, "--max-steps", "2", "--sparsity", "0"), capsys)
    run_error(
        train_args(tiny_model, sentiment_files, out_dir, "--max-steps", "2", "--sparsity", "0"),
        capsys,
        "already holds a run",
        "--resume",
    )
    run_error(
        train_args(
            tiny_model, sentiment_files, out_dir, "--max-steps", "2", "--sparsity", "0", "--lr", "1", "--resume"
        ),
        capsys,
        "lr: 0.01 -> 1.0",
    )
    run_ok(
        train_args(tiny_model, sentiment_files, out_dir, "--max-steps", "2", "--sparsity", "0", "--overwrite"), capsys
    )


def test_diverging_training_stops_with_a_message(tiny_model, sentiment_files, tmp_path, capsys):
    code = main(
        train_args(
            tiny_model,
            sentiment_files,
            tmp_path / "nan",
            "--max-steps",
            "30",
            "--lr",
            "1e30",
            "--max-grad-norm",
            "0",
            "--sparsity",
            "0",
        )
    )
    err = capsys.readouterr().err
    assert code == 1 and "training loss is" in err, err


@pytest.mark.parametrize("pruner", ["grasp", "snip"])
def test_gradient_pruners_through_sdpa_attention(pruner, tiny_model, sentiment_files, capsys):  # noqa: F811
    """GraSP differentiates twice through attention; the fused SDPA kernels cannot, so scoring must not
    use them (BERT in transformers 5 attends through SDPA by default)."""
    stdout = run_ok(
        [
            "prune",
            "--model",
            tiny_model,
            "--task",
            "custom",
            "--train-file",
            sentiment_files["train"],
            "--kind",
            "houlsby",
            "--bottleneck",
            "8",
            "--sparsity",
            "0.6",
            "--pruner",
            pruner,
            "--calibration-batches",
            "2",
            "--no-progress",
        ],
        capsys,
    )
    assert "total" in stdout


class _Payload:
    def __reduce__(self):
        return (open, (os.environ["SPARSEADAPTER_TEST_MARKER"], "w"))


@pytest.mark.parametrize("damage", ["pickle", "truncated"])
def test_resume_refuses_a_bad_checkpoint_state(
    damage,
    tiny_model,
    sentiment_files,
    tmp_path,
    capsys,  # noqa: F811
    monkeypatch,
):
    """The checkpoint state is read with weights_only: a pickle that would run code is refused, unrun."""
    marker = tmp_path / "code-ran"
    monkeypatch.setenv("SPARSEADAPTER_TEST_MARKER", str(marker))
    out_dir = tmp_path / "run"
    args = train_args(tiny_model, sentiment_files, out_dir, "--max-steps", "4", "--sparsity", "0")
    run_ok(args, capsys)
    state = out_dir / "checkpoint" / "trainer_state.pt"
    if damage == "pickle":
        torch.save({"step": 1, "rng": _Payload()}, state)
    else:
        state.write_bytes(state.read_bytes()[:100])
    run_error(args + ["--resume"], capsys, "cannot read checkpoint state", "trainer_state.pt")
    assert not marker.exists()


# -- kills around checkpoints -------------------------------------------------------------------------
RESUMABLE = (
    "--kind",
    "houlsby",
    "--bottleneck",
    "8",
    "--sparsity",
    "0.6",
    "--pruner",
    "snip",
    "--max-steps",
    "12",
    "--eval-every",
    "4",
    "--checkpoint-every",
    "4",
    "--adapter-dropout",
    "0.1",
)


def _interrupt_checkpoint_at(monkeypatch, step):
    """Ctrl-C while the checkpoint of `step` is written: its adapter is on disk (checkpoint.tmp), its
    state is not. The evaluation of that step is already in metrics.jsonl."""
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if str(f).endswith(os.path.join("checkpoint.tmp", "trainer_state.pt")) and obj.get("step") == step:
            raise KeyboardInterrupt
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)


def _periodic(run_dir):
    """The periodic records of metrics.jsonl without their wall-clock timing (step_s)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "step_s"} for r in records if not r.get("final")]


def _assert_same_run(a, b):
    ta, tb = adapter_tensors(a / "adapter"), adapter_tensors(b / "adapter")
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert _periodic(a) == _periodic(b), "metrics.jsonl: each evaluation once, as in a run that never stopped"
    finals = [line for line in (b / "metrics.jsonl").read_text().splitlines() if '"final"' in line]
    assert len(finals) == 2, finals  # validation and test, once


@pytest.fixture(scope="module")
def straight_run(tiny_model, sentiment_files, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("straight") / "run"
    assert main(train_args(tiny_model, sentiment_files, out, *RESUMABLE)) == 0
    return out


def test_kill_during_the_first_checkpoint_resumes_by_starting_over(
    straight_run, tiny_model, sentiment_files, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "run"
    _interrupt_checkpoint_at(monkeypatch, 4)
    assert main(train_args(tiny_model, sentiment_files, out, *RESUMABLE)) == 130
    monkeypatch.undo()
    assert (out / "config.json").is_file() and not (out / "checkpoint").exists()
    stdout = run_ok(train_args(tiny_model, sentiment_files, out, *RESUMABLE, "--resume"), capsys)
    assert "stopped before its first checkpoint; starting it over" in stdout
    _assert_same_run(straight_run, out)


def test_resume_does_not_log_a_replayed_evaluation_twice(
    straight_run, tiny_model, sentiment_files, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "run"
    _interrupt_checkpoint_at(monkeypatch, 8)  # the evaluation of step 8 is logged, its checkpoint is not
    assert main(train_args(tiny_model, sentiment_files, out, *RESUMABLE)) == 130
    monkeypatch.undo()
    assert [r["step"] for r in _periodic(out)] == [4, 8]
    run_ok(train_args(tiny_model, sentiment_files, out, *RESUMABLE, "--resume"), capsys)
    assert [r["step"] for r in _periodic(out)] == [4, 8, 12]
    _assert_same_run(straight_run, out)


def test_resume_falls_back_to_the_previous_checkpoint(
    straight_run, tiny_model, sentiment_files, tmp_path, capsys, monkeypatch
):
    """A swap interrupted after the new checkpoint went in leaves `checkpoint.old`; if `checkpoint` is
    then unreadable, the resume takes `checkpoint.old` and says so."""
    import shutil

    out = tmp_path / "run"
    _interrupt_checkpoint_at(monkeypatch, 8)
    assert main(train_args(tiny_model, sentiment_files, out, *RESUMABLE)) == 130
    monkeypatch.undo()
    shutil.copytree(out / "checkpoint", out / "checkpoint.old")  # step 4
    state = out / "checkpoint" / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:200])
    stdout = run_ok(train_args(tiny_model, sentiment_files, out, *RESUMABLE, "--resume"), capsys)
    assert (
        "warning: cannot read checkpoint state" in stdout
        and "resuming from the previous checkpoint, checkpoint.old" in stdout
    )
    _assert_same_run(straight_run, out)


@pytest.mark.parametrize(
    "field,value,needle",
    [
        ("step", -5, "step is -5, expected an int >= 0"),
        ("step", "7", "step is '7', expected an int >= 0"),
        ("step", 7.0, "step is 7.0"),
        ("step", 10**6, "the checkpoint is at step 1000000, past this run's 4 steps"),
        ("rng", [{"cpu": "seed"}], "rng is"),
        ("best", {"step": "4"}, "best is"),
        ("loss_count", -1, "loss_count is -1"),
        ("optimizer", None, "optimizer is None"),
    ],
)
def test_resume_refuses_a_checkpoint_state_of_the_wrong_types(
    field, value, needle, tiny_model, sentiment_files, tmp_path, capsys
):
    out_dir = tmp_path / "run"
    args = train_args(tiny_model, sentiment_files, out_dir, "--max-steps", "4", "--sparsity", "0")
    run_ok(args, capsys)
    path = out_dir / "checkpoint" / "trainer_state.pt"
    state = torch.load(path, weights_only=True)
    state[field] = value
    torch.save(state, path)
    run_error(args + ["--resume"], capsys, needle)


# -- bad input: one line and exit status 2, never a traceback ---------------------------------------------------
def test_a_far_off_class_id_is_refused(tiny_model, sentiment_files, tmp_path, capsys):
    rows = sentiment_rows(8, seed=7)
    rows[3]["label"] = 1000000000000
    files = dict(sentiment_files, train=write_csv(tmp_path / "t.csv", rows))
    run_error(
        train_args(tiny_model, files, tmp_path / "run", "--max-steps", "1"),
        capsys,
        "t.csv:5",
        "makes 1,000,000,000,001 classes",
    )


def _deep_json(depth):
    return "[" * depth + "]" * depth


@pytest.mark.parametrize(
    "row, needle",
    [
        ('{"text": "a", "label": 1, "x": ' + _deep_json(100_000) + "}", "nested too deeply"),
        ('{"text": "a \\ud800 b", "label": 1}', "lone UTF-16 surrogate"),
        ('{"text": "fine", "text_pair": "\\udfff", "label": 1}', "'text_pair' holds"),
    ],
)
def test_bad_json_lines_rows(row, needle, tiny_model, sentiment_files, tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "good movie", "label": 0}\n' + row + "\n")
    files = dict(sentiment_files, validation=str(path))
    run_error(train_args(tiny_model, files, tmp_path / "run", "--max-steps", "1"), capsys, "bad.jsonl:2", needle)


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_a_deeply_nested_config_file(suffix, tmp_path, capsys):
    path = tmp_path / f"deep{suffix}"
    path.write_text('{"kind": ' + _deep_json(100_000) + "}")
    run_error(["train", "--config", str(path), "--output-dir", str(tmp_path / "out")], capsys, "nested too deeply")


def test_max_length_beyond_the_model(tiny_model, sentiment_files, tmp_path, capsys):
    run_error(
        train_args(tiny_model, sentiment_files, tmp_path / "run", "--max-steps", "1", "--max-length", "100000"),
        capsys,
        "max_length 100000 is more than the model's 64 positions",
    )
