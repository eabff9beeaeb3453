"""The core of the projection (``ianus project``), below everything that builds on it: :mod:`sim.project`
(the CLI, its tables and plots, the ``hpim`` dispatch), :mod:`sim.hpim_model` (the ``hpim`` policy, whose
summarization is an ``ianus`` projection), :mod:`sim.neupims_model` (the multi-device link time) and
:mod:`sim.bounds` (the bound tables over a projection's breakdown). It imports none of them, so they import
it without an import cycle; :mod:`sim.project` re-exports its names.

* :data:`OPS`, the operations of a projection's breakdown, and :data:`LINK_LATENCY_US`;
* :class:`PhaseResult` (one layer's cycles, breakdown, events and traffic of a phase) and :class:`Projection`
  (a model's summarization and sampled generation steps, :meth:`Projection.summary` in ms and mJ);
* :func:`scale_devices` and :func:`allreduce_s`, the tensor-parallel scaling over several devices;
* :func:`program_traffic`, the DRAM bytes a compiled program moves (re-exported by :mod:`sim.bounds`);
* :func:`project_programs`, the projection of the compiled programs (policies ``ianus`` and ``npu-mem``)
  on the performance model, and :func:`sample_positions`, the generation steps it simulates.

The modelling assumptions (programs, sampled positions, cores, memory mapping, clocks, devices) are stated
in :mod:`sim.project`.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

from firmware.compiler import STAGES, LayerCompiler, choose_mapping, kv_layout, plan_memory
from firmware.gpt2 import SHAPES, GptShape
from hw.config import SystemConfig, preset
from hw.spec.soc_isa import SocOp
from sim.energy import energy
from sim.perfmodel import (
    F_BF16,
    F_BIAS,
    OP_GEMV,
    OP_READ_RES,
    OP_WRITE_VEC,
    PerfModel,
    decode_program,
    micro_for,
    stage_tags,
)

__all__ = ["OPS", "LINK_LATENCY_US", "PhaseResult", "Projection", "scale_devices", "allreduce_s",
           "sample_positions", "program_traffic", "project_programs"]

OPS = ("qkv", "attention", "proj", "ffn", "vector", "wait_pim", "overhead")
"""The operations of a projection's breakdown (:attr:`PhaseResult.breakdown`), in the order of its tables."""
LINK_LATENCY_US = 2.0
"""Per transfer over PCIe: DMA set-up and a round trip through the switch (assumed)."""


@dataclass
class PhaseResult:
    """One phase of one layer (the summarization, or one generation step): cycles, and per op, stage and event
    what the performance model's program results (:meth:`add`) sum to."""

    cycles: float = 0.0                               # per layer
    breakdown: dict = field(default_factory=dict)     # per layer, cycles per op
    events: dict = field(default_factory=dict)        # per layer
    stages: dict = field(default_factory=dict)        # stage -> cycles per layer
    stage_events: dict = field(default_factory=dict)  # stage -> events per layer
    traffic: dict = field(default_factory=dict)       # per layer, op -> DRAM bytes the programs move

    def add(self, name, res, w=1.0, traffic=None):
        self.cycles += w * res.cycles
        for k, v in (traffic or {}).items():
            self.traffic[k] = self.traffic.get(k, 0.0) + w * v
        self.stages[name] = self.stages.get(name, 0.0) + w * res.cycles
        se = self.stage_events.setdefault(name, {})
        for k, v in res.events.items():
            se[k] = se.get(k, 0.0) + w * v
        for k, v in res.breakdown.items():
            self.breakdown[k] = self.breakdown.get(k, 0.0) + w * v
        for k, v in res.events.items():
            self.events[k] = self.events.get(k, 0.0) + w * v


