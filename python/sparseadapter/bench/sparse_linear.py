"""SparseLinear against dense F.linear and torch.sparse CSR, in the style of torch.utils.benchmark.

For x of shape [N, in] and a weight [out, in] with a random mask (sparsity = fraction of weights
REMOVED), times the forward and the forward+backward (gradients to x and to the weight values) of

  ours    sparseadapter.SparseLinear.from_dense(w, mask, bias)(x) in the path mode in effect (auto by
          default: each product runs the path measured fastest for it, reported in the `path` column)
  sparse  the same with the path forced to our CSR kernels          (set_path_mode("sparse"))
  expand  the same with the path forced to the dense expansion: the CSR weight expanded per call into a
          dense scratch, then the vendor GEMM                      (set_path_mode("dense"))
  dense   F.linear(x, w * mask, bias)            (w * mask computed once, outside the timer)
  csr     torch.sparse CSR (MKL on CPU, cuSPARSE on GPU): the faster, per config, of
            mm      torch.addmm(bias[:, None], w_csr, x.T).T   (torch.sparse.mm(w_csr, x.T).T plus bias)
            linear  F.linear(x, w_csr, bias)
          forward+backward uses `mm` on a CSR tensor built from a values leaf, so the weight gradient
          is the nnz-sized one, like ours.
  floor   forward only: x read once and y written once (x.sum(0) and torch.zeros(N, out)), the memory
          traffic no forward can avoid

The path decisions are cleared before each config, so `path` is this run's measurement.

Every config is checked once before timing (ours against dense: output, grad_x, grad_values) so a
fast wrong kernel cannot report a number; a failed check is printed as FAIL and makes the exit
status 1. Each method is timed with Timer.blocked_autorange in --rounds interleaved rounds (so load
from other processes falls on all methods alike), the blocks merged and the median reported; the
printed table is torch.utils.benchmark.Compare, --markdown appends medians and ratios, --record FILE
saves them as a result record.

    sparseadapter bench linear                          # CPU fp32, N=4096, 1 thread
    OMP_WAIT_POLICY=PASSIVE sparseadapter bench linear --threads 2
    sparseadapter bench linear --device cuda --dtype bfloat16 --tokens 4096 32768
"""

import argparse
import re
import sys
import time
import warnings

import torch
import torch.nn.functional as F
from torch.utils import benchmark

import sparseadapter
import sparseadapter_ext
from sparseadapter_ext import _C

from .machine import machine_header
from .recording import add_record_option, save_record
from .table import Table, report

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# (rtol, atol relative to the largest reference magnitude) for ours vs dense in the same dtype.
TOLERANCES = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (3e-2, 3e-2), torch.float16: (5e-3, 5e-3)}
DEFAULT_SHAPES = ["384x64", "64x384", "768x64", "768x256"]
METHODS = ("ours", "sparse", "expand", "dense", "csr", "floor")
CLOCKS = {"wall": time.perf_counter, "thread": time.thread_time}
FORCED_PATHS = {"sparse": "sparse", "expand": "dense"}  # method -> the path mode it runs under


def parse_shape(text):
    parts = re.split(r"x|->|:|,", text.strip())
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"shape must look like IN x OUT (e.g. 768x64), got {text!r}")
    return int(parts[0]), int(parts[1])


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="sparseadapter bench linear", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32")
    p.add_argument("--tokens", type=int, nargs="+", default=[4096], help="N, the rows of x")
    p.add_argument(
        "--sparsity", type=float, nargs="+", default=[0.4, 0.8, 0.9, 0.95], help="fraction of weights removed"
    )
    p.add_argument(
        "--shapes",
        type=parse_shape,
        nargs="+",
        default=[parse_shape(s) for s in DEFAULT_SHAPES],
        help="IN x OUT, e.g. 768x64",
    )
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument(
        "--clock",
        choices=list(CLOCKS),
        default="wall",
        help="wall: elapsed time; thread: CPU time of the timing thread (--threads 1 only), which on a "
        "machine shared with other processes leaves out the time spent waiting for a CPU",
    )
    p.add_argument(
        "--min-run-time",
        type=float,
        default=None,
        help="seconds of timing per method and config, split over --rounds (default 1.0 on cpu, 0.2 on cuda)",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=4,
        help="interleaved rounds per config; each method's blocks are merged (median of all)",
    )
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), help="what to time (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--markdown", metavar="PATH", help="append markdown tables to PATH")
    add_record_option(p)
    p.add_argument("--quick", action="store_true", help="tiny run for CI smoke tests")
    args = p.parse_args(argv)
    if args.quick:
        args.tokens, args.shapes, args.sparsity, args.min_run_time = [64], [(48, 16), (16, 40)], [0.9], 0.02
        args.rounds = 2
    if args.min_run_time is None:
        args.min_run_time = 1.0 if args.device == "cpu" else 0.2
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    if args.clock == "thread" and (args.threads != 1 or args.device != "cpu"):
        p.error("--clock thread times one CPU thread: it needs --threads 1 and --device cpu")
    for s in args.sparsity:
        if not 0.0 <= s < 1.0:
            p.error(f"--sparsity values must be in [0, 1), got {s}")
    return args


