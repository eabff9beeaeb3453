"""Batched generation (issue 18) on the functional model and on the SoC RTL, and its float64 reference.

:func:`run_model` plays a :class:`firmware.batch_runtime.BatchRuntime`'s script on
:class:`sim.soc_model.SocModel`; :func:`run_rtl` plays the same script on the SoC RTL through the job
testbench (``sim/tb/soc_job_tb.py``): the initial image (with the writes before the first program) through
the device's back door, every later host write through the AXI4 window before the program it precedes, every
program through the registers; afterwards it reads back the step slots (every step's inputs, hidden states
and outputs) and every KV row any request held, for a bit-for-bit comparison with the model
(:func:`compare`). The DRAM protocol is checked as in every SoC run (the device's own checks; on the tiny
configurations also the independent Python checker on every bus cycle).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from firmware.batch import SPLIT_MODES, BatchError
from firmware.batch_runtime import BatchRuntime, run_script
from sim.presets import is_tiny
from sim.run import reference
from sim.soc_model import SocModel

__all__ = ["run_model", "run_rtl", "dump_regions", "compare", "reference_outputs", "batch_lengths", "prepare_batch",
           "measure_batch", "main_batch", "perf_model_steps", "perf_model_programs", "perf_timer"]


def run_model(rt: BatchRuntime) -> tuple[SocModel, list]:
    """Play the whole script on a new functional model; returns it and ``(name, instructions)`` per program."""
    m = SocModel(rt.cfg)
    return m, run_script(rt, m)


def dump_regions(rt: BatchRuntime, kv: bool = True) -> dict:
    """``name -> (addr, bytes)``: the step slots and (``kv``) every KV row any request has held."""
    bp = rt.bp
    first = min(min(s) for s in bp.slots)
    last = max(max(s) for s in bp.slots) + bp.max_batch * rt.shape.d_model * 4
    kv0 = bp.pool_rows[0] * bp.row_index_bytes
    kv1 = rt.pool.high * bp.row_index_bytes
    out = {"slots": (first, last - first)}
    if kv and kv1 > kv0:
        out["kv"] = (kv0, kv1 - kv0)
    return out


def run_rtl(rt: BatchRuntime, test_name: str, sim: str = "verilator", checker: bool | None = None,
            timeout_cycles: int = 50_000_000, log_file=None, dump_kv: bool = True) -> tuple[list, dict]:
    """Run the script on the RTL; returns (per-program results as :func:`sim.tb.soc_run.run_rtl`, dumps
    ``name -> bytes``)."""
    from sim.build import BUILD_ROOT
    from sim.tb.soc_run import run_job_spec, soc_sim_build, write_image_backdoor

    cfg = rt.cfg
    sb = soc_sim_build(cfg, sim)
    run_dir = BUILD_ROOT / "runs" / test_name
    if run_dir.exists():
        shutil.rmtree(run_dir)
    wdir = run_dir / "writes"
    wdir.mkdir(parents=True)
    img, ops = rt.initial()
    used = rt.bp.prog_base + rt.bp.prog_bytes
    for op in rt.ops[:len(rt.ops) - len(ops)]:
        used = max(used, op[1] + len(op[2]))
    write_image_backdoor(img, run_dir / "backdoor", used)
    programs, pending = [], []
    for op in ops:
        if op[0] == "write":
            path = wdir / f"w{len(list(wdir.iterdir()))}.bin"
            path.write_bytes(op[2])
            pending.append([op[1], str(path)])
        else:
            programs.append({"addr": op[1], "n": op[2], "name": op[3], "writes": pending})
            pending = []
    dumps = {k: list(v) for k, v in dump_regions(rt, dump_kv).items()}
    res, raw, _ = run_job_spec(sb, cfg, run_dir, test_name, programs, dumps, checker, timeout_cycles, log_file)
    res["dumps_raw"] = raw
    return res["programs"], res


def compare(rt: BatchRuntime, model: SocModel, raw: dict) -> dict:
    """Bytes that differ between the RTL's dumps and the model's memory, per region (all 0: bit-exact)."""
    out = {}
    for name, (addr, n) in dump_regions(rt, "kv" in raw).items():
        a = np.frombuffer(raw[name], dtype=np.uint8)
        b = np.frombuffer(model.read(addr, n), dtype=np.uint8)
        out[name] = int((a != b).sum()) if a.size == b.size else -1
    return out


def perf_model_steps(rt: BatchRuntime, rtl_programs: list) -> list[float]:
    """The calibrated performance model's cycles of every step (:mod:`sim.perfmodel`), each program started at
    the RTL's measured start (``t_start``, as :mod:`sim.calibrate` does: the same refresh phase)."""
    cyc = perf_model_programs(rt, rtl_programs)
    return [float(sum(cyc[name] for name, _, _, _ in rec.programs)) for rec in rt.steps]


