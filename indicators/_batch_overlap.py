"""Batch kernels for TA-Lib's overlap studies and the statistics they need.

SMA, EMA, WMA, DEMA, TEMA, the MA-type dispatch used by BBANDS/STOCH/STOCHF, STDDEV,
BBANDS and SAR. Each ``*_into`` core works on the slice TA-Lib's C function would see
(leading NaNs already skipped) and writes bars ``lookback..len-1`` of ``out``; the
public kernels at the bottom add the wrapper's NaN prefix. Operation order follows the
C library bar for bar: reordering a sum or unfusing an ``fma`` changes low bits, and a
changed bit decides a later comparison or zero test.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from indicators._batch_common import begin_index1, begin_index2, fma, nan_output

MA_SMA = 0
MA_EMA = 1
MA_WMA = 2
MA_DEMA = 3
MA_TEMA = 4
MA_DISABLED = 10


# --- moving averages -----------------------------------------------------------------


@njit(cache=True, error_model="numpy")
def sma_into(x: np.ndarray, period: int, out: np.ndarray) -> None:
    """Running-sum SMA; a NaN entering the sum stays in it, as in TA-Lib."""
    lookback = period - 1
    total = 0.0
    if period > 1:
        for i in range(lookback):
            total += x[i]
    head = x[lookback:]
    dst = out[lookback:]
    for k in range(head.shape[0]):
        total += head[k]
        value = total
        total -= x[k]
        dst[k] = value / period


@njit(cache=True, error_model="numpy")
def ema_into(x: np.ndarray, period: int, out: np.ndarray) -> None:
    """EMA seeded with the SMA of the first ``period`` bars, k = 2 / (period + 1)."""
    n = x.shape[0]
    if period == 1:
        for i in range(n):
            out[i] = x[i]
        return
    alpha = 2.0 / (period + 1)
    total = 0.0
    for i in range(period):
        total += x[i]
    prev = total / period
    out[period - 1] = prev
    src = x[period:]
    dst = out[period:]
    for k in range(src.shape[0]):
        prev = fma(src[k] - prev, alpha, prev)
        dst[k] = prev


@njit(cache=True, error_model="numpy")
def wma_into(x: np.ndarray, period: int, out: np.ndarray) -> None:
    """Linearly weighted MA with TA-Lib's running sums, rebuilt every 8*period bars.

    The periodic rebuild is TA-Lib's guard against drift; it also means a NaN gap
    stops poisoning the output once a rebuild window no longer contains it.
    """
    n = x.shape[0]
    if period == 1:
        for i in range(n):
            out[i] = x[i]
        return
    lookback = period - 1
    divider = period * float(period + 1) / 2.0
    period_sum = 0.0
    period_sub = 0.0
    for i in range(lookback):
        value = x[i]
        period_sub += value
        period_sum += value * (i + 1)
    bars_since_reseed = 8 * period
    trailing_value = 0.0
    head = x[lookback:]
    dst = out[lookback:]
    for k in range(head.shape[0]):
        value = head[k]
        period_sub += value
        period_sub -= trailing_value
        period_sum += value * period
        bars_since_reseed -= 1
        if bars_since_reseed <= 0:
            bars_since_reseed = 8 * period
            period_sub = 0.0
            period_sum = 0.0
            weight = 1
            for j in range(k, k + period):
                value = x[j]
                period_sub += value
                period_sum += value * weight
                weight += 1
        trailing_value = x[k]
        dst[k] = period_sum / divider
        period_sum -= period_sub


@njit(cache=True, error_model="numpy")
def dema_into(x: np.ndarray, period: int, out: np.ndarray) -> None:
    """DEMA = 2*EMA - EMA(EMA), both EMAs advanced in lockstep as TA-Lib does."""
    n = x.shape[0]
    if period == 1:
        for i in range(n):
            out[i] = x[i]
        return
    lookback_ema = period - 1
    start = 2 * lookback_ema
    k = 2.0 / (period + 1)
    total = 0.0
    today = 0
    for _ in range(period):
        total += x[today]
        today += 1
    ema1 = total / period
    while today <= start - lookback_ema:
        ema1 = fma(x[today] - ema1, k, ema1)
        today += 1
    total = 0.0
    total += ema1  # 0.0 + x, not x: keeps TA-Lib's result for x == -0.0
    for _ in range(period - 1):
        ema1 = fma(x[today] - ema1, k, ema1)
        today += 1
        total += ema1
    ema2 = total / period
    while today <= start:
        ema1 = fma(x[today] - ema1, k, ema1)
        ema2 = fma(ema1 - ema2, k, ema2)
        today += 1
    out[start] = (2.0 * ema1) - ema2
    src = x[start + 1:]
    dst = out[start + 1:]
    for j in range(src.shape[0]):
        ema1 = fma(src[j] - ema1, k, ema1)
        ema2 = fma(ema1 - ema2, k, ema2)
        dst[j] = (2.0 * ema1) - ema2


@njit(cache=True, error_model="numpy")
def tema_into(x: np.ndarray, period: int, out: np.ndarray) -> None:
    """TEMA = 3*EMA1 - 3*EMA2 + EMA3 with TA-Lib's seeding and grouping."""
    n = x.shape[0]
    if period == 1:
        for i in range(n):
            out[i] = x[i]
        return
    lookback_ema = period - 1
    start = 3 * lookback_ema
    k = 2.0 / (period + 1)
    total = 0.0
    today = 0
    for _ in range(period):
        total += x[today]
        today += 1
    ema1 = total / period
    while today <= start - 2 * lookback_ema:
        ema1 = fma(x[today] - ema1, k, ema1)
        today += 1
    total = 0.0
    total += ema1  # 0.0 + x, not x: keeps TA-Lib's result for x == -0.0
    for _ in range(period - 1):
        ema1 = fma(x[today] - ema1, k, ema1)
        today += 1
        total += ema1
    ema2 = total / period
    while today <= start - lookback_ema:
        ema1 = fma(x[today] - ema1, k, ema1)
        ema2 = fma(ema1 - ema2, k, ema2)
        today += 1
    total = 0.0
    total += ema2  # as above
    for _ in range(period - 1):
        ema1 = fma(x[today] - ema1, k, ema1)
        ema2 = fma(ema1 - ema2, k, ema2)
        today += 1
        total += ema2
    ema3 = total / period
    while today <= start:
        ema1 = fma(x[today] - ema1, k, ema1)
        ema2 = fma(ema1 - ema2, k, ema2)
        ema3 = fma(ema2 - ema3, k, ema3)
        today += 1
    out[start] = ema3 + ((3.0 * ema1) - (3.0 * ema2))
    src = x[start + 1:]
    dst = out[start + 1:]
    for j in range(src.shape[0]):
        ema1 = fma(src[j] - ema1, k, ema1)
        ema2 = fma(ema1 - ema2, k, ema2)
        ema3 = fma(ema2 - ema3, k, ema3)
        dst[j] = ema3 + ((3.0 * ema1) - (3.0 * ema2))


