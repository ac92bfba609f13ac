// Pruning-at-initialization ops (issue 3): the fused score, the exact-k global selection over many
// tensors (radix select) and mask -> CSR. Input checks and the host side of the radix select are
// shared here by the CPU (csrc/cpu/prune_cpu.cpp) and CUDA (csrc/cuda/prune_cuda.cu) back ends, so
// both give the same answers and the same errors.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <array>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#ifdef __CUDACC__
#define SA_HOST_DEVICE __host__ __device__
#else
#define SA_HOST_DEVICE
#endif

namespace sparseadapter {
namespace prune {

// ----------------------------------------------------------------------------------------------
// prune_score

enum class Method { kMagnitude, kSnip, kGrasp, kSynflow };

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

struct ScoreInputs {
  Method method;
  at::Tensor weight;     // contiguous
  at::Tensor grad;       // contiguous, defined when the method needs it
  at::Tensor hess_grad;  // contiguous, defined when the method needs it
  at::ScalarType out_dtype;
};

inline Method parse_method(const std::string& method) {
  if (method == "magnitude") return Method::kMagnitude;
  if (method == "snip") return Method::kSnip;
  if (method == "grasp") return Method::kGrasp;
  if (method == "synflow") return Method::kSynflow;
  TORCH_CHECK_VALUE(
      false, "prune_score: unknown method '", method,
      "'; expected one of 'magnitude', 'snip', 'grasp', 'synflow'");
}

inline bool is_score_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

inline at::Tensor check_score_operand(
    const at::Tensor& weight, const std::optional<at::Tensor>& t, const char* name, const char* meaning,
    const std::string& method) {
  TORCH_CHECK_VALUE(
      t.has_value() && t->defined(), "prune_score: method '", method, "' needs ", name, " (", meaning,
      "), got None");
  TORCH_CHECK_VALUE(
      t->sizes() == weight.sizes(), "prune_score: ", name, " has shape ", t->sizes(),
      " but weight has shape ", weight.sizes());
  TORCH_CHECK_TYPE(
      t->scalar_type() == weight.scalar_type(), "prune_score: ", name, " has dtype ", t->scalar_type(),
      " but weight has dtype ", weight.scalar_type());
  TORCH_CHECK_VALUE(
      t->device() == weight.device(), "prune_score: ", name, " is on ", t->device(), " but weight is on ",
      weight.device());
  return t->contiguous();
}

inline ScoreInputs check_score_inputs(
    const at::Tensor& weight,
    const std::optional<at::Tensor>& grad,
    const std::optional<at::Tensor>& hess_grad,
    const std::string& method,
    c10::DeviceType device_type) {
  ScoreInputs in;
  in.method = parse_method(method);
  TORCH_CHECK_TYPE(
      is_score_float(weight.scalar_type()), "prune_score: weight must be float32, float16, bfloat16 or "
      "float64, got ", weight.scalar_type());
  TORCH_CHECK_VALUE(
      weight.device().type() == device_type, "prune_score: weight is on ", weight.device(),
      " but this kernel runs on ", device_type);
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

// The scores, checked: one dtype (float32 or float64), one device, all contiguous.
struct TopkInputs {
  std::vector<at::Tensor> scores;  // contiguous
  int64_t total = 0;
  int64_t k = 0;
  at::ScalarType dtype = at::kFloat;
};

inline TopkInputs check_topk_inputs(at::TensorList scores, int64_t k, c10::DeviceType device_type) {
  TopkInputs in;
  for (size_t i = 0; i < scores.size(); ++i) {
    const auto& s = scores[i];
    TORCH_CHECK_TYPE(
        s.scalar_type() == at::kFloat || s.scalar_type() == at::kDouble, "topk_masks: scores[", i,
        "] must be float32 or float64, got ", s.scalar_type());
    TORCH_CHECK_TYPE(
        s.scalar_type() == scores[0].scalar_type(), "topk_masks: scores[", i, "] has dtype ",
        s.scalar_type(), " but scores[0] has dtype ", scores[0].scalar_type(), "; use one dtype");
    TORCH_CHECK_VALUE(
        s.device().type() == device_type, "topk_masks: scores[", i, "] is on ", s.device(),
        " but this kernel runs on ", device_type);
    TORCH_CHECK_VALUE(
        s.device() == scores[0].device(), "topk_masks: scores[", i, "] is on ", s.device(),
        " but scores[0] is on ", scores[0].device(), "; move all scores to one device");
    in.scores.push_back(s.contiguous());
    in.total += s.numel();
  }
  if (!scores.empty()) in.dtype = scores[0].scalar_type();
  TORCH_CHECK_VALUE(
      k >= 0 && k <= in.total, "topk_masks: k = ", k, " must be in [0, ", in.total,
      "] (the total number of scores)");
  in.k = k;
  return in;
}

inline void fail_nan(size_t index, int64_t count) {
  TORCH_CHECK_VALUE(
      false, "topk_masks: scores[", index, "] contains ", count,
      " NaN value(s); scores must be finite or +-inf to be ranked");
}

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

// ----------------------------------------------------------------------------------------------
// mask_to_csr

inline at::Tensor check_mask_inputs(const at::Tensor& mask, at::ScalarType index_dtype, c10::DeviceType device_type) {
  TORCH_CHECK_VALUE(
      mask.dim() == 2, "mask_to_csr: mask must be 2-D [out_features, in_features], got shape ", mask.sizes());
  TORCH_CHECK_TYPE(
      index_dtype == at::kInt || index_dtype == at::kLong, "mask_to_csr: index_dtype must be int32 or int64, got ",
      index_dtype);
  TORCH_CHECK_VALUE(
      mask.device().type() == device_type, "mask_to_csr: mask is on ", mask.device(), " but this kernel runs on ",
      device_type);
  if (index_dtype == at::kInt) {
    const int64_t limit = std::numeric_limits<int32_t>::max();
    TORCH_CHECK_VALUE(
        mask.size(0) <= limit && mask.size(1) <= limit, "mask_to_csr: shape ", mask.sizes(),
        " does not fit int32 indices; use int64");
  }
  // Non-bool masks keep their nonzeros, as python/sparseadapter/csr.py does.
  return (mask.scalar_type() == at::kBool ? mask : mask.ne(0)).contiguous();
}

inline void check_nnz_fits(int64_t nnz, at::ScalarType index_dtype) {
  TORCH_CHECK_VALUE(
      index_dtype == at::kLong || nnz <= std::numeric_limits<int32_t>::max(), "mask_to_csr: nnz = ", nnz,
      " does not fit int32 indices; use int64");
}

}  // namespace prune

// Op entry points of each back end (registered in csrc/{cpu,cuda}/register_*.cpp).
at::Tensor prune_score_cpu(
    const at::Tensor& weight, const std::optional<at::Tensor>& grad, const std::optional<at::Tensor>& hess_grad,
    c10::string_view method);
std::vector<at::Tensor> topk_masks_cpu(at::TensorList scores, c10::SymInt k);
std::tuple<at::Tensor, at::Tensor> mask_to_csr_cpu(const at::Tensor& mask, at::ScalarType index_dtype);

#ifdef SPARSEADAPTER_WITH_CUDA
at::Tensor prune_score_cuda(
    const at::Tensor& weight, const std::optional<at::Tensor>& grad, const std::optional<at::Tensor>& hess_grad,
    c10::string_view method);
std::vector<at::Tensor> topk_masks_cuda(at::TensorList scores, c10::SymInt k);
std::tuple<at::Tensor, at::Tensor> mask_to_csr_cuda(const at::Tensor& mask, at::ScalarType index_dtype);
#endif

}  // namespace sparseadapter
