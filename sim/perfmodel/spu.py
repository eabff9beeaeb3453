"""The SRAM-PIM queue in the performance model (issue 20; the RTL is :mod:`hw.npu.spu`).

One instruction at a time, in program order, as the RTL's dispatcher:

* ``SPIM``: the unit's own cycles (:meth:`hw.npu.sram_pim.SramPimUnit.command_cycles`, the formula the RTL
  meets exactly, as :func:`firmware.hpim.spim_cycles` computes it from the configuration) plus the dispatcher's checks and result write-back (``Calib.spim_over``). Its operands and
  results stay in the vector scratchpad; the write port it shares with the vector queue is not modelled
  (the ``hpim`` programs fence the vector queue before every SPIM, so the two never write at once).
* ``SLOAD``: ``regions x positions x cols`` 32-byte reads, one request per cycle, at most
  ``Micro.spu_outstanding`` in flight, through the fabric port it shares with the vector DMA
  (:func:`hw.soc._share_port`: one request per cycle for the two, responses in request order), so a VLOAD
  issued beside an SLOAD takes turns with it as on the RTL.
"""

from __future__ import annotations

from collections import deque

from firmware.hpim import spim_cycles
from hw.spec.soc_isa import SPIM_OVERHEAD, SocOp
from sim.perfmodel.memory import _take
from sim.perfmodel.params import INF
from sim.perfmodel.queue import QueueModel


class SpuModel(QueueModel):
    """Methods of :class:`sim.perfmodel.core._Run` for the SRAM-PIM queue."""

    def _spu(self):
        cal = self.cal
        yield from self._npu_queue("spu", self.spu_q, self.ev_spu, self.ev_spu_space, cal.spu_fifo_lat,
                                   self._spu_serve, cal.spu_done_over, cal.spu_idle_lat)

    def _spu_serve(self, ins, start):
        """One SPIM or SLOAD from ``start`` (a generator): returns the cycle it is done."""
        K, cal, kf = self.K, self.cal, self.m.k
        spu = self.cfg.spu
        f = ins.f
        if ins.op == SocOp.SPIM:
            d = (spim_cycles(self.cfg, bool(f["mode"]), f["count"], f["heads"]) - SPIM_OVERHEAD) * kf
            done = start + cal.spim_over * kf + d
            macs = f["heads"] * f["count"] * spu.word_lanes
            self.events["sram_pim_mac"] += macs
            n_out = f["count"] if f["mode"] == 0 else spu.word_lanes
            self.events["spm_wr_bytes"] += 4 * n_out * f["heads"]
            self.events["spm_rd_bytes"] += 2 * f["heads"] * (spu.word_lanes if f["mode"] == 0 else f["count"])
            self.work["spu_compute"] += d
            if done > K.now:
                yield done
            self.intervals.append((start, done, self._tag(ins, "attention")))
        else:
            t1 = start + cal.sload_over * kf
            nw = len(self.win_log)
            self.mem.max_col = -INF
            done = yield from self._held(self._sload(f, t1))
            if done > K.now:
                yield done
            self._split_pim_wait(start, done, self._pim_overlap(start, done, nw), self._tag(ins, "attention"))
            self.work["spu_load"] += done - t1
        return done

    def _sload(self, f, t):
        """SLOAD (a generator): returns the cycle the engine is done (its last response taken)."""
        mem, kf, K = self.mem, self.m.k, self.K
        port = self.m.vq_port
        outmax = self.mi.spu_outstanding
        regions, positions, cols = f["regions"], f["positions"], f["cols"]
        n = regions * positions * cols
        self.events["dma_bytes"] += 32 * n
        self.events["sram_pim_wr_bytes"] += 32 * n
        a = t - kf
        last_r = -INF
        cons = deque()
        for r in range(regions):
            for p in range(positions):
                ra = f["mem_addr"] + r * f["region_stride"] + p * f["pos_stride"]
                for c in range(cols):
                    a += kf
                    if len(cons) >= outmax:
                        a = max(a, cons.popleft() + 1)
                    a = _take(port[0], a)
                    if a > K.now + self.LOOKAHEAD:
                        yield a
                    rr = max(mem.request(ra + 32 * c, False, a), last_r + 1, port[1][0] + 1)
                    port[1][0] = rr
                    last_r = rr
                    cons.append(rr)
        return last_r + self.cal.sload_end * kf

