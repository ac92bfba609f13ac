"""Decoding speed of a causal LM with adapters: tokens per second with the KV cache, per row.

A step is one forward of the last generated token of every sequence through the model with its
KV cache, then the greedy choice of the next token (what `generate` does per token). Each timed
call prefills a fixed prompt of --prompt-length random tokens (untimed), then decodes --new-tokens
tokens one step at a time; the time per step is the call's decode time / --new-tokens. Rows
(--rows, default all, in this order; every row starts from the same base weights):

  base              the model alone (the floor every ratio is taken against)
  houlsby-80        ours, sparse Houlsby (the family's places, bottleneck 64) at 80%, fused kernel
  lora-80           ours, sparse LoRA (r 8, the family's targets) at 80%, not merged
  houlsby-dense     ours, dense Houlsby (sparsity 0: two nn.Linear per adapter)
  lora-dense        ours, dense LoRA (sparsity 0), not merged
  peft-lora         peft LoRA r 8 on the same targets, not merged ("peft not installed" without it)
  lora-80-merged    ours, the sparse LoRA merged into the base weights (prepare_for_inference)

Sparse rows are pruned at random (speed does not depend on which weights are kept); adapter values
are random. Sparse kernels run in the process's path mode (auto unless SPARSEADAPTER_PATH says).

Times: on CPU the thread's CPU time (time.thread_time) and the wall clock, both per step; with one
thread the CPU time is what the step costs, and on a shared machine it leaves out the time the
process waited for a core. On CUDA the wall clock, synchronized. Rows are timed in interleaved
rounds (every row once per round, rotating order) after one untimed call; medians are reported.

Models (--model): smollm2 (SmolLM2-135M-Instruct, bundled) or tiny (a random 2-layer Llama, for
smoke tests; what --quick uses).

    sparseadapter bench decode --markdown BENCH.md --json decode.jsonl
    sparseadapter bench decode --model tiny --batch 1 --rows base houlsby-80
"""

import argparse
import copy
import json
import os
import statistics
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch

from .machine import machine_header
from .recording import add_record_option, save_record
from .table import Table, report
from .training import error_text, peft_missing


@dataclass(frozen=True)
class Row:
    label: str
    method: str  # "base", "ours", "peft" or "merged"
    adapter: Dict = field(default_factory=dict)  # SparseAdapterConfig fields of an "ours"/"merged" row


ROWS: Dict[str, Row] = {
    "base": Row("base model alone", "base"),
    "houlsby-80": Row("ours sparse Houlsby r=64 80%", "ours", dict(kind="houlsby", bottleneck=64, sparsity=0.8)),
    "lora-80": Row("ours sparse LoRA r=8 80%", "ours", dict(kind="lora", bottleneck=8, sparsity=0.8)),
    "houlsby-dense": Row("ours dense Houlsby r=64", "ours", dict(kind="houlsby", bottleneck=64, sparsity=0.0)),
    "lora-dense": Row("ours dense LoRA r=8", "ours", dict(kind="lora", bottleneck=8, sparsity=0.0)),
    "peft-lora": Row("peft LoRA r=8", "peft"),
    "lora-80-merged": Row("ours sparse LoRA r=8 80%, merged", "merged", dict(kind="lora", bottleneck=8, sparsity=0.8)),
}
TINY_LLAMA = dict(
    vocab_size=1000,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)
