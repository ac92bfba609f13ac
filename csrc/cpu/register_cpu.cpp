#include <torch/library.h>

#include "../op_wrappers.h"
#include "../prune.h"

namespace sparseadapter {

TORCH_LIBRARY_IMPL(sparseadapter, CPU, m) {
  constexpr auto kCPU = c10::DeviceType::CPU;
  m.impl("spmm", &spmm_op<kCPU, spmm_cpu_kernel>);
  m.impl("sparse_linear", &sparse_linear_op<kCPU, spmm_cpu_kernel>);
  m.impl("sddmm", &sddmm_op<kCPU, sddmm_cpu_kernel>);
  m.impl("sparse_adapter", &sparse_adapter_op<kCPU, adapter_cpu_kernel>);
  m.impl("prune_score", &prune_score_cpu);
  m.impl("topk_masks", &topk_masks_cpu);
  m.impl("mask_to_csr", &mask_to_csr_cpu);
}

}  // namespace sparseadapter
