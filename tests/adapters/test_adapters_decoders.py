"""Every adapter kind on every built-in generative family, as a language model: tiny random models of
llama, qwen2, mistral, gemma, phi3 (decoder-only, grouped-query attention), gpt2 (Conv1D), bart and t5
(encoder-decoder). Each cell adds the adapter at 80% sparsity, trains it three steps, generates with
the KV cache, and checks that a cached incremental forward gives the logits of an uncached full one
(the check prefix tuning must pass: its prefixes live outside the cache). Then prefix tuning against
an independent reference (the prefixes fed as a pre-filled cache), sdpa against eager, fusion,
merging a fused projection, and saving and loading."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
from hf_support import needs_attention_interface, one_thread  # noqa: E402,F401

import sparseadapter as sa  # noqa: E402
from sparseadapter.adapters import placement  # noqa: E402
from sparseadapter.adapters import prefix as prefix_attention  # noqa: E402
from sparseadapter.adapters.slot import AdapterSlot  # noqa: E402
from sparseadapter.sparse_linear import SparseLinear  # noqa: E402

VOCAB = 128
SPARSITY = 0.8
KINDS = ("houlsby", "pfeiffer", "parallel", "lora", "prefix", "mam")
DECODERS = ("llama", "qwen2", "mistral", "gemma", "phi3", "gpt2")
SEQ2SEQ = ("bart", "t5")
FAMILIES = DECODERS + SEQ2SEQ
LLAMA_LIKE = ("llama", "qwen2", "mistral", "gemma", "phi3")

# Four query heads over fewer key/value heads (grouped-query attention), no dropout (the loss of one
# batch must fall), token ids 0..2 special. Mistral attends through a sliding window shorter than the
# sequences below, so its masks and its cache take the sliding path.
_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=64,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(num_key_value_heads=2, **_COMMON),
    "qwen2": lambda: transformers.Qwen2Config(num_key_value_heads=2, **_COMMON),
    "mistral": lambda: transformers.MistralConfig(num_key_value_heads=1, head_dim=8, sliding_window=4, **_COMMON),
    "gemma": lambda: transformers.GemmaConfig(num_key_value_heads=1, head_dim=8, **_COMMON),
    "phi3": lambda: transformers.Phi3Config(num_key_value_heads=2, resid_pdrop=0.0, embd_pdrop=0.0, **_COMMON),
    "gpt2": lambda: transformers.GPT2Config(
        n_embd=32,
        n_layer=2,
        n_head=4,
        vocab_size=VOCAB,
        n_positions=64,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    ),
    "bart": lambda: transformers.BartConfig(
        vocab_size=VOCAB,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=64,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=2,
    ),
    "t5": lambda: transformers.T5Config(
        vocab_size=VOCAB,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        dropout_rate=0.0,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    ),
}


def make(family: str, attn: str = "sdpa", seed: int = 0):
    torch.manual_seed(seed)
    config = CONFIGS[family]()
    if family in SEQ2SEQ:
        model = transformers.AutoModelForSeq2SeqLM.from_config(config, attn_implementation=attn)
    else:
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn)
    assert model.config.model_type == family and model.config._attn_implementation == attn
    return model.eval()


def adapter_config(kind: str, **kw):
    """Small and sparse: bottleneck 8, LoRA rank 4, prefixes of 4 through a 16-wide MLP."""
    if kind in ("prefix", "mam"):
        kw.update(prefix_length=4, prefix_mid_dim=16)
    if kind != "prefix":
        kw.update(bottleneck=4 if kind == "lora" else 8, sparsity=SPARSITY, pruner="random")
    return sa.SparseAdapterConfig(kind=kind, **kw)


def batch(family: str, seed: int = 1):
    """A language-modelling batch; row 0 padded (left for decoders, right for the source of seq2seq)."""
    gen = torch.Generator().manual_seed(seed)
    if family in SEQ2SEQ:
        src = torch.randint(3, VOCAB, (2, 9), generator=gen)
        mask = torch.ones_like(src)
        src[0, 6:], mask[0, 6:] = CONFIGS[family]().pad_token_id, 0
        return dict(input_ids=src, attention_mask=mask, labels=torch.randint(3, VOCAB, (2, 6), generator=gen))
    ids = torch.randint(3, VOCAB, (2, 10), generator=gen)
    mask = torch.ones_like(ids)
    ids[0, :3], mask[0, :3] = 0, 0
    labels = ids.masked_fill(mask == 0, -100)
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


def slot_hosts(model):
    return {name.rpartition(".")[0]: m for name, m in model.named_modules() if isinstance(m, AdapterSlot)}


def expected_hosts(family: str, kind: str):
    """Each kind's hosts in a two-layer decoder-only model, spelled out by hand, with their slot mode."""
    if family == "gpt2":
        layers = [f"transformer.h.{i}" for i in range(2)]
        parts = dict(attn_out="attn.c_proj", ffn_out="mlp.c_proj", ffn="mlp", lora=("attn.c_attn",), attn="attn")
    else:
        layers = [f"model.layers.{i}" for i in range(2)]
        lora = ("self_attn.qkv_proj",) if family == "phi3" else ("self_attn.q_proj", "self_attn.v_proj")
        parts = dict(attn_out="self_attn.o_proj", ffn_out="mlp.down_proj", ffn="mlp", lora=lora, attn="self_attn")
    per_layer = dict(
        houlsby=[(parts["attn_out"], "after"), (parts["ffn_out"], "after")],
        pfeiffer=[(parts["ffn_out"], "after")],
        parallel=[(parts["ffn"], "parallel")],
        lora=[(p, "lora") for p in parts["lora"]],
        prefix=[(parts["attn"], "prefix")],
        mam=[(parts["attn"], "prefix"), (parts["ffn"], "parallel")],
    )[kind]
    return {f"{layer}.{module}": mode for layer in layers for module, mode in per_layer}


