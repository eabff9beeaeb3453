"""Configuration: presets, derived values and one test per validation rule."""

import pytest

from hw.config import (
    TIMING_NS_IANUS,
    Clocks,
    ConfigError,
    DramTiming,
    NpuConfig,
    PimGeometry,
    SystemConfig,
    preset,
    timing_from_ns,
)


def test_presets_build():
    for name in ("tiny", "default", "ianus"):
        cfg = preset(name)
        assert cfg.name == name


def test_ianus_preset_matches_table1():
    cfg = preset("ianus")
    p, t, n = cfg.pim, cfg.timing, cfg.npu
    assert (p.channels, p.banks, p.row_bytes, p.columns, p.lanes, p.gb_bytes) == (8, 16, 2048, 64, 16, 2048)
    assert p.total_bytes == 8 * 2**30                       # 8 GB
    assert (t.tCCD, t.tRAS, t.tWR, t.tRP, t.tRCDRD, t.tRCDWR) == (1, 21, 36, 30, 36, 24)
    assert (n.array_rows, n.array_cols, n.macs_per_pe, n.cores) == (128, 64, 4, 4)
    assert cfg.clocks.npu_mhz == 700
    # 32 GFLOPS per bank unit, 1 TFLOPS per chip (2 channels), 4096 GB/s internal in all.
    assert cfg.pim_peak_gflops / (p.banks * p.channels) == pytest.approx(32.0)
    assert cfg.pim_peak_gflops / 4 == pytest.approx(1024.0)
    assert cfg.pim_peak_internal_gbps == pytest.approx(4096.0)
    assert cfg.pim_peak_external_gbps == pytest.approx(256.0)


def test_default_holds_a_gpt2_small_layer():
    # Four FC weight matrices of GPT-2 small: 7,077,888 BF16 values.
    values = 768 * 2304 + 768 * 768 + 768 * 3072 + 3072 * 768
    cfg = preset("default")
    assert cfg.pim.channels * cfg.pim.banks * cfg.pim.data_rows * cfg.pim.row_bytes >= 2 * values


def test_timing_from_ns_rounds_up():
    t = timing_from_ns(TIMING_NS_IANUS, 700.0)
    assert t.tRP == 21             # 30 ns at 1.4286 ns/cycle = 21.0 cycles
    assert t.tRAS == 15            # 21 ns -> 14.7 -> 15
    assert t.tCCD == 1


def test_address_bits():
    p = preset("default").pim
    assert p.column_offset_bits == 5 and p.column_addr_bits == 6 and p.bank_addr_bits == 4
    assert p.addr_bits == p.row_addr_bits + p.channel_addr_bits + p.bank_addr_bits + p.column_addr_bits + 5


def test_replace_variants():
    cfg = preset("tiny").replace(**{"pim.banks": 16}, timing__tRP=7, name="v")
    assert cfg.pim.banks == 16 and cfg.timing.tRP == 7 and cfg.name == "v"
    assert preset("tiny").pim.banks == 8            # the preset itself is untouched
    with pytest.raises(ConfigError, match="PimGeometry.banks must be a power of two, not 12"):
        preset("tiny").replace(**{"pim.banks": 12})
    with pytest.raises(ConfigError, match="PimGeometry.bankz must be an existing field"):
        preset("tiny").replace(**{"pim.bankz": 12})
    with pytest.raises(ConfigError, match="SystemConfig.pym must be one of"):
        preset("tiny").replace(**{"pym.banks": 12})


def test_unknown_preset():
    with pytest.raises(ConfigError, match="preset.name must be one of tiny, default, ianus, tiny-dualrb, "
                                          "default-dualrb, neupims, neupims-hw, tiny-il, default-il, default-4ch, "
                                          "tiny-hpim, default-hpim, tiny-w4, tiny-w4a8, default-w4, default-w4a8, "
                                          "ianus-w4, ianus-w4a8, tiny-p4, default-p4, tiny-dualrb-p4, not 'huge'"):
        preset("huge")


