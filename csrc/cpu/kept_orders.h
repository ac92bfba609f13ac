// The CPU kernels' block orders (blocked_order.h, column_blocks.h) kept with a checked pattern
// (validation.h: pattern_derived_cpu), so that products over a pattern the cache tracks sort its
// nonzeros once instead of at every call: at 512 tokens the sort took about a quarter of an fp32 SpMM
// 768->64. A pattern the cache does not keep (a temporary, an inference tensor, one adapter sliced
// from a packed set) is sorted per call, as before. What is kept is only what its product reads:
// about 12 bytes per nonzero for the tile products, 16 for the SDDMM.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <memory>

#include "../validation.h"
#include "blocked_order.h"
#include "column_blocks.h"
#include "tile.h"

namespace sparseadapter {

inline uint64_t block_shape_variant(int64_t block_rows, int64_t block_cols) {
  return static_cast<uint64_t>(block_rows) << 32 | static_cast<uint64_t>(block_cols);
}

// The block order of a pattern [rows, cols] by blocks of block_rows x block_cols, each entry's row,
// column and position (the SDDMM's per-entry dot products).
template <typename index_t>
std::shared_ptr<const BlockedOrder> kept_entry_order(
    const at::Tensor& crow_indices,
    const at::Tensor& col_indices,
    int64_t rows,
    int64_t cols,
    int64_t block_rows,
    int64_t block_cols) {
  return pattern_derived_cpu_as<BlockedOrder>(
      crow_indices, col_indices, cols, PatternDerivedKind::kEntryOrder, block_shape_variant(block_rows, block_cols),
      [&] {
        return std::make_shared<const BlockedOrder>(
            crow_indices.const_data_ptr<index_t>(), col_indices.const_data_ptr<index_t>(), rows, cols, block_rows,
            block_cols);
      });
}

// The block order of a pattern [rows, cols] for products with kTile-token tiles of acc_t (tile.h):
// segments, columns and positions.
template <int kTile, typename acc_t, typename index_t>
std::shared_ptr<const BlockedOrder>
kept_tile_blocked_order(const at::Tensor& crow_indices, const at::Tensor& col_indices, int64_t rows, int64_t cols) {
  const auto [block_rows, block_cols] = tile_block_shape<kTile, acc_t>();
  return pattern_derived_cpu_as<BlockedOrder>(
      crow_indices, col_indices, cols, PatternDerivedKind::kSegmentOrder, block_shape_variant(block_rows, block_cols),
      [&] {
        auto order = std::make_shared<BlockedOrder>(
            crow_indices.const_data_ptr<index_t>(), col_indices.const_data_ptr<index_t>(), rows, cols, block_rows,
            block_cols);
        order->find_segments();
        order->release_rows();
        return std::shared_ptr<const BlockedOrder>(std::move(order));
      });
}

// The column blocks of a pattern [rows, cols] for kTile-token tiles of acc_t (column_blocks.h).
template <int kTile, typename acc_t, typename index_t>
std::shared_ptr<const ColumnBlocks>
kept_tile_column_blocks(const at::Tensor& crow_indices, const at::Tensor& col_indices, int64_t rows, int64_t cols) {
  const int64_t block_cols = tile_column_block_cols<kTile, acc_t>();
  return pattern_derived_cpu_as<ColumnBlocks>(
      crow_indices, col_indices, cols, PatternDerivedKind::kColumnBlocks, block_shape_variant(rows, block_cols), [&] {
        return std::make_shared<const ColumnBlocks>(
            crow_indices.const_data_ptr<index_t>(), col_indices.const_data_ptr<index_t>(), rows, cols, block_cols);
      });
}

}  // namespace sparseadapter
