"""Where each kind of adapter goes in a model: per model family by module names, or by user patterns.

A family maps roles to regexes over module names (matched with `re.search`):
  attn_output    the attention output projection (Houlsby's first adapter goes after it)
  ffn_output     the FFN output projection (Houlsby's second and Pfeiffer's adapter go after it)
  ffn_parallel   how a parallel adapter spans the FFN: ("residual_input", block) for post-LN blocks
                 called as block(ffn_hidden, residual); ("parallel", module) for a module mapping the
                 FFN input to its output; ("span", start, end) for the input of `start` to the output of `end`
  lora           the projections LoRA adapts by default (query and value; for a fused query-key-value
                 projection, the whole projection)
  prefix         the attention modules prefix tuning prepends keys and values to: encoder
                 self-attention; for decoders also their (causal) self-attention and cross-attention,
                 where Li & Liang and He et al.'s MAM put them

Decoder-only families (llama, qwen2, mistral, gemma, phi3, gpt2) are pre-LN: their FFN module maps
the normalized hidden state to the FFN output, so the parallel adapter runs beside that module.
"""

import re
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from torch import nn

_BERT_LIKE = dict(
    attn_output=r"attention\.output\.dense$",
    ffn_output=r"layer\.\d+\.output\.dense$",
    ffn_parallel=("residual_input", r"layer\.\d+\.output$"),
    lora=(r"attention\.self\.query$", r"attention\.self\.value$"),
    prefix=(r"attention\.self$",),
)

# Llama and the models built like it: model.layers.N.{self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj}.
_LLAMA_LIKE = dict(
    attn_output=r"layers\.\d+\.self_attn\.o_proj$",
    ffn_output=r"layers\.\d+\.mlp\.down_proj$",
    ffn_parallel=("parallel", r"layers\.\d+\.mlp$"),
    lora=(r"layers\.\d+\.self_attn\.q_proj$", r"layers\.\d+\.self_attn\.v_proj$"),
    prefix=(r"layers\.\d+\.self_attn$",),
)

FAMILIES = {
    "bert": _BERT_LIKE,
    "roberta": _BERT_LIKE,
    "xlm-roberta": _BERT_LIKE,
    "camembert": _BERT_LIKE,
    "electra": _BERT_LIKE,
    "bart": dict(
        attn_output=r"layers\.\d+\.self_attn\.out_proj$",
        ffn_output=r"layers\.\d+\.fc2$",
        ffn_parallel=("span", r"layers\.\d+\.fc1$", r"layers\.\d+\.fc2$"),
        lora=(r"self_attn\.q_proj$", r"self_attn\.v_proj$"),
        prefix=(
            r"encoder\.layers\.\d+\.self_attn$",
            r"decoder\.layers\.\d+\.self_attn$",
            r"decoder\.layers\.\d+\.encoder_attn$",
        ),
    ),
    "t5": dict(
        attn_output=r"layer\.0\.SelfAttention\.o$",
        ffn_output=r"DenseReluDense\.wo$",  # also T5 v1.1's gated FFN, under the same attribute name
        ffn_parallel=("parallel", r"DenseReluDense$"),
        lora=(r"SelfAttention\.q$", r"SelfAttention\.v$"),
        prefix=(
            r"encoder\.block\.\d+\.layer\.0\.SelfAttention$",
            r"decoder\.block\.\d+\.layer\.0\.SelfAttention$",
            r"decoder\.block\.\d+\.layer\.1\.EncDecAttention$",
        ),
    ),
    "llama": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    # Phi-3 fuses query, key and value into qkv_proj (and gate and up into gate_up_proj): LoRA adapts
    # the whole qkv projection, a rank-r update of all three.
    "phi3": dict(_LLAMA_LIKE, lora=(r"layers\.\d+\.self_attn\.qkv_proj$",)),
    # GPT-2's projections are Conv1D (weight [in, out], transposed against nn.Linear); c_attn is the
    # fused query-key-value projection, which LoRA adapts whole (the LoRA paper's GPT-2 code adapts
    # only its query and value slices).
    "gpt2": dict(
        attn_output=r"(^|\.)h\.\d+\.attn\.c_proj$",
        ffn_output=r"(^|\.)h\.\d+\.mlp\.c_proj$",
        ffn_parallel=("parallel", r"(^|\.)h\.\d+\.mlp$"),
        lora=(r"(^|\.)h\.\d+\.attn\.c_attn$",),
        prefix=(r"(^|\.)h\.\d+\.attn$",),
    ),
}


