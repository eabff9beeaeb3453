"""The SoC's vector queue: an instruction FIFO in front of the vector unit and a vector DMA engine.

::

    instr (256-bit SoC instructions: VECTOR / VLOAD / VSTORE)
      |
      v
    FIFO (queue_depth) --> dispatcher: one instruction at a time, in program order
                              |                         |
                              v VECTOR                  v VLOAD / VSTORE
                         VectorUnit               VectorDma ---- mem (MemPortSignature)
                              |  rd_a rd_b wr           |  read (VSTORE) / write (VLOAD)
                              +-----------+-------------+
                                          v
                        vector scratchpad (one lib.memory, 2 R + 1 W)

Instructions
------------
The queue takes the whole 256-bit SoC instruction (:mod:`hw.spec.soc_isa`): ``op``
in bits ``[0, 4)``, the payload from bit :data:`hw.spec.soc_isa.PAYLOAD_LO`.

* ``VECTOR``: the payload (220 bits) is a :class:`hw.npu.vector.VectorInstr`,
  handed to the :class:`hw.npu.vector.VectorUnit`; the queue waits for its
  ``done`` and takes its error code (``VecError`` 1..5 are ``VqError`` 1..5).
* ``VLOAD`` / ``VSTORE``: the payload holds :data:`hw.spec.soc_isa.VDMA_FIELDS`;
  ``rows x cols`` 32-byte columns, row ``r`` at device-memory byte
  ``mem_addr + r * mem_stride`` and at scratchpad byte
  ``32 * (spm_addr + r * spm_pitch)``, copied unchanged (reference model:
  :mod:`sim.golden.vdma`).
* Any other op (the command processor sends none) is dropped.

Scratchpad layout
-----------------
Seen by the vector unit and by the programs, the scratchpad is
``vector_spm_words`` words of ``L`` FP32 lanes (``L = vector_lanes``, a power of
two from 2 to 64), and as bytes a flat array in which word ``w`` covers bytes
``[4 L w, 4 L (w + 1))`` (lane ``j`` at bytes ``4 j .. 4 j + 3``, little-endian).
A 32-byte column is ``8 / L`` whole words for ``L <= 8`` and ``1 / (L / 8)`` of
a word for ``L >= 8``.

It is built as one ``lib.memory.Memory`` of ``max(32 L, 256)``-bit rows with
two read ports and one write port with 16-bit write enables, so that a
column is always inside one row: with ``L >= 8`` a row is a vector word (a
column is written with its 16 enables, and read as a slice of the word);
with ``L < 8`` a row holds ``8 / L`` vector words (the vector unit's reads
select their word from the row, its writes are placed with enables). Either
way one column moves per cycle. The vector unit owns both read ports and the
write port while it runs; the DMA takes read port A (VSTORE) or the write
port (VLOAD) while it runs. They never run at the same time.

Timing
------
The VDMA streams: up to ``max_outstanding`` requests in flight, one request
and one response per cycle when memory allows. Against a memory with a
fixed request-to-response latency ``T`` and no back-pressure, an
instruction of ``n`` columns keeps the DMA busy ``n + T + 1`` cycles (VLOAD)
or ``n + T + 4`` cycles (VSTORE: a scratchpad read and a 2-cycle FIFO before
the first request); the queue adds 4 cycles to a lone instruction (FIFO,
dispatch, two check cycles) and about 3 between queued ones. Rows follow
each other without a bubble. Measured on the memory model (``T = 9``): a
1024-column VLOAD keeps the queue busy 1038 cycles, a VSTORE 1041.
Responses must come back in request order; the low 7 tag bits carry a
sequence number that is checked (tag bit 7 is left to an arbiter).

Errors (``error``, :class:`hw.spec.soc_isa.VqError`)
-------------------------------------------------
The first error is kept until ``clear``; while it is set the queue pops and
discards every instruction (it drains, executes nothing and never hangs).
``clear`` also drops the queued instructions (the running one finishes).
VDMA instructions are checked before anything is touched: ``rows == 0`` or
``cols == 0`` is ``DMA_SIZE``; ``mem_addr`` or ``mem_stride`` not a multiple
of 32 is ``DMA_ALIGN``; a scratchpad range ending beyond the scratchpad is
``DMA_SPM``; a memory range ending beyond device memory
(``2 ** cfg.pim.addr_bits`` bytes) is ``DMA_MEM``. A response with
``error = 1`` (a memory smaller than the device, a controller error), or one
out of order, also gives ``DMA_MEM``: the DMA stops issuing, drains the
requests in flight without writing their data, and finishes; columns before
the failing one have been copied. Vector-unit errors are detected by the
unit before it touches the scratchpad.

Counters (``counters``, 32 bits each, cleared by ``clear`` like the matrix
unit's): ``busy`` (instructions queued or executing), ``vector`` (vector unit
busy), ``dma`` (VDMA busy), ``mem_stall`` (a VDMA request valid but not
accepted), ``instructions`` (instructions executed to the end, with or
without error; discarded ones are not counted).
"""

