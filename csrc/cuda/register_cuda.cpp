#include <torch/library.h>

#include "../op_wrappers.h"
#include "../prune.h"

namespace sparseadapter {

TORCH_LIBRARY_IMPL(sparseadapter, CUDA, m) {
  constexpr auto kCUDA = c10::DeviceType::CUDA;
  m.impl("spmm", &spmm_op<kCUDA, spmm_cuda_kernel>);
  m.impl("sparse_linear", &sparse_linear_op<kCUDA, spmm_cuda_kernel>);
  m.impl("sddmm", &sddmm_op<kCUDA, sddmm_cuda_kernel>);
  m.impl("sparse_adapter", &sparse_adapter_op<kCUDA, adapter_cuda_kernel>);
  m.impl("prune_score", &prune_score_cuda);
  m.impl("topk_masks", &topk_masks_cuda);
  m.impl("mask_to_csr", &mask_to_csr_cuda);
}

}  // namespace sparseadapter
