// CPU SpMM: y = x @ W.T + b with W in CSR.
//
// Work is split over (token tile, row block) pairs with at::parallel_for. For each tile of kTile (32)
// tokens, x is staged transposed in the accumulation type (tile.h); each output row then costs one
// broadcast-FMA of kTile tokens per nonzero, with contiguous loads whatever the column. A tile larger
// than L1 (in_features * kTile accumulators, 96 KiB for in = 768 in float32) is walked in block
// order (blocked_order.h) so that each block's columns are read from L1; with few outputs the tile is
// instead staged one column block at a time, each block used while in L1 (column_blocks.h). Narrow
// inputs and column-block staging take tiles of twice the tokens (kWideTile), which halves the loads
// of indices and values, and the loop overhead, per FMA.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <memory>
#include <type_traits>
#include <vector>

#include "../dispatch.h"
#include "../kernels.h"
#include "../validation.h"
#include "aligned_buffer.h"
#include "bf16_pairs.h"
#include "column_blocks.h"
#include "cpu_isa.h"
#include "few_tokens.h"
#include "kept_orders.h"
#include "tile.h"

namespace sparseadapter {
namespace {

constexpr int64_t kNarrowTile = 32;  // tokens per tile
constexpr int64_t kWideTile = 64;    // tokens per tile when such a tile of the input fits L1
constexpr int64_t kRowBlock = 16;    // rows per work item when there are too few tiles to share

// Whether tiles of kWideTile tokens are used, given one for every thread: where such a tile of the
// input fits L1 (in_features <= 128 in float32), or where the input is staged one column block at a
// time (few outputs, column_blocks.h), whose blocks fit L1 whatever in_features. For fp32 768->64 the
// wider tiles took 1-10% less time than 32-token tiles (min of 15 runs, 256-4096 tokens, 50-90%
// sparsity): per nonzero, one index and one value load serve four vector FMAs instead of two.
// order_kept: the pattern's orders are kept with it (pattern_derived_kept_cpu).
template <typename acc_t>
bool use_wide_tiles(const SpmmInputs& in, int64_t threads, bool order_kept) {
  if (in.num_tokens < kWideTile * threads) {
    return false;
  }
  const int64_t tiles = (in.num_tokens + kWideTile - 1) / kWideTile;
  return in.in_features * kWideTile * static_cast<int64_t>(sizeof(acc_t)) <= kL1Bytes ||
         stage_by_column_blocks<kWideTile, acc_t>(in.in_features, in.out_features, tiles, order_kept);
}

template <typename scalar_t, typename index_t>
struct SpmmArgs {
  const scalar_t* x;
  const scalar_t* values;
  const index_t* crow;
  const index_t* col;
  const scalar_t* bias;  // nullptr: no bias
  scalar_t* y;
  int64_t num_tokens;
  int64_t in_features;
  int64_t out_features;
  int64_t row_blocks;  // work item w covers tile w / row_blocks and row block w % row_blocks
  int64_t rows_per_block;
  const BlockedOrder* blocked;     // nullptr: CSR order (then row blocks may split the rows)
  const scalar_t* blocked_values;  // values in blocked order
  // non-null: the tile is staged and multiplied column block by column block (column_blocks.h);
  // then one row block, and `blocked` is null
  const ColumnBlocks* column_blocks;
  const scalar_t* column_block_values;  // values in column_blocks' order
};

// Work items [w_begin, w_end) with tiles of kTile tokens (tile_size: std::integral_constant).
template <CpuIsa kIsa, typename scalar_t, typename index_t, typename TileSize>
SA_ALWAYS_INLINE void
spmm_work_items(const SpmmArgs<scalar_t, index_t>& a, int64_t w_begin, int64_t w_end, TileSize /*tile_size*/) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int64_t kTile = TileSize::value;
  // the whole staged input tile, or one column block of it
  const int64_t staged_cols = a.column_blocks ? a.column_blocks->block_cols : a.in_features;
  AlignedVector<acc_t> tile_buffer(staged_cols * kTile + kMaxLanes<acc_t>);
  acc_t* xt = tile_buffer.data();
  AlignedVector<acc_t> out_buffer(a.rows_per_block * kTile);  // [rows][kTile], the output tile transposed
  int64_t staged_tile = -1;
  for (int64_t w = w_begin; w < w_end; ++w) {
    const int64_t tile = w / a.row_blocks;
    const int64_t n0 = tile * kTile;
    const int64_t nt = std::min(kTile, a.num_tokens - n0);
    if (a.column_blocks) {
      column_blocks_times_tile<kIsa, kTile>(
          *a.column_blocks, a.column_block_values, a.bias, a.out_features, a.x + n0 * a.in_features, a.in_features, nt,
          a.in_features, xt, out_buffer.data());
      store_transposed_tile<kIsa, kTile>(
          out_buffer.data(), a.out_features, nt, a.y + n0 * a.out_features, a.out_features);
      continue;
    }
    if (tile != staged_tile) {
      load_transposed_tile<kIsa, kTile>(a.x + n0 * a.in_features, a.in_features, nt, a.in_features, xt);
      staged_tile = tile;
    }
    const int64_t r_begin = (w % a.row_blocks) * a.rows_per_block;
    const int64_t r_end = std::min(a.out_features, r_begin + a.rows_per_block);
    rows_times_tile<kIsa, kTile>(
        a.blocked, a.blocked_values, a.crow, a.col, a.values, a.bias, r_begin, r_end, xt,
        out_buffer.data());  // blocked: one row block, every row
    store_transposed_tile<kIsa, kTile>(
        out_buffer.data(), r_end - r_begin, nt, a.y + n0 * a.out_features + r_begin, a.out_features);
  }
}

SA_DEFINE_ISA_VARIANTS(SpmmWorkItems, spmm_work_items);

// A few tokens (few_tokens.h): x read in place, one pass over the nonzeros.
template <CpuIsa kIsa, typename scalar_t, typename index_t>
SA_ALWAYS_INLINE void spmm_few_tokens(const SpmmArgs<scalar_t, index_t>& a) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n = a.num_tokens * a.out_features;
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    csr_rows_times_few_tokens(
        a.crow, a.col, a.values, a.bias, a.out_features, a.x, a.in_features, a.num_tokens, a.y, a.out_features);
  } else {
    std::vector<acc_t> out(n);
    csr_rows_times_few_tokens(
        a.crow, a.col, a.values, a.bias, a.out_features, a.x, a.in_features, a.num_tokens, out.data(), a.out_features);
    for (int64_t i = 0; i < n; ++i) a.y[i] = static_cast<scalar_t>(out[i]);
  }
}

