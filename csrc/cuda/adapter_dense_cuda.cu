// The bottleneck adapter on dense (per-call expanded) weights in one pass on tensor cores, bf16 / fp16:
//   out = residual + scale * (act(x @ D.T + bd) @ U.T + bu),  D [R, K], U [M, R].
//
// One warp owns 32 tokens (MT = 2 m16 tiles) for the whole chain (mma.sync m16n8k16, fp32 accumulators):
//  1. down: x's rows stream through a per-warp cp.async pipeline in shared memory (kStages steps of 32
//     columns in flight, holding no registers); D's fragments are 16-byte loads from L1/L2. The
//     bottleneck tile [16*MT, R] accumulates in registers, starting from the bias.
//  2. the pre-activation is stored when the backward keeps it; the activation runs in registers, and
//     the accumulators become the A fragments of the up projection without leaving registers (the
//     accumulator layout of two n8 tiles is the A layout of one k16 step).
//  3. up: 32 output columns at a time, U's fragments from L1/L2; scale, bias and residual are applied
//     in fp32 and each thread stores 16 contiguous bytes per row.
// x and the residual are read once, out is written once; the bottleneck never reaches memory.
//
// Every global access is 16 bytes per thread because the K order inside each 32-wide step is
// permuted, identically for both operands (a sum does not care about its order): thread (g, q) of
// the mma layout (g = lane / 4, q = lane % 4) supplies virtual k {2q, 2q+1, 2q+8, 2q+9} of the two
// k16 steps from real columns 8q .. 8q+7. The bottleneck units and the output columns are permuted
// the same way (real_unit, real_out), so that stores and U's rows are contiguous too.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <climits>
#include <cstdint>
#include <type_traits>

#include "../kernels.h"
#include "activation.cuh"
#include "cuda_utils.cuh"

namespace sparseadapter {
namespace {

using cuda_utils::activate;

constexpr int kWarps = 4;
constexpr int kStages = 4;  // 32-column steps of x in flight per warp

template <typename T>
struct TcParams {
  const T* x;          // [N, K]
  const T* down;       // [R, K]
  const T* down_bias;  // [R] or nullptr
  const T* up;         // [M, R]
  const T* up_bias;    // [M] or nullptr
  const T* residual;   // [N, M] or nullptr
  T* out;              // [N, M]
  T* hidden_pre;       // [N, R] or nullptr
  int64_t num_tokens;
  int in_features;   // K, a multiple of 32
  int out_features;  // M, a multiple of 32
  Activation activation;
  float scale;
};

template <typename T>
struct Pack;
template <>
struct Pack<c10::BFloat16> {
  __device__ static uint32_t two(float lo, float hi) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
  __device__ static float2 unpack(uint32_t v) {
    return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&v));
  }
  __device__ static float one(c10::BFloat16 v) { return static_cast<float>(v); }
};
template <>
struct Pack<c10::Half> {
  __device__ static uint32_t two(float lo, float hi) {
    const __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
  __device__ static float2 unpack(uint32_t v) { return __half22float2(*reinterpret_cast<const __half2*>(&v)); }
  __device__ static float one(c10::Half v) { return static_cast<float>(v); }
};

// d += a * b for one m16n8k16 tile, fp32 accumulate.
template <typename T>
__device__ __forceinline__ void
mma(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
#else
  __trap();  // launched only on sm_80 and newer (adapter_dense_fused_cuda checks)
#endif
}

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int bytes = valid ? 16 : 0;  // 0: the 16 bytes are zero-filled (rows past the last token)
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(bytes));
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
#endif
}

__device__ __forceinline__ uint4 ldg16(const void* p) {
  return __ldg(reinterpret_cast<const uint4*>(p));
}

