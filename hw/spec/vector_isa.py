"""The vector unit's instruction set: one table for the RTL (:mod:`hw.npu.vector`), the golden model, the
assembler, the compiler and the docs.

:data:`ISA_TABLE` names every opcode with its code, the fields it uses and its meaning; :class:`Opcode`
is generated from it. :class:`VectorInstr` is the instruction layout (an Amaranth ``data.Struct``, because
the RTL's instruction stream carries it; nothing else of Amaranth is used here) and :func:`encode` builds
an instruction word from field values. The semantics of every opcode, the memory model and the timing
are documented with the unit, :mod:`hw.npu.vector`.
"""

import types
from collections import namedtuple

from amaranth.lib import data, enum

__all__ = ["ADDR_BITS", "OpSpec", "ISA_TABLE", "OPSPEC", "Opcode", "Fmt", "BMode", "MaskMode", "VecError",
           "VectorInstr", "encode", "EXIT_LATENCY", "ROW_GROUP", "exit_latency", "reduce_latency", "vector_cycles"]

ADDR_BITS = 24
"""Width of the word-address fields of an instruction."""

OpSpec = namedtuple("OpSpec", "name code fields meaning")

ISA_TABLE = (
    OpSpec("ADD", 0, "a b d n rows a_fmt b_fmt d_fmt b_mode",
           "D = A + B; B per element (ROW), one row for all rows (VEC), one element per row (COL) or imm0 (IMM)"),
    OpSpec("MUL", 1, "a b d n rows a_fmt b_fmt d_fmt b_mode", "D = A * B; B as for ADD"),
    OpSpec("SCALE", 2, "a d n rows a_fmt d_fmt imm0 imm1", "D = A * imm0 + imm1 (imm1 = -0.0 for a pure scale)"),
    OpSpec("COPY", 3, "a d n rows a_fmt d_fmt", "D = A (format conversion)"),
    OpSpec("EXP", 4, "a d n rows a_fmt d_fmt", "D = exp(A) = exp2(A * log2(e))"),
    OpSpec("RECIP", 5, "a d n rows a_fmt d_fmt", "D = 1 / A"),
    OpSpec("RSQRT", 6, "a d n rows a_fmt d_fmt", "D = 1 / sqrt(A)"),
    OpSpec("GELU", 7, "a d n rows a_fmt d_fmt", "D = gelu(A), tanh form"),
    OpSpec("MAX", 8, "a d n rows a_fmt d_fmt", "D[r] = max of row r of A (one element per row)"),
    OpSpec("SUM", 9, "a d n rows a_fmt d_fmt", "D[r] = sum of row r of A (lane tree, then beats in order)"),
    OpSpec("LN_STATS", 10, "a d n rows a_fmt imm0 imm1",
           "layernorm phase 1: D[2r] = mean = sum(A_r) * imm0, D[2r+1] = rsqrt(sum((A_r - mean)^2) * imm0 + imm1); "
           "imm0 = 1/n, imm1 = eps; D is FP32"),
    OpSpec("LN_APPLY", 11, "a b d aux n rows a_fmt d_fmt",
           "layernorm phase 2: D = ((A - mean_r) * rstd_r) * gamma + beta; stats (mean, rstd) FP32 pairs at aux, "
           "B = one row of 32-bit slots, gamma in the low and beta in the high BF16 half"),
    OpSpec("SOFTMAX", 12, "a d aux pos n rows a_fmt d_fmt mask",
           "masked softmax of each row: max over visible elements, e = exp(A - max), D = e * recip(sum e); "
           "masked elements give 0; a row with no visible element (or max -inf) gives all 0. mask BITMAP: "
           "bit j of row r at aux (1 = visible), rows of ceil(n / 32L) words; CAUSAL: visible iff j <= r + pos; "
           "PREFIX: visible iff j <= pos in every row (rows that share one key length, such as the heads of "
           "one generation step)"),
    OpSpec("KV_APPEND", 13, "a d n rows pos imm0 a_fmt d_fmt",
           "KV cache append: row r of A -> cache row pos + r at D (same pitch as D rows); imm0 = capacity in rows; "
           "pos + rows > capacity is KV_OVERFLOW"),
)

