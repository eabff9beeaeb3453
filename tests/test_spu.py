"""The SRAM-PIM queue (hw/npu/spu.py) on the SoC (``tiny-hpim``, Verilator): SLOAD / SPIM programs bit-exact
against the functional model (sim/soc_model.py, whose SPIM is the golden model sim/golden/sram_pim.py), errors
with the failing instruction, FENCE on the SPU, the cycles of an SPIM; the DRAM protocol checker on throughout.
The ISA, assembler, configuration and functional-model parts without a simulator."""

import numpy as np
import pytest

from firmware.asm import AsmError, assemble, disassemble
from hw.config import ConfigError, SramPimConfig, preset
from hw.spec import soc_isa as isa
from hw.spec.soc_isa import CpError, SocOp, SpuError, Unit
from sim.build import build

TB = "sim.tb.spu_tb"
CONFIG = "tiny-hpim"


def soc_build(config=CONFIG):
    from hw.npu.systolic import PE_MODULE, ProcessingElement
    from hw.npu.vector import LANE_MODULE, VectorLane
    from hw.pim import device_factory, device_sources
    from hw.soc import SocTop
    from sim.build import verilog_for

    cfg = preset(config)
    pe_v = verilog_for(lambda: ProcessingElement(), name=PE_MODULE, key="pe")
    lane_v = verilog_for(lambda: VectorLane(), name=LANE_MODULE, key="lane")
    return build(lambda: SocTop(cfg, device_factory(cfg)), name=f"soc_{config}", key=repr(cfg),
                 extra_sources=(*device_sources(cfg), pe_v, lane_v),
                 no_inline=("pim_bank_*", PE_MODULE, LANE_MODULE))


# -- RTL -------------------------------------------------------------------------------------------------------

def test_attention_bit_exact():
    soc_build().run(TB, "attention", env={"IANUS_CONFIG": CONFIG})


def test_fence_and_spim_cycles():
    soc_build().run(TB, "fence_and_timing", env={"IANUS_CONFIG": CONFIG})


def test_errors_name_the_instruction():
    soc_build().run(TB, "errors", env={"IANUS_CONFIG": CONFIG})


# -- ISA, assembler, configuration -----------------------------------------------------------------------------

def test_spu_ops_are_illegal_without_the_unit():
    word = isa.encode(SocOp.SPIM, mode=0, base=0, count=1, heads=1, stride=0, spm_in=0, in_pitch=0, spm_out=0,
                      out_pitch=0)
    assert isa.decode(word, spu=True)["op"] == SocOp.SPIM
    with pytest.raises(isa.IsaError, match="illegal op code 8 .SPIM: the system has no SRAM-PIM unit"):
        isa.decode(word)
    fence_spu = isa.encode(SocOp.FENCE, units=Unit.SPU)
    assert isa.decode(fence_spu, spu=True)["units"] == Unit.SPU
    with pytest.raises(isa.IsaError, match="reserved header bits set: 0x800"):
        isa.decode(fence_spu)
    with pytest.raises(isa.IsaError, match="SPIM has bits set beyond its fields"):
        isa.decode(word | 1 << (isa.PAYLOAD_LO + isa.SPIM_BITS), spu=True)
    for fields in (isa.SPIM_FIELDS, isa.SLOAD_FIELDS):
        assert sum(w for _, _, w in fields) == fields[-1][1] + fields[-1][2] <= isa.PAYLOAD_BITS


def test_assembler_round_trip_and_errors():
    text = ("sload mem_addr=0x2000 pos_stride=32 positions=13 region_stride=512 regions=2 cols=1 line=0 "
            "line_stride=16\n"
            "spim mode=1 base=8 count=13 heads=2 stride=4 spm_in=16 in_pitch=1 spm_out=24 out_pitch=2\n"
            "fence vq,spu\nend\n")
    words = assemble(text)
    assert assemble(disassemble(words, spu=True)) == words
    with pytest.raises(AsmError, match="instruction 0: illegal op code 9"):
        disassemble(words)
    with pytest.raises(AsmError, match="line 1: SPIM needs fields"):
        assemble("spim mode=0 base=0\n")
    with pytest.raises(AsmError, match=r"line 1: unknown sload fields \['lines'\]"):
        assemble("sload lines=3\n")


