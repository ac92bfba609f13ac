"""The main job: prune an adapter at initialization, fine-tune it, select on validation, report on test,
save. `train(cfg)` is what `sparseadapter train` and `demo` run, in one process or under torchrun.

A run folder holds:
  config.json       the exact TrainConfig (plus the resolved model and the library versions)
  metrics.jsonl     one JSON object per evaluation (with the median step time since the previous one)
  checkpoint/       the latest resumable state (adapter + optimizer, scheduler, RNG per rank, step)
  best/             the adapter that scored best on validation so far
  adapter/          the final adapter (the best one when there is a validation split)
  results.json, results.md   the final numbers
  predictions.jsonl generation tasks: per test example the reference, the adapter's output and the baselines'
"""

import contextlib
import gc
import json
import math
import os
import shutil
import statistics
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from .. import adapters as sa_adapters
from ..adapters.api import head_parameters
from ..adapters.io import atomic_write
from ..version import __version__
from . import checkpoint as ckpt
from . import distributed as dist_
from . import generation
from .batching import EncodedSplit, collate
from .config import FILE_TASKS, TrainConfig
from .engine import (
    add_pruned_adapter,
    autocast,
    encode_splits,
    evaluate,
    load_examples,
    load_task_model,
    micro_batches,
    prepare_head,
    regression_scale,
    resolve_device,
    resolve_model_path,
    save_adapter_dir,
    set_threads,
    task_loss,
    to_device,
    train_order,
)
from .metrics import baseline_prediction, collapse_warning, is_diagnostic
from .progress import progress_bar
from .report import write_results
from .result import RunResult

RUN_FILES = ("config.json", "metrics.jsonl", "results.json", "results.md", "predictions.jsonl")
RUN_DIRS = ("checkpoint", "checkpoint.old", "checkpoint.tmp", "best", "adapter", "init")
# Options a resumed run may change: they do not alter what is computed.
RESUMABLE_CHANGES = {"resume", "overwrite", "progress", "threads", "device", "eval_batch_size", "output_dir", "compile"}


def prepare_output(cfg: TrainConfig, out: Path, log: Callable[[str], None] = print) -> Optional[Path]:
    """Refuse to mix runs; clear a replaced one; return the checkpoint to resume from.

    `--resume` continues from the newest checkpoint that reads whole (falling back to the previous one),
    and, for a run of the same settings that stopped before its first checkpoint, starts it over. The
    evaluations logged after the checkpoint (they are replayed) are dropped from metrics.jsonl."""
    out.mkdir(parents=True, exist_ok=True)
    previous = out / "config.json"
    if cfg.resume:
        if not previous.is_file():
            raise ValueError(f"--resume: no checkpoint in {out} to resume from")
        saved = _read_run_config(previous)
        mine = cfg.to_dict()
        defaults = TrainConfig().to_dict()  # options newer than the saved run had their defaults there
        changed = sorted(k for k in mine if k not in RESUMABLE_CHANGES and saved.get(k, defaults[k]) != mine[k])
        if changed:
            details = ", ".join(f"{k}: {saved.get(k)!r} -> {mine[k]!r}" for k in changed)
            raise ValueError(
                f"--resume: the run in {out} was made with other settings ({details}); "
                "a resumed run must use the same ones"
            )
        found = ckpt.usable_checkpoint(out, log)
        if found is not None:
            _trim_metrics(out / "metrics.jsonl", ckpt.read_state(found)["step"])
            return found
        log(f"{out}: the run stopped before its first checkpoint; starting it over")
    elif previous.is_file() and not cfg.overwrite:
        raise ValueError(
            f"{out} already holds a run: pass --resume to continue it, --overwrite to replace it, "
            "or choose another --output-dir"
        )
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)
    for name in RUN_DIRS:
        shutil.rmtree(out / name, ignore_errors=True)
    return None


def _read_run_config(path: Path) -> dict:
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))["train_config"]
    except (OSError, UnicodeDecodeError, ValueError, RecursionError, KeyError, TypeError) as err:
        raise ValueError(
            f"--resume: {path} is not a readable run config ({type(err).__name__}); start over with --overwrite"
        ) from None
    if not isinstance(saved, dict):
        raise ValueError(f"--resume: {path} is not a readable run config; start over with --overwrite")
    return saved


