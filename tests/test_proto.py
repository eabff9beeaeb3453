"""The FPGA-prototype path on Verilator: host driver over AXI (cocotbext-axi) -> registers, PCU, memory
controllers -> PIM device. Same bits as the functional model; bad input answered; random load."""

import pytest

from firmware import macro
from hw import proto
from hw.config import preset
from hw.pim import device_factory, device_sources
from hw.proto import ProtoTop
from sim.build import build

TB = "sim.tb.proto_tb"


def proto_build(config="tiny"):
    cfg = preset(config)
    return build(lambda: ProtoTop(cfg, device_factory(cfg)), name=f"proto_{config}", key=repr(cfg),
                 extra_sources=tuple(device_sources(cfg)), no_inline=("pim_bank_*",))


def test_register_map_matches_the_table():
    assert proto.DEVICE_ID == macro.DEVICE_ID and proto.QUEUE_DEPTH == macro.QUEUE_DEPTH
    assert (proto.CSR_ID, proto.CSR_CTRL, proto.CSR_STATUS, proto.CSR_ERROR, proto.CSR_MACRO0, proto.CSR_DOORBELL,
            proto.CSR_QUEUE_LEVEL, proto.CSR_COMPLETED, proto.CSR_CYCLES, proto.CSR_CH_BASE) == (
        macro.CSR.ID, macro.CSR.CTRL, macro.CSR.STATUS, macro.CSR.ERROR, macro.CSR.MACRO0, macro.CSR.DOORBELL,
        macro.CSR.QUEUE_LEVEL, macro.CSR.COMPLETED, macro.CSR.CYCLES, macro.CSR.CH_BASE)
    assert proto.E_QUEUE_OVERFLOW == macro.MacroError.QUEUE_OVERFLOW
    assert tuple(macro.CH_COUNTERS) == proto.CH_COUNTERS
    assert proto.CSR_GEOMETRY == macro.CSR.GEOMETRY
    # GEOMETRY tells the presets apart (the driver refuses to open a device with another geometry)
    words = {name: proto.geometry_word(preset(name).pim) for name in ("tiny", "default", "ianus")}
    assert len(set(words.values())) == 3, words


def test_driver_same_bits_on_rtl_and_model():
    proto_build().run(TB, "driver_same_bits", env={"IANUS_CONFIG": "tiny"})


def test_bad_input():
    proto_build().run(TB, "bad_input", env={"IANUS_CONFIG": "tiny"})


@pytest.mark.parametrize("config", ["tiny", "tiny-dualrb"])
def test_random_load_with_backpressure(config):
    # Host traffic and PIM macros at once; with two row buffers the host's requests run beside the GEMVs.
    proto_build(config).run(TB, "random_load", env={"IANUS_CONFIG": config, "N_OPS": 40, "N_GEMV": 2})


def test_layer_fc_tiny():
    """The demo's program on the tiny device (a narrow model: d_model 16, head dim 4)."""
    proto_build().run(TB, "layer_fc", env={"IANUS_CONFIG": "tiny", "D_MODEL": 16, "HEAD_DIM": 4})
