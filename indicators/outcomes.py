"""Signal outcomes and running performance, one Numba call per batch of bars.

Each signal is tracked on its stream row (symbol x interval) for `horizons` bars (e.g.
5, 15, 60). On every later bar of that row:

* first touch: for a buy, the bar's low at or below the stop, or high at or above the
  target, closes the trade at that level (stop, target); for a sell mirrored. When one bar
  touches both we cannot tell which came first and count the stop (conservative). Exits
  are at the level itself: no slippage, gaps through a level are not penalised.
* at each horizon h (the h-th bar after the signal's bar) an outcome is recorded:
  realised_return = side * (exit / entry - 1), where exit is the touched level if the
  trade was closed by bar h, else the close of bar h; hit = realised_return > 0. So a
  target reached first is a hit, a stop reached first a miss, and an open trade is
  judged by its mark-to-market sign.

Performance per (row, strategy, horizon), updated in O(1) per outcome: count, hits,
sum of returns, gross profit, gross loss, Welford mean and M2 of returns, the cumulative
return curve (sum of per-signal returns in resolution order), its running peak (starting
at 0) and the largest peak-to-trough drop. `OutcomeTracker.performance()` derives hit rate,
average return, profit factor (gross profit / gross loss; inf without losses), Sharpe
(mean / sample std of per-signal returns, not annualised; NaN below 2 outcomes or zero
spread) and max drawdown.

State, per stream row, one float64 row each:

pending row: [0] ACTIVE slots in use, [1] OVERFLOW signals not tracked because all
    `max_pending` slots were busy (counted, never silent), then max_pending slots of
    SLOT_WIDTH: active, signal ts, strategy, side, entry, target, stop, bars elapsed,
    touch (0 none, 1 target, 2 stop), exit price, next horizon index, model row, x[M].
perf row: N_STRATEGIES x n_horizons cells of PERF_WIDTH (fields P_*).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit

from indicators.bars import grow_rows
from indicators.signals import N_MODEL_FEATURES, N_STRATEGIES

M = N_MODEL_FEATURES
# pending row header
ACTIVE = 0
OVERFLOW = 1
PENDING_HEADER = 2
# slot fields
S_ACTIVE, S_SIGNAL_TS, S_STRATEGY, S_SIDE, S_ENTRY, S_TARGET, S_STOP, S_ELAPSED, S_TOUCH, S_EXIT, \
    S_NEXT_H, S_MODEL = range(12)
S_X = 12
SLOT_WIDTH = S_X + M
# exits
EXIT_HORIZON, EXIT_TARGET, EXIT_STOP = 0, 1, 2
EXITS = ("horizon", "target", "stop")
# perf cell fields
P_COUNT, P_HITS, P_SUM, P_GROSS_PROFIT, P_GROSS_LOSS, P_MEAN, P_M2, P_CUM, P_PEAK, P_MAX_DD = range(10)
PERF_WIDTH = 10

MAX_HORIZONS = 8
MAX_HORIZON_BARS = 100_000
MAX_PENDING = 1_024
MAX_ROWS = 1 << 22
MAX_BATCH_BARS = 1 << 20
DEFAULT_HORIZONS = (5, 15, 60)


@njit(cache=True)
def _update_perf(perf_row: np.ndarray, cell: int, ret: float) -> None:
    base = cell * PERF_WIDTH
    perf_row[base + P_COUNT] += 1.0
    n = perf_row[base + P_COUNT]
    if ret > 0.0:
        perf_row[base + P_HITS] += 1.0
        perf_row[base + P_GROSS_PROFIT] += ret
    else:
        perf_row[base + P_GROSS_LOSS] -= ret
    perf_row[base + P_SUM] += ret
    delta = ret - perf_row[base + P_MEAN]
    perf_row[base + P_MEAN] += delta / n
    perf_row[base + P_M2] += delta * (ret - perf_row[base + P_MEAN])
    cum = perf_row[base + P_CUM] + ret
    perf_row[base + P_CUM] = cum
    if cum > perf_row[base + P_PEAK]:
        perf_row[base + P_PEAK] = cum
    drawdown = perf_row[base + P_PEAK] - cum
    if drawdown > perf_row[base + P_MAX_DD]:
        perf_row[base + P_MAX_DD] = drawdown


@njit(cache=True)
def _touch(slot: np.ndarray, high: float, low: float) -> None:
    side = slot[S_SIDE]
    if side > 0:
        stop_hit = low <= slot[S_STOP]
        target_hit = high >= slot[S_TARGET]
    else:
        stop_hit = high >= slot[S_STOP]
        target_hit = low <= slot[S_TARGET]
    if stop_hit:
        slot[S_TOUCH] = EXIT_STOP
        slot[S_EXIT] = slot[S_STOP]
    elif target_hit:
        slot[S_TOUCH] = EXIT_TARGET
        slot[S_EXIT] = slot[S_TARGET]


@njit(cache=True)
def _advance(pending_row: np.ndarray, perf_row: np.ndarray, r: int, horizons: np.ndarray, ts: np.int64,
             high: float, low: float, close: float, n_out: int, out_i: np.ndarray, out_f: np.ndarray,
             out_x: np.ndarray) -> int:
    n_h = horizons.shape[0]
    n_slots = (pending_row.shape[0] - PENDING_HEADER) // SLOT_WIDTH
    for k in range(n_slots):
        if pending_row[ACTIVE] == 0.0:
            break
        slot = pending_row[PENDING_HEADER + k * SLOT_WIDTH: PENDING_HEADER + (k + 1) * SLOT_WIDTH]
        if slot[S_ACTIVE] == 0.0:
            continue
        slot[S_ELAPSED] += 1.0
        if slot[S_TOUCH] == EXIT_HORIZON:
            _touch(slot, high, low)
        h = int(slot[S_NEXT_H])
        while h < n_h and slot[S_ELAPSED] >= horizons[h]:
            exit_price = slot[S_EXIT] if slot[S_TOUCH] != EXIT_HORIZON else close
            ret = slot[S_SIDE] * (exit_price / slot[S_ENTRY] - 1.0)
            strategy = int(slot[S_STRATEGY])
            _update_perf(perf_row, strategy * n_h + h, ret)
            out_i[n_out, 0] = r
            out_i[n_out, 1] = np.int64(slot[S_SIGNAL_TS])
            out_i[n_out, 2] = strategy
            out_i[n_out, 3] = h
            out_i[n_out, 4] = np.int64(slot[S_SIDE])
            out_i[n_out, 5] = 1 if ret > 0.0 else 0
            out_i[n_out, 6] = np.int64(slot[S_TOUCH])
            out_i[n_out, 7] = ts
            out_i[n_out, 8] = np.int64(slot[S_MODEL])
            out_f[n_out] = ret
            out_x[n_out, :] = slot[S_X:S_X + M]
            n_out += 1
            h += 1
        slot[S_NEXT_H] = h
        if h >= n_h:
            slot[S_ACTIVE] = 0.0
            pending_row[ACTIVE] -= 1.0
    return n_out


@njit(cache=True)
def _register(pending_row: np.ndarray, sig_ts: np.int64, strategy: int, side: int, entry: float,
              target: float, stop: float, model: int, x: np.ndarray) -> None:
    n_slots = (pending_row.shape[0] - PENDING_HEADER) // SLOT_WIDTH
    if pending_row[ACTIVE] >= n_slots:
        pending_row[OVERFLOW] += 1.0
        return
    for k in range(n_slots):
        base = PENDING_HEADER + k * SLOT_WIDTH
        if pending_row[base + S_ACTIVE] == 0.0:
            slot = pending_row[base: base + SLOT_WIDTH]
            slot[S_ACTIVE] = 1.0
            slot[S_SIGNAL_TS] = float(sig_ts)
            slot[S_STRATEGY] = strategy
            slot[S_SIDE] = side
            slot[S_ENTRY] = entry
            slot[S_TARGET] = target
            slot[S_STOP] = stop
            slot[S_ELAPSED] = 0.0
            slot[S_TOUCH] = EXIT_HORIZON
            slot[S_EXIT] = np.nan
            slot[S_NEXT_H] = 0.0
            slot[S_MODEL] = model
            slot[S_X:S_X + M] = x
            pending_row[ACTIVE] += 1.0
            return


@njit(cache=True)
def track(pending: np.ndarray, perf: np.ndarray, horizons: np.ndarray, bar_rows: np.ndarray,
          bar_ts: np.ndarray, bar_high: np.ndarray, bar_low: np.ndarray, bar_close: np.ndarray,
          sig_bar: np.ndarray, sig_ts: np.ndarray, sig_strategy: np.ndarray, sig_side: np.ndarray,
          sig_price: np.ndarray, sig_target: np.ndarray, sig_stop: np.ndarray, sig_model: np.ndarray,
          sig_x: np.ndarray, out_i: np.ndarray, out_f: np.ndarray, out_x: np.ndarray) -> int:
    """Advance pending signals bar by bar, then start tracking the bar's new signals.

    Bars are in event order per row. Signal q fired on bar sig_bar[q] (non-decreasing)
    and is tracked on that bar's row from the next bar on. Outcomes go to out_*: out_i
    columns (row, signal ts, strategy, horizon index, side, hit, exit, resolved bar ts,
    model row), out_f the realised return, out_x the signal's features. Returns the count.
    """
    n_out = 0
    q = 0
    n_sig = sig_bar.shape[0]
    for j in range(bar_rows.shape[0]):
        r = bar_rows[j]
        n_out = _advance(pending[r], perf[r], r, horizons, bar_ts[j], bar_high[j], bar_low[j], bar_close[j],
                         n_out, out_i, out_f, out_x)
        while q < n_sig and sig_bar[q] == j:
            _register(pending[r], sig_ts[q], sig_strategy[q], sig_side[q], sig_price[q], sig_target[q],
                      sig_stop[q], sig_model[q], sig_x[q])
            q += 1
        if q < n_sig and sig_bar[q] < j:
            raise ValueError("signals must be ordered by bar")
    if q != n_sig:
        raise ValueError("a signal refers to a bar outside the batch")
    return n_out


@dataclass(frozen=True, slots=True)
class Outcomes:
    """Outcomes resolved by one call (views valid until the next call)."""

    row: np.ndarray
    signal_ts_ms: np.ndarray
    strategy: np.ndarray
    horizon: np.ndarray  # index into the tracker's horizons
    side: np.ndarray
    hit: np.ndarray
    exit: np.ndarray  # EXIT_HORIZON / EXIT_TARGET / EXIT_STOP
    resolved_ts_ms: np.ndarray
    model: np.ndarray
    realised_return: np.ndarray
    x: np.ndarray

    def __len__(self) -> int:
        return int(self.row.shape[0])


class OutcomeTracker:
    """Pending signals and performance for `n_rows` stream rows."""

    def __init__(self, n_rows: int = 0, horizons: tuple[int, ...] = DEFAULT_HORIZONS,
                 max_pending: int = 32) -> None:
        if not 1 <= len(horizons) <= MAX_HORIZONS or list(horizons) != sorted(set(horizons)):
            raise ValueError(f"1..{MAX_HORIZONS} strictly ascending horizons, got {horizons}")
        if not (1 <= horizons[0] and horizons[-1] <= MAX_HORIZON_BARS):
            raise ValueError(f"horizons must be in [1, {MAX_HORIZON_BARS}] bars")
        if not 1 <= max_pending <= MAX_PENDING:
            raise ValueError(f"max_pending must be in [1, {MAX_PENDING}]")
        self.horizons = np.asarray(horizons, dtype=np.int64)
        self.max_pending = max_pending
        self.pending_width = PENDING_HEADER + max_pending * SLOT_WIDTH
        self.perf_width = N_STRATEGIES * len(horizons) * PERF_WIDTH
        self._pending = np.zeros((0, self.pending_width))
        self._perf = np.zeros((0, self.perf_width))
        self._n = 0
        self._out = _buffers(1024)
        self.grow(n_rows)

    @property
    def n_rows(self) -> int:
        return self._n

    @property
    def pending(self) -> np.ndarray:
        return self._pending[: self._n]

    @property
    def perf(self) -> np.ndarray:
        return self._perf[: self._n]

    def grow(self, n_rows: int) -> None:
        if not 0 <= n_rows <= MAX_ROWS:
            raise ValueError(f"n_rows must be in [0, {MAX_ROWS}]")
        if n_rows > self._n:
            self._pending = grow_rows(self._pending, self._n, n_rows)
            self._perf = grow_rows(self._perf, self._n, n_rows)
            self._pending[self._n:n_rows] = 0.0
            self._perf[self._n:n_rows] = 0.0
            self._n = n_rows

    def overflow(self, row: int) -> int:
        return int(self.pending[row, OVERFLOW])

    def process_batch(self, bar_rows: np.ndarray, bar_ts_ms: np.ndarray, high: np.ndarray, low: np.ndarray,
                      close: np.ndarray, sig_bar: np.ndarray, sig_ts_ms: np.ndarray, sig_strategy: np.ndarray,
                      sig_side: np.ndarray, sig_price: np.ndarray, sig_target: np.ndarray, sig_stop: np.ndarray,
                      sig_model: np.ndarray, sig_x: np.ndarray) -> Outcomes:
        n, n_sig = int(bar_rows.shape[0]), int(sig_bar.shape[0])
        assert n <= MAX_BATCH_BARS, f"{n} bars exceed {MAX_BATCH_BARS}"
        for arr in (bar_ts_ms, high, low, close):
            assert arr.shape == (n,), "bar columns differ in length"
        for arr in (sig_ts_ms, sig_strategy, sig_side, sig_price, sig_target, sig_stop, sig_model):
            assert arr.shape == (n_sig,), "signal columns differ in length"
        assert sig_x.shape == (n_sig, M), f"sig_x must be [{n_sig}, {M}]"
        if n and (int(bar_rows.min()) < 0 or int(bar_rows.max()) >= self._n):
            raise IndexError(f"rows outside [0, {self._n}); grow() first")
        # Every pending or new signal resolves at most once per horizon: an exact bound.
        needed = (int(self.pending[:, ACTIVE].sum()) + n_sig) * len(self.horizons)
        if needed > self._out[0].shape[0]:
            self._out = _buffers(needed)
        i64, f64 = np.int64, np.float64
        out_i, out_f, out_x = self._out
        count = track(self.pending, self.perf, self.horizons, _c(bar_rows, i64), _c(bar_ts_ms, i64), _c(high, f64),
                      _c(low, f64), _c(close, f64), _c(sig_bar, i64), _c(sig_ts_ms, i64), _c(sig_strategy, i64),
                      _c(sig_side, i64), _c(sig_price, f64), _c(sig_target, f64), _c(sig_stop, f64),
                      _c(sig_model, i64), _c(sig_x, f64), out_i, out_f, out_x)
        ci = out_i[:count]
        return Outcomes(ci[:, 0], ci[:, 1], ci[:, 2], ci[:, 3], ci[:, 4], ci[:, 5], ci[:, 6], ci[:, 7], ci[:, 8],
                        out_f[:count], out_x[:count])

    def performance(self) -> dict[str, np.ndarray]:
        """Arrays of shape [n_rows, N_STRATEGIES, n_horizons]: count, hit_rate,
        avg_return, profit_factor, sharpe, max_drawdown, cum_return (NaN where undefined)."""
        cells = self.perf.reshape(self._n, N_STRATEGIES, len(self.horizons), PERF_WIDTH)
        count = cells[..., P_COUNT]
        with np.errstate(divide="ignore", invalid="ignore"):
            std = np.sqrt(cells[..., P_M2] / (count - 1.0))
            gross_loss = cells[..., P_GROSS_LOSS]
            profit_factor = np.where(gross_loss > 0, cells[..., P_GROSS_PROFIT] / gross_loss,
                                     np.where(cells[..., P_GROSS_PROFIT] > 0, np.inf, np.nan))
            return {
                "count": count.astype(np.int64),
                "hit_rate": np.where(count > 0, cells[..., P_HITS] / count, np.nan),
                "avg_return": np.where(count > 0, cells[..., P_SUM] / count, np.nan),
                "profit_factor": profit_factor,
                "sharpe": np.where((count >= 2) & (std > 0), cells[..., P_MEAN] / std, np.nan),
                "max_drawdown": np.where(count > 0, cells[..., P_MAX_DD], np.nan),
                "cum_return": cells[..., P_CUM].copy(),
            }


def _c(arr: np.ndarray, dtype: type) -> np.ndarray:
    return np.ascontiguousarray(arr, dtype=dtype)


def _buffers(capacity: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return np.empty((capacity, 9), np.int64), np.empty(capacity, np.float64), np.empty((capacity, M), np.float64)
