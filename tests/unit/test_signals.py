"""Signal rules: hand-built series that must fire exactly where expected, never in warm-up."""

from __future__ import annotations

import numpy as np
import pytest

from indicators.bank import IndicatorBank
from indicators.signals import (BB_REVERSION, BREAKOUT, F_ADX, F_ATR, F_BB_LOWER, F_BB_MIDDLE, F_BB_UPPER, F_CLOSE,
                                F_EMA_FAST, F_EMA_SLOW, F_HIGH, F_LOW, F_MACD, F_MACD_SIGNAL, F_RSI, N_FEATURES,
                                N_MODEL_FEATURES, RSI_REVERSION, STRATEGIES, TREND_EMA, TREND_MACD, FeatureMap,
                                SignalConfig, SignalOutput, SignalRules)

NO_COOLDOWN = SignalConfig(cooldown_bars=0)


def frame(n: int, close: float = 100.0) -> np.ndarray:
    """n bars of a flat market: close/high/low and ATR set, every other feature NaN."""
    feat = np.full((n, N_FEATURES), np.nan)
    feat[:, F_CLOSE] = close
    feat[:, F_HIGH] = close + 0.5
    feat[:, F_LOW] = close - 0.5
    feat[:, F_ATR] = 1.0
    return feat


def fired(out: SignalOutput) -> list[tuple[int, str, int]]:
    return [(int(out.bar[i]), STRATEGIES[int(out.strategy[i])], int(out.side[i])) for i in range(len(out))]


def run(feat: np.ndarray, config: SignalConfig = NO_COOLDOWN) -> SignalOutput:
    return SignalRules(config, n_rows=1).process_batch(np.zeros(len(feat), np.int64), feat)


def test_ema_cross_fires_with_adx_above_threshold_only_after_warm_up() -> None:
    feat = frame(12)
    fast = [np.nan] * 4 + [101, 99, 99, 99, 101, 101, 99, 99]
    feat[:, F_EMA_FAST] = fast
    feat[:, F_EMA_SLOW] = 100.0
    feat[:4, F_EMA_SLOW] = np.nan  # warm-up: the first finite bar (4) has nothing to cross from
    feat[:, F_ADX] = 30.0
    assert fired(run(feat)) == [(5, "trend_ema", -1), (8, "trend_ema", 1), (10, "trend_ema", -1)]
    feat[:, F_ADX] = 19.9
    assert fired(run(feat)) == []
    feat[:, F_ADX] = np.nan
    assert fired(run(feat)) == []


def test_macd_cross_fires_on_the_cross_bar() -> None:
    feat = frame(10)
    feat[:, F_MACD_SIGNAL] = 0.0
    feat[:, F_MACD] = [np.nan, np.nan, -0.2, -0.1, 0.0, 0.3, 0.2, -0.1, -0.2, -0.3]
    feat[:, F_ADX] = 25.0
    # 0.0 -> 0.3 crosses up (touching the line first is not yet a cross).
    assert fired(run(feat)) == [(5, "trend_macd", 1), (7, "trend_macd", -1)]


def test_rsi_fires_when_leaving_oversold_or_overbought() -> None:
    feat = frame(12)
    feat[:, F_RSI] = [np.nan, np.nan, np.nan, 25, 28, 32, 50, 75, 72, 69, 40, 29]
    assert fired(run(feat)) == [(5, "rsi_reversion", 1), (9, "rsi_reversion", -1)]


def test_rsi_first_value_outside_the_band_does_not_fire() -> None:
    feat = frame(5)
    feat[:, F_RSI] = [np.nan, np.nan, 35, 36, 37]  # previous NaN: no "leaving" at bar 2
    assert fired(run(feat)) == []


def test_bollinger_re_entry_fires_on_the_bar_back_inside() -> None:
    feat = frame(8)
    feat[:, F_CLOSE] = [100, 100, 97, 98.5, 100, 103, 101, 100]
    feat[:, F_BB_UPPER] = [np.nan, 102, 102, 102, 102, 102, 102, 102]
    feat[:, F_BB_MIDDLE] = 100.0
    feat[:, F_BB_LOWER] = [np.nan, 98, 98, 98, 98, 98, 98, 98]
    assert fired(run(feat)) == [(3, "bb_reversion", 1), (6, "bb_reversion", -1)]


