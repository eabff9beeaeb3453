"""The load DMA (:class:`hw.npu.dma.DmaLoad`) alone on the Amaranth simulator.

A Python in-order memory answers the engine's requests (fixed latency, at most
one response per cycle, optional pseudo-random back-pressure on both streams,
optional error or wrong-tag responses). Checked: the exact scratchpad writes
(addresses and data, each word once, lanes past ``rows`` zero, nothing past
``cols``), the error events, the completion token, and that a transposed load
streams at the memory's rate: about ``max(W, 16)`` cycles per ``W x 16`` block
(one memory column of ``W`` rows) when the memory answers every cycle.
"""

import collections

import numpy as np
import pytest

from hw.config import preset
from hw.npu.isa import INSTRUCTION, ErrorCode, Opcode, Target, encode

COL_BYTES = 32
MEM_LATENCY = 8


def _mem_image(rng, mem_addr, rows, mem_stride):
    """Column address -> 256-bit value, random BF16 patterns everywhere the tile touches."""
    mem = {}
    for r in range(rows):
        for c in range(mem_stride // COL_BYTES):
            a = mem_addr + r * mem_stride + c * COL_BYTES
            mem[a] = int.from_bytes(rng.integers(0, 256, COL_BYTES, dtype=np.uint8).tobytes(), "little")
    return mem


def _expected(mem, W, transpose, mem_addr, mem_stride, rows, cols, spm_addr, spm_stride):
    """Scratchpad word address -> value (lanes of 16 bits, little-endian) per the layout of hw.npu.isa."""
    def elem(r, c):
        return (mem[mem_addr + r * mem_stride + (c // 16) * COL_BYTES] >> (16 * (c % 16))) & 0xFFFF

    spm = {}
    if transpose:
        for b in range((rows + W - 1) // W):
            for c in range(cols):
                spm[spm_addr + b * spm_stride + c] = sum(
                    elem(b * W + w, c) << (16 * w) for w in range(W) if b * W + w < rows)
    else:
        for r in range(rows):
            for k in range((cols + W - 1) // W):
                spm[spm_addr + k * spm_stride + r] = sum(
                    elem(r, k * W + w) << (16 * w) for w in range(W) if k * W + w < cols)
    return spm


def run_load(W, *, rows, cols, transpose=True, mem_addr=0x2000, mem_stride=None, spm_addr=3, spm_stride=None,
             latency=MEM_LATENCY, backpressure=False, bad=None, seed=1, max_outstanding=32):
    """One LOAD on DmaLoad(W); returns (cycles from accept to token, writes, errors, expected writes).

    ``writes`` lists (address, value) in write order; ``bad`` = (response index, "error" | "tag").
    """
    from amaranth.sim import Simulator

    from hw.npu.dma import DmaLoad

    rng = np.random.default_rng(seed)
    ncol = (cols + 15) // 16
    if mem_stride is None:
        mem_stride = (ncol + 1) * COL_BYTES
    if spm_stride is None:
        spm_stride = cols + 5 if transpose else rows + 2
    mem = _mem_image(rng, mem_addr, rows, mem_stride)
    want = _expected(mem, W, transpose, mem_addr, mem_stride, rows, cols, spm_addr, spm_stride)
    word = encode(Opcode.LOAD, target=Target.WGT, transpose=int(transpose), signal=0b1010, mem_addr=mem_addr,
                  mem_stride=mem_stride, rows=rows, cols=cols, spm_addr=spm_addr, spm_stride=spm_stride)
    assert word < 1 << INSTRUCTION.size

    dut = DmaLoad(preset("default"), W, max_outstanding=max_outstanding)
    out = {"writes": [], "errors": [], "cycles": None}
    bp = np.random.default_rng(seed + 100)
    timeout = 40 * (rows * ncol + 16 * ncol * ((rows + W - 1) // W)) + 200

    async def bench(ctx):
        req, resp = dut.mem.req, dut.mem.resp
        pending = collections.deque()          # (cycle the response may leave, address, tag)
        served = 0
        start = None
        ctx.set(dut.cmd.payload.as_value(), word)
        for cycle in range(timeout):
            ctx.set(dut.cmd.valid, int(start is None))
            r_valid = bool(pending) and pending[0][0] <= cycle and not (backpressure and bp.random() < 0.3)
            if r_valid:
                _, addr, tag = pending[0]
                error = bad is not None and bad[0] == served and bad[1] == "error"
                if bad is not None and bad[0] == served and bad[1] == "tag":
                    tag ^= 1
                ctx.set(resp.payload.data, mem.get(addr, 0))
                ctx.set(resp.payload.tag, tag)
                ctx.set(resp.payload.error, int(error))
            ctx.set(resp.valid, int(r_valid))
            q_ready = not (backpressure and bp.random() < 0.3)
            ctx.set(req.ready, int(q_ready))

            if start is None and ctx.get(dut.cmd.ready):
                start = cycle
            if q_ready and ctx.get(req.valid):
                assert not ctx.get(req.payload.write)
                pending.append((cycle + latency, ctx.get(req.payload.addr), ctx.get(req.payload.tag)))
            if r_valid and ctx.get(resp.ready):
                pending.popleft()
                served += 1
            if ctx.get(dut.spm.en):
                out["writes"].append((ctx.get(dut.spm.addr), ctx.get(dut.spm.data.as_value())))
            e = ctx.get(dut.error)
            if e != ErrorCode.NONE:
                out["errors"].append(ErrorCode(e))
            if ctx.get(dut.signal):
                assert ctx.get(dut.signal) == 0b1010
                out["cycles"] = cycle - start
                assert not pending, "token given with responses outstanding"
                await ctx.tick()
                assert not ctx.get(dut.busy) and ctx.get(dut.cmd.ready)
                return
            assert start is None or cycle == start or ctx.get(dut.busy)
            await ctx.tick()
        raise AssertionError("load did not finish")

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()
    return out["cycles"], out["writes"], out["errors"], want


def _check_writes(writes, want):
    addrs = [a for a, _ in writes]
    assert len(addrs) == len(set(addrs)), "a scratchpad word was written twice"
    got = dict(writes)
    assert set(got) == set(want), f"written {sorted(set(got) ^ set(want))[:8]} ..."
    for a, v in want.items():
        assert got[a] == v, f"word {a}: {got[a]:#x} != {v:#x}"


def transposed_bound(W, rows, cols, latency=MEM_LATENCY, const=4):
    """Memory-rate bound: max(rows of the block, words of the column) per W x 16 block, plus the memory
    latency, the last block's words (its emission cannot overlap a gather) and a small constant."""
    ncol = (cols + 15) // 16
    total = 0
    for b in range((rows + W - 1) // W):
        nrows = min(W, rows - b * W)
        for mc in range(ncol):
            total += max(nrows, min(16, cols - 16 * mc))
    return total + min(16, cols - 16 * (ncol - 1)) + latency + const


SHAPES = [  # rows, cols
    (1, 1), (3, 5), (4, 16), (5, 17), (16, 16), (17, 40), (33, 48), (40, 31), (7, 100),
]


@pytest.mark.parametrize("W", [4, 16])
@pytest.mark.parametrize("rows,cols", SHAPES)
def test_transposed_contents_and_rate(W, rows, cols):
    cycles, writes, errors, want = run_load(W, rows=rows, cols=cols)
    assert errors == []
    _check_writes(writes, want)
    assert cycles <= transposed_bound(W, rows, cols), (cycles, transposed_bound(W, rows, cols))


@pytest.mark.parametrize("W", [1, 4, 16])
@pytest.mark.parametrize("rows,cols", [(3, 5), (17, 40), (9, 16)])
def test_contents_backpressure_and_small_window(W, rows, cols):
    """Random back-pressure on both streams and few outstanding requests: same contents."""
    for transpose in (True, False):
        for max_out in (1, 3, 32):
            _, writes, errors, want = run_load(W, rows=rows, cols=cols, transpose=transpose, backpressure=True,
                                               max_outstanding=max_out, seed=rows + max_out)
            assert errors == []
            _check_writes(writes, want)


@pytest.mark.parametrize("transpose", [True, False])
@pytest.mark.parametrize("kind,code", [("error", ErrorCode.MEM_ERROR), ("tag", ErrorCode.MEM_ORDER)])
def test_error_responses(transpose, kind, code):
    """One bad response: one error event, and the instruction still finishes with its token."""
    _, writes, errors, want = run_load(16, rows=20, cols=40, transpose=transpose, bad=(7, kind))
    assert errors == [code]
    assert {a for a, _ in writes} == set(want)


def test_non_transposed_rate():
    """Non-transposed at W = 16: one memory column per cycle."""
    cycles, writes, _, want = run_load(16, rows=64, cols=64, transpose=False)
    _check_writes(writes, want)
    assert cycles <= 64 * 4 + MEM_LATENCY + 8


@pytest.mark.parametrize("W", [4, 16])
def test_transposed_gpt2_tile_rate(W):
    """64 rows x 768 columns (a weight tile of GPT-2 small): ~32 bytes per cycle at W = 16."""
    rows, cols = 64, 768
    cycles, writes, errors, want = run_load(W, rows=rows, cols=cols)
    assert errors == []
    _check_writes(writes, want)
    print(f"W={W}: transposed LOAD {rows} x {cols}: {cycles} cycles "
          f"({rows * cols * 2 / cycles:.1f} bytes/cycle)")
    assert cycles <= transposed_bound(W, rows, cols)