def perf_model_programs(rt: BatchRuntime, rtl_programs: list) -> dict:
    """The calibrated performance model's cycles of every program of the script, by name (started as in
    :func:`perf_model_steps`)."""
    import dataclasses

    from sim.perfmodel import PerfModel, decode_program
    from sim.perfmodel.params import Calib

    progs = rt.programs
    if len(progs) != len(rtl_programs):
        raise ValueError(f"{len(progs)} programs in the script, {len(rtl_programs)} in the RTL results")
    starts = [r["t_start"] for r in rtl_programs]
    m = PerfModel(rt.cfg, calib=dataclasses.replace(Calib(), first_start=starts[0]))
    return {name: m.run_program(None, ins=decode_program(words), prog_addr=addr, start=t - starts[0]).cycles
            for (name, addr, _, words), t in zip(progs, starts, strict=True)}


def reference_outputs(rt: BatchRuntime, rec, xs: dict, weights) -> np.ndarray:
    """float64 outputs of a step: for each row, the last layer's output at its position over the request's
    hidden states ``xs[rid]`` (prompt and generated inputs; the prompt's K and V were computed from the same
    states by :func:`firmware.batch_runtime.prompt_kv`)."""
    return np.stack([reference(xs[rid][:pos + 1], weights, rt.shape)[-1]
                     for rid, pos in zip(rec.rids, rec.positions, strict=True)])


# ---------------------------------------------------------------------------------------------
# ianus run --batch B
# ---------------------------------------------------------------------------------------------

def batch_lengths(batch: int, steps: int, max_len: int = 512, seed: int = 0) -> list[int]:
    """KV lengths (prompt tokens) of ``batch`` requests: NeuPIMs' ShareGPT fit
    (:func:`sim.neupims_model.request_lengths`, median 217) scaled by ``max_len / 512`` and clipped to
    ``1 .. max_len - steps``."""
    from sim.neupims_model import request_lengths
    scaled = np.rint(request_lengths(batch, seed) * (max_len / 512))
    return [int(v) for v in np.clip(scaled, 1, max_len - steps)]


def perf_timer(cfg):
    """The timer of :class:`firmware.batch.BatchCompiler`'s split choice: the calibrated performance model's
    cycles of a candidate step's programs, run back to back on a fresh model (within 2.3 % of the RTL per
    step, ``tests/test_batch.py``), where the cost model misjudges the GEMMs of a sub-batch (README, issue 18)."""
    from sim.perfmodel import PerfModel

    def timer(stages):
        return sum(r.cycles for r in PerfModel(cfg).run_stages(stages))
    return timer


def prepare_batch(config: str, policy: str, batch: int, steps: int = 1, layers: int = 1, seed: int = 0,
                  lengths=None, max_len: int | None = None, split: str = "auto"):
    """A runtime with ``batch`` requests of ``lengths`` prompt tokens (default :func:`batch_lengths`, at most
    ``max_len``: 40 on tiny, 512 otherwise), each with room for ``steps`` more, and ``steps`` steps
    recorded. ``split``: neupims' mode (:data:`firmware.batch.SPLIT_MODES`), or ``model``: ``auto`` with the
    split (or none) chosen by timing the candidates on the calibrated performance model (:func:`perf_timer`)
    instead of by the cost model. Returns ``(runtime, step records, hidden states per request, weights)``."""
    from firmware.batch_runtime import prompt_kv
    from firmware.gpt2 import GptShape, random_weights
    from firmware.program import round_up
    from sim.run import DEFAULT_SHAPE, TINY_SHAPE, soc_config

    cfg = soc_config(config)
    if split not in (*SPLIT_MODES, "model"):
        raise BatchError(f"neupims split mode must be one of {', '.join((*SPLIT_MODES, 'model'))}, not {split!r}")
    timer = perf_timer(cfg) if split == "model" else None
    base = TINY_SHAPE if is_tiny(config) else DEFAULT_SHAPE
    shape = GptShape(base.d_model, base.heads, layers)
    if lengths is None:
        lengths = batch_lengths(batch, steps, max_len or (40 if is_tiny(config) else 512), seed)
    ws = random_weights(shape, seed)
    rng = np.random.default_rng(seed + 1)
    cap = round_up(max(lengths) + steps, 16)
    rt = BatchRuntime(cfg, shape, ws, policy, batch, cap, io_slots=steps, split="auto" if timer else split,
                      timer=timer)
    xs = {}
    for j, n in enumerate(lengths):
        xs[j] = rng.standard_normal((n + steps, shape.d_model)).astype(np.float32)
        k, v = prompt_kv(ws, shape, xs[j][:n])
        rt.join(j, k, v, capacity=n + steps)
    recs = [rt.step({j: xs[j][q.length] for j, q in rt.requests.items()}) for _ in range(steps)]
    return rt, recs, xs, ws


