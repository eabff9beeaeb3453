"""Energy model: per-event energies (one table) applied to the performance model's event counts.

:data:`EVENTS` is the whole table: the energy of one event, its unit, and where the number comes from
or how it was derived. The performance model (:mod:`sim.perfmodel`) counts the events of every
program it times (``ProgramResult.events``); :func:`energy` turns a count dict into joules per
component. The numbers are first-order estimates for a 7 nm-class NPU next to GDDR6-AiM; they are
meant for comparing policies and stages, and every one is a parameter (``table=``).

What the counts mean (one event each):

* ``dram_acts``: a row activation by normal traffic (one bank); ``pim_acts``: bank activations of PIM
  commands (an all-bank ACTAB counts ``banks``);
* ``dram_reads`` / ``dram_writes``: 32-byte column reads / writes of normal traffic, over the
  GDDR6 interface (array access + I/O);
* ``pim_io_cols``: 32-byte columns PIM commands move over the interface (WRITE_VEC's reads,
  READ_RES's writes, WRGB, WRBIAS, RDMAC, RDAF);
* ``pim_mac_cols``: one bank reading one column into its processing unit and doing 16 BF16 MACs
  (MACAB counts ``banks`` per channel); ``pim_gb_writes``: a global-buffer column write;
  ``pim_af``: one bank's activation-function lookup + interpolation of 8 values;
* ``dram_refs``: an all-bank REF of one channel;
* ``spm_rd_bytes`` / ``spm_wr_bytes``: scratchpad bytes read / written (matrix and vector units,
  DMA);
* ``mac``: one BF16 x BF16 + FP32 MAC on the systolic array;
* ``vec_elem``: one element through one pass of the vector unit's FP32 pipeline;
* ``link_bytes``: bytes over the host / device link (PCIe 5.0 x16);
* ``sram_pim_mac``: one BF16 MAC in an SRAM-PIM macro (:mod:`hw.npu.sram_pim`: the row read, the
  multiplier, its share of the adder tree and accumulator); ``sram_pim_wr_bytes``: bytes written into
  the SRAM-PIM macros (K/V rows). Both in the ``npu`` group (the units sit beside the NPU cores).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["EVENTS", "EventEnergy", "energy", "background_w", "STATIC_W"]


@dataclass(frozen=True)
class EventEnergy:
    joules: float
    unit: str
    source: str


_pJ = 1e-12

EVENTS = {
    "dram_acts": EventEnergy(
        1.8e-9, "per bank activation (2 KB row)",
        "O'Connor et al., 'Fine-Grained DRAM', MICRO 2017, Table 1: 909 pJ per 1 KB HBM2 activation; "
        "scaled to the 2 KB GDDR6 row (the energy goes with the bits sensed)"),
    "pim_acts": EventEnergy(
        1.8e-9, "per bank activation (2 KB row)",
        "same array operation as a normal ACT (AiM activates ordinary DRAM rows)"),
    "dram_reads": EventEnergy(
        256 * 6.0 * _pJ, "per 32-byte column read",
        "GDDR6 access + I/O about 6 pJ/bit excluding activation (Micron TN-ED-04 GDDR6 design guide: "
        "~7.5 pJ/bit system energy including activation; O'Connor 2017: GDDR5 ~14 pJ/bit, "
        "of which I/O ~ 2/3)"),
    "dram_writes": EventEnergy(
        256 * 6.0 * _pJ, "per 32-byte column write", "as a read (same path, opposite direction)"),
    "pim_io_cols": EventEnergy(
        256 * 6.0 * _pJ, "per 32-byte column over the interface",
        "as a normal read/write: PIM inputs, biases and results still cross the GDDR6 interface"),
    "pim_mac_cols": EventEnergy(
        256 * 1.0 * _pJ + 16 * 1.2 * _pJ, "per bank-column MAC (256 bits + 16 BF16 MACs)",
        "bank-local column access ~1 pJ/bit (no global I/O, no interface: Newton, He et al., MICRO 2020, "
        "bank access ~1/6 of an off-chip access) + 16 BF16 MACs at ~1.2 pJ in a DRAM process "
        "(~2x a 7 nm logic MAC; SK hynix AiM, Kwon et al., ISSCC 2022)"),
    "pim_gb_writes": EventEnergy(
        256 * 1.0 * _pJ, "per global-buffer column write",
        "SRAM-like latch array write on the DRAM die ~1 pJ/bit (the data's interface transfer is in pim_io_cols)"),
    "pim_af": EventEnergy(
        8 * 2.0 * _pJ, "per bank AF (8 values: LUT read + multiply-add)", "two FP ops per value at ~1 pJ"),
    "dram_refs": EventEnergy(
        16 * 4 * 1.8e-9, "per all-bank REF of one channel",
        "a REF of an 8 Gb die refreshes ~4 rows per bank (8192 REFs per 32 ms retention period, 32K rows): "
        "16 banks x 4 activations"),
    "spm_rd_bytes": EventEnergy(
        1.0 * _pJ, "per scratchpad byte read",
        "Horowitz, ISSCC 2014 keynote: ~20 pJ per 64-bit read of a 32 KB SRAM at 45 nm (2.5 pJ/B); "
        "scaled /2.5 to 7 nm (voltage and capacitance)"),
    "spm_wr_bytes": EventEnergy(1.0 * _pJ, "per scratchpad byte written", "as a read"),
    "mac": EventEnergy(
        0.5 * _pJ, "per BF16 MAC with FP32 accumulation",
        "Horowitz 2014 at 45 nm: FP16 multiply 1.1 pJ + FP32 add 0.9 pJ; ~4x less at 7 nm"),
    "vec_elem": EventEnergy(
        1.5 * _pJ, "per element per vector-unit pass (FP32, incl. register traffic)",
        "Horowitz 2014: FP32 add 0.9 pJ, multiply 3.7 pJ at 45 nm; a pass averages about one of each, /3 at 7 nm"),
    "sram_pim_mac": EventEnergy(
        2 / 31.6e12, "per BF16 MAC in an SRAM-PIM macro (row read + multiply + add)",
        "literature figure, not scaled: Guo et al., 'A 28nm 64-kb 31.6-TFLOPS/W Digital-Domain Floating-Point-"
        "Computing-Unit and Double-Bit 6T-SRAM Computing-in-Memory Macro for Floating-Point CNNs', ISSCC 2023, "
        "paper 7.2: 31.6 TFLOPS/W with BF16 inputs, weights and outputs at macro level in 28 nm; 2 FLOPs per "
        "MAC -> 63 fJ. Left at 28 nm (a 7 nm macro would be lower) and with its BF16 output (ours accumulates "
        "in FP32, higher): both directions stated, neither applied"),
    "sram_pim_wr_bytes": EventEnergy(
        1.0 * _pJ, "per byte written into the SRAM-PIM macros", "as spm_wr_bytes (an SRAM write)"),
    "link_bytes": EventEnergy(
        8 * 5.0 * _pJ, "per byte over PCIe 5.0 x16",
        "32 GT/s SerDes ~5 pJ/bit per direction (published 32G PHYs: 4-6 pJ/bit)"),
}

STATIC_W = {
    "dram_background": (4 * 0.5, "W: 4 GDDR6 chips x ~0.5 W background (active standby, DLL, refresh logic); "
                                 "Micron GDDR6 IDD3N-class currents at 1.35 V"),
    "npu_static": (4 * 1.0, "W: 4 NPU cores x ~1 W leakage + clock tree (assumed, 7 nm, 16 MB SRAM per core)"),
}


def background_w(table=None) -> float:
    t = table or STATIC_W
    return sum(v[0] for v in t.values())


def energy(events: dict, seconds: float = 0.0, table=None, static=None) -> dict:
    """Joules per component: ``dram`` (normal traffic incl. activations and refresh), ``pim`` (MACs,
    global buffer, PIM activations and interface transfers), ``npu`` (MACs, vector unit, scratchpads),
    ``link``, ``static`` (``seconds`` x :data:`STATIC_W`) and ``total``."""
    t = table or EVENTS
    groups = {
        "dram": ("dram_acts", "dram_reads", "dram_writes", "dram_refs"),
        "pim": ("pim_acts", "pim_io_cols", "pim_mac_cols", "pim_gb_writes", "pim_af"),
        "npu": ("mac", "vec_elem", "spm_rd_bytes", "spm_wr_bytes", "sram_pim_mac", "sram_pim_wr_bytes"),
        "link": ("link_bytes",),
    }
    out = {}
    for g, keys in groups.items():
        out[g] = sum(events.get(k, 0) * t[k].joules for k in keys)
    out["static"] = seconds * background_w(static)
    out["total"] = sum(out.values())
    return out


def table_text() -> str:
    """The table as text (for the docs and ``ianus project --energy-table``)."""
    lines = [f"{'event':<14} {'energy':>10}  {'unit':<48} source"]
    for k, e in EVENTS.items():
        lines.append(f"{k:<14} {e.joules * 1e12:>8.1f}pJ  {e.unit:<48} {e.source}")
    for k, (w, src) in STATIC_W.items():
        lines.append(f"{k:<14} {w:>9.2f}W  {'static':<48} {src}")
    return "\n".join(lines)
