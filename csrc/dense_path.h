// The dense path of each product (see path_choice.h): the CSR weight expanded into a per-call scratch
// matrix by one kernel of the back end, then ATen's dense products (cuBLAS on CUDA, oneDNN or MKL on
// CPU, on matrix units where the machine has them). Written once for every back end `B`
// (register_cpu.cpp, register_cuda.cpp).
#pragma once

#include <ATen/ATen.h>

#include <array>

#include "kernels.h"
#include "validation.h"

namespace sparseadapter {

// The activation of the bottleneck as ATen ops. gelu and silu of -inf are their limit 0 (ATen's
// formulas give -inf * 0 = NaN there), as in the fused kernels.
inline at::Tensor activate_tensor(const at::Tensor& pre, Activation activation) {
  switch (activation) {
    case Activation::kIdentity: return pre;
    case Activation::kRelu: return at::relu(pre);
    case Activation::kGelu: return at::gelu(pre).masked_fill_(at::isneginf(pre), 0);
    case Activation::kSilu: return at::silu(pre).masked_fill_(at::isneginf(pre), 0);
    case Activation::kTanh: return at::tanh(pre);
  }
  return pre;
}

// The gradient of the pre-activation from the activation's (ATen's backward formulas).
inline at::Tensor activation_backward(const at::Tensor& grad, const at::Tensor& pre, Activation activation) {
  switch (activation) {
    case Activation::kIdentity: return grad;
    case Activation::kRelu: return at::threshold_backward(grad, pre, 0);
    case Activation::kGelu: return at::gelu_backward(grad, pre);
    case Activation::kSilu: return at::silu_backward(grad, pre);
    case Activation::kTanh: return at::tanh_backward(grad, at::tanh(pre));
  }
  return grad;
}

// a @ b * scale with the scale applied in the product's epilogue (one rounding).
inline at::Tensor mm_scaled(const at::Tensor& a, const at::Tensor& b, double scale) {
  if (scale == 1.0) {
    return at::mm(a, b);
  }
  auto out = at::empty({a.size(0), b.size(1)}, a.options());
  return at::addmm_out(out, out, a, b, /*beta=*/0, /*alpha=*/scale);  // beta = 0: out's contents are ignored
}

// W [out_features, in_features] of a projection, dense, in its values' dtype.
template <typename B>
at::Tensor expand_weight(const SpmmInputs& in) {
  PatternData p;
  p.data = in.values;
  p.crow_indices = in.crow_indices;
  p.col_indices = in.col_indices;
  p.num_rows = in.out_features;
  p.num_cols = in.in_features;
  p.nnz = in.nnz;
  auto dense = at::empty({in.out_features, in.in_features}, in.values.options());
  B::csr_to_dense(p, dense);
  return dense;
}

// y = x @ W.T + bias (y: [num_tokens, out_features], contiguous). `kept_weight`, when given, receives
// the expanded W (the training forward keeps it for the backward's grad_x).
template <typename B>
void spmm_dense(const SpmmInputs& in, at::Tensor& y, at::Tensor* kept_weight = nullptr) {
  const auto w = expand_weight<B>(in);
  if (kept_weight != nullptr) {
    *kept_weight = w;
  }
  if (in.bias.has_value()) {
    at::addmm_out(y, *in.bias, in.x, w.t());
  } else {
    at::mm_out(y, in.x, w.t());
  }
}

// A dense [out_features, in_features] matrix at a projection's pattern: [nnz].
template <typename B>
at::Tensor gather_at_pattern(const at::Tensor& dense, const SpmmInputs& w) {
  auto out = at::empty({w.nnz}, dense.options());
  if (w.nnz > 0) {
    PatternData p;
    p.data = dense;
    p.crow_indices = w.crow_indices;
    p.col_indices = w.col_indices;
    p.num_rows = w.out_features;
    p.num_cols = w.in_features;
    p.nnz = w.nnz;
    B::csr_gather(p, out);
  }
  return out;
}

// out[e] = (grad_out.T @ x)[row(e), col(e)]: the dense weight gradient sampled at the pattern. On the
// CPU the product is computed in the orientation whose output is wider than tall: oneDNN's bf16 GEMM
// with 4096 tokens took 1.1 ms for a [64, 768] output and 1.7-1.9 ms for its [768, 64] transpose
// (one thread, AVX512-BF16), so a layer with more outputs than inputs gathers from (x.T @ grad_out).
template <typename B>
void sddmm_dense(const SddmmInputs& in, at::Tensor& out) {
  PatternData p;
  p.crow_indices = in.crow_indices;
  p.col_indices = in.col_indices;
  p.num_rows = in.out_features;
  p.num_cols = in.in_features;
  p.nnz = in.nnz;
  if constexpr (B::kDevice == c10::DeviceType::CPU) {
    if (in.out_features > in.in_features) {
      p.data = at::mm(in.x.t(), in.grad_out);  // [in, out]
      csr_gather_transposed_cpu_kernel(p, out);
      return;
    }
  }
  p.data = at::mm(in.grad_out.t(), in.x);
  B::csr_gather(p, out);
}

// The adapter on the expanded weights: the back end's fused dense kernel where it has one for this
// problem, else two dense products with their bias epilogues, the activation, and the residual add.
template <typename B>
void adapter_dense(const AdapterInputs& in, at::Tensor& out, at::Tensor& hidden_pre) {
  const auto down = expand_weight<B>(in.down);
  const auto up = expand_weight<B>(in.up);
  if (B::adapter_dense_fused(in, down, up, out, hidden_pre)) {
    return;
  }
  auto pre =
      hidden_pre.numel() > 0 ? hidden_pre : at::empty({in.down.num_tokens, in.down.out_features}, in.down.x.options());
  if (in.down.bias.has_value()) {
    at::addmm_out(pre, *in.down.bias, in.down.x, down.t());
  } else {
    at::mm_out(pre, in.down.x, down.t());
  }
  if (out.numel() == 0) {
    return;
  }
  const auto hidden = activate_tensor(pre, in.activation);
  if (in.up.bias.has_value()) {  // scale * (hidden @ U.T + bu) in one product
    at::addmm_out(out, *in.up.bias, hidden, up.t(), in.scale, in.scale);
  } else {
    at::mm_out(out, hidden, up.t());
    if (in.scale != 1.0) {
      out.mul_(in.scale);
    }
  }
  if (in.residual.has_value()) {
    out.add_(*in.residual);
  }
}

// The adapter's backward on the expanded weights: four dense products (two of them weight gradients
// gathered at the patterns), the scale folded into the products' epilogues. Called with tokens > 0.
template <typename B>
AdapterGradients adapter_backward_dense(const AdapterBackwardInputs& in, std::array<bool, 5> mask) {
  const AdapterInputs& f = in.forward;
  const at::Tensor& g = in.grad_out;
  AdapterGradients grads;
  if (mask[3]) {
    const auto hidden = activate_tensor(in.hidden_pre, f.activation);
    grads.up_values = gather_at_pattern<B>(mm_scaled(g.t(), hidden, f.scale), f.up);
  }
  if (mask[4]) {
    grads.up_bias = f.scale == 1.0 ? g.sum(0) : g.sum(0).mul_(f.scale);
  }
  if (mask[0] || mask[1] || mask[2]) {
    const auto grad_hidden = mm_scaled(g, expand_weight<B>(f.up), f.scale);
    const auto grad_pre = activation_backward(grad_hidden, in.hidden_pre, f.activation);
    if (mask[0]) {
      grads.x = at::mm(grad_pre, expand_weight<B>(f.down));
    }
    if (mask[1]) {
      grads.down_values = gather_at_pattern<B>(at::mm(grad_pre.t(), f.down.x), f.down);
    }
    if (mask[2]) {
      grads.down_bias = grad_pre.sum(0);
    }
  }
  return grads;
}

}  // namespace sparseadapter
