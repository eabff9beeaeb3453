"""Performance model of the SoC: executes the compiled programs with a timing model per unit.

The model decodes the *same* 256-bit instruction words the RTL runs (:mod:`firmware.isa`) and
times them with one model per unit, in an event-driven simulation at instruction granularity
(memory requests and PIM micro commands are timed one by one, without a per-cycle loop):

command processor (:mod:`hw.cp`)
    In-order dispatch, one instruction per cycle, from a prefetch FIFO of ``fetch_depth``
    instructions whose fetches go through the memory model; FENCE retires when the named units are
    idle (busy low and nothing handed to them in the previous cycle), END when all are idle two
    cycles in a row. MATRIX goes to the matrix unit's decode register, VECTOR / VLOAD / VSTORE to
    the vector queue's FIFO, PIM to the macro queue in front of the PCU; a full queue stalls
    dispatch (and everything behind it).
matrix unit (:mod:`hw.npu.matrix_unit`, :mod:`hw.npu.dma`)
    Decode register, three in-order queues (load / compute / store) with the 16 counting
    semaphores; an instruction starts when its ``wait`` tokens are there and its engine is free,
    and gives its ``signal`` tokens when it finishes. Compute: the slot arithmetic of
    :class:`hw.npu.matrix_unit.ComputeEngine` (``max(R, 4)`` preamble, ``max(M, R, 4)`` cycles per
    pass, tokens after the array and read-modify-write drain). DMA: every 32-byte request through
    the memory model, with the engines' own rates (non-transposed: ``16 / W`` scratchpad words per
    column; transposed: ``W`` rows gathered into a ``W x 16`` buffer, whose 16 transposed words are
    written one per cycle, with one or two buffers as the RTL has), ``dma_outstanding`` requests
    in flight, responses in order.
vector queue (:mod:`hw.npu.vector_queue`, :mod:`hw.npu.vector`)
    One instruction at a time; VECTOR by the vector unit's cycle formulas, VLOAD / VSTORE by
    streaming requests through the memory model.
PCU (:mod:`hw.pcu`)
    The macro-to-micro state machine command by command: every micro command (ACT, ACTAB, RD, WR,
    PREAB, WRBIAS, WRGB, MACAB, RDMAC, AF, RDAF) is issued at the first cycle the controller's
    timing rules allow, the command stream loads the next command in the cycle the controllers
    accept one (one per cycle), responses come back one per cycle; the same order as the RTL
    (memory transfers in row segments with their ACTs first, a new chunk's WRGBs in the tRTP / tRP
    waits, one-tile GEMVs without read-back); :func:`firmware.pim.gemv_lower_bound` is the
    analytical floor it is compared with.
memory (:mod:`hw.memctrl`, :mod:`hw.fabric`)
    Per channel: one command per cycle, per-bank open row and timing (tRCD, tRP, tRAS, tWR, tRTP),
    tRRD / tFAW, an FR-FCFS queue of ``ctrl_queue`` requests (row hits of other banks overtake a
    row miss), refresh (one REF owed per tREFI, done when the queue is empty -- in PIM mode when
    every bank is closed -- forced after ``refresh_postpone``; tRFC with all rows closed) and PIM
    mode (normal requests wait while a macro holds the channels: the instruction fetches and DMA
    requests timed ahead of a macro's start are timed again after it, the bank state they would
    have left is rolled back to the macro's start).

Memory requests are timed when their requester issues them, mostly in time order; the channel's
command slots are a set, so a later-timed stream can use cycles an earlier one left free.

The constants that are not spelt out by the RTL's documentation (pipeline offsets of a few
cycles) are in :class:`Calib`, fitted against the RTL's cycle counts (``tests/test_perfmodel.py``,
``sim/calibration/``).

Scaling to the paper's system (``ianus`` preset, projection only): the NPU clock may differ from
the memory clock (times are kept in memory-clock cycles; NPU-side durations are scaled by
``pim_mhz / npu_mhz``); :class:`Micro` holds the microarchitecture parameters (DMA request rate and
requests in flight, core count). With ``cores > 1`` every matrix-unit and vector instruction's work
is split evenly over the cores (FCs column-wise, heads across cores), their DMA engines issue in
parallel into the shared channels, and the PCU and the PIM channels are shared; a FENCE costs
``sync_cycles`` more (the cores synchronise).
"""

from __future__ import annotations

import bisect
import heapq
import math
from collections import deque
from dataclasses import dataclass, field

from amaranth.lib import data as _adata

from hw.config import SystemConfig
from hw.spec import macro as mcmod
from hw.spec import matrix_isa as mu_isa
from hw.spec import soc_isa as isa
from hw.spec import vector_isa as vu
from hw.spec.soc_isa import SocOp
from hw.spec.vector_isa import vector_cycles

__all__ = ["Calib", "Micro", "PerfModel", "ProgramResult", "decode_program", "micro_for", "stage_tags"]

INF = float("inf")


# ---------------------------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Calib:
    """Pipeline offsets (cycles) of the RTL not written in its docstrings, fitted on the RTL.

    Every name says where the cycles are spent. They were fitted on micro-benchmark programs (one
    instruction type at a time, run on the tiny SoC RTL) and on the end-to-end jobs;
    ``tests/test_perfmodel.py`` keeps them honest. ``gap`` and ``first_start`` describe the RTL
    testbench's host (register accesses between programs, start-up), found from the pattern of
    refresh collisions of 40 one-instruction programs."""

    req_to_ctrl: int = 2        # requester's request cycle -> first cycle the controller may issue it (fabric + queue)
    col_to_resp: int = 3        # column command decided -> response at the requester, beyond tRL (bus, FIFO, ROB)
    fetch_to_head: int = 3      # instruction response -> head of the CP's FIFO
    fence_extra: int = 0        # cycles a FENCE / END retire costs beyond the idle rule
    mu_q_lat: int = 2           # CP handshake -> instruction at the head of its matrix-unit queue
    mu_dma_start: int = 1       # engine accepts -> first request
    mu_dma_end: int = 1         # last response consumed -> busy low / tokens
    mu_idle_lat: int = 2        # last engine done -> matrix unit busy low
    mu_store_extra: int = 1     # STORE: further cycles until busy falls (write acknowledgements)
    mu_comp_start: int = 1      # compute accepts -> first slot
    sem_lat: int = 1            # tokens given -> visible to a waiting queue head
    vq_fifo_lat: int = 2        # CP handshake -> instruction in the dispatcher
    vq_vec_over: int = 3        # dispatcher pop -> vector unit accepts
    vq_dma_over: int = 5        # dispatcher pop -> VDMA start
    vq_done_over: int = 0       # unit done -> next instruction popped
    vq_idle_lat: int = 1        # unit done -> queue busy low (when nothing follows)
    vdma_store_lat: int = 3     # VSTORE: scratchpad read + FIFO before the first request
    vdma_end: int = 1           # last response -> VDMA done
    macro_q_lat: int = 2        # CP handshake -> macro visible to the PCU
    pcu_resp_lat: int = 2       # RD / RDMAC data on the bus -> response taken by the PCU (FIFO)
    pcu_end: int = 0            # busy low -> next macro taken
    pcu_idle_lat: int = 0       # busy low -> the command processor sees the PCU idle
    end_extra: int = 0          # END retire -> counter stops
    gap: int = 93               # cycles between two programs of a job (the host's register accesses)
    counter_read: int = 60      # END -> the host reads the refresh counters
    first_start: int = 15       # reset -> first program's start (back door, ID read)


@dataclass(frozen=True)
class Micro:
    """Microarchitecture parameters of the timed system (defaults: the RTL's, :mod:`hw.soc`)."""

    fetch_depth: int = 32
    mu_queue: int = 4
    vq_depth: int = 8
    macro_depth: int = 8
    dma_outstanding: int = 32
    ctrl_queue: int = 8
    dma_issue: int = 1          # requests a DMA engine issues per NPU cycle (the fabric takes one per requester)
    cores: int = 1
    sync_cycles: int = 0        # extra cycles of a FENCE when several cores synchronise
    pcu_emit_cycles: int = 1    # cycles per micro command of the PCU's command stream (RTL: 1)
    row_bus: bool = False
    """Row commands (ACT, PRE) on their own command slots, as GDDR6's separate row and column command
    buses allow (the RTL folds both into one command per cycle, column commands first)."""
    transpose_buffers: int = field(default_factory=lambda: _transpose_buffers())
    """W x 16 buffers of the transposing load (1: gather, then emit; 2: gather one while the other is
    emitted), read from :class:`hw.npu.dma.DmaLoad`."""
    interleave: int = 0
    """Channel interleave (bytes) of normal traffic when it differs from the configuration's address map
    (0: the map of ``PimGeometry.channel_interleave``, :class:`hw.memif.AddressMap`, as the RTL). The
    projection's NPU-MEM baseline (plain GDDR6, no PIM layout to respect) interleaves channels every 256
    bytes."""
    cache: bool = False
    """Reuse the timing of a DMA instruction or macro already timed with the same shape and the same
    address alignment within a DRAM row (projection speed; the memory state it would leave is not
    replayed). Off for calibration."""