MODELS = ("smollm2", "tiny")


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="sparseadapter bench decode", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", choices=MODELS, default=None, help="default smollm2 (tiny with --quick)")
    p.add_argument(
        "--rows",
        nargs="+",
        choices=list(ROWS),
        default=None,
        metavar="ROW",
        help=f"rows to run (default all): {', '.join(ROWS)}",
    )
    p.add_argument("--batch", type=int, nargs="+", default=None, help="sequences decoded together (default 1 16)")
    p.add_argument("--prompt-length", type=int, default=None, help="prompt tokens prefilled (default 32)")
    p.add_argument("--new-tokens", type=int, default=None, help="tokens decoded per timed call (default 16)")
    p.add_argument(
        "--device",
        nargs="+",
        choices=("cpu", "cuda"),
        default=None,
        help="default: cpu, and cuda too when torch sees a GPU",
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=None, help="timed calls per row, interleaved (default 5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--markdown", metavar="PATH", help="append the table to PATH")
    add_record_option(p)
    p.add_argument("--json", metavar="PATH", help="append one JSON object per (device, batch, row) to PATH")
    p.add_argument("--quick", action="store_true", help="tiny run for CI smoke tests")
    args = p.parse_args(argv)
    quick = args.quick
    defaults = dict(
        model="tiny" if quick else "smollm2",
        rows=list(ROWS),
        batch=[1, 2] if quick else [1, 16],
        prompt_length=8 if quick else 32,
        new_tokens=4 if quick else 16,
        rounds=1 if quick else 5,
        device=["cpu"] + (["cuda"] if torch.cuda.is_available() and not quick else []),
    )
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.rows = [r for r in ROWS if r in args.rows]
    args.device = list(dict.fromkeys(args.device))
    if "cuda" in args.device and not torch.cuda.is_available():
        p.error(f"--device cuda: CUDA is not available (torch {torch.__version__})")
    for name in ("prompt_length", "new_tokens", "rounds", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if min(args.batch) < 1:
        p.error("--batch must be at least 1")
    return args


def load_base(model_name: str, seed: int):
    """The base causal LM on CPU in fp32, eval mode; every row starts from a copy."""
    import transformers

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    if model_name == "smollm2":
        from ..training.engine import resolve_model_path

        model = transformers.AutoModelForCausalLM.from_pretrained(resolve_model_path("smollm2"))
    else:
        model = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**TINY_LLAMA))
    return model.eval()


def _randomize_adapter(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "sparseadapter" in name:
                p.copy_((torch.randn(p.shape, generator=g) * 0.02).to(p.device, p.dtype))


def lora_targets(model) -> List[str]:
    """The names (last component) of the linear layers our LoRA adapts in this model, for peft."""
    from ..adapters.slot import slots

    return sorted({name.rpartition(".")[2] for name, slot in slots(model).items() if slot.mode == "lora"})


def build_row(row_id: str, base, seed: int, targets: Optional[List[str]] = None):
    """A copy of `base` set up for the row, in eval mode."""
    row = ROWS[row_id]
    model = copy.deepcopy(base)
    if row.method == "peft":
        import peft

        config = peft.LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=32, lora_dropout=0.0, target_modules=targets)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = peft.get_peft_model(model, config, autocast_adapter_dtype=False)
        _randomize_lora_b(model, seed)
    elif row.method in ("ours", "merged"):
        from ..adapters import SparseAdapterConfig, add_adapter

        add_adapter(model, row_id.replace("-", "_"), SparseAdapterConfig(pruner="random", seed=seed, **row.adapter))
        _randomize_adapter(model, seed)
        if row.method == "merged":
            from ..serving import prepare_for_inference

            model, _ = prepare_for_inference(model, merge_lora=True, inplace=True)
    return model.eval()


