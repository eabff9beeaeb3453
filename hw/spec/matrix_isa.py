"""The NPU matrix unit's instruction set: one table for the RTL, the drivers and the docs.

Every instruction is one 192-bit :data:`INSTRUCTION` (a ``data.Struct``): a
48-bit header (opcode, flags, dependency-token masks) and a 144-bit body whose
meaning depends on the opcode (a ``data.Union`` of :data:`DMA_BODY` and
:data:`COMPUTE_BODY`). The RTL (:mod:`hw.npu.matrix_unit`, :mod:`hw.npu.dma`,
which import it as ``hw.npu.isa``) decodes these layouts; the firmware builds
instructions with :func:`encode`, which reads the same layouts, so the field
positions exist in one place only. The layouts are Amaranth ``data`` layouts
because the RTL's signals have them; nothing else of Amaranth is used here.

Opcodes
-------
``LOAD``
    2-D strided tile from device memory into the activation or weight
    scratchpad (``target``), optionally transposed.
``STORE``
    2-D tile from the accumulator scratchpad into device memory, as FP32 or
    rounded to BF16 (``bf16``).
``COMPUTE``
    ``acc[M x N] (+)= act[M x K] @ wgt[K x N]`` on the systolic array;
    ``accumulate`` adds to the accumulators, otherwise they are overwritten.
``NOP``
    Only moves dependency tokens (waits, then signals) on the compute queue.

Scratchpad layouts (``W`` = lanes of one scratchpad word: ``array_rows`` for
activations, ``array_cols`` for weights and accumulators)

* a tile row ``r`` is split into chunks of ``W`` elements; chunk ``c`` of row
  ``r`` is the word ``spm_addr + c * spm_stride + r``;
* a transposed load stores element ``(r, c)`` of the memory tile as element
  ``(c, r)``: word ``spm_addr + (r // W) * spm_stride + c``, lane ``r % W``;
* ``COMPUTE`` reads activation word ``act_addr + kb * act_stride + m`` (row
  ``m``, K-block ``kb``), weight word ``wgt_addr + nb * wgt_stride + k`` and
  accumulator word ``acc_addr + nb * acc_stride + m`` (N-block ``nb``).

Dependency tokens
-----------------
Sixteen counting semaphores. Instructions are dispatched in program order to
three queues (load, compute, store) that run independently. Before an
instruction starts, its unit waits until every semaphore in ``wait`` is
non-zero and takes one token from each; when it has finished (its last
scratchpad or memory write is done), it gives one token to every semaphore in
``signal``.
"""

import enum as py_enum

from amaranth.lib import data, enum

__all__ = [
    "Opcode", "Target", "ErrorCode", "N_SEMAPHORES", "HEADER", "DMA_BODY", "COMPUTE_BODY", "BODY",
    "INSTRUCTION", "INSTRUCTION_BITS", "encode", "decode", "InstructionError", "USED_FIELDS",
]

N_SEMAPHORES = 16
SPM_ADDR_BITS = 16
DIM_BITS = 16


class Opcode(enum.Enum, shape=4):
    NOP = 0
    LOAD = 1
    STORE = 2
    COMPUTE = 3


class Target(enum.Enum, shape=2):
    """Scratchpad a ``LOAD`` writes."""
    ACT = 0
    WGT = 1


class ErrorCode(enum.Enum, shape=4):
    """Sticky error code of the matrix unit (the first error is kept)."""
    NONE = 0
    BAD_OPCODE = 1        # reserved opcode or target
    BAD_SIZE = 2          # a zero dimension
    MISALIGNED = 3        # memory address or stride not a multiple of one 32-byte column
    ACT_OVERRUN = 4       # tile would run past the end of the activation scratchpad
    WGT_OVERRUN = 5       # ... of the weight scratchpad
    ACC_OVERRUN = 6       # ... of the accumulator scratchpad
    MEM_ERROR = 7         # memory answered with error = 1
    MEM_ORDER = 8         # a response came back with an unexpected tag
    TOKEN_OVERFLOW = 9    # a semaphore would exceed 15 tokens


HEADER = data.StructLayout({
    "opcode": Opcode,
    "target": Target,
    "transpose": 1,
    "accumulate": 1,
    "bf16": 1,
    "_reserved": 7,
    "wait": N_SEMAPHORES,
    "signal": N_SEMAPHORES,
})

DMA_BODY = data.StructLayout({
    "mem_addr": 32,       # byte address of element (0, 0); a multiple of 32
    "mem_stride": 24,     # bytes between tile rows in memory; a multiple of 32
    "rows": DIM_BITS,
    "cols": DIM_BITS,     # elements per row (BF16 for LOAD; FP32 or BF16 for STORE)
    "spm_addr": SPM_ADDR_BITS,
    "spm_stride": SPM_ADDR_BITS,   # words between chunks of one row
    "_reserved": 24,
})

COMPUTE_BODY = data.StructLayout({
    "act_addr": SPM_ADDR_BITS,
    "act_stride": SPM_ADDR_BITS,   # words between K-blocks
    "wgt_addr": SPM_ADDR_BITS,
    "wgt_stride": SPM_ADDR_BITS,   # words between N-blocks
    "acc_addr": SPM_ADDR_BITS,
    "acc_stride": SPM_ADDR_BITS,   # words between N-blocks
    "m": DIM_BITS,
    "k": DIM_BITS,
    "n": DIM_BITS,
})

