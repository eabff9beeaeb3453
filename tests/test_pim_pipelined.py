"""The pipelined PIM processing unit (issue 15): configuration, golden order, and the device on ``tiny-p4``.

``tiny-p4`` / ``default-p4``: 2-stage multipliers, 4-stage adder-tree levels and 4 interleaved partial sums
(``PimGeometry.mul_stages / tree_stages / acc_stages``), ``tMAC`` from the unit's depth. The combine of the
partial sums is triggered by a flag in the MAC command (hw/pim/bank.py). Every simulation runs the
protocol checker; the RTL tests share one Verilator build of the tiny-p4 device (sim/tb/pim_pipe_tb.py and
the GEMV testbench of sim/tb/pim_tb.py).
"""

import numpy as np
import pytest

from firmware.pim import GemvLayout, gemv_golden, gemv_program
from hw.config import COMBINE_ROW_BIT, ConfigError, preset
from hw.spec import fp as G
from sim.golden.pim import PimChannelModel

PIPE_TB = "sim.tb.pim_pipe_tb"


def test_presets_take_tmac_from_the_unit():
    from hw.mac_unit import MacUnit
    from hw.pim.bank import check_pu_timing, pu_mac_depth

    for name in ("tiny-p4", "default-p4"):
        cfg = preset(name)
        p = cfg.pim
        assert (p.mul_stages, p.tree_stages, p.acc_stages) == (2, 4, 4) and p.pipelined
        unit = MacUnit(p.lanes, mul_stages=2, tree_stages=4, acc_stages=4)
        # storage read + multiplier 2 + tree 4 x 4 levels + accumulator 4, then the combine (9)
        assert unit.latency == 22 and unit.combine_latency == 9
        assert cfg.timing.tMAC == pu_mac_depth(p) == 1 + unit.result_latency == 32
        base = preset(name.removesuffix("-p4"))
        # and the systolic array's PEs (3-stage LUT multipliers, 4-stage adders; hw.npu.systolic)
        assert (cfg.npu.pe_mul_stages, cfg.npu.pe_add_stages) == (3, 4)
        assert cfg.replace(name=base.name, **{"pim.mul_stages": 1, "pim.tree_stages": 2, "pim.acc_stages": 1,
                                               "pim.pick_stages": 0, "timing.tMAC": base.timing.tMAC,
                                               "npu.pe_mul_stages": 1, "npu.pe_add_stages": 1,
                                               "npu.vec_acc_stages": 1}) == base
        assert cfg.npu.vec_acc_stages == 4          # the vector unit's row accumulator (hw.npu.vector_reduce)
        check_pu_timing(cfg)
        with pytest.raises(ValueError, match=r"tMAC must be at least the PIM MAC pipeline depth 32 \(mul_stages=2, "
                                             r"tree_stages=4, acc_stages=4\), not 31"):
            check_pu_timing(cfg.replace(timing__tMAC=31))
    # Deeper adders without interleaving: the depth follows, no combine.
    cfg = preset("tiny").replace(**{"pim.tree_stages": 3, "pim.mul_stages": 2})
    assert pu_mac_depth(cfg.pim) == 1 + 2 + 3 * 4 + 1 and cfg.pim.combine_flag == 0
    assert preset("tiny-p4").pim.combine_flag == 1 << COMBINE_ROW_BIT
    # The default depths are left out of repr (module names and build keys of every other preset unchanged).
    assert "stages" not in repr(preset("default").pim) and "acc_stages=4" in repr(preset("default-p4").pim)
    assert "stages" not in repr(preset("default").npu) and "pe_add_stages=4" in repr(preset("default-p4").npu)
    with pytest.raises(ConfigError, match="PimGeometry.acc_stages must be 1 with int4 weights"):
        preset("tiny-w4").replace(**{"pim.acc_stages": 4})


