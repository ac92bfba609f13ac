"""sparseadapter_serve, the C++ JSON-lines server (cpp/serve.cpp): tiny TorchScript models that honour
the export contract (sparseadapter.json plus forward(input_ids, attention_mask, token_type_ids) ->
logits) give the same answers as Python eager, one line per request in input order, whether sent
alone, as a batch or coalesced with others; every bad request gets its own error line and the rest
are served; a bad model file or bad options end the program with a clear message."""

import json
import math
import os
import select
import subprocess

import pytest
import torch
from cmake_support import CONFIGURE_TIMEOUT_S, run_step
from torch import nn

import sparseadapter as sa

RUN_TIMEOUT_S = 120
ANSWER_TIMEOUT_S = 30  # a live client waits this long for each answer
VOCAB, MAX_LENGTH, HIDDEN = 50, 12, 16
LABELS = ["negative", "neutral", "positive"]


class TinyClassifier(nn.Module):
    """Token, position and type embeddings, masked mean pooling and a SparseLinear head. With
    `traps`, a sentence holding token 13 makes forward raise and one holding token 14 gets NaN
    logits, for the error paths."""

    def __init__(self, num_labels=3, type_vocab_size=2, seed=0, traps=False):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.tokens = nn.Embedding(VOCAB, HIDDEN)
        self.positions = nn.Embedding(MAX_LENGTH, HIDDEN)
        self.types = nn.Embedding(max(type_vocab_size, 1), HIDDEN)
        for emb in (self.tokens, self.positions, self.types):
            emb.weight.data = torch.randn(emb.weight.shape, generator=gen)
        weight = torch.randn(num_labels, HIDDEN, generator=gen)
        mask = torch.rand(num_labels, HIDDEN, generator=gen) < 0.6
        self.head = sa.SparseLinear.from_dense(weight, mask, torch.randn(num_labels, generator=gen))
        self.traps = traps

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
    ) -> torch.Tensor:
        if self.traps and bool((input_ids == 13).any()):
            raise RuntimeError("trap token 13")
        positions = torch.arange(input_ids.size(1), device=input_ids.device).unsqueeze(0)
        h = self.tokens(input_ids) + self.positions(positions) + self.types(token_type_ids)
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        logits = self.head(torch.tanh((h * m).sum(1) / m.sum(1)))
        if self.traps:
            logits = torch.where((input_ids == 14).any(1, keepdim=True), torch.full_like(logits, math.nan), logits)
        return logits


class ShapeModel(nn.Module):
    """Answers the shape of the batch it was given: shows how requests were coalesced and padded."""

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
    ) -> torch.Tensor:
        rows, length = input_ids.size(0), input_ids.size(1)
        return torch.tensor([[float(rows), float(length)]]).expand(rows, 2)


def metadata(**changes):
    meta = {
        "format": "sparseadapter-serving",
        "version": 1,
        "task": "classification",
        "num_labels": 3,
        "labels": LABELS,
        "vocab_size": VOCAB,
        "max_length": MAX_LENGTH,
        "pad_token_id": 0,
        "type_vocab_size": 2,
    }
    meta.update(changes)
    return meta


def save(module, path, meta):
    """torch.jit.save with sparseadapter.json, as `sparseadapter export` writes it (meta None: none)."""
    extra = {} if meta is None else {"sparseadapter.json": meta if isinstance(meta, str) else json.dumps(meta)}
    torch.jit.save(torch.jit.script(module.eval()), str(path), _extra_files=extra)
    return path


@pytest.fixture(scope="module")
def server(cmake_build):
    exe = cmake_build[1] / "sparseadapter_serve"
    assert exe.is_file(), f"{exe} was not built"
    return exe


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    model = TinyClassifier(seed=1)
    return model, save(model, tmp_path_factory.mktemp("classifier") / "model.pt", metadata())


