"""Physical lower bound of every operation of a decoder layer, and the ratio achieved / bound.

For a configuration (:mod:`hw.config`), a model shape, a phase (summarization of ``L`` tokens or one
generation step at position ``t``), a policy (which FCs run in PIM, :func:`firmware.compiler.choose_mapping`)
and an operation, the bound is the time the operation's compulsory work needs on the resources that
carry it, each at its peak::

    bound = max(DRAM bytes / external bandwidth,          all channels' pins, one column per tCCD each
                matrix-DMA bytes / matrix-DMA port rate,  vector-DMA bytes / vector-DMA port rate,
                matrix FLOPs / matrix units' peak,        vector element passes / vector units' peak,
                PIM GEMV row-timing bound)                firmware.pim.gemv_lower_bound

Cycles are of the DRAM / PIM command clock (``clocks.pim_mhz``), the unit of :mod:`sim.perfmodel`
and of the RTL. Peaks are summed over ``npu.cores`` (the ``ianus`` preset: 4 matrix units and 4 vector
units sharing 8 channels). The DMA port rates are the performance model's (:func:`sim.perfmodel.micro_for`:
one 32-byte request per NPU cycle per engine on the RTL; on the projected system the ports are wide
enough that the channels bind). Refresh is not charged (a controller may postpone it past a short
operation); for long DRAM-bound operations it costs ``tRFC / tREFI`` (11 % with the paper's timings),
so their ratio cannot go below about 1.12.

Operations and their attribution are those of the projection's breakdown (:func:`sim.perfmodel.stage_tags`):

``qkv``
    the QKV FC (matrix unit, or PIM GEMV with its bias) and the placement of Q, K, V (the Q buffer, the
    K/V caches).
``attention``
    QK^T and S.V on the matrix unit, scale and softmax on the vector unit.
``proj``
    the attention projection FC. ``ffn``: FC1 and FC2 (with GELU when FC1 runs in PIM).
``vector``
    layernorms, residual adds (with the FC bias when the FC ran on the matrix unit), bias + GELU when
    FC1 ran on the matrix unit.

Compulsory work (what any implementation of the operation must move and compute; everything else a
program moves is counted by :func:`program_traffic`, from :mod:`sim.projection_core`, so the two can be compared):

* **Bytes.** Operations communicate through device memory, as the stages do: each operation reads its
  inputs once and writes its outputs once. Activations are BF16 (the storage format); the residual
  stream (the layer's input ``x``, ``x2`` after the attention block and the layer's output) is FP32, the
  layer's interface format. Weights BF16, FC biases FP32, layernorm parameters 4 bytes per element.
  Intermediates inside an operation (FP32 GEMM results before the bias, attention scores and
  probabilities) are not compulsory. Per operation, with ``T`` tokens, ``Lk = pos + T`` keys, ``d`` the
  model width, ``f = 4d``:

  - FC ``K x N`` on the matrix unit (matrix DMA): weights ``2KN``, input ``2TK``, output ``2TN``.
    In PIM: input ``2K`` and output ``2N`` through the channels; the weights are read inside the
    banks (the row-timing bound covers them).
  - FC bias ``4N`` (any path): counted where the breakdown puts the instruction that adds it: in the
    FC's operation for QKV (the scatter is ``qkv``) and for every FC in PIM (the GEMV preloads it);
    in ``vector`` for proj, FC1 and FC2 on the matrix unit (the residual / GELU step adds it).
  - attention (matrix DMA): Q ``2Td``, K and V caches ``2 * 2 Lk d``, output ``2Td``.
  - layernorm (vector DMA): ``x`` ``4Td``, output ``2Td``, parameters ``4d``.
  - residual (vector DMA): ``x`` ``4Td``, FC output ``2Td``, result ``4Td``.
  - bias + GELU (vector DMA): ``2Tf`` in, ``2Tf`` out.
* **FLOPs.** FC ``2TKN``; attention ``4 d P`` with ``P`` the causal query-key pairs
  (``T pos + T(T+1)/2``: masked pairs are not compulsory).
* **Vector element passes** (one element per lane per cycle): layernorm 2 (statistics, apply),
  residual 1, bias + GELU 1, softmax 1 per score (exp; scale and normalisation fold into neighbours);
  an FC bias add folds into the FC.
* **PIM.** :func:`firmware.pim.gemv_lower_bound` of the whole GEMV (``d x 3d`` for QKV even when the
  program splits it into head groups); where the performance model gives row commands their own
  slots (``Micro.row_bus``, the projected system) its command-bus term counts column commands only.
  FC1 and FC2 of one step are pooled (FC2 may start on FC1's first outputs), the steps of a
  generation are summed (each step needs the previous one's last layer).

The bound of a group of operations (a stage, a phase) pools their work: a valid lower bound too.

Entry points: :func:`stage_work` / :func:`phase_work` (the work), :func:`bound` (its lower bound),
:func:`projection_rows` (the table of ``ianus project --bounds``), :func:`rtl_stage_ratios` (per-stage
ratios of cycles measured on the RTL, as ``ianus run`` reports them), :func:`default_layer_rows` (the
RTL's ``default`` layer from the calibrated performance model and the stored RTL cycles).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field, fields

from firmware.compiler import STAGES, choose_mapping
from firmware.gpt2 import GptShape
from firmware.pim import GemvLayout, gemv_lower_bound
from hw.config import SystemConfig
from sim.projection_core import OPS as PROJ_OPS
from sim.projection_core import program_traffic

__all__ = ["OPS", "PHASES", "Work", "Rates", "Bound", "rates", "bound", "gemv_cycles", "stage_work", "phase_work",
           "program_traffic", "op_bounds", "phase_bounds", "projection_rows", "rtl_stage_ratios", "default_layer_rows",
           "default_bounds", "projection_tables", "default_tables", "BoundError"]

OPS = ("qkv", "attention", "proj", "ffn", "vector")
"""Operations with physical work (the breakdown's ``wait_pim`` and ``overhead`` have none)."""
PHASES = ("summarization", "generation")
_STAGE_OPS = {"ln1": ("vector",), "qkv_attn": ("qkv", "attention"), "proj": ("proj", "vector"),
              "ln2": ("vector",), "fc1": ("ffn", "vector"), "fc2": ("ffn", "vector")}
BF16, FP32 = 2, 4


class BoundError(ValueError):
    """Bad input to a bound computation (the message names the value and the rule)."""


# ---------------------------------------------------------------------------------------------
# Work and rates
# ---------------------------------------------------------------------------------------------

@dataclass
class Work:
    """Compulsory work of (part of) an operation, by the resource that carries it (see the module
    docstring for which bytes are counted)."""

    mu_bytes: float = 0.0       # through the matrix unit's DMA: GEMM weights and activations
    vdma_bytes: float = 0.0     # through the vector unit's DMA
    io_bytes: float = 0.0       # through the channels by any requester: FC biases, PIM inputs and results
    npu_flops: float = 0.0      # on the matrix units
    vec_elems: float = 0.0      # element passes on the vector units
    gemvs: tuple = ()           # PIM GEMVs: (K, N, GELU in the AF units)

    def __add__(self, other: Work) -> Work:
        out = Work()
        for f in fields(Work):
            setattr(out, f.name, getattr(self, f.name) + getattr(other, f.name))
        return out

    @property
    def dram_bytes(self) -> float:
        """Bytes through the channels' pins (the PIM weights stay inside the banks)."""
        return self.mu_bytes + self.vdma_bytes + self.io_bytes

    @property
    def pim_flops(self) -> float:
        return sum(2.0 * k * n for k, n, _ in self.gemvs)

    @property
    def pim_weight_bytes(self) -> float:
        return sum(float(BF16 * k * n) for k, n, _ in self.gemvs)

    @property
    def flops(self) -> float:
        return self.npu_flops + self.pim_flops


@dataclass(frozen=True)
class Rates:
    """Peak rates per DRAM-clock cycle of every resource a bound is taken over."""

    dram: float         # bytes, all channels
    mu_port: float      # bytes, matrix-unit DMA (all cores)
    vdma_port: float    # bytes, vector DMA (all cores)
    npu: float          # FLOPs, all matrix units
    vector: float       # element passes, all vector units
    pim: float          # FLOPs, all banks
    row_bus: bool       # row commands on their own slots (the PIM bound's bus term counts column commands)
    mhz: float          # the DRAM clock, to convert cycles to time


def rates(cfg: SystemConfig, micro=None) -> Rates:
    """The peaks of ``cfg`` (with the DMA ports of ``micro``, default :func:`sim.perfmodel.micro_for`)."""
    from sim.perfmodel import micro_for

    if not isinstance(cfg, SystemConfig):
        raise BoundError(f"cfg must be a SystemConfig, not {cfg!r}")
    mi = micro or micro_for(cfg)
    n, p = cfg.npu, cfg.pim
    k = cfg.clocks.pim_mhz / cfg.clocks.npu_mhz          # DRAM cycles per NPU cycle
    port = mi.dma_issue * mi.cores * p.column_bytes / k
    return Rates(dram=p.channels * p.column_bytes / cfg.timing.tCCD, mu_port=port, vdma_port=port,
                 npu=2 * n.array_rows * n.array_cols * n.macs_per_pe * n.cores / k,
                 vector=n.vector_lanes * n.cores / k,
                 pim=2 * p.lanes * p.banks * p.channels / cfg.timing.tCCD, row_bus=mi.row_bus,
                 mhz=cfg.clocks.pim_mhz)


@functools.lru_cache(maxsize=4096)
def gemv_cycles(cfg: SystemConfig, K: int, N: int, activation: bool, row_bus: bool = False) -> float:
    """Row-timing lower bound of a ``K x N`` PIM GEMV (:func:`firmware.pim.gemv_lower_bound`, refresh not
    charged); with ``row_bus`` its command-bus term counts column commands only."""
    b = gemv_lower_bound(cfg, K, N, activation=activation)
    if not row_bus:
        return float(b["cycles"])
    tiles = GemvLayout(cfg, K, N).tiles
    cols = b["bus"] - 2 * b["rows"] - (2 * tiles if activation else 0)
    return float(max(b["rows_path"], cols))


@dataclass(frozen=True)
class Bound:
    cycles: float
    limit: str                        # the binding resource
    terms: dict = field(default_factory=dict)


def bound(cfg: SystemConfig, work: Work, r: Rates | None = None) -> Bound:
    """Lower bound in DRAM cycles of ``work`` on ``cfg``: the largest of its per-resource times."""
    r = r or rates(cfg)
    pim = sum(gemv_cycles(cfg, k, n, bool(a), r.row_bus) for k, n, a in work.gemvs)
    terms = {"dram": work.dram_bytes / r.dram, "mu_dma": work.mu_bytes / r.mu_port,
             "vector_dma": work.vdma_bytes / r.vdma_port, "matrix": work.npu_flops / r.npu,
             "vector": work.vec_elems / r.vector, "pim": max(pim, work.pim_flops / r.pim)}
    limit = max(terms, key=terms.get)
    return Bound(terms[limit], limit if terms[limit] > 0 else "-", terms)


# ---------------------------------------------------------------------------------------------
# Compulsory work per stage and operation
# ---------------------------------------------------------------------------------------------

def _check_shape(shape, rows, pos0):
    if not isinstance(shape, GptShape):
        raise BoundError(f"shape must be a GptShape, not {shape!r}")
    if not isinstance(rows, int) or isinstance(rows, bool) or rows < 1:
        raise BoundError(f"rows (tokens of the phase) must be a positive integer, not {rows!r}")
    if not isinstance(pos0, int) or isinstance(pos0, bool) or pos0 < 0:
        raise BoundError(f"pos (first token position) must be a non-negative integer, not {pos0!r}")


def _fc(K, N, T, where, gelu=False, bias=True) -> Work:
    """An FC; with ``bias`` its bias bytes too (else the vector step that adds it counts them)."""
    if where == "pim":
        return Work(io_bytes=T * BF16 * (K + N) + FP32 * N, gemvs=((K, N, gelu),) * T)
    if where != "mu":
        raise BoundError(f"FC mapping must be 'mu' or 'pim', not {where!r}")
    return Work(mu_bytes=BF16 * (K * N + T * K + T * N), io_bytes=FP32 * N if bias else 0,
                npu_flops=2.0 * T * K * N)


def _residual(d, T, bias) -> Work:
    return Work(vdma_bytes=T * d * (FP32 + BF16 + FP32), io_bytes=FP32 * d if bias else 0, vec_elems=T * d)


def _layernorm(d, T) -> Work:
    return Work(vdma_bytes=T * d * (FP32 + BF16) + 4 * d, vec_elems=2 * T * d)


def stage_work(shape: GptShape, mapping: dict, phase: str, stage: str, rows: int, pos0: int) -> dict:
    """{op: :class:`Work`} of one compiled stage (:data:`firmware.compiler.STAGES`) of one layer.

    ``phase`` is ``"prefill"`` / ``"gen"`` (the compiler's names) or ``"summarization"`` /
    ``"generation"``; ``mapping`` is :func:`firmware.compiler.choose_mapping`'s ``{(phase, fc): "mu" | "pim"}``
    (with ``(phase, "gelu"): "pim" | "vector"``, where a PIM FC1's GELU runs, default ``"pim"``);
    ``rows`` tokens starting at position ``pos0``."""
    ph = {"summarization": "prefill", "generation": "gen"}.get(phase, phase)
    if ph not in ("prefill", "gen"):
        raise BoundError(f"phase must be one of prefill, gen, summarization, generation, not {phase!r}")
    if stage not in _STAGE_OPS:
        raise BoundError(f"stage must be one of {', '.join(STAGES)}, not {stage!r}")
    _check_shape(shape, rows, pos0)
    d, f, H = shape.d_model, shape.ffn, shape.heads
    T = rows
    where = {fc: mapping[(ph, fc)] for fc in ("qkv", "proj", "fc1", "fc2")}
    if stage in ("ln1", "ln2"):
        return {"vector": _layernorm(d, T)}
    if stage == "qkv_attn":
        Lk = pos0 + T
        pairs = T * pos0 + T * (T + 1) // 2
        att = Work(mu_bytes=BF16 * (2 * T * d + 2 * Lk * d), npu_flops=4.0 * d * pairs, vec_elems=H * pairs)
        return {"qkv": _fc(d, 3 * d, T, where["qkv"]), "attention": att}
    if stage == "proj":
        mu = where["proj"] == "mu"
        return {"proj": _fc(d, d, T, where["proj"], bias=not mu), "vector": _residual(d, T, mu)}
    if stage == "fc1":
        mu = where["fc1"] == "mu"
        # a PIM FC1's GELU: in the AF step (gelu "pim") or on the vector unit (firmware.costmodel.gelu_unit)
        af = not mu and mapping.get((ph, "gelu"), "pim") == "pim"
        out = {"ffn": _fc(d, f, T, where["fc1"], gelu=af, bias=not mu)}
        if mu:
            out["vector"] = Work(vdma_bytes=2 * BF16 * T * f, io_bytes=FP32 * f, vec_elems=T * f)
        elif not af:
            out["vector"] = Work(vdma_bytes=(FP32 + BF16) * T * f, vec_elems=T * f)
        return out
    mu = where["fc2"] == "mu"
    return {"ffn": _fc(f, d, T, where["fc2"], bias=not mu), "vector": _residual(d, T, mu)}


def phase_work(shape: GptShape, mapping: dict, phase: str, rows: int, pos0: int) -> dict:
    """{op: :class:`Work`} of one layer's phase (all its stages), pooled per operation."""
    out = {}
    for st in STAGES:
        for op, w in stage_work(shape, mapping, phase, st, rows, pos0).items():
            out[op] = out.get(op, Work()) + w
    return out


def _mapping(cfg, shape, policy, n_in):
    """The compiler's mapping, and (key ``(phase, "gelu")``) where a PIM FC1 applies its GELU."""
    from firmware.costmodel import gelu_unit

    m = choose_mapping(cfg, GptShape(shape.d_model, shape.heads, 1, shape.eps), policy, n_in)
    return {**m, **{(ph, "gelu"): gelu_unit(cfg, shape.d_model, shape.ffn) for ph in ("prefill", "gen")}}


def op_bounds(cfg: SystemConfig, shape: GptShape, policy: str, n_in: int, phase: str, rows: int, pos0: int,
              r: Rates | None = None) -> dict:
    """{op: (:class:`Bound`, :class:`Work`)} of one layer's phase under ``policy`` (mapping chosen for a
    summarization of ``n_in`` tokens, as the compiler does)."""
    r = r or rates(cfg)
    pw = phase_work(shape, _mapping(cfg, shape, policy, n_in), phase, rows, pos0)
    return {op: (bound(cfg, w, r), w) for op, w in pw.items()}


# ---------------------------------------------------------------------------------------------
# The projection's table
# ---------------------------------------------------------------------------------------------

def _check_outputs(n_in, n_out):
    if not isinstance(n_in, int) or isinstance(n_in, bool) or n_in < 1:
        raise BoundError(f"input tokens must be a positive integer, not {n_in!r}")
    if not isinstance(n_out, int) or isinstance(n_out, bool) or n_out < 1:
        raise BoundError(f"output tokens must be a positive integer, not {n_out!r}")


def phase_bounds(cfg: SystemConfig, shape: GptShape, policy: str, n_in: int, n_out: int, r: Rates | None = None) -> dict:
    """Per layer: ``{phase: {op: (bound cycles, binding resource, Work)}}`` with op ``total`` the pooled
    work of the phase. Generation: summed over the ``n_out - 1`` steps at positions ``n_in .. n_in + n_out - 2``
    (each step's bound taken alone); its Work is the sum, its limit the most frequent one."""
    _check_outputs(n_in, n_out)
    r = r or rates(cfg)
    mapping = _mapping(cfg, shape, policy, n_in)
    out = {}
    pre = phase_work(shape, mapping, "prefill", n_in, 0)
    pre["total"] = sum(pre.values(), Work())
    out["summarization"] = {op: (bound(cfg, w, r).cycles, bound(cfg, w, r).limit, w) for op, w in pre.items()}
    gen = {}
    for t in range(1, n_out):
        pw = phase_work(shape, mapping, "gen", 1, n_in + t - 1)
        pw["total"] = sum(pw.values(), Work())
        for op, w in pw.items():
            b = bound(cfg, w, r)
            c, lim, acc = gen.get(op, (0.0, {}, Work()))
            lim[b.limit] = lim.get(b.limit, 0) + 1
            gen[op] = (c + b.cycles, lim, acc + w)
    out["generation"] = {op: (c, max(lim, key=lim.get), w) for op, (c, lim, w) in gen.items()}
    return out


def projection_rows(p, n_out: int | None = None) -> list[dict]:
    """The bound table of one :class:`sim.projection_core.Projection`: per phase and operation the achieved
    time (the projection's breakdown), the bound, their ratio and the binding resource, for the whole
    model (summarization in ms, generation in ms per generated token); op ``total`` is the phase.
    With ``traffic`` recorded by the projection, also the bytes its programs move against the
    compulsory bytes (per layer, MB)."""
    n_out = n_out if n_out is not None else (max(p.gen) + 1 if p.gen else 1)
    _check_outputs(p.n_in, n_out)
    cfg, L = p.cfg, p.shape.layers
    bounds = phase_bounds(cfg, p.shape, p.policy, p.n_in, n_out)
    ms = 1e-3 / cfg.clocks.pim_mhz
    steps = n_out - 1
    rows = []
    phases = [("summarization", p.prefill, 1)]
    if steps:
        phases.append(("generation", p.gen_total(n_out), steps))
    for phase, res, div in phases:
        traffic = getattr(res, "traffic", {}) or {}
        for op in (*PROJ_OPS, "total"):
            ach = res.cycles if op == "total" else res.breakdown.get(op, 0.0)
            b, lim, w = bounds[phase].get(op, (0.0, "-", Work()))
            row = {"model": p.model, "policy": p.policy, "input": p.n_in, "output": n_out, "phase": phase, "op": op,
                   "achieved_ms": L * ach * ms / div, "bound_ms": L * b * ms / div,
                   "ratio": ach / b if b > 0 else None, "limit": lim,
                   "compulsory_MB": w.dram_bytes / div / 1e6, "pim_weight_MB": w.pim_weight_bytes / div / 1e6}
            moved = sum(traffic.values()) if op == "total" else traffic.get(op, 0.0)
            row["program_MB"] = moved / div / 1e6 if traffic else None
            rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# The RTL's default layer
# ---------------------------------------------------------------------------------------------

_NAME = re.compile(r"^L(\d+) (prefill|gen)@(\d+) (\w+)$")


def parse_program_name(name: str) -> tuple[int, str, int, str]:
    """``"L0 gen@32 fc1"`` (the names ``ianus run`` and the RTL testbench give programs) ->
    ``(layer, phase, position, stage)``."""
    m = _NAME.match(name) if isinstance(name, str) else None
    if not m or m.group(4) not in _STAGE_OPS:
        raise BoundError(f"program name must look like 'L0 prefill@0 ln1' or 'L0 gen@32 fc1' with a stage of "
                         f"{', '.join(STAGES)}, not {name!r}")
    return int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)


