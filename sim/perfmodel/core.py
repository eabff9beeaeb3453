"""The performance model (:class:`PerfModel`) and one program's run on it (:class:`_Run`: its set-up, the
command processor, and what the units' DMAs share); the units are :mod:`sim.perfmodel.matrix`,
:mod:`sim.perfmodel.vector` and :mod:`sim.perfmodel.pcu`."""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from hw.config import SystemConfig
from hw.spec import matrix_isa as mu_isa
from hw.spec.pipeline import compute_drain
from hw.spec.soc_isa import SocOp
from sim.perfmodel.decode import Ins, decode_program
from sim.perfmodel.kernel import _Event, _Kernel
from sim.perfmodel.matrix import MatrixUnitModel
from sim.perfmodel.memory import Memory, _Slots
from sim.perfmodel.params import INF, Calib, Micro, micro_for
from sim.perfmodel.pcu import PcuModel, _PcuMacro
from sim.perfmodel.spu import SpuModel
from sim.perfmodel.vector import VectorQueueModel


@dataclass
class ProgramResult:
    cycles: float
    start: float
    end: float
    busy: dict = field(default_factory=dict)        # unit -> busy cycles (MU, VQ, PCU)
    work: dict = field(default_factory=dict)        # cycle attribution (see PerfModel.run_program)
    events: dict = field(default_factory=dict)      # event counts for the energy model
    counters: dict = field(default_factory=dict)    # per channel: hits, misses, refreshes, ...
    spans: dict = field(default_factory=dict)       # unit -> busy intervals relative to the start
    breakdown: dict = field(default_factory=dict)   # tag -> cycles (exclusive, see _Run._breakdown)


class _BusyTracker:
    """Busy intervals of a unit, for the CP's idle rule and the busy counters."""

    def __init__(self):
        self.active = 0
        self.since = 0.0
        self.total = 0.0
        self.idle_at = 0.0       # busy low from this cycle (when active == 0)
        self.handoff = -INF      # last cycle an instruction was handed to the unit
        self.spans = []

    def up(self, now):
        if self.active == 0:
            self.since = now + 1         # busy rises the cycle after the unit accepts
        self.active += 1

    def down(self, now):
        self.active -= 1
        if self.active == 0:
            self.total += now - self.since
            self.idle_at = now
            self.spans.append((self.since, now))


