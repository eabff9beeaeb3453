"""cocotb testbench of the vector unit harness (:class:`hw.npu.vector.VectorTop`).

The test plan is made on the pytest side (:func:`save_scenario`): a scratchpad
image, a list of instructions, and the golden model's final image and error
codes. The testbench loads the image through the host port, issues each
instruction, lets the unit run on its own until ``done``, then reads the
whole scratchpad back and compares every word (so stray writes are caught as
well as wrong results).

Environment: ``SCENARIOS`` (``os.pathsep``-separated ``.npz`` files, run in
order on one simulation), ``IANUS_METRICS`` (optional: one JSON line per
instruction with its cycle count).
"""

from __future__ import annotations

import os

import numpy as np

from sim.tb.common import Stopwatch, env_str, pack, start, tb_test, unpack, write_metrics


def save_scenario(path, init, instrs, expect, errors, names=None, elements=None):
    """Write a scenario file: ``instrs`` are instruction words (ints), ``names`` labels for messages."""
    k = len(instrs)
    np.savez(path, init=init, expect=expect, errors=np.asarray(errors, dtype=np.int64),
             instrs=np.array([format(int(i), "x") for i in instrs]),
             names=np.array(names if names is not None else [f"instr{j}" for j in range(k)]),
             elements=np.asarray(elements if elements is not None else [0] * k, dtype=np.int64))


class VectorTB:
    def __init__(self, dut):
        from cocotb.triggers import FallingEdge, RisingEdge
        self.dut = dut
        self.FallingEdge, self.RisingEdge = FallingEdge, RisingEdge
        self.lanes = len(dut.host_wr_data) // 32
        self.known = None

    async def start(self):
        await start(self.dut, zero_inputs=("instr__valid", "instr__payload", "host_wr_en", "host_wr_addr",
                                           "host_wr_data", "host_rd_en", "host_rd_addr"))

    async def write(self, addrs, words):
        dut = self.dut
        full = (1 << (2 * self.lanes)) - 1
        for addr, word in zip(addrs, words, strict=True):
            await self.FallingEdge(dut.clk)
            dut.host_wr_addr.value = int(addr)
            dut.host_wr_data.value = pack(word, 32)
            dut.host_wr_en.value = full
        await self.FallingEdge(dut.clk)
        dut.host_wr_en.value = 0

    async def read_all(self, depth):
        dut = self.dut
        out = []
        for addr in range(depth + 1):
            await self.FallingEdge(dut.clk)
            if addr > 0:
                out.append(unpack(dut.host_rd_data.value.integer, 32, self.lanes))
            if addr < depth:
                dut.host_rd_addr.value = addr
                dut.host_rd_en.value = 1
        dut.host_rd_en.value = 0
        return np.stack(out).astype(np.uint32)

    async def execute(self, word):
        """Issue one instruction word and wait for ``done``; returns (error, cycles)."""
        dut = self.dut
        await self.FallingEdge(dut.clk)
        dut.instr__payload.value = word
        dut.instr__valid.value = 1
        while True:
            await self.FallingEdge(dut.clk)
            if dut.instr__ready.value:
                break
        await self.RisingEdge(dut.clk)
        dut.instr__valid.value = 0
        await self.RisingEdge(dut.done)
        return int(dut.error.value), int(dut.cycles.value)


def _mismatch(got, want, names, errs_got, errs_want):
    msgs = []
    for j, (g, w) in enumerate(zip(errs_got, errs_want, strict=True)):
        if g != w:
            msgs.append(f"{names[j]}: error code RTL {g} golden {w}")
    bad = np.argwhere(got != want)
    if bad.size:
        addr, lane = bad[0]
        msgs.append(f"{len(np.unique(bad[:, 0]))} words differ; first at word {addr} lane {lane}: "
                    f"RTL {int(got[addr, lane]):#010x} golden {int(want[addr, lane]):#010x} "
                    f"(RTL word {[hex(int(v)) for v in got[addr]]}, golden {[hex(int(v)) for v in want[addr]]})")
    return "; ".join(msgs)


@tb_test()
async def run_scenarios(dut):
    tb = VectorTB(dut)
    await tb.start()
    known = None
    paths = [p for p in env_str("SCENARIOS", "").split(os.pathsep) if p]
    assert paths, "no SCENARIOS given"
    for path in paths:
        sc = np.load(path)
        init, expect = sc["init"], sc["expect"]
        depth = init.shape[0]
        assert init.shape[1] == tb.lanes, f"scenario for {init.shape[1]} lanes, DUT has {tb.lanes}"
        if known is None:
            known = np.zeros_like(init)
        dirty = np.flatnonzero(np.any(init != known, axis=1))
        await tb.write(dirty, init[dirty])
        names = [str(s) for s in sc["names"]]
        errs = []
        with Stopwatch() as sw:
            total = 0
            for j, hexword in enumerate(sc["instrs"]):
                err, cycles = await tb.execute(int(str(hexword), 16))
                errs.append(err)
                total += cycles
                write_metrics(name=names[j], cycles=cycles, error=err, elements=int(sc["elements"][j]))
        got = await tb.read_all(depth)
        msg = _mismatch(got, expect, names, errs, [int(e) for e in sc["errors"]])
        assert not msg, f"{os.path.basename(path)}: {msg}"
        dut._log.info("%s: %d instructions, %d cycles in %.2f s, bit-exact", os.path.basename(path),
                      len(errs), total, sw.seconds)
        known = got
