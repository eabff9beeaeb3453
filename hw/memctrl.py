"""Unified memory controller: one per PIM channel, normal requests and PIM micro commands on one DRAM bus.

The controller owns one channel's command bus (:class:`~hw.pim.channel.PimBusSignature`)
and serves two clients:

* the **normal-request port** (:mod:`hw.memif`): 32-byte reads and writes,
  tagged, from the host window today and the NPU DMA later, scheduled FR-FCFS
  over a small request queue with an open-page policy;
* the **PIM micro-command port**: commands of the PIM vocabulary
  (:class:`~hw.pim.commands.PimOp`) from the PIM control unit, executed strictly
  in order, each at the earliest cycle the device's rules allow.

``pim_mode`` selects the client, as in IANUS: while a macro PIM command is in
flight the normal requests wait in the queue (nothing is dropped) and the
controller closes its rows and serves the PIM stream; when ``pim_mode`` falls,
normal traffic resumes. Refresh is the controller's own job in both modes.

Structure (issue 16): :class:`MemoryController` only wires its parts, each a
:class:`~amaranth.lib.wiring.Component` that can be simulated alone
(``tests/test_memctrl_parts.py``): :class:`~hw.memctrl_parts.ChannelState`
(bank state and timing windows), :class:`~hw.memctrl_parts.RefreshMachine`,
:class:`~hw.memctrl_pim.PimPath` (mode machine and PIM command legality),
:class:`~hw.memctrl_queue.RequestQueue` and :class:`~hw.memctrl_queue.Scheduler`
(FR-FCFS), :class:`~hw.memctrl_parts.Arbiter` (one command per cycle among the
clients' bids) and :class:`~hw.memctrl_parts.ResponsePipe` (read-latency pipe
and response FIFOs); then the bus register and the counters.
"""

from amaranth.hdl import Module, Mux
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

from .config import SystemConfig
from .memctrl_parts import (
    ARBITRATION,
    Arbiter,
    ChannelState,
    RefreshMachine,
    ResponsePipe,
    pim_command_layout,
    pim_response_layout,
)
from .memctrl_pim import PimPath
from .memctrl_queue import RequestQueue, Scheduler
from .memif import request_layout, response_layout
from .pim.channel import PimBusSignature
from .pim.commands import PimOp

__all__ = ["ARBITRATION", "check_system", "MemoryController", "MemCtrlSystem", "MemCtrlCounters", "BusMonitorSignature", "pim_command_layout", "pim_response_layout",
           "COUNTERS"]

COUNTERS = ("busy", "commands", "refreshes", "forced_refreshes", "row_hits", "row_misses", "pim_wait",
            "pim_commands")


class MemCtrlCounters(wiring.Signature):
    """Performance counters of one controller (32-bit, wrapping), from the controller's side."""

    def __init__(self):
        super().__init__({name: Out(32) for name in COUNTERS})


