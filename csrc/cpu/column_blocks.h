// A token tile staged one block of input features at a time, for products with many input
// features and few outputs (768 -> 64): the nonzeros are sorted by column block (CSR order inside a
// block), and for each block the tile's columns are transposed into a small buffer and that block's
// nonzeros added at once, while the buffer is still in L1. Staging the whole tile first (tile.h)
// wrote it to L2 and read it back per block: on a 768 -> 64 product at 90% sparsity the block by
// block staging took about 10% less time. The whole output tile stays in L1 meanwhile, so this is
// for outputs of at most kColumnBlockOutputBytes per tile.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "blocked_order.h"
#include "cpu_isa.h"
#include "tile.h"

namespace sparseadapter {

constexpr int64_t kColumnBlockInputBytes = 32 * 1024;   // a staged block of the input tile
constexpr int64_t kColumnBlockOutputBytes = 16 * 1024;  // the most output tile this path keeps in L1

// With the blocks kept with the pattern (kept_orders.h, order_kept), staging by column blocks was
// faster than CSR order from two tiles on: fp32 768->64, 128-384 tokens, 17-23% at 50% sparsity,
// 1-5% at 90%. Built for one call, they pay off over many tiles only (tile.h: kMinTilesForBlocks).
constexpr int64_t kMinTilesForKeptColumnBlocks = 2;

template <int kTile, typename acc_t>
inline bool stage_by_column_blocks(int64_t in_features, int64_t out_features, int64_t tiles, bool order_kept) {
  const int64_t vector_bytes = kTile * static_cast<int64_t>(sizeof(acc_t));
  return tiles >= (order_kept ? kMinTilesForKeptColumnBlocks : kMinTilesForBlocks) &&
         tile_exceeds_l1<kTile, acc_t>(in_features) && out_features * vector_bytes <= kColumnBlockOutputBytes;
}

// The nonzeros of a CSR pattern [rows, cols] by column blocks of block_cols columns, every row in
// one row block. local_col[i] is entry i's column within its block; block b's segments (runs of one
// row) are [block_segment[b], block_segment[b + 1]).
struct ColumnBlocks {
  BlockedOrder order;
  int64_t block_cols;
  std::vector<int32_t> local_col;
  std::vector<int64_t> block_segment;

  template <typename index_t>
  ColumnBlocks(const index_t* crow, const index_t* col, int64_t rows, int64_t cols, int64_t block_cols_)
      : order(crow, col, rows, cols, rows, block_cols_), block_cols(block_cols_) {
    order.find_segments();
    local_col.resize(order.col.size());
    for (size_t i = 0; i < order.col.size(); ++i) local_col[i] = static_cast<int32_t>(order.col[i] % block_cols);
    const int64_t blocks = (cols + block_cols - 1) / block_cols;
    block_segment.assign(blocks + 1, order.segments());
    // segments are sorted by block: block b starts at its first segment, or where block b + 1 starts
    for (int64_t s = order.segments() - 1; s >= 0; --s) block_segment[order.col[order.seg_start[s]] / block_cols] = s;
    for (int64_t b = blocks - 1; b >= 0; --b) block_segment[b] = std::min(block_segment[b], block_segment[b + 1]);
    // the product reads segments, local columns and positions only (the blocks are kept with the
    // pattern, kept_orders.h)
    order.release_rows();
    std::vector<int32_t>().swap(order.col);
  }

  int64_t blocks() const { return static_cast<int64_t>(block_segment.size()) - 1; }
};

// The columns of a block for kTile-token tiles of acc_t (kept_orders.h builds and keeps the blocks).
template <int kTile, typename acc_t>
constexpr int64_t tile_column_block_cols() {
  return kColumnBlockInputBytes / (kTile * static_cast<int64_t>(sizeof(acc_t)));
}

// out_t[r][t] = bias[r] + sum_e values[e] * x[t][col[e]] for every row r of the pattern and t < tokens
// (out_t: [rows][kTile]; tokens tokens..kTile are computed on zeros). x: the tile's first token, ld
// apart; block_buffer: block_cols * kTile accumulators; values in the blocks' entry order; bias may be
// null.
template <CpuIsa kIsa, int kTile, typename scalar_t, typename acc_t>
SA_ALWAYS_INLINE void column_blocks_times_tile(
    const ColumnBlocks& blocks,
    const scalar_t* values,
    const scalar_t* bias,
    int64_t rows,
    const scalar_t* x,
    int64_t ld,
    int64_t tokens,
    int64_t cols,
    acc_t* block_buffer,
    acc_t* out_t) {
  fill_rows_with_bias<kIsa, kTile>(bias, rows, out_t);
  for (int64_t b = 0; b < blocks.blocks(); ++b) {
    const int64_t k0 = b * blocks.block_cols;
    const int64_t s_begin = blocks.block_segment[b], s_end = blocks.block_segment[b + 1];
    if (s_begin == s_end) continue;  // no nonzero reads these columns
    const int64_t kn = std::min(blocks.block_cols, cols - k0);
    load_transposed_tile<kIsa, kTile>(x + k0, ld, tokens, kn, block_buffer);
    add_segments<kIsa, kTile>(blocks.order, values, blocks.local_col.data(), s_begin, s_end, block_buffer, out_t);
  }
}

}  // namespace sparseadapter
