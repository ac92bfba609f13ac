"""Generation tasks (source -> target): the causal-LM and seq2seq objectives, prompts, training batches,
decoding, ROUGE evaluation, and the two baselines every ROUGE table is shown with.

Causal LM (decoder-only models): each example is one sequence, prompt + target + eos. The prompt is the
task's instruction and the source, wrapped in the tokenizer's chat template when it has one (the user
turn; the target is the assistant's answer). The loss is on the target tokens only: the prompt's labels
are -100. Batches are padded on the left, so every target ends at the last position and the logits are
computed only over the last (longest target + 1) positions (`logits_to_keep`): the vocabulary projection
of the prompt, most of the sequence, is never made. Position ids count real tokens only.

Seq2seq (encoder-decoder models): instruction and source in, target out (the model's own loss).

Sources are cut to max_length tokens, fitted (engine.fit_max_length) so that the prompt and the answer
(target or generated tokens) fit the model's positions. Training batches take the run's micro-batch path
(--grad-accumulation) like any other. Evaluation generates from the prompt (greedy, or beam search with
num_beams > 1) under the run's --precision autocast and scores ROUGE-1/2/L F1 against the targets.
Beside it: the lead baseline (the source's first sentence) and the base model zero-shot (the adapter
switched off, the same prompt, decoding and precision), so a table shows what the adapter adds.
"""

import contextlib
import inspect
import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from .. import adapters as sa_adapters
from .batching import EncodedSplit
from .config import LM_OBJECTIVES, TrainConfig
from .data.example import DataError, Example
from .data.files import read_text
from .data.generation_tables import lead_sentence, read_generation_table
from .data.tables import read_table, table_columns
from .engine import (
    autocast,
    fit_max_length,
    load_examples,
    load_saved,
    position_limit,
    resolve_device,
    set_threads,
)
from .metrics import rouge
from .progress import progress_bar
from .tasks import TaskSpec

# Decoder-only families whose configs may not name a *ForCausalLM architecture (a bare base model).
CAUSAL_TYPES = ("llama", "qwen2", "mistral", "gemma", "phi3", "gpt2")
PLACEHOLDER = "<<<sparseadapter:source>>>"
DECODINGS = ("greedy", "beam", "sample")


# ------------------------------------------------------------------------------------------- objectives


def model_kind(model_path: str) -> str:
    """ "seq2seq" (an encoder-decoder), "causal-lm" (a decoder-only LM) or "encoder", from the config."""
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(model_path)
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read the model config of {model_path}: {err}") from None
    if getattr(config, "is_encoder_decoder", False):
        return "seq2seq"
    architectures = getattr(config, "architectures", None) or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures) or config.model_type in CAUSAL_TYPES:
        return "causal-lm"
    return "encoder"


def resolve_objective(cfg: TrainConfig, task: TaskSpec, model_path: Optional[str]) -> str:
    """The training objective: cfg.objective checked against the task and the model, or inferred from them."""
    wanted = cfg.objective
    if not task.generation:
        natural = "regression" if task.is_regression else "classification"
        if wanted in LM_OBJECTIVES:
            raise ValueError(
                f"objective {wanted} trains text generation, and task {task.name} is "
                f"{natural}; generation tasks are bbc-headlines, or custom files with source "
                "and target columns"
            )
        if wanted is not None and wanted != natural:
            raise ValueError(
                f"task {task.name} is {natural}, not {wanted} (custom files: pass --regression "
                "or --objective regression for real-valued labels)"
            )
        return natural
    if wanted in ("classification", "regression"):
        raise ValueError(
            f"task {task.name} generates text (source -> target); its objective is causal-lm or seq2seq, not {wanted}"
        )
    kind = model_kind(model_path)
    if kind == "encoder":
        raise ValueError(
            f"task {task.name} generates text, and model {cfg.model} is an encoder without a "
            "language-model head; use a causal or seq2seq LM, e.g. --model smollm2"
        )
    if wanted == "seq2seq" and kind != "seq2seq":
        raise ValueError(
            f"objective seq2seq needs an encoder-decoder model; {cfg.model} is decoder-only (use --objective causal-lm)"
        )
    if wanted == "causal-lm" and kind != "causal-lm":
        raise ValueError(
            f"objective causal-lm needs a decoder-only model; {cfg.model} is an encoder-decoder "
            "(use --objective seq2seq)"
        )
    return kind


