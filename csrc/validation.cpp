#include "validation.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>

#if defined(__unix__) || defined(__APPLE__)
#include <unistd.h>
#endif

#include "dispatch.h"

namespace sparseadapter {
namespace {

void check_device(const char* op, const char* name, const at::Tensor& t, const at::Device& device) {
  TORCH_CHECK_VALUE(
      t.device() == device, op, ": ", name, " is on ", t.device(), " but x is on ", device,
      "; move all arguments to one device");
}

void check_same_index_dtype(const char* op, const char* name, const at::Tensor& t, const at::Tensor& crow) {
  TORCH_CHECK_TYPE(
      t.scalar_type() == crow.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(),
      " but crow_indices has dtype ", crow.scalar_type(), "; use one index dtype for the pattern");
}

// The shape/dtype/device facts every CSR argument must satisfy, for a pattern of `rows` rows.
void check_pattern(
    const char* op,
    const at::Tensor& crow_indices,
    const at::Tensor& col_indices,
    const at::Device& device) {
  check_index_tensor(op, "crow_indices", crow_indices);
  check_index_tensor(op, "col_indices", col_indices);
  check_same_index_dtype(op, "col_indices", col_indices, crow_indices);
  TORCH_CHECK_VALUE(crow_indices.numel() >= 1, op, ": crow_indices must have num_rows + 1 >= 1 entries, got 0");
  check_device(op, "crow_indices", crow_indices, device);
  check_device(op, "col_indices", col_indices, device);
}

// x: [..., features], a supported float dtype, on the device this kernel serves.
void check_x(const char* op, const at::Tensor& x, c10::DeviceType device_type) {
  TORCH_CHECK_VALUE(x.dim() >= 1, op, ": x must have shape [..., in_features], got a 0-d tensor");
  check_value_dtype(op, "x", x);
  check_kernel_device(op, "x", x, device_type);
}

// The product of t's leading dims (the number of tokens). Flattening with reshape({-1, features})
// fails when features == 0 (a 0-element tensor makes -1 ambiguous), so the count is explicit.
int64_t leading_numel(const at::Tensor& t) {
  int64_t n = 1;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) {
    n *= t.size(d);
  }
  return n;
}

}  // namespace

int64_t checked_product(int64_t a, int64_t b) {
  if (a < 0 || b < 0) return -1;
  if (a != 0 && b > std::numeric_limits<int64_t>::max() / a) return -1;
  return a * b;
}

namespace {

// Bytes of physical memory, or -1 where unknown.
int64_t physical_memory_bytes() {
#if defined(_SC_PHYS_PAGES) && defined(_SC_PAGESIZE)
  const long pages = sysconf(_SC_PHYS_PAGES);
  const long page_size = sysconf(_SC_PAGESIZE);
  if (pages > 0 && page_size > 0) {
    const int64_t bytes = checked_product(pages, page_size);
    return bytes < 0 ? std::numeric_limits<int64_t>::max() : bytes;
  }
#endif
  return -1;
}

}  // namespace

void check_allocation(const char* op, const char* what, int64_t numel, int64_t itemsize, const at::Device& device) {
  const int64_t bytes = checked_product(numel, itemsize);
  TORCH_CHECK_VALUE(
      numel >= 0 && bytes >= 0, op, ": ", what, " would need ",
      numel < 0 ? "a negative number of" : "more than 2^63 bytes for", " entries; the size is not allocatable");
  if (device.is_cpu()) {
    const int64_t memory = physical_memory_bytes();
    TORCH_CHECK_VALUE(
        memory < 0 || bytes <= memory, op, ": ", what, " would need ", numel, " entries (", bytes,
        " bytes), more than this machine's ", memory, " bytes of memory");
  }
}

bool is_value_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

void check_value_dtype(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_TYPE(
      is_value_dtype(t.scalar_type()), op, ": ", name, " must be float32, float16, bfloat16 or float64, got ",
      t.scalar_type());
}

void check_kernel_device(const char* op, const char* name, const at::Tensor& t, c10::DeviceType device_type) {
  TORCH_CHECK_VALUE(
      t.device().type() == device_type, op, ": ", name, " is on ", t.device(), " but this kernel runs on ",
      device_type);
}

void check_index_dtype(const char* op, const char* name, at::ScalarType t) {
  TORCH_CHECK_TYPE(t == at::kInt || t == at::kLong, op, ": ", name, " must be int32 or int64, got ", t);
}

void check_index_tensor(const char* op, const char* name, const at::Tensor& t) {
  check_index_dtype(op, name, t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1, op, ": ", name, " must be 1-D, got shape ", t.sizes());
}

