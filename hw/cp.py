"""The command processor (CP): fetches a program of SoC instructions and dispatches it to the units.

The program format is :mod:`hw.spec.soc_isa` (one 256-bit instruction per 32-byte
column of device memory). The CP decodes each instruction's ``op`` and, in
program order, pushes the payload to the unit's queue (MATRIX -> matrix unit,
VECTOR/VLOAD/VSTORE -> vector queue with the whole 256-bit word, PIM -> PCU),
waits at a FENCE until the named units are idle, and at END until every unit
is idle, then raises ``done``.

::

    start, prog_addr, prog_len
       |
    fetch: one 32-byte read per instruction, in order, at most fetch_depth
       |   outstanding or buffered (credits); responses go to the FIFO
       v
    instruction FIFO (fetch_depth)  -- head --> decode --> mu / vq / pcu streams
                                                  |-> FENCE / END: wait for idle units

The prefetch FIFO keeps dispatching while memory is blocked (a PIM macro
holds the controllers in PIM mode): up to ``fetch_depth`` instructions are
fetched ahead. One instruction leaves the FIFO per cycle when its unit is
ready (a MATRIX after a VECTOR goes out in the next cycle).

Fetch responses carry the start's *epoch* (an 8-bit counter bumped at every
start) as their tag; a response of an earlier run (fetched ahead before an
END, an error or a ``clear``) is dropped, so a new program can start at once.

With an SRAM-PIM unit (``cfg.spu``, :data:`SPU_UNIT`) SPIM and SLOAD go to a fourth port, ``spu`` (the
whole 256-bit word, like the vector queue's), FENCE's mask is 4 bits (``SPU = 8``) and END waits for the
SRAM-PIM queue too; without it SPIM and SLOAD are ILLEGAL and FENCE bit 11 a reserved header bit (the
Verilog of such a configuration is what it was before the SPU existed).

Idle units: a unit is idle when its ``busy`` input is low and nothing was
handed to it in the previous cycle (a unit raises ``busy`` the cycle after it
accepts an instruction). END also needs the units idle in the previous
cycle, so that an error raised as a unit goes idle is reported, not ``done``.

Errors (``error``: :class:`hw.spec.soc_isa.CpError` in bits 0..7, the unit's own
code in bits 8..15; the first error is kept until ``clear``):

* ``BAD_PROGRAM``: start with ``prog_addr`` not a multiple of 32, ``prog_len``
  zero, or ``prog_addr + 32 * prog_len`` beyond device memory (``error_pc``
  0; nothing is fetched);
* ``FETCH``: the fetch of the head instruction was answered with ``error``;
* ``ILLEGAL``: reserved op code, a non-zero reserved header bit, payload bits
  set beyond the op's payload width or a non-zero END payload (exactly what
  :func:`hw.spec.soc_isa.decode` rejects; it ignores a FENCE's bits 32 and up),
  or the program ran past ``prog_len`` instructions without an END
  (``error_pc = prog_len``);
* ``MU`` / ``VQ`` / ``PCU``: the unit's error input is non-zero (checked every
  cycle while running); ``error_pc`` is the index of the last instruction
  handed to that unit at least one cycle before the error was seen (exact for
  errors a unit raises at its decode stage, the cycle after accepting).

After an error the CP stops (``busy`` falls; nothing more is dispatched) and
ignores ``start`` until ``clear``. ``clear`` also aborts a running program.
``start`` while busy is ignored.

Counters (32-bit, wrapping, zeroed by ``reset_counters``): ``cycles``
(busy), ``fetch_stall`` (busy with no instruction at the FIFO head),
``fence_mu`` / ``fence_vq`` / ``fence_pcu`` (a FENCE or END waiting for that
unit), ``dispatch_stall`` (the head's unit not ready), ``instructions``
(instructions retired, FENCE and END included).
"""

from amaranth.hdl import Cat, Const, Module, ResetInserter, Shape, Signal
from amaranth.lib import data, stream, wiring
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.lib.wiring import In, Out

from .config import SystemConfig
from .memif import MemPortSignature
from .npu.counters import count_events
from .spec.matrix_isa import INSTRUCTION
from .spec.soc_isa import (
    INSTR_BITS,
    PAYLOAD_LO,
    PAYLOAD_WIDTH,
    SPU_OPS,
    SPU_PAYLOAD_WIDTH,
    UNITS_LO,
    CpError,
    SocOp,
    units_bits,
)

__all__ = ["CommandProcessor", "COUNTERS", "UNITS", "UnitSignature", "UnitPort"]

