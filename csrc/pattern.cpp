// Pattern-only ops: computed once per sparsity pattern (at construction or load), never per step.
// They are plain ATen code, so one implementation serves CPU and CUDA tensors alike.
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
  return at::_convert_indices_from_csr_to_coo(crow_indices, col_indices, int32, /*transpose=*/false)
      .select(0, 0);
}

// The O(nnz) structural check of a CSR pattern of shape [num_rows, num_cols], reported as `op`:
// one index dtype and device, crow_indices of num_rows + 1 entries, starting at 0, non-decreasing,
// ending at nnz, and every column in [0, num_cols). Shared by validate_csr and csr_transpose.
void check_csr_structure(
    const char* op,
    const at::Tensor& crow_indices,
    const at::Tensor& col_indices,
    int64_t num_rows,
    int64_t num_cols) {
  TORCH_CHECK_TYPE(
      crow_indices.scalar_type() == col_indices.scalar_type(), op, ": col_indices has dtype ",
      col_indices.scalar_type(), " but crow_indices has dtype ", crow_indices.scalar_type());
  TORCH_CHECK_VALUE(
      crow_indices.device() == col_indices.device(), op, ": crow_indices is on ",
      crow_indices.device(), " but col_indices is on ", col_indices.device());
  TORCH_CHECK_VALUE(num_rows >= 0 && num_cols >= 0, op, ": shape [", num_rows, ", ", num_cols,
                    "] must be non-negative");
  // Compared as numel - 1 == num_rows and printed unsigned: num_rows + 1 overflows for 2^63 - 1.
  TORCH_CHECK_VALUE(
      crow_indices.numel() - 1 == num_rows, op, ": crow_indices has ", crow_indices.numel(),
      " entries but a pattern with ", num_rows, " rows needs ", static_cast<uint64_t>(num_rows) + 1);
  if (crow_indices.device().is_cpu()) {  // the same checks in one pass over raw memory
    check_pattern_bounds_cpu(op, crow_indices.contiguous(), col_indices.contiguous(), num_cols, nullptr);
    return;
  }
  const int64_t nnz = col_indices.numel();
  const auto crow = crow_indices.to(at::kLong);
  const int64_t first = crow[0].item<int64_t>();
  TORCH_CHECK_VALUE(first == 0, op, ": crow_indices[0] must be 0, got ", first);
  const int64_t last = crow[-1].item<int64_t>();
  TORCH_CHECK_VALUE(
      last == nnz, op, ": crow_indices[-1] = ", last, " but col_indices has ", nnz,
      " entries; they must agree (nnz)");
  if (num_rows > 0) {
    const auto decreasing = (crow.slice(0, 1) < crow.slice(0, 0, -1)).nonzero();
    TORCH_CHECK_VALUE(
        decreasing.numel() == 0, op, ": crow_indices must be non-decreasing, but crow_indices[",
        decreasing.numel() ? decreasing[0][0].item<int64_t>() + 1 : 0, "] < crow_indices[",
        decreasing.numel() ? decreasing[0][0].item<int64_t>() : 0, "]");
  }
  if (nnz > 0) {
    // Compared in int64: num_cols may exceed the range of int32 indices, and a Python-int bound
    // compared with an int32 tensor would wrap.
    const auto col = col_indices.to(at::kLong);
    const auto bad = ((col < 0) | (col >= num_cols)).nonzero();
    if (bad.numel() != 0) {
      const int64_t e = bad[0][0].item<int64_t>();
      TORCH_CHECK_VALUE(
          false, op, ": col_indices[", e, "] = ", col[e].item<int64_t>(),
          " is out of range for ", num_cols, " columns");
    }
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> csr_transpose(
    const at::Tensor& crow_indices, const at::Tensor& col_indices, c10::SymInt num_cols_sym) {
  constexpr const char* op = "csr_transpose";
  check_index_tensor(op, "crow_indices", crow_indices);
  check_index_tensor(op, "col_indices", col_indices);
  const int64_t num_cols = num_cols_sym.guard_int(__FILE__, __LINE__);
  TORCH_CHECK_VALUE(num_cols >= 0, op, ": num_cols must be >= 0, got ", num_cols);
  TORCH_CHECK_VALUE(
      crow_indices.numel() >= 1, op, ": crow_indices must have num_rows + 1 >= 1 entries, got 0");
  // The ATen index conversions below write through the indices: a corrupt pattern would write out
  // of bounds. The full check costs less than the sort and runs once per pattern.
  check_csr_structure(op, crow_indices, col_indices, crow_indices.numel() - 1, num_cols);
  const auto crow = crow_indices.contiguous();
  const auto col = col_indices.contiguous();
  const bool int32 = crow.scalar_type() == at::kInt;
  // W.T has num_cols rows: its crow_indices holds num_cols + 1 entries, allocated from the caller's
  // number. The rows of W.T are the features of x, which int32 indices cannot address past 2^31 - 1.
  TORCH_CHECK_VALUE(
      !int32 || num_cols <= std::numeric_limits<int32_t>::max(), op, ": num_cols = ", num_cols,
      " does not fit int32 indices (the transposed pattern has num_cols rows); use int64 indices");
  TORCH_CHECK_VALUE(num_cols < std::numeric_limits<int64_t>::max(), op, ": num_cols = ", num_cols, " is too large");
  check_allocation(op, "num_cols: the transposed pattern's crow_indices (num_cols + 1)", num_cols + 1,
                   crow.element_size(), crow.device());

  // A stable sort by column keeps each column's entries in row order: that is CSR of W.T.
  const auto [sorted_cols, perm] = at::sort(col, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  at::Tensor crow_t;
  try {
    crow_t = at::_convert_indices_from_coo_to_csr(sorted_cols, num_cols, int32);
  } catch (const c10::OutOfMemoryError& e) {
    TORCH_CHECK_VALUE(false, op, ": num_cols = ", num_cols, ": the transposed pattern's crow_indices (",
                      num_cols, " + 1 entries) could not be allocated on ", crow.device());
  }
  auto col_t = row_indices(crow, col).index_select(0, perm);
  return {crow_t, col_t, perm.to(crow.scalar_type())};
}

at::Tensor csr_row_order(const at::Tensor& crow_indices) {
  check_index_tensor("csr_row_order", "crow_indices", crow_indices);
  TORCH_CHECK_VALUE(
      crow_indices.numel() >= 1, "csr_row_order: crow_indices must have num_rows + 1 >= 1 entries");
  const auto crow = crow_indices.contiguous();
  const auto row_nnz = crow.slice(0, 1) - crow.slice(0, 0, -1);
  return at::argsort(row_nnz, /*stable=*/true, /*dim=*/0, /*descending=*/true)
      .to(crow.scalar_type());
}

void validate_csr(
    const at::Tensor& crow_indices,
    const at::Tensor& col_indices,
    c10::SymInt num_rows_sym,
    c10::SymInt num_cols_sym) {
  constexpr const char* op = "validate_csr";
  check_index_tensor(op, "crow_indices", crow_indices);
  check_index_tensor(op, "col_indices", col_indices);
  check_csr_structure(
      op, crow_indices, col_indices, num_rows_sym.guard_int(__FILE__, __LINE__),
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
