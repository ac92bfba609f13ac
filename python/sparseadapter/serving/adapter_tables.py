"""Adapter tables: an exported model whose adapters are loaded at run time, by the C++ server.

`export_model(..., serving=TableServingModel(...))` writes the base model with, at every site that one
of its template adapters adapts, a scripted `SiteTable` (the CSR arrays of its adapters concatenated, as
sparse_adapter_multi takes them, plus each adapter's sizes, activation and scale) and in place of the
task head a scripted `HeadTable` (each adapter's linear head). Both start empty and have TorchScript
methods that add and remove one adapter, so `sparseadapter_serve --adapters DIR` (and its admin lines)
fill them from adapter folders without Python. What a table holds grows with each adapter's nnz
(values, indices, biases), never with the dense sizes; the head's weight is dense, as in the file.

Each template gives a layout: an adapter kind, its sites, the tables at those sites and the names of
its two layers there. An adapter folder loads when its kind and sites are one layout's; it then goes
into that layout's tables, and every other table only notes that it does not hold it (`skip_adapter`),
so adapters of several kinds (LoRA on the attention projections, Houlsby after the blocks) share one
base model and one mixed batch.

forward(input_ids, attention_mask, token_type_ids, adapter_index) like MultiAdapterServingModel:
`adapter_index[i]` is the position of row i's adapter among all loaded adapters (the order they were
added in); each table maps it to its own adapters. The metadata's `adapter_tables` tells the server what
an adapter folder must hold to be loaded (model type, the layouts, per table its host module and sizes).
"""

from typing import Dict, List, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..adapters.api import HEAD_NAMES
from ..adapters.head import installed
from ..adapters.placement import model_type
from ..adapters.registry import entry
from ..adapters.registry import router as registry_router
from ..adapters.slot import slots
from .export import example_inputs
from .multi_adapter import MultiAdapterServingModel

TABLE_ATTR = "serving_table"
IN_SERVING = "model."  # the model's path in the exported ServingModel (metadata paths are the file's)
_LAYERS = {"lora": ("lora_A", "lora_B")}  # the two CSR layers of an adapter, by kind; others: down, up


