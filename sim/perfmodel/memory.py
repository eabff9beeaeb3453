"""Memory: one controller per channel (:class:`Channel`), the address map and all channels (:class:`Memory`)."""

from __future__ import annotations

import bisect
import math
from collections import deque

from hw.config import SystemConfig
from sim.perfmodel.params import INF, Calib, Micro


class _Slots:
    """Taken cycles of a one-per-cycle resource (a command bus, a port): ``take(t)`` takes and returns the
    first free cycle at or after ``t``. Each taken cycle maps to a cycle at or before the first free one
    after it (every cycle in between is taken), so a search jumps over runs of taken cycles (with path
    compression) where probing them one by one cost tens of probes per request when streams queue up.
    The taken set, and so every result, is the same as with a plain set of cycles."""

    __slots__ = ("nf",)

    def __init__(self):
        self.nf = {}

    def __len__(self):
        return len(self.nf)

    def __contains__(self, x):
        return x in self.nf

    def __iter__(self):
        return iter(self.nf)

    def take(self, t) -> int:
        nf = self.nf
        x = math.ceil(t)
        if x in nf:
            path = []
            while x in nf:
                path.append(x)
                x = nf[x]
            y = x + 1
            for q in path:
                nf[q] = y
        nf[x] = x + 1
        return x

    def keep_from(self, floor):
        """Forget the taken cycles before ``floor``."""
        self.nf = {k: v for k, v in self.nf.items() if k >= floor}

    def keep_upto(self, last):
        """Forget the taken cycles after ``last``."""
        self.nf = {k: (v if v <= last + 1 else last + 1) for k, v in self.nf.items() if k <= last}


def _take(slots: _Slots, t) -> int:
    """The first cycle >= ``t`` not yet in ``slots`` (taken)."""
    c = slots.take(t)
    if len(slots.nf) > 20000:
        slots.keep_from(c - 8192)
    return c


class DmaStream:
    """One DMA engine's requests to the memory system, in order: a request every ``gap`` cycles from ``a0 +
    gap`` on, at most ``outmax`` in flight (``cons``: the cycles the engine consumed the responses, oldest
    first; the caller appends them), through the requester's ``port`` where one is shared
    (:meth:`sim.perfmodel.core.PerfModel`'s ``mu_port`` / ``vq_port``); responses in request order, ``rgap``
    apart."""

    __slots__ = ("a", "gap", "rgap", "outmax", "port", "cons", "last_r")

    def __init__(self, a0, gap, rgap, outmax, port):
        self.a, self.gap, self.rgap, self.outmax, self.port = a0, gap, rgap, outmax, port
        self.cons = deque()
        self.last_r = -INF

    def issue(self):
        """The next request's cycle."""
        a = self.a + self.gap
        if len(self.cons) >= self.outmax:
            a = max(a, self.cons.popleft() + 1)
        if self.port is not None:
            a = _take(self.port[0], a)
        self.a = a
        return a

    def deliver(self, rr, ready=-INF):
        """The cycle the engine has the response the memory answers in cycle ``rr`` (not before ``ready``)."""
        rr = max(rr, self.last_r + self.rgap, ready)
        if self.port is not None:
            rr = max(rr, self.port[1][0] + 1)       # behind every earlier response of the port
            self.port[1][0] = rr
        self.last_r = rr
        return rr


