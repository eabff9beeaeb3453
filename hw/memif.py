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

from amaranth.hdl import Cat, Const
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from .config import SystemConfig
from .spec.addrmap import AddressMap as _AddressMap

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


class AddressMap(_AddressMap):
    """:class:`hw.spec.addrmap.AddressMap` with the RTL's half: the address fields of a request as Amaranth
    values (:meth:`rtl_fields`) and an address from fields (:meth:`rtl_encode`)."""

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
