"""The incremental indicator bank against talib, bar by bar.

The oracle for every TA-Lib output is talib's batch function over the symbol's
whole history, compared row ``i`` of the bank's output with index ``i`` of the
batch output.  That equivalence needs talib's outputs to be causal (the value
at ``i`` depends on bars ``<= i`` only), which ``test_talib_outputs_are_causal``
checks for each function we rely on.  VWAP has no TA-Lib counterpart; its
oracle is an extended-precision cumulative sum.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import talib

from indicators import _bank_kernels as kernels
from indicators.bank import (
    LAYOUT_VERSION,
    BankConfig,
    IndicatorBank,
    StateLayoutError,
)

RTOL = 1e-9
ATOL = 1e-12
Series = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # o, h, l, c, v

# A second config exercises the edges of every period range (1s and 2s, fast ==
# slow MACD, uneven band widths) and several SMAs/EMAs.
EDGE_CONFIG = BankConfig(
    sma_periods=(2, 5, 200), ema_periods=(2, 9, 100), rsi_period=2, macd_fast=12, macd_slow=12,
    macd_signal=1, bb_period=5, bb_nbdev_up=1.5, bb_nbdev_dn=2.5, atr_period=1, adx_period=2,
    stoch_fastk=1, stoch_slowk=1, stoch_slowd=1, cci_period=2, willr_period=2, mfi_period=2,
    roc_period=1, mom_period=1,
)
WIDE_CONFIG = BankConfig(
    macd_fast=5, macd_slow=35, macd_signal=5, stoch_fastk=14, stoch_slowk=5, stoch_slowd=7, bb_period=50,
    bb_nbdev_up=1.0, bb_nbdev_dn=1.0, atr_period=50, adx_period=30, cci_period=40, willr_period=40,
    mfi_period=60,
)


# -- data ----------------------------------------------------------------------


def random_walk(n: int, seed: int, base: float = 100.0, vol: float = 0.01) -> Series:
    """Consistent OHLCV bars: log-normal closes, wicks around open/close, integer volumes."""
    rng = np.random.default_rng(seed)
    close = base * np.exp(np.cumsum(vol * rng.standard_normal(n)))
    open_ = np.r_[close[0], close[:-1]]
    spread = np.abs(rng.standard_normal(n)) * vol * close
    high = np.maximum(open_, close) + spread * rng.random(n)
    low = np.minimum(open_, close) - spread * rng.random(n)
    volume = rng.integers(0, 10_000, n).astype(np.float64)  # some bars trade nothing
    return open_, high, low, close, volume


def constant(n: int, price: float) -> Series:
    c = np.full(n, price)
    return c, c.copy(), c.copy(), c.copy(), np.full(n, 500.0)


def tick_rounded(n: int, seed: int) -> Series:
    """Prices on a coarse tick: exact ties, flat windows, zero ranges."""
    o, h, lo, c, v = random_walk(n, seed, base=20.0, vol=0.02)
    return np.round(o), np.round(h), np.round(lo), np.round(c), v


def flat_segment(n: int, seed: int) -> Series:
    o, h, low, c, v = (a.copy() for a in random_walk(n, seed))
    start, stop = n // 3, n // 3 + 60
    for a in (o, h, low, c):
        a[start:stop] = c[start]
    return o, h, low, c, v


DATASETS: dict[str, Callable[[int], Series]] = {
    "walk": lambda n: random_walk(n, 1),
    "constant": lambda n: constant(n, 100.3),
    "huge": lambda n: random_walk(n, 2, base=3.0e9),
    "small": lambda n: random_walk(n, 3, base=2.0e-6, vol=0.02),
    "ticks": lambda n: tick_rounded(n, 4),
    "flat_segment": lambda n: flat_segment(n, 5),
}


# -- oracle ----------------------------------------------------------------------


def talib_reference(cfg: BankConfig, s: Series) -> dict[str, np.ndarray]:
    """talib's batch output for every bank output over the whole history ``s``."""
    _, h, low, c, v = s
    ref: dict[str, np.ndarray] = {}
    for p in cfg.sma_periods:
        ref[f"sma_{p}"] = talib.SMA(c, p)
    for p in cfg.ema_periods:
        ref[f"ema_{p}"] = talib.EMA(c, p)
    ref["rsi"] = talib.RSI(c, cfg.rsi_period)
    ref["macd"], ref["macd_signal"], ref["macd_hist"] = talib.MACD(c, cfg.macd_fast, cfg.macd_slow, cfg.macd_signal)
    ref["bb_upper"], ref["bb_middle"], ref["bb_lower"] = talib.BBANDS(
        c, cfg.bb_period, cfg.bb_nbdev_up, cfg.bb_nbdev_dn, 0
    )
    ref["atr"] = talib.ATR(h, low, c, cfg.atr_period)
    ref["adx"] = talib.ADX(h, low, c, cfg.adx_period)
    ref["plus_di"] = talib.PLUS_DI(h, low, c, cfg.adx_period)
    ref["minus_di"] = talib.MINUS_DI(h, low, c, cfg.adx_period)
    ref["stoch_k"], ref["stoch_d"] = talib.STOCH(h, low, c, cfg.stoch_fastk, cfg.stoch_slowk, 0, cfg.stoch_slowd, 0)
    ref["cci"] = talib.CCI(h, low, c, cfg.cci_period)
    ref["willr"] = talib.WILLR(h, low, c, cfg.willr_period)
    ref["mfi"] = talib.MFI(h, low, c, v, cfg.mfi_period)
    ref["obv"] = talib.OBV(c, v)
    ref["roc"] = talib.ROC(c, cfg.roc_period)
    ref["mom"] = talib.MOM(c, cfg.mom_period)
    ref["vwap"] = vwap_reference(h, low, c, v)
    return ref


