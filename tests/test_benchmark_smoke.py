"""The benchmark's --quick mode runs end to end through the CLI, so `sparseadapter bench linear` cannot rot."""
import os
import subprocess
import sys


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
