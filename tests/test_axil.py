"""The AXI4-Lite register block alone on the Amaranth simulator (hw/axil.py, issue 16): reads, writes,
SLVERR, back-pressure on B and R, AW and W arriving in different cycles, and every output of every cycle
of random traffic against a cycle model of the block. Fast: no Verilator build."""

import random

import pytest
from amaranth.sim import Simulator

from hw.axil import OKAY, SLVERR, AxiLiteRegisters
from hw.spec import macro
from hw.spec.soc_regs import CSR, register_table

# A small table: two inputs, two stored registers, two write-only ones (one of them at 0x00C).
TABLE = (("ID", 0x00, "r"), ("CTRL", 0x04, "w"), ("A", 0x08, "rw"), ("DOORBELL", 0x0C, "w"),
         ("COUNT", 0x10, "r"), ("B", 0x14, "rw"))
UNMAPPED = 0x18


def _sim(dut, bench):
    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(bench)
    sim.run()


class Host:
    """AXI4-Lite master steps, one clock edge at a time."""

    def __init__(self, ctx, dut):
        self.ctx, self.dut, self.bus = ctx, dut, dut.bus

    def set(self, **kw):
        for k, v in kw.items():
            self.ctx.set(getattr(self.bus, k), v)

    def get(self, name):
        return self.ctx.get(getattr(self.bus, name))

    async def write(self, addr, data):
        """AW and W together; returns the strobes seen in the handshake cycle and BRESP."""
        self.set(awaddr=addr, awvalid=1, wdata=data, wvalid=1, bready=1)
        while not self.get("awready"):
            await self.ctx.tick()
        assert self.get("wready") == 1
        strobes = [self.ctx.get(s) for s in self.dut.w_stb]
        assert self.ctx.get(self.dut.w_data) == data
        await self.ctx.tick()
        self.set(awvalid=0, wvalid=0)
        assert self.get("bvalid") == 1
        resp = self.get("bresp")
        await self.ctx.tick()
        assert self.get("bvalid") == 0
        return strobes, resp

    async def read(self, addr):
        self.set(araddr=addr, arvalid=1, rready=1)
        while not self.get("arready"):
            await self.ctx.tick()
        await self.ctx.tick()
        self.set(arvalid=0)
        assert self.get("rvalid") == 1
        data, resp = self.get("rdata"), self.get("rresp")
        await self.ctx.tick()
        assert self.get("rvalid") == 0
        return data, resp


def test_reads_writes_and_slverr():
    dut = AxiLiteRegisters(TABLE)

    async def bench(ctx):
        h = Host(ctx, dut)
        ctx.set(dut.input("ID"), 0x1234_5678)
        ctx.set(dut.input(0x10), 77)
        assert await h.read(0x00) == (0x1234_5678, OKAY)
        assert await h.read(0x10) == (77, OKAY)
        assert await h.read(0x08) == (0, OKAY)                  # stored registers reset to 0
        # A write strobes its register only, in the handshake cycle; a stored register keeps the data.
        assert await h.write(0x08, 0xA5A5_0001) == ([0, 1, 0, 0], OKAY)
        assert ctx.get(dut.value("A")) == 0xA5A5_0001
        assert await h.write(0x14, 5) == ([0, 0, 0, 1], OKAY)
        assert await h.write(0x04, 3) == ([1, 0, 0, 0], OKAY)
        assert await h.write(0x0C, 9) == ([0, 0, 1, 0], OKAY)
        assert await h.read(0x08) == (0xA5A5_0001, OKAY)
        assert await h.read(0x14) == (5, OKAY)
        # SLVERR: unmapped offsets, writes to read-only registers, reads of write-only ones; nothing written.
        assert await h.write(UNMAPPED, 1) == ([0, 0, 0, 0], SLVERR)
        assert await h.write(0x00, 1) == ([0, 0, 0, 0], SLVERR)
        assert await h.write(0x10, 1) == ([0, 0, 0, 0], SLVERR)
        assert await h.read(UNMAPPED) == (0, SLVERR)
        assert await h.read(0x04) == (0, SLVERR)
        assert await h.read(0x0C) == (0, SLVERR)
        assert await h.read(0x08) == (0xA5A5_0001, OKAY)
        assert await h.read(0x14) == (5, OKAY)

    _sim(dut, bench)


