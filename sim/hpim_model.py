"""The ``hpim`` policy in the projection (issue 20): generation-phase attention on SRAM-PIM units
(:class:`hw.npu.sram_pim.SramPimUnit`) beside the NPU, FC GEMVs on the DRAM-PIM as under ``ianus``, and an
intra-token pipeline between the two.

What is timed, and by what:

* **DRAM-PIM and NPU programs** by the calibrated performance model (:mod:`sim.perfmodel`), each a
  program built with the compiler's own code (:class:`firmware.compiler.LayerCompiler`): ``ln1``,
  ``ln2``, ``fc1``, ``fc2`` are the ``ianus`` stage programs; per head group ``g`` the QKV GEMV of the
  group (as the ``ianus`` head-group split issues it), the scatter of its new Q / K / V rows into the
  DRAM KV cache, the store of its attention output ``o_g`` (FP32 -> BF16 on the vector unit, then
  VSTORE) and the attention projection *split by input rows*: ``y = o_g W_proj[g] + y`` as a PIM GEMV
  of ``hd * heads_per_group`` inputs whose bias is the previous group's FP32 partial sum (the macro
  GEMV's BIAS preload; ``proj_b`` for the first group), then the residual. The program of each task
  is timed alone, start-up and END included (a conservative choice: fused into one program the
  command processor would overlap those few tens of cycles).
* **Softmax** (scale + masked softmax per head, scores FP32 in, probabilities BF16 out) on the vector
  unit: the same VECTOR instructions the ``ianus`` attention issues, timed by the performance model,
  without their DMAs: scores arrive from the SRAM-PIM unit and probabilities go back to it on chip.
* **SRAM-PIM commands** by the unit's exact cycle formula (:meth:`SramPimUnit.command_cycles`, equal
  to the RTL's cycles in ``tests/test_sram_pim.py``), at the NPU clock: every unit (one per NPU core)
  holds a share of the keys of every head of the group and runs one QK and one PV command over the
  group's heads; the vector unit adds the units' partial PV outputs (FP32) before the BF16 store.
* **K/V movement.** *Resident* when the whole KV cache (all layers, all tokens) fits the units:
  only the new token's K and V rows are written (on chip, in the scatter). Otherwise *streamed*:
  before a group is attended to, its K and V rows ``0 .. pos - 1`` are read from the DRAM KV cache
  through the calibrated memory model (:class:`sim.perfmodel.Memory`: channels, banks, row misses,
  refresh; the Row-Channel-Bank-Column map of the ``ianus`` layout), one DMA engine per unit issuing
  ``min(dma_issue, unit write rate)`` 32-byte requests per NPU cycle with the performance model's
  requests in flight. The positions go to the units block-cyclically, one DRAM row of a head's cache
  (16 positions of 64 BF16) per block: unit ``u`` holds the blocks ``b`` with ``b % units == u``, and
  its engine reads them position-major over the group's K and V caches (a 3-D DMA). This keeps the
  engines on different banks: measured on XL, group 0, positions 128-1,000, 1.44-1.59x the time of
  the external bandwidth (refresh and row overheads included); contiguous ranges per unit took
  1.3-10x depending on how the ranges aligned with the banks (engines thrashing one bank's rows). The
  unit holds two groups (double buffering); when a group's K and V do not
  fit, the projection stops with :class:`HpimCapacityError` naming the numbers.

**The intra-token pipeline** (:func:`schedule`): tasks run in a fixed order per resource, each at
the first cycle its resources are free and its inputs are done. Resources: ``chan`` (the DRAM
channels: a PIM macro holds them all and normal traffic waits, as in the RTL's memory controller, so
every task that touches DRAM -- PIM GEMVs, K/V streams, vector DMAs -- takes them exclusively),
``vec`` (the vector unit), ``sram`` (the SRAM-PIM units). Order::

    ln1, kv_0, qkv_0, scatter_0,
    for g: kv_{g+1}, qkv_{g+1} | qk_g, softmax_g, pv_g | scatter_{g+1}, o_store_g, proj_g
    residual, ln2, fc1, fc2

so the attention of group ``g`` (SRAM-PIM and vector unit, no DRAM) runs while the channels stream
the next group's K/V and compute its QKV, and the projection of group ``g`` follows on the channels
as soon as ``o_g`` is stored. Only the last group's attention has nothing to hide behind. The split
projection costs more channel time than one GEMV (a row activation per tile and group instead of per
tile and 1024 inputs); the other schedule runs the ``ianus`` proj stage after the last group. Both are
built per step and the faster kept (as the ``ianus`` compiler keeps its head-group split only when its
cost model says it pays).

The critical path of the schedule (walked back from the last task through the input or resource that
released each task) gives the per-operation breakdown whose sum is the layer's time; the busy time of
every operation is reported beside it.

Not modelled: the compiler does not emit ``hpim`` programs and the SoC has no SRAM-PIM port (the
README's ISA proposal), so there is no RTL run of the whole policy to calibrate against; only the
unit's cycle formula and the performance model's programs are calibrated. The split projection's
weights would take ``groups`` times the DRAM rows of the proj tiles' first chunk (timed at the proj
layout's rows).
"""

