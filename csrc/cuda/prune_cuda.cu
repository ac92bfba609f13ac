// CUDA kernels of the pruning ops (csrc/prune.h), twins of csrc/cpu/prune_cpu.cpp.
//
// prune_score: one grid-stride elementwise kernel per (method, dtype).
// topk_masks:  radix select on order-preserving integer keys, 8-bit digits, most significant first.
//              Per digit, one launch per tensor of a shared-memory histogram kernel that adds its
//              block's counts into one global histogram (256 bins + a NaN count per tensor); the 256
//              counts are read back to pick the digit (a few syncs per call: 4 for float32, 8 for
//              float64). Then one mask kernel per tensor. Ties at the threshold, when only some of
//              them are kept, are ranked by at::cumsum of the equal-to-threshold flags, offset on the
//              device by the earlier tensors' tie counts: exact and deterministic.
// mask_to_csr: one warp per row counts the row (coalesced byte loads + warp reduction), at::cumsum
//              gives the row starts, then one warp per row writes its columns in order with a ballot
//              (an ordered warp compaction, so columns come out sorted).
// All launches are on the current stream and checked.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <type_traits>

#include "../dispatch.h"
#include "../prune.h"
#include "cuda_utils.cuh"

namespace sparseadapter {
namespace {

using namespace prune;
using cuda_utils::ceil_div;

constexpr int kThreads = 256;

// A grid-stride grid: enough blocks to fill the device, never more than the work needs.
unsigned grid_for(int64_t n, int device) {
  static thread_local int cached_device = -1;
  static thread_local int sm_count = 0;
  if (cached_device != device) {
    sm_count = cuda_utils::device_limits(device).sm_count;
    cached_device = device;
  }
  const int64_t blocks = std::min<int64_t>(ceil_div(n, kThreads), static_cast<int64_t>(sm_count) * 8);
  return static_cast<unsigned>(std::max<int64_t>(blocks, 1));
}

// ---------------------------------------------------------------------------------------------
// prune_score

template <Method kMethod, typename scalar_t, typename out_t>
__global__ void score_kernel(
    const scalar_t* __restrict__ w,
    const scalar_t* __restrict__ g,
    const scalar_t* __restrict__ hg,
    out_t* __restrict__ out,
    int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const out_t wi = static_cast<out_t>(w[i]);
    if constexpr (kMethod == Method::kMagnitude) {
      out[i] = score_of<kMethod, out_t>(wi, out_t(0), out_t(0));
    } else if constexpr (kMethod == Method::kGrasp) {
      out[i] = score_of<kMethod, out_t>(wi, out_t(0), static_cast<out_t>(hg[i]));
    } else {
      out[i] = score_of<kMethod, out_t>(wi, static_cast<out_t>(g[i]), out_t(0));
    }
  }
}

template <Method kMethod, typename scalar_t, typename out_t>
void launch_score(const ScoreInputs& in, at::Tensor& out, cudaStream_t stream) {
  const int64_t n = in.weight.numel();
  score_kernel<kMethod, scalar_t, out_t><<<grid_for(n, in.weight.get_device()), kThreads, 0, stream>>>(
      in.weight.const_data_ptr<scalar_t>(), in.grad.defined() ? in.grad.const_data_ptr<scalar_t>() : nullptr,
      in.hess_grad.defined() ? in.hess_grad.const_data_ptr<scalar_t>() : nullptr, out.data_ptr<out_t>(), n);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---------------------------------------------------------------------------------------------
// topk_masks

// counts[0..255] += histogram of digit `shift` of the keys matching `prefix` on the `mask` bits;
// on the first pass (mask == 0) NaNs are counted into *nan_count instead.
template <typename scalar_t, typename key_t>
__global__ void radix_histogram_kernel(
    const scalar_t* __restrict__ s,
    int64_t n,
    key_t prefix,
    key_t mask,
    int shift,
    bool first_pass,
    unsigned long long* __restrict__ counts,
    unsigned long long* __restrict__ nan_count) {
  __shared__ unsigned int hist[kBins];
  for (int d = threadIdx.x; d < kBins; d += blockDim.x) hist[d] = 0;
  __syncthreads();
  unsigned int nans = 0;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const scalar_t v = s[i];
    if (first_pass && v != v) {
      ++nans;
      continue;
    }
    const key_t key = float_key(v);
    if ((key & mask) == prefix) atomicAdd(&hist[static_cast<int>((key >> shift) & (kBins - 1))], 1u);
  }
  __syncthreads();
  for (int d = threadIdx.x; d < kBins; d += blockDim.x) {
    if (hist[d]) atomicAdd(&counts[d], static_cast<unsigned long long>(hist[d]));
  }
  if (first_pass && nans) atomicAdd(nan_count, static_cast<unsigned long long>(nans));
}

// mask = key > T (or >= T when every tie is kept); eq, when given, gets the key == T flags.
template <typename scalar_t, typename key_t>
__global__ void threshold_mask_kernel(
    const scalar_t* __restrict__ s,
    int64_t n,
    key_t threshold,
    bool keep_equal,
    bool* __restrict__ m,
    int32_t* __restrict__ eq) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const key_t key = float_key(s[i]);
    m[i] = keep_equal ? key >= threshold : key > threshold;
    if (eq) eq[i] = key == threshold;
  }
}

