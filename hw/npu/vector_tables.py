"""Coefficient table of the vector unit's special-function unit (pure numpy, no Amaranth).

The table is part of the *algorithm*, like an ISA table: the RTL
(:mod:`hw.npu.fp32ext`) loads it into a ROM and the golden model
(:mod:`sim.golden.fp32ext`) reads the same entries; both then evaluate the
same quadratic in FP32 with their own arithmetic.

Method (all four functions): piecewise quadratic, one segment per ROM entry.
The argument is split into a segment index (taken from the float's exponent
and leading mantissa bits, or from the fixed-point fraction for ``exp2``) and
an exact residual ``r >= 0`` measured from the segment's start. The ROM holds
``(c0, c1, c2)`` in FP32 and the hardware evaluates
``p = ((c2 * r) + c1) * r + c0`` (two FP32 multiplies, two FP32 adds, each
rounded to nearest even), then scales ``p`` by a power of two.

Segments:

``EXP2`` (64 entries)
    ``2**f`` for ``f`` in ``[0, 1)``: 64 segments of width 1/64.
``RECIP`` (128 entries)
    ``1/m`` for the significand ``m`` in ``[1, 2)``: 128 segments.
``RSQRT`` (2 x 128 entries)
    ``1/sqrt(m)`` for ``m`` in ``[1, 2)`` (even exponent) and ``1/sqrt(2 m)``
    (odd exponent), 128 segments each.
``GELU`` (1 + 2 x 11 x 16 entries)
    ``gelu(x) = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x**3)))`` directly,
    for ``2**-8 <= |x| < 8``: 16 segments per binade, 11 binades, both
    signs. Below ``2**-8`` one entry holds the Taylor polynomial
    ``0.5 x + 0.5 sqrt(2/pi) x**2`` (residual ``r = x`` itself); ``x >= 8``
    gives ``x`` and ``x <= -8`` gives ``-0`` (``|gelu(x) - x| < 1e-20`` and
    ``|gelu(-x)| < 1e-20`` there).

Why a piecewise quadratic from a ROM and not a pure polynomial or a linear
LUT: one quadratic step costs two multiplies and two adds per lane whatever
the function, so one datapath serves all four; linear interpolation would
need 8-16x more entries for the same FP32-level error (error ~ h**2 instead
of h**3), and a single polynomial over the whole range of GELU would need a
high degree (and a divider-free range reduction GELU does not have).

Measured error of the whole FP32 evaluation (golden model, which the RTL
matches bit for bit) against float64 of the same FP32 argument, 300k random
arguments each (``tests/test_vector.py::test_golden_functions_vs_float64``
asserts the bounds in brackets):

* ``exp2``: max relative error 1.6e-7 [2e-7] (results >= 2**-125).
* ``exp(x) = exp2(x * log2 e)``: 3.9e-6 at ``|x| = 87``; bound
  [3e-7 + 8e-8 |x|], from rounding ``x * log2 e`` to FP32 (2**-24 |x|) and
  ``log2 e`` itself (1.9e-8 |x|).
* ``recip``: 1.2e-7 [1.5e-7]; ``rsqrt``: 1.2e-7 [1.5e-7].
* ``gelu``: ``|err| <= 2**-21 |gelu(x)| + 1.3e-7`` [2**-21 |gelu| + 2**-22];
  largest absolute error 4.4e-7 (at ``x`` in [4, 8), about one FP32 ulp),
  largest relative error 1e-4 in the negative tail where ``|gelu| < 1e-3``.

Coefficients: for every segment a weighted least-squares quadratic on 64
Chebyshev nodes (weights 1/|f|, i.e. relative error, with a floor for GELU's
negative tail), then rounded to FP32 one coefficient at a time, refitting the
remaining ones after each rounding. The first segment of ``EXP2``, ``RECIP``
and the even ``RSQRT`` half has ``c0 = 1`` exactly, so that ``exp(0)``,
``1/1`` and ``1/sqrt(1)`` are exactly 1.
"""

import functools
import math

import numpy as np

__all__ = [
    "EXP2_BITS", "RECIP_BITS", "RSQRT_BITS", "GELU_BITS", "GELU_EMIN", "GELU_EMAX",
    "EXP2_BASE", "RECIP_BASE", "RSQRT_BASE", "GELU_SMALL", "GELU_BASE", "ROM_DEPTH",
    "GELU_A", "GELU_B", "LOG2E", "gelu_f64", "coefficients", "rom_words",
]

