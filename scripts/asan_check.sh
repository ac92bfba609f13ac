#!/usr/bin/env bash
# AddressSanitizer (+ UBSan) run of the op tests.
#
# Builds the extension (CPU kernels only) with -fsanitize=address,undefined into a private copy of
# the working tree (nothing in the checkout or in any venv is touched), then runs the op tests on that
# build with libasan preloaded into the interpreter, and prints a summary: tests passed / failed, fuzz
# examples run, and every ASan / UBSan report. Exit status: 0 clean, 1 test failures, 2 sanitizer
# reports (or a failed build).
#
#   bash scripts/asan_check.sh                      # python3 on PATH must have torch, ninja, pytest, hypothesis
#   PYTHON=.venv/bin/python bash scripts/asan_check.sh
#   nice -n 19 env MAX_JOBS=1 OMP_NUM_THREADS=1 PYTHON=... bash scripts/asan_check.sh   # a busy machine
#
# Environment:
#   PYTHON          the interpreter (default python3)
#   ASAN_WORK       work folder (default: a fresh mktemp -d); keeps src/, build.log, tests.log,
#                   asan.*/ubsan.* reports, junit.xml, fuzz_counts.json, probe.log
#   ASAN_TESTS      the test files (default: test_validation, test_ops_numerics, test_prune_kernels,
#                   test_fuzz_ops in tests/ext/ and test_sparse_linear in tests/)
#   ASAN_PROBE=0    skip the raw-op probe (see below)
#   ASAN_REUSE=1    with ASAN_WORK of an earlier run: reuse its copy and build, run the tests again
#   MAX_JOBS        parallel compile jobs (torch's cpp_extension); OMP_NUM_THREADS for the tests (default 1)
#   SPARSEADAPTER_FUZZ_SCALE   multiplies the fuzz test's example budgets (tests/ext/test_fuzz_ops.py)
#
# Notes. The compiler is the system g++ (/usr/bin/g++ when present, see scripts/gpu_check.sh), whose
# libasan is preloaded. detect_leaks=0: CPython keeps objects alive at exit by design. The build uses
# -fsanitize-recover=address with halt_on_error=0, so one report does not end the run; reports go to
# files (log_path), because pytest captures the stderr of passing tests.
#
# The raw-op probe: spmm / sddmm do no O(nnz) check of the pattern
# (docs/kernels.md, "Checks on every call": the O(1) checks run per call, the structural check at
# SparseLinear build / load and in validate_csr / csr_transpose). The probe feeds each of them, in its
# own subprocess under ASan, a few corrupt patterns and prints what happens (an error, or the ASan
# report: out-of-bounds read or write). These are documented, expected outcomes of unchecked input
# and do not change the exit status.
#
# Cost on a 2-vCPU machine (MAX_JOBS=1, one test thread): build about 200 s, tests about 30 s, probe
# about 60 s.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PYTHON=${PYTHON:-python3}
WORK=${ASAN_WORK:-$(mktemp -d /tmp/sparseadapter-asan.XXXXXX)}
TESTS=${ASAN_TESTS:-"tests/ext/test_validation.py tests/ext/test_ops_numerics.py tests/test_sparse_linear.py tests/ext/test_prune_kernels.py tests/ext/test_fuzz_ops.py"}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$WORK"
echo "asan_check: work folder $WORK"

if [ -x /usr/bin/g++ ] && [ -x /usr/bin/gcc ]; then
  export CC=/usr/bin/gcc CXX=/usr/bin/g++
fi
CXX_BIN=${CXX:-g++}
LIBASAN=$("$CXX_BIN" -print-file-name=libasan.so)
if [ ! -e "$LIBASAN" ]; then
  echo "asan_check: $CXX_BIN has no libasan.so ($LIBASAN); install the compiler's sanitizer runtime" >&2
  exit 2
fi
# libstdc++ is preloaded too: the interpreter loads it only later (dlopen), and ASan's __cxa_throw
# interceptor, resolved at start-up, would then abort on the first C++ exception (every op error).
LIBSTDCXX=$(readlink -f "$("$CXX_BIN" -print-file-name=libstdc++.so)")
PRELOAD="$LIBASAN $LIBSTDCXX"

