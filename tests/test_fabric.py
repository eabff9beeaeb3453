# amaranth: UnusedElaboratable=no
"""MemFabric (hw/fabric.py): N requesters onto the channels' controllers, responses in request order.

The Verilator tests (sim/tb/fabric_tb.py) run the fabric on the tiny preset
(2 channels) with 3 requesters against Python channel models that answer out
of order; a small Amaranth-simulator test covers one requester with a
two-slot ROB (no requester-id bits), and the constructor checks (the first
line silences Amaranth's warning about components built only to be checked).
"""

import pytest
from amaranth.sim import Simulator

from hw.config import preset
from hw.fabric import MemFabric
from hw.memif import AddressMap
from sim.build import build

TB = "sim.tb.fabric_tb"
N_REQ = 3


def fabric_build():
    cfg = preset("tiny")
    return build(lambda: MemFabric(cfg, N_REQ), name="mem_fabric_tiny", key=f"{cfg!r} n={N_REQ} rob=32")


def run(testcase, **env):
    return fabric_build().run(TB, testcase, env={"IANUS_CONFIG": "tiny", "N_REQUESTERS": N_REQ, **env})


def test_random_out_of_order():
    run("random_out_of_order")


def test_no_cross_blocking():
    run("no_cross_blocking")


def test_throughput():
    run("throughput")


@pytest.mark.parametrize("args, exc, message", [
    ((0,), ValueError, "Number of requesters must be an integer of at least 1, not 0"),
    (("2",), ValueError, "Number of requesters must be an integer"),
    ((2, 24), ValueError, "Reorder-buffer depth must be a power of two in \\[2, 64\\], not 24"),
    ((2, 1), ValueError, "Reorder-buffer depth must be a power of two in \\[2, 64\\], not 1"),
    ((2, 128), ValueError, "Reorder-buffer depth must be a power of two in \\[2, 64\\], not 128"),
    ((5, 64), ValueError, "Channel tag does not fit in 8 bits: 5 requesters need 3 requester-id bits and "
                          "rob_depth 64 needs 6 slot bits \\(9 > 8\\)"),
])
def test_parameter_checks(args, exc, message):
    with pytest.raises(exc, match=message):
        MemFabric(preset("tiny"), *args)


def test_parameter_limits_accepted():
    cfg = preset("tiny")
    assert MemFabric(cfg, 4, 64).slot_bits == 6
    assert MemFabric(cfg, 128, 2).rid_bits == 7
    assert MemFabric(cfg, 1, 2).rid_bits == 0
    with pytest.raises(TypeError, match="SystemConfig"):
        MemFabric("tiny", 1)


