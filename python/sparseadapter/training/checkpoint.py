"""Resumable checkpoints: the adapter (with its CSR pattern) plus everything else a run needs to go on
exactly as if it had never stopped: optimizer, scheduler, RNG states, step and the best result so far.

A checkpoint is a folder written complete under a temporary name and then swapped in, so a run killed
at any moment leaves the previous checkpoint whole. The state file is read with `weights_only=True`:
no code from a file runs.
"""
import os
import shutil
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from torch import nn

from ..adapters.io import fsync_dir, load_adapter, save_adapter

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


def find_checkpoint(run_dir: Path) -> Optional[Path]:
    """The newest complete checkpoint; `.old` is the previous one, left only if a swap was interrupted."""
    for name in (CHECKPOINT, f"{CHECKPOINT}.old"):
        path = run_dir / name
        if (path / STATE_FILE).is_file() and (path / "adapter").is_dir():
            return path
    return None


def load_checkpoint(path: Path, model: nn.Module, adapter: str) -> Dict[str, Any]:
    """Attach the checkpoint's adapter (pattern, values and head) to `model`; return the trainer state."""
    try:
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, corrupted, or a pickle that wants to run code: say which file
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        reason = next((line for line in lines if "Unsupported global" in line), lines[0] if lines else repr(err))
        raise ValueError(f"cannot read checkpoint state {path / STATE_FILE}: {reason}") from None
    if not isinstance(state, dict) or "step" not in state:
        raise ValueError(f"{path / STATE_FILE} is not a sparseadapter trainer state")
    load_adapter(model, str(path / "adapter"), adapter, load_head=True)
    return state