Opcode = types.new_class("Opcode", (enum.Enum,), {"shape": 5},
                         lambda ns: [ns.__setitem__(op.name, op.code) for op in ISA_TABLE])
Opcode.__doc__ = "Vector unit opcodes, generated from :data:`ISA_TABLE`."
OPSPEC = {Opcode[op.name]: op for op in ISA_TABLE}


class Fmt(enum.Enum, shape=1):
    """Element format of an operand in the scratchpad."""
    FP32 = 0
    BF16 = 1


class BMode(enum.Enum, shape=2):
    """How operand B of ADD and MUL is broadcast."""
    ROW = 0      # B has the same shape as A
    VEC = 1      # one row of B, used for every row (bias, gamma)
    COL = 2      # one element of B per row of A
    IMM = 3      # imm0 for every element


class MaskMode(enum.Enum, shape=2):
    """Mask of SOFTMAX."""
    NONE = 0
    BITMAP = 1
    CAUSAL = 2
    PREFIX = 3


class VecError(enum.Enum, shape=3):
    """Error code of the last finished instruction."""
    NONE = 0
    BAD_OPCODE = 1
    BAD_LENGTH = 2      # n == 0, n > max_n or rows == 0
    BAD_ADDRESS = 3     # an operand region ends beyond the scratchpad
    BAD_MODE = 4        # mask on an op without one, LN_STATS to BF16
    KV_OVERFLOW = 5     # pos + rows > capacity


class VectorInstr(data.Struct):
    """One vector instruction (fields per opcode in :data:`ISA_TABLE`)."""
    op: Opcode
    a_fmt: Fmt
    b_fmt: Fmt
    d_fmt: Fmt
    b_mode: BMode
    mask: MaskMode
    a: ADDR_BITS
    b: ADDR_BITS
    d: ADDR_BITS
    aux: ADDR_BITS
    n: 16
    rows: 16
    pos: 16
    imm0: 32
    imm1: 32


def encode(**fields) -> int:
    """The instruction word (an int) of ``fields``; missing fields are 0, enums may be given by name.

    An integer that is not a member of its field's enum (an undefined opcode or
    mask mode, to test the error path) is placed as raw bits.
    """
    layout = data.Layout.cast(VectorInstr)
    enums = {"op": Opcode, "a_fmt": Fmt, "b_fmt": Fmt, "d_fmt": Fmt, "b_mode": BMode, "mask": MaskMode}
    conv, raw = {}, 0
    for name, value in fields.items():
        kind = enums.get(name)
        if kind is not None and isinstance(value, str):
            value = kind[value]
        elif kind is not None and not isinstance(value, kind) and value not in {e.value for e in kind}:
            field = layout[name]
            raw |= (int(value) & ((1 << field.width) - 1)) << field.offset
            continue
        conv[name] = value
    return VectorInstr.const(conv).as_value().value | raw


# -- timing (the closed form of the RTL's cycle counter, shared by the cost model, the performance model and
# the docs; tests/test_vector.py holds it equal to the RTL's ``cycles`` on every instruction it runs) ----------

EXIT_LATENCY = 23
"""Cycles from a beat's issue to its lane result (``VectorUnit.EXIT``: load 2 + lane 10 + function unit 11)."""

ROW_GROUP = 16
"""Rows a multi-pass instruction (SOFTMAX, LN_STATS) works on at once (``VectorUnit(row_group=...)``)."""


def exit_latency(add_stages: int = 2) -> int:
    """Cycles from a beat's issue to its lane result with FP32 adders of ``add_stages`` stages in the lanes and
    their function units (``VectorUnit(add_stages=...)``, issue 15): load 2, the lane's three adders, two
    multipliers (2 each) and function unit (``7 + 2 add_stages``): ``13 + 5 add_stages``
    (:data:`EXIT_LATENCY` = 23 with the default 2)."""
    return 13 + 5 * add_stages


