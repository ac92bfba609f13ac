// Branch-free fp32 exp, tanh, SiLU and exact (erf) GELU on a variant's float vectors (Vec in
// cpu_isa.h), for the bottleneck activation of the fused CPU adapter: with libm's scalar calls the
// activation cost more than the two sparse matmuls around it. Always inlined, so each ISA variant of
// the caller gets its own instructions.
//
// Accuracy, measured against float64 (tests/ext/test_fused_activations.py): exp within a few ulp; tanh,
// SiLU and GELU within about 1.5e-7 absolute (relative for SiLU and small tanh), the class of ATen's
// own vectorized kernels. The polynomial coefficients are our least-squares fits
// (scripts/fit_activation_polynomials.py); exp uses Cody-Waite range reduction and a degree-7 Taylor
// polynomial on |r| <= ln2 / 2.
#pragma once

#include <cstdint>

#include "cpu_isa.h"

namespace sparseadapter {
namespace vec_math {

template <typename V>
using IntVec = decltype(V{} < V{});  // the lane masks of V: int32 lanes

template <typename V>
SA_ALWAYS_INLINE V splat(float s) {
  V v = {};
  return v + s;
}

template <typename V>
SA_ALWAYS_INLINE V abs(V x) {
  return (V)((IntVec<V>)x & 0x7fffffff);
}

// |magnitude| with the sign of `sign`
template <typename V>
SA_ALWAYS_INLINE V copysign(V magnitude, V sign) {
  using I = IntVec<V>;
  return (V)(((I)magnitude & 0x7fffffff) | ((I)sign & static_cast<int32_t>(0x80000000u)));
}

template <typename V, int N>
SA_ALWAYS_INLINE V horner(V v, const float (&c)[N]) {
  V p = splat<V>(c[N - 1]);
  for (int k = N - 2; k >= 0; --k) {
    p = p * v + c[k];
  }
  return p;
}

// e^x, clamped to [e^-87.3, e^88]: the result stays a normal float (no overflow to inf, no
// denormals), which the activations below rely on and never notice.
template <typename V>
SA_ALWAYS_INLINE V exp(V x) {
  x = x < -87.3f ? splat<V>(-87.3f) : x;
  x = x > 88.0f ? splat<V>(88.0f) : x;
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding and subtracting it rounds to an integer
  const V n = (x * 1.44269504f + kRound) - kRound;
  const V r = (x - n * 0.693359375f) - n * -2.12194440e-4f;  // x - n ln2, ln2 split in two
  static constexpr float kTaylor[] = {1.0f, 1.0f, 1.0f / 2, 1.0f / 6, 1.0f / 24, 1.0f / 120, 1.0f / 720, 1.0f / 5040};
  const V p = horner(r, kTaylor);
  const IntVec<V> two_to_n = (__builtin_convertvector(n, IntVec<V>) + 127) << 23;
  return p * (V)two_to_n;
}

template <typename V>
SA_ALWAYS_INLINE V tanh(V x) {
  // |x| < 0.625: x + x^3 P(x^2); beyond, 1 - 2 / (e^{2|x|} + 1), where the subtraction loses nothing.
  static constexpr float kPoly[] = {-3.333333433e-01f, 1.333328784e-01f,  -5.395559594e-02f,
                                    2.173937112e-02f,  -8.249028586e-03f, 2.187986625e-03f};
  const V a = abs(x);
  const V s = a * a;
  const V near_zero = a + a * s * horner(s, kPoly);
  const V far = 1.0f - 2.0f / (exp(2.0f * a) + 1.0f);
  return copysign(a < 0.625f ? near_zero : far, x);
}

// Below -100 the result is 0 (it is under -1e-41): also -inf gives the limit 0, not -inf / inf.
template <typename V>
SA_ALWAYS_INLINE V silu(V x) {
  return x < -100.0f ? splat<V>(0.0f) : x / (1.0f + exp(-x));
}

// x/2 (1 + erf(x / sqrt 2)) with z = |x| / sqrt 2:
//   z < 0.8:  erf(z) = z Q(z^2);
//   z >= 0.8: erfc(z) = e^{-z^2} R(t), t = 1 / (1 + z / 2),
// and 1 + erf(x / sqrt 2) is, by the sign of x, 1 -+ erf(z) near zero and erfc(z) or 2 - erfc(z) in
// the tails: the negative tail is computed without cancellation (more accurately than float64's
// 0.5 x (1 + erf(x / sqrt 2)), which is 0 from x = -8.3).
template <typename V>
SA_ALWAYS_INLINE V gelu(V x) {
  static constexpr float kErfNearZero[] = {1.128379107e+00f,  -3.761259019e-01f, 1.128294468e-01f,
                                           -2.681211941e-02f, 5.067425780e-03f,  -6.411937647e-04f};
  static constexpr float kErfcTail[] = {3.363489668e-06f, 2.819905579e-01f,  2.835090160e-01f, 2.357881367e-01f,
                                        2.311412692e-01f, -9.601034224e-02f, 3.844672740e-01f, -5.864250064e-01f,
                                        3.357460499e-01f, -7.019777596e-02f};
  const V z = abs(x) * 0.707106781f;
  const V s = z * z;
  const V erf_near = z * horner(s, kErfNearZero);
  const V erfc_tail = exp(-s) * horner(1.0f / (1.0f + 0.5f * z), kErfcTail);
  // (Each `?:` tests a comparison written in place: GCC scalarizes a vector condition kept in a
  // variable.)
  const V near_zero = x < 0.0f ? 1.0f - erf_near : 1.0f + erf_near;
  const V tail = x < 0.0f ? erfc_tail : 2.0f - erfc_tail;
  const V one_plus_erf = z < 0.8f ? near_zero : tail;
  // below x = -10 sqrt 2 the result is under 1e-40: 0, also for -inf
  return x < -14.1421356f ? splat<V>(0.0f) : 0.5f * x * one_plus_erf;
}

}  // namespace vec_math
}  // namespace sparseadapter
