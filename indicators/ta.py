"""TA-Lib-compatible batch indicators on Numba kernels.

``from indicators import ta; ta.RSI(close, timeperiod=14)`` takes the same names,
parameters, defaults and output tuples as ``talib``'s function API (ta-lib 0.8.2 with
its bundled C library 0.8.1) and returns the same values: the same NaN bars, including
TA-Lib's handling of leading NaNs and NaN gaps, and the same floating-point results
(bit for bit on everything the test-suite compares).

Differences from ``talib`` at the edge, all deliberate:

* inputs are anything ``np.ascontiguousarray(x, dtype=np.float64)`` accepts (lists,
  ints, float32, pandas Series); outputs are always float64 ndarrays;
* bad arguments raise ``ValueError`` (bad period or value, mismatched lengths,
  not 1-D), ``TypeError`` (a non-integer period) or ``NotImplementedError`` (an MA type
  TA-Lib has but these kernels do not: TRIMA, KAMA, MAMA, T3, HMA, ZLEMA, RMA), where
  ``talib`` raises a bare ``Exception``;
* ``VWAP`` is Fintide's own (TA-Lib has none), see its docstring.

The wrappers only check and convert; the work happens in ``@numba.njit(cache=True)``
kernels in ``indicators._batch_*``.
"""

# ruff: noqa: N802 - the public names are TA-Lib's
from __future__ import annotations

import operator
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from indicators import _batch_momentum as momentum
from indicators import _batch_overlap as overlap
from indicators import _batch_volatility as volatility
from indicators import _batch_volume as volume_kernels

__all__ = [
    "AD", "ADX", "ATR", "BBANDS", "CCI", "DEMA", "EMA", "MACD", "MA_Type", "MFI",
    "MINUS_DI", "MOM", "NATR", "OBV", "PLUS_DI", "ROC", "RSI", "SAR", "SMA", "STDDEV",
    "STOCH", "STOCHF", "TEMA", "TRANGE", "VWAP", "WILLR", "WMA",
]

Array = NDArray[np.float64]

MAX_PERIOD = 100000
# TA-Lib's TA_REAL_MIN / TA_REAL_MAX bounds for real-valued options.
REAL_LIMIT = 3e37


class MA_Type:  # noqa: N801 - mirrors talib.MA_Type
    """TA-Lib's MA type codes (``talib.MA_Type``)."""

    SMA = 0
    EMA = 1
    WMA = 2
    DEMA = 3
    TEMA = 4
    TRIMA = 5
    KAMA = 6
    MAMA = 7
    T3 = 8
    HMA = 9
    DISABLED = 10
    DEFAULT = 11
    ZLEMA = 12
    RMA = 13


_SUPPORTED_MA_TYPES = frozenset({0, 1, 2, 3, 4, 10})
_MA_TYPE_NAMES = {v: k for k, v in vars(MA_Type).items() if isinstance(v, int)}


# --- argument checks -------------------------------------------------------------------


def _real(func: str, name: str, values: ArrayLike) -> Array:
    """``values`` as a contiguous 1-D float64 array."""
    if np.ndim(values) != 1:
        raise ValueError(f"{func}: input '{name}' must be 1-D, got shape "
                         f"{np.shape(values)}")
    return np.ascontiguousarray(values, dtype=np.float64)


def _series(func: str, **inputs: ArrayLike) -> list[Array]:
    """Convert every input and check that they all have the same length."""
    arrays = [_real(func, name, values) for name, values in inputs.items()]
    lengths = {name: a.shape[0] for name, a in zip(inputs, arrays, strict=True)}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"{func}: input arrays have different lengths {lengths}")
    return arrays


def _period(func: str, name: str, value: Any, low: int, high: int = MAX_PERIOD) -> int:
    """An integer option within TA-Lib's range [low, high]."""
    try:
        period = operator.index(value)
    except TypeError:
        raise TypeError(f"{func}: {name} must be an integer, got {value!r}") from None
    if not low <= period <= high:
        raise ValueError(f"{func}: {name}={period} is out of range [{low}, {high}]")
    return period


def _option(func: str, name: str, value: Any, low: float = -REAL_LIMIT,
            high: float = REAL_LIMIT) -> float:
    """A finite real option within TA-Lib's range [low, high]."""
    number = float(value)
    if not low <= number <= high:  # also rejects NaN
        raise ValueError(f"{func}: {name}={number!r} is out of range [{low:g}, {high:g}]")
    return number


def _matype(func: str, name: str, value: Any) -> int:
    """An MA type the kernels implement; DEFAULT means the function's own, SMA."""
    code = _period(func, name, value, 0, MA_Type.RMA)
    if code == MA_Type.DEFAULT:
        return MA_Type.SMA
    if code not in _SUPPORTED_MA_TYPES:
        raise NotImplementedError(
            f"{func}: {name}={code} ({_MA_TYPE_NAMES[code]}) is not implemented; "
            "supported: SMA=0, EMA=1, WMA=2, DEMA=3, TEMA=4, DISABLED=10, DEFAULT=11")
    return code


