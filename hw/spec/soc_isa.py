"""The SoC instruction set: the command processor's program format, in one table.

A program is a sequence of 256-bit instructions (one 32-byte DRAM column
each, little-endian) in device memory. The command processor (``hw/cp.py``)
fetches it, decodes the ``op`` field and dispatches the payload to a unit
queue, in program order:

==========  ====  ==========  ================================================================
op          code  queue       meaning
==========  ====  ==========  ================================================================
(reserved)  0     --          illegal: a program that runs into zeroed memory stops here
END         1     --          wait until every unit is idle, then raise ``done``
FENCE       2     --          wait until the units in ``units`` are idle (MU=1, VQ=2, PCU=4, SPU=8)
MATRIX      3     MU          payload = one matrix-unit instruction (:mod:`hw.spec.matrix_isa`, 192 bits)
VECTOR      4     VQ          payload = one vector-unit instruction (:class:`hw.spec.vector_isa.VectorInstr`)
VLOAD       5     VQ          payload = :data:`VDMA_BODY`: device memory -> vector scratchpad
VSTORE      6     VQ          payload = :data:`VDMA_BODY`: vector scratchpad -> device memory
PIM         7     PCU         payload = one macro PIM command (:mod:`hw.spec.macro`, 128 bits)
SPIM        8     SPU         payload = :data:`SPIM_FIELDS`: one SRAM-PIM command (QK or PV) with its
                              vector-scratchpad operands and results (systems with an SRAM-PIM unit)
SLOAD       9     SPU         payload = :data:`SLOAD_FIELDS`: device memory -> SRAM-PIM unit lines
==========  ====  ==========  ================================================================

Codes 10..15 are illegal, and so are 8 and 9 on a system without an SRAM-PIM
unit (``SystemConfig.spu is None``: :func:`decode` with ``spu=False``). Bits
``[0, 4)`` hold ``op``, bits ``[8, 11)`` the FENCE unit mask (``[8, 12)`` with
an SRAM-PIM unit: ``SPU = 8``); the payload starts at bit 32
(:data:`PAYLOAD_LO`). Every other header bit must be zero (an instruction with
a non-zero reserved header bit is illegal too).

SPIM (queue SPU, :mod:`hw.npu.spu`): ``mode`` 0 = QK, 1 = PV; ``base``,
``count``, ``heads``, ``stride`` are the unit's command
(:class:`hw.npu.sram_pim.SramPimUnit`). Scratchpad addresses are in 32-byte
columns, as VDMA's ``spm_addr``. QK reads head ``h``'s query (``word_lanes``
BF16) at column ``spm_in + h * in_pitch`` and writes its ``count`` FP32 scores
at column ``spm_out + h * out_pitch``; PV reads head ``h``'s ``count`` BF16
probabilities at ``spm_in + h * in_pitch`` (whole groups of ``macros``: the
values past ``count`` in the last group are read and ignored) and writes its
``word_lanes`` FP32 outputs at ``spm_out + h * out_pitch``.

SLOAD (queue SPU): for region ``r < regions`` and position ``p < positions``,
``cols`` 32-byte columns at device-memory byte ``mem_addr + r * region_stride
+ p * pos_stride`` go into unit line ``line + r * line_stride + p`` (the rest
of the line zero): e.g. the K (or V) cache rows of the heads of a group.

Dependencies: the matrix unit resolves its own load/compute/store order with
its 16 counting semaphores (``wait``/``signal`` of its instructions); between
units the program places FENCEs. The vector queue (VQ) runs its VECTOR,
VLOAD and VSTORE instructions one at a time in order; the PCU runs macros in
order. A program overlaps NPU work with PIM work by placing independent
instructions between a PIM instruction and the FENCE that waits for it.

VDMA (VLOAD/VSTORE) moves ``rows`` rows of ``cols`` 32-byte columns; row
``r`` is at byte ``mem_addr + r * mem_stride`` in device memory and at
scratchpad byte ``32 * (spm_addr + r * spm_pitch)`` (the scratchpad viewed
as bytes, ``4 * lanes`` per word). The bytes are copied unchanged.

Errors stop the command processor with :class:`CpError` and the unit's own
code (matrix :class:`hw.spec.matrix_isa.ErrorCode`, vector :class:`VqError`,
PCU :class:`hw.spec.macro.MacroError`, SRAM-PIM queue :class:`SpuError`) and
the failing instruction's address in the error registers.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["SocOp", "Unit", "CpError", "VqError", "SpuError", "OpSpec", "ISA_TABLE", "OPSPEC", "VDMA_FIELDS",
           "VDMA_BITS", "SPIM_FIELDS", "SPIM_BITS", "SLOAD_FIELDS", "SLOAD_BITS", "SPU_OPS", "SPU_PAYLOAD_WIDTH",
           "FIELDS", "units_bits", "SPIM_OVERHEAD",
           "INSTR_BITS", "INSTR_BYTES", "PAYLOAD_LO", "PAYLOAD_BITS", "PAYLOAD_WIDTH", "UNITS_LO", "UNITS_BITS",
           "encode", "decode", "IsaError", "to_bytes", "from_bytes"]

INSTR_BITS = 256
INSTR_BYTES = 32
PAYLOAD_LO = 32
PAYLOAD_BITS = INSTR_BITS - PAYLOAD_LO


class SocOp(enum.IntEnum):
    END = 1
    FENCE = 2
    MATRIX = 3
    VECTOR = 4
    VLOAD = 5
    VSTORE = 6
    PIM = 7
    SPIM = 8
    SLOAD = 9


class Unit(enum.IntFlag):
    MU = 1      # matrix unit (with its DMA)
    VQ = 2      # vector queue: vector unit + vector DMA
    PCU = 4     # PIM control unit
    SPU = 8     # SRAM-PIM queue: SRAM-PIM unit + its operand reader / result writer + SLOAD engine


class CpError(enum.IntEnum):
    """Command-processor error code (``ERROR`` bits 0..7); the unit's own code is in bits 8..15."""
    NONE = 0
    ILLEGAL = 1         # reserved op code or a non-zero reserved header bit
    FETCH = 2           # instruction fetch answered with an error (address outside device memory)
    MU = 3              # the matrix unit reported an error (its ErrorCode in bits 8..15)
    VQ = 4              # the vector queue reported an error (VqError in bits 8..15)
    PCU = 5             # the PCU reported an error (MacroError in bits 8..15)
    BAD_PROGRAM = 6     # START with a misaligned or out-of-range program address or zero length
    SPU = 7             # the SRAM-PIM queue reported an error (SpuError in bits 8..15)