def vwap_reference(h: np.ndarray, low: np.ndarray, c: np.ndarray, v: np.ndarray,
                   session_start: np.ndarray | None = None) -> np.ndarray:
    """Session VWAP from cumulative sums in extended precision."""
    pv = ((h + low + c) / 3.0) * v  # the same rounded products the bank adds
    starts = np.zeros(len(c), dtype=bool) if session_start is None else session_start.astype(bool).copy()
    starts[0] = True
    session = np.cumsum(starts) - 1
    out = np.empty(len(c))
    for sid in np.unique(session):
        m = session == sid
        cum_pv = np.cumsum(pv[m].astype(np.longdouble))
        cum_v = np.cumsum(v[m].astype(np.longdouble))
        with np.errstate(invalid="ignore", divide="ignore"):
            out[m] = np.where(cum_v > 0, cum_pv / np.where(cum_v > 0, cum_v, 1), np.nan).astype(np.float64)
    return out


def assert_matches(name: str, got: np.ndarray, want: np.ndarray, *, exact: bool = False) -> None:
    """Same NaN positions; values within RTOL/ATOL (or bit for bit)."""
    assert got.shape == want.shape, name
    nan_got, nan_want = np.isnan(got), np.isnan(want)
    bad = np.flatnonzero(nan_got != nan_want)
    assert bad.size == 0, f"{name}: NaN pattern differs first at bar {bad[0]} (got {got[bad[0]]}, want {want[bad[0]]})"
    ok = ~nan_want
    if exact:
        diff = np.flatnonzero(got[ok] != want[ok])
    else:
        diff = np.flatnonzero(np.abs(got[ok] - want[ok]) > ATOL + RTOL * np.abs(want[ok]))
    if diff.size:
        i = np.flatnonzero(ok)[diff[0]]
        pytest.fail(f"{name}: {diff.size} bars differ, first at bar {i}: got {got[i]!r}, want {want[i]!r}")


# -- feeding ---------------------------------------------------------------------


