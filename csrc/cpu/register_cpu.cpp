#include <torch/library.h>

#include "../op_wrappers.h"

namespace sparseadapter {

TORCH_LIBRARY_IMPL(sparseadapter, CPU, m) {
  constexpr auto kCPU = c10::DeviceType::CPU;
  m.impl("spmm", &spmm_op<kCPU, spmm_cpu_kernel>);
  m.impl("sparse_linear", &sparse_linear_op<kCPU, spmm_cpu_kernel>);
  m.impl("sddmm", &sddmm_op<kCPU, sddmm_cpu_kernel>);
}

}  // namespace sparseadapter