def _transpose_buffers() -> int:
    """2 when the RTL's transposing load is double-buffered (it gathers one W x 16 block while it
    writes the previous one's transpose), else 1."""
    from hw.npu import dma

    return dma.DmaLoad.transpose_buffers


def micro_for(cfg: SystemConfig) -> Micro:
    """The RTL's microarchitecture for RTL configurations; for the ``ianus`` preset the paper-scale
    system: ``npu.cores`` cores, each DMA engine issuing enough requests per cycle (and keeping
    enough in flight) that the cores together can use every channel's bandwidth."""
    if cfg.npu.cores <= 1:
        return Micro()
    ratio = cfg.clocks.pim_mhz / cfg.clocks.npu_mhz
    per_core = max(1, math.ceil(cfg.pim.channels / cfg.npu.cores * ratio))
    return Micro(dma_issue=per_core, dma_outstanding=32 * per_core * 4, cores=cfg.npu.cores,
                 ctrl_queue=64, sync_cycles=100, cache=True, row_bus=True)


# ---------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------

_VLAYOUT = _adata.Layout.cast(vu.VectorInstr)
_VFIELDS = [(name, f.offset, f.width) for name, f in _VLAYOUT]
_VOPS = {op.code: op.name for op in vu.ISA_TABLE}


class Ins:
    __slots__ = ("op", "f", "idx")

    def __init__(self, op, f, idx):
        self.op = op
        self.f = f
        self.idx = idx

    def __repr__(self):
        return f"Ins({self.op!r}, {self.f})"


def _decode_vec(word):
    f = {name: (word >> lo) & ((1 << w) - 1) for name, lo, w in _VFIELDS}
    f["op"] = _VOPS.get(f["op"], f["op"])
    return f


def decode_program(words) -> list[Ins]:
    """Decode a program (list of 256-bit ints) into :class:`Ins` (op + fields)."""
    out = []
    for i, w in enumerate(words):
        d = isa.decode(w, i)
        op = d["op"]
        if op == SocOp.MATRIX:
            f = mu_isa.decode(d["word"])
            f["opcode"] = f["opcode"].name
        elif op == SocOp.VECTOR:
            f = _decode_vec(d["word"])
        elif op == SocOp.PIM:
            m = mcmod.decode([(d["word"] >> (32 * k)) & 0xFFFFFFFF for k in range(4)])
            f = {"op": int(m.op), "flags": int(m.flags), "n": m.n, "m": m.m, "row": m.row, "addr0": m.addr0}
        elif op in (SocOp.VLOAD, SocOp.VSTORE):
            f = {k: d[k] for k, _, _ in isa.VDMA_FIELDS}
        elif op == SocOp.FENCE:
            f = {"units": d["units"]}
        else:
            f = {}
        out.append(Ins(op, f, i))
    return out


_FC_TAG = {"qkv_attn": "qkv", "proj": "proj", "fc1": "ffn", "fc2": "ffn"}


def stage_tags(name: str, ins: list[Ins]) -> list[str]:
    """Operation of every instruction of a compiled stage (:data:`firmware.compiler.STAGES`), for the
    breakdown: ``qkv`` / ``proj`` / ``ffn`` (the FC: PIM macros or the matrix unit's GEMM with the
    weights; in ``qkv_attn`` also the scatter of Q, K, V), ``attention`` (QK^T and S.V on the matrix
    unit, scale and softmax on the vector unit) and ``vector`` (layernorm, bias, GELU, residual)."""
    if name in ("ln1", "ln2"):
        return ["vector"] * len(ins)
    fc = _FC_TAG.get(name, "vector")
    has_pim = any(x.op == SocOp.PIM for x in ins)
    # vector-queue runs (between FENCEs): a run with SOFTMAX is attention
    run_of = {}
    runs = [[]]
    for i, x in enumerate(ins):
        if x.op == SocOp.FENCE and x.f["units"] & 2:
            runs.append([])
        elif x.op in (SocOp.VECTOR, SocOp.VLOAD, SocOp.VSTORE):
            runs[-1].append(i)
    for r in runs:
        soft = any(ins[i].op == SocOp.VECTOR and ins[i].f["op"] in ("SOFTMAX", "SCALE") for i in r)
        for i in r:
            run_of[i] = soft
    out = []
    mu_fenced = False
    for i, x in enumerate(ins):
        if x.op == SocOp.PIM:
            out.append(fc)
        elif x.op == SocOp.MATRIX:
            if name == "qkv_attn":
                out.append("qkv" if (not has_pim and not mu_fenced) else "attention")
            else:
                out.append(fc)
        elif x.op in (SocOp.VECTOR, SocOp.VLOAD, SocOp.VSTORE):
            out.append(("attention" if run_of.get(i) else "qkv") if name == "qkv_attn" else "vector")
        else:
            out.append("-")
        if x.op == SocOp.FENCE and x.f["units"] & 1:
            mu_fenced = True
    return out


# ---------------------------------------------------------------------------------------------
# Event kernel (generators yield an absolute time or an _Event)
# ---------------------------------------------------------------------------------------------

class _Event:
    __slots__ = ("waiters",)

    def __init__(self):
        self.waiters = []


class _Kernel:
    def __init__(self):
        self.now = 0.0
        self._q = []
        self._n = 0

    def at(self, t, fn):
        heapq.heappush(self._q, (t, self._n, fn))
        self._n += 1

    def spawn(self, gen):
        self.at(self.now, lambda: self._resume(gen))

    def _resume(self, gen):
        while True:
            try:
                w = next(gen)
            except StopIteration:
                return
            if isinstance(w, _Event):
                w.waiters.append(gen)
                return
            if w > self.now:
                self.at(w, lambda g=gen: self._resume(g))
                return

    def notify(self, ev):
        if ev.waiters:
            ws, ev.waiters = ev.waiters, []
            for g in ws:
                self.at(self.now, lambda g=g: self._resume(g))

    def run(self):
        q = self._q
        while q:
            t, _, fn = heapq.heappop(q)
            self.now = t
            fn()


# ---------------------------------------------------------------------------------------------
# Memory: one controller per channel
# ---------------------------------------------------------------------------------------------

class _Slots:
    """Taken cycles of a one-per-cycle resource (a command bus, a port): ``take(t)`` takes and returns the
    first free cycle at or after ``t``. Each taken cycle maps to a cycle at or before the first free one
    after it (every cycle in between is taken), so a search jumps over runs of taken cycles (with path
    compression) where probing them one by one cost tens of probes per request when streams queue up.
    The taken set, and so every result, is the same as with a plain set of cycles."""

    __slots__ = ("nf",)

    def __init__(self):
        self.nf = {}

    def __len__(self):
        return len(self.nf)

    def __contains__(self, x):
        return x in self.nf

    def __iter__(self):
        return iter(self.nf)

    def take(self, t) -> int:
        nf = self.nf
        x = math.ceil(t)
        if x in nf:
            path = []
            while x in nf:
                path.append(x)
                x = nf[x]
            y = x + 1
            for q in path:
                nf[q] = y
        nf[x] = x + 1
        return x

    def keep_from(self, floor):
        """Forget the taken cycles before ``floor``."""
        self.nf = {k: v for k, v in self.nf.items() if k >= floor}

    def keep_upto(self, last):
        """Forget the taken cycles after ``last``."""
        self.nf = {k: (v if v <= last + 1 else last + 1) for k, v in self.nf.items() if k <= last}


