"""Extractive question answering (`--task squad`): a span head on an encoder, long contexts in windows,
answers decoded over the windows, exact match and F1 as the official SQuAD evaluation scores them.

    sparseadapter train --task squad --train-file train.json --validation-file dev.json --test-file test.json \\
        --max-length 256 --doc-stride 128 --sparsity 0.4
    sparseadapter eval --adapter runs/sparseadapter/adapter --split test
    sparseadapter predict --adapter runs/sparseadapter/adapter --input questions.json --output predictions.json

The model: AutoModelForQuestionAnswering where the architecture has one (its `qa_outputs` gives a start
and an end logit per token), else `SpanModel`, the encoder with a linear span head of our own. The head
is the adapter's (adapters.heads: kind "span"), saved and loaded with it.

Windows: a context longer than fits beside the question is cut into windows of at most `max_length`
tokens (question first, then a piece of the context), consecutive windows sharing `doc_stride` context
tokens. Each window keeps its tokens' character offsets in the context. Training: a window whose
context piece holds the (first) reference answer is labelled with the answer's first and last token;
every other window, and every window of an unanswerable question, with token 0 (the null answer).

Decoding (per question, over all its windows): the `n_best` highest start and end logits of each window's
context tokens pair into spans (end not before start, at most `max_answer_length` tokens); a span scores
start + end logit, the best over all windows is the answer, mapped back to context characters by the
offsets. The null score is the smallest over the windows of the logits at token 0 (a question is
unanswerable only if no window finds an answer in it). For v2.0 data the answer is "" when the null
score beats the best span by more than the null threshold: chosen on validation to maximize F1 (the
official "best threshold"), stored with the head and used on test, in `eval` and `predict`.
"""

import json
import math
import shutil
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .. import adapters as sa_adapters
from ..adapters.api import head_parameters
from ..adapters.heads import head_info, set_head_info
from . import distributed as dist_
from .batching import EncodedSplit, TrainOrder, collate, eval_batches
from .config import TrainConfig
from .data.example import DataError
from .engine import autocast, resolve_device, resolve_model_path, save_adapter_dir, set_threads, to_device
from .progress import progress_bar
from .report import write_results
from .result import RunResult
from .run import Run, append_jsonl, prepare_output
from .squad import QAExample, SquadFile, best_null_threshold, read_squad, squad_scores


@dataclass(frozen=True)
class QATaskSpec:
    """What the training run needs to know of a span task (the TaskSpec fields it reads)."""

    name: str = "squad"
    num_labels: int = 2
    label_names: Optional[Tuple[str, ...]] = None
    metrics: Tuple[str, ...] = ("exact", "f1")
    main_metric: str = "f1"
    pair: bool = True
    is_regression: bool = False
    generation: bool = False
    prompt: Optional[str] = None


QA_TASK = QATaskSpec()
NO_SPAN_MARGIN = 1e9  # a question with no valid span in any window: the null answer wins at any threshold


# ------------------------------------------------------------------------------------------ model


class SpanModel(nn.Module):
    """An encoder with a linear span head, for architectures without AutoModelForQuestionAnswering:
    `qa_outputs` maps each token's last hidden state to a start and an end logit; the loss is that of
    Hugging Face's question-answering models (mean of the start and end cross-entropies)."""

    def __init__(self, encoder: nn.Module, seed: int = 0):
        super().__init__()
        from ..adapters.placement import hidden_size

        self.encoder = encoder
        self.config = encoder.config
        self.qa_outputs = nn.Linear(hidden_size(encoder), 2)
        std = getattr(self.config, "initializer_range", 0.02) or 0.02
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.qa_outputs.weight.copy_(torch.randn(self.qa_outputs.weight.shape, generator=generator) * std)
            self.qa_outputs.bias.zero_()

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        start_positions=None,
        end_positions=None,
        **kwargs,
    ):
        from transformers.modeling_outputs import QuestionAnsweringModelOutput

        inputs = dict(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        if token_type_ids is not None:
            inputs["token_type_ids"] = token_type_ids
        hidden = self.encoder(**inputs)[0]
        start_logits, end_logits = (t.squeeze(-1).contiguous() for t in self.qa_outputs(hidden).split(1, dim=-1))
        loss = None
        if start_positions is not None and end_positions is not None:
            ignored = start_logits.size(1)
            loss_fn = nn.CrossEntropyLoss(ignore_index=ignored)
            loss = (
                loss_fn(start_logits, start_positions.clamp(0, ignored))
                + loss_fn(end_logits, end_positions.clamp(0, ignored))
            ) / 2
        return QuestionAnsweringModelOutput(loss=loss, start_logits=start_logits, end_logits=end_logits)


def load_qa_model(model_path: str, seed: int = 0, *, span_model: bool = False):
    """(tokenizer, model): AutoModelForQuestionAnswering with a new span head (seeded), or SpanModel on
    AutoModel where the architecture has no question-answering class (or with span_model=True)."""
    import os

    import transformers

    if os.path.isdir(model_path):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_path)
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"{model_path}: question answering needs a fast tokenizer (character offsets of tokens)")
    torch.manual_seed(seed)
    model = None
    if not span_model:
        try:
            model = transformers.AutoModelForQuestionAnswering.from_pretrained(model_path)
        except ValueError as err:  # "Unrecognized configuration class ... for AutoModelForQuestionAnswering"
            if "Unrecognized configuration class" not in str(err):
                raise
    if model is None:
        model = SpanModel(transformers.AutoModel.from_pretrained(model_path), seed)
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ValueError(f"{model_path}: the tokenizer has no pad or eos token to pad batches with")
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return tokenizer, model