def rtl_stage_ratios(cfg: SystemConfig, shape: GptShape, policy: str, prefill: int, programs) -> list[dict]:
    """Ratios to the bound of per-stage cycles measured on the RTL.

    ``programs``: ``[{"name": "L0 prefill@0 ln1", "cycles": 15113}, ...]`` (``ianus run``'s per-program
    results, ``sim/calibration/<config>.json``) or ``{name: cycles}``; ``prefill`` is the job's prefill
    length (it sets the mapping and the prefill stages' token count). Returns per program ``name``,
    ``phase``, ``pos``, ``stage``, ``cycles``, ``bound`` (cycles, the stage's pooled work), ``ratio``,
    ``limit`` and ``op_bounds`` ({op: cycles})."""
    _check_outputs(prefill, 1)
    items = programs.items() if isinstance(programs, dict) else ((p["name"], p["cycles"]) for p in programs)
    r = rates(cfg)
    mapping = _mapping(cfg, shape, policy, prefill)
    out = []
    for name, cycles in items:
        _, ph, pos, st = parse_program_name(name)
        if not isinstance(cycles, (int, float)) or isinstance(cycles, bool) or not cycles > 0:
            raise BoundError(f"cycles of {name!r} must be a positive number, not {cycles!r}")
        rows = prefill if ph == "prefill" else 1
        works = stage_work(shape, mapping, ph, st, rows, pos)
        b = bound(cfg, sum(works.values(), Work()), r)
        out.append({"name": name, "phase": "summarization" if ph == "prefill" else "generation", "pos": pos,
                    "stage": st, "cycles": cycles, "bound": b.cycles, "ratio": cycles / b.cycles, "limit": b.limit,
                    "op_bounds": {op: bound(cfg, w, r).cycles for op, w in works.items()}})
    return out


