// The op-level functions, written once and instantiated per back end `B` (register_cpu.cpp,
// register_cuda.cpp): check the inputs (on CPU also every index the kernel will follow), allocate the
// output, run the path chosen for the problem (path_choice.h: the back end's CSR kernel or the dense
// path of dense_path.h), restore the leading dims.
//
// A back end provides: kDevice; its CSR kernels spmm, sddmm, adapter; csr_to_dense and csr_gather;
// adapter_dense_fused (false where it has none); timer() (path_choice.h).
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <numeric>
#include <vector>

#include "dense_path.h"
#include "kernels.h"
#include "path_choice.h"
#include "validation.h"

namespace sparseadapter {

// spmm's product on the chosen path: y = x @ W.T + bias.
template <typename B>
void run_spmm(const SpmmInputs& in, at::Tensor& y) {
  const PathProblem problem{"spmm", in.x.device(), in.x.scalar_type(),
                            {in.out_features, in.in_features, in.nnz, in.bias.has_value() ? 1 : 0, 0, 0},
                            token_bucket(in.num_tokens)};
  run_chosen_path(problem, B::timer(), [&] { B::spmm(in, y); }, [&] { spmm_dense<B>(in, y); });
}

template <typename B>
at::Tensor spmm_op(
    const at::Tensor& x,
    const at::Tensor& values,
    const at::Tensor& crow_indices,
    const at::Tensor& col_indices,
    const std::optional<at::Tensor>& row_order,
    const std::optional<at::Tensor>& bias) {
  const auto in =
      check_spmm_inputs("spmm", x, values, crow_indices, col_indices, row_order, bias, B::kDevice);
  if constexpr (B::kDevice == c10::DeviceType::CPU) {
    check_pattern_bounds_cpu("spmm", in.crow_indices, in.col_indices, in.in_features, "x's last dim");
  }
  auto y = at::empty({in.num_tokens, in.out_features}, in.x.options());
  if (y.numel() > 0) {
    run_spmm<B>(in, y);
  }
  return y.view(in.out_shape);
}

template <typename B>
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
      "sparse_linear", x, values, crow_indices, col_indices, row_order, bias, B::kDevice);
  check_transposed_pattern("sparse_linear", in, crow_indices_t, col_indices_t, perm_t, row_order_t);
  if constexpr (B::kDevice == c10::DeviceType::CPU) {
    check_pattern_bounds_cpu("sparse_linear", in.crow_indices, in.col_indices, in.in_features, "x's last dim");
  }
  auto y = at::empty({in.num_tokens, in.out_features}, in.x.options());
  if (y.numel() > 0) {
    run_spmm<B>(in, y);
  }
  return y.view(in.out_shape);
}

template <typename B>
at::Tensor sddmm_op(
    const at::Tensor& grad_out,
    const at::Tensor& x,
    const at::Tensor& crow_indices,
    const at::Tensor& col_indices) {
  const auto in = check_sddmm_inputs(grad_out, x, crow_indices, col_indices, B::kDevice);
  if constexpr (B::kDevice == c10::DeviceType::CPU) {
    check_pattern_bounds_cpu("sddmm", in.crow_indices, in.col_indices, in.in_features, "x's last dim");
  }
  auto out = at::empty({in.nnz}, in.x.options());
  if (in.nnz > 0) {
    if (in.num_tokens == 0) {
      out.zero_();
    } else {
      const PathProblem problem{"sddmm", in.x.device(), in.x.scalar_type(),
                                {in.out_features, in.in_features, in.nnz, 0, 0, 0}, token_bucket(in.num_tokens)};
      run_chosen_path(problem, B::timer(), [&] { B::sddmm(in, out); }, [&] { sddmm_dense<B>(in, out); });
    }
  }
  return out;
}

