"""DRAM timing rules, written once: the building blocks every command-bus agent uses.

The PIM device (:mod:`hw.pim.bank`, :mod:`hw.pim.channel`), the memory
controller (:mod:`hw.memctrl`) and the prototype's PHY stand-in
(:mod:`hw.proto`) compose their timing from these, as LiteDRAM composes its
controller from one small module per rule:

* :func:`countdown` - a per-bank or channel-wide window (tRCD, tRAS, tRP, tWR,
  tRTP, tCCD, tRRD, tRFC, tMAC, tAF, and the PIM row buffer's windows);
* :func:`faw_window` - at most four activations in any tFAW cycles;
* :func:`refresh_credit` - one REF falls due every tREFI, ``refresh_postpone``
  may be owed;
* :func:`delay_pipe` - the read-latency pipe (data ``n`` cycles after the command);
* :func:`pim_row_buffer` - the PIM row buffer of two-row-buffer banks (its state and row windows).

The device calls them with the command it executes, the controller with the
command it issues (one cycle ahead of the bus, so both agree on every edge).
The protocol checker (:mod:`sim.pim_checker`) implements the same rules
independently in Python.
"""

from amaranth.hdl import Cat, Const, Module, Mux, Signal

__all__ = ["countdown", "faw_window", "refresh_credit", "delay_pipe", "pim_row_buffer"]


def countdown(m: Module, name: str, cycles: int, start, ahead: bool | int = False, late: bool = False):
    """A timing window: after ``start``, ``ok`` is low for ``cycles - 1`` cycles.

    A command on cycle ``t`` that starts the counter allows the constrained
    command from cycle ``t + cycles`` on. Returns ``ok``; with ``ahead``, ``(ok, ok_next)`` where
    ``ok_next`` says the window allows the command in the next cycle unless ``start`` restarts it in this
    one (the registered pick of :class:`hw.memctrl_queue.Scheduler` decides a cycle ahead and drops its
    choice when the command issued in between restarted a window it needs). With ``ahead=2``,
    ``(ok, ok_next, ok_next2)``: ``ok_next2`` looks two cycles ahead (no restart in this cycle or the next;
    the per-entry readiness the request queue registers for the registered pick).

    With ``late`` (for Fmax: the memory controller's registered pick) ``start`` is registered first
    (``{name}_go``) and the counter is loaded from that register with ``cycles - 2``; ``ok`` and the
    look-ahead outputs are the same on every cycle (the register stands for the counter's first value, so
    ``start`` only drives one flip-flop instead of the counter's next-value logic).
    """
    n_ahead = int(ahead)
    if cycles <= 1:
        return (Const(1, 1),) * (n_ahead + 1) if n_ahead else Const(1, 1)
    if late:
        return _countdown_late(m, name, cycles, start, n_ahead)
    cnt = Signal(range(cycles), name=f"{name}_cnt")
    with m.If(start):
        m.d.sync += cnt.eq(cycles - 1)
    with m.Elif(cnt != 0):
        m.d.sync += cnt.eq(cnt - 1)
    ok = Signal(name=f"{name}_ok")
    m.d.comb += ok.eq(cnt == 0)
    if not ahead:
        return ok
    ok_next = Signal(name=f"{name}_ok_next")
    m.d.comb += ok_next.eq(cnt <= 1 if cycles > 2 else 1)
    if n_ahead == 1:
        return ok, ok_next
    ok_next2 = Signal(name=f"{name}_ok_next2")
    m.d.comb += ok_next2.eq(cnt <= 2 if cycles > 3 else 1)
    return ok, ok_next, ok_next2


def _countdown_late(m: Module, name: str, cycles: int, start, n_ahead: int):
    """:func:`countdown` with the start registered (``late``): the original counter is ``cycles - 1`` in the
    cycle after a start (``go`` high) and ``cnt`` otherwise."""
    go = Signal(name=f"{name}_go")
    m.d.sync += go.eq(start)
    ok, ok_next, ok_next2 = (Signal(name=f"{name}_ok{sfx}") for sfx in ("", "_next", "_next2"))
    if cycles == 2:
        m.d.comb += [ok.eq(~go), ok_next.eq(1), ok_next2.eq(1)]
    else:
        cnt = Signal(range(cycles - 1), name=f"{name}_cnt")
        with m.If(go):
            m.d.sync += cnt.eq(cycles - 2)
        with m.Elif(cnt != 0):
            m.d.sync += cnt.eq(cnt - 1)
        m.d.comb += [ok.eq(~go & (cnt == 0)), ok_next.eq(~go & (cnt <= 1)),
                     ok_next2.eq(~go & (cnt <= 2) if cycles > 3 else 1)]
    return (ok, ok_next, ok_next2)[:n_ahead + 1] if n_ahead else ok


