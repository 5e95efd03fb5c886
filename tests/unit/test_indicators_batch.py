"""indicators.ta must return what talib returns: same NaN bars, same values.

Every indicator and every output is compared with ``talib`` (ta-lib 0.8.2, C library
0.8.1) on a realistic OHLCV random walk, noise, a constant series, NaN gaps (leading
NaNs plus holes in the middle), very short series (0, 1, lookback, lookback + 1 bars)
and extreme price scales, with default and non-default parameters. Values must agree
within 1e-9 relative or 1e-12 absolute and NaNs must sit on the same bars. VWAP, which
TA-Lib lacks, is checked against a plain numpy recomputation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import talib
from hypothesis import given, settings
from hypothesis import strategies as st
from talib import abstract

from indicators import ta

RTOL = 1e-9
ATOL = 1e-12
Bars = dict[str, np.ndarray]


# --- the indicators under test ---------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """An indicator: its talib input names and the parameter sets to try."""

    name: str
    inputs: tuple[str, ...]
    params: list[dict[str, Any]] = field(default_factory=list)

    def run(self, module: Any, bars: Bars, params: dict[str, Any]) -> tuple[np.ndarray, ...]:
        result = getattr(module, self.name)(*(bars[i] for i in self.inputs), **params)
        return result if isinstance(result, tuple) else (result,)


C = ("close",)
HL = ("high", "low")
HLC = ("high", "low", "close")
HLCV = ("high", "low", "close", "volume")

SPECS = [
    Spec("SMA", C, [{}, {"timeperiod": 1}, {"timeperiod": 7}]),
    Spec("EMA", C, [{}, {"timeperiod": 1}, {"timeperiod": 9}]),
    Spec("WMA", C, [{}, {"timeperiod": 1}, {"timeperiod": 5}]),
    Spec("DEMA", C, [{}, {"timeperiod": 1}, {"timeperiod": 6}]),
    Spec("TEMA", C, [{}, {"timeperiod": 1}, {"timeperiod": 4}]),
    Spec("RSI", C, [{}, {"timeperiod": 2}, {"timeperiod": 30}]),
    Spec("MACD", C, [{}, {"fastperiod": 5, "slowperiod": 13, "signalperiod": 1},
                     {"fastperiod": 26, "slowperiod": 12, "signalperiod": 4}]),
    Spec("BBANDS", C, [{}, {"timeperiod": 5, "nbdevup": 1.5, "nbdevdn": 2.5},
                       {"timeperiod": 9, "matype": ta.MA_Type.EMA},
                       {"timeperiod": 4, "matype": ta.MA_Type.WMA, "nbdevup": 3.0},
                       {"timeperiod": 3, "matype": ta.MA_Type.DEMA},
                       {"timeperiod": 3, "matype": ta.MA_Type.TEMA, "nbdevdn": 0.5},
                       {"timeperiod": 6, "matype": ta.MA_Type.DISABLED}]),
    Spec("STDDEV", C, [{}, {"timeperiod": 2}, {"timeperiod": 20, "nbdev": 2.0}]),
    Spec("TRANGE", HLC, [{}]),
    Spec("ATR", HLC, [{}, {"timeperiod": 1}, {"timeperiod": 5}]),
    Spec("NATR", HLC, [{}, {"timeperiod": 1}, {"timeperiod": 7}]),
    Spec("PLUS_DI", HLC, [{}, {"timeperiod": 1}, {"timeperiod": 6}]),
    Spec("MINUS_DI", HLC, [{}, {"timeperiod": 1}, {"timeperiod": 6}]),
    Spec("ADX", HLC, [{}, {"timeperiod": 2}, {"timeperiod": 9}]),
    Spec("STOCH", HLC, [{}, {"fastk_period": 14, "slowk_period": 1, "slowd_period": 1},
                        {"fastk_period": 9, "slowk_period": 4,
                         "slowk_matype": ta.MA_Type.EMA, "slowd_period": 5,
                         "slowd_matype": ta.MA_Type.WMA},
                        {"fastk_period": 3, "slowk_period": 2,
                         "slowk_matype": ta.MA_Type.TEMA, "slowd_period": 3,
                         "slowd_matype": ta.MA_Type.DEMA}]),
    Spec("STOCHF", HLC, [{}, {"fastk_period": 1, "fastd_period": 1},
                         {"fastk_period": 14, "fastd_period": 5,
                          "fastd_matype": ta.MA_Type.EMA}]),
    Spec("CCI", HLC, [{}, {"timeperiod": 2}, {"timeperiod": 20}]),
    Spec("WILLR", HLC, [{}, {"timeperiod": 2}, {"timeperiod": 5}]),
    Spec("MFI", HLCV, [{}, {"timeperiod": 2}, {"timeperiod": 6}]),
    Spec("OBV", ("close", "volume"), [{}]),
    Spec("AD", HLCV, [{}]),
    Spec("SAR", HL, [{}, {"acceleration": 0.05, "maximum": 0.3},
                     {"acceleration": 0.3, "maximum": 0.2}]),
    Spec("ROC", C, [{}, {"timeperiod": 1}, {"timeperiod": 3}]),
    Spec("MOM", C, [{}, {"timeperiod": 1}, {"timeperiod": 3}]),
]


def spec_params() -> list[Any]:
    """(spec, params) pairs with readable ids such as ``RSI-timeperiod=2``."""
    cases = []
    for spec in SPECS:
        for params in spec.params:
            label = ",".join(f"{k}={v}" for k, v in params.items()) or "defaults"
            cases.append(pytest.param(spec, params, id=f"{spec.name}-{label}"))
    return cases


def lookback(spec: Spec, params: dict[str, Any]) -> int:
    """TA-Lib's own lookback for these parameters."""
    function = abstract.Function(spec.name)
    function.set_parameters(params)
    return int(function.lookback)


