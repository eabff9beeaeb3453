"""Software side of the matrix-unit tests: memory images, tiled GEMM programs, result checks.

This is the "raw instructions -> tiled kernel" layer a later firmware will own:
:func:`gemm_program` turns ``C = A @ W`` (operands in device memory) into
LOAD / COMPUTE / STORE instructions with dependency tokens, double-buffering
weights and accumulators so that DMA overlaps compute.

Tiling (``S`` = array side):

* activations stay resident per M-tile: ``A[m0:m0+Mt, :]`` in the activation
  scratchpad (``Mt * ceil(K/S)`` words);
* weights stream in ``Kt x Nt`` tiles through two weight buffers;
* outputs accumulate in ``Mt x Nt`` tiles in two accumulator buffers and are
  stored when their last K-tile is done.

Semaphores: 0/1 weight buffer loaded, 2/3 weight buffer free, 4/5 accumulator
buffer computed, 6/7 accumulator buffer free, 8 activations free. Every token
given is taken, so the semaphores are back at zero after the program.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hw.spec.matrix_isa import Opcode, Target, encode
from sim.tb.segments import read_dump

__all__ = ["check_f64", "gpt2_case", "run_gpt2", "GPT2_GEMMS", "MemImage", "Matrix", "GemmSpec", "plan_tiles", "gemm_program", "Segment", "write_run", "read_dump",
           "extract", "utilization", "system_build", "run_segments"]

COL = 32


def _ceil(a, b):
    return -(-a // b)


@dataclass
class Matrix:
    addr: int
    rows: int
    cols: int
    stride: int            # bytes
    esize: int             # 2 (BF16) or 4 (FP32)


class MemImage:
    """Device memory contents built in Python, written for ``$readmemh``; bump allocation from ``base``."""

    def __init__(self, words: int, base: int = 0):
        self.words = words
        self.top = base
        self.chunks: list[tuple[int, np.ndarray]] = []

    def alloc(self, rows: int, cols: int, esize: int) -> Matrix:
        stride = _ceil(cols * esize, COL) * COL
        addr = self.top
        top = addr + _ceil(rows * stride, COL) * COL
        if top > self.words * COL:
            raise ValueError(f"memory image needs {top} bytes, the model holds {self.words * COL}")
        self.top = top
        return Matrix(addr, rows, cols, stride, esize)

    def put(self, bits: np.ndarray, esize: int = 2) -> Matrix:
        bits = np.asarray(bits)
        rows, cols = bits.shape
        mat = self.alloc(rows, cols, esize)
        img = np.zeros((rows, mat.stride), dtype=np.uint8)
        dtype = "<u2" if esize == 2 else "<u4"
        img[:, :cols * esize] = bits.astype(dtype).view(np.uint8).reshape(rows, cols * esize)
        self.chunks.append((mat.addr, img.reshape(-1)))
        return mat

    def hex_text(self) -> str:
        out = []
        for addr, flat in self.chunks:
            words = flat.reshape(-1, COL)[:, ::-1]        # most significant byte first
            text = words.tobytes().hex()
            out.append(f"@{addr // COL:x}")
            out.extend(text[i:i + 2 * COL] for i in range(0, len(text), 2 * COL))
        return "\n".join(out) + "\n"


def extract(words: dict, mat: Matrix) -> np.ndarray:
    """Matrix ``mat`` (bit patterns) from dumped words."""
    dtype = "<u2" if mat.esize == 2 else "<u4"
    out = np.zeros((mat.rows, mat.cols), dtype=np.uint32 if mat.esize == 4 else np.uint16)
    for r in range(mat.rows):
        start = mat.addr + r * mat.stride
        raw = b"".join(words.get(start // COL + c, bytes(COL)) for c in range(_ceil(mat.cols * mat.esize, COL)))
        out[r] = np.frombuffer(raw[:mat.cols * mat.esize], dtype=dtype)
    return out


@dataclass
class GemmSpec:
    """``C = A @ W``: A (M x K) and W (K x N) BF16 in memory; W may be stored transposed (N x K)."""
    a: Matrix
    w: Matrix
    c: Matrix
    w_transposed: bool = False
    out_bf16: bool = False

    @property
    def mkn(self):
        M, K = self.a.rows, self.a.cols
        N = self.w.rows if self.w_transposed else self.w.cols
        return M, K, N


SEM_W_LOADED, SEM_W_FREE, SEM_ACC_DONE, SEM_ACC_FREE, SEM_A_FREE = 0, 2, 4, 6, 8


def plan_tiles(M, K, N, side, act_words, wgt_words, acc_words):
    """(Mt, Kt, Nt) for :func:`gemm_program`."""
    KB = _ceil(K, side)
    Mt = min(M, act_words // KB)
    if Mt < 1:
        raise ValueError(f"K={K} does not fit the activation scratchpad even for one row")
    # Balanced M-tiles: a short last tile (M < R) would waste most of its passes.
    Mt = _ceil(M, _ceil(M, Mt))
    NB = _ceil(N, side)
    nb_align = max(1, 16 // side)               # N-tiles start on a 32-byte boundary
    NBt = min(NB, acc_words // (2 * Mt))
    NBt = NBt // nb_align * nb_align if NBt < NB else NBt
    if NBt < 1:
        raise ValueError(f"M-tile of {Mt} rows leaves no accumulator room")
    kb_align = max(1, 16 // side)               # K-tiles start on a 32-byte boundary
    KBt = min(KB, (wgt_words // 2) // (NBt * side))
    if KBt < KB:
        KBt = KBt // kb_align * kb_align
    if KBt < 1:
        raise ValueError("weight scratchpad too small for one tile")
    return Mt, KBt * side, NBt * side


def gemm_program(spec: GemmSpec, side: int, act_words: int, wgt_words: int, acc_words: int,
                 tiles=None, buffers: int = 2) -> tuple[list[int], dict]:
    """Instructions computing ``spec`` and a summary (tiles, MACs).

    ``tiles = (Mt, Kt, Nt)`` overrides :func:`plan_tiles` (``Kt`` and ``Nt``
    multiples of 16 unless they cover the whole dimension); ``buffers`` is 2
    (double-buffered weights and accumulators) or 1.
    """
    M, K, N = spec.mkn
    Mt, Kt, Nt = tiles or plan_tiles(M, K, N, side, act_words, wgt_words, acc_words)
    KB = _ceil(K, side)
    n_mt, n_kt, n_nt = _ceil(M, Mt), _ceil(K, Kt), _ceil(N, Nt)
    if buffers not in (1, 2):
        raise ValueError(f"buffers must be 1 or 2, not {buffers!r}")
    acc_half = acc_words // buffers
    wgt_half = wgt_words // buffers
    total_w = n_mt * n_nt * n_kt
    total_acc = n_mt * n_nt
    prog: list[int] = []
    wi = ai = 0
    ci = 0
    for mt in range(n_mt):
        m0, m_len = mt * Mt, min(Mt, M - mt * Mt)
        if KB * m_len > act_words:
            raise ValueError("activation tile does not fit")
        prog.append(encode(Opcode.LOAD, target=Target.ACT, wait=(1 << SEM_A_FREE) if mt else 0,
                           mem_addr=spec.a.addr + m0 * spec.a.stride, mem_stride=spec.a.stride,
                           rows=m_len, cols=K, spm_addr=0, spm_stride=m_len))
        for nt in range(n_nt):
            n0, n_len = nt * Nt, min(Nt, N - nt * Nt)
            a_buf = ai % buffers
            for kt in range(n_kt):
                k0, k_len = kt * Kt, min(Kt, K - kt * Kt)
                b = wi % buffers
                if spec.w_transposed:
                    src = spec.w.addr + n0 * spec.w.stride + k0 * 2
                    load = dict(transpose=1, rows=n_len, cols=k_len)
                else:
                    src = spec.w.addr + k0 * spec.w.stride + n0 * 2
                    load = dict(rows=k_len, cols=n_len)
                prog.append(encode(Opcode.LOAD, target=Target.WGT,
                                   wait=(1 << (SEM_W_FREE + b)) if wi >= buffers else 0,
                                   signal=1 << (SEM_W_LOADED + b),
                                   mem_addr=src, mem_stride=spec.w.stride,
                                   spm_addr=b * wgt_half, spm_stride=k_len, **load))
                wait = 1 << (SEM_W_LOADED + b)
                if kt == 0 and ai >= buffers:
                    wait |= 1 << (SEM_ACC_FREE + a_buf)
                signal = (1 << (SEM_W_FREE + b)) if wi + buffers < total_w else 0
                if kt == n_kt - 1:
                    signal |= 1 << (SEM_ACC_DONE + a_buf)
                if kt == n_kt - 1 and nt == n_nt - 1 and mt < n_mt - 1:
                    signal |= 1 << SEM_A_FREE
                prog.append(encode(Opcode.COMPUTE, wait=wait, signal=signal, accumulate=int(kt > 0),
                                   act_addr=(k0 // side) * m_len, act_stride=m_len,
                                   wgt_addr=b * wgt_half, wgt_stride=k_len,
                                   acc_addr=a_buf * acc_half, acc_stride=m_len,
                                   m=m_len, k=k_len, n=n_len))
                wi += 1
                ci += 1
            c = spec.c
            prog.append(encode(Opcode.STORE, bf16=int(spec.out_bf16), wait=1 << (SEM_ACC_DONE + a_buf),
                               signal=(1 << (SEM_ACC_FREE + a_buf)) if ai + buffers < total_acc else 0,
                               mem_addr=c.addr + m0 * c.stride + n0 * c.esize, mem_stride=c.stride,
                               rows=m_len, cols=n_len, spm_addr=a_buf * acc_half, spm_stride=m_len))
            ai += 1
    info = {"tiles": [Mt, Kt, Nt], "instructions": len(prog), "computes": ci, "macs": M * K * N,
            "mkn": [M, K, N]}
    return prog, info


@dataclass
class Segment:
    """Instructions run to completion; counters and error code are recorded after it, then cleared."""
    instructions: list[int]
    name: str = ""
    expect_error: int = 0
    info: dict = field(default_factory=dict)


def write_run(directory: Path, image: MemImage, segments: list[Segment], dump: tuple[int, int],
              backpressure: bool = False, timeout_cycles: int = 10_000_000) -> Path:
    """Files for ``sim.tb.matrix_tb.run_program``: ``mem_load.hex`` and ``program.json``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "mem_load.hex").write_text(image.hex_text())
    spec = {
        "segments": [{"name": s.name, "instructions": [f"{i:x}" for i in s.instructions]} for s in segments],
        "dump": list(dump),
        "backpressure": int(backpressure),
        "timeout_cycles": timeout_cycles,
    }
    path = directory / "program.json"
    path.write_text(json.dumps(spec))
    return path