// The real bottleneck unit (row of D) of virtual column 8j + n of the down projection's output. The
// thread holding accumulator columns 2q, 2q+1 of n-tiles 4s..4s+3 then holds units 32s+8q .. 32s+8q+7.
__device__ __forceinline__ int real_unit(int j, int n) {
  return 32 * (j >> 2) + 8 * (n >> 1) + 2 * (j & 3) + (n & 1);
}
// The real output column of virtual column 8jj + n of a 32-column output chunk (same scheme).
__device__ __forceinline__ int real_out(int jj, int n) {
  return 8 * (n >> 1) + 2 * jj + (n & 1);
}

// R: bottleneck width, 32 or 64: the bottleneck tile, MT * R / 2 accumulators per thread, stays in
// registers without spilling. (Measured on an H200: with one m16 tile per warp, R = 256 spilled and
// ran 1.8x slower than cuBLAS; wider bottlenecks take the cuBLAS products.)
template <typename T, int R>
__global__ void __launch_bounds__(kWarps * 32) adapter_dense_tc_kernel(const TcParams<T> p) {
  constexpr int MT = 2;       // m16 tiles (16 tokens each) per warp
  constexpr int NJ = R / 8;   // n8 tiles of the bottleneck
  constexpr int NS = R / 32;  // 32-wide k steps of the up projection
  constexpr int kRows = 16 * MT;
  __shared__ __align__(16) T stage_buf[kWarps][kStages][kRows][32];

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int g = lane >> 2;
  const int q = lane & 3;
  const int64_t t0 = (static_cast<int64_t>(blockIdx.x) * kWarps + warp) * kRows;
  if (t0 >= p.num_tokens) {
    return;  // no block-wide barrier below: warps are independent
  }
  const int K = p.in_features;
  const int M = p.out_features;

  // This thread's rows: m-tile m, half h (row g or g + 8).
  int64_t row[MT][2];
  bool valid[MT][2];
#pragma unroll
  for (int m = 0; m < MT; ++m) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      row[m][h] = t0 + 16 * m + 8 * h + g;
      valid[m][h] = row[m][h] < p.num_tokens;
    }
  }
  // Each thread stages exactly the 16-byte pieces it reads back, so the pipeline needs no barrier
  // between lanes, only the thread's own wait on its copies.
  auto stage = [&](int k0, int slot) {
#pragma unroll
    for (int m = 0; m < MT; ++m) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const bool live = valid[m][h] && k0 < K;
        const T* src = p.x + (live ? row[m][h] * K + k0 : 0) + 8 * q;  // an address inside x even when unread
        cp_async16(&stage_buf[warp][slot][16 * m + 8 * h + g][8 * q], src, live);
      }
    }
    cp_async_commit();
  };

  // 1. Down projection.
  float acc[MT][NJ][4];
#pragma unroll
  for (int j = 0; j < NJ; ++j) {
    const float b0 = p.down_bias ? Pack<T>::one(p.down_bias[real_unit(j, 2 * q)]) : 0.f;
    const float b1 = p.down_bias ? Pack<T>::one(p.down_bias[real_unit(j, 2 * q + 1)]) : 0.f;
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      acc[m][j][0] = acc[m][j][2] = b0;
      acc[m][j][1] = acc[m][j][3] = b1;
    }
  }
  const int steps = K / 32;
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    stage(32 * s, s);  // past the last step: empty groups, so the wait count below stays uniform
  }
  for (int s = 0; s < steps; ++s) {
    stage(32 * (s + kStages - 1), (s + kStages - 1) % kStages);
    cp_async_wait<kStages - 1>();
    const int slot = s % kStages;
    uint4 xa[MT][2];
#pragma unroll
    for (int m = 0; m < MT; ++m) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        xa[m][h] = *reinterpret_cast<const uint4*>(&stage_buf[warp][slot][16 * m + 8 * h + g][8 * q]);
      }
    }
    const int k0 = 32 * s + 8 * q;
