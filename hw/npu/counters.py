"""Event counters of the NPU's units (matrix unit, vector queue, SRAM-PIM queue): one register per event of a
``data.StructLayout`` of counters, cleared by ``clear``, incremented in every cycle its event is high."""

__all__ = ["count_events"]


def count_events(m, counters, clear, events: dict):
    """``counters.<name> += 1`` while ``events[name]``; all to 0 while ``clear``."""
    for name, ev in events.items():
        reg = getattr(counters, name)
        with m.If(clear):
            m.d.sync += reg.eq(0)
        with m.Elif(ev):
            m.d.sync += reg.eq(reg + 1)
