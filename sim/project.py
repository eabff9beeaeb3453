"""``ianus project``: the paper's system (``ianus`` preset) on GPT-2 M / L / XL / 2.5B, from the
calibrated performance model (:mod:`sim.perfmodel`) running the compiled programs.

What is simulated, and how it is scaled up:

* **Programs.** The compiler (:mod:`firmware.compiler`) compiles *one* decoder layer of the model's
  shape per (phase, position): all layers of a shape compile to the same program structure (only
  the addresses differ), so a layer's time is simulated once and multiplied by the layer count.
  The embedding and the LM head are not part of the compiled layers and are not counted.
* **Generation positions.** The stages that do not depend on the position (ln1, proj, ln2, fc1,
  fc2) are the same programs at every step; ``qkv_attn`` grows with the KV cache. The model times
  every stage at ``samples`` positions spread over the generated tokens (always the first and the
  last) and interpolates linearly between them (the attention work is linear in the position).
* **Cores.** The compiler is single-core; the paper's system has 4 NPU cores sharing the 8 PIM
  channels. The performance model splits every matrix-unit and vector instruction evenly over the
  cores (FCs column-wise, attention heads across cores), gives every core its own DMA engine into
  the shared channels, keeps one PCU for all channels, and adds a synchronisation cost to every
  FENCE (:func:`sim.perfmodel.micro_for`).
* **NPU-MEM memory mapping.** The ``ianus`` policy keeps the RTL's Row-Channel-Bank-Column mapping
  (the PIM weight layout needs it); the NPU-MEM baseline is plain GDDR6 and interleaves channels
  every 256 bytes, so that a DMA stream uses all channels (with the RTL mapping a stream stays in
  one channel for 32 KB).
* **Clocks.** NPU at 700 MHz, PIM / DRAM command clock at 1 GHz (times in the model are in DRAM
  cycles).
* **Macro sizes.** The RTL PCU buffers at most 4096 input and 4096 result values per macro; larger
  GEMVs of these shapes are timed as if its buffers were large enough (same micro-command stream).
* **Devices.** Several devices run one model tensor-parallel (heads and FC columns split over the
  devices, as inside a device across channels): per layer and device the FC and attention time
  divides by the device count, the layernorm / residual work does not, and two all-reduces of the
  hidden states per layer cross the host link (PCIe 5.0 x16, ``Clocks.host_link_gbps`` per
  direction, :data:`LINK_LATENCY_US` per transfer, ring all-reduce).

Outputs (``build/project/``): ``latency.csv`` (summarization, per generated token, total, energy),
``breakdown.csv`` (per operation and phase), ``stages.csv`` (cycles and energy per stage and layer),
``scaling.csv`` (devices), ``breakdown.png`` and ``roofline.png``.

The result types (:class:`Projection`, :class:`PhaseResult`, :data:`OPS`), the device scaling
(:func:`scale_devices`, :func:`allreduce_s`, :data:`LINK_LATENCY_US`) and the simulation of the compiled
programs (:func:`sim.projection_core.project_programs`) live in :mod:`sim.projection_core`, which
:mod:`sim.bounds`, :mod:`sim.hpim_model` and :mod:`sim.neupims_model` import without importing this
module back; this module re-exports the names above.
"""

from __future__ import annotations

import csv
import sys
import time
from pathlib import Path

from firmware.compiler import plan_memory
from firmware.gpt2 import SHAPES, GptShape
from hw.config import SystemConfig, preset
from sim.bounds import op_bounds, phase_work, rates
from sim.energy import energy
from sim.projection_core import (
    LINK_LATENCY_US,
    OPS,
    PhaseResult,
    Projection,
    allreduce_s,
    project_programs,
    scale_devices,
)

__all__ = ["MODELS", "INPUTS", "OUTPUTS", "POLICIES", "SCALING_MODELS", "Projection", "project", "main_project",
           "add_parser", "LINK_LATENCY_US", "OPS", "PhaseResult", "scale_devices", "allreduce_s"]

