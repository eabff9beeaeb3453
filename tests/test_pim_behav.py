"""The behavioural PIM channel (hw/pim/behav.py, hw/verilog/pim_behav.cpp) against the RTL channel.

1. Lockstep: the RTL channel and the model on one bus (sim/tb/pim_lockstep_tb.py), every output compared on
   every cycle under thousands of random legal and illegal commands, resets, clears, back-door loads; the
   same harness must fail on a model given a wrong timing or a wrong addition order. With 4-bit weights
   (issue 19: tiny-w4a8, tiny-w4 and two variants) the stream adds LDSCAB / LDSLAB and random scale and
   accumulator slots, and must catch a model that scales every product or swaps the nibbles of a byte; the
   model's 4-bit unit alone (compiled with ctypes) equals the golden unit model on all eight format cases.
2. The PIM device testbenches (tests/test_pim_device.py, parametrized there with ``impl``) run on the
   behavioural device too.
3. A SoC layer on the tiny configuration: the same outputs bit for bit and the same cycles per program on
   both devices.
"""

import re
import zlib

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
    ("tiny-w4a8", {"grid_choice": False, "quant_group": 64, "row_buffers": 2}, 11),
])
def test_lockstep_random_commands_4bit_variants(config, changes, seed):
    """The other weight / scale formats and one accumulator slot: INT4 x FP8 with BF16 scales (LDSLAB illegal);
    FP4 without grid choice (code 0b1000 is -0), groups of one column, two row buffers (LDS on the PIM buffer)."""
    run_lockstep(config, 20000, seed, pim=changes)


def test_lockstep_catches_a_wrong_4bit_model():
    """A 4-bit model with the scale applied to every product before an FP32 sum (mutation 2) must be caught
    (one mutant build; mutation 3, the nibbles of each byte swapped, is caught by the lockstep as well, measured
    at 31c01a6, and is kept by the cheaper test_model_4bit_unit_mutations_are_caught)."""
    with pytest.raises(CocotbFailure, match="rtl .* behav"):
        run_lockstep("tiny-w4a8", 20000, 10, env={"MIN_EXECUTED": 0}, mutation=2)


@pytest.mark.parametrize("what", ["timing", "adder_order"])
def test_lockstep_catches_a_wrong_model(what):
    """The harness is not blind: a model with tRCDRD one cycle longer, or with the lanes added left to right
    instead of by the adder tree, must be caught."""
    kw = {"behav_timing": {"tRCDRD": preset("tiny").timing.tRCDRD + 1}} if what == "timing" else {"mutation": 1}
    with pytest.raises(CocotbFailure, match="rtl .* behav"):
        run_lockstep("tiny", 20000, 6, env={"MIN_EXECUTED": 0}, **kw)


def test_model_tables_match_the_command_table():
    """The C++ model's opcodes, violation codes and parameter names are hw/pim/commands.py's and behav.py's."""
    from hw.pim.behav import ACT_CODES, SCALE_CODES, WEIGHT_CODES
    from hw.pim.commands import COMMANDS, LOWPREC_ONLY, VIOLATIONS

    text = BEHAV_CPP.read_text()
    ops = dict((m.group(1), int(m.group(2))) for m in re.finditer(r"OP_(\w+) = (\d+)", text))
    # Every command of the table, the 4-bit weights' LDSCAB / LDSLAB included.
    assert ops == {c.name: c.opcode for c in COMMANDS} and set(LOWPREC_ONLY) <= set(ops)
    for prefix, codes in (("W", WEIGHT_CODES), ("A", ACT_CODES), ("S", SCALE_CODES)):
        found = dict((m.group(1), int(m.group(2))) for m in re.finditer(rf"\b{prefix}_(\w+) = (\d+)", text))
        assert found == {k.upper(): v for k, v in codes.items()}, (prefix, found)
    with pytest.raises(ValueError, match="mutation must be one of"):
        behav_params(preset("tiny-w4"), mutation=7)
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


# -- the 4-bit unit of the C++ model alone, against the golden model (every weight / activation / scale format) --