from amaranth.hdl import Cat, Const, Module, Mux, ResetInserter, Signal
from amaranth.lib import data, memory, stream, wiring
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.lib.wiring import In, Out

from ..config import SystemConfig
from ..memif import MemPortSignature
from ..spec.soc_isa import PAYLOAD_LO, VDMA_FIELDS, SocOp, VqError
from .counters import count_events
from .memmodel import MemoryModelTop
from .spm import SpmReadSignature
from .vector import VectorUnit, WritePortSignature

__all__ = ["COUNTERS", "COLUMN_BYTES", "SEQ_BITS", "VectorDma", "VectorQueue", "VectorQueueSystem"]

COLUMN_BYTES = 32
SEQ_BITS = 7
INSTR_PAYLOAD_BITS = 220        # the widest VQ payload (VECTOR)

COUNTERS = data.StructLayout({"busy": 32, "vector": 32, "dma": 32, "mem_stall": 32, "instructions": 32})


def _bits(limit: int) -> int:
    """Bits for values in ``[0, limit)``."""
    return max(1, (limit - 1).bit_length())


def _check_lanes(lanes):
    if not isinstance(lanes, int) or isinstance(lanes, bool) or not 2 <= lanes <= 64 or lanes & (lanes - 1):
        raise ValueError(f"Vector lanes must be a power of two from 2 to 64, not {lanes!r}")