template <typename B>
at::Tensor csr_to_dense_op(
    const at::Tensor& values,
    const at::Tensor& crow_indices,
    const at::Tensor& col_indices,
    c10::SymInt num_cols) {
  const auto in = check_csr_to_dense_inputs(values, crow_indices, col_indices, num_cols.guard_int(__FILE__, __LINE__),
                                            B::kDevice);
  if constexpr (B::kDevice == c10::DeviceType::CPU) {
    check_pattern_bounds_cpu("csr_to_dense", in.crow_indices, in.col_indices, in.num_cols, "num_cols");
  }
  auto dense = at::empty({in.num_rows, in.num_cols}, in.data.options());
  if (dense.numel() > 0) {
    B::csr_to_dense(in, dense);
  }
  return dense;
}

template <typename B>
at::Tensor csr_gather_op(const at::Tensor& dense, const at::Tensor& crow_indices, const at::Tensor& col_indices) {
  const auto in = check_csr_gather_inputs(dense, crow_indices, col_indices, B::kDevice);
  if constexpr (B::kDevice == c10::DeviceType::CPU) {
    check_pattern_bounds_cpu("csr_gather", in.crow_indices, in.col_indices, in.num_cols, "dense's columns");
  }
  auto out = at::empty({in.nnz}, in.data.options());
  if (in.nnz > 0) {
    B::csr_gather(in, out);
  }
  return out;
}

// The adapter as its separate steps, each one of the back end's kernels or an ATen op: spmm, the
// activation, spmm, scale, residual. The semantics the fused kernels implement in one pass, and the
// path for the problems a back end's fused kernel does not serve.
template <typename B>
void adapter_composite_kernel(const AdapterInputs& in, at::Tensor& out, at::Tensor& hidden_pre) {
  // the pre-activation goes straight into hidden_pre when the backward keeps it
  auto pre = hidden_pre.numel() > 0 ? hidden_pre
                                    : at::empty({in.down.num_tokens, in.down.out_features}, in.down.x.options());
  if (pre.numel() > 0) {
    B::spmm(in.down, pre);
  }
  const at::Tensor hidden = activate_tensor(pre, in.activation);
  if (out.numel() == 0) {
    return;
  }
  SpmmInputs up = in.up;
  up.x = hidden;
  up.num_tokens = in.down.num_tokens;
  B::spmm(up, out);
  out.mul_(in.scale);
  if (in.residual.has_value()) {
    out.add_(*in.residual);
  }
}

template <typename B>
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
                                       up_crow, up_col, activation, scale, B::kDevice);
  check_transposed_pattern("sparse_adapter (down)", in.down, down_crow_t, down_col_t, down_perm_t, down_row_order_t);
  check_transposed_pattern("sparse_adapter (up)", in.up, up_crow_t, up_col_t, up_perm_t, up_row_order_t);
  if constexpr (B::kDevice == c10::DeviceType::CPU) {
    check_pattern_bounds_cpu("sparse_adapter (down)", in.down.crow_indices, in.down.col_indices, in.down.in_features,
                             "x's last dim");
    check_pattern_bounds_cpu("sparse_adapter (up)", in.up.crow_indices, in.up.col_indices, in.up.in_features,
                             "the bottleneck width (down's rows)");
  }
  const auto options = in.down.x.options();
  auto out = at::empty({in.down.num_tokens, in.up.out_features}, options);
  auto hidden_pre = at::empty({save_hidden ? in.down.num_tokens : 0, in.down.out_features}, options);
  if (in.down.num_tokens > 0 && (out.numel() > 0 || hidden_pre.numel() > 0)) {
    const int64_t flags = static_cast<int64_t>(in.activation) * 4 + (in.residual.has_value() ? 2 : 0) + (save_hidden ? 1 : 0);
    const PathProblem problem{"sparse_adapter", in.down.x.device(), in.down.x.scalar_type(),
                              {in.down.in_features, in.down.out_features, in.up.out_features, in.down.nnz, in.up.nnz, flags},
                              token_bucket(in.down.num_tokens)};
    run_chosen_path(problem, B::timer(), [&] { B::adapter(in, out, hidden_pre); },
                    [&] { adapter_dense<B>(in, out, hidden_pre); });
  }
  return {out.view(in.out_shape), save_hidden ? hidden_pre.view(in.hidden_shape) : hidden_pre.view({0})};
}

