"""Batch kernels for TA-Lib's momentum indicators.

RSI, MACD, MOM, ROC, CCI, WILLR, STOCH, STOCHF, MFI, PLUS_DI, MINUS_DI and ADX. Like
the other kernel modules, each ``*_into`` core sees the slice TA-Lib's C code would see
and writes bars ``lookback..len-1``; the public kernels add the wrapper's NaN prefix.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from indicators._batch_common import (
    begin_index1,
    begin_index3,
    begin_index4,
    fma,
    nan_output,
)
from indicators._batch_overlap import ma_into, ma_lookback
from indicators._batch_volatility import true_range

# TA-Lib's TA_IS_ZERO band (TA_EPSILON) in 0.8.
EPSILON = 0.00000000000001


# --- RSI / MOM / ROC ---------------------------------------------------------------


@njit(cache=True, error_model="numpy")
def rsi_into(x: np.ndarray, period: int, out: np.ndarray) -> None:
    """Wilder RSI, written branch-free as TA-Lib 0.8 does.

    The gain/loss split is ``gain = max(d, 0)``, ``loss += gain - d``; a flat window
    (gain + loss == 0) gives 0, and so does a NaN total, which is why one NaN in the
    input turns the rest of TA-Lib's RSI into zeros.
    """
    inv_period = 1.0 / period
    prev_value = x[0]
    prev_gain = 0.0
    prev_loss = 0.0
    for today in range(1, period + 1):
        value = x[today]
        change = value - prev_value
        prev_value = value
        gain = change if change > 0.0 else 0.0
        prev_gain += gain
        prev_loss += gain - change
    prev_loss *= inv_period
    prev_gain *= inv_period
    total = prev_gain + prev_loss
    out[period] = 100.0 * (prev_gain / total) if total > 0.0 else 0.0
    src = x[period + 1:]
    dst = out[period + 1:]
    for k in range(src.shape[0]):
        value = src[k]
        change = value - prev_value
        prev_value = value
        prev_loss *= period - 1
        prev_gain *= period - 1
        gain = change if change > 0.0 else 0.0
        prev_gain += gain
        prev_loss += gain - change
        prev_loss *= inv_period
        prev_gain *= inv_period
        total = prev_gain + prev_loss
        dst[k] = 100.0 * (prev_gain / total) if total > 0.0 else 0.0


@njit(cache=True, error_model="numpy")
def mom_into(x: np.ndarray, period: int, out: np.ndarray) -> None:
    """TA_MOM: x[t] - x[t - period]."""
    src = x[period:]
    dst = out[period:]
    for k in range(src.shape[0]):
        dst[k] = src[k] - x[k]


@njit(cache=True, error_model="numpy")
def roc_into(x: np.ndarray, period: int, out: np.ndarray) -> None:
    """TA_ROC: ((x[t] / x[t - period]) - 1) * 100, and 0 where the base is 0."""
    src = x[period:]
    dst = out[period:]
    for k in range(src.shape[0]):
        base = x[k]
        change = ((src[k] / base) - 1.0) * 100.0
        dst[k] = change if base != 0.0 else 0.0


# --- MACD -------------------------------------------------------------------------


@njit(cache=True, error_model="numpy")
def macd_lookback(fast: int, slow: int, signal: int) -> int:
    """Slow EMA lookback plus signal EMA lookback (periods swapped if fast > slow)."""
    return max(fast, slow) - 1 + signal - 1


@njit(cache=True, error_model="numpy")
def macd_into(x: np.ndarray, fast: int, slow: int, signal: int, out_macd: np.ndarray,
              out_signal: np.ndarray, out_hist: np.ndarray) -> None:
    """MACD with TA-Lib's alignment: the fast EMA's seed window ends where the slow's does.

    Both price EMAs are seeded with an SMA whose window ends on the same bar, so the
    fast EMA starts ``slow - fast`` bars later rather than at bar 0. The signal EMA is
    seeded with the mean of the first ``signal`` MACD values.
    """
    if slow < fast:
        fast, slow = slow, fast
    k_fast = 2.0 / (fast + 1)
    k_slow = 2.0 / (slow + 1)
    k_signal = 2.0 / (signal + 1)
    lookback_signal = signal - 1
    start = slow - 1 + lookback_signal
    today = 0
    slow_total = 0.0
    for _ in range(slow - fast):
        slow_total += x[today]
        today += 1
    fast_total = 0.0
    for _ in range(fast):
        fast_total += x[today]
        slow_total += x[today]
        today += 1
    ema_slow = slow_total / slow
    ema_fast = fast_total / fast
    while today <= start - lookback_signal:
        value = x[today]
        ema_fast = fma(value - ema_fast, k_fast, ema_fast)
        ema_slow = fma(value - ema_slow, k_slow, ema_slow)
        today += 1
    line = ema_fast - ema_slow
    signal_total = 0.0
    signal_total += line  # 0.0 + x, not x: keeps TA-Lib's result for x == -0.0
    for _ in range(signal - 1):
        value = x[today]
        ema_fast = fma(value - ema_fast, k_fast, ema_fast)
        ema_slow = fma(value - ema_slow, k_slow, ema_slow)
        line = ema_fast - ema_slow
        signal_total += line
        today += 1
    ema_signal = signal_total / signal
    out_macd[start] = line
    out_signal[start] = ema_signal
    out_hist[start] = line - ema_signal
    src = x[start + 1:]
    lines = out_macd[start + 1:]
    signals = out_signal[start + 1:]
    hists = out_hist[start + 1:]
    if signal == 1:
        # no signal smoothing: the signal is the line and the histogram is 0
        k_signal = 0.0
    for k in range(src.shape[0]):
        value = src[k]
        ema_fast = fma(value - ema_fast, k_fast, ema_fast)
        ema_slow = fma(value - ema_slow, k_slow, ema_slow)
        line = ema_fast - ema_slow
        smoothed = fma(line - ema_signal, k_signal, ema_signal)
        ema_signal = line if signal == 1 else smoothed
        lines[k] = line
        signals[k] = ema_signal
        hists[k] = line - ema_signal


# --- CCI --------------------------------------------------------------------------
#
# TA-Lib keeps the typical prices in a ring (slot = bar % period) and re-sums the
# whole ring every bar in slot order, once for the mean and once for the mean absolute
# deviation. That order is part of the result (a running sum rounds differently and
# moves values next to the zero tests), so it is kept. In slot order the ring of bar
# ``b`` (newest slot ``s = b % period``) reads bars ``b-s .. b`` and then
# ``b+1-period .. b-s-1``. Each sum is a serial chain of ``period`` additions; four
# consecutive bars of one ring cycle share almost all their slots, so their four
# chains are summed side by side from one load per slot.


@njit(cache=True, error_model="numpy")
def _cci_value(typical: float, average: float, deviation: float, period: int) -> float:
    """(tp - mean) / (0.015 * mean deviation), 0 when either is ~0 next to the mean."""
    distance = typical - average
    scale = abs(average) * EPSILON
    mean_deviation = deviation / period
    denominator = mean_deviation * 0.015
    if abs(distance) <= scale or abs(mean_deviation) <= scale or denominator == 0.0:
        return 0.0
    return distance / denominator


@njit(cache=True, error_model="numpy")
def _cci_one(typical: np.ndarray, bar: int, newest: int, period: int) -> float:
    """CCI of one bar whose newest ring slot is ``newest``, summing in slot order."""
    current = typical[bar - newest:bar + 1]
    previous = typical[bar + 1 - period:bar - newest]
    total = 0.0
    for i in range(current.shape[0]):
        total += current[i]
    for i in range(previous.shape[0]):
        total += previous[i]
    average = total / period
    deviation = 0.0
    for i in range(current.shape[0]):
        deviation += abs(current[i] - average)
    for i in range(previous.shape[0]):
        deviation += abs(previous[i] - average)
    return _cci_value(typical[bar], average, deviation, period)


@njit(cache=True, error_model="numpy")
def _cci_four(typical: np.ndarray, bar: int, newest: int, period: int,
              out: np.ndarray) -> None:
    """CCI of bars ``bar .. bar+3``, which must lie in one ring cycle (newest + 3 <
    period). Lane q's ring is the lane-0 ring with slots ``newest+1 .. newest+q``
    refreshed, so all lanes read the same value except in those three boundary slots.
    """
    current = typical[bar - newest:bar + 4]
    previous = typical[bar + 1 - period:bar - newest]
    sum0 = 0.0
    sum1 = 0.0
    sum2 = 0.0
    sum3 = 0.0
    for i in range(newest + 1):
        value = current[i]
        sum0 += value
        sum1 += value
        sum2 += value
        sum3 += value
    sum0 += previous[0]
    sum1 += current[newest + 1]
    sum2 += current[newest + 1]
    sum3 += current[newest + 1]
    sum0 += previous[1]
    sum1 += previous[1]
    sum2 += current[newest + 2]
    sum3 += current[newest + 2]
    sum0 += previous[2]
    sum1 += previous[2]
    sum2 += previous[2]
    sum3 += current[newest + 3]
    for i in range(3, previous.shape[0]):
        value = previous[i]
        sum0 += value
        sum1 += value
        sum2 += value
        sum3 += value
    avg0 = sum0 / period
    avg1 = sum1 / period
    avg2 = sum2 / period
    avg3 = sum3 / period
    dev0 = 0.0
    dev1 = 0.0
    dev2 = 0.0
    dev3 = 0.0
    for i in range(newest + 1):
        value = current[i]
        dev0 += abs(value - avg0)
        dev1 += abs(value - avg1)
        dev2 += abs(value - avg2)
        dev3 += abs(value - avg3)
    dev0 += abs(previous[0] - avg0)
    dev1 += abs(current[newest + 1] - avg1)
    dev2 += abs(current[newest + 1] - avg2)
    dev3 += abs(current[newest + 1] - avg3)
    dev0 += abs(previous[1] - avg0)
    dev1 += abs(previous[1] - avg1)
    dev2 += abs(current[newest + 2] - avg2)
    dev3 += abs(current[newest + 2] - avg3)
    dev0 += abs(previous[2] - avg0)
    dev1 += abs(previous[2] - avg1)
    dev2 += abs(previous[2] - avg2)
    dev3 += abs(current[newest + 3] - avg3)
    for i in range(3, previous.shape[0]):
        value = previous[i]
        dev0 += abs(value - avg0)
        dev1 += abs(value - avg1)
        dev2 += abs(value - avg2)
        dev3 += abs(value - avg3)
    out[bar] = _cci_value(current[newest], avg0, dev0, period)
    out[bar + 1] = _cci_value(current[newest + 1], avg1, dev1, period)
    out[bar + 2] = _cci_value(current[newest + 2], avg2, dev2, period)
    out[bar + 3] = _cci_value(current[newest + 3], avg3, dev3, period)


@njit(cache=True, error_model="numpy")
def cci_into(high: np.ndarray, low: np.ndarray, close: np.ndarray, period: int,
             out: np.ndarray) -> None:
    """TA_CCI over the typical price (h + l + c) / 3, in TA-Lib's summation order."""
    n = high.shape[0]
    typical = np.empty(n)
    for i in range(n):
        typical[i] = (high[i] + low[i] + close[i]) / 3
    bar = period - 1
    newest = period - 1  # slot of bar period-1
    while bar < n:
        if newest + 3 < period and bar + 3 < n:
            _cci_four(typical, bar, newest, period, out)
            bar += 4
            newest += 4
        else:
            out[bar] = _cci_one(typical, bar, newest, period)
            bar += 1
            newest += 1
        if newest >= period:
            newest -= period


