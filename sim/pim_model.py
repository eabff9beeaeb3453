"""Fast functional model of the FPGA prototype (PCU + PIM memory), bit-exact with the RTL numerics.

It implements the prototype's register map and macro commands
(:mod:`hw.spec.macro`) over a byte image of device memory in the
Row-Channel-Bank-Column mapping, so the host driver (:mod:`firmware.driver`)
runs the same code on it as on the RTL. GEMV numerics follow the PIM
hardware exactly: per output, ``acc = bias``, then for every 16-value input
column ``acc += tree(w * x)`` (:func:`firmware.pim.gemv_golden`), GELU through
the AF unit's lookup table read from each bank's reserved row
(:func:`sim.golden.pim.af_eval`).

Timing is not modelled (``CYCLES`` counts macro commands, not cycles).
"""

from __future__ import annotations

import numpy as np

from firmware.memimage import MemoryImage
from firmware.pim import GemvLayout, PackingError, gemv_golden
from hw.config import SystemConfig
from hw.spec import fp as G
from hw.spec.macro import (
    CSR,
    DEVICE_ID,
    QUEUE_DEPTH,
    MacroError,
    MacroFlag,
    MacroOp,
    decode,
    geometry_word,
    pcu_limits,
    unpack_addr1,
)
from sim.golden.pim import af_eval

__all__ = ["FunctionalDevice", "MemoryImage"]      # MemoryImage: from firmware.memimage