COUNTERS = data.StructLayout({
    "cycles": 32, "fetch_stall": 32, "fence_mu": 32, "fence_vq": 32, "fence_pcu": 32, "dispatch_stall": 32,
    "instructions": 32,
})



class UnitSignature(wiring.Signature):
    """The command processor's port to one unit: instructions out, the unit's state back.

    Parameters
    ----------
    payload : shape
        The instruction as the unit takes it.
    error_width : int
        Width of the unit's error code (0: no error).

    Members
    -------
    instr : Out(stream.Signature(payload))
    busy : In(1)
        The unit has work: high from the cycle after it accepts an instruction until that work is done.
    error : In(error_width)
        The unit's error code, non-zero from the failure until the unit is cleared.
    """

    def __init__(self, payload, error_width: int):
        super().__init__({"instr": Out(stream.Signature(payload)), "busy": In(1), "error": In(error_width)})


class UnitPort:
    """A unit's side of a :class:`UnitSignature` made of signals the unit already has (it keeps its own port
    names): ``wiring.connect(m, cp.mu, UnitPort(cp.mu.signature, instr=mu.instr, busy=mu.busy,
    error=mu.error_code))``."""

    def __init__(self, signature: UnitSignature, *, instr, busy, error):
        self.signature = signature.flip()
        self.instr, self.busy, self.error = instr, busy, error


# (port name, FENCE mask bit, ops, payload on the stream, error width, CpError)
UNITS = (
    ("mu", 0, (SocOp.MATRIX,), INSTRUCTION, 4, CpError.MU),
    ("vq", 1, (SocOp.VECTOR, SocOp.VLOAD, SocOp.VSTORE), INSTR_BITS, 8, CpError.VQ),
    ("pcu", 2, (SocOp.PIM,), PAYLOAD_WIDTH[SocOp.PIM], 8, CpError.PCU),
)
SPU_UNIT = ("spu", 3, SPU_OPS, INSTR_BITS, 8, CpError.SPU)
"""The SRAM-PIM queue (:mod:`hw.npu.spu`), a fourth unit on systems with ``cfg.spu``: SPIM and SLOAD legal,
FENCE mask bit 3, port ``spu``, error :attr:`CpError.SPU`."""