# --- rolling extremes (WILLR, STOCH, STOCHF) ------------------------------------------


@njit(cache=True, error_model="numpy")
def _is_flat(highest: float, lowest: float) -> bool:
    """TA-Lib 0.8's flat-window test: range within 1e-14 of the extremes' magnitude.

    Scale-relative so a finely quoted instrument is not mistaken for a flat one; a NaN
    range is not flat (the NaN reaches the output).
    """
    return abs(highest - lowest) <= EPSILON * (abs(highest) + abs(lowest))


@njit(cache=True, error_model="numpy")
def _block_extremes(high: np.ndarray, low: np.ndarray, period: int, block_start: int,
                    suffix_high: np.ndarray, suffix_low: np.ndarray,
                    prefix_high: np.ndarray, prefix_low: np.ndarray) -> int:
    """Van Herk / Gil-Werman scan for the block starting at ``block_start``.

    Fills the suffix extremes of bars ``block_start .. block_start+period-1`` (scanned
    backwards) and the prefix extremes of the next block (forwards), and returns how
    many prefix bars exist (at most period-1). The window ending at bar
    ``block_start+period-1+m`` is then suffix[m] combined with prefix[m-1]. Both scans
    run in one loop so the four running max/min chains overlap. A NaN loses every
    comparison, so it only shows when it is the bar a scan starts from - the same
    blind spots as TA-Lib's WILLR, whose block layout this is.
    """
    last = block_start + period - 1
    following = last + 1
    available = min(high.shape[0] - following, period - 1)
    highest = high[last]
    lowest = low[last]
    suffix_high[period - 1] = highest
    suffix_low[period - 1] = lowest
    next_highest = 0.0
    next_lowest = 0.0
    if available > 0:
        next_highest = high[following]
        next_lowest = low[following]
        prefix_high[0] = next_highest
        prefix_low[0] = next_lowest
    for j in range(1, period):
        value = high[last - j]
        highest = value if value > highest else highest
        value = low[last - j]
        lowest = value if value < lowest else lowest
        suffix_high[period - 1 - j] = highest
        suffix_low[period - 1 - j] = lowest
        if j < available:
            value = high[following + j]
            next_highest = value if value > next_highest else next_highest
            value = low[following + j]
            next_lowest = value if value < next_lowest else next_lowest
            prefix_high[j] = next_highest
            prefix_low[j] = next_lowest
    return available


