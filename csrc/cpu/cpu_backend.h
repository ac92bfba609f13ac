// The CPU back end as the op templates of op_wrappers.h see it.
#pragma once

#include "../kernels.h"
#include "../path_choice.h"

namespace sparseadapter {

struct CpuBackend {
  static constexpr c10::DeviceType kDevice = c10::DeviceType::CPU;
  static void spmm(const SpmmInputs& in, at::Tensor& y) { spmm_cpu_kernel(in, y); }
  static void sddmm(const SddmmInputs& in, at::Tensor& out) { sddmm_cpu_kernel(in, out); }
  static void adapter(const AdapterInputs& in, at::Tensor& out, at::Tensor& hidden_pre) {
    adapter_cpu_kernel(in, out, hidden_pre);
  }
  static void csr_to_dense(const PatternData& in, at::Tensor& dense) { csr_to_dense_cpu_kernel(in, dense); }
  static void csr_gather(const PatternData& in, at::Tensor& out) { csr_gather_cpu_kernel(in, out); }
  // oneDNN / MKL products with their epilogues serve the dense adapter on CPU.
  static bool
  adapter_dense_fused(const AdapterInputs&, const at::Tensor&, const at::Tensor&, at::Tensor&, at::Tensor&) {
    return false;
  }
  static const PathTimer& timer() { return cpu_path_timer(); }
};

}  // namespace sparseadapter