SpmmInputs check_spmm_inputs(
    const char* op,
    const at::Tensor& x,
    const at::Tensor& values,
    const at::Tensor& crow_indices,
    const at::Tensor& col_indices,
    const std::optional<at::Tensor>& row_order,
    const std::optional<at::Tensor>& bias,
    c10::DeviceType device_type) {
  check_x(op, x, device_type);
  const auto device = x.device();
  check_pattern(op, crow_indices, col_indices, device);

  TORCH_CHECK_VALUE(values.dim() == 1, op, ": values must be 1-D, got shape ", values.sizes());
  TORCH_CHECK_TYPE(
      values.scalar_type() == x.scalar_type(), op, ": values has dtype ", values.scalar_type(), " but x has dtype ",
      x.scalar_type());
  check_device(op, "values", values, device);
  TORCH_CHECK_VALUE(
      values.numel() == col_indices.numel(), op, ": values has ", values.numel(), " entries but col_indices has ",
      col_indices.numel(), "; both must have nnz entries");

  SpmmInputs in;
  in.out_features = crow_indices.numel() - 1;
  in.in_features = x.size(-1);
  in.nnz = values.numel();
  check_fits_index_dtype(op, crow_indices.scalar_type(), in.in_features, "in_features = ", in.in_features);

  if (row_order.has_value()) {
    check_index_tensor(op, "row_order", *row_order);
    check_same_index_dtype(op, "row_order", *row_order, crow_indices);
    check_device(op, "row_order", *row_order, device);
    TORCH_CHECK_VALUE(
        row_order->numel() == in.out_features, op, ": row_order has ", row_order->numel(),
        " entries but the pattern has ", in.out_features, " rows");
    in.row_order = row_order->contiguous();
  }
  if (bias.has_value()) {
    TORCH_CHECK_TYPE(
        bias->scalar_type() == x.scalar_type(), op, ": bias has dtype ", bias->scalar_type(), " but x has dtype ",
        x.scalar_type());
    check_device(op, "bias", *bias, device);
    TORCH_CHECK_VALUE(
        bias->dim() == 1 && bias->numel() == in.out_features, op, ": bias must have shape [", in.out_features,
        "] (one entry per row), got ", bias->sizes());
    in.bias = bias->contiguous();
  }

  in.out_shape = x.sizes().vec();
  in.out_shape.back() = in.out_features;
  in.num_tokens = leading_numel(x);
  in.x = x.reshape({in.num_tokens, in.in_features}).contiguous();
  in.values = values.contiguous();
  in.crow_indices = crow_indices.contiguous();
  in.col_indices = col_indices.contiguous();
  return in;
}

SddmmInputs check_sddmm_inputs(
    const at::Tensor& grad_out,
    const at::Tensor& x,
    const at::Tensor& crow_indices,
    const at::Tensor& col_indices,
    c10::DeviceType device_type) {
  constexpr const char* op = "sddmm";
  check_x(op, x, device_type);
  const auto device = x.device();
  check_pattern(op, crow_indices, col_indices, device);
  check_device(op, "grad_out", grad_out, device);
  TORCH_CHECK_TYPE(
      grad_out.scalar_type() == x.scalar_type(), op, ": grad_out has dtype ", grad_out.scalar_type(),
      " but x has dtype ", x.scalar_type());

  SddmmInputs in;
  in.out_features = crow_indices.numel() - 1;
  in.in_features = x.size(-1);
  in.nnz = col_indices.numel();
  check_fits_index_dtype(op, crow_indices.scalar_type(), in.in_features, "in_features = ", in.in_features);
  TORCH_CHECK_VALUE(
      grad_out.dim() == x.dim(), op, ": grad_out has shape ", grad_out.sizes(), " but x has shape ", x.sizes(),
      "; they must share leading dims");
  for (int64_t d = 0; d + 1 < x.dim(); ++d) {
    TORCH_CHECK_VALUE(
        grad_out.size(d) == x.size(d), op, ": grad_out has shape ", grad_out.sizes(), " but x has shape ", x.sizes(),
        "; they must share leading dims");
  }
  TORCH_CHECK_VALUE(
      grad_out.size(-1) == in.out_features, op, ": grad_out's last dim is ", grad_out.size(-1), " but the pattern has ",
      in.out_features, " rows");

  in.num_tokens = leading_numel(x);
  in.x = x.reshape({in.num_tokens, in.in_features}).contiguous();
  in.grad_out = grad_out.reshape({in.num_tokens, in.out_features}).contiguous();
  in.crow_indices = crow_indices.contiguous();
  in.col_indices = col_indices.contiguous();
  return in;
}

PatternData check_csr_to_dense_inputs(
    const at::Tensor& values,
    const at::Tensor& crow_indices,
    const at::Tensor& col_indices,
    int64_t num_cols,
    c10::DeviceType device_type) {
  constexpr const char* op = "csr_to_dense";
  TORCH_CHECK_VALUE(values.dim() == 1, op, ": values must be 1-D, got shape ", values.sizes());
  check_value_dtype(op, "values", values);
  check_kernel_device(op, "values", values, device_type);
  check_pattern(op, crow_indices, col_indices, values.device());
  TORCH_CHECK_VALUE(num_cols >= 0, op, ": num_cols must be >= 0, got ", num_cols);
  check_fits_index_dtype(op, crow_indices.scalar_type(), num_cols, "num_cols = ", num_cols);
  TORCH_CHECK_VALUE(
      values.numel() == col_indices.numel(), op, ": values has ", values.numel(), " entries but col_indices has ",
      col_indices.numel(), "; both must have nnz entries");
  {
    const int64_t rows = crow_indices.numel() - 1;
    const int64_t numel = checked_product(rows, num_cols);
    TORCH_CHECK_VALUE(
        numel >= 0, op, ": the dense matrix [", rows, ", ", num_cols,
        "] has more than 2^63 entries; num_cols is not allocatable");
    check_allocation(op, "the dense matrix [num_rows, num_cols]", numel, values.element_size(), values.device());
  }
  PatternData in;
  in.data = values.contiguous();
  in.crow_indices = crow_indices.contiguous();
  in.col_indices = col_indices.contiguous();
  in.num_rows = crow_indices.numel() - 1;
  in.num_cols = num_cols;
  in.nnz = col_indices.numel();
  return in;
}

