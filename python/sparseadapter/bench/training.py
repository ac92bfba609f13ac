"""One training step of a BERT-shaped sequence classifier (2 labels) with each way of fine-tuning it,
on CPU or a GPU: median time per step, trainable parameters, memory and the sparse kernels' paths.

Step = optimizer.zero_grad() + forward + loss.backward() + AdamW step on the trainable parameters,
a batch of --batch random sequences of --length tokens. Rows (--rows, default all, in this order):

  full                  full fine-tuning: every parameter trainable
  peft-lora             peft LoRA r=8 on query and value ("peft not installed" when `import peft` fails)
  houlsby-dense         ours, dense Houlsby r=64 (sparsity 0, nn.Linear layers)
  houlsby-80            ours, sparse Houlsby r=64 at 80%, each adapter one fused kernel
  houlsby-80-separate   the same adapter run layer by layer (BottleneckAdapter.fused = False)
  houlsby-90            ours, sparse Houlsby r=64 at 90%
  lora-80               ours, sparse LoRA r=8 at 80% on query and value
  pfeiffer-80           ours, sparse Pfeiffer r=64 at 80%
  large-sparse          ours, Large-Sparse Houlsby: r=64 widened 4x to r=256 at 75% (the kept weights
                        of a dense r=64 adapter)

Sparse rows are pruned at random (no data needed). Every row starts from the same base weights.

Models (--model): minilm (all-MiniLM-L6-v2, bundled; the default on CPU), bert-base (12 layers, hidden
768, 12 heads, intermediate 3072, vocab 30522, random init from transformers.BertConfig, nothing
downloaded; the default with --device cuda) and tiny (2 layers, hidden 64: what --quick uses).

Precisions (--precision, several allowed; default fp32 on CPU, `bf16 autocast` on CUDA):
  fp32      fp32 weights, no autocast
  bf16      the model's weights cast to bfloat16 before the adapter is added (the adapter is bf16 too;
            peft's LoRA is kept in bf16: autocast_adapter_dtype=False)
  autocast  fp32 weights, forward under torch.autocast(device, torch.bfloat16)

Timing: all rows of a precision are built first; each row takes one untimed step right after it is
built (peak memory, kernel paths), then --warmup - 1 more untimed steps and --rounds timed steps, in
interleaved rounds (every row once per round, rotating order; CUDA synchronized before and after each
step); medians are reported. A row that raises is reported with its error instead of numbers and the
others go on (the exit status stays 0). --inject-failure ROW makes ROW raise at its first step, to
test that reporting.

Memory: on CUDA, the peak of torch.cuda.max_memory_allocated over the row's first step (reset before
it) less what was allocated before the row was built: its weights, gradients, AdamW state and
activations. On CPU, the bytes of the trainable parameters with their gradients and AdamW state
after a step, and apart the CSR index buffers of a sparse adapter.

Kernel paths: the op calls of the row's first step, counted by the path they ran ("dense 48 / sparse 0",
from sparseadapter_ext.path_decisions(); "n/a" without it). In auto mode that step also measures
each new problem (see sparseadapter_ext.set_path_mode).

    sparseadapter bench training --markdown BENCH.md                 # CPU, MiniLM, fp32
    sparseadapter bench training --device cuda --batch 128 --length 256 --precision bf16 autocast
    sparseadapter bench training --model bert-base --batch 2 --length 16 --rows houlsby-dense houlsby-80
"""

import argparse
import collections
import copy
import gc
import os
import statistics
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional

import torch

import sparseadapter_ext

from .machine import machine_header
from .recording import add_record_option, save_record
from .table import Table, report
from .timing import time_calls_interleaved


@dataclass(frozen=True)
class Row:
    label: str
    method: str  # "full", "peft" or "ours"
    adapter: Dict = field(default_factory=dict)  # SparseAdapterConfig fields of an "ours" row
    fused: bool = True


