#include <torch/library.h>

#include "../op_wrappers.h"
#include "../prune.h"
#include "cuda_backend.h"

namespace sparseadapter {

TORCH_LIBRARY_IMPL(sparseadapter, CUDA, m) {
  m.impl("spmm", &spmm_op<CudaBackend>);
  m.impl("sparse_linear", &sparse_linear_op<CudaBackend>);
  m.impl("sparse_linear_forward", &sparse_linear_forward_op<CudaBackend>);
  m.impl("sddmm", &sddmm_op<CudaBackend>);
  m.impl("sparse_adapter", &sparse_adapter_op<CudaBackend>);
  m.impl("sparse_adapter_infer", &sparse_adapter_infer_op<CudaBackend>);
  m.impl("sparse_linear_backward", &sparse_linear_backward_op<CudaBackend>);
  m.impl("sparse_adapter_backward", &sparse_adapter_backward_op<CudaBackend>);
  m.impl("sparse_adapter_multi", &sparse_adapter_multi_op<CudaBackend>);
  m.impl("sparse_adapter_multi_backward", &sparse_adapter_multi_backward_op<CudaBackend>);
  m.impl("csr_to_dense", &csr_to_dense_op<CudaBackend>);
  m.impl("csr_gather", &csr_gather_op<CudaBackend>);
  m.impl("prune_score", &prune_score_cuda);
  m.impl("topk_masks", &topk_masks_cuda);
  m.impl("mask_to_csr", &mask_to_csr_cuda);
}

}  // namespace sparseadapter