class MemoryController(wiring.Component):
    """Unified memory controller for one PIM channel.

    Parameters
    ----------
    cfg : SystemConfig
        Geometry and DRAM timing (cycles of the command clock).
    queue_depth : int
        Normal requests held for scheduling (FR-FCFS looks at all of them).
    starve_limit : int
        Cycles the oldest queued request may wait behind younger row hits to
        its bank before those hits are held back so that its row can be
        opened (FR-FCFS starvation guard).

    Members
    -------
    req : In(stream.Signature(request_layout(cfg)))
        Normal requests. A request whose address is not column-aligned, or
        whose channel field is not ``chan_id``, is answered with ``error = 1``
        and touches no memory.
    resp : Out(stream.Signature(response_layout(cfg)))
        One response per request: read data or a write acknowledgement with
        the request's tag, in the order the column commands were issued.
    pim : In(stream.Signature(pim_command_layout(cfg)))
        PIM micro commands, accepted only while ``pim_mode`` is high and the
        controller has closed the rows of normal traffic. ``ready`` rises in
        the cycle a command is issued (it depends on the payload). ``NOP``
        is consumed without a bus command. A command the device would
        refuse for its bank state or address (ACT to an open bank, column
        command to a closed bank, accumulator group or global-buffer column
        out of range, AF without AF rows open, unknown opcode) is consumed,
        not issued, sets ``pim_error`` and, if it returns data, answers with
        ``error = 1``.
    pim_resp : Out(stream.Signature(pim_response_layout(cfg)))
        Data of RD, RDMAC and RDAF micro commands with their tags, in order.
    pim_mode : In(1)
        High: stop issuing normal requests, close the open rows, serve ``pim``.
        With two row buffers it only announces normal-buffer commands (the
        PCU's transfers); PIM-buffer and global-buffer commands are served
        beside normal requests whatever its value (``arbitration`` decides
        the bus when both could issue: ``pim_first``, ``normal_first`` or
        ``fair``, alternating).
    pim_idle : Out(1)
        No PIM command waiting and no PIM read in flight: ``pim_mode`` may fall.
    pim_error : Out(1)
        Sticky: a PIM micro command was refused (cleared by ``clear_error``).
    clear_error : In(1)
    chan_id : In(8)
        This controller's channel (compared with the address's channel field).
    bus : Out(PimBusSignature(cfg))
        The channel's command bus, registered: a command decided in cycle
        ``t`` is on the bus in cycle ``t + 1``; read data returns
        ``tRL`` cycles after that.
    refresh_owed : Out(8)
        Refreshes owed by the controller's copy of the device's credit.
    counters : Out(MemCtrlCounters())
        ``busy``: cycles with work pending or in flight; ``commands``: bus
        commands; ``refreshes`` (``forced_refreshes`` of them because the
        deadline approached); ``row_hits`` / ``row_misses``: normal column
        commands whose row was / was not already open when their request
        arrived (a request that saw an ACT to its row while queued counts as a
        miss); ``pim_wait``: cycles with normal requests queued while PIM mode
        held them back; ``pim_commands``: PIM micro commands accepted.

    State machines
    --------------
    *Per bank* (mirrors the device): ``open`` / ``open_row``, and one
    countdown per rule, started by the command that opens the window:
    ACT starts tRCDRD, tRCDWR and tRAS; PRE (of an open bank) starts tRP;
    WR starts tWR; RD, MACSB, MACAB and AF start tRTP. A countdown of
    ``n`` cycles started by a command in cycle ``t`` allows the constrained
    command from cycle ``t + n`` on. *Channel-wide*: tCCD (every column-type
    command, incl. WRGB, WRBIAS, RDMAC, RDAF), tRRD (ACT, ACTAB), tFAW (a
    shift register of the last ``tFAW - 1`` cycles' activations: fewer than 4
    allow another), tRFC (REF), tMAC (MACSB/MACAB before WRBIAS, RDMAC, AF) and
    tAF (AF before RDAF). Because the bus is registered, decisions and
    countdowns are both one cycle ahead of the device, so a command issued
    the first cycle its countdowns allow is on the bus exactly the first
    cycle the device allows.

    *Mode*: ``Normal`` -> (``pim_mode``) ``Close-Rows`` (PREAB once tRAS, tWR,
    tRTP allow) -> ``PIM`` -> (``pim_mode`` low) ``Normal``. Rows left open by
    the PIM stream are tracked like any other and reused or closed by normal
    traffic.

    *Refresh*: a copy of the device's credit counter (one REF falls due per
    tREFI; the device is late with more than ``refresh_postpone`` owed).
    ``Idle`` -> ``Drain`` when at least one REF is owed and the channel is idle
    (normal mode: empty queue; PIM mode: every bank closed), or forced when
    ``refresh_postpone`` are owed. ``Drain``: PREAB when tRAS/tWR/tRTP allow,
    then REF when tRP and tRFC allow. A forced refresh in PIM mode closes the
    PIM stream's rows, so ``Reopen`` activates them again (ACTAB when every
    bank had the same row, else ACT per bank under tRRD/tFAW) before the
    stream continues. While the refresh machine is busy nothing else is
    issued. Worst case from forcing to REF: ``max(tRAS, tWR, tRTP) + tRP +
    tRFC`` cycles plus the register stage, which must be (and is checked to
    be) well under the tREFI the deadline leaves.

    *Normal scheduling* (FR-FCFS, open page). The queue keeps age order
    (oldest at index 0; it collapses on removal). Every cycle each entry
    computes what it needs: a column command (row hit), ACT (bank closed) or
    PRE (another row open and no queued hit to that bank). A request is
    blocked while an older one to the same address is queued, so two
    requests to one address are never reordered. Priority: ready column
    commands (oldest first), then the oldest ready ACT or PRE.

    *Responses*. Every column command enters a ``tRL + 1`` stage pipeline
    (register stage + read latency) whose output meets the device's read
    data, then a FIFO toward ``resp`` / ``pim_resp``. A column command is only
    issued when its FIFO has a free credit, so back-pressure on ``resp``
    stalls scheduling instead of losing data. Error responses enter the
    pipeline in a cycle without a column command.

    Raises
    ------
    TypeError
        ``cfg`` is not a :class:`~hw.config.SystemConfig`.
    ValueError
        A parameter is out of range, or the timing leaves no room to force
        a refresh before the deadline.
    """

    def __init__(self, cfg: SystemConfig, queue_depth: int = 8, starve_limit: int = 64,
                 arbitration: str = "pim_first"):
        if not isinstance(cfg, SystemConfig):
            raise TypeError(f"Configuration must be a SystemConfig, not {cfg!r}")
        if not isinstance(queue_depth, int) or isinstance(queue_depth, bool) or not 1 <= queue_depth <= 64:
            raise ValueError(f"Queue depth must be an integer in [1, 64], not {queue_depth!r}")
        if not isinstance(starve_limit, int) or isinstance(starve_limit, bool) or starve_limit < 1:
            raise ValueError(f"Starvation limit must be a positive integer, not {starve_limit!r}")
        if arbitration not in ARBITRATION:
            raise ValueError(f"Arbitration must be one of {', '.join(ARBITRATION)}, not {arbitration!r}")
        t = cfg.timing
        if t.refresh_postpone < 1:
            raise ValueError(f"DramTiming.refresh_postpone must be at least 1 for the memory controller "
                             f"(it schedules refresh around traffic), not {t.refresh_postpone}")
        need = max(t.tRAS, t.tWR, t.tRTP) + t.tRP + t.tRFC + 8
        if t.tREFI <= need:
            raise ValueError(f"DramTiming.tREFI must exceed max(tRAS, tWR, tRTP) + tRP + tRFC + 8 = {need} "
                             f"cycles (the time to force a refresh), not {t.tREFI}")
        self._cfg = cfg
        self._queue_depth = queue_depth
        self._starve_limit = starve_limit
        self._arbitration = arbitration
        super().__init__({
            "req": In(stream.Signature(request_layout(cfg))),
            "resp": Out(stream.Signature(response_layout(cfg))),
            "pim": In(stream.Signature(pim_command_layout(cfg))),
            "pim_resp": Out(stream.Signature(pim_response_layout(cfg))),
            "pim_mode": In(1),
            "pim_idle": Out(1),
            "pim_error": Out(1),
            "clear_error": In(1),
            "chan_id": In(8),
            "bus": Out(PimBusSignature(cfg)),
            "refresh_owed": Out(8),
            "counters": Out(MemCtrlCounters()),
        })

    @property
    def cfg(self) -> SystemConfig:
        return self._cfg

    @property
    def queue_depth(self) -> int:
        return self._queue_depth

    @property
    def resp_depth(self) -> int:
        """Depth of each response FIFO (credits): ``tRL + 4``, two more with a registered pick (it reserves a
        credit a cycle ahead, and full-rate streams need them: ``tests/test_memctrl.py``)."""
        return self._cfg.timing.tRL + 4 + 2 * self._cfg.pim.pick_stages

    def elaborate(self, platform):
        m = Module()
        cfg, depth = self._cfg, self._queue_depth
        m.submodules.state = state = ChannelState(cfg)
        m.submodules.refresh = refresh = RefreshMachine(cfg)
        m.submodules.pim_path = pim = PimPath(cfg)
        m.submodules.queue = queue = RequestQueue(cfg, depth, self._starve_limit)
        m.submodules.scheduler = sched = Scheduler(cfg, depth)
        m.submodules.arbiter = arb = Arbiter(cfg, self._arbitration)
        m.submodules.responses = pipe = ResponsePipe(cfg, self.resp_depth)

        # One command per cycle, decided by the arbiter among the bids; every copy of the state tracks it.
        wiring.connect(m, arb.issued, state.issued, refresh.issued, queue.issued)
        wiring.connect(m, state.state, refresh.state, pim.state, queue.state, sched.state)
        wiring.connect(m, refresh.bid, arb.refresh)
        wiring.connect(m, pim.close, arb.close)
        wiring.connect(m, pim.bid, arb.pim)
        wiring.connect(m, sched.bid, arb.normal)

        # The clients: the PIM stream (with the mode machine), the normal requests (queue + scheduler).
        wiring.connect(m, wiring.flipped(self.pim), pim.pim)
        wiring.connect(m, wiring.flipped(self.req), queue.req)
        m.d.comb += [
            pim.pim_mode.eq(self.pim_mode), pim.credit.eq(pipe.pim_credit),
            refresh.mode_pim.eq(pim.mode_pim), refresh.mode_normal.eq(pim.mode_normal),
            refresh.queue_empty.eq(queue.empty if cfg.pim.pick_stages else queue.count == 0),
            queue.chan_id.eq(self.chan_id), queue.pick.eq(sched.pick), queue.remove.eq(sched.remove),
            queue.err_accept.eq(pipe.err_accept),
            sched.entries.eq(queue.entries), sched.picked.eq(queue.picked), sched.starving.eq(queue.starving),
            sched.hit_in_bank.eq(queue.hit_in_bank), sched.mode_normal.eq(pim.mode_normal),
            sched.pact_pending.eq(pim.pact_pending), sched.pact_row.eq(pim.pact_row),
            sched.resp_credit.eq(pipe.resp_credit),
        ]
        if cfg.pim.pick_stages:
            m.d.comb += [sched.resp_credit2.eq(pipe.resp_credit2), sched.collapse.eq(queue.collapse)]

        # Responses: column commands, refused PIM reads and error requests enter the read-latency pipe.
        wiring.connect(m, queue.col_resp, pipe.col)
        wiring.connect(m, pim.resp, pipe.pim)
        wiring.connect(m, queue.err_resp, pipe.err)
        wiring.connect(m, pipe.resp, wiring.flipped(self.resp))
        wiring.connect(m, pipe.pim_resp, wiring.flipped(self.pim_resp))
        m.d.comb += pipe.rdata.eq(self.bus.rdata)

        # ------------------------------------------------------- bus register
        iss = arb.issued
        bus = self.bus
        if cfg.pim.pick_stages:     # the arbiter's fields are only meaningful with ``valid`` (:class:`Arbiter`)
            m.d.sync += [bus.op.eq(Mux(iss.valid, iss.op, PimOp.NOP))]
            m.d.sync += [getattr(bus, n).eq(Mux(iss.valid, getattr(iss, n), 0))
                         for n in ("bank", "row", "col", "data", "mask")]
        else:
            m.d.sync += [
                bus.op.eq(Mux(iss.valid, iss.op, PimOp.NOP)),
                bus.bank.eq(iss.bank), bus.row.eq(iss.row), bus.col.eq(iss.col),
                bus.data.eq(iss.data), bus.mask.eq(iss.mask),
            ]

        # ------------------------------------------------------- status and counters
        m.d.comb += [self.refresh_owed.eq(refresh.owed), self.pim_idle.eq(~self.pim.valid & ~pipe.pim_in_flight)]
        with m.If(self.clear_error):
            m.d.sync += self.pim_error.eq(0)
        with m.Elif(pim.refused):
            m.d.sync += self.pim_error.eq(1)
        ctr = self.counters
        rm, queued = sched.remove, queue.count != 0
        busy = queued | self.pim.valid | pipe.busy | refresh.refreshing
        m.d.comb += ctr.forced_refreshes.eq(refresh.forced)
        m.d.sync += [
            ctr.busy.eq(ctr.busy + busy),
            ctr.commands.eq(ctr.commands + iss.valid),
            ctr.refreshes.eq(ctr.refreshes + (iss.valid & (iss.op == PimOp.REF))),
            ctr.row_hits.eq(ctr.row_hits + (rm & ~queue.picked.miss)),
            ctr.row_misses.eq(ctr.row_misses + (rm & queue.picked.miss)),
            ctr.pim_wait.eq(ctr.pim_wait + (queued & ~pim.mode_normal)),
            ctr.pim_commands.eq(ctr.pim_commands + pim.take),
        ]
        return m


