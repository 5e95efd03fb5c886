"""Signal outcomes and performance against a plain recomputation, over batch splits."""

from __future__ import annotations

import math

import numpy as np
import pytest

from indicators.outcomes import EXIT_HORIZON, EXIT_STOP, EXIT_TARGET, M, OutcomeTracker
from indicators.signals import N_STRATEGIES

HORIZONS = (2, 5, 9)
Outcome = tuple[int, int, int, int, int, int, int, float]  # row, sig ts, strategy, h, side, hit, exit, ret


def make_stream(seed: int, n_bars: int, n_rows: int,
                p_signal: float) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, n_rows, n_bars)
    price = np.full(n_rows, 100.0)
    ts = np.zeros(n_rows, np.int64)
    bars = {k: np.empty(n_bars) for k in ("high", "low", "close")}
    bars["row"] = rows
    bars["ts"] = np.empty(n_bars, np.int64)
    sig: dict[str, list] = {k: [] for k in ("bar", "ts", "strategy", "side", "price", "target", "stop", "model", "x")}
    for j, r in enumerate(rows):
        ts[r] += 1_000
        price[r] *= math.exp(rng.normal(0, 0.01))
        c = price[r]
        bars["close"][j] = c
        bars["high"][j] = c * (1 + abs(rng.normal(0, 0.006)))
        bars["low"][j] = c * (1 - abs(rng.normal(0, 0.006)))
        bars["ts"][j] = ts[r]
        for s in range(N_STRATEGIES):
            if rng.random() < p_signal:
                side = int(rng.choice([-1, 1]))
                atr = c * 0.01
                sig["bar"].append(j)
                sig["ts"].append(ts[r])
                sig["strategy"].append(s)
                sig["side"].append(side)
                sig["price"].append(c)
                sig["target"].append(c + side * rng.uniform(0.5, 3) * atr)
                sig["stop"].append(c - side * rng.uniform(0.5, 2) * atr)
                sig["model"].append(s)
                sig["x"].append(rng.normal(size=M))
    sigs = {k: np.array(v) for k, v in sig.items()}
    sigs["x"] = sigs["x"].reshape(-1, M)
    return bars, sigs


def reference(bars: dict[str, np.ndarray], sigs: dict[str, np.ndarray], max_pending: int,
              ) -> tuple[list[Outcome], dict[tuple[int, int, int], list[tuple[int, float]]], list[int]]:
    """Every outcome and, per (row, strategy, horizon), returns in resolution order."""
    n_rows = int(bars["row"].max()) + 1
    by_row = [np.flatnonzero(bars["row"] == r) for r in range(n_rows)]
    outcomes: list[Outcome] = []
    cells: dict[tuple[int, int, int], list[tuple[int, float]]] = {}
    live_until: list[list[int]] = [[] for _ in range(n_rows)]  # bar index at which each tracked signal ends
    overflow = [0] * n_rows
    for q in range(len(sigs["bar"])):
        j = int(sigs["bar"][q])
        r = int(bars["row"][j])
        later = by_row[r][by_row[r] > j]
        # Slots free up once the last horizon resolved (on or before this signal's bar).
        live_until[r] = [end for end in live_until[r] if end > j]
        if len(live_until[r]) >= max_pending:
            overflow[r] += 1
            continue
        live_until[r].append(int(later[HORIZONS[-1] - 1]) if len(later) >= HORIZONS[-1] else 10**9)
        side, entry = int(sigs["side"][q]), float(sigs["price"][q])
        target, stop = float(sigs["target"][q]), float(sigs["stop"][q])
        touch, level = EXIT_HORIZON, math.nan
        for h_idx, h in enumerate(HORIZONS):
            if len(later) < h:
                break
            for b in later[:h]:
                if touch != EXIT_HORIZON:
                    break
                hi, lo = bars["high"][b], bars["low"][b]
                stop_hit = lo <= stop if side > 0 else hi >= stop
                target_hit = hi >= target if side > 0 else lo <= target
                if stop_hit:
                    touch, level = EXIT_STOP, stop
                elif target_hit:
                    touch, level = EXIT_TARGET, target
            exit_price = level if touch != EXIT_HORIZON else bars["close"][later[h - 1]]
            ret = side * (exit_price / entry - 1.0)
            strategy = int(sigs["strategy"][q])
            outcomes.append((r, int(sigs["ts"][q]), strategy, h_idx, side, int(ret > 0), touch, ret))
            cells.setdefault((r, strategy, h_idx), []).append((int(later[h - 1]), ret))
    for key in cells:
        cells[key].sort()
    return outcomes, cells, overflow


