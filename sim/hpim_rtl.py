"""Generation cycles per token of the ``hpim`` policy against ``ianus`` on the SoC RTL (issue 20).

``python -m sim.hpim_rtl [CONFIG [PREFILL [GENERATE]]]`` (default ``default-hpim 16 2``): one GPT-2-shaped layer
(tiny's shape on ``tiny-hpim``, GPT-2 small's on ``default-hpim``) compiled under both policies, each run on the
Verilator build of the configuration (the same build), its outputs compared bit for bit with the functional model,
then the generation cycles per token (all stages) and those of the ``qkv_attn`` stage (QKV GEMVs + attention),
with the SRAM-PIM queue's busy cycles, printed one line per policy.
"""

from __future__ import annotations

import sys
import time

import numpy as np

__all__ = ["measure", "model_rows", "main"]


def measure(config: str = "default-hpim", prefill: int = 16, generate: int = 2, policy: str = "hpim") -> dict:
    from firmware.runtime import Job, read_outputs
    from sim.run import prepare
    from sim.soc_model import run_job
    from sim.tb.soc_run import run_rtl

    t = time.time()
    cm, job, x, ws = prepare(config, policy, 1, prefill, generate)
    out, res = run_rtl(job, test_name=f"hpim_rtl_{policy}_{config}")
    m = run_job(Job(job.compiled, job.image, job.programs))
    want = read_outputs(cm, m.read)
    bad = int((out.view(np.uint32) != want.view(np.uint32)).sum())
    if bad:
        raise AssertionError(f"{policy} on {config}: RTL and functional model differ at {bad} outputs")
    gen = [r for r in res if " gen@" in r["name"]]
    attn = [r for r in gen if r["name"].endswith("qkv_attn")]
    return {"config": config, "policy": policy, "prefill": prefill, "generate": generate,
            "gen_cycles_per_token": sum(r["cycles"] for r in gen) / generate,
            "qkv_attn_cycles_per_token": sum(r["cycles"] for r in attn) / generate,
            "spu_busy_per_token": sum(r["busy"].get("spu", 0) for r in attn) / generate,
            "programs": [{"name": r["name"], "cycles": r["cycles"], "t_start": r.get("t_start")} for r in res],
            "wall_s": time.time() - t}


def model_rows(r: dict) -> list[dict]:
    """The calibrated performance model (:mod:`sim.perfmodel`) against a :func:`measure` run, program by program
    (:func:`sim.calibrate.compare` on the run's own host timeline): rows with ``rtl``, ``model``, ``err``."""
    from sim.calibrate import compare

    return compare(r["config"], r["policy"], 1, r["prefill"], r["generate"], r["programs"])


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    config = argv[0] if argv else "default-hpim"
    prefill = int(argv[1]) if len(argv) > 1 else 16
    generate = int(argv[2]) if len(argv) > 2 else 2
    rows = [measure(config, prefill, generate, p) for p in ("hpim", "ianus")]
    for r in rows:
        print(f"{r['config']} {r['policy']}: prefill {r['prefill']}, {r['generate']} generated: generation "
              f"{r['gen_cycles_per_token']:,.1f} cycles/token, qkv_attn {r['qkv_attn_cycles_per_token']:,.1f} "
              f"(SRAM-PIM queue busy {r['spu_busy_per_token']:,.1f}); bit-exact with the functional model; "
              f"{r['wall_s']:.0f} s", flush=True)
    print(f"ianus / hpim generation cycles per token: {rows[1]['gen_cycles_per_token'] / rows[0]['gen_cycles_per_token']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