// grad @ W for W [rows, cols] in CSR, through its transposed pattern: the back end's spmm inputs.
inline SpmmInputs transposed_product(const at::Tensor& grad, const SpmmInputs& w, const at::Tensor& crow_t,
                                     const at::Tensor& col_t, const at::Tensor& perm_t, const at::Tensor& row_order_t) {
  SpmmInputs t;
  t.x = grad;
  t.values = w.values.index_select(0, perm_t);
  t.crow_indices = crow_t;
  t.col_indices = col_t;
  t.row_order = row_order_t;
  t.num_tokens = grad.size(0);
  t.in_features = w.out_features;
  t.out_features = w.in_features;
  t.nnz = w.nnz;
  t.out_shape = {t.num_tokens, t.out_features};
  return t;
}

// The gradient of W's values from grad [tokens, rows] and x [tokens, cols]: the back end's sddmm inputs.
inline SddmmInputs sampled_product(const at::Tensor& grad, const at::Tensor& x, const SpmmInputs& w) {
  SddmmInputs s;
  s.grad_out = grad;
  s.x = x;
  s.crow_indices = w.crow_indices;
  s.col_indices = w.col_indices;
  s.num_tokens = grad.size(0);
  s.in_features = w.in_features;
  s.out_features = w.out_features;
  s.nnz = w.nnz;
  return s;
}

// The adapter's backward through the back end's CSR kernels: SDDMM for the values, SpMM through the
// transposed patterns for the bottleneck's and x's gradients. Called with tokens > 0.
template <typename B>
AdapterGradients adapter_backward_sparse(const AdapterBackwardInputs& in, std::array<bool, 5> mask) {
  const AdapterInputs& f = in.forward;
  const auto options = in.grad_out.options();
  const int64_t n = f.down.num_tokens;
  const auto g = f.scale == 1.0 ? in.grad_out : in.grad_out * f.scale;  // the kernels take no scale
  auto sddmm = [&](const at::Tensor& grad, const at::Tensor& x, const SpmmInputs& w) {
    auto out = at::zeros({w.nnz}, options);
    if (w.nnz > 0) {
      B::sddmm(sampled_product(grad, x, w), out);
    }
    return out;
  };
  auto spmm_t = [&](const at::Tensor& grad, const SpmmInputs& w, const at::Tensor& crow_t, const at::Tensor& col_t,
                    const at::Tensor& perm_t, const at::Tensor& row_order_t) {
    auto out = at::empty({n, w.in_features}, options);
    if (out.numel() > 0) {
      B::spmm(transposed_product(grad, w, crow_t, col_t, perm_t, row_order_t), out);
    }
    return out;
  };
  AdapterGradients grads;
  if (mask[3]) {
    grads.up_values = sddmm(g, activate_tensor(in.hidden_pre, f.activation).contiguous(), f.up);
  }
  if (mask[4]) {
    grads.up_bias = g.sum(0);
  }
  if (mask[0] || mask[1] || mask[2]) {
    const auto grad_hidden = spmm_t(g, f.up, in.up_crow_t, in.up_col_t, in.up_perm_t, in.up_row_order_t);
    const auto grad_pre = activation_backward(grad_hidden, in.hidden_pre, f.activation).contiguous();
    if (mask[0]) {
      grads.x = spmm_t(grad_pre, f.down, in.down_crow_t, in.down_col_t, in.down_perm_t, in.down_row_order_t);
    }
    if (mask[1]) {
      grads.down_values = sddmm(grad_pre, f.down.x, f.down);
    }
    if (mask[2]) {
      grads.down_bias = grad_pre.sum(0);
    }
  }
  return grads;
}