def serve(server, model_path, lines, *options, tmp_path):
    """Runs the server on the lines, read from a file: all input is waiting at once, so coalescing
    is deterministic. Returns the completed process."""
    data = lines if isinstance(lines, bytes) else "".join(line + "\n" for line in lines).encode()
    stdin = tmp_path / "requests.jsonl"
    stdin.write_bytes(data)
    with open(stdin, "rb") as f:
        return subprocess.run(
            [str(server), "--model", str(model_path), *map(str, options)],
            stdin=f,
            capture_output=True,
            timeout=RUN_TIMEOUT_S,
        )


def answers(proc):
    assert proc.returncode == 0, f"sparseadapter_serve failed ({proc.returncode}): {proc.stderr.decode()}"
    return [json.loads(line) for line in proc.stdout.decode().splitlines()]


def eager_logits(model, ids, mask=None, types=None):
    """Python's logits for one sentence, unpadded (by default mask all 1, types all 0)."""
    mask = [1] * len(ids) if mask is None else mask
    types = [0] * len(ids) if types is None else types
    with torch.no_grad():
        return model(torch.tensor([ids]), torch.tensor([mask]), torch.tensor([types]))[0]


def assert_logits(got, want):
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float32), want, rtol=1e-5, atol=1e-6)


def random_sentences(count, seed, min_len=1, max_len=MAX_LENGTH):
    gen = torch.Generator().manual_seed(seed)
    sentences = []
    for _ in range(count):
        n = int(torch.randint(min_len, max_len + 1, (1,), generator=gen))
        ids = torch.randint(1, VOCAB, (n,), generator=gen).tolist()
        types = torch.randint(0, 2, (n,), generator=gen).tolist()
        mask = [1] * n
        if n > 2:
            mask[-1] = 0  # a padded tail, as a tokenizer's padding gives
        sentences.append((ids, mask, types))
    return sentences


def assert_classified(answer, want):
    assert_logits(answer["logits"], want)
    assert answer["label"] == int(want.argmax())
    assert answer["label_name"] == LABELS[answer["label"]]


def test_single_requests_match_python(server, classifier, tmp_path):
    model, path = classifier
    sentences = random_sentences(9, seed=2)
    lines = [
        json.dumps({"id": i, "input_ids": ids, "attention_mask": mask, "token_type_ids": types})
        for i, (ids, mask, types) in enumerate(sentences)
    ]
    lines.append(json.dumps({"id": "defaults", "input_ids": [5, 6, 7]}))  # mask all 1, types all 0
    lines.append(json.dumps({"id": "nulls", "input_ids": [5, 6, 7], "attention_mask": None, "token_type_ids": None}))
    out = answers(serve(server, path, lines, tmp_path=tmp_path))
    assert [a["id"] for a in out] == list(range(len(sentences))) + ["defaults", "nulls"]
    for answer, (ids, mask, types) in zip(out, sentences):
        assert set(answer) == {"id", "logits", "label", "label_name"}
        assert_classified(answer, eager_logits(model, ids, mask, types))
    for answer in out[-2:]:
        assert_classified(answer, eager_logits(model, [5, 6, 7]))


@pytest.mark.parametrize("batch_size", [32, 4])
def test_batch_requests_match_python(server, classifier, tmp_path, batch_size):
    model, path = classifier
    sentences = random_sentences(10, seed=3)  # more rows than --batch-size 4: run in chunks
    full = {
        "id": "full",
        "input_ids": [s[0] for s in sentences],
        "attention_mask": [s[1] for s in sentences],
        "token_type_ids": [s[2] for s in sentences],
    }
    bare = {"id": "bare", "input_ids": [s[0] for s in sentences[:3]]}
    out = answers(
        serve(server, path, [json.dumps(full), json.dumps(bare)], "--batch-size", batch_size, tmp_path=tmp_path)
    )
    assert [a["id"] for a in out] == ["full", "bare"]
    assert set(out[0]) == {"id", "logits", "labels", "label_names"}
    assert len(out[0]["logits"]) == len(out[0]["labels"]) == len(out[0]["label_names"]) == len(sentences)
    for i, (ids, mask, types) in enumerate(sentences):
        want = eager_logits(model, ids, mask, types)
        assert_logits(out[0]["logits"][i], want)
        assert out[0]["labels"][i] == int(want.argmax())
        assert out[0]["label_names"][i] == LABELS[int(want.argmax())]
    for i, (ids, _, _) in enumerate(sentences[:3]):
        assert_logits(out[1]["logits"][i], eager_logits(model, ids))