def measure_batch(config: str, batch: int, steps: int = 1, backend: str = "verilator", layers: int = 1,
                  seed: int = 0, policies=("npu-only", "naive"), log_dir=None, runs=None, jobs=None,
                  split: str = "auto") -> dict:
    """Both policies on the same requests: per policy the cycles of every step (RTL; the cost model's
    estimate on ``backend="model"``), tokens per second at the configured clock, the outputs' bit-exactness
    with the functional model (RTL) and their error against float64. The RTL runs are simulator processes
    side by side (``jobs`` at once, default all). ``runs``: ``(label, config, policy, neupims split mode)``
    per run instead of ``policies`` on ``config`` (results keyed by label)."""
    import concurrent.futures
    import contextlib

    from sim.build import BUILD_ROOT
    from sim.console import Quiet
    from sim.run import soc_config
    from sim.tb.soc_run import soc_sim_build

    specs = runs or [(p, config, p, split) for p in policies]
    policies = [lab for lab, _, _, _ in specs]
    runs, rtl, models = {}, {}, {}
    logs = Path(log_dir or BUILD_ROOT / "logs")
    logs.mkdir(parents=True, exist_ok=True)
    if backend != "model":
        cfgs = {c: soc_config(c) for _, c, _, _ in specs}
        for cfg in cfgs.values():
            with Quiet(str(logs / f"build_soc_{cfg.name}_{backend}.log"), stderr=True):
                soc_sim_build(cfg, backend)

        def tag(p):
            return f"{p}_{runs[p][0].cfg.name}_b{batch}"

        # each run's simulation starts as soon as its script is ready; the functional models run here
        # meanwhile
        with open(logs / f"runner_batch_{cfgs[specs[0][1]].name}.log", "w") as rl, contextlib.redirect_stdout(rl), \
                concurrent.futures.ThreadPoolExecutor(jobs or len(policies)) as pool:
            futs = {}
            for lab, c, p, sp in specs:
                runs[lab] = prepare_batch(c, p, batch, steps, layers, seed, split=sp)
                futs[lab] = pool.submit(run_rtl, runs[lab][0], f"batch_{tag(lab)}", backend,
                                        log_file=logs / f"batch_{tag(lab)}.log", dump_kv=False)
            for lab in policies:
                models[lab] = run_model(runs[lab][0])[0]
            rtl = {p: f.result() for p, f in futs.items()}
    else:
        runs = {lab: prepare_batch(c, p, batch, steps, layers, seed, split=sp) for lab, c, p, sp in specs}
    out = {}
    for p in policies:
        rt, recs, xs, ws = runs[p]
        m = models[p] if p in models else run_model(rt)[0]
        mhz = rt.cfg.clocks.pim_mhz
        per_step, perf_stages = [], {}
        if p in rtl:
            progs, res = rtl[p]
            diff = compare(rt, m, res["dumps_raw"])
            for rec in recs:
                per_step.append(sum(r["cycles"] for r in progs if r["name"].startswith(f"step{rec.index} ")))
            stages = {}
            for r in progs:
                if r["name"].startswith("step"):
                    key = r["name"].split(" ", 2)[2]
                    stages[key] = stages.get(key, 0) + r["cycles"]
            model = perf_model_programs(rt, progs)
            perf = [float(sum(model[name] for name, _, _, _ in rec.programs)) for rec in rt.steps]
            for name, cycles in model.items():
                if name.startswith("step"):
                    key = name.split(" ", 2)[2]
                    perf_stages[key] = perf_stages.get(key, 0.0) + cycles
        else:
            diff, perf = None, None
            stages = {}
            for rec in recs:
                st = rt.compiler.step([(rt.requests[j].kv, pos) for j, pos in zip(rec.rids, rec.positions,
                                                                                     strict=True)], rec.slot,
                                      rec.split)
                per_step.append(sum(s.est.get("total", 0) for s in st))
        rel = 0.0
        for rec in recs:
            got = rt.outputs(rec, m.read)
            ref = reference_outputs(rt, rec, xs, ws)
            x = np.stack([xs[j][q] for j, q in zip(rec.rids, rec.positions, strict=True)])
            rel = max(rel, float((np.abs(got - ref).max(axis=1) / np.abs(ref - x).max(axis=1)).max()))
        cyc = float(np.mean(per_step))
        out[p] = {"policy": rt.policy, "config": rt.cfg.name, "batch": batch, "steps": steps, "layers": layers,
                  "split_mode": (("model" if rt.compiler.timer else rt.compiler.split) if rt.policy == "neupims"
                                 else None),
                  "splits": [rec.split for rec in recs],
                  "kv_lengths": [int(pos) for _, pos in sorted(zip(recs[0].rids, recs[0].positions, strict=True))],
                  "cycles_per_step": per_step,
                  "tokens_per_s": batch / (cyc / (mhz * 1e6)) if cyc else 0.0, "stage_cycles": stages,
                  "bit_exact": (not any(diff.values())) if diff is not None else None,
                  "rel_err_vs_float64": rel, "measured": p in rtl, "perfmodel_cycles_per_step": perf,
                  "perfmodel_stage_cycles": perf_stages}
    return out


