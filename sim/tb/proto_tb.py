"""cocotb testbenches for the prototype top (hw/proto.py): the host driver over AXI on the RTL.

The protocol checker watches every channel's bus in the background; the
device's violation flags must stay clean.
"""

from __future__ import annotations

import cocotb
import numpy as np
from cocotb.triggers import FallingEdge

from firmware import driver as D
from hw.config import preset
from hw.spec import fp as G
from hw.spec.macro import CSR, Macro, MacroOp
from sim.pim_checker import BusMonitor
from sim.pim_model import FunctionalDevice
from sim.tb.common import env_int, env_str, start, tb_test, write_metrics
from sim.transports import AxiResponseError, AxiTransport


def _cfg():
    return preset(env_str("IANUS_CONFIG", "tiny"))


async def _raises(coro, exc, message: str):
    """Await ``coro``; :class:`AssertionError` with ``message`` unless it raises ``exc``."""
    try:
        await coro
    except exc:
        return
    raise AssertionError(message)


async def bring_up(dut, cfg, pause_prob=0.0):
    await start(dut, zero_inputs=["bd_load"])
    await FallingEdge(dut.clk)
    mon = BusMonitor(dut, cfg)
    cocotb.start_soon(mon.run())
    tr = AxiTransport(dut, pause_seed=env_int("SEED", 1), pause_prob=pause_prob)
    return mon, tr


async def program(dev, cfg, seed):
    """The host program: GELU table, weights with bias, one GEMV with GELU and one without."""
    rng = np.random.default_rng(seed)
    K, N = 96, 40
    w = G.bf16_bits(rng.standard_normal((K, N)) * (3 / np.sqrt(K)))
    b = (rng.standard_normal(N) * 0.1).astype(np.float32)
    x = G.bf16_bits(rng.standard_normal(K))
    await dev.upload_gelu_table()
    h = await dev.upload_weights(w, bias=b)
    y1 = await dev.gemv(h, x, gelu_act=True)
    y2 = await dev.gemv(h, x)
    return y1.view(np.uint32).copy(), y2.view(np.uint32).copy()


@tb_test()
async def driver_same_bits(dut):
    """The same driver program on the RTL (AXI) and on the functional model: identical bits."""
    cfg = _cfg()
    mon, tr = await bring_up(dut, cfg)
    dev = await D.Device.open(tr, cfg)
    rtl = await program(dev, cfg, seed=5)
    fdev = await D.Device.open(D.FunctionalTransport(FunctionalDevice(cfg)), cfg)
    model = await program(fdev, cfg, seed=5)
    for a, b, what in ((rtl[0], model[0], "GEMV+GELU"), (rtl[1], model[1], "GEMV")):
        bad = np.flatnonzero(a != b)
        assert bad.size == 0, f"{what}: RTL and functional model differ at {bad[:8]}: {a[bad[:4]]} vs {b[bad[:4]]}"
    counters = {name: await tr.read_csr(CSR.CH_BASE + 4 * i) for i, name in
                enumerate(("busy_cycles", "commands", "refreshes", "wait_cycles", "macs"))}
    assert counters["macs"] > 0 and counters["commands"] > 0, counters
    mon.assert_clean()
    write_metrics(name="proto_driver", config=cfg.name, cycles=mon.cycle, counters_ch0=counters)
    dut._log.info("driver program bit-identical on RTL and functional model; channel 0 counters %s", counters)


@tb_test()
async def bad_input(dut):
    """Out-of-window AXI accesses get SLVERR; unmapped registers SLVERR; a malformed macro command gives a
    typed error and the device works after CLEAR; the driver times out on a stalled device."""
    cfg = _cfg()
    mon, tr = await bring_up(dut, cfg)
    dev = await D.Device.open(tr, cfg)
    size = cfg.pim.total_bytes
    for coro in (tr.read_mem(size, 32), tr.write_mem(size - 32, bytes(64)), tr.read_mem(size - 32, 64)):
        await _raises(coro, AxiResponseError, "an access outside the memory window was not answered SLVERR")
    # Nothing was written by the refused burst: the last in-window column still reads zero.
    assert await tr.read_mem(size - 32, 32) == bytes(32)
    for coro in (tr.read_csr(0x3FC), tr.write_csr(CSR.ID, 1)):
        await _raises(coro, AxiResponseError, "an unmapped or read-only register access was not answered SLVERR")
    await dev.submit(Macro(13))
    await _raises(dev.wait_idle(timeout_cycles=100_000), D.BadOpcodeError,
                  "a malformed macro command raised no BadOpcodeError")
    await dev.clear_error()
    y = await program(dev, cfg, seed=6)
    fdev = await D.Device.open(D.FunctionalTransport(FunctionalDevice(cfg)), cfg)
    want = await program(fdev, cfg, seed=6)
    assert all(np.array_equal(a, b) for a, b in zip(y, want, strict=True)), "wrong results after recovery"
    # Timeout: a queue of work and a cycle budget far too small for it (seven tile rows per GEMV, so that the
    # queued work outlasts the register writes that submit it).
    h = await dev.upload_weights(np.ones((32, 112), np.float32))
    x_addr = dev.alloc(64)
    await dev.write(x_addr, G.bf16_bits(np.ones(32, np.float32)).tobytes())
    for _ in range(4):
        await dev.submit(Macro(MacroOp.WRITE_VEC, n=32, addr0=x_addr))
        await dev.submit(Macro(MacroOp.GEMV, n=32, m=h.layout.N, row=h.layout.base_row))
    await _raises(dev.wait_idle(timeout_cycles=10), D.DeviceTimeout, "the driver did not time out")
    await dev.wait_idle()
    mon.assert_clean()


