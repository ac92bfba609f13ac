"""Fine-tuning text classifiers, regressors and generators (causal LM, seq2seq) with sparse adapters: the
run (`train`, `evaluate_saved`), its config, tasks, data readers and metrics."""

from .config import TrainConfig
from .data.bbc import read_bbc_headlines, read_bbc_news
from .data.example import SPLITS, DataError, Example
from .data.generation_tables import read_generation_table
from .data.glue import read_glue, read_hf_dataset
from .data.tables import read_table
from .data.task_inference import infer_table_task
from .engine import evaluate_saved
from .metrics import METRICS, accuracy, compute_metrics, f1, macro_f1, matthews_corrcoef, pearson, rouge, spearman
from .result import RunResult
from .run import train
from .tasks import TASKS, TaskSpec, get_task

__all__ = [
    "DataError",
    "Example",
    "METRICS",
    "RunResult",
    "SPLITS",
    "TASKS",
    "TaskSpec",
    "TrainConfig",
    "accuracy",
    "compute_metrics",
    "evaluate_saved",
    "f1",
    "get_task",
    "infer_table_task",
    "macro_f1",
    "matthews_corrcoef",
    "pearson",
    "read_bbc_headlines",
    "read_bbc_news",
    "read_generation_table",
    "read_glue",
    "read_hf_dataset",
    "read_table",
    "rouge",
    "spearman",
    "train",
]
