"""Run a compiled job (:mod:`firmware.runtime`) on the SoC RTL: build, back-door image, start programs.

:class:`SocSim` is :class:`hw.soc.SocTop` with its own free-running clock
(``hw/verilog/npu_clock_gen.v``; Verilator ``--timing``), so the simulator runs
without Python per clock edge: the testbench (``sim/tb/soc_tb.py``) sleeps on
``done`` / ``error`` edges and on the unit-busy edges it records for the trace.
The whole device image (weights, parameters, GELU table, inputs, programs) is
loaded through the device's ``$readmemh`` back door; every program is started
through the AXI4-Lite registers; the outputs are read back through the AXI4
window.

DRAM protocol: the device model checks every command against its timing and
bank-state rules and counts violations (``s__<c>__nviol``); the testbench fails
on any. With ``checker=True`` (the tiny-configuration tests) the independent
Python :class:`sim.pim_checker.ProtocolChecker` also watches every bus cycle
(that costs Python per cycle, so the long default-configuration runs rely on
the device's own checks, which tests/test_pim_device.py holds equal to the
Python checker on every violation class).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
from amaranth.hdl import Module
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from hw.simtop import CLOCK_VERILOG, TB_CLOCK_VERILOG, forward_ports, forwarded_members, free_running_clock
from sim.build import BUILD_ROOT
from sim.presets import is_tiny

__all__ = ["SocSim", "soc_sim_build", "run_rtl", "run_job_spec", "write_image_backdoor", "SOC_CXX_OPT"]

SOC_CXX_OPT = "-O1"
"""C++ optimisation of the SoC simulation's evaluation code (``SOC_CXX_OPT`` in the environment overrides)."""


class SocSim(wiring.Component):
    """:class:`hw.soc.SocTop` + clock generator; same ports plus ``clk_out`` and ``unit_busy`` (MU, VQ, PCU).

    The bus ports (``s_axi``, ``s_axil``) are for bus models (cocotbext-axi) running on ``clk_tb``, the
    clock 1 ps before ``clk_out`` (``hw/verilog/tb_clock_gen.v``). Those models wake on a rising edge of
    their clock, take ``valid & ready`` as that edge's handshake and drive the next beat at once: they
    assume the edge's callback runs before the design evaluates the edge, which a testbench-driven
    clock gives and a clock made inside the simulator does not (its callback comes after the design has
    taken the edge, so ``ready`` was read one edge late: the first write burst after power-up lost its
    first beat, and any back-pressure lost or repeated beats). On ``clk_tb`` they read the values the
    design's next edge samples; what they drive is registered on ``clk_tb`` here, so that next edge still
    samples the beat of the cycle before, as it would with a testbench clock. (The SoC's outputs and
    every other port are direct.) ``early_tb_clock=False`` (Icarus, whose value-change callbacks run
    when the clock changes, before the design's flops take the edge, as the bus models assume):
    ``clk_tb`` is ``clk_out`` and the bus ports are direct.

    ``tb_clk_hold`` = 1 stops ``clk_tb`` while ``clk_out`` runs on (Verilator build): a testbench whose bus
    models are idle, such as the job runner waiting for a program's done, saves the two time steps per
    cycle of ``clk_tb``'s edges. 0 (undriven) is the normal clock.
    """

    def __init__(self, cfg, device_factory, early_tb_clock: bool = True):
        from hw.soc import SocTop

        self._top = SocTop(cfg, device_factory, clock_gate=True)
        self._early = early_tb_clock
        members = forwarded_members(self._top)
        members["clk_out"] = Out(1)
        members["clk_tb"] = Out(1)
        members["tb_clk_hold"] = In(1)
        super().__init__(members)

    def elaborate(self, platform):
        m = Module()
        if self._early:
            clk, clk_tb = free_running_clock(m, tb_clock=True, hold=self.tb_clk_hold)
        else:
            clk, clk_tb = free_running_clock(m)
        m.d.comb += [self.clk_out.eq(clk), self.clk_tb.eq(clk_tb)]
        m.submodules.top = top = self._top
        # What the bus models drive (the leaves that flow into the SoC) is registered on clk_tb.
        forward_ports(m, self, top, registered={"s_axi": "tb", "s_axil": "tb"} if self._early else None)
        return m


