// CPU fused bottleneck adapter: out = residual + scale * (act(x @ D.T + bd) @ U.T + bu), D and U in CSR.
//
// One pass over the tokens in tiles of kTile: the x tile is staged transposed (tile.h), the down
// projection writes the bottleneck tile transposed, which is exactly the layout the up projection
// reads, so the bottleneck activation never leaves the core's cache and is never transposed back
// (only written out, once, when the backward needs the pre-activation). A projection whose staged
// tile exceeds L1 walks its nonzeros in block order (tile.h); with a bottleneck tile that fits L1,
// the down projection instead stages x one column block at a time (column_blocks.h), as the SpMM
// does. The residual is added in the accumulation type before the single rounding to the output
// dtype.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <type_traits>
#include <vector>

#include "../adapter_pointers.h"
#include "../dispatch.h"
#include "../kernels.h"
#include "aligned_buffer.h"
#include "column_blocks.h"
#include "cpu_isa.h"
#include "few_tokens.h"
#include "kept_orders.h"
#include "tile.h"
#include "vec_math.h"

namespace sparseadapter {
namespace {

constexpr int64_t kTile = 32;  // tokens per tile

template <typename scalar_t, typename index_t>
struct AdapterArgs : AdapterPointers<scalar_t, index_t> {
  // projections whose staged tile exceeds L1 walk their nonzeros in block order (tile.h)
  const BlockedOrder *down_blocked, *up_blocked;  // nullptr: CSR order
  const scalar_t *down_blocked_values, *up_blocked_values;
  // non-null: the down projection stages x one column block at a time (column_blocks.h), for a
  // bottleneck tile that stays in L1 meanwhile; then down_blocked is null
  const ColumnBlocks* down_column_blocks;
  const scalar_t* down_column_block_values;
};

// The bottleneck activation, in place on n values. fp32 accumulation (fp32, fp16 and bf16 inputs)
// runs vec_math.h's vector functions at the ISA's native width; fp64 runs libm.
template <CpuIsa kIsa, typename acc_t>
SA_ALWAYS_INLINE void activate(acc_t* h, int64_t n, Activation activation) {
  if (activation == Activation::kIdentity) {
    return;
  }
  if (activation == Activation::kRelu) {
    for (int64_t i = 0; i < n; ++i) h[i] = h[i] < acc_t(0) ? acc_t(0) : h[i];  // NaN stays NaN, as torch.relu
    return;
  }
  if constexpr (std::is_same_v<acc_t, float>) {
    using V = typename Vec<kIsa, float>::type;
    constexpr int64_t kLanes = Vec<kIsa, float>::kLanes;  // n is whole tiles, hence whole vectors
    switch (activation) {
      case Activation::kGelu:
        for (int64_t i = 0; i < n; i += kLanes) store_vec(h + i, vec_math::gelu(load_vec<V>(h + i)));
        return;
      case Activation::kSilu:
        for (int64_t i = 0; i < n; i += kLanes) store_vec(h + i, vec_math::silu(load_vec<V>(h + i)));
        return;
      case Activation::kTanh:
        for (int64_t i = 0; i < n; i += kLanes) store_vec(h + i, vec_math::tanh(load_vec<V>(h + i)));
        return;
      default: return;
    }
  } else {
    switch (activation) {
      case Activation::kGelu:  // the exact (erf) GELU, as nn.GELU()
        for (int64_t i = 0; i < n; ++i) h[i] = acc_t(0.5) * h[i] * (acc_t(1) + std::erf(h[i] * acc_t(M_SQRT1_2)));
        return;
      case Activation::kSilu:
        for (int64_t i = 0; i < n; ++i) h[i] = h[i] / (acc_t(1) + std::exp(-h[i]));
        return;
      case Activation::kTanh:
        for (int64_t i = 0; i < n; ++i) h[i] = std::tanh(h[i]);
        return;
      default: return;
    }
  }
}

template <CpuIsa kIsa, typename scalar_t, typename index_t>
SA_ALWAYS_INLINE void adapter_tiles(const AdapterArgs<scalar_t, index_t>& a, int64_t tile_begin, int64_t tile_end) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int64_t kPad = kMaxLanes<acc_t>;
  // cache-line aligned (aligned_buffer.h): vector loads from the staged tiles never split a line
  AlignedVector<acc_t> xt(a.in_features * kTile + kPad);   // x tile, [in][kTile]
  AlignedVector<acc_t> ht(a.bottleneck * kTile + kPad);    // bottleneck tile, [bottleneck][kTile]
  AlignedVector<acc_t> yt(a.out_features * kTile + kPad);  // output tile, [out][kTile]
  AlignedVector<acc_t> rt(a.residual ? a.out_features * kTile + kPad : 0);
  const acc_t scale = static_cast<acc_t>(a.scale);
  for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
    const int64_t n0 = tile * kTile;
    const int64_t nt = std::min(kTile, a.num_tokens - n0);
    if (a.down_column_blocks) {  // xt holds one column block at a time
      column_blocks_times_tile<kIsa, kTile>(
          *a.down_column_blocks, a.down_column_block_values, a.down_bias, a.bottleneck, a.x + n0 * a.in_features,
          a.in_features, nt, a.in_features, xt.data(), ht.data());
    } else {
      load_transposed_tile<kIsa, kTile>(a.x + n0 * a.in_features, a.in_features, nt, a.in_features, xt.data());
      rows_times_tile<kIsa, kTile>(
          a.down_blocked, a.down_blocked_values, a.down_crow, a.down_col, a.down_values, a.down_bias, 0, a.bottleneck,
          xt.data(), ht.data());
    }
    if (a.hidden_pre) {
      store_transposed_tile<kIsa, kTile>(ht.data(), a.bottleneck, nt, a.hidden_pre + n0 * a.bottleneck, a.bottleneck);
    }
    activate<kIsa>(ht.data(), a.bottleneck * kTile, a.activation);
    rows_times_tile<kIsa, kTile>(
        a.up_blocked, a.up_blocked_values, a.up_crow, a.up_col, a.up_values, a.up_bias, 0, a.out_features, ht.data(),
        yt.data());
    const int64_t n = a.out_features * kTile;
    if (a.residual) {
      load_transposed_tile<kIsa, kTile>(
          a.residual + n0 * a.out_features, a.out_features, nt, a.out_features, rt.data());
      for (int64_t i = 0; i < n; ++i) yt[i] = rt[i] + scale * yt[i];
    } else {
      for (int64_t i = 0; i < n; ++i) yt[i] *= scale;
    }
    store_transposed_tile<kIsa, kTile>(yt.data(), a.out_features, nt, a.out + n0 * a.out_features, a.out_features);
  }
}

