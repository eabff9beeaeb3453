"""A stand-in for the unified memory controller: a fixed-latency RTL memory model, and the test system.

:class:`MemoryModel` answers the normal-request interface
(:class:`hw.memif.MemPortSignature`, memory side) from a plain Verilog array
(``hw/verilog/npu_mem_storage.v``) that the testbench fills and reads through a
back door (``$readmemh`` / ``$writememh`` on a one-cycle pulse), so no Python
runs per cycle. Responses come back in request order, ``latency + 2`` cycles
after the request was accepted when nothing stalls. An optional 16-bit LFSR
drops ``req.ready`` and ``resp.valid`` on about a quarter of the cycles each
(``bp_enable``), to exercise back-pressure.

:class:`MatrixSystem` is the test top: a :class:`hw.npu.matrix_unit.MatrixUnit`
connected to a :class:`MemoryModel`. When the memory controller exists, the
``wiring.connect`` line in :meth:`MatrixSystem.elaborate` is the one to change.
"""

from pathlib import Path

from amaranth.hdl import Cat, ClockSignal, Const, Instance, Module, Mux, Signal
from amaranth.lib import wiring
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.lib.wiring import In, Out

from ..config import SystemConfig
from ..memif import TAG_BITS, MemPortSignature
from ..simtop import CLOCK_VERILOG, forward_ports, forwarded_members, free_running_clock

__all__ = ["STORAGE_VERILOG", "CLOCK_VERILOG", "MemoryModel", "MatrixSystem"]

STORAGE_VERILOG = Path(__file__).resolve().parent.parent / "verilog" / "npu_mem_storage.v"


class MemoryModel(wiring.Component):
    """Fixed-latency memory behind the normal-request interface.

    Parameters
    ----------
    cfg : SystemConfig
    words_log2 : int
        The model holds ``2**words_log2`` columns of 32 bytes (at most the
        device size); requests beyond get ``error = 1``.
    latency : int
        Pipeline stages between an accepted request and the storage access.

    Members
    -------
    port : In(MemPortSignature(cfg))
    bp_enable : In(1)
        Pseudo-random back-pressure on ``req.ready`` and ``resp.valid``.
    load, dump : In(1)
        Back-door pulses (see ``npu_mem_storage.v``).
    dump_lo, dump_hi : In(words_log2)
        Column range written by ``dump``.
    """

    def __init__(self, cfg: SystemConfig, words_log2: int, latency: int = 6):
        if not isinstance(cfg, SystemConfig):
            raise TypeError(f"Configuration must be a SystemConfig, not {cfg!r}")
        max_log2 = cfg.pim.addr_bits - cfg.pim.column_offset_bits
        if not isinstance(words_log2, int) or not 4 <= words_log2 <= max_log2:
            raise ValueError(f"Memory model size must be an integer log2 of columns in [4, {max_log2}], "
                             f"not {words_log2!r}")
        if not isinstance(latency, int) or latency < 1:
            raise ValueError(f"Memory model latency must be a positive integer, not {latency!r}")
        self._cfg = cfg
        self.words_log2 = words_log2
        self._latency = latency
        super().__init__({
            "port": In(MemPortSignature(cfg)),
            "bp_enable": In(1),
            "load": In(1),
            "dump": In(1),
            "dump_lo": In(words_log2),
            "dump_hi": In(words_log2),
        })

    @property
    def latency(self) -> int:
        """Cycles from request accepted to response valid, without back-pressure."""
        return self._latency + 2

    def elaborate(self, platform):
        m = Module()
        cfg = self._cfg
        lo = cfg.pim.column_offset_bits
        aw = self.words_log2
        depth = self._latency + 4
        req, resp = self.port.req, self.port.resp

        lfsr = Signal(16, init=0xACE1)
        m.d.sync += lfsr.eq(Cat(lfsr[1:], lfsr[0] ^ lfsr[2] ^ lfsr[3] ^ lfsr[5]))
        stall_req = self.bp_enable & (lfsr[0:2] == 0)
        stall_resp = self.bp_enable & (lfsr[7:9] == 0)

        fifo = m.submodules.fifo = SyncFIFOBuffered(width=256 + TAG_BITS + 2, depth=depth)
        used = Signal(range(depth + 1))           # accepted and not yet answered
        m.d.comb += req.ready.eq((used < depth) & ~stall_req)
        accepted = req.valid & req.ready
        answered = resp.valid & resp.ready
        m.d.sync += used.eq(used + accepted - answered)

        # Request delay line.
        addr = req.payload.addr
        bad = (addr[0:lo] != 0)
        if cfg.pim.addr_bits > lo + aw:
            bad = bad | (addr[lo + aw:] != 0)
        stage = Cat(accepted, bad, req.payload.write, addr[lo:lo + aw], req.payload.data,
                    req.payload.mask, req.payload.tag)
        for k in range(self._latency):
            nxt = Signal(len(stage), name=f"req_d{k}")
            m.d.sync += nxt.eq(stage)
            stage = nxt
        s_valid, s_bad, s_write = stage[0], stage[1], stage[2]
        s_addr = stage[3:3 + aw]
        s_data = stage[3 + aw:3 + aw + 256]
        s_mask = stage[3 + aw + 256:3 + aw + 288]
        s_tag = stage[3 + aw + 288:3 + aw + 288 + TAG_BITS]

        rdata = Signal(256)
        m.submodules.storage = Instance(
            "npu_mem_storage",
            p_ADDR_BITS=aw,
            i_clk=ClockSignal(),
            i_en=s_valid & ~s_bad,
            i_we=s_write,
            i_addr=s_addr,
            i_wdata=s_data,
            i_wmask=s_mask,
            o_rdata=rdata,
            i_load=self.load,
            i_dump=self.dump,
            i_dump_lo=self.dump_lo,
            i_dump_hi=self.dump_hi,
        )
        r_valid = Signal()
        r_bad = Signal()
        r_write = Signal()
        r_tag = Signal(TAG_BITS)
        m.d.sync += [r_valid.eq(s_valid), r_bad.eq(s_bad), r_write.eq(s_write), r_tag.eq(s_tag)]
        m.d.comb += [
            fifo.w_en.eq(r_valid),
            fifo.w_data.eq(Cat(Mux(r_bad | r_write, Const(0, 256), rdata), r_tag, r_write, r_bad)),
            resp.valid.eq(fifo.r_rdy & ~stall_resp),
            resp.payload.data.eq(fifo.r_data[0:256]),
            resp.payload.tag.eq(fifo.r_data[256:256 + TAG_BITS]),
            resp.payload.write.eq(fifo.r_data[256 + TAG_BITS]),
            resp.payload.error.eq(fifo.r_data[256 + TAG_BITS + 1]),
            fifo.r_en.eq(resp.valid & resp.ready),
        ]
        return m


