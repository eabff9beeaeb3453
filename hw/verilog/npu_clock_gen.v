// Free-running clock for Verilator --timing simulations: no Python runs per clock edge.
module npu_clock_gen #(parameter HALF_PERIOD = 5) (output reg clk);
    initial clk = 1'b0;
    always #(HALF_PERIOD) clk = ~clk;
endmodule
