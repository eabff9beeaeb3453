"""The PIM command vocabulary: one table read by the RTL decoder, the golden model, the checker and the docs.

Each row of :data:`COMMANDS` names a command on a channel's DRAM-like command
bus, its opcode, which bus fields it uses, its timing class and what it does.
:class:`PimOp` (an ``enum.Enum`` with an explicit shape) is generated from the
table, so the RTL and Python share the encoding.

Timing classes (see :class:`hw.config.DramTiming`):

``act``    row activation: bank(s) closed, ``tRP`` after PRE, ``tRRD`` after the
           previous ACT, at most 4 ACTs in ``tFAW``, ``tRFC`` after REF.
           ACTAB opens the same row in every bank and counts as one activation
           for ``tRRD``/``tFAW`` (AiM's ACT16: the device is specified for it).
``pre``    precharge: ``tRAS`` after ACT, ``tRTP`` after a read-type column
           command (RD, MAC, AF), ``tWR`` after WR.
``col_rd`` read-type column command on an open row: ``tRCDRD`` after ACT.
``col_wr`` write-type column command on an open row: ``tRCDWR`` after ACT.
``gb``     global-buffer / accumulator access (no bank row involved).
``ref``    all-bank refresh: every bank closed and ``tRP`` after its PRE;
           blocks ACT and REF for ``tRFC``.

Row buffers (``PimGeometry.row_buffers``; the ``buffer`` column of the table):
with 1 (AiM, IANUS) every row command and every column command uses the
bank's one row buffer, and PACTAB / PPREAB are illegal opcodes. With 2
(NeuPIMs' dual row buffers) each bank has a *normal* buffer (ACT, ACTAB, PRE,
PREAB, RD, WR) and a *PIM* buffer (PACTAB, PPREAB, and the rows MACSB, MACAB
and AF read). Each buffer has its own ``tRCDRD``/``tRAS``/``tRP``/``tRTP``
windows; the rules *between* the buffers are (after the NeuPIMs artifact's
NewtonSim model):

* one row is never open in both buffers of a bank: ACT of the PIM buffer's
  row and PACTAB of a row any bank's normal buffer holds are ``BANK_OPEN``;
* activations of either buffer share the channel's ``tRRD`` and ``tFAW``
  window (PIM and normal activates are spaced like activates to one bank group);
* column commands of either buffer share ``tCCD`` (one command bus; NeuPIMs
  has no extra delay between a normal read and a PIM read, and neither is
  there one here beyond ``tCCD``);
* REF needs both buffers of every bank closed and ``tRP`` after the later PRE.

Every column-type command (``col_rd``, ``col_wr``, ``gb``) is spaced by
``tCCD`` from the previous one on the channel.

Low-precision processing units (``PimGeometry.weight_format`` ``int4`` / ``fp4``, issue 19; the
``LOWPREC_ONLY`` commands are illegal opcodes on a BF16 device): each bank has a register of 16 group
scales and one of 16 grid selectors, loaded by LDSCAB / LDSLAB from a column of its open (PIM) row. A
MACSB / MACAB carries in its otherwise unused ``row`` field the scale slot (bits 0-3: the column's group
index mod 16; it also picks the selector) and, with ``acc_slots = 2``, the accumulator slot (bit 4);
WRBIAS, RDMAC and AF take the accumulator slot in ``row`` bit 4 as well, and PU_BUSY is per slot (tMAC
after the last MAC into the same slot). With 4-bit weights a MAC consumes 64 activations, ``act_ratio``
global-buffer columns (4 BF16, 2 FP8): MAC ``col`` reads GB slot ``col mod gb_slots`` (GB columns
``act_ratio * slot .. + act_ratio - 1``).

Pipelined BF16 processing units (``PimGeometry.acc_stages = P > 1``, issue 15): the accumulator is ``P``
interleaved partial sums, combined when the command sequence says so: a MACSB / MACAB with ``row`` bit
:data:`COMBINE_ROW_BIT` set is a *combining MAC* (the last column before a read; :mod:`hw.pim.bank`).
``tMAC`` then counts to the combined total, and PU_BUSY also covers a MAC within ``tMAC`` of a combining
MAC, and RDMAC / AF while an addressed bank's last MAC since its preload was not a combining MAC.

The ``LOWPREC_ONLY`` commands are in the table (the checker and the docs read them) but not members of
:class:`PimOp`: the enum's members are written into the Verilog of every signal of its shape, so a new
member would change the text of every BF16 device; their opcodes are in :data:`LOWPREC_OPCODES`.
"""

import types
from dataclasses import dataclass