def utilization(macs: int, side: int, cycles: int) -> float:
    return macs / (side * side * cycles) if cycles else math.nan


# -- driver: build, run, read back ---------------------------------------------------------

MEM_WORDS_LOG2 = {"tiny": 10, "default": 19, "tiny-p4": 10, "default-p4": 19}
NO_INLINE_VLT = Path(__file__).resolve().parents[2] / "hw" / "verilog" / "npu_no_inline.vlt"


def system_build(cfg, words_log2: int | None = None):
    """Cached Verilator build of :class:`hw.npu.memmodel.MatrixSystem` for ``cfg``."""
    from hw.npu.memmodel import CLOCK_VERILOG, STORAGE_VERILOG, MatrixSystem
    from hw.npu.systolic import pe_for
    from sim.build import build, verilog_for

    if words_log2 is None:
        words_log2 = MEM_WORDS_LOG2.get(cfg.name, 16)
    pe_name, pe_factory, pe_key = pe_for(cfg.npu)
    pe_verilog = verilog_for(pe_factory, name=pe_name, key="pe" + pe_key)
    sb = build(lambda: MatrixSystem(cfg, words_log2, pe_instance=True), name=f"matrix_{cfg.name}",
               key=f"{cfg!r} words_log2={words_log2} pe_instance",
               extra_sources=(STORAGE_VERILOG, CLOCK_VERILOG, pe_verilog),
               build_args=("--timing", "--timescale", "1ns/1ps", str(NO_INLINE_VLT)))
    sb.extra["words_log2"] = words_log2
    return sb


