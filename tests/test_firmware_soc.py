"""SoC firmware without RTL: ISA table, assembler/disassembler, compiler, functional model, weights.

The end-to-end numerics here run on the functional model (``sim/soc_model.py``),
which the RTL tests (``tests/test_soc_e2e.py``) hold bit-exact against the RTL.

Error bound against the float64 GPT-2 block (stated in README): with every FC on
the matrix unit the largest output error is below 1 % of the largest change the
block makes to its input (BF16 activations, FP32 accumulation); with the FCs of
generation in PIM it is below 10 %, dominated by the PIM AF unit's piecewise
linear GELU (|err| <= 0.8 step^2 / 8 + 2^-8 * 1.13 |x| per element, tests/test_pim_device.py).
"""

import numpy as np
import pytest

from firmware import isa
from firmware.asm import AsmError, assemble, disassemble
from firmware.compiler import HEAD_GROUPS, CompileError, compile_model, plan_memory
from firmware.gpt2 import GptShape, WeightsError, load_weights, random_weights, reference_block, save_npz
from firmware.isa import CpError, SocOp
from firmware.runtime import build_job, read_outputs
from hw.config import preset
from sim.run import reference, soc_config
from sim.soc_model import SocModel, run_job

CFG = soc_config("tiny")
SHAPE = GptShape(32, 2, 1)
MU_BOUND, PIM_BOUND = 0.01, 0.10


def _run(policy, prefill, total, layers=1, seed=0):
    shape = GptShape(SHAPE.d_model, SHAPE.heads, layers)
    w = random_weights(shape, seed)
    x = np.random.default_rng(seed + 1).standard_normal((total, shape.d_model)).astype(np.float32)
    cm = compile_model(CFG, shape, policy, prefill, total)
    job = build_job(cm, w, x)
    m = run_job(job)
    return cm, read_outputs(cm, m.read), x, w, m


# -- ISA, assembler ----------------------------------------------------------------------------

def test_isa_table_covers_every_op_and_payload_fits():
    assert {s.op for s in isa.ISA_TABLE} == set(SocOp)
    assert isa.VDMA_FIELDS[-1][1] + isa.VDMA_FIELDS[-1][2] == isa.VDMA_BITS
    for op, width in isa.PAYLOAD_WIDTH.items():
        assert width <= isa.PAYLOAD_BITS, op


@pytest.mark.parametrize("policy", ["ianus", "npu-mem", "naive"])
def test_assembler_round_trips_compiled_programs(policy):
    cm = compile_model(CFG, SHAPE, policy, 8, 10)
    words = [w for st in cm.stages for w in st.words]
    ops = {w & 0xF for w in words}
    assert ops >= {SocOp.END, SocOp.FENCE, SocOp.MATRIX, SocOp.VECTOR, SocOp.VLOAD, SocOp.VSTORE} | (
        {SocOp.PIM} if policy != "npu-mem" else set())
    text = disassemble(words)
    assert assemble(text) == words
    assert isa.from_bytes(isa.to_bytes(words)) == words


@pytest.mark.parametrize("text, msg", [
    ("jump 3", "unknown mnemonic 'jump'"),
    ("fence mu,gpu", "unknown unit 'gpu'"),
    ("matrix LOAD rows=x", "field rows needs an integer"),
    ("matrix FOO", "unknown matrix operation"),
    ("matrix LOAD rows=70000", "must fit in 16 bits"),
    ("vector ADD q=1", "unknown vector field 'q'"),
    ("vector ADD a_fmt=FP64", "a_fmt must be one of"),
    ("vload mem_addr=0 rows=1", "VLOAD needs fields"),
    ("pim GEMV n=1 zz=2", "unknown PIM fields"),
    ("end 5", "end takes no operands"),
])
def test_assembler_errors_name_the_line(text, msg):
    with pytest.raises(AsmError, match=msg) as e:
        assemble("end\n# comment\n" + text)
    assert "line 3" in str(e.value)