@njit(cache=True, error_model="numpy")
def _willr_value(highest: float, lowest: float, close: float) -> float:
    """%R = (highest - close) / (highest - lowest) * -100, clamped into [-100, 0]."""
    value = ((highest - close) / (highest - lowest)) * -100.0
    value = 0.0 if value > 0.0 else value
    value = -100.0 if value < -100.0 else value
    return 0.0 if _is_flat(highest, lowest) else value


@njit(cache=True, error_model="numpy")
def willr_into(high: np.ndarray, low: np.ndarray, close: np.ndarray, period: int,
               out: np.ndarray) -> None:
    """TA_WILLR with TA-Lib 0.8's van Herk / Gil-Werman block scan (constant per bar).

    The block layout (anchored at bar 0) decides how a NaN inside a window is seen,
    which is why it is reproduced rather than replaced by a deque.
    """
    suffix_high = np.empty(period)
    suffix_low = np.empty(period)
    prefix_high = np.empty(period)
    prefix_low = np.empty(period)
    for block_start in range(0, high.shape[0] - period + 1, period):
        available = _block_extremes(high, low, period, block_start, suffix_high,
                                    suffix_low, prefix_high, prefix_low)
        last = block_start + period - 1
        out[last] = _willr_value(suffix_high[0], suffix_low[0], close[last])
        bars = out[last + 1:last + 1 + available]
        closes = close[last + 1:last + 1 + available]
        for m in range(available):
            highest = suffix_high[m + 1]
            value = prefix_high[m]
            highest = value if value > highest else highest
            lowest = suffix_low[m + 1]
            value = prefix_low[m]
            lowest = value if value < lowest else lowest
            bars[m] = _willr_value(highest, lowest, closes[m])


