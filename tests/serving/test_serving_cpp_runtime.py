"""sparseadapter_serve on a base model exported with empty adapter tables (`export --runtime-adapters`):
adapter folders saved in Python are loaded without Python (--adapters DIR, admin lines) and answer
each row as the Python model with those adapters loaded; loading and unloading while serving; bad
folders (checksum mismatch, truncated or inconsistent safetensors, a corrupted pattern, an edited
setting, another kind, other sites) get a clear error naming the file, and serving goes on; the
tables grow with each adapter's nnz."""

import hashlib
import json
import shutil
import subprocess

import pytest
import torch
from cmake_support import serve_lines
from hf_support import one_thread  # noqa: F401
from runtime_adapters_support import export_base, nnz_bytes, reference, save_adapters
from safetensors.torch import load_file, save_file
from training_support import tiny_model  # noqa: F401

from sparseadapter.adapters.io import CONFIG_FILE, config_digest, weights_path

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def setup(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("runtime-serve")
    folders = save_adapters(tiny_model, root)
    meta = export_base(tiny_model, root / "base.pt")
    return root, folders, root / "base.pt", meta


def sentences(meta, lengths=(5, 9, 3, 7, 6), seed=5):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, meta["vocab_size"], (n,), generator=gen).tolist() for n in lengths]


def python_logits(model, names, sentence, adapter):
    ids = torch.tensor([sentence])
    with torch.inference_mode():
        return model(ids, torch.ones_like(ids), torch.zeros_like(ids), torch.tensor([names.index(adapter)]))[0]


def test_folder_loaded_adapters_answer_like_python(cmake_build, setup, tiny_model):
    binary = cmake_build[1] / "sparseadapter_serve"
    _, folders, path, meta = setup
    names = ["alpha", "beta", "gamma"]
    want_model = reference(tiny_model, [folders / n for n in names])
    texts = sentences(meta)
    adapters = ["gamma", "alpha", "beta", "alpha", "gamma"]
    lines = [json.dumps({"id": i, "input_ids": s, "adapter": a}) for i, (s, a) in enumerate(zip(texts, adapters))]
    lines.insert(2, json.dumps({"id": "x", "input_ids": texts[0], "adapter": "delta"}))
    answers, stderr = serve_lines(binary, path, lines, "--adapters", str(folders), "--batch-size", "16")
    assert "loaded adapter alpha" in stderr and "loaded adapter gamma" in stderr
    assert [a.get("id") for a in answers] == [0, 1, "x", 2, 3, 4]
    by_id = {a["id"]: a for a in answers}
    assert by_id["x"]["error"] == 'unknown adapter "delta" (this model serves alpha, beta, gamma)'
    for i, (s, a) in enumerate(zip(texts, adapters)):
        want = python_logits(want_model, names, s, a)
        torch.testing.assert_close(torch.tensor(by_id[i]["logits"]), want, rtol=1e-4, atol=1e-5)
        assert by_id[i]["label_name"] == "abc"[int(want.argmax())]


def test_load_and_unload_while_serving(cmake_build, setup, tiny_model):
    binary = cmake_build[1] / "sparseadapter_serve"
    _, folders, path, meta = setup
    want_model = reference(tiny_model, [folders / "alpha", folders / "beta"])
    s = sentences(meta, (6, 4))

    def ask(i, adapter, sentence=0):
        return json.dumps({"id": i, "input_ids": s[sentence], "adapter": adapter})

    lines = [
        ask("none", "alpha"),
        json.dumps({"id": "L1", "admin": "load", "path": str(folders / "alpha")}),
        ask("a1", "alpha"),
        json.dumps({"admin": "load", "name": "beta", "path": str(folders / "beta")}),
        ask("b1", "beta", 1),
        ask("a2", "alpha", 1),
        json.dumps({"id": "list", "admin": "list"}),
        ask("a3", "alpha"),  # batched before the unload: answered by alpha
        json.dumps({"id": "U", "admin": "unload", "name": "alpha"}),
        "  ",  # a blank line first in a round: skipped
        ask("a4", "alpha"),
        ask("b2", "beta", 1),
        json.dumps({"id": "U2", "admin": "unload", "name": "alpha"}),
        json.dumps({"id": "L3", "admin": "load", "name": "beta", "path": str(folders / "beta")}),
    ]
    answers, _ = serve_lines(binary, path, lines, "--batch-size", "16")
    by_id = {a.get("id", a.get("name")): a for a in answers}
    assert len(answers) == len(lines) - 1
    assert by_id["none"]["error"] == 'unknown adapter "alpha" (no adapter is loaded)'
    assert by_id["L1"]["ok"] is True and by_id["L1"]["name"] == "alpha" and by_id["L1"]["adapters"] == ["alpha"]
    assert by_id["beta"]["adapters"] == ["alpha", "beta"]
    assert by_id["list"]["adapters"] == ["alpha", "beta"]
    assert by_id["U"]["adapters"] == ["beta"]
    assert by_id["a4"]["error"] == 'unknown adapter "alpha" (this model serves beta)'
    assert by_id["U2"]["error"] == 'no adapter named "alpha" is loaded'
    assert "is loaded already" in by_id["L3"]["error"]
    names = ["alpha", "beta"]
    for key, adapter, sentence in (("a1", "alpha", 0), ("b1", "beta", 1), ("a2", "alpha", 1), ("a3", "alpha", 0)):
        want = python_logits(want_model, names, s[sentence], adapter)
        torch.testing.assert_close(torch.tensor(by_id[key]["logits"]), want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.tensor(by_id["b2"]["logits"]), torch.tensor(by_id["b1"]["logits"]))