PatternData check_csr_gather_inputs(
    const at::Tensor& dense,
    const at::Tensor& crow_indices,
    const at::Tensor& col_indices,
    c10::DeviceType device_type) {
  constexpr const char* op = "csr_gather";
  TORCH_CHECK_VALUE(dense.dim() == 2, op, ": dense must be 2-D [num_rows, num_cols], got shape ", dense.sizes());
  check_value_dtype(op, "dense", dense);
  check_kernel_device(op, "dense", dense, device_type);
  check_pattern(op, crow_indices, col_indices, dense.device());
  TORCH_CHECK_VALUE(
      dense.size(0) == crow_indices.numel() - 1, op, ": dense has ", dense.size(0), " rows but the pattern has ",
      crow_indices.numel() - 1);
  check_fits_index_dtype(op, crow_indices.scalar_type(), dense.size(1), "num_cols = ", dense.size(1));
  PatternData in;
  in.data = dense.contiguous();
  in.crow_indices = crow_indices.contiguous();
  in.col_indices = col_indices.contiguous();
  in.num_rows = dense.size(0);
  in.num_cols = dense.size(1);
  in.nnz = col_indices.numel();
  return in;
}

void check_linear_grad_x_patterns(
    const char* op,
    const SpmmInputs& t,
    const at::Tensor& perm_t,
    const at::Tensor& crow_indices,
    const at::Tensor& col_indices) {
  check_index_tensor(op, "perm_t", perm_t);
  check_same_index_dtype(op, "perm_t", perm_t, t.crow_indices);
  check_device(op, "perm_t", perm_t, t.x.device());
  TORCH_CHECK_VALUE(perm_t.numel() == t.nnz, op, ": perm_t has ", perm_t.numel(), " entries but values has ", t.nnz);
  check_pattern(op, crow_indices, col_indices, t.x.device());
  check_same_index_dtype(op, "crow_indices_t", t.crow_indices, crow_indices);
  TORCH_CHECK_VALUE(
      crow_indices.numel() == t.in_features + 1, op, ": grad_y has ", t.in_features, " features but the weight has ",
      crow_indices.numel() - 1, " rows");
  TORCH_CHECK_VALUE(
      col_indices.numel() == t.nnz, op, ": col_indices has ", col_indices.numel(), " entries but values has ", t.nnz);
}

void check_expanded_weight(const char* op, const at::Tensor& weight, const SpmmInputs& t) {
  TORCH_CHECK_TYPE(
      weight.scalar_type() == t.values.scalar_type(), op, ": weight has dtype ", weight.scalar_type(),
      " but values has dtype ", t.values.scalar_type());
  check_device(op, "weight", weight, t.x.device());
  TORCH_CHECK_VALUE(
      weight.dim() == 2 && weight.size(0) == t.in_features && weight.size(1) == t.out_features, op,
      ": weight must be the expanded [", t.in_features, ", ", t.out_features, "] weight, got shape ", weight.sizes());
}

void check_transposed_pattern(
    const char* op,
    const SpmmInputs& forward,
    const at::Tensor& crow_indices_t,
    const at::Tensor& col_indices_t,
    const at::Tensor& perm_t,
    const at::Tensor& row_order_t) {
  const auto device = forward.x.device();
  check_pattern(op, crow_indices_t, col_indices_t, device);
  check_same_index_dtype(op, "crow_indices_t", crow_indices_t, forward.crow_indices);
  TORCH_CHECK_VALUE(
      crow_indices_t.numel() == forward.in_features + 1, op, ": x has ", forward.in_features,
      " features but the weight has ", crow_indices_t.numel() - 1, " columns (crow_indices_t has ",
      crow_indices_t.numel(), " entries)");
  TORCH_CHECK_VALUE(
      col_indices_t.numel() == forward.nnz, op, ": col_indices_t has ", col_indices_t.numel(),
      " entries but the pattern has nnz = ", forward.nnz);
  check_index_tensor(op, "perm_t", perm_t);
  check_same_index_dtype(op, "perm_t", perm_t, forward.crow_indices);
  check_device(op, "perm_t", perm_t, device);
  TORCH_CHECK_VALUE(
      perm_t.numel() == forward.nnz, op, ": perm_t has ", perm_t.numel(),
      " entries but the pattern has nnz = ", forward.nnz);
  check_index_tensor(op, "row_order_t", row_order_t);
  check_same_index_dtype(op, "row_order_t", row_order_t, forward.crow_indices);
  check_device(op, "row_order_t", row_order_t, device);
  TORCH_CHECK_VALUE(
      row_order_t.numel() == forward.in_features, op, ": row_order_t has ", row_order_t.numel(),
      " entries but the weight has ", forward.in_features, " columns");
}

