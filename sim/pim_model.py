"""Fast functional model of the FPGA prototype (PCU + PIM memory), bit-exact with the RTL numerics.

It implements the prototype's register map and macro commands
(:mod:`hw.spec.macro`) over a byte image of device memory in the
Row-Channel-Bank-Column mapping, so the host driver (:mod:`firmware.driver`)
runs the same code on it as on the RTL. GEMV numerics follow the PIM
hardware exactly: per output, ``acc = bias``, then for every 16-value input
column ``acc += tree(w * x)`` (:func:`firmware.pim.gemv_golden`), GELU through
the AF unit's lookup table read from each bank's reserved row
(:func:`sim.golden.pim.af_eval`).

On a device with 4-bit weights (``PimGeometry.weight_format`` ``int4`` / ``fp4``) the GEMV is the 4-bit
macro of :mod:`hw.spec.macro` (:meth:`FunctionalDevice._w4_gemv`): the weights laid out by
:class:`firmware.pim_lowprec.W4GemvLayout` (chunks of what the global buffer holds), every output the golden
:func:`sim.golden.lowprec_unit.unit_acc` of its unit with the bias as the accumulator's initial value; with
FP8 activations the input buffer holds E4M3 codes (WRITE_VEC's ``n`` counts them, one byte each).

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
            xb = 1 if p.act_format == "fp8_e4m3" else 2      # bytes per input: BF16 or an E4M3 code
            nbytes = -(-mc.n * xb // col) * col
            if mc.addr0 % col or mc.addr0 + nbytes > self.mem.size:
                return MacroError.BAD_ADDRESS
            self.input = np.frombuffer(self.mem.read(mc.addr0, mc.n * xb), dtype="<u2" if xb == 2 else "u1").copy()
            return MacroError.NONE
        if mc.op == MacroOp.GEMV and p.lowprec:
            return self._w4_gemv(mc)
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

    def w4_check(self, mc):
        """``(code, layout)`` of a 4-bit GEMV macro (hw/spec/macro.py), the checks in the PCU's order
        (:class:`hw.pcu_w4.W4Decoder`); ``layout`` is its ``W4GemvLayout`` when ``code`` is ``NONE``."""
        from firmware.pim_lowprec import W4GemvLayout

        p = self.cfg.pim
        col = p.column_bytes
        K, N, q = mc.n, mc.m, p.quant_group
        if (mc.addr1 >> 16) != 0:
            return MacroError.RESERVED_NONZERO, None
        if int(mc.flags) & ~int(MacroFlag.BIAS):         # GELU after a 4-bit GEMV is not supported
            return MacroError.BAD_FLAGS, None
        if not (1 <= K <= self.limits["input_values"] and 1 <= N <= self.limits["result_values"]) or K % q:
            return MacroError.BAD_LENGTH, None
        if K > self.input.size:
            return MacroError.NO_INPUT, None
        max_groups = p.gb_slots * 64 // q                 # a chunk: at most what the global buffer holds
        if (mc.addr1 >> 8) & 0xFF or (mc.addr1 & 0xFF) > max_groups:
            return MacroError.BAD_PACKING, None
        chunk = min(K, ((mc.addr1 & 0xFF) or max_groups) * q)    # inputs per chunk: addr1[7:0] groups
        sc = -(-(chunk // q) // 16)
        sl = sc if p.grid_choice else 0
        if chunk // 64 + sc + sl > p.columns or sl > 1:
            return MacroError.UNSUPPORTED, None
        try:
            layout = W4GemvLayout(self.cfg, K, N, base_row=mc.row, chunk_size=((mc.addr1 & 0xFF) or max_groups) * q)
        except ValueError:
            return MacroError.BAD_REGION, None
        if mc.flags & MacroFlag.BIAS:
            nbytes = -(-N * 4 // col) * col
            if mc.addr0 % col or mc.addr0 + nbytes > self.mem.size:
                return MacroError.BAD_ADDRESS, None
        return MacroError.NONE, layout

    def _w4_gemv(self, mc) -> MacroError:
        """The 4-bit GEMV macro (hw/spec/macro.py): :meth:`w4_check`, then every output's
        :func:`sim.golden.lowprec_unit.unit_acc` from the weights stored for the layout."""
        code, layout = self.w4_check(mc)
        if code != MacroError.NONE:
            return code
        N = mc.m
        bias = np.zeros(N, np.uint32)
        if mc.flags & MacroFlag.BIAS:
            bias = np.frombuffer(self.mem.read(mc.addr0, N * 4), dtype="<u4").copy()
        self.result = w4_gemv_from_memory(self.cfg, layout, self.mem, self.input[:mc.n], bias)
        self.counters["macs"] += layout.rows_used
        return MacroError.NONE


def w4_gemv_from_memory(cfg, layout, mem, x, bias) -> np.ndarray:
    """FP32 bits ``[N]``: the units' accumulators (``acc0`` = ``bias``) over the 4-bit weights stored in ``mem`` for
    ``layout`` (the inverse of :meth:`firmware.pim_lowprec.W4GemvLayout.image`), chunk by chunk (each chunk's
    accumulator starts from the previous chunk's, read back and preloaded unchanged)."""
    from firmware.quant import unpack_nibbles
    from sim.golden.lowprec_unit import unit_acc

    p = cfg.pim
    rows = mem.rows(layout.base_row, layout.rows_used)              # [rows, ch, banks, cols, 16] uint16
    cols = np.ascontiguousarray(rows).view(np.uint8)                # [rows, ch, banks, cols, 32] bytes
    N = layout.N
    x = np.asarray(x)
    out = np.asarray(bias, np.uint32).copy()
    for ch in range(layout.chunks):
        k0, G = ch * layout.chunk, layout.chunk_groups(ch)
        xc = x[k0:k0 + layout.chunk_len(ch)].reshape(-1, 64)
        for n in range(N):
            t = n // layout.per_tile
            c, b = (n // p.banks) % p.channels, n % p.banks
            code_cols, sc_cols, sl_cols = layout.unit_columns_at(t % layout.per_row, ch)
            r = layout.row_of(t, ch) - layout.base_row
            w = unpack_nibbles(cols[r, c, b, code_cols])            # [n, 64]
            scales = np.concatenate([cols[r, c, b, k].view("<u2") for k in sc_cols])[:G]
            sel = None
            if sl_cols:
                words = [int(cols[r, c, b, k, :4].view("<u4")[0]) for k in sl_cols]
                sel = np.array([(words[g // 16] >> (2 * (g % 16))) & 3 for g in range(G)], np.uint8)
            out[n] = unit_acc(p.weight_format, p.act_format, w, xc, scales, sel, int(out[n]), p.quant_group,
                              p.scale_format, p.grid_choice)
    return out