def test_one_requester_two_slots_amaranth_sim():
    """One requester (no id bits), two ROB slots: responses out of order across channels come back in order,
    a third request waits for a slot (counted as a stall), a misaligned request gets error=1 in its place."""
    cfg = preset("tiny")
    amap = AddressMap(cfg.pim)
    dut = MemFabric(cfg, 1, rob_depth=2)
    a0 = amap.encode(1, 0, 2, 3)          # channel 0
    a1 = amap.encode(2, 1, 4, 5)          # channel 1
    log = {}

    async def testbench(ctx):
        (m0,), (r0, r1), (q0, q1) = dut.m, dut.r, dut.q
        ctx.set(r0.ready, 1)
        ctx.set(r1.ready, 1)
        ctx.set(m0.resp.ready, 1)

        seen = {0: [], 1: []}

        async def tick_watch():
            """One cycle: record channel requests; a requester request is sent once (valid drops)."""
            for c, r in ((0, r0), (1, r1)):
                if ctx.get(r.valid) and ctx.get(r.ready):
                    seen[c].append(ctx.get(r.payload))
            sent = ctx.get(m0.req.valid) and ctx.get(m0.req.ready)
            await ctx.tick()
            if sent:
                ctx.set(m0.req.valid, 0)

        async def send(addr, tag, write=0, data=0):
            ctx.set(m0.req.payload, {"addr": addr, "write": write, "data": data, "mask": 0xFFFFFFFF, "tag": tag})
            ctx.set(m0.req.valid, 1)
            while ctx.get(m0.req.valid):
                await tick_watch()

        ctx.set(m0.req.payload, {"addr": a0, "write": 0, "data": 0, "mask": 0, "tag": 0x11})
        ctx.set(m0.req.valid, 1)
        assert ctx.get(m0.req.ready)
        await tick_watch()                                     # A accepted (slot 0)
        ctx.set(m0.req.valid, 1)
        ctx.set(m0.req.payload, {"addr": a1, "write": 1, "data": 0xABC, "mask": 0xF, "tag": 0x22})
        assert ctx.get(m0.req.ready)
        assert ctx.get(r0.valid) and not ctx.get(r1.valid)     # A at channel 0 one cycle later
        await tick_watch()                                     # B accepted (slot 1), A issued
        ctx.set(m0.req.valid, 1)
        ctx.set(m0.req.payload, {"addr": a0 + 32, "write": 0, "data": 0, "mask": 0, "tag": 0x33})
        assert not ctx.get(m0.req.ready), "ROB of two slots must be full"
        await tick_watch()                                     # B issued
        await tick_watch()
        assert ctx.get(dut.req_stall[0]) == 2
        assert [s.tag for s in seen[0]] == [0] and [s.tag for s in seen[1]] == [1]
        assert seen[1][0].write == 1 and seen[1][0].data == 0xABC and seen[1][0].mask == 0xF
        # Channel 1 answers B first: nothing delivered until A's response.
        ctx.set(q1.payload, {"data": 0, "tag": 1, "write": 1, "error": 0})
        ctx.set(q1.valid, 1)
        assert ctx.get(q1.ready)
        await tick_watch()
        ctx.set(q1.valid, 0)
        assert not ctx.get(m0.resp.valid)
        ctx.set(q0.payload, {"data": 0x1234, "tag": 0, "write": 0, "error": 0})
        ctx.set(q0.valid, 1)
        await tick_watch()
        ctx.set(q0.valid, 0)
        got = []
        for _ in range(4):
            if ctx.get(m0.resp.valid):
                got.append(ctx.get(m0.resp.payload))
            await tick_watch()
        assert [(g.tag, g.data, g.write, g.error) for g in got] == [(0x11, 0x1234, 0, 0), (0x22, 0, 1, 0)]
        # C was accepted once a slot freed; answer it, then a misaligned write gets error=1 in order.
        assert [s.tag for s in seen[0]] == [0, 0] and not ctx.get(m0.req.valid)
        await send(a1 + 4, 0x44, write=1, data=5)
        ctx.set(q0.payload, {"data": 0x777, "tag": 0, "write": 0, "error": 0})
        ctx.set(q0.valid, 1)
        await tick_watch()
        ctx.set(q0.valid, 0)
        got = []
        for _ in range(4):
            if ctx.get(m0.resp.valid):
                got.append(ctx.get(m0.resp.payload))
            await tick_watch()
        assert [(g.tag, g.data, g.write, g.error) for g in got] == [(0x33, 0x777, 0, 0), (0x44, 0, 1, 1)]
        assert len(seen[1]) == 1, "misaligned request reached a channel"
        log["ok"] = True

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(testbench)
    sim.run()
    assert log.get("ok")


def test_connects_to_controllers_and_dma():
    """The members connect with wiring.connect: a DMA's mem port to m<i>, r<c>/q<c> to MemCtrlSystem's."""
    from amaranth.hdl import Module
    from amaranth.lib import wiring

    from hw.memctrl import MemCtrlSystem
    from hw.npu.dma import DmaLoad
    from hw.pim import device_factory

    cfg = preset("tiny")
    fabric = MemFabric(cfg, 2)
    memsys = MemCtrlSystem(cfg, device_factory(cfg))
    dma = DmaLoad(cfg, lanes=4)
    m = Module()
    wiring.connect(m, dma.mem, fabric.m[0])
    for c in range(cfg.pim.channels):
        wiring.connect(m, fabric.r[c], memsys.r[c])
        wiring.connect(m, memsys.q[c], fabric.q[c])