def test_behavioural_channel_refuses_interleaved_partials():
    from hw.pim.behav import behav_params

    with pytest.raises(ValueError, match="models one accumulator per bank, not acc_stages=4"):
        behav_params(preset("tiny-p4"))
    # mul / tree depths alone are only a later accumulator update: modelled (its MAC depth parameter).
    cfg = preset("tiny").replace(**{"pim.tree_stages": 3, "timing.tMAC": 16})
    assert behav_params(cfg)[behav_params.__globals__["PARAM_NAMES"].index("mac_depth")] == 1 + 1 + 3 * 4 + 1


@pytest.mark.parametrize("K,N,act", [(200, 24, False), (96, 64, True), (17, 5, False)])
def test_golden_channel_model_follows_the_combine_flag(K, N, act):
    """The command-level golden model (per-bank InterleavedAccumulator, combine on the flag) running the GEMV
    program gives gemv_golden's bits; with the flag ignored (no combine) it does not."""
    cfg = preset("tiny-p4")
    p = cfg.pim
    rng = np.random.default_rng(K * N)
    w = G.bf16_bits(rng.standard_normal((K, N)) / np.sqrt(K))
    x = G.bf16_bits(rng.standard_normal(K))
    bias = G.f32_bits(rng.standard_normal(N).astype(np.float32))
    layout = GemvLayout(cfg, K, N)
    packed = layout.pack(w)
    models = [PimChannelModel(cfg) for _ in range(p.channels)]
    for c, mdl in enumerate(models):
        for b in range(p.banks):
            mdl.load_rows(b, 0, packed[c, b])
    program = list(gemv_program(layout, with_bias=True))
    macs = [f for op, f in program if op == "MACAB"]
    assert sum(1 for f in macs if f.get("row", 0) & 1) == layout.rows_used     # one combining MAC per row
    y = np.zeros(layout.tiles * layout.per_tile, dtype=np.uint32)
    bpw = p.banks_per_word
    for c, mdl in enumerate(models):
        reads = {}
        for op, f in program:
            if op in ("REFRESH_POINT",):
                continue
            data = f.get("data", 0)
            if isinstance(data, tuple):
                kind = data[0]
                if kind == "x":
                    data = PimChannelModel.lanes_to_word(np.pad(x, (0, layout.chunks * layout.chunk - K))
                                                         .reshape(-1, p.lanes)[data[1] * (layout.chunk // p.lanes)
                                                                               + data[2]])
                elif kind in ("bias", "partial"):
                    tile, g = data[1], data[2]
                    if kind == "bias":
                        vals = np.zeros(bpw, dtype="<u4")
                        for k in range(bpw):
                            n = layout.output_index(tile, c, g * bpw + k)
                            vals[k] = bias[n] if n < N else 0
                    else:
                        vals = reads[(tile, g)]
                    data = int.from_bytes(vals.astype("<u4").tobytes(), "little")
                else:
                    data = 0
            out = mdl.execute(op, row=f.get("row", 0), col=f.get("col", 0), data=data)
            if op == "RDMAC":
                reads[f["tag"][1:]] = np.frombuffer(out.to_bytes(bpw * 4, "little"), dtype="<u4")
        for (tile, g), vals in reads.items():
            for k in range(bpw):
                y[layout.output_index(tile, c, g * bpw + k)] = vals[k]
    want = gemv_golden(cfg, w, x, bias)
    assert np.array_equal(y[:N], want)
    # The interleaved order is not the sequential one (so the RTL tests below can tell them apart) once a row
    # has 4 columns or more: with up to 3, ((p0 + p1) + p2) + -0 is the sequential order.
    seq = gemv_golden(cfg.replace(**{"pim.acc_stages": 1}), w, x, bias)
    assert np.any(want != seq) if K > 3 * p.lanes else np.array_equal(want, seq)
    # ...and still within the float64 bound of tests/test_pim_device.py.
    wf, xf = G.bf16_to_f32(w).astype(np.float64), G.bf16_to_f32(x).astype(np.float64)
    bf = G.bits_to_f32(bias).astype(np.float64)
    bound = (np.log2(p.lanes) + -(-K // p.lanes) + 1) * 2.0**-24 * (np.abs(xf) @ np.abs(wf) + np.abs(bf))
    assert np.all(np.abs(G.bits_to_f32(want).astype(np.float64) - (xf @ wf + bf)) <= bound)


def _build():
    from test_pim_device import pim_build

    return pim_build("tiny-p4")


def test_gemv_tiny_p4():
    """Random GEMVs (several chunks and tiles, ragged, with GELU) bit-exact vs the golden model, checker on,
    efficiency >= 0.95 against the bound (which reads tMAC from the configuration)."""
    _build().run("sim.tb.pim_tb", "gemv", env={"IANUS_CONFIG": "tiny-p4",
                                               "GEMV_SHAPES": "96x64,200x24,128x8,17x5,200x24g,64x16g"})


def test_combine_timing_edges_tiny_p4():
    _build().run(PIPE_TB, "combine_edges", env={"IANUS_CONFIG": "tiny-p4"})


def test_refresh_mid_row_same_bits_tiny_p4():
    _build().run(PIPE_TB, "refresh_mid_row", env={"IANUS_CONFIG": "tiny-p4"})


def test_timing_edges_tiny_p4():
    """The device's other timing rules at their edges on the pipelined device (tMAC = 32 included)."""
    _build().run("sim.tb.pim_tb", "timing_edges", env={"IANUS_CONFIG": "tiny-p4"})


@pytest.mark.parametrize("testcase,env", [("normal_traffic", {"N_OPS": 300}), ("gelu_af", {"N_ROUNDS": 8}),
                                          ("illegal_sequences", {"CHECK_REFRESH_LATE": 1})])
def test_device_testbenches_tiny_p4(testcase, env):
    """The device testbenches of tests/test_pim_device.py on the pipelined device (the RTL channel only: the
    behavioural one refuses acc_stages > 1)."""
    _build().run("sim.tb.pim_tb", testcase, env={"IANUS_CONFIG": "tiny-p4", **env})


def test_soc_gpt2_layer_tiny_p4_bit_exact():
    """A tiny GPT-2 layer (prefill + generation) on the SoC with the pipelined PIM unit: the PCU flags each
    row's last MAC, the controller holds MACs tMAC after a combining MAC; outputs and KV caches equal the
    functional model's (its GEMV in the interleaved order), the Python checker watches every bus cycle."""
    from test_soc_e2e import _rtl_vs_model

    _rtl_vs_model("tiny-p4", "ianus", 4, 2, name="e2e_ianus_tiny_p4")


def test_performance_model_vs_rtl_tiny_p4():
    """The performance model (sim/perfmodel: MACs wait tMAC after a combining MAC, tMAC 32) against the SoC
    RTL on tiny-p4: every program of a prefill + generation job within +-5 % (tests/test_perfmodel.py's
    tolerance)."""
    from sim import calibrate

    spec, = calibrate.JOBS["tiny-p4"]           # also `python -m sim.calibrate --config tiny-p4`
    rtl = calibrate.run_rtl_job("tiny-p4", *spec, test_name="perfmodel_cal_tiny_p4")
    rows = calibrate.compare("tiny-p4", *spec, rtl)
    print()
    print(calibrate.table(rows, "performance model vs RTL, tiny-p4"))
    bad = [r for r in rows if abs(r["err"]) > 0.05]
    assert rows and not bad, "programs outside +-5 %: " + ", ".join(
        f"{r['program']} RTL {r['rtl']} model {r['model']:.0f} ({r['err']:+.1%})" for r in bad)


@pytest.mark.parametrize("testcase,env", [("pim_gemv", {"GEMV_SHAPE": "200x24"}), ("pim_refresh_reopen", {}),
                                          ("random_traffic", {})])
def test_memory_controller_tiny_p4(testcase, env):
    """The memory controllers driving the tiny-p4 device (sim/tb/memctrl_tb.py): a GEMV program with queued
    normal traffic bit-exact (the controller holds MACs tMAC after a combining MAC); the GEMV stalled after its
    first (plain) MAC until the controller forces refreshes (PREAB, REF, ACTAB of the same rows with the
    partial sums uncombined), then bit-exact; random normal traffic; the protocol checker on every bus."""
    from test_memctrl import run

    run("tiny-p4", testcase, **env)