class PerfModel:
    """Times programs on one configuration; memory state (open rows, refresh) and time carry over
    from one program to the next like on the RTL, where the host starts them back to back."""

    def __init__(self, cfg: SystemConfig, micro: Micro | None = None, calib: Calib | None = None):
        self.cfg = cfg
        self.micro = micro or micro_for(cfg)
        self.calib = calib or Calib()
        self.mem = Memory(cfg, self.micro, self.calib)
        self.k = cfg.clocks.pim_mhz / cfg.clocks.npu_mhz      # memory cycles per NPU cycle
        self.time = 0.0
        self.programs = 0
        self.cache = {}
        self.mu_port = (_Slots(), [-INF])    # the matrix unit's memory port (load + store share it):
        #                                   request cycles taken, last response delivered
        self.vq_port = (_Slots(), [-INF])    # with an SRAM-PIM queue: the fabric port its SLOAD engine shares
        #                                   with the vector DMA (hw.soc._share_port)
        p = cfg.pim
        # cache key: offset in a DRAM row (channel and bank symmetric); with a channel interleave the bank
        # changes every channels * row_bytes
        self.align = p.row_bytes * (p.channels if self.mem.il else 1)
        n = cfg.npu
        self.R, self.C, self.L = n.array_rows, n.array_cols, n.vector_lanes
        self.macs = n.macs_per_pe
        # COMPUTE drain (scratchpad read, array, accumulator read-modify-write): R + C + 3 for one-stage PEs,
        # longer with pipelined ones (issue 15; the RTL's formula, hw.spec.pipeline)
        self.mu_drain = compute_drain(self.R, self.C, n.pe_mul_stages, n.pe_add_stages)

    # ---------------------------------------------------------------- public
    def run_program(self, words, ins: list[Ins] | None = None, prog_addr: int | None = None,
                    start: float | None = None, tags: list[str] | None = None) -> ProgramResult:
        """Time one program. It starts ``Calib.gap`` cycles after the previous one ended (the host's
        register accesses between programs), or at cycle ``start`` when given (cycle 0 is the first
        program's start; the DRAM refresh counters started ``Calib.first_start`` cycles earlier)."""
        ins = ins if ins is not None else decode_program(words, spu=self.cfg.spu is not None)
        if start is None:
            start = self.time + (self.calib.gap if self.programs else 0)
        elif start < self.time:
            self._truncate(start)
        run = _Run(self, ins, start, prog_addr if prog_addr is not None else 0, tags)
        res = run.execute()
        self.time = res.end
        self.programs += 1
        return res

    def _truncate(self, t0):
        """A program starts at ``t0`` before the previous one ended in the model: the RTL had finished
        it ``Calib.gap`` cycles before ``t0`` (the host's register accesses followed). Drop the memory
        traffic the model had timed after that point; the REFs falling due in the gap start as they
        fall due (the channels are idle there). A REF that fell due before that point and was not done by
        then (the channel busy to the program's end, or the model's REF dropped with the traffic after it)
        stays owed and starts in the gap: assuming it done had the model miss a tRFC the RTL paid (default,
        generation ln1 after the prefill: 7.6 % under the RTL)."""
        g0 = t0 - self.calib.gap
        first = self.cfg.timing.tREFI - 1 - self.calib.first_start     # the refresh counter's first tick
        for ch in self.mem.ch:
            ch.slots.keep_upto(g0)
            ch.row_slots.keep_upto(g0)
            ch.qtimes = [x for x in ch.qtimes if x <= g0]
            ch.rewind(g0)
            ch.acts = deque((x for x in ch.acts if x <= g0), maxlen=4)
            ch.rrd_ok = min(ch.rrd_ok, g0 + 1)
            ch.idle_from = min(ch.idle_from, g0)
            undone = sum(1 for r in ch.ref_log if r > g0)
            ch.ref_total -= undone
            ch.ref_log = [r for r in ch.ref_log if r <= g0]
            ch.last_ref = ch.ref_log[-1] if ch.ref_log else -INF
            ch.rfc_ok = ch.last_ref + ch.t.tRFC
            ch.ref_free = ch.last_ref + 2
            ch.act_ok = [min(x, max(g0, ch.rfc_ok)) for x in ch.act_ok]
            ch.next_tick = first + max(0, math.ceil((g0 - first) / ch.t.tREFI)) * ch.t.tREFI
            # REFs that fell due before g0 and were not done by then stay owed (the RTL's channel was busy
            # until the previous program's end, or the model did them after g0: both are dropped above).
            T = ch.t.tREFI
            n_due = (g0 - 1 - first) // T + 1 if g0 - 1 >= first else 0
            owed = max(0, int(n_due) - ch.ref_total)
            ch.owed = owed
            ch.dues = deque(first + k * T + 2 for k in range(int(n_due) - owed, int(n_due)))
            ch.owed_since = ch.dues[0] if ch.dues else ch.owed_since
            ch._tick_until(t0)
        self.mu_port[0].keep_upto(g0)
        self.mu_port[1][0] = min(self.mu_port[1][0], g0)
        self.vq_port[0].keep_upto(g0)
        self.vq_port[1][0] = min(self.vq_port[1][0], g0)

    def run_stages(self, stages, prog_addrs=None) -> list[ProgramResult]:
        out = []
        for i, st in enumerate(stages):
            out.append(self.run_program(st.words, prog_addr=None if prog_addrs is None else prog_addrs[i]))
        return out


