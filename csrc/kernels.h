// Kernel entry points of each back end. Inputs arrive checked, flattened to 2-D and contiguous
// (validation.h); outputs arrive allocated and contiguous. Every CUDA kernel has a CPU twin here
// that computes the same function (the tensor-core adapter's twin is the CPU dense path's composition
// of oneDNN / MKL products, dense_path.h).
#pragma once

#include <ATen/ATen.h>

#include "validation.h"

namespace sparseadapter {

// y[n, r] = bias[r] + sum_{e in row r} values[e] * x[n, col[e]];  y: [num_tokens, out_features].
// Must write every element of y, also when nnz == 0 or in_features == 0.
void spmm_cpu_kernel(const SpmmInputs& in, at::Tensor& y);
// out[e] = sum_n grad_out[n, row(e)] * x[n, col[e]];  out: [nnz]. Called with num_tokens > 0, nnz > 0.
void sddmm_cpu_kernel(const SddmmInputs& in, at::Tensor& out);

// out = residual + scale * (act(x @ D.T + bd) @ U.T + bu)  [num_tokens, out]; hidden_pre, when it has
// elements, receives x @ D.T + bd  [num_tokens, bottleneck]. Called with num_tokens > 0.
void adapter_cpu_kernel(const AdapterInputs& in, at::Tensor& out, at::Tensor& hidden_pre);

// The gradients sparse_adapter_backward returns; an undefined entry was not asked for.
struct AdapterGradients {
  at::Tensor x, down_values, down_bias, up_values, up_bias;
};

// dense [num_rows, num_cols] = the CSR matrix of in.data (values), zeros elsewhere.
void csr_to_dense_cpu_kernel(const PatternData& in, at::Tensor& dense);
// out[e] = in.data[row(e), col[e]] (in.data: the dense matrix); out: [nnz]. Called with nnz > 0.
void csr_gather_cpu_kernel(const PatternData& in, at::Tensor& out);
// out[e] = in.data[col[e], row(e)] (in.data: the dense matrix transposed, [num_cols, num_rows]).
void csr_gather_transposed_cpu_kernel(const PatternData& in, at::Tensor& out);

#ifdef SPARSEADAPTER_WITH_CUDA
void spmm_cuda_kernel(const SpmmInputs& in, at::Tensor& y);
void sddmm_cuda_kernel(const SddmmInputs& in, at::Tensor& out);
void adapter_cuda_kernel(const AdapterInputs& in, at::Tensor& out, at::Tensor& hidden_pre);
void csr_to_dense_cuda_kernel(const PatternData& in, at::Tensor& dense);
void csr_gather_cuda_kernel(const PatternData& in, at::Tensor& out);
// The adapter on dense weights (down [bottleneck, in], up [out, bottleneck], in x's dtype) in one
// pass on tensor cores; false when the dtype or shape is not one it serves (the caller composes
// cuBLAS products instead).
bool adapter_dense_fused_cuda(
    const AdapterInputs& in,
    const at::Tensor& down,
    const at::Tensor& up,
    at::Tensor& out,
    at::Tensor& hidden_pre);
#endif

}  // namespace sparseadapter
