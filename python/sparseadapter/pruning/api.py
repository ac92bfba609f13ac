"""`prune`: score adapter weight matrices once, at initialization, keep the best, convert to CSR.

The scores and the exact-k selection live in `scores.py` and `selection.py`; this module finds the
weights to prune in a model, prepares them (zero-initialized matrices), runs the selection and turns
each pruned `nn.Linear` into a `SparseLinear`, recording how it was pruned.
"""

import hashlib
import itertools
import warnings
from dataclasses import asdict, dataclass
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ..sparse_linear import SparseLinear
from .scores import DATA_METHODS, METHODS, compute_masks
from .selection import check_no_empty

# An adapter marks the nn.Linear layers that pruning may touch with this attribute (set to True), and
# may group them into chains (forward order) for SynFlow with PRUNABLE_CHAIN (a tuple of names
# relative to the adapter). Biases, LayerNorms, prefixes and task heads are never marked.
PRUNABLE_ATTR = "sparseadapter_prunable"

Targets = Union[None, Sequence[str], Callable[[str, nn.Module], bool]]

# As in the SparseAdapter paper's code ("bert" initialization): N(0, 0.02).
ZERO_INIT_STD = 0.02


@dataclass(frozen=True)
class PruningRecord:
    """How a weight was pruned; saved with the adapter."""

    method: str
    sparsity: float
    scope: str
    erk: bool
    seed: int
    rounds: int
    calibration_examples: int
    calibration_sha256: Optional[str]

    def to_dict(self) -> dict:
        return asdict(self)


def find_targets(model: nn.Module, targets: Targets = None) -> Dict[str, nn.Linear]:
    """The dense nn.Linear layers to prune, by module name, in model order.

    `targets=None` takes the layers adapters marked prunable; a sequence takes those module names; a
    callable `(name, module) -> bool` picks among the model's nn.Linear layers.
    """
    modules = dict(model.named_modules())
    if targets is None:
        found = {n: m for n, m in modules.items() if getattr(m, PRUNABLE_ATTR, False)}
        if not found:
            raise ValueError(
                "prune: the model has no adapter weights marked prunable; add adapters first "
                "(sparseadapter.add_adapter) or name the layers with targets=[...]"
            )
    elif callable(targets):
        found = {n: m for n, m in modules.items() if isinstance(m, nn.Linear) and targets(n, m)}
        if not found:
            raise ValueError("prune: the targets predicate selected no nn.Linear layer")
    else:
        missing = [n for n in targets if n not in modules]
        if missing:
            raise ValueError(f"prune: no module named {missing[0]!r} in the model")
        found = {n: modules[n] for n in modules if n in set(targets)}
    for name, module in found.items():
        if isinstance(module, SparseLinear):
            raise ValueError(f"prune: {name!r} is already sparse; pruning happens once, at initialization")
        if not isinstance(module, nn.Linear):
            raise ValueError(f"prune: {name!r} is a {type(module).__name__}, not an nn.Linear")
    return found


# What SNIP and GraSP accept as calibration data (in the docstrings and in every error about it).
CALIBRATION_FORMS = (
    "calibration data is an iterable of batches (a list, a generator, a torch DataLoader); without "
    "loss_fn each batch is a dict of tensors the model takes as model(**batch), with labels, so that "
    "model(**batch).loss is the loss (a tokenizer's output with labels added, or what a DataLoader with "
    "transformers' DataCollatorWithPadding yields); any other batch, e.g. an (inputs, labels) tuple, needs "
    "loss_fn=lambda model, batch: ... returning a scalar loss"
)


def describe_batch(batch) -> str:
    """A short description of a batch: its type, and its keys or items with their shapes."""

    def item(v) -> str:
        if isinstance(v, Tensor):
            return f"Tensor{list(v.shape)} {str(v.dtype).replace('torch.', '')}"
        if isinstance(v, (list, tuple)):
            return f"{type(v).__name__} of {len(v)}"
        return type(v).__name__

    if isinstance(batch, Mapping):
        keys = list(batch)
        shown = ", ".join(f"{k!r}: {item(batch[k])}" for k in keys[:8]) + (", ..." if len(keys) > 8 else "")
        return f"a {type(batch).__name__} with keys {keys[:8]}{'...' if len(keys) > 8 else ''} ({shown})"
    if isinstance(batch, (list, tuple)):
        return f"a {type(batch).__name__} of {len(batch)} ({', '.join(item(v) for v in batch[:4])}{', ...' if len(batch) > 4 else ''})"
    return f"a {item(batch)}"


