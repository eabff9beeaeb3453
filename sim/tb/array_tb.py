"""cocotb testbench: a stand-alone :class:`hw.npu.systolic.SystolicArray` driven by a per-cycle schedule.

The pytest side (``tests/test_matrix.py``) writes ``schedule.npz`` (one row per
cycle: weight row, its valid/index/enable, activation row, valid, first flag)
into the run directory; inputs change just after each rising edge (as flops
would drive them, which the clock-gated array requires) and every cycle's
``out`` is recorded while ``out_valid`` is set. Result: ``out.npy``.
"""

from __future__ import annotations

import os
from pathlib import Path

import cocotb
import numpy as np
from cocotb.clock import Clock
from cocotb.triggers import FallingEdge, RisingEdge

from sim.tb.common import pack, tb_test, unpack


@tb_test()
async def run_schedule(dut):
    run = Path(os.environ["RUN_DIR"])
    s = np.load(run / "schedule.npz")
    C = s["w_row"].shape[1]
    cocotb.start_soon(Clock(dut.clk, 10, units="ns").start())
    dut.rst.value = 1
    for name in ("w_valid", "act_valid", "act_first", "w_en", "w_index", "act", "w_row"):
        getattr(dut, name).value = 0
    await RisingEdge(dut.clk)
    await RisingEdge(dut.clk)
    dut.rst.value = 0
    got = []
    for t in range(len(s["w_valid"])):
        dut.w_row.value = pack(s["w_row"][t], 16)
        dut.w_valid.value = int(s["w_valid"][t])
        dut.w_index.value = int(s["w_index"][t])
        dut.w_en.value = int(s["w_en"][t])
        dut.act.value = pack(s["act"][t], 16)
        dut.act_valid.value = int(s["act_valid"][t])
        dut.act_first.value = int(s["act_first"][t])
        await FallingEdge(dut.clk)
        if int(dut.out_valid.value):
            got.append(unpack(int(dut.out.value), 32, C))
        await RisingEdge(dut.clk)
    np.save(Path(os.environ.get("IANUS_TEST_DIR", ".")) / "out.npy", np.array(got, dtype=np.uint32))
