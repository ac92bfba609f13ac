"""The CPU kernels' x86 variants. This machine runs the widest one; SPARSEADAPTER_CPU_ISA caps the
choice, so the narrower variants (AVX2 and the baseline, which other users' CPUs run) are checked
here too, by running the numerical tests under each cap in a fresh process."""

import os
import subprocess
import sys

import pytest
from repo_paths import REPO

import sparseadapter_ext as ops

LEVELS = ["baseline", "avx2", "avx512"]


def _run(code_or_args, cap, **kw):
    env = dict(os.environ, SPARSEADAPTER_CPU_ISA=cap)
    args = [sys.executable, "-c", code_or_args] if isinstance(code_or_args, str) else [sys.executable, *code_or_args]
    return subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True, timeout=600, **kw)


def test_reports_a_known_variant():
    assert ops.cpu_isa() in LEVELS


@pytest.mark.parametrize("cap", ["baseline", "avx2"])
def test_cap_is_taken(cap):
    got = _run("import sparseadapter_ext as e; print(e.cpu_isa())", cap)
    assert got.returncode == 0, got.stderr
    widest = ops.cpu_isa() if "SPARSEADAPTER_CPU_ISA" not in os.environ else None
    expected = cap if widest is None or LEVELS.index(cap) <= LEVELS.index(widest) else widest
    assert got.stdout.strip() == expected


def test_unknown_variant_is_a_clear_error():
    code = (
        "import torch, sparseadapter_ext as e\n"
        "try:\n    e.cpu_isa()\nexcept RuntimeError as err:\n    print('cpu_isa:', err)\n"
        "try:\n    e.spmm(torch.ones(2, 3), torch.ones(1), torch.tensor([0, 1], dtype=torch.int32),"
        " torch.tensor([0], dtype=torch.int32))\nexcept RuntimeError as err:\n    print('spmm:', err)\n"
    )
    got = _run(code, "sse9")
    assert got.returncode == 0, got.stderr
    lines = got.stdout.splitlines()
    assert len(lines) == 2 and all("SPARSEADAPTER_CPU_ISA=sse9: expected baseline, avx2 or avx512" in l for l in lines)


@pytest.mark.parametrize("cap", ["baseline", "avx2"])
def test_narrower_variants_match_the_reference(cap):
    """SpMM, SDDMM, SparseLinear, the fused adapter and its activations under the cap (CPU cases)."""
    files = ["tests/ext/test_ops_numerics.py", "tests/ext/test_fused_adapter.py", "tests/ext/test_fused_activations.py"]
    got = _run(["-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "cpu", *files], cap)
    assert got.returncode == 0, got.stdout[-3000:] + got.stderr[-2000:]
