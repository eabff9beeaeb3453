"""Fault injection on the tiny SoC RTL (issue 21), with the differential fuzzer's machinery.

* CLEAR in the middle of a program (1..400 cycles after START): the SoC must become idle, and every later
  program must be bit-exact with the functional model (which never ran the CLEARed program).
* Back-pressure on every AXI channel of the host ports (cocotbext-axi pause generators): bit-exact.
* AXI errors while programs run (bursts across the end of memory, outside it, misaligned): SLVERR,
  nothing written, the programs bit-exact.
* Refresh pressure at its limit (tREFI at the refresh machine's minimum): bit-exact, no violation.

Every failure names ``seed S case I``.
"""

from sim import diff_fuzz as D


def _run(seed, n, **kw):
    cases, mism, stats = D.run_batch(seed, n, **kw)
    print(f"seed {seed}: {stats}")
    assert len(cases) == n
    assert not mism, f"{len(mism)} mismatches:\n" + "\n".join(str(m) for m in mism[:20])
    return cases, stats


def test_clear_mid_program_then_bit_exact():
    """Every third program (PIM GEMVs and matrix-unit GEMMs) is CLEARed a random number of cycles after
    its START; the units go idle and the programs after it are bit-exact."""
    cases, stats = _run(31, 30, units=("pim", "mu"), abort_every=3, test_name="faults_clear")
    assert sum(c.abort is not None for c in cases) == 10


def test_axi_backpressure_bit_exact():
    """Pauses on the AW, W, B, AR and R channels of the AXI4 window and the AXI4-Lite registers (30 % of
    the cycles), host reads while programs run: bit-exact. (A transfer once hung here: on SocSim the bus
    models read the handshake after the design had evaluated the edge; SocSim now registers the SoC's bus
    outputs for them.) The testbench's step time-outs turn a hang into a failure naming the transfer."""
    _run(32, 3, pause_pct=30, test_name="faults_backpressure")


def test_axi_errors_mid_program_then_bit_exact():
    """While every program runs, 1-3 host bursts that must fail (across the end of device memory, wholly
    outside it, misaligned inside a live output region) answer SLVERR and write nothing (the whole of
    device memory is compared after the last case); every program stays bit-exact. Every third program
    is also CLEARed mid-way."""
    cases, stats = _run(33, 24, axi_errors=True, abort_every=3, test_name="faults_axi_errors")
    assert sum(len(c.bad) for c in cases) >= 24


def test_refresh_at_its_limit_bit_exact():
    """tREFI at the memory controller's minimum and one postponable REF (sim.diff_fuzz.refresh_limit_config):
    refresh is forced in the middle of GEMVs, GEMMs and vector work; every program bit-exact and the protocol
    checker clean. The checker flags a channel that goes tREFI * 2 cycles without REF, so a clean run of
    over 100 tREFI means over 50 REFs per channel."""
    c = D.refresh_limit_config()
    assert c.timing.tREFI < 40 and c.timing.refresh_postpone == 1
    cases, stats = _run(34, 20, config=c, test_name="faults_refresh")
    assert stats["rtl_cycles"] // c.timing.tREFI > 100
