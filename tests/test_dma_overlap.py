"""The load DMA (:class:`hw.npu.dma.DmaLoad`) with two LOADs in flight, on the Amaranth simulator.

A sequence of LOADs is offered back to back (as the matrix unit's load queue does); the engine takes the
next one once it has issued every request of the current one, and its response handler takes it when it has
finished the previous one's responses. Checked against the same in-order memory as
``tests/test_dma_transpose.py``: every scratchpad write (target, address, data) of every LOAD, in the order of
the LOADs (the handler never mixes two LOADs' responses), one completion token per LOAD in order, no token
with a response of its LOAD outstanding, and that the overlap happens: the second LOAD's first request is
issued before the first LOAD's token, and the sequence takes fewer cycles than the LOADs one at a time.
"""

import collections

import numpy as np
import pytest

from hw.config import preset
from hw.npu.isa import ErrorCode, Opcode, Target, encode
from tests.test_dma_transpose import COL_BYTES, _expected, _mem_image

LATENCY = 12

SEQUENCES = {
    # (transpose, target, rows, cols)
    "transposed": [(True, Target.WGT, 17, 40), (True, Target.WGT, 16, 32), (True, Target.WGT, 5, 17)],
    "mixed": [(False, Target.ACT, 9, 40), (True, Target.WGT, 20, 33), (False, Target.WGT, 3, 5),
              (True, Target.ACT, 4, 16)],
    "small": [(False, Target.ACT, 1, 1), (False, Target.WGT, 2, 16), (True, Target.ACT, 1, 3),
              (False, Target.ACT, 1, 17)],
}


def run_sequence(W, seq, *, one_at_a_time=False, backpressure=False, max_outstanding=32, seed=3):
    """The LOADs of ``seq`` on DmaLoad(W). Returns (cycles, writes per target, tokens, first request cycle
    per LOAD, token cycle per LOAD, expected writes per LOAD)."""
    from amaranth.sim import Simulator

    from hw.npu.dma import DmaLoad

    rng = np.random.default_rng(seed)
    mem, words, wants = {}, [], []
    base = 0x4000
    for k, (tr, tgt, rows, cols) in enumerate(seq):
        ncol = (cols + 15) // 16
        stride = (ncol + 1) * COL_BYTES
        img = _mem_image(rng, base, rows, stride)
        mem.update(img)
        spm_addr, spm_stride = 2 + 3 * k, (cols + 5 if tr else rows + 2)
        wants.append((tgt, _expected(img, W, tr, base, stride, rows, cols, spm_addr, spm_stride)))
        words.append(encode(Opcode.LOAD, target=tgt, transpose=int(tr), signal=1 << k, mem_addr=base,
                            mem_stride=stride, rows=rows, cols=cols, spm_addr=spm_addr, spm_stride=spm_stride))
        base += rows * stride + 0x400

    dut = DmaLoad(preset("default"), W, max_outstanding=max_outstanding)
    out = {"writes": [], "tokens": [], "first_req": {}, "token_at": {}, "cycles": None}
    bp = np.random.default_rng(seed + 7)

    async def bench(ctx):
        req, resp = dut.mem.req, dut.mem.resp
        pending = collections.deque()
        nxt = 0                                   # next LOAD to offer
        req_owner = collections.deque()           # LOAD index of each request, in order (from the tags' order)
        issued_per = [0] * len(seq)
        need = [sum(-(-c // 16) * r for _, _, r, c in [s]) for s in seq]
        for cycle in range(20000):
            offer = nxt < len(seq) and (not one_at_a_time or len(out["tokens"]) == nxt)
            if offer:
                ctx.set(dut.cmd.payload.as_value(), words[nxt])
            ctx.set(dut.cmd.valid, int(offer))
            r_valid = bool(pending) and pending[0][0] <= cycle and not (backpressure and bp.random() < 0.3)
            if r_valid:
                _, addr, tag = pending[0]
                ctx.set(resp.payload.data, mem.get(addr, 0))
                ctx.set(resp.payload.tag, tag)
                ctx.set(resp.payload.error, 0)
            ctx.set(resp.valid, int(r_valid))
            q_ready = not (backpressure and bp.random() < 0.3)
            ctx.set(req.ready, int(q_ready))
            if offer and ctx.get(dut.cmd.ready):
                nxt += 1
            if q_ready and ctx.get(req.valid):
                owner = next(k for k in range(len(seq)) if issued_per[k] < need[k])
                issued_per[owner] += 1
                out["first_req"].setdefault(owner, cycle)
                req_owner.append(owner)
                pending.append((cycle + LATENCY, ctx.get(req.payload.addr), ctx.get(req.payload.tag)))
            if r_valid and ctx.get(resp.ready):
                pending.popleft()
                req_owner.popleft()
            if ctx.get(dut.spm.en):
                out["writes"].append((Target(ctx.get(dut.spm_target)), ctx.get(dut.spm.addr),
                                      ctx.get(dut.spm.data.as_value())))
            assert ctx.get(dut.error) == ErrorCode.NONE
            sig = ctx.get(dut.signal)
            if sig:
                k = sig.bit_length() - 1
                assert sig == 1 << k and k == len(out["tokens"]), f"token {sig:#b} out of order"
                assert k not in req_owner, f"LOAD {k}'s token with its responses outstanding"
                out["tokens"].append(k)
                out["token_at"][k] = cycle
                if k == len(seq) - 1:
                    out["cycles"] = cycle
                    await ctx.tick()
                    assert not ctx.get(dut.busy) and ctx.get(dut.cmd.ready)
                    return
            await ctx.tick()
        raise AssertionError("the LOADs did not finish")

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()
    return out, wants


def _check_in_order(writes, wants):
    """The writes are LOAD 0's, then LOAD 1's, ...; each LOAD's exactly its expected words."""
    i = 0
    for tgt, want in wants:
        mine = writes[i:i + len(want)]
        i += len(want)
        assert {t for t, _, _ in mine} == {tgt}
        got = {a: v for _, a, v in mine}
        assert len(got) == len(want) and got == want
    assert i == len(writes)


@pytest.mark.parametrize("W", [4, 16])
@pytest.mark.parametrize("name", sorted(SEQUENCES))
def test_two_loads_in_flight(W, name):
    seq = SEQUENCES[name]
    out, wants = run_sequence(W, seq)
    _check_in_order(out["writes"], wants)
    assert out["tokens"] == list(range(len(seq)))
    # the next LOAD's requests go out while the previous one is still taking responses
    assert out["first_req"][1] < out["token_at"][0]
    serial, _ = run_sequence(W, seq, one_at_a_time=True)
    _check_in_order(serial["writes"], wants)
    assert out["cycles"] < serial["cycles"], (out["cycles"], serial["cycles"])


@pytest.mark.parametrize("max_out", [1, 3, 32])
def test_two_loads_backpressure(max_out):
    """Random back-pressure on both streams and few outstanding requests: same writes, tokens in order."""
    for name, seq in SEQUENCES.items():
        out, wants = run_sequence(4, seq, backpressure=True, max_outstanding=max_out, seed=len(name) + max_out)
        _check_in_order(out["writes"], wants)
        assert out["tokens"] == list(range(len(seq)))
