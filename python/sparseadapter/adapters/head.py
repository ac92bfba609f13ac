"""Target normalization of a regression head: train in standardized units, answer in label units.

A regression head trained on raw labels starts far from them (its output is about 0, the labels may sit
at 2.7 or at 60) and learns at a speed set by the label range: AdamW moves every weight by about the
learning rate per step whatever the gradient's size, so a head whose outputs must reach 0-100 moves
30 times too slowly in label terms and one for 0-1 three times too fast. On a frozen encoder the first
steps then chase the mean through the pooler's tanh until it saturates and every prediction is one
constant.

`set_target_normalization(model, mean, scale)` fixes both: the task head gets two buffers,
`target_mean` and `target_scale`, and a forward hook that turns its raw output z into z * scale + mean.
With mean and scale the training labels' mean and standard deviation, the raw output is the label in
standardized units: a head whose raw output starts near 0 (`sparseadapter train` draws the output
layer small, see training.engine.prepare_head) predicts the mean, the first loss is about 1 for any
label range, and the loss in standardized units ((prediction - label) / scale)^2 trains exactly the
same weights for labels y and a*y + b. Everything downstream (evaluation, `sparseadapter eval`,
inference form, TorchScript / torch.export / AOTInductor exports, `sparseadapter_serve`) sees the
head's hooked output, so predictions are in label units everywhere without a step of their own.

The buffers are part of the head's state dict, so `save_adapter(..., include_head=True)` stores them
with the head and `load_adapter` restores them (installing the hook on a model that has none).
"""

import math
from typing import Optional, Tuple

import torch
from torch import nn

MEAN, SCALE = "target_mean", "target_scale"
TARGET_KEYS = (MEAN, SCALE)


def head_module(model: nn.Module) -> nn.Module:
    """The model's task head (the first of api.HEAD_NAMES it has)."""
    from .api import HEAD_NAMES

    for name in HEAD_NAMES:
        module = getattr(model, name, None)
        if isinstance(module, nn.Module):
            return module
    raise ValueError(f"this model has no task head ({', '.join(HEAD_NAMES)}) to normalize the targets of")


def _denormalize(module: nn.Module, inputs, output):
    """Forward hook: the head's raw output in label units."""
    mean, scale = module._buffers.get(MEAN), module._buffers.get(SCALE)
    if mean is None or scale is None:
        return None
    return output * scale + mean


def _has_hook(module: nn.Module) -> bool:
    return any(h is _denormalize for h in module._forward_hooks.values())


def install(module: nn.Module, mean: float, scale: float) -> None:
    """Give the head module `module` the buffers (float32 scalars) and the hook; idempotent."""
    scale, mean = float(scale), float(mean)
    if not (math.isfinite(mean) and math.isfinite(scale) and scale > 0):
        raise ValueError(
            f"target normalization needs a finite mean and a positive finite scale, got mean {mean!r}, scale {scale!r}"
        )
    device = next((t.device for t in module.state_dict().values()), torch.device("cpu"))
    for name, value in ((MEAN, mean), (SCALE, scale)):
        module.register_buffer(name, torch.tensor(value, dtype=torch.float32, device=device), persistent=True)
    if not _has_hook(module):
        module.register_forward_hook(_denormalize)


def uninstall(module: nn.Module) -> None:
    """Remove the buffers and the hook: the head answers in its raw units again."""
    for name in TARGET_KEYS:
        module._buffers.pop(name, None)
    for key in [k for k, h in module._forward_hooks.items() if h is _denormalize]:
        del module._forward_hooks[key]


def installed(module: nn.Module) -> Optional[Tuple[float, float]]:
    mean, scale = module._buffers.get(MEAN), module._buffers.get(SCALE)
    if mean is None or scale is None or not _has_hook(module):
        return None
    return float(mean), float(scale)


def target_stats(labels) -> Tuple[float, float]:
    """(mean, scale) of regression labels: their mean and population standard deviation, in float64.
    A constant label set has no spread to standardize by: scale 1."""
    y = torch.as_tensor(labels, dtype=torch.float64).flatten()
    if y.numel() == 0:
        raise ValueError("target_stats: no labels")
    if not torch.isfinite(y).all():
        raise ValueError("target_stats: labels contain NaN or infinity")
    mean = float(y.mean())
    std = float(y.std(unbiased=False)) if y.numel() > 1 else 0.0
    return mean, (std if std > 1e-12 * max(1.0, abs(mean)) else 1.0)


def set_target_normalization(model: nn.Module, mean: float, scale: float) -> nn.Module:
    """Make the model's task head answer z * scale + mean for its raw output z (see the module docstring)."""
    install(head_module(model), mean, scale)
    return model


def clear_target_normalization(model: nn.Module) -> nn.Module:
    uninstall(head_module(model))
    return model


def target_normalization(model: nn.Module) -> Optional[Tuple[float, float]]:
    """(mean, scale) of the task head's normalization, or None when it answers in raw units."""
    model = getattr(model, "module", model)  # through DistributedDataParallel
    try:
        return installed(head_module(model))
    except ValueError:
        return None
