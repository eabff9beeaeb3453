"""Host driver on bad arguments (issue 21): a DriverError (a ValueError) naming the value and the limit, never a
built-in IndexError / ZeroDivisionError / TypeError; NaN / complex data refused; no buffer leaks when a GEMV or
an upload fails; a device whose ID or GEOMETRY register does not match the configuration refused at open.

The last tests fuzz every driver entry point with hypothesis (settings in tests/fuzz_profiles.py): any call
returns or raises one of the driver's documented errors, and a failed call leaves the allocations as they were.
"""

import asyncio

import numpy as np
import pytest
from fuzz_profiles import FAST, LONG, SEED, SEED_NOTE
from hypothesis import given, note, seed
from hypothesis import strategies as st

from firmware import driver as D
from firmware.macro import CSR
from firmware.pim import gemv_golden
from hw.config import preset
from sim.golden import fp as G
from sim.pim_model import FunctionalDevice

CFG = preset("tiny")
P = CFG.pim


def run(coro):
    return asyncio.run(coro)


def open_device(cfg=CFG):
    tr = D.FunctionalTransport(FunctionalDevice(cfg))
    return tr, run(D.Device.open(tr, cfg))


def state(dev):
    return dev.next_weight_row, dev.next_data_row


@pytest.mark.parametrize("call, message", [
    (lambda d: d.write(P.total_bytes, bytes(32)), "32 bytes at 0x10000 run past the end of device memory"),
    (lambda d: d.write(P.total_bytes - 32, bytes(64)), "run past the end of device memory (0x10000 bytes)"),
    (lambda d: d.write(-32, bytes(32)), "address -0x20 must be a non-negative multiple of the 32-byte column"),
    (lambda d: d.write(16, bytes(32)), "address 0x10 must be a non-negative multiple of the 32-byte column"),
    (lambda d: d.write(0.0, bytes(32)), "address must be an integer byte address, not 0.0"),
    (lambda d: d.write(True, bytes(32)), "address must be an integer byte address, not True"),
    (lambda d: d.write(0, "text"), "data must be bytes-like, not str"),
    (lambda d: d.read(1e3, 32), "address must be an integer byte address, not 1000.0"),
    (lambda d: d.read(0, -1), "n must be an integer >= 0, not -1"),
    (lambda d: d.read(0, 2.5), "n must be an integer >= 0, not 2.5"),
    (lambda d: d.read(P.total_bytes - 32, 64), "run past the end of device memory"),
], ids=range(11))
def test_memory_access_errors(call, message):
    _, dev = open_device()
    with pytest.raises(D.DriverError, match=message.replace("(", r"\(").replace(")", r"\)")):
        run(call(dev))


def test_plan_errors():
    _, dev = open_device()
    with pytest.raises(D.DriverError, match="sections must be an integer >= 1, not 0"):
        dev.plan(96, "heads", head_dim=16, sections=0)
    with pytest.raises(D.DriverError, match="head_dim must be an integer >= 1, not 0"):
        dev.plan(96, "heads", head_dim=0)
    with pytest.raises(D.DriverError, match="head_dim must be an integer >= 1, not 16.0"):
        dev.plan(96, "heads", head_dim=16.0)
    with pytest.raises(D.DriverError, match="n_out must be an integer >= 1, not 0"):
        dev.plan(0)
    # found by the long fuzzing run (seed 4242): plan(2**40) allocated an index array of 2**40 entries
    with pytest.raises(D.LayoutError, match="N=1099511627776 exceeds the PCU result buffer"):
        dev.plan(1 << 40)
    with pytest.raises(D.LayoutError, match="exceeds the PCU result buffer"):
        dev.plan(1 << 40, "heads", head_dim=1 << 39, sections=2)
    assert issubclass(D.DriverError, ValueError) and issubclass(D.LayoutError, D.DriverError)


