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

A call routed per row (`model(..., adapter_names=[...])`, routing.py) replaces the active adapters:
each row runs the adapter it names, in the same modes, the slot's adapters in one op over the batch.
A slot given a serving table (`serve_from_table`, serving/adapter_tables.py) runs routed calls through
the table instead: the adapters a C++ server loads at run time.
"""

from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import sparseadapter_ext

from ..sparse_linear import pinned_layers

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
        self.merged: List[str] = []  # LoRA adapters folded into the host weight
        self.layer_index = -1  # prefix: which layer of the prefix generator
        self.__dict__["prefixes"] = {}  # prefix: name -> PrefixGenerator (owned by the model root)
        self.__dict__["_span_input"] = None
        self.__dict__["router"] = None  # the model's Router (routing.py), set when attached
        self.serving_table: Optional[nn.Module] = None  # serve_from_table
        # routed calls: the adapters' arrays concatenated once per state (sparse_adapter_multi), when
        # serving.keep_routed_packs gave the slot a MultiPackCache
        self.__dict__["multi_packs"] = None

    def serve_from_table(self, table: nn.Module) -> None:
        """Routed calls run `table(x, adapter_index, base)` (a serving/adapter_tables.SiteTable, whose
        adapters are filled at run time) instead of this slot's adapters, which are dropped: the
        export for runtime-loaded adapters holds no adapter of its own."""
        self.adapters = nn.ModuleDict()
        self.serving_table = table

    def _routes(self, routing) -> bool:
        """Whether a routed call has rows for this slot to run."""
        return self.serving_table is not None or bool(routing.local(self.adapters)[0])

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

    def _routing(self):
        router = self.__dict__.get("router")
        return router.current() if router is not None else None

    def _forward_hook(self, host, args, output):
        # runs at every call of the host: once per layer and token when decoding, so it reads each
        # attribute once and passes the running adapters on
        routing = self._routing()
        if routing is not None:
            return self._routed_hook(routing, args, output)
        names = self._running()
        fusion = self.active_fusion
        if not names and fusion is None:
            return output
        y = _first(output)
        mode = self.mode
        if mode == "after":
            y = self.run_after(y, names)
        elif mode in ("parallel", "lora"):
            y = self._add(names, args[0], y)
        else:  # span
            x = self.__dict__["_span_input"]
            self.__dict__["_span_input"] = None
            if x is None:
                raise RuntimeError("sparseadapter: the span adapter's start module did not run before its end module")
            y = self._add(names, x, y)
        return _replace_first(output, y)

    def _routed_hook(self, routing, args, output):
        y = _first(output)
        if self.mode == "after":
            y = self.routed_add(routing, y, y)
        elif self.mode in ("parallel", "lora"):
            y = self.routed_add(routing, args[0], y)
        else:  # span
            x = self.__dict__["_span_input"]
            self.__dict__["_span_input"] = None
            if x is None:
                if not self._routes(routing):
                    return output
                raise RuntimeError("sparseadapter: the span adapter's start module did not run before its end module")
            y = self.routed_add(routing, x, y)
        return _replace_first(output, y)

    def _span_start_hook(self, module, args):
        routing = self._routing()
        if self._routes(routing) if routing is not None else self._running():
            self.__dict__["_span_input"] = args[0]

    def _residual_input_hook(self, host, args, kwargs):
        routing = self._routing()
        if routing is not None:
            if not self._routes(routing):
                return None
            add = lambda r: self.routed_add(routing, r, r)  # noqa: E731
        else:
            names = self._running()
            if not names:
                return None
            add = lambda r: self._add(names, r, r)  # noqa: E731
        if len(args) >= 2:
            r = args[1]
            return (args[0], add(r)) + tuple(args[2:]), kwargs
        if "input_tensor" in kwargs:
            r = kwargs["input_tensor"]
            return args, dict(kwargs, input_tensor=add(r))
        raise RuntimeError("sparseadapter: the FFN output block was called without its residual input")

    # -- the math -----------------------------------------------------------------------------
    def _add(self, names: List[str], x: Tensor, base: Tensor) -> Tensor:
        """`base + sum_i A_i(x)`. Each adapter adds its output to the running sum itself (`A(x, base)`),
        a sparse bottleneck adapter inside its fused kernel."""
        adapters = self._modules["adapters"]._modules  # (see run_after)
        for name in names:
            base = adapters[name](x, base)
        return base

    def routed_add(self, routing, x: Tensor, base: Tensor) -> Tensor:
        """`base + A_{k(i)}(x)` for each row i, k(i) the adapter the routing names for it (none: `base`).
        The slot's adapters run as ONE op over the batch (sparse_adapter_multi) when each is a sparse
        bottleneck adapter that runs fused or a sparse LoRA adapter; otherwise each adapter runs on its
        rows, gathered (a dense adapter, one with a layer norm or active dropout)."""
        if self.merged:
            raise ValueError(
                f"adapter_names= cannot route rows while LoRA adapter {self.merged[0]!r} is merged into "
                "the base weight (every row would get it); unmerge it first"
            )
        if x.dim() < 2:
            raise ValueError(f"adapter_names routes rows, but the adapted module's input has shape {tuple(x.shape)}")
        if self.serving_table is not None:
            return self.serving_table(x, routing.rows, base)
        names, local = routing.local(self.adapters, x.shape[0])
        if not names:
            return base
        adapters = self._modules["adapters"]._modules  # (see run_after)
        modules = [adapters[n] for n in names]
        if all(getattr(m, "runs_multi", lambda: False)() for m in modules):
            x = _row_dropout(x, local, [m._modules["dropout"] for m in modules])
            parts = [m.multi_layers() for m in modules]
            with pinned_layers([layer for part in parts for layer in part[:2]]) as buffers:  # no load swaps them
                specs = [(buffers[2 * k], buffers[2 * k + 1], part[2], part[3]) for k, part in enumerate(parts)]
                return sparseadapter_ext.sparse_adapter_multi(
                    x, local, base, specs, pack_cache=self.__dict__.get("multi_packs")
                )
        for k, module in enumerate(modules):  # each adapter on its rows
            rows = (local == k).nonzero().flatten()
            if rows.numel():
                base = base.index_copy(0, rows, module(x.index_select(0, rows), base.index_select(0, rows)))
        return base

    def run_after(self, y: Tensor, names: Optional[List[str]] = None) -> Tensor:
        """`y` through the active fusion, else through each running adapter in turn (`names`: the
        running adapters when the caller has them)."""
        if self.active_fusion is not None:
            fusion = self.fusions[self.active_fusion]
            outputs = [self._add([n], y, y) for n in fusion.adapter_names]
            return fusion(y, outputs)
        adapters = self._modules["adapters"]._modules  # not nn.Module.__getattr__: runs per layer and token
        for name in self._running() if names is None else names:
            y = adapters[name](y, y)
        return y

    def prefix_kv(self, batch: int, heads: int, head_dim: int, like: Tensor):
        """Key and value prefixes [batch, heads, l, head_dim] of the active prefix adapters, or None
        (`heads`: the key/value heads, fewer than the query heads under grouped-query attention)."""
        parts = [self.prefixes[n].layer_prefix(self.layer_index) for n in self.active if n in self.prefixes]
        if not parts:
            return None
        kv = torch.cat(parts, dim=1).to(like.dtype)  # [2, l, heads * head_dim]
        if kv.shape[-1] != heads * head_dim:
            raise RuntimeError(
                f"sparseadapter: the prefixes are {kv.shape[-1]} wide, the attention's keys "
                f"{heads} heads x {head_dim} = {heads * head_dim}"
            )
        kv = kv.reshape(2, kv.shape[1], heads, head_dim).permute(0, 2, 1, 3)
        return kv[0].expand(batch, -1, -1, -1), kv[1].expand(batch, -1, -1, -1)

    def prefix_kv_rows(self, routing, heads: int, head_dim: int, like: Tensor):
        """Per-row prefixes of a routed call: `(key, value, valid)`, key and value [batch, heads, L,
        head_dim] with each row's adapter's prefix (L the longest of this call's prefixes here, shorter
        ones padded), `valid` [batch, L] bool, False on padding and for rows without a prefix here; or
        None when no row has one."""
        names, local = routing.local(self.prefixes, like.shape[0])
        if not names:
            return None
        parts = [self.prefixes[n].layer_prefix(self.layer_index) for n in names]  # [2, l_k, width]
        longest = max(p.shape[1] for p in parts)
        width = parts[0].shape[-1]
        if width != heads * head_dim:
            raise RuntimeError(
                f"sparseadapter: the prefixes are {width} wide, the attention's keys "
                f"{heads} heads x {head_dim} = {heads * head_dim}"
            )
        table = torch.stack(
            [like.new_zeros(2, longest, width)]
            + [F.pad(p.to(like.dtype), (0, 0, 0, longest - p.shape[1])) for p in parts]
        )
        lengths = torch.tensor([0] + [p.shape[1] for p in parts], device=like.device)
        pick = (local + 1).to(like.device)  # 0: no prefix
        kv = table.index_select(0, pick)  # [batch, 2, L, width]
        kv = kv.reshape(kv.shape[0], 2, longest, heads, head_dim).permute(1, 0, 3, 2, 4)
        valid = torch.arange(longest, device=like.device)[None, :] < lengths.index_select(0, pick)[:, None]
        return kv[0], kv[1], valid

    def extra_repr(self) -> str:
        return f"mode={self.mode}, in={self.in_features}, out={self.out_features}, active={self.active}"


def _row_dropout(x: Tensor, local: Tensor, dropouts: List[nn.Module]) -> Tensor:
    """x with each row's adapter's dropout applied (LoRA drops its input), in training only."""
    ps = [d.p if d.training else 0.0 for d in dropouts]
    if not any(ps):
        return x
    if all(p == ps[0] for p in ps):
        return F.dropout(x, ps[0], training=True)
    p_row = torch.tensor([0.0] + ps, dtype=x.dtype, device=x.device).index_select(0, (local + 1).to(x.device))
    p_row = p_row.view(-1, *([1] * (x.dim() - 1)))
    keep = (torch.rand_like(x) >= p_row).to(x.dtype)
    return x * keep / (1 - p_row)


def slots(model: nn.Module) -> Dict[str, AdapterSlot]:
    """Every slot of the model, by the name of its host module."""
    return {name.rpartition(".")[0]: m for name, m in model.named_modules() if isinstance(m, AdapterSlot)}
