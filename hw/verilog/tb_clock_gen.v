// Free-running clock for Verilator --timing simulations (as npu_clock_gen), plus the testbench's clock:
// `clk_tb` is `clk` 1 ps early. Bus models (cocotbext-axi) that run on `clk_tb` read every signal as it
// is before the design's rising edge and drive their next beat in the same instant; the simulation top
// (sim/tb/soc_run.py SocSim) registers what they drive on `clk_tb`, so the design's edge 1 ps later
// still samples the beat they drove a cycle earlier: the timing a testbench-driven clock gives them.
module tb_clock_gen #(parameter HALF_PERIOD = 5) (output reg clk, output reg clk_tb);
    initial begin
        clk = 1'b0;
        clk_tb = 1'b0;
    end
    always begin
        #(HALF_PERIOD - 0.001) clk_tb = ~clk_tb;
        #0.001 clk = ~clk;
    end
endmodule
