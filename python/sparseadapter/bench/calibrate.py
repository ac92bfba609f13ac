"""Measure where our sparse kernel and a dense GEMM on the densified weight cross, per (in, out, tokens),
and write the table `sparseadapter.path_choice` reads (see there).

For each shape and token count: the dense F.linear time, then the sparse forward at rising densities
(random patterns); the crossover is the density where sparse/dense reaches 1, interpolated linearly
between the two grid points around it. The same for whole bottleneck adapters (`--adapter-shapes`,
hidden x bottleneck): the fused sparse adapter `x + up(relu(down(x)))` against its dense-layer twin.
Times are medians of torch.utils.benchmark blocked_autorange (bench/timing.py), under
torch.inference_mode, at --threads (default 1).

    sparseadapter bench calibrate                      # rewrites the shipped table for this device/dtype
    sparseadapter bench calibrate --output my.json     # then SPARSEADAPTER_CALIBRATION=my.json
"""

import argparse
import datetime
import platform

import torch
import torch.nn.functional as F

from ..path_choice import CrossoverTable, table_path
from ..sparse_linear import SparseLinear
from .machine import machine_header
from .recording import add_record_option, save_record
from .sparse_linear import DTYPES, parse_shape
from .table import Table
from .timing import time_interleaved

DEFAULT_SHAPES = ["384x64", "64x384", "768x64", "64x768", "768x256", "256x768", "384x8", "8x384"]
DEFAULT_ADAPTER_SHAPES = ["384x64", "768x64", "768x256", "1024x128"]
DEFAULT_DENSITIES = [0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0]


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="sparseadapter bench calibrate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32")
    p.add_argument("--shapes", type=parse_shape, nargs="+", default=[parse_shape(s) for s in DEFAULT_SHAPES])
    p.add_argument(
        "--adapter-shapes",
        type=parse_shape,
        nargs="*",
        default=[parse_shape(s) for s in DEFAULT_ADAPTER_SHAPES],
        help="hidden x bottleneck",
    )
    p.add_argument("--tokens", type=int, nargs="+", default=[128, 4096])
    p.add_argument("--densities", type=float, nargs="+", default=DEFAULT_DENSITIES)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--min-run-time", type=float, default=0.15, help="seconds of timing per measurement")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", help="table to write (default: the shipped table for this device and dtype)")
    add_record_option(p)
    p.add_argument("--quick", action="store_true", help="tiny run for CI smoke tests")
    args = p.parse_args(argv)
    if args.quick:
        args.shapes, args.tokens, args.densities, args.min_run_time = [(48, 16)], [32], [0.1, 1.0], 0.01
        args.adapter_shapes = [(48, 16)]
    if any(not 0.0 < d <= 1.0 for d in args.densities):
        p.error("--densities must lie in (0, 1]")
    args.densities = sorted(set(args.densities))
    return args


def median_time(fn, args):
    """Median seconds of one inference call of fn (CUDA: synchronized)."""
    with torch.inference_mode():
        return time_interleaved(
            {"fn": fn}, rounds=1, min_run_time=args.min_run_time, threads=args.threads, cuda=args.device == "cuda"
        )["fn"]


def crossover_density(densities, ratios):
    """The density where sparse_time / dense_time first reaches 1 (linear between grid points)."""
    if ratios[0] >= 1.0:
        return 0.0
    for (d0, r0), (d1, r1) in zip(zip(densities, ratios), zip(densities[1:], ratios[1:])):
        if r1 >= 1.0:
            return d0 + (d1 - d0) * (1.0 - r0) / (r1 - r0)
    return 1.0


def measure_adapter(d, r, tokens, args, dtype, device):
    """Like measure, for the whole adapter: fused sparse against the same adapter with dense layers."""
    from ..adapters import BottleneckAdapter

    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(tokens, d, generator=g).to(device, dtype)
    dense_adapter = BottleneckAdapter(d, d, r).to(device, dtype).eval()
    dense = median_time(lambda: dense_adapter(x, x), args)
    ratios = []
    for density in args.densities:
        sparse = BottleneckAdapter(d, d, r).to(device, dtype).eval()
        for name in ("down", "up"):
            layer = getattr(dense_adapter, name)
            mask = torch.rand(layer.weight.shape, generator=g) < density
            setattr(sparse, name, SparseLinear.from_dense(layer.weight.detach(), mask.to(device), layer.bias.detach()))
        ratios.append(median_time(lambda: sparse(x, x), args) / dense)
    return dense, ratios


def measure(in_f, out_f, tokens, args, dtype, device):
    g = torch.Generator().manual_seed(args.seed)
    w = torch.randn(out_f, in_f, generator=g) * in_f**-0.5
    x = torch.randn(tokens, in_f, generator=g).to(device, dtype)
    bias = torch.zeros(out_f, device=device, dtype=dtype)
    w_dense = w.to(device, dtype)
    dense = median_time(lambda: F.linear(x, w_dense, bias), args)
    ratios = []
    for density in args.densities:
        mask = torch.rand(out_f, in_f, generator=g) < density
        layer = SparseLinear.from_dense(w.to(device, dtype), mask.to(device), bias)
        ratios.append(median_time(lambda: layer(x), args) / dense)
    return dense, ratios


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    args.rounds, args.markdown = 1, None
    header = machine_header(args)
    for line in header:
        print(line)
    print(
        f"\n{'kind':>8} {'in x out':>10} {'tokens':>7} {'dense us':>9}  sparse/dense time at density "
        f"{' '.join(f'{d:.2f}' for d in args.densities)}  -> crossover"
    )
    points, rows = [], []
    grid = [("linear", s, measure) for s in args.shapes] + [
        ("adapter", s, measure_adapter) for s in args.adapter_shapes
    ]
    for kind, (in_f, out_f), fn in grid:
        for tokens in args.tokens:
            dense, ratios = fn(in_f, out_f, tokens, args, dtype, args.device)
            cross = crossover_density(args.densities, ratios)
            points.append(
                {
                    "kind": kind,
                    "in_features": in_f,
                    "out_features": out_f,
                    "tokens": tokens,
                    "crossover_density": round(cross, 3),
                }
            )
            cells = [kind, f"{in_f}x{out_f}", str(tokens), f"{dense * 1e6:.1f}", *(f"{r:.2f}" for r in ratios)]
            rows.append(cells + [f"{cross:.3f}"])
            print(
                f"{kind:>8} {cells[1]:>10} {tokens:>7} {cells[3]:>9}  {' '.join(cells[4:])}  -> {cross:.3f}", flush=True
            )
    meta = {
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "machine": f"{platform.machine()} {torch.backends.cpu.get_cpu_capability()}",
        "threads": str(args.threads),
        "command": "sparseadapter bench calibrate",
    }
    if args.device == "cuda":
        meta["machine"] = torch.cuda.get_device_name()
    table = CrossoverTable(args.device, args.dtype, points, meta)
    out = args.output or table_path(args.device, dtype)
    with open(out, "w") as f:
        f.write(table.to_json() + "\n")
    print(f"\nwrote {out}")
    if args.record:
        save_record(args.record, "calibrate", argv, header, [crossover_table(args.densities, rows)])
    return 0


def crossover_table(densities, rows):
    columns = ["kind", "in x out", "tokens", "dense us", *(f"{d:.2f}" for d in densities), "crossover"]
    caption = "sparse/dense time at each density (columns); crossover = the density where it reaches 1"
    return Table(
        "crossover density per shape and token count",
        columns,
        rows,
        caption=caption,
        align="l" + "r" * (len(columns) - 1),
    )
