"""NeuPIMs batched generation in the projection (issue 18, projection side): ``ianus project --system neupims``.

B requests generate one token each per step; each request has its own KV length. Three policies on the same
hardware model:

``npu-only``
    Everything on the NPU (``ianus`` preset, one row buffer; PIM unused): QKV, projection and FFN as GEMMs of
    B rows on the matrix unit, each request's attention (``K^T q``, softmax, ``P V``) on the matrix and vector
    units, weights and KV caches streamed by the NPU's DMA over the external bandwidth (channel-interleaved
    every 256 B, the ``npu-mem`` mapping).
``naive``
    The GEMMs as ``npu-only``; each request's attention in PIM (``ianus`` preset, one row buffer): the two
    GEMVs over its own KV cache in the PIM layout, softmax on the vector unit. A macro PIM command holds its
    channel (one row buffer), so the NPU's memory traffic and PIM are serialized: the step is NPU stage, then
    attention, per layer.
``neupims``
    ``neupims`` preset (``row_buffers = 2``): the NPU's memory traffic proceeds while PIM computes attention;
    the batch is split into two sub-batches per channel and interleaved (NeuPIMs' stage program, below), the
    partition chosen by the cost model among: no split, halves per channel (NeuPIMs' ``partition_lists_simple``
    default) and halves balanced by attention latency per channel (NeuPIMs' ``partition_lists_dp``, greedily).

**What is timed, and by what.**

* *NPU stage of b rows* (``ln1``, QKV GEMM, projection GEMM + residual, ``ln2``, FC1 GEMM + GELU, FC2 GEMM +
  residual): programs built by the compiler's own code (:class:`firmware.compiler.LayerCompiler`, policy
  ``npu-mem``: its prefill stages with ``rows = b`` are exactly the batched FCs and vector work of a generation
  step) and timed by the calibrated performance model (:mod:`sim.perfmodel`), normal traffic interleaved every
  ``npu_interleave`` bytes (256 at paper scale; 0, the configuration's own map, on the RTL's small cases).
* *What the batched firmware adds* (:mod:`firmware.batch`; its programs timed on the performance model by
  :mod:`sim.neupims_fw`, per request the marginal cost in a batch of requests with their own KV allocations,
  sampled at a few lengths and interpolated): in the ``qkv`` stage each request's scatter (bias, Q row, its K
  and V rows into its own caches: a VSTORE per head each) and, in PIM policies, its V^T append (an identity
  GEMM on the matrix unit, a column write per head and tile); npu-only's attention over each request's own
  caches in one program (consecutive requests' loads and softmax overlap); the PIM attention as the firmware
  issues it: per request and head six macros (WRITE_VEC of q from DRAM, the scores GEMV over the packed K,
  READ_RES of the FP32 scores to DRAM, WRITE_VEC of the probabilities, the ``P V`` GEMV over the packed V^T,
  READ_RES of the outputs), each a PCU command with its queue latency and hand-over, and the softmax between
  them on the vector unit with its own DRAM round trip (VLOAD, SCALE, SOFTMAX per head, VSTORE), software
  pipelined (PIM computes the next request's scores while the vector unit normalises this one; ``P V`` waits
  for the softmax). A stream of requests costs the first one's ``start`` plus every request's ``marginal``.
  The analytic GEMV bound this replaced (:func:`segmented_gemv` over the layout below) left out the transfers,
  the hand-overs, the DRAM round trip of the softmax and the appends: on the RTL's B = 8 case it put naive's
  attention at 35.5k cycles against 103k and its qkv stage 82k short (``tests/test_neupims_model.py``).
* *Layouts* (``pim_layout``). ``channel`` (paper scale): NeuPIMs keeps each request's K and V in one channel
  (``request->K_cache`` with channel ``ch`` in ``Scheduler::allocate_requests``) and schedules each channel's
  PIM commands on its own: the firmware's attention timed on a one-channel configuration, the channels' streams
  in parallel, attention of a set of requests = ``max(busiest channel's stream, every softmax + the shortest
  request's PIM work)`` (the vector unit is shared). ``spread`` (the RTL, :mod:`firmware.batch` on
  :mod:`hw.pcu`): a request's tokens over all channels, one PCU driving them all, the requests one stream.
  The analytic layout (:func:`scores_segs`, :func:`pv_segs`; K: position ``p`` in bank ``p % banks``, V:
  dimension ``c`` in bank ``c % banks``, positions along the row in granules of 128) still sizes the caches
  (:func:`kv_rows_per_bank`) and balances the channels (:meth:`NeuPimsModel.pim_request`). Beyond the global
  buffer's 1,024 values (V^T in one input chunk, the firmware's limit) the PIM samples are extrapolated.
* *Concurrency with two row buffers* (:func:`phase_cycles`): while PIM runs attention in a channel, the NPU's
  normal requests get the command-bus slots the PIM stream leaves free, ``s = 1 - (PIM commands / PIM
  cycles)``, and PIM is not slowed (``arbitration = pim_first``). Checked against the RTL: for the 768x3072
  GEMV of the ``dualrb`` bench this gives s = 0.53 against the measured 0.57 share, GEMV not slowed (README,
  "NeuPIMs dual row buffers"). The NPU stage's DRAM-bound share ``phi`` (its 32-byte accesses per channel over
  its cycles, from the performance model's events) dilates by ``1 / s``; its compute does not. The vector unit
  is shared: a phase lasts at least the NPU stage's vector work plus the other sub-batch's softmax.
* *Sub-batch interleaving*: NeuPIMs' stage program (``src/StageProgram.cc``: A: QKV#1 | -, B: QKV#2 | MHA#1,
  C: Pj/FFN/QKV#1 | MHA#2, D: Pj/FFN/QKV#2 | MHA#1, E: Pj/FFN#1 | MHA#2, F: Pj/FFN#2 | -); over ``layers``
  layers ``pre1 + ph(pre2, A1) + (layers - 1) (ph(N1, A2) + ph(N2, A1)) + ph(post1, A2) + post2``, ``N = pre
  + post`` the NPU stage of a sub-batch (``pre`` = ln1 + QKV, ``post`` = projection, ln2, FFN). Each
  sub-batch's GEMMs stream the weights again: the price of interleaving, which the cost model weighs.

**Hardware and workload assumptions.**

* Devices: the ``ianus`` / ``neupims`` presets (8 channels x 16 banks x 2 KB rows, 8 GB, 4 NPU cores of a
  128x64x4 array at 700 MHz). GPT-3 7B weights alone (12.9 GB BF16) exceed one device, so a model runs
  tensor-parallel over D devices with sequence parallelism (Megatron-LM: heads and FC columns split over the
  devices, layernorm, residual, bias and GELU work split over the batch rows, the all-reduces replaced by
  reduce-scatter + all-gather of the same bytes), so every operation's work divides by D and only the
  per-program overhead does not (:func:`sim.projection_core.scale_devices` keeps the vector work whole: a batch-1
  convention; at batch 256 on 16 devices the replicated layernorms would outweigh the GEMMs). D = the smallest
  divisor of the head count with which the largest batch fits (``--devices`` sets it).
  NeuPIMs runs 7B and 13B with ``n_tp = 4``, 30B with ``n_tp = 4, n_pp = 2`` on 32 GB HBM devices
  (``configs/model_configs``, ``configs/memory_configs/neupims.json``); our devices hold a quarter of that.
* Inter-device communication: the two all-reduces per layer over PCIe 5.0 x16
  (:func:`sim.projection_core.allreduce_s`) are reported separately (``tokens/s with link``) and left out of the
  headline ratios: NeuPIMs' simulator has no inter-device link (``src`` has no all-reduce), so its ratios are
  per device; with the link the same for every policy, it dilutes all ratios towards 1.
* Models: GPT-3 7B (d 4096, 32 heads, 32 layers), 13B (5120, 40, 40), 30B (7168, 56, 48), FFN 4 d, head_dim
  128, BF16 weights and KV (NeuPIMs ``trace-generator/get_distributions.py``). LM head and embedding not
  counted (as :mod:`sim.project`).
* Request lengths: the KV length of each request at the modelled step, log-normal with median 217 and sigma
  0.75, clipped to [1, 2048], seed 0 (:func:`request_lengths`). Fitted by hand to NeuPIMs' ShareGPT trace
  ``request-traces/clb/share-gpt2-bs512-ms7B-tp4-clb-0.csv`` (512 sequence lengths: median 216.5, mean 300,
  p10 58, p25 117, p75 373, p90 566, max 2048); the fit gives median 217, mean ~290, p10 83, p25 131, p90 566.
  One step is modelled at these lengths (a snapshot of continuous batching; admission and completion are not).
* Capacity (:func:`check_capacity`): per device, the FC weights (BF16) and biases / layernorm parameters (FP32)
  spread over the channels, and every request's K and V rows (the layout above, ``layers`` layers, the device's
  heads, including the new token) in its channel; a request goes to the least-loaded channel (NeuPIMs' greedy
  channel load balancing, ``trace-generator/channel_load_balancing.py``) that has room. If a request finds no
  channel with room, :class:`NeuPimsCapacityError` names the numbers; the CLI prints ``does not fit``.
* Not modelled: the NPU prefetching weights during attention under ``naive``; the matrix unit's and the vector unit's contention between the two sub-batches beyond the
  vector-unit bound above; prefill (summarization) of new requests.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np

from firmware.compiler import LayerCompiler, kv_layout, plan_memory
from firmware.gpt2 import GptShape
from firmware.program import ProgramBuilder, round_up
from hw.config import SystemConfig, preset
from sim.neupims_fw import append_sample, attention_sample, interp, npu_attention_sample, pim_config, samples
from sim.perfmodel import PerfModel, decode_program, micro_for, stage_tags
from sim.projection_core import allreduce_s

__all__ = ["MODELS", "BATCHES", "POLICIES", "NeuPimsCapacityError", "Seg", "segmented_gemv", "scores_segs", "pv_segs",
           "kv_rows_per_bank", "request_lengths", "NeuPimsModel", "phase_cycles", "interleaved_cycles",
           "choose_devices", "throughput_rows", "NPU_ATT_SAMPLES"]

MODELS = {"7b": GptShape(4096, 32, 32), "13b": GptShape(5120, 40, 40), "30b": GptShape(7168, 56, 48)}
BATCHES = (64, 128, 256, 512)
POLICIES = ("npu-only", "naive", "neupims")
MAX_SEQ = 2048
LEN_MEDIAN, LEN_SIGMA = 217.0, 0.75
V_GRANULE = 128
"""Positions per allocation granule of a head's V rows (8 columns of 16 BF16)."""
NPU_ATT_SAMPLES = (16, *range(32, 512, 32), *range(512, 2049, 128))
"""Lengths at which npu-only's attention is timed: its cost steps where the caches cross DRAM rows (+15 % from
256 to 257 keys on ``default``), so every 32 keys up to 512 and every 128 beyond."""