def _model_lib():
    """pim_behav.cpp compiled as a shared library (cached by its hash), for ctypes."""
    import ctypes
    import subprocess

    from filelock import FileLock

    from hw.gen import BUILD_ROOT, sha

    root = subprocess.run(["verilator", "--getenv", "VERILATOR_ROOT"], capture_output=True, text=True).stdout.strip()
    out = BUILD_ROOT / "pim_behav_lib" / f"pim_behav-{sha(BEHAV_CPP.read_bytes())}.so"
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if not out.exists():
            subprocess.run(["g++", "-std=c++17", "-O1", "-shared", "-fPIC", f"-I{root}/include/vltstd",
                            f"-I{root}/include", str(BEHAV_CPP), "-o", str(out) + ".tmp"], check=True)
            (out.parent / (out.name + ".tmp")).replace(out)
    lib = ctypes.CDLL(str(out))
    u32p, u8p = ctypes.POINTER(ctypes.c_uint32), ctypes.POINTER(ctypes.c_uint8)
    lib.ianus_pimb_new.restype = ctypes.c_void_p
    lib.ianus_pimb_new.argtypes = [u32p]
    lib.ianus_pimb_step.restype = ctypes.c_longlong
    lib.ianus_pimb_step.argtypes = [ctypes.c_void_p, ctypes.c_longlong, ctypes.c_uint8, ctypes.c_int, ctypes.c_int,
                                    ctypes.c_int, ctypes.c_int, u32p, u32p, ctypes.c_uint8, u8p, u32p, u32p]
    return lib


