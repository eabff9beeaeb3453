"""Batched generation (issue 18, RTL side): policies npu-only, naive and neupims on the SoC.

B requests with their own KV lengths, one generation step per call (:mod:`firmware.batch`), continuous
batching and KV allocation (:mod:`firmware.batch_runtime`).

Error bound against float64: every step's outputs, for every request, are within **1 % of the largest
change the block makes to its input** (the bound the existing tests state for a layer whose FCs run on the
matrix unit, tests/test_firmware_soc.py): in batched generation every FC is a GEMM on the matrix unit, and
attention in PIM (naive) has the same numerics as on the NPU (BF16 operands, FP32 accumulation, FP32 scores,
BF16 probabilities and outputs); no GELU runs in the banks' AF units. Measured: 0.09-0.15 % on the tiny
layer, 0.34-0.53 % on the GPT-2-small-shaped one (B = 3 at KV 5..18, B = 8 at KV 145..511). The prompt's K
and V are the float64 prefill's, rounded to BF16 by the runtime (:func:`firmware.batch_runtime.prompt_kv`), so
the reference is the float64 block over each request's whole sequence.

The RTL plays the same host script (writes and programs) as the functional model and must equal it bit for
bit in every step slot (inputs, hidden states, outputs of every step) and every KV row any request held; the
device's protocol checks and, on tiny, the independent Python checker watch every DRAM command.
"""

import dataclasses

import numpy as np
import pytest

from firmware.batch import BATCH_STAGES, BatchError, gemv_layouts, plan_batch
from firmware.batch_runtime import BatchRuntime, KvCapacityError, prompt_kv, run_script
from firmware.gpt2 import GptShape, random_weights
from hw.spec import fp as G
from hw.spec.soc_isa import SocOp
from sim.batch_run import compare, perf_model_steps, reference_outputs, run_model, run_rtl
from sim.run import soc_config
from sim.soc_model import SocModel

CFG = soc_config("tiny")
SHAPE = GptShape(32, 2, 1)
BOUND = 0.01
POLICIES = ("npu-only", "naive")


def _scenario(policy, cfg=CFG, shape=SHAPE, steps=4, max_tokens=32, io_slots=4, seed=0, skip="", split="auto"):
    """Three requests of 5, 17 and 9 prompt tokens (K and V written by the host); step 0, 1; request 'd' joins
    before step 2 (B = 4) with 12 prompt tokens prefilled on the device; 'a' leaves before step 3 (B = 3).
    Returns the runtime, the step records and the hidden states."""
    ws = random_weights(shape, seed)
    rng = np.random.default_rng(seed + 1)
    rt = BatchRuntime(cfg, shape, ws, policy, max_batch=4, max_tokens=max_tokens, io_slots=io_slots, max_prompt=12,
                      split=split)
    lens = {"a": 5, "b": 17, "c": 9, "d": 12}
    xs = {r: rng.standard_normal((n + steps, shape.d_model)).astype(np.float32) for r, n in lens.items()}

    def join(r):
        k, v = prompt_kv(ws, shape, xs[r][:lens[r]])
        rt.join(r, k, v, capacity=lens[r] + steps)

    for r in "abc":
        if r not in skip:
            join(r)
    recs = []
    for s in range(steps):
        if s == 2:
            rt.join("d", x=xs["d"][:lens["d"]], capacity=lens["d"] + steps)
        if s == 3:
            rt.leave("a")
        recs.append(rt.step({r: xs[r][q.length] for r, q in rt.requests.items()}))
    return rt, recs, xs, ws


