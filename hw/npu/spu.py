"""The SRAM-PIM queue (SPU, issue 20): the SRAM-PIM attention unit attached to the SoC.

::

    instr (256-bit SoC instructions: SPIM / SLOAD, with their index ``pc``)
      |
      v
    FIFO (queue_depth) --> dispatcher: one instruction at a time, in program order, checked first
                              |                                   |
                              v SPIM                              v SLOAD
          operand reader --i--> SramPimUnit --o--> result writer    SLOAD engine ---- mem (MemPortSignature)
               |  spm_rd          ^  wr (lines)        | spm_wr        |  reads 32-byte columns
               +--------- vector scratchpad -----------+               +--> wr (one line per beat)

Instructions (:mod:`hw.spec.soc_isa`, :data:`~hw.spec.soc_isa.SPIM_FIELDS`, :data:`~hw.spec.soc_isa.SLOAD_FIELDS`)
-------------------------------------------------------------------------------------------------------
* ``SPIM``: one unit command (:class:`hw.npu.sram_pim.SramPimUnit`: ``mode`` QK / PV, ``base``, ``count``,
  ``heads``, ``stride``) with its operands read from and its results written to the vector scratchpad.
  Scratchpad addresses are 32-byte columns (as VDMA's ``spm_addr``); the scratchpad seen as bytes
  (:mod:`hw.npu.vector_queue`). QK: head ``h``'s query is ``word_lanes`` BF16 at column
  ``spm_in + h * in_pitch`` (read in ``beats = word_lanes / mac_lanes`` beats); its ``count`` FP32 scores
  go to column ``spm_out + h * out_pitch``, consecutive. PV: head ``h``'s probabilities are ``count``
  BF16 at column ``spm_in + h * in_pitch``, read a group (``macros`` values) per beat, so the values of a
  last partial group past ``count`` are read and ignored; its ``word_lanes`` FP32 outputs go to column
  ``spm_out + h * out_pitch``. Exactly ``count`` (QK) or ``word_lanes`` (PV) FP32 values are written per
  head (16-bit write enables), nothing around them.
* ``SLOAD``: for region ``r < regions`` and position ``p < positions``, ``cols`` 32-byte columns at
  device-memory byte ``mem_addr + r * region_stride + p * pos_stride`` become unit line
  ``line + r * line_stride + p`` (the rest of the line zero). Key / value ``j`` of a head stored from
  unit row ``base`` is line ``base * macros + j``, so a head group's K (or V) cache is one SLOAD with
  ``line_stride = stride * macros``.

Checks (before anything is touched; :class:`hw.spec.soc_isa.SpuError`, the first error kept until
``clear``; while it is set the queue pops and discards instructions, as the vector queue does):
``BAD_COMMAND`` (SPIM: ``count`` or ``heads`` 0, ``base`` or ``stride`` not below ``rows``, keys past
the last row: :func:`sim.golden.sram_pim.check_command`), ``SPM`` (SPIM: the operands, in BF16 values
``16 * (spm_in + (heads - 1) * in_pitch) + (word_lanes | groups * macros)``, or the results, in FP32
values ``8 * (spm_out + (heads - 1) * out_pitch) + (count | word_lanes)``, past the scratchpad),
``SLOAD_SIZE`` (``regions``, ``positions`` or ``cols`` 0, ``32 * cols`` over the line's
``2 * word_lanes`` bytes), ``SLOAD_ALIGN`` (``mem_addr``, ``pos_stride`` or ``region_stride`` not a
multiple of 32), ``SLOAD_LINE`` (``line + (regions - 1) * line_stride + positions - 1`` not below the
unit's ``macros * rows`` lines), ``SLOAD_MEM`` (the last column past ``2 ** addr_bits`` bytes, or a
response with ``error``: the engine stops issuing, drains and finishes; the lines before are written).
``error_pc`` is the failing instruction's index (it travels with the instruction). The unit's own
sticky error flag (never raised by a checked command) is ``UNIT``.

Scratchpad ports (the vector queue's, :class:`hw.npu.vector_queue.VectorQueue` with ``spu_port=True``):
a read port of its own (a third read port of the scratchpad memory: on an FPGA one more copy of the
BRAM, in an ASIC a second read port or a bank split; cheaper than stalling the vector unit, whose
softmax of one head group is meant to overlap the unit's work on the next) and the write port shared
with the vector unit and the vector DMA, which have priority (``spm_wr_ready`` low while they write):
a result beat waits in the unit's result FIFO, so the unit stalls only when the FIFO is full. A result
beat is at most ``mac_lanes`` FP32 values and :class:`hw.config.SystemConfig` makes it fit one
scratchpad row, so each beat is one write. Data hazards between the two queues are the program's
(FENCE on VQ / SPU), as between the other units.

Memory: the SLOAD engine is a memory requester like the vector DMA (up to ``max_outstanding`` reads in
flight, one request and one response per cycle, responses in request order with a 7-bit sequence
number in the tag; tag bit 7 is the SoC's arbiter's, which shares the vector queue's fabric port:
:mod:`hw.soc`). Its requests go through the fabric to the controllers, so they wait while a macro PIM
command holds the channels, as every other normal request does.

Timing: an instruction reaches the dispatcher 2 cycles after it enters the (buffered) FIFO, is taken
in 1 and checked in 2; an SPIM then starts its operand reader and gives the unit its command a cycle
later, so that operands are never late, and the dispatcher sees the last result written a cycle after
its write. A lone SPIM keeps the queue busy ``command_cycles + SPIM_OVERHEAD`` cycles
(:data:`hw.spec.soc_isa.SPIM_OVERHEAD` = 8, re-exported here, measured on tiny-hpim for QK and PV of 1..16 keys and 1..2 heads by
tests/test_spu.py) when the scratchpad's write port is free. One instruction at a time: an SLOAD
does not overlap an SPIM (the unit would allow it: a second engine slot is future work).

Counters (32 bits, zeroed by ``clear``): ``busy`` (instructions queued or executing), ``compute``
(the unit busy), ``load`` (the SLOAD engine busy), ``spm_stall`` (a result beat waiting for the write
port), ``instructions`` (executed to the end, with or without error).
"""