def test_back_pressure_on_b_and_r():
    dut = AxiLiteRegisters(TABLE)

    async def bench(ctx):
        h = Host(ctx, dut)
        # B held while bready is low; no second write is taken meanwhile.
        h.set(awaddr=0x08, awvalid=1, wdata=11, wvalid=1, bready=0)
        assert h.get("awready") == 1
        await ctx.tick()
        h.set(awaddr=0x14, wdata=22)
        for _ in range(4):
            assert (h.get("bvalid"), h.get("awready"), h.get("wready")) == (1, 0, 0)
            assert [ctx.get(s) for s in dut.w_stb] == [0, 0, 0, 0]
            await ctx.tick()
        h.set(bready=1)
        assert (h.get("bvalid"), h.get("awready")) == (1, 0)
        await ctx.tick()
        # B taken: the pending write is taken in the next cycle (no cycle with B and a new handshake).
        assert (h.get("bvalid"), h.get("awready")) == (0, 1)
        await ctx.tick()
        h.set(awvalid=0, wvalid=0)
        assert ctx.get(dut.value("A")) == 11 and ctx.get(dut.value("B")) == 22
        await ctx.tick()
        # R held (data sampled with AR) while rready is low; arready low until R is taken.
        ctx.set(dut.input("COUNT"), 5)
        h.set(araddr=0x10, arvalid=1, rready=0)
        assert h.get("arready") == 1
        await ctx.tick()
        ctx.set(dut.input("COUNT"), 6)
        for _ in range(3):
            assert (h.get("rvalid"), h.get("rdata"), h.get("arready")) == (1, 5, 0)
            await ctx.tick()
        h.set(rready=1)
        await ctx.tick()
        assert (h.get("rvalid"), h.get("arready")) == (0, 1)
        await ctx.tick()
        h.set(arvalid=0, rready=0)
        assert (h.get("rvalid"), h.get("rdata")) == (1, 6)

    _sim(dut, bench)


def test_aw_and_w_in_different_cycles():
    """AW waits for W (and W for AW): both are taken in the first cycle where both are valid."""
    dut = AxiLiteRegisters(TABLE)

    async def bench(ctx):
        h = Host(ctx, dut)
        h.set(awaddr=0x08, awvalid=1, bready=1)
        for _ in range(3):
            assert (h.get("awready"), h.get("wready")) == (0, 0)
            await ctx.tick()
        h.set(wdata=33, wvalid=1)
        assert (h.get("awready"), h.get("wready")) == (1, 1)
        await ctx.tick()
        h.set(awvalid=0, wvalid=0)
        assert (h.get("bvalid"), h.get("bresp")) == (1, OKAY)
        assert ctx.get(dut.value("A")) == 33
        await ctx.tick()
        h.set(wdata=44, wvalid=1)                                # W first this time
        for _ in range(2):
            assert (h.get("awready"), h.get("wready")) == (0, 0)
            await ctx.tick()
        h.set(awaddr=0x14, awvalid=1)
        assert (h.get("awready"), h.get("wready")) == (1, 1)
        await ctx.tick()
        assert ctx.get(dut.value("B")) == 44

    _sim(dut, bench)


class Model:
    """The block's cycle behaviour (the hand-written slaves of both tops before issue 16)."""

    def __init__(self, table):
        self.table = {off: (name, acc) for name, off, acc in table}
        self.writable = [off for name, off, acc in table if "w" in acc]
        self.stored = {off: 0 for name, off, acc in table if acc == "rw"}
        self.bvalid = self.bresp = self.rvalid = self.rdata = self.rresp = 0

    def outputs(self, i):
        take_w = i["awvalid"] and i["wvalid"] and not self.bvalid
        return {"awready": int(take_w), "wready": int(take_w), "bvalid": self.bvalid, "bresp": self.bresp,
                "arready": int(not self.rvalid), "rvalid": self.rvalid, "rdata": self.rdata, "rresp": self.rresp,
                "w_stb": [int(take_w and i["awaddr"] == off) for off in self.writable],
                "rw_data": list(self.stored.values())}

    def step(self, i, inputs):
        take_w = i["awvalid"] and i["wvalid"] and not self.bvalid
        take_r = i["arvalid"] and not self.rvalid
        if self.bvalid and i["bready"]:
            self.bvalid = 0
        if self.rvalid and i["rready"]:
            self.rvalid = 0
        if take_r:                          # before the write: a read in the write's cycle sees the old value
            self.rvalid = 1
            acc = self.table.get(i["araddr"], ("", "w"))[1]
            self.rresp = OKAY if "r" in acc else SLVERR
            self.rdata = (self.stored[i["araddr"]] if acc == "rw" else inputs[i["araddr"]]) if "r" in acc else 0
        if take_w:
            self.bvalid = 1
            acc = self.table.get(i["awaddr"], ("", "r"))[1]
            self.bresp = OKAY if "w" in acc else SLVERR
            if acc == "rw":
                self.stored[i["awaddr"]] = i["wdata"]


