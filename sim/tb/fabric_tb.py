"""cocotb testbenches for the memory fabric (hw/fabric.py): requesters onto channels, responses in order.

The top is :class:`hw.fabric.MemFabric` itself. One cycle loop (:class:`TB`)
drives every stream: per requester a request queue (random valid gaps,
random tags, reads and byte-masked writes, misaligned addresses) and random
``ready`` on its responses; per channel a Python memory model
(:class:`ChannelModel`, a dict of 32-byte columns) that accepts requests with
random back-pressure, executes them at acceptance, and answers after a
random delay, picking at random among the answers that are due (out of
order). Checks, every cycle:

* every request reaching a channel is the next request that requester sent
  to that channel (address, write flag, data, mask), its channel tag names
  the requester and a slot not already in flight, and its address belongs
  to that channel and is aligned: a bad address never reaches a channel;
* every response a requester receives is the next one in its request order,
  with its own tag, write flag, ``error`` exactly for the bad addresses (and
  for the few reads a channel model answers with its error flag, which the
  fabric passes through) and the right data: requesters use disjoint rows,
  so read data is the requester's own program-order reference memory;
* streams the fabric drives keep ``valid`` and ``payload`` while not ready;
* ``req_stall[i]`` equals the cycles the testbench saw a request valid and
  not ready.

The configuration comes from ``IANUS_CONFIG``; ``N_REQUESTERS`` must match the
build.
"""

from __future__ import annotations

import functools
from collections import deque

import numpy as np
from cocotb.triggers import FallingEdge, Timer

from hw.config import preset
from hw.memif import AddressMap, request_layout, response_layout
from sim.tb.common import (
    env_int,
    env_str,
    pack_struct,
    port,
    port_name,
    start,
    tb_test,
    unpack_struct,
    write_metrics,
)


class Requester:
    """Test side of one requester port: stimulus, expected responses in order, stall count."""

    def __init__(self, tb, i):
        g = functools.partial(port, tb.dut)
        self.i = i
        self.req_valid, self.req_payload, self.req_ready = (g("m", i, "req", n) for n in ("valid", "payload",
                                                                                           "ready"))
        self.resp_valid, self.resp_payload, self.resp_ready = (g("m", i, "resp", n) for n in ("valid", "payload",
                                                                                               "ready"))
        self.stall_ctr = g("req_stall", i)
        self.reqs = deque()          # requests to send: dict(addr, write, data, mask, tag, error, rdata)
        self.cur = None
        self.expect = deque()        # accepted requests, in order
        self.ref = {}                # addr -> bytearray: program-order reference memory
        self.gap = 0.0
        self.backpressure = 0.0
        self.stalls = 0
        self.sent = 0
        self.received = 0
        self.errors = 0
        self.accept_cycles = []
        self.resp_cycles = []
        self.last_resp = None        # (payload) when valid and not ready in the previous cycle


class ChannelModel:
    """One channel's memory controller stand-in: random back-pressure, random delays, out-of-order answers."""

    def __init__(self, tb, c):
        g = functools.partial(port, tb.dut)
        self.c = c
        self.r_valid, self.r_payload, self.r_ready = (g("r", c, n) for n in ("valid", "payload", "ready"))
        self.q_valid, self.q_payload, self.q_ready = (g("q", c, n) for n in ("valid", "payload", "ready"))
        self.mem = {}                # addr -> bytearray
        self.pending = []            # [due cycle, order, response dict]
        self.cur = None              # response on q, held until taken
        self.outstanding = set()     # channel tags in flight here
        self.expect = [deque() for _ in range(tb.n)]   # per requester: requests it sent to this channel
        self.ready_prob = 1.0
        self.lat = (1, 1)            # delay range (inclusive), cycles after acceptance
        self.in_order = False
        self.resp_gap = 0.0
        self.err_prob = 0.0          # reads answered with the channel's error flag (passed through)
        self.stopped = False         # ready held low
        self.accepted = 0
        self.accept_cycles = []
        self.resp_cycles = []
        self.grants = []             # requester id of every accepted request
        self.last_req = None
        self.order = 0


