"""The SQuAD-format fixture (tests/fixtures/squad-mini-v2.json: 3 articles, 22 questions, 7 of them
unanswerable, one context of about 300 words that needs many windows) and a tiny BERT whose word-level
vocabulary covers it, for fast offline runs of `sparseadapter train --task squad` / `eval` / `predict`."""

import json
from pathlib import Path

import pytest
from repo_paths import FIXTURES

transformers = pytest.importorskip("transformers")

FIXTURE = FIXTURES / "squad-mini-v2.json"
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def fixture_data() -> dict:
    return json.loads(FIXTURE.read_text(encoding="utf-8"))


def fixture_words(data: dict):
    """Every word of the fixture's contexts and questions as BERT's basic tokenizer splits them."""
    from tokenizers.normalizers import BertNormalizer
    from tokenizers.pre_tokenizers import BertPreTokenizer

    normalizer, pre = BertNormalizer(lowercase=True), BertPreTokenizer()

    def split(text):
        return [w for w, _ in pre.pre_tokenize_str(normalizer.normalize_str(text))]

    words = set()
    for article in data["data"]:
        for paragraph in article["paragraphs"]:
            words.update(split(paragraph["context"]))
            for qa in paragraph["qas"]:
                words.update(split(qa["question"]))
    return sorted(words)


def write_qa_model(path, dropout: float = 0.0, max_positions: int = 128) -> str:
    """A 2-layer BERT (hidden 32) with a word-level tokenizer over the fixture's words."""
    import torch

    vocab = SPECIALS + fixture_words(fixture_data())
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=max_positions,
        initializer_range=0.2,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    tokenizer = transformers.BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)
    transformers.BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def write_squad(path, data: dict) -> str:
    Path(path).write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return str(path)


def split_fixture(data: dict, titles):
    """(the articles named in `titles`, the others) as two SQuAD objects."""
    inside = [a for a in data["data"] if a["title"] in titles]
    outside = [a for a in data["data"] if a["title"] not in titles]
    return dict(data, data=inside), dict(data, data=outside)


@pytest.fixture(scope="session")
def qa_model(tmp_path_factory):
    return write_qa_model(tmp_path_factory.mktemp("qa-bert"))
