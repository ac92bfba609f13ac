// Pruning-at-initialization ops: the fused score, the exact-k global selection over many
// tensors (radix select) and mask -> CSR. The score formula and the host side of the radix select
// are shared here by the CPU (csrc/cpu/prune_cpu.cpp) and CUDA (csrc/cuda/prune_cuda.cu) back ends,
// and both check their inputs with the same functions (validation.h), so they give the same answers
// and the same errors.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "validation.h"

#ifdef __CUDACC__
#define SA_HOST_DEVICE __host__ __device__
#else
#define SA_HOST_DEVICE
#endif

namespace sparseadapter {
namespace prune {

// ----------------------------------------------------------------------------------------------
// prune_score

// The keep-score of one weight; higher = keep. Computed in the output type (float32, or float64 for
// float64 inputs). GraSP keeps the highest w*Hg, i.e. removes the highest S = -w*Hg (Wang et al.).
template <Method kMethod, typename acc_t>
SA_HOST_DEVICE inline acc_t score_of(acc_t w, acc_t g, acc_t hg) {
  if constexpr (kMethod == Method::kMagnitude) {
    return w < acc_t(0) ? -w : w;
  } else if constexpr (kMethod == Method::kGrasp) {
    return w * hg;
  } else {  // snip |g*w| and synflow |w*dR/dw|: the same product
    const acc_t p = g * w;
    return p < acc_t(0) ? -p : p;
  }
}

// ----------------------------------------------------------------------------------------------
// topk_masks: order-preserving integer keys and the host side of the radix select

// Unsigned integer keys whose order is the order of the floats: flip all bits of negatives, set the
// sign bit of non-negatives. -0.0 is mapped to +0.0 first so that the two zeros tie. NaN is rejected
// before any key is used.
SA_HOST_DEVICE inline uint32_t float_key(float v) {
  uint32_t u;
#ifdef __CUDA_ARCH__
  u = __float_as_uint(v);
#else
  std::memcpy(&u, &v, sizeof(u));
#endif
  u = (u == 0x80000000u) ? 0u : u;
  const uint32_t flip = (u >> 31) ? 0xffffffffu : 0x80000000u;
  return u ^ flip;
}

SA_HOST_DEVICE inline uint64_t float_key(double v) {
  uint64_t u;
#ifdef __CUDA_ARCH__
  u = static_cast<uint64_t>(__double_as_longlong(v));
#else
  std::memcpy(&u, &v, sizeof(u));
#endif
  u = (u == 0x8000000000000000ull) ? 0ull : u;
  const uint64_t flip = (u >> 63) ? ~0ull : 0x8000000000000000ull;
  return u ^ flip;
}

template <typename scalar_t>
struct KeyOf;
template <>
struct KeyOf<float> {
  using type = uint32_t;
};
template <>
struct KeyOf<double> {
  using type = uint64_t;
};

constexpr int kRadixBits = 8;
constexpr int kBins = 1 << kRadixBits;

// What the radix select found: the k-th highest key, how many entries equal to it are kept (the
// first ones in list order, then flat index) and how many equal it in all.
template <typename key_t>
struct Threshold {
  key_t key = 0;
  int64_t ties_kept = 0;
  int64_t ties_total = 0;
};

// Most significant digit first: each pass histograms the digit at `shift` of the keys whose higher
// digits equal `prefix` (the `mask` bits), over all tensors; the bins are walked from the highest
// digit down until they hold the k-th highest key. `histogram(prefix, mask, shift, pass, counts)`
// is the back end's pass; it sums into counts[kBins] and may raise (NaN, found on pass 0).
// Needs 1 <= k <= total.
template <typename key_t, typename Histogram>
Threshold<key_t> radix_select(int64_t k, Histogram&& histogram) {
  constexpr int kKeyBits = 8 * static_cast<int>(sizeof(key_t));
  key_t prefix = 0;
  key_t mask = 0;
  int64_t remaining = k;  // how many of the keys with this prefix are still to be kept
  int64_t bin_count = 0;
  int pass = 0;
  for (int shift = kKeyBits - kRadixBits; shift >= 0; shift -= kRadixBits, ++pass) {
    std::array<int64_t, kBins> counts{};
    histogram(prefix, mask, shift, pass, counts.data());
    int digit = kBins - 1;
    for (; digit > 0; --digit) {
      if (counts[digit] >= remaining) break;
      remaining -= counts[digit];
    }
    bin_count = counts[digit];
    prefix |= static_cast<key_t>(digit) << shift;
    mask |= static_cast<key_t>(kBins - 1) << shift;
  }
  return Threshold<key_t>{prefix, remaining, bin_count};
}

}  // namespace prune

// Op entry points of each back end (registered in csrc/{cpu,cuda}/register_*.cpp).
at::Tensor prune_score_cpu(
    const at::Tensor& weight,
    const std::optional<at::Tensor>& grad,
    const std::optional<at::Tensor>& hess_grad,
    c10::string_view method);
std::vector<at::Tensor> topk_masks_cpu(at::TensorList scores, c10::SymInt k);
std::tuple<at::Tensor, at::Tensor> mask_to_csr_cpu(const at::Tensor& mask, at::ScalarType index_dtype);

#ifdef SPARSEADAPTER_WITH_CUDA
at::Tensor prune_score_cuda(
    const at::Tensor& weight,
    const std::optional<at::Tensor>& grad,
    const std::optional<at::Tensor>& hess_grad,
    c10::string_view method);
std::vector<at::Tensor> topk_masks_cuda(at::TensorList scores, c10::SymInt k);
std::tuple<at::Tensor, at::Tensor> mask_to_csr_cuda(const at::Tensor& mask, at::ScalarType index_dtype);
#endif

}  // namespace sparseadapter