def is_adapter_param(name: str, adapter: str = "a") -> bool:
    return f".sparseadapter.adapters.{adapter}." in name or name.startswith(f"sparseadapter_prefix.{adapter}.")


def train(model, data, steps: int = 3, lr: float = 1e-2):
    """`steps` AdamW steps on one batch; the losses before each step and after the last, and the
    parameters that received a nonzero gradient at some step."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    losses, moved = [], set()
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        loss = model(**data).loss
        loss.backward()
        losses.append(loss.item())
        moved |= {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        assert all(torch.isfinite(p.grad).all() for p in params if p.grad is not None)
        optimizer.step()
    model.eval()
    with torch.no_grad():
        losses.append(model(**data).loss.item())
    return losses, moved


def incremental_logits(model, data, cuts):
    """Logits of the (decoder) sequence fed in chunks `cuts` through the KV cache: a prompt, then
    several tokens at once (a non-square causal mask over the cache), then one at a time."""
    cache, chunks = None, []
    with torch.no_grad():
        if model.config.is_encoder_decoder:
            encoded = model.get_encoder()(input_ids=data["input_ids"], attention_mask=data["attention_mask"])
            dec = data["decoder_input_ids"]
            full = model(
                encoder_outputs=encoded, attention_mask=data["attention_mask"], decoder_input_ids=dec, use_cache=False
            ).logits
            for a, b in zip(cuts, cuts[1:]):
                out = model(
                    encoder_outputs=encoded,
                    attention_mask=data["attention_mask"],
                    decoder_input_ids=dec[:, a:b],
                    cache=cache,
                    use_cache=True,
                )
                cache = out.cache
                chunks.append(out.logits)
        else:
            ids, mask = data["input_ids"], data["attention_mask"]
            full = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            for a, b in zip(cuts, cuts[1:]):
                out = model(input_ids=ids[:, a:b], attention_mask=mask[:, :b], cache=cache, use_cache=True)
                cache = out.cache
                chunks.append(out.logits)
    return full, torch.cat(chunks, dim=1)


def check_cache_consistency(model, family):
    """Cached incremental forward == uncached full forward, at every position that is not padding; with
    a padded batch (the model builds masks) and an unpadded one (sdpa may go without a mask)."""
    for padded in (True, False):
        data = batch(family, seed=7)
        if not padded:
            data = {k: v[1:] for k, v in data.items()}
        if family in SEQ2SEQ:
            data["decoder_input_ids"] = data.pop("labels")
            keep = torch.ones(data["decoder_input_ids"].shape, dtype=torch.bool)
        else:
            keep = data["attention_mask"].bool()
        length = keep.shape[1]
        full, incremental = incremental_logits(model, data, [0, length - 5, length - 3, length - 2, length - 1, length])
        torch.testing.assert_close(incremental[keep], full[keep], rtol=0, atol=2e-5)


def generate(model, family, **kw):
    data = batch(family, seed=5)
    with torch.no_grad():
        return model.generate(
            input_ids=data["input_ids"],
            attention_mask=data["attention_mask"],
            max_new_tokens=4,
            min_new_tokens=4,
            do_sample=False,
            **kw,
        )


# -- the matrix: every family x every kind ------------------------------------------------------------
@pytest.mark.parametrize(
    "kind", [pytest.param(k, marks=needs_attention_interface) if k in ("prefix", "mam") else k for k in KINDS]
)
@pytest.mark.parametrize("family", FAMILIES)
def test_family_kind_trains_and_generates(family, kind):
    model = make(family)
    data = batch(family)
    with torch.no_grad():
        base_logits = model(**data).logits
    sa.add_adapter(model, "a", adapter_config(kind))
    if family in DECODERS:
        assert {h: s.mode for h, s in slot_hosts(model).items()} == expected_hosts(family, kind)
    if kind in ("prefix", "mam"):
        assert model.config._attn_implementation == prefix_attention.PREFIX + "sdpa"
        generator = model.sparseadapter_prefix["a"]
        if family in LLAMA_LIKE:  # the prefixes take the key/value heads, fewer than the query heads
            cfg = model.config
            assert cfg.num_key_value_heads < cfg.num_attention_heads
            assert generator.kv_dim == cfg.num_key_value_heads * model.model.layers[0].self_attn.head_dim
        # seq2seq: encoder self-, decoder self- and cross-attention of both layers
        assert generator.num_layers == (6 if family in SEQ2SEQ else 2)

    adapter = {n for n, _ in model.named_parameters() if is_adapter_param(n)}
    assert adapter and {n for n, p in model.named_parameters() if p.requires_grad} == adapter
    sparse = [m for m in model.modules() if isinstance(m, SparseLinear)]
    if kind != "prefix":
        nnz, dense = sum(m.nnz for m in sparse), sum(m.in_features * m.out_features for m in sparse)
        assert sparse and abs(nnz - (1 - SPARSITY) * dense) <= 1, f"{nnz} of {dense} weights kept"
    else:
        assert not sparse

    losses, moved = train(model, data)
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert losses[-1] < losses[0], f"the loss does not fall: {losses}"
    assert moved == adapter, f"no gradient reached {sorted(adapter - moved)}"
    if kind != "prefix":
        assert any(n.endswith(".values") for n in moved)  # the sparse values themselves train

    with torch.no_grad():
        trained = model(**data).logits
    assert (trained - base_logits).abs().max() > 1e-4, "the adapter does not change the output"

    check_cache_consistency(model, family)
    cached, uncached = generate(model, family), generate(model, family, use_cache=False)
    assert torch.equal(cached, uncached)
    prompt = batch(family, seed=5)["input_ids"]
    if family in SEQ2SEQ:  # the decoder's start token, then 4 new ones
        assert cached.shape == (2, 5)
    else:
        assert cached.shape == (2, prompt.shape[1] + 4) and torch.equal(cached[:, : prompt.shape[1]], prompt)

    sa.set_active_adapters(model, [])  # off: the base model exactly
    with torch.no_grad():
        torch.testing.assert_close(model(**data).logits, base_logits, rtol=0, atol=1e-6)


# -- prefix tuning against references ------------------------------------------------------------------
def _prefix_as_cache(model, ids):
    """The reference: the prefixes as the first `l` entries of a DynamicCache, the tokens at positions
    0.. given explicitly (so that the rotary or learned positions stay those of the base model), the
    adapter off. The causal mask over `cache + tokens` then shows every token all of the prefix."""
    generator = model.sparseadapter_prefix["a"]
    heads = model.config.num_key_value_heads if hasattr(model.config, "num_key_value_heads") else model.config.n_head
    cache = transformers.DynamicCache(config=model.config)
    for layer in range(generator.num_layers):
        k, v = generator.layer_prefix(layer).reshape(2, generator.length, heads, -1).permute(0, 2, 1, 3)
        cache.update(k.expand(ids.shape[0], -1, -1, -1), v.expand(ids.shape[0], -1, -1, -1), layer)
    sa.set_active_adapters(model, [])
    try:
        positions = torch.arange(ids.shape[1]).expand(ids.shape[0], -1)
        return model(input_ids=ids, position_ids=positions, cache=cache, use_cache=True).logits
    finally:
        sa.set_active_adapters(model, ["a"])


@needs_attention_interface
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_prefix_equals_prefilled_cache(family, attn):
    """Prepending prefixes inside attention is what prefix tuning's usual implementation does with a
    pre-filled cache (here with rotary positions and grouped-query attention for llama)."""
    model = make(family, attn)
    sa.add_adapter(model, "a", adapter_config("prefix"))
    ids = batch(family)["input_ids"][1:]  # an unpadded row
    with torch.no_grad():
        ours = model(input_ids=ids).logits
        reference = _prefix_as_cache(model, ids)
        sa.set_active_adapters(model, [])
        off = model(input_ids=ids).logits
    torch.testing.assert_close(ours, reference, rtol=0, atol=2e-5)
    assert (ours - off).abs().max() > 1e-3, "the prefix does not act"


@needs_attention_interface
@pytest.mark.parametrize("family", ["llama", "mistral", "phi3", "gpt2", "bart", "t5"])
def test_prefix_sdpa_matches_eager(family):
    """The two attention implementations agree with prefixes, padding and the cache: eager repeats the
    key/value heads and adds a float mask, sdpa takes a boolean one (or none)."""
    outputs = {}
    for attn in ("sdpa", "eager"):
        model = make(family, attn)
        sa.add_adapter(model, "a", adapter_config("mam"))
        data = batch(family)
        with torch.no_grad():
            outputs[attn] = model(**data).logits
        check_cache_consistency(model, family)
    torch.testing.assert_close(outputs["sdpa"], outputs["eager"], rtol=0, atol=2e-5)


@needs_attention_interface
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_prefix_padded_row_equals_unpadded(family):
    """Left padding: a padded row gives the logits and the continuation it gives alone. The prefixes
    have no position, so under rotary embeddings they meet each query at its absolute position: a
    padded batch needs positions counted from its first real token, which `generate` derives from
    the attention mask (and GPT-2's learned positions need anyway)."""
    model = make(family)
    sa.add_adapter(model, "a", adapter_config("prefix"))
    data = batch(family)
    ids, mask = data["input_ids"], data["attention_mask"]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        together = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        alone = model(input_ids=ids[:1, 3:]).logits
        together_generated = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=4, min_new_tokens=4, do_sample=False
        )
        alone_generated = model.generate(
            input_ids=ids[:1, 3:], attention_mask=mask[:1, 3:], max_new_tokens=4, min_new_tokens=4, do_sample=False
        )
    torch.testing.assert_close(together[:1, 3:], alone, rtol=0, atol=2e-5)
    assert torch.equal(together_generated[0, 3:], alone_generated[0])


