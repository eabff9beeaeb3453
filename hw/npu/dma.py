"""DMA engines between device memory and the matrix unit's scratchpads.

Both engines speak the unified memory's normal-request interface
(:class:`hw.memif.MemPortSignature`): 32-byte column requests, one response per
request. They keep at most ``max_outstanding`` requests in flight and rely on
responses returning **in request order** (the memory model and, per requester,
the memory controller guarantee it); the low seven tag bits carry a sequence
number that the engines check (``ErrorCode.MEM_ORDER`` otherwise). The eighth
tag bit belongs to :class:`MemArbiter`, which merges the two engines onto one
port and routes responses back by it.

:class:`DmaLoad`
    ``LOAD``: memory tile ``rows x cols`` (BF16, row ``r`` at
    ``mem_addr + r * mem_stride``) into the activation or weight scratchpad,
    in the layout of :mod:`hw.spec.matrix_isa`; lanes past ``cols`` are written as
    zero. Non-transposed, one memory column holds ``16 / W`` scratchpad words
    (``W`` lanes each), written one per cycle; at ``W = 16`` this is one
    column per cycle, the memory's rate. Transposed, the engine gathers ``W``
    rows of one column (a ``W x 16`` block) into one of two ``W x 16``
    buffers while it writes the 16 scratchpad words of the previous block's
    transpose from the other, one per cycle: with one response per cycle,
    ``max(W, 16)`` cycles per block (32 bytes per cycle at ``W = 16``), plus
    the memory latency and the last block's 16 words. The response stream is
    held (``resp.ready`` low) while both buffers are full.
    Two LOADs in flight: the request generator takes the next LOAD as soon as it
    has issued every request of the current one (a pending slot holds the next
    LOAD's scratchpad side), so its requests follow the previous ones without
    waiting for their responses; the response handler takes it when it has
    written the previous LOAD's last word. Each LOAD still gives its tokens when
    its own last word is written, in order.
:class:`DmaStore`
    ``STORE``: accumulator tile ``rows x cols`` to memory as FP32 or rounded
    to BF16 (RNE, flush-to-zero, canonical NaN ``0x7FC0``), byte-masked at the
    right edge; one accumulator read per cycle, pieces of ``min(C, E)``
    elements assembled into columns of ``E`` (8 FP32 or 16 BF16) elements.
"""

from amaranth.hdl import Cat, Module, Mux, Signal
from amaranth.lib import data, stream, wiring
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.lib.wiring import In, Out

from ..arith import fp32_to_bf16
from ..config import SystemConfig
from ..elab import Shared
from ..memif import MemPortSignature
from ..spec.matrix_isa import INSTRUCTION, N_SEMAPHORES, ErrorCode, Target
from .spm import SpmReadSignature, SpmWriteSignature

__all__ = ["DmaLoad", "DmaStore", "MemArbiter", "COLUMN_BYTES"]

COLUMN_BYTES = 32
COLUMN_ELEMS = 16   # BF16 elements per memory column
SEQ_BITS = 7


def _check_lanes(lanes):
    if not isinstance(lanes, int) or lanes < 1 or lanes > COLUMN_ELEMS or lanes & (lanes - 1):
        raise ValueError(f"DMA scratchpad word lanes must be a power of two of at most {COLUMN_ELEMS} "
                         f"(one memory column), not {lanes!r}")