namespace {

Activation parse_activation(c10::string_view name) {
  if (name == "identity") return Activation::kIdentity;
  if (name == "relu") return Activation::kRelu;
  if (name == "gelu") return Activation::kGelu;
  if (name == "silu") return Activation::kSilu;
  if (name == "tanh") return Activation::kTanh;
  TORCH_CHECK_VALUE(
      false, "sparse_adapter: activation must be one of identity, relu, gelu, silu, tanh; got '", std::string(name),
      "'");
}

}  // namespace

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
    c10::DeviceType device_type) {
  AdapterInputs in;
  in.activation = parse_activation(activation);
  TORCH_CHECK_VALUE(std::isfinite(scale), "sparse_adapter: scale must be finite, got ", scale);
  in.scale = scale;
  in.down = check_spmm_inputs(
      "sparse_adapter (down)", x, down_values, down_crow, down_col, std::nullopt, down_bias, device_type);
  const int64_t bottleneck = in.down.out_features;
  // up's input is the bottleneck activation, which exists only inside the kernel: check its pattern
  // against an empty stand-in of the right width, dtype and device.
  const auto stand_in = at::empty({0, bottleneck}, x.options());
  in.up = check_spmm_inputs(
      "sparse_adapter (up)", stand_in, up_values, up_crow, up_col, std::nullopt, up_bias, device_type);
  TORCH_CHECK_TYPE(
      in.up.crow_indices.scalar_type() == in.down.crow_indices.scalar_type(),
      "sparse_adapter: the down pattern has index dtype ", in.down.crow_indices.scalar_type(),
      " but the up pattern has ", in.up.crow_indices.scalar_type(), "; use one index dtype for both");
  in.out_shape = in.down.out_shape;
  in.out_shape.back() = in.up.out_features;
  in.hidden_shape = in.down.out_shape;
  if (residual.has_value()) {
    TORCH_CHECK_TYPE(
        residual->scalar_type() == x.scalar_type(), "sparse_adapter: residual has dtype ", residual->scalar_type(),
        " but x has dtype ", x.scalar_type());
    check_device("sparse_adapter", "residual", *residual, x.device());
    TORCH_CHECK_VALUE(
        residual->sizes().vec() == in.out_shape,
        "sparse_adapter: residual must have the output's "
        "shape ",
        c10::IntArrayRef(in.out_shape), ", got ", residual->sizes());
    in.residual = residual->reshape({in.down.num_tokens, in.up.out_features}).contiguous();
  }
  return in;
}