@pytest.mark.parametrize("cls,kwargs,match", [
    (PimGeometry, {"channels": 3}, "PimGeometry.channels must be a power of two, not 3"),
    (PimGeometry, {"banks": 12}, "PimGeometry.banks must be a power of two, not 12"),
    (PimGeometry, {"banks": 0}, "PimGeometry.banks must be a power of two, not 0"),
    (PimGeometry, {"rows": 100}, "PimGeometry.rows must be a power of two"),
    (PimGeometry, {"columns": 48}, "PimGeometry.columns must be a power of two"),
    (PimGeometry, {"lanes": 12}, "PimGeometry.lanes must be a power of two"),
    (PimGeometry, {"lanes": 1, "column_bits": 16}, "PimGeometry.lanes must be a power of two of at least 2"),
    (PimGeometry, {"mul_stages": 3}, "PimGeometry.mul_stages must be an integer in 1..2, not 3"),
    (PimGeometry, {"tree_stages": 0}, "PimGeometry.tree_stages must be an integer in 1..4, not 0"),
    (PimGeometry, {"acc_stages": 5}, "PimGeometry.acc_stages must be an integer in 1..4, not 5"),
    (PimGeometry, {"acc_stages": True}, "PimGeometry.acc_stages must be an integer in 1..4, not True"),
    (PimGeometry, {"acc_stages": 2, "weight_format": "int4", "act_format": "bf16"},
     "PimGeometry.acc_stages must be 1 with int4 weights"),
    (PimGeometry, {"pick_stages": 2},
     "PimGeometry.pick_stages must be 0 \\(pick and issue in one cycle\\) or 1 \\(registered pick\\), not 2"),
    (PimGeometry, {"pick_stages": True}, "PimGeometry.pick_stages must be 0"),
    (PimGeometry, {"rows": 1, "af_rows": 0, "acc_stages": 4},
     "PimGeometry.acc_stages must be 1 with a single row per bank"),
    (PimGeometry, {"column_bits": 128}, r"PimGeometry.column_bits must be lanes x 16 bits = 256, not 128"),
    (PimGeometry, {"gb_bytes": 100}, r"PimGeometry.gb_bytes must be a positive multiple of the column size"),
    (PimGeometry, {"gb_bytes": 4096}, r"PimGeometry.gb_bytes must be at most one row \(2048 bytes\)"),
    (PimGeometry, {"gb_bytes": 96 * 2}, "PimGeometry.gb_bytes must be a power-of-two number of columns"),
    (PimGeometry, {"af_rows": 64}, r"PimGeometry.af_rows must be an integer in \[0, rows=64\)"),
    (PimGeometry, {"banks": True}, "PimGeometry.banks must be a power of two, not True"),
    (DramTiming, {"tRP": 0}, "DramTiming.tRP must be an integer of at least 1 cycle, not 0"),
    (DramTiming, {"tCCD": 1.5}, "DramTiming.tCCD must be an integer of at least 1 cycle, not 1.5"),
    (DramTiming, {"tFAW": 1, "tRRD": 2}, "DramTiming.tFAW must be at least tRRD=2, not 1"),
    (DramTiming, {"tREFI": 10, "tRFC": 12}, "DramTiming.tREFI must be greater than tRFC=12, not 10"),
    (DramTiming, {"refresh_postpone": -1}, "DramTiming.refresh_postpone must be an integer of at least 0"),
    (NpuConfig, {"array_rows": 0}, "NpuConfig.array_rows must be an integer of at least 1, not 0"),
    (NpuConfig, {"vector_lanes": 6}, "NpuConfig.vector_lanes must be a power of two, not 6"),
    (NpuConfig, {"act_spm_words": 1000}, "NpuConfig.act_spm_words must be a power of two"),
    (NpuConfig, {"array_rows": 8, "act_spm_words": 4}, "NpuConfig.act_spm_words must be at least array_rows=8"),
    (NpuConfig, {"array_rows": 8, "wgt_spm_words": 4}, "NpuConfig.wgt_spm_words must be at least array_rows=8"),
    (NpuConfig, {"array_rows": 8, "acc_spm_words": 4}, "NpuConfig.acc_spm_words must be at least array_rows=8"),
    (Clocks, {"npu_mhz": 0}, "Clocks.npu_mhz must be a positive finite number, not 0"),
    (Clocks, {"pim_mhz": float("inf")}, "Clocks.pim_mhz must be a positive finite number, not inf"),
])
def test_validation_rules(cls, kwargs, match):
    with pytest.raises(ConfigError, match=match) as info:
        cls(**kwargs)
    assert info.value.field_name in kwargs


def test_system_level_rules():
    with pytest.raises(ConfigError, match="SystemConfig.pim must be a PimGeometry"):
        SystemConfig(pim={"banks": 4})
    with pytest.raises(ConfigError, match="SystemConfig.pim.gb_bytes must be large enough"):
        SystemConfig(pim=PimGeometry(gb_bytes=32), npu=NpuConfig(vector_lanes=32, array_rows=4))
