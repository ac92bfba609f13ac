// The bottleneck activations in the accumulation type, shared by the fused adapter kernels.
#pragma once

#include <cmath>

#include "../validation.h"

namespace sparseadapter {
namespace cuda_utils {

__device__ __forceinline__ float dev_erf(float v) {
  return erff(v);
}
__device__ __forceinline__ double dev_erf(double v) {
  return erf(v);
}
__device__ __forceinline__ float dev_exp(float v) {
  return expf(v);
}
__device__ __forceinline__ double dev_exp(double v) {
  return exp(v);
}
__device__ __forceinline__ float dev_tanh(float v) {
  return tanhf(v);
}
__device__ __forceinline__ double dev_tanh(double v) {
  return tanh(v);
}

// relu, gelu (exact, erf), silu and tanh in the accumulation type. As on CPU (vec_math.h), the far
// negative tails of gelu and silu are 0, so -inf gives the limit 0 rather than -inf * 0.
template <typename acc_t>
__device__ __forceinline__ acc_t activate(acc_t h, Activation activation) {
  switch (activation) {
    case Activation::kIdentity: return h;
    case Activation::kRelu: return h < acc_t(0) ? acc_t(0) : h;  // NaN stays NaN, as torch.relu
    case Activation::kGelu:
      return h < acc_t(-14.2) ? acc_t(0) : acc_t(0.5) * h * (acc_t(1) + dev_erf(h * acc_t(M_SQRT1_2)));
    case Activation::kSilu: return h < acc_t(-100) ? acc_t(0) : h / (acc_t(1) + dev_exp(-h));
    case Activation::kTanh: return dev_tanh(h);
  }
  return h;
}

}  // namespace cuda_utils
}  // namespace sparseadapter
