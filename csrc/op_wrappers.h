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
  check_transposed_pattern(in, crow_indices_t, col_indices_t, perm_t, row_order_t);
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

}  // namespace sparseadapter