class Config:
    """One (N, shape, sparsity): the inputs and the three methods, forward and forward+backward."""

    def __init__(self, n, in_f, out_f, sparsity, dtype, device, seed):
        g = torch.Generator().manual_seed(seed)
        bound = in_f**-0.5  # nn.Linear's scale, so outputs are O(1)
        w = torch.empty(out_f, in_f).uniform_(-bound, bound, generator=g)
        mask = torch.rand(out_f, in_f, generator=g) >= sparsity
        bias = torch.empty(out_f).uniform_(-bound, bound, generator=g)
        x = torch.randn(n, in_f, generator=g)
        to = dict(dtype=dtype, device=device)
        self.x, self.bias = x.to(**to), bias.to(**to)
        self.grad_y = torch.randn(n, out_f, generator=g).to(**to)
        self.mask = mask.to(device)
        self.w_dense = (w * mask).to(**to)
        self.ours = sparseadapter.SparseLinear.from_dense(w.to(**to), self.mask, self.bias)
        self.ours.bias.requires_grad_(False)  # gradients to x and values only, for every method
        self.w_csr = self.w_dense.to_sparse_csr()
        self.nnz = int(mask.sum())
        self.out_features = out_f

    # forward
    def ours_fwd(self):
        return self.ours(self.x)

    def dense_fwd(self):
        return F.linear(self.x, self.w_dense, self.bias)

    def csr_mm_fwd(self):
        return torch.addmm(self.bias[:, None], self.w_csr, self.x.T).T

    def csr_linear_fwd(self):
        return F.linear(self.x, self.w_csr, self.bias)

    def floor_fwd(self):
        self.x.sum(0)
        return torch.zeros(self.x.shape[0], self.out_features, dtype=self.x.dtype, device=self.x.device)

    # forward+backward: gradients by autograd.grad, so nothing accumulates between runs
    def ours_fwdbwd(self, x):
        return torch.autograd.grad(self.ours(x), (x, self.ours.values), self.grad_y)

    def dense_fwdbwd(self, x, w):
        return torch.autograd.grad(F.linear(x, w, self.bias), (x, w), self.grad_y)

    def csr_fwdbwd(self, x, values):
        w = torch.sparse_csr_tensor(
            self.w_csr.crow_indices(), self.w_csr.col_indices(), values, self.w_csr.shape, check_invariants=False
        )
        return torch.autograd.grad(torch.addmm(self.bias[:, None], w, x.T).T, (x, values), self.grad_y)

    def leaves(self):
        return {
            "x": self.x.detach().requires_grad_(True),
            "w": self.w_dense.detach().requires_grad_(True),
            "values": self.w_csr.values().detach().requires_grad_(True),
        }

    def check(self):
        """Ours against dense in the same dtype; returns None or a message naming the mismatch."""
        rtol, atol = TOLERANCES[self.x.dtype]
        leaves = self.leaves()
        gx, gv = self.ours_fwdbwd(leaves["x"])
        dgx, dgw = self.dense_fwdbwd(leaves["x"], leaves["w"])
        pairs = {
            "output": (self.ours_fwd(), self.dense_fwd()),
            "grad_x": (gx, dgx),
            "grad_values": (gv, dgw[self.mask]),
        }
        for name, (got, want) in pairs.items():
            scale = max(want.abs().max().item(), 1.0) if want.numel() else 1.0
            if got.shape != want.shape or not torch.allclose(got.float(), want.float(), rtol=rtol, atol=atol * scale):
                err = (got.float() - want.float()).abs().max().item() if got.shape == want.shape else "shape"
                return f"{name} mismatch (max abs err {err}, tol rtol={rtol} atol={atol * scale:.2e})"
        return None