@tb_test()
async def random_load(dut):
    """Host traffic to a data region interleaved with PIM macro commands on all channels, with random AXI
    back-pressure: the data region matches its model, every GEMV result is right, the checker is clean
    and no refresh is late."""
    import random

    from cocotb.triggers import Combine

    cfg = _cfg()
    mon, tr = await bring_up(dut, cfg, pause_prob=0.3)
    dev = await D.Device.open(tr, cfg)
    rng = random.Random(env_int("SEED", 3))
    region_bytes = env_int("REGION_BYTES", 4096)
    region = dev.alloc(region_bytes)
    model = bytearray(region_bytes)
    fdev = await D.Device.open(D.FunctionalTransport(FunctionalDevice(cfg)), cfg)
    fdev.alloc(region_bytes)
    n_ops = env_int("N_OPS", 40)

    async def host():
        for _ in range(n_ops):
            off = rng.randrange(0, len(model) // 32) * 32
            n = rng.randrange(1, 4) * 32
            n = min(n, len(model) - off)
            if rng.random() < 0.5:
                data = bytes(rng.randrange(256) for _ in range(n))
                await tr.write_mem(region + off, data)
                model[off:off + n] = data
            else:
                got = await tr.read_mem(region + off, n)
                assert got == bytes(model[off:off + n]), f"host read at +{off:#x} returned stale data"

    async def pim():
        outs = []
        for i in range(env_int("N_GEMV", 3)):
            outs.append(await program(dev, cfg, seed=20 + i))
        return outs

    h_task = cocotb.start_soon(host())
    p_task = cocotb.start_soon(pim())
    await Combine(h_task, p_task)
    outs = p_task.result()
    for i, got in enumerate(outs):
        want = await program(fdev, cfg, seed=20 + i)
        assert all(np.array_equal(a, b) for a, b in zip(got, want, strict=True)), f"GEMV {i} wrong under load"
    assert await tr.read_mem(region, len(model)) == bytes(model), "data region differs from its model"
    waited = [await tr.read_csr(CSR.CH_BASE + 0x20 * c + 0xC) for c in range(cfg.pim.channels)]
    assert sum(waited) > 0, "host traffic never waited for a PIM macro command: the load did not overlap"
    mon.assert_clean()
    refs = [int(r.value) for r in mon.nref]
    assert all(r >= mon.cycle // cfg.timing.tREFI - cfg.timing.refresh_postpone for r in refs), (refs, mon.cycle)
    write_metrics(name="proto_random_load", cycles=mon.cycle, refreshes=refs, pim_wait_cycles=waited)
    dut._log.info("random load: %d cycles, host requests waited %s cycles for PIM mode, refreshes %s",
                  mon.cycle, waited, refs)


GPT2_FC = (("QKV (c_attn, head-wise)", 768, 2304, False, "heads"), ("attn proj (c_proj)", 768, 768, False, "columns"),
           ("FC1 + GELU (mlp.c_fc)", 768, 3072, True, "columns"), ("FC2 (mlp.c_proj)", 3072, 768, False, "columns"))


async def layer_program(dev, d_model, seed, timer=None, head_dim=64):
    """The FC GEMVs of one generated token of a GPT-2-shaped layer; returns per-op (name, y, x, w, b, gelu)."""
    rng = np.random.default_rng(seed)
    await dev.upload_gelu_table()
    ops = []
    for name, K, N, act, layout in GPT2_FC:
        K, N = K * d_model // 768, N * d_model // 768
        w = G.bf16_bits(rng.standard_normal((K, N)) * (0.02 if not act else 0.06))
        b = (rng.standard_normal(N) * 0.02).astype(np.float32)
        kw = dict(layout="heads", head_dim=head_dim, sections=3) if layout == "heads" else {}
        h = await dev.upload_weights(w, bias=b, **kw)
        ops.append((name, h, w, b, act))
    results = []
    x = G.bf16_bits(rng.standard_normal(d_model))
    prev = None
    for name, h, w, b, act in ops:
        if name.startswith("FC2") and prev is not None:
            x = G.bf16_bits(prev)                        # FC2 consumes FC1's GELU output
        elif x.size != h.layout.K:
            x = G.bf16_bits(rng.standard_normal(h.layout.K))
        t0 = timer() if timer else 0
        y = await dev.gemv(h, x, gelu_act=act)
        t1 = timer() if timer else 0
        results.append({"name": name, "K": h.layout.K, "N": h.n_out, "y": y.view(np.uint32).copy(), "x": x, "w": w,
                        "b": b, "gelu": act, "t0": t0, "t1": t1, "rows": h.layout.rows_used})
        prev = y if act else None
    return results


@tb_test()
async def layer_fc(dut):
    """make demo: a GPT-2-small layer's generation-step FC GEMVs through the driver, over AXI, on the RTL."""
    import json
    import os

    from firmware.pim import gelu as gelu_fn

    cfg = _cfg()
    p = cfg.pim
    d_model = env_int("D_MODEL", 768)
    mon, tr = await bring_up(dut, cfg)
    if env_int("BACKDOOR", 1):
        tr.backdoor_cfg = cfg
    dev = await D.Device.open(tr, cfg)
    def timer():
        return mon.cycle

    head_dim = env_int("HEAD_DIM", 64)
    res = await layer_program(dev, d_model, seed=1, timer=timer, head_dim=head_dim)
    fdev = await D.Device.open(D.FunctionalTransport(FunctionalDevice(cfg)), cfg)
    ref = await layer_program(fdev, d_model, seed=1, head_dim=head_dim)
    report = []
    for r, f in zip(res, ref, strict=True):
        bad = np.flatnonzero(r["y"] != f["y"])
        assert bad.size == 0, (f"{r['name']}: {bad.size} outputs differ from the functional model: RTL "
                               f"{G.bits_to_f32(r['y'][bad[:4]])} model {G.bits_to_f32(f['y'][bad[:4]])}")
        xf = G.bf16_to_f32(r["x"]).astype(np.float64)
        wf = G.bf16_to_f32(r["w"]).astype(np.float64)
        exact = xf @ wf + r["b"].astype(np.float64)
        scale = np.abs(xf) @ np.abs(wf) + np.abs(r["b"])
        bound = (4 + -(-r["K"] // 16) + 1) * 2.0**-24 * scale
        y = G.bits_to_f32(r["y"]).astype(np.float64)
        if r["gelu"]:
            step = 16.0 / p.af_segments
            bound = 1.13 * bound + 0.8 * step**2 / 8 + 2.0**-8 * 1.13 * np.abs(exact) + 1e-6
            exact = gelu_fn(exact)
        err = np.abs(y - exact)
        assert np.all(err <= bound), f"{r['name']}: error vs float64 above the bound"
        cycles = r["t1"] - r["t0"]
        wbytes = r["rows"] * p.channels * p.banks * p.row_bytes
        report.append({"name": r["name"], "shape": f"{r['K']}x{r['N']}", "cycles": cycles,
                       "weight_bytes": wbytes, "internal_gbps": wbytes / (cycles / (cfg.clocks.pim_mhz * 1e6)) / 1e9,
                       "peak_gbps": cfg.pim_peak_internal_gbps, "max_abs_err": float(err.max()),
                       "max_bound": float(bound.max())})
    counters = {}
    for c in range(p.channels):
        for i, nm in enumerate(("busy_cycles", "commands", "refreshes", "wait_cycles", "macs")):
            counters[f"ch{c}_{nm}"] = await tr.read_csr(CSR.CH_BASE + 0x20 * c + 4 * i)
    mon.assert_clean()
    out = {"config": cfg.name, "ops": report, "counters": counters, "total_cycles": mon.cycle,
           "backdoor_bytes": tr.backdoor_bytes}
    path = os.environ.get("IANUS_DEMO_OUT")
    if path:
        with open(path, "w") as f:
            json.dump(out, f)
    for r in report:
        dut._log.info("%s %s: %d cycles, %.0f GB/s internal, max err %.2e", r["name"], r["shape"], r["cycles"],
                      r["internal_gbps"], r["max_abs_err"])

