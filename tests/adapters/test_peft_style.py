"""What a peft user expects: a pruned LoRA starts as an exact no-op, `disable_adapter`, routed
`adapter_names=`, `merge` that refuses what it cannot fold, peft's config names, and the CLI flags
for them (on a tiny random BERT, built here)."""

import shlex
import warnings

import pytest
import torch
from hf_support import one_thread, tiny_bert_classifier  # noqa: F401
from repo_paths import REPO
from training_support import sentiment_files, tiny_model  # noqa: F401

import sparseadapter as sa
from sparseadapter import SparseLinear
from sparseadapter.adapters.io import CONFIG_FILE
from sparseadapter.cli import main

transformers = pytest.importorskip("transformers")
PRUNERS = ("random", "magnitude", "snip", "grasp", "synflow")
CLI_PAGE = REPO / "docs" / "cli.md"


def make_model(seed=0):
    return tiny_bert_classifier(seed)


def batches(n=2):
    gen = torch.Generator().manual_seed(1)
    return [
        dict(input_ids=torch.randint(0, 40, (4, 9), generator=gen), labels=torch.randint(0, 3, (4,), generator=gen))
        for _ in range(n)
    ]


def logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"]).logits


def quiet_add(model, name, cfg, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the scoring-only re-initialization of zero matrices says so
        return sa.add_adapter(model, name, cfg, **kw)


# -- A pruned LoRA starts as an exact no-op -----------------------------------------------------------
@pytest.mark.parametrize("pruner", PRUNERS)
@pytest.mark.parametrize("kind", ["lora", "parallel"])
def test_a_fresh_pruned_zero_initialized_adapter_leaves_the_base_outputs(kind, pruner):
    model, batch = make_model(), batches()[0]
    base = logits(model, batch)
    cfg = sa.SparseAdapterConfig(kind=kind, bottleneck=4, sparsity=0.5, pruner=pruner, scope="layer")
    quiet_add(model, "a", cfg, data=batches())
    ups = [m for n, m in model.named_modules() if n.endswith((".lora_B", ".up")) and isinstance(m, SparseLinear)]
    downs = [m for n, m in model.named_modules() if n.endswith((".lora_A", ".down")) and isinstance(m, SparseLinear)]
    assert ups and downs and all(m.nnz > 0 for m in ups)
    assert all(not m.values.any() for m in ups), "the zero-initialized matrix keeps its zeros after scoring"
    assert all(m.values.any() for m in downs), "the other matrix keeps its random start"
    assert torch.equal(logits(model, batch), base)
    # ... and it trains: the up matrix gets a gradient at once (the down one after a step)
    sa.train_adapter(model, "a")
    model(**batch).loss.backward()
    assert all(m.values.grad is not None and m.values.grad.abs().sum() > 0 for m in ups)


def test_masks_alone_leave_the_weights_unchanged():
    model = make_model()
    sa.add_adapter(model, "a", sa.SparseAdapterConfig(kind="lora", bottleneck=4))  # dense
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(UserWarning, match="scoring only"):
        masks = sa.compute_prune_masks(model, "snip", 0.5, scope="layer", data=batches())
    assert masks and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# -- disable_adapter ----------------------------------------------------------------------------------
def test_disable_adapter_runs_the_base_model_and_restores_everything():
    model, batch = make_model(), batches()[0]
    base = logits(model, batch)
    sa.add_adapter(model, "h", sa.SparseAdapterConfig(kind="houlsby", bottleneck=4, sparsity=0.5, pruner="random"))
    sa.add_adapter(model, "l", sa.SparseAdapterConfig(kind="lora", bottleneck=4, init="bert"), activate=False)
    sa.set_active_adapters(model, ["h", "l"])
    sa.merge(model, ["l"])
    query = model.bert.encoder.layer[0].attention.self.query
    merged_weight = query.weight.detach().clone()
    adapted = logits(model, batch)
    assert not torch.equal(adapted, base)
    with sa.disable_adapter(model):
        assert torch.equal(logits(model, batch), base)
        assert sa.active_adapters(model) == []
    assert sa.active_adapters(model) == ["h", "l"]
    assert torch.equal(query.weight, merged_weight) and torch.equal(logits(model, batch), adapted)
    with pytest.raises(RuntimeError, match="inside"):
        with sa.disable_adapter(model):
            raise RuntimeError("inside")
    assert sa.active_adapters(model) == ["h", "l"]
    assert torch.equal(query.weight, merged_weight) and torch.equal(logits(model, batch), adapted)
    sa.unmerge(model)  # the merge bookkeeping survived: unmerge still restores the original bit for bit
    assert torch.equal(logits(model, batch), adapted) or torch.allclose(logits(model, batch), adapted, atol=1e-5)


def test_disable_adapter_on_a_fusion_and_on_a_plain_model():
    model, batch = make_model(), batches()[0]
    base = logits(model, batch)
    with sa.disable_adapter(model):  # nothing to disable
        assert torch.equal(logits(model, batch), base)
    for name, seed in (("a", 1), ("b", 2)):
        sa.add_adapter(model, name, sa.SparseAdapterConfig(kind="pfeiffer", bottleneck=4, seed=seed))
    fusion = sa.add_fusion(model, ["a", "b"])
    sa.set_active_fusion(model, fusion)
    fused = logits(model, batch)
    with sa.disable_adapter(model):
        assert torch.equal(logits(model, batch), base)
    assert torch.equal(logits(model, batch), fused)


# -- adapter_names= routes rows (tests/adapters/test_mixed_adapter_batches.py has the numerics) --------------
def test_adapter_names_routing_hook_is_installed_once_and_survives_deepcopy():
    model, batch = make_model(), batches()[0]
    sa.add_adapter(model, "a", sa.SparseAdapterConfig(kind="lora", bottleneck=4))
    model(input_ids=batch["input_ids"], adapter_names=None)  # peft's default: nothing asked
    sa.add_adapter(model, "b", sa.SparseAdapterConfig(kind="pfeiffer", bottleneck=4))
    assert sum(1 for fn in model._forward_pre_hooks.values() if fn.__name__ == "_route_adapter_names") == 1
    import copy

    twin = copy.deepcopy(model)
    with pytest.raises(ValueError, match=r"adapter_names\[0\] = 'zz' is not an adapter"):
        twin(input_ids=batch["input_ids"], adapter_names=["zz"] * 4)
    with torch.no_grad():
        routed = twin(input_ids=batch["input_ids"], adapter_names=["b", None, "b", None]).logits
        sa.set_active_adapters(twin, ["b"])
        only_b = twin(input_ids=batch["input_ids"]).logits
        with sa.disable_adapter(twin):
            bare = twin(input_ids=batch["input_ids"]).logits
    torch.testing.assert_close(routed[0::2], only_b[0::2])
    torch.testing.assert_close(routed[1::2], bare[1::2])
    assert not torch.allclose(only_b, bare)


# -- merge refuses what it cannot fold ----------------------------------------------------------------
def test_merge_refuses_a_houlsby_adapter_instead_of_doing_nothing():
    model = make_model()
    sa.add_adapter(model, "h", sa.SparseAdapterConfig(kind="houlsby", bottleneck=4))
    with pytest.raises(ValueError, match=r"'h' is houlsby: only LoRA"):
        sa.merge(model)
    with pytest.raises(ValueError, match="only LoRA"):
        sa.merge(model, ["h"])
    sa.set_active_adapters(model, [])
    with pytest.raises(ValueError, match="no adapter is active"):
        sa.merge(model)
    sa.merge(model, [])  # an explicit empty list is nothing to do


# -- peft's names ---------------------------------------------------------------------------------------
def test_peft_names_are_aliases_that_must_agree():
    cfg = sa.SparseAdapterConfig(kind="lora", r=4, target_modules=["query"], lora_alpha=8, lora_dropout=0.1)
    assert (cfg.bottleneck, cfg.lora_targets, cfg.dropout) == (4, ["query"], 0.1)
    assert (cfg.r, cfg.target_modules, cfg.lora_dropout) == (4, ["query"], 0.1)
    assert cfg == sa.SparseAdapterConfig(kind="lora", bottleneck=4, lora_targets=["query"], lora_alpha=8, dropout=0.1)
    saved = cfg.to_dict()
    assert "r" not in saved and "lora_dropout" not in saved and saved["target_modules"] is None
    assert sa.SparseAdapterConfig.from_dict(saved) == cfg
    assert sa.SparseAdapterConfig(kind="lora", target_modules="query").lora_targets == ["query"]
    assert sa.SparseAdapterConfig(kind="houlsby", r=16).bottleneck == 16
    for kwargs, match in [
        (dict(kind="lora", r=4, bottleneck=8), "r=4 and bottleneck=8 disagree"),
        (dict(kind="lora", target_modules=["query"], lora_targets=["value"]), "target_modules=.* disagree"),
        (dict(kind="lora", lora_dropout=0.1, dropout=0.2), "lora_dropout=0.1 and dropout=0.2 disagree"),
        (dict(kind="houlsby", lora_dropout=0.1), "lora_dropout applies to kind='lora'"),
        (dict(kind="lora", r=0), "bottleneck must be a positive int"),
        (dict(kind="lora", lora_alpha=-1), "lora_alpha must be a positive number"),
    ]:
        with pytest.raises(ValueError, match=match):
            sa.SparseAdapterConfig(**kwargs)
    agree = sa.SparseAdapterConfig(kind="lora", r=4, bottleneck=4, target_modules=["query"], lora_targets=["query"])
    assert agree.bottleneck == 4


def test_peft_style_lora_config_places_and_scales_like_peft():
    model = make_model()
    cfg = sa.SparseAdapterConfig(kind="lora", r=2, lora_alpha=6, target_modules=["query", "key"], lora_dropout=0.25)
    sa.add_adapter(model, "a", cfg)
    hosts = sorted(h for h, _ in sa.adapters.adapter_modules(model, "a").items())
    assert [h.split(".sparseadapter")[0] for h in hosts] == [
        f"bert.encoder.layer.{i}.attention.self.{p}" for i in range(2) for p in ("key", "query")
    ]
    lora = model.bert.encoder.layer[0].attention.self.query.sparseadapter.adapters["a"]
    assert lora.scaling == 3.0 and lora.dropout.p == 0.25 and lora.lora_A.out_features == 2


# -- the command line -----------------------------------------------------------------------------------
def prune_args(tiny_model, files, *extra):
    return [
        "prune",
        "--model",
        tiny_model,
        "--task",
        "custom",
        "--train-file",
        files["train"],
        "--no-progress",
        "--threads",
        "1",
        "--max-length",
        "16",
        "--batch-size",
        "8",
        *extra,
    ]


def test_cli_takes_peft_flags_and_the_adapter_name(tiny_model, sentiment_files, tmp_path, capsys):
    out = tmp_path / "saved"
    code = main(
        prune_args(
            tiny_model,
            sentiment_files,
            "--kind",
            "lora",
            "--target-modules",
            r"query$",
            r"key$",
            "--r",
            "2",
            "--lora-alpha",
            "4",
            "--lora-dropout",
            "0.05",
            "--adapter-name",
            "sst2",
            "--sparsity",
            "0.5",
            "--pruner",
            "magnitude",
            "--save",
            str(out),
        )
    )
    printed = capsys.readouterr()
    assert code == 0, printed.err
    import json

    meta = json.loads((out / CONFIG_FILE).read_text())
    assert meta["name"] == "sst2"
    assert meta["config"]["lora_targets"] == [r"query$", r"key$"]
    assert (meta["config"]["bottleneck"], meta["config"]["lora_alpha"], meta["config"]["dropout"]) == (2, 4.0, 0.05)
    assert "self.key.sparseadapter.adapters.sst2.lora_A" in printed.out
    code = main(prune_args(tiny_model, sentiment_files, "--kind", "lora", "--lora-targets", r"value$"))
    assert code == 0 and "self.value.sparseadapter.adapters.task" in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--kind", "houlsby", "--lora-dropout", "0.1"], "lora_dropout applies to kind 'lora'"),
        (["--kind", "houlsby", "--lora-alpha", "8"], "lora_alpha applies to kind 'lora'"),
        (["--kind", "lora", "--adapter-dropout", "0.2", "--lora-dropout", "0.1"], "disagree"),
        (["--adapter-name", "a.b"], "adapter_name must be"),
        (["--kind", "lora", "--target-modules", "("], "not a valid regex"),
    ],
)
def test_cli_rejects_inconsistent_peft_flags(tiny_model, sentiment_files, capsys, extra, needle):
    assert main(prune_args(tiny_model, sentiment_files, *extra)) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1, err


def test_documented_prune_example_runs(tiny_model, sentiment_files, capsys):
    """docs/cli.md's `sparseadapter prune` line, on the tiny model and data (its options as written)."""
    line = next(line for line in CLI_PAGE.read_text().splitlines() if line.startswith("sparseadapter prune"))
    argv = shlex.split(line.split("#")[0])[1:]
    assert main(prune_args(tiny_model, sentiment_files, *argv[1:])) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    total = next(line for line in out.splitlines() if line.startswith("total"))
    assert abs(float(total.split()[-1]) - 0.9) < 0.01, out  # 10% of each 8x32 matrix, rounded
