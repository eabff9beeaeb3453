"""The normal-request interface of unified memory.

Every client of device memory (the host's AXI window, the NPU's DMA engine)
talks to the memory controllers through this interface: 32-byte (one column)
reads and writes, tagged, with a response for every request (read data or
write acknowledgement) carrying the request's tag and an error flag.

Addresses are byte addresses in the device's address map (:class:`AddressMap`:
Row-Channel-Bank-Column, or channel-interleaved by ``PimGeometry.channel_interleave``); the low ``column_offset_bits`` must be zero. A request
to an address outside the device, or misaligned, gets a response with
``error = 1`` and no memory is touched.

The signature is written from the requester's side::

    req  : Out(stream.Signature(MemRequest))   addr, write, data, mask, tag
    resp : In(stream.Signature(MemResponse))   data, tag, write, error
"""

import numpy as np
from amaranth.hdl import Cat, Const
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from .config import PimGeometry, SystemConfig

__all__ = ["TAG_BITS", "request_layout", "response_layout", "MemPortSignature", "AddressMap"]

TAG_BITS = 8


def request_layout(cfg: SystemConfig) -> data.StructLayout:
    p = cfg.pim
    return data.StructLayout({
        "addr": p.addr_bits,
        "write": 1,
        "data": p.column_bits,
        "mask": p.column_bytes,      # byte enables for writes (all ones for a full column)
        "tag": TAG_BITS,
    })


def response_layout(cfg: SystemConfig) -> data.StructLayout:
    return data.StructLayout({
        "data": cfg.pim.column_bits,
        "tag": TAG_BITS,
        "write": 1,
        "error": 1,
    })


class MemPortSignature(wiring.Signature):
    """A requester's port onto unified memory (flip it for the memory side)."""

    def __init__(self, cfg: SystemConfig):
        if not isinstance(cfg, SystemConfig):
            raise TypeError(f"Configuration must be a SystemConfig, not {cfg!r}")
        self._cfg = cfg
        super().__init__({
            "req": Out(stream.Signature(request_layout(cfg))),
            "resp": In(stream.Signature(response_layout(cfg))),
        })

    @property
    def cfg(self) -> SystemConfig:
        return self._cfg

    def __eq__(self, other):
        return isinstance(other, MemPortSignature) and other.cfg == self.cfg

    def __hash__(self):
        return hash(self._cfg)

    def __repr__(self):
        return f"MemPortSignature({self._cfg.name})"


