"""``ianus run``: GPT-2 decoder layers on the SoC (RTL on Verilator / Icarus, or the functional model).

Compiles the layers for the chosen policy (:mod:`firmware.compiler`), builds the
device-memory image (:mod:`firmware.runtime`), runs every stage program on the
backend, checks the outputs against a float64 numpy GPT-2 block, and prints
per-stage cycles beside the cost model's estimate, per-unit busy cycles and
(RTL) the speedup of ``ianus`` over ``npu-mem`` on the same RTL. Writes a
Perfetto / Chrome trace JSON of unit activity and a PNG plot.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from firmware.compiler import CompileError, compile_model, plan_memory
from firmware.gpt2 import (
    GptShape,
    check_float_dtype,
    first_nonfinite,
    load_weights,
    random_weights,
    reference_block,
)
from firmware.memory_plan import quantized_weights
from firmware.runtime import build_job, read_outputs
from sim.presets import RTL_CONFIGS, is_tiny  # noqa: F401  (RTL_CONFIGS for ianus run --config)
from sim.soc_model import run_job
from sim.usage import UsageError, check_input_path, check_int, check_output_path, write_atomic

__all__ = ["soc_config", "base_shape", "prepare", "run_backend", "run_rtl_jobs", "main_run", "TINY_SHAPE", "TINY_W4_SHAPE",
           "DEFAULT_SHAPE",
           "validate_args", "load_input", "stage_progress", "report_rates", "token_limit", "check_fits",
           "MAX_TOKENS", "MAX_LAYERS", "ERROR_BOUND"]

TINY_SHAPE = GptShape(32, 2, 1)
TINY_W4_SHAPE = GptShape(64, 2, 1)
DEFAULT_SHAPE = GptShape(768, 12, 1)


def soc_config(name: str):
    """The SoC configurations: ``tiny`` gets 64 DRAM rows per bank (a tiny GPT layer's weights, KV cache
    and programs need more than the PIM unit tests' 16); ``default`` is the preset. A tiny variant with 4-bit
    PIM weights (``tiny-w4``) gets 128 rows (its layer also keeps a BF16 copy of the weights for the matrix
    unit, :mod:`firmware.memory_plan`) and groups of 64 inputs (its layer, :data:`TINY_W4_SHAPE`, has
    d_model 64: a 4-bit unit takes 64 inputs per column)."""
    from hw.config import preset

    cfg = preset(name)
    if is_tiny(name):
        cfg = cfg.replace(**({"pim.rows": 128, "pim.quant_group": 64} if cfg.pim.lowprec else {"pim.rows": 64}))
    return cfg


def base_shape(name: str) -> GptShape:
    """The one-layer GPT shape of configuration ``name``'s SoC runs (random weights)."""
    if not is_tiny(name):
        return DEFAULT_SHAPE
    return TINY_W4_SHAPE if soc_config(name).pim.lowprec else TINY_SHAPE


def reference(x, weights, shape, prefill=None):
    """float64 outputs of the last layer for every position (causal, so prefill/generation do not matter)."""
    h = np.asarray(x, dtype=np.float64)
    for w in weights:
        h = reference_block(h, w, shape)
    return h


MAX_TOKENS = (1 << 16) - 1
"""Prefill + generated tokens: token positions are 16-bit fields of the vector instructions. The device
memory allows far fewer (:func:`token_limit`)."""
MAX_LAYERS = 1024
"""A sanity bound on ``--layers``, checked before anything is allocated; the device memory allows far
fewer (``ianus config`` lists the limits)."""
ERROR_BOUND = {"npu-mem": 0.01, "ianus": 0.10, "naive": 0.10, "hpim": 0.10}
"""The README's bound on max |err| vs float64 as a share of the block's largest change, per policy."""


def token_limit(cfg, shape: GptShape, policy: str) -> int:
    """The most tokens (prefill + generated) whose activations and KV cache fit the device memory
    with these layers (0 when the layers' weights alone do not fit)."""
    def fits(t):
        try:
            plan_memory(cfg, shape, t, pim_layout=(policy != "npu-mem"))
            return True
        except CompileError:
            return False

    if not fits(1):
        return 0
    lo, hi = 1, MAX_TOKENS
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def check_fits(cfg, shape: GptShape, policy: str, total: int) -> None:
    """Raise :class:`CompileError` naming the token limit when ``total`` tokens do not fit the device."""
    try:
        plan_memory(cfg, shape, total, pim_layout=(policy != "npu-mem"))
    except CompileError:
        limit = token_limit(cfg, shape, policy)
        if limit:
            raise CompileError(f"{total:,} tokens (prefill + generated) do not fit the device memory of configuration "
                               f"{cfg.name!r}: at most {limit:,} with {shape.layers} layer(s) of d_model "
                               f"{shape.d_model} under policy {policy}") from None
        raise


def load_input(path, d_model: int | None = None, allow_nonfinite: bool = False) -> np.ndarray:
    """``--input``: hidden states ``[tokens, d_model]`` from a ``.npy`` file, as float32. Raises
    :class:`UsageError` for a file that is not one floating-point array of that shape, and (unless
    ``allow_nonfinite``) for NaN / Inf values (also values that overflow float32)."""
    check_input_path("--input", path)
    try:
        x = np.load(path, allow_pickle=False)
    except Exception as e:
        raise UsageError(f"--input {path} is not a .npy array ({' '.join(str(e).split())})") from None
    if not isinstance(x, np.ndarray):           # an .npz archive
        x.close()
        raise UsageError(f"--input {path} is an .npz archive; give one [tokens, d_model] array as .npy")
    if x.dtype.kind == "V" and x.dtype.itemsize == 2:
        import ml_dtypes
        x = x.view(ml_dtypes.bfloat16)
    check_float_dtype(x, f"--input {path}", UsageError)
    want = "d_model" if d_model is None else d_model
    if x.ndim != 2 or x.shape[0] < 1 or (d_model is not None and x.shape[1] != d_model):
        raise UsageError(f"--input must hold [tokens, {want}] hidden states (tokens >= 1), not shape {x.shape}")
    with np.errstate(over="ignore"):        # values beyond float32 become Inf, reported below
        x = x.astype(np.float32)
    bad = None if allow_nonfinite else first_nonfinite(x)
    if bad:
        raise UsageError(f"--input {path} has {bad[0]:,} NaN/Inf value(s) as float32, the first at {list(bad[1])} "
                         f"(--allow-nonfinite lets them through)")
    return x


def prepare(config="tiny", policy="ianus", layers=1, prefill=8, generate=2, weights=None, input_file=None,
            heads=None, seed=0, allow_nonfinite=False, head_groups="auto", head_batch="auto", attn_pipeline="auto",
            gelu_unit="auto"):
    """Compile and lay out a job. With ``input_file`` the first ``prefill`` of its tokens are prefilled
    and the next ``generate`` generated (all the rest when ``generate`` is None)."""
    cfg = soc_config(config)
    ws = None
    if weights:
        shape, ws = load_weights(weights, heads=heads, layers=layers, allow_nonfinite=allow_nonfinite)
    else:
        base = base_shape(config)
        shape = GptShape(base.d_model, heads or base.heads, layers)
    if input_file:
        x = load_input(input_file, shape.d_model, allow_nonfinite)
        tokens = x.shape[0]
        if prefill > tokens:
            raise UsageError(f"--prefill {prefill} exceeds the {tokens} token(s) of --input {input_file}")
        if generate is not None:
            if prefill + generate > tokens:
                raise UsageError(f"--prefill {prefill} + --generate {generate} = {prefill + generate} tokens, but "
                                 f"--input {input_file} holds {tokens}")
            x = x[:prefill + generate]
        total = x.shape[0]
    else:
        total = prefill + generate
        x = None
    check_fits(cfg, shape, policy, total)           # before anything of the job's size is allocated
    if ws is None:
        ws = random_weights(shape, seed)
    if x is None:
        x = np.random.default_rng(seed + 1).standard_normal((total, shape.d_model)).astype(np.float32)
    cm = compile_model(cfg, shape, policy, prefill, total, head_groups=head_groups, head_batch=head_batch,
                       attn_pipeline=attn_pipeline, gelu_unit=gelu_unit)
    job = build_job(cm, ws, x)
    return cm, job, x, ws


def run_backend(job, backend="model", waves=False, test_name=None, progress=None):
    """Run ``job``; returns (outputs [T, d] float32, per-program results list, functional model or None)."""
    if backend == "model":
        m = run_job(job, progress)
        return read_outputs(job.compiled, m.read), job.results, m
    (out, results), = run_rtl_jobs([(job, test_name, progress)], backend, waves)
    return out, results, None


def run_rtl_jobs(entries, backend="verilator", waves=False):
    """Run several jobs on the RTL at once, one simulator process each (they share one build).

    ``entries``: ``(job, test_name or None, progress callback or None)``. Each simulation runs in its
    own process (cocotb runner), so two jobs use two cores. Returns ``[(outputs, results), ...]``.
    """
    import concurrent.futures
    import contextlib

    from sim.build import BUILD_ROOT
    from sim.console import Quiet as _Quiet
    from sim.tb.soc_run import run_rtl, soc_sim_build

    logs = BUILD_ROOT / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    cfg = entries[0][0].compiled.cfg
    with _Quiet(str(logs / f"build_soc_{cfg.name}_{backend}.log"), stderr=True):
        soc_sim_build(cfg, backend, waves)      # built once, before the runs share it
    names = [name or f"run_{job.compiled.policy}_{job.compiled.cfg.name}_{backend}" for job, name, _ in entries]
    progress_files = [logs / f"{name}.progress" for name in names]
    for f in progress_files:
        f.write_text("")
    seen = [0] * len(entries)

    def poll():
        for k, ((_, _, progress), f) in enumerate(zip(entries, progress_files, strict=True)):
            n = len(f.read_text().splitlines())
            while progress and seen[k] < n:
                progress()
                seen[k] += 1

    # One thread per run, each waiting on its simulator process; cocotb's runner prints its commands.
    with open(logs / f"runner_{cfg.name}_{backend}.log", "w") as runner_log, \
            contextlib.redirect_stdout(runner_log), \
            concurrent.futures.ThreadPoolExecutor(len(entries)) as pool:
        futures = [pool.submit(run_rtl, job, sim=backend, waves=waves, test_name=name, progress_file=f,
                               log_file=logs / f"{name}.log")
                   for (job, _, _), name, f in zip(entries, names, progress_files, strict=True)]
        while not all(fut.done() for fut in futures):
            time.sleep(0.5)
            poll()
        poll()
        results = [fut.result() for fut in futures]     # re-raises a run's exception here
    for (job, _, _), (_, res) in zip(entries, results, strict=True):
        job.results[:] = res
    return results


def trace_events(job) -> list:
    """Chrome trace events: stages on one track, unit activity (RTL: measured intervals) on others."""
    events = []
    t = 0.0
    mhz = job.compiled.cfg.clocks.pim_mhz
    for (st, _, _), res in zip(job.programs, job.results, strict=True):
        cyc = res.get("cycles", st.est.get("total", 0))
        us = cyc / mhz
        events.append({"name": f"L{st.layer} {st.name}", "ph": "X", "ts": t, "dur": us, "pid": 1, "tid": "stages",
                       "args": {"phase": st.phase, "pos": st.pos, "cycles": cyc, "estimate": st.est.get("total")}})
        for unit, spans in res.get("spans", {}).items():
            for a, b in spans:
                events.append({"name": unit, "ph": "X", "ts": t + a / mhz, "dur": (b - a) / mhz, "pid": 1,
                               "tid": unit})
        t += us
    return events


def plot(job, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [f"{st.phase[:3]}@{st.pos} {st.name}" for st, _, _ in job.programs]
    sim = [r.get("cycles", 0) for r in job.results]
    est = [st.est.get("total", 0) for st, _, _ in job.programs]
    fig, ax = plt.subplots(figsize=(max(8, len(names) * 0.35), 4.5))
    xs = np.arange(len(names))
    if any(sim):
        ax.bar(xs - 0.2, sim, 0.4, label="simulated (RTL)")
    ax.bar(xs + (0.2 if any(sim) else 0), est, 0.4, label="cost model")
    ax.set_xticks(xs, names, rotation=90, fontsize=7)
    ax.set_ylabel("cycles")
    ax.set_yscale("log")
    ax.set_title(f"{job.compiled.policy}: cycles per stage ({job.compiled.cfg.name})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summarize(job, out, x, weights, console, wall=None, rows=None, steps=None, title=None):
    """Print the per-stage table and the error; ``rows`` limits the check to the first rows (a baseline
    that simulated only some generation steps), ``steps`` is the number of generation steps run."""
    from rich.table import Table

    cm = job.compiled
    rows = cm.total if rows is None else rows
    # 4-bit PIM weights: the reference is the quantized model (firmware.memory_plan.quantized_weights)
    ref = reference(x, quantized_weights(cm.plan, weights), cm.shape)[:rows]
    err = np.abs(out[:rows].astype(np.float64) - ref)
    delta = np.abs(ref - x[:rows]).max()
    mhz = cm.cfg.clocks.pim_mhz
    tab = Table(title=title or f"{cm.policy} on {cm.cfg.name}: {cm.shape.layers} layer(s) d={cm.shape.d_model} "
                               f"heads={cm.shape.heads}, prefill {cm.prefill}, generate {cm.total - cm.prefill}")
    units = ("mu", "vq", "pcu") + (("spu",) if cm.cfg.spu is not None else ())
    for col in ("phase", "stage", "map", "cycles (all steps)", "us", "estimate", *(f"{u.upper()} busy" for u in units)):
        tab.add_column(col, justify="right")
    agg = {}
    for (st, _, _), r in zip(job.programs, job.results, strict=True):
        key = (st.phase if st.phase == "prefill" else "gen", st.name)
        a = agg.setdefault(key, {"cycles": 0, "est": 0, **dict.fromkeys(units, 0), "map": st.mapping, "n": 0})
        a["cycles"] += r.get("cycles", 0)
        a["est"] += st.est.get("total", 0)
        for u in units:
            a[u] += r.get("busy", {}).get(u, 0)
        a["n"] += 1
    tot = {"prefill": 0, "gen": 0}
    for (phase, name), a in agg.items():
        tot[phase] += a["cycles"]
        tab.add_row(phase, name, a["map"] or "-", f"{a['cycles']:,}" if a["cycles"] else "-",
                    f"{a['cycles'] / mhz:,.1f}" if a["cycles"] else "-", f"{a['est']:,}",
                    *(f"{a[u]:,}" for u in units))
    console.print(tab)
    steps = cm.total - cm.prefill if steps is None else steps
    summary = {"policy": cm.policy, "config": cm.cfg.name, "prefill_cycles": tot["prefill"],
               "gen_cycles": tot["gen"], "gen_cycles_per_token": tot["gen"] / steps if steps else 0,
               "max_abs_err": float(err.max()), "block_delta": float(delta),
               "rel_err": float(err.max() / delta) if delta else 0.0}
    if not tot["prefill"] and not tot["gen"]:   # functional model: no cycles, report the estimates
        for (st, _, _) in job.programs:
            tot["prefill" if st.phase == "prefill" else "gen"] += st.est.get("total", 0)
        summary.update({"prefill_cycles": tot["prefill"], "gen_cycles": tot["gen"],
                        "gen_cycles_per_token": tot["gen"] / steps if steps else 0, "estimated": True})
    if tot["prefill"]:
        console.print(f"prefill {tot['prefill']:,} cycles ({tot['prefill'] / mhz:,.1f} us at {mhz:g} MHz); "
                      f"generation {summary['gen_cycles_per_token']:,.0f} cycles/token")
    console.print(f"error vs float64 GPT-2 block: max |err| {err.max():.3g} "
                  f"({summary['rel_err']:.2%} of max |block output - input| = {delta:.3g})")
    refs = job.rtl.get("refreshes") if hasattr(job, "rtl") else None
    if refs:
        console.print(f"refreshes per channel: {refs}; DRAM protocol: no violation (device checks"
                      + (" + Python checker)" if is_tiny(cm.cfg.name) else ")"))
    if wall:
        console.print(f"wall time {wall:.1f} s")
    return summary


def compare_policies(s, base, console, backend) -> dict:
    """Speedups of a PIM policy over npu-mem (measured cycles on the RTL; the cost model on the model)."""
    out = {}
    key = "measured cycles" if backend != "model" else "cost-model estimates"
    if s["gen_cycles_per_token"] and base["gen_cycles_per_token"]:
        out["ianus_vs_npu_mem_generation_speedup"] = base["gen_cycles_per_token"] / s["gen_cycles_per_token"]
    if s["prefill_cycles"] and base["prefill_cycles"]:
        out["ianus_vs_npu_mem_prefill_ratio"] = base["prefill_cycles"] / s["prefill_cycles"]
    parts = []
    if "ianus_vs_npu_mem_generation_speedup" in out:
        parts.append(f"generation {out['ianus_vs_npu_mem_generation_speedup']:.2f}x faster per token")
    if "ianus_vs_npu_mem_prefill_ratio" in out:
        parts.append(f"prefill {out['ianus_vs_npu_mem_prefill_ratio']:.2f}x (npu-mem cycles / {s['policy']} cycles)")
    if parts:
        console.print(f"[bold]{s['policy']} vs npu-mem ({key}): " + ", ".join(parts) + "[/bold]")
    return out


def prepare_baseline(args, console):
    """The npu-mem baseline job on the same backend, ready to run.

    ``--baseline gen`` (RTL default): its prefill runs on the functional model (bit-exact with the RTL, so
    the device state is the one the RTL would reach) and ``--baseline-steps`` generation steps on the RTL;
    ``full``: everything on the backend. Returns ``(job, rows, steps, title)`` for :func:`summarize`."""
    from firmware.compiler import STAGES
    from firmware.runtime import Job
    from sim.soc_model import SocModel

    cm2, job2, _, _ = prepare(args.config, "npu-mem", args.layers, args.prefill, args.generate, args.weights,
                              args.input, args.heads, args.seed, getattr(args, "allow_nonfinite", False),
                              head_batch=getattr(args, "head_batch", "auto"),
                              attn_pipeline=getattr(args, "attn_pipeline", "auto"))
    mode = "full" if args.backend == "model" else args.baseline
    rows, steps, title = None, None, None
    if mode == "gen":
        n_pre = cm2.shape.layers * len(STAGES)
        steps = max(1, min(args.baseline_steps, cm2.total - cm2.prefill))
        m = SocModel(cm2.cfg)
        m.mem.data[:] = job2.image.data
        with console.status("npu-mem baseline: prefill on the functional model"):
            for st, a, n in job2.programs[:n_pre]:
                r = m.run(a, n)
                assert r.ok, (st.name, r)
        job2 = Job(cm2, m.mem, job2.programs[n_pre:n_pre + steps * n_pre])
        rows = cm2.prefill + steps
        title = (f"npu-mem baseline: {steps} generation step(s) on the {args.backend} RTL "
                 f"(its prefill state from the functional model)")
    return job2, rows, steps, title


def report_baseline(args, base_job, out2, x, ws, summary, console) -> dict:
    job2, rows, steps, title = base_job
    console.rule("baseline: npu-mem (no PIM, weights in column blocks) on the same "
                 + ("RTL" if args.backend != "model" else "functional model / cost model"))
    base = summarize(job2, out2, x, ws, console, rows=rows, steps=steps, title=title)
    return compare_policies(summary, base, console, args.backend)


def stage_progress(prog, task, job, label):
    """Progress callback for :func:`run_backend`: advances ``task`` by one finished program and names the
    next one (layer, phase and position, stage), so a multi-layer run shows where it is."""
    done = [0]
    n_layers = job.compiled.shape.layers

    def describe(k):
        if k >= len(job.programs):
            return f"{label}: done"
        st = job.programs[k][0]
        where = "prefill" if st.phase == "prefill" else f"generation at position {st.pos}"
        return f"{label}: layer {st.layer + 1}/{n_layers} {where} {st.name}"

    prog.update(task, description=describe(0))

    def advance():
        done[0] += 1
        prog.update(task, advance=1, description=describe(done[0]))
    return advance


def report_rates(job, wall: float, console) -> dict:
    """Print (and return) the run's simulated time and tokens per second of simulated and of wall time."""
    cm = job.compiled
    res = job.results
    cycles = sum(r.get("cycles", 0) for r in res)
    gen = [st for st, _, _ in job.programs if st.phase != "prefill"]
    tokens = len({st.pos for st in gen})
    mhz = cm.cfg.clocks.pim_mhz
    out = {"cycles": cycles, "simulated_s": cycles / (mhz * 1e6), "wall_s": wall, "generated": tokens,
           "layers": cm.shape.layers}
    if cycles and wall > 0:
        gen_cycles = sum(r.get("cycles", 0) for (st, _, _), r in zip(job.programs, res, strict=True)
                         if st.phase != "prefill")
        msg = (f"{cm.shape.layers} layer(s), {cycles:,} cycles = {out['simulated_s'] * 1e3:.2f} ms simulated "
               f"in {wall:.1f} s of wall time ({cycles / wall:,.0f} cycles/s)")
        if tokens and gen_cycles:
            out["tokens_per_s_simulated"] = tokens / (gen_cycles / (mhz * 1e6))
            out["tokens_per_s_wall"] = tokens / wall
            msg += (f"; generation {out['tokens_per_s_simulated']:,.1f} tokens/s simulated, "
                    f"{out['tokens_per_s_wall']:.3f} tokens/s of wall time (whole run)")
        console.print(msg)
    return out


def main_run(args) -> int:
    from rich.progress import Progress

    from sim.console import console as _console

    validate_args(args)
    console = _console()
    t0 = time.time()
    if getattr(args, "pim_model", "rtl") == "behav":
        os.environ["SOC_PIM_IMPL"] = "behav"        # read by sim.tb.soc_run.soc_sim_build (a separate build)
    cm, job, x, ws = prepare(args.config, args.policy, args.layers, args.prefill, args.generate, args.weights,
                             args.input, args.heads, args.seed, getattr(args, "allow_nonfinite", False),
                             head_batch=getattr(args, "head_batch", "auto"),
                             attn_pipeline=getattr(args, "attn_pipeline", "auto"))
    console.print(f"compiled {len(cm.stages)} stage programs, "
                  f"{sum(len(s.words) for s in cm.stages):,} instructions; mapping: "
                  + ", ".join(f"{ph}/{fc}={w}" for (ph, fc), w in cm.mapping.items()))
    base_job = None
    if args.policy != "npu-mem" and args.baseline != "none":
        base_job = prepare_baseline(args, console)
    # On the RTL the baseline runs at the same time as the main job (its own simulator process: with two
    # cores, the demo takes as long as its longer run); waves are only dumped for the main job.
    together = base_job is not None and args.backend != "model" and not args.waves
    if args.backend != "model":
        console.print(f"{args.backend} model of the SoC: built on first use, then cached "
                      f"(log: build/logs/build_soc_{args.config}_{args.backend}.log)")
    t_run = time.time()
    with Progress(console=console, transient=True) as prog:
        task = prog.add_task(f"{args.backend} ({args.policy})", total=len(job.programs))
        advance = stage_progress(prog, task, job, f"{args.backend} ({args.policy})")
        if together:
            task2 = prog.add_task(f"{args.backend} (npu-mem baseline)", total=len(base_job[0].programs))
            (out, _), (out2, _) = run_rtl_jobs([(job, None, advance),
                                                (base_job[0], None, lambda: prog.advance(task2))], args.backend)
        else:
            out, _, _ = run_backend(job, args.backend, args.waves, progress=advance)
    run_wall = time.time() - t_run
    summary = summarize(job, out, x, ws, console)
    report_rates(job, run_wall, console)
    report_numerics(summary, out, x, console)
    if base_job is not None:
        if not together:
            with Progress(console=console, transient=True) as prog:
                task2 = prog.add_task(f"{args.backend} (npu-mem baseline)", total=len(base_job[0].programs))
                out2, _, _ = run_backend(base_job[0], args.backend, False, progress=lambda: prog.advance(task2))
        summary.update(report_baseline(args, base_job, out2, x, ws, summary, console))
    console.print(f"wall time {time.time() - t0:.1f} s")
    trace = Path(args.trace or f"build/run/{args.policy}_{args.config}_trace.json")
    trace.parent.mkdir(parents=True, exist_ok=True)
    trace_doc = json.dumps({"traceEvents": trace_events(job), "displayTimeUnit": "ns"}).encode()
    write_atomic(trace, lambda fh: fh.write(trace_doc))
    png = trace.with_suffix(".png")
    plot(job, png)
    console.print(f"trace: {trace} (open in https://ui.perfetto.dev); plot: {png}")
    if args.output:
        write_atomic(args.output, lambda fh: np.save(fh, out.astype(np.float32)))
        console.print(f"outputs [{out.shape[0]}, {out.shape[1]}] float32 -> {args.output}")
    if os.environ.get("IANUS_RUN_JSON"):
        Path(os.environ["IANUS_RUN_JSON"]).write_text(json.dumps(summary))
    return 0


def report_numerics(summary, out, x, console) -> None:
    """Say when outputs are not finite (inputs let through with --allow-nonfinite) or the error against
    float64 is above the README's bound for the policy (large inputs lose precision in BF16/FP32)."""
    n_bad = int((~np.isfinite(out)).sum())
    summary["nonfinite_outputs"] = n_bad
    if n_bad:
        console.print(f"[yellow]warning:[/] {n_bad:,} of {out.size:,} outputs are NaN/Inf")
    bound = ERROR_BOUND.get(summary["policy"])
    rel = summary["rel_err"]
    if bound is not None and not n_bad and not rel <= bound:
        console.print(f"[yellow]warning:[/] max |err| vs float64 is {rel:.1%} of the block's largest change, above "
                      f"the {bound:.0%} bound stated for policy {summary['policy']} (largest |input| "
                      f"{float(np.abs(x).max()):.3g}; BF16 activations and FP32 statistics lose precision on inputs "
                      f"far from GPT-2's range)")


def validate_args(args):
    """Check ``ianus run``'s arguments before anything is loaded, built or simulated; raises
    :class:`UsageError` naming the option, the value and the limit. Output paths are normalised to what
    will be written (``--output`` gets ``.npy`` like numpy would add)."""
    check_int("--layers", args.layers, 1, MAX_LAYERS)
    if args.prefill is not None:
        check_int("--prefill", args.prefill, 1, MAX_TOKENS)
    if args.generate is not None:
        check_int("--generate", args.generate, 0, MAX_TOKENS)
    if args.prefill is not None and args.generate is not None and args.prefill + args.generate > MAX_TOKENS:
        raise UsageError(f"--prefill + --generate must be at most {MAX_TOKENS:,} tokens, not "
                         f"{args.prefill + args.generate:,}")
    if args.heads is not None:
        check_int("--heads", args.heads, 1)
    check_int("--seed", args.seed, 0, (1 << 63) - 1)
    check_int("--baseline-steps", getattr(args, "baseline_steps", 1), 1)
    if getattr(args, "batch", None) is not None:
        check_int("--batch", args.batch, 1, 64)
        check_int("--batch-steps", args.batch_steps, 1, 16)
    if args.weights:
        check_input_path("--weights", args.weights)
    if args.input:
        check_input_path("--input", args.input)
    if args.output:
        args.output = str(check_output_path("--output", args.output, suffix=".npy"))
    trace = args.trace or f"build/run/{args.policy}_{args.config}_trace.json"     # main_run's default
    check_output_path("--trace", trace, parents_ok=True)
    if Path(trace).with_suffix(".png").is_dir():
        raise UsageError(f"--trace {trace}: its plot {Path(trace).with_suffix('.png')} would overwrite a directory")
    if args.policy == "hpim" and not args.config.endswith("-hpim"):
        hp = [c for c in RTL_CONFIGS if c.endswith("-hpim")]
        raise UsageError(f"--policy hpim runs attention on the SRAM-PIM unit, which only --config {' / '.join(hp)} "
                         f"have, not {args.config}")
    if getattr(args, "pim_model", "rtl") == "behav" and args.backend != "verilator":
        raise UsageError(f"--pim-model behav needs --backend verilator (DPI-C), not {args.backend}")
    return args


def add_parser(sub):
    r = sub.add_parser("run", help="GPT-2 decoder layers on the SoC (prefill + generation)")
    r.add_argument("--config", default="default", choices=RTL_CONFIGS)
    r.add_argument("--policy", default="ianus", choices=["ianus", "npu-mem", "naive", "hpim"])
    r.add_argument("--backend", default="verilator", choices=["verilator", "icarus", "model"])
    r.add_argument("--layers", type=int, default=1)
    r.add_argument("--prefill", type=int, default=None, help="tokens prefilled (default 32, tiny 8)")
    r.add_argument("--generate", type=int, default=None,
                   help="tokens generated (default 4, tiny 2; with --input: the tokens after the prefilled ones, "
                        "default all of them)")
    r.add_argument("--weights", help="GPT-2 weights (.safetensors or .npz, Hugging Face names)")
    r.add_argument("--heads", type=int, default=None, help="attention heads (default d_model / 64)")
    r.add_argument("--input", help="hidden states entering the first layer, [tokens, d_model] .npy")
    r.add_argument("--output", help="write the last layer's outputs, [tokens, d_model] float32 .npy")
    r.add_argument("--waves", action="store_true", help="write an FST of the RTL run")
    r.add_argument("--pim-model", default="rtl", choices=["rtl", "behav"],
                   help="the PIM device's channels on the RTL backend: rtl (default) or behav, the cycle- and "
                        "bit-exact behavioural model (hw/pim/behav.py; Verilator; faster for long runs)")
    r.add_argument("--trace", help="Perfetto/Chrome trace JSON path")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--baseline", default="gen", choices=["gen", "full", "none"],
                   help="npu-mem baseline: gen = its generation steps on the RTL from the functional model's "
                        "prefill state (default), full = all of it on the RTL, none")
    r.add_argument("--baseline-steps", type=int, default=1, help="generation steps of the baseline (gen mode)")
    r.add_argument("--batch", type=int, default=None,
                   help="batched generation of B requests with different KV lengths (issue 18): policies npu-only "
                        "and naive on the same requests, cycles per step and tokens/s (--policy, --prefill, "
                        "--generate, --weights, --input do not apply)")
    r.add_argument("--batch-steps", type=int, default=1, help="generation steps of the batch (with --batch)")
    r.add_argument("--neupims-split", default="auto", choices=["auto", "always", "model"],
                   help="with --batch on a two-row-buffer configuration: how neupims chooses its sub-batches "
                        "(auto: the cost model, with no split when it is not faster; always: two sub-batches; "
                        "model: the candidates timed on the calibrated performance model)")
    r.add_argument("--allow-nonfinite", action="store_true",
                   help="let NaN/Inf values in --weights and --input through (they propagate; the outputs' "
                        "NaN/Inf count is reported) instead of rejecting them")
    r.add_argument("--head-batch", default="auto", choices=["auto", "on", "off"],
                   help="generation attention as one GEMM per product for all heads (on) or one per head (off); "
                        "auto: on where a head underfills the array's K tile (firmware.compiler.HEAD_BATCH)")
    r.add_argument("--attn-pipeline", default="auto", choices=["auto", "on", "off"],
                   help="a prompt's attention as a pipeline over the heads (softmax of one head beside the matrix "
                        "unit's work on its neighbours) or in three phases (off); auto: on on a multi-core NPU "
                        "(firmware.compiler.ATTN_PIPELINE)")
    return r


def fill_defaults(args):
    if args.prefill is None:
        args.prefill = 8 if is_tiny(args.config) else 32
    if args.generate is None and not args.input:
        args.generate = 2 if is_tiny(args.config) else 4
    return args