ROWS: Dict[str, Row] = {
    "full": Row("full fine-tuning", "full"),
    "peft-lora": Row("peft LoRA r=8", "peft"),
    "houlsby-dense": Row("ours dense Houlsby r=64", "ours", dict(kind="houlsby", bottleneck=64, sparsity=0.0)),
    "houlsby-80": Row("ours sparse Houlsby r=64 80%", "ours", dict(kind="houlsby", bottleneck=64, sparsity=0.8)),
    "houlsby-80-separate": Row(
        "ours sparse Houlsby r=64 80%, layer by layer",
        "ours",
        dict(kind="houlsby", bottleneck=64, sparsity=0.8),
        fused=False,
    ),
    "houlsby-90": Row("ours sparse Houlsby r=64 90%", "ours", dict(kind="houlsby", bottleneck=64, sparsity=0.9)),
    "lora-80": Row("ours sparse LoRA r=8 80%", "ours", dict(kind="lora", bottleneck=8, sparsity=0.8)),
    "pfeiffer-80": Row("ours sparse Pfeiffer r=64 80%", "ours", dict(kind="pfeiffer", bottleneck=64, sparsity=0.8)),
    "large-sparse": Row(
        "ours Large-Sparse Houlsby r=256 75%", "ours", dict(kind="houlsby", bottleneck=64, large_sparse=4, sparsity=0.0)
    ),
}
PEFT_LORA = dict(r=8, lora_alpha=32, lora_dropout=0.0, target_modules=["query", "value"])
PRECISIONS = ("fp32", "bf16", "autocast")
BERT_SHAPES = {
    "bert-base": dict(
        vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072
    ),
    "tiny": dict(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128),
}
MODELS = ("minilm", *BERT_SHAPES)
LR = 1e-4


def baseline_of(row_id: str, timed: Dict[str, float]) -> Optional[str]:
    """The row a row's time is compared with: peft LoRA for our sparse LoRA when peft's row has a
    time, else dense Houlsby; None when that row has no time."""
    if row_id == "lora-80" and "peft-lora" in timed:
        return "peft-lora"
    return "houlsby-dense" if "houlsby-dense" in timed else None


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="sparseadapter bench training", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument(
        "--model", choices=MODELS, default=None, help="default: minilm on cpu, bert-base on cuda, tiny with --quick"
    )
    p.add_argument(
        "--rows",
        nargs="+",
        choices=list(ROWS),
        default=None,
        metavar="ROW",
        help=f"rows to run (default all): {', '.join(ROWS)}",
    )
    p.add_argument(
        "--precision",
        nargs="+",
        choices=PRECISIONS,
        default=None,
        help="default: fp32 on cpu, bf16 autocast on cuda, fp32 autocast with --quick",
    )
    p.add_argument("--batch", type=int, default=None, help="default: 32 on cpu, 128 on cuda, 2 with --quick")
    p.add_argument("--length", type=int, default=None, help="default: 64 on cpu, 256 on cuda, 8 with --quick")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="timed steps per row, interleaved (default: 8 on cpu, 5 on cuda, 1 with --quick)",
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="untimed steps per row, the first right after it is built (default 2, 1 with --quick)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--markdown", metavar="PATH", help="append the table to PATH")
    add_record_option(p)
    p.add_argument("--quick", action="store_true", help="tiny run for CI smoke tests")
    p.add_argument(
        "--inject-failure",
        metavar="ROW",
        choices=list(ROWS),
        default=None,
        help="make ROW raise at its first step (tests the error reporting)",
    )
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        p.error(
            f"--device cuda: CUDA is not available (torch {torch.__version__}, "
            + ("built without CUDA" if torch.version.cuda is None else f"CUDA {torch.version.cuda}, no GPU visible")
            + ")"
        )
    quick = args.quick
    defaults = dict(
        model="tiny" if quick else "bert-base" if cuda else "minilm",
        precision=["fp32", "autocast"] if quick else ["bf16", "autocast"] if cuda else ["fp32"],
        batch=2 if quick else 128 if cuda else 32,
        length=8 if quick else 256 if cuda else 64,
        rounds=1 if quick else 5 if cuda else 8,
        warmup=1 if quick else 2,
        rows=list(ROWS),
    )
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.precision = list(dict.fromkeys(args.precision))
    args.rows = [r for r in ROWS if r in args.rows]
    for name in ("batch", "length", "rounds", "warmup", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    return args


def load_base(model_name: str, seed: int):
    """The base classifier (2 labels) on CPU in fp32, seeded; every row starts from a copy."""
    import transformers

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    if model_name == "minilm":
        from ..training.engine import resolve_model_path

        return transformers.AutoModelForSequenceClassification.from_pretrained(
            resolve_model_path("minilm"), num_labels=2
        )
    config = transformers.BertConfig(num_labels=2, **BERT_SHAPES[model_name])
    return transformers.AutoModelForSequenceClassification.from_config(config)


def peft_missing() -> Optional[str]:
    """Why the peft row cannot run, or None."""
    try:
        import peft  # noqa: F401
    except ImportError:
        return "peft not installed"
    except Exception as err:  # noqa: BLE001 (a broken install is a reason too)
        return f"peft import failed: {error_text(err)}"
    return None


def build_row(row_id: str, base, seed: int):
    """A copy of `base` (already on its device and dtype) set up for the row, in train mode."""
    row = ROWS[row_id]
    model = copy.deepcopy(base)
    if row.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    elif row.method == "peft":
        import peft

        config = peft.LoraConfig(task_type="SEQ_CLS", **PEFT_LORA)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = peft.get_peft_model(model, config, autocast_adapter_dtype=False)
    else:
        from ..adapters import BottleneckAdapter, SparseAdapterConfig, add_adapter

        add_adapter(model, row_id.replace("-", "_"), SparseAdapterConfig(pruner="random", seed=seed, **row.adapter))
        for module in model.modules():
            if isinstance(module, BottleneckAdapter):
                module.fused = row.fused
    return model.train()


def make_step(model, optimizer, batch, precision: str, device_type: str) -> Callable[[], None]:
    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision == "autocast"):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()

    return step


