"""Batch kernels for volume indicators: TA-Lib's OBV and AD, and Fintide's VWAP.

VWAP is not a TA-Lib function. Fintide's definition (also in docs/benchmarks and the
``ta.VWAP`` docstring): a session-anchored cumulative VWAP of the typical price

    tp[t]   = (high[t] + low[t] + close[t]) / 3
    vwap[t] = sum(tp[s] * volume[s]) / sum(volume[s]),  s from the session's first bar to t

where a session starts at bar 0 and at every bar whose session id differs from the
previous bar's. A bar with a NaN input contributes nothing (its output is the running
value so far); a session whose cumulative volume is still zero outputs NaN.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from indicators._batch_common import begin_index2, begin_index4, nan_output


@njit(cache=True, error_model="numpy")
def obv_into(close: np.ndarray, volume: np.ndarray, out: np.ndarray) -> None:
    """TA_OBV: starts at the first bar's volume, then adds/subtracts on up/down closes.

    Written without branches (up/down is a coin flip on real data): an unchanged close
    adds -0.0, which is the exact identity for every double, so the result is TA-Lib's
    bit for bit, and subtracting v is adding -v.
    """
    prev_obv = volume[0]
    prev_close = close[0]
    for today in range(close.shape[0]):
        value = close[today]
        vol = volume[today]
        step = vol if value > prev_close else (-vol if value < prev_close else -0.0)
        prev_obv += step
        out[today] = prev_obv
        prev_close = value


@njit(cache=True, error_model="numpy")
def ad_into(high: np.ndarray, low: np.ndarray, close: np.ndarray, volume: np.ndarray,
            out: np.ndarray) -> None:
    """TA_AD: cumulative close-location value times volume (bars with no range add 0)."""
    total = 0.0
    for today in range(high.shape[0]):
        hi = high[today]
        lo = low[today]
        spread = hi - lo
        cl = close[today]
        if spread > 0.0:
            total += (((cl - lo) - (hi - cl)) / spread) * volume[today]
        out[today] = total


@njit(cache=True, error_model="numpy")
def obv(close: np.ndarray, volume: np.ndarray) -> np.ndarray:
    """TA_OBV with the wrapper's leading-NaN handling."""
    n = close.shape[0]
    begin = begin_index2(close, volume) if n else 0
    out = nan_output(n, begin)
    if begin < n:
        obv_into(close[begin:], volume[begin:], out[begin:])
    return out


@njit(cache=True, error_model="numpy")
def ad(high: np.ndarray, low: np.ndarray, close: np.ndarray,
       volume: np.ndarray) -> np.ndarray:
    """TA_AD."""
    n = high.shape[0]
    begin = begin_index4(high, low, close, volume) if n else 0
    out = nan_output(n, begin)
    if begin < n:
        ad_into(high[begin:], low[begin:], close[begin:], volume[begin:], out[begin:])
    return out


@njit(cache=True, error_model="numpy")
def session_ids_from_timestamps(timestamps: np.ndarray, session_s: float) -> np.ndarray:
    """Session number of each bar: floor(timestamp / session_s)."""
    ids = np.empty(timestamps.shape[0], dtype=np.int64)
    for i in range(timestamps.shape[0]):
        ids[i] = np.int64(np.floor(timestamps[i] / session_s))
    return ids


@njit(cache=True, error_model="numpy")
def vwap(high: np.ndarray, low: np.ndarray, close: np.ndarray, volume: np.ndarray,
         session_ids: np.ndarray) -> np.ndarray:
    """Session-anchored VWAP of the typical price (see the module docstring)."""
    n = high.shape[0]
    out = np.empty(n)
    price_volume = 0.0
    total_volume = 0.0
    for i in range(n):
        if i > 0 and session_ids[i] != session_ids[i - 1]:
            price_volume = 0.0
            total_volume = 0.0
        typical = (high[i] + low[i] + close[i]) / 3.0
        vol = volume[i]
        if typical == typical and vol == vol:
            price_volume += typical * vol
            total_volume += vol
        out[i] = price_volume / total_volume if total_volume != 0.0 else np.nan
    return out
