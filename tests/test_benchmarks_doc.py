"""BENCHMARKS.md is rendered from benchmarks/sections and benchmarks/results (scripts/render_benchmarks.py):
the committed file matches its sources, the renderer fills each placeholder from the named record, and
bad sources (a missing record or table, a malformed record) are clear errors."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
from repo_paths import REPO

from sparseadapter.bench.record import FORMAT, RecordError, read_record

ROOT = str(REPO)
SCRIPT = os.path.join(ROOT, "scripts", "render_benchmarks.py")


def load_renderer():
    spec = importlib.util.spec_from_file_location("render_benchmarks", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


render_benchmarks = load_renderer()


def test_benchmarks_md_matches_its_sources():
    proc = subprocess.run([sys.executable, SCRIPT, "--check"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def fixture_record(**changes):
    data = {
        "format": FORMAT,
        "kind": "decode",
        "command": "sparseadapter bench decode --model tiny --record x.json",
        "meta": {
            "date": "2026-12-05T01:00:00+00:00",
            "machine": "box | CPU X | 2 logical CPUs",
            "cpu": "CPU X",
            "isa": "AVX512",
            "torch": "2.13.0+cpu",
            "python": "3.11.7",
            "threads": 1,
            "load": "0.50 0.40 0.30",
            "gpu": None,
            "header": ["date: 2026-12-05T01:00:00+00:00", "machine: box | CPU X | 2 logical CPUs"],
        },
        "tables": [
            {
                "title": "speed",
                "caption": "**speed**: tokens/s",
                "columns": ["row", "tokens/s"],
                "rows": [["base", "10.5"], ["a|b", "9.0"]],
                "notes": ["- one note"],
                "align": "lr",
            },
            {"title": "second", "columns": ["x"], "rows": [["1"]]},
        ],
    }
    data.update(changes)
    return data


def write_sources(tmp_path, section, record=None, name="run.json"):
    sections, results = tmp_path / "sections", tmp_path / "results"
    sections.mkdir()
    results.mkdir()
    (sections / "00-first.md").write_text("# Title\n\nHow to add a run: `\\{{table FILE N}}`.\n\n")
    (sections / "10-run.md").write_text(section)
    (results / name).write_text(json.dumps(fixture_record() if record is None else record))
    return str(sections), str(results)


def test_renderer_fills_placeholders_from_the_record(tmp_path):
    section = "## Run\n\n{{meta run.json}}\n\n{{command run.json}}\n\n{{table run.json 0}}\n\n{{table run.json 1}}\n"
    text = render_benchmarks.render(*write_sources(tmp_path, section))
    assert text == render_benchmarks.GENERATED + (
        "# Title\n\nHow to add a run: `{{table FILE N}}`.\n\n"
        "## Run\n\n"
        "```\ndate: 2026-12-05T01:00:00+00:00\nmachine: box | CPU X | 2 logical CPUs\n```\n\n"
        "`sparseadapter bench decode --model tiny --record x.json`\n\n"
        "**speed**: tokens/s\n\n| row | tokens/s |\n|---|---:|\n| base | 10.5 |\n| a\\|b | 9.0 |\n\n- one note\n\n"
        "| x |\n|---|\n| 1 |\n"
    )


@pytest.mark.parametrize(
    "placeholder, message",
    [
        ("{{table missing.json 0}}", "no record missing.json in"),
        ("{{table run.json 2}}", "run.json has 2 table(s) (0: speed; 1: second), no table 2"),
        ("{{table run.json first}}", "table index must be a number"),
        ("{{meta run.json 0}}", "meta takes 1 argument(s), got 2"),
        ("{{tables run.json 0}}", "unknown placeholder; use one of table, meta, command"),
        ("{{meta ../run.json}}", "record must be a file name in"),
    ],
)
def test_a_bad_placeholder_is_a_clear_error(tmp_path, placeholder, message):
    sources = write_sources(tmp_path, f"## Run\n\ntext\n{placeholder}\n")
    with pytest.raises(render_benchmarks.RenderError) as err:
        render_benchmarks.render(*sources)
    assert f"10-run.md:4: {placeholder}: " in str(err.value) and message in str(err.value)


def test_a_record_no_section_names_is_an_error(tmp_path):
    with pytest.raises(render_benchmarks.RenderError, match="records no section names .*: run.json"):
        render_benchmarks.render(*write_sources(tmp_path, "## Nothing\n"))


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(kind="speed"), "kind: unknown kind 'speed'"),
        (dict(extra=1), "record: unknown field(s) extra"),
        (dict(format="v0"), "format: expected"),
        (dict(tables=[]), "tables: must be a non-empty list"),
        (dict(tables=[{"title": "t", "columns": ["a", "b"], "rows": [["1"]]}]), "tables[0]: table 't': row 0 has 1"),
        (dict(tables=[{"title": "t", "columns": ["a"], "rows": [[1]]}]), "tables[0].rows: must be a list of lists"),
        (
            dict(tables=[{"title": "t", "columns": ["a"], "rows": [], "units": "ms"}]),
            "tables[0]: unknown field(s) units",
        ),
        (dict(tables=[{"title": "t", "columns": ["a"], "rows": [], "align": "x"}]), "align must be one letter"),
    ],
)
def test_a_malformed_record_names_its_file_and_field(tmp_path, change, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(fixture_record(**change)))
    with pytest.raises(RecordError) as err:
        read_record(str(path))
    assert str(err.value).startswith(f"{path}: ") and message in str(err.value)


@pytest.mark.parametrize(
    "meta_change, message",
    [
        (dict(threads="1"), "meta.threads: must be an integer or null"),
        (dict(date=None), "meta.date: must be a non-empty string"),
        (dict(host="x"), "meta: unknown field(s) host"),
    ],
)
def test_malformed_metadata_names_the_field(tmp_path, meta_change, message):
    data = fixture_record()
    data["meta"].update(meta_change)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(RecordError, match=f"^{path}: "):
        read_record(str(path))
    with pytest.raises(RecordError) as err:
        read_record(str(path))
    assert message in str(err.value)


def test_check_mode_reports_a_stale_file(tmp_path):
    sections, results = write_sources(tmp_path, "## Run\n\n{{table run.json 0}}\n{{table run.json 1}}\n")
    output = tmp_path / "BENCH.md"
    args = ["--sections", sections, "--results", results, "--output", str(output)]
    assert render_benchmarks.main(args + ["--check"]) == 1  # no file yet
    assert render_benchmarks.main(args) == 0
    assert render_benchmarks.main(args + ["--check"]) == 0
    output.write_text(output.read_text().replace("10.5", "11.5"))
    assert render_benchmarks.main(args + ["--check"]) == 1
    bad = json.loads((tmp_path / "results" / "run.json").read_text())
    del bad["meta"]["load"]
    (tmp_path / "results" / "run.json").write_text(json.dumps(bad))
    assert render_benchmarks.main(args + ["--check"]) == 2  # a malformed record: an error, not a diff


def load_importer():
    spec = importlib.util.spec_from_file_location(
        "record_from_markdown", os.path.join(ROOT, "scripts", "record_from_markdown.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_markdown_report_becomes_the_same_record(tmp_path):
    """What a suite appends with --markdown reads back as the tables and metadata it was made of, so a
    run made without --record can still become a record."""
    from sparseadapter.bench.record import record_from_dict
    from sparseadapter.bench.table import report

    record = record_from_dict(fixture_record(), "fixture")
    header = [
        "date: 2026-12-05T01:00:00+00:00",
        "machine: box | CPU X | 2 logical CPUs | CPU capability AVX512 | our CPU kernels avx512",
        "torch 2.13.0+cpu | BLAS mkl | python 3.11.7 | our ops' path mode auto",
        "threads: torch.set_num_threads(1) | OMP_WAIT_POLICY=PASSIVE | load average at start 0.50 0.40 0.30",
        "device cpu | dtype float32 | seed 0",
    ]
    tables = [record.tables[1], record.tables[0], record.tables[0]]  # a paragraph between tables: a caption
    source = tmp_path / "run.md"
    source.write_text("some words\n" + report(header, tables))
    out = tmp_path / "run.json"
    importer = load_importer()
    assert importer.main([str(source), "--kind", "decode", "--command", "cmd", "--output", str(out)]) == 0
    got = read_record(str(out))
    tables[0].title = "table 0"  # no caption to take a title from
    assert got.tables == tables and got.tables[1].title == "speed"
    assert got.command == "cmd" and got.kind == "decode"
    assert got.meta["header"] == header and got.meta["threads"] == 1 and got.meta["cpu"] == "CPU X"
    assert got.meta["isa"] == "AVX512, our kernels avx512" and got.meta["load"] == "0.50 0.40 0.30"
    assert got.meta["torch"] == "2.13.0+cpu" and got.meta["python"] == "3.11.7" and got.meta["gpu"] is None
    source.write_text("no code block\n\n| a |\n|---|\n| 1 |\n")
    assert importer.main([str(source), "--kind", "decode", "--command", "cmd", "--output", str(out)]) == 2
