"""Golden model of the NPU vector unit (numpy), written from the ISA description.

:class:`VectorModel` holds a scratchpad image (``depth`` words of ``L`` 32-bit
slots) and executes instructions given as field dicts (the fields of
:class:`hw.npu.vector.VectorInstr`), bit for bit as the RTL does:

* loads canonicalise (FTZ, canonical NaN); BF16 operands widen exactly;
* element-wise arithmetic in the order the ISA table states, with the FP32
  operations of :mod:`sim.golden.fp` and :mod:`sim.golden.fp32ext`;
* row sums: each beat of ``L`` elements is summed by a pairwise tree
  (:func:`sim.golden.fp.adder_tree`; missing elements of the last beat are
  ``-0``, the exact identity), then the beat sums are accumulated in order,
  or, with ``acc_stages = P > 1`` (the configuration's ``npu.vec_acc_stages``),
  into ``P`` interleaved partial sums combined pairwise (:func:`row_sum`);
* row max: NaN if any element is NaN, ``+0 > -0`` (order-independent);
* stores round to BF16 (nearest even) when the destination is BF16.

Besides executing, the model checks each instruction like the RTL does and
returns the same :class:`hw.npu.vector.VecError` code (then touching no memory).
"""

from __future__ import annotations

import numpy as np

from hw.spec import fp as G
from hw.spec.vector_isa import ISA_TABLE, VecError
from sim.golden import fp32ext as X

__all__ = ["VectorModel", "row_sum", "row_max", "ERR"]

# Opcode numbers and error codes come from the ISA's one table (hw.npu.vector).
ERR = {e.name: e.value for e in VecError}
OPS = {op.name: op.code for op in ISA_TABLE}
OPNAME = {v: k for k, v in OPS.items()}
FP32, BF16 = 0, 1
ROW, VEC, COL, IMM = 0, 1, 2, 3
MASK_NONE, MASK_BITMAP, MASK_CAUSAL, MASK_PREFIX = 0, 1, 2, 3
LOG2E_BITS = np.uint32(0x3FB8AA3B)
SIGN = np.uint32(0x80000000)


