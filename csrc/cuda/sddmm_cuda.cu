// CUDA SDDMM: out[e] = sum_n grad_out[n, row(e)] * x[n, col(e)], the gradient of spmm's values.
//
// A block owns kNnzPerBlock consecutive nonzeros (kPerThread per thread, strided by the block size
// so that the column loads are coalesced) and a chunk of token tiles. Each thread finds its
// nonzeros' rows once (binary search in crow_indices) and keeps their sums in registers over the
// whole chunk. For each tile of 32 tokens the block stages, converted to the accumulation type:
//  - x[tile, :] (cuda_utils.cuh layout: a warp reading 32 columns for one token is conflict-free
//    when the columns are consecutive), and
//  - grad_out[tile, r_lo..r_hi], the block's rows only (a contiguous range, since the nonzeros are),
//    transposed with an odd pitch; lanes mostly share a row, so these reads are broadcasts.
// The block's nonzeros span more than kMaxGRows rows only when many rows are empty or tiny; then
// grad_out is read from global memory (L1/L2) instead. When x's tile does not fit in shared memory
// (large in_features), x is read from global memory too (kStageX = false).
// Token chunks are spread over blocks to fill the GPU; their partial sums go to a [chunks, nnz]
// buffer reduced by at::sum, which, unlike float atomics, gives the same bits on every run.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <climits>
#include <type_traits>

#include "../dispatch.h"
#include "../kernels.h"
#include "cuda_utils.cuh"

