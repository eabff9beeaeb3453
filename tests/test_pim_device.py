"""PIM device RTL (hw/pim) on Verilator: normal traffic, GEMV, GELU, illegal sequences, back door.

Every cocotb test here runs the independent protocol checker; see sim/tb/pim_tb.py. The testbenches also
run on the behavioural channel (``impl="behav"``, hw/pim/behav.py), which must pass them unchanged
(tests/test_pim_behav.py compares it with the RTL cycle by cycle).
"""

import pytest

from hw.config import preset
from hw.pim import device_factory, device_sources
from sim.build import build

TB = "sim.tb.pim_tb"


IMPLS = ["rtl", "behav"]


def pim_build(config: str, sim: str = "verilator", impl: str = "rtl", cfg=None):
    cfg = cfg or preset(config)
    return build(device_factory(cfg), name=f"pim_device_{config}", key=repr(cfg), sim=sim,
                 extra_sources=tuple(device_sources(cfg, pim_impl=impl)), no_inline=("pim_bank_*",))


def run(config, testcase, sim="verilator", impl="rtl", **env):
    env = {"IANUS_CONFIG": config, **env}
    return pim_build(config, sim, impl).run(TB, testcase, env=env)


@pytest.mark.parametrize("config", ["tiny", "default", "tiny-dualrb"])
@pytest.mark.parametrize("impl", IMPLS)
def test_normal_traffic(config, impl):
    run(config, "normal_traffic", impl=impl, N_OPS=300 if config == "tiny" else 200)


@pytest.mark.parametrize("config", ["tiny", "tiny-dualrb"])
@pytest.mark.parametrize("impl", IMPLS)
def test_gemv_tiny(config, impl):
    # Shapes the tiny device holds (15 data rows): one chunk, several chunks, ragged edges.
    run(config, "gemv", impl=impl, GEMV_SHAPES="96x64,200x24,128x8,17x5,200x24g,64x16g")


@pytest.mark.parametrize("config", ["tiny", "tiny-dualrb"])
def test_gemv_packed_tiny(config):
    """firmware.pim.gemv_program of packed layouts (the GEMV macro's addr1): tiles of a row back to back in the
    open row, the input at several global-buffer slots; bit-exact with gemv_golden, within the bound."""
    run(config, "gemv", GEMV_SHAPES="16x40p1s3,32x200p2s1,16x300p1s5,100x40p8s0g,33x16p4s1,16x130p1s7g")


@pytest.mark.parametrize("impl", IMPLS)
def test_gemv_default_gpt2_small(impl):
    run("default", "gemv", impl=impl, GEMV_SHAPES="768x768,768x2304,768x3072,3072x768,768x3072g")


@pytest.mark.parametrize("config", ["tiny", "default", "tiny-dualrb"])
@pytest.mark.parametrize("impl", IMPLS)
def test_gelu_af(config, impl):
    run(config, "gelu_af", impl=impl, N_ROUNDS=8 if config == "tiny" else 4)


@pytest.mark.parametrize("config", ["tiny", "default", "tiny-dualrb"])
@pytest.mark.parametrize("impl", IMPLS)
def test_illegal_sequences_are_caught(config, impl):
    run(config, "illegal_sequences", impl=impl, CHECK_REFRESH_LATE=int(config == "tiny"))


@pytest.mark.parametrize("config", ["tiny", "default", "tiny-dualrb"])
@pytest.mark.parametrize("impl", IMPLS)
def test_timing_rules_at_their_edges(config, impl):
    # Each rule: one cycle early flagged (device code and checker name) and not executed; exact cycle accepted.
    run(config, "timing_edges", impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_timing_rules_at_their_edges_wide_tccd_trrd(impl):
    """tCCD and tRRD are 1 on the tiny preset (one command per cycle always meets them, so their edges
    cannot be tested there): the same edge test on tiny with tCCD = 2 and tRRD = 3."""
    over = {"timing.tCCD": 2, "timing.tRRD": 3}
    cfg = preset("tiny").replace(**over)
    sb = pim_build("tiny", impl=impl, cfg=cfg)
    sb.run(TB, "timing_edges", env={"IANUS_CONFIG": "tiny", "IANUS_TIMING": "tCCD=2,tRRD=3"})


@pytest.mark.parametrize("impl", IMPLS)
def test_backdoor_gpt2_small_layer(impl):
    run("default", "backdoor_layer", impl=impl, D_MODEL=768, N_SAMPLES=48)


@pytest.mark.parametrize("impl", IMPLS)
def test_backdoor_tiny(impl):
    run("tiny", "backdoor_layer", impl=impl, D_MODEL=8, N_SAMPLES=32)


def test_pu_latency_rules():
    from hw.pim.bank import PimBank
    from hw.pim.channel import PimChannel

    cfg = preset("tiny")
    with pytest.raises(ValueError, match="tMAC must be at least the PIM MAC pipeline depth 11, not 5"):
        PimChannel(cfg.replace(timing__tMAC=5))
    with pytest.raises(ValueError, match="tAF must be at least the AF pipeline depth 3, not 2"):
        PimBank(cfg.replace(timing__tAF=2))


def test_command_table_is_consistent():
    """RTL enum, checker opcodes and docs come from one table."""
    from hw.pim.commands import COMMANDS, LOWPREC_ONLY, PimOp, command_table_md
    from sim.pim_checker import OPCODES

    assert {c.name: c.opcode for c in COMMANDS} == OPCODES
    # PimOp: every command but the 4-bit-weight ones (their opcodes are LOWPREC_OPCODES; hw/pim/commands.py)
    assert {m.name: m.value for m in PimOp} == {k: v for k, v in OPCODES.items() if k not in LOWPREC_ONLY}
    assert len(set(OPCODES.values())) == len(OPCODES)
    md = command_table_md()
    assert all(f"| {c.name} |" in md for c in COMMANDS)


def test_gemv_layout_errors():
    from firmware.pim import GemvLayout

    cfg = preset("tiny")
    with pytest.raises(ValueError, match="GEMV K must be a positive integer, not 0"):
        GemvLayout(cfg, 0, 8)
    with pytest.raises(ValueError, match="GEMV 768x768 needs rows 0..287 but only 15 data rows exist per bank"):
        GemvLayout(cfg, 768, 768)


@pytest.mark.icarus
def test_pim_on_icarus():
    """The second simulator runs the same device and testbenches (back door included)."""
    run("tiny", "normal_traffic", sim="icarus", N_OPS=60)
    run("tiny", "gemv", sim="icarus", GEMV_SHAPES="64x16g")
