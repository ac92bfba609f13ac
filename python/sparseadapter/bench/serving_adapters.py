"""Serving many adapters on one base model: a batch whose rows name different LoRA adapters.

The model: all-MiniLM-L6-v2 (classifier head) holding max(--adapters) sparse LoRA adapters (rank --rank on
query and value, pruned at random to --sparsity, random values). For each adapter count N, a batch of
--sequences rows of --length tokens, row i naming adapter i mod N (rows shuffled). Rows (same inputs,
timed in interleaved rounds, one call per sample; medians):

  one adapter           the whole batch through adapter 0, the plain active-adapter forward (the baseline)
  mixed                 model(..., adapter_names=names): one op per adapted site over the whole batch
  sub-batches           each adapter's rows as their own call (set_active_adapters, then forward)
  peft one adapter      peft's LoRA (dense, rank chosen for the same nnz) on the whole batch
  peft mixed            peft's model(..., adapter_names=names) with N such adapters (when peft imports)
  sites only: ...       the 12 adapted projections' adapter part alone, on random hidden states of the
                        batch's shape: ours one sparse_adapter_multi per site (AdapterSlot.routed_add on a
                        zero base), peft's LoRA layers with adapter_names and their base layer swapped
                        for one that returns zeros. The base model is most of the time above; this is
                        where the mixed-batch machinery itself shows. "packs kept": ours with each
                        site keeping its adapters' arrays concatenated between calls
                        (serving.keep_routed_packs; off by default, it costs a copy of those arrays).

Memory: the growth of the process's resident set from the first adapter to the last, per added
adapter (all of it when N is 1), against an adapter's own bytes (CSR values, indices and the backward's transposed pattern, biases).

    sparseadapter bench serving --adapters 1 4 16 64 --markdown BENCH.md
"""

import argparse
import ctypes
import gc
import os
import random

import torch

from .machine import machine_header
from .recording import add_record_option, save_record
from .table import Table, report
from .timing import time_calls_interleaved

