"""Fits the polynomial coefficients of csrc/cpu/vec_math.h (float64 least squares, numpy only) and
prints them as C++ float literals, with each fit's worst error when evaluated in float32.

    python scripts/fit_activation_polynomials.py
"""

import math

import numpy as np

F32 = np.float32
P = np.polynomial.polynomial


def horner32(coeffs, v):
    p = np.full_like(v, F32(coeffs[-1]))
    for c in coeffs[-2::-1]:
        p = (p * v + F32(c)).astype(F32)
    return p


def literal(coeffs):
    return ", ".join(f"{F32(c):.9e}f" for c in coeffs)


def main():
    # tanh(x) = x + x^3 P(x^2) on |x| < 0.625
    x = np.linspace(1e-4, 0.675, 20001)
    tanh_poly = P.polyfit(x * x, (np.tanh(x) - x) / x**3, 5)
    xf = np.linspace(0, 0.625, 100001).astype(F32)
    got = xf + xf * (xf * xf) * horner32(tanh_poly, (xf * xf).astype(F32))
    print(
        "kPoly (tanh)       ", literal(tanh_poly), "  max abs err", np.abs(got - np.tanh(xf.astype(np.float64))).max()
    )

    # erf(z) = z Q(z^2) on z < 0.8
    z = np.linspace(0, 0.85, 20001)
    erf_over_z = np.array([math.erf(v) / v if v > 0 else 2 / math.sqrt(math.pi) for v in z])
    erf_near = P.polyfit(z * z, erf_over_z, 5)
    zf = np.linspace(0, 0.8, 100001).astype(F32)
    got = zf * horner32(erf_near, (zf * zf).astype(F32))
    print(
        "kErfNearZero       ",
        literal(erf_near),
        "  max abs err",
        np.abs(got - np.array([math.erf(float(v)) for v in zf])).max(),
    )

    # erfc(z) = e^{-z^2} R(t), t = 1 / (1 + z / 2), on z >= 0.8 (fitted to 10, relative weights)
    z = np.linspace(0.75, 10, 40001)
    scaled = np.array([math.erfc(v) * math.exp(v * v) for v in z])
    erfc_tail = P.polyfit(1 / (1 + 0.5 * z), scaled, 9, w=1 / scaled)
    zf = np.linspace(0.8, 9, 100001).astype(F32)
    tf = (F32(1) / (F32(1) + F32(0.5) * zf)).astype(F32)
    got = np.exp(-(zf * zf)).astype(F32) * horner32(erfc_tail, tf)
    print(
        "kErfcTail          ",
        literal(erfc_tail),
        "  max abs err",
        np.abs(got - np.array([math.erfc(float(v)) for v in zf])).max(),
    )


if __name__ == "__main__":
    main()
