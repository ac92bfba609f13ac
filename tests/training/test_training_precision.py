"""`sparseadapter train --precision / --grad-accumulation / --compile` on a tiny random BERT:

- bf16 trains and evaluates under torch.autocast with fp32 master weights and optimizer state, is saved in
  config.json, and a killed bf16 run resumes to the bitwise same adapter;
- fp16 is CUDA only (a clear config error elsewhere); its gradient scaler's state is checkpointed and
  restored (exercised on CPU with the CUDA check lifted, and on a GPU where there is one);
- N micro-batches of b accumulate to the update of one batch of N x b, also when the last micro-batch is
  short (gradients at every step and parameters after each step, to fp32 tolerance);
- --compile gives eager's step-1 loss, reports its compile time, and the model with sparse adapters of
  every kind is one graph (no graph break, in our ops or in BERT);
- bad values and combinations end in one clear line.
"""

import json
import warnings

import pytest
import torch
from hf_support import needs_attention_interface, one_thread  # noqa: F401
from training_support import sentiment_files, tiny_model, train_args, write_tiny_model  # noqa: F401

from sparseadapter.adapters.io import weights_path
from sparseadapter.cli import build_config, main, make_parser
from sparseadapter.training import config as config_module
from sparseadapter.training.batching import TrainOrder
from sparseadapter.training.config import TrainConfig

safetensors = pytest.importorskip("safetensors.torch")


@pytest.fixture(scope="module")
def no_dropout_model(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("tiny-bert-no-dropout"), dropout=0.0)