class VqError(enum.IntEnum):
    """Vector-queue error codes: 1..7 are the vector unit's VecError, 8.. the vector DMA's."""
    NONE = 0
    BAD_OPCODE = 1
    BAD_LENGTH = 2
    BAD_ADDRESS = 3
    BAD_MODE = 4
    KV_OVERFLOW = 5
    DMA_SIZE = 8        # rows or cols zero
    DMA_ALIGN = 9       # mem_addr or mem_stride not a multiple of 32
    DMA_SPM = 10        # scratchpad range past the end of the vector scratchpad
    DMA_MEM = 11        # memory answered with an error (address outside device memory)


class SpuError(enum.IntEnum):
    """SRAM-PIM queue error codes (checked before anything is touched, except SLOAD_MEM from a response)."""
    NONE = 0
    BAD_COMMAND = 1     # SPIM: count or heads 0, base or stride >= rows, keys beyond the last row
    SPM = 2             # SPIM: an operand or result range past the end of the vector scratchpad
    SLOAD_SIZE = 3      # SLOAD: regions, positions or cols 0, or cols wider than a line
    SLOAD_ALIGN = 4     # SLOAD: mem_addr, pos_stride or region_stride not a multiple of 32
    SLOAD_LINE = 5      # SLOAD: a line past the unit's last line
    SLOAD_MEM = 6       # SLOAD: a range beyond device memory, or a response with error
    UNIT = 7            # the unit's own sticky error flag (never raised by a checked command)


@dataclass(frozen=True)
class OpSpec:
    op: SocOp
    queue: str
    fields: str
    meaning: str


