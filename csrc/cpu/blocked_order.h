// A CSR pattern's nonzeros regrouped by 2-D blocks, for the CPU kernels that walk them against
// staged token tiles (tile.h: one kTile-long vector per feature). In CSR order every row sweeps the
// whole staged x tile, e.g. 96 KiB for 768 features x 32 tokens in float32, which lives in L2; in
// block order a run of nonzeros reads only its block's columns and writes (or reads) only its
// block's rows, a few KiB each, from L1.
#pragma once

#include <cstdint>
#include <vector>

namespace sparseadapter {

// Entries sorted by (row block, column block), CSR order inside a block (a stable counting sort,
// O(nnz + blocks)). Entry i is nonzero position[i], at (row[i], col[i]); int32 suffices, as no
// staged tile could hold 2^31 features. Segments, for the products that accumulate row by row, are
// the maximal runs of entries in one row and one block: segment s is entries [seg_start[s],
// seg_start[s + 1]) of row seg_row[s]; find_segments() fills them. A run must not cross a block: a
// row that ends one block and starts the next (a column block whose other rows are empty) would
// otherwise be one segment, and a product that stages one column block at a time (column_blocks.h)
// would read the next block's entries from the wrong staged columns.
struct BlockedOrder {
  std::vector<int64_t> position;
  std::vector<int32_t> row, col;
  std::vector<int64_t> seg_start;
  std::vector<int32_t> seg_row;
  int64_t block_cols;  // the blocks' width (a run of one row never spans two row blocks)

  template <typename index_t>
  BlockedOrder(
      const index_t* crow,
      const index_t* col_indices,
      int64_t rows,
      int64_t cols,
      int64_t block_rows,
      int64_t block_cols_)
      : block_cols(block_cols_) {
    const int64_t nnz = static_cast<int64_t>(crow[rows]);
    position.resize(nnz);
    row.resize(nnz);
    col.resize(nnz);
    if (block_rows >= rows && block_cols >= cols) {  // one block: CSR order, no sort
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t e = crow[r]; e < crow[r + 1]; ++e) {
          position[e] = e;
          row[e] = static_cast<int32_t>(r);
          col[e] = static_cast<int32_t>(col_indices[e]);
        }
      }
      return;
    }
    const int64_t col_blocks = (cols + block_cols - 1) / block_cols;
    const auto key = [&](int64_t r, int64_t c) { return (r / block_rows) * col_blocks + c / block_cols; };
    std::vector<int64_t> start(((rows + block_rows - 1) / block_rows) * col_blocks + 1, 0);
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t e = crow[r]; e < crow[r + 1]; ++e) ++start[key(r, col_indices[e]) + 1];
    }
    for (size_t k = 1; k < start.size(); ++k) start[k] += start[k - 1];
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t e = crow[r]; e < crow[r + 1]; ++e) {
        const int64_t i = start[key(r, col_indices[e])]++;
        position[i] = e;
        row[i] = static_cast<int32_t>(r);
        col[i] = static_cast<int32_t>(col_indices[e]);
      }
    }
  }

  int64_t segments() const { return static_cast<int64_t>(seg_row.size()); }

  void find_segments() {
    const int64_t nnz = static_cast<int64_t>(row.size());
    for (int64_t i = 0; i < nnz; ++i) {
      if (i == 0 || row[i] != row[i - 1] || col[i] / block_cols != col[i - 1] / block_cols) {
        seg_start.push_back(i);
        seg_row.push_back(row[i]);
      }
    }
    seg_start.push_back(nnz);
  }

  // Frees row, for an order kept for products that read only segments, columns and positions.
  void release_rows() { std::vector<int32_t>().swap(row); }

  // values[position[i]] for every entry i, in entry order.
  template <typename scalar_t>
  std::vector<scalar_t> gather(const scalar_t* values) const {
    std::vector<scalar_t> out(position.size());
    for (size_t i = 0; i < position.size(); ++i) out[i] = values[position[i]];
    return out;
  }
};

}  // namespace sparseadapter