def _randomize_lora_b(model, seed: int) -> None:
    """peft starts B at zero; random values like ours (speed does not depend on them)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_((torch.randn(p.shape, generator=g) * 0.02).to(p.device, p.dtype))


def make_decode(model, prompt: torch.Tensor, new_tokens: int, cuda: bool) -> Callable[[], tuple]:
    """A call: prefill `prompt` (untimed), then `new_tokens` greedy steps with the KV cache; returns
    (CPU seconds of this thread, wall seconds) per step."""

    def call():
        with torch.inference_mode():
            out = model(input_ids=prompt, use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            if cuda:
                torch.cuda.synchronize()
            cpu, wall = time.thread_time(), time.perf_counter()
            for _ in range(new_tokens):
                out = model(input_ids=token, cache=cache, use_cache=True)
                cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            if cuda:
                torch.cuda.synchronize()
            return (time.thread_time() - cpu) / new_tokens, (time.perf_counter() - wall) / new_tokens

    return call


def time_rows(calls: Dict[str, Callable[[], tuple]], rounds: int):
    """{row: (median CPU s, median wall s) per step}, and {row: error} for rows that raised (dropped
    from later rounds): one untimed call, then `rounds` interleaved timed calls."""
    names = list(calls)
    samples = {n: [] for n in names}
    errors = {}
    for r in range(rounds + 1):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            if name in errors:
                continue
            try:
                result = calls[name]()
            except Exception as err:  # noqa: BLE001 (reported in the table; the other rows go on)
                errors[name] = error_text(err)
                continue
            if r > 0:
                samples[name].append(result)
    medians = {
        n: (statistics.median(s[0] for s in v), statistics.median(s[1] for s in v))
        for n, v in samples.items()
        if v and n not in errors
    }
    return medians, errors


@dataclass
class Cell:
    device: str
    batch: int
    row: str
    cpu_s: Optional[float] = None  # per step; None on CUDA
    wall_s: Optional[float] = None
    reason: Optional[str] = None


def run_device(args, base, device: str) -> List[Cell]:
    cuda = device == "cuda"
    device_base = copy.deepcopy(base).to(device)
    missing_peft = peft_missing() if "peft-lora" in args.rows else None
    targets = None
    models, cells = {}, []
    reasons = {}
    for row_id in args.rows:
        if ROWS[row_id].method == "peft":
            if missing_peft:
                reasons[row_id] = missing_peft
                continue
            if targets is None:
                from ..adapters import SparseAdapterConfig, add_adapter

                probe = copy.deepcopy(base)
                add_adapter(probe, "probe", SparseAdapterConfig(kind="lora", bottleneck=8))
                targets = lora_targets(probe)
        try:
            models[row_id] = build_row(row_id, device_base, args.seed, targets)
        except Exception as err:  # noqa: BLE001
            reasons[row_id] = f"error: {error_text(err)}"
    vocab = base.config.vocab_size
    for batch in args.batch:
        g = torch.Generator().manual_seed(args.seed + batch)
        prompt = torch.randint(min(100, vocab - 1), vocab, (batch, args.prompt_length), generator=g).to(device)
        calls = {r: make_decode(m, prompt, args.new_tokens, cuda) for r, m in models.items()}
        medians, errors = time_rows(calls, args.rounds)
        for row_id in args.rows:
            cell = Cell(
                device,
                batch,
                row_id,
                reason=reasons.get(row_id) or (f"error: {errors[row_id]}" if row_id in errors else None),
            )
            if row_id in medians:
                cpu, wall = medians[row_id]
                cell.cpu_s, cell.wall_s = (None if cuda else cpu), wall
            cells.append(cell)
    return cells


def _time_of(cell: Cell) -> Optional[float]:
    """The time ratios are taken on: CPU time on CPU, wall clock on CUDA."""
    return cell.cpu_s if cell.cpu_s is not None else cell.wall_s


def table(cells: List[Cell], caption_text: str) -> Table:
    columns = ["device", "batch", "row", "tokens/s (wall)", "ms / step (CPU)", "ms / step (wall)", "time / base"]
    rows = []
    by_key = {(c.device, c.batch, c.row): c for c in cells}
    for c in cells:
        label = f"{ROWS[c.row].label} ({c.row})"
        if c.wall_s is None:
            rows.append([c.device, str(c.batch), label, c.reason or "no time", "—", "—", "—"])
            continue
        base = by_key.get((c.device, c.batch, "base"))
        ratio = f"{_time_of(c) / _time_of(base):.3f}" if base is not None and base.wall_s is not None else "n/a"
        cpu = f"{1e3 * c.cpu_s:.2f}" if c.cpu_s is not None else "—"
        rows.append([c.device, str(c.batch), label, f"{c.batch / c.wall_s:.1f}", cpu, f"{1e3 * c.wall_s:.2f}", ratio])
    return Table("tokens/s per row", columns, rows, caption=caption_text, align="lrlrrrr")


def caption(args, model_desc: str) -> str:
    return (
        f"**Decoding {model_desc} with the KV cache**: prompt {args.prompt_length} random tokens (prefilled, "
        f"untimed), then {args.new_tokens} greedy steps per timed call; medians over {args.rounds} interleaved "
        "rounds. A step decodes one token of every sequence, so tokens/s = batch / wall time per step. "
        "time / base = this row's time per step over the base model's, same device and batch: CPU time of the "
        "thread on CPU (the step's cost, without the waits of a shared machine), wall clock on CUDA. Adapter "
        "values are random; sparse rows pruned at random."
    )


def main(argv=None):
    import sparseadapter_ext

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    base = load_base(args.model, args.seed)
    cfg = base.config
    params = sum(p.numel() for p in base.parameters())
    model_desc = (
        f"{args.model} ({cfg.model_type}, {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
        f"{params / 1e6:.1f}M parameters, fp32)"
    )
    args.dtype, args.min_run_time = "float32", 0
    versions = f"transformers {__import__('transformers').__version__}"
    if not peft_missing():
        versions += f" | peft {__import__('peft').__version__}"
    gpu = "cuda" if "cuda" in args.device else "cpu"  # the gpu line when any row runs there
    header = machine_header(argparse.Namespace(**{**vars(args), "device": gpu}))[:-1] + [
        f"model {model_desc} | devices {' '.join(args.device)} | batch {' '.join(map(str, args.batch))} | "
        f"prompt {args.prompt_length} + {args.new_tokens} decoded tokens | {args.rounds} interleaved rounds | "
        f"seed {args.seed}",
        versions,
    ]
    print("\n".join(header), flush=True)
    cells = []
    for device in args.device:
        found = run_device(args, base, device)
        for c in found:
            shown = (
                f"{c.batch / c.wall_s:.1f} tok/s" + (f", {1e3 * c.cpu_s:.2f} ms CPU/step" if c.cpu_s else "")
                if c.wall_s is not None
                else c.reason
            )
            print(f"  {device} batch {c.batch:<3d} {c.row:16s} {shown}", flush=True)
        cells += found
    found = [table(cells, caption(args, model_desc))]
    text = report(header, found)
    print(text)
    if args.markdown:
        with open(args.markdown, "a", encoding="utf-8") as f:
            f.write(text)
    if args.record:
        save_record(args.record, "decode", argv, header, found)
    if args.json:
        with open(args.json, "a", encoding="utf-8") as f:
            for c in cells:
                base_cell = next((b for b in cells if (b.device, b.batch, b.row) == (c.device, c.batch, "base")), None)
                ratio = (
                    _time_of(c) / _time_of(base_cell)
                    if c.wall_s is not None and base_cell is not None and base_cell.wall_s is not None
                    else None
                )
                f.write(
                    json.dumps(
                        {
                            "model": args.model,
                            "device": c.device,
                            "batch": c.batch,
                            "row": c.row,
                            "cpu_ms_per_step": None if c.cpu_s is None else 1e3 * c.cpu_s,
                            "wall_ms_per_step": None if c.wall_s is None else 1e3 * c.wall_s,
                            "tokens_per_s": None if c.wall_s is None else c.batch / c.wall_s,
                            "time_over_base": ratio,
                            "reason": c.reason,
                            "threads": args.threads,
                            "path_mode": sparseadapter_ext.path_mode(),
                            "torch": torch.__version__,
                        },
                        sort_keys=True,
                    )
                    + "\n"
                )
    return 0