@dataclass
class Projection:
    """One model under one policy and input length: the summarization and the sampled generation steps (per
    layer), with :meth:`summary` for the whole model in ms and mJ."""

    model: str
    policy: str
    n_in: int
    shape: GptShape
    cfg: SystemConfig
    prefill: PhaseResult
    gen: dict                        # generated-token index t (1 .. n_out - 1) -> PhaseResult per layer (sampled)
    wall_s: float = 0.0

    @property
    def mhz(self):
        return self.cfg.clocks.pim_mhz

    def gen_at(self, t: int) -> PhaseResult:
        """Per-layer result of generation step ``t`` (1-based), interpolated between the samples."""
        ks = sorted(self.gen)
        if t in self.gen:
            return self.gen[t]
        lo = max([k for k in ks if k < t], default=ks[0])
        hi = min([k for k in ks if k > t], default=ks[-1])
        if lo == hi:
            return self.gen[lo]
        w = (t - lo) / (hi - lo)
        out = PhaseResult()
        a, b = self.gen[lo], self.gen[hi]
        out.cycles = (1 - w) * a.cycles + w * b.cycles
        for attr in ("breakdown", "events", "stages", "traffic"):
            da, db = getattr(a, attr), getattr(b, attr)
            setattr(out, attr, {k: (1 - w) * da.get(k, 0) + w * db.get(k, 0) for k in set(da) | set(db)})
        out.stage_events = {st: {k: (1 - w) * a.stage_events.get(st, {}).get(k, 0) + w * b.stage_events.get(st, {}).get(k, 0)
                                 for k in set(a.stage_events.get(st, {})) | set(b.stage_events.get(st, {}))}
                            for st in a.stage_events}
        return out

    def gen_total(self, n_out: int) -> PhaseResult:
        """Sum over the ``n_out - 1`` generation steps, per layer."""
        out = PhaseResult()
        for t in range(1, n_out):
            r = self.gen_at(t)
            out.cycles += r.cycles
            for attr in ("breakdown", "events", "stages", "traffic"):
                d = getattr(out, attr)
                for k, v in getattr(r, attr).items():
                    d[k] = d.get(k, 0.0) + v
        return out

    def summary(self, n_out: int, devices: int = 1) -> dict:
        L = self.shape.layers
        s = 1e-6 / self.mhz                       # seconds per cycle
        pre = scale_devices(self.prefill, devices)
        gen = scale_devices(self.gen_total(n_out), devices)
        comm_pre, bytes_pre = allreduce_s(self.cfg, self.shape, self.n_in, devices)
        comm_tok, bytes_tok = allreduce_s(self.cfg, self.shape, 1, devices)
        steps = n_out - 1
        t_sum = L * (pre.cycles * s + comm_pre)
        t_gen = L * (gen.cycles * s + steps * comm_tok)
        ev_pre = {k: v * L * devices for k, v in pre.events.items()}
        ev_pre["link_bytes"] = L * bytes_pre
        ev_gen = {k: v * L * devices for k, v in gen.events.items()}
        ev_gen["link_bytes"] = L * steps * bytes_tok
        e_pre = energy(ev_pre, t_sum)
        e_gen = energy(ev_gen, t_gen)
        return {
            "model": self.model, "policy": self.policy, "input": self.n_in, "output": n_out, "devices": devices,
            "summarization_ms": t_sum * 1e3,
            "gen_ms_per_token": (t_gen / steps * 1e3) if steps else 0.0,
            "total_ms": (t_sum + t_gen) * 1e3,
            "summarization_mJ": e_pre["total"] * 1e3,
            "gen_mJ_per_token": (e_gen["total"] / steps * 1e3) if steps else 0.0,
            "total_J": e_pre["total"] + e_gen["total"],
            "breakdown_pre_ms": {k: L * pre.breakdown.get(k, 0) * s * 1e3 for k in OPS},
            "breakdown_gen_ms": {k: L * gen.breakdown.get(k, 0) * s * 1e3 for k in OPS},
            "comm_ms": (L * (comm_pre + steps * comm_tok)) * 1e3,
            "energy_pre": e_pre, "energy_gen": e_gen,
        }


def scale_devices(r: PhaseResult, devices: int) -> PhaseResult:
    """Tensor parallelism over ``devices``: FC and attention work (and the PIM waits) divide, the
    vector work and the per-program overhead do not."""
    if devices == 1:
        return r
    out = PhaseResult(events={k: v / devices for k, v in r.events.items()})
    split = ("qkv", "attention", "proj", "ffn", "wait_pim")
    out.breakdown = {k: (v / devices if k in split else v) for k, v in r.breakdown.items()}
    out.cycles = sum(out.breakdown.values())
    out.stages = {k: v * out.cycles / r.cycles for k, v in r.stages.items()} if r.cycles else {}
    return out


def allreduce_s(cfg, shape: GptShape, tokens: int, devices: int) -> tuple[float, float]:
    """(seconds, bytes sent per device) of the two ring all-reduces of a layer (after the attention
    projection and after FC2) of ``tokens`` x d_model BF16 hidden states."""
    if devices == 1:
        return 0.0, 0.0
    nbytes = tokens * shape.d_model * 2
    per = 2 * (devices - 1) / devices * nbytes             # each device sends this much per all-reduce
    t = per / (cfg.clocks.host_link_gbps * 1e9) + 2 * (devices - 1) * LINK_LATENCY_US * 1e-6
    return 2 * t, 2 * per


