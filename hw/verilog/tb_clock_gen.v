// Free-running clock for Verilator --timing simulations (as npu_clock_gen), plus the testbench's clock:
// `clk_tb` is `clk` 1 ps early. Bus models (cocotbext-axi) that run on `clk_tb` read every signal as it
// is before the design's rising edge and drive their next beat in the same instant; the simulation top
// (sim/tb/soc_run.py SocSim) registers what they drive on `clk_tb`, so the design's edge 1 ps later
// still samples the beat they drove a cycle earlier: the timing a testbench-driven clock gives them.
//
// `hold` = 1 stops `clk_tb` (it keeps its value) while `clk` runs on: a testbench whose bus models are
// idle (the host waiting for a program's done) saves the two extra time steps per cycle that `clk_tb`'s
// edges cost (each one an evaluation of the model and a round of VPI callbacks). While held, `clk_tb`
// falls with `clk` and stays low; it is set from `clk` (not toggled), so its first rising edge after
// `hold` falls comes 1 ps before `clk`'s, exactly as if it had never stopped: the testbench's bus
// accesses, and with them every program's start cycle, are the same as without the hold.
module tb_clock_gen #(parameter HALF_PERIOD = 5) (input hold, output reg clk, output reg clk_tb);
    initial begin
        clk = 1'b0;
        clk_tb = 1'b0;
    end
    always begin
        if (hold) begin
            #(HALF_PERIOD) clk = ~clk;
            if (!clk) clk_tb = 1'b0;    // low with `clk` (nothing runs on a falling edge of clk_tb)
        end else begin
            #(HALF_PERIOD - 0.001) clk_tb = ~clk;
            #0.001 clk = ~clk;
        end
    end
endmodule
