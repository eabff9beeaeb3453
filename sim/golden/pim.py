"""Golden model of a PIM channel: command semantics and bit-exact numerics, in numpy.

Independent of the RTL: storage is a numpy array ``[banks, rows, columns,
lanes]`` of BF16 bit patterns, the global buffer ``[gb_columns, lanes]``, and
per bank an FP32 accumulator and an activation-function result. Timing is not
modelled here (that is :mod:`sim.pim_checker`'s job); commands are assumed
legal.

Semantics (the command table in ``hw/pim/commands.py``):

* MAC on bank ``b``, column ``c``: ``acc[b] = acc[b] + tree(W[b, open_row, c] * GB[c mod gb_columns])``
  with the lane products summed by the pairwise adder tree, then one FP32
  addition into the accumulator (:func:`sim.golden.fp.mac_lanes`).
* WRBIAS / RDMAC / RDAF on group ``g``: banks ``g*bpw .. g*bpw+bpw-1``, one
  FP32 word each (``bpw = column_bits / 32``).
* AF: ``af[b] = round_fp32(bf16(acc[b]) * slope_i + intercept_i)`` with the
  segment ``i`` from the LUT in bank ``b``'s open (reserved) row.
* With two row buffers (``row_buffers = 2``) PACTAB / PPREAB open and close
  the PIM row buffer, and MAC and AF read its row instead of the bank's.
* With a pipelined processing unit (``acc_stages = P > 1``) each bank's accumulator is a
  :class:`hw.spec.fp.InterleavedAccumulator` of ``P`` partial sums: WRBIAS loads it, a MAC adds its column
  into the next partial and, when its ``row`` has the combine flag (:data:`hw.config.COMBINE_ROW_BIT`),
  combines them; RDMAC and AF read ``p0``.
"""

from __future__ import annotations

import numpy as np

from hw.config import COMBINE_ROW_BIT, SystemConfig
from hw.spec import fp as G