class TB:
    def __init__(self, dut, cfg, n, seed=1):
        self.dut = dut
        self.cfg = cfg
        self.n = n
        self.amap = AddressMap(cfg.pim)
        self.rl = request_layout(cfg)
        self.ql = response_layout(cfg)
        self.rng = np.random.default_rng(seed)
        self.rq = [Requester(self, i) for i in range(n)]
        self.ch = [ChannelModel(self, c) for c in range(cfg.pim.channels)]
        self.cycle = 0
        self.cb = cfg.pim.column_bytes
        self.full_mask = (1 << self.cb) - 1
        self.slot_bits = 5                               # rob_depth 32 (the build's default)
        self.inflight = [set() for _ in range(n)]        # ROB slots in flight at channels, per requester

    async def reset(self):
        zero = []
        for i in range(self.n):
            zero += [port_name("m", i, "req", "valid"), port_name("m", i, "req", "payload"),
                     port_name("m", i, "resp", "ready")]
        for c in range(len(self.ch)):
            zero += [port_name("r", c, "ready"), port_name("q", c, "valid"), port_name("q", c, "payload")]
        await start(self.dut, zero_inputs=zero)
        await FallingEdge(self.dut.clk)

    # -- stimulus ------------------------------------------------------------------------
    def request(self, i, addr, write=0, data=0, mask=None, tag=None, bad=False):
        """Queue a request of requester ``i``; its expected response is computed in program order."""
        rq = self.rq[i]
        tag = int(self.rng.integers(256)) if tag is None else tag
        mask = (self.full_mask if write else 0) if mask is None else mask
        r = dict(addr=addr, write=write, data=data, mask=mask, tag=tag, error=bad, rdata=0)
        if not bad:
            col = rq.ref.setdefault(addr, bytearray(self.cb))
            if write:
                b = int(data).to_bytes(self.cb, "little")
                for k in range(self.cb):
                    if (mask >> k) & 1:
                        col[k] = b[k]
            else:
                r["rdata"] = int.from_bytes(bytes(col), "little")
        rq.reqs.append(r)

    def random_traffic(self, i, count, rows, channels=None, bad_prob=0.08, write_prob=0.45):
        p = self.cfg.pim
        rng = self.rng
        channels = list(range(p.channels)) if channels is None else channels
        for _ in range(count):
            addr = self.amap.encode(int(rng.choice(rows)), int(rng.choice(channels)), int(rng.integers(p.banks)),
                                    int(rng.integers(min(p.columns, 4))))
            write = int(rng.random() < write_prob)
            data = int.from_bytes(rng.bytes(self.cb), "little") if write else 0
            mask = None
            if write and rng.random() < 0.4:
                mask = int(rng.integers(1, 1 << self.cb))
            if rng.random() < bad_prob:
                self.request(i, addr + int(rng.integers(1, self.cb)), write, data, mask, bad=True)
            else:
                self.request(i, addr, write, data, mask)

    # -- the cycle loop -----------------------------------------------------------------
    async def step(self):
        rng = self.rng
        for rq in self.rq:
            if rq.cur is None and rq.reqs and rng.random() >= rq.gap:
                rq.cur = rq.reqs.popleft()
            if rq.cur is not None:
                rq.req_payload.value = pack_struct(self.rl, **rq.cur)
                rq.req_valid.value = 1
            else:
                rq.req_valid.value = 0
            rq.resp_ready.value = int(rng.random() >= rq.backpressure)
        for ch in self.ch:
            ch.r_ready.value = int(not ch.stopped and rng.random() < ch.ready_prob)
            if ch.cur is None and rng.random() >= ch.resp_gap:
                due = [k for k, e in enumerate(ch.pending) if e[0] <= self.cycle]
                if due:
                    k = due[0] if ch.in_order else int(rng.choice(due))
                    ch.cur = ch.pending.pop(k)[2]
            if ch.cur is not None:
                ch.q_payload.value = pack_struct(self.ql, **ch.cur)
                ch.q_valid.value = 1
            else:
                ch.q_valid.value = 0
        await Timer(1, "ns")
        for rq in self.rq:
            self._sample_requester(rq)
        for ch in self.ch:
            self._sample_channel(ch)
        await FallingEdge(self.dut.clk)
        self.cycle += 1

    def _sample_requester(self, rq):
        cyc = self.cycle
        if rq.cur is not None:
            if int(rq.req_ready.value):
                r = rq.cur
                rq.expect.append(r)
                rq.sent += 1
                rq.accept_cycles.append(cyc)
                if not r["error"]:
                    c = self.amap.decode(r["addr"])[1]
                    self.ch[c].expect[rq.i].append(r)
                rq.cur = None
            else:
                rq.stalls += 1
        valid, payload = _sample_held(rq.resp_valid, rq.resp_payload, rq.last_resp,
                                      f"requester {rq.i} cycle {cyc}: response changed or dropped")
        rq.last_resp = None
        if not valid:
            return
        if not int(rq.resp_ready.value):
            rq.last_resp = payload
            return
        resp = unpack_struct(self.ql, payload)
        assert rq.expect, f"requester {rq.i} cycle {cyc}: response {resp} with no request outstanding"
        exp = rq.expect.popleft()
        where = f"requester {rq.i} cycle {cyc}, response {rq.received} (addr {exp['addr']:#x}, tag {exp['tag']:#x})"
        assert resp["tag"] == exp["tag"], f"{where}: tag {resp['tag']:#x} (out of order or wrong tag)"
        assert resp["write"] == exp["write"], f"{where}: write flag {resp['write']}"
        assert resp["error"] == int(exp["error"]), f"{where}: error {resp['error']}, expected {int(exp['error'])}"
        want = exp["rdata"] if not exp["error"] else 0
        assert resp["data"] == want, f"{where}: data {resp['data']:#x} != {want:#x}"
        rq.received += 1
        rq.errors += resp["error"]
        rq.resp_cycles.append(cyc)

    def _sample_channel(self, ch):
        cyc = self.cycle
        sb = self.slot_bits
        valid, payload = _sample_held(ch.r_valid, ch.r_payload, ch.last_req,
                                      f"channel {ch.c} cycle {cyc}: request changed or withdrawn")
        ch.last_req = None
        if valid and int(ch.r_ready.value):
            req = unpack_struct(self.rl, payload)
            tag = req["tag"]
            rid, slot = tag >> sb, tag & ((1 << sb) - 1)
            where = f"channel {ch.c} cycle {cyc}: request addr {req['addr']:#x} tag {tag:#x}"
            assert rid < self.n, f"{where}: tag names no requester"
            assert req["addr"] % self.cb == 0, f"{where}: misaligned address reached a channel"
            assert self.amap.decode(req["addr"])[1] == ch.c, f"{where}: address of another channel"
            assert tag not in ch.outstanding and slot not in self.inflight[rid], f"{where}: slot already in flight"
            assert ch.expect[rid], f"{where}: requester {rid} sent no such request to this channel"
            exp = ch.expect[rid].popleft()
            for k in ("addr", "write", "mask"):
                assert req[k] == exp[k], f"{where}: {k} {req[k]:#x}, requester {rid} sent {exp[k]:#x}"
            if exp["write"]:
                assert req["data"] == exp["data"], f"{where}: write data differs from the requester's"
            ch.outstanding.add(tag)
            self.inflight[rid].add(slot)
            col = ch.mem.setdefault(req["addr"], bytearray(self.cb))
            if req["write"]:
                b = req["data"].to_bytes(self.cb, "little")
                for k in range(self.cb):
                    if (req["mask"] >> k) & 1:
                        col[k] = b[k]
                rdata = 0
            else:
                rdata = int.from_bytes(bytes(col), "little")
            error = 0
            if not req["write"] and self.rng.random() < ch.err_prob:
                error, rdata = 1, 0
                exp["error"] = True          # the same dict the requester expects its response from
            lo, hi = ch.lat
            due = cyc + int(self.rng.integers(lo, hi + 1))
            ch.pending.append([due, ch.order, dict(data=rdata, tag=tag, write=req["write"], error=error)])
            ch.order += 1
            ch.accepted += 1
            ch.accept_cycles.append(cyc)
            ch.grants.append(rid)
        elif valid:
            ch.last_req = payload
        if ch.cur is not None and int(ch.q_ready.value):
            tag = ch.cur["tag"]
            ch.outstanding.discard(tag)
            self.inflight[tag >> sb].discard(tag & ((1 << sb) - 1))
            ch.resp_cycles.append(cyc)
            ch.cur = None

    # -- helpers -----------------------------------------------------------------------
    def idle(self):
        return (all(not rq.reqs and rq.cur is None and not rq.expect for rq in self.rq)
                and all(not ch.pending and ch.cur is None for ch in self.ch))

    async def run_until(self, cond, limit, what="condition"):
        start_cycle = self.cycle
        while not cond():
            await self.step()
            if self.cycle - start_cycle > limit:
                detail = [(rq.i, len(rq.reqs), len(rq.expect)) for rq in self.rq]
                raise AssertionError(f"{what} not reached in {limit} cycles (requester, to send, awaiting "
                                     f"response): {detail}")
        return self.cycle - start_cycle

    async def drain(self, limit=20000):
        return await self.run_until(self.idle, limit, "all requests answered")

    def check_stall_counters(self):
        for rq in self.rq:
            got = int(rq.stall_ctr.value)
            assert got == rq.stalls, f"req_stall{rq.i} = {got}, testbench saw {rq.stalls} stalled cycles"


