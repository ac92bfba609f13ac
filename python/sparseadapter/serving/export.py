"""Export a sequence classifier with (sparse) adapters for serving without Python.

Formats:
  torchscript  torch.jit.trace of `ServingModel`; loads in C++ with torch::jit::load plus our op
               library, which is what `sparseadapter_serve` does. Tracing, not scripting: Hugging
               Face encoders are not scriptable, and our adapters run inside forward hooks, which a
               trace records like any other op.
  export       a torch.export ExportedProgram (.pt2) with dynamic batch and sequence length.
  aoti         that program compiled by AOTInductor into a package (.pt2); our ops stay calls into
               the op library (loaded by `import sparseadapter`, or linked in C++).

Every file carries `sparseadapter.json` (SERVING_FORMAT, below): the task, label names, vocabulary
size, maximum length and pad id that a server needs to validate and answer requests. A regression
head trained on standardized targets (sparseadapter.adapters.head) maps them back to label units inside
the graph, so a served score is a label; the metadata's `target_normalization` (mean, scale) only
records that it does (null for classification and for heads in raw units). The exported
graph is checked against the eager model on a second input shape before the file is written.
"""

import inspect
import io
import json
import os
import warnings
from typing import Dict, List, Optional

import torch
from torch import Tensor, nn

from ..adapters.head import target_normalization
from ..adapters.io import atomic_write

FORMATS = ("torchscript", "export", "aoti")
METADATA_FILE = "sparseadapter.json"
SERVING_FORMAT = {"format": "sparseadapter-serving", "version": 1}
# Positions that models with learned positions offset by padding_idx + 1 cannot use for tokens.
_POSITION_OFFSET = {"roberta": 2, "xlm-roberta": 2, "camembert": 2}
CHECK_RTOL = 1e-4


def _takes_token_types(model: nn.Module) -> bool:
    """Whether the model's forward accepts token_type_ids and has a token-type embedding to use them."""
    takes = "token_type_ids" in inspect.signature(model.forward).parameters
    return bool(takes and getattr(getattr(model, "config", None), "type_vocab_size", 0))


class ServingModel(nn.Module):
    """`forward(input_ids, attention_mask, token_type_ids) -> logits [batch, num_labels]`: the one
    signature servers call (int64 inputs [batch, length]; token_type_ids is ignored by models
    without token types)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.uses_token_types = _takes_token_types(model)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor) -> Tensor:
        if self.uses_token_types:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        else:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        return out.logits if hasattr(out, "logits") else out[0]

    def example(self, meta: Dict, batch: int, length: int, seed: int = 0) -> "tuple[Tensor, ...]":
        """Valid inputs of forward (example_inputs)."""
        return example_inputs(meta, batch, length, seed)


def serving_metadata(
    model: nn.Module,
    *,
    labels: Optional[List[str]] = None,
    pad_token_id: Optional[int] = None,
    max_length: Optional[int] = None,
) -> Dict:
    """What a server needs besides the graph; defaults come from the Hugging Face config."""
    config = model.config
    num_labels = int(config.num_labels)
    regression = config.problem_type == "regression" or num_labels == 1
    if labels is None and not regression:
        id2label = getattr(config, "id2label", None) or {}
        labels = [str(id2label.get(i, id2label.get(str(i), i))) for i in range(num_labels)]
    if labels is not None and len(labels) != num_labels:
        raise ValueError(f"{len(labels)} label names for a model with {num_labels} outputs")
    positions = int(config.max_position_embeddings) - _POSITION_OFFSET.get(config.model_type, 0)
    pad = pad_token_id if pad_token_id is not None else getattr(config, "pad_token_id", None)
    return dict(
        SERVING_FORMAT,
        task="regression" if regression else "classification",
        num_labels=num_labels,
        labels=None if regression else [str(x) for x in labels],
        vocab_size=int(config.vocab_size),
        max_length=min(positions, max_length) if max_length else positions,
        pad_token_id=int(pad if pad is not None else 0),
        type_vocab_size=int(config.type_vocab_size) if _takes_token_types(model) else 0,
        target_normalization=_normalization(model) if regression else None,
    )


def _normalization(model: nn.Module) -> Optional[Dict]:
    norm = target_normalization(model)
    return {"mean": norm[0], "scale": norm[1], "applied": "in the graph"} if norm else None


def example_inputs(meta: Dict, batch: int, length: int, seed: int = 0) -> "tuple[Tensor, Tensor, Tensor]":
    """Random valid token ids; every row after the first is padded, so a trace records the masking."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, meta["vocab_size"], (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    for row in range(1, batch):
        keep = max(1, length - 1 - (row * 3) % length)
        mask[row, keep:] = 0
        ids[row, keep:] = meta["pad_token_id"]
    types = torch.zeros(batch, length, dtype=torch.long)
    return ids, mask, types