# --- data ---------------------------------------------------------------------------


def random_walk(n: int, seed: int = 1, scale: float = 100.0) -> Bars:
    """Realistic OHLCV: positive prices, high >= max(open, close), low <= min(...)."""
    rng = np.random.default_rng(seed)
    close = scale * np.exp(np.cumsum(rng.normal(0.0, 0.01, n)))
    open_ = np.concatenate([close[:1], close[:-1]])
    wick = np.abs(rng.normal(0.0, 0.004, (2, n))) * close
    return {
        "open": open_,
        "high": np.maximum(open_, close) + wick[0],
        "low": np.minimum(open_, close) - wick[1],
        "close": close,
        "volume": np.round(rng.uniform(1.0, 5_000.0, n)),
    }


def noise(n: int, seed: int = 2) -> Bars:
    """Unordered noise: negative prices, high below low, zero volumes."""
    rng = np.random.default_rng(seed)
    bars = {name: rng.normal(0.0, 1.0, n) for name in ("open", "high", "low", "close")}
    bars["volume"] = np.where(rng.random(n) < 0.2, 0.0, rng.uniform(0.0, 10.0, n))
    return bars


def constant(n: int) -> Bars:
    """A flat market: every price 42.5, volume 7."""
    bars = {name: np.full(n, 42.5) for name in ("open", "high", "low", "close")}
    bars["volume"] = np.full(n, 7.0)
    return bars


def with_nan_gaps(bars: Bars) -> Bars:
    """Leading NaNs on every input, a 4-bar hole in close, single NaNs elsewhere."""
    holed = {name: values.copy() for name, values in bars.items()}
    for values in holed.values():
        values[:6] = np.nan
    holed["close"][200:204] = np.nan
    holed["high"][333] = np.nan
    holed["low"][150] = np.nan
    holed["volume"][420] = np.nan
    return holed


def scaled(bars: Bars, factor: float) -> Bars:
    """Prices times ``factor`` (volume untouched)."""
    return {name: values if name == "volume" else values * factor
            for name, values in bars.items()}


