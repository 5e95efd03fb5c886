"""Tick -> bar aggregation by event time, many symbols and intervals in one Numba call.

State: one float64 row per symbol (`BarAggregator.state`, shape [n_symbols, row_width]),
so a row can live in a table and be restored on a rebalance. Row layout:

    [0] ACCEPT_FROM_MS  ticks older than this are late (starts at -inf)
    [1] LATE            late ticks dropped so far (per symbol)
    [2] ACCEPTED        ticks aggregated so far
    then per interval k, at 3 + k*9:
        START_MS, OPEN, HIGH, LOW, CLOSE, VOLUME, N_TICKS, FIRST_TS_MS, LAST_TS_MS
    N_TICKS == 0 means no bar is open for that interval.

Timestamps are stored in float64: exact for integers below 2**53 ms (year 287396).

Bars are aligned to the epoch: the bar of tick time t for interval I starts at
floor(t / I) * I and covers [start, start + I). Every interval must be a multiple of the
first (finest) one, e.g. 1s, 1m, 5m, 1h.

Closing: a bar closes when a tick of the same symbol arrives in a later bucket (event
time, not wall time), or when `flush(watermark_ms)` says event time has passed its end
(for symbols that go quiet). Gaps: no empty bars. An interval in which a symbol had no
tick produces no bar; consumers see the next bar's open_ts jump.

Late ticks (one policy for every interval, so all intervals aggregate the same accepted
tick stream and a 1m bar is exactly the merge of its 1s bars): a tick is late when its
time is before ACCEPT_FROM_MS, i.e. before the start of the symbol's open bar of the
finest interval, or before the end of a bar already closed by `flush`. Late ticks are
dropped and counted in LATE. Ticks out of order inside the open bar are fine: OPEN is
the price of the earliest tick by event time (first arrival on a tie), CLOSE of the
latest (last arrival on a tie); HIGH, LOW, VOLUME and N_TICKS do not depend on order.

Output of one call: closed bars in the order they closed (per symbol: chronological,
finer interval first for the same tick), written into preallocated arrays
(`BarOutput`); a call on n ticks closes at most n * n_intervals bars, which bounds the
buffers up front.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit

ACCEPT_FROM_MS = 0
LATE = 1
ACCEPTED = 2
HEADER_WIDTH = 3

START_MS = 0
OPEN = 1
HIGH = 2
LOW = 3
CLOSE = 4
VOLUME = 5
N_TICKS = 6
FIRST_TS_MS = 7
LAST_TS_MS = 8
BAR_WIDTH = 9

MAX_INTERVALS = 8
MAX_BATCH_TICKS = 1 << 20
MAX_SYMBOLS = 1 << 22
DEFAULT_INTERVALS_MS = (1_000, 60_000, 300_000, 3_600_000)


def row_width(n_intervals: int) -> int:
    return HEADER_WIDTH + n_intervals * BAR_WIDTH


@njit(cache=True)
def init_rows(state: np.ndarray) -> None:
    for s in range(state.shape[0]):
        state[s, :] = 0.0
        state[s, ACCEPT_FROM_MS] = -np.inf


@njit(cache=True)
def _emit(row: np.ndarray, base: int, sym: int, k: int, n_out: int, out_sym: np.ndarray,
          out_interval: np.ndarray, out_open_ts: np.ndarray, out_ohlcv: np.ndarray,
          out_n: np.ndarray) -> int:
    out_sym[n_out] = sym
    out_interval[n_out] = k
    out_open_ts[n_out] = np.int64(row[base + START_MS])
    for j in range(5):
        out_ohlcv[n_out, j] = row[base + OPEN + j]
    out_n[n_out] = np.int64(row[base + N_TICKS])
    row[base + N_TICKS] = 0.0
    return n_out + 1


@njit(cache=True)
def _add_tick(row: np.ndarray, base: int, start: float, t: float, p: float, q: float) -> None:
    if row[base + N_TICKS] == 0.0:
        row[base + START_MS] = start
        row[base + OPEN] = p
        row[base + HIGH] = p
        row[base + LOW] = p
        row[base + CLOSE] = p
        row[base + VOLUME] = q
        row[base + N_TICKS] = 1.0
        row[base + FIRST_TS_MS] = t
        row[base + LAST_TS_MS] = t
        return
    if p > row[base + HIGH]:
        row[base + HIGH] = p
    if p < row[base + LOW]:
        row[base + LOW] = p
    row[base + VOLUME] += q
    row[base + N_TICKS] += 1.0
    if t < row[base + FIRST_TS_MS]:
        row[base + FIRST_TS_MS] = t
        row[base + OPEN] = p
    if t >= row[base + LAST_TS_MS]:
        row[base + LAST_TS_MS] = t
        row[base + CLOSE] = p


@njit(cache=True)
def aggregate(state: np.ndarray, intervals_ms: np.ndarray, sym: np.ndarray, ts_ms: np.ndarray,
              price: np.ndarray, size: np.ndarray, out_sym: np.ndarray, out_interval: np.ndarray,
              out_open_ts: np.ndarray, out_ohlcv: np.ndarray, out_n: np.ndarray) -> int:
    """Fold ticks into the open bars; write bars that close into out_*; return their count."""
    n_intervals = intervals_ms.shape[0]
    finest = intervals_ms[0]
    n_out = 0
    for i in range(sym.shape[0]):
        s = sym[i]
        t = ts_ms[i]
        row = state[s]
        if t < row[ACCEPT_FROM_MS]:
            row[LATE] += 1.0
            continue
        tf = float(t)
        for k in range(n_intervals):
            base = HEADER_WIDTH + k * BAR_WIDTH
            width = intervals_ms[k]
            # Python-style floor division: right for negative times too.
            start = float((t // width) * width)
            if row[base + N_TICKS] > 0.0 and start > row[base + START_MS]:
                n_out = _emit(row, base, s, k, n_out, out_sym, out_interval, out_open_ts, out_ohlcv, out_n)
            _add_tick(row, base, start, tf, price[i], size[i])
        row[ACCEPTED] += 1.0
        finest_start = float((t // finest) * finest)
        if finest_start > row[ACCEPT_FROM_MS]:
            row[ACCEPT_FROM_MS] = finest_start
    return n_out


@njit(cache=True)
def flush(state: np.ndarray, intervals_ms: np.ndarray, watermark_ms: np.int64, out_sym: np.ndarray,
          out_interval: np.ndarray, out_open_ts: np.ndarray, out_ohlcv: np.ndarray,
          out_n: np.ndarray) -> int:
    """Close every open bar that ends at or before `watermark_ms`; return the count.

    Ticks before the end of a bar closed here become late for its symbol, so a bar is
    never emitted twice.
    """
    n_out = 0
    for s in range(state.shape[0]):
        row = state[s]
        for k in range(intervals_ms.shape[0]):
            base = HEADER_WIDTH + k * BAR_WIDTH
            end = row[base + START_MS] + float(intervals_ms[k])
            if row[base + N_TICKS] > 0.0 and end <= float(watermark_ms):
                n_out = _emit(row, base, s, k, n_out, out_sym, out_interval, out_open_ts, out_ohlcv, out_n)
                if end > row[ACCEPT_FROM_MS]:
                    row[ACCEPT_FROM_MS] = end
    return n_out


@dataclass(frozen=True, slots=True)
class BarOutput:
    """Closed bars of one call: views of the first `n` entries of the output buffers."""

    sym: np.ndarray  # int32, symbol row
    interval: np.ndarray  # int32, index into the aggregator's intervals_ms
    open_ts_ms: np.ndarray  # int64
    ohlcv: np.ndarray  # float64 [n, 5]: open, high, low, close, volume
    n_ticks: np.ndarray  # int64

    def __len__(self) -> int:
        return int(self.sym.shape[0])


class BarAggregator:
    """Bars of `n_symbols` symbols for `intervals_ms` (ascending, multiples of the first)."""

    def __init__(self, n_symbols: int = 0, intervals_ms: tuple[int, ...] = DEFAULT_INTERVALS_MS,
                 max_batch_ticks: int = 65_536) -> None:
        _check_intervals(intervals_ms)
        if not 1 <= max_batch_ticks <= MAX_BATCH_TICKS:
            raise ValueError(f"max_batch_ticks must be in [1, {MAX_BATCH_TICKS}]")
        self.intervals_ms = np.asarray(intervals_ms, dtype=np.int64)
        self.row_width = row_width(len(intervals_ms))
        self.max_batch_ticks = max_batch_ticks
        self._buf = np.empty((0, self.row_width), dtype=np.float64)
        self._n_symbols = 0
        self._out = _buffers(max_batch_ticks * len(intervals_ms))
        self.grow(n_symbols)

    @property
    def n_symbols(self) -> int:
        return self._n_symbols

    @property
    def state(self) -> np.ndarray:
        """The [n_symbols, row_width] state (a view: writes go to the aggregator)."""
        return self._buf[: self._n_symbols]

    def grow(self, n_symbols: int) -> None:
        """Add empty rows up to `n_symbols` (a new symbol's first tick is never late).

        Capacity doubles, so adding symbols one by one costs amortised O(1) row copies.
        """
        if not 0 <= n_symbols <= MAX_SYMBOLS:
            raise ValueError(f"n_symbols must be in [0, {MAX_SYMBOLS}]")
        if n_symbols <= self._n_symbols:
            return
        self._buf = grow_rows(self._buf, self._n_symbols, n_symbols)
        init_rows(self._buf[self._n_symbols:n_symbols])
        self._n_symbols = n_symbols

    def late_count(self, sym: int) -> int:
        return int(self.state[sym, LATE])

    def process_batch(self, sym: np.ndarray, ts_ms: np.ndarray, price: np.ndarray,
                      size: np.ndarray) -> BarOutput:
        """Aggregate one tick batch; returns the bars it closed (valid until the next call)."""
        n = int(sym.shape[0])
        assert n <= self.max_batch_ticks, f"{n} ticks exceed max_batch_ticks={self.max_batch_ticks}"
        assert ts_ms.shape == (n,) and price.shape == (n,) and size.shape == (n,), "tick columns differ in length"
        if n and (int(sym.min()) < 0 or int(sym.max()) >= self.n_symbols):
            raise IndexError(f"symbol rows outside [0, {self.n_symbols}); grow() first")
        out = self._out
        count = aggregate(self.state, self.intervals_ms, np.ascontiguousarray(sym, dtype=np.int32),
                          np.ascontiguousarray(ts_ms, dtype=np.int64),
                          np.ascontiguousarray(price, dtype=np.float64),
                          np.ascontiguousarray(size, dtype=np.float64), *out)
        return _view(out, count)

    def flush(self, watermark_ms: int) -> BarOutput:
        """Close bars that end at or before `watermark_ms` (event time)."""
        needed = self.n_symbols * len(self.intervals_ms)
        if needed > self._out[0].shape[0]:
            self._out = _buffers(needed)
        count = flush(self.state, self.intervals_ms, np.int64(watermark_ms), *self._out)
        return _view(self._out, count)


def grow_rows(buf: np.ndarray, used: int, wanted: int) -> np.ndarray:
    """`buf` with room for `wanted` rows (first `used` kept): capacity doubles, so adding
    rows one at a time costs amortised O(1) copies. New rows are uninitialised."""
    if wanted <= buf.shape[0]:
        return buf
    capacity = max(wanted, 2 * buf.shape[0])
    bigger = np.empty((capacity, *buf.shape[1:]), dtype=buf.dtype)
    bigger[:used] = buf[:used]
    return bigger


def _check_intervals(intervals_ms: tuple[int, ...]) -> None:
    if not 1 <= len(intervals_ms) <= MAX_INTERVALS:
        raise ValueError(f"between 1 and {MAX_INTERVALS} intervals, got {len(intervals_ms)}")
    finest = intervals_ms[0]
    for a, b in zip(intervals_ms, intervals_ms[1:]):
        if b <= a:
            raise ValueError(f"intervals must ascend: {intervals_ms}")
    for width in intervals_ms:
        if width <= 0 or width % finest:
            # Nested buckets are what makes one late-tick rule right for every interval.
            raise ValueError(f"every interval must be a positive multiple of {finest} ms, got {width}")


def _buffers(capacity: int) -> tuple[np.ndarray, ...]:
    return (np.empty(capacity, np.int32), np.empty(capacity, np.int32), np.empty(capacity, np.int64),
            np.empty((capacity, 5), np.float64), np.empty(capacity, np.int64))


def _view(out: tuple[np.ndarray, ...], count: int) -> BarOutput:
    return BarOutput(out[0][:count], out[1][:count], out[2][:count], out[3][:count], out[4][:count])
