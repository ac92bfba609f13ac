"""The adapter modules themselves, independent of where they are placed in a model.

Each weight matrix is an nn.Linear marked prunable (`PRUNABLE_ATTR`) until pruning turns it into a
`SparseLinear`; the modules only call their layers, so the dense and the sparse form share one code.
"""

import math
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import sparseadapter_ext

from ..pruning.api import PRUNABLE_ATTR
from ..sparse_linear import PreparedPair, SparseLinear, pinned_pair

BERT_INIT_STD = 0.02

_ACTIVATIONS = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "identity": nn.Identity,
}


def _prunable_linear(in_features: int, out_features: int, bias: bool) -> nn.Linear:
    layer = nn.Linear(in_features, out_features, bias=bias)
    setattr(layer, PRUNABLE_ATTR, True)
    return layer


def _init_bert(layer: nn.Linear) -> None:
    nn.init.normal_(layer.weight, std=BERT_INIT_STD)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


def _init_pair(down: nn.Linear, up: nn.Linear, init: str) -> None:
    """`bert`: both from N(0, 0.02). `lora`: down (A) as nn.Linear does, up (B) zero, so the update
    starts at zero. Biases start at zero."""
    if init == "bert":
        nn.init.normal_(down.weight, std=BERT_INIT_STD)
        nn.init.normal_(up.weight, std=BERT_INIT_STD)
    else:
        nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
        nn.init.zeros_(up.weight)
    for layer in (down, up):
        if layer.bias is not None:
            nn.init.zeros_(layer.bias)


def dense_weight(layer: nn.Module) -> Tensor:
    """The weight of an adapter layer as a dense matrix, whichever form it is in (for merging)."""
    if isinstance(layer, SparseLinear):
        return layer.to_dense()
    return layer.weight


class SparsePairModule(nn.Module):
    """An adapter of two layers that, once both are sparse, can run as the fused adapter op. In eval
    mode it keeps the prepared inference call of its current state (PreparedPair: the op straight to
    its kernel, a decoding step's adapter call without the dispatcher), dropped on every change of the
    module or its layers: an attribute set (a layer replaced by pruning, train()/eval(), settings), a
    `.to()`; a layer's own changes (a load, a parameter swap) make the call stale."""

    # The prepared call (PreparedPair) of the current state, False where this state has none
    # (training, not fused, tensors that need the dispatcher), None until the next call decides.
    _prepared = None

    def fused_pair(self):
        """`(a, b, activation, scale)` when this state runs as the fused op over layers a and b; None
        when it does not."""
        raise NotImplementedError

    def __setattr__(self, name, value) -> None:
        super().__setattr__(name, value)
        self.__dict__["_prepared"] = None

    def _apply(self, fn, recurse=True):
        result = super()._apply(fn, recurse)  # .to(), .half(), ...
        self.__dict__["_prepared"] = None
        return result

    def prepared_call(self, x: Tensor, residual: Optional[Tensor]) -> Optional[Tensor]:
        """This state's prepared call on (x, residual), or None where the caller takes its own path."""
        prepared = self._prepared
        if prepared is None:
            prepared = False
            pair = None if self.training else self.fused_pair()
            if pair is not None:
                prepared = PreparedPair(*pair)
                if prepared.call.keys is None:  # its tensors need the dispatcher at every call
                    prepared = False
            self.__dict__["_prepared"] = prepared
        if not prepared:
            return None
        out = prepared(x, residual)
        if out is None and prepared.stale():  # a layer changed: the next call prepares anew
            self.__dict__["_prepared"] = None
        return out


