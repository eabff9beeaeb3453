"""Simulation tops: a design with its ports at the top and, for Verilator ``--timing`` builds, its own
free-running clock (:class:`sim.tb.soc_run.SocSim`, :class:`hw.npu.memmodel.MatrixSystem`,
:class:`hw.npu.vector_queue.VectorQueueSystem`, ``CpTestTop`` in ``tests/test_cp.py``).

With the clock inside the simulator no Python runs per clock edge: testbenches wait on ``clk_out`` and
on status edges. Registers start from their reset values (Verilog initial values); such tops have no
reset input.
"""

from pathlib import Path

from amaranth.hdl import ClockDomain, ClockSignal, Const, Instance, Signal
from amaranth.lib.wiring import In

__all__ = ["CLOCK_VERILOG", "TB_CLOCK_VERILOG", "free_running_clock", "forwarded_members", "forward_ports"]

CLOCK_VERILOG = Path(__file__).resolve().parent / "verilog" / "npu_clock_gen.v"
TB_CLOCK_VERILOG = CLOCK_VERILOG.with_name("tb_clock_gen.v")


def free_running_clock(m, *, half_period: int = 5, tb_clock: bool = False, hold=None):
    """Drive the ``sync`` domain of ``m`` from a clock generator (submodule ``clock``); returns ``(clk,
    clk_tb)``.

    ``tb_clock=False``: ``hw/verilog/npu_clock_gen.v``; ``clk_tb`` is ``clk``. ``tb_clock=True``:
    ``hw/verilog/tb_clock_gen.v``, whose ``clk_tb`` runs 1 ps before ``clk`` (the clock of bus models
    that expect to act before the design takes the edge, see :class:`sim.tb.soc_run.SocSim`) and clocks
    a reset-less ``tb`` domain; ``hold`` (a 1-bit value, default 0) stops ``clk_tb`` while ``clk`` runs
    on. Period: ``2 * half_period`` ns.
    """
    if not isinstance(half_period, int) or half_period < 1:
        raise ValueError(f"Half period must be a positive integer (ns), not {half_period!r}")
    clk, clk_tb = Signal(), Signal()
    if tb_clock:
        m.submodules.clock = Instance("tb_clock_gen", p_HALF_PERIOD=half_period,
                                      i_hold=Const(0, 1) if hold is None else hold, o_clk=clk, o_clk_tb=clk_tb)
        m.domains.tb = ClockDomain("tb", reset_less=True)
        m.d.comb += ClockSignal("tb").eq(clk_tb)
    else:
        if hold is not None:
            raise ValueError("A hold input needs tb_clock=True")
        m.submodules.clock = Instance("npu_clock_gen", p_HALF_PERIOD=half_period, o_clk=clk)
        m.d.comb += clk_tb.eq(clk)
    m.domains.sync = ClockDomain("sync")
    m.d.comb += ClockSignal("sync").eq(clk)
    return clk, clk_tb


def forwarded_members(inner, exclude=()) -> dict:
    """The members of ``inner``'s signature except those named in ``exclude``: the ports a top that
    forwards them (:func:`forward_ports`) declares."""
    return {name: member for name, member in inner.signature.members.items() if name not in exclude}


def forward_ports(m, outer, inner, exclude=(), registered=None):
    """Connect every port of ``inner`` (except the members named in ``exclude``) to ``outer``'s port of
    the same name and path (arrays and nested signatures too).

    What flows into ``inner`` is assigned in the domain ``registered[name]`` for the members named there
    (e.g. bus ports sampled on a testbench clock), combinationally otherwise; what flows out is always
    combinational.
    """
    registered = registered or {}
    for path, member, value in inner.signature.flatten(inner):
        if path[0] in exclude:
            continue
        ours = outer
        for part in path:
            ours = ours[part] if isinstance(part, int) else getattr(ours, part)
        if member.flow == In:
            m.d[registered.get(path[0], "comb")] += value.eq(ours)
        else:
            m.d.comb += ours.eq(value)
