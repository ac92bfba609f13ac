#!/usr/bin/env bash
# On a lent GPU machine (torch 2.11+cu130 there, nothing installable): build the extension in place,
# run the CUDA tests, a compute-sanitizer memcheck, and the GPU benchmarks (SparseLinear, the whole
# adapter, pruning); print a summary last.
# Writes logs under $OUT (the device tool's output folder), or ./gpu-out elsewhere.
# GPU_CHECK_BENCH=0 skips the benchmarks; GPU_CHECK_BENCH=pruning runs only the pruning one.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD:$PWD/python" PYTHONUNBUFFERED=1
NVCC=$(command -v nvcc)
export CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$(readlink -f "$NVCC")")")}
summary=()

# The image's default g++ (/opt/gcc) gave an extension that carries its own copy of libstdc++ code:
# two copies in one process disagree on locale facets, and formatting a number in an error message
# crashed. Build with the system compiler, whose libstdc++ is the one the process loads.
if [ -x /usr/bin/g++ ] && [ -x /usr/bin/gcc ]; then
  export CC=/usr/bin/gcc CXX=/usr/bin/g++
fi
echo "host compiler: $(${CXX:-g++} --version | head -1)"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"

start=$SECONDS
if FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 python3 setup.py build_ext --inplace >"$OUT/build.log" 2>&1; then
  summary+=("build: ok ($((SECONDS - start)) s)")
  echo "libstdc++ stream code inside _C.so: $(nm -C --defined-only sparseadapter_ext/_C*.so | grep -c '_M_insert<long>')"
else
  tail -40 "$OUT/build.log"
  echo "build: FAILED"
  exit 1
fi

start=$SECONDS
timeout 300 python3 -m pytest -q -p no:cacheprovider tests -k cuda >"$OUT/tests.log" 2>&1
summary+=("CUDA tests: $(tail -1 "$OUT/tests.log") ($((SECONDS - start)) s)")
grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -20

start=$SECONDS
if command -v compute-sanitizer >/dev/null; then
  timeout 150 compute-sanitizer --tool memcheck --error-exitcode 9 python3 scripts/cuda_memcheck.py >"$OUT/memcheck.log" 2>&1
  summary+=("memcheck: exit $? — $(grep -E 'ERROR SUMMARY|memcheck workout' "$OUT/memcheck.log" | tr '\n' ' ') ($((SECONDS - start)) s)")
fi

start=$SECONDS
: >"$OUT/gpu_bench.md"
bench=${GPU_CHECK_BENCH:-1}
[ "$bench" = 0 ] || {
[ "$bench" = pruning ] || for run in "bfloat16 4096 32768" "float16 32768"; do
  set -- $run
  dtype=$1; shift
  timeout 240 python3 -m sparseadapter.cli bench linear --device cuda --dtype "$dtype" --tokens "$@" \
    --rounds 2 --min-run-time 0.1 --markdown "$OUT/gpu_bench.md" >"$OUT/bench_$dtype.log" 2>&1 ||
    tail -20 "$OUT/bench_$dtype.log"
done
[ "$bench" = pruning ] || {
  timeout 240 python3 -m sparseadapter.cli bench adapter --device cuda --dtype bfloat16 --tokens 32768 --sparsity 0.4 0.6 0.75 0.8 0.9 0.95 \
    --rounds 2 --min-run-time 0.1 --markdown "$OUT/gpu_bench.md" >"$OUT/bench_adapter.log" 2>&1 ||
    tail -20 "$OUT/bench_adapter.log"
}
timeout 150 python3 -m sparseadapter.cli bench pruning --device cuda >"$OUT/bench_pruning.log" 2>&1 ||
  tail -20 "$OUT/bench_pruning.log"
summary+=("benchmark: $((SECONDS - start)) s, tables in $OUT/gpu_bench.md and $OUT/bench_pruning.log")
}

echo
cat "$OUT/gpu_bench.md"
echo
printf '%s\n' "${summary[@]}"