def run(tracker: OutcomeTracker, bars: dict[str, np.ndarray], sigs: dict[str, np.ndarray],
        cuts: list[int]) -> list[Outcome]:
    n = len(bars["row"])
    bounds = [0, *sorted(set(c for c in cuts if 0 < c < n)), n]
    got: list[Outcome] = []
    for lo, hi in zip(bounds, bounds[1:]):
        mask = (sigs["bar"] >= lo) & (sigs["bar"] < hi)
        out = tracker.process_batch(bars["row"][lo:hi], bars["ts"][lo:hi], bars["high"][lo:hi], bars["low"][lo:hi],
                                    bars["close"][lo:hi], sigs["bar"][mask] - lo, sigs["ts"][mask],
                                    sigs["strategy"][mask], sigs["side"][mask], sigs["price"][mask],
                                    sigs["target"][mask], sigs["stop"][mask], sigs["model"][mask], sigs["x"][mask])
        got += [(int(out.row[i]), int(out.signal_ts_ms[i]), int(out.strategy[i]), int(out.horizon[i]),
                 int(out.side[i]), int(out.hit[i]), int(out.exit[i]), float(out.realised_return[i]))
                for i in range(len(out))]
    return got


@pytest.mark.parametrize("seed", range(5))
def test_outcomes_and_performance_match_a_plain_recomputation(seed: int) -> None:
    bars, sigs = make_stream(seed, 1_500, 3, p_signal=0.03)
    tracker = OutcomeTracker(3, HORIZONS, max_pending=64)
    cuts = list(np.random.default_rng(seed + 100).integers(0, 1_500, 40))
    got = run(tracker, bars, sigs, cuts)
    want, cells, overflow = reference(bars, sigs, 64)
    assert sorted(got) == sorted(want)
    assert len(want) > 300 and overflow == [0, 0, 0]
    assert {o[6] for o in want} == {EXIT_HORIZON, EXIT_TARGET, EXIT_STOP}
    perf = tracker.performance()
    for r in range(3):
        for s in range(N_STRATEGIES):
            for h in range(len(HORIZONS)):
                rets = np.array([ret for _, ret in cells.get((r, s, h), [])])
                assert perf["count"][r, s, h] == len(rets)
                if len(rets) == 0:
                    assert math.isnan(perf["hit_rate"][r, s, h])
                    continue
                gains, losses = rets[rets > 0].sum(), -rets[rets <= 0].sum()
                curve = np.concatenate([[0.0], np.cumsum(rets)])
                max_dd = float((np.maximum.accumulate(curve) - curve).max())
                assert perf["hit_rate"][r, s, h] == pytest.approx((rets > 0).mean())
                assert perf["avg_return"][r, s, h] == pytest.approx(rets.mean(), abs=1e-15)
                assert perf["profit_factor"][r, s, h] == pytest.approx(gains / losses if losses > 0 else math.inf)
                assert perf["max_drawdown"][r, s, h] == pytest.approx(max_dd, abs=1e-12)
                assert perf["cum_return"][r, s, h] == pytest.approx(rets.sum(), abs=1e-12)
                if len(rets) >= 2:
                    assert perf["sharpe"][r, s, h] == pytest.approx(rets.mean() / rets.std(ddof=1), rel=1e-9)


def test_full_slots_are_counted_not_silently_dropped() -> None:
    bars, sigs = make_stream(9, 800, 2, p_signal=0.08)
    tracker = OutcomeTracker(2, HORIZONS, max_pending=3)
    got = run(tracker, bars, sigs, [100, 333, 500])
    want, _, overflow = reference(bars, sigs, 3)
    assert sorted(got) == sorted(want)
    assert [tracker.overflow(r) for r in range(2)] == overflow and sum(overflow) > 10


def test_a_buy_touching_both_levels_in_one_bar_counts_the_stop() -> None:
    tracker = OutcomeTracker(1, (1, 3))
    x = np.zeros((1, M))
    one = np.ones(1)
    tracker.process_batch(np.zeros(1, np.int64), np.array([0]), one * 101, one * 99, one * 100,
                          np.array([0]), np.array([0]), np.array([2]), np.array([1]), one * 100, one * 102,
                          one * 98, np.array([2]), x)
    out = tracker.process_batch(np.zeros(3, np.int64), np.array([1, 2, 3]), np.array([103.0, 110, 110]),
                                np.array([97.0, 90, 90]), np.array([100.0, 120, 80]), *[np.zeros(0, np.int64)] * 3,
                                np.zeros(0, np.int64), np.zeros(0), np.zeros(0), np.zeros(0), np.zeros(0, np.int64),
                                np.zeros((0, M)))
    assert out.exit.tolist() == [EXIT_STOP, EXIT_STOP]
    assert out.realised_return.tolist() == pytest.approx([-0.02, -0.02])
    assert out.hit.tolist() == [0, 0] and out.resolved_ts_ms.tolist() == [1, 3] and out.model.tolist() == [2, 2]


