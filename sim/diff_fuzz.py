"""Differential fuzzing: random valid SoC work on the RTL (tiny) against the functional model, bit for bit.

A *case* is one program for the command processor plus the host writes that
give it its data:

* **PIM GEMV tasks** (``WRITE_VEC`` / ``GEMV`` with random bias and GELU flags
  / ``READ_RES`` as FP32 or BF16): random ``K x N`` within the tiny device's
  limits, random weights packed by :class:`firmware.pim.GemvLayout` at a random
  weight row, random input vector and bias;
* **matrix-unit GEMMs** (:func:`sim.tb.matrix_kernels.gemm_program`: LOAD /
  COMPUTE / STORE with the matrix unit's counting semaphores, single or double
  buffered): random ``M x K x N``, FP32 or BF16 output;
* **vector-queue tasks**: a random 2-D ``VLOAD``, one to three random vector
  instructions (every opcode of :data:`hw.npu.vector.ISA_TABLE`, random
  formats, broadcast and mask modes, placed anywhere valid in the scratchpad)
  and a ``VSTORE`` of a result.

A task's main input is fresh random data or the output of an earlier task of
the same program (so the fences matter). The generator tracks which memory
each unit may still be reading or writing and places the ``FENCE`` a correct
program needs before a task that touches it; on top of that it places random
extra fences (random unit masks, ``FENCE 0`` included) between any two
instructions. Between cases the memory, the scratchpads and the PCU's buffers
are not reset, on either side.

The case parameters come from hypothesis strategies (:func:`task_strategy`,
:func:`case_strategy`); :func:`draw_specs` draws ``n`` of them reproducibly
from one integer seed (hypothesis' ``@seed``, generate phase only), and
:func:`build_case` turns a spec into bytes and instruction words
deterministically, so ``(seed, index)`` names a case for good. The RTL side
is :mod:`sim.tb.diff_fuzz_tb` (one simulation runs a whole batch; the Python
protocol checker watches every DRAM bus cycle); :func:`run_batch` runs a batch
on both sides and returns the mismatches.

Reproduce a failure (the test prints this)::

    python -m sim.diff_fuzz --seed S --cases N [--only I]
"""

from __future__ import annotations

import argparse
import pickle
import sys
import time
from dataclasses import dataclass

import numpy as np

from hw.spec import soc_isa as isa
from hw.spec.soc_isa import SocOp, Unit
from sim import diff_fuzz_cases as cases_mod
from sim.diff_fuzz_cases import (
    COL,
    CONFIG,
    Case,
    build_case,
    case_strategy,
    cfg,
    draw_specs,
    refresh_limit_config,
    setup_writes,
    task_strategy,
)

__all__ = ["Case", "task_strategy", "case_strategy", "draw_specs", "build_case", "model_batch", "run_batch",
           "Mismatch", "CONFIG", "refresh_limit_config"]
"""The cases themselves (strategies, :func:`build_case`) are :mod:`sim.diff_fuzz_cases`; re-exported here."""


@dataclass
class Mismatch:
    case: str
    what: str
    detail: str

    def __str__(self):
        return f"{self.case}: {self.what}: {self.detail}"


def scrub_program() -> tuple[int, int, list]:
    """(zero region address, its bytes, program) run after a CLEARed case on the RTL and the model: VLOADs
    of zeros over the whole vector-queue scratchpad. The CLEARed program may have left anything there,
    and a later case may store scratchpad words it did not write (the rest of a row, say)."""
    from hw.npu.vector_queue import VectorQueue

    c = cfg()
    p = c.pim
    cols = VectorQueue(c).spm_columns
    zcols = 32
    zaddr = (p.data_rows - 1) * p.channels * p.banks * p.row_bytes + 1024    # beside the warm-up write
    words = [isa.encode(SocOp.VLOAD, mem_addr=zaddr, mem_stride=0, rows=cols // zcols, cols=zcols, spm_addr=0,
                        spm_pitch=zcols),
             isa.encode(SocOp.FENCE, units=Unit.VQ), isa.encode(SocOp.END)]
    return zaddr, zcols * COL, words


def model_batch(cases: list[Case]) -> list[dict]:
    """Run the cases in order on one :class:`sim.soc_model.SocModel`; per case its error and output bytes."""
    from sim.soc_model import SocModel

    c = cfg()
    m = SocModel(c)
    for a, d in setup_writes(c):
        m.write(a, d)
    res = []
    for case in cases:
        for a, d in case.writes:
            m.write(a, d)
        m.write(case.prog_addr, isa.to_bytes(case.program))
        reads = [m.read(a, n) for a, n in case.reads]          # unchanged by the program
        if case.abort is not None:       # CLEARed on the RTL: not run here; the host zeroes its outputs
            res.append({"error": 0, "error_pc": 0, "reads": reads, "outputs": [], "aborted": True})
            for _, a, n in case.outputs:
                m.write(a, bytes(n))
            za, zn, words = scrub_program()
            m.write(za, bytes(zn))
            m.write(case.prog_addr, isa.to_bytes(words))
            r = m.run(case.prog_addr, len(words))
            assert r.error == 0, f"the scrub program failed on the model: {r.error:#x}"
            continue
        r = m.run(case.prog_addr, len(case.program))
        res.append({"error": r.error, "error_pc": r.error_pc, "reads": reads,
                    "outputs": [m.read(a, n) for _, a, n in case.outputs]})
    res.append({"final": m.read(0, (c.pim.data_rows - 2) * c.pim.channels * c.pim.banks * c.pim.row_bytes)})
    return res


