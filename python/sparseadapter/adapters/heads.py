"""One task head per adapter: each named adapter owns its head, and activating the adapter activates it.

A Hugging Face task model has one head at a fixed attribute (`classifier`, `score`, `qa_outputs`,
`classification_head`) that its forward calls. Here every adapter keeps a head of its own (a
`HeadRecord` in its registry entry), and `set_active_adapters` / `train_adapter` put the head of the
(last) active adapter that owns one at that attribute, with the model's `num_labels`, `problem_type`
and label names set to match: two adapters for two tasks live in one model, and each answers with its
own head.

    sa.add_adapter(model, "topic", config)                                    # takes the model's head
    sa.add_adapter(model, "score", config, head=sa.HeadConfig("regression"))  # a new 1-output head
    sa.set_active_adapters(model, "score")          # the model now answers with the regression head

Which head a new adapter gets (`add_adapter(..., head=None)`, `load_adapter(..., load_head=False)`):
the model's current head when no adapter owns it yet (so one adapter on a fresh task model works as it
always did), else a copy of the current head (same values; the copy is the new adapter's alone). With
`head=HeadConfig(kind, num_labels)` a new head of that kind and size is drawn (normal with the model's
`initializer_range`, seeded). Adding an adapter never changes another adapter's head.

Kinds: classification (num_labels >= 2 outputs, cross-entropy), regression (one output; with target
normalization, see head.py, which lives in the head's own buffers and hook and so moves with it), span
(start and end logits of extractive question answering, the `qa_outputs` of a question-answering
model). A span head needs a token-level model (AutoModelForQuestionAnswering or training.qa.SpanModel);
classification and regression heads a sequence-level one; the kind a model's head attribute takes is
checked when a head is asked for. A language model (causal or seq2seq) has no task head: its adapters
answer through its language-model head, part of the frozen base and shared by all of them, so they own
none, and asking for one is refused.

`save_adapter(..., include_head=True)` writes the adapter's own head (whether or not it is active) with
its description (`"head"` in adapter_config.json: attribute, kind, outputs, problem type, label names,
and `info`, free-form JSON such as a span head's null-answer threshold); `load_adapter` gives the loaded
adapter that head: into the model's current head when no adapter owns it (it must then have the same
shapes), else into a new head shaped by the file.
"""

import copy
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from . import head as normalization
from .registry import REGISTRY_ATTR, entry

HEAD_KINDS = ("classification", "regression", "span")
SPAN_ATTRS = ("qa_outputs",)


def head_attrs() -> Tuple[str, ...]:
    from .api import HEAD_NAMES

    return HEAD_NAMES


@dataclass(frozen=True)
class HeadConfig:
    """The head a new adapter asks for: `kind` classification (num_labels >= 2; default the model's),
    regression (one output) or span (two: start and end logits); `labels` names the classes."""

    kind: str
    num_labels: Optional[int] = None
    labels: Optional[Tuple[str, ...]] = None

    def __post_init__(self):
        if self.kind not in HEAD_KINDS:
            raise ValueError(f"HeadConfig: kind must be one of {', '.join(HEAD_KINDS)}, got {self.kind!r}")
        if self.labels is not None:
            object.__setattr__(self, "labels", tuple(str(n) for n in self.labels))
            if self.num_labels is None:
                object.__setattr__(self, "num_labels", len(self.labels))
        n = self.num_labels
        if n is not None and (not isinstance(n, int) or isinstance(n, bool)):
            raise ValueError(f"HeadConfig: num_labels must be an int, got {n!r}")
        if self.kind == "classification" and n is not None and n < 2:
            raise ValueError(f"HeadConfig: a classification head needs num_labels >= 2, got {n}")
        if self.kind == "regression" and n not in (None, 1):
            raise ValueError(f"HeadConfig: a regression head has one output, got num_labels={n}")
        if self.kind == "span" and n not in (None, 2):
            raise ValueError(f"HeadConfig: a span head has two outputs (start, end), got num_labels={n}")
        if self.labels is not None and (self.kind != "classification" or len(self.labels) != self.num_labels):
            raise ValueError("HeadConfig: labels name the classes of a classification head, one per label")

    @property
    def outputs(self) -> Optional[int]:
        return {"regression": 1, "span": 2}.get(self.kind, self.num_labels)


