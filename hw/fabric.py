"""MemFabric: N unified-memory requesters onto C memory-controller channels, responses in order.

Every client of unified memory (command-processor fetch, the matrix unit's
DMA, a vector-unit DMA, the host's AXI window) speaks the requester side of
:class:`hw.memif.MemPortSignature`. The memory side is one controller per
channel (:class:`hw.memctrl.MemoryController`, e.g. ``r[c]``/``q[c]`` of
:class:`hw.memctrl.MemCtrlSystem`), which reorders requests (FR-FCFS);
responses of different channels come back in any order. Clients such as the
matrix DMA need their responses in request order, so the fabric puts a
reorder buffer (ROB) in front of every requester.

Request path (per requester ``i``)
    A request is accepted when the requester's ROB has a free slot (and, for
    a request that goes to a channel, the requester's one-entry issue register
    is empty or being emptied in the same cycle). Its slot (the ROB tail)
    records the requester's tag and write flag. The channel comes from the
    address (:class:`hw.memif.AddressMap`, Row-Channel-Bank-Column); the
    request goes to the issue register with its tag replaced by the channel
    tag, and from there to the channel when the channel's round-robin
    arbiter grants it and the channel is ready. Requests of one requester are
    issued in order; a requester whose issue register waits for a busy
    channel blocks only itself.

Channel tag (8 bits, :data:`hw.memif.TAG_BITS`)
    ``tag = (requester_id << slot_bits) | slot``, upper bits zero, with
    ``slot_bits = log2(rob_depth)`` and ``requester_id`` a field of
    ``(n_requesters - 1).bit_length()`` bits (none for one requester).
    ``requester_id bits + slot_bits <= 8`` is checked by the constructor.

Response path
    A channel response is written into the slot named by its tag (data and
    the channel's error flag) and marks it done; responses of several
    channels for the same requester take turns (round robin) at the
    requester's one ROB write port, the others are held with ``ready = 0``.
    The requester sees the ROB head when it is done: the channel's data,
    its original tag, the write flag it sent and ``error`` (channel error or
    fabric error), one response per cycle while it is ready. A response whose
    tag names no requester is consumed and dropped (cannot happen with a
    controller that echoes tags).

Errors
    A request to an address outside device memory (``addr >=
    cfg.pim.total_bytes``; with power-of-two geometry every address the
    ``addr`` field can hold is inside, so this check is constant-false there)
    or not aligned to a column is never sent to a channel: its slot is marked
    done at once with ``error = 1``, data 0, its tag and write flag, and it is
    delivered in its place in the order.

Latency and throughput
    One cycle each way: a request accepted at cycle ``t`` is presented to
    its channel at ``t + 1``; a channel response accepted at ``t`` is
    presented to the requester at ``t + 1``. With a ready channel and a
    ready requester, every requester sustains one request and one response
    per cycle (no fabric bubbles) as long as ``rob_depth`` covers the round
    trip: a slot is held from acceptance to delivery, ``channel latency + 2``
    cycles, and is reused the cycle after, so full rate needs ``rob_depth >=
    channel latency + 3`` (channel latency: request accepted by the channel
    to its response presented).

Members
-------
m : In(MemPortSignature(cfg)).array(n_requesters)
    Requester ``i`` at ``m[i]`` (the memory side of its port; flattened ``m__<i>__req__valid``).
r : Out(stream.Signature(request_layout(cfg))).array(cfg.pim.channels)
    Requests to channel ``c``'s controller at ``r[c]`` (tag = channel tag). The payload
    is held while ``valid`` and not ``ready`` (the arbiter's grant is locked).
q : In(stream.Signature(response_layout(cfg))).array(cfg.pim.channels)
    Responses from channel ``c``'s controller.
req_stall : Out(32).array(n_requesters)
    Cycles requester ``i`` had a request valid but not accepted (ROB full or
    its channel not taking the previous request): time waiting on memory.
    Wraps.
"""

from amaranth.hdl import Cat, Const, Module, Mux, Signal
from amaranth.lib import data, stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from .config import SystemConfig
from .memif import TAG_BITS, AddressMap, MemPortSignature, request_layout, response_layout

__all__ = ["MemFabric"]