@njit(cache=True, error_model="numpy")
def _stoch_value(highest: float, lowest: float, close: float) -> float:
    """%K = (close - lowest) / (highest - lowest) * 100, 0 for a flat window."""
    value = ((close - lowest) / (highest - lowest)) * 100.0
    return 0.0 if _is_flat(highest, lowest) else value


@njit(cache=True, error_model="numpy")
def _fast_k_blocks(high: np.ndarray, low: np.ndarray, close: np.ndarray, period: int,
                   out: np.ndarray) -> None:
    """Raw %K for NaN-free input: window extremes from the van Herk block scan.

    Without NaNs every exact window min/max gives TA-Lib's values, and the block scan
    costs a constant per bar where TA-Lib's rescan costs up to ``period``.
    """
    suffix_high = np.empty(period)
    suffix_low = np.empty(period)
    prefix_high = np.empty(period)
    prefix_low = np.empty(period)
    for block_start in range(0, high.shape[0] - period + 1, period):
        available = _block_extremes(high, low, period, block_start, suffix_high,
                                    suffix_low, prefix_high, prefix_low)
        last = block_start + period - 1
        out[last] = _stoch_value(suffix_high[0], suffix_low[0], close[last])
        bars = out[last + 1:last + 1 + available]
        closes = close[last + 1:last + 1 + available]
        for m in range(available):
            highest = suffix_high[m + 1]
            value = prefix_high[m]
            highest = value if value > highest else highest
            lowest = suffix_low[m + 1]
            value = prefix_low[m]
            lowest = value if value < lowest else lowest
            bars[m] = _stoch_value(highest, lowest, closes[m])


@njit(cache=True, error_model="numpy")
def _rescan_low(low: np.ndarray, first: int, last: int) -> tuple[int, float]:
    """Earliest lowest low of ``low[first..last]`` (NaNs lose, unless first is NaN)."""
    best_idx = first
    best = low[first]
    for i in range(first + 1, last + 1):
        value = low[i]
        if value < best:
            best_idx = i
            best = value
    return best_idx, best


