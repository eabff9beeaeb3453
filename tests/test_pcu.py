"""PCU (hw/pcu.py) on the memory controllers and the PIM device: macro programs bit-identical to the
functional model, error codes identical to it, recovery after CLEAR."""

import pytest

from firmware.macro import MacroError, MacroFlag, MacroOp, pcu_limits
from hw.config import preset
from hw.pcu import (
    E_BAD_ADDRESS,
    E_BAD_FLAGS,
    E_BAD_LENGTH,
    E_BAD_OPCODE,
    E_BAD_REGION,
    E_DEVICE_VIOLATION,
    E_NO_INPUT,
    E_NO_RESULT,
    E_RESERVED_NONZERO,
    F_BF16,
    F_BIAS,
    F_GELU,
    MACRO_LIMITS,
    OP_GEMV,
    OP_NOP,
    OP_READ_RES,
    OP_WRITE_VEC,
    Pcu,
    PcuSystem,
)
from hw.pim import device_factory, device_sources
from sim.build import build

TB = "sim.tb.pcu_tb"


def pcu_build(config, **pim):
    """The PCU system's build for a preset, with ``pim.*`` overrides (run with ``IANUS_PIM``, :func:`_pim_env`)."""
    cfg = preset(config)
    if pim:
        cfg = cfg.replace(**{f"pim.{k}": v for k, v in pim.items()})
    return build(lambda: PcuSystem(cfg, device_factory(cfg)), name=f"pcu_system_{config}", key=repr(cfg),
                 extra_sources=tuple(device_sources(cfg)), no_inline=("pim_bank_*",))


def _pim_env(**pim):
    return {"IANUS_PIM": ",".join(f"{k}={v}" for k, v in pim.items())} if pim else {}


def test_constants_match_the_table():
    assert (OP_NOP, OP_WRITE_VEC, OP_GEMV, OP_READ_RES) == tuple(MacroOp)
    assert (F_BIAS, F_GELU, F_BF16) == (MacroFlag.BIAS, MacroFlag.GELU, MacroFlag.BF16)
    assert (E_BAD_OPCODE, E_BAD_FLAGS, E_BAD_LENGTH, E_BAD_ADDRESS, E_BAD_REGION, E_NO_INPUT, E_NO_RESULT,
            E_DEVICE_VIOLATION, E_RESERVED_NONZERO) == (
        MacroError.BAD_OPCODE, MacroError.BAD_FLAGS, MacroError.BAD_LENGTH, MacroError.BAD_ADDRESS,
        MacroError.BAD_REGION, MacroError.NO_INPUT, MacroError.NO_RESULT, MacroError.DEVICE_VIOLATION,
        MacroError.RESERVED_NONZERO)
    assert MACRO_LIMITS == pcu_limits(preset("default"))


def test_pcu_rejects_unsupported_geometry():
    with pytest.raises(ValueError, match="banks to be a multiple of column_bits/32 = 8, not 4"):
        Pcu(preset("tiny").replace(**{"pim.banks": 4}))


# The PCU streams its micro commands (one per cycle when the controllers take them): a GEMV's row program
# (first command to last result word on the device's buses) stays within this factor of the row-timing bound
# firmware.pim.gemv_lower_bound, refresh charged at its steady-state rate on both sides (sim/tb/pcu_tb.py).
ROW_RATIO = 1.15


@pytest.mark.parametrize("config", ["tiny", "tiny-dualrb", "tiny-il", "tiny-p4"])
def test_pcu_gemv_tiny(config):
    """One chunk; several chunks (K > 128) with one tile (partial sums kept in the accumulators) and with
    several tiles (read back and preloaded); GELU; BF16 results; without bias. Bit-exact with the functional
    model; the row program within ROW_RATIO of its bound. (The whole macro is not bounded here: on tiny shapes
    the bias read from device memory and the macro hand-over, which the bound leaves out, are 5-20 cycles
    of a 20-150-cycle GEMV; the default-size test bounds it.) tiny-p4: the pipelined processing unit (issue 15;
    each row's last MAC combines, the one-tile rows wait tMAC after it in the controller)."""
    pcu_build(config).run(TB, "pcu_gemv", env={"IANUS_CONFIG": config, "PCU_MAX_ROW_RATIO": ROW_RATIO,
                                                 "PCU_SHAPES": "64x32,200x16,96x32g,64x16h,200x32,200x48gn,"
                                                               "120x112n,32x16h"})


# Packed GEMVs (addr1, hw/spec/macro.py): KxN, pitch, first slot, options (g GELU, h BF16 results, n no bias):
# tiles in one row from slot 3; 13 tiles over four rows from slot 1 (the input at four global-buffer slots);
# 19 tiles over three rows without bias; K = 100 at the whole-buffer pitch with GELU (one tile per row); a
# V^T-like GEMV (K = 33 tokens, one tile at slot 1 of pitch 4) with BF16 results.
PACKED_SHAPES = "16x40p1s3,32x200p2s1,16x300p1s5n,100x40p8s0g,33x16p4s1h,16x130p1s7g"