build_s=0
if [ "${ASAN_REUSE:-0}" = 1 ] && ls "$WORK"/src/sparseadapter_ext/_C*.so >/dev/null 2>&1; then
  echo "asan_check: reusing the build in $WORK/src"
else
  # 1. A private copy of the working tree (tracked and untracked, not ignored: no built .so, no venv).
  rm -rf "$WORK/src"
  mkdir -p "$WORK/src"
  if git -C "$REPO" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    git -C "$REPO" ls-files -z -co --exclude-standard | (cd "$REPO" && xargs -0 cp --parents -t "$WORK/src" 2>/dev/null)
  else
    tar -C "$REPO" --exclude=.git --exclude='*.so' --exclude=build --exclude=.venv -cf - . | tar -C "$WORK/src" -xf -
  fi
  rm -f "$WORK/src"/sparseadapter_ext/*.so

  # 2. The sanitized build. distutils appends CFLAGS / LDFLAGS to every compile / link command.
  SAN="-fsanitize=address,undefined -fsanitize-recover=address -fno-sanitize=vptr -fno-omit-frame-pointer -g"
  start=$SECONDS
  if (cd "$WORK/src" && FORCE_CPU=1 CFLAGS="$SAN" CXXFLAGS="$SAN" LDFLAGS="-fsanitize=address,undefined" \
        "$PYTHON" setup.py build_ext --inplace >"$WORK/build.log" 2>&1); then
    build_s=$((SECONDS - start))
  else
    tail -30 "$WORK/build.log"
    echo "asan_check: build FAILED (log: $WORK/build.log)"
    exit 2
  fi
fi
SO=$(ls "$WORK"/src/sparseadapter_ext/_C*.so)
if ! nm -D "$SO" | grep __asan_report >/dev/null; then  # no -q: an early exit would SIGPIPE nm (pipefail)
  echo "asan_check: $SO carries no ASan instrumentation; the flags did not reach the compiler" >&2
  exit 2
fi

# 3. The tests, on the sanitized build (PYTHONPATH puts the copy ahead of any installed package).
export PYTHONPATH="$WORK/src:$WORK/src/python"
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=0:alloc_dealloc_mismatch=0:detect_odr_violation=0:log_path=$WORK/asan"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=0:log_path=$WORK/ubsan"
export SPARSEADAPTER_FUZZ_COUNTS="$WORK/fuzz_counts.json"
rm -f "$WORK"/asan.* "$WORK"/ubsan.* "$WORK"/probe.log "$WORK"/junit.xml "$WORK"/fuzz_counts.json
start=$SECONDS
(cd "$WORK/src" && LD_PRELOAD="$PRELOAD" "$PYTHON" -c \
  "import torch, sparseadapter_ext._C as c; print('extension', c.__file__, 'torch', torch.__version__)") | tee "$WORK/tests.log"
# shellcheck disable=SC2086
(cd "$WORK/src" && LD_PRELOAD="$PRELOAD" "$PYTHON" -m pytest -q -p no:cacheprovider -rfE \
  --junitxml="$WORK/junit.xml" $TESTS >>"$WORK/tests.log" 2>&1)
pytest_rc=$?
tests_s=$((SECONDS - start))
test_reports=$(cat "$WORK"/asan.* "$WORK"/ubsan.* 2>/dev/null | grep -cE "ERROR: AddressSanitizer|runtime error:")

# 4. The raw-op probe (expected findings, see the header).
if [ "${ASAN_PROBE:-1}" != 0 ]; then
  cat >"$WORK/probe.py" <<'EOF'
import sys, torch, sparseadapter_ext as ops
op, kind = sys.argv[1], sys.argv[2]
rows, cols, tokens = 6, 8, 5
g = torch.Generator().manual_seed(0)
mask = torch.rand(rows, cols, generator=g) < 0.5
crow = torch.zeros(rows + 1, dtype=torch.int32)
crow[1:] = mask.sum(1).cumsum(0)
col = mask.nonzero()[:, 1].int()
nnz = col.numel()
if kind == "crow[-1] > nnz": crow[-1] = nnz + 1000
elif kind == "crow not monotone": crow[2] = crow[3] + 3
elif kind == "crow negative": crow[1] = -1000
elif kind == "col == num_cols": col[0] = cols
elif kind == "col huge": col[0] = 10**6
elif kind == "col negative": col[0] = -10**6
x, gy, v = torch.randn(tokens, cols), torch.randn(tokens, rows), torch.randn(nnz)
try:
    if op == "spmm": ops.spmm(x, v, crow, col)
    elif op == "sddmm": ops.sddmm(gy, x, crow, col)
    else: ops.csr_transpose(crow, col, cols)
    print("returned (no error raised)")
except Exception as e:
    print(f"{type(e).__name__}: {str(e).splitlines()[0][:110]}")
EOF
  : >"$WORK/probe.log"
  for op in spmm sddmm csr_transpose; do
    for kind in "crow[-1] > nnz" "crow not monotone" "crow negative" "col == num_cols" "col huge" "col negative"; do
      rm -f "$WORK"/probe_asan.*
      out=$(cd "$WORK/src" && ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:alloc_dealloc_mismatch=0:log_path=$WORK/probe_asan" \
            LD_PRELOAD="$PRELOAD" timeout 120 "$PYTHON" "$WORK/probe.py" "$op" "$kind" 2>&1 | tail -1; \
            echo "exit ${PIPESTATUS[0]}")
      rc=${out##*exit }
      out=${out%exit *}
      out=${out%$'\n'}
      [ -z "$out" ] && out="died, exit status $rc"
      report=$(cat "$WORK"/probe_asan.* 2>/dev/null | grep -m1 -E "ERROR: AddressSanitizer" | sed -E 's/.*AddressSanitizer: ([a-zA-Z-]+).*/\1/')
      access=$(cat "$WORK"/probe_asan.* 2>/dev/null | grep -m1 -E "^(READ|WRITE) of size" | cut -d' ' -f1)
      frame=$(cat "$WORK"/probe_asan.* 2>/dev/null | grep -m1 -E "#[0-9]+ .* in .*(sparseadapter|at::native)" | sed -E 's/.* in ([^ (]+).*/\1/' | cut -c1-70)
      if [ -n "$report" ]; then out="ASan $report ${access:-} in ${frame:-?}"; fi
      printf "%-14s %-18s %s\n" "$op" "$kind" "$out" >>"$WORK/probe.log"
    done
  done
