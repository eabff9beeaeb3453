// DRAM-bank storage for the PIM device model: one read port (registered,
// one cycle), one byte-masked write port, and a back door.
//
// Why hand-written Verilog and not amaranth.lib.memory: Amaranth 0.5 writes an
// `initial` assignment for every word, so a DRAM-sized array becomes tens of
// thousands of Verilog lines, minutes of C++ compile, and time-0 back-door
// writes are overwritten (see shared/TOOLCHAIN.md). This module has no
// per-word initialisation list: one loop zeroes it at time 0 in simulation
// (so every simulator starts from the same defined contents), and it is then
// loaded through the back door or WR commands.
//
// Back door: on a rising edge of `bd_load`, if the simulator was started with
// +PIM_BACKDOOR=<dir> and <dir>/ch<C>_b<B>.hex exists, the file is read with
// $readmemh (it may hold only some words, with @address lines).
module pim_storage #(
    parameter WIDTH = 256,
    parameter DEPTH = 1024,
    parameter ABITS = 10
) (
    input  wire              clk,
    input  wire [7:0]        chan_id,
    input  wire [7:0]        bank_id,
    input  wire              re,
    input  wire [ABITS-1:0]  raddr,
    output reg  [WIDTH-1:0]  rdata,
    input  wire              we,
    input  wire [ABITS-1:0]  waddr,
    input  wire [WIDTH-1:0]  wdata,
    input  wire [WIDTH/8-1:0] wmask,
    input  wire              bd_load
);
    reg [WIDTH-1:0] mem [0:DEPTH-1];
    integer i;

    always @(posedge clk) begin
        if (re)
            rdata <= mem[raddr];
        if (we)
            for (i = 0; i < WIDTH / 8; i = i + 1)
                if (wmask[i])
                    mem[waddr][i*8 +: 8] <= wdata[i*8 +: 8];
    end

`ifndef SYNTHESIS
    initial begin
        for (i = 0; i < DEPTH; i = i + 1)
            mem[i] = {WIDTH{1'b0}};
        rdata = {WIDTH{1'b0}};
    end

    reg bd_load_q = 1'b0;
    string dir;
    string fname;
    integer fd;
    always @(posedge clk) begin
        bd_load_q <= bd_load;
        if (bd_load && !bd_load_q) begin
            if ($value$plusargs("PIM_BACKDOOR=%s", dir)) begin
                fname = $sformatf("%s/ch%0d_b%0d.hex", dir, chan_id, bank_id);
                fd = $fopen(fname, "r");
                if (fd != 0) begin
                    $fclose(fd);
                    $readmemh(fname, mem);
                end
            end
        end
    end
`endif
endmodule