def test_tables_grow_with_nnz(cmake_build, setup):
    """What an adapter takes in the tables is its CSR arrays and head, to the byte: it follows nnz
    (beta, 90% sparse, takes less than alpha, 60%), and unloading gives it back."""
    binary = cmake_build[1] / "sparseadapter_serve"
    _, folders, path, meta = setup
    lines = [json.dumps({"admin": "list"})]
    lines += [json.dumps({"admin": "load", "path": str(folders / n)}) for n in ("alpha", "beta")]
    lines += [json.dumps({"admin": "unload", "name": "alpha"}), json.dumps({"admin": "unload", "name": "beta"})]
    answers, _ = serve_lines(binary, path, lines)
    empty, alpha, beta, no_alpha, none = answers
    tables = len(meta["adapter_tables"]["tables"])
    assert alpha["adapter_bytes"] == nnz_bytes(folders / "alpha", tables)
    assert beta["adapter_bytes"] == nnz_bytes(folders / "beta", tables)
    assert beta["adapter_bytes"] < 0.6 * alpha["adapter_bytes"]
    # dense float32 matrices (rank 8) would take more: 10% of the entries kept, at 12 bytes each, plus
    # the row pointers and biases (the head is dense either way; the tables' head is BERT's, hidden wide)
    dense = sum(4 * 8 * (t["in_features"] + t["out_features"]) for t in meta["adapter_tables"]["tables"])
    head = 4 * len(meta["labels"]) * (meta["adapter_tables"]["tables"][0]["in_features"] + 1)
    assert beta["adapter_bytes"] < dense + head
    assert alpha["bytes"] == empty["bytes"] + alpha["adapter_bytes"]
    assert beta["bytes"] == alpha["bytes"] + beta["adapter_bytes"]
    assert no_alpha["bytes"] == empty["bytes"] + beta["adapter_bytes"]
    assert none["bytes"] == empty["bytes"]


def _copy(folders, name, to):
    shutil.copytree(folders / name, to)
    return to


def _reseal(folder):
    """Recompute the folder's checksums, as a writer of a damaged but self-consistent folder would: the
    server's structural checks must then catch the damage."""
    config_path = folder / CONFIG_FILE
    meta = json.loads(config_path.read_text())
    meta["weights_sha256"] = hashlib.sha256((folder / meta["weights_file"]).read_bytes()).hexdigest()
    meta["config_sha256"] = config_digest(meta)
    config_path.write_text(json.dumps(meta))


def _rewrite_tensors(folder, change):
    """Overwrite the folder's tensor file (same name) with `change(tensors)`, checksums resealed."""
    weights = weights_path(str(folder))
    tensors = load_file(weights)
    change(tensors)
    save_file(tensors, weights)
    _reseal(folder)
    return weights


