"""Several adapters in one exported model: `sparseadapter export --adapter a --adapter b` writes one
TorchScript module whose forward takes an adapter index per row; each row's logits equal those of its
adapter exported alone (its own sites and its own task head), whatever the mix of the batch."""

import json
import shutil
import zipfile

import pytest
import torch
from hf_support import one_thread  # noqa: F401
from training_support import sentiment_files, tiny_model, train_args  # noqa: F401

from sparseadapter.cli import main
from sparseadapter.serving import example_inputs

transformers = pytest.importorskip("transformers")


def _metadata(path):
    with zipfile.ZipFile(path) as z:
        return json.loads(z.read(next(n for n in z.namelist() if n.endswith("sparseadapter.json"))))


@pytest.fixture(scope="module")
def two_adapters(tiny_model, sentiment_files, tmp_path_factory):
    """Two trained adapters of different kinds (LoRA on attention, Houlsby after attention and FFN),
    in folders named alpha and beta."""
    root = tmp_path_factory.mktemp("multi")
    folders = []
    for name, kind, seed in (("alpha", "lora", "1"), ("beta", "houlsby", "2")):
        run = root / f"run-{name}"
        assert (
            main(
                train_args(
                    tiny_model,
                    sentiment_files,
                    run,
                    "--epochs",
                    "1",
                    "--kind",
                    kind,
                    "--sparsity",
                    "0.7",
                    "--pruner",
                    "random",
                    "--seed",
                    seed,
                )
            )
            == 0
        )
        shutil.copytree(run / "best", root / name)
        folders.append(root / name)
    return folders


def test_one_module_answers_each_row_with_its_adapter(two_adapters, tmp_path, capsys):
    alpha, beta = two_adapters
    both = tmp_path / "both.pt"
    assert main(["export", "--adapter", str(alpha), "--adapter", str(beta), "--output", str(both)]) == 0
    assert "adapters alpha, beta" in capsys.readouterr().out
    meta = _metadata(both)
    assert meta["adapters"] == ["alpha", "beta"] and meta["labels"] == ["0", "1"]
    alone = {}
    for k, folder in enumerate(two_adapters):
        path = tmp_path / f"{k}.pt"
        assert (
            main(["export", "--adapter", str(folder), "--output", str(path), "--path", "sparse", "--no-merge-lora"])
            == 0
        )
        alone[k] = torch.jit.load(str(path))
    module = torch.jit.load(str(both))
    assert "sparseadapter::sparse_adapter_multi" in str(module.inlined_graph)
    for index in ([1, 0, 0, 1, 1], [0, 0, 0], [1], [0, 1, 1, 0, 1, 0, 0]):
        inputs = example_inputs(meta, len(index), 11, seed=len(index))
        with torch.inference_mode():
            got = module(*inputs, torch.tensor(index))
            want = {k: m(*inputs) for k, m in alone.items()}
        for row, k in enumerate(index):
            torch.testing.assert_close(got[row], want[k][row], rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="out of range"):  # the server maps names to indices before
        module(*example_inputs(meta, 2, 5), torch.tensor([0, 2]))


def test_export_format_takes_the_adapter_index_too(two_adapters, tmp_path):
    import sparseadapter  # noqa: F401  (the ops, for torch.export.load)

    alpha, beta = two_adapters
    out = tmp_path / "both.pt2"
    assert (
        main(["export", "--adapter", str(alpha), "--adapter", str(beta), "--output", str(out), "--format", "export"])
        == 0
    )
    ts = tmp_path / "both.pt"
    assert main(["export", "--adapter", str(alpha), "--adapter", str(beta), "--output", str(ts)]) == 0
    program = torch.export.load(str(out)).module()
    meta = _metadata(ts)
    inputs = example_inputs(meta, 4, 9, seed=3)
    index = torch.tensor([1, 0, 1, 1])
    with torch.inference_mode():
        torch.testing.assert_close(
            program(*inputs, index), torch.jit.load(str(ts))(*inputs, index), rtol=1e-5, atol=1e-5
        )