# ------------------------------------------------------------------------------------------ windows

Offsets = List[Optional[Tuple[int, int]]]  # per token: its (start, end) characters in the context; None off it


@dataclass
class QASplit(EncodedSplit):
    """The windows of a split's questions: model inputs in `features` (with start_positions and
    end_positions when labelled), and per window its question (`window_example`) and token offsets."""

    examples: List[QAExample] = field(default_factory=list)
    window_example: List[int] = field(default_factory=list)
    offsets: List[Offsets] = field(default_factory=list)

    @property
    def labelled(self) -> bool:
        return bool(self.examples) and all(e.labelled for e in self.examples)


def char_span_to_tokens(offsets: Offsets, start: int, end: int) -> Optional[Tuple[int, int]]:
    """The first and last token of the context characters [start, end) in a window, or None when the
    window's context piece does not hold all of them."""
    context = [k for k, o in enumerate(offsets) if o is not None]
    if not context or offsets[context[0]][0] > start or offsets[context[-1]][1] < end:
        return None
    first = next((k for k in context if offsets[k][1] > start), None)
    last = next((k for k in reversed(context) if offsets[k][0] < end), None)
    if first is None or last is None or last < first:
        return None
    return first, last


def tokens_to_char_span(offsets: Offsets, first: int, last: int) -> Tuple[int, int]:
    """The context characters [start, end) that tokens first..last of a window cover."""
    if offsets[first] is None or offsets[last] is None:
        raise ValueError(f"tokens {first}..{last} are not all in the context")
    return offsets[first][0], offsets[last][1]


def _clip_question(tokenizer, question: str, max_tokens: int) -> Tuple[str, int]:
    """The question cut after its first `max_tokens` tokens, and its length in tokens."""
    enc = tokenizer(question, add_special_tokens=False, return_offsets_mapping=True)
    if len(enc["input_ids"]) <= max_tokens:
        return question, len(enc["input_ids"])
    question = question[: enc["offset_mapping"][max_tokens - 1][1]]
    return question, len(tokenizer(question, add_special_tokens=False)["input_ids"])


def encode_qa(
    tokenizer,
    examples: Sequence[QAExample],
    max_length: int,
    doc_stride: int,
    max_query_length: int = 64,
    labels: Optional[bool] = None,
) -> QASplit:
    """Every question's windows (see the module docstring). labels None: labelled when every question is."""
    examples = list(examples)
    if labels is None:
        labels = bool(examples) and all(e.labelled for e in examples)
    if labels and not all(e.labelled for e in examples):
        raise ValueError("encode_qa: labels asked for, but some questions have no reference answers")
    clipped = [_clip_question(tokenizer, e.question, max_query_length) for e in examples]
    questions = [q for q, _ in clipped]
    # the context room of a window must exceed the stride, else the windows never advance
    specials = tokenizer.num_special_tokens_to_add(pair=True)
    longest = max((n for _, n in clipped), default=0)
    if max_length - longest - specials <= doc_stride:
        raise ValueError(
            f"windows of max_length {max_length} leave {max_length - longest - specials} context "
            f"tokens beside the longest question ({longest} tokens); doc_stride {doc_stride} must be "
            "smaller (raise max_length, or lower doc_stride or max_query_length)"
        )
    enc = tokenizer(
        questions,
        [e.context for e in examples],
        truncation="only_second",
        max_length=max_length,
        stride=doc_stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
    )
    keys = [k for k in ("input_ids", "token_type_ids", "attention_mask") if k in enc]
    split = QASplit(features=[], labels=None, examples=examples)
    for i, sample in enumerate(enc["overflow_to_sample_mapping"]):
        sequence = enc.sequence_ids(i)
        offsets = [tuple(o) if s == 1 else None for o, s in zip(enc["offset_mapping"][i], sequence)]
        feature = {k: enc[k][i] for k in keys}
        if labels:
            answers = examples[sample].answers
            span = char_span_to_tokens(offsets, answers[0].start, answers[0].end) if answers else None
            feature["start_positions"], feature["end_positions"] = span if span is not None else (0, 0)
        split.features.append(feature)
        split.window_example.append(sample)
        split.offsets.append(offsets)
    return split


