// Behavioural FP cells (hw/arith.py, fp_impl="dpi"): the RTL adder and
// multiplier replaced by calls into hw/verilog/fp_dpi.cpp, for long Verilator
// runs. Combinational, like the logic they replace; the caller keeps every
// pipeline register, so latencies and cycle counts are unchanged.
module ianus_fp32_add_dpi (
    input  wire [31:0] a,
    input  wire [31:0] b,
    output wire [31:0] y
);
    import "DPI-C" pure function int unsigned ianus_fp32_add(input int unsigned a, input int unsigned b);
    assign y = ianus_fp32_add(a, b);
endmodule

module ianus_bf16_mul_dpi (
    input  wire [15:0] a,
    input  wire [15:0] b,
    output wire [31:0] y
);
    import "DPI-C" pure function int unsigned ianus_bf16_mul(input int unsigned a, input int unsigned b);
    assign y = ianus_bf16_mul({16'd0, a}, {16'd0, b});
endmodule

// Registered variant: the call happens only on a rising edge of `clk` (the
// clock of the register the logic feeds). Used where the operands come from a
// faster (ungated) domain than the result register: a comb cell there would be
// evaluated on every edge of the operands' clock although the gated register
// ignores it (the PIM units' multipliers read the bank's storage every cycle).
// No reset: only for reset-less domains.
module ianus_bf16_mul_dpi_reg (
    input  wire        clk,
    input  wire [15:0] a,
    input  wire [15:0] b,
    output reg  [31:0] y
);
    import "DPI-C" pure function int unsigned ianus_bf16_mul(input int unsigned a, input int unsigned b);
    initial y = 32'd0;
    always @(posedge clk) y <= ianus_bf16_mul({16'd0, a}, {16'd0, b});
endmodule