def _round_robin(m, name, req, advance, hold=None):
    """One-hot grant among the set bits of ``req``, starting after the last grant.

    The priority pointer moves past the granted bit when ``advance``. When
    ``hold`` was asserted in the previous cycle the previous grant is kept
    (a stream whose transfer did not happen keeps its payload).
    """
    n = len(req)
    grant = Signal(n, name=f"{name}_grant")
    if n == 1:
        m.d.comb += grant.eq(req)
        return grant
    above = Signal(n, name=f"{name}_above", init=(1 << n) - 1)   # requesters at or after the pointer
    masked = Signal(n, name=f"{name}_masked")
    pick = Signal(n, name=f"{name}_pick")
    m.d.comb += [
        masked.eq(req & above),
        pick.eq(Mux(masked.any(), masked, req)),
        grant.eq(pick & (~pick + 1)[:n]),           # lowest set bit
    ]
    if hold is not None:
        held = Signal(n, name=f"{name}_held")
        holding = Signal(name=f"{name}_holding")
        m.d.sync += [holding.eq(hold), held.eq(grant)]
        with m.If(holding):
            m.d.comb += grant.eq(held)
    with m.If(advance):
        m.d.sync += above.eq(~(grant | (grant - 1)[:n]))   # bits strictly above the grant
    return grant


