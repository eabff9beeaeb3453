"""Analytical cost model used by the compiler (the paper's Algorithm 1 decides with such a model).

Cycles at the SoC clock, from the configuration alone (no simulation):

* matrix unit GEMM: ``max(compute, weight DMA, activation DMA) + latency``; compute is the
  array's slot arithmetic of :class:`hw.npu.matrix_unit.ComputeEngine`
  (``max(R, 4) + max(M, R, 4) * KB * NB + drain`` per instruction, the drain
  :func:`hw.spec.pipeline.compute_drain`: ``R + C + 3`` with one-stage PEs), the
  transposed weight DMA moves ``W x 16`` elements per ``max(W, 16)`` cycles (double-buffered)
  (:class:`hw.npu.dma.DmaLoad`), plain DMA one 32-byte column per cycle, both
  capped by the channels' external bandwidth (``channels x 32`` bytes per cycle)
  at :data:`DRAM_EFFICIENCY`;
* PIM FC: :func:`firmware.pim.gemv_lower_bound` scaled by :data:`PCU_OVERHEAD` (the
  ratio measured on the RTL PCU, ``tests/test_pcu.py``: 5,253 / 2,986 cycles for 768 x 768),
  plus moving the input vector in and the results out;
* vector unit: the cycle formulas of :mod:`hw.npu.vector`; vector DMA one column per cycle
  plus :data:`MEM_LATENCY`.

It is an estimate for mapping decisions and for comparison with the RTL's cycles, which
the runner prints side by side; it is not calibrated (that is the performance model's job).
"""

from __future__ import annotations

from hw.spec.pipeline import compute_drain

__all__ = ["mu_gemm_cycles", "pim_fc_cycles", "vector_cycles", "vdma_cycles", "stage_total"]

DRAM_EFFICIENCY = 0.5
PCU_OVERHEAD = 1.76
MEM_LATENCY = 60
FENCE_CYCLES = 24
"""A FENCE: the fenced unit's pipeline drains before the next instruction starts, and the next unit
refills its own (the matrix unit's array and accumulator drain, the vector unit's 23-stage lanes)."""


def _mem_rate(cfg) -> float:
    return cfg.pim.channels * cfg.pim.column_bytes * DRAM_EFFICIENCY


def mu_gemm_cycles(cfg, M, K, N, transposed=True) -> int:
    return sum(mu_gemm_parts(cfg, M, K, N, transposed))


def mu_gemm_parts(cfg, M, K, N, transposed=True) -> tuple[int, int]:
    """(memory-bound cycles, compute-only cycles) of a GEMM: only the second can overlap a PIM operation
    (normal DRAM traffic waits while a macro PIM command holds the channels)."""
    n = cfg.npu
    R, C = n.array_rows, n.array_cols
    KB, NB = -(-K // R), -(-N // C)
    compute = max(R, 4) + max(M, R, 4) * KB * NB + compute_drain(R, C, n.pe_mul_stages, n.pe_add_stages)
    w_rate = min(32 * C / max(C, 16) if transposed else 32.0, _mem_rate(cfg))
    wdma = K * N * 2 / w_rate
    adma = M * K * 2 / min(32.0, _mem_rate(cfg)) * max(1, -(-N // 256))
    mem = max(wdma, adma) + MEM_LATENCY
    return int(mem), int(max(0, compute - max(wdma, adma)))


def pim_fc_cycles(cfg, K, N, gelu=False, write_vec=True, pitch=0) -> int:
    """A GEMV macro with its input moved in and its results out; ``pitch``: a packed GEMV (hw/spec/macro.py
    ``addr1``: the tiles of one row back to back)."""
    from firmware.pim import gemv_lower_bound

    b = gemv_lower_bound(cfg, K, N, activation=gelu, pitch=pitch)["cycles"]
    io = (K * 2 / 32 if write_vec else 0) + N * 4 / 32
    return int(PCU_OVERHEAD * b + io + 2 * MEM_LATENCY)


def gelu_unit(cfg, K: int, N: int) -> str:
    """Where generation's FC1 (``K x N``, a GEMV on a BF16 PIM device) applies its GELU: ``"pim"`` (the GEMV
    macro's AF step: every bank switches to its LUT row and back once per tile) or ``"vector"`` (the GEMV with
    its bias, FP32 results, a FENCE, then one VLOAD, the vector unit's GELU and one VSTORE), whichever this
    model estimates cheaper (:meth:`firmware.compiler.LayerCompiler._fc1_pim`, :mod:`sim.bounds`)."""
    pim = pim_fc_cycles(cfg, K, N, gelu=True)
    vec = (pim_fc_cycles(cfg, K, N, gelu=False) + FENCE_CYCLES + vdma_cycles(cfg, 1, N * 4)
           + vector_cycles(cfg, {"op": "GELU", "n": N, "rows": 1}) + vdma_cycles(cfg, 1, N * 2))
    return "vector" if vec < pim else "pim"


def vector_cycles(cfg, f: dict) -> int:
    """Vector-unit cycles of one instruction (:func:`hw.spec.vector_isa.vector_cycles`)."""
    from hw.spec.vector_isa import vector_cycles as cycles

    return cycles(f.get("op"), int(f.get("n", 1)), int(f.get("rows", 1)), cfg.npu.vector_lanes,
                  acc_stages=cfg.npu.vec_acc_stages)


def vdma_cycles(cfg, rows, row_bytes) -> int:
    return rows * (row_bytes // 32) + MEM_LATENCY


def stage_total(est: dict, overlap: bool = False) -> int:
    """Units in turn (FENCEs between them); overlapped stages compute their own estimate."""
    return int(sum(est.get(k, 0) for k in ("mu", "vq", "pim", "fence")))
