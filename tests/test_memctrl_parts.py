"""The memory controller's parts alone on the Amaranth simulator (hw/memctrl_parts.py, issue 16): the refresh
machine's credit and deadline and its reopening of the PIM stream's rows, the arbiter's policies, the
response pipe's latency and credits. Fast: no Verilator build."""

import pytest
from amaranth.hdl import Module, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out
from amaranth.sim import Simulator

from hw.config import preset
from hw.memctrl_parts import (
    Arbiter,
    ChannelState,
    CommandSignature,
    RefreshMachine,
    ResponsePipe,
)
from hw.pim.commands import PimOp

# A short refresh interval so that refreshes fall due within a few hundred cycles.
TIMING = {"tREFI": 60, "refresh_postpone": 2}


def _cfg(name="tiny"):
    return preset(name).replace(**{f"timing.{k}": v for k, v in TIMING.items()})


def _op(v):
    return int(v.value) if hasattr(v, "value") else int(v)


class RefreshHarness(wiring.Component):
    """ChannelState + RefreshMachine, the refresh machine's bid granted whenever it bids (as the arbiter
    does), else the command ``ext`` from the test."""

    def __init__(self, cfg):
        self._cfg = cfg
        super().__init__({"ext": In(CommandSignature(cfg)), "issued": Out(CommandSignature(cfg)),
                          "mode_pim": In(1), "mode_normal": In(1), "queue_empty": In(1),
                          "owed": Out(8), "forced": Out(32), "refreshing": Out(1)})

    def elaborate(self, platform):
        m = Module()
        m.submodules.state = state = ChannelState(self._cfg)
        m.submodules.refresh = ref = RefreshMachine(self._cfg)
        wiring.connect(m, state.state, ref.state)
        fields = ("valid", "op", "bank", "row", "col", "data", "mask")
        src = ref.bid.cmd
        with m.If(ref.bid.go):
            m.d.comb += [getattr(self.issued, n).eq(getattr(src, n)) for n in fields]
            m.d.comb += ref.bid.grant.eq(1)
        with m.Else():
            m.d.comb += [getattr(self.issued, n).eq(getattr(self.ext, n)) for n in fields]
        for c in (state.issued, ref.issued):
            m.d.comb += [getattr(c, n).eq(getattr(self.issued, n)) for n in fields]
        m.d.comb += [ref.mode_pim.eq(self.mode_pim), ref.mode_normal.eq(self.mode_normal),
                     ref.queue_empty.eq(self.queue_empty), self.owed.eq(ref.owed), self.forced.eq(ref.forced),
                     self.refreshing.eq(ref.refreshing)]
        return m


def _run_refresh(cfg, cycles, mode_pim=0, queue_empty=0, ext=()):
    """Run the harness; ``ext``: {cycle: (op, bank, row)} commands of the test. Returns the issued commands
    [(cycle, op, bank, row)], the highest ``owed`` seen and the final forced count."""
    dut = RefreshHarness(cfg)
    ext = dict(ext)
    log = {"cmds": [], "max_owed": 0, "forced": 0}

    async def bench(ctx):
        ctx.set(dut.mode_pim, mode_pim)
        ctx.set(dut.mode_normal, 1 - mode_pim)
        ctx.set(dut.queue_empty, queue_empty)
        for cyc in range(cycles):
            if cyc in ext:
                op, bank, row = ext[cyc]
                ctx.set(dut.ext.valid, 1)
                ctx.set(dut.ext.op, op)
                ctx.set(dut.ext.bank, bank)
                ctx.set(dut.ext.row, row)
            else:
                ctx.set(dut.ext.valid, 0)
            if ctx.get(dut.issued.valid):
                log["cmds"].append((cyc, PimOp(_op(ctx.get(dut.issued.op))), ctx.get(dut.issued.bank),
                                    ctx.get(dut.issued.row)))
            log["max_owed"] = max(log["max_owed"], ctx.get(dut.owed))
            await ctx.tick()
        log["forced"] = ctx.get(dut.forced)

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()
    return log


def test_refresh_waits_for_idle_or_deadline_amaranth_sim():
    """With requests queued the machine postpones: the first REF is forced when ``refresh_postpone`` are
    owed (the cycle after the credit reaches it); on an idle channel it refreshes as soon as one is owed.
    The credit never exceeds the postponement (the device's deadline is met)."""
    cfg = _cfg()
    t = cfg.timing
    busy = _run_refresh(cfg, 6 * t.tREFI, queue_empty=0)
    refs = [c for c, op, _, _ in busy["cmds"] if op == PimOp.REF]
    assert refs[0] == t.refresh_postpone * t.tREFI + 1, busy["cmds"][:4]
    assert all(b - a == t.tREFI for a, b in zip(refs, refs[1:], strict=False)), refs   # one per tREFI, each forced
    assert busy["forced"] == len(refs)
    assert busy["max_owed"] == t.refresh_postpone
    idle = _run_refresh(cfg, 6 * t.tREFI, queue_empty=1)
    refs = [c for c, op, _, _ in idle["cmds"] if op == PimOp.REF]
    assert refs[0] == t.tREFI + 1 and idle["forced"] == 0, idle["cmds"][:4]
    assert idle["max_owed"] == 1