@pytest.mark.parametrize("policy", POLICIES)
def test_batched_steps_within_bound_of_float64(policy):
    rt, recs, xs, ws = _scenario(policy)
    m, progs = run_model(rt)
    assert [len(r.rids) for r in recs] == [3, 3, 4, 3]
    assert [r.positions for r in recs] == [[5, 17, 9], [6, 18, 10], [7, 19, 11, 12], [20, 12, 13]]
    for rec in recs:
        out = rt.outputs(rec, m.read)
        ref = reference_outputs(rt, rec, xs, ws)
        x = np.stack([xs[r][p] for r, p in zip(rec.rids, rec.positions, strict=True)])
        delta = np.abs(ref - x).max(axis=1)
        err = np.abs(out - ref).max(axis=1)
        assert (err <= BOUND * delta).all(), (rec.index, err / delta)
    attn = rt.compiler.step([(q.kv, q.length - 1) for q in rt.requests.values()], 0)[2]
    ops = {w & 0xF for w in attn.words}
    if policy == "naive":
        assert SocOp.PIM in ops and SocOp.MATRIX not in ops, "naive: attention in PIM"
    else:
        assert SocOp.PIM not in ops and SocOp.MATRIX in ops, "npu-only: attention on the matrix unit"


def test_naive_pim_layouts_hold_the_caches():
    """After the scenario the naive policy's K (PIM GEMV layout, [head_dim, L]) and V^T ([L, head_dim]) hold
    exactly the BF16 K and V the npu-only policy keeps row-major, for every request still present (the new
    tokens' appends included)."""
    rt_n, _, _, _ = _scenario("naive")
    rt_o, _, _, _ = _scenario("npu-only")
    mn, _ = run_model(rt_n)
    mo, _ = run_model(rt_o)
    hd = SHAPE.head_dim
    for rid, qn in rt_n.requests.items():
        qo = rt_o.requests[rid]
        L = qn.length
        assert L == qo.length
        for h in range(SHAPE.heads):
            k = np.frombuffer(mo.read(qo.kv.k[0][h], L * hd * 2), dtype="<u2").reshape(L, hd)
            v = np.frombuffer(mo.read(qo.kv.v[0][h], L * hd * 2), dtype="<u2").reshape(L, hd)
            lk, lv = gemv_layouts(rt_n.bp, qn.kv, 0, h, L)                        # packed (hw/spec/macro.py)
            kw = mn.dev.weights(lk)                                               # [hd, L]
            vw = mn.dev.weights(lv)                                               # [L, hd]
            assert np.array_equal(kw.T, k), (rid, h)
            assert np.array_equal(vw, v), (rid, h)
            # lanes after the last token are still zero (the GEMV of the next step reads them times 0)
            vt_tail = mn.dev.weights(dataclasses.replace(lv, K=qn.kv.capacity))[L:]
            assert not vt_tail.any()


def test_kv_capacity_error_leaves_the_batch_intact():
    """A join the KV pool cannot hold raises KvCapacityError naming the numbers; no row is taken, nothing is
    written, and the requests present produce the same bits as without the attempt."""
    def run(attempt):
        ws = random_weights(SHAPE, 3)
        rng = np.random.default_rng(4)
        # max_batch 12: the packed K / V^T layouts (several tiles a row) fit 8 requests of 96 tokens, not 3
        rt = BatchRuntime(CFG, SHAPE, ws, "naive", max_batch=12, max_tokens=96)
        per = rt.bp.request_rows(96)
        fit = rt.pool.rows // per
        assert 1 <= fit < 12, (rt.pool.rows, per)
        xs = {}
        for j in range(fit):
            xs[j] = rng.standard_normal((16, SHAPE.d_model)).astype(np.float32)
            k, v = prompt_kv(ws, SHAPE, xs[j][:3 + j])
            rt.join(j, k, v)
        rt.step({j: xs[j][rt.requests[j].length] for j in rt.requests})
        if attempt:
            ops, runs, free = len(rt.ops), dict(rt.pool.runs), rt.pool.free_rows()
            with pytest.raises(KvCapacityError) as e:
                rt.join("big", capacity=96)
            msg = str(e.value)
            assert f"needs {per} row(s)" in msg and f"{free} of the pool's {rt.pool.rows} are free" in msg, msg
            assert "'big'" in msg and f"{fit} request(s)" in msg, msg
            assert len(rt.ops) == ops and rt.pool.runs == runs and "big" not in rt.requests
        rec = rt.step({j: xs[j][rt.requests[j].length] for j in rt.requests})
        m, _ = run_model(rt)
        return rt.outputs(rec, m.read), m.read(rt.bp.pool_rows[0] * rt.bp.row_index_bytes,
                                                rt.pool.high * rt.bp.row_index_bytes
                                                - rt.bp.pool_rows[0] * rt.bp.row_index_bytes)

    a, kv_a = run(True)
    b, kv_b = run(False)
    assert np.array_equal(a.view(np.uint32), b.view(np.uint32)) and kv_a == kv_b