def _ceil(a, b):
    return -(-a // b)


def row_sum(bits: np.ndarray, lanes: int, acc_stages: int = 1) -> np.ndarray:
    """Sum of the last axis in the vector unit's order (lane tree per beat, beats in order).

    ``acc_stages = P > 1`` (:class:`hw.npu.vector_reduce.VectorReduce` with ``P`` interleaved partial
    sums): beat ``k``'s sum goes into partial ``k mod P`` (every partial starting at ``-0``, the exact
    identity), then the partials are combined pairwise, ``(p0+p1)+(p2+p3)`` for 4, ``(p0+p1)+p2`` for 3
    (:func:`hw.spec.fp.accumulate` with ``stages=P`` onto ``-0``)."""
    bits = np.asarray(bits, dtype=np.uint32)
    n = bits.shape[-1]
    nb = _ceil(n, lanes)
    pad = np.full(bits.shape[:-1] + (nb * lanes - n,), SIGN, dtype=np.uint32)
    beats = np.concatenate([bits, pad], axis=-1).reshape(bits.shape[:-1] + (nb, lanes))
    partial = G.adder_tree(beats)
    if acc_stages > 1:
        init = np.full(partial.shape[:-1], SIGN, dtype=np.uint32)
        return G.accumulate(init, np.moveaxis(partial, -1, 0), stages=acc_stages)
    acc = partial[..., 0]
    for k in range(1, nb):
        acc = G.add_f32(acc, partial[..., k])
    return acc


def row_max(bits: np.ndarray) -> np.ndarray:
    """Max of the last axis (NaN wins, +0 > -0); an empty row gives -inf."""
    bits = np.asarray(bits, dtype=np.uint32)
    acc = np.full(bits.shape[:-1], X.NEG_INF, dtype=np.uint32)
    for k in range(bits.shape[-1]):
        acc = X.max_f32(acc, bits[..., k])
    return acc


class VectorModel:
    """Scratchpad image plus the instruction semantics of the vector unit."""

    def __init__(self, lanes: int, depth: int, max_n: int = 4096, acc_stages: int = 1):
        self.L = lanes
        self.depth = depth
        self.max_n = max_n
        self.acc_stages = acc_stages          # the row sums' order (row_sum; npu.vec_acc_stages)
        self.mem = np.zeros((depth, lanes), dtype=np.uint32)

    # -- data placement ----------------------------------------------------------------------
    def slots(self, fmt):
        return 2 * self.L if fmt == BF16 else self.L

    def pitch(self, n, fmt):
        return _ceil(n, self.slots(fmt))

    def _flat(self, fmt):
        flat = self.mem.reshape(-1)
        return flat.view(np.uint16) if fmt == BF16 else flat

    def put(self, base: int, rows_bits: np.ndarray, fmt: int):
        """Write a (rows, n) array of bit patterns (uint16 for BF16, uint32 for FP32) as rows at ``base``."""
        rows_bits = np.atleast_2d(rows_bits)
        rows, n = rows_bits.shape
        p, s = self.pitch(n, fmt), self.slots(fmt)
        flat = self._flat(fmt)
        for r in range(rows):
            start = (base + r * p) * s
            flat[start:start + n] = rows_bits[r]

    def get(self, base: int, rows: int, n: int, fmt: int) -> np.ndarray:
        p, s = self.pitch(n, fmt), self.slots(fmt)
        flat = self._flat(fmt)
        return np.stack([flat[(base + r * p) * s:(base + r * p) * s + n] for r in range(rows)]).copy()

    def put_elems(self, base: int, values: np.ndarray, fmt: int):
        """Write a 1-D array of elements contiguously from word ``base``."""
        flat = self._flat(fmt)
        flat[base * self.slots(fmt):base * self.slots(fmt) + len(values)] = values

    def get_elems(self, base: int, count: int, fmt: int) -> np.ndarray:
        flat = self._flat(fmt)
        return flat[base * self.slots(fmt):base * self.slots(fmt) + count].copy()

    def load(self, base, rows, n, fmt):
        bits = self.get(base, rows, n, fmt)
        return X.load_bf16(bits) if fmt == BF16 else X.load_f32(bits)

    def store(self, base, values32, fmt):
        self.put(base, X.store_bf16(values32) if fmt == BF16 else values32, fmt)

    # -- instruction check -----------------------------------------------------------------
    def check(self, ins: dict) -> int:
        g = lambda k: int(ins.get(k, 0))     # noqa: E731
        op, n, rows = g("op"), g("n"), g("rows")
        if op not in OPNAME:
            return ERR["BAD_OPCODE"]
        name = OPNAME[op]
        if n == 0 or n > self.max_n or rows == 0:
            return ERR["BAD_LENGTH"]
        mask = g("mask")
        if (mask != MASK_NONE and name != "SOFTMAX") or (name == "LN_STATS" and g("d_fmt") == BF16):
            return ERR["BAD_MODE"]
        L = self.L
        ends = [g("a") + rows * self.pitch(n, g("a_fmt"))]
        if name == "LN_APPLY":
            ends.append(g("b") + _ceil(n, L))
            ends.append(g("aux") + _ceil(2 * rows, L))
        elif name in ("ADD", "MUL"):
            mode = g("b_mode")
            pb = self.pitch(n, g("b_fmt"))
            if mode == ROW:
                ends.append(g("b") + rows * pb)
            elif mode == VEC:
                ends.append(g("b") + pb)
            elif mode == COL:
                ends.append(g("b") + _ceil(rows, self.slots(g("b_fmt"))))
        if name in ("MAX", "SUM"):
            ends.append(g("d") + _ceil(rows, self.slots(g("d_fmt"))))
        elif name == "LN_STATS":
            ends.append(g("d") + _ceil(2 * rows, L))
        elif name == "KV_APPEND":
            ends.append(g("d") + g("imm0") * self.pitch(n, g("d_fmt")))
        else:
            ends.append(g("d") + rows * self.pitch(n, g("d_fmt")))
        if name == "SOFTMAX" and mask == MASK_BITMAP:
            ends.append(g("aux") + rows * _ceil(n, 32 * L))
        if any(e > self.depth for e in ends):
            return ERR["BAD_ADDRESS"]
        if name == "KV_APPEND" and g("pos") + rows > g("imm0"):
            return ERR["KV_OVERFLOW"]
        return ERR["NONE"]

    # -- execution ----------------------------------------------------------------------------
    def run(self, ins: dict) -> int:
        """Execute one instruction; returns its error code (memory untouched on error)."""
        err = self.check(ins)
        if err:
            return err
        g = lambda k: int(ins.get(k, 0))     # noqa: E731
        name = OPNAME[g("op")]
        n, rows, L = g("n"), g("rows"), self.L
        a_fmt, d_fmt = g("a_fmt"), g("d_fmt")
        imm0, imm1 = np.uint32(g("imm0")), np.uint32(g("imm1"))
        x = self.load(g("a"), rows, n, a_fmt)
        d = g("d")

        if name in ("ADD", "MUL"):
            mode, b_fmt = g("b_mode"), g("b_fmt")
            if mode == ROW:
                b = self.load(g("b"), rows, n, b_fmt)
            elif mode == VEC:
                b = np.broadcast_to(self.load(g("b"), 1, n, b_fmt), (rows, n))
            elif mode == COL:
                col = self.get_elems(g("b"), rows, b_fmt)
                col = X.load_bf16(col) if b_fmt == BF16 else X.load_f32(col)
                b = np.broadcast_to(col[:, None], (rows, n))
            else:
                b = np.full((rows, n), X.load_f32(imm0), dtype=np.uint32)
            y = G.add_f32(x, b) if name == "ADD" else X.mul_f32(x, b)
            self.store(d, y, d_fmt)
        elif name == "SCALE":
            self.store(d, G.add_f32(X.mul_f32(x, imm0), imm1), d_fmt)
        elif name in ("COPY",):
            self.store(d, x, d_fmt)
        elif name == "KV_APPEND":
            self.store(d + g("pos") * self.pitch(n, d_fmt), x, d_fmt)
        elif name in ("EXP", "RECIP", "RSQRT", "GELU"):
            f = dict(EXP=X.exp, RECIP=X.recip, RSQRT=X.rsqrt, GELU=X.gelu)[name]
            self.store(d, f(x), d_fmt)
        elif name in ("MAX", "SUM"):
            v = row_max(x) if name == "MAX" else row_sum(x, L, self.acc_stages)
            out = X.store_bf16(v) if d_fmt == BF16 else v
            self.put_elems(d, out, d_fmt)
        elif name == "LN_STATS":
            mean = X.mul_f32(row_sum(x, L, self.acc_stages), imm0)
            cen = G.add_f32(x, (mean ^ SIGN)[:, None])
            var_sum = row_sum(X.mul_f32(cen, cen), L, self.acc_stages)
            rstd = X.rsqrt(G.add_f32(X.mul_f32(var_sum, imm0), imm1))
            self.put_elems(d, np.stack([mean, rstd], axis=1).reshape(-1), FP32)
        elif name == "LN_APPLY":
            stats = self.get_elems(g("aux"), 2 * rows, FP32).reshape(rows, 2)
            gb = self.get_elems(g("b"), n, FP32)
            gamma = X.load_bf16((gb & 0xFFFF).astype(np.uint16))
            beta = X.load_bf16((gb >> 16).astype(np.uint16))
            y = G.add_f32(x, (stats[:, :1] ^ SIGN))
            y = X.mul_f32(y, stats[:, 1:2])
            y = X.mul_f32(y, gamma[None, :])
            y = G.add_f32(y, beta[None, :])
            self.store(d, y, d_fmt)
        elif name == "SOFTMAX":
            vis = self.visible(ins)
            neg_inf = np.full_like(x, X.NEG_INF)
            m = row_max(np.where(vis, x, neg_inf))
            dead = m == X.NEG_INF
            e = X.exp2(X.mul_f32(G.add_f32(x, (m ^ SIGN)[:, None]), LOG2E_BITS))
            e = np.where(vis & ~dead[:, None], e, np.uint32(0))
            s = row_sum(np.where(vis, e, SIGN), L, self.acc_stages)
            y = X.mul_f32(e, X.recip(s)[:, None])
            y = np.where(vis & ~dead[:, None], y, np.uint32(0))
            self.store(d, y, d_fmt)
        return ERR["NONE"]

    def visible(self, ins: dict) -> np.ndarray:
        """Visibility (True = attended) of each element of a SOFTMAX instruction, shape (rows, n)."""
        n, rows, mode = int(ins["n"]), int(ins["rows"]), int(ins.get("mask", 0))
        if mode in (MASK_CAUSAL, MASK_PREFIX):
            j = np.arange(n)[None, :]
            r = np.arange(rows)[:, None] * (mode == MASK_CAUSAL)
            return j <= r + int(ins.get("pos", 0))
        if mode == MASK_BITMAP:
            pitch = _ceil(n, 32 * self.L)
            flat = self.mem.reshape(-1)
            out = np.zeros((rows, n), dtype=bool)
            for r in range(rows):
                words = flat[(int(ins["aux"]) + r * pitch) * self.L:(int(ins["aux"]) + (r + 1) * pitch) * self.L]
                bits = np.unpackbits(words.view(np.uint8), bitorder="little")
                out[r] = bits[:n].astype(bool)
            return out
        return np.ones((rows, n), dtype=bool)

    @staticmethod
    def bitmap_words(vis: np.ndarray, lanes: int) -> np.ndarray:
        """Pack a (rows, n) boolean visibility array into bitmap rows of uint32 slots (``L`` per word)."""
        rows, n = vis.shape
        pitch = _ceil(n, 32 * lanes)
        bits = np.zeros((rows, pitch * 32 * lanes), dtype=np.uint8)
        bits[:, :n] = vis
        return np.packbits(bits, axis=1, bitorder="little").view(np.uint32).reshape(rows * pitch, lanes)


class Program:
    """A test or benchmark program: scratchpad image + instructions, with the golden results.

    Put all data first (:meth:`put_rows`, :meth:`put_bitmap`, ...), then
    :meth:`add` instructions; :meth:`save` writes the scenario for
    ``sim/tb/vector_tb.py``.
    """

    def __init__(self, lanes: int, depth: int, max_n: int = 4096, acc_stages: int = 1):
        self.model = VectorModel(lanes, depth, max_n, acc_stages)
        self.L = lanes
        self.depth = depth
        self.top = 0
        self.init = None
        self.instrs, self.names, self.errors, self.elements, self.fields = [], [], [], [], []

    def alloc(self, words: int) -> int:
        assert self.init is None, "allocate and place data before the first instruction"
        base = self.top
        self.top += words
        assert self.top <= self.depth, f"program needs {self.top} words, scratchpad has {self.depth}"
        return base

    def put_rows(self, bits: np.ndarray, fmt: int) -> int:
        bits = np.atleast_2d(bits)
        base = self.alloc(bits.shape[0] * self.model.pitch(bits.shape[1], fmt))
        self.model.put(base, bits, fmt)
        return base

    def put_elems(self, values: np.ndarray, fmt: int) -> int:
        base = self.alloc(_ceil(len(values), self.model.slots(fmt)))
        self.model.put_elems(base, values, fmt)
        return base

    def put_bitmap(self, vis: np.ndarray) -> int:
        words = VectorModel.bitmap_words(vis, self.L)
        base = self.alloc(words.shape[0])
        self.model.mem[base:base + words.shape[0]] = words
        return base

    def put_gamma_beta(self, gamma_bf16: np.ndarray, beta_bf16: np.ndarray) -> int:
        packed = gamma_bf16.astype(np.uint32) | (beta_bf16.astype(np.uint32) << 16)
        return self.put_elems(packed, FP32)

    def add(self, name: str | None = None, **fields) -> int:
        from hw.spec.vector_isa import encode

        if self.init is None:
            self.init = self.model.mem.copy()
        err = self.model.run(fields)
        self.instrs.append(encode(**fields))
        self.fields.append(fields)
        self.names.append(name or f"{OPNAME.get(int(fields['op']), 'op')}#{len(self.instrs) - 1}")
        self.errors.append(err)
        self.elements.append(int(fields.get("n", 0)) * int(fields.get("rows", 0)) if err == 0 else 0)
        return err

    def save(self, path):
        from sim.tb.vector_tb import save_scenario

        init = self.init if self.init is not None else self.model.mem.copy()
        save_scenario(path, init, self.instrs, self.model.mem, self.errors, self.names, self.elements)