fi

# 5. Summary.
counts=$("$PYTHON" - "$WORK/junit.xml" "$WORK/fuzz_counts.json" <<'EOF'
import json, sys, xml.etree.ElementTree as ET
try:
    root = ET.parse(sys.argv[1]).getroot()
    s = root if root.tag == "testsuite" else root.find("testsuite")
    tests, fail, err, skip = (int(s.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
    print(f"tests: {tests} run, {tests - fail - err - skip} passed, {fail} failed, {err} errors, {skip} skipped/xfailed")
except Exception as e:  # noqa: BLE001
    print(f"tests: no junit report ({e})")
try:
    ex = json.load(open(sys.argv[2]))["examples"]
    print(f"fuzz examples: {sum(ex.values())} over {len(ex)} properties")
except Exception:  # noqa: BLE001
    print("fuzz examples: not recorded")
EOF
)
echo
echo "==== asan_check summary ($(date -u +%Y-%m-%d), $("$PYTHON" -c 'import torch; print("torch", torch.__version__)'), $("$CXX_BIN" --version | head -1))"
echo "build: ${build_s} s (-fsanitize=address,undefined)   tests: ${tests_s} s, OMP_NUM_THREADS=$OMP_NUM_THREADS"
echo "$counts"
echo "pytest: $(tail -1 "$WORK/tests.log")"
grep -E "^(FAILED|ERROR) " "$WORK/tests.log" | head -20
echo "sanitizer reports during the tests: $test_reports"
if [ "$test_reports" != 0 ]; then
  cat "$WORK"/asan.* "$WORK"/ubsan.* 2>/dev/null | grep -E "ERROR: AddressSanitizer|runtime error:|^(READ|WRITE) of size|#[0-9] " | head -60
fi
[ -f "$WORK/probe.log" ] && { echo "raw-op probe (corrupt patterns fed to unchecked ops; expected, not counted):"; cat "$WORK/probe.log"; }
echo "logs: $WORK"
if [ "$test_reports" != 0 ]; then exit 2; fi
if [ "$pytest_rc" != 0 ]; then exit 1; fi
exit 0