class AddressMap:
    """The device address map, in Python and in RTL (fields MSB to LSB).

    ``PimGeometry.channel_interleave`` = 0: Row-Channel-Bank-Column (the paper's map)::

        addr = ((((row * channels) + channel) * banks + bank) * columns + column) * column_bytes

    A run of consecutive addresses stays in one channel for ``banks`` whole rows.

    ``channel_interleave`` = ``I`` bytes (a power of two, one column to one row): Row-Bank-ColumnHigh-
    Channel-ColumnLow, with ColumnLow the ``I / column_bytes`` columns of one run::

        addr = (((((row * banks + bank) * (columns / n) + column // n) * channels + channel) * n
                + column % n) * column_bytes                       n = I / column_bytes

    Consecutive addresses move to the next channel every ``I`` bytes, to the next bank every
    ``channels`` whole rows; every DRAM row of every bank (what a PIM GEMV reads) still holds
    ``columns`` whole columns. A row index (all channels and banks) is the same contiguous
    ``channels * banks * row_bytes`` bytes in both maps. Everything that computes device addresses
    goes through :meth:`encode` / :meth:`decode` (or :meth:`pack_rows` / :meth:`unpack_rows` for whole
    rows), the RTL through :meth:`rtl_fields` / :meth:`rtl_encode`.
    """

    def __init__(self, pim: PimGeometry):
        self.pim = pim
        self.interleave = pim.channel_interleave
        self.col_lo = pim.column_offset_bits
        if not self.interleave:
            self.col_low_bits = pim.column_addr_bits      # the whole column field is below the channel
            self.bank_lo = self.col_lo + pim.column_addr_bits
            self.chan_lo = self.bank_lo + pim.bank_addr_bits
            self.row_lo = self.chan_lo + pim.channel_addr_bits
            self.colhi_lo = self.bank_lo                  # no high column bits
        else:
            self.col_low_bits = (pim.interleave_columns - 1).bit_length()
            self.chan_lo = self.col_lo + self.col_low_bits
            self.colhi_lo = self.chan_lo + pim.channel_addr_bits
            self.bank_lo = self.colhi_lo + pim.column_addr_bits - self.col_low_bits
            self.row_lo = self.bank_lo + pim.bank_addr_bits
        self.col_high_bits = pim.column_addr_bits - self.col_low_bits
        self.bits = self.row_lo + pim.row_addr_bits
        # Words (columns) of a channel's run of consecutive addresses.
        self.run_words = pim.interleave_columns if self.interleave else pim.columns * pim.banks

    def encode(self, row: int, channel: int, bank: int, column: int) -> int:
        p = self.pim
        for name, value, limit in (("row", row, p.rows), ("channel", channel, p.channels),
                                   ("bank", bank, p.banks), ("column", column, p.columns)):
            if not 0 <= value < limit:
                raise ValueError(f"{name} must be in [0, {limit}), not {value!r}")
        lo, hi = column & ((1 << self.col_low_bits) - 1), column >> self.col_low_bits
        return ((row << self.row_lo) | (channel << self.chan_lo) | (bank << self.bank_lo)
                | (lo << self.col_lo) | (hi << self.colhi_lo))

    def decode(self, addr: int) -> tuple[int, int, int, int]:
        """(row, channel, bank, column) of a byte address; raises ValueError when out of range or misaligned."""
        p = self.pim
        if not 0 <= addr < p.total_bytes:
            raise ValueError(f"address {addr:#x} is outside device memory [0, {p.total_bytes:#x})")
        if addr & (p.column_bytes - 1):
            raise ValueError(f"address {addr:#x} is not aligned to a {p.column_bytes}-byte column")
        column = (((addr >> self.col_lo) & ((1 << self.col_low_bits) - 1))
                  | (((addr >> self.colhi_lo) & ((1 << self.col_high_bits) - 1)) << self.col_low_bits))
        return ((addr >> self.row_lo) & (p.rows - 1), (addr >> self.chan_lo) & (p.channels - 1),
                (addr >> self.bank_lo) & (p.banks - 1), column)

    # Whole rows as arrays ------------------------------------------------------------------
    def _row_shape(self, n_rows: int, tail: int):
        p = self.pim
        if not self.interleave:
            return (n_rows, p.channels, p.banks, p.columns, tail), None
        n = p.interleave_columns
        # address order: row, bank, column // n, channel, column % n
        return (n_rows, p.banks, p.columns // n, p.channels, n, tail), (0, 3, 1, 2, 4, 5)

    def unpack_rows(self, flat, n_rows: int):
        """``flat``: the bytes (or a 1-D array of any element type) of ``n_rows`` whole row indexes in
        address order -> ``[n_rows, channels, banks, columns, per_column]`` (a view when the map allows,
        a copy otherwise)."""
        p = self.pim
        flat = np.asarray(flat)
        tail = flat.size // (n_rows * p.channels * p.banks * p.columns)
        shape, perm = self._row_shape(n_rows, tail)
        if perm is None:
            return flat.reshape(shape)
        v = flat.reshape(shape).transpose(perm)
        return v.reshape(n_rows, p.channels, p.banks, p.columns, tail)

    def pack_rows(self, rows):
        """``[n_rows, channels, banks, columns, per_column]`` -> a contiguous 1-D array in address order
        (the inverse of :meth:`unpack_rows`)."""
        rows = np.asarray(rows)
        n_rows, tail = rows.shape[0], rows.shape[-1]
        shape, perm = self._row_shape(n_rows, tail)
        if perm is None:
            return np.ascontiguousarray(rows).reshape(-1)
        p = self.pim
        n = p.interleave_columns
        v = rows.reshape(n_rows, p.channels, p.banks, p.columns // n, n, tail).transpose(0, 2, 3, 1, 4, 5)
        return np.ascontiguousarray(v).reshape(-1)

    # RTL slices of an address Value
    def rtl_fields(self, addr):
        p = self.pim
        if self.interleave and self.col_high_bits:
            column = Cat(addr[self.col_lo:self.col_lo + self.col_low_bits] if self.col_low_bits else Const(0, 0),
                         addr[self.colhi_lo:self.colhi_lo + self.col_high_bits])
        else:
            column = addr[self.col_lo:self.col_lo + p.column_addr_bits] if p.column_addr_bits else Const(0, 1)
        return dict(
            row=addr[self.row_lo:self.row_lo + p.row_addr_bits] if p.row_addr_bits else Const(0, 1),
            channel=addr[self.chan_lo:self.chan_lo + p.channel_addr_bits] if p.channel_addr_bits else Const(0, 1),
            bank=addr[self.bank_lo:self.bank_lo + p.bank_addr_bits] if p.bank_addr_bits else Const(0, 1),
            column=column,
            misaligned=(addr[0:self.col_lo] != 0) if self.col_lo else Const(0, 1),
        )

    def rtl_encode(self, row, channel, bank, column):
        p = self.pim
        parts = [Const(0, self.col_lo)]
        if self.interleave:
            fields = ((column, 0, self.col_low_bits), (channel, 0, p.channel_addr_bits),
                      (column, self.col_low_bits, self.col_high_bits), (bank, 0, p.bank_addr_bits),
                      (row, 0, p.row_addr_bits))
        else:
            fields = ((column, 0, p.column_addr_bits), (bank, 0, p.bank_addr_bits),
                      (channel, 0, p.channel_addr_bits), (row, 0, p.row_addr_bits))
        for value, lo, bits in fields:
            if bits:
                parts.append(value[lo:lo + bits])
        return Cat(*parts)