def _diff(got: bytes, want: bytes) -> str:
    g, w = np.frombuffer(got, np.uint8), np.frombuffer(want, np.uint8)
    if g.size != w.size:
        return f"{g.size} bytes vs {w.size}"
    bad = np.flatnonzero(g != w)
    return f"{bad.size} bytes differ, first at byte offsets {bad[:6].tolist()}: RTL {g[bad[:6]].tolist()} " \
           f"model {w[bad[:6]].tolist()}"


def compare(cases: list[Case], rtl: list[dict], model: list[dict]) -> list[Mismatch]:
    """Mismatches between the RTL's and the model's results, every byte of device memory included."""
    out = []
    for i, case in enumerate(cases):
        if i >= len(rtl) or "final" in rtl[i]:
            out.append(Mismatch(case.name, "not run", "the simulation stopped before this case"))
            break
        r, m = rtl[i], model[i]
        if m.get("aborted"):
            if r.get("stuck"):
                out.append(Mismatch(case.name, "CLEAR", f"after CLEAR {case.abort} cycles into the program the "
                                                        f"SoC did not become idle: {r['stuck']}"))
                break
            continue
        if m["error"]:
            out.append(Mismatch(case.name, "generator", f"the model stopped with error {m['error']:#x} at "
                                                        f"{m['error_pc']} (an invalid case)"))
        if r.get("timeout"):
            out.append(Mismatch(case.name, "timeout", f"no done within {r['timeout']} cycles"))
            break
        if (r["error"], r["error_pc"]) != (m["error"], m["error_pc"]):
            out.append(Mismatch(case.name, "error", f"RTL ERROR {r['error']:#x} at {r['error_pc']}, model "
                                                    f"{m['error']:#x} at {m['error_pc']}"))
        for (name, _, _), g, w in zip(case.outputs, r["outputs"], m["outputs"], strict=True):
            if g != w:
                out.append(Mismatch(case.name, name, _diff(g, w)))
        for (op, a, n), resp in zip(case.bad, r.get("bad", []), strict=True):
            if resp != 2:
                out.append(Mismatch(case.name, "AXI error", f"host {op} of {n} bytes at {a:#x} during the program "
                                                            f"answered {resp}, not SLVERR (2)"))
        for (a, n), g, w in zip(case.reads, r["reads"], m["reads"], strict=True):
            if g != w:
                out.append(Mismatch(case.name, f"host read {a:#x}+{n} during the program", _diff(g, w)))
        if r.get("checker"):
            out.append(Mismatch(case.name, "DRAM protocol", r["checker"]))
    if rtl and not rtl[-1].get("first_write_landed", True):
        out.append(Mismatch("batch", "first AXI write", "the first write after power-up (one beat) did not "
                                                         "reach memory"))
    if not out and "final" in rtl[-1]:
        got, want = bytearray(rtl[-1]["final"]), bytearray(model[-1]["final"])
        if got != want:
            out.append(Mismatch("batch", "device memory after the last case", _diff(bytes(got), bytes(want))))
    return out


# -- the whole batch -----------------------------------------------------------------------------------
def bad_bursts(rng, case: Case) -> list:
    """Host bursts that must answer SLVERR and write nothing: across the end of device memory, wholly
    outside it, misaligned inside the case's first output (or its program) region."""
    p = cfg().pim
    end = p.total_bytes
    inside = case.outputs[0][1] if case.outputs else case.prog_addr
    ops = [("write", end - 32, 64), ("read", end - 32, 64), ("write", end, 32), ("read", end + 4096, 32),
           ("write", inside + 8, 32), ("read", inside + 16, 32)]
    pick = rng.choice(len(ops), size=int(rng.integers(1, 4)), replace=False)
    return [ops[k] for k in sorted(pick)]


def batch(seed: int, n: int, only: int | None = None, max_tasks: int = 5, units=("pim", "mu", "vq"),
          abort_every: int = 0, axi_errors: bool = False) -> list[Case]:
    """Cases ``0..n-1`` of ``seed``. ``abort_every = k``: every k-th case (from case 1) is CLEARed a random
    number of cycles after its START (fault injection; the later cases must still be bit-exact).
    ``axi_errors``: every case also issues 1-3 :func:`bad_bursts` while its program runs."""
    specs = draw_specs(seed, n, max_tasks, units)
    idx = range(n) if only is None else [only]
    out = []
    for i in idx:
        c = build_case(specs[i], name=f"seed {seed} case {i}")
        if abort_every and i % abort_every == 1:
            c.abort = int(np.random.default_rng([seed, i]).integers(1, 400))
        if axi_errors:
            c.bad = bad_bursts(np.random.default_rng([seed, i, 21]), c)
        out.append(c)
    return out