@njit(cache=True, error_model="numpy")
def ma_lookback(period: int, matype: int) -> int:
    """TA_MA_Lookback for the supported MA types (period 1 is always the identity)."""
    if period <= 1 or matype == MA_DISABLED:
        return 0
    if matype == MA_DEMA:
        return 2 * (period - 1)
    if matype == MA_TEMA:
        return 3 * (period - 1)
    return period - 1


@njit(cache=True, error_model="numpy")
def ma_into(x: np.ndarray, period: int, matype: int, out: np.ndarray) -> None:
    """TA_MA: identity copy for period 1 or MA_DISABLED, else the MA's own kernel."""
    if ma_lookback(period, matype) >= x.shape[0]:
        return
    if period == 1 or matype == MA_DISABLED:
        for i in range(x.shape[0]):
            out[i] = x[i]
    elif matype == MA_SMA:
        sma_into(x, period, out)
    elif matype == MA_EMA:
        ema_into(x, period, out)
    elif matype == MA_WMA:
        wma_into(x, period, out)
    elif matype == MA_DEMA:
        dema_into(x, period, out)
    else:
        tema_into(x, period, out)


# --- variance / standard deviation --------------------------------------------------


@njit(cache=True, error_model="numpy")
def _window_sums(x: np.ndarray, first: int, last: int, shift: float) -> tuple[float, float]:
    """Sum of (x - shift) and of its square over ``x[first..last]``."""
    total1 = 0.0
    total2 = 0.0
    for j in range(first, last + 1):
        dev = x[j] - shift
        total1 += dev
        total2 += dev * dev
    return total1, total2


