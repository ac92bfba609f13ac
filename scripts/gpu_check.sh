#!/usr/bin/env bash
# On a lent GPU machine (torch 2.11+cu130 there, nothing installable), in about 8 minutes: build the
# extension in place, run the CUDA tests, the adapter benchmark on each path (sparse kernels, dense
# path), the training-step benchmark (bf16 and autocast, path chosen by measurement), and a
# compute-sanitizer memcheck; print a summary table last.
# Writes under $OUT (the device tool's output folder; ./gpu-out elsewhere) six files: gpu.txt,
# build.log, tests.log, bench.log, gpu_bench.md (the tables), memcheck.log; and each benchmark's result
# record (<kind>-cuda*.json: copy it to benchmarks/results/ and render BENCHMARKS.md, see its first lines).
#   GPU_CHECK_STEPS  which steps, in order (default "tests adapter training memcheck"; also "linear",
#                    "pruning": the SparseLinear grid and the pruning benchmark)
#   GPU_CHECK_TESTS  pytest -k expression for the tests step (default "cuda")
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD:$PWD/python" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
NVCC=$(command -v nvcc)
export CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$(readlink -f "$NVCC")")")}
STEPS=${GPU_CHECK_STEPS:-tests adapter training memcheck}
summary=()

# The image's default g++ (/opt/gcc) gave an extension that carries its own copy of libstdc++ code:
# two copies in one process disagree on locale facets, and formatting a number in an error message
# crashed. Build with the system compiler, whose libstdc++ is the one the process loads.
if [ -x /usr/bin/g++ ] && [ -x /usr/bin/gcc ]; then
  export CC=/usr/bin/gcc CXX=/usr/bin/g++
fi
echo "host compiler: $(${CXX:-g++} --version | head -1)"

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"

start=$SECONDS
if FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 python3 setup.py build_ext --inplace >"$OUT/build.log" 2>&1; then
  summary+=("build: ok ($((SECONDS - start)) s)")
else
  tail -40 "$OUT/build.log"
  echo "build: FAILED"
  exit 1
fi

: >"$OUT/gpu_bench.md"
for step in $STEPS; do
  start=$SECONDS
  case $step in
    tests)
      xdist=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8")
      timeout 300 python3 -m pytest -q -p no:cacheprovider $xdist tests -k "${GPU_CHECK_TESTS:-cuda}" >"$OUT/tests.log" 2>&1
      grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -30
      summary+=("CUDA tests: $(tail -1 "$OUT/tests.log") ($((SECONDS - start)) s)");;
    adapter)
      # the fused adapter on each path at the adapter shapes, N = 32768, bf16
      for mode in sparse dense; do
        table=$(mktemp)
        echo "== bench adapter, $mode path" >>"$OUT/bench.log"
        SPARSEADAPTER_PATH=$mode timeout 120 python3 -m sparseadapter.cli bench adapter --device cuda --dtype bfloat16 \
          --tokens 32768 --shapes 768x64 768x256 --sparsity 0.75 0.8 0.9 --rounds 2 --min-run-time 0.05 \
          --markdown "$table" --record "$OUT/adapter-cuda-$mode-path.json" >>"$OUT/bench.log" 2>&1 ||
          tail -20 "$OUT/bench.log"
        { echo "### sparse_adapter on the $mode path"; cat "$table"; } >>"$OUT/gpu_bench.md"
      done
      summary+=("adapter benchmark: $((SECONDS - start)) s");;
    training)
      timeout 150 python3 -m sparseadapter.cli bench training --device cuda --model bert-base --batch 128 --length 256 \
        --precision bf16 autocast --rounds 5 --warmup 2 --markdown "$OUT/gpu_bench.md" \
        --record "$OUT/training-cuda.json" >>"$OUT/bench.log" 2>&1 ||
        tail -20 "$OUT/bench.log"
      summary+=("training benchmark: $((SECONDS - start)) s");;
    memcheck)
      if command -v compute-sanitizer >/dev/null; then
        timeout 200 compute-sanitizer --tool memcheck --error-exitcode 9 python3 scripts/cuda_memcheck.py >"$OUT/memcheck.log" 2>&1
        summary+=("memcheck: exit $? — $(grep -E 'ERROR SUMMARY|memcheck workout' "$OUT/memcheck.log" | tr '\n' ' ') ($((SECONDS - start)) s)")
      fi;;
    linear)
      for run in "bfloat16 4096 32768" "float16 32768"; do
        set -- $run
        dtype=$1; shift
        timeout 240 python3 -m sparseadapter.cli bench linear --device cuda --dtype "$dtype" --tokens "$@" \
          --rounds 2 --min-run-time 0.1 --markdown "$OUT/gpu_bench.md" --record "$OUT/linear-cuda-$dtype.json" \
          >>"$OUT/bench.log" 2>&1 ||
          tail -20 "$OUT/bench.log"
      done
      summary+=("SparseLinear benchmark: $((SECONDS - start)) s");;
    pruning)
      timeout 150 python3 -m sparseadapter.cli bench pruning --device cuda --record "$OUT/pruning-cuda.json" \
        >>"$OUT/bench.log" 2>&1 ||
        tail -20 "$OUT/bench.log"
      summary+=("pruning benchmark: $((SECONDS - start)) s, in $OUT/bench.log");;
    *) echo "unknown step $step"; exit 2;;
  esac
done

echo
cat "$OUT/gpu_bench.md"
echo
printf '%s\n' "${summary[@]}"
