// CSR products for a few tokens per call (decoding with a KV cache: 1-8 tokens), row by row.
//
// The tiled kernels (tile.h) stage kTile = 32 tokens however few a call has: at one token that is
// 32 times the work, and three tile buffers filled per call. Here each row's nonzeros are read once
// for all tokens and x is read in place. Each token keeps kParts partial sums per row, so that
// consecutive nonzeros do not wait on one another's FMA; they are added at the end of the row:
// out = bias + ((p0 + p1) + (p2 + p3)), in the accumulation type.
#pragma once

#include <cstdint>

#include "cpu_isa.h"

namespace sparseadapter {

constexpr int64_t kFewTokens = 8;  // calls with at most this many tokens take these products

namespace few_tokens_detail {

constexpr int kParts = 4;

template <int kTokens, typename acc_t, typename scalar_t, typename in_t, typename index_t>
SA_ALWAYS_INLINE void rows(
    const index_t* crow,
    const index_t* col,
    const scalar_t* values,
    const scalar_t* bias,
    int64_t num_rows,
    const in_t* in,
    int64_t in_stride,
    acc_t* out,
    int64_t out_stride) {
  for (int64_t r = 0; r < num_rows; ++r) {
    acc_t part[kTokens][kParts] = {};
    int64_t e = crow[r];
    const int64_t e_end = crow[r + 1];
    for (; e + kParts <= e_end; e += kParts) {
      for (int k = 0; k < kParts; ++k) {
        const acc_t value = static_cast<acc_t>(values[e + k]);
        const int64_t c = col[e + k];
        for (int t = 0; t < kTokens; ++t) {
          part[t][k] += value * static_cast<acc_t>(in[t * in_stride + c]);
        }
      }
    }
    for (; e < e_end; ++e) {
      const acc_t value = static_cast<acc_t>(values[e]);
      const int64_t c = col[e];
      for (int t = 0; t < kTokens; ++t) {
        part[t][0] += value * static_cast<acc_t>(in[t * in_stride + c]);
      }
    }
    const acc_t b = bias ? static_cast<acc_t>(bias[r]) : acc_t(0);
    for (int t = 0; t < kTokens; ++t) {
      out[t * out_stride + r] = b + ((part[t][0] + part[t][1]) + (part[t][2] + part[t][3]));
    }
  }
}

}  // namespace few_tokens_detail

// out[t * out_stride + r] = bias[r] + sum over row r's nonzeros e of values[e] * in[t * in_stride + col[e]],
// for tokens t < num_tokens (1..kFewTokens) and rows r < num_rows; bias may be null. acc_t: the
// accumulation type, in which out is written.
template <typename acc_t, typename scalar_t, typename in_t, typename index_t>
SA_ALWAYS_INLINE void csr_rows_times_few_tokens(
    const index_t* crow,
    const index_t* col,
    const scalar_t* values,
    const scalar_t* bias,
    int64_t num_rows,
    const in_t* in,
    int64_t in_stride,
    int64_t num_tokens,
    acc_t* out,
    int64_t out_stride) {
  using namespace few_tokens_detail;
  switch (num_tokens) {
    case 1: rows<1>(crow, col, values, bias, num_rows, in, in_stride, out, out_stride); return;
    case 2: rows<2>(crow, col, values, bias, num_rows, in, in_stride, out, out_stride); return;
    case 3: rows<3>(crow, col, values, bias, num_rows, in, in_stride, out, out_stride); return;
    case 4: rows<4>(crow, col, values, bias, num_rows, in, in_stride, out, out_stride); return;
    case 5: rows<5>(crow, col, values, bias, num_rows, in, in_stride, out, out_stride); return;
    case 6: rows<6>(crow, col, values, bias, num_rows, in, in_stride, out, out_stride); return;
    case 7: rows<7>(crow, col, values, bias, num_rows, in, in_stride, out, out_stride); return;
    default: rows<8>(crow, col, values, bias, num_rows, in, in_stride, out, out_stride); return;
  }
}

}  // namespace sparseadapter
