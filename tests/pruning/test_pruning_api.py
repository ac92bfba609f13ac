"""`prune`: finds adapter weights, keeps exactly k, converts to SparseLinear, records provenance."""

import pytest
import torch
from torch import nn

import sparseadapter as sa
from sparseadapter.pruning import PRUNABLE_ATTR, compute_prune_masks, prune


class TinyAdapter(nn.Module):
    sparseadapter_chain = ("down", "up")

    def __init__(self, d, r):
        super().__init__()
        self.down, self.up = nn.Linear(d, r), nn.Linear(r, d)
        for layer in (self.down, self.up):
            setattr(layer, PRUNABLE_ATTR, True)

    def forward(self, h):
        return h + self.up(torch.relu(self.down(h)))


class TinyNet(nn.Module):
    """A frozen base (embed), one adapter, a task head."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Linear(8, 16)
        self.adapter = TinyAdapter(16, 6)
        self.head = nn.Linear(16, 3)
        self.embed.requires_grad_(False)

    def forward(self, x):
        return self.head(self.adapter(torch.tanh(self.embed(x))))


def _batches(n=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(5, 8, generator=gen), torch.randint(0, 3, (5,), generator=gen)) for _ in range(n)]


def _loss(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


ADAPTER_WEIGHTS = 16 * 6 + 6 * 16


@pytest.mark.parametrize("method", ["random", "magnitude", "snip", "grasp", "synflow"])
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_prune_converts_adapter_weights_with_exact_k(method, scope):
    model = TinyNet()
    embed_before, head_before = model.embed.weight.clone(), model.head.weight.clone()
    prune(model, method, sparsity=0.6, scope=scope, data=_batches(), loss_fn=_loss, seed=3, rounds=5)
    down, up = model.adapter.down, model.adapter.up
    assert isinstance(down, sa.SparseLinear) and isinstance(up, sa.SparseLinear)
    assert isinstance(model.head, nn.Linear) and isinstance(model.embed, nn.Linear)
    assert torch.equal(model.embed.weight, embed_before) and torch.equal(model.head.weight, head_before)
    if scope == "global":
        assert down.nnz + up.nnz == round(0.4 * ADAPTER_WEIGHTS)
    else:
        assert down.nnz == up.nnz == round(0.4 * 96)
    record = model.sparseadapter_pruning
    assert record.method == method and record.sparsity == 0.6 and record.scope == scope and record.seed == 3
    assert up.sparseadapter_pruning == record
    x = torch.randn(7, 8)
    _loss(model, (x, torch.zeros(7, dtype=torch.long))).backward()
    assert down.values.grad is not None and model.embed.weight.grad is None


def test_masks_match_the_converted_pattern_and_are_deterministic():
    masks = compute_prune_masks(TinyNet(), "snip", 0.7, data=_batches(), loss_fn=_loss, seed=1)
    again = compute_prune_masks(TinyNet(), "snip", 0.7, data=_batches(), loss_fn=_loss, seed=1)
    assert masks.keys() == {"adapter.down", "adapter.up"}
    for name in masks:
        assert torch.equal(masks[name], again[name])
    model = prune(TinyNet(), "snip", 0.7, data=_batches(), loss_fn=_loss, seed=1)
    assert torch.equal(model.adapter.down.to_dense() != 0, masks["adapter.down"])


def test_sparsity_zero_keeps_everything_and_the_function():
    model = TinyNet()
    x = torch.randn(3, 8)
    before = model(x)
    prune(model, "magnitude", 0.0)
    assert model.adapter.down.sparsity == 0.0
    torch.testing.assert_close(model(x), before)


def test_data_methods_need_data():
    with pytest.raises(ValueError, match="'snip' scores weights with gradients and needs calibration data"):
        prune(TinyNet(), "snip", 0.5)


def test_default_loss_reads_dict_batches():
    class DictNet(TinyNet):
        def forward(self, x, labels):
            return {"loss": nn.functional.cross_entropy(super().forward(x), labels)}

    batches = [{"x": x, "labels": y} for x, y in _batches()]
    prune(DictNet(), "grasp", 0.5, data=batches)
    with pytest.raises(ValueError, match="pass loss_fn"):
        prune(TinyNet(), "snip", 0.5, data=_batches())


def test_zero_initialized_matrix_is_reinitialized_or_rejected():
    model = TinyNet()
    nn.init.zeros_(model.adapter.up.weight)  # LoRA-style zero init
    with pytest.raises(ValueError, match="'adapter.up' is all zeros"):
        prune(model, "snip", 0.5, data=_batches(), loss_fn=_loss, zero_init="raise")
    with pytest.warns(UserWarning, match="re-initializing 1 all-zero matrices"):
        prune(model, "snip", 0.5, data=_batches(), loss_fn=_loss)
    assert model.adapter.up.nnz > 0 and model.adapter.down.nnz > 0
    assert not model.adapter.up.values.any(), "the values were for scoring: the kept weights start at zero"


def test_targets_by_name_and_predicate():
    model = prune(TinyNet(), "magnitude", 0.5, targets=["head"])
    assert isinstance(model.head, sa.SparseLinear) and isinstance(model.adapter.down, nn.Linear)
    model = prune(TinyNet(), "magnitude", 0.5, targets=lambda name, m: name.startswith("adapter.d"))
    assert isinstance(model.adapter.down, sa.SparseLinear) and isinstance(model.adapter.up, nn.Linear)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"targets": ["nope"]}, "no module named 'nope'"),
        ({"targets": ["adapter"]}, "is a TinyAdapter, not an nn.Linear"),
        ({"method": "obd"}, "method must be one of"),
        ({"sparsity": 1.0}, "must be in \\[0, 1\\)"),
    ],
)
def test_bad_arguments(kwargs, message):
    args = {"method": "magnitude", "sparsity": 0.5, **kwargs}
    with pytest.raises(ValueError, match=message):
        prune(TinyNet(), args.pop("method"), args.pop("sparsity"), **args)


def test_pruning_happens_once_and_needs_adapters():
    model = prune(TinyNet(), "magnitude", 0.5)
    with pytest.raises(ValueError, match="no adapter weights marked prunable"):
        prune(model, "magnitude", 0.5)
    with pytest.raises(ValueError, match="already sparse"):
        prune(model, "magnitude", 0.5, targets=["adapter.down"])


def test_training_mode_restored_and_calibration_recorded():
    model = TinyNet().train()
    prune(model, "snip", 0.5, data=_batches(4), loss_fn=_loss)
    assert model.training
    a = model.sparseadapter_pruning
    b = prune(TinyNet(), "snip", 0.5, data=_batches(4, seed=1), loss_fn=_loss).sparseadapter_pruning
    assert a.calibration_examples == b.calibration_examples == 20
    assert a.calibration_sha256 != b.calibration_sha256
    assert prune(TinyNet(), "random", 0.5).sparseadapter_pruning.calibration_examples == 0


def test_pruned_model_scripts():
    model = prune(TinyNet(), "random", 0.5).eval()
    x = torch.randn(2, 8)
    torch.testing.assert_close(torch.jit.script(model)(x), model(x))
