// CUDA fused bottleneck adapter: out = residual + scale * (act(x @ D.T + bd) @ U.T + bu), D and U in CSR.
//
// One block per tile of 32 tokens, lane = token (the layout and row walk of spmm_cuda.cu):
//  1. down: x's tile is staged in shared memory (in column chunks when in_features is large) and
//     each warp runs rows of D against it; the bottleneck tile h [bottleneck][32] stays in shared
//     memory, in the accumulation type.
//  2. the pre-activation is written out when the backward keeps it; the activation is applied in place.
//  3. up: warps run rows of U against h, R rows at a time; each chunk's output tile is gathered in
//     shared memory (where x's chunk lived) and written with coalesced stores, scale and residual
//     applied on the way out in the accumulation type, then rounded once.
// The bottleneck activation never reaches global memory: x and the residual are read once, out is
// written once, and the weights are read from L2 by every block. Very few tokens (serving one
// sentence) or a bottleneck too wide for shared memory take the separate kernels instead.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <climits>

#include "../adapter_pointers.h"
#include "../dispatch.h"
#include "../kernels.h"
#include "../op_wrappers.h"
#include "activation.cuh"
#include "cuda_backend.h"
#include "cuda_utils.cuh"

namespace sparseadapter {
namespace {

using namespace cuda_utils;

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kTokens = 32;  // tokens per block: lane = token

template <typename scalar_t, typename index_t>
struct AdapterParams : AdapterPointers<scalar_t, index_t> {
  int kc;              // x columns per staged chunk (> 0 when in_features > 0)
  int rows_per_chunk;  // R: rows of U per output chunk
  int ys_pitch;        // odd, >= R: conflict-free stores of the output chunk by lane = token
};

template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kThreads) adapter_fused_kernel(const AdapterParams<scalar_t, index_t> p) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int V = kVecWidth<scalar_t>;

  const int bottleneck = static_cast<int>(p.bottleneck);  // fits shared memory, hence an int

  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* ev = reinterpret_cast<acc_t*>(smem_raw);          // [kWarps][32] values of a row batch
  int* eo = reinterpret_cast<int*>(ev + kWarps * 32);      // [kWarps][32] tile offsets of a row batch
  acc_t* hs = reinterpret_cast<acc_t*>(eo + kWarps * 32);  // [bottleneck][32] tile (cuda_utils layout)
  acc_t* work = hs + bottleneck * kTokens;                 // x chunk [kc][32], later the output chunk [32][ys_pitch]

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  acc_t* wev = ev + warp * 32;
  int* weo = eo + warp * 32;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kTokens;
  const int nt = static_cast<int>(min(static_cast<int64_t>(kTokens), p.num_tokens - n0));

  // 1. Down projection. The bias initialises h; every chunk of x's columns adds its share.
  for (int i = warp; i < bottleneck; i += kWarps) {
    hs[tile_base<kTokens, V>(i) ^ lane] = p.down_bias ? static_cast<acc_t>(p.down_bias[i]) : acc_t(0);
  }
  for (int64_t k0 = 0; k0 < p.in_features; k0 += p.kc) {
    const int w = static_cast<int>(min(static_cast<int64_t>(p.kc), p.in_features - k0));
    __syncthreads();  // the previous chunk's readers are done
    stage_x_tile<kTokens>(p.x, p.in_features, n0, nt, k0, w, work);
    __syncthreads();
    for (int i = warp; i < bottleneck; i += kWarps) {
      // row i of h belongs to this warp alone
      hs[tile_base<kTokens, V>(i) ^ lane] += csr_row_dot_tile32(
          p.down_values, p.down_col, p.down_crow[i], p.down_crow[i + 1], k0, w, work, wev, weo, lane);
    }
  }
  __syncthreads();

  // 2. The pre-activation for the backward (consecutive threads: consecutive bottleneck units of one
  //    token, coalesced and, by the tile layout, free of bank conflicts), then the activation.
  const int tile_elems = bottleneck * kTokens;
  if (p.hidden_pre) {
    for (int idx = threadIdx.x; idx < nt * bottleneck; idx += blockDim.x) {
      const int t = idx / bottleneck;
      const int i = idx - t * bottleneck;
      p.hidden_pre[(n0 + t) * bottleneck + i] = static_cast<scalar_t>(hs[tile_base<kTokens, V>(i) ^ t]);
    }
    __syncthreads();  // every pre-activation is read before the activation overwrites it
  }
  if (p.activation != Activation::kIdentity) {
    for (int idx = threadIdx.x; idx < tile_elems; idx += blockDim.x) {
      hs[idx] = activate(hs[idx], p.activation);
    }
  }
  __syncthreads();