class BottleneckAdapter(SparsePairModule):
    """`delta(x) = scale * up(dropout(act(down(LN(x)))))`, or `residual + delta(x)` given a residual.

    Used after a sublayer (Houlsby, Pfeiffer: `y + delta(y)`) or beside one (parallel: `f(x) + delta(x)`).
    Once pruned (both layers SparseLinear), with no layer norm and no active dropout, the whole
    adapter and the residual add run as one fused kernel (`sparseadapter_ext.sparse_adapter`), which
    computes every activation here (ReLU, GELU, SiLU, tanh, identity); `fused = False` runs the layers
    one by one (same result within rounding).
    """

    sparseadapter_chain = ("down", "up")  # forward order, for SynFlow

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bottleneck: int,
        *,
        activation: str = "relu",
        dropout: float = 0.0,
        layer_norm: bool = False,
        scale: float = 1.0,
        init: str = "bert",
    ) -> None:
        super().__init__()
        self.layer_norm = nn.LayerNorm(in_features) if layer_norm else nn.Identity()
        self.down = _prunable_linear(in_features, bottleneck, bias=True)
        self.activation = _ACTIVATIONS[activation]()
        self.dropout = nn.Dropout(dropout)
        self.up = _prunable_linear(bottleneck, out_features, bias=True)
        self.scale = float(scale)
        self.activation_name = activation
        self.fused = True
        _init_pair(self.down, self.up, init)

    def runs_fused(self) -> bool:
        m = self._modules  # not nn.Module.__getattr__: this runs at every call (one per token when decoding)
        return (
            self.fused
            and self.activation_name in sparseadapter_ext.ADAPTER_ACTIVATIONS  # what the fused kernel computes
            and isinstance(m["down"], SparseLinear)
            and isinstance(m["up"], SparseLinear)
            and isinstance(m["layer_norm"], nn.Identity)
            and (m["dropout"].p == 0.0 or not self.training)
        )

    def runs_multi(self) -> bool:
        """Whether a routed batch runs this adapter in the slot's one op (sparse_adapter_multi)."""
        return self.runs_fused()

    def multi_layers(self):
        """`(down, up, activation, scale)`: this adapter in sparse_adapter_multi, its two SparseLinear
        layers (the caller pins them while the op runs)."""
        m = self._modules
        return m["down"], m["up"], self.activation_name, self.scale

    def fused_pair(self):
        m = self._modules
        return (m["down"], m["up"], self.activation_name, self.scale) if self.runs_fused() else None

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        out = self.prepared_call(x, residual)
        if out is not None:
            return out
        if self.runs_fused():
            m = self._modules
            with pinned_pair(m["down"], m["up"]) as (down, up):  # no load swaps them meanwhile
                return sparseadapter_ext.sparse_adapter(x, residual, down, up, self.activation_name, self.scale)
        delta = self.up(self.dropout(self.activation(self.down(self.layer_norm(x))))) * self.scale
        return delta if residual is None else residual + delta


class LoRAAdapter(SparsePairModule):
    """`delta(x) = (alpha / r) * B(A(dropout(x)))`, added to a frozen linear layer's output (or
    `residual + delta(x)` given a residual, as every slot adapter). Once both matrices are sparse, in
    eval mode it runs as the fused adapter op (identity activation, no biases, scale alpha / r)."""

    sparseadapter_chain = ("lora_A", "lora_B")

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        *,
        alpha: float = 32.0,
        dropout: float = 0.0,
        init: str = "lora",
    ) -> None:
        super().__init__()
        self.lora_A = _prunable_linear(in_features, rank, bias=False)
        self.lora_B = _prunable_linear(rank, out_features, bias=False)
        self.dropout = nn.Dropout(dropout)
        self.scaling = float(alpha) / rank
        _init_pair(self.lora_A, self.lora_B, init)

    def fused_pair(self):
        m = self._modules
        return (m["lora_A"], m["lora_B"], "identity", self.scaling) if self.runs_multi() else None

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        out = self.prepared_call(x, residual)
        if out is not None:
            return out
        m = self._modules  # not nn.Module.__getattr__ (see BottleneckAdapter.runs_fused)
        if self.training and m["dropout"].p > 0:
            x = m["dropout"](x)
        delta = m["lora_B"](m["lora_A"](x))
        # one op for the scale and the sum (a decoding step calls this for 1-16 tokens per layer)
        return delta * self.scaling if residual is None else torch.add(residual, delta, alpha=self.scaling)

    def runs_multi(self) -> bool:
        """Whether a routed batch runs this adapter in the slot's one op: both matrices sparse (a LoRA
        update is a bottleneck adapter with the identity activation, no biases and scale alpha / r;
        its dropout is applied to the rows' input before the op)."""
        m = self._modules  # not nn.Module.__getattr__: runs at every routed call
        return isinstance(m["lora_A"], SparseLinear) and isinstance(m["lora_B"], SparseLinear)

    def multi_layers(self):
        m = self._modules
        return m["lora_A"], m["lora_B"], "identity", self.scaling

    def delta_weight(self) -> Tensor:
        """`(alpha / r) * B @ A`, the dense update that merging adds to the base weight."""
        return (dense_weight(self.lora_B) @ dense_weight(self.lora_A)) * self.scaling


