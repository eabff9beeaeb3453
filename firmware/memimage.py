"""Device memory as a host-side byte image: what the runtime fills with weights, tables and programs.

:class:`MemoryImage` holds the whole device memory in RAM, addressed like the SoC's AXI4 window (the
address map of :class:`hw.spec.addrmap.AddressMap`). The runtime (:mod:`firmware.runtime`)
builds a job's initial memory in one; the functional models (:mod:`sim.pim_model`,
:mod:`sim.soc_model`) use it as their device memory, and the RTL testbenches load it through the
device's back door.
"""

from __future__ import annotations

import numpy as np

from hw.spec.addrmap import AddressMap
from hw.spec.config import SystemConfig

__all__ = ["MemoryImage"]


class MemoryImage:
    """Device memory as bytes, addressed like the AXI window (:class:`hw.spec.addrmap.AddressMap`)."""

    def __init__(self, cfg: SystemConfig):
        self.cfg = cfg
        self.size = cfg.pim.total_bytes
        if self.size > 1 << 30:
            raise ValueError(f"the functional model holds device memory in RAM; {self.size} bytes is too much "
                             f"for configuration {cfg.name!r}")
        self.data = np.zeros(self.size, dtype=np.uint8)
        self.amap = AddressMap(cfg.pim)

    def check(self, addr: int, n: int, align: int = 1):
        if addr < 0 or n < 0 or addr + n > self.size:
            raise IndexError(f"access [{addr:#x}, {addr + n:#x}) outside device memory [0, {self.size:#x})")
        if addr % align:
            raise IndexError(f"address {addr:#x} not aligned to {align} bytes")

    def write(self, addr: int, data: bytes):
        self.check(addr, len(data))
        self.data[addr:addr + len(data)] = np.frombuffer(bytes(data), dtype=np.uint8)

    def read(self, addr: int, n: int) -> bytes:
        self.check(addr, n)
        return self.data[addr:addr + n].tobytes()

    def _span(self, first_row: int, n_rows: int):
        p = self.cfg.pim
        start = self.amap.encode(first_row, 0, 0, 0)
        return self.data[start:start + n_rows * p.channels * p.banks * p.row_bytes].view("<u2")

    def rows(self, first_row: int, n_rows: int) -> np.ndarray:
        """Rows as ``[n_rows, channels, banks, columns, lanes]`` BF16 (a view under the
        Row-Channel-Bank-Column map, a copy under a channel-interleaved one: write with :meth:`set_rows`)."""
        return self.amap.unpack_rows(self._span(first_row, n_rows), n_rows)

    def set_rows(self, first_row: int, rows: np.ndarray):
        """Write ``[n_rows, channels, banks, columns, lanes]`` BF16 rows from row index ``first_row``."""
        rows = np.asarray(rows, dtype=np.uint16)
        self._span(first_row, rows.shape[0])[...] = self.amap.pack_rows(rows)
