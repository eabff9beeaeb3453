"""Golden model of the low-precision PIM GEMV (4-bit weights, BF16 or FP8 activations), exact order.

For a ``[K, N]`` matrix quantized by :func:`firmware.quant.quantize_weights`
(groups of ``group`` inputs, one scale per group and output) and an input
vector ``x`` (BF16 bit patterns, or :class:`firmware.quant.Fp8Acts`: FP8-E4M3
codes with a per-token FP32 scale ``s_x``), every output ``n`` is, in this
order (FP32 arithmetic with the project's rules, :mod:`sim.golden.fp`: round
to nearest even, subnormals flushed on input and output, any NaN canonical):

1. **Products**: ``v_k * a_k`` for every input, ``v_k`` the weight code's value
   (int4 integer or FP4 grid value, not scaled) and ``a_k`` the activation (the
   BF16 value, or the FP8 code's value, not scaled). Both have at most 4 and 8
   significant bits, so the product is exact in FP32 (flushed if below 2^-126).
2. **Column sums**: the inputs are taken ``lanes`` at a time (default 64, the
   4-bit codes of one 32-byte DRAM column); each column's products are added by
   the adder tree of :func:`sim.golden.fp.adder_tree` (neighbours pairwise).
3. **Group partial sum**: the first column sum of the group, then each further
   column sum of the group added in order (``group / lanes`` columns).
4. **Fused dequantization**: the partial sum is multiplied once by the
   group's scale (its FP32 value): ``t_g = P_g * s_g``, rounded.
5. **Groups**: ``acc = +0``, then ``acc = acc + t_g`` for ``g = 0, 1, ...``.
6. **Token scale** (FP8 activations only): ``y = acc * s_x``, rounded.
7. **Bias** (optional): ``y = y + b``.

FP32 multiplication (steps 4, 6): the IEEE product rounded to nearest even,
then flushed to zero if below 2^-126 (tininess after rounding), overflow to
infinity, NaN canonical.

Error against float64 (:func:`error_bound`, tested in ``tests/test_quant.py``):
every term passes through at most ``d = log2(lanes) + group/lanes + K/group + 2``
roundings of relative size ``<= 2^-24``, so
``|y - y64| <= 1.01 * d * 2^-24 * s_x * sum_g |s_g| sum_k |v_k a_k|``.
"""

from __future__ import annotations

import math

import numpy as np

from firmware.quant import Fp8Acts, QuantWeights
from hw.spec import fp as G

__all__ = ["mul_f32", "gemv", "gemv_steps", "gemv_f32", "reference_f64", "error_bound"]


def mul_f32(a_bits, b_bits) -> np.ndarray:
    """FP32 x FP32 -> FP32 bit patterns (RNE, then flush-to-zero; NaN canonical)."""
    a = G.ftz(G.bits_to_f32(a_bits))
    b = G.ftz(G.bits_to_f32(b_bits))
    with np.errstate(all="ignore"):
        return G.canon(a * b)


def _act_values(x, K: int):
    """(activation values float32 [T, K], token scales float32 [T] or None, squeeze flag)."""
    if isinstance(x, Fp8Acts):
        vals = x.values()
        if vals.ndim == 1:
            vals = vals[None]
        return vals, np.asarray(x.scales, dtype=np.float32).reshape(-1), False
    bits = np.asarray(x, dtype=np.uint16)
    squeeze = bits.ndim == 1
    if squeeze:
        bits = bits[None]
    return G.ftz(G.bf16_to_f32(bits)), None, squeeze


_MIN_NORMAL = np.float32(2.0 ** -126)


def _ftz(r: np.ndarray) -> np.ndarray:
    """Flush float32 subnormals to zero keeping the sign (``r * 0`` keeps it for finite ``r``)."""
    tiny = np.abs(r) < _MIN_NORMAL
    if tiny.any():
        r = np.where(tiny, r * np.float32(0), r)
    return r


def _tree(level: np.ndarray) -> np.ndarray:
    """:func:`sim.golden.fp.adder_tree` on float32 values (neighbours pairwise, flush after each addition)."""
    while level.shape[-1] > 1:
        level = _ftz(level[..., 0::2] + level[..., 1::2])
    return level[..., 0]


