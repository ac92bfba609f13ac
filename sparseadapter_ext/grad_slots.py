"""Gradients by name: an op's backward returns one gradient per input, in the order of the inputs.
GradSlots takes that order from the op's schema (or an autograd.Function's forward signature) and
the names of the differentiable inputs from one definition per op, so a backward says which gradient
is which and a change of signature moves the gradients with their inputs (or fails at import)."""

import functools
import inspect
from typing import Dict, Mapping, Optional, Sequence

from torch import Tensor

# A backward op names its outputs after the inputs they are the gradients of (schema: `Tensor grad_x`).
_GRAD_PREFIX = "grad_"


class GradSlots:
    """The inputs of one op, in order, and which of them take a gradient."""

    def __init__(self, owner: str, inputs: Sequence[str], differentiable: Sequence[str]):
        unknown = [name for name in differentiable if name not in inputs]
        if unknown:
            raise ValueError(f"{owner}: {unknown} are not among its inputs {list(inputs)}")
        self.owner = owner
        self.inputs = tuple(inputs)
        self.differentiable = tuple(differentiable)
        self._positions = {name: self.inputs.index(name) for name in self.differentiable}

    @classmethod
    def of_op(cls, op, differentiable: Sequence[str]) -> "GradSlots":
        """For an op registered with torch.library (its backward gets `ctx.needs_input_grad` and
        returns a gradient for each schema argument)."""
        return cls(str(op), [a.name for a in op._schema.arguments], differentiable)

    @classmethod
    def of_function(cls, function, differentiable: Sequence[str]) -> "GradSlots":
        """For a torch.autograd.Function (one gradient per argument of forward after ctx)."""
        names = list(inspect.signature(function.forward).parameters)[1:]
        return cls(function.__name__, names, differentiable)

    def needed(self, ctx) -> Dict[str, bool]:
        """Whether each differentiable input needs its gradient, by name."""
        return {name: bool(ctx.needs_input_grad[i]) for name, i in self._positions.items()}

    def pack(self, grads: Mapping[str, Optional[Tensor]]) -> tuple:
        """The backward's return tuple: each gradient at its input's position, None elsewhere.
        `grads` names every differentiable input (None for one not needed), and nothing else."""
        if grads.keys() != self._positions.keys():
            raise RuntimeError(
                f"{self.owner} backward: gradients for {sorted(grads)}, expected {sorted(self._positions)}"
            )
        out = [None] * len(self.inputs)
        for name, i in self._positions.items():
            out[i] = grads[name]
        return tuple(out)


class GradRoute:
    """From a backward op's outputs straight to a backward's return tuple, for a backward that runs on
    every training step: the op's output_mask read from `ctx.needs_input_grad` and its outputs put at
    their inputs' positions, with no dicts by name in between (the names are resolved once, here)."""

    def __init__(self, slots: GradSlots, backward_op):
        self.positions = tuple(slots.inputs.index(name) for name in _output_inputs(backward_op))
        unknown = [name for name in _output_inputs(backward_op) if name not in slots.differentiable]
        if unknown:
            raise ValueError(f"{slots.owner}: {backward_op} returns gradients of {unknown}, which take none")
        self.size = len(slots.inputs)

    def mask(self, ctx) -> list:
        needs = ctx.needs_input_grad
        return [bool(needs[i]) for i in self.positions]

    def pack(self, computed: Sequence[Tensor], mask: Sequence[bool]) -> tuple:
        out = [None] * self.size
        for i, g, m in zip(self.positions, computed, mask):
            if m:
                out[i] = g
        return tuple(out)


def backward_output_mask(backward_op, needed: Mapping[str, bool]) -> list:
    """A backward op's output_mask: one flag per output, from the forward inputs it is the gradient of."""
    return [bool(needed[name]) for name in _output_inputs(backward_op)]


def backward_outputs(backward_op, computed: Sequence[Tensor], mask: Sequence[bool]) -> Dict[str, Optional[Tensor]]:
    """A backward op's outputs by the forward input each is the gradient of (None where not asked)."""
    return {name: g if m else None for name, g, m in zip(_output_inputs(backward_op), computed, mask)}


@functools.cache
def _output_inputs(backward_op) -> tuple:
    """The forward inputs whose gradients a backward op returns, in its order."""
    names = tuple(r.name for r in backward_op._schema.returns)
    if not all(n.startswith(_GRAD_PREFIX) for n in names):
        raise RuntimeError(f"{backward_op}: its outputs must be named {_GRAD_PREFIX}<input>, got {names}")
    return tuple(n[len(_GRAD_PREFIX) :] for n in names)