def test_malformed_binary_is_rejected():
    with pytest.raises(isa.IsaError, match="multiple of 32"):
        isa.from_bytes(bytes(33))
    with pytest.raises(isa.IsaError, match="illegal op code 0"):
        isa.decode(0, index=4)
    with pytest.raises(isa.IsaError, match="reserved header bits"):
        isa.decode(int(SocOp.END) | 1 << 20)
    with pytest.raises(isa.IsaError, match="payload wider"):
        isa.decode(int(SocOp.PIM) | 1 << (32 + 200))


# -- functional model: errors -----------------------------------------------------------------

def _model_with(words):
    m = SocModel(CFG)
    m.write(0x1000, isa.to_bytes(words))
    return m


def test_model_errors():
    m = _model_with([isa.encode(SocOp.FENCE, units=1), 0x9])
    r = m.run(0x1000, 2)
    assert (r.error, r.error_pc) == (CpError.ILLEGAL, 1)
    r = _model_with([isa.encode(SocOp.FENCE)]).run(0x1000, 1)
    assert (r.error, r.error_pc) == (CpError.ILLEGAL, 1), "running past the program end is an error"
    assert SocModel(CFG).run(0x1001, 1).error == CpError.BAD_PROGRAM
    assert SocModel(CFG).run(CFG.pim.total_bytes, 1).error == CpError.BAD_PROGRAM
    from hw.npu import isa as mu_isa
    bad = mu_isa.encode(mu_isa.Opcode.LOAD, mem_addr=16, mem_stride=32, rows=1, cols=16)
    r = _model_with([isa.encode(SocOp.MATRIX, word=bad), isa.encode(SocOp.END)]).run(0x1000, 2)
    assert r.error == CpError.MU | (mu_isa.ErrorCode.MISALIGNED.value << 8)
    r = _model_with([isa.encode(SocOp.VLOAD, mem_addr=0, mem_stride=0, rows=1, cols=1, spm_addr=1 << 20,
                                spm_pitch=0), isa.encode(SocOp.END)]).run(0x1000, 2)
    assert r.error == CpError.VQ | (isa.VqError.DMA_SPM << 8)
    r = _model_with([isa.encode(SocOp.PIM, word=13), isa.encode(SocOp.END)]).run(0x1000, 2)
    assert r.error & 0xFF == CpError.PCU and r.error >> 8 == 1


# -- compiler + model vs float64 ----------------------------------------------------------------

@pytest.mark.parametrize("policy, bound", [("npu-mem", MU_BOUND), ("ianus", PIM_BOUND), ("naive", PIM_BOUND)])
def test_layer_within_bound_of_float64(policy, bound):
    cm, y, x, w, _ = _run(policy, 8, 11)
    ref = reference(x, w, cm.shape)
    delta = np.abs(ref - x).max()
    err = np.abs(y - ref)
    assert err[:8].max() <= MU_BOUND * delta, (err[:8].max(), delta)       # prefill: matrix unit
    assert err.max() <= bound * delta, (err.max(), delta)
    if policy != "npu-mem":
        assert {cm.mapping[("gen", fc)] for fc in ("qkv", "proj", "fc1", "fc2")} == {"pim"}
        assert any(w & 0xF == SocOp.PIM for st in cm.stages for w in st.words)


def test_two_layers_chain():
    cm, y, x, w, _ = _run("ianus", 4, 6, layers=2)
    ref = reference(x, w, cm.shape)
    assert np.abs(y - ref).max() <= PIM_BOUND * np.abs(ref - x).max()


def test_kv_cache_generation_equals_recompute():
    """npu-mem: generating tokens one at a time with the KV cache gives the same bits as prefilling them all."""
    _, y_gen, *_ = _run("npu-mem", 5, 10)
    _, y_all, *_ = _run("npu-mem", 10, 10)
    np.testing.assert_array_equal(y_gen.view(np.uint32), y_all.view(np.uint32))


def test_ianus_and_naive_same_bits():
    """Overlap changes timing, not results: ianus and naive place the same work in PIM... except the head-group
    split of QKV, whose GEMVs are the same per output; outputs agree bit for bit."""
    _, a, *_ = _run("ianus", 6, 9)
    _, b, *_ = _run("naive", 6, 9)
    np.testing.assert_array_equal(a.view(np.uint32), b.view(np.uint32))