@dataclass(eq=False)
class HeadRecord:
    """An adapter's head: the module, the model attribute it answers at, and how to read it."""

    attr: str
    module: nn.Module
    problem_type: Optional[str] = None
    id2label: Optional[List[str]] = None
    info: Dict[str, Any] = field(default_factory=dict)

    def __eq__(self, other) -> bool:
        """Equal descriptions and equal head tensors (a deep copy of a record equals it)."""
        if not isinstance(other, HeadRecord):
            return NotImplemented
        if (self.attr, self.problem_type, self.id2label, self.info) != (
            other.attr,
            other.problem_type,
            other.id2label,
            other.info,
        ):
            return False
        mine, theirs = self.module.state_dict(), other.module.state_dict()
        return mine.keys() == theirs.keys() and all(
            mine[k].shape == theirs[k].shape and torch.equal(mine[k].cpu(), theirs[k].cpu()) for k in mine
        )

    @property
    def outputs(self) -> int:
        return _last_linear(self.module)[1].out_features

    @property
    def kind(self) -> str:
        if self.attr in SPAN_ATTRS:
            return "span"
        return "regression" if self.outputs == 1 or self.problem_type == "regression" else "classification"

    def describe(self) -> dict:
        """The JSON save_adapter writes as "head"."""
        return {
            "attr": self.attr,
            "kind": self.kind,
            "outputs": self.outputs,
            "problem_type": self.problem_type,
            "id2label": list(self.id2label) if self.id2label is not None else None,
            "info": dict(self.info),
        }


HeadLike = Union[None, str, HeadConfig]


# ------------------------------------------------------------------------------------------ lookups


def current_head(model: nn.Module) -> Optional[Tuple[str, nn.Module]]:
    """(attribute, module) of the head the model's forward calls now, or None for a model without one."""
    for attr in head_attrs():
        module = getattr(model, attr, None)
        if isinstance(module, nn.Module):
            return attr, module
    return None


def adapter_head(model: nn.Module, name: str) -> Optional[HeadRecord]:
    """Adapter `name`'s head, or None when it has none (a model without a task head)."""
    return getattr(entry(model, name), "head", None)


def head_owner(model: nn.Module, module: nn.Module) -> Optional[str]:
    """The adapter that owns head `module`, or None."""
    reg = model.__dict__.get(REGISTRY_ATTR)
    for name, e in reg.adapters.items() if reg is not None else ():
        record = getattr(e, "head", None)
        if record is not None and record.module is module:
            return name
    return None


def head_info(model: nn.Module, name: str) -> Dict[str, Any]:
    """The free-form metadata of adapter `name`'s head (saved with it; empty without a head)."""
    record = adapter_head(model, name)
    return dict(record.info) if record is not None else {}


def set_head_info(model: nn.Module, name: str, **info) -> None:
    """Merge JSON-able `info` into adapter `name`'s head metadata (e.g. null_threshold=1.5)."""
    record = adapter_head(model, name)
    if record is None:
        raise ValueError(f"adapter {name!r} has no task head")
    record.info.update(info)


def heads_of(model: nn.Module) -> Dict[str, HeadRecord]:
    """Every adapter's head, by adapter name."""
    reg = model.__dict__.get(REGISTRY_ATTR)
    return {n: e.head for n, e in (reg.adapters.items() if reg is not None else ()) if getattr(e, "head", None)}


# ------------------------------------------------------------------------------------------ building


def _last_linear(module: nn.Module) -> Tuple[str, nn.Linear]:
    found = [(n, m) for n, m in module.named_modules() if isinstance(m, nn.Linear)]
    if not found:
        raise ValueError(f"the task head {type(module).__name__} has no linear output layer")
    return found[-1]


def _init_std(model: nn.Module) -> float:
    value = getattr(getattr(model, "config", None), "initializer_range", None)
    return float(value) if isinstance(value, (int, float)) and value > 0 else 0.02