// Keeps the ties whose rank in list order (offset + inclusive count) is within ties_kept.
__global__ void tie_mask_kernel(
    const int32_t* __restrict__ eq,
    const int64_t* __restrict__ inclusive,
    const int64_t* __restrict__ offset,
    int64_t n,
    int64_t ties_kept,
    bool* __restrict__ m) {
  const int64_t base = *offset;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    if (eq[i] && base + inclusive[i] <= ties_kept) m[i] = true;
  }
}

template <typename scalar_t>
void topk_impl(const TopkInputs& in, std::vector<at::Tensor>& masks, cudaStream_t stream) {
  using key_t = typename KeyOf<scalar_t>::type;
  const int device = in.scores[0].get_device();
  const size_t num = in.scores.size();
  // [0, 256): the digit histogram; [256, 256 + num): NaNs per tensor (first pass only).
  auto counts_dev = at::empty({kBins + static_cast<int64_t>(num)}, in.scores[0].options().dtype(at::kLong));
  auto* counts_ptr = reinterpret_cast<unsigned long long*>(counts_dev.data_ptr<int64_t>());

  auto histogram = [&](key_t prefix, key_t mask, int shift, int pass, int64_t* counts) {
    counts_dev.zero_();
    for (size_t t = 0; t < num; ++t) {
      const int64_t n = in.scores[t].numel();
      if (n == 0) continue;
      radix_histogram_kernel<scalar_t, key_t><<<grid_for(n, device), kThreads, 0, stream>>>(
          in.scores[t].const_data_ptr<scalar_t>(), n, prefix, mask, shift, pass == 0, counts_ptr,
          counts_ptr + kBins + t);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    const auto host = counts_dev.cpu();  // the 256 counts decide the next digit
    const int64_t* h = host.const_data_ptr<int64_t>();
    if (pass == 0) {
      for (size_t t = 0; t < num; ++t) {
        if (h[kBins + t]) fail_nan(t, h[kBins + t]);
      }
    }
    for (int d = 0; d < kBins; ++d) counts[d] += h[d];
  };

  if (in.k == 0 || in.k == in.total) {
    // Still one pass, for the NaN check.
    int64_t scratch[kBins] = {};
    histogram(key_t(0), key_t(0), 8 * static_cast<int>(sizeof(key_t)) - kRadixBits, 0, scratch);
    for (auto& m : masks) m.fill_(in.k != 0);
    return;
  }
  const auto th = radix_select<key_t>(in.k, histogram);
  const bool all_ties = th.ties_kept == th.ties_total;
  auto offset = all_ties ? at::Tensor() : at::zeros({1}, counts_dev.options());
  for (size_t t = 0; t < num; ++t) {
    const int64_t n = in.scores[t].numel();
    if (n == 0) continue;
    const unsigned grid = grid_for(n, device);
    at::Tensor eq;
    if (!all_ties) eq = at::empty({n}, counts_dev.options().dtype(at::kInt));
    threshold_mask_kernel<scalar_t, key_t><<<grid, kThreads, 0, stream>>>(
        in.scores[t].const_data_ptr<scalar_t>(), n, th.key, all_ties, masks[t].data_ptr<bool>(),
        all_ties ? nullptr : eq.data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (!all_ties) {
      const auto inclusive = at::cumsum(eq, 0, at::kLong);
      tie_mask_kernel<<<grid, kThreads, 0, stream>>>(
          eq.const_data_ptr<int32_t>(), inclusive.const_data_ptr<int64_t>(), offset.const_data_ptr<int64_t>(), n,
          th.ties_kept, masks[t].data_ptr<bool>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      offset.add_(inclusive.narrow(0, n - 1, 1));  // stays on the device: no sync per tensor
    }
  }
}

// ---------------------------------------------------------------------------------------------
// mask_to_csr

constexpr int kWarpsPerBlock = kThreads / 32;

// counts[r + 1] = number of True entries of row r (counts[0] stays 0).
__global__ void
row_count_kernel(const uint8_t* __restrict__ m, int64_t rows, int64_t cols, int64_t* __restrict__ counts) {
  const int64_t r = blockIdx.x * static_cast<int64_t>(kWarpsPerBlock) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (r >= rows) return;
  const uint8_t* row = m + r * cols;
  int64_t count = 0;
  for (int64_t j = lane; j < cols; j += 32) count += row[j] != 0;
#pragma unroll
  for (int o = 16; o > 0; o /= 2) count += __shfl_down_sync(0xffffffffu, count, o);
  if (lane == 0) counts[r + 1] = count;
}

// One warp per row: the lanes test 32 consecutive columns, a ballot gives each set lane its place.
template <typename index_t>
__global__ void column_fill_kernel(
    const uint8_t* __restrict__ m,
    int64_t rows,
    int64_t cols,
    const int64_t* __restrict__ start,
    index_t* __restrict__ col) {
  const int64_t r = blockIdx.x * static_cast<int64_t>(kWarpsPerBlock) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (r >= rows) return;
  const uint8_t* row = m + r * cols;
  index_t* out = col + start[r];
  const unsigned lower = (1u << lane) - 1u;
  int64_t pos = 0;
  for (int64_t j0 = 0; j0 < cols; j0 += 32) {
    const int64_t j = j0 + lane;
    const bool set = j < cols && row[j] != 0;
    const unsigned ballot = __ballot_sync(0xffffffffu, set);
    if (set) out[pos + __popc(ballot & lower)] = static_cast<index_t>(j);
    pos += __popc(ballot);
  }
}

}  // namespace

at::Tensor prune_score_cuda(
    const at::Tensor& weight,
    const std::optional<at::Tensor>& grad,
    const std::optional<at::Tensor>& hess_grad,
    c10::string_view method) {
  const auto in = check_score_inputs(weight, grad, hess_grad, std::string(method), c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard device_guard(in.weight.device());
  auto out = at::empty(in.weight.sizes(), in.weight.options().dtype(in.out_dtype));
  if (out.numel() == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  SA_DISPATCH_VALUE_TYPES(in.weight.scalar_type(), "prune_score_cuda", [&] {
    using out_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    switch (in.method) {
      case Method::kMagnitude: launch_score<Method::kMagnitude, scalar_t, out_t>(in, out, stream); break;
      case Method::kSnip: launch_score<Method::kSnip, scalar_t, out_t>(in, out, stream); break;
      case Method::kGrasp: launch_score<Method::kGrasp, scalar_t, out_t>(in, out, stream); break;
      case Method::kSynflow: launch_score<Method::kSynflow, scalar_t, out_t>(in, out, stream); break;
    }
  });
  return out;
}

std::vector<at::Tensor> topk_masks_cuda(at::TensorList scores, c10::SymInt k_sym) {
  const auto in = check_topk_inputs(scores, k_sym.guard_int(__FILE__, __LINE__), c10::DeviceType::CUDA);
  std::vector<at::Tensor> masks;
  masks.reserve(in.scores.size());
  for (const auto& s : in.scores) masks.push_back(at::empty(s.sizes(), s.options().dtype(at::kBool)));
  if (in.scores.empty()) return masks;
  const c10::cuda::CUDAGuard device_guard(in.scores[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (in.dtype == at::kDouble) {
    topk_impl<double>(in, masks, stream);
  } else {
    topk_impl<float>(in, masks, stream);
  }
  return masks;
}

std::tuple<at::Tensor, at::Tensor> mask_to_csr_cuda(const at::Tensor& mask_in, at::ScalarType index_dtype) {
  const c10::cuda::CUDAGuard device_guard(mask_in.device());
  const auto mask = check_mask_inputs(mask_in, index_dtype, c10::DeviceType::CUDA);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t rows = mask.size(0), cols = mask.size(1);
  const auto* m = reinterpret_cast<const uint8_t*>(mask.const_data_ptr<bool>());
  auto start = at::zeros({rows + 1}, mask.options().dtype(at::kLong));
  const unsigned grid = static_cast<unsigned>(std::max<int64_t>(ceil_div(rows, kWarpsPerBlock), 1));
  if (rows > 0 && cols > 0) {
    row_count_kernel<<<grid, kThreads, 0, stream>>>(m, rows, cols, start.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    start = at::cumsum(start, 0);
  }
  const int64_t nnz = start[rows].item<int64_t>();  // the one sync: col's length
  check_nnz_fits(nnz, index_dtype);
  auto col = at::empty({nnz}, mask.options().dtype(index_dtype));
  if (nnz > 0) {
    SA_DISPATCH_INDEX_TYPES(index_dtype, "mask_to_csr_cuda", [&] {
      column_fill_kernel<index_t>
          <<<grid, kThreads, 0, stream>>>(m, rows, cols, start.const_data_ptr<int64_t>(), col.data_ptr<index_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {start.to(index_dtype), col};
}

}  // namespace sparseadapter
