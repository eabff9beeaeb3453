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


# -- the hpim policy (firmware/hpim.py) ---------------------------------------------------------------------------

def _gen_cycles(res):
    return sum(r["cycles"] for r in res if " gen@" in r["name"])


def _rtl_vs_model(config, policy, prefill, generate):
    from firmware.runtime import Job, read_outputs
    from sim.run import prepare, reference
    from sim.soc_model import run_job
    from sim.tb.soc_run import run_rtl

    cm, job, x, ws = prepare(config, policy, 1, prefill, generate)
    out, res = run_rtl(job, test_name=f"spu_{policy}_{config}", checker=True)
    m = run_job(Job(job.compiled, job.image, job.programs))
    want = read_outputs(cm, m.read)
    bad = np.flatnonzero(out.view(np.uint32) != want.view(np.uint32))
    assert bad.size == 0, f"{policy}: RTL and model outputs differ at {bad.size} elements, first {bad[:8]}"
    for key, d in job.rtl["dumps"].items():
        got = open(d["path"], "rb").read()
        assert got == m.read(d["addr"], d["n"]), f"{policy}: RTL and model differ in {key}"
    ref = reference(x, ws, cm.shape)
    assert np.abs(out - ref).max() <= 0.10 * np.abs(ref - x).max()
    return cm, res


def test_hpim_policy_tiny_layer_bit_exact():
    """A tiny GPT-2 layer (prefill 6, 3 generated tokens) under hpim on tiny-hpim: generation attention on the
    SRAM-PIM unit, bit-exact with the functional model, the Python protocol checker on; the generation cycles per
    token against ianus on the same build."""
    cm, res = _rtl_vs_model(CONFIG, "hpim", 6, 3)
    ops = {w & 0xF for st in cm.stages if st.phase == "gen" for w in st.words}
    assert {SocOp.SPIM, SocOp.SLOAD} <= ops
    spu_busy = {r["name"]: r["busy"]["spu"] for r in res}
    assert all(v > 0 for k, v in spu_busy.items() if " gen@" in k and "qkv_attn" in k), spu_busy
    assert all(v == 0 for k, v in spu_busy.items() if "qkv_attn" not in k or "prefill" in k), spu_busy
    _, res_ianus = _rtl_vs_model(CONFIG, "ianus", 6, 3)
    hp, ia = _gen_cycles(res) / 3, _gen_cycles(res_ianus) / 3
    print(f"generation cycles per token on {CONFIG}: hpim {hp:.1f}, ianus {ia:.1f} ({ia / hp:.3f}x)")


@pytest.mark.parametrize("config", [CONFIG, "default-hpim"])
def test_compiler_spim_cycles_match_the_unit(config):
    """firmware.hpim.spim_cycles (from the configuration, for the compiler's estimates) = the unit's
    command_cycles + SPIM_OVERHEAD (the RTL's, measured in test_fence_and_spim_cycles)."""
    from firmware.hpim import spim_cycles
    from hw.npu.sram_pim import SramPimOp, SramPimUnit

    s = preset(config).spu
    unit = SramPimUnit(s.macros, s.rows, s.word_lanes, s.mac_lanes, s.read_latency)
    for pv in (False, True):
        for count, heads in ((1, 1), (5, 1), (13, 2), (64, 3), (255, 12)):
            assert spim_cycles(preset(config), pv, count, heads) == \
                unit.command_cycles(SramPimOp(int(pv)), count, heads) + isa.SPIM_OVERHEAD, (pv, count, heads)


def test_scratchpad_write_port_contention():
    soc_build().run(TB, "contention", env={"IANUS_CONFIG": CONFIG})


def test_sload_waits_for_pim_mode():
    soc_build().run(TB, "beside_pim", env={"IANUS_CONFIG": CONFIG})
