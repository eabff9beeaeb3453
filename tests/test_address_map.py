"""The device address map (hw.memif.AddressMap, issue 14): Row-Channel-Bank-Column and the channel-interleaved
Row-Bank-ColumnHigh-Channel-ColumnLow map, in Python and in RTL, and the places that must follow it."""

import numpy as np
import pytest
from amaranth.hdl import Module, Signal
from amaranth.sim import Simulator
from hypothesis import given, settings
from hypothesis import strategies as st

from hw.config import ConfigError, PimGeometry, preset
from hw.memif import AddressMap


def _cfg(name, il):
    return preset(name).replace(**{"pim.channel_interleave": il})


def _interleaves(p):
    """0 and every power of two from one column to one row."""
    out, v = [0], p.column_bytes
    while v <= p.row_bytes:
        out.append(v)
        v *= 2
    return out


GEOMS = [(name, il) for name in ("tiny", "default", "ianus") for il in _interleaves(preset(name).pim)]


@pytest.mark.parametrize("name,il", GEOMS)
def test_round_trip_edges(name, il):
    p = _cfg(name, il).pim
    a = AddressMap(p)
    assert a.bits == p.addr_bits
    for row in (0, 1, p.rows - 1):
        for ch in (0, p.channels - 1):
            for bank in (0, 1, p.banks - 1):
                for col in (0, 1, p.interleave_columns - 1, p.columns - 1):
                    x = a.encode(row, ch, bank, col)
                    assert 0 <= x < p.total_bytes and x % p.column_bytes == 0
                    assert a.decode(x) == (row, ch, bank, col)
    assert a.encode(p.rows - 1, p.channels - 1, p.banks - 1, p.columns - 1) == p.total_bytes - p.column_bytes
    with pytest.raises(ValueError, match="outside"):
        a.decode(p.total_bytes)
    with pytest.raises(ValueError, match="aligned"):
        a.decode(p.column_bytes // 2)
    with pytest.raises(ValueError, match="bank"):
        a.encode(0, 0, p.banks, 0)
    # a row index (all channels and banks) is the same contiguous block in every map
    span = p.channels * p.banks * p.row_bytes
    assert a.encode(3, 0, 0, 0) == 3 * span


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(GEOMS), st.data())
def test_round_trip_property(geom, data):
    p = _cfg(*geom).pim
    a = AddressMap(p)
    word = data.draw(st.integers(0, p.total_bytes // p.column_bytes - 1))
    fields = a.decode(word * p.column_bytes)
    assert a.encode(*fields) == word * p.column_bytes


@pytest.mark.parametrize("name", ["tiny", "default"])
@pytest.mark.parametrize("il_kind", ["zero", "column", "mid", "row"])
def test_bijective_and_rows_pack(name, il_kind):
    """Every column of device memory has exactly one address; unpack_rows / pack_rows agree with encode."""
    base = preset(name).pim
    il = {"zero": 0, "column": base.column_bytes, "mid": base.column_bytes * 4, "row": base.row_bytes}[il_kind]
    p = _cfg(name, il).pim
    a = AddressMap(p)
    rows = 2 if name == "default" else p.rows
    n = rows * p.channels * p.banks * p.columns
    idx = np.arange(n)
    r, rem = np.divmod(idx, p.channels * p.banks * p.columns)
    c, rem = np.divmod(rem, p.banks * p.columns)
    b, col = np.divmod(rem, p.columns)
    addrs = np.array([a.encode(int(r[i]), int(c[i]), int(b[i]), int(col[i])) for i in range(n)])
    assert len(set(addrs.tolist())) == n and addrs.max() < rows * p.channels * p.banks * p.row_bytes
    flat = np.arange(n * p.lanes, dtype=np.uint32)       # element e = lane (e % lanes) of word e // lanes
    v = a.unpack_rows(flat, rows)
    assert v.shape == (rows, p.channels, p.banks, p.columns, p.lanes)
    assert np.array_equal(v[..., 0].reshape(-1) // p.lanes, addrs // p.column_bytes)
    assert np.array_equal(a.pack_rows(v), flat)


@pytest.mark.parametrize("bad", [1, 16, 48, 3 * 32, 4096, -32, 32.0, True])
def test_invalid_interleave(bad):
    with pytest.raises(ConfigError, match="channel_interleave"):
        PimGeometry(channels=2, banks=16, rows=64, columns=64, channel_interleave=bad)


def test_valid_interleave_range():
    for il in (0, 32, 64, 1024, 2048):
        assert PimGeometry(channels=2, banks=16, rows=64, columns=64, channel_interleave=il).channel_interleave == il


@pytest.mark.parametrize("name,il", [g for g in GEOMS if g[0] != "ianus"] + [("ianus", 0), ("ianus", 256),
                                                                              ("ianus", 2048)])
def test_rtl_matches_python_amaranth_sim(name, il):
    """rtl_fields of an address equal decode; rtl_encode of fields equals encode (random and edge words)."""
    p = _cfg(name, il).pim
    a = AddressMap(p)
    m = Module()
    addr = Signal(p.addr_bits)
    f = a.rtl_fields(addr)
    outs = {k: Signal(max(1, len(v)), name=k) for k, v in f.items()}
    for k, v in f.items():
        m.d.comb += outs[k].eq(v)
    ins = {k: Signal(max(1, bits), name=f"in_{k}") for k, bits in (
        ("row", p.row_addr_bits), ("channel", p.channel_addr_bits), ("bank", p.bank_addr_bits),
        ("column", p.column_addr_bits))}
    enc = Signal(p.addr_bits)
    m.d.comb += enc.eq(a.rtl_encode(ins["row"], ins["channel"], ins["bank"], ins["column"]))
    rng = np.random.default_rng(il + len(name))
    words = p.total_bytes // p.column_bytes
    samples = [0, 1, words - 1, p.interleave_columns, p.columns, p.columns * p.channels] + \
        [int(x) for x in rng.integers(0, words, 200)]
    bad = []

    async def bench(ctx):
        for w in samples:
            x = (w % words) * p.column_bytes
            ctx.set(addr, x)
            fields = a.decode(x)
            got = tuple(ctx.get(outs[k]) for k in ("row", "channel", "bank", "column"))
            if got != fields or ctx.get(outs["misaligned"]):
                bad.append(("fields", x, got, fields))
            for k, v in zip(("row", "channel", "bank", "column"), fields, strict=True):
                ctx.set(ins[k], v)
            if ctx.get(enc) != x:
                bad.append(("encode", x, ctx.get(enc)))
        if p.column_bytes > 1:
            ctx.set(addr, 1)
            if not ctx.get(outs["misaligned"]):
                bad.append(("misaligned", 1))

    sim = Simulator(m)
    sim.add_testbench(bench)
    sim.run()
    assert not bad, bad[:5]


@pytest.mark.parametrize("name", ["tiny", "default", "ianus"])
def test_dma_stream_spreads_over_channels(name):
    """N consecutive columns: with an interleave every channel gets N / channels of them, in runs of
    interleave bytes; Row-Channel-Bank-Column keeps the first banks x columns in one channel."""
    base = preset(name).pim
    n = base.channels * base.row_bytes // base.column_bytes          # one row's worth per channel
    for il in _interleaves(base)[1:]:
        p = _cfg(name, il).pim
        a = AddressMap(p)
        base_addr = (p.rows // 2) * p.channels * p.banks * p.row_bytes + p.channels * p.row_bytes
        chans = [a.decode(base_addr + j * p.column_bytes)[1] for j in range(n)]
        counts = np.bincount(chans, minlength=p.channels)
        assert (counts == n // p.channels).all(), (il, counts)
        run = il // p.column_bytes
        assert all(chans[j] == (j // run) % p.channels for j in range(n))
        # each channel's share is whole DRAM rows: one (bank, row) per channel for the first channels x row bytes
        opened = {a.decode(base_addr + j * p.column_bytes)[:3] for j in range(n)}
        assert len(opened) == p.channels
    a0 = AddressMap(_cfg(name, 0).pim)
    chans = {a0.decode(j * base.column_bytes)[1] for j in range(base.banks * base.columns)}
    assert chans == {0}


@pytest.mark.parametrize("il", [0, 64, 256, 2048])
def test_perfmodel_follows_the_map(il):
    """sim.perfmodel.Memory.where (its hot-path arithmetic) equals AddressMap.decode; npu-mem's own
    interleave overrides the geometry's."""
    import dataclasses

    from sim.perfmodel import Calib, Memory, micro_for

    cfg = _cfg("default", il)
    p = cfg.pim
    a = AddressMap(p)
    mem = Memory(cfg, micro_for(cfg), Calib())
    rng = np.random.default_rng(il)
    for w in [0, 1, 63, 64, 127, 128, 4095] + [int(x) for x in rng.integers(0, p.total_bytes // 32, 500)]:
        r, c, b, _col = a.decode(w * 32)
        assert mem.where(w * 32) == (c, b, r)
    mem256 = Memory(cfg, dataclasses.replace(micro_for(cfg), interleave=256), Calib())
    a256 = AddressMap(p.__class__(**{**dataclasses.asdict(p), "channel_interleave": 256}))
    for w in (0, 8, 9, 100, 5000):
        r, c, b, _col = a256.decode(w * 32)
        assert mem256.where(w * 32) == (c, b, r)


@pytest.mark.parametrize("il", [32, 64, 256])
def test_memory_image_rows_follow_the_map(il):
    """MemoryImage.rows / set_rows (weights, AF table, back-door files) put word (row, ch, bank, col) at
    encode(row, ch, bank, col)."""
    from firmware.memimage import MemoryImage

    cfg = _cfg("tiny", il)
    p = cfg.pim
    img = MemoryImage(cfg)
    rng = np.random.default_rng(il)
    rows = rng.integers(0, 1 << 16, (3, p.channels, p.banks, p.columns, p.lanes)).astype(np.uint16)
    img.set_rows(2, rows)
    a = AddressMap(p)
    for r, c, b, col in [(0, 0, 0, 0), (1, 1, 3, 5), (2, 1, 7, 7), (2, 0, 4, 2)]:
        got = np.frombuffer(img.read(a.encode(2 + r, c, b, col), p.column_bytes), dtype="<u2")
        assert np.array_equal(got, rows[r, c, b, col])
    assert np.array_equal(img.rows(2, 3), rows)


@pytest.mark.parametrize("config,base,prefill,generate", [("tiny-il", "tiny", 8, 2), ("default-il", "default", 4, 1)])
def test_interleaved_layer_matches_row_channel_bank_column(config, base, prefill, generate):
    """The same GPT-2 layer compiled for the channel-interleaved map and for Row-Channel-Bank-Column gives
    the same output bits on the functional model (weights, KV cache and activations only move; the matrix
    unit's per-channel loads of the PIM layout and the PCU's GEMVs add in the same order)."""
    from firmware.runtime import Job, read_outputs
    from sim.run import prepare
    from sim.soc_model import run_job

    outs = {}
    for name in (config, base):
        for policy in ("ianus", "npu-mem"):
            cm, job, _, _ = prepare(name, policy, 1, prefill, generate)
            m = run_job(Job(job.compiled, job.image, job.programs))
            outs[(name, policy)] = read_outputs(cm, m.read)
    for policy in ("ianus", "npu-mem"):
        a, b = outs[(config, policy)], outs[(base, policy)]
        assert np.array_equal(a.view(np.uint32), b.view(np.uint32)), policy
