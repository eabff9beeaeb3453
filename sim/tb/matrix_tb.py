"""cocotb testbench for the matrix unit (``hw.npu.memmodel.MatrixSystem``).

One generic test, :func:`run_program`: the pytest driver prepares a directory
(``sim.tb.matrix_kernels.write_run``) with the memory image and the program;
the testbench (:func:`sim.tb.segments.play_segments`, shared with the vector
queue's) loads the image through the memory model's back door, pushes
the instructions segment by segment on the ``instr`` stream, waits for the
unit to go idle after each segment, records the counters and the error code,
and finally dumps a memory range. Python runs only on handshakes and status
edges (the clock is generated inside the simulation), so a million-cycle GEMM
takes seconds. Results go to ``result.json`` and ``mem_dump.hex`` in the
test's working directory; the pytest side compares them with the golden model.
"""

from __future__ import annotations

from sim.tb.common import tb_test
from sim.tb.segments import play_segments

COUNTERS = ("cycles", "busy", "compute", "compute_wait", "load", "store")


@tb_test()
async def run_program(dut):
    await play_segments(dut, COUNTERS, "error_code")