def run_batch(seed: int, n: int, only: int | None = None, test_name: str | None = None, max_tasks: int = 5,
              pause_pct: int = 0, units=("pim", "mu", "vq"), abort_every: int = 0, axi_errors: bool = False,
              config=None):
    """Run a batch on the RTL (one simulation) and on the model; (cases, mismatches, stats). ``config``: a
    SystemConfig instead of :data:`CONFIG` (its own SoC build)."""
    if config is not None:
        cases_mod._override = config          # read by sim.diff_fuzz_cases.cfg for this run
        try:
            return run_batch(seed, n, only, test_name, max_tasks, pause_pct, units, abort_every, axi_errors)
        finally:
            cases_mod._override = None
    t0 = time.time()
    cases = batch(seed, n, only, max_tasks, units, abort_every, axi_errors)
    t_gen = time.time() - t0
    model = model_batch(cases)
    t_model = time.time() - t0 - t_gen
    rtl = run_rtl_cases(cases, test_name=test_name or f"diff_fuzz_{seed}", pause_pct=pause_pct, seed=seed)
    mism = compare(cases, rtl, model)
    stats = {"cases": len(cases), "instructions": sum(len(c.program) for c in cases),
             "host_writes": sum(len(c.writes) for c in cases), "host_reads": sum(len(c.reads) for c in cases),
             "units": {}, "gen_s": round(t_gen, 1), "model_s": round(t_model, 1),
             "rtl_s": round(time.time() - t0 - t_gen - t_model, 1),
             "rtl_cycles": sum(r.get("cycles", 0) for r in rtl if "final" not in r),
             }
    for c in cases:
        for k, v in c.units.items():
            stats["units"][k] = stats["units"].get(k, 0) + v
    return cases, mism, stats


def run_rtl_cases(cases: list[Case], test_name: str, pause_pct: int = 0, seed: int = 0) -> list[dict]:
    """Run ``cases`` back to back in one simulation of the tiny SoC (:mod:`sim.tb.diff_fuzz_tb`)."""
    from sim.build import BUILD_ROOT, CocotbFailure
    from sim.tb.soc_run import soc_sim_build

    c = cfg()
    sb = soc_sim_build(c)
    run_dir = BUILD_ROOT / "runs" / test_name
    run_dir.mkdir(parents=True, exist_ok=True)
    warm = (c.pim.data_rows - 1) * c.pim.channels * c.pim.banks * c.pim.row_bytes
    # The first AXI write after power-up, one beat, read back (it was once lost: see SocSim).
    job = {"config": CONFIG if cases_mod._override is None else c, "setup": setup_writes(c), "warmup": (warm, bytes(range(1, 33))), "pause_pct": pause_pct,
           "seed": seed,
           "final": (0, (c.pim.data_rows - 2) * c.pim.channels * c.pim.banks * c.pim.row_bytes),
           "scrub": scrub_program(),
           "cases": [{"writes": cs.writes, "prog_addr": cs.prog_addr, "program": cs.program,
                      "outputs": [(a, n) for _, a, n in cs.outputs], "reads": cs.reads, "abort": cs.abort,
                      "bad": cs.bad}
                     for cs in cases]}
    (run_dir / "job.pkl").write_bytes(pickle.dumps(job))
    out = run_dir / "result.pkl"
    if out.exists():
        out.unlink()
    try:
        sb.run("sim.tb.diff_fuzz_tb", "run_cases", test_name=test_name, env={"RUN_DIR": str(run_dir)})
    except CocotbFailure as exc:
        if not out.exists():
            raise
        print(f"(the testbench failed: {exc})", file=sys.stderr)
    return pickle.loads(out.read_bytes())


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m sim.diff_fuzz", description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--cases", type=int, default=50, help="cases per simulation (batch)")
    ap.add_argument("--batches", type=int, default=1, help="batches, seeds seed..seed+batches-1")
    ap.add_argument("--only", type=int, default=None, help="run only case I of the batch")
    ap.add_argument("--pause-pct", type=int, default=0, help="AXI back-pressure: pause percentage")
    ap.add_argument("--show", action="store_true", help="print the case(s) as disassembly and exit")
    args = ap.parse_args(argv)
    if args.show:
        from firmware.asm import disassemble

        for cs in batch(args.seed, args.cases, args.only):
            print(f"# {cs.name}: {len(cs.writes)} host writes, outputs {cs.outputs}")
            print(disassemble(cs.program))
        return 0
    total = bad = 0
    for b in range(args.batches):
        s = args.seed + b
        cases, mism, stats = run_batch(s, args.cases, args.only, pause_pct=args.pause_pct)
        total += len(cases)
        bad += len(mism)
        print(f"seed {s}: {len(cases)} cases, {len(mism)} mismatches; {stats}", flush=True)
        for m in mism:
            print(f"  MISMATCH {m}  (reproduce: python -m sim.diff_fuzz --seed {s} --cases {args.cases}"
                  f"{'' if args.only is not None else ''})", flush=True)
    print(f"total: {total} cases, {bad} mismatches")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