def _tb(dut, seed):
    cfg = preset(env_str("IANUS_CONFIG", "tiny"))
    return TB(dut, cfg, env_int("N_REQUESTERS", 3), seed=env_int("SEED", seed))


def _sample_held(valid_sig, payload_sig, last, what: str):
    """``(valid, payload)`` of a stream this cycle (payload None when not valid); ``last``: the payload that was
    valid and not taken in the previous cycle (None: none), which must still be offered (``what`` otherwise)."""
    valid = int(valid_sig.value)
    payload = int(payload_sig.value) if valid else None
    if last is not None:
        assert valid and payload == last, f"{what} while not ready"
    return valid, payload


def _rows(tb, i):
    """Requester ``i``'s rows: disjoint between requesters."""
    return [r for r in range(tb.cfg.pim.rows) if r % tb.n == i][:2]


@tb_test()
async def random_out_of_order(dut):
    """Random reads/writes/masks/misaligned addresses from every requester, channels with random back-pressure
    and out-of-order answers, requesters with random response back-pressure; then long channel delays so that
    reorder buffers fill. Every response in order, right tag, data and error."""
    tb = _tb(dut, 5)
    await tb.reset()
    n = env_int("N_REQ", 500)

    async def phase(rq_gap, rq_backpressure, ready_prob, lat, resp_gap, err_prob) -> int:
        """``n`` random requests from every requester with these gaps and back-pressure, channels with these
        answers; the cycles until all are answered."""
        for rq in tb.rq:
            rq.gap, rq.backpressure = rq_gap, rq_backpressure
            tb.random_traffic(rq.i, n, _rows(tb, rq.i))
        for ch in tb.ch:
            ch.ready_prob, ch.lat, ch.resp_gap, ch.err_prob = ready_prob, lat, resp_gap, err_prob
        cycles = await tb.drain(limit=n * 40)
        tb.check_stall_counters()
        return cycles

    # Phase A: gaps and back-pressure everywhere.
    cyc_a = await phase(0.3, 0.3, 0.6, (1, 25), 0.2, 0.02)
    # Phase B: saturating requesters, long out-of-order delays: ROBs run full.
    cyc_b = await phase(0.0, 0.1, 0.95, (20, 70), 0.0, 0.0)
    total = sum(rq.received for rq in tb.rq)
    errors = [rq.errors for rq in tb.rq]
    assert total == 2 * n * tb.n, f"{total} responses for {2 * n * tb.n} requests"
    assert all(rq.stalls > 0 for rq in tb.rq), "phase B should have filled the reorder buffers"
    assert all(errors), f"every requester should have sent misaligned addresses: {errors}"
    dut._log.info(f"random_out_of_order: {total} responses, phase A {cyc_a} cycles, phase B {cyc_b} cycles, "
                  f"stalls {[rq.stalls for rq in tb.rq]}, error responses {errors}")