#pragma unroll
    for (int j = 0; j < NJ; ++j) {
      const uint4 wb = ldg16(p.down + static_cast<int64_t>(real_unit(j, g)) * K + k0);
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        mma<T>(acc[m][j], xa[m][0].x, xa[m][1].x, xa[m][0].y, xa[m][1].y, wb.x, wb.y);
        mma<T>(acc[m][j], xa[m][0].z, xa[m][1].z, xa[m][0].w, xa[m][1].w, wb.z, wb.w);
      }
    }
  }
  cp_async_wait<0>();

  // 2. Pre-activation out (units 32s + 8q .. +7 of each row: one 16-byte store), then the activation.
  if (p.hidden_pre) {
#pragma unroll
    for (int m = 0; m < MT; ++m) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        if (!valid[m][h]) continue;
#pragma unroll
        for (int s = 0; s < NS; ++s) {
          uint4 v;
          uint32_t* w = reinterpret_cast<uint32_t*>(&v);
#pragma unroll
          for (int i = 0; i < 4; ++i) {  // units 2i, 2i+1 of the eight: n-tile 4s + i, columns 2q, 2q+1
            w[i] = Pack<T>::two(acc[m][4 * s + i][2 * h], acc[m][4 * s + i][2 * h + 1]);
          }
          *reinterpret_cast<uint4*>(p.hidden_pre + row[m][h] * R + 32 * s + 8 * q) = v;
        }
      }
    }
  }
  uint32_t ha[MT][NS][2][4];  // A fragments of the up projection: [m][k32 step][k16 half][reg]
#pragma unroll
  for (int m = 0; m < MT; ++m) {
#pragma unroll
    for (int s = 0; s < NS; ++s) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int lo = 4 * s + 2 * h;  // n-tile giving virtual k 2q, 2q+1; lo + 1 gives 2q+8, 2q+9
        float a[8];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          a[i] = activate(acc[m][lo][i], p.activation);
          a[4 + i] = activate(acc[m][lo + 1][i], p.activation);
        }
        ha[m][s][h][0] = Pack<T>::two(a[0], a[1]);  // row g, k lo
        ha[m][s][h][1] = Pack<T>::two(a[2], a[3]);  // row g + 8, k lo
        ha[m][s][h][2] = Pack<T>::two(a[4], a[5]);  // row g, k hi
        ha[m][s][h][3] = Pack<T>::two(a[6], a[7]);  // row g + 8, k hi
      }
    }
  }

  // 3. Up projection, 32 output columns at a time.
  for (int n0 = 0; n0 < M; n0 += 32) {
    float o[MT][4][4];
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
      for (int jj = 0; jj < 4; ++jj)
#pragma unroll
        for (int i = 0; i < 4; ++i) o[m][jj][i] = 0.f;
#pragma unroll
    for (int s = 0; s < NS; ++s) {
#pragma unroll
      for (int jj = 0; jj < 4; ++jj) {
        const uint4 wu = ldg16(p.up + static_cast<int64_t>(n0 + real_out(jj, g)) * R + 32 * s + 8 * q);
#pragma unroll
        for (int m = 0; m < MT; ++m) {
          mma<T>(o[m][jj], ha[m][s][0][0], ha[m][s][0][1], ha[m][s][0][2], ha[m][s][0][3], wu.x, wu.y);
          mma<T>(o[m][jj], ha[m][s][1][0], ha[m][s][1][1], ha[m][s][1][2], ha[m][s][1][3], wu.z, wu.w);
        }
      }
    }
    // This thread holds columns n0 + 8q + (2jj + b) of rows g and g + 8 of each m-tile.
    float bias[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      bias[e] = p.up_bias ? Pack<T>::one(p.up_bias[n0 + 8 * q + e]) : 0.f;
    }
#pragma unroll
    for (int m = 0; m < MT; ++m) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        if (!valid[m][h]) continue;
        const int64_t at = row[m][h] * M + n0 + 8 * q;
        float res[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
        if (p.residual) {
          const uint4 r = __ldcs(reinterpret_cast<const uint4*>(p.residual + at));
          const uint32_t* rw = reinterpret_cast<const uint32_t*>(&r);
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const float2 f = Pack<T>::unpack(rw[i]);
            res[2 * i] = f.x;
            res[2 * i + 1] = f.y;
          }
        }
        uint4 v;
        uint32_t* w = reinterpret_cast<uint32_t*>(&v);
#pragma unroll
        for (int jj = 0; jj < 4; ++jj) {
          const int e = 2 * jj;
          w[jj] = Pack<T>::two(
              res[e] + p.scale * (o[m][jj][2 * h] + bias[e]),
              res[e + 1] + p.scale * (o[m][jj][2 * h + 1] + bias[e + 1]));
        }
        __stcs(reinterpret_cast<uint4*>(p.out + at), v);
      }
    }
  }
}

