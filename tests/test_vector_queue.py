"""Vector queue (VECTOR / VLOAD / VSTORE of the SoC ISA): RTL against a Python reference, bit-exact.

The reference is the vector unit's golden model (:class:`sim.golden.vector.VectorModel`)
plus the byte-copy model of the vector DMA (:mod:`sim.golden.vdma`), over one
numpy image of the memory model. Programs are built with
:func:`firmware.isa.encode` and :func:`hw.npu.vector.encode`, run on
:class:`hw.npu.vector_queue.VectorQueueSystem` (Verilator, memory model with
a back door), and the whole memory is compared afterwards; the last
instruction of a run stores the whole scratchpad into memory, so stray
scratchpad writes are caught too.

Tiers: the VDMA engine alone on Amaranth's simulator for 2, 8, 32 and 64
lanes (layouts where a column is several words, one word, or part of a word);
the tiny configuration (4 lanes) on Verilator: a layernorm / add / softmax /
GELU program with and without memory back-pressure, every error code, and
the streaming throughput of VLOAD / VSTORE; the default configuration (16
lanes) once, marked ``long``.
"""

import numpy as np
import pytest

from firmware import isa
from firmware.isa import SocOp, VqError
from hw.config import preset
from hw.npu.vector import Opcode
from hw.npu.vector import encode as vencode
from sim.golden import fp as G
from sim.golden import vdma
from sim.golden.vector import BF16, FP32, MASK_CAUSAL, ROW, VectorModel

TINY = preset("tiny")
DEFAULT = preset("default")
TINY_WORDS_LOG2 = 10        # 32 KiB memory model of the 64 KiB tiny device: addresses above answer with an error
DEFAULT_WORDS_LOG2 = 14     # 512 KiB
MEM_LATENCY = 6             # memory model stages
T_MEM = MEM_LATENCY + 3     # measured request accepted -> response valid (its output FIFO adds one more
                            # cycle than MemoryModel.latency says)
COL = 32


def f32(x):
    return int(G.f32_bits(np.float32(x)))


