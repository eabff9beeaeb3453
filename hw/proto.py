"""The FPGA-prototype top: AXI4-Lite registers and an AXI4 window onto device memory, in front of the
PCU, the memory controllers and (in simulation) the PIM device.

This is what the paper's VCU118 prototype exposes through its PCIe bridge
(ARCHITECTURE.md §2): the host writes macro PIM commands into registers and
rings a doorbell (a queue of ``QUEUE_DEPTH`` commands feeds the PCU), reads
status, the error code and performance counters, and reads and writes device
memory through the AXI4 window.

``s_axil`` (AXI4-Lite, 32-bit data): the register map of
:data:`hw.spec.macro.CSR_TABLE`. An unmapped offset, or a write to a
read-only register, answers SLVERR. A doorbell with a full queue drops the
command and sets ``QUEUE_OVERFLOW``.

``s_axi`` (AXI4, one 32-byte column per beat, INCR bursts): every beat
becomes one normal request to the channel that owns its address, issued after
the previous beat's response (in order, one outstanding beat). A burst that
is misaligned or reaches outside device memory touches nothing and answers
SLVERR (every read beat SLVERR with zero data).

Port names follow AXI (``s_axi__awaddr``...), so cocotbext-axi builds its bus
from the prefix ``s_axi_`` (Amaranth's ``__`` separator supplies the second
underscore).
"""

from amaranth.hdl import Cat, Module, Mux, Signal
from amaranth.lib import wiring
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.lib.wiring import In, Out

from .axil import OKAY, SLVERR, AxiLiteRegisters, AxiLiteSignature
from .config import SystemConfig
from .memif import AddressMap
from .pcu import PcuSystem
from .spec import macro as _macro
from .spec.macro import GEOMETRY_FIELDS, geometry_fields, geometry_word  # noqa: F401  (re-exported)

__all__ = ["ProtoTop", "PhyStub", "AxiLiteSignature", "AxiSignature", "geometry_word", "GEOMETRY_FIELDS"]

# The register map and the queue from the macro-command table (hw/spec/macro.py), as plain integers.
QUEUE_DEPTH = _macro.QUEUE_DEPTH
DEVICE_ID = _macro.DEVICE_ID
CSR_ID, CSR_CTRL, CSR_STATUS, CSR_ERROR = (int(_macro.CSR[n]) for n in ("ID", "CTRL", "STATUS", "ERROR"))
CSR_MACRO0, CSR_DOORBELL, CSR_QUEUE_LEVEL, CSR_COMPLETED, CSR_CYCLES, CSR_CH_BASE = (
    int(_macro.CSR[n]) for n in ("MACRO0", "DOORBELL", "QUEUE_LEVEL", "COMPLETED", "CYCLES", "CH_BASE"))
CSR_GEOMETRY = int(_macro.CSR.GEOMETRY)
E_QUEUE_OVERFLOW = int(_macro.MacroError.QUEUE_OVERFLOW)
CH_COUNTERS = tuple(_macro.CH_COUNTERS)     # names; offsets CH_BASE + 0x20*c + CH_COUNTERS[name] in the table


