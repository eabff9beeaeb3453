"""Golden model of the project's floating-point arithmetic (numpy + ml_dtypes).

Written from the numerics contract, not from the RTL: it uses numpy's IEEE
float32 arithmetic (round to nearest even) and then applies the project's rules
for the cases IEEE leaves to the implementation:

* **Subnormals are flushed to zero**, on input (denormals-are-zero) and on
  output (flush-to-zero); a flushed result keeps its sign.
* **NaN**: any NaN result is the canonical quiet NaN ``0x7FC00000``
  (payloads are not propagated). ``Inf - Inf`` and ``0 x Inf`` give NaN.
* **Overflow** rounds to infinity (IEEE round-to-nearest behaviour).
* **Exact cancellation** ``x + (-x)`` gives ``+0``; ``(-0) + (-0)`` gives ``-0``.

Why numpy float32 + flushing equals a flush-to-zero adder/multiplier:

* For an addition of two normal floats, a result below the smallest normal
  (2**-126) is exact (both operands are multiples of 2**-149), so flushing
  numpy's subnormal result equals flushing the exact result.
* A BF16 x BF16 product has at most 16 significant bits, so it is exact in
  float32 whenever it is normal; numpy's rounding of a subnormal product can
  never reach 2**-126, so flushing it equals flushing the exact product.

Bit patterns travel as ``uint16`` (BF16) and ``uint32`` (FP32) arrays.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

__all__ = [
    "QNAN",
    "bf16_bits",
    "bf16_to_f32",
    "f32_bits",
    "bits_to_f32",
    "canon",
    "ftz",
    "mul_bf16",
    "add_f32",
    "adder_tree",
    "accumulate",
    "mac_lanes",
    "round_bf16",
]

QNAN = np.uint32(0x7FC00000)
_MIN_NORMAL = np.float32(2.0**-126)


def bf16_bits(values) -> np.ndarray:
    """BF16 bit patterns of ``values`` (rounded to nearest even by ml_dtypes)."""
    return np.asarray(values, dtype=np.float32).astype(ml_dtypes.bfloat16).view(np.uint16)


def round_bf16(f32_bits_in) -> np.ndarray:
    """Round FP32 bit patterns to BF16 bit patterns (RNE), with the FTZ/NaN rules."""
    x = ftz(bits_to_f32(f32_bits_in))
    out = x.astype(ml_dtypes.bfloat16).view(np.uint16).copy()
    out = np.where(np.isnan(x), np.uint16(0x7FC0), out)
    # A value that rounds to a BF16 subnormal is flushed as well (keeps sign).
    exp = (out >> 7) & 0xFF
    out = np.where((exp == 0), out & np.uint16(0x8000), out)
    return out.astype(np.uint16)


def bf16_to_f32(bits) -> np.ndarray:
    """FP32 values of BF16 bit patterns (exact)."""
    return (np.asarray(bits, dtype=np.uint32) << 16).view(np.float32)


def bits_to_f32(bits) -> np.ndarray:
    return np.asarray(bits, dtype=np.uint32).view(np.float32)


def f32_bits(values) -> np.ndarray:
    return np.asarray(values, dtype=np.float32).view(np.uint32)


def ftz(x: np.ndarray) -> np.ndarray:
    """Flush float32 subnormals to zero, keeping the sign."""
    x = np.asarray(x, dtype=np.float32)
    return np.where(np.abs(x) < _MIN_NORMAL, np.copysign(np.float32(0), x), x).astype(np.float32)


def canon(x: np.ndarray) -> np.ndarray:
    """FP32 bit patterns of ``x`` after flush-to-zero and NaN canonicalisation."""
    x = ftz(x)
    bits = x.view(np.uint32).copy()
    bits[np.isnan(x)] = QNAN
    return bits


def mul_bf16(a_bits, b_bits) -> np.ndarray:
    """BF16 x BF16 -> FP32 product bit patterns (exact when normal)."""
    a = ftz(bf16_to_f32(a_bits))
    b = ftz(bf16_to_f32(b_bits))
    with np.errstate(all="ignore"):
        return canon(a * b)


def add_f32(a_bits, b_bits) -> np.ndarray:
    """FP32 + FP32 bit patterns, round to nearest even."""
    a = ftz(bits_to_f32(a_bits))
    b = ftz(bits_to_f32(b_bits))
    with np.errstate(all="ignore"):
        return canon(a + b)


def adder_tree(values_bits: np.ndarray) -> np.ndarray:
    """Sum the last axis (length a power of two) in the hardware's order.

    Level 1 adds neighbours ``(x0+x1), (x2+x3), ...``; every further level adds
    neighbouring partial sums, so for 16 inputs the order is
    ``(((x0+x1)+(x2+x3))+((x4+x5)+(x6+x7))) + (...)``.
    """
    level = np.asarray(values_bits, dtype=np.uint32)
    n = level.shape[-1]
    if n & (n - 1):
        raise ValueError(f"adder tree width must be a power of two, not {n}")
    while level.shape[-1] > 1:
        level = add_f32(level[..., 0::2], level[..., 1::2])
    return level[..., 0]


def mac_lanes(w_bits: np.ndarray, x_bits: np.ndarray) -> np.ndarray:
    """One MAC column: lane-wise BF16 products, then the adder tree (last axis)."""
    return adder_tree(mul_bf16(w_bits, x_bits))


def accumulate(init_bits, terms_bits) -> np.ndarray:
    """Sequential FP32 accumulation ``acc = acc + term`` over the first axis of ``terms_bits``."""
    acc = np.asarray(init_bits, dtype=np.uint32)
    for term in np.asarray(terms_bits, dtype=np.uint32):
        acc = add_f32(acc, term)
    return acc