def reduce_latency(lanes: int, acc_stages: int = 1, add_stages: int = 2) -> int:
    """Cycles from a reduced row's last beat at the lanes' exit to its result (``VectorReduce.latency``).

    The lane tree (``add_stages log2 lanes``, 2 per level by default), then the row accumulator: one cycle
    with ``acc_stages = 1``; with ``P = acc_stages`` interleaved partial sums, the ``P``-stage adder of the
    last beat and the pairwise combine of the partials (``log2`` of ``P`` rounded up to a power of two levels
    of ``P``-stage adders): ``P + P ceil(log2 P)`` (4, 9, 12 for ``P`` = 2, 3, 4)."""
    tree = add_stages * (lanes.bit_length() - 1)
    if acc_stages == 1:
        return tree + 1
    return tree + acc_stages + acc_stages * (acc_stages - 1).bit_length()


def vector_cycles(op: str, n: int, rows: int, lanes: int, row_group: int = ROW_GROUP, cores: int = 1,
                  acc_stages: int = 1, add_stages: int = 2) -> int:
    """Cycles from acceptance to ``done`` of vector instruction ``op`` over ``rows`` rows of ``n`` elements.

    ``nb = ceil(n / lanes)`` beats per row pass. With ``cores`` units (the projection's multi-core NPU, one
    instruction's work split over them) the faster of two splits: every row's beats over the units
    (``ceil(nb / cores)`` each: one generated token's scores) or the rows (``ceil(rows / cores)`` rows each:
    a prompt's score rows, whose reductions are per row; splitting a 2-beat row over four units leaves two
    idle and pays every row group's reduction waits in full on each).
    ``E`` = :data:`EXIT_LATENCY`, ``R = 2 log2 lanes`` (reduction tree), ``C = E + R + 6`` once per
    instruction (check, fill, drain). Element-wise ops, MAX and SUM stream rows back to back:
    ``rows nb + C``; LN_APPLY reads a row's statistics first: ``rows (nb + 2) + C``. The multi-pass ops
    work on groups of up to ``row_group`` rows: every pass runs over the group's rows back to back, and
    only the last row's reduction (or scalar) result is waited for, once per pass and group
    (``g = ceil(rows / row_group)`` groups):
    LN_STATS ``rows (2 nb + 2) + g (2 (E + R + 1) + E) + C``;
    SOFTMAX ``rows (3 nb + 1) + g (2 (E + R + 1) + E) + C``.
    ``acc_stages`` (the configuration's ``npu.vec_acc_stages``, issue 15) lengthens the reduction:
    ``R + 1`` = :func:`reduce_latency` in every formula; ``add_stages`` (``VectorUnit(add_stages=...)``)
    lengthens the lanes and the lane tree: ``E`` = :func:`exit_latency`.
    """
    if lanes < 2 or lanes & (lanes - 1):
        raise ValueError(f"lanes must be a power of two of at least 2, not {lanes!r}")
    if cores > 1 and rows > 1:
        return min(_cycles(op, n, rows, lanes, row_group, cores, acc_stages, add_stages),
                   _cycles(op, n, -(-rows // cores), lanes, row_group, 1, acc_stages, add_stages))
    return _cycles(op, n, rows, lanes, row_group, cores, acc_stages, add_stages)


def _cycles(op: str, n: int, rows: int, lanes: int, row_group: int, cores: int, acc_stages: int = 1,
            add_stages: int = 2) -> int:
    E, R = exit_latency(add_stages), reduce_latency(lanes, acc_stages, add_stages) - 1
    C = E + R + 6
    beats = -(-n // lanes)
    nb = -(-beats // cores)
    groups = -(-rows // row_group)
    if op == "LN_STATS":
        return rows * (2 * nb + 2) + groups * (2 * (E + R + 1) + E) + C
    if op == "SOFTMAX":
        return rows * (3 * nb + 1) + groups * (2 * (E + R + 1) + E) + C
    if op == "LN_APPLY":
        return rows * (nb + 2) + C
    return rows * nb + C