def test_coalesced_mixed_lengths_match_python(server, classifier, tmp_path):
    model, path = classifier
    sentences = random_sentences(11, seed=4)
    lines = [
        json.dumps({"id": i, "input_ids": ids, "attention_mask": mask, "token_type_ids": types})
        for i, (ids, mask, types) in enumerate(sentences)
    ]
    batch = {"id": "batch", "input_ids": [[3, 4], [5, 6, 7, 8, 9]]}
    lines.insert(5, json.dumps(batch))
    out = answers(serve(server, path, lines, "--batch-size", 4, tmp_path=tmp_path))
    assert [a["id"] for a in out] == [0, 1, 2, 3, 4, "batch", 5, 6, 7, 8, 9, 10]
    singles = [a for a in out if a["id"] != "batch"]
    for answer, (ids, mask, types) in zip(singles, sentences):
        assert_classified(answer, eager_logits(model, ids, mask, types))
    for i, ids in enumerate(batch["input_ids"]):
        assert_logits(out[5]["logits"][i], eager_logits(model, ids))


def test_coalescing_pads_to_the_longest_and_respects_batch_size(server, tmp_path):
    path = save(ShapeModel(), tmp_path / "shape.pt", metadata(num_labels=2, labels=None))
    lengths = [3, 1, 7, 2, 5, 5, 4, 9, 1, 2]
    lines = [json.dumps({"input_ids": [1] * n}) for n in lengths]
    shapes = [tuple(a["logits"]) for a in answers(serve(server, path, lines, "--batch-size", 4, tmp_path=tmp_path))]
    assert shapes == [(4, 7)] * 4 + [(4, 9)] * 4 + [(2, 2)] * 2
    assert all("label_name" not in a for a in answers(serve(server, path, lines[:1], tmp_path=tmp_path)))


def test_threads_give_the_same_answers(server, classifier, tmp_path):
    model, path = classifier
    sentences = random_sentences(8, seed=5)
    lines = [
        json.dumps({"input_ids": ids, "attention_mask": mask, "token_type_ids": types})
        for ids, mask, types in sentences
    ]
    one = answers(serve(server, path, lines, "--threads", 1, tmp_path=tmp_path))
    two = answers(serve(server, path, lines, "--threads", 2, tmp_path=tmp_path))
    for a, b, (ids, mask, types) in zip(one, two, sentences, strict=True):
        want = eager_logits(model, ids, mask, types)
        assert_classified(a, want)
        assert_classified(b, want)


def test_regression_scores(server, tmp_path):
    model = TinyClassifier(num_labels=1, type_vocab_size=0, seed=6)
    path = save(
        model, tmp_path / "regression.pt", metadata(task="regression", num_labels=1, labels=None, type_vocab_size=0)
    )
    lines = [json.dumps({"input_ids": [4, 5, 6]}), json.dumps({"input_ids": [[4, 5, 6], [7, 8]]})]
    single, batch = answers(serve(server, path, lines, tmp_path=tmp_path))
    assert set(single) == {"logits", "score"} and set(batch) == {"logits", "scores"}
    want = eager_logits(model, [4, 5, 6])
    assert_logits(single["logits"], want)
    assert single["score"] == pytest.approx(float(want[0]), rel=1e-5)
    assert batch["scores"][1] == pytest.approx(float(eager_logits(model, [7, 8])[0]), rel=1e-5)


