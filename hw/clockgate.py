"""Clock gating for idle datapaths (simulation speed and, in silicon, switching power).

:func:`gated_domain` adds a clock domain whose clock is the ``sync`` clock
passed only in cycles whose rising edge must clock the datapath. The enable
is sampled on the falling edge (the flop version of a latch-based integrated
clock-gating cell), so the gated clock cannot glitch: ``enable`` must be
stable from the falling edge to the rising edge, which holds for any signal
computed from ``sync`` flops; an input a testbench writes at the falling edge
does not qualify.

Why here: Verilator evaluates the input logic of every flop on each edge of
its clock, active or not. The default SoC has 32 PIM processing units (16
BF16 multipliers and an FP32 adder tree each), a 16 x 16 systolic array and
16 vector lanes; each is idle for most of a decoder layer (the array during
generation, the PIM units during prefill), yet without gating they were
over 80 % of the simulator's time. With their clocks gated, an idle unit costs
nothing. Results are the same bit for bit: the gate is open while any valid
bit of the gated pipeline is set (the MAC unit and the vector lanes keep
their valid bits on the ungated clock; the systolic array gates them too and
so freezes as a whole while idle).

FPGA flows should use clock enables instead; the blocks gate only when asked
(``clock_gate=True``), which the SoC simulation build does.
"""

from amaranth.hdl import ClockDomain, ClockSignal, Module, Signal

__all__ = ["gated_domain"]


def gated_domain(m: Module, name: str, enable) -> None:
    """Add domain ``name`` (local, no reset) clocked by ``sync`` while ``enable`` (sampled at the falling edge)."""
    en_n = Signal(name=f"{name}_clk_en")
    m.domains += [ClockDomain(name, local=True, reset_less=True),
                  ClockDomain(f"{name}_en", clk_edge="neg", local=True, reset_less=True)]
    m.d.comb += ClockSignal(f"{name}_en").eq(ClockSignal("sync"))
    m.d.comb += ClockSignal(name).eq(ClockSignal("sync") & en_n)
    m.d[f"{name}_en"] += en_n.eq(enable)
