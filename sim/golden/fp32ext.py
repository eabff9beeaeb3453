"""Golden model of the vector unit's FP32 extensions (numpy), written from the spec.

Same numerics contract as :mod:`sim.golden.fp` (flush subnormals on input and
output, round to nearest even, canonical NaN ``0x7FC00000``, overflow to
infinity), plus:

* **FP32 x FP32 multiply**: the exact product (exact in float64: 24 x 24
  bits) is rounded to a 24-bit significand with an unbounded exponent, then a
  result below ``2**-126`` becomes a signed zero and one of ``2**128`` or more
  becomes infinity (tininess detected after rounding).
* **max**: NaN if either operand is NaN, otherwise the larger value with
  ``+0 > -0``.
* **BF16 load**: exact widening; subnormals flushed, NaNs canonical.
  **BF16 store**: :func:`sim.golden.fp.round_bf16`.
* Special functions ``exp2``, ``recip``, ``rsqrt``, ``gelu``: range
  reduction to a segment and residual, the quadratic from
  :mod:`hw.npu.vector_tables` evaluated in FP32 as
  ``((c2 * r) + c1) * r + c0``, then an exact power-of-two scaling (with
  flush to zero / overflow to infinity).

Bit patterns are ``uint32`` arrays throughout.
"""

from __future__ import annotations

import numpy as np

from hw.npu import vector_tables as T
from hw.spec import fp as G

__all__ = ["mul_f32", "max_f32", "load_bf16", "load_f32", "store_bf16", "exp2", "recip", "rsqrt",
           "gelu", "exp", "NEG_INF", "POS_INF", "NEG_ZERO"]

NEG_INF = np.uint32(0xFF800000)
POS_INF = np.uint32(0x7F800000)
NEG_ZERO = np.uint32(0x80000000)
_QNAN = np.uint32(0x7FC00000)


def _f64(bits):
    with np.errstate(invalid="ignore"):
        return G.ftz(G.bits_to_f32(bits)).astype(np.float64)


def _pack_f64(v, sign_src=None):
    """float64 values already on the FP32 significand grid -> FP32 bits, with FTZ and overflow."""
    v = np.asarray(v, dtype=np.float64)
    out = np.empty(v.shape, dtype=np.uint32)
    with np.errstate(all="ignore"):
        big = np.abs(v) >= 2.0**128
        tiny = np.abs(v) < 2.0**-126
        body = np.where(big | tiny | np.isnan(v), 1.0, v).astype(np.float32).view(np.uint32)
    sign = np.signbit(v).astype(np.uint32) << 31
    out[...] = body
    out = np.where(big, POS_INF | sign, out)
    out = np.where(tiny, sign, out)
    out = np.where(np.isnan(v), _QNAN, out)
    return out.astype(np.uint32)


def _round24(v):
    """Round float64 values to a 24-bit significand (RNE), unbounded exponent."""
    m, e = np.frexp(v)
    return np.ldexp(np.round(m * 2.0**24) / 2.0**24, e)


def mul_f32(a_bits, b_bits) -> np.ndarray:
    """FP32 x FP32 -> FP32 bit patterns."""
    a, b = _f64(a_bits), _f64(b_bits)
    with np.errstate(all="ignore"):
        p = a * b                           # exact: 48 significant bits
        p = np.where(np.isfinite(p) & (p != 0), _round24(p), p)
    return _pack_f64(p)


def max_f32(a_bits, b_bits) -> np.ndarray:
    """Elementwise max of canonical FP32 bit patterns (NaN wins, +0 > -0)."""
    a = np.asarray(a_bits, dtype=np.uint32)
    b = np.asarray(b_bits, dtype=np.uint32)
    fa, fb = G.bits_to_f32(a), G.bits_to_f32(b)
    a_wins = (fa > fb) | ((fa == fb) & ~np.signbit(fa)) | np.isnan(fa)
    out = np.where(a_wins, a, b)
    out = np.where(np.isnan(fa) | np.isnan(fb), _QNAN, out)
    return out.astype(np.uint32)


def load_f32(bits) -> np.ndarray:
    """FP32 memory word -> canonical FP32 (FTZ, canonical NaN)."""
    return G.canon(G.bits_to_f32(bits))


def load_bf16(bits16) -> np.ndarray:
    return G.canon(G.bf16_to_f32(bits16))


def store_bf16(bits32) -> np.ndarray:
    return G.round_bf16(bits32)


def _horner(idx, r_bits):
    c = T.coefficients()[idx].view(np.uint32)
    p = mul_f32(c[..., 2], r_bits)
    p = G.add_f32(p, c[..., 1])
    p = mul_f32(p, r_bits)
    return G.add_f32(p, c[..., 0])