def model_run(config: str, policy: str, layers: int, prefill: int, generate: int):
    """Run a job's compiled programs on the calibrated performance model (the way :mod:`sim.calibrate`
    does, on the model's own timeline). Returns ``(compiled model, [(Stage, ProgramResult), ...])``."""
    from sim.perfmodel import PerfModel, decode_program, stage_tags
    from sim.run import prepare

    cm, job, _, _ = prepare(config, policy, layers, prefill, generate)
    m = PerfModel(cm.cfg)
    out = []
    for st, addr, _n in job.programs:
        ins = decode_program(st.words)
        tags = stage_tags(st.name, ins)
        res = m.run_program(None, ins=ins, prog_addr=addr, tags=tags)
        res.traffic = program_traffic(ins, tags)
        out.append((st, res))
    return cm, out


def default_layer_rows(policy: str, prefill: int = 32, generate: int = 4, rtl: dict | None = None,
                       config: str = "default") -> tuple[list[dict], list[dict]]:
    """The bound table of the RTL's ``default`` layer (GPT-2-small shaped, one layer): the performance
    model runs the job's programs; ``rtl`` ({program name: cycles}, e.g. from ``sim/calibration``) adds the
    RTL's cycles per stage. Returns (per phase and op rows, per stage rows); generation figures are per
    step (mean over the ``generate`` steps)."""
    cm, runs = model_run(config, policy, 1, prefill, generate)
    cfg, shape = cm.cfg, cm.shape
    r = rates(cfg)
    mapping = _mapping(cfg, shape, policy, prefill)
    acc = {}
    for st, res in runs:
        ph = "summarization" if st.phase == "prefill" else "generation"
        a = acc.setdefault(ph, {"breakdown": {}, "cycles": 0.0, "bounds": {}, "work": {}, "traffic": {}, "n": set()})
        a["cycles"] += res.cycles
        a["n"].add(st.pos)
        for k, v in res.breakdown.items():
            a["breakdown"][k] = a["breakdown"].get(k, 0.0) + v
        for k, v in res.traffic.items():
            a["traffic"][k] = a["traffic"].get(k, 0.0) + v
    # bounds: per step (generation) summed, pooled per op within a step
    for ph, a in acc.items():
        positions = sorted(a["n"])
        for pos in positions:
            rows = prefill if ph == "summarization" else 1
            pw = phase_work(shape, mapping, ph, rows, pos)
            pw["total"] = sum(pw.values(), Work())
            for op, w in pw.items():
                b = bound(cfg, w, r)
                c, lim = a["bounds"].get(op, (0.0, b.limit))
                a["bounds"][op] = (c + b.cycles, lim)
                a["work"][op] = a["work"].get(op, Work()) + w
    op_rows = []
    for ph in PHASES:
        if ph not in acc:
            continue
        a = acc[ph]
        div = len(a["n"])
        for op in (*PROJ_OPS, "total"):
            ach = a["cycles"] if op == "total" else a["breakdown"].get(op, 0.0)
            b, lim = a["bounds"].get(op, (0.0, "-"))
            w = a["work"].get(op, Work())
            moved = sum(a["traffic"].values()) if op == "total" else a["traffic"].get(op, 0.0)
            op_rows.append({"config": cfg.name, "policy": policy, "prefill": prefill, "phase": ph, "op": op,
                            "achieved_cycles": ach / div, "bound_cycles": b / div,
                            "ratio": ach / b if b > 0 else None, "limit": lim,
                            "compulsory_MB": w.dram_bytes / div / 1e6, "program_MB": moved / div / 1e6})
    stage_rows = rtl_stage_ratios(cfg, shape, policy, prefill,
                                  [{"name": f"L{st.layer} {st.phase}@{st.pos} {st.name}", "cycles": res.cycles}
                                   for st, res in runs])
    for row in stage_rows:
        row["model_cycles"] = row.pop("cycles")
        row["model_ratio"] = row.pop("ratio")
        row["policy"] = policy
        for op in OPS:
            row[f"bound_{op}"] = row["op_bounds"].get(op)
        del row["op_bounds"]
        row["rtl_cycles"] = rtl.get(row["name"]) if rtl else None
        row["rtl_ratio"] = row["rtl_cycles"] / row["bound"] if row["rtl_cycles"] else None
    return op_rows, stage_rows


