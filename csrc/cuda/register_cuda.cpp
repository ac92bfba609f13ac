#include <torch/library.h>

#include "../op_wrappers.h"

namespace sparseadapter {

TORCH_LIBRARY_IMPL(sparseadapter, CUDA, m) {
  constexpr auto kCUDA = c10::DeviceType::CUDA;
  m.impl("spmm", &spmm_op<kCUDA, spmm_cuda_kernel>);
  m.impl("sparse_linear", &sparse_linear_op<kCUDA, spmm_cuda_kernel>);
  m.impl("sddmm", &sddmm_op<kCUDA, sddmm_cuda_kernel>);
}

}  // namespace sparseadapter
