"""The SoC's register map, host side: the table is :mod:`hw.spec.soc_regs` (re-exported here under its
documented path, ``firmware.soc_regs``); this module adds reading the counters through a transport and
summarising them per unit.
"""

from __future__ import annotations

from hw.spec.soc_regs import *  # noqa: F401,F403
from hw.spec.soc_regs import __all__ as _spec_all
from hw.spec.soc_regs import counter_registers

__all__ = [*_spec_all, "read_counters", "summary"]


async def read_counters(transport, channels: int, spu: bool = False) -> dict:
    """Every counter through ``transport.read_csr``, as ``{"group.counter": value}`` (the SRAM-PIM queue's
    too with ``spu``)."""
    return {key: await transport.read_csr(off) for key, off in counter_registers(channels, spu).items()}


def summary(counters: dict, channels: int) -> dict:
    """Per unit: busy cycles, stalled / waiting on memory / waiting on PIM, from :func:`read_counters`."""
    c = counters
    out = {
        "cp": {"busy": c["cp.cycles"], "waiting_on_memory": c["cp.fetch_stall"],
               "waiting_on_units": {"mu": c["cp.fence_mu"], "vq": c["cp.fence_vq"], "pim": c["cp.fence_pcu"]},
               "queue_full": c["cp.dispatch_stall"], "instructions": c["cp.instructions"]},
        "mu": {"busy": c["mu.busy"], "compute": c["mu.compute"], "waiting_on_tokens": c["mu.compute_wait"],
               "dma": {"load": c["mu.load"], "store": c["mu.store"]},
               "waiting_on_memory": c["fabric.req_stall2"]},
        "vq": {"busy": c["vq.busy"], "vector": c["vq.vector"], "dma": c["vq.dma"],
               "waiting_on_memory": c["vq.mem_stall"]},
        "pim": {"busy": c["pcu.busy"], "macros": c["pcu.completed"]},
        "host": {"waiting_on_memory": c["fabric.req_stall0"]},
        "channels": [{"busy": c[f"ch{k}.busy"], "commands": c[f"ch{k}.commands"],
                      "refreshes": c[f"ch{k}.refreshes"], "waiting_on_pim": c[f"ch{k}.pim_wait"]}
                     for k in range(channels)],
    }
    return out