  // 3. Up projection, R rows of U per chunk, through the output chunk in `work`.
  const acc_t scale = static_cast<acc_t>(p.scale);
  acc_t* ys = work;
  for (int64_t o0 = 0; o0 < p.out_features; o0 += p.rows_per_chunk) {
    const int rows = static_cast<int>(min(static_cast<int64_t>(p.rows_per_chunk), p.out_features - o0));
    for (int j = warp; j < rows; j += kWarps) {
      const int64_t o = o0 + j;
      acc_t acc =
          csr_row_dot_tile32(p.up_values, p.up_col, p.up_crow[o], p.up_crow[o + 1], 0, bottleneck, hs, wev, weo, lane);
      if (p.up_bias) {
        acc += static_cast<acc_t>(p.up_bias[o]);
      }
      ys[lane * p.ys_pitch + j] = acc;
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < nt * rows; idx += blockDim.x) {
      const int t = idx / rows;
      const int j = idx - t * rows;
      const int64_t g = (n0 + t) * p.out_features + o0 + j;
      acc_t v = scale * ys[t * p.ys_pitch + j];
      if (p.residual) {
        v += static_cast<acc_t>(p.residual[g]);
      }
      p.out[g] = static_cast<scalar_t>(v);
    }
    __syncthreads();  // the chunk's readers are done before the next chunk overwrites it
  }
}

// Plans and launches the fused kernel; false when it does not apply (the caller runs the separate
// kernels).
template <typename scalar_t, typename index_t>
bool launch_fused(const AdapterInputs& in, at::Tensor& out, at::Tensor& hidden_pre, cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  // A handful of tokens would leave most lanes idle; spmm's one-token kernel serves them better.
  if (in.down.num_tokens <= 4) {
    return false;
  }
  const auto dev = device_limits(in.down.x.get_device());
  const int64_t acc_bytes = sizeof(acc_t);
  const int64_t col_bytes = kTokens * acc_bytes;  // one column (or row) of a 32-token tile
  const int64_t in_f = in.down.in_features;
  const int64_t bottleneck = in.down.out_features;
  const int64_t out_f = in.up.out_features;
  const int64_t fixed = kWarps * 32 * (acc_bytes + static_cast<int64_t>(sizeof(int))) + bottleneck * col_bytes;
  // The work region holds x's chunk, then an output chunk: at least 32 columns, or a row per warp.
  const int64_t budget = dev.smem_optin - fixed;
  if (budget < std::max<int64_t>(32, kWarps + 1) * col_bytes) {
    return false;  // a bottleneck too wide to keep on chip
  }
  const int64_t region = std::min(budget, std::max(in_f, out_f + 1) * col_bytes);
  int64_t kc = std::min(in_f, region / col_bytes);
  if (kc < in_f) {
    kc -= kc % 32;  // whole 16-byte vectors per chunk
  }
  const int64_t rows = std::min(out_f, region / col_bytes - 1);  // pitch = rows | 1 fits the region
  const int64_t tiles = ceil_div(in.down.num_tokens, kTokens);
  TORCH_CHECK(tiles <= INT_MAX, "sparse_adapter: too many tokens for one launch (", in.down.num_tokens, ")");

  AdapterParams<scalar_t, index_t> p;
  p.set(in, out, hidden_pre);
  p.kc = static_cast<int>(kc);
  p.rows_per_chunk = static_cast<int>(std::max<int64_t>(rows, 1));
  p.ys_pitch = static_cast<int>(p.rows_per_chunk | 1);

  const size_t smem = static_cast<size_t>(fixed + region);
  auto kernel = &adapter_fused_kernel<scalar_t, index_t>;
  allow_dynamic_smem(kernel, smem);
  kernel<<<static_cast<unsigned>(tiles), kThreads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return true;
}

}  // namespace

void adapter_cuda_kernel(const AdapterInputs& in, at::Tensor& out, at::Tensor& hidden_pre) {
  const c10::cuda::CUDAGuard device_guard(in.down.x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  bool fused = false;
  SA_DISPATCH_VALUE_AND_INDEX_TYPES(in.down.x.scalar_type(), in.down.crow_indices.scalar_type(), "adapter_cuda", [&] {
    fused = launch_fused<scalar_t, index_t>(in, out, hidden_pre, stream);
  });
  if (!fused) {
    adapter_composite_kernel<CudaBackend>(in, out, hidden_pre);
  }
}

}  // namespace sparseadapter
