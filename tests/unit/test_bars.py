"""Bar aggregation kernel against a plain-Python recomputation, over arbitrary batch splits."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from indicators.bars import LATE, BarAggregator, BarOutput

INTERVALS = (1_000, 60_000, 300_000, 3_600_000)
Bar = tuple[int, int, int, float, float, float, float, float, int]  # sym, k, start, o, h, l, c, v, n


def reference(ticks: list[tuple[int, int, float, float]], intervals: tuple[int, ...],
              n_symbols: int) -> tuple[list[Bar], list[Bar], list[int]]:
    """Closed bars (in closing order), bars still open at the end, late counts.

    Written independently of the kernel: first decide which ticks are accepted, then
    group the accepted ticks of each (symbol, interval, bucket) and order by event time.
    """
    accept_from = [-np.inf] * n_symbols
    late = [0] * n_symbols
    accepted: list[list[tuple[int, int, float, float]]] = [[] for _ in range(n_symbols)]
    for order, (s, t, p, q) in enumerate(ticks):
        if t < accept_from[s]:
            late[s] += 1
            continue
        accepted[s].append((order, t, p, q))
        accept_from[s] = max(accept_from[s], (t // intervals[0]) * intervals[0])
    closed: list[tuple[int, Bar]] = []  # (order of the closing tick, bar)
    still_open: list[Bar] = []
    for s in range(n_symbols):
        for k, width in enumerate(intervals):
            groups: dict[int, list[tuple[int, int, float, float]]] = {}
            for tick in accepted[s]:
                groups.setdefault(tick[1] // width * width, []).append(tick)
            starts = sorted(groups)
            for j, start in enumerate(starts):
                bar = _bar(s, k, start, groups[start])
                if j + 1 < len(starts):
                    # Closed by the first tick of the next bucket (ticks are accepted in
                    # bucket order, so that is the first tick of the next group).
                    closed.append((groups[starts[j + 1]][0][0], bar))
                else:
                    still_open.append(bar)
    closed.sort(key=lambda item: (item[0], item[1][1]))
    return [bar for _, bar in closed], still_open, late


def _bar(s: int, k: int, start: int, ticks: list[tuple[int, int, float, float]]) -> Bar:
    prices = [p for _, _, p, _ in ticks]
    # Earliest event time opens (first arrival on ties); latest closes (last arrival on ties).
    first = min(ticks, key=lambda x: (x[1], x[0]))
    last = max(ticks, key=lambda x: (x[1], x[0]))
    volume = 0.0
    for *_, q in ticks:
        volume += q
    return (s, k, start, first[2], max(prices), min(prices), last[2], volume, len(ticks))


def rows(out: BarOutput) -> list[Bar]:
    return [(int(out.sym[i]), int(out.interval[i]), int(out.open_ts_ms[i]), *map(float, out.ohlcv[i]),
             int(out.n_ticks[i])) for i in range(len(out))]


def run(ticks: list[tuple[int, int, float, float]], cuts: list[int], n_symbols: int,
        agg: BarAggregator | None = None) -> tuple[BarAggregator, list[Bar]]:
    agg = agg or BarAggregator(n_symbols, INTERVALS, max_batch_ticks=max(1, len(ticks)))
    arr = np.array(ticks, dtype=np.float64).reshape(-1, 4)
    bounds = [0, *sorted(c for c in cuts if 0 < c < len(ticks)), len(ticks)]
    bars: list[Bar] = []
    for lo, hi in zip(bounds, bounds[1:]):
        part = arr[lo:hi]
        bars += rows(agg.process_batch(part[:, 0].astype(np.int32), part[:, 1].astype(np.int64),
                                       part[:, 2].copy(), part[:, 3].copy()))
    return agg, bars


def random_ticks(rng: np.random.Generator, n: int, n_symbols: int,
                 late_share: float) -> list[tuple[int, int, float, float]]:
    t = 1_700_000_000_000
    out = []
    for _ in range(n):
        t += int(rng.integers(0, 1_500))
        # Some ticks arrive late by up to 3 s (some late enough to be dropped).
        ts = t - int(rng.integers(0, 3_000)) if rng.random() < late_share else t
        out.append((int(rng.integers(n_symbols)), ts, float(rng.uniform(90, 110)), float(rng.uniform(0, 5))))
    return out


@pytest.mark.parametrize("seed", range(6))
def test_matches_reference_on_random_streams_with_random_batch_splits(seed: int) -> None:
    rng = np.random.default_rng(seed)
    ticks = random_ticks(rng, 3_000, 4, late_share=0.15)
    want_closed, want_open, want_late = reference(ticks, INTERVALS, 4)
    cuts = list(rng.integers(0, len(ticks), size=int(rng.integers(0, 60))))
    agg, got = run(ticks, cuts, 4)
    assert got == want_closed
    assert [agg.late_count(s) for s in range(4)] == want_late
    assert sum(want_late) > 0, "the stream should exercise the late policy"
    # A final flush far in the future closes exactly the bars still open.
    flushed = rows(agg.flush(2**52))
    assert sorted(flushed) == sorted(want_open)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2), st.integers(-2_500, 2_500), st.floats(1, 1000), st.floats(0, 10)),
                max_size=80),
       st.lists(st.integers(0, 80), max_size=10))
def test_any_split_of_any_stream_gives_the_reference_bars(raw: list[tuple[int, int, float, float]],
                                                          cuts: list[int]) -> None:
    t = 1_000_000
    ticks = []
    for s, dt, p, q in raw:
        t += max(dt, 0)
        ticks.append((s, t + min(dt, 0), p, q))
    want_closed, want_open, want_late = reference(ticks, (1_000, 5_000), 3)
    agg = BarAggregator(3, (1_000, 5_000), max_batch_ticks=max(1, len(ticks)))
    _, got = run(ticks, cuts, 3, agg)
    assert got == want_closed
    assert agg.state[:, LATE].tolist() == want_late
    assert sorted(rows(agg.flush(2**52))) == sorted(want_open)


def test_a_quiet_interval_produces_no_bar() -> None:
    agg = BarAggregator(1, (1_000,))
    out = agg.process_batch(np.array([0, 0, 0], np.int32), np.array([1_000, 1_500, 5_200], np.int64),
                            np.array([10.0, 11.0, 12.0]), np.ones(3))
    assert rows(out) == [(0, 0, 1_000, 10.0, 11.0, 10.0, 11.0, 2.0, 2)]
    assert rows(agg.flush(6_000)) == [(0, 0, 5_000, 12.0, 12.0, 12.0, 12.0, 1.0, 1)]


def test_out_of_order_ticks_inside_the_open_bar_set_open_and_close_by_event_time() -> None:
    agg = BarAggregator(1, (1_000,))
    agg.process_batch(np.zeros(3, np.int32), np.array([1_500, 1_100, 1_900], np.int64),
                      np.array([2.0, 1.0, 3.0]), np.ones(3))
    agg.process_batch(np.zeros(1, np.int32), np.array([1_200], np.int64), np.array([9.0]), np.ones(1))
    assert rows(agg.flush(2_000)) == [(0, 0, 1_000, 1.0, 9.0, 1.0, 3.0, 4.0, 4)]
    assert agg.late_count(0) == 0


def test_ticks_at_the_same_time_open_with_the_first_arrival_and_close_with_the_last() -> None:
    agg = BarAggregator(1, (1_000,))
    agg.process_batch(np.zeros(4, np.int32), np.array([1_300, 1_300, 1_700, 1_700], np.int64),
                      np.array([4.0, 5.0, 6.0, 7.0]), np.ones(4))
    assert rows(agg.flush(2_000)) == [(0, 0, 1_000, 4.0, 7.0, 4.0, 7.0, 4.0, 4)]


def test_a_tick_before_the_open_bar_is_late_and_dropped_from_every_interval() -> None:
    agg = BarAggregator(1, (1_000, 60_000))
    agg.process_batch(np.zeros(2, np.int32), np.array([1_000, 2_000], np.int64), np.array([1.0, 2.0]), np.ones(2))
    agg.process_batch(np.zeros(1, np.int32), np.array([1_999], np.int64), np.array([50.0]), np.ones(1))
    assert agg.late_count(0) == 1
    minute = [b for b in rows(agg.flush(60_000)) if b[1] == 1]
    assert minute == [(0, 1, 0, 1.0, 2.0, 1.0, 2.0, 2.0, 2)]


def test_flush_closes_a_bar_once_and_later_ticks_of_it_are_late() -> None:
    agg = BarAggregator(1, (1_000,))
    agg.process_batch(np.zeros(1, np.int32), np.array([1_100], np.int64), np.array([5.0]), np.ones(1))
    assert len(agg.flush(1_999)) == 0
    assert len(agg.flush(2_000)) == 1
    out = agg.process_batch(np.zeros(1, np.int32), np.array([1_900], np.int64), np.array([6.0]), np.ones(1))
    assert len(out) == 0 and agg.late_count(0) == 1
    assert len(agg.flush(10_000)) == 0


def test_rows_grow_and_bounds_are_checked() -> None:
    agg = BarAggregator(1, (1_000,), max_batch_ticks=4)
    with pytest.raises(IndexError):
        agg.process_batch(np.array([1], np.int32), np.array([0], np.int64), np.ones(1), np.ones(1))
    agg.grow(2)
    agg.process_batch(np.array([1], np.int32), np.array([0], np.int64), np.ones(1), np.ones(1))
    with pytest.raises(AssertionError):
        agg.process_batch(np.zeros(5, np.int32), np.zeros(5, np.int64), np.ones(5), np.ones(5))
    with pytest.raises(ValueError, match="multiple"):
        BarAggregator(1, (1_000, 1_500))
    with pytest.raises(ValueError, match="ascend"):
        BarAggregator(1, (60_000, 1_000))
