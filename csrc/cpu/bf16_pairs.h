// The bfloat16 SpMM with the AVX512-BF16 dot product (vdpbf16ps), for CPUs that have it
// (CpuIsa::kAvx512Bf16). vdpbf16ps multiplies pairs of bf16 lanes and adds both products to one
// float lane, so the operands are pairs of adjacent features: x is staged as [in / 2][kPairTile]
// 32-bit words, each token's features (2j, 2j + 1) side by side (a 32-bit transpose of x, no
// conversion), and the weight as a CSR over column pairs whose values hold both bf16 weights of the
// pair (0 where only one of them is a nonzero). A pair is one instruction for up to two nonzeros,
// with the tile half the size of the float one; the products are exact in float and summed in float.
// The x lane of a feature outside the pattern is masked to +0 before the product, so that an Inf or
// NaN there does not reach the output through 0 * Inf (a CSR product never reads those features).
// The instruction treats bf16 denormal inputs as zero and flushes denormal results (round to nearest
// even otherwise), a difference below 1.2e-38 per product.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_isa.h"
#include "transpose_avx512.h"

#if SA_X86_MULTIVERSION
#include <immintrin.h>

namespace sparseadapter {

constexpr int64_t kPairTile = 32;  // tokens per tile: two zmm of float accumulators per row

// A CSR pattern [rows, cols] regrouped by column pairs: entry e of row r covers columns 2 * pair[e]
// and 2 * pair[e] + 1. Nonzeros of one pair that are adjacent in the CSR row share an entry (rows
// sorted by column, as pruning makes them, share every pair); others get entries of their own,
// which sum the same. It depends on the pattern alone, so it is built once per pattern and kept with
// its checked entry (checked_patterns.cpp); the values are placed into it per call (PairValues).
struct PairPattern {
  std::vector<int64_t> crow;
  std::vector<int32_t> pair;
  std::vector<uint32_t> lanes;  // 0xFFFF for each bf16 half of the pair that holds a nonzero
  std::vector<int64_t> source;  // [2 * entries]: the CSR entries of the low and high half, -1 for none

  template <typename index_t>
  PairPattern(const index_t* crow_in, const index_t* col, int64_t rows) {
    const auto nnz = static_cast<size_t>(crow_in[rows]);
    crow.resize(rows + 1, 0);
    pair.reserve(nnz);
    lanes.reserve(nnz);
    source.reserve(2 * nnz);
    for (int64_t r = 0; r < rows; ++r) {
      const size_t row_begin = pair.size();
      for (int64_t e = crow_in[r]; e < crow_in[r + 1]; ++e) {
        const auto p = static_cast<int32_t>(col[e] / 2);
        const int half = static_cast<int>(col[e] % 2);
        const uint32_t lane = uint32_t{0xFFFF} << (16 * half);
        if (!(pair.size() > row_begin && pair.back() == p && (lanes.back() & lane) == 0)) {
          pair.push_back(p);
          lanes.push_back(0);
          source.push_back(-1);
          source.push_back(-1);
        }
        lanes.back() |= lane;
        source[source.size() - 2 + half] = e;
      }
      crow[r + 1] = static_cast<int64_t>(pair.size());
    }
  }
};

// A pattern's pairs with this call's values: value[e] = w[r][2p] | w[r][2p + 1] << 16 (bf16 bits).
struct PairCsr {
  const PairPattern& pattern;
  std::vector<uint32_t> value;