namespace {

int64_t sum_of(const char* op, const char* name, c10::ArrayRef<int64_t> sizes, int64_t extra_per_entry) {
  int64_t total = 0;
  for (size_t k = 0; k < sizes.size(); ++k) {
    TORCH_CHECK_VALUE(sizes[k] >= 0, op, ": ", name, "[", k, "] = ", sizes[k], " must be >= 0");
    total += sizes[k] + extra_per_entry;
  }
  return total;
}

void check_length(const char* op, const char* name, const at::Tensor& t, int64_t expected, const char* what) {
  TORCH_CHECK_VALUE(t.dim() == 1, op, ": ", name, " must be 1-D, got shape ", t.sizes());
  TORCH_CHECK_VALUE(
      t.numel() == expected, op, ": ", name, " has ", t.numel(), " entries but ", what, " make ", expected);
}

// Runs `check` and puts "op: adapter k: " before the message of a ValueError or TypeError it raises.
template <typename F>
auto for_adapter(const char* op, size_t k, F&& check) {
  try {
    return check();
  } catch (const c10::ValueError& e) {
    TORCH_CHECK_VALUE(false, op, ": adapter ", k, ": ", e.what_without_backtrace());
  } catch (const c10::TypeError& e) {
    TORCH_CHECK_TYPE(false, op, ": adapter ", k, ": ", e.what_without_backtrace());
  }
}

}  // namespace

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
    c10::DeviceType device_type) {
  check_x(op, x, device_type);
  TORCH_CHECK_VALUE(
      x.dim() >= 2, op,
      ": x must have shape [rows, ..., in_features] (one adapter index per row), "
      "got shape ",
      x.sizes());
  const auto device = x.device();
  const size_t K = bottleneck.size();
  std::vector<std::string> activations;  // "relu,gelu": one name per adapter
  for (size_t start = 0; start < activation.size();) {
    const size_t end = std::min(activation.find(',', start), activation.size());
    activations.emplace_back(activation.substr(start, end - start));
    start = end + 1;
    if (end + 1 == activation.size()) {
      activations.emplace_back();  // a trailing comma: an empty name, refused below
    }
  }
  TORCH_CHECK_VALUE(
      down_nnz.size() == K && up_nnz.size() == K && activations.size() == K && scale.size() == K, op,
      ": bottleneck, down_nnz, up_nnz, activation (names separated by commas) and scale must have one "
      "entry per adapter; got ",
      bottleneck.size(), ", ", down_nnz.size(), ", ", up_nnz.size(), ", ", activations.size(), ", ", scale.size());
  TORCH_CHECK_VALUE(out_features >= 0, op, ": out_features must be >= 0, got ", out_features);

  MultiAdapterInputs in;
  in.num_rows = x.size(0);
  in.in_features = x.size(-1);
  in.out_features = out_features;
  in.num_tokens = leading_numel(x);
  in.tokens_per_row = in.num_rows > 0 ? in.num_tokens / in.num_rows : 0;
  in.out_shape = x.sizes().vec();
  in.out_shape.back() = out_features;

  // the concatenations: lengths that the per-adapter sizes add up to
  const int64_t rows_down = sum_of(op, "bottleneck", bottleneck, 0);
  const int64_t nnz_down = sum_of(op, "down_nnz", down_nnz, 0);
  const int64_t nnz_up = sum_of(op, "up_nnz", up_nnz, 0);
  const auto k = static_cast<int64_t>(K);
  check_index_tensor(op, "down_crow_indices", down_crow);
  check_index_tensor(op, "down_col_indices", down_col);
  check_index_tensor(op, "up_crow_indices", up_crow);
  check_index_tensor(op, "up_col_indices", up_col);
  check_length(op, "down_crow_indices", down_crow, rows_down + k, "the adapters' bottleneck + 1");
  check_length(op, "down_col_indices", down_col, nnz_down, "the adapters' down_nnz");
  check_length(op, "down_values", down_values, nnz_down, "the adapters' down_nnz");
  check_length(op, "up_crow_indices", up_crow, k * (out_features + 1), "the adapters' out_features + 1");
  check_length(op, "up_col_indices", up_col, nnz_up, "the adapters' up_nnz");
  check_length(op, "up_values", up_values, nnz_up, "the adapters' up_nnz");
  if (down_bias.has_value()) {
    check_length(op, "down_bias", *down_bias, rows_down, "the adapters' bottleneck");
  }
  if (up_bias.has_value()) {
    check_length(op, "up_bias", *up_bias, k * out_features, "the adapters' out_features");
  }
  int given = 0;
  for (const auto& t : transposed) {
    given += t.has_value() ? 1 : 0;
  }
  TORCH_CHECK_VALUE(
      given == 0 || given == 8, op,
      ": the transposed patterns (the backward's) are given whole or "
      "not at all; got ",
      given, " of 8");
  static const char* kTransposedNames[8] = {"down_crow_indices_t", "down_col_indices_t", "down_perm_t",
                                            "down_row_order_t",    "up_crow_indices_t",  "up_col_indices_t",
                                            "up_perm_t",           "up_row_order_t"};
  if (given == 8) {
    const int64_t lengths[8] = {
        k * (in.in_features + 1), nnz_down, nnz_down, k * in.in_features, rows_down + k, nnz_up, nnz_up, rows_down};
    for (int i = 0; i < 8; ++i) {
      check_index_tensor(op, kTransposedNames[i], *transposed[i]);
      check_length(op, kTransposedNames[i], *transposed[i], lengths[i], "the adapters' sizes");
    }
  }

  // each adapter, as sparse_adapter checks one
  const auto stand_in = at::empty({0, in.in_features}, x.options());
  int64_t d_row = 0, d_nnz = 0, u_nnz = 0;
  for (size_t a = 0; a < K; ++a) {
    const int64_t b = bottleneck[a];
    in.bottleneck_offset.push_back(d_row);
    in.down_nnz_offset.push_back(d_nnz);
    in.up_nnz_offset.push_back(u_nnz);
    const auto ai = static_cast<int64_t>(a);
    auto bias_of = [](const std::optional<at::Tensor>& bias, int64_t start, int64_t length) {
      return bias.has_value() ? std::optional<at::Tensor>(bias->narrow(0, start, length)) : std::nullopt;
    };
    in.adapters.push_back(for_adapter(op, a, [&] {
      return check_adapter_inputs(
          stand_in, std::nullopt, down_values.narrow(0, d_nnz, down_nnz[a]), bias_of(down_bias, d_row, b),
          down_crow.narrow(0, d_row + ai, b + 1), down_col.narrow(0, d_nnz, down_nnz[a]),
          up_values.narrow(0, u_nnz, up_nnz[a]), bias_of(up_bias, ai * out_features, out_features),
          up_crow.narrow(0, ai * (out_features + 1), out_features + 1), up_col.narrow(0, u_nnz, up_nnz[a]),
          activations[a], scale[a], device_type);
    }));
    if (given == 8) {
      AdapterTransposed t;
      t.down_crow_t = transposed[0]->narrow(0, ai * (in.in_features + 1), in.in_features + 1).contiguous();
      t.down_col_t = transposed[1]->narrow(0, d_nnz, down_nnz[a]).contiguous();
      t.down_perm_t = transposed[2]->narrow(0, d_nnz, down_nnz[a]).contiguous();
      t.down_row_order_t = transposed[3]->narrow(0, ai * in.in_features, in.in_features).contiguous();
      t.up_crow_t = transposed[4]->narrow(0, d_row + ai, b + 1).contiguous();
      t.up_col_t = transposed[5]->narrow(0, u_nnz, up_nnz[a]).contiguous();
      t.up_perm_t = transposed[6]->narrow(0, u_nnz, up_nnz[a]).contiguous();
      t.up_row_order_t = transposed[7]->narrow(0, d_row, b).contiguous();
      const AdapterInputs& f = in.adapters.back();
      for_adapter(op, a, [&] {
        check_transposed_pattern("down", f.down, t.down_crow_t, t.down_col_t, t.down_perm_t, t.down_row_order_t);
        check_transposed_pattern("up", f.up, t.up_crow_t, t.up_col_t, t.up_perm_t, t.up_row_order_t);
      });
      in.transposed.push_back(std::move(t));
    }
    in.max_bottleneck = std::max(in.max_bottleneck, b);
    d_row += b;
    d_nnz += down_nnz[a];
    u_nnz += up_nnz[a];
  }
  if (K == 0) {  // nothing per adapter checked the arrays' dtypes and devices
    TORCH_CHECK_TYPE(
        down_values.scalar_type() == x.scalar_type() && up_values.scalar_type() == x.scalar_type(), op,
        ": values have dtype ", down_values.scalar_type(), " / ", up_values.scalar_type(), " but x has dtype ",
        x.scalar_type());
  }

  // the adapter of each row
  check_index_tensor(op, "adapter_index", adapter_index);
  TORCH_CHECK_VALUE(
      adapter_index.device().is_cpu() || adapter_index.device() == device, op, ": adapter_index is on ",
      adapter_index.device(), "; it must be on the CPU or on x's device ", device);
  TORCH_CHECK_VALUE(
      adapter_index.numel() == in.num_rows, op, ": adapter_index has ", adapter_index.numel(), " entries but x has ",
      in.num_rows, " rows (x's first dim); give one adapter per row");
  const auto ids = adapter_index.to(at::kCPU, at::kLong).contiguous();
  const int64_t* id = ids.const_data_ptr<int64_t>();
  in.row_adapter.assign(id, id + in.num_rows);
  for (int64_t r = 0; r < in.num_rows; ++r) {
    TORCH_CHECK_VALUE(
        id[r] >= -1 && id[r] < k, op, ": adapter_index[", r, "] = ", id[r], " is out of range for ", K,
        " adapter(s) (-1 = none, 0..", k - 1, ")");
  }

  if (residual.has_value()) {
    TORCH_CHECK_TYPE(
        residual->scalar_type() == x.scalar_type(), op, ": residual has dtype ", residual->scalar_type(),
        " but x has dtype ", x.scalar_type());
    check_device(op, "residual", *residual, device);
    TORCH_CHECK_VALUE(
        residual->sizes().vec() == in.out_shape, op, ": residual must have the output's shape ",
        c10::IntArrayRef(in.out_shape), ", got ", residual->sizes());
    in.residual = residual->reshape({in.num_tokens, out_features}).contiguous();
  }
  in.x = x.reshape({in.num_tokens, in.in_features}).contiguous();
  return in;
}