@pytest.mark.parametrize("config", ["tiny", "tiny-dualrb", "tiny-p4"])
def test_pcu_gemv_packed_tiny(config):
    """Packed GEMVs bit-exact with the functional model on the RTL PCU, the rest of every packed row random:
    a PCU that ignored the column offsets or the global-buffer slots would read it (sim/tb/pcu_tb.py)."""
    pcu_build(config).run(TB, "pcu_gemv_packed", env={"IANUS_CONFIG": config, "PCU_PACKED": PACKED_SHAPES})


@pytest.mark.parametrize("config", ["tiny", "default"])
def test_packed_gemv_functional_model_reads_the_offsets(config):
    """The functional model's packed GEMV (the reference semantics) equals gemv_golden of the same weights while
    every column of the packed rows outside the layout's tiles is random, and the layout's K / V^T rows hold
    several tiles (sim/tb/pcu_tb.py prepare_packed checks it; a model that ignored the column offsets or the
    first slot would read the random columns)."""
    from sim.tb.pcu_tb import prepare_packed

    cfg = preset(config)
    shapes = [s for s in PACKED_SHAPES.split(",") if "g" not in s] if config == "tiny" else \
        ["64x528p4s5", "528x64p64s0h", "300x64p32s1n"]
    for i, spec in enumerate(shapes):
        kn, rest = spec.split("p")
        K, N = (int(v) for v in kn.split("x"))
        pitch, slot0 = (int(v) for v in rest.rstrip("ghn").split("s"))
        prepare_packed(cfg, K, N, pitch, slot0, False, "h" in rest, seed=i, bias="n" not in rest)


def test_pcu_errors_tiny():
    pcu_build("tiny").run(TB, "pcu_errors", env={"IANUS_CONFIG": "tiny"})


@pytest.mark.long          # its own build of the default device (5-20 minutes); `make demo` runs the same path
def test_pcu_gemv_default_gpt2_small():
    """GPT-2-small FC shapes through the PCU on the default device: attention projection, FC1 with GELU in
    PIM, FC2 (three input chunks), QKV. Bit-exact with the functional model; the row program and the whole
    GEMV macro (bias read and hand-over included) within ROW_RATIO of the bound."""
    pcu_build("default").run(TB, "pcu_gemv", env={"IANUS_CONFIG": "default", "PCU_MAX_ROW_RATIO": ROW_RATIO,
                                                  "PCU_MAX_RATIO": ROW_RATIO,
                                                  "PCU_SHAPES": "768x768,768x3072g,3072x768,768x2304"})


# 4-bit weights (issue 19, hw/pcu_w4.py): KxN, h BF16 results, n no bias, r<row> base row. tiny-w4 (chunks of 128
# inputs): one chunk with one tile; three tiles in two rows (two units per row) without bias; 13 tiles in seven
# rows from row 3 with BF16 results; two and three chunks (partial sums read back and preloaded) with one tile,
# three tiles, 13 tiles. tiny-w4a8 (fp4 with grid selectors, FP8 activations, chunks of 256: one unit per row):
# also a shorter last chunk (384 = 256 + 128), chunks of one group (c1: addr1 = 1) of 256 and 384 inputs.
W4_SHAPES = {"tiny-w4": "128x16,128x40n,128x200hr3,256x16,384x40n,256x200hr1,128x32",
             "tiny-w4a8": "128x16,256x48n,128x200hr3,256x16h,512x48n,384x16h,768x40,256x48c1,384x40nc1"}


@pytest.mark.parametrize("config, pim", [("tiny-w4", {}), ("tiny-w4a8", {}), ("tiny-w4", {"acc_slots": 1}),
                                         ("tiny-w4a8", {"banks": 16})],
                         ids=["tiny-w4", "tiny-w4a8", "tiny-w4-one-slot", "tiny-w4a8-16-banks"])
def test_pcu_w4_gemv_tiny(config, pim):
    """4-bit GEMVs through the PCU bit-exact with the functional model (checked against the golden unit model),
    the rest of the weight rows random, the protocol checker clean, with two accumulator slots (the presets: slot 1
    used) and one, with one accumulator group per bank word and two (16 banks, as the default device)
    (sim/tb/pcu_tb.py pcu_w4_gemv)."""
    pcu_build(config, **pim).run(TB, "pcu_w4_gemv", env={"IANUS_CONFIG": config, "PCU_W4": W4_SHAPES[config],
                                                          **_pim_env(**pim)})


@pytest.mark.parametrize("config", ["tiny-w4", "tiny-w4a8"])
def test_pcu_w4_errors_tiny(config):
    """4-bit GEMVs the PCU does not issue (GELU, K not whole groups or above the input buffer, packing, rows, bias
    address) give the functional model's error code, no command reaches the device; recovery after CLEAR."""
    pcu_build(config).run(TB, "pcu_w4_errors", env={"IANUS_CONFIG": config})