class CommandProcessor(wiring.Component):
    """Fetches and dispatches a program (see the module docstring).

    Parameters
    ----------
    cfg : SystemConfig
    fetch_depth : int
        Instructions fetched ahead (outstanding reads plus the FIFO), a power
        of two in [2, 256].

    Members
    -------
    mem : Out(MemPortSignature(cfg))
        Instruction fetch (reads only; the tag is the run's epoch).
    start : In(1)
        Pulse: run the program of ``prog_len`` instructions at byte ``prog_addr``.
    prog_addr, prog_len : In(32)
        Sampled with ``start``.
    busy : Out(1)
    done : Out(1)
        Set when END retires; cleared by the next ``start``.
    error : Out(16)
        ``CpError | unit_code << 8`` of the first error; 0 when none.
    error_pc : Out(32)
        Index (from 0) of the failing instruction.
    pc : Out(32)
        Index of the instruction at the FIFO head: the one a unit stream carries (for a queue in front
        of a unit that wants to know which instruction failed).
    clear : In(1)
        Clears ``error`` and ``error_pc`` and aborts a running program.
    reset_counters : In(1)
    mu : Out(UnitSignature(hw.spec.matrix_isa.INSTRUCTION, 4))
    vq : Out(UnitSignature(256, 8))
    pcu : Out(UnitSignature(128, 8))
    spu : Out(UnitSignature(256, 8))
        Only with ``cfg.spu`` (:data:`SPU_UNIT`).
    counters : Out(COUNTERS)
    """

    def __init__(self, cfg: SystemConfig, fetch_depth: int = 32):
        if not isinstance(cfg, SystemConfig):
            raise TypeError(f"Configuration must be a SystemConfig, not {cfg!r}")
        if (not isinstance(fetch_depth, int) or isinstance(fetch_depth, bool) or not 2 <= fetch_depth <= 256
                or fetch_depth & (fetch_depth - 1)):
            raise ValueError(f"Fetch depth must be a power of two in [2, 256], not {fetch_depth!r}")
        self.cfg = cfg
        self.fetch_depth = fetch_depth
        self._spu = cfg.spu is not None
        self._units = UNITS + ((SPU_UNIT,) if self._spu else ())
        members = {
            "mem": Out(MemPortSignature(cfg)),
            "start": In(1),
            "prog_addr": In(32),
            "prog_len": In(32),
            "busy": Out(1),
            "done": Out(1),
            "error": Out(16),
            "error_pc": Out(32),
            "pc": Out(32),
            "clear": In(1),
            "reset_counters": In(1),
            "counters": Out(COUNTERS),
        }
        for name, _, _, payload, error_width, _ in self._units:
            members[name] = Out(UnitSignature(payload, error_width))
        super().__init__(members)

    def elaborate(self, platform):
        m = Module()
        p = self.cfg.pim
        depth = self.fetch_depth

        run = Signal()
        err = Signal(16)
        err_pc = Signal(32)
        m.d.comb += [self.busy.eq(run), self.error.eq(err), self.error_pc.eq(err_pc)]
        epoch = Signal(8)
        prog_len = Signal(32)
        f_idx = Signal(32)          # next instruction to fetch
        f_addr = Signal(32)
        pc = Signal(32)             # instruction at the FIFO head
        m.d.comb += self.pc.eq(pc)

        accept = Signal()           # a start that runs
        m.d.comb += accept.eq(self.start & ~run & (err == 0) & ~self.clear)
        bad_program = ((self.prog_addr[:5] != 0) | (self.prog_len == 0)
                       | (self.prog_addr + (self.prog_len << 5) > p.total_bytes))

        fifo = ResetInserter(accept)(SyncFIFOBuffered(width=INSTR_BITS + 1, depth=depth))
        m.submodules.fifo = fifo

        # ---------------- fetch ----------------
        req, resp = self.mem.req, self.mem.resp
        rq_valid = Signal()
        rq_addr = Signal(32)
        rq_tag = Signal(8)
        inflight = Signal(range(depth + 1))     # reads issued (into rq) and not answered, any epoch
        m.d.comb += [
            req.valid.eq(rq_valid), req.payload.addr.eq(rq_addr), req.payload.write.eq(0),
            req.payload.mask.eq(0), req.payload.data.eq(0), req.payload.tag.eq(rq_tag),
        ]
        issue = Signal()
        m.d.comb += issue.eq(run & (~rq_valid | req.ready) & (f_idx != prog_len)
                             & (inflight + fifo.level < depth))
        with m.If(issue):
            m.d.sync += [rq_valid.eq(1), rq_addr.eq(f_addr), rq_tag.eq(epoch),
                         f_addr.eq(f_addr + 32), f_idx.eq(f_idx + 1)]
        with m.Elif(req.ready):
            m.d.sync += rq_valid.eq(0)
        m.d.comb += resp.ready.eq(1)
        m.d.sync += inflight.eq(inflight + issue - resp.valid)
        m.d.comb += [
            fifo.w_data.eq(Cat(resp.payload.data, resp.payload.error)),
            fifo.w_en.eq(resp.valid & run & (resp.payload.tag == epoch)),
        ]

        # ---------------- decode ----------------
        word = fifo.r_data[:INSTR_BITS]
        f_err = fifo.r_data[INSTR_BITS]
        head = Signal()
        m.d.comb += head.eq(run & fifo.r_rdy)
        op = word[:4]
        fence_mask = word[UNITS_LO:UNITS_LO + units_bits(self._spu)]
        payload = word[PAYLOAD_LO:]
        illegal = self._illegal(m, word)
        legal = head & ~f_err & ~illegal

        # ---------------- units ----------------
        units = self._units
        unit_err = [getattr(self, u[0]).error for u in units]
        fault_unit = Signal()
        m.d.comb += fault_unit.eq(run & Cat(e != 0 for e in unit_err).any())
        idle = Signal(len(units))
        idle_prev = Signal(len(units))
        m.d.sync += idle_prev.eq(idle)
        hs = []
        last_pc_d = []
        for name, bit, ops, shape, _, _ in units:
            port = getattr(self, name).instr
            busy_in = getattr(self, name).busy
            width = Shape.cast(shape).width
            sel = Const(0)
            for o in ops:
                sel = sel | (op == o)
            m.d.comb += [port.valid.eq(legal & sel & ~fault_unit),
                         port.payload.eq(word if width == INSTR_BITS else payload[:width])]
            h = Signal(name=f"{name}_hs")
            m.d.comb += h.eq(port.valid & port.ready)
            h_prev = Signal(name=f"{name}_hs_prev")
            last_pc = Signal(32, name=f"{name}_last_pc")
            lpd = Signal(32, name=f"{name}_last_pc_d")
            m.d.sync += [h_prev.eq(h), lpd.eq(last_pc)]
            with m.If(h):
                m.d.sync += last_pc.eq(pc)
            m.d.comb += idle[bit].eq(~busy_in & ~h_prev)
            hs.append(h)
            last_pc_d.append(lpd)
        dispatched = Cat(*hs).any()
        is_end = op == SocOp.END
        is_fence = op == SocOp.FENCE
        all_idle = (1 << len(units)) - 1
        end_ok = (idle == all_idle) & (idle_prev == all_idle)
        fence_ok = (fence_mask & ~idle) == 0
        retire_ctl = legal & ~fault_unit & ((is_end & end_ok) | (is_fence & fence_ok))
        pop = Signal()
        m.d.comb += [pop.eq(dispatched | retire_ctl), fifo.r_en.eq(pop)]
        with m.If(pop):
            m.d.sync += pc.eq(pc + 1)

        # ---------------- control and errors ----------------
        with m.If(self.clear):
            m.d.sync += [run.eq(0), err.eq(0), err_pc.eq(0)]
        with m.Elif(accept):
            m.d.sync += [self.done.eq(0), epoch.eq(epoch + 1)]
            with m.If(bad_program):
                m.d.sync += [err.eq(CpError.BAD_PROGRAM), err_pc.eq(0)]
            with m.Else():
                m.d.sync += [run.eq(1), prog_len.eq(self.prog_len), f_idx.eq(0), f_addr.eq(self.prog_addr),
                             pc.eq(0)]
        with m.Elif(run):
            with m.If(fault_unit):
                m.d.sync += run.eq(0)
                first = True
                for k, (*_, code) in enumerate(units):
                    with (m.If if first else m.Elif)(unit_err[k] != 0):
                        m.d.sync += [err.eq(Cat(Const(code, 8), unit_err[k])),
                                     err_pc.eq(last_pc_d[k])]
                    first = False
            with m.Elif(head & f_err):
                m.d.sync += [run.eq(0), err.eq(CpError.FETCH), err_pc.eq(pc)]
            with m.Elif(head & illegal):
                m.d.sync += [run.eq(0), err.eq(CpError.ILLEGAL), err_pc.eq(pc)]
            with m.Elif(pc == prog_len):
                m.d.sync += [run.eq(0), err.eq(CpError.ILLEGAL), err_pc.eq(pc)]
            with m.Elif(retire_ctl & is_end):
                m.d.sync += [run.eq(0), self.done.eq(1)]

        # ---------------- counters ----------------
        waiting = legal & (is_end | is_fence)
        count_events(m, self.counters, self.reset_counters, {
            "cycles": run,
            "fetch_stall": run & ~fifo.r_rdy & (pc != prog_len),
            "fence_mu": waiting & (is_end | fence_mask[0]) & ~idle[0],
            "fence_vq": waiting & (is_end | fence_mask[1]) & ~idle[1],
            "fence_pcu": waiting & (is_end | fence_mask[2]) & ~idle[2],
            "dispatch_stall": Cat(getattr(self, n).instr.valid & ~getattr(self, n).instr.ready
                                  for n, *_ in units).any(),
            "instructions": pop,
        })
        return m

    def _illegal(self, m, word):
        """The instruction is illegal: a reserved op code, a non-zero reserved header bit, payload bits set
        beyond the op's payload width or a non-zero END payload (what :func:`hw.spec.soc_isa.decode`
        rejects)."""
        op = word[:4]
        ub = units_bits(self._spu)
        fence_mask = word[UNITS_LO:UNITS_LO + ub]
        payload = word[PAYLOAD_LO:]
        illegal = Signal()
        hdr_bad = (word[4:UNITS_LO] != 0) | (word[UNITS_LO + ub:PAYLOAD_LO] != 0)
        widths = {**PAYLOAD_WIDTH, **(SPU_PAYLOAD_WIDTH if self._spu else {})}
        with m.Switch(op):
            with m.Case(SocOp.END):
                m.d.comb += illegal.eq(hdr_bad | (fence_mask != 0) | (payload != 0))
            with m.Case(SocOp.FENCE):
                # Bits 32 and up of a FENCE are ignored, as hw.spec.soc_isa.decode does.
                m.d.comb += illegal.eq(hdr_bad)
            for sop, width in widths.items():
                with m.Case(sop):
                    m.d.comb += illegal.eq(hdr_bad | (fence_mask != 0) | (payload[width:] != 0))
            with m.Default():
                m.d.comb += illegal.eq(1)
        return illegal