class _Model:
    """The C++ model driven command by command (generous spacing: every timing rule is met)."""

    def __init__(self, lib, cfg, mutation=0):
        import ctypes

        self.lib, self.cfg, self.c = lib, cfg, 0
        params = behav_params(cfg, mutation)
        self.h = lib.ianus_pimb_new((ctypes.c_uint32 * len(params))(*params))
        self.nw = cfg.pim.column_bits // 32
        self.rdata = (ctypes.c_uint32 * self.nw)()
        self.st = (ctypes.c_uint32 * 16)()
        self.rv = ctypes.c_uint8()
        self.mask = (ctypes.c_uint32 * max(1, cfg.pim.column_bytes // 32))(*[0xFFFFFFFF] * max(1, cfg.pim.column_bytes // 32))

    def cmd(self, name, bank=0, row=0, col=0, data=0, gap=None):
        import ctypes

        from sim.pim_checker import OPCODES

        words = (ctypes.c_uint32 * self.nw)(*[(data >> (32 * k)) & 0xFFFFFFFF for k in range(self.nw)])
        read = None
        for i in range(gap or self.cfg.timing.tMAC + self.cfg.timing.tRCDRD + 4):
            op = OPCODES[name] if i == 0 else 0
            self.lib.ianus_pimb_step(self.h, self.c, 0, op, bank, row, col, words, self.mask, 0, ctypes.byref(self.rv),
                                     self.rdata, self.st)
            self.c += 1
            if self.rv.value:
                read = [self.rdata[k] for k in range(self.nw)]
        assert self.st[0] == 0, f"{name}: violation code {self.st[1]}"
        return read


def _lp_operands(rng, cfg, kind, C):
    """(codes [C, 64], activations [C, 64], scales [groups] (16-bit), selectors [groups]) of one kind."""
    p = cfg.pim
    groups = C * 64 // p.quant_group
    codes = rng.integers(0, 16, (C, 64))
    if kind == "max_codes":
        codes = rng.choice([7, 8, 9, 15], (C, 64))
    if p.act_format == "fp8_e4m3":
        x = rng.integers(0, 256, (C, 64))
        x = np.where((x & 0x7F) == 0x7F, x ^ 1, x)
        if kind == "nan_act":
            x[rng.integers(C), rng.integers(64)] = 0x7F
        if kind == "max_act":
            x = rng.choice([0x7E, 0xFE, 0x01, 0x81], (C, 64))
    else:
        vals = (rng.standard_normal((C, 64)) * 10.0 ** rng.integers(-30, 30, (C, 64))).astype(np.float32)
        x = (vals.view(np.uint32) >> 16).astype(np.int64)
        if kind == "nan_act":
            x[rng.integers(C), rng.integers(64)] = rng.choice([0x7FC1, 0x7F80, 0xFF80])
        if kind == "max_act":
            x = rng.choice([0x7F7F, 0xFF7F, 0x0080, 0x8001], (C, 64))
        if kind == "cancel":
            x[:, 1::2] = x[:, 0::2]
            codes[:, 1::2] = (16 - codes[:, 0::2]) % 16 if p.weight_format == "int4" else codes[:, 0::2] ^ 8
    if p.scale_format == "fp16":
        scales = rng.integers(0x0400, 0x7C00, groups) | (rng.integers(0, 2, groups) << 15)
        specials = [0x7C00, 0xFC00, 0x7E00, 0x0001, 0x03FF, 0x0000, 0x8000, 0x7BFF]
    else:
        scales = rng.integers(0x3000, 0x4800, groups) | (rng.integers(0, 2, groups) << 15)
        specials = [0x7F80, 0xFF80, 0x7FC0, 0x0001, 0x007F, 0x0000, 0x8000, 0x7F7F]
    if kind == "special_scale":
        scales[rng.integers(groups)] = rng.choice(specials)
    if kind == "zero":
        codes[:] = 0
    return codes, x, scales, rng.integers(0, 4, groups)


@pytest.mark.parametrize("weights,acts,scale_format,group,grid", [
    ("fp4", "fp8_e4m3", "fp16", 128, True), ("fp4", "fp8_e4m3", "bf16", 64, False),
    ("int4", "fp8_e4m3", "fp16", 256, False), ("int4", "fp8_e4m3", "bf16", 128, False),
    ("int4", "bf16", "fp16", 128, False), ("int4", "bf16", "bf16", 64, False),
    ("fp4", "bf16", "fp16", 64, True), ("fp4", "bf16", "bf16", 128, False),
])
def test_model_4bit_unit_against_golden(weights, acts, scale_format, group, grid, mutation=0):
    """The model's 4-bit unit (LDSCAB, LDSLAB, WRBIAS, MACAB with scale slots, RDMAC) equals the golden unit
    model (sim.golden.lowprec_unit.unit_acc) bit for bit on every format, edge kinds included; the formats the
    lockstep tests do not build RTL for (FP4 x BF16, BF16 scales with BF16 activations) are covered here."""
    from sim.golden import lowprec_unit as LU

    base = "tiny-w4a8" if acts == "fp8_e4m3" else "tiny-w4"
    cfg = preset(base).replace(**{"pim.weight_format": weights, "pim.grid_choice": grid, "pim.quant_group": group,
                                  "pim.scale_format": scale_format, "timing.tREFI": 1 << 20})
    p = cfg.pim
    C = p.gb_slots                                 # one GB of activations: K = 64 * gb_slots
    groups = C * 64 // group
    model = _Model(_model_lib(), cfg, mutation)
    rng = np.random.default_rng(zlib.crc32(repr((weights, acts, scale_format, group, grid)).encode()))
    kinds = ["random"] * 6 + ["nan_act", "max_act", "max_codes", "special_scale", "zero", "cancel"]
    checked = 0
    for rnd in range(24):
        kind = kinds[rnd % len(kinds)]
        ops = [_lp_operands(rng, cfg, kind, C) for _ in range(p.banks)]
        x = ops[0][1]                              # one activation vector for every bank (the GB is shared)
        model.cmd("ACTAB", row=rnd % 8)
        for b, (codes, _, scales, sels) in enumerate(ops):
            for c in range(C):
                word = sum(int(v) << (4 * k) for k, v in enumerate(codes[c]))
                model.cmd("WR", bank=b, col=c, data=word, gap=2)
            model.cmd("WR", bank=b, col=C, data=sum(int(s) << (16 * g) for g, s in enumerate(scales)), gap=2)
            model.cmd("WR", bank=b, col=C + 1, data=sum(int(s) << (2 * g) for g, s in enumerate(sels)), gap=2)
        per = 256 // (16 if acts == "bf16" else 8)
        for g in range(p.gb_columns):
            vals = x[g // p.act_ratio, (g % p.act_ratio) * per:(g % p.act_ratio + 1) * per]
            model.cmd("WRGB", col=g, data=sum(int(v) << ((256 // per) * k) for k, v in enumerate(vals)), gap=2)
        model.cmd("LDSCAB", col=C)
        if grid:
            model.cmd("LDSLAB", col=C + 1)
        slot = rnd % 2
        acc0 = rng.uniform(-4, 4, p.banks).astype(np.float32).view(np.uint32)
        model.cmd("WRBIAS", row=slot << 4, data=sum(int(a) << (32 * k) for k, a in enumerate(acc0)))
        for c in range(C):
            model.cmd("MACAB", col=c, row=(slot << 4) | (c * 64 // group), gap=1)
        model.cmd("NOP")
        got = model.cmd("RDMAC", row=slot << 4)
        model.cmd("PREAB")
        for b, (codes, _, scales, sels) in enumerate(ops):
            want = LU.unit_acc(weights, acts, codes, x, scales, sels, int(acc0[b]), group, scale_format, grid)
            assert got[b] == want, (f"round {rnd} ({kind}) bank {b}: model {got[b]:#010x} golden {want:#010x}")
            checked += 1
    assert checked == 24 * p.banks and groups >= 1


@pytest.mark.parametrize("mutation", [2, 3])
def test_model_4bit_unit_mutations_are_caught(mutation):
    """The golden comparison is not blind: the scale applied per product (2), the nibbles of a byte swapped (3)."""
    for case in (("fp4", "fp8_e4m3", "fp16", 128, True), ("int4", "bf16", "fp16", 128, False)):
        with pytest.raises(AssertionError, match="model .* golden"):
            test_model_4bit_unit_against_golden(*case, mutation=mutation)
