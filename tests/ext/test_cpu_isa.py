"""The CPU kernels' x86 variants. This machine runs the widest one; SPARSEADAPTER_CPU_ISA caps the
choice, so the narrower variants (AVX-512 without the bf16 dot product, AVX2 and the baseline, which
other users' CPUs run) are checked here too, by running the numerical tests under each cap in a fresh
process. The bf16 dot-product variant is tested where the CPU has the instruction and skipped where
it does not."""

import os
import subprocess
import sys

import pytest
import torch
from conftest import Pattern, assert_close_to_reference, float64_reference
from repo_paths import REPO

import sparseadapter_ext as ops

LEVELS = ["baseline", "avx2", "avx512", "avx512bf16"]


def _run(code_or_args, cap, **kw):
    env = dict(os.environ, SPARSEADAPTER_CPU_ISA=cap)
    args = [sys.executable, "-c", code_or_args] if isinstance(code_or_args, str) else [sys.executable, *code_or_args]
    return subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True, timeout=600, **kw)


def test_reports_a_known_variant():
    assert ops.cpu_isa() in LEVELS


@pytest.mark.parametrize("cap", ["baseline", "avx2", "avx512"])
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
    assert len(lines) == 2 and all(
        "SPARSEADAPTER_CPU_ISA=sse9: expected baseline, avx2, avx512 or avx512bf16" in l for l in lines
    )


@pytest.mark.parametrize("cap", ["baseline", "avx2", "avx512"])
def test_narrower_variants_match_the_reference(cap):
    """SpMM, SDDMM, SparseLinear, the fused adapter and its activations under the cap (CPU cases)."""
    files = ["tests/ext/test_ops_numerics.py", "tests/ext/test_fused_adapter.py", "tests/ext/test_fused_activations.py"]
    got = _run(["-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "cpu", *files], cap)
    assert got.returncode == 0, got.stdout[-3000:] + got.stderr[-2000:]


def _has_bf16_variant():
    return ops.cpu_isa() == "avx512bf16"


@pytest.mark.skipif(not _has_bf16_variant(), reason="no AVX512-BF16 on this CPU (or capped below it)")
@pytest.mark.parametrize(
    "out_f, in_f, density, tokens",
    [
        (37, 53, 0.3, 71),  # odd features: the last pair is half zero; partial last tile
        (70, 768, 0.1, 100),  # whole 16x16 blocks of pairs, partial tile
        (45, 96, 0.5, 64),  # every tile whole
        (768, 64, 0.1, 9),  # one partial tile, more rows than tokens
    ],
)
def test_bf16_dot_product_variant_matches_the_reference(out_f, in_f, density, tokens):
    """The bfloat16 SpMM on vdpbf16ps pairs (bf16_pairs.h), on the sparse path, against the rule."""
    p = Pattern(out_f, in_f, density, device="cpu", index_dtype=torch.int64, seed=in_f)
    gen = torch.Generator().manual_seed(out_f)
    x = torch.randn(tokens, in_f, generator=gen, dtype=torch.float64).bfloat16()
    bias = torch.randn(out_f, generator=gen, dtype=torch.float64).bfloat16()
    w = p.weight64.bfloat16()
    previous = ops.set_path_mode("sparse")
    try:
        y = ops.spmm(x, p.values64.bfloat16(), p.crow, p.col, None, bias)
    finally:
        ops.set_path_mode(previous)
    ref64, abs64 = float64_reference(torch.nn.functional.linear, x, w, bias)
    dense = torch.nn.functional.linear(x, w, bias)
    assert_close_to_reference(y, ref64, abs64, in_f + 1, dense, f"bf16 pairs {out_f}x{in_f}")


@pytest.mark.skipif(not _has_bf16_variant(), reason="no AVX512-BF16 on this CPU (or capped below it)")
@pytest.mark.parametrize("special", [float("inf"), float("nan")])
def test_bf16_dot_product_variant_ignores_features_outside_the_pattern(special):
    """A pair holding one nonzero must not read its other feature: Inf or NaN there stays out of y."""
    crow = torch.tensor([0, 1, 2, 4])
    col = torch.tensor([0, 3, 4, 5])  # row 0 reads feature 0 (not 1), row 1 feature 3 (not 2), row 2 both of (4, 5)
    values = torch.tensor([0.5, -1.5, 2.0, 0.25]).bfloat16()
    x = torch.randn(40, 6, dtype=torch.float64).bfloat16()
    x[:, 1] = special
    x[:, 2] = special
    previous = ops.set_path_mode("sparse")
    try:
        y = ops.spmm(x, values, crow, col, None, None)
    finally:
        ops.set_path_mode(previous)
    want = torch.stack(
        [0.5 * x[:, 0].double(), -1.5 * x[:, 3].double(), 2.0 * x[:, 4].double() + 0.25 * x[:, 5].double()], 1
    )
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.double(), want, rtol=1e-2, atol=1e-2)


@pytest.mark.skipif(not _has_bf16_variant(), reason="no AVX512-BF16 on this CPU (or capped below it)")
def test_bf16_dot_product_variant_is_capped_by_avx512():
    """Capped at avx512, the same CPU reports and runs the plain AVX-512 variant."""
    got = _run("import sparseadapter_ext as e; print(e.cpu_isa())", "avx512")
    assert got.returncode == 0 and got.stdout.strip() == "avx512", got.stderr