def interleave(lengths: list[int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A random event order of all symbols' bars that keeps each symbol's order.

    Returns (symbol per event, the bar index within its symbol per event).
    """
    rng = np.random.default_rng(seed)
    syms = np.repeat(np.arange(len(lengths)), lengths)
    rng.shuffle(syms)
    bar = np.empty_like(syms)
    for s in range(len(lengths)):
        m = syms == s
        bar[m] = np.arange(m.sum())
    return syms, bar


def feed(bank: IndicatorBank, histories: list[Series], syms: np.ndarray, bar: np.ndarray, batch: int,
         sessions: list[np.ndarray] | None = None) -> np.ndarray:
    """Feed the interleaved events in batches of ``batch``; return all outputs in event order."""
    cols = [np.array([histories[s][j][b] for s, b in zip(syms, bar, strict=True)]) for j in range(5)]
    flags = None if sessions is None else np.array([sessions[s][b] for s, b in zip(syms, bar, strict=True)])
    outs = []
    for start in range(0, len(syms), batch):
        sl = slice(start, start + batch)
        outs.append(bank.update(syms[sl], *(c[sl] for c in cols),
                                session_start=None if flags is None else flags[sl]))
    return np.concatenate(outs)


def check_against_talib(bank: IndicatorBank, histories: list[Series], syms: np.ndarray, bar: np.ndarray,
                        out: np.ndarray, *, exact: bool = False) -> None:
    for s, hist in enumerate(histories):
        ref = talib_reference(bank.config, hist)
        rows = out[syms == s]
        assert np.array_equal(bar[syms == s], np.arange(len(hist[3])))
        for j, name in enumerate(bank.output_names):
            assert_matches(f"symbol {s} {name}", rows[:, j], ref[name], exact=exact)


# -- tests -------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [1, 7, 100, 0], ids=["batch1", "batch7", "batch100", "whole"])
def test_every_output_matches_talib_after_every_bar(batch: int) -> None:
    n = 600 if batch == 1 else 1500
    histories = [make(n) for make in DATASETS.values()]
    syms, bar = interleave([n] * len(histories), seed=batch)
    bank = IndicatorBank(BankConfig(), len(histories))
    out = feed(bank, histories, syms, bar, batch or len(syms))
    check_against_talib(bank, histories, syms, bar, out)


@pytest.mark.parametrize("cfg", [EDGE_CONFIG, WIDE_CONFIG], ids=["edge", "wide"])
def test_non_default_periods_match_talib(cfg: BankConfig) -> None:
    histories = [random_walk(1200, 7), tick_rounded(1200, 8), constant(300, 7.25)]
    syms, bar = interleave([len(h[3]) for h in histories], seed=3)
    bank = IndicatorBank(cfg, len(histories))
    out = feed(bank, histories, syms, bar, 97)
    check_against_talib(bank, histories, syms, bar, out)


def test_bit_exact_with_talib_over_100k_bars() -> None:
    """No drift: after 100k bars every output is still talib's, to the bit.

    The kernels repeat TA-Lib's arithmetic in its order, so the running sums
    round exactly like talib's own.  Bit-exactness is pinned to the TA-Lib C
    library this project ships (0.8.1 inside ta-lib 0.8.2); another library
    version may legitimately round differently, and then only the RTOL/ATOL
    tests apply.
    """
    exact = talib.__ta_version__.startswith(b"0.8.1")
    hist = random_walk(100_000, 11)
    bank = IndicatorBank(BankConfig(), 1)
    out = bank.update(np.zeros(100_000, dtype=np.int64), *hist)
    ref = talib_reference(bank.config, hist)
    for j, name in enumerate(bank.output_names):
        assert_matches(name, out[:, j], ref[name], exact=exact and name != "vwap")


def test_talib_outputs_are_causal() -> None:
    """talib(history[:m])[-1] == talib(history)[m-1]: row-by-row comparison is sound."""
    hist = random_walk(400, 21)
    cfg = BankConfig()
    full = talib_reference(cfg, hist)
    for m in (1, 2, 10, 14, 15, 27, 28, 33, 34, 35, 60, 257, 400):
        prefix = talib_reference(cfg, tuple(x[:m] for x in hist))
        for name, values in prefix.items():
            assert_matches(f"{name}[:{m}]", values, full[name][:m], exact=True)


def test_batch_boundaries_do_not_matter() -> None:
    histories = [random_walk(700, s) for s in range(5)]
    syms, bar = interleave([700] * 5, seed=9)
    results = []
    for batch in (1, 3, 64, 1000, len(syms)):
        bank = IndicatorBank(BankConfig(), 5)
        out = feed(bank, histories, syms, bar, batch)
        results.append((out, bank.state.copy()))
    for out, state in results[1:]:
        np.testing.assert_array_equal(out, results[0][0])
        np.testing.assert_array_equal(state, results[0][1])


def test_serialization_round_trip_then_continue() -> None:
    histories = [random_walk(900, 30), tick_rounded(900, 31), constant(900, 42.0)]
    syms, bar = interleave([900] * 3, seed=4)
    cut = 1300  # mid-warm-up for nothing, mid-stream for everything
    straight = IndicatorBank(BankConfig(), 3)
    expected = feed(straight, histories, syms, bar, 50)

    first = IndicatorBank(BankConfig(), 3)
    head = feed(first, histories, syms[:cut], bar[:cut], 50)
    blobs = [first.state_to_bytes(first.state[s]) for s in range(3)]
    restored = IndicatorBank(BankConfig(), 3)
    for s, blob in enumerate(blobs):
        row = restored.state_from_bytes(blob)
        assert row.tobytes() == first.state[s].tobytes()  # exact, NaN bits included
        restored.state[s] = row
        assert restored.state_to_bytes(restored.state[s]) == blob
    tail = feed(restored, histories, syms[cut:], bar[cut:], 50)
    np.testing.assert_array_equal(np.concatenate([head, tail]), expected)
    np.testing.assert_array_equal(restored.state, straight.state)


def test_state_from_bytes_rejects_other_layouts() -> None:
    bank = IndicatorBank(BankConfig(), 1)
    bank.update(np.zeros(50, dtype=np.int64), *random_walk(50, 1))
    blob = bank.state_to_bytes(bank.state[0])

    wrong_version = blob[:4] + (LAYOUT_VERSION + 1).to_bytes(2, "little") + blob[6:]
    with pytest.raises(StateLayoutError, match="layout version"):
        bank.state_from_bytes(wrong_version)
    with pytest.raises(StateLayoutError, match="magic"):
        bank.state_from_bytes(b"XXXX" + blob[4:])
    with pytest.raises(StateLayoutError, match="bytes"):
        bank.state_from_bytes(blob[:-8])
    with pytest.raises(StateLayoutError, match="shorter"):
        bank.state_from_bytes(blob[:10])
    other_width = IndicatorBank(BankConfig(sma_periods=(30, 60)), 1)
    with pytest.raises(StateLayoutError, match="slots"):
        other_width.state_from_bytes(blob)
    same_width = IndicatorBank(BankConfig(rsi_period=21), 1)  # same width, other meaning
    assert same_width.row_width == bank.row_width
    with pytest.raises(StateLayoutError, match="config"):
        same_width.state_from_bytes(blob)


def test_state_from_bytes_rejects_a_corrupt_row() -> None:
    """Break each checked invariant on purpose: the check must fire."""
    bank = IndicatorBank(BankConfig(), 1)
    bank.update(np.zeros(80, dtype=np.int64), *random_walk(80, 2))
    header = bank.state_to_bytes(bank.state[0])[:20]
    off = bank.layout.offsets
    corruptions = {
        "bar count": (kernels.H_COUNT, 80.5),
        "close ring cursor": (kernels.H_RING_NEXT, 3.0),
        "deque": (off["willr"], 99.0),
        "CCI ring cursor": (off["cci"] + kernels.CCI_NEXT, 0.0),
        "MFI empty-bar run": (off["mfi"] + kernels.MFI_NULL_RUN, -1.0),
    }
    for what, (slot, value) in corruptions.items():
        row = bank.state[0].copy()
        row[slot] = value
        with pytest.raises(StateLayoutError):
            bank.state_from_bytes(header + row.astype("<f8").tobytes())
        with pytest.raises(StateLayoutError):
            bank.state_to_bytes(row)  # checked on the way out too
        assert what


def test_reset_forgets_one_symbol_only() -> None:
    a, b = random_walk(300, 40), random_walk(300, 41)
    bank = IndicatorBank(BankConfig(), 2)
    bank.update(np.zeros(300, dtype=np.int64), *a)
    out_b = bank.update(np.ones(300, dtype=np.int64), *b)
    bank.reset(0)
    assert bank.bar_count(0) == 0 and not bank.initialized(0)
    assert all(np.isnan(x) for x in bank.values(0).values())
    fresh = IndicatorBank(BankConfig(), 1)
    np.testing.assert_array_equal(bank.update(np.zeros(300, dtype=np.int64), *a),
                                  fresh.update(np.zeros(300, dtype=np.int64), *a))
    assert list(bank.values(1).values()) == pytest.approx(list(out_b[-1]), nan_ok=True)


def test_grow_keeps_existing_symbols() -> None:
    bank = IndicatorBank(BankConfig(), 2)
    hist = random_walk(200, 50)
    bank.update(np.array([0, 1] * 100), *(np.repeat(x[:100], 2) for x in hist))
    before = bank.state.copy()
    added = [bank.add_symbol() for _ in range(5)]
    assert added == [2, 3, 4, 5, 6] and bank.n_symbols == 7
    np.testing.assert_array_equal(bank.state[:2], before)
    bank.grow(40)
    assert bank.state.shape == (40, bank.row_width)
    np.testing.assert_array_equal(bank.state[:2], before)
    out = bank.update(np.full(200, 39), *hist)
    ref = talib_reference(bank.config, hist)
    for j, name in enumerate(bank.output_names):
        assert_matches(name, out[:, j], ref[name])
    with pytest.raises(IndexError):
        bank.update(np.array([40]), *(x[:1] for x in hist))


def test_values_and_initialized_follow_the_warm_up() -> None:
    cfg = BankConfig()
    assert cfg.warmup_bars() == max(cfg.ema_periods)  # EMA(50) has the longest lookback, 49
    hist = random_walk(cfg.warmup_bars() + 5, 60)
    bank = IndicatorBank(cfg, 1)
    for i in range(len(hist[3])):
        out = bank.update(np.zeros(1, dtype=np.int64), *(x[i : i + 1] for x in hist))
        values = bank.values(0)
        assert list(values) == list(bank.output_names)
        np.testing.assert_array_equal(np.array(list(values.values())), out[0])
        assert bank.initialized(0) == (i + 1 >= cfg.warmup_bars())
        if bank.initialized(0):
            assert not np.isnan(out[0]).any()
        else:
            assert np.isnan(out[0]).any()


def test_vwap_restarts_at_session_starts() -> None:
    hist = random_walk(500, 70)
    sessions = np.zeros(500, dtype=bool)
    sessions[[120, 121, 300, 499]] = True
    bank = IndicatorBank(BankConfig(), 1)
    out = bank.update(np.zeros(500, dtype=np.int64), *hist, session_start=sessions)
    col = bank.output_names.index("vwap")
    assert_matches("vwap", out[:, col], vwap_reference(*hist[1:], session_start=sessions))
    # A session that has traded nothing has no VWAP.
    silent = tuple(x[:3].copy() for x in hist)
    silent[4][:] = 0.0
    assert np.isnan(IndicatorBank(BankConfig(), 1).update(np.zeros(3, dtype=np.int64), *silent)[:, col]).all()


def test_a_bad_batch_is_rejected_whole() -> None:
    hist = random_walk(20, 80)
    bank = IndicatorBank(BankConfig(), 2)
    bank.update(np.zeros(10, dtype=np.int64), *(x[:10] for x in hist))
    before = bank.state.copy()
    bad_close = hist[3][10:].copy()
    bad_close[5] = np.nan
    with pytest.raises(ValueError, match="finite"):
        bank.update(np.zeros(10, dtype=np.int64), hist[0][10:], hist[1][10:], hist[2][10:], bad_close, hist[4][10:])
    with pytest.raises(ValueError, match="volume"):
        bank.update(np.zeros(10, dtype=np.int64), *(x[10:] for x in hist[:4]), -hist[4][10:] - 1)
    with pytest.raises(IndexError):
        bank.update(np.full(10, 2), *(x[10:] for x in hist))
    with pytest.raises(ValueError, match="shape"):
        bank.update(np.zeros(10, dtype=np.int64), *(x[10:] for x in hist[:4]), hist[4][9:])
    np.testing.assert_array_equal(bank.state, before)


def test_config_is_validated() -> None:
    for bad in (
        {"rsi_period": 1}, {"sma_periods": (10, 10)}, {"ema_periods": [12]}, {"macd_fast": 30},
        {"bb_nbdev_up": float("inf")}, {"cci_period": 100_001}, {"mom_period": 0}, {"adx_period": 2.0},
    ):
        with pytest.raises((ValueError, TypeError)):
            BankConfig(**bad)


def test_layout_is_documented_and_consistent() -> None:
    bank = IndicatorBank(BankConfig(), 0)
    offsets = sorted(bank.layout.offsets.items(), key=lambda kv: kv[1])
    assert offsets[0] == ("header", 0)
    assert bank.row_width > offsets[-1][1]
    assert bank.state.shape == (0, bank.row_width)
    assert len(bank.output_names) == len(set(bank.output_names)) == 24
    assert bank.output_names[:4] == ("sma_30", "ema_12", "ema_26", "ema_50")
