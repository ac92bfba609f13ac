"""The path measurements of this machine, kept across processes.

In auto mode each process measures every new problem once (see `set_path_mode`). This module saves
those measurements at exit, one file per machine, and loads them at import, so that a later process
on the same machine runs the measured path from its first call. A machine is what the measurements
depend on: the CPU model and the vector variant our kernels run, the GPUs, torch, and this build of
the extension; a file made on another machine (or by another build) is never used. Measurements are
made at whatever thread count the process that made them ran; `clear_path_decisions()` before a
run, or deleting the file, measures again.

Location: the folder SPARSEADAPTER_CACHE_DIR (default ~/.cache/sparseadapter); an empty
SPARSEADAPTER_CACHE_DIR turns the cache off. `save_path_decisions` and `load_path_decisions` do the
same explicitly, with a file of your choice.
"""

import atexit
import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Dict, Optional

import torch

from . import _C
from .ops import cpu_isa, path_decisions

CACHE_ENV = "SPARSEADAPTER_CACHE_DIR"
FORMAT = "sparseadapter-path-decisions-1"


def machine() -> Dict[str, object]:
    """What a measurement depends on besides the problem itself."""
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        isa = cpu_isa()
    except RuntimeError:  # a bad SPARSEADAPTER_CPU_ISA: the kernels' call will say so
        isa = "invalid"
    build = Path(_C.__file__).stat()
    return {
        "cpu": cpu,
        "cpu_isa": isa,
        "gpus": _gpu_models(),
        "torch": torch.__version__,
        "extension_build": f"{build.st_size}-{build.st_mtime_ns}",
    }


def _gpu_models() -> list:
    """The NVIDIA driver's model names, read without initializing CUDA (this runs at import, and a
    process that initialized CUDA can no longer fork workers that use it)."""
    models = []
    for info in sorted(Path("/proc/driver/nvidia/gpus").glob("*/information")):
        try:
            models += [
                line.split(":", 1)[1].strip() for line in info.read_text().splitlines() if line.startswith("Model:")
            ]
        except OSError:
            models.append("unreadable")
    return models


def default_path() -> Optional[Path]:
    """This machine's file in the cache folder; None when the cache is off."""
    folder = os.environ.get(CACHE_ENV, str(Path.home() / ".cache" / "sparseadapter"))
    if not folder:
        return None
    key = hashlib.sha256(json.dumps(machine(), sort_keys=True).encode()).hexdigest()[:16]
    return Path(folder) / f"path-decisions-{key}.json"


def save_path_decisions(path: Optional[os.PathLike] = None) -> Optional[Path]:
    """Write this process's measurements (merged with those already in the file) to `path` (default:
    this machine's cache file); returns the file, or None when the cache is off. Atomic: a
    concurrent reader sees the old file or the new one."""
    path = Path(path) if path is not None else default_path()
    if path is None:
        return None
    entries = {}
    if path.is_file():
        try:
            entries = {_key(d): d for d in _read(path)}
        except ValueError:
            pass  # replaced below by this process's measurements
    for d in path_decisions():
        if d["source"] == "measured":
            entry = {k: d[k] for k in ("op", "device", "dtype", "tokens", "path", "ms_sparse", "ms_dense")}
            entry["dims"] = list(d["dims"])
            entries[_key(entry)] = entry
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"format": FORMAT, "machine": machine(), "decisions": list(entries.values())}
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=path.name, suffix=".tmp", delete=False) as f:
        json.dump(data, f, indent=1)
    os.replace(f.name, path)
    return path


def load_path_decisions(path: Optional[os.PathLike] = None) -> int:
    """Take the measurements in `path` (default: this machine's cache file, if any) as this process's
    decisions; returns how many. A file of another machine or a malformed one raises ValueError."""
    path = Path(path) if path is not None else default_path()
    if path is None or not path.is_file():
        return 0
    decisions = _read(path)
    for d in decisions:
        _C.seed_path_decision(
            d["op"], d["device"], d["dtype"], d["dims"], d["tokens"], d["path"], _ms(d["ms_sparse"]), _ms(d["ms_dense"])
        )
    return len(decisions)


def _read(path: Path) -> list:
    try:
        data = json.loads(path.read_text())
        if data.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} file")
        if data.get("machine") != machine():
            raise ValueError(f"measured on another machine or build: {data.get('machine')} (this one: {machine()})")
        decisions = list(data["decisions"])
        for d in decisions:
            if not (
                isinstance(d["op"], str)
                and isinstance(d["device"], str)
                and isinstance(d["dtype"], str)
                and len(d["dims"]) == 6
                and d["path"] in ("sparse", "dense")
                and int(d["tokens"]) > 0
            ):
                raise ValueError(f"malformed entry {d}")
    except (OSError, KeyError, TypeError, AttributeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a path-decision file ({type(err).__name__}: {err})") from None
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    return decisions


def _key(d: dict) -> tuple:
    return d["op"], d["device"], d["dtype"], tuple(d["dims"]), d["tokens"]


def _ms(value) -> float:
    return float("nan") if value is None else float(value)


def install() -> None:
    """At import: load this machine's measurements; at exit: save this process's. A cache that cannot
    be read or written is reported as a warning and otherwise ignored (it only saves measuring)."""
    try:
        load_path_decisions()
    except (ValueError, OSError) as err:
        warnings.warn(f"sparseadapter: path-decision cache not used: {err}", RuntimeWarning, stacklevel=2)

    def save_at_exit():
        try:
            save_path_decisions()
        except OSError as err:
            warnings.warn(f"sparseadapter: path-decision cache not written: {err}", RuntimeWarning, stacklevel=2)

    atexit.register(save_at_exit)
