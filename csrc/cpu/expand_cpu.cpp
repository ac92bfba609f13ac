// CPU csr_to_dense and csr_gather (also from a transposed dense matrix): one pass over the rows,
// split across threads.
//
// On AVX-512 CPUs with VBMI2 (16-bit expand/compress), a pattern whose columns increase within each
// row is walked 32 columns at a time with its column masks (built once per pattern and kept with its
// checked entry, checked_patterns.cpp): a row's next entries are loaded as one vector and expanded
// to their columns, zeros elsewhere (csr_to_dense), or a dense row's 32 columns are compressed to
// the entries among them (csr_gather). Each output vector is written once, with no index read per
// entry. Other patterns, dtypes and CPUs take the scalar loop.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <type_traits>
#include <vector>

#include "../dispatch.h"
#include "../kernels.h"
#include "../validation.h"
#include "cpu_isa.h"

#if SA_X86_MULTIVERSION
#include <immintrin.h>
#define SA_TARGET_AVX512_VBMI2 __attribute__((target("avx512f,avx512bw,avx512vbmi2,popcnt")))
#endif

namespace sparseadapter {
namespace {

// Rows per parallel work item: enough entries that a thread's start-up is paid back.
int64_t row_grain(const PatternData& in) {
  const int64_t per_row = std::max<int64_t>(1, in.num_cols + in.nnz / std::max<int64_t>(in.num_rows, 1));
  return std::max<int64_t>(1, 32768 / per_row);
}

// The pattern's columns as bits, 32 columns a word: bit b of row r's word j is set when column
// 32 j + b holds an entry. `increasing`: every row's columns strictly increase, so the entries of a
// word are consecutive in CSR order and as many as its bits (what the vector loops rely on).
struct ColumnMasks {
  int64_t words_per_row = 0;
  bool increasing = true;
  std::vector<uint32_t> bits;  // [rows][words_per_row]
};

template <typename index_t>
std::shared_ptr<const ColumnMasks>
build_column_masks(const index_t* crow, const index_t* col, int64_t rows, int64_t cols) {
  auto m = std::make_shared<ColumnMasks>();
  m->words_per_row = (cols + 31) / 32;
  m->bits.assign(static_cast<size_t>(rows * m->words_per_row), 0);
  for (int64_t r = 0; r < rows && m->increasing; ++r) {
    uint32_t* words = m->bits.data() + r * m->words_per_row;
    int64_t previous = -1;
    for (int64_t e = crow[r]; e < crow[r + 1]; ++e) {
      const int64_t c = col[e];
      if (c <= previous) {
        m->increasing = false;
        break;
      }
      words[c / 32] |= uint32_t{1} << (c % 32);
      previous = c;
    }
  }
  if (!m->increasing) {
    m->bits.clear();  // never read
  }
  return m;
}

#if SA_X86_MULTIVERSION
// The lowest n lanes (n <= 32).
SA_ALWAYS_INLINE uint32_t low_lanes(int64_t n) {
  return n >= 32 ? ~uint32_t{0} : (uint32_t{1} << n) - 1;
}

// Rows [r_begin, r_end) of the dense matrix from 16-bit values (bf16, fp16: only moved, never computed on).
template <typename index_t>
SA_TARGET_AVX512_VBMI2 void expand_rows(
    const ColumnMasks& m,
    const index_t* crow,
    const uint16_t* values,
    uint16_t* out,
    int64_t cols,
    int64_t r_begin,
    int64_t r_end) {
  for (int64_t r = r_begin; r < r_end; ++r) {
    const uint32_t* words = m.bits.data() + r * m.words_per_row;
    const uint16_t* v = values + crow[r];
    uint16_t* row = out + r * cols;
    for (int64_t j = 0; j < m.words_per_row; ++j) {
      const uint32_t mask = words[j];
      const int n = __builtin_popcount(mask);
      const __m512i packed = _mm512_maskz_loadu_epi16(low_lanes(n), v);
      _mm512_mask_storeu_epi16(row + 32 * j, low_lanes(cols - 32 * j), _mm512_maskz_expand_epi16(mask, packed));
      v += n;
    }
  }
}

// The same for 32-bit values (float32), 16 columns a half word (the overloads serve csr_to_dense and
// csr_gather by element size).
template <typename index_t>
SA_TARGET_AVX512_VBMI2 void expand_rows(
    const ColumnMasks& m,
    const index_t* crow,
    const uint32_t* values,
    uint32_t* out,
    int64_t cols,
    int64_t r_begin,
    int64_t r_end) {
  for (int64_t r = r_begin; r < r_end; ++r) {
    const uint32_t* words = m.bits.data() + r * m.words_per_row;
    const uint32_t* v = values + crow[r];
    uint32_t* row = out + r * cols;
    for (int64_t j = 0; j < 2 * m.words_per_row && 16 * j < cols; ++j) {
      const auto mask = static_cast<__mmask16>(words[j / 2] >> (16 * (j % 2)));
      const int n = __builtin_popcount(mask);
      const __m512i packed = _mm512_maskz_loadu_epi32(static_cast<__mmask16>(low_lanes(n)), v);
      _mm512_mask_storeu_epi32(
          row + 16 * j, static_cast<__mmask16>(low_lanes(std::min<int64_t>(16, cols - 16 * j))),
          _mm512_maskz_expand_epi32(mask, packed));
      v += n;
    }
  }
}

template <typename index_t>
SA_TARGET_AVX512_VBMI2 void gather_rows(
    const ColumnMasks& m,
    const index_t* crow,
    const uint16_t* dense,
    uint16_t* values,
    int64_t cols,
    int64_t r_begin,
    int64_t r_end) {
  for (int64_t r = r_begin; r < r_end; ++r) {
    const uint32_t* words = m.bits.data() + r * m.words_per_row;
    uint16_t* v = values + crow[r];
    const uint16_t* row = dense + r * cols;
    for (int64_t j = 0; j < m.words_per_row; ++j) {
      const uint32_t mask = words[j];
      const int n = __builtin_popcount(mask);
      const __m512i full = _mm512_maskz_loadu_epi16(low_lanes(cols - 32 * j), row + 32 * j);
      _mm512_mask_storeu_epi16(v, low_lanes(n), _mm512_maskz_compress_epi16(mask, full));
      v += n;
    }
  }
}

template <typename index_t>
SA_TARGET_AVX512_VBMI2 void gather_rows(
    const ColumnMasks& m,
    const index_t* crow,
    const uint32_t* dense,
    uint32_t* values,
    int64_t cols,
    int64_t r_begin,
    int64_t r_end) {
  for (int64_t r = r_begin; r < r_end; ++r) {
    const uint32_t* words = m.bits.data() + r * m.words_per_row;
    uint32_t* v = values + crow[r];
    const uint32_t* row = dense + r * cols;
    for (int64_t j = 0; j < 2 * m.words_per_row && 16 * j < cols; ++j) {
      const auto mask = static_cast<__mmask16>(words[j / 2] >> (16 * (j % 2)));
      const int n = __builtin_popcount(mask);
      const __m512i full = _mm512_maskz_loadu_epi32(
          static_cast<__mmask16>(low_lanes(std::min<int64_t>(16, cols - 16 * j))), row + 16 * j);
      _mm512_mask_storeu_epi32(v, static_cast<__mmask16>(low_lanes(n)), _mm512_maskz_compress_epi32(mask, full));
      v += n;
    }
  }
}

// Whether this CPU runs the vector loops: AVX-512 allowed by cpu_isa() (SPARSEADAPTER_CPU_ISA caps it)
// and VBMI2 present.
bool vector_expand_supported() {
  static const bool supported = [] {
    __builtin_cpu_init();
    return cpu_isa() >= CpuIsa::kAvx512 && __builtin_cpu_supports("avx512vbmi2");
  }();
  return supported;
}
#endif

// The pattern's column masks when the vector loops can serve `in` (element size 2 or 4, increasing
// columns, a capable CPU), else null.
template <typename scalar_t, typename index_t>
std::shared_ptr<const ColumnMasks> vector_masks(const PatternData& in) {
#if SA_X86_MULTIVERSION
  if constexpr (sizeof(scalar_t) == 2 || sizeof(scalar_t) == 4) {
    if (!vector_expand_supported()) {
      return nullptr;
    }
    auto masks = pattern_derived_cpu_as<ColumnMasks>(
        in.crow_indices, in.col_indices, in.num_cols, PatternDerivedKind::kColumnMasks, /*variant=*/0, [&] {
          return build_column_masks(
              in.crow_indices.const_data_ptr<index_t>(), in.col_indices.const_data_ptr<index_t>(), in.num_rows,
              in.num_cols);
        });
    return masks->increasing ? masks : nullptr;
  }
#endif
  return nullptr;
}

template <typename scalar_t>
using Bits = std::conditional_t<sizeof(scalar_t) == 2, uint16_t, uint32_t>;

}  // namespace

void csr_to_dense_cpu_kernel(const PatternData& in, at::Tensor& dense) {
  SA_DISPATCH_VALUE_AND_INDEX_TYPES(in.data.scalar_type(), in.crow_indices.scalar_type(), "csr_to_dense_cpu", [&] {
    const scalar_t* values = in.data.const_data_ptr<scalar_t>();
    const index_t* crow = in.crow_indices.const_data_ptr<index_t>();
    const index_t* col = in.col_indices.const_data_ptr<index_t>();
    scalar_t* out = dense.mutable_data_ptr<scalar_t>();
    const int64_t cols = in.num_cols;
    const auto masks = vector_masks<scalar_t, index_t>(in);
    at::parallel_for(0, in.num_rows, row_grain(in), [&](int64_t r_begin, int64_t r_end) {
#if SA_X86_MULTIVERSION
      {  // (a double pattern never has masks)
        if (masks) {
          using bits_t = Bits<scalar_t>;
          const auto* v = reinterpret_cast<const bits_t*>(values);
          auto* o = reinterpret_cast<bits_t*>(out);
          expand_rows(*masks, crow, v, o, cols, r_begin, r_end);
          return;
        }
      }
#endif
      for (int64_t r = r_begin; r < r_end; ++r) {
        scalar_t* row = out + r * cols;
        std::fill(row, row + cols, scalar_t(0));
        for (int64_t e = crow[r]; e < crow[r + 1]; ++e) {
          row[col[e]] = values[e];
        }
      }
    });
  });
}

void csr_gather_cpu_kernel(const PatternData& in, at::Tensor& out) {
  SA_DISPATCH_VALUE_AND_INDEX_TYPES(in.data.scalar_type(), in.crow_indices.scalar_type(), "csr_gather_cpu", [&] {
    const scalar_t* dense = in.data.const_data_ptr<scalar_t>();
    const index_t* crow = in.crow_indices.const_data_ptr<index_t>();
    const index_t* col = in.col_indices.const_data_ptr<index_t>();
    scalar_t* values = out.mutable_data_ptr<scalar_t>();
    const int64_t cols = in.num_cols;
    const auto masks = vector_masks<scalar_t, index_t>(in);
    at::parallel_for(0, in.num_rows, row_grain(in), [&](int64_t r_begin, int64_t r_end) {
#if SA_X86_MULTIVERSION
      {  // (a double pattern never has masks)
        if (masks) {
          using bits_t = Bits<scalar_t>;
          const auto* d = reinterpret_cast<const bits_t*>(dense);
          auto* v = reinterpret_cast<bits_t*>(values);
          gather_rows(*masks, crow, d, v, cols, r_begin, r_end);
          return;
        }
      }
#endif
      for (int64_t r = r_begin; r < r_end; ++r) {
        const scalar_t* row = dense + r * cols;
        for (int64_t e = crow[r]; e < crow[r + 1]; ++e) {
          values[e] = row[col[e]];
        }
      }
    });
  });
}

}  // namespace sparseadapter

namespace sparseadapter {

void csr_gather_transposed_cpu_kernel(const PatternData& in, at::Tensor& out) {
  SA_DISPATCH_VALUE_AND_INDEX_TYPES(
      in.data.scalar_type(), in.crow_indices.scalar_type(), "csr_gather_transposed_cpu", [&] {
        const scalar_t* dense_t = in.data.const_data_ptr<scalar_t>();
        const index_t* crow = in.crow_indices.const_data_ptr<index_t>();
        const index_t* col = in.col_indices.const_data_ptr<index_t>();
        scalar_t* values = out.mutable_data_ptr<scalar_t>();
        const int64_t rows = in.num_rows;
        at::parallel_for(0, rows, row_grain(in), [&](int64_t r_begin, int64_t r_end) {
          for (int64_t r = r_begin; r < r_end; ++r) {  // column r of dense_t, one read per entry
            for (int64_t e = crow[r]; e < crow[r + 1]; ++e) {
              values[e] = dense_t[static_cast<int64_t>(col[e]) * rows + r];
            }
          }
        });
      });
}

}  // namespace sparseadapter
