"""The matrix unit in the performance model: decode register, the load / compute / store queues with their
semaphores, the compute engine's slot arithmetic and the DMA engines request by request."""

from __future__ import annotations

from collections import deque

from sim.perfmodel.memory import DmaStream, _take
from sim.perfmodel.params import INF

_MU_QUEUE = {"LOAD": 0, "COMPUTE": 1, "NOP": 1, "STORE": 2}


class MatrixUnitModel:
    """Methods of :class:`sim.perfmodel.core._Run` for the matrix unit (:mod:`hw.npu.matrix_unit`, :mod:`hw.npu.dma`)."""

    def _mu_decode(self):
        """Decode register -> one of the three queues (blocks while that queue is full)."""
        K, cal = self.K, self.cal
        while True:
            while self.mu_dec is None:
                yield self.ev_mudec_in
            ins, t = self.mu_dec
            tt = t + self.m.k
            if tt > K.now:
                yield tt
            q = _MU_QUEUE[ins.f["opcode"]]
            while len(self.mu_q[q]) >= self.mi.mu_queue:
                yield self.ev_muq[q]
            self.mu_q[q].append((ins, K.now + cal.mu_q_lat * self.m.k))
            self.units["mu"].up(K.now)            # held by the queue entry
            self.mu_dec = None
            self.units["mu"].down(K.now)          # released by the decode register
            K.notify(self.ev_mudec)
            K.notify(self.ev_muq[q])

    def _sem_ok(self, mask):
        s = self.sem
        i = 0
        while mask:
            if mask & 1 and s[i] == 0:
                return False
            mask >>= 1
            i += 1
        return True

    def _give(self, mask):
        i = 0
        while mask:
            if mask & 1:
                self.sem[i] += 1
            mask >>= 1
            i += 1
        self.K.notify(self.ev_sem)

    def _mu_engine(self, qi):
        K, cal, kf = self.K, self.cal, self.m.k
        q = self.mu_q[qi]
        free = K.now
        while True:
            while not q:
                yield self.ev_muq[qi]
            ins, t_head = q[0]
            tt = max(t_head, free)
            if tt > K.now:
                yield tt
            f = ins.f
            while not self._sem_ok(f["wait"]):
                yield self.ev_sem
            i = 0
            mask = f["wait"]
            while mask:
                if mask & 1:
                    self.sem[i] -= 1
                mask >>= 1
                i += 1
            q.popleft()
            K.notify(self.ev_muq[qi])
            start = K.now
            op = f["opcode"]
            if op == "LOAD":
                # The engine takes the next LOAD once this one has issued its requests (and the previous one's
                # handler has taken this one: hw/npu/dma.py's pending slot); the rest runs beside it.
                prev_done = self.ld_done
                self.ld_gen_end = None
                K.spawn(self._mu_load_proc(ins, start))
                while self.ld_gen_end is None:
                    yield self.ev_ldgen
                free = max(self.ld_gen_end + kf, prev_done)
                continue
            if op == "STORE":
                nw = len(self.win_log)
                self.mem.max_col = -INF
                key = (op, f["transpose"], f["bf16"], f["rows"], f["cols"], f["mem_stride"],
                       f["mem_addr"] % self.m.align)
                done, cached = yield from self._timed(
                    key, start + cal.mu_dma_start * kf, lambda t, f=f: self._held(self._mu_store(f, t)))
                done = yield from self._dma_done(ins, "mu_store", start, done, cached, nw)
                free = done + kf
                sig_at = done
            elif op == "COMPUTE":
                issue, drain = self._mu_compute(f)
                self.work["mu_compute"] += issue
                self.intervals.append((start, start + issue + drain, self._tag(ins, "mu")))
                free = start + (cal.mu_comp_start) * kf + issue
                sig_at = free + drain
            else:       # NOP
                free = start + kf
                sig_at = start
            sig = f["signal"]
            if sig:
                K.at(sig_at + cal.sem_lat * kf, lambda s=sig: self._give(s))
            extra = cal.mu_store_extra if op == "STORE" else 0
            K.at(sig_at + (cal.mu_idle_lat + extra) * kf, self._mu_down)

    def _mu_load_proc(self, ins, start):
        """One LOAD, beside the engine's next instruction once its requests are issued (``ev_ldgen``): its
        responses are taken after the previous LOAD's (``ld_done``); gives its tokens when done."""
        K, cal, kf = self.K, self.cal, self.m.k
        f = ins.f
        nw = len(self.win_log)
        self.mem.max_col = -INF
        t0 = start + cal.mu_dma_start * kf
        ready = self.ld_done
        lag = max(0, round(ready - t0, 3))
        key = ("LOAD", f["transpose"], f["rows"], f["cols"], f["mem_stride"], f["mem_addr"] % self.m.align, lag)
        self.ld_key = (("gen",) + key, t0)
        done, cached = yield from self._timed(key, t0, lambda t: self._held(self._mu_load(f, t, ready)))
        if cached:
            self._ld_issued(t0 + self.m.cache[("gen",) + key], done, None)
        done = yield from self._dma_done(ins, "mu_load", start, done, cached, nw)
        sig = f["signal"]
        if sig:
            K.at(done + cal.sem_lat * kf, lambda s=sig: self._give(s))
        K.at(done + cal.mu_idle_lat * kf, self._mu_down)

    def _dma_done(self, ins, work, start, done, cached, nw):
        """Wait for a LOAD / STORE to finish (a macro started meanwhile holds a cached transfer back) and
        account its cycles (``work``), the part spent waiting for PIM and its intervals; returns its end."""
        K = self.K
        if cached:
            done = yield from self._dma_pushback(done, nw)
        elif done > K.now:
            yield done
        self.work[work] += done - start
        wait = min(done - start, self._pim_overlap(start, done, 0 if not cached else nw))
        self.work["pim_block"] += wait
        self.intervals.append((start, done - wait, self._tag(ins, "mu")))
        if wait > 0:
            self.intervals.append((done - wait, done, "wait_pim"))
        return done

    def _ld_issued(self, gen_end, done, stream):
        """The current LOAD has issued its last request (``gen_end``); its handler ends at ``done``."""
        if stream is not None and self.mi.cache:
            gkey, t0 = self.ld_key
            self.m.cache[gkey] = gen_end - t0
        self.ld_gen_end, self.ld_done, self.ld_stream = gen_end, done, stream
        self.K.notify(self.ev_ldgen)

    def _mu_down(self):
        self.units["mu"].down(self.K.now)
        self.K.notify(self.ev_idle)

    def _mu_compute(self, f):
        """(cycles until the next instruction may start, further cycles until the tokens), memory cycles."""
        R, C, kf = self.m.R, self.m.C, self.m.k
        M, Kd, N = f["m"], f["k"], f["n"]
        KB = -(-Kd // (R * self.m.macs))
        NB = -(-N // C)
        NB = -(-NB // self.mi.cores)
        slot = max(M, R, 4)
        self.events["mac"] += M * Kd * N
        self.events["spm_rd_bytes"] += (M * Kd + Kd * N) * 2 * 1
        self.events["spm_wr_bytes"] += M * N * 4
        issue = max(R, 4) + slot * KB * NB
        drain = self.m.mu_drain - (slot - M)
        return issue * kf, max(1, drain) * kf

    # DMA engines run as processes of the event kernel: every request is timed when its engine issues
    # it (``yield`` to that cycle first, ``LOOKAHEAD`` cycles at most ahead of the kernel's time), so
    # that concurrent streams reach the channels in time order (bank conflicts between them, queue
    # occupancy), and so that a PIM macro started meanwhile holds the requests issued after its start.
    LOOKAHEAD = 4

    def _port(self):
        """The matrix unit's one memory port (load and store engines behind a round-robin arbiter):
        one request per cycle, responses delivered in request order (the fabric's reorder buffer).
        ``None`` for the projected system (wide ports per engine)."""
        if self.mi.dma_issue * self.mi.cores != 1:
            return None
        return self.m.mu_port

    def _mu_load(self, f, t, ready=-INF):
        """LOAD (a generator) whose first request goes at ``t``, its responses taken from ``ready`` on (the
        previous LOAD's handler end): returns the cycle the engine finishes (:meth:`_ld_issued` told when the
        last request is issued)."""
        mem, kf, mi, K = self.mem, self.m.k, self.mi, self.K
        W = self.m.R
        rows, cols, stride, base = f["rows"], f["cols"], f["mem_stride"], f["mem_addr"]
        ncol = -(-cols // 16)
        self.events["dma_bytes"] += rows * ncol * 32
        self.events["spm_wr_bytes"] += rows * cols * 2
        gap = kf / (mi.dma_issue * mi.cores)
        rgap = 1 if mi.dma_issue * mi.cores == 1 else gap    # responses in order, one per port per cycle
        outmax = mi.dma_outstanding * mi.cores
        port = self._port()
        la = self.LOOKAHEAD
        s = DmaStream(t - gap, gap, rgap, outmax, port)
        prev = self.ld_stream
        if prev is not None and not mi.cache:      # the previous LOAD's requests still in flight
            s.cons.extend(list(prev.cons)[-outmax:])
            s.last_r = prev.last_r
        issue, deliver, cons = s.issue, s.deliver, s.cons
        h = max(t, ready)
        per = kf / mi.cores        # engine cycles per scratchpad word (cores in parallel)

        if not f["transpose"]:
            ppc = max(1, 16 // min(W, 16))
            for r in range(rows):
                ra = base + r * stride
                for c in range(ncol):
                    ai = issue()
                    if ai > K.now + la:
                        yield ai
                    rem = cols - c * 16
                    # scratchpad words written for this column (a word wider than a column: a fraction)
                    pieces = min(ppc, -(-rem // W)) if W <= 16 else min(16, rem) / W
                    rr = deliver(mem.request(ra + 32 * c, False, ai), h)
                    h = max(rr, h) + pieces * per
                    cons.append(h - min(per, pieces * per))
        else:
            Wb = min(W, 16) if self.cfg.npu.array_rows <= 16 else W
            gper = per / mi.dma_issue          # the gather buffer takes dma_issue rows per cycle
            nbuf = mi.transpose_buffers
            buf_free = [h] * nbuf              # a W x 16 buffer is free again when its words are written
            emit_free = h
            k = 0
            for b0 in range(0, rows, Wb):
                nr = min(Wb, rows - b0)
                for c in range(ncol):
                    ne = min(16, cols - c * 16)
                    for w in range(nr):
                        addr = base + (b0 + w) * stride + 32 * c
                        ai = issue()
                        if ai > K.now + la:
                            yield ai
                        rr = deliver(mem.request(addr, False, ai), max(h, buf_free[k]))
                        h = max(rr, h) + gper
                        cons.append(h - gper)
                    es = max(h, emit_free)     # the emitter writes the transpose, one word per cycle
                    emit_free = es + ne * per
                    buf_free[k] = emit_free
                    k = (k + 1) % nbuf
            h = max(h, emit_free)
        done = h + self.cal.mu_dma_end * kf
        self._ld_issued(s.a, done, s)
        return done

    def _mu_store(self, f, t):
        """STORE (a generator): returns the cycle the engine finishes."""
        mem, kf, mi, K = self.mem, self.m.k, self.mi, self.K
        C = self.m.C
        rows, cols, stride, base = f["rows"], f["cols"], f["mem_stride"], f["mem_addr"]
        bf16 = f["bf16"]
        E = 16 if bf16 else 8
        piece = min(C, E)
        self.events["spm_rd_bytes"] += rows * cols * 4
        # The RTL's engine (one core, one request per cycle) emits a column per cycle through a 4-entry write
        # FIFO. Scaled like the read side (:func:`sim.perfmodel.params.micro_for`): every core's engine, with
        # its own FIFO, writes ``dma_issue`` columns per NPU cycle (an accumulator word of the paper-scale
        # array is eight columns), so that the cores together can fill the channels' write bandwidth too.
        per = kf / (mi.cores * mi.dma_issue)
        rgap = 1 if mi.dma_issue * mi.cores == 1 else kf / (mi.dma_issue * mi.cores)
        g = t
        last_req = -INF
        last_ack = -INF
        acks = deque()
        outmax = mi.dma_outstanding * mi.cores
        ncol = -(-cols // E)
        self.events["dma_bytes"] += rows * ncol * 32
        port = self._port()
        issued = deque()          # request cycles of the columns in the 4-entry write FIFO
        for r in range(rows):
            ra = base + r * stride
            for c in range(ncol):
                n_el = min(E, cols - c * E)
                if len(issued) >= 4 * mi.cores:    # FIFO full: the generator waits for a request to leave
                    g = max(g, issued.popleft())
                g += (-(-n_el // piece) if C <= E else n_el / C) * per
                a = max(g + kf, last_req + per)
                if len(acks) >= outmax:
                    a = max(a, acks.popleft() + 1)
                if port is not None:
                    a = _take(port[0], a)
                if a > K.now + self.LOOKAHEAD:
                    yield a
                last_req = a
                issued.append(a)
                ack = max(mem.request(ra + c * 32, True, a), last_ack + rgap)
                if port is not None:
                    ack = max(ack, port[1][0] + 1)
                    port[1][0] = ack
                last_ack = ack
                acks.append(ack)
        return max(last_ack, g) + self.cal.mu_dma_end * kf