def test_requests_leave_and_rows_are_reused():
    """Rows a request gave back go to the next one (first fit), which sees a cleared allocation; a request
    at its capacity must leave before the next step."""
    ws = random_weights(SHAPE, 5)
    rt = BatchRuntime(CFG, SHAPE, ws, "naive", max_batch=2, max_tokens=16)
    rt.join("x", capacity=2)
    rt.join("y", capacity=16)
    start = rt.pool.runs["x"][0]
    rng = np.random.default_rng(0)
    rt.step(rng.standard_normal((2, 32)))
    rt.step(rng.standard_normal((2, 32)))
    with pytest.raises(KvCapacityError, match="request 'x' is full: 2 tokens of its capacity of 2"):
        rt.step(rng.standard_normal((2, 32)))
    rt.leave("x")
    rt.join("z", capacity=2)
    assert rt.pool.runs["z"][0] == start
    rec = rt.step(rng.standard_normal((2, 32)))
    assert rec.rids == ["y", "z"] and rec.positions == [2, 0]
    m = SocModel(CFG)
    run_script(rt, m)
    assert np.isfinite(rt.outputs(rec, m.read)).all()


def test_batch_errors():
    ws = random_weights(SHAPE, 0)
    with pytest.raises(BatchError, match="policy must be one of npu-only, naive"):
        plan_batch(CFG, SHAPE, "ianus", 2, 16)
    with pytest.raises(BatchError, match=r"max_tokens \(200\) must be at most the 128 values"):
        plan_batch(CFG, SHAPE, "naive", 2, 200)
    with pytest.raises(BatchError, match="Row-Channel-Bank-Column"):
        plan_batch(soc_config("tiny-il"), SHAPE, "naive", 2, 16)
    rt = BatchRuntime(CFG, SHAPE, ws, "npu-only", max_batch=1, max_tokens=16)
    with pytest.raises(BatchError, match="no request"):
        rt.step(np.zeros((0, 32)))
    rt.join(1)
    with pytest.raises(BatchError, match="batch is full"):
        rt.join(2)
    with pytest.raises(BatchError, match="already in the batch"):
        rt.join(1)
    with pytest.raises(BatchError, match=r"step input must have shape \(1, 32\)"):
        rt.step(np.zeros((2, 32)))
    with pytest.raises(BatchError, match=r"with P in 1..0 \(the plan's max_prompt\)"):
        BatchRuntime(CFG, SHAPE, ws, "naive", 2, 16).join(0, x=np.zeros((3, 32)))
    with pytest.raises(BatchError, match="not both"):
        BatchRuntime(CFG, SHAPE, ws, "naive", 2, 16, max_prompt=4).join(0, np.zeros((1, 2, 3, 16)), x=np.zeros((3, 32)))
    with pytest.raises(BatchError, match="leaves no room"):
        BatchRuntime(CFG, SHAPE, ws, "npu-only", 2, 16).join(0, np.zeros((1, 2, 4, 16)), np.zeros((1, 2, 4, 16)),
                                                             capacity=4)


def test_bf16_rounding_of_the_prompt():
    """The prompt's K and V are written as BF16 (round to nearest even) of the float64 prefill."""
    ws = random_weights(SHAPE, 0)
    rt = BatchRuntime(CFG, SHAPE, ws, "npu-only", max_batch=1, max_tokens=16)
    x = np.random.default_rng(0).standard_normal((3, 32))
    k, v = prompt_kv(ws, SHAPE, x)
    q = rt.join(0, k, v)
    img, _ = rt.initial()
    got = np.frombuffer(img.read(q.kv.k[0][1], 3 * 16 * 2), dtype="<u2").reshape(3, 16)
    assert np.array_equal(got, G.bf16_bits(k[0, 1].astype(np.float32)))


