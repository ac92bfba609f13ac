"""What a training run returns: the result record that the run writes and the report formats."""

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple

from .config import TrainConfig
from .tasks import TaskSpec


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
    # regression: the (mean, scale) the head standardizes its targets by (sparseadapter.adapters.head)
    target_normalization: Optional[Tuple[float, float]] = None
    objective: str = "classification"  # or regression, causal-lm, seq2seq, span (qa.QARun)
    # generation tasks: ROUGE of the lead baseline and of the base model zero-shot, on test
    baselines: Optional[Dict[str, Dict[str, float]]] = None