@needs_attention_interface
def test_prefix_with_beam_search_and_static_cache():
    """A static cache hands attention keys longer than the tokens seen (masked); beam search multiplies
    the batch and reorders the cache. Both find what they find without a cache."""
    model = make("llama")
    sa.add_adapter(model, "a", adapter_config("mam"))
    assert torch.equal(
        generate(model, "llama", cache_implementation="static"), generate(model, "llama", use_cache=False)
    )
    assert torch.equal(generate(model, "llama", num_beams=3), generate(model, "llama", num_beams=3, use_cache=False))


# -- fusion, merging, saving ----------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_fusion_on_decoder(family):
    model = make(family)
    data = batch(family)
    sa.add_adapter(model, "a", adapter_config("pfeiffer", seed=1))
    sa.add_adapter(model, "b", adapter_config("houlsby", seed=2))
    fusion = sa.add_fusion(model, ["a", "b"])
    sa.train_fusion(model, fusion)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(f".fusions.{fusion}." in n for n in trainable)
    losses, moved = train(model, data)
    assert losses[-1] < losses[0] and moved == trainable
    check_cache_consistency(model, family)
    assert torch.equal(generate(model, family), generate(model, family, use_cache=False))


def test_lora_merge_on_fused_qkv():
    """Phi-3's LoRA adapts the fused qkv projection whole; merged, the model computes the same."""
    model = make("phi3")
    data = batch("phi3")
    sa.add_adapter(model, "a", adapter_config("lora", init="bert"))
    host = model.model.layers[0].self_attn.qkv_proj
    assert (host.sparseadapter.in_features, host.sparseadapter.out_features) == (32, host.out_features)
    with torch.no_grad():
        hooked = model(**data).logits
        sa.merge(model)
        merged = model(**data).logits
    torch.testing.assert_close(merged, hooked, rtol=0, atol=1e-5)