class _Geometry:
    """Scratchpad geometry for ``lanes`` lanes and ``words`` vector words."""

    def __init__(self, lanes: int, words: int):
        _check_lanes(lanes)
        if not isinstance(words, int) or words < 1 or words & (words - 1) or words * lanes < 8:
            raise ValueError(f"Vector scratchpad words must be a power of two holding at least one "
                             f"32-byte column, not {words!r}")
        self.lanes = lanes
        self.words = words
        self.k = max(1, 8 // lanes)                    # vector words per memory row
        self.p = max(1, lanes // 8)                    # columns per memory row
        self.log_k = self.k.bit_length() - 1
        self.log_p = self.p.bit_length() - 1
        self.row_bits = 32 * lanes * self.k            # = 256 * p
        self.rows = words // self.k
        self.row_addr_bits = _bits(self.rows)
        self.columns = words * lanes // 8              # 32-byte columns in the scratchpad
        self.col_bits = _bits(self.columns)


class VectorDma(wiring.Component):
    """The VDMA engine: ``rows x cols`` 32-byte columns between memory and the scratchpad.

    The fields are taken with ``start`` (a one-cycle pulse while not ``busy``)
    and must already be checked (:class:`VectorQueue` does): every address is
    inside memory and scratchpad. ``spm_col`` and ``spm_pitch`` are in
    columns; the scratchpad ports address rows of ``256 * P`` bits
    (``P = max(1, lanes / 8)`` columns each).

    Members
    -------
    start, store : In(1)
        ``store`` = 1: VSTORE (scratchpad -> memory), 0: VLOAD.
    mem_addr, mem_stride, rows, cols, spm_col, spm_pitch : In
    mem : Out(MemPortSignature(cfg))
    spm_rd : Out(read port), spm_wr : Out(write port with one enable per 16 bits)
    busy : Out(1)
    done : Out(1)
        One-cycle pulse when the transfer is over (all responses back).
    error : Out(1)
        With ``done``: a response had ``error = 1`` or came out of order.
    """

    FIFO_DEPTH = 4

    def __init__(self, cfg: SystemConfig, lanes: int, words: int, max_outstanding: int = 32):
        if not isinstance(cfg, SystemConfig):
            raise TypeError(f"Configuration must be a SystemConfig, not {cfg!r}")
        if cfg.pim.column_bits != 8 * COLUMN_BYTES:
            raise ValueError(f"The vector DMA moves 32-byte columns; memory columns are {cfg.pim.column_bytes} bytes")
        if not isinstance(max_outstanding, int) or isinstance(max_outstanding, bool) \
                or not 1 <= max_outstanding < 1 << SEQ_BITS:
            raise ValueError(f"Outstanding requests must be an integer in [1, {(1 << SEQ_BITS) - 1}], "
                             f"not {max_outstanding!r}")
        self.cfg = cfg
        self._geo = g = _Geometry(lanes, words)
        self._max_out = max_outstanding
        aw = cfg.pim.addr_bits
        super().__init__({
            "start": In(1), "store": In(1),
            "mem_addr": In(aw), "mem_stride": In(aw), "rows": In(16), "cols": In(16),
            "spm_col": In(g.col_bits), "spm_pitch": In(g.col_bits),
            "mem": Out(MemPortSignature(cfg)),
            "spm_rd": Out(SpmReadSignature(g.row_addr_bits, g.row_bits)),
            "spm_wr": Out(WritePortSignature(g.row_addr_bits, g.row_bits)),
            "busy": Out(1), "done": Out(1), "error": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        g = self._geo
        P, log_p = g.p, g.log_p
        aw = self.cfg.pim.addr_bits
        cw = g.col_bits
        max_out = self._max_out

        busy = Signal()
        store = Signal()
        stop = Signal()                 # error seen: issue nothing more, drain
        err = Signal()
        stride = Signal(aw)
        pitch = Signal(cw)
        rows = Signal(16)
        cols = Signal(16)
        m.d.comb += [self.busy.eq(busy), self.error.eq(err)]

        class Walk:
            """Row / column loop over the transfer, with its memory and scratchpad addresses."""

            def __init__(self, prefix):
                self.r = Signal(16, name=f"{prefix}_r")
                self.c = Signal(16, name=f"{prefix}_c")
                self.mem_row = Signal(aw, name=f"{prefix}_mem_row")
                self.mem = Signal(aw, name=f"{prefix}_mem")
                self.spm_row = Signal(cw, name=f"{prefix}_spm_row")
                self.spm = Signal(cw, name=f"{prefix}_spm")
                self.done = Signal(name=f"{prefix}_done")

            def init(self, dut):
                return [self.r.eq(0), self.c.eq(0), self.mem_row.eq(dut.mem_addr), self.mem.eq(dut.mem_addr),
                        self.spm_row.eq(dut.spm_col), self.spm.eq(dut.spm_col), self.done.eq(0)]

            def step(self):
                with m.If(self.c + 1 == cols):
                    m.d.sync += [self.c.eq(0), self.r.eq(self.r + 1),
                                 self.mem_row.eq(self.mem_row + stride), self.mem.eq(self.mem_row + stride),
                                 self.spm_row.eq(self.spm_row + pitch), self.spm.eq(self.spm_row + pitch)]
                    with m.If(self.r + 1 == rows):
                        m.d.sync += self.done.eq(1)
                with m.Else():
                    m.d.sync += [self.c.eq(self.c + 1), self.mem.eq(self.mem + COLUMN_BYTES),
                                 self.spm.eq(self.spm + 1)]

        gen = Walk("g")                 # requests (VLOAD) / scratchpad reads (VSTORE)
        hnd = Walk("h")                 # responses (VLOAD writes)

        def part_of(col):
            return col[0:log_p] if log_p else Const(0, 1)

        def row_of(col):
            return (col >> log_p)[0:g.row_addr_bits]

        req, resp = self.mem.req, self.mem.resp
        seq = Signal(SEQ_BITS)
        h_seq = Signal(SEQ_BITS)
        outstanding = Signal(range(max_out + 1))
        room = outstanding < max_out

        # ---- VSTORE: scratchpad read (1 cycle) -> FIFO -> write request ----
        fifo = m.submodules.fifo = SyncFIFOBuffered(width=aw + 256, depth=self.FIFO_DEPTH)
        p1_valid = Signal()
        p1_part = Signal(max(1, log_p))
        p1_addr = Signal(aw)
        rd_go = Signal()
        m.d.comb += rd_go.eq(busy & store & ~gen.done & ~stop & (fifo.level + p1_valid < self.FIFO_DEPTH))
        m.d.comb += [self.spm_rd.addr.eq(row_of(gen.spm)), self.spm_rd.en.eq(rd_go)]
        m.d.sync += p1_valid.eq(rd_go)
        with m.If(rd_go):
            m.d.sync += [p1_part.eq(part_of(gen.spm)), p1_addr.eq(gen.mem)]
            gen.step()
        column = self.spm_rd.data.word_select(p1_part, 256) if P > 1 else self.spm_rd.data
        m.d.comb += [fifo.w_en.eq(p1_valid), fifo.w_data.eq(Cat(p1_addr, column))]

        # ---- requests ----
        load_go = Signal()
        m.d.comb += load_go.eq(busy & ~store & ~gen.done & ~stop & room)
        with m.If(store):
            m.d.comb += [
                req.valid.eq(busy & fifo.r_rdy & room & ~stop),
                req.payload.addr.eq(fifo.r_data[0:aw]),
                req.payload.data.eq(fifo.r_data[aw:aw + 256]),
                req.payload.mask.eq(Const((1 << COLUMN_BYTES) - 1, COLUMN_BYTES)),
                req.payload.write.eq(1),
                # after an error the FIFO is drained without issuing
                fifo.r_en.eq((req.valid & req.ready) | stop),
            ]
        with m.Else():
            m.d.comb += [req.valid.eq(load_go), req.payload.addr.eq(gen.mem)]
        m.d.comb += req.payload.tag.eq(seq)
        issued = req.valid & req.ready
        with m.If(issued):
            m.d.sync += seq.eq(seq + 1)
        with m.If(issued & ~store):
            gen.step()

        # ---- responses: one per cycle ----
        m.d.comb += resp.ready.eq(1)
        got = resp.valid
        bad = resp.payload.error | (resp.payload.tag[0:SEQ_BITS] != h_seq) | (resp.payload.write != store)
        with m.If(got):
            m.d.sync += h_seq.eq(h_seq + 1)
            with m.If(busy & bad):
                m.d.sync += [stop.eq(1), err.eq(1)]
            with m.If(~store):
                hnd.step()
        with m.If(busy & ~store & got & ~bad & ~stop):
            hpart = part_of(hnd.spm)
            m.d.comb += [self.spm_wr.addr.eq(row_of(hnd.spm)),
                         self.spm_wr.data.eq(Cat(*[resp.payload.data] * P)),
                         self.spm_wr.en.eq(Cat(*[Mux(hpart == k, Const(0xFFFF, 16), Const(0, 16))
                                                 for k in range(P)]))]
        m.d.sync += outstanding.eq(outstanding + issued - got)

        # ---- finish, start ----
        fin = busy & (gen.done | stop) & (outstanding == 0) & ~p1_valid & (fifo.level == 0)
        with m.If(fin):
            m.d.sync += busy.eq(0)
            m.d.comb += self.done.eq(1)
        with m.If(self.start & ~busy):
            m.d.sync += [busy.eq(1), store.eq(self.store), stop.eq(0), err.eq(0),
                         stride.eq(self.mem_stride), pitch.eq(self.spm_pitch), rows.eq(self.rows),
                         cols.eq(self.cols), seq.eq(0), h_seq.eq(0), *gen.init(self), *hnd.init(self)]
        return m


class VectorQueue(wiring.Component):
    """The vector queue (see the module docstring).

    Parameters
    ----------
    cfg : SystemConfig
        ``cfg.npu.vector_lanes`` lanes (a power of two from 2 to 64) over
        ``cfg.npu.vector_spm_words`` scratchpad words; memory port of ``cfg``.
    queue_depth : int
        Instructions the FIFO holds (at least 2).
    max_outstanding : int
        VDMA requests in flight (1..127).
    lane_instance : bool
        Passed to :class:`hw.npu.vector.VectorUnit` (Verilog builds need
        :func:`hw.npu.vector.lane_verilog`).
    clock_gate : bool
        Passed to :class:`hw.npu.vector.VectorUnit` (lanes clock-gated while idle).

    Members
    -------
    instr : In(stream.Signature(256))
        Whole SoC instructions.
    mem : Out(MemPortSignature(cfg))
    busy : Out(1)
        Instructions queued or executing.
    error : Out(8)
        First :class:`hw.spec.soc_isa.VqError` since reset or ``clear``.
    clear : In(1)
        Clears ``error`` and the counters (an error raised in the same cycle is kept).
    counters : Out(COUNTERS)
    """

    def __init__(self, cfg: SystemConfig, queue_depth: int = 8, max_outstanding: int = 32,
                 lane_instance: bool = True, clock_gate: bool = False, spu_port: bool = False):
        if not isinstance(cfg, SystemConfig):
            raise TypeError(f"Configuration must be a SystemConfig, not {cfg!r}")
        if not isinstance(queue_depth, int) or isinstance(queue_depth, bool) or queue_depth < 2:
            raise ValueError(f"Queue depth must be an integer of at least 2, not {queue_depth!r}")
        lanes, words = cfg.npu.vector_lanes, cfg.npu.vector_spm_words
        self.cfg = cfg
        self._geo = _Geometry(lanes, words)
        self._queue_depth = queue_depth
        self.unit = VectorUnit(lanes, words, lane_instance=lane_instance, clock_gate=clock_gate,
                               acc_stages=cfg.npu.vec_acc_stages)
        self.dma = VectorDma(cfg, lanes, words, max_outstanding)
        self._spu_port = bool(spu_port)
        members = {
            "instr": In(stream.Signature(8 * 32)),
            "mem": Out(MemPortSignature(cfg)),
            "busy": Out(1),
            "error": Out(8),
            "clear": In(1),
            "counters": Out(COUNTERS),
        }
        if self._spu_port:
            g = self._geo
            members["spu_rd"] = In(SpmReadSignature(g.row_addr_bits, g.row_bits))
            members["spu_wr"] = In(WritePortSignature(g.row_addr_bits, g.row_bits))
            members["spu_wr_ready"] = Out(1)
        super().__init__(members)

    @property
    def spm_columns(self) -> int:
        """32-byte columns in the scratchpad (the ``DMA_SPM`` limit)."""
        return self._geo.columns

    def elaborate(self, platform):
        m = Module()
        g = self._geo
        L, K, log_k = g.lanes, g.k, g.log_k
        aw = self.cfg.pim.addr_bits
        u = m.submodules.unit = self.unit
        dma = m.submodules.dma = self.dma
        wiring.connect(m, dma.mem, wiring.flipped(self.mem))

        # ---- scratchpad, ports shared between the vector unit and the DMA ----
        spm = m.submodules.spm = memory.Memory(shape=g.row_bits, depth=g.rows, init=[])
        ra = spm.read_port()
        rb = spm.read_port()
        wp = spm.write_port(granularity=16)

        def vrow(addr):
            return (addr >> log_k)[0:g.row_addr_bits]

        def vselect(port, req, name):
            """Vector unit read port ``req`` on memory port ``port``: its word out of the row."""
            if K == 1:
                m.d.comb += req.data.eq(port.data)
                return
            sel = Signal(log_k, name=f"{name}_sel")
            with m.If(req.en):
                m.d.sync += sel.eq(req.addr[0:log_k])
            m.d.comb += req.data.eq(port.data.word_select(sel, 32 * L))

        with m.If(dma.spm_rd.en):
            m.d.comb += [ra.addr.eq(dma.spm_rd.addr), ra.en.eq(1)]
        with m.Else():
            m.d.comb += [ra.addr.eq(vrow(u.rd_a.addr)), ra.en.eq(u.rd_a.en)]
        m.d.comb += [dma.spm_rd.data.eq(ra.data), rb.addr.eq(vrow(u.rd_b.addr)), rb.en.eq(u.rd_b.en)]
        vselect(ra, u.rd_a, "rd_a")
        vselect(rb, u.rd_b, "rd_b")

        if self._spu_port:
            # The SRAM-PIM queue (hw.npu.spu): a read port of its own, the write port in cycles the vector
            # unit and the DMA leave it free (they have priority; spu_wr_ready tells the queue).
            rc = spm.read_port()
            m.d.comb += [rc.addr.eq(self.spu_rd.addr), rc.en.eq(self.spu_rd.en), self.spu_rd.data.eq(rc.data),
                         self.spu_wr_ready.eq((dma.spm_wr.en == 0) & (u.wr.en == 0))]
        with m.If(dma.spm_wr.en != 0):
            m.d.comb += [wp.addr.eq(dma.spm_wr.addr), wp.data.eq(dma.spm_wr.data), wp.en.eq(dma.spm_wr.en)]
        if self._spu_port:
            with m.Elif((u.wr.en == 0) & (self.spu_wr.en != 0)):
                m.d.comb += [wp.addr.eq(self.spu_wr.addr), wp.data.eq(self.spu_wr.data), wp.en.eq(self.spu_wr.en)]
        with m.Else():
            if K == 1:
                m.d.comb += [wp.addr.eq(u.wr.addr), wp.data.eq(u.wr.data), wp.en.eq(u.wr.en)]
            else:
                part = u.wr.addr[0:log_k]
                m.d.comb += [wp.addr.eq(vrow(u.wr.addr)), wp.data.eq(Cat(*[u.wr.data] * K)),
                             wp.en.eq(Cat(*[Mux(part == k, u.wr.en, 0) for k in range(K)]))]

        # ---- instruction FIFO: op and payload ----
        # ``clear`` drops the queued instructions; the one running finishes.
        fifo = m.submodules.fifo = ResetInserter(self.clear)(
            SyncFIFOBuffered(width=4 + INSTR_PAYLOAD_BITS, depth=self._queue_depth))
        m.d.comb += [
            fifo.w_data.eq(Cat(self.instr.payload[0:4],
                               self.instr.payload[PAYLOAD_LO:PAYLOAD_LO + INSTR_PAYLOAD_BITS])),
            fifo.w_en.eq(self.instr.valid),
            self.instr.ready.eq(fifo.w_rdy),
        ]
        cur = Signal(4 + INSTR_PAYLOAD_BITS)
        op = cur[0:4]
        payload = cur[4:]
        f = {name: payload[lo:lo + width] for name, lo, width in VDMA_FIELDS}

        # ---- error register ----
        err = Signal(8)
        event = Signal(8)
        with m.If(event != 0):
            with m.If((err == 0) | self.clear):
                m.d.sync += err.eq(event)
        with m.Elif(self.clear):
            m.d.sync += err.eq(0)
        m.d.comb += self.error.eq(err)

        # ---- dispatcher ----
        finished = Signal()
        rows_m1 = Mux(f["rows"] == 0, 0, f["rows"] - 1)[0:16]
        prod_spm = Signal(40)
        prod_mem = Signal(40)
        spm_end = Signal(42)
        mem_end = Signal(42)
        m.d.comb += [spm_end.eq(f["spm_addr"] + prod_spm + f["cols"]),
                     mem_end.eq(f["mem_addr"] + prod_mem + (f["cols"] << 5))]
        m.d.comb += [
            dma.store.eq(op == SocOp.VSTORE), dma.mem_addr.eq(f["mem_addr"][0:aw]),
            dma.mem_stride.eq(f["mem_stride"][0:aw]), dma.rows.eq(f["rows"]), dma.cols.eq(f["cols"]),
            dma.spm_col.eq(f["spm_addr"][0:g.col_bits]), dma.spm_pitch.eq(f["spm_pitch"][0:g.col_bits]),
            u.instr.payload.eq(payload[0:INSTR_PAYLOAD_BITS]),
        ]
        with m.FSM(name="dispatch") as fsm:
            with m.State("Idle"):
                m.d.comb += fifo.r_en.eq(1)
                with m.If(fifo.r_rdy):
                    m.d.sync += cur.eq(fifo.r_data)
                    code = fifo.r_data[0:4]
                    with m.If(err == 0):
                        with m.If(code == SocOp.VECTOR):
                            m.next = "Vec-Issue"
                        with m.Elif((code == SocOp.VLOAD) | (code == SocOp.VSTORE)):
                            m.next = "Dma-Check"
            with m.State("Vec-Issue"):
                m.d.comb += u.instr.valid.eq(1)
                with m.If(u.instr.ready):
                    m.next = "Vec-Wait"
            with m.State("Vec-Wait"):
                with m.If(u.done):
                    m.d.comb += [event.eq(u.error.as_value()), finished.eq(1)]
                    m.next = "Idle"
            with m.State("Dma-Check"):
                m.d.sync += [prod_spm.eq(rows_m1 * f["spm_pitch"]), prod_mem.eq(rows_m1 * f["mem_stride"])]
                m.next = "Dma-Decide"
            with m.State("Dma-Decide"):
                with m.If((f["rows"] == 0) | (f["cols"] == 0)):
                    m.d.comb += [event.eq(VqError.DMA_SIZE), finished.eq(1)]
                    m.next = "Idle"
                with m.Elif((f["mem_addr"][0:5] != 0) | (f["mem_stride"][0:5] != 0)):
                    m.d.comb += [event.eq(VqError.DMA_ALIGN), finished.eq(1)]
                    m.next = "Idle"
                with m.Elif(spm_end > g.columns):
                    m.d.comb += [event.eq(VqError.DMA_SPM), finished.eq(1)]
                    m.next = "Idle"
                with m.Elif(mem_end > (1 << aw)):
                    m.d.comb += [event.eq(VqError.DMA_MEM), finished.eq(1)]
                    m.next = "Idle"
                with m.Else():
                    m.d.comb += dma.start.eq(1)
                    m.next = "Dma-Run"
            with m.State("Dma-Run"):
                with m.If(dma.done):
                    m.d.comb += [event.eq(Mux(dma.error, VqError.DMA_MEM, 0)), finished.eq(1)]
                    m.next = "Idle"

        busy = Signal()
        m.d.comb += [busy.eq((fifo.level != 0) | ~fsm.ongoing("Idle")), self.busy.eq(busy)]

        cnt = self.counters
        events = {"busy": busy, "vector": u.busy, "dma": dma.busy,
                  "mem_stall": self.mem.req.valid & ~self.mem.req.ready, "instructions": finished}
        count_events(m, cnt, self.clear, events)
        return m


class VectorQueueSystem(MemoryModelTop):
    """Test top: :class:`VectorQueue` + :class:`hw.npu.memmodel.MemoryModel`, with its own clock.

    As :class:`hw.npu.memmodel.MatrixSystem`: the clock comes from
    ``npu_clock_gen.v`` (build with Verilator ``--timing``), registers start
    from their reset values, and the memory has a back door.

    Members
    -------
    ``instr``, ``busy``, ``error``, ``clear``, ``counters`` of the queue; the
    memory model's ``bp_enable``, ``load``, ``dump``, ``dump_lo``,
    ``dump_hi`` as ``mem_bp_enable``, ...; ``clk_out``.
    """

    UNIT = "queue"

    def __init__(self, cfg: SystemConfig, words_log2: int, mem_latency: int = 6, queue_depth: int = 8,
                 max_outstanding: int = 32, lane_instance: bool = True, clock_gate: bool = True):
        self.queue = VectorQueue(cfg, queue_depth, max_outstanding, lane_instance, clock_gate)
        members = {name: member for name, member in self.queue.signature.members.items() if name != "mem"}
        super().__init__(cfg, words_log2, mem_latency, members)

    def _forward(self, m, q):
        wiring.connect(m, wiring.flipped(self.instr), q.instr)
        m.d.comb += [self.busy.eq(q.busy), self.error.eq(q.error), q.clear.eq(self.clear),
                     self.counters.eq(q.counters)]
