"""``ianus sweep SPEC.yaml``: design-space exploration on Dask distributed.

A sweep is a set of points; each point is a configuration (a preset with fields changed), a model, an
input and output length and a policy, and runs the compiler + the calibrated performance model
(:func:`sim.project.project`, the code behind ``ianus project``) on a Dask worker. Results are appended
to ``OUT/results.csv`` as points finish; a second run of the same spec skips the points already there
(each row carries a stable hash of its point); a point that fails records its error in its row and the
sweep goes on; a worker that dies mid-sweep loses nothing (the scheduler re-runs its tasks elsewhere,
and only finished results reach the file). After the sweep: Pareto fronts (latency per token, energy
per token, area proxy: :mod:`sim.sweep_analysis`) as PNGs and a table of the best point per objective.

The spec (YAML)::

    name: example                # default: the file's stem
    base: ianus                  # the preset whose fields change (hw/config.py: tiny, default, ianus)
    mode: grid                   # grid: every combination of the axes; random: `samples` distinct draws
    samples: 100                 # random mode only
    seed: 0                      # random mode only
    positions: 4                 # generation positions simulated per point (interpolated between)
    timeout_s: 300               # a point running longer records a timeout error
    fixed:                       # the same for every point
      output: 64
    axes:                        # what varies
      model: [small, medium]     # firmware.gpt2 SHAPES names, or {d_model: 256, heads: 4, layers: 4}
      policy: [ianus, npu-mem]   # firmware.compiler POLICIES
      input: [128, 256]
      pim.channels: [4, 8, 16]   # any configuration field: pim.*, timing.*, npu.*, clocks.*
      timing.tRCDRD: {range: [24, 48], step: 12}
      npu.array_rows: {pow2: [32, 128]}

An axis is a list of values, ``{range: [lo, hi], step: s}`` (integers when lo, hi and step are),
``{range: [lo, hi]}`` (random mode: uniform; ``log: true`` for log-uniform) or ``{pow2: [lo, hi]}`` (the
powers of two between). ``model``, ``policy``, ``input`` and ``output`` default to ``ianus`` policy,
input 128, output 8; a model is required. Every value of a configuration axis is checked against the
base preset (with the fixed values) by the configuration's own rules; a rule between two swept fields
is checked per point (the point records the error).
"""

from __future__ import annotations

import csv
import ctypes
import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from sim.sweep_spec import (
    METRICS,
    Spec,
    SpecError,
    build_config,
    load_spec,
    parse_spec,
    point_key,
    resolve_model,
)
from sim.usage import check_input_path, check_output_dir

__all__ = ["SpecError", "Spec", "load_spec", "parse_spec", "point_key", "run_point", "run_sweep",
           "connect", "METRICS", "add_parser", "main_sweep"]


class PointTimeout(Exception):
    """Raised inside a point's thread when it runs past the spec's ``timeout_s``."""


# ---------------------------------------------------------------------------------------------
# One point (runs on a Dask worker)
# ---------------------------------------------------------------------------------------------

def _one_line(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:500]


def call_with_timeout(fn, seconds: float):
    """``fn()`` in this thread; after ``seconds`` a :class:`PointTimeout` is raised inside it (checked
    between Python bytecodes, so a long C call finishes first). Dask runs tasks in worker threads, where
    signals cannot reach."""
    tid = ctypes.c_ulong(threading.get_ident())
    lock = threading.Lock()
    state = {"done": False, "fired": False}

    def fire():
        with lock:
            if not state["done"]:
                state["fired"] = True
                ctypes.pythonapi.PyThreadState_SetAsyncExc(tid, ctypes.py_object(PointTimeout))

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()
    try:
        result = fn()
    except PointTimeout:
        raise PointTimeout(f"point ran past the spec's timeout_s of {seconds:g} s") from None
    finally:
        with lock:
            state["done"] = True
            if state["fired"]:
                ctypes.pythonapi.PyThreadState_SetAsyncExc(tid, None)     # drop one not yet delivered
        timer.cancel()
    # The exception can be delivered where Python swallows it (a finalizer or generator close run by the
    # garbage collector prints "Exception ignored" and goes on), so the point can return although it ran past
    # its limit (seen in tests/test_sweep.py under load): the timer having fired is what counts.
    if state["fired"]:
        raise PointTimeout(f"point ran past the spec's timeout_s of {seconds:g} s")
    return result


