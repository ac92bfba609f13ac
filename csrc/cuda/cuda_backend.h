// The CUDA back end as the op templates of op_wrappers.h see it.
#pragma once

#include "../kernels.h"
#include "../path_choice.h"

namespace sparseadapter {

// CUDA events on the current stream; nothing can be timed while that stream is captured into a graph.
const PathTimer& cuda_path_timer();

struct CudaBackend {
  static constexpr c10::DeviceType kDevice = c10::DeviceType::CUDA;
  static void spmm(const SpmmInputs& in, at::Tensor& y) { spmm_cuda_kernel(in, y); }
  static void sddmm(const SddmmInputs& in, at::Tensor& out) { sddmm_cuda_kernel(in, out); }
  static void adapter(const AdapterInputs& in, at::Tensor& out, at::Tensor& hidden_pre) {
    adapter_cuda_kernel(in, out, hidden_pre);
  }
  static void csr_to_dense(const PatternData& in, at::Tensor& dense) { csr_to_dense_cuda_kernel(in, dense); }
  static void csr_gather(const PatternData& in, at::Tensor& out) { csr_gather_cuda_kernel(in, out); }
  static bool adapter_dense_fused(
      const AdapterInputs& in,
      const at::Tensor& down,
      const at::Tensor& up,
      at::Tensor& out,
      at::Tensor& hidden_pre) {
    return adapter_dense_fused_cuda(in, down, up, out, hidden_pre);
  }
  static const PathTimer& timer() { return cuda_path_timer(); }
};

}  // namespace sparseadapter