# ------------------------------------------------------------------------------------------ decoding


@dataclass
class Decoded:
    """A question's answer candidates over its windows."""

    text: str  # the best span's text ("" when no window has a valid span)
    score: Optional[float]  # its start + end logit (None: no span)
    null_score: float  # the smallest null score (token 0's start + end logit) over the windows
    nbest: List[dict]  # up to n_best spans: text, start, end (characters), score

    @property
    def null_margin(self) -> float:
        """Null score minus the best span's: the answer is "" when this is above the null threshold."""
        return NO_SPAN_MARGIN if self.score is None else self.null_score - self.score

    def answer(self, version_2: bool, threshold: float) -> str:
        return "" if version_2 and self.null_margin > threshold else self.text


def decode(
    examples: Sequence[QAExample],
    window_example: Sequence[int],
    offsets: Sequence[Offsets],
    start_logits: Sequence[torch.Tensor],
    end_logits: Sequence[torch.Tensor],
    *,
    n_best: int = 20,
    max_answer_length: int = 30,
) -> Dict[str, Decoded]:
    """Every question's Decoded from its windows' logits (1-D, one per token of the window)."""
    by_example: Dict[int, List[int]] = {}
    for w, e in enumerate(window_example):
        by_example.setdefault(e, []).append(w)
    out = {}
    for e, windows in by_example.items():
        context = examples[e].context
        spans: Dict[Tuple[int, int], float] = {}
        null = math.inf
        for w in windows:
            start, end, offs = start_logits[w].float(), end_logits[w].float(), offsets[w]
            null = min(null, float(start[0] + end[0]))
            inside = torch.tensor([o is not None for o in offs[: len(start)]], dtype=torch.bool)
            if not bool(inside.any()):
                continue
            k = min(n_best, int(inside.sum()))
            top_start = torch.where(inside, start, torch.tensor(-math.inf)).topk(k).indices.tolist()
            top_end = torch.where(inside, end, torch.tensor(-math.inf)).topk(k).indices.tolist()
            for s in top_start:
                for t in top_end:
                    if t < s or t - s + 1 > max_answer_length:
                        continue
                    chars = tokens_to_char_span(offs, s, t)
                    score = float(start[s] + end[t])
                    if score > spans.get(chars, -math.inf):  # the same characters from overlapping windows
                        spans[chars] = score
        ranked = sorted(spans.items(), key=lambda item: (-item[1], item[0]))[:n_best]
        nbest = [{"text": context[a:b], "start": a, "end": b, "score": score} for (a, b), score in ranked]
        best = nbest[0] if nbest else None
        out[examples[e].id] = Decoded(best["text"] if best else "", best["score"] if best else None, null, nbest)
    return out


def answers(decoded: Dict[str, Decoded], version_2: bool, threshold: float) -> Dict[str, str]:
    """{id: answer text}, "" for the null answer."""
    return {qid: d.answer(version_2, threshold) for qid, d in decoded.items()}