def _scale(p_bits, k, neg=False):
    """p * 2**k exactly (k integer array), FTZ / overflow; sign flipped where ``neg``."""
    p = _f64(p_bits) * np.ldexp(1.0, np.asarray(k, dtype=np.int64))
    p = np.where(neg, -p, p)
    return _pack_f64(p)


def _fields(x):
    x = np.asarray(x, dtype=np.uint32)
    return (x >> 31).astype(np.int64), ((x >> 23) & 0xFF).astype(np.int64), (x & 0x7FFFFF).astype(np.int64)


def _operand(x_bits):
    """The operand as the unit loads it (:func:`load_f32`): ``(bits, sign, biased exponent, fraction, float64
    value)``."""
    x = load_f32(x_bits)
    s, e, f = _fields(x)
    return x, s, e, f, _f64(x)


def _poly_arg(bits, n: int):
    """The ``n`` low bits of ``bits`` (below a table index) times 2**-23, as FP32 bits: the polynomial's
    argument."""
    return G.f32_bits((bits & ((1 << n) - 1)).astype(np.float64) * 2.0**-23)


def exp2(x_bits) -> np.ndarray:
    """2**x."""
    _, s, e, _, xf = _operand(x_bits)
    nan = np.isnan(xf)
    big = (e - 127 >= 7) & ~nan                   # |x| >= 128, inf included
    ok = ~nan & ~big
    t = np.where(ok, xf, 0.0)
    tt = np.floor(t * 2.0**23).astype(np.int64)    # exact
    n = tt >> 23
    frac = tt & 0x7FFFFF
    idx = T.EXP2_BASE + (frac >> 17)
    r = _poly_arg(frac, 17)
    out = _scale(_horner(idx, r), n)
    out = np.where(big, np.where(s == 1, np.uint32(0), POS_INF), out)
    return np.where(nan, _QNAN, out).astype(np.uint32)


def exp(x_bits) -> np.ndarray:
    """e**x as the vector unit's EXP computes it: exp2(x * log2(e)) with an FP32 multiply."""
    return exp2(mul_f32(load_f32(x_bits), G.f32_bits(T.LOG2E)))


def recip(x_bits) -> np.ndarray:
    """1/x."""
    _, s, e, f, xf = _operand(x_bits)
    idx = T.RECIP_BASE + (f >> 16)
    r = _poly_arg(f, 16)
    out = _scale(_horner(idx, r), 127 - e, neg=s == 1)
    out = np.where(e == 0, POS_INF | (s.astype(np.uint32) << 31), out)
    out = np.where(np.isinf(xf), s.astype(np.uint32) << 31, out)
    return np.where(np.isnan(xf), _QNAN, out).astype(np.uint32)


def rsqrt(x_bits) -> np.ndarray:
    """1/sqrt(x); rsqrt(-0) = -inf, rsqrt(x < 0) = NaN."""
    _, s, e, f, xf = _operand(x_bits)
    E = e - 127
    odd = E & 1
    idx = T.RSQRT_BASE + (odd << T.RSQRT_BITS) + (f >> 16)
    r = _poly_arg(f, 16)
    out = _scale(_horner(idx, r), -((E - odd) >> 1))
    out = np.where(e == 0, POS_INF | (s.astype(np.uint32) << 31), out)
    out = np.where(np.isposinf(xf), np.uint32(0), out)
    out = np.where((s == 1) & (e != 0), _QNAN, out)
    return np.where(np.isnan(xf), _QNAN, out).astype(np.uint32)


def gelu(x_bits) -> np.ndarray:
    """GELU, tanh form."""
    x, s, e, f, xf = _operand(x_bits)
    E = e - 127
    small = E < T.GELU_EMIN
    large = E > T.GELU_EMAX
    bin_ = np.clip(E - T.GELU_EMIN, 0, T.GELU_BINADES - 1)
    idx = np.where(small, T.GELU_SMALL,
                   T.GELU_BASE + ((s * T.GELU_BINADES + bin_) << T.GELU_BITS) + (f >> (23 - T.GELU_BITS)))
    low = f & ((1 << (23 - T.GELU_BITS)) - 1)
    r = np.where(small, x, G.f32_bits(low.astype(np.float64) * np.ldexp(1.0, np.clip(E, -126, 127) - 23)))
    out = _horner(idx, r.astype(np.uint32))
    out = np.where(large, np.where(s == 1, NEG_ZERO, x), out)
    return np.where(np.isnan(xf), _QNAN, out).astype(np.uint32)