def run_ok(argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    assert code == 0, out.err
    return out.out


def run_error(argv, capsys, *needles):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and "error:" in err, err
    for needle in needles:
        assert needle in err, err
    return err


def tensors(folder):
    return safetensors.load_file(weights_path(str(folder)))


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def trainer_state(run_dir):
    return torch.load(run_dir / "checkpoint" / "trainer_state.pt", weights_only=True)


COMMON = ("--kind", "houlsby", "--bottleneck", "8", "--sparsity", "0.5", "--pruner", "snip")


# -- config ------------------------------------------------------------------------------------------
def test_flags_defaults_and_round_trip(tmp_path):
    cfg = TrainConfig()
    assert (cfg.precision, cfg.grad_accumulation, cfg.compile) == ("fp32", 1, False)
    args = make_parser().parse_args(["train", "--precision", "bf16", "--grad-accumulation", "4", "--compile"])
    cfg = build_config(args)
    assert (cfg.precision, cfg.grad_accumulation, cfg.compile) == ("bf16", 4, True)
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    (tmp_path / "run.yaml").write_text("precision: bf16\ngrad-accumulation: 2.0\ncompile: true\n")
    cfg = build_config(make_parser().parse_args(["train", "--config", str(tmp_path / "run.yaml"), "--no-compile"]))
    assert (cfg.precision, cfg.grad_accumulation, cfg.compile) == ("bf16", 2, False)


@pytest.mark.parametrize(
    "argv, needles",
    [
        (["train", "--grad-accumulation", "0"], ["grad_accumulation must be a positive int, got 0"]),
        (
            ["train", "--precision", "fp16", "--device", "cpu"],
            ["precision fp16 needs a CUDA device", "device is cpu", "--precision bf16"],
        ),
    ],
)
def test_bad_values_give_one_clear_line(argv, needles, tmp_path, capsys):
    run_error(argv + ["--output-dir", str(tmp_path / "out")], capsys, *needles)


def test_bad_precision_in_a_config_file_and_on_the_command_line(tmp_path, capsys):
    (tmp_path / "fp8.json").write_text('{"precision": "fp8"}')
    run_error(
        ["train", "--config", str(tmp_path / "fp8.json")], capsys, "precision must be one of fp32, bf16, fp16", "'fp8'"
    )
    with pytest.raises(SystemExit) as exc:
        main(["train", "--precision", "fp8"])
    assert exc.value.code == 2 and "invalid choice: 'fp8'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="grad_accumulation must be a positive int"):
        TrainConfig(grad_accumulation=1.5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_fp16_without_cuda_is_a_config_error(capsys):
    for device in ("auto", "cuda"):
        with pytest.raises(ValueError, match="precision fp16 needs a CUDA device .* torch sees none"):
            TrainConfig(precision="fp16", device=device)
    run_error(["train", "--precision", "fp16"], capsys, "torch sees none", "--precision bf16")


# -- bf16 ----------------------------------------------------------------------------------------------
def test_bf16_trains_and_evaluates_under_autocast(tiny_model, sentiment_files, tmp_path, capsys):  # noqa: F811
    out = {}
    for precision in ("fp32", "bf16"):
        out[precision] = tmp_path / precision
        stdout = run_ok(
            train_args(
                tiny_model,
                sentiment_files,
                out[precision],
                *COMMON,
                "--max-steps",
                "6",
                "--eval-every",
                "3",
                "--precision",
                precision,
            ),
            capsys,
        )
    assert "bf16" in stdout and "s/step" in stdout
    run = out["bf16"]
    saved = json.loads((run / "config.json").read_text())["train_config"]
    assert saved["precision"] == "bf16" and saved["grad_accumulation"] == 1 and saved["compile"] is False
    assert json.loads((run / "adapter" / "train_config.json").read_text())["precision"] == "bf16"

    # fp32 master weights and optimizer state; the same pruning mask (scored in fp32) as the fp32 run
    state = trainer_state(run)
    moments = [s[k] for s in state["optimizer"]["state"].values() for k in ("exp_avg", "exp_avg_sq")]
    assert moments and all(m.dtype == torch.float32 for m in moments)
    a, b = tensors(out["fp32"] / "checkpoint" / "adapter"), tensors(run / "checkpoint" / "adapter")
    floats = [k for k in b if b[k].is_floating_point()]
    assert floats and all(b[k].dtype == torch.float32 for k in floats)
    assert all(torch.equal(a[k], b[k]) for k in b if not b[k].is_floating_point())
    # the forward ran in bf16: the losses move off fp32's (by bf16 rounding, not more)
    loss32 = [r["train_loss"] for r in records(out["fp32"]) if not r.get("final")]
    loss16 = [r["train_loss"] for r in records(run) if not r.get("final")]
    assert loss32 != loss16
    assert loss16 == pytest.approx(loss32, rel=0.05)

    # step times in the metrics and the results
    periodic = [r for r in records(run) if not r.get("final")]
    assert all(r["step_s"] > 0 for r in periodic)
    results = json.loads((run / "results.json").read_text())
    assert results["timings_s"]["step_median_s"] > 0 and len(state["step_times"]) == 6

    # evaluation runs under the same autocast: `eval` reads bf16 from the adapter folder and reproduces
    # the run's test loss; forced to fp32 it gives another one
    again = json.loads(run_ok(["eval", "--adapter", str(run / "adapter"), "--json", "--no-progress"], capsys))
    assert again["loss"] == pytest.approx(results["test"]["loss"], rel=1e-6)
    fp32 = json.loads(
        run_ok(["eval", "--adapter", str(run / "adapter"), "--json", "--no-progress", "--precision", "fp32"], capsys)
    )
    assert fp32["loss"] != again["loss"] and fp32["loss"] == pytest.approx(again["loss"], rel=0.05)


def test_killed_bf16_run_resumes_to_the_same_adapter(
    tiny_model,
    sentiment_files,
    tmp_path,
    capsys,  # noqa: F811
    monkeypatch,
):
    """bf16 with 2 micro-batches of 4 and dropout, interrupted at step 5 (checkpoints every 2): the
    resumed run ends bit for bit where the uninterrupted one does; a resume in another precision is refused."""
    common = (
        *COMMON,
        "--max-steps",
        "8",
        "--eval-every",
        "4",
        "--checkpoint-every",
        "2",
        "--adapter-dropout",
        "0.1",
        "--precision",
        "bf16",
        "--batch-size",
        "4",
        "--grad-accumulation",
        "2",
    )
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    run_ok(train_args(tiny_model, sentiment_files, straight, *common), capsys)

    real_batch = TrainOrder.batch

    def batch_or_die(self, step):
        if step == 5 and self.batch_size == 8:
            raise KeyboardInterrupt
        return real_batch(self, step)

    monkeypatch.setattr(TrainOrder, "batch", batch_or_die)
    assert main(train_args(tiny_model, sentiment_files, interrupted, *common)) == 130
    capsys.readouterr()
    assert trainer_state(interrupted)["step"] == 4
    monkeypatch.setattr(TrainOrder, "batch", real_batch)
    run_error(
        train_args(tiny_model, sentiment_files, interrupted, *common, "--precision", "fp32", "--resume"),
        capsys,
        "precision: 'bf16' -> 'fp32'",
    )
    run_ok(train_args(tiny_model, sentiment_files, interrupted, *common, "--resume"), capsys)

    a, b = tensors(straight / "adapter"), tensors(interrupted / "adapter")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (straight, interrupted))
    assert ra["test"] == rb["test"] and ra["best_step"] == rb["best_step"]
    assert len(trainer_state(interrupted)["step_times"]) == 8  # the steps run again replace the lost ones


# -- fp16 ----------------------------------------------------------------------------------------------
def _fp16_run_resumes(model, files, tmp_path, capsys, monkeypatch, device):
    common = (
        *COMMON,
        "--max-steps",
        "6",
        "--eval-every",
        "3",
        "--checkpoint-every",
        "2",
        "--precision",
        "fp16",
        "--device",
        device,
    )
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    run_ok(train_args(model, files, straight, *common), capsys)
    scaler = trainer_state(straight)["scaler"]
    assert scaler["scale"] > 0 and scaler["_growth_tracker"] == 6  # six steps, none overflowed

    real_batch = TrainOrder.batch

    def batch_or_die(self, step):
        if step == 5:  # after the calibration batches (0-3)
            raise KeyboardInterrupt
        return real_batch(self, step)

    monkeypatch.setattr(TrainOrder, "batch", batch_or_die)
    assert main(train_args(model, files, interrupted, *common)) == 130
    capsys.readouterr()
    saved = trainer_state(interrupted)
    assert saved["step"] == 4 and saved["scaler"]["_growth_tracker"] == 4
    monkeypatch.setattr(TrainOrder, "batch", real_batch)
    run_ok(train_args(model, files, interrupted, *common, "--resume"), capsys)
    a, b = tensors(straight / "adapter"), tensors(interrupted / "adapter")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert trainer_state(interrupted)["scaler"] == scaler  # restored at step 4, not started afresh (2)


def test_fp16_scaler_state_is_checkpointed_and_restored(
    tiny_model,
    sentiment_files,
    tmp_path,
    capsys,  # noqa: F811
    monkeypatch,
):
    """The scaler's path on CPU (float16 autocast and torch.amp.GradScaler("cpu") exist; `train` refuses
    fp16 off CUDA only because bf16 is the mixed precision to use there): lift the check."""
    monkeypatch.setattr(config_module, "fp16_device_problem", lambda device: None)
    _fp16_run_resumes(tiny_model, sentiment_files, tmp_path, capsys, monkeypatch, "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp16_on_cuda(tiny_model, sentiment_files, tmp_path, capsys, monkeypatch):  # noqa: F811
    _fp16_run_resumes(tiny_model, sentiment_files, tmp_path, capsys, monkeypatch, "cuda")


# -- gradient accumulation ---------------------------------------------------------------------------
def _record_steps():
    """Every optimizer step's gradients (before it) and parameters (after it), in parameter order."""
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    grads, params = [], []

    def before(opt, args, kwargs):
        grads.append([p.grad.detach().clone() for g in opt.param_groups for p in g["params"]])

    def after(opt, args, kwargs):
        params.append([p.detach().clone() for g in opt.param_groups for p in g["params"]])

    handles = [register_optimizer_step_pre_hook(before), register_optimizer_step_post_hook(after)]
    return grads, params, handles


def test_accumulated_micro_batches_equal_one_large_batch(no_dropout_model, sentiment_files, tmp_path, capsys):
    """14 training examples: step 1 takes 8 (4 + 4 with --grad-accumulation 2), step 2 the 6 left (4 + 2: a
    short last micro-batch). Dividing each micro-batch's loss by N instead of weighting it by its examples,
    or clearing or reducing gradients between micro-batches, fails step 2 (or both). SNIP scores the
    same examples either way, in the same weighting, so both runs prune the same pattern."""
    common = (*COMMON, "--max-train-examples", "14", "--max-steps", "2", "--eval-every", "1", "--lr", "1e-2")
    runs = {}
    for name, flags in (
        ("large", ("--batch-size", "8")),
        ("accumulated", ("--batch-size", "4", "--grad-accumulation", "2")),
    ):
        grads, params, handles = _record_steps()
        try:
            run_ok(train_args(no_dropout_model, sentiment_files, tmp_path / name, *common, *flags), capsys)
        finally:
            for h in handles:
                h.remove()
        runs[name] = (grads, params)
    (g_large, p_large), (g_acc, p_acc) = runs["large"], runs["accumulated"]
    assert len(g_large) == len(g_acc) == 2
    for step in range(2):
        for a, b in zip(g_large[step], g_acc[step]):
            assert a.abs().max() > 0
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
        for a, b in zip(p_large[step], p_acc[step]):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    # the same pruned pattern, and the step-mean training loss
    a = tensors(tmp_path / "large" / "checkpoint" / "adapter")
    b = tensors(tmp_path / "accumulated" / "checkpoint" / "adapter")
    assert a.keys() == b.keys()
    for k in a:
        if a[k].is_floating_point():
            torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(a[k], b[k]), k
    la = [r["train_loss"] for r in records(tmp_path / "large") if not r.get("final")]
    lb = [r["train_loss"] for r in records(tmp_path / "accumulated") if not r.get("final")]
    assert lb == pytest.approx(la, rel=1e-5)


def test_steps_count_optimizer_steps(tiny_model, sentiment_files, tmp_path, capsys):  # noqa: F811
    """96 examples, 4 x 3 per step: 8 steps an epoch; --epochs 1 is 8 steps, evaluated at the epoch's end,
    checkpoints every 3 optimizer steps, and the LR schedule ends at 0 at step 8."""
    run = tmp_path / "run"
    run_ok(
        train_args(
            tiny_model,
            sentiment_files,
            run,
            *COMMON,
            "--batch-size",
            "4",
            "--grad-accumulation",
            "3",
            "--epochs",
            "1",
            "--checkpoint-every",
            "3",
        ),
        capsys,
    )
    periodic = [r for r in records(run) if not r.get("final")]
    assert [r["step"] for r in periodic] == [8] and periodic[0]["epoch"] == 1.0 and periodic[0]["lr"] == 0.0
    state = trainer_state(run)
    assert state["step"] == 8 and len(state["step_times"]) == 8
    assert json.loads((run / "results.json").read_text())["steps"] == 8


# -- compile -------------------------------------------------------------------------------------------
def test_compile_gives_eagers_first_loss(no_dropout_model, sentiment_files, tmp_path, capsys):
    """Step 1's loss (no dropout, same pruned adapter) within float tolerance of eager, and the compile
    time reported. Padded lengths vary from batch to batch: marked dynamic, they do not recompile."""
    torch._dynamo.reset()
    common = (*COMMON, "--max-steps", "3", "--eval-every", "1")
    run_ok(train_args(no_dropout_model, sentiment_files, tmp_path / "eager", *common), capsys)
    stdout = run_ok(train_args(no_dropout_model, sentiment_files, tmp_path / "compiled", *common, "--compile"), capsys)
    eager = [r for r in records(tmp_path / "eager") if not r.get("final")]
    compiled = [r for r in records(tmp_path / "compiled") if not r.get("final")]
    assert compiled[0]["train_loss"] == pytest.approx(eager[0]["train_loss"], rel=1e-4)
    assert compiled[-1]["train_loss"] == pytest.approx(eager[-1]["train_loss"], rel=1e-3)
    timings = json.loads((tmp_path / "compiled" / "results.json").read_text())["timings_s"]
    assert timings["compile_s"] > 0 and timings["recompile_steps"] == 0
    assert "compile" in stdout
    assert "compile_s" not in json.loads((tmp_path / "eager" / "results.json").read_text())["timings_s"]
    torch._dynamo.reset()


KINDS = ["houlsby", "pfeiffer", "parallel", "lora", pytest.param("prefix", marks=needs_attention_interface), "mam"]


@pytest.mark.parametrize("kind", KINDS)
def test_sparse_adapters_do_not_break_the_graph(kind, no_dropout_model):
    """torch._dynamo.explain over the training forward (loss included) of BERT with a sparse adapter, under
    bf16 autocast: one graph. A break in our code (a frame under sparseadapter) would be ours; one in
    transformers' BERT would be theirs (none today), and `--compile` would still run, in pieces."""
    import transformers

    import sparseadapter as sa

    torch._dynamo.reset()
    tokenizer = transformers.AutoTokenizer.from_pretrained(no_dropout_model)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        no_dropout_model, num_labels=2, problem_type="single_label_classification"
    )
    with warnings.catch_warnings():  # magnitude re-initializes LoRA's all-zero B first, and says so
        warnings.simplefilter("ignore")
        sa.add_adapter(model, "t", sa.SparseAdapterConfig(kind=kind, sparsity=0.5, pruner="magnitude", bottleneck=8))
    sa.train_adapter(model, "t")
    model.train()
    batch = dict(tokenizer(["good movie was fun", "the plot was dull"], padding=True, return_tensors="pt"))
    batch["labels"] = torch.tensor([1, 0])

    def step(**b):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(**b).loss

    explained = torch._dynamo.explain(step)(**batch)
    ours = [r for r in explained.break_reasons if any("sparseadapter" in str(f.filename) for f in r.user_stack)]
    assert not ours, [r.reason for r in ours]
    assert explained.graph_break_count == 0, [r.reason for r in explained.break_reasons]
    assert explained.graph_count == 1
    torch._dynamo.reset()
