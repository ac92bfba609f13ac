// Token tiles: the CPU kernels work on tiles of kTile tokens held transposed, [features][kTile], in
// the accumulation type, so that the innermost loop runs over tokens with contiguous vector loads
// whatever column a nonzero points to.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include "blocked_order.h"
#include "cpu_isa.h"
#include "transpose_avx512.h"

namespace sparseadapter {

// A staged input tile larger than L1 is walked in block order (blocked_order.h): blocks of 16 KiB of
// the input tile (columns) by 8 KiB of the output tile (rows).
constexpr int64_t kL1Bytes = 32 * 1024;
constexpr int64_t kBlockInputBytes = 16 * 1024;
constexpr int64_t kBlockOutputBytes = 8 * 1024;

// Building the order costs about one pass over the nonzeros, as much as a tile or two of the product:
// built for one call it pays off over many tiles only. (Kept with the pattern, kept_orders.h, it is
// built once; still, block order was slower than CSR order over few tiles at high sparsity: fp32
// fused adapter 768->64->768 at 90%, 128-256 tokens, 2-10%.)
constexpr int64_t kMinTilesForBlocks = 16;

// Whether a staged input tile of in_features (kTile tokens of acc_t) exceeds L1.
template <int kTile, typename acc_t>
inline bool tile_exceeds_l1(int64_t in_features) {
  return in_features * kTile * static_cast<int64_t>(sizeof(acc_t)) > kL1Bytes;
}

template <int kTile, typename acc_t>
inline bool walk_in_blocks(int64_t in_features, int64_t tiles) {
  return tiles >= kMinTilesForBlocks && tile_exceeds_l1<kTile, acc_t>(in_features);
}

// The blocks (rows, columns) of a CSR pattern's block order for products with kTile-token tiles of
// acc_t (kept_orders.h builds and keeps the order).
template <int kTile, typename acc_t>
constexpr std::pair<int64_t, int64_t> tile_block_shape() {
  constexpr int64_t kVectorBytes = kTile * static_cast<int64_t>(sizeof(acc_t));
  return {kBlockOutputBytes / kVectorBytes, kBlockInputBytes / kVectorBytes};
}

// dst[k * kTile + t] = src[t * ld + k] for t < rows, k < cols; tokens rows..kTile are zero-filled,
// so partial tiles compute on zeros instead of on stale data. The scalar path reads along src rows
// (contiguous) in blocks of kBlock features, which keeps the strided writes within a few cache lines.
template <int kTile, typename scalar_t, typename acc_t>
SA_ALWAYS_INLINE void
load_transposed_tile_scalar(const scalar_t* src, int64_t ld, int64_t rows, int64_t k_begin, int64_t cols, acc_t* dst) {
  constexpr int64_t kBlock = 16;
  for (int64_t k0 = k_begin; k0 < cols; k0 += kBlock) {
    const int64_t kn = cols - k0 < kBlock ? cols - k0 : kBlock;
    for (int64_t t = 0; t < rows; ++t) {
      const scalar_t* s = src + t * ld + k0;
      acc_t* d = dst + k0 * kTile + t;
      for (int64_t k = 0; k < kn; ++k) {
        d[k * kTile] = static_cast<acc_t>(s[k]);
      }
    }
    for (int64_t t = rows; t < kTile; ++t) {
      for (int64_t k = 0; k < kn; ++k) {
        dst[(k0 + k) * kTile + t] = acc_t(0);
      }
    }
  }
}

// The same, with whole 16x16 blocks transposed in AVX-512 registers where the ISA variant allows.
template <CpuIsa kIsa, int kTile, typename scalar_t, typename acc_t>
SA_ALWAYS_INLINE void load_transposed_tile(const scalar_t* src, int64_t ld, int64_t rows, int64_t cols, acc_t* dst) {
#if SA_X86_MULTIVERSION
  if constexpr (kIsa == CpuIsa::kAvx512 && kHasAvx512Transpose<scalar_t> && kTile % 16 == 0) {
    if (rows == kTile) {
      const int64_t full_cols = cols - cols % 16;
      for (int64_t k0 = 0; k0 < full_cols; k0 += 16) {
        for (int64_t t0 = 0; t0 < kTile; t0 += 16) {
          transpose16x16(src + t0 * ld + k0, ld, dst + k0 * kTile + t0, kTile);
        }
      }
      load_transposed_tile_scalar<kTile>(src, ld, rows, full_cols, cols, dst);
      return;
    }
  }
#endif
  load_transposed_tile_scalar<kTile>(src, ld, rows, 0, cols, dst);
}

// dst[t * ld + r] = src[r * kTile + t] for r < rows, t < tokens: an output tile, computed transposed
// ([rows][kTile]), written back to row-major tokens. Whole 16x16 blocks go through registers.
template <CpuIsa kIsa, int kTile, typename scalar_t, typename acc_t>
SA_ALWAYS_INLINE void store_transposed_tile(const acc_t* src, int64_t rows, int64_t tokens, scalar_t* dst, int64_t ld) {
  int64_t r_begin = 0;
#if SA_X86_MULTIVERSION
  if constexpr (
      kIsa == CpuIsa::kAvx512 && std::is_same_v<acc_t, float> && kHasAvx512Transpose<scalar_t> && kTile % 16 == 0) {
    if (tokens == kTile) {
      // Token blocks outside: 16 rows of dst are written from start to end before the next 16, where
      // row blocks outside left every row of dst partly written (twice the time for 64-token tiles).
      r_begin = rows - rows % 16;
      for (int64_t t0 = 0; t0 < kTile; t0 += 16) {
        for (int64_t r0 = 0; r0 < r_begin; r0 += 16) {
          transpose16x16(src + r0 * kTile + t0, kTile, dst + t0 * ld + r0, ld);
        }
      }
    }
  }
#endif
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t r = r_begin; r < rows; ++r) {
      dst[t * ld + r] = static_cast<scalar_t>(src[r * kTile + t]);
    }
  }
}