// The adapter for a few tokens (few_tokens.h): the same steps as adapter_tiles on [tokens][features]
// buffers, x and the residual read in place; activate() runs on the bottleneck padded to whole vectors.
template <CpuIsa kIsa, typename scalar_t, typename index_t>
SA_ALWAYS_INLINE void adapter_few_tokens(const AdapterArgs<scalar_t, index_t>& a, int64_t, int64_t) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int64_t kPad = kMaxLanes<acc_t>;
  const int64_t nt = a.num_tokens;
  const int64_t hidden_n = nt * a.bottleneck;
  std::vector<acc_t> h((hidden_n + kPad - 1) / kPad * kPad);  // [tokens][bottleneck]
  csr_rows_times_few_tokens(
      a.down_crow, a.down_col, a.down_values, a.down_bias, a.bottleneck, a.x, a.in_features, nt, h.data(),
      a.bottleneck);
  if (a.hidden_pre) {
    for (int64_t i = 0; i < hidden_n; ++i) a.hidden_pre[i] = static_cast<scalar_t>(h[i]);
  }
  activate<kIsa>(h.data(), static_cast<int64_t>(h.size()), a.activation);
  const int64_t n = nt * a.out_features;
  std::vector<acc_t> y(n);  // [tokens][out]
  csr_rows_times_few_tokens(
      a.up_crow, a.up_col, a.up_values, a.up_bias, a.out_features, h.data(), a.bottleneck, nt, y.data(),
      a.out_features);
  const acc_t scale = static_cast<acc_t>(a.scale);
  if (a.residual) {
    for (int64_t i = 0; i < n; ++i) a.out[i] = static_cast<scalar_t>(static_cast<acc_t>(a.residual[i]) + scale * y[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) a.out[i] = static_cast<scalar_t>(scale * y[i]);
  }
}