# ------------------------------------------------------------------------------------------ evaluation


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    split: QASplit,
    batch_size: int,
    pad_id: int,
    device: torch.device,
    *,
    precision: str = "fp32",
    desc: str = "eval",
    progress: bool = True,
):
    """(start logits, end logits per window, mean loss over the windows or None without labels)."""
    was_training = model.training
    model.eval()
    starts: List[Optional[torch.Tensor]] = [None] * len(split)
    ends: List[Optional[torch.Tensor]] = [None] * len(split)
    loss_sum, labelled = 0.0, split.labelled and "start_positions" in split.features[0]
    for indices in progress_bar(list(eval_batches(split, batch_size)), desc=desc, enabled=progress, unit="batch"):
        batch = to_device(collate(split, indices, pad_id), device)
        with autocast(precision, device):
            out = model(**batch)
        if labelled:
            loss_sum += float(out.loss) * len(indices)
        start, end = out.start_logits.float().cpu(), out.end_logits.float().cpu()
        for row, i in enumerate(indices):
            width = len(split.features[i]["input_ids"])
            starts[i], ends[i] = start[row, :width], end[row, :width]
    model.train(was_training)
    return starts, ends, (loss_sum / len(split) if labelled else None)


def score_decoded(
    examples: Sequence[QAExample], decoded: Dict[str, Decoded], version_2: bool, threshold: Optional[float]
) -> Dict[str, float]:
    """Official scores of the decoded answers; for v2.0 with threshold None, at the best threshold on
    these questions (returned as null_threshold), the all-null baseline (baseline_exact, baseline_f1),
    and the best spans' scores on the answerable questions with no null answer allowed
    (has_answer_span_exact, has_answer_span_f1: the span quality whatever the threshold)."""
    if version_2 and threshold is None:
        threshold = best_null_threshold(
            examples, {q: d.text for q, d in decoded.items()}, {q: d.null_margin for q, d in decoded.items()}
        )[0]
    metrics = squad_scores(examples, answers(decoded, version_2, threshold if threshold is not None else 0.0))
    if version_2:
        metrics["null_threshold"] = float(threshold)
        empty = squad_scores(examples, {e.id: "" for e in examples})
        metrics["baseline_exact"], metrics["baseline_f1"] = empty["exact"], empty["f1"]
        # how good the spans are whatever the threshold: the best span of every answerable question
        answerable = [e for e in examples if e.answers]
        if answerable:
            spans = squad_scores(answerable, {e.id: decoded[e.id].text for e in answerable if e.id in decoded})
            metrics["has_answer_span_exact"], metrics["has_answer_span_f1"] = spans["exact"], spans["f1"]
    return metrics


def evaluate_qa(
    model: nn.Module,
    split: QASplit,
    cfg: TrainConfig,
    pad_id: int,
    device: torch.device,
    *,
    version_2: bool,
    threshold: Optional[float] = None,
    desc: str = "eval",
    progress: bool = True,
) -> Tuple[Dict[str, float], Dict[str, Decoded]]:
    """(metrics, decoded answers) of a labelled split: loss, exact, f1 (percent) and their has_answer_ /
    no_answer_ parts; for v2.0 the null threshold used (chosen here when `threshold` is None)."""
    if not split.labelled:
        raise ValueError(f"{desc}: this split has questions without reference answers to score against")
    starts, ends, loss = predict_logits(
        model, split, cfg.eval_batch_size, pad_id, device, precision=cfg.precision, desc=desc, progress=progress
    )
    decoded = decode(
        split.examples,
        split.window_example,
        split.offsets,
        starts,
        ends,
        n_best=cfg.n_best,
        max_answer_length=cfg.max_answer_length,
    )
    metrics = {"loss": loss} if loss is not None else {}
    metrics.update(score_decoded(split.examples, decoded, version_2, threshold))
    return metrics, decoded


# ------------------------------------------------------------------------------------------ data


def _subset(examples: List[QAExample], limit: Optional[int]) -> List[QAExample]:
    if limit is None or limit >= len(examples):
        return examples
    keep = torch.randperm(len(examples), generator=torch.Generator().manual_seed(1234))[:limit]
    return [examples[i] for i in sorted(keep.tolist())]


def read_qa_files(cfg: TrainConfig) -> Dict[str, SquadFile]:
    """The run's SQuAD files by split (train, and validation / test when given), subsets applied."""
    files = {"train": cfg.train_file, "validation": cfg.validation_file, "test": cfg.test_file}
    out = {}
    for split, path in files.items():
        if path is None:
            continue
        squad = read_squad(path)
        limit = cfg.max_train_examples if split == "train" else cfg.max_eval_examples
        out[split] = SquadFile(tuple(_subset(list(squad.examples), limit)), squad.version_2, squad.realigned)
    if "train" in out and not all(e.labelled for e in out["train"].examples):
        missing = next(e for e in out["train"].examples if not e.labelled)
        raise DataError(
            f"question {missing.id!r} has no answers and is not marked is_impossible: training "
            "questions need reference answers",
            cfg.train_file,
        )
    return out


