"""The SoC's register map (AXI4-Lite, 32-bit registers): one table read by the RTL (:mod:`hw.soc`), the
host side (:mod:`firmware.soc_regs` adds reading and summarising the counters) and the docs.

:func:`register_table` lists every register of a configuration with ``channels`` PIM channels: its name,
byte offset, access (``r``, ``w``, ``rw``), meaning and, for the read-only counters, the source the RTL
wires to it (``(group, counter)``: ``cp``, ``mu``, ``vq``, ``pcu``, ``fabric``, ``ch<c>``, ``soc``).
An unmapped offset, or a write to a read-only register, answers SLVERR.

Control
-------
``CTRL`` (write): bit 0 ``START`` runs the program of ``PROG_LEN`` instructions at ``PROG_ADDR`` (dropped
while a program runs; taken once the units are idle; ``CLEAR | START`` in one write clears first);
bit 1 ``CLEAR`` clears the error of the command processor and of the units (the matrix unit and the
vector queue zero their counters with it) and aborts a running program (the units finish what they
had queued); bit 2 ``RESET_COUNTERS`` zeroes every counter below (``CYCLES`` too).

``STATUS`` (read): bit 0 ``BUSY`` (the command processor runs a program), bit 1 ``DONE`` (the last
program retired its END; cleared by the next START), bit 2 ``ERROR``, bits 3..5 the matrix unit, vector
queue and PCU busy, bit 6 ``WINDOW_BUSY`` (an AXI4 burst in progress).

``ERROR``: :class:`hw.spec.soc_isa.CpError` in bits 0..7, the unit's own code in bits 8..15 (matrix
:class:`hw.spec.matrix_isa.ErrorCode`, :class:`hw.spec.soc_isa.VqError`, :class:`hw.spec.macro.MacroError`).
``ERROR_PC``: index of the failing instruction.

Counters (32-bit, wrapping; cycles of the SoC clock)
----------------------------------------------------
Per unit, what the cycles went to: the command processor (busy, waiting for instructions from memory,
blocked in FENCE/END on each unit, blocked on a full unit queue), the matrix unit (busy, computing,
compute waiting for tokens, load and store DMA busy), the vector queue (busy, vector unit, DMA, DMA
waiting on memory), the PCU (busy cycles, macros completed), the memory fabric (cycles each requester
waited to get a request accepted: host window, CP fetch, matrix DMA, vector DMA) and each channel's
controller (busy, bus commands, refreshes, forced refreshes, row hits and misses, cycles normal requests
waited for PIM mode, PIM micro commands).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["SOC_ID", "Reg", "Ctrl", "Status", "CSR", "register_table", "counter_registers", "REQUESTERS",
           "CH_BASE", "CH_STRIDE", "CH_COUNTERS", "table_text"]

SOC_ID = 0x1AA05002            # "IANUS", SoC, version 2 (the prototype top is ...001)
REQUESTERS = ("host", "cp", "mu", "vq")      # memory fabric requesters, in port order


class Ctrl(enum.IntFlag):
    START = 1
    CLEAR = 2
    RESET_COUNTERS = 4


class Status(enum.IntFlag):
    BUSY = 1
    DONE = 2
    ERROR = 4
    MU_BUSY = 8
    VQ_BUSY = 16
    PCU_BUSY = 32
    WINDOW_BUSY = 64
    SPU_BUSY = 128          # systems with an SRAM-PIM unit only


class CSR(enum.IntEnum):
    """Fixed register offsets (bytes); the counters are in :func:`register_table`."""
    ID = 0x000
    CTRL = 0x004
    STATUS = 0x008
    ERROR = 0x00C
    ERROR_PC = 0x010
    PROG_ADDR = 0x014
    PROG_LEN = 0x018
    CYCLES = 0x01C


@dataclass(frozen=True)
class Reg:
    name: str
    offset: int
    access: str            # "r", "w" or "rw"
    meaning: str
    source: tuple | None = None      # (group, counter) for counters


_FIXED = (
    Reg("ID", CSR.ID, "r", f"SoC id {SOC_ID:#010x}"),
    Reg("CTRL", CSR.CTRL, "w", "bit0 START, bit1 CLEAR, bit2 RESET_COUNTERS"),
    Reg("STATUS", CSR.STATUS, "r", "bit0 BUSY, bit1 DONE, bit2 ERROR, bit3 MU_BUSY, bit4 VQ_BUSY, bit5 PCU_BUSY, "
        "bit6 WINDOW_BUSY"),
    Reg("ERROR", CSR.ERROR, "r", "CpError | unit code << 8 of the first error since CLEAR"),
    Reg("ERROR_PC", CSR.ERROR_PC, "r", "index of the failing instruction"),
    Reg("PROG_ADDR", CSR.PROG_ADDR, "rw", "byte address of the program (a multiple of 32)"),
    Reg("PROG_LEN", CSR.PROG_LEN, "rw", "program length in instructions"),
    Reg("CYCLES", CSR.CYCLES, "r", "cycles since reset or RESET_COUNTERS", ("soc", "cycles")),
)

# (group, base offset, ((counter, meaning), ...)); a counter's offset is base + 4 * index.
_GROUPS = (
    ("cp", 0x040, (
        ("cycles", "command processor busy (a program running)"),
        ("fetch_stall", "CP busy with no fetched instruction at hand (waiting on memory)"),
        ("fence_mu", "a FENCE or END waiting for the matrix unit"),
        ("fence_vq", "a FENCE or END waiting for the vector queue"),
        ("fence_pcu", "a FENCE or END waiting for the PCU (PIM)"),
        ("dispatch_stall", "the next instruction's unit queue not ready"),
        ("instructions", "instructions retired"),
    )),
    ("mu", 0x080, (
        ("cycles", "matrix unit cycles since its last CLEAR"),
        ("busy", "matrix unit busy (instructions queued or running)"),
        ("compute", "systolic array computing or draining"),
        ("compute_wait", "a COMPUTE ready but waiting for tokens"),
        ("load", "load DMA busy"),
        ("store", "store DMA busy"),
    )),
    ("vq", 0x0C0, (
        ("busy", "vector queue busy (instructions queued or executing)"),
        ("vector", "vector unit busy"),
        ("dma", "vector DMA busy"),
        ("mem_stall", "vector DMA request waiting to be accepted by memory"),
        ("instructions", "vector-queue instructions executed"),
    )),
    ("pcu", 0x100, (
        ("busy", "PCU busy (a macro PIM command running; the channels in PIM mode)"),
        ("completed", "macro PIM commands completed"),
    )),
    ("fabric", 0x120, tuple((f"req_stall{i}", f"{name} requests waiting to enter the memory fabric")
                            for i, name in enumerate(REQUESTERS))),
)

# The SRAM-PIM queue's counters (hw.npu.spu; systems with cfg.spu only). Its SLOAD engine shares the vector
# queue's fabric port (fabric.req_stall3 counts both).
_SPU_GROUP = ("spu", 0x140, (
    ("busy", "SRAM-PIM queue busy (instructions queued or executing)"),
    ("compute", "SRAM-PIM unit busy (a QK / PV command in its pipeline)"),
    ("load", "SLOAD engine busy"),
    ("spm_stall", "a result beat waiting for the vector scratchpad's write port"),
    ("instructions", "SRAM-PIM queue instructions executed"),
))

CH_BASE = 0x200
CH_STRIDE = 0x20
CH_COUNTERS = (
    ("busy", "controller busy (requests queued or in flight, refresh, PIM)"),
    ("commands", "DRAM bus commands issued"),
    ("refreshes", "refreshes issued"),
    ("forced_refreshes", "refreshes forced by the deadline"),
    ("row_hits", "normal column commands to an open row"),
    ("row_misses", "normal requests that needed a row opened"),
    ("pim_wait", "normal requests queued while the channel is in PIM mode"),
    ("pim_commands", "PIM micro commands taken"),
)


def register_table(channels: int, spu: bool = False) -> tuple[Reg, ...]:
    """Every register of a SoC with ``channels`` PIM channels (and the SRAM-PIM queue's counters with
    ``spu``), by offset."""
    if not isinstance(channels, int) or channels < 1 or CH_BASE + channels * CH_STRIDE > 0x1000:
        raise ValueError(f"channels must be an integer in [1, {(0x1000 - CH_BASE) // CH_STRIDE}], not {channels!r}")
    regs = list(_FIXED)
    for group, base, counters in _GROUPS + ((_SPU_GROUP,) if spu else ()):
        for i, (name, meaning) in enumerate(counters):
            regs.append(Reg(f"{group.upper()}_{name.upper()}", base + 4 * i, "r", meaning, (group, name)))
    for c in range(channels):
        for i, (name, meaning) in enumerate(CH_COUNTERS):
            regs.append(Reg(f"CH{c}_{name.upper()}", CH_BASE + CH_STRIDE * c + 4 * i, "r", f"channel {c}: {meaning}",
                            (f"ch{c}", name)))
    offsets = [r.offset for r in regs]
    assert len(set(offsets)) == len(offsets), "register offsets overlap"
    return tuple(sorted(regs, key=lambda r: r.offset))


def counter_registers(channels: int, spu: bool = False) -> dict:
    """``{"group.counter": offset}`` of every counter."""
    return {f"{r.source[0]}.{r.source[1]}": r.offset for r in register_table(channels, spu) if r.source}


def table_text(channels: int = 2) -> str:
    """The register map as a text table (for docs and ``--help``)."""
    lines = [f"{'offset':>8}  {'name':<22} {'acc':<3} meaning"]
    for r in register_table(channels):
        lines.append(f"{r.offset:#08x}  {r.name:<22} {r.access:<3} {r.meaning}")
    return "\n".join(lines)