class NeuPimsCapacityError(ValueError):
    """The weights and KV caches of a batch do not fit the devices (the message has the numbers)."""


# ---------------------------------------------------------------------------------------------
# PIM GEMV timing over the KV-cache layout
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Seg:
    """A run of ``n`` MAC columns into every bank's accumulator of a channel, followed by reading the
    accumulators out (RDMAC) and preloading them (WRBIAS). ``new_row``: it opens a DRAM row (PRE, ACT);
    ``gb``: global-buffer columns written (WRGB) before it (0: the buffer already holds its inputs)."""
    n: int
    new_row: bool
    gb: int = 0


def segmented_gemv(cfg: SystemConfig, segs: list[Seg]) -> dict:
    """Lower bound on the cycles of a sequence of segments on one channel: the recurrence of
    :func:`firmware.pim.gemv_lower_bound` (bank path ``tRTP + tRP + tRCD + (n-1) tCCD`` only when the segment
    opens a row, accumulator path ``tMAC + 2 groups tCCD + (n-1) tCCD``, bus path ``(2 + 2 groups + gb + n)
    tCCD`` when it rewrites the global buffer; first segment ``max(tRCD + (n-1) tCCD, (groups + gb + n) tCCD)``,
    the last results ``tMAC + groups tCCD + tRL`` after the last MAC; one command per cycle on the bus).
    Returns ``cycles``, ``amortized_cycles`` (refresh at its steady-state rate) and ``commands``."""
    t, g = cfg.timing, cfg.pim.acc_groups
    if not segs:
        return {"cycles": 0.0, "amortized_cycles": 0.0, "commands": 0}
    s0 = segs[0]
    total = max(t.tRCDRD + (s0.n - 1) * t.tCCD, (g + s0.gb + s0.n) * t.tCCD)
    col, rows = 0, 0
    for i, s in enumerate(segs):
        col += s.n + 2 * g + s.gb
        rows += 1 if s.new_row else 0
        if i == 0:
            continue
        bank = t.tRTP + t.tRP + t.tRCDRD + (s.n - 1) * t.tCCD if s.new_row else 0
        acc = t.tMAC + 2 * g * t.tCCD + (s.n - 1) * t.tCCD
        bus = (2 + 2 * g + s.gb + s.n) * t.tCCD if s.gb else 0
        total += max(bank, acc, bus)
    total += t.tMAC + g * t.tCCD + t.tRL
    bus = col * t.tCCD + 2 * rows
    cyc = max(total, bus)
    rf = t.tREFI / (t.tREFI - t.tRFC)
    return {"cycles": cyc, "amortized_cycles": cyc * rf, "commands": col + 2 * rows}


