"""SparseAdapterConfig: one object describes an adapter, its size and how it is pruned."""

import dataclasses
import math
from dataclasses import dataclass
from typing import List, Optional

from ..pruning.scores import METHODS
from .placement import check_pattern

KINDS = ("houlsby", "pfeiffer", "parallel", "lora", "prefix", "mam")
# peft's names for fields of ours: read, never written (to_dict); target_modules is one for kind="lora"
ALIASES = ("r", "lora_dropout")
ACTIVATIONS = ("relu", "gelu", "silu", "tanh", "identity")
INITS = ("bert", "lora")

# Per-kind defaults for the fields left as None: the recipes of the papers and of the SparseAdapter code.
_KIND_DEFAULTS = {
    "houlsby": dict(bottleneck=64, init="bert", scale=1.0),
    "pfeiffer": dict(bottleneck=64, init="bert", scale=1.0),
    "parallel": dict(bottleneck=64, init="lora", scale=4.0),
    "lora": dict(bottleneck=8, init="lora", scale=1.0),
    "prefix": dict(bottleneck=0, init="bert", scale=1.0),
    "mam": dict(bottleneck=16, init="lora", scale=2.0),  # parallel FFN adapter of MAM (upstream recipe)
}


@dataclass
class SparseAdapterConfig:
    """What to add to a model and how sparse to make it.

    kind:          houlsby (after attention and FFN), pfeiffer (after FFN), parallel (beside the FFN),
                   lora (low-rank update of linear layers), prefix (prefix tuning), mam (prefix + parallel).
    bottleneck:    bottleneck width r of a bottleneck adapter, or the LoRA rank (None: the kind's default).
    sparsity:      fraction of adapter weights removed at initialization (0.8 = 80% zeros); 0 = dense.
    pruner:        random, magnitude, snip, grasp or synflow; scope: "global" or "layer".
    large_sparse:  k >= 1: widen the bottleneck k times and raise sparsity to 1 - (1 - sparsity) / k,
                   so the number of kept weights stays that of the standard adapter.
    activation, dropout, layer_norm, scale, init: the bottleneck adapter's parts; `init="bert"` draws
                   all weights from N(0, 0.02) with zero biases, `init="lora"` draws the down (A) matrix
                   like nn.Linear and sets the up (B) matrix to zero.
    lora_alpha, lora_targets: LoRA's scale alpha / r and the linear layers it adapts (regex on module
                   names; None: query and value).
    prefix_length, prefix_mid_dim: prefix tuning's length l and the width of its reparameterization MLP.
    target_modules: regexes that override where bottleneck adapters go (any model); for kind="lora",
                   peft's name for lora_targets.
    seed:          seeds the initialization (and the pruner).

    peft's names are accepted as aliases: `r` (= bottleneck, the rank), `target_modules` (= lora_targets
    for kind="lora"; a single string is one pattern), `lora_dropout` (= dropout, kind="lora"). Given
    together with the canonical name they must agree; after construction both read the same value, and
    `to_dict` writes the canonical names only.
    """

    kind: str = "houlsby"
    bottleneck: Optional[int] = None
    sparsity: float = 0.0
    pruner: str = "snip"
    scope: str = "global"
    large_sparse: int = 1
    activation: str = "relu"
    dropout: Optional[float] = None  # None: 0.0 (or lora_dropout)
    layer_norm: bool = False
    scale: Optional[float] = None
    init: Optional[str] = None
    lora_alpha: float = 32.0
    lora_targets: Optional[List[str]] = None
    prefix_length: int = 30
    prefix_mid_dim: int = 800
    target_modules: Optional[List[str]] = None
    seed: int = 0
    pruner_rounds: Optional[int] = None
    # peft's names (aliases; see the class docstring)
    r: Optional[int] = None
    lora_dropout: Optional[float] = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"SparseAdapterConfig: kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        self._resolve_aliases()
        defaults = _KIND_DEFAULTS[self.kind]
        for name, value in defaults.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.kind != "prefix" and (
            not isinstance(self.bottleneck, int) or isinstance(self.bottleneck, bool) or self.bottleneck < 1
        ):
            raise ValueError(f"SparseAdapterConfig: bottleneck must be a positive int, got {self.bottleneck!r}")
        self.r = self.bottleneck
        if self.kind == "lora":
            self.lora_dropout = self.dropout
            self.target_modules = self.lora_targets
        if not (isinstance(self.sparsity, (int, float)) and 0.0 <= self.sparsity < 1.0):
            raise ValueError(
                "SparseAdapterConfig: sparsity is the fraction of weights removed and must be "
                f"in [0, 1), got {self.sparsity!r}"
            )
        if self.pruner not in METHODS:
            raise ValueError(f"SparseAdapterConfig: pruner must be one of {', '.join(METHODS)}, got {self.pruner!r}")
        if self.scope not in ("global", "layer"):
            raise ValueError(f"SparseAdapterConfig: scope must be 'global' or 'layer', got {self.scope!r}")
        if not isinstance(self.large_sparse, int) or isinstance(self.large_sparse, bool) or self.large_sparse < 1:
            raise ValueError(f"SparseAdapterConfig: large_sparse must be an int >= 1, got {self.large_sparse!r}")
        if self.kind == "prefix" and self.large_sparse != 1:
            raise ValueError(
                "SparseAdapterConfig: large_sparse applies to bottleneck and LoRA weights; prefix tuning has none"
            )
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"SparseAdapterConfig: activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}"
            )
        if self.init not in INITS:
            raise ValueError(f"SparseAdapterConfig: init must be one of {', '.join(INITS)}, got {self.init!r}")
        if not (_number(self.dropout) and 0.0 <= self.dropout < 1.0):
            raise ValueError(f"SparseAdapterConfig: dropout must be in [0, 1), got {self.dropout!r}")
        if not math.isfinite(float(self.scale)):
            raise ValueError(f"SparseAdapterConfig: scale must be finite, got {self.scale!r}")
        if not (_number(self.lora_alpha) and self.lora_alpha > 0):
            raise ValueError(f"SparseAdapterConfig: lora_alpha must be a positive number, got {self.lora_alpha!r}")
        if self.kind != "lora" and self.lora_targets:
            raise ValueError(
                f"SparseAdapterConfig: lora_targets applies to kind='lora', not {self.kind!r} "
                "(bottleneck adapters are placed with target_modules)"
            )
        for field_name in ("target_modules", "lora_targets"):
            patterns = getattr(self, field_name)
            if patterns is None:
                continue
            if not isinstance(patterns, (list, tuple)):
                raise ValueError(
                    f"SparseAdapterConfig: {field_name} must be a list of regular expressions, "
                    f"got {type(patterns).__name__}"
                )
            for pattern in patterns:
                check_pattern(pattern, f"SparseAdapterConfig: {field_name} pattern")
        if self.kind in ("prefix", "mam") and (self.prefix_length < 1 or self.prefix_mid_dim < 1):
            raise ValueError("SparseAdapterConfig: prefix_length and prefix_mid_dim must be >= 1")

    @property
    def effective_bottleneck(self) -> int:
        """The width actually built: bottleneck x large_sparse."""
        return self.bottleneck * self.large_sparse

    @property
    def effective_sparsity(self) -> float:
        """The sparsity actually pruned to: 1 - (1 - sparsity) / large_sparse."""
        return 1.0 - (1.0 - self.sparsity) / self.large_sparse

    @property
    def is_sparse(self) -> bool:
        return self.effective_sparsity > 0.0

    def _resolve_aliases(self) -> None:
        """peft's names onto ours: each pair must agree where both are given."""

        def merge(alias: str, canonical: str, same=lambda a, b: a == b) -> None:
            a, c = getattr(self, alias), getattr(self, canonical)
            if a is None:
                return
            if c is not None and not same(a, c):
                raise ValueError(
                    f"SparseAdapterConfig: {alias}={a!r} and {canonical}={c!r} disagree; "
                    f"{alias} is peft's name for {canonical}: give one of them"
                )
            setattr(self, canonical, a)

        for name in ("target_modules", "lora_targets"):
            value = getattr(self, name)
            if isinstance(value, str):  # peft takes one pattern as a string
                setattr(self, name, [value])
            elif value is not None:
                if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
                    raise ValueError(f"SparseAdapterConfig: {name} must be a list of regex strings, got {value!r}")
                setattr(self, name, list(value))
        if self.r is not None and (not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 0):
            raise ValueError(
                f"SparseAdapterConfig: r (the rank, peft's name for bottleneck) must be a positive int, got {self.r!r}"
            )
        merge("r", "bottleneck")
        if self.kind == "lora":
            merge("target_modules", "lora_targets")
            merge("lora_dropout", "dropout")
        elif self.lora_dropout is not None:
            raise ValueError(
                f"SparseAdapterConfig: lora_dropout applies to kind='lora', not {self.kind!r} (use dropout)"
            )
        if self.dropout is None:
            self.dropout = 0.0

    def to_dict(self) -> dict:
        """The fields under their canonical names (what save_adapter writes; peft's aliases left out)."""
        data = dataclasses.asdict(self)
        for alias in ALIASES:
            data.pop(alias, None)
        if self.kind == "lora":
            data["target_modules"] = None
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "SparseAdapterConfig":
        if not isinstance(data, dict):
            raise ValueError(f"adapter config must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"adapter config has unknown fields {unknown}; written by a newer sparseadapter?")
        try:
            return cls(**data)
        except TypeError as err:
            raise ValueError(f"adapter config is malformed: {err}") from None


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