def soc_sim_build(cfg, sim: str = "verilator", waves: bool | None = None, fp_impl: str | None = None,
                  pim_impl: str | None = None):
    """Build :class:`SocSim` for ``cfg`` on ``sim`` (cached).

    ``pim_impl``: the PIM device's channels, ``"rtl"`` (the default) or ``"behav"``, the cycle- and
    bit-exact behavioural channel of :mod:`hw.pim.behav` for long runs (Verilator only; a separate
    build); ``SOC_PIM_IMPL`` in the environment overrides the default.

    ``fp_impl``: the FP cells of the processing elements and the PIM processing units
    (:func:`hw.arith.check_fp_impl`). Default: ``"dpi"`` on Verilator (the fast behavioural cells,
    bit-exact with the gates), ``"rtl"`` on Icarus (no DPI-C there); ``SOC_FP_IMPL`` in the
    environment overrides the default. ``SOC_THREADS=N`` builds a Verilator model with ``--threads N``
    (a separate build; single-threaded by default, since tests run two simulations at once on two
    cores); ``SOC_CXX_OPT`` sets the C++ optimisation (default :data:`SOC_CXX_OPT`).
    """
    from hw.arith import FP_DPI_SOURCES, check_fp_impl
    early = sim == "verilator"
    clock_v = TB_CLOCK_VERILOG if early else CLOCK_VERILOG
    from hw.npu.systolic import pe_for
    from hw.npu.vector import LANE_MODULE, VectorLane
    from hw.pim import check_pim_impl, device_factory, device_sources
    from sim.build import build, verilog_for

    if fp_impl is None:
        fp_impl = os.environ.get("SOC_FP_IMPL") or ("dpi" if sim == "verilator" else "rtl")
    check_fp_impl(fp_impl)
    if fp_impl == "dpi" and sim != "verilator":
        raise ValueError(f"fp_impl='dpi' needs Verilator (DPI-C), not {sim!r}")
    if pim_impl is None:
        pim_impl = os.environ.get("SOC_PIM_IMPL") or "rtl"
    check_pim_impl(pim_impl, sim)
    pe_name, pe_factory, pe_key = pe_for(cfg.npu, fp_impl)
    pe_v = verilog_for(pe_factory, name=pe_name, key=f"pe fp={fp_impl}" + pe_key)
    lane_v = verilog_for(lambda: VectorLane(), name=LANE_MODULE, key="lane")
    dev_v = [v for v in device_sources(cfg, fp_impl, pim_impl) if v not in FP_DPI_SOURCES]
    fp_v = FP_DPI_SOURCES if fp_impl == "dpi" else ()
    args = ("--timing", "--timescale", "1ns/1ps") if sim == "verilator" else ()
    threads_text = os.environ.get("SOC_THREADS", "1")
    if not threads_text.isdigit() or int(threads_text) < 1:
        raise ValueError(f"SOC_THREADS must be a positive integer, not {threads_text!r}")
    threads = int(threads_text)
    if sim == "verilator" and threads > 1:
        args += ("--threads", str(threads))
    opt = os.environ.get("SOC_CXX_OPT", SOC_CXX_OPT)
    make = [f"OPT_FAST={opt}", "OPT_SLOW=-O0", f"OPT_GLOBAL={opt}"]
    return build(lambda: SocSim(cfg, device_factory(cfg), early), name=f"soc_sim_{cfg.name}",
                 key=repr(cfg) + f" socsim early_tb_clock={early}" + (" pim=behav" if pim_impl == "behav" else ""),
                 sim=sim, waves=waves, extra_sources=(*dev_v, clock_v, pe_v, lane_v, *fp_v),
                 build_args=args, no_inline=("pim_bank_*", pe_name, LANE_MODULE), make_args=make)