@njit(cache=True, error_model="numpy")
def _rescan_high(high: np.ndarray, first: int, last: int) -> tuple[int, float]:
    """Earliest highest high of ``high[first..last]``."""
    best_idx = first
    best = high[first]
    for i in range(first + 1, last + 1):
        value = high[i]
        if value > best:
            best_idx = i
            best = value
    return best_idx, best


@njit(cache=True, error_model="numpy")
def _fast_k_rescan(high: np.ndarray, low: np.ndarray, close: np.ndarray, period: int,
                   out: np.ndarray) -> None:
    """Raw %K with TA-Lib's cached-extreme scan, for input that contains NaNs.

    The extremes and their bars are cached and the window is rescanned only when a
    cached extreme drops out; a new bar replaces it on a tie or better. NaNs lose every
    comparison, except that a rescan starting on a NaN bar yields NaN - semantics only
    this exact scan reproduces.
    """
    lowest_idx = -1
    highest_idx = -1
    lowest = 0.0
    highest = 0.0
    for today in range(period - 1, high.shape[0]):
        trailing = today - period + 1
        value = low[today]
        if lowest_idx < trailing:
            lowest_idx, lowest = _rescan_low(low, trailing, today)
        elif value <= lowest:
            lowest_idx = today
            lowest = value
        value = high[today]
        if highest_idx < trailing:
            highest_idx, highest = _rescan_high(high, trailing, today)
        elif value >= highest:
            highest_idx = today
            highest = value
        out[today] = _stoch_value(highest, lowest, close[today])