  PairCsr(const PairPattern& p, const c10::BFloat16* values) : pattern(p), value(p.pair.size()) {
    const int64_t* source = p.source.data();
    for (size_t i = 0; i < value.size(); ++i) {
      const int64_t lo = source[2 * i], hi = source[2 * i + 1];
      value[i] = (lo >= 0 ? uint32_t{values[lo].x} : 0u) | (hi >= 0 ? uint32_t{values[hi].x} << 16 : 0u);
    }
  }
};

// dst[j * kPairTile + t] = the bf16 pair (src[t][2j], src[t][2j + 1]) as one 32-bit word, for
// t < rows (tokens rows..kPairTile zero) and j < ceil(cols / 2); an odd last feature is paired with 0.
SA_TARGET_AVX512_BF16 inline void
load_pair_tile(const c10::BFloat16* src, int64_t ld, int64_t rows, int64_t cols, uint32_t* dst) {
  const int64_t pairs = (cols + 1) / 2;
  int64_t j_begin = 0;
  if (rows == kPairTile && cols % 2 == 0 && ld % 2 == 0) {  // 16x16 blocks of 32-bit words
    j_begin = pairs - pairs % 16;
    const float* words = reinterpret_cast<const float*>(src);  // only moved, never computed on
    for (int64_t j0 = 0; j0 < j_begin; j0 += 16) {
      for (int64_t t0 = 0; t0 < kPairTile; t0 += 16) {
        transpose16x16(
            words + t0 * (ld / 2) + j0, ld / 2, reinterpret_cast<float*>(dst) + j0 * kPairTile + t0, kPairTile);
      }
    }
  }
  for (int64_t j = j_begin; j < pairs; ++j) {
    for (int64_t t = 0; t < kPairTile; ++t) {
      uint32_t word = 0;
      if (t < rows) {
        word = src[t * ld + 2 * j].x;
        if (2 * j + 1 < cols) word |= static_cast<uint32_t>(src[t * ld + 2 * j + 1].x) << 16;
      }
      dst[j * kPairTile + t] = word;
    }
  }
}

// acc += pair entry e's two weights times its pair of features in the staged tile, for kVecs vectors
// of 16 tokens (the lane of a pair that holds no nonzero masked, so an Inf or NaN there stays out).
template <int kVecs>
SA_TARGET_AVX512_BF16 SA_ALWAYS_INLINE void add_pair(const PairCsr& w, int64_t e, const uint32_t* in_t, __m512* acc) {
  const __m512bh weights = (__m512bh)_mm512_set1_epi32(static_cast<int32_t>(w.value[e]));
  const __m512i keep = _mm512_set1_epi32(static_cast<int32_t>(w.pattern.lanes[e]));
  const uint32_t* x = in_t + static_cast<int64_t>(w.pattern.pair[e]) * kPairTile;
  for (int v = 0; v < kVecs; ++v) {
    const __m512i xv = _mm512_and_si512(_mm512_loadu_si512(x + 16 * v), keep);
    acc[v] = _mm512_dpbf16_ps(acc[v], weights, (__m512bh)xv);
  }
}

// out_t[r - r_begin][t] = bias[r] + sum over row r's pairs, for r in [r_begin, r_end) and
// t < kPairTile: kVecs vectors of 16 tokens, each with kParts partial sums, so that eight
// vdpbf16ps chains are in flight.
SA_TARGET_AVX512_BF16 inline void pair_rows_times_tile(
    const PairCsr& w,
    const c10::BFloat16* bias,
    int64_t r_begin,
    int64_t r_end,
    const uint32_t* in_t,
    float* out_t) {
  constexpr int kVecs = kPairTile / 16;
  constexpr int kParts = 8 / kVecs;
  for (int64_t r = r_begin; r < r_end; ++r) {
    __m512 acc[kParts][kVecs];
    for (int v = 0; v < kVecs; ++v) {
      acc[0][v] = _mm512_set1_ps(bias ? static_cast<float>(bias[r]) : 0.0f);
      for (int p = 1; p < kParts; ++p) acc[p][v] = _mm512_setzero_ps();
    }
    int64_t e = w.pattern.crow[r];
    const int64_t e_end = w.pattern.crow[r + 1];
    for (; e + kParts <= e_end; e += kParts) {
      for (int p = 0; p < kParts; ++p) add_pair<kVecs>(w, e + p, in_t, acc[p]);
    }
#pragma GCC unroll 8
    for (int p = 0; p < kParts; ++p) {  // the last e_end - e < kParts pairs, still one chain each
      if (e + p < e_end) add_pair<kVecs>(w, e + p, in_t, acc[p]);
    }
    for (int v = 0; v < kVecs; ++v) {
      __m512 sum = acc[0][v];
      if constexpr (kParts == 4) {
        sum = _mm512_add_ps(_mm512_add_ps(acc[0][v], acc[1][v]), _mm512_add_ps(acc[2][v], acc[3][v]));
      }
      _mm512_storeu_ps(out_t + (r - r_begin) * kPairTile + 16 * v, sum);
    }
  }
}

// Tiles [tile_begin, tile_end) of y = x @ W.T + bias, rows [r_begin, r_end) of each.
SA_TARGET_AVX512_BF16 inline void pair_spmm_tiles(
    const PairCsr& w,
    const c10::BFloat16* x,
    const c10::BFloat16* bias,
    c10::BFloat16* y,
    int64_t num_tokens,
    int64_t in_features,
    int64_t out_features,
    int64_t tile_begin,
    int64_t tile_end) {
  std::vector<uint32_t> xt(((in_features + 1) / 2) * kPairTile);
  std::vector<float> out_t(out_features * kPairTile);
  for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
    const int64_t n0 = tile * kPairTile;
    const int64_t nt = std::min(kPairTile, num_tokens - n0);
    load_pair_tile(x + n0 * in_features, in_features, nt, in_features, xt.data());
    pair_rows_times_tile(w, bias, 0, out_features, xt.data(), out_t.data());
    int64_t r_full = 0;
    if (nt == kPairTile) {  // whole 16x16 blocks of the output tile transposed in registers
      r_full = out_features - out_features % 16;
      for (int64_t r0 = 0; r0 < r_full; r0 += 16) {
        for (int64_t t0 = 0; t0 < kPairTile; t0 += 16) {
          transpose16x16(
              out_t.data() + r0 * kPairTile + t0, kPairTile, y + (n0 + t0) * out_features + r0, out_features);
        }
      }
    }
    for (int64_t t = 0; t < nt; ++t) {
      for (int64_t r = r_full; r < out_features; ++r) {
        y[(n0 + t) * out_features + r] = static_cast<c10::BFloat16>(out_t[r * kPairTile + t]);
      }
    }
  }
}

// y = x @ W.T + bias for bfloat16 x [num_tokens, in_features] and W in CSR (its pattern's pairs and
// its values), tiles split over threads.
inline void pair_spmm(
    const PairPattern& pattern,
    const c10::BFloat16* values,
    const c10::BFloat16* x,
    const c10::BFloat16* bias,
    c10::BFloat16* y,
    int64_t num_tokens,
    int64_t in_features,
    int64_t out_features) {
  const PairCsr w(pattern, values);
  const int64_t tiles = (num_tokens + kPairTile - 1) / kPairTile;
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    pair_spmm_tiles(w, x, bias, y, num_tokens, in_features, out_features, begin, end);
  });
}

}  // namespace sparseadapter
#endif  // SA_X86_MULTIVERSION