def injected_failure():
    raise RuntimeError("injected by --inject-failure\n(a second line the table leaves out)")


def trainable_bytes(model, optimizer):
    """(trainable parameters + their gradients + AdamW state, CSR index buffers of sparse adapters), in bytes."""
    trainable, index = 0, 0
    for p in model.parameters():
        if p.requires_grad:
            state = optimizer.state.get(p, {})
            trainable += sum(
                t.numel() * t.element_size()
                for t in [p, p.grad, *state.values()]
                if isinstance(t, torch.Tensor) and t.dim() > 0
            )
    for name, b in model.named_buffers():
        if "sparseadapter" in name:
            index += b.numel() * b.element_size()
    return trainable, index


def path_calls() -> Optional[Dict[tuple, tuple]]:
    """{problem: (path, calls)} from sparseadapter_ext.path_decisions(), or None where the extension
    does not have it."""
    fn = getattr(sparseadapter_ext, "path_decisions", None)
    if fn is None:
        return None
    return {(d["op"], d["device"], d["dtype"], tuple(d["dims"]), d["tokens"]): (d["path"], d["calls"]) for d in fn()}


def calls_by_path(before: Optional[Dict[tuple, tuple]], after: Optional[Dict[tuple, tuple]]) -> Optional[Counter]:
    """Calls per path between two reads of path_calls() (a problem whose path changed counts afresh)."""
    if before is None or after is None:
        return None
    counts = collections.Counter()
    for problem, (path, calls) in after.items():
        old_path, old_calls = before.get(problem, (path, 0))
        counts[path] += calls - old_calls if old_path == path else calls
    return +counts


def summarize_paths(counts: Optional[Counter]) -> str:
    """'dense 48 / sparse 0': how many op calls took each path."""
    if counts is None:
        return "n/a"
    if not counts:
        return "none"
    return " / ".join(f"{name} {counts.get(name, 0)}" for name in ("dense", "sparse"))


