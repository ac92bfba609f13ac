"""Tokenize once, pad per batch, and draw batches in an order that a resumed run can replay.

Training order is a pure function of (seed, epoch), so a run resumed at step k takes exactly the
batches the uninterrupted run would have taken; nothing about the order lives in a DataLoader.
"""

import math
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence

import torch
from torch import Tensor

from .data.example import Example
from .tasks import TaskSpec


@dataclass
class EncodedSplit:
    """Token ids of one split (unpadded) and its labels (None when the split has none)."""

    features: List[Dict[str, List[int]]]
    labels: Optional[Tensor]

    def __len__(self) -> int:
        return len(self.features)

    def subset(self, keep: Sequence[int]) -> "EncodedSplit":
        """The examples at indices `keep`, in that order."""
        labels = self.labels[list(keep)] if self.labels is not None else None
        return EncodedSplit([self.features[i] for i in keep], labels)


def encode(tokenizer, examples: Sequence[Example], task: TaskSpec, max_length: int) -> EncodedSplit:
    texts = [e.text for e in examples]
    pairs = [e.text_pair or "" for e in examples] if task.pair else None
    out = tokenizer(texts, pairs, truncation=True, max_length=max_length)
    keys = [k for k in ("input_ids", "token_type_ids", "attention_mask") if k in out]
    features = [{k: out[k][i] for k in keys} for i in range(len(examples))]
    if any(e.label is None for e in examples):
        labels = None
    elif task.is_regression:
        labels = torch.tensor([float(e.label) for e in examples], dtype=torch.float32)
    else:
        labels = torch.tensor([int(e.label) for e in examples], dtype=torch.long)
    return EncodedSplit(features, labels)


def collate(split: EncodedSplit, indices: Sequence[int], pad_id: int) -> Dict[str, Tensor]:
    """Pad to the longest example of the batch (right padding, attention mask 0 on pads); a feature that is
    one int per example becomes a [batch] tensor. A split that collates its own batches (generation.LMSplit:
    prompts and targets) is asked to."""
    own = getattr(split, "collate_batch", None)
    if own is not None:
        return own(indices, pad_id)
    rows = [split.features[i] for i in indices]
    width = max(len(r["input_ids"]) for r in rows)
    batch = {}
    for key in rows[0]:
        if isinstance(rows[0][key], int):  # one number per example (a span's start_positions, end_positions)
            batch[key] = torch.tensor([r[key] for r in rows], dtype=torch.long)
            continue
        fill = pad_id if key == "input_ids" else 0
        batch[key] = torch.tensor([r[key] + [fill] * (width - len(r[key])) for r in rows], dtype=torch.long)
    if "attention_mask" not in batch:
        batch["attention_mask"] = torch.tensor(
            [[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in rows], dtype=torch.long
        )
    if split.labels is not None:
        batch["labels"] = split.labels[list(indices)]
    return batch


class TrainOrder:
    """Batch k of the run: epoch k // steps_per_epoch, slice k % steps_per_epoch of that epoch's
    permutation, the permutation drawn from a generator seeded by (seed, epoch)."""

    def __init__(self, size: int, batch_size: int, seed: int):
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.steps_per_epoch = math.ceil(size / batch_size)
        self._epoch, self._perm = -1, None

    def permutation(self, epoch: int) -> Tensor:
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.size, generator=gen)
        return self._perm

    def batch(self, step: int) -> List[int]:
        epoch, index = divmod(step, self.steps_per_epoch)
        perm = self.permutation(epoch)
        return perm[index * self.batch_size : (index + 1) * self.batch_size].tolist()


def eval_batches(split: EncodedSplit, batch_size: int) -> Iterator[List[int]]:
    """Batches of similar lengths (less padding); predictions are put back in example order by the caller."""
    order = sorted(range(len(split)), key=lambda i: len(split.features[i]["input_ids"]))
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]
