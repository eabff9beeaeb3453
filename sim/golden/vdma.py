"""Reference model of the vector DMA (``VLOAD`` / ``VSTORE`` of :mod:`hw.spec.soc_isa`): a byte copy.

Both sides are flat ``uint8`` numpy arrays: ``spm`` is the vector scratchpad
as bytes (for a :class:`sim.golden.vector.VectorModel` ``model``,
``model.mem.view(np.uint8).reshape(-1)`` is a view whose writes go through:
word ``w`` covers bytes ``[4 L w, 4 L (w + 1))``), ``mem`` is device memory.
``fields`` holds the six :data:`hw.spec.soc_isa.VDMA_FIELDS` (extra keys, such as
the ``op`` of :func:`hw.spec.soc_isa.decode`, are ignored).

Row ``r`` of ``cols`` 32-byte columns is at memory byte
``mem_addr + r * mem_stride`` and scratchpad byte ``32 * (spm_addr + r *
spm_pitch)``; rows are copied in order (a later row wins where rows overlap).

Checks, in this order, before anything is copied (the RTL's order, see
:mod:`hw.npu.vector_queue`): ``DMA_SIZE`` (``rows`` or ``cols`` zero),
``DMA_ALIGN`` (``mem_addr`` or ``mem_stride`` not a multiple of 32),
``DMA_SPM`` (scratchpad range past the end), ``DMA_MEM`` (memory range past
the end of ``mem``, or of ``device_bytes`` when given). On any error nothing
is copied. The RTL matches this exactly when ``mem`` is the whole device;
when its memory answers a request with an error (a memory smaller than the
device), the RTL has copied the columns before the failing one.
"""

from __future__ import annotations

import numpy as np

from hw.spec.soc_isa import VDMA_FIELDS, VqError

__all__ = ["COLUMN", "check", "vload", "vstore", "columns"]

COLUMN = 32
NAMES = tuple(name for name, _, _ in VDMA_FIELDS)


def _get(fields: dict) -> dict:
    missing = [n for n in NAMES if n not in fields]
    if missing:
        raise KeyError(f"VDMA fields missing: {missing}")
    return {n: int(fields[n]) for n in NAMES}


def check(fields: dict, spm_bytes: int, mem_bytes: int, device_bytes: int | None = None) -> VqError:
    """The error code of a VLOAD / VSTORE with ``fields`` (``VqError.NONE`` if it runs)."""
    f = _get(fields)
    rows, cols = f["rows"], f["cols"]
    if rows == 0 or cols == 0:
        return VqError.DMA_SIZE
    if f["mem_addr"] % COLUMN or f["mem_stride"] % COLUMN:
        return VqError.DMA_ALIGN
    if COLUMN * (f["spm_addr"] + (rows - 1) * f["spm_pitch"] + cols) > spm_bytes:
        return VqError.DMA_SPM
    limit = mem_bytes if device_bytes is None else min(mem_bytes, device_bytes)
    if f["mem_addr"] + (rows - 1) * f["mem_stride"] + COLUMN * cols > limit:
        return VqError.DMA_MEM
    return VqError.NONE


def _rows(f: dict):
    n = COLUMN * f["cols"]
    for r in range(f["rows"]):
        m = f["mem_addr"] + r * f["mem_stride"]
        s = COLUMN * (f["spm_addr"] + r * f["spm_pitch"])
        yield slice(m, m + n), slice(s, s + n)


def _copy(spm: np.ndarray, mem: np.ndarray, fields: dict, device_bytes: int | None, store: bool) -> VqError:
    """:func:`check`, then (no error) the rows in order: memory -> scratchpad, or the other way when ``store``."""
    err = check(fields, spm.size, mem.size, device_bytes)
    if err == VqError.NONE:
        for ms, ss in _rows(_get(fields)):
            if store:
                mem[ms] = spm[ss]
            else:
                spm[ss] = mem[ms]
    return err


def vload(spm: np.ndarray, mem: np.ndarray, fields: dict, device_bytes: int | None = None) -> VqError:
    """Memory -> scratchpad, in place on ``spm``; returns the error code."""
    return _copy(spm, mem, fields, device_bytes, store=False)


def vstore(spm: np.ndarray, mem: np.ndarray, fields: dict, device_bytes: int | None = None) -> VqError:
    """Scratchpad -> memory, in place on ``mem``; returns the error code."""
    return _copy(spm, mem, fields, device_bytes, store=True)


def columns(fields: dict) -> int:
    """32-byte columns the instruction moves."""
    f = _get(fields)
    return f["rows"] * f["cols"]
