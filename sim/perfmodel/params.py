"""Parameters of the performance model: the RTL's pipeline offsets (:class:`Calib`) and the microarchitecture
(:class:`Micro`, :func:`micro_for`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from hw.config import SystemConfig

INF = float("inf")


@dataclass(frozen=True)
class Calib:
    """Pipeline offsets (cycles) of the RTL not written in its docstrings, fitted on the RTL.

    Every name says where the cycles are spent. They were fitted on micro-benchmark programs (one
    instruction type at a time, run on the tiny SoC RTL) and on the end-to-end jobs;
    ``tests/test_perfmodel.py`` keeps them honest. ``gap`` and ``first_start`` describe the RTL
    testbench's host (register accesses between programs, start-up), found from the pattern of
    refresh collisions of 40 one-instruction programs."""

    req_to_ctrl: int = 2        # requester's request cycle -> first cycle the controller may issue it (fabric + queue)
    col_to_resp: int = 3        # column command decided -> response at the requester, beyond tRL (bus, FIFO, ROB)
    fetch_to_head: int = 3      # instruction response -> head of the CP's FIFO
    fence_extra: int = 0        # cycles a FENCE / END retire costs beyond the idle rule
    mu_q_lat: int = 2           # CP handshake -> instruction at the head of its matrix-unit queue
    mu_dma_start: int = 1       # engine accepts -> first request
    mu_dma_end: int = 1         # last response consumed -> busy low / tokens
    mu_idle_lat: int = 2        # last engine done -> matrix unit busy low
    mu_store_extra: int = 1     # STORE: further cycles until busy falls (write acknowledgements)
    mu_comp_start: int = 1      # compute accepts -> first slot
    sem_lat: int = 1            # tokens given -> visible to a waiting queue head
    vq_fifo_lat: int = 2        # CP handshake -> instruction in the dispatcher
    vq_vec_over: int = 3        # dispatcher pop -> vector unit accepts
    vq_dma_over: int = 5        # dispatcher pop -> VDMA start
    vq_done_over: int = 0       # unit done -> next instruction popped
    vq_idle_lat: int = 1        # unit done -> queue busy low (when nothing follows)
    vdma_store_lat: int = 3     # VSTORE: scratchpad read + FIFO before the first request
    vdma_end: int = 1           # last response -> VDMA done
    macro_q_lat: int = 2        # CP handshake -> macro visible to the PCU
    pcu_resp_lat: int = 2       # RD / RDMAC data on the bus -> response taken by the PCU (FIFO)
    pcu_end: int = 0            # busy low -> next macro taken
    pcu_idle_lat: int = 0       # busy low -> the command processor sees the PCU idle
    spu_fifo_lat: int = 2       # CP handshake -> SPIM / SLOAD in the SRAM-PIM queue's dispatcher
    spim_over: int = 5          # SPIM: dispatcher pop -> done, beyond the unit's command_cycles (checks, issue, write)
    sload_over: int = 3         # SLOAD: dispatcher pop -> first request (checks)
    sload_end: int = 2          # SLOAD: last response -> dispatcher idle
    spu_done_over: int = 0      # SRAM-PIM queue: done -> next instruction popped
    spu_idle_lat: int = 1       # done -> queue busy low (when nothing follows)
    end_extra: int = 0          # END retire -> counter stops
    gap: int = 93               # cycles between two programs of a job (the host's register accesses)
    counter_read: int = 60      # END -> the host reads the refresh counters
    first_start: int = 15       # reset -> first program's start (back door, ID read)


@dataclass(frozen=True)
class Micro:
    """Microarchitecture parameters of the timed system (defaults: the RTL's, :mod:`hw.soc`)."""

    fetch_depth: int = 32
    mu_queue: int = 4
    vq_depth: int = 8
    macro_depth: int = 8
    dma_outstanding: int = 32
    ctrl_queue: int = 8
    spu_depth: int = 4          # SRAM-PIM queue FIFO (hw.npu.spu.Spu queue_depth)
    spu_outstanding: int = 32   # SLOAD reads in flight (Spu max_outstanding)
    dma_issue: int = 1          # requests a DMA engine issues per NPU cycle (the fabric takes one per requester)
    cores: int = 1
    sync_cycles: int = 0        # extra cycles of a FENCE when several cores synchronise
    pcu_emit_cycles: int = 1    # cycles per micro command of the PCU's command stream (RTL: 1)
    row_bus: bool = False
    """Row commands (ACT, PRE) on their own command slots, as GDDR6's separate row and column command
    buses allow (the RTL folds both into one command per cycle, column commands first)."""
    transpose_buffers: int = field(default_factory=lambda: _transpose_buffers())
    """W x 16 buffers of the transposing load (1: gather, then emit; 2: gather one while the other is
    emitted), read from :class:`hw.npu.dma.DmaLoad`."""
    interleave: int = 0
    """Channel interleave (bytes) of normal traffic when it differs from the configuration's address map
    (0: the map of ``PimGeometry.channel_interleave``, :class:`hw.memif.AddressMap`, as the RTL). The
    projection's NPU-MEM baseline (plain GDDR6, no PIM layout to respect) interleaves channels every 256
    bytes."""
    cache: bool = False
    """Reuse the timing of a DMA instruction or macro already timed with the same shape and the same
    address alignment within a DRAM row (projection speed; the memory state it would leave is not
    replayed). Off for calibration."""


def _transpose_buffers() -> int:
    """2 when the RTL's transposing load is double-buffered (it gathers one W x 16 block while it
    writes the previous one's transpose), else 1."""
    from hw.npu import dma

    return dma.DmaLoad.transpose_buffers


def micro_for(cfg: SystemConfig) -> Micro:
    """The RTL's microarchitecture for RTL configurations; for the ``ianus`` preset the paper-scale
    system: ``npu.cores`` cores, each DMA engine issuing enough requests per cycle (and keeping
    enough in flight) that the cores together can use every channel's bandwidth."""
    if cfg.npu.cores <= 1:
        return Micro()
    ratio = cfg.clocks.pim_mhz / cfg.clocks.npu_mhz
    per_core = max(1, math.ceil(cfg.pim.channels / cfg.npu.cores * ratio))
    return Micro(dma_issue=per_core, dma_outstanding=32 * per_core * 4, cores=cfg.npu.cores,
                 ctrl_queue=64, sync_cycles=100, cache=True, row_bus=True)