@tb_test()
async def no_cross_blocking(dut):
    """Channel 0 stops taking requests: requester 0 (all its traffic to channel 0) waits, requesters 1 and 2
    (channel 1) finish all their traffic meanwhile, sharing channel 1 round robin; then channel 0 resumes."""
    tb = _tb(dut, 9)
    await tb.reset()
    tb.ch[0].stopped = True
    for ch in tb.ch:
        ch.lat = (2, 6)
    tb.random_traffic(0, 60, _rows(tb, 0), channels=[0], bad_prob=0.0)
    for i in (1, 2):
        tb.random_traffic(i, 150, _rows(tb, i), channels=[1], bad_prob=0.05)
    done = lambda: all(not tb.rq[i].reqs and tb.rq[i].cur is None and not tb.rq[i].expect  # noqa: E731
                       for i in (1, 2))
    cycles = await tb.run_until(done, 1000, "requesters 1 and 2 finished while channel 0 is stopped")
    assert tb.rq[0].received == 0 and tb.rq[0].sent > 0
    # Round robin on channel 1 while both requesters had traffic: neither got more than half + 2.
    both = min(len([r for r in tb.ch[1].grants[:200] if r == i]) for i in (1, 2))
    assert both >= len(tb.ch[1].grants[:200]) // 2 - 2, f"channel 1 grants unfair: {tb.ch[1].grants[:40]}"
    tb.ch[0].stopped = False
    await tb.drain()
    tb.check_stall_counters()
    assert tb.rq[0].stalls > 0 and tb.rq[0].received == 60
    dut._log.info(f"no_cross_blocking: requesters 1, 2 done in {cycles} cycles with channel 0 stopped")