def test_ids_are_echoed_exactly(server, classifier, tmp_path):
    _, path = classifier
    ids = [
        "a string",
        'quotes " \\ and\nnewline, \u00e9 \U0001f600 \u0001',
        7,
        -3,
        2**63 - 1,
        1.5,
        1.0,
        -0.25,
        1e300,
        6.02e23,
        None,
        True,
        False,
        [],
        {},
        [1, "two", [3.0]],
        {"request": 1, "tags": ["x", {"deep": None}], "ok": True},
    ]
    lines = [json.dumps({"id": value, "input_ids": [1, 2]}) for value in ids]
    lines.append('{"input_ids": [1, 2]}')
    lines.append('{ "id" : "spaced" ,\t"input_ids" : [ 1 , 2 ] }\r')  # whitespace and CRLF are fine
    out = answers(serve(server, path, lines, tmp_path=tmp_path))
    assert len(out) == len(ids) + 2
    for answer, value in zip(out, ids):
        assert answer["id"] == value and type(answer["id"]) is type(value), (answer["id"], value)
    assert "id" not in out[len(ids)]
    assert out[-1]["id"] == "spaced" and "logits" in out[-1]
    assert b'"id":1.0,' in serve(server, path, ['{"id": 1.0, "input_ids": [1]}'], tmp_path=tmp_path).stdout


BAD_REQUESTS = [
    # (line, what the error says, whether the id is echoed)
    ('{"id": "trailing comma", "input_ids": [1, 2,]}', "column 45: expected a value, found ']'", False),
    ('{"id": 1, "input_ids": [1]', "expected ',' or '}', found end of line", False),
    ('{"id": 1} extra', "column 11: unexpected 'e' after the JSON value", False),
    ('{"id": "\\x"}', "invalid escape", False),
    ('{"id": "\\ud800"}', "without its low surrogate", False),
    ('{"id": "\\udc00"}', "lone low surrogate", False),
    ('{"id": "tab\tinside"}', "unescaped control character", False),
    ('{"id": NaN}', "expected a value, found 'N'", False),
    ('{"id": 01}', "expected ',' or '}', found '1'", False),
    ('{"id": 1, "id": 2, "input_ids": [1]}', 'duplicate key "id"', False),
    ('{"id": ' + "[" * 80 + "]" * 80 + ', "input_ids": [1]}', "nested deeper than 64 levels", False),
    ('{"input_ids": [9223372036854775808]}', "out of the 64-bit range", False),
    ("[1, 2, 3]", "a request must be a JSON object", False),
    ('"input_ids"', "a request must be a JSON object", False),
    ('{"id": "no ids"}', "missing input_ids", True),
    ('{"id": "empty", "input_ids": []}', "input_ids is empty", True),
    ('{"id": "empty row", "input_ids": [[1], []]}', "input_ids[1] is empty", True),
    ('{"id": "string ids", "input_ids": "1 2 3"}', "input_ids must be an array", True),
    ('{"id": "float id", "input_ids": [1, 2.0]}', "input_ids[1] is not an integer", True),
    ('{"id": "string id", "input_ids": [1, "2"]}', "input_ids[1] is not an integer", True),
    ('{"id": "mixed", "input_ids": [[1], 2]}', "input_ids[1] must be an array", True),
    ('{"id": "big", "input_ids": [1, 50]}', "input_ids[1] = 50 is out of the vocabulary [0, 50)", True),
    ('{"id": "negative", "input_ids": [[1], [-1]]}', "input_ids[1][0] = -1 is out of the vocabulary", True),
    (
        '{"id": "long", "input_ids": [' + ", ".join(["1"] * 13) + "]}",
        "13 tokens, more than the model's max_length 12",
        True,
    ),
    ('{"id": "mask 2", "input_ids": [1, 2], "attention_mask": [1, 2]}', "attention_mask[1] = 2, expected 0 or 1", True),
    (
        '{"id": "mask len", "input_ids": [1, 2], "attention_mask": [1]}',
        "attention_mask has 1 entries but input_ids has 2",
        True,
    ),
    (
        '{"id": "types len", "input_ids": [[1, 2]], "token_type_ids": [[0, 0, 0]]}',
        "token_type_ids[0] has 3 entries but input_ids[0] has 2",
        True,
    ),
    (
        '{"id": "rows", "input_ids": [[1], [2]], "attention_mask": [[1]]}',
        "attention_mask must be an array of 2 rows",
        True,
    ),
    (
        '{"id": "flat mask", "input_ids": [[1], [2]], "attention_mask": [1, 1]}',
        "attention_mask[0] must be an array",
        True,
    ),
    ('{"id": "zeros", "input_ids": [1, 2], "attention_mask": [0, 0]}', "attention_mask is all zeros", True),
    (
        '{"id": "type 2", "input_ids": [1, 2], "token_type_ids": [0, 2]}',
        "token_type_ids[1] = 2 is out of range [0, 2)",
        True,
    ),
    ('{"id": "typo", "input_ids": [1], "attention_masks": [1]}', 'unknown key "attention_masks"', True),
]


