"""The fused pruning kernels against the plain PyTorch way, on adapter-sized weights.

Setups (Houlsby adapters, two per layer: down [64, hidden] and up [hidden, 64]):
  bert-base  12 layers x (768x64 down + 64x768 up)   ~1.18M weights
  minilm      6 layers x (384x64 down + 64x384 up)   ~0.29M weights
Stages, each "plain" vs "fused" (sparsity 0.4, i.e. keep k = round(0.6 N)):
  score     SNIP |g * w| per tensor: (g * w).abs()             vs prune_score(w, g, None, "snip")
  select    torch.cat + topk(k) + scatter + split (exact k)    vs topk_masks(scores, k)
            torch.cat + kthvalue + compare (not exact k on ties: shown for reference)
  csr       mask.to_sparse_csr() per matrix                    vs mask_to_csr(mask, int32)
  pipeline  score -> select (topk) -> csr                      vs the three fused ops
Every fused result is checked against the plain one before timing (exact masks and CSR arrays).

    sparseadapter bench pruning                  # CPU, 1 thread
    sparseadapter bench pruning --device cuda
    sparseadapter bench pruning --record benchmarks/results/pruning-DATE.json
"""

import argparse
import sys

import torch
from torch.utils import benchmark

import sparseadapter_ext as ext

from .machine import machine_header
from .recording import add_record_option, save_record
from .table import Table, report

SETUPS = {"bert-base": (12, 768, 64), "minilm": (6, 384, 64)}
SPARSITY = 0.4