class SiteTable(nn.Module):
    """The adapters of one site: `forward(x, adapter_index, base)` is `base + A_k(x)` for each row, k
    this table's adapter for the loaded adapter `adapter_index[i]` (-1, or one this site does not hold:
    `base`), all of them in one sparse_adapter_multi. `local[1 + g]` is loaded adapter g's position
    here, or -1 (`local[0]` is -1, for rows without an adapter)."""

    # TorchScript types of the per-adapter lists (an empty list alone would read as List[Tensor])
    bottleneck: List[int]
    down_nnz: List[int]
    up_nnz: List[int]
    activations: List[str]
    scales: List[float]

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        for part in ("down", "up"):
            self.register_buffer(f"{part}_values", torch.empty(0, dtype=dtype))
            self.register_buffer(f"{part}_bias", torch.empty(0, dtype=dtype))
            self.register_buffer(f"{part}_crow", torch.empty(0, dtype=torch.long))
            self.register_buffer(f"{part}_col", torch.empty(0, dtype=torch.long))
        self.register_buffer("local", torch.full((1,), -1, dtype=torch.long))
        self.bottleneck: List[int] = []
        self.down_nnz: List[int] = []
        self.up_nnz: List[int] = []
        self.activations: List[str] = []
        self.scales: List[float] = []

    def forward(self, x: Tensor, adapter_index: Tensor, base: Tensor) -> Tensor:
        if len(self.scales) == 0:
            return base
        out, _ = torch.ops.sparseadapter.sparse_adapter_multi(
            x,
            self.local.index_select(0, adapter_index + 1),
            base,
            self.down_values,
            self.down_bias,
            self.down_crow,
            self.down_col,
            self.up_values,
            self.up_bias,
            self.up_crow,
            self.up_col,
            self.bottleneck,
            self.down_nnz,
            self.up_nnz,
            self.out_features,
            ",".join(self.activations),
            self.scales,
            False,
        )
        return out

    @torch.jit.export
    def add_adapter(
        self,
        down: List[Tensor],
        up: List[Tensor],
        activation: str,
        scale: float,
    ) -> int:
        """Append one loaded adapter that this site holds: `down` and `up` are [values, crow_indices,
        col_indices, bias] (bias empty for none: zeros), their patterns already checked (validate_csr).
        Sizes are checked before anything changes. Returns the bytes the adapter takes in the table."""
        bottleneck = down[1].numel() - 1
        if bottleneck < 1 or up[1].numel() != self.out_features + 1:
            raise ValueError(
                "the adapter's matrices are "
                + str(bottleneck)
                + " x "
                + str(self.in_features)
                + " and "
                + str(up[1].numel() - 1)
                + " x "
                + str(bottleneck)
                + "; this site needs r x "
                + str(self.in_features)
                + " and "
                + str(self.out_features)
                + " x r"
            )
        parts = [self._layer(down, bottleneck, self.in_features), self._layer(up, self.out_features, bottleneck)]
        self.down_values = torch.cat([self.down_values, parts[0][0]])
        self.down_crow = torch.cat([self.down_crow, parts[0][1]])
        self.down_col = torch.cat([self.down_col, parts[0][2]])
        self.down_bias = torch.cat([self.down_bias, parts[0][3]])
        self.up_values = torch.cat([self.up_values, parts[1][0]])
        self.up_crow = torch.cat([self.up_crow, parts[1][1]])
        self.up_col = torch.cat([self.up_col, parts[1][2]])
        self.up_bias = torch.cat([self.up_bias, parts[1][3]])
        self.bottleneck.append(bottleneck)
        self.down_nnz.append(parts[0][2].numel())
        self.up_nnz.append(parts[1][2].numel())
        self.activations.append(activation)
        self.scales.append(scale)
        self.local = torch.cat([self.local, torch.full((1,), len(self.scales) - 1, dtype=torch.long)])
        held = self.local.element_size()
        for layer in parts:
            for t in layer:
                held += t.numel() * t.element_size()
        return held

    def _layer(self, layer: List[Tensor], rows: int, cols: int) -> List[Tensor]:
        """[values, crow, col, bias] size-checked and in the table's types (bias: zeros when empty).
        The pattern's structure is the caller's to check (validate_csr): TorchScript drops an op call
        whose result goes unused, and that op returns nothing."""
        values, crow, col = layer[0], layer[1].to(torch.long), layer[2].to(torch.long)
        if crow.dim() != 1 or crow.numel() != rows + 1 or col.dim() != 1:
            raise ValueError(
                "crow_indices has "
                + str(crow.numel())
                + " entries; a "
                + str(rows)
                + " x "
                + str(cols)
                + " matrix has "
                + str(rows + 1)
            )
        if values.dim() != 1 or values.numel() != col.numel():
            raise ValueError(
                "values has " + str(values.numel()) + " entries, its pattern " + str(col.numel()) + " (1-D both)"
            )
        bias = layer[3]
        if bias.numel() == 0:
            bias = torch.zeros([rows], dtype=self.down_values.dtype)
        elif bias.dim() != 1 or bias.numel() != rows:
            raise ValueError("bias has shape " + str(bias.shape) + ", expected [" + str(rows) + "]")
        return [values.to(self.down_values.dtype), crow, col, bias.to(self.down_values.dtype)]

    @torch.jit.export
    def skip_adapter(self) -> int:
        """Note a loaded adapter that this site does not hold (its rows get `base`); returns its bytes."""
        self.local = torch.cat([self.local, torch.full((1,), -1, dtype=torch.long)])
        return self.local.element_size()

    @torch.jit.export
    def remove_adapter(self, g: int) -> None:
        """Forget loaded adapter g (held here or skipped); the later ones move down by one."""
        if g < 0 or g + 1 >= self.local.numel():
            raise ValueError("no loaded adapter " + str(g) + " (this table knows " + str(self.local.numel() - 1) + ")")
        k = int(self.local[g + 1])
        self.local = torch.cat([self.local[: g + 1], self.local[g + 2 :]])
        if k < 0:
            return
        self.local = torch.where(self.local > k, self.local - 1, self.local)
        b0 = sum(self.bottleneck[:k])
        d0 = sum(self.down_nnz[:k])
        u0 = sum(self.up_nnz[:k])
        b, d, u = self.bottleneck[k], self.down_nnz[k], self.up_nnz[k]
        out = self.out_features
        self.down_values = torch.cat([self.down_values[:d0], self.down_values[d0 + d :]])
        self.down_col = torch.cat([self.down_col[:d0], self.down_col[d0 + d :]])
        self.down_crow = torch.cat([self.down_crow[: b0 + k], self.down_crow[b0 + k + b + 1 :]])
        self.down_bias = torch.cat([self.down_bias[:b0], self.down_bias[b0 + b :]])
        self.up_values = torch.cat([self.up_values[:u0], self.up_values[u0 + u :]])
        self.up_col = torch.cat([self.up_col[:u0], self.up_col[u0 + u :]])
        self.up_crow = torch.cat([self.up_crow[: k * (out + 1)], self.up_crow[(k + 1) * (out + 1) :]])
        self.up_bias = torch.cat([self.up_bias[: k * out], self.up_bias[(k + 1) * out :]])
        self.bottleneck.pop(k)
        self.down_nnz.pop(k)
        self.up_nnz.pop(k)
        self.activations.pop(k)
        self.scales.pop(k)

    @torch.jit.export
    def held_bytes(self) -> int:
        """What the table's arrays take."""
        held = (self.local.numel() - 1) * self.local.element_size()
        for t in [self.down_values, self.down_bias, self.down_crow, self.down_col]:
            held += t.numel() * t.element_size()
        for t in [self.up_values, self.up_bias, self.up_crow, self.up_col]:
            held += t.numel() * t.element_size()
        return held


