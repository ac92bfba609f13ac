// Pattern-only ops: computed once per sparsity pattern (at construction or load), never per step.
// They are plain ATen code, so one implementation serves CPU and CUDA tensors alike. Their argument
// checks, validate_csr's structural check among them, are in validation.cpp.
#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>

#include "validation.h"

namespace sparseadapter {
namespace {

// Row index of every stored entry (COO rows), in the index dtype of the pattern.
at::Tensor row_indices(const at::Tensor& crow_indices, const at::Tensor& col_indices) {
  const bool int32 = crow_indices.scalar_type() == at::kInt;
  return at::_convert_indices_from_csr_to_coo(crow_indices, col_indices, int32, /*transpose=*/false).select(0, 0);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor>
csr_transpose(const at::Tensor& crow_indices, const at::Tensor& col_indices, c10::SymInt num_cols_sym) {
  constexpr const char* op = "csr_transpose";
  const int64_t num_cols = num_cols_sym.guard_int(__FILE__, __LINE__);
  // The ATen index conversions below write through the indices, so the whole structure is checked.
  check_csr_transpose_inputs(crow_indices, col_indices, num_cols);
  const auto crow = crow_indices.contiguous();
  const auto col = col_indices.contiguous();
  const bool int32 = crow.scalar_type() == at::kInt;

  // A stable sort by column keeps each column's entries in row order: that is CSR of W.T.
  const auto [sorted_cols, perm] = at::sort(col, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  at::Tensor crow_t;
  try {
    crow_t = at::_convert_indices_from_coo_to_csr(sorted_cols, num_cols, int32);
  } catch (const c10::OutOfMemoryError& e) {
    TORCH_CHECK_VALUE(
        false, op, ": num_cols = ", num_cols, ": the transposed pattern's crow_indices (", num_cols,
        " + 1 entries) could not be allocated on ", crow.device());
  }
  auto col_t = row_indices(crow, col).index_select(0, perm);
  return {crow_t, col_t, perm.to(crow.scalar_type())};
}

at::Tensor csr_row_order(const at::Tensor& crow_indices) {
  check_csr_row_order_inputs(crow_indices);
  const auto crow = crow_indices.contiguous();
  const auto row_nnz = crow.slice(0, 1) - crow.slice(0, 0, -1);
  return at::argsort(row_nnz, /*stable=*/true, /*dim=*/0, /*descending=*/true).to(crow.scalar_type());
}

void validate_csr(
    const at::Tensor& crow_indices,
    const at::Tensor& col_indices,
    c10::SymInt num_rows_sym,
    c10::SymInt num_cols_sym) {
  check_csr_structure(
      "validate_csr", crow_indices, col_indices, num_rows_sym.guard_int(__FILE__, __LINE__),
      num_cols_sym.guard_int(__FILE__, __LINE__));
}

TORCH_LIBRARY_IMPL(sparseadapter, CPU, m) {
  m.impl("csr_transpose", &csr_transpose);
  m.impl("csr_row_order", &csr_row_order);
  m.impl("validate_csr", &validate_csr);
}

// Plain ATen code runs on CUDA tensors too; registering the CUDA key needs no CUDA build.
TORCH_LIBRARY_IMPL(sparseadapter, CUDA, m) {
  m.impl("csr_transpose", &csr_transpose);
  m.impl("csr_row_order", &csr_row_order);
  m.impl("validate_csr", &validate_csr);
}

}  // namespace sparseadapter