MODELS = ("medium", "large", "xl", "2.5b")
INPUTS = (128, 256, 512)
OUTPUTS = (1, 8, 64, 512)
POLICIES = ("ianus", "npu-mem")
EXTRA_POLICIES = ("hpim",)
"""Policies ``--policies`` accepts beyond the default pair: ``hpim`` (SRAM-PIM attention, :mod:`sim.hpim_model`)."""
SCALING_MODELS = {"6.7b": (GptShape(4096, 32, 32), 2), "13b": (GptShape(5120, 40, 40), 4),
                  "30b": (GptShape(7168, 56, 48), 8)}
DEVICE_BYTES = 8 << 30


def project(name: str, policy: str, n_in: int, n_out: int, cfg: SystemConfig | None = None,
            samples: int = 16, shape: GptShape | None = None, progress=None, exact: bool = False) -> Projection:
    """Simulate one layer of ``name`` (a :data:`firmware.gpt2.SHAPES` key or ``shape``) for the
    summarization of ``n_in`` tokens and ``n_out - 1`` generation steps: policy ``hpim`` by
    :func:`sim.hpim_model.project_hpim`, the others by :func:`sim.projection_core.project_programs`."""
    if policy == "hpim":
        from sim.hpim_model import project_hpim
        return project_hpim(name, n_in, n_out, cfg, samples=samples, shape=shape, progress=progress)
    return project_programs(name, policy, n_in, n_out, cfg, samples=samples, shape=shape, progress=progress,
                            exact=exact)


# ---------------------------------------------------------------------------------------------
# Operation roofline
# ---------------------------------------------------------------------------------------------

def op_work(shape: GptShape, tokens: int, ctx: int) -> dict:
    """(FLOPs, DRAM bytes) per layer of each operation for ``tokens`` tokens, the last attending to ``ctx``
    keys: the compulsory work of :mod:`sim.bounds` (causal query-key pairs; activations read and written
    once, attention scores not counted; weights counted wherever they are read, in PIM or by the DMA)."""
    mapping = {(ph, fc): "mu" for ph in ("prefill", "gen") for fc in ("qkv", "proj", "fc1", "fc2")}
    w = phase_work(shape, mapping, "prefill", tokens, ctx - tokens)
    return {op: (w[op].flops, w[op].dram_bytes + w[op].pim_weight_bytes) for op in ("qkv", "attention", "proj", "ffn")}


def peaks(cfg: SystemConfig) -> dict:
    r = rates(cfg)
    return {
        "npu_gflops": r.npu * cfg.clocks.pim_mhz / 1e3,
        "pim_gflops": cfg.pim_peak_gflops,
        "ext_gbps": cfg.pim_peak_external_gbps,
        "int_gbps": cfg.pim_peak_internal_gbps,
    }


# ---------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------

def write_csv(path: Path, rows: list[dict]):
    path.parent.mkdir(parents=True, exist_ok=True)
    if not rows:
        return
    keys = list(rows[0])
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


