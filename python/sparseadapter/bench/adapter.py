"""The whole bottleneck adapter `x + up(act(down(x)))` (Houlsby's residual form), sparse against dense.

For x of shape [N, d], a bottleneck r and a random pattern at each sparsity (fraction REMOVED), times

  fused        sparseadapter's BottleneckAdapter with both layers sparse: one sparse_adapter kernel
  separate     the same adapter run layer by layer (fused = False): SpMM, activation, SpMM, add
  masked       the same adapter with dense nn.Linear layers holding the masked weights (MKL / cuBLAS)
  budget       a dense adapter with the same number of weights: bottleneck round(r * density)

forward (no grad) and forward+backward (gradients to x and every adapter parameter). Every config is
checked (fused against masked: output and gradients) before it is timed. On CUDA the fused forward's
bandwidth is reported against a copy of x measured in the same run (bytes: x read once, out written once).

    sparseadapter bench adapter                                   # CPU fp32, N=4096, 1 thread
    sparseadapter bench adapter --device cuda --dtype bfloat16 --tokens 32768
"""

import argparse

import torch

from ..adapters import BottleneckAdapter
from ..adapters.config import ACTIVATIONS
from ..sparse_linear import SparseLinear
from .machine import machine_header
from .recording import add_record_option, save_record
from .sparse_linear import DTYPES, TOLERANCES, parse_shape
from .table import Table, report
from .timing import time_interleaved

DEFAULT_SHAPES = ["384x64", "768x64", "768x256", "1024x128", "4096x512"]
METHODS = ("fused", "separate", "masked", "budget")


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="sparseadapter bench adapter", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32")
    p.add_argument("--tokens", type=int, nargs="+", default=[4096])
    p.add_argument(
        "--shapes",
        type=parse_shape,
        nargs="+",
        default=[parse_shape(s) for s in DEFAULT_SHAPES],
        help="d x r (hidden x bottleneck)",
    )
    p.add_argument("--sparsity", type=float, nargs="+", default=[0.4, 0.6, 0.8, 0.9, 0.95])
    p.add_argument("--activation", choices=ACTIVATIONS, default="relu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--min-run-time",
        type=float,
        default=None,
        help="seconds per method and config (default 0.6 on cpu, 0.2 on cuda)",
    )
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--markdown", metavar="PATH", help="append the tables to PATH")
    add_record_option(p)
    p.add_argument("--quick", action="store_true", help="tiny run for CI smoke tests")
    args = p.parse_args(argv)
    if args.quick:
        args.tokens, args.shapes, args.sparsity, args.min_run_time, args.rounds = [40], [(48, 16)], [0.8], 0.02, 1
    if args.min_run_time is None:
        args.min_run_time = 0.6 if args.device == "cpu" else 0.2
    if any(not 0.0 <= s < 1.0 for s in args.sparsity):
        p.error("--sparsity values must be in [0, 1)")
    return args


