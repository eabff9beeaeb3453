"""The SoC top (hw/soc.py) on Verilator: programs from device memory through the command processor to
the matrix unit, vector queue and PCU, over the memory fabric, controllers and PIM device; bit-exact
against the golden models with the protocol checker on every channel; errors and recovery."""

from firmware import soc_regs
from hw.config import preset
from hw.cp import COUNTERS as CP_COUNTERS
from hw.memctrl import COUNTERS as CH_COUNTERS
from hw.npu.matrix_unit import COUNTERS as MU_COUNTERS
from hw.npu.vector_queue import COUNTERS as VQ_COUNTERS
from sim.build import build

TB = "sim.tb.soc_tb"



def soc_build(config="tiny"):
    from hw.npu.systolic import pe_for
    from hw.npu.vector import LANE_MODULE, VectorLane
    from hw.pim import device_factory, device_sources
    from hw.soc import SocTop
    from sim.build import verilog_for

    cfg = preset(config)
    pe_name, pe_factory, pe_key = pe_for(cfg.npu)
    pe_v = verilog_for(pe_factory, name=pe_name, key="pe" + pe_key)
    lane_v = verilog_for(lambda: VectorLane(), name=LANE_MODULE, key="lane")
    return build(lambda: SocTop(cfg, device_factory(cfg)), name=f"soc_{config}", key=repr(cfg),
                 extra_sources=(*device_sources(cfg), pe_v, lane_v),
                 no_inline=("pim_bank_*", pe_name, LANE_MODULE))


def test_register_table_covers_every_counter():
    regs = soc_regs.register_table(2)
    sources = {r.source for r in regs if r.source}
    for group, layout in (("cp", CP_COUNTERS), ("mu", MU_COUNTERS), ("vq", VQ_COUNTERS)):
        for name, _ in layout:
            assert (group, name) in sources, (group, name)
    for c in range(2):
        for name in CH_COUNTERS:
            assert (f"ch{c}", name) in sources, (c, name)
    for i in range(len(soc_regs.REQUESTERS)):
        assert ("fabric", f"req_stall{i}") in sources
    offsets = [r.offset for r in regs]
    assert len(set(offsets)) == len(offsets) and all(o % 4 == 0 and o < 0x1000 for o in offsets)
    assert {r.name for r in regs if "w" in r.access} == {"CTRL", "PROG_ADDR", "PROG_LEN"}
    assert "PROG_ADDR" in soc_regs.table_text()


def test_programs():
    soc_build().run(TB, "programs", env={"IANUS_CONFIG": "tiny"})


def test_programs_with_axi_backpressure():
    soc_build().run(TB, "programs", env={"IANUS_CONFIG": "tiny", "SEED": 2, "PAUSE_PCT": 30})


def test_errors():
    soc_build().run(TB, "errors", env={"IANUS_CONFIG": "tiny"})
