"""The command line as a user meets it: --version, help per command, a quick in-training evaluation
(--eval-max-examples) with the full one at the end, progress that logs cleanly, step times without
evaluation, and errors that say which --model folder or --data-dir is missing and what to pass."""

import json

import pytest
from hf_support import one_thread  # noqa: F401
from training_support import sentiment_files, tiny_model, train_args  # noqa: F401

import sparseadapter
from sparseadapter.cli import main
from sparseadapter.training import progress


def run_ok(argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    assert code == 0, out.err
    return out


def run_error(argv, capsys, *needles):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error:" in err, err
    for needle in needles:
        assert needle in err, err
    return err


def test_version(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"sparseadapter {sparseadapter.__version__}") and "torch" in out


def help_text(capsys, *argv):
    with pytest.raises(SystemExit):
        main([*argv, "--help"])
    return capsys.readouterr().out


def test_prune_help_lists_only_what_prune_uses(capsys):
    text = help_text(capsys, "prune")
    for flag in (
        "--pruner",
        "--sparsity",
        "--calibration-batches",
        "--model",
        "--train-file",
        "--target-modules",
        "--save",
    ):
        assert flag in text, flag
    for flag in (
        "--lr",
        "--epochs",
        "--output-dir",
        "--eval-every",
        "--resume",
        "--checkpoint-every",
        "--warmup-ratio",
        "--eval-max-examples",
        "--precision",
        "--compile",
    ):
        assert flag not in text, flag
    train = help_text(capsys, "train")
    assert "--lr" in train and "--eval-max-examples" in train


def test_quick_evaluation_in_training_and_the_full_one_at_the_end(tiny_model, sentiment_files, tmp_path, capsys):
    out_dir = tmp_path / "run"
    run_ok(
        train_args(
            tiny_model,
            sentiment_files,
            out_dir,
            "--kind",
            "pfeiffer",
            "--bottleneck",
            "4",
            "--sparsity",
            "0.5",
            "--pruner",
            "magnitude",
            "--max-steps",
            "8",
            "--eval-every",
            "4",
            "--eval-max-examples",
            "8",
        ),
        capsys,
    )
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    periodic = [r for r in records if not r.get("final")]
    assert [r["step"] for r in periodic] == [4, 8] and all(r["examples"] == 8 for r in periodic)
    results = json.loads((out_dir / "results.json").read_text())
    full = json.loads(
        run_ok(
            ["eval", "--adapter", str(out_dir / "adapter"), "--split", "validation", "--json", "--no-progress"], capsys
        ).out
    )
    assert full["examples"] == 32
    assert results["validation"]["accuracy"] == full["accuracy"]
    assert results["validation"]["loss"] == pytest.approx(full["loss"], rel=1e-5)


def test_progress_in_a_log_is_plain_lines(tiny_model, sentiment_files, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(progress, "PLAIN_INTERVAL_S", 0.0)  # a line at every update
    argv = [
        a
        for a in train_args(
            tiny_model,
            sentiment_files,
            tmp_path / "run",
            "--kind",
            "houlsby",
            "--bottleneck",
            "4",
            "--sparsity",
            "0.5",
            "--pruner",
            "snip",
            "--max-steps",
            "4",
            "--eval-every",
            "2",
        )
        if a != "--no-progress"
    ]
    err = run_ok(argv, capsys).err  # pytest's capture is not a terminal
    assert "\x1b" not in err and "\r" not in err, repr(err[:500])
    lines = err.splitlines()
    assert any(line.startswith("train: 4/4 steps") for line in lines), err
    assert any(line.startswith("eval validation: ") for line in lines), err
    assert any(line.startswith("scoring (snip): ") for line in lines), err


def test_the_step_rate_leaves_out_paused_time(monkeypatch):
    clock = iter([0.0, 1.0, 2.0, 102.0, 103.0, 103.0])  # start, 2 steps, 100 s of evaluation, 1 step, close
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
    lines = []
    bar = progress.PlainProgress(None, desc="train", total=3, unit="step", interval=1e9)
    bar.write = lines.append
    bar.update(1)
    bar.update(1)
    bar.unpause()  # at 102: evaluation ran from 2 to 102
    bar.update(1)
    bar.close()
    assert lines == ["train: 3/3 steps, 103.0 s, 1 s/step"], lines


def test_a_missing_model_folder_is_named(tiny_model, sentiment_files, tmp_path, capsys):
    missing = str(tmp_path / "models" / "not-there")
    run_error(
        train_args(missing, sentiment_files, tmp_path / "run"),
        capsys,
        f"--model {missing}: no such folder",
        "--model minilm",
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    run_error(train_args(str(empty), sentiment_files, tmp_path / "run2"), capsys, "no config.json")
    run_error(
        train_args("no-such-model-anywhere", sentiment_files, tmp_path / "run3"),
        capsys,
        "--model no-such-model-anywhere: not a local folder",
        "hub id",
    )


def test_a_missing_data_dir_is_named(tiny_model, tmp_path, capsys):
    missing = str(tmp_path / "glue" / "SST-2")
    run_error(
        [
            "train",
            "--model",
            tiny_model,
            "--task",
            "sst2",
            "--data-dir",
            missing,
            "--output-dir",
            str(tmp_path / "run"),
            "--no-progress",
        ],
        capsys,
        f"--data-dir {missing}: does not exist",
        "train.tsv",
    )
    run_error(
        ["prune", "--model", tiny_model, "--task", "sst2", "--data-dir", missing, "--no-progress"], capsys, "--data-dir"
    )
