"""Which kernel runs a sparse layer at inference: ours on the CSR weight, or a dense GEMM on the
densified weight. At high density a tuned dense GEMM beats any CSR kernel; where the two cross depends
on the shape, the token count, the machine and the dtype, so it is measured, not guessed.

`sparseadapter bench calibrate` times both on a grid of densities for each (in, out, tokens) and
records the density where they cross; the table measured for this project's reference CPU ships in
`calibration/`. A query takes the nearest measured (in, out, tokens) in log scale. Points of kind
"linear" compare one layer; points of kind "adapter" (in = hidden, out = bottleneck) compare the whole
fused sparse bottleneck adapter against the same adapter with dense layers.

Override, strongest first: the `path=` argument of the caller, the environment variable
SPARSEADAPTER_PATH (sparse | dense | auto), and SPARSEADAPTER_CALIBRATION naming another table.
"""

import functools
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import torch

PATHS = ("auto", "sparse", "dense")
PATH_ENV = "SPARSEADAPTER_PATH"
TABLE_ENV = "SPARSEADAPTER_CALIBRATION"
SHIPPED = Path(__file__).resolve().parent / "calibration"


@dataclass
class CrossoverTable:
    """`points`: dicts with kind ("linear" or "adapter"), in_features, out_features, tokens and
    crossover_density (the sparse kernel is faster below it; 1.0 = faster at every density measured,
    0.0 = at none)."""

    device: str
    dtype: str
    points: List[Dict[str, float]]
    meta: Dict[str, str] = field(default_factory=dict)
    source: str = ""

    def crossover(self, in_features: int, out_features: int, tokens: int, kind: str = "linear") -> Optional[float]:
        """The crossover of the nearest measured point of this kind; None when there is none."""

        def distance(p):
            return sum(
                math.log2(max(a, 1) / max(b, 1)) ** 2
                for a, b in ((p["in_features"], in_features), (p["out_features"], out_features), (p["tokens"], tokens))
            )

        points = [p for p in self.points if p["kind"] == kind]
        return float(min(points, key=distance)["crossover_density"]) if points else None

    def to_json(self) -> str:
        return json.dumps(
            {"device": self.device, "dtype": self.dtype, "meta": self.meta, "points": self.points}, indent=1
        )

    @classmethod
    def from_json(cls, text: str, source: str) -> "CrossoverTable":
        try:
            data = json.loads(text)
            points = [
                {
                    "kind": str(p.get("kind", "linear")),
                    **{k: float(p[k]) for k in ("in_features", "out_features", "tokens", "crossover_density")},
                }
                for p in data["points"]
            ]
            table = cls(str(data["device"]), str(data["dtype"]), points, dict(data.get("meta", {})), source)
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as err:
            raise ValueError(f"{source}: not a crossover table ({type(err).__name__}: {err})") from None
        if not points:
            raise ValueError(f"{source}: the crossover table has no points")
        return table


def table_path(device: str, dtype: torch.dtype) -> Path:
    return SHIPPED / f"{device}_{str(dtype).removeprefix('torch.')}.json"


def load_table(device: str, dtype: torch.dtype) -> Optional[CrossoverTable]:
    """The user's table (SPARSEADAPTER_CALIBRATION) or the shipped one for (device, dtype); None when
    neither exists. Parsed once per file version (a model asks once per layer)."""
    path = Path(os.environ.get(TABLE_ENV) or table_path(device, dtype))
    if not path.is_file():
        if os.environ.get(TABLE_ENV):
            raise ValueError(f"{TABLE_ENV}={path}: no such file")
        return None
    stat = path.stat()
    return _read_table(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=8)
def _read_table(path: str, _mtime_ns: int, _size: int) -> CrossoverTable:
    return CrossoverTable.from_json(Path(path).read_text(), path)


def resolve_path(path: Optional[str]) -> str:
    path = path or os.environ.get(PATH_ENV) or "auto"
    if path not in PATHS:
        raise ValueError(f"path must be one of {', '.join(PATHS)}, got {path!r}")
    return path


def choose_path(
    in_features: int,
    out_features: int,
    density: float,
    tokens: int,
    *,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    path: Optional[str] = None,
    kind: str = "linear",
) -> str:
    """'sparse' or 'dense' for one layer (kind "linear") or one whole bottleneck adapter (kind
    "adapter": in_features = hidden, out_features = bottleneck) run on `tokens` rows at a time."""
    path = resolve_path(path)
    if path != "auto":
        return path
    table = load_table(device, dtype)
    crossover = None if table is None else table.crossover(in_features, out_features, tokens, kind)
    if crossover is None:  # nothing measured for this device, dtype and kind: trust the sparse kernel
        return "sparse"
    return "sparse" if density < crossover else "dense"
