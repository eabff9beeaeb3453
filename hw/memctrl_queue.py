"""The memory controller's normal requests: the request queue and its FR-FCFS scheduler (issue 16).

:class:`RequestQueue` holds the requests with their per-entry state (row hit, blocked behind an older
request to the same address, counted as a row miss, the head's age); :class:`Scheduler` computes which
entries could issue a command this cycle and picks one, FR-FCFS with an open-page policy. Both are wired by
:class:`hw.memctrl.MemoryController` with the parts of :mod:`hw.memctrl_parts`.
"""

from types import SimpleNamespace

from amaranth.hdl import Array, Cat, Const, Module, Mux, Signal
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from .config import SystemConfig
from .memctrl_parts import (
    BidSignature,
    ChannelStateSignature,
    CommandSignature,
    ResponseSourceSignature,
    bit_of,
    propose,
    widths,
)
from .memif import TAG_BITS, AddressMap, request_layout
from .pim.commands import PimOp

__all__ = ["entry_layout", "picked_layout", "RequestQueue", "Scheduler"]


def entry_layout(cfg: SystemConfig) -> data.StructLayout:
    """What the scheduler sees of one queue entry: ``valid``, its ``bank``, ``row``, ``write``, whether its
    row is open (``hit``) and whether an older queued request has the same address (``blocked``)."""
    rb, bb, _ = widths(cfg)
    fields = {"valid": 1, "bank": bb, "row": rb, "write": 1, "hit": 1, "blocked": 1}
    if cfg.pim.pick_stages:
        # The readiness registered per entry (:class:`RequestQueue`): for the command the registered pick
        # decides this cycle, which goes on the bus next cycle.
        fields.update({"r_col": 1, "r_act": 1, "r_pre": 1, "r_hib": 1})
    return data.StructLayout(fields)


def picked_layout(cfg: SystemConfig) -> data.StructLayout:
    """The fields of the entry the scheduler picked for a column command (the queue's read port)."""
    p = cfg.pim
    _, bb, cb = widths(cfg)
    return data.StructLayout({"bank": bb, "col": cb, "write": 1, "data": p.column_bits, "mask": p.column_bytes,
                              "tag": TAG_BITS, "miss": 1})


def _oldest_first(m, depth, *choices):
    """FR-FCFS's age order: for each ``(ready, sel)``, ``sel`` = the lowest index (the oldest entry) whose
    ``ready`` bit is set (unchanged when none is)."""
    for i in reversed(range(depth)):
        for ready, sel in choices:
            with m.If(ready[i]):
                m.d.comb += sel.eq(i)


