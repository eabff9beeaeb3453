"""The preset configurations (:data:`PRESETS`, :func:`preset`): ``tiny``, ``default`` and ``ianus`` (described in
:mod:`hw.spec.config`) and their variants (dual row buffers, channel interleave, 4 channels, the SRAM-PIM
unit, the low-precision and the pipelined processing units, NeuPIMs' system)."""

from __future__ import annotations

import dataclasses

from .config import (
    TIMING_NS_IANUS,
    Clocks,
    ConfigError,
    DramTiming,
    NpuConfig,
    PimGeometry,
    SramPimConfig,
    SystemConfig,
    timing_from_ns,
)
from .pipeline import mac_depth

__all__ = ["PRESETS", "preset"]


def _tiny() -> SystemConfig:
    return SystemConfig(
        name="tiny",
        pim=PimGeometry(channels=2, banks=8, rows=16, columns=8, lanes=16, column_bits=256,
                        gb_bytes=256, af_rows=1),
        timing=DramTiming(tRCDRD=4, tRCDWR=3, tRP=4, tRAS=6, tCCD=1, tRRD=1, tFAW=4, tWR=4,
                          tRTP=2, tRFC=12, tREFI=300, tRL=2, refresh_postpone=8),
        npu=NpuConfig(array_rows=4, array_cols=4, vector_lanes=4, act_spm_words=256,
                      wgt_spm_words=256, acc_spm_words=256),
        clocks=Clocks(npu_mhz=1000.0, pim_mhz=1000.0),
    )


def _default() -> SystemConfig:
    return SystemConfig(
        name="default",
        pim=PimGeometry(channels=2, banks=16, rows=4096, columns=64, lanes=16, column_bits=256,
                        gb_bytes=2048, af_rows=1),
        timing=timing_from_ns(TIMING_NS_IANUS, 1000.0),
        npu=NpuConfig(array_rows=16, array_cols=16, vector_lanes=16, act_spm_words=4096,
                      wgt_spm_words=4096, acc_spm_words=1024, vector_spm_words=4096),
        clocks=Clocks(npu_mhz=1000.0, pim_mhz=1000.0),
    )


def _ianus() -> SystemConfig:
    # 8 GB over 8 channels x 16 banks x 2 KB rows = 32768 rows per bank.
    return SystemConfig(
        name="ianus",
        # Channel interleave of one row (issue 14, measured): a DMA stream moves to the next channel every
        # 2 KB, so summarization on the NPU has every channel's bandwidth (XL 128 in: 46.9 ms vs 56.0 with
        # Row-Channel-Bank-Column, 46.2 on npu-mem; 256 B splits the matrix unit's weight loads into runs).
        pim=PimGeometry(channels=8, banks=16, rows=32768, columns=64, lanes=16, column_bits=256,
                        gb_bytes=2048, af_rows=1, channel_interleave=2048),
        timing=timing_from_ns(TIMING_NS_IANUS, 1000.0),
        # 12 MB activation SPM / (128 BF16 = 256 B per word) = 49152 -> 64Ki words (power of two);
        # 4 MB weight SPM / 256 B = 16Ki words; sixteen 4-wide VLIW vector processors = 64 lanes.
        npu=NpuConfig(array_rows=128, array_cols=64, macs_per_pe=4, vector_lanes=64,
                      act_spm_words=65536, wgt_spm_words=16384, acc_spm_words=16384, cores=4,
                      vector_spm_words=65536),
        clocks=Clocks(npu_mhz=700.0, pim_mhz=1000.0, host_link_gbps=64.0),
    )


def _variant(base, suffix: str, doc: str, **changes):
    """A preset factory: ``base`` with ``changes`` (dotted field names), named ``<base name>-<suffix>``."""
    def make() -> SystemConfig:
        cfg = base()
        return cfg.replace(name=f"{cfg.name}-{suffix}", **changes)
    make.__doc__ = f"The {base.__name__.strip('_')} preset with {doc}."
    return make


def _dual(base):
    """``base`` with NeuPIMs' dual row buffers (same geometry and timing otherwise)."""
    return _variant(base, "dualrb", "two row buffers per bank", **{"pim.row_buffers": 2})