class _DmaEngine(wiring.Component):
    """What both engines share: their parameters and the members other than the scratchpad port(s), which each
    engine adds (:meth:`_spm_members`) between ``mem`` and ``signal``.

    Parameters
    ----------
    cfg : SystemConfig
    lanes : int
        Lanes per scratchpad word, a power of two up to 16: BF16 lanes of an activation / weight word
        (``W``) for :class:`DmaLoad`, FP32 lanes of an accumulator word (``C``) for :class:`DmaStore`.
    max_outstanding : int
        Memory requests in flight at most.

    Members
    -------
    cmd : In(stream.Signature(INSTRUCTION))
        An instruction (a LOAD, a STORE) whose tokens have been taken; accepted when idle.
    mem : Out(MemPortSignature(cfg))
    signal : Out(N_SEMAPHORES)
        Tokens to give, for one cycle, when the instruction has finished.
    busy : Out(1)
    error : Out(ErrorCode)
        Error event (``NONE`` otherwise), one cycle per event.
    """

    def __init__(self, cfg: SystemConfig, lanes: int, max_outstanding: int):
        if not isinstance(cfg, SystemConfig):
            raise TypeError(f"Configuration must be a SystemConfig, not {cfg!r}")
        _check_lanes(lanes)
        self._cfg = cfg
        self.lanes = lanes
        self._max_out = max_outstanding
        super().__init__({
            "cmd": In(stream.Signature(INSTRUCTION)),
            "mem": Out(MemPortSignature(cfg)),
            **self._spm_members(),
            "signal": Out(N_SEMAPHORES),
            "busy": Out(1),
            "error": Out(ErrorCode),
        })

    def _spm_members(self) -> dict:
        raise NotImplementedError