class Channel:
    """Timing state of one channel's controller and banks (see the module docstring)."""

    def __init__(self, cfg: SystemConfig, micro: Micro, calib: Calib):
        t, p = cfg.timing, cfg.pim
        self.t = t
        self.nb = p.banks
        self.qdepth = micro.ctrl_queue
        self.open = [-1] * p.banks
        self.pre_ok = [0] * p.banks       # earliest PRE (tRAS, tWR, tRTP)
        self.act_ok = [0] * p.banks       # earliest ACT (tRP)
        self.rd_ok = [0] * p.banks        # earliest RD / MAC (tRCDRD)
        self.wr_ok = [0] * p.banks        # earliest WR (tRCDWR)
        self.slots = _Slots()
        self.row_slots = _Slots()
        self.row_bus = micro.row_bus
        self.rrd_ok = 0
        self.acts = deque(maxlen=4)
        self.rfc_ok = 0
        self.mac_ok = 0
        self.af_ok = 0
        self.qtimes = []
        self.idle_from = 0
        self.next_tick = t.tREFI - 1 - calib.first_start     # refi counter runs from reset
        self.owed = 0
        self.owed_since = 0
        self.ref_free = 0
        self.pim_windows = []
        self.closed_from = 0
        self.pim_from = 0
        self.last_ref = -INF
        self.ref_log = []                          # cycles of recent REFs
        self.hist = [[] for _ in range(p.banks)]     # per bank: (cycle, state after) of recent changes
        self.c = {"hits": 0, "misses": 0, "refreshes": 0, "commands": 0, "pim_commands": 0, "reads": 0,
                  "writes": 0, "acts": 0}

    # -- command slots (one command per cycle) --
    def slot(self, tt, row=False):
        s = self.row_slots if (row and self.row_bus) else self.slots
        tt = s.take(tt)
        self.c["commands"] += 1
        if len(s.nf) > 8192:
            s.keep_from(max(s.nf) - 4096)
        return tt

    # -- refresh --
    def _tick_until(self, tt):
        """Count the REFs that fall due before cycle ``tt``."""
        T = self.t.tREFI
        while self.next_tick + 1 <= tt:
            if self.owed == 0:
                # The controller sees the new credit one cycle after the tick and its refresh machine
                # leaves Idle the cycle after that: measured on the tiny naive 2-layer job, 121 and 128 of
                # 164 REFs per channel then fall on the RTL's cycle exactly (with +1 here, 1 cycle early).
                self.owed_since = self.next_tick + 2
            self.owed += 1
            self.next_tick += T

    def _do_refresh(self, s):
        t = self.t
        open_banks = [b for b in range(self.nb) if self.open[b] >= 0]
        if open_banks:
            p = self.slot(max(s + 1, max(self.pre_ok[b] for b in open_banks)))
            r = max(p + t.tRP, self.rfc_ok)
        else:
            r = max(s + 1, self.rfc_ok, max(self.act_ok))
        r = self.slot(r)
        for b in range(self.nb):
            self.open[b] = -1
            self.act_ok[b] = max(self.act_ok[b], r + t.tRFC)
            self._record(b, r)
        self.rfc_ok = r + t.tRFC
        self.last_ref = r
        self.ref_log.append(r)
        if len(self.ref_log) > 64:
            del self.ref_log[:32]
        self.ref_free = r + 2
        self.owed -= 1
        self.owed_since = r + 2
        self.c["refreshes"] += 1
        return r

    def refresh_idle(self, tt):
        """Refreshes the controller does while its queue is empty, before cycle ``tt``."""
        self._tick_until(tt)
        while self.owed >= 1:
            s = max(self.owed_since, self.idle_from, self.ref_free)
            if s >= tt:
                break
            self._do_refresh(s)
            self._tick_until(tt)
        if self.owed >= max(1, self.t.refresh_postpone):     # forced (nothing owed: nothing to force)
            self._do_refresh(max(tt, self.ref_free))

    def refresh_pim(self, tt, closed_from):
        """PIM mode: a REF starts in the first cycle at least one is owed and every bank is closed."""
        self._tick_until(tt)
        done = False
        while self.owed >= 1:
            s = max(self.owed_since, closed_from, self.ref_free)
            if s > tt:
                break
            self._do_refresh(s)
            done = True
            self._tick_until(tt)
        return done

    # -- normal requests --
    def access(self, bank, row, write, tt):
        """A 32-byte request that can be issued from cycle ``tt``: returns the column command's cycle."""
        t = self.t
        tt = math.ceil(tt)
        q = self.qtimes                     # sorted decision cycles of the requests queued
        k = bisect.bisect_left(q, tt)
        if k:
            del q[:k]
        if len(q) >= self.qdepth:
            x = q[len(q) - self.qdepth] + 1
            if x > tt:
                tt = x
        for s, e in self.pim_windows:
            if s <= tt < e:
                tt = e + 1
        if self.owed or self.next_tick + 1 <= tt:     # else refresh_idle(tt) has nothing to do
            self.refresh_idle(tt)
        c = self.c
        if self.open[bank] == row:
            c["hits"] += 1
            x = self.wr_ok[bank] if write else self.rd_ok[bank]
            col = x if x > tt else tt
        else:
            c["misses"] += 1
            if self.open[bank] >= 0:
                pr = self.slot(max(tt, self.pre_ok[bank]), row=True)
                self.act_ok[bank] = max(self.act_ok[bank], pr + t.tRP)
            a = max(tt, self.act_ok[bank], self.rrd_ok, self.rfc_ok)
            if len(self.acts) == 4:
                a = max(a, self.acts[0] + t.tFAW)
            a = self.slot(a, row=True)
            c["acts"] += 1
            self.acts.append(a)
            self.rrd_ok = a + t.tRRD
            self.rd_ok[bank] = a + t.tRCDRD
            self.wr_ok[bank] = a + t.tRCDWR
            self.pre_ok[bank] = max(self.pre_ok[bank], a + t.tRAS)
            self.open[bank] = row
            col = self.wr_ok[bank] if write else self.rd_ok[bank]
        slots = self.slots              # the column command's slot (as slot())
        col = slots.take(col)
        c["commands"] += 1
        if len(slots.nf) > 8192:
            slots.keep_from(max(slots.nf) - 4096)
        x = col + (t.tWR if write else t.tRTP)
        if x > self.pre_ok[bank]:
            self.pre_ok[bank] = x
        if write:
            c["writes"] += 1
        else:
            c["reads"] += 1
        bisect.insort(q, col)
        if col + 1 > self.idle_from:
            self.idle_from = col + 1
        h = self.hist[bank]
        h.append((col, (self.open[bank], self.pre_ok[bank], self.act_ok[bank], self.rd_ok[bank], self.wr_ok[bank])))
        if len(h) > 24:
            del h[:8]
        return col

    def _record(self, bank, t):
        h = self.hist[bank]
        h.append((t, (self.open[bank], self.pre_ok[bank], self.act_ok[bank], self.rd_ok[bank], self.wr_ok[bank])))
        if len(h) > 24:
            del h[:8]

    def rewind(self, t0):
        """Forget the bank-state changes of normal requests decided after cycle ``t0`` (a PIM macro that
        starts at ``t0`` holds them back; they are timed again after it)."""
        for b in range(self.nb):
            h = self.hist[b]
            if not h or max(x[0] for x in h) <= t0:
                continue
            keep = [x for x in h if x[0] <= t0]
            if keep:
                st = max(keep, key=lambda x: x[0])[1]
                self.open[b], self.pre_ok[b], self.act_ok[b], self.rd_ok[b], self.wr_ok[b] = st
            else:
                self.open[b] = -1
                self.pre_ok[b] = min(self.pre_ok[b], t0)
                self.act_ok[b] = min(self.act_ok[b], t0)
            self.hist[b] = keep


