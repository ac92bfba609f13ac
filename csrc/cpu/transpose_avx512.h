// 16x16 register transposes with AVX-512, for staging token tiles (tile.h). Staging a tile is a
// transpose, and element by element it costs one scalar store per element: at high sparsity that
// was most of the kernel's time. In registers it is 16 loads, 64 shuffles and 16 stores per 256
// elements. Only compiled into the AVX-512 variants (cpu_isa.h); float, half and bfloat16 inputs
// are widened to float on load, and outputs narrowed from float on store (round to nearest even, as
// c10's conversions do: a scalar conversion per element made a bf16 output tile cost more than the
// product).
#pragma once

#include "cpu_isa.h"

#if SA_X86_MULTIVERSION
#include <immintrin.h>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

namespace sparseadapter {

template <typename scalar_t>
constexpr bool kHasAvx512Transpose =
    std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, c10::Half> || std::is_same_v<scalar_t, c10::BFloat16>;

// 16 consecutive elements as float.
template <typename scalar_t>
SA_TARGET_AVX512 SA_ALWAYS_INLINE __m512 load16_as_float(const scalar_t* p) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return _mm512_loadu_ps(p);
  } else if constexpr (std::is_same_v<scalar_t, c10::Half>) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  } else {  // bfloat16 is the upper half of a float
    const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
  }
}

// Stores 16 floats as scalar_t.
template <typename scalar_t>
SA_TARGET_AVX512 SA_ALWAYS_INLINE void store16_from_float(scalar_t* p, __m512 v) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    _mm512_storeu_ps(p, v);
  } else if constexpr (std::is_same_v<scalar_t, c10::Half>) {
    _mm256_storeu_si256(
        reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  } else {  // bfloat16: the upper half of the float rounded to nearest even; NaN stays a (quiet) NaN
    const __m512i bits = _mm512_castps_si512(v);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    __m512i upper = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))), 16);
    upper = _mm512_mask_mov_epi32(upper, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(upper));
  }
}

// dst[k * ldd + t] = dst_t(float(src[t * ld + k])) for t, k < 16. Not force-inlined: its callers
// are compiled for the baseline ISA and only call it from the AVX-512 variant.
template <typename src_t, typename dst_t>
SA_TARGET_AVX512 void transpose16x16(const src_t* src, int64_t ld, dst_t* dst, int64_t ldd) {
  __m512 r[16];
  __m512 u[16];
  for (int i = 0; i < 16; ++i) {
    r[i] = load16_as_float(src + i * ld);
  }
  // Interleave row pairs (32-bit), then row quads (64-bit): per 128-bit lane L, u[4g + j] holds
  // column 4L + j of rows 4g .. 4g + 3.
  for (int i = 0; i < 16; i += 2) {
    u[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    u[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int g = 0; g < 16; g += 4) {
    const __m512d a = _mm512_castps_pd(u[g]), b = _mm512_castps_pd(u[g + 1]);
    const __m512d c = _mm512_castps_pd(u[g + 2]), d = _mm512_castps_pd(u[g + 3]);
    r[g] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    r[g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    r[g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    r[g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  // Gather lane L of the four row quads: a 4x4 transpose of 128-bit lanes.
  for (int j = 0; j < 4; ++j) {
    const __m512 v0 = _mm512_shuffle_f32x4(r[j], r[4 + j], 0x44);
    const __m512 v1 = _mm512_shuffle_f32x4(r[j], r[4 + j], 0xEE);
    const __m512 v2 = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0x44);
    const __m512 v3 = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0xEE);
    store16_from_float(dst + (0 + j) * ldd, _mm512_shuffle_f32x4(v0, v2, 0x88));
    store16_from_float(dst + (4 + j) * ldd, _mm512_shuffle_f32x4(v0, v2, 0xDD));
    store16_from_float(dst + (8 + j) * ldd, _mm512_shuffle_f32x4(v1, v3, 0x88));
    store16_from_float(dst + (12 + j) * ldd, _mm512_shuffle_f32x4(v1, v3, 0xDD));
  }
}

}  // namespace sparseadapter
#endif  // SA_X86_MULTIVERSION
