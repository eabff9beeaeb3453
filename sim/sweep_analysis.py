"""Analysis of ``ianus sweep`` results: the area proxy, Pareto fronts, plots and the best-point table.

Objectives (all minimised), per point:

* ``ms_per_token``: end-to-end latency (summarization + generation) divided by the output tokens;
* ``mJ_per_token``: energy of the same run (:mod:`sim.energy`) divided by the output tokens;
* ``area_mm2``: the area proxy below.

Pareto fronts are computed per workload (model, input, output): comparing a small model's latency with
a large one's says nothing about the hardware.

**Area proxy** (:func:`area_proxy`). The logic and on-chip SRAM a configuration adds, in mm² at a
7 nm-class density, from the :data:`AREA` table: the logic of a PIM processing unit and of a systolic
MAC is taken from this repository's ECP5 synthesis results (LUT4 counts, ``make synth``), converted to
area with one assumed figure per LUT4-equivalent; PIM units sit on DRAM dies, whose logic is assumed an
order of magnitude less dense; SRAM (NPU scratchpads, vector scratchpad, PIM global buffers) is counted
per bit. Not counted: the DRAM arrays (the memory is there in every design), the command processor,
PCU, memory controllers and I/O. The proxy ranks designs; it is not a floorplan.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hw.config import SystemConfig

__all__ = ["AREA", "AreaItem", "area_proxy", "OBJECTIVES", "pareto_mask", "analyse", "plot_pareto",
           "best_table", "WORKLOAD"]


@dataclass(frozen=True)
class AreaItem:
    value: float
    unit: str
    source: str


AREA = {
    "pim_unit_lut4": AreaItem(
        13_629, "LUT4 per 16-lane PIM processing unit (one per bank; scaled by lanes / 16)",
        "measured: ECP5 synthesis of the mac16 target (16 BF16 multipliers + FP32 adder tree + "
        "accumulator), `make synth`, README 'Measured figures'"),
    "npu_mac_lut4": AreaItem(
        16_699 / 16, "LUT4 per systolic-array MAC",
        "measured: ECP5 synthesis of the 4x4 array (16,699 LUT4 for 16 PEs), `make synth`"),
    "vector_lane_lut4": AreaItem(
        33_826 / 4, "LUT4 per FP32 vector-unit lane",
        "measured: ECP5 synthesis of the 4-lane vector unit (`vector4`, 33,826 LUT4 with its sequencer, "
        "reductions and tables, over its 4 lanes: an upper bound per lane), `python -m hw.synth vector4`"),
    "lut4_um2": AreaItem(
        0.4, "um^2 per LUT4-equivalent of logic at 7 nm",
        "assumed: about 6 NAND2-equivalents per LUT4 of mapped datapath logic x ~0.07 um^2 per placed "
        "NAND2 at 7 nm"),
    "dram_logic_factor": AreaItem(
        10.0, "x area of logic built in a DRAM process (PIM units)",
        "assumed: DRAM processes have few metal layers and slow transistors; an order of magnitude"),
    "sram_um2_per_bit": AreaItem(
        0.05, "um^2 per SRAM bit at 7 nm, periphery included",
        "assumed: 7 nm high-density bit cell ~0.027 um^2, about half of a macro's area is periphery"),
}


def area_proxy(cfg: SystemConfig, table: dict | None = None) -> dict:
    """Area proxy of ``cfg`` in mm²: ``area_mm2`` and its parts (``area_pim_mm2``, ``area_npu_mm2``,
    ``area_sram_mm2``) and the SRAM in MiB (``sram_mib``)."""
    t = table or AREA
    p, n = cfg.pim, cfg.npu
    um2 = t["lut4_um2"].value
    pim_lut4 = p.channels * p.banks * t["pim_unit_lut4"].value * p.lanes / 16
    npu_lut4 = n.cores * (n.array_rows * n.array_cols * n.macs_per_pe * t["npu_mac_lut4"].value
                          + n.vector_lanes * t["vector_lane_lut4"].value)
    # Scratchpad words: one array row (act, BF16) or column (wgt BF16, acc FP32); vector words: lanes x FP32.
    spm_bytes = n.cores * (n.act_spm_words * n.array_rows * 2 + n.wgt_spm_words * n.array_cols * 2
                           + n.acc_spm_words * n.array_cols * 4 + n.vector_spm_words * n.vector_lanes * 4)
    sram_bytes = spm_bytes + p.channels * p.gb_bytes
    out = {
        "area_pim_mm2": pim_lut4 * um2 * t["dram_logic_factor"].value * 1e-6,
        "area_npu_mm2": npu_lut4 * um2 * 1e-6,
        "area_sram_mm2": sram_bytes * 8 * t["sram_um2_per_bit"].value * 1e-6,
        "sram_mib": sram_bytes / 2**20,
    }
    out["area_mm2"] = out["area_pim_mm2"] + out["area_npu_mm2"] + out["area_sram_mm2"]
    return out


OBJECTIVES = {"ms_per_token": "latency per token (ms)", "mJ_per_token": "energy per token (mJ)",
              "area_mm2": "area proxy (mm^2)"}
WORKLOAD = ("model", "input", "output")


def pareto_mask(values) -> np.ndarray:
    """Boolean mask of the non-dominated rows of ``values`` (n points x k objectives, all minimised).

    A point is dominated when another is no worse in every objective and better in one; equal points
    do not dominate each other."""
    v = np.asarray(values, dtype=float)
    keep = np.ones(len(v), dtype=bool)
    for i in range(len(v)):
        if not keep[i]:
            continue          # whatever i dominates, i's dominator dominates too
        dominated = np.all(v[i] <= v, axis=1) & np.any(v[i] < v, axis=1)
        keep &= ~dominated
    return keep


def _num(x):
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def analyse(rows: list[dict], design_fields: list[str]) -> list[dict]:
    """Group the successful rows by workload, mark their Pareto front (``pareto`` = True) and return
    one dict per group: ``workload`` (tuple), ``rows`` (with numeric objectives), ``front`` (rows)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r.get("status") != "ok":
            continue
        vals = {k: _num(r.get(k)) for k in OBJECTIVES}
        if any(v is None for v in vals.values()):
            continue
        row = dict(r, **vals)
        groups.setdefault(tuple(r.get(k, "") for k in WORKLOAD), []).append(row)
    out = []
    for wl, grp in sorted(groups.items(), key=lambda kv: tuple(str(x) for x in kv[0])):
        mask = pareto_mask([[g[k] for k in OBJECTIVES] for g in grp])
        for g, m in zip(grp, mask, strict=True):
            g["pareto"] = bool(m)
        out.append({"workload": wl, "rows": grp, "front": [g for g in grp if g["pareto"]],
                    "design_fields": design_fields})
    return out