namespace {

// Index of the first entry outside [0, bound), or -1. No early exit in the first pass: it vectorizes.
template <typename index_t>
int64_t first_out_of_range(const index_t* p, int64_t n, int64_t bound) {
  const auto outside = [bound](index_t v) {
    return static_cast<uint64_t>(static_cast<int64_t>(v)) >= static_cast<uint64_t>(bound);
  };
  bool bad = false;
  for (int64_t i = 0; i < n; ++i) {
    bad |= outside(p[i]);
  }
  for (int64_t i = 0; bad && i < n; ++i) {
    if (outside(p[i])) {
      return i;
    }
  }
  return -1;
}

// Index i of the first p[i] < p[i - 1], or -1.
template <typename index_t>
int64_t first_decrease(const index_t* p, int64_t n) {
  bool bad = false;
  for (int64_t i = 1; i < n; ++i) {
    bad |= p[i] < p[i - 1];
  }
  for (int64_t i = 1; bad && i < n; ++i) {
    if (p[i] < p[i - 1]) {
      return i;
    }
  }
  return -1;
}

}  // namespace

void check_pattern_bounds_cpu(
    const char* op,
    const at::Tensor& crow_indices,
    const at::Tensor& col_indices,
    int64_t num_cols,
    const char* num_cols_name) {
  const int64_t nnz = col_indices.numel();
  const int64_t n = crow_indices.numel();  // >= 1, checked with the shapes
  SA_DISPATCH_INDEX_TYPES(crow_indices.scalar_type(), "check_pattern_bounds_cpu", [&] {
    const index_t* crow = crow_indices.const_data_ptr<index_t>();
    const index_t* col = col_indices.const_data_ptr<index_t>();
    TORCH_CHECK_VALUE(crow[0] == 0, op, ": crow_indices[0] must be 0, got ", static_cast<int64_t>(crow[0]));
    TORCH_CHECK_VALUE(
        static_cast<int64_t>(crow[n - 1]) == nnz, op, ": crow_indices[-1] = ", static_cast<int64_t>(crow[n - 1]),
        " but col_indices has ", nnz, " entries; they must agree (nnz)");
    const int64_t r = first_decrease(crow, n);
    TORCH_CHECK_VALUE(
        r < 0, op, ": crow_indices must be non-decreasing, but crow_indices[", r, "] < crow_indices[", r - 1, "]");
    const int64_t e = first_out_of_range(col, nnz, num_cols);
    TORCH_CHECK_VALUE(
        e < 0, op, ": col_indices[", e, "] = ", e < 0 ? 0 : static_cast<int64_t>(col[e]), " is out of range for ",
        num_cols, " columns", num_cols_name ? " (" : "", num_cols_name ? num_cols_name : "", num_cols_name ? ")" : "");
  });
}

namespace {

// t has the shape, dtype and device of the tensor it is the gradient or saved copy of.
void check_like(const char* op, const char* name, const at::Tensor& t, c10::IntArrayRef shape, const at::Tensor& like) {
  TORCH_CHECK_TYPE(
      t.scalar_type() == like.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(), " but x has dtype ",
      like.scalar_type());
  check_device(op, name, t, like.device());
  TORCH_CHECK_VALUE(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", t.sizes());
}

}  // namespace

void check_multi_adapter_backward_tensors(
    const char* op,
    const MultiAdapterInputs& in,
    const at::Tensor& x,
    const at::Tensor& grad_out,
    const at::Tensor& hidden_pre) {
  check_like(op, "grad_out", grad_out, in.out_shape, x);
  const std::array<int64_t, 2> hidden_shape{in.num_tokens, in.max_bottleneck};
  check_like(op, "hidden_pre", hidden_pre, hidden_shape, x);
}

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
    c10::DeviceType device_type) {
  constexpr const char* op = "sparse_adapter_backward";
  AdapterBackwardInputs in;
  in.forward = check_adapter_inputs(
      x, std::nullopt, down_values, std::nullopt, down_crow, down_col, up_values, std::nullopt, up_crow, up_col,
      activation, scale, device_type);
  const AdapterInputs& f = in.forward;
  check_transposed_pattern(
      "sparse_adapter_backward (down)", f.down, down_crow_t, down_col_t, down_perm_t, down_row_order_t);
  check_transposed_pattern("sparse_adapter_backward (up)", f.up, up_crow_t, up_col_t, up_perm_t, up_row_order_t);
  check_like(op, "grad_out", grad_out, f.out_shape, x);
  check_like(op, "hidden_pre", hidden_pre, f.hidden_shape, x);
  const int64_t n = f.down.num_tokens;
  in.grad_out = grad_out.reshape({n, f.up.out_features}).contiguous();
  in.hidden_pre = hidden_pre.reshape({n, f.down.out_features}).contiguous();
  in.down_crow_t = down_crow_t.contiguous();
  in.down_col_t = down_col_t.contiguous();
  in.down_perm_t = down_perm_t.contiguous();
  in.down_row_order_t = down_row_order_t.contiguous();
  in.up_crow_t = up_crow_t.contiguous();
  in.up_col_t = up_col_t.contiguous();
  in.up_perm_t = up_perm_t.contiguous();
  in.up_row_order_t = up_row_order_t.contiguous();
  return in;
}

