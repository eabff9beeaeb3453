"""`make verilog`: the generated Verilog of the major blocks passes `verilator --lint-only -Wall` with only the
waivers of hw/verilog/lint_waivers.vlt (tiny blocks here; `make verilog` lints the default ones too)."""

import subprocess

import pytest

from hw.blocks import write_block
from hw.gen import LINT_WAIVERS, lint


@pytest.mark.parametrize("block", ["mac16", "matrix_unit_tiny", "vector_unit_tiny", "pim_device_tiny", "soc_tiny"])
def test_block_lint_clean(block):
    path = write_block(block)
    assert lint(path, block) == []


def test_blkseq_waiver_only_covers_the_storage_back_door():
    """Without the waiver file, the only BLKSEQ warnings are the back door's temporaries (file name, segment
    header and counts of the $fread loader), all inside its simulation-only `ifndef SYNTHESIS block."""
    path = write_block("pim_device_tiny")
    proc = subprocess.run(["verilator", "--lint-only", "-Wall", "-Wno-WIDTH", "-Wno-UNUSEDSIGNAL", "-Wno-DECLFILENAME",
                           "-Wno-CASEINCOMPLETE", str(path), "--top-module", "pim_device_tiny"],
                          capture_output=True, text=True)
    blkseq = [line for line in proc.stderr.splitlines() if line.startswith("%Warning-BLKSEQ")]
    assert blkseq, "the back door no longer needs the BLKSEQ waiver: remove it from " + LINT_WAIVERS.name
    text = path.read_text().splitlines()
    start = next(i for i, line in enumerate(text) if "module pim_storage" in line)
    begin = next(i for i in range(start, len(text)) if text[i].strip() == "`ifndef SYNTHESIS")
    end = next(i for i in range(begin, len(text)) if text[i].strip() == "`endif")
    temporaries = ("fname", "got", "more", "seg_start", "seg_count")
    for w in blkseq:
        line_no = int(w.split(":")[2])
        assert begin < line_no - 1 < end, w
        assert any(t in text[line_no - 1] for t in temporaries), w
