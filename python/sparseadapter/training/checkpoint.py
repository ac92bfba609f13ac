"""Resumable checkpoints: the adapter (with its CSR pattern) plus everything else a run needs to go on
exactly as if it had never stopped: optimizer, scheduler, RNG states, step and the best result so far.

A checkpoint is a folder written complete under a temporary name and then swapped in, so a run killed
at any moment leaves the previous checkpoint whole. The state file is read with `weights_only=True`:
no code from a file runs; its fields are checked before they are used. A resume takes the newest
checkpoint that reads whole and falls back to the previous one (`checkpoint.old`, left by an
interrupted swap) when the newest does not.
"""

import math
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn

from ..adapters.io import check_adapter_files, fsync_dir, load_adapter, save_adapter

CHECKPOINT = "checkpoint"
STATE_FILE = "trainer_state.pt"


def rng_state(device: torch.device) -> Dict[str, Any]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: Dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def save_checkpoint(run_dir: Path, model: nn.Module, adapter: str, state: Dict[str, Any]) -> Path:
    final = run_dir / CHECKPOINT
    tmp, old = run_dir / f"{CHECKPOINT}.tmp", run_dir / f"{CHECKPOINT}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    save_adapter(model, str(tmp / "adapter"), adapter, include_head=True)
    torch.save(state, tmp / STATE_FILE)
    fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(run_dir)
    shutil.rmtree(old, ignore_errors=True)
    return final


def find_checkpoints(run_dir: Path) -> List[Path]:
    """The complete-looking checkpoints, newest first: `checkpoint`, then `.old` (the previous one, left
    only when a swap was interrupted)."""
    found = []
    for name in (CHECKPOINT, f"{CHECKPOINT}.old"):
        path = run_dir / name
        if (path / STATE_FILE).is_file() and (path / "adapter").is_dir():
            found.append(path)
    return found


def find_checkpoint(run_dir: Path) -> Optional[Path]:
    """The newest complete-looking checkpoint, or None."""
    found = find_checkpoints(run_dir)
    return found[0] if found else None


def usable_checkpoint(run_dir: Path, log: Callable[[str], None] = print) -> Optional[Path]:
    """The newest checkpoint whose state and adapter files read whole (checksums, types), falling back
    to the previous one with a line that says why; None when there is none; ValueError naming the
    first problem when none of those there reads."""
    errors = []
    for path in find_checkpoints(run_dir):
        try:
            read_state(path)
            check_adapter_files(str(path / "adapter"))
        except (ValueError, OSError) as err:
            errors.append(err)
            continue
        if errors:
            log(f"warning: {errors[0]}; resuming from the previous checkpoint, {path.name}")
        return path
    if errors:
        raise ValueError(str(errors[0]))
    return None


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_state(state: Any, where: str) -> None:
    """The trainer state's fields have the types the trainer uses: a ValueError naming the field, never
    a TypeError halfway through resuming."""
    if not isinstance(state, dict) or "step" not in state:
        raise ValueError(f"{where} is not a sparseadapter trainer state")

    def bad(field: str, expected: str) -> None:
        raise ValueError(f"{where}: {field} is {state.get(field)!r}, expected {expected}")

    if not _is_int(state["step"]) or state["step"] < 0:
        bad("step", "an int >= 0")
    for field in ("optimizer", "scheduler"):
        if not isinstance(state.get(field), dict):
            bad(field, "a state dict")
    rng = state.get("rng")
    if (
        not isinstance(rng, list)
        or not rng
        or not all(
            isinstance(r, dict)
            and isinstance(r.get("cpu"), torch.Tensor)
            and r["cpu"].dtype == torch.uint8
            and all(isinstance(v, torch.Tensor) and v.dtype == torch.uint8 for v in r.values())
            for r in rng
        )
    ):
        bad("rng", "a list of RNG states (uint8 tensors), one per process")
    if not _is_number(state.get("loss_sum", 0.0)):
        bad("loss_sum", "a finite number")
    if not _is_int(state.get("loss_count", 0)) or state.get("loss_count", 0) < 0:
        bad("loss_count", "an int >= 0")
    best = state.get("best")
    if best is not None and not (
        isinstance(best, dict)
        and _is_int(best.get("step"))
        and best["step"] >= 0
        and isinstance(best.get("metrics"), dict)
        and all(isinstance(k, str) and _is_number(v) for k, v in best["metrics"].items())
    ):
        bad("best", "null or {step: int, metrics: {name: number}}")
    names = state.get("param_names")
    if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        bad("param_names", "a list of parameter names")
    timings = state.get("timings", {})
    if not (isinstance(timings, dict) and all(isinstance(k, str) and _is_number(v) for k, v in timings.items())):
        bad("timings", "a mapping of names to seconds")


def read_state(path: Path) -> Dict[str, Any]:
    """The checkpoint's trainer state, read with weights_only and checked (check_state)."""
    try:
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, corrupted, or a pickle that wants to run code: say which file
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        reason = next((line for line in lines if "Unsupported global" in line), lines[0] if lines else repr(err))
        raise ValueError(f"cannot read checkpoint state {path / STATE_FILE}: {reason}") from None
    check_state(state, str(path / STATE_FILE))
    return state


def load_checkpoint(path: Path, model: nn.Module, adapter: str) -> Dict[str, Any]:
    """Attach the checkpoint's adapter (pattern, values and head) to `model`; return the trainer state."""
    state = read_state(path)
    load_adapter(model, str(path / "adapter"), adapter, load_head=True)
    return state