def test_data_errors():
    _, dev = open_device()
    w = np.random.default_rng(0).standard_normal((32, 16)).astype(np.float32)
    bad = w.copy()
    bad[3, 4] = np.nan
    before = state(dev)
    with pytest.raises(D.DriverError, match=r"weights has 1 NaN/Inf value\(s\) \(as float32\), the first at \[3, 4\]"):
        run(dev.upload_weights(bad))
    with pytest.raises(D.DriverError, match="weights must be a float array .* not dtype int8"):
        run(dev.upload_weights(w.astype(np.int8)))
    with pytest.raises(D.DriverError, match="weights must be a float array .* not dtype complex64"):
        run(dev.upload_weights(w.astype(np.complex64)))
    with pytest.raises(D.DriverError, match="weights has 1 NaN/Inf"):
        run(dev.upload_weights(np.where(w > 5, w, np.float64(1e300))[:1, :1]))     # overflows float32
    with pytest.raises(D.DriverError, match=r"bias has 1 NaN/Inf value\(s\)"):
        run(dev.upload_weights(w, bias=np.where(np.arange(16) == 2, np.inf, 0.0)))
    with pytest.raises(D.DriverError, match="bias must be a float array .* not dtype int64"):
        run(dev.upload_weights(w, bias=np.arange(16)))
    assert state(dev) == before, "nothing allocated by refused uploads"
    h = run(dev.upload_weights(w))
    x = np.random.default_rng(1).standard_normal(32)
    with pytest.raises(D.DriverError, match="x must be a float array .* not dtype complex128"):
        run(dev.gemv(h, x + 1j))
    with pytest.raises(D.DriverError, match=r"x has 1 NaN/Inf value\(s\) \(as float32\), the first at \[7\]"):
        run(dev.gemv(h, np.where(np.arange(32) == 7, np.nan, x)))
    with pytest.raises(D.DriverError, match="timeout_cycles must be an integer >= 1, not 0"):
        run(dev.gemv(h, x, timeout_cycles=0))
    with pytest.raises(D.DriverError, match="address 0x8 must be a non-negative multiple"):
        run(dev.gemv(h, x, out_addr=8))
    with pytest.raises(D.DriverError, match="handle must be a WeightHandle"):
        run(dev.gemv("h", x))
    y = run(dev.gemv(h, x))
    np.testing.assert_array_equal(y.view(np.uint32), gemv_golden(CFG, G.bf16_bits(w), G.bf16_bits(x)))


def test_failed_gemvs_do_not_leak_buffers():
    tr, dev = open_device()
    w = G.bf16_bits(np.random.default_rng(2).standard_normal((64, 16)))
    x = G.bf16_bits(np.random.default_rng(3).standard_normal(64))
    h = run(dev.upload_weights(w))
    rows = dev.allocated_data_rows
    tr.stalled = True
    for _ in range(3):                                  # the device never finishes: timeouts
        with pytest.raises(D.DeviceTimeout):
            run(dev.gemv(h, x, timeout_cycles=64))
        assert dev.allocated_data_rows == rows
        tr.device.queue.clear()                         # what a reset of the stuck device would do
    tr.stalled = False
    broken = D.WeightHandle(h.layout, h.perm, h.n_out, bias_addr=3)
    for _ in range(3):                                  # the device reports an error (a misaligned bias address)
        with pytest.raises(D.BadAddressError):
            run(dev.gemv(broken, x))
        run(dev.clear_error())
        assert dev.allocated_data_rows == rows
    np.testing.assert_array_equal(run(dev.gemv(h, x)).view(np.uint32), gemv_golden(CFG, w, x))
    assert dev.allocated_data_rows == rows


def test_failed_upload_does_not_leak():
    _, dev = open_device()
    w = np.zeros((16, 16), np.float32)
    while True:                                          # fill the data rows
        try:
            dev.alloc(dev.row_span)
        except D.LayoutError:
            break
    before = state(dev)
    with pytest.raises(D.LayoutError, match="out of device memory"):
        run(dev.upload_weights(w, bias=np.zeros(16, np.float32)))   # weights fit, the bias buffer does not
    assert state(dev) == before


def test_open_checks_the_device():
    tr = D.FunctionalTransport(FunctionalDevice(CFG))
    with pytest.raises(D.DeviceMismatchError, match=r"the device's geometry is not configuration 'default''s: "
                                                    r"banks_log2 3 \(configuration 'default': 4\), rows_log2 4 "):
        run(D.Device.open(tr, preset("default")))
    run(D.Device.open(tr, CFG))

    class OtherId(D.FunctionalTransport):
        async def read_csr(self, off):
            return 0x12345678 if off == CSR.ID else await super().read_csr(off)

    with pytest.raises(D.DeviceMismatchError, match="unexpected device id 0x12345678"):
        run(D.Device.open(OtherId(FunctionalDevice(CFG)), CFG))
    with pytest.raises(D.DriverError, match="cfg must be a SystemConfig"):
        run(D.Device.open(tr, "tiny"))


# -- hypothesis: every entry point with arbitrary arguments ------------------------------------------------------