class AxiSignature(wiring.Signature):
    """AXI4 (INCR bursts), from the master's side."""

    def __init__(self, addr_width=32, data_width=256, id_width=4):
        super().__init__({
            "awid": Out(id_width), "awaddr": Out(addr_width), "awlen": Out(8), "awsize": Out(3),
            "awburst": Out(2), "awvalid": Out(1), "awready": In(1),
            "wdata": Out(data_width), "wstrb": Out(data_width // 8), "wlast": Out(1), "wvalid": Out(1),
            "wready": In(1),
            "bid": In(id_width), "bresp": In(2), "bvalid": In(1), "bready": Out(1),
            "arid": Out(id_width), "araddr": Out(addr_width), "arlen": Out(8), "arsize": Out(3),
            "arburst": Out(2), "arvalid": Out(1), "arready": In(1),
            "rid": In(id_width), "rdata": In(data_width), "rresp": In(2), "rlast": In(1), "rvalid": In(1),
            "rready": Out(1),
        })


def axi_discard_write(m, ax):
    """In an AXI4 slave's state machine: take the data beats of a write burst the slave refuses, then go to
    state ``Write-Response`` (where :func:`axi_write_response_state` answers it)."""
    m.d.comb += ax.wready.eq(1)
    with m.If(ax.wvalid & ax.wlast):
        m.next = "Write-Response"


def axi_write_response_state(m, ax):
    """An AXI4 slave's state ``Write-Response``: the B beat (``bid`` / ``bresp`` driven by the caller) until it
    is taken, then state ``Idle``."""
    with m.State("Write-Response"):
        m.d.comb += ax.bvalid.eq(1)
        with m.If(ax.bready):
            m.next = "Idle"


class ProtoTop(wiring.Component):
    """The prototype: AXI4-Lite CSRs + AXI4 memory window + macro queue + :class:`hw.pcu.PcuSystem`.

    Members
    -------
    s_axil : In(AxiLiteSignature())
    s_axi : In(AxiSignature(data_width=column_bits))
    bd_load : In(1)       the device's back door (simulation)
    mon : Out(BusMonitorSignature).array(channels)   the command bus the device sees (protocol checker)
    s : Out(PimStatusSignature).array(channels)      the device's status
    """

    def __init__(self, cfg: SystemConfig, device_factory):
        from .memctrl import BusMonitorSignature
        from .pim.channel import PimStatusSignature

        if not isinstance(cfg, SystemConfig):
            raise TypeError(f"Configuration must be a SystemConfig, not {cfg!r}")
        self.cfg = cfg
        self._device_factory = device_factory
        C = cfg.pim.channels
        super().__init__({"s_axil": In(AxiLiteSignature()),
                          "s_axi": In(AxiSignature(data_width=cfg.pim.column_bits)), "bd_load": In(1),
                          "mon": Out(BusMonitorSignature(cfg)).array(C), "s": Out(PimStatusSignature()).array(C)})

    def elaborate(self, platform):
        m = Module()
        cfg = self.cfg
        p = cfg.pim
        C = p.channels
        m.submodules.sys = sysm = PcuSystem(cfg, self._device_factory)
        m.d.comb += sysm.bd_load.eq(self.bd_load)
        for c in range(C):
            wiring.connect(m, sysm.mon[c], wiring.flipped(self.mon[c]))
            wiring.connect(m, sysm.s[c], wiring.flipped(self.s[c]))

        # ---------------- registers (AXI4-Lite) ----------------
        m.submodules.regs = regs = AxiLiteRegisters(_macro.register_table(C))
        wiring.connect(m, wiring.flipped(self.s_axil), regs.bus)
        cycles = Signal(32)
        m.d.sync += cycles.eq(cycles + 1)
        macro_words = [regs.value(CSR_MACRO0 + 4 * i) for i in range(4)]
        m.submodules.queue = queue = SyncFIFOBuffered(width=128, depth=QUEUE_DEPTH)
        q_err = Signal(8)
        clear = Signal()
        m.d.comb += sysm.clear.eq(clear)
        level = queue.level
        error = Mux(sysm.error != 0, sysm.error, q_err)
        busy = (level != 0) | sysm.busy
        status = Cat(busy, error != 0, level == QUEUE_DEPTH, level == 0)
        m.d.comb += [sysm.macro.valid.eq(queue.r_rdy), sysm.macro.payload.eq(queue.r_data),
                     queue.r_en.eq(sysm.macro.ready)]
        with m.If(regs.written(CSR_CTRL) & regs.w_data[0]):
            m.d.comb += clear.eq(1)
            m.d.sync += q_err.eq(0)
        with m.If(regs.written(CSR_DOORBELL)):
            with m.If(queue.w_rdy):
                m.d.comb += [queue.w_en.eq(1), queue.w_data.eq(Cat(*macro_words))]
            with m.Elif(error == 0):
                m.d.sync += q_err.eq(E_QUEUE_OVERFLOW)
        m.d.comb += [regs.input(CSR_ID).eq(DEVICE_ID), regs.input(CSR_STATUS).eq(status),
                     regs.input(CSR_ERROR).eq(error), regs.input(CSR_QUEUE_LEVEL).eq(level),
                     regs.input(CSR_COMPLETED).eq(sysm.completed), regs.input(CSR_CYCLES).eq(cycles),
                     regs.input(CSR_GEOMETRY).eq(geometry_word(p))]
        # Per-channel counters: controller busy/commands/refreshes/pim_wait and the device's MAC count.
        for c in range(C):
            k, st = sysm.k[c], sysm.s[c]
            srcs = (k.busy, k.commands, k.refreshes, k.pim_wait, st.n_mac)
            for name, src in zip(CH_COUNTERS, srcs, strict=True):
                m.d.comb += regs.input(CSR_CH_BASE + 0x20 * c + _macro.CH_COUNTERS[name]).eq(src)

        # ---------------- memory window (AXI4) ----------------
        ax = self.s_axi
        amap = AddressMap(p)
        cb = p.column_bytes
        reqs, resps = sysm.r, sysm.q

        def window_ok(addr, length):
            end = addr + (length + 1) * cb
            return (addr[:amap.col_lo] == 0) & (end <= p.total_bytes)

        # One transaction at a time (writes first), one beat in flight.
        t_id = Signal(len(ax.awid))
        t_addr = Signal(32)
        t_left = Signal(9)
        t_bad = Signal()
        t_err = Signal()
        t_data = Signal(p.column_bits)
        t_resp = Signal(2)
        t_ch = Signal(range(C))
        cur_ch = Signal(range(C))
        m.d.comb += t_ch.eq(amap.rtl_fields(t_addr)["channel"] if p.channel_addr_bits else 0)
        m.d.comb += [ax.bid.eq(t_id), ax.rid.eq(t_id), ax.rdata.eq(t_data), ax.rresp.eq(t_resp),
                     ax.rlast.eq(t_left == 0), ax.bresp.eq(Mux(t_bad | t_err, SLVERR, OKAY))]
        size_ok_w = ax.awsize == (cb - 1).bit_length()
        size_ok_r = ax.arsize == (cb - 1).bit_length()
        for c in range(C):
            pl = reqs[c].payload
            m.d.comb += [pl.addr.eq(t_addr), pl.data.eq(ax.wdata), pl.mask.eq(ax.wstrb), pl.tag.eq(0)]

        def taken_responses():
            """Channel ``cur_ch``'s response, taken (``ready``) when valid: yields each channel's response stream
            inside ``If(cur_ch == c)`` and ``If(valid)``, where the loop body's statements land."""
            for c in range(C):
                with m.If(cur_ch == c):
                    m.d.comb += resps[c].ready.eq(1)
                    with m.If(resps[c].valid):
                        yield resps[c]

        with m.FSM(name="axi"):
            with m.State("Idle"):
                with m.If(ax.awvalid):
                    m.d.comb += ax.awready.eq(1)
                    m.d.sync += [t_id.eq(ax.awid), t_addr.eq(ax.awaddr), t_err.eq(0),
                                 t_bad.eq(~window_ok(ax.awaddr, ax.awlen) | (ax.awburst != 1) | ~size_ok_w)]
                    m.next = "Write-Data"
                with m.Elif(ax.arvalid):
                    m.d.comb += ax.arready.eq(1)
                    m.d.sync += [t_id.eq(ax.arid), t_addr.eq(ax.araddr), t_left.eq(ax.arlen),
                                 t_bad.eq(~window_ok(ax.araddr, ax.arlen) | (ax.arburst != 1) | ~size_ok_r)]
                    m.next = "Read-Request"
            with m.State("Write-Data"):
                with m.If(t_bad):
                    axi_discard_write(m, ax)
                with m.Else():
                    for c in range(C):
                        with m.If(t_ch == c):
                            m.d.comb += [reqs[c].payload.write.eq(1), reqs[c].valid.eq(ax.wvalid),
                                         ax.wready.eq(reqs[c].ready)]
                    with m.If(ax.wvalid & ax.wready):
                        m.d.sync += [t_addr.eq(t_addr + cb), cur_ch.eq(t_ch), t_left.eq(ax.wlast)]
                        m.next = "Write-Ack"
            with m.State("Write-Ack"):
                for resp in taken_responses():
                    m.d.sync += t_err.eq(t_err | resp.payload.error)
                    with m.If(t_left[0]):
                        m.next = "Write-Response"
                    with m.Else():
                        m.next = "Write-Data"
            axi_write_response_state(m, ax)
            with m.State("Read-Request"):
                with m.If(t_bad):
                    m.d.sync += [t_data.eq(0), t_resp.eq(SLVERR)]
                    m.next = "Read-Beat"
                with m.Else():
                    for c in range(C):
                        with m.If(t_ch == c):
                            m.d.comb += [reqs[c].payload.write.eq(0), reqs[c].valid.eq(1)]
                            with m.If(reqs[c].ready):
                                m.d.sync += cur_ch.eq(t_ch)
                                m.next = "Read-Wait"
            with m.State("Read-Wait"):
                for resp in taken_responses():
                    m.d.sync += [t_data.eq(resp.payload.data), t_resp.eq(Mux(resp.payload.error, SLVERR, OKAY))]
                    m.next = "Read-Beat"
            with m.State("Read-Beat"):
                m.d.comb += ax.rvalid.eq(1)
                with m.If(ax.rready):
                    m.d.sync += [t_addr.eq(t_addr + cb), t_left.eq(t_left - 1)]
                    with m.If(t_left == 0):
                        m.next = "Idle"
                    with m.Else():
                        m.next = "Read-Request"
        return m


class PhyStub(wiring.Component):
    """Synthesis stand-in for the PIM device: the FPGA part of the prototype without the device model.

    On the VCU118 the controllers drive real AiM chips through a PHY; for resource and Fmax figures this
    stub takes every command-bus bit (folded into a registered word per channel, so nothing is
    optimised away) and returns read data ``tRL`` cycles after a read command, as the device would.
    Same ports as :class:`hw.pim.channel.PimDevice`.
    """

    def __init__(self, cfg: SystemConfig):
        from .pim.channel import PimBusSignature, PimStatusSignature

        self.cfg = cfg
        super().__init__({"c": In(PimBusSignature(cfg)).array(cfg.pim.channels),
                          "s": Out(PimStatusSignature()).array(cfg.pim.channels), "bd_load": In(1)})

    def elaborate(self, platform):
        from .pim.commands import READ_OPS
        from .pim.timing import delay_pipe

        m = Module()
        t = self.cfg.timing
        for c in range(self.cfg.pim.channels):
            bus, st = self.c[c], self.s[c]
            bits = Cat(bus.op, bus.bank, bus.row, bus.col, bus.mask, bus.data)
            words = [bits[i:i + 32] for i in range(0, len(bits), 32)]
            fold = words[0]
            for w in words[1:]:
                fold = fold ^ w
            m.d.sync += st.vcycle.eq(st.vcycle ^ fold)
            valid = bus.op.as_value().matches(*READ_OPS)
            valid, data = delay_pipe(m, valid, bus.data, t.tRL, f"phy{c}")
            m.d.comb += [bus.rvalid.eq(valid), bus.rdata.eq(data)]
        return m
