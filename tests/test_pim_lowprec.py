"""The low-precision PIM device (issue 19): 4-bit weights in every bank, on Verilator with the protocol checker.

GEMVs bit-exact against the golden unit model (sim/tb/pim_lowprec_tb.py), the per-slot PU_BUSY rule at its
edge, LDSCAB/LDSLAB legality, configuration and layout errors. Tiny configurations only (the default-size
device is measured by ``sim/benchmarks/lowprec.py``). The device testbenches run on the RTL channel and on the
behavioural one (``impl="behav"``, hw/pim/behav.py; tests/test_pim_behav.py compares the two cycle by cycle).
"""

import pytest

from hw.config import ConfigError, preset
from hw.pim import device_factory, device_sources
from sim.build import build

TB = "sim.tb.pim_lowprec_tb"


IMPLS = ["rtl", "behav"]


def lp_build(config: str, impl: str = "rtl", **pim):
    cfg = preset(config)
    if pim:
        cfg = cfg.replace(**{f"pim.{k}": v for k, v in pim.items()})
    return build(device_factory(cfg), name=f"pim_device_{config}", key=repr(cfg), sim="verilator",
                 extra_sources=tuple(device_sources(cfg, pim_impl=impl)), no_inline=("pim_bank_*",))


def run(config, testcase, pim=None, impl="rtl", **env):
    pim = pim or {}
    env = {"IANUS_CONFIG": config, **env}
    if pim:
        env["IANUS_PIM"] = ",".join(f"{k}={v}" for k, v in pim.items())
    return lp_build(config, impl, **pim).run(TB, testcase, env=env)


@pytest.mark.parametrize("impl", IMPLS)
def test_w4_gemv_tiny_int4(impl):
    # 2 units per row; several rows; K chunked (the tiny GB holds 128 BF16 inputs) with partial sums
    # read back and preloaded; one tile over three chunks (the read-back right before its preload).
    run("tiny-w4", "w4_gemv", impl=impl, GEMV_SHAPES="128x32,128x80,256x48,384x16")


@pytest.mark.parametrize("impl", IMPLS)
def test_w4_gemv_tiny_int4_one_slot(impl):
    run("tiny-w4", "w4_gemv", pim={"acc_slots": 1}, impl=impl, GEMV_SHAPES="128x32,256x48")


@pytest.mark.parametrize("impl", IMPLS)
def test_w4_gemv_tiny_fp4_fp8(impl):
    # FP4 with grid choice (LDSLAB), FP8 activations (the GB holds 256: one or two units per row).
    run("tiny-w4a8", "w4_gemv", impl=impl, GEMV_SHAPES="128x48,256x32,512x16")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("config", ["tiny-w4", "tiny-w4a8"])