EXP2_BITS = 6
RECIP_BITS = 7
RSQRT_BITS = 7
GELU_BITS = 5
GELU_EMIN = -8          # binades 2**-8 .. 2**2 (|x| < 8) use the table
GELU_EMAX = 2
GELU_BINADES = GELU_EMAX - GELU_EMIN + 1

EXP2_BASE = 0
RECIP_BASE = EXP2_BASE + (1 << EXP2_BITS)
RSQRT_BASE = RECIP_BASE + (1 << RECIP_BITS)
GELU_SMALL = RSQRT_BASE + (2 << RSQRT_BITS)
GELU_BASE = GELU_SMALL + 1
ROM_ENTRIES = GELU_BASE + 2 * GELU_BINADES * (1 << GELU_BITS)
ROM_DEPTH = 1 << (ROM_ENTRIES - 1).bit_length()

GELU_A = math.sqrt(2.0 / math.pi)
GELU_B = 0.044715
LOG2E = np.float32(1.4426950408889634)


def gelu_f64(x):
    """Reference GELU (tanh form) in float64."""
    x = np.asarray(x, dtype=np.float64)
    return 0.5 * x * (1.0 + np.tanh(GELU_A * (x + GELU_B * x**3)))


def _fit(func, h, floor=0.0, c0=None):
    """FP32 (c0, c1, c2) of a quadratic in r on [0, h) approximating func(r); ``c0`` may be fixed."""
    k = np.arange(64)
    r = 0.5 * h * (1 - np.cos((k + 0.5) * np.pi / 64))     # Chebyshev nodes on [0, h]
    y = func(r)
    w = 1.0 / np.maximum(np.abs(y), floor if floor > 0 else 1e-300)
    V = np.stack([np.ones_like(r), r, r * r], axis=1)
    coef = np.zeros(3)
    fixed = {} if c0 is None else {0: float(np.float32(c0))}
    for j in (2, 1, 0):
        if j in fixed:
            continue                    # round c2, refit c1 c0; round c1, refit c0; round c0
        free = [i for i in range(3) if i not in fixed]
        rhs = y - sum(fixed[i] * V[:, i] for i in fixed)
        sol, *_ = np.linalg.lstsq(V[:, free] * w[:, None], rhs * w, rcond=None)
        coef[free] = sol
        fixed[j] = float(np.float32(coef[j]))
    return np.array([fixed[0], fixed[1], fixed[2]], dtype=np.float32)


@functools.cache
def coefficients() -> np.ndarray:
    """The ROM as an array ``(ROM_DEPTH, 3)`` of float32 ``(c0, c1, c2)``; unused entries are 0."""
    tab = np.zeros((ROM_DEPTH, 3), dtype=np.float32)
    n = 1 << EXP2_BITS
    for i in range(n):
        tab[EXP2_BASE + i] = _fit(lambda r, s=i / n: np.exp2(s + r), 1.0 / n, c0=1.0 if i == 0 else None)
    n = 1 << RECIP_BITS
    for i in range(n):
        tab[RECIP_BASE + i] = _fit(lambda r, s=1 + i / n: 1.0 / (s + r), 1.0 / n, c0=1.0 if i == 0 else None)
    n = 1 << RSQRT_BITS
    for odd in (0, 1):
        for i in range(n):
            tab[RSQRT_BASE + odd * n + i] = _fit(
                lambda r, s=1 + i / n, f=1 + odd: 1.0 / np.sqrt(f * (s + r)), 1.0 / n,
                c0=1.0 if i == 0 and odd == 0 else None)
    tab[GELU_SMALL] = np.array([-0.0, 0.5, 0.5 * GELU_A], dtype=np.float32)
    n = 1 << GELU_BITS
    for sign in (0, 1):
        for b in range(GELU_BINADES):
            e = GELU_EMIN + b
            for i in range(n):
                start = (1 + i / n) * 2.0**e
                s = -1.0 if sign else 1.0
                tab[GELU_BASE + (sign * GELU_BINADES + b) * n + i] = _fit(
                    lambda r, st=start, s=s: gelu_f64(s * (st + r)), 2.0**e / n,
                    floor=1e-7 if sign else 0.0)
    return tab


def rom_words() -> list:
    """ROM contents as 96-bit integers ``c0 | c1 << 32 | c2 << 64``."""
    bits = coefficients().view(np.uint32).astype(object)
    return [int(b[0]) | (int(b[1]) << 32) | (int(b[2]) << 64) for b in bits]