def evaluate(point: dict, base: str, positions: int) -> dict:
    """Compile and time one point; its metrics (:data:`METRICS`)."""
    from sim.project import project
    from sim.sweep_analysis import area_proxy

    cfg = build_config(base, point)
    shape, label = resolve_model(point["model"])
    n_out = point["output"]
    p = project(label, point["policy"], point["input"], n_out, cfg, samples=positions, shape=shape)
    s = p.summary(n_out)
    out = {k: s[k] for k in ("summarization_ms", "gen_ms_per_token", "total_ms", "summarization_mJ",
                             "gen_mJ_per_token", "total_J")}
    out["ms_per_token"] = s["total_ms"] / n_out
    out["mJ_per_token"] = s["total_J"] * 1e3 / n_out
    out.update(area_proxy(cfg))
    return out


def _transient(e: BaseException) -> bool:
    """CPython 3.11's ast.parse keeps a recursion counter in state shared by all threads (CPython
    gh-106905 and related): the performance model parses a source file for every point
    (``inspect.getsource`` in ``sim.perfmodel._transpose_buffers``), and a parse in another thread of the
    worker process at the same moment makes it fail with this SystemError (seen in about one of three runs
    of the worker-kill test in tests/test_sweep.py). Running the point again is correct."""
    return isinstance(e, SystemError) and "AST constructor recursion depth mismatch" in str(e)


def run_point(point: dict, base: str, positions: int, timeout_s: float) -> dict:
    """Evaluate ``point``; never raises: a failure is ``status`` "error" with its message in ``error``."""
    t0, c0 = time.perf_counter(), time.thread_time()
    row = {"status": "ok", "error": ""}
    for attempt in range(3):
        try:
            row.update(call_with_timeout(lambda: evaluate(point, base, positions), timeout_s))
            break
        except Exception as e:  # recorded in the row; the sweep goes on
            if _transient(e) and attempt < 2:
                continue
            row.update(status="error", error=_one_line(e))
            break
    row["worker"] = f"{socket.gethostname()}:{os.getpid()}"
    row["wall_s"] = round(time.perf_counter() - t0, 4)
    row["cpu_s"] = round(time.thread_time() - c0, 4)        # this thread's CPU: the wall time less waiting for a core
    return row


def _probe() -> str:
    import sim.project  # noqa: F401  (imported once per worker, before the timed part)
    return f"{socket.gethostname()}:{os.getpid()}"


# ---------------------------------------------------------------------------------------------
# The sweep
# ---------------------------------------------------------------------------------------------

def connect(workers: int = 2, scheduler: str | None = None, timeout: str = "15s"):
    """(client, cluster): an embedded LocalCluster of ``workers`` processes with one thread each, or a
    client of the scheduler at ``scheduler`` (cluster None; ``timeout`` to reach it)."""
    from dask.distributed import Client, LocalCluster

    if scheduler:
        try:
            return Client(scheduler, timeout=timeout), None
        except (OSError, TimeoutError, ValueError) as e:
            raise SpecError(f"cannot reach the Dask scheduler {scheduler!r}: {' '.join(str(e).split())}") from None
    if isinstance(workers, bool) or not isinstance(workers, int) or not 1 <= workers <= 256:
        raise SpecError(f"--workers must be an integer in 1..256, not {workers!r}")
    cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0",
                           silence_logs=logging.ERROR)
    return Client(cluster), cluster


def read_results(path: Path, columns: list[str]) -> list[dict]:
    """Rows of an existing results file (a last line cut short by a crash is dropped)."""
    if not path.exists() or path.stat().st_size == 0:
        return []
    text = path.read_text()
    if not text.endswith("\n"):
        text = text[:text.rfind("\n") + 1]
        path.write_text(text)
    reader = csv.DictReader(text.splitlines())
    if reader.fieldnames != columns:
        raise SpecError(f"{path} holds results with other columns (another spec?); use another --out")
    return list(reader)


def _csv_value(v):
    if isinstance(v, dict):
        return json.dumps(v, sort_keys=True)
    if isinstance(v, float):
        return repr(v)
    return v