# --- overlap studies ---------------------------------------------------------------


def SMA(real: ArrayLike, timeperiod: int = 30) -> Array:
    """Simple moving average (TA-Lib's running sum: a NaN poisons the rest)."""
    period = _period("SMA", "timeperiod", timeperiod, 1)
    return overlap.sma(_real("SMA", "real", real), period)


def EMA(real: ArrayLike, timeperiod: int = 30) -> Array:
    """Exponential MA, k = 2/(n+1), seeded with the SMA of the first n bars."""
    period = _period("EMA", "timeperiod", timeperiod, 1)
    return overlap.ema(_real("EMA", "real", real), period)


def WMA(real: ArrayLike, timeperiod: int = 30) -> Array:
    """Linearly weighted moving average (weights 1..n, newest heaviest)."""
    period = _period("WMA", "timeperiod", timeperiod, 1)
    return overlap.wma(_real("WMA", "real", real), period)


def DEMA(real: ArrayLike, timeperiod: int = 30) -> Array:
    """Double EMA: 2*EMA - EMA(EMA); lookback 2*(n-1)."""
    period = _period("DEMA", "timeperiod", timeperiod, 1)
    return overlap.dema(_real("DEMA", "real", real), period)


def TEMA(real: ArrayLike, timeperiod: int = 30) -> Array:
    """Triple EMA: 3*EMA1 - 3*EMA2 + EMA3; lookback 3*(n-1)."""
    period = _period("TEMA", "timeperiod", timeperiod, 1)
    return overlap.tema(_real("TEMA", "real", real), period)


def BBANDS(real: ArrayLike, timeperiod: int = 20, nbdevup: float = 2.0,
           nbdevdn: float = 2.0, matype: int = 0) -> tuple[Array, Array, Array]:
    """Bollinger Bands: (upperband, middleband, lowerband).

    Middle = MA(matype), bands = middle +/- nbdev * population stddev of the last
    ``timeperiod`` bars. TA-Lib 0.8 defaults ``timeperiod`` to 20.
    """
    period = _period("BBANDS", "timeperiod", timeperiod, 2)
    up = _option("BBANDS", "nbdevup", nbdevup)
    down = _option("BBANDS", "nbdevdn", nbdevdn)
    code = _matype("BBANDS", "matype", matype)
    return overlap.bbands(_real("BBANDS", "real", real), period, up, down, code)


def SAR(high: ArrayLike, low: ArrayLike, acceleration: float = 0.02,
        maximum: float = 0.2) -> Array:
    """Parabolic SAR; the first bar only seeds it (see ``sar_into`` for the bootstrap)."""
    acc = _option("SAR", "acceleration", acceleration, 0.0)
    top = _option("SAR", "maximum", maximum, 0.0)
    h, lo = _series("SAR", high=high, low=low)
    return overlap.sar(h, lo, acc, top)


# --- statistics / volatility ----------------------------------------------------------


def STDDEV(real: ArrayLike, timeperiod: int = 5, nbdev: float = 1.0) -> Array:
    """Population standard deviation over ``timeperiod`` bars, times ``nbdev``."""
    period = _period("STDDEV", "timeperiod", timeperiod, 2)
    factor = _option("STDDEV", "nbdev", nbdev)
    return overlap.stddev(_real("STDDEV", "real", real), period, factor)


def TRANGE(high: ArrayLike, low: ArrayLike, close: ArrayLike) -> Array:
    """True range: max(high-low, |prev close-high|, |prev close-low|)."""
    h, lo, c = _series("TRANGE", high=high, low=low, close=close)
    return volatility.trange(h, lo, c)


def ATR(high: ArrayLike, low: ArrayLike, close: ArrayLike, timeperiod: int = 14) -> Array:
    """Average true range, Wilder-smoothed, first value at bar ``timeperiod``."""
    period = _period("ATR", "timeperiod", timeperiod, 1)
    h, lo, c = _series("ATR", high=high, low=low, close=close)
    return volatility.atr(h, lo, c, period)


def NATR(high: ArrayLike, low: ArrayLike, close: ArrayLike, timeperiod: int = 14) -> Array:
    """Normalized ATR: 100 * ATR / close."""
    period = _period("NATR", "timeperiod", timeperiod, 1)
    h, lo, c = _series("NATR", high=high, low=low, close=close)
    return volatility.natr(h, lo, c, period)


# --- momentum -------------------------------------------------------------------------


