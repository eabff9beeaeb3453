"""The NPU matrix unit: systolic array, scratchpads, DMA engines and the instruction interface.

::

    instr (stream of isa.INSTRUCTION)
      |  decode + checks (1 cycle) -- error: dropped, sticky error_code
      v
    +------------+   +---------------+   +-------------+
    | load queue |   | compute queue |   | store queue |     in-order each; dependency
    +-----+------+   +-------+-------+   +------+------+     tokens (16 semaphores) between
          v                  v                  v
      DmaLoad  --->  act/wgt SPM  --> ComputeEngine --> acc SPM --> DmaStore
          |          (SystolicArray R x C, acc read-modify-write)       |
          +--------------------- MemArbiter ---------------------------+
                                     |
                                    mem (MemPortSignature, requester side)

Instructions are checked before they are queued: a zero dimension, a memory
address or stride that is not a multiple of 32 bytes, or a tile that would run
past the end of a scratchpad is rejected (not executed) and sets ``error``
with its :class:`hw.npu.isa.ErrorCode`; the first error is kept until
``clear``. A rejected instruction gives none of its tokens, so instructions
waiting on them wait until ``clear``, which drops every queued instruction,
lets the running ones (at most one per engine) finish and then zeroes the
tokens; ``busy`` stays high until then.

Cycle counters (``counters``, cleared by ``clear``): ``cycles`` (all),
``busy`` (any instruction queued or running), ``compute`` (compute engine
running or draining), ``compute_wait`` (a compute instruction is ready but
waits for tokens), ``load`` and ``store`` (DMA engine busy).
"""

from amaranth.hdl import Const, Module, Mux, ResetInserter, Signal
from amaranth.lib import data, stream, wiring
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.lib.wiring import In, Out

from ..arith import fp32_add_align, fp32_add_round
from ..config import SystemConfig
from ..memif import MemPortSignature
from ..spec.pipeline import compute_drain
from .counters import count_events
from .dma import DmaLoad, DmaStore, MemArbiter
from .isa import INSTRUCTION, INSTRUCTION_BITS, N_SEMAPHORES, ErrorCode, Opcode, Target
from .spm import Scratchpad, SpmReadSignature, SpmWriteSignature
from .systolic import SystolicArray, check_pe_stages

__all__ = ["COUNTERS", "ComputeEngine", "MatrixUnit"]

COUNTERS = data.StructLayout({
    "cycles": 32, "busy": 32, "compute": 32, "compute_wait": 32, "load": 32, "store": 32,
})