def with_path_mode(mode, fn):
    """fn run with our ops' path mode forced to `mode` (restored afterwards)."""

    def run(*args):
        previous = sparseadapter_ext.set_path_mode(mode)
        try:
            return fn(*args)
        finally:
            sparseadapter_ext.set_path_mode(previous)

    return run


def candidates(cfg, mode):
    """(method, variant, fn, fn_args) for every timed call of one mode; torch.sparse's forward has two
    variants and the faster one is reported."""
    if mode == "fwd":
        found = [
            ("ours", None, cfg.ours_fwd, ()),
            ("dense", None, cfg.dense_fwd, ()),
            ("csr", "mm", cfg.csr_mm_fwd, ()),
            ("csr", "linear", cfg.csr_linear_fwd, ()),
            ("floor", None, cfg.floor_fwd, ()),
        ]
        ours = (cfg.ours_fwd, ())
    else:
        leaves = cfg.leaves()
        found = [
            ("ours", None, cfg.ours_fwdbwd, (leaves["x"],)),
            ("dense", None, cfg.dense_fwdbwd, (leaves["x"], leaves["w"])),
            ("csr", "mm", cfg.csr_fwdbwd, (leaves["x"], leaves["values"])),
        ]
        ours = (cfg.ours_fwdbwd, (leaves["x"],))
    found += [(method, None, with_path_mode(path, ours[0]), ours[1]) for method, path in FORCED_PATHS.items()]
    return found


def restore_measurements(decisions):
    """Puts auto mode's measurements back after a forced method ran: a forced call records its path in
    their place, and the next auto call would measure again (inside the timer) and might choose anew."""
    for d in decisions:
        _C.seed_path_decision(
            d["op"], d["device"], d["dtype"], d["dims"], d["tokens"], d["path"], d["ms_sparse"], d["ms_dense"]
        )


def chosen_paths(decisions):
    """The paths auto mode chose for the products of one config, by op and in->out features of its
    pattern (dims: out, in), e.g. "spmm 768->64 dense"."""
    return ", ".join(f"{d['op']} {d['dims'][1]}->{d['dims'][0]} {d['path']}" for d in decisions) or "n/a"


def measure_mode(cfg, mode, opts, label, sub, skip, notes):
    """Times every candidate in `opts.rounds` interleaved rounds (so load from other processes falls on
    all methods alike) and merges each candidate's blocks into one Measurement. Returns
    {method: (Measurement, variant)}."""
    todo, blocks = [], {}
    measured = [d for d in sparseadapter_ext.path_decisions() if d["source"] != "forced"]
    for method, variant, fn, fn_args in candidates(cfg, mode):
        if method in skip:
            continue
        try:  # one untimed call: torch.sparse CSR raises for dtypes it lacks (e.g. bf16 on CPU and CUDA)
            fn(*fn_args)
        except RuntimeError as err:
            notes[(method if variant is None else f"{method} ({variant})", mode)] = (
                str(err).strip().splitlines()[0][:160]
            )
            continue
        todo.append((method, variant, fn, fn_args))
    for r in range(opts.rounds):
        for method, variant, fn, fn_args in todo[r % len(todo) :] + todo[: r % len(todo)] if todo else []:
            timer = benchmark.Timer(
                stmt="fn(*fn_args)",
                globals={"fn": fn, "fn_args": fn_args},
                num_threads=opts.threads,
                timer=CLOCKS[opts.clock],
                label=label,
                sub_label=sub,
                description="torch.sparse" if method == "csr" else method,
            )
            blocks.setdefault((method, variant), []).append(
                timer.blocked_autorange(min_run_time=opts.min_run_time / opts.rounds)
            )
            if method in FORCED_PATHS:
                restore_measurements(measured)
    best = {}
    for (method, variant), ms in blocks.items():
        m = benchmark.Measurement.merge(ms)[0]
        if method not in best or m.median < best[method][0].median:
            best[method] = (m, variant)
    return best