def test_breakout_needs_a_full_window_and_clears_the_atr_margin() -> None:
    config = SignalConfig(cooldown_bars=0, breakout_bars=5, breakout_atr=0.5)
    feat = frame(14)
    feat[3, F_CLOSE] = 105.0  # only 3 bars in the window: warm-up, no signal
    feat[6, F_CLOSE] = 100.9  # above the 100.5 high, but inside the 0.5 x ATR margin
    feat[7, F_CLOSE] = 101.1  # beyond 100.5 + 0.5
    feat[7, F_HIGH] = 101.2
    feat[12, F_CLOSE] = 98.9  # below 99.5 - 0.5
    got = fired(run(feat, config))
    assert got == [(7, "breakout", 1), (12, "breakout", -1)]


def test_targets_and_stops_are_atr_multiples_in_the_signal_direction() -> None:
    feat = frame(8)
    feat[:, F_ATR] = 2.0
    feat[:, F_RSI] = [np.nan, 20, 31, 50, 80, 69, 50, 50]
    out = run(feat, SignalConfig(cooldown_bars=0, target_atr=(2, 2, 1.5, 1.5, 3), stop_atr=(1, 1, 0.5, 1, 1)))
    assert fired(out) == [(2, "rsi_reversion", 1), (5, "rsi_reversion", -1)]
    assert out.price.tolist() == [100.0, 100.0]
    assert out.price_target.tolist() == [103.0, 97.0]
    assert out.stop_loss.tolist() == [99.0, 101.0]
    assert out.x.shape == (2, N_MODEL_FEATURES)
    assert np.isfinite(out.x).all()


def test_no_atr_no_signal() -> None:
    feat = frame(6)
    feat[:, F_RSI] = [np.nan, 20, 31, 50, 80, 69]
    feat[:, F_ATR] = [1, 1, np.nan, 1, 1, 0.0]
    assert fired(run(feat)) == []


def test_cooldown_spaces_signals_of_one_strategy_per_row() -> None:
    feat = frame(12)
    feat[:, F_RSI] = [25, 35] * 6  # leaves oversold every other bar
    assert [b for b, *_ in fired(run(feat, SignalConfig(cooldown_bars=0)))] == [1, 3, 5, 7, 9, 11]
    assert [b for b, *_ in fired(run(feat, SignalConfig(cooldown_bars=3)))] == [1, 5, 9]
    # Rows do not share cooldowns.
    rules = SignalRules(SignalConfig(cooldown_bars=3), n_rows=2)
    both = rules.process_batch(np.array([0, 1] * 12), np.repeat(feat, 2, axis=0))
    assert sorted(int(b) for b in both.bar) == [2, 3, 10, 11, 18, 19]


def test_disabled_strategies_stay_silent() -> None:
    feat = frame(6)
    feat[:, F_RSI] = [25, 35, 25, 35, 25, 35]
    enabled = tuple(s != RSI_REVERSION for s in range(len(STRATEGIES)))
    assert fired(run(feat, SignalConfig(cooldown_bars=0, enabled=enabled))) == []


