"""The PCU in the performance model: the macro queue and one macro PIM command micro command by micro command
(:class:`_PcuMacro`, :class:`hw.pcu.Pcu`'s state machine)."""

from __future__ import annotations

from collections import deque

from sim.perfmodel.memory import Channel
from sim.perfmodel.queue import QueueModel

OP_WRITE_VEC, OP_GEMV, OP_READ_RES = 1, 2, 3
F_BIAS, F_GELU, F_BF16 = 1, 2, 4


class PcuModel(QueueModel):
    """Methods of :class:`sim.perfmodel.core._Run` for the PCU's macro queue (:mod:`hw.pcu`)."""

    def _pcu(self):
        K, cal, kf = self.K, self.cal, self.m.k
        free = K.now
        while True:
            ins = yield from self._pop_head(self.pcu_q, self.ev_pcu, self.ev_pcu_space, cal.macro_q_lat * kf, free)
            start = K.now
            f = ins.f
            key = ("pim", f["op"], f["flags"], f["n"], f["m"], f["addr0"] % self.m.align, f.get("addr1", 0))
            end = self._pcu_macro(key, start, f)
            self.work["pcu"] += end - start
            self.intervals.append((start, end, self._tag(ins, "pim")))
            # Normal traffic waits while the macro holds the channels: pim_mode is high from the cycle
            # after the PCU takes the macro to the cycle its busy falls (``end``).
            for ch in self.mem.ch:
                ch.pim_windows.append((start + 1, end + 1))
                if len(ch.pim_windows) > 64:
                    del ch.pim_windows[:32]
            self.win_log.append((start + 1, end + 1))
            self._pim_window(start, end + 1)
            free = end + cal.pcu_end
            K.at(free + cal.pcu_idle_lat, lambda: self._unit_down("pcu"))
            yield free


