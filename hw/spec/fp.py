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
    "combine_partials",
    "InterleavedAccumulator",
    "NEG_ZERO",
    "mac_lanes",
    "round_bf16",
]

QNAN = np.uint32(0x7FC00000)
NEG_ZERO = np.uint32(0x80000000)        # the exact identity of add_f32: x + (-0) == canon(ftz(x))
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


def accumulate(init_bits, terms_bits, stages: int = 1) -> np.ndarray:
    """FP32 accumulation of ``terms_bits`` (over its first axis) onto ``init_bits``.

    ``stages=1``: sequential, ``acc = acc + term``. ``stages=P > 1``: the order of an accumulator
    of ``P`` interleaved partial sums (:class:`hw.mac_unit.MacUnit` with ``acc_stages=P``): ``p0 = init``,
    the others ``-0``; term ``k`` is added into ``p(k mod P)``; then the partials are combined pairwise
    (:func:`combine_partials`).
    """
    if stages == 1:
        acc = np.asarray(init_bits, dtype=np.uint32)
        for term in np.asarray(terms_bits, dtype=np.uint32):
            acc = add_f32(acc, term)
        return acc
    unit = InterleavedAccumulator(stages, init_bits)
    for term in np.asarray(terms_bits, dtype=np.uint32):
        unit.add(term)
    return unit.combine()


def combine_partials(partials_bits) -> np.ndarray:
    """Sum partial sums (first axis) pairwise in a fixed order: each level adds neighbours
    ``(p0+p1), (p2+p3), ...`` and an odd last one passes on, so 4 give ``(p0+p1)+(p2+p3)`` and
    3 give ``(p0+p1)+p2`` (:func:`hw.arith.combine_schedule`)."""
    level = list(np.asarray(partials_bits, dtype=np.uint32))
    while len(level) > 1:
        nxt = [add_f32(level[k], level[k + 1]) for k in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return np.asarray(level[0], dtype=np.uint32)


class InterleavedAccumulator:
    """State of an accumulator of ``stages`` interleaved partial sums (``stages = 1``: one sum).

    ``load(v)``: ``p0 = v``, the others ``-0``, the next term goes into ``p0``. ``add(t)``: the
    next term into its partial (round robin). ``combine()``: the partials summed by
    :func:`combine_partials` into ``p0``, the others ``-0``, restart at ``p0``; returns ``p0``.
    With ``stages = 1`` ``combine`` changes nothing (the sequential order of :func:`accumulate`).
    Values broadcast like numpy arrays (one accumulator per element).
    """

    def __init__(self, stages: int = 1, init_bits=0):
        if not isinstance(stages, int) or stages < 1:
            raise ValueError(f"stages must be a positive integer, not {stages!r}")
        self.stages = stages
        self.load(init_bits)

    def load(self, value_bits):
        v = np.asarray(value_bits, dtype=np.uint32)
        self.partials = [v] + [np.full_like(v, NEG_ZERO) for _ in range(self.stages - 1)]
        self.slot = 0

    def add(self, term_bits):
        self.partials[self.slot] = add_f32(self.partials[self.slot], term_bits)
        self.slot = (self.slot + 1) % self.stages

    def combine(self) -> np.ndarray:
        if self.stages > 1:
            self.load(combine_partials(self.partials))
        return self.partials[0]

    @property
    def value(self) -> np.ndarray:
        """``p0``: what the hardware's ``acc`` output shows."""
        return self.partials[0]