from __future__ import annotations

from amaranth.hdl import Cat, Module, Mux, ResetInserter, Signal
from amaranth.lib import data, stream, wiring
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.lib.wiring import In, Out

from ..config import SystemConfig
from ..elab import Shared, log2
from ..memif import MemPortSignature
from ..spec.soc_isa import (
    INSTR_BITS,
    PAYLOAD_LO,
    SLOAD_BITS,
    SLOAD_FIELDS,
    SPIM_FIELDS,
    SPIM_OVERHEAD,
    SocOp,
    SpuError,
)
from .counters import count_events
from .spm import SpmReadSignature
from .sram_pim import SramPimOp, SramPimUnit
from .vector_parts import WritePortSignature
from .vector_queue import SEQ_BITS, _Geometry

__all__ = ["Spu", "COUNTERS", "SPIM_OVERHEAD"]

COUNTERS = data.StructLayout({"busy": 32, "compute": 32, "load": 32, "spm_stall": 32, "instructions": 32})



class Spu(wiring.Component):
    """The SRAM-PIM queue (see the module docstring).

    Parameters
    ----------
    cfg : SystemConfig
        With ``cfg.spu`` (one unit: ``cfg.spu.units == 1``).
    queue_depth : int
        Instructions the FIFO holds (at least 2).
    max_outstanding : int
        SLOAD reads in flight (1..127).

    Members
    -------
    instr : In(stream.Signature(256)), pc : In(32)
        Whole SoC instructions and the index of the one on ``instr``.
    mem : Out(MemPortSignature(cfg))
    spm_rd : Out(read port of the vector scratchpad), spm_wr : Out(write port), spm_wr_ready : In(1)
    busy : Out(1)
    error : Out(8)
        First :class:`hw.spec.soc_isa.SpuError` since reset or ``clear``.
    error_pc : Out(32)
        Index of the instruction that raised ``error``.
    clear : In(1)
    counters : Out(COUNTERS)
    """

    def __init__(self, cfg: SystemConfig, queue_depth: int = 4, max_outstanding: int = 32):
        if not isinstance(cfg, SystemConfig):
            raise TypeError(f"Configuration must be a SystemConfig, not {cfg!r}")
        if cfg.spu is None:
            raise ValueError(f"Configuration {cfg.name!r} has no SRAM-PIM unit (SystemConfig.spu is None)")
        if cfg.spu.units != 1:
            raise ValueError(f"The SoC has one SRAM-PIM unit, not spu.units={cfg.spu.units} (more units are a "
                             f"projection parameter)")
        if not isinstance(queue_depth, int) or isinstance(queue_depth, bool) or queue_depth < 2:
            raise ValueError(f"Queue depth must be an integer of at least 2, not {queue_depth!r}")
        if (not isinstance(max_outstanding, int) or isinstance(max_outstanding, bool)
                or not 1 <= max_outstanding < 1 << SEQ_BITS):
            raise ValueError(f"Outstanding requests must be an integer in [1, {(1 << SEQ_BITS) - 1}], "
                             f"not {max_outstanding!r}")
        s = cfg.spu
        self._cfg = cfg
        self._geo = g = _Geometry(cfg.npu.vector_lanes, cfg.npu.vector_spm_words)
        self.unit = SramPimUnit(s.macros, s.rows, s.word_lanes, s.mac_lanes, s.read_latency)
        self._depth = queue_depth
        self._max_out = max_outstanding
        super().__init__({
            "instr": In(stream.Signature(INSTR_BITS)),
            "pc": In(32),
            "mem": Out(MemPortSignature(cfg)),
            "spm_rd": Out(SpmReadSignature(g.row_addr_bits, g.row_bits)),
            "spm_wr": Out(WritePortSignature(g.row_addr_bits, g.row_bits)),
            "spm_wr_ready": In(1),
            "busy": Out(1),
            "error": Out(8),
            "error_pc": Out(32),
            "clear": In(1),
            "counters": Out(COUNTERS),
        })

    def elaborate(self, platform):
        # The parts below share their signals through ``c`` (:class:`hw.elab.Shared`), in this order.
        m = Module()
        cfg = self._cfg
        g = self._geo
        u = m.submodules.unit = self.unit
        M, R, W, Lm, B = u.macros, u.rows, u.word_lanes, u.mac_lanes, u.beats
        lgM, lgL = log2(M), log2(Lm)
        aw = cfg.pim.addr_bits
        row_bits = g.row_bits
        row_bf16 = row_bits // 16
        row_f32 = row_bits // 32
        spm_bf16 = g.columns * 16
        spm_f32 = g.columns * 8
        cols_per_line = 2 * W // 32
        max_out = self._max_out

        c = Shared(g=g, u=u, aw=aw, row_bf16=row_bf16, row_f32=row_f32, spm_bf16=spm_bf16, spm_f32=spm_f32,
                   cols_per_line=cols_per_line, max_out=max_out, M=M, R=R, W=W, Lm=Lm, B=B, lgM=lgM, lgL=lgL)
        self._queue(m, c)
        self._checks(m, c)
        self._operand_reader(m, c)
        self._result_writer(m, c)
        self._sload_engine(m, c)
        self._dispatcher(m, c)
        return m

    def _queue(self, m, c):
        """The instruction FIFO (op, payload, pc), the current instruction and its fields, the sticky error register."""
        u = c.u
        fifo = m.submodules.fifo = ResetInserter(self.clear)(
            SyncFIFOBuffered(width=4 + SLOAD_BITS + 32, depth=self._depth))
        m.d.comb += [
            fifo.w_data.eq(Cat(self.instr.payload[0:4], self.instr.payload[PAYLOAD_LO:PAYLOAD_LO + SLOAD_BITS],
                               self.pc)),
            fifo.w_en.eq(self.instr.valid),
            self.instr.ready.eq(fifo.w_rdy),
        ]
        cur = Signal(4 + SLOAD_BITS)
        cur_pc = Signal(32)
        payload = cur[4:]
        sp = {name: payload[lo:lo + w] for name, lo, w in SPIM_FIELDS}
        sl = {name: payload[lo:lo + w] for name, lo, w in SLOAD_FIELDS}

        # ---------------- error register ----------------
        err = Signal(8)
        err_pc = Signal(32)
        event = Signal(8)
        with m.If(event != 0):
            with m.If((err == 0) | self.clear):
                m.d.sync += [err.eq(event), err_pc.eq(cur_pc)]
        with m.Elif(self.clear):
            m.d.sync += [err.eq(0), err_pc.eq(0)]
        m.d.comb += [self.error.eq(err), self.error_pc.eq(err_pc)]
        unit_err_prev = Signal()
        m.d.sync += unit_err_prev.eq(u.error)

        c.update(fifo=fifo, cur=cur, cur_pc=cur_pc, sp=sp, sl=sl, err=err, event=event, unit_err_prev=unit_err_prev)

    def _checks(self, m, c):
        """The SPIM and SLOAD checks, combinational over products the dispatcher registers in its check states."""
        M, R, W, lgM, sl, sp, spm_bf16, spm_f32 = c.M, c.R, c.W, c.lgM, c.sl, c.sp, c.spm_bf16, c.spm_f32
        pv = sp["mode"][0]
        heads_m1 = Mux(sp["heads"] == 0, 0, sp["heads"] - 1)[0:8]
        groups = Signal(21)
        m.d.comb += groups.eq((sp["count"] + (M - 1)) >> lgM)
        prod_stride = Signal(24)
        prod_in = Signal(32)
        prod_out = Signal(32)
        last_row = Signal(26)
        m.d.comb += last_row.eq(sp["base"] + prod_stride + groups - 1)
        in_end = Signal(40)
        out_end = Signal(40)
        m.d.comb += [
            in_end.eq(((sp["spm_in"] + prod_in) << 4) + Mux(pv, groups << lgM, W)),
            out_end.eq(((sp["spm_out"] + prod_out) << 3) + Mux(pv, W, sp["count"])),
        ]
        spim_bad = ((sp["count"] == 0) | (sp["heads"] == 0) | (sp["base"] >= R) | (sp["stride"] >= R)
                    | (last_row >= R))
        spm_bad = (in_end > spm_bf16) | (out_end > spm_f32)

        # ---------------- SLOAD checks ----------------
        reg_m1 = Mux(sl["regions"] == 0, 0, sl["regions"] - 1)[0:8]
        pos_m1 = Mux(sl["positions"] == 0, 0, sl["positions"] - 1)[0:16]
        prod_line = Signal(28)
        prod_reg = Signal(40)
        prod_pos = Signal(40)
        last_line = Signal(30)
        mem_end = Signal(44)
        m.d.comb += [last_line.eq(sl["line"] + prod_line + pos_m1),
                     mem_end.eq(sl["mem_addr"] + prod_reg + prod_pos + (sl["cols"] << 5))]

        c.update(pv=pv, heads_m1=heads_m1, groups=groups, prod_stride=prod_stride, prod_in=prod_in, prod_out=prod_out,
                 spim_bad=spim_bad, spm_bad=spm_bad, reg_m1=reg_m1, pos_m1=pos_m1, prod_line=prod_line,
                 prod_reg=prod_reg, prod_pos=prod_pos, last_line=last_line, mem_end=mem_end)

    def _operand_reader(self, m, c):
        """The operand reader: scratchpad beats into the unit's operand FIFO (``rd_start`` arms it)."""
        B, Lm, M, R, g, lgL, lgM, row_bf16, spm_bf16, u, sp, pv, groups = (
            c.B, c.Lm, c.M, c.R, c.g, c.lgL, c.lgM, c.row_bf16, c.spm_bf16, c.u, c.sp, c.pv, c.groups)
        rd_left = Signal(range(255 * max(B, R) + 1))     # beats still to read
        rd_pv = Signal()
        rd_head = Signal(range(spm_bf16 * 512))         # BF16 index of the head's operand
        rd_off = Signal(range(spm_bf16 * 512))          # BF16 index of the next beat
        rd_k = Signal(range(max(B, R) + 1))             # beats of this head read
        rd_per_head = Signal(range(max(B, R) + 1))
        rd_pitch = Signal(32)
        ofifo = m.submodules.operands = SyncFIFOBuffered(width=16 * Lm, depth=4)
        pending = Signal()
        pend_pv = Signal()
        pend_slot_qk = Signal(max(1, log2(row_bf16 // Lm)))
        pend_slot_pv = Signal(max(1, log2(row_bf16 // M)))
        rd_issue = Signal()
        m.d.comb += rd_issue.eq((rd_left != 0) & (ofifo.level + pending < 3))
        m.d.comb += [self.spm_rd.addr.eq((rd_off >> log2(row_bf16))[0:g.row_addr_bits]),
                     self.spm_rd.en.eq(rd_issue)]
        m.d.sync += pending.eq(rd_issue)
        with m.If(rd_issue):
            in_row = rd_off & (row_bf16 - 1)
            m.d.sync += [pend_pv.eq(rd_pv), rd_left.eq(rd_left - 1)]
            if row_bf16 > Lm:
                m.d.sync += pend_slot_qk.eq(in_row >> lgL)
            if row_bf16 > M:
                m.d.sync += pend_slot_pv.eq(in_row >> lgM)
            with m.If(rd_k + 1 == rd_per_head):
                m.d.sync += [rd_k.eq(0), rd_head.eq(rd_head + rd_pitch), rd_off.eq(rd_head + rd_pitch)]
            with m.Else():
                m.d.sync += [rd_k.eq(rd_k + 1), rd_off.eq(rd_off + Mux(rd_pv, M, Lm))]
        qk_beat = self.spm_rd.data.word_select(pend_slot_qk, 16 * Lm) if row_bf16 > Lm else self.spm_rd.data
        pv_beat = self.spm_rd.data.word_select(pend_slot_pv, 16 * M) if row_bf16 > M else self.spm_rd.data
        m.d.comb += [ofifo.w_en.eq(pending),
                     ofifo.w_data.eq(Mux(pend_pv, pv_beat[:16 * M], qk_beat[:16 * Lm])),
                     u.i.valid.eq(ofifo.r_rdy), u.i.payload.eq(ofifo.r_data), ofifo.r_en.eq(u.i.ready)]

        rd_start = [rd_left.eq(sp["heads"] * Mux(pv, groups, B)), rd_pv.eq(pv),
                    rd_head.eq(sp["spm_in"] << 4), rd_off.eq(sp["spm_in"] << 4), rd_k.eq(0),
                    rd_per_head.eq(Mux(pv, groups, B)), rd_pitch.eq(sp["in_pitch"] << 4)]
        c.update(rd_start=rd_start)

    def _result_writer(self, m, c):
        """The result writer: the unit's result beats into the scratchpad (``wr_start`` arms it)."""
        Lm, M, g, lgL, lgM, row_f32, spm_f32, u, sp, pv = (
            c.Lm, c.M, c.g, c.lgL, c.lgM, c.row_f32, c.spm_f32, c.u, c.sp, c.pv)
        wr_pv = Signal()
        wr_head = Signal(range(spm_f32 * 512))          # FP32 index of the head's results
        wr_off = Signal(range(spm_f32 * 512))
        wr_pitch = Signal(32)
        wr_heads = Signal(9)                            # heads written
        o = u.o
        k_qk, k_pv = M, Lm
        idx = wr_off & (row_f32 - 1)
        slot_qk = idx >> lgM
        slot_pv = idx >> lgL
        en_qk = []
        en_pv = []
        for s_ in range(row_f32 // k_qk):
            for lane in range(k_qk):
                en_qk.append((slot_qk == s_) & (lane < o.payload.n))
        for s_ in range(row_f32 // k_pv):
            en_pv += [slot_pv == s_] * k_pv
        en = Mux(wr_pv, Cat(*[Cat(e, e) for e in en_pv]), Cat(*[Cat(e, e) for e in en_qk]))
        dat = o.payload.data.as_value()
        m.d.comb += [
            self.spm_wr.addr.eq((wr_off >> log2(row_f32))[0:g.row_addr_bits]),
            self.spm_wr.data.eq(Mux(wr_pv, Cat(*[dat[:32 * k_pv]] * (row_f32 // k_pv)),
                                    Cat(*[dat[:32 * k_qk]] * (row_f32 // k_qk)))),
            self.spm_wr.en.eq(Mux(o.valid, en, 0)),
            o.ready.eq(self.spm_wr_ready),
        ]
        with m.If(o.valid & o.ready):
            with m.If(o.payload.last):
                m.d.sync += [wr_head.eq(wr_head + wr_pitch), wr_off.eq(wr_head + wr_pitch),
                             wr_heads.eq(wr_heads + 1)]
            with m.Else():
                m.d.sync += wr_off.eq(wr_off + Mux(wr_pv, k_pv, k_qk))

        wr_start = [wr_pv.eq(pv), wr_head.eq(sp["spm_out"] << 3), wr_off.eq(sp["spm_out"] << 3),
                    wr_pitch.eq(sp["out_pitch"] << 3), wr_heads.eq(0)]
        c.update(wr_start=wr_start, wr_heads=wr_heads, o=o)

    def _sload_engine(self, m, c):
        """The SLOAD engine: reads in flight, lines assembled from the responses (``ld_start`` arms it)."""
        aw, cols_per_line, max_out, u, sl = c.aw, c.cols_per_line, c.max_out, c.u, c.sl
        req, resp = self.mem.req, self.mem.resp
        ld_busy = Signal()
        ld_stop = Signal()
        ld_err = Signal()
        ld_done = Signal()              # the generator has issued everything
        g_r = Signal(8)
        g_p = Signal(16)
        g_c = Signal(8)
        g_reg = Signal(aw)
        g_pos = Signal(aw)
        g_col = Signal(aw)
        h_r = Signal(8)
        h_p = Signal(16)
        h_c = Signal(8)
        h_line_reg = Signal(21)
        h_line = Signal(21)
        seq = Signal(SEQ_BITS)
        h_seq = Signal(SEQ_BITS)
        outstanding = Signal(range(max_out + 1))
        f_cols = Signal(8)
        f_pos = Signal(16)
        f_reg = Signal(8)
        f_ps = Signal(aw)
        f_rs = Signal(aw)
        f_ls = Signal(20)
        issue = Signal()
        m.d.comb += [issue.eq(ld_busy & ~ld_done & ~ld_stop & (outstanding < max_out)),
                     req.valid.eq(issue), req.payload.addr.eq(g_col), req.payload.write.eq(0),
                     req.payload.mask.eq(0), req.payload.data.eq(0), req.payload.tag.eq(seq)]
        accepted = req.valid & req.ready
        with m.If(accepted):
            m.d.sync += seq.eq(seq + 1)
            with m.If(g_c + 1 == f_cols):
                m.d.sync += g_c.eq(0)
                with m.If(g_p + 1 == f_pos):
                    m.d.sync += [g_p.eq(0), g_r.eq(g_r + 1), g_reg.eq(g_reg + f_rs), g_pos.eq(g_reg + f_rs),
                                 g_col.eq(g_reg + f_rs)]
                    with m.If(g_r + 1 == f_reg):
                        m.d.sync += ld_done.eq(1)
                with m.Else():
                    m.d.sync += [g_p.eq(g_p + 1), g_pos.eq(g_pos + f_ps), g_col.eq(g_pos + f_ps)]
            with m.Else():
                m.d.sync += [g_c.eq(g_c + 1), g_col.eq(g_col + 32)]
        m.d.comb += resp.ready.eq(1)
        got = resp.valid
        bad = resp.payload.error | (resp.payload.tag[0:SEQ_BITS] != h_seq) | resp.payload.write
        line_buf = [Signal(256, name=f"line_buf{k}") for k in range(cols_per_line)]
        line_val = []
        for k in range(cols_per_line):
            line_val.append(Mux(h_c == k, resp.payload.data, Mux(h_c == 0, 0, line_buf[k])))
        m.d.sync += outstanding.eq(outstanding + accepted - got)
        with m.If(got):
            m.d.sync += h_seq.eq(h_seq + 1)
            with m.If(ld_busy & bad):
                m.d.sync += [ld_stop.eq(1), ld_err.eq(1)]
            for k in range(cols_per_line):
                m.d.sync += line_buf[k].eq(line_val[k])
            with m.If(h_c + 1 == f_cols):
                m.d.sync += h_c.eq(0)
                with m.If(h_p + 1 == f_pos):
                    m.d.sync += [h_p.eq(0), h_r.eq(h_r + 1), h_line_reg.eq(h_line_reg + f_ls),
                                 h_line.eq(h_line_reg + f_ls)]
                with m.Else():
                    m.d.sync += [h_p.eq(h_p + 1), h_line.eq(h_line + 1)]
            with m.Else():
                m.d.sync += h_c.eq(h_c + 1)
        m.d.comb += [u.wr.valid.eq(ld_busy & got & ~bad & ~ld_stop & (h_c + 1 == f_cols)),
                     u.wr.payload.line.eq(h_line), u.wr.payload.data.eq(Cat(*line_val))]
        ld_fin = ld_busy & (ld_done | ld_stop) & (outstanding == 0)

        ld_start = [ld_busy.eq(1), ld_stop.eq(0), ld_err.eq(0), ld_done.eq(0), g_r.eq(0), g_p.eq(0), g_c.eq(0),
                    g_reg.eq(sl["mem_addr"]), g_pos.eq(sl["mem_addr"]), g_col.eq(sl["mem_addr"]),
                    h_r.eq(0), h_p.eq(0), h_c.eq(0), h_line_reg.eq(sl["line"]), h_line.eq(sl["line"]),
                    seq.eq(0), h_seq.eq(0), f_cols.eq(sl["cols"]), f_pos.eq(sl["positions"]),
                    f_reg.eq(sl["regions"]), f_ps.eq(sl["pos_stride"]), f_rs.eq(sl["region_stride"]),
                    f_ls.eq(sl["line_stride"])]
        c.update(ld_start=ld_start, ld_busy=ld_busy, ld_err=ld_err, ld_fin=ld_fin)

    def _dispatcher(self, m, c):
        """The dispatcher (one instruction at a time: take, check, run), busy and the counters."""
        u, fifo, cur, cur_pc, err, event, unit_err_prev = (
            c.u, c.fifo, c.cur, c.cur_pc, c.err, c.event, c.unit_err_prev)
        sp, sl, pv, heads_m1, reg_m1, pos_m1 = c.sp, c.sl, c.pv, c.heads_m1, c.reg_m1, c.pos_m1
        prod_stride, prod_in, prod_out, prod_line, prod_reg, prod_pos = (
            c.prod_stride, c.prod_in, c.prod_out, c.prod_line, c.prod_reg, c.prod_pos)
        spim_bad, spm_bad, last_line, mem_end, cols_per_line, aw = (
            c.spim_bad, c.spm_bad, c.last_line, c.mem_end, c.cols_per_line, c.aw)
        rd_start, wr_start, ld_start, wr_heads, o, ld_busy, ld_err, ld_fin = (
            c.rd_start, c.wr_start, c.ld_start, c.wr_heads, c.o, c.ld_busy, c.ld_err, c.ld_fin)
        finished = Signal()
        cmd = u.cmd.payload
        m.d.comb += [cmd.op.eq(Mux(pv, SramPimOp.PV, SramPimOp.QK)), cmd.base.eq(sp["base"]),
                     cmd.count.eq(sp["count"]), cmd.heads.eq(sp["heads"]), cmd.stride.eq(sp["stride"])]
        with m.FSM(name="dispatch") as fsm:
            with m.State("Idle"):
                m.d.comb += fifo.r_en.eq(1)
                with m.If(fifo.r_rdy):
                    m.d.sync += [cur.eq(fifo.r_data[:4 + SLOAD_BITS]), cur_pc.eq(fifo.r_data[4 + SLOAD_BITS:])]
                    code = fifo.r_data[0:4]
                    with m.If(err == 0):
                        with m.If(code == SocOp.SPIM):
                            m.next = "Spim-Check"
                        with m.Elif(code == SocOp.SLOAD):
                            m.next = "Sload-Check"
            with m.State("Spim-Check"):
                m.d.sync += [prod_stride.eq(heads_m1 * sp["stride"]), prod_in.eq(heads_m1 * sp["in_pitch"]),
                             prod_out.eq(heads_m1 * sp["out_pitch"])]
                m.next = "Spim-Decide"
            with m.State("Spim-Decide"):
                with m.If(spim_bad):
                    m.d.comb += [event.eq(SpuError.BAD_COMMAND), finished.eq(1)]
                    m.next = "Idle"
                with m.Elif(spm_bad):
                    m.d.comb += [event.eq(SpuError.SPM), finished.eq(1)]
                    m.next = "Idle"
                with m.Else():
                    m.d.sync += [*rd_start, *wr_start]
                    m.next = "Spim-Issue"
            with m.State("Spim-Issue"):
                m.d.comb += u.cmd.valid.eq(1)
                with m.If(u.cmd.ready):
                    m.next = "Spim-Run"
            with m.State("Spim-Run"):
                with m.If(wr_heads == sp["heads"]):
                    m.d.comb += finished.eq(1)
                    m.next = "Idle"
            with m.State("Sload-Check"):
                m.d.sync += [prod_line.eq(reg_m1 * sl["line_stride"]), prod_reg.eq(reg_m1 * sl["region_stride"]),
                             prod_pos.eq(pos_m1 * sl["pos_stride"])]
                m.next = "Sload-Decide"
            with m.State("Sload-Decide"):
                with m.If((sl["regions"] == 0) | (sl["positions"] == 0) | (sl["cols"] == 0)
                          | (sl["cols"] > cols_per_line)):
                    m.d.comb += [event.eq(SpuError.SLOAD_SIZE), finished.eq(1)]
                    m.next = "Idle"
                with m.Elif((sl["mem_addr"][0:5] != 0) | (sl["pos_stride"][0:5] != 0)
                            | (sl["region_stride"][0:5] != 0)):
                    m.d.comb += [event.eq(SpuError.SLOAD_ALIGN), finished.eq(1)]
                    m.next = "Idle"
                with m.Elif(last_line >= u.lines):
                    m.d.comb += [event.eq(SpuError.SLOAD_LINE), finished.eq(1)]
                    m.next = "Idle"
                with m.Elif(mem_end > (1 << aw)):
                    m.d.comb += [event.eq(SpuError.SLOAD_MEM), finished.eq(1)]
                    m.next = "Idle"
                with m.Else():
                    m.d.sync += ld_start
                    m.next = "Sload-Run"
            with m.State("Sload-Run"):
                with m.If(ld_fin):
                    m.d.sync += ld_busy.eq(0)
                    m.d.comb += [event.eq(Mux(ld_err, SpuError.SLOAD_MEM, 0)), finished.eq(1)]
                    m.next = "Idle"
        with m.If(u.error & ~unit_err_prev):
            m.d.comb += event.eq(SpuError.UNIT)

        busy = Signal()
        m.d.comb += [busy.eq((fifo.level != 0) | ~fsm.ongoing("Idle") | u.busy), self.busy.eq(busy)]
        cnt = self.counters
        events = {"busy": busy, "compute": u.busy, "load": ld_busy, "spm_stall": o.valid & ~o.ready,
                  "instructions": finished}
        count_events(m, cnt, self.clear, events)