@needs_attention_interface
@pytest.mark.parametrize("family,kind", [("llama", "mam"), ("gpt2", "lora"), ("qwen2", "prefix")])
def test_save_and_load_on_decoder(family, kind, tmp_path):
    model = make(family)
    data = batch(family)
    sa.add_adapter(model, "a", adapter_config(kind))
    train(model, data, steps=1)
    with torch.no_grad():
        trained = model(**data).logits
    sa.save_adapter(model, str(tmp_path / "a"))
    fresh = make(family)
    sa.load_adapter(fresh, str(tmp_path / "a"))
    with torch.no_grad():
        torch.testing.assert_close(fresh(**data).logits, trained, rtol=0, atol=1e-6)


@needs_attention_interface
@pytest.mark.parametrize("family", SEQ2SEQ)
def test_encoder_only_prefix_file_still_loads(family, tmp_path, monkeypatch):
    """A prefix adapter saved when BART and T5 prefixes went into the encoder only loads with those sites."""
    encoder_only = dict(placement.FAMILIES[family], prefix=placement.FAMILIES[family]["prefix"][:1])
    with monkeypatch.context() as patch:
        patch.setitem(placement.FAMILIES, family, encoder_only)
        model = make(family)
        sa.add_adapter(model, "a", adapter_config("prefix"))
        data = batch(family)
        with torch.no_grad():
            saved = model(**data).logits
        sa.save_adapter(model, str(tmp_path / "a"))
    fresh = make(family)
    sa.load_adapter(fresh, str(tmp_path / "a"))
    assert all("encoder" in host for host, s in slot_hosts(fresh).items() if s.mode == "prefix")
    with torch.no_grad():
        torch.testing.assert_close(fresh(**data).logits, saved, rtol=0, atol=1e-6)
    # a new adapter on the same model goes everywhere
    sa.add_adapter(fresh, "b", adapter_config("prefix"), activate=False)
    assert fresh.sparseadapter_prefix["b"].num_layers == 6
