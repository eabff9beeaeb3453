"""The store DMA (:class:`hw.npu.dma.DmaStore`) alone on the Amaranth simulator: when it may call a store done.

A Python in-order memory acknowledges every write ``latency`` cycles after it was requested (optional
pseudo-random back-pressure on both streams). Checked: every column of the tile is requested once, at its
address; the completion token (``signal``) and ``busy`` falling come only after the last write was requested
and acknowledged, since a FENCE on the matrix unit lets another requester read the stored data from then on.
(The engine used to drop ``busy`` while the last column still sat in its output FIFO: a one-column store
signalled completion before its write was requested.)
"""

import collections

import numpy as np
import pytest

from hw.config import preset
from hw.npu.isa import INSTRUCTION, ErrorCode, Opcode, encode

COL_BYTES = 32
LANES = 4


def run_store(*, rows, cols, bf16, latency, backpressure=False, seed=1, mem_addr=0x4000, mem_stride=None):
    """One STORE; returns (requested column addresses in order, cycle of the last ack, cycle of the token)."""
    from amaranth.sim import Simulator

    from hw.npu.dma import DmaStore

    E = 16 if bf16 else 8                          # elements per 32-byte column
    ncol = -(-cols // E)
    if mem_stride is None:
        mem_stride = (ncol + 1) * COL_BYTES
    word = encode(Opcode.STORE, bf16=int(bf16), signal=0b0100, mem_addr=mem_addr, mem_stride=mem_stride,
                  rows=rows, cols=cols, spm_addr=2, spm_stride=rows + 3)
    assert word < 1 << INSTRUCTION.size
    dut = DmaStore(preset("default"), LANES, acc_addr_bits=10)
    bp = np.random.default_rng(seed)
    out = {"reqs": [], "last_ack": None, "token": None}
    timeout = 20 * rows * ncol * (E // min(E, 8) + latency) + 200

    async def bench(ctx):
        req, resp = dut.mem.req, dut.mem.resp
        pending = collections.deque()      # (cycle the ack may leave, tag)
        start = None
        ctx.set(dut.cmd.payload.as_value(), word)
        for cycle in range(timeout):
            ctx.set(dut.cmd.valid, int(start is None))
            r_valid = bool(pending) and pending[0][0] <= cycle and not (backpressure and bp.random() < 0.3)
            if r_valid:
                ctx.set(resp.payload.tag, pending[0][1])
                ctx.set(resp.payload.write, 1)
                ctx.set(resp.payload.error, 0)
            ctx.set(resp.valid, int(r_valid))
            q_ready = not (backpressure and bp.random() < 0.3)
            ctx.set(req.ready, int(q_ready))
            if start is None and ctx.get(dut.cmd.ready):
                start = cycle
            if q_ready and ctx.get(req.valid):
                assert ctx.get(req.payload.write)
                assert out["token"] is None, "a write requested after the store's completion token"
                out["reqs"].append(ctx.get(req.payload.addr))
                pending.append((cycle + latency, ctx.get(req.payload.tag)))
            if r_valid and ctx.get(resp.ready):
                pending.popleft()
                out["last_ack"] = cycle
            assert ctx.get(dut.error) == ErrorCode.NONE
            if ctx.get(dut.signal):
                assert ctx.get(dut.signal) == 0b0100
                assert not pending, "completion token with writes not acknowledged"
                assert len(out["reqs"]) == rows * ncol, "completion token before every column was requested"
                out["token"] = cycle
                await ctx.tick()
                assert not ctx.get(dut.busy) and ctx.get(dut.cmd.ready)
                return
            if start is not None and cycle > start:
                assert ctx.get(dut.busy), "busy fell without a completion token"
            await ctx.tick()
            # the accumulator scratchpad answers one cycle after a read (any value: the order is checked here)
            ctx.set(dut.acc.data.as_value(), ctx.get(dut.acc.addr) * 0x9E3779B1 & ((1 << (32 * LANES)) - 1))
        raise AssertionError("store did not finish")

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()
    return out["reqs"], out["last_ack"], out["token"], ncol, mem_stride


@pytest.mark.parametrize("rows,cols,bf16", [(1, 5, False), (1, 1, False), (1, 16, True), (3, 8, False),
                                            (2, 40, True), (5, 17, False)])
@pytest.mark.parametrize("latency", [1, 8])
def test_token_after_last_write_acknowledged(rows, cols, bf16, latency):
    reqs, last_ack, token, ncol, stride = run_store(rows=rows, cols=cols, bf16=bf16, latency=latency)
    want = [0x4000 + r * stride + c * COL_BYTES for r in range(rows) for c in range(ncol)]
    assert reqs == want
    assert token is not None and last_ack is not None and token >= last_ack


@pytest.mark.parametrize("seed", range(4))
def test_token_order_under_backpressure(seed):
    reqs, last_ack, token, ncol, stride = run_store(rows=3, cols=20, bf16=False, latency=5, backpressure=True,
                                                    seed=seed)
    assert len(reqs) == 3 * ncol == len(set(reqs))
    assert token >= last_ack
