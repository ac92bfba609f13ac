"""The metadata lines every benchmark prints first (date, machine, versions, threads, load), and their
reading into a record's structured metadata (bench/record.py), so the two always agree."""

import datetime
import os
import platform
import re
from typing import Dict, List, Optional

import torch

import sparseadapter_ext


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def machine_header(args) -> List[str]:
    """The lines; the last one (device, dtype, timing) is the one suites replace with their own."""
    blas = re.search(r"BLAS_INFO=(\w+)", torch.__config__.show())
    lines = [
        f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"machine: {platform.node()} | {cpu_model()} | {os.cpu_count()} logical CPUs | "
        f"CPU capability {torch.backends.cpu.get_cpu_capability()} | our CPU kernels {sparseadapter_ext.cpu_isa()}",
        f"torch {torch.__version__} | BLAS {blas.group(1) if blas else 'unknown'} | "
        f"python {platform.python_version()} | our ops' path mode {sparseadapter_ext.path_mode()}",
        f"threads: torch.set_num_threads({args.threads}) | "
        + (f"clock {args.clock} | " if getattr(args, "clock", None) else "")
        + f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')} | "
        f"load average at start {' '.join(f'{v:.2f}' for v in os.getloadavg())}",
        f"device {args.device} | dtype {args.dtype} | "
        + (f"activation {args.activation} | " if getattr(args, "activation", None) else "")
        + f"min_run_time {args.min_run_time}s in {args.rounds} "
        f"interleaved rounds | seed {args.seed}",
    ]
    if args.device == "cuda":
        lines.insert(2, f"gpu: {torch.cuda.get_device_name()} | CUDA {torch.version.cuda}")
    return lines


def meta_from_header(lines: List[str]) -> Dict[str, object]:
    """A record's metadata read from machine_header's lines (None for what they do not say)."""
    meta: Dict[str, object] = dict.fromkeys(("date", "machine", "cpu", "isa", "torch", "python", "load", "gpu"))
    meta["threads"] = None
    for line in lines:
        key, _, rest = line.partition(": ")
        fields = [f.strip() for f in rest.split("|")]
        if key == "date":
            meta["date"] = rest.strip()
        elif key == "machine":
            meta["machine"] = rest.strip()
            meta["cpu"] = fields[1] if len(fields) > 1 else None
            capability = _after(fields, "CPU capability ")
            ours = _after(fields, "our CPU kernels ")
            meta["isa"] = ", ".join(filter(None, [capability, ours and f"our kernels {ours}"])) or None
        elif key == "gpu":
            meta["gpu"] = rest.strip()
        elif key == "threads":
            threads = re.search(r"set_num_threads\((\d+)\)", rest)
            meta["threads"] = int(threads.group(1)) if threads else None
            meta["load"] = _after(fields, "load average at start ")
        elif line.startswith("torch "):
            fields = [f.strip() for f in line.split("|")]
            meta["torch"] = _after(fields, "torch ")
            meta["python"] = _after(fields, "python ")
    return meta


def _after(fields: List[str], prefix: str) -> Optional[str]:
    return next((f[len(prefix) :] for f in fields if f.startswith(prefix)), None)