def test_head_group_split_same_bits_and_auto_follows_the_performance_model():
    """Generation's QKV + attention scheduled as one GEMV (``plain``) or a GEMV per head group (``split``):
    the same bits. ``auto`` picks the schedule the calibrated performance model times faster: on the
    GPT-2-small layer of ``default`` the split costs more (every step of a head group's attention reads DRAM,
    which a PIM command holds), so ``auto`` must not choose it where it is slower."""
    from firmware.compiler import LayerCompiler, choose_mapping
    from sim.perfmodel import PerfModel, decode_program, stage_tags

    outs = {}
    for hg in ("plain", "split"):
        shape = GptShape(SHAPE.d_model, SHAPE.heads, 1)
        w = random_weights(shape, 3)
        x = np.random.default_rng(4).standard_normal((7, shape.d_model)).astype(np.float32)
        cm = compile_model(CFG, shape, "ianus", 5, 7, head_groups=hg)
        gen = [st for st in cm.stages if st.phase == "gen" and st.name == "qkv_attn"]
        assert all(bool(st.est.get("overlap")) == (hg == "split") for st in gen), hg
        m = run_job(build_job(cm, w, x))
        outs[hg] = read_outputs(cm, m.read)
    np.testing.assert_array_equal(outs["plain"].view(np.uint32), outs["split"].view(np.uint32))
    with pytest.raises(CompileError, match="head_groups must be one of auto, plain, split, not 'fast'"):
        compile_model(CFG, SHAPE, "ianus", 4, 6, head_groups="fast")

    cfg = soc_config("default")
    shape = GptShape(768, 12, 1)
    plan = plan_memory(cfg, shape, 96)
    cycles, chosen = {}, {}
    for hg in HEAD_GROUPS:
        lc = LayerCompiler(plan, "ianus", choose_mapping(cfg, shape, "ianus", 32), hg)
        st = lc.stage(0, "gen", "qkv_attn", 1, 64)
        ins = decode_program(st.words)
        cycles[hg] = PerfModel(cfg).run_program(None, ins=ins, tags=stage_tags("qkv_attn", ins)).cycles
        chosen[hg] = bool(st.est.get("overlap"))
    assert chosen == {"auto": cycles["split"] < cycles["plain"], "plain": False, "split": True}, (chosen, cycles)
    assert cycles["auto"] == min(cycles["plain"], cycles["split"]), cycles


@pytest.mark.parametrize("config, d", [("tiny", 32), ("default", 768)])
def test_gelu_unit_choice_is_the_faster_on_the_performance_model(config, d):
    """Generation's FC1 with its GELU in the PIM AF units or on the vector unit (``gelu_unit``): ``auto`` takes
    the one the calibrated performance model runs faster (the AF units on tiny, the vector unit on default)."""
    from firmware.compiler import LayerCompiler, choose_mapping
    from sim.perfmodel import PerfModel, decode_program

    cfg = soc_config(config)
    shape = GptShape(d, 2 if config == "tiny" else 12, 1)
    plan = plan_memory(cfg, shape, 40)
    cycles, units = {}, {}
    for gu in ("auto", "pim", "vector"):
        lc = LayerCompiler(plan, "ianus", choose_mapping(cfg, shape, "ianus", 32), gelu_unit=gu)
        st = lc.stage(0, "gen", "fc1", 1, 32)
        cycles[gu] = PerfModel(cfg).run_program(None, ins=decode_program(st.words)).cycles
        units[gu] = st.est["gelu_unit"]
    assert units["pim"] == "pim" and units["vector"] == "vector"
    assert cycles["auto"] == min(cycles["pim"], cycles["vector"]), (units, cycles)
    assert units["auto"] == ("pim" if config == "tiny" else "vector"), (units, cycles)
    with pytest.raises(CompileError, match="gelu_unit must be one of auto, pim, vector, not 'npu'"):
        LayerCompiler(plan, "ianus", choose_mapping(cfg, shape, "ianus", 32), gelu_unit="npu")