class MemoryModelTop(wiring.Component):
    """Base of the test tops that put one unit on a :class:`MemoryModel`, with their own clock
    (:class:`MatrixSystem`, :class:`hw.npu.vector_queue.VectorQueueSystem`).

    A subclass names the unit's attribute in ``UNIT`` (also its submodule name), passes the unit's members
    it exposes to ``__init__`` and connects them in :meth:`_forward`. The top adds the memory model's back
    door ``bp_enable``, ``load``, ``dump``, ``dump_lo``, ``dump_hi`` as ``mem_bp_enable``, ``mem_load``, ...,
    and ``clk_out``; the unit's ``mem`` port goes to the memory model.
    """

    UNIT = "unit"
    BACKDOOR = ("bp_enable", "load", "dump", "dump_lo", "dump_hi")

    def __init__(self, cfg: SystemConfig, words_log2: int, mem_latency: int, members: dict):
        self.memory = MemoryModel(cfg, words_log2, mem_latency)
        for name in self.BACKDOOR:
            members[f"mem_{name}"] = self.memory.signature.members[name]
        members["clk_out"] = Out(1)
        super().__init__(members)

    def _forward(self, m, unit):
        """Connect the unit's ports other than ``mem`` to the top's."""
        raise NotImplementedError

    def elaborate(self, platform):
        m = Module()
        clk, _ = free_running_clock(m)
        m.d.comb += self.clk_out.eq(clk)
        m.submodules[self.UNIT] = unit = getattr(self, self.UNIT)
        m.submodules.memory = memory = self.memory
        wiring.connect(m, unit.mem, memory.port)      # the memory controller replaces this line
        self._forward(m, unit)
        for name in self.BACKDOOR:
            m.d.comb += getattr(memory, name).eq(getattr(self, f"mem_{name}"))
        return m


class MatrixSystem(MemoryModelTop):
    """Test top: :class:`MatrixUnit` + :class:`MemoryModel`, with its own clock.

    The clock comes from ``hw/verilog/npu_clock_gen.v`` (10 ns period; build
    with Verilator ``--timing``; :func:`hw.simtop.free_running_clock`), so the simulator runs without Python per
    clock edge; testbenches wait on ``clk_out`` and on status edges. Registers
    start from their reset values (Verilog initial values); there is no reset
    input. ``clock_gate`` (default on) gates the systolic array's clock while
    it is idle, as in the SoC simulation build (:mod:`hw.clockgate`).

    Members
    -------
    All of :class:`MatrixUnit`'s ports except ``mem``, plus the memory
    model's ``bp_enable``, ``load``, ``dump``, ``dump_lo``, ``dump_hi`` as
    ``mem_bp_enable``, ``mem_load``, ..., and ``clk_out``.
    """

    def __init__(self, cfg: SystemConfig, words_log2: int, mem_latency: int = 6, pe_instance: bool = True,
                 clock_gate: bool = True):
        from .matrix_unit import MatrixUnit

        self.unit = MatrixUnit(cfg, pe_instance, clock_gate=clock_gate)
        super().__init__(cfg, words_log2, mem_latency, forwarded_members(self.unit, exclude=("mem",)))

    def _forward(self, m, unit):
        forward_ports(m, self, unit, exclude=("mem",))
