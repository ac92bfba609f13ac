// The op-level functions, written once and instantiated per back end `B` (register_cpu.cpp,
// register_cuda.cpp): check the inputs (on CPU also every index the kernel will follow, once per
// unchanged pattern: check_pattern_bounds_cpu_once), allocate the output, run the path chosen for the
// problem (path_choice.h: the back end's CSR kernel or the dense path of dense_path.h), restore the
// leading dims.
//
// A back end provides: kDevice; its CSR kernels spmm, sddmm, adapter; csr_to_dense and csr_gather;
// adapter_dense_fused (false where it has none); timer() (path_choice.h).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <array>
#include <numeric>
#include <string>
#include <utility>
#include <vector>

#include "dense_path.h"
#include "kernels.h"
#include "path_choice.h"
#include "validation.h"

namespace sparseadapter {

// spmm's product on the chosen path: y = x @ W.T + bias.
inline PathProblem spmm_problem(const SpmmInputs& in) {
  return PathProblem{
      "spmm",
      in.x.device(),
      in.x.scalar_type(),
      {in.out_features, in.in_features, in.nnz, in.bias.has_value() ? 1 : 0, 0, 0},
      token_bucket(in.num_tokens)};
}

template <typename B>
void run_spmm(const SpmmInputs& in, at::Tensor& y) {
  run_chosen_path(spmm_problem(in), B::timer(), [&] { B::spmm(in, y); }, [&] { spmm_dense<B>(in, y); });
}

// sparse_linear's grad_x = grad_y @ W, on the path chosen for spmm through the transposed pattern:
// there the CSR kernel with the values permuted to that pattern's order, while the dense path
// expands W from the forward pattern (no permutation, and the same row-major product as dense
// autograd's) instead of expanding W.T. `weight`, when defined, is W as the forward expanded it
// (sparse_linear_forward): the dense path multiplies by it without expanding again, a problem of
// its own for the path choice (dims[4] = 1), since that path then costs the product alone.
template <typename B>
at::Tensor linear_grad_x(
    const char* op,
    const at::Tensor& grad_y,
    const at::Tensor& values,
    const at::Tensor& crow_indices,
    const at::Tensor& col_indices,
    const at::Tensor& crow_indices_t,
    const at::Tensor& col_indices_t,
    const at::Tensor& perm_t,
    const at::Tensor& row_order_t,
    const at::Tensor& weight) {
  auto t = check_spmm_inputs(op, grad_y, values, crow_indices_t, col_indices_t, row_order_t, std::nullopt, B::kDevice);
  check_linear_grad_x_patterns(op, t, perm_t, crow_indices, col_indices);
  if (weight.defined()) {
    check_expanded_weight(op, weight, t);
  }
  if constexpr (B::kDevice == c10::DeviceType::CPU) {
    check_pattern_bounds_cpu_once(op, t.crow_indices, t.col_indices, t.in_features, "grad_y's last dim");
    check_pattern_bounds_cpu_once(op, crow_indices, col_indices, t.out_features, "the transposed pattern's rows");
  }
  auto grad_x = at::empty({t.num_tokens, t.out_features}, t.x.options());
  if (grad_x.numel() > 0) {
    auto sparse = [&] {
      SpmmInputs permuted = t;
      permuted.values = t.values.index_select(0, perm_t);
      B::spmm(permuted, grad_x);
    };
    auto dense = [&] {
      if (weight.defined()) {
        at::mm_out(grad_x, t.x, weight);
        return;
      }
      SpmmInputs w;  // the forward product's weight: [grad_y's width, grad_x's width]
      w.values = t.values;
      w.crow_indices = crow_indices.contiguous();
      w.col_indices = col_indices.contiguous();
      w.out_features = t.in_features;
      w.in_features = t.out_features;
      w.nnz = t.nnz;
      at::mm_out(grad_x, t.x, expand_weight<B>(w));
    };
    auto problem = spmm_problem(t);
    problem.dims[4] = weight.defined() ? 1 : 0;
    run_chosen_path(problem, B::timer(), sparse, dense);
  }
  return grad_x.view(t.out_shape);
}

template <typename B>
at::Tensor spmm_op(
    const at::Tensor& x,
    const at::Tensor& values,
    const at::Tensor& crow_indices,
    const at::Tensor& col_indices,
    const std::optional<at::Tensor>& row_order,
    const std::optional<at::Tensor>& bias) {
  const auto in = check_spmm_inputs("spmm", x, values, crow_indices, col_indices, row_order, bias, B::kDevice);
  if constexpr (B::kDevice == c10::DeviceType::CPU) {
    check_pattern_bounds_cpu_once("spmm", in.crow_indices, in.col_indices, in.in_features, "x's last dim");
  }
  auto y = at::empty({in.num_tokens, in.out_features}, in.x.options());
  if (y.numel() > 0) {
    run_spmm<B>(in, y);
  }
  return y.view(in.out_shape);
}

// sparse_linear's forward: y, and when keep_weight and the dense path ran, W as it expanded it (else
// an undefined tensor).
template <typename B>
std::tuple<at::Tensor, at::Tensor> linear_forward(
    const char* op,
    const at::Tensor& x,
    const at::Tensor& values,
    const std::optional<at::Tensor>& bias,
    const at::Tensor& crow_indices,
    const at::Tensor& col_indices,
    const at::Tensor& row_order,
    const at::Tensor& crow_indices_t,
    const at::Tensor& col_indices_t,
    const at::Tensor& perm_t,
    const at::Tensor& row_order_t,
    bool keep_weight) {
  const auto in = check_spmm_inputs(op, x, values, crow_indices, col_indices, row_order, bias, B::kDevice);
  check_transposed_pattern(op, in, crow_indices_t, col_indices_t, perm_t, row_order_t);
  if constexpr (B::kDevice == c10::DeviceType::CPU) {
    check_pattern_bounds_cpu_once(op, in.crow_indices, in.col_indices, in.in_features, "x's last dim");
  }
  auto y = at::empty({in.num_tokens, in.out_features}, in.x.options());
  at::Tensor weight;
  if (y.numel() > 0) {
    // the problem of run_spmm: one measurement serves both ops
    const Path path = run_chosen_path(
        spmm_problem(in), B::timer(), [&] { B::spmm(in, y); },
        [&] { spmm_dense<B>(in, y, keep_weight ? &weight : nullptr); });
    if (path != Path::kDense || !keep_weight) {
      weight.reset();  // a timing run of the dense path may have left one
    }
  }
  return {y.view(in.out_shape), weight};
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
  return std::get<0>(linear_forward<B>(
      "sparse_linear", x, values, bias, crow_indices, col_indices, row_order, crow_indices_t, col_indices_t, perm_t,
      row_order_t, false));
}

// sparse_linear_forward: the eager training forward, which keeps W's expansion for grad_x. The
// weight comes back as an empty tensor when none was kept. Its errors name sparse_linear, the op
// the caller's layer computes.
template <typename B>
std::tuple<at::Tensor, at::Tensor> sparse_linear_forward_op(
    const at::Tensor& x,
    const at::Tensor& values,
    const std::optional<at::Tensor>& bias,
    const at::Tensor& crow_indices,
    const at::Tensor& col_indices,
    const at::Tensor& row_order,
    const at::Tensor& crow_indices_t,
    const at::Tensor& col_indices_t,
    const at::Tensor& perm_t,
    const at::Tensor& row_order_t,
    bool keep_weight) {
  auto [y, weight] = linear_forward<B>(
      "sparse_linear", x, values, bias, crow_indices, col_indices, row_order, crow_indices_t, col_indices_t, perm_t,
      row_order_t, keep_weight);
  return {y, weight.defined() ? weight : at::empty({0}, y.options())};
}

template <typename B>
at::Tensor sddmm_op(
    const at::Tensor& grad_out,
    const at::Tensor& x,
    const at::Tensor& crow_indices,
    const at::Tensor& col_indices) {
  const auto in = check_sddmm_inputs(grad_out, x, crow_indices, col_indices, B::kDevice);
  if constexpr (B::kDevice == c10::DeviceType::CPU) {
    check_pattern_bounds_cpu_once("sddmm", in.crow_indices, in.col_indices, in.in_features, "x's last dim");
  }
  auto out = at::empty({in.nnz}, in.x.options());
  if (in.nnz > 0) {
    if (in.num_tokens == 0) {
      out.zero_();
    } else {
      const PathProblem problem{
          "sddmm",
          in.x.device(),
          in.x.scalar_type(),
          {in.out_features, in.in_features, in.nnz, 0, 0, 0},
          token_bucket(in.num_tokens)};
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
  const auto in =
      check_csr_to_dense_inputs(values, crow_indices, col_indices, num_cols.guard_int(__FILE__, __LINE__), B::kDevice);
  if constexpr (B::kDevice == c10::DeviceType::CPU) {
    check_pattern_bounds_cpu_once("csr_to_dense", in.crow_indices, in.col_indices, in.num_cols, "num_cols");
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
    check_pattern_bounds_cpu_once("csr_gather", in.crow_indices, in.col_indices, in.num_cols, "dense's columns");
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
  auto pre =
      hidden_pre.numel() > 0 ? hidden_pre : at::empty({in.down.num_tokens, in.down.out_features}, in.down.x.options());
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

// One adapter on the path chosen for its problem: out [tokens, out] and, when save_hidden, hidden_pre
// [tokens, bottleneck], both contiguous and allocated by the caller.
template <typename B>
void run_adapter(const AdapterInputs& in, at::Tensor& out, at::Tensor& hidden_pre, bool save_hidden) {
  if (in.down.num_tokens > 0 && (out.numel() > 0 || hidden_pre.numel() > 0)) {
    const int64_t flags =
        static_cast<int64_t>(in.activation) * 4 + (in.residual.has_value() ? 2 : 0) + (save_hidden ? 1 : 0);
    const PathProblem problem{
        "sparse_adapter",
        in.down.x.device(),
        in.down.x.scalar_type(),
        {in.down.in_features, in.down.out_features, in.up.out_features, in.down.nnz, in.up.nnz, flags},
        token_bucket(in.down.num_tokens)};
    run_chosen_path(
        problem, B::timer(), [&] { B::adapter(in, out, hidden_pre); }, [&] { adapter_dense<B>(in, out, hidden_pre); });
  }
}

// The forward of checked adapter inputs: on CPU the bounds of both patterns (once per unchanged
// pattern), then out and, when save_hidden, hidden_pre (else an empty tensor), on the chosen path.
template <typename B>
std::tuple<at::Tensor, at::Tensor> adapter_forward(const AdapterInputs& in, bool save_hidden) {
  if constexpr (B::kDevice == c10::DeviceType::CPU) {
    check_pattern_bounds_cpu_once(
        "sparse_adapter (down)", in.down.crow_indices, in.down.col_indices, in.down.in_features, "x's last dim");
    check_pattern_bounds_cpu_once(
        "sparse_adapter (up)", in.up.crow_indices, in.up.col_indices, in.up.in_features,
        "the bottleneck width (down's rows)");
  }
  const auto options = in.down.x.options();
  auto out = at::empty({in.down.num_tokens, in.up.out_features}, options);
  auto hidden_pre = at::empty({save_hidden ? in.down.num_tokens : 0, in.down.out_features}, options);
  run_adapter<B>(in, out, hidden_pre, save_hidden);
  return {out.view(in.out_shape), save_hidden ? hidden_pre.view(in.hidden_shape) : hidden_pre.view({0})};
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
  const auto in = check_adapter_inputs(
      x, residual, down_values, down_bias, down_crow, down_col, up_values, up_bias, up_crow, up_col, activation, scale,
      B::kDevice);
  check_transposed_pattern("sparse_adapter (down)", in.down, down_crow_t, down_col_t, down_perm_t, down_row_order_t);
  check_transposed_pattern("sparse_adapter (up)", in.up, up_crow_t, up_col_t, up_perm_t, up_row_order_t);
  return adapter_forward<B>(in, save_hidden);
}

// sparse_adapter's inference form: the forward tensors only, out alone. The same checks of those
// tensors and the same path as sparse_adapter with save_hidden false.
template <typename B>
at::Tensor sparse_adapter_infer_op(
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
    double scale) {
  const auto in = check_adapter_inputs(
      x, residual, down_values, down_bias, down_crow, down_col, up_values, up_bias, up_crow, up_col, activation, scale,
      B::kDevice);
  return std::get<0>(adapter_forward<B>(in, false));
}

// grad @ W for W [rows, cols] in CSR, through its transposed pattern: the back end's spmm inputs.
inline SpmmInputs transposed_product(
    const at::Tensor& grad,
    const SpmmInputs& w,
    const at::Tensor& crow_t,
    const at::Tensor& col_t,
    const at::Tensor& perm_t,
    const at::Tensor& row_order_t) {
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

// sparse_linear's backward in one call: spmm through the transposed pattern for x (or the product with
// the forward's expanded weight, when given and not empty), sddmm for the values (each on its chosen
// path), a sum for the bias. Gradients not asked for come back empty.
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
    std::array<bool, 3> output_mask,
    const std::optional<at::Tensor>& weight) {
  constexpr const char* op = "sparse_linear_backward";
  auto none = [&] { return at::empty({0}, grad_y.options()); };
  at::Tensor grad_x = none(), grad_values = none(), grad_bias = none();
  if (output_mask[0]) {
    TORCH_CHECK_VALUE(values.has_value(), op, ": x's gradient needs values");
    grad_x = linear_grad_x<B>(
        op, grad_y, *values, crow_indices, col_indices, crow_indices_t, col_indices_t, perm_t, row_order_t,
        weight.has_value() && weight->numel() > 0 ? *weight : at::Tensor());
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

// One adapter's backward on the path chosen for its problem (zero gradients when it has no tokens).
template <typename B>
AdapterGradients run_adapter_backward(const AdapterBackwardInputs& in, std::array<bool, 5> output_mask) {
  const AdapterInputs& f = in.forward;
  AdapterGradients grads;
  if (f.down.num_tokens == 0) {  // nothing to sum: zero gradients
    const auto options = in.grad_out.options();
    grads = {
        at::empty({0, f.down.in_features}, options), at::zeros({f.down.nnz}, options),
        at::zeros({f.down.out_features}, options), at::zeros({f.up.nnz}, options),
        at::zeros({f.up.out_features}, options)};
  } else {
    int64_t flags = static_cast<int64_t>(f.activation);
    for (bool m : output_mask) {
      flags = flags * 2 + (m ? 1 : 0);
    }
    const PathProblem problem{
        "sparse_adapter_backward",
        f.down.x.device(),
        f.down.x.scalar_type(),
        {f.down.in_features, f.down.out_features, f.up.out_features, f.down.nnz, f.up.nnz, flags},
        token_bucket(f.down.num_tokens)};
    run_chosen_path(
        problem, B::timer(), [&] { grads = adapter_backward_sparse<B>(in, output_mask); },
        [&] { grads = adapter_backward_dense<B>(in, output_mask); });
  }
  return grads;
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
      grad_out, x, hidden_pre, down_values, down_crow, down_col, down_crow_t, down_col_t, down_perm_t, down_row_order_t,
      up_values, up_crow, up_col, up_crow_t, up_col_t, up_perm_t, up_row_order_t, activation, scale, B::kDevice);
  const AdapterInputs& f = in.forward;
  if constexpr (B::kDevice == c10::DeviceType::CPU) {
    const char* op = "sparse_adapter_backward";
    check_pattern_bounds_cpu_once(op, f.down.crow_indices, f.down.col_indices, f.down.in_features, "x's last dim");
    check_pattern_bounds_cpu_once(op, f.up.crow_indices, f.up.col_indices, f.up.in_features, "the bottleneck width");
    check_pattern_bounds_cpu_once(op, in.down_crow_t, in.down_col_t, f.down.out_features, "the bottleneck width");
    check_pattern_bounds_cpu_once(op, in.up_crow_t, in.up_col_t, f.up.out_features, "out's last dim");
  }
  AdapterGradients grads = run_adapter_backward<B>(in, output_mask);
  auto none = [&] { return at::empty({0}, in.grad_out.options()); };
  auto pick = [&](int i, const at::Tensor& t) { return output_mask[i] && t.defined() ? t : none(); };
  const auto grad_x = output_mask[0] ? grads.x.view(x.sizes()) : none();
  return {
      grad_x, pick(1, grads.down_values), pick(2, grads.down_bias), pick(3, grads.up_values), pick(4, grads.up_bias)};
}

// -- several adapters in one batch: sparse_adapter_multi ------------------------------------------------
//
// Rows are grouped by adapter (stable: each adapter's rows keep their order), and each group runs the
// adapter's own kernels (run_adapter / run_adapter_backward: the path chosen for its problem) on its
// tokens as one contiguous block: a slice of x when every group's rows are consecutive (no copy);
// else, with rows of kMultiDirectRowTokens tokens or more, the forward runs each run of consecutive
// rows of one adapter on its slices (no copy either), and with shorter rows it gathers all rows into
// adapter order once and scatters the output back once (the backward gathers and scatters per group). Rows of adapter
// -1 get the residual (or zeros). So a mixed batch computes, row by row, what each adapter computes alone.

struct RowSegment {
  int64_t adapter = -1;  // -1: the rows without an adapter
  int64_t first_row = 0;
  int64_t num_rows = 0;
  bool consecutive = true;    // the rows are first_row .. first_row + num_rows - 1: a slice
  at::Tensor index;           // the rows (int64, on x's device) when not consecutive
  int64_t hidden_offset = 0;  // where the segment's [tokens, bottleneck] block starts in hidden_pre
};

// The segments of adapters 0..K-1 that have rows, in that order, then the rows without an adapter.
// hidden_pre's layout: the segments' blocks one after another, each starting at a multiple of the
// widest bottleneck (hidden_pre is [tokens, max_bottleneck], a block of adapter k is [tokens_k, b_k]).
inline std::vector<RowSegment> group_rows(const MultiAdapterInputs& in, const c10::Device& device) {
  const auto K = static_cast<int64_t>(in.adapters.size());
  std::vector<std::vector<int64_t>> rows(K + 1);
  for (int64_t r = 0; r < in.num_rows; ++r) {
    const int64_t a = in.row_adapter[r];
    rows[a < 0 ? K : a].push_back(r);
  }
  std::vector<RowSegment> segments;
  int64_t tokens_before = 0;
  for (int64_t a = 0; a <= K; ++a) {
    const auto& list = rows[a];
    if (list.empty()) {
      continue;
    }
    RowSegment seg;
    seg.adapter = a == K ? -1 : a;
    seg.first_row = list.front();
    seg.num_rows = static_cast<int64_t>(list.size());
    seg.consecutive = list.back() - list.front() + 1 == seg.num_rows;
    if (!seg.consecutive) {
      seg.index = at::tensor(c10::ArrayRef<int64_t>(list), at::TensorOptions().dtype(at::kLong)).to(device);
    }
    seg.hidden_offset = tokens_before * in.max_bottleneck;
    tokens_before += seg.num_rows * in.tokens_per_row;
    segments.push_back(std::move(seg));
  }
  return segments;
}

// The rows in the order group_rows visits them: adapter 0's first (each adapter's in their order),
// the rows without an adapter last.
inline std::vector<int64_t> adapter_order(const MultiAdapterInputs& in) {
  const auto K = static_cast<int64_t>(in.adapters.size());
  std::vector<std::vector<int64_t>> rows(K + 1);
  for (int64_t r = 0; r < in.num_rows; ++r) {
    const int64_t a = in.row_adapter[r];
    rows[a < 0 ? K : a].push_back(r);
  }
  std::vector<int64_t> order;
  order.reserve(in.num_rows);
  for (const auto& list : rows) {
    order.insert(order.end(), list.begin(), list.end());
  }
  return order;
}

// Rows of at least this many tokens run the forward in place, one run of consecutive rows at a time
// (row_runs); shorter ones (decoding: one token per row) are gathered, where a kernel call per run
// would cost more than the copy.
constexpr int64_t kMultiDirectRowTokens = 16;

// group_rows's segments split into runs of consecutive rows, each a slice (consecutive), in the same
// order, each with its part of its segment's hidden_pre block.
inline std::vector<RowSegment> row_runs(const MultiAdapterInputs& in) {
  const auto K = static_cast<int64_t>(in.adapters.size());
  std::vector<std::vector<std::pair<int64_t, int64_t>>> runs(K + 1);  // (first row, rows) per adapter
  for (int64_t r = 0; r < in.num_rows; ++r) {
    const int64_t a = in.row_adapter[r] < 0 ? K : in.row_adapter[r];
    auto& list = runs[a];
    if (!list.empty() && list.back().first + list.back().second == r) {
      ++list.back().second;
    } else {
      list.emplace_back(r, 1);
    }
  }
  std::vector<RowSegment> out;
  int64_t tokens_before = 0;
  for (int64_t a = 0; a <= K; ++a) {
    const int64_t width = a < K ? in.adapters[a].down.out_features : 0;
    int64_t in_segment = 0;  // tokens of this adapter's earlier runs
    for (const auto& [first, count] : runs[a]) {
      RowSegment run;
      run.adapter = a == K ? -1 : a;
      run.first_row = first;
      run.num_rows = count;
      run.hidden_offset = tokens_before * in.max_bottleneck + in_segment * width;
      in_segment += count * in.tokens_per_row;
      out.push_back(std::move(run));
    }
    tokens_before += in_segment;
  }
  return out;
}

// The segment's tokens of t [num_tokens, features]: a slice, or its rows gathered (contiguous).
inline at::Tensor segment_rows(const at::Tensor& t, const RowSegment& seg, const MultiAdapterInputs& in) {
  const int64_t features = t.size(1), tokens_per_row = in.tokens_per_row;
  if (seg.consecutive) {
    return t.narrow(0, seg.first_row * tokens_per_row, seg.num_rows * tokens_per_row);
  }
  return t.view({in.num_rows, tokens_per_row * features})
      .index_select(0, seg.index)
      .view({seg.num_rows * tokens_per_row, features});
}

// Writes `values` (the segment's tokens) into t's rows of the segment; nothing when `values` is
// already that slice of t.
inline void
put_segment_rows(at::Tensor& t, const RowSegment& seg, const MultiAdapterInputs& in, const at::Tensor& values) {
  const int64_t features = t.size(1), tokens_per_row = in.tokens_per_row;
  if (seg.consecutive) {
    auto slice = t.narrow(0, seg.first_row * tokens_per_row, seg.num_rows * tokens_per_row);
    if (!(slice.data_ptr() == values.data_ptr() && slice.sizes() == values.sizes())) {
      slice.copy_(values);
    }
    return;
  }
  t.view({in.num_rows, tokens_per_row * features})
      .index_copy_(0, seg.index, values.reshape({seg.num_rows, tokens_per_row * features}));
}

// Adapter k's inputs for one segment: its checked arrays, with the segment's x and residual.
inline AdapterInputs segment_inputs(
    const MultiAdapterInputs& in,
    const RowSegment& seg,
    const at::Tensor& x,
    const std::optional<at::Tensor>& residual) {
  AdapterInputs a = in.adapters[seg.adapter];
  const int64_t n = seg.num_rows * in.tokens_per_row;
  a.down.x = x;
  a.down.num_tokens = n;
  a.down.out_shape = {n, a.down.out_features};
  a.up.num_tokens = 0;
  a.residual = residual;
  a.out_shape = {n, a.up.out_features};
  a.hidden_shape = {n, a.down.out_features};
  return a;
}

// The segment's block of hidden_pre: [tokens, bottleneck] of adapter k, contiguous.
inline at::Tensor segment_hidden(const at::Tensor& hidden_pre, const MultiAdapterInputs& in, const RowSegment& seg) {
  const int64_t n = seg.num_rows * in.tokens_per_row;
  const int64_t b = in.adapters[seg.adapter].down.out_features;
  return hidden_pre.reshape({hidden_pre.numel()}).narrow(0, seg.hidden_offset, n * b).view({n, b});
}

// Once per unchanged set of concatenated arrays (a caller that packs them once per state passes the
// same tensors again): each adapter's patterns, views of the concatenations, checked as its own.
template <typename B>
void check_multi_patterns_cpu(
    const char* op,
    const MultiAdapterInputs& in,
    std::vector<at::Tensor> concatenated,
    c10::ArrayRef<int64_t> bottleneck,
    c10::ArrayRef<int64_t> down_nnz,
    c10::ArrayRef<int64_t> up_nnz) {
  const bool transposed = !in.transposed.empty();
  // what splits the arrays per adapter, length-prefixed so that no two splits read alike
  std::vector<int64_t> sizes{in.in_features, in.out_features, static_cast<int64_t>(bottleneck.size())};
  for (const auto list : {bottleneck, down_nnz, up_nnz}) {
    sizes.insert(sizes.end(), list.begin(), list.end());
  }
  check_patterns_cpu_once(concatenated, sizes, [&] {
    for (size_t k = 0; k < in.adapters.size(); ++k) {
      const AdapterInputs& a = in.adapters[k];
      const std::string name = std::string(op) + " (adapter " + std::to_string(k) + ")";
      check_pattern_bounds_cpu(
          name.c_str(), a.down.crow_indices, a.down.col_indices, a.down.in_features, "x's last dim");
      check_pattern_bounds_cpu(
          name.c_str(), a.up.crow_indices, a.up.col_indices, a.up.in_features, "the adapter's bottleneck width");
      if (transposed) {
        const AdapterTransposed& t = in.transposed[k];
        check_pattern_bounds_cpu(
            name.c_str(), t.down_crow_t, t.down_col_t, a.down.out_features, "the adapter's bottleneck width");
        check_pattern_bounds_cpu(name.c_str(), t.up_crow_t, t.up_col_t, a.up.out_features, "out_features");
      }
    }
  });
}

// The index arrays that check_multi_patterns_cpu reads: the four forward ones, and the transposed
// crow/col arrays when given.
inline std::vector<at::Tensor> multi_pattern_arrays(
    const at::Tensor& down_crow,
    const at::Tensor& down_col,
    const at::Tensor& up_crow,
    const at::Tensor& up_col,
    const std::optional<at::Tensor>& down_crow_t,
    const std::optional<at::Tensor>& down_col_t,
    const std::optional<at::Tensor>& up_crow_t,
    const std::optional<at::Tensor>& up_col_t) {
  std::vector<at::Tensor> arrays{down_crow, down_col, up_crow, up_col};
  if (down_crow_t.has_value() && down_col_t.has_value() && up_crow_t.has_value() && up_col_t.has_value()) {
    arrays.insert(arrays.end(), {*down_crow_t, *down_col_t, *up_crow_t, *up_col_t});
  }
  return arrays;
}

template <typename B>
std::tuple<at::Tensor, at::Tensor> sparse_adapter_multi_op(
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
    bool save_hidden,
    const std::optional<at::Tensor>& down_crow_t,
    const std::optional<at::Tensor>& down_col_t,
    const std::optional<at::Tensor>& down_perm_t,
    const std::optional<at::Tensor>& down_row_order_t,
    const std::optional<at::Tensor>& up_crow_t,
    const std::optional<at::Tensor>& up_col_t,
    const std::optional<at::Tensor>& up_perm_t,
    const std::optional<at::Tensor>& up_row_order_t) {
  constexpr const char* op = "sparse_adapter_multi";
  const auto in = check_multi_adapter_inputs(
      op, x, adapter_index, residual, down_values, down_bias, down_crow, down_col, up_values, up_bias, up_crow, up_col,
      bottleneck, down_nnz, up_nnz, out_features, activation, scale,
      {down_crow_t, down_col_t, down_perm_t, down_row_order_t, up_crow_t, up_col_t, up_perm_t, up_row_order_t},
      B::kDevice);
  if constexpr (B::kDevice == c10::DeviceType::CPU) {
    check_multi_patterns_cpu<B>(
        op, in,
        multi_pattern_arrays(down_crow, down_col, up_crow, up_col, down_crow_t, down_col_t, up_crow_t, up_col_t),
        bottleneck, down_nnz, up_nnz);
  }
  const auto options = in.x.options();
  auto out = at::empty({in.num_tokens, in.out_features}, options);
  // zeros: the blocks of narrower adapters and the rows without one leave parts unwritten
  auto hidden_pre = at::zeros({save_hidden ? in.num_tokens : 0, in.max_bottleneck}, options);
  const int64_t T = in.tokens_per_row;
  // One segment of `src` (rows of one adapter) through its adapter, into `dst` [tokens, out].
  auto run_segment = [&](const MultiAdapterInputs& src, const RowSegment& seg, at::Tensor& dst) {
    if (seg.adapter < 0) {  // no adapter: the residual, or zeros
      const int64_t n = seg.num_rows * T;
      put_segment_rows(
          dst, seg, src,
          src.residual.has_value() ? segment_rows(*src.residual, seg, src) : at::zeros({n, src.out_features}, options));
      return;
    }
    const auto seg_residual =
        src.residual.has_value() ? std::optional<at::Tensor>(segment_rows(*src.residual, seg, src)) : std::nullopt;
    const AdapterInputs a = segment_inputs(src, seg, segment_rows(src.x, seg, src), seg_residual);
    auto seg_out = seg.consecutive ? dst.narrow(0, seg.first_row * T, a.down.num_tokens)
                                   : at::empty({a.down.num_tokens, src.out_features}, options);
    auto seg_hidden = save_hidden ? segment_hidden(hidden_pre, src, seg) : at::empty({0, a.down.out_features}, options);
    run_adapter<B>(a, seg_out, seg_hidden, save_hidden);
    if (!seg.consecutive) {
      put_segment_rows(dst, seg, src, seg_out);
    }
  };
  if (out.numel() > 0 || hidden_pre.numel() > 0) {
    const auto order = adapter_order(in);
    if (std::is_sorted(order.begin(), order.end())) {  // every adapter's rows consecutive: slices of x
      for (const RowSegment& seg : group_rows(in, in.x.device())) {
        run_segment(in, seg, out);
      }
    } else if (T >= kMultiDirectRowTokens) {
      // Rows long enough to run on their own: each run of consecutive rows of one adapter computes on
      // its slices of x, the residual and out, so no row is copied (a gather of a whole batch and the
      // scatter back cost more than its kernels).
      for (const RowSegment& run : row_runs(in)) {
        run_segment(in, run, out);
      }
    } else {
      // Rows of one adapter scattered over the batch: one gather into adapter order and one scatter
      // back, rather than one of each per adapter. hidden_pre's blocks come in the same order either way.
      const auto index =
          at::tensor(c10::ArrayRef<int64_t>(order), at::TensorOptions().dtype(at::kLong)).to(in.x.device());
      auto rows_of = [&](const at::Tensor& t) {
        return t.view({in.num_rows, -1}).index_select(0, index).view({in.num_tokens, t.size(1)});
      };
      MultiAdapterInputs sorted = in;
      sorted.x = rows_of(in.x);
      if (in.residual.has_value()) {
        sorted.residual = rows_of(*in.residual);
      }
      for (int64_t r = 0; r < in.num_rows; ++r) {
        sorted.row_adapter[r] = in.row_adapter[order[r]];
      }
      auto sorted_out = at::empty_like(out);
      for (const RowSegment& seg : group_rows(sorted, sorted.x.device())) {
        run_segment(sorted, seg, sorted_out);
      }
      out.view({in.num_rows, -1}).index_copy_(0, index, sorted_out.view({in.num_rows, -1}));
    }
  }
  return {out.view(in.out_shape), save_hidden ? hidden_pre : hidden_pre.view({0})};
}

// sparse_adapter_multi's backward: each segment's gradients by its adapter's backward, written into
// the rows of grad_x and the adapter's entries of the concatenated gradients (zero for adapters
// without rows, and for the rows without an adapter).
template <typename B>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> sparse_adapter_multi_backward_op(
    const at::Tensor& grad_out,
    const at::Tensor& x,
    const at::Tensor& adapter_index,
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
    c10::ArrayRef<int64_t> bottleneck,
    c10::ArrayRef<int64_t> down_nnz,
    c10::ArrayRef<int64_t> up_nnz,
    int64_t out_features,
    c10::string_view activation,
    c10::ArrayRef<double> scale,
    std::array<bool, 5> output_mask) {
  constexpr const char* op = "sparse_adapter_multi_backward";
  const auto in = check_multi_adapter_inputs(
      op, x, adapter_index, std::nullopt, down_values, std::nullopt, down_crow, down_col, up_values, std::nullopt,
      up_crow, up_col, bottleneck, down_nnz, up_nnz, out_features, activation, scale,
      {down_crow_t, down_col_t, down_perm_t, down_row_order_t, up_crow_t, up_col_t, up_perm_t, up_row_order_t},
      B::kDevice);
  if constexpr (B::kDevice == c10::DeviceType::CPU) {
    check_multi_patterns_cpu<B>(
        op, in,
        multi_pattern_arrays(down_crow, down_col, up_crow, up_col, down_crow_t, down_col_t, up_crow_t, up_col_t),
        bottleneck, down_nnz, up_nnz);
  }
  check_multi_adapter_backward_tensors(op, in, x, grad_out, hidden_pre);
  const auto options = in.x.options();
  // the shape as a named vector: nvcc 13.0 mis-translates a braced list here into host code that does not compile
  const std::vector<int64_t> flat_shape{in.num_tokens, in.out_features};
  const auto g = grad_out.reshape(flat_shape).contiguous();
  const auto saved = hidden_pre.contiguous();
  const auto K = static_cast<int64_t>(in.adapters.size());
  int64_t rows_down = 0;
  for (const auto& a : in.adapters) rows_down += a.down.out_features;
  auto none = [&] { return at::empty({0}, options); };
  at::Tensor grad_x = output_mask[0] ? at::zeros({in.num_tokens, in.in_features}, options) : none();
  at::Tensor grad_dv = output_mask[1] ? at::zeros({down_values.numel()}, options) : none();
  at::Tensor grad_db = output_mask[2] ? at::zeros({rows_down}, options) : none();
  at::Tensor grad_uv = output_mask[3] ? at::zeros({up_values.numel()}, options) : none();
  at::Tensor grad_ub = output_mask[4] ? at::zeros({K * in.out_features}, options) : none();
  for (const RowSegment& seg : in.num_tokens > 0 ? group_rows(in, in.x.device()) : std::vector<RowSegment>{}) {
    if (seg.adapter < 0) {
      continue;  // out = residual there: nothing of x or of any adapter
    }
    const int64_t k = seg.adapter;
    AdapterBackwardInputs b;
    b.forward = segment_inputs(in, seg, segment_rows(in.x, seg, in), std::nullopt);
    b.grad_out = segment_rows(g, seg, in).contiguous();
    b.hidden_pre = segment_hidden(saved, in, seg);
    const AdapterTransposed& t = in.transposed[k];
    b.down_crow_t = t.down_crow_t;
    b.down_col_t = t.down_col_t;
    b.down_perm_t = t.down_perm_t;
    b.down_row_order_t = t.down_row_order_t;
    b.up_crow_t = t.up_crow_t;
    b.up_col_t = t.up_col_t;
    b.up_perm_t = t.up_perm_t;
    b.up_row_order_t = t.up_row_order_t;
    const AdapterGradients grads = run_adapter_backward<B>(b, output_mask);
    if (output_mask[0] && grads.x.defined()) {
      put_segment_rows(grad_x, seg, in, grads.x);
    }
    auto put = [](at::Tensor& dst, int64_t offset, const at::Tensor& src) {
      if (src.defined() && src.numel() > 0) {
        dst.narrow(0, offset, src.numel()).copy_(src);
      }
    };
    if (output_mask[1]) put(grad_dv, in.down_nnz_offset[k], grads.down_values);
    if (output_mask[2]) put(grad_db, in.bottleneck_offset[k], grads.down_bias);
    if (output_mask[3]) put(grad_uv, in.up_nnz_offset[k], grads.up_values);
    if (output_mask[4]) put(grad_ub, k * in.out_features, grads.up_bias);
  }
  if (output_mask[0]) {
    grad_x = grad_x.view(x.sizes());
  }
  return {grad_x, grad_dv, grad_db, grad_uv, grad_ub};
}

}  // namespace sparseadapter
