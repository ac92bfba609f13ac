"""Adapter folders and a base model exported with empty adapter tables (`export --runtime-adapters`),
shared by the Python and C++ tests of runtime-loaded adapters; and the reference: the same folders
loaded in Python (load_adapters), one row per adapter."""

import torch
import transformers

from sparseadapter.adapters import SparseAdapterConfig, add_adapter, save_adapter, set_active_adapters
from sparseadapter.serving import MultiAdapterServingModel, export_model, load_adapters, prepare_for_inference
from sparseadapter.serving import serving_metadata as metadata_of
from sparseadapter.serving.adapter_tables import TableServingModel, install_tables

LABELS = ["a", "b", "c"]
# name: (kind, sparsity): the LoRA ones load into the tables; the Houlsby one is of another kind
ADAPTERS = {"alpha": ("lora", 0.6), "beta": ("lora", 0.9), "gamma": ("lora", 0.75), "houlsby": ("houlsby", 0.6)}


def classifier(tiny_model):
    return transformers.AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=len(LABELS))


def save_adapters(tiny_model, root):
    """Each adapter of ADAPTERS, with random weights and head: the LoRA ones in root/adapters/<name>
    (returned), the Houlsby one in root/houlsby."""
    for seed, (name, (kind, sparsity)) in enumerate(ADAPTERS.items()):
        config = SparseAdapterConfig(kind=kind, bottleneck=8, sparsity=sparsity, pruner="random", seed=seed)
        save_random_adapter(
            classifier(tiny_model), name, config, seed, root / "adapters" / name if kind == "lora" else root / name
        )
    return root / "adapters"


def save_random_adapter(model, name, config, seed, folder):
    """Add adapter `name` (`config`) to `model`, give it and the classifier head random weights (seeded
    by `seed`), and save it with its head in `folder`."""
    torch.manual_seed(seed)
    add_adapter(model, name, config)
    g = torch.Generator().manual_seed(seed + 10)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "sparseadapter" in pname or pname.startswith("classifier"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    set_active_adapters(model, [name])
    save_adapter(model, str(folder), name)


def export_base(tiny_model, path, kinds=("lora",)):
    """The base model with empty tables for adapters of `kinds` (one template each, default sites);
    returns its metadata."""
    torch.manual_seed(0)
    model = classifier(tiny_model)
    for kind in kinds:
        config = SparseAdapterConfig(kind=kind, bottleneck=8, sparsity=0.5, pruner="random")
        add_adapter(model, f"template-{kind}", config)
    model, _ = prepare_for_inference(model, path="sparse", merge_lora=False, inplace=True)
    meta = metadata_of(model, labels=LABELS)
    meta["adapter_tables"] = install_tables(model, [f"template-{kind}" for kind in kinds])
    export_model(model, str(path), meta=meta, serving=TableServingModel(model))
    return meta


def reference(tiny_model, folders):
    """The Python model serving `folders` (in that order): forward(ids, mask, types, adapter_index)."""
    torch.manual_seed(0)
    model = classifier(tiny_model)
    names = load_adapters(model, [str(f) for f in folders])
    model, _ = prepare_for_inference(model, path="sparse", merge_lora=False, inplace=True)
    return MultiAdapterServingModel(model, names).eval()


def nnz_bytes(folder, tables):
    """What adapter `folder` should take in a model's `tables` site tables: per site, the values (4
    bytes) and column indices (8) of both matrices, their row pointers (8 each) and biases (4 each,
    zeros for LoRA), the head's weight and bias (4 each), and in every table one 8-byte entry (where
    the table holds it, or that it does not)."""
    from safetensors.torch import load_file

    from sparseadapter.adapters.io import weights_path

    tensors = load_file(weights_path(str(folder)))
    total = 0
    for key, t in tensors.items():
        if key.endswith(".values"):
            rows = tensors[key.replace(".values", ".crow_indices")].numel() - 1
            total += t.numel() * (4 + 8) + (rows + 1) * 8 + rows * 4
        elif key.startswith("head."):
            total += t.numel() * 4
    return total + 8 * tables


def module_at(model, path):
    for part in path.split("."):
        model = getattr(model, part)
    return model


def add_from_folder(model, meta, folder, alpha=32.0, rank=8):
    """What sparseadapter_serve's loader does for one LoRA folder, through the tables' TorchScript
    methods (its checks left to it): the LoRA layout's tables take it, the others skip it."""
    import json

    from safetensors.torch import load_file

    from sparseadapter.adapters.io import CONFIG_FILE, weights_path

    tensors = load_file(weights_path(str(folder)))
    saved = json.loads((folder / CONFIG_FILE).read_text())["name"]  # the file's tensors are named after it
    tables = meta["adapter_tables"]
    layout = next(layout for layout in tables["layouts"] if layout["kind"] == "lora")
    for i, t in enumerate(tables["tables"]):
        if i not in layout["tables"]:
            module_at(model, t["module"]).skip_adapter()
            continue
        prefix = f"{t['host']}.sparseadapter.adapters.{saved}"
        layers = [
            [tensors[f"{prefix}.{layer}.{k}"] for k in ("values", "crow_indices", "col_indices")] + [torch.empty(0)]
            for layer in (layout["down"], layout["up"])
        ]
        module_at(model, t["module"]).add_adapter(layers[0], layers[1], "identity", alpha / rank)
    head = tables["head"]
    module_at(model, head["module"]).add_adapter(
        tensors[f"head.{head['name']}.weight"], tensors[f"head.{head['name']}.bias"]
    )