class Memory:
    """All channels plus the address map (:class:`hw.memif.AddressMap`: Row-Channel-Bank-Column, or
    Row-Bank-ColumnHigh-Channel-ColumnLow with a channel interleave)."""

    def __init__(self, cfg: SystemConfig, micro: Micro, calib: Calib):
        p = cfg.pim
        self.cfg = cfg
        self.ch = [Channel(cfg, micro, calib) for _ in range(p.channels)]
        self.col_lo = (p.column_bytes - 1).bit_length()
        self.bank_lo = self.col_lo + (p.columns - 1).bit_length()
        self.chan_lo = self.bank_lo + (p.banks - 1).bit_length()
        self.row_lo = self.chan_lo + (p.channels - 1).bit_length()
        self.nb, self.nc, self.nr = p.banks, p.channels, p.rows
        self.resp = cfg.timing.tRL + calib.col_to_resp
        self.arr = calib.req_to_ctrl
        self.il = micro.interleave or p.channel_interleave
        self.row_b = p.row_bytes
        self.max_col = -INF       # latest column command of the transfer being timed
        self.ahead = None         # (kernel time, column command cycle) of requests decided ahead of time
        self.now = 0

    def blocked(self, c, t):
        """End of the PIM window channel ``c`` is in at cycle ``t`` (None when not in one)."""
        for s, e in self.ch[c].pim_windows:
            if s <= t < e:
                return e
        return None

    def where(self, addr):
        """(channel, bank, row) of a byte address."""
        if self.il:
            g = addr // self.il
            x = (g // self.nc) * self.il + addr % self.il          # byte address inside the channel
            return g % self.nc, (x // self.row_b) % self.nb, (x // (self.row_b * self.nb)) % self.nr
        return ((addr >> self.chan_lo) & (self.nc - 1), (addr >> self.bank_lo) & (self.nb - 1),
                (addr >> self.row_lo) & (self.nr - 1))

    def request(self, addr, write, t_issue):
        """Request issued by a requester in cycle ``t_issue``: returns the response's cycle at the requester."""
        if self.il:                                                  # as where(), inlined (the hot path)
            il = self.il
            g = addr // il
            x = (g // self.nc) * il + addr % il
            c, b, r = g % self.nc, (x // self.row_b) % self.nb, (x // (self.row_b * self.nb)) % self.nr
        else:
            c, b, r = self.where(addr)
        col = self.ch[c].access(b, r, write, t_issue + self.arr)
        if col > self.max_col:
            self.max_col = col
        if self.ahead is not None and col > self.now:
            self.ahead.append((self.now, col))
        return col + self.resp


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------

@dataclass
class ProgramResult:
    cycles: float
    start: float
    end: float
    busy: dict = field(default_factory=dict)        # unit -> busy cycles (MU, VQ, PCU)
    work: dict = field(default_factory=dict)        # cycle attribution (see PerfModel.run_program)
    events: dict = field(default_factory=dict)      # event counts for the energy model
    counters: dict = field(default_factory=dict)    # per channel: hits, misses, refreshes, ...
    spans: dict = field(default_factory=dict)       # unit -> busy intervals relative to the start
    breakdown: dict = field(default_factory=dict)   # tag -> cycles (exclusive, see _Run._breakdown)


def _take(slots: _Slots, t) -> int:
    """The first cycle >= ``t`` not yet in ``slots`` (taken)."""
    c = slots.take(t)
    if len(slots.nf) > 20000:
        slots.keep_from(c - 8192)
    return c


class _BusyTracker:
    """Busy intervals of a unit, for the CP's idle rule and the busy counters."""

    def __init__(self):
        self.active = 0
        self.since = 0.0
        self.total = 0.0
        self.idle_at = 0.0       # busy low from this cycle (when active == 0)
        self.handoff = -INF      # last cycle an instruction was handed to the unit
        self.spans = []

    def up(self, now):
        if self.active == 0:
            self.since = now + 1         # busy rises the cycle after the unit accepts
        self.active += 1

    def down(self, now):
        self.active -= 1
        if self.active == 0:
            self.total += now - self.since
            self.idle_at = now
            self.spans.append((self.since, now))


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------

OP_WRITE_VEC, OP_GEMV, OP_READ_RES = 1, 2, 3
F_BIAS, F_GELU, F_BF16 = 1, 2, 4


class PerfModel:
    """Times programs on one configuration; memory state (open rows, refresh) and time carry over
    from one program to the next like on the RTL, where the host starts them back to back."""

    def __init__(self, cfg: SystemConfig, micro: Micro | None = None, calib: Calib | None = None):
        self.cfg = cfg
        self.micro = micro or micro_for(cfg)
        self.calib = calib or Calib()
        self.mem = Memory(cfg, self.micro, self.calib)
        self.k = cfg.clocks.pim_mhz / cfg.clocks.npu_mhz      # memory cycles per NPU cycle
        self.time = 0.0
        self.programs = 0
        self.cache = {}
        self.mu_port = (_Slots(), [-INF])    # the matrix unit's memory port (load + store share it):
        #                                   request cycles taken, last response delivered
        p = cfg.pim
        # cache key: offset in a DRAM row (channel and bank symmetric); with a channel interleave the bank
        # changes every channels * row_bytes
        self.align = p.row_bytes * (p.channels if self.mem.il else 1)
        n = cfg.npu
        self.R, self.C, self.L = n.array_rows, n.array_cols, n.vector_lanes
        self.macs = n.macs_per_pe

    # ---------------------------------------------------------------- public
    def run_program(self, words, ins: list[Ins] | None = None, prog_addr: int | None = None,
                    start: float | None = None, tags: list[str] | None = None) -> ProgramResult:
        """Time one program. It starts ``Calib.gap`` cycles after the previous one ended (the host's
        register accesses between programs), or at cycle ``start`` when given (cycle 0 is the first
        program's start; the DRAM refresh counters started ``Calib.first_start`` cycles earlier)."""
        ins = ins if ins is not None else decode_program(words)
        if start is None:
            start = self.time + (self.calib.gap if self.programs else 0)
        elif start < self.time:
            self._truncate(start)
        run = _Run(self, ins, start, prog_addr if prog_addr is not None else 0, tags)
        res = run.execute()
        self.time = res.end
        self.programs += 1
        return res

    def _truncate(self, t0):
        """A program starts at ``t0`` before the previous one ended in the model: the RTL had finished
        it ``Calib.gap`` cycles before ``t0`` (the host's register accesses followed). Drop the memory
        traffic the model had timed after that point; the REFs falling due in the gap start as they
        fall due (the channels are idle there), the earlier ones were done."""
        g0 = t0 - self.calib.gap
        first = self.cfg.timing.tREFI - 1 - self.calib.first_start     # the refresh counter's first tick
        for ch in self.mem.ch:
            ch.slots.keep_upto(g0)
            ch.row_slots.keep_upto(g0)
            ch.qtimes = [x for x in ch.qtimes if x <= g0]
            ch.rewind(g0)
            ch.acts = deque((x for x in ch.acts if x <= g0), maxlen=4)
            ch.rrd_ok = min(ch.rrd_ok, g0 + 1)
            ch.idle_from = min(ch.idle_from, g0)
            ch.ref_log = [r for r in ch.ref_log if r <= g0]
            ch.last_ref = ch.ref_log[-1] if ch.ref_log else -INF
            ch.rfc_ok = ch.last_ref + ch.t.tRFC
            ch.ref_free = ch.last_ref + 2
            ch.act_ok = [min(x, max(g0, ch.rfc_ok)) for x in ch.act_ok]
            ch.next_tick = first + max(0, math.ceil((g0 - first) / ch.t.tREFI)) * ch.t.tREFI
            ch.owed = 0
            ch._tick_until(t0)
        self.mu_port[0].keep_upto(g0)
        self.mu_port[1][0] = min(self.mu_port[1][0], g0)

    def run_stages(self, stages, prog_addrs=None) -> list[ProgramResult]:
        out = []
        for i, st in enumerate(stages):
            out.append(self.run_program(st.words, prog_addr=None if prog_addrs is None else prog_addrs[i]))
        return out


class _Run:
    """One program on the model."""

    def __init__(self, model: PerfModel, ins, start, prog_addr, tags=None):
        self.m = model
        self.cfg = model.cfg
        self.cal = model.calib
        self.mi = model.micro
        self.mem = model.mem
        self.ins = ins
        self.t0 = math.ceil(start)
        self.prog_addr = prog_addr
        self.K = model.kernel = _Kernel()
        self.K.now = self.t0
        self.units = {"mu": _BusyTracker(), "vq": _BusyTracker(), "pcu": _BusyTracker()}
        self.ev_idle = _Event()
        self.work = {"mu_compute": 0.0, "mu_load": 0.0, "mu_store": 0.0, "vq_vector": 0.0, "vq_dma": 0.0,
                     "pcu": 0.0, "fence_wait": 0.0, "pim_block": 0.0}
        self.events = {"mac": 0, "vec_elem": 0, "spm_rd_bytes": 0, "spm_wr_bytes": 0, "pim_mac_cols": 0,
                       "pim_gb_writes": 0, "pim_acts": 0, "pim_io_cols": 0, "pim_af": 0, "dma_bytes": 0,
                       "dram_acts": 0, "dram_reads": 0, "dram_writes": 0, "dram_refs": 0}
        # matrix unit
        self.sem = [0] * mu_isa.N_SEMAPHORES
        self.ev_sem = _Event()
        self.mu_dec = None                # (Ins, cycle) waiting in the decode register
        self.mu_q = [deque(), deque(), deque()]
        self.ev_muq = [_Event(), _Event(), _Event()]
        self.ev_mudec = _Event()
        self.ev_mudec_in = _Event()
        # vector queue / PCU queues
        self.vq_q = deque()
        self.ev_vq = _Event()
        self.ev_vq_space = _Event()
        self.pcu_q = deque()
        self.ev_pcu = _Event()
        self.ev_pcu_space = _Event()
        self.end_time = None
        self.c0 = [dict(ch.c) for ch in self.mem.ch]
        self.ev_fetch = _Event()
        self.ev_pop = _Event()
        self.win_log = []                 # PIM windows registered so far (DMAs in flight are pushed back)
        self.fetch_state = None
        self.tags = tags
        self.intervals = []               # (start, end, tag) of every instruction a unit executed

    # ---------------------------------------------------------------- helpers
    def execute(self) -> ProgramResult:
        K = self.K
        K.spawn(self._cp())
        for q in range(3):
            K.spawn(self._mu_engine(q))
        K.spawn(self._mu_decode())
        K.spawn(self._vq())
        K.spawn(self._pcu())
        K.run()
        if self.end_time is None:
            raise RuntimeError("program did not reach END (deadlock in the model)")
        end = self.end_time + self.cal.end_extra
        # refreshes while the host reads the counters (the channels are idle after END)
        for ch in self.mem.ch:
            ch.refresh_idle(end + self.cal.counter_read)
        busy = {u: b.total for u, b in self.units.items()}
        breakdown = self._breakdown(self.t0, end + 1)
        counters = {}
        for i, ch in enumerate(self.mem.ch):
            for k, v in ch.c.items():
                counters[f"ch{i}.{k}"] = v - self.c0[i][k]
        for ev, k in (("dram_acts", "acts"), ("dram_reads", "reads"), ("dram_writes", "writes"),
                      ("dram_refs", "refreshes")):
            self.events[ev] += sum(counters[f"ch{i}.{k}"] for i in range(len(self.mem.ch)))
        return ProgramResult(cycles=end - self.t0 + 1, start=self.t0, end=end + 1, busy=busy, work=self.work,
                             events=self.events, counters=counters, breakdown=breakdown,
                             spans={u: [(a - self.t0, b - self.t0) for a, b in t.spans] for u, t in self.units.items()})

    # tags in priority order: a cycle in which several are active counts for the first
    PRIORITY = ("qkv", "proj", "ffn", "attention", "vector", "wait_pim")

    def _tag(self, ins, default):
        if self.tags is not None:
            return self.tags[ins.idx]
        return default

    def _breakdown(self, t0, t1):
        """Exclusive time per tag: every cycle of the program goes to the highest-priority tag active in
        it (:data:`PRIORITY`); cycles no unit works in are ``overhead`` (fetch, dispatch, FENCE)."""
        pr = {t: i for i, t in enumerate(self.PRIORITY)}
        pts = []
        for a, b, tag in self.intervals:
            if b > a:
                pts.append((a, 0, tag))
                pts.append((b, 1, tag))
        pts.sort(key=lambda x: (x[0], x[1]))
        active = {}
        out = {t: 0.0 for t in self.PRIORITY}
        out["overhead"] = 0.0
        last = t0
        for t, kind, tag in pts:
            t = min(max(t, t0), t1)
            if t > last:
                if active:
                    top = min(active, key=lambda x: pr.get(x, 99))
                    out[top] = out.get(top, 0.0) + t - last
                else:
                    out["overhead"] += t - last
                last = t
            if kind == 0:
                active[tag] = active.get(tag, 0) + 1
            else:
                active[tag] -= 1
                if not active[tag]:
                    del active[tag]
        if t1 > last:
            out["overhead"] += t1 - last
        return out

    # ---------------------------------------------------------------- command processor
    def _fetcher(self):
        """Instruction fetch: one request per cycle, at most ``fetch_depth`` fetched and not yet popped."""
        K, cal, mem, kf = self.K, self.cal, self.mem, self.m.k
        st = self.fetch_state
        n = len(self.ins)
        depth = self.mi.fetch_depth
        a = self.t0
        for i in range(n):
            while i >= st["popped"] + depth:
                yield self.ev_pop
                a = max(a, st["pop_time"] + 1)
            if a > K.now:
                yield a
            c, b, r = mem.where(self.prog_addr + 32 * i)
            while True:         # a request waits in the controller while a macro holds the channel
                e = mem.blocked(c, a + mem.arr)
                if e is None:
                    break
                a = e + 1 - mem.arr
                yield a
            col = mem.ch[c].access(b, r, False, a + mem.arr)
            st["col"][i] = col
            rr = max(col + mem.resp, st["last_resp"] + 1)
            st["last_resp"] = rr
            st["head"][i] = rr + cal.fetch_to_head
            st["next"] = i + 1
            K.notify(self.ev_fetch)
            a += kf

    def _cp(self):
        K, cal, mi = self.K, self.cal, self.mi
        n = len(self.ins)
        kf = self.m.k
        st = self.fetch_state = {"head": [None] * n, "col": [0.0] * n, "next": 0, "popped": 0, "pop_time": 0,
                                 "last_resp": -INF}
        head = st["head"]
        K.spawn(self._fetcher())
        t = self.t0
        for i, ins in enumerate(self.ins):
            while head[i] is None or max(t, head[i]) > K.now:
                if head[i] is None:
                    yield self.ev_fetch
                else:
                    yield max(t, head[i])
            op = ins.op
            if op in (SocOp.FENCE, SocOp.END):
                mask = 7 if op == SocOp.END else ins.f["units"]
                names = [u for bit, u in ((1, "mu"), (2, "vq"), (4, "pcu")) if mask & bit]
                w0 = K.now
                while True:
                    if all(self.units[u].active == 0 for u in names):
                        break
                    yield self.ev_idle
                ti = K.now
                for u in names:
                    b = self.units[u]
                    ti = max(ti, b.idle_at, b.handoff + 2)
                if op == SocOp.END:
                    ti += 1
                ti += cal.fence_extra + (self.mi.sync_cycles if (op == SocOp.FENCE and self.mi.cores > 1) else 0)
                self.work["fence_wait"] += ti - w0
                if ti > K.now:
                    yield ti
                if op == SocOp.END:
                    self.end_time = K.now
                    return
            else:
                if op == SocOp.MATRIX:
                    while self.mu_dec is not None:
                        yield self.ev_mudec
                    self.mu_dec = (ins, K.now)
                    self.units["mu"].up(K.now)
                    self.units["mu"].handoff = K.now
                    K.notify(self.ev_mudec_in)
                elif op == SocOp.PIM:
                    while len(self.pcu_q) >= mi.macro_depth:
                        yield self.ev_pcu_space
                    self.pcu_q.append((ins, K.now))
                    self.units["pcu"].up(K.now)
                    self.units["pcu"].handoff = K.now
                    K.notify(self.ev_pcu)
                else:
                    while len(self.vq_q) >= mi.vq_depth:
                        yield self.ev_vq_space
                    self.vq_q.append((ins, K.now))
                    self.units["vq"].up(K.now)
                    self.units["vq"].handoff = K.now
                    K.notify(self.ev_vq)
            t = K.now + kf
            st["popped"] = i + 1          # the pop frees a FIFO credit: the next fetch may go out
            st["pop_time"] = K.now
            K.notify(self.ev_pop)
        self.end_time = K.now

    def _pim_window(self, s, e):
        """A macro holds the channels from cycle ``s`` to ``e``: fetches not yet decided wait for its end."""
        st = self.fetch_state
        if st is None:
            return
        pend = [i for i in range(st["popped"], st["next"]) if st["head"][i] is not None and st["col"][i] > s]
        if not pend:
            return
        for i in pend:
            st["head"][i] = None
        st["retry"] = sorted(set(st.get("retry", [])) | set(pend))
        self.K.at(e, self._fetch_retry)

    def _fetch_retry(self):
        """Re-issue the fetches a macro held back, unless another macro holds the channel now."""
        st, mem, K = self.fetch_state, self.mem, self.K
        pend = st.get("retry", [])
        if not pend:
            return
        t = K.now
        last = -INF
        for n_, i in enumerate(pend):
            c, b, r = mem.where(self.prog_addr + 32 * i)
            e = mem.blocked(c, t)
            if e is not None:
                st["retry"] = pend[n_:]
                K.at(e, self._fetch_retry)
                break
            col = mem.ch[c].access(b, r, False, t)
            st["col"][i] = col
            rr = max(col + mem.resp, last + 1)
            st["head"][i] = rr + self.cal.fetch_to_head
            last = rr
        else:
            st["retry"] = []
        if last > st["last_resp"]:
            st["last_resp"] = last
        K.notify(self.ev_fetch)

    # ---------------------------------------------------------------- matrix unit
    def _mu_decode(self):
        """Decode register -> one of the three queues (blocks while that queue is full)."""
        K, cal = self.K, self.cal
        while True:
            while self.mu_dec is None:
                yield self.ev_mudec_in
            ins, t = self.mu_dec
            tt = t + self.m.k
            if tt > K.now:
                yield tt
            q = _MU_QUEUE[ins.f["opcode"]]
            while len(self.mu_q[q]) >= self.mi.mu_queue:
                yield self.ev_muq[q]
            self.mu_q[q].append((ins, K.now + cal.mu_q_lat * self.m.k))
            self.units["mu"].up(K.now)            # held by the queue entry
            self.mu_dec = None
            self.units["mu"].down(K.now)          # released by the decode register
            K.notify(self.ev_mudec)
            K.notify(self.ev_muq[q])

    def _sem_ok(self, mask):
        s = self.sem
        i = 0
        while mask:
            if mask & 1 and s[i] == 0:
                return False
            mask >>= 1
            i += 1
        return True

    def _give(self, mask):
        i = 0
        while mask:
            if mask & 1:
                self.sem[i] += 1
            mask >>= 1
            i += 1
        self.K.notify(self.ev_sem)

    def _mu_engine(self, qi):
        K, cal, kf = self.K, self.cal, self.m.k
        q = self.mu_q[qi]
        free = K.now
        while True:
            while not q:
                yield self.ev_muq[qi]
            ins, t_head = q[0]
            tt = max(t_head, free)
            if tt > K.now:
                yield tt
            f = ins.f
            while not self._sem_ok(f["wait"]):
                yield self.ev_sem
            i = 0
            mask = f["wait"]
            while mask:
                if mask & 1:
                    self.sem[i] -= 1
                mask >>= 1
                i += 1
            q.popleft()
            K.notify(self.ev_muq[qi])
            start = K.now
            op = f["opcode"]
            if op in ("LOAD", "STORE"):
                nw = len(self.win_log)
                self.mem.max_col = -INF
                key = (op, f["transpose"], f["bf16"], f["rows"], f["cols"], f["mem_stride"],
                       f["mem_addr"] % self.m.align)
                done, cached = yield from self._timed(
                    key, start + cal.mu_dma_start * kf,
                    lambda t, f=f, op=op: self._held((self._mu_load if op == "LOAD" else self._mu_store)(f, t)))
                if cached:          # a macro started meanwhile holds the transfer back
                    done = yield from self._dma_pushback(done, nw)
                elif done > K.now:
                    yield done
                self.work["mu_load" if op == "LOAD" else "mu_store"] += done - start
                wait = min(done - start, self._pim_overlap(start, done, 0 if not cached else nw))
                self.work["pim_block"] += wait
                self.intervals.append((start, done - wait, self._tag(ins, "mu")))
                if wait > 0:
                    self.intervals.append((done - wait, done, "wait_pim"))
                free = done + kf
                sig_at = done
            elif op == "COMPUTE":
                issue, drain = self._mu_compute(f)
                self.work["mu_compute"] += issue
                self.intervals.append((start, start + issue + drain, self._tag(ins, "mu")))
                free = start + (cal.mu_comp_start) * kf + issue
                sig_at = free + drain
            else:       # NOP
                free = start + kf
                sig_at = start
            sig = f["signal"]
            if sig:
                K.at(sig_at + cal.sem_lat * kf, lambda s=sig: self._give(s))
            extra = cal.mu_store_extra if op == "STORE" else 0
            K.at(sig_at + (cal.mu_idle_lat + extra) * kf, self._mu_down)

    def _timed(self, key, t0, fn):
        """A generator: ``fn(t0)`` (itself a generator) -> end cycle, or the cached duration of the same
        shape (``Micro.cache``). Returns (end cycle, whether it came from the cache)."""
        if not self.mi.cache:
            end = yield from fn(t0)
            return end, False
        hit = self.m.cache.get(key)
        if hit is not None:
            dur, ev = hit
            for k, v in ev.items():
                self.events[k] += v
            self.mem.max_col = t0 + dur
            return t0 + dur, True
        before = dict(self.events)
        chans = [dict(ch.c) for ch in self.mem.ch]
        end = yield from fn(t0)
        ev = {k: v - before[k] for k, v in self.events.items()}
        for ev_k, k in (("dram_acts", "acts"), ("dram_reads", "reads"), ("dram_writes", "writes")):
            ev[ev_k] += sum(ch.c[k] - c0[k] for ch, c0 in zip(self.mem.ch, chans, strict=True))
        self.m.cache[key] = (end - t0, ev)
        return end, False

    def _held(self, gen):
        """Run a DMA process; requests it had timed ahead of a PIM macro's start (decided after it)
        wait for the macro: the transfer cannot finish before they are served after it."""
        mem = self.mem
        ahead = []
        nw = len(self.win_log)
        it = iter(gen)
        try:
            w = None
            while True:
                mem.ahead, mem.now = ahead, self.K.now
                w = it.send(w) if w is not None else next(it)
                mem.ahead = None
                w = yield w
        except StopIteration as stop:
            done = stop.value
        mem.ahead = None
        while True:                     # a macro may start before the transfer is done
            if done > self.K.now:
                yield done
            late = done
            for s, e in self.win_log[nw:]:
                held = [c for tc, c in ahead if tc <= s < c]
                if held:
                    late = max(late, e + 1 + (max(held) - s) + mem.resp)
            nw = len(self.win_log)
            if late <= done:
                return done
            ahead = [(tc, c + late - done) for tc, c in ahead]
            done = late

    def _pcu_macro(self, key, start, f):
        """A macro's end cycle (cached by shape under ``Micro.cache``)."""
        if self.mi.cache and key in self.m.cache:
            dur, ev = self.m.cache[key]
            for k, v in ev.items():
                self.events[k] += v
            return start + dur
        before = dict(self.events)
        end = _PcuMacro(self, f, start).run()
        if self.mi.cache:
            self.m.cache[key] = (end - start, {k: v - before[k] for k, v in self.events.items()})
        return end

    def _pim_overlap(self, a, b, nw):
        """Cycles of [a, b) inside PIM windows registered from index ``nw`` on (DMA waiting for PIM)."""
        return sum(max(0, min(e, b) - max(s, a)) for s, e in self.win_log[nw:])

    def _dma_pushback(self, done, nw):
        """Wait for a DMA to finish; a PIM macro that started before its last request was issued
        holds the rest of it back for the macro's duration."""
        last = self.mem.max_col
        while True:
            if done > self.K.now:
                yield done
            ext = sum(e - s for s, e in self.win_log[nw:] if s < last)
            nw = len(self.win_log)
            if ext <= 0:
                return done
            self.work["pim_block"] += ext
            done += ext
            last += ext

    def _mu_down(self):
        self.units["mu"].down(self.K.now)
        self.K.notify(self.ev_idle)

    def _mu_compute(self, f):
        """(cycles until the next instruction may start, further cycles until the tokens), memory cycles."""
        R, C, kf = self.m.R, self.m.C, self.m.k
        M, Kd, N = f["m"], f["k"], f["n"]
        KB = -(-Kd // (R * self.m.macs))
        NB = -(-N // C)
        NB = -(-NB // self.mi.cores)
        slot = max(M, R, 4)
        self.events["mac"] += M * Kd * N
        self.events["spm_rd_bytes"] += (M * Kd + Kd * N) * 2 * 1
        self.events["spm_wr_bytes"] += M * N * 4
        issue = max(R, 4) + slot * KB * NB
        drain = R + C + 3 - (slot - M)
        return issue * kf, max(1, drain) * kf

    # DMA engines run as processes of the event kernel: every request is timed when its engine issues
    # it (``yield`` to that cycle first, ``LOOKAHEAD`` cycles at most ahead of the kernel's time), so
    # that concurrent streams reach the channels in time order (bank conflicts between them, queue
    # occupancy), and so that a PIM macro started meanwhile holds the requests issued after its start.
    LOOKAHEAD = 4

    def _port(self):
        """The matrix unit's one memory port (load and store engines behind a round-robin arbiter):
        one request per cycle, responses delivered in request order (the fabric's reorder buffer).
        ``None`` for the projected system (wide ports per engine)."""
        if self.mi.dma_issue * self.mi.cores != 1:
            return None
        return self.m.mu_port

    def _mu_load(self, f, t):
        """LOAD (a generator): returns the cycle the engine finishes."""
        mem, kf, mi, K = self.mem, self.m.k, self.mi, self.K
        W = self.m.R
        rows, cols, stride, base = f["rows"], f["cols"], f["mem_stride"], f["mem_addr"]
        ncol = -(-cols // 16)
        self.events["dma_bytes"] += rows * ncol * 32
        self.events["spm_wr_bytes"] += rows * cols * 2
        gap = kf / (mi.dma_issue * mi.cores)
        rgap = 1 if mi.dma_issue * mi.cores == 1 else gap    # responses in order, one per port per cycle
        outmax = mi.dma_outstanding * mi.cores
        port = self._port()
        la = self.LOOKAHEAD
        cons = deque()
        a = t - gap
        last_r = -INF
        h = t
        per = kf / mi.cores        # engine cycles per scratchpad word (cores in parallel)

        def issue(addr):
            nonlocal a, last_r
            a += gap
            if len(cons) >= outmax:
                a = max(a, cons.popleft() + 1)
            if port is not None:
                a = _take(port[0], a)
            return a

        def deliver(rr, ready):
            nonlocal last_r
            rr = max(rr, last_r + rgap, ready)
            if port is not None:
                rr = max(rr, port[1][0] + 1)       # behind every earlier response of the port
                port[1][0] = rr
            last_r = rr
            return rr

        if not f["transpose"]:
            ppc = max(1, 16 // min(W, 16))
            for r in range(rows):
                ra = base + r * stride
                for c in range(ncol):
                    ai = issue(ra + 32 * c)
                    if ai > K.now + la:
                        yield ai
                    rem = cols - c * 16
                    # scratchpad words written for this column (a word wider than a column: a fraction)
                    pieces = min(ppc, -(-rem // W)) if W <= 16 else min(16, rem) / W
                    rr = deliver(mem.request(ra + 32 * c, False, ai), h)
                    h = max(rr, h) + pieces * per
                    cons.append(h - min(per, pieces * per))
        else:
            Wb = min(W, 16) if self.cfg.npu.array_rows <= 16 else W
            gper = per / mi.dma_issue          # the gather buffer takes dma_issue rows per cycle
            nbuf = mi.transpose_buffers
            buf_free = [t] * nbuf              # a W x 16 buffer is free again when its words are written
            emit_free = t
            k = 0
            for b0 in range(0, rows, Wb):
                nr = min(Wb, rows - b0)
                for c in range(ncol):
                    ne = min(16, cols - c * 16)
                    for w in range(nr):
                        addr = base + (b0 + w) * stride + 32 * c
                        ai = issue(addr)
                        if ai > K.now + la:
                            yield ai
                        rr = deliver(mem.request(addr, False, ai), max(h, buf_free[k]))
                        h = max(rr, h) + gper
                        cons.append(h - gper)
                    es = max(h, emit_free)     # the emitter writes the transpose, one word per cycle
                    emit_free = es + ne * per
                    buf_free[k] = emit_free
                    k = (k + 1) % nbuf
            h = max(h, emit_free)
        return h + self.cal.mu_dma_end * kf

    def _mu_store(self, f, t):
        """STORE (a generator): returns the cycle the engine finishes."""
        mem, kf, mi, K = self.mem, self.m.k, self.mi, self.K
        C = self.m.C
        rows, cols, stride, base = f["rows"], f["cols"], f["mem_stride"], f["mem_addr"]
        bf16 = f["bf16"]
        E = 16 if bf16 else 8
        piece = min(C, E)
        self.events["spm_rd_bytes"] += rows * cols * 4
        per = kf / mi.cores
        rgap = 1 if mi.dma_issue * mi.cores == 1 else kf / (mi.dma_issue * mi.cores)
        g = t
        last_req = -INF
        last_ack = -INF
        acks = deque()
        outmax = mi.dma_outstanding * mi.cores
        ncol = -(-cols // E)
        self.events["dma_bytes"] += rows * ncol * 32
        port = self._port()
        issued = deque()          # request cycles of the columns in the 4-entry write FIFO
        for r in range(rows):
            ra = base + r * stride
            for c in range(ncol):
                n_el = min(E, cols - c * E)
                if len(issued) >= 4:            # FIFO full: the generator waits for a request to leave
                    g = max(g, issued.popleft())
                g += (-(-n_el // piece) if C <= E else n_el / C) * per
                a = max(g + kf, last_req + per)
                if len(acks) >= outmax:
                    a = max(a, acks.popleft() + 1)
                if port is not None:
                    a = _take(port[0], a)
                if a > K.now + self.LOOKAHEAD:
                    yield a
                last_req = a
                issued.append(a)
                ack = max(mem.request(ra + c * 32, True, a), last_ack + rgap)
                if port is not None:
                    ack = max(ack, port[1][0] + 1)
                    port[1][0] = ack
                last_ack = ack
                acks.append(ack)
        return max(last_ack, g) + self.cal.mu_dma_end * kf

    # ---------------------------------------------------------------- vector queue
    def _vq(self):
        K, cal, kf = self.K, self.cal, self.m.k
        free = K.now
        while True:
            while not self.vq_q:
                yield self.ev_vq
            ins, t_in = self.vq_q[0]
            tt = max(t_in + cal.vq_fifo_lat * kf, free)
            if tt > K.now:
                yield tt
            self.vq_q.popleft()
            K.notify(self.ev_vq_space)
            start = K.now
            if ins.op == SocOp.VECTOR:
                d = self._vec_cycles(ins.f) * kf
                done = start + cal.vq_vec_over * kf + d
                self.work["vq_vector"] += d
                self.intervals.append((start, done, self._tag(ins, "vector")))
            else:
                t1 = start + cal.vq_dma_over * kf
                nw = len(self.win_log)
                self.mem.max_col = -INF
                f = ins.f
                key = (int(ins.op), f["rows"], f["cols"], f["mem_stride"], f["mem_addr"] % self.m.align)
                done, cached = yield from self._timed(key, t1, lambda t, ins=ins: self._held(self._vdma(ins, t)))
                if cached:
                    done = yield from self._dma_pushback(done, nw)
                elif done > K.now:
                    yield done
                wait = min(done - start, self._pim_overlap(start, done, 0 if not cached else nw))
                self.work["pim_block"] += wait
                self.intervals.append((start, done - wait, self._tag(ins, "vector")))
                if wait > 0:
                    self.intervals.append((done - wait, done, "wait_pim"))
                self.work["vq_dma"] += done - t1
            free = done + cal.vq_done_over * kf
            K.at(free + cal.vq_idle_lat * kf, self._vq_down)
            yield free

    def _vq_down(self):
        self.units["vq"].down(self.K.now)
        self.K.notify(self.ev_idle)

    def _vec_cycles(self, f):
        n, rows, op = f["n"], f["rows"], f["op"]
        self.events["vec_elem"] += n * rows * (3 if op in ("SOFTMAX", "LN_STATS") else 1)
        self.events["spm_rd_bytes"] += n * rows * 4
        self.events["spm_wr_bytes"] += n * rows * 4
        return vector_cycles(op, n, rows, self.m.L, cores=self.mi.cores)

    def _vdma(self, ins, t):
        """VLOAD / VSTORE (a generator): returns the cycle the transfer is done."""
        mem, kf, mi, cal, K = self.mem, self.m.k, self.mi, self.cal, self.K
        f = ins.f
        rows, cols, stride, base = f["rows"], f["cols"], f["mem_stride"], f["mem_addr"]
        store = ins.op == SocOp.VSTORE
        self.events["dma_bytes"] += rows * cols * 32
        self.events["spm_rd_bytes" if store else "spm_wr_bytes"] += rows * cols * 32
        gap = kf / (mi.dma_issue * mi.cores)
        rgap = 1 if mi.dma_issue * mi.cores == 1 else gap
        outmax = mi.dma_outstanding * mi.cores
        a = t - gap + (cal.vdma_store_lat * kf if store else 0)
        last_r = -INF
        cons = deque()
        for r in range(rows):
            ra = base + r * stride
            for c in range(cols):
                a += gap
                if len(cons) >= outmax:
                    a = max(a, cons.popleft() + 1)
                if a > K.now + self.LOOKAHEAD:
                    yield a
                rr = mem.request(ra + 32 * c, store, a)
                if rr < last_r + rgap:
                    rr = last_r + rgap
                last_r = rr
                cons.append(rr)
        return last_r + cal.vdma_end * kf

    # ---------------------------------------------------------------- PCU
    def _pcu(self):
        K, cal, kf = self.K, self.cal, self.m.k
        free = K.now
        while True:
            while not self.pcu_q:
                yield self.ev_pcu
            ins, t_in = self.pcu_q[0]
            tt = max(t_in + cal.macro_q_lat * kf, free)
            if tt > K.now:
                yield tt
            self.pcu_q.popleft()
            K.notify(self.ev_pcu_space)
            start = K.now
            f = ins.f
            key = ("pim", f["op"], f["flags"], f["n"], f["m"], f["addr0"] % self.m.align)
            end = self._pcu_macro(key, start, f)
            self.work["pcu"] += end - start
            self.intervals.append((start, end, self._tag(ins, "pim")))
            # Normal traffic waits while the macro holds the channels: pim_mode is high from the cycle
            # after the PCU takes the macro to the cycle its busy falls (``end``).
            for ch in self.mem.ch:
                ch.pim_windows.append((start + 1, end + 1))
                if len(ch.pim_windows) > 64:
                    del ch.pim_windows[:32]
            self.win_log.append((start + 1, end + 1))
            self._pim_window(start, end + 1)
            free = end + cal.pcu_end
            K.at(free + cal.pcu_idle_lat, self._pcu_down)
            yield free

    def _pcu_down(self):
        self.units["pcu"].down(self.K.now)
        self.K.notify(self.ev_idle)


_MU_QUEUE = {"LOAD": 0, "COMPUTE": 1, "NOP": 1, "STORE": 2}


class _PcuMacro:
    """One macro PIM command, micro command by micro command (:class:`hw.pcu.Pcu`'s state machine).

    ``self.t`` is the cycle of the state machine's current state, ``self.free`` the first cycle the
    command stream can load a command: an emitting state loads at ``max(t, free)``; the command is on
    the controllers' inputs the next cycle and decided at the first cycle their rules allow (``a``,
    the last channel's); the next command can be loaded in that same cycle (``Micro.pcu_emit_cycles``
    = 1: one command per cycle without stalls). Buffer reads happen at load time and cost nothing."""

    def __init__(self, run: _Run, f, start):
        self.r = run
        self.f = f
        self.mem = run.mem
        self.p = run.cfg.pim
        self.tm = run.cfg.timing
        self.ev = run.events
        self.emit_extra = run.mi.pcu_emit_cycles - 1
        self.t = start
        self.free = start
        self.served = [[] for _ in range(self.p.channels)]   # per channel: cycles its responses were taken
        self.port_free = 0
        self.resp_lat = 1 + self.tm.tRL + run.cal.pcu_resp_lat
        self.last_data = 0

    # -- controller side --
    def _earliest(self, ch: Channel, op, bank, tt):
        tm = self.tm
        if op == "ACT":
            a = max(tt, ch.act_ok[bank], ch.rrd_ok, ch.rfc_ok)
            if len(ch.acts) == 4:
                a = max(a, ch.acts[0] + tm.tFAW)
            return a
        if op == "ACTAB":
            a = max(tt, max(ch.act_ok), ch.rrd_ok, ch.rfc_ok)
            if len(ch.acts) == 4:
                a = max(a, ch.acts[0] + tm.tFAW)
            return a
        if op == "PREAB":
            pre = [ch.pre_ok[b] for b in range(ch.nb) if ch.open[b] >= 0]
            return max(tt, max(pre)) if pre else tt
        if op == "RD":
            return max(tt, ch.rd_ok[bank])
        if op == "WR":
            return max(tt, ch.wr_ok[bank])
        if op == "MACAB":
            return max(tt, max(ch.rd_ok))
        if op == "AF":
            return max(tt, max(ch.rd_ok), ch.mac_ok)
        if op in ("WRBIAS", "RDMAC"):
            return max(tt, ch.mac_ok)
        if op == "RDAF":
            return max(tt, ch.af_ok)
        return tt           # WRGB

    def _apply(self, ch: Channel, op, bank, row, a):
        tm = self.tm
        nb = ch.nb
        ch.c["pim_commands"] += 1
        if op in ("RD", "WR", "WRGB", "WRBIAS", "RDMAC", "RDAF"):
            self.ev["pim_io_cols"] += 1
        if op == "AF":
            self.ev["pim_af"] += nb
        if op in ("ACT", "ACTAB"):
            banks = [bank] if op == "ACT" else range(nb)
            ch.acts.append(a)
            ch.rrd_ok = a + tm.tRRD
            for b in banks:
                ch.open[b] = row
                ch.rd_ok[b] = a + tm.tRCDRD
                ch.wr_ok[b] = a + tm.tRCDWR
                ch.pre_ok[b] = max(ch.pre_ok[b], a + tm.tRAS)
            self.ev["pim_acts"] += len(banks)
        elif op == "PREAB":
            for b in range(nb):
                if ch.open[b] >= 0:
                    ch.open[b] = -1
                    ch.act_ok[b] = max(ch.act_ok[b], a + tm.tRP)
            ch.closed_from = a + 1
        elif op == "RD":
            ch.pre_ok[bank] = max(ch.pre_ok[bank], a + tm.tRTP)
        elif op == "WR":
            ch.pre_ok[bank] = max(ch.pre_ok[bank], a + tm.tWR)
        elif op in ("MACAB", "AF"):
            for b in range(nb):
                ch.pre_ok[b] = max(ch.pre_ok[b], a + tm.tRTP)
            if op == "AF":                  # tMAC counts from MACs only (hw.memctrl, sim.pim_checker)
                ch.af_ok = a + tm.tAF
            else:
                ch.mac_ok = a + tm.tMAC

    def emit(self, op, chans=None, bank=0, row=0, reads=False):
        e = max(self.t, self.free)
        t_pres = e + 1
        free = t_pres
        chans = range(self.p.channels) if chans is None else chans
        arrivals = []
        for c in chans:
            ch = self.mem.ch[c]
            a = self._earliest(ch, op, bank, max(t_pres, ch.pim_from))
            if ch.open.count(-1) == ch.nb and ch.refresh_pim(a, ch.closed_from):
                a = self._earliest(ch, op, bank, max(t_pres, ch.pim_from))
            a = ch.slot(a)
            self._apply(ch, op, bank, row, a)
            if reads:
                arrivals.append((a + self.resp_lat, c))
            free = max(free, a)
        for arr, c in sorted(arrivals):
            s = max(arr, self.port_free)
            self.served[c].append(s)
            self.port_free = s + 1
            self.last_data = max(self.last_data, arr)
        self.free = free + self.emit_extra
        self.t = e + 1
        return e

    def _wait_served(self, need):
        """Cycle from which every channel has had ``need`` responses taken (counters update a cycle later)."""
        w = self.t
        for c in range(self.p.channels):
            if need > 0:
                w = max(w, self.served[c][need - 1] + 1)
        self.t = w

    def _all_served(self):
        """The cycle after the last response so far was taken (0 without responses)."""
        return max((s[-1] + 1 for s in self.served if s), default=0)

    def run(self):
        f = self.f
        op = f["op"]
        start = self.t
        # Normal requests timed ahead of this macro wait for it (DMAs are pushed back, fetches re-timed):
        # drop their future command slots.
        for ch in self.mem.ch:
            ch.slots.keep_upto(start)
            ch.row_slots.keep_upto(start)
            ch.qtimes = [x for x in ch.qtimes if x <= start]
            ch.rewind(start)
            ch.idle_from = min(ch.idle_from, max(ch.qtimes, default=0) + 1) if ch.qtimes else ch.idle_from
            ch.refresh_idle(start + 1)          # refreshes of the normal-mode idle time before the macro
            ch.acts = deque((x for x in ch.acts if x <= start), maxlen=4)
            ch.rrd_ok = min(ch.rrd_ok, start + 1 + self.tm.tRRD)
        # Check (one cycle); pim_mode rises with busy: the controllers close the rows normal traffic
        # left open (PREAB once tRAS / tWR / tRTP allow) and serve PIM commands from the next cycle.
        self.t += 1
        for ch in self.mem.ch:
            ob = [b for b in range(ch.nb) if ch.open[b] >= 0]
            ready = start + 2
            if ob:
                a = ch.slot(max(start + 2, max(ch.pre_ok[b] for b in ob)))
                for b in ob:
                    ch.open[b] = -1
                    ch.act_ok[b] = max(ch.act_ok[b], a + self.tm.tRP)
                ch.closed_from = a + 1
                ready = a + 2
            ch.pim_from = ready
        self.t += 1
        if op == OP_WRITE_VEC:
            self._xfer(f["addr0"], -(-f["n"] * 2 // 32), "RD")
        elif op == OP_GEMV:
            self._gemv()
        elif op == OP_READ_RES:
            bf16 = f["flags"] & F_BF16
            self._xfer(f["addr0"], -(-f["n"] * (2 if bf16 else 4) // 32), "WR")
        # Finish: every command taken, every response in, the controllers idle; busy falls the cycle after.
        fin = max(self.t, self.free + 1, self._all_served(), self.last_data + 1)
        # REFs that fell due while rows were open start once the last PREAB closed them
        for ch in self.mem.ch:
            if ch.open.count(-1) == ch.nb:
                ch.refresh_pim(fin, ch.closed_from)
        return fin + 1

    def _xfer(self, addr0, nwords, kind):
        """A memory transfer in segments inside one row of every bank: ACT of every bank row of the segment
        (Row-Channel-Bank-Column: one per bank row, on its channel; channel-interleaved map: one per bank, in
        every channel the segment touches in that row, as :class:`hw.pcu.Pcu`), its columns in order
        (RD / WR), PREAB."""
        p = self.p
        rg = p.columns * p.banks * p.channels
        il = self.mem.il if p.channels > 1 else 0
        run = il // p.column_bytes if il else p.columns * p.banks       # words of a channel's run
        j = 0
        seg_end = min(nwords, rg - (addr0 // p.column_bytes) % rg)
        while True:
            ja = j
            while ja < seg_end:
                a = addr0 + p.column_bytes * ja
                c, b, row = self.mem.where(a)
                if il:
                    bg = p.columns * p.channels                           # words of one bank's row, all channels
                    pos = (a // p.column_bytes) % bg
                    end = min(ja + bg - pos, seg_end)
                    runs = (pos + end - ja - 1) // run - pos // run + 1
                    self.emit("ACT", sorted((c + i) % p.channels for i in range(min(runs, p.channels))), b, row)
                    ja += bg - pos
                else:
                    self.emit("ACT", [c], b, row)
                    ja += p.columns - (a // p.column_bytes) % p.columns
            for jj in range(j, seg_end):
                c, b, _row = self.mem.where(addr0 + p.column_bytes * jj)
                self.emit(kind, [c], b, reads=kind == "RD")
            self.emit("PREAB")
            if seg_end == nwords:
                return
            j = seg_end
            seg_end = min(nwords, seg_end + rg)

    def _gemv(self):
        f, p, tm = self.f, self.p, self.tm
        K, N = f["n"], f["m"]
        tiles = -(-N // (p.banks * p.channels))
        gbv = p.gb_values
        chunks = -(-K // gbv)
        G = p.acc_groups
        gelu = bool(f["flags"] & F_GELU)
        nch = p.channels
        before_pre = max(0, tm.tRTP // tm.tCCD - 1)
        before_act = max(0, tm.tRP // tm.tCCD - 1)
        after_act = max(0, tm.tRCDRD // tm.tCCD - 1 - G)

        def ncols(chunk):
            rem = K - chunk * gbv
            return p.gb_columns if rem >= gbv else -(-rem // p.lanes)

        def wrgb(k):
            for _ in range(k):
                self.emit("WRGB")
            self.ev["pim_gb_writes"] += k * nch

        written = 0
        bias_in = 0
        if f["flags"] & F_BIAS:
            self._xfer(f["addr0"], -(-N * 4 // 32), "RD")
            bias_in = self._all_served()             # the last bias word taken: preloads may start
            self.served = [[] for _ in range(nch)]
            written = min(max(0, ncols(0) - after_act), before_act)
            wrgb(written)
        one_tile = tiles == 1
        have_prev = prev_af = False
        row_i = 0
        for chunk in range(chunks):
            n = ncols(chunk)
            last_chunk = chunk == chunks - 1
            for tile in range(tiles):
                self.emit("ACTAB", row=f["row"] + tile * chunks + chunk)
                if not (one_tile and chunk > 0):
                    if have_prev:
                        for _g in range(G):
                            self.emit("RDAF" if prev_af else "RDMAC", reads=True)
                    for _g in range(G):
                        if chunk > 0:                    # this tile's partial sums of the previous chunk are in
                            self._wait_served((row_i - tiles + 1) * G)
                        else:
                            self.t = max(self.t, bias_in)
                        self.emit("WRBIAS")
                if tile == 0:
                    wrgb(n - written)
                    written = n
                for _c in range(n):
                    self.emit("MACAB")
                self.ev["pim_mac_cols"] += n * p.banks * nch
                new_chunk = tile == tiles - 1 and not last_chunk
                if new_chunk:
                    n_next = ncols(chunk + 1)
                    written = min(before_pre, n_next)
                    wrgb(written)
                self.emit("PREAB")
                have_prev = True
                prev_af = gelu and last_chunk
                row_i += 1
                if prev_af:
                    self.emit("ACTAB", row=p.data_rows)
                    self.emit("AF")
                    self.emit("PREAB")
                if new_chunk:
                    k = max(0, min(n_next, before_pre + before_act) - written)
                    wrgb(k)
                    written += k
        for _g in range(G):
            self.emit("RDAF" if prev_af else "RDMAC", reads=True)
