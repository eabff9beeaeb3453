"""The normal-request interface of unified memory.

Every client of device memory (the host's AXI window, the NPU's DMA engine)
talks to the memory controllers through this interface: 32-byte (one column)
reads and writes, tagged, with a response for every request (read data or
write acknowledgement) carrying the request's tag and an error flag.

Addresses are byte addresses in the Row-Channel-Bank-Column mapping
(:class:`AddressMap`); the low ``column_offset_bits`` must be zero. A request
to an address outside the device, or misaligned, gets a response with
``error = 1`` and no memory is touched.

The signature is written from the requester's side::

    req  : Out(stream.Signature(MemRequest))   addr, write, data, mask, tag
    resp : In(stream.Signature(MemResponse))   data, tag, write, error
"""

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
    """Row-Channel-Bank-Column address mapping (MSB to LSB), in Python and in RTL.

    ``addr = ((((row * channels) + channel) * banks + bank) * columns + column) * column_bytes``
    """

    def __init__(self, pim: PimGeometry):
        self.pim = pim
        self.col_lo = pim.column_offset_bits
        self.bank_lo = self.col_lo + pim.column_addr_bits
        self.chan_lo = self.bank_lo + pim.bank_addr_bits
        self.row_lo = self.chan_lo + pim.channel_addr_bits
        self.bits = self.row_lo + pim.row_addr_bits

    def encode(self, row: int, channel: int, bank: int, column: int) -> int:
        p = self.pim
        for name, value, limit in (("row", row, p.rows), ("channel", channel, p.channels),
                                   ("bank", bank, p.banks), ("column", column, p.columns)):
            if not 0 <= value < limit:
                raise ValueError(f"{name} must be in [0, {limit}), not {value!r}")
        return (row << self.row_lo) | (channel << self.chan_lo) | (bank << self.bank_lo) | (column << self.col_lo)

    def decode(self, addr: int) -> tuple[int, int, int, int]:
        """(row, channel, bank, column) of a byte address; raises ValueError when out of range or misaligned."""
        p = self.pim
        if not 0 <= addr < p.total_bytes:
            raise ValueError(f"address {addr:#x} is outside device memory [0, {p.total_bytes:#x})")
        if addr & (p.column_bytes - 1):
            raise ValueError(f"address {addr:#x} is not aligned to a {p.column_bytes}-byte column")
        return ((addr >> self.row_lo) & (p.rows - 1), (addr >> self.chan_lo) & (p.channels - 1),
                (addr >> self.bank_lo) & (p.banks - 1), (addr >> self.col_lo) & (p.columns - 1))

    # RTL slices of an address Value
    def rtl_fields(self, addr):
        p = self.pim
        return dict(
            row=addr[self.row_lo:self.row_lo + p.row_addr_bits] if p.row_addr_bits else Const(0, 1),
            channel=addr[self.chan_lo:self.chan_lo + p.channel_addr_bits] if p.channel_addr_bits else Const(0, 1),
            bank=addr[self.bank_lo:self.bank_lo + p.bank_addr_bits] if p.bank_addr_bits else Const(0, 1),
            column=addr[self.col_lo:self.col_lo + p.column_addr_bits] if p.column_addr_bits else Const(0, 1),
            misaligned=(addr[0:self.col_lo] != 0) if self.col_lo else Const(0, 1),
        )

    def rtl_encode(self, row, channel, bank, column):
        p = self.pim
        parts = [Const(0, self.col_lo)]
        for value, bits in ((column, p.column_addr_bits), (bank, p.bank_addr_bits),
                            (channel, p.channel_addr_bits), (row, p.row_addr_bits)):
            if bits:
                parts.append(value[:bits])
        return Cat(*parts)