def _row(spec: Spec, key: str, point: dict, result: dict) -> list:
    vals = {"key": key, "point": json.dumps(point, sort_keys=True, separators=(",", ":"))}
    for f in spec.fields:
        v = point.get(f, "")
        vals[f] = resolve_model(v)[1] if f == "model" and isinstance(v, dict) else v
    vals.update(result)
    return [_csv_value(vals.get(c, "")) for c in spec.columns()]


@dataclass
class SweepStats:
    points: int = 0
    skipped: int = 0
    ran: int = 0
    ok: int = 0
    errors: int = 0
    seconds: float = 0.0
    workers: int = 0
    interrupted: bool = False
    results: Path | None = None

    @property
    def points_per_s(self) -> float:
        return self.ran / self.seconds if self.seconds > 0 else 0.0


def run_sweep(spec: Spec, out_dir, *, workers: int = 2, scheduler: str | None = None, client=None,
              progress: bool = True, retry_errors: bool = False, on_result=None, console=None) -> SweepStats:
    """Run the points of ``spec`` not yet in ``out_dir/results.csv`` and append their rows as they finish.

    ``client``: an existing ``dask.distributed.Client`` (else one is made by :func:`connect`).
    ``retry_errors``: rows with errors are removed first, so their points run again.
    ``on_result(row_dict, stats)``: called after each row is written (progress, tests)."""
    from dask.distributed import as_completed

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "results.csv"
    columns = spec.columns()
    done_rows = read_results(path, columns)
    if retry_errors and any(r["status"] != "ok" for r in done_rows):
        done_rows = [r for r in done_rows if r["status"] == "ok"]
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=columns)
            w.writeheader()
            w.writerows(done_rows)
        os.replace(tmp, path)
    done = {r["key"] for r in done_rows}
    todo, seen = [], set()
    points = spec.points()
    for p in points:
        k = point_key(spec, p)
        if k not in done and k not in seen:
            seen.add(k)
            todo.append((k, p))
    stats = SweepStats(points=len(points), skipped=len(points) - len(todo), results=path)
    if not todo:
        return stats
    own = client is None
    cluster = None
    if own:
        client, cluster = connect(workers, scheduler)
    bar = None
    try:
        try:
            client.wait_for_workers(1, timeout=120)
        except TimeoutError:
            raise SpecError(f"the Dask scheduler {client.scheduler.address} has no workers (waited 120 s)") from None
        try:
            stats.workers = len(client.run(_probe))
        except Exception as e:
            raise SpecError(f"a Dask worker cannot import this project's sim package: {_one_line(e)}") from None
        if progress:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                           TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                           console=console)
            task = bar.add_task(f"sweep {spec.name}", total=len(todo), status="")
            bar.start()
        t0 = time.perf_counter()
        futures = client.map(run_point, [p for _, p in todo], key=[f"ianus-sweep-{k}" for k, _ in todo],
                             base=spec.base, positions=spec.positions, timeout_s=spec.timeout_s)
        meta = {f.key: kp for f, kp in zip(futures, todo, strict=True)}
        new_file = not path.exists() or path.stat().st_size == 0
        with open(path, "a", newline="") as fh:
            w = csv.writer(fh)
            if new_file:
                w.writerow(columns)
            try:
                for fut in as_completed(futures):
                    k, p = meta[fut.key]
                    try:
                        res = fut.result()
                    except Exception as e:  # the task itself failed (e.g. KilledWorker): record it
                        res = {"status": "error", "error": _one_line(e)}
                    fut.release()
                    row = _row(spec, k, p, res)
                    w.writerow(row)
                    fh.flush()
                    stats.ran += 1
                    stats.ok += res["status"] == "ok"
                    stats.errors += res["status"] != "ok"
                    stats.seconds = time.perf_counter() - t0
                    if bar is not None:
                        bar.update(task, advance=1, status=f"ok {stats.ok}, errors {stats.errors}")
                    if on_result is not None:
                        on_result(dict(zip(columns, row, strict=True)), stats)
            except KeyboardInterrupt:
                stats.interrupted = True
            finally:
                del futures
    finally:
        if bar is not None:
            bar.stop()
        if own:
            client.close()
            if cluster is not None:
                cluster.close()
    return stats


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

MAX_PLOTS = 12