@pytest.mark.parametrize("rows", [(5,) * 8, (1, 2)])
def test_forced_refresh_in_pim_mode_reopens_the_rows_amaranth_sim(rows):
    """PIM mode, rows open: the forced refresh closes them (PREAB once tRAS allows), refreshes (tRP after
    the PREAB) and reopens the same rows (tRFC after the REF): one ACTAB when every bank had the same row,
    else an ACT per open bank."""
    cfg = _cfg()
    t = cfg.timing
    ext = {0: (PimOp.ACTAB, 0, rows[0])} if len(set(rows)) == 1 else \
        {4 * b: (PimOp.ACT, b, r) for b, r in enumerate(rows)}
    log = _run_refresh(cfg, 3 * t.tREFI, mode_pim=1, ext=ext)
    cmds = [(c, op, bank, row) for c, op, bank, row in log["cmds"] if c > 20]
    pre, ref = cmds[0], cmds[1]
    assert (pre[1], ref[1]) == (PimOp.PREAB, PimOp.REF), cmds[:4]
    assert pre[0] == t.refresh_postpone * t.tREFI + 1 and ref[0] - pre[0] >= t.tRP, cmds[:4]
    reopen = cmds[2:2 + (1 if len(set(rows)) == 1 else len(rows))]
    assert reopen[0][0] - ref[0] >= t.tRFC
    if len(set(rows)) == 1:
        assert [(op, row) for _, op, _, row in reopen] == [(PimOp.ACTAB, rows[0])]
    else:
        assert [(op, bank, row) for _, op, bank, row in reopen] == \
            [(PimOp.ACT, b, r) for b, r in enumerate(rows)]
    assert log["forced"] >= 1 and log["max_owed"] <= t.refresh_postpone


@pytest.mark.parametrize("policy, grants", [
    ("pim_first", "PPPPPP"), ("normal_first", "NNNNNN"), ("fair", "PNPNPN")])
def test_arbiter_policies_amaranth_sim(policy, grants):
    """Two row buffers, the PIM stream and the scheduler both bidding every cycle: ``pim_first`` always
    grants the PIM stream, ``normal_first`` the scheduler, ``fair`` alternates; the refresh machine and a
    Close-Rows bid take precedence over both (and do not move ``fair``'s turn)."""
    cfg = preset("tiny-dualrb")
    dut = Arbiter(cfg, policy)
    seen = []

    async def bench(ctx):
        for bid, op in ((dut.pim, PimOp.MACAB), (dut.normal, PimOp.RD)):
            ctx.set(bid.go, 1)
            ctx.set(bid.cmd.valid, 1)
            ctx.set(bid.cmd.op, op)
        ctx.set(dut.refresh.cmd.op, PimOp.REF)
        ctx.set(dut.close.cmd.op, PimOp.PREAB)
        for cyc in range(8):
            hold = {2: dut.refresh, 5: dut.close}.get(cyc)
            if hold is not None:
                ctx.set(hold.go, 1)
                ctx.set(hold.cmd.valid, 1)
            for b in (dut.refresh, dut.close):
                if b is not hold:
                    ctx.set(b.go, 0)
                    ctx.set(b.cmd.valid, 0)
            op = PimOp(_op(ctx.get(dut.issued.op)))
            granted = [n for n, b in (("R", dut.refresh), ("C", dut.close), ("P", dut.pim), ("N", dut.normal))
                       if ctx.get(b.grant)]
            assert len(granted) == 1 and ctx.get(dut.issued.valid)
            seen.append((granted[0], op))
            await ctx.tick()

    top = Module()                     # pim_first and normal_first have no register: give the clock a domain
    top.submodules.dut = dut
    tick = Signal()
    top.d.sync += tick.eq(~tick)
    sim = Simulator(top)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()
    want = {"R": PimOp.REF, "C": PimOp.PREAB, "P": PimOp.MACAB, "N": PimOp.RD}
    assert all(want[g] == op for g, op in seen), seen
    assert seen[2][0] == "R" and seen[5][0] == "C"
    assert "".join(g for i, (g, _) in enumerate(seen) if i not in (2, 5)) == grants


def test_response_pipe_latency_and_credits_amaranth_sim():
    """A read decided in cycle ``t`` samples ``rdata`` in cycle ``t + tRL + 1`` (the bus register plus the
    read latency) and is answered from the FIFO with its tag; with ``resp`` stalled the credits run out
    after ``depth`` responses (reserved in the pipe or the FIFO), and come back as responses leave."""
    cfg = preset("tiny")
    t = cfg.timing
    depth = t.tRL + 4
    dut = ResponsePipe(cfg, depth)
    out = {}

    async def bench(ctx):
        ctx.set(dut.resp.ready, 0)
        credits = []
        for cyc in range(depth + t.tRL + 6):
            issue = cyc < depth + 2 and ctx.get(dut.resp_credit)
            ctx.set(dut.col.valid, issue)
            ctx.set(dut.col.write, 0)
            ctx.set(dut.col.tag, cyc)
            ctx.set(dut.rdata, 1000 + cyc)          # the device's data of the read decided tRL + 1 earlier
            credits.append(int(issue))
            await ctx.tick()
        assert sum(credits) == depth and not ctx.get(dut.resp_credit)
        ctx.set(dut.col.valid, 0)
        ctx.set(dut.resp.ready, 1)
        for _ in range(depth + 2):
            if ctx.get(dut.resp.valid):
                out[ctx.get(dut.resp.payload.tag)] = ctx.get(dut.resp.payload.data)
            await ctx.tick()
        assert ctx.get(dut.resp_credit)

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()
    assert out == {tag: 1000 + tag + t.tRL + 1 for tag in range(depth)}