def error_text(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    first = lines[0] if lines else ""
    return f"{type(err).__name__}: {first[:200]}" if first else type(err).__name__


@dataclass
class Result:
    precision: str
    ms: Optional[float] = None
    reason: Optional[str] = None  # why there is no time: an error or a missing package
    trainable: Optional[int] = None
    memory: str = "—"
    paths: str = "—"


def run_precision(args, base, precision: str, batch) -> Dict[str, Result]:
    cuda = args.device == "cuda"
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    results = {r: Result(precision) for r in args.rows}
    device_base = copy.deepcopy(base).to(args.device, dtype)
    steps: Dict[str, Callable[[], None]] = {}
    missing_peft = peft_missing() if "peft-lora" in args.rows else None
    for row_id in args.rows:
        result = results[row_id]
        if ROWS[row_id].method == "peft" and missing_peft:
            result.reason = missing_peft
            continue
        try:
            if cuda:
                torch.cuda.synchronize()
                before_bytes = torch.cuda.memory_allocated()
            model = build_row(row_id, device_base, args.seed)
            params = [p for p in model.parameters() if p.requires_grad]
            result.trainable = sum(p.numel() for p in params)
            optimizer = torch.optim.AdamW(params, lr=LR)
            step = (
                injected_failure
                if row_id == args.inject_failure
                else make_step(model, optimizer, batch, precision, args.device)
            )
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            calls_before = path_calls()
            step()  # the first untimed step: memory and kernel paths
            if cuda:
                torch.cuda.synchronize()
                result.memory = f"{(torch.cuda.max_memory_allocated() - before_bytes) / 2**20:.0f}"
            else:
                train_b, index_b = trainable_bytes(model, optimizer)
                result.memory = f"{train_b / 2**20:.2f}" + (f" (+{index_b / 2**20:.2f} index)" if index_b else "")
            result.paths = summarize_paths(calls_by_path(calls_before, path_calls()))
            steps[row_id] = step
        except Exception as err:  # noqa: BLE001 (a failed row is reported; the others go on)
            result.reason = f"error: {error_text(err)}"
        finally:
            model = optimizer = step = params = None  # a failed row's tensors go now
    samples, errors = time_calls_interleaved(steps, rounds=args.rounds, warmup=args.warmup - 1, cuda=cuda)
    for row_id, err in errors.items():
        results[row_id].reason = f"error: {error_text(err)}"
    for row_id, times in samples.items():
        if row_id not in errors:
            results[row_id].ms = 1e3 * statistics.median(times)
    del steps, samples, errors, device_base
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return results


def format_ms(ms: float) -> str:
    return f"{ms:.0f}" if ms >= 1000 else f"{ms:.1f}" if ms >= 100 else f"{ms:.2f}"


def row_cell(row_id: str) -> str:
    return f"{ROWS[row_id].label} ({row_id})"


def table(args, results: Dict[str, Dict[str, Result]], caption_text: str) -> Table:
    memory_head = "peak MiB" if args.device == "cuda" else "trainable state MiB"
    columns = ["row", "precision", "ms / step", "baseline / this", "trainable params", memory_head, "kernel paths"]
    rows = []
    for precision in args.precision:
        timed = {r: res.ms for r, res in results[precision].items() if res.ms is not None}
        for row_id in args.rows:
            res = results[precision][row_id]
            trainable = f"{res.trainable:,}" if res.trainable is not None else "—"
            if res.ms is None:
                rows.append([row_cell(row_id), precision, res.reason or "no time", "—", trainable, "—", "—"])
                continue
            base = baseline_of(row_id, timed)
            ratio = f"{timed[base] / res.ms:.2f}x vs {base}" if base else "n/a"
            rows.append([row_cell(row_id), precision, format_ms(res.ms), ratio, trainable, res.memory, res.paths])
    return Table("training step", columns, rows, caption=caption_text)


def caption(args, model_desc: str) -> str:
    memory = (
        "peak MiB = torch.cuda.max_memory_allocated over the row's first step (reset before it) less what "
        "was allocated before the row was built: its weights, gradients, AdamW state and activations"
        if args.device == "cuda"
        else "trainable state MiB = the trainable parameters with their gradients and AdamW state after a step "
        "(+ the CSR index buffers of a sparse adapter)"
    )
    return (
        f"**{model_desc} training step on {args.device}** (batch {args.batch} x length {args.length}, AdamW on the "
        f"trainable parameters): median ms per step over {args.rounds} interleaved rounds; baseline / this = the "
        "baseline row's median over this row's, same precision (> 1: faster than the baseline); baseline: "
        "peft-lora for ours sparse LoRA when the peft row has a time, houlsby-dense (ours dense Houlsby r=64) "
        f"for every other row; {memory}; kernel paths = the decisions of sparseadapter_ext.path_decisions() in "
        "the row's first step, by path (n/a: this build does not report them). Precisions: fp32; bf16 = "
        "weights cast to bfloat16; autocast = fp32 weights, forward under torch.autocast(bfloat16)."
    )


def tf32() -> str:
    with warnings.catch_warnings():  # newer torch prefers fp32_precision and may warn on the old flag
        warnings.simplefilter("ignore")
        try:
            return "allowed" if torch.backends.cuda.matmul.allow_tf32 else "off"
        except Exception:  # noqa: BLE001
            return "unknown"


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    base = load_base(args.model, args.seed)
    cfg = base.config
    model_desc = (
        f"{args.model} ({cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, {cfg.num_attention_heads} "
        f"heads, intermediate {cfg.intermediate_size}, vocab {cfg.vocab_size})"
    )
    args.dtype, args.min_run_time = " ".join(args.precision), 0
    extra = [
        f"model {model_desc} | attention {getattr(cfg, '_attn_implementation', None) or 'default'} | "
        f"precision {' '.join(args.precision)} | batch {args.batch} x length {args.length} | AdamW lr {LR:g} | "
        f"{args.warmup} untimed + {args.rounds} timed steps per row, interleaved | seed {args.seed}"
    ]
    if cuda:
        extra.append(
            f"sparseadapter_ext CUDA kernels: {'yes' if sparseadapter_ext.has_cuda_kernels() else 'no'} | "
            f"TF32 matmul {tf32()} | "
            f"path_decisions: {'yes' if hasattr(sparseadapter_ext, 'path_decisions') else 'n/a'}"
        )
    header = machine_header(args)[:-1] + extra
    print("\n".join(header), flush=True)

    g = torch.Generator().manual_seed(args.seed)
    vocab = cfg.vocab_size
    low = 1000 if vocab > 2000 else 0  # past BERT's special tokens where the vocabulary has them
    batch = {
        "input_ids": torch.randint(low, vocab, (args.batch, args.length), generator=g),
        "attention_mask": torch.ones(args.batch, args.length, dtype=torch.long),
        "labels": torch.randint(0, 2, (args.batch,), generator=g),
    }
    batch = {k: v.to(args.device) for k, v in batch.items()}
    if cuda:  # cuBLAS handles and workspaces before the first row's memory is measured
        for dtype in (torch.float32, torch.bfloat16):
            w = torch.randn(64, 64, device="cuda", dtype=dtype, requires_grad=True)
            (w @ w).sum().backward()
        del w
        torch.cuda.synchronize()

    results = {}
    for precision in args.precision:
        results[precision] = run_precision(args, base, precision, batch)
        for row_id, res in results[precision].items():
            shown = format_ms(res.ms) + " ms" if res.ms is not None else res.reason
            print(f"  {precision:8s} {row_id:20s} {shown}", flush=True)
    found = [table(args, results, caption(args, model_desc))]
    text = report(header, found)
    print(text)
    if args.markdown:
        with open(args.markdown, "a", encoding="utf-8") as f:
            f.write(text)
    if args.record:
        save_record(args.record, "training", argv, header, found)
    return 0