def analyse_results(spec: Spec, out_dir: Path, console=None, plots: bool = True) -> dict:
    """Pareto fronts and best points of every row in ``out_dir/results.csv``; writes ``pareto.csv`` and
    one ``pareto_<model>_<input>_<output>.png`` per workload (at most :data:`MAX_PLOTS`)."""
    from sim.sweep_analysis import OBJECTIVES, analyse, best_table, plot_name, plot_pareto

    rows = read_results(out_dir / "results.csv", spec.columns())
    groups = analyse(rows, spec.design_fields)
    front = [r for g in groups for r in g["front"]]
    with open(out_dir / "pareto.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        cols = ["key", *spec.fields, *OBJECTIVES]
        w.writerow(cols)
        for r in front:
            w.writerow([_csv_value(r.get(c, "")) for c in cols])
    pngs = []
    if plots:
        for g in groups[:MAX_PLOTS]:
            pngs.append(plot_pareto(g, out_dir / plot_name(g["workload"])))
    if console is not None and groups:
        console.print(best_table(groups))
    return {"rows": len(rows), "ok": sum(r["status"] == "ok" for r in rows), "groups": len(groups),
            "front": len(front), "plots": pngs, "skipped_plots": max(0, len(groups) - MAX_PLOTS) if plots else 0}


def main_sweep(args) -> int:
    from rich.console import Console

    con = Console(highlight=False)
    spec = load_spec(check_input_path("SPEC", args.spec))
    out = check_output_dir("--out", args.out or f"build/sweep/{spec.name}")
    if not args.scheduler and not 1 <= args.workers <= 256:
        raise SpecError(f"--workers must be an integer in 1..256, not {args.workers}")
    if args.dry_run:
        done = {r["key"] for r in read_results(out / "results.csv", spec.columns())}
        pts = spec.points()
        con.print(f"{spec.name}: {len(pts)} points ({spec.mode}), {sum(point_key(spec, p) in done for p in pts)} "
                  f"already in {out / 'results.csv'}")
        for p in pts[:5]:
            con.print(f"  {point_key(spec, p)} {json.dumps(p, sort_keys=True)}", markup=False)
        return 0
    where = args.scheduler or f"a local Dask cluster of {args.workers} worker process(es)"
    con.print(f"sweep {spec.name}: {spec.size()} points on {where}; results {out / 'results.csv'}")
    stats = run_sweep(spec, out, workers=args.workers, scheduler=args.scheduler, progress=not args.no_progress,
                      retry_errors=args.retry_errors, console=con)
    rate = f", {stats.points_per_s:.2f} points/s on {stats.workers} worker(s)" if stats.ran else ""
    con.print(f"{stats.points} points: {stats.skipped} already done, {stats.ran} run now "
              f"({stats.ok} ok, {stats.errors} errors) in {stats.seconds:.1f} s{rate}")
    if stats.interrupted:
        con.print("interrupted: the rows above are saved; run the same command again to resume")
        return 130
    info = analyse_results(spec, out, console=con, plots=not args.no_plots)
    con.print(f"results: {out / 'results.csv'} ({info['rows']} rows, {info['ok']} ok); Pareto front: "
              f"{info['front']} points in {info['groups']} workload(s), {out / 'pareto.csv'}")
    for p in info["plots"]:
        con.print(f"plot: {p}")
    if info["skipped_plots"]:
        con.print(f"({info['skipped_plots']} more workloads not plotted: at most {MAX_PLOTS} plots)")
    return 0


def add_parser(sub):
    p = sub.add_parser("sweep", help="design-space sweep (YAML spec) on Dask: compiler + performance model per point")
    p.add_argument("spec", help="YAML sweep spec (see sim/sweeps/example.yaml)")
    p.add_argument("--out", default=None, help="output directory (default: build/sweep/<spec name>)")
    p.add_argument("--workers", type=int, default=2, help="local worker processes, one thread each")
    p.add_argument("--scheduler", default=None, help="tcp://host:port of an existing Dask scheduler")
    p.add_argument("--retry-errors", action="store_true", help="run the points whose rows hold an error again")
    p.add_argument("--dry-run", action="store_true", help="count the points and those already done, run nothing")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-plots", action="store_true", help="no Pareto PNGs (pareto.csv and the table still)")
    p.set_defaults(func=main_sweep)
    return p
