"""Host driver and PIM runtime library for the IANUS prototype (the paper's §7.3 FPGA path).

The driver talks to a device through a *transport* with five async calls::

    write_mem(addr, data)   read_mem(addr, n)      # AXI4 window onto device memory
    write_csr(off, value)   read_csr(off)           # AXI4-Lite registers (firmware.macro.CSR)
    wait(cycles)                                    # let the device run

:class:`FunctionalTransport` wraps the functional model (``sim/pim_model.py``);
an RTL transport drives the same calls through cocotbext-axi masters. The same
driver code runs on both.

Runtime library: device-memory allocation (weight regions from the bottom
rows, data buffers from the top), weight layout for PIM (output rows over banks
and channels; ``heads`` puts whole attention heads on one channel, as the
paper splits W_Q/W_K/W_V head-wise), GELU table upload, GEMV through macro
commands, counters, and typed exceptions for every device error.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from firmware.macro import CSR, DEVICE_ID, Macro, MacroError, MacroFlag, MacroOp, encode, pcu_limits
from firmware.pim import GemvLayout, af_lut_row, gelu
from hw.config import SystemConfig
from hw.memif import AddressMap
from sim.golden import fp as G

__all__ = ["PimError", "DeviceTimeout", "LayoutError", "ERRORS", "FunctionalTransport", "WeightHandle", "Device"]


class PimError(RuntimeError):
    """A device error reported in the ERROR register."""

    code = MacroError.NONE

    def __init__(self, message: str):
        super().__init__(f"{type(self).__name__} ({self.code.name}): {message}")


def _error_class(code: MacroError):
    name = "".join(part.title() for part in code.name.split("_")) + "Error"
    return type(name, (PimError,), {"code": code, "__doc__": f"Device error {code.name}."})


ERRORS = {code: _error_class(code) for code in MacroError if code != MacroError.NONE}
globals().update({cls.__name__: cls for cls in ERRORS.values()})


class DeviceTimeout(TimeoutError):
    """The device did not finish within the allowed cycles."""


class LayoutError(ValueError):
    """A weight layout or allocation request that cannot be satisfied."""


class FunctionalTransport:
    """Transport onto :class:`sim.pim_model.FunctionalDevice` (no simulator)."""

    def __init__(self, device):
        self.device = device
        self.stalled = False        # tests: a device that never finishes

    async def write_mem(self, addr: int, data: bytes):
        self.device.mem.write(addr, data)

    async def read_mem(self, addr: int, n: int) -> bytes:
        return self.device.mem.read(addr, n)

    async def write_csr(self, off: int, value: int):
        self.device.write_csr(off, value)

    async def read_csr(self, off: int) -> int:
        return self.device.read_csr(off)

    async def wait(self, cycles: int):
        if not self.stalled:
            self.device.step()


@dataclass
class WeightHandle:
    """Weights uploaded for PIM GEMV."""

    layout: GemvLayout
    perm: np.ndarray          # packed output j holds original output perm[j] (-1: padding)
    n_out: int                # original N
    bias_addr: int | None = None


class Device:
    """A PIM device behind a transport. Create with :meth:`open`."""

    def __init__(self, transport, cfg: SystemConfig):
        self.t = transport
        self.cfg = cfg
        self.amap = AddressMap(cfg.pim)
        p = cfg.pim
        self.row_span = p.channels * p.banks * p.row_bytes          # bytes of one row index over all banks
        self.next_weight_row = 0
        self.next_data_row = p.data_rows                             # data buffers grow down from here
        self.limits = pcu_limits(cfg)

    @classmethod
    async def open(cls, transport, cfg: SystemConfig) -> "Device":
        dev = cls(transport, cfg)
        ident = await transport.read_csr(CSR.ID)
        if ident != DEVICE_ID:
            raise PimError(f"unexpected device id {ident:#x} (expected {DEVICE_ID:#x})")
        return dev

    # -- memory ----------------------------------------------------------------
    def _rows_for(self, nbytes: int) -> int:
        return max(1, -(-nbytes // self.row_span))

    def alloc(self, nbytes: int) -> int:
        """Allocate a data buffer of ``nbytes`` (whole rows across all banks, from the top)."""
        if not isinstance(nbytes, int) or nbytes <= 0:
            raise LayoutError(f"allocation size must be a positive integer, not {nbytes!r}")
        rows = self._rows_for(nbytes)
        if self.next_data_row - rows < self.next_weight_row:
            raise LayoutError(f"out of device memory: {nbytes} bytes need {rows} rows, "
                              f"{self.next_data_row - self.next_weight_row} free")
        self.next_data_row -= rows
        return self.amap.encode(self.next_data_row, 0, 0, 0)

    async def write(self, addr: int, data: bytes):
        await self.t.write_mem(addr, data)

    async def read(self, addr: int, n: int) -> bytes:
        return await self.t.read_mem(addr, n)

    # -- weights -----------------------------------------------------------------
    def plan(self, n_out: int, layout: str = "columns", head_dim: int = 64, sections: int = 1) -> np.ndarray:
        """Output permutation for a layout.

        ``columns``: output ``n`` goes where :class:`GemvLayout` puts it.
        ``heads``: the outputs are ``sections`` (e.g. 3 for Q, K, V) of whole
        heads of ``head_dim``; head ``h`` of every section goes to channel
        ``h mod channels``, so each channel computes whole heads.
        """
        p = self.cfg.pim
        if layout == "columns":
            return np.arange(n_out)
        if layout != "heads":
            raise LayoutError(f"layout must be 'columns' or 'heads', not {layout!r}")
        if head_dim <= 0 or n_out % (sections * head_dim):
            raise LayoutError(f"{n_out} outputs are not {sections} sections of heads of {head_dim}")
        heads = n_out // (sections * head_dim)
        per_channel = [[] for _ in range(p.channels)]
        for s in range(sections):
            for h in range(heads):
                base = (s * heads + h) * head_dim
                per_channel[h % p.channels].extend(range(base, base + head_dim))
        slots = -(-max(len(c) for c in per_channel) // p.banks)          # tiles needed
        perm = -np.ones(slots * p.banks * p.channels, dtype=np.int64)
        for c, outs in enumerate(per_channel):
            for i, n in enumerate(outs):
                tile, b = divmod(i, p.banks)
                perm[(tile * p.channels + c) * p.banks + b] = n
        return perm

    async def upload_weights(self, w, bias=None, layout: str = "columns", head_dim: int = 64,
                             sections: int = 1) -> WeightHandle:
        """Upload ``w`` ([K, N], used as ``x @ w``; float or BF16 bits) and an optional bias (float32, N)."""
        w_bits = np.asarray(w) if np.asarray(w).dtype == np.uint16 else G.bf16_bits(np.asarray(w, np.float32))
        if w_bits.ndim != 2:
            raise LayoutError(f"weights must be a 2-D [K, N] matrix, not shape {w_bits.shape}")
        K, N = w_bits.shape
        if K > self.limits["input_values"]:
            raise LayoutError(f"K={K} exceeds the PCU input buffer ({self.limits['input_values']} values)")
        perm = self.plan(N, layout, head_dim, sections)
        n_packed = perm.size
        if n_packed > self.limits["result_values"]:
            raise LayoutError(f"N={N} exceeds the PCU result buffer ({self.limits['result_values']} values)")
        wp = np.zeros((K, n_packed), dtype=np.uint16)
        valid = perm >= 0
        wp[:, valid] = w_bits[:, perm[valid]]
        try:
            lay = GemvLayout(self.cfg, K, n_packed, base_row=self.next_weight_row)
        except ValueError as exc:
            raise LayoutError(str(exc)) from None
        if lay.base_row + lay.rows_used > self.next_data_row:
            raise LayoutError(f"out of device memory for a {K}x{N} weight matrix ({lay.rows_used} rows)")
        packed = lay.pack(wp)                                     # [ch, banks, rows, cols, lanes]
        image = np.ascontiguousarray(packed.transpose(2, 0, 1, 3, 4))
        await self.write(self.amap.encode(lay.base_row, 0, 0, 0), image.tobytes())
        self.next_weight_row += lay.rows_used
        handle = WeightHandle(lay, perm, N)
        if bias is not None:
            b = np.asarray(bias, dtype=np.float32)
            if b.shape != (N,):
                raise LayoutError(f"bias must have shape ({N},), not {b.shape}")
            bp = np.zeros(n_packed, dtype=np.float32)
            bp[valid] = b[perm[valid]]
            handle.bias_addr = self.alloc(bp.nbytes)
            await self.write(handle.bias_addr, bp.tobytes())
        return handle

    async def upload_gelu_table(self, fn=gelu):
        """Write the activation lookup table into every bank's reserved row."""
        p = self.cfg.pim
        row = af_lut_row(self.cfg, fn)
        image = np.broadcast_to(row, (p.channels, p.banks, p.columns, p.lanes))
        await self.write(self.amap.encode(p.data_rows, 0, 0, 0), np.ascontiguousarray(image).tobytes())

    # -- macro commands ------------------------------------------------------------
    async def submit(self, macro: Macro):
        for i, word in enumerate(encode(macro)):
            await self.t.write_csr(CSR.MACRO0 + 4 * i, word)
        await self.t.write_csr(CSR.DOORBELL, 1)

    async def wait_idle(self, timeout_cycles: int = 1_000_000, poll_cycles: int = 64):
        """Wait until the queue is empty and the PCU idle; raise the device's error, if any."""
        waited = 0
        while True:
            status = await self.t.read_csr(CSR.STATUS)
            if status & 2:
                code = MacroError(await self.t.read_csr(CSR.ERROR))
                raise ERRORS[code](f"device reported {code.name}; clear it with clear_error()")
            if not status & 1:
                return
            if waited >= timeout_cycles:
                raise DeviceTimeout(f"device still busy after {waited} cycles (STATUS={status:#x})")
            await self.t.wait(poll_cycles)
            waited += poll_cycles

    async def clear_error(self):
        await self.t.write_csr(CSR.CTRL, 1)

    async def gemv(self, handle: WeightHandle, x, gelu_act: bool = False, timeout_cycles: int = 10_000_000,
                   out_addr: int | None = None) -> np.ndarray:
        """``x @ W (+bias) (GELU)`` on PIM; returns float32 outputs in the original order."""
        lay = handle.layout
        x_bits = np.asarray(x) if np.asarray(x).dtype == np.uint16 else G.bf16_bits(np.asarray(x, np.float32))
        if x_bits.shape != (lay.K,):
            raise LayoutError(f"input must have shape ({lay.K},), not {x_bits.shape}")
        x_addr = self.alloc(x_bits.nbytes)
        await self.write(x_addr, x_bits.astype("<u2").tobytes())
        n_packed = lay.N
        y_addr = out_addr if out_addr is not None else self.alloc(n_packed * 4)
        flags = (MacroFlag.BIAS if handle.bias_addr is not None else 0) | (MacroFlag.GELU if gelu_act else 0)
        await self.submit(Macro(MacroOp.WRITE_VEC, n=lay.K, addr0=x_addr))
        await self.submit(Macro(MacroOp.GEMV, flags=int(flags), n=lay.K, m=n_packed, row=lay.base_row,
                                addr0=handle.bias_addr or 0))
        await self.submit(Macro(MacroOp.READ_RES, n=n_packed, addr0=y_addr))
        await self.wait_idle(timeout_cycles)
        y_packed = np.frombuffer(await self.read(y_addr, n_packed * 4), dtype="<u4")
        y = np.zeros(handle.n_out, dtype=np.uint32)
        valid = handle.perm >= 0
        y[handle.perm[valid]] = y_packed[valid]
        # Buffers of this call are freed (stack discipline).
        self.next_data_row += self._rows_for(x_bits.nbytes) + (0 if out_addr is not None
                                                                else self._rows_for(n_packed * 4))
        return y.view(np.float32)

    async def counters(self) -> dict:
        return {"completed": await self.t.read_csr(CSR.COMPLETED), "cycles": await self.t.read_csr(CSR.CYCLES)}