class MemFabric(wiring.Component):
    """``n_requesters`` memory ports onto the channels' controllers, responses in request order.

    Parameters
    ----------
    cfg : SystemConfig
    n_requesters : int
        Requester ports ``m[0]`` .. ``m[n - 1]``; at least 1.
    rob_depth : int
        Reorder-buffer slots per requester (requests in flight at most); a
        power of two in [2, 64].

    See the module docstring for members, the tag format and timing.
    """

    def __init__(self, cfg: SystemConfig, n_requesters: int, rob_depth: int = 32):
        if not isinstance(cfg, SystemConfig):
            raise TypeError(f"Configuration must be a SystemConfig, not {cfg!r}")
        if not isinstance(n_requesters, int) or isinstance(n_requesters, bool) or n_requesters < 1:
            raise ValueError(f"Number of requesters must be an integer of at least 1, not {n_requesters!r}")
        if (not isinstance(rob_depth, int) or isinstance(rob_depth, bool) or not 2 <= rob_depth <= 64
                or rob_depth & (rob_depth - 1)):
            raise ValueError(f"Reorder-buffer depth must be a power of two in [2, 64], not {rob_depth!r}")
        self.slot_bits = rob_depth.bit_length() - 1
        self.rid_bits = (n_requesters - 1).bit_length()
        if self.rid_bits + self.slot_bits > TAG_BITS:
            raise ValueError(
                f"Channel tag does not fit in {TAG_BITS} bits: {n_requesters} requesters need "
                f"{self.rid_bits} requester-id bits and rob_depth {rob_depth} needs {self.slot_bits} slot "
                f"bits ({self.rid_bits + self.slot_bits} > {TAG_BITS}); use fewer requesters or a smaller "
                f"rob_depth")
        self.cfg = cfg
        self.n_requesters = n_requesters
        self.rob_depth = rob_depth
        C = cfg.pim.channels
        super().__init__({"m": In(MemPortSignature(cfg)).array(n_requesters),
                          "r": Out(stream.Signature(request_layout(cfg))).array(C),
                          "q": In(stream.Signature(response_layout(cfg))).array(C),
                          "req_stall": Out(32).array(n_requesters)})

    def channel_tag(self, requester: int, slot: int) -> int:
        """The channel tag of ROB slot ``slot`` of requester ``requester``."""
        return (requester << self.slot_bits) | slot

    def elaborate(self, platform):
        m = Module()
        cfg = self.cfg
        p = cfg.pim
        N, C, D = self.n_requesters, p.channels, self.rob_depth
        sb = self.slot_bits
        amap = AddressMap(p)
        rlay = request_layout(cfg)
        meta_lay = data.StructLayout({"tag": TAG_BITS, "write": 1, "bad": 1})
        chan_bits = max(1, p.channel_addr_bits)

        # Per-requester issue register (one request on its way to a channel).
        st_valid = [Signal(name=f"st{i}_valid") for i in range(N)]
        st_req = [Signal(rlay, name=f"st{i}_req") for i in range(N)]
        st_chan = [Signal(chan_bits, name=f"st{i}_chan") for i in range(N)]
        st_fire = [Signal(name=f"st{i}_fire") for i in range(N)]

        # ---------------- channel request arbiters ----------------
        fire_terms = [[] for _ in range(N)]
        for c in range(C):
            r = self.r[c]
            want = Signal(N, name=f"ra{c}_want")
            m.d.comb += want.eq(Cat(st_valid[i] & (st_chan[i] == c) for i in range(N)))
            m.d.comb += r.valid.eq(want.any())
            grant = _round_robin(m, f"ra{c}", want, advance=r.valid & r.ready, hold=r.valid & ~r.ready)
            payload = 0
            for i in range(N):
                payload = payload | Mux(grant[i], st_req[i].as_value(), 0)
                fire_terms[i].append(grant[i] & r.ready)
            m.d.comb += r.payload.eq(payload)
        for i in range(N):
            m.d.comb += st_fire[i].eq(Cat(fire_terms[i]).any())

        # ---------------- channel response routing ----------------
        # resp_grant[i][c]: channel c's response goes into requester i's ROB this cycle.
        q_ready_terms = [[] for _ in range(C)]
        resp_grant = []
        for i in range(N):
            want = Signal(C, name=f"wa{i}_want")
            terms = []
            for c in range(C):
                q = self.q[c]
                rid_ok = (q.payload.tag[sb:] == i)
                terms.append(q.valid & rid_ok)
            m.d.comb += want.eq(Cat(terms))
            grant = _round_robin(m, f"wa{i}", want, advance=want.any())
            resp_grant.append(grant)
            for c in range(C):
                q_ready_terms[c].append(grant[c])
        for c in range(C):
            q = self.q[c]
            known = Signal(name=f"q{c}_known")
            m.d.comb += known.eq(q.payload.tag[sb:] < N)
            # A tag naming no requester is consumed and dropped.
            m.d.comb += q.ready.eq(Cat(q_ready_terms[c]).any() | ~known)

        # ---------------- reorder buffers ----------------
        for i in range(N):
            port = self.m[i]
            req, resp = port.req, port.resp
            dmem = m.submodules[f"rob{i}_data"] = Memory(shape=p.column_bits + 1, depth=D, init=[])
            mmem = m.submodules[f"rob{i}_meta"] = Memory(shape=meta_lay, depth=D, init=[])
            dw, dr = dmem.write_port(), dmem.read_port(domain="comb")
            mw, mr = mmem.write_port(), mmem.read_port(domain="comb")

            head = Signal(sb + 1, name=f"rob{i}_head")
            tail = Signal(sb + 1, name=f"rob{i}_tail")
            done = Signal(D, name=f"rob{i}_done")
            full = Signal(name=f"rob{i}_full")
            m.d.comb += full.eq((head[:sb] == tail[:sb]) & (head[sb] != tail[sb]))

            # Request decode and acceptance.
            fields = amap.rtl_fields(req.payload.addr)
            bad = Signal(name=f"m{i}_bad")
            if (1 << len(req.payload.addr)) > p.total_bytes:
                out_of_range = req.payload.addr >= p.total_bytes
            else:
                out_of_range = Const(0, 1)            # every representable address is in device memory
            m.d.comb += bad.eq(fields["misaligned"] | out_of_range)
            accept = Signal(name=f"m{i}_accept")
            m.d.comb += [
                req.ready.eq(~full & (bad | ~st_valid[i] | st_fire[i])),
                accept.eq(req.valid & req.ready),
                mw.addr.eq(tail[:sb]),
                mw.data.tag.eq(req.payload.tag),
                mw.data.write.eq(req.payload.write),
                mw.data.bad.eq(bad),
                mw.en.eq(accept),
            ]
            with m.If(st_fire[i]):
                m.d.sync += st_valid[i].eq(0)
            with m.If(accept):
                m.d.sync += tail.eq(tail + 1)
                with m.If(~bad):
                    m.d.sync += [
                        st_valid[i].eq(1),
                        st_req[i].eq(req.payload),
                        st_req[i].tag.eq(Cat(tail[:sb], Const(i, 8))[:TAG_BITS]),
                        st_chan[i].eq(fields["channel"]),
                    ]

            # Channel responses into the ROB (one write port, channels take turns).
            g = resp_grant[i]
            wslot = 0
            wdata = 0
            for c in range(C):
                q = self.q[c]
                wslot = wslot | Mux(g[c], q.payload.tag[:sb], 0)
                wdata = wdata | Mux(g[c], Cat(q.payload.data, q.payload.error), 0)
            m.d.comb += [dw.addr.eq(wslot), dw.data.eq(wdata), dw.en.eq(g.any())]

            # Head delivery.
            hslot = head[:sb]
            hit = Signal(name=f"rob{i}_deliver")
            m.d.comb += [
                dr.addr.eq(hslot),
                mr.addr.eq(hslot),
                resp.valid.eq(done.bit_select(hslot, 1)),
                resp.payload.data.eq(Mux(mr.data.bad, 0, dr.data[:p.column_bits])),
                resp.payload.error.eq(mr.data.bad | dr.data[p.column_bits]),
                resp.payload.write.eq(mr.data.write),
                resp.payload.tag.eq(mr.data.tag),
                hit.eq(resp.valid & resp.ready),
            ]
            with m.If(hit):
                m.d.sync += head.eq(head + 1)
            one = Const(1, D)
            set_bits = Mux(accept & bad, (one << tail[:sb])[:D], 0) | Mux(g.any(), (one << wslot)[:D], 0)
            clr_bits = Mux(hit, (one << hslot)[:D], 0)
            m.d.sync += done.eq((done | set_bits) & ~clr_bits)

            # Stall counter: a request waiting on memory.
            stall = self.req_stall[i]
            with m.If(req.valid & ~req.ready):
                m.d.sync += stall.eq(stall + 1)
        return m