def _kind_fits(attr: str, kind: str) -> None:
    span_model = attr in SPAN_ATTRS
    if (kind == "span") != span_model:
        need = (
            "a question-answering model (start and end logits per token: AutoModelForQuestionAnswering or "
            "sparseadapter.training.qa.SpanModel)"
            if kind == "span"
            else "a sequence-level task model (AutoModelForSequenceClassification)"
        )
        raise ValueError(f"a {kind} head needs {need}; this model's head is {attr!r}")


def new_head(model: nn.Module, template: nn.Module, outputs: int, seed: int = 0) -> nn.Module:
    """A head built like `template` (same layers, device and dtype) with `outputs` outputs, every linear
    layer drawn anew: normal(0, initializer_range) weights, zero biases, from `seed`; no normalization."""
    module = copy.deepcopy(template)
    normalization.uninstall(module)
    path, last = _last_linear(module)
    replacement = nn.Linear(last.in_features, outputs, bias=last.bias is not None).to(
        last.weight.device, last.weight.dtype
    )
    parent, _, child = path.rpartition(".")
    if path:
        setattr(module.get_submodule(parent) if parent else module, child, replacement)
    else:
        module = replacement
    std = _init_std(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, nn.Linear):
                weight = torch.randn(layer.weight.shape, generator=generator, dtype=torch.float32) * std
                layer.weight.copy_(weight)
                if layer.bias is not None:
                    layer.bias.zero_()
    for p in module.parameters():
        p.requires_grad_(True)
    return module


def _default_problem_type(model: nn.Module, outputs: int) -> Optional[str]:
    configured = getattr(getattr(model, "config", None), "problem_type", None)
    if configured is not None:
        return configured
    return "regression" if outputs == 1 else None


def _model_labels(model: nn.Module, outputs: int) -> Optional[List[str]]:
    id2label = getattr(getattr(model, "config", None), "id2label", None)
    if not isinstance(id2label, dict) or len(id2label) != outputs:
        return None
    try:
        return [str(id2label.get(i, id2label.get(str(i)))) for i in range(outputs)]
    except Exception:
        return None


@dataclass
class PlannedHead:
    """A head chosen for a new adapter, built off the model: attach_planned_head gives it to the adapter."""

    record: HeadRecord
    state: Optional[Dict[str, Tensor]] = None  # tensors to load into it (load_adapter)
    normalization: Optional[Tuple[float, float]] = None


def _has_lm_head(model: nn.Module) -> bool:
    get = getattr(model, "get_output_embeddings", None)
    return callable(get) and isinstance(get(), nn.Module)


def plan_head(model: nn.Module, head: HeadLike = None, seed: int = 0) -> Optional[PlannedHead]:
    """The head a new adapter gets (see the module docstring); checked and built without changing the
    model. None when the model has no task head (and none was asked for)."""
    if isinstance(head, str):
        head = HeadConfig(head)
    if head is not None and not isinstance(head, HeadConfig):
        raise TypeError(f"head must be a HeadConfig, a kind name or None, got {type(head).__name__}")
    current = current_head(model)
    if current is None:
        if head is not None and _has_lm_head(model):
            raise ValueError(
                f"this is a language model: its adapters answer through its language-model head, "
                f"part of the frozen base model and shared by all of them, so there is no place for "
                f"a {head.kind} head; load the model as a task model (AutoModelFor...) for one"
            )
        if head is not None:
            raise ValueError(
                f"this model has no task head ({', '.join(head_attrs())}) to give a {head.kind} "
                "head a place; load it as a task model (AutoModelFor...)"
            )
        return None
    attr, module = current
    if head is None:
        if head_owner(model, module) is None:
            outputs = _last_linear(module)[1].out_features
            if attr in SPAN_ATTRS:
                return PlannedHead(HeadRecord(attr, module))
            return PlannedHead(
                HeadRecord(attr, module, _default_problem_type(model, outputs), _model_labels(model, outputs))
            )
        owner = heads_of(model)[head_owner(model, module)]
        return PlannedHead(
            HeadRecord(
                attr, copy.deepcopy(module), owner.problem_type, list(owner.id2label) if owner.id2label else None, {}
            )
        )
    _kind_fits(attr, head.kind)
    outputs = head.outputs
    if outputs is None:  # a classification head as wide as the model's
        outputs = _last_linear(module)[1].out_features
        if outputs < 2:
            raise ValueError("HeadConfig('classification') needs num_labels: the model's head has one output")
    problem = {"regression": "regression", "classification": "single_label_classification"}.get(head.kind)
    labels = (
        list(head.labels)
        if head.labels
        else ([f"LABEL_{i}" for i in range(outputs)] if head.kind == "classification" else None)
    )
    return PlannedHead(HeadRecord(attr, new_head(model, module, outputs, seed), problem, labels))


