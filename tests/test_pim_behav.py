"""The behavioural PIM channel (hw/pim/behav.py, hw/verilog/pim_behav.cpp) against the RTL channel.

1. Lockstep: the RTL channel and the model on one bus (sim/tb/pim_lockstep_tb.py), every output compared on
   every cycle under thousands of random legal and illegal commands, resets, clears, back-door loads; the
   same harness must fail on a model given a wrong timing or a wrong addition order.
2. The PIM device testbenches (tests/test_pim_device.py, parametrized there with ``impl``) run on the
   behavioural device too.
3. A SoC layer on the tiny configuration: the same outputs bit for bit and the same cycles per program on
   both devices.
"""

import re

import numpy as np
import pytest

from hw.config import preset
from hw.pim import device_sources
from hw.pim.behav import BEHAV_CPP, PARAM_NAMES, behav_channel_sources, behav_params, check_pim_impl
from hw.pim.channel import pim_module_names
from sim.build import CocotbFailure, build

TB = "sim.tb.pim_lockstep_tb"


def _cfg(config, timing=None, pim=None):
    cfg = preset(config)
    if pim:
        cfg = cfg.replace(**{f"pim.{k}": v for k, v in pim.items()})
    return cfg.replace(**{f"timing.{k}": v for k, v in timing.items()}) if timing else cfg


def lockstep_build(config, timing=None, behav_timing=None, mutation=0, pim=None):
    """The RTL channel of ``config`` (with ``pim`` geometry overrides) beside a behavioural channel (of
    ``config`` with ``behav_timing`` and ``mutation``, to show the comparison catches a wrong model)."""
    from sim.tb.pim_lockstep_tb import PimLockstep

    cfg = _cfg(config, timing, pim)
    cfg_b = cfg.replace(**{f"timing.{k}": v for k, v in behav_timing.items()}) if behav_timing else cfg
    rtl = pim_module_names(cfg)["channel"]
    tag = "" if cfg_b == cfg and not mutation else f"_mutant{mutation or ''}"
    if pim:
        tag += "_" + rtl[-8:]
    behav = rtl.replace("pim_channel_", "pim_channel_behav_") + tag
    sources = (*device_sources(cfg), *behav_channel_sources(cfg_b, module=behav, mutation=mutation))
    return build(lambda: PimLockstep(cfg, rtl, behav), name=f"pim_lockstep_{config}{tag}",
                 key=repr(cfg) + behav, extra_sources=sources, no_inline=("pim_bank_*",))


def run_lockstep(config, n_cycles, seed, timing=None, **kw):
    env = {"IANUS_CONFIG": config, "N_CYCLES": n_cycles, "SEED": seed}
    if timing:
        env["IANUS_TIMING"] = ",".join(f"{k}={v}" for k, v in timing.items())
    if kw.get("pim"):
        env["IANUS_PIM"] = ",".join(f"{k}={v}" for k, v in kw["pim"].items())
    env.update(kw.pop("env", {}))
    return lockstep_build(config, timing, **kw).run(TB, "lockstep", env=env)


@pytest.mark.parametrize("config,seed", [("tiny", 1), ("tiny", 2), ("tiny-dualrb", 3)])
def test_lockstep_random_commands(config, seed):
    run_lockstep(config, 20000, seed)


def test_lockstep_wide_tccd_trrd():
    """tCCD 2, tRRD 3, tRL 4 (1 / 1 / 2 on the tiny preset): the windows and the read pipe of other lengths."""
    run_lockstep("tiny", 12000, 4, timing={"tCCD": 2, "tRRD": 3, "tRL": 4, "tMAC": 13, "tAF": 6})


@pytest.mark.long
@pytest.mark.parametrize("config", ["default", "default-dualrb"])
def test_lockstep_default(config):
    """Paper timings (tRL 20, tRCD 36, tREFI 1900), 16 banks, 4096 rows: a build of the RTL channel each."""
    run_lockstep(config, 30000, 5)


@pytest.mark.parametrize("config,seed", [("tiny-w4a8", 7), ("tiny-w4", 8)])
def test_lockstep_random_commands_4bit(config, seed):
    """4-bit weights (issue 19): FP4 with grid choice x FP8 and INT4 x BF16, two accumulator slots; the stream
    also draws LDSCAB / LDSLAB and MACs, WRBIAS and RDMAC with random scale and accumulator slots."""
    run_lockstep(config, 20000, seed)