class ComputeEngine(wiring.Component):
    """Runs ``COMPUTE`` (and ``NOP``) instructions on a :class:`SystolicArray`.

    Sequencing: an instruction is ``KB x NB`` passes (``KB = ceil(K/R)``
    inner, ``NB = ceil(N/C)`` outer), each a *slot* of ``max(M, R, 4)``
    cycles. In slot ``s`` the engine reads activation rows ``m < M`` of pass
    ``s`` and weight rows ``i < R`` of pass ``s + 1`` (one each per cycle, at
    the same slot cycle, so the array's weight timing contract holds); a
    preamble of ``max(R, 4)`` cycles loads pass 0's weights. The next instruction may start as
    soon as the last slot has been issued; the array and the accumulator
    read-modify-write drain meanwhile.

    Accumulator read-modify-write, for the row leaving the array in cycle
    ``X``: read in ``X``, add in ``X + 1``, write in ``X + 2``; a row of the
    same accumulator word comes back at least one slot (>= 4 cycles) later,
    so there is no hazard. The instruction's tokens are given with the write
    of its last row.

    Cycles of one instruction (compute engine busy, alone):
    ``max(R, 4) + slot * KB * NB + latency_drain`` with
    ``latency_drain = R + C + 3`` (SPM read 1, array ``R + C``, RMW 2) for
    one-stage PEs, :func:`hw.spec.pipeline.compute_drain` in general (array
    :func:`hw.spec.pipeline.array_latency`: ``4R + C + 2`` with ``mul_stages``
    = 3, ``add_stages`` = 4). Nothing else depends on the PE depth: the
    array's weight timing contract is the same at every depth.
    """

    MIN_SLOT = 4

    def __init__(self, rows: int, cols: int, act_bits: int, wgt_bits: int, acc_bits: int,
                 pe_instance: bool = False, clock_gate: bool = False, mul_stages: int = 1, add_stages: int = 1):
        for what, v in (("Array rows", rows), ("Array columns", cols)):
            if not isinstance(v, int) or v < 1 or v & (v - 1):
                raise ValueError(f"{what} must be a power of two, not {v!r}")
        self._rows, self._cols = rows, cols
        self._pe_instance = pe_instance
        self._clock_gate = clock_gate
        self._stages = check_pe_stages(mul_stages, add_stages)
        super().__init__({
            "cmd": In(stream.Signature(INSTRUCTION)),
            "act": Out(SpmReadSignature(act_bits, data.ArrayLayout(16, rows))),
            "wgt": Out(SpmReadSignature(wgt_bits, data.ArrayLayout(16, cols))),
            "acc_r": Out(SpmReadSignature(acc_bits, data.ArrayLayout(32, cols))),
            "acc_w": Out(SpmWriteSignature(acc_bits, data.ArrayLayout(32, cols))),
            "signal": Out(N_SEMAPHORES),
            "busy": Out(1),
            "running": Out(1),
        })

    @property
    def drain_latency(self) -> int:
        """Cycles from an activation row read to its accumulator write."""
        return compute_drain(self._rows, self._cols, *self._stages)

    def elaborate(self, platform):
        m = Module()
        R, C = self._rows, self._cols
        m.submodules.array = array = SystolicArray(R, C, self._pe_instance, self._clock_gate, *self._stages)
        log_r, log_c = R.bit_length() - 1, C.bit_length() - 1

        run = Signal()
        c = Signal(16)
        slot_len = Signal(16)
        M = Signal(16)
        K = Signal(16)
        KB = Signal(16)
        NB = Signal(16)
        accumulate = Signal()
        sig = Signal(N_SEMAPHORES)
        act_addr = Signal(16)
        act_stride = Signal(16)
        wgt_stride = Signal(16)
        acc_stride = Signal(16)
        # Pass whose weights are being loaded.
        w_has = Signal()
        w_kb = Signal(16)
        w_nb = Signal(16)
        w_addr = Signal(16)
        w_nb_base = Signal(16)
        w_krem = Signal(range(-R, 1 << 16))
        w_act_base = Signal(16)
        w_acc_base = Signal(16)
        w_is_last = (w_kb + 1 >= KB) & (w_nb + 1 >= NB)
        # Pass whose activations are streaming.
        a_has = Signal()
        a_first_kb = Signal()
        a_last = Signal()
        a_row_base = Signal(16)
        a_acc_base = Signal(16)

        # The preamble (no activations yet) only loads pass 0's weights: R cycles, not a whole slot.
        slot_end = c + 1 >= Mux(a_has, slot_len, max(R, self.MIN_SLOT))
        w_rd = run & w_has & (c < R)
        a_rd = run & a_has & (c < M)
        m.d.comb += [
            self.wgt.addr.eq(w_addr + c), self.wgt.en.eq(w_rd),
            self.act.addr.eq(a_row_base + c), self.act.en.eq(a_rd),
            self.running.eq(run),
        ]

        # Registered alongside the scratchpad read (latency 1).
        w_v1 = Signal()
        w_i1 = Signal(range(max(R, 2)))
        w_en1 = Signal()
        a_v1 = Signal()
        a_f1 = Signal()
        meta_layout = data.StructLayout({
            "valid": 1, "acc_addr": 16, "accumulate": 1, "last": 1, "signal": N_SEMAPHORES,
        })
        meta1 = Signal(meta_layout)
        m.d.sync += [
            w_v1.eq(w_rd), w_i1.eq(c), w_en1.eq(c < w_krem),
            a_v1.eq(a_rd), a_f1.eq(c == 0),
            meta1.valid.eq(a_rd), meta1.acc_addr.eq(a_acc_base + c),
            meta1.accumulate.eq(accumulate | ~a_first_kb),
            meta1.last.eq(a_last & (c + 1 == M)), meta1.signal.eq(sig),
        ]
        m.d.comb += [
            array.act.eq(self.act.data), array.act_valid.eq(a_v1), array.act_first.eq(a_f1),
            array.w_row.eq(self.wgt.data), array.w_valid.eq(w_v1), array.w_index.eq(w_i1),
            array.w_en.eq(w_en1),
        ]
        meta = meta1
        for d in range(array.latency):
            nxt = Signal(meta_layout, name=f"meta_d{d}")
            m.d.sync += nxt.eq(meta)
            meta = nxt

        # Accumulator read-modify-write.
        m.d.comb += [self.acc_r.addr.eq(meta.acc_addr), self.acc_r.en.eq(meta.valid)]
        s1 = Signal(meta_layout)
        s1_sum = Signal(data.ArrayLayout(32, C))
        m.d.sync += [s1.eq(meta), s1_sum.eq(array.out)]
        s2 = Signal(meta_layout)
        s2_sum = Signal(data.ArrayLayout(32, C))
        m.d.sync += [s2.eq(s1), s2_sum.eq(s1_sum)]
        added = []
        for j in range(C):
            st = fp32_add_align(m, m.d.comb, self.acc_r.data[j], s1_sum[j], prefix=f"rmw{j}")
            added.append(fp32_add_round(m, m.d.sync, st, prefix=f"rmw{j}"))
        m.d.comb += [self.acc_w.addr.eq(s2.acc_addr), self.acc_w.en.eq(s2.valid)]
        for j in range(C):
            m.d.comb += self.acc_w.data[j].eq(Mux(s2.accumulate, added[j], s2_sum[j]))

        inflight = Signal(16)
        m.d.sync += inflight.eq(inflight + a_rd - s2.valid)
        m.d.comb += self.busy.eq(run | (inflight != 0))

        # Sequencer.
        with m.If(run):
            with m.If(slot_end):
                m.d.sync += [
                    c.eq(0),
                    a_has.eq(w_has), a_first_kb.eq(w_kb == 0), a_last.eq(w_is_last),
                    a_row_base.eq(w_act_base), a_acc_base.eq(w_acc_base),
                ]
                with m.If(w_kb + 1 < KB):
                    m.d.sync += [w_kb.eq(w_kb + 1), w_addr.eq(w_addr + R), w_krem.eq(w_krem - R),
                                 w_act_base.eq(w_act_base + act_stride)]
                with m.Else():
                    m.d.sync += [w_kb.eq(0), w_nb.eq(w_nb + 1), w_nb_base.eq(w_nb_base + wgt_stride),
                                 w_addr.eq(w_nb_base + wgt_stride), w_krem.eq(K), w_act_base.eq(act_addr),
                                 w_acc_base.eq(w_acc_base + acc_stride)]
                    with m.If(w_nb + 1 >= NB):
                        m.d.sync += w_has.eq(0)
                with m.If(~w_has):
                    m.d.sync += run.eq(0)
            with m.Else():
                m.d.sync += c.eq(c + 1)

        h = self.cmd.payload.header
        b = self.cmd.payload.body.compute
        is_nop = h.opcode == Opcode.NOP
        m.d.comb += self.cmd.ready.eq(~run & (~is_nop | (inflight == 0)))
        nop_signal = Signal(N_SEMAPHORES)
        with m.If(self.cmd.valid & self.cmd.ready):
            with m.If(is_nop):
                m.d.comb += nop_signal.eq(h.signal)
            with m.Else():
                mm = b.m
                slot = Mux(mm > max(R, self.MIN_SLOT), mm, max(R, self.MIN_SLOT))
                m.d.sync += [
                    run.eq(1), c.eq(0), slot_len.eq(slot), M.eq(mm), K.eq(b.k),
                    KB.eq((b.k + R - 1) >> log_r), NB.eq((b.n + C - 1) >> log_c),
                    accumulate.eq(h.accumulate), sig.eq(h.signal),
                    act_addr.eq(b.act_addr), act_stride.eq(b.act_stride),
                    wgt_stride.eq(b.wgt_stride), acc_stride.eq(b.acc_stride),
                    w_has.eq(1), w_kb.eq(0), w_nb.eq(0), w_addr.eq(b.wgt_addr), w_nb_base.eq(b.wgt_addr),
                    w_krem.eq(b.k), w_act_base.eq(b.act_addr), w_acc_base.eq(b.acc_addr),
                    a_has.eq(0),
                ]
        m.d.comb += self.signal.eq(Mux(s2.valid & s2.last, s2.signal, 0) | nop_signal)
        return m