@pytest.mark.parametrize("policy, config", [("npu-only", "tiny"), ("naive", "tiny"), ("naive", "tiny-dualrb")])
def test_rtl_bit_exact_with_model(policy, config):
    """The scenario (joins, a leave, B = 3 / 4 / 3) on the tiny SoC RTL (and naive on two row buffers, where the
    PCU's GEMVs open the PIM row buffer): every step slot and KV byte equal to the functional model's, no DRAM
    protocol violation (device checks and the Python checker)."""
    rt, recs, xs, ws = _scenario(policy, cfg=soc_config(config))
    assert rt.bp.io_slots >= len(recs)
    progs, res = run_rtl(rt, f"batch_{policy}_{config}")
    m, _ = run_model(rt)
    diff = compare(rt, m, res["dumps_raw"])
    assert set(diff) == {"slots", "kv"} and not any(diff.values()), diff
    prefill = 6 + (policy == "naive")          # the compiler's prefill stages (+ the naive layout copy)
    assert len(progs) == 7 * len(recs) + prefill and all(p["cycles"] > 0 for p in progs)
    pcu = sum(p["counters"]["pcu.completed"] for p in progs)
    assert (pcu > 0) == (policy == "naive"), pcu
    # The calibrated performance model times every step within 5 % of the RTL (each program started at the
    # RTL's measured start, as sim.calibrate does).
    rtl_steps = [sum(p["cycles"] for p in progs if p["name"].startswith(f"step{r.index} ")) for r in recs]
    for got, want in zip(perf_model_steps(rt, progs), rtl_steps, strict=True):
        assert abs(got - want) <= 0.05 * want, (got, rtl_steps)


@pytest.mark.parametrize("policy", POLICIES)
def test_two_layers_within_bound(policy):
    """Two layers: the second layer's K and V come from the first layer's outputs of the same step (and, for
    the request prefilled on the device, of its prefill). Without request 'c' (the KV pool of two tiny layers is
    smaller)."""
    shape = GptShape(32, 2, 2)
    rt, recs, xs, ws = _scenario(policy, shape=shape, steps=3, max_tokens=24, skip="c")
    assert [r.rids for r in recs] == [["a", "b"], ["a", "b"], ["a", "b", "d"]]
    m, _ = run_model(rt)
    for rec in recs:
        out = rt.outputs(rec, m.read)
        ref = reference_outputs(rt, rec, xs, ws)
        x = np.stack([xs[r][p] for r, p in zip(rec.rids, rec.positions, strict=True)])
        assert (np.abs(out - ref).max(axis=1) <= BOUND * np.abs(ref - x).max(axis=1)).all(), rec.index