def objective_of(model: nn.Module) -> str:
    return "seq2seq" if getattr(model.config, "is_encoder_decoder", False) else "causal-lm"


def load_lm(model_path: str, objective: str, seed: int):
    """Tokenizer and language model (AutoModelForCausalLM or AutoModelForSeq2SeqLM), with a pad token."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_path)
    torch.manual_seed(seed)
    cls = transformers.AutoModelForSeq2SeqLM if objective == "seq2seq" else transformers.AutoModelForCausalLM
    model = cls.from_pretrained(model_path)
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ValueError(f"{model_path}: the tokenizer has no pad or eos token to pad batches with")
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.eos_token_id is None:
        raise ValueError(f"{model_path}: the tokenizer has no eos token to end targets with")
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    gen = model.generation_config
    if gen.pad_token_id is None:
        gen.pad_token_id = tokenizer.pad_token_id
    if gen.eos_token_id is None:
        gen.eos_token_id = tokenizer.eos_token_id
    return tokenizer, model


# ---------------------------------------------------------------------------------------------- prompts


class Prompter:
    """Token ids of the prompt for a source and of the training target, for one objective.

    Causal LM with a chat template: the template's rendering of one user turn
    "<instruction>\\n\\n<source>" with the generation prompt (the assistant's turn opened); without
    one: "<instruction>\\n\\n<source>\\n\\nAnswer:" and a space before the target. Sources are cut to
    `max_source` tokens (before the template is applied, so the instruction and the template's own
    tokens always survive); targets to `max_target` tokens including the closing eos.
    """

    def __init__(
        self,
        tokenizer,
        objective: str,
        instruction: Optional[str],
        chat_template: bool,
        max_source: int,
        max_target: int,
    ):
        self.tokenizer, self.objective = tokenizer, objective
        self.instruction = instruction or None
        self.max_source, self.max_target = max_source, max_target
        self.eos = tokenizer.eos_token_id
        self.uses_chat_template = bool(
            objective == "causal-lm" and chat_template and getattr(tokenizer, "chat_template", None)
        )
        self.target_prefix = ""
        if objective == "causal-lm":
            if self.uses_chat_template:
                content = f"{self.instruction}\n\n{PLACEHOLDER}" if self.instruction else PLACEHOLDER
                text = tokenizer.apply_chat_template(
                    [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
                )
                parts = text.split(PLACEHOLDER)
                if len(parts) != 2:
                    raise ValueError(
                        "the tokenizer's chat template does not render the user message once (pass --no-chat-template)"
                    )
                prefix, suffix = parts
                self.prefix = self._ids(prefix)
            else:
                prefix = f"{self.instruction}\n\n" if self.instruction else ""
                suffix, self.target_prefix = "\n\nAnswer:", " "
                bos = tokenizer.bos_token_id
                adds_bos = bos is not None and tokenizer("a").input_ids[:1] == [bos]
                self.prefix = ([bos] if adds_bos else []) + self._ids(prefix)
            self.suffix = self._ids(suffix)
        else:
            # the tokenizer's own special tokens around the source (T5's </s>, BART's <s> ... </s>)
            head, tail = _special_tokens_around(tokenizer)
            self.prefix = head + (self._ids(f"{self.instruction}\n\n") if self.instruction else [])
            self.suffix = tail

    def _ids(self, text: str) -> List[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids if text else []

    def prompt(self, source: str) -> List[int]:
        return self.prefix + self._ids(source)[: self.max_source] + self.suffix

    def target(self, target: str) -> List[int]:
        ids = self._ids(self.target_prefix + target)[: self.max_target - 1]
        return ids + [self.eos]


def _special_tokens_around(tokenizer) -> "tuple[List[int], List[int]]":
    """The ids a tokenizer puts before and after a text when it adds its special tokens."""
    bare = tokenizer("a", add_special_tokens=False).input_ids
    full = tokenizer("a").input_ids
    for start in range(len(full) - len(bare) + 1):
        if full[start : start + len(bare)] == bare:
            return full[:start], full[start + len(bare) :]
    return [], []


# ------------------------------------------------------------------------------------- encoded splits


@dataclass
class GenerationSetup:
    """What evaluating and generating need besides the model: tokenizer, prompter and decoding choices."""

    tokenizer: object
    prompter: Prompter
    objective: str
    keep_logits: bool = False  # the model's forward takes logits_to_keep (causal LM)
    single_line: bool = True  # targets are one line: outputs are cut to their first real line
    max_new_tokens: int = 32
    num_beams: int = 1
    batch_size: int = 16


@dataclass
class LMSplit(EncodedSplit):
    """A generation split: per example the prompt ids and (when labelled) the target ids; `labels` are
    the reference texts (None when the split has none). It collates its own training batches and
    evaluates itself by generating (engine.evaluate hands generation splits to `evaluate_generation`)."""

    sources: List[str] = field(default_factory=list)
    setup: Optional[GenerationSetup] = None
    last_predictions: Optional[List[str]] = None
    baseline_predictions: Optional[Dict[str, List[str]]] = None

    def subset(self, keep: Sequence[int]) -> "LMSplit":
        """The examples at indices `keep`, in that order (the same setup)."""
        labels = [self.labels[i] for i in keep] if self.labels is not None else None
        return LMSplit(
            [self.features[i] for i in keep], labels, sources=[self.sources[i] for i in keep], setup=self.setup
        )

    def collate_batch(self, indices: Sequence[int], pad_id: int) -> Dict[str, torch.Tensor]:
        rows = [self.features[i] for i in indices]
        if self.setup.objective == "causal-lm":
            return collate_causal(rows, pad_id, self.setup.keep_logits)
        return collate_seq2seq(rows, pad_id)

    def evaluate_generation(
        self,
        model: nn.Module,
        batch_size: int,
        device: torch.device,
        *,
        desc: str = "eval",
        progress: bool = True,
        precision: str = "fp32",
    ) -> Dict[str, float]:
        if self.labels is None:
            raise ValueError(f"{desc}: this split has no targets to score against")
        predictions = generate(
            model,
            self.setup,
            [f["prompt"] for f in self.features],
            device=device,
            batch_size=batch_size,
            desc=desc,
            progress=progress,
            precision=precision,
        )
        self.last_predictions = predictions
        return score(predictions, self.labels)


def collate_causal(rows: List[Dict[str, List[int]]], pad_id: int, keep_logits: bool) -> Dict[str, torch.Tensor]:
    """prompt + target per row, padded on the left; labels -100 except on the target tokens."""
    seqs = [r["prompt"] + r["target"] for r in rows]
    width = max(map(len, seqs))
    longest_target = max(len(r["target"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (row, seq) in enumerate(zip(rows, seqs)):
        ids[i, width - len(seq) :] = torch.tensor(seq)
        mask[i, width - len(seq) :] = 1
        labels[i, width - len(row["target"]) :] = torch.tensor(row["target"])
    batch = {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}
    if keep_logits:
        # The model shifts labels by one: logits at the last K positions, with the labels of those same
        # positions, score every target token (the first of them predicted from the last prompt token).
        keep = min(width, longest_target + 1)
        batch["labels"] = labels[:, width - keep :]
        batch["logits_to_keep"] = torch.arange(width - keep, width)
    else:
        batch["labels"] = labels
    return batch


def collate_seq2seq(rows: List[Dict[str, List[int]]], pad_id: int) -> Dict[str, torch.Tensor]:
    width = max(len(r["prompt"]) for r in rows)
    target_width = max(len(r["target"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), target_width), -100, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row["prompt"])] = torch.tensor(row["prompt"])
        mask[i, : len(row["prompt"])] = 1
        labels[i, : len(row["target"])] = torch.tensor(row["target"])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def make_setup(
    tokenizer, model: nn.Module, task: TaskSpec, cfg: TrainConfig, train_examples: Optional[Sequence[Example]] = None
) -> GenerationSetup:
    objective = objective_of(model)
    instruction = task.prompt if cfg.prompt is None else cfg.prompt
    prompter = Prompter(tokenizer, objective, instruction, cfg.chat_template, cfg.max_length, cfg.max_target_length)
    prompter.max_source = fit_source_length(prompter, cfg, model)
    keep = objective == "causal-lm" and "logits_to_keep" in inspect.signature(model.forward).parameters
    single = all("\n" not in (e.label or "") for e in train_examples or ())
    return GenerationSetup(
        tokenizer, prompter, objective, keep, single, cfg.max_new_tokens, cfg.num_beams, cfg.eval_batch_size
    )


def fit_source_length(prompter: Prompter, cfg: TrainConfig, model: nn.Module) -> int:
    """Source tokens per prompt: max_length, fitted to the model's positions (engine.fit_max_length: the
    default is cut, a given length that does not fit is an error) beside the prompt's own tokens and, in
    a causal LM's one sequence, the answer: the longer of max_target_length and max_new_tokens."""
    overhead = len(prompter.prefix) + len(prompter.suffix)
    answer = max(cfg.max_target_length, cfg.max_new_tokens)
    if prompter.objective == "causal-lm":
        return fit_max_length(
            cfg.max_length,
            model,
            overhead + answer,
            f"tokens of the prompt's instruction and template ({overhead}) and the answer "
            f"(max_target_length {cfg.max_target_length}, max_new_tokens {cfg.max_new_tokens})",
        )
    limit = position_limit(model)  # an encoder-decoder: the answer is the decoder's, on positions of its own
    if limit is not None and answer > limit:
        raise ValueError(
            f"max_target_length {cfg.max_target_length} / max_new_tokens {cfg.max_new_tokens}: the "
            f"model's decoder has {limit} positions (max_position_embeddings)"
        )
    return fit_max_length(cfg.max_length, model, overhead, f"tokens of the prompt's instruction ({overhead})")