def _check_default_batch(batch, index: int) -> None:
    """Without loss_fn a batch must be a dict of tensors: say what was received otherwise."""
    if not isinstance(batch, Mapping):
        raise ValueError(
            f"prune: calibration batch {index} is {describe_batch(batch)}, not a dict of tensors: "
            "pass loss_fn(model, batch) -> scalar loss for batches of this form. " + CALIBRATION_FORMS
        )
    loose = [k for k, v in batch.items() if isinstance(v, (list, str))]
    if loose or not any(isinstance(v, Tensor) for v in batch.values()):
        what = f"{loose[0]!r} is a {type(batch[loose[0]]).__name__}" if loose else "it holds no tensor"
        raise ValueError(
            f"prune: calibration batch {index} is {describe_batch(batch)}: {what}; collate examples "
            "into tensors (tokenizer(..., return_tensors='pt'), or a DataLoader with a collator). " + CALIBRATION_FORMS
        )


def _default_loss(model: nn.Module, batch) -> Tensor:
    if isinstance(batch, Mapping):
        out = model(**batch)
        # a ModelOutput is a Mapping that leaves out the fields that are None: .get, not ["loss"]
        loss = out.get("loss") if isinstance(out, Mapping) else getattr(out, "loss", None)
        if loss is not None:
            return loss
        raise ValueError(
            f"prune: the model returned no loss for calibration batch {describe_batch(batch)}: "
            "add the labels to each batch (key 'labels') or pass loss_fn(model, batch) -> scalar loss. "
            + CALIBRATION_FORMS
        )
    raise ValueError(
        "prune: cannot compute a loss from this batch: pass loss_fn(model, batch) -> scalar loss "
        "(the default only handles dict batches whose model output has .loss)"
    )


def read_calibration(data, method: str, calibration_batches: Optional[int], default_loss: bool) -> Optional[List]:
    """The batches a pruner reads, as a list: none for the data-free methods (`data` is not touched),
    else the first `calibration_batches` of `data` (all of them for None), read one by one so that a
    DataLoader or generator is consumed no further than that. Checks the container and, for the
    default loss, each batch."""
    if calibration_batches is not None and (
        not isinstance(calibration_batches, int) or isinstance(calibration_batches, bool) or calibration_batches < 1
    ):
        raise ValueError(
            f"prune: calibration_batches must be a positive int (or None for all), got {calibration_batches!r}"
        )
    if data is None or method not in DATA_METHODS:
        return None
    if isinstance(data, (Mapping, Tensor, str, bytes)):
        raise ValueError(
            f"prune: data is {describe_batch(data)}, a single batch, not an iterable of batches: "
            "pass data=[batch]. " + CALIBRATION_FORMS
        )
    try:
        iterator = iter(data)
    except TypeError:
        raise ValueError(
            f"prune: data is {describe_batch(data)}, which is not iterable. " + CALIBRATION_FORMS
        ) from None
    if calibration_batches is not None:
        iterator = itertools.islice(iterator, calibration_batches)
    batches = []
    for batch in iterator:
        if default_loss:
            _check_default_batch(batch, len(batches))
        batches.append(batch)
    return batches


def _guarded_loss(model: nn.Module, loss_fn, batches: List):
    """loss_fn(model, batch), with the errors a batch of the wrong form raises deep in a model
    (AttributeError, KeyError, TypeError, IndexError) turned into one that names what was received."""

    def closure(batch):
        try:
            loss = loss_fn(model, batch)
        except (AttributeError, KeyError, TypeError, IndexError) as err:
            index = next((i for i, b in enumerate(batches) if b is batch), "?")
            raise ValueError(
                f"prune: computing the loss of calibration batch {index} ({describe_batch(batch)}) "
                f"failed with {type(err).__name__}: {err}. " + CALIBRATION_FORMS
            ) from err
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ValueError(f"prune: loss_fn must return a scalar tensor, got {describe_batch(loss)}")
        return loss

    return closure


def _tensor_leaves(batch) -> List[Tensor]:
    if isinstance(batch, Tensor):
        return [batch]
    if isinstance(batch, Mapping):
        return [t for k in sorted(batch) for t in _tensor_leaves(batch[k])]
    if isinstance(batch, (list, tuple)):
        return [t for item in batch for t in _tensor_leaves(item)]
    return []