from amaranth.lib import enum as aenum

from ..config import COMBINE_ROW_BIT  # noqa: F401  (re-exported: the combining MAC's row bit)

__all__ = ["COMBINE_ROW_BIT", "Command", "COMMANDS", "COLUMN_OPS", "DUAL_ONLY", "LOWPREC_ONLY", "LOWPREC_OPCODES", "READ_OPS", "ops_where", "PimOp", "Violation", "VIOLATIONS", "ViolationCode", "OP_BITS", "by_name", "command_table_md"]

OP_BITS = 5


@dataclass(frozen=True)
class Command:
    name: str
    opcode: int
    timing: str          # act, pre, col_rd, col_wr, gb, ref, nop
    fields: tuple        # bus fields used: bank, row, col, data
    all_banks: bool
    returns_data: bool
    meaning: str
    buffer: str = ""     # row buffer used with 2 row buffers: "normal", "pim" or "" (none)


COMMANDS = (
    Command("NOP", 0, "nop", (), False, False, "No operation."),
    Command("ACT", 1, "act", ("bank", "row"), False, False, "Open `row` in `bank`.", "normal"),
    Command("ACTAB", 2, "act", ("row",), True, False,
            "Open `row` in every bank (AiM ACT16): the weight rows of one PIM tile at once.", "normal"),
    Command("PRE", 3, "pre", ("bank",), False, False, "Close the open row of `bank`.", "normal"),
    Command("PREAB", 4, "pre", (), True, False, "Close the open row of every bank that has one.", "normal"),
    Command("RD", 5, "col_rd", ("bank", "col"), False, True,
            "Read column `col` of the open row of `bank`; data on the bus tRL cycles later.", "normal"),
    Command("WR", 6, "col_wr", ("bank", "col", "data"), False, False,
            "Write `data` (with the byte mask) to column `col` of the open row of `bank`.", "normal"),
    Command("REF", 7, "ref", (), True, False, "All-bank refresh; every bank must be closed."),
    Command("WRGB", 8, "gb", ("col", "data"), True, False,
            "Write `data` (16 BF16 values) to global-buffer column `col`."),
    Command("MACSB", 9, "col_rd", ("bank", "col"), False, False,
            "Single-bank MAC: acc[bank] += sum over lanes of W[bank][row][col] x GB[col mod gb_columns]. "
            "4-bit weights: 64 codes x GB slot col mod gb_slots, scale slot `row` bits 0-3, accumulator "
            "slot `row` bit 4 (acc_slots = 2).", "pim"),
    Command("MACAB", 10, "col_rd", ("col",), True, False,
            "All-bank MAC: MACSB on every bank at once with the same column (each bank's open row).", "pim"),
    Command("WRBIAS", 11, "gb", ("col", "data"), True, False,
            "Preload accumulators of banks 8*col .. 8*col+7 with the FP32 values packed in `data` "
            "(word k for bank 8*col+k; column_bits/32 banks per command); acc_slots = 2: slot `row` bit 4."),
    Command("RDMAC", 12, "gb", ("col",), True, True,
            "Read the FP32 accumulators of banks 8*col .. 8*col+7 packed in one word, tRL cycles later; "
            "acc_slots = 2: slot `row` bit 4."),
    Command("AF", 13, "col_rd", (), True, False,
            "Activation function on every bank: af[b] = LUT-interpolated f(acc[b]); each bank's open row "
            "must be a reserved AF row (it holds the lookup table); acc_slots = 2: accumulator slot 0.", "pim"),
    Command("RDAF", 14, "gb", ("col",), True, True,
            "Read the activation results of banks 8*col .. 8*col+7 packed in one word, tRL cycles later."),
    Command("PACTAB", 15, "act", ("row",), True, False,
            "Dual row buffers only: open `row` in every bank's PIM row buffer (NeuPIMs' PIM activate).", "pim"),
    Command("PPREAB", 16, "pre", (), True, False,
            "Dual row buffers only: close every bank's PIM row buffer.", "pim"),
    Command("LDSCAB", 17, "col_rd", ("col",), True, False,
            "4-bit weights only: load every bank's scale register (16 FP16/BF16 group scales) from column "
            "`col` of its open (PIM) row.", "pim"),
    Command("LDSLAB", 18, "col_rd", ("col",), True, False,
            "fp4 with grid choice only: load every bank's selector register (16 2-bit grid selectors, the "
            "column's low 32 bits) from column `col` of its open (PIM) row.", "pim"),
)