def test_compile_errors():
    with pytest.raises(CompileError, match="policy must be one of"):
        compile_model(CFG, SHAPE, "fast", 4, 4)
    with pytest.raises(CompileError, match="prefill"):
        compile_model(CFG, SHAPE, "ianus", 5, 4)
    with pytest.raises(CompileError, match="do not fit|exhausted"):
        plan_memory(CFG, GptShape(256, 4, 1), 8)
    with pytest.raises(CompileError, match="multiples of 16"):
        plan_memory(CFG, GptShape(40, 2, 1), 8)
    # No head-group size fills whole PIM tiles (the search for one used to loop for ever).
    with pytest.raises(CompileError, match="no head group of 1 heads of 64 fills whole PIM tiles"):
        plan_memory(preset("ianus"), GptShape(64, 1, 1), 8)


# -- weights ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("prefix", ["", "transformer."])
def test_weights_npz_round_trip(tmp_path, prefix):
    shape = GptShape(32, 2, 2)
    w = random_weights(shape, 3)
    path = tmp_path / "w.npz"
    save_npz(path, w, prefix=prefix)
    got_shape, got = load_weights(path, heads=2)
    assert got_shape == shape
    np.testing.assert_array_equal(got[1].fc2_w, w[1].fc2_w)


def test_weights_safetensors_bf16(tmp_path):
    import ml_dtypes
    from safetensors.numpy import save_file

    shape = GptShape(64, 1, 1)
    w = random_weights(shape, 4)[0]
    names = ("ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
             "attn.c_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
             "mlp.c_proj.weight", "mlp.c_proj.bias")
    tensors = {f"h.0.{n}": a.astype(ml_dtypes.bfloat16) for n, a in zip(names, vars(w).values(), strict=True)}
    path = tmp_path / "w.safetensors"
    try:
        save_file(tensors, str(path))
    except Exception:      # pragma: no cover - older safetensors without bfloat16 numpy support
        pytest.skip("safetensors cannot write bfloat16 numpy arrays here")
    shape2, got = load_weights(path)
    assert shape2.d_model == 64 and shape2.heads == 1
    np.testing.assert_array_equal(got[0].qkv_w, w.qkv_w.astype(ml_dtypes.bfloat16).astype(np.float32))