// Partial sums per output vector in the products below: consecutive nonzeros of a row go to different
// partial sums, so that kParts * kVecs FMA chains are in flight instead of kVecs; with one sum per
// vector (two chains for a 32-token tile of zmm) the kernel waited on the FMA latency, at a quarter
// of the FMA throughput. At most 8 accumulators, which leaves registers for the loads.
template <int kVecs>
constexpr int kPartialSums = kVecs >= 8 ? 1 : 8 / kVecs;

// acc[0][v] = (acc[0][v] + acc[1][v]) + (acc[2][v] + acc[3][v]) (for kParts = 4), written out so
// that acc stays in registers.
template <int kParts, int kVecs, typename vec_t>
SA_ALWAYS_INLINE void add_partial_sums(vec_t (&acc)[kParts][kVecs]) {
  static_assert(kParts == 1 || kParts == 2 || kParts == 4, "1, 2 or 4 partial sums");
  for (int v = 0; v < kVecs; ++v) {
    if constexpr (kParts == 4) {
      acc[0][v] = (acc[0][v] + acc[1][v]) + (acc[2][v] + acc[3][v]);
    } else if constexpr (kParts == 2) {
      acc[0][v] += acc[1][v];
    }
  }
}

// acc[p][v] += values[e] * in_t[col[e]][v-th vector] for e in [e_begin, e_end), nonzero e into
// partial sum (e - e_begin) % kParts.
template <
    int kTile,
    int kParts,
    int kVecs,
    int kLanes,
    typename vec_t,
    typename acc_t,
    typename scalar_t,
    typename col_t>
SA_ALWAYS_INLINE void add_nonzeros(
    vec_t (&acc)[kParts][kVecs],
    const scalar_t* values,
    const col_t* col,
    int64_t e_begin,
    int64_t e_end,
    const acc_t* in_t) {
  int64_t e = e_begin;
  for (; e + kParts <= e_end; e += kParts) {
    for (int p = 0; p < kParts; ++p) {
      const acc_t value = static_cast<acc_t>(values[e + p]);
      const acc_t* in = in_t + static_cast<int64_t>(col[e + p]) * kTile;
      for (int v = 0; v < kVecs; ++v) acc[p][v] += value * load_vec<vec_t>(in + v * kLanes);
    }
  }
#pragma GCC unroll 8
  for (int p = 0; p < kParts; ++p) {  // unrolled: acc indexed by constants only stays in registers
    if (e + p < e_end) {
      const acc_t value = static_cast<acc_t>(values[e + p]);
      const acc_t* in = in_t + static_cast<int64_t>(col[e + p]) * kTile;
      for (int v = 0; v < kVecs; ++v) acc[p][v] += value * load_vec<vec_t>(in + v * kLanes);
    }
  }
}

// out_t[r - r_begin][t] = bias[r] + sum_{e in row r} values[e] * in_t[col[e]][t] for r in [r_begin, r_end),
// t < kTile: rows of a CSR matrix times a transposed token tile, each nonzero one broadcast-FMA over
// kTile tokens with contiguous loads. bias may be null.
template <CpuIsa kIsa, int kTile, typename acc_t, typename scalar_t, typename index_t>
SA_ALWAYS_INLINE void csr_rows_times_tile(
    const index_t* crow,
    const index_t* col,
    const scalar_t* values,
    const scalar_t* bias,
    int64_t r_begin,
    int64_t r_end,
    const acc_t* in_t,
    acc_t* out_t) {
  using vec_t = typename Vec<kIsa, acc_t>::type;
  constexpr int kLanes = Vec<kIsa, acc_t>::kLanes;
  constexpr int kVecs = kTile / kLanes;
  static_assert(kTile % kLanes == 0, "tile must be whole vectors");
  constexpr int kParts = kPartialSums<kVecs>;
  for (int64_t r = r_begin; r < r_end; ++r) {
    const acc_t b = bias ? static_cast<acc_t>(bias[r]) : acc_t(0);
    vec_t acc[kParts][kVecs];
    for (int p = 0; p < kParts; ++p) {
      for (int v = 0; v < kVecs; ++v) acc[p][v] = vec_t{} + (p == 0 ? b : acc_t(0));
    }
    add_nonzeros<kTile, kParts, kVecs, kLanes, vec_t, acc_t>(acc, values, col, crow[r], crow[r + 1], in_t);
    add_partial_sums(acc);
    acc_t* out = out_t + (r - r_begin) * kTile;
    for (int v = 0; v < kVecs; ++v) {
      store_vec(out + v * kLanes, acc[0][v]);
    }
  }
}