def main_batch(args) -> int:
    """``ianus run --batch B``: the batched policies on the same B requests (npu-only, naive, and neupims on a
    configuration with two row buffers); cycles per step and tokens/s."""
    import time

    from rich.table import Table

    from sim.console import console as _console

    console = _console()
    t0 = time.time()
    from sim.run import soc_config

    policies = ("npu-only", "naive") + (("neupims",) if soc_config(args.config).pim.row_buffers == 2 else ())
    res = measure_batch(args.config, args.batch, args.batch_steps, args.backend, args.layers, args.seed, policies,
                        split=getattr(args, "neupims_split", "auto"))
    first = next(iter(res.values()))
    tab = Table(title=f"batched generation on {first['config']}: B = {args.batch}, {args.layers} layer(s), "
                      f"KV lengths {first['kv_lengths']}")
    for col in ("policy", "cycles per step", "tokens/s", "bit-exact vs model", "err vs float64", "perf model"):
        tab.add_column(col, justify="right")
    for p, r in res.items():
        cyc = " / ".join(f"{c:,}" for c in r["cycles_per_step"]) + ("" if r["measured"] else " (estimate)")
        perf = r["perfmodel_cycles_per_step"]
        tab.add_row(p, cyc, f"{r['tokens_per_s']:,.0f}", {True: "yes", False: "NO", None: "-"}[r["bit_exact"]],
                    f"{r['rel_err_vs_float64']:.2%}", " / ".join(f"{c:,.0f}" for c in perf) if perf else "-")
    console.print(tab)
    if "naive" in res and "npu-only" in res and res["npu-only"]["tokens_per_s"]:
        console.print(f"naive / npu-only throughput: {res['naive']['tokens_per_s'] / res['npu-only']['tokens_per_s']:.2f}x")
    if "neupims" in res and res["naive"]["tokens_per_s"]:
        console.print(f"neupims / naive throughput: {res['neupims']['tokens_per_s'] / res['naive']['tokens_per_s']:.2f}x "
                      f"(sub-batch splits per step: {res['neupims']['splits']}; 0 = none)")
    console.print(f"wall time {time.time() - t0:.1f} s")
    if os.environ.get("IANUS_RUN_JSON"):
        Path(os.environ["IANUS_RUN_JSON"]).write_text(json.dumps(res))
    bad = [p for p, r in res.items() if r["bit_exact"] is False]
    if bad:
        console.print(f"[red]RTL and functional model differ: {', '.join(bad)}[/red]")
        return 1
    return 0