def RSI(real: ArrayLike, timeperiod: int = 14) -> Array:
    """Wilder's relative strength index (0 for a flat window, as TA-Lib 0.8)."""
    period = _period("RSI", "timeperiod", timeperiod, 2)
    return momentum.rsi(_real("RSI", "real", real), period)


def MACD(real: ArrayLike, fastperiod: int = 12, slowperiod: int = 26,
         signalperiod: int = 9) -> tuple[Array, Array, Array]:
    """(macd, macdsignal, macdhist); lookback slowperiod + signalperiod - 2."""
    fast = _period("MACD", "fastperiod", fastperiod, 2)
    slow = _period("MACD", "slowperiod", slowperiod, 2)
    signal = _period("MACD", "signalperiod", signalperiod, 1)
    return momentum.macd(_real("MACD", "real", real), fast, slow, signal)


def MOM(real: ArrayLike, timeperiod: int = 10) -> Array:
    """Momentum: real[t] - real[t - timeperiod]."""
    period = _period("MOM", "timeperiod", timeperiod, 1)
    return momentum.mom(_real("MOM", "real", real), period)


def ROC(real: ArrayLike, timeperiod: int = 10) -> Array:
    """Rate of change in percent: (real[t] / real[t - n] - 1) * 100."""
    period = _period("ROC", "timeperiod", timeperiod, 1)
    return momentum.roc(_real("ROC", "real", real), period)


def CCI(high: ArrayLike, low: ArrayLike, close: ArrayLike, timeperiod: int = 14) -> Array:
    """Commodity channel index of the typical price (h+l+c)/3."""
    period = _period("CCI", "timeperiod", timeperiod, 2)
    h, lo, c = _series("CCI", high=high, low=low, close=close)
    return momentum.cci(h, lo, c, period)


def WILLR(high: ArrayLike, low: ArrayLike, close: ArrayLike, timeperiod: int = 14) -> Array:
    """Williams' %R in [-100, 0]."""
    period = _period("WILLR", "timeperiod", timeperiod, 2)
    h, lo, c = _series("WILLR", high=high, low=low, close=close)
    return momentum.willr(h, lo, c, period)


def STOCH(high: ArrayLike, low: ArrayLike, close: ArrayLike, fastk_period: int = 5,
          slowk_period: int = 3, slowk_matype: int = 0, slowd_period: int = 3,
          slowd_matype: int = 0) -> tuple[Array, Array]:
    """Slow stochastic: (slowk, slowd); both smoothings default to SMA."""
    fastk = _period("STOCH", "fastk_period", fastk_period, 1)
    slowk = _period("STOCH", "slowk_period", slowk_period, 1)
    slowd = _period("STOCH", "slowd_period", slowd_period, 1)
    k_type = _matype("STOCH", "slowk_matype", slowk_matype)
    d_type = _matype("STOCH", "slowd_matype", slowd_matype)
    h, lo, c = _series("STOCH", high=high, low=low, close=close)
    return momentum.stoch(h, lo, c, fastk, slowk, k_type, slowd, d_type)


def STOCHF(high: ArrayLike, low: ArrayLike, close: ArrayLike, fastk_period: int = 5,
           fastd_period: int = 3, fastd_matype: int = 0) -> tuple[Array, Array]:
    """Fast stochastic: (fastk, fastd); %D defaults to an SMA of %K."""
    fastk = _period("STOCHF", "fastk_period", fastk_period, 1)
    fastd = _period("STOCHF", "fastd_period", fastd_period, 1)
    d_type = _matype("STOCHF", "fastd_matype", fastd_matype)
    h, lo, c = _series("STOCHF", high=high, low=low, close=close)
    return momentum.stochf(h, lo, c, fastk, fastd, d_type)


def MFI(high: ArrayLike, low: ArrayLike, close: ArrayLike, volume: ArrayLike,
        timeperiod: int = 14) -> Array:
    """Money flow index over the typical price."""
    period = _period("MFI", "timeperiod", timeperiod, 2)
    h, lo, c, v = _series("MFI", high=high, low=low, close=close, volume=volume)
    return momentum.mfi(h, lo, c, v, period)


def PLUS_DI(high: ArrayLike, low: ArrayLike, close: ArrayLike,
            timeperiod: int = 14) -> Array:
    """+DI: 100 * smoothed +DM / smoothed TR (period 1: the plain ratio, as TA-Lib)."""
    period = _period("PLUS_DI", "timeperiod", timeperiod, 1)
    h, lo, c = _series("PLUS_DI", high=high, low=low, close=close)
    return momentum.plus_di(h, lo, c, period)


def MINUS_DI(high: ArrayLike, low: ArrayLike, close: ArrayLike,
             timeperiod: int = 14) -> Array:
    """-DI: 100 * smoothed -DM / smoothed TR (period 1: the plain ratio, as TA-Lib)."""
    period = _period("MINUS_DI", "timeperiod", timeperiod, 1)
    h, lo, c = _series("MINUS_DI", high=high, low=low, close=close)
    return momentum.minus_di(h, lo, c, period)