def encode_split(tokenizer, squad: SquadFile, cfg: TrainConfig) -> QASplit:
    return encode_qa(tokenizer, squad.examples, cfg.max_length, cfg.doc_stride, cfg.max_query_length)


# ------------------------------------------------------------------------------------------ the run


class LengthGroupedOrder(TrainOrder):
    """TrainOrder whose batches hold windows of similar length (less padding: most contexts fill a few
    windows, the last one short). Each epoch's permutation is cut into chunks of `group` batches, each
    chunk sorted by length and cut into batches, and the batches are shuffled: still a pure function of
    (seed, epoch), so a resumed run takes the same batches."""

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, group: int = 32):
        super().__init__(len(lengths), batch_size, seed)
        self.lengths, self.group = list(lengths), group
        self._batches_epoch, self._batches = -1, []

    def _epoch_batches(self, epoch: int) -> List[List[int]]:
        perm = self.permutation(epoch).tolist()
        chunk = self.batch_size * self.group
        ordered = []
        for start in range(0, len(perm), chunk):
            ordered += sorted(perm[start : start + chunk], key=lambda i: (self.lengths[i], i))
        batches = [ordered[i : i + self.batch_size] for i in range(0, len(ordered), self.batch_size)]
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch + 500_009)
        return [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]

    def batch(self, step: int) -> List[int]:
        epoch, index = divmod(step, self.steps_per_epoch)
        if epoch != self._batches_epoch:
            self._batches_epoch, self._batches = epoch, self._epoch_batches(epoch)
        return self._batches[index]