def run(args, argv=None):
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")
    warnings.filterwarnings("ignore", message=".*Sparse invariant checks are implicitly disabled.*")

    header = machine_header(args)
    print("\n".join(header), flush=True)
    results, measurements, notes, failed = [], [], {}, False
    for n in args.tokens:
        for in_f, out_f in args.shapes:
            for sparsity in args.sparsity:
                cfg = Config(n, in_f, out_f, sparsity, dtype, device, args.seed)
                sub = f"{in_f}->{out_f} s={sparsity:g}"
                tag = f"{args.dtype} N={n} {args.device} threads={args.threads}"
                row = {"n": n, "shape": f"{in_f}→{out_f}", "sparsity": sparsity, "nnz": cfg.nnz}
                sparseadapter_ext.clear_path_decisions()  # measured again for this config (auto mode)
                cfg.ours_fwd()
                row[("path", "fwd")] = chosen_paths(sparseadapter_ext.path_decisions())
                problem = cfg.check()
                row[("path", "fwd+bwd")] = chosen_paths(sparseadapter_ext.path_decisions())
                print(f"path (auto) {sub} N={n}: {row[('path', 'fwd+bwd')]}", flush=True)
                if problem:
                    failed = True
                    row["fail"] = problem
                    print(f"FAIL {sub} N={n}: {problem}", flush=True)
                for mode in ("fwd", "fwd+bwd"):
                    label = f"SparseLinear {mode}, {tag}"
                    skip = set(METHODS) - set(args.methods)
                    skip |= {"ours", *FORCED_PATHS} if problem else set()
                    timed = measure_mode(cfg, mode, args, label, sub, skip, notes)
                    for method, (m, variant) in timed.items():
                        measurements.append(m)
                        row[(method, mode)] = m.median * 1e3
                        if variant:
                            row[("variant", mode)] = variant
                results.append(row)
                del cfg
    compare = benchmark.Compare(measurements)
    compare.trim_significant_figures()
    compare.print()
    for (method, mode), why in notes.items():
        print(f"n/a: {method} {mode}: {why}")
    found = tables(results, notes)
    if args.markdown:
        with open(args.markdown, "a", encoding="utf-8") as f:
            f.write(report(header, found))
    if args.record:
        save_record(args.record, "linear", argv, header, found)
    return 1 if failed else 0


def fmt(v):
    return "n/a" if v is None else f"{v:.4g}"


def ratio(a, b):
    return "n/a" if a is None or b is None else f"{a / b:.2f}x"


def tables(results, notes):
    """The forward and forward+backward tables; n/a reasons and failures below the second."""
    out = []
    for mode, title in (("fwd", "forward"), ("fwd+bwd", "forward+backward (grads to x and values)")):
        rows = []
        for r in results:
            ours, sparse, expand, dense, csr, floor = (r.get((m, mode)) for m in METHODS)
            csr_txt = fmt(csr) + (f" ({r[('variant', mode)]})" if csr is not None else "")
            ours_txt = "FAIL" if "fail" in r else fmt(ours)
            rows.append(
                [str(r["n"]), r["shape"], f"{r['sparsity']:g}", ours_txt, r[("path", mode)], fmt(sparse)]
                + [fmt(expand), fmt(dense), csr_txt, fmt(floor)]
                + [ratio(dense, ours), ratio(csr, ours), ratio(ours, floor)]
            )
        out.append(
            Table(
                title,
                ["N", "shape", "sparsity", "ours ms", "path (auto)", "sparse ms", "expand ms", "dense ms"]
                + ["torch.sparse ms", "floor ms", "dense/ours", "torch.sparse/ours", "ours/floor"],
                rows,
                caption=f"**{title}** — median ms; dense/ours and torch.sparse/ours > 1 mean ours is faster; "
                "ours/floor: ours over the memory floor",
            )
        )
    out[-1].notes = [f"- n/a: {method} {mode}: `{why}`" for (method, mode), why in notes.items()] + [
        f"- FAIL {r['shape']} s={r['sparsity']:g} N={r['n']}: {r['fail']}" for r in results if "fail" in r
    ]
    return out


def main(argv=None):
    return run(parse_args(argv), argv)


if __name__ == "__main__":
    sys.exit(main())