def _market(n: int, seed: int) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    # Alternating trends and chop so every rule has something to find.
    drift = np.repeat(rng.choice([-0.004, 0.0, 0.004], size=n // 50 + 1), 50)[:n]
    close = 100 * np.exp(np.cumsum(drift + rng.normal(0, 0.004, n)))
    high = close * (1 + np.abs(rng.normal(0, 0.002, n)))
    low = close * (1 - np.abs(rng.normal(0, 0.002, n)))
    return high, low, close


def _bank_features(high: np.ndarray, low: np.ndarray, close: np.ndarray) -> np.ndarray:
    bank = IndicatorBank(n_symbols=1)
    out = bank.update(np.zeros(len(close), np.int64), close, high, low, close, np.ones(len(close)))
    return FeatureMap(bank.output_names).build(out, high, low, close)


def test_on_bank_output_no_rule_fires_before_its_indicators_warm_up() -> None:
    high, low, close = _market(3_000, 7)
    out = run(_bank_features(high, low, close), SignalConfig())
    # First possible bar per strategy with TA-Lib lookbacks (ATR 14 gates all; crosses
    # need the previous bar too): EMA26 25+1, ADX 27; MACD signal 33+1; RSI 14+1;
    # BBANDS 19+1; breakout needs 20 earlier bars.
    first_allowed = {TREND_EMA: 27, TREND_MACD: 34, RSI_REVERSION: 15, BB_REVERSION: 20, BREAKOUT: 20}
    for strategy, earliest in first_allowed.items():
        bars = out.bar[out.strategy == strategy]
        assert len(bars) > 5, f"{STRATEGIES[strategy]} never fired on 3000 bars"
        assert bars.min() >= earliest


def test_batch_boundaries_do_not_change_the_signals() -> None:
    rng = np.random.default_rng(3)
    n_rows = 3
    series = [_market(600, 10 + r) for r in range(n_rows)]
    feats = [_bank_features(*s) for s in series]
    # Interleave the rows' bars at random, keeping each row's order.
    order = rng.permutation(np.repeat(np.arange(n_rows), 600))
    taken = [0] * n_rows
    rows, feat = [], []
    for r in order:
        rows.append(r)
        feat.append(feats[r][taken[r]])
        taken[r] += 1
    rows_a, feat_a = np.array(rows), np.array(feat)
    whole = SignalRules(n_rows=n_rows).process_batch(rows_a, feat_a)
    want = [(int(b), int(s), int(d), float(p))
            for b, s, d, p in zip(whole.bar, whole.strategy, whole.side, whole.price)]
    rules = SignalRules(n_rows=n_rows)
    got = []
    cuts = [0, *sorted(rng.choice(np.arange(1, len(rows)), 25, replace=False)), len(rows)]
    for lo, hi in zip(cuts, cuts[1:]):
        part = rules.process_batch(rows_a[lo:hi], feat_a[lo:hi])
        got += [(int(b) + lo, int(s), int(d), float(p))
                for b, s, d, p in zip(part.bar, part.strategy, part.side, part.price)]
    assert got == want and len(want) > 20


def test_feature_map_takes_columns_by_bank_name() -> None:
    names = ("ema_12", "ema_26", "rsi", "macd", "macd_signal", "bb_upper", "bb_middle", "bb_lower", "atr", "adx")
    bank_out = np.arange(20.0).reshape(2, 10)
    feat = FeatureMap(names).build(bank_out, np.array([5.0, 6.0]), np.array([3.0, 4.0]), np.array([4.0, 5.0]))
    assert feat[1, F_EMA_FAST] == 10.0 and feat[1, F_EMA_SLOW] == 11.0 and feat[1, F_ADX] == 19.0
    assert feat[0, F_BB_LOWER] == 7.0 and feat[0, F_MACD] == 3.0 and feat[0, F_MACD_SIGNAL] == 4.0
    assert feat[0, F_RSI] == 2.0 and feat[0, F_BB_UPPER] == 5.0 and feat[0, F_BB_MIDDLE] == 6.0
    assert feat[1, F_HIGH] == 6.0 and feat[1, F_LOW] == 4.0 and feat[1, F_CLOSE] == 5.0 and feat[0, F_ATR] == 8.0
    with pytest.raises(ValueError, match="ema_26"):
        FeatureMap(("ema_12",))


def test_boundaries_are_checked() -> None:
    rules = SignalRules(n_rows=1, max_batch_bars=4)
    with pytest.raises(AssertionError):
        rules.process_batch(np.zeros(5, np.int64), frame(5))
    with pytest.raises(IndexError):
        rules.process_batch(np.ones(1, np.int64), frame(1))
    with pytest.raises(AssertionError):
        rules.process_batch(np.zeros(2, np.int64), frame(2)[:, :5])
    with pytest.raises(ValueError):
        SignalConfig(breakout_bars=1_000)