// out_t[r][t] = bias[r] for r < rows, t < kTile (0 where bias is null): the start of a product that
// adds its nonzeros segment by segment.
template <CpuIsa kIsa, int kTile, typename acc_t, typename scalar_t>
SA_ALWAYS_INLINE void fill_rows_with_bias(const scalar_t* bias, int64_t rows, acc_t* out_t) {
  using vec_t = typename Vec<kIsa, acc_t>::type;
  constexpr int kLanes = Vec<kIsa, acc_t>::kLanes;
  constexpr int kVecs = kTile / kLanes;
  for (int64_t r = 0; r < rows; ++r) {
    const vec_t b = vec_t{} + (bias ? static_cast<acc_t>(bias[r]) : acc_t(0));
    for (int v = 0; v < kVecs; ++v) store_vec(out_t + r * kTile + v * kLanes, b);
  }
}

// out_t[seg_row[s]][t] += the nonzeros of segment s, for segments [s_begin, s_end) of a block order
// (values and col in entry order). Each segment loads its output vectors, adds its nonzeros, and
// stores them back.
template <CpuIsa kIsa, int kTile, typename acc_t, typename scalar_t>
SA_ALWAYS_INLINE void add_segments(
    const BlockedOrder& order,
    const scalar_t* values,
    const int32_t* col,
    int64_t s_begin,
    int64_t s_end,
    const acc_t* in_t,
    acc_t* out_t) {
  using vec_t = typename Vec<kIsa, acc_t>::type;
  constexpr int kLanes = Vec<kIsa, acc_t>::kLanes;
  constexpr int kVecs = kTile / kLanes;
  static_assert(kTile % kLanes == 0, "tile must be whole vectors");
  constexpr int kParts = kPartialSums<kVecs>;
  for (int64_t s = s_begin; s < s_end; ++s) {
    acc_t* out = out_t + static_cast<int64_t>(order.seg_row[s]) * kTile;
    vec_t acc[kParts][kVecs];
    for (int v = 0; v < kVecs; ++v) acc[0][v] = load_vec<vec_t>(out + v * kLanes);
    for (int p = 1; p < kParts; ++p) {
      for (int v = 0; v < kVecs; ++v) acc[p][v] = vec_t{};
    }
    add_nonzeros<kTile, kParts, kVecs, kLanes, vec_t, acc_t>(
        acc, values, col, order.seg_start[s], order.seg_start[s + 1], in_t);
    add_partial_sums(acc);
    for (int v = 0; v < kVecs; ++v) store_vec(out + v * kLanes, acc[0][v]);
  }
}

// The same product with the nonzeros in block order (kept_tile_blocked_order, values gathered into that
// order): out_t[r][t] = bias[r] + sum of the row's nonzeros, added block by block. A block's rows of
// the output tile and columns of the input tile stay in L1, where CSR order would stream the whole
// input tile from L2 for every row. out_t has `rows` rows; bias may be null.
template <CpuIsa kIsa, int kTile, typename acc_t, typename scalar_t>
SA_ALWAYS_INLINE void blocked_rows_times_tile(
    const BlockedOrder& order,
    const scalar_t* values,
    const scalar_t* bias,
    int64_t rows,
    const acc_t* in_t,
    acc_t* out_t) {
  fill_rows_with_bias<kIsa, kTile>(bias, rows, out_t);
  add_segments<kIsa, kTile>(order, values, order.col.data(), 0, order.segments(), in_t, out_t);
}

// Rows [r_begin, r_end) of the product, in block order when `blocked` is given (then every row:
// r_begin = 0, r_end = all rows), else in CSR order.
template <CpuIsa kIsa, int kTile, typename acc_t, typename scalar_t, typename index_t>
SA_ALWAYS_INLINE void rows_times_tile(
    const BlockedOrder* blocked,
    const scalar_t* blocked_values,
    const index_t* crow,
    const index_t* col,
    const scalar_t* values,
    const scalar_t* bias,
    int64_t r_begin,
    int64_t r_end,
    const acc_t* in_t,
    acc_t* out_t) {
  if (blocked) {
    blocked_rows_times_tile<kIsa, kTile>(*blocked, blocked_values, bias, r_end, in_t, out_t);
  } else {
    csr_rows_times_tile<kIsa, kTile>(crow, col, values, bias, r_begin, r_end, in_t, out_t);
  }
}

}  // namespace sparseadapter