def faw_window(m: Module, tFAW: int, act, count_name: str | None = None, ahead: bool = False):
    """tFAW: ``ok`` while fewer than four activations (``act`` high) happened in the last ``tFAW - 1``
    cycles (a shift register), so a fifth is allowed ``tFAW`` cycles after the first. Returns ``ok``; with
    ``ahead``, ``(ok, ok_next)``: ``ok_next`` counts the window as it will be next cycle without this cycle's
    ``act`` (as :func:`countdown`), and the activations in the window are a register (``faw_count``, updated
    with the bit that enters and the one that leaves) instead of a sum over the window."""
    ok = Signal(name="faw_ok")
    ok_next = Signal(name="faw_ok_next") if ahead else None
    if tFAW > 1 and ahead:
        window = Signal(tFAW - 1, name="window")
        m.d.sync += window.eq(Cat(act, window[:-1]) if tFAW > 2 else act)
        count = Signal(range(tFAW), name="faw_count")
        m.d.sync += count.eq(count + act - window[-1])
        m.d.comb += [ok.eq(count < 4),
                     ok_next.eq((count < 4) | ((count == 4) & window[-1]) if tFAW > 2 else 1)]
    elif tFAW > 1:
        window = Signal(tFAW - 1, name="window")
        m.d.sync += window.eq(Cat(act, window[:-1]) if tFAW > 2 else act)
        total = sum(window[i] for i in range(len(window)))
        if count_name:
            count = Signal(range(tFAW + 1), name=count_name)
            m.d.comb += count.eq(total)
            total = count
        m.d.comb += ok.eq(total < 4)
    else:
        m.d.comb += ok.eq(1)
        if ahead:
            m.d.comb += ok_next.eq(1)
    return (ok, ok_next) if ahead else ok


def refresh_credit(m: Module, tREFI: int, postpone: int, did_ref):
    """The refresh credit: ``owed`` rises by one every ``tREFI`` cycles and falls by one per REF
    (``did_ref``); it saturates at ``postpone + 1`` (late) and at ``-postpone`` (refreshes pulled in).
    Returns the signed ``owed`` signal; ``owed > postpone`` means the deadline was missed."""
    refi = Signal(range(tREFI), name="refi")
    owed = Signal(range(-postpone - 1, postpone + 3), name="owed")
    tick = refi == tREFI - 1
    m.d.sync += refi.eq(Mux(tick, 0, refi + 1))
    new_owed = owed + tick - did_ref
    with m.If(new_owed >= -postpone):
        m.d.sync += owed.eq(Mux(new_owed > postpone + 1, postpone + 1, new_owed))
    return owed


def delay_pipe(m: Module, valid, data, stages: int, prefix: str):
    """``(valid, data)`` delayed by ``stages`` registers (named ``{prefix}_v{i}`` / ``{prefix}_d{i}``)."""
    for i in range(stages):
        nv, nd = Signal(name=f"{prefix}_v{i}"), Signal(len(data), name=f"{prefix}_d{i}")
        m.d.sync += [nv.eq(valid), nd.eq(data)]
        valid, data = nv, nd
    return valid, data


def pim_row_buffer(m: Module, t, act, pre, rd, row, late: bool = False):
    """The PIM row buffer (two row buffers per bank; every command on it is all-bank, so one state stands
    for every bank's): ``act`` (PACTAB) opens ``row``, ``pre`` (PPREAB) closes it, ``rd`` (MAC / AF) reads it.
    Returns ``(open, row, rcd_ok, ras_ok, rp_ok, rtp_ok)`` with the buffer's own tRCDRD, tRAS, tRP and tRTP."""
    p_open = Signal(name="p_open")
    p_row = Signal(len(row), name="p_row")
    with m.If(act):
        m.d.sync += [p_open.eq(1), p_row.eq(row)]
    with m.Elif(pre):
        m.d.sync += p_open.eq(0)
    return (p_open, p_row,
            countdown(m, "p_rcdrd", t.tRCDRD, act, late=late), countdown(m, "p_ras", t.tRAS, act, late=late),
            countdown(m, "p_rp", t.tRP, pre & p_open, late=late), countdown(m, "p_rtp", t.tRTP, rd, late=late))