def _interleaved(base, interleave):
    """``base`` with a channel-interleaved address map (issue 14; :class:`hw.memif.AddressMap`)."""
    return _variant(base, "il", f"channel_interleave = {interleave} bytes", **{"pim.channel_interleave": interleave})


def _channels(base, channels):
    """``base`` with ``channels`` PIM channels (issue 13: the paper's system has 8; ``default`` has 2)."""
    return _variant(base, f"{channels}ch", f"{channels} PIM channels", **{"pim.channels": channels})


def _lowprec(base, suffix, doc, fmt, acts, tmac, **extra):
    """``base`` with the low-precision PIM unit (issue 19): ``fmt`` weights, ``acts`` activations, two
    accumulator slots, and ``tMAC`` = the unit's MAC depth (storage read + :attr:`LowPrecMacUnit.latency`:
    18 with BF16 activations, 8 with FP8; :func:`hw.pim.bank.check_pu_timing` checks it)."""
    return _variant(base, suffix, doc, **{"pim.weight_format": fmt, "pim.act_format": acts, "pim.acc_slots": 2,
                                          "timing.tMAC": tmac, **extra})


def _pipelined(base, mul_stages=2, tree_stages=4, acc_stages=4, pe_mul_stages=3, pe_add_stages=4, vec_acc_stages=4):
    """``base`` with a pipelined BF16 processing unit (issue 15): ``mul_stages``-stage multipliers,
    ``tree_stages``-stage adder-tree levels, ``acc_stages`` interleaved partial sums, and ``tMAC`` = the unit's
    result depth (:func:`hw.spec.pipeline.mac_depth`: storage read + MacUnit latency + combine latency; 32 for
    16 lanes with 2 / 4 / 4). tAF stays: the AF unit is not pipelined deeper. The NPU's systolic array is
    pipelined alike: ``pe_mul_stages``-stage multipliers and ``pe_add_stages``-stage FP32 adders in every PE
    (:func:`hw.spec.pipeline.array_latency`). The vector unit's row accumulator has ``vec_acc_stages`` interleaved
    partial sums (:class:`hw.npu.vector_reduce.VectorReduce`). The memory controllers' FR-FCFS pick is registered
    (``pim.pick_stages = 1``)."""
    def make() -> SystemConfig:
        cfg = base()
        pipe = {"pim.mul_stages": mul_stages, "pim.tree_stages": tree_stages, "pim.acc_stages": acc_stages,
                "npu.pe_mul_stages": pe_mul_stages, "npu.pe_add_stages": pe_add_stages,
                "npu.vec_acc_stages": vec_acc_stages, "pim.pick_stages": 1}
        # storage read + MacUnit latency + combine latency (tests/test_pim_pipelined.py holds the RTL to it)
        depth = mac_depth(cfg.pim.lanes, mul_stages, tree_stages, acc_stages)
        return cfg.replace(name=f"{cfg.name}-p{acc_stages}", **pipe, **{"timing.tMAC": depth})
    make.__doc__ = (f"The {base.__name__.strip('_')} preset with the pipelined processing unit ({mul_stages}-stage "
                    f"multipliers, {tree_stages}-stage adders, {acc_stages} interleaved partial sums; systolic array PEs "
                    f"with {pe_mul_stages}-stage multipliers and {pe_add_stages}-stage adders; a vector row accumulator of "
                    f"{vec_acc_stages} interleaved partial sums).")
    return make


def _hpim(base, **unit):
    """``base`` with one SRAM-PIM attention unit (issue 20; :class:`SramPimConfig`) behind the SPU queue."""
    def make() -> SystemConfig:
        cfg = base()
        return dataclasses.replace(cfg, name=f"{cfg.name}-hpim", spu=SramPimConfig(**unit))
    make.__doc__ = f"The {base.__name__.strip('_')} preset with an SRAM-PIM attention unit ({unit})."
    return make


def _neupims() -> SystemConfig:
    # NeuPIMs' system: the ianus-scale NPU and memory with dual row buffers (the paper's batched
    # generation is a policy of the compiler and runtime, not of the configuration).
    return _ianus().replace(name="neupims", **{"pim.row_buffers": 2})


