"""The embedded demo: prune a dense adapter projection at initialization, train the sparse CSR layer
for a few steps on CPU, and time it against the dense (masked) layer it replaces.

The task is synthetic but real: a frozen random "teacher" projection generates targets, and the
pruned student must fit them; the loss it reaches shows the sparse layer trains, the timing shows
what the CSR kernels buy.
"""
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import benchmark

from .csr import csr_to_dense
from .pruning import prune


@dataclass
class DemoConfig:
    in_features: int = 768
    out_features: int = 64
    sparsity: float = 0.9
    tokens: int = 4096
    steps: int = 30
    lr: float = 1e-2
    threads: int = 1
    seed: int = 0


def _median_ms(stmt, **globals_):
    timer = benchmark.Timer(stmt, globals=globals_, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=0.5).median * 1e3


def run_demo(cfg: DemoConfig) -> dict:
    if not 0.0 <= cfg.sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {cfg.sparsity}")
    torch.set_num_threads(cfg.threads)
    gen = torch.Generator().manual_seed(cfg.seed)
    teacher = torch.randn(cfg.out_features, cfg.in_features, generator=gen) / cfg.in_features**0.5
    x = torch.randn(cfg.tokens, cfg.in_features, generator=gen)
    target = x @ teacher.T
    x_test = torch.randn(1024, cfg.in_features, generator=gen)
    target_test = x_test @ teacher.T

    model = nn.Sequential(nn.Linear(cfg.in_features, cfg.out_features))
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(cfg.out_features, cfg.in_features, generator=gen) * 0.02)
        model[0].bias.zero_()
    prune(model, "magnitude", cfg.sparsity, targets=["0"], seed=cfg.seed)
    layer = model[0]
    pattern = csr_to_dense(layer.crow_indices, layer.col_indices, torch.ones(layer.nnz), tuple(teacher.shape))
    mask = pattern != 0
    print(f"pruned {cfg.out_features}x{cfg.in_features} projection by magnitude: {layer}")

    opt = torch.optim.Adam(layer.parameters(), lr=cfg.lr)
    start = time.perf_counter()
    first = last = None
    for step in range(cfg.steps):
        loss = F.mse_loss(layer(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
        last = loss.item()
        if step % 10 == 0 or step == cfg.steps - 1:
            print(f"  step {step:3d}  loss {last:.4f}")
    train_s = time.perf_counter() - start
    with torch.no_grad():
        held_out = F.mse_loss(layer(x_test), target_test).item()
    baseline = F.mse_loss(torch.zeros_like(target), target).item()
    # x is white noise, so the best weights on a fixed pattern are the teacher's own weights there,
    # and what the pattern leaves out is the loss floor.
    floor = (teacher * ~mask).pow(2).sum(1).mean().item()

    dense_w = (layer.to_dense().detach()).clone()
    bias = layer.bias.detach()
    with torch.no_grad():
        sparse_fwd = _median_ms("layer(x)", layer=layer, x=x)
        dense_fwd = _median_ms("F.linear(x, w, b)", F=F, x=x, w=dense_w, b=bias)
    result = {
        "loss_first": first, "loss_last": last, "loss_predict_zero": baseline, "loss_floor": floor,
        "loss_held_out": held_out,
        "train_seconds": train_s, "sparse_forward_ms": sparse_fwd, "dense_forward_ms": dense_fwd,
        "speedup": dense_fwd / sparse_fwd,
    }
    print(f"trained {cfg.steps} steps in {train_s:.2f} s: training loss {first:.4f} -> {last:.4f}; "
          f"held-out loss {held_out:.4f} (predicting zero: {baseline:.4f}, best on this pattern: {floor:.4f})")
    print(f"forward, {cfg.tokens} tokens, {cfg.threads} thread(s): sparse {sparse_fwd:.2f} ms, "
          f"dense F.linear {dense_fwd:.2f} ms -> {result['speedup']:.2f}x")
    return result