// ------------------------------------------------------------------------------------------------
// The pattern ops (pattern.cpp)

void check_csr_structure(
    const char* op,
    const at::Tensor& crow_indices,
    const at::Tensor& col_indices,
    int64_t num_rows,
    int64_t num_cols) {
  check_index_tensor(op, "crow_indices", crow_indices);
  check_index_tensor(op, "col_indices", col_indices);
  TORCH_CHECK_TYPE(
      crow_indices.scalar_type() == col_indices.scalar_type(), op, ": col_indices has dtype ",
      col_indices.scalar_type(), " but crow_indices has dtype ", crow_indices.scalar_type());
  TORCH_CHECK_VALUE(
      crow_indices.device() == col_indices.device(), op, ": crow_indices is on ", crow_indices.device(),
      " but col_indices is on ", col_indices.device());
  TORCH_CHECK_VALUE(
      num_rows >= 0 && num_cols >= 0, op, ": shape [", num_rows, ", ", num_cols, "] must be non-negative");
  // Compared as numel - 1 == num_rows and printed unsigned: num_rows + 1 overflows for 2^63 - 1.
  TORCH_CHECK_VALUE(
      crow_indices.numel() - 1 == num_rows, op, ": crow_indices has ", crow_indices.numel(),
      " entries but a pattern with ", num_rows, " rows needs ", static_cast<uint64_t>(num_rows) + 1);
  if (crow_indices.device().is_cpu()) {  // the same checks in one pass over raw memory
    check_pattern_bounds_cpu(op, crow_indices.contiguous(), col_indices.contiguous(), num_cols, nullptr);
    return;
  }
  const int64_t nnz = col_indices.numel();
  const auto crow = crow_indices.to(at::kLong);
  const int64_t first = crow[0].item<int64_t>();
  TORCH_CHECK_VALUE(first == 0, op, ": crow_indices[0] must be 0, got ", first);
  const int64_t last = crow[-1].item<int64_t>();
  TORCH_CHECK_VALUE(
      last == nnz, op, ": crow_indices[-1] = ", last, " but col_indices has ", nnz, " entries; they must agree (nnz)");
  if (num_rows > 0) {
    const auto decreasing = (crow.slice(0, 1) < crow.slice(0, 0, -1)).nonzero();
    TORCH_CHECK_VALUE(
        decreasing.numel() == 0, op, ": crow_indices must be non-decreasing, but crow_indices[",
        decreasing.numel() ? decreasing[0][0].item<int64_t>() + 1 : 0, "] < crow_indices[",
        decreasing.numel() ? decreasing[0][0].item<int64_t>() : 0, "]");
  }
  if (nnz > 0) {
    // Compared in int64: num_cols may exceed the range of int32 indices, and a Python-int bound
    // compared with an int32 tensor would wrap.
    const auto col = col_indices.to(at::kLong);
    const auto bad = ((col < 0) | (col >= num_cols)).nonzero();
    if (bad.numel() != 0) {
      const int64_t e = bad[0][0].item<int64_t>();
      TORCH_CHECK_VALUE(
          false, op, ": col_indices[", e, "] = ", col[e].item<int64_t>(), " is out of range for ", num_cols,
          " columns");
    }
  }
}

void check_csr_transpose_inputs(const at::Tensor& crow_indices, const at::Tensor& col_indices, int64_t num_cols) {
  constexpr const char* op = "csr_transpose";
  check_index_tensor(op, "crow_indices", crow_indices);
  check_index_tensor(op, "col_indices", col_indices);
  TORCH_CHECK_VALUE(num_cols >= 0, op, ": num_cols must be >= 0, got ", num_cols);
  TORCH_CHECK_VALUE(crow_indices.numel() >= 1, op, ": crow_indices must have num_rows + 1 >= 1 entries, got 0");
  // The full structure: it costs less than the transpose's sort and runs once per pattern.
  check_csr_structure(op, crow_indices, col_indices, crow_indices.numel() - 1, num_cols);
  // W.T has num_cols rows: its crow_indices holds num_cols + 1 entries, allocated from the caller's
  // number. The rows of W.T are the features of x, which int32 indices cannot address past 2^31 - 1.
  check_fits_index_dtype(op, crow_indices.scalar_type(), num_cols, "num_cols = ", num_cols);
  TORCH_CHECK_VALUE(num_cols < std::numeric_limits<int64_t>::max(), op, ": num_cols = ", num_cols, " is too large");
  check_allocation(
      op, "num_cols: the transposed pattern's crow_indices (num_cols + 1)", num_cols + 1, crow_indices.element_size(),
      crow_indices.device());
}