def _trim_metrics(path: Path, step: int) -> None:
    """Keep the evaluations up to the checkpoint's step: the resumed run logs the later ones (and the
    final records) again. A line cut short by a kill goes too."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if (
            isinstance(record, dict)
            and not record.get("final")
            and isinstance(record.get("step"), int)
            and record["step"] <= step
        ):
            keep.append(line)
    atomic_write(path, "".join(f"{line}\n" for line in keep).encode())


def append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def selection_split(split: Optional[EncodedSplit], limit: Optional[int]) -> Optional[EncodedSplit]:
    """What evaluation during training scores: the validation split, or with `limit` (--eval-max-examples)
    a fixed seeded subset of it (the same in every run and on resume)."""
    if split is None or limit is None or limit >= len(split):
        return split
    keep = sorted(torch.randperm(len(split), generator=torch.Generator().manual_seed(4321))[:limit].tolist())
    return split.subset(keep)


def _schedule(total: int, warmup: int) -> Callable[[int], float]:
    """Linear warm-up to the peak, then linear decay to zero at the last step."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


def _format_record(record: dict) -> str:
    parts = [f"step {record['step']}", f"epoch {record['epoch']:.2f}", f"train loss {record['train_loss']:.4f}"]
    if "step_s" in record:
        parts.append(f"{1000 * record['step_s']:.0f} ms/step")
    if "split" in record:
        parts += [
            f"{record['split']} {k} {v:.4f}"
            for k, v in record.items()
            if k not in ("step", "epoch", "train_loss", "lr", "split", "step_s", "examples") and not is_diagnostic(k)
        ]
        if "examples" in record:
            parts.append(f"on {record['examples']} examples")
    return " | ".join(parts)