def test_config_block_is_optional_and_checked():
    for name in ("tiny", "default", "tiny-il", "default-dualrb"):
        cfg = preset(name)
        assert cfg.spu is None and "spu" not in repr(cfg) and "spu" not in cfg.summary()
    cfg = preset(CONFIG)
    assert cfg.spu == SramPimConfig(macros=4, rows=32, word_lanes=16, mac_lanes=8, read_latency=1)
    assert "spu=SramPimConfig(" in repr(cfg) and cfg.summary()["spu"]["rows"] == 32
    assert preset("default-hpim").spu.word_lanes == 64
    assert cfg.replace(**{"spu.rows": 64}).spu.rows == 64
    with pytest.raises(ConfigError, match="SystemConfig.spu must be a SramPimConfig before spu"):
        preset("tiny").replace(**{"spu.rows": 64})
    with pytest.raises(ConfigError, match=r"SystemConfig.spu.mac_lanes must be at most 8 \(a result beat"):
        cfg.replace(**{"spu.mac_lanes": 16})
    with pytest.raises(ConfigError, match="SramPimConfig.macros must be at most mac_lanes=8"):
        SramPimConfig(macros=16, mac_lanes=8)
    with pytest.raises(ConfigError, match="SramPimConfig.rows must be an integer in 2..65536, not 1"):
        SramPimConfig(rows=1)


def test_functional_model_errors_match_the_golden_check():
    """The model's SPIM verdicts are sim.golden.sram_pim.check_command's; SLOAD's checks in their order."""
    from sim.soc_model import SocModel

    cfg = preset(CONFIG)
    s = cfg.spu
    m = SocModel(cfg)
    at = 0x8000

    def run(word):
        m.write(at, isa.to_bytes([word, isa.encode(SocOp.END)]))
        r = m.run(at, 2)
        return r.error, r.error_pc

    def sp(**kw):
        f = dict(mode=0, base=0, count=4, heads=1, stride=0, spm_in=0, in_pitch=1, spm_out=8, out_pitch=1)
        f.update(kw)
        return isa.encode(SocOp.SPIM, **f)

    def sl(**kw):
        f = dict(mem_addr=0x2000, pos_stride=32, positions=4, region_stride=0, regions=1, cols=1, line=0,
                 line_stride=0)
        f.update(kw)
        return isa.encode(SocOp.SLOAD, **f)

    spu = CpError.SPU
    assert run(sp()) == (0, 0) and run(sl()) == (0, 0)
    assert run(sp(base=s.rows - 1, count=s.macros + 1)) == (spu | SpuError.BAD_COMMAND << 8, 0)
    assert run(sp(heads=0)) == (spu | SpuError.BAD_COMMAND << 8, 0)
    assert run(sp(count=s.macros * s.rows)) == (0, 0)
    assert run(sp(count=s.macros * s.rows + 1)) == (spu | SpuError.BAD_COMMAND << 8, 0)
    assert run(sl(cols=0)) == (spu | SpuError.SLOAD_SIZE << 8, 0)
    assert run(sl(cols=0, mem_addr=8)) == (spu | SpuError.SLOAD_SIZE << 8, 0)     # size before alignment
    assert run(sl(line=s.macros * s.rows - 3)) == (spu | SpuError.SLOAD_LINE << 8, 0)
    assert run(sl(line=s.macros * s.rows - 4)) == (0, 0)
    # an SLOAD writes the line's first cols columns and zeroes the rest; a QK of one key reads it back
    m.write(0x2000, np.arange(16, dtype="<u2").view(np.uint8).tobytes())
    m.spu.mem[5] = 0xFFFF
    assert run(sl(positions=1, line=5)) == (0, 0)
    assert list(m.spu.mem[5]) == list(range(16))

