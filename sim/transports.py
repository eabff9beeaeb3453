"""Transports for the host driver (firmware/driver.py) onto the RTL prototype in cocotb.

:class:`AxiTransport` drives :class:`hw.proto.ProtoTop` through cocotbext-axi
masters: AXI4-Lite for the registers, AXI4 for the device-memory window.
(:class:`firmware.driver.FunctionalTransport` is the no-simulator transport.)
"""

from __future__ import annotations

import itertools
import random


class AxiResponseError(IOError):
    """An AXI access answered SLVERR/DECERR."""


class AxiTransport:
    def __init__(self, dut, pause_seed: int | None = None, pause_prob: float = 0.0):
        from cocotbext.axi import AxiBus, AxiLiteBus, AxiLiteMaster, AxiMaster

        # Verilator 5.006 + cocotb-bus: read every port once by name before building the buses
        # (its dir() inspection caches read-only handles otherwise; see shared/STYLE.md).
        for prefix, names in (("s_axil__", ("awaddr", "awprot", "awvalid", "awready", "wdata", "wstrb", "wvalid",
                                            "wready", "bresp", "bvalid", "bready", "araddr", "arprot", "arvalid",
                                            "arready", "rdata", "rresp", "rvalid", "rready")),
                              ("s_axi__", ("awid", "awaddr", "awlen", "awsize", "awburst", "awvalid", "awready",
                                           "wdata", "wstrb", "wlast", "wvalid", "wready", "bid", "bresp", "bvalid",
                                           "bready", "arid", "araddr", "arlen", "arsize", "arburst", "arvalid",
                                           "arready", "rid", "rdata", "rresp", "rlast", "rvalid", "rready"))):
            for name in names:
                getattr(dut, prefix + name)
        self.dut = dut
        self.axil = AxiLiteMaster(AxiLiteBus.from_prefix(dut, "s_axil_"), dut.clk, dut.rst)
        self.axi = AxiMaster(AxiBus.from_prefix(dut, "s_axi_"), dut.clk, dut.rst)
        if pause_prob > 0:
            rng = random.Random(pause_seed)

            def pauses():
                return itertools.cycle([rng.random() < pause_prob for _ in range(997)])

            for master in (self.axi, self.axil):
                for iface in (master.write_if, master.read_if):
                    for name in ("aw_channel", "w_channel", "b_channel", "ar_channel", "r_channel"):
                        ch = getattr(iface, name, None)
                        if ch is not None:
                            ch.set_pause_generator(pauses())

    async def write_mem(self, addr: int, data: bytes):
        resp = await self.axi.write(addr, bytes(data))
        if int(resp.resp) != 0:
            raise AxiResponseError(f"AXI write of {len(data)} bytes at {addr:#x}: response {resp.resp!r}")

    async def read_mem(self, addr: int, n: int) -> bytes:
        resp = await self.axi.read(addr, n)
        if int(resp.resp) != 0:
            raise AxiResponseError(f"AXI read of {n} bytes at {addr:#x}: response {resp.resp!r}")
        return bytes(resp.data)

    async def write_csr(self, off: int, value: int):
        resp = await self.axil.write(off, int(value).to_bytes(4, "little"))
        if int(resp.resp) != 0:
            raise AxiResponseError(f"register write at {off:#x}: response {resp.resp!r}")

    async def read_csr(self, off: int) -> int:
        resp = await self.axil.read(off, 4)
        if int(resp.resp) != 0:
            raise AxiResponseError(f"register read at {off:#x}: response {resp.resp!r}")
        return int.from_bytes(bytes(resp.data), "little")

    async def wait(self, cycles: int):
        from cocotb.triggers import ClockCycles

        await ClockCycles(self.dut.clk, cycles)