def test_weights_errors(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        load_weights(tmp_path / "none.npz")
    np.savez(tmp_path / "bad.npz", **{"h.0.ln_1.weight": np.ones(32, np.float32)})
    with pytest.raises(WeightsError, match="missing tensor ln_1.bias"):
        load_weights(tmp_path / "bad.npz", heads=2)
    w = random_weights(GptShape(32, 2, 1), 0)
    save_npz(tmp_path / "ok.npz", w)
    with pytest.raises(WeightsError, match="holds 1 layers, 3 requested"):
        load_weights(tmp_path / "ok.npz", heads=2, layers=3)
    with pytest.raises(WeightsError, match="give the head count"):
        load_weights(tmp_path / "ok.npz")


def test_reference_block_is_causal():
    shape = GptShape(32, 2, 1)
    w = random_weights(shape, 0)[0]
    x = np.random.default_rng(0).standard_normal((6, 32))
    full = reference_block(x, w, shape)
    np.testing.assert_allclose(reference_block(x[:4], w, shape), full[:4], rtol=1e-12, atol=1e-12)


def test_head_batch_choice_layouts_and_errors():
    """Generation attention batched across heads (:data:`firmware.compiler.HEAD_BATCH`): ``auto`` turns it on
    only where one head's ``hd`` inputs underfill the array's K tile (``ianus`` preset: 128 rows x 4 MACs >
    64), never under hpim; ``on`` gives token-major V caches; bad values and impossible shapes are refused."""
    from firmware.compiler import head_batch_on, kv_layout
    from firmware.gpt2 import SHAPES

    xl = SHAPES["xl"]
    assert not head_batch_on(CFG, SHAPE, "ianus") and not head_batch_on(soc_config("default"), GptShape(768, 12, 1),
                                                                        "ianus")
    assert head_batch_on(preset("ianus"), xl, "ianus") and head_batch_on(preset("ianus"), xl, "npu-mem")
    assert not head_batch_on(preset("ianus"), xl, "hpim") and kv_layout(preset("ianus"), xl, "hpim") == "head"
    from firmware.memory_plan import k_group
    assert k_group(preset("ianus"), xl) == 4            # 4 x 64 BF16 = 512 B, a quarter of a 2 KB row
    assert k_group(preset("ianus"), GptShape(4096, 32, 1)) == 2 and k_group(preset("ianus"), GptShape(1920, 20, 1)) == 2
    assert k_group(CFG, GptShape(32, 2, 1)) == 2 and k_group(CFG, GptShape(64, 4, 1)) == 2   # 256-B rows: 64 B
    cm = compile_model(CFG, SHAPE, "ianus", 4, 6, head_batch="on")
    lp = cm.plan.layers[0]
    assert lp.k_stride == lp.v_stride == 2 * SHAPE.head_dim * 2 == SHAPE.d_model * 2   # both heads one group
    assert lp.vc[1] - lp.vc[0] == SHAPE.head_dim * 2 and lp.kc[1] - lp.kc[0] == SHAPE.head_dim * 2
    with pytest.raises(CompileError, match="head_batch must be one of auto, on, off, not 'yes'"):
        compile_model(CFG, SHAPE, "ianus", 4, 6, head_batch="yes")
    with pytest.raises(CompileError, match="does not apply to policy hpim"):
        compile_model(soc_config("tiny-hpim"), SHAPE, "hpim", 4, 6, head_batch="on")
    with pytest.raises(CompileError, match="kv_layout must be one of head, token"):
        plan_memory(CFG, SHAPE, 8, kv_layout="rows")


def test_head_weight_sources_place_every_head_and_coalesce():
    """:class:`HeadsN` / :class:`HeadsK` loads: one per head piece of a tile, at the head's cache and the
    piece's place in the weight scratchpad; one load where the caches sit side by side (token-major)."""
    from firmware.program import HeadsK, HeadsN

    hd = 16
    apart = HeadsN([0x1000, 0x3000, 0x5000], hd, hd * 2)          # head-major: three separate caches
    lds = apart.loads(n0=4, nt=8, k0=8, kt=32)                      # inputs 8..39: heads 0 (8..15), 1, 2 (32..39)
    assert [(ld["mem_addr"], ld["cols"], ld["spm_off"]) for ld in lds] == [
        (0x1000 + 4 * 32 + 16, 8, 0), (0x3000 + 4 * 32, 16, 8), (0x5000 + 4 * 32, 8, 24)]
    assert all(ld["transpose"] == 1 and ld["rows"] == 8 and ld["mem_stride"] == 32 for ld in lds)
    side = HeadsN([0x1000, 0x1020, 0x1040], hd, 96)                 # token-major: heads side by side
    assert side.loads(n0=4, nt=8, k0=8, kt=32) == [dict(transpose=1, mem_addr=0x1000 + 4 * 96 + 16, mem_stride=96,
                                                          rows=8, cols=32, spm_off=0)]
    v = HeadsK([0x1000, 0x3000], hd, hd * 2, cols=4)
    lds = v.loads(n0=0, nt=32, k0=2, kt=5)
    assert [(ld["mem_addr"], ld["cols"], ld["spm_off"]) for ld in lds] == [(0x1000 + 2 * 32, 16, 0),
                                                                           (0x3000 + 2 * 32, 16, 4 * 5)]
    assert HeadsK([0x1000, 0x1020], hd, 64, cols=4).loads(0, 32, 2, 5) == [
        dict(transpose=0, mem_addr=0x1000 + 2 * 64, mem_stride=64, rows=5, cols=32, spm_off=0)]


def test_head_batch_heads_narrower_than_an_accumulator_word():
    """An array wider than a head (32 columns, heads of 16): ``P V``'s diagonal blocks start inside an
    accumulator word; the stores go from the last head to the first, each from the word holding its first
    output, so a head's store rewrites the columns its successor's store covered. Same bits as one GEMM per
    head on the functional model (the RTL's tiny array has 4 columns, where every head is whole words)."""
    cfg = CFG.replace(name="tiny-c32", **{"npu.array_cols": 32})
    shape = GptShape(64, 4, 1)
    w = random_weights(shape, 3)
    x = np.random.default_rng(4).standard_normal((8, shape.d_model)).astype(np.float32)
    outs = {}
    for hb in ("off", "on"):
        cm = compile_model(cfg, shape, "ianus", 5, 8, head_batch=hb)
        outs[hb] = read_outputs(cm, run_job(build_job(cm, w, x)).read)
    np.testing.assert_array_equal(outs["on"].view(np.uint32), outs["off"].view(np.uint32))
    with pytest.raises(CompileError, match=r"head group.s width \(1 x head_dim 16\) a multiple of the array.s 32"):
        compile_model(cfg, GptShape(48, 3, 1), "ianus", 5, 8, head_batch="on")


def test_attention_pipeline_choice_and_order():
    """``attn_pipeline``: ``auto`` is on for the multi-core presets only (the single-core configurations keep
    the phased schedule, their programs unchanged); a bad value is a CompileError; ``on`` puts every head's
    softmax between a FENCE before it (its Q K^T done) and one after it (before its P V), with the same
    vector instructions as ``off`` in another order."""
    from firmware.compiler import attn_pipeline_on

    assert attn_pipeline_on(preset("ianus")) and not attn_pipeline_on(preset("default"))
    assert not attn_pipeline_on(preset("tiny")) and attn_pipeline_on(preset("tiny"), "on")
    with pytest.raises(CompileError, match="attn_pipeline must be one of auto, on, off"):
        attn_pipeline_on(preset("tiny"), "bogus")
    cfg = soc_config("default")
    shape = GptShape(768, 12, 1)
    stages = {}
    for ap in ("off", "on"):
        cm = compile_model(cfg, shape, "ianus", 32, 34, attn_pipeline=ap)
        stages[ap] = next(st for st in cm.stages if st.phase == "prefill" and st.name == "qkv_attn")
    on, off = (stages[k].words for k in ("on", "off"))
    vq = [sorted(w for w in ws if isa.decode(w)["op"] in (SocOp.VECTOR, SocOp.VLOAD, SocOp.VSTORE)) for ws in (on, off)]
    assert vq[0] == vq[1] and len(vq[0]) >= 4 * 12
    code = {SocOp.FENCE: "F", SocOp.VLOAD: "L", SocOp.VSTORE: "S", SocOp.VECTOR: "v", SocOp.MATRIX: "m"}
    ops = "".join(code.get(isa.decode(w)["op"], "?") for w in on)
    assert ops.count("F") - sum(1 for w in off if isa.decode(w)["op"] == SocOp.FENCE) == 12 + 2 - 3
    # after the scatter's FENCE, 14 stages each ended by one FENCE: stage 0 Q K^T only, stages 1..12 one head's
    # softmax (a load, SCALE, SOFTMAX, a store) first and then matrix work, stage 13 the last P V only
    stages = ops[:-2].split("F")[-14:]
    assert ops.endswith("F?") and len(stages) == 14, ops
    assert stages[0].strip("m") == "" and stages[0] and stages[-1].strip("m") == "" and stages[-1], stages
    assert all(st.startswith("LvvS") and st[4:].strip("m") == "" and st[4:] for st in stages[1:-1]), stages


def test_pim_tiles_side_by_side_for_several_cores():
    """A prefill FC over PIM-layout weights on a multi-core NPU (``default`` with 4 cores: tiles of 32 outputs,
    4 x 16 array columns) puts two tiles side by side in one COMPUTE of 64 columns (a transposed load per
    tile, each into its place) so that every core has columns; the outputs are the same bits as with one
    core (functional model), and the one-core programs are the ones they were (one tile per COMPUTE).
    Multi-core also writes the prompt's q, K and V with one VSTORE per run of heads that lie side by side
    (fewer VSTOREs than one per head and kind): the same bits too."""
    from hw.spec.soc_isa import SocOp
    from sim.perfmodel import decode_program

    shape = GptShape(768, 12, 1)
    ws = random_weights(shape, 0)
    x = np.random.default_rng(1).standard_normal((5, shape.d_model)).astype(np.float32)
    outs, ns, vst = [], [], []
    for cores in (1, 4):
        cfg = soc_config("default").replace(**{"npu.cores": cores})
        cm = compile_model(cfg, shape, "ianus", 4, 5, attn_pipeline="off")
        fc1 = next(st for st in cm.stages if st.phase == "prefill" and st.name == "fc1")
        ns.append({i.f["n"] for i in decode_program(fc1.words) if i.f.get("opcode") == "COMPUTE"})
        qkv = next(st for st in cm.stages if st.phase == "prefill" and st.name == "qkv_attn")
        vst.append(sum(1 for i in decode_program(qkv.words) if i.op == SocOp.VSTORE))
        job = build_job(cm, ws, x)
        outs.append(read_outputs(cm, run_job(job).read))
    assert ns == [{32}, {64}]
    assert vst[1] < vst[0]
    np.testing.assert_array_equal(outs[0], outs[1])


def test_attention_pipeline_groups_heads_for_several_cores():
    """A prompt's attention pipeline on a multi-core NPU (``default`` with 4 cores, 12 heads) takes
    ``ATTN_GROUP`` heads per stage: one VLOAD of their scores, one SCALE, a SOFTMAX per head, one VSTORE of
    their probabilities, and matrix-unit blocks of ``ATTN_SLOTS`` scratchpad buffers; the outputs are the same
    bits as with one core (functional model), whose programs keep one head per stage."""
    from firmware.compiler import ATTN_GROUP
    from sim.perfmodel import decode_program

    assert ATTN_GROUP > 1
    shape = GptShape(768, 12, 1)
    ws = random_weights(shape, 2)
    x = np.random.default_rng(3).standard_normal((6, shape.d_model)).astype(np.float32)
    outs, counts = [], []
    for cores in (1, 4):
        cfg = soc_config("default").replace(**{"npu.cores": cores})
        cm = compile_model(cfg, shape, "ianus", 5, 6, attn_pipeline="on")
        qkv = next(st for st in cm.stages if st.phase == "prefill" and st.name == "qkv_attn")
        ins = decode_program(qkv.words)
        counts.append({op: sum(1 for i in ins if i.op == op) for op in (SocOp.VLOAD, SocOp.FENCE)}
                      | {"SOFTMAX": sum(1 for i in ins if i.op == SocOp.VECTOR and i.f["op"] == "SOFTMAX"),
                         "SCALE": sum(1 for i in ins if i.op == SocOp.VECTOR and i.f["op"] == "SCALE")})
        outs.append(read_outputs(cm, run_job(build_job(cm, ws, x)).read))
    stages = -(-shape.heads // ATTN_GROUP)
    assert counts[0]["SOFTMAX"] == counts[1]["SOFTMAX"] == shape.heads
    assert counts[0]["SCALE"] == shape.heads and counts[1]["SCALE"] == stages
    assert counts[0][SocOp.FENCE] - counts[1][SocOp.FENCE] == shape.heads - stages
    assert counts[0][SocOp.VLOAD] - counts[1][SocOp.VLOAD] == shape.heads - stages
    np.testing.assert_array_equal(outs[0].view(np.uint32), outs[1].view(np.uint32))


def test_generation_attention_slots_for_several_cores():
    """One token's attention GEMMs on a multi-core NPU use ``GEN_SLOTS`` scratchpad buffers (the heads batched
    into one GEMM each, ``head_batch='on'``, on an array 32 columns wide): the same bits as one core."""
    from firmware.compiler import GEN_SLOTS

    assert GEN_SLOTS > 2
    shape = GptShape(64, 4, 1)
    w = random_weights(shape, 3)
    x = np.random.default_rng(4).standard_normal((8, shape.d_model)).astype(np.float32)
    outs = []
    for cores in (1, 4):
        cfg = CFG.replace(name="tiny-c32", **{"npu.array_cols": 32, "npu.cores": cores})
        cm = compile_model(cfg, shape, "ianus", 5, 8, head_batch="on")
        outs.append(read_outputs(cm, run_job(build_job(cm, w, x)).read))
    np.testing.assert_array_equal(outs[0].view(np.uint32), outs[1].view(np.uint32))
