"""``ianus generate``: text from the trained model, decoder layers on the SoC.

The embedding (``wte[token] + wpe[position]``), the final layernorm and the LM
head run on the host in numpy (:class:`sim.lm.model.HostModel`); the decoder
layers run as the compiled stage programs (:func:`firmware.compiler.compile_model`,
:func:`firmware.runtime.build_job`) on

* ``--backend model``: the SoC's functional model (:class:`sim.soc_model.SocModel`,
  BF16 numerics, bit-exact with the RTL), in this process;
* ``--backend verilator``: the SoC RTL, through the same build and device-memory
  back door as ``ianus run`` (:mod:`sim.tb.soc_run`); the host loop runs in the
  testbench (:mod:`sim.tb.lm_generate_tb`), which reads each new hidden state
  through the AXI4 window, picks the token, writes the next embedding (through
  the banks' simulation back door; see that module) and starts the next
  programs through the registers.

The prompt's ``P`` bytes are prefilled (all layers, one program per stage),
giving the first new token from the last position; every further token is one
generation step per layer at the next position (KV cache in device memory).
``P + tokens - 1`` positions must fit the model's context (128 for the
Shakespeare model). Greedy by default; ``--temperature T > 0`` samples from
``softmax(logits / T)`` with ``--seed``.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sim.lm.model import DEFAULT_WEIGHTS, HostModel, Lm, load

__all__ = ["GenerateError", "Sampler", "DecodePlan", "check", "plan", "generate_model", "generate_rtl", "main_generate",
           "add_parser", "show_byte"]


class GenerateError(ValueError):
    pass


class Sampler:
    """Next token from the last layer's output row: ``ln_f`` + tied LM head, then argmax or a sample."""

    def __init__(self, host: HostModel, temperature: float = 0.0, seed: int = 0):
        if not temperature >= 0 or not np.isfinite(temperature):
            raise GenerateError(f"temperature must be a finite number >= 0, not {temperature}")
        self.host, self.temperature = host, float(temperature)
        self.rng = np.random.default_rng(seed)

    def __call__(self, h_row) -> int:
        logits = self.host.logits(np.asarray(h_row, dtype=np.float32)[None])[0]
        if self.temperature == 0:
            return int(np.argmax(logits))
        z = logits / self.temperature
        p = np.exp(z - z.max())
        return int(self.rng.choice(len(p), p=p / p.sum()))


@dataclass
class DecodePlan:
    """The compiled job and, per output position, the programs that produce it."""
    job: object
    prompt: list
    n_tokens: int
    groups: list            # [(position whose output gives the next token, [(Stage, addr, n), ...])]

    def out_addr(self, pos: int) -> int:
        cm = self.job.compiled
        return cm.plan.layers[-1].x_out + pos * cm.shape.d_model * 4

    def in_addr(self, pos: int) -> int:
        cm = self.job.compiled
        return cm.plan.layers[0].x_in + pos * cm.shape.d_model * 4


def check(lm: Lm, prompt: bytes, n_tokens: int) -> int:
    """The number of positions the decode needs (``P + tokens - 1``); a clear error when it cannot run."""
    P = len(prompt)
    if P < 1:
        raise GenerateError("the prompt must hold at least one byte")
    if not isinstance(n_tokens, int) or n_tokens < 1:
        raise GenerateError(f"tokens must be a positive integer, not {n_tokens!r}")
    total = P + n_tokens - 1
    if total > lm.cfg.n_ctx:
        raise GenerateError(f"prompt ({P} bytes) + tokens ({n_tokens}) - 1 = {total} positions exceed the "
                            f"model's context of {lm.cfg.n_ctx}")
    return total