class Channel:
    """Timing state of one channel's controller and banks (see the module docstring)."""

    def __init__(self, cfg: SystemConfig, micro: Micro, calib: Calib):
        t, p = cfg.timing, cfg.pim
        self.t = t
        self.nb = p.banks
        self.qdepth = micro.ctrl_queue
        self.open = [-1] * p.banks
        self.pre_ok = [0] * p.banks       # earliest PRE (tRAS, tWR, tRTP)
        self.act_ok = [0] * p.banks       # earliest ACT (tRP)
        self.rd_ok = [0] * p.banks        # earliest RD / MAC (tRCDRD)
        self.wr_ok = [0] * p.banks        # earliest WR (tRCDWR)
        self.slots = _Slots()
        self.row_slots = _Slots()
        self.row_bus = micro.row_bus
        self.rrd_ok = 0
        self.acts = deque(maxlen=4)
        self.rfc_ok = 0
        self.mac_ok = 0
        self.af_ok = 0
        self.qtimes = []
        self.idle_from = 0
        self.next_tick = t.tREFI - 1 - calib.first_start     # refi counter runs from reset
        self.owed = 0
        self.owed_since = 0
        self.dues = deque()               # cycle from which each owed REF may start (its tick + 2)
        self.ref_free = 0
        self.pim_windows = []
        self.closed_from = 0
        self.pim_from = 0
        self.last_ref = -INF
        self.ref_log = []                          # cycles of recent REFs
        self.ref_total = 0                         # REFs since reset
        self.hist = [[] for _ in range(p.banks)]     # per bank: (cycle, state after) of recent changes
        self.c = {"hits": 0, "misses": 0, "refreshes": 0, "commands": 0, "pim_commands": 0, "reads": 0,
                  "writes": 0, "acts": 0}

    # -- command slots (one command per cycle) --
    def slot(self, tt, row=False):
        s = self.row_slots if (row and self.row_bus) else self.slots
        tt = s.take(tt)
        self.c["commands"] += 1
        if len(s.nf) > 8192:
            s.keep_from(max(s.nf) - 4096)
        return tt

    # -- refresh --
    def _tick_until(self, tt):
        """Count the REFs that fall due before cycle ``tt``."""
        T = self.t.tREFI
        while self.next_tick + 1 <= tt:
            # The controller sees the new credit one cycle after the tick and its refresh machine
            # leaves Idle the cycle after that: measured on the tiny naive 2-layer job, 121 and 128 of
            # 164 REFs per channel then fall on the RTL's cycle exactly (with +1 here, 1 cycle early).
            if self.owed == 0:
                self.owed_since = self.next_tick + 2
            self.dues.append(self.next_tick + 2)
            self.owed += 1
            self.next_tick += T

    def _do_refresh(self, s):
        t = self.t
        open_banks = [b for b in range(self.nb) if self.open[b] >= 0]
        if open_banks:
            p = self.slot(max(s + 1, max(self.pre_ok[b] for b in open_banks)))
            r = max(p + t.tRP, self.rfc_ok)
        else:
            r = max(s + 1, self.rfc_ok, max(self.act_ok))
        r = self.slot(r)
        for b in range(self.nb):
            self.open[b] = -1
            self.act_ok[b] = max(self.act_ok[b], r + t.tRFC)
            self._record(b, r)
        self.rfc_ok = r + t.tRFC
        self.last_ref = r
        self.ref_log.append(r)
        self.ref_total += 1
        if len(self.ref_log) > 64:
            del self.ref_log[:32]
        self.ref_free = r + 2
        self.owed -= 1
        if self.dues:
            self.dues.popleft()
        # The next REF needs the next credit: one counted with this one (both ticks passed before a
        # request looked) is not owed before its own tick.
        self.owed_since = max(r + 2, self.dues[0]) if self.dues else r + 2
        self.c["refreshes"] += 1
        return r

    def refresh_idle(self, tt):
        """Refreshes the controller does while its queue is empty, before cycle ``tt``."""
        self._tick_until(tt)
        while self.owed >= 1:
            s = max(self.owed_since, self.idle_from, self.ref_free)
            if s >= tt:
                break
            self._do_refresh(s)
            self._tick_until(tt)
        if self.owed >= max(1, self.t.refresh_postpone):     # forced (nothing owed: nothing to force)
            self._do_refresh(max(tt, self.ref_free))

    def refresh_pim(self, tt, closed_from):
        """PIM mode: a REF starts in the first cycle at least one is owed and every bank is closed."""
        self._tick_until(tt)
        done = False
        while self.owed >= 1:
            s = max(self.owed_since, closed_from, self.ref_free)
            if s > tt:
                break
            self._do_refresh(s)
            done = True
            self._tick_until(tt)
        return done

    # -- normal requests --
    def access(self, bank, row, write, tt):
        """A 32-byte request that can be issued from cycle ``tt``: returns the column command's cycle."""
        t = self.t
        tt = math.ceil(tt)
        q = self.qtimes                     # sorted decision cycles of the requests queued
        k = bisect.bisect_left(q, tt)
        if k:
            del q[:k]
        if len(q) >= self.qdepth:
            x = q[len(q) - self.qdepth] + 1
            if x > tt:
                tt = x
        for s, e in self.pim_windows:
            if s <= tt < e:
                tt = e + 1
        if self.owed or self.next_tick + 1 <= tt:     # else refresh_idle(tt) has nothing to do
            self.refresh_idle(tt)
        c = self.c
        if self.open[bank] == row:
            c["hits"] += 1
            x = self.wr_ok[bank] if write else self.rd_ok[bank]
            col = x if x > tt else tt
        else:
            c["misses"] += 1
            if self.open[bank] >= 0:
                pr = self.slot(max(tt, self.pre_ok[bank]), row=True)
                self.act_ok[bank] = max(self.act_ok[bank], pr + t.tRP)
            a = max(tt, self.act_ok[bank], self.rrd_ok, self.rfc_ok)
            if len(self.acts) == 4:
                a = max(a, self.acts[0] + t.tFAW)
            a = self.slot(a, row=True)
            c["acts"] += 1
            self.acts.append(a)
            self.rrd_ok = a + t.tRRD
            self.rd_ok[bank] = a + t.tRCDRD
            self.wr_ok[bank] = a + t.tRCDWR
            self.pre_ok[bank] = max(self.pre_ok[bank], a + t.tRAS)
            self.open[bank] = row
            # the ACT is a bank-state change of its own: a macro starting between it and the column
            # command keeps the row open (the controller issued the ACT), and closes it first
            self._record(bank, a)
            col = self.wr_ok[bank] if write else self.rd_ok[bank]
        slots = self.slots              # the column command's slot (as slot())
        col = slots.take(col)
        c["commands"] += 1
        if len(slots.nf) > 8192:
            slots.keep_from(max(slots.nf) - 4096)
        x = col + (t.tWR if write else t.tRTP)
        if x > self.pre_ok[bank]:
            self.pre_ok[bank] = x
        if write:
            c["writes"] += 1
        else:
            c["reads"] += 1
        bisect.insort(q, col)
        if col + 1 > self.idle_from:
            self.idle_from = col + 1
        h = self.hist[bank]
        h.append((col, (self.open[bank], self.pre_ok[bank], self.act_ok[bank], self.rd_ok[bank], self.wr_ok[bank])))
        if len(h) > 24:
            del h[:8]
        return col

    def _record(self, bank, t):
        h = self.hist[bank]
        h.append((t, (self.open[bank], self.pre_ok[bank], self.act_ok[bank], self.rd_ok[bank], self.wr_ok[bank])))
        if len(h) > 24:
            del h[:8]

    def rewind(self, t0):
        """Forget the bank-state changes of normal requests decided after cycle ``t0`` (a PIM macro that
        starts at ``t0`` holds them back; they are timed again after it)."""
        for b in range(self.nb):
            h = self.hist[b]
            if not h or max(x[0] for x in h) <= t0:
                continue
            keep = [x for x in h if x[0] <= t0]
            if keep:
                st = max(keep, key=lambda x: x[0])[1]
                self.open[b], self.pre_ok[b], self.act_ok[b], self.rd_ok[b], self.wr_ok[b] = st
            else:
                self.open[b] = -1
                self.pre_ok[b] = min(self.pre_ok[b], t0)
                self.act_ok[b] = min(self.act_ok[b], t0)
            self.hist[b] = keep