def run_segments(sb, run_dir: Path, image: MemImage, segments: list[Segment], dump: tuple[int, int],
                 backpressure: bool = False, test_name: str | None = None, timeout_cycles: int = 10_000_000):
    """Run ``segments`` on build ``sb``; returns (segment results, dumped words)."""
    write_run(run_dir, image, segments, dump, backpressure, timeout_cycles)
    results = sb.run("sim.tb.matrix_tb", "run_program", test_name=test_name, env={"RUN_DIR": str(run_dir)})
    test_dir = Path(results).parent
    res = json.loads((test_dir / "result.json").read_text())["segments"]
    words = read_dump(test_dir / "mem_dump.hex", dump[0])
    return res, words


# -- GPT-2 small prefill GEMMs ----------------------------------------------------------------

def check_f64(a, w, got_bits, rows, what=""):
    """Result against float64 within the bound stated in ``sim/golden/gemm.py``; (max abs, max rel) error."""
    from hw.spec import fp as G
    from sim.golden.gemm import error_bound, gemm_f64

    exact, abs_sum = gemm_f64(a, w)
    got = G.bits_to_f32(got_bits).astype(np.float64)
    bound = error_bound(abs_sum, a.shape[1], rows)
    err = np.abs(got - exact)
    assert np.all(err <= bound), f"{what}: max error {err.max():.3g} exceeds the bound"
    rel = err / np.maximum(abs_sum, 1e-30)
    return float(err.max()), float(rel.max())