def test_w4_pu_busy_per_slot_at_its_edge(config, impl):
    run(config, "w4_edges", impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_w4_pu_busy_one_slot_at_its_edge(impl):
    run("tiny-w4", "w4_edges", pim={"acc_slots": 1}, impl=impl)


def test_lds_illegal_on_bf16_device():
    from tests.test_pim_device import pim_build

    pim_build("tiny").run(TB, "lds_illegal", env={"IANUS_CONFIG": "tiny"})


# -- configuration, command table, layout, behavioural device (no simulation) ----------------------------------

def test_bf16_presets_unchanged_by_the_lowprec_fields():
    """A field at its default is left out of repr: every BF16 preset's Verilog names and build keys stay."""
    from hw.config import PRESETS

    for name in PRESETS:
        cfg = preset(name)
        if not cfg.pim.lowprec:
            assert "weight_format" not in repr(cfg) and "acc_slots" not in repr(cfg), name
    assert "weight_format='int4'" in repr(preset("default-w4"))


@pytest.mark.parametrize("changes, match", [
    ({"pim.weight_format": "int8"}, "PimGeometry.weight_format must be one of bf16, int4, fp4, not 'int8'"),
    ({"pim.act_format": "fp8_e4m3"}, "PimGeometry.act_format must be 'bf16' with bf16 weights"),
    ({"pim.acc_slots": 2}, "PimGeometry.acc_slots must be 1 with bf16 weights"),
    ({"pim.weight_format": "int4", "pim.grid_choice": True}, "PimGeometry.grid_choice must be False with int4"),
    ({"pim.weight_format": "int4", "pim.quant_group": 96}, "PimGeometry.quant_group must be a power of two and "
                                                           "a multiple of 64"),
    ({"pim.weight_format": "int4", "pim.acc_slots": 2}, "PimGeometry.rows must be at least 32 with int4 weights"),
    ({"pim.weight_format": "int4", "pim.quant_group": 256}, "PimGeometry.gb_bytes must be enough for one group "
                                                            "of 256 bf16 activations"),
    ({"pim.weight_format": "int4", "pim.acc_slots": 3}, "PimGeometry.acc_slots must be 1 or 2, not 3"),
])
def test_lowprec_config_errors(changes, match):
    with pytest.raises(ConfigError, match=match):
        preset("tiny").replace(**changes)


def test_lowprec_presets_tmac_is_the_unit_depth():
    from hw.pim.bank import check_pu_timing, pu_mac_depth

    for name in ("tiny-w4", "tiny-w4a8", "default-w4", "default-w4a8"):
        cfg = preset(name)
        assert cfg.timing.tMAC == pu_mac_depth(cfg.pim), name
        check_pu_timing(cfg)
    with pytest.raises(ValueError, match="tMAC must be at least the PIM MAC pipeline depth 18, not 17"):
        check_pu_timing(preset("default-w4").replace(timing__tMAC=17))
    # same geometry as the BF16 preset it is measured against
    a, b = preset("default").pim, preset("default-w4").pim
    assert (a.channels, a.banks, a.rows, a.columns, a.gb_bytes) == (b.channels, b.banks, b.rows, b.columns, b.gb_bytes)


def test_behavioural_device_takes_4bit_weights():
    """The behavioural channel's parameters for 4-bit devices: the unit's depth and formats from the configuration."""
    from hw.pim.bank import pu_mac_depth
    from hw.pim.behav import PARAM_NAMES, behav_params

    for name in ("tiny-w4", "tiny-w4a8", "default-w4", "default-w4a8"):
        cfg = preset(name)
        v = dict(zip(PARAM_NAMES, behav_params(cfg), strict=True))
        assert v["mac_depth"] == pu_mac_depth(cfg.pim) and v["acc_slots"] == cfg.pim.acc_slots, name
        assert v["group_columns"] == cfg.pim.quant_group // 64 and v["act_ratio"] == cfg.pim.act_ratio, name
        assert v["grid_choice"] == int(cfg.pim.grid_choice), name
    assert len(device_sources(preset("tiny-w4"), pim_impl="behav")) == 2


def test_command_table_lowprec_rows():
    from hw.pim.commands import COMMANDS, LOWPREC_ONLY, LOWPREC_OPCODES, PimOp
    from sim.pim_checker import OPCODES

    assert {c.name: c.opcode for c in COMMANDS} == OPCODES
    assert {m.name: m.value for m in PimOp} == {k: v for k, v in OPCODES.items() if k not in LOWPREC_ONLY}
    assert LOWPREC_OPCODES == {"LDSCAB": 17, "LDSLAB": 18}


def test_checker_per_slot_pu_busy():
    from sim.pim_checker import ProtocolChecker

    cfg = preset("tiny-w4")
    t = cfg.timing
    ck = ProtocolChecker(cfg)
    ck.check(0, "ACTAB", row=0)
    m = t.tRCDRD
    assert ck.check(m, "MACAB", row=1 << 4) is None                   # slot 1
    assert ck.violation(m + 1, "WRBIAS", row=0) is None               # slot 0 is free
    assert ck.violation(m + t.tMAC - 1, "RDMAC", row=1 << 4) == "PU_BUSY"
    assert ck.violation(m + t.tMAC, "RDMAC", row=1 << 4) is None
    assert ck.violation(m + 1, "AF") == "BAD_ADDRESS"                 # AF: slot 0, but a data row is open
    assert ProtocolChecker(preset("tiny")).violation(5, "LDSCAB") == "ILLEGAL_OPCODE"
    assert ck.violation(m + 1, "LDSLAB") == "ILLEGAL_OPCODE"          # int4: no selectors


def test_w4_layout_packs_several_units_per_row():
    from firmware.pim_lowprec import W4GemvLayout, w4_gemv_lower_bound

    cfg = preset("default-w4")
    L = W4GemvLayout(cfg, 768, 2304)
    assert (L.max_chunk, L.chunks, L.chunk_cols(0), L.scale_cols(0), L.period, L.per_row) == (1024, 1, 12, 1, 16, 4)
    code, sc, sl = L.unit_columns_at(3, 0)
    assert code == list(range(48, 60)) and sc == [15] and sl == []
    L2 = W4GemvLayout(cfg, 3072, 768)
    assert (L2.chunks, L2.chunk_cols(0), L2.per_row, L2.rows_used) == (3, 16, 3, 24)
    lb = w4_gemv_lower_bound(cfg, 768, 2304)
    assert lb["rows"] == 18 and lb["cycles"] > 0
    c8 = preset("default-w4a8")
    L3 = W4GemvLayout(c8, 768, 768)           # FP8: the GB holds 2048; the chunk written twice, period 16
    assert (L3.max_chunk, L3.chunks, L3.period, L3.per_row) == (2048, 1, 16, 4)
    # K = 3072 with FP8: 2048-chunks would give one unit per row (36 columns); the chosen size packs more
    L4 = W4GemvLayout(c8, 3072, 768)
    full = W4GemvLayout(c8, 3072, 768, chunk_size=2048)
    assert full.per_row == 1 and L4.per_row >= 2 and L4.cost() < full.cost()
    with pytest.raises(ValueError, match="chunk_size must be 0 .chosen. or a multiple of the group 128 up to 2048"):
        W4GemvLayout(c8, 3072, 768, chunk_size=4096)
    with pytest.raises(ValueError, match="GEMV K = 100 is not a multiple of the quantization group 128"):
        W4GemvLayout(cfg, 100, 32)
    with pytest.raises(ValueError, match="needs a device with 4-bit weights"):
        W4GemvLayout(preset("default"), 768, 768)
    with pytest.raises(ValueError, match="needs rows 0..47 but only 31 data rows exist per bank"):
        W4GemvLayout(preset("tiny-w4"), 128, 1536)
