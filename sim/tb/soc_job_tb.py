"""cocotb testbench: run a compiled job's programs on :class:`sim.tb.soc_run.SocSim`.

Python runs only on register accesses, on ``done`` / ``error`` edges and on the
unit-busy edges it records for the trace (the clock is generated inside the
simulation). Results go to ``result.json`` (per program: cycles, every counter,
busy spans of the units) and ``dump_<name>.bin`` (memory regions read through
the AXI4 window) in the test directory.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import cocotb
from cocotb.triggers import Edge, FallingEdge, First, RisingEdge, Timer

from hw.spec.soc_regs import CSR, SOC_ID, Ctrl, Status, counter_registers
from sim.tb.common import port, tb_test

PERIOD_NS = 10

AXIL = ("awaddr", "awprot", "awvalid", "awready", "wdata", "wstrb", "wvalid", "wready", "bresp", "bvalid", "bready",
        "araddr", "arprot", "arvalid", "arready", "rdata", "rresp", "rvalid", "rready")
AXI = ("awid", "awaddr", "awlen", "awsize", "awburst", "awvalid", "awready", "wdata", "wstrb", "wlast", "wvalid",
       "wready", "bid", "bresp", "bvalid", "bready", "arid", "araddr", "arlen", "arsize", "arburst", "arvalid",
       "arready", "rid", "rdata", "rresp", "rlast", "rvalid", "rready")


class Host:
    """The host side: cocotbext-axi masters on the register and memory interfaces."""

    def __init__(self, dut):
        from cocotbext.axi import AxiBus, AxiLiteBus, AxiLiteMaster, AxiMaster

        for prefix, names in (("s_axil__", AXIL), ("s_axi__", AXI)):
            for n in names:
                getattr(dut, prefix + n)
        # On SocSim's testbench clock, 1 ps before the design's (see SocSim's docstring).
        self.axil = AxiLiteMaster(AxiLiteBus.from_prefix(dut, "s_axil_"), dut.clk_tb)
        self.axi = AxiMaster(AxiBus.from_prefix(dut, "s_axi_"), dut.clk_tb)
        for master in (self.axi, self.axil):
            for iface in (master.write_if, master.read_if):
                iface.log.setLevel(logging.WARNING)

    async def wr(self, off, value):
        resp = await self.axil.write(off, int(value).to_bytes(4, "little"))
        assert int(resp.resp) == 0, f"register write {off:#x}: {resp.resp!r}"

    async def rd(self, off):
        resp = await self.axil.read(off, 4)
        assert int(resp.resp) == 0, f"register read {off:#x}: {resp.resp!r}"
        return int.from_bytes(bytes(resp.data), "little")

    async def read_mem(self, addr, n):
        out = bytearray()
        step = 1 << 13
        for a in range(addr, addr + n, step):
            resp = await self.axi.read(a, min(step, addr + n - a))
            assert int(resp.resp) == 0, f"memory read at {a:#x}: {resp.resp!r}"
            out += bytes(resp.data)
        return bytes(out)

    async def write_mem(self, addr, data):
        step = 1 << 13
        for a in range(addr, addr + len(data), step):
            resp = await self.axi.write(a, data[a - addr:a - addr + step])
            assert int(resp.resp) == 0, f"memory write at {a:#x}: {resp.resp!r}"


async def load_backdoor(dut, image_dir: Path):
    """Load the device image files of ``image_dir`` through the PIM banks' back door: link them into the
    folder the simulator was told (+PIM_BACKDOOR), pulse ``bd_load``, remove the links."""
    bd = Path(os.environ["IANUS_BACKDOOR"])
    bd.mkdir(parents=True, exist_ok=True)
    files = [*image_dir.glob("*.hex"), *image_dir.glob("*.bin")]
    for f in files:
        try:
            os.link(f, bd / f.name)         # the image can be hundreds of MB: link, don't copy
        except OSError:
            shutil.copy(f, bd / f.name)
    await FallingEdge(dut.clk_out)
    dut.bd_load.value = 1
    await FallingEdge(dut.clk_out)
    dut.bd_load.value = 0
    await FallingEdge(dut.clk_out)
    for f in files:
        (bd / f.name).unlink()


def _now():
    return int(cocotb.utils.get_sim_time("ns")) // PERIOD_NS


async def set_program(host: Host, prog: dict):
    """Program ``prog`` (``addr``, ``n``) into the registers and the counters reset (START follows)."""
    await host.wr(CSR.PROG_ADDR, prog["addr"])
    await host.wr(CSR.PROG_LEN, prog["n"])
    await host.wr(CSR.CTRL, Ctrl.RESET_COUNTERS)


async def wait_program(host: Host, done, error, name: str, budget: int, hold=None, on_end=None):
    """After START: wait until the program is done, fails (``error``) or ``budget`` cycles pass; raise unless it
    is done without an error. ``hold`` (the bus models' clock hold) is set while waiting; ``on_end()`` runs as
    soon as the wait ends."""
    timer = Timer(budget * PERIOD_NS, "ns")
    if hold is not None:        # the host's bus models are idle until the program ends
        hold.value = 1
    while True:
        trig = await First(RisingEdge(done), Edge(error), timer)
        if int(error.value) or int(done.value) or trig is timer:
            break
    if hold is not None:
        hold.value = 0
    if on_end is not None:
        on_end()
    err = int(error.value)
    status = await host.rd(CSR.STATUS)
    if err:
        pc = await host.rd(CSR.ERROR_PC)
        raise AssertionError(f"{name}: SoC error {err:#06x} at instruction {pc} (STATUS {status:#x})")
    assert status & Status.DONE, f"{name}: no done within {budget} cycles (STATUS {status:#x})"


def assert_device_clean(dut, channels: int):
    """The PIM device's own protocol checks: no violation flagged on any channel."""
    for c in range(channels):
        nviol = int(port(dut, "s", c, "nviol").value)
        assert nviol == 0, f"channel {c}: the device flagged {nviol} protocol violations " \
                           f"(code {int(port(dut, 's', c, 'vcode').value)})"


async def _busy_spans(sig, spans, t0):
    """Record [start, end) cycles (relative to the program's start) of each unit's busy (MU, VQ, PCU, and the
    SRAM-PIM queue SPU on a configuration with one)."""
    names = ("mu", "vq", "pcu", "spu")[:sig.value.n_bits]
    prev = int(sig.value)
    start = [0] * len(names)
    while True:
        await Edge(sig)
        now = _now() - t0
        v = int(sig.value)
        for i, n in enumerate(names):
            if (v >> i) & 1 and not (prev >> i) & 1:
                start[i] = now
            elif not (v >> i) & 1 and (prev >> i) & 1:
                spans.setdefault(n, []).append((start[i], now))
        prev = v


@tb_test()
async def run_job(dut):
    run_dir = Path(os.environ["RUN_DIR"])
    spec = json.loads((run_dir / "job.json").read_text())
    C = spec["channels"]
    # Top-level handles first: once cocotbext-axi has inspected the top, ``dut.busy`` and friends may
    # resolve to same-named struct fields of deeper signals (see sim/tb/soc_tb.py).
    done, error, unit_busy = dut.done, dut.error, dut.unit_busy
    # Every input driven from time 0: the bus masters idle their channels when created, the rest here.
    # (Verilator starts undriven inputs at 0, Icarus at X; an X on arvalid before the first edge would
    # latch X into the register block's handshake flops for good.)
    dut.bd_load.value = 0
    hold = getattr(dut, "tb_clk_hold", None)       # stops the bus models' clock while they are idle
    if os.environ.get("SOC_TB_CLK_HOLD", "1") == "0":   # off: for measuring what it saves
        hold = None
    if hold is not None:
        hold.value = 0
    for c in range(C):
        port(dut, "s", c, "clear").value = 0
    host = Host(dut)
    await RisingEdge(dut.clk_out)
    await load_backdoor(dut, run_dir / "backdoor")
    mon = None
    if spec["checker"]:
        from sim.pim_checker import BusMonitor
        from sim.run import soc_config

        class _Dut:             # BusMonitor waits on ``dut.clk``: here the clock is ``clk_out``
            def __getattr__(self, name):
                return getattr(dut, "clk_out" if name == "clk" else name)

        mon = BusMonitor(_Dut(), soc_config(spec["config"]))
        cocotb.start_soon(mon.run())
    assert await host.rd(CSR.ID) == SOC_ID, "not the SoC"
    spu = unit_busy.value.n_bits > 3          # the SRAM-PIM queue (cfg.spu): its counters too
    regs = counter_registers(C, spu)
    results = []
    for prog in spec["programs"]:
        spans = {}
        for addr, path in prog.get("writes", ()):      # host writes before the program (batched generation)
            await host.write_mem(addr, Path(path).read_bytes())
        await set_program(host, prog)
        watcher = cocotb.start_soon(_busy_spans(unit_busy, spans, _now()))
        await host.wr(CSR.CTRL, Ctrl.START)
        t_start = _now()            # the START write's response (a fixed number of cycles after the CP took it)
        await wait_program(host, done, error, prog["name"], spec["timeout_cycles"], hold, watcher.kill)
        counters = {k: await host.rd(off) for k, off in regs.items()}
        results.append({"name": prog["name"], "cycles": counters["cp.cycles"], "t_start": t_start, "counters": counters,
                        "busy": {"mu": counters["mu.busy"], "vq": counters["vq.busy"], "pcu": counters["pcu.busy"],
                                 **({"spu": counters["spu.busy"]} if spu else {})},
                        "spans": spans})
        dut._log.info("%s: %d cycles", prog["name"], counters["cp.cycles"])
        if os.environ.get("IANUS_PROGRESS"):
            with open(os.environ["IANUS_PROGRESS"], "a") as f:
                f.write(f"{prog['name']} {counters['cp.cycles']}\n")
    # DRAM protocol: the device's own checks (and the Python checker when enabled).
    assert_device_clean(dut, C)
    if mon is not None:
        mon.assert_clean()
    test_dir = Path(os.environ.get("IANUS_TEST_DIR", "."))
    for name, (addr, n) in spec["dumps"].items():
        (test_dir / f"dump_{name}.bin").write_bytes(await host.read_mem(addr, n))
    refreshes = [int(port(dut, "s", c, "n_ref").value) for c in range(C)]
    (test_dir / "result.json").write_text(json.dumps({"programs": results, "refreshes": refreshes}))