namespace sparseadapter {
namespace {

using namespace cuda_utils;

constexpr int kThreads = 512;
constexpr int kPerThread = 4;  // nonzeros per thread: independent accumulators, no spills
constexpr int kNnzPerBlock = kThreads * kPerThread;
constexpr int kTile = 32;  // tokens per staged tile
constexpr int kGPitch = kTile + 1;
constexpr int kMaxGRows = 256;  // grad_out rows a block may stage

template <typename scalar_t, typename index_t>
struct SddmmParams {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* grad_out;
  const scalar_t* x;
  const index_t* crow;
  const index_t* col;
  acc_t* partial;  // [chunks, nnz]
  int64_t num_tokens;
  int64_t in_features;
  int64_t out_features;
  int64_t nnz;
  int64_t nnz_blocks;
  int64_t tiles_per_chunk;
};

// The row holding nonzero e: the largest r with crow[r] <= e (empty rows have crow[r] == crow[r+1]).
template <typename index_t>
__device__ __forceinline__ int64_t row_of(const index_t* crow, int64_t num_rows, int64_t e) {
  int64_t lo = 0, hi = num_rows - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (static_cast<int64_t>(crow[mid]) <= e) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// Staged: at most 64 registers (two blocks per SM where shared memory allows). Global reads: more
// registers for loads in flight, one block per SM (at 64 the float64 variant spilled).
template <typename scalar_t, typename index_t, bool kStageX>
__global__ void __launch_bounds__(kThreads, kStageX ? 2 : 1) sddmm_kernel(const SddmmParams<scalar_t, index_t> p) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int V = kVecWidth<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* gs = reinterpret_cast<acc_t*>(smem_raw);  // [kMaxGRows][kGPitch]
  acc_t* xs = gs + kMaxGRows * kGPitch;            // [in_features] x [kTile], if kStageX

  const int64_t nb = blockIdx.x % p.nnz_blocks;
  const int64_t chunk = blockIdx.x / p.nnz_blocks;
  const int64_t e_begin = nb * kNnzPerBlock;
  const int64_t e_stop = min(e_begin + kNnzPerBlock, p.nnz);
  const int64_t r_lo = row_of(p.crow, p.out_features, e_begin);
  const int64_t span = row_of(p.crow, p.out_features, e_stop - 1) - r_lo + 1;
  const bool stage_g = span <= kMaxGRows;

  // Invalid slots (past the block's end) point at row r_lo, column 0: safe reads, never stored.
  int64_t grow[kPerThread];  // row (global reads of grad_out)
  int gofs[kPerThread];      // offset of the row in gs
  int64_t xcol[kPerThread];  // column (global reads of x)
  int xofs[kPerThread];      // tile base of the column in xs
  acc_t acc[kPerThread];
#pragma unroll
  for (int k = 0; k < kPerThread; ++k) {
    const int64_t e = e_begin + threadIdx.x + k * kThreads;
    const bool valid = e < e_stop;
    grow[k] = valid ? row_of(p.crow, p.out_features, e) : r_lo;
    gofs[k] = stage_g ? static_cast<int>(grow[k] - r_lo) * kGPitch : 0;
    xcol[k] = valid ? static_cast<int64_t>(p.col[e]) : 0;
    xofs[k] = kStageX ? tile_base<kTile, V>(static_cast<int>(xcol[k])) : 0;
    acc[k] = 0;
  }

  const int64_t tiles = ceil_div(p.num_tokens, kTile);
  const int64_t tile_end = min(tiles, (chunk + 1) * p.tiles_per_chunk);
  for (int64_t tile = chunk * p.tiles_per_chunk; tile < tile_end; ++tile) {
    const int64_t n0 = tile * kTile;
    const int nt = static_cast<int>(min(static_cast<int64_t>(kTile), p.num_tokens - n0));
    __syncthreads();  // the previous tile's readers are done
    if constexpr (kStageX) {
      stage_x_tile<kTile>(p.x, p.in_features, n0, nt, 0, static_cast<int>(p.in_features), xs);
    }
    if (stage_g) {
      const int sp = static_cast<int>(span);
      for (int i = threadIdx.x; i < kTile * sp; i += blockDim.x) {
        const int t = i / sp;
        const int j = i - t * sp;
        gs[j * kGPitch + t] = t < nt ? static_cast<acc_t>(p.grad_out[(n0 + t) * p.out_features + r_lo + j]) : acc_t(0);
      }
    }
    __syncthreads();

    // Both tiles staged: a fixed trip count (tokens past nt read staged zeros). Otherwise some
    // reads go to global memory, and the loop stops at nt.
    const auto g_at = [&](int k, int t) -> acc_t {
      return stage_g ? gs[gofs[k] + t] : static_cast<acc_t>(p.grad_out[(n0 + t) * p.out_features + grow[k]]);
    };
    const auto x_at = [&](int k, int t) -> acc_t {
      if constexpr (kStageX) {
        return xs[xofs[k] ^ t];
      } else {
        return static_cast<acc_t>(p.x[(n0 + t) * p.in_features + xcol[k]]);
      }
    };
    if (kStageX && stage_g) {
#pragma unroll 8
      for (int t = 0; t < kTile; ++t) {
#pragma unroll
        for (int k = 0; k < kPerThread; ++k) {
          acc[k] += gs[gofs[k] + t] * x_at(k, t);
        }
      }
    } else {
#pragma unroll 2
      for (int t = 0; t < nt; ++t) {
#pragma unroll
        for (int k = 0; k < kPerThread; ++k) {
          acc[k] += g_at(k, t) * x_at(k, t);
        }
      }
    }
  }

  acc_t* dst = p.partial + chunk * p.nnz;
#pragma unroll
  for (int k = 0; k < kPerThread; ++k) {
    const int64_t e = e_begin + threadIdx.x + k * kThreads;
    if (e < e_stop) {
      dst[e] = acc[k];
    }
  }
}

template <typename scalar_t, typename index_t, bool kStageX>
void launch_sddmm(const SddmmParams<scalar_t, index_t>& p, int64_t grid, size_t smem, cudaStream_t stream) {
  auto kernel = &sddmm_kernel<scalar_t, index_t, kStageX>;
  allow_dynamic_smem(kernel, smem);
  kernel<<<static_cast<unsigned>(grid), kThreads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename index_t>
void run_sddmm(const SddmmInputs& in, at::Tensor& out, const DeviceLimits& dev, cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t tiles = ceil_div(in.num_tokens, kTile);
  const int64_t nnz_blocks = ceil_div(in.nnz, kNnzPerBlock);
  // Split the tokens so that there are about two blocks per SM.
  int64_t chunks = std::clamp<int64_t>(ceil_div(2 * dev.sm_count, nnz_blocks), 1, tiles);
  const int64_t tiles_per_chunk = ceil_div(tiles, chunks);
  chunks = ceil_div(tiles, tiles_per_chunk);
  const int64_t grid = nnz_blocks * chunks;
  TORCH_CHECK(grid <= INT_MAX, "sddmm: too many nonzeros for one launch (", in.nnz, ")");

  // One chunk in the accumulation type: the kernel writes the output directly.
  const bool direct = chunks == 1 && std::is_same_v<scalar_t, acc_t>;
  at::Tensor partial =
      direct ? out : at::empty({chunks, in.nnz}, out.options().dtype(c10::CppTypeToScalarType<acc_t>::value));

  SddmmParams<scalar_t, index_t> p;
  p.grad_out = in.grad_out.const_data_ptr<scalar_t>();
  p.x = in.x.const_data_ptr<scalar_t>();
  p.crow = in.crow_indices.const_data_ptr<index_t>();
  p.col = in.col_indices.const_data_ptr<index_t>();
  p.partial = partial.mutable_data_ptr<acc_t>();
  p.num_tokens = in.num_tokens;
  p.in_features = in.in_features;
  p.out_features = in.out_features;
  p.nnz = in.nnz;
  p.nnz_blocks = nnz_blocks;
  p.tiles_per_chunk = tiles_per_chunk;

  const int64_t g_bytes = kMaxGRows * kGPitch * static_cast<int64_t>(sizeof(acc_t));
  const int64_t x_bytes = in.in_features * kTile * static_cast<int64_t>(sizeof(acc_t));
  if (g_bytes + x_bytes <= dev.smem_optin) {
    launch_sddmm<scalar_t, index_t, true>(p, grid, static_cast<size_t>(g_bytes + x_bytes), stream);
  } else {
    launch_sddmm<scalar_t, index_t, false>(p, grid, static_cast<size_t>(g_bytes), stream);
  }
  if (!direct) {
    out.copy_(chunks == 1 ? partial[0] : partial.sum(0));
  }
}

}  // namespace

void sddmm_cuda_kernel(const SddmmInputs& in, at::Tensor& out) {
  const c10::cuda::CUDAGuard device_guard(in.x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto dev = device_limits(in.x.get_device());
  SA_DISPATCH_VALUE_AND_INDEX_TYPES(in.x.scalar_type(), in.crow_indices.scalar_type(), "sddmm_cuda", [&] {
    run_sddmm<scalar_t, index_t>(in, out, dev, stream);
  });
}

}  // namespace sparseadapter
