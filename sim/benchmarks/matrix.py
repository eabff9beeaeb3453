"""NPU matrix unit: GEMM utilization on GPT-2 small prefill shapes (default 16 x 16 array, Verilator).

``npu_gemm_utilization`` = useful MACs / (R x C x cycles), per shape, for the
compute phase (cycles the compute engine is busy) and end to end (every cycle
of the tiled program, DMA of operands and results included, DMA overlapped
with compute by double buffering). Every run is also checked bit for bit
against the golden model.
"""

from __future__ import annotations

from sim.tb.matrix_kernels import GPT2_GEMMS, run_gpt2

EXPECTED_S = 230
"""Wall seconds measured here (make bench starts the longest modules first)."""

def run(quick: bool = False):
    plans = [(16, GPT2_GEMMS), (128, ("qk", "sv"))] if quick else [(16, GPT2_GEMMS), (128, GPT2_GEMMS)]
    for L, names in plans:
        for r in run_gpt2(L, names, f"bench_matrix_L{L}", test_name=f"bench_matrix_L{L}"):
            M, K, N = r["mkn"]
            common = {"shape": f"({M}x{K})({K}x{N})", "gemm": r["name"], "L": L, "array": "16x16",
                      "tiles_mkn": r["tiles"], "max_rel_err_vs_f64": r["max_rel_err"]}
            yield {"name": "npu_gemm_utilization", "value": round(r["util_compute"], 4), "unit": "fraction",
                   "phase": "compute", "cycles": r["compute_cycles"], **common}
            yield {"name": "npu_gemm_utilization", "value": round(r["util_e2e"], 4), "unit": "fraction",
                   "phase": "end_to_end", "cycles": r["cycles"], **common}