@tb_test()
async def throughput(dut):
    """Requester 0 streams reads to channel 0, which answers in order after a fixed latency and never
    back-pressures: sustained >= 0.95 accepted requests (and responses) per cycle over 500 requests, one cycle of
    fabric latency each way. Then requesters 0 and 1 stream to channels 0 and 1 at the same time."""
    tb = _tb(dut, 11)
    await tb.reset()
    lat = env_int("LATENCY", 8)
    n = env_int("N_STREAM", 500)
    for ch in tb.ch:
        ch.ready_prob, ch.lat, ch.in_order, ch.resp_gap = 1.0, (lat, lat), True, 0.0
    p = tb.cfg.pim
    addrs = [tb.amap.encode(r, 0, b, col) for r in _rows(tb, 0) for b in range(p.banks) for col in range(p.columns)]
    for k in range(n + 20):
        tb.request(0, addrs[k % len(addrs)])
    await tb.drain()
    rq, ch = tb.rq[0], tb.ch[0]
    acc = rq.accept_cycles[:n]
    req_rate = n / (acc[-1] - acc[0] + 1)
    resp = rq.resp_cycles[:n]
    resp_rate = n / (resp[-1] - resp[0] + 1)
    lat_in = max(c - a for a, c in zip(rq.accept_cycles, ch.accept_cycles, strict=True))
    lat_out = max(d - q for q, d in zip(ch.resp_cycles, rq.resp_cycles, strict=True))
    dut._log.info(f"throughput: {req_rate:.4f} requests/cycle, {resp_rate:.4f} responses/cycle over {n}; "
                  f"fabric latency {lat_in} cycle(s) in, {lat_out} out; round trip "
                  f"{rq.resp_cycles[0] - rq.accept_cycles[0]} cycles with channel latency {lat}")
    write_metrics(test="fabric_throughput", req_rate=req_rate, resp_rate=resp_rate, lat_in=lat_in, lat_out=lat_out)
    assert req_rate >= 0.95, f"sustained request rate {req_rate:.4f} < 0.95 per cycle"
    assert resp_rate >= 0.95, f"sustained response rate {resp_rate:.4f} < 0.95 per cycle"
    assert 1 <= lat_in <= 2 and 1 <= lat_out <= 2, f"fabric latency {lat_in} in, {lat_out} out"
    tb.check_stall_counters()
    # Two requesters, two channels, at once.
    base = [len(r.accept_cycles) for r in tb.rq]
    for i in (0, 1):
        rows = _rows(tb, i)
        for k in range(n):
            tb.request(i, tb.amap.encode(rows[k % 2], i, k % p.banks, (k // p.banks) % p.columns))
    await tb.drain()
    for i in (0, 1):
        acc = tb.rq[i].accept_cycles[base[i]:base[i] + n]
        rate = n / (acc[-1] - acc[0] + 1)
        dut._log.info(f"throughput: requester {i} alone on channel {i} alongside the other: {rate:.4f}/cycle")
        assert rate >= 0.95, f"requester {i}: {rate:.4f} < 0.95 requests per cycle"
