// CPU csr_to_dense and csr_gather: one pass over the rows, split across threads.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>

#include "../dispatch.h"
#include "../kernels.h"

namespace sparseadapter {
namespace {

// Rows per parallel work item: enough entries that a thread's start-up is paid back.
int64_t row_grain(const PatternData& in) {
  const int64_t per_row = std::max<int64_t>(1, in.num_cols + in.nnz / std::max<int64_t>(in.num_rows, 1));
  return std::max<int64_t>(1, 32768 / per_row);
}

}  // namespace

void csr_to_dense_cpu_kernel(const PatternData& in, at::Tensor& dense) {
  SA_DISPATCH_VALUE_AND_INDEX_TYPES(in.data.scalar_type(), in.crow_indices.scalar_type(), "csr_to_dense_cpu", [&] {
    const scalar_t* values = in.data.const_data_ptr<scalar_t>();
    const index_t* crow = in.crow_indices.const_data_ptr<index_t>();
    const index_t* col = in.col_indices.const_data_ptr<index_t>();
    scalar_t* out = dense.mutable_data_ptr<scalar_t>();
    const int64_t cols = in.num_cols;
    at::parallel_for(0, in.num_rows, row_grain(in), [&](int64_t r_begin, int64_t r_end) {
      for (int64_t r = r_begin; r < r_end; ++r) {
        scalar_t* row = out + r * cols;
        std::fill(row, row + cols, scalar_t(0));
        for (int64_t e = crow[r]; e < crow[r + 1]; ++e) {
          row[col[e]] = values[e];
        }
      }
    });
  });
}

void csr_gather_cpu_kernel(const PatternData& in, at::Tensor& out) {
  SA_DISPATCH_VALUE_AND_INDEX_TYPES(in.data.scalar_type(), in.crow_indices.scalar_type(), "csr_gather_cpu", [&] {
    const scalar_t* dense = in.data.const_data_ptr<scalar_t>();
    const index_t* crow = in.crow_indices.const_data_ptr<index_t>();
    const index_t* col = in.col_indices.const_data_ptr<index_t>();
    scalar_t* values = out.mutable_data_ptr<scalar_t>();
    const int64_t cols = in.num_cols;
    at::parallel_for(0, in.num_rows, row_grain(in), [&](int64_t r_begin, int64_t r_end) {
      for (int64_t r = r_begin; r < r_end; ++r) {
        const scalar_t* row = dense + r * cols;
        for (int64_t e = crow[r]; e < crow[r + 1]; ++e) {
          values[e] = row[col[e]];
        }
      }
    });
  });
}

}  // namespace sparseadapter
