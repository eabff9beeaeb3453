"""What the performance model's in-order instruction queues share (the PCU's macro queue, the vector queue, the
SRAM-PIM queue): taking the head instruction, splitting a transfer's time into work and waiting for PIM, and
releasing the unit when it goes idle; the NPU-side queues (vector, SRAM-PIM) share their whole process."""

from __future__ import annotations


class QueueModel:
    """Methods of :class:`sim.perfmodel.core._Run` shared by the queue models."""

    def _pop_head(self, q, ev, ev_space, lat, free):
        """Take the head of queue ``q`` (a generator; returns the instruction): wait until ``q`` has one
        (``ev`` tells), until ``lat`` after it entered and until ``free``; then pop it and tell ``ev_space``."""
        K = self.K
        while not q:
            yield ev
        ins, t_in = q[0]
        tt = max(t_in + lat, free)
        if tt > K.now:
            yield tt
        q.popleft()
        K.notify(ev_space)
        return ins

    def _npu_queue(self, unit, q, ev, ev_space, fifo_lat, serve, done_over, idle_lat):
        """The process of an NPU-side queue (a generator): forever take the head instruction ``fifo_lat`` after
        it entered (:meth:`_pop_head`), run ``serve(ins, start)`` (a generator; returns the cycle the
        instruction is done), take the next one ``done_over`` after that; ``unit`` goes idle ``idle_lat``
        later. The three latencies are NPU cycles (scaled by ``m.k``)."""
        K, kf = self.K, self.m.k
        free = K.now
        while True:
            ins = yield from self._pop_head(q, ev, ev_space, fifo_lat * kf, free)
            done = yield from serve(ins, K.now)
            free = done + done_over * kf
            K.at(free + idle_lat * kf, lambda: self._unit_down(unit))
            yield free

    def _split_pim_wait(self, start, done, overlap, tag):
        """A transfer from ``start`` to ``done`` of which up to ``overlap`` cycles waited for PIM windows: the
        wait is ``pim_block`` work and a ``wait_pim`` interval at the end, the rest an interval tagged ``tag``."""
        wait = min(done - start, overlap)
        self.work["pim_block"] += wait
        self.intervals.append((start, done - wait, tag))
        if wait > 0:
            self.intervals.append((done - wait, done, "wait_pim"))

    def _unit_down(self, unit):
        """Release ``unit``'s busy tracker now and wake whoever waits for the units to go idle."""
        self.units[unit].down(self.K.now)
        self.K.notify(self.ev_idle)