void check_csr_row_order_inputs(const at::Tensor& crow_indices) {
  check_index_tensor("csr_row_order", "crow_indices", crow_indices);
  TORCH_CHECK_VALUE(crow_indices.numel() >= 1, "csr_row_order: crow_indices must have num_rows + 1 >= 1 entries");
}

// ------------------------------------------------------------------------------------------------
// The pruning ops

namespace prune {
namespace {

at::Tensor check_score_operand(
    const at::Tensor& weight,
    const std::optional<at::Tensor>& t,
    const char* name,
    const char* meaning,
    const std::string& method) {
  TORCH_CHECK_VALUE(
      t.has_value() && t->defined(), "prune_score: method '", method, "' needs ", name, " (", meaning, "), got None");
  TORCH_CHECK_VALUE(
      t->sizes() == weight.sizes(), "prune_score: ", name, " has shape ", t->sizes(), " but weight has shape ",
      weight.sizes());
  TORCH_CHECK_TYPE(
      t->scalar_type() == weight.scalar_type(), "prune_score: ", name, " has dtype ", t->scalar_type(),
      " but weight has dtype ", weight.scalar_type());
  TORCH_CHECK_VALUE(
      t->device() == weight.device(), "prune_score: ", name, " is on ", t->device(), " but weight is on ",
      weight.device());
  return t->contiguous();
}

}  // namespace

Method parse_method(const std::string& method) {
  if (method == "magnitude") return Method::kMagnitude;
  if (method == "snip") return Method::kSnip;
  if (method == "grasp") return Method::kGrasp;
  if (method == "synflow") return Method::kSynflow;
  TORCH_CHECK_VALUE(
      false, "prune_score: unknown method '", method, "'; expected one of 'magnitude', 'snip', 'grasp', 'synflow'");
}

ScoreInputs check_score_inputs(
    const at::Tensor& weight,
    const std::optional<at::Tensor>& grad,
    const std::optional<at::Tensor>& hess_grad,
    const std::string& method,
    c10::DeviceType device_type) {
  ScoreInputs in;
  in.method = parse_method(method);
  check_value_dtype("prune_score", "weight", weight);
  check_kernel_device("prune_score", "weight", weight, device_type);
  in.weight = weight.contiguous();
  in.out_dtype = weight.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  if (in.method == Method::kSnip) {
    in.grad = check_score_operand(weight, grad, "grad", "dL/dw", method);
  } else if (in.method == Method::kSynflow) {
    in.grad = check_score_operand(weight, grad, "grad", "dR/dw of the synaptic-flow objective", method);
  } else if (in.method == Method::kGrasp) {
    in.hess_grad = check_score_operand(weight, hess_grad, "hess_grad", "the Hessian-gradient product Hg", method);
  }
  return in;
}

TopkInputs check_topk_inputs(at::TensorList scores, int64_t k, c10::DeviceType device_type) {
  TopkInputs in;
  for (size_t i = 0; i < scores.size(); ++i) {
    const auto& s = scores[i];
    TORCH_CHECK_TYPE(
        s.scalar_type() == at::kFloat || s.scalar_type() == at::kDouble, "topk_masks: scores[", i,
        "] must be float32 or float64, got ", s.scalar_type());
    TORCH_CHECK_TYPE(
        s.scalar_type() == scores[0].scalar_type(), "topk_masks: scores[", i, "] has dtype ", s.scalar_type(),
        " but scores[0] has dtype ", scores[0].scalar_type(), "; use one dtype");
    TORCH_CHECK_VALUE(
        s.device().type() == device_type, "topk_masks: scores[", i, "] is on ", s.device(), " but this kernel runs on ",
        device_type);
    TORCH_CHECK_VALUE(
        s.device() == scores[0].device(), "topk_masks: scores[", i, "] is on ", s.device(), " but scores[0] is on ",
        scores[0].device(), "; move all scores to one device");
    in.scores.push_back(s.contiguous());
    in.total += s.numel();
  }
  if (!scores.empty()) in.dtype = scores[0].scalar_type();
  TORCH_CHECK_VALUE(
      k >= 0 && k <= in.total, "topk_masks: k = ", k, " must be in [0, ", in.total, "] (the total number of scores)");
  in.k = k;
  return in;
}

void fail_nan(size_t index, int64_t count) {
  TORCH_CHECK_VALUE(
      false, "topk_masks: scores[", index, "] contains ", count,
      " NaN value(s); scores must be finite or +-inf to be ranked");
  std::abort();  // unreachable: the check above always throws
}

at::Tensor check_mask_inputs(const at::Tensor& mask, at::ScalarType index_dtype, c10::DeviceType device_type) {
  constexpr const char* op = "mask_to_csr";
  TORCH_CHECK_VALUE(mask.dim() == 2, op, ": mask must be 2-D [out_features, in_features], got shape ", mask.sizes());
  check_index_dtype(op, "index_dtype", index_dtype);
  check_kernel_device(op, "mask", mask, device_type);
  check_fits_index_dtype(op, index_dtype, std::max(mask.size(0), mask.size(1)), "shape ", mask.sizes());
  return (mask.scalar_type() == at::kBool ? mask : mask.ne(0)).contiguous();
}

void check_nnz_fits(int64_t nnz, at::ScalarType index_dtype) {
  check_fits_index_dtype("mask_to_csr", index_dtype, nnz, "nnz = ", nnz);
}

}  // namespace prune

}  // namespace sparseadapter
