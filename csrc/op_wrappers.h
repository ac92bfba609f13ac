// The op-level functions, written once and instantiated per back end: check the inputs (on CPU also
// every index the kernel will follow), allocate the output, call the back end's kernel, restore the
// leading dims.
#pragma once

#include <ATen/ATen.h>

#include "kernels.h"
#include "validation.h"

namespace sparseadapter {

using SpmmKernel = void (*)(const SpmmInputs&, at::Tensor&);
using SddmmKernel = void (*)(const SddmmInputs&, at::Tensor&);

template <c10::DeviceType kDevice, SpmmKernel kKernel>
at::Tensor spmm_op(
    const at::Tensor& x,
    const at::Tensor& values,
    const at::Tensor& crow_indices,
    const at::Tensor& col_indices,
    const std::optional<at::Tensor>& row_order,
    const std::optional<at::Tensor>& bias) {
  const auto in =
      check_spmm_inputs("spmm", x, values, crow_indices, col_indices, row_order, bias, kDevice);
  if constexpr (kDevice == c10::DeviceType::CPU) {
    check_pattern_bounds_cpu("spmm", in.crow_indices, in.col_indices, in.in_features, "x's last dim");
  }
  auto y = at::empty({in.num_tokens, in.out_features}, in.x.options());
  if (y.numel() > 0) {
    kKernel(in, y);
  }
  return y.view(in.out_shape);
}

template <c10::DeviceType kDevice, SpmmKernel kKernel>
at::Tensor sparse_linear_op(
    const at::Tensor& x,
    const at::Tensor& values,
    const std::optional<at::Tensor>& bias,
    const at::Tensor& crow_indices,
    const at::Tensor& col_indices,
    const at::Tensor& row_order,
    const at::Tensor& crow_indices_t,
    const at::Tensor& col_indices_t,
    const at::Tensor& perm_t,
    const at::Tensor& row_order_t) {
  const auto in = check_spmm_inputs(
      "sparse_linear", x, values, crow_indices, col_indices, row_order, bias, kDevice);
  check_transposed_pattern("sparse_linear", in, crow_indices_t, col_indices_t, perm_t, row_order_t);
  if constexpr (kDevice == c10::DeviceType::CPU) {
    check_pattern_bounds_cpu("sparse_linear", in.crow_indices, in.col_indices, in.in_features, "x's last dim");
  }
  auto y = at::empty({in.num_tokens, in.out_features}, in.x.options());
  if (y.numel() > 0) {
    kKernel(in, y);
  }
  return y.view(in.out_shape);
}

template <c10::DeviceType kDevice, SddmmKernel kKernel>
at::Tensor sddmm_op(
    const at::Tensor& grad_out,
    const at::Tensor& x,
    const at::Tensor& crow_indices,
    const at::Tensor& col_indices) {
  const auto in = check_sddmm_inputs(grad_out, x, crow_indices, col_indices, kDevice);
  if constexpr (kDevice == c10::DeviceType::CPU) {
    check_pattern_bounds_cpu("sddmm", in.crow_indices, in.col_indices, in.in_features, "x's last dim");
  }
  auto out = at::empty({in.nnz}, in.x.options());
  if (in.nnz > 0) {
    if (in.num_tokens == 0) {
      out.zero_();
    } else {
      kKernel(in, out);
    }
  }
  return out;
}

using AdapterKernel = void (*)(const AdapterInputs&, at::Tensor&, at::Tensor&);

// The adapter as its separate steps, each one of the back end's kernels or an ATen op: spmm, the
// activation, spmm, scale, residual. The semantics the fused kernels implement in one pass, and the
// path of back ends that have no fused kernel yet (CUDA).
template <SpmmKernel kSpmm>
void adapter_composite_kernel(const AdapterInputs& in, at::Tensor& out, at::Tensor& hidden_pre) {
  // the pre-activation goes straight into hidden_pre when the backward keeps it
  auto pre = hidden_pre.numel() > 0 ? hidden_pre
                                    : at::empty({in.down.num_tokens, in.down.out_features}, in.down.x.options());
  if (pre.numel() > 0) {
    kSpmm(in.down, pre);
  }
  at::Tensor hidden = pre;
  switch (in.activation) {
    case Activation::kIdentity: break;
    case Activation::kRelu: hidden = at::relu(pre); break;
    case Activation::kGelu: hidden = at::gelu(pre); break;
    case Activation::kSilu: hidden = at::silu(pre); break;
    case Activation::kTanh: hidden = at::tanh(pre); break;
  }
  if (out.numel() == 0) {
    return;
  }
  SpmmInputs up = in.up;
  up.x = hidden;
  up.num_tokens = in.down.num_tokens;
  kSpmm(up, out);
  out.mul_(in.scale);
  if (in.residual.has_value()) {
    out.add_(*in.residual);
  }
}

template <c10::DeviceType kDevice, AdapterKernel kKernel>
std::tuple<at::Tensor, at::Tensor> sparse_adapter_op(
    const at::Tensor& x,
    const std::optional<at::Tensor>& residual,
    const at::Tensor& down_values,
    const std::optional<at::Tensor>& down_bias,
    const at::Tensor& down_crow,
    const at::Tensor& down_col,
    const at::Tensor& down_crow_t,
    const at::Tensor& down_col_t,
    const at::Tensor& down_perm_t,
    const at::Tensor& down_row_order_t,
    const at::Tensor& up_values,
    const std::optional<at::Tensor>& up_bias,
    const at::Tensor& up_crow,
    const at::Tensor& up_col,
    const at::Tensor& up_crow_t,
    const at::Tensor& up_col_t,
    const at::Tensor& up_perm_t,
    const at::Tensor& up_row_order_t,
    c10::string_view activation,
    double scale,
    bool save_hidden) {
  const auto in = check_adapter_inputs(x, residual, down_values, down_bias, down_crow, down_col, up_values, up_bias,
                                       up_crow, up_col, activation, scale, kDevice);
  check_transposed_pattern("sparse_adapter (down)", in.down, down_crow_t, down_col_t, down_perm_t, down_row_order_t);
  check_transposed_pattern("sparse_adapter (up)", in.up, up_crow_t, up_col_t, up_perm_t, up_row_order_t);
  if constexpr (kDevice == c10::DeviceType::CPU) {
    check_pattern_bounds_cpu("sparse_adapter (down)", in.down.crow_indices, in.down.col_indices, in.down.in_features,
                             "x's last dim");
    check_pattern_bounds_cpu("sparse_adapter (up)", in.up.crow_indices, in.up.col_indices, in.up.in_features,
                             "the bottleneck width (down's rows)");
  }
  const auto options = in.down.x.options();
  auto out = at::empty({in.down.num_tokens, in.up.out_features}, options);
  auto hidden_pre = at::empty({save_hidden ? in.down.num_tokens : 0, in.down.out_features}, options);
  if (in.down.num_tokens > 0 && (out.numel() > 0 || hidden_pre.numel() > 0)) {
    kKernel(in, out, hidden_pre);
  }
  return {out.view(in.out_shape), save_hidden ? hidden_pre.view(in.hidden_shape) : hidden_pre.view({0})};
}

}  // namespace sparseadapter
