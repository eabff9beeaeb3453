"""The SoC top: command processor, NPU (matrix unit, vector queue), PCU, memory fabric, one memory
controller per channel and (in simulation) the PIM device, behind AXI4-Lite registers and an AXI4
window onto device memory.

::

    s_axil (CSRs: firmware.soc_regs)          s_axi (AXI4 window, 32-byte beats)
        |  START / CLEAR / counters                 |
        v                                           v
    CommandProcessor --mu--> MatrixUnit        AxiWindow
        |        |--vq--> VectorQueue              |
        |        +--pcu-> macro queue -> Pcu --+   |
        | fetch      | DMA       | DMA        |    |
        v            v           v            |    v
    MemFabric  m1 (CP)  m2 (MU)  m3 (VQ)      |   m0 (host)      in-order responses per requester
        | r[c] / q[c]                         | p[c] / pr[c] / mode[c]  (PIM micro commands)
        v                                     v
    MemCtrlSystem: one MemoryController per channel + the PIM device (mon[c], s[c], bd_load)

The host writes a program (:mod:`hw.spec.soc_isa`) and its data into device memory
through the window, sets ``PROG_ADDR`` / ``PROG_LEN`` and writes ``CTRL.START``;
``done`` (also ``STATUS.DONE``) rises when the program's END retires. The
register map is :func:`firmware.soc_regs.register_table` (one table for RTL,
host and docs); every counter it names is wired here from its source.

Queues: the matrix unit and the vector queue have their own instruction
queues; the PCU takes one macro at a time, so a queue of ``macro_depth``
macros sits in front of it and the command processor runs ahead of PIM
(NPU instructions after a PIM sequence are dispatched while it runs). A
FENCE or END on the PCU waits for that queue too.

``START`` is taken when the command processor is idle (a START while it runs
is dropped) and waits until the units are idle; ``CLEAR | START`` in one
write clears, then starts. ``CLEAR`` aborts the command processor and drops
the queued macros and the instructions queued in the matrix unit and the
vector queue; the instructions running in them finish (START waits for
them), then the matrix unit's dependency tokens are zeroed.

``ERROR_PC``: the command processor's, except for errors of the PCU and the
vector queue, which fail instructions they took from a queue earlier: the
index travels with each macro through the macro queue, and the indices of
vector-queue instructions are kept in dispatch order and retired one per
instruction the queue finishes (its ``instructions`` counter), so
``ERROR_PC`` names the failing instruction. For the matrix unit it is exact
for the errors found when an instruction is decoded (all but memory errors
and token overflow, which name the last MATRIX instruction dispatched).

``s_axi``: one 32-byte column per beat, INCR bursts of ``AxSIZE = 5``. Beats
become normal requests on the fabric's host port, pipelined (requests go out
as fast as the fabric takes them; read data returns in order as it arrives; a
write burst's B response waits for every acknowledgement). A burst that is
misaligned, reaches outside device memory, or has another size or burst type
touches nothing and answers SLVERR (every read beat SLVERR with zero data);
a beat the memory answers with ``error`` answers SLVERR too.

Counters are reset by ``CTRL.RESET_COUNTERS``: the command processor's and the
SoC's own counters are zeroed; the others (the units', the fabric's, the
controllers', which only wrap) are read relative to a snapshot taken then. The
matrix unit and the vector queue also zero theirs with their error at
``CTRL.CLEAR`` (their snapshots are zeroed with them).

A matrix-unit instruction rejected with an error gives none of its tokens: the
instructions that wait on them stay queued (the unit stays busy) until
``CLEAR`` drops them.
"""

from amaranth.hdl import Cat, Const, Module, Mux, ResetInserter, Signal
from amaranth.lib import wiring
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.lib.wiring import In, Out

from .axil import OKAY, SLVERR, AxiLiteRegisters, AxiLiteSignature
from .config import SystemConfig
from .cp import CommandProcessor, UnitPort
from .memif import MemPortSignature
from .proto import AxiSignature, axi_discard_write, axi_write_response_state
from .spec.soc_isa import CpError
from .spec.soc_regs import CSR, REQUESTERS, SOC_ID, Ctrl, register_table

__all__ = ["SocTop", "AxiWindow"]

VQ_DEPTH = 8            # the vector queue's instruction FIFO