def sample_positions(n_out: int, samples: int) -> list[int]:
    """The generation steps (1-based) simulated of ``n_out - 1``: all of them up to ``samples``, else ``samples``
    spread evenly, the first and the last included (:meth:`Projection.gen_at` interpolates between them)."""
    steps = n_out - 1
    if steps <= 0:
        return []
    if steps <= samples:
        return list(range(1, steps + 1))
    return sorted({round(1 + i * (steps - 1) / (samples - 1)) for i in range(samples)})


def program_traffic(ins, tags) -> dict:
    """External DRAM bytes per tag that a decoded program (:func:`sim.perfmodel.decode_program`) moves:
    matrix-unit LOAD / STORE, VLOAD / VSTORE and the PCU's input-vector, bias and result transfers
    (32-byte requests, as the DMA engines issue them); instruction fetches are not counted."""
    out = {}
    for x, tag in zip(ins, tags, strict=True):
        f = x.f
        n = 0
        if x.op == SocOp.MATRIX and f["opcode"] == "LOAD":
            n = f["rows"] * -(-f["cols"] // 16) * 32
        elif x.op == SocOp.MATRIX and f["opcode"] == "STORE":
            n = f["rows"] * -(-f["cols"] // (16 if f["bf16"] else 8)) * 32
        elif x.op in (SocOp.VLOAD, SocOp.VSTORE):
            n = f["rows"] * f["cols"] * 32
        elif x.op == SocOp.PIM:
            if f["op"] == OP_WRITE_VEC:
                n = -(-f["n"] * 2 // 32) * 32
            elif f["op"] == OP_GEMV and f["flags"] & F_BIAS:
                n = -(-f["m"] * 4 // 32) * 32
            elif f["op"] == OP_READ_RES:
                n = -(-f["n"] * (2 if f["flags"] & F_BF16 else 4) // 32) * 32
        if n:
            out[tag] = out.get(tag, 0) + n
    return out


def project_programs(name: str, policy: str, n_in: int, n_out: int, cfg: SystemConfig | None = None,
                     samples: int = 16, shape: GptShape | None = None, progress=None, exact: bool = False) -> Projection:
    """:func:`sim.project.project` for the policies that run the compiled programs (``ianus``, ``npu-mem``):
    simulate one layer of ``name`` (a :data:`firmware.gpt2.SHAPES` key or ``shape``) for the summarization of
    ``n_in`` tokens and ``n_out - 1`` generation steps (``samples`` of them, :func:`sample_positions`).
    ``exact``: every DMA request timed (``Micro.cache`` off), as the calibrated RTL configurations are; by
    default a paper-scale system reuses a transfer's timing by shape (:func:`sim.perfmodel.micro_for`),
    several times faster and a few per cent optimistic (``sim/benchmarks/bounds.py`` measures by how much)."""
    t0 = time.perf_counter()
    cfg = cfg or preset("ianus")
    shape = shape or SHAPES[name]
    one = GptShape(shape.d_model, shape.heads, 1, shape.eps)
    plan = plan_memory(cfg, one, n_in + max(n_out, 1), pim_layout=(policy != "npu-mem"),
                       kv_layout=kv_layout(cfg, one, policy))
    mapping = choose_mapping(cfg, one, policy, n_in)
    lc = LayerCompiler(plan, policy, mapping)
    micro = micro_for(cfg)
    if exact:
        micro = dataclasses.replace(micro, cache=False)
    if policy == "npu-mem":
        micro = dataclasses.replace(micro, interleave=256)
    model = PerfModel(cfg, micro)

    def run(phase, stage, rows, pos):
        st = lc.stage(0, phase, stage, rows, pos)
        ins = decode_program(st.words)
        tags = stage_tags(stage, ins)
        r = model.run_program(None, ins=ins, tags=tags)
        if progress:
            progress()
        return r, program_traffic(ins, tags)

    pre = PhaseResult()
    for stage in STAGES:
        r, tr = run("prefill", stage, n_in, 0)
        pre.add(stage, r, traffic=tr)
    gen = {}
    for t in sample_positions(n_out, samples):
        g = PhaseResult()
        for stage in STAGES:
            r, tr = run("gen", stage, 1, n_in + t - 1)
            g.add(stage, r, traffic=tr)
        gen[t] = g
    return Projection(name, policy, n_in, shape, cfg, pre, gen, time.perf_counter() - t0)