def plan(lm: Lm, prompt: bytes, n_tokens: int, config: str = "default", policy: str = "ianus") -> DecodePlan:
    from firmware.compiler import CompileError, compile_model
    from firmware.runtime import build_job
    from sim.run import soc_config

    P = len(prompt)
    total = check(lm, prompt, n_tokens)
    cfg = soc_config(config)
    try:
        cm = compile_model(cfg, lm.cfg.shape, policy, P, total)
    except CompileError as e:
        raise GenerateError(f"the model does not fit the {config!r} configuration: {e}") from None
    x = np.zeros((total, lm.cfg.d_model), dtype=np.float32)
    x[:P] = lm.host.embed(list(prompt))
    job = build_job(cm, lm.layers, x)
    groups = [(P - 1, [p for p in job.programs if p[0].phase == "prefill"])]
    for pos in range(P, total):
        groups.append((pos, [p for p in job.programs if p[0].phase == "gen" and p[0].pos == pos]))
    return DecodePlan(job, list(prompt), n_tokens, groups)


def generate_model(lm: Lm, prompt: bytes, n_tokens: int, temperature: float = 0.0, seed: int = 0,
                   config: str = "default", policy: str = "ianus", on_token=None, dp: DecodePlan | None = None) -> dict:
    """Generate on the functional model; returns ``{"tokens": [...], "wall_s": ..., "instructions": ...}``."""
    from sim.soc_model import SocModel

    dp = dp or plan(lm, prompt, n_tokens, config, policy)
    sampler = Sampler(lm.host, temperature, seed)
    cm = dp.job.compiled
    d = cm.shape.d_model
    m = SocModel(cm.cfg)
    m.mem.data[:] = dp.job.image.data
    tokens, instr = [], 0
    t0 = time.perf_counter()
    for k, (pos, progs) in enumerate(dp.groups):
        if k > 0:
            m.write(dp.in_addr(pos), lm.host.embed([tokens[-1]], pos).astype("<f4").tobytes())
        for st, addr, n in progs:
            r = m.run(addr, n)
            if not r.ok:
                raise GenerateError(f"layer {st.layer} {st.phase}@{st.pos} {st.name}: SoC error {r.error:#x} at "
                                    f"instruction {r.error_pc}")
            instr += r.instructions
        h = np.frombuffer(m.read(dp.out_addr(pos), d * 4), dtype="<f4")
        tokens.append(sampler(h))
        if on_token:
            on_token(tokens[-1])
    return {"tokens": tokens, "wall_s": time.perf_counter() - t0, "instructions": instr,
            "estimated_cycles": int(sum(st.est.get("total", 0) for st, _, _ in dp.job.programs))}


def generate_rtl(lm: Lm, prompt: bytes, n_tokens: int, temperature: float = 0.0, seed: int = 0,
                 config: str = "default", policy: str = "ianus", sim: str = "verilator", on_token=None,
                 test_name: str | None = None, dp: DecodePlan | None = None) -> dict:
    """Generate with the decoder layers on the SoC RTL; returns tokens and measured cycles per step."""
    import concurrent.futures
    import contextlib
    import shutil

    from sim.build import BUILD_ROOT
    from sim.console import Quiet as _Quiet
    from sim.tb.soc_run import soc_sim_build, write_image_backdoor

    dp = dp or plan(lm, prompt, n_tokens, config, policy)
    cm = dp.job.compiled
    name = test_name or f"generate_{cm.cfg.name}_{sim}"
    logs = BUILD_ROOT / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    with _Quiet(str(logs / f"build_soc_{cm.cfg.name}_{sim}.log"), stderr=True):
        sb = soc_sim_build(cm.cfg, sim)
    run_dir = BUILD_ROOT / "runs" / name
    if run_dir.exists():
        shutil.rmtree(run_dir)
    last = max(a + 32 * n for _, a, n in dp.job.programs)
    write_image_backdoor(dp.job.image, run_dir / "backdoor", last)
    h = lm.host
    np.savez(run_dir / "host.npz", wte=h.wte, wpe=h.wpe, lnf_g=h.lnf_g, lnf_b=h.lnf_b, eps=np.float64(h.eps))
    spec = {"groups": [{"pos": pos, "programs": [{"addr": a, "n": n, "name": f"L{st.layer} {st.phase}@{st.pos} "
                                                                          f"{st.name}"} for st, a, n in progs]}
                       for pos, progs in dp.groups],
            "out_addr": [dp.out_addr(pos) for pos, _ in dp.groups],
            "in_addr": [dp.in_addr(pos) for pos, _ in dp.groups],
            "d_model": cm.shape.d_model, "temperature": temperature, "seed": seed,
            "channels": cm.cfg.pim.channels, "config": cm.cfg.name, "timeout_cycles": 50_000_000}
    (run_dir / "job.json").write_text(json.dumps(spec))
    stream = logs / f"{name}.tokens"
    stream.write_text("")
    seen = 0
    t0 = time.perf_counter()

    def poll():
        nonlocal seen
        lines = stream.read_text().splitlines()
        while seen < len(lines):
            if on_token:
                on_token(int(lines[seen].split()[0]))
            seen += 1

    env = {"RUN_DIR": str(run_dir), "IANUS_TOKENS": str(stream)}
    with open(logs / f"runner_{name}.log", "w") as runner_log, \
            concurrent.futures.ThreadPoolExecutor(1) as pool:
        with contextlib.redirect_stdout(runner_log):
            fut = pool.submit(sb.run, "sim.tb.lm_generate_tb", "generate", test_name=name, env=env,
                              log_file=logs / f"{name}.log")
            while not fut.done():
                time.sleep(0.3)
                poll()
            results_xml = fut.result()
    poll()
    res = json.loads((Path(results_xml).parent / "result.json").read_text())
    res["wall_s"] = time.perf_counter() - t0
    return res