def write_image_backdoor(image, directory: Path, used_bytes: int):
    """Back-door files (``ch{c}_b{b}.bin``, :func:`sim.pim_sequencer.write_backdoor_bin`) with the rows of
    ``image`` below ``used_bytes`` and the AF rows."""
    from sim.pim_sequencer import write_backdoor_bin

    cfg = image.cfg
    p = cfg.pim
    directory.mkdir(parents=True, exist_ok=True)
    for f in [*directory.glob("*.hex"), *directory.glob("*.bin")]:
        f.unlink()
    per_row = p.channels * p.banks * p.row_bytes
    nrows = min(p.data_rows, -(-used_bytes // per_row))
    parts = [(0, image.rows(0, nrows))]
    if p.af_rows:
        parts.append((p.data_rows, image.rows(p.data_rows, p.af_rows)))
    for first, rows in parts:
        for c in range(p.channels):
            for b in range(p.banks):
                write_backdoor_bin(directory, c, b, first, np.ascontiguousarray(rows[:, c, b]), p.columns)


def run_rtl(job, sim="verilator", waves=False, test_name=None, checker=None, timeout_cycles=50_000_000,
            dump_buffers=False, progress_file=None, log_file=None, pim_impl=None):
    """Run ``job`` on the RTL; returns (outputs [T, d] float32, per-program results).

    ``log_file``: the simulator's output goes there instead of to stdout. ``pim_impl``: the PIM device's
    channels (:func:`soc_sim_build`)."""
    cm = job.compiled
    cfg = cm.cfg
    sb = soc_sim_build(cfg, sim, waves, pim_impl=pim_impl)
    name = test_name or f"run_{cm.policy}_{cfg.name}_{sim}"
    run_dir = BUILD_ROOT / "runs" / name
    if run_dir.exists():
        shutil.rmtree(run_dir)
    bd = run_dir / "backdoor"
    last = max(a + 32 * n for _, a, n in job.programs)
    write_image_backdoor(job.image, bd, last)
    plan = cm.plan
    dumps = {"out": [plan.layers[-1].x_out, cm.total * cm.shape.d_model * 4]}
    for i, lp in enumerate(plan.layers):
        end = max(c + (cm.total - 1) * lp.v_stride + cm.shape.head_dim * 2 for c in lp.vc)
        dumps[f"k{i}"] = [lp.kc[0], end - lp.kc[0]]
    if dump_buffers:
        ends = sorted(plan.buffers.values()) + [plan.prog_base]
        for k, a in plan.buffers.items():
            dumps[k] = [a, min(e for e in ends if e > a) - a]
    programs = [{"addr": a, "n": n, "name": f"L{st.layer} {st.phase}@{st.pos} {st.name}"} for st, a, n in job.programs]
    res, raw, test_dir = run_job_spec(sb, cfg, run_dir, name, programs, dumps, checker, timeout_cycles, log_file,
                                      progress_file)
    out = np.frombuffer(raw["out"], dtype="<f4").reshape(cm.total, cm.shape.d_model).copy()
    for k, (addr, n) in dumps.items():
        res.setdefault("dumps", {})[k] = {"addr": addr, "n": n, "path": str(test_dir / f"dump_{k}.bin")}
    job.rtl = res
    return out, res["programs"]


def run_job_spec(sb, cfg, run_dir: Path, name: str, programs: list, dumps: dict, checker=None,
                 timeout_cycles=50_000_000, log_file=None, progress_file=None):
    """Run the job testbench (``sim/tb/soc_job_tb.py``) of build ``sb`` on ``programs`` (``addr``, ``n``,
    ``name``, optional ``writes``: host writes before the program) with the back-door image already in
    ``run_dir / "backdoor"``; returns (result.json's contents, ``dumps`` name -> bytes read back, test dir)."""
    spec = {"programs": programs, "dumps": dumps, "channels": cfg.pim.channels, "config": cfg.name,
            "checker": bool(checker if checker is not None else is_tiny(cfg.name)),
            "timeout_cycles": timeout_cycles}
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "job.json").write_text(json.dumps(spec))
    env = {"RUN_DIR": str(run_dir)}
    if progress_file:
        env["IANUS_PROGRESS"] = str(progress_file)
    results_xml = sb.run("sim.tb.soc_job_tb", "run_job", test_name=name, env=env, log_file=log_file)
    test_dir = Path(results_xml).parent
    res = json.loads((test_dir / "result.json").read_text())
    return res, {k: (test_dir / f"dump_{k}.bin").read_bytes() for k in dumps}, test_dir


def env_flag(name):
    return os.environ.get(name, "") not in ("", "0")