template <typename T, int R>
void launch(const TcParams<T>& p, cudaStream_t stream) {
  const int64_t blocks = cuda_utils::ceil_div(p.num_tokens, kWarps * 32);
  TORCH_CHECK(blocks <= INT_MAX, "sparse_adapter: too many tokens for one launch (", p.num_tokens, ")");
  adapter_dense_tc_kernel<T, R><<<static_cast<unsigned>(blocks), kWarps * 32, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
bool dispatch_width(const TcParams<T>& p, int64_t bottleneck, cudaStream_t stream) {
  switch (bottleneck) {
    case 32: launch<T, 32>(p, stream); return true;
    case 64: launch<T, 64>(p, stream); return true;
    default: return false;
  }
}

bool aligned16(const at::Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0;
}

template <typename T>
bool run_tc(
    const AdapterInputs& in,
    const at::Tensor& down,
    const at::Tensor& up,
    at::Tensor& out,
    at::Tensor& hidden_pre,
    cudaStream_t stream) {
  TcParams<T> p;
  p.x = in.down.x.const_data_ptr<T>();
  p.down = down.const_data_ptr<T>();
  p.down_bias = in.down.bias.has_value() ? in.down.bias->const_data_ptr<T>() : nullptr;
  p.up = up.const_data_ptr<T>();
  p.up_bias = in.up.bias.has_value() ? in.up.bias->const_data_ptr<T>() : nullptr;
  p.residual = in.residual.has_value() ? in.residual->const_data_ptr<T>() : nullptr;
  p.out = out.mutable_data_ptr<T>();
  p.hidden_pre = hidden_pre.numel() > 0 ? hidden_pre.mutable_data_ptr<T>() : nullptr;
  p.num_tokens = in.down.num_tokens;
  p.in_features = static_cast<int>(in.down.in_features);
  p.out_features = static_cast<int>(in.up.out_features);
  p.activation = in.activation;
  p.scale = static_cast<float>(in.scale);
  return dispatch_width(p, in.down.out_features, stream);
}

}  // namespace

bool adapter_dense_fused_cuda(
    const AdapterInputs& in,
    const at::Tensor& down,
    const at::Tensor& up,
    at::Tensor& out,
    at::Tensor& hidden_pre) {
  const auto dtype = in.down.x.scalar_type();
  if (dtype != at::kBFloat16 && dtype != at::kHalf) {
    return false;
  }
  const int64_t K = in.down.in_features, R = in.down.out_features, M = in.up.out_features;
  if (K <= 0 || K % 32 != 0 || K > INT_MAX / 2 || M <= 0 || M % 32 != 0 || M > INT_MAX / 2 || (R != 32 && R != 64) ||
      out.numel() == 0) {
    return false;
  }
  if (!aligned16(in.down.x) || !aligned16(down) || !aligned16(up) || !aligned16(out) ||
      (in.residual.has_value() && !aligned16(*in.residual)) || (hidden_pre.numel() > 0 && !aligned16(hidden_pre))) {
    return false;
  }
  const c10::cuda::CUDAGuard guard(in.down.x.device());
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, in.down.x.get_device()));
  if (major < 8) {
    return false;  // mma.sync on bf16 / fp16 with fp32 accumulators and cp.async: sm_80 and newer
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  return dtype == at::kBFloat16 ? run_tc<c10::BFloat16>(in, down, up, out, hidden_pre, stream)
                                : run_tc<c10::Half>(in, down, up, out, hidden_pre, stream);
}

}  // namespace sparseadapter
