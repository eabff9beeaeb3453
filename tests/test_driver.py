"""Host driver + runtime on the functional device model (no simulator): GEMV, layouts, GELU, errors."""

import asyncio

import numpy as np
import pytest

from firmware import driver as D
from firmware.macro import CSR, QUEUE_DEPTH, Macro, MacroError, MacroOp, decode, encode
from firmware.pim import GemvLayout, gelu, gemv_golden
from hw.config import preset
from sim.golden import fp as G
from sim.golden.pim import af_eval
from sim.pim_model import FunctionalDevice


def run(coro):
    return asyncio.run(coro)


def open_device(config="tiny"):
    cfg = preset(config)
    fd = FunctionalDevice(cfg)
    tr = D.FunctionalTransport(fd)
    return cfg, fd, tr, run(D.Device.open(tr, cfg))


def data(rng, K, N):
    w = G.bf16_bits(rng.standard_normal((K, N)) / np.sqrt(K))
    x = G.bf16_bits(rng.standard_normal(K))
    b = (rng.standard_normal(N) * 0.1).astype(np.float32)
    return w, x, b


def test_macro_encode_roundtrip_and_limits():
    m = Macro(MacroOp.GEMV, flags=3, n=768, m=2304, row=17, addr0=0x12340, addr1=0)
    assert decode(encode(m)) == m
    with pytest.raises(ValueError, match="macro field n must fit in 16 bits"):
        encode(Macro(MacroOp.GEMV, n=1 << 16))