class RequestQueue(wiring.Component):
    """The normal requests, oldest first.

    The queue keeps age order (oldest at index 0; it collapses on removal). A request whose address is not
    column-aligned, or whose channel field is not ``chan_id``, is not queued: it goes to the response pipe
    as an error (``err_resp``) and is consumed when the pipe accepts it (``err_accept``).

    Members
    -------
    req : In(stream.Signature(request_layout(cfg)))
    chan_id : In(8)
    state : In(ChannelStateSignature(cfg))
    issued : In(CommandSignature(cfg))
        The command decided this cycle: an activation of an entry's row marks the entry as a row miss.
    pick, remove : In(range(depth)), In(1)
        The entry the scheduler picked for a column command (read through ``picked``), and whether it
        leaves the queue this cycle.
    err_accept : In(1)
    entries : Out(data.ArrayLayout(entry_layout(cfg), depth))
    picked : Out(picked_layout(cfg))
    hit_in_bank : Out(banks)
        Some queued request hits the bank's open row.

    With a registered pick (``PimGeometry.pick_stages = 1``) the row hits are registers, updated by the
    issued ACT / ACTAB / PRE / PREAB (no open-row lookup per entry), and each entry carries its readiness
    for the pick, registered a cycle ahead (``r_col``, ``r_act``, ``r_pre``, ``r_hib`` of
    :func:`entry_layout`; :meth:`_readiness`). The removal is registered too: an entry granted in cycle
    ``t`` (``remove``) is a hole in ``t + 1`` (not valid, ready for nothing, not counted) and the queue
    collapses over it at the end of ``t + 1``, so no path runs from the grant into the shift of the
    entries.
    collapse : Out(depth)
        With a registered pick: the entries that shift down at the end of this cycle (a registered
        thermometer, from the hole up; the scheduler follows it with the index of its pick).
    starving : Out(1)
        The oldest request waited ``starve_limit`` cycles without its row being open.
    count : Out(range(depth + 1))
        The queued requests (a hole not counted).
    empty : Out(1)
        With a registered pick: ``count == 0``, from a register.
    col_resp, err_resp : Out(ResponseSourceSignature())
        The removed entry's response (a read or a write acknowledgement) and the error response.
    """

    def __init__(self, cfg: SystemConfig, depth: int, starve_limit: int):
        self._cfg = cfg
        self._depth = depth
        self._starve_limit = starve_limit
        super().__init__({
            "req": In(stream.Signature(request_layout(cfg))), "chan_id": In(8),
            "state": In(ChannelStateSignature(cfg)), "issued": In(CommandSignature(cfg)),
            "pick": In(range(depth)), "remove": In(1), "err_accept": In(1),
            "entries": Out(data.ArrayLayout(entry_layout(cfg), depth)), "picked": Out(picked_layout(cfg)),
            "hit_in_bank": Out(cfg.pim.banks), "starving": Out(1), "count": Out(range(depth + 1)),
            "col_resp": Out(ResponseSourceSignature()), "err_resp": Out(ResponseSourceSignature()),
            **({"collapse": Out(depth), "empty": Out(1)} if cfg.pim.pick_stages else {}),
        })

    def elaborate(self, platform):
        m = Module()
        cfg = self._cfg
        p = cfg.pim
        nb = p.banks
        rb, bb, cb = widths(cfg)
        dual = p.row_buffers == 2
        s = self.state
        open_row = Array(s.open_row[b] for b in range(nb))
        D = self._depth
        q_row = [Signal(rb, name=f"q{i}_row") for i in range(D)]
        q_bank = [Signal(bb, name=f"q{i}_bank") for i in range(D)]
        q_col = [Signal(cb, name=f"q{i}_col") for i in range(D)]
        q_write = [Signal(name=f"q{i}_write") for i in range(D)]
        q_data = [Signal(p.column_bits, name=f"q{i}_data") for i in range(D)]
        q_mask = [Signal(p.column_bytes, name=f"q{i}_mask") for i in range(D)]
        q_tag = [Signal(TAG_BITS, name=f"q{i}_tag") for i in range(D)]
        q_miss = [Signal(name=f"q{i}_miss") for i in range(D)]
        registered = p.pick_stages > 0
        if registered:
            # The removal is registered: the entry granted in cycle t leaves the queue at the end of t + 1. In
            # t + 1 it is a hole (``gone``, one-hot), invisible to everything else; ``collapse`` (registered,
            # a thermometer) says which entries shift down at the end of t + 1.
            count = Signal(range(D + 1), name="q_count")
            collapse = self.collapse
            gone = Signal(D, name="q_gone")
            m.d.comb += gone.eq(collapse & ~(collapse << 1)[:D])
            q_valid = [(count > i) & ~gone[i] for i in range(D)]
        else:
            count = self.count
            q_valid = [count > i for i in range(D)]

        # Per-entry status.
        hit = Signal(D)
        blocked = Signal(D)
        # With a registered pick the row hits are registers, kept up to date by the issued commands: the
        # command of a cycle is registered (``xq_*``) and applied in the next (to the row hits and the row
        # misses), so no path runs from the arbiter into the per-entry registers.
        q_hit = Signal(D, name="q_hit") if registered else None
        if registered:
            iss, iop = self.issued, self.issued.op.as_value()
            x_rowop, x_allop, x_opens, x_act, x_actab = (Signal(name=f"xq_{n}") for n in
                                                         ("rowop", "allop", "opens", "act", "actab"))
            x_bank, x_row = Signal(bb, name="xq_bank"), Signal(rb, name="xq_row")
            fresh = Signal(D, name="q_fresh")       # entered last cycle (last cycle's ACT is not its miss)
            m.d.sync += [x_rowop.eq(iss.valid & iop.matches(PimOp.ACT, PimOp.PRE)),
                         x_allop.eq(iss.valid & iop.matches(PimOp.ACTAB, PimOp.PREAB)),
                         x_opens.eq(iop.matches(PimOp.ACT, PimOp.ACTAB)),
                         x_act.eq(iss.valid & iop.matches(PimOp.ACT, PimOp.ACTAB,
                                                          *((PimOp.PACTAB,) if dual else ()))),
                         x_actab.eq(iss.op == PimOp.ACTAB), x_bank.eq(iss.bank), x_row.eq(iss.row)]
            miss_now = [Signal(name=f"q{i}_miss_now") for i in range(D)]
        for i in range(D):
            if registered:
                # An ACT / ACTAB of the entry's bank makes it a hit if it opens the entry's row (and a miss
                # if the entry was queued before), a PRE / PREAB makes it a miss.
                same_row, same_bank = x_row == q_row[i], x_bank == q_bank[i]
                m.d.comb += [
                    hit[i].eq(q_valid[i] & Mux(x_allop | (x_rowop & same_bank), x_opens & same_row, q_hit[i])),
                    miss_now[i].eq(q_miss[i] | (x_act & (x_actab | same_bank) & same_row & ~fresh[i])),
                ]
            else:
                m.d.comb += hit[i].eq(q_valid[i] & bit_of(s.is_open, q_bank[i], nb) &
                                      (open_row[q_bank[i]] == q_row[i]))
            same = [q_valid[j] & (q_row[j] == q_row[i]) & (q_bank[j] == q_bank[i]) & (q_col[j] == q_col[i])
                    for j in range(i)]
            m.d.comb += blocked[i].eq(Cat(*same).any() if same else 0)
        for b in range(nb):
            m.d.comb += self.hit_in_bank[b].eq(Cat(*[hit[i] & (q_bank[i] == b) for i in range(D)]).any())
        for i, e in enumerate(self.entries):
            m.d.comb += [e.valid.eq(q_valid[i]), e.bank.eq(q_bank[i]), e.row.eq(q_row[i]), e.write.eq(q_write[i]),
                         e.hit.eq(hit[i]), e.blocked.eq(blocked[i])]
        if registered:
            ready, ready_next = self._readiness(m, q_valid, q_bank, q_write, hit, blocked, gone)

        # Starvation guard: the oldest request waited too long behind younger hits.
        head_age = Signal(range(self._starve_limit + 1))
        m.d.comb += self.starving.eq(q_valid[0] & ~hit[0] & (head_age == self._starve_limit))
        if registered:
            # With a hole at the head (a removal of entry 0) the head is entry 1.
            head_hit = Mux(gone[0], hit[1] if D > 1 else 0, hit[0])

        # Read port: the picked entry.
        sel = self.pick
        k = self.picked
        m.d.comb += [k.bank.eq(Array(q_bank)[sel]), k.col.eq(Array(q_col)[sel]), k.write.eq(Array(q_write)[sel]),
                     k.data.eq(Array(q_data)[sel]), k.mask.eq(Array(q_mask)[sel]), k.tag.eq(Array(q_tag)[sel]),
                     k.miss.eq(Array(miss_now if registered else q_miss)[sel])]

        # Incoming requests; responses.
        amap = AddressMap(p)
        fields = amap.rtl_fields(self.req.payload.addr)
        req_err = fields["misaligned"] | (fields["channel"] != self.chan_id)
        enq = Signal()
        inc = self.req.payload
        rm, col_sel = (collapse[D - 1], None) if registered else (self.remove, self.pick)
        slot = count - rm
        room = (slot < D) if registered else (count < D)
        m.d.comb += [
            self.req.ready.eq(Mux(req_err, self.err_accept, room)),
            enq.eq(self.req.valid & ~req_err & room),
            self.err_resp.valid.eq(self.req.valid & req_err), self.err_resp.err.eq(1),
            self.err_resp.write.eq(inc.write), self.err_resp.tag.eq(inc.tag),
            self.col_resp.valid.eq(self.remove), self.col_resp.write.eq(k.write), self.col_resp.tag.eq(k.tag),
        ]

        # ------------------------------------------------------- queue update
        # Flag entries whose row is being activated (they will count as misses).
        if registered:
            miss_next = miss_now
        else:
            op, iss_bank, iss_row = self.issued.op, self.issued.bank, self.issued.row
            is_act = op.as_value().matches(PimOp.ACT, PimOp.ACTAB, *((PimOp.PACTAB,) if dual else ()))
            miss_next = [Signal(name=f"q{i}_miss_next") for i in range(D)]
            act_now = self.issued.valid & is_act
            for i in range(D):
                m.d.comb += miss_next[i].eq(q_miss[i] | (act_now & ((op == PimOp.ACTAB) | (iss_bank == q_bank[i])) &
                                                         (iss_row == q_row[i])))
        for i in range(D):
            # The last entry never shifts in from above: on removal it empties (count drops).
            if i == D - 1:
                shift = None
            else:
                shift = collapse[i] if registered else rm & (col_sel <= i)
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
        if registered:
            self._registered_update(m, SimpleNamespace(
                fields=fields, inc=inc, open_row=open_row, q_valid=q_valid, q_row=q_row, q_bank=q_bank, q_col=q_col,
                ready=ready, ready_next=ready_next, hit=hit, q_hit=q_hit, fresh=fresh, enq=enq, slot=slot,
                collapse=collapse, count=count, rm=rm, gone=gone, head_hit=head_hit, head_age=head_age))
            return m
        m.d.sync += count.eq(count - rm + enq)
        with m.If((rm & (col_sel == 0)) | (count == 0) | hit[0]):
            m.d.sync += head_age.eq(0)
        with m.Elif(head_age != self._starve_limit):
            m.d.sync += head_age.eq(head_age + 1)
        return m

    def _registered_update(self, m, c):
        """The registered pick's queue update (``pick_stages = 1``): the per-entry readiness registers of new
        and shifted entries, the count, the registered collapse of the removed entry and the head's age."""
        s, nb, D = self.state, self._cfg.pim.banks, self._depth
        fields, inc, open_row, q_valid, q_row, q_bank, q_col = (c.fields, c.inc, c.open_row, c.q_valid, c.q_row,
                                                                c.q_bank, c.q_col)
        ready, ready_next, hit, q_hit, fresh, enq, slot = (c.ready, c.ready_next, c.hit, c.q_hit, c.fresh, c.enq,
                                                           c.slot)
        collapse, count, rm, gone, head_hit, head_age = c.collapse, c.count, c.rm, c.gone, c.head_hit, c.head_age
        # A new entry's readiness from the request: as :meth:`_readiness` computes it for a queued one.
        in_row, in_bank, in_col = fields["row"], fields["bank"], fields["column"]
        in_hit = bit_of(s.is_open, in_bank, nb) & (open_row[in_bank] == in_row)
        in_blocked = Cat(*[q_valid[j] & (q_row[j] == in_row) & (q_bank[j] == in_bank) & (q_col[j] == in_col)
                           for j in range(D)]).any()
        ready_in = self._entry_ready(m, Const(1, 1), in_bank, inc.write, in_hit, in_blocked, "in")
        # The row hits before this cycle's command (applied next cycle, with ``xq_*``).
        ready["hit"], ready_in["hit"] = q_hit, in_hit
        m.d.comb += ready_next["hit"].eq(hit)
        m.d.sync += fresh.eq(Mux(enq, Cat(*[slot == i for i in range(D)]), 0))
        for i in range(D):
            with m.If(enq & (slot == i)):
                m.d.sync += [r[i].eq(ready_in[name]) for name, r in ready.items()]
            with m.Elif(collapse[i]):       # the entry above shifts in (the last one empties)
                m.d.sync += [r[i].eq(ready_next[name][i + 1] if i < D - 1 else 0) for name, r in ready.items()]
            with m.Else():
                m.d.sync += [r[i].eq(ready_next[name][i]) for name, r in ready.items()]
        count_next = Signal.like(count, name="q_count_next")
        m.d.comb += count_next.eq(count - rm + enq)
        m.d.sync += count.eq(count_next)
        # The granted entry's place as it will be next cycle, after this cycle's collapse.
        at = self.pick - collapse.bit_select(self.pick, 1)
        collapse_next = Signal.like(collapse, name="q_collapse_next")
        m.d.comb += collapse_next.eq(Mux(self.remove, Cat(*[at <= i for i in range(D)]), 0))
        m.d.sync += collapse.eq(collapse_next)
        m.d.comb += self.count.eq(slot)
        # ``count == 0`` registered (for Fmax: the refresh machine's idle check): next cycle's ``slot``.
        empty = Signal(init=1, name="q_empty")
        m.d.sync += empty.eq(count_next == collapse_next[D - 1])
        m.d.comb += self.empty.eq(empty)
        with m.If((slot == 0) | head_hit):
            m.d.sync += head_age.eq(0)
        with m.Elif(gone[0]):       # the new head's first cycle
            m.d.sync += head_age.eq(1)
        with m.Elif(head_age != self._starve_limit):
            m.d.sync += head_age.eq(head_age + 1)

    def _readiness(self, m, q_valid, q_bank, q_write, hit, blocked, gone):
        """The per-entry readiness for the registered pick (``pick_stages = 1``), registered a cycle ahead.

        Computed in cycle ``t`` from the entries and the channel state of ``t`` and registered (following
        the queue's collapse; a new entry's from the request), it is read by the pick of ``t + 1``, which
        decides the command for the bus register of ``t + 2``. So the bank windows are the ones two cycles
        ahead (``*_n2`` of the channel state). The command of ``t`` is not in them (the arbiter decides it
        late in the cycle): the pick of ``t + 1`` holds back the entries whose bank it activated or
        precharged (``x_row``: their row state is stale) and the PRE of a bank where it restarted a PRE
        window that still runs (``x_pre2``), both registered per bank; a command of ``t + 1`` drops the
        pick itself (:meth:`Scheduler._candidate`).
        Per entry: ``r_col`` (a row hit, not blocked, tRCD allows), ``r_act`` (its bank closed, tRP
        allows), ``r_pre`` (another row open, tRAS / tWR / tRTP allow), ``r_hib`` (some request hits its
        bank's open row: the policy holds the PRE back). Returns the registers and their inputs (dicts of
        ``Signal(depth)`` by name; the caller adds the row-hit registers, ``hit``, whose input it computes)."""
        D = self._depth
        names = ("r_col", "r_act", "r_pre", "r_hib")
        ready = {n: Signal(D, name=f"q_{n}") for n in names}
        ready_next = {n: Signal(D, name=f"q_{n}_next") for n in (*names, "hit")}

        for i in range(D):
            e = self._entry_ready(m, q_valid[i], q_bank[i], q_write[i], hit[i], blocked[i], f"q{i}")
            m.d.comb += [ready_next[n][i].eq(e[n]) for n in names]
        for i, e in enumerate(self.entries):       # a hole (``gone``) is ready for nothing
            m.d.comb += [e.r_col.eq(ready["r_col"][i] & ~gone[i]), e.r_act.eq(ready["r_act"][i] & ~gone[i]),
                         e.r_pre.eq(ready["r_pre"][i] & ~gone[i]), e.r_hib.eq(ready["r_hib"][i])]
        return ready, ready_next

    def _entry_ready(self, m, valid, bank, write, hit, blocked, prefix):
        """One entry's readiness (:meth:`_readiness`) from its fields; a dict of 1-bit signals by name."""
        nb = self._cfg.pim.banks
        s = self.state

        def bit(vec):
            return bit_of(vec, bank, nb)

        is_open = bit(s.is_open)
        rcd = Mux(write, bit(s.rcdwr_n2), bit(s.rcdrd_n2))
        e = {n: Signal(name=f"{prefix}_{n}_in") for n in ("r_col", "r_act", "r_pre", "r_hib")}
        m.d.comb += [
            e["r_col"].eq(hit & ~blocked & rcd),
            e["r_act"].eq(valid & ~is_open & bit(s.rp_n2)),
            e["r_pre"].eq(valid & is_open & ~hit & bit(s.pre_n2)),
            e["r_hib"].eq(bit(self.hit_in_bank)),
        ]
        return e