class QARun(Run):
    """`train` for task squad: the classification run (prune at init, fine-tune, select on validation,
    report on test, resumable checkpoints, torchrun) on span windows, scored by EM / F1."""

    def setup(self) -> None:
        cfg = self.cfg
        self.resume_from = self.on_main(lambda: prepare_output(cfg, self.out, self.log))
        self.task, self.objective = QA_TASK, "span"
        files = read_qa_files(cfg)
        # v2.0 (null answers, a threshold) when the data to learn or select on is
        self.version_2 = any(f.version_2 for s, f in files.items() if s in ("train", "validation"))
        self.model_path = resolve_model_path(cfg.model)
        tokenizer, self.model = load_qa_model(self.model_path, cfg.seed)
        self.model.to(self.device)
        self.pad_id = tokenizer.pad_token_id
        self.splits = {k: encode_split(tokenizer, f, cfg) for k, f in files.items()}
        self.sizes = {k: len(f.examples) for k, f in files.items()}
        self.target, self.target_scale, self.baseline = None, 1.0, None
        if cfg.batch_size < self.world.size:
            raise ValueError(
                f"batch_size {cfg.batch_size} is the global batch and must be at least the "
                f"number of processes ({self.world.size})"
            )
        if self.world.is_main:
            realigned = sum(f.realigned for f in files.values())
            self.log(
                f"task squad ({'v2.0, with unanswerable questions' if self.version_2 else 'v1.1'}): "
                + ", ".join(f"{k} {self.sizes[k]} questions in {len(s)} windows" for k, s in self.splits.items())
                + f"; model {cfg.model}"
                + (f"; {realigned} answer starts realigned" if realigned else "")
            )
        # batches of windows of similar lengths
        lengths = [len(f["input_ids"]) for f in self.splits["train"].features]
        self.order = LengthGroupedOrder(lengths, cfg.batch_size * cfg.grad_accumulation, cfg.seed)
        self.total = cfg.max_steps or max(1, math.ceil(cfg.epochs * self.order.steps_per_epoch))
        self.state = self._load_or_prune()
        if "null_threshold" not in head_info(self.model, cfg.adapter_name):
            set_head_info(self.model, cfg.adapter_name, task="squad", version_2=self.version_2, null_threshold=0.0)
        dist_.check_same_pattern(self.model, self.world)
        self._build_optimizer()

    def validation_ready(self) -> bool:
        return "validation" in self.splits and self.splits["validation"].labelled

    def _evaluate(self, split: str, threshold: Optional[float]) -> Dict[str, float]:
        return evaluate_qa(
            self.model,
            self.splits[split],
            self.cfg,
            self.pad_id,
            self.device,
            version_2=self.version_2,
            threshold=threshold,
            desc=f"eval {split}",
            progress=self.cfg.progress,
        )[0]

    def _evaluate_and_keep_best(self) -> dict:
        import statistics

        state, order = self.state, self.order
        recent = state["step_times"][-state["loss_count"] :] if state["loss_count"] else []
        record = {
            "step": state["step"],
            "epoch": state["step"] / order.steps_per_epoch,
            "train_loss": state["loss_sum"] / max(1, state["loss_count"]),
            "lr": self.scheduler.get_last_lr()[0],
        }
        if recent:
            record["step_s"] = statistics.median(recent)
        state["loss_sum"], state["loss_count"] = 0.0, 0
        if self.has_validation:
            t = time.perf_counter()
            metrics = self._evaluate("validation", None)  # v2.0: at the best null threshold on validation
            self.timings["eval_s"] += time.perf_counter() - t
            record.update(split="validation", **metrics)
            if state["best"] is None or selection_key(metrics) > selection_key(state["best"]["metrics"]):
                state["best"] = {"step": state["step"], "metrics": metrics}
                set_head_info(self.model, self.cfg.adapter_name, null_threshold=metrics.get("null_threshold", 0.0))
                save_adapter_dir(self.model, self.out / "best", self.cfg)
        append_jsonl(self.out / "metrics.jsonl", record)
        return record

    def finish(self) -> RunResult:
        out, state, cfg, name = self.out, self.state, self.cfg, self.cfg.adapter_name
        final = out / "adapter"
        shutil.rmtree(final, ignore_errors=True)
        shutil.rmtree(out / "init", ignore_errors=True)
        if self.has_validation and (out / "best").is_dir():
            sa_adapters.delete_adapter(self.model, name)
            sa_adapters.load_adapter(self.model, str(out / "best"), name, load_head=True)
            shutil.copytree(out / "best", final)
        else:
            save_adapter_dir(self.model, final, cfg)
        validation = state["best"]["metrics"] if state["best"] is not None else None
        test = None
        t = time.perf_counter()
        if "test" in self.splits and self.splits["test"].labelled:
            test = self._evaluate("test", head_info(self.model, name).get("null_threshold", 0.0))
        self.timings["eval_s"] += time.perf_counter() - t
        best_step = state["best"]["step"] if state["best"] is not None else None
        for split, metrics in (("validation", validation), ("test", test)):
            if metrics is not None:
                append_jsonl(
                    out / "metrics.jsonl",
                    {"step": best_step or state["step"], "final": True, "split": split, **metrics},
                )
        counts = dict(sa_adapters.trainable_parameters(self.model))
        counts["head"] = sum(p.numel() for p in head_parameters(self.model))
        sa_adapters.write_model_card(str(final), metrics={"validation": validation, "test": test})
        result = RunResult(
            out,
            final,
            self.task,
            self.sizes,
            validation,
            test,
            counts,
            self.timings,
            state["step"],
            best_step,
            cfg,
            None,
            objective=self.objective,
        )
        write_results(result)
        with open(out / "results.md", "a", encoding="utf-8") as f:
            f.write("\n" + qa_notes(result, self.version_2) + "\n")
        return result


def selection_key(metrics: Dict[str, float]) -> Tuple[float, float, float]:
    """What model selection maximizes: validation F1; among equal F1s (often every step's at "always no
    answer", early in a v2.0 run) the better spans on the answerable questions, then the lower loss."""
    return (
        round(metrics["f1"], 9),
        round(metrics.get("has_answer_span_f1", metrics.get("has_answer_f1", 0.0)), 9),
        -metrics.get("loss", 0.0),
    )


