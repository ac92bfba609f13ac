"""Sentences per second of a MiniLM classifier with sparse adapters at inference, on CPU.

The model: all-MiniLM-L6-v2 with a Houlsby adapter (bottleneck 64) and a LoRA adapter (rank 8, query and
value), both pruned at random to --sparsity, with random values (speed does not depend on training).
Rows (same base model, same inputs, timed in interleaved rounds; medians):

  eager sparse          Python, prepare_for_inference(path="auto"): the CSR kernel where it is faster
  eager merged-dense    Python, the same pruned adapters as dense matrices, LoRA merged (the baseline)
  eager dense adapters  Python, the same model with unpruned adapters (sparsity 0), LoRA merged
  eager no adapters     Python, the base model alone (the floor)
  adapters only: ...    the 12 Houlsby adapters of each form alone, on random hidden states
  C++ ...               the same exports run by sparseadapter_serve (TorchScript), timed per request
                        through its JSON-lines pipe, parsing included; needs --serve-binary

    sparseadapter bench serving --serve-binary build/sparseadapter_serve --markdown BENCH.md

With --adapters N ... it measures serving many adapters at once instead (bench/serving_adapters.py).
"""

import argparse
import json
import os
import subprocess
import tempfile

import torch

from .machine import machine_header
from .recording import add_record_option, save_record
from .table import Table, report
from .timing import time_interleaved

