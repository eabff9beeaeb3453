"""cocotb testbench of the vector queue (:class:`hw.npu.vector_queue.VectorQueueSystem`), and its pytest side.

The pytest side (:func:`run_segments`) writes a run directory: the whole
memory model as ``mem_load.hex`` and ``program.json`` with *segments* (lists
of 256-bit SoC instructions). The testbench loads the memory through the
back door, then for each segment pulses ``clear`` (error and counters),
pushes the instructions, waits until the queue is idle (with a timeout: a
hang fails the test) and records the counters and the error code; at the
end it dumps the whole memory. Python runs only on handshakes and status
edges; the clock is generated inside the simulation.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from sim.tb.common import tb_test

COUNTERS = ("busy", "vector", "dma", "mem_stall", "instructions")
PERIOD_NS = 10
COLUMN = 32


# -- pytest side ---------------------------------------------------------------------------------------

def vq_build(cfg, words_log2: int, mem_latency: int = 6):
    """Cached Verilator build of :class:`VectorQueueSystem` for ``cfg`` (lanes as one shared module)."""
    from hw.npu.memmodel import CLOCK_VERILOG, STORAGE_VERILOG
    from hw.npu.vector import LANE_MODULE, VectorLane
    from hw.npu.vector_queue import VectorQueueSystem
    from sim.build import build, verilog_for

    lane_v = verilog_for(lambda: VectorLane(), name=LANE_MODULE, key="lane")
    vlt = lane_v.with_suffix(".vlt")
    if not vlt.exists():
        vlt.write_text(f'`verilator_config\nno_inline -module "{LANE_MODULE}"\n')
    sb = build(lambda: VectorQueueSystem(cfg, words_log2, mem_latency), name=f"vq_{cfg.name}",
               key=f"{cfg!r} words_log2={words_log2} latency={mem_latency} lane_instance",
               extra_sources=(STORAGE_VERILOG, CLOCK_VERILOG, lane_v),
               build_args=("--timing", "--timescale", "1ns/1ps", str(vlt)))
    sb.extra.update(words_log2=words_log2, mem_latency=mem_latency)
    return sb


def hex_image(mem: np.ndarray) -> str:
    """``$readmemh`` text of a whole memory (bytes, a multiple of 32), column 0 first, MSB first per line."""
    cols = np.asarray(mem, dtype=np.uint8).reshape(-1, COLUMN)[:, ::-1]
    text = cols.tobytes().hex()
    return "@0\n" + "\n".join(text[i:i + 2 * COLUMN] for i in range(0, len(text), 2 * COLUMN)) + "\n"


def read_image(path: Path, columns: int) -> np.ndarray:
    """A ``$writememh`` dump of columns ``0 .. columns - 1`` as bytes."""
    out = np.zeros((columns, COLUMN), dtype=np.uint8)
    idx = 0
    for line in Path(path).read_text().split():
        if line.startswith("//"):
            continue
        if line.startswith("@"):
            idx = int(line[1:], 16)
            continue
        line = line.lower().replace("x", "0")
        out[idx] = np.frombuffer(bytes.fromhex(line.rjust(2 * COLUMN, "0"))[::-1], dtype=np.uint8)
        idx += 1
    return out.reshape(-1)


def run_segments(sb, mem: np.ndarray, segments: list[dict], test_name: str | None = None,
                 timeout_cycles: int = 2_000_000):
    """Run ``segments`` (dicts: ``name``, ``instructions`` (ints), optional ``backpressure``) from memory image
    ``mem`` (the model's whole memory, bytes); returns (per-segment results, final memory bytes)."""
    columns = 1 << sb.extra["words_log2"]
    assert mem.size == columns * COLUMN, (mem.size, columns)
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp)
        (run_dir / "mem_load.hex").write_text(hex_image(mem))
        spec = {"segments": [{"name": s["name"], "instructions": [f"{int(i):x}" for i in s["instructions"]],
                              "backpressure": int(s.get("backpressure", 0))} for s in segments],
                "dump": [0, columns - 1], "timeout_cycles": timeout_cycles}
        (run_dir / "program.json").write_text(json.dumps(spec))
        results = sb.run("sim.tb.vector_queue_tb", "run_program", test_name=test_name,
                         env={"RUN_DIR": str(run_dir)})
    test_dir = Path(results).parent
    res = json.loads((test_dir / "result.json").read_text())["segments"]
    return res, read_image(test_dir / "mem_dump.hex", columns)


# -- cocotb side ---------------------------------------------------------------------------------------

def _counters(dut) -> dict:
    raw = int(dut.counters.value)
    return {name: (raw >> (32 * i)) & 0xFFFFFFFF for i, name in enumerate(COUNTERS)}


async def _cycle(dut, n=1):
    from cocotb.triggers import FallingEdge

    for _ in range(n):
        await FallingEdge(dut.clk_out)


async def _push(dut, word: int):
    from cocotb.triggers import FallingEdge, RisingEdge

    dut.instr__payload.value = word
    dut.instr__valid.value = 1
    # instr.ready (FIFO not full) does not depend on instr.valid; stable until the rising edge.
    while not dut.instr__ready.value:
        await RisingEdge(dut.clk_out)
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


@tb_test()
async def run_program(dut):
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
        dut.mem_bp_enable.value = seg["backpressure"]
        dut.clear.value = 1
        await _cycle(dut)
        dut.clear.value = 0

        async def body(words):
            for word in words:
                await _push(dut, int(word, 16))
            await _idle(dut)

        await with_timeout(body(seg["instructions"]), timeout, "ns")
        results.append({"name": seg["name"], "counters": _counters(dut), "error": int(dut.error.value)})
        dut._log.info("segment %s: %s error %d", seg["name"], results[-1]["counters"], results[-1]["error"])
    dut.mem_bp_enable.value = 0
    lo, hi = spec["dump"]
    dut.mem_dump_lo.value = lo
    dut.mem_dump_hi.value = hi
    dut.mem_dump.value = 1
    await _cycle(dut)
    dut.mem_dump.value = 0
    await _cycle(dut)
    (Path.cwd() / "result.json").write_text(json.dumps({"segments": results}))