def plot_breakdown(summaries: list[dict], path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [s for s in summaries if s["devices"] == 1]
    fig, axes = plt.subplots(1, 2, figsize=(14, 5))
    colors = dict(zip(OPS, ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#bab0ac"), strict=True))
    for ax, phase, key, unit in ((axes[0], "summarization", "breakdown_pre_ms", "ms"),
                                 (axes[1], "generation (per token)", "breakdown_gen_ms", "ms/token")):
        labels, bottoms = [], None
        sel = [s for s in rows if (phase.startswith("sum") or s["output"] > 1)]
        # one bar per model / policy at the largest output, input 128
        seen = {}
        for s in sel:
            k = (s["model"], s["policy"], s["input"])
            if k not in seen or s["output"] > seen[k]["output"]:
                seen[k] = s
        bars = [s for k, s in sorted(seen.items()) if k[2] == min(x[2] for x in seen)]
        labels = [f"{s['model']}\n{s['policy']}" for s in bars]
        import numpy as np
        bottoms = np.zeros(len(bars))
        for op in OPS:
            vals = np.array([s[key][op] / (max(1, s["output"] - 1) if key == "breakdown_gen_ms" else 1) for s in bars])
            ax.bar(range(len(bars)), vals, bottom=bottoms, label=op, color=colors[op])
            bottoms += vals
        ax.set_xticks(range(len(bars)), labels, fontsize=8)
        ax.set_ylabel(unit)
        inp = bars[0]["input"] if bars else ""
        ax.set_title(f"{phase}, input {inp}")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_roofline(points: list[dict], cfg: SystemConfig, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    pk = peaks(cfg)
    fig, ax = plt.subplots(figsize=(8, 6))
    x = np.logspace(-1, 3.5, 200)
    ax.plot(x, np.minimum(pk["npu_gflops"], x * pk["ext_gbps"]), "k-", label="NPU roof (external BW)")
    ax.plot(x, np.minimum(pk["pim_gflops"], x * pk["int_gbps"]), "k--", label="PIM roof (internal BW)")
    marks = {"qkv": "o", "attention": "s", "proj": "^", "ffn": "D"}
    cols = {"ianus": "#e15759", "npu-mem": "#4e79a7"}
    for p in points:
        ax.scatter(p["intensity"], p["gflops"], marker=marks[p["op"]], color=cols.get(p["policy"], "gray"),
                   facecolors="none" if p["phase"] == "gen" else None, s=40)
        if p.get("bound_gflops", 0) > 0:        # the operation's lower bound (sim.bounds), joined to the point
            c = cols.get(p["policy"], "gray")
            ax.plot([p["intensity"]] * 2, [p["gflops"], p["bound_gflops"]], ":", color=c, lw=0.8)
            ax.scatter(p["intensity"], p["bound_gflops"], marker="_", color=c, s=80)
    for op, mk in marks.items():
        ax.scatter([], [], marker=mk, color="gray", label=op)
    for pol, c in cols.items():
        ax.scatter([], [], marker="o", color=c, label=pol)
    ax.scatter([], [], marker="o", facecolors="none", edgecolors="gray", label="generation (hollow)")
    ax.scatter([], [], marker="_", color="gray", s=80, label="lower bound (sim.bounds)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP / DRAM byte)")
    ax.set_ylabel("achieved GFLOP/s")
    ax.set_title(f"Operations on the {cfg.name} system (per layer)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def roofline_points(p: Projection, n_out: int) -> list[dict]:
    """Achieved GFLOP/s per operation (summarization; the middle generation step) and the GFLOP/s its
    lower bound (:mod:`sim.bounds`) would give, at its compulsory arithmetic intensity."""
    out = []
    s = 1e-6 / p.mhz
    r = rates(p.cfg)
    phases = [("prefill", p.prefill.breakdown, p.n_in, p.n_in)]
    if n_out > 1:
        t_mid = max(1, (n_out - 1) // 2)
        phases.append(("gen", p.gen_at(t_mid).breakdown, 1, p.n_in + t_mid))
    for phase, brk, tokens, ctx in phases:
        bnd = op_bounds(p.cfg, p.shape, p.policy, p.n_in, phase, tokens, ctx - tokens, r)
        for op, (fl, by) in op_work(p.shape, tokens, ctx).items():
            t = brk.get(op, 0) * s
            if t > 0:
                tb = bnd[op][0].cycles * s
                out.append({"model": p.model, "policy": p.policy, "phase": phase, "op": op,
                            "intensity": fl / by, "gflops": fl / t / 1e9,
                            "bound_gflops": fl / tb / 1e9 if tb > 0 else float("nan"), "ratio": t / tb if tb else None})
    return out


def _fmt(v, nd=2):
    return f"{v:,.{nd}f}"


MAX_SAMPLES = 4096


def validate_args(args):
    """Check ``ianus project``'s arguments before anything is simulated: names and numbers in range, every
    (model, input + output tokens) within the device memory of the ``ianus`` preset, the output directory
    writable. Raises :class:`sim.usage.UsageError` naming the option, the value and the limit."""
    from firmware.compiler import CompileError
    from sim.usage import UsageError, check_int, check_output_dir, parse_int_list, parse_names

    models = parse_names("--models", args.models, SHAPES)
    inputs = parse_int_list("--inputs", args.inputs, 1, 1 << 16)
    outputs = parse_int_list("--outputs", args.outputs, 1, 1 << 16)
    policies = parse_names("--policies", args.policies, POLICIES + EXTRA_POLICIES)
    check_int("--samples", args.samples, 2, MAX_SAMPLES)
    devices = parse_int_list("--devices", args.devices, 1, 1024, allow_empty=True)
    check_int("--scaling-input", args.scaling_input, 1, 1 << 16)
    check_int("--scaling-output", args.scaling_output, 1, 1 << 16)
    check_output_dir("--out", args.out)
    cfg = preset("ianus")
    runs = [(m, SHAPES[m], max(inputs) + max(outputs)) for m in models]
    if devices:
        runs += [(m, shape, args.scaling_input + args.scaling_output) for m, (shape, _) in SCALING_MODELS.items()]
    for m, shape, tokens in runs:
        one = GptShape(shape.d_model, shape.heads, 1, shape.eps)
        for pol in policies:
            try:
                plan_memory(cfg, one, tokens, pim_layout=(pol != "npu-mem"))
            except CompileError as e:
                raise UsageError(f"model {m} with {tokens:,} tokens (input + output) under policy {pol} does not "
                                 f"fit one layer of the {cfg.name!r} device: {e}") from None
    if "hpim" in policies:
        from sim.hpim_model import HpimCapacityError, check_fit
        for m in models:
            try:
                check_fit(cfg, SHAPES[m], max(inputs) + max(outputs))
            except HpimCapacityError as e:
                raise UsageError(f"model {m} under policy hpim: {e}") from None
    return args


def main_project(args) -> int:
    from rich.console import Console
    from rich.table import Table

    if getattr(args, "system", "ianus") == "neupims":
        from sim.neupims_model import main_neupims
        return main_neupims(args)
    validate_args(args)

    console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
    out = Path(args.out)
    cfg = preset("ianus")
    models = [m for m in args.models.split(",") if m]
    inputs = [int(x) for x in args.inputs.split(",") if x]
    outputs = [int(x) for x in args.outputs.split(",") if x]
    policies = [p for p in args.policies.split(",") if p]
    t_start = time.perf_counter()
    summaries, stages_rows, roof = [], [], []
    projections = {}
    for m in models:
        for n_in in inputs:
            for pol in policies:
                p = project(m, pol, n_in, max(outputs), cfg, samples=args.samples, exact=args.exact)
                projections[(m, pol, n_in)] = p
                console.print(f"[dim]{m} {pol} input {n_in}: simulated in {p.wall_s:.1f} s[/dim]")
                for n_out in outputs:
                    summaries.append(p.summary(n_out))
                first = min(p.gen) if p.gen else None
                for phase, res in (("summarization", p.prefill), ("first generated token", p.gen.get(first))):
                    if res is None:
                        continue
                    for st, cyc in res.stages.items():
                        e = energy(res.stage_events.get(st, {}), cyc / cfg.clocks.pim_mhz * 1e-6)
                        stages_rows.append({"model": m, "policy": pol, "input": n_in, "phase": phase, "stage": st,
                                            "us_per_layer": cyc / cfg.clocks.pim_mhz,
                                            "uJ_per_layer": e["total"] * 1e6,
                                            "uJ_dram": e["dram"] * 1e6, "uJ_pim": e["pim"] * 1e6,
                                            "uJ_npu": e["npu"] * 1e6, "uJ_static": e["static"] * 1e6})
                roof += roofline_points(p, max(outputs))

    tab = Table(title=f"Projection on the ianus system ({cfg.npu.cores} NPU cores at {cfg.clocks.npu_mhz:g} MHz, "
                      f"{cfg.pim.channels} PIM channels); decoder layers only")
    for c in ("model", "policy", "in", "out", "summ. ms", "gen ms/token", "total ms", "summ. mJ", "mJ/token"):
        tab.add_column(c, justify="right")
    for s in summaries:
        tab.add_row(s["model"], s["policy"], str(s["input"]), str(s["output"]), _fmt(s["summarization_ms"]),
                    _fmt(s["gen_ms_per_token"], 3), _fmt(s["total_ms"], 1), _fmt(s["summarization_mJ"], 1),
                    _fmt(s["gen_mJ_per_token"], 2))
    console.print(tab)
    bt = Table(title="Per-operation breakdown (ms): summarization | per generated token")
    bt.add_column("model / policy / in / out")
    for op in OPS:
        bt.add_column(op, justify="right")
    for s in summaries:
        if s["output"] != max(outputs):
            continue
        steps = max(1, s["output"] - 1)
        bt.add_row(f"{s['model']} {s['policy']} {s['input']}/{s['output']}",
                   *[f"{s['breakdown_pre_ms'][op]:.2f} | {s['breakdown_gen_ms'][op] / steps:.3f}" for op in OPS])
    console.print(bt)

    # speedups ianus vs npu-mem
    if "ianus" in policies and "npu-mem" in policies:
        st = Table(title="ianus vs npu-mem (speedup)")
        for c in ("model", "in", "out", "summarization", "generation", "total", "energy"):
            st.add_column(c, justify="right")
        idx = {(s["model"], s["policy"], s["input"], s["output"]): s for s in summaries}
        for (m, pol, i, o), s in idx.items():
            if pol != "ianus" or (m, "npu-mem", i, o) not in idx:
                continue
            b = idx[(m, "npu-mem", i, o)]
            gen = b["gen_ms_per_token"] / s["gen_ms_per_token"] if s["gen_ms_per_token"] else float("nan")
            st.add_row(m, str(i), str(o), f"{b['summarization_ms'] / s['summarization_ms']:.2f}x", f"{gen:.2f}x",
                       f"{b['total_ms'] / s['total_ms']:.2f}x", f"{b['total_J'] / s['total_J']:.2f}x")
        console.print(st)
    if "hpim" in policies:
        from sim.hpim_model import hpim_tables
        for t in hpim_tables(projections, max(outputs)):
            console.print(t)

    if getattr(args, "bounds", False):
        from sim import bounds as bnd
        brows = [r for p in projections.values() for r in bnd.projection_rows(p, max(outputs))]
        for t in bnd.projection_tables(brows):
            console.print(t)
        write_csv(out / "bounds.csv", brows)
        d_ops, d_stages = bnd.default_bounds()
        for t in bnd.default_tables(d_ops, d_stages):
            console.print(t)
        write_csv(out / "bounds_default.csv", d_ops)
        write_csv(out / "bounds_default_stages.csv", d_stages)
        console.print(f"wrote {out}/bounds.csv, bounds_default.csv, bounds_default_stages.csv")

    scaling = []
    if args.devices:
        devs = [int(x) for x in args.devices.split(",") if x]
        if "hpim" in policies:
            console.print("[dim]hpim: not in the multi-device scaling (not modelled)[/dim]")
        for m, (shape, _) in SCALING_MODELS.items():
            for pol in (x for x in policies if x in POLICIES):
                p = project(m, pol, args.scaling_input, args.scaling_output, cfg, samples=min(args.samples, 8),
                            shape=shape)
                params = 12 * shape.layers * shape.d_model ** 2
                for d in devs:
                    s = p.summary(args.scaling_output, devices=d)
                    fits = params * 2 <= d * DEVICE_BYTES
                    scaling.append({"model": m, "policy": pol, "devices": d, "fits": fits,
                                    "weight_GB_per_device": params * 2 / d / 1e9,
                                    "summarization_ms": s["summarization_ms"], "gen_ms_per_token": s["gen_ms_per_token"],
                                    "comm_ms": s["comm_ms"], "total_ms": s["total_ms"]})
        sc = Table(title=f"Multi-device (tensor parallel, PCIe 5.0 x16 {cfg.clocks.host_link_gbps:g} GB/s, "
                         f"{LINK_LATENCY_US:g} us per transfer): input {args.scaling_input}, output {args.scaling_output}")
        for c in ("model", "policy", "devices", "GB/device", "fits 8 GB", "summ. ms", "gen ms/token", "comm ms",
                  "total ms"):
            sc.add_column(c, justify="right")
        for r in scaling:
            sc.add_row(r["model"], r["policy"], str(r["devices"]), f"{r['weight_GB_per_device']:.1f}",
                       "yes" if r["fits"] else "no", _fmt(r["summarization_ms"]), _fmt(r["gen_ms_per_token"], 3),
                       _fmt(r["comm_ms"], 2), _fmt(r["total_ms"], 1))
        console.print(sc)
        console.print("weak scaling: 6.7B on 2, 13B on 4, 30B on 8 devices (the paper's pairs); strong scaling: "
                      "each model over the device counts it fits")

    flat = []
    for s in summaries:
        row = {k: v for k, v in s.items() if not isinstance(v, dict)}
        for op in OPS:
            row[f"pre_{op}_ms"] = s["breakdown_pre_ms"][op]
            row[f"gen_{op}_ms"] = s["breakdown_gen_ms"][op]
        for k in ("dram", "pim", "npu", "link", "static"):
            row[f"pre_{k}_mJ"] = s["energy_pre"][k] * 1e3
            row[f"gen_{k}_mJ"] = s["energy_gen"][k] * 1e3
        flat.append(row)
    write_csv(out / "latency.csv", [{k: r[k] for k in ("model", "policy", "input", "output", "summarization_ms",
                                                       "gen_ms_per_token", "total_ms", "summarization_mJ",
                                                       "gen_mJ_per_token", "total_J")} for r in flat])
    write_csv(out / "breakdown.csv", flat)
    write_csv(out / "stages.csv", stages_rows)
    write_csv(out / "roofline.csv", roof)
    if scaling:
        write_csv(out / "scaling.csv", scaling)
    plot_breakdown(summaries, out / "breakdown.png")
    plot_roofline(roof, cfg, out / "roofline.png")
    console.print(f"wrote {out}/latency.csv, breakdown.csv, stages.csv, roofline.csv"
                  + (", scaling.csv" if scaling else "") + ", breakdown.png, roofline.png "
                  f"({time.perf_counter() - t_start:.1f} s)")
    return 0


def add_parser(sub):
    p = sub.add_parser("project", help="paper-scale projection (ianus preset) from the calibrated performance model")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    p.add_argument("--inputs", default=",".join(map(str, INPUTS)))
    p.add_argument("--outputs", default=",".join(map(str, OUTPUTS)))
    p.add_argument("--policies", default=",".join(POLICIES),
                   help=f"comma-separated, of {', '.join(POLICIES + EXTRA_POLICIES)} (hpim: sim/hpim_model.py)")
    p.add_argument("--samples", type=int, default=12, help="generation positions simulated (interpolated between)")
    p.add_argument("--exact", action="store_true",
                   help="time every DMA request (no reuse of a transfer's timing by shape): slower, a few per cent "
                        "slower figures (the calibrated model as on the RTL configurations)")
    p.add_argument("--devices", default="2,4,8", help="device counts for the 6.7B/13B/30B scaling ('' to skip)")
    p.add_argument("--scaling-input", type=int, default=128)
    p.add_argument("--scaling-output", type=int, default=64)
    p.add_argument("--out", default="build/project")
    p.add_argument("--system", choices=("ianus", "neupims"), default="ianus",
                   help="neupims: batched generation of GPT-3 7B/13B/30B under npu-only / naive / neupims "
                        "(sim/neupims_model.py; --models of 7b,13b,30b, --batches, --devices one count or auto)")
    p.add_argument("--batches", default="64,128,256,512", help="--system neupims: batch sizes")
    p.add_argument("--seed", type=int, default=0, help="--system neupims: seed of the request lengths")
    p.add_argument("--neupims-config", choices=("neupims", "neupims-hw"), default="neupims",
                   help="--system neupims: the system (neupims: the ianus system with two row buffers; neupims-hw: "
                        "NeuPIMs' evaluated NPU, 8 arrays of 128x128 at 1 GHz, and 32 channels of 32 banks)")
    p.add_argument("--bounds", action="store_true",
                   help="per operation: the physical lower bound (sim.bounds) and achieved / bound, also for the "
                        "RTL's default layer; writes bounds.csv, bounds_default.csv, bounds_default_stages.csv")
    return p


def main(argv=None) -> int:
    import argparse
    ap = argparse.ArgumentParser(prog="python -m sim.project")
    sub = ap.add_subparsers(dest="cmd")
    add_parser(sub)
    args = ap.parse_args(["project", *(argv or [])])
    return main_project(args)


if __name__ == "__main__":
    import sys
    sys.exit(main(sys.argv[1:]))