def _describe_data(batches: List) -> tuple:
    """(number of examples, sha256 of every tensor in order): enough to tell two calibration sets apart."""
    if not batches:
        return 0, None
    digest = hashlib.sha256()
    examples = 0
    for batch in batches:
        leaves = _tensor_leaves(batch)
        examples += leaves[0].shape[0] if leaves and leaves[0].dim() > 0 else 1
        for t in leaves:
            digest.update(str((t.dtype, tuple(t.shape))).encode())
            digest.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return examples, digest.hexdigest()


def _reinit_zero_matrices(layers: Mapping[str, nn.Linear], method: str, zero_init: str, seed: int) -> List[str]:
    """All-zero matrices score zero under every method but random (and, for SNIP/GraSP, so does their
    partner in a chain), so ties would decide which matrix disappears. They are given N(0, 0.02) values
    for scoring only: the caller puts the zeros back (`_restore_zeros`) once the masks are chosen, so a
    zero-initialized adapter (LoRA's B) still starts as an exact no-op. Returns the names changed."""
    zero = [n for n, m in layers.items() if not torch.any(m.weight.detach() != 0)]
    if not zero or method == "random":
        return []
    if zero_init == "raise":
        raise ValueError(
            f"prune: {zero[0]!r} is all zeros (a zero-initialized adapter matrix, e.g. LoRA's B), so "
            f"'{method}' scores carry no information; initialize adapters with small random values "
            "(init='bert', N(0, 0.02)) or pass zero_init='reinit'"
        )
    if zero_init != "reinit":
        raise ValueError(f"prune: zero_init must be 'reinit' or 'raise', got {zero_init!r}")
    warnings.warn(
        f"prune: re-initializing {len(zero)} all-zero matrices with N(0, {ZERO_INIT_STD}) "
        f"for '{method}' scoring only; their zeros are restored after scoring (first: {zero[0]!r})",
        stacklevel=3,
    )
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name in zero:
            w = layers[name].weight
            w.copy_(torch.randn(w.shape, generator=gen, dtype=torch.float32).to(w.device, w.dtype) * ZERO_INIT_STD)
    return zero


def _restore_zeros(layers: Mapping[str, nn.Linear], names: Sequence[str]) -> None:
    """Undo `_reinit_zero_matrices`: the matrices it filled for scoring are zero again."""
    with torch.no_grad():
        for name in names:
            layers[name].weight.zero_()


def _chains(model: nn.Module, layers: Mapping[str, nn.Linear], chains: Optional[Sequence[Sequence[str]]]):
    if chains is not None:
        for chain in chains:
            for name in chain:
                if name not in layers:
                    raise ValueError(f"prune: chain entry {name!r} is not one of the pruned layers")
        return [list(c) for c in chains]
    # Adapters declare their chains with relative names; resolve them against the adapter's path.
    found = []
    for prefix, module in model.named_modules():
        chain = getattr(module, "sparseadapter_chain", None)
        if chain:
            names = [f"{prefix}.{n}" if prefix else n for n in chain]
            found.append([n for n in names if n in layers])
    return [c for c in found if c] or None


def compute_prune_masks(
    model: nn.Module,
    method: str = "snip",
    sparsity: float = 0.4,
    scope: str = "global",
    *,
    data: Optional[Iterable] = None,
    loss_fn: Optional[Callable[[nn.Module, object], Tensor]] = None,
    seed: int = 0,
    rounds: Optional[int] = None,
    erk: bool = False,
    targets: Targets = None,
    chains: Optional[Sequence[Sequence[str]]] = None,
    zero_init: str = "reinit",
    calibration_batches: Optional[int] = None,
) -> Dict[str, Tensor]:
    """The masks `prune` would apply (module name -> bool mask), without converting: for studies. The
    model is left as it was."""
    masks, _, _ = _masks_and_record(
        model,
        method,
        sparsity,
        scope,
        data,
        loss_fn,
        seed,
        rounds,
        erk,
        targets,
        chains,
        zero_init,
        calibration_batches,
    )
    return masks