DUAL_ONLY = ("PACTAB", "PPREAB")
"""Commands that exist only with two row buffers (illegal opcodes with one)."""
LOWPREC_ONLY = ("LDSCAB", "LDSLAB")
"""Commands that exist only with 4-bit weights (LDSLAB: fp4 with grid choice); not :class:`PimOp` members."""
LOWPREC_OPCODES = {c.name: c.opcode for c in COMMANDS if c.name in LOWPREC_ONLY}


def ops_where(pred) -> tuple:
    """The :class:`PimOp` members of the commands for which ``pred(command)`` holds (table order)."""
    return tuple(PimOp[c.name] for c in COMMANDS if c.name not in LOWPREC_ONLY and pred(c))



def by_name(name: str) -> Command:
    for c in COMMANDS:
        if c.name == name:
            return c
    raise KeyError(f"unknown PIM command {name!r}")


def _enum(name, items, shape):
    def body(ns):
        for key, value in items:
            ns[key] = value
    return types.new_class(name, (aenum.Enum,), {"shape": shape}, body)


PimOp = _enum("PimOp", [(c.name, c.opcode) for c in COMMANDS if c.name not in LOWPREC_ONLY], OP_BITS)
PimOp.__doc__ = "PIM command opcodes, generated from :data:`COMMANDS` (without :data:`LOWPREC_ONLY`)."

COLUMN_OPS = ops_where(lambda c: c.timing in ("col_rd", "col_wr", "gb"))
"""Column-type commands: every one is spaced ``tCCD`` from the previous one."""
READ_OPS = ops_where(lambda c: c.returns_data)
"""Commands whose data returns on the bus ``tRL`` cycles later (RD, RDMAC, RDAF)."""


@dataclass(frozen=True)
class Violation:
    name: str
    code: int
    meaning: str


VIOLATIONS = (
    Violation("NONE", 0, "No violation."),
    Violation("ILLEGAL_OPCODE", 1, "Opcode not in the command table."),
    Violation("BANK_CLOSED", 2, "Column command or AF to a bank with no open row."),
    Violation("BANK_OPEN", 3, "ACT to a bank that already has an open row (in the addressed row buffer), "
                              "a row opened in both row buffers of a bank, or REF with a row open."),
    Violation("T_RCD", 4, "Column command too soon after ACT (tRCDRD / tRCDWR)."),
    Violation("T_RAS", 5, "PRE too soon after ACT (tRAS)."),
    Violation("T_RP", 6, "ACT or REF too soon after PRE (tRP)."),
    Violation("T_CCD", 7, "Column command too soon after the previous one (tCCD)."),
    Violation("T_RRD", 8, "ACT too soon after the previous ACT (tRRD)."),
    Violation("T_FAW", 9, "Fifth ACT inside a tFAW window."),
    Violation("T_WR", 10, "PRE too soon after WR (tWR)."),
    Violation("T_RTP", 11, "PRE too soon after a read-type column command (tRTP)."),
    Violation("T_RFC", 12, "ACT or REF too soon after REF (tRFC)."),
    Violation("REFRESH_LATE", 13, "More than refresh_postpone refreshes owed (tREFI deadline missed)."),
    Violation("BAD_ADDRESS", 14, "Global-buffer or accumulator-group column out of range, or AF with a "
                                 "non-reserved row open."),
    Violation("PU_BUSY", 15, "WRBIAS, RDMAC or AF within tMAC of a MAC (into the same accumulator slot), "
                             "or RDAF within tAF of AF; pipelined units (acc_stages > 1) also a MAC within "
                             "tMAC of a combining MAC, and RDMAC / AF of uncombined partial sums."),
)

ViolationCode = _enum("ViolationCode", [(v.name, v.code) for v in VIOLATIONS], 4)
ViolationCode.__doc__ = "Sticky violation codes of a PIM channel, generated from :data:`VIOLATIONS`."


def command_table_md() -> str:
    """The command table as Markdown (for the docs)."""
    lines = ["| command | opcode | timing class | fields | all banks | returns data | buffer (2 row buffers) "
             "| meaning |",
             "|---|---|---|---|---|---|---|---|"]
    for c in COMMANDS:
        lines.append(f"| {c.name} | {c.opcode} | {c.timing} | {', '.join(c.fields) or '-'} | "
                     f"{'yes' if c.all_banks else ''} | {'yes' if c.returns_data else ''} | {c.buffer or '-'} "
                     f"| {c.meaning} |")
    lines += ["", "| violation | code | meaning |", "|---|---|---|"]
    lines += [f"| {v.name} | {v.code} | {v.meaning} |" for v in VIOLATIONS]
    return "\n".join(lines)
