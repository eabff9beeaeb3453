"""Performance model of the SoC: executes the compiled programs with a timing model per unit.

The model decodes the *same* 256-bit instruction words the RTL runs (:mod:`firmware.isa`) and
times them with one model per unit, in an event-driven simulation at instruction granularity
(memory requests and PIM micro commands are timed one by one, without a per-cycle loop):

command processor (:mod:`hw.cp`)
    In-order dispatch, one instruction per cycle, from a prefetch FIFO of ``fetch_depth``
    instructions whose fetches go through the memory model; FENCE retires when the named units are
    idle (busy low and nothing handed to them in the previous cycle), END when all are idle two
    cycles in a row. MATRIX goes to the matrix unit's decode register, VECTOR / VLOAD / VSTORE to
    the vector queue's FIFO, PIM to the macro queue in front of the PCU; a full queue stalls
    dispatch (and everything behind it).
matrix unit (:mod:`hw.npu.matrix_unit`, :mod:`hw.npu.dma`)
    Decode register, three in-order queues (load / compute / store) with the 16 counting
    semaphores; an instruction starts when its ``wait`` tokens are there and its engine is free,
    and gives its ``signal`` tokens when it finishes. Compute: the slot arithmetic of
    :class:`hw.npu.matrix_unit.ComputeEngine` (``max(R, 4)`` preamble, ``max(M, R, 4)`` cycles per
    pass, tokens after the array and read-modify-write drain). DMA: every 32-byte request through
    the memory model, with the engines' own rates (non-transposed: ``16 / W`` scratchpad words per
    column; transposed: ``W`` rows gathered into a ``W x 16`` buffer, whose 16 transposed words are
    written one per cycle, with one or two buffers as the RTL has), ``dma_outstanding`` requests
    in flight, responses in order.
vector queue (:mod:`hw.npu.vector_queue`, :mod:`hw.npu.vector`)
    One instruction at a time; VECTOR by the vector unit's cycle formulas, VLOAD / VSTORE by
    streaming requests through the memory model.
PCU (:mod:`hw.pcu`)
    The macro-to-micro state machine command by command: every micro command (ACT, ACTAB, RD, WR,
    PREAB, WRBIAS, WRGB, MACAB, RDMAC, AF, RDAF) is issued at the first cycle the controller's
    timing rules allow, the command stream loads the next command in the cycle the controllers
    accept one (one per cycle), responses come back one per cycle; the same order as the RTL
    (memory transfers in row segments with their ACTs first, a new chunk's WRGBs in the tRTP / tRP
    waits, one-tile GEMVs without read-back); :func:`firmware.pim.gemv_lower_bound` is the
    analytical floor it is compared with.
memory (:mod:`hw.memctrl`, :mod:`hw.fabric`)
    Per channel: one command per cycle, per-bank open row and timing (tRCD, tRP, tRAS, tWR, tRTP),
    tRRD / tFAW, an FR-FCFS queue of ``ctrl_queue`` requests (row hits of other banks overtake a
    row miss), refresh (one REF owed per tREFI, done when the queue is empty -- in PIM mode when
    every bank is closed -- forced after ``refresh_postpone``; tRFC with all rows closed) and PIM
    mode (normal requests wait while a macro holds the channels: the instruction fetches and DMA
    requests timed ahead of a macro's start are timed again after it, the bank state they would
    have left is rolled back to the macro's start).

Memory requests are timed when their requester issues them, mostly in time order; the channel's
command slots are a set, so a later-timed stream can use cycles an earlier one left free.

The constants that are not spelt out by the RTL's documentation (pipeline offsets of a few
cycles) are in :class:`Calib`, fitted against the RTL's cycle counts (``tests/test_perfmodel.py``,
``sim/calibration/``).

Scaling to the paper's system (``ianus`` preset, projection only): the NPU clock may differ from
the memory clock (times are kept in memory-clock cycles; NPU-side durations are scaled by
``pim_mhz / npu_mhz``); :class:`Micro` holds the microarchitecture parameters (DMA request rate and
requests in flight, core count). With ``cores > 1`` every matrix-unit and vector instruction's work
is split evenly over the cores (FCs column-wise, heads across cores; a vector instruction's rows or
each row's beats, whichever is faster: :func:`hw.spec.vector_isa.vector_cycles`), their DMA engines
issue in parallel into the shared channels (``dma_issue`` requests per NPU cycle each, reads and
writes; every core's store engine has its own write FIFO), and the PCU and the PIM channels are
shared; a FENCE costs ``sync_cycles`` more (the cores synchronise).
"""

from __future__ import annotations

from sim.perfmodel.core import PerfModel, ProgramResult, _Run
from sim.perfmodel.decode import Ins, decode_program, stage_tags
from sim.perfmodel.kernel import _Event, _Kernel
from sim.perfmodel.memory import Channel, Memory, _Slots, _take
from sim.perfmodel.params import INF, Calib, Micro, _transpose_buffers, micro_for
from sim.perfmodel.pcu import F_BF16, F_BIAS, F_GELU, OP_GEMV, OP_READ_RES, OP_WRITE_VEC, _PcuMacro

__all__ = ["INF", "Calib", "Channel", "Ins", "Memory", "Micro", "PerfModel", "ProgramResult", "decode_program", "micro_for",
           "stage_tags", "F_BF16", "F_BIAS", "F_GELU", "OP_GEMV", "OP_READ_RES", "OP_WRITE_VEC", "_Event", "_Kernel", "_PcuMacro", "_Run", "_Slots", "_take", "_transpose_buffers"]
