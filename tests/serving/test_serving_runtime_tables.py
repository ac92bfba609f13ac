"""The adapter tables of `export --runtime-adapters` (serving/adapter_tables.py), driven from Python
through their TorchScript methods as sparseadapter_serve drives them: filled from saved adapter folders,
the exported module answers each row as the Python model with those adapters loaded; removing an
adapter leaves the others' answers as they were; a matrix of the wrong size is refused before the
table changes (the server checks each pattern's structure itself: test_serving_cpp_runtime.py)."""

import pytest
import torch
from hf_support import one_thread  # noqa: F401
from runtime_adapters_support import add_from_folder, export_base, module_at, reference, save_adapters
from safetensors.torch import load_file
from training_support import tiny_model  # noqa: F401

from sparseadapter.adapters.io import weights_path

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def setup(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("runtime-tables")
    folders = save_adapters(tiny_model, root)
    meta = export_base(tiny_model, root / "base.pt")
    return folders, root / "base.pt", meta


def inputs(meta, seed=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, meta["vocab_size"], (4, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    return ids, mask, torch.zeros_like(ids)


def test_tables_filled_from_folders_answer_like_python(setup, tiny_model):
    folders, path, meta = setup
    model = torch.jit.load(str(path))
    for name in ("alpha", "beta", "gamma"):
        add_from_folder(model, meta, folders / name)
    want_model = reference(tiny_model, [folders / n for n in ("alpha", "beta", "gamma")])
    index = torch.tensor([2, 0, 1, 0])
    with torch.inference_mode():
        got = model(*inputs(meta), index)
        want = want_model(*inputs(meta), index)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # without beta: alpha and gamma answer as before, at their new positions
    for m in [t["module"] for t in meta["adapter_tables"]["tables"]] + [meta["adapter_tables"]["head"]["module"]]:
        module_at(model, m).remove_adapter(1)
    with torch.inference_mode():
        after = model(*inputs(meta), torch.tensor([1, 0, 1, 0]))
    torch.testing.assert_close(after[[0, 1, 3]], want[[0, 1, 3]], rtol=1e-4, atol=1e-5)


def test_a_matrix_of_the_wrong_size_is_refused_before_the_table_changes(setup):
    folders, path, meta = setup
    model = torch.jit.load(str(path))
    table_info = meta["adapter_tables"]["tables"][0]
    table = module_at(model, table_info["module"])
    tensors = load_file(weights_path(str(folders / "alpha")))
    prefix = f"{table_info['host']}.sparseadapter.adapters.alpha"
    down = [tensors[f"{prefix}.lora_A.{k}"] for k in ("values", "crow_indices", "col_indices")] + [torch.empty(0)]
    up = [tensors[f"{prefix}.lora_B.{k}"] for k in ("values", "crow_indices", "col_indices")] + [torch.empty(0)]
    before = table.held_bytes()
    with pytest.raises(Exception, match="the adapter.s matrices are"):  # the up matrix one row short
        table.add_adapter(down, [up[0], up[1][:-1], up[2], up[3]], "identity", 1.0)
    with pytest.raises(Exception, match="bias has shape"):
        table.add_adapter(down, [up[0], up[1], up[2], torch.zeros(3)], "identity", 1.0)
    assert table.held_bytes() == before and len(table.scales) == 0


def _random_csr(rows, cols, density, g):
    mask = torch.rand(rows, cols, generator=g) < density
    dense = torch.randn(rows, cols, generator=g) * mask
    crow = torch.cat([torch.zeros(1, dtype=torch.long), mask.sum(1).cumsum(0)])
    return dense, [dense[mask], crow, mask.nonzero()[:, 1], torch.randn(rows, generator=g)]


def test_a_table_maps_loaded_adapters_to_its_own():
    """Loaded adapters that a site does not hold (another kind's) are skipped there: their rows get
    the base, the held ones keep their answers whatever is removed before or between them."""
    from sparseadapter.serving.adapter_tables import SiteTable

    g = torch.Generator().manual_seed(0)
    table = torch.jit.script(SiteTable(6, 5, torch.float32))
    dense = {}
    for name in ("A", "skip", "B"):
        if name == "skip":
            assert table.skip_adapter() == 8
            continue
        d, down = _random_csr(3, 6, 0.6, g)
        u, up = _random_csr(5, 3, 0.6, g)
        table.add_adapter(down, up, "relu", 0.5)
        dense[name] = (d, down[3], u, up[3])
    x, base = torch.randn(4, 6, generator=g), torch.randn(4, 5, generator=g)

    def want(row, name):
        d, bd, u, bu = dense[name]
        return base[row] + 0.5 * (torch.relu(x[row] @ d.T + bd) @ u.T + bu)

    got = table(x, torch.tensor([2, 1, 0, -1]), base)
    torch.testing.assert_close(got, torch.stack([want(0, "B"), base[1], want(2, "A"), base[3]]))
    table.remove_adapter(1)  # the skipped one: B moves to 1
    got = table(x, torch.tensor([1, 0, -1, 1]), base)
    torch.testing.assert_close(got, torch.stack([want(0, "B"), want(1, "A"), base[2], want(3, "B")]))
    table.remove_adapter(0)  # A: B moves to 0, in the arrays too
    got = table(x, torch.tensor([0, -1, 0, 0]), base)
    torch.testing.assert_close(got, torch.stack([want(0, "B"), base[1], want(2, "B"), want(3, "B")]))
    assert table.local.tolist() == [-1, 0] and len(table.scales) == 1
    with pytest.raises(Exception, match="no loaded adapter 1"):
        table.remove_adapter(1)


def test_templates_of_one_layout_are_refused(tiny_model):
    from runtime_adapters_support import classifier

    from sparseadapter.adapters import SparseAdapterConfig, add_adapter
    from sparseadapter.serving import prepare_for_inference
    from sparseadapter.serving.adapter_tables import install_tables

    model = classifier(tiny_model)
    for name in ("one", "two"):
        add_adapter(model, name, SparseAdapterConfig(kind="lora", bottleneck=4, sparsity=0.5, pruner="random"))
    model, _ = prepare_for_inference(model, path="sparse", merge_lora=False, inplace=True)
    with pytest.raises(ValueError, match="'one' and 'two' are both lora adapters on the same sites"):
        install_tables(model, ["one", "two"])
    with pytest.raises(ValueError, match="non-empty list"):
        install_tables(model, "one")