def ADX(high: ArrayLike, low: ArrayLike, close: ArrayLike, timeperiod: int = 14) -> Array:
    """Average directional index; lookback 2*timeperiod - 1."""
    period = _period("ADX", "timeperiod", timeperiod, 2)
    h, lo, c = _series("ADX", high=high, low=low, close=close)
    return momentum.adx(h, lo, c, period)


# --- volume ---------------------------------------------------------------------------


def OBV(real: ArrayLike, volume: ArrayLike) -> Array:
    """On-balance volume, starting from the first bar's volume."""
    c, v = _series("OBV", real=real, volume=volume)
    return volume_kernels.obv(c, v)


def AD(high: ArrayLike, low: ArrayLike, close: ArrayLike, volume: ArrayLike) -> Array:
    """Chaikin accumulation/distribution line."""
    h, lo, c, v = _series("AD", high=high, low=low, close=close, volume=volume)
    return volume_kernels.ad(h, lo, c, v)


def VWAP(high: ArrayLike, low: ArrayLike, close: ArrayLike, volume: ArrayLike,
         session_ids: ArrayLike | None = None, *, timestamps: ArrayLike | None = None,
         session_s: float | None = None, session_offset_s: float = 0.0) -> Array:
    """Session-anchored volume-weighted average price (Fintide's, not TA-Lib's).

    ``vwap[t] = sum(tp * volume) / sum(volume)`` over the bars of ``t``'s session up
    to and including ``t``, with the typical price ``tp = (high + low + close) / 3``.

    Sessions, in order of precedence:

    * ``session_ids``: an integer per bar; a session starts wherever the id changes;
    * ``timestamps`` (epoch seconds, or numpy datetime64) with ``session_s``: bar ``t``
      belongs to session ``floor((timestamps[t] - session_offset_s) / session_s)``,
      e.g. ``session_s=86400`` for UTC days, ``session_offset_s=13.5*3600`` for days
      starting 13:30 UTC;
    * neither: one session, a cumulative VWAP from bar 0.

    A bar with a NaN price or volume adds nothing (it repeats the running VWAP); a
    session whose volume so far is zero gives NaN.
    """
    h, lo, c, v = _series("VWAP", high=high, low=low, close=close, volume=volume)
    ids = _session_ids(h.shape[0], session_ids, timestamps, session_s, session_offset_s)
    return volume_kernels.vwap(h, lo, c, v, ids)


def _session_ids(n: int, session_ids: ArrayLike | None, timestamps: ArrayLike | None,
                 session_s: float | None, session_offset_s: float) -> NDArray[np.int64]:
    """One int64 session id per bar from whichever session spec VWAP was given."""
    if session_ids is not None:
        if timestamps is not None or session_s is not None:
            raise ValueError("VWAP: pass session_ids or timestamps+session_s, not both")
        ids = np.asarray(session_ids)
        if ids.dtype.kind not in "iu":
            raise ValueError(f"VWAP: session_ids must be integers, got {ids.dtype}")
        ids = np.ascontiguousarray(ids, dtype=np.int64)
    elif timestamps is not None:
        if session_s is None:
            raise ValueError("VWAP: timestamps need session_s (session length in seconds)")
        length_s = _option("VWAP", "session_s", session_s, 0.0, REAL_LIMIT)
        if length_s == 0.0:
            raise ValueError("VWAP: session_s must be positive")
        seconds = _epoch_seconds(timestamps) - _option("VWAP", "session_offset_s",
                                                      session_offset_s)
        ids = volume_kernels.session_ids_from_timestamps(seconds, length_s)
    else:
        if session_s is not None:
            raise ValueError("VWAP: session_s needs timestamps")
        ids = np.zeros(n, dtype=np.int64)
    if ids.ndim != 1 or ids.shape[0] != n:
        raise ValueError(f"VWAP: sessions must have one entry per bar ({n}), "
                         f"got shape {ids.shape}")
    return ids


def _epoch_seconds(timestamps: ArrayLike) -> Array:
    """Timestamps as float64 epoch seconds (datetime64 is converted exactly to ns)."""
    raw = np.asarray(timestamps)
    if raw.dtype.kind == "M":
        nanos = raw.astype("datetime64[ns]").astype(np.int64)
        seconds = np.ascontiguousarray(nanos // 1_000_000_000, dtype=np.float64) + (
            nanos % 1_000_000_000) / 1e9
        if np.any(raw != raw):  # NaT
            raise ValueError("VWAP: timestamps contain NaT")
        return seconds
    seconds = _real("VWAP", "timestamps", raw)
    if not np.all(np.isfinite(seconds)):
        raise ValueError("VWAP: timestamps must be finite")
    return seconds