def _masks_and_record(
    model,
    method,
    sparsity,
    scope,
    data,
    loss_fn,
    seed,
    rounds,
    erk,
    targets,
    chains,
    zero_init,
    calibration_batches=None,
):
    if method not in METHODS:
        raise ValueError(f"prune: method must be one of {', '.join(METHODS)}; got {method!r}")
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"prune: sparsity is the fraction of weights removed and must be in [0, 1), got {sparsity}")
    layers = find_targets(model, targets)
    batches = read_calibration(data, method, calibration_batches, default_loss=loss_fn is None)
    if method in DATA_METHODS and not batches:
        raise ValueError(
            f"prune: '{method}' scores weights with gradients and needs calibration data: "
            "pass data=[batch, ...] (and loss_fn if batches are not dicts with labels); " + CALIBRATION_FORMS
        )
    filled = _reinit_zero_matrices(layers, method, zero_init, seed)
    closure = _guarded_loss(model, loss_fn or _default_loss, batches or [])
    was_training = model.training
    model.eval()  # as the paper's code: scores from the model in eval mode (no dropout)
    try:
        masks = compute_masks(
            method,
            {n: m.weight for n, m in layers.items()},
            sparsity,
            scope=scope,
            loss_closure=closure,
            data=batches,
            chains=_chains(model, layers, chains),
            seed=seed,
            rounds=rounds,
            erk=erk,
        )
    finally:
        model.train(was_training)
        # the temporary values were for scoring: a zero-initialized matrix starts training at zero
        _restore_zeros(layers, filled)
    if sparsity < 1.0:
        check_no_empty(masks)
    examples, digest = _describe_data(batches or [])
    used_rounds = rounds if rounds is not None else (100 if method == "synflow" else 1)
    record = PruningRecord(method, float(sparsity), scope, bool(erk), int(seed), int(used_rounds), examples, digest)
    return masks, layers, record


def prune(
    model: nn.Module,
    method: str = "snip",
    sparsity: float = 0.4,
    scope: str = "global",
    *,
    data: Optional[Iterable] = None,
    loss_fn: Optional[Callable[[nn.Module, object], Tensor]] = None,
    seed: int = 0,
    rounds: Optional[int] = None,
    erk: bool = False,
    targets: Targets = None,
    chains: Optional[Sequence[Sequence[str]]] = None,
    zero_init: str = "reinit",
    calibration_batches: Optional[int] = None,
) -> nn.Module:
    """Prune adapter weight matrices once, at initialization, and convert them to CSR, in place.

    Scores every target weight with `method` ("random", "magnitude", "snip", "grasp", "synflow"),
    keeps exactly round((1 - sparsity) * N) weights — over all targets together (`scope="global"`,
    the paper's default) or in each matrix (`scope="layer"`, with `erk=True` for ERK densities) — and
    replaces each target nn.Linear by a SparseLinear holding the kept weights and the bias.

    `sparsity` is the fraction removed (0.4 = 40% zeros). SNIP and GraSP need calibration `data`:

    - an iterable of batches: a list, a generator, a torch DataLoader;
    - without `loss_fn`, each batch a dict of tensors that the model takes as `model(**batch)`, with
      labels, so that `model(**batch).loss` is the loss (a tokenizer's output plus "labels", or a
      DataLoader with transformers' DataCollatorWithPadding);
    - any other batch (an `(inputs, labels)` tuple, ...) with `loss_fn(model, batch)` -> scalar loss.

    `calibration_batches=k` reads only the first k batches (a DataLoader is not consumed further);
    None reads them all. Random, magnitude and SynFlow are data-free and do not touch `data`. A batch
    of another form raises ValueError naming what it is (type, keys, shapes). All-zero matrices
    (zero-initialized adapters, LoRA's B) are scored with temporary N(0, 0.02) values and get their
    zeros back once the masks are chosen (`zero_init="reinit"`), so such an adapter still starts as an
    exact no-op; `zero_init="raise"` rejects them. Each new layer and the model carry a
    `sparseadapter_pruning` PruningRecord.
    """
    masks, layers, record = _masks_and_record(
        model,
        method,
        sparsity,
        scope,
        data,
        loss_fn,
        seed,
        rounds,
        erk,
        targets,
        chains,
        zero_init,
        calibration_batches,
    )
    for name, linear in layers.items():
        sparse = SparseLinear.from_dense(linear.weight.detach(), masks[name], linear.bias)
        sparse.values.requires_grad_(linear.weight.requires_grad)
        if sparse.bias is not None:
            sparse.bias.requires_grad_(linear.bias.requires_grad)
        sparse.sparseadapter_pruning = record
        _replace_module(model, name, sparse)
    model.sparseadapter_pruning = record
    return model


def _replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
