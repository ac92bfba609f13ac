"""Tiny random language models (llama, gpt2, t5) with a word-level tokenizer and a chat template, and
source/target tables, for fast end-to-end runs of generation training, `eval` and `generate` (no
download: everything is built here)."""

import json
import random

import pytest

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]
MARKUP = ["<user>", "<bot>", "summarize", ":", "Answer:"]
WORDS = [
    "red",
    "green",
    "blue",
    "cat",
    "dog",
    "bird",
    "runs",
    "sleeps",
    "eats",
    "big",
    "small",
    "old",
    "new",
    "house",
    "tree",
    "river",
    "the",
    "a",
    "and",
    "then",
    "today",
    "now",
    "slowly",
    "fast",
]
VOCAB = SPECIAL + MARKUP + WORDS
PAD, BOS, EOS = 0, 1, 2
# One user turn, then the assistant's: what a chat template renders, in words of VOCAB.
CHAT_TEMPLATE = (
    "{% for m in messages %}<user> {{ m['content'] }} </s> {% endfor %}{% if add_generation_prompt %}<bot> {% endif %}"
)


def tiny_tokenizer(chat: bool = True):
    """A word-level tokenizer over VOCAB (whitespace split; decoding joins words with spaces)."""
    model = tokenizers.models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>")
    tok = tokenizers.Tokenizer(model)
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok.decoder = tokenizers.decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    if chat:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_config(family: str):
    # A large initializer range: with the usual 0.02, a 32-wide random model's frozen output layer can
    # only make near-uniform distributions, and no adapter could teach it anything.
    common = dict(vocab_size=len(VOCAB), bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    if family != "t5":
        common["initializer_range"] = 0.5
    if family == "llama":
        return transformers.LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            **common,
        )
    if family == "gpt2":
        return transformers.GPT2Config(
            n_embd=32, n_layer=2, n_head=4, n_positions=128, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common
        )
    if family == "t5":
        return transformers.T5Config(
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            dropout_rate=0.0,
            decoder_start_token_id=PAD,
            initializer_factor=5.0,
            **common,
        )
    raise ValueError(family)


def write_tiny_lm(path, family: str = "llama", chat: bool = True, seed: int = 0) -> str:
    """A 2-layer random LM of `family` and the tiny tokenizer (with a chat template if `chat`), saved."""
    import torch

    torch.manual_seed(seed)
    config = tiny_config(family)
    cls = transformers.AutoModelForSeq2SeqLM if family == "t5" else transformers.AutoModelForCausalLM
    model = cls.from_config(config)
    model.generation_config.pad_token_id = PAD
    model.generation_config.eos_token_id = EOS
    model.save_pretrained(path)
    tiny_tokenizer(chat=chat and family != "t5").save_pretrained(path)
    return str(path)


def copy_rows(count: int, seed: int, with_target: bool = True):
    """Sources of 6-9 words; the target is their first three words (a task a tiny model can learn)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        words = [rng.choice(WORDS) for _ in range(rng.randint(6, 9))]
        row = {"source": " ".join(words)}
        if with_target:
            row["target"] = " ".join(words[:3])
        rows.append(row)
    return rows


def write_rows(path, rows) -> str:
    if str(path).endswith(".jsonl"):
        with open(path, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    else:
        import csv

        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return str(path)


@pytest.fixture(scope="session")
def copy_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("copy-task")
    return {
        "train": write_rows(root / "train.csv", copy_rows(48, seed=1)),
        "validation": write_rows(root / "validation.jsonl", copy_rows(12, seed=2)),
        "test": write_rows(root / "test.csv", copy_rows(12, seed=3)),
    }


@pytest.fixture(scope="session")
def tiny_lms(tmp_path_factory):
    """family -> saved model folder."""
    root = tmp_path_factory.mktemp("tiny-lms")
    return {family: write_tiny_lm(root / family, family) for family in ("llama", "gpt2", "t5")}


def gen_train_args(model, files, out, *extra):
    """`sparseadapter train` flags for a short generation run on a tiny model and the copy task."""
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
        "--eval-batch-size",
        "8",
        "--max-length",
        "16",
        "--max-target-length",
        "8",
        "--max-new-tokens",
        "6",
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
        "--calibration-batches",
        "1",
        *extra,
    ]