@pytest.mark.parametrize("config,K,N", [("tiny", 96, 40), ("tiny", 300, 24), ("default", 768, 768)])
def test_gemv_bit_exact(config, K, N):
    cfg, fd, tr, dev = open_device(config)
    w, x, b = data(np.random.default_rng(K + N), K, N)
    h = run(dev.upload_weights(w, bias=b))
    y = run(dev.gemv(h, x))
    want = gemv_golden(cfg, w, x, G.f32_bits(b))
    np.testing.assert_array_equal(y.view(np.uint32), want)
    # golden vs float64: |err| <= (log2(16) + K/16 + 1) 2^-24 (|x| |W| + |b|)
    xf, wf = G.bf16_to_f32(x).astype(np.float64), G.bf16_to_f32(w).astype(np.float64)
    exact = xf @ wf + b
    bound = (4 + -(-K // 16) + 1) * 2.0**-24 * (np.abs(xf) @ np.abs(wf) + np.abs(b))
    assert np.all(np.abs(y - exact) <= bound)


def test_heads_layout_puts_whole_heads_on_one_channel():
    cfg, fd, tr, dev = open_device("tiny")
    head_dim, heads = 8, 4
    K, N = 64, 3 * heads * head_dim                     # Q, K, V sections
    w, x, b = data(np.random.default_rng(3), K, N)
    perm = dev.plan(N, "heads", head_dim=head_dim, sections=3)
    p = cfg.pim
    for j, n in enumerate(perm):
        if n >= 0:
            channel = (j // p.banks) % p.channels
            head = (n % (heads * head_dim)) // head_dim
            assert channel == head % p.channels
    h = run(dev.upload_weights(w, bias=b, layout="heads", head_dim=head_dim, sections=3))
    y = run(dev.gemv(h, x))
    # Same values as the plain computation in the original output order (per-output arithmetic is unchanged).
    np.testing.assert_array_equal(y.view(np.uint32), gemv_golden(cfg, w, x, G.f32_bits(b)))


def test_gelu_in_pim():
    cfg, fd, tr, dev = open_device("tiny")
    run(dev.upload_gelu_table())
    w, x, b = data(np.random.default_rng(4), 128, 16)
    w = G.bf16_bits(G.bf16_to_f32(w) * 4)            # pre-activations spread over the LUT's range
    h = run(dev.upload_weights(w, bias=b))
    y = run(dev.gemv(h, x, gelu_act=True))
    pre = gemv_golden(cfg, w, x, G.f32_bits(b))
    from firmware.pim import af_lut_row

    want = af_eval(cfg, pre, af_lut_row(cfg))
    np.testing.assert_array_equal(y.view(np.uint32), want)
    xf = G.bits_to_f32(pre).astype(np.float64)
    step = 16.0 / cfg.pim.af_segments
    assert np.all(np.abs(y - gelu(xf)) <= 0.8 * step**2 / 8 + 2.0**-8 * np.abs(xf) * 1.13 + 1e-6)


def test_device_errors_are_typed_and_recoverable():
    cfg, fd, tr, dev = open_device("tiny")
    run(dev.submit(Macro(13)))
    with pytest.raises(D.BadOpcodeError, match="BAD_OPCODE"):
        run(dev.wait_idle())
    # Sticky until cleared; later commands are skipped, nothing else changes.
    run(dev.submit(Macro(MacroOp.NOP)))
    with pytest.raises(D.BadOpcodeError):
        run(dev.wait_idle())
    run(dev.clear_error())
    run(dev.wait_idle())
    cases = [
        (Macro(MacroOp.READ_RES, n=4, addr0=0), D.NoResultError),
        (Macro(MacroOp.WRITE_VEC, n=16, addr0=3), D.BadAddressError),
        (Macro(MacroOp.WRITE_VEC, n=0, addr0=0), D.BadLengthError),
        (Macro(MacroOp.WRITE_VEC, n=16, addr0=cfg.pim.total_bytes - 16), D.BadAddressError),
        (Macro(MacroOp.GEMV, n=16, m=8, row=0), D.NoInputError),
        (Macro(MacroOp.WRITE_VEC, n=16, addr0=0, flags=1), D.BadFlagsError),
        (Macro(MacroOp.NOP, addr1=5), D.ReservedNonzeroError),
    ]
    for macro, exc in cases:
        run(dev.submit(macro))
        with pytest.raises(exc):
            run(dev.wait_idle())
        run(dev.clear_error())
    run(dev.submit(Macro(MacroOp.WRITE_VEC, n=16, addr0=0)))
    run(dev.submit(Macro(MacroOp.GEMV, n=16, m=8, row=cfg.pim.data_rows)))
    with pytest.raises(D.BadRegionError):
        run(dev.wait_idle())
    run(dev.clear_error())
    # A packed GEMV (addr1 = pack | slot0 << 8) whose first slot is past the row's columns / pitch slots.
    run(dev.submit(Macro(MacroOp.GEMV, n=16, m=8, row=0, addr1=1 | cfg.pim.columns << 8)))
    with pytest.raises(D.BadPackingError, match="BAD_PACKING"):
        run(dev.wait_idle())
    run(dev.clear_error())
    # The device still works after all that.
    w, x, b = data(np.random.default_rng(5), 32, 8)
    h = run(dev.upload_weights(w, bias=b))
    np.testing.assert_array_equal(run(dev.gemv(h, x)).view(np.uint32), gemv_golden(cfg, w, x, G.f32_bits(b)))


def test_queue_overflow():
    cfg, fd, tr, dev = open_device("tiny")
    tr.stalled = True
    for _ in range(QUEUE_DEPTH + 1):
        run(dev.submit(Macro(MacroOp.NOP)))
    assert run(tr.read_csr(CSR.ERROR)) == MacroError.QUEUE_OVERFLOW
    assert run(tr.read_csr(CSR.QUEUE_LEVEL)) == QUEUE_DEPTH


def test_timeout_on_stalled_device():
    cfg, fd, tr, dev = open_device("tiny")
    tr.stalled = True
    run(dev.submit(Macro(MacroOp.NOP)))
    with pytest.raises(D.DeviceTimeout, match="still busy after 640 cycles"):
        run(dev.wait_idle(timeout_cycles=640))


def test_invalid_layout_requests():
    cfg, fd, tr, dev = open_device("tiny")
    with pytest.raises(D.LayoutError, match="K=5000 exceeds the PCU input buffer"):
        run(dev.upload_weights(np.zeros((5000, 8), np.float32)))
    with pytest.raises(D.LayoutError, match="layout must be 'columns' or 'heads', not 'rows'"):
        run(dev.upload_weights(np.zeros((16, 8), np.float32), layout="rows"))
    with pytest.raises(D.LayoutError, match="are not 3 sections of heads of 64"):
        run(dev.upload_weights(np.zeros((16, 100), np.float32), layout="heads", sections=3))
    with pytest.raises(D.LayoutError, match="needs rows"):
        run(dev.upload_weights(np.zeros((768, 768), np.float32)))
    with pytest.raises(D.LayoutError, match="bias must have shape"):
        run(dev.upload_weights(np.zeros((16, 8), np.float32), bias=np.zeros(7)))
    with pytest.raises(D.LayoutError, match="weights must be a 2-D"):
        run(dev.upload_weights(np.zeros(16, np.float32)))
    with pytest.raises(D.LayoutError, match="allocation size must be a positive integer"):
        dev.alloc(0)
    with pytest.raises(D.LayoutError, match="out of device memory"):
        dev.alloc(cfg.pim.total_bytes)


def test_weights_roundtrip_through_memory_image():
    """What the driver writes through the memory window is what GemvLayout.pack describes."""
    cfg, fd, tr, dev = open_device("tiny")
    w = np.random.default_rng(6).integers(0, 1 << 16, (200, 24), dtype=np.uint16)
    h = run(dev.upload_weights(w))
    assert h.layout == GemvLayout(cfg, 200, 24, base_row=0)
    np.testing.assert_array_equal(fd.weights(h.layout), w)