D_MODEL, D_HEAD = 768, 64
FC_SHAPES = {"qkv": (768, 2304), "proj": (768, 768), "fc1": (768, 3072), "fc2": (3072, 768)}
GPT2_GEMMS = ("qkv", "proj", "fc1", "fc2", "qk", "sv")


def gpt2_case(img, rng, L, which):
    """(a, w, spec) for one GPT-2 small prefill GEMM with sequence length L."""
    from hw.spec import fp as G

    if which in FC_SHAPES:
        K, N = FC_SHAPES[which]
        a = G.bf16_bits(rng.standard_normal((L, K)))
        w = G.bf16_bits(rng.standard_normal((K, N)) * 0.02)
        A, W = img.put(a), img.put(w)
        return a, w, GemmSpec(A, W, img.alloc(L, N, 4))
    if which == "qk":    # Q (L x 64) @ K^T, K stored (L x 64): the DMA transposes it
        q = G.bf16_bits(rng.standard_normal((L, D_HEAD)))
        k = G.bf16_bits(rng.standard_normal((L, D_HEAD)))
        Q, Km = img.put(q), img.put(k)
        return q, np.ascontiguousarray(k.T), GemmSpec(Q, Km, img.alloc(L, L, 4), w_transposed=True)
    if which == "sv":    # softmax(S) (L x L) @ V (L x 64), result rounded to BF16
        s = G.bf16_bits(rng.random((L, L)) / L)
        v = G.bf16_bits(rng.standard_normal((L, D_HEAD)))
        S, V = img.put(s), img.put(v)
        return s, v, GemmSpec(S, V, img.alloc(L, D_HEAD, 2), out_bf16=True)
    raise ValueError(which)


def run_gpt2(L, names, run_name, cfg_name="default", test_name=None):
    """Run GPT-2 small prefill GEMMs (one segment each); returns per-GEMM dicts.

    Every result is checked bit for bit against the golden model and the
    golden model against float64 (AssertionError otherwise). ``util_compute``
    is MACs / (R C x compute-engine busy cycles); ``util_e2e`` uses all
    cycles of the segment, DMA included.
    """
    from hw.config import preset
    from hw.spec.matrix_isa import ErrorCode
    from sim.build import BUILD_ROOT
    from sim.golden.gemm import gemm, to_bf16

    cfg = preset(cfg_name)
    sb = system_build(cfg)
    rng = np.random.default_rng(L)
    n = cfg.npu
    groups = []                        # as many GEMMs per simulator run as fit the memory model
    img, cases = MemImage(1 << sb.extra["words_log2"]), []
    for name in names:
        try:
            a, w, spec = gpt2_case(img, rng, L, name)
        except ValueError:
            if not cases:
                raise
            groups.append((img, cases))
            img, cases = MemImage(1 << sb.extra["words_log2"]), []
            a, w, spec = gpt2_case(img, rng, L, name)
        prog, info = gemm_program(spec, n.array_rows, n.act_spm_words, n.wgt_spm_words, n.acc_spm_words)
        cases.append((name, a, w, spec, info, Segment(prog, name, info=info)))
    groups.append((img, cases))
    results = []
    for g, (img, cases) in enumerate(groups):
        tag = f"{run_name}_{g}" if len(groups) > 1 else run_name
        res, words = run_segments(sb, BUILD_ROOT / "runs" / tag, img, [c[-1] for c in cases],
                                  (0, img.top // 32 - 1), test_name=f"{test_name or run_name}_{g}",
                                  timeout_cycles=20_000_000)
        results += [(c[:-1], r, words) for c, r in zip(cases, res, strict=True)]
    out = []
    side = cfg.npu.array_rows
    for (name, a, w, spec, info), r, words in results:
        assert r["error_code"] == 0, f"{name}: error {ErrorCode(r['error_code']).name}"
        got = extract(words, spec.c)
        acc = gemm(a, w, side)
        want = to_bf16(acc) if spec.out_bf16 else acc
        nbad = int((got != want).sum())
        assert nbad == 0, f"L={L} {name}: {nbad} of {got.size} results differ from the golden model"
        max_abs, max_rel = check_f64(a, w, acc, side, f"L={L} {name}")
        c = r["counters"]
        out.append({
            "name": name, "L": L, "mkn": info["mkn"], "tiles": info["tiles"],
            "compute_cycles": c["compute"], "cycles": c["cycles"],
            "util_compute": utilization(info["macs"], side, c["compute"]),
            "util_e2e": utilization(info["macs"], side, c["cycles"]),
            "max_abs_err": max_abs, "max_rel_err": max_rel,
        })
    return out


