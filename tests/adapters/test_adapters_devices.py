"""Adapters on a plain PyTorch model (no transformers), on every device: the generic target_modules
path, sparse forward and backward against the dense masked reference, and the same step on each
device giving the same result."""

import pytest
import torch
from conftest import DEVICES
from torch import nn

import sparseadapter as sa
from sparseadapter import SparseLinear


class TinyEncoder(nn.Module):
    """Two residual MLP blocks; adapters go after `blocks.N.out` (sequential) or around it (parallel)."""

    def __init__(self, d=48, hidden=96, classes=3):
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"inp": nn.Linear(d, hidden), "out": nn.Linear(hidden, d)}) for _ in range(2)
        )
        self.classifier = nn.Linear(d, classes)

    def forward(self, x, labels=None):
        for block in self.blocks:
            x = x + block["out"](torch.relu(block["inp"](x)))
        logits = self.classifier(x.mean(1))
        loss = nn.functional.cross_entropy(logits.float(), labels) if labels is not None else None
        return {"loss": loss, "logits": logits}


def _model_and_batch(device, dtype, kind):
    torch.manual_seed(0)
    model = TinyEncoder().to(device, dtype)
    where = dict(lora_targets=[r"blocks\.\d+\.inp$"]) if kind == "lora" else dict(target_modules=[r"blocks\.\d+\.out$"])
    cfg = sa.SparseAdapterConfig(kind=kind, bottleneck=16, sparsity=0.7, pruner="random", init="bert", **where)
    sa.add_adapter(model, "a", cfg)
    gen = torch.Generator().manual_seed(1)
    batch = {
        "x": torch.randn(4, 9, 48, generator=gen).to(device, dtype),
        "labels": torch.randint(0, 3, (4,), generator=gen).to(device),
    }
    return model, batch


def _dense_twin(model):
    """The same network with every SparseLinear replaced by an nn.Linear holding its dense weight."""
    import copy

    twin = copy.deepcopy(model)
    for name, module in list(twin.named_modules()):
        if isinstance(module, SparseLinear):
            dense = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            dense = dense.to(module.values.device, module.values.dtype)
            with torch.no_grad():
                dense.weight.copy_(module.to_dense())
                if module.bias is not None:
                    dense.bias.copy_(module.bias)
            parent, _, child = name.rpartition(".")
            setattr(twin.get_submodule(parent), child, dense)
    return twin


@pytest.mark.parametrize("kind", ["houlsby", "parallel", "lora"])
def test_sparse_adapter_matches_its_dense_twin(device, kind):
    model, batch = _model_and_batch(device, torch.float64 if device == "cpu" else torch.float32, kind)
    twin = _dense_twin(model)
    out, ref = model(**batch), twin(**batch)
    torch.testing.assert_close(out["logits"], ref["logits"], rtol=1e-5, atol=1e-6)
    out["loss"].backward()
    ref["loss"].backward()
    sparse_layers = [m for m in model.modules() if isinstance(m, SparseLinear)]
    dense_layers = [
        m for m in twin.modules() if isinstance(m, nn.Linear) and m.weight.requires_grad and m.weight.shape != (3, 48)
    ]  # every trainable dense Linear but the head
    assert len(sparse_layers) == len(dense_layers) > 0
    for sparse, dense in zip(sparse_layers, dense_layers):
        mask = sparse.to_dense() != 0
        grad = sparse.values.grad
        torch.testing.assert_close(grad, dense.weight.grad[mask.nonzero(as_tuple=True)], rtol=1e-5, atol=1e-6)


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs the CUDA kernels and a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_adapter_step_matches_cpu(dtype):
    results = {}
    for device in ("cpu", "cuda"):
        model, batch = _model_and_batch(device, torch.float32, "houlsby")
        model.to(dtype)
        batch["x"] = batch["x"].to(dtype)
        out = model(**batch)
        out["loss"].backward()
        grads = [m.values.grad.float().cpu() for m in model.modules() if isinstance(m, SparseLinear)]
        results[device] = (out["logits"].float().cpu(), grads)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(results["cuda"][0], results["cpu"][0], **tol)
    for g_cuda, g_cpu in zip(results["cuda"][1], results["cpu"][1]):
        torch.testing.assert_close(g_cuda, g_cpu, **tol)
