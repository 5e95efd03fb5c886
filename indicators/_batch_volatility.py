"""Batch kernels for TA-Lib's volatility indicators: TRANGE, ATR, NATR.

The true range is computed exactly as TA-Lib does (start from high-low, then replace it
by a larger previous-close distance), which also fixes its NaN behaviour: a NaN
previous close loses both comparisons and leaves high-low in place. ATR/NATR smooth it
with Wilder's recursion written as TA-Lib 0.8 does, ``fma(beta, prev, alpha * tr)`` with
``beta = (n-1)/n`` and ``alpha = 1 - beta``.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from indicators._batch_common import begin_index3, fma, nan_output


@njit(cache=True, error_model="numpy")
def true_range(high: float, low: float, prev_close: float) -> float:
    """Greatest of high-low, |prev_close-high|, |prev_close-low| (TA-Lib's order)."""
    greatest = high - low
    dist_high = abs(prev_close - high)
    if dist_high > greatest:
        greatest = dist_high
    dist_low = abs(prev_close - low)
    if dist_low > greatest:
        greatest = dist_low
    return greatest


@njit(cache=True, error_model="numpy")
def trange_into(high: np.ndarray, low: np.ndarray, close: np.ndarray,
                out: np.ndarray) -> None:
    """TA_TRANGE from bar 1 (bar 0 has no previous close)."""
    highs = high[1:]
    lows = low[1:]
    dst = out[1:]
    for k in range(highs.shape[0]):
        dst[k] = true_range(highs[k], lows[k], close[k])


@njit(cache=True, error_model="numpy")
def _atr_seed(high: np.ndarray, low: np.ndarray, close: np.ndarray,
              period: int) -> float:
    """Mean of the first ``period`` true ranges (bars 1..period)."""
    total = 0.0
    for today in range(1, period + 1):
        total += true_range(high[today], low[today], close[today - 1])
    return total / period


@njit(cache=True, error_model="numpy")
def atr_into(high: np.ndarray, low: np.ndarray, close: np.ndarray, period: int,
             out: np.ndarray) -> None:
    """TA_ATR: Wilder-smoothed true range, first value at bar ``period``."""
    beta = (period - 1) / period
    alpha = 1.0 - beta
    prev = _atr_seed(high, low, close, period)
    out[period] = prev
    highs = high[period + 1:]
    lows = low[period + 1:]
    prev_closes = close[period:]
    dst = out[period + 1:]
    for k in range(highs.shape[0]):
        tr = true_range(highs[k], lows[k], prev_closes[k])
        prev = fma(beta, prev, alpha * tr)
        dst[k] = prev


@njit(cache=True, error_model="numpy")
def natr_into(high: np.ndarray, low: np.ndarray, close: np.ndarray, period: int,
              out: np.ndarray) -> None:
    """TA_NATR: ATR / close * 100; a zero close gives 0 and period 1 is the raw TR."""
    if period <= 1:
        # TA-Lib leaves period 1 unnormalised: NATR(1) is TRANGE
        atr_into(high, low, close, period, out)
        return
    beta = (period - 1) / period
    alpha = 1.0 - beta
    prev = _atr_seed(high, low, close, period)
    out[period] = _percent_of_close(prev, close[period])
    highs = high[period + 1:]
    lows = low[period + 1:]
    closes = close[period + 1:]
    prev_closes = close[period:]
    dst = out[period + 1:]
    for k in range(highs.shape[0]):
        tr = true_range(highs[k], lows[k], prev_closes[k])
        prev = fma(beta, prev, alpha * tr)
        dst[k] = _percent_of_close(prev, closes[k])


@njit(cache=True, error_model="numpy")
def _percent_of_close(atr_value: float, close: float) -> float:
    """ATR as a percentage of the close, 0 for a zero close."""
    percent = (atr_value / close) * 100.0
    return percent if close != 0.0 else 0.0


@njit(cache=True, error_model="numpy")
def trange(high: np.ndarray, low: np.ndarray, close: np.ndarray) -> np.ndarray:
    """TA_TRANGE with the wrapper's leading-NaN handling."""
    n = high.shape[0]
    begin = begin_index3(high, low, close) if n else 0
    out = nan_output(n, begin + 1)
    if begin + 1 < n:
        trange_into(high[begin:], low[begin:], close[begin:], out[begin:])
    return out


@njit(cache=True, error_model="numpy")
def atr(high: np.ndarray, low: np.ndarray, close: np.ndarray, period: int) -> np.ndarray:
    """TA_ATR."""
    n = high.shape[0]
    begin = begin_index3(high, low, close) if n else 0
    out = nan_output(n, begin + period)
    if begin + period < n:
        atr_into(high[begin:], low[begin:], close[begin:], period, out[begin:])
    return out


@njit(cache=True, error_model="numpy")
def natr(high: np.ndarray, low: np.ndarray, close: np.ndarray, period: int) -> np.ndarray:
    """TA_NATR."""
    n = high.shape[0]
    begin = begin_index3(high, low, close) if n else 0
    out = nan_output(n, begin + period)
    if begin + period < n:
        natr_into(high[begin:], low[begin:], close[begin:], period, out[begin:])
    return out
