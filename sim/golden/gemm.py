"""Golden GEMM in the matrix unit's accumulation order (bit patterns, numpy).

Written from the numerics contract in ``hw/npu/systolic.py``, on top of the
FP32/BF16 golden arithmetic of :mod:`sim.golden.fp` (not from the RTL):

For an ``R``-row array, output ``(m, n)`` is built K-block by K-block::

    for kb in range(ceil(K / R)):
        s = +0
        for k in range(kb * R, min(K, kb * R + R)):
            s = s + a[m, k] * w[k, n]           # BF16 x BF16 exact, FP32 add RNE
        acc = s if (kb == 0 and not accumulate) else acc + s

Error bound against float64 (stated and tested): every product passes through
at most ``R`` column additions and ``ceil(K / R)`` accumulator additions, each
with relative error at most ``u = 2**-24`` (products are exact), so for finite
normal results ``|C - C_exact| <= (R + ceil(K/R)) * u * sum_k |a_mk w_kn|``
(first order in ``u``; :func:`error_bound` adds 1 % for the higher-order terms).
"""

from __future__ import annotations

import numpy as np

from . import fp as G

__all__ = ["gemm", "gemm_f64", "error_bound", "to_bf16"]


def gemm(a_bits: np.ndarray, w_bits: np.ndarray, rows: int, acc_bits: np.ndarray | None = None) -> np.ndarray:
    """FP32 bit patterns of ``acc (+)= a @ w`` in the array order.

    Parameters
    ----------
    a_bits : (M, K) uint16
        Activations (BF16 bit patterns).
    w_bits : (K, N) uint16
        Weights (BF16 bit patterns).
    rows : int
        Array rows ``R`` (K-block size).
    acc_bits : (M, N) uint32 or None
        Accumulators to add to (``accumulate``); ``None`` overwrites.
    """
    a = np.asarray(a_bits, dtype=np.uint16)
    w = np.asarray(w_bits, dtype=np.uint16)
    M, K = a.shape
    K2, N = w.shape
    if K != K2:
        raise ValueError(f"inner dimensions differ: {a.shape} @ {w.shape}")
    acc = None if acc_bits is None else np.asarray(acc_bits, dtype=np.uint32).copy()
    for k0 in range(0, K, rows):
        s = np.zeros((M, N), dtype=np.uint32)
        for k in range(k0, min(K, k0 + rows)):
            s = G.add_f32(s, G.mul_bf16(a[:, k:k + 1], w[k:k + 1, :]))
        acc = s if acc is None else G.add_f32(acc, s)
    return acc


def to_bf16(f32_bits: np.ndarray) -> np.ndarray:
    """Round accumulator results to BF16 the way the store path does (RNE, FTZ, canonical NaN)."""
    return G.round_bf16(f32_bits)


def gemm_f64(a_bits, w_bits) -> tuple[np.ndarray, np.ndarray]:
    """Exact-ish float64 product and ``sum_k |a w|`` (for the error bound)."""
    a = G.bf16_to_f32(a_bits).astype(np.float64)
    w = G.bf16_to_f32(w_bits).astype(np.float64)
    return a @ w, np.abs(a) @ np.abs(w)


def error_bound(abs_sum: np.ndarray, K: int, rows: int) -> np.ndarray:
    """``1.01 * (R + ceil(K/R)) * 2**-24 * sum|a w|``: the stated float64 bound."""
    return 1.01 * (rows + -(-K // rows)) * 2.0**-24 * abs_sum