ALLOWED = (D.DriverError, D.PimError, D.DeviceTimeout)
junk = st.one_of(st.none(), st.booleans(), st.floats(allow_nan=True), st.text(max_size=3),
                 st.integers(-(1 << 40), 1 << 40), st.just(np.int64(64)), st.just(object()))
addresses = st.one_of(st.integers(-64, P.total_bytes + 64).map(lambda a: a - a % 32 if a % 3 else a), junk)
DTYPES = ["float32", "float64", "float16", "bfloat16", "uint16", "int8", "int32", "bool", "complex64"]


@st.composite
def arrays(draw, shape):
    dtype = draw(st.sampled_from(DTYPES))
    rng = np.random.default_rng(draw(st.integers(0, 1 << 30)))
    a = rng.standard_normal(shape) * draw(st.sampled_from([0.1, 1.0, 1e30, 1e300]))
    if a.size and draw(st.integers(0, 4)) == 0:
        a.flat[draw(st.integers(0, a.size - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    if dtype == "uint16":
        return rng.integers(0, 1 << 16, shape).astype(np.uint16)
    if dtype == "bfloat16":
        import ml_dtypes
        with np.errstate(over="ignore", invalid="ignore"):
            return a.astype(ml_dtypes.bfloat16)
    with np.errstate(over="ignore", invalid="ignore"):
        return a.astype(dtype)


shapes = st.one_of(st.tuples(st.integers(0, 70), st.integers(0, 40)), st.tuples(st.integers(0, 40)),
                   st.tuples(st.integers(1, 5), st.integers(1, 5), st.integers(1, 3)))


@st.composite
def calls(draw):
    """(name, coroutine-or-call factory taking the device)."""
    kind = draw(st.sampled_from(["write", "read", "alloc", "plan", "upload", "gemv"]))
    if kind == "write":
        addr, data = draw(addresses), draw(st.one_of(st.binary(max_size=200), junk))
        return kind, lambda d: d.write(addr, data)
    if kind == "read":
        addr, n = draw(addresses), draw(st.one_of(st.integers(-8, 400), junk))
        return kind, lambda d: d.read(addr, n)
    if kind == "alloc":
        n = draw(st.one_of(st.integers(-8, P.total_bytes), junk))
        return kind, lambda d: d.alloc(n)
    if kind == "plan":
        args = (draw(st.one_of(st.integers(-2, 200), junk)), draw(st.sampled_from(["columns", "heads", "rows", 3])),
                draw(st.one_of(st.integers(-2, 40), junk)), draw(st.one_of(st.integers(-2, 4), junk)))
        return kind, lambda d: d.plan(*args)
    if kind == "upload":
        w = draw(arrays(draw(shapes)))
        bias = draw(st.one_of(st.none(), arrays((w.shape[-1] if w.ndim else 1,)), junk))
        layout = draw(st.sampled_from(["columns", "heads", "rows"]))
        hd, sec = draw(st.one_of(st.integers(-1, 20), junk)), draw(st.one_of(st.integers(-1, 4), junk))
        return kind, lambda d: d.upload_weights(w, bias=bias, layout=layout, head_dim=hd, sections=sec)
    K = draw(st.integers(1, 64))
    x = draw(st.one_of(arrays((K,)), arrays(draw(shapes)), junk))
    gelu = draw(st.booleans())
    timeout = draw(st.one_of(st.integers(-1, 10_000), junk))
    out_addr = draw(st.one_of(st.none(), addresses))

    async def go(d):
        h = await d.upload_weights(np.ones((K, 8), np.float32))
        return await d.gemv(h, x, gelu_act=gelu, timeout_cycles=timeout, out_addr=out_addr)
    return kind, go


def check_call(kind, call):
    tr, dev = open_device()
    before = state(dev)
    try:
        out = call(dev)
        if asyncio.iscoroutine(out):
            out = run(out)
    except ALLOWED as e:
        assert str(e), "an error names the problem"
        if kind != "gemv":                                   # gemv's own upload stays (it succeeded)
            assert state(dev) == before, f"a failed {kind} changed the allocations"
        else:
            assert dev.next_data_row == before[1], "a failed gemv leaked buffers"
        return
    if kind == "gemv":
        assert out.dtype == np.float32 and out.shape == (8,)
        assert dev.next_data_row == before[1]


@FAST
@given(calls())
def test_driver_arguments_fuzz(kind_call):
    check_call(*kind_call)


@pytest.mark.long
@LONG
@seed(SEED)
@given(calls())
def test_driver_arguments_fuzz_long(kind_call):
    note(SEED_NOTE)
    check_call(*kind_call)