@dataclass(frozen=True)
class Site:
    """One place an adapter goes: the host module's name, the slot mode, and its in/out width."""

    host: str
    mode: str
    in_features: int
    out_features: int
    span_start: Optional[str] = None


def model_type(model: nn.Module) -> Optional[str]:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def hidden_size(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    for attr in ("hidden_size", "d_model", "n_embd", "dim"):
        value = getattr(config, attr, None)
        if isinstance(value, int):
            return value
    raise ValueError(
        "cannot tell the model's hidden size (no config.hidden_size or d_model); "
        "adapters need it for modules that are not nn.Linear"
    )


# Module-name patterns come from configs, and so from files: a pattern that backtracks exponentially
# ("(.|\\w)*!") would hang a load. Patterns are checked (a string of at most PATTERN_LIMIT characters
# that compiles) and searched with the `regex` module (a dependency of transformers), whose searches
# take a timeout: all the searches of one pattern over a model's module names get MATCH_BUDGET_S
# seconds together, then the pattern is refused with a ValueError naming it. The semantics are those
# of `re.search` (regex's default, version 0, is re-compatible).
PATTERN_LIMIT = 1000
MATCH_BUDGET_S = 2.0


def check_pattern(pattern, what: str = "module pattern") -> None:
    """A ValueError unless `pattern` is a string of at most PATTERN_LIMIT characters that compiles."""
    if not isinstance(pattern, str):
        raise ValueError(f"{what} must be a regular expression string, got {type(pattern).__name__} {pattern!r}")
    if len(pattern) > PATTERN_LIMIT:
        raise ValueError(f"{what} {pattern[:40]!r}... has {len(pattern):,} characters (limit {PATTERN_LIMIT:,})")
    try:
        re.compile(pattern)
    except (re.error, RecursionError, OverflowError) as err:
        raise ValueError(f"{what} {pattern!r} is not a valid regular expression: {err}") from None


def _searcher(pattern: str):
    """`search(name, timeout)` for `pattern`: regex's, which honours the timeout, or re's."""
    try:
        import regex

        compiled = regex.compile(pattern)
        return lambda name, timeout: compiled.search(name, timeout=timeout)
    except Exception:  # no regex module, or a pattern it reads otherwise: re, without a time bound
        compiled = re.compile(pattern)
        return lambda name, timeout: compiled.search(name)


def _match(model: nn.Module, pattern: str) -> List[Tuple[str, nn.Module]]:
    check_pattern(pattern)
    search = _searcher(pattern)
    deadline = time.monotonic() + MATCH_BUDGET_S
    found = []
    for n, m in model.named_modules():
        if not n or _inside_adapter(n):
            continue
        try:
            hit = search(n, max(deadline - time.monotonic(), 1e-3))
        except TimeoutError:
            raise ValueError(
                f"module pattern {pattern!r} took more than {MATCH_BUDGET_S:g} s to match the model's "
                "module names (a pattern that backtracks exponentially, such as a repeated group "
                "whose alternatives overlap); simplify it"
            ) from None
        if hit:
            found.append((n, m))
    return found


def _inside_adapter(name: str) -> bool:
    return ".sparseadapter." in f".{name}." or name.startswith("sparseadapter_prefix")


def is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2): a linear layer whose weight is stored [in, out]."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return False
    return isinstance(module, Conv1D)


