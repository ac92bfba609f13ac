// CUDA csr_to_dense and csr_gather (one warp per row), and the CUDA timer of the path choice.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <climits>

#include "../dispatch.h"
#include "../kernels.h"
#include "cuda_backend.h"
#include "cuda_utils.cuh"

namespace sparseadapter {
namespace {

constexpr int kWarpsPerBlock = 8;

// Row r of the dense matrix: zeros, then the row's entries. The warp's writes are ordered by
// __syncwarp, so an entry is never overwritten by a zero.
template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kWarpsPerBlock * 32) csr_to_dense_kernel(
    const scalar_t* __restrict__ values,
    const index_t* __restrict__ crow,
    const index_t* __restrict__ col,
    int64_t num_rows,
    int64_t num_cols,
    scalar_t* __restrict__ dense) {
  const int lane = threadIdx.x % 32;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (r >= num_rows) {
    return;
  }
  scalar_t* row = dense + r * num_cols;
  for (int64_t c = lane; c < num_cols; c += 32) {
    row[c] = scalar_t(0);
  }
  __syncwarp();
  for (int64_t e = crow[r] + lane; e < crow[r + 1]; e += 32) {
    row[col[e]] = values[e];
  }
}

template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kWarpsPerBlock * 32) csr_gather_kernel(
    const scalar_t* __restrict__ dense,
    const index_t* __restrict__ crow,
    const index_t* __restrict__ col,
    int64_t num_rows,
    int64_t num_cols,
    scalar_t* __restrict__ values) {
  const int lane = threadIdx.x % 32;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (r >= num_rows) {
    return;
  }
  const scalar_t* row = dense + r * num_cols;
  for (int64_t e = crow[r] + lane; e < crow[r + 1]; e += 32) {
    values[e] = row[col[e]];
  }
}

unsigned row_blocks(int64_t num_rows) {
  const int64_t blocks = cuda_utils::ceil_div(num_rows, kWarpsPerBlock);
  TORCH_CHECK(blocks <= INT_MAX, "csr_to_dense: too many rows for one launch (", num_rows, ")");
  return static_cast<unsigned>(blocks);
}

}  // namespace

void csr_to_dense_cuda_kernel(const PatternData& in, at::Tensor& dense) {
  if (in.num_rows == 0) {
    return;
  }
  const c10::cuda::CUDAGuard guard(in.data.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  SA_DISPATCH_VALUE_AND_INDEX_TYPES(in.data.scalar_type(), in.crow_indices.scalar_type(), "csr_to_dense_cuda", [&] {
    csr_to_dense_kernel<scalar_t, index_t><<<row_blocks(in.num_rows), kWarpsPerBlock * 32, 0, stream>>>(
        in.data.const_data_ptr<scalar_t>(), in.crow_indices.const_data_ptr<index_t>(),
        in.col_indices.const_data_ptr<index_t>(), in.num_rows, in.num_cols, dense.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void csr_gather_cuda_kernel(const PatternData& in, at::Tensor& out) {
  if (in.num_rows == 0) {
    return;
  }
  const c10::cuda::CUDAGuard guard(in.data.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  SA_DISPATCH_VALUE_AND_INDEX_TYPES(in.data.scalar_type(), in.crow_indices.scalar_type(), "csr_gather_cuda", [&] {
    csr_gather_kernel<scalar_t, index_t><<<row_blocks(in.num_rows), kWarpsPerBlock * 32, 0, stream>>>(
        in.data.const_data_ptr<scalar_t>(), in.crow_indices.const_data_ptr<index_t>(),
        in.col_indices.const_data_ptr<index_t>(), in.num_rows, in.num_cols, out.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

const PathTimer& cuda_path_timer() {
  static const PathTimer timer{
      [](const c10::Device& device) {
        const c10::cuda::CUDAGuard guard(device);
        return c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None;
      },
      [](const std::function<void()>& run, const c10::Device& device) {
        const c10::cuda::CUDAGuard guard(device);
        const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
        cudaEvent_t start, stop;
        C10_CUDA_CHECK(cudaEventCreate(&start));
        C10_CUDA_CHECK(cudaEventCreate(&stop));
        C10_CUDA_CHECK(cudaEventRecord(start, stream));
        run();
        C10_CUDA_CHECK(cudaEventRecord(stop, stream));
        C10_CUDA_CHECK(cudaEventSynchronize(stop));
        float ms = 0;
        C10_CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
        C10_CUDA_CHECK(cudaEventDestroy(start));
        C10_CUDA_CHECK(cudaEventDestroy(stop));
        return static_cast<double>(ms);
      }};
  return timer;
}

}  // namespace sparseadapter
