#include <torch/library.h>

#include "../op_wrappers.h"
#include "../prune.h"
#include "cpu_backend.h"

namespace sparseadapter {

TORCH_LIBRARY_IMPL(sparseadapter, CPU, m) {
  m.impl("spmm", &spmm_op<CpuBackend>);
  m.impl("sparse_linear", &sparse_linear_op<CpuBackend>);
  m.impl("sparse_linear_forward", &sparse_linear_forward_op<CpuBackend>);
  m.impl("sddmm", &sddmm_op<CpuBackend>);
  m.impl("sparse_adapter", &sparse_adapter_op<CpuBackend>);
  m.impl("sparse_adapter_infer", &sparse_adapter_infer_op<CpuBackend>);
  m.impl("sparse_linear_backward", &sparse_linear_backward_op<CpuBackend>);
  m.impl("sparse_adapter_backward", &sparse_adapter_backward_op<CpuBackend>);
  m.impl("sparse_adapter_multi", &sparse_adapter_multi_op<CpuBackend>);
  m.impl("sparse_adapter_multi_backward", &sparse_adapter_multi_backward_op<CpuBackend>);
  m.impl("csr_to_dense", &csr_to_dense_op<CpuBackend>);
  m.impl("csr_gather", &csr_gather_op<CpuBackend>);
  m.impl("prune_score", &prune_score_cpu);
  m.impl("topk_masks", &topk_masks_cpu);
  m.impl("mask_to_csr", &mask_to_csr_cpu);
}

}  // namespace sparseadapter