@pytest.mark.parametrize("which", ["small", "soc", "proto"])
def test_random_traffic_matches_the_model(which):
    table = {"small": TABLE,
             "soc": tuple((r.name, r.offset, r.access) for r in register_table(2)),
             "proto": macro.register_table(2)}[which]
    dut = AxiLiteRegisters(table)
    model = Model(table)
    rng = random.Random(16)
    offsets = [off for _, off, _ in table]
    inputs_r = [off for _, off, acc in table if acc == "r"]

    def addr():
        return rng.choice(offsets) if rng.random() < 0.85 else rng.randrange(0, 0x1000, 4)

    async def bench(ctx):
        bus = dut.bus
        i = {"awvalid": 0, "awaddr": 0, "wvalid": 0, "wdata": 0, "bready": 0, "arvalid": 0, "araddr": 0,
             "rready": 0}
        inputs = {off: 0 for off in inputs_r}
        for _ in range(3000):
            # A master that keeps a valid up until it is taken (AXI), with random idle and back-pressure.
            if not i["awvalid"] and rng.random() < 0.4:
                i.update(awvalid=1, awaddr=addr())
            if not i["wvalid"] and rng.random() < 0.4:
                i.update(wvalid=1, wdata=rng.getrandbits(32))
            if not i["arvalid"] and rng.random() < 0.4:
                i.update(arvalid=1, araddr=addr())
            i.update(bready=int(rng.random() < 0.6), rready=int(rng.random() < 0.6))
            for off in inputs_r:
                if rng.random() < 0.3:
                    inputs[off] = rng.getrandbits(32)
                ctx.set(dut.input(off), inputs[off])
            for k, v in i.items():
                ctx.set(getattr(bus, k), v)
            want = model.outputs(i)
            got = {k: ctx.get(getattr(bus, k)) for k in want if k not in ("w_stb", "rw_data")}
            got["w_stb"] = [ctx.get(s) for s in dut.w_stb]
            got["rw_data"] = [ctx.get(s) for s in dut.rw_data]
            assert got == want
            if want["w_stb"] != [0] * len(want["w_stb"]):
                assert ctx.get(dut.w_data) == i["wdata"]
            model.step(i, inputs)
            if want["awready"]:
                i.update(awvalid=0, wvalid=0)
            if want["arready"] and i["arvalid"]:
                i.update(arvalid=0)
            await ctx.tick()

    _sim(dut, bench)


def test_soc_and_proto_tables():
    soc = AxiLiteRegisters(register_table(2))
    assert {off for _, off, acc in soc.table if "w" in acc} == {CSR.CTRL, CSR.PROG_ADDR, CSR.PROG_LEN}
    proto = AxiLiteRegisters(macro.register_table(2))
    assert proto.value(macro.CSR.MACRO3) is proto.rw_data[3]
    assert proto.input("CH1_MACS") is proto.input(0x130)
    with pytest.raises(KeyError, match="No read-only register"):
        proto.input(macro.CSR.DOORBELL)


@pytest.mark.parametrize("table, message", [
    ((("A", 0, "x"),), "Access of register A must be one of"),
    ((("A", 2, "r"),), "Offset of register A must be a multiple of 4"),
    ((("A", 0x1000, "r"),), "Offset of register A must be a multiple of 4 below 0x1000"),
    ((("A", 0, "r"), ("B", 0, "r")), "Two registers have one offset"),
    ((("A", 0, "r"), ("A", 4, "r")), "Two registers have one name"),
    ((("A", 0),), "A register must be"),
])
def test_bad_tables(table, message):
    with pytest.raises(ValueError, match=message):
        AxiLiteRegisters(table)
