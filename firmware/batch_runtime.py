"""Runtime of batched generation (issue 18): KV allocation, continuous batching, the host's script.

:class:`BatchRuntime` keeps a batch of requests on one device. Every request has a KV allocation of whole
row indices from the KV pool (:class:`KvPool`, first fit) holding its caches in the policy's layouts
(:class:`firmware.batch.BatchPlan`). A request joins either with its prompt's K and V (the host writes them
as BF16, with the rest of the allocation cleared) or with its prompt's hidden states, which the device
prefills into the cleared allocation (the compiler's prefill stages, then under naive the copy into the PIM
layouts: :meth:`firmware.batch.BatchCompiler.prefill`); it leaves by giving its rows back. :meth:`BatchRuntime.step` runs one
generation step of the requests present: the host writes the step's input rows and its programs
(:class:`firmware.batch.BatchCompiler`) into device memory and starts the programs in order.

What the host does is recorded as a script (:attr:`BatchRuntime.ops`: ``("write", addr, bytes)`` and
``("run", addr, instructions, name)``) over the initial device image (:attr:`BatchRuntime.image`: weights,
parameters, the identity matrix). :func:`run_script` plays it on a functional model; the RTL testbench plays
the same script through the SoC's AXI window and registers (``sim/batch_run.py``), so both see the same
writes and programs in the same order.

When the KV pool cannot hold a joining request, :class:`KvCapacityError` names the numbers (rows needed,
free rows, the largest free run, the pool, the requests present) and nothing changes: no row is taken and
nothing is written, so the requests present go on as before.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from firmware.batch import BatchCompiler, BatchError, KvLayout, identity_bytes, plan_batch
from firmware.compiler import pack_layer
from firmware.gpt2 import GptShape, LayerWeights, _ln, reference_block
from firmware.memimage import MemoryImage
from firmware.program import round_up
from hw.spec import fp as G
from hw.spec import soc_isa as isa
from hw.spec.config import SystemConfig

__all__ = ["KvCapacityError", "KvPool", "Request", "StepRecord", "BatchRuntime", "run_script", "prompt_kv",
           "BatchRunError"]


class KvCapacityError(RuntimeError):
    """The KV memory cannot hold a request (the message has the numbers); nothing was allocated."""


class BatchRunError(RuntimeError):
    pass


class KvPool:
    """Row indices ``[first, end)`` handed out as contiguous runs, first fit."""

    def __init__(self, first: int, end: int):
        self.first, self.end = first, end
        self.runs: dict = {}                # owner -> (start, rows)
        self.high = first                   # end of the highest run ever handed out

    @property
    def rows(self) -> int:
        return self.end - self.first

    def free_runs(self) -> list[tuple[int, int]]:
        out, at = [], self.first
        for start, n in sorted(self.runs.values()):
            if start > at:
                out.append((at, start - at))
            at = start + n
        if at < self.end:
            out.append((at, self.end - at))
        return out

    def free_rows(self) -> int:
        return sum(n for _, n in self.free_runs())

    def alloc(self, owner, rows: int, what: str = "") -> int:
        if owner in self.runs:
            raise BatchError(f"{owner!r} already holds rows {self.runs[owner]}")
        for start, n in self.free_runs():
            if n >= rows:
                self.runs[owner] = (start, rows)
                self.high = max(self.high, start + rows)
                return start
        runs = self.free_runs()
        largest = max((n for _, n in runs), default=0)
        raise KvCapacityError(
            f"KV memory full: request {owner!r}{what} needs {rows} row(s) but {self.free_rows()} of the pool's "
            f"{self.rows} are free (largest free run {largest}; pool rows {self.first}..{self.end - 1}; "
            f"{len(self.runs)} request(s) hold the rest)")

    def free(self, owner):
        del self.runs[owner]


@dataclass
class Request:
    rid: object
    kv: KvLayout
    length: int                     # tokens in its cache


@dataclass
class StepRecord:
    index: int
    slot: int
    rids: list
    positions: list                 # position of each row's new token
    out_addr: int                   # [B, d] FP32 outputs of the last layer
    programs: list = field(default_factory=list)        # (name, addr, instructions, words)
    split: int | None = None        # neupims: rows 0 .. split - 1 are sub-batch A, the rest B


def prompt_kv(weights: list[LayerWeights], shape: GptShape, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """K and V (``[layers, heads, P, head_dim]`` float64) of a prompt's hidden states ``x [P, d]`` through the
    float64 GPT-2 blocks: what a prefill computes (the runtime rounds them to BF16 when it writes them)."""
    d, H, hd = shape.d_model, shape.heads, shape.head_dim
    h = np.asarray(x, dtype=np.float64)
    P = h.shape[0]
    ks, vs = np.zeros((shape.layers, H, P, hd)), np.zeros((shape.layers, H, P, hd))
    for i, w in enumerate(weights):
        f = {k: np.asarray(a, dtype=np.float64) for k, a in vars(w).items()}
        if P:
            qkv = _ln(h, f["ln1_g"], f["ln1_b"], shape.eps) @ f["qkv_w"] + f["qkv_b"]
            ks[i] = qkv[:, d:2 * d].reshape(P, H, hd).transpose(1, 0, 2)
            vs[i] = qkv[:, 2 * d:].reshape(P, H, hd).transpose(1, 0, 2)
            h = reference_block(h, w, shape)
    return ks, vs


class BatchRuntime:
    """A batch of requests on one device (module docstring)."""

    def __init__(self, cfg: SystemConfig, shape: GptShape, weights: list[LayerWeights], policy: str, max_batch: int,
                 max_tokens: int, io_slots: int = 4, prog_bytes: int | None = None, max_prompt: int = 0,
                 split: str = "auto", timer=None):
        if len(weights) != shape.layers:
            raise BatchError(f"{shape.layers} layers but {len(weights)} given")
        self.cfg, self.shape, self.policy = cfg, shape, policy
        self.bp = plan_batch(cfg, shape, policy, max_batch, max_tokens, io_slots, prog_bytes, max_prompt)
        # neupims' split mode (firmware.batch.SPLIT_MODES) and, optionally, the model that times candidate splits
        self.compiler = BatchCompiler(self.bp, split, timer)
        self.pool = KvPool(*self.bp.pool_rows)
        self.image = MemoryImage(cfg)
        for i, w in enumerate(weights):
            for addr, data in pack_layer(self.bp.plan, i, w):
                self.image.write(addr, data)
        self.image.write(self.bp.ident, identity_bytes(shape.head_dim))
        self.ops: list = []
        self.requests: dict = {}            # rid -> Request, in join order (= batch-row order)
        self.steps: list[StepRecord] = []
        self.programs: list = []            # every program started, in order: (name, addr, instructions, words)

    # -- host writes ------------------------------------------------------------------------------
    def write(self, addr: int, data: bytes):
        self.image.check(addr, len(data))
        self.ops.append(("write", addr, bytes(data)))

    # -- requests -----------------------------------------------------------------------------------
    def join(self, rid, k=None, v=None, capacity: int | None = None, x=None) -> Request:
        """Add request ``rid`` with room for ``capacity`` tokens in all (default: the plan's ``max_tokens``)
        and its prompt: either its K and V (``k``, ``v``: ``[layers, heads, P, head_dim]``, written by the host
        as BF16), or its hidden states ``x [P, d_model]``, prefilled on the device
        (:meth:`firmware.batch.BatchCompiler.prefill`: the plan needs ``max_prompt >= P``), or neither (no
        prompt). Raises :class:`KvCapacityError` when the KV pool cannot hold it (nothing changes then)."""
        bp, s = self.bp, self.shape
        if rid in self.requests:
            raise BatchError(f"request {rid!r} is already in the batch")
        capacity = bp.max_tokens if capacity is None else capacity
        bp.check_capacity(capacity)
        want = (s.layers, s.heads)
        if x is not None:
            if k is not None or v is not None:
                raise BatchError("give a prompt's K and V or its hidden states, not both")
            x = np.asarray(x, dtype=np.float32)
            if x.ndim != 2 or x.shape[1] != s.d_model or not 1 <= x.shape[0] <= bp.max_prompt:
                raise BatchError(f"prompt hidden states must have shape (P, {s.d_model}) with P in "
                                 f"1..{bp.max_prompt} (the plan's max_prompt), not {x.shape}")
            P = x.shape[0]
        else:
            if k is None:
                k = v = np.zeros(want + (0, s.head_dim))
            k, v = np.asarray(k, dtype=np.float64), np.asarray(v, dtype=np.float64)
            if k.shape != v.shape or k.shape[:2] != want or k.shape[3:] != (s.head_dim,):
                raise BatchError(f"prompt K and V must have shape ({s.layers}, {s.heads}, P, {s.head_dim}), not "
                                 f"{k.shape} and {v.shape}")
            P = k.shape[2]
        if P >= capacity:
            raise BatchError(f"request {rid!r}: a prompt of {P} tokens leaves no room in a capacity of {capacity}")
        if len(self.requests) >= bp.max_batch:
            raise BatchError(f"the batch is full: {len(self.requests)} requests (max_batch {bp.max_batch})")
        rows = bp.request_rows(capacity)
        start = self.pool.alloc(rid, rows, f" ({capacity} tokens x {s.layers} layer(s) x {s.heads} heads, "
                                           f"policy {self.policy})")
        kv = bp.layout(start, capacity)
        if x is None:
            self.write(start * bp.row_index_bytes, self.pack(kv, k, v))
        else:
            self.write(start * bp.row_index_bytes, bytes(kv.rows * bp.row_index_bytes))
            self.write(bp.pre_x[0], x.astype("<f4").tobytes())
            self._programs(self.compiler.prefill(kv, P), f"join {rid}")
        req = Request(rid, kv, P)
        self.requests[rid] = req
        return req

    def leave(self, rid):
        """Remove request ``rid``; its rows go back to the pool."""
        if rid not in self.requests:
            raise BatchError(f"request {rid!r} is not in the batch")
        del self.requests[rid]
        self.pool.free(rid)

    def pack(self, kv: KvLayout, k: np.ndarray, v: np.ndarray) -> bytes:
        """The bytes of a whole allocation: the prompt's K and V (BF16) in the policy's layouts, zeros
        elsewhere."""
        bp, s = self.bp, self.shape
        base = kv.row0 * bp.row_index_bytes
        buf = np.zeros(kv.rows * bp.row_index_bytes, dtype=np.uint8)
        kb = G.bf16_bits(k.astype(np.float32))
        vb = G.bf16_bits(v.astype(np.float32))
        P, hd = k.shape[2], s.head_dim

        def put(addr, bits):
            raw = np.ascontiguousarray(bits).astype("<u2").view(np.uint8).reshape(-1)
            buf[addr - base:addr - base + raw.size] = raw

        for i in range(s.layers):
            for h in range(s.heads):
                for t in range(P):
                    put(bp.v_addr(kv, i, h, t), vb[i, h, t])
                if self.policy == "npu-only":
                    put(kv.k[i][h], kb[i, h])
                    continue
                for t in range(P):
                    put(bp.k_addr(kv, i, h, t), kb[i, h, t])
                for n in range(hd):         # V^T row n: token t is BF16 value t from the row's column 0
                    put(bp.vt_addr(kv, i, h, n, 0), vb[i, h, :, n])
        return buf.tobytes()

    # -- steps ----------------------------------------------------------------------------------------
    def step(self, x) -> StepRecord:
        """One generation step of the requests present, in join order; ``x``: their input hidden states,
        ``[B, d_model]`` or a dict ``rid -> [d_model]``. Returns where the outputs will be."""
        bp, d = self.bp, self.shape.d_model
        reqs = list(self.requests.values())
        if not reqs:
            raise BatchError("no request in the batch")
        if isinstance(x, dict):
            x = np.stack([np.asarray(x[r.rid]) for r in reqs])
        x = np.asarray(x, dtype=np.float32)
        if x.shape != (len(reqs), d):
            raise BatchError(f"step input must have shape ({len(reqs)}, {d}), not {x.shape}")
        # neupims: the rows in the order of the cost model's two sub-batches (A first); the record's rids
        # and positions follow that order
        order, split = self.compiler.partition([(r.kv, r.length) for r in reqs])
        reqs, x = [reqs[j] for j in order], x[order]
        for r in reqs:
            if r.length >= r.kv.capacity:
                raise KvCapacityError(f"request {r.rid!r} is full: {r.length} tokens of its capacity of "
                                      f"{r.kv.capacity}; it must leave before the next step")
        index = len(self.steps)
        slot = index % bp.io_slots
        self.write(bp.slots[slot][0], x.astype("<f4").tobytes())
        stages = self.compiler.step([(r.kv, r.length) for r in reqs], slot, split)
        rec = StepRecord(index, slot, [r.rid for r in reqs], [r.length for r in reqs],
                         bp.slots[slot][self.shape.layers], split=split)
        rec.programs = self._programs(stages, f"step{index}")
        for r in reqs:
            r.length += 1
        self.steps.append(rec)
        return rec

    def _programs(self, stages, label: str) -> list:
        """Write ``stages``' programs into the program area and start them in order; returns ``(name, addr,
        instructions, words)`` per program."""
        bp = self.bp
        addr = bp.prog_base
        blobs = []
        for st in stages:
            data = isa.to_bytes(st.words)
            blobs.append((addr, data, st))
            addr += round_up(len(data), 64)
        if addr - bp.prog_base > bp.prog_bytes:
            raise BatchError(f"{label}: {addr - bp.prog_base} bytes of programs; the program area holds "
                             f"{bp.prog_bytes}")
        self.write(bp.prog_base, b"".join(data + bytes(round_up(len(data), 64) - len(data)) for _, data, _ in blobs))
        out = []
        for a, _, st in blobs:
            name = f"{label} L{st.layer} {st.name}"
            self.ops.append(("run", a, len(st.words), name))
            out.append((name, a, len(st.words), st.words))
        self.programs += out
        return out

    def outputs(self, rec: StepRecord, read) -> np.ndarray:
        """A step's outputs ``[B, d_model]`` float32 through ``read(addr, n) -> bytes`` (valid until its slot
        is reused, ``io_slots`` steps later)."""
        d = self.shape.d_model
        raw = read(rec.out_addr, len(rec.rids) * d * 4)
        return np.frombuffer(raw, dtype="<f4").reshape(len(rec.rids), d).copy()

    def initial(self) -> tuple[MemoryImage, list]:
        """The device image with the writes before the first program applied, and the remaining ops (what a
        backend loads at once and what it plays after)."""
        img = MemoryImage(self.cfg)
        img.data[:] = self.image.data
        i = 0
        while i < len(self.ops) and self.ops[i][0] == "write":
            img.write(self.ops[i][1], self.ops[i][2])
            i += 1
        return img, self.ops[i:]


def run_script(rt: BatchRuntime, model, upto: int | None = None, progress=None):
    """Play ``rt``'s script (its first ``upto`` ops) on ``model``, a functional model of the SoC (``mem``,
    ``write``, ``run``: :class:`sim.soc_model.SocModel`); returns per program ``(name, instructions)``."""
    img, ops = rt.initial()
    model.mem.data[:] = img.data
    done = len(rt.ops) - len(ops)
    out = []
    for op in ops[:None if upto is None else max(0, upto - done)]:
        if op[0] == "write":
            model.write(op[1], op[2])
            continue
        _, addr, n, name = op
        r = model.run(addr, n)
        if not r.ok:
            raise BatchRunError(f"{name}: error {r.error:#x} at instruction {r.error_pc}")
        out.append((name, r.instructions))
        if progress:
            progress()
    return out