@njit(cache=True, error_model="numpy")
def _reseed(x: np.ndarray, first: int, period: int,
            inv_period: float) -> tuple[float, float, float, float]:
    """Re-anchor the variance sums on the window starting at ``first``.

    Returns the new shift (the window mean), the running sums with the window's first
    bar already removed (ready for the next bar), and the window's variance, floored
    to 0 when it is below 1e-12 of the mean squared deviation (pure rounding noise).
    """
    last = first + period - 1
    window_total = 0.0
    for j in range(first, last + 1):
        window_total += x[j]
    shift = window_total * inv_period
    total1, total2 = _window_sums(x, first, last, shift)
    mean = total1 * inv_period
    variance = total2 * inv_period - mean * mean
    if variance < 0.000000000001 * (total2 * inv_period):
        variance = 0.0
    dev = x[first] - shift
    total1 -= dev
    total2 -= dev * dev
    return shift, total1, total2, variance


@njit(cache=True, error_model="numpy")
def var_into(x: np.ndarray, period: int, start: int, out: np.ndarray) -> None:
    """Population variance from ``start`` on, with TA-Lib 0.8's shifted sums.

    Deviations are taken from a shift near the window so the running sums stay at
    variance scale; the shift is re-anchored on cancellation (variance below 1e-6 of
    the mean squared deviation), on a large outlier leaving, or every 32*period bars.
    Where the series starts matters: the shift and the rebuild schedule are counted
    from ``start``, as in TA_VAR(startIdx, ...).
    """
    lookback = period - 1
    start = max(start, lookback)
    inv_period = 1.0 / period
    shift = x[start - lookback]
    total1, total2 = _window_sums(x, start - lookback, start - 1, shift)
    bars_since_reseed = 32 * period
    head = x[start:]
    tail = x[start - lookback:]
    dst = out[start:]
    for k in range(head.shape[0]):
        dev = head[k] - shift
        total1 += dev
        total2 += dev * dev
        mean = total1 * inv_period
        variance = total2 * inv_period - mean * mean
        dev = tail[k] - shift
        total1 -= dev
        dev *= dev
        total2 -= dev
        bars_since_reseed -= 1
        if (variance < 0.000001 * (total2 * inv_period) or dev > 1000000.0 * total2
                or bars_since_reseed <= 0):
            bars_since_reseed = 32 * period
            shift, total1, total2, variance = _reseed(x, start - lookback + k, period,
                                                      inv_period)
        dst[k] = variance


@njit(cache=True, error_model="numpy")
def stddev_into(x: np.ndarray, period: int, nbdev: float, start: int,
                out: np.ndarray) -> None:
    """TA_STDDEV: square root of ``var_into`` (times ``nbdev`` unless it is 1)."""
    var_into(x, period, start, out)
    # Two branch-free loops so LLVM vectorises the square roots.
    values = out[max(start, period - 1):]
    if nbdev != 1.0:
        for i in range(values.shape[0]):
            values[i] = math.sqrt(values[i]) * nbdev
    else:
        for i in range(values.shape[0]):
            values[i] = math.sqrt(values[i])


# --- Bollinger Bands -----------------------------------------------------------------


@njit(cache=True, error_model="numpy")
def _bbands_sma_into(x: np.ndarray, period: int, middle: np.ndarray,
                     variance_out: np.ndarray) -> None:
    """TA-Lib's fused SMA-path pass: the running SMA sum plus ``var_into``'s variance."""
    lookback = period - 1
    inv_period = 1.0 / period
    shift = x[0]
    ma_total = 0.0
    for j in range(lookback):
        ma_total += x[j]
    total1, total2 = _window_sums(x, 0, lookback - 1, shift)
    bars_since_reseed = 32 * period
    head = x[lookback:]
    mid = middle[lookback:]
    dst = variance_out[lookback:]
    for k in range(head.shape[0]):
        value = head[k]
        ma_total += value
        dev = value - shift
        total1 += dev
        total2 += dev * dev
        mean = total1 * inv_period
        variance = total2 * inv_period - mean * mean
        mid[k] = ma_total / period
        value = x[k]
        ma_total -= value
        dev = value - shift
        total1 -= dev
        dev *= dev
        total2 -= dev
        bars_since_reseed -= 1
        if (variance < 0.000001 * (total2 * inv_period) or dev > 1000000.0 * total2
                or bars_since_reseed <= 0):
            bars_since_reseed = 32 * period
            shift, total1, total2, variance = _reseed(x, k, period, inv_period)
        dst[k] = variance