BODY = data.UnionLayout({"dma": DMA_BODY, "compute": COMPUTE_BODY})

INSTRUCTION = data.StructLayout({"header": HEADER, "body": BODY})
INSTRUCTION_BITS = INSTRUCTION.size
assert HEADER.size == 48 and BODY.size == 144 and INSTRUCTION_BITS == 192


def _pack(layout, fields: dict) -> int:
    value = 0
    for name, v in fields.items():
        try:
            field = layout[name]
        except KeyError:
            raise KeyError(f"Unknown instruction field {name!r}; known: {', '.join(f for f, _ in layout)}") \
                from None
        width = field.width
        if isinstance(v, py_enum.Enum):
            v = v.value
        v = int(v)
        if not 0 <= v < (1 << width):
            raise ValueError(f"Field {name!r} must fit in {width} bits, not {v!r}")
        value |= v << field.offset
    return value


def encode(opcode: Opcode, *, wait: int = 0, signal: int = 0, **fields) -> int:
    """The 192-bit instruction word as an integer.

    Header fields (``target``, ``transpose``, ``accumulate``, ``bf16``) and
    body fields (``DMA_BODY`` for LOAD/STORE, ``COMPUTE_BODY`` for COMPUTE) are
    keyword arguments; ``wait`` and ``signal`` are semaphore bit masks.
    """
    opcode = Opcode(opcode)
    header = {"opcode": opcode, "wait": wait, "signal": signal}
    body = {}
    for name, v in fields.items():
        if name in ("target", "transpose", "accumulate", "bf16"):
            header[name] = v
        else:
            body[name] = v
    body_layout = COMPUTE_BODY if opcode in (Opcode.COMPUTE,) else DMA_BODY
    if opcode == Opcode.NOP and body:
        raise ValueError(f"NOP takes no body fields, not {sorted(body)}")
    word = _pack(HEADER, header) | (_pack(body_layout, body) << INSTRUCTION["body"].offset)
    return word


class InstructionError(ValueError):
    """An instruction word that :func:`decode` cannot accept; the message names the field."""


USED_FIELDS = {
    Opcode.NOP: ("wait", "signal"),
    Opcode.LOAD: ("wait", "signal", "target", "transpose", "bf16")
    + tuple(n for n, _ in DMA_BODY if not n.startswith("_")),
    Opcode.STORE: ("wait", "signal", "target", "transpose", "bf16")
    + tuple(n for n, _ in DMA_BODY if not n.startswith("_")),
    Opcode.COMPUTE: ("wait", "signal", "accumulate") + tuple(n for n, _ in COMPUTE_BODY),
}
"""The fields each opcode has. In a well-formed instruction (``decode(word, strict=True)``, what the
assembler accepts) every other bit is zero; the RTL ignores them."""


def decode(word: int, strict: bool = False) -> dict:
    """Fields of an instruction word: the header and the body of its opcode (reserved fields left out).

    Raises :class:`InstructionError` for a reserved opcode. With ``strict`` also for a word wider than
    :data:`INSTRUCTION_BITS`, a reserved ``target`` of LOAD / STORE, and any non-zero bit outside the
    opcode's :data:`USED_FIELDS` (reserved fields, the other opcode's body, header flags it has not), so
    that the fields returned describe the word completely."""
    def unpack(layout, value):
        return {name: (value >> field.offset) & ((1 << field.width) - 1) for name, field in layout}
    word = int(word)
    code = word & ((1 << HEADER["opcode"].width) - 1)
    try:
        opcode = Opcode(code)
    except ValueError:
        raise InstructionError(f"field opcode is {code}, not one of "
                               f"{', '.join(f'{o.name}={o.value}' for o in Opcode)}") from None
    header = unpack(HEADER, word)
    header["opcode"] = opcode
    body_value = word >> INSTRUCTION["body"].offset
    body_layout = COMPUTE_BODY if opcode == Opcode.COMPUTE else DMA_BODY
    body = unpack(body_layout, body_value)
    if strict:
        if word >> INSTRUCTION_BITS:
            raise InstructionError(f"word is {word.bit_length()} bits, wider than {INSTRUCTION_BITS}")
        used = USED_FIELDS[opcode]
        for part, fields in (("header", header), ("body", body)):
            for name, value in fields.items():
                if name == "opcode" or not value or name in used:
                    continue
                if name.startswith("_"):
                    raise InstructionError(f"{opcode.name}: reserved {part} bits are {value:#x} (must be 0)")
                raise InstructionError(f"{opcode.name} does not use field {name}, but it is {value:#x} (must be 0)")
        if opcode == Opcode.NOP and body_value:
            raise InstructionError(f"NOP has no body, but its body bits are {body_value:#x} (must be 0)")
        if opcode in (Opcode.LOAD, Opcode.STORE) and header["target"] not in (t.value for t in Target):
            raise InstructionError(f"field target is {header['target']}, not one of "
                                   f"{', '.join(f'{t.name}={t.value}' for t in Target)}")
    out = {k: v for k, v in header.items() if not k.startswith("_")}
    out.update({k: v for k, v in body.items() if not k.startswith("_")})
    return out