@njit(cache=True, error_model="numpy")
def _has_nan(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether either array holds a NaN (a plain loop: Numba has no generator any())."""
    for i in range(a.shape[0]):  # noqa: SIM110
        if a[i] != a[i] or b[i] != b[i]:
            return True
    return False


@njit(cache=True, error_model="numpy")
def fast_k_into(high: np.ndarray, low: np.ndarray, close: np.ndarray, period: int,
                out: np.ndarray) -> None:
    """Raw (fast) %K for bars ``period-1..``, written at the same bars of ``out``."""
    if _has_nan(high, low):
        _fast_k_rescan(high, low, close, period, out)
    else:
        _fast_k_blocks(high, low, close, period, out)


@njit(cache=True, error_model="numpy")
def stoch_lookback(fastk: int, slowk: int, slowk_matype: int, slowd: int,
                   slowd_matype: int) -> int:
    """(fastk - 1) + MA lookback of %K slow + MA lookback of %D slow."""
    return fastk - 1 + ma_lookback(slowk, slowk_matype) + ma_lookback(slowd, slowd_matype)


@njit(cache=True, error_model="numpy")
def stoch_into(high: np.ndarray, low: np.ndarray, close: np.ndarray, fastk: int,
               slowk: int, slowk_matype: int, slowd: int, slowd_matype: int,
               out_k: np.ndarray, out_d: np.ndarray) -> None:
    """Slow %K = MA(raw %K), slow %D = MA(slow %K), both NaN before the total lookback.

    ``out_d`` doubles as the raw %K scratch buffer, so nothing is allocated.
    """
    lookback_k = fastk - 1
    lookback_slowk = ma_lookback(slowk, slowk_matype)
    start = stoch_lookback(fastk, slowk, slowk_matype, slowd, slowd_matype)
    fast_k_into(high, low, close, fastk, out_d)
    ma_into(out_d[lookback_k:], slowk, slowk_matype, out_k[lookback_k:])
    first_k = lookback_k + lookback_slowk
    ma_into(out_k[first_k:], slowd, slowd_matype, out_d[first_k:])
    out_k[:start] = np.nan
    out_d[:start] = np.nan


@njit(cache=True, error_model="numpy")
def stochf_into(high: np.ndarray, low: np.ndarray, close: np.ndarray, fastk: int,
                fastd: int, fastd_matype: int, out_k: np.ndarray,
                out_d: np.ndarray) -> None:
    """Fast %K = raw %K, fast %D = MA(fast %K), both NaN before the total lookback."""
    lookback_k = fastk - 1
    start = lookback_k + ma_lookback(fastd, fastd_matype)
    fast_k_into(high, low, close, fastk, out_k)
    ma_into(out_k[lookback_k:], fastd, fastd_matype, out_d[lookback_k:])
    out_k[:start] = np.nan
    out_d[:start] = np.nan


# --- MFI --------------------------------------------------------------------------


@njit(cache=True, error_model="numpy")
def mfi_into(high: np.ndarray, low: np.ndarray, close: np.ndarray, volume: np.ndarray,
             period: int, out: np.ndarray) -> None:
    """TA_MFI with TA-Lib 0.8's dead-zone, empty-window and clamping rules.

    A bar's money flow counts as zero when the typical price moved by less than 1e-14
    of the two prices' magnitude; a whole period of zero flows resets both sums to an
    exact zero (they otherwise keep add-then-subtract residue). The ratio is clamped
    into [0, 100] and a window with no flow at all gives 0.
    """
    pos_ring = np.zeros(period)
    neg_ring = np.zeros(period)
    prev_value = (high[0] + low[0] + close[0]) / 3.0
    pos_sum = 0.0
    neg_sum = 0.0
    null_run = 0
    slot = 0
    highs = high[1:]
    lows = low[1:]
    closes = close[1:]
    volumes = volume[1:]
    dst = out[1:]
    for k in range(highs.shape[0]):
        # The ring starts zeroed, so removing the slot before the first full window
        # subtracts 0.0 - exact, and the sums never hold -0.0 for it to matter.
        pos_sum -= pos_ring[slot]
        neg_sum -= neg_ring[slot]
        typical = (highs[k] + lows[k] + closes[k]) / 3.0
        change = typical - prev_value
        scale = abs(typical) + abs(prev_value)
        prev_value = typical
        flow = typical * volumes[k]
        money_flow = 0.0 if abs(change) <= EPSILON * scale else flow
        pos_flow = 0.0 if change < 0.0 else money_flow
        neg_flow = money_flow if change < 0.0 else 0.0
        pos_ring[slot] = pos_flow
        neg_ring[slot] = neg_flow
        pos_sum += pos_flow
        neg_sum += neg_flow
        null_run = null_run + 1 if money_flow == 0.0 else 0
        if null_run >= period:
            null_run = period
            pos_sum = 0.0
            neg_sum = 0.0
        if k >= period - 1:
            total = pos_sum + neg_sum
            clamped = 0.0 if pos_sum < 0.0 else (total if pos_sum > total else pos_sum)
            dst[k] = 0.0 if total <= 0.0 else 100.0 * (clamped / total)
        slot = slot + 1 if slot + 1 < period else 0


# --- directional movement ----------------------------------------------------------


@njit(cache=True, error_model="numpy")
def _plus_dm(diff_p: float, diff_m: float) -> float:
    """+DM1: the up-move when it is positive and beats the down-move, else -0.0.

    -0.0 rather than 0.0 because adding it is the exact identity, so summing it is
    the same as TA-Lib's branch that skips the addition.
    """
    return diff_p if (diff_p > 0 and diff_p > diff_m) else -0.0


@njit(cache=True, error_model="numpy")
def _minus_dm(diff_p: float, diff_m: float) -> float:
    """-DM1: the down-move when it is positive and beats the up-move, else -0.0."""
    return diff_m if (diff_m > 0 and diff_p < diff_m) else -0.0


@njit(cache=True, error_model="numpy")
def _wilder_sum(previous: float, increment: float, period: int) -> float:
    """Wilder's running sum: previous - previous/period + increment (TA-Lib's order)."""
    return previous - (previous / period) + increment


@njit(cache=True, error_model="numpy")
def di_into(high: np.ndarray, low: np.ndarray, close: np.ndarray, period: int,
            plus: bool, out: np.ndarray) -> None:
    """+DI (``plus``) or -DI: 100 * Wilder-summed DM / Wilder-summed TR.

    Period 1 is TA-Lib's unsmoothed special case, which returns the plain ratio DM/TR
    without the factor 100. A TR sum that is not positive gives 0.
    """
    highs = high[1:]
    lows = low[1:]
    dst = out[1:]
    # bar k + 1 against bar k: high[k], low[k] and close[k] are the previous bar's
    if period <= 1:
        for k in range(highs.shape[0]):
            diff_p = highs[k] - high[k]
            diff_m = low[k] - lows[k]
            dm = _plus_dm(diff_p, diff_m) if plus else _minus_dm(diff_p, diff_m)
            tr = true_range(highs[k], lows[k], close[k])
            ratio = (diff_p if plus else diff_m) / tr
            dst[k] = 0.0 if (dm == 0.0 or tr <= 0.0) else ratio
        return
    prev_dm = 0.0
    prev_tr = 0.0
    for k in range(period - 1):
        diff_p = highs[k] - high[k]
        diff_m = low[k] - lows[k]
        prev_dm += _plus_dm(diff_p, diff_m) if plus else _minus_dm(diff_p, diff_m)
        prev_tr += true_range(highs[k], lows[k], close[k])
    rest = highs.shape[0] - (period - 1)
    for k in range(period - 1, period - 1 + rest):
        diff_p = highs[k] - high[k]
        diff_m = low[k] - lows[k]
        dm = _plus_dm(diff_p, diff_m) if plus else _minus_dm(diff_p, diff_m)
        prev_dm = _wilder_sum(prev_dm, dm, period)
        prev_tr = _wilder_sum(prev_tr, true_range(highs[k], lows[k], close[k]), period)
        value = 100.0 * (prev_dm / prev_tr)
        dst[k] = value if prev_tr > 0.0 else 0.0


@njit(cache=True, error_model="numpy")
def adx_into(high: np.ndarray, low: np.ndarray, close: np.ndarray, period: int,
             out: np.ndarray) -> None:
    """TA_ADX: Wilder average of DX = 100 * |+DI - -DI| / (+DI + -DI).

    The first ADX (bar 2*period - 1) is the mean of the first ``period`` DX values.
    A bar whose TR sum is not positive, or whose DI sum is within 1e-14 of zero, has
    no DX: it adds nothing to that mean and leaves the ADX unchanged.
    """
    highs = high[1:]
    lows = low[1:]
    dst = out[1:]
    prev_minus = 0.0
    prev_plus = 0.0
    prev_tr = 0.0
    for k in range(period - 1):
        diff_p = highs[k] - high[k]
        diff_m = low[k] - lows[k]
        prev_minus += _minus_dm(diff_p, diff_m)
        prev_plus += _plus_dm(diff_p, diff_m)
        prev_tr += true_range(highs[k], lows[k], close[k])
    sum_dx = 0.0
    prev_adx = 0.0
    for k in range(period - 1, highs.shape[0]):
        diff_p = highs[k] - high[k]
        diff_m = low[k] - lows[k]
        prev_minus = _wilder_sum(prev_minus, _minus_dm(diff_p, diff_m), period)
        prev_plus = _wilder_sum(prev_plus, _plus_dm(diff_p, diff_m), period)
        prev_tr = _wilder_sum(prev_tr, true_range(highs[k], lows[k], close[k]), period)
        minus_di = 100.0 * (prev_minus / prev_tr)
        plus_di = 100.0 * (prev_plus / prev_tr)
        di_sum = minus_di + plus_di
        dx = 100.0 * (abs(minus_di - plus_di) / di_sum)
        has_dx = prev_tr > 0.0 and not (-EPSILON < di_sum < EPSILON)
        if k < 2 * period - 2:
            sum_dx = sum_dx + dx if has_dx else sum_dx
        else:
            if k == 2 * period - 2:
                sum_dx = sum_dx + dx if has_dx else sum_dx
                prev_adx = sum_dx / period
            else:
                smoothed = ((prev_adx * (period - 1)) + dx) / period
                prev_adx = smoothed if has_dx else prev_adx
            dst[k] = prev_adx


# --- public kernels ----------------------------------------------------------------


@njit(cache=True, error_model="numpy")
def rsi(real: np.ndarray, period: int) -> np.ndarray:
    """TA_RSI with the wrapper's leading-NaN handling."""
    n = real.shape[0]
    begin = begin_index1(real) if n else 0
    out = nan_output(n, begin + period)
    if begin + period < n:
        rsi_into(real[begin:], period, out[begin:])
    return out