@njit(cache=True, error_model="numpy")
def bbands_lookback(period: int, matype: int) -> int:
    """max(MA lookback, STDDEV lookback), TA-Lib 0.8's honest BBANDS lookback."""
    return max(ma_lookback(period, matype), period - 1)


@njit(cache=True, error_model="numpy")
def bbands_into(x: np.ndarray, period: int, nbdevup: float, nbdevdn: float,
                matype: int, upper: np.ndarray, middle: np.ndarray,
                lower: np.ndarray) -> None:
    """Middle band = MA, bands = middle +/- nbdev * population stddev.

    ``lower`` holds the variance until the last loop turns it into the band, so
    nothing is allocated. The variance is never -0.0, so the unconditional square
    root equals TA-Lib's ``variance != 0 ? sqrt(variance) : 0``.
    """
    lookback = bbands_lookback(period, matype)
    if lookback >= x.shape[0]:
        return
    if matype == MA_SMA:
        _bbands_sma_into(x, period, middle, lower)
    else:
        ma_into(x, period, matype, middle)
        var_into(x, period, ma_lookback(period, matype), lower)
        # an identity MA starts before the deviation does; keep the NaN prefix
        middle[:lookback] = np.nan
    mids = middle[lookback:]
    ups = upper[lookback:]
    lows = lower[lookback:]
    if nbdevup == nbdevdn:
        for k in range(mids.shape[0]):
            width = math.sqrt(lows[k]) * nbdevup
            mid = mids[k]
            ups[k] = mid + width
            lows[k] = mid - width
    else:
        for k in range(mids.shape[0]):
            deviation = math.sqrt(lows[k])
            mid = mids[k]
            ups[k] = fma(deviation, nbdevup, mid)
            lows[k] = mid - (deviation * nbdevdn)


# --- Parabolic SAR -----------------------------------------------------------------


@njit(cache=True, error_model="numpy")
def sar_into(high: np.ndarray, low: np.ndarray, acceleration: float, maximum: float,
             out: np.ndarray) -> None:
    """Wilder's SAR with TA-Lib's bootstrap.

    Direction at bar 1 comes from a one-bar -DM: short when the low dropped more than
    the high rose, long otherwise (ties are long). The first SAR is bar 0's low (long)
    or high (short); the extreme point starts at bar 1's high (long) or low (short).
    """
    af = acceleration
    if af > maximum:
        af = acceleration = maximum
    diff_plus = high[1] - high[0]
    diff_minus = low[0] - low[1]
    minus_dm = diff_minus if (diff_minus > 0 and diff_plus < diff_minus) else 0.0
    is_long = not (minus_dm > 0)
    if is_long:
        ep = high[1]
        sar = low[0]
    else:
        ep = low[1]
        sar = high[0]
    new_low = low[1]
    new_high = high[1]
    highs = high[1:]
    lows = low[1:]
    dst = out[1:]
    for k in range(highs.shape[0]):
        prev_low = new_low
        prev_high = new_high
        new_low = lows[k]
        new_high = highs[k]
        if is_long:
            if new_low <= sar:
                is_long = False
                sar = ep
                if sar < prev_high:
                    sar = prev_high
                if sar < new_high:
                    sar = new_high
                dst[k] = sar
                af = acceleration
                ep = new_low
                sar = fma(af, ep - sar, sar)
                if sar < prev_high:
                    sar = prev_high
                if sar < new_high:
                    sar = new_high
            else:
                dst[k] = sar
                if new_high > ep:
                    ep = new_high
                    af += acceleration
                    if af > maximum:
                        af = maximum
                sar = fma(af, ep - sar, sar)
                if sar > prev_low:
                    sar = prev_low
                if sar > new_low:
                    sar = new_low
        else:
            if new_high >= sar:
                is_long = True
                sar = ep
                if sar > prev_low:
                    sar = prev_low
                if sar > new_low:
                    sar = new_low
                dst[k] = sar
                af = acceleration
                ep = new_high
                sar = fma(af, ep - sar, sar)
                if sar > prev_low:
                    sar = prev_low
                if sar > new_low:
                    sar = new_low
            else:
                dst[k] = sar
                if new_low < ep:
                    ep = new_low
                    af += acceleration
                    if af > maximum:
                        af = maximum
                sar = fma(af, ep - sar, sar)
                if sar < prev_high:
                    sar = prev_high
                if sar < new_high:
                    sar = new_high