from __future__ import annotations

import heapq
import math
import time
from dataclasses import dataclass, field

from firmware.compiler import LayerCompiler, choose_mapping, plan_memory
from firmware.gpt2 import SHAPES, GptShape
from firmware.pim import GemvLayout
from firmware.program import ProgramBuilder, bf16_words, f32_imm, fp32_words, round_up
from hw.config import SystemConfig, preset
from hw.npu.sram_pim import SramPimOp, SramPimUnit
from hw.spec import soc_isa as isa
from hw.spec.soc_isa import SocOp, Unit
from sim.perfmodel import Calib, Memory, PerfModel, decode_program, micro_for
from sim.projection_core import PhaseResult, Projection, project_programs, sample_positions

__all__ = ["SramPimSystem", "HpimCapacityError", "HpimLayer", "Task", "schedule", "critical_path",
           "project_hpim", "HPIM_OPS", "OPS_MAP", "stream_cycles", "capacity_mode", "check_fit", "hpim_tables",
           "hpim_rows"]


@dataclass(frozen=True)
class SramPimSystem:
    """The SRAM-PIM units of the projected system: ``units`` of :class:`SramPimUnit` at the NPU clock.

    Default: one unit per NPU core of the ``ianus`` preset, 16 macros x 1024 rows x 64 BF16 (2 MiB
    per unit, 8 MiB in all, beside the paper's 16 MB of scratchpad per core), 16 MAC lanes per macro
    (256 BF16 MACs per cycle per unit), two read-pipeline registers."""

    units: int = 4
    macros: int = 16
    rows: int = 1024
    word_lanes: int = 64
    mac_lanes: int = 16
    read_latency: int = 2

    @classmethod
    def for_head_dim(cls, head_dim: int) -> SramPimSystem:
        """The default system with rows of the next power of two >= ``head_dim`` BF16 (at least 64), at the
        same capacity (2.5B's head_dim 96: 128-value rows, 512 rows per macro; padding lanes hold zeros)."""
        w = max(64, 1 << (max(1, head_dim) - 1).bit_length())
        return cls(word_lanes=w, rows=cls.rows * cls.word_lanes // w)

    def unit(self) -> SramPimUnit:
        u = SramPimUnit(self.macros, self.rows, self.word_lanes, self.mac_lanes, self.read_latency)
        u._MustUse__used = True          # built for its parameters and timing, never elaborated here
        return u

    @property
    def capacity_bytes(self) -> int:
        return self.units * self.macros * self.rows * self.word_lanes * 2


class HpimCapacityError(ValueError):
    """The K/V a head group needs do not fit the SRAM-PIM units (the message has the numbers)."""


HPIM_OPS = ("ln1", "qkv", "scatter", "kv_stream", "qk", "softmax", "pv", "o_store", "proj", "residual", "ln2",
            "fc1", "fc2", "idle")
OPS_MAP = {"ln1": "vector", "qkv": "qkv", "scatter": "qkv", "kv_stream": "attention", "qk": "attention",
           "softmax": "attention", "pv": "attention", "o_store": "attention", "proj": "proj", "residual": "vector",
           "ln2": "vector", "fc1": "ffn", "fc2": "ffn", "idle": "overhead"}
"""hpim operation -> the projection's breakdown operation (:data:`sim.projection_core.OPS`)."""


# ---------------------------------------------------------------------------------------------
# The schedule
# ---------------------------------------------------------------------------------------------

@dataclass
class Task:
    name: str
    op: str
    res: tuple
    dur: float
    deps: tuple = ()
    events: dict = field(default_factory=dict)
    start: float = 0.0
    end: float = 0.0


def schedule(tasks: list[Task]) -> float:
    """In-order list schedule: each task starts when its resources are free (in list order per resource)
    and its dependencies are done. Fills ``start`` / ``end``; returns the makespan."""
    free, done = {}, {}
    for t in tasks:
        missing = [d for d in t.deps if d not in done]
        if missing:
            raise ValueError(f"task {t.name} depends on {missing[0]}, which is not scheduled before it")
        t.start = max([free.get(r, 0.0) for r in t.res] + [done[d] for d in t.deps] + [0.0])
        t.end = t.start + t.dur
        for r in t.res:
            free[r] = t.end
        done[t.name] = t.end
    return max((t.end for t in tasks), default=0.0)


def critical_path(tasks: list[Task]) -> tuple[dict, list[str]]:
    """(cycles per op on the critical path, the path's task names from first to last). Walks back from
    the task that ends last to whichever of its dependencies and resource predecessors ended last before
    it started; waiting with nothing running on the path is ``idle``. The cycles sum to the makespan."""
    by_name = {t.name: t for t in tasks}
    prev = {}
    last_on = {}
    for t in tasks:
        prev[t.name] = [last_on[r] for r in t.res if r in last_on] + list(t.deps)
        for r in t.res:
            last_on[r] = t.name
    out = {op: 0.0 for op in HPIM_OPS}
    path = []
    cur = max(tasks, key=lambda t: t.end) if tasks else None
    while cur is not None:
        path.append(cur.name)
        out[cur.op] = out.get(cur.op, 0.0) + cur.dur
        cands = [by_name[n] for n in prev[cur.name] if by_name[n].end <= cur.start + 1e-9]
        nxt = max(cands, key=lambda t: t.end, default=None)
        gap = cur.start - (nxt.end if nxt is not None else 0.0)
        if gap > 1e-9:
            out["idle"] += gap
        cur = nxt
    return out, path[::-1]


# ---------------------------------------------------------------------------------------------
# K/V streaming through the memory model
# ---------------------------------------------------------------------------------------------

def stream_cycles(cfg: SystemConfig, engines: list[list[tuple[int, int]]], per_npu_cycle: float,
                  outstanding: int) -> tuple[float, dict]:
    """DRAM cycles to read ``engines[e]`` = [(address, bytes), ...] (32-byte requests, one engine per list,
    all starting at cycle 0, each issuing ``per_npu_cycle`` requests per NPU cycle with at most
    ``outstanding`` in flight) on a fresh :class:`sim.perfmodel.Memory`; and its DRAM events."""
    micro = micro_for(cfg)
    mem = Memory(cfg, micro, Calib())
    gap = cfg.clocks.pim_mhz / cfg.clocks.npu_mhz / per_npu_cycle
    reqs = [[a + 32 * k for a, n in lst for k in range(-(-n // 32))] for lst in engines]
    heap = [(0.0, e, 0) for e, r in enumerate(reqs) if r]
    inflight = [[] for _ in reqs]
    last = 0.0
    while heap:
        t, e, i = heapq.heappop(heap)
        fl = inflight[e]
        if len(fl) >= outstanding:
            t = max(t, fl[len(fl) - outstanding] + 1)
        r = mem.request(reqs[e][i], False, t)
        fl.append(r)
        if len(fl) > 2 * outstanding:
            del fl[:outstanding]
        last = max(last, r)
        if i + 1 < len(reqs[e]):
            heapq.heappush(heap, (t + gap, e, i + 1))
    c = {k: sum(ch.c[k] for ch in mem.ch) for k in ("reads", "acts", "refreshes")}
    return last, {"dram_reads": c["reads"], "dram_acts": c["acts"], "dram_refs": c["refreshes"],
                  "dma_bytes": 32 * c["reads"]}


# ---------------------------------------------------------------------------------------------
# Capacity
# ---------------------------------------------------------------------------------------------

def kv_block(cfg: SystemConfig, shape: GptShape) -> int:
    """Positions per block of the block-cyclic split of the keys over the units: one DRAM row of a head's
    K (or V) cache."""
    return max(1, cfg.pim.row_bytes // (2 * shape.head_dim))


def unit_keys(tokens: int, units: int, block: int) -> int:
    """Keys the fullest unit holds when position ``p`` goes to unit ``(p // block) % units``."""
    blocks = tokens // block
    return (blocks // units) * block + min(block, max(0, tokens - (blocks // units) * units * block))


def capacity_mode(system: SramPimSystem, shape: GptShape, hpg: int, tokens: int, block: int = 16) -> str:
    """``"resident"`` when every layer's K and V of ``tokens`` positions fit the units, ``"streamed"`` when a
    head group's (``hpg`` heads) fit twice (double buffering; once when the group is all the heads); else
    :class:`HpimCapacityError` with the numbers. The positions go to the units block-cyclically (``block``
    positions at a time, :func:`kv_block`)."""
    s = system
    if shape.head_dim > s.word_lanes:
        raise HpimCapacityError(f"hpim: head_dim {shape.head_dim} exceeds the SRAM-PIM row of {s.word_lanes} BF16 "
                                f"values (word_lanes)")
    keys = unit_keys(tokens, s.units, block)
    per_head = 2 * -(-keys // s.macros)                   # rows of one head's K and V in the fullest unit
    if shape.layers * shape.heads * per_head <= s.rows:
        return "resident"
    buffers = 2 if hpg < shape.heads else 1
    need = buffers * hpg * per_head
    if need > s.rows:
        raise HpimCapacityError(
            f"hpim: K and V of {hpg} heads x {tokens} positions (up to {keys} per unit), "
            f"{'double-buffered' if buffers == 2 else 'one group'}, need "
            f"{need} rows per macro ({s.macros} macros of {s.word_lanes} BF16 per unit, {s.units} units); the "
            f"SRAM-PIM units have {s.rows} rows")
    return "streamed"


def check_fit(cfg: SystemConfig, shape: GptShape, tokens: int, system: SramPimSystem | None = None) -> str:
    """:func:`capacity_mode` for a model on ``cfg`` (its head-group size from the compiler's memory plan)."""
    one = GptShape(shape.d_model, shape.heads, 1, shape.eps)
    return capacity_mode(system or SramPimSystem.for_head_dim(shape.head_dim), shape, plan_memory(cfg, one, tokens, pim_layout=True).hpg, tokens,
                         kv_block(cfg, shape))


# ---------------------------------------------------------------------------------------------
# One generation step of one layer
# ---------------------------------------------------------------------------------------------

class HpimLayer:
    """Builds and times the tasks of one layer's generation step under ``hpim`` (see the module docstring)."""

    def __init__(self, cfg: SystemConfig, shape: GptShape, max_tokens: int, system: SramPimSystem | None = None,
                 n_in: int = 1):
        self.cfg, self.shape = cfg, shape
        self.sys = system or SramPimSystem.for_head_dim(shape.head_dim)
        self.unit = self.sys.unit()
        one = GptShape(shape.d_model, shape.heads, 1, shape.eps)
        self.plan = plan_memory(cfg, one, max_tokens, pim_layout=True)
        mapping = choose_mapping(cfg, one, "ianus", n_in)
        self.lc = LayerCompiler(self.plan, "ianus", mapping)
        self.lc._layer = 0
        self.model = PerfModel(cfg, micro_for(cfg))
        self.k = cfg.clocks.pim_mhz / cfg.clocks.npu_mhz       # DRAM cycles per NPU cycle
        self.hpg = self.plan.hpg
        self.groups = shape.heads // self.hpg
        self.max_tokens = max_tokens
        self.block = kv_block(cfg, shape)
        self.mode = self.check_capacity(max_tokens)
        self._cache = {}

    # -- capacity ------------------------------------------------------------------------------
    def keys_per_unit(self, tokens: int) -> int:
        """Keys of every head the fullest unit holds (block-cyclic split, :func:`unit_keys`)."""
        return unit_keys(tokens, self.sys.units, self.block)

    def check_capacity(self, tokens: int) -> str:
        return capacity_mode(self.sys, self.shape, self.hpg, tokens, self.block)

    # -- programs ------------------------------------------------------------------------------
    def _time(self, key, build) -> tuple[float, dict]:
        if key is not None and key in self._cache:
            return self._cache[key]
        pb = ProgramBuilder(self.cfg)
        build(pb)
        pb.end()
        r = self.model.run_program(None, ins=decode_program(pb.words))
        out = (float(r.cycles), dict(r.events))
        if key is not None:
            self._cache[key] = out
        return out

    def _stage(self, name, pos):
        key = (name,)
        if key not in self._cache:
            st = self.lc.stage(0, "gen", name, 1, pos)
            r = self.model.run_program(None, ins=decode_program(st.words))
            self._cache[key] = (float(r.cycles), dict(r.events))
        return self._cache[key]

    def _qkv(self, g):
        cfg, lp, b = self.cfg, self.plan.layers[0], self.plan.buffers
        d, ng = self.shape.d_model, 3 * self.shape.head_dim * self.hpg
        tiles = ng // lp.qkv.per_tile

        def build(pb):
            lay = GemvLayout(cfg, d, ng, base_row=lp.qkv.base_row + g * tiles * lp.qkv.chunks)
            self.lc.fc_pim(pb, b["h"], d, lay, ng, lp.qkv_b + g * ng * 4, b["qkv"] + g * ng * 2, bf16=True,
                           write_vec=(g == 0))
            pb.fence(Unit.PCU)
        return self._time(("qkv", g == 0), build)

    def _proj(self, g):
        cfg, lp, b = self.cfg, self.plan.layers[0], self.plan.buffers
        d, kg = self.shape.d_model, self.shape.head_dim * self.hpg
        lay = GemvLayout(cfg, kg, d, base_row=lp.proj.base_row)

        def build(pb):
            self.lc.fc_pim(pb, b["o"] + g * kg * 2, kg, lay, d, lp.proj_b if g == 0 else b["y"], b["y"])
            pb.fence(Unit.PCU)
        return self._time(("proj", g == 0), build)

    def _scatter(self, g, pos):
        """The compiler's scatter of the group's QKV rows (BF16, bias added by the GEMV) without its Q stores:
        K and V into the DRAM KV cache; Q and the new K, V rows go to the units on chip, from the vector
        scratchpad."""
        q0, q1 = self.plan.buffers["q"], self.plan.buffers["q"] + self.plan.max_tokens * self.shape.d_model * 2
        heads = range(g * self.hpg, (g + 1) * self.hpg)

        def build(pb):
            self.lc.scatter_qkv(pb, self.plan.layers[0], 1, pos, False, heads, False)
            pb.words = [w for w in pb.words
                        if not ((w & 0xF) == SocOp.VSTORE and q0 <= isa.decode(w, 0)["mem_addr"] < q1)]
            pb.fence(Unit.VQ)
        return self._time(("scatter", g, pos), build)

    def _softmax(self, pos):
        hd = self.shape.head_dim
        Lp = round_up(pos + 1, 16)

        def build(pb):
            L = pb.L
            pb.spm_reset()
            for _h in range(self.hpg):
                top = pb.spm_top
                X = pb.spm(fp32_words(L, Lp))
                P = pb.spm(bf16_words(L, Lp))
                pb.vec(op="SCALE", a=X, d=X, n=Lp, rows=1, a_fmt="FP32", d_fmt="FP32",
                       imm0=f32_imm(1.0 / math.sqrt(hd)), imm1=0x80000000)
                pb.vec(op="SOFTMAX", a=X, d=P, n=Lp, rows=1, a_fmt="FP32", d_fmt="BF16", mask="CAUSAL", pos=pos)
                pb.spm_top = top
            pb.fence(Unit.VQ)
        return self._time(("softmax", pos), build)

    def _o_store(self, g):
        """Sum the units' partial outputs of the group (FP32, on the vector unit), round to BF16, store."""
        b, kg, U = self.plan.buffers, self.shape.head_dim * self.hpg, self.sys.units

        def build(pb):
            L = pb.L
            pb.spm_reset()
            X = [pb.spm(fp32_words(L, kg)) for _ in range(U)]
            O = pb.spm(bf16_words(L, kg))
            if U == 1:
                pb.vec(op="SCALE", a=X[0], d=O, n=kg, rows=1, a_fmt="FP32", d_fmt="BF16", imm0=f32_imm(1.0), imm1=0)
            for u in range(1, U):
                last = u == U - 1
                pb.vec(op="ADD", a=X[0], b=X[u], d=O if last else X[0], n=kg, rows=1, a_fmt="FP32", b_fmt="FP32",
                       d_fmt="BF16" if last else "FP32", b_mode="ROW")
            pb.vdma(False, b["o"] + g * kg * 2, kg * 2, 1, kg * 2, O, bf16_words(L, kg))
            pb.fence(Unit.VQ)
        return self._time(("o_store", g), build)

    def _residual(self, pos):
        d, b, lp = self.shape.d_model, self.plan.buffers, self.plan.layers[0]
        return self._time(("residual",), lambda pb: (
            self.lc.residual(pb, lp.x_in + pos * d * 4, b["y"], 1, None, b["x2"]), pb.fence(Unit.VQ)))

    def _kv_stream(self, g, pos):
        """(DRAM cycles, events) to bring group ``g``'s K and V rows ``0 .. pos - 1`` into the units: unit ``u``'s
        engine reads the positions of blocks ``b`` with ``b % units == u``, position-major over the group's K and
        V caches (a 3-D DMA)."""
        if self.mode == "resident" or pos == 0:
            return 0.0, {}
        if ("kv", g, pos) in self._cache:
            return self._cache[("kv", g, pos)]
        lp, hd, s = self.plan.layers[0], self.shape.head_dim, self.sys
        regions = [cache[h] for h in range(g * self.hpg, (g + 1) * self.hpg) for cache in (lp.kc, lp.vc)]
        engines = [[] for _ in range(s.units)]
        for p in range(pos):
            engines[(p // self.block) % s.units] += [(a + p * hd * 2, hd * 2) for a in regions]
        micro = micro_for(self.cfg)
        rate = min(micro.dma_issue, 2 * s.word_lanes / 32)          # the unit writes one row per cycle
        cyc, ev = stream_cycles(self.cfg, [e for e in engines if e], rate, micro.dma_outstanding)
        ev["sram_pim_wr_bytes"] = 2 * self.hpg * pos * 2 * s.word_lanes
        self._cache[("kv", g, pos)] = (cyc, ev)
        return cyc, ev

    def _sram(self, op, pos):
        """DRAM cycles of one QK or PV command per unit over the group's heads (units in parallel, each on its
        blocks of keys; the new token's key included)."""
        c = self.keys_per_unit(pos + 1)
        cyc = self.unit.command_cycles(op, c, self.hpg) * self.k
        ev = {"sram_pim_mac": self.hpg * self.unit.macs(pos + 1)}
        if op == SramPimOp.QK:                # the new K and V rows of the group (one per head)
            ev["sram_pim_wr_bytes"] = 2 * self.hpg * 2 * self.sys.word_lanes
        return cyc, ev

    # -- the layer -------------------------------------------------------------------------------
    def tasks(self, pos: int, split_proj: bool = True) -> list[Task]:
        """The tasks of the generation step of the token at position ``pos`` (keys ``0 .. pos``).
        ``split_proj``: the projection per head group (bias-chained partial GEMVs) right after the group's
        attention; otherwise the ``ianus`` proj stage (one GEMV + residual) after the last group."""
        G = self.groups
        T = []

        def add(name, op, res, timed, deps=()):
            dur, ev = timed
            T.append(Task(name, op, tuple(res), dur, tuple(deps), ev))

        add("ln1", "ln1", ("chan", "vec"), self._stage("ln1", pos))

        def front(g):
            add(f"kv{g}", "kv_stream", ("chan",), self._kv_stream(g, pos), ("ln1",))
            add(f"qkv{g}", "qkv", ("chan",), self._qkv(g), ("ln1",))

        front(0)
        add("scatter0", "scatter", ("chan", "vec"), self._scatter(0, pos), ("qkv0",))
        for g in range(G):
            if g + 1 < G:
                front(g + 1)
            add(f"qk{g}", "qk", ("sram",), self._sram(SramPimOp.QK, pos), (f"kv{g}", f"scatter{g}"))
            add(f"softmax{g}", "softmax", ("vec",), self._softmax(pos), (f"qk{g}",))
            add(f"pv{g}", "pv", ("sram",), self._sram(SramPimOp.PV, pos), (f"softmax{g}",))
            if g + 1 < G:
                add(f"scatter{g + 1}", "scatter", ("chan", "vec"), self._scatter(g + 1, pos), (f"qkv{g + 1}",))
            add(f"o_store{g}", "o_store", ("chan", "vec"), self._o_store(g), (f"pv{g}",))
            if split_proj:
                add(f"proj{g}", "proj", ("chan",), self._proj(g),
                    (f"o_store{g}",) + ((f"proj{g - 1}",) if g else ()))
        if split_proj:
            add("residual", "residual", ("chan", "vec"), self._residual(pos), (f"proj{G - 1}",))
        else:
            add("proj", "proj", ("chan", "vec"), self._stage("proj", pos), tuple(f"o_store{g}" for g in range(G)))
        add("ln2", "ln2", ("chan", "vec"), self._stage("ln2", pos), (T[-1].name,))
        add("fc1", "fc1", ("chan",), self._stage("fc1", pos), ("ln2",))
        add("fc2", "fc2", ("chan", "vec"), self._stage("fc2", pos), ("fc1",))
        return T

    def step(self, pos: int, split_proj: bool | None = None) -> dict:
        """Schedule one step: makespan, critical-path and busy cycles per op, events, the tasks. With
        ``split_proj`` None both projection variants are scheduled and the faster is kept (as the ``ianus``
        compiler keeps its head-group split only when it pays); ``alternative`` is the other's makespan."""
        if split_proj is None:
            a, b = self.step(pos, True), self.step(pos, False)
            best, other = (a, b) if a["cycles"] <= b["cycles"] else (b, a)
            best["alternative"] = other["cycles"]
            return best
        T = self.tasks(pos, split_proj)
        span = schedule(T)
        crit, path = critical_path(T)
        busy = {op: 0.0 for op in HPIM_OPS}
        events = {}
        for t in T:
            busy[t.op] += t.dur
            for k, v in t.events.items():
                events[k] = events.get(k, 0) + v
        return {"cycles": span, "critical": crit, "busy": busy, "events": events, "tasks": T, "path": path,
                "mode": self.mode, "split_proj": split_proj}


# ---------------------------------------------------------------------------------------------
# Projection
# ---------------------------------------------------------------------------------------------

def project_hpim(name: str, n_in: int, n_out: int, cfg: SystemConfig | None = None, samples: int = 16,
                 shape: GptShape | None = None, progress=None, system: SramPimSystem | None = None, base=None):
    """:class:`sim.projection_core.Projection` of policy ``hpim``: summarization as ``ianus`` (the same programs:
    prefill does not use the SRAM-PIM units; ``base``, an ``ianus`` projection of the same model and input,
    lends its summarization instead of simulating it again), every sampled generation step from
    :class:`HpimLayer`."""
    t0 = time.perf_counter()
    cfg = cfg or preset("ianus")
    shape = shape or SHAPES[name]
    if base is None:
        base = project_programs(name, "ianus", n_in, 1, cfg, samples=samples, shape=shape, progress=progress)
    elif (base.policy, base.n_in, base.shape) != ("ianus", n_in, shape):
        raise ValueError(f"base must be an ianus projection of {shape} with input {n_in}, not {base.policy} "
                         f"{base.shape} input {base.n_in}")
    layer = HpimLayer(cfg, shape, n_in + max(n_out, 1), system, n_in=n_in)
    gen = {}
    for t in sample_positions(n_out, samples):
        st = layer.step(n_in + t - 1)
        r = PhaseResult()
        r.cycles = st["cycles"]
        for op, v in st["critical"].items():
            r.breakdown[OPS_MAP[op]] = r.breakdown.get(OPS_MAP[op], 0.0) + v
        r.events = st["events"]
        r.stages = {f"hpim:{op}": v for op, v in st["critical"].items() if v}
        r.stage_events = {}
        for task in st["tasks"]:
            se = r.stage_events.setdefault(f"hpim:{task.op}", {})
            for k, v in task.events.items():
                se[k] = se.get(k, 0) + v
        r.hpim = st
        gen[t] = r
        if progress:
            progress()
    return Projection(name, "hpim", n_in, shape, cfg, base.prefill, gen, time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------

def hpim_rows(p, n_out: int, ianus=None) -> dict:
    """Per generated token (all layers, averaged over the ``n_out - 1`` steps): ms, and per hpim operation
    the ms on the critical path and busy; ``ianus``: the same model's ``ianus`` projection for the speedup."""
    steps = max(1, n_out - 1)
    s = p.summary(n_out)
    tot = p.gen_total(n_out)
    ms = 1e-3 / p.mhz * p.shape.layers / steps          # cycles per layer summed over the steps -> ms/token
    crit = {op: tot.stages.get(f"hpim:{op}", 0.0) * ms for op in HPIM_OPS}
    samples = [p.gen[t].hpim for t in sorted(p.gen)]
    busy = {op: sum(x["busy"][op] for x in samples) / len(samples) * p.shape.layers * 1e-3 / p.mhz
            for op in HPIM_OPS}
    row = {"model": p.model, "input": p.n_in, "output": n_out, "gen_ms_per_token": s["gen_ms_per_token"],
           "mode": samples[0]["mode"], "split_proj": sum(x["split_proj"] for x in samples) / len(samples),
           "critical_ms": crit, "busy_ms": busy, "summarization_ms": s["summarization_ms"],
           "gen_mJ_per_token": s["gen_mJ_per_token"]}
    if ianus is not None:
        si = ianus.summary(n_out)
        row["ianus_gen_ms_per_token"] = si["gen_ms_per_token"]
        row["hpim_gen_speedup_vs_ianus"] = si["gen_ms_per_token"] / s["gen_ms_per_token"]
    return row


def hpim_tables(projections: dict, n_out: int) -> list:
    """Rich tables for ``ianus project``: hpim against ianus, and where the pipeline's time goes per token."""
    from rich.table import Table

    rows = [hpim_rows(p, n_out, projections.get((m, "ianus", i))) for (m, pol, i), p in projections.items()
            if pol == "hpim" and n_out > 1]
    t1 = Table(title=f"hpim (SRAM-PIM attention + DRAM-PIM FCs, intra-token pipeline), output {n_out}")
    for c in ("model", "in", "K/V", "proj split", "hpim ms/token", "ianus ms/token", "speedup", "mJ/token"):
        t1.add_column(c, justify="right")
    t2 = Table(title="hpim per generated token: ms on the critical path (busy ms)")
    t2.add_column("model / in")
    ops = [op for op in HPIM_OPS if any(r["busy_ms"][op] or r["critical_ms"][op] for r in rows)]
    for op in ops:
        t2.add_column(op, justify="right")
    for r in rows:
        sp = r.get("hpim_gen_speedup_vs_ianus")
        t1.add_row(r["model"], str(r["input"]), r["mode"], f"{r['split_proj']:.0%}", f"{r['gen_ms_per_token']:.3f}",
                   f"{r['ianus_gen_ms_per_token']:.3f}" if sp else "-", f"{sp:.2f}x" if sp else "-",
                   f"{r['gen_mJ_per_token']:.2f}")
        t2.add_row(f"{r['model']} {r['input']}", *[f"{r['critical_ms'][op]:.3f} ({r['busy_ms'][op]:.3f})" for op in ops])
    return [t1, t2]
