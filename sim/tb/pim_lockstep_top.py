"""The lockstep top of sim/tb/pim_lockstep_tb.py: an RTL PIM channel and a behavioural one on one bus.

(A module of its own so that editing the testbench does not change the top's Verilog key.)
"""

from amaranth.hdl import ClockSignal, Instance, Module, ResetSignal, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

__all__ = ["INPUTS", "OUTPUTS", "PimLockstep"]

OUTPUTS = ("bus__rvalid", "bus__rdata", "status__violation", "status__vcode", "status__vop", "status__vcycle",
           "status__nviol", "status__owed", "status__cycle", "status__n_act", "status__n_pre", "status__n_rd",
           "status__n_wr", "status__n_ref", "status__n_wrgb", "status__n_mac", "status__n_rdmac", "status__n_af",
           "status__n_cmd")
INPUTS = ("bus__op", "bus__bank", "bus__row", "bus__col", "bus__data", "bus__mask", "status__clear")


def _widths(cfg) -> dict:
    from hw.pim.behav import channel_ports

    return {name: width for _, name, width in channel_ports(cfg)}


class PimLockstep(wiring.Component):
    """The RTL channel module ``rtl_module`` and the behavioural one ``behav_module`` on one bus.

    Members: the channel's inputs (``bus__op`` ... ``status__clear``, ``chan_id``, ``bd_load``), each output
    twice (``r_<name>`` from the RTL, ``b_<name>`` from the model), ``diff`` (bit ``i``: output
    ``OUTPUTS[i]`` differs).
    """

    def __init__(self, cfg, rtl_module: str, behav_module: str):
        self.cfg = cfg
        self.rtl_module, self.behav_module = rtl_module, behav_module
        w = _widths(cfg)
        members = {name: In(w[name]) for name in INPUTS}
        members.update({"chan_id": In(8), "bd_load": In(1), "diff": Out(len(OUTPUTS))})
        for name in OUTPUTS:
            members[f"r_{name}"] = Out(w[name])
            members[f"b_{name}"] = Out(w[name])
        super().__init__(members)

    def elaborate(self, platform):
        m = Module()
        ins = {f"i_{name}": getattr(self, name) for name in INPUTS}
        ins.update(i_clk=ClockSignal(), i_rst=ResetSignal(), i_chan_id=self.chan_id, i_bd_load=self.bd_load)
        for prefix, module in (("r", self.rtl_module), ("b", self.behav_module)):
            outs = {f"o_{name}": getattr(self, f"{prefix}_{name}") for name in OUTPUTS}
            m.submodules[f"{prefix}_chan"] = Instance(module, **ins, **outs)
        diff = [Signal(name=f"diff_{i}") for i in range(len(OUTPUTS))]
        for i, name in enumerate(OUTPUTS):
            m.d.comb += diff[i].eq(getattr(self, f"r_{name}") != getattr(self, f"b_{name}"))
        m.d.comb += self.diff.eq(sum(d << i for i, d in enumerate(diff)))
        return m
