// Device helpers shared by the CUDA kernels: device limits, vector loads, and the layout of a token
// tile of x staged in shared memory.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace sparseadapter {
namespace cuda_utils {

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// The limits every launch plan needs, read off the device of the inputs (cheap attribute reads).
struct DeviceLimits {
  int sm_count;
  int smem_optin;  // the most dynamic shared memory one block may ask for
};

inline DeviceLimits device_limits(int device) {
  DeviceLimits d{};
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&d.sm_count, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&d.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  return d;
}

// A block gets more than 48 KiB of dynamic shared memory only after its kernel's limit is raised.
template <typename Kernel>
inline void allow_dynamic_smem(Kernel kernel, size_t bytes) {
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  }
}

// N elements loaded or stored as one access (16 bytes for the 16-byte loads of x).
template <typename T, int N>
struct alignas(sizeof(T) * N >= 16 ? 16 : sizeof(T) * N) Vec {
  T v[N];
};

// Elements of scalar_t per 16-byte load.
template <typename scalar_t>
constexpr int kVecWidth = 16 / static_cast<int>(sizeof(scalar_t));

__device__ __forceinline__ float warp_shfl_xor(float v, int mask) {
  return __shfl_xor_sync(0xffffffffu, v, mask);
}
__device__ __forceinline__ double warp_shfl_xor(double v, int mask) {
  return __shfl_xor_sync(0xffffffffu, v, mask);
}

// ---------------------------------------------------------------------------------------------
// Staged x tile: T tokens x w columns, converted once to the accumulation type, stored so that
//  - a warp reading one column for its 32 tokens (spmm: lane = token), and
//  - a warp reading 32 different columns for one token (sddmm: lane = nonzero, consecutive columns
//    for dense rows)
// are free of bank conflicts (the latter: for 32 consecutive columns starting at a multiple of 32;
// any other 32 consecutive columns have at most one 2-way conflict), and so are the staging stores,
// where lane i writes column V*i + q of one token (V = elements per 16-byte load). For T = 32
// element (k, t) lives at k*32 + (t ^ f(k)), f(k) = (k / V + (k % V) * (32 / V)) mod 32: f is a
// bijection on the 32 columns {32*a + i} and on the 32 columns {V*i + q}. Since k*32 has no low bits,
// k*32 + (t ^ f(k)) == (k*32 + f(k)) ^ t: a reader keeps base(k) and xors in its token.
// For T = 1 (one token per tile) the tile is simply xs[k].
template <int T, int V>
__device__ __forceinline__ int tile_base(int k) {
  static_assert(T == 32 || T == 1, "token tiles are 32 tokens or 1");
  if constexpr (T == 32) {
    const int f = ((k / V) + (k % V) * (32 / V)) & 31;
    return (k << 5) | f;
  } else {
    return k;
  }
}

// Stages x[n0 : n0 + nt, k0 : k0 + w] (row pitch in_features) into xs; tokens nt..T-1 are zeroed so
// that lanes past the last token read defined values. Called by the whole block.
template <int T, typename scalar_t, typename acc_t>
__device__ __forceinline__ void stage_x_tile(
    const scalar_t* __restrict__ x,
    int64_t in_features,
    int64_t n0,
    int nt,
    int64_t k0,
    int w,
    acc_t* __restrict__ xs) {
  constexpr int V = kVecWidth<scalar_t>;
  const scalar_t* base = x + n0 * in_features + k0;
  const bool vec = in_features % V == 0 && w % V == 0 && reinterpret_cast<uintptr_t>(base) % 16 == 0;
  if (vec) {
    const int wv = w / V;
    const int total = nt * wv;
    for (int i = threadIdx.x; i < total; i += blockDim.x) {
      const int t = i / wv;
      const int k = (i - t * wv) * V;
      const auto v = *reinterpret_cast<const Vec<scalar_t, V>*>(base + t * in_features + k);
#pragma unroll
      for (int q = 0; q < V; ++q) {
        xs[tile_base<T, V>(k + q) ^ t] = static_cast<acc_t>(v.v[q]);
      }
    }
  } else {
    const int total = nt * w;
    for (int i = threadIdx.x; i < total; i += blockDim.x) {
      const int t = i / w;
      const int k = i - t * w;
      xs[tile_base<T, V>(k) ^ t] = static_cast<acc_t>(base[t * in_features + k]);
    }
  }
  const int missing = (T - nt) * w;
  for (int i = threadIdx.x; i < missing; i += blockDim.x) {
    const int t = nt + i / w;
    const int k = i % w;
    xs[tile_base<T, V>(k) ^ t] = acc_t(0);
  }
}

// One CSR row against a staged 32-token tile, lane = token: returns, for this lane's token, the sum
// of values[e] * tile(col[e] - k0, token) over the row's nonzeros e in [e_begin, e_end) whose column
// lies in [k0, k0 + w) (the staged chunk; column order within the row is free). The warp walks the
// nonzeros 32 at a time: the lanes load 32 (col, value) pairs coalesced, compact this chunk's pairs
// into the warp's buffers wev / weo (32 entries each), then every lane runs over them with broadcast
// reads: one shared load and one FMA per nonzero and token. Called by all 32 lanes of a warp.
template <typename scalar_t, typename index_t, typename acc_t>
__device__ __forceinline__ acc_t csr_row_dot_tile32(
    const scalar_t* __restrict__ values,
    const index_t* __restrict__ col,
    int64_t e_begin,
    int64_t e_end,
    int64_t k0,
    int w,
    const acc_t* __restrict__ tile,
    acc_t* wev,
    int* weo,
    int lane) {
  constexpr int V = kVecWidth<scalar_t>;
  acc_t acc0 = 0, acc1 = 0;
  for (int64_t e0 = e_begin; e0 < e_end; e0 += 32) {
    const int64_t e = e0 + lane;
    int64_t c = -1;
    acc_t v = 0;
    if (e < e_end) {
      c = static_cast<int64_t>(col[e]) - k0;
      v = static_cast<acc_t>(values[e]);
    }
    const bool mine = c >= 0 && c < w;
    const unsigned mask = __ballot_sync(0xffffffffu, mine);
    const int cnt = __popc(mask);
    __syncwarp();  // the previous batch's readers are done
    if (mine) {
      const int at = __popc(mask & ((1u << lane) - 1u));
      wev[at] = v;
      weo[at] = tile_base<32, V>(static_cast<int>(c));
    }
    __syncwarp();
    int i = 0;
    for (; i + 4 <= cnt; i += 4) {
      const auto v4 = *reinterpret_cast<const Vec<acc_t, 4>*>(wev + i);
      const auto o4 = *reinterpret_cast<const int4*>(weo + i);
      acc0 += v4.v[0] * tile[o4.x ^ lane];
      acc1 += v4.v[1] * tile[o4.y ^ lane];
      acc0 += v4.v[2] * tile[o4.z ^ lane];
      acc1 += v4.v[3] * tile[o4.w ^ lane];
    }
    for (; i < cnt; ++i) {
      acc0 += wev[i] * tile[weo[i] ^ lane];
    }
  }
  return acc0 + acc1;
}

}  // namespace cuda_utils
}  // namespace sparseadapter
