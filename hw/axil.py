"""AXI4-Lite: the bus signature and one register block generated from a register table, used by both
tops (:class:`hw.soc.SocTop` with :func:`hw.spec.soc_regs.register_table`, :class:`hw.proto.ProtoTop`
with :func:`hw.spec.macro.register_table`).
"""

from amaranth.hdl import Module, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

__all__ = ["AxiLiteSignature", "AxiLiteRegisters", "OKAY", "SLVERR"]

OKAY, SLVERR = 0, 2
ACCESS = ("r", "w", "rw")


class AxiLiteSignature(wiring.Signature):
    """AXI4-Lite, from the master's side."""

    def __init__(self, addr_width=12, data_width=32):
        super().__init__({
            "awaddr": Out(addr_width), "awprot": Out(3), "awvalid": Out(1), "awready": In(1),
            "wdata": Out(data_width), "wstrb": Out(data_width // 8), "wvalid": Out(1), "wready": In(1),
            "bresp": In(2), "bvalid": In(1), "bready": Out(1),
            "araddr": Out(addr_width), "arprot": Out(3), "arvalid": Out(1), "arready": In(1),
            "rdata": In(data_width), "rresp": In(2), "rvalid": In(1), "rready": Out(1),
        })


def _entry(reg):
    if isinstance(reg, tuple):
        if len(reg) != 3:
            raise ValueError(f"A register must be (name, offset, access), not {reg!r}")
        return reg
    return reg.name, reg.offset, reg.access


class AxiLiteRegisters(wiring.Component):
    """An AXI4-Lite slave over a table of 32-bit registers.

    The block decodes the address and answers the bus; the design behind it sees one port per register:
    read-only registers read an input, read-write registers are stored here, and every writable register
    has a write strobe (a design acts on ``CTRL``-like bits or a doorbell in the strobe's cycle).

    Timing. Write: AW and W are taken together, in a cycle where both are valid and no B response is
    pending (``awready = wready = awvalid & wvalid & ~bvalid``); a write strobe is high in that cycle,
    with ``w_data`` (``wdata``) beside it; B is valid from the next cycle until ``bready``. Read: ``arready
    = ~rvalid``; the register is sampled in the AR cycle and R is valid from the next cycle until
    ``rready``. ``wstrb`` and the protection bits are ignored. An offset not in the table, a write to a
    read-only register or a read of a write-only one answers SLVERR (nothing is written; the read data
    is 0).

    Parameters
    ----------
    registers : iterable
        The table: objects with ``name``, ``offset`` (bytes) and ``access`` (``"r"``, ``"w"``, ``"rw"``)
        such as :class:`hw.spec.soc_regs.Reg`, or ``(name, offset, access)`` tuples.
    addr_width, data_width : int
        Of the bus (:class:`AxiLiteSignature`).

    Members
    -------
    bus : In(AxiLiteSignature(addr_width, data_width))
    r_data : In(data_width).array(len(inputs))
        The value of each read-only register, in table order (:meth:`input`).
    rw_data : Out(data_width).array(len(stored))
        The stored value of each read-write register (reset 0), in table order (:meth:`value`).
    w_stb : Out(1).array(len(writable))
        One per writable register, in table order (:meth:`written`).
    w_data : Out(data_width)
        The data of the accepted write.

    Raises
    ------
    ValueError
        On an access that is not ``r``, ``w`` or ``rw``, an offset that is not a multiple of 4 or does not
        fit the address width, or two registers with one name or offset.
    """

    def __init__(self, registers, *, addr_width: int = 12, data_width: int = 32):
        if not isinstance(addr_width, int) or addr_width < 2:
            raise ValueError(f"Address width must be an integer of at least 2, not {addr_width!r}")
        if data_width not in (32, 64):
            raise ValueError(f"Data width must be 32 or 64, not {data_width!r}")
        table = tuple(_entry(r) for r in registers)
        for name, offset, access in table:
            if access not in ACCESS:
                raise ValueError(f"Access of register {name} must be one of {ACCESS}, not {access!r}")
            if not isinstance(offset, int) or offset < 0 or offset % 4 or offset >= 1 << addr_width:
                raise ValueError(f"Offset of register {name} must be a multiple of 4 below {1 << addr_width:#x}, "
                                 f"not {offset!r}")
        for i, what in ((0, "name"), (1, "offset")):
            keys = [int(e[i]) if i else e[i] for e in table]
            if len(set(keys)) != len(keys):
                raise ValueError(f"Two registers have one {what}: {sorted(k for k in keys if keys.count(k) > 1)}")
        self._table = table
        self._inputs = [e for e in table if e[2] == "r"]
        self._stored = [e for e in table if e[2] == "rw"]
        self._writable = [e for e in table if "w" in e[2]]
        super().__init__({
            "bus": In(AxiLiteSignature(addr_width, data_width)),
            "r_data": In(data_width).array(len(self._inputs)),
            "rw_data": Out(data_width).array(len(self._stored)),
            "w_stb": Out(1).array(len(self._writable)),
            "w_data": Out(data_width),
        })

    @property
    def table(self) -> tuple:
        """``(name, offset, access)`` of every register."""
        return self._table

    @staticmethod
    def _find(entries, key, what):
        for i, (name, offset, _) in enumerate(entries):
            if (name == key) if isinstance(key, str) else (offset == int(key)):
                return i
        raise KeyError(f"No {what} register {key!r}")

    def input(self, key):
        """The input of read-only register ``key`` (offset or name)."""
        return self.r_data[self._find(self._inputs, key, "read-only")]

    def value(self, key):
        """The stored value of read-write register ``key`` (offset or name)."""
        return self.rw_data[self._find(self._stored, key, "read-write")]

    def written(self, key):
        """The write strobe of writable register ``key`` (offset or name)."""
        return self.w_stb[self._find(self._writable, key, "writable")]

    def elaborate(self, platform):
        m = Module()
        bus = self.bus
        stored = [Signal(len(self.w_data), name=f"reg_{name.lower()}") for name, _, _ in self._stored]
        m.d.comb += [self.rw_data[i].eq(s) for i, s in enumerate(stored)]
        m.d.comb += self.w_data.eq(bus.wdata)

        # Write channel: AW and W together, then B.
        bvalid, bresp = Signal(), Signal(2)
        m.d.comb += [bus.bvalid.eq(bvalid), bus.bresp.eq(bresp)]
        take_w = bus.awvalid & bus.wvalid & ~bvalid
        m.d.comb += [bus.awready.eq(take_w), bus.wready.eq(take_w)]
        with m.If(bvalid & bus.bready):
            m.d.sync += bvalid.eq(0)
        with m.If(take_w):
            m.d.sync += [bvalid.eq(1), bresp.eq(OKAY)]
            with m.Switch(bus.awaddr):
                for i, (_name, offset, access) in enumerate(self._writable):
                    with m.Case(offset):
                        m.d.comb += self.w_stb[i].eq(1)
                        if access == "rw":
                            m.d.sync += stored[self._find(self._stored, offset, "")].eq(bus.wdata)
                with m.Default():
                    m.d.sync += bresp.eq(SLVERR)

        # Read channel: the register sampled with AR, R the cycle after.
        rvalid, rdata, rresp = Signal(), Signal(len(bus.rdata)), Signal(2)
        m.d.comb += [bus.rvalid.eq(rvalid), bus.rdata.eq(rdata), bus.rresp.eq(rresp)]
        m.d.comb += bus.arready.eq(~rvalid)
        with m.If(rvalid & bus.rready):
            m.d.sync += rvalid.eq(0)
        with m.If(bus.arvalid & ~rvalid):
            m.d.sync += [rvalid.eq(1), rresp.eq(OKAY), rdata.eq(0)]
            with m.Switch(bus.araddr):
                for _name, offset, access in self._table:
                    if access == "w":
                        continue
                    with m.Case(offset):
                        if access == "r":
                            m.d.sync += rdata.eq(self.input(offset))
                        else:
                            m.d.sync += rdata.eq(stored[self._find(self._stored, offset, "")])
                with m.Default():
                    m.d.sync += rresp.eq(SLVERR)
        return m