class Memory:
    """All channels plus the address map (:class:`hw.memif.AddressMap`: Row-Channel-Bank-Column, or
    Row-Bank-ColumnHigh-Channel-ColumnLow with a channel interleave)."""

    def __init__(self, cfg: SystemConfig, micro: Micro, calib: Calib):
        p = cfg.pim
        self.cfg = cfg
        self.ch = [Channel(cfg, micro, calib) for _ in range(p.channels)]
        self.col_lo = (p.column_bytes - 1).bit_length()
        self.bank_lo = self.col_lo + (p.columns - 1).bit_length()
        self.chan_lo = self.bank_lo + (p.banks - 1).bit_length()
        self.row_lo = self.chan_lo + (p.channels - 1).bit_length()
        self.nb, self.nc, self.nr = p.banks, p.channels, p.rows
        self.resp = cfg.timing.tRL + calib.col_to_resp
        # a registered FR-FCFS pick (PimGeometry.pick_stages, issue 15) issues a request's first command a cycle later
        self.arr = calib.req_to_ctrl + p.pick_stages
        self.il = micro.interleave or p.channel_interleave
        self.row_b = p.row_bytes
        self.max_col = -INF       # latest column command of the transfer being timed
        self.ahead = None         # (kernel time, column command cycle) of requests decided ahead of time
        self.now = 0

    def blocked(self, c, t):
        """End of the PIM window channel ``c`` is in at cycle ``t`` (None when not in one)."""
        for s, e in self.ch[c].pim_windows:
            if s <= t < e:
                return e
        return None

    def where(self, addr):
        """(channel, bank, row) of a byte address."""
        if self.il:
            g = addr // self.il
            x = (g // self.nc) * self.il + addr % self.il          # byte address inside the channel
            return g % self.nc, (x // self.row_b) % self.nb, (x // (self.row_b * self.nb)) % self.nr
        return ((addr >> self.chan_lo) & (self.nc - 1), (addr >> self.bank_lo) & (self.nb - 1),
                (addr >> self.row_lo) & (self.nr - 1))

    def request(self, addr, write, t_issue):
        """Request issued by a requester in cycle ``t_issue``: returns the response's cycle at the requester."""
        if self.il:                                                  # as where(), inlined (the hot path)
            il = self.il
            g = addr // il
            x = (g // self.nc) * il + addr % il
            c, b, r = g % self.nc, (x // self.row_b) % self.nb, (x // (self.row_b * self.nb)) % self.nr
        else:
            c, b, r = self.where(addr)
        col = self.ch[c].access(b, r, write, t_issue + self.arr)
        if col > self.max_col:
            self.max_col = col
        if self.ahead is not None and col > self.now:
            self.ahead.append((self.now, col))
        return col + self.resp