# ---------------------------------------------------------------------------------------------
# Tables (rich)
# ---------------------------------------------------------------------------------------------

def _r(v):
    return "-" if v is None else f"{v:.2f}"


def projection_tables(rows: list[dict]) -> list:
    """Rich tables of :func:`projection_rows` rows: one per (model, input, output), one row per phase and
    operation, per policy the achieved time, the bound, their ratio and the binding resource."""
    from rich.table import Table

    groups = {}
    for r in rows:
        groups.setdefault((r["model"], r["input"], r["output"]), []).append(r)
    out = []
    for (model, n_in, n_out), rs in groups.items():
        pols = list(dict.fromkeys(r["policy"] for r in rs))
        t = Table(title=f"{model}, {n_in} in / {n_out} out: achieved vs physical lower bound (sim.bounds); "
                        "summarization ms, generation ms per token; MB per layer (per step)")
        t.add_column("phase")
        t.add_column("op")
        for pol in pols:
            for c in ("ms", "bound", "ratio", "limit", "MB moved/compulsory"):
                t.add_column(f"{pol} {c}" if c == "ms" else c, justify="right")
        idx = {(r["policy"], r["phase"], r["op"]): r for r in rs}
        for phase in PHASES:
            ops = list(dict.fromkeys(r["op"] for r in rs if r["phase"] == phase))
            for op in ops:
                cells = []
                for pol in pols:
                    r = idx.get((pol, phase, op))
                    if r is None:
                        cells += ["-"] * 5
                        continue
                    mb = (f"{r['program_MB']:.2f}/{r['compulsory_MB']:.2f}" if r.get("program_MB") is not None
                          else f"-/{r['compulsory_MB']:.2f}") if r["op"] not in ("wait_pim", "overhead") else ""
                    cells += [f"{r['achieved_ms']:.3f}", f"{r['bound_ms']:.3f}" if r["bound_ms"] else "-",
                              _r(r["ratio"]), r["limit"], mb]
                t.add_row("summ." if phase == "summarization" else "gen.", op, *cells,
                          end_section=op == "total")
        out.append(t)
    return out


