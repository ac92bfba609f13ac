"""One training step of all-MiniLM-L6-v2 with a Houlsby adapter, sparse against dense, on CPU, and the
adapter's training memory.

Step = forward, backward and AdamW step on the adapter and the classifier head, a batch of --batch
random sentences of --length tokens. Rows (timed in interleaved rounds, medians):

  sparse fused      Houlsby pruned at random to --sparsity; each adapter one fused kernel
  sparse separate   the same, layer by layer (BottleneckAdapter.fused = False)
  dense             the unpruned Houlsby adapter (nn.Linear)

Memory: bytes of the adapter's parameters, gradients and AdamW state after a step, and, apart, the
CSR index buffers of the sparse adapter (pattern, transposed pattern, row orders).

    sparseadapter bench training --markdown BENCH.md
"""
import argparse
import os

import torch

from .sparse_linear import machine_header
from .timing import time_interleaved

ROWS = ("sparse fused", "sparse separate", "dense")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="sparseadapter bench training", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--length", type=int, default=64)
    p.add_argument("--sparsity", type=float, default=0.8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=8, help="timed steps per row")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--markdown", metavar="PATH", help="append the tables to PATH")
    p.add_argument("--quick", action="store_true", help="tiny run for CI smoke tests")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.length, args.rounds = 2, 8, 1
    return args


def build(sparsity, seed):
    import transformers

    from ..adapters import SparseAdapterConfig, add_adapter
    from ..training.engine import resolve_model_path

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(resolve_model_path("minilm"), num_labels=2)
    add_adapter(model, "houlsby", SparseAdapterConfig(kind="houlsby", sparsity=sparsity, pruner="random", seed=seed))
    return model.train()


def adapter_bytes(model, optimizer):
    """(parameters + gradients + optimizer state, CSR index buffers) of the adapter, in bytes."""
    trainable, index = 0, 0
    for name, p in model.named_parameters():
        if p.requires_grad and "sparseadapter" in name:
            state = optimizer.state.get(p, {})
            trainable += sum(t.numel() * t.element_size() for t in [p, p.grad, *state.values()]
                             if isinstance(t, torch.Tensor) and t.dim() > 0)
    for name, b in model.named_buffers():
        if "sparseadapter" in name:
            index += b.numel() * b.element_size()
    return trainable, index


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.device, args.dtype, args.min_run_time = "cpu", "float32", 0
    header = machine_header(args)[:-1] + [f"fp32 | batch {args.batch} x length {args.length} | AdamW | "
                                          f"{args.rounds} timed steps per row, interleaved | seed {args.seed}"]
    print("\n".join(header), flush=True)
    from ..adapters import BottleneckAdapter

    models = {"sparse fused": build(args.sparsity, args.seed), "dense": build(0.0, args.seed)}
    models["sparse separate"] = models["sparse fused"]
    g = torch.Generator().manual_seed(args.seed)
    vocab = models["dense"].config.vocab_size
    batch = {"input_ids": torch.randint(1000, vocab, (args.batch, args.length), generator=g),
             "attention_mask": torch.ones(args.batch, args.length, dtype=torch.long),
             "labels": torch.randint(0, 2, (args.batch,), generator=g)}
    optimizers = {k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
                  for k, m in models.items() if k != "sparse separate"}
    optimizers["sparse separate"] = optimizers["sparse fused"]

    def step(name):
        model, optimizer = models[name], optimizers[name]
        for module in model.modules():
            if isinstance(module, BottleneckAdapter):
                module.fused = name != "sparse separate"
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)

    times = time_interleaved({name: (lambda n=name: step(n)) for name in ROWS}, rounds=args.rounds,
                             min_run_time=0.0, threads=args.threads)
    memory = {k: adapter_bytes(models[k], optimizers[k]) for k in ("sparse fused", "dense")}
    lines = ["", "```", *header, "```", "",
             f"**MiniLM training step, Houlsby at sparsity {args.sparsity:g} vs dense Houlsby**: median s per step; "
             "ratio = dense / this row (> 1: faster than dense)", "", "| adapter | s / step | dense / this |",
             "|---|---|---|"]
    lines += [f"| {name} | {times[name]:.3f} | {times['dense'] / times[name]:.2f}x |" for name in ROWS]
    (sp_train, sp_index), (dn_train, _) = memory["sparse fused"], memory["dense"]
    lines += ["", "**adapter training memory** (parameters + gradients + AdamW state; CSR index buffers apart)", "",
              "| adapter | params+grads+AdamW MiB | index buffers MiB | total vs dense |", "|---|---|---|---|",
              f"| sparse ({args.sparsity:g}) | {sp_train / 2**20:.2f} ({sp_train / dn_train:.1%} of dense) | "
              f"{sp_index / 2**20:.2f} | {(sp_train + sp_index) / dn_train:.1%} |",
              f"| dense | {dn_train / 2**20:.2f} | 0 | 100% |", ""]
    table = "\n".join(lines)
    print(table)
    if args.markdown:
        with open(args.markdown, "a", encoding="utf-8") as f:
            f.write(table + "\n")
    return 0
