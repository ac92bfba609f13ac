"""Autocast (mixed precision) of the sparse ops and of every adapter kind.

The ops of `sparseadapter_ext.autocast.LOWER_PRECISION_OPS` follow `aten::linear`'s rule: under
`torch.autocast`, floating inputs (not float64) are cast to the autocast dtype and the op runs in
it; index tensors, None and other device types are left alone; outside autocast nothing changes.
Checked per op against the same op called on inputs cast by hand (forward and gradients), then on
a tiny BERT with a sparse adapter of every kind, Hugging Face's Trainer(bf16=True) and
torch.compile(fullgraph=True)."""

import pytest
import torch
from conftest import INDEX_DTYPES, Pattern
from torch.utils._python_dispatch import TorchDispatchMode

import sparseadapter_ext as ops
from sparseadapter import SparseLinear
from sparseadapter.adapters import BottleneckAdapter
from sparseadapter_ext.autocast import LOWER_PRECISION_OPS

_ops = torch.ops.sparseadapter
AUTOCAST_DTYPES = [torch.bfloat16, torch.float16]  # CPU autocast takes float16 too (torch >= 2.4)


# -- the ops -----------------------------------------------------------------------------------------
def _projection(out_f, in_f, density, device, index_dtype, seed, bias=True):
    """A random sparse projection as the buffer tuple of sparse_adapter (fp32 values and bias):
    (values, bias, crow, col, crow_t, col_t, perm_t, row_order_t), plus its row order."""
    p = Pattern(out_f, in_f, density, device=device, index_dtype=index_dtype, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    b = torch.randn(out_f, generator=g).to(device) if bias else None
    args = p.linear_args(
        p.values64.float(), b
    )  # values, bias, crow, col, row_order, crow_t, col_t, perm_t, row_order_t
    return (args[0], args[1], args[2], args[3], args[5], args[6], args[7], args[8]), args[4]


def _spmm_args(device, index_dtype, seed, optional):
    (v, b, crow, col, *_), order = _projection(19, 27, 0.3, device, index_dtype, seed)
    x = torch.randn(3, 7, 27, device=device)
    return (x, v, crow, col, order, b) if optional else (x, v, crow, col, None, None)


def _sddmm_args(device, index_dtype, seed, optional):
    (_, _, crow, col, *_), _ = _projection(19, 27, 0.3, device, index_dtype, seed)
    return (torch.randn(3, 7, 19, device=device), torch.randn(3, 7, 27, device=device), crow, col)


def _sparse_linear_args(device, index_dtype, seed, optional):
    (v, b, crow, col, crow_t, col_t, perm_t, order_t), order = _projection(
        19, 27, 0.3, device, index_dtype, seed, bias=optional
    )
    return (torch.randn(3, 7, 27, device=device), v, b, crow, col, order, crow_t, col_t, perm_t, order_t)


def _sparse_adapter_args(device, index_dtype, seed, optional):
    down, _ = _projection(8, 27, 0.4, device, index_dtype, seed, bias=optional)
    up, _ = _projection(27, 8, 0.4, device, index_dtype, seed + 5, bias=optional)
    x = torch.randn(3, 7, 27, device=device)
    residual = torch.randn(3, 7, 27, device=device) if optional else None
    return (x, residual, *down, *up, "gelu", 0.5, True)


def _sparse_adapter_infer_args(device, index_dtype, seed, optional):
    """sparse_adapter's case with the forward tensors only."""
    full = _sparse_adapter_args(device, index_dtype, seed, optional)
    return (*full[:2], *full[2:6], *full[10:14], "gelu", 0.5)


def _sparse_adapter_multi_args(device, index_dtype, seed, optional):
    """Two adapters (bottlenecks 8 and 6) concatenated as sparse_adapter_multi takes them; the middle row
    runs no adapter. Forward arguments only (no transposed patterns)."""
    downs = [_projection(r, 27, 0.4, device, index_dtype, seed + k, bias=optional)[0] for k, r in enumerate((8, 6))]
    ups = [_projection(27, r, 0.4, device, index_dtype, seed + 5 + k, bias=optional)[0] for k, r in enumerate((8, 6))]

    def cat(parts, i):
        return None if parts[0][i] is None else torch.cat([p[i] for p in parts])

    x = torch.randn(3, 7, 27, device=device)
    residual = torch.randn(3, 7, 27, device=device) if optional else None
    index = torch.tensor([1, -1, 0], device=device)
    nnz = [[p[0].numel() for p in parts] for parts in (downs, ups)]
    return (
        x,
        index,
        residual,
        *(cat(downs, i) for i in range(4)),
        *(cat(ups, i) for i in range(4)),
        [8, 6],
        nnz[0],
        nnz[1],
        27,
        "gelu,relu",
        [0.5, 2.0],
        True,
    )


# One case per autocast op: (device, index_dtype, seed, optional) -> the op's arguments with fp32
# floating tensors; `optional` False passes None for every Optional tensor.
OP_ARGS = {
    "spmm": _spmm_args,
    "sddmm": _sddmm_args,
    "sparse_linear": _sparse_linear_args,
    "sparse_adapter": _sparse_adapter_args,
    "sparse_adapter_infer": _sparse_adapter_infer_args,
    "sparse_adapter_multi": _sparse_adapter_multi_args,
}
DIFFERENTIABLE = ("sparse_linear", "sparse_adapter")


def _op(name):
    return getattr(_ops, name).default


def _by_hand(args, dtype):
    """What autocast should pass the op: floating tensors in `dtype`, everything else untouched."""
    return tuple(a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


def _outputs(out):
    return out if isinstance(out, (tuple, list)) else (out,)


def _assert_same(a, b):
    """Bitwise: autocast must run the very kernels of the by-hand call on the same inputs (the CPU and
    CUDA kernels are deterministic)."""
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_every_autocast_op_is_tested_here():
    missing = sorted(set(LOWER_PRECISION_OPS) - set(OP_ARGS))
    assert not missing, f"add a case to OP_ARGS for the autocast ops {missing}"


@pytest.mark.parametrize("optional", [True, False], ids=["optional_given", "optional_none"])
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES, ids=str)
@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES, ids=str)
@pytest.mark.parametrize("name", LOWER_PRECISION_OPS)
def test_op_runs_in_the_autocast_dtype(device, seed, name, dtype, index_dtype, optional):
    args = OP_ARGS[name](device, index_dtype, seed, optional)
    with torch.autocast(device, dtype=dtype):
        out = _outputs(_op(name)(*args))
    ref = _outputs(_op(name)(*_by_hand(args, dtype)))
    for o, r in zip(out, ref):
        assert o.dtype == dtype
        _assert_same(o, r)


