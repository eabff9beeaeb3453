// Storage of the NPU test memory model (hw/npu/memmodel.py).
//
// Plain array, no per-word initialization (a lib.memory this size would get
// one `initial` assignment per word; see TOOLCHAIN.md). Back door for the
// testbench: a one-cycle pulse on `load` reads "mem_load.hex" ($readmemh,
// `@address` lines allowed) from the simulator's working directory; a pulse
// on `dump` writes words dump_lo..dump_hi to "mem_dump.hex".
module npu_mem_storage #(
    parameter ADDR_BITS = 16
) (
    input                      clk,
    input                      en,
    input                      we,
    input      [ADDR_BITS-1:0] addr,
    input      [255:0]         wdata,
    input      [31:0]          wmask,
    output reg [255:0]         rdata,
    input                      load,
    input                      dump,
    input      [ADDR_BITS-1:0] dump_lo,
    input      [ADDR_BITS-1:0] dump_hi
);
    reg [255:0] mem [0:(1 << ADDR_BITS) - 1];
    integer i;
    always @(posedge clk) begin
        if (load)
            $readmemh("mem_load.hex", mem);
        if (dump)
            $writememh("mem_dump.hex", mem, dump_lo, dump_hi);
        if (en) begin
            if (we) begin
                for (i = 0; i < 32; i = i + 1)
                    if (wmask[i])
                        mem[addr][i*8 +: 8] <= wdata[i*8 +: 8];
            end else begin
                rdata <= mem[addr];
            end
        end
    end
endmodule
