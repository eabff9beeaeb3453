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
