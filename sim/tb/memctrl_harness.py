"""The memory-controller testbench's harness (:mod:`sim.tb.memctrl_tb` holds the tests): :class:`TB`, one cycle
loop that drives every stream of every channel of :class:`hw.memctrl.MemCtrlSystem` (random valid gaps on the
request side, random ``ready`` back-pressure on the response side), records every handshake, feeds each
controller's command bus to the protocol checker and scores every normal response against a memory model;
:class:`Chan`, one channel's stimulus queues, scoreboard, checker and bus log."""

from __future__ import annotations

from collections import deque

import numpy as np
from cocotb.triggers import FallingEdge, Timer

from hw.memctrl import COUNTERS, pim_command_layout, pim_response_layout
from hw.memif import AddressMap, request_layout, response_layout
from sim.pim_checker import OPCODES, OPNAMES, ProtocolChecker
from sim.tb.common import (
    pack_struct,
    port,
    port_name,
    start,
    unpack_struct,
)


class Chan:
    """Test-side state of one channel: stimulus queues, scoreboard, checker, bus log."""

    def __init__(self, tb, c):
        cfg = tb.cfg
        dut = tb.dut
        self.c = c
        # Channel c's element of every array port, each read once by name (STYLE.md).
        def g(member, *path):
            return port(dut, member, c, *path)

        stream_ = ("valid", "payload", "ready")
        self.r_valid, self.r_payload, self.r_ready = (g("r", n) for n in stream_)
        self.q_valid, self.q_payload, self.q_ready = (g("q", n) for n in stream_)
        self.p_valid, self.p_payload, self.p_ready = (g("p", n) for n in stream_)
        self.pr_valid, self.pr_payload, self.pr_ready = (g("pr", n) for n in stream_)
        self.mode, self.pidle, self.perr, self.owed = g("mode"), g("pidle"), g("perr"), g("owed")
        self.mon = {n: g("mon", n) for n in ("op", "bank", "row", "col", "rvalid")}
        self.ctr = {n: g("k", n) for n in COUNTERS}
        self.status = {n: g("s", n) for n in ("violation", "vcode", "vop", "vcycle", "nviol", "n_ref",
                                               "owed", "cycle", "clear")}
        self.checker = ProtocolChecker(cfg, channel=c)
        self.reqs = deque()          # (payload dict, expect dict) to send
        self.cur = None
        self.pims = deque()          # pim command dicts (data may be symbolic)
        self.cur_pim = None
        self.outstanding = {}        # tag -> expectation
        self.addr_order = {}         # addr -> deque of tags, in acceptance order
        self.mem = {}                # addr -> bytearray (column)
        self.pim_expect = deque()    # tags of PIM reads in order
        self.pim_results = {}        # symbolic tag -> data word
        self.pim_errors = 0
        self.responses = 0
        self.resp_during_pim = 0
        self.pim_window = False      # a PIM operation is running (set by the test)
        self.bus_log = []            # (cycle, op, bank, row, col)
        self.gap = 0.0
        self.backpressure = 0.0
        self.pim_ready_prob = 1.0
        self.pim_gap = 0.0
        self.next_tag = 0
        self.seq = 0


