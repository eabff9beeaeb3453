"""Helpers shared by the cocotb testbenches."""

from __future__ import annotations

import json
import os
import time

import numpy as np

__all__ = ["tb_test", "pack", "unpack", "start", "env_int", "env_str", "env_config", "write_metrics", "Stopwatch", "port_name",
           "port"]


def port_name(member: str, index: int, *path: str) -> str:
    """The Verilog name of ``member[index].path`` of a top whose ``member`` is a signature array
    (``In(sig).array(n)``): Amaranth 0.5 joins the parts with ``__`` (``mon[1].op`` is ``mon__1__op``)."""
    return "__".join((member, str(index), *path))


def port(dut, member: str, index: int, *path: str):
    """The cocotb handle of ``member[index].path`` (:func:`port_name`), touched by name (STYLE.md)."""
    return getattr(dut, port_name(member, index, *path))


def tb_test(*args, **kwargs):
    """``cocotb.test`` that also records a failure's message for the pytest driver.

    cocotb's results file only says "Test failed with RANDOM_SEED=..."; the
    wrapper appends ``name: ExceptionType: message`` to ``$IANUS_FAILFILE`` so
    :meth:`sim.build.SimBuild.run` can raise with the real message.
    """
    import functools

    import cocotb

    def decorate(func):
        @functools.wraps(func)
        async def wrapper(dut, *a, **kw):
            try:
                return await func(dut, *a, **kw)
            except BaseException as exc:  # noqa: B036 - re-raised below
                path = os.environ.get("IANUS_FAILFILE")
                if path:
                    with open(path, "a") as f:
                        f.write(f"{func.__name__}: {type(exc).__name__}: {exc}\n")
                raise
        return cocotb.test(*args, **kwargs)(wrapper)

    return decorate


def pack(values: np.ndarray, width: int) -> int:
    """Pack an array of ``width``-bit fields into one integer, element 0 in the low bits."""
    dtype = {8: "<u1", 16: "<u2", 32: "<u4", 64: "<u8"}.get(width)
    if dtype is not None:
        return int.from_bytes(np.asarray(values).astype(dtype).tobytes(), "little")
    out = 0
    for i, v in enumerate(np.asarray(values).tolist()):
        out |= int(v) << (i * width)
    return out


def unpack(value: int, width: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack`."""
    dtype = {8: "<u1", 16: "<u2", 32: "<u4", 64: "<u8"}.get(width)
    if dtype is not None:
        return np.frombuffer(int(value).to_bytes(count * width // 8, "little"), dtype=dtype).copy()
    mask = (1 << width) - 1
    return np.array([(int(value) >> (i * width)) & mask for i in range(count)], dtype=np.uint64)


def pack_struct(layout, **values) -> int:
    """The integer of an Amaranth ``StructLayout`` with the named fields set (the others 0), each masked to its
    width: what a testbench drives onto a struct-typed port."""
    out = 0
    for name, fld in layout:
        out |= (int(values.get(name, 0)) & ((1 << fld.width) - 1)) << fld.offset
    return out


def unpack_struct(layout, word: int) -> dict:
    """Inverse of :func:`pack_struct`: every field of ``layout`` from the integer ``word``."""
    return {name: (word >> fld.offset) & ((1 << fld.width) - 1) for name, fld in layout}


async def start(dut, period_ns: int = 10, reset_cycles: int = 2, zero_inputs=()):
    """Start the clock on ``dut.clk`` and pulse ``dut.rst``; drive ``zero_inputs`` to 0 first."""
    import cocotb
    from cocotb.clock import Clock
    from cocotb.triggers import RisingEdge

    for name in zero_inputs:
        getattr(dut, name).value = 0
    cocotb.start_soon(Clock(dut.clk, period_ns, units="ns").start())
    dut.rst.value = 1
    for _ in range(reset_cycles):
        await RisingEdge(dut.clk)
    dut.rst.value = 0
    await RisingEdge(dut.clk)


def env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def env_str(name: str, default: str) -> str:
    return os.environ.get(name, default)


def env_config(default: str = "tiny", overrides: str = "", section: str = ""):
    """The preset named by ``$IANUS_CONFIG`` (``default`` without it), with the ``section.key`` overrides listed
    in the environment variable ``overrides`` (``"tCCD=2,tRRD=3"``, integers)."""
    from hw.config import preset

    cfg = preset(env_str("IANUS_CONFIG", default))
    over = env_str(overrides, "") if overrides else ""
    if over:
        cfg = cfg.replace(**{f"{section}.{k}": int(v) for k, v in (kv.split("=") for kv in over.split(","))})
    return cfg


def write_metrics(**metrics):
    """Append metrics as one JSON line to ``$IANUS_METRICS`` (for benchmarks)."""
    path = os.environ.get("IANUS_METRICS")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(metrics) + "\n")


class Stopwatch:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