def test_bad_folders_get_clear_errors_and_serving_goes_on(cmake_build, setup, tmp_path):
    binary = cmake_build[1] / "sparseadapter_serve"
    root, folders, path, meta = setup
    bad = {}
    # a truncated tensor file: its checksum no longer matches
    folder = _copy(folders, "alpha", tmp_path / "checksum")
    weights = weights_path(str(folder))
    data = open(weights, "rb").read()
    open(weights, "wb").write(data[: len(data) // 2])
    bad["checksum"] = (folder, [weights, "does not match its config's checksum"])
    # the same, resealed: the safetensors reader finds it short
    folder = _copy(folders, "alpha", tmp_path / "truncated")
    weights = weights_path(str(folder))
    open(weights, "wb").write(data[: len(data) // 2])
    _reseal(folder)
    bad["truncated"] = (folder, [weights, "tensor ", "truncated"])
    # a header length past the end of the file
    folder = _copy(folders, "alpha", tmp_path / "header")
    weights = weights_path(str(folder))
    open(weights, "wb").write((10**9).to_bytes(8, "little") + data[8:])
    _reseal(folder)
    bad["header"] = (folder, [weights, "header length"])
    # a tensor's data_offsets that disagree with its shape
    folder = _copy(folders, "alpha", tmp_path / "offsets")
    weights = weights_path(str(folder))
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    name = next(k for k in header if k.endswith("lora_B.values"))
    header[name]["shape"] = [header[name]["shape"][0] + 1]
    text = json.dumps(header, separators=(",", ":")).encode()
    open(weights, "wb").write(len(text).to_bytes(8, "little") + text + data[8 + length :])
    _reseal(folder)
    bad["offsets"] = (folder, [weights, f"tensor {name}", "data_offsets"])
    # a column index out of range, in a well-formed file
    folder = _copy(folders, "alpha", tmp_path / "pattern")
    host = meta["adapter_tables"]["tables"][1]["host"]
    key = f"{host}.sparseadapter.adapters.alpha.lora_A.col_indices"

    def out_of_range(tensors):
        col = tensors[key].to(torch.int64)
        col[0] = meta["adapter_tables"]["tables"][1]["in_features"]
        tensors[key] = col

    weights = _rewrite_tensors(folder, out_of_range)
    bad["pattern"] = (folder, [weights, key.rsplit(".", 1)[0], "invalid sparse matrix"])
    # a tensor missing
    folder = _copy(folders, "alpha", tmp_path / "missing")
    weights = _rewrite_tensors(folder, lambda t: t.pop("head.classifier.bias"))
    bad["missing"] = (folder, [weights, "lacks tensor head.classifier.bias"])
    # another kind
    bad["kind"] = (root / "houlsby", ["a houlsby adapter; this model's tables take lora adapters"])
    # an edited setting
    folder = _copy(folders, "alpha", tmp_path / "edited")
    config = json.loads((folder / CONFIG_FILE).read_text())
    config["config"]["lora_alpha"] = 64.0
    (folder / CONFIG_FILE).write_text(json.dumps(config))
    bad["edited"] = (folder, [str(folder / CONFIG_FILE), "does not match its own checksum"])
    # sites of another model
    folder = _copy(folders, "alpha", tmp_path / "sites")
    config = json.loads((folder / CONFIG_FILE).read_text())
    config["sites"]["lora"][0]["in_features"] += 1
    (folder / CONFIG_FILE).write_text(json.dumps(config))
    _reseal(folder)
    bad["sites"] = (folder, [str(folder / CONFIG_FILE), "the adapter was saved for", "another model or architecture"])
    bad["absent"] = (tmp_path / "absent", ["adapter_config.json does not exist"])

    good = sentences(meta, (5,))[0]
    lines = [json.dumps({"admin": "load", "path": str(folders / "beta")})]
    for name, (folder, _) in bad.items():
        lines.append(json.dumps({"id": name, "admin": "load", "name": name, "path": str(folder)}))
        lines.append(json.dumps({"id": f"after {name}", "input_ids": good, "adapter": "beta"}))
    lines.append(json.dumps({"id": "list", "admin": "list"}))
    answers, _ = serve_lines(binary, path, lines)
    by_id = {a.get("id"): a for a in answers}
    first = answers[0]
    for name, (_, parts) in bad.items():
        assert set(by_id[name]) == {"id", "line", "error"}, by_id[name]
        for part in parts:
            assert str(part) in by_id[name]["error"], (name, by_id[name]["error"])
        assert by_id[f"after {name}"]["logits"] == by_id["after truncated"]["logits"]
    assert by_id["list"]["adapters"] == ["beta"] and by_id["list"]["bytes"] == first["bytes"]


def test_a_bad_folder_at_start_is_a_clear_failure(cmake_build, setup, tmp_path):
    binary = cmake_build[1] / "sparseadapter_serve"
    root, folders, path, _ = setup
    shutil.copytree(folders / "alpha", tmp_path / "alpha")
    shutil.copytree(root / "houlsby", tmp_path / "houlsby")
    (tmp_path / "notes.txt").write_text("plain files are skipped")
    _, stderr = serve_lines(binary, path, [], "--adapters", str(tmp_path), code=1)
    assert "--adapters: " in stderr and "a houlsby adapter" in stderr
    answers, _ = serve_lines(binary, path, [json.dumps({"admin": "nope"})])
    assert answers[0]["error"] == '"admin" must be "load", "unload" or "list"'


def test_a_model_without_tables_refuses_admin_lines(cmake_build, tmp_path):
    from test_serving_cpp import TinyClassifier, metadata, save

    binary = cmake_build[1] / "sparseadapter_serve"
    path = save(TinyClassifier(), tmp_path / "one.pt", metadata())
    answers, _ = serve_lines(binary, path, [json.dumps({"admin": "load", "path": str(tmp_path)})])
    assert "exported with --runtime-adapters" in answers[0]["error"]
    _, stderr = serve_lines(binary, path, [], "--adapters", str(tmp_path), code=1)
    assert "the model was not exported with --runtime-adapters" in stderr


def test_cmake_names_a_missing_nlohmann_json(tmp_path):
    """Configuring without nlohmann/json (here: a folder that lacks it) stops with what to install."""
    import cmake_support

    cmake, args = cmake_support._configure_args()
    proc = subprocess.run(
        [cmake, "-S", str(cmake_support.REPO), "-B", str(tmp_path / "build"), *args]
        + [f"-DNLOHMANN_JSON_INCLUDE_DIR={tmp_path / 'nowhere'}"],
        capture_output=True,
        text=True,
        timeout=cmake_support.CONFIGURE_TIMEOUT_S,
    )
    assert proc.returncode != 0
    message = " ".join(proc.stderr.split())
    assert "sparseadapter_serve needs nlohmann/json" in message and "pip install nlohmann-json" in message


def test_bottleneck_adapters_load_too(cmake_build, setup, tiny_model, tmp_path):
    """Tables for Houlsby adapters (biases, an activation, their own scale) answer like Python too."""
    binary = cmake_build[1] / "sparseadapter_serve"
    root, _, _, meta = setup
    path = tmp_path / "houlsby-base.pt"
    export_base(tiny_model, path, kinds=("houlsby",))
    want_model = reference(tiny_model, [root / "houlsby"])
    texts = sentences(meta, (7, 4))
    lines = [json.dumps({"admin": "load", "path": str(root / "houlsby")})]
    lines += [json.dumps({"id": i, "input_ids": s, "adapter": "houlsby"}) for i, s in enumerate(texts)]
    answers, _ = serve_lines(binary, path, lines)
    assert answers[0]["ok"] is True
    for i, s in enumerate(texts):
        want = python_logits(want_model, ["houlsby"], s, "houlsby")
        torch.testing.assert_close(torch.tensor(answers[1 + i]["logits"]), want, rtol=1e-4, atol=1e-5)


def test_adapters_of_two_kinds_share_one_base_model(cmake_build, setup, tiny_model, tmp_path):
    """A base model exported with a LoRA and a Houlsby template takes folders of both kinds: each
    loads into its kind's tables, a mixed batch answers every row as Python with all of them loaded,
    and unloading one kind's adapter leaves the others' answers as they were."""
    binary = cmake_build[1] / "sparseadapter_serve"
    root, folders, _, meta = setup
    path = tmp_path / "two-kinds.pt"
    both = export_base(tiny_model, path, kinds=("lora", "houlsby"))
    layouts = both["adapter_tables"]["layouts"]
    assert [layout["kind"] for layout in layouts] == ["lora", "houlsby"]
    assert not set(layouts[0]["tables"]) & set(layouts[1]["tables"])  # LoRA and Houlsby sites differ
    order = [folders / "alpha", root / "houlsby", folders / "beta"]
    names = ["alpha", "houlsby", "beta"]
    want_model = reference(tiny_model, order)
    texts = sentences(meta, (6, 8, 3, 9))
    asked = ["houlsby", "alpha", "beta", "houlsby"]
    lines = [json.dumps({"admin": "load", "path": str(f)}) for f in order]
    lines += [json.dumps({"id": i, "input_ids": s, "adapter": a}) for i, (s, a) in enumerate(zip(texts, asked))]
    lines += [json.dumps({"admin": "unload", "name": "houlsby"})]
    lines += [json.dumps({"id": f"after-{i}", "input_ids": texts[i], "adapter": asked[i]}) for i in (1, 2)]
    lines += [json.dumps({"id": "gone", "input_ids": texts[0], "adapter": "houlsby"})]
    answers, _ = serve_lines(binary, path, lines)
    assert [a["ok"] for a in answers[:3]] == [True] * 3
    by_id = {a["id"]: a for a in answers if "id" in a}
    for i, (s, a) in enumerate(zip(texts, asked)):
        want = python_logits(want_model, names, s, a)
        torch.testing.assert_close(torch.tensor(by_id[i]["logits"]), want, rtol=1e-4, atol=1e-5)
    for i in (1, 2):
        torch.testing.assert_close(torch.tensor(by_id[f"after-{i}"]["logits"]), torch.tensor(by_id[i]["logits"]))
    assert "houlsby" in by_id["gone"]["error"]
