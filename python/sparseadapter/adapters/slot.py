"""AdapterSlot: the adapters living at one place of a model, and the hook that runs them.

A slot is a child module named `sparseadapter` of the module it adapts (the host), so the host's own
parameter names never change (a base checkpoint still loads) and adapters appear in the module tree
where they act. Its hook is a bound method, so `copy.deepcopy` of the model copies it correctly.

Modes (what the hook computes; `x` the host input, `y` its output, `A_i` the active adapters):
- after:          y <- y + A_1(y), then + A_2(...) (stacked), or the fusion of all of them
- parallel:       y <- y + sum_i A_i(x)
- residual_input: for a post-LN FFN output block `LN(f(h) + r)`: r <- r + sum_i A_i(r), which is
                  exactly the parallel adapter `LN(f(h) + r + A(r))` on the FFN input r
- span:           parallel over two modules: x is the input of `span_start`, y the output of the host
- lora:           y <- y + sum_i A_i(x) for the adapters not merged into the host weight
- prefix:         no hook; the prefix attention function reads the slot's prefixes
"""
from typing import Dict, List, Optional

import torch
from torch import Tensor, nn

MODES = ("after", "parallel", "residual_input", "span", "lora", "prefix")
SLOT_ATTR = "sparseadapter"


def _first(output):
    return output[0] if isinstance(output, tuple) else output


def _replace_first(output, y):
    return (y,) + tuple(output[1:]) if isinstance(output, tuple) else y


class AdapterSlot(nn.Module):
    def __init__(self, mode: str, in_features: int, out_features: int) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"unknown adapter slot mode {mode!r}")
        self.mode = mode
        self.in_features, self.out_features = in_features, out_features
        self.adapters = nn.ModuleDict()
        self.fusions = nn.ModuleDict()
        self.active: List[str] = []
        self.active_fusion: Optional[str] = None
        self.merged: List[str] = []          # LoRA adapters folded into the host weight
        self.layer_index = -1                # prefix: which layer of the prefix generator
        self.__dict__["prefixes"] = {}       # prefix: name -> PrefixGenerator (owned by the model root)
        self.__dict__["_span_input"] = None

    # -- hooks --------------------------------------------------------------------------------
    def attach(self, host: nn.Module, span_start: Optional[nn.Module] = None) -> None:
        setattr(host, SLOT_ATTR, self)
        if self.mode in ("after", "parallel", "lora", "span"):
            host.register_forward_hook(self._forward_hook)
        elif self.mode == "residual_input":
            host.register_forward_pre_hook(self._residual_input_hook, with_kwargs=True)
        if self.mode == "span":
            span_start.register_forward_pre_hook(self._span_start_hook)
            self.__dict__["span_start"] = span_start

    def detach(self, host: nn.Module) -> None:
        modules = [host] + ([self.__dict__["span_start"]] if self.mode == "span" else [])
        for module in modules:
            for hooks in (module._forward_hooks, module._forward_pre_hooks):
                for key in [k for k, fn in hooks.items() if getattr(fn, "__self__", None) is self]:
                    del hooks[key]
                    module._forward_hooks_with_kwargs.pop(key, None)
                    module._forward_pre_hooks_with_kwargs.pop(key, None)
        delattr(host, SLOT_ATTR)

    def _running(self) -> List[str]:
        return [n for n in self.active if n not in self.merged]

    def _forward_hook(self, host, args, output):
        names = self._running()
        if not names and self.active_fusion is None:
            return output
        y = _first(output)
        if self.mode == "after":
            y = self.run_after(y)
        elif self.mode in ("parallel", "lora"):
            y = self._add(names, args[0], y)
        else:  # span
            x = self.__dict__["_span_input"]
            self.__dict__["_span_input"] = None
            if x is None:
                raise RuntimeError("sparseadapter: the span adapter's start module did not run before its end module")
            y = self._add(names, x, y)
        return _replace_first(output, y)

    def _span_start_hook(self, module, args):
        if self._running():
            self.__dict__["_span_input"] = args[0]

    def _residual_input_hook(self, host, args, kwargs):
        names = self._running()
        if not names:
            return None
        if len(args) >= 2:
            r = args[1]
            return (args[0], self._add(names, r, r)) + tuple(args[2:]), kwargs
        if "input_tensor" in kwargs:
            r = kwargs["input_tensor"]
            return args, dict(kwargs, input_tensor=self._add(names, r, r))
        raise RuntimeError("sparseadapter: the FFN output block was called without its residual input")

    # -- the math -----------------------------------------------------------------------------
    def _add(self, names: List[str], x: Tensor, base: Tensor) -> Tensor:
        """`base + sum_i A_i(x)`. Each adapter adds its output to the running sum itself (`A(x, base)`),
        a sparse bottleneck adapter inside its fused kernel."""
        for name in names:
            base = self.adapters[name](x, base)
        return base

    def run_after(self, y: Tensor) -> Tensor:
        if self.active_fusion is not None:
            fusion = self.fusions[self.active_fusion]
            outputs = [self._add([n], y, y) for n in fusion.adapter_names]
            return fusion(y, outputs)
        for name in self._running():
            y = self._add([name], y, y)
        return y

    def prefix_kv(self, batch: int, heads: int, head_dim: int, like: Tensor):
        """Key and value prefixes [batch, heads, l, head_dim] of the active prefix adapters, or None
        (`heads`: the key/value heads, fewer than the query heads under grouped-query attention)."""
        parts = [self.prefixes[n].layer_prefix(self.layer_index) for n in self.active if n in self.prefixes]
        if not parts:
            return None
        kv = torch.cat(parts, dim=1).to(like.dtype)        # [2, l, heads * head_dim]
        if kv.shape[-1] != heads * head_dim:
            raise RuntimeError(f"sparseadapter: the prefixes are {kv.shape[-1]} wide, the attention's keys "
                               f"{heads} heads x {head_dim} = {heads * head_dim}")
        kv = kv.reshape(2, kv.shape[1], heads, head_dim).permute(0, 2, 1, 3)
        return kv[0].expand(batch, -1, -1, -1), kv[1].expand(batch, -1, -1, -1)

    def extra_repr(self) -> str:
        return f"mode={self.mode}, in={self.in_features}, out={self.out_features}, active={self.active}"


def slots(model: nn.Module) -> Dict[str, AdapterSlot]:
    """Every slot of the model, by the name of its host module."""
    return {name.rpartition(".")[0]: m for name, m in model.named_modules() if isinstance(m, AdapterSlot)}
