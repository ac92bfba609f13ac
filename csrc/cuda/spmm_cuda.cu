// CUDA SpMM: y = x @ W.T + b with W in CSR, our own kernel (no cuSPARSE, W never densified).
//
// One block computes a tile of T tokens for a range of R output rows ("row positions": positions in
// row_order when given, so that each block's warps take the longest rows first, round-robin).
//  - x[tile, :] is staged once in shared memory, converted to the accumulation type and laid out
//    (cuda_utils.cuh) so that a warp reads one column for its 32 tokens without bank conflicts.
//    Every row of the block reuses it: the tile is read from global memory once per block.
//  - T = 32: lane = token. A warp walks a row's nonzeros 32 at a time: the lanes load 32 (col, value)
//    pairs coalesced into a per-warp buffer, then every lane runs over them (broadcast reads):
//    one shared load and one FMA per nonzero and token (csr_row_dot_tile32, shared with the fused
//    adapter).
//  - T = 1 (one or very few tokens, e.g. serving): lane = nonzero, then a warp reduction.
//  - The output tile is gathered in shared memory and written with coalesced stores: y's rows are
//    contiguous over out_features. When row_order is given and one block covers all rows, results
//    are kept by row index, so the stores stay contiguous whatever the order.
//  - When x's tile does not fit in shared memory (large in_features) the columns are processed in
//    chunks of kc; each chunk visits every nonzero of the row and keeps those of the chunk (column
//    order within rows is not required to be sorted), accumulating into the shared output tile.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <climits>

#include "../dispatch.h"
#include "../kernels.h"
#include "cuda_utils.cuh"

