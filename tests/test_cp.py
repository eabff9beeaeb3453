"""The command processor (hw/cp.py) on Verilator: dispatch order and payloads, FENCE/END semantics,
fetch throughput and prefetch while memory is blocked, every error code and recovery."""

import pytest
from amaranth.hdl import Module
from amaranth.lib import wiring
from amaranth.lib.wiring import In

from hw.config import preset
from hw.cp import SPU_UNIT, UNITS, CommandProcessor, UnitPort
from hw.npu.memmodel import STORAGE_VERILOG, MemoryModel
from hw.simtop import forward_ports, forwarded_members
from sim.build import build

TB = "sim.tb.cp_tb"
MEM_WORDS_LOG2 = 10



class CpTestTop(wiring.Component):
    """CommandProcessor + MemoryModel; every CP port except ``mem`` at the top, plus ``mem_load`` (back
    door), ``mem_bp`` (random back-pressure) and ``mem_hold`` (block every fetch request). A unit port
    (:class:`hw.cp.UnitSignature`) ``u`` is at the top as ``u`` (its instruction stream), ``u_busy`` and
    ``u_error``: the names sim/tb/cp_tb.py drives."""

    def __init__(self, cfg, words_log2=MEM_WORDS_LOG2, fetch_depth=32, latency=6):
        self._cp = CommandProcessor(cfg, fetch_depth)
        self._mem = MemoryModel(cfg, words_log2, latency)
        self._units = [u[0] for u in UNITS + ((SPU_UNIT,) if cfg.spu is not None else ())]
        members = forwarded_members(self._cp, exclude=("mem", *self._units))
        for name in self._units:
            port = self._cp.signature.members[name].signature.members
            members.update({name: port["instr"], f"{name}_busy": port["busy"], f"{name}_error": port["error"]})
        members.update(mem_load=In(1), mem_bp=In(1), mem_hold=In(1))
        super().__init__(members)

    def elaborate(self, platform):
        m = Module()
        m.submodules.cp = cp = self._cp
        m.submodules.memory = mem = self._mem
        req, port = cp.mem.req, mem.port.req
        m.d.comb += [
            port.payload.eq(req.payload), port.valid.eq(req.valid & ~self.mem_hold),
            req.ready.eq(port.ready & ~self.mem_hold),
            mem.load.eq(self.mem_load), mem.bp_enable.eq(self.mem_bp),
        ]
        wiring.connect(m, mem.port.resp, cp.mem.resp)
        forward_ports(m, self, cp, exclude=("mem", *self._units))
        for name in self._units:
            wiring.connect(m, getattr(cp, name), UnitPort(getattr(cp, name).signature, instr=wiring.flipped(
                getattr(self, name)), busy=getattr(self, f"{name}_busy"), error=getattr(self, f"{name}_error")))
        return m


def cp_build(config="tiny", fetch_depth=32):
    cfg = preset(config)
    return build(lambda: CpTestTop(cfg, fetch_depth=fetch_depth), name=f"cp_{config}",
                 key=f"{cfg!r} fetch_depth={fetch_depth} words_log2={MEM_WORDS_LOG2}",
                 extra_sources=(STORAGE_VERILOG,))


def test_parameters_checked():
    cfg = preset("tiny")
    for bad in (0, 1, 3, 512, True, 2.0):
        with pytest.raises(ValueError, match="Fetch depth"):
            CommandProcessor(cfg, bad)
    with pytest.raises(TypeError):
        CommandProcessor("tiny")


@pytest.mark.parametrize("seed", [1, 2])
def test_dispatch_random(seed):
    cp_build().run(TB, "dispatch_random", env={"SEED": seed, "TRIALS": 4, "N_INSTR": 150,
                                                "MEM_WORDS_LOG2": MEM_WORDS_LOG2})


def test_fetch_throughput():
    cp_build().run(TB, "fetch_throughput", env={"FETCH_DEPTH": 32})


def test_fetch_throughput_small_fifo():
    cp_build(fetch_depth=8).run(TB, "fetch_throughput", env={"FETCH_DEPTH": 8, "FULL_RATE": 0})


def test_errors():
    cp_build().run(TB, "errors", env={"MEM_WORDS_LOG2": MEM_WORDS_LOG2})