def attach_planned_head(model: nn.Module, name: str, planned: Optional[PlannedHead]) -> None:
    """Give adapter `name` (already in the registry) the planned head, loading its tensors if any."""
    if planned is None:
        return
    record = planned.record
    if planned.state is not None:
        with torch.no_grad():
            if planned.normalization is not None:
                normalization.install(record.module, *planned.normalization)
            else:
                normalization.uninstall(record.module)
            record.module.load_state_dict(planned.state, strict=True)
    entry(model, name).head = record


# ------------------------------------------------------------------------------------------ activation


def _device_dtype(model: nn.Module) -> Optional[Tuple[torch.device, torch.dtype]]:
    current = current_head(model)
    for module in ([current[1]] if current else []) + [model]:
        for p in module.parameters():
            if p.is_floating_point():
                return p.device, p.dtype
    return None


def activate_head(model: nn.Module, names: List[str]) -> None:
    """Put the head of the last adapter in `names` that owns one at the model's head attribute, and set
    the model's num_labels, problem_type and label names to it. No owner among `names`: nothing changes."""
    reg = model.__dict__.get(REGISTRY_ATTR)
    if reg is None:
        return
    owners = [n for n in names if n in reg.adapters and getattr(reg.adapters[n], "head", None) is not None]
    if not owners:
        return
    record = reg.adapters[owners[-1]].head
    if getattr(model, record.attr, None) is not record.module:
        where = _device_dtype(model)
        if where is not None:
            record.module.to(*where)
        setattr(model, record.attr, record.module)
    if record.kind == "span":
        return
    outputs = record.outputs
    if hasattr(model, "num_labels"):
        model.num_labels = outputs
    config = getattr(model, "config", None)
    if config is None:
        return
    config.problem_type = record.problem_type
    if getattr(config, "num_labels", outputs) != outputs:
        config.num_labels = outputs
    if record.id2label is not None and len(record.id2label) == outputs:
        config.id2label = {i: n for i, n in enumerate(record.id2label)}
        config.label2id = {n: i for i, n in enumerate(record.id2label)}


# ------------------------------------------------------------------------------------------ saving and loading


def saved_heads(model: nn.Module, name: str) -> List[Tuple[str, nn.Module]]:
    """The (attribute, module) pairs save_adapter writes for adapter `name`: its own head; for an adapter
    without a record (none was made), every head the model has."""
    record = adapter_head(model, name)
    if record is not None:
        return [(record.attr, record.module)]
    return [(a, getattr(model, a)) for a in head_attrs() if isinstance(getattr(model, a, None), nn.Module)]


def describe_saved_head(model: nn.Module, name: str) -> Optional[dict]:
    record = adapter_head(model, name)
    return record.describe() if record is not None else None


def _check_description(described, attr: str, module_kind: str) -> dict:
    if described is None:
        return {}
    if not isinstance(described, dict):
        raise ValueError(f'load_adapter: the config\'s "head" must be an object, got {type(described).__name__}')
    if described.get("attr", attr) != attr:
        raise ValueError(
            f"load_adapter: the config describes a head at {described.get('attr')!r}, the file's "
            f"tensors are for {attr!r}"
        )
    kind = described.get("kind", module_kind)
    if kind not in HEAD_KINDS:
        raise ValueError(f"load_adapter: unknown head kind {kind!r}")
    info = described.get("info", {})
    if not isinstance(info, dict):
        raise ValueError('load_adapter: the head\'s "info" must be an object')
    labels = described.get("id2label")
    if labels is not None and (not isinstance(labels, list) or not all(isinstance(n, str) for n in labels)):
        raise ValueError('load_adapter: the head\'s "id2label" must be a list of names')
    problem = described.get("problem_type")
    if problem is not None and not isinstance(problem, str):
        raise ValueError('load_adapter: the head\'s "problem_type" must be a string')
    return described