SA_DEFINE_ISA_VARIANTS(SpmmFewTokens, spmm_few_tokens);

template <int kTileTokens, typename scalar_t, typename index_t>
void run_tiles(const SpmmInputs& in, SpmmArgs<scalar_t, index_t>& a, int64_t threads, bool order_kept) {
  using acc_t = at::opmath_type<scalar_t>;
  // Few tiles (short inputs, e.g. one request at serving time): split rows too, so every thread
  // has work; each row block then stages its own copy of the tile.
  const int64_t tiles = (a.num_tokens + kTileTokens - 1) / kTileTokens;
  a.row_blocks = tiles >= threads ? 1 : std::max<int64_t>(1, std::min(threads, a.out_features / kRowBlock));
  a.rows_per_block = (a.out_features + a.row_blocks - 1) / a.row_blocks;
  std::shared_ptr<const BlockedOrder> blocked;
  std::shared_ptr<const ColumnBlocks> column_blocks;
  std::vector<scalar_t> blocked_values;
  a.blocked = nullptr;
  a.column_blocks = nullptr;
  if (a.row_blocks == 1 &&
      stage_by_column_blocks<kTileTokens, acc_t>(a.in_features, a.out_features, tiles, order_kept)) {
    column_blocks = kept_tile_column_blocks<kTileTokens, acc_t, index_t>(
        in.crow_indices, in.col_indices, a.out_features, a.in_features);
    blocked_values = column_blocks->order.gather(a.values);
    a.column_blocks = column_blocks.get();
    a.column_block_values = blocked_values.data();
  } else if (a.row_blocks == 1 && walk_in_blocks<kTileTokens, acc_t>(a.in_features, tiles)) {
    blocked = kept_tile_blocked_order<kTileTokens, acc_t, index_t>(
        in.crow_indices, in.col_indices, a.out_features, a.in_features);
    blocked_values = blocked->gather(a.values);
    a.blocked = blocked.get();
    a.blocked_values = blocked_values.data();
  }

  SA_CPU_ISA_SWITCH(cpu_isa(), kIsa, [&] {
    at::parallel_for(0, tiles * a.row_blocks, 1, [&](int64_t begin, int64_t end) {
      SpmmWorkItems<kIsa>::run(a, begin, end, std::integral_constant<int, kTileTokens>{});
    });
  });
}

template <typename scalar_t, typename index_t>
void run_spmm(const SpmmInputs& in, at::Tensor& y) {
  SpmmArgs<scalar_t, index_t> a;
  a.x = in.x.const_data_ptr<scalar_t>();
  a.values = in.values.const_data_ptr<scalar_t>();
  a.crow = in.crow_indices.const_data_ptr<index_t>();
  a.col = in.col_indices.const_data_ptr<index_t>();
  a.bias = in.bias.has_value() ? in.bias->const_data_ptr<scalar_t>() : nullptr;
  a.y = y.mutable_data_ptr<scalar_t>();
  a.num_tokens = in.num_tokens;
  a.in_features = in.in_features;
  a.out_features = in.out_features;
  if (in.num_tokens <= kFewTokens) {  // decoding: one pass, nothing staged, on the calling thread
    SA_CPU_ISA_SWITCH(cpu_isa(), kIsa, [&] { SpmmFewTokens<kIsa>::run(a); });
    return;
  }
#if SA_X86_MULTIVERSION
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    if (cpu_isa() == CpuIsa::kAvx512Bf16) {  // bf16 pairs with the dot-product instruction
      const auto pattern = pattern_derived_cpu_as<PairPattern>(
          in.crow_indices, in.col_indices, in.in_features, PatternDerivedKind::kBf16Pairs, /*variant=*/0,
          [&] { return std::make_shared<const PairPattern>(a.crow, a.col, in.out_features); });
      pair_spmm(*pattern, a.values, a.x, a.bias, a.y, in.num_tokens, in.in_features, in.out_features);
      return;
    }
  }
#endif

  const int64_t threads = at::get_num_threads();
  const bool order_kept = pattern_derived_kept_cpu(in.crow_indices, in.col_indices, in.in_features);
  if (use_wide_tiles<at::opmath_type<scalar_t>>(in, threads, order_kept)) {
    run_tiles<kWideTile>(in, a, threads, order_kept);
  } else {
    run_tiles<kNarrowTile>(in, a, threads, order_kept);
  }
}

}  // namespace

void spmm_cpu_kernel(const SpmmInputs& in, at::Tensor& y) {
  SA_DISPATCH_VALUE_AND_INDEX_TYPES(
      in.x.scalar_type(), in.crow_indices.scalar_type(), "spmm_cpu", [&] { run_spmm<scalar_t, index_t>(in, y); });
}

}  // namespace sparseadapter