def _neupims_hw() -> SystemConfig:
    # The system NeuPIMs' artifact evaluates (casys-kaist/NeuPIMs): 8 systolic arrays of 128 x 128 at 1 GHz,
    # 32 memory channels of 32 banks with 16 multipliers per bank, dual row buffers. The memory keeps this
    # project's GDDR6-AiM timings and 32-byte columns (HBM's timings are not modelled): what changes is the
    # NPU's compute against the memory's bandwidth (projection only; issue 18).
    return _neupims().replace(name="neupims-hw", **{
        "npu.array_rows": 128, "npu.array_cols": 128, "npu.macs_per_pe": 1, "npu.cores": 8,
        "clocks.npu_mhz": 1000.0, "pim.channels": 32, "pim.banks": 32})


PRESETS = {"tiny": _tiny, "default": _default, "ianus": _ianus,
           "tiny-dualrb": _dual(_tiny), "default-dualrb": _dual(_default), "neupims": _neupims,
           "neupims-hw": _neupims_hw,
           # channel-interleaved RTL variants: tiny with two-column runs (64 B, both column fields in use),
           # default with one-row runs (2 KB, the ianus preset's map)
           "tiny-il": _interleaved(_tiny, 64), "default-il": _interleaved(_default, 2048),
           # the default with 4 PIM channels (issue 13: what a wider default costs in simulation)
           "default-4ch": _channels(_default, 4),
           # the SRAM-PIM attention unit (issue 20) on the SoC: tiny's head dimension is 16 (4 macros x 32 rows,
           # 8 MAC lanes: a result beat of 8 FP32 fills one of tiny's 256-bit vector-scratchpad rows), default's 64
           # (the synthesized unit: 4 macros x 512 rows, 16 MAC lanes, read latency 2)
           "tiny-hpim": _hpim(_tiny, macros=4, rows=32, word_lanes=16, mac_lanes=8, read_latency=1),
           "default-hpim": _hpim(_default, macros=4, rows=512, word_lanes=64, mac_lanes=16, read_latency=2),
           # the low-precision PIM unit (issue 19): INT4 weights with BF16 activations, FP4 (grid choice) with
           # FP8 activations; tiny with 32 rows (the MAC's row field carries the accumulator slot in bit 4)
           "tiny-w4": _lowprec(_tiny, "w4", "INT4 weights (BF16 activations)", "int4", "bf16", 18,
                               **{"pim.rows": 32}),
           "tiny-w4a8": _lowprec(_tiny, "w4a8", "FP4 weights with grid choice and FP8 activations", "fp4",
                                 "fp8_e4m3", 8, **{"pim.rows": 32, "pim.grid_choice": True}),
           "default-w4": _lowprec(_default, "w4", "INT4 weights (BF16 activations)", "int4", "bf16", 18),
           "default-w4a8": _lowprec(_default, "w4a8", "FP4 weights with grid choice and FP8 activations", "fp4",
                                    "fp8_e4m3", 8, **{"pim.grid_choice": True}),
           # the paper-scale device with the low-precision unit, for the projection (groups of 64: GPT-2
           # XL's d_model 1600 is not a multiple of 128)
           "ianus-w4": _lowprec(_ianus, "w4", "INT4 weights (BF16 activations), groups of 64", "int4", "bf16", 18,
                                **{"pim.quant_group": 64}),
           "ianus-w4a8": _lowprec(_ianus, "w4a8", "FP4 weights with grid choice and FP8 activations, groups of 64",
                                  "fp4", "fp8_e4m3", 8, **{"pim.grid_choice": True, "pim.quant_group": 64}),
           # the pipelined BF16 processing unit (issue 15): 2-stage multipliers, 4-stage adders, 4 interleaved
           # partial sums; tMAC from the unit's depth (32 cycles for 16 lanes); systolic-array PEs with 3-stage
           # multipliers in LUTs and 4-stage adders (array latency 4R + C + 2); the memory controllers' pick registered
           "tiny-p4": _pipelined(_tiny), "default-p4": _pipelined(_default),
           "tiny-dualrb-p4": _pipelined(_dual(_tiny))}


def preset(name: str) -> SystemConfig:
    """The preset configuration called ``name`` (``tiny``, ``default`` or ``ianus``)."""
    try:
        return PRESETS[name]()
    except KeyError:
        raise ConfigError("preset", "name", name, f"one of {', '.join(PRESETS)}") from None