def test_ianus_run_batch_cli(tmp_path):
    """``ianus run --batch 3`` on the tiny RTL: both policies on the same requests (different KV lengths),
    cycles per step and tokens/s printed, outputs bit-exact with the functional model and within bound."""
    import json
    import os
    import subprocess
    import sys

    summary = tmp_path / "batch.json"
    env = dict(os.environ, IANUS_RUN_JSON=str(summary))
    proc = subprocess.run([sys.executable, "-m", "sim.cli", "run", "--config", "tiny", "--batch", "3"],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    s = json.loads(summary.read_text())
    assert set(s) == {"npu-only", "naive"}
    assert "cycles per step" in proc.stdout and "naive / npu-only throughput" in proc.stdout
    for r in s.values():
        assert r["measured"] and r["bit_exact"] and r["tokens_per_s"] > 0 and r["cycles_per_step"][0] > 1000
        assert r["rel_err_vs_float64"] <= BOUND and len(set(r["kv_lengths"])) == 3
    assert s["naive"]["stage_cycles"].keys() == s["npu-only"]["stage_cycles"].keys()


@pytest.mark.long
def test_default_batch_of_8_bit_exact_and_naive_faster():
    """The bench's case (sim/benchmarks/neupims_rtl.py): one step of 8 requests (KV lengths 145..511) of the
    GPT-2-small-shaped layer on the default RTL, both policies bit-exact with the functional model and within
    bound; attention in PIM makes the step faster than on the NPU (measured 1.295x with the packed K / V^T GEMV
    layouts, 1.233x before), and the performance model
    is within 5 % of the RTL."""
    from sim.batch_run import measure_batch

    res = measure_batch("default", 8, 1, "verilator")
    for r in res.values():
        assert r["bit_exact"] and r["rel_err_vs_float64"] <= BOUND, r
        assert abs(r["perfmodel_cycles_per_step"][0] / r["cycles_per_step"][0] - 1) <= 0.05, r
    # naive's attention (packed GEMV macros, hw/spec/macro.py addr1) timed within 5 % (measured -3.5 %)
    att = res["naive"]
    assert abs(att["perfmodel_stage_cycles"]["attn"] / att["stage_cycles"]["attn"] - 1) <= 0.05, att
    assert res["naive"]["tokens_per_s"] > 1.1 * res["npu-only"]["tokens_per_s"], res


def test_rtl_edges_bit_exact():
    """Edges on the tiny RTL (naive): a request without a prompt (its first GEMVs have one key), one whose new
    tokens cross a 16-token boundary (a new K tile row and a new V^T column), B = 2; bit-exact with the model,
    within bound of float64."""
    ws = random_weights(SHAPE, 7)
    rng = np.random.default_rng(8)
    rt = BatchRuntime(CFG, SHAPE, ws, "naive", max_batch=2, max_tokens=32)
    xs = {"e": rng.standard_normal((3, 32)).astype(np.float32), "f": rng.standard_normal((18, 32)).astype(np.float32)}
    rt.join("e", capacity=3)
    k, v = prompt_kv(ws, SHAPE, xs["f"][:15])
    rt.join("f", k, v, capacity=18)
    recs = [rt.step({r: xs[r][q.length] for r, q in rt.requests.items()}) for _ in range(3)]
    assert [r.positions for r in recs] == [[0, 15], [1, 16], [2, 17]]
    progs, res = run_rtl(rt, "batch_naive_tiny_edges")
    m, _ = run_model(rt)
    diff = compare(rt, m, res["dumps_raw"])
    assert not any(diff.values()), diff
    for rec in recs:
        out = rt.outputs(rec, m.read)
        ref = reference_outputs(rt, rec, xs, ws)
        x = np.stack([xs[r][p] for r, p in zip(rec.rids, rec.positions, strict=True)])
        assert (np.abs(out - ref).max(axis=1) <= BOUND * np.abs(ref - x).max(axis=1)).all(), rec.index


# ---------------------------------------------------------------------------------------------
# neupims: two sub-batches, one's NPU stage beside the other's PIM attention (two row buffers)
# ---------------------------------------------------------------------------------------------

DUAL = soc_config("tiny-dualrb")


def _overlap(spans, a="mu", b="pcu") -> int:
    """Cycles in which units ``a`` and ``b`` are both busy (from the RTL's busy spans of one program)."""
    total = 0
    for s0, e0 in spans.get(a, []):
        for s1, e1 in spans.get(b, []):
            total += max(0, min(e0, e1) - max(s0, s1))
    return total


def _by_rid(rt, recs, m):
    return {(rec.index, r): o for rec in recs for r, o in zip(rec.rids, rt.outputs(rec, m.read), strict=True)}


def test_neupims_needs_two_row_buffers():
    with pytest.raises(BatchError, match=r"policy neupims .* two row buffers .* configuration 'tiny' has 1"):
        plan_batch(CFG, SHAPE, "neupims", 2, 16)
    plan_batch(DUAL, SHAPE, "neupims", 2, 16)


def test_neupims_partition_by_attention_cost():
    """The cost model's partition: the rows sorted by their attention estimate, the lightest in sub-batch A
    (its attention hides behind B's QKV, the heavier B's behind A's projection and FFN), each sub-batch in
    join order; one request: no split; the step's programs are ln1, qkv_a, the two merged programs, post_b."""
    rt = BatchRuntime(DUAL, SHAPE, random_weights(SHAPE, 0), "neupims", max_batch=4, max_tokens=96, split="always")
    comp = rt.compiler
    kv = rt.bp.layout(rt.bp.pool_rows[0], 96)
    reqs = [(kv, 90), (kv, 3), (kv, 60), (kv, 5)]
    order, k = comp.partition(reqs)
    assert sorted(order) == [0, 1, 2, 3] and 1 <= k < 4
    att = [comp.attn_est(p) for _, p in reqs]
    assert max(att[j] for j in order[:k]) <= min(att[j] for j in order[k:]), (order, k)
    assert order[:k] == sorted(order[:k]) and order[k:] == sorted(order[k:])
    best = min(comp.step_est(sum(att[j] for j in order[:n]), sum(att[j] for j in order[n:]), n, 4 - n)
               for n in range(1, 4))
    assert comp.step_est(sum(att[j] for j in order[:k]), sum(att[j] for j in order[k:]), k, 4 - k) == best
    assert comp.partition(reqs[:1]) == ([0], None)
    names = [st.name for st in comp.step([reqs[j] for j in order], 0, k)]
    assert names == ["ln1", "qkv_a", "attn_a|qkv_b", "post_a|attn_b", "post_b"]
    assert [st.name for st in comp.step(reqs[:1], 0)] == list(BATCH_STAGES)


def test_neupims_same_bits_as_naive_within_bound():
    """neupims changes only the order of independent work: on the functional model every output of the
    scenario (joins, a leave) has the same bits as under naive (rows matched by request: neupims orders the
    rows by sub-batch) and every KV byte is the same; within the float64 bound."""
    rt_n, recs_n, xs, ws = _scenario("naive", cfg=DUAL)
    rt_p, recs_p, _, _ = _scenario("neupims", cfg=DUAL, split="always")
    mn, _ = run_model(rt_n)
    mp, _ = run_model(rt_p)
    assert [r.split for r in recs_p] == [1, 1, 2, 1] and any(r.rids != q.rids for r, q in zip(recs_p, recs_n, strict=True))
    on, op = _by_rid(rt_n, recs_n, mn), _by_rid(rt_p, recs_p, mp)
    assert on.keys() == op.keys()
    for key in on:
        assert np.array_equal(on[key].view(np.uint32), op[key].view(np.uint32)), key
    kv0 = rt_p.bp.pool_rows[0] * rt_p.bp.row_index_bytes
    assert rt_p.pool.high == rt_n.pool.high and rt_p.bp.pool_rows == rt_n.bp.pool_rows
    n = rt_p.pool.high * rt_p.bp.row_index_bytes - kv0
    assert mp.read(kv0, n) == mn.read(kv0, n)
    for rec in recs_p:
        out = rt_p.outputs(rec, mp.read)
        ref = reference_outputs(rt_p, rec, xs, ws)
        x = np.stack([xs[r][p] for r, p in zip(rec.rids, rec.positions, strict=True)])
        assert (np.abs(out - ref).max(axis=1) <= BOUND * np.abs(ref - x).max(axis=1)).all(), rec.index


def test_neupims_rtl_bit_exact_and_overlapped():
    """The scenario under neupims on the tiny-dualrb RTL: every step slot and KV byte equal to the functional
    model's (no DRAM protocol violation: device checks and the Python checker), within the float64 bound. The
    merged programs really
    overlap: in every ``attn_a|qkv_b`` and ``post_a|attn_b`` the matrix unit and the PCU are busy at the same
    time for at least a quarter of the shorter of their busy times (the RTL's busy spans; measured: 72-77 % of
    the PCU's busy time, e.g. 166 of 230 cycles; with the two streams concatenated instead of merged it is 0 and
    the programs take 3,788 / 5,217 cycles instead of 3,255 / 4,726). The calibrated performance model times
    every step within 5 % (measured within 1 %)."""
    rt, recs, xs, ws = _scenario("neupims", cfg=DUAL, split="always")
    progs, res = run_rtl(rt, "batch_neupims_tiny-dualrb")
    m, _ = run_model(rt)
    diff = compare(rt, m, res["dumps_raw"])
    assert set(diff) == {"slots", "kv"} and not any(diff.values()), diff
    merged = [p for p in progs if "|" in p["name"]]
    assert len(merged) == 2 * len(recs)
    for p in merged:
        both = _overlap(p["spans"])
        mu = sum(e - s for s, e in p["spans"].get("mu", []))
        pcu = sum(e - s for s, e in p["spans"].get("pcu", []))
        assert mu > 0 and pcu > 0, p["name"]
        assert both >= 0.25 * min(mu, pcu), (p["name"], both, mu, pcu)
    assert len(progs) == 5 * len(recs) + 7          # five programs per step, the prefill and its layout copy
    rtl_steps = [sum(p["cycles"] for p in progs if p["name"].startswith(f"step{r.index} ")) for r in recs]
    for got, want in zip(perf_model_steps(rt, progs), rtl_steps, strict=True):
        assert abs(got - want) <= 0.05 * want, (got, rtl_steps)
    for rec in recs:
        out = rt.outputs(rec, m.read)
        ref = reference_outputs(rt, rec, xs, ws)
        x = np.stack([xs[r][p] for r, p in zip(rec.rids, rec.positions, strict=True)])
        assert (np.abs(out - ref).max(axis=1) <= BOUND * np.abs(ref - x).max(axis=1)).all(), rec.index


def test_neupims_auto_split_weighs_no_split():
    """Split mode ``auto``: the cost model keeps one batch when a second pass over the weights costs more than
    the attention it hides (the tiny scenario: every step; its programs are then naive's, word for word: a
    sub-batch of at most ``array_rows`` rows costs the matrix unit as much as the whole batch), and splits when
    a sub-batch's NPU stages cost less than the batch's (rows beyond the array's). Unknown modes are refused."""
    rt_a, recs_a, _, _ = _scenario("neupims", cfg=DUAL)
    rt_n, _, _, _ = _scenario("naive", cfg=DUAL)
    assert [r.split for r in recs_a] == [0, 0, 0, 0]
    assert [w for _, _, _, w in rt_a.programs] == [w for _, _, _, w in rt_n.programs]
    comp = rt_a.compiler
    kv = rt_a.bp.layout(rt_a.bp.pool_rows[0], 32)
    reqs = [(kv, 31)] * 4
    att = comp.attn_est(31)
    none, split = comp.none_est(4 * att, 4), comp.step_est(2 * att, 2 * att, 2, 2)
    assert (comp.partition(reqs)[1] == 0) == (none <= split)
    # NPU stages proportional to their rows (a compute-bound array): a sub-batch costs half the batch and the
    # split hides the attention
    comp.__dict__["_npu_cache"] = {m: (m * att, m * att) for m in range(1, 5)}
    assert comp.partition(reqs) == ([0, 1, 2, 3], 2)
    with pytest.raises(BatchError, match="split mode must be one of auto, always"):
        BatchRuntime(DUAL, SHAPE, random_weights(SHAPE, 0), "neupims", 2, 16, split="never")


def test_neupims_split_timed_on_the_performance_model():
    """Split mode ``model`` (``sim.batch_run.perf_timer``): the candidates are compiled and timed on the calibrated
    performance model. B = 24 on ``default-dualrb`` is the case where the cost model's ``auto`` chose 12 / 12
    and the RTL ran it 0.78x as fast as no split (README, issue 18): timed, no split is chosen, and it is the
    fastest candidate by the timer. Bad timers and modes are refused."""
    from firmware.batch import BatchCompiler
    from sim.batch_run import perf_timer, prepare_batch

    rt_a, recs_a, _, _ = prepare_batch("default-dualrb", "neupims", 24, steps=1, split="auto")
    rt_m, recs_m, _, _ = prepare_batch("default-dualrb", "neupims", 24, steps=1, split="model")
    assert [r.split for r in recs_a] == [12] and [r.split for r in recs_m] == [0]
    assert rt_m.compiler.timer is not None and rt_a.compiler.timer is None
    timer = perf_timer(soc_config("default-dualrb"))
    reqs = [(r.kv, r.length - 1) for r in rt_a.requests.values()]
    order, _ = rt_a.compiler.partition(reqs)
    reqs = [reqs[j] for j in order]
    none, split = (timer(rt_a.compiler.step(reqs, 0, split=c)) for c in (0, 12))
    assert none < split, (none, split)
    with pytest.raises(BatchError, match="split mode must be one of auto, always, model"):
        prepare_batch("tiny-dualrb", "neupims", 2, split="bogus")
    with pytest.raises(BatchError, match="timer must be callable"):
        BatchCompiler(rt_a.bp, "auto", timer=5)