def _dynamo_graphs() -> int:
    """Graphs torch.compile has compiled so far in this process (to tell which steps compiled)."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return 0
    return int(counters["stats"]["unique_graphs"])


class Run:
    """One training run; every rank of a torchrun job builds one. Rank 0 alone writes and evaluates."""

    def __init__(self, cfg: TrainConfig, log: Callable[[str], None]):
        self.cfg, self.log = cfg, log
        self.world = dist_.init_world(cfg.device)
        self.device = resolve_device(cfg.device, self.world.local_rank)
        set_threads(cfg, self.device)
        self.out = Path(cfg.output_dir)
        self.timings = {"prune_s": 0.0, "train_s": 0.0, "eval_s": 0.0}

    def on_main(self, fn):
        """Run fn on rank 0 only; every rank gets its result, or raises its error (no rank is left waiting)."""
        if not self.world.distributed:
            return fn()
        result, error = None, None
        if self.world.is_main:
            try:
                result = fn()
            except (ValueError, OSError) as err:
                error = f"{err}"
        result, error = dist_.all_gather((result, error), self.world)[0]
        if error is not None:
            raise ValueError(error)
        return result

    # -- setup -------------------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.cfg
        self.resume_from = self.on_main(lambda: prepare_output(cfg, self.out, self.log))
        self.task, examples = load_examples(cfg)
        self.model_path = resolve_model_path(cfg.model)
        tokenizer, self.model, self.objective = load_task_model(cfg, self.task, self.model_path)
        self.model.to(self.device)
        self.pad_id = tokenizer.pad_token_id
        self.splits = encode_splits(cfg, self.task, tokenizer, self.model, examples)
        self.sizes = {k: len(v) for k, v in self.splits.items()}
        train_labels = self.splits["train"].labels
        # regression: standardized targets, the head answering in label units (before pruning scores the loss)
        self.target = prepare_head(self.model, self.task, train_labels, cfg.seed)
        self.target_scale = regression_scale(self.model) if self.task.is_regression else 1.0
        self.baseline = baseline_prediction(self.task, train_labels)
        if cfg.batch_size < self.world.size:
            raise ValueError(
                f"batch_size {cfg.batch_size} is the global batch and must be at least the "
                f"number of processes ({self.world.size})"
            )
        if self.world.is_main:
            self.log(
                f"task {self.task.name}: "
                + ", ".join(f"{k} {n}" for k, n in self.sizes.items())
                + f" examples; model {cfg.model}"
                + (f"; {self.world.size} processes" if self.world.distributed else "")
            )
        self.selection = selection_split(self.splits.get("validation"), cfg.eval_max_examples)
        self.order = train_order(cfg, self.sizes["train"])  # optimizer-step batches
        self.total = cfg.max_steps or max(1, math.ceil(cfg.epochs * self.order.steps_per_epoch))
        self.state = self._load_or_prune()
        dist_.check_same_pattern(self.model, self.world)
        self._build_optimizer()

    def _load_or_prune(self) -> dict:
        if self.resume_from is not None:
            state = ckpt.load_checkpoint(self.resume_from, self.model, self.cfg.adapter_name)
            if state["step"] > self.total:
                raise ValueError(
                    f"{self.resume_from}: the checkpoint is at step {state['step']}, past this run's {self.total} steps"
                )
            if self.world.is_main:
                self.log(f"resuming {self.out} from step {state['step']} of {self.total}")
            self.timings.update(state.get("timings", {}))
            return state

        def prune_on_main():
            (self.out / "config.json").write_text(
                json.dumps(
                    {
                        "train_config": self.cfg.to_dict(),
                        "model_path": self.model_path,
                        "task": self.task.name,
                        "objective": self.objective,
                        "label_names": list(self.task.label_names) if self.task.label_names else None,
                        "target_normalization": dict(zip(("mean", "scale"), self.target)) if self.target else None,
                        "world_size": self.world.size,
                        "sparseadapter": __version__,
                        "torch": torch.__version__,
                    },
                    indent=2,
                    sort_keys=True,
                )
            )
            start = time.perf_counter()
            add_pruned_adapter(self.model, self.cfg, self.splits["train"], self.order, self.pad_id, self.device)
            self.timings["prune_s"] = time.perf_counter() - start
            if self.world.distributed:  # the other ranks take rank 0's pattern and values from disk
                save_adapter_dir(self.model, self.out / "init", self.cfg)

        self.on_main(prune_on_main)
        if not self.world.is_main:
            sa_adapters.load_adapter(self.model, str(self.out / "init"), self.cfg.adapter_name, load_head=True)
        return {"step": 0, "best": None, "loss_sum": 0.0, "loss_count": 0, "step_times": []}

    def _build_optimizer(self) -> None:
        cfg, state = self.cfg, self.state
        sa_adapters.train_adapter(self.model, cfg.adapter_name)
        self.model.to(self.device)
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in named]
        if self.resume_from is not None and state.get("param_names") != [n for n, _ in named]:
            raise ValueError(f"{self.resume_from}: the checkpoint's optimizer state is for other parameters")
        state["param_names"] = [n for n, _ in named]
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _schedule(self.total, round(cfg.warmup_ratio * self.total))
        )
        # fp16 only: the loss is scaled up before backward so small gradients survive float16, and a step
        # whose gradients overflowed is skipped (the scale then halves). Disabled, it passes through.
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.precision == "fp16")
        if self.resume_from is not None:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            if self.scaler.is_enabled():
                if "scaler" not in state:
                    raise ValueError(f"{self.resume_from}: the checkpoint has no gradient scaler state for fp16")
                self.scaler.load_state_dict(state["scaler"])
            if len(state["rng"]) != self.world.size:
                raise ValueError(
                    f"{self.resume_from} was written by a run of {len(state['rng'])} process(es); "
                    f"resume it with as many (this one has {self.world.size})"
                )
            ckpt.set_rng_state(state["rng"][self.world.rank], self.device)
        else:
            # dropout in the frozen base: the same draws in every run of this seed (a stream per rank)
            torch.manual_seed(cfg.seed + self.world.rank)
        self.forward_model = dist_.wrap(self.model, self.world, self.device)
        self.ddp = self.forward_model if self.forward_model is not self.model else None
        if cfg.compile:
            # the whole model (DDP-wrapped under torchrun) in torch.compile's default mode; evaluation
            # stays eager (no_grad, eval mode and other batch sizes would be graphs of their own)
            self.forward_model = torch.compile(self.forward_model)

    # -- training ----------------------------------------------------------------------------------------
    def train_step(self, step: int) -> float:
        """One optimizer step on global batch `step` (grad_accumulation micro-batches of batch_size);
        returns its mean loss over the whole batch (all micro-batches, all ranks)."""
        cfg = self.cfg
        indices = self.order.batch(step)
        micros = micro_batches(indices, cfg.batch_size)
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for k, micro in enumerate(micros):
            mine = dist_.shard(micro, self.world)
            # This rank's loss on this micro-batch counts by its share of the step's whole batch, so the
            # accumulated gradient, once DDP has averaged it over the ranks, is that of the mean loss over
            # the step batch: the update of one large batch, also when the last micro-batch is short.
            # A rank with no share (a micro-batch smaller than the world) runs one example at weight 0:
            # every rank must take part in the gradient reduction.
            weight = len(mine) * self.world.size / len(indices)
            batch = to_device(collate(self.splits["train"], mine or micro[:1], self.pad_id), self.device)
            if cfg.compile:  # padded lengths and last batches vary: one graph for every shape
                for tensor in batch.values():
                    for dim in range(tensor.dim()):
                        torch._dynamo.maybe_mark_dynamic(tensor, dim)
            # DDP reduces the gradients once, after the last micro-batch (eager mode; a compiled DDP
            # model reduces after each one, which sums to the same gradient)
            last = k == len(micros) - 1
            quiet = self.ddp is not None and not last and not cfg.compile
            with self.ddp.no_sync() if quiet else contextlib.nullcontext():
                with autocast(cfg.precision, self.device):
                    loss = task_loss(self.forward_model(**batch), batch, self.task, self.target_scale)
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"training loss is {loss.item()} at step {step}: lower --lr (now {cfg.lr}) or check the labels"
                    )
                self.scaler.scale(loss if weight == 1.0 else loss * weight).backward()
            total += loss.item() * weight
        if self.scaler.is_enabled():
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
        self.scaler.step(self.optimizer)  # = optimizer.step(), unless fp16 gradients overflowed
        self.scaler.update()
        self.scheduler.step()  # steps count optimizer steps, skipped ones (fp16 overflow) included
        return dist_.mean_over_ranks(total, self.world, self.device)

    def loop(self) -> None:
        cfg, state, order = self.cfg, self.state, self.order
        self.has_validation = self.validation_ready()
        self.model.train()
        start = time.perf_counter()
        bar = progress_bar(
            None,
            desc="train",
            enabled=cfg.progress and self.world.is_main,
            total=self.total,
            initial=state["step"],
            unit="step",
        )
        for key in ("step_times", "first_steps", "recompiling_steps"):
            state.setdefault(key, [])
        first = True  # a resumed run compiles anew: each compiled process's first step is recorded
        while state["step"] < self.total:
            graphs, t_step = _dynamo_graphs(), time.perf_counter()
            loss_value = self.train_step(state["step"])
            seconds = time.perf_counter() - t_step  # loss.item() waited for the GPU
            state["step_times"].append(seconds)
            if first and cfg.compile:
                state["first_steps"].append(seconds)
            elif cfg.compile and _dynamo_graphs() != graphs:
                state["recompiling_steps"].append(seconds)
            first = False
            state["step"] += 1
            state["loss_sum"] += loss_value
            state["loss_count"] += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}", refresh=False)
            step = state["step"]
            done = step == self.total
            evaluate_now = (
                done
                or (cfg.eval_every and step % cfg.eval_every == 0)
                or (not cfg.eval_every and step % order.steps_per_epoch == 0)
            )
            if evaluate_now:
                t = time.perf_counter()
                record = self.on_main(self._evaluate_and_keep_best)
                start += time.perf_counter() - t  # evaluation time is not training time
                if record is not None:
                    bar.write(_format_record(record))
                    warning = collapse_warning(self.task, record, record.get("split", ""))
                    if warning:
                        bar.write(f"warning: {warning}")
            if done or evaluate_now or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0):
                self.timings["train_s"] += time.perf_counter() - start
                start = time.perf_counter()
                self._checkpoint()
            if evaluate_now or done or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0):
                bar.unpause()  # the bar's step rate leaves evaluation and checkpoint time out
        bar.close()
        self.timings["train_s"] += time.perf_counter() - start
        self._step_timings()

    def validation_ready(self) -> bool:
        """Whether the run has a labelled validation split to evaluate and select on."""
        return "validation" in self.splits and self.splits["validation"].labels is not None

    def _step_timings(self) -> None:
        """Median step time over the run; with --compile, the compile time: the first step's extra time
        over the median (and steps after it that compiled again, if a shape or guard asked for it)."""
        state = self.state
        if not state["step_times"]:
            return
        median = statistics.median(state["step_times"])
        self.timings["step_median_s"] = median
        if self.cfg.compile:
            self.timings["compile_s"] = sum(max(0.0, t - median) for t in state["first_steps"])
            self.timings["recompile_steps"] = len(state["recompiling_steps"])
            self.timings["recompile_s"] = sum(max(0.0, t - median) for t in state["recompiling_steps"])

    def _evaluate_and_keep_best(self) -> dict:
        state, order = self.state, self.order
        recent = state["step_times"][-state["loss_count"] :] if state["loss_count"] else []
        record = {
            "step": state["step"],
            "epoch": state["step"] / order.steps_per_epoch,
            "train_loss": state["loss_sum"] / max(1, state["loss_count"]),
            "lr": self.scheduler.get_last_lr()[0],
        }
        if recent:
            record["step_s"] = statistics.median(recent)  # median step time since the previous record
        state["loss_sum"], state["loss_count"] = 0.0, 0
        if self.has_validation:
            t = time.perf_counter()
            subset = self.selection is not self.splits["validation"]
            metrics = evaluate(
                self.model,
                self.selection,
                self.task,
                self.cfg.eval_batch_size,
                self.pad_id,
                self.device,
                desc="eval validation" + (" subset" if subset else ""),
                progress=self.cfg.progress,
                precision=self.cfg.precision,
                baseline=self.baseline,
            )
            self.timings["eval_s"] += time.perf_counter() - t
            record.update(split="validation", **metrics)
            if subset:
                record["examples"] = len(self.selection)
            main = self.task.main_metric
            if state["best"] is None or metrics[main] > state["best"]["metrics"][main]:
                state["best"] = {"step": state["step"], "metrics": metrics}
                save_adapter_dir(self.model, self.out / "best", self.cfg)
        append_jsonl(self.out / "metrics.jsonl", record)
        return record

    def _checkpoint(self) -> None:
        rng = dist_.all_gather(ckpt.rng_state(self.device), self.world)  # every rank's dropout stream

        def save():
            self.state.update(
                optimizer=self.optimizer.state_dict(),
                scheduler=self.scheduler.state_dict(),
                rng=rng,
                timings=dict(self.timings),
            )
            if self.scaler.is_enabled():
                self.state["scaler"] = self.scaler.state_dict()
            ckpt.save_checkpoint(self.out, self.model, self.cfg.adapter_name, self.state)

        self.on_main(save)

    # -- the end -----------------------------------------------------------------------------------------
    def finish(self) -> RunResult:
        """Rank 0: the final adapter (the best on validation when there is one, else the last), scored on test."""
        out, state, cfg = self.out, self.state, self.cfg
        final = out / "adapter"
        shutil.rmtree(final, ignore_errors=True)
        shutil.rmtree(out / "init", ignore_errors=True)
        if self.has_validation and (out / "best").is_dir():
            sa_adapters.delete_adapter(self.model, cfg.adapter_name)
            sa_adapters.load_adapter(self.model, str(out / "best"), cfg.adapter_name, load_head=True)
            shutil.copytree(out / "best", final)
        else:
            save_adapter_dir(self.model, final, cfg)
        # Validation scores of the selected adapter are those it was selected with (same weights), or,
        # when it was selected on a subset (--eval-max-examples), its scores on the whole split.
        validation = state["best"]["metrics"] if state["best"] is not None else None
        test = baselines = None
        t = time.perf_counter()
        if validation is not None and self.selection is not self.splits["validation"]:
            validation = evaluate(
                self.model,
                self.splits["validation"],
                self.task,
                cfg.eval_batch_size,
                self.pad_id,
                self.device,
                desc="final validation",
                progress=cfg.progress,
                precision=cfg.precision,
            )
        if "test" in self.splits and self.splits["test"].labels is not None:
            test = evaluate(
                self.model,
                self.splits["test"],
                self.task,
                cfg.eval_batch_size,
                self.pad_id,
                self.device,
                desc="final test",
                progress=cfg.progress,
                precision=cfg.precision,
                baseline=self.baseline,
            )
        self.timings["eval_s"] += time.perf_counter() - t
        if test is not None and self.task.generation:  # the lead and zero-shot baselines, predictions.jsonl
            t = time.perf_counter()
            baselines = generation.finish_test(self.model, self.splits["test"], cfg, out, self.device)
            self.timings["eval_s"] += time.perf_counter() - t
        best_step = state["best"]["step"] if state["best"] is not None else None
        for split, metrics in (("validation", validation), ("test", test)):
            if metrics is not None:
                append_jsonl(
                    out / "metrics.jsonl",
                    {"step": best_step or state["step"], "final": True, "split": split, **metrics},
                )
        sa_adapters.write_model_card(str(final), metrics={"validation": validation, "test": test})
        counts = dict(sa_adapters.trainable_parameters(self.model))
        counts["head"] = sum(p.numel() for p in head_parameters(self.model))
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
            target_normalization=self.target,
            objective=self.objective,
            baselines=baselines,
        )
        write_results(result)
        return result


def train(cfg: TrainConfig, *, log: Callable[[str], None] = print) -> Optional[RunResult]:
    """Prune at initialization -> fine-tune -> select on validation -> evaluate on test -> save.

    Returns the result on rank 0 (and in a single process); None on the other ranks of a torchrun job.
    """
    if cfg.task in FILE_TASKS:  # extractive question answering: a span head, windows, EM/F1 (qa.py)
        from .qa import QARun

        run = QARun(cfg, log)
    else:
        run = Run(cfg, log)
    try:
        run.setup()
        run.loop()
        result = run.on_main(run.finish) if run.world.distributed else run.finish()
        return result if run.world.is_main else None
    finally:
        # DDP's reducer holds gloo work: drop it while the process group is alive, then tear down
        run.forward_model = None
        gc.collect()
        dist_.close(run.world)