def _cols(cfg, values: int) -> int:
    return -(-values // cfg.pim.lanes)


def scores_segs(cfg: SystemConfig, hd: int, L: int) -> list[Seg]:
    """``K^T q`` of one head over ``L`` keys (K layout of the module docstring)."""
    p = cfg.pim
    n = _cols(cfg, hd)
    if n > p.columns or hd > p.gb_values:
        raise ValueError(f"head_dim {hd} exceeds a row / the global buffer of {cfg.name!r}")
    spr = p.columns // n
    tiles = -(-L // p.banks)
    return [Seg(n, i % spr == 0, n if i == 0 else 0) for i in range(tiles)]


def pv_segs(cfg: SystemConfig, hd: int, L: int) -> list[Seg]:
    """``P V`` of one head over ``L`` keys (V layout of the module docstring)."""
    p = cfg.pim
    tiles = -(-hd // p.banks)
    if L <= p.gb_values:
        n = _cols(cfg, L)
        granule = _cols(cfg, round_up(L, V_GRANULE))
        spr = max(1, p.columns // granule)
        return [Seg(n, i % spr == 0, n if i == 0 else 0) for i in range(tiles)]
    chunks = -(-L // p.gb_values)
    out = []
    for c in range(chunks):
        n = _cols(cfg, min(p.gb_values, L - c * p.gb_values))
        out += [Seg(n, True, n if t == 0 else 0) for t in range(tiles)]
    return out


def kv_rows_per_bank(cfg: SystemConfig, hd: int, L: int) -> int:
    """DRAM rows per bank that one head's K and V of ``L`` positions take in its channel."""
    p = cfg.pim
    n = _cols(cfg, hd)
    k_rows = -(-L // (p.banks * (p.columns // n)))
    tiles = -(-hd // p.banks)
    if L <= p.gb_values:
        spr = max(1, p.columns // _cols(cfg, round_up(L, V_GRANULE)))
        v_rows = -(-tiles // spr)
    else:
        v_rows = tiles * -(-L // p.gb_values)
    return k_rows + v_rows


# ---------------------------------------------------------------------------------------------
# Workload
# ---------------------------------------------------------------------------------------------

def request_lengths(batch: int, seed: int = 0) -> np.ndarray:
    """KV lengths (keys attended, the new token included) of ``batch`` requests: log-normal, median
    :data:`LEN_MEDIAN`, sigma :data:`LEN_SIGMA`, clipped to [1, :data:`MAX_SEQ`] (see the module docstring)."""
    rng = np.random.default_rng(seed)
    x = rng.lognormal(math.log(LEN_MEDIAN), LEN_SIGMA, size=batch)
    return np.clip(np.rint(x), 1, MAX_SEQ).astype(int)


def weight_bytes(shape: GptShape) -> int:
    d, f = shape.d_model, shape.ffn
    per_layer = 2 * (3 * d * d + d * d + d * f + f * d) + 4 * (3 * d + d + f + d + 4 * d)
    return per_layer * shape.layers


# ---------------------------------------------------------------------------------------------
# Concurrency and interleaving
# ---------------------------------------------------------------------------------------------

def phase_cycles(npu: dict, att: dict | None, dual: bool = True) -> float:
    """One phase: the NPU stage ``npu`` ({cycles, mem_share phi, vector}) beside PIM attention ``att``
    ({cycles, bus_util u, softmax}); see the module docstring. With ``dual`` False (one row buffer) they are
    serialized."""
    N = npu["cycles"]
    if not att or att["cycles"] <= 0:
        return N
    A = att["cycles"]
    if not dual:
        return N + A
    s = max(0.0, 1.0 - att["bus_util"])
    phi = min(1.0, npu["mem_share"])
    rho = 0.0 if s == 0 and phi > 0 else 1.0 / ((1.0 - phi) + (phi / s if phi else 0.0))
    t = A if N <= rho * A else A + (N - rho * A)
    return max(t, npu["vector"] + att["softmax"])


def interleaved_cycles(layers: int, pre: list[dict], post: list[dict], att: list[dict], dual: bool = True) -> float:
    """NeuPIMs' stage program over ``layers`` layers for two sub-batches: ``pre[i]`` (ln1 + QKV), ``post[i]``
    (projection, ln2, FFN) and ``att[i]`` (attention) of sub-batch ``i``."""
    def both(a, b):
        return {"cycles": a["cycles"] + b["cycles"], "vector": a["vector"] + b["vector"],
                "mem_share": (a["cycles"] * a["mem_share"] + b["cycles"] * b["mem_share"])
                / max(1e-9, a["cycles"] + b["cycles"])}
    n1, n2 = both(post[0], pre[0]), both(post[1], pre[1])
    return (pre[0]["cycles"] + phase_cycles(pre[1], att[0], dual)
            + (layers - 1) * (phase_cycles(n1, att[1], dual) + phase_cycles(n2, att[0], dual))
            + phase_cycles(post[0], att[1], dual) + post[1]["cycles"])


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------

def _cfg_key(cfg: SystemConfig) -> str:
    """NPU programs time the same with one or two row buffers (they issue no PIM commands)."""
    return repr(cfg.replace(name="-", **{"pim.row_buffers": 1}))


@dataclass
class NeuPimsModel:
    """Batched generation of one model on D devices (see the module docstring)."""

    shape: GptShape
    devices: int = 1
    cfg_single: SystemConfig = field(default_factory=lambda: preset("ianus"))
    cfg_dual: SystemConfig = field(default_factory=lambda: preset("neupims"))
    npu_interleave: int = 256
    """Channel interleave (bytes) of the NPU's normal traffic in the performance model: 256 (plain GDDR6, the
    ``npu-mem`` mapping) at paper scale, 0 for the configuration's own map (the RTL's Row-Channel-Bank-Column
    map of the batched programs: the small cases checked against the RTL)."""
    pim_layout: str = "channel"
    """``channel``: NeuPIMs' layout, each request's K and V in one channel whose PIM commands are scheduled on
    their own (the firmware's attention timed on a one-channel configuration, channels in parallel);
    ``spread``: the RTL's (:mod:`firmware.batch`), a request's tokens over all channels, one PCU driving every
    channel, requests one after the other."""

    def __post_init__(self):
        if self.shape.heads % self.devices:
            raise ValueError(f"devices ({self.devices}) must divide the {self.shape.heads} heads")
        if self.cfg_dual.pim.row_buffers != 2 or self.cfg_single.pim.row_buffers != 1:
            raise ValueError("cfg_single needs row_buffers = 1 and cfg_dual row_buffers = 2")
        if self.pim_layout not in ("channel", "spread"):
            raise ValueError(f"pim_layout must be channel or spread, not {self.pim_layout!r}")
        self.hd = self.shape.head_dim
        self.heads_dev = self.shape.heads // self.devices
        self._models, self._cache = {}, {}
        self.one = GptShape(self.shape.d_model, self.shape.heads, 1, self.shape.eps)

    # -- performance-model programs ------------------------------------------------------------
    def _perf(self, cfg):
        k = _cfg_key(cfg)
        if k not in self._models:
            micro = dataclasses.replace(micro_for(cfg), interleave=self.npu_interleave)
            self._models[k] = PerfModel(cfg, micro)
        return self._models[k]

    def _run(self, cfg, key, words, stage):
        ck = (_cfg_key(cfg), key)
        if ck not in self._cache:
            ins = decode_program(words)
            r = self._perf(cfg).run_program(None, ins=ins, tags=stage_tags(stage, ins))
            self._cache[ck] = (float(r.cycles), dict(r.breakdown), dict(r.events))
        return self._cache[ck]

    def _compiler(self, cfg, rows):
        plan = plan_memory(cfg, self.one, max(rows, MAX_SEQ + 1), pim_layout=False,
                           kv_layout=kv_layout(cfg, self.one, "npu-mem"))
        mapping = {(ph, fc): "mu" for ph in ("prefill", "gen") for fc in ("qkv", "proj", "fc1", "fc2")}
        lc = LayerCompiler(plan, "npu-mem", mapping)
        lc._layer = 0
        return lc

    def _scaled(self, cfg, cyc, bd, ev) -> dict:
        """Per device under tensor parallelism with sequence parallelism: every operation's work divides by D,
        the per-program overhead (start-up, END, FENCE synchronisation) does not."""
        D = self.devices
        sbd = {k: (v if k == "overhead" else v / D) for k, v in bd.items()}
        c = sum(sbd.values())
        f = c / cyc if cyc else 0.0
        acc = (ev.get("dram_reads", 0) + ev.get("dram_writes", 0)) * f
        bus = acc / cfg.pim.channels * cfg.timing.tCCD
        return {"cycles": c, "vector": sbd.get("vector", 0.0), "mem_bus": bus}

    def npu_stage(self, cfg, rows: int, link: bool = False, pim: bool = False) -> tuple[dict, dict]:
        """(pre, post) NPU work of ``rows`` requests per layer and device: cycles, vector cycles, DRAM-bound
        share; ``pre`` = ln1 + QKV (+ bias, scatter; ``pim``: + every request's V^T append,
        :meth:`vt_append`), ``post`` = projection + residual, ln2, FC1 + GELU, FC2 + residual (with its two
        all-reduces over the link when ``link``)."""
        key = ("npu", _cfg_key(cfg), rows, link, pim)
        if key in self._cache:
            return self._cache[key]
        lc = self._compiler(cfg, rows)
        d = self.shape.d_model
        parts = {}
        for st in ("ln1", "proj", "ln2", "fc1", "fc2"):
            s = lc.stage(0, "prefill", st, rows, 0)
            parts[st] = self._scaled(cfg, *self._run(cfg, (st, rows), s.words, st))
        b = lc.plan.buffers
        pb = ProgramBuilder(cfg)
        lc.fc_mu(pb, b["h"], d, None, 3 * d, rows, b["qkv"], "qkv")
        pb.end()
        q = self._scaled(cfg, *self._run(cfg, ("qkv", rows), pb.words, "qkv_attn"))
        ap = self.append(cfg, pim)
        parts["qkv"] = {"cycles": q["cycles"] + ap["start"] + rows * ap["cycles"],
                        "vector": q["vector"] + rows * ap["vector"], "mem_bus": q["mem_bus"] + rows * ap["mem_bus"]}
        comm = 0.0
        if link and self.devices > 1:
            comm = allreduce_s(cfg, self.shape, rows, self.devices)[0] * cfg.clocks.pim_mhz * 1e6

        def comb(names, extra):
            c = sum(parts[n]["cycles"] for n in names) + extra
            return {"cycles": c, "vector": sum(parts[n]["vector"] for n in names),
                    "mem_share": sum(parts[n]["mem_bus"] for n in names) / c if c else 0.0}
        out = (comb(("ln1", "qkv"), 0.0), comb(("proj", "ln2", "fc1", "fc2"), comm))
        self._cache[key] = out
        return out

    def fw_request(self, cfg, L: int) -> dict:
        """The firmware's PIM attention of one request of ``L`` keys on this device, timed on the performance
        model (:func:`sim.neupims_fw.attention_sample`, interpolated between :func:`sim.neupims_fw.samples`)
        on the request's channel (``pim_layout`` ``channel``) or on all channels (``spread``): ``marginal``,
        ``start``, ``vector``, ``pcu``, ``commands`` (on the busiest channel it uses)."""
        key = ("fw", repr(cfg), self.pim_layout)
        if key not in self._cache:
            c = pim_config(cfg, self.pim_layout == "channel")
            self._cache[key] = [attention_sample(c, self.heads_dev, self.hd, x) for x in samples(cfg)]
        ss, xs = self._cache[key], samples(cfg)
        return {k: max(0.0, interp(xs, [s[k] for s in ss], L)) for k in ss[0]}

    def append(self, cfg, pim: bool) -> dict:
        """Each request's scatter of its Q, K and V rows (and with ``pim`` its V^T append) in the ``qkv``
        stage, per device (:func:`sim.neupims_fw.append_sample` on all channels: the scatter's rows go to every
        request's own caches, one VSTORE per head; the V^T append's GEMM reads over every channel)."""
        key = ("append", repr(cfg), pim)
        if key not in self._cache:
            self._cache[key] = append_sample(pim_config(cfg, False), "naive" if pim else "npu-only", self.heads_dev,
                                             self.hd, 0 if pim else self.npu_interleave)
        return self._cache[key]

    def pim_request(self, cfg, L: int) -> dict:
        """The analytic GEMV bound of one request's attention on this device (refresh amortized; bus commands):
        the weight by which requests are balanced over channels and sub-batches (the step is timed by
        :meth:`fw_request`, which this bound underestimates: it leaves out the transfers and hand-overs)."""
        key = ("pim", _cfg_key(cfg), L)
        if key not in self._cache:
            c1 = cfg.replace(**{"pim.channels": 1})
            sc, pv = segmented_gemv(c1, scores_segs(c1, self.hd, L)), segmented_gemv(c1, pv_segs(c1, self.hd, L))
            h = self.heads_dev
            self._cache[key] = {"cycles": h * (sc["amortized_cycles"] + pv["amortized_cycles"]),
                                "commands": h * (sc["commands"] + pv["commands"]),
                                "one_head": sc["amortized_cycles"] + pv["amortized_cycles"]}
        return self._cache[key]

    def npu_attention(self, cfg, L: int) -> dict:
        """npu-only attention of one request with ``L`` keys, per device: ``marginal`` and ``start``
        (:func:`sim.neupims_fw.npu_attention_sample`), interpolated between :data:`NPU_ATT_SAMPLES` up to
        ``MAX_SEQ``, extrapolated linearly beyond."""
        xs = [x for x in NPU_ATT_SAMPLES if x <= MAX_SEQ]
        xs = xs if len(xs) > 1 else list(NPU_ATT_SAMPLES[:2])
        key = ("npu_att", repr(cfg), tuple(xs))
        if key not in self._cache:
            c = pim_config(cfg, False)
            self._cache[key] = [npu_attention_sample(c, self.heads_dev, self.hd, x, self.npu_interleave) for x in xs]
        ss = self._cache[key]
        return {k: max(0.0, interp(xs, [s[k] for s in ss], L)) for k in ss[0]}

    # -- channels and capacity --------------------------------------------------------------------
    def capacity_per_channel(self, cfg) -> float:
        p = cfg.pim
        free = p.data_rows * p.banks * p.row_bytes
        return free - weight_bytes(self.shape) / self.devices / p.channels

    def request_bytes(self, cfg, L: int) -> int:
        p = cfg.pim
        return kv_rows_per_bank(cfg, self.hd, L) * p.banks * p.row_bytes * self.heads_dev * self.shape.layers

    def assign_channels(self, cfg, lengths) -> list[list[int]]:
        """Greedy channel load balancing (longest attention first onto the least-loaded channel with room)."""
        C = cfg.pim.channels
        cap = self.capacity_per_channel(cfg)
        load, used = [0.0] * C, [0.0] * C
        chans = [[] for _ in range(C)]
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        for i in order:
            L = int(lengths[i])
            need = self.request_bytes(cfg, L)
            ok = [c for c in range(C) if used[c] + need <= cap]
            if not ok:
                tot = sum(self.request_bytes(cfg, int(x)) for x in lengths)
                raise NeuPimsCapacityError(
                    f"batch of {len(lengths)} requests (KV lengths {min(lengths)}..{max(lengths)}, "
                    f"{tot / 2**30:.1f} GiB of K/V per device in the PIM layout) does not fit {self.devices} "
                    f"device(s) of {cfg.pim.total_bytes / 2**30:.0f} GiB: {weight_bytes(self.shape) / self.devices / 2**30:.1f} "
                    f"GiB of weights per device leave {max(0, cap) * C / 2**30:.1f} GiB for K/V")
            c = min(ok, key=lambda c: load[c])
            load[c] += self.pim_request(cfg, L)["cycles"]
            used[c] += need
            chans[c].append(i)
        return chans

    def check_capacity(self, lengths, cfg=None) -> None:
        self.assign_channels(cfg or self.cfg_single, lengths)

    def attention(self, cfg, lengths, chans, members) -> dict:
        """PIM attention of the requests ``members`` (a set of indices): per stream (a channel's requests, or
        all of them one after the other with ``pim_layout`` ``spread``) the firmware's pipeline, ``start`` of
        its first request + every request's ``marginal`` (:meth:`fw_request`); the streams in parallel, the
        vector unit shared (at least every softmax + the shortest request's PIM work)."""
        streams = chans if self.pim_layout == "channel" else [sorted(i for r in chans for i in r)]
        per, cmds, vec, pcu = [], [], 0.0, []
        for reqs in streams:
            f = [self.fw_request(cfg, int(lengths[i])) for i in reqs if i in members]
            per.append(sum(x["marginal"] for x in f) + (f[0]["start"] if f else 0.0))
            cmds.append(sum(x["commands"] for x in f))
            vec += sum(x["vector"] for x in f)
            pcu += [x["pcu"] for x in f]
        if not pcu:
            return {"cycles": 0.0, "bus_util": 0.0, "softmax": 0.0}
        cyc = max(max(per), vec + min(pcu))
        util = max(c / cyc for c in cmds)
        return {"cycles": cyc, "bus_util": min(1.0, util), "softmax": vec, "pim_busiest": max(per)}

    # -- policies ---------------------------------------------------------------------------------
    def step(self, policy: str, lengths, link: bool = False) -> dict:
        """One generation step of the batch (all layers, one device of the D; ``link``: with the all-reduces over
        PCIe): cycles and details."""
        lengths = np.asarray(lengths, dtype=int)
        B, Ly = len(lengths), self.shape.layers
        if policy == "npu-only":
            cfg = self.cfg_single
            self.check_capacity(lengths, cfg)
            pre, post = self.npu_stage(cfg, B, link)
            f = [self.npu_attention(cfg, int(L)) for L in lengths]
            att = sum(x["marginal"] for x in f) + f[0]["start"]
            layer = pre["cycles"] + post["cycles"] + att
            return {"cycles": Ly * layer, "npu": Ly * (pre["cycles"] + post["cycles"]), "attention": Ly * att,
                    "partition": "-", "cfg": cfg}
        if policy not in ("naive", "neupims"):
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, not {policy!r}")
        cfg = self.cfg_single if policy == "naive" else self.cfg_dual
        chans = self.assign_channels(cfg, lengths)
        pre, post = self.npu_stage(cfg, B, link, pim=True)
        att = self.attention(cfg, lengths, chans, set(range(B)))
        serial = Ly * (pre["cycles"] + post["cycles"] + att["cycles"])
        out = {"cycles": serial, "npu": Ly * (pre["cycles"] + post["cycles"]), "attention": Ly * att["cycles"],
               "partition": "none", "sizes": (B, 0), "cfg": cfg, "candidates": {"none": serial}}
        if policy == "naive" or B < 2:
            return out
        for name, split in self.partitions(cfg, lengths, chans).items():
            sizes = (len(split[0]), len(split[1]))
            if 0 in sizes:
                continue
            pres, posts, atts = zip(*[(*self.npu_stage(cfg, len(s), link, pim=True),
                                       self.attention(cfg, lengths, chans, s))
                                      for s in split], strict=True)
            t = interleaved_cycles(Ly, list(pres), list(posts), list(atts), dual=True)
            out["candidates"][name] = t
            if t < out["cycles"]:
                out.update(cycles=t, partition=name, sizes=sizes,
                           npu=Ly * sum(p["cycles"] + q["cycles"] for p, q in zip(pres, posts, strict=True)),
                           attention=Ly * sum(a["cycles"] for a in atts))
        return out

    def partitions(self, cfg, lengths, chans) -> dict:
        """Two sub-batches per channel: ``halves`` (NeuPIMs' simple split, alternating which half gets the odd
        request) and ``balanced`` (per channel, longest attention first onto the lighter half)."""
        halves, bal = (set(), set()), (set(), set())
        ceil_turn = True
        for reqs in chans:
            k = len(reqs) // 2
            if len(reqs) % 2:
                k = -(-len(reqs) // 2) if ceil_turn else len(reqs) // 2
                ceil_turn = not ceil_turn
            halves[0].update(reqs[:k])
            halves[1].update(reqs[k:])
            w = [0.0, 0.0]
            for i in sorted(reqs, key=lambda i: -lengths[i]):
                j = 0 if w[0] <= w[1] else 1
                bal[j].add(i)
                w[j] += self.pim_request(cfg, int(lengths[i]))["cycles"]
        return {"halves": halves, "balanced": bal}

    def throughput(self, policy: str, lengths, link: bool = False) -> dict:
        """tokens/s of the D devices: batch / step time."""
        st = self.step(policy, lengths, link)
        cfg = st["cfg"]
        sec = st["cycles"] / (cfg.clocks.pim_mhz * 1e6)
        return {**st, "step_ms": sec * 1e3, "tokens_per_s": len(lengths) / sec}


def choose_devices(shape: GptShape, lengths, cfg: SystemConfig | None = None) -> int:
    """The smallest divisor of the head count with which ``lengths`` fit (the largest if none does)."""
    divs = [D for D in range(1, shape.heads + 1) if shape.heads % D == 0]
    for D in divs:
        try:
            NeuPimsModel(shape, D).check_capacity(lengths, cfg)
            return D
        except NeuPimsCapacityError:
            continue
    return divs[-1]


def system_configs(config: str = "neupims") -> tuple[SystemConfig, SystemConfig]:
    """``(one row buffer, two row buffers)`` configurations of a dual-row-buffer preset: ``neupims`` (the
    ``ianus`` system with two row buffers; its single-buffer twin is ``ianus``) or ``neupims-hw`` (NeuPIMs'
    evaluated NPU and channel count, :mod:`hw.spec.presets`)."""
    dual = preset(config)
    if dual.pim.row_buffers != 2:
        raise ValueError(f"configuration {config!r} has {dual.pim.row_buffers} row buffer(s); NeuPIMs needs 2")
    single = preset("ianus") if config == "neupims" else dual.replace(name=f"{dual.name}-rb1",
                                                                        **{"pim.row_buffers": 1})
    return single, dual


def throughput_rows(models=("7b", "13b", "30b"), batches=BATCHES, devices: int | None = None, seed: int = 0,
                    progress=None, config: str = "neupims") -> list[dict]:
    """Per model, batch and policy: tokens/s (devices' step without the link, and with it), and the ratios.
    ``config``: the dual-row-buffer system (:func:`system_configs`)."""
    single, dual = system_configs(config)
    rows = []
    for m in models:
        shape = MODELS[m]
        D = devices or choose_devices(shape, request_lengths(max(batches), seed), single)
        nm = NeuPimsModel(shape, D, cfg_single=single, cfg_dual=dual)
        for B in batches:
            lengths = request_lengths(B, seed)
            row = {"model": m, "batch": B, "devices": D, "mean_len": float(np.mean(lengths)), "config": config}
            try:
                for pol in POLICIES:
                    r = nm.throughput(pol, lengths)
                    row[pol] = r["tokens_per_s"]
                    row[f"{pol}_step_ms"] = r["step_ms"]
                    if pol == "neupims":
                        row["partition"], row["sizes"] = r["partition"], r["sizes"]
                    if D > 1:
                        row[f"{pol}_link"] = nm.throughput(pol, lengths, link=True)["tokens_per_s"]
                    if progress:
                        progress(m, B, pol)
                row["fits"] = True
                row["vs_npu_only"] = row["neupims"] / row["npu-only"]
                row["vs_naive"] = row["neupims"] / row["naive"]
                if D > 1:
                    row["vs_npu_only_link"] = row["neupims_link"] / row["npu-only_link"]
                    row["vs_naive_link"] = row["neupims_link"] / row["naive_link"]
            except NeuPimsCapacityError as e:
                row.update(fits=False, error=str(e))
            rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# Report: ``ianus project --system neupims``
# ---------------------------------------------------------------------------------------------

def plot_throughput(rows: list[dict], path) -> None:
    """Throughput vs batch size per policy, one panel per model (log-2 batch axis)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models), 3.6), squeeze=False)
    for ax, m in zip(axes[0], models, strict=True):
        rs = [r for r in rows if r["model"] == m and r.get("fits")]
        for pol, mk in zip(POLICIES, ("s", "o", "^"), strict=True):
            ax.plot([r["batch"] for r in rs], [r[pol] for r in rs], marker=mk, label=pol)
        D = rows[[r["model"] for r in rows].index(m)]["devices"]
        ax.set_xscale("log", base=2)
        ax.set_title(f"GPT-3 {m.upper()} ({D} devices)")
        ax.set_xlabel("batch (requests)")
        ax.set_ylabel("tokens/s (no inter-device link)")
        ax.grid(alpha=0.3)
        for r in rows:
            if r["model"] == m and not r.get("fits"):
                ax.axvline(r["batch"], color="grey", ls=":", lw=1)
    axes[0][0].legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main_neupims(args) -> int:
    import csv
    import sys
    import time
    from pathlib import Path

    from rich.console import Console
    from rich.table import Table

    from sim.usage import UsageError, check_output_dir, parse_int_list, parse_names

    models = args.models.split(",") if args.models else list(MODELS)
    if args.models in (None, "", "medium,large,xl,2.5b"):
        models = list(MODELS)
    models = parse_names("--models", ",".join(models), MODELS)
    batches = parse_int_list("--batches", args.batches, 1, 1 << 14)
    check_output_dir("--out", args.out)
    devices = None
    if args.devices not in ("", "2,4,8"):
        devs = parse_int_list("--devices", args.devices, 1, 1024)
        if len(devs) != 1:
            raise UsageError(f"--devices with --system neupims takes one device count, not {args.devices!r}")
        devices = devs[0]
        for m in models:
            if MODELS[m].heads % devices:
                raise UsageError(f"--devices {devices} must divide the {MODELS[m].heads} heads of {m}")
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
    t0 = time.perf_counter()
    rows = throughput_rows(models, batches, devices, seed=args.seed, config=args.neupims_config,
                           progress=lambda m, b, p: console.print(f"[dim]{m} batch {b} {p}: "
                                                                  f"{time.perf_counter() - t0:.0f} s[/dim]"))
    tab = Table(title=f"NeuPIMs batched generation on {args.neupims_config} (one step at ShareGPT-like KV lengths, "
                      f"seed {args.seed}): tokens/s without | with the PCIe link")
    for c in ("model", "batch", "devices", "mean KV", "npu-only", "naive", "neupims", "partition",
              "neupims / npu-only", "neupims / naive"):
        tab.add_column(c, justify="right")
    for r in rows:
        if not r["fits"]:
            tab.add_row(r["model"], str(r["batch"]), str(r["devices"]), f"{r['mean_len']:.0f}",
                        "does not fit", "does not fit", "does not fit", "-", "-", "-")
            continue

        def tp(p, r=r):
            return f"{r[p]:,.0f}" + (f" | {r[p + '_link']:,.0f}" if f"{p}_link" in r else "")

        def ratio(k, r=r):
            return f"{r[k]:.2f}x" + (f" | {r[k + '_link']:.2f}x" if f"{k}_link" in r else "")
        tab.add_row(r["model"], str(r["batch"]), str(r["devices"]), f"{r['mean_len']:.0f}", tp("npu-only"),
                    tp("naive"), tp("neupims"), f"{r['partition']} {r['sizes'][0]}/{r['sizes'][1]}",
                    ratio("vs_npu_only"), ratio("vs_naive"))
    console.print(tab)
    for r in rows:
        if not r["fits"]:
            console.print(f"[yellow]{r['model']} batch {r['batch']}: {r['error']}[/yellow]")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    keys = sorted({k for r in rows for k in r if k not in ("error",)})
    with open(out / "neupims.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in keys})
    plot_throughput(rows, out / "neupims_throughput.png")
    console.print(f"wrote {out}/neupims.csv, neupims_throughput.png ({time.perf_counter() - t0:.1f} s)")
    return 0
