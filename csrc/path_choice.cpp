#include "path_choice.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <map>
#include <mutex>
#include <optional>
#include <tuple>

namespace sparseadapter {
namespace {

constexpr const char* kModeEnv = "SPARSEADAPTER_PATH";

// Measurement effort: each path is warmed up once, then timed kMinReps..kMaxReps times in
// alternation, as many as fit kBudgetMs per path (slow problems are timed fewer times). Medians
// within kCloseBand of each other are timed kCloseRounds times as often before the choice: on a
// shared machine seven timings of each could not tell paths 5-10% apart.
constexpr int kMinReps = 3;
constexpr int kMaxReps = 7;
constexpr double kBudgetMs = 20.0;
constexpr double kCloseBand = 0.10;
constexpr int kCloseRounds = 3;

// How much faster than the dense path the sparse path must measure to be kept (prefer_sparse).
constexpr double kSparseMargin = 0.03;

PathMode mode_from_env() {
  const char* value = std::getenv(kModeEnv);
  if (value == nullptr || *value == '\0') {
    return PathMode::kAuto;
  }
  try {
    return parse_path_mode(value);
  } catch (const c10::ValueError& e) {
    TORCH_CHECK_VALUE(false, kModeEnv, "=", value, ": ", e.what_without_backtrace());
  }
}

std::atomic<int>& mode_storage() {
  static std::atomic<int> mode{static_cast<int>(mode_from_env())};
  return mode;
}

using Key = std::tuple<std::string, std::string, std::string, std::array<int64_t, 6>, int64_t>;

struct Registry {
  std::mutex mutex;
  std::map<Key, PathDecision> decisions;
};

Registry& registry() {
  static Registry r;
  return r;
}

Key key_of(const PathProblem& p) {
  return Key{p.op, p.device.str(), c10::toString(p.dtype), p.dims, p.tokens};
}

Key key_of(const PathDecision& d) {
  return Key{d.op, d.device, d.dtype, d.dims, d.tokens};
}

bool is_measurement(const std::string& source) {
  return source == "measured" || source == "cached";
}

PathDecision decision_of(const PathProblem& p, Path path, const char* source, double ms_sparse, double ms_dense) {
  return PathDecision{p.op, p.device.str(), c10::toString(p.dtype), p.dims, p.tokens, path, source, ms_sparse, ms_dense,
                      0};
}

// Records (or replaces) the decision for `p` and counts one call.
void record(const PathProblem& p, const PathDecision& d) {
  auto& r = registry();
  std::lock_guard<std::mutex> lock(r.mutex);
  auto [it, inserted] = r.decisions.insert_or_assign(key_of(p), d);
  it->second.calls = 1;
}

// The recorded path of `p` if one was measured (in this process or by an earlier one on this machine),
// counting the call.
std::optional<Path> measured_path(const PathProblem& p) {
  auto& r = registry();
  std::lock_guard<std::mutex> lock(r.mutex);
  const auto it = r.decisions.find(key_of(p));
  if (it == r.decisions.end() || !is_measurement(it->second.source)) {
    return std::nullopt;
  }
  ++it->second.calls;
  return it->second.path;
}

void count_forced(const PathProblem& p, Path path) {
  auto& r = registry();
  {
    std::lock_guard<std::mutex> lock(r.mutex);
    const auto it = r.decisions.find(key_of(p));
    if (it != r.decisions.end() && it->second.source == "forced" && it->second.path == path) {
      ++it->second.calls;
      return;
    }
  }
  const double nan = std::numeric_limits<double>::quiet_NaN();
  record(p, decision_of(p, path, "forced", nan, nan));
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

}  // namespace

PathMode parse_path_mode(const std::string& name) {
  if (name == "auto") return PathMode::kAuto;
  if (name == "sparse") return PathMode::kSparse;
  if (name == "dense") return PathMode::kDense;
  TORCH_CHECK_VALUE(false, "path mode must be one of auto, sparse, dense; got '", name, "'");
}

const char* path_mode_name(PathMode mode) {
  switch (mode) {
    case PathMode::kAuto: return "auto";
    case PathMode::kSparse: return "sparse";
    case PathMode::kDense: return "dense";
  }
  return "?";
}

const char* path_name(Path path) {
  return path == Path::kSparse ? "sparse" : "dense";
}

PathMode path_mode() {
  return static_cast<PathMode>(mode_storage().load());
}

PathMode set_path_mode(PathMode mode) {
  return static_cast<PathMode>(mode_storage().exchange(static_cast<int>(mode)));
}

bool prefer_sparse(double ms_sparse, double ms_dense) {
  return ms_sparse <= (1.0 - kSparseMargin) * ms_dense;
}

double sparse_path_margin() {
  return kSparseMargin;
}

int64_t token_bucket(int64_t tokens) {
  int64_t bucket = 1;
  while (bucket < tokens) {
    bucket <<= 1;
  }
  return bucket;
}

Path run_chosen_path(
    const PathProblem& problem,
    const PathTimer& timer,
    const std::function<void()>& run_sparse,
    const std::function<void()>& run_dense) {
  const PathMode mode = path_mode();
  if (mode != PathMode::kAuto) {
    const Path path = mode == PathMode::kSparse ? Path::kSparse : Path::kDense;
    count_forced(problem, path);
    (path == Path::kSparse ? run_sparse : run_dense)();
    return path;
  }
  if (const auto known = measured_path(problem)) {
    (*known == Path::kSparse ? run_sparse : run_dense)();
    return *known;
  }
  if (!timer.can_time(problem.device)) {
    run_sparse();  // not recorded: the first call that can be timed measures
    return Path::kSparse;
  }
  // Warm-up (module loads, library handles, caches), which also sizes the repetitions.
  const double warm = std::max(timer.time_ms(run_sparse, problem.device), timer.time_ms(run_dense, problem.device));
  const int reps = std::clamp(static_cast<int>(kBudgetMs / std::max(warm, 1e-3)), kMinReps, kMaxReps);
  std::vector<double> sparse_ms, dense_ms;
  const auto time_both = [&](int n) {
    for (int i = 0; i < n; ++i) {  // alternated, so that drifting clocks or load hit both alike
      sparse_ms.push_back(timer.time_ms(run_sparse, problem.device));
      dense_ms.push_back(timer.time_ms(run_dense, problem.device));
    }
  };
  time_both(reps);
  if (std::abs(median(sparse_ms) / median(dense_ms) - 1.0) < kCloseBand) {
    time_both((kCloseRounds - 1) * reps);
  }
  const double ms_sparse = median(sparse_ms);
  const double ms_dense = median(dense_ms);
  const Path path = prefer_sparse(ms_sparse, ms_dense) ? Path::kSparse : Path::kDense;
  record(problem, decision_of(problem, path, "measured", ms_sparse, ms_dense));
  if (path == Path::kSparse) {  // the dense path ran last: the outputs must hold the chosen result
    run_sparse();
  }
  return path;
}

const PathTimer& cpu_path_timer() {
  static const PathTimer timer{
      [](const c10::Device&) { return true; },
      [](const std::function<void()>& run, const c10::Device&) {
        const auto start = std::chrono::steady_clock::now();
        run();
        return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
      }};
  return timer;
}

std::vector<PathDecision> path_decisions() {
  auto& r = registry();
  std::lock_guard<std::mutex> lock(r.mutex);
  std::vector<PathDecision> out;
  out.reserve(r.decisions.size());
  for (const auto& [key, d] : r.decisions) {
    out.push_back(d);
  }
  return out;
}

void seed_path_decision(PathDecision decision) {
  decision.source = "cached";
  decision.calls = 0;
  auto& r = registry();
  std::lock_guard<std::mutex> lock(r.mutex);
  const auto [it, inserted] = r.decisions.try_emplace(key_of(decision), decision);
  if (!inserted && !is_measurement(it->second.source)) {
    it->second = decision;  // a measurement replaces a forced record, never another measurement
  }
}

void clear_path_decisions() {
  auto& r = registry();
  std::lock_guard<std::mutex> lock(r.mutex);
  r.decisions.clear();
}

}  // namespace sparseadapter