def test_a_sell_that_reaches_its_target_is_a_hit() -> None:
    tracker = OutcomeTracker(1, (2,))
    one = np.ones(1)
    tracker.process_batch(np.zeros(1, np.int64), np.array([0]), one * 100, one * 100, one * 100, np.array([0]),
                          np.array([7]), np.array([0]), np.array([-1]), one * 100, one * 95, one * 103,
                          np.array([0]), np.zeros((1, M)))
    empty_i, empty_f = np.zeros(0, np.int64), np.zeros(0)
    out = tracker.process_batch(np.zeros(2, np.int64), np.array([1, 2]), np.array([101.0, 100]), np.array([94.0, 99]),
                                np.array([96.0, 99.5]), empty_i, empty_i, empty_i, empty_i, empty_f, empty_f,
                                empty_f, empty_i, np.zeros((0, M)))
    assert out.exit.tolist() == [EXIT_TARGET] and out.hit.tolist() == [1]
    assert out.realised_return[0] == pytest.approx(0.05) and out.signal_ts_ms.tolist() == [7]


def test_signals_out_of_bar_order_are_refused() -> None:
    tracker = OutcomeTracker(1, (1,))
    two = np.ones(2)
    with pytest.raises(ValueError, match="ordered"):
        tracker.process_batch(np.zeros(2, np.int64), np.array([0, 1]), two, two, two, np.array([1, 0]),
                              np.zeros(2, np.int64), np.zeros(2, np.int64), np.ones(2, np.int64), two, two * 2,
                              two * 0.5, np.zeros(2, np.int64), np.zeros((2, M)))
    with pytest.raises(ValueError):
        OutcomeTracker(1, (5, 3))


def test_the_stages_chain_on_one_tick_batch_at_a_time() -> None:
    """bars -> bank -> rules -> confidence -> outcomes -> learning, batch by batch, as the
    market agent will run them; the model learns from every outcome at the training horizon."""
    from indicators.bank import IndicatorBank
    from indicators.bars import BarAggregator
    from indicators.confidence import STEPS, ConfidenceModel
    from indicators.signals import FeatureMap, SignalRules
    from ops.feeds.simulator import SimConfig, Simulator

    symbols = ("A", "B", "C")
    sim = Simulator(SimConfig(symbols=symbols, ticks_per_s=300, seed=11), start_ms=1_700_000_000_000)
    bars, bank = BarAggregator(3, (1_000,)), IndicatorBank(n_symbols=3)
    features, rules = FeatureMap(bank.output_names), SignalRules(n_rows=3)
    model, tracker = ConfidenceModel(n_models=N_STRATEGIES), OutcomeTracker(3, (5, 15))
    n_signals = n_trained = 0
    for _ in range(120):  # 120 tick batches of 1 s each
        ticks = [sim.step() for _ in range(100)]
        sym, ts, price, size = (np.concatenate(col) for col in zip(*ticks))
        closed = bars.process_batch(sym, ts, price, size)
        o = closed.ohlcv
        values = bank.update(closed.sym, o[:, 0], o[:, 1], o[:, 2], o[:, 3], o[:, 4])
        fired = rules.process_batch(closed.sym, features.build(values, o[:, 1], o[:, 2], o[:, 3]))
        confidence = model.score(fired.strategy, fired.x)
        assert ((confidence >= 0) & (confidence <= 1)).all()
        outcomes = tracker.process_batch(closed.sym, closed.open_ts_ms, o[:, 1], o[:, 2], o[:, 3], fired.bar,
                                         closed.open_ts_ms[fired.bar], fired.strategy, fired.side, fired.price,
                                         fired.price_target, fired.stop_loss, fired.strategy, fired.x)
        train = outcomes.horizon == 0
        model.learn(outcomes.model[train], outcomes.x[train], outcomes.hit[train])
        n_signals += len(fired)
        n_trained += int(train.sum())
    assert n_signals > 10 and n_trained > 5
    assert model.state[:, STEPS].sum() == n_trained
