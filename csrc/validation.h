// Input checks shared by every back end. Each check is O(1) in the data (shapes, dtypes, devices,
// lengths) and runs on every call; the O(nnz) structural check of a pattern is the validate_csr op,
// and on the CPU every op call's check_pattern_bounds_cpu_once (once per unchanged pattern).
// Failures raise Python ValueError / TypeError with a message that names the argument.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <array>
#include <cstdint>
#include <functional>
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace sparseadapter {

// spmm's inputs, flattened to 2-D and made contiguous so kernels can index them directly.
struct SpmmInputs {
  at::Tensor x;                         // [num_tokens, in_features]
  at::Tensor values;                    // [nnz]
  at::Tensor crow_indices;              // [out_features + 1]
  at::Tensor col_indices;               // [nnz]
  std::optional<at::Tensor> row_order;  // [out_features]
  std::optional<at::Tensor> bias;       // [out_features]
  std::vector<int64_t> out_shape;       // x's leading dims + [out_features]
  int64_t num_tokens = 0;
  int64_t in_features = 0;
  int64_t out_features = 0;
  int64_t nnz = 0;
};

SpmmInputs check_spmm_inputs(
    const char* op,
    const at::Tensor& x,
    const at::Tensor& values,
    const at::Tensor& crow_indices,
    const at::Tensor& col_indices,
    const std::optional<at::Tensor>& row_order,
    const std::optional<at::Tensor>& bias,
    c10::DeviceType device_type);

// sddmm's inputs, flattened to 2-D and made contiguous.
struct SddmmInputs {
  at::Tensor grad_out;      // [num_tokens, out_features]
  at::Tensor x;             // [num_tokens, in_features]
  at::Tensor crow_indices;  // [out_features + 1]
  at::Tensor col_indices;   // [nnz]
  int64_t num_tokens = 0;
  int64_t in_features = 0;
  int64_t out_features = 0;
  int64_t nnz = 0;
};

SddmmInputs check_sddmm_inputs(
    const at::Tensor& grad_out,
    const at::Tensor& x,
    const at::Tensor& crow_indices,
    const at::Tensor& col_indices,
    c10::DeviceType device_type);

// The structure of the pattern a CPU kernel is about to follow, in one pass over raw memory (no
// allocation; about (rows + nnz) / 16 cycles): crow_indices starts at 0, never decreases and ends at
// nnz, and every column is in [0, num_cols). So no CPU call reads or writes outside its buffers,
// and none computes with a corrupt pattern. CUDA kernels trust the pattern checked where it entered
// (construction, load_state_dict, validate_csr): checking it per call would synchronize.
// validate_csr and csr_transpose use it for CPU patterns too; num_cols_name (may be null) says
// where num_cols came from. Op calls run it through check_pattern_bounds_cpu_once.
void check_pattern_bounds_cpu(
    const char* op,
    const at::Tensor& crow_indices,
    const at::Tensor& col_indices,
    int64_t num_cols,
    const char* num_cols_name);

// check_pattern_bounds_cpu, skipped when these very tensors passed it for this num_cols and have not
// changed since (checked_patterns.cpp says what "changed" covers). What every op call on the CPU runs.
void check_pattern_bounds_cpu_once(
    const char* op,
    const at::Tensor& crow_indices,
    const at::Tensor& col_indices,
    int64_t num_cols,
    const char* num_cols_name);

// `check` (the O(nnz) checks of several patterns at once), skipped when these very tensors passed it
// with these `sizes` (what splits them, e.g. per adapter) and none has changed since; the same cache
// and counters as check_pattern_bounds_cpu_once. For sparse_adapter_multi's concatenated arrays, which
// a caller that packs them once per state passes again unchanged.
void check_patterns_cpu_once(
    c10::ArrayRef<at::Tensor> tensors,
    c10::ArrayRef<int64_t> sizes,
    const std::function<void()>& check);

// What a CPU kernel derives from a pattern alone, kept in the entry of a checked pattern: one slot
// per kind and variant (the parameters it was built for, e.g. a block order's block sizes).
enum class PatternDerivedKind : uint8_t { kColumnMasks, kBf16Pairs, kEntryOrder, kSegmentOrder, kColumnBlocks };

// The `kind` data of a pattern that check_pattern_bounds_cpu_once has checked for num_cols, built for
// `variant`: the one `build` made at an earlier call while these tensors have not changed since, else
// `build()` (kept for the next call when the cache tracks the tensors). Thread-safe; `build` runs
// without the lock.
std::shared_ptr<const void> pattern_derived_cpu(
    const at::Tensor& crow_indices,
    const at::Tensor& col_indices,
    int64_t num_cols,
    PatternDerivedKind kind,
    uint64_t variant,
    const std::function<std::shared_ptr<const void>()>& build);

// Whether pattern_derived_cpu keeps what it builds for these tensors: they are a checked pattern
// (for num_cols) the cache tracks and they have not changed since. A kernel may then take a structure
// that pays off only when built once (a pattern sliced per call, e.g. one adapter of a packed set, is
// not kept).
bool pattern_derived_kept_cpu(const at::Tensor& crow_indices, const at::Tensor& col_indices, int64_t num_cols);

// The same, typed: T is the kind's structure.
template <typename T, typename Build>
std::shared_ptr<const T> pattern_derived_cpu_as(
    const at::Tensor& crow_indices,
    const at::Tensor& col_indices,
    int64_t num_cols,
    PatternDerivedKind kind,
    uint64_t variant,
    Build&& build) {
  return std::static_pointer_cast<const T>(pattern_derived_cpu(
      crow_indices, col_indices, num_cols, kind, variant, [&]() -> std::shared_ptr<const void> { return build(); }));
}

// The cache of check_pattern_bounds_cpu_once and check_patterns_cpu_once: patterns held, calls that
// skipped the pass, passes run, and derived structures built (pattern_derived_cpu).
struct CheckedPatternStats {
  int64_t entries = 0;
  int64_t hits = 0;
  int64_t checks = 0;
  int64_t derived_builds = 0;
};

CheckedPatternStats checked_pattern_stats();

// sparse_linear_backward's grad_x: the transposed product `t` (grad_y through the transposed pattern,
// values in the forward pattern's order), perm_t (one entry per value) and the forward pattern, which
// must have one row per feature of grad_y and nnz entries.
void check_linear_grad_x_patterns(
    const char* op,
    const SpmmInputs& t,
    const at::Tensor& perm_t,
    const at::Tensor& crow_indices,
    const at::Tensor& col_indices);

// sparse_linear_backward's weight: W as the forward expanded it, [grad_y's features, grad_x's features]
// in the values' dtype, on grad_y's device (t: the transposed product, as above).
void check_expanded_weight(const char* op, const at::Tensor& weight, const SpmmInputs& t);

// sparse_linear's extra arguments: the transposed pattern must describe W.T for this x and W.
void check_transposed_pattern(
    const char* op,
    const SpmmInputs& forward,
    const at::Tensor& crow_indices_t,
    const at::Tensor& col_indices_t,
    const at::Tensor& perm_t,
    const at::Tensor& row_order_t);

// The bottleneck activations the fused adapter computes in its kernel.
enum class Activation { kIdentity, kRelu, kGelu, kSilu, kTanh };

// sparse_adapter's inputs: two CSR projections, down [bottleneck, in] and up [out, bottleneck].
struct AdapterInputs {
  SpmmInputs down;                     // x [num_tokens, in] and the down projection
  SpmmInputs up;                       // the up projection; its x is an empty [0, bottleneck] stand-in
  std::optional<at::Tensor> residual;  // [num_tokens, out], contiguous
  Activation activation = Activation::kIdentity;
  double scale = 1.0;
  std::vector<int64_t> out_shape;     // x's leading dims + [out]
  std::vector<int64_t> hidden_shape;  // x's leading dims + [bottleneck]
};

AdapterInputs check_adapter_inputs(
    const at::Tensor& x,
    const std::optional<at::Tensor>& residual,
    const at::Tensor& down_values,
    const std::optional<at::Tensor>& down_bias,
    const at::Tensor& down_crow,
    const at::Tensor& down_col,
    const at::Tensor& up_values,
    const std::optional<at::Tensor>& up_bias,
    const at::Tensor& up_crow,
    const at::Tensor& up_col,
    c10::string_view activation,
    double scale,
    c10::DeviceType device_type);

// sparse_adapter_backward's inputs: the forward's (no residual and no biases: their gradients need
// no operand), the gradient of out and the saved pre-activation, flattened to 2-D, and the
// transposed patterns of both projections.
struct AdapterBackwardInputs {
  AdapterInputs forward;
  at::Tensor grad_out;    // [num_tokens, out], contiguous
  at::Tensor hidden_pre;  // [num_tokens, bottleneck], contiguous
  at::Tensor down_crow_t, down_col_t, down_perm_t, down_row_order_t;
  at::Tensor up_crow_t, up_col_t, up_perm_t, up_row_order_t;
};

AdapterBackwardInputs check_adapter_backward_inputs(
    const at::Tensor& grad_out,
    const at::Tensor& x,
    const at::Tensor& hidden_pre,
    const at::Tensor& down_values,
    const at::Tensor& down_crow,
    const at::Tensor& down_col,
    const at::Tensor& down_crow_t,
    const at::Tensor& down_col_t,
    const at::Tensor& down_perm_t,
    const at::Tensor& down_row_order_t,
    const at::Tensor& up_values,
    const at::Tensor& up_crow,
    const at::Tensor& up_col,
    const at::Tensor& up_crow_t,
    const at::Tensor& up_col_t,
    const at::Tensor& up_perm_t,
    const at::Tensor& up_row_order_t,
    c10::string_view activation,
    double scale,
    c10::DeviceType device_type);

// sparse_adapter_multi's inputs: K adapters whose CSR arrays arrive concatenated (adapter k's entries
// after adapter k-1's; each adapter's crow_indices starts at 0 and indexes its own entries), and one
// adapter index per row of x (x: [rows, ..., in]; -1 = no adapter). `adapters[k]` holds adapter k's
// arrays as views of the concatenations, checked as sparse_adapter checks one adapter, with an empty
// [0, in] stand-in for x and no residual; the caller fills in x and the residual of each row segment.
struct AdapterTransposed {  // the backward's patterns of one adapter (views)
  at::Tensor down_crow_t, down_col_t, down_perm_t, down_row_order_t;
  at::Tensor up_crow_t, up_col_t, up_perm_t, up_row_order_t;
};

struct MultiAdapterInputs {
  std::vector<AdapterInputs> adapters;
  std::vector<AdapterTransposed> transposed;  // one per adapter when given, else empty
  at::Tensor x;                               // [num_tokens, in], contiguous
  std::optional<at::Tensor> residual;         // [num_tokens, out], contiguous
  std::vector<int64_t> row_adapter;           // per row: -1 (none) or 0..K-1, read on the host
  std::vector<int64_t> down_nnz_offset, up_nnz_offset, bottleneck_offset;  // where adapter k starts
  int64_t num_rows = 0, tokens_per_row = 0, num_tokens = 0;
  int64_t in_features = 0, out_features = 0, max_bottleneck = 0;
  std::vector<int64_t> out_shape;  // x's leading dims + [out]
};

// transposed: the eight backward arrays (down crow_t, col_t, perm_t, row_order_t, then up's), all
// given or all absent. The adapter index may live on the CPU or on x's device; it is read on the host
// (on CUDA that is a synchronizing copy of rows integers).
MultiAdapterInputs check_multi_adapter_inputs(
    const char* op,
    const at::Tensor& x,
    const at::Tensor& adapter_index,
    const std::optional<at::Tensor>& residual,
    const at::Tensor& down_values,
    const std::optional<at::Tensor>& down_bias,
    const at::Tensor& down_crow,
    const at::Tensor& down_col,
    const at::Tensor& up_values,
    const std::optional<at::Tensor>& up_bias,
    const at::Tensor& up_crow,
    const at::Tensor& up_col,
    c10::ArrayRef<int64_t> bottleneck,
    c10::ArrayRef<int64_t> down_nnz,
    c10::ArrayRef<int64_t> up_nnz,
    int64_t out_features,
    c10::string_view activation,
    c10::ArrayRef<double> scale,
    const std::array<std::optional<at::Tensor>, 8>& transposed,
    c10::DeviceType device_type);

// sparse_adapter_multi_backward's grad_out (the forward output's shape) and hidden_pre (the forward's
// [tokens, max bottleneck]), both with x's dtype and device.
void check_multi_adapter_backward_tensors(
    const char* op,
    const MultiAdapterInputs& in,
    const at::Tensor& x,
    const at::Tensor& grad_out,
    const at::Tensor& hidden_pre);

// csr_to_dense and csr_gather: a pattern of num_rows x num_cols and its values (csr_to_dense: `data`
// is values [nnz]) or the dense matrix it samples (csr_gather: `data` is [num_rows, num_cols]).
struct PatternData {
  at::Tensor data;          // contiguous
  at::Tensor crow_indices;  // [num_rows + 1], contiguous
  at::Tensor col_indices;   // [nnz], contiguous
  int64_t num_rows = 0;
  int64_t num_cols = 0;
  int64_t nnz = 0;
};

PatternData check_csr_to_dense_inputs(
    const at::Tensor& values,
    const at::Tensor& crow_indices,
    const at::Tensor& col_indices,
    int64_t num_cols,
    c10::DeviceType device_type);

PatternData check_csr_gather_inputs(
    const at::Tensor& dense,
    const at::Tensor& crow_indices,
    const at::Tensor& col_indices,
    c10::DeviceType device_type);

// Index tensors: 1-D, int32 or int64. Shared with the pattern ops.
void check_index_tensor(const char* op, const char* name, const at::Tensor& t);

// An output whose size comes from a caller's number (num_cols, num_rows x num_cols), checked before
// it is allocated: `numel` elements of `itemsize` bytes must not overflow int64 and, on the CPU, must
// fit this machine's physical memory (an allocation past it would fail, or succeed through overcommit
// and get the process killed when touched). A ValueError names `what`. On CUDA the caching allocator
// fails cleanly; callers turn its OutOfMemoryError into the same ValueError.
void check_allocation(const char* op, const char* what, int64_t numel, int64_t itemsize, const at::Device& device);

// a * b, or -1 when it overflows int64 (both non-negative).
int64_t checked_product(int64_t a, int64_t b);

// ------------------------------------------------------------------------------------------------
// One helper per fact that several ops check. Each raises with "op: name ..." in its message.

// The value dtypes every op computes in: float32, float64, float16, bfloat16 (the set
// SA_DISPATCH_VALUE_TYPES of dispatch.h instantiates).
bool is_value_dtype(at::ScalarType t);

// TypeError unless t has a value dtype.
void check_value_dtype(const char* op, const char* name, const at::Tensor& t);

// ValueError unless t is on the device type of the kernel that was dispatched to.
void check_kernel_device(const char* op, const char* name, const at::Tensor& t, c10::DeviceType device_type);

// TypeError unless t is int32 or int64.
void check_index_dtype(const char* op, const char* name, at::ScalarType t);

// ValueError when int32 indices cannot hold `size`: "op: <what...> does not fit int32 indices; use
// int64 indices". `what` describes the size (e.g. "in_features = ", n).
template <typename... What>
void check_fits_index_dtype(const char* op, at::ScalarType index_dtype, int64_t size, const What&... what) {
  TORCH_CHECK_VALUE(
      index_dtype != at::kInt || size <= std::numeric_limits<int32_t>::max(), op, ": ", what...,
      " does not fit int32 indices; use int64 indices");
}

// ------------------------------------------------------------------------------------------------
// The pattern ops (pattern.cpp)

// The O(nnz) structural check of a CSR pattern of shape [num_rows, num_cols] (validate_csr's body),
// reported as `op`: index tensors of one dtype and device, crow_indices of num_rows + 1 entries,
// starting at 0, non-decreasing, ending at nnz, and every column in [0, num_cols). On the CPU it is
// check_pattern_bounds_cpu's one pass over raw memory; elsewhere ATen ops that synchronize.
void check_csr_structure(
    const char* op,
    const at::Tensor& crow_indices,
    const at::Tensor& col_indices,
    int64_t num_rows,
    int64_t num_cols);

// csr_transpose's arguments, the whole structure included (the transpose writes through the indices).
void check_csr_transpose_inputs(const at::Tensor& crow_indices, const at::Tensor& col_indices, int64_t num_cols);

void check_csr_row_order_inputs(const at::Tensor& crow_indices);

// ------------------------------------------------------------------------------------------------
// The pruning ops (prune.h holds their shared host code and kernels' helpers).

namespace prune {

enum class Method { kMagnitude, kSnip, kGrasp, kSynflow };

// prune_score's method name; ValueError naming the choices otherwise.
Method parse_method(const std::string& method);

struct ScoreInputs {
  Method method;
  at::Tensor weight;     // contiguous
  at::Tensor grad;       // contiguous, defined when the method needs it
  at::Tensor hess_grad;  // contiguous, defined when the method needs it
  at::ScalarType out_dtype;
};

ScoreInputs check_score_inputs(
    const at::Tensor& weight,
    const std::optional<at::Tensor>& grad,
    const std::optional<at::Tensor>& hess_grad,
    const std::string& method,
    c10::DeviceType device_type);

// topk_masks' scores, checked: one dtype (float32 or float64), one device, all contiguous.
struct TopkInputs {
  std::vector<at::Tensor> scores;  // contiguous
  int64_t total = 0;
  int64_t k = 0;
  at::ScalarType dtype = at::kFloat;
};

TopkInputs check_topk_inputs(at::TensorList scores, int64_t k, c10::DeviceType device_type);

// The ValueError for NaN scores, raised by the back ends' first histogram pass, which finds them.
[[noreturn]] void fail_nan(size_t index, int64_t count);

// mask_to_csr's mask as a contiguous bool tensor (non-bool masks keep their nonzeros, as
// python/sparseadapter/csr.py does), after checking it and index_dtype.
at::Tensor check_mask_inputs(const at::Tensor& mask, at::ScalarType index_dtype, c10::DeviceType device_type);

// mask_to_csr, once the nonzeros are counted: nnz must fit index_dtype.
void check_nnz_fits(int64_t nnz, at::ScalarType index_dtype);

}  // namespace prune

}  // namespace sparseadapter