def encode_lm(setup: GenerationSetup, examples: Sequence[Example]) -> LMSplit:
    prompter = setup.prompter
    features = []
    labelled = all(e.label is not None for e in examples)
    for e in examples:
        row = {"prompt": prompter.prompt(e.text)}
        if labelled:
            row["target"] = prompter.target(str(e.label))
        features.append(row)
    labels = [str(e.label) for e in examples] if labelled else None
    return LMSplit(features, labels, sources=[e.text for e in examples], setup=setup)


# -------------------------------------------------------------------------------------------- decoding


def clean_output(text: str, single_line: bool) -> str:
    """The answer in a generated text. For one-line targets: the first line that is not a preamble
    ("Here is a headline:"), without a "Headline:"/"Title:" label, markdown emphasis or enclosing quotes."""
    text = text.strip()
    if not single_line:
        return text
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    while len(lines) > 1 and lines[0].endswith(":"):
        lines.pop(0)
    line = lines[0] if lines else ""
    line = re.sub(r"^(?:#+\s*)?(?:\*\*)?(?:headline|title)\s*:\s*(?:\*\*)?\s*", "", line, flags=re.IGNORECASE)
    line = re.sub(r"^\*\*(.*)\*\*$", r"\1", line.strip()).strip()
    for a, b in (('"', '"'), ("\u201c", "\u201d"), ("'", "'")):
        if len(line) >= 2 and line.startswith(a) and line.endswith(b):
            line = line[1:-1].strip()
    return line


