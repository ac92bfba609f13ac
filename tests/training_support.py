"""A tiny random BERT with a word-level vocabulary, and small data tables, for fast end-to-end runs of
`sparseadapter train` / `eval` / `prune` (no download, no real data: everything is written here)."""

import csv
import json
import random

import pytest

transformers = pytest.importorskip("transformers")

POSITIVE = ["good", "great", "fun", "superb"]
NEGATIVE = ["bad", "awful", "boring", "dull"]
FILLER = ["the", "a", "movie", "film", "plot", "acting", "was", "is", "very", "quite", "and", "story"]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + POSITIVE + NEGATIVE + FILLER


def write_tiny_model(path, dropout: float = 0.1, initializer_range: float = 0.5) -> str:
    """A 2-layer BERT (hidden 32) with a tokenizer over VOCAB, saved with save_pretrained. The large
    initializer range keeps random sentence representations apart, so the tiny model can learn. (It
    also saturates the frozen tanh pooler; tests that must learn a task in a few dozen steps through
    it take a smaller range.)"""
    import torch

    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=len(VOCAB),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        initializer_range=initializer_range,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    tokenizer = transformers.BertTokenizerFast(vocab={w: i for i, w in enumerate(VOCAB)}, do_lower_case=True)
    transformers.BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def sentiment_rows(count: int, seed: int, pairs: bool = False):
    """Sentences whose label is whether they hold a positive word (learnable by a tiny model)."""
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        label = i % 2
        words = rng.sample(FILLER, 5) + [rng.choice(POSITIVE if label else NEGATIVE)]
        rng.shuffle(words)
        row = {"text": " ".join(words), "label": label}
        if pairs:
            row["text_pair"] = " ".join(rng.sample(FILLER, 3))
        rows.append(row)
    return rows


def write_csv(path, rows) -> str:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


def write_jsonl(path, rows) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def sentiment_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("sentiment")
    return {
        "train": write_csv(root / "train.csv", sentiment_rows(96, seed=1)),
        "validation": write_csv(root / "validation.csv", sentiment_rows(32, seed=2)),
        "test": write_jsonl(root / "test.jsonl", sentiment_rows(40, seed=3)),
    }


def train_args(tiny_model, files, out, *extra):
    """`sparseadapter train` flags for a short run on the tiny model and the sentiment tables."""
    return [
        "train",
        "--model",
        tiny_model,
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
        *extra,
    ]


def checkpoint_step(run_dir) -> int:
    """The step of the run's checkpoint, or -1 while there is none (it may be mid-swap: retry later)."""
    import torch

    try:
        return int(torch.load(f"{run_dir}/checkpoint/trainer_state.pt", weights_only=True)["step"])
    except Exception:
        return -1


def _descendants(pid: int):
    """Every live process below `pid` (read from /proc; Linux)."""
    import os

    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def kill_when_checkpointed(cmd, run_dir, after_step: int, env=None, timeout: float = 240.0) -> int:
    """Start `cmd`, SIGKILL it and every process below it once the run's checkpoint has reached
    `after_step`, and return the step of the checkpoint left behind (no process got a chance to clean up)."""
    import os
    import signal
    import subprocess
    import time

    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while checkpoint_step(run_dir) < after_step:
            if proc.poll() is not None:
                raise AssertionError(
                    f"the run ended (code {proc.returncode}) before step {after_step}: "
                    + proc.stderr.read().decode()[-2000:]
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"no checkpoint at step {after_step} after {timeout} s")
            time.sleep(0.01)
    finally:
        for pid in [proc.pid, *_descendants(proc.pid)]:  # torchrun's workers run in sessions of their own
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()
        proc.stderr.close()
    return checkpoint_step(run_dir)