class PrefixGenerator(nn.Module):
    """Prefix tuning (Li & Liang 2021): `l` learned key/value vectors per attention layer.

    Trained through an MLP reparameterization `P = MLP(E)` (E: [l, hidden], MLP: hidden -> mid ->
    tanh -> layers * 2 * kv_dim), which stabilizes training; `fold()` computes P once and drops the
    MLP, so inference and saving hold only the prefixes. Prefixes are never pruned.
    """

    def __init__(self, num_layers: int, hidden: int, kv_dim: int, length: int, mid_dim: int) -> None:
        super().__init__()
        self.num_layers, self.kv_dim, self.length = num_layers, kv_dim, length
        self.embedding = nn.Parameter(torch.randn(length, hidden) * BERT_INIT_STD)
        self.mlp_in = nn.Linear(hidden, mid_dim)
        self.mlp_out = nn.Linear(mid_dim, num_layers * 2 * kv_dim)
        self.register_parameter("folded", None)

    @property
    def is_folded(self) -> bool:
        return self.folded is not None

    def layer_prefix(self, layer: int) -> Tensor:
        """[2, l, kv_dim]: the key and value prefixes of one attention layer."""
        rows = slice(layer * 2 * self.kv_dim, (layer + 1) * 2 * self.kv_dim)
        if self.folded is not None:
            flat = self.folded[:, rows]
        else:  # only this layer's rows of the last projection
            flat = F.linear(torch.tanh(self.mlp_in(self.embedding)), self.mlp_out.weight[rows], self.mlp_out.bias[rows])
        return flat.reshape(self.length, 2, self.kv_dim).transpose(0, 1)

    @torch.no_grad()
    def fold(self) -> None:
        """Replace the MLP by the prefixes it produces (the forward stays the same)."""
        if self.is_folded:
            return
        flat = self.mlp_out(torch.tanh(self.mlp_in(self.embedding)))
        self.folded = nn.Parameter(flat.detach().clone())
        del self.embedding, self.mlp_in, self.mlp_out
        self.register_parameter("embedding", None)


class AdapterFusion(nn.Module):
    """AdapterFusion (Pfeiffer et al. 2021): attention over the outputs of several adapters.

    `query` reads the sublayer output `y`, `key` and `value` read each adapter's output `a_i`
    (residual included); the result is `sum_i softmax_i(q . k_i) * value(a_i)`. `value` starts as the
    identity, so at initialization the fusion averages the adapters.
    """

    def __init__(self, hidden: int, adapter_names: List[str]) -> None:
        super().__init__()
        self.adapter_names = list(adapter_names)
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        for layer in (self.query, self.key):
            _init_bert(layer)
        with torch.no_grad():
            self.value.weight.copy_(torch.eye(hidden) + torch.randn(hidden, hidden) * 1e-6)
            self.value.bias.zero_()

    def forward(self, y: Tensor, outputs: List[Tensor]) -> Tensor:
        stacked = torch.stack(outputs, dim=-2)  # [..., n, d]
        q = self.query(y).unsqueeze(-2)  # [..., 1, d]
        k = self.key(stacked)
        weights = torch.softmax((q * k).sum(-1), dim=-1)  # [..., n]
        return (weights.unsqueeze(-1) * self.value(stacked)).sum(-2)
