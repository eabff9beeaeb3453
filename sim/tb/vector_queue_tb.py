"""cocotb testbench of the vector queue (:class:`hw.npu.vector_queue.VectorQueueSystem`), and its pytest side.

The pytest side (:func:`run_segments`) writes a run directory: the whole
memory model as ``mem_load.hex`` and ``program.json`` with *segments* (lists
of 256-bit SoC instructions). The testbench loads the memory through the
back door, then (:func:`sim.tb.segments.play_segments`, shared with the matrix unit's testbench) for each
segment pulses ``clear`` (error and counters),
pushes the instructions, waits until the queue is idle (with a timeout: a
hang fails the test) and records the counters and the error code; at the
end it dumps the whole memory. Python runs only on handshakes and status
edges; the clock is generated inside the simulation.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np

from sim.tb.common import tb_test
from sim.tb.segments import play_segments, read_dump

COUNTERS = ("busy", "vector", "dma", "mem_stall", "instructions")
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
    for idx, col in read_dump(path, 0).items():
        out[idx] = np.frombuffer(col, dtype=np.uint8)
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

@tb_test()
async def run_program(dut):
    await play_segments(dut, COUNTERS, "error", poll_clock=True)