TARGETS = ("query", "value")


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="sparseadapter bench serving --adapters",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--adapters", type=int, nargs="+", required=True, help="adapter counts N, one table row each")
    p.add_argument("--sequences", type=int, default=64, help="rows per batch")
    p.add_argument("--length", type=int, default=64, help="tokens per row")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank of our sparse adapters")
    p.add_argument("--sparsity", type=float, default=0.5, help="their sparsity (peft's rank: rank x density)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=5, help="timed calls per row")
    p.add_argument("--no-peft", dest="peft", action="store_false", help="leave out peft's rows")
    p.add_argument("--markdown", metavar="PATH", help="append the tables to PATH")
    add_record_option(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny run for CI smoke tests")
    args = p.parse_args(argv)
    if any(n < 1 for n in args.adapters):
        raise ValueError(f"--adapters: counts must be >= 1, got {args.adapters}")
    if not 0.0 <= args.sparsity < 1.0:
        raise ValueError(f"--sparsity must be in [0, 1), got {args.sparsity}")
    if args.quick:
        args.sequences, args.length, args.rounds = 4, 8, 1
    return args


def resident_bytes() -> int:
    """The process's resident set, after a collection and with freed heap returned (glibc)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def base_model(seed):
    import transformers

    from ..training.engine import resolve_model_path

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    return transformers.AutoModelForSequenceClassification.from_pretrained(
        resolve_model_path("minilm"), num_labels=2
    ).eval()


def adapter_bytes(model, name) -> int:
    """Bytes of adapter `name`'s own tensors (parameters and buffers, each counted once)."""
    from ..adapters import adapter_modules

    seen = {}
    for module in adapter_modules(model, name).values():
        for t in list(module.parameters()) + list(module.buffers()):
            seen[t.data_ptr()] = t.numel() * t.element_size()
    return sum(seen.values())


def ours(args, count):
    """The base model with `count` sparse LoRA adapters; (model, names, RSS bytes per adapter, CSR bytes
    per adapter)."""
    from ..adapters import SparseAdapterConfig, add_adapter

    model = base_model(args.seed)
    names = [f"lora{i}" for i in range(count)]
    before = resident_bytes()
    for i, name in enumerate(names):
        if i == 1:  # the slope from the first adapter on: one-time costs (code paths, caches) left out
            before = resident_bytes()
        config = SparseAdapterConfig(
            kind="lora",
            bottleneck=args.rank,
            sparsity=args.sparsity,
            pruner="random",
            seed=args.seed + i,
            lora_targets=list(TARGETS),
        )
        add_adapter(model, name, config, activate=i == 0)
        g = torch.Generator().manual_seed(args.seed + i)
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if f".adapters.{name}." in pname:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    per_adapter = (resident_bytes() - before) / max(1, count - 1)
    csr = sum(adapter_bytes(model, n) for n in names) / count
    return model.eval(), names, per_adapter, csr


def peft_model(args, count, rank):
    """peft's LoRA model with `count` dense adapters of rank `rank`, random B; None without peft."""
    try:
        import peft
    except ImportError:
        return None
    model = base_model(args.seed)
    config = peft.LoraConfig(
        r=rank, lora_alpha=2 * rank, target_modules=list(TARGETS), lora_dropout=0.0, init_lora_weights=False
    )
    model = peft.get_peft_model(model, config, adapter_name="lora0")
    for i in range(1, count):
        model.add_adapter(f"lora{i}", config)
    model.set_adapter("lora0")
    return model.eval()


class _Zeros(torch.nn.Module):
    """Stands in for a peft layer's base layer in the sites-only rows: its output shape, all zeros."""

    def __init__(self, out_features: int) -> None:
        super().__init__()
        self.out_features = out_features

    def forward(self, x, *args, **kwargs):
        return x.new_zeros(*x.shape[:-1], self.out_features)


def sites_only(model, other, hidden):
    """(ours, peft's or None): callables running every adapted site's adapter part on `hidden` for a
    routing `names` (one per row); ours takes `packs`, whether the sites keep their packed arrays
    (each its own MultiPackCache, kept across calls of either kind)."""
    from ..adapters.registry import registry
    from ..adapters.routing import rows_of
    from ..adapters.slot import slots
    from ..serving import keep_routed_packs

    held = [s for s in slots(model).values() if len(s.adapters)]
    zeros = hidden.new_zeros(hidden.shape)
    keep_routed_packs(model, True)
    kept = [slot.multi_packs for slot in held]

    def ours_fn(names, packs=False):
        for slot, cache in zip(held, kept):
            slot.__dict__["multi_packs"] = cache if packs else None
        routing = rows_of(names, list(registry(model).adapters), [], hidden.shape[0], hidden.device)
        return [slot.routed_add(routing, hidden, zeros) for slot in held]

    if other is None:
        return ours_fn, None
    from peft.tuners.lora.layer import Linear as PeftLinear

    layers = [m for m in other.modules() if isinstance(m, PeftLinear)]
    stand_ins = [_Zeros(m.base_layer.out_features) for m in layers]

    def peft_fn(names):
        out = []
        for layer, stand_in in zip(layers, stand_ins):
            base, layer.base_layer = layer.base_layer, stand_in
            try:
                out.append(layer(hidden, adapter_names=names))
            finally:
                layer.base_layer = base
        return out

    return ours_fn, peft_fn


def main(argv=None):
    from ..adapters import set_active_adapters

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.device, args.dtype, args.min_run_time = "cpu", "float32", 0
    header = machine_header(args)[:-1] + [
        f"fp32 | {args.sequences} sequences x {args.length} tokens | sparse LoRA rank {args.rank} at sparsity "
        f"{args.sparsity} on {', '.join(TARGETS)} | {args.rounds} interleaved rounds, one call per sample, after "
        f"one warm-up | seed {args.seed}"
    ]
    print("\n".join(header))
    most = max(args.adapters)
    model, names, rss_per_adapter, csr_per_adapter = ours(args, most)
    peft_rank = max(1, round(args.rank * (1.0 - args.sparsity)))
    other = peft_model(args, most, peft_rank) if args.peft else None
    gen = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(1000, 20000, (args.sequences, args.length), generator=gen)
    batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids))
    hidden = torch.randn(args.sequences, args.length, model.config.hidden_size, generator=gen)
    ours_sites, peft_sites = sites_only(model, other, hidden)
    rows = {}
    for n in args.adapters:
        routed = [names[i % n] for i in range(args.sequences)]
        random.Random(args.seed + n).shuffle(routed)
        groups = {name: torch.tensor([i for i, r in enumerate(routed) if r == name]) for name in dict.fromkeys(routed)}
        sub = {name: {k: v.index_select(0, idx) for k, v in batch.items()} for name, idx in groups.items()}

        def one_adapter():
            set_active_adapters(model, [names[0]])
            return model(**batch)

        def sub_batches():
            for name, part in sub.items():
                set_active_adapters(model, [name])
                model(**part)

        calls = {
            "one adapter": one_adapter,
            "mixed": lambda: model(**batch, adapter_names=routed),
            "sub-batches": sub_batches,
        }
        if other is not None:
            calls["peft one adapter"] = lambda: other(**batch)
            calls["peft mixed"] = lambda: other(**batch, adapter_names=routed)
        calls["sites only: mixed"] = lambda: ours_sites(routed)
        calls["sites only: mixed, packs kept"] = lambda: ours_sites(routed, packs=True)
        if peft_sites is not None:
            calls["sites only: peft mixed"] = lambda: peft_sites(routed)
        with torch.inference_mode():
            samples, errors = time_calls_interleaved(calls, rounds=args.rounds, warmup=1)
        if errors:
            raise RuntimeError("; ".join(f"{k}: {e}" for k, e in errors.items()))
        rows[n] = {k: sorted(v)[len(v) // 2] for k, v in samples.items()}
        print(f"N={n}: " + ", ".join(f"{k} {args.sequences / t:.1f} seq/s" for k, t in rows[n].items()), flush=True)
    found = [table(rows, args, rss_per_adapter, csr_per_adapter, peft_rank)]
    text = report(header, found)
    print(text)
    if args.markdown:
        with open(args.markdown, "a", encoding="utf-8") as f:
            f.write(text)
    if args.record:
        save_record(args.record, "serving", argv, header, found)
    return 0


def table(rows, args, rss_per_adapter, csr_per_adapter, peft_rank):
    variants = list(next(iter(rows.values())))
    has_peft = "peft mixed" in variants
    caption = f"sequences/s, {args.sequences} x {args.length} tokens, {args.threads} thread(s); " + (
        f"peft: dense LoRA rank {peft_rank} (the same nnz)" if has_peft else "peft not installed"
    )
    columns = ["adapters N", *variants, "mixed / one adapter", "mixed / sub-batches"]
    if has_peft:
        columns += ["mixed / peft mixed", "sites only: mixed / peft mixed", "sites only, packs kept / peft mixed"]
    cells = []
    for n, times in rows.items():
        line = [str(n)] + [f"{args.sequences / times[v]:.2f}" for v in variants]
        line += [f"{times['one adapter'] / times['mixed']:.2f}x", f"{times['sub-batches'] / times['mixed']:.2f}x"]
        if has_peft:
            line.append(f"{times['peft mixed'] / times['mixed']:.2f}x")
            line.append(f"{times['sites only: peft mixed'] / times['sites only: mixed']:.2f}x")
            line.append(f"{times['sites only: peft mixed'] / times['sites only: mixed, packs kept']:.2f}x")
        cells.append(line)
    memory = (
        f"memory per added adapter (adapters 2..{max(rows)} added): resident {rss_per_adapter / 1024:.1f} KiB, "
        f"its tensors {csr_per_adapter / 1024:.1f} KiB, ratio {rss_per_adapter / csr_per_adapter:.2f}x"
    )
    return Table(
        "many adapters: sequences/s", columns, cells, caption=caption, notes=[memory], align="r" * len(columns)
    )