class TB:
    def __init__(self, dut, cfg, seed=1):
        self.dut = dut
        self.cfg = cfg
        self.amap = AddressMap(cfg.pim)
        self.rl = request_layout(cfg)
        self.ql = response_layout(cfg)
        self.pl = pim_command_layout(cfg)
        self.prl = pim_response_layout(cfg)
        self.rng = np.random.default_rng(seed)
        self.ch = [Chan(self, c) for c in range(cfg.pim.channels)]
        self.cycle = 0
        self.full_mask = (1 << cfg.pim.column_bytes) - 1
        self.resolve = None

    async def reset(self):
        zero = ["bd_load"]
        for c in range(len(self.ch)):
            zero += [port_name(*name) for name in (("r", c, "valid"), ("r", c, "payload"), ("q", c, "ready"),
                                                    ("p", c, "valid"), ("p", c, "payload"), ("pr", c, "ready"),
                                                    ("mode", c), ("s", c, "clear"))]
        await start(self.dut, zero_inputs=zero)
        await FallingEdge(self.dut.clk)
        self.cycle = int(self.ch[0].status["cycle"].value)

    # -- stimulus ---------------------------------------------------------------
    def read(self, c, addr, expect_error=False):
        self.ch[c].reqs.append(dict(addr=addr, write=0, data=0, mask=0, error=expect_error))

    def write(self, c, addr, data, mask=None, expect_error=False):
        self.ch[c].reqs.append(dict(addr=addr, write=1, data=data, mask=self.full_mask if mask is None else mask,
                                    error=expect_error))

    def pim(self, c, op, bank=0, row=0, col=0, data=0, mask=None, tag=None):
        self.ch[c].pims.append(dict(op=op, bank=bank, row=row, col=col, data=data,
                                    mask=self.full_mask if mask is None else mask, tag=tag))

    # -- model ---------------------------------------------------------------------
    def _mem(self, ch, addr):
        return ch.mem.setdefault(addr, bytearray(self.cfg.pim.column_bytes))

    def _accept(self, ch, r, tag):
        cb = self.cfg.pim.column_bytes
        exp = dict(addr=r["addr"], write=r["write"], error=r["error"], cycle=self.cycle)
        if not r["error"]:
            col = self._mem(ch, r["addr"])
            if r["write"]:
                data = int(r["data"]).to_bytes(cb, "little")
                for i in range(cb):
                    if (r["mask"] >> i) & 1:
                        col[i] = data[i]
            else:
                exp["data"] = int.from_bytes(bytes(col), "little")
            ch.addr_order.setdefault(r["addr"], deque()).append(tag)
        assert tag not in ch.outstanding, f"channel {ch.c}: tag {tag} reused while outstanding"
        ch.outstanding[tag] = exp

    def _response(self, ch, word):
        resp = unpack_struct(self.ql, word)
        tag = resp["tag"]
        exp = ch.outstanding.pop(tag, None)
        assert exp is not None, f"channel {ch.c} cycle {self.cycle}: response with tag {tag} not outstanding " \
                                f"(lost or duplicated)"
        assert resp["error"] == int(exp["error"]), \
            f"channel {ch.c}: tag {tag} addr {exp['addr']:#x}: error {resp['error']}, expected {exp['error']}"
        assert resp["write"] == exp["write"], f"channel {ch.c}: tag {tag}: write flag {resp['write']}"
        if not exp["error"]:
            order = ch.addr_order[exp["addr"]]
            assert order[0] == tag, (f"channel {ch.c}: addr {exp['addr']:#x}: response for tag {tag} before "
                                     f"older tag {order[0]} (same-address order broken)")
            order.popleft()
            if not exp["write"]:
                assert resp["data"] == exp["data"], (f"channel {ch.c}: read addr {exp['addr']:#x} tag {tag}: "
                                                     f"{resp['data']:#x} != {exp['data']:#x}")
        ch.responses += 1
        if int(ch.mode.value) or ch.pim_window:
            ch.resp_during_pim += 1

    # -- the cycle loop ---------------------------------------------------------------
    async def step(self):
        rng = self.rng
        for ch in self.ch:
            # Normal request: hold valid until accepted (stream rule); random gaps before.
            if ch.cur is None and ch.reqs and rng.random() >= ch.gap:
                ch.cur = ch.reqs.popleft()
                ch.cur_tag = ch.next_tag
                ch.next_tag = (ch.next_tag + 1) % 256
                while ch.next_tag in ch.outstanding:
                    ch.next_tag = (ch.next_tag + 1) % 256
            if ch.cur is not None:
                ch.r_payload.value = pack_struct(self.rl, tag=ch.cur_tag, **ch.cur)
                ch.r_valid.value = 1
            else:
                ch.r_valid.value = 0
            ch.q_ready.value = int(rng.random() >= ch.backpressure)
            ch.pr_ready.value = int(rng.random() < ch.pim_ready_prob)
            # PIM command: resolved data only (a partial sum waits for its RDMAC).
            if ch.cur_pim is None and ch.pims and rng.random() >= ch.pim_gap:
                cmd = ch.pims[0]
                data = cmd["data"]
                if not isinstance(data, int):
                    data = self.resolve(ch.c, data)
                if data is not None:
                    ch.pims.popleft()
                    ch.cur_pim = dict(cmd, data=data)
                    ch.cur_pim_tag = ch.seq % 256
                    ch.seq += 1
            if ch.cur_pim is not None:
                cp = ch.cur_pim
                ch.p_payload.value = pack_struct(self.pl, op=OPCODES[cp["op"]] if isinstance(cp["op"], str)
                                                 else cp["op"], bank=cp["bank"], row=cp["row"], col=cp["col"],
                                                 data=cp["data"], mask=cp["mask"], tag=ch.cur_pim_tag)
                ch.p_valid.value = 1
            else:
                ch.p_valid.value = 0
        await Timer(1, "ns")
        cyc = self.cycle
        for ch in self.ch:
            if ch.cur is not None and int(ch.r_ready.value):
                self._accept(ch, ch.cur, ch.cur_tag)
                ch.cur = None
            if int(ch.q_valid.value) and int(ch.q_ready.value):
                self._response(ch, int(ch.q_payload.value))
            if ch.cur_pim is not None and int(ch.p_ready.value):
                if ch.cur_pim["op"] in ("RD", "RDMAC", "RDAF"):
                    ch.pim_expect.append((ch.cur_pim_tag, ch.cur_pim["tag"]))
                ch.cur_pim = None
            if int(ch.pr_valid.value) and int(ch.pr_ready.value):
                resp = unpack_struct(self.prl, int(ch.pr_payload.value))
                assert ch.pim_expect, f"channel {ch.c}: PIM response with no PIM read outstanding"
                tag, sym = ch.pim_expect.popleft()
                assert resp["tag"] == tag, f"channel {ch.c}: PIM response tag {resp['tag']}, expected {tag}"
                ch.pim_errors += resp["error"]
                ch.pim_results[sym] = resp["data"]
            op = int(ch.mon["op"].value)
            if op:
                bank, row, col = (int(ch.mon[n].value) for n in ("bank", "row", "col"))
                ch.checker.check(cyc, op, bank, row, col)
                ch.bus_log.append((cyc, OPNAMES.get(op, op), bank, row, col))
            else:
                ch.checker.check(cyc, "NOP")
        await FallingEdge(self.dut.clk)
        self.cycle += 1

    def idle(self, c=None):
        chans = self.ch if c is None else [self.ch[c]]
        return all(not ch.reqs and ch.cur is None and not ch.outstanding and not ch.pims and ch.cur_pim is None
                   and not ch.pim_expect for ch in chans)

    async def run_until(self, cond, limit, what="condition"):
        start_cycle = self.cycle
        while not cond():
            await self.step()
            if self.cycle - start_cycle > limit:
                detail = [(ch.c, len(ch.reqs), len(ch.outstanding), len(ch.pims), len(ch.pim_expect))
                          for ch in self.ch]
                raise AssertionError(f"{what} not reached in {limit} cycles (channel, to send, outstanding, "
                                     f"pim to send, pim reads): {detail}")
        return self.cycle - start_cycle

    async def drain(self, limit=20000):
        return await self.run_until(self.idle, limit, "all requests answered")

    # -- checks --------------------------------------------------------------------------
    def counters(self, c):
        return {n: int(s.value) for n, s in self.ch[c].ctr.items()}

    def assert_clean(self):
        errors = []
        for ch in self.ch:
            if ch.checker.violations:
                errors.append(f"checker channel {ch.c}: {len(ch.checker.violations)} violations, first "
                              f"{ch.checker.violations[:5]}")
            st = {n: int(s.value) for n, s in ch.status.items() if n != "clear"}
            if st["violation"]:
                errors.append(f"device channel {ch.c}: violation code {st['vcode']} op {st['vop']} at cycle "
                              f"{st['vcycle']} ({st['nviol']} in all)")
            owed = ch.checker.owed(self.cycle)
            if owed > self.cfg.timing.refresh_postpone:
                errors.append(f"channel {ch.c}: {owed} refreshes owed at cycle {self.cycle}")
        assert not errors, "; ".join(errors)

    def random_addr(self, c, rows, banks=None, cols=None):
        p = self.cfg.pim
        rng = self.rng
        row = int(rng.choice(rows))
        bank = int(rng.integers(p.banks)) if banks is None else int(rng.choice(banks))
        col = int(rng.integers(p.columns)) if cols is None else int(rng.choice(cols))
        return self.amap.encode(row, c, bank, col)