@njit(cache=True, error_model="numpy")
def mom(real: np.ndarray, period: int) -> np.ndarray:
    """TA_MOM."""
    n = real.shape[0]
    begin = begin_index1(real) if n else 0
    out = nan_output(n, begin + period)
    if begin + period < n:
        mom_into(real[begin:], period, out[begin:])
    return out


@njit(cache=True, error_model="numpy")
def roc(real: np.ndarray, period: int) -> np.ndarray:
    """TA_ROC."""
    n = real.shape[0]
    begin = begin_index1(real) if n else 0
    out = nan_output(n, begin + period)
    if begin + period < n:
        roc_into(real[begin:], period, out[begin:])
    return out


@njit(cache=True, error_model="numpy")
def macd(real: np.ndarray, fast: int, slow: int,
         signal: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """TA_MACD: (macd, macdsignal, macdhist)."""
    n = real.shape[0]
    begin = begin_index1(real) if n else 0
    nan_count = begin + macd_lookback(fast, slow, signal)
    line = nan_output(n, nan_count)
    sig = nan_output(n, nan_count)
    hist = nan_output(n, nan_count)
    if nan_count < n:
        macd_into(real[begin:], fast, slow, signal, line[begin:], sig[begin:], hist[begin:])
    return line, sig, hist


@njit(cache=True, error_model="numpy")
def cci(high: np.ndarray, low: np.ndarray, close: np.ndarray, period: int) -> np.ndarray:
    """TA_CCI."""
    n = high.shape[0]
    begin = begin_index3(high, low, close) if n else 0
    out = nan_output(n, begin + period - 1)
    if begin + period - 1 < n:
        cci_into(high[begin:], low[begin:], close[begin:], period, out[begin:])
    return out


@njit(cache=True, error_model="numpy")
def willr(high: np.ndarray, low: np.ndarray, close: np.ndarray, period: int) -> np.ndarray:
    """TA_WILLR."""
    n = high.shape[0]
    begin = begin_index3(high, low, close) if n else 0
    out = nan_output(n, begin + period - 1)
    if begin + period - 1 < n:
        willr_into(high[begin:], low[begin:], close[begin:], period, out[begin:])
    return out


@njit(cache=True, error_model="numpy")
def stoch(high: np.ndarray, low: np.ndarray, close: np.ndarray, fastk: int, slowk: int,
          slowk_matype: int, slowd: int,
          slowd_matype: int) -> tuple[np.ndarray, np.ndarray]:
    """TA_STOCH: (slowk, slowd)."""
    n = high.shape[0]
    begin = begin_index3(high, low, close) if n else 0
    nan_count = begin + stoch_lookback(fastk, slowk, slowk_matype, slowd, slowd_matype)
    out_k = nan_output(n, nan_count)
    out_d = nan_output(n, nan_count)
    if nan_count < n:
        stoch_into(high[begin:], low[begin:], close[begin:], fastk, slowk, slowk_matype,
                   slowd, slowd_matype, out_k[begin:], out_d[begin:])
    return out_k, out_d


@njit(cache=True, error_model="numpy")
def stochf(high: np.ndarray, low: np.ndarray, close: np.ndarray, fastk: int, fastd: int,
           fastd_matype: int) -> tuple[np.ndarray, np.ndarray]:
    """TA_STOCHF: (fastk, fastd)."""
    n = high.shape[0]
    begin = begin_index3(high, low, close) if n else 0
    nan_count = begin + fastk - 1 + ma_lookback(fastd, fastd_matype)
    out_k = nan_output(n, nan_count)
    out_d = nan_output(n, nan_count)
    if nan_count < n:
        stochf_into(high[begin:], low[begin:], close[begin:], fastk, fastd, fastd_matype,
                    out_k[begin:], out_d[begin:])
    return out_k, out_d


@njit(cache=True, error_model="numpy")
def mfi(high: np.ndarray, low: np.ndarray, close: np.ndarray, volume: np.ndarray,
        period: int) -> np.ndarray:
    """TA_MFI."""
    n = high.shape[0]
    begin = begin_index4(high, low, close, volume) if n else 0
    out = nan_output(n, begin + period)
    if begin + period < n:
        mfi_into(high[begin:], low[begin:], close[begin:], volume[begin:], period,
                 out[begin:])
    return out


@njit(cache=True, error_model="numpy")
def plus_di(high: np.ndarray, low: np.ndarray, close: np.ndarray, period: int) -> np.ndarray:
    """TA_PLUS_DI."""
    n = high.shape[0]
    begin = begin_index3(high, low, close) if n else 0
    lookback = max(period, 1)
    out = nan_output(n, begin + lookback)
    if begin + lookback < n:
        di_into(high[begin:], low[begin:], close[begin:], period, True, out[begin:])
    return out


@njit(cache=True, error_model="numpy")
def minus_di(high: np.ndarray, low: np.ndarray, close: np.ndarray,
             period: int) -> np.ndarray:
    """TA_MINUS_DI."""
    n = high.shape[0]
    begin = begin_index3(high, low, close) if n else 0
    lookback = max(period, 1)
    out = nan_output(n, begin + lookback)
    if begin + lookback < n:
        di_into(high[begin:], low[begin:], close[begin:], period, False, out[begin:])
    return out


@njit(cache=True, error_model="numpy")
def adx(high: np.ndarray, low: np.ndarray, close: np.ndarray, period: int) -> np.ndarray:
    """TA_ADX."""
    n = high.shape[0]
    begin = begin_index3(high, low, close) if n else 0
    lookback = 2 * period - 1
    out = nan_output(n, begin + lookback)
    if begin + lookback < n:
        adx_into(high[begin:], low[begin:], close[begin:], period, out[begin:])
    return out