// sparse_linear's backward in one call: spmm through the transposed pattern for x, sddmm for the
// values (each on its chosen path), a sum for the bias. Gradients not asked for come back empty.
template <typename B>
std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_linear_backward_op(
    const at::Tensor& grad_y,
    const std::optional<at::Tensor>& x,
    const std::optional<at::Tensor>& values,
    const at::Tensor& crow_indices,
    const at::Tensor& col_indices,
    const at::Tensor& crow_indices_t,
    const at::Tensor& col_indices_t,
    const at::Tensor& perm_t,
    const at::Tensor& row_order_t,
    std::array<bool, 3> output_mask) {
  constexpr const char* op = "sparse_linear_backward";
  auto none = [&] { return at::empty({0}, grad_y.options()); };
  at::Tensor grad_x = none(), grad_values = none(), grad_bias = none();
  if (output_mask[0]) {
    TORCH_CHECK_VALUE(values.has_value(), op, ": x's gradient needs values");
    check_index_tensor(op, "perm_t", perm_t);
    TORCH_CHECK_VALUE(perm_t.numel() == values->numel(), op, ": perm_t has ", perm_t.numel(),
                      " entries but values has ", values->numel());
    grad_x = spmm_op<B>(grad_y, values->index_select(0, perm_t), crow_indices_t, col_indices_t, row_order_t,
                        std::nullopt);
  }
  if (output_mask[1]) {
    TORCH_CHECK_VALUE(x.has_value(), op, ": the values' gradient needs x");
    grad_values = sddmm_op<B>(grad_y, *x, crow_indices, col_indices);
  }
  if (output_mask[2]) {
    TORCH_CHECK_VALUE(grad_y.dim() >= 1, op, ": grad_y must have shape [..., out_features]");
    std::vector<int64_t> leading(grad_y.dim() - 1);
    std::iota(leading.begin(), leading.end(), 0);
    grad_bias = leading.empty() ? grad_y.clone() : grad_y.sum(leading);
  }
  return {grad_x, grad_values, grad_bias};
}

// sparse_adapter's backward in one call, on the path chosen for it (CSR kernels or dense products).
template <typename B>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> sparse_adapter_backward_op(
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
    std::array<bool, 5> output_mask) {
  const auto in = check_adapter_backward_inputs(
      grad_out, x, hidden_pre, down_values, down_crow, down_col, down_crow_t, down_col_t, down_perm_t,
      down_row_order_t, up_values, up_crow, up_col, up_crow_t, up_col_t, up_perm_t, up_row_order_t, activation,
      scale, B::kDevice);
  const AdapterInputs& f = in.forward;
  if constexpr (B::kDevice == c10::DeviceType::CPU) {
    const char* op = "sparse_adapter_backward";
    check_pattern_bounds_cpu(op, f.down.crow_indices, f.down.col_indices, f.down.in_features, "x's last dim");
    check_pattern_bounds_cpu(op, f.up.crow_indices, f.up.col_indices, f.up.in_features, "the bottleneck width");
    check_pattern_bounds_cpu(op, in.down_crow_t, in.down_col_t, f.down.out_features, "the bottleneck width");
    check_pattern_bounds_cpu(op, in.up_crow_t, in.up_col_t, f.up.out_features, "out's last dim");
  }
  AdapterGradients grads;
  if (f.down.num_tokens == 0) {  // nothing to sum: zero gradients
    const auto options = in.grad_out.options();
    grads = {at::empty({0, f.down.in_features}, options), at::zeros({f.down.nnz}, options),
             at::zeros({f.down.out_features}, options), at::zeros({f.up.nnz}, options),
             at::zeros({f.up.out_features}, options)};
  } else {
    int64_t flags = static_cast<int64_t>(f.activation);
    for (bool m : output_mask) {
      flags = flags * 2 + (m ? 1 : 0);
    }
    const PathProblem problem{"sparse_adapter_backward", f.down.x.device(), f.down.x.scalar_type(),
                              {f.down.in_features, f.down.out_features, f.up.out_features, f.down.nnz, f.up.nnz, flags},
                              token_bucket(f.down.num_tokens)};
    run_chosen_path(problem, B::timer(), [&] { grads = adapter_backward_sparse<B>(in, output_mask); },
                    [&] { grads = adapter_backward_dense<B>(in, output_mask); });
  }
  auto none = [&] { return at::empty({0}, in.grad_out.options()); };
  auto pick = [&](int i, const at::Tensor& t) { return output_mask[i] && t.defined() ? t : none(); };
  const auto grad_x = output_mask[0] ? grads.x.view(x.sizes()) : none();
  return {grad_x, pick(1, grads.down_values), pick(2, grads.down_bias), pick(3, grads.up_values),
          pick(4, grads.up_bias)};
}

}  // namespace sparseadapter