class AxiWindow(wiring.Component):
    """AXI4 slave onto unified memory: every 32-byte beat one normal request, pipelined, in order.

    Parameters
    ----------
    cfg : SystemConfig

    Members
    -------
    s_axi : In(AxiSignature(data_width=column_bits))
    mem : Out(MemPortSignature(cfg))
        Responses must come back in request order (a :class:`hw.fabric.MemFabric` port).
    busy : Out(1)
        A burst in progress.
    """

    def __init__(self, cfg: SystemConfig):
        if not isinstance(cfg, SystemConfig):
            raise TypeError(f"Configuration must be a SystemConfig, not {cfg!r}")
        self.cfg = cfg
        super().__init__({
            "s_axi": In(AxiSignature(data_width=cfg.pim.column_bits)),
            "mem": Out(MemPortSignature(cfg)),
            "busy": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        p = self.cfg.pim
        cb = p.column_bytes
        size = (cb - 1).bit_length()
        ax = self.s_axi
        req, resp = self.mem.req, self.mem.resp

        def window_ok(addr, length, burst, asize):
            end = addr + (length + 1) * cb
            return (addr[:size] == 0) & (end <= p.total_bytes) & (burst == 1) & (asize == size)

        t_id = Signal(len(ax.awid))
        t_addr = Signal(32)
        t_len = Signal(9)            # beats - 1
        t_bad = Signal()
        t_err = Signal()
        issued = Signal(9)           # requests issued (read) / beats taken (write)
        answered = Signal(9)         # responses received
        w_last_in = Signal()         # the write burst's last beat was taken
        m.d.comb += [ax.bid.eq(t_id), ax.rid.eq(t_id), ax.bresp.eq(Mux(t_bad | t_err, SLVERR, OKAY))]
        # The tag carries the AXI ID (the fabric keeps order per requester; nothing routes on it). Not a
        # constant: Yosys writes a constant-only part of the payload as an ``always @*`` that Icarus never
        # triggers, which left the tag X and hung the window's reads on Icarus.
        m.d.comb += [req.payload.addr.eq(t_addr), req.payload.data.eq(ax.wdata), req.payload.mask.eq(ax.wstrb),
                     req.payload.tag.eq(t_id)]
        with m.FSM(name="window") as fsm:
            with m.State("Idle"):
                with m.If(ax.awvalid):
                    m.d.comb += ax.awready.eq(1)
                    m.d.sync += [t_id.eq(ax.awid), t_addr.eq(ax.awaddr), t_err.eq(0), issued.eq(0),
                                 answered.eq(0), w_last_in.eq(0),
                                 t_bad.eq(~window_ok(ax.awaddr, ax.awlen, ax.awburst, ax.awsize))]
                    m.next = "Write"
                with m.Elif(ax.arvalid):
                    m.d.comb += ax.arready.eq(1)
                    m.d.sync += [t_id.eq(ax.arid), t_addr.eq(ax.araddr), t_len.eq(ax.arlen), issued.eq(0),
                                 answered.eq(0),
                                 t_bad.eq(~window_ok(ax.araddr, ax.arlen, ax.arburst, ax.arsize))]
                    m.next = "Read"
            with m.State("Write"):
                with m.If(t_bad):
                    axi_discard_write(m, ax)
                with m.Else():
                    m.d.comb += resp.ready.eq(1)
                    with m.If(~w_last_in):
                        m.d.comb += [req.payload.write.eq(1), req.valid.eq(ax.wvalid), ax.wready.eq(req.ready)]
                    take = ax.wvalid & ax.wready
                    got = resp.valid
                    with m.If(take):
                        m.d.sync += [t_addr.eq(t_addr + cb), issued.eq(issued + 1)]
                        with m.If(ax.wlast):
                            m.d.sync += w_last_in.eq(1)
                    with m.If(got):
                        m.d.sync += [answered.eq(answered + 1), t_err.eq(t_err | resp.payload.error)]
                    with m.If(w_last_in & ~take & (answered + got == issued)):
                        m.next = "Write-Response"
            axi_write_response_state(m, ax)
            with m.State("Read"):
                with m.If(t_bad):
                    m.d.comb += [ax.rvalid.eq(1), ax.rdata.eq(0), ax.rresp.eq(SLVERR), ax.rlast.eq(answered == t_len)]
                    with m.If(ax.rready):
                        m.d.sync += answered.eq(answered + 1)
                        with m.If(answered == t_len):
                            m.next = "Idle"
                with m.Else():
                    m.d.comb += [req.payload.write.eq(0), req.valid.eq(issued <= t_len)]
                    with m.If(req.valid & req.ready):
                        m.d.sync += [t_addr.eq(t_addr + cb), issued.eq(issued + 1)]
                    m.d.comb += [ax.rvalid.eq(resp.valid), ax.rdata.eq(resp.payload.data),
                                 ax.rresp.eq(Mux(resp.payload.error, SLVERR, OKAY)), ax.rlast.eq(answered == t_len),
                                 resp.ready.eq(ax.rready)]
                    with m.If(resp.valid & resp.ready):
                        m.d.sync += answered.eq(answered + 1)
                        with m.If(answered == t_len):
                            m.next = "Idle"
        m.d.comb += self.busy.eq(~fsm.ongoing("Idle"))
        return m


def _share_port(m, cfg, a, b):
    """One fabric port for two requesters (the vector queue ``a`` and the SRAM-PIM queue ``b``): requests
    alternate when both are valid, a request held by back-pressure keeps its requester while that one
    stays valid, tag bit 7 names the requester (both use 7-bit tags), responses (in
    request order, as the fabric delivers them) go back by that bit. Returns the shared port (requester
    side, to connect to the fabric)."""
    port = MemPortSignature(cfg).create(path=("shared_vq_spu",))
    last_b = Signal()
    pick_b = Signal()
    held = Signal()                 # a request waiting for ready keeps its requester (stream rule)
    held_b = Signal()
    m.d.comb += pick_b.eq(Mux(held, Mux(held_b, b.req.valid, ~a.req.valid), b.req.valid & (~a.req.valid | ~last_b)))
    m.d.sync += [held.eq(port.req.valid & ~port.req.ready), held_b.eq(pick_b)]
    with m.If(port.req.valid & port.req.ready):
        m.d.sync += last_b.eq(pick_b)
    tag_hi = len(port.req.payload.tag) - 1
    with m.If(pick_b):
        m.d.comb += [port.req.payload.eq(b.req.payload), port.req.payload.tag[tag_hi].eq(1)]
    with m.Else():
        m.d.comb += [port.req.payload.eq(a.req.payload), port.req.payload.tag[tag_hi].eq(0)]
    to_b = port.resp.payload.tag[tag_hi]
    m.d.comb += [
        port.req.valid.eq(a.req.valid | b.req.valid),
        a.req.ready.eq(port.req.ready & ~pick_b), b.req.ready.eq(port.req.ready & pick_b),
        a.resp.payload.eq(port.resp.payload), b.resp.payload.eq(port.resp.payload),
        a.resp.valid.eq(port.resp.valid & ~to_b), b.resp.valid.eq(port.resp.valid & to_b),
        port.resp.ready.eq(Mux(to_b, b.resp.ready, a.resp.ready)),
    ]
    return port


class SocTop(wiring.Component):
    """The SoC (see the module docstring).

    Parameters
    ----------
    cfg : SystemConfig
    device_factory : callable
        Zero-argument factory of the PIM device (:func:`hw.pim.device_factory`).
    fetch_depth : int
        The command processor's prefetch depth.
    rob_depth : int
        The memory fabric's reorder-buffer slots per requester.
    macro_depth : int
        Macro PIM commands queued in front of the PCU.
    pe_instance, lane_instance : bool
        Instantiate the systolic array's PEs and the vector lanes as Verilog modules by name (Verilog
        builds; see :mod:`hw.npu.systolic` and :func:`hw.npu.vector.lane_verilog`).
    clock_gate : bool
        Gate the clocks of the systolic array and the vector lanes while they are idle (simulation
        builds: :mod:`hw.clockgate`). The PIM device gates its processing units on its own.

    Members
    -------
    s_axil : In(AxiLiteSignature())
        Registers (:func:`firmware.soc_regs.register_table`).
    s_axi : In(AxiSignature(data_width=column_bits))
        Window onto device memory.
    bd_load : In(1)
        The device's back door (simulation).
    done, busy : Out(1)
        The command processor's ``done`` and ``busy``.
    error : Out(16)
        The command processor's ``error``.
    unit_busy : Out(3), Out(4) with ``cfg.spu``
        Matrix unit, vector queue, PCU (with its macro queue) busy; the SRAM-PIM queue (:mod:`hw.npu.spu`).
    mon, s : arrays indexed by channel
        The command bus the device sees (for the protocol checker) and the device's status
        (flattened ``mon__<c>__op``, ``s__<c>__nviol``).
    """

    def __init__(self, cfg: SystemConfig, device_factory, fetch_depth: int = 32, rob_depth: int = 32,
                 macro_depth: int = 8, pe_instance: bool = True, lane_instance: bool = True,
                 clock_gate: bool = False):
        from .memctrl import BusMonitorSignature, check_system
        from .pim.channel import PimStatusSignature

        check_system(cfg, device_factory)
        self.cfg = cfg
        self._device_factory = device_factory
        self._fetch_depth = fetch_depth
        self._rob_depth = rob_depth
        if not isinstance(macro_depth, int) or isinstance(macro_depth, bool) or macro_depth < 1:
            raise ValueError(f"Macro queue depth must be a positive integer, not {macro_depth!r}")
        self._macro_depth = macro_depth
        self._pe_instance = pe_instance
        self._clock_gate = clock_gate
        self._lane_instance = lane_instance
        self._spu = cfg.spu is not None
        self.regs = register_table(cfg.pim.channels, spu=self._spu)
        C = cfg.pim.channels
        super().__init__({"s_axil": In(AxiLiteSignature()),
                          "s_axi": In(AxiSignature(data_width=cfg.pim.column_bits)), "bd_load": In(1),
                          "done": Out(1), "busy": Out(1), "error": Out(16), "unit_busy": Out(4 if self._spu else 3),
                          "mon": Out(BusMonitorSignature(cfg)).array(C), "s": Out(PimStatusSignature()).array(C)})

    def elaborate(self, platform):
        from .fabric import MemFabric
        from .memctrl import MemCtrlSystem
        from .npu.matrix_unit import MatrixUnit
        from .npu.vector_queue import VectorQueue
        from .pcu import Pcu

        m = Module()
        cfg = self.cfg
        C = cfg.pim.channels
        cp = m.submodules.cp = CommandProcessor(cfg, self._fetch_depth)
        mu = m.submodules.mu = MatrixUnit(cfg, pe_instance=self._pe_instance, clock_gate=self._clock_gate)
        spu_kw = {"spu_port": True} if self._spu else {}
        vq = m.submodules.vq = VectorQueue(cfg, queue_depth=VQ_DEPTH, lane_instance=self._lane_instance,
                                               clock_gate=self._clock_gate, **spu_kw)
        spu = None
        if self._spu:
            from .npu.spu import Spu
            spu = m.submodules.spu = Spu(cfg)
        pcu = m.submodules.pcu = Pcu(cfg)
        mem = m.submodules.mem = MemCtrlSystem(cfg, self._device_factory)
        fabric = m.submodules.fabric = MemFabric(cfg, len(REQUESTERS), self._rob_depth)
        win = m.submodules.window = AxiWindow(cfg)

        # ---------------- datapath wiring ----------------
        wiring.connect(m, wiring.flipped(self.s_axi), win.s_axi)
        vq_mem = vq.mem
        if spu is not None:
            vq_mem = _share_port(m, cfg, vq.mem, spu.mem)
        for i, port in enumerate((win.mem, cp.mem, mu.mem, vq_mem)):
            wiring.connect(m, port, fabric.m[i])
        for c in range(C):
            wiring.connect(m, fabric.r[c], mem.r[c])
            wiring.connect(m, mem.q[c], fabric.q[c])
            wiring.connect(m, pcu.p[c], mem.p[c])
            wiring.connect(m, mem.pr[c], pcu.pr[c])
            m.d.comb += [mem.mode[c].eq(pcu.mode[c]), pcu.pidle[c].eq(mem.pidle[c]), pcu.perr[c].eq(mem.perr[c])]
            wiring.connect(m, mem.mon[c], wiring.flipped(self.mon[c]))
            wiring.connect(m, mem.s[c], wiring.flipped(self.s[c]))
        m.d.comb += mem.bd_load.eq(self.bd_load)
        wiring.connect(m, cp.mu, UnitPort(cp.mu.signature, instr=mu.instr, busy=mu.busy, error=mu.error_code))
        wiring.connect(m, cp.vq, UnitPort(cp.vq.signature, instr=vq.instr, busy=vq.busy, error=vq.error))
        # The PCU takes one macro at a time; a queue lets the command processor run ahead (NPU work
        # overlaps a PIM sequence). Each entry carries its instruction index for ERROR_PC.
        clear = Signal()
        # CLEAR drops the macros still queued (the PCU, in error, would discard them; after the CLEAR it
        # would run them). The PCU itself is not reset: a macro in flight finishes (rows closed).
        mq = m.submodules.macro_queue = ResetInserter(clear)(
            SyncFIFOBuffered(width=128 + 32, depth=self._macro_depth))
        pcu_busy = Signal()
        m.d.comb += [
            mq.w_data.eq(Cat(cp.pcu.instr.payload, cp.pc)), mq.w_en.eq(cp.pcu.instr.valid),
            cp.pcu.instr.ready.eq(mq.w_rdy),
            pcu.macro.valid.eq(mq.r_rdy), pcu.macro.payload.eq(mq.r_data[:128]), mq.r_en.eq(pcu.macro.ready),
            pcu_busy.eq(pcu.busy | mq.r_rdy),
            cp.pcu.busy.eq(pcu_busy), cp.pcu.error.eq(pcu.error),
            self.done.eq(cp.done), self.busy.eq(cp.busy), self.error.eq(cp.error),
            self.unit_busy[:3].eq(Cat(mu.busy, vq.busy, pcu_busy)),
        ]

        # ---------------- control ----------------
        reset_counters = Signal()
        start_req = Signal()            # CTRL.START written while the command processor was idle
        start = Signal()
        m.submodules.regs = regs = AxiLiteRegisters(self.regs)
        wiring.connect(m, wiring.flipped(self.s_axil), regs.bus)
        prog_addr, prog_len = regs.value(CSR.PROG_ADDR), regs.value(CSR.PROG_LEN)
        units_idle = ~mu.busy & ~vq.busy & ~pcu_busy
        # After a CLEAR the units may still finish instructions they had queued: START waits for them.
        m.d.comb += start.eq(start_req & units_idle & ~clear)
        with m.If(start | clear):
            m.d.sync += start_req.eq(0)
        if spu is not None:
            units_idle = units_idle & ~spu.busy
            m.d.comb += [spu.clear.eq(clear), spu.pc.eq(cp.pc), self.unit_busy[3].eq(spu.busy)]
            wiring.connect(m, cp.spu, UnitPort(cp.spu.signature, instr=spu.instr, busy=spu.busy, error=spu.error))
            wiring.connect(m, vq.spu_rd, spu.spm_rd)
            wiring.connect(m, vq.spu_wr, spu.spm_wr)
            m.d.comb += spu.spm_wr_ready.eq(vq.spu_wr_ready)
        m.d.comb += [cp.clear.eq(clear), mu.clear.eq(clear), vq.clear.eq(clear), pcu.clear.eq(clear),
                     cp.reset_counters.eq(reset_counters), cp.start.eq(start),
                     cp.prog_addr.eq(prog_addr), cp.prog_len.eq(prog_len)]

        # ---------------- ERROR_PC of queued units ----------------
        # The PCU and the vector queue fail instructions they took from a queue some time ago. PCU: the
        # index of the macro it took last (it takes the next one only after the failing one finished).
        # Vector queue: indices in dispatch order, one popped per instruction it finishes (its
        # ``instructions`` counter); the failing one is at the head when its error appears.
        pcu_pc = Signal(32)
        with m.If(pcu.macro.valid & pcu.macro.ready):
            m.d.sync += pcu_pc.eq(mq.r_data[128:])
        vq_pcs = m.submodules.vq_pcs = ResetInserter(clear | start)(
            SyncFIFOBuffered(width=32, depth=2 * VQ_DEPTH))
        vq_done_prev = Signal(32)
        m.d.sync += vq_done_prev.eq(vq.counters.instructions)
        m.d.comb += [vq_pcs.w_data.eq(cp.pc), vq_pcs.w_en.eq(cp.vq.instr.valid & cp.vq.instr.ready),
                     vq_pcs.r_en.eq(vq.counters.instructions != vq_done_prev)]
        fail_pc = Signal(32)
        fail_seen = Signal()
        with m.If(clear):
            m.d.sync += fail_seen.eq(0)
        with m.Elif(~fail_seen & cp.busy):
            # The same priority as the command processor's (MU, VQ, PCU).
            with m.If(mu.error):
                m.d.sync += fail_seen.eq(1)
            with m.Elif((vq.error != 0) & vq_pcs.r_rdy):
                m.d.sync += [fail_seen.eq(1), fail_pc.eq(vq_pcs.r_data)]
            with m.Elif(pcu.error != 0):
                m.d.sync += [fail_seen.eq(1), fail_pc.eq(pcu_pc)]
        cp_code = cp.error[:8]
        error_pc = Mux(fail_seen & ((cp_code == CpError.PCU) | (cp_code == CpError.VQ)), fail_pc, cp.error_pc)
        if spu is not None:
            # The SRAM-PIM queue names its failing instruction itself (the index travels with it).
            error_pc = Mux(cp_code == CpError.SPU, spu.error_pc, error_pc)

        # ---------------- counters ----------------
        sources = self._counter_sources(m, cp, mu, vq, spu, pcu, fabric, mem, reset_counters, clear)
        writable = {reg.offset for reg in self.regs if "w" in reg.access}
        if writable != {CSR.CTRL, CSR.PROG_ADDR, CSR.PROG_LEN}:
            raise ValueError(f"The register table's writable registers {sorted(writable)} are not the SoC's")
        for reg in self.regs:
            if reg.source is not None and reg.source not in sources:
                raise KeyError(f"Register {reg.name} reads counter {reg.source}, which the SoC does not have")

        status = Cat(cp.busy, cp.done, cp.error != 0, mu.busy, vq.busy, pcu.busy, win.busy)
        if spu is not None:
            status = Cat(status, spu.busy)

        # ---------------- registers (AXI4-Lite) ----------------
        with m.If(regs.written(CSR.CTRL)):
            wdata = regs.w_data
            m.d.comb += [clear.eq(wdata[(Ctrl.CLEAR.value - 1).bit_length()]),
                         reset_counters.eq(wdata[(Ctrl.RESET_COUNTERS.value - 1).bit_length()])]
            with m.If(wdata[(Ctrl.START.value - 1).bit_length()] & (~cp.busy | clear)):
                m.d.sync += start_req.eq(1)
        readable = {CSR.ID: Const(SOC_ID, 32), CSR.STATUS: status, CSR.ERROR: cp.error, CSR.ERROR_PC: error_pc}
        for reg in self.regs:
            if reg.access == "r":
                src = sources[reg.source] if reg.source is not None else readable[CSR(reg.offset)]
                m.d.comb += regs.input(reg.offset).eq(src)
        return m

    def _counter_sources(self, m, cp, mu, vq, spu, pcu, fabric, mem, reset_counters, clear):
        """The counters the register table reads, by (group, name): the SoC's own, the command processor's,
        and the units', fabric's and channels' read against a snapshot taken at RESET_COUNTERS (the units'
        zeroed by CLEAR too)."""
        C = self.cfg.pim.channels
        cycles = Signal(32)
        pcu_busy_cycles = Signal(32)
        with m.If(reset_counters):
            m.d.sync += [cycles.eq(0), pcu_busy_cycles.eq(0)]
        with m.Else():
            m.d.sync += [cycles.eq(cycles + 1), pcu_busy_cycles.eq(pcu_busy_cycles + pcu.busy)]
        sources = {("soc", "cycles"): cycles, ("pcu", "busy"): pcu_busy_cycles}
        for name, _ in cp.counters.shape():
            sources[("cp", name)] = getattr(cp.counters, name)
        relative = {}             # counters read against a snapshot: (group, name) -> (raw, zeroed by CLEAR)
        for name, _ in mu.counters.shape():
            relative[("mu", name)] = (getattr(mu.counters, name), True)
        for name, _ in vq.counters.shape():
            relative[("vq", name)] = (getattr(vq.counters, name), True)
        if spu is not None:
            for name, _ in spu.counters.shape():
                relative[("spu", name)] = (getattr(spu.counters, name), True)
        relative[("pcu", "completed")] = (pcu.completed, False)
        for i in range(len(REQUESTERS)):
            relative[("fabric", f"req_stall{i}")] = (fabric.req_stall[i], False)
        for c in range(C):
            k = mem.k[c]
            for name in k.signature.members:
                relative[(f"ch{c}", name)] = (getattr(k, name), False)
        for key, (raw, cleared) in relative.items():
            snap = Signal(32, name=f"snap_{key[0]}_{key[1]}")
            with m.If(reset_counters):
                m.d.sync += snap.eq(raw)
            if cleared:
                with m.Elif(clear):
                    m.d.sync += snap.eq(0)
            sources[key] = (raw - snap)[:32]
        return sources