ISA_TABLE = (
    OpSpec(SocOp.END, "-", "", "wait until all units are idle, then done"),
    OpSpec(SocOp.FENCE, "-", "units", "wait until the named units (MU=1, VQ=2, PCU=4, SPU=8) are idle"),
    OpSpec(SocOp.MATRIX, "MU", "word", "matrix-unit instruction (hw.spec.matrix_isa, 192 bits)"),
    OpSpec(SocOp.VECTOR, "VQ", "word", "vector-unit instruction (hw.spec.vector_isa.VectorInstr, 220 bits)"),
    OpSpec(SocOp.VLOAD, "VQ", "mem_addr mem_stride rows cols spm_addr spm_pitch",
           "device memory -> vector scratchpad, rows x cols 32-byte columns"),
    OpSpec(SocOp.VSTORE, "VQ", "mem_addr mem_stride rows cols spm_addr spm_pitch",
           "vector scratchpad -> device memory, rows x cols 32-byte columns"),
    OpSpec(SocOp.PIM, "PCU", "word", "macro PIM command (hw.spec.macro, 128 bits)"),
    OpSpec(SocOp.SPIM, "SPU", "mode base count heads stride spm_in in_pitch spm_out out_pitch",
           "SRAM-PIM QK / PV command, operands from and results to the vector scratchpad"),
    OpSpec(SocOp.SLOAD, "SPU", "mem_addr pos_stride positions region_stride regions cols line line_stride",
           "device memory -> SRAM-PIM unit lines, regions x positions lines of cols 32-byte columns"),
)
OPSPEC = {s.op: s for s in ISA_TABLE}

# (name, bit offset inside the payload, width)
VDMA_FIELDS = (("mem_addr", 0, 32), ("mem_stride", 32, 24), ("rows", 56, 16), ("cols", 72, 16),
               ("spm_addr", 88, 24), ("spm_pitch", 112, 24))
VDMA_BITS = 136
SPIM_FIELDS = (("mode", 0, 1), ("base", 1, 16), ("count", 17, 20), ("heads", 37, 8), ("stride", 45, 16),
               ("spm_in", 61, 24), ("in_pitch", 85, 24), ("spm_out", 109, 24), ("out_pitch", 133, 24))
SPIM_BITS = 157
SLOAD_FIELDS = (("mem_addr", 0, 32), ("pos_stride", 32, 24), ("positions", 56, 16), ("region_stride", 72, 32),
                ("regions", 104, 8), ("cols", 112, 8), ("line", 120, 20), ("line_stride", 140, 20))
SLOAD_BITS = 160
SPIM_OVERHEAD = 8
"""Cycles a lone SPIM keeps the SRAM-PIM queue busy beyond the unit's command_cycles (:mod:`hw.npu.spu`,
measured by tests/test_spu.py)."""
UNITS_LO, UNITS_BITS = 8, 3
"""The FENCE unit mask of a system without an SRAM-PIM unit (:func:`units_bits`)."""
PAYLOAD_WIDTH = {SocOp.MATRIX: 192, SocOp.VECTOR: 220, SocOp.PIM: 128, SocOp.VLOAD: VDMA_BITS,
                 SocOp.VSTORE: VDMA_BITS}
"""Payload widths of the ops every system has."""
SPU_OPS = (SocOp.SPIM, SocOp.SLOAD)
SPU_PAYLOAD_WIDTH = {SocOp.SPIM: SPIM_BITS, SocOp.SLOAD: SLOAD_BITS}
"""Payload widths of the SRAM-PIM queue's ops (systems with an SRAM-PIM unit)."""
FIELDS = {SocOp.VLOAD: VDMA_FIELDS, SocOp.VSTORE: VDMA_FIELDS, SocOp.SPIM: SPIM_FIELDS, SocOp.SLOAD: SLOAD_FIELDS}
"""Ops whose payload is a set of named fields: (name, offset, width) each."""


def units_bits(spu: bool) -> int:
    """Width of the FENCE unit mask: 3 (MU, VQ, PCU), 4 with the SRAM-PIM queue (SPU)."""
    return UNITS_BITS + 1 if spu else UNITS_BITS


class IsaError(ValueError):
    """A malformed instruction or program (with the instruction index when known)."""