def gemv(q: QuantWeights, x, bias_bits=None, lanes: int = 64) -> np.ndarray:
    """FP32 result bits ``[T, N]`` (``[N]`` for a 1-D BF16 ``x``) of the low-precision GEMV; see the module.

    ``x``: BF16 bit patterns ``[K]`` or ``[T, K]`` (uint16), or :class:`Fp8Acts` (``[T, K]`` codes, ``[T]``
    scales). ``bias_bits``: FP32 bit patterns ``[N]`` or None.

    Computed on float32 values: numpy's float32 addition and multiplication are IEEE (round to nearest
    even); every result is flushed as it is produced, and NaNs are made canonical at the end (a NaN stays
    a NaN through later additions and multiplications, so that equals canonicalising at every step).
    ``tests/test_quant.py`` holds this equal, bit for bit, to a step-by-step evaluation with
    :mod:`sim.golden.fp`'s bit-pattern operations.
    """
    K, N = q.shape
    if lanes < 1 or lanes & (lanes - 1):
        raise ValueError(f"lanes must be a power of two, not {lanes}")
    if q.group % lanes:
        raise ValueError(f"group size {q.group} must be a multiple of the lanes per column ({lanes})")
    a, s_x, squeeze = _act_values(x, K)
    if a.shape[1] != K:
        raise ValueError(f"activations have {a.shape[1]} inputs, the weights {K}")
    T = a.shape[0]
    v = q.values()                                          # [K, N] float32, exact
    scales = G.ftz(q.scales)                                # [G, N]
    acc = np.zeros((T, N), dtype=np.float32)                # +0
    cols = q.group // lanes
    with np.errstate(all="ignore"):
        for g in range(K // q.group):
            part = None
            for c in range(cols):
                k0 = g * q.group + c * lanes
                prod = _ftz(a[:, None, k0:k0 + lanes] * v[k0:k0 + lanes].T[None])     # [T, N, lanes], exact
                s = _tree(prod)
                part = s if part is None else _ftz(part + s)
            acc = _ftz(acc + _ftz(part * scales[g][None, :]))
        if s_x is not None:
            acc = _ftz(acc * G.ftz(s_x)[:, None])
        if bias_bits is not None:
            acc = _ftz(acc + G.ftz(G.bits_to_f32(np.asarray(bias_bits, dtype=np.uint32)))[None, :])
    out = G.canon(acc)
    return out[0] if squeeze else out


def gemv_steps(q: QuantWeights, x, bias_bits=None, lanes: int = 64) -> np.ndarray:
    """The same GEMV evaluated step by step with :mod:`sim.golden.fp`'s bit-pattern operations (slow; for
    checking :func:`gemv`)."""
    K, N = q.shape
    a, s_x, squeeze = _act_values(x, K)
    a_bits = G.f32_bits(a)
    v_bits = G.f32_bits(q.values())
    sc_bits = G.f32_bits(q.scales)
    acc = np.zeros((a.shape[0], N), dtype=np.uint32)
    for g in range(K // q.group):
        part = None
        for c in range(q.group // lanes):
            k0 = g * q.group + c * lanes
            prod = mul_f32(a_bits[:, None, k0:k0 + lanes], v_bits[k0:k0 + lanes].T[None])
            s = G.adder_tree(prod)
            part = s if part is None else G.add_f32(part, s)
        acc = G.add_f32(acc, mul_f32(part, sc_bits[g][None, :]))
    if s_x is not None:
        acc = mul_f32(acc, G.f32_bits(s_x)[:, None])
    if bias_bits is not None:
        acc = G.add_f32(acc, np.asarray(bias_bits, dtype=np.uint32)[None, :])
    return acc[0] if squeeze else acc


def gemv_f32(q: QuantWeights, x, bias=None, lanes: int = 64) -> np.ndarray:
    """:func:`gemv` with float values in and out (bias float32 or None)."""
    b = None if bias is None else G.f32_bits(np.asarray(bias, dtype=np.float32))
    return G.bits_to_f32(gemv(q, x, b, lanes)).copy()


def reference_f64(q: QuantWeights, x) -> tuple[np.ndarray, np.ndarray]:
    """(float64 result ``[T, N]``, ``sum_g |s_g| sum_k |v_k a_k| * s_x``) of the exact dequantized GEMV."""
    K, N = q.shape
    a, s_x, _ = _act_values(x, K)
    a = a.astype(np.float64)
    w = q.dequantize()
    y = a @ w
    mag = np.abs(a) @ np.abs(w)
    if s_x is not None:
        y = y * s_x.astype(np.float64)[:, None]
        mag = mag * s_x.astype(np.float64)[:, None]
    return y, mag


def error_bound(q: QuantWeights, mag: np.ndarray, lanes: int = 64, fp8: bool = False) -> np.ndarray:
    """The module's bound on ``|gemv - float64|`` given ``mag`` from :func:`reference_f64`."""
    K = q.shape[0]
    d = math.log2(lanes) + q.group // lanes + K // q.group + (2 if fp8 else 1)
    return 1.01 * d * 2.0 ** -24 * mag