def test_bad_requests_get_error_lines_and_the_rest_is_served(server, classifier, tmp_path):
    model, path = classifier
    lines, expected = [], []  # expected: (line number, message or None for a good answer)
    for i, (bad, message, echoed) in enumerate(BAD_REQUESTS):
        lines.append(json.dumps({"id": f"good {i}", "input_ids": [i % 40 + 1, 2]}))
        expected.append((len(lines), None))
        lines.append(bad)
        expected.append((len(lines), (message, echoed)))
        lines.append("  ")  # blank lines: skipped, but counted in line numbers
    lines.append('{"id": "last", "input_ids": [3, 4]}')
    expected.append((len(lines), None))
    out = answers(serve(server, path, lines, "--batch-size", 4, tmp_path=tmp_path))
    assert len(out) == len(expected)
    for answer, (line_no, want) in zip(out, expected):
        if want is None:
            assert "error" not in answer, answer
            ids = json.loads(lines[line_no - 1])["input_ids"]
            assert_classified(answer, eager_logits(model, ids))
            continue
        message, echoed = want
        assert set(answer) == ({"id", "line", "error"} if echoed else {"line", "error"}), answer
        assert answer["line"] == line_no
        assert message in answer["error"], (lines[line_no - 1], answer["error"])
        if echoed:
            assert answer["id"] == json.loads(lines[line_no - 1])["id"]


def test_invalid_utf8_and_overlong_lines(server, classifier, tmp_path):
    _, path = classifier
    good = b'{"input_ids": [1, 2]}\n'
    long_line = b'{"id": "' + b"x" * (16 * 1024 * 1024 + 10) + b'", "input_ids": [1]}\n'
    data = (
        good
        + b'{"id": "\xff"}\n'
        + b'{"id": "\xc3\x28"}\n'
        + b'{"id": "\xed\xa0\x80"}\n'
        + long_line
        + good
        + b'{"input_ids": [3]}'
    )  # the last line has no newline: still a request
    out = answers(serve(server, path, data, tmp_path=tmp_path))
    assert [a.get("line") for a in out] == [None, 2, 3, 4, 5, None, None]
    assert "invalid UTF-8 (byte 0xff)" in out[1]["error"]
    assert "invalid UTF-8 sequence" in out[2]["error"] and "invalid UTF-8 sequence" in out[3]["error"]
    assert "longer than 16777216 bytes" in out[4]["error"]
    assert all("logits" in out[i] for i in (0, 5, 6))