def default_tables(op_rows: list[dict], stage_rows: list[dict]) -> list:
    """Rich tables of :func:`default_layer_rows`: per phase and op (performance model), per stage
    (performance model and stored RTL cycles)."""
    from rich.table import Table

    out = []
    if op_rows:
        cfg = op_rows[0]["config"]
        t = Table(title=f"RTL {cfg} layer (GPT-2-small shaped, prefill {op_rows[0]['prefill']}): performance model "
                        "vs lower bound, cycles (generation per step); MB moved by the programs / compulsory")
        for c in ("policy", "phase", "op", "cycles", "bound", "ratio", "limit", "MB moved/compulsory"):
            t.add_column(c, justify="right" if c not in ("policy", "phase", "op") else "left")
        for r in op_rows:
            mb = "" if r["op"] in ("wait_pim", "overhead") else f"{r['program_MB']:.3f}/{r['compulsory_MB']:.3f}"
            t.add_row(r["policy"], "summ." if r["phase"] == "summarization" else "gen.", r["op"],
                      f"{r['achieved_cycles']:,.0f}", f"{r['bound_cycles']:,.0f}" if r["bound_cycles"] else "-",
                      _r(r["ratio"]), r["limit"], mb, end_section=r["op"] == "total")
        out.append(t)
    if stage_rows:
        t = Table(title="per stage (generation: mean per step): cycles of the performance model and of the RTL "
                        "(stored, sim/calibration) against the stage's lower bound")
        for c in ("policy", "phase", "stage", "bound", "limit", "model", "ratio", "RTL", "RTL ratio"):
            t.add_column(c, justify="right" if c not in ("policy", "phase", "stage") else "left")
        agg = {}
        for r in stage_rows:
            a = agg.setdefault((r["policy"], r["phase"], r["stage"]), {"n": 0, "bound": 0.0, "model": 0.0, "rtl": 0.0,
                                                                       "rtl_n": 0, "limit": r["limit"]})
            a["n"] += 1
            a["bound"] += r["bound"]
            a["model"] += r["model_cycles"]
            if r.get("rtl_cycles"):
                a["rtl"] += r["rtl_cycles"]
                a["rtl_n"] += 1
        for (pol, ph, st), a in agg.items():
            rtl = a["rtl"] / a["rtl_n"] if a["rtl_n"] == a["n"] else None
            t.add_row(pol, "summ." if ph == "summarization" else "gen.", st, f"{a['bound'] / a['n']:,.0f}", a["limit"],
                      f"{a['model'] / a['n']:,.0f}", _r(a["model"] / a["bound"]), f"{rtl:,.0f}" if rtl else "-",
                      _r(rtl * a["n"] / a["bound"]) if rtl else "-", end_section=st == STAGES[-1])
        out.append(t)
    return out


def default_bounds(jobs=None) -> tuple[list[dict], list[dict]]:
    """:func:`default_layer_rows` for the default configuration's calibration jobs (``sim.calibrate.JOBS``:
    ianus prefill 32 + 4 steps, npu-mem prefill 32 + 1), with the stored RTL cycles when present."""
    from sim import calibrate

    data = calibrate.stored("default") or {"jobs": []}
    stored = {(j["policy"], j["prefill"], j["generate"]): {p["name"]: p["cycles"] for p in j["programs"]}
              for j in data["jobs"] if j["layers"] == 1}
    ops, stages = [], []
    for pol, layers, pre, gen in jobs or calibrate.JOBS["default"]:
        if layers != 1:
            continue
        o, s = default_layer_rows(pol, pre, gen, rtl=stored.get((pol, pre, gen)))
        ops += o
        stages += s
    return ops, stages