def test_several_adapters_are_checked(two_adapters, tmp_path, capsys):
    alpha, beta = two_adapters
    out = str(tmp_path / "m.pt")
    assert main(["export", "--adapter", str(alpha), "--adapter", str(beta), "--output", out, "--format", "aoti"]) == 2
    assert "--format aoti takes one --adapter" in capsys.readouterr().err
    assert main(["export", "--adapter", str(alpha), "--adapter", str(beta), "--output", out, "--path", "dense"]) == 2
    assert "--path dense" in capsys.readouterr().err
    twin = tmp_path / "x" / "alpha"
    shutil.copytree(alpha, twin)
    assert main(["export", "--adapter", str(alpha), "--adapter", str(twin), "--output", out]) == 2
    assert "several adapters are named 'alpha'" in capsys.readouterr().err


def test_runtime_adapters_export_holds_empty_tables(two_adapters, tmp_path, capsys):
    """`export --runtime-adapters`: the base model with empty tables at the adapter's sites (none of
    its weights); filled from the adapter's folder it answers as the adapter exported alone."""
    from runtime_adapters_support import add_from_folder

    from sparseadapter.adapters.io import CONFIG_FILE

    alpha, beta = two_adapters
    base = tmp_path / "base.pt"
    assert main(["export", "--adapter", str(alpha), "--runtime-adapters", "--output", str(base)]) == 0
    assert "empty tables for lora adapters" in capsys.readouterr().out
    meta = _metadata(base)
    tables = meta["adapter_tables"]
    assert [layout["kind"] for layout in tables["layouts"]] == ["lora"]
    assert tables["head"]["name"] == "classifier" and tables["tables"]
    module = torch.jit.load(str(base))
    assert not any("lora" in name for name, _ in module.named_parameters())
    tables_held = {name: t for name, t in module.named_buffers() if "serving_table" in name}
    assert all(t.tolist() == [-1] if name.endswith(".local") else t.numel() == 0 for name, t in tables_held.items())
    alone = tmp_path / "alpha.pt"
    assert main(["export", "--adapter", str(alpha), "--output", str(alone), "--path", "sparse", "--no-merge-lora"]) == 0
    config = json.loads((alpha / CONFIG_FILE).read_text())["config"]
    add_from_folder(module, meta, alpha, config["lora_alpha"], config["bottleneck"] * config["large_sparse"])
    inputs = example_inputs(meta, 3, 10, seed=4)
    with torch.inference_mode():
        got = module(*inputs, torch.zeros(3, dtype=torch.long))
        want = torch.jit.load(str(alone))(*inputs)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    out = str(tmp_path / "x.pt")
    assert main(["export", "--adapter", str(alpha), "--runtime-adapters", "--format", "export", "--output", out]) == 2
    assert "--format torchscript" in capsys.readouterr().err
    assert main(["export", "--adapter", str(beta), "--runtime-adapters", "--output", out]) == 0  # houlsby: fine
    assert [layout["kind"] for layout in _metadata(out)["adapter_tables"]["layouts"]] == ["houlsby"]
    # both folders as templates: tables for LoRA and Houlsby adapters, no weights of either
    assert main(["export", "--adapter", str(alpha), "--adapter", str(beta), "--runtime-adapters", "--output", out]) == 0
    assert "empty tables for lora and houlsby adapters" in capsys.readouterr().out
    both = _metadata(out)["adapter_tables"]
    assert [layout["kind"] for layout in both["layouts"]] == ["lora", "houlsby"] and "adapters" not in _metadata(out)
    sites = [set(layout["tables"]) for layout in both["layouts"]]
    assert sites[0] | sites[1] == set(range(len(both["tables"])))
    assert all(t.numel() == 0 for name, t in torch.jit.load(out).named_buffers() if "values" in name)