def _ceil_div(value, log2):
    return (value + (1 << log2) - 1) >> log2


class MatrixUnit(wiring.Component):
    """The matrix unit (see the module docstring).

    Parameters
    ----------
    cfg : SystemConfig
        ``cfg.npu`` gives the array shape and scratchpad depths. The RTL needs
        a square array whose side is a power of two of at most 16 (a
        scratchpad word is at most one 32-byte memory column).
    pe_instance : bool
        Passed to :class:`SystolicArray` (Verilog builds).
    clock_gate : bool
        Passed to :class:`SystolicArray`: the array's clock is gated while it
        is idle (simulation builds; :mod:`hw.clockgate`).

    Members
    -------
    instr : In(stream.Signature(INSTRUCTION))
    mem : Out(MemPortSignature(cfg))
    busy : Out(1)
        Instructions queued or running.
    done : Out(1)
        One-cycle pulse when ``busy`` falls.
    error : Out(1)
    error_code : Out(ErrorCode)
        First error since reset or ``clear``.
    clear : In(1)
        Clears the error and the counters.
    counters : Out(COUNTERS)
    """

    QUEUE_DEPTH = 4

    def __init__(self, cfg: SystemConfig, pe_instance: bool = False, clock_gate: bool = False):
        if not isinstance(cfg, SystemConfig):
            raise TypeError(f"Configuration must be a SystemConfig, not {cfg!r}")
        self._pe_instance = pe_instance
        self._clock_gate = clock_gate
        R, C = cfg.npu.array_rows, cfg.npu.array_cols
        if R != C or R > 16 or R & (R - 1):
            raise ValueError(f"Matrix unit RTL needs a square array with a power-of-two side of at most 16, "
                             f"not {R}x{C}")
        for name in ("act_spm_words", "wgt_spm_words", "acc_spm_words"):
            if getattr(cfg.npu, name) > 1 << 16:
                raise ValueError(f"{name} must be at most 65536 (16-bit scratchpad addresses), "
                                 f"not {getattr(cfg.npu, name)!r}")
        self.cfg = cfg
        super().__init__({
            "instr": In(stream.Signature(INSTRUCTION)),
            "mem": Out(MemPortSignature(cfg)),
            "busy": Out(1),
            "done": Out(1),
            "error": Out(1),
            "error_code": Out(ErrorCode),
            "clear": In(1),
            "counters": Out(COUNTERS),
        })

    @property
    def rows(self) -> int:
        return self.cfg.npu.array_rows

    @property
    def cols(self) -> int:
        return self.cfg.npu.array_cols

    def elaborate(self, platform):
        m = Module()
        cfg, npu = self.cfg, self.cfg.npu
        R, C = npu.array_rows, npu.array_cols

        act = m.submodules.spm_act = Scratchpad(npu.act_spm_words, R, 16)
        wgt = m.submodules.spm_wgt = Scratchpad(npu.wgt_spm_words, C, 16)
        acc = m.submodules.spm_acc = Scratchpad(npu.acc_spm_words, C, 32, read_ports=2)
        comp = m.submodules.compute = ComputeEngine(R, C, act.addr_bits, wgt.addr_bits, acc.addr_bits,
                                                    self._pe_instance, self._clock_gate, npu.pe_mul_stages,
                                                    npu.pe_add_stages)
        load = m.submodules.load = DmaLoad(cfg, R)
        store = m.submodules.store = DmaStore(cfg, C, acc.addr_bits)
        arb = m.submodules.arbiter = MemArbiter(cfg)

        wiring.connect(m, comp.act, act.r[0])
        wiring.connect(m, comp.wgt, wgt.r[0])
        wiring.connect(m, comp.acc_r, acc.r[0])
        wiring.connect(m, comp.acc_w, acc.w)
        wiring.connect(m, store.acc, acc.r[1])
        wiring.connect(m, load.mem, arb.a)
        wiring.connect(m, store.mem, arb.b)
        wiring.connect(m, arb.out, wiring.flipped(self.mem))
        for spm, tgt in ((act, Target.ACT), (wgt, Target.WGT)):
            m.d.comb += [
                spm.w.addr.eq(load.spm.addr), spm.w.data.eq(load.spm.data),
                spm.w.en.eq(load.spm.en & (load.spm_target == tgt)),
            ]

        # ---- decode stage and checks ----
        d_valid = Signal()
        d = Signal(INSTRUCTION)
        op = d.header.opcode
        d_err = self._check(m, d)

        # ``clear`` drops the queued instructions (and the one in decode); the running ones finish, then the
        # tokens are zeroed (``clearing``), so nothing waits on a token that will never come.
        queues = []
        for name in ("load", "compute", "store"):
            q = m.submodules[f"q_{name}"] = ResetInserter(self.clear)(
                SyncFIFOBuffered(width=INSTRUCTION_BITS, depth=self.QUEUE_DEPTH))
            queues.append(q)
        q_load, q_comp, q_store = queues
        to_load = op == Opcode.LOAD
        to_store = op == Opcode.STORE
        to_comp = (op == Opcode.COMPUTE) | (op == Opcode.NOP)
        is_err = d_err != ErrorCode.NONE
        d_leave = d_valid & (is_err | (to_load & q_load.w_rdy) | (to_store & q_store.w_rdy)
                             | (to_comp & q_comp.w_rdy))
        for q, sel in ((q_load, to_load), (q_comp, to_comp), (q_store, to_store)):
            m.d.comb += [q.w_data.eq(d.as_value()), q.w_en.eq(d_valid & ~is_err & sel)]
        m.d.comb += self.instr.ready.eq(~d_valid | d_leave)
        with m.If(self.clear):
            m.d.sync += d_valid.eq(0)
        with m.Elif(self.instr.valid & self.instr.ready):
            m.d.sync += [d_valid.eq(1), d.eq(self.instr.payload)]
        with m.Elif(d_leave):
            m.d.sync += d_valid.eq(0)

        # ---- dependency tokens ----
        overflow, clearing = self._tokens(m, ((q_load, load), (q_comp, comp), (q_store, store)))

        # ---- errors, status, counters ----
        err = Signal(ErrorCode)
        event = Signal(ErrorCode)
        with m.If(d_valid & is_err):
            m.d.comb += event.eq(d_err)
        with m.Elif(load.error != ErrorCode.NONE):
            m.d.comb += event.eq(load.error)
        with m.Elif(store.error != ErrorCode.NONE):
            m.d.comb += event.eq(store.error)
        with m.Elif(overflow):
            m.d.comb += event.eq(ErrorCode.TOKEN_OVERFLOW)
        with m.If(self.clear):
            m.d.sync += err.eq(ErrorCode.NONE)
        with m.Elif((err == ErrorCode.NONE) & (event != ErrorCode.NONE)):
            m.d.sync += err.eq(event)
        m.d.comb += [self.error_code.eq(err), self.error.eq(err != ErrorCode.NONE)]

        busy = Signal()
        # The queues' ``level``, not ``r_rdy``: a SyncFIFOBuffered shows a written entry on ``r_rdy`` one
        # cycle after its ``level`` counts it, and ``busy`` must not drop in that cycle (a FENCE right after a
        # MATRIX instruction passed early; found by the differential fuzzer, issue 21).
        m.d.comb += busy.eq(d_valid | (q_load.level != 0) | (q_comp.level != 0) | (q_store.level != 0)
                            | load.busy | comp.busy | store.busy | clearing)
        busy_prev = Signal()
        m.d.sync += busy_prev.eq(busy)
        m.d.comb += [self.busy.eq(busy), self.done.eq(busy_prev & ~busy)]

        cnt = self.counters
        events = {
            "cycles": Const(1),
            "busy": busy,
            "compute": comp.busy,
            "compute_wait": q_comp.r_rdy & comp.cmd.ready & ~comp.cmd.valid,
            "load": load.busy,
            "store": store.busy,
        }
        count_events(m, cnt, self.clear, events)
        return m

    def _check(self, m, d):
        """The decode stage's check of instruction ``d``: the first error (``ErrorCode.NONE``: it is legal)."""
        npu = self.cfg.npu
        log_w = npu.array_rows.bit_length() - 1
        op = d.header.opcode
        dma = d.body.dma
        cp = d.body.compute
        d_err = Signal(ErrorCode)
        misaligned = (dma.mem_addr[0:5] != 0) | (dma.mem_stride[0:5] != 0)
        t = d.header.transpose
        spm_depth = Mux(d.header.target == Target.ACT, npu.act_spm_words, npu.wgt_spm_words)
        l_chunks = Mux(t, _ceil_div(dma.rows, log_w), _ceil_div(dma.cols, log_w))
        l_span = Mux(t, dma.cols, dma.rows)
        l_last = dma.spm_addr + (l_chunks - 1) * dma.spm_stride + l_span - 1
        s_last = dma.spm_addr + (_ceil_div(dma.cols, log_w) - 1) * dma.spm_stride + dma.rows - 1
        kb = _ceil_div(cp.k, log_w)
        nb = _ceil_div(cp.n, log_w)
        c_act_last = cp.act_addr + (kb - 1) * cp.act_stride + cp.m - 1
        c_wgt_last = cp.wgt_addr + (nb - 1) * cp.wgt_stride + cp.k - 1
        c_acc_last = cp.acc_addr + (nb - 1) * cp.acc_stride + cp.m - 1
        with m.Switch(op):
            with m.Case(Opcode.LOAD):
                with m.If((d.header.target != Target.ACT) & (d.header.target != Target.WGT)):
                    m.d.comb += d_err.eq(ErrorCode.BAD_OPCODE)
                with m.Elif((dma.rows == 0) | (dma.cols == 0)):
                    m.d.comb += d_err.eq(ErrorCode.BAD_SIZE)
                with m.Elif(misaligned):
                    m.d.comb += d_err.eq(ErrorCode.MISALIGNED)
                with m.Elif(l_last >= spm_depth):
                    m.d.comb += d_err.eq(Mux(d.header.target == Target.ACT,
                                             ErrorCode.ACT_OVERRUN, ErrorCode.WGT_OVERRUN))
            with m.Case(Opcode.STORE):
                with m.If((dma.rows == 0) | (dma.cols == 0)):
                    m.d.comb += d_err.eq(ErrorCode.BAD_SIZE)
                with m.Elif(misaligned):
                    m.d.comb += d_err.eq(ErrorCode.MISALIGNED)
                with m.Elif(s_last >= npu.acc_spm_words):
                    m.d.comb += d_err.eq(ErrorCode.ACC_OVERRUN)
            with m.Case(Opcode.COMPUTE):
                with m.If((cp.m == 0) | (cp.k == 0) | (cp.n == 0)):
                    m.d.comb += d_err.eq(ErrorCode.BAD_SIZE)
                with m.Elif(c_act_last >= npu.act_spm_words):
                    m.d.comb += d_err.eq(ErrorCode.ACT_OVERRUN)
                with m.Elif(c_wgt_last >= npu.wgt_spm_words):
                    m.d.comb += d_err.eq(ErrorCode.WGT_OVERRUN)
                with m.Elif(c_acc_last >= npu.acc_spm_words):
                    m.d.comb += d_err.eq(ErrorCode.ACC_OVERRUN)
            with m.Case(Opcode.NOP):
                pass
            with m.Default():
                m.d.comb += d_err.eq(ErrorCode.BAD_OPCODE)
        return d_err

    def _tokens(self, m, units):
        """The dependency tokens between the engines: a queue's head waits for the tokens it names (and for
        every earlier engine's waiting head it shares one with); an engine gives its tokens as it finishes.
        ``units``: (queue, engine) of load, compute, store. Returns (overflow, clearing)."""
        sems = [Signal(4, name=f"sem{i}") for i in range(N_SEMAPHORES)]
        valids, masks, handshakes = [], [], []
        nonzero = Signal(N_SEMAPHORES)
        for i in range(N_SEMAPHORES):
            m.d.comb += nonzero[i].eq(sems[i] != 0)
        for k, (q, unit) in enumerate(units):
            head = data.View(INSTRUCTION, q.r_data)
            mask = Signal(N_SEMAPHORES, name=f"wait_mask{k}")
            m.d.comb += mask.eq(head.header.wait)
            valid = Signal(name=f"grant{k}")
            blocked = Const(0)
            for v_hi, mask_hi in zip(valids, masks, strict=True):
                blocked = blocked | (v_hi & ((mask_hi & mask) != 0))
            m.d.comb += valid.eq(q.r_rdy & ((nonzero | ~mask) == (1 << N_SEMAPHORES) - 1) & ~blocked)
            hs = Signal(name=f"handshake{k}")
            m.d.comb += hs.eq(valid & unit.cmd.ready)
            m.d.comb += [unit.cmd.valid.eq(valid), unit.cmd.payload.eq(q.r_data), q.r_en.eq(hs)]
            valids.append(valid)
            masks.append(mask)
            handshakes.append(hs)
        overflow = Signal()
        clearing = Signal()
        (_, load), (_, comp), (_, store) = units
        engines_idle = ~load.busy & ~comp.busy & ~store.busy
        with m.If(self.clear):
            m.d.sync += clearing.eq(1)
        with m.Elif(engines_idle):
            m.d.sync += clearing.eq(0)
        for i in range(N_SEMAPHORES):
            dec = Const(0)
            for hs, mask in zip(handshakes, masks, strict=True):
                dec = dec | (hs & mask[i])
            inc = load.signal[i] + comp.signal[i] + store.signal[i]
            nxt = Signal(range(-1, 19), name=f"sem{i}_next")
            m.d.comb += nxt.eq(sems[i] - dec + inc)
            with m.If(clearing & engines_idle):
                m.d.sync += sems[i].eq(0)
            with m.Elif(nxt > 15):
                m.d.comb += overflow.eq(1)
                m.d.sync += sems[i].eq(15)
            with m.Else():
                m.d.sync += sems[i].eq(nxt)
        return overflow, clearing