def qa_notes(result: RunResult, version_2: bool) -> str:
    """The QA lines of results.md: the parts (answerable, unanswerable), the threshold and the baseline."""
    lines = ["Exact match and F1 in percent (official SQuAD normalization; best over the reference answers)."]
    for split, values in (("validation", result.validation), ("test", result.test)):
        if values is None:
            continue
        parts = [f"{split}: exact {values['exact']:.2f}, F1 {values['f1']:.2f} over {values['total']} questions"]
        if values.get("has_answer_total"):
            parts.append(
                f"answerable {values['has_answer_total']}: exact {values['has_answer_exact']:.2f}, "
                f"F1 {values['has_answer_f1']:.2f}"
                + (
                    f" (their best spans, no null answer allowed: F1 {values['has_answer_span_f1']:.2f})"
                    if "has_answer_span_f1" in values
                    else ""
                )
            )
        if values.get("no_answer_total"):
            parts.append(f"unanswerable {values['no_answer_total']}: exact {values['no_answer_exact']:.2f}")
        if "null_threshold" in values:
            parts.append(f"null threshold {values['null_threshold']:.4g}")
        if "baseline_f1" in values:
            parts.append(f"always no answer: exact {values['baseline_exact']:.2f}, F1 {values['baseline_f1']:.2f}")
        lines.append("- " + "; ".join(parts))
    if version_2:
        lines.append(
            "The null threshold is chosen on validation (the best F1) and used on test; validation "
            "scores at their own best threshold are optimistic."
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ saved adapters


def is_qa_adapter(adapter_dir: str) -> bool:
    """Whether the folder is an adapter `sparseadapter train --task squad` wrote."""
    from .engine import resolve_adapter_dir

    path = resolve_adapter_dir(adapter_dir) / "train_config.json"
    try:
        return json.loads(path.read_text()).get("task") == "squad"
    except (OSError, ValueError, AttributeError):
        return False


def load_qa_saved(adapter_dir: str, overrides: Optional[dict] = None):
    """(config, tokenizer, model) of a saved span adapter on its base model (CPU)."""
    from .engine import load_saved_config, resolve_adapter_dir

    cfg = load_saved_config(adapter_dir, overrides)
    tokenizer, model = load_qa_model(resolve_model_path(cfg.model), cfg.seed)
    sa_adapters.load_adapter(model, str(resolve_adapter_dir(adapter_dir)), cfg.adapter_name, load_head=True)
    return cfg, tokenizer, model


def score_qa_saved(
    adapter_dir: str, *, split: str = "test", overrides: Optional[dict] = None, threshold: Optional[float] = None
) -> Dict[str, float]:
    """A saved span adapter's scores on a split of its run's files (the saved null threshold unless given)."""
    cfg, tokenizer, model = load_qa_saved(adapter_dir, overrides)
    device = resolve_device(cfg.device)
    set_threads(cfg, device)
    files = read_qa_files(cfg)
    if split not in files:
        raise ValueError(f"task squad has no {split!r} file here (has: {', '.join(files)}); give --{split}-file")
    info = head_info(model, cfg.adapter_name)
    version_2 = bool(info.get("version_2", files[split].version_2))
    model.to(device)
    encoded = encode_split(tokenizer, files[split], cfg)
    t = time.perf_counter()
    metrics, _ = evaluate_qa(
        model,
        encoded,
        cfg,
        tokenizer.pad_token_id,
        device,
        version_2=version_2,
        threshold=info.get("null_threshold", 0.0) if threshold is None else threshold,
        desc=f"eval {split}",
        progress=cfg.progress,
    )
    metrics["seconds"] = time.perf_counter() - t
    metrics["examples"] = len(encoded.examples)
    metrics["windows"] = len(encoded)
    return metrics


def predict_saved(
    adapter_dir: str, input_file: str, *, overrides: Optional[dict] = None, threshold: Optional[float] = None
) -> Tuple[Dict[str, str], Dict[str, float]]:
    """({id: answer} for every question of a SQuAD file, "" for no answer; {id: null margin}) from a
    saved span adapter: the file needs no answers."""
    cfg, tokenizer, model = load_qa_saved(adapter_dir, overrides)
    device = resolve_device(cfg.device)
    set_threads(cfg, device)
    squad = read_squad(input_file)
    info = head_info(model, cfg.adapter_name)
    version_2 = bool(info.get("version_2", squad.version_2))
    threshold = info.get("null_threshold", 0.0) if threshold is None else threshold
    model.to(device)
    encoded = encode_qa(tokenizer, squad.examples, cfg.max_length, cfg.doc_stride, cfg.max_query_length, labels=False)
    starts, ends, _ = predict_logits(
        model,
        encoded,
        cfg.eval_batch_size,
        tokenizer.pad_token_id,
        device,
        precision=cfg.precision,
        desc="predict",
        progress=cfg.progress,
    )
    decoded = decode(
        encoded.examples,
        encoded.window_example,
        encoded.offsets,
        starts,
        ends,
        n_best=cfg.n_best,
        max_answer_length=cfg.max_answer_length,
    )
    return answers(decoded, version_2, threshold), {q: d.null_margin for q, d in decoded.items()}