VARIANTS = ("sparse", "merged-dense", "dense adapters", "no adapters")


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="sparseadapter bench serving", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--batch", type=int, nargs="+", default=[1, 32], help="sentences per request")
    p.add_argument("--length", type=int, default=128, help="tokens per sentence")
    p.add_argument("--sparsity", type=float, default=0.8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=None, help="timed calls per row (default: 40 at batch 1, 7 above)")
    p.add_argument(
        "--serve-binary",
        default=os.environ.get("SPARSEADAPTER_SERVE"),
        help="sparseadapter_serve for the C++ rows (default: $SPARSEADAPTER_SERVE; none: no C++ rows)",
    )
    p.add_argument("--markdown", metavar="PATH", help="append the table to PATH")
    add_record_option(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny run for CI smoke tests")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.length, args.rounds = [2], 16, 2
    return args


def build_models(sparsity: float, seed: int):
    """{variant: inference-form model}; the sparse and dense-adapter models share their random values
    where both have them."""
    import transformers

    from ..adapters import SparseAdapterConfig, add_adapter, set_active_adapters
    from ..serving import prepare_for_inference
    from ..training.engine import resolve_model_path

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers.logging.set_verbosity_error()
    path = resolve_model_path("minilm")

    def with_adapters(s):
        torch.manual_seed(seed)
        model = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
        if s is None:
            return model.eval()
        add_adapter(model, "houlsby", SparseAdapterConfig(kind="houlsby", sparsity=s, pruner="random", seed=seed))
        add_adapter(
            model, "lora", SparseAdapterConfig(kind="lora", sparsity=s, pruner="random", seed=seed), activate=False
        )
        set_active_adapters(model, ["houlsby", "lora"])
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "sparseadapter" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        return model.eval()

    sparse = with_adapters(sparsity)
    models = {
        "sparse": prepare_for_inference(sparse, path="auto"),
        "merged-dense": prepare_for_inference(sparse, path="dense"),
        "dense adapters": prepare_for_inference(with_adapters(0.0), path="dense"),
        "no adapters": (with_adapters(None), None),
    }
    return {k: m for k, (m, _) in models.items()}, models["sparse"][1]


def bottleneck_adapters(model):
    from ..adapters import BottleneckAdapter

    return [m for m in model.modules() if isinstance(m, BottleneckAdapter)]


class CppServer:
    """sparseadapter_serve on one exported model, driven one request at a time."""

    def __init__(self, binary, model_file, threads, batch):
        self.proc = subprocess.Popen(
            [binary, "--model", model_file, "--threads", str(threads), "--batch-size", str(batch)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def __call__(self, line: str) -> dict:
        self.proc.stdin.write(line)
        self.proc.stdin.flush()
        answer = json.loads(self.proc.stdout.readline())
        if "error" in answer:
            raise RuntimeError(f"sparseadapter_serve: {answer['error']}")
        return answer

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def main(argv=None):
    if "--adapters" in (argv or []):  # many adapters on one model: mixed-adapter batches
        from .serving_adapters import main as many_adapters

        return many_adapters(argv)
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.device, args.dtype, args.min_run_time = "cpu", "float32", 0
    header = machine_header(args)[:-1] + [
        f"fp32 | {args.rounds or '40 (batch 1) / 7 (larger)'} interleaved rounds per row (bench/timing.py), "
        f"after one warm-up | seed {args.seed}"
    ]
    print("\n".join(header))
    models, plan = build_models(args.sparsity, args.seed)
    print(plan.describe())
    from ..serving import ServingModel, example_inputs, export_model, serving_metadata

    meta = serving_metadata(models["sparse"])
    exported, running = {}, []
    tmp = tempfile.TemporaryDirectory(prefix="sa-bench-serving-")
    results = {}
    try:
        for batch in args.batch:
            inputs = example_inputs(meta, batch, args.length, seed=batch)
            inputs[1].fill_(1)  # full-length sentences
            line = json.dumps({"input_ids": inputs[0].tolist()}) + "\n"
            calls = {f"eager {k}": (lambda m=ServingModel(m): m(*inputs)) for k, m in models.items()}
            hidden = torch.randn(batch, args.length, models["sparse"].config.hidden_size)
            for k in ("sparse", "merged-dense", "dense adapters"):
                calls[f"adapters only: {k}"] = lambda a=bottleneck_adapters(models[k]): [f(hidden) for f in a]
            if args.serve_binary:
                for k in ("sparse", "merged-dense", "dense adapters"):
                    if k not in exported:
                        exported[k] = os.path.join(tmp.name, f"{k.replace(' ', '-')}.pt")
                        export_model(models[k], exported[k], meta=meta)
                    server = CppServer(args.serve_binary, exported[k], args.threads, batch)
                    running.append(server)
                    calls[f"C++ {k}"] = lambda s=server: s(line)
            with torch.inference_mode():
                times = time_interleaved(
                    calls, rounds=args.rounds or (40 if batch == 1 else 7), min_run_time=0.0, threads=args.threads
                )
            results.update({(batch, name): t for name, t in times.items()})
            while running:
                running.pop().close()
    finally:
        for server in running:
            server.proc.kill()
        tmp.cleanup()
    found = [table(results, args)]
    text = report(header, found)
    print(text)
    if args.markdown:
        with open(args.markdown, "a", encoding="utf-8") as f:
            f.write(text)
    if args.record:
        save_record(args.record, "serving", argv, header, found)
    return 0


def table(results, args):
    caption = (
        f"sentences/s at length {args.length}, sparsity {args.sparsity}, {args.threads} thread(s); "
        "ratio = this row's speed / eager dense adapters' (adapters-only rows: / adapters only: dense "
        "adapters', the 12 Houlsby adapters run on random hidden states, without the model)"
    )
    names = list(dict.fromkeys(name for _, name in results))
    rows = []
    for name in names:
        cells = [name]
        for b in args.batch:
            group = "adapters only: " if name.startswith("adapters only") else "eager "
            t, base = results[(b, name)], results[(b, group + "dense adapters")]
            cells += [f"{b / t:.1f}", f"{base / t:.2f}x"]
        rows.append(cells)
    columns = [""] + [c for b in args.batch for c in (f"batch {b}: sent/s", "ratio")]
    return Table("sentences/s", columns, rows, caption=caption, align="l" + "r" * (len(columns) - 1))
