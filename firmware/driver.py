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

import numbers
from dataclasses import dataclass

import numpy as np

from firmware.pim import GemvLayout, af_lut_row, gelu
from hw.spec import fp as G
from hw.spec.addrmap import AddressMap
from hw.spec.config import SystemConfig
from hw.spec.macro import (
    CSR,
    DEVICE_ID,
    GEOMETRY_FIELDS,
    Macro,
    MacroError,
    MacroFlag,
    MacroOp,
    encode,
    geometry_word,
    pcu_limits,
)

__all__ = ["PimError", "DeviceTimeout", "DriverError", "LayoutError", "DeviceMismatchError", "ERRORS",
           "FunctionalTransport", "WeightHandle", "Device"]


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


class DriverError(ValueError):
    """A driver call with bad arguments (the message names the argument, the value and the limit). Raised before
    anything reaches the device; the driver's allocations are as they were before the call."""


class LayoutError(DriverError):
    """A weight layout or allocation request that cannot be satisfied."""


class DeviceMismatchError(DriverError):
    """:meth:`Device.open` with a configuration that is not the device's (its ID or GEOMETRY register)."""


_FLOAT_KINDS = ("float16", "bfloat16", "float32", "float64")


def _address(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise DriverError(f"{name} must be an integer byte address, not {value!r}")
    return int(value)


def _count(name: str, value, lo: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < lo:
        raise DriverError(f"{name} must be an integer >= {lo}, not {value!r}")
    return int(value)


def _bf16_operand(name: str, value) -> np.ndarray:
    """BF16 bits of ``value``: uint16 arrays are taken as BF16 bit patterns as they are; float arrays (float16,
    bfloat16, float32, float64) must be finite. Anything else (integers, bool, complex, objects) is an error."""
    try:
        a = np.asarray(value)
    except Exception as e:
        raise DriverError(f"{name} must be a numeric array, not {type(value).__name__} ({e})") from None
    if a.dtype == np.uint16:
        return a
    if str(a.dtype) not in _FLOAT_KINDS:
        raise DriverError(f"{name} must be a float array ({', '.join(_FLOAT_KINDS)}) or BF16 bits (uint16), "
                          f"not dtype {a.dtype}")
    with np.errstate(over="ignore", invalid="ignore"):
        f = a.astype(np.float32)
    bad = ~np.isfinite(f)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise DriverError(f"{name} has {int(bad.sum())} NaN/Inf value(s) (as float32), the first at {list(first)}")
    return G.bf16_bits(f)


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
        """A driver for the device behind ``transport``; raises :class:`DeviceMismatchError` when its ID
        register is not the IANUS prototype's or its GEOMETRY register does not match ``cfg``."""
        if not isinstance(cfg, SystemConfig):
            raise DriverError(f"cfg must be a SystemConfig, not {cfg!r}")
        ident = await transport.read_csr(CSR.ID)
        if ident != DEVICE_ID:
            raise DeviceMismatchError(f"unexpected device id {ident:#x} (expected {DEVICE_ID:#x})")
        got = await transport.read_csr(CSR.GEOMETRY)
        want = geometry_word(cfg.pim)
        if got != want:
            diff = [f"{name} {(got >> lo) & ((1 << w) - 1)} (configuration {cfg.name!r}: "
                    f"{(want >> lo) & ((1 << w) - 1)})" for name, lo, w in GEOMETRY_FIELDS
                    if (got >> lo) & ((1 << w) - 1) != (want >> lo) & ((1 << w) - 1)]
            raise DeviceMismatchError(f"the device's geometry is not configuration {cfg.name!r}'s: "
                                      + ", ".join(diff or [f"GEOMETRY {got:#x}, expected {want:#x}"]))
        return cls(transport, cfg)

    @property
    def allocated_data_rows(self) -> int:
        """Rows (per bank) held by data buffers (:meth:`alloc`); a finished or failed :meth:`gemv` leaves it
        unchanged."""
        return self.cfg.pim.data_rows - self.next_data_row

    # -- memory ----------------------------------------------------------------
    def _rows_for(self, nbytes: int) -> int:
        return max(1, -(-nbytes // self.row_span))

    def alloc(self, nbytes: int) -> int:
        """Allocate a data buffer of ``nbytes`` (whole rows across all banks, from the top)."""
        if isinstance(nbytes, bool) or not isinstance(nbytes, numbers.Integral) or nbytes <= 0:
            raise LayoutError(f"allocation size must be a positive integer, not {nbytes!r}")
        nbytes = int(nbytes)
        rows = self._rows_for(nbytes)
        if self.next_data_row - rows < self.next_weight_row:
            raise LayoutError(f"out of device memory: {nbytes} bytes need {rows} rows, "
                              f"{self.next_data_row - self.next_weight_row} free")
        self.next_data_row -= rows
        return self.amap.encode(self.next_data_row, 0, 0, 0)

    def _check_range(self, addr, n: int) -> int:
        addr = _address("address", addr)
        p = self.cfg.pim
        if addr < 0 or addr % p.column_bytes:
            raise DriverError(f"address {addr:#x} must be a non-negative multiple of the {p.column_bytes}-byte "
                              f"column")
        if addr + n > p.total_bytes:
            raise DriverError(f"{n} bytes at {addr:#x} run past the end of device memory ({p.total_bytes:#x} bytes)")
        return addr

    async def write(self, addr: int, data: bytes):
        """Write ``data`` (bytes-like) to device memory at ``addr`` (column-aligned, inside device memory)."""
        try:
            data = bytes(memoryview(data))
        except TypeError:
            raise DriverError(f"data must be bytes-like, not {type(data).__name__}") from None
        addr = self._check_range(addr, len(data))
        await self.t.write_mem(addr, data)

    async def read(self, addr: int, n: int) -> bytes:
        """Read ``n`` bytes of device memory at ``addr`` (column-aligned, inside device memory)."""
        n = _count("n", n)
        addr = self._check_range(addr, n)
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
        n_out = _count("n_out", n_out, 1)
        if n_out > self.limits["result_values"]:
            raise LayoutError(f"N={n_out} exceeds the PCU result buffer ({self.limits['result_values']} values)")
        if layout == "columns":
            return np.arange(n_out)
        if layout != "heads":
            raise LayoutError(f"layout must be 'columns' or 'heads', not {layout!r}")
        head_dim = _count("head_dim", head_dim, 1)
        sections = _count("sections", sections, 1)
        if n_out % (sections * head_dim):
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
        """Upload ``w`` ([K, N], used as ``x @ w``; finite floats or BF16 bits as uint16) and an optional bias
        (finite floats, N). Bad arguments raise :class:`DriverError` before anything is written."""
        w_bits = _bf16_operand("weights", w)
        if w_bits.ndim != 2 or 0 in w_bits.shape:
            raise LayoutError(f"weights must be a 2-D [K, N] matrix with K, N >= 1, not shape {w_bits.shape}")
        K, N = w_bits.shape
        if bias is not None:
            b = np.asarray(bias)
            if str(b.dtype) not in _FLOAT_KINDS:
                raise DriverError(f"bias must be a float array ({', '.join(_FLOAT_KINDS)}), not dtype {b.dtype}")
            if b.shape != (N,):
                raise LayoutError(f"bias must have shape ({N},), not {b.shape}")
            _bf16_operand("bias", b)                           # finite
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
        image = self.amap.pack_rows(packed.transpose(2, 0, 1, 3, 4))   # address order (hw.spec.addrmap.AddressMap)
        handle = WeightHandle(lay, perm, N)
        rows = (self.next_weight_row, self.next_data_row)
        try:
            if bias is not None:
                bp = np.zeros(n_packed, dtype=np.float32)
                bp[valid] = np.asarray(bias, dtype=np.float32)[perm[valid]]
                handle.bias_addr = self.alloc(bp.nbytes)
            self.next_weight_row += lay.rows_used
            await self.write(self.amap.encode(lay.base_row, 0, 0, 0), image.tobytes())
            if bias is not None:
                await self.write(handle.bias_addr, bp.tobytes())
        except BaseException:
            self.next_weight_row, self.next_data_row = rows           # nothing stays allocated
            raise
        return handle

    async def upload_gelu_table(self, fn=gelu):
        """Write the activation lookup table into every bank's reserved row."""
        p = self.cfg.pim
        row = af_lut_row(self.cfg, fn)
        image = np.broadcast_to(row, (1, p.channels, p.banks, p.columns, p.lanes))
        await self.write(self.amap.encode(p.data_rows, 0, 0, 0), self.amap.pack_rows(image).tobytes())

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
        """``x @ W (+bias) (GELU)`` on PIM; returns float32 outputs in the original order.

        ``x``: finite floats or BF16 bits (uint16) of shape (K,). The buffers of the call are freed when it
        returns or fails (device error, timeout), so a failed GEMV leaves :attr:`allocated_data_rows` as it
        was."""
        if not isinstance(handle, WeightHandle):
            raise DriverError(f"handle must be a WeightHandle from upload_weights, not {handle!r}")
        lay = handle.layout
        x_bits = _bf16_operand("x", x)
        if x_bits.shape != (lay.K,):
            raise LayoutError(f"input must have shape ({lay.K},), not {x_bits.shape}")
        timeout_cycles = _count("timeout_cycles", timeout_cycles, 1)
        n_packed = lay.N
        if out_addr is not None:
            out_addr = self._check_range(out_addr, n_packed * 4)
        saved = self.next_data_row
        try:
            x_addr = self.alloc(x_bits.nbytes)
            y_addr = out_addr if out_addr is not None else self.alloc(n_packed * 4)
            await self.write(x_addr, x_bits.astype("<u2").tobytes())
            flags = (MacroFlag.BIAS if handle.bias_addr is not None else 0) | (MacroFlag.GELU if gelu_act else 0)
            await self.submit(Macro(MacroOp.WRITE_VEC, n=lay.K, addr0=x_addr))
            await self.submit(Macro(MacroOp.GEMV, flags=int(flags), n=lay.K, m=n_packed, row=lay.base_row,
                                    addr0=handle.bias_addr or 0))
            await self.submit(Macro(MacroOp.READ_RES, n=n_packed, addr0=y_addr))
            await self.wait_idle(timeout_cycles)
            y_packed = np.frombuffer(await self.read(y_addr, n_packed * 4), dtype="<u4")
        finally:
            self.next_data_row = saved          # the call's buffers are freed (stack discipline), also on failure
        y = np.zeros(handle.n_out, dtype=np.uint32)
        valid = handle.perm >= 0
        y[handle.perm[valid]] = y_packed[valid]
        return y.view(np.float32)

    async def counters(self) -> dict:
        return {"completed": await self.t.read_csr(CSR.COMPLETED), "cycles": await self.t.read_csr(CSR.CYCLES)}