class HeadTable(nn.Module):
    """Each row through its adapter's linear head: `forward(x, adapter_index)` is
    `x[i] @ weight[k].T + bias[k]`, k = adapter_index[i]."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(0, out_features, in_features, dtype=dtype))
        self.register_buffer("bias", torch.empty(0, out_features, dtype=dtype))

    def forward(self, x: Tensor, adapter_index: Tensor) -> Tensor:
        if self.weight.shape[0] == 0:
            return x.new_zeros(x.shape[0], self.out_features)
        k = adapter_index.clamp(min=0)  # rows without an adapter: never asked (the server names one)
        weight, bias = self.weight.index_select(0, k), self.bias.index_select(0, k)
        return torch.baddbmm(bias.unsqueeze(-1), weight, x.unsqueeze(-1)).squeeze(-1)

    @torch.jit.export
    def add_adapter(self, weight: Tensor, bias: Tensor) -> int:
        if weight.shape != [self.out_features, self.in_features] or bias.shape != [self.out_features]:
            raise ValueError(
                "the head's weight and bias have shapes "
                + str(weight.shape)
                + " and "
                + str(bias.shape)
                + ", the model's head needs ["
                + str(self.out_features)
                + ", "
                + str(self.in_features)
                + "] and ["
                + str(self.out_features)
                + "]"
            )
        self.weight = torch.cat([self.weight, weight.to(self.weight.dtype).unsqueeze(0)])
        self.bias = torch.cat([self.bias, bias.to(self.bias.dtype).unsqueeze(0)])
        return (weight.numel() + bias.numel()) * self.weight.element_size()

    @torch.jit.export
    def remove_adapter(self, k: int) -> None:
        self.weight = torch.cat([self.weight[:k], self.weight[k + 1 :]])
        self.bias = torch.cat([self.bias[:k], self.bias[k + 1 :]])

    @torch.jit.export
    def held_bytes(self) -> int:
        return (self.weight.numel() + self.bias.numel()) * self.weight.element_size()


class RoutedHead(nn.Module):
    """The model's head slot: the call's routing picks each row's head in the HeadTable."""

    def __init__(self, table: torch.jit.ScriptModule, model: nn.Module) -> None:
        super().__init__()
        self.table = table
        self.__dict__["router"] = registry_router(model)

    def forward(self, x: Tensor) -> Tensor:
        routing = self.__dict__["router"].current()
        if routing is None:
            raise RuntimeError("RoutedHead: called outside a routed call (TableServingModel sets the routing)")
        return self.table(x, routing.rows)


