"""Pipeline depths of the PIM processing unit's datapath (issue 15), as plain arithmetic: the RTL
(:class:`hw.mac_unit.MacUnit`), the configuration's presets (tMAC of the pipelined unit), the device's timing
rules and the golden model read the same formulas here (``tests/test_pim_pipelined.py`` and
``tests/test_arith_pipe.py`` hold the RTL to them)."""

from __future__ import annotations

__all__ = ["combine_schedule", "mac_latency", "combine_latency", "mac_depth", "array_latency", "compute_drain"]


def combine_schedule(partials: int, adder_stages: int):
    """The fixed order in which :class:`hw.mac_unit.MacUnit` combines its interleaved partial sums.

    Pairwise, as :class:`hw.arith.AdderTree`: each level adds neighbours ``(p0+p1), (p2+p3), ...`` (an odd last one
    passes), so 4 partials give ``(p0+p1)+(p2+p3)``. One addition is issued per cycle into an adder of
    depth ``adder_stages``, as soon as its operands are ready. Returns ``(ops, cycles)``: ``ops`` a list of
    ``(step, src_a, src_b, dest)`` (issued ``step`` cycles after the schedule starts; the sum is written
    into partial ``dest``), ``cycles`` the step at which partial 0 holds the result.
    """
    level = [(j, 0) for j in range(partials)]        # (partial index, step at which it is ready)
    ops, free = [], 0
    while len(level) > 1:
        nxt = []
        for k in range(0, len(level) - 1, 2):
            (ja, ra), (jb, rb) = level[k], level[k + 1]
            step = max(ra, rb, free)
            free = step + 1
            ops.append((step, ja, jb, ja))
            nxt.append((ja, step + adder_stages))
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return ops, level[0][1]


def mac_latency(lanes: int, mul_stages: int = 1, tree_stages: int = 2, acc_stages: int = 1) -> int:
    """Cycles from a column entering the unit to the accumulator (its partial when ``acc_stages > 1``)
    holding its sum: the multipliers, ``log2(lanes)`` adder-tree levels, the accumulator's adder."""
    return mul_stages + tree_stages * (lanes.bit_length() - 1) + acc_stages


def combine_latency(acc_stages: int = 1) -> int:
    """Cycles from ``combine`` to the accumulator holding the total: 0 for one accumulator (no combine), else
    the :func:`combine_schedule` of ``acc_stages`` partials (2, 6, 9 for 2, 3, 4)."""
    return 0 if acc_stages == 1 else combine_schedule(acc_stages, acc_stages)[1]


def mac_depth(lanes: int, mul_stages: int = 1, tree_stages: int = 2, acc_stages: int = 1) -> int:
    """A bank's MAC result depth (``tMAC`` of a pipelined unit): the storage read, :func:`mac_latency` and
    :func:`combine_latency` (:func:`hw.pim.bank.pu_mac_depth`)."""
    return 1 + mac_latency(lanes, mul_stages, tree_stages, acc_stages) + combine_latency(acc_stages)


def array_latency(rows: int, cols: int, mul_stages: int = 1, add_stages: int = 1) -> int:
    """Cycles from an activation row on :class:`hw.npu.systolic.SystolicArray`'s input to its column sums on
    the output, for processing elements with ``mul_stages``-stage multipliers and ``add_stages``-stage FP32
    adders: the partial sum moves one row every ``add_stages`` cycles (so the activation skew is
    ``add_stages`` cycles per row), the first product takes ``mul_stages`` cycles, and the activation
    reaches the last column ``cols - 1`` cycles after the first (the output deskew evens the columns out):
    ``add_stages * rows + mul_stages + cols - 1``, ``R + C`` for the one-stage PE."""
    return add_stages * rows + mul_stages + cols - 1


def compute_drain(rows: int, cols: int, mul_stages: int = 1, add_stages: int = 1) -> int:
    """Cycles from an activation row's scratchpad read to its accumulator write in
    :class:`hw.npu.matrix_unit.ComputeEngine` (the drain of a ``COMPUTE``): the read (1),
    :func:`array_latency`, the accumulator read-modify-write (2); ``R + C + 3`` for the one-stage PE."""
    return 1 + array_latency(rows, cols, mul_stages, add_stages) + 2