SA_DEFINE_ISA_VARIANTS(AdapterFewTokens, adapter_few_tokens);
SA_DEFINE_ISA_VARIANTS(AdapterTiles, adapter_tiles);

template <typename scalar_t, typename index_t>
void run_adapter(const AdapterInputs& in, at::Tensor& out, at::Tensor& hidden_pre) {
  AdapterArgs<scalar_t, index_t> a;
  a.set(in, out, hidden_pre);

  using acc_t = at::opmath_type<scalar_t>;
  if (a.num_tokens <= kFewTokens) {  // decoding: one pass, nothing staged, on the calling thread
    SA_CPU_ISA_SWITCH(cpu_isa(), kIsa, [&] { AdapterFewTokens<kIsa>::run(a, int64_t{0}, int64_t{1}); });
    return;
  }
  const int64_t tiles = (a.num_tokens + kTile - 1) / kTile;
  std::shared_ptr<const BlockedOrder> down_blocked, up_blocked;
  std::shared_ptr<const ColumnBlocks> down_column_blocks;
  std::vector<scalar_t> down_blocked_values, up_blocked_values;
  a.down_blocked = a.up_blocked = nullptr;
  a.down_column_blocks = nullptr;
  if (stage_by_column_blocks<kTile, acc_t>(
          a.in_features, a.bottleneck, tiles,
          pattern_derived_kept_cpu(in.down.crow_indices, in.down.col_indices, a.in_features))) {
    down_column_blocks = kept_tile_column_blocks<kTile, acc_t, index_t>(
        in.down.crow_indices, in.down.col_indices, a.bottleneck, a.in_features);
    down_blocked_values = down_column_blocks->order.gather(a.down_values);
    a.down_column_blocks = down_column_blocks.get();
    a.down_column_block_values = down_blocked_values.data();
  } else if (walk_in_blocks<kTile, acc_t>(a.in_features, tiles)) {
    down_blocked = kept_tile_blocked_order<kTile, acc_t, index_t>(
        in.down.crow_indices, in.down.col_indices, a.bottleneck, a.in_features);
    down_blocked_values = down_blocked->gather(a.down_values);
    a.down_blocked = down_blocked.get();
    a.down_blocked_values = down_blocked_values.data();
  }
  if (walk_in_blocks<kTile, acc_t>(a.bottleneck, tiles)) {
    up_blocked = kept_tile_blocked_order<kTile, acc_t, index_t>(
        in.up.crow_indices, in.up.col_indices, a.out_features, a.bottleneck);
    up_blocked_values = up_blocked->gather(a.up_values);
    a.up_blocked = up_blocked.get();
    a.up_blocked_values = up_blocked_values.data();
  }

  SA_CPU_ISA_SWITCH(cpu_isa(), kIsa, [&] {
    at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) { AdapterTiles<kIsa>::run(a, begin, end); });
  });
}

}  // namespace

void adapter_cpu_kernel(const AdapterInputs& in, at::Tensor& out, at::Tensor& hidden_pre) {
  SA_DISPATCH_VALUE_AND_INDEX_TYPES(in.down.x.scalar_type(), in.down.crow_indices.scalar_type(), "adapter_cpu", [&] {
    run_adapter<scalar_t, index_t>(in, out, hidden_pre);
  });
}

}  // namespace sparseadapter
