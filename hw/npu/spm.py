"""Scratchpad memories of the matrix unit (``lib.memory``), and their port signatures.

Three scratchpads, sized by :class:`hw.config.NpuConfig`:

==========  =====================  ==============================  ==========================
name        word                   written by                      read by
==========  =====================  ==============================  ==========================
act         ``array_rows`` x BF16  load DMA                        compute (activation rows)
wgt         ``array_cols`` x BF16  load DMA                        compute (weight rows)
acc         ``array_cols`` x FP32  compute (read-modify-write)     compute, store DMA
==========  =====================  ==============================  ==========================

Each has one write port and one or two synchronous read ports (data one cycle
after the address: ``latency = 1``). Ports are independent, so a DMA load can
fill one region while the array reads another; the instruction stream's
dependency tokens keep them apart.
"""

from amaranth.hdl import Module
from amaranth.lib import data, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

__all__ = ["SpmReadSignature", "SpmWriteSignature", "Scratchpad"]


class SpmReadSignature(wiring.Signature):
    """Read port, requester side: ``addr``/``en`` out, ``data`` in one cycle later."""

    def __init__(self, addr_bits: int, shape):
        super().__init__({"addr": Out(addr_bits), "en": Out(1), "data": In(shape)})


class SpmWriteSignature(wiring.Signature):
    """Write port, requester side."""

    def __init__(self, addr_bits: int, shape):
        super().__init__({"addr": Out(addr_bits), "en": Out(1), "data": Out(shape)})


class Scratchpad(wiring.Component):
    """One scratchpad: ``depth`` words of ``lanes`` x ``lane_bits``.

    Parameters
    ----------
    depth : int
        Words; a power of two.
    lanes, lane_bits : int
        Word shape (``ArrayLayout(lane_bits, lanes)``).
    read_ports : int
        Number of read ports (1 or 2).

    Members
    -------
    w : In(SpmWriteSignature)
    r : In(SpmReadSignature).array(read_ports)
    """

    latency = 1

    def __init__(self, depth: int, lanes: int, lane_bits: int, read_ports: int = 1):
        if not isinstance(depth, int) or depth < 2 or depth & (depth - 1):
            raise ValueError(f"Scratchpad depth must be a power of two of at least 2, not {depth!r}")
        if not isinstance(lanes, int) or lanes < 1:
            raise ValueError(f"Scratchpad lanes must be a positive integer, not {lanes!r}")
        if read_ports not in (1, 2):
            raise ValueError(f"Scratchpad read ports must be 1 or 2, not {read_ports!r}")
        self._depth = depth
        self._shape = data.ArrayLayout(lane_bits, lanes)
        self._read_ports = read_ports
        addr_bits = (depth - 1).bit_length()
        super().__init__({"w": In(SpmWriteSignature(addr_bits, self._shape)),
                          "r": In(SpmReadSignature(addr_bits, self._shape)).array(read_ports)})

    @property
    def depth(self) -> int:
        return self._depth

    @property
    def addr_bits(self) -> int:
        return (self._depth - 1).bit_length()

    @property
    def word_shape(self):
        return self._shape

    def elaborate(self, platform):
        m = Module()
        m.submodules.mem = mem = Memory(shape=self._shape.size, depth=self._depth, init=[])
        wp = mem.write_port()
        m.d.comb += [wp.addr.eq(self.w.addr), wp.data.eq(self.w.data.as_value()), wp.en.eq(self.w.en)]
        for port in self.r:
            rp = mem.read_port()
            m.d.comb += [rp.addr.eq(port.addr), rp.en.eq(port.en), port.data.eq(rp.data)]
        return m