def show_byte(b: int) -> str:
    return chr(b) if 32 <= b < 127 or b in (9, 10) else f"\\x{b:02x}"


def main_generate(args) -> int:
    from sim.lm.model import ModelError

    try:
        lm = load(args.weights)
        prompt = args.prompt.encode("utf-8")
        Sampler(lm.host, args.temperature)
        dp = plan(lm, prompt, args.tokens, args.config, args.policy)
    except (GenerateError, ModelError) as e:
        print(f"ianus generate: error: {e}", file=sys.stderr)
        return 2
    out = sys.stdout
    out.write(args.prompt)
    out.flush()

    def emit(tok):
        out.write(show_byte(tok))
        out.flush()

    kw = dict(temperature=args.temperature, seed=args.seed, config=args.config, policy=args.policy, on_token=emit,
              dp=dp)
    try:
        if args.backend == "model":
            res = generate_model(lm, prompt, args.tokens, **kw)
        else:
            res = generate_rtl(lm, prompt, args.tokens, sim=args.backend, **kw)
    except GenerateError as e:
        print(f"\nianus generate: error: {e}", file=sys.stderr)
        return 2
    out.write("\n")
    n = len(res["tokens"])
    msg = (f"[{n} tokens, {lm.cfg.layers} layers d {lm.cfg.d_model} on the {args.backend} backend "
           f"({args.config} configuration, {args.policy} policy), {res['wall_s']:.1f} s")
    if "steps" in res:
        cyc = [s["cycles"] for s in res["steps"]]
        msg += f"; prefill of {len(prompt)} tokens {cyc[0]:,} cycles"
        if len(cyc) > 1:
            msg += f", {np.mean(cyc[1:]):,.0f} cycles per generated token (measured on the RTL)"
    msg += "]"
    print(msg, file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps({**res, "prompt": args.prompt}))
    return 0


def add_parser(sub):
    g = sub.add_parser("generate", help="generate text with the trained model (decoder layers on the SoC)")
    g.add_argument("--prompt", required=True, help="text to continue (its UTF-8 bytes are the tokens)")
    g.add_argument("--tokens", type=int, default=32, help="bytes to generate")
    g.add_argument("--backend", default="model", choices=["model", "verilator"])
    g.add_argument("--weights", default=str(DEFAULT_WEIGHTS), help="model safetensors (`make model`)")
    g.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--config", default="default", choices=["tiny", "default"])
    g.add_argument("--policy", default="ianus", choices=["ianus", "npu-mem", "naive"])
    g.add_argument("--json", help="write the tokens and per-step figures to this JSON file")
    return g