@pytest.mark.parametrize("config,changes,seed", [
    ("tiny-w4a8", {"weight_format": "int4", "grid_choice": False, "acc_slots": 1, "scale_format": "bf16"}, 9),
])
def test_lockstep_random_commands_4bit_variants(config, changes, seed):
    """The other weight / scale formats and one accumulator slot: INT4 x FP8 with BF16 scales (LDSLAB illegal)."""
    run_lockstep(config, 12000, seed, pim=changes)


@pytest.mark.parametrize("mutation", [2, 3])
def test_lockstep_catches_a_wrong_4bit_model(mutation):
    """A 4-bit model with the scale applied to every product before an FP32 sum (2) or with the nibbles of each
    byte taken in the wrong order (3) must be caught."""
    with pytest.raises(CocotbFailure, match="rtl .* behav"):
        run_lockstep("tiny-w4a8", 20000, 10, env={"MIN_EXECUTED": 0}, mutation=mutation)


@pytest.mark.parametrize("what", ["timing", "adder_order"])
def test_lockstep_catches_a_wrong_model(what):
    """The harness is not blind: a model with tRCDRD one cycle longer, or with the lanes added left to right
    instead of by the adder tree, must be caught."""
    kw = {"behav_timing": {"tRCDRD": preset("tiny").timing.tRCDRD + 1}} if what == "timing" else {"mutation": 1}
    with pytest.raises(CocotbFailure, match="rtl .* behav"):
        run_lockstep("tiny", 20000, 6, env={"MIN_EXECUTED": 0}, **kw)


def test_model_tables_match_the_command_table():
    """The C++ model's opcodes, violation codes and parameter names are hw/pim/commands.py's and behav.py's."""
    from hw.pim.commands import COMMANDS, LOWPREC_ONLY, VIOLATIONS

    text = BEHAV_CPP.read_text()
    ops = dict((m.group(1), int(m.group(2))) for m in re.finditer(r"OP_(\w+) = (\d+)", text))
    # The model covers BF16 devices (it refuses 4-bit weights: behav_params), without the 4-bit commands.
    assert ops == {c.name: c.opcode for c in COMMANDS if c.name not in LOWPREC_ONLY}
    with pytest.raises(ValueError, match="models the BF16 processing unit only"):
        behav_params(preset("tiny-w4"))
    codes = dict((m.group(1), int(m.group(2))) for m in re.finditer(r"V_(\w+) = (\d+)", text))
    assert codes == {v.name: v.code for v in VIOLATIONS}
    names = re.search(r"kParam\[\] = \{(.*?)\};", text, re.S).group(1)
    assert tuple(re.findall(r'"(\w+)"', names)) == PARAM_NAMES
    assert len(behav_params(preset("default"))) == len(PARAM_NAMES)


def test_pim_impl_choice_is_checked():
    with pytest.raises(ValueError, match="PIM implementation must be one of rtl, behav, not 'fast'"):
        check_pim_impl("fast")
    with pytest.raises(ValueError, match="needs Verilator"):
        check_pim_impl("behav", "icarus")
    from sim.tb.soc_run import soc_sim_build

    with pytest.raises(ValueError, match="needs Verilator"):
        soc_sim_build(preset("tiny"), "icarus", pim_impl="behav")


def test_ianus_run_pim_model_option():
    """``ianus run --pim-model behav`` is refused on Icarus before anything is built."""
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "sim.cli", "run", "--config", "tiny", "--backend", "icarus",
                        "--pim-model", "behav"], capture_output=True, text=True)
    assert p.returncode == 2, (p.returncode, p.stderr)
    assert "--pim-model behav needs --backend verilator (DPI-C), not icarus" in p.stderr


def test_soc_layer_same_bits_and_cycles_on_behavioural_device():
    """A GPT-2 layer (tiny, ianus policy: PIM GEMVs with GELU in the AF units, normal traffic, refresh) on the
    SoC with the RTL device and with the behavioural one: same outputs, KV caches and cycles per program."""
    from sim.run import prepare
    from sim.tb.soc_run import run_rtl

    runs = {}
    for impl in ("rtl", "behav"):
        _, job, _, _ = prepare("tiny", "ianus", 1, 4, 2)
        out, progs = run_rtl(job, test_name=f"soc_pim_{impl}", pim_impl=impl)
        dumps = {k: open(d["path"], "rb").read() for k, d in job.rtl["dumps"].items()}
        runs[impl] = (out, [(p["name"], p["cycles"]) for p in progs], dumps)
    (o1, c1, d1), (o2, c2, d2) = runs["rtl"], runs["behav"]
    assert c1 == c2, f"cycles per program differ: {[(a, b) for a, b in zip(c1, c2, strict=True) if a != b]}"
    assert np.array_equal(o1.view(np.uint32), o2.view(np.uint32))
    assert d1 == d2