def _label(wl: tuple) -> str:
    return ", ".join(f"{k} {v}" for k, v in zip(WORKLOAD, wl, strict=True))


def plot_pareto(group: dict, path: Path) -> Path:
    """Three panels (latency vs energy, latency vs area, energy vs area) of one workload's points,
    coloured by policy, the Pareto front (of all three objectives) ringed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = group["rows"]
    pairs = (("ms_per_token", "mJ_per_token"), ("ms_per_token", "area_mm2"), ("mJ_per_token", "area_mm2"))
    policies = sorted({str(r.get("policy", "")) for r in rows})
    colors = dict(zip(policies, plt.get_cmap("tab10").colors, strict=False))
    fig, axes = plt.subplots(1, 3, figsize=(16, 5))
    for ax, (x, y) in zip(axes, pairs, strict=True):
        for pol in policies:
            sel = [r for r in rows if str(r.get("policy", "")) == pol]
            ax.scatter([r[x] for r in sel], [r[y] for r in sel], s=14, alpha=0.6, color=colors[pol],
                       label=pol or "points")
        front = group["front"]
        ax.scatter([r[x] for r in front], [r[y] for r in front], s=60, facecolors="none", edgecolors="k",
                   linewidths=1.2, label="Pareto front (3 objectives)")
        for axis, key in (("x", x), ("y", y)):
            vals = [r[key] for r in rows if r[key] > 0]
            if vals and max(vals) / min(vals) > 30:
                getattr(ax, f"set_{axis}scale")("log")
        ax.set_xlabel(OBJECTIVES[x])
        ax.set_ylabel(OBJECTIVES[y])
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{_label(group['workload'])}: {len(rows)} points, {len(group['front'])} on the Pareto front")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_name(wl: tuple) -> str:
    return "pareto_" + re.sub(r"[^A-Za-z0-9.]+", "-", "_".join(str(x) for x in wl)).strip("-") + ".png"


def best_table(groups: list[dict]):
    """A rich Table: per workload and objective, the best point, its other objectives and its design."""
    from rich.table import Table

    short = {"ms_per_token": "latency", "mJ_per_token": "energy", "area_mm2": "area"}
    t = Table(title="Best point per objective (per workload: model input/output)")
    for c in ("workload", "best", "ms/token", "mJ/token", "mm^2", "design"):
        t.add_column(c, justify="right" if c in ("ms/token", "mJ/token", "mm^2") else "left")
    for g in groups:
        model, n_in, n_out = g["workload"]
        for obj in OBJECTIVES:
            r = min(g["rows"], key=lambda r, obj=obj: r[obj])
            design = ", ".join(f"{k}={r.get(k)}" for k in g["design_fields"])
            t.add_row(f"{model} {n_in}/{n_out}", short[obj], f"{r['ms_per_token']:.4g}", f"{r['mJ_per_token']:.4g}",
                      f"{r['area_mm2']:.4g}", design)
    return t