def plan_loaded_head(model: nn.Module, tensors: Dict[str, Tensor], described=None) -> Optional[PlannedHead]:
    """The head for an adapter loaded with its head: the file's `head.<attr>.<tensor>` tensors, checked
    against the model and loaded (by attach_planned_head) into the model's current head when no adapter
    owns it, else into a new head shaped by the file. None when the file holds no head."""
    from .head import TARGET_KEYS

    state: Dict[str, Dict[str, Tensor]] = {}
    for key, t in tensors.items():
        if not key.startswith("head."):
            continue
        attr, _, param = key[len("head.") :].partition(".")
        module = getattr(model, attr, None)
        if attr not in head_attrs() or not isinstance(module, nn.Module):
            raise ValueError(f"load_adapter: the file has a head {attr!r} this model lacks")
        state.setdefault(attr, {})[param] = t
    if not state:
        return None
    if len(state) > 1:
        raise ValueError(f"load_adapter: the file has more than one head ({', '.join(sorted(state))})")
    attr, tensors_of = next(iter(state.items()))
    current = getattr(model, attr)
    if head_owner(model, current) is None:
        target = current
    else:  # the current head is another adapter's: this adapter gets a new one, sized by the file
        last_path, _ = _last_linear(current)
        key = f"{last_path}.weight" if last_path else "weight"
        weight = tensors_of.get(key)
        if weight is None or weight.dim() != 2:
            raise ValueError(f"load_adapter: the file's head {attr!r} lacks {key!r}")
        target = new_head(model, current, int(weight.shape[0]))
    own = target.state_dict()
    for param, t in tensors_of.items():
        goal = own.get(param)
        if param in TARGET_KEYS and goal is None and t.numel() == 1:
            goal = t  # a regression head's normalization: installed on this head as it loads
        if goal is None or goal.shape != t.shape:
            raise ValueError(
                f"load_adapter: head tensor head.{attr}.{param} has shape {tuple(t.shape)}, the "
                f"model's is {None if goal is None else tuple(goal.shape)} (another number of labels?)"
            )
    if (TARGET_KEYS[0] in tensors_of) != (TARGET_KEYS[1] in tensors_of):
        raise ValueError(f"load_adapter: the file's head {attr!r} has only one of {TARGET_KEYS}")
    for key in TARGET_KEYS:
        if key in tensors_of and not (
            torch.isfinite(tensors_of[key]).all() and (key != TARGET_KEYS[1] or tensors_of[key] > 0)
        ):
            raise ValueError(f"load_adapter: the file's head {attr!r} has an invalid {key} {tensors_of[key].tolist()}")
    # a head that answers in raw units (no normalization in the file) loads onto a normalized one too
    missing = sorted(set(own) - set(tensors_of) - set(TARGET_KEYS))
    if missing:
        raise ValueError(f"load_adapter: the file's head {attr!r} lacks {missing[0]!r}")
    norm = None
    if TARGET_KEYS[0] in tensors_of:
        norm = (float(tensors_of[TARGET_KEYS[0]]), float(tensors_of[TARGET_KEYS[1]]))
    outputs = _last_linear(target)[1].out_features
    fallback_kind = "span" if attr in SPAN_ATTRS else "regression" if outputs == 1 or norm else "classification"
    described = _check_description(described, attr, fallback_kind)
    kind = described.get("kind", fallback_kind)
    _kind_fits(attr, kind)
    if kind == "regression" and outputs != 1:
        raise ValueError(f"load_adapter: the config says a regression head, the file's has {outputs} outputs")
    problem = described.get(
        "problem_type",
        "regression" if kind == "regression" else _default_problem_type(model, outputs) if target is current else None,
    )
    labels = described.get("id2label")
    if labels is not None and len(labels) != outputs:
        raise ValueError(f"load_adapter: {len(labels)} label names for a head with {outputs} outputs")
    if labels is None and target is current and kind != "span":
        labels = _model_labels(model, outputs)
    if kind == "span":
        problem = None
    record = HeadRecord(attr, target, problem, labels, dict(described.get("info", {})))
    return PlannedHead(record, dict(tensors_of), norm)