# --- public kernels (wrapper NaN prefix + core) ------------------------------------


@njit(cache=True, error_model="numpy")
def sma(real: np.ndarray, period: int) -> np.ndarray:
    """TA_SMA over ``real`` with the wrapper's leading-NaN handling."""
    n = real.shape[0]
    begin = begin_index1(real) if n else 0
    lookback = period - 1
    out = nan_output(n, begin + lookback)
    if begin + lookback < n:
        sma_into(real[begin:], period, out[begin:])
    return out


@njit(cache=True, error_model="numpy")
def ema(real: np.ndarray, period: int) -> np.ndarray:
    """TA_EMA."""
    n = real.shape[0]
    begin = begin_index1(real) if n else 0
    lookback = period - 1
    out = nan_output(n, begin + lookback)
    if begin + lookback < n:
        ema_into(real[begin:], period, out[begin:])
    return out


@njit(cache=True, error_model="numpy")
def wma(real: np.ndarray, period: int) -> np.ndarray:
    """TA_WMA."""
    n = real.shape[0]
    begin = begin_index1(real) if n else 0
    lookback = period - 1
    out = nan_output(n, begin + lookback)
    if begin + lookback < n:
        wma_into(real[begin:], period, out[begin:])
    return out


@njit(cache=True, error_model="numpy")
def dema(real: np.ndarray, period: int) -> np.ndarray:
    """TA_DEMA."""
    n = real.shape[0]
    begin = begin_index1(real) if n else 0
    lookback = 2 * (period - 1)
    out = nan_output(n, begin + lookback)
    if begin + lookback < n:
        dema_into(real[begin:], period, out[begin:])
    return out


@njit(cache=True, error_model="numpy")
def tema(real: np.ndarray, period: int) -> np.ndarray:
    """TA_TEMA."""
    n = real.shape[0]
    begin = begin_index1(real) if n else 0
    lookback = 3 * (period - 1)
    out = nan_output(n, begin + lookback)
    if begin + lookback < n:
        tema_into(real[begin:], period, out[begin:])
    return out


@njit(cache=True, error_model="numpy")
def stddev(real: np.ndarray, period: int, nbdev: float) -> np.ndarray:
    """TA_STDDEV (population standard deviation times ``nbdev``)."""
    n = real.shape[0]
    begin = begin_index1(real) if n else 0
    lookback = period - 1
    out = nan_output(n, begin + lookback)
    if begin + lookback < n:
        stddev_into(real[begin:], period, nbdev, 0, out[begin:])
    return out


@njit(cache=True, error_model="numpy")
def bbands(real: np.ndarray, period: int, nbdevup: float, nbdevdn: float,
           matype: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """TA_BBANDS: (upper, middle, lower)."""
    n = real.shape[0]
    begin = begin_index1(real) if n else 0
    nan_count = begin + bbands_lookback(period, matype)
    upper = nan_output(n, nan_count)
    middle = nan_output(n, nan_count)
    lower = nan_output(n, nan_count)
    if nan_count < n:
        bbands_into(real[begin:], period, nbdevup, nbdevdn, matype,
                    upper[begin:], middle[begin:], lower[begin:])
    return upper, middle, lower


@njit(cache=True, error_model="numpy")
def sar(high: np.ndarray, low: np.ndarray, acceleration: float,
        maximum: float) -> np.ndarray:
    """TA_SAR."""
    n = high.shape[0]
    begin = begin_index2(high, low) if n else 0
    out = nan_output(n, begin + 1)
    if begin + 1 < n:
        sar_into(high[begin:], low[begin:], acceleration, maximum, out[begin:])
    return out