class Config:
    def __init__(self, n, d, r, sparsity, dtype, device, seed, activation="relu"):
        g = torch.Generator().manual_seed(seed)
        to = dict(dtype=dtype, device=device)
        self.x = torch.randn(n, d, generator=g).to(**to)
        self.grad = torch.randn(n, d, generator=g).to(**to)
        w_down, w_up = torch.randn(r, d, generator=g) * d**-0.5, torch.randn(d, r, generator=g) * r**-0.5
        b_down, b_up = torch.randn(r, generator=g) * 0.1, torch.randn(d, generator=g) * 0.1
        m_down, m_up = torch.rand(r, d, generator=g) >= sparsity, torch.rand(d, r, generator=g) >= sparsity
        self.nnz = int(m_down.sum() + m_up.sum())
        self.sparse = BottleneckAdapter(d, d, r, activation=activation).to(**to)
        self.sparse.down = SparseLinear.from_dense(w_down.to(**to), m_down.to(device), b_down.to(**to))
        self.sparse.up = SparseLinear.from_dense(w_up.to(**to), m_up.to(device), b_up.to(**to))
        self.masked = BottleneckAdapter(d, d, r, activation=activation).to(**to)
        with torch.no_grad():
            for name, w, m, b in (("down", w_down, m_down, b_down), ("up", w_up, m_up, b_up)):
                getattr(self.masked, name).weight.copy_(w * m)
                getattr(self.masked, name).bias.copy_(b)
        self.budget_r = max(1, round(r * self.nnz / (2 * d * r)))
        self.budget = BottleneckAdapter(d, d, self.budget_r, activation=activation).to(**to)

    def run(self, method, backward):
        adapter = self.sparse if method in ("fused", "separate") else getattr(self, method)
        self.sparse.fused = method == "fused"
        if not backward:
            with torch.no_grad():
                return adapter(self.x, self.x)
        x = self.x.detach().requires_grad_()
        params = [p for p in adapter.parameters() if p.requires_grad]
        return torch.autograd.grad(adapter(x, x), [x, *params], self.grad)

    def check(self):
        """Fused against masked dense: output, grad_x, and the weight gradients on the kept entries.
        A pre-activation within rounding of 0 may take the other side of the ReLU in the two paths,
        which changes that token's grad_x and that bottleneck unit's down-projection gradient by O(1):
        tokens and units where the signs differ (a few in millions of entries) are left out of those
        comparisons."""
        rtol, atol = TOLERANCES[self.x.dtype]
        got, want = self.run("fused", False), self.run("masked", False)
        g_fused, g_masked = self.run("fused", True), self.run("masked", True)
        with torch.no_grad():
            flipped = (self.sparse.down(self.x) > 0) != (self.masked.down(self.x) > 0)
        if flipped.sum() > 1e-4 * flipped.numel():
            return f"pre-activations differ in sign at {int(flipped.sum())} of {flipped.numel()} entries"
        same_side = ~flipped.any(dim=1)
        pairs = [("output", got, want), ("grad_x", g_fused[0][same_side], g_masked[0][same_side])]
        masks = [self.sparse.down.to_dense() != 0, self.sparse.up.to_dense() != 0]
        # fused param order: down.values, down.bias, up.values, up.bias; masked: weight, bias per layer
        unit_ok = ~flipped.any(dim=0)[masks[0].nonzero()[:, 0]]  # per stored down entry: its row is clean
        pairs += [
            ("grad_down", g_fused[1][unit_ok], g_masked[1][masks[0]][unit_ok]),
            ("grad_up", g_fused[3], g_masked[3][masks[1]]),
        ]
        for name, a, b in pairs:
            scale = max(b.abs().max().item(), 1.0) if b.numel() else 1.0
            if a.shape != b.shape or not torch.allclose(a.float(), b.float(), rtol=rtol, atol=atol * scale):
                return f"{name} mismatch"
        return None


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    header = machine_header(args)
    print("\n".join(header), flush=True)
    cuda = args.device == "cuda"
    rows, failed = [], False
    for n in args.tokens:
        for d, r in args.shapes:
            copy_s = None
            for sparsity in args.sparsity:
                cfg = Config(n, d, r, sparsity, dtype, device, args.seed, args.activation)
                row = {"n": n, "shape": f"{d}x{r}", "sparsity": sparsity, "budget_r": cfg.budget_r}
                problem = cfg.check()
                if problem:
                    failed, row["fail"] = True, problem
                for backward in (False, True):
                    fns = {
                        m: (lambda m=m, cfg=cfg, backward=backward: cfg.run(m, backward))
                        for m in METHODS
                        if not (problem and m == "fused")
                    }
                    if cuda and not backward and copy_s is None:
                        fns["copy"] = lambda cfg=cfg: cfg.x.clone()
                    times = time_interleaved(
                        fns, rounds=args.rounds, min_run_time=args.min_run_time, threads=args.threads, cuda=cuda
                    )
                    copy_s = times.pop("copy", copy_s)
                    row.update({(m, backward): t for m, t in times.items()})
                if cuda and "fail" not in row:
                    moved = 2 * cfg.x.numel() * cfg.x.element_size()  # x read once, out written once
                    row["bandwidth"] = (moved / row[("fused", False)], moved / copy_s)
                rows.append(row)
                print(format_row(row), flush=True)
                del cfg
    found = tables(rows)
    text = report(header, found)
    print(text)
    if args.markdown:
        with open(args.markdown, "a", encoding="utf-8") as f:
            f.write(text)
    if args.record:
        save_record(args.record, "adapter", argv, header, found)
    return 1 if failed else 0


def format_row(row):
    parts = [f"N={row['n']} {row['shape']} s={row['sparsity']:g}"]
    for backward in (False, True):
        parts.append(
            ("fwd+bwd " if backward else "fwd ")
            + " ".join(f"{m} {row[(m, backward)] * 1e3:.3f}ms" for m in METHODS if (m, backward) in row)
        )
    return " | ".join(parts) + (f" | FAIL {row['fail']}" if "fail" in row else "")


def _ratio(row, other, backward):
    ours = row.get(("fused", backward))
    return "n/a" if ours is None else f"{row[(other, backward)] / ours:.2f}x"


def tables(rows):
    """The forward and forward+backward tables (forward on CUDA: the bandwidth column too)."""
    out = []
    bandwidth = any("bandwidth" in r for r in rows)
    for backward, title in ((False, "forward"), (True, "forward+backward (grads to x and all adapter parameters)")):
        columns = ["N", "d x r", "sparsity", "fused ms", "separate ms", "masked dense ms", "budget dense ms"]
        columns += ["separate/fused", "masked/fused", "budget/fused"]
        if bandwidth and not backward:
            columns.append("GB/s fused / copy")
        cells = []
        for r in rows:
            fused = "FAIL" if "fail" in r else f"{r[('fused', backward)] * 1e3:.4g}"
            line = [
                str(r["n"]),
                r["shape"],
                f"{r['sparsity']:g}",
                fused,
                f"{r[('separate', backward)] * 1e3:.4g}",
                f"{r[('masked', backward)] * 1e3:.4g}",
                f"{r[('budget', backward)] * 1e3:.4g} (r={r['budget_r']})",
                _ratio(r, "separate", backward),
                _ratio(r, "masked", backward),
                _ratio(r, "budget", backward),
            ]
            if bandwidth and not backward:
                got, copy = r.get("bandwidth", (None, None))
                line.append("n/a" if got is None else f"{got / 1e9:.0f} / {copy / 1e9:.0f} ({got / copy:.0%})")
            cells.append(line)
        caption = (
            f"**adapter {title}**: median ms; ratios = other / fused (> 1: fused is faster); budget = dense "
            "adapter with the same weight count (bottleneck in parentheses)"
        )
        out.append(Table(title, columns, cells, caption=caption))
    return out
