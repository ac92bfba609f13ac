// The fused adapter's operands as raw pointers and sizes, read once off the checked AdapterInputs;
// the CPU and CUDA kernels extend it with their own plans.
#pragma once

#include <ATen/ATen.h>

#include "validation.h"

namespace sparseadapter {

template <typename scalar_t, typename index_t>
struct AdapterPointers {
  const scalar_t* x;
  const scalar_t* residual;                                       // nullptr: none
  const scalar_t *down_values, *down_bias, *up_values, *up_bias;  // biases: nullptr when absent
  const index_t *down_crow, *down_col, *up_crow, *up_col;
  scalar_t* out;
  scalar_t* hidden_pre;  // nullptr: not kept
  int64_t num_tokens, in_features, bottleneck, out_features;
  Activation activation;
  double scale;

  void set(const AdapterInputs& in, at::Tensor& out_tensor, at::Tensor& hidden_pre_tensor) {
    x = in.down.x.const_data_ptr<scalar_t>();
    residual = in.residual.has_value() ? in.residual->const_data_ptr<scalar_t>() : nullptr;
    down_values = in.down.values.const_data_ptr<scalar_t>();
    down_bias = in.down.bias.has_value() ? in.down.bias->const_data_ptr<scalar_t>() : nullptr;
    up_values = in.up.values.const_data_ptr<scalar_t>();
    up_bias = in.up.bias.has_value() ? in.up.bias->const_data_ptr<scalar_t>() : nullptr;
    down_crow = in.down.crow_indices.const_data_ptr<index_t>();
    down_col = in.down.col_indices.const_data_ptr<index_t>();
    up_crow = in.up.crow_indices.const_data_ptr<index_t>();
    up_col = in.up.col_indices.const_data_ptr<index_t>();
    out = out_tensor.mutable_data_ptr<scalar_t>();
    hidden_pre = hidden_pre_tensor.numel() > 0 ? hidden_pre_tensor.mutable_data_ptr<scalar_t>() : nullptr;
    num_tokens = in.down.num_tokens;
    in_features = in.down.in_features;
    bottleneck = in.down.out_features;
    out_features = in.up.out_features;
    activation = in.activation;
    scale = in.scale;
  }
};

}  // namespace sparseadapter
