"""Runtime: put a compiled model in device memory, run its stage programs, read the outputs.

:func:`build_job` produces everything a backend needs: the initial device
memory (weights in the PIM layout, biases, layernorm parameters, the GELU
table in every bank's reserved row, the input hidden states and every stage's
program) and the list of programs to start in order. :func:`run_model` runs a job on a
functional model the caller passes (the firmware does not import the models:
``sim.soc_model.run_job`` passes a :class:`sim.soc_model.SocModel`); the RTL
testbench (``sim/tb/soc_run.py``) loads the same image through the device's
back door and starts the same programs through the CSRs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from firmware.compiler import CompiledModel, CompileError, Stage, pack_layer
from firmware.gpt2 import LayerWeights
from firmware.memimage import MemoryImage
from firmware.pim import af_lut_row
from hw.spec import soc_isa as isa

__all__ = ["Job", "build_job", "run_model", "read_outputs", "RunError"]


class RunError(RuntimeError):
    pass


@dataclass
class Job:
    compiled: CompiledModel
    image: MemoryImage
    programs: list                      # (Stage, byte address, instructions)
    results: list = field(default_factory=list)     # per program: dict(cycles=..., counters...)


def build_job(compiled: CompiledModel, weights: list[LayerWeights], x: np.ndarray) -> Job:
    cfg, plan, shape = compiled.cfg, compiled.plan, compiled.shape
    from firmware.compiler import TIMING_ONLY
    if cfg.pim.lowprec and cfg.pim.act_format != "bf16":
        raise RunError(f"configuration {cfg.name!r}: the PIM units take {cfg.pim.act_format} activations, which "
                       f"the vector unit does not produce yet (no E4M3 output format, no per-token scale); its "
                       f"compiled programs are for the performance model only (4-bit weights with BF16 "
                       f"activations run)")
    if cfg in TIMING_ONLY:
        raise RunError(f"configuration {cfg.name!r}: the matrix unit reads the PIM weight layout with a timing "
                       f"stand-in (firmware.compiler.PimWeights.loads); its programs are for the performance "
                       f"model only")
    x = np.asarray(x, dtype=np.float32)
    if x.shape != (compiled.total, shape.d_model):
        raise RunError(f"input must have shape ({compiled.total}, {shape.d_model}), not {x.shape}")
    if len(weights) != shape.layers:
        raise RunError(f"{shape.layers} layers compiled but {len(weights)} given")
    img = MemoryImage(cfg)
    for i, w in enumerate(weights):
        for addr, data in pack_layer(plan, i, w):
            img.write(addr, data)
    p = cfg.pim
    if p.af_rows:
        row = af_lut_row(cfg)
        img.set_rows(p.data_rows, np.broadcast_to(row, (1, p.channels, p.banks, p.columns, p.lanes)))
    img.write(plan.layers[0].x_in, x.astype("<f4").tobytes())
    if "qd" in plan.buffers:    # zeros off the diagonal of generation's block-diagonal query (programs write blocks)
        img.write(plan.buffers["qd"], bytes(shape.heads * shape.d_model * 2))
    programs = []
    addr = plan.prog_base
    limit = p.data_rows * plan.row_bytes
    for st in compiled.stages:
        data = isa.to_bytes(st.words)
        if addr + len(data) > limit:
            raise CompileError(f"programs do not fit device memory: {addr + len(data):#x} > {limit:#x}")
        img.write(addr, data)
        programs.append((st, addr, len(st.words)))
        addr += -(-len(data) // 64) * 64
    return Job(compiled, img, programs)


def read_outputs(compiled: CompiledModel, read) -> np.ndarray:
    """Last layer's outputs [tokens, d_model] float32 through ``read(addr, n) -> bytes``."""
    plan, shape = compiled.plan, compiled.shape
    raw = read(plan.layers[-1].x_out, compiled.total * shape.d_model * 4)
    return np.frombuffer(raw, dtype="<f4").reshape(compiled.total, shape.d_model).copy()


def run_model(job: Job, model, progress=None):
    """Run every program of ``job`` on ``model``, a functional model of the SoC (``model.mem``, a
    :class:`MemoryImage`; ``model.run(addr, n)`` with a result that has ``ok``, ``error``, ``error_pc`` and
    ``instructions``, as :class:`sim.soc_model.SocModel`); returns the model (its memory holds the results)."""
    m = model
    m.mem.data[:] = job.image.data
    for st, addr, n in job.programs:
        t0 = time.perf_counter()
        r = m.run(addr, n)
        if not r.ok:
            raise RunError(f"layer {st.layer} {st.phase} {st.name} (pos {st.pos}): error {r.error:#x} "
                           f"at instruction {r.error_pc}")
        job.results.append({"instructions": r.instructions, "wall_s": time.perf_counter() - t0})
        if progress:
            progress()
    return m


def stage_rows(st: Stage) -> str:
    return f"L{st.layer} {st.phase}@{st.pos} {st.name}"