def _cut_at_stop(text: str, stop: Sequence[str]) -> str:
    cut = min((text.find(s) for s in stop if s and s in text), default=-1)
    return text if cut < 0 else text[:cut]


def _stopping_criteria(tokenizer, stop: Sequence[str], start: int):
    """Stop a sequence once the text it generated (from position `start`) holds a stop string."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StopOnStrings(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            texts = tokenizer.batch_decode(input_ids[:, start:].cpu(), skip_special_tokens=True)
            return torch.tensor([any(s in t for s in stop) for t in texts], device=input_ids.device)

    return StoppingCriteriaList([StopOnStrings()])


@torch.no_grad()
def generate(
    model: nn.Module,
    setup: GenerationSetup,
    prompts: Sequence[List[int]],
    *,
    device: torch.device,
    batch_size: Optional[int] = None,
    max_new_tokens: Optional[int] = None,
    decoding: Optional[str] = None,
    num_beams: Optional[int] = None,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    stop: Sequence[str] = (),
    seed: int = 0,
    clean: bool = True,
    desc: str = "generate",
    progress: bool = False,
    precision: str = "fp32",
) -> List[str]:
    """The texts `model` generates from each prompt (token ids), in order, under the autocast of
    `precision` (engine.autocast: the run's --precision).

    decoding: "greedy", "beam" (num_beams beams, default 4) or "sample" (temperature, top_p, top_k;
    seeded); default greedy, or beam when setup.num_beams > 1. Generation stops at the eos token, after
    max_new_tokens, or at a stop string (cut off the text). With `clean`, one-line tasks keep the answer
    line (clean_output).
    """
    tokenizer = setup.tokenizer
    beams = num_beams or setup.num_beams
    decoding = decoding or ("beam" if beams > 1 else "greedy")
    if decoding not in DECODINGS:
        raise ValueError(f"decoding must be one of {', '.join(DECODINGS)}, got {decoding!r}")
    if decoding == "beam" and beams < 2:
        beams = 4
    options = dict(
        max_new_tokens=max_new_tokens or setup.max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        num_beams=beams if decoding == "beam" else 1,
        do_sample=decoding == "sample",
    )
    if decoding == "sample":
        options.update(temperature=temperature, top_p=top_p, top_k=top_k)
    stop = [s for s in stop if s]
    batch_size = batch_size or setup.batch_size
    causal = setup.objective == "causal-lm"
    limit = position_limit(model)
    if causal and limit is not None and prompts and max(map(len, prompts)) + options["max_new_tokens"] > limit:
        raise ValueError(
            f"prompts of up to {max(map(len, prompts))} tokens and max_new_tokens "
            f"{options['max_new_tokens']} do not fit the model's {limit} positions "
            "(max_position_embeddings); lower --max-new-tokens"
        )
    pad = tokenizer.pad_token_id
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths: less padding
    chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    out: List[Optional[str]] = [None] * len(prompts)
    was_training = model.training
    model.eval()
    if decoding == "sample":
        torch.manual_seed(seed)
    try:
        for chunk in progress_bar(chunks, desc=desc, enabled=progress, unit="batch"):
            rows = [prompts[i] for i in chunk]
            width = max(map(len, rows))
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for j, row in enumerate(rows):
                span = slice(width - len(row), width) if causal else slice(0, len(row))
                ids[j, span] = torch.tensor(row)
                mask[j, span] = 1
            if stop:  # ends each output at its first stop string (transformers' own needs a clean vocabulary)
                options["stopping_criteria"] = _stopping_criteria(tokenizer, stop, width if causal else 0)
            # inference mode, not just no_grad: no op call passes autograd's kernels (each adapter call
            # of each decoding step would otherwise pay them)
            with autocast(precision, device), torch.inference_mode():
                sequences = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **options)
            new = sequences[:, width:] if causal else sequences
            for i, text in zip(chunk, tokenizer.batch_decode(new.cpu(), skip_special_tokens=True)):
                text = _cut_at_stop(text, stop)
                out[i] = clean_output(text, setup.single_line) if clean else text.strip()
    finally:
        model.train(was_training)
    return out


def score(predictions: Sequence[str], references: Sequence[str]) -> Dict[str, float]:
    """ROUGE-1/2/L F1 (in [0, 1]) and the mean length of the predictions in words."""
    result = rouge(predictions, references)
    result["words"] = sum(len(p.split()) for p in predictions) / len(predictions)
    return result


def baselines(
    model: nn.Module,
    split: LMSplit,
    device: torch.device,
    *,
    batch_size: Optional[int] = None,
    zero_shot: bool = True,
    progress: bool = False,
    precision: str = "fp32",
) -> Dict[str, Dict[str, float]]:
    """ROUGE of the lead baseline (each source's first sentence) and, with `zero_shot`, of the base model
    with its adapters off (sa.disable_adapter; same prompt, decoding and precision); their predictions in
    split.baseline_predictions."""
    lead = [lead_sentence(s) for s in split.sources]
    found = {"lead": score(lead, split.labels)}
    predictions = {"lead": lead}
    if zero_shot:
        with sa_adapters.disable_adapter(model):
            predictions["zero_shot"] = generate(
                model,
                split.setup,
                [f["prompt"] for f in split.features],
                device=device,
                batch_size=batch_size,
                desc="zero-shot",
                progress=progress,
                precision=precision,
            )
        found["zero_shot"] = score(predictions["zero_shot"], split.labels)
    split.baseline_predictions = predictions
    return found


def write_predictions(path: Path, split: LMSplit) -> None:
    """One JSON object per example: source, reference, prediction, and the baselines' outputs."""
    extra = split.baseline_predictions or {}
    with open(path, "w", encoding="utf-8") as f:
        for i, source in enumerate(split.sources):
            row = {
                "source": source,
                "reference": split.labels[i] if split.labels else None,
                "prediction": split.last_predictions[i] if split.last_predictions else None,
            }
            row.update({name: values[i] for name, values in extra.items()})
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def finish_test(
    model: nn.Module, split: LMSplit, cfg: TrainConfig, out_dir: Path, device: torch.device, log=None
) -> Optional[Dict[str, Dict[str, float]]]:
    """After the final test evaluation of a run: the baselines (with cfg.baselines) and predictions.jsonl."""
    found = None
    if cfg.baselines:
        found = baselines(
            model, split, device, batch_size=cfg.eval_batch_size, progress=cfg.progress, precision=cfg.precision
        )
    write_predictions(Path(out_dir) / "predictions.jsonl", split)
    return found


# ------------------------------------------------------------------------------------------ formatting

ROUGE_HEADER = ("ROUGE-1", "ROUGE-2", "ROUGE-L")


def rouge_rows(rows: Sequence, indent: str = "") -> List[str]:
    """A fixed-width table of (name, metrics) rows: ROUGE F1 x 100 and the mean words per output."""
    name_width = max(len(name) for name, _ in rows)
    lines = [indent + f"{'':<{name_width}}  " + "  ".join(f"{h:>7}" for h in ROUGE_HEADER) + "    words"]
    for name, m in rows:
        lines.append(
            indent
            + f"{name:<{name_width}}  "
            + "  ".join(f"{100 * m[k]:>7.2f}" for k in ("rouge1", "rouge2", "rougeL"))
            + f"  {m.get('words', math.nan):>7.1f}"
        )
    return lines


def rouge_markdown(rows: Sequence) -> str:
    """The rows of rouge_rows as a markdown table."""
    lines = ["| | " + " | ".join(ROUGE_HEADER) + " | words |", "|---|---:|---:|---:|---:|"]
    for name, m in rows:
        lines.append(
            f"| {name} | "
            + " | ".join(f"{100 * m[k]:.2f}" for k in ("rouge1", "rouge2", "rougeL"))
            + f" | {m.get('words', math.nan):.1f} |"
        )
    return "\n".join(lines)


def table_rows(metrics: Dict[str, float], found: Optional[Dict[str, Dict[str, float]]], name: str = "adapter"):
    rows = [(name, metrics)]
    if found:
        if "lead" in found:
            rows.append(("lead baseline (first sentence)", found["lead"]))
        if "zero_shot" in found:
            rows.append(("base model zero-shot", found["zero_shot"]))
    return rows


# ------------------------------------------------------------------------------------- saved adapters


def evaluate_saved_generation(
    cfg: TrainConfig,
    task: TaskSpec,
    tokenizer,
    model: nn.Module,
    examples: Dict[str, List[Example]],
    split: str,
    device: torch.device,
) -> Dict:
    """`sparseadapter eval` of a generation adapter: ROUGE on `split`, with the baselines (cfg.baselines)."""
    setup = make_setup(tokenizer, model, task, cfg, examples.get("train"))
    encoded = encode_lm(setup, examples[split])
    t = time.perf_counter()
    metrics = encoded.evaluate_generation(
        model, cfg.eval_batch_size, device, desc=f"eval {split}", progress=cfg.progress, precision=cfg.precision
    )
    metrics["seconds"] = time.perf_counter() - t
    metrics["examples"] = len(encoded)
    if cfg.baselines:
        metrics["baselines"] = baselines(
            model, encoded, device, batch_size=cfg.eval_batch_size, progress=cfg.progress, precision=cfg.precision
        )
    return metrics


def read_sources(path: str) -> List[str]:
    """Sources to generate from: a .txt file (one per line), or .csv/.tsv/.jsonl with a source (or text)
    column."""
    from .tasks import TaskSpec as _Spec

    p = Path(path)
    if p.suffix.lower() in (".csv", ".tsv", ".jsonl", ".json"):
        columns = table_columns(p)
        if "source" in columns:
            return [e.text for e in read_generation_table(p)]
        if "text" in columns:
            return [e.text for e in read_table(p, _Spec("input", 2, pair="text_pair" in columns))]
        raise ValueError(f"{path}: no 'source' (or 'text') column; it has {columns}")
    lines = [line.strip() for line in read_text(p).splitlines()]
    sources = [line for line in lines if line]
    if not sources:
        raise ValueError(f"{path}: no text to generate from")
    return sources


def generate_saved(
    adapter_dir: str,
    *,
    sources: Optional[List[str]] = None,
    split: str = "test",
    limit: int = 5,
    decoding: str = "greedy",
    num_beams: int = 4,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    max_new_tokens: Optional[int] = None,
    stop: Sequence[str] = (),
    batch_size: int = 8,
    adapter: bool = True,
    clean: bool = True,
    overrides: Optional[dict] = None,
) -> List[Dict[str, Optional[str]]]:
    """What `sparseadapter generate` runs: a saved generation adapter (or run folder) on its base model,
    generating from `sources`, or from the first `limit` examples (0: all) of `split` of its task.
    Rows of {"source", "generated", "reference"} (reference only for examples of a split). It runs
    under the adapter's training precision (overrides["precision"] to change it)."""
    cfg, task, tokenizer, model = load_saved(adapter_dir, overrides)
    if not task.generation:
        raise ValueError(
            f"{adapter_dir} holds an adapter for {task.name}, which is not a generation task; "
            "`generate` needs one trained with objective causal-lm or seq2seq"
        )
    device = resolve_device(cfg.device)
    set_threads(cfg, device)
    model.to(device)
    try:
        examples = load_examples(cfg)[1]
    except (DataError, OSError):
        if sources is None:
            raise
        examples = {}  # free text needs no task data (it only tells whether targets are one line)
    setup = make_setup(tokenizer, model, task, cfg, examples.get("train"))
    references: List[Optional[str]]
    if sources is None:
        if split not in examples:
            raise ValueError(f"task {task.name} has no {split!r} split here (has: {', '.join(examples)})")
        chosen = examples[split][:limit] if limit else examples[split]
        sources, references = [e.text for e in chosen], [e.label for e in chosen]
    else:
        references = [None] * len(sources)
    prompts = [setup.prompter.prompt(s) for s in sources]
    context = contextlib.nullcontext() if adapter else sa_adapters.disable_adapter(model)
    with context:
        texts = generate(
            model,
            setup,
            prompts,
            device=device,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            decoding=decoding,
            num_beams=num_beams,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            stop=stop,
            seed=seed,
            clean=clean,
            progress=cfg.progress,
            precision=cfg.precision,
        )
    rows = []
    for source, text, reference in zip(sources, texts, references):
        row = {"source": source, "generated": text}
        if reference is not None:
            row["reference"] = reference
        rows.append(row)
    return rows