class Scheduler(wiring.Component):
    """FR-FCFS with an open page: which queued request gets a command, and which command.

    Every cycle each entry computes what it needs: a column command (row hit), ACT (bank closed) or PRE
    (another row open and no queued hit to that bank). A request is blocked while an older one to the same
    address is queued, so two requests to one address are never reordered. Priority: a starving head's ACT
    or PRE (younger hits to its bank are held back), then ready column commands (oldest first), then the
    oldest ready ACT or PRE. With two row buffers a row the PIM buffer holds (or a waiting PACTAB wants) is
    not activated in the normal buffer, and hits to a bank that must close for a waiting PACTAB are held
    back.

    With ``PimGeometry.pick_stages = 1`` (issue 15) the pick is registered: it is decided from the windows as
    they will be in the next cycle (``*_nx`` of the channel state; two response credits), held in registers
    and issued the cycle after (:meth:`_candidate`), so no path runs from a queue entry through the pick into
    the timing counters. The same policy, one cycle later; a registered column command's entry is not picked
    again while it bids, and its index follows the queue's collapse. The per-entry part of the decision (row
    hit, the bank's windows) is registered by the queue a cycle before the pick
    (:meth:`RequestQueue._readiness`), so the pick itself is a priority choice over registered bits
    (:meth:`_registered_pick`).

    Members
    -------
    entries, hit_in_bank, starving : In (from :class:`RequestQueue`)
    picked : In(picked_layout(cfg))
        The queue's read port at ``pick``.
    state : In(ChannelStateSignature(cfg))
    pact_pending, pact_row : In(1), In(row bits)
        A PACTAB waits at the head of the PIM stream, for that row.
    resp_credit : In(1)
        The response FIFO has room (a column command waits for it).
    resp_credit2 : In(1)
        With a registered pick: room for two (the pick is decided a cycle ahead).
    collapse : In(depth)
        With a registered pick: the queue's entries that shift down at the end of this cycle
        (:class:`RequestQueue`'s registered removal).
    mode_normal : In(1)
        Normal requests are served.
    pick : Out(range(depth))
        The oldest entry ready for a column command.
    bid : Out(BidSignature(cfg))
    remove : Out(1)
        The bid is granted with the ``pick`` entry's column command: it leaves the queue.
    """

    def __init__(self, cfg: SystemConfig, depth: int):
        self._cfg = cfg
        self._depth = depth
        rb, _, _ = widths(cfg)
        super().__init__({
            "entries": In(data.ArrayLayout(entry_layout(cfg), depth)), "hit_in_bank": In(cfg.pim.banks),
            "starving": In(1), "picked": In(picked_layout(cfg)), "state": In(ChannelStateSignature(cfg)),
            "pact_pending": In(1), "pact_row": In(rb), "resp_credit": In(1), "mode_normal": In(1),
            **({"resp_credit2": In(1), "collapse": In(depth)} if cfg.pim.pick_stages else {}),
            "pick": Out(range(depth)), "bid": Out(BidSignature(cfg)), "remove": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        p = self._cfg.pim
        nb = p.banks
        dual = p.row_buffers == 2
        registered = p.pick_stages > 0
        s = self.state
        is_open, p_open, p_row = s.is_open, s.p_open, s.p_row
        open_row = Array(s.open_row[b] for b in range(nb))
        D = self._depth
        q = self.entries
        q_bank, q_row, q_write = [q[i].bank for i in range(D)], [q[i].row for i in range(D)], [q[i].write for i in range(D)]
        q_valid, hit, blocked = [q[i].valid for i in range(D)], [q[i].hit for i in range(D)], [q[i].blocked for i in range(D)]
        starving, hit_in_bank = self.starving, self.hit_in_bank
        pact_pending, pact_row = self.pact_pending, self.pact_row

        def bit(vec, index):
            return bit_of(vec, index, nb)

        if registered:
            return self._registered_pick(m)
        rcdrd_ok, rcdwr_ok, rp_ok, pre_ok = s.rcdrd_ok, s.rcdwr_ok, s.rp_ok, s.pre_ok
        ccd_ok, act_ok, credit = s.ccd_ok, s.act_timing_ok, self.resp_credit

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
            ready = hit[i] & ~blocked[i] & ~held & rcd & ccd_ok & credit
            m.d.comb += col_ready[i].eq(ready)
            needs_act = q_valid[i] & ~bit(is_open, b) & ~row_taken
            needs_pre = q_valid[i] & bit(is_open, b) & ~hit[i] & \
                (~bit(hit_in_bank, b) | (starving & (b == q_bank[0])))
            m.d.comb += row_ready[i].eq((needs_act & bit(rp_ok, b) & act_ok) |
                                        (needs_pre & bit(pre_ok, b)))

        col_sel = self.pick
        row_sel = Signal(range(D))
        _oldest_first(m, D, (col_ready, col_sel), (row_ready, row_sel))
        any_col = col_ready.any()
        any_row = row_ready.any()
        sel_bank = Array(q_bank)[row_sel]
        sel_row = Array(q_row)[row_sel]

        k = self.picked
        col = Signal()                 # the bid is the picked entry's column command
        m.d.comb += self.bid.go.eq(self.mode_normal & ((starving & row_ready[0]) | any_col | any_row))
        with m.If(starving & row_ready[0]):
            propose(m, self.bid.cmd, Mux(bit(is_open, q_bank[0]), PimOp.PRE, PimOp.ACT), q_bank[0], q_row[0])
        with m.Elif(any_col):
            m.d.comb += col.eq(1)
            propose(m, self.bid.cmd, Mux(k.write, PimOp.WR, PimOp.RD), k.bank, 0, k.col, k.data, k.mask)
        with m.Elif(any_row):
            propose(m, self.bid.cmd, Mux(bit(is_open, sel_bank), PimOp.PRE, PimOp.ACT), sel_bank, sel_row)
        m.d.comb += self.remove.eq(self.bid.grant & col)
        return m

    def _registered_pick(self, m):
        """The registered pick (``pick_stages = 1``): a priority choice over the readiness the queue registered
        per entry (``r_col``, ``r_act``, ``r_pre``, ``r_hib``: :meth:`RequestQueue._readiness`), combined with
        the channel-wide windows one cycle ahead (tCCD; tRFC, tRRD, tFAW; two response credits), the
        starvation guard and, with two row buffers, the PIM buffer's rows; registered by :meth:`_register`."""
        p = self._cfg.pim
        dual = p.row_buffers == 2
        s = self.state
        open_row = Array(s.open_row[b] for b in range(p.banks))
        D = self._depth
        q = self.entries
        q_bank, q_row = [q[i].bank for i in range(D)], [q[i].row for i in range(D)]
        starving, pact_pending, pact_row = self.starving, self.pact_pending, self.pact_row
        cand = self._candidate(m)
        # The command issued last cycle (after the queue computed the readiness): its bank's row state is
        # stale (an ACT or PRE there), or a PRE window it restarted still runs.
        x_pre2 = Signal(p.banks, name="x_pre2")
        m.d.sync += x_pre2.eq(s.x_pre2)
        col_ready = Signal(D)
        act_ready = Signal(D)
        row_ready = Signal(D)
        for i in range(D):
            b = q_bank[i]
            touched = bit_of(cand.x_row, b, p.banks)
            pre_touched = bit_of(cand.x_row | x_pre2, b, p.banks)
            head_bank = (b == q_bank[0]) if i > 0 else Const(1, 1)
            held = starving & head_bank if i > 0 else Const(0, 1)
            if dual:
                held = held | (pact_pending & (open_row[b] == pact_row))
                row_taken = (s.p_open & (s.p_row == q_row[i])) | (pact_pending & (pact_row == q_row[i]))
            else:
                row_taken = Const(0, 1)
            # The candidate bidding now is not picked again (it may leave the queue this cycle).
            excluded = cand.go & cand.col & (cand.idx == i)
            m.d.comb += [
                col_ready[i].eq(q[i].r_col & ~touched & ~held & s.ccd_nx & self.resp_credit2 & ~excluded),
                act_ready[i].eq(q[i].r_act & ~touched & s.act_timing_nx & ~row_taken),
                row_ready[i].eq(act_ready[i] |
                                (q[i].r_pre & ~pre_touched & (~q[i].r_hib | (starving & head_bank)))),
            ]
        col_sel = Signal(range(D))
        row_sel = Signal(range(D))
        _oldest_first(m, D, (col_ready, col_sel), (row_ready, row_sel))
        self._register(m, cand, starving & row_ready[0], col_ready.any(), row_ready.any(), col_sel,
                       (Array(q_bank)[col_sel], Array(q[i].write for i in range(D))[col_sel]),
                       (~act_ready[0], q_bank[0], q_row[0]),
                       (~act_ready.bit_select(row_sel, 1), Array(q_bank)[row_sel], Array(q_row)[row_sel]))
        return m

    def _candidate(self, m):
        """The registered pick (``pick_stages = 1``): the command decided last cycle, and whether it may go now.

        It was decided from the windows as they would be this cycle; it is dropped (and picked again) when the
        command issued last cycle (``x_*``, registered here) touched what it relies on: its bank's row (an ACT
        or PRE there), for a PRE also a column command to its bank, for a column command a restarted tCCD,
        for an ACT any activation or REF (tRRD, tFAW, tRFC). It bids from its registers (bank, row; for a column
        command its direction) and, for a column command, the queue's read port at its index (column, data,
        mask)."""
        p, t = self._cfg.pim, self._cfg.timing
        nb = p.banks
        rb, bb, _ = widths(self._cfg)
        s = self.state
        c = SimpleNamespace(valid=Signal(name="c_valid"), col=Signal(name="c_col"), act=Signal(name="c_act"),
                            idx=Signal(range(self._depth), name="c_idx"), bank=Signal(bb, name="c_bank"),
                            row=Signal(rb, name="c_row"), go=Signal(name="c_go"), write=Signal(name="c_write"))
        x_row, x_col = Signal(nb, name="x_row"), Signal(nb, name="x_col")
        x_column, x_act = Signal(name="x_column"), Signal(name="x_act")
        m.d.sync += [x_row.eq(s.x_row), x_col.eq(s.x_col), x_column.eq(s.x_column), x_act.eq(s.x_act)]
        c.x_row = x_row
        row_hit = bit_of(x_row, c.bank, nb)
        ccd_hit = x_column if t.tCCD > 1 else Const(0, 1)
        conflict = Mux(c.col, row_hit | ccd_hit, Mux(c.act, row_hit | x_act, row_hit | bit_of(x_col, c.bank, nb)))
        if p.row_buffers == 2:      # a PACTAB that arrived since: its row is not activated, its bank not hit
            open_row = Array(s.open_row[b] for b in range(nb))
            pact = self.pact_pending & Mux(c.col, open_row[c.bank] == self.pact_row,
                                           c.act & (c.row == self.pact_row))
            conflict = conflict | pact
        k = self.picked
        m.d.comb += [
            self.pick.eq(c.idx),
            c.go.eq(c.valid & self.mode_normal & ~conflict & (~c.col | self.resp_credit)),
            self.bid.go.eq(c.go), self.remove.eq(self.bid.grant & c.col),
        ]
        with m.If(c.col):      # the bank and direction registered with the pick, the rest from the read port
            propose(m, self.bid.cmd, Mux(c.write, PimOp.WR, PimOp.RD), c.bank, 0, k.col, k.data, k.mask)
        with m.Else():
            propose(m, self.bid.cmd, Mux(c.act, PimOp.ACT, PimOp.PRE), c.bank, c.row)
        return c

    def _register(self, m, c, starve, any_col, any_row, col_sel, col_entry, head, oldest):
        """Register this cycle's pick for the next (``pick_stages = 1``): a starving head's ACT / PRE, else the
        oldest ready column command (its index as it will be after this cycle's removal), else the oldest ready
        ACT / PRE; ``col_entry`` is ``(bank, write)`` of the column command's entry, ``head`` / ``oldest`` are
        ``(bank open, bank, row)`` of those row commands."""
        m.d.sync += c.valid.eq(self.mode_normal & (starve | any_col | any_row))
        with m.If(starve):
            m.d.sync += [c.col.eq(0), c.act.eq(~head[0]), c.bank.eq(head[1]), c.row.eq(head[2])]
        with m.Elif(any_col):
            shifted = self.collapse.bit_select(col_sel, 1)      # an older entry leaves the queue this cycle
            m.d.sync += [c.col.eq(1), c.idx.eq(col_sel - shifted), c.bank.eq(col_entry[0]), c.write.eq(col_entry[1])]
        with m.Else():
            m.d.sync += [c.col.eq(0), c.act.eq(~oldest[0]), c.bank.eq(oldest[1]), c.row.eq(oldest[2])]