class PimChannelModel:
    def __init__(self, cfg: SystemConfig):
        p = cfg.pim
        self.cfg = cfg
        self.mem = np.zeros((p.banks, p.rows, p.columns, p.lanes), dtype=np.uint16)
        self.gb = np.zeros((p.gb_columns, p.lanes), dtype=np.uint16)
        self.acc = np.zeros(p.banks, dtype=np.uint32)
        self.af = np.zeros(p.banks, dtype=np.uint32)
        # Pipelined unit: the interleaved partial sums of every bank (``acc`` mirrors their p0).
        self.units = [G.InterleavedAccumulator(p.acc_stages, np.uint32(0)) for _ in range(p.banks)] \
            if p.acc_stages > 1 else None
        self.open_row = [None] * p.banks
        self.pim_row = None                     # the PIM row buffer's row (two row buffers)

    # -- words <-> lanes ------------------------------------------------------
    @staticmethod
    def word_to_lanes(word: int, lanes: int) -> np.ndarray:
        return np.frombuffer(int(word).to_bytes(lanes * 2, "little"), dtype="<u2").copy()

    @staticmethod
    def lanes_to_word(values: np.ndarray) -> int:
        return int.from_bytes(np.asarray(values, dtype="<u2").tobytes(), "little")

    def _group_word(self, values: np.ndarray, group: int) -> int:
        bpw = self.cfg.pim.banks_per_word
        words = np.zeros(bpw, dtype="<u4")
        part = values[group * bpw:(group + 1) * bpw]
        words[:part.size] = part
        return int.from_bytes(words.tobytes(), "little")

    # -- commands -----------------------------------------------------------
    def execute(self, op: str, bank=0, row=0, col=0, data=0, mask=None):
        """Execute one command; returns the read data word for RD/RDMAC/RDAF, else ``None``."""
        p = self.cfg.pim
        lanes = p.lanes
        if op == "ACT":
            self.open_row[bank] = row
        elif op == "ACTAB":
            self.open_row = [row] * p.banks
        elif op == "PRE":
            self.open_row[bank] = None
        elif op == "PREAB":
            self.open_row = [None] * p.banks
        elif op == "PACTAB":
            self.pim_row = row
        elif op == "PPREAB":
            self.pim_row = None
        elif op == "RD":
            return self.lanes_to_word(self.mem[bank, self.open_row[bank], col])
        elif op == "WR":
            new = self.word_to_lanes(data, lanes)
            if mask is not None and mask != (1 << p.column_bytes) - 1:
                old = bytearray(self.mem[bank, self.open_row[bank], col].astype("<u2").tobytes())
                nb = int(data).to_bytes(p.column_bytes, "little")
                for i in range(p.column_bytes):
                    if (mask >> i) & 1:
                        old[i] = nb[i]
                new = np.frombuffer(bytes(old), dtype="<u2")
            self.mem[bank, self.open_row[bank], col] = new
        elif op == "WRGB":
            self.gb[col] = self.word_to_lanes(data, lanes)
        elif op in ("MACSB", "MACAB"):
            targets = range(p.banks) if op == "MACAB" else [bank]
            x = self.gb[col % p.gb_columns]
            for b in targets:
                term = G.mac_lanes(self.mem[b, self._mac_row(b), col], x)
                if self.units is None:
                    self.acc[b] = G.add_f32(self.acc[b], term)
                    continue
                self.units[b].add(term)
                if (row >> COMBINE_ROW_BIT) & 1:
                    self.units[b].combine()
                self.acc[b] = self.units[b].value
        elif op == "WRBIAS":
            bpw = p.banks_per_word
            words = np.frombuffer(int(data).to_bytes(p.column_bytes, "little"), dtype="<u4")
            for k in range(bpw):
                b = col * bpw + k
                if b < p.banks:
                    self.acc[b] = words[k]
                    if self.units is not None:
                        self.units[b].load(words[k])
        elif op == "RDMAC":
            return self._group_word(self.acc, col)
        elif op == "RDAF":
            return self._group_word(self.af, col)
        elif op == "AF":
            for b in range(p.banks):
                self.af[b] = af_eval(self.cfg, self.acc[b:b + 1], self.mem[b, self._mac_row(b)])[0]
        elif op in ("NOP", "REF"):
            pass
        else:
            raise ValueError(f"unknown PIM command {op!r}")
        return None

    def _mac_row(self, bank: int):
        """The row MAC and AF read: the PIM row buffer's with two row buffers, else the bank's open row."""
        return self.pim_row if self.cfg.pim.row_buffers == 2 else self.open_row[bank]

    # -- back door ----------------------------------------------------------
    def load_rows(self, bank: int, row: int, words: np.ndarray):
        """Write ``words`` ([n_rows, columns, lanes] BF16) starting at ``row`` of ``bank``."""
        self.mem[bank, row:row + words.shape[0]] = words


def af_segment(cfg: SystemConfig, x_bits: np.ndarray) -> np.ndarray:
    """Segment index of FP32 inputs: clamp(floor(x * 2**k) + segments/2, 0, segments-1); zero -> middle."""
    p = cfg.pim
    x = G.ftz(G.bits_to_f32(x_bits)).astype(np.float64)
    with np.errstate(invalid="ignore"):
        idx = np.floor(x * 2.0**p.af_scale_log2) + p.af_segments // 2
    # NaN: the RTL's exponent is 255, which counts as "large"; the sign bit picks the end.
    nan = np.isnan(x)
    sign = (np.asarray(x_bits, dtype=np.uint32) >> 31).astype(bool)
    idx = np.where(nan, np.where(sign, 0, p.af_segments - 1), idx)
    return np.clip(idx, 0, p.af_segments - 1).astype(np.int64)


def af_eval(cfg: SystemConfig, x_bits: np.ndarray, lut_row: np.ndarray) -> np.ndarray:
    """AF unit: ``bf16(x) * slope + intercept`` with the LUT in ``lut_row`` ([columns, lanes] BF16)."""
    words = np.frombuffer(np.ascontiguousarray(lut_row, dtype="<u2").tobytes(), dtype="<u4")
    slopes, icpts = words[0::2], words[1::2]
    idx = af_segment(cfg, x_bits)
    xb = G.round_bf16(np.asarray(x_bits, dtype=np.uint32))
    slope_bf16 = (slopes[idx] >> 16).astype(np.uint16)
    return G.add_f32(G.mul_bf16(xb, slope_bf16), icpts[idx])
