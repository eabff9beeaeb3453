"""The device address map in Python (:class:`AddressMap`): byte address <-> (row, channel, bank, column), whole
DRAM rows packed and unpacked. The RTL's half (address fields as Amaranth values) is
:class:`hw.memif.AddressMap`, a subclass; the firmware and the models use this one (issue 16: the spec layer)."""

from __future__ import annotations

import numpy as np

from .config import PimGeometry

__all__ = ["AddressMap"]


class AddressMap:
    """The device address map (fields MSB to LSB).

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
    rows), the RTL through :class:`hw.memif.AddressMap`'s ``rtl_fields`` / ``rtl_encode``.
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
