// Which implementation runs a sparse product: our CSR kernels ("sparse") or the expansion of the CSR
// weight into a per-call dense scratch matrix followed by the vendor GEMM ("dense": cuBLAS, oneDNN,
// MKL). Parameters, gradients and optimizer state are nnz-sized either way; only a scratch of the
// weight's dense size lives for the call.
//
// Which one is faster depends on the machine (matrix units, memory system), the dtype, the shape,
// the density and the token count, so it is measured where it runs, never assumed: in "auto" mode the
// first call of each problem (op, device, dtype, shape, nnz, tokens rounded up to a power of two)
// times both paths on its own inputs and remembers the faster for the process, the sparse path only
// where it is faster by a margin (prefer_sparse). The mode comes from
// the environment variable SPARSEADAPTER_PATH (auto | sparse | dense; default auto), read at first
// use, or from set_path_mode. Every decision is reported by path_decisions(); sparseadapter_ext's
// path_cache keeps the measurements of a machine across processes (seed_path_decision).
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace sparseadapter {

enum class Path : uint8_t { kSparse, kDense };
enum class PathMode : uint8_t { kAuto, kSparse, kDense };

PathMode parse_path_mode(const std::string& name);  // raises ValueError naming the choices
const char* path_mode_name(PathMode mode);
const char* path_name(Path path);

PathMode path_mode();
PathMode set_path_mode(PathMode mode);  // returns the previous mode

// One problem, as the decision cache keys it. dims are op-specific (unused entries 0); the token
// count is rounded up to a power of two so that batches of nearby lengths share one measurement.
struct PathProblem {
  const char* op;  // static string: "spmm", "sddmm" or "sparse_adapter"
  c10::Device device;
  at::ScalarType dtype;
  std::array<int64_t, 6> dims;
  int64_t tokens;  // rounded
};

int64_t token_bucket(int64_t tokens);

// The decision from the two medians: the sparse path where it takes at most (1 - margin) of the
// dense path's time. The dense path's cost is bounded by the vendor product's plus an expansion,
// the sparse path's is not, so a measurement too close to call goes to the dense path.
bool prefer_sparse(double ms_sparse, double ms_dense);
double sparse_path_margin();

// How a back end times a path: the CPU times with a steady clock, CUDA with events on the current
// stream (and cannot time while the stream is being captured into a graph).
struct PathTimer {
  bool (*can_time)(const c10::Device& device);
  double (*time_ms)(const std::function<void()>& run, const c10::Device& device);
};

const PathTimer& cpu_path_timer();

// Runs the chosen path for this problem and returns it. Forced modes run their path. In auto mode a
// known problem runs its recorded path; a new one is timed (each path warmed up, then timed in
// alternation, medians compared by prefer_sparse), recorded, and the winner runs once more so that the outputs hold
// its result. Where the back end cannot time, the sparse path runs and nothing is recorded.
Path run_chosen_path(
    const PathProblem& problem,
    const PathTimer& timer,
    const std::function<void()>& run_sparse,
    const std::function<void()>& run_dense);

struct PathDecision {
  std::string op;
  std::string device;
  std::string dtype;
  std::array<int64_t, 6> dims;
  int64_t tokens;
  Path path;
  std::string source;  // "measured", "cached" (seed_path_decision) or "forced"
  double ms_sparse;    // medians of the measurement; NaN when not measured
  double ms_dense;
  int64_t calls;  // calls that ran this problem's path since it was recorded
};

std::vector<PathDecision> path_decisions();
void clear_path_decisions();
// A measurement made by an earlier process on this machine (source becomes "cached"): auto mode runs
// its path without timing again. It does not replace a measurement of this process.
void seed_path_decision(PathDecision decision);

}  // namespace sparseadapter
