"""The differential fuzzer's cases (:mod:`sim.diff_fuzz` runs and compares them): the hypothesis strategies of a
case's tasks (:func:`task_strategy`, :func:`case_strategy`, :func:`draw_specs`), and :func:`build_case`, which turns
a spec into the bytes and instruction words of one program deterministically (PIM GEMVs, matrix-unit GEMMs,
vector-queue tasks, the fences a correct program needs and random extra ones), with the host writes that give it
its data (:func:`setup_writes`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from hw.memif import AddressMap
from hw.spec import soc_isa as isa
from hw.spec.macro import Macro, MacroFlag, MacroOp
from hw.spec.macro import encode as macro_encode
from hw.spec.soc_isa import SocOp, Unit

CONFIG = "tiny"
COL = 32
PIM_WEIGHT_ROWS = 16            # rows 0..15 hold the GEMV weights of a case
VEC_OPS = ("ADD", "MUL", "SCALE", "COPY", "EXP", "RECIP", "RSQRT", "GELU", "MAX", "SUM", "LN_STATS", "LN_APPLY",
           "SOFTMAX", "KV_APPEND")


def _ceil(a, b):
    return -(-a // b)


_override = None      # a SystemConfig that replaces CONFIG for one run_batch (e.g. the refresh fault test)


def cfg():
    from sim.run import soc_config

    return _override if _override is not None else soc_config(CONFIG)


def refresh_limit_config():
    """``tiny`` with refresh at its limit: tREFI at the memory controller's minimum (the time to force a
    refresh, plus one) and one postponable REF, so REF takes about a third of the cycles and is forced
    in the middle of every kind of work."""
    from hw.memctrl import MemoryController

    c = cfg()
    t = c.timing
    need = max(t.tRAS, t.tWR, t.tRTP) + t.tRP + t.tRFC + 8
    out = c.replace(**{"timing.tREFI": need + 1, "timing.refresh_postpone": 1})
    MemoryController(out)            # raises if the controller refuses it
    return out


# -- hypothesis strategies ---------------------------------------------------------------------------
def task_strategy(units=("pim", "mu", "vq")):
    from hypothesis import strategies as st

    pim = st.fixed_dictionaries({
        "unit": st.just("pim"),
        "K": st.integers(1, 256), "N": st.integers(1, 48),
        "bias": st.booleans(), "gelu": st.booleans(), "bf16": st.booleans(),
        "extra_in": st.sampled_from([0, 0, 0, 1, 16, 31]),        # WRITE_VEC of more values than K
        "read_n": st.one_of(st.none(), st.integers(1, 48)),       # READ_RES of the first n results
        "nop": st.booleans(),                                      # a PIM NOP before the macros
        "chain": st.booleans(), "data": st.integers(0, 2**32 - 1)})
    mu = st.fixed_dictionaries({
        "unit": st.just("mu"),
        "M": st.integers(1, 12), "K": st.integers(1, 64), "N": st.integers(1, 40),
        "bf16": st.booleans(), "buffers": st.sampled_from([1, 2]),
        "chain": st.booleans(), "data": st.integers(0, 2**32 - 1)})
    vop = st.fixed_dictionaries({
        "op": st.sampled_from(VEC_OPS), "n": st.integers(1, 64), "rows": st.integers(1, 4),
        "a_fmt": st.integers(0, 1), "b_fmt": st.integers(0, 1), "d_fmt": st.integers(0, 1),
        "b_mode": st.integers(0, 3), "mask": st.integers(0, 2), "pos": st.integers(0, 8)})
    vq = st.fixed_dictionaries({
        "unit": st.just("vq"),
        "rows": st.integers(1, 4), "cols": st.integers(1, 8), "gap": st.integers(0, 3),
        "spm": st.integers(0, 60), "ops": st.lists(vop, min_size=1, max_size=3),
        "chain": st.booleans(), "data": st.integers(0, 2**32 - 1)})
    return st.one_of(*[{"pim": pim, "mu": mu, "vq": vq}[u] for u in units])


def case_strategy(max_tasks: int = 5, units=("pim", "mu", "vq")):
    from hypothesis import strategies as st

    return st.fixed_dictionaries({
        "tasks": st.lists(task_strategy(units), min_size=1, max_size=max_tasks),
        # random extra fences: probability (percent) per gap between instructions, and their masks
        "fence_pct": st.sampled_from([0, 0, 5, 20, 50]),
        "fence_seed": st.integers(0, 2**32 - 1),
        "reads": st.integers(0, 3),          # host AXI reads issued while the program runs
    })


def draw_specs(seed: int, n: int, max_tasks: int = 5, units=("pim", "mu", "vq")) -> list[dict]:
    """``n`` case specs drawn by hypothesis, reproducibly from ``seed`` (generate phase only, no database)."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hseed

    # Import what building a case imports first: hypothesis' draws changed after these imports (seen as
    # a different case 4 of seed 7 in one process), so a seed must see the same module state everywhere.
    import firmware.pim  # noqa: F401
    import hw.npu.vector  # noqa: F401
    import sim.golden.vector  # noqa: F401
    import sim.soc_model  # noqa: F401
    import sim.tb.matrix_kernels  # noqa: F401

    cfg()
    out: list[dict] = []

    @hseed(seed)
    @settings(max_examples=n, database=None, phases=[Phase.generate], deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(case_strategy(max_tasks, tuple(units)))
    def collect(spec):
        if len(out) < n:
            out.append(spec)

    collect()
    while len(out) < n:                  # hypothesis stops early when it has exhausted its budget
        out.append(out[len(out) % max(1, len(out))])
    return out


# -- building a case ---------------------------------------------------------------------------------
@dataclass
class Region:
    addr: int
    n: int

    def overlaps(self, other: Region) -> bool:
        return self.addr < other.addr + other.n and other.addr < self.addr + self.n


@dataclass
class Case:
    name: str
    writes: list = field(default_factory=list)          # (addr, bytes) host writes before the program
    prog_addr: int = 0
    program: list = field(default_factory=list)         # 256-bit instruction words
    outputs: list = field(default_factory=list)         # (name, addr, n) read back and compared
    reads: list = field(default_factory=list)           # (addr, n) host reads while the program runs
    abort: int | None = None                            # fault injection: CLEAR this many cycles after START
    bad: list = field(default_factory=list)             # fault injection: ("read" | "write", addr, n) host
                                                        # bursts while the program runs that must answer
                                                        # SLVERR and touch nothing
    units: dict = field(default_factory=dict)           # instructions per kind (statistics)


class _Layout:
    """Memory of a case: weight rows at the bottom, a bump allocator for data, the program near the top."""

    def __init__(self, c):
        p = c.pim
        self.row_bytes = p.channels * p.banks * p.row_bytes
        self.w_row = 0
        self.top = PIM_WEIGHT_ROWS * self.row_bytes
        self.prog_addr = (p.data_rows - 2) * self.row_bytes
        self.limit = self.prog_addr

    def alloc(self, n: int, align: int = COL) -> Region:
        a = _ceil(self.top, align) * align
        size = _ceil(max(n, 1), COL) * COL
        if a + size > self.limit:
            raise MemoryError("case does not fit")
        self.top = a + size
        return Region(a, size)

    def weight_rows(self, rows: int) -> int | None:
        if self.w_row + rows > PIM_WEIGHT_ROWS:
            return None
        r = self.w_row
        self.w_row += rows
        return r


def _bf16(rng, shape, scale=1.0):
    from hw.spec import fp as G

    return G.bf16_bits(rng.standard_normal(shape) * scale).astype("<u2")


def build_case(spec: dict, name: str = "case") -> Case:
    """Bytes and instruction words of a case spec (deterministic)."""
    from firmware.pim import GemvLayout
    from hw.spec.vector_isa import encode as vec_encode
    from sim.golden.vector import VectorModel
    from sim.tb.matrix_kernels import GemmSpec, Matrix, gemm_program, plan_tiles

    c = cfg()
    lay = _Layout(c)
    case = Case(name=name, prog_addr=lay.prog_addr)
    frng = np.random.default_rng(spec["fence_seed"])
    pending = {u: {"r": [], "w": []} for u in (Unit.MU, Unit.VQ, Unit.PCU)}
    outputs: list[Region] = []          # outputs of earlier tasks (chain sources)
    prog = case.program

    def extra_fence():
        if spec["fence_pct"] and frng.integers(100) < spec["fence_pct"]:
            mask = int(frng.integers(0, 8))
            prog.append(isa.encode(SocOp.FENCE, units=mask))
            for u in Unit:
                if mask & u:
                    pending[u] = {"r": [], "w": []}

    def emit(words):
        for w in words:
            extra_fence()
            prog.append(w)

    def fence_for(unit, reads, writes):
        """The FENCE a correct program needs before ``unit`` reads ``reads`` and writes ``writes``."""
        need = 0
        for u, pend in pending.items():
            if u == unit and unit != Unit.MU:
                continue                 # the vector queue and the PCU run their instructions in order
            if u == unit == Unit.MU:
                if pend["r"] or pend["w"]:
                    need |= u            # a GEMM's first LOADs do not wait for the previous GEMM
                continue
            if any(w.overlaps(x) for w in pend["w"] for x in reads + writes) or \
                    any(r.overlaps(x) for r in pend["r"] for x in writes):
                need |= u
        if need:
            prog.append(isa.encode(SocOp.FENCE, units=need))
            for u in Unit:
                if need & u:
                    pending[u] = {"r": [], "w": []}

    def issue(unit, reads, writes, words):
        """Place the needed FENCE, then the task's instructions (random fences between them), then count
        the task's accesses as pending (a random fence among its own instructions does not cover it)."""
        fence_for(unit, reads, writes)
        emit(words)
        pending[unit]["r"] += reads
        pending[unit]["w"] += writes

    def source(task, nbytes, rng, fresh):
        """A region of ``nbytes`` input: an earlier output (``chain``) or fresh host-written data."""
        if task["chain"]:
            fit = [o for o in outputs if o.n >= nbytes]
            if fit:
                return fit[int(rng.integers(len(fit)))]
        r = lay.alloc(nbytes)
        data = fresh()
        case.writes.append((r.addr, data + bytes(r.n - len(data))))
        return r

    for ti, t in enumerate(spec["tasks"]):
        rng = np.random.default_rng(t["data"])
        if t["unit"] == "pim":
            K, N = t["K"], t["N"]
            gl = GemvLayout(c, K, N, base_row=0)
            base = lay.weight_rows(gl.rows_used)
            if base is None:
                continue
            gl = GemvLayout(c, K, N, base_row=base)
            packed = gl.pack(_bf16(rng, (K, N), 1 / np.sqrt(K)))
            case.writes.append((base * lay.row_bytes,
                                AddressMap(c.pim).pack_rows(packed.transpose(2, 0, 1, 3, 4)).tobytes()))
            n_in = K + t["extra_in"]
            # An earlier output chained in as x leaves whatever follows it in memory in the lanes past K of
            # the last column (the PCU sends them as zero).
            x = source(t, 2 * n_in, rng, lambda n_in=n_in: _bf16(rng, n_in).tobytes())  # noqa: B023 (called at once)
            reads = [x]
            bias = None
            if t["bias"]:
                bias = source({"chain": False}, 4 * N, rng,
                              lambda: (rng.standard_normal(N) * 0.5).astype("<f4").tobytes())  # noqa: B023 (called at once)
                reads.append(bias)
            read_n = min(t["read_n"] or N, N)
            out = lay.alloc(read_n * (2 if t["bf16"] else 4))
            macros = [Macro(MacroOp.NOP)] if t["nop"] else []
            flags = (MacroFlag.BIAS if t["bias"] else 0) | (MacroFlag.GELU if t["gelu"] else 0)
            macros += [Macro(MacroOp.WRITE_VEC, n=n_in, addr0=x.addr),
                       Macro(MacroOp.GEMV, flags=flags, n=K, m=N, row=base, addr0=bias.addr if bias else 0),
                       Macro(MacroOp.READ_RES, flags=MacroFlag.BF16 if t["bf16"] else 0, n=read_n, addr0=out.addr)]
            issue(Unit.PCU, reads, [out], [isa.encode(SocOp.PIM, word=sum(w << (32 * i) for i, w in
                                                                          enumerate(macro_encode(m))))
                                            for m in macros])
            nbytes = read_n * (2 if t["bf16"] else 4)
            case.outputs.append((f"t{ti} pim {K}x{N} y", out.addr, out.n))
            if nbytes == out.n:
                outputs.append(out)      # only outputs without an undefined tail feed later tasks
        elif t["unit"] == "mu":
            n = c.npu
            M, K, N = t["M"], t["K"], t["N"]
            try:
                plan_tiles(M, K, N, n.array_rows, n.act_spm_words, n.wgt_spm_words, n.acc_spm_words)
            except ValueError:
                continue
            sa, sw = _ceil(K * 2, COL) * COL, _ceil(N * 2, COL) * COL

            def mat(rows, cols, stride, rng=rng):
                img = np.zeros((rows, stride), np.uint8)
                img[:, :cols * 2] = _bf16(rng, (rows, cols)).view(np.uint8).reshape(rows, -1)
                return img.tobytes()

            A = source(t, M * sa, rng, lambda: mat(M, K, sa))  # noqa: B023 (called at once)
            W = source({"chain": False}, K * sw, rng, lambda: mat(K, N, sw))  # noqa: B023 (called at once)
            es = 2 if t["bf16"] else 4
            sc = _ceil(N * es, COL) * COL
            C = lay.alloc(M * sc)
            words, _ = gemm_program(GemmSpec(Matrix(A.addr, M, K, sa, 2), Matrix(W.addr, K, N, sw, 2),
                                             Matrix(C.addr, M, N, sc, es), out_bf16=t["bf16"]),
                                    n.array_rows, n.act_spm_words, n.wgt_spm_words, n.acc_spm_words,
                                    buffers=t["buffers"])
            issue(Unit.MU, [A, W], [C], [isa.encode(SocOp.MATRIX, word=w) for w in words])
            case.outputs.append((f"t{ti} mu {M}x{K}x{N} C", C.addr, C.n))
            if N * es == sc:
                outputs.append(C)
        else:
            vm = VectorModel(c.npu.vector_lanes, c.npu.vector_spm_words, acc_stages=c.npu.vec_acc_stages)
            L = vm.L
            rows, cols = t["rows"], t["cols"]
            stride = COL * (cols + t["gap"])
            src = source(t, rows * stride, rng, lambda: _bf16(rng, rows * stride // 2).tobytes())  # noqa: B023 (called at once)
            load = dict(mem_addr=src.addr, mem_stride=stride, rows=rows, cols=cols, spm_addr=t["spm"],
                        spm_pitch=cols + t["gap"] % 2)
            words = [isa.encode(SocOp.VLOAD, **load)]
            last_d = None
            for op in t["ops"]:
                f = _vector_fields(vm, op, rng)
                if f is None:
                    continue
                assert vm.check(f) == 0, (op, f)
                words.append(isa.encode(SocOp.VECTOR, word=vec_encode(**f)))
                last_d = f
            # VSTORE the last result's scratchpad words (or the loaded tile when no op was valid)
            if last_d is not None:
                lo_w, hi_w = _dest_words(vm, last_d)
                lo_c, hi_c = (lo_w * 4 * L) // COL, _ceil(hi_w * 4 * L, COL)
            else:
                lo_c, hi_c = t["spm"], t["spm"] + (rows - 1) * load["spm_pitch"] + cols
            ncol = hi_c - lo_c
            srows = 1 if ncol <= 8 else _ceil(ncol, 8)
            scols = ncol if srows == 1 else 8
            lo_c = min(lo_c, vm.depth * 4 * L // COL - srows * scols)
            out = lay.alloc(srows * scols * COL)
            words.append(isa.encode(SocOp.VSTORE, mem_addr=out.addr, mem_stride=scols * COL, rows=srows,
                                    cols=scols, spm_addr=lo_c, spm_pitch=scols))
            issue(Unit.VQ, [src], [out], words)
            case.outputs.append((f"t{ti} vq {'+'.join(o['op'] for o in t['ops'])}", out.addr, out.n))
            outputs.append(out)
    emit([isa.encode(SocOp.END)])
    assert lay.prog_addr + 32 * len(prog) <= (c.pim.data_rows) * lay.row_bytes
    # Host reads while the program runs: regions this program does not write (weights, inputs, program).
    written = [Region(a, n) for _, a, n in case.outputs]
    cands = [Region(a, len(d)) for a, d in case.writes] + [Region(lay.prog_addr, 32 * len(prog))]
    cands = [r for r in cands if not any(r.overlaps(w) for w in written)]
    for _ in range(spec["reads"]):
        if cands:
            r = cands[int(frng.integers(len(cands)))]
            n = min(r.n, 32 * int(frng.integers(1, 17)))
            case.reads.append((r.addr, n))
    for w in prog:
        op = SocOp(w & 0xF).name
        case.units[op] = case.units.get(op, 0) + 1
    return case


def _vector_fields(vm, op: dict, rng) -> dict | None:
    """A valid vector instruction for ``op`` (placed in the scratchpad's low half for its inputs and the
    upper half for its outputs), or None when the combination is not valid."""
    from hw.spec import fp as G

    L, depth = vm.L, vm.depth
    name, n, rows = op["op"], op["n"], op["rows"]
    from sim.golden.vector import OPS

    f = {"op": OPS[name], "n": n, "rows": rows, "a_fmt": op["a_fmt"], "d_fmt": op["d_fmt"], "mask": 0}
    if name == "LN_STATS":
        f["d_fmt"] = 0
        f["imm0"] = int(G.f32_bits(np.float32(1.0 / n)))
        f["imm1"] = int(G.f32_bits(np.float32(1e-5)))
    elif name == "SCALE":
        f["imm0"] = int(G.f32_bits(np.float32(rng.standard_normal())))
        f["imm1"] = int(G.f32_bits(np.float32(rng.standard_normal())))
    elif name in ("ADD", "MUL"):
        f["b_fmt"], f["b_mode"] = op["b_fmt"], op["b_mode"]
        if f["b_mode"] == 3:
            f["imm0"] = int(G.f32_bits(np.float32(rng.standard_normal())))
    elif name == "SOFTMAX":
        f["mask"] = op["mask"]
        f["pos"] = op["pos"]
    elif name == "KV_APPEND":
        f["pos"] = op["pos"]
        f["imm0"] = op["pos"] + rows + int(rng.integers(0, 3))
    half = depth // 2
    span = lambda k: max(0, half - k)   # noqa: E731
    f["a"] = int(rng.integers(0, span(rows * vm.pitch(n, f["a_fmt"])) + 1))
    f["b"] = int(rng.integers(0, span(rows * vm.pitch(n, f.get("b_fmt", 0))) + 1))
    f["aux"] = int(rng.integers(0, span(2 * rows) + 1))
    if name == "LN_APPLY":
        f["b"] = int(rng.integers(0, span(_ceil(n, L)) + 1))
    if name == "KV_APPEND":
        need = f["imm0"] * vm.pitch(n, f["d_fmt"])
    else:
        need = rows * vm.pitch(n, f["d_fmt"]) + 2 * rows
    f["d"] = half + int(rng.integers(0, span(need) + 1))
    if vm.check(f) != 0:
        return None
    return f


def _dest_words(vm, f) -> tuple[int, int]:
    """Scratchpad words [lo, hi) a vector instruction writes."""
    from sim.golden.vector import OPNAME

    name, n, rows = OPNAME[f["op"]], f["n"], f["rows"]
    if name in ("MAX", "SUM"):
        return f["d"], f["d"] + _ceil(rows, vm.slots(f["d_fmt"]))
    if name == "LN_STATS":
        return f["d"], f["d"] + _ceil(2 * rows, vm.L)
    if name == "KV_APPEND":
        p = vm.pitch(n, f["d_fmt"])
        return f["d"] + f["pos"] * p, f["d"] + (f["pos"] + rows) * p
    return f["d"], f["d"] + rows * vm.pitch(n, f["d_fmt"])


# -- the functional model side --------------------------------------------------------------------
def setup_writes(c) -> list:
    """Host writes before the first case: the GELU table in the reserved row."""
    from firmware.pim import af_lut_row

    p = c.pim
    row_bytes = p.channels * p.banks * p.row_bytes
    lut = np.broadcast_to(af_lut_row(c), (1, p.channels, p.banks, p.columns, p.lanes))
    return [(p.data_rows * row_bytes, AddressMap(p).pack_rows(lut).astype("<u2").tobytes())]
