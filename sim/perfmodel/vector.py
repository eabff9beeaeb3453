"""The vector queue in the performance model: VECTOR by the vector unit's cycle formulas, VLOAD / VSTORE by
streaming requests through the memory model."""

from __future__ import annotations

from hw.spec.soc_isa import SocOp
from hw.spec.vector_isa import vector_cycles
from sim.perfmodel.memory import DmaStream
from sim.perfmodel.params import INF
from sim.perfmodel.queue import QueueModel


class VectorQueueModel(QueueModel):
    """Methods of :class:`sim.perfmodel.core._Run` for the vector queue (:mod:`hw.npu.vector_queue`)."""

    def _vq(self):
        cal = self.cal
        yield from self._npu_queue("vq", self.vq_q, self.ev_vq, self.ev_vq_space, cal.vq_fifo_lat, self._vq_serve,
                                   cal.vq_done_over, cal.vq_idle_lat)

    def _vq_serve(self, ins, start):
        """One VECTOR, VLOAD or VSTORE from ``start`` (a generator): returns the cycle it is done."""
        K, cal, kf = self.K, self.cal, self.m.k
        if ins.op == SocOp.VECTOR:
            d = self._vec_cycles(ins.f) * kf
            done = start + cal.vq_vec_over * kf + d
            self.work["vq_vector"] += d
            self.intervals.append((start, done, self._tag(ins, "vector")))
        else:
            t1 = start + cal.vq_dma_over * kf
            nw = len(self.win_log)
            self.mem.max_col = -INF
            f = ins.f
            key = (int(ins.op), f["rows"], f["cols"], f["mem_stride"], f["mem_addr"] % self.m.align)
            done, cached = yield from self._timed(key, t1, lambda t, ins=ins: self._held(self._vdma(ins, t)))
            if cached:
                done = yield from self._dma_pushback(done, nw)
            elif done > K.now:
                yield done
            self._split_pim_wait(start, done, self._pim_overlap(start, done, 0 if not cached else nw),
                                 self._tag(ins, "vector"))
            self.work["vq_dma"] += done - t1
        return done

    def _vec_cycles(self, f):
        n, rows, op = f["n"], f["rows"], f["op"]
        self.events["vec_elem"] += n * rows * (3 if op in ("SOFTMAX", "LN_STATS") else 1)
        self.events["spm_rd_bytes"] += n * rows * 4
        self.events["spm_wr_bytes"] += n * rows * 4
        return vector_cycles(op, n, rows, self.m.L, cores=self.mi.cores, acc_stages=self.cfg.npu.vec_acc_stages)

    def _vdma(self, ins, t):
        """VLOAD / VSTORE (a generator): returns the cycle the transfer is done."""
        mem, kf, mi, cal, K = self.mem, self.m.k, self.mi, self.cal, self.K
        f = ins.f
        rows, cols, stride, base = f["rows"], f["cols"], f["mem_stride"], f["mem_addr"]
        store = ins.op == SocOp.VSTORE
        self.events["dma_bytes"] += rows * cols * 32
        self.events["spm_rd_bytes" if store else "spm_wr_bytes"] += rows * cols * 32
        gap = kf / (mi.dma_issue * mi.cores)
        rgap = 1 if mi.dma_issue * mi.cores == 1 else gap
        outmax = mi.dma_outstanding * mi.cores
        port = self.m.vq_port if self.has_spu else None     # shared with the SRAM-PIM queue's SLOAD engine
        s = DmaStream(t - gap + (cal.vdma_store_lat * kf if store else 0), gap, rgap, outmax, port)
        for r in range(rows):
            ra = base + r * stride
            for c in range(cols):
                a = s.issue()
                if a > K.now + self.LOOKAHEAD:
                    yield a
                s.cons.append(s.deliver(mem.request(ra + 32 * c, store, a)))
        return s.last_r + cal.vdma_end * kf