class _PcuMacro:
    """One macro PIM command, micro command by micro command (:class:`hw.pcu.Pcu`'s state machine).

    ``self.t`` is the cycle of the state machine's current state, ``self.free`` the first cycle the
    command stream can load a command: an emitting state loads at ``max(t, free)``; the command is on
    the controllers' inputs the next cycle and decided at the first cycle their rules allow (``a``,
    the last channel's); the next command can be loaded in that same cycle (``Micro.pcu_emit_cycles``
    = 1: one command per cycle without stalls). Buffer reads happen at load time and cost nothing."""

    def __init__(self, run, f, start):      # run: sim.perfmodel.core._Run
        self.r = run
        self.f = f
        self.mem = run.mem
        self.p = run.cfg.pim
        self.tm = run.cfg.timing
        self.ev = run.events
        self.emit_extra = run.mi.pcu_emit_cycles - 1
        self.t = start
        self.free = start
        self.served = [[] for _ in range(self.p.channels)]   # per channel: cycles its responses were taken
        self.port_free = 0
        self.resp_lat = 1 + self.tm.tRL + run.cal.pcu_resp_lat
        self.last_data = 0
        self.slot = None                                     # accumulator slot of the command (4-bit device)
        self.slot_ok = {}                                    # per channel: tMAC end per slot
        self.cmb_ok = {}                                     # per channel: tMAC end after a combining MAC

    # -- controller side --
    def _earliest(self, ch: Channel, op, bank, tt):
        tm = self.tm
        if op == "ACT":
            a = max(tt, ch.act_ok[bank], ch.rrd_ok, ch.rfc_ok)
            if len(ch.acts) == 4:
                a = max(a, ch.acts[0] + tm.tFAW)
            return a
        if op == "ACTAB":
            a = max(tt, max(ch.act_ok), ch.rrd_ok, ch.rfc_ok)
            if len(ch.acts) == 4:
                a = max(a, ch.acts[0] + tm.tFAW)
            return a
        if op == "PREAB":
            pre = [ch.pre_ok[b] for b in range(ch.nb) if ch.open[b] >= 0]
            return max(tt, max(pre)) if pre else tt
        if op == "RD":
            return max(tt, ch.rd_ok[bank])
        if op == "WR":
            return max(tt, ch.wr_ok[bank])
        if op == "MACAB":
            # A pipelined unit (acc_stages > 1): tMAC after the last combining MAC (hw/pim/bank.py).
            return max(tt, max(ch.rd_ok), self.cmb_ok.get(id(ch), 0))
        if op == "AF":
            return max(tt, max(ch.rd_ok), ch.mac_ok)
        if op in ("WRBIAS", "RDMAC"):
            return max(tt, ch.mac_ok if self.slot is None else self.slot_ok.get(id(ch), (0, 0))[self.slot])
        if op in ("LDSCAB", "LDSLAB"):
            return max(tt, max(ch.rd_ok))
        if op == "RDAF":
            return max(tt, ch.af_ok)
        return tt           # WRGB

    def _apply(self, ch: Channel, op, bank, row, a):
        tm = self.tm
        nb = ch.nb
        ch.c["pim_commands"] += 1
        if op in ("RD", "WR", "WRGB", "WRBIAS", "RDMAC", "RDAF"):
            self.ev["pim_io_cols"] += 1
        if op == "AF":
            self.ev["pim_af"] += nb
        if op in ("ACT", "ACTAB"):
            banks = [bank] if op == "ACT" else range(nb)
            ch.acts.append(a)
            ch.rrd_ok = a + tm.tRRD
            for b in banks:
                ch.open[b] = row
                ch.rd_ok[b] = a + tm.tRCDRD
                ch.wr_ok[b] = a + tm.tRCDWR
                ch.pre_ok[b] = max(ch.pre_ok[b], a + tm.tRAS)
            self.ev["pim_acts"] += len(banks)
        elif op == "PREAB":
            for b in range(nb):
                if ch.open[b] >= 0:
                    ch.open[b] = -1
                    ch.act_ok[b] = max(ch.act_ok[b], a + tm.tRP)
            ch.closed_from = a + 1
        elif op == "RD":
            ch.pre_ok[bank] = max(ch.pre_ok[bank], a + tm.tRTP)
        elif op == "WR":
            ch.pre_ok[bank] = max(ch.pre_ok[bank], a + tm.tWR)
        elif op in ("MACAB", "AF", "LDSCAB", "LDSLAB"):
            for b in range(nb):
                ch.pre_ok[b] = max(ch.pre_ok[b], a + tm.tRTP)
            if op == "AF":                  # tMAC counts from MACs only (hw.memctrl, sim.pim_checker)
                ch.af_ok = a + tm.tAF
            elif op == "MACAB":
                ch.mac_ok = a + tm.tMAC
                if self.p.pipelined and row & self.p.combine_flag:
                    self.cmb_ok[id(ch)] = a + tm.tMAC
                if self.slot is not None:   # 4-bit device: tMAC per accumulator slot
                    self.slot_ok.setdefault(id(ch), [0, 0])[self.slot] = a + tm.tMAC

    def emit(self, op, chans=None, bank=0, row=0, reads=False, slot=None):
        self.slot = slot
        e = max(self.t, self.free)
        t_pres = e + 1
        free = t_pres
        chans = range(self.p.channels) if chans is None else chans
        arrivals = []
        for c in chans:
            ch = self.mem.ch[c]
            a = self._earliest(ch, op, bank, max(t_pres, ch.pim_from))
            if ch.open.count(-1) == ch.nb and ch.refresh_pim(a, ch.closed_from):
                a = self._earliest(ch, op, bank, max(t_pres, ch.pim_from))
            a = ch.slot(a)
            self._apply(ch, op, bank, row, a)
            if reads:
                arrivals.append((a + self.resp_lat, c))
            free = max(free, a)
        for arr, c in sorted(arrivals):
            s = max(arr, self.port_free)
            self.served[c].append(s)
            self.port_free = s + 1
            self.last_data = max(self.last_data, arr)
        self.free = free + self.emit_extra
        self.t = e + 1
        return e

    def _wait_served(self, need):
        """Cycle from which every channel has had ``need`` responses taken (counters update a cycle later)."""
        w = self.t
        for c in range(self.p.channels):
            if need > 0:
                w = max(w, self.served[c][need - 1] + 1)
        self.t = w

    def _all_served(self):
        """The cycle after the last response so far was taken (0 without responses)."""
        return max((s[-1] + 1 for s in self.served if s), default=0)

    def run(self):
        f = self.f
        op = f["op"]
        start = self.t
        # Normal requests timed ahead of this macro wait for it (DMAs are pushed back, fetches re-timed):
        # drop their future command slots.
        for ch in self.mem.ch:
            ch.slots.keep_upto(start)
            ch.row_slots.keep_upto(start)
            ch.qtimes = [x for x in ch.qtimes if x <= start]
            ch.rewind(start)
            ch.idle_from = min(ch.idle_from, max(ch.qtimes, default=0) + 1) if ch.qtimes else ch.idle_from
            ch.refresh_idle(start + 1)          # refreshes of the normal-mode idle time before the macro
            ch.acts = deque((x for x in ch.acts if x <= start), maxlen=4)
            ch.rrd_ok = min(ch.rrd_ok, start + 1 + self.tm.tRRD)
        # Check (one cycle); pim_mode rises with busy: the controllers close the rows normal traffic
        # left open (PREAB once tRAS / tWR / tRTP allow) and serve PIM commands from the next cycle.
        self.t += 1
        for ch in self.mem.ch:
            ob = [b for b in range(ch.nb) if ch.open[b] >= 0]
            ready = start + 2
            if ob:
                a = ch.slot(max(start + 2, max(ch.pre_ok[b] for b in ob)))
                for b in ob:
                    ch.open[b] = -1
                    ch.act_ok[b] = max(ch.act_ok[b], a + self.tm.tRP)
                ch.closed_from = a + 1
                ready = a + 2
            ch.pim_from = ready
        self.t += 1
        if op == OP_WRITE_VEC:
            self._xfer(f["addr0"], -(-f["n"] * 2 // 32), "RD")
        elif op == OP_GEMV:
            if self.p.lowprec:
                self._gemv_w4()
            elif f.get("addr1", 0) & 0xFF:
                self._gemv_packed()
            else:
                self._gemv()
        elif op == OP_READ_RES:
            bf16 = f["flags"] & F_BF16
            self._xfer(f["addr0"], -(-f["n"] * (2 if bf16 else 4) // 32), "WR")
        # Finish: every command taken, every response in, the controllers idle; busy falls the cycle after.
        fin = max(self.t, self.free + 1, self._all_served(), self.last_data + 1)
        # REFs that fell due while rows were open start once the last PREAB closed them
        for ch in self.mem.ch:
            if ch.open.count(-1) == ch.nb:
                ch.refresh_pim(fin, ch.closed_from)
        return fin + 1

    def _xfer(self, addr0, nwords, kind):
        """A memory transfer in segments inside one row of every bank: ACT of every bank row of the segment
        (Row-Channel-Bank-Column: one per bank row, on its channel; channel-interleaved map: one per bank, in
        every channel the segment touches in that row, as :class:`hw.pcu.Pcu`), its columns in order
        (RD / WR), PREAB."""
        p = self.p
        rg = p.columns * p.banks * p.channels
        il = self.mem.il if p.channels > 1 else 0
        run = il // p.column_bytes if il else p.columns * p.banks       # words of a channel's run
        j = 0
        seg_end = min(nwords, rg - (addr0 // p.column_bytes) % rg)
        while True:
            ja = j
            while ja < seg_end:
                a = addr0 + p.column_bytes * ja
                c, b, row = self.mem.where(a)
                if il:
                    bg = p.columns * p.channels                           # words of one bank's row, all channels
                    pos = (a // p.column_bytes) % bg
                    end = min(ja + bg - pos, seg_end)
                    runs = (pos + end - ja - 1) // run - pos // run + 1
                    self.emit("ACT", sorted((c + i) % p.channels for i in range(min(runs, p.channels))), b, row)
                    ja += bg - pos
                else:
                    self.emit("ACT", [c], b, row)
                    ja += p.columns - (a // p.column_bytes) % p.columns
            for jj in range(j, seg_end):
                c, b, _row = self.mem.where(addr0 + p.column_bytes * jj)
                self.emit(kind, [c], b, reads=kind == "RD")
            self.emit("PREAB")
            if seg_end == nwords:
                return
            j = seg_end
            seg_end = min(nwords, seg_end + rg)

    def _gemv(self):
        f, p, tm = self.f, self.p, self.tm
        K, N = f["n"], f["m"]
        tiles = -(-N // (p.banks * p.channels))
        gbv = p.gb_values
        chunks = -(-K // gbv)
        G = p.acc_groups
        gelu = bool(f["flags"] & F_GELU)
        nch = p.channels
        before_pre = max(0, tm.tRTP // tm.tCCD - 1)
        before_act = max(0, tm.tRP // tm.tCCD - 1)
        after_act = max(0, tm.tRCDRD // tm.tCCD - 1 - G)

        def ncols(chunk):
            rem = K - chunk * gbv
            return p.gb_columns if rem >= gbv else -(-rem // p.lanes)

        def wrgb(k):
            for _ in range(k):
                self.emit("WRGB")
            self.ev["pim_gb_writes"] += k * nch

        written = 0
        bias_in = 0
        if f["flags"] & F_BIAS:
            self._xfer(f["addr0"], -(-N * 4 // 32), "RD")
            bias_in = self._all_served()             # the last bias word taken: preloads may start
            self.served = [[] for _ in range(nch)]
            written = min(max(0, ncols(0) - after_act), before_act)
            wrgb(written)
        one_tile = tiles == 1
        have_prev = prev_af = False
        row_i = 0
        for chunk in range(chunks):
            n = ncols(chunk)
            last_chunk = chunk == chunks - 1
            for tile in range(tiles):
                self.emit("ACTAB", row=f["row"] + tile * chunks + chunk)
                if not (one_tile and chunk > 0):
                    if have_prev:
                        for _g in range(G):
                            self.emit("RDAF" if prev_af else "RDMAC", reads=True)
                    for _g in range(G):
                        if chunk > 0:                    # this tile's partial sums of the previous chunk are in
                            self._wait_served((row_i - tiles + 1) * G)
                        else:
                            self.t = max(self.t, bias_in)
                        self.emit("WRBIAS")
                if tile == 0:
                    wrgb(n - written)
                    written = n
                for c in range(n):
                    self.emit("MACAB", row=p.combine_flag if c == n - 1 else 0)
                self.ev["pim_mac_cols"] += n * p.banks * nch
                new_chunk = tile == tiles - 1 and not last_chunk
                if new_chunk:
                    n_next = ncols(chunk + 1)
                    written = min(before_pre, n_next)
                    wrgb(written)
                self.emit("PREAB")
                have_prev = True
                prev_af = gelu and last_chunk
                row_i += 1
                if prev_af:
                    self.emit("ACTAB", row=p.data_rows)
                    self.emit("AF")
                    self.emit("PREAB")
                if new_chunk:
                    k = max(0, min(n_next, before_pre + before_act) - written)
                    wrgb(k)
                    written += k
        for _g in range(G):
            self.emit("RDAF" if prev_af else "RDMAC", reads=True)

    def _gemv_packed(self):
        """A packed GEMV (``addr1``, hw/spec/macro.py; one input chunk): :class:`hw.pcu.Pcu`'s rows with the
        tiles of one row back to back (no PREAB / ACTAB between them unless GELU), each of the first
        ``gb_columns / pitch`` tiles writing the input at its own global-buffer slots."""
        f, p, tm = self.f, self.p, self.tm
        K, N = f["n"], f["m"]
        pitch, slot0 = 1 << ((f["addr1"] & 0xFF) - 1), (f["addr1"] >> 8) & 0xFF
        per_row, per_gb = p.columns // pitch, p.gb_columns // pitch
        tiles = -(-N // (p.banks * p.channels))
        n = -(-K // p.lanes)
        G, nch = p.acc_groups, p.channels
        gelu = bool(f["flags"] & F_GELU)
        after_act = max(0, tm.tRCDRD // tm.tCCD - 1 - G)
        before_act = max(0, tm.tRP // tm.tCCD - 1)

        def wrgb(k):
            for _ in range(k):
                self.emit("WRGB")
            self.ev["pim_gb_writes"] += k * nch

        written = bias_in = 0
        if f["flags"] & F_BIAS:
            self._xfer(f["addr0"], -(-N * 4 // 32), "RD")
            bias_in = self._all_served()
            self.served = [[] for _ in range(nch)]
            written = min(max(0, n - after_act), before_act)
            wrgb(written)
        for tile in range(tiles):
            q = slot0 + tile
            if tile == 0 or gelu or q % per_row == 0:
                self.emit("ACTAB", row=f["row"] + q // per_row)
            if tile:
                for _g in range(G):
                    self.emit("RDAF" if gelu else "RDMAC", reads=True)
            for _g in range(G):
                self.t = max(self.t, bias_in)
                self.emit("WRBIAS")
            if tile < per_gb:
                wrgb(n - written)
            written = 0
            for c in range(n):
                self.emit("MACAB", row=p.combine_flag if c == n - 1 else 0)
            self.ev["pim_mac_cols"] += n * p.banks * nch
            if tile == tiles - 1 or gelu or (q + 1) % per_row == 0:
                self.emit("PREAB")
            if gelu:
                self.emit("ACTAB", row=p.data_rows)
                self.emit("AF")
                self.emit("PREAB")
        for _g in range(G):
            self.emit("RDAF" if gelu else "RDMAC", reads=True)

    def _gemv_w4(self):
        """A GEMV on a device with 4-bit weights (issue 19): the command program of
        :func:`firmware.pim_lowprec.w4_gemv_program` (several tiles per row, two accumulator slots, LDSCAB /
        LDSLAB of the group scales), issued in order like :meth:`_gemv`'s. The program has no activation
        function (several tiles share a row and the AF reads the open row's LUT): the compiler runs FC1's GELU
        on the vector unit for a 4-bit device (:meth:`firmware.compiler.LayerCompiler.stage`); a GEMV macro
        with the GELU flag is refused here."""
        from firmware.pim_lowprec import W4GemvLayout, w4_gemv_program

        f, p = self.f, self.p
        N = f["m"]
        nch = p.channels
        if f["flags"] & F_GELU:
            raise ValueError("a 4-bit PIM GEMV has no activation function (GELU runs on the vector unit)")
        # addr1[7:0]: groups per input chunk (hw/spec/macro.py); 0 here: the chunk W4GemvLayout chooses (the
        # PCU RTL takes 0 as max_chunk, so firmware that runs on the RTL passes the chosen chunk explicitly).
        cg = f.get("addr1", 0) & 0xFF
        lay = W4GemvLayout(self.r.cfg, f["n"], N, chunk_size=cg * p.quant_group)
        bias_in = 0
        with_bias = bool(f["flags"] & F_BIAS)
        if with_bias:
            self._xfer(f["addr0"], -(-N * 4 // 32), "RD")
            bias_in = self._all_served()
            self.served = [[] for _ in range(nch)]
        reads = {}                                  # RDMAC tag -> its index among this GEMV's responses
        for op, fl in w4_gemv_program(lay, with_bias=with_bias):
            if op == "REFRESH_POINT":
                continue
            slot = (fl.get("row", 0) >> 4) & 1 if op in ("MACAB", "WRBIAS", "RDMAC") else None
            if op == "WRBIAS":
                if fl["data"][0] == "partial":      # the partial sums of the previous chunk are back
                    self._wait_served(reads[fl["after"]] + 1)
                elif fl["data"][0] == "bias":
                    self.t = max(self.t, bias_in)
                self.emit("WRBIAS", slot=slot)
            elif op == "RDMAC":
                reads[fl["tag"]] = len(reads)
                self.emit("RDMAC", reads=True, slot=slot)
            elif op in ("MACAB", "LDSCAB", "LDSLAB"):
                self.emit(op, slot=slot)
                self.ev["pim_mac_cols"] += p.banks * nch      # column reads of every bank (energy)
            elif op == "WRGB":
                self.emit("WRGB")
                self.ev["pim_gb_writes"] += nch
            elif op in ("ACTAB", "PACTAB", "PREAB", "PPREAB"):
                self.emit(op.replace("PACTAB", "ACTAB").replace("PPREAB", "PREAB"), row=fl.get("row", 0))
            else:
                raise ValueError(f"4-bit GEMV program: unexpected command {op}")