def linear_dims(module: nn.Module) -> Optional[Tuple[int, int]]:
    """(in, out) of an nn.Linear or a Conv1D; None for any other module."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if is_conv1d(module):
        return module.nx, module.nf
    return None


def _dims(model: nn.Module, module: nn.Module) -> Tuple[int, int]:
    dims = linear_dims(module)
    if dims is not None:
        return dims
    d = hidden_size(model)
    return d, d


def family(model: nn.Module) -> dict:
    kind = model_type(model)
    if kind not in FAMILIES:
        raise ValueError(
            f"sparseadapter has no built-in placement for model type {kind!r} (known: {', '.join(sorted(FAMILIES))}); "
            "pass target_modules=[regex, ...] (and lora_targets for LoRA) in the SparseAdapterConfig"
        )
    return FAMILIES[kind]


def _require(found, what: str, pattern: str):
    if not found:
        raise ValueError(f"sparseadapter: no module of the model matches the {what} pattern {pattern!r}")
    return found


def resolve_sites(
    model: nn.Module,
    kind: str,
    target_modules: Optional[Sequence[str]] = None,
    lora_targets: Optional[Sequence[str]] = None,
) -> Dict[str, List[Site]]:
    """The sites of each part of an adapter of `kind`: {"bottleneck": [...], "lora": [...], "prefix": [...]}.

    `target_modules` replaces the family's placement of bottleneck adapters: each matching module gets
    a sequential adapter after it (houlsby, pfeiffer) or a parallel one around it (parallel, mam).
    """
    out: Dict[str, List[Site]] = {}
    if kind in ("prefix", "mam") and model_type(model) not in FAMILIES:
        # checked first: target_modules places bottleneck adapters only, so advising it would not help
        raise ValueError(
            f"prefix tuning ({kind}) goes into the attention modules of a built-in model family "
            f"(known: {', '.join(sorted(FAMILIES))}); model type {model_type(model)!r} has none, and target_modules "
            "places bottleneck adapters only"
        )
    if kind == "lora":
        patterns = list(lora_targets) if lora_targets else list(family(model)["lora"])
        sites = []
        for pattern in patterns:
            for name, module in _require(_match(model, pattern), "LoRA target", pattern):
                dims = linear_dims(module)
                if dims is None:
                    raise ValueError(f"LoRA adapts nn.Linear (or Conv1D) layers; {name!r} is a {type(module).__name__}")
                sites.append(Site(name, "lora", *dims))
        out["lora"] = _unique(sites)
        return out
    if kind in ("houlsby", "pfeiffer", "parallel", "mam"):
        sequential = kind in ("houlsby", "pfeiffer")
        if target_modules:
            sites = []
            for pattern in target_modules:
                for name, module in _require(_match(model, pattern), "target_modules", pattern):
                    d_in, d_out = _dims(model, module)
                    if sequential:
                        sites.append(Site(name, "after", d_out, d_out))
                    else:
                        sites.append(Site(name, "parallel", d_in, d_out))
        elif sequential:
            fam = family(model)
            roles = ("attn_output", "ffn_output") if kind == "houlsby" else ("ffn_output",)
            sites = []
            for role in roles:
                for name, module in _require(_match(model, fam[role]), role, fam[role]):
                    d = _dims(model, module)[1]
                    sites.append(Site(name, "after", d, d))
        else:
            sites = _ffn_parallel_sites(model, family(model)["ffn_parallel"])
        out["bottleneck"] = _unique(sorted(sites, key=_order(model)))
    if kind in ("prefix", "mam"):
        # every attention role the model has: an encoder-only model (T5EncoderModel) has no decoder ones
        patterns = family(model)["prefix"]
        sites = [Site(name, "prefix", 0, 0) for pattern in patterns for name, _ in _match(model, pattern)]
        _require(sites, "prefix attention", "|".join(patterns))
        out["prefix"] = _unique(sorted(sites, key=_order(model)))
    return out


def _ffn_parallel_sites(model: nn.Module, spec) -> List[Site]:
    mode = spec[0]
    d = hidden_size(model)
    if mode == "residual_input":
        return [Site(name, mode, d, d) for name, _ in _require(_match(model, spec[1]), "ffn_parallel", spec[1])]
    if mode == "parallel":
        found = _require(_match(model, spec[1]), "ffn_parallel", spec[1])
        return [Site(name, mode, *_dims(model, m)) for name, m in found]
    starts = _require(_match(model, spec[1]), "ffn_parallel start", spec[1])
    ends = _require(_match(model, spec[2]), "ffn_parallel end", spec[2])
    if len(starts) != len(ends):
        raise ValueError(f"ffn_parallel: {len(starts)} start modules but {len(ends)} end modules")
    return [Site(end, "span", d, d, span_start=start) for (start, _), (end, _) in zip(starts, ends)]


def _order(model: nn.Module):
    index = {n: i for i, (n, _) in enumerate(model.named_modules())}
    return lambda site: index[site.host]


def _unique(sites: List[Site]) -> List[Site]:
    seen, out = set(), []
    for site in sites:
        if site.host not in seen:
            seen.add(site.host)
            out.append(site)
    return out
