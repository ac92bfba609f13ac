"""Multi-process data-parallel training (torch.distributed DDP), launched with torchrun:

    torchrun --nproc_per_node 2 -m sparseadapter.cli train --batch-size 32 ...

`--batch-size` is the global batch: each of the W processes takes its share of every batch, the
losses are weighted by share size, and DDP averages the gradients, so W processes compute the update
one process would (up to float summation order). The pruning mask is computed once, on rank 0, and
every other rank loads that adapter from disk (the same checked save/load users have), then all
ranks compare a digest of their CSR patterns before training. Only rank 0 writes files and evaluates.
gloo on CPU, NCCL on CUDA.
"""

import hashlib
import inspect
import os
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.distributed as dist
from torch import nn

from ..sparse_linear import SparseLinear


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def init_world(device_name: str) -> World:
    """Join the process group torchrun describes in the environment; one process otherwise."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    if not dist.is_available():
        raise ValueError("WORLD_SIZE > 1 but this torch has no torch.distributed")
    use_cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def shard(indices: List[int], world: World) -> List[int]:
    """This rank's contiguous share of a global batch (sizes differ by at most one)."""
    if not world.distributed:
        return indices
    base, extra = divmod(len(indices), world.size)
    start = world.rank * base + min(world.rank, extra)
    return indices[start : start + base + (1 if world.rank < extra else 0)]


def pattern_digest(model: nn.Module) -> str:
    """SHA-256 over every SparseLinear's CSR arrays, in module order."""
    h = hashlib.sha256()
    for name, m in model.named_modules():
        if isinstance(m, SparseLinear):
            h.update(name.encode())
            for t in (m.crow_indices, m.col_indices):
                h.update(t.detach().to("cpu", torch.int64).numpy().tobytes())
    return h.hexdigest()


def check_same_pattern(model: nn.Module, world: World) -> None:
    if not world.distributed:
        return
    digests: List[Optional[str]] = [None] * world.size
    dist.all_gather_object(digests, pattern_digest(model))
    if len(set(digests)) != 1:
        raise RuntimeError(f"the pruning patterns differ between ranks (digests {digests}); refusing to train")


def all_gather(obj, world: World) -> list:
    if not world.distributed:
        return [obj]
    out: list = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def mean_over_ranks(value: float, world: World, device: torch.device) -> float:
    if not world.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)  # NCCL reduces CUDA tensors only
    dist.all_reduce(t)
    return float(t) / world.size


def wrap(model: nn.Module, world: World, device: torch.device) -> nn.Module:
    """DDP over the trainable parameters; the CSR index buffers are identical by construction (checked),
    so they are not re-broadcast every step."""
    if not world.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    # torch 2.13 renamed the option (and syncs once at init either way, which is harmless here)
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        return DistributedDataParallel(model, device_ids=ids, forward_sync_buffers=False)
    return DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)


def close(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.barrier()  # no rank tears gloo down while another still talks to it
        dist.destroy_process_group()
