// CPU SpMM: y = x @ W.T + b with W in CSR.
//
// Work is split over (token tile, row block) pairs with at::parallel_for. For each tile of kTile
// tokens, x is staged transposed in the accumulation type (tile.h); each output row then costs one
// broadcast-FMA of kTile tokens per nonzero, with contiguous loads whatever the column. A tile larger
// than L1 (in_features * kTile accumulators, 96 KiB for in = 768 in float32) is walked in block
// order (blocked_order.h) so that each block's columns are read from L1.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <memory>
#include <optional>
#include <type_traits>
#include <vector>

#include "../dispatch.h"
#include "../kernels.h"
#include "../validation.h"
#include "bf16_pairs.h"
#include "cpu_isa.h"
#include "few_tokens.h"
#include "tile.h"

namespace sparseadapter {
namespace {

constexpr int64_t kTile = 32;      // tokens per tile
constexpr int64_t kRowBlock = 16;  // rows per work item when there are too few tiles to share

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
};

template <CpuIsa kIsa, typename scalar_t, typename index_t>
SA_ALWAYS_INLINE void spmm_work_items(const SpmmArgs<scalar_t, index_t>& a, int64_t w_begin, int64_t w_end) {
  using acc_t = at::opmath_type<scalar_t>;
  std::vector<acc_t> tile_buffer(a.in_features * kTile + kMaxLanes<acc_t>);
  acc_t* xt = tile_buffer.data();
  std::vector<acc_t> out_buffer(a.rows_per_block * kTile);  // [rows][kTile], the output tile transposed
  int64_t staged_tile = -1;
  for (int64_t w = w_begin; w < w_end; ++w) {
    const int64_t tile = w / a.row_blocks;
    const int64_t n0 = tile * kTile;
    const int64_t nt = std::min(kTile, a.num_tokens - n0);
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
          in.crow_indices, in.col_indices, in.in_features, PatternDerivedKind::kBf16Pairs,
          [&] { return std::make_shared<const PairPattern>(a.crow, a.col, in.out_features); });
      pair_spmm(*pattern, a.values, a.x, a.bias, a.y, in.num_tokens, in.in_features, in.out_features);
      return;
    }
  }
#endif

  // Few tiles (short inputs, e.g. one request at serving time): split rows too, so every thread
  // has work; each row block then stages its own copy of the tile.
  const int64_t tiles = (in.num_tokens + kTile - 1) / kTile;
  const int64_t threads = at::get_num_threads();
  a.row_blocks = tiles >= threads ? 1 : std::max<int64_t>(1, std::min(threads, in.out_features / kRowBlock));
  a.rows_per_block = (in.out_features + a.row_blocks - 1) / a.row_blocks;
  std::optional<BlockedOrder> blocked;
  std::vector<scalar_t> blocked_values;
  a.blocked = nullptr;
  if (a.row_blocks == 1 && walk_in_blocks<kTile, at::opmath_type<scalar_t>>(in.in_features, tiles)) {
    blocked.emplace(
        tile_blocked_order<kTile, at::opmath_type<scalar_t>>(a.crow, a.col, in.out_features, in.in_features));
    blocked_values = blocked->gather(a.values);
    a.blocked = &*blocked;
    a.blocked_values = blocked_values.data();
  }

  SA_CPU_ISA_SWITCH(cpu_isa(), kIsa, [&] {
    at::parallel_for(
        0, tiles * a.row_blocks, 1, [&](int64_t begin, int64_t end) { SpmmWorkItems<kIsa>::run(a, begin, end); });
  });
}

}  // namespace

void spmm_cpu_kernel(const SpmmInputs& in, at::Tensor& y) {
  SA_DISPATCH_VALUE_AND_INDEX_TYPES(
      in.x.scalar_type(), in.crow_indices.scalar_type(), "spmm_cpu", [&] { run_spmm<scalar_t, index_t>(in, y); });
}

}  // namespace sparseadapter