class DmaLoad(_DmaEngine):
    """``LOAD`` engine: memory -> activation / weight scratchpad, optionally transposed.

    A transposed load is double-buffered: the response handler gathers block
    ``b + 1`` (``W`` rows of one memory column) into one ``W x 16`` buffer while
    the emitter writes block ``b``'s transpose from the other, so it runs at
    ``max(W, 16)`` cycles per block when memory answers every cycle.

    ``transpose_buffers`` (2) is that number of ``W x 16`` buffers; the
    performance model reads it.

    Parameters (``cfg``, ``lanes`` = ``W``, ``max_outstanding`` up to 64) and members as for every engine
    (``_DmaEngine``), and

    spm : Out(SpmWriteSignature(16, ArrayLayout(16, lanes)))
    spm_target : Out(Target)
    """

    transpose_buffers = 2

    def __init__(self, cfg: SystemConfig, lanes: int, max_outstanding: int = 32):
        if not isinstance(max_outstanding, int) or not 1 <= max_outstanding <= 64:
            raise ValueError(f"Outstanding requests must be an integer in [1, 64], not {max_outstanding!r}")
        super().__init__(cfg, lanes, max_outstanding)

    def _spm_members(self) -> dict:
        return {"spm": Out(SpmWriteSignature(16, data.ArrayLayout(16, self.lanes))), "spm_target": Out(Target)}

    def elaborate(self, platform):
        # The parts below share their signals through ``c`` (:class:`hw.elab.Shared`), in this order.
        m = Module()
        W = self.lanes
        ppc = COLUMN_ELEMS // W                  # scratchpad words per memory column
        log_w = W.bit_length() - 1

        # The response handler's instruction (``h_act``: it has one) ...
        h_act = Signal()
        transpose = Signal()
        target = Signal(Target)
        rows = Signal(16)
        cols = Signal(16)
        spm_addr = Signal(16)
        spm_stride = Signal(16)
        sig = Signal(N_SEMAPHORES)
        ncol = Signal(13)                         # memory columns per tile row
        blk = Signal(range(W + 1))                # tile rows per request block (1, or W transposed)
        # ... the request generator's (``g_done`` high: idle, every request issued) ...
        g_ncol = Signal(13)
        g_blk = Signal(range(W + 1))
        g_stride = Signal(24)
        g_blk_step = Signal(40)                   # blk * mem_stride
        # ... and the pending one, accepted while the handler still has the previous instruction's responses
        # to take: the generator issues its requests behind the previous instruction's (two LOADs in flight)
        pend = Signal()
        p_regs = dict(transpose=Signal(name="p_transpose"), target=Signal(Target, name="p_target"),
                      rows=Signal(16, name="p_rows"), cols=Signal(16, name="p_cols"),
                      spm_addr=Signal(16, name="p_spm_addr"), spm_stride=Signal(16, name="p_spm_stride"),
                      sig=Signal(N_SEMAPHORES, name="p_sig"), ncol=Signal(13, name="p_ncol"),
                      blk=Signal(range(W + 1), name="p_blk"))

        c = Shared(W=W, ppc=ppc, log_w=log_w, h_act=h_act, transpose=transpose, target=target,
                   rows=rows, cols=cols, spm_addr=spm_addr, spm_stride=spm_stride, sig=sig, ncol=ncol, blk=blk,
                   g_ncol=g_ncol, g_blk=g_blk, g_stride=g_stride, g_blk_step=g_blk_step, pend=pend, p_regs=p_regs)
        self._requests(m, c)
        m.d.comb += [self.busy.eq(h_act | pend | ~c.g_done), self.spm_target.eq(target),
                     self.cmd.ready.eq(c.g_done & ~pend)]
        self._response_handler(m, c)
        self._finish(m, c)
        return m

    def _requests(self, m, c):
        """The request generator: for block b, column mc, row w of the block."""
        (g_blk_base, g_row_addr, g_mc_off, g_mc, g_w, g_rows_left, g_done, outstanding,
         issued) = self._request_generator(m, c.g_blk, c.g_ncol, c.g_stride, c.g_blk_step)

        c.update(g_blk_base=g_blk_base, g_row_addr=g_row_addr, g_mc_off=g_mc_off, g_mc=g_mc, g_w=g_w,
                 g_rows_left=g_rows_left, g_done=g_done, outstanding=outstanding, issued=issued)

    def _response_handler(self, m, c):
        """The response handler, mirroring the same loops: pieces into the scratchpad, or (transposed) a
        block's rows gathered into a W x 16 buffer for the emitter."""
        W, blk, busy, cols, ncol = c.W, c.blk, c.h_act, c.cols, c.ncol
        ppc, spm_stride, transpose = c.ppc, c.spm_stride, c.transpose
        resp = self.mem.resp
        h_mc = Signal(13)
        h_w = Signal(range(W + 1))
        h_rows_left = Signal(17)
        h_done = Signal()
        h_seq = Signal(SEQ_BITS)
        h_nrows = Mux(h_rows_left < blk, h_rows_left, blk)
        # non-transposed addressing
        h_row_spm = Signal(16)                    # spm_addr + r
        h_piece_addr = Signal(16)                 # spm_addr + c * spm_stride + r
        h_elem = Signal(17)                       # c * W
        h_q = Signal(range(max(ppc, 2)))          # piece within the column
        # transposed: two W x 16 buffers; the handler gathers a block's rows of one
        # column into buffer ``t_wsel`` while the emitter writes the transpose of
        # the other, ``t_rsel``, one scratchpad word per cycle
        h_tbase = Signal(16)                      # spm_addr + b * spm_stride
        h_mc_elem = Signal(17)                    # mc * 16
        tbuf = [Signal(data.ArrayLayout(COLUMN_BYTES * 8, W), name=f"tbuf{i}") for i in range(2)]
        t_full = Signal(2)                        # buffer gathered, not yet emitted
        t_wsel = Signal()
        t_rsel = Signal()
        t_rows = [Signal(range(W + 1), name=f"t_rows{i}") for i in range(2)]     # valid lanes
        t_base = [Signal(16, name=f"t_base{i}") for i in range(2)]               # first word's address
        t_last = [Signal(4, name=f"t_last{i}") for i in range(2)]                # last word index
        e_idx = Signal(range(COLUMN_ELEMS))

        spm = self.spm
        resp_ready = Signal()
        m.d.comb += resp.ready.eq(resp_ready)

        def advance_loops():
            with m.If(h_w + 1 < h_nrows):
                m.d.sync += h_w.eq(h_w + 1)
            with m.Else():
                m.d.sync += h_w.eq(0)
                with m.If(h_mc + 1 < ncol):
                    m.d.sync += h_mc.eq(h_mc + 1)
                with m.Else():
                    m.d.sync += [h_mc.eq(0), h_rows_left.eq(h_rows_left - blk)]
                    with m.If(h_rows_left <= blk):
                        m.d.sync += h_done.eq(1)

        err_evt = Signal(ErrorCode)
        with m.If(resp.valid & resp.ready):
            m.d.sync += h_seq.eq(h_seq + 1)
            with m.If(resp.payload.error):
                m.d.comb += err_evt.eq(ErrorCode.MEM_ERROR)
            with m.Elif(resp.payload.tag[:SEQ_BITS] != h_seq):
                m.d.comb += err_evt.eq(ErrorCode.MEM_ORDER)
        m.d.comb += self.error.eq(err_evt)

        with m.If(busy & ~h_done):
            with m.If(~transpose):
                # One piece (scratchpad word) of the response column per cycle.
                piece = resp.payload.data.word_select(h_q, W * 16) if ppc > 1 else resp.payload.data
                last_piece = (h_elem + W >= cols) | (h_q == ppc - 1)
                with m.If(resp.valid):
                    m.d.comb += [spm.en.eq(1), spm.addr.eq(h_piece_addr), resp_ready.eq(last_piece)]
                    for lane in range(W):
                        m.d.comb += spm.data[lane].eq(Mux(h_elem + lane < cols, piece[lane * 16:(lane + 1) * 16], 0))
                    with m.If(last_piece):
                        m.d.sync += h_q.eq(0)
                        with m.If(h_mc + 1 < ncol):
                            m.d.sync += [h_piece_addr.eq(h_piece_addr + spm_stride), h_elem.eq(h_elem + W)]
                        with m.Else():   # next tile row
                            m.d.sync += [h_row_spm.eq(h_row_spm + 1), h_piece_addr.eq(h_row_spm + 1),
                                         h_elem.eq(0)]
                        advance_loops()
                    with m.Else():
                        m.d.sync += [h_q.eq(h_q + 1), h_piece_addr.eq(h_piece_addr + spm_stride),
                                     h_elem.eq(h_elem + W)]
            with m.Else():
                # Transposed: gather the block's rows of one column into a free buffer.
                w_free = ~Mux(t_wsel, t_full[1], t_full[0])
                m.d.comb += resp_ready.eq(w_free)
                with m.If(resp.valid & w_free):
                    for i in range(2):
                        with m.If(t_wsel == i):
                            with m.Switch(h_w):
                                for w in range(W):
                                    with m.Case(w):
                                        m.d.sync += tbuf[i][w].eq(resp.payload.data)
                    with m.If(h_w + 1 >= h_nrows):
                        rem = cols - h_mc_elem            # > 0: mc < ncol
                        for i in range(2):
                            with m.If(t_wsel == i):
                                m.d.sync += [t_full[i].eq(1), t_rows[i].eq(h_nrows),
                                             t_base[i].eq(h_tbase + h_mc_elem),
                                             t_last[i].eq(Mux(rem > COLUMN_ELEMS, COLUMN_ELEMS - 1, rem - 1))]
                        m.d.sync += [t_wsel.eq(~t_wsel), h_w.eq(0)]
                        with m.If(h_mc + 1 < ncol):
                            m.d.sync += [h_mc.eq(h_mc + 1), h_mc_elem.eq(h_mc_elem + COLUMN_ELEMS)]
                        with m.Else():
                            m.d.sync += [h_mc.eq(0), h_mc_elem.eq(0), h_tbase.eq(h_tbase + spm_stride),
                                         h_rows_left.eq(h_rows_left - blk)]
                            with m.If(h_rows_left <= blk):
                                m.d.sync += h_done.eq(1)
                    with m.Else():
                        m.d.sync += h_w.eq(h_w + 1)

        self._emit_transposed(m, busy & transpose, tbuf, t_full, t_rsel, t_rows, t_base, t_last, e_idx)

        c.update(resp=resp, h_mc=h_mc, h_w=h_w, h_rows_left=h_rows_left, h_done=h_done, h_row_spm=h_row_spm,
                 h_piece_addr=h_piece_addr, h_elem=h_elem, h_q=h_q, h_tbase=h_tbase, h_mc_elem=h_mc_elem,
                 t_full=t_full, t_wsel=t_wsel, t_rsel=t_rsel, e_idx=e_idx)

    def _finish(self, m, c):
        """The outstanding count; accepting an instruction (the generator at once, the handler at once when it
        is free or finishing, else through the pending slot); the handler's finish."""
        W, log_w, h_act, outstanding, resp, pend, p_regs = c.W, c.log_w, c.h_act, c.outstanding, c.resp, c.pend, c.p_regs
        consumed = resp.valid & resp.ready
        m.d.sync += outstanding.eq(outstanding + c.issued - consumed)

        finish = Signal()
        m.d.comb += finish.eq(h_act & c.h_done & (c.t_full == 0))
        with m.If(finish):
            m.d.sync += h_act.eq(0)
            m.d.comb += self.signal.eq(c.sig)

        accept = self.cmd.valid & self.cmd.ready
        h = self.cmd.payload.header
        b = self.cmd.payload.body.dma
        t = h.transpose
        new = dict(transpose=t, target=h.target, rows=b.rows, cols=b.cols, spm_addr=b.spm_addr,
                   spm_stride=b.spm_stride, sig=h.signal, ncol=(b.cols + COLUMN_ELEMS - 1) >> 4, blk=Mux(t, W, 1))
        with m.If(accept):
            m.d.sync += [
                c.g_ncol.eq(new["ncol"]), c.g_blk.eq(new["blk"]), c.g_stride.eq(b.mem_stride),
                c.g_blk_step.eq(Mux(t, b.mem_stride << log_w, b.mem_stride)),
                c.g_blk_base.eq(b.mem_addr), c.g_row_addr.eq(b.mem_addr), c.g_mc_off.eq(0), c.g_mc.eq(0),
                c.g_w.eq(0), c.g_rows_left.eq(b.rows), c.g_done.eq(0),
            ]
        # The handler takes the pending instruction, or the accepted one when nothing is pending.
        h_free = ~h_act | finish
        take = h_free & (pend | accept)
        with m.If(take):
            src = {k: Mux(pend, p_regs[k], v) for k, v in new.items()}
            m.d.sync += [h_act.eq(1)] + [getattr(c, k).eq(v) for k, v in src.items()] + [
                c.h_mc.eq(0), c.h_w.eq(0), c.h_rows_left.eq(src["rows"]), c.h_done.eq(0),
                c.h_row_spm.eq(src["spm_addr"]), c.h_piece_addr.eq(src["spm_addr"]), c.h_elem.eq(0), c.h_q.eq(0),
                c.h_tbase.eq(src["spm_addr"]), c.h_mc_elem.eq(0),
                c.t_full.eq(0), c.t_wsel.eq(0), c.t_rsel.eq(0), c.e_idx.eq(0),
            ]
        with m.If(accept & ~(h_free & ~pend)):          # the handler is busy (or takes the pending one)
            m.d.sync += [pend.eq(1)] + [p_regs[k].eq(v) for k, v in new.items()]
        with m.Elif(take):
            m.d.sync += pend.eq(0)

    def _request_generator(self, m, blk, ncol, mem_stride, blk_step):
        """Read requests: for block b (``blk`` tile rows, ``blk_step`` bytes), memory column mc (of ``ncol``),
        row w of the block; at most ``max_outstanding`` in flight (of this and the previous instruction).
        Returns its registers (the start sets them; ``g_done`` high: every request issued, or idle),
        ``outstanding`` and ``issued`` (a request taken this cycle)."""
        W = self.lanes
        g_blk_base = Signal(40)
        g_row_addr = Signal(40)
        g_mc_off = Signal(24)
        g_mc = Signal(13)
        g_w = Signal(range(W + 1))
        g_rows_left = Signal(17)
        g_done = Signal(init=1)
        seq = Signal(SEQ_BITS)
        outstanding = Signal(range(self._max_out + 1))

        g_nrows = Mux(g_rows_left < blk, g_rows_left, blk)
        req = self.mem.req
        m.d.comb += [
            req.valid.eq(~g_done & (outstanding < self._max_out)),
            req.payload.addr.eq(g_row_addr + g_mc_off),
            req.payload.write.eq(0),
            req.payload.mask.eq(0),
            req.payload.tag.eq(seq),
        ]
        issued = req.valid & req.ready
        with m.If(issued):
            m.d.sync += seq.eq(seq + 1)
            with m.If(g_w + 1 < g_nrows):
                m.d.sync += [g_w.eq(g_w + 1), g_row_addr.eq(g_row_addr + mem_stride)]
            with m.Else():
                m.d.sync += g_w.eq(0)
                with m.If(g_mc + 1 < ncol):
                    m.d.sync += [g_mc.eq(g_mc + 1), g_mc_off.eq(g_mc_off + COLUMN_BYTES),
                                 g_row_addr.eq(g_blk_base)]
                with m.Else():
                    m.d.sync += [g_mc.eq(0), g_mc_off.eq(0),
                                 g_blk_base.eq(g_blk_base + blk_step), g_row_addr.eq(g_blk_base + blk_step),
                                 g_rows_left.eq(g_rows_left - blk)]
                    with m.If(g_rows_left <= blk):
                        m.d.sync += g_done.eq(1)
        return g_blk_base, g_row_addr, g_mc_off, g_mc, g_w, g_rows_left, g_done, outstanding, issued

    def _emit_transposed(self, m, active, tbuf, t_full, t_rsel, t_rows, t_base, t_last, e_idx):
        """Transposed load: write element column ``e_idx`` of the gathered buffer ``t_rsel`` as one scratchpad
        word per cycle; the buffer is free again after its last column."""
        W = self.lanes
        spm = self.spm
        with m.If(active):
            r_full = Mux(t_rsel, t_full[1], t_full[0])
            r_rows = Mux(t_rsel, t_rows[1], t_rows[0])
            r_last = Mux(t_rsel, t_last[1], t_last[0])
            with m.If(r_full):
                m.d.comb += [spm.en.eq(1), spm.addr.eq(Mux(t_rsel, t_base[1], t_base[0]) + e_idx)]
                for w in range(W):
                    lane = Mux(t_rsel, tbuf[1][w], tbuf[0][w]).word_select(e_idx, 16)
                    m.d.comb += spm.data[w].eq(Mux(w < r_rows, lane, 0))
                with m.If(e_idx == r_last):
                    m.d.sync += [e_idx.eq(0), t_rsel.eq(~t_rsel)]
                    for i in range(2):
                        with m.If(t_rsel == i):
                            m.d.sync += t_full[i].eq(0)
                with m.Else():
                    m.d.sync += e_idx.eq(e_idx + 1)