class BusMonitorSignature(wiring.Signature):
    """A copy of a command bus for monitors (all outputs)."""

    def __init__(self, cfg: SystemConfig):
        p = cfg.pim
        super().__init__({
            "op": Out(PimOp), "bank": Out(p.bank_addr_bits), "row": Out(p.row_addr_bits),
            "col": Out(p.column_addr_bits), "rvalid": Out(1),
        })


def check_system(cfg, device_factory):
    """Check the arguments of a top that builds the PIM device (:class:`MemCtrlSystem`, :class:`hw.soc.SocTop`)."""
    if not isinstance(cfg, SystemConfig):
        raise TypeError(f"Configuration must be a SystemConfig, not {cfg!r}")
    if not callable(device_factory):
        raise TypeError(f"Device factory must be callable, not {device_factory!r}")


class MemCtrlSystem(wiring.Component):
    """One :class:`MemoryController` per channel driving the PIM device (a test and prototype top).

    Parameters
    ----------
    cfg : SystemConfig
    device_factory : callable
        Zero-argument factory of the :class:`~hw.pim.channel.PimDevice` (e.g.
        :func:`hw.pim.device_factory` ``(cfg)``, which instantiates pre-generated
        channel modules).
    queue_depth, arbitration : int, str
        Passed to every controller.

    Members (arrays indexed by channel, ``self.r[c]``; flattened ``r__<c>__valid``)
    -------------------------------------------------------------------------------
    r, q : normal requests in, responses out
    p, pr : PIM micro commands in, PIM responses out
    mode, pidle, perr, owed : ``pim_mode``, ``pim_idle``, ``pim_error``, ``refresh_owed``
    k : the controller's performance counters
    mon : the command bus the device sees
    s : the device's status (violation flags and event counters)
    bd_load : the device's back door
    """

    def __init__(self, cfg: SystemConfig, device_factory, queue_depth: int = 8, arbitration: str = "pim_first"):
        from .pim.channel import PimStatusSignature

        check_system(cfg, device_factory)
        self._cfg = cfg
        self._device_factory = device_factory
        self._queue_depth = queue_depth
        self._arbitration = arbitration
        C = cfg.pim.channels
        members = {
            "r": In(stream.Signature(request_layout(cfg))).array(C),
            "q": Out(stream.Signature(response_layout(cfg))).array(C),
            "p": In(stream.Signature(pim_command_layout(cfg))).array(C),
            "pr": Out(stream.Signature(pim_response_layout(cfg))).array(C),
            "mode": In(1).array(C), "pidle": Out(1).array(C), "perr": Out(1).array(C), "owed": Out(8).array(C),
            "k": Out(MemCtrlCounters()).array(C),
            "mon": Out(BusMonitorSignature(cfg)).array(C),
            "s": Out(PimStatusSignature()).array(C),
            "bd_load": In(1),
        }
        super().__init__(members)

    def elaborate(self, platform):
        m = Module()
        m.submodules.device = dev = self._device_factory()
        m.d.comb += dev.bd_load.eq(self.bd_load)
        for c in range(self._cfg.pim.channels):
            mc = m.submodules[f"mc{c}"] = MemoryController(self._cfg, self._queue_depth,
                                                          arbitration=self._arbitration)
            wiring.connect(m, wiring.flipped(self.r[c]), mc.req)
            wiring.connect(m, mc.resp, wiring.flipped(self.q[c]))
            wiring.connect(m, wiring.flipped(self.p[c]), mc.pim)
            wiring.connect(m, mc.pim_resp, wiring.flipped(self.pr[c]))
            wiring.connect(m, mc.counters, wiring.flipped(self.k[c]))
            wiring.connect(m, mc.bus, dev.c[c])
            wiring.connect(m, dev.s[c], wiring.flipped(self.s[c]))
            mon = self.mon[c]
            m.d.comb += [
                mc.chan_id.eq(c), mc.pim_mode.eq(self.mode[c]),
                self.pidle[c].eq(mc.pim_idle), self.perr[c].eq(mc.pim_error), self.owed[c].eq(mc.refresh_owed),
                mon.op.eq(mc.bus.op), mon.bank.eq(mc.bus.bank), mon.row.eq(mc.bus.row), mon.col.eq(mc.bus.col),
                mon.rvalid.eq(mc.bus.rvalid),
            ]
        return m
