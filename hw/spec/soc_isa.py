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
FENCE       2     --          wait until the units in ``units`` are idle (MU=1, VQ=2, PCU=4)
MATRIX      3     MU          payload = one matrix-unit instruction (:mod:`hw.spec.matrix_isa`, 192 bits)
VECTOR      4     VQ          payload = one vector-unit instruction (:class:`hw.spec.vector_isa.VectorInstr`)
VLOAD       5     VQ          payload = :data:`VDMA_BODY`: device memory -> vector scratchpad
VSTORE      6     VQ          payload = :data:`VDMA_BODY`: vector scratchpad -> device memory
PIM         7     PCU         payload = one macro PIM command (:mod:`hw.spec.macro`, 128 bits)
==========  ====  ==========  ================================================================

Codes 8..15 are illegal. Bits ``[0, 4)`` hold ``op``, bits ``[8, 11)`` the
FENCE unit mask; the payload starts at bit 32 (:data:`PAYLOAD_LO`). Every
other header bit must be zero (an instruction with a non-zero reserved
header bit is illegal too).

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
PCU :class:`hw.spec.macro.MacroError`) and the failing instruction's
address in the error registers.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["SocOp", "Unit", "CpError", "VqError", "OpSpec", "ISA_TABLE", "OPSPEC", "VDMA_FIELDS", "VDMA_BITS",
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


class Unit(enum.IntFlag):
    MU = 1      # matrix unit (with its DMA)
    VQ = 2      # vector queue: vector unit + vector DMA
    PCU = 4     # PIM control unit


class CpError(enum.IntEnum):
    """Command-processor error code (``ERROR`` bits 0..7); the unit's own code is in bits 8..15."""
    NONE = 0
    ILLEGAL = 1         # reserved op code or a non-zero reserved header bit
    FETCH = 2           # instruction fetch answered with an error (address outside device memory)
    MU = 3              # the matrix unit reported an error (its ErrorCode in bits 8..15)
    VQ = 4              # the vector queue reported an error (VqError in bits 8..15)
    PCU = 5             # the PCU reported an error (MacroError in bits 8..15)
    BAD_PROGRAM = 6     # START with a misaligned or out-of-range program address or zero length


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


@dataclass(frozen=True)
class OpSpec:
    op: SocOp
    queue: str
    fields: str
    meaning: str


ISA_TABLE = (
    OpSpec(SocOp.END, "-", "", "wait until all units are idle, then done"),
    OpSpec(SocOp.FENCE, "-", "units", "wait until the named units (MU=1, VQ=2, PCU=4) are idle"),
    OpSpec(SocOp.MATRIX, "MU", "word", "matrix-unit instruction (hw.spec.matrix_isa, 192 bits)"),
    OpSpec(SocOp.VECTOR, "VQ", "word", "vector-unit instruction (hw.spec.vector_isa.VectorInstr, 220 bits)"),
    OpSpec(SocOp.VLOAD, "VQ", "mem_addr mem_stride rows cols spm_addr spm_pitch",
           "device memory -> vector scratchpad, rows x cols 32-byte columns"),
    OpSpec(SocOp.VSTORE, "VQ", "mem_addr mem_stride rows cols spm_addr spm_pitch",
           "vector scratchpad -> device memory, rows x cols 32-byte columns"),
    OpSpec(SocOp.PIM, "PCU", "word", "macro PIM command (hw.spec.macro, 128 bits)"),
)
OPSPEC = {s.op: s for s in ISA_TABLE}

# (name, bit offset inside the payload, width)
VDMA_FIELDS = (("mem_addr", 0, 32), ("mem_stride", 32, 24), ("rows", 56, 16), ("cols", 72, 16),
               ("spm_addr", 88, 24), ("spm_pitch", 112, 24))
VDMA_BITS = 136
UNITS_LO, UNITS_BITS = 8, 3
PAYLOAD_WIDTH = {SocOp.MATRIX: 192, SocOp.VECTOR: 220, SocOp.PIM: 128, SocOp.VLOAD: VDMA_BITS,
                 SocOp.VSTORE: VDMA_BITS}


class IsaError(ValueError):
    """A malformed instruction or program (with the instruction index when known)."""


def _field(name, value, width):
    value = int(value)
    if not 0 <= value < (1 << width):
        raise IsaError(f"field {name} must fit in {width} bits, not {value!r}")
    return value


def encode(op: SocOp, *, units: int = 0, word: int = 0, **vdma) -> int:
    """The 256-bit instruction (an int). ``word`` is the payload of MATRIX/VECTOR/PIM, ``vdma`` the
    VLOAD/VSTORE fields (all six required), ``units`` the FENCE mask."""
    op = SocOp(op)
    value = int(op)
    if op == SocOp.FENCE:
        value |= _field("units", units, UNITS_BITS) << UNITS_LO
    elif units:
        raise IsaError(f"{op.name} takes no unit mask")
    if op in (SocOp.VLOAD, SocOp.VSTORE):
        names = {n for n, _, _ in VDMA_FIELDS}
        if set(vdma) != names:
            raise IsaError(f"{op.name} needs fields {sorted(names)}, got {sorted(vdma)}")
        payload = 0
        for name, lo, width in VDMA_FIELDS:
            payload |= _field(name, vdma[name], width) << lo
        value |= payload << PAYLOAD_LO
    elif vdma:
        raise IsaError(f"{op.name} takes no fields {sorted(vdma)}")
    if op in (SocOp.MATRIX, SocOp.VECTOR, SocOp.PIM):
        value |= _field("word", word, PAYLOAD_WIDTH[op]) << PAYLOAD_LO
    elif word:
        raise IsaError(f"{op.name} takes no payload word")
    return value


def decode(value: int, index: int | None = None) -> dict:
    """Fields of one instruction; raises :class:`IsaError` for an illegal one (what the RTL flags ILLEGAL)."""
    where = "" if index is None else f"instruction {index}: "
    value = int(value)
    if not 0 <= value < (1 << INSTR_BITS):
        raise IsaError(f"{where}an instruction is {INSTR_BITS} bits, not {value.bit_length()}")
    code = value & 0xF
    try:
        op = SocOp(code)
    except ValueError:
        raise IsaError(f"{where}illegal op code {code}") from None
    header = value & ((1 << PAYLOAD_LO) - 1)
    allowed = 0xF | (((1 << UNITS_BITS) - 1) << UNITS_LO if op == SocOp.FENCE else 0)
    if header & ~allowed:
        raise IsaError(f"{where}reserved header bits set: {header & ~allowed:#x}")
    payload = value >> PAYLOAD_LO
    out = {"op": op}
    if op == SocOp.FENCE:
        out["units"] = (value >> UNITS_LO) & ((1 << UNITS_BITS) - 1)
    elif op in (SocOp.VLOAD, SocOp.VSTORE):
        for name, lo, width in VDMA_FIELDS:
            out[name] = (payload >> lo) & ((1 << width) - 1)
        if payload >> VDMA_BITS:
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