namespace sparseadapter {
namespace {

using namespace cuda_utils;

constexpr int kThreads = 512;  // 16 warps: enough loads in flight at one block per SM
constexpr int kWarps = kThreads / 32;

template <typename scalar_t, typename index_t>
struct SpmmParams {
  const scalar_t* x;
  const scalar_t* values;
  const index_t* crow;
  const index_t* col;
  const index_t* order;  // nullptr: identity
  const scalar_t* bias;  // nullptr: no bias
  scalar_t* y;
  int64_t num_tokens;
  int64_t in_features;
  int64_t out_features;
  int splits;          // blocks per token tile; block b: tile b / splits, positions of split b % splits
  int rows_per_block;  // R
  int ys_pitch;        // odd, >= R: conflict-free stores of the output tile by lane = token
  int kc;              // columns per staged chunk; 0: no nonzeros, y = bias
};

template <typename index_t>
__device__ __forceinline__ int64_t row_at(const index_t* order, int64_t pos) {
  return order ? static_cast<int64_t>(order[pos]) : pos;
}

template <typename scalar_t, typename index_t, int T>
__global__ void __launch_bounds__(kThreads) spmm_tiled_kernel(const SpmmParams<scalar_t, index_t> p) {
  using acc_t = at::opmath_type<scalar_t>;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* ev = reinterpret_cast<acc_t*>(smem_raw);          // [kWarps][32] values (T == 32)
  int* eo = reinterpret_cast<int*>(ev + kWarps * 32);      // [kWarps][32] tile offsets (T == 32)
  acc_t* ys = reinterpret_cast<acc_t*>(eo + kWarps * 32);  // [T][ys_pitch] output tile
  acc_t* xs = ys + T * p.ys_pitch;                         // [kc] x [T] staged x chunk

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int t = lane % T;
  const int sub = lane / T;
  const int64_t tile = blockIdx.x / p.splits;
  const int split = blockIdx.x % p.splits;
  const int64_t n0 = tile * T;
  const int nt = static_cast<int>(min(static_cast<int64_t>(T), p.num_tokens - n0));
  const int64_t p0 = static_cast<int64_t>(split) * p.rows_per_block;
  const int rows = static_cast<int>(min(static_cast<int64_t>(p.rows_per_block), p.out_features - p0));
  // One block per tile covers every row: keep results by row index, so y's stores are contiguous.
  const bool by_row = p.splits == 1;

  // The bias initialises the output tile; every chunk then adds its share.
  for (int j = warp; j < rows; j += kWarps) {
    const int64_t r = row_at(p.order, p0 + j);
    const int slot = by_row ? static_cast<int>(r) : j;
    if (sub == 0) {
      ys[t * p.ys_pitch + slot] = p.bias ? static_cast<acc_t>(p.bias[r]) : acc_t(0);
    }
  }

  for (int64_t k0 = 0; p.kc > 0 && k0 < p.in_features; k0 += p.kc) {
    const int w = static_cast<int>(min(static_cast<int64_t>(p.kc), p.in_features - k0));
    __syncthreads();  // the previous chunk's readers are done
    stage_x_tile<T>(p.x, p.in_features, n0, nt, k0, w, xs);
    __syncthreads();

    for (int j = warp; j < rows; j += kWarps) {
      const int64_t r = row_at(p.order, p0 + j);
      const int slot = by_row ? static_cast<int>(r) : j;
      acc_t acc = 0;
      if constexpr (T == 32) {
        acc = csr_row_dot_tile32(
            p.values, p.col, p.crow[r], p.crow[r + 1], k0, w, xs, ev + warp * 32, eo + warp * 32, lane);
      } else {
        // lane = nonzero, then the warp reduction below
        for (int64_t e = p.crow[r] + lane; e < p.crow[r + 1]; e += 32) {
          const int64_t c = static_cast<int64_t>(p.col[e]) - k0;
          if (c >= 0 && c < w) {
            acc += static_cast<acc_t>(p.values[e]) * xs[c];
          }
        }
      }
#pragma unroll
      for (int off = T; off < 32; off <<= 1) {
        acc += warp_shfl_xor(acc, off);
      }
      if (sub == 0) {
        ys[t * p.ys_pitch + slot] += acc;  // this slot belongs to this warp alone
      }
    }
  }
  __syncthreads();

  // Coalesced write of the output tile.
  scalar_t* y = p.y + n0 * p.out_features;
  if (by_row) {
    const int out = static_cast<int>(p.out_features);
    for (int i = threadIdx.x; i < nt * out; i += blockDim.x) {
      const int tt = i / out;
      const int c = i - tt * out;
      y[static_cast<int64_t>(tt) * out + c] = static_cast<scalar_t>(ys[tt * p.ys_pitch + c]);
    }
  } else {
    for (int i = threadIdx.x; i < nt * rows; i += blockDim.x) {
      const int tt = i / rows;
      const int j = i - tt * rows;
      y[tt * p.out_features + row_at(p.order, p0 + j)] = static_cast<scalar_t>(ys[tt * p.ys_pitch + j]);
    }
  }
}

template <typename scalar_t, typename index_t, int T>
void launch_spmm(const SpmmInputs& in, at::Tensor& y, const DeviceLimits& dev, cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  const bool has_order = in.row_order.has_value();
  const int64_t out = in.out_features;
  const int64_t tiles = ceil_div(in.num_tokens, T);

  // Enough blocks for two per SM, but no block with fewer rows than warps. With row_order and
  // enough tiles to fill the GPU, one block per tile (rows kept by index, contiguous stores).
  int64_t splits = std::clamp<int64_t>(ceil_div(2 * dev.sm_count, tiles), 1, ceil_div(out, kWarps));
  if (has_order && tiles >= dev.sm_count) {
    splits = 1;
  }
  // Shared memory: x's chunk first (fewest chunks), keeping room for an output tile of at least
  // kMinRows rows; the output tile then takes what is left. kc depends only on in_features, the
  // dtype and the device, never on row_order or the split: chunking fixes the order of the
  // additions, so the same row gives the same bits whichever block computes it.
  constexpr int64_t kMinRows = 256;
  const int64_t acc_bytes = sizeof(acc_t);
  const int64_t fixed = kWarps * 32 * (acc_bytes + static_cast<int64_t>(sizeof(int)));  // pair buffers
  const int64_t budget = dev.smem_optin - fixed;
  const int64_t col_bytes = T * acc_bytes;
  int64_t kc = 0;
  if (in.nnz > 0 && in.in_features > 0) {
    kc = std::min<int64_t>(in.in_features, (budget - T * (kMinRows + 1) * acc_bytes) / col_bytes);
    if (kc < in.in_features) {
      kc -= kc % 32;  // whole 16-byte vectors per chunk
    }
    TORCH_CHECK(kc > 0, "spmm: not enough shared memory");
  }
  const int64_t max_rows = (budget - kc * col_bytes) / col_bytes - 1;  // pitch = rows | 1 fits
  int64_t rows = std::min(ceil_div(out, splits), max_rows);
  splits = ceil_div(out, rows);  // no empty splits
  rows = ceil_div(out, splits);
  const int64_t pitch = rows | 1;
  const int64_t ys_bytes = T * pitch * acc_bytes;
  const int64_t grid = tiles * splits;
  TORCH_CHECK(grid <= INT_MAX, "spmm: too many tokens for one launch (", in.num_tokens, ")");

  SpmmParams<scalar_t, index_t> p;
  p.x = in.x.const_data_ptr<scalar_t>();
  p.values = in.values.const_data_ptr<scalar_t>();
  p.crow = in.crow_indices.const_data_ptr<index_t>();
  p.col = in.col_indices.const_data_ptr<index_t>();
  p.order = has_order ? in.row_order->const_data_ptr<index_t>() : nullptr;
  p.bias = in.bias.has_value() ? in.bias->const_data_ptr<scalar_t>() : nullptr;
  p.y = y.mutable_data_ptr<scalar_t>();
  p.num_tokens = in.num_tokens;
  p.in_features = in.in_features;
  p.out_features = out;
  p.splits = static_cast<int>(splits);
  p.rows_per_block = static_cast<int>(rows);
  p.ys_pitch = static_cast<int>(pitch);
  p.kc = static_cast<int>(kc);

  const size_t smem = static_cast<size_t>(fixed + ys_bytes + kc * col_bytes);
  auto kernel = &spmm_tiled_kernel<scalar_t, index_t, T>;
  allow_dynamic_smem(kernel, smem);
  kernel<<<static_cast<unsigned>(grid), kThreads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void spmm_cuda_kernel(const SpmmInputs& in, at::Tensor& y) {
  const c10::cuda::CUDAGuard device_guard(in.x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto dev = device_limits(in.x.get_device());
  SA_DISPATCH_VALUE_AND_INDEX_TYPES(in.x.scalar_type(), in.crow_indices.scalar_type(), "spmm_cuda", [&] {
    // A handful of tokens would leave most lanes of a 32-token tile idle: one token per tile.
    if (in.num_tokens <= 4) {
      launch_spmm<scalar_t, index_t, 1>(in, y, dev, stream);
    } else {
      launch_spmm<scalar_t, index_t, 32>(in, y, dev, stream);
    }
  });
}

}  // namespace sparseadapter