class DmaStore(_DmaEngine):
    """``STORE`` engine: accumulator scratchpad -> memory, FP32 or BF16.

    Parameters (``cfg``, ``lanes`` = ``C``, ``max_outstanding``) and members as for every engine
    (``_DmaEngine``), and

    acc_addr_bits : int
        Address width of the accumulator scratchpad.
    acc : Out(SpmReadSignature(acc_addr_bits, ArrayLayout(32, lanes)))
    """

    FIFO_DEPTH = 4

    def __init__(self, cfg: SystemConfig, lanes: int, acc_addr_bits: int, max_outstanding: int = 32):
        self._acc_addr_bits = acc_addr_bits
        super().__init__(cfg, lanes, max_outstanding)

    def _spm_members(self) -> dict:
        return {"acc": Out(SpmReadSignature(self._acc_addr_bits, data.ArrayLayout(32, self.lanes)))}

    def elaborate(self, platform):
        m = Module()
        C = self.lanes
        pf, pb = min(C, 8), min(C, 16)           # piece sizes (elements): FP32, BF16

        busy = Signal()
        bf16 = Signal()
        mem_stride = Signal(24)
        rows = Signal(16)
        cols = Signal(16)
        spm_stride = Signal(16)
        sig = Signal(N_SEMAPHORES)
        m.d.comb += [self.busy.eq(busy), self.cmd.ready.eq(~busy)]

        # ---- generator: one accumulator read per cycle ----
        g_r = Signal(16)
        g_e = Signal(17)                         # element index within the row
        g_row_word = Signal(16)                  # spm_addr + r
        g_word = Signal(16)                      # spm_addr + (e // C) * spm_stride + r
        g_row_mem = Signal(40)
        g_col_mem = Signal(40)
        g_done = Signal()

        piece = Mux(bf16, pb, pf)
        emask = Mux(bf16, 15, 7)                 # E - 1
        e_next = g_e + piece
        col_end = ((e_next & emask) == 0) | (e_next >= cols)
        word_end = (e_next & (C - 1)) == 0
        row_end = e_next >= cols

        fifo = m.submodules.fifo = SyncFIFOBuffered(width=40 + 256 + 32, depth=self.FIFO_DEPTH)
        p1_valid = Signal()
        p1_last = Signal()
        can_issue = busy & ~g_done & (fifo.level + (p1_valid & p1_last) < self.FIFO_DEPTH)
        m.d.comb += [self.acc.addr.eq(g_word), self.acc.en.eq(can_issue)]

        p1_lo = Signal(range(C))
        p1_pos = Signal(4)
        p1_first = Signal()
        p1_addr = Signal(40)
        p1_rem = Signal(17)                      # elements of the row from the column's start
        m.d.sync += p1_valid.eq(can_issue)
        with m.If(can_issue):
            m.d.sync += [
                p1_lo.eq(g_e & (C - 1)), p1_pos.eq(g_e & emask), p1_first.eq((g_e & emask) == 0),
                p1_last.eq(col_end), p1_addr.eq(g_col_mem), p1_rem.eq(cols - (g_e - (g_e & emask))),
            ]
            with m.If(row_end):
                m.d.sync += [g_r.eq(g_r + 1), g_e.eq(0), g_row_word.eq(g_row_word + 1),
                             g_word.eq(g_row_word + 1), g_row_mem.eq(g_row_mem + mem_stride),
                             g_col_mem.eq(g_row_mem + mem_stride)]
                with m.If(g_r + 1 >= rows):
                    m.d.sync += g_done.eq(1)
            with m.Else():
                m.d.sync += g_e.eq(e_next)
                with m.If(word_end):
                    m.d.sync += g_word.eq(g_word + spm_stride)
                with m.If(col_end):
                    m.d.sync += g_col_mem.eq(g_col_mem + COLUMN_BYTES)

        # ---- assembly: place the piece into the column ----
        word = self.acc.data
        fp_bits = Cat(*[word[i] for i in range(C)])
        bf_bits = Cat(*[fp32_to_bf16(word[i]) for i in range(C)])
        fp_piece = fp_bits.word_select(p1_lo >> (pf.bit_length() - 1), pf * 32) if C > pf else fp_bits
        bf_piece = bf_bits.word_select(p1_lo >> (pb.bit_length() - 1), pb * 16) if C > pb else bf_bits
        colbuf = Signal(256)
        placed = Signal(256)
        with m.If(bf16):
            with m.Switch(p1_pos >> (pb.bit_length() - 1)):
                for s in range(16 // pb):
                    with m.Case(s):
                        m.d.comb += placed.eq(bf_piece << (s * pb * 16))
        with m.Else():
            with m.Switch(p1_pos >> (pf.bit_length() - 1)):
                for s in range(8 // pf):
                    with m.Case(s):
                        m.d.comb += placed.eq(fp_piece << (s * pf * 32))
        assembled = Mux(p1_first, 0, colbuf) | placed
        mask = Signal(32)
        for byte in range(32):
            m.d.comb += mask[byte].eq(Mux(bf16, byte // 2 < p1_rem, byte // 4 < p1_rem))
        with m.If(p1_valid):
            m.d.sync += colbuf.eq(assembled)
        m.d.comb += [fifo.w_en.eq(p1_valid & p1_last), fifo.w_data.eq(Cat(p1_addr, assembled, mask))]

        # ---- write requests and their acknowledgements ----
        req, resp = self.mem.req, self.mem.resp
        seq = Signal(SEQ_BITS)
        a_seq = Signal(SEQ_BITS)
        pending = Signal(range(self._max_out + 1))
        m.d.comb += [
            req.valid.eq(fifo.r_rdy & (pending < self._max_out)),
            req.payload.addr.eq(fifo.r_data[0:40]),
            req.payload.data.eq(fifo.r_data[40:296]),
            req.payload.mask.eq(fifo.r_data[296:328]),
            req.payload.write.eq(1),
            req.payload.tag.eq(seq),
            fifo.r_en.eq(req.valid & req.ready),
            resp.ready.eq(1),
        ]
        issued = req.valid & req.ready
        acked = resp.valid
        m.d.sync += pending.eq(pending + issued - acked)
        with m.If(issued):
            m.d.sync += seq.eq(seq + 1)
        err_evt = Signal(ErrorCode)
        with m.If(acked):
            m.d.sync += a_seq.eq(a_seq + 1)
            with m.If(resp.payload.error):
                m.d.comb += err_evt.eq(ErrorCode.MEM_ERROR)
            with m.Elif((resp.payload.tag[:SEQ_BITS] != a_seq) | ~resp.payload.write):
                m.d.comb += err_evt.eq(ErrorCode.MEM_ORDER)
        m.d.comb += self.error.eq(err_evt)

        # Done when every column has left the FIFO and been acknowledged. ``fifo.level`` (not ``r_rdy``,
        # which rises a cycle after a write into the buffered FIFO) so that the last column, written in the
        # cycle ``p1_valid`` falls, is not left behind: the semaphore and ``busy`` must not announce a store
        # whose write has not even been requested (a FENCE then let another requester read the old data).
        with m.If(busy & g_done & ~p1_valid & (fifo.level == 0) & (pending == 0)):
            m.d.sync += busy.eq(0)
            m.d.comb += self.signal.eq(sig)

        with m.If(self.cmd.valid & self.cmd.ready):
            h = self.cmd.payload.header
            b = self.cmd.payload.body.dma
            m.d.sync += [
                busy.eq(1), bf16.eq(h.bf16), sig.eq(h.signal), mem_stride.eq(b.mem_stride),
                rows.eq(b.rows), cols.eq(b.cols), spm_stride.eq(b.spm_stride),
                g_r.eq(0), g_e.eq(0), g_row_word.eq(b.spm_addr), g_word.eq(b.spm_addr),
                g_row_mem.eq(b.mem_addr), g_col_mem.eq(b.mem_addr), g_done.eq(0),
            ]
        return m


class MemArbiter(wiring.Component):
    """Round-robin merge of two requesters onto one memory port.

    The top tag bit names the requester (0: ``a``, 1: ``b``); responses are
    routed back by it. Requesters use the low seven tag bits.

    Members
    -------
    a, b : In(MemPortSignature(cfg))
        Requesters (memory side of their ports).
    out : Out(MemPortSignature(cfg))
    """

    def __init__(self, cfg: SystemConfig):
        super().__init__({
            "a": In(MemPortSignature(cfg)),
            "b": In(MemPortSignature(cfg)),
            "out": Out(MemPortSignature(cfg)),
        })

    def elaborate(self, platform):
        m = Module()
        prefer_b = Signal()
        pick_b = Mux(self.a.req.valid & self.b.req.valid, prefer_b, self.b.req.valid)
        src_a, src_b, out = self.a.req, self.b.req, self.out.req
        m.d.comb += [
            out.valid.eq(src_a.valid | src_b.valid),
            out.payload.eq(Mux(pick_b, src_b.payload.as_value(), src_a.payload.as_value())),
            out.payload.tag[7].eq(pick_b),
            src_a.ready.eq(out.ready & ~pick_b),
            src_b.ready.eq(out.ready & pick_b),
        ]
        with m.If(out.valid & out.ready):
            m.d.sync += prefer_b.eq(~pick_b)
        resp = self.out.resp
        to_b = resp.payload.tag[7]
        for port, sel in ((self.a, ~to_b), (self.b, to_b)):
            m.d.comb += [port.resp.valid.eq(resp.valid & sel), port.resp.payload.eq(resp.payload)]
        m.d.comb += resp.ready.eq(Mux(to_b, self.b.resp.ready, self.a.resp.ready))
        return m