def test_a_failing_request_fails_alone(server, tmp_path):
    """A forward that fails is run again request by request: only the request that fails alone gets
    the error, not the good ones batched with it."""
    model = TinyClassifier(seed=7, traps=True)
    path = save(model, tmp_path / "traps.pt", metadata())
    token = [1, 2, 13, 3, 4, 5, 6, 7, 14, 8]  # 13: forward raises; 14: NaN logits for that sentence
    lines = [json.dumps({"id": i, "input_ids": [t, t]}) for i, t in enumerate(token)]
    proc = serve(server, path, lines, "--batch-size", 4, tmp_path=tmp_path)
    out = answers(proc)
    assert [a["id"] for a in out] == list(range(len(token)))
    assert out[2]["line"] == 3  # the exception's own line; the traceback goes to stderr
    assert out[2]["error"].startswith("running the model failed: ") and out[2]["error"].endswith("trap token 13")
    stderr = proc.stderr.decode()
    assert "running the model failed on lines 1-4; running them one by one" in stderr and "Traceback" in stderr
    assert "running the model failed on line 3:" in stderr
    assert out[8]["error"] == "the model produced a non-finite logit (nan)" and out[8]["line"] == 9
    for i in (0, 1, 3, 4, 5, 6, 7, 9):
        assert_classified(out[i], eager_logits(model, [token[i]] * 2))
    batch = answers(serve(server, path, [json.dumps({"input_ids": [[1], [14]]})], tmp_path=tmp_path))
    assert batch[0]["error"] == "the model produced a non-finite logit (nan) for input_ids[1]"
    batch = answers(
        serve(
            server,
            path,
            [json.dumps({"id": "b", "input_ids": [[1], [13]]}), json.dumps({"id": "c", "input_ids": [2]})],
            tmp_path=tmp_path,
        )
    )
    assert batch[0]["error"].endswith("trap token 13") and batch[1]["id"] == "c" and "logits" in batch[1]


def test_ids_are_checked_against_the_model_embedding(server, tmp_path):
    """Metadata that overstates the vocabulary (vocab_size 10^9 for an embedding of 50 rows): ids are
    checked against the embedding, so a bad id is that request's error, not its batch's."""
    model = TinyClassifier(seed=3)
    path = save(model, tmp_path / "big_vocab.pt", metadata(vocab_size=10**9))
    lines = [
        json.dumps({"id": "good", "input_ids": [1, 2]}),
        json.dumps({"id": "bad", "input_ids": [3, 60]}),
        json.dumps({"id": "batch", "input_ids": [[4], [49]]}),
    ]
    proc = serve(server, path, lines, "--batch-size", 8, tmp_path=tmp_path)
    out = answers(proc)
    assert (
        "vocab_size 1000000000 is more than the 50 rows of the model's token embedding 'tokens'" in proc.stderr.decode()
    )
    assert_classified(out[0], eager_logits(model, [1, 2]))
    assert out[1] == {"id": "bad", "line": 2, "error": "input_ids[1] = 60 is out of the vocabulary [0, 50)"}
    assert_logits(out[2]["logits"][1], eager_logits(model, [49]))


def _hwm_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def _filled(prefix, unit, suffix, size=16 * 1024 * 1024 - 64):
    count = (size - len(prefix) - len(suffix)) // len(unit)
    return prefix + unit * (count - 1) + unit.rstrip(b",") + suffix + b"\n"


