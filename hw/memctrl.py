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
"""

from amaranth.hdl import Array, Cat, Const, Module, Mux, Signal
from amaranth.lib import data, stream, wiring
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.lib.wiring import In, Out

from .config import SystemConfig
from .memif import TAG_BITS, AddressMap, request_layout, response_layout
from .pim.channel import PimBusSignature
from .pim.commands import COLUMN_OPS, READ_OPS, PimOp
from .pim.timing import countdown, faw_window, pim_row_buffer, refresh_credit

__all__ = ["ARBITRATION", "MemoryController", "MemCtrlSystem", "MemCtrlCounters", "BusMonitorSignature", "pim_command_layout", "pim_response_layout",
           "COUNTERS"]

ARBITRATION = ("pim_first", "normal_first", "fair")
"""Command-bus policies between the PIM stream and normal requests with two row buffers."""

COUNTERS = ("busy", "commands", "refreshes", "forced_refreshes", "row_hits", "row_misses", "pim_wait",
            "pim_commands")


def pim_command_layout(cfg: SystemConfig) -> data.StructLayout:
    """Payload of the PIM micro-command stream (the bus fields of the command, plus a tag)."""
    p = cfg.pim
    return data.StructLayout({
        "op": PimOp,
        "bank": p.bank_addr_bits,
        "row": p.row_addr_bits,
        "col": p.column_addr_bits,
        "data": p.column_bits,
        "mask": p.column_bytes,
        "tag": TAG_BITS,
    })


def pim_response_layout(cfg: SystemConfig) -> data.StructLayout:
    """Payload of the PIM response stream: data of RD/RDMAC/RDAF, the command's tag, and ``error``
    for a command the controller refused (see :class:`MemoryController`)."""
    return data.StructLayout({
        "data": cfg.pim.column_bits,
        "tag": TAG_BITS,
        "error": 1,
    })


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
        """Depth of each response FIFO (credits): enough for back-to-back reads at full rate."""
        return self._cfg.timing.tRL + 4

    def elaborate(self, platform):
        m = Module()
        cfg = self._cfg
        p, t = cfg.pim, cfg.timing
        nb = p.banks
        all_banks = (1 << nb) - 1
        amap = AddressMap(p)
        rb = max(p.row_addr_bits, 1)
        bb = max(p.bank_addr_bits, 1)
        cb = max(p.column_addr_bits, 1)

        # ---------------------------------------------------------------- issue
        # One command per cycle, chosen below; everything that tracks state decodes it.
        iss = Signal()
        iss_op = Signal(PimOp)
        iss_bank = Signal(bb)
        iss_row = Signal(rb)
        iss_col = Signal(cb)
        iss_data = Signal(p.column_bits)
        iss_mask = Signal(p.column_bytes)
        op = iss_op

        # ------------------------------------------------------- bank state machines
        is_open = Signal(nb)
        open_row = Array(Signal(rb, name=f"open_row{b}") for b in range(nb))
        rcdrd_ok, rcdwr_ok, ras_ok, rp_ok, wr_ok, rtp_ok = (Signal(nb, name=n) for n in
                                                            ("rcdrd_ok", "rcdwr_ok", "ras_ok", "rp_ok",
                                                             "wr_ok", "rtp_ok"))
        dual = p.row_buffers == 2
        for b in range(nb):
            here = iss_bank == b
            do_act = iss & (((op == PimOp.ACT) & here) | (op == PimOp.ACTAB))
            do_pre = iss & is_open[b] & (((op == PimOp.PRE) & here) | (op == PimOp.PREAB))
            do_wr = iss & (op == PimOp.WR) & here
            if dual:        # MAC and AF read the PIM buffer
                rd_type = iss & (op == PimOp.RD) & here
            else:
                rd_type = iss & ((op.as_value().matches(PimOp.RD, PimOp.MACSB) & here) |
                                 op.as_value().matches(PimOp.MACAB, PimOp.AF))
            with m.If(do_act):
                m.d.sync += [is_open[b].eq(1), open_row[b].eq(iss_row)]
            with m.Elif(do_pre):
                m.d.sync += is_open[b].eq(0)
            m.d.comb += [
                rcdrd_ok[b].eq(countdown(m, f"b{b}_rcdrd", t.tRCDRD, do_act)),
                rcdwr_ok[b].eq(countdown(m, f"b{b}_rcdwr", t.tRCDWR, do_act)),
                ras_ok[b].eq(countdown(m, f"b{b}_ras", t.tRAS, do_act)),
                rp_ok[b].eq(countdown(m, f"b{b}_rp", t.tRP, do_pre)),
                wr_ok[b].eq(countdown(m, f"b{b}_wr", t.tWR, do_wr)),
                rtp_ok[b].eq(countdown(m, f"b{b}_rtp", t.tRTP, rd_type)),
            ]
        pre_ok = ras_ok & wr_ok & rtp_ok           # per bank: a PRE may close it now
        all_closed = is_open == 0
        preab_ok = (is_open & ~pre_ok) == 0

        def bit(vec, index):
            return vec.bit_select(index, 1) if nb > 1 else vec[0]

        # ------------------------------------------------------- PIM row buffer (two row buffers)
        # Only all-bank commands use it, so one state stands for every bank's PIM buffer (as in the device).
        pim_rd_op = op.as_value().matches(PimOp.MACSB, PimOp.MACAB, PimOp.AF)
        if dual:
            p_open, p_row, p_rcd_ok, p_ras_ok, p_rp_ok, p_rtp_ok = pim_row_buffer(
                m, t, iss & (op == PimOp.PACTAB), iss & (op == PimOp.PPREAB), iss & pim_rd_op, iss_row)
            p_pre_ok = ~p_open | (p_ras_ok & p_rtp_ok)
        else:
            p_open = Const(0, 1)
            p_row = Const(0, rb)
            p_rcd_ok = p_ras_ok = p_rp_ok = p_rtp_ok = p_pre_ok = Const(1, 1)

        # ------------------------------------------------------- channel-wide timing
        is_act = op.as_value().matches(PimOp.ACT, PimOp.ACTAB, *((PimOp.PACTAB,) if dual else ()))
        col_cmd = op.as_value().matches(*COLUMN_OPS)
        is_mac = op.as_value().matches(PimOp.MACSB, PimOp.MACAB)
        ccd_ok = countdown(m, "ccd", t.tCCD, iss & col_cmd)
        rrd_ok = countdown(m, "rrd", t.tRRD, iss & is_act)
        rfc_ok = countdown(m, "rfc", t.tRFC, iss & (op == PimOp.REF))
        mac_ok = countdown(m, "mac", t.tMAC, iss & is_mac)
        af_ok = countdown(m, "afl", t.tAF, iss & (op == PimOp.AF))
        faw_ok = faw_window(m, t.tFAW, iss & is_act)
        act_timing_ok = rfc_ok & rrd_ok & faw_ok      # plus the bank's tRP
        ref_ok = all_closed & (rp_ok == all_banks) & rfc_ok & ~p_open & p_rp_ok

        # ------------------------------------------------------- refresh credit
        owed = refresh_credit(m, t.tREFI, t.refresh_postpone, iss & (op == PimOp.REF))
        m.d.comb += self.refresh_owed.eq(Mux(owed < 0, 0, owed))
        urgent = owed >= t.refresh_postpone

        # ------------------------------------------------------- response pipeline
        # Stage k holds what was decided k+1 cycles ago; stage tRL meets the device's read data.
        n_stages = t.tRL + 1
        st_valid = Signal(n_stages)
        st_pim = Signal(n_stages)
        st_read = Signal(n_stages)
        st_write = Signal(n_stages)
        st_err = Signal(n_stages)
        st_tag = [Signal(TAG_BITS, name=f"st_tag{k}") for k in range(n_stages)]
        in_valid, in_pim, in_read, in_write, in_err = Signal(), Signal(), Signal(), Signal(), Signal()
        in_tag = Signal(TAG_BITS)
        m.d.sync += [
            st_valid.eq(Cat(in_valid, st_valid[:-1])), st_pim.eq(Cat(in_pim, st_pim[:-1])),
            st_read.eq(Cat(in_read, st_read[:-1])), st_write.eq(Cat(in_write, st_write[:-1])),
            st_err.eq(Cat(in_err, st_err[:-1])), st_tag[0].eq(in_tag),
        ]
        m.d.sync += [st_tag[k].eq(st_tag[k - 1]) for k in range(1, n_stages)]
        last = n_stages - 1
        out_data = Mux(st_read[last] & ~st_err[last], self.bus.rdata, 0)

        depth = self.resp_depth
        m.submodules.resp_fifo = resp_fifo = SyncFIFOBuffered(width=len(self.resp.payload.as_value()),
                                                              depth=depth)
        m.submodules.pim_fifo = pim_fifo = SyncFIFOBuffered(width=len(self.pim_resp.payload.as_value()),
                                                             depth=depth)
        resp_word = Signal(response_layout(cfg))
        pim_word = Signal(pim_response_layout(cfg))
        m.d.comb += [
            resp_word.data.eq(out_data), resp_word.tag.eq(st_tag[last]), resp_word.write.eq(st_write[last]),
            resp_word.error.eq(st_err[last]),
            pim_word.data.eq(out_data), pim_word.tag.eq(st_tag[last]), pim_word.error.eq(st_err[last]),
            resp_fifo.w_data.eq(resp_word.as_value()),
            resp_fifo.w_en.eq(st_valid[last] & ~st_pim[last]),
            pim_fifo.w_data.eq(pim_word.as_value()),
            pim_fifo.w_en.eq(st_valid[last] & st_pim[last]),
            self.resp.valid.eq(resp_fifo.r_rdy), self.resp.payload.eq(resp_fifo.r_data),
            resp_fifo.r_en.eq(self.resp.ready),
            self.pim_resp.valid.eq(pim_fifo.r_rdy), self.pim_resp.payload.eq(pim_fifo.r_data),
            pim_fifo.r_en.eq(self.pim_resp.ready),
        ]
        # Credits: responses reserved (in the pipeline or the FIFO) per FIFO.
        resp_used = Signal(range(depth + 1))
        pim_used = Signal(range(depth + 1))
        resp_credit = resp_used < depth
        pim_credit = pim_used < depth
        m.d.sync += [
            resp_used.eq(resp_used + (in_valid & ~in_pim) - (self.resp.valid & self.resp.ready)),
            pim_used.eq(pim_used + (in_valid & in_pim) - (self.pim_resp.valid & self.pim_resp.ready)),
        ]

        # ------------------------------------------------------- mode machine
        mode_pim = Signal()          # "PIM": the PIM stream is served (exclusively)
        mode_normal = Signal()       # "Normal": normal requests are served
        # With two row buffers the PIM stream's PIM-buffer and global-buffer commands run beside normal
        # traffic; only its normal-buffer commands (the PCU's transfers: ACT/RD/WR/PRE/PREAB) need the
        # channel to itself: the controller enters the exclusive mode when one reaches the head of the
        # stream or when pim_mode announces them (the PCU raises it only around its transfers then).
        head_normal = self.pim.valid & self.pim.payload.op.as_value().matches(
            PimOp.ACT, PimOp.ACTAB, PimOp.PRE, PimOp.PREAB, PimOp.RD, PimOp.WR, PimOp.REF)
        want_excl = (head_normal | self.pim_mode) if dual else self.pim_mode
        with m.FSM(name="mode"):
            with m.State("Normal"):
                m.d.comb += mode_normal.eq(~want_excl)
                with m.If(want_excl):
                    m.next = "Close-Rows"
            with m.State("Close-Rows"):
                with m.If(~want_excl):
                    m.next = "Normal"
                with m.Elif(all_closed):
                    m.next = "PIM"
            with m.State("PIM"):
                if dual:
                    # Leave once the stream's normal-buffer work is over and its rows are closed.
                    m.d.comb += mode_pim.eq(1)
                    with m.If(all_closed & ~want_excl):
                        m.next = "Normal"
                else:
                    m.d.comb += mode_pim.eq(self.pim_mode)
                    with m.If(~self.pim_mode):
                        m.next = "Normal"
        closing = Signal()
        m.d.comb += closing.eq(want_excl & ~mode_normal & ~mode_pim)

        # ------------------------------------------------------- request queue
        D = self._queue_depth
        q_row = [Signal(rb, name=f"q{i}_row") for i in range(D)]
        q_bank = [Signal(bb, name=f"q{i}_bank") for i in range(D)]
        q_col = [Signal(cb, name=f"q{i}_col") for i in range(D)]
        q_write = [Signal(name=f"q{i}_write") for i in range(D)]
        q_data = [Signal(p.column_bits, name=f"q{i}_data") for i in range(D)]
        q_mask = [Signal(p.column_bytes, name=f"q{i}_mask") for i in range(D)]
        q_tag = [Signal(TAG_BITS, name=f"q{i}_tag") for i in range(D)]
        q_miss = [Signal(name=f"q{i}_miss") for i in range(D)]
        count = Signal(range(D + 1))
        q_valid = [count > i for i in range(D)]

        # Per-entry status.
        hit = Signal(D)
        blocked = Signal(D)
        for i in range(D):
            m.d.comb += hit[i].eq(q_valid[i] & bit(is_open, q_bank[i]) & (open_row[q_bank[i]] == q_row[i]))
            same = [q_valid[j] & (q_row[j] == q_row[i]) & (q_bank[j] == q_bank[i]) & (q_col[j] == q_col[i])
                    for j in range(i)]
            m.d.comb += blocked[i].eq(Cat(*same).any() if same else 0)
        hit_in_bank = Signal(nb)           # some queued request hits the bank's open row
        for b in range(nb):
            m.d.comb += hit_in_bank[b].eq(Cat(*[hit[i] & (q_bank[i] == b) for i in range(D)]).any())

        # Starvation guard: the oldest request waited too long behind younger hits.
        head_age = Signal(range(self._starve_limit + 1))
        starving = Signal()
        m.d.comb += starving.eq(q_valid[0] & ~hit[0] & (head_age == self._starve_limit))

        # Two row buffers: a row the PIM buffer holds (or a waiting PACTAB wants) is not activated in the
        # normal buffer, and hits to a bank that must close for a waiting PACTAB are held back.
        pact_pending = (self.pim.valid & (self.pim.payload.op == PimOp.PACTAB)) if dual else Const(0, 1)
        pact_row = self.pim.payload.row
        col_ready = Signal(D)
        row_ready = Signal(D)
        for i in range(D):
            b = q_bank[i]
            held = starving & (q_bank[i] == q_bank[0]) if i > 0 else Const(0, 1)
            if dual:
                held = held | (pact_pending & (open_row[b] == pact_row))
                row_taken = (p_open & (p_row == q_row[i])) | (pact_pending & (pact_row == q_row[i]))
            else:
                row_taken = Const(0, 1)
            rcd = Mux(q_write[i], bit(rcdwr_ok, b), bit(rcdrd_ok, b))
            m.d.comb += col_ready[i].eq(hit[i] & ~blocked[i] & ~held & rcd & ccd_ok & resp_credit)
            needs_act = q_valid[i] & ~bit(is_open, b) & ~row_taken
            needs_pre = q_valid[i] & bit(is_open, b) & ~hit[i] & \
                (~bit(hit_in_bank, b) | (starving & (b == q_bank[0])))
            m.d.comb += row_ready[i].eq((needs_act & bit(rp_ok, b) & act_timing_ok) |
                                        (needs_pre & bit(pre_ok, b)))

        col_sel = Signal(range(D))
        row_sel = Signal(range(D))
        for i in reversed(range(D)):           # the lowest index (oldest) wins
            with m.If(col_ready[i]):
                m.d.comb += col_sel.eq(i)
            with m.If(row_ready[i]):
                m.d.comb += row_sel.eq(i)
        any_col = col_ready.any()
        any_row = row_ready.any()

        # ------------------------------------------------------- incoming requests
        fields = amap.rtl_fields(self.req.payload.addr)
        req_err = fields["misaligned"] | (fields["channel"] != self.chan_id)
        err_accept = Signal()
        enq = Signal()
        m.d.comb += [
            self.req.ready.eq(Mux(req_err, err_accept, count < D)),
            enq.eq(self.req.valid & ~req_err & (count < D)),
        ]

        # ------------------------------------------------------- PIM command legality
        pc = self.pim.payload
        pop = pc.op.as_value()
        pbank = pc.bank if p.bank_addr_bits else Const(0, 1)
        p_open_b = bit(is_open, pbank)
        timing_ok = Signal()
        state_bad = Signal()
        pim_holds = p_open & (p_row == pc.row)
        # PACTAB of a row some bank's normal buffer holds: the controller closes those banks first.
        conflict = Signal(nb)
        if dual:
            m.d.comb += conflict.eq(Mux(self.pim.valid & (pc.op == PimOp.PACTAB),
                                        Cat(*[is_open[b] & (open_row[b] == pc.row) for b in range(nb)]), 0))
        conflict_bank = Signal(bb)
        for b in reversed(range(nb)):
            with m.If(conflict[b]):
                m.d.comb += conflict_bank.eq(b)
        with m.Switch(pc.op):
            with m.Case(PimOp.NOP):
                m.d.comb += timing_ok.eq(1)
            with m.Case(PimOp.ACT):
                m.d.comb += [state_bad.eq(p_open_b | pim_holds),
                             timing_ok.eq(bit(rp_ok, pbank) & act_timing_ok)]
            with m.Case(PimOp.ACTAB):
                m.d.comb += [state_bad.eq(~all_closed | pim_holds),
                             timing_ok.eq((rp_ok == all_banks) & act_timing_ok)]
            with m.Case(PimOp.PRE):
                m.d.comb += timing_ok.eq(~p_open_b | bit(pre_ok, pbank))
            with m.Case(PimOp.PREAB):
                m.d.comb += timing_ok.eq(preab_ok)
            with m.Case(PimOp.RD):
                m.d.comb += [state_bad.eq(~p_open_b), timing_ok.eq(bit(rcdrd_ok, pbank) & ccd_ok)]
            with m.Case(PimOp.WR):
                m.d.comb += [state_bad.eq(~p_open_b), timing_ok.eq(bit(rcdwr_ok, pbank) & ccd_ok)]
            if dual:
                with m.Case(PimOp.MACSB, PimOp.MACAB):
                    m.d.comb += [state_bad.eq(~p_open), timing_ok.eq(p_rcd_ok & ccd_ok)]
                with m.Case(PimOp.AF):
                    m.d.comb += [state_bad.eq(~p_open | (p_row < p.data_rows)),
                                 timing_ok.eq(p_rcd_ok & mac_ok & ccd_ok)]
                with m.Case(PimOp.PACTAB):
                    m.d.comb += [state_bad.eq(p_open),
                                 timing_ok.eq(p_rp_ok & act_timing_ok & (conflict == 0))]
                with m.Case(PimOp.PPREAB):
                    m.d.comb += timing_ok.eq(p_pre_ok)
            else:
                with m.Case(PimOp.MACSB):
                    m.d.comb += [state_bad.eq(~p_open_b), timing_ok.eq(bit(rcdrd_ok, pbank) & ccd_ok)]
                with m.Case(PimOp.MACAB):
                    m.d.comb += [state_bad.eq(is_open != all_banks),
                                 timing_ok.eq((rcdrd_ok == all_banks) & ccd_ok)]
                with m.Case(PimOp.AF):
                    af_rows = Cat(*[open_row[b] >= p.data_rows for b in range(nb)])
                    m.d.comb += [state_bad.eq((is_open != all_banks) | (af_rows != all_banks)),
                                 timing_ok.eq((rcdrd_ok == all_banks) & mac_ok & ccd_ok)]
            with m.Case(PimOp.REF):
                m.d.comb += [state_bad.eq(~all_closed | p_open), timing_ok.eq(ref_ok)]
            with m.Case(PimOp.WRGB):
                m.d.comb += [state_bad.eq(pc.col >= p.gb_columns), timing_ok.eq(ccd_ok)]
            with m.Case(PimOp.WRBIAS, PimOp.RDMAC):
                m.d.comb += [state_bad.eq(pc.col >= p.acc_groups), timing_ok.eq(mac_ok & ccd_ok)]
            with m.Case(PimOp.RDAF):
                m.d.comb += [state_bad.eq(pc.col >= p.acc_groups), timing_ok.eq(af_ok & ccd_ok)]
            with m.Default():
                m.d.comb += [state_bad.eq(1), timing_ok.eq(1)]
        p_reads = pop.matches(*READ_OPS)

        # ------------------------------------------------------- refresh machine + arbitration
        reopen = Signal(nb)
        reopen_bank = Signal(bb)
        for b in reversed(range(nb)):
            with m.If(reopen[b]):
                m.d.comb += reopen_bank.eq(b)
        same_rows = Cat(*[open_row[b] == open_row[0] for b in range(nb)]).all()
        refreshing = Signal()
        ref_start = Signal()
        forced = Signal()
        n_forced = Signal(32)

        def issue(opv, bank=0, row=0, col=0, data_=0, mask=0):
            m.d.comb += [iss.eq(1), iss_op.eq(opv), iss_bank.eq(bank), iss_row.eq(row), iss_col.eq(col),
                         iss_data.eq(data_), iss_mask.eq(mask)]

        chan_idle = Mux(mode_pim, all_closed, mode_normal & (count == 0)) & ~p_open
        p_reopen = Signal()            # the PIM buffer's row is reopened after the refresh
        with m.FSM(name="refresh"):
            with m.State("Idle"):
                with m.If((owed >= 1) & (urgent | chan_idle)):
                    # Nothing else issues in this cycle either, so ``is_open`` is what Drain closes.
                    m.d.comb += ref_start.eq(1)
                    m.d.sync += [reopen.eq(Mux(mode_pim, is_open, 0)), forced.eq(urgent), p_reopen.eq(p_open)]
                    m.next = "Drain"
            with m.State("Drain"):
                m.d.comb += refreshing.eq(1)
                with m.If(~all_closed):
                    with m.If(preab_ok):
                        issue(PimOp.PREAB)
                if dual:
                    with m.Elif(p_open):
                        with m.If(p_pre_ok):
                            issue(PimOp.PPREAB)
                with m.Elif(ref_ok):
                    issue(PimOp.REF)
                    m.d.sync += n_forced.eq(n_forced + forced)
                    m.next = "Reopen"
            with m.State("Reopen"):
                m.d.comb += refreshing.eq(1)
                if dual:
                    with m.If(p_reopen):
                        with m.If(p_rp_ok & act_timing_ok):
                            issue(PimOp.PACTAB, row=p_row)
                            m.d.sync += p_reopen.eq(0)
                with (m.Elif if dual else m.If)(reopen == 0):
                    m.next = "Idle"
                with m.Elif((reopen == all_banks) & same_rows):
                    with m.If((rp_ok == all_banks) & act_timing_ok):
                        issue(PimOp.ACTAB, row=open_row[0])
                        m.d.sync += reopen.eq(0)
                        m.next = "Idle"
                with m.Elif(bit(rp_ok, reopen_bank) & act_timing_ok):
                    issue(PimOp.ACT, bank=reopen_bank, row=open_row[reopen_bank])
                    m.d.sync += reopen.bit_select(reopen_bank, 1).eq(0) if nb > 1 else reopen.eq(0)

        # Normal requests and the PIM stream, when the refresh machine leaves the bus free.
        rm = Signal()                  # the entry col_sel leaves the queue
        pim_take = Signal()
        pim_refuse = Signal()
        sel_bank = Array(q_bank)[row_sel]
        sel_row = Array(q_row)[row_sel]
        # Who gets the bus: the PIM stream (exclusive mode, or beside normal traffic with two row buffers:
        # then ``arbitration`` decides when both could issue) or the FR-FCFS scheduler.
        conflict_pre = (conflict != 0) & bit(pre_ok, conflict_bank)
        serve_pim = (mode_pim | mode_normal) if dual else mode_pim
        pim_go = Signal()
        norm_go = Signal()
        pim_win = Signal()
        m.d.comb += [
            pim_go.eq(serve_pim & self.pim.valid & (~p_reads | pim_credit) & (state_bad | timing_ok | conflict_pre)),
            norm_go.eq(mode_normal & ((starving & row_ready[0]) | any_col | any_row)),
        ]
        if not dual or self._arbitration == "pim_first":
            m.d.comb += pim_win.eq(pim_go)
        elif self._arbitration == "normal_first":
            m.d.comb += pim_win.eq(pim_go & ~norm_go)
        else:                          # fair: alternate while both want the bus
            last_pim = Signal()
            m.d.comb += pim_win.eq(pim_go & (~norm_go | ~last_pim))
            with m.If(pim_go & norm_go & ~refreshing & ~ref_start & ~closing):
                m.d.sync += last_pim.eq(pim_win)
        with m.If(~refreshing & ~ref_start):
            with m.If(closing):
                with m.If(~all_closed & preab_ok):
                    issue(PimOp.PREAB)
            with m.Elif(pim_win):
                with m.If(state_bad):
                    m.d.comb += [pim_take.eq(1), pim_refuse.eq(1)]
                with m.Elif(timing_ok):
                    m.d.comb += pim_take.eq(1)
                    with m.If(pc.op != PimOp.NOP):
                        issue(pc.op, pbank, pc.row, pc.col, pc.data, pc.mask)
                with m.Else():             # close a normal row the PACTAB needs (two row buffers)
                    issue(PimOp.PRE, bank=conflict_bank)
            with m.Elif(norm_go):
                with m.If(starving & row_ready[0]):
                    issue(Mux(bit(is_open, q_bank[0]), PimOp.PRE, PimOp.ACT), q_bank[0], q_row[0])
                with m.Elif(any_col):
                    qs = col_sel
                    m.d.comb += rm.eq(1)
                    issue(Mux(Array(q_write)[qs], PimOp.WR, PimOp.RD), Array(q_bank)[qs], 0,
                          Array(q_col)[qs], Array(q_data)[qs], Array(q_mask)[qs])
                with m.Elif(any_row):
                    issue(Mux(bit(is_open, sel_bank), PimOp.PRE, PimOp.ACT), sel_bank, sel_row)
        m.d.comb += self.pim.ready.eq(pim_take)

        # Response pipeline input: a column command, else a refused PIM read, else an error request.
        with m.If(rm):
            m.d.comb += [in_valid.eq(1), in_read.eq(~Array(q_write)[col_sel]), in_write.eq(Array(q_write)[col_sel]),
                         in_tag.eq(Array(q_tag)[col_sel])]
        with m.Elif(pim_take & p_reads):
            m.d.comb += [in_valid.eq(1), in_pim.eq(1), in_read.eq(1), in_err.eq(pim_refuse),
                         in_tag.eq(pc.tag)]
        with m.Elif(self.req.valid & req_err & resp_credit):
            m.d.comb += [err_accept.eq(1), in_valid.eq(1), in_err.eq(1), in_write.eq(self.req.payload.write),
                         in_tag.eq(self.req.payload.tag)]

        # ------------------------------------------------------- queue update
        # Flag entries whose row is being activated (they will count as misses).
        miss_next = [Signal(name=f"q{i}_miss_next") for i in range(D)]
        act_now = iss & is_act
        for i in range(D):
            m.d.comb += miss_next[i].eq(q_miss[i] | (act_now & ((op == PimOp.ACTAB) | (iss_bank == q_bank[i])) &
                                                     (iss_row == q_row[i])))
        slot = count - rm
        inc = self.req.payload
        for i in range(D):
            # The last entry never shifts in from above: on removal it empties (count drops).
            shift = rm & (col_sel <= i) if i < D - 1 else None
            with m.If(enq & (slot == i)):
                m.d.sync += [q_row[i].eq(fields["row"]), q_bank[i].eq(fields["bank"]), q_col[i].eq(fields["column"]),
                             q_write[i].eq(inc.write), q_data[i].eq(inc.data), q_mask[i].eq(inc.mask),
                             q_tag[i].eq(inc.tag), q_miss[i].eq(0)]
            with m.Elif(shift if shift is not None else Const(0, 1)):
                j = min(i + 1, D - 1)
                m.d.sync += [q_row[i].eq(q_row[j]), q_bank[i].eq(q_bank[j]), q_col[i].eq(q_col[j]),
                             q_write[i].eq(q_write[j]), q_data[i].eq(q_data[j]), q_mask[i].eq(q_mask[j]),
                             q_tag[i].eq(q_tag[j]), q_miss[i].eq(miss_next[j])]
            with m.Else():
                m.d.sync += q_miss[i].eq(miss_next[i])
        m.d.sync += count.eq(count - rm + enq)
        with m.If((rm & (col_sel == 0)) | (count == 0) | hit[0]):
            m.d.sync += head_age.eq(0)
        with m.Elif(head_age != self._starve_limit):
            m.d.sync += head_age.eq(head_age + 1)

        # ------------------------------------------------------- bus register
        bus = self.bus
        m.d.sync += [
            bus.op.eq(Mux(iss, iss_op, PimOp.NOP)),
            bus.bank.eq(iss_bank), bus.row.eq(iss_row), bus.col.eq(iss_col),
            bus.data.eq(iss_data), bus.mask.eq(iss_mask),
        ]

        # ------------------------------------------------------- status and counters
        pim_in_flight = (st_valid & st_pim).any()
        m.d.comb += self.pim_idle.eq(~self.pim.valid & ~pim_in_flight)
        with m.If(self.clear_error):
            m.d.sync += self.pim_error.eq(0)
        with m.Elif(pim_refuse):
            m.d.sync += self.pim_error.eq(1)
        ctr = self.counters
        busy = (count != 0) | self.pim.valid | (st_valid != 0) | refreshing | resp_fifo.r_rdy | pim_fifo.r_rdy
        m.d.comb += ctr.forced_refreshes.eq(n_forced)
        m.d.sync += [
            ctr.busy.eq(ctr.busy + busy),
            ctr.commands.eq(ctr.commands + iss),
            ctr.refreshes.eq(ctr.refreshes + (iss & (op == PimOp.REF))),
            ctr.row_hits.eq(ctr.row_hits + (rm & ~Array(q_miss)[col_sel])),
            ctr.row_misses.eq(ctr.row_misses + (rm & Array(q_miss)[col_sel])),
            ctr.pim_wait.eq(ctr.pim_wait + ((count != 0) & ~mode_normal)),
            ctr.pim_commands.eq(ctr.pim_commands + pim_take),
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

    Members (``c`` = channel)
    -------------------------
    r<c>, q<c> : normal requests in, responses out
    p<c>, pr<c> : PIM micro commands in, PIM responses out
    mode<c>, pidle<c>, perr<c>, owed<c> : ``pim_mode``, ``pim_idle``, ``pim_error``, ``refresh_owed``
    k<c> : the controller's performance counters
    mon<c> : the command bus the device sees
    s<c> : the device's status (violation flags and event counters)
    bd_load : the device's back door
    """

    def __init__(self, cfg: SystemConfig, device_factory, queue_depth: int = 8, arbitration: str = "pim_first"):
        from .pim.channel import PimStatusSignature

        if not isinstance(cfg, SystemConfig):
            raise TypeError(f"Configuration must be a SystemConfig, not {cfg!r}")
        if not callable(device_factory):
            raise TypeError(f"Device factory must be callable, not {device_factory!r}")
        self._cfg = cfg
        self._device_factory = device_factory
        self._queue_depth = queue_depth
        self._arbitration = arbitration
        members = {"bd_load": In(1)}
        for c in range(cfg.pim.channels):
            members.update({
                f"r{c}": In(stream.Signature(request_layout(cfg))),
                f"q{c}": Out(stream.Signature(response_layout(cfg))),
                f"p{c}": In(stream.Signature(pim_command_layout(cfg))),
                f"pr{c}": Out(stream.Signature(pim_response_layout(cfg))),
                f"mode{c}": In(1), f"pidle{c}": Out(1), f"perr{c}": Out(1), f"owed{c}": Out(8),
                f"k{c}": Out(MemCtrlCounters()),
                f"mon{c}": Out(BusMonitorSignature(cfg)),
                f"s{c}": Out(PimStatusSignature()),
            })
        super().__init__(members)

    def elaborate(self, platform):
        m = Module()
        m.submodules.device = dev = self._device_factory()
        m.d.comb += dev.bd_load.eq(self.bd_load)
        for c in range(self._cfg.pim.channels):
            mc = m.submodules[f"mc{c}"] = MemoryController(self._cfg, self._queue_depth,
                                                          arbitration=self._arbitration)
            wiring.connect(m, wiring.flipped(getattr(self, f"r{c}")), mc.req)
            wiring.connect(m, mc.resp, wiring.flipped(getattr(self, f"q{c}")))
            wiring.connect(m, wiring.flipped(getattr(self, f"p{c}")), mc.pim)
            wiring.connect(m, mc.pim_resp, wiring.flipped(getattr(self, f"pr{c}")))
            wiring.connect(m, mc.counters, wiring.flipped(getattr(self, f"k{c}")))
            wiring.connect(m, mc.bus, getattr(dev, f"c{c}"))
            wiring.connect(m, getattr(dev, f"s{c}"), wiring.flipped(getattr(self, f"s{c}")))
            mon = getattr(self, f"mon{c}")
            m.d.comb += [
                mc.chan_id.eq(c), mc.pim_mode.eq(getattr(self, f"mode{c}")),
                getattr(self, f"pidle{c}").eq(mc.pim_idle), getattr(self, f"perr{c}").eq(mc.pim_error),
                getattr(self, f"owed{c}").eq(mc.refresh_owed),
                mon.op.eq(mc.bus.op), mon.bank.eq(mc.bus.bank), mon.row.eq(mc.bus.row), mon.col.eq(mc.bus.col),
                mon.rvalid.eq(mc.bus.rvalid),
            ]
        return m