def _field(name, value, width):
    value = int(value)
    if not 0 <= value < (1 << width):
        raise IsaError(f"field {name} must fit in {width} bits, not {value!r}")
    return value


def encode(op: SocOp, *, units: int = 0, word: int = 0, **vdma) -> int:
    """The 256-bit instruction (an int). ``word`` is the payload of MATRIX/VECTOR/PIM, ``vdma`` the
    fields of VLOAD/VSTORE/SPIM/SLOAD (all of the op's :data:`FIELDS` required), ``units`` the FENCE
    mask (``Unit.SPU`` included: whether the system has the SRAM-PIM queue is :func:`decode`'s question)."""
    op = SocOp(op)
    value = int(op)
    if op == SocOp.FENCE:
        value |= _field("units", units, units_bits(True)) << UNITS_LO
    elif units:
        raise IsaError(f"{op.name} takes no unit mask")
    if op in FIELDS:
        names = {n for n, _, _ in FIELDS[op]}
        if set(vdma) != names:
            raise IsaError(f"{op.name} needs fields {sorted(names)}, got {sorted(vdma)}")
        payload = 0
        for name, lo, width in FIELDS[op]:
            payload |= _field(name, vdma[name], width) << lo
        value |= payload << PAYLOAD_LO
    elif vdma:
        raise IsaError(f"{op.name} takes no fields {sorted(vdma)}")
    if op in (SocOp.MATRIX, SocOp.VECTOR, SocOp.PIM):
        value |= _field("word", word, PAYLOAD_WIDTH[op]) << PAYLOAD_LO
    elif word:
        raise IsaError(f"{op.name} takes no payload word")
    return value


def decode(value: int, index: int | None = None, spu: bool = False) -> dict:
    """Fields of one instruction; raises :class:`IsaError` for an illegal one (what the RTL flags ILLEGAL).
    ``spu``: the system has the SRAM-PIM queue (SPIM and SLOAD legal, a 4-bit FENCE mask)."""
    where = "" if index is None else f"instruction {index}: "
    value = int(value)
    if not 0 <= value < (1 << INSTR_BITS):
        raise IsaError(f"{where}an instruction is {INSTR_BITS} bits, not {value.bit_length()}")
    code = value & 0xF
    try:
        op = SocOp(code)
    except ValueError:
        raise IsaError(f"{where}illegal op code {code}") from None
    if op in SPU_OPS and not spu:
        raise IsaError(f"{where}illegal op code {code} ({op.name}: the system has no SRAM-PIM unit)")
    ub = units_bits(spu)
    header = value & ((1 << PAYLOAD_LO) - 1)
    allowed = 0xF | (((1 << ub) - 1) << UNITS_LO if op == SocOp.FENCE else 0)
    if header & ~allowed:
        raise IsaError(f"{where}reserved header bits set: {header & ~allowed:#x}")
    payload = value >> PAYLOAD_LO
    out = {"op": op}
    if op == SocOp.FENCE:
        out["units"] = (value >> UNITS_LO) & ((1 << ub) - 1)
    elif op in FIELDS:
        for name, lo, width in FIELDS[op]:
            out[name] = (payload >> lo) & ((1 << width) - 1)
        if payload >> {**PAYLOAD_WIDTH, **SPU_PAYLOAD_WIDTH}[op]:
            raise IsaError(f"{where}{op.name} has bits set beyond its fields")
    elif op in (SocOp.MATRIX, SocOp.VECTOR, SocOp.PIM):
        if payload >> PAYLOAD_WIDTH[op]:
            raise IsaError(f"{where}{op.name} payload wider than {PAYLOAD_WIDTH[op]} bits")
        out["word"] = payload
    elif payload:
        raise IsaError(f"{where}{op.name} has a non-zero payload")
    return out


def to_bytes(program: list[int]) -> bytes:
    return b"".join(int(v).to_bytes(INSTR_BYTES, "little") for v in program)


def from_bytes(blob: bytes) -> list[int]:
    if len(blob) % INSTR_BYTES:
        raise IsaError(f"a program binary is a multiple of {INSTR_BYTES} bytes, not {len(blob)}")
    return [int.from_bytes(blob[i:i + INSTR_BYTES], "little") for i in range(0, len(blob), INSTR_BYTES)]