def hlc_of(bars: Bars) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(high, low, close) of ``bars``."""
    return bars["high"], bars["low"], bars["close"]


DATASETS: dict[str, Callable[[], Bars]] = {
    "random_walk": lambda: random_walk(600),
    "noise": lambda: noise(600),
    "constant": lambda: constant(300),
    "nan_gaps": lambda: with_nan_gaps(random_walk(600, seed=3)),
    "leading_nans_only": lambda: {k: np.concatenate([np.full(40, np.nan), v])
                                  for k, v in random_walk(200, seed=4).items()},
    "all_nan": lambda: {k: np.full(50, np.nan) for k in ("open", "high", "low", "close",
                                                          "volume")},
    "tiny_prices_1e-8": lambda: scaled(random_walk(600, seed=5), 1e-10),
    "huge_prices_1e9": lambda: scaled(random_walk(600, seed=6), 1e7),
    "integer_ticks": lambda: {k: np.round(v) for k, v in random_walk(600, seed=7).items()},
}


# --- comparison ------------------------------------------------------------------------


def assert_matches_talib(ours: tuple[np.ndarray, ...], theirs: tuple[np.ndarray, ...]) -> None:
    """Same number of outputs, same NaN bars, values within 1e-9 rel / 1e-12 abs."""
    assert len(ours) == len(theirs)
    for index, (mine, reference) in enumerate(zip(ours, theirs, strict=True)):
        assert mine.dtype == np.float64
        assert mine.shape == reference.shape, f"output {index}: shape"
        np.testing.assert_array_equal(np.isnan(mine), np.isnan(reference),
                                      err_msg=f"output {index}: NaN bars differ")
        np.testing.assert_allclose(mine, reference, rtol=RTOL, atol=ATOL, equal_nan=True,
                                   err_msg=f"output {index}: values differ")


@pytest.mark.parametrize("dataset", list(DATASETS))
@pytest.mark.parametrize(("spec", "params"), spec_params())
def test_every_output_matches_talib(spec: Spec, params: dict[str, Any], dataset: str) -> None:
    bars = DATASETS[dataset]()
    assert_matches_talib(spec.run(ta, bars, params), spec.run(talib, bars, params))


@pytest.mark.parametrize("length", ["0", "1", "lookback", "lookback+1", "lookback+2"])
@pytest.mark.parametrize(("spec", "params"), spec_params())
def test_short_series_match_talib_at_the_lookback_edge(spec: Spec, params: dict[str, Any],
                                                       length: str) -> None:
    edge = lookback(spec, params)
    n = {"0": 0, "1": 1, "lookback": edge, "lookback+1": edge + 1,
         "lookback+2": edge + 2}[length]
    bars = random_walk(n)
    assert_matches_talib(spec.run(ta, bars, params), spec.run(talib, bars, params))


@pytest.mark.parametrize("spec", [pytest.param(s, id=s.name) for s in SPECS])
def test_realistic_series_is_bit_identical_to_talib(spec: Spec) -> None:
    """Stronger than the tolerance: same operation order, same fma, same bits."""
    bars = random_walk(5_000, seed=11)
    for mine, reference in zip(spec.run(ta, bars, {}), spec.run(talib, bars, {}),
                               strict=True):
        np.testing.assert_array_equal(mine, reference)


# --- TA-Lib's NaN behaviour, pinned by name ------------------------------------------------


def test_leading_nans_are_skipped_so_output_starts_after_first_valid_bar() -> None:
    close = np.concatenate([np.full(5, np.nan), np.arange(1.0, 21.0)])
    out = ta.SMA(close, timeperiod=4)
    assert np.isnan(out[:8]).all() and out[8] == 2.5
    np.testing.assert_array_equal(out, talib.SMA(close, timeperiod=4))


def test_nan_gap_poisons_running_sum_indicators_for_the_rest_of_the_series() -> None:
    close = random_walk(120)["close"]
    close[50] = np.nan
    for function in (ta.SMA, ta.EMA, ta.DEMA, ta.TEMA):
        assert np.isnan(function(close, timeperiod=5)[50:]).all()


def test_nan_gap_heals_once_wma_and_stddev_rebuild_their_sums() -> None:
    close = random_walk(400)["close"]
    close[50] = np.nan
    # Rebuilds happen every 8*period (WMA) / 32*period (STDDEV) bars counted from the
    # first output at bar 2: WMA rebuilds at bars 25, 49, 73..., STDDEV at 97, 193...
    wma = ta.WMA(close, timeperiod=3)
    stddev = ta.STDDEV(close, timeperiod=3)
    assert np.isnan(wma[50:73]).all() and not np.isnan(wma[73:]).any()
    assert np.isnan(stddev[50:97]).all() and not np.isnan(stddev[97:]).any()
    assert_matches_talib((wma, stddev), (talib.WMA(close, 3), talib.STDDEV(close, 3)))


def test_rsi_turns_zero_not_nan_after_a_nan_gap() -> None:
    close = random_walk(60)["close"]
    close[30] = np.nan
    rsi = ta.RSI(close, timeperiod=5)
    assert (rsi[30:] == 0.0).all()
    np.testing.assert_array_equal(rsi, talib.RSI(close, timeperiod=5))


def test_momentum_only_loses_the_bars_whose_inputs_are_nan() -> None:
    close = random_walk(40)["close"]
    close[20] = np.nan
    mom = ta.MOM(close, timeperiod=3)
    assert np.flatnonzero(np.isnan(mom)).tolist() == [0, 1, 2, 20, 23]


def test_all_nan_input_gives_all_nan_output_like_talib() -> None:
    close = np.full(30, np.nan)
    assert np.isnan(ta.EMA(close, 5)).all()
    np.testing.assert_array_equal(ta.OBV(close, close), talib.OBV(close, close))


def test_flat_window_gives_zero_for_rsi_stoch_willr_cci() -> None:
    bars = constant(40)
    hlc = (bars["high"], bars["low"], bars["close"])
    assert (ta.RSI(bars["close"])[14:] == 0.0).all()
    assert (ta.STOCHF(*hlc)[0][6:] == 0.0).all()
    assert (ta.WILLR(*hlc)[13:] == 0.0).all()
    assert (ta.CCI(*hlc)[13:] == 0.0).all()


# --- parameters and errors --------------------------------------------------------------


def test_defaults_follow_talib_0_8_including_bbands_period_20() -> None:
    bars = random_walk(100)
    middle = ta.BBANDS(bars["close"])[1]
    assert np.isnan(middle[:19]).all() and not np.isnan(middle[19])
    assert_matches_talib(ta.MACD(bars["close"]), talib.MACD(bars["close"]))
    assert_matches_talib(ta.STOCH(*hlc_of(bars)), talib.STOCH(*hlc_of(bars)))


def test_macd_swaps_fast_and_slow_like_talib() -> None:
    close = random_walk(200)["close"]
    assert_matches_talib(ta.MACD(close, 26, 12, 9), ta.MACD(close, 12, 26, 9))


def test_sar_acceleration_above_maximum_is_capped_like_talib() -> None:
    bars = random_walk(200)
    np.testing.assert_array_equal(ta.SAR(bars["high"], bars["low"], 0.5, 0.2),
                                  ta.SAR(bars["high"], bars["low"], 0.2, 0.2))


def test_default_matype_means_sma_for_bbands_and_stochastics() -> None:
    bars = random_walk(100)
    hlc = hlc_of(bars)
    assert_matches_talib(ta.BBANDS(bars["close"], matype=ta.MA_Type.DEFAULT),
                         ta.BBANDS(bars["close"], matype=ta.MA_Type.SMA))
    assert_matches_talib(ta.STOCH(*hlc, slowk_matype=11, slowd_matype=11), ta.STOCH(*hlc))
    assert_matches_talib(ta.STOCHF(*hlc, fastd_matype=11),
                         talib.STOCHF(*hlc, fastd_matype=11))


@pytest.mark.parametrize("matype", [5, 6, 7, 8, 9, 12, 13])
def test_ma_types_without_a_kernel_raise_not_implemented(matype: int) -> None:
    bars = random_walk(50)
    with pytest.raises(NotImplementedError, match="matype"):
        ta.BBANDS(bars["close"], matype=matype)
    with pytest.raises(NotImplementedError, match="slowd_matype"):
        ta.STOCH(*hlc_of(bars), slowd_matype=matype)


@pytest.mark.parametrize("matype", [-1, 14, 100])
def test_unknown_ma_types_are_rejected_like_talib(matype: int) -> None:
    close = random_walk(50)["close"]
    with pytest.raises(ValueError, match="matype"):
        ta.BBANDS(close, matype=matype)
    with pytest.raises(Exception):  # noqa: B017 - talib raises a bare Exception
        talib.BBANDS(close, matype=matype)


BAD_PARAMS = [
    ("SMA", {"timeperiod": 0}), ("EMA", {"timeperiod": 100001}), ("RSI", {"timeperiod": 1}),
    ("MACD", {"fastperiod": 1}), ("MACD", {"signalperiod": 0}), ("BBANDS", {"timeperiod": 1}),
    ("BBANDS", {"nbdevup": float("nan")}), ("BBANDS", {"nbdevdn": 4e37}),
    ("STDDEV", {"timeperiod": 1}), ("STDDEV", {"nbdev": float("inf")}),
    ("ATR", {"timeperiod": 0}), ("ADX", {"timeperiod": 1}), ("CCI", {"timeperiod": 1}),
    ("WILLR", {"timeperiod": 1}), ("MFI", {"timeperiod": 1}), ("STOCH", {"fastk_period": 0}),
    ("STOCHF", {"fastd_period": 0}), ("SAR", {"acceleration": -0.01}),
    ("SAR", {"maximum": float("nan")}), ("ROC", {"timeperiod": 0}), ("MOM", {"timeperiod": 0}),
]


@pytest.mark.parametrize(("name", "params"), BAD_PARAMS,
                         ids=[f"{n}-{p}" for n, p in BAD_PARAMS])
def test_out_of_range_parameters_raise_value_error_where_talib_raises(
        name: str, params: dict[str, Any]) -> None:
    spec = next(s for s in SPECS if s.name == name)
    bars = random_walk(100)
    with pytest.raises(ValueError, match=name):
        spec.run(ta, bars, params)
    with pytest.raises(Exception):  # noqa: B017 - talib raises a bare Exception
        spec.run(talib, bars, params)


def test_non_integer_period_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="timeperiod"):
        ta.SMA(random_walk(50)["close"], timeperiod=14.5)  # type: ignore[arg-type]


def test_mismatched_input_lengths_raise_value_error() -> None:
    bars = random_walk(50)
    with pytest.raises(ValueError, match="different lengths"):
        ta.ATR(bars["high"], bars["low"][:-1], bars["close"])
    with pytest.raises(ValueError, match="different lengths"):
        ta.OBV(bars["close"], bars["volume"][:10])


def test_two_dimensional_input_is_rejected() -> None:
    with pytest.raises(ValueError, match="1-D"):
        ta.SMA(np.ones((10, 2)))
    with pytest.raises(ValueError, match="1-D"):
        ta.SMA(5.0)  # type: ignore[arg-type]


def test_lists_ints_float32_and_strided_views_are_converted_to_float64() -> None:
    close = random_walk(80)["close"]
    expected = talib.RSI(close, 5)
    assert_matches_talib((ta.RSI(close.tolist(), 5),), (expected,))
    strided = np.repeat(close, 2)[::2]
    assert_matches_talib((ta.RSI(strided, 5),), (expected,))
    ints = np.arange(30)
    assert_matches_talib((ta.SMA(ints, 4),), (talib.SMA(ints.astype(np.float64), 4),))
    as32 = close.astype(np.float32)
    assert_matches_talib((ta.EMA(as32, 6),), (talib.EMA(as32.astype(np.float64), 6),))


def test_inputs_are_not_modified() -> None:
    bars = with_nan_gaps(random_walk(600))
    copies = {k: v.copy() for k, v in bars.items()}
    for spec in SPECS:
        spec.run(ta, bars, {})
    for name, values in bars.items():
        np.testing.assert_array_equal(values, copies[name])


# --- property tests against talib ---------------------------------------------------------


@st.composite
def price_series(draw: st.DrawFn) -> Bars:
    """A random walk of random length and scale, sometimes with NaN holes."""
    n = draw(st.integers(0, 260))
    seed = draw(st.integers(0, 2**32 - 1))
    scale = draw(st.sampled_from([1e-8, 1.0, 250.0, 1e9]))
    bars = random_walk(n, seed=seed, scale=scale)
    if n and draw(st.booleans()):
        rng = np.random.default_rng(seed)
        lead = draw(st.integers(0, min(n, 20)))
        for values in bars.values():
            values[:lead] = np.nan
        for _ in range(draw(st.integers(0, 4))):
            name = draw(st.sampled_from(sorted(bars)))
            bars[name][rng.integers(0, n)] = np.nan
    return bars


PERIOD_LIMITS = {"SMA": 1, "EMA": 1, "WMA": 1, "DEMA": 1, "TEMA": 1, "RSI": 2,
                 "STDDEV": 2, "ATR": 1, "NATR": 1, "PLUS_DI": 1, "MINUS_DI": 1, "ADX": 2,
                 "CCI": 2, "WILLR": 2, "MFI": 2, "ROC": 1, "MOM": 1}


@settings(max_examples=150, deadline=None)
@given(bars=price_series(), name=st.sampled_from(sorted(PERIOD_LIMITS)),
       period=st.integers(1, 60))
def test_property_single_period_indicators_match_talib(bars: Bars, name: str,
                                                       period: int) -> None:
    spec = next(s for s in SPECS if s.name == name)
    params = {"timeperiod": max(period, PERIOD_LIMITS[name])}
    assert_matches_talib(spec.run(ta, bars, params), spec.run(talib, bars, params))


@settings(max_examples=100, deadline=None)
@given(bars=price_series(), fast=st.integers(2, 40), slow=st.integers(2, 40),
       signal=st.integers(1, 20), matype=st.sampled_from([0, 1, 2, 3, 4, 10]),
       band_period=st.integers(2, 40), k_period=st.integers(1, 20),
       smooth=st.integers(1, 6), up=st.floats(0.0, 4.0), down=st.floats(0.0, 4.0))
def test_property_multi_parameter_indicators_match_talib(
        bars: Bars, fast: int, slow: int, signal: int, matype: int, band_period: int,
        k_period: int, smooth: int, up: float, down: float) -> None:
    close = bars["close"]
    hlc = hlc_of(bars)
    assert_matches_talib(ta.MACD(close, fast, slow, signal),
                         talib.MACD(close, fast, slow, signal))
    assert_matches_talib(ta.BBANDS(close, band_period, up, down, matype),
                         talib.BBANDS(close, band_period, up, down, matype))
    assert_matches_talib(ta.STOCH(*hlc, k_period, smooth, matype, smooth, matype),
                         talib.STOCH(*hlc, k_period, smooth, matype, smooth, matype))
    assert_matches_talib(ta.STOCHF(*hlc, k_period, smooth, matype),
                         talib.STOCHF(*hlc, k_period, smooth, matype))
    assert_matches_talib(ta.SAR(bars["high"], bars["low"], up / 40, down / 8),
                         talib.SAR(bars["high"], bars["low"], up / 40, down / 8))


# --- VWAP (not in TA-Lib): checked against numpy -------------------------------------------


def numpy_vwap(bars: Bars, sessions: np.ndarray) -> np.ndarray:
    """Straightforward per-session cumulative VWAP of the typical price."""
    typical = (bars["high"] + bars["low"] + bars["close"]) / 3.0
    volume = bars["volume"]
    valid = ~(np.isnan(typical) | np.isnan(volume))
    out = np.full(typical.shape[0], np.nan)
    starts = np.flatnonzero(np.r_[True, sessions[1:] != sessions[:-1]]) if sessions.size else []
    bounds = list(starts) + [typical.shape[0]]
    for first, stop in zip(bounds[:-1], bounds[1:], strict=True):
        weight = np.where(valid[first:stop], typical[first:stop] * volume[first:stop], 0.0)
        total = np.where(valid[first:stop], volume[first:stop], 0.0)
        cumulative_volume = np.cumsum(total)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[first:stop] = np.where(cumulative_volume != 0.0,
                                       np.cumsum(weight) / cumulative_volume, np.nan)
    return out


def test_vwap_resets_at_each_session_id_change() -> None:
    bars = random_walk(1_000)
    sessions = np.repeat(np.arange(10), 100)
    vwap = ta.VWAP(bars["high"], bars["low"], bars["close"], bars["volume"], sessions)
    np.testing.assert_allclose(vwap, numpy_vwap(bars, sessions), rtol=1e-12)
    typical = (bars["high"] + bars["low"] + bars["close"]) / 3.0
    assert vwap[100] == pytest.approx(typical[100], rel=1e-15)


def test_vwap_without_sessions_is_one_cumulative_session() -> None:
    bars = random_walk(300)
    vwap = ta.VWAP(bars["high"], bars["low"], bars["close"], bars["volume"])
    np.testing.assert_allclose(vwap, numpy_vwap(bars, np.zeros(300, dtype=np.int64)),
                               rtol=1e-12)


def test_vwap_session_s_with_timestamps_matches_the_equivalent_session_ids() -> None:
    bars = random_walk(500)
    timestamps = 1_700_000_000.0 + 60.0 * np.arange(500)  # one bar a minute
    day_s = 86_400.0
    offset_s = 13.5 * 3600.0
    sessions = np.floor((timestamps - offset_s) / day_s).astype(np.int64)
    by_time = ta.VWAP(bars["high"], bars["low"], bars["close"], bars["volume"],
                      timestamps=timestamps, session_s=day_s, session_offset_s=offset_s)
    by_ids = ta.VWAP(bars["high"], bars["low"], bars["close"], bars["volume"], sessions)
    np.testing.assert_array_equal(by_time, by_ids)
    np.testing.assert_allclose(by_time, numpy_vwap(bars, sessions), rtol=1e-12)
    as_datetime = (timestamps * 1e9).astype("datetime64[ns]")
    np.testing.assert_array_equal(
        ta.VWAP(bars["high"], bars["low"], bars["close"], bars["volume"],
                timestamps=as_datetime, session_s=day_s, session_offset_s=offset_s), by_time)


def test_vwap_skips_nan_bars_and_is_nan_before_any_volume() -> None:
    bars = random_walk(50)
    bars["volume"][:3] = 0.0
    bars["close"][10] = np.nan
    bars["volume"][20] = np.nan
    sessions = np.repeat(np.arange(2), 25)
    vwap = ta.VWAP(bars["high"], bars["low"], bars["close"], bars["volume"], sessions)
    assert np.isnan(vwap[:3]).all()
    assert vwap[10] == vwap[9] and vwap[20] == vwap[19]
    np.testing.assert_allclose(vwap, numpy_vwap(bars, sessions), rtol=1e-12)


def test_vwap_of_empty_input_is_empty() -> None:
    empty = np.array([])
    assert ta.VWAP(empty, empty, empty, empty).shape == (0,)


@pytest.mark.parametrize("kwargs", [
    {"session_ids": np.zeros(10, dtype=np.int64), "timestamps": np.arange(10.0),
     "session_s": 5.0},
    {"timestamps": np.arange(10.0)},
    {"session_s": 60.0},
    {"timestamps": np.arange(10.0), "session_s": 0.0},
    {"timestamps": np.r_[np.arange(9.0), np.nan], "session_s": 5.0},
    {"session_ids": np.zeros(10)},
    {"session_ids": np.zeros(9, dtype=np.int64)},
], ids=["ids_and_timestamps", "timestamps_without_length", "length_without_timestamps",
        "zero_length", "nan_timestamp", "float_ids", "short_ids"])
def test_vwap_rejects_inconsistent_session_arguments(kwargs: dict[str, Any]) -> None:
    bars = random_walk(10)
    with pytest.raises(ValueError, match="VWAP"):
        ta.VWAP(bars["high"], bars["low"], bars["close"], bars["volume"], **kwargs)
