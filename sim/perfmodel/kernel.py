"""The event kernel: a time-ordered queue of callbacks resuming generator processes."""

from __future__ import annotations

import heapq


class _Event:
    __slots__ = ("waiters",)

    def __init__(self):
        self.waiters = []


class _Kernel:
    def __init__(self):
        self.now = 0.0
        self._q = []
        self._n = 0

    def at(self, t, fn):
        heapq.heappush(self._q, (t, self._n, fn))
        self._n += 1

    def spawn(self, gen):
        self.at(self.now, lambda: self._resume(gen))

    def _resume(self, gen):
        while True:
            try:
                w = next(gen)
            except StopIteration:
                return
            if isinstance(w, _Event):
                w.waiters.append(gen)
                return
            if w > self.now:
                self.at(w, lambda g=gen: self._resume(g))
                return

    def notify(self, ev):
        if ev.waiters:
            ws, ev.waiters = ev.waiters, []
            for g in ws:
                self.at(self.now, lambda g=g: self._resume(g))

    def run(self):
        q = self._q
        while q:
            t, _, fn = heapq.heappop(q)
            self.now = t
            fn()
