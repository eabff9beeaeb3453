"""Unified memory controller (hw/memctrl.py) on Verilator, one controller per channel driving the PIM device.

Every cocotb test runs the independent protocol checker on each controller's
command bus and requires the device's violation flags to stay clean; see
sim/tb/memctrl_tb.py.
"""

import pytest

from hw.config import preset
from hw.memctrl import MemCtrlSystem, MemoryController
from hw.pim import device_factory, device_sources
from sim.build import build

TB = "sim.tb.memctrl_tb"


def system_build(config: str, arbitration: str = "pim_first"):
    cfg = preset(config)
    return build(lambda: MemCtrlSystem(cfg, device_factory(cfg), arbitration=arbitration),
                 name=f"memctrl_system_{config}_{arbitration}", key=f"{cfg!r} {arbitration}",
                 extra_sources=tuple(device_sources(cfg)), no_inline=("pim_bank_*",))


def run(config, testcase, arbitration="pim_first", **env):
    return system_build(config, arbitration).run(TB, testcase, env={"IANUS_CONFIG": config, **env})


# -p4: the registered FR-FCFS pick (PimGeometry.pick_stages = 1, issue 15) with the pipelined processing unit
# (tiny-p4's random traffic, GEMV and refresh runs are in tests/test_pim_pipelined.py)
@pytest.mark.parametrize("config", ["tiny", "tiny-dualrb", "tiny-dualrb-p4"])
def test_random_traffic_tiny(config):
    run(config, "random_traffic")


@pytest.mark.parametrize("config", ["tiny", "tiny-p4"])
def test_error_responses_tiny(config):
    run(config, "error_responses")


@pytest.mark.parametrize("config", ["tiny", "tiny-p4"])
def test_fr_fcfs_order_tiny(config):
    run(config, "fr_fcfs_order")


def test_pim_gemv_with_queued_traffic_tiny():
    run("tiny", "pim_gemv", GEMV_SHAPE="200x24")


def test_registered_pick_keeps_full_rate(tmp_path):
    """Streams of reads from open rows (one row's columns, one column per bank) with the registered pick
    (tiny-p4): a column command every tCCD cycles (the testbench asserts every gap); the pick costs one cycle
    of latency (a request to an idle controller: its ACT one cycle later than on tiny)."""
    import json

    m = {}
    for config, full_rate in (("tiny", 0), ("tiny-p4", 1)):
        path = tmp_path / f"{config}.jsonl"
        run(config, "stream_reads", IANUS_METRICS=str(path), FULL_RATE=full_rate)
        m[config] = json.loads(path.read_text().splitlines()[-1])
    assert m["tiny-p4"]["first_act"] == m["tiny"]["first_act"] + 1, m


@pytest.mark.parametrize("config, arbitration", [("tiny-dualrb", "pim_first"), ("tiny-dualrb", "normal_first"),
                                                 ("tiny-dualrb", "fair"), ("tiny-dualrb-p4", "pim_first"),
                                                 ("tiny-dualrb-p4", "fair")])
def test_pim_gemv_beside_normal_traffic_dual_row_buffers(config, arbitration):
    # Two row buffers: normal reads and writes are served while the GEMV streams, bit-exact, nothing lost.
    run(config, "pim_gemv", arbitration, GEMV_SHAPE="200x24", N_NORMAL=120)


@pytest.mark.parametrize("bad, message", [
    (dict(queue_depth=0), "Queue depth must be an integer in \\[1, 64\\], not 0"),
    (dict(queue_depth="8"), "Queue depth must be an integer"),
    (dict(starve_limit=0), "Starvation limit must be a positive integer, not 0"),
    (dict(arbitration="random"), "Arbitration must be one of pim_first, normal_first, fair, not 'random'"),
])
def test_parameter_checks(bad, message):
    with pytest.raises(ValueError, match=message):
        MemoryController(preset("tiny"), **bad)


def test_timing_checks():
    cfg = preset("tiny")
    with pytest.raises(ValueError, match="refresh_postpone must be at least 1"):
        MemoryController(cfg.replace(**{"timing.refresh_postpone": 0}))
    with pytest.raises(ValueError, match="tREFI must exceed"):
        MemoryController(cfg.replace(**{"timing.tREFI": 20}))
    with pytest.raises(TypeError, match="SystemConfig"):
        MemoryController("tiny")


@pytest.mark.parametrize("config, limits", [("tiny", dict(MAX_SHARE=0.0)),
                                            ("tiny-dualrb", dict(MIN_SHARE=0.3, MAX_SLOWDOWN=0.25)),
                                            ("tiny-dualrb-p4", dict(MIN_SHARE=0.3, MAX_SLOWDOWN=0.25))])
def test_dualrb_concurrency_tiny(config, limits):
    # Reads beside a GEMV: with one row buffer they wait for all of it (share 0), with two they keep a share
    # of their bandwidth and the GEMV stays within 25 % of its time alone (cycle counts are deterministic).
    run(config, "dualrb_concurrency", GEMV_SHAPE="96x64", N_READS=400, **limits)


@pytest.mark.parametrize("config", ["tiny", "tiny-dualrb", "tiny-dualrb-p4"])
def test_pim_refresh_reopen_tiny(config):
    run(config, "pim_refresh_reopen")


@pytest.mark.long          # a 5-minute Verilator build of its own; the tiny tests cover the same logic
def test_random_traffic_default():
    # Paper timings (tRCDRD 36, tRP 30, tREFI 1900, tRFC 210), 16 banks: forced refreshes under saturation.
    run("default", "random_traffic", N_REQ=400)


@pytest.mark.long
def test_pim_gemv_with_queued_traffic_default():
    run("default", "pim_gemv", GEMV_SHAPE="768x64")