def _check_same(run_exported, serving: ServingModel, meta: Dict) -> None:
    """The exported graph against eager on a shape the export did not see."""
    inputs = serving.example(meta, 3, min(23, meta["max_length"]), seed=1)
    with torch.inference_mode():
        want, got = serving(*inputs), run_exported(*inputs)
    scale = max(want.abs().max().item(), 1e-6)
    err = (got - want).abs().max().item()
    if got.shape != want.shape or not err <= CHECK_RTOL * scale:
        raise RuntimeError(
            f"the exported graph does not reproduce the model on a new input shape "
            f"(max abs error {err:.3g} at output scale {scale:.3g}); not written"
        )


def _trace(serving: ServingModel, example) -> torch.jit.ScriptModule:
    # Tracer warnings flag Python values computed from tensors (Hugging Face's mask code has a few);
    # they are harmless here, and _check_same verifies the graph on another shape.
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", FutureWarning)  # transformers' deprecation notices, met in forward
        traced = torch.jit.trace(serving, example, check_trace=False, strict=False)
    return traced


def _export_program(serving: ServingModel, example, meta: Dict):
    batch = torch.export.Dim("batch", min=1, max=4096)
    length = torch.export.Dim("length", min=1, max=meta["max_length"])
    dims = {
        "input_ids": {0: batch, 1: length},
        "attention_mask": {0: batch, 1: length},
        "token_type_ids": {0: batch, 1: length},
    }
    if len(example) == 4:  # MultiAdapterServingModel: an adapter index per row
        dims["adapter_index"] = {0: batch}
    with torch.no_grad():
        return torch.export.export(serving, example, dynamic_shapes=dims, strict=False)


def export_model(
    model: nn.Module,
    path: str,
    *,
    fmt: str = "torchscript",
    meta: Optional[Dict] = None,
    example_length: int = 16,
    serving: Optional[ServingModel] = None,
) -> Dict:
    """Write `model` (already in inference form, see prepare_for_inference) to `path` in format `fmt`.
    `serving`: the wrapper whose forward is exported (default ServingModel(model); a
    MultiAdapterServingModel takes an adapter index per row too). Returns the metadata stored with it."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    meta = meta if meta is not None else serving_metadata(model)
    serving = (serving if serving is not None else ServingModel(model)).eval()
    example = serving.example(meta, 2, min(example_length, meta["max_length"]))
    extra = {METADATA_FILE: json.dumps(meta)}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if fmt == "torchscript":
        traced = _trace(serving, example)
        _check_same(traced, serving, meta)
        buffer = io.BytesIO()
        torch.jit.save(traced, buffer, _extra_files=extra)
        atomic_write(path, buffer.getvalue())
        return meta
    program = _export_program(serving, example, meta)
    if fmt == "export":
        _check_same(program.module(), serving, meta)
        buffer = io.BytesIO()
        torch.export.save(program, buffer, extra_files=extra)
        atomic_write(path, buffer.getvalue())
        return meta
    from torch._inductor import aoti_compile_and_package, aoti_load_package

    tmp = f"{path}.tmp-aoti.pt2"
    try:
        aoti_compile_and_package(program, package_path=tmp)
        _check_same(aoti_load_package(tmp), serving, meta)
        with open(tmp, "rb") as f:
            package = f.read()
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    atomic_write(path, package)
    atomic_write(path + ".json", extra[METADATA_FILE].encode())  # a package has no extra-files slot
    return meta
