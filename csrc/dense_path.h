// The dense path of each product (see path_choice.h): the CSR weight expanded into a per-call scratch
// matrix by one kernel of the back end, then ATen's dense products (cuBLAS on CUDA, oneDNN or MKL on
// CPU, on matrix units where the machine has them). Written once for every back end `B`
// (register_cpu.cpp, register_cuda.cpp).
#pragma once

#include <ATen/ATen.h>

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

// y = x @ W.T + bias (y: [num_tokens, out_features], contiguous).
template <typename B>
void spmm_dense(const SpmmInputs& in, at::Tensor& y) {
  const auto w = expand_weight<B>(in);
  if (in.bias.has_value()) {
    at::addmm_out(y, *in.bias, in.x, w.t());
  } else {
    at::mm_out(y, in.x, w.t());
  }
}

// out[e] = (grad_out.T @ x)[row(e), col(e)]: the dense weight gradient sampled at the pattern.
template <typename B>
void sddmm_dense(const SddmmInputs& in, at::Tensor& out) {
  PatternData p;
  p.data = at::mm(in.grad_out.t(), in.x);
  p.crow_indices = in.crow_indices;
  p.col_indices = in.col_indices;
  p.num_rows = in.out_features;
  p.num_cols = in.in_features;
  p.nnz = in.nnz;
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
  auto pre = hidden_pre.numel() > 0 ? hidden_pre
                                    : at::empty({in.down.num_tokens, in.down.out_features}, in.down.x.options());
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

}  // namespace sparseadapter