MEMORY_LINES = {  # the shapes that cost the most per byte, each just under the 16 MiB line limit
    "ids": (_filled(b'{"input_ids": [', b"1,", b"]}"), "MiB of memory once parsed"),
    "rows": (_filled(b'{"input_ids": [', b"[1],", b"]}"), "MiB of memory once parsed"),
    "objects": (_filled(b'{"id": [', b"{},", b'], "input_ids": [1]}'), "MiB of memory once parsed"),
    "strings": (_filled(b'{"id": [', b'"",', b'], "input_ids": [1]}'), "MiB of memory once parsed"),
    "long id": (_filled(b'{"id": "', b"x", b'", "input_ids": [1]}'), None),
}


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the peak memory from /proc")
def test_memory_per_line_is_bounded(server, classifier):
    """The line limit bounds memory, not only length: a 16 MiB line of the costliest shapes (tiny
    values, a value per two bytes) costs a bounded amount, and four of them waiting together cost
    about what one does (the round stops taking lines past its budget)."""
    import threading

    _, path = classifier
    proc = subprocess.Popen(
        [str(server), "--model", str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )

    def exchange(data, count):
        """Write `data` and read `count` answers, each on its own thread (16 MiB each way)."""
        got = []
        writer = threading.Thread(target=lambda: (proc.stdin.write(data), proc.stdin.flush()))
        reader = threading.Thread(target=lambda: got.extend(proc.stdout.readline() for _ in range(count)))
        for t in (writer, reader):
            t.start()
        for t in (writer, reader):
            t.join(ANSWER_TIMEOUT_S * 4)
            assert not t.is_alive(), f"no answer within {ANSWER_TIMEOUT_S * 4} s"
        return [json.loads(line) for line in got]

    try:
        exchange(b'{"input_ids": [1, 2]}\n', 1)
        baseline = _hwm_kib(proc.pid)
        growth, answered = {}, {}
        for name, (line, _error) in MEMORY_LINES.items():
            for copies in (1, 4):
                answered[name, copies] = exchange(line * copies, copies)
                growth[f"{name} x{copies}"] = (_hwm_kib(proc.pid) - baseline) / 1024
        # measured +64 to +103 MB; +408 MB for one 16 MiB line and +736 MB for four before the budgets
        assert max(growth.values()) < 160, growth
        for (name, _copies), got in answered.items():
            error = MEMORY_LINES[name][1]
            for answer in got:
                if error is None:
                    assert "logits" in answer and len(answer["id"]) > 16_000_000, name
                else:
                    assert error in answer.get("error", ""), (name, str(answer)[:200])
        assert exchange(b'{"input_ids": [3]}\n', 1)[0]["label"] in (0, 1, 2)
    finally:
        proc.kill()
        proc.wait()
        for f in (proc.stdin, proc.stdout, proc.stderr):
            f.close()


def test_wrong_output_shape_is_an_error_per_request(server, tmp_path):
    path = save(TinyClassifier(num_labels=2, seed=8), tmp_path / "two.pt", metadata())  # says 3 labels
    out = answers(
        serve(server, path, [json.dumps({"input_ids": [1]}), json.dumps({"input_ids": [2]})], tmp_path=tmp_path)
    )
    assert len(out) == 2
    # the batch of two fails, then each request alone: [1, 2] logits where [1, 3] were expected
    assert all("expected floats of shape [1, 3]" in a["error"] and "[1, 2]" in a["error"] for a in out)


def _bad_forward():
    class OneInput(nn.Module):
        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            return input_ids.float()

    return OneInput()


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "cannot open model"),
        ("garbage", "is not a loadable TorchScript model"),
        ("no metadata", "has no sparseadapter.json"),
        ("metadata not JSON", "invalid sparseadapter.json: invalid JSON at column 1"),
        ("wrong format", '"format" is not "sparseadapter-serving"'),
        ("version 2", "version 2 is not supported"),
        ("no vocab_size", 'missing "vocab_size"'),
        ("bad labels", '"labels" must be null or a list of num_labels (3) strings'),
        ("pad outside vocab", "pad_token_id 50 is not below vocab_size 50"),
        ("regression with 2 labels", "a regression model must have num_labels 1"),
        ("forward inputs", "forward takes 1 inputs, expected 3"),
    ],
)
def test_bad_model_files_exit_1(server, tmp_path, case, message):
    path = tmp_path / "model.pt"
    model = TinyClassifier(seed=9)
    meta = metadata()
    if case == "garbage":
        path.write_bytes(b"not a zip archive")
    elif case == "no metadata":
        save(model, path, None)
    elif case == "metadata not JSON":
        save(model, path, "format: sparseadapter-serving")
    elif case == "wrong format":
        save(model, path, metadata(format="onnx"))
    elif case == "version 2":
        save(model, path, metadata(version=2))
    elif case == "no vocab_size":
        del meta["vocab_size"]
        save(model, path, meta)
    elif case == "bad labels":
        save(model, path, metadata(labels=["a", "b"]))
    elif case == "pad outside vocab":
        save(model, path, metadata(pad_token_id=VOCAB))
    elif case == "regression with 2 labels":
        save(model, path, metadata(task="regression", num_labels=2, labels=None))
    elif case == "forward inputs":
        save(_bad_forward(), path, metadata())
    proc = serve(server, path, ['{"input_ids": [1]}'], tmp_path=tmp_path)
    stderr = proc.stderr.decode()
    assert proc.returncode == 1, (case, proc.returncode, stderr)
    assert proc.stdout == b""
    assert message in stderr and str(path) in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1, stderr


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "--model is required"),
        (["--model"], "--model needs a value"),
        (["--model", "m.pt", "--batch-size", "0"], "--batch-size must be an integer from 1 to 65536, got '0'"),
        (["--model", "m.pt", "--batch-size=x"], "--batch-size must be an integer"),
        (["--model", "m.pt", "--threads", "-1"], "--threads must be an integer from 1 to 1024"),
        (["--model", "m.pt", "--threads", "2.5"], "--threads must be an integer"),
        (["--model", "m.pt", "--port", "80"], "unknown argument '--port'"),
        (["m.pt"], "unknown argument 'm.pt'"),
    ],
)
def test_bad_options_exit_2(server, args, message):
    proc = subprocess.run([str(server), *args], capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert proc.returncode == 2, (args, proc.returncode, proc.stderr)
    assert message in proc.stderr and "usage: sparseadapter_serve" in proc.stderr, proc.stderr
    assert proc.stdout == ""


def test_help(server):
    proc = subprocess.run([str(server), "--help"], capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: sparseadapter_serve --model")


def test_live_pipe_is_answered_line_by_line(server, classifier):
    """A client that waits for each answer before sending the next request is never stalled by
    coalescing, and end of input ends the server with status 0."""
    model, path = classifier
    proc = subprocess.Popen(
        [str(server), "--model", str(path), "--batch-size", "32"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        for i in range(5):
            ids = [i + 1] * (i + 1)
            line = json.dumps({"id": i, "input_ids": ids}) if i != 2 else '{"id": 2, "input_ids": [}'
            proc.stdin.write(line.encode() + b"\n")
            proc.stdin.flush()
            ready, _, _ = select.select([proc.stdout], [], [], ANSWER_TIMEOUT_S)
            assert ready, f"no answer to request {i} within {ANSWER_TIMEOUT_S}s"
            answer = json.loads(proc.stdout.readline())
            if i == 2:
                assert answer["line"] == 3 and "invalid JSON" in answer["error"]
            else:
                assert answer["id"] == i
                assert_classified(answer, eager_logits(model, ids))
        # Half a line waits for its end, without holding up anything.
        proc.stdin.write(b'{"id": "split", "input_ids"')
        proc.stdin.flush()
        assert not select.select([proc.stdout], [], [], 0.2)[0]
        proc.stdin.write(b": [1, 2]}\n")
        proc.stdin.flush()
        assert select.select([proc.stdout], [], [], ANSWER_TIMEOUT_S)[0]
        assert json.loads(proc.stdout.readline())["id"] == "split"
        proc.stdin.close()
        assert proc.wait(timeout=RUN_TIMEOUT_S) == 0, proc.stderr.read().decode()
        assert proc.stdout.read() == b""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def test_installed_server_runs(cmake_build, classifier, tmp_path):
    cmake, build, _ = cmake_build
    prefix = tmp_path / "prefix"
    run_step([cmake, "--install", str(build), "--prefix", str(prefix)], "cmake --install", CONFIGURE_TIMEOUT_S)
    installed = prefix / "bin" / "sparseadapter_serve"
    assert installed.is_file() and os.access(installed, os.X_OK)
    model, path = classifier
    out = answers(serve(installed, path, ['{"input_ids": [1, 2, 3]}'], tmp_path=tmp_path))
    assert_classified(out[0], eager_logits(model, [1, 2, 3]))
