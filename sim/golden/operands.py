"""Random and special operand sets for the arithmetic tests (bit patterns)."""

from __future__ import annotations

import numpy as np

__all__ = ["SPECIAL_F32", "SPECIAL_BF16", "fp32_pairs", "bf16_pairs", "bf16_values"]

# Zeros of both signs, subnormals (smallest, largest, negative), smallest and
# largest normals, one, infinities, quiet/signalling/negative NaNs.
SPECIAL_F32 = np.array([
    0x00000000, 0x80000000, 0x00000001, 0x007FFFFF, 0x80400000, 0x00800000, 0x80800000,
    0x7F7FFFFF, 0xFF7FFFFF, 0x3F800000, 0xBF800000, 0x3F800001, 0x33800000, 0x7F800000,
    0xFF800000, 0x7FC00000, 0x7F800001, 0xFFC00001,
], dtype=np.uint32)

SPECIAL_BF16 = np.array([
    0x0000, 0x8000, 0x0001, 0x007F, 0x8040, 0x0080, 0x8080, 0x7F7F, 0xFF7F, 0x3F80, 0xBF80,
    0x3F81, 0x1F80, 0x5F80, 0x7F80, 0xFF80, 0x7FC0, 0x7F81, 0xFFC1,
], dtype=np.uint16)


def _cross(special):
    a, b = np.meshgrid(special, special, indexing="ij")
    return a.ravel(), b.ravel()


def fp32_pairs(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` FP32 operand pairs: every special x special pair first, then a random mix.

    The mix: a quarter uniform random bit patterns (all classes), half pairs
    with exponents within +-28 of each other (rounding, alignment, carries),
    and pairs close to cancellation ``b = -a`` with a perturbed low part.
    """
    sa, sb = _cross(SPECIAL_F32)
    m = max(0, n - sa.size)
    kind = rng.integers(0, 8, m)
    a = rng.integers(0, 2**32, m, dtype=np.uint64).astype(np.uint32)
    b = rng.integers(0, 2**32, m, dtype=np.uint64).astype(np.uint32)
    ea = rng.integers(1, 255, m)
    eb = np.clip(ea + rng.integers(-28, 29, m), 0, 255)
    near_a = (rng.integers(0, 2, m) << 31) | (ea << 23) | rng.integers(0, 2**23, m)
    near_b = (rng.integers(0, 2, m) << 31) | (eb << 23) | rng.integers(0, 2**23, m)
    near = (kind >= 2) & (kind < 6)
    a = np.where(near, near_a, a).astype(np.uint32)
    b = np.where(near, near_b, b).astype(np.uint32)
    cancel = kind >= 6
    flip = (a ^ np.uint32(0x80000000)) ^ rng.integers(0, 16, m).astype(np.uint32)
    b = np.where(cancel, flip, b).astype(np.uint32)
    return (np.concatenate([sa, a])[:n].astype(np.uint32), np.concatenate([sb, b])[:n].astype(np.uint32))


def bf16_pairs(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` BF16 operand pairs: specials crossed, then random patterns, products near 1,
    and exponent sums near the overflow and underflow limits."""
    sa, sb = _cross(SPECIAL_BF16)
    m = max(0, n - sa.size)
    kind = rng.integers(0, 4, m)
    a = rng.integers(0, 2**16, m).astype(np.uint16)
    b = rng.integers(0, 2**16, m).astype(np.uint16)
    ea = rng.integers(1, 255, m)
    target = np.where(kind == 1, 127, np.where(kind == 2, 127 + 127, 127 - 126))  # ~1, ~2^127, ~2^-126
    eb = np.clip(target - ea + rng.integers(-3, 4, m), 1, 254)
    na = (rng.integers(0, 2, m) << 15) | (ea << 7) | rng.integers(0, 128, m)
    nb = (rng.integers(0, 2, m) << 15) | (eb << 7) | rng.integers(0, 128, m)
    a = np.where(kind >= 1, na, a).astype(np.uint16)
    b = np.where(kind >= 1, nb, b).astype(np.uint16)
    return (np.concatenate([sa, a])[:n].astype(np.uint16), np.concatenate([sb, b])[:n].astype(np.uint16))


def bf16_values(rng: np.random.Generator, shape, scale: float = 1.0) -> np.ndarray:
    """Normal-distributed values rounded to BF16 bit patterns."""
    from .fp import bf16_bits

    return bf16_bits(rng.standard_normal(shape).astype(np.float32) * np.float32(scale))