class TableServingModel(MultiAdapterServingModel):
    """`forward(input_ids, attention_mask, token_type_ids, adapter_index)` over the model's tables: a
    multi-adapter model that names no adapter of its own (the tables map each index to theirs)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model, [])

    def example(self, meta, batch: int, length: int, seed: int = 0) -> Tuple[Tensor, ...]:
        """example_inputs; every row without an adapter (the tables are empty when exported)."""
        return (*example_inputs(meta, batch, length, seed), torch.full((batch,), -1, dtype=torch.long))


def install_tables(model: nn.Module, templates: Sequence[str]) -> Dict:
    """Replace the adapters `templates` (attached to `model`, pruned: CSR layers) by empty tables at
    their sites, and the model's linear head by a head table; returns the metadata's `adapter_tables`.
    Each template gives a layout (its kind and sites): adapters loaded into the tables must match one."""
    if isinstance(templates, str) or not templates:
        raise ValueError("install_tables takes a non-empty list of template adapter names")
    head_name = next((h for h in HEAD_NAMES if isinstance(getattr(model, h, None), nn.Module)), None)
    head = getattr(model, head_name) if head_name is not None else None
    if not isinstance(head, nn.Linear):
        raise ValueError(
            "runtime-loaded adapters need a task head that is one linear layer (as BERT's classifier); "
            f"this model's is {type(head).__name__}"
        )
    if installed(head) is not None:
        raise ValueError(
            "runtime-loaded adapters answer through linear heads; this regression head standardizes targets"
        )
    layouts: List[Dict] = []
    for template in templates:
        layout = _layout(model, template)
        same = next(
            (other for other in layouts if (other["kind"], other["sites"]) == (layout["kind"], layout["sites"])), None
        )
        if same is not None:
            raise ValueError(
                f"templates {same['template']!r} and {template!r} are both {layout['kind']} adapters on the same "
                "sites; one template per layout"
            )
        layouts.append(layout)
    by_host = slots(model)
    hosts = sorted({site["host"] for layout in layouts for site in layout["host_sites"]})
    dtype = head.weight.dtype
    tables: List[Dict] = []
    for host in hosts:  # every template's adapters leave their slots only now: slots may be shared
        slot = by_host[host]
        slot.serve_from_table(torch.jit.script(SiteTable(slot.in_features, slot.out_features, dtype)))
        tables.append(
            {
                "module": f"{IN_SERVING}{host}.sparseadapter.{TABLE_ATTR}",
                "host": host,
                "in_features": slot.in_features,
                "out_features": slot.out_features,
            }
        )
    head_table = torch.jit.script(HeadTable(head.in_features, head.out_features, dtype))
    setattr(model, head_name, RoutedHead(head_table, model))
    for layout in layouts:
        layout["tables"] = [hosts.index(site["host"]) for site in layout.pop("host_sites")]
        del layout["template"]
    return {
        "model_type": model_type(model),
        "layouts": layouts,
        "tables": tables,
        "head": {"module": f"{IN_SERVING}{head_name}.table", "name": head_name},
    }


def _layout(model: nn.Module, template: str) -> Dict:
    """What adapter `template` fixes for the adapters that load like it: kind, sites, layer names."""
    e = entry(model, template)
    config = e.config
    if config.kind in ("prefix", "mam"):
        raise ValueError(f"runtime-loaded adapters run as CSR arrays; {config.kind!r} adapters have prefixes")
    if config.layer_norm:
        raise ValueError(
            f"{template}: runtime-loaded adapters run in one op per site, which has no layer norm (layer_norm=True)"
        )
    down_name, up_name = _LAYERS.get(config.kind, ("down", "up"))
    return {
        "template": template,
        "kind": config.kind,
        "sites": {part: [vars(s) for s in sites] for part, sites in e.sites.items()},
        "host_sites": [{"host": site.host} for part in sorted(e.sites) for site in e.sites[part]],
        "down": down_name,
        "up": up_name,
        "bias": config.kind not in _LAYERS,
    }
