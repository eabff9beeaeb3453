"""Mutation score of the RTL's tests (issue 21): small deliberate bugs, one at a time, in a copy of the tree.

Each entry of :data:`MUTANTS` names a file, an exact snippet of it (which must
occur exactly once), its replacement and the tests that should notice. The
script exports the committed tree (``git archive HEAD``, or ``--source DIR``)
into a temporary directory, runs the union of the named tests there once
unmutated (they must pass), then per mutant: applies it, runs its tests
(``pytest -x``, with a time limit), restores the file. A mutant is *killed*
when its tests fail (or time out), *survived* when they pass. The shared
working tree is never touched.

The tests named are fast: Amaranth simulations and Python models (a mutant of a
Verilator-built unit would need a fresh build per mutant, minutes each).

    python -m sim.mutate                     # all mutants, rich table + build/mutate/report.json
    python -m sim.mutate --only arith        # mutants whose id contains "arith"
    python -m sim.mutate --list              # the mutants, nothing run
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

K = "tests/test_mutation_killers.py::"        # tests written for the first run's survivors
ARITH_T = ("tests/test_arith.py::test_arith_amaranth_sim",
           "tests/test_matrix.py::test_fp32_to_bf16_amaranth_sim",
           "tests/test_vector.py::test_fp32ext_amaranth_sim", K + "test_fp32_adder_corners_amaranth_sim")
MEMCTRL_T = ("tests/test_mutation_killers.py::test_memctrl_random_traffic_protocol_and_data_amaranth_sim",)
MU_T = (K + "test_matrix_unit_busy_covers_a_queued_instruction", K + "test_matrix_unit_semaphores_and_store_amaranth_sim")
VDMA_T = ("tests/test_vector_queue.py::test_vdma_engine_layouts",)
DMA_T = ("tests/test_dma_transpose.py",)
FABRIC_T = ("tests/test_fabric.py::test_one_requester_two_slots_amaranth_sim", K + "test_fabric_round_robin_amaranth_sim")
FP32EXT_T = ("tests/test_vector.py::test_fp32ext_amaranth_sim", "tests/test_vector.py::test_vector_unit_amaranth_sim",
             K + "test_fp32ext_multiplier_ties_amaranth_sim")


DEVICE_T = ("tests/test_pim_device.py::test_timing_rules_at_their_edges[rtl-tiny]",)   # Verilator: a build each
# tCCD and tRRD are 1 on every preset (one command per cycle always meets them): tiny with tCCD 2, tRRD 3
WIDE_T = ("tests/test_pim_device.py::test_timing_rules_at_their_edges_wide_tccd_trrd[rtl]",)


@dataclass(frozen=True)
class Mutant:
    id: str
    file: str
    original: str
    replacement: str
    tests: tuple
    what: str


def _timing(rule, name, start):
    return Mutant(f"memctrl.{rule}-1", "hw/memctrl_parts.py", f'countdown(m, {name}, t.{rule}, {start})',
                  f'countdown(m, {name}, t.{rule} - 1, {start})', MEMCTRL_T,
                  f"controller's {rule} one cycle short")


def _device(rule, file, name, start, tests=DEVICE_T):
    return Mutant(f"device.{rule}-1", file, f'countdown(m, "{name}", t.{rule}, {start})',
                  f'countdown(m, "{name}", t.{rule} - 1, {start})', tests, f"PIM device's {rule} one cycle short")


MUTANTS = (
    # ---- FP arithmetic (hw/arith.py): rounding, flushing, specials ----
    Mutant("arith.round_half_up", "hw/arith.py", "round_up = guard & (rest | lsb)", "round_up = guard",
           ARITH_T, "FP32 add: ties round up instead of to even"),
    Mutant("arith.round_truncate_ties", "hw/arith.py", "round_up = guard & (rest | lsb)", "round_up = guard & rest",
           ARITH_T, "FP32 add: ties truncated"),
    Mutant("arith.bf16_round_no_even", "hw/arith.py", "rounded = (x + 0x7FFF + x[16])[16:32]",
           "rounded = (x + 0x7FFF)[16:32]", ARITH_T, "FP32->BF16: ties round down"),
    Mutant("arith.bf16_round_half_up", "hw/arith.py", "rounded = (x + 0x7FFF + x[16])[16:32]",
           "rounded = (x + 0x8000)[16:32]", ARITH_T, "FP32->BF16: ties round up"),
    Mutant("arith.bf16_nan_to_inf", "hw/arith.py", "return Mux(nan, 0x7FC0,", "return Mux(nan, 0x7F80,",
           ARITH_T, "FP32->BF16: NaN becomes +inf"),
    Mutant("arith.mul_no_daz", "hw/arith.py", "sa, ea, fa, za, ia, na = fp_unpack(a, frac_bits)",
           "sa, ea, fa, za, ia, na = fp_unpack(a, frac_bits); za = za & (fa == 0)", ARITH_T,
           "BF16 mul: subnormal a not flushed"),
    Mutant("arith.mul_overflow_edge", "hw/arith.py", 'with m.Elif(op["inf"] | (exp >= 255)):',
           'with m.Elif(op["inf"] | (exp > 255)):', ARITH_T, "BF16 mul: exponent 255 not overflow"),
    Mutant("arith.mul_underflow_edge", "hw/arith.py", 'with m.Elif(op["zero"] | (exp <= 0)):',
           'with m.Elif(op["zero"] | (exp < 0)):', ARITH_T, "BF16 mul: exponent 0 not flushed"),
    Mutant("arith.mul_norm_exp", "hw/arith.py", "exp.eq(ea + eb - 127 + prod[15])", "exp.eq(ea + eb - 127)",
           ARITH_T, "BF16 mul: product exponent not normalised"),
    Mutant("arith.add_overflow_edge", "hw/arith.py", "rexp >= 255, rexp <= 0, frac", "rexp > 255, rexp <= 0, frac",
           ARITH_T, "FP32 add: exponent 255 not overflow"),
    Mutant("arith.add_flush_edge", "hw/arith.py", "rexp >= 255, rexp <= 0, frac", "rexp >= 255, rexp < 0, frac",
           ARITH_T, "FP32 add: exponent 0 not flushed"),
    Mutant("arith.zero_sign", "hw/arith.py", "zero_sign.eq(zx & zy & sa & sb)", "zero_sign.eq(zx & zy & (sa | sb))",
           ARITH_T, "FP32 add: (-0) + (+0) gives -0"),
    Mutant("arith.sticky_dropped", "hw/arith.py", "my_al = Cat(shifted[0] | lost, shifted[1:27])",
           "my_al = Cat(shifted[0], shifted[1:27])", ARITH_T, "FP32 add: alignment sticky bit dropped"),
    Mutant("arith.align_clamp", "hw/arith.py", "dc.eq(Mux(d > 27, 27, d))", "dc.eq(Mux(d > 26, 26, d))",
           ARITH_T, "FP32 add: alignment shift clamped one short (equivalent: a shift of 26 or 27 leaves "
                    "only the sticky bit of a 27-bit significand)"),
    Mutant("arith.carry_sticky", "hw/arith.py", "norm.eq(Cat(total[1] | total[0], total[2:28])), nexp.eq(exp + 1)",
           "norm.eq(Cat(total[1], total[2:28])), nexp.eq(exp + 1)", ARITH_T, "FP32 add: sticky lost on carry-out"),
    # ---- vector unit's FP32 extension (hw/npu/fp32ext.py) ----
    Mutant("fp32ext.mul_round", "hw/npu/fp32ext.py", 'up = st["guard"] & (st["sticky"] | sig[0])',
           'up = st["guard"]', FP32EXT_T, "FP32 mul: ties round up"),
    Mutant("fp32ext.mul_flush_edge", "hw/npu/fp32ext.py", 'with m.Elif(st["zero"] | (rexp <= 0)):',
           'with m.Elif(st["zero"] | (rexp < 0)):', FP32EXT_T, "FP32 mul: exponent 0 not flushed"),
    # ---- memory controller (hw/memctrl_parts.py, hw/memctrl_queue.py): each DRAM timing rule one cycle short,
    # FR-FCFS, latency ----
    _timing("tRCDRD", 'f"b{b}_rcdrd"', "do_act"),
    _timing("tRCDWR", 'f"b{b}_rcdwr"', "do_act"),
    _timing("tRAS", 'f"b{b}_ras"', "do_act"),
    _timing("tRP", 'f"b{b}_rp"', "do_pre"),
    _timing("tWR", 'f"b{b}_wr"', "do_wr"),
    _timing("tRTP", 'f"b{b}_rtp"', "rd_type"),
    _timing("tCCD", '"ccd"', "iss & col_cmd"),
    _timing("tRRD", '"rrd"', "iss & is_act"),
    _timing("tRFC", '"rfc"', "iss & (op == PimOp.REF)"),
    Mutant("timing.tFAW_five", "hw/pim/timing.py", "m.d.comb += ok.eq(total < 4)", "m.d.comb += ok.eq(total < 5)",
           MEMCTRL_T, "tFAW window (hw/pim/timing.py, shared by the controller and the device) allows five "
                      "activations"),
    Mutant("memctrl.frfcfs_youngest", "hw/memctrl_queue.py",
           "for i in reversed(range(D)):           # the lowest index (oldest) wins",
           "for i in range(D):           # mutant: the youngest wins",
           MEMCTRL_T + (K + "test_memctrl_fr_fcfs_oldest_first_amaranth_sim",),
           "FR-FCFS picks the youngest ready request"),
    Mutant("memctrl.read_latency", "hw/memctrl_parts.py", "n_stages = t.tRL + 1", "n_stages = t.tRL + 2", MEMCTRL_T,
           "controller samples read data one cycle late"),
    Mutant("memif.bank_bit", "hw/memif.py",
           "bank=addr[self.bank_lo:self.bank_lo + p.bank_addr_bits] if p.bank_addr_bits else Const(0, 1),",
           "bank=addr[self.bank_lo + 1:self.bank_lo + 1 + p.bank_addr_bits] if p.bank_addr_bits else Const(0, 1),",
           MEMCTRL_T, "RTL address map: bank field one bit too high"),
    # ---- PIM device (hw/pim/bank.py, channel.py): each timing rule one cycle short ----
    _device("tRCDRD", "hw/pim/bank.py", "rcdrd", "self.do_act"),
    _device("tRCDWR", "hw/pim/bank.py", "rcdwr", "self.do_act"),
    _device("tRAS", "hw/pim/bank.py", "ras", "self.do_act"),
    _device("tRP", "hw/pim/bank.py", "rp", "self.do_pre"),
    _device("tWR", "hw/pim/bank.py", "wr", "self.do_wr"),
    _device("tRTP", "hw/pim/bank.py", "rtp", "rd_type"),
    _device("tCCD", "hw/pim/channel.py", "ccd", "execute & col_cmd", WIDE_T),
    _device("tRRD", "hw/pim/channel.py", "rrd", "execute & is_act", WIDE_T),
    _device("tRFC", "hw/pim/channel.py", "rfc", "execute & (op == PimOp.REF)"),
    _device("tMAC", "hw/pim/channel.py", "mac", "execute & is_mac"),
    _device("tAF", "hw/pim/channel.py", "afl", "execute & (op == PimOp.AF)"),
    # ---- matrix unit (hw/npu/matrix_unit.py) ----
    Mutant("mu.busy_hole", "hw/npu/matrix_unit.py", "(q_store.level != 0)", "q_store.r_rdy", MU_T,
           "matrix unit: busy low while a STORE enters its queue"),
    Mutant("mu.ignore_waits", "hw/npu/matrix_unit.py",
           "valid.eq(q.r_rdy & ((nonzero | ~mask) == (1 << N_SEMAPHORES) - 1) & ~blocked)",
           "valid.eq(q.r_rdy & ~blocked)", MU_T, "matrix unit: semaphore waits ignored"),
    Mutant("mu.dropped_valid", "hw/npu/matrix_unit.py", "q.w_en.eq(d_valid & ~is_err & sel)",
           "q.w_en.eq(~is_err & sel)", MU_T, "matrix unit: queue write without the decode valid bit"),
    # ---- matrix-unit DMA (hw/npu/dma.py), vector DMA (hw/npu/vector_queue.py) ----
    Mutant("dma.row_stride", "hw/npu/dma.py", "g_row_addr.eq(g_row_addr + mem_stride)]",
           "g_row_addr.eq(g_row_addr + mem_stride + 32)]", DMA_T, "matrix DMA: row stride off by one column"),
    Mutant("vdma.column_step", "hw/npu/vector_queue.py", "self.mem.eq(self.mem + COLUMN_BYTES),",
           "self.mem.eq(self.mem + 2 * COLUMN_BYTES),", VDMA_T, "vector DMA: skips every other column"),
    Mutant("vdma.spm_step", "hw/npu/vector_queue.py", "self.spm.eq(self.spm + 1)]", "self.spm.eq(self.spm)]",
           VDMA_T, "vector DMA: scratchpad column not advanced"),
    Mutant("vdma.fifo_room", "hw/npu/vector_queue.py", "(fifo.level + p1_valid < self.FIFO_DEPTH)",
           "(fifo.level < self.FIFO_DEPTH + 1)", VDMA_T, "vector DMA: VSTORE FIFO overrun under back-pressure"),
    # ---- memory fabric (hw/fabric.py) ----
    Mutant("fabric.rr_fixed_priority", "hw/fabric.py", "pick.eq(Mux(masked.any(), masked, req)),",
           "pick.eq(req),", FABRIC_T, "fabric: round robin becomes fixed priority"),
)


def _run_tests(tree: Path, tests, timeout: int) -> tuple[str, float, str]:
    env = dict(os.environ)
    env.pop("PYTEST_ADDOPTS", None)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    t0 = time.time()
    try:
        p = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-n", "0", "-p", "no:cacheprovider",
                            *tests], cwd=tree, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return "timeout", time.time() - t0, ""
    tail = (p.stdout + p.stderr).strip().splitlines()[-1:] or [""]
    return ("passed" if p.returncode == 0 else "failed"), time.time() - t0, tail[0][:160]


def export_tree(dest: Path, source: Path | None = None):
    if source is not None:
        shutil.copytree(source, dest, ignore=shutil.ignore_patterns(".git", ".venv", "build", "__pycache__",
                                                                     "*.egg-info"), dirs_exist_ok=True)
        return
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "archive", "HEAD"], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)


def run(mutants, source=None, timeout=300, keep=False, progress=print):
    tmp = Path(tempfile.mkdtemp(prefix="ianus-mutate-"))
    tree = tmp / "tree"
    try:
        export_tree(tree, source)
        tests = sorted({t for mu in mutants for t in mu.tests})
        status, secs, tail = _run_tests(tree, tests, timeout * 3)
        progress(f"baseline: {len(tests)} test ids {status} in {secs:.0f} s ({tail})")
        if status != "passed":
            raise SystemExit(f"the tests fail without any mutant ({tail}); fix that first")
        results = []
        for mu in mutants:
            path = tree / mu.file
            text = path.read_text()
            n = text.count(mu.original)
            if n != 1:
                results.append({**asdict(mu), "status": "stale", "seconds": 0,
                                "detail": f"snippet found {n} times"})
                progress(f"{mu.id}: STALE (snippet found {n} times)")
                continue
            path.write_text(text.replace(mu.original, mu.replacement))
            try:
                st, secs, tail = _run_tests(tree, mu.tests, timeout)
            finally:
                path.write_text(text)
            verdict = "survived" if st == "passed" else "killed"
            results.append({**asdict(mu), "status": verdict, "how": st, "seconds": round(secs, 1), "detail": tail})
            progress(f"{mu.id}: {verdict} ({st}, {secs:.0f} s)")
        return results
    finally:
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)


def report(results, out: Path):
    from rich.console import Console
    from rich.table import Table

    scored = [r for r in results if r["status"] in ("killed", "survived")]
    killed = sum(r["status"] == "killed" for r in scored)
    score = killed / len(scored) if scored else 0.0
    table = Table(title=f"Mutation score: {killed}/{len(scored)} killed ({100 * score:.1f} %)")
    for col in ("mutant", "file", "what", "result", "s"):
        table.add_column(col)
    for r in results:
        style = {"killed": "green", "survived": "red"}.get(r["status"], "yellow")
        table.add_row(r["id"], r["file"], r["what"], f"[{style}]{r['status']}[/{style}]", str(r["seconds"]))
    Console(width=160).print(table)
    out.parent.mkdir(parents=True, exist_ok=True)
    summary = {"mutants": len(results), "scored": len(scored), "killed": killed, "score": round(score, 4),
               "survivors": [r["id"] for r in scored if r["status"] == "survived"],
               "stale": [r["id"] for r in results if r["status"] == "stale"], "results": results}
    out.write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: v for k, v in summary.items() if k != "results"}))
    return summary


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m sim.mutate", description=__doc__.split("\n")[0])
    ap.add_argument("--only", default=None, help="mutants whose id contains this text")
    ap.add_argument("--source", default=None, help="mutate a copy of this directory instead of git HEAD")
    ap.add_argument("--timeout", type=int, default=300, help="seconds per mutant's tests")
    ap.add_argument("--json", default=str(ROOT / "build" / "mutate" / "report.json"))
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the temporary tree")
    args = ap.parse_args(argv)
    mutants = [mu for mu in MUTANTS if args.only is None or args.only in mu.id]
    if args.list:
        for mu in mutants:
            print(f"{mu.id:28s} {mu.file:26s} {mu.what}")
        return 0
    results = run(mutants, Path(args.source) if args.source else None, args.timeout, args.keep,
                  progress=lambda s: print(s, flush=True))
    summary = report(results, Path(args.json))
    return 0 if summary["score"] >= 0.9 and not summary["stale"] else 1


if __name__ == "__main__":
    sys.exit(main())
