"""Macro PIM commands and the prototype's register map: one table read by the PCU RTL (:mod:`hw.pcu`), the
prototype top (:mod:`hw.proto`), the driver, the functional device model and the docs.

A macro command is four 32-bit words (128 bits). The host writes them to the
``MACRO0..3`` registers and then writes ``DOORBELL``; the command queue holds
up to ``QUEUE_DEPTH`` commands. Field layout (bit offsets in the 128-bit word):

=========  ======  =====================================================
field      bits    meaning
=========  ======  =====================================================
opcode     0..7    :class:`MacroOp`
flags      8..15   :class:`MacroFlag` bits
n          16..31  WRITE_VEC / READ_RES: values; GEMV: K (inputs)
m          32..47  GEMV: N (outputs)
row        48..63  GEMV: first DRAM row of the weight region (GemvLayout.base_row)
addr0      64..95  WRITE_VEC: source; READ_RES: destination; GEMV: bias address
addr1      96..127 GEMV: packing (below: ``pack`` bits 96..103, ``slot0`` bits 104..111, bits 112..127
                   must be 0); 4-bit device: groups per input chunk (bits 96..103), bits 104..127 0;
                   every other op: reserved, must be 0
=========  ======  =====================================================

:data:`FIELDS` lists the fields in this order (the PCU's macro layout is built from it); :func:`encode`
and :func:`decode` read it.

Semantics (the functional model in ``sim/pim_model.py`` is the reference):

``WRITE_VEC(addr0, n)``
    Read ``n`` BF16 values from device memory at ``addr0`` (column-aligned)
    into the PCU's input buffer (``n <= input_values``).
``GEMV(row, K, N, addr0, flags)``
    ``y = x[:K] @ W (+ bias) (GELU)`` over the weights laid out by
    :class:`firmware.pim.GemvLayout` at ``row`` on every channel; ``x`` is the
    input buffer, the bias (FP32, ``N`` values) is read from ``addr0`` when
    ``BIAS`` is set; GELU is applied by the banks' AF units when ``GELU`` is
    set (the LUT is in the reserved row). ``y`` (FP32) goes to the result
    buffer (``N <= result_values``).
``READ_RES(addr0, n, flags)``
    Write the first ``n`` results to device memory at ``addr0``, as FP32, or
    rounded to BF16 when ``BF16`` is set.

On a device with 4-bit weights (``PimGeometry.weight_format`` ``int4`` /
``fp4``, issue 19; the PCU's :mod:`hw.pcu_w4`):

``WRITE_VEC(addr0, n)``
    With FP8 activations (``act_format`` ``fp8_e4m3``) the input is ``n``
    E4M3 codes, one byte each (the host quantizes the vector; its per-token
    scale stays with the host); with BF16 activations as above.
``GEMV(row, K, N, addr0, flags)``
    ``y = acc`` per output: the processing unit's FP32 accumulator
    (:func:`sim.golden.lowprec_unit.unit_acc`) over the 4-bit weights laid
    out by ``firmware.pim_lowprec.W4GemvLayout(cfg, K, N, base_row=row,
    chunk_size=cg * quant_group)`` (codes, group scales, grid selectors;
    ``cg`` = ``addr1[7:0]`` groups per input chunk, 0: what the global
    buffer holds, ``max_chunk / quant_group``; firmware passes
    ``layout.chunk // quant_group`` of the layout it chose), starting from
    the bias (FP32 from ``addr0``, ``BIAS``) or zero, chunk by chunk. FP8 activations: the
    per-token scale is not applied (the host multiplies the results by it;
    a bias is then in units of the unscaled accumulator). Checks, in order:
    ``addr1[31:16]`` (RESERVED_NONZERO); any flag but ``BIAS`` (BAD_FLAGS:
    GELU after a 4-bit GEMV is not supported); ``K`` or ``N`` out of range
    or ``K`` not a multiple of ``quant_group`` (BAD_LENGTH); NO_INPUT;
    ``addr1[7:0]`` above ``max_chunk / quant_group`` or ``addr1[15:8]`` != 0
    (BAD_PACKING);
    a full chunk's unit wider than a row, or grid selectors in more than
    one column (UNSUPPORTED; not on the presets);
    the rows (BAD_REGION); the bias address (BAD_ADDRESS).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np

__all__ = ["MacroOp", "MacroFlag", "MacroError", "MACRO_TABLE", "Macro", "FIELDS", "MACRO_BITS", "encode", "decode",
           "CSR", "CSR_TABLE", "register_table", "CH_COUNTERS", "QUEUE_DEPTH", "DEVICE_ID", "MACRO_LIMITS", "pcu_limits",
           "GEOMETRY_FIELDS", "geometry_fields", "geometry_word", "words_to_f32_bits", "pack_addr1", "unpack_addr1",
           "ADDR1_PACK_BITS", "ADDR1_SLOT_BITS"]

QUEUE_DEPTH = 8
DEVICE_ID = 0x1A_A05_001      # "IANUS", version 1


class MacroOp(enum.IntEnum):
    NOP = 0
    WRITE_VEC = 1
    GEMV = 2
    READ_RES = 3


class MacroFlag(enum.IntFlag):
    BIAS = 1
    GELU = 2
    BF16 = 4


class MacroError(enum.IntEnum):
    """Error codes in the ``ERROR`` register; the first error sticks until CTRL.CLEAR."""
    NONE = 0
    BAD_OPCODE = 1
    BAD_FLAGS = 2
    BAD_LENGTH = 3          # n or N is 0 or exceeds the PCU buffer
    BAD_ADDRESS = 4         # misaligned or outside device memory
    BAD_REGION = 5          # weight rows outside the data rows
    NO_INPUT = 6            # GEMV with K larger than the vector written by WRITE_VEC
    NO_RESULT = 7           # READ_RES of more results than the last GEMV produced
    QUEUE_OVERFLOW = 8      # doorbell with a full queue (the command is dropped)
    DEVICE_VIOLATION = 9    # a PIM channel flagged a protocol violation (a controller bug)
    RESERVED_NONZERO = 10   # a reserved field is not zero (addr1 outside GEMV, addr1[31:16] of a GEMV)
    BAD_PACKING = 11        # GEMV packed mode (addr1): pitch past the global buffer, tiles wider than the
                            # pitch, first slot past the row, or a first slot without packing; a 4-bit
                            # GEMV whose chunk (addr1[7:0]) exceeds the global buffer, or addr1[15:8] != 0
    UNSUPPORTED = 12        # a legal request the device does not implement: on a 4-bit device a GEMV whose
                            # unit does not fit a row or has grid selectors in more than one column (below)


MACRO_TABLE = (
    (MacroOp.NOP, "no operation", ()),
    (MacroOp.WRITE_VEC, "device memory -> PCU input buffer (BF16)", ("n", "addr0")),
    (MacroOp.GEMV, "y = x @ W (+bias) (GELU) over all channels", ("n=K", "m=N", "row", "addr0=bias", "flags",
                                                                   "addr1=packing")),
    (MacroOp.READ_RES, "PCU result buffer -> device memory (FP32 or BF16)", ("n", "addr0", "flags")),
)


@dataclass(frozen=True)
class Macro:
    op: int
    flags: int = 0
    n: int = 0
    m: int = 0
    row: int = 0
    addr0: int = 0
    addr1: int = 0


# (field, bit offset, width), contiguous from bit 0.
FIELDS = (("op", 0, 8), ("flags", 8, 8), ("n", 16, 16), ("m", 32, 16), ("row", 48, 16), ("addr0", 64, 32),
          ("addr1", 96, 32))
MACRO_BITS = 128
assert all(lo == sum(w for _, _, w in FIELDS[:i]) for i, (_, lo, _) in enumerate(FIELDS))
assert sum(w for _, _, w in FIELDS) == MACRO_BITS


ADDR1_PACK_BITS = 8       # addr1[7:0]: pack = log2(pitch) + 1, 0 = unpacked
ADDR1_SLOT_BITS = 8       # addr1[15:8]: slot0, the first tile's slot in the first row


def pack_addr1(pitch: int = 0, slot0: int = 0) -> int:
    """A GEMV's ``addr1``: tile pitch ``pitch`` columns (a power of two; 0 = the unpacked layout) and first tile
    slot ``slot0``. Raises ValueError for a pitch that is not a power of two or fields that do not fit (the
    device checks the rest: ``BAD_PACKING``)."""
    if pitch == 0:
        pack = 0
    elif isinstance(pitch, int) and pitch > 0 and pitch & (pitch - 1) == 0:
        pack = pitch.bit_length()
    else:
        raise ValueError(f"GEMV tile pitch must be 0 (unpacked) or a power of two, not {pitch!r}")
    if not isinstance(slot0, int) or not 0 <= slot0 < 1 << ADDR1_SLOT_BITS:
        raise ValueError(f"GEMV first slot must be an integer in 0..{(1 << ADDR1_SLOT_BITS) - 1}, not {slot0!r}")
    return pack | slot0 << ADDR1_PACK_BITS


def unpack_addr1(addr1: int) -> tuple[int, int, int]:
    """``(pack, slot0, rest)`` of a GEMV's ``addr1``: ``pitch = 2 ** (pack - 1)`` when ``pack``, ``rest`` (bits
    16..31) must be 0."""
    return (addr1 & 0xFF, (addr1 >> ADDR1_PACK_BITS) & 0xFF, addr1 >> (ADDR1_PACK_BITS + ADDR1_SLOT_BITS))


def encode(macro: Macro) -> list[int]:
    """The four 32-bit words of a macro command. Raises ValueError for a field that does not fit."""
    value = 0
    for name, lo, width in FIELDS:
        v = int(getattr(macro, name))
        if not 0 <= v < (1 << width):
            raise ValueError(f"macro field {name} must fit in {width} bits, not {v!r}")
        value |= v << lo
    return [(value >> (32 * i)) & 0xFFFFFFFF for i in range(4)]


def decode(words) -> Macro:
    """Inverse of :func:`encode` (no validation: that is the device's job)."""
    words = list(words)
    if len(words) != 4:
        raise ValueError(f"a macro command is 4 words, not {len(words)}")
    value = sum((int(w) & 0xFFFFFFFF) << (32 * i) for i, w in enumerate(words))
    return Macro(**{name: (value >> lo) & ((1 << width) - 1) for name, lo, width in FIELDS})


class CSR(enum.IntEnum):
    """AXI4-Lite register offsets (bytes)."""
    ID = 0x00
    CTRL = 0x04           # write: bit0 CLEAR (error), bit1 RESET_COUNTERS
    STATUS = 0x08         # bit0 BUSY, bit1 ERROR, bit2 QUEUE_FULL, bit3 QUEUE_EMPTY
    ERROR = 0x0C          # MacroError of the first error
    MACRO0 = 0x10
    MACRO1 = 0x14
    MACRO2 = 0x18
    MACRO3 = 0x1C
    DOORBELL = 0x20       # write: push MACRO0..3 as one command
    QUEUE_LEVEL = 0x24
    COMPLETED = 0x28      # commands completed since reset
    CYCLES = 0x2C         # cycles since reset (low 32 bits)
    GEOMETRY = 0x30       # the device's PIM geometry (geometry_word): checked by the driver at open
    CH_BASE = 0x100       # per channel c: CH_BASE + 0x20*c + counter offset


CH_COUNTERS = {"busy_cycles": 0x00, "commands": 0x04, "refreshes": 0x08, "wait_cycles": 0x0C, "macs": 0x10}

CSR_TABLE = [
    (CSR.ID, "r", "device id 0x1AA05001"),
    (CSR.CTRL, "w", "bit0 CLEAR error, bit1 RESET_COUNTERS"),
    (CSR.STATUS, "r", "bit0 BUSY, bit1 ERROR, bit2 QUEUE_FULL, bit3 QUEUE_EMPTY"),
    (CSR.ERROR, "r", "first MacroError since CLEAR"),
    (CSR.MACRO0, "rw", "macro command word 0"), (CSR.MACRO1, "rw", "word 1"), (CSR.MACRO2, "rw", "word 2"),
    (CSR.MACRO3, "rw", "word 3"),
    (CSR.DOORBELL, "w", "push MACRO0..3 to the queue"),
    (CSR.QUEUE_LEVEL, "r", "commands queued"),
    (CSR.COMPLETED, "r", "commands completed"),
    (CSR.CYCLES, "r", "cycle counter"),
    (CSR.GEOMETRY, "r", "log2 channels [3:0], banks [7:4], rows [12:8], columns [16:13], lanes [20:17]; "
                        "af_rows [24:21]; log2 global-buffer columns [28:25]"),
    (CSR.CH_BASE, "r", "per-channel counters: busy_cycles, commands, refreshes, wait_cycles, macs"),
]


def register_table(channels: int) -> tuple:
    """Every register of a prototype with ``channels`` channels, by offset: ``(name, offset, access)``;
    the ``CH_BASE`` row of :data:`CSR_TABLE` expands to each channel's :data:`CH_COUNTERS`."""
    if not isinstance(channels, int) or channels < 1 or CSR.CH_BASE + 0x20 * channels > 0x1000:
        raise ValueError(f"channels must be an integer in [1, {(0x1000 - CSR.CH_BASE) // 0x20}], not {channels!r}")
    regs = [(CSR(offset).name, int(offset), access) for offset, access, _ in CSR_TABLE if offset != CSR.CH_BASE]
    regs += [(f"CH{c}_{name.upper()}", CSR.CH_BASE + 0x20 * c + off, "r")
             for c in range(channels) for name, off in CH_COUNTERS.items()]
    return tuple(sorted(regs, key=lambda r: r[1]))


# GEOMETRY register: (field, bit offset, width); log2 of the power-of-two sizes, af_rows as is.
GEOMETRY_FIELDS = (("channels_log2", 0, 4), ("banks_log2", 4, 4), ("rows_log2", 8, 5), ("columns_log2", 13, 4),
                   ("lanes_log2", 17, 4), ("af_rows", 21, 4), ("gb_columns_log2", 25, 4))


def geometry_fields(p) -> dict:
    """The GEOMETRY register's fields for a :class:`hw.config.PimGeometry`."""
    return {"channels_log2": p.channels.bit_length() - 1, "banks_log2": p.banks.bit_length() - 1,
            "rows_log2": p.rows.bit_length() - 1, "columns_log2": p.columns.bit_length() - 1,
            "lanes_log2": p.lanes.bit_length() - 1, "af_rows": p.af_rows,
            "gb_columns_log2": p.gb_columns.bit_length() - 1}


def geometry_word(p) -> int:
    """The read-only GEOMETRY register of a device with geometry ``p``: lets the host driver check at open that
    the configuration it was given is the device's (channels, banks, rows, columns, lanes, AF rows, global
    buffer)."""
    word = 0
    for name, lo, width in GEOMETRY_FIELDS:
        v = geometry_fields(p)[name]
        if not 0 <= v < 1 << width:
            raise ValueError(f"GEOMETRY field {name} must fit in {width} bits, not {v}")
        word |= v << lo
    return word


# The PCU's buffers (values): the input buffer holds at least this many (more when the global buffer is larger).
MACRO_LIMITS = {"input_values": 4096, "result_values": 4096}


def pcu_limits(cfg) -> dict:
    """Buffer sizes of the PCU for a configuration: the longest input vector and result vector."""
    p = cfg.pim
    return {"input_values": max(MACRO_LIMITS["input_values"], p.gb_values),
            "result_values": MACRO_LIMITS["result_values"]}


def words_to_f32_bits(words: np.ndarray) -> np.ndarray:
    return np.asarray(words, dtype=np.uint32)
