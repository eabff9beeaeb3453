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
// +PIM_BACKDOOR=<dir>, the bank reads <dir>/ch<C>_b<B>.bin when it exists, else
// <dir>/ch<C>_b<B>.hex. The .bin file is a list of segments, each an 8-byte
// big-endian header (first word index, word count; 32 bits each) followed by
// that many words of WIDTH/8 bytes, most significant byte first ($fread's
// order): about 25x faster than $readmemh's hex parsing, which took 6 s for one
// GPT-2-small layer (sim/pim_sequencer.py writes both formats). The .hex file
// is read with $readmemh (it may hold only some words, with @address lines).
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
    integer got;
    integer seg_start;
    integer seg_count;
    reg [63:0] seg_hdr;
    reg more;
    always @(posedge clk) begin
        bd_load_q <= bd_load;
        if (bd_load && !bd_load_q) begin
            if ($value$plusargs("PIM_BACKDOOR=%s", dir)) begin
                fname = $sformatf("%s/ch%0d_b%0d.bin", dir, chan_id, bank_id);
                fd = $fopen(fname, "rb");
                if (fd != 0) begin
                    more = 1'b1;
                    while (more) begin
                        got = $fread(seg_hdr, fd);
                        if (got != 8) begin
                            more = 1'b0;
                        end else begin
                            seg_start = seg_hdr[63:32];
                            seg_count = seg_hdr[31:0];
                            if (seg_start < 0 || seg_count < 0 || seg_start + seg_count > DEPTH) begin
                                $display("pim_storage: %s: segment %0d + %0d words outside the bank's %0d",
                                         fname, seg_start, seg_count, DEPTH);
                                $finish;
                            end
                            got = $fread(mem, fd, seg_start, seg_count);
                            if (got != seg_count * (WIDTH / 8)) begin
                                $display("pim_storage: %s: short segment (%0d of %0d bytes)", fname, got,
                                         seg_count * (WIDTH / 8));
                                $finish;
                            end
                        end
                    end
                    $fclose(fd);
                end else begin
                    fname = $sformatf("%s/ch%0d_b%0d.hex", dir, chan_id, bank_id);
                    fd = $fopen(fname, "r");
                    if (fd != 0) begin
                        $fclose(fd);
                        $readmemh(fname, mem);
                    end
                end
            end
        end
    end
`endif
endmodule
