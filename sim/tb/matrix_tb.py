"""cocotb testbench for the matrix unit (``hw.npu.memmodel.MatrixSystem``).

One generic test, :func:`run_program`: the pytest driver prepares a directory
(``sim.tb.matrix_kernels.write_run``) with the memory image and the program;
the testbench loads the image through the memory model's back door, pushes
the instructions segment by segment on the ``instr`` stream, waits for the
unit to go idle after each segment, records the counters and the error code,
and finally dumps a memory range. Python runs only on handshakes and status
edges (the clock is generated inside the simulation), so a million-cycle GEMM
takes seconds. Results go to ``result.json`` and ``mem_dump.hex`` in the
test's working directory; the pytest side compares them with the golden model.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from cocotb.triggers import FallingEdge, RisingEdge, with_timeout

from sim.tb.common import tb_test

COUNTERS = ("cycles", "busy", "compute", "compute_wait", "load", "store")
PERIOD_NS = 10


def _counters(dut) -> dict:
    raw = int(dut.counters.value)
    return {name: (raw >> (32 * i)) & 0xFFFFFFFF for i, name in enumerate(COUNTERS)}


async def _cycle(dut, n=1):
    for _ in range(n):
        await FallingEdge(dut.clk_out)


async def _push(dut, word: int):
    dut.instr__payload.value = word
    dut.instr__valid.value = 1
    # instr.ready does not depend on instr.valid; it is stable from here to the rising edge.
    while not dut.instr__ready.value:
        await RisingEdge(dut.instr__ready)
        await FallingEdge(dut.clk_out)
    await RisingEdge(dut.clk_out)
    await FallingEdge(dut.clk_out)
    dut.instr__valid.value = 0


async def _idle(dut):
    await _cycle(dut, 2)
    while dut.busy.value:
        await FallingEdge(dut.busy)
    await _cycle(dut, 1)


@tb_test()
async def run_program(dut):
    run_dir = Path(os.environ["RUN_DIR"])
    spec = json.loads((run_dir / "program.json").read_text())
    for name in ("instr__valid", "clear", "mem_load", "mem_dump", "mem_bp_enable"):
        getattr(dut, name).value = 0
    await _cycle(dut, 2)
    shutil.copy(run_dir / "mem_load.hex", Path.cwd() / "mem_load.hex")
    dut.mem_load.value = 1
    await _cycle(dut)
    dut.mem_load.value = 0
    dut.mem_bp_enable.value = spec["backpressure"]
    timeout = spec["timeout_cycles"] * PERIOD_NS
    results = []
    for seg in spec["segments"]:
        dut.clear.value = 1
        await _cycle(dut)
        dut.clear.value = 0

        async def body(words):
            for word in words:
                await _push(dut, int(word, 16))
            await _idle(dut)

        await with_timeout(body(seg["instructions"]), timeout, "ns")
        results.append({"name": seg["name"], "counters": _counters(dut),
                        "error_code": int(dut.error_code.value)})
        dut._log.info("segment %s: %s error %d", seg["name"], results[-1]["counters"],
                      results[-1]["error_code"])
    lo, hi = spec["dump"]
    dut.mem_dump_lo.value = lo
    dut.mem_dump_hi.value = hi
    dut.mem_dump.value = 1
    await _cycle(dut)
    dut.mem_dump.value = 0
    await _cycle(dut)
    (Path.cwd() / "result.json").write_text(json.dumps({"segments": results}))