def make_weights(layers, hidden, bottleneck, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [s for _ in range(layers) for s in ((bottleneck, hidden), (hidden, bottleneck))]
    w = [(torch.randn(s, generator=gen) * 0.02).to(device) for s in shapes]
    g = [torch.randn(s, generator=gen).to(device) for s in shapes]
    return w, g


# ---- plain PyTorch ----


def plain_score(w, g):
    return [(gi * wi).abs() for wi, gi in zip(w, g)]


def plain_select_topk(scores, k):
    cat = torch.cat([s.reshape(-1) for s in scores])
    keep = torch.zeros_like(cat, dtype=torch.bool)
    keep[torch.topk(cat, k, sorted=False).indices] = True
    return [m.view(s.shape) for m, s in zip(keep.split([s.numel() for s in scores]), scores)]


def plain_select_kthvalue(scores, k):
    cat = torch.cat([s.reshape(-1) for s in scores])
    threshold = torch.kthvalue(cat, cat.numel() - k + 1).values
    return [s >= threshold for s in scores]


def plain_csr(masks):
    out = []
    for m in masks:
        t = m.to_sparse_csr()
        out.append((t.crow_indices(), t.col_indices()))
    return out


def plain_pipeline(w, g, k):
    return plain_csr(plain_select_topk(plain_score(w, g), k))


# ---- fused ----


def fused_score(w, g):
    return [ext.prune_score(wi, gi, None, "snip") for wi, gi in zip(w, g)]


def fused_select(scores, k):
    return ext.topk_masks(scores, k)


def fused_csr(masks):
    return [ext.mask_to_csr(m, torch.int32) for m in masks]


def fused_pipeline(w, g, k):
    return fused_csr(fused_select(fused_score(w, g), k))


def check(w, g, k):
    """The fused ops give the plain results (continuous scores: no ties, so topk's set is exact)."""
    s_plain, s_fused = plain_score(w, g), fused_score(w, g)
    assert all(torch.equal(a, b) for a, b in zip(s_plain, s_fused)), "score differs"
    m_plain, m_fused = plain_select_topk(s_plain, k), fused_select(s_fused, k)
    assert all(torch.equal(a, b) for a, b in zip(m_plain, m_fused)), "masks differ"
    for (c0, i0), (c1, i1) in zip(plain_csr(m_plain), fused_csr(m_fused)):
        assert torch.equal(c0.long(), c1.long()) and torch.equal(i0.long(), i1.long()), "CSR differs"


def time_it(fn, args, label, sub_label, description, min_run_time):
    t = benchmark.Timer(
        stmt="fn(*args)",
        globals={"fn": fn, "args": args},
        label=label,
        sub_label=sub_label,
        description=description,
        num_threads=torch.get_num_threads(),
    )
    return t.blocked_autorange(min_run_time=min_run_time)


def pruning_header(args):
    cuda = args.device.startswith("cuda")
    shared = argparse.Namespace(
        threads=args.threads, device="cuda" if cuda else "cpu", dtype="float32", min_run_time=0, rounds=1, seed=0
    )
    return machine_header(shared)[:-1] + [
        f"device {args.device} | sparsity {SPARSITY} (keep k = round(0.6 N)) | SNIP scores, float32 | "
        f"min_run_time {args.min_run_time}s"
    ]


def table(rows):
    caption = (
        "Median ms; plain/fused > 1 means the fused kernels are faster. plain = the PyTorch way "
        "(score: `(g * w).abs()`; select: `torch.cat` + `topk` + scatter + split, exact k; csr: "
        "`to_sparse_csr`); fused = `prune_score`, `topk_masks`, `mask_to_csr`. kthvalue = "
        "`torch.cat` + `kthvalue` + compare, shown for reference (not exact k under ties)."
    )
    columns = ["setup", "weights", "stage", "plain ms", "fused ms", "plain/fused", "kthvalue ms (not exact k)"]
    cells = [
        [name, str(n), stage, f"{tp:.4g}", f"{tf:.4g}", f"{tp / tf:.2f}x", "" if te is None else f"{te:.4g}"]
        for name, n, stage, tp, tf, te in rows
    ]
    return Table("pruning kernels", columns, cells, caption=caption)


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="sparseadapter bench pruning", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--min-run-time", type=float, default=0.3)
    p.add_argument("--markdown", metavar="PATH", help="append the table to PATH")
    add_record_option(p)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    header = pruning_header(args)
    print("\n".join(header), flush=True)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    rows, results = [], []
    for name, (layers, hidden, bottleneck) in SETUPS.items():
        w, g = make_weights(layers, hidden, bottleneck, args.device)
        n = sum(t.numel() for t in w)
        k = round((1 - SPARSITY) * n)
        check(w, g, k)
        scores = fused_score(w, g)
        masks = fused_select(scores, k)
        stages = [
            ("score", (plain_score, (w, g)), (fused_score, (w, g)), None),
            (
                "select",
                (plain_select_topk, (scores, k)),
                (fused_select, (scores, k)),
                (plain_select_kthvalue, (scores, k)),
            ),
            ("csr", (plain_csr, (masks,)), (fused_csr, (masks,)), None),
            ("pipeline", (plain_pipeline, (w, g, k)), (fused_pipeline, (w, g, k)), None),
        ]
        for stage, plain, fused, extra in stages:
            sub = f"{name} ({n} weights, {len(w)} tensors)"

            def timed(fn_args, desc):
                fn, a = fn_args

                def run(*xs):
                    out = fn(*xs)
                    sync()
                    return out

                m = time_it(run, a, stage, sub, desc, args.min_run_time)
                results.append(m)
                return m.median * 1e3

            t_plain = timed(plain, "plain")
            t_fused = timed(fused, "fused")
            t_extra = timed(extra, "kthvalue") if extra else None
            rows.append((name, n, stage, t_plain, t_fused, t_extra))
    benchmark.Compare(results).print()
    found = [table(rows)]
    text = report(header, found)
    print(text)
    if args.markdown:
        with open(args.markdown, "a", encoding="utf-8") as f:
            f.write(text)
    if args.record:
        save_record(args.record, "pruning", argv, header, found)
    return 0


if __name__ == "__main__":
    sys.exit(main())