class _Run(MatrixUnitModel, VectorQueueModel, PcuModel, SpuModel):
    """One program on the model."""

    def __init__(self, model: PerfModel, ins, start, prog_addr, tags=None):
        self.m = model
        self.cfg = model.cfg
        self.cal = model.calib
        self.mi = model.micro
        self.mem = model.mem
        self.ins = ins
        self.t0 = math.ceil(start)
        self.prog_addr = prog_addr
        self.K = model.kernel = _Kernel()
        self.K.now = self.t0
        self.units = {"mu": _BusyTracker(), "vq": _BusyTracker(), "pcu": _BusyTracker()}
        self.has_spu = self.cfg.spu is not None
        if self.has_spu:
            self.units["spu"] = _BusyTracker()
        self.ev_idle = _Event()
        self.work = {"mu_compute": 0.0, "mu_load": 0.0, "mu_store": 0.0, "vq_vector": 0.0, "vq_dma": 0.0,
                     "pcu": 0.0, "fence_wait": 0.0, "pim_block": 0.0}
        self.events = {"mac": 0, "vec_elem": 0, "spm_rd_bytes": 0, "spm_wr_bytes": 0, "pim_mac_cols": 0,
                       "pim_gb_writes": 0, "pim_acts": 0, "pim_io_cols": 0, "pim_af": 0, "dma_bytes": 0,
                       "dram_acts": 0, "dram_reads": 0, "dram_writes": 0, "dram_refs": 0}
        if self.has_spu:   # declared up front: _timed diffs the event counts over keys present before a DMA
            self.events.update(sram_pim_mac=0, sram_pim_wr_bytes=0)
            self.work.update(spu_compute=0.0, spu_load=0.0)
        # matrix unit
        self.sem = [0] * mu_isa.N_SEMAPHORES
        self.ev_sem = _Event()
        self.mu_dec = None                # (Ins, cycle) waiting in the decode register
        self.mu_q = [deque(), deque(), deque()]
        self.ev_muq = [_Event(), _Event(), _Event()]
        self.ev_mudec = _Event()
        self.ev_mudec_in = _Event()
        # the load engine's two instructions in flight (hw/npu/dma.py): the previous LOAD's handler end, its
        # request stream (outstanding requests carried over) and the event "the current LOAD has issued all"
        self.ld_done = -INF
        self.ld_stream = None
        self.ld_gen_end = None
        self.ev_ldgen = _Event()
        # vector queue / PCU queues
        self.vq_q = deque()
        self.ev_vq = _Event()
        self.ev_vq_space = _Event()
        self.pcu_q = deque()
        self.ev_pcu = _Event()
        self.ev_pcu_space = _Event()
        self.spu_q = deque()
        self.ev_spu = _Event()
        self.ev_spu_space = _Event()
        self.end_time = None
        self.c0 = [dict(ch.c) for ch in self.mem.ch]
        self.ev_fetch = _Event()
        self.ev_pop = _Event()
        self.win_log = []                 # PIM windows registered so far (DMAs in flight are pushed back)
        self.fetch_state = None
        self.tags = tags
        self.intervals = []               # (start, end, tag) of every instruction a unit executed

    # ---------------------------------------------------------------- helpers
    def execute(self) -> ProgramResult:
        K = self.K
        K.spawn(self._cp())
        for q in range(3):
            K.spawn(self._mu_engine(q))
        K.spawn(self._mu_decode())
        K.spawn(self._vq())
        K.spawn(self._pcu())
        if self.has_spu:
            K.spawn(self._spu())
        K.run()
        if self.end_time is None:
            raise RuntimeError("program did not reach END (deadlock in the model)")
        end = self.end_time + self.cal.end_extra
        # refreshes while the host reads the counters (the channels are idle after END)
        for ch in self.mem.ch:
            ch.refresh_idle(end + self.cal.counter_read)
        busy = {u: b.total for u, b in self.units.items()}
        breakdown = self._breakdown(self.t0, end + 1)
        counters = {}
        for i, ch in enumerate(self.mem.ch):
            for k, v in ch.c.items():
                counters[f"ch{i}.{k}"] = v - self.c0[i][k]
        for ev, k in (("dram_acts", "acts"), ("dram_reads", "reads"), ("dram_writes", "writes"),
                      ("dram_refs", "refreshes")):
            self.events[ev] += sum(counters[f"ch{i}.{k}"] for i in range(len(self.mem.ch)))
        return ProgramResult(cycles=end - self.t0 + 1, start=self.t0, end=end + 1, busy=busy, work=self.work,
                             events=self.events, counters=counters, breakdown=breakdown,
                             spans={u: [(a - self.t0, b - self.t0) for a, b in t.spans] for u, t in self.units.items()})

    # tags in priority order: a cycle in which several are active counts for the first
    PRIORITY = ("qkv", "proj", "ffn", "attention", "vector", "wait_pim")

    def _tag(self, ins, default):
        if self.tags is not None:
            return self.tags[ins.idx]
        return default

    def _breakdown(self, t0, t1):
        """Exclusive time per tag: every cycle of the program goes to the highest-priority tag active in
        it (:data:`PRIORITY`); cycles no unit works in are ``overhead`` (fetch, dispatch, FENCE)."""
        pr = {t: i for i, t in enumerate(self.PRIORITY)}
        pts = []
        for a, b, tag in self.intervals:
            if b > a:
                pts.append((a, 0, tag))
                pts.append((b, 1, tag))
        pts.sort(key=lambda x: (x[0], x[1]))
        active = {}
        out = {t: 0.0 for t in self.PRIORITY}
        out["overhead"] = 0.0
        last = t0
        for t, kind, tag in pts:
            t = min(max(t, t0), t1)
            if t > last:
                if active:
                    top = min(active, key=lambda x: pr.get(x, 99))
                    out[top] = out.get(top, 0.0) + t - last
                else:
                    out["overhead"] += t - last
                last = t
            if kind == 0:
                active[tag] = active.get(tag, 0) + 1
            else:
                active[tag] -= 1
                if not active[tag]:
                    del active[tag]
        if t1 > last:
            out["overhead"] += t1 - last
        return out

    # ---------------------------------------------------------------- command processor
    def _fetcher(self):
        """Instruction fetch: one request per cycle, at most ``fetch_depth`` fetched and not yet popped."""
        K, cal, mem, kf = self.K, self.cal, self.mem, self.m.k
        st = self.fetch_state
        n = len(self.ins)
        depth = self.mi.fetch_depth
        a = self.t0
        for i in range(n):
            while i >= st["popped"] + depth:
                yield self.ev_pop
                a = max(a, st["pop_time"] + 1)
            if a > K.now:
                yield a
            c, b, r = mem.where(self.prog_addr + 32 * i)
            while True:         # a request waits in the controller while a macro holds the channel
                e = mem.blocked(c, a + mem.arr)
                if e is None:
                    break
                a = e + 1 - mem.arr
                yield a
            col = mem.ch[c].access(b, r, False, a + mem.arr)
            st["col"][i] = col
            rr = max(col + mem.resp, st["last_resp"] + 1)
            st["last_resp"] = rr
            st["head"][i] = rr + cal.fetch_to_head
            st["next"] = i + 1
            K.notify(self.ev_fetch)
            a += kf

    def _cp(self):
        K, cal, mi = self.K, self.cal, self.mi
        n = len(self.ins)
        kf = self.m.k
        st = self.fetch_state = {"head": [None] * n, "col": [0.0] * n, "next": 0, "popped": 0, "pop_time": 0,
                                 "last_resp": -INF}
        head = st["head"]
        K.spawn(self._fetcher())
        t = self.t0
        for i, ins in enumerate(self.ins):
            while head[i] is None or max(t, head[i]) > K.now:
                if head[i] is None:
                    yield self.ev_fetch
                else:
                    yield max(t, head[i])
            op = ins.op
            if op in (SocOp.FENCE, SocOp.END):
                mask = 15 if op == SocOp.END else ins.f["units"]
                names = [u for bit, u in ((1, "mu"), (2, "vq"), (4, "pcu"), (8, "spu")) if mask & bit and u in self.units]
                w0 = K.now
                while True:
                    if all(self.units[u].active == 0 for u in names):
                        break
                    yield self.ev_idle
                ti = K.now
                for u in names:
                    b = self.units[u]
                    ti = max(ti, b.idle_at, b.handoff + 2)
                if op == SocOp.END:
                    ti += 1
                ti += cal.fence_extra + (self.mi.sync_cycles if (op == SocOp.FENCE and self.mi.cores > 1) else 0)
                self.work["fence_wait"] += ti - w0
                if ti > K.now:
                    yield ti
                if op == SocOp.END:
                    self.end_time = K.now
                    return
            else:
                if op == SocOp.MATRIX:
                    while self.mu_dec is not None:
                        yield self.ev_mudec
                    self.mu_dec = (ins, K.now)
                    self.units["mu"].up(K.now)
                    self.units["mu"].handoff = K.now
                    K.notify(self.ev_mudec_in)
                elif op in (SocOp.SPIM, SocOp.SLOAD):
                    yield from self._enqueue(ins, "spu", self.spu_q, mi.spu_depth, self.ev_spu_space, self.ev_spu)
                elif op == SocOp.PIM:
                    yield from self._enqueue(ins, "pcu", self.pcu_q, mi.macro_depth, self.ev_pcu_space, self.ev_pcu)
                else:
                    yield from self._enqueue(ins, "vq", self.vq_q, mi.vq_depth, self.ev_vq_space, self.ev_vq)
            t = K.now + kf
            st["popped"] = i + 1          # the pop frees a FIFO credit: the next fetch may go out
            st["pop_time"] = K.now
            K.notify(self.ev_pop)
        self.end_time = K.now

    def _enqueue(self, ins, unit, q, depth, ev_space, ev):
        """The dispatcher hands ``ins`` to a unit's instruction FIFO ``q`` (waiting while it holds ``depth``):
        the unit is busy from then on and wakes up on ``ev``."""
        K = self.K
        while len(q) >= depth:
            yield ev_space
        q.append((ins, K.now))
        self.units[unit].up(K.now)
        self.units[unit].handoff = K.now
        K.notify(ev)

    def _pim_window(self, s, e):
        """A macro holds the channels from cycle ``s`` to ``e``: fetches not yet decided wait for its end."""
        st = self.fetch_state
        if st is None:
            return
        pend = [i for i in range(st["popped"], st["next"]) if st["head"][i] is not None and st["col"][i] > s]
        if not pend:
            return
        for i in pend:
            st["head"][i] = None
        st["retry"] = sorted(set(st.get("retry", [])) | set(pend))
        self.K.at(e, self._fetch_retry)

    def _fetch_retry(self):
        """Re-issue the fetches a macro held back, unless another macro holds the channel now."""
        st, mem, K = self.fetch_state, self.mem, self.K
        pend = st.get("retry", [])
        if not pend:
            return
        t = K.now
        last = -INF
        for n_, i in enumerate(pend):
            c, b, r = mem.where(self.prog_addr + 32 * i)
            e = mem.blocked(c, t)
            if e is not None:
                st["retry"] = pend[n_:]
                K.at(e, self._fetch_retry)
                break
            col = mem.ch[c].access(b, r, False, t)
            st["col"][i] = col
            rr = max(col + mem.resp, last + 1)
            st["head"][i] = rr + self.cal.fetch_to_head
            last = rr
        else:
            st["retry"] = []
        if last > st["last_resp"]:
            st["last_resp"] = last
        K.notify(self.ev_fetch)

    # ---------------------------------------------------------------- DMA and PIM mode (shared by the units)
    def _timed(self, key, t0, fn):
        """A generator: ``fn(t0)`` (itself a generator) -> end cycle, or the cached duration of the same
        shape (``Micro.cache``). Returns (end cycle, whether it came from the cache)."""
        if not self.mi.cache:
            end = yield from fn(t0)
            return end, False
        hit = self.m.cache.get(key)
        if hit is not None:
            dur, ev = hit
            for k, v in ev.items():
                self.events[k] += v
            self.mem.max_col = t0 + dur
            return t0 + dur, True
        before = dict(self.events)
        chans = [dict(ch.c) for ch in self.mem.ch]
        end = yield from fn(t0)
        ev = {k: v - before[k] for k, v in self.events.items()}
        for ev_k, k in (("dram_acts", "acts"), ("dram_reads", "reads"), ("dram_writes", "writes")):
            ev[ev_k] += sum(ch.c[k] - c0[k] for ch, c0 in zip(self.mem.ch, chans, strict=True))
        self.m.cache[key] = (end - t0, ev)
        return end, False

    def _held(self, gen):
        """Run a DMA process; requests it had timed ahead of a PIM macro's start (decided after it)
        wait for the macro: the transfer cannot finish before they are served after it."""
        mem = self.mem
        ahead = []
        nw = len(self.win_log)
        it = iter(gen)
        try:
            w = None
            while True:
                mem.ahead, mem.now = ahead, self.K.now
                w = it.send(w) if w is not None else next(it)
                mem.ahead = None
                w = yield w
        except StopIteration as stop:
            done = stop.value
        mem.ahead = None
        while True:                     # a macro may start before the transfer is done
            if done > self.K.now:
                yield done
            late = done
            for s, e in self.win_log[nw:]:
                held = [c for tc, c in ahead if tc <= s < c]
                if held:
                    late = max(late, e + 1 + (max(held) - s) + mem.resp)
            nw = len(self.win_log)
            if late <= done:
                return done
            ahead = [(tc, c + late - done) for tc, c in ahead]
            done = late

    def _pcu_macro(self, key, start, f):
        """A macro's end cycle (cached by shape under ``Micro.cache``)."""
        if self.mi.cache and key in self.m.cache:
            dur, ev = self.m.cache[key]
            for k, v in ev.items():
                self.events[k] += v
            return start + dur
        before = dict(self.events)
        end = _PcuMacro(self, f, start).run()
        if self.mi.cache:
            self.m.cache[key] = (end - start, {k: v - before[k] for k, v in self.events.items()})
        return end

    def _pim_overlap(self, a, b, nw):
        """Cycles of [a, b) inside PIM windows registered from index ``nw`` on (DMA waiting for PIM)."""
        return sum(max(0, min(e, b) - max(s, a)) for s, e in self.win_log[nw:])

    def _dma_pushback(self, done, nw):
        """Wait for a DMA to finish; a PIM macro that started before its last request was issued
        holds the rest of it back for the macro's duration."""
        last = self.mem.max_col
        while True:
            if done > self.K.now:
                yield done
            ext = sum(e - s for s, e in self.win_log[nw:] if s < last)
            nw = len(self.win_log)
            if ext <= 0:
                return done
            self.work["pim_block"] += ext
            done += ext
            last += ext