class _RecordArgs(TorchDispatchMode):
    """Records the arguments each sparseadapter op receives (after autocast, which runs above)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "sparseadapter":
            self.calls.append((func, args))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("optional", [True, False], ids=["optional_given", "optional_none"])
@pytest.mark.parametrize("name", LOWER_PRECISION_OPS)
def test_autocast_casts_floating_tensors_only(device, seed, name, optional):
    args = OP_ARGS[name](device, torch.int64, seed, optional)
    with _RecordArgs() as rec, torch.autocast(device, dtype=torch.bfloat16):
        _op(name)(*args)
    [(func, seen)] = rec.calls
    assert func is _op(name)
    seen = tuple(seen) + (None,) * (len(args) - len(seen))  # trailing defaults (None) are dropped
    for given, got in zip(args, seen):
        if isinstance(given, torch.Tensor) and given.is_floating_point():
            assert got.dtype == torch.bfloat16
        elif isinstance(given, torch.Tensor):
            assert got is given  # index tensors pass through untouched
        else:
            assert got == given  # None, str, float, bool


@pytest.mark.parametrize("backward_inside", [False, True], ids=["backward_after", "backward_inside"])
@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES, ids=str)
@pytest.mark.parametrize("name", DIFFERENTIABLE)
def test_gradients_reach_fp32_parameters_in_fp32(device, seed, name, dtype, backward_inside):
    args = OP_ARGS[name](device, torch.int32, seed, True)
    leaves = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.is_floating_point()]
    assert len(leaves) == (3 if name == "sparse_linear" else 6)  # x, values, bias; x, residual, values and bias of both

    def run(cast_by_hand):
        params = {i: args[i].clone().requires_grad_() for i in leaves}
        call = [params.get(i, a) for i, a in enumerate(args)]
        if cast_by_hand:
            out = _outputs(_op(name)(*_by_hand(call, dtype)))[0]
            out.backward(grad.to(out.dtype))
        else:
            with torch.autocast(device, dtype=dtype):
                out = _outputs(_op(name)(*call))[0]
                if backward_inside:
                    out.backward(grad.to(out.dtype))
            if not backward_inside:
                out.backward(grad.to(out.dtype))
        return out, [params[i].grad for i in leaves]

    grad = torch.randn(3, 7, 19 if name == "sparse_linear" else 27, device=device)
    out, grads = run(cast_by_hand=False)
    ref_out, ref_grads = run(cast_by_hand=True)
    assert out.dtype == dtype
    _assert_same(out, ref_out)
    for g, r in zip(grads, ref_grads):
        assert g is not None and g.dtype == torch.float32
        assert torch.isfinite(g).all()
        _assert_same(g, r)


@pytest.mark.parametrize("name", LOWER_PRECISION_OPS)
def test_outside_autocast_nothing_is_cast(device, seed, name):
    args = OP_ARGS[name](device, torch.int32, seed, True)
    for dtype in (torch.float32, torch.bfloat16):
        for out in _outputs(_op(name)(*_by_hand(args, dtype))):
            assert out.dtype == dtype
    with torch.autocast(device, dtype=torch.bfloat16, enabled=False):
        assert all(o.dtype == torch.float32 for o in _outputs(_op(name)(*args)))
    # float64 is never cast, as aten's autocast leaves it
    with torch.autocast(device, dtype=torch.bfloat16):
        assert all(o.dtype == torch.float64 for o in _outputs(_op(name)(*_by_hand(args, torch.float64))))
    # mixed precision outside autocast stays an error, as before
    mixed = list(args)
    mixed[0] = mixed[0].to(torch.bfloat16)
    with pytest.raises((TypeError, RuntimeError), match="dtype"):
        _op(name)(*mixed)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_autocast_of_another_device_type_leaves_cpu_tensors_alone(seed):
    args = OP_ARGS["sparse_linear"]("cpu", torch.int32, seed, True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert _op("sparse_linear")(*args).dtype == torch.float32


def test_wrappers_and_sparse_linear_module(device, seed):
    """The typed wrappers and SparseLinear reach the same autocast kernels; a bf16 input with fp32
    parameters (what a Houlsby adapter sees after an autocast linear) works."""
    (v, b, crow, col, *_), order = _projection(19, 27, 0.3, device, torch.int32, seed)
    layer = SparseLinear(27, 19, crow, col, v, b)
    x = torch.randn(5, 27, device=device, dtype=torch.bfloat16)
    with torch.autocast(device, dtype=torch.bfloat16):
        y = layer(x)
        assert ops.spmm(x, v, crow, col, order, b).dtype == torch.bfloat16
        assert ops.sddmm(y, x, crow, col).dtype == torch.bfloat16
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.values.grad.dtype == layer.bias.grad.dtype == torch.float32


# -- torch.compile -----------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["inside", "outside"])
def test_compile_fullgraph_under_autocast(device, seed, where):
    torch._dynamo.reset()
    (v, b, crow, col, *_), _ = _projection(24, 40, 0.3, device, torch.int32, seed)
    module = SparseLinear(40, 24, crow, col, v, b)

    def step(x):
        with torch.autocast(device, dtype=torch.bfloat16):
            return module(x)

    compiled = torch.compile(step if where == "inside" else module, fullgraph=True)
    for tokens in (17, 33):
        x = torch.randn(tokens, 40, device=device, requires_grad=True)
        y_eager = step(x)
        y_eager.float().sum().backward()
        grads_eager = (x.grad.clone(), module.values.grad.clone(), module.bias.grad.clone())
        x.grad = None
        module.zero_grad()
        if where == "inside":
            y = compiled(x)
        else:
            with torch.autocast(device, dtype=torch.bfloat16):
                y = compiled(x)
        assert y.dtype == torch.bfloat16
        y.float().sum().backward()
        torch.testing.assert_close(y, y_eager)
        for g, r in zip((x.grad, module.values.grad, module.bias.grad), grads_eager):
            assert g.dtype == torch.float32
            torch.testing.assert_close(g, r)
        module.zero_grad()
    assert compiled(torch.randn(5, 40, device=device)).dtype == (torch.bfloat16 if where == "inside" else torch.float32)


def test_compile_fullgraph_fused_adapter_under_autocast(device, seed):
    torch._dynamo.reset()
    torch.manual_seed(seed)
    adapter = BottleneckAdapter(32, 32, 8, activation="gelu").to(device)
    for name in ("down", "up"):
        dense = getattr(adapter, name)
        mask = torch.rand(dense.weight.shape, device=device) < 0.5
        setattr(adapter, name, SparseLinear.from_dense(dense.weight.detach(), mask, dense.bias.detach()))
    assert adapter.runs_fused()

    def step(x):
        with torch.autocast(device, dtype=torch.bfloat16):
            return adapter(x, x)

    compiled = torch.compile(step, fullgraph=True)
    x = torch.randn(17, 32, device=device)
    y = compiled(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, step(x))
    y.float().sum().backward()
    assert adapter.down.values.grad.dtype == adapter.up.values.grad.dtype == torch.float32


# -- every adapter kind in a (tiny) Hugging Face model --------------------------------------------------
transformers = pytest.importorskip("transformers")
from hf_support import needs_attention_interface, one_thread  # noqa: E402,F401

import sparseadapter as sa  # noqa: E402

KIND_CASES = [
    pytest.param(
        kind,
        k,
        id=f"{kind}-large{k}" if k > 1 else kind,
        marks=[needs_attention_interface] if kind in ("prefix", "mam") else [],
    )
    for kind in ("houlsby", "pfeiffer", "parallel", "lora", "prefix", "mam")
    for k in ((1,) if kind == "prefix" else (1, 2))
]


def _tiny_bert(device):
    torch.manual_seed(0)
    transformers.logging.set_verbosity_error()
    config = transformers.BertConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, vocab_size=100
    )
    return transformers.BertForSequenceClassification(config).to(device).eval()


def _config(kind, large_sparse):
    if kind == "prefix":
        return sa.SparseAdapterConfig(kind="prefix", prefix_length=5, prefix_mid_dim=16)
    extra = dict(prefix_length=5, prefix_mid_dim=16) if kind == "mam" else {}
    # init="bert": both adapter matrices nonzero, so every adapter weight gets a nonzero gradient
    return sa.SparseAdapterConfig(
        kind=kind, bottleneck=8, sparsity=0.5, pruner="random", init="bert", large_sparse=large_sparse, **extra
    )


@pytest.mark.parametrize("kind,large_sparse", KIND_CASES)
def test_every_adapter_kind_trains_under_bf16_autocast(device, kind, large_sparse):
    model = _tiny_bert(device)
    sa.add_adapter(model, "a", _config(kind, large_sparse))
    sa.train_adapter(model, "a")
    sparse = [m for m in model.modules() if isinstance(m, SparseLinear)]
    assert bool(sparse) == (kind != "prefix")
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(p.dtype == torch.float32 for p in trainable.values())

    # the sparse layers and fused adapters must run in bf16, not fall back to fp32
    seen = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: seen.append(out.dtype)) for m in sparse]
    hooks += [
        m.register_forward_hook(lambda mod, inp, out: mod.runs_fused() and seen.append(out.dtype))
        for m in model.modules()
        if isinstance(m, BottleneckAdapter)
    ]

    g = torch.Generator().manual_seed(1)
    batch = {
        "input_ids": torch.randint(5, 100, (3, 9), generator=g).to(device),
        "labels": torch.tensor([0, 1, 1], device=device),
    }
    with torch.no_grad():
        loss32 = model(**batch).loss
    seen.clear()
    with torch.autocast(device, dtype=torch.bfloat16):
        loss = model(**batch).loss
    loss.backward()
    for h in hooks:
        h.remove()

    assert torch.isfinite(loss)
    assert abs(loss.item() - loss32.item()) < 0.05  # bf16 rounding only
    assert all(d == torch.bfloat16 for d in seen) and (bool(seen) == (kind != "prefix"))
    for name, p in trainable.items():
        assert p.dtype == torch.float32, name
        assert p.grad is not None and p.grad.dtype == torch.float32, name
        assert torch.isfinite(p.grad).all(), name
    assert all(m.values.grad.abs().sum() > 0 for m in sparse)


def test_hugging_face_trainer_bf16(tmp_path):
    pytest.importorskip("accelerate")
    model = _tiny_bert("cpu").train()
    sa.add_adapter(model, "a", _config("houlsby", 2))
    sa.train_adapter(model, "a")
    sparse = [m for m in model.modules() if isinstance(m, SparseLinear)]
    before = [m.values.detach().clone() for m in sparse]
    g = torch.Generator().manual_seed(2)
    data = [{"input_ids": torch.randint(5, 100, (9,), generator=g), "labels": torch.tensor(i % 2)} for i in range(8)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        bf16=True,
        use_cpu=True,
        max_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
    )
    result = transformers.Trainer(model=model, args=args, train_dataset=data).train()
    assert result.global_step == 2 and torch.isfinite(torch.tensor(result.training_loss))
    for m, b in zip(sparse, before):
        assert m.values.dtype == torch.float32
        assert not torch.equal(m.values.detach(), b)
