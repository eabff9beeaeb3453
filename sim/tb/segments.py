"""The program the testbenches of the matrix unit (``sim/tb/matrix_tb.py``) and of the vector queue
(``sim/tb/vector_queue_tb.py``) run, and the reader of their memory model's dumps.

Both tops are a unit with an ``instr`` stream, ``busy``, ``clear``, packed 32-bit ``counters`` and an error
code, beside the memory model of :mod:`hw.npu.memmodel` (back-door ``mem_load`` / ``mem_dump``,
``mem_bp_enable``). :func:`play_segments` loads the run directory's ``mem_load.hex``, then per segment of
``program.json`` pulses ``clear``, pushes the instructions, waits until the unit is idle (with a timeout: a
hang fails the test) and records the counters and the error code; at the end it dumps the memory range
``spec["dump"]`` and writes ``result.json``. Python runs only on handshakes and status edges; the clock is
generated inside the simulation. :func:`read_dump` reads the dump back on the pytest side.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

__all__ = ["PERIOD_NS", "read_dump", "play_segments"]

PERIOD_NS = 10


def read_dump(path: Path, lo: int) -> dict:
    """``$writememh`` output as {column index: 32 bytes}."""
    words = {}
    idx = lo
    for line in Path(path).read_text().split():
        if line.startswith("//"):
            continue
        if line.startswith("@"):
            idx = int(line[1:], 16)
            continue
        if "x" in line.lower():
            line = line.lower().replace("x", "0")
        words[idx] = bytes.fromhex(line.rjust(64, "0"))[::-1]
        idx += 1
    return words


def _counters(dut, names) -> dict:
    raw = int(dut.counters.value)
    return {name: (raw >> (32 * i)) & 0xFFFFFFFF for i, name in enumerate(names)}


async def _cycle(dut, n=1):
    from cocotb.triggers import FallingEdge

    for _ in range(n):
        await FallingEdge(dut.clk_out)


async def _push(dut, word: int, poll_clock: bool):
    """One instruction on ``instr``. ``instr.ready`` does not depend on ``instr.valid``; it is stable from here
    to the rising edge. While it is low: wait for it to rise (``poll_clock`` False) or look again every
    cycle (True)."""
    from cocotb.triggers import FallingEdge, RisingEdge

    dut.instr__payload.value = word
    dut.instr__valid.value = 1
    while not dut.instr__ready.value:
        await RisingEdge(dut.clk_out if poll_clock else dut.instr__ready)
        await FallingEdge(dut.clk_out)
    await RisingEdge(dut.clk_out)
    await FallingEdge(dut.clk_out)
    dut.instr__valid.value = 0


async def _idle(dut):
    from cocotb.triggers import FallingEdge

    await _cycle(dut, 2)
    while dut.busy.value:
        await FallingEdge(dut.busy)
    await _cycle(dut, 1)


async def play_segments(dut, counters: tuple, error: str, poll_clock: bool = False):
    """The whole run (module docstring). ``counters``: the names of the packed counters, lowest first;
    ``error``: the top's error-code port, also its key in each segment's result. Back-pressure
    (``mem_bp_enable``): a segment's own ``backpressure``, else the spec's, off for the dump."""
    from cocotb.triggers import with_timeout

    run_dir = Path(os.environ["RUN_DIR"])
    spec = json.loads((run_dir / "program.json").read_text())
    for name in ("instr__valid", "clear", "mem_load", "mem_dump", "mem_bp_enable"):
        getattr(dut, name).value = 0
    await _cycle(dut, 2)
    shutil.copy(run_dir / "mem_load.hex", Path.cwd() / "mem_load.hex")
    dut.mem_load.value = 1
    await _cycle(dut)
    dut.mem_load.value = 0
    timeout = spec["timeout_cycles"] * PERIOD_NS
    results = []
    for seg in spec["segments"]:
        dut.mem_bp_enable.value = seg.get("backpressure", spec.get("backpressure", 0))
        dut.clear.value = 1
        await _cycle(dut)
        dut.clear.value = 0

        async def body(words):
            for word in words:
                await _push(dut, int(word, 16), poll_clock)
            await _idle(dut)

        await with_timeout(body(seg["instructions"]), timeout, "ns")
        results.append({"name": seg["name"], "counters": _counters(dut, counters),
                        error: int(getattr(dut, error).value)})
        dut._log.info("segment %s: %s error %d", seg["name"], results[-1]["counters"], results[-1][error])
    dut.mem_bp_enable.value = 0
    lo, hi = spec["dump"]
    dut.mem_dump_lo.value = lo
    dut.mem_dump_hi.value = hi
    dut.mem_dump.value = 1
    await _cycle(dut)
    dut.mem_dump.value = 0
    await _cycle(dut)
    (Path.cwd() / "result.json").write_text(json.dumps({"segments": results}))