class FunctionalDevice:
    """The prototype's behaviour: CSRs, macro-command queue, PCU semantics, device memory."""

    def __init__(self, cfg: SystemConfig):
        self.cfg = cfg
        self.mem = MemoryImage(cfg)
        self.limits = pcu_limits(cfg)
        self.macro_words = [0, 0, 0, 0]
        self.queue: list = []
        self.error = MacroError.NONE
        self.completed = 0
        self.input = np.zeros(0, dtype=np.uint16)
        self.result = np.zeros(0, dtype=np.uint32)
        self.counters = {"macs": 0}

    # -- registers ------------------------------------------------------------
    def read_csr(self, off: int) -> int:
        if off == CSR.ID:
            return DEVICE_ID
        if off == CSR.STATUS:
            return (int(bool(self.queue)) | (int(self.error != MacroError.NONE) << 1)
                    | (int(len(self.queue) >= QUEUE_DEPTH) << 2) | (int(not self.queue) << 3))
        if off == CSR.ERROR:
            return int(self.error)
        if CSR.MACRO0 <= off <= CSR.MACRO3:
            return self.macro_words[(off - CSR.MACRO0) // 4]
        if off == CSR.QUEUE_LEVEL:
            return len(self.queue)
        if off == CSR.COMPLETED:
            return self.completed & 0xFFFFFFFF
        if off == CSR.CYCLES:
            return self.completed & 0xFFFFFFFF
        if off == CSR.GEOMETRY:
            return geometry_word(self.cfg.pim)
        if off >= CSR.CH_BASE:
            return 0
        raise IndexError(f"no register at offset {off:#x}")

    def write_csr(self, off: int, value: int):
        value &= 0xFFFFFFFF
        if off == CSR.CTRL:
            if value & 1:
                self.error = MacroError.NONE
            return
        if CSR.MACRO0 <= off <= CSR.MACRO3:
            self.macro_words[(off - CSR.MACRO0) // 4] = value
            return
        if off == CSR.DOORBELL:
            if len(self.queue) >= QUEUE_DEPTH:
                self._fail(MacroError.QUEUE_OVERFLOW)
            else:
                self.queue.append(list(self.macro_words))
            return
        raise IndexError(f"no writable register at offset {off:#x}")

    def step(self):
        """Execute every queued macro command (the functional model has no time)."""
        while self.queue:
            words = self.queue.pop(0)
            if self.error == MacroError.NONE:
                code = self.execute(decode(words))
                if code != MacroError.NONE:
                    self._fail(code)
            self.completed += 1

    def _fail(self, code):
        if self.error == MacroError.NONE:
            self.error = MacroError(code)

    # -- macro commands --------------------------------------------------------
    def execute(self, mc) -> MacroError:
        p = self.cfg.pim
        col = p.column_bytes
        pack, slot0, rest = unpack_addr1(mc.addr1)
        if (rest if mc.op == MacroOp.GEMV else mc.addr1) != 0:
            return MacroError.RESERVED_NONZERO
        if mc.op == MacroOp.NOP:
            return MacroError.NONE
        if mc.op == MacroOp.WRITE_VEC:
            if mc.flags:
                return MacroError.BAD_FLAGS
            if not 1 <= mc.n <= self.limits["input_values"]:
                return MacroError.BAD_LENGTH
            nbytes = -(-mc.n * 2 // col) * col
            if mc.addr0 % col or mc.addr0 + nbytes > self.mem.size:
                return MacroError.BAD_ADDRESS
            self.input = np.frombuffer(self.mem.read(mc.addr0, mc.n * 2), dtype="<u2").copy()
            return MacroError.NONE
        if mc.op == MacroOp.GEMV:
            if int(mc.flags) & ~int(MacroFlag.BIAS | MacroFlag.GELU):   # int: ~ on an IntFlag drops undefined bits
                return MacroError.BAD_FLAGS
            K, N = mc.n, mc.m
            if not (1 <= K <= self.limits["input_values"] and 1 <= N <= self.limits["result_values"]):
                return MacroError.BAD_LENGTH
            if K > self.input.size:
                return MacroError.NO_INPUT
            if pack > p.gb_columns.bit_length():           # pitch 2 ** (pack - 1) > gb_columns
                return MacroError.BAD_PACKING
            try:
                layout = GemvLayout(self.cfg, K, N, base_row=mc.row, pitch=1 << pack >> 1, slot0=slot0)
            except PackingError:
                return MacroError.BAD_PACKING
            except ValueError:
                return MacroError.BAD_REGION
            bias = None
            if mc.flags & MacroFlag.BIAS:
                nbytes = -(-N * 4 // col) * col
                if mc.addr0 % col or mc.addr0 + nbytes > self.mem.size:
                    return MacroError.BAD_ADDRESS
                bias = np.frombuffer(self.mem.read(mc.addr0, N * 4), dtype="<u4").copy()
            w = self.weights(layout)
            y = gemv_golden(self.cfg, w, self.input[:K], bias)
            if mc.flags & MacroFlag.GELU:
                y = self._gelu(layout, y)
            self.result = y
            self.counters["macs"] += layout.rows_used
            return MacroError.NONE
        if mc.op == MacroOp.READ_RES:
            if int(mc.flags) & ~int(MacroFlag.BF16):
                return MacroError.BAD_FLAGS
            if not 1 <= mc.n <= self.limits["result_values"]:
                return MacroError.BAD_LENGTH
            if mc.n > self.result.size:
                return MacroError.NO_RESULT
            bf16 = bool(mc.flags & MacroFlag.BF16)
            data = G.round_bf16(self.result[:mc.n]).astype("<u2") if bf16 else self.result[:mc.n].astype("<u4")
            nbytes = -(-data.nbytes // col) * col
            if mc.addr0 % col or mc.addr0 + nbytes > self.mem.size:
                return MacroError.BAD_ADDRESS
            self.mem.write(mc.addr0, data.tobytes())
            return MacroError.NONE
        return MacroError.BAD_OPCODE

    def weights(self, layout: GemvLayout) -> np.ndarray:
        """The ``[K, N]`` BF16 weights stored for ``layout`` (inverse of :meth:`GemvLayout.pack`)."""
        return layout.unpack(self.mem.rows(layout.base_row, layout.rows_used))   # [rows, ch, banks, cols, lanes]

    def _gelu(self, layout: GemvLayout, y: np.ndarray) -> np.ndarray:
        """AF unit per output, with the LUT from the reserved row of the bank that owns it."""
        p = self.cfg.pim
        lut_rows = self.mem.rows(p.data_rows, 1)[0]                  # [ch, banks, cols, lanes]
        out = np.empty_like(y)
        for n in range(y.size):
            c = (n // p.banks) % p.channels
            b = n % p.banks
            out[n] = af_eval(self.cfg, y[n:n + 1], lut_rows[c, b])[0]
        return out
