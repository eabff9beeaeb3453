"""Golden model of the low-precision PIM processing unit (:class:`hw.pim.lowprec_unit.LowPrecMacUnit`).

Written from the unit's numerics contract below with numpy / ml_dtypes / Python integers, not from the RTL.

The unit takes one 256-bit DRAM column of weights per cycle against the global buffer's activations and
accumulates into an FP32 accumulator. Formats (parameters of the unit):

* ``weights="bf16"``, ``acts="bf16"``: today's unit, 16 lanes (:class:`hw.mac_unit.MacUnit`): per column the
  exact BF16 products, the pairwise adder tree, one addition into the accumulator (:mod:`sim.golden.fp`).
* ``weights="int4" | "fp4"``: 64 lanes (a column packs 64 nibbles; lane ``k`` is bits ``4k..4k+3``), groups of
  ``group`` inputs (``group / 64`` columns) sharing one scale (``scale_format`` ``fp16`` or ``bf16``) and, for
  ``fp4`` with ``grid_choice``, one 2-bit grid selector (:func:`firmware.quant.code_values`). Per group ``g``:

  - ``acts="fp8_e4m3"`` (**exact partial sum**): every weight value is an integer multiple of ``2^-1``
    (``fp4``; ``int4``: of 1) and every E4M3 value an integer multiple of ``2^-9``, so each product is an
    integer times ``2^-10`` (``int4``: ``2^-9``) and the unit sums them as integers: the group's partial sum
    ``P_g`` is **exact**. Then ``t_g = rnd(P_g * s_g)``, one rounding of the exact product.
  - ``acts="bf16"`` (**FP32 order**): products ``v_k * a_k`` exact in FP32 (flushed below ``2^-126``); each
    column's 64 products through the pairwise FP32 adder tree; the group's column sums added in order (the
    first column sum, then ``+`` each further one); ``t_g = rnd(P_g * s_g)``.

  ``acc = acc + t_g`` (FP32 addition) for every group in order; ``acc`` starts from the loaded value.

``rnd`` is the unit's scale multiplier: the exact product rounded to 24 significant bits, nearest even, with
an unbounded exponent; then a result below ``2^-126`` in magnitude becomes a zero of its sign and one of
``2^128`` or more an infinity. Special values (the project's rules, :mod:`hw.arith`): a NaN operand (an
E4M3 NaN activation anywhere in the group, a NaN scale, a NaN partial sum) gives ``0x7FC00000``;
``inf * 0`` gives NaN; ``inf * x`` an infinity. An exact integer partial sum of zero is ``+0``; the
product's sign is the XOR of the signs (so ``+0 * -s = -0``). FP16 scales are taken with their subnormals
(those are normal FP32 values); a BF16 scale that is subnormal is a zero (flushed, as every BF16 input).

The token scale of FP8 activations and the bias are applied outside the unit (:func:`gemv_unit`: ``y = acc *
s_x`` then ``+ b``, FP32 with the same rules), after the accumulator is read.

Error against float64 (:func:`error_bound`): with ``u = 2^-24`` and ``M = sum_g |s_g| sum_k |v_k a_k|`` (times
``s_x`` for FP8), ``|y - y64| <= 1.01 * d * u * M + d * 2^-126`` where ``d`` counts the roundings a term can
go through: ``fp8``: ``G`` (one scale rounding, ``G - 1`` accumulator additions; the partial sums are exact)
plus one for the token scale; ``bf16`` activations: ``log2(64) + group/64 - 1 + 1 + G - 1``; ``bf16``
weights: ``log2(16) + C`` for ``C`` columns. The ``d * 2^-126`` term covers flushed underflows.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np

from firmware.quant import code_values
from hw.spec import fp as G

__all__ = ["QNAN", "WEIGHT_FORMATS", "ACT_FORMATS", "SCALE_FORMATS", "lanes_for", "round_f32", "scale_value",
           "weight_values", "act_values", "unit_acc", "gemv_unit", "reference_f64", "error_bound"]

QNAN = 0x7FC00000
WEIGHT_FORMATS = ("bf16", "int4", "fp4")
ACT_FORMATS = ("bf16", "fp8_e4m3")
SCALE_FORMATS = ("fp16", "bf16")


def lanes_for(weights: str) -> int:
    """Weights per 256-bit column: 16 BF16 or 64 4-bit codes."""
    return 16 if weights == "bf16" else 64


def round_f32(x) -> np.ndarray:
    """The unit's rounding of exact float64 values ``x`` to FP32 bit patterns (see the module docstring).

    ``x`` must hold the exact product (at most 53 significant bits, as the callers ensure).
    """
    x = np.asarray(x, dtype=np.float64)
    out = np.empty(x.shape, dtype=np.uint32)
    flat, o = x.reshape(-1), out.reshape(-1)
    for i, v in enumerate(flat):
        if math.isnan(v):
            o[i] = QNAN
            continue
        neg = math.copysign(1.0, v) < 0
        sign = 0x80000000 if neg else 0
        if math.isinf(v):
            o[i] = sign | 0x7F800000
            continue
        if v == 0:
            o[i] = sign
            continue
        f, e = math.frexp(abs(v))                 # |v| = f * 2^e, 0.5 <= f < 1
        q = round(f * (1 << 24))                   # 24 significant bits; Python's round is half-even, exact
        r = math.ldexp(q, e - 24)
        if r < 2.0 ** -126:
            o[i] = sign
        elif r >= 2.0 ** 128:
            o[i] = sign | 0x7F800000
        else:
            o[i] = sign | int(np.float32(r).view(np.uint32))
    return out


def scale_value(bits, scale_format: str) -> np.ndarray:
    """Float64 values of 16-bit scale patterns: FP16 (subnormals kept) or BF16 (subnormals flushed)."""
    b = np.asarray(bits, dtype=np.uint16)
    if scale_format == "fp16":
        return b.view(np.float16).astype(np.float64)
    if scale_format == "bf16":
        v = b.view(ml_dtypes.bfloat16).astype(np.float64)
        return np.where(((b >> 7) & 0xFF) == 0, np.copysign(0.0, v), v)
    raise ValueError(f"scale format must be one of {', '.join(SCALE_FORMATS)}, not {scale_format!r}")


def weight_values(weights: str, codes, selectors=None, grid_choice: bool = True) -> np.ndarray:
    """Float32 values of 4-bit codes (the format definition of :func:`firmware.quant.code_values`)."""
    return code_values(weights, codes, selectors, grid_choice)


def act_values(acts: str, bits) -> np.ndarray:
    """Float64 values of activation patterns: BF16 (subnormals flushed) or FP8-E4M3 (NaN for 0x7F / 0xFF)."""
    b = np.asarray(bits)
    if acts == "bf16":
        return G.ftz(G.bf16_to_f32(b.astype(np.uint16))).astype(np.float64)
    if acts == "fp8_e4m3":
        return b.astype(np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float64)
    raise ValueError(f"activation format must be one of {', '.join(ACT_FORMATS)}, not {acts!r}")


def _columns(arr, lanes, what):
    a = np.asarray(arr)
    if a.ndim != 2 or a.shape[1] != lanes:
        raise ValueError(f"{what} must be [columns, {lanes}], not shape {a.shape}")
    return a


def unit_acc(weights: str, acts: str, w, x, scales=None, selectors=None, acc0: int = 0, group: int = 128,
             scale_format: str = "fp16", grid_choice: bool = True) -> int:
    """The accumulator's FP32 bit pattern after the unit has taken the columns ``w`` against ``x``.

    ``w``: ``[C, lanes]`` BF16 patterns (``bf16``) or 4-bit codes; ``x``: ``[C, lanes]`` BF16 or E4M3 patterns;
    ``scales``: ``[C / (group / 64)]`` 16-bit patterns; ``selectors``: ``[groups]`` (``fp4`` grid choice);
    ``acc0``: the accumulator's loaded value (FP32 bits).
    """
    lanes = lanes_for(weights)
    w = _columns(w, lanes, "weights")
    x = _columns(x, lanes, "activations")
    if w.shape != x.shape:
        raise ValueError(f"weights {w.shape} and activations {x.shape} differ")
    acc = np.uint32(acc0)
    if weights == "bf16":
        if acts != "bf16":
            raise ValueError("bf16 weights take bf16 activations")
        for c in range(w.shape[0]):
            acc = G.add_f32(acc, G.mac_lanes(w[c].astype(np.uint16), x[c].astype(np.uint16)))
        return int(acc)
    cpg = group // lanes
    if group % lanes or cpg < 1:
        raise ValueError(f"group size {group} must be a multiple of {lanes}")
    C = w.shape[0]
    if C % cpg:
        raise ValueError(f"{C} columns are not whole groups of {cpg}")
    n_groups = C // cpg
    scales = np.asarray(scales, dtype=np.uint16).reshape(n_groups)
    sel = np.zeros(n_groups, np.uint8) if selectors is None else np.asarray(selectors, np.uint8).reshape(n_groups)
    s_val = scale_value(scales, scale_format)
    for g in range(n_groups):
        cw = w[g * cpg:(g + 1) * cpg]
        cx = x[g * cpg:(g + 1) * cpg]
        v = weight_values(weights, cw, np.full(cw.shape, sel[g], np.uint8), grid_choice).astype(np.float64)
        a = act_values(acts, cx)
        if acts == "fp8_e4m3":
            if np.isnan(a).any():
                part = math.nan
            else:
                # Exact integers: v * 2 (half units) and a * 2^9; Python ints, no rounding anywhere.
                P = sum(int(vi * 2) * int(ai * 512) for vi, ai in zip(v.reshape(-1), a.reshape(-1), strict=True))
                part = math.ldexp(P, -10)             # exact in float64 (|P| < 2^53)
        else:
            part_bits = None
            for c in range(cpg):
                prod = G.canon(G.ftz((v[c] * a[c]).astype(np.float32)))   # exact in float64, then float32
                s = G.adder_tree(prod)
                part_bits = s if part_bits is None else G.add_f32(part_bits, s)
            part = float(G.bits_to_f32(part_bits))
        with np.errstate(invalid="ignore"):
            t = round_f32(np.float64(part) * s_val[g])
        acc = G.add_f32(acc, t)
    return int(acc)


def gemv_unit(weights: str, acts: str, W, x, scales=None, selectors=None, token_scale=None, bias_bits=None,
              group: int = 128, scale_format: str = "fp16", grid_choice: bool = True) -> np.ndarray:
    """A GEMV as the units compute it: output ``n`` is :func:`unit_acc` of row ``n`` of the weights.

    ``W``: ``[N, K]`` (BF16 patterns or codes, per output along its input dimension); ``x``: ``[K]`` patterns;
    ``scales``/``selectors``: ``[N, K / group]``; ``token_scale``: FP32 value of an FP8 token's scale (applied
    as ``acc * s_x`` after the unit, then the bias ``bias_bits`` ``[N]`` FP32 patterns). FP32 bits ``[N]``.
    """
    lanes = lanes_for(weights)
    W = np.asarray(W)
    N, K = W.shape
    if K % lanes:
        raise ValueError(f"K = {K} is not a multiple of {lanes}")
    xc = np.asarray(x).reshape(K // lanes, lanes)
    out = np.empty(N, np.uint32)
    for n in range(N):
        out[n] = unit_acc(weights, acts, W[n].reshape(-1, lanes), xc,
                          None if scales is None else np.asarray(scales)[n],
                          None if selectors is None else np.asarray(selectors)[n],
                          0, group, scale_format, grid_choice)
    if token_scale is not None:
        with np.errstate(all="ignore"):
            out = G.canon(G.ftz(G.bits_to_f32(out)) * G.ftz(np.float32(token_scale)))
    if bias_bits is not None:
        out = G.add_f32(out, np.asarray(bias_bits, np.uint32))
    return out


def reference_f64(weights: str, acts: str, W, x, scales=None, selectors=None, token_scale=None,
                  group: int = 128, scale_format: str = "fp16", grid_choice: bool = True):
    """(float64 GEMV ``[N]``, magnitude ``M`` ``[N]`` of the module's bound) with exact dequantized values."""
    W = np.asarray(W)
    N, K = W.shape
    a = act_values(acts, np.asarray(x).reshape(K))
    if weights == "bf16":
        w = G.ftz(G.bf16_to_f32(W.astype(np.uint16))).astype(np.float64)
    else:
        sel = np.zeros((N, K // group), np.uint8) if selectors is None else np.asarray(selectors, np.uint8)
        w = weight_values(weights, W, np.repeat(sel, group, axis=1), grid_choice).astype(np.float64)
        w = w * np.repeat(scale_value(scales, scale_format), group, axis=1)
    y = w @ a
    mag = np.abs(w) @ np.abs(a)
    if token_scale is not None:
        y, mag = y * float(token_scale), mag * abs(float(token_scale))
    return y, mag


def roundings(weights: str, acts: str, K: int, group: int = 128, token_scale: bool = False) -> int:
    """``d`` of the module's bound: the roundings one product can go through."""
    if weights == "bf16":
        return 4 + K // 16
    n_groups = K // group
    if acts == "fp8_e4m3":
        d = n_groups
    else:
        d = 6 + group // 64 - 1 + 1 + n_groups - 1
    return d + (1 if token_scale else 0)


def error_bound(weights: str, acts: str, K: int, mag, group: int = 128, token_scale: bool = False) -> np.ndarray:
    """The module's bound on ``|y - y64|`` given ``mag`` from :func:`reference_f64`."""
    d = roundings(weights, acts, K, group, token_scale)
    return 1.01 * d * 2.0 ** -24 * np.asarray(mag) + d * 2.0 ** -126