def _ceil(a, b):
    return -(-a // b)


# -- programs and the reference ------------------------------------------------------------------------

def vl(**f):
    return ("VLOAD", f)


def vs(**f):
    return ("VSTORE", f)


def vec(**f):
    return ("VECTOR", f)


def encode(instr) -> int:
    kind, f = instr
    if kind == "VECTOR":
        return isa.encode(SocOp.VECTOR, word=vencode(**f))
    return isa.encode(SocOp[kind], **f)


class QueueRef:
    """The queue's reference: scratchpad (golden vector model) + memory image, executing segments."""

    def __init__(self, cfg, mem_bytes):
        n = cfg.npu
        self.lanes = n.vector_lanes
        self.vu = VectorModel(n.vector_lanes, n.vector_spm_words, acc_stages=n.vec_acc_stages)
        self.spm = self.vu.mem.view(np.uint8).reshape(-1)
        self.mem = np.zeros(mem_bytes, dtype=np.uint8)
        self.device = cfg.pim.total_bytes

    def run(self, instrs) -> tuple[int, int]:
        """(error code, instructions executed); after an error the rest is discarded, as in the RTL."""
        err = 0
        done = 0
        for kind, f in instrs:
            if err:
                break
            done += 1
            if kind == "VECTOR":
                err = self.vu.run(f)
            elif kind == "VLOAD":
                err = vdma.vload(self.spm, self.mem, f, self.device)
            else:
                err = vdma.vstore(self.spm, self.mem, f, self.device)
        return int(err), done


class SpmPlan:
    """Word allocation in the vector scratchpad, 32-byte aligned, and the column view of it."""

    def __init__(self, lanes, words):
        self.L = lanes
        self.words = words
        self.top = 0
        self.model = VectorModel(lanes, words)

    def alloc(self, words):
        align = max(1, 8 // self.L)
        base = _ceil(self.top, align) * align
        self.top = base + words
        assert self.top <= self.words, (self.top, self.words)
        return base

    def col(self, word):
        assert (word * 4 * self.L) % COL == 0, (word, self.L)
        return word * 4 * self.L // COL

    def pitch(self, n, fmt):
        return self.model.pitch(n, fmt)

    @property
    def columns(self):
        return self.words * 4 * self.L // COL


class MemPlan:
    """Bump allocation in the memory image (32-byte aligned)."""

    def __init__(self, base, limit):
        self.top = base
        self.limit = limit

    def alloc(self, nbytes):
        base = self.top
        self.top = base + _ceil(nbytes, COL) * COL
        assert self.top <= self.limit, (self.top, self.limit)
        return base


def put_rows(mem, addr, stride, rows_bytes):
    for r, row in enumerate(rows_bytes):
        mem[addr + r * stride:addr + r * stride + row.size] = row


def model_program(cfg, shapes):
    """Scratchpad regions of the layernorm / add / softmax / GELU program (shared by its data sets)."""
    n, rows, seq = shapes
    sp = SpmPlan(cfg.npu.vector_lanes, cfg.npu.vector_spm_words)
    reg = dict(
        x=sp.alloc(rows * sp.pitch(n, FP32)), y=sp.alloc(rows * sp.pitch(n, BF16)),
        gb=sp.alloc(sp.pitch(n, FP32)), s=sp.alloc(seq * sp.pitch(seq, FP32)),
        stats=sp.alloc(_ceil(2 * rows, sp.L)), ln=sp.alloc(rows * sp.pitch(n, BF16)),
        add=sp.alloc(rows * sp.pitch(n, FP32)), p=sp.alloc(seq * sp.pitch(seq, BF16)),
        g=sp.alloc(rows * sp.pitch(n, BF16)),
    )
    return sp, reg


def data_set(ref, sp, reg, shapes, mp, rng):
    """Inputs written into ``ref.mem`` at ``mp``; returns (instructions, output regions in memory)."""
    n, rows, seq = shapes
    x = (rng.standard_normal((rows, n)) * 3 + rng.standard_normal((rows, 1)) * 2).astype(np.float32)
    y = G.bf16_bits(rng.standard_normal((rows, n)))
    gamma = G.bf16_bits(1 + 0.2 * rng.standard_normal(n))
    beta = G.bf16_bits(0.2 * rng.standard_normal(n))
    gb = gamma.astype(np.uint32) | (beta.astype(np.uint32) << 16)
    s = (rng.standard_normal((seq, seq)) * 4).astype(np.float32)
    s[1, 0] = -np.inf

    cf, cb, cs, cp = _ceil(4 * n, COL), _ceil(2 * n, COL), _ceil(4 * seq, COL), _ceil(2 * seq, COL)
    # Input rows with gaps in memory (strides larger than the rows).
    sx, sy, ss = COL * (cf + 2), COL * (cb + 1), COL * cs
    mx, my, mgb, ms = mp.alloc(rows * sx), mp.alloc(rows * sy), mp.alloc(4 * n), mp.alloc(seq * ss)
    put_rows(ref.mem, mx, sx, [r.view(np.uint8) for r in G.f32_bits(x)])
    put_rows(ref.mem, my, sy, [r.view(np.uint8) for r in y])
    put_rows(ref.mem, mgb, 0, [gb.view(np.uint8)])
    put_rows(ref.mem, ms, ss, [r.view(np.uint8) for r in G.f32_bits(s)])
    so_ln, so_add, so_p, so_g = COL * cb, COL * (cf + 1), COL * cp, COL * (cb + 3)
    out = dict(ln=mp.alloc(rows * so_ln), add=mp.alloc(rows * so_add), p=mp.alloc(seq * so_p),
               g=mp.alloc(rows * so_g))
    c = sp.col
    prog = [
        vl(mem_addr=mx, mem_stride=sx, rows=rows, cols=cf, spm_addr=c(reg["x"]), spm_pitch=c(sp.pitch(n, FP32))),
        vl(mem_addr=my, mem_stride=sy, rows=rows, cols=cb, spm_addr=c(reg["y"]), spm_pitch=c(sp.pitch(n, BF16))),
        vl(mem_addr=mgb, mem_stride=0, rows=1, cols=cf, spm_addr=c(reg["gb"]), spm_pitch=0),
        vl(mem_addr=ms, mem_stride=ss, rows=seq, cols=cs, spm_addr=c(reg["s"]),
           spm_pitch=c(sp.pitch(seq, FP32))),
        vec(op=Opcode.LN_STATS.value, a=reg["x"], d=reg["stats"], n=n, rows=rows, imm0=f32(1 / n), imm1=f32(1e-5)),
        vec(op=Opcode.LN_APPLY.value, a=reg["x"], b=reg["gb"], aux=reg["stats"], d=reg["ln"], n=n, rows=rows,
            d_fmt=BF16),
        vec(op=Opcode.ADD.value, a=reg["ln"], a_fmt=BF16, b=reg["y"], b_fmt=BF16, b_mode=ROW, d=reg["add"],
            d_fmt=FP32, n=n, rows=rows),
        vec(op=Opcode.SOFTMAX.value, a=reg["s"], d=reg["p"], n=seq, rows=seq, d_fmt=BF16, mask=MASK_CAUSAL),
        vec(op=Opcode.GELU.value, a=reg["y"], a_fmt=BF16, d=reg["g"], d_fmt=BF16, n=n, rows=rows),
        vs(mem_addr=out["ln"], mem_stride=so_ln, rows=rows, cols=cb, spm_addr=c(reg["ln"]),
           spm_pitch=c(sp.pitch(n, BF16))),
        vs(mem_addr=out["add"], mem_stride=so_add, rows=rows, cols=cf, spm_addr=c(reg["add"]),
           spm_pitch=c(sp.pitch(n, FP32))),
        vs(mem_addr=out["p"], mem_stride=so_p, rows=seq, cols=cp, spm_addr=c(reg["p"]),
           spm_pitch=c(sp.pitch(seq, BF16))),
        vs(mem_addr=out["g"], mem_stride=so_g, rows=rows, cols=cb, spm_addr=c(reg["g"]),
           spm_pitch=c(sp.pitch(n, BF16))),
    ]
    meta = dict(s=s, ms=ms, out=out, so_p=so_p, cp=cp)
    return prog, meta


def spm_dump(sp, addr, rows=8):
    """VSTORE of the whole scratchpad into memory at ``addr`` (``rows`` rows)."""
    cols = sp.columns // rows
    return vs(mem_addr=addr, mem_stride=COL * cols, rows=rows, cols=cols, spm_addr=0, spm_pitch=cols)


def check_softmax(mem, meta, seq):
    """The program's softmax output (from the reference memory) against float64: the data path means what
    the program says (VLOAD layout, causal mask, BF16 store)."""
    p = np.stack([mem[meta["out"]["p"] + r * meta["so_p"]:][:2 * seq].view(np.uint16) for r in range(seq)])
    prob = G.bf16_to_f32(p).astype(np.float64)
    vis = np.arange(seq)[None, :] <= np.arange(seq)[:, None]
    s = np.where(vis, meta["s"].astype(np.float64), -np.inf)
    e = np.exp(s - s.max(axis=1, keepdims=True))
    want = e / e.sum(axis=1, keepdims=True)
    assert np.all(np.abs(prob - want) <= 2.0**-8 * want + 1e-6)
    assert np.all(prob[~vis] == 0)


def run_rtl(cfg, words_log2, ref_init, segments, name):
    from sim.tb.vector_queue_tb import run_segments, vq_build

    sb = vq_build(cfg, words_log2, MEM_LATENCY)
    segs = [dict(name=s["name"], instructions=[encode(i) for i in s["instrs"]],
                 backpressure=s.get("backpressure", 0)) for s in segments]
    return run_segments(sb, ref_init, segs, test_name=name)


def compare(got_mem, want_mem):
    bad = np.flatnonzero(got_mem != want_mem)
    if bad.size:
        cols = np.unique(bad // COL)
        first = int(bad[0])
        raise AssertionError(f"{cols.size} memory columns differ, first byte {first:#x} (column {first // COL}): "
                             f"RTL {got_mem[first // COL * COL:][:COL].tobytes().hex()} "
                             f"ref {want_mem[first // COL * COL:][:COL].tobytes().hex()}")


def program_run(cfg, words_log2, shapes, name, seed):
    """Two data sets of the program (the second under memory back-pressure), then a scratchpad dump."""
    mem_bytes = COL << words_log2
    ref = QueueRef(cfg, mem_bytes)
    rng = np.random.default_rng(seed)
    sp, reg = model_program(cfg, shapes)
    dump_at = mem_bytes - sp.columns * COL
    mp = MemPlan(0, dump_at)
    prog1, meta1 = data_set(ref, sp, reg, shapes, mp, rng)
    prog2, meta2 = data_set(ref, sp, reg, shapes, mp, rng)
    init = ref.mem.copy()
    segments = [dict(name="program", instrs=prog1),
                dict(name="program-bp", instrs=prog2 + [spm_dump(sp, dump_at)], backpressure=1)]
    expect = [ref.run(s["instrs"]) for s in segments]
    check_softmax(ref.mem, meta1, shapes[2])
    check_softmax(ref.mem, meta2, shapes[2])
    res, got = run_rtl(cfg, words_log2, init, segments, name)
    for seg, r, (err, done) in zip(segments, res, expect, strict=True):
        assert (r["error"], r["counters"]["instructions"]) == (err, done) == (0, len(seg["instrs"])), r
    assert res[0]["counters"]["mem_stall"] == 0
    assert res[1]["counters"]["mem_stall"] > 0
    compare(got, ref.mem)
    return res


# -- reference model (no RTL) ---------------------------------------------------------------------------

def test_vdma_reference_by_hand():
    spm = np.zeros(8 * COL, dtype=np.uint8)
    mem = np.arange(16 * COL, dtype=np.uint32).astype(np.uint8)
    f = dict(mem_addr=64, mem_stride=128, rows=2, cols=2, spm_addr=1, spm_pitch=3)
    assert vdma.vload(spm, mem, f) == VqError.NONE
    assert np.array_equal(spm[32:96], mem[64:128]) and np.array_equal(spm[128:192], mem[192:256])
    assert not spm[:32].any() and not spm[96:128].any() and not spm[192:].any()
    out = np.zeros_like(mem)
    assert vdma.vstore(spm, out, dict(f, mem_addr=32)) == VqError.NONE
    assert np.array_equal(out[32:96], mem[64:128]) and np.array_equal(out[160:224], mem[192:256])
    assert vdma.columns(f) == 4
    cases = [(dict(f, rows=0), VqError.DMA_SIZE), (dict(f, cols=0), VqError.DMA_SIZE),
             (dict(f, mem_addr=16), VqError.DMA_ALIGN), (dict(f, mem_stride=40), VqError.DMA_ALIGN),
             (dict(f, spm_addr=6), VqError.DMA_SPM), (dict(f, spm_pitch=6), VqError.DMA_SPM),
             (dict(f, mem_addr=15 * COL), VqError.DMA_MEM), (dict(f, mem_stride=15 * COL), VqError.DMA_MEM)]
    for fields, want in cases:
        before = spm.copy()
        assert vdma.vload(spm, mem, fields) == want, fields
        assert np.array_equal(spm, before)
    assert vdma.check(f, spm.size, mem.size, device_bytes=128) == VqError.DMA_MEM


def test_bad_parameters():
    from hw.npu.vector_queue import VectorDma, VectorQueue

    with pytest.raises(ValueError, match="Vector lanes must be a power of two from 2 to 64, not 128"):
        VectorQueue(TINY.replace(**{"npu.vector_lanes": 128}))
    with pytest.raises(ValueError, match="Queue depth"):
        VectorQueue(TINY, queue_depth=1)
    with pytest.raises(ValueError, match=r"Outstanding requests must be an integer in \[1, 127\]"):
        VectorDma(TINY, 4, 1024, max_outstanding=128)
    with pytest.raises(ValueError, match="at least one 32-byte column"):
        VectorDma(TINY, 2, 2)


# -- the VDMA engine on Amaranth's simulator, for lanes 2 .. 64 ---------------------------------------------

@pytest.mark.parametrize("lanes", [2, 8, 32, 64])
def test_vdma_engine_layouts(lanes):
    """VLOAD then VSTORE through a scratchpad of ``max(256, 32 L)``-bit rows (a column is 4, 1, 1/4 or 1/8 of
    a row's words): random fields (pitch smaller and larger than the row, gaps in memory), a memory with
    latency, then the same again with random stalls; memory and scratchpad bit-exact against
    :mod:`sim.golden.vdma`; without stalls one column per cycle."""
    from collections import deque

    from amaranth.hdl import Module
    from amaranth.lib import memory
    from amaranth.sim import Simulator

    from hw.npu.vector_queue import VectorDma

    spm_cols = 64
    words = spm_cols * 8 // lanes
    dma = VectorDma(TINY, lanes, words, max_outstanding=16)
    top = Module()
    top.submodules.dma = dma
    k = max(1, 8 // lanes)
    row_bytes = 4 * lanes * k
    spm = top.submodules.spm = memory.Memory(shape=8 * row_bytes, depth=words // k, init=[])
    rp, wp = spm.read_port(), spm.write_port(granularity=16)
    top.d.comb += [rp.addr.eq(dma.spm_rd.addr), rp.en.eq(dma.spm_rd.en), dma.spm_rd.data.eq(rp.data),
                   wp.addr.eq(dma.spm_wr.addr), wp.data.eq(dma.spm_wr.data), wp.en.eq(dma.spm_wr.en)]

    rng = np.random.default_rng(lanes)
    mem = rng.integers(0, 256, 128 * COL, dtype=np.uint8)
    mem_ref = mem.copy()
    spm_ref = np.zeros(words * 4 * lanes, dtype=np.uint8)
    ops = []
    for _ in range(6):
        rows, cols = int(rng.integers(1, 4)), int(rng.integers(1, 9))
        pitch = int(rng.integers(max(0, cols - 2), cols + 3)) if rows > 1 else 0
        f = dict(mem_addr=COL * int(rng.integers(0, 40)), mem_stride=COL * int(rng.integers(cols - 2, cols + 5)),
                 rows=rows, cols=cols, spm_pitch=pitch)
        f["mem_stride"] = max(f["mem_stride"], 0)
        f["spm_addr"] = int(rng.integers(0, spm_cols - (rows - 1) * pitch - cols + 1))
        ops.append(("VLOAD", f))
        ops.append(("VSTORE", dict(f, mem_addr=COL * int(rng.integers(64, 100)))))
    for kind, f in ops + ops:                    # run twice, as below
        assert (vdma.vload if kind == "VLOAD" else vdma.vstore)(spm_ref, mem_ref, f) == VqError.NONE
    state = dict(stall=False, cycles=[], spm=None)

    async def memory_side(ctx):
        pending = deque()
        cycle = 0
        rs = np.random.default_rng(1)
        while True:
            ready = not (state["stall"] and rs.random() < 0.3)
            ctx.set(dma.mem.req.ready, int(ready))
            resp = dma.mem.resp
            if pending and pending[0][0] <= cycle and not (state["stall"] and rs.random() < 0.3):
                _, tag, value, write = pending.popleft()
                ctx.set(resp.valid, 1)
                ctx.set(resp.payload.tag, tag)
                ctx.set(resp.payload.data, value)
                ctx.set(resp.payload.write, write)
            else:
                ctx.set(resp.valid, 0)
            req = dma.mem.req
            if ready and ctx.get(req.valid):
                addr, tag, write = ctx.get(req.payload.addr), ctx.get(req.payload.tag), ctx.get(req.payload.write)
                value = 0
                if write:
                    mem[addr:addr + COL] = np.frombuffer(ctx.get(req.payload.data).to_bytes(COL, "little"),
                                                         dtype=np.uint8)
                else:
                    value = int.from_bytes(mem[addr:addr + COL].tobytes(), "little")
                pending.append((cycle + T_MEM, tag, value, write))
            await ctx.tick()
            cycle += 1

    async def driver(ctx):
        for stall in (False, True):
            state["stall"] = stall
            for kind, f in ops:
                ctx.set(dma.start, 1)
                ctx.set(dma.store, kind == "VSTORE")
                for name in ("mem_addr", "mem_stride", "rows", "cols", "spm_pitch"):
                    ctx.set(getattr(dma, name), f[name])
                ctx.set(dma.spm_col, f["spm_addr"])
                await ctx.tick()
                ctx.set(dma.start, 0)
                n = 1
                while not ctx.get(dma.done):
                    await ctx.tick()
                    n += 1
                assert not ctx.get(dma.error)
                if not stall:
                    state["cycles"].append((kind, f["rows"] * f["cols"], n))
                await ctx.tick()
        state["spm"] = b"".join(int(ctx.get(spm.data[w])).to_bytes(row_bytes, "little")
                                for w in range(words // k))

    sim = Simulator(top)
    sim.add_clock(1e-8)
    sim.add_testbench(memory_side, background=True)
    sim.add_testbench(driver)
    sim.run()
    compare(mem, mem_ref)
    compare(np.frombuffer(state["spm"], dtype=np.uint8), spm_ref)
    for kind, ncol, n in state["cycles"]:
        # start -> done: n columns, memory latency, VSTORE's read + FIFO
        assert n == ncol + T_MEM + (1 if kind == "VLOAD" else 4), (kind, ncol, n)


# -- Verilator: tiny configuration (4 lanes) -----------------------------------------------------------------

TINY_SHAPES = (48, 6, 16)          # layernorm / GELU rows of n = 48, 6 rows; softmax 16 x 16
DEFAULT_SHAPES = (768, 8, 64)      # GPT-2 small width, 8 rows; softmax 64 x 64


def test_vector_queue_program_tiny():
    """VLOAD FP32 and BF16 rows (gaps in memory and scratchpad), LN_STATS + LN_APPLY, ADD, causal SOFTMAX,
    GELU, VSTORE back; two data sets, the second under memory back-pressure; whole memory and scratchpad
    bit-exact against the reference."""
    program_run(TINY, TINY_WORDS_LOG2, TINY_SHAPES, "test_vector_queue_program_tiny", seed=1)


def _error_segments(sp, mem_bytes):
    """Segments: each error code once, every error segment followed by instructions that would change memory
    or scratchpad (they must be discarded); then a recovery program and a scratchpad dump."""
    cols = sp.columns
    dump_at = mem_bytes - cols * COL
    device = TINY.pim.total_bytes
    poison_store = vs(mem_addr=12288, mem_stride=32, rows=2, cols=2, spm_addr=0, spm_pitch=4)
    poison_load = vl(mem_addr=4096, mem_stride=32, rows=2, cols=2, spm_addr=100, spm_pitch=2)
    ok_load = dict(mem_addr=0, mem_stride=256, rows=4, cols=4, spm_addr=0, spm_pitch=8)
    E = VqError
    # (name, instructions, expected error, DMA engine started)
    return dump_at, [
        ("load", [vl(**ok_load), vs(**dict(ok_load, mem_addr=8192, mem_stride=128))], 0, True),
        ("DMA_SIZE rows", [vl(**dict(ok_load, rows=0)), poison_store, poison_load], E.DMA_SIZE, False),
        ("DMA_SIZE cols", [vs(**dict(ok_load, cols=0)), poison_store], E.DMA_SIZE, False),
        ("DMA_ALIGN addr", [vl(**dict(ok_load, mem_addr=16)), poison_store], E.DMA_ALIGN, False),
        ("DMA_ALIGN stride", [vs(**dict(ok_load, mem_stride=48)), poison_load], E.DMA_ALIGN, False),
        ("DMA_SPM end", [vl(**dict(ok_load, rows=1, spm_addr=cols - 2, cols=3)), poison_store], E.DMA_SPM, False),
        ("DMA_SPM rows", [vs(**dict(ok_load, rows=3, spm_pitch=cols // 2)), poison_load], E.DMA_SPM, False),
        ("DMA_MEM response load", [vl(**dict(ok_load, mem_addr=mem_bytes)), poison_store, poison_load],
         E.DMA_MEM, True),
        ("DMA_MEM response store", [vs(**dict(ok_load, mem_addr=mem_bytes + 8192)), poison_load], E.DMA_MEM, True),
        ("DMA_MEM device", [vl(**dict(ok_load, rows=1, mem_addr=device - 64)), poison_store], E.DMA_MEM, False),
        ("DMA_MEM stride", [vl(**dict(ok_load, rows=2, mem_stride=device)), poison_store], E.DMA_MEM, False),
        ("BAD_LENGTH", [vec(op=Opcode.COPY.value, a=0, d=64, n=0, rows=1), poison_load], E.BAD_LENGTH, False),
        ("BAD_ADDRESS", [vec(op=Opcode.EXP.value, a=0, d=sp.words - 1, n=8, rows=2), poison_store],
         E.BAD_ADDRESS, False),
        ("recovery", [vl(**dict(ok_load, mem_addr=1024)),
                      vec(op=Opcode.EXP.value, a=0, d=64, n=4 * sp.L, rows=4, d_fmt=BF16),
                      vs(mem_addr=10240, mem_stride=64, rows=4, cols=1, spm_addr=sp.col(64), spm_pitch=1),
                      spm_dump(sp, dump_at)], 0, True),
    ]


def test_vector_queue_errors_tiny():
    """Each error code: ``error`` set, nothing touched, the rest of the segment discarded (no hang); after
    ``clear`` a correct program runs. Check-time errors never start the DMA; memory error responses do."""
    mem_bytes = COL << TINY_WORDS_LOG2
    ref = QueueRef(TINY, mem_bytes)
    rng = np.random.default_rng(7)
    ref.mem[:16384] = rng.integers(0, 256, 16384, dtype=np.uint8)
    # EXP of the loaded bytes: keep them finite and moderate (FP32 values in [-4, 4)).
    vals = (rng.random(4096) * 8 - 4).astype(np.float32)
    ref.mem[1024:1024 + 1024] = vals[:256].view(np.uint8)
    sp = SpmPlan(TINY.npu.vector_lanes, TINY.npu.vector_spm_words)
    dump_at, table = _error_segments(sp, mem_bytes)
    init = ref.mem.copy()
    segments = [dict(name=name, instrs=instrs) for name, instrs, _, _ in table]
    expect = [ref.run(s["instrs"]) for s in segments]
    for (name, _, want, _), (err, done) in zip(table, expect, strict=True):
        assert err == want and (done == 1 or want == 0), (name, err, done)
    res, got = run_rtl(TINY, TINY_WORDS_LOG2, init, segments, "test_vector_queue_errors_tiny")
    for (name, _, want, started), r, (_, done) in zip(table, res, expect, strict=True):
        c = r["counters"]
        assert (r["error"], c["instructions"]) == (int(want), done), (name, r)
        assert (c["dma"] > 0) == started, (name, c)
    compare(got, ref.mem)


def test_vector_queue_throughput_tiny():
    """VLOAD / VSTORE stream one column per cycle: the DMA is busy ``n + T + 1`` (VLOAD) and ``n + T + 4``
    (VSTORE) cycles for ``n`` columns against a memory of latency ``T``, rows back to back; the queue as a
    whole ``n + T + 12`` at most. Back-pressure slows it down and is counted; data bit-exact throughout."""
    mem_bytes = COL << TINY_WORDS_LOG2
    ref = QueueRef(TINY, mem_bytes)
    rng = np.random.default_rng(9)
    ref.mem[:16384] = rng.integers(0, 256, 16384, dtype=np.uint8)
    one = [("vload 1x256", vl(mem_addr=0, mem_stride=0, rows=1, cols=256, spm_addr=0, spm_pitch=0)),
           ("vload 4x64", vl(mem_addr=32, mem_stride=2048, rows=4, cols=64, spm_addr=256, spm_pitch=64)),
           ("vstore 1x256", vs(mem_addr=16384, mem_stride=0, rows=1, cols=256, spm_addr=0, spm_pitch=0)),
           ("vstore 4x64", vs(mem_addr=24576, mem_stride=2048, rows=4, cols=64, spm_addr=256, spm_pitch=64)),
           ("vload 1x1", vl(mem_addr=64, mem_stride=0, rows=1, cols=1, spm_addr=7, spm_pitch=0)),
           ("vstore 1x1", vs(mem_addr=16384 + 64, mem_stride=0, rows=1, cols=1, spm_addr=7, spm_pitch=0))]
    segments = [dict(name=name, instrs=[i]) for name, i in one]
    segments.append(dict(name="8 x vload 1x32", instrs=[
        vl(mem_addr=4096 + 1024 * j, mem_stride=0, rows=1, cols=32, spm_addr=32 * j, spm_pitch=0) for j in range(8)]))
    segments.append(dict(name="vload 4x64 bp", backpressure=1, instrs=[
        vl(mem_addr=8192, mem_stride=1024, rows=4, cols=64, spm_addr=256, spm_pitch=64)]))
    segments.append(dict(name="vstore 4x64 bp", backpressure=1, instrs=[
        vs(mem_addr=16384, mem_stride=2048, rows=4, cols=64, spm_addr=250, spm_pitch=65)]))
    init = ref.mem.copy()
    for s in segments:
        assert ref.run(s["instrs"]) == (0, len(s["instrs"]))
    res, got = run_rtl(TINY, TINY_WORDS_LOG2, init, segments, "test_vector_queue_throughput_tiny")
    compare(got, ref.mem)
    report = {}
    for s, r in zip(segments, res, strict=True):
        c = r["counters"]
        assert r["error"] == 0 and c["instructions"] == len(s["instrs"]), r
        n = sum(vdma.columns(f) for _, f in s["instrs"])
        report[s["name"]] = (n, c["dma"], c["busy"], c["mem_stall"])
        if s.get("backpressure"):
            assert c["mem_stall"] > 0 and c["busy"] > n + T_MEM, (s["name"], c)
            continue
        assert c["mem_stall"] == 0, (s["name"], c)
        k = len(s["instrs"])
        extra = 1 if s["instrs"][0][0] == "VLOAD" else 4
        assert c["dma"] == n + k * (T_MEM + extra), (s["name"], c)
        assert c["busy"] <= n + k * (T_MEM + 12), (s["name"], c)
    print("\nVDMA cycles (columns, dma busy, queue busy, memory stalls):", report)


# -- Verilator: default configuration (16 lanes) --------------------------------------------------------------

@pytest.mark.long
def test_vector_queue_program_default():
    """The program at GPT-2 small width (n = 768, softmax 64 x 64) on the 16-lane queue (a column is half a
    scratchpad word), two data sets (one under back-pressure), then the whole 256 KiB scratchpad dumped;
    bit-exact. Throughput: a 1024-column VLOAD and VSTORE stream at one column per cycle."""
    res = program_run(DEFAULT, DEFAULT_WORDS_LOG2, DEFAULT_SHAPES, "test_vector_queue_program_default", seed=2)
    print("\nprogram counters:", [r["counters"] for r in res])
    mem_bytes = COL << DEFAULT_WORDS_LOG2
    ref = QueueRef(DEFAULT, mem_bytes)
    ref.mem[:65536] = np.random.default_rng(3).integers(0, 256, 65536, dtype=np.uint8)
    cols = 1024
    segments = [dict(name="vload", instrs=[vl(mem_addr=0, mem_stride=16384, rows=4, cols=cols // 4, spm_addr=1,
                                              spm_pitch=cols // 4 + 3)]),
                dict(name="vstore", instrs=[vs(mem_addr=65536, mem_stride=8192, rows=4, cols=cols // 4, spm_addr=1,
                                               spm_pitch=cols // 4 + 3)]),
                dict(name="errors", instrs=[vl(mem_addr=0, mem_stride=0, rows=1, cols=1, spm_addr=8192, spm_pitch=0),
                                            vs(mem_addr=0, mem_stride=0, rows=1, cols=1, spm_addr=0, spm_pitch=0)])]
    init = ref.mem.copy()
    expect = [ref.run(s["instrs"]) for s in segments]
    assert expect == [(0, 1), (0, 1), (VqError.DMA_SPM, 1)]
    res, got = run_rtl(DEFAULT, DEFAULT_WORDS_LOG2, init, segments, "test_vector_queue_default_stream")
    compare(got, ref.mem)
    assert [(r["error"], r["counters"]["instructions"]) for r in res] == expect
    load, store = res[0]["counters"], res[1]["counters"]
    print("1024-column VLOAD / VSTORE:", load, store)
    assert load["dma"] == cols + T_MEM + 1 and store["dma"] == cols + T_MEM + 4
    assert load["busy"] <= cols + T_MEM + 12 and store["busy"] <= cols + T_MEM + 12
