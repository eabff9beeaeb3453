"""Golden model of the SRAM-PIM attention unit (:mod:`hw.npu.sram_pim`), from its contract.

Written from the unit's documented dataflow and the numerics contract (the primitives of
:mod:`sim.golden.fp`: exact BF16 products, RNE FP32 additions, flushed subnormals, canonical NaN),
not from the RTL:

* storage: ``lines = macros * rows`` vectors of ``word_lanes`` BF16; key ``j`` of a head stored from
  row ``r`` is line ``r * macros + j``;
* ``qk``: per key, ``acc = +0``, then for each of the ``beats = word_lanes / mac_lanes`` slices
  ``acc = acc + tree(K_j[slice] * q[slice])``, ``tree`` the pairwise adder tree;
* ``pv``: per output lane ``c``, ``acc = +0``, then for each group of ``macros`` keys
  ``acc = acc + tree_over_macros(p_key * V_key[c])``, keys past ``count`` contributing ``+0``.

:func:`check_command` and :meth:`SramPimModel.write` refuse what the RTL refuses, with one-line
errors naming the value and the limit.
"""

from __future__ import annotations

import numpy as np

from hw.spec import fp as G

__all__ = ["SramPimModel", "SramPimCommandError", "check_command", "dot_error_bound"]

MAX_HEADS = 255


class SramPimCommandError(ValueError):
    """A command or a write the unit would refuse (its ``error`` flag)."""


def check_command(macros: int, rows: int, op: str, base: int, count: int, heads: int = 1, stride: int = 0):
    """Raise :class:`SramPimCommandError` for a command the unit refuses; returns the groups per head."""
    for name, v, lo, hi in (("count", count, 1, macros * rows), ("heads", heads, 1, MAX_HEADS),
                            ("base", base, 0, rows - 1), ("stride", stride, 0, rows - 1)):
        if not isinstance(v, (int, np.integer)) or not lo <= v <= hi:
            raise SramPimCommandError(f"SRAM-PIM {op} {name} must be in {lo}..{hi}, not {v!r}")
    groups = -(-count // macros)
    last = base + (heads - 1) * stride + groups - 1
    if last >= rows:
        raise SramPimCommandError(
            f"SRAM-PIM {op}: {heads} head(s) of {count} keys ({groups} rows each in {macros} macros) from row "
            f"{base} with stride {stride} reach row {last}, beyond the {rows} rows per macro")
    return groups


class SramPimModel:
    """Bit-exact model of the unit's storage and its QK / PV commands (bit patterns as numpy arrays)."""

    def __init__(self, macros: int, rows: int, word_lanes: int, mac_lanes: int):
        self.M, self.R, self.W, self.L = macros, rows, word_lanes, mac_lanes
        self.B = word_lanes // mac_lanes
        self.mem = np.zeros((macros * rows, word_lanes), dtype=np.uint16)

    def write(self, line: int, row_bits):
        if not 0 <= line < self.M * self.R:
            raise SramPimCommandError(f"SRAM-PIM write line must be in 0..{self.M * self.R - 1}, not {line}")
        self.mem[line] = np.asarray(row_bits, dtype=np.uint16)

    def store(self, base: int, vectors_bits):
        """Write vectors ``[n, word_lanes]`` as the keys (or values) of one head from row ``base``."""
        v = np.asarray(vectors_bits, dtype=np.uint16)
        for j in range(v.shape[0]):
            self.write(base * self.M + j, v[j])

    def _keys(self, base: int, count: int) -> np.ndarray:
        return self.mem[base * self.M: base * self.M + count]

    def qk(self, base: int, count: int, q_bits, heads: int = 1, stride: int = 0) -> np.ndarray:
        """Scores ``[heads, count]`` (FP32 bits) of the queries ``q_bits [heads, word_lanes]``."""
        check_command(self.M, self.R, "QK", base, count, heads, stride)
        q = np.asarray(q_bits, dtype=np.uint16).reshape(heads, self.W)
        out = np.empty((heads, count), dtype=np.uint32)
        for h in range(heads):
            keys = self._keys(base + h * stride, count)                    # [count, W]
            acc = np.zeros(count, dtype=np.uint32)
            for b in range(self.B):
                sl = slice(b * self.L, (b + 1) * self.L)
                acc = G.add_f32(acc, G.adder_tree(G.mul_bf16(keys[:, sl], q[h, sl][None, :])))
            out[h] = acc
        return out

    def pv(self, base: int, count: int, p_bits, heads: int = 1, stride: int = 0) -> np.ndarray:
        """Outputs ``[heads, word_lanes]`` (FP32 bits) of the probabilities ``p_bits [heads, count]``."""
        groups = check_command(self.M, self.R, "PV", base, count, heads, stride)
        p = np.asarray(p_bits, dtype=np.uint16).reshape(heads, count)
        out = np.empty((heads, self.W), dtype=np.uint32)
        for h in range(heads):
            vals = self._keys(base + h * stride, count)                    # [count, W]
            acc = np.zeros(self.W, dtype=np.uint32)
            for g in range(groups):
                terms = np.zeros((self.M, self.W), dtype=np.uint32)       # missing keys: +0
                k0, k1 = g * self.M, min(count, (g + 1) * self.M)
                terms[:k1 - k0] = G.mul_bf16(vals[k0:k1], p[h, k0:k1][:, None])
                acc = G.add_f32(acc, G.adder_tree(terms.T))
            out[h] = acc
        return out


def dot_error_bound(abs_terms_sum, depth: int) -> np.ndarray:
    """Error bound of a sum of exact products whose every term passes through at most ``depth`` rounded
    additions: ``gamma_depth * sum |terms|`` with ``gamma_k = k u / (1 - k u)``, ``u = 2^-24`` (Higham,
    *Accuracy and Stability of Numerical Algorithms*, 2nd ed., eq. 3.5 and section 4.2)."""
    u = 2.0 ** -24
    return depth * u / (1 - depth * u) * np.asarray(abs_terms_sum, dtype=np.float64)
