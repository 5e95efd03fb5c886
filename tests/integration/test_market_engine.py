"""The market engine in process (no servers): its one fused Numba call equals the documented
chain of the separate kernels, its state survives release/reload and a fresh engine on the
same store, quiet symbols' bars close by watermark, and redelivered batches change nothing."""

from __future__ import annotations

import math
from typing import Any

import msgspec
import numpy as np

from agents.market import DictStore, EngineConfig, MarketEngine, apply_group
from indicators.bank import IndicatorBank
from indicators.bars import BarAggregator
from indicators.confidence import ConfidenceModel
from indicators.outcomes import EXITS, OutcomeTracker
from indicators.signals import N_STRATEGIES, STRATEGIES, FeatureMap, SignalRules
from streams.market import INTERVALS_MS, TickBatch, interval_name, tick_batch
from tables.market import MAX_HOT_SYMBOLS
from tests.integration.test_market_support import simulate

SYMBOLS = ("AAPL", "BTCUSD", "ETHUSD", "EURUSD", "MSFT", "NVDA")
N_PARTITIONS = 4
INTERVALS = tuple(INTERVALS_MS.values())
NO_FLUSH = EngineConfig(allowed_lateness_ms=10**12)


def _run(engine: MarketEngine, batches: list[TickBatch]) -> list[Any]:
    return [engine.process(b.partition, b.source, b.seq, b.columns()) for b in batches]


def _chain(batches: list[TickBatch]) -> tuple[dict[tuple[Any, ...], tuple[Any, ...]], dict[tuple[Any, ...], Any]]:
    """docs/MARKET.md's chain, one wrapper call per stage, with the engine's row scheme:
    stream = symbol row x intervals + interval, model row = partition x strategies + strategy."""
    rows = {s: i for i, s in enumerate(SYMBOLS)}
    n_int = len(INTERVALS)
    bars = BarAggregator(len(SYMBOLS), INTERVALS)
    bank = IndicatorBank(n_symbols=len(SYMBOLS) * n_int)
    features, rules = FeatureMap(bank.output_names), SignalRules(n_rows=len(SYMBOLS) * n_int)
    model = ConfidenceModel(n_models=N_PARTITIONS * N_STRATEGIES)
    tracker = OutcomeTracker(len(SYMBOLS) * n_int)
    signals: dict[tuple[Any, ...], tuple[Any, ...]] = {}
    outcomes: dict[tuple[Any, ...], Any] = {}
    for batch in batches:
        cols = batch.columns()
        sym = np.array([rows[s] for s in cols.symbols], dtype=np.int32)[cols.sym]
        closed = bars.process_batch(sym, cols.ts_ms, cols.price, cols.size)
        stream = closed.sym.astype(np.int64) * n_int + closed.interval
        o = closed.ohlcv
        values = bank.update(stream, o[:, 0], o[:, 1], o[:, 2], o[:, 3], o[:, 4])
        fired = rules.process_batch(stream, features.build(values, o[:, 1], o[:, 2], o[:, 3]))
        base = batch.partition * N_STRATEGIES
        confidence = model.score(base + fired.strategy, fired.x)
        for q in range(len(fired)):
            bar = int(fired.bar[q])
            st = int(stream[bar])
            key = (SYMBOLS[st // n_int], interval_name(INTERVALS[st % n_int]), int(closed.open_ts_ms[bar]),
                   STRATEGIES[int(fired.strategy[q])])
            signals[key] = ("buy" if fired.side[q] > 0 else "sell", float(fired.price[q]),
                            float(fired.price_target[q]), float(fired.stop_loss[q]), float(confidence[q]),
                            {n: v for n, v in zip(bank.output_names, values[bar].tolist(), strict=True)
                             if math.isfinite(v)})
        out = tracker.process_batch(stream, closed.open_ts_ms, o[:, 1], o[:, 2], o[:, 3], fired.bar,
                                    closed.open_ts_ms[fired.bar], fired.strategy, fired.side, fired.price,
                                    fired.price_target, fired.stop_loss, fired.strategy, fired.x)
        for j in range(len(out)):
            st = int(out.row[j])
            key = (SYMBOLS[st // n_int], interval_name(INTERVALS[st % n_int]), int(out.signal_ts_ms[j]),
                   STRATEGIES[int(out.strategy[j])], int(tracker.horizons[out.horizon[j]]))
            outcomes[key] = (float(out.realised_return[j]), bool(out.hit[j]), EXITS[int(out.exit[j])])
        train = out.horizon == 0
        model.learn(base + out.model[train], out.x[train], out.hit[train])
    return signals, outcomes


def test_the_fused_kernel_equals_the_chain_of_separate_kernels() -> None:
    ticks = simulate(SYMBOLS, seconds=150, rate=300, seed=7, n_partitions=N_PARTITIONS)
    results = _run(MarketEngine(DictStore(N_PARTITIONS), NO_FLUSH), ticks.batches)
    want_signals, want_outcomes = _chain(ticks.batches)
    got_signals = {(s.symbol, s.interval, s.signal_ts_ms - INTERVALS_MS[s.interval], s.strategy):
                   (s.action, s.price, s.price_target, s.stop_loss, s.confidence, s.indicators)
                   for r in results for s in r.signals}
    got_outcomes = {_outcome_key(o): (o.realised_return, o.hit, o.exit) for r in results for o in r.outcomes}
    assert len(want_signals) > 20 and len(want_outcomes) > 20
    assert got_signals == want_signals  # bit for bit, confidences included
    assert got_outcomes == want_outcomes


def _outcome_key(o: Any) -> tuple[Any, ...]:
    symbol, interval, open_ts, strategy = o.signal_id.rsplit(":", 3)
    return symbol, interval, int(open_ts), strategy, o.horizon_bars


def test_release_reload_and_a_fresh_engine_continue_exactly() -> None:
    ticks = simulate(SYMBOLS, seconds=120, rate=300, seed=3, n_partitions=N_PARTITIONS)
    half = len(ticks.batches) // 2
    straight_store = DictStore(N_PARTITIONS)
    straight = _run(MarketEngine(straight_store), ticks.batches)

    store = DictStore(N_PARTITIONS)
    engine = MarketEngine(store)
    first = _run(engine, ticks.batches[:half])
    # Mid-bar symbols are restored from the partition rows' hot states, not their own rows.
    assert any(state.hot for state in store.partitions.values())
    engine.release(range(N_PARTITIONS))  # every partition revoked ...
    middle = _run(engine, ticks.batches[half:half + 50])  # ... and reassigned: reloaded from the store
    fresh = MarketEngine(store)  # a restart: nothing in memory
    rest = _run(fresh, ticks.batches[half + 50:])

    def events(results: list[Any]) -> list[Any]:
        return [msgspec.to_builtins(e) | {"id": "", "ts_ms": 0} for r in results for e in (*r.signals, *r.outcomes)]

    assert events(first + middle + rest) == events(straight)
    assert [u for r in first + middle + rest for u in r.fanout.updates] == \
        [u for r in straight for u in r.fanout.updates]
    assert store.symbols == straight_store.symbols and store.streams == straight_store.streams
    assert store.partitions == straight_store.partitions and store.last_signals.keys() == straight_store.last_signals.keys()


def test_a_quiet_symbols_bar_closes_when_the_partition_watermark_passes() -> None:
    engine = MarketEngine(DictStore(1), EngineConfig(intervals_ms=(1_000,), allowed_lateness_ms=2_000))

    def batch(seq: int, symbols: list[str], sym: list[int], ts: list[int]) -> Any:
        b = tick_batch(partition=0, source="t", seq=seq, symbols=symbols, sym=np.array(sym, np.int32),
                       ts_ms=np.array(ts, np.int64), price=np.full(len(ts), 10.0), size=np.ones(len(ts)))
        return engine.process(0, b.source, b.seq, b.columns())

    batch(0, ["QUIET", "BUSY"], [0, 1], [10_100, 10_200])
    closed = batch(1, ["BUSY"], [0, 0], [11_500, 12_900])  # BUSY's 10 s and 11 s bars close by its own ticks
    assert [(b.symbol, b.open_ts_ms) for batch_ in closed.bars for b in batch_.rows()] == [("BUSY", 10_000),
                                                                                          ("BUSY", 11_000)]
    # Event time passes 11 s + 2 s of lateness: QUIET's 10 s bar closes without a tick of its own.
    closed = batch(2, ["BUSY"], [0], [13_050])
    assert {(b.symbol, b.open_ts_ms) for batch_ in closed.bars for b in batch_.rows()} == {("QUIET", 10_000),
                                                                                          ("BUSY", 12_000)}
    late = batch(3, ["QUIET"], [0], [10_900])  # before the end of its flushed bar: late, dropped
    assert late.bars == [] and engine.bars.late_count(engine.row_of["QUIET"]) == 1


def test_a_redelivered_batch_changes_nothing() -> None:
    ticks = simulate(SYMBOLS, seconds=60, rate=300, seed=5, n_partitions=N_PARTITIONS)
    store = DictStore(N_PARTITIONS)
    engine = MarketEngine(store)
    _run(engine, ticks.batches)
    before = (dict(store.symbols), dict(store.streams), dict(store.partitions))
    again = _run(engine, ticks.batches[-30:])
    assert all(not r.bars and not r.signals and not r.fanout.updates and r.ticks == 0 for r in again)
    assert sum(r.skipped_ticks for r in again) == sum(b.count for b in ticks.batches[-30:])
    assert (store.symbols, store.streams, store.partitions) == before


def _one_tick_each(seq: int, symbols: list[str], ts_ms: int) -> TickBatch:
    n = len(symbols)
    return tick_batch(partition=0, source="t", seq=seq, symbols=symbols, sym=np.arange(n, dtype=np.int32),
                      ts_ms=np.full(n, ts_ms, np.int64), price=np.full(n, 10.0), size=np.ones(n))


def test_symbol_states_ride_in_the_partition_row_until_a_bar_closes_or_too_many_are_hot() -> None:
    store = DictStore(1)
    engine = MarketEngine(store, EngineConfig(intervals_ms=(1_000,)))
    _run(engine, [_one_tick_each(0, ["A", "B"], 10_100)])
    assert store.symbols == {} and sorted(store.partitions[0].hot) == ["A", "B"]
    _run(engine, [_one_tick_each(1, ["A"], 11_100)])  # A's 10 s bar closes: A gets its own row
    assert list(store.symbols) == ["A"] and list(store.partitions[0].hot) == ["B"]
    assert store.symbol_state("A").applied == {"t": 1} and store.symbol_state("B").applied == {"t": 0}  # type: ignore[union-attr]
    many = [f"S{i:03d}" for i in range(MAX_HOT_SYMBOLS)]
    _run(engine, [_one_tick_each(2, many, 11_200)])  # B and 64 more hot: every one is written out
    assert store.partitions[0].hot == {} and set(store.symbols) == {"A", "B", *many}
    fresh = MarketEngine(store, EngineConfig(intervals_ms=(1_000,)))
    again = _run(fresh, [_one_tick_each(3, ["A", "B"], 12_100)])
    assert {(b.symbol, b.open_ts_ms) for r in again for batch in r.bars for b in batch.rows()} == \
        {("A", 11_000), ("B", 10_000)}


def test_the_newer_of_a_symbols_row_and_its_hot_entry_wins_on_restore() -> None:
    """A symbol's own row was written but the partition row of that batch was lost (or the
    other way round): the version decides, so a stale copy never overwrites newer state."""
    config = EngineConfig(intervals_ms=(1_000,))
    batches = [_one_tick_each(0, ["A"], 10_100), _one_tick_each(1, ["A"], 11_100), _one_tick_each(2, ["A"], 12_100)]
    straight = _run(MarketEngine(DictStore(1), config), batches)
    store = DictStore(1)
    engine = MarketEngine(store, config)
    _run(engine, batches[:1])
    stale_partition = store.partitions[0]  # A is hot here, version 1
    _run(engine, batches[1:2])  # A's bar closed: its own row, version 2; the partition row without A
    store.partitions[0] = stale_partition  # ... had that partition row been lost
    assert store.symbol_state("A") == store.symbols["A"] and store.symbols["A"].version == 2
    rest = _run(MarketEngine(store, config), batches[2:])
    assert [b.rows() for r in rest for b in r.bars] == [b.rows() for r in straight[2:] for b in r.bars]


def _reloaded(store: DictStore) -> dict[str, Any]:
    """What a fresh engine on `store` holds for every symbol: its rows as restored."""
    engine = MarketEngine(store)
    for p in store.partitions:
        engine._partition(p)
    return {s: (engine.bars.state[r].tobytes(), engine.seq[r], dict(engine.applied[r]),
                [engine.bank.state[r * engine.n_int + k].tobytes() for k in range(engine.n_int)])
            for s, r in engine.row_of.items()}


def test_batches_applied_between_flushes_give_what_one_flush_per_batch_gives() -> None:
    batches = simulate(SYMBOLS, seconds=90, rate=300, seed=5, n_partitions=N_PARTITIONS).batches
    straight_store = DictStore(N_PARTITIONS)
    straight = _run(MarketEngine(straight_store), batches)
    store = DictStore(N_PARTITIONS)
    engine = MarketEngine(store)
    rng = np.random.default_rng(3)
    grouped = []
    for i, b in enumerate(batches):
        grouped.append(engine.apply(b.partition, b.source, b.seq, b.columns()))
        if rng.random() < 0.2 or i == len(batches) - 1:
            for p in range(N_PARTITIONS):
                engine.flush(p)
    def outputs(results: list[Any]) -> list[Any]:
        return [[msgspec.to_builtins(e) | {"id": "", "ts_ms": 0} for e in (*r.signals, *r.outcomes, *r.bars)]
                for r in results]

    assert outputs(grouped) == outputs(straight)
    assert store.streams == straight_store.streams
    assert {s: (last.count, last.signal.signal_id) for s, last in store.last_signals.items()} == \
        {s: (last.count, last.signal.signal_id) for s, last in straight_store.last_signals.items()}
    assert {p: s.models for p, s in store.partitions.items()} == \
        {p: s.models for p, s in straight_store.partitions.items()}
    assert _reloaded(store) == _reloaded(straight_store)


def test_a_refused_batch_is_set_aside_and_the_groups_other_batches_still_apply_once() -> None:
    batches = [b for b in simulate(SYMBOLS, seconds=30, rate=300, seed=9, n_partitions=N_PARTITIONS).batches
               if b.partition == 0]
    assert len(batches) > 6
    straight_store = DictStore(N_PARTITIONS)
    _run(MarketEngine(straight_store), batches[:3] + batches[4:6])
    store = DictStore(N_PARTITIONS)
    engine = MarketEngine(store)
    _run(engine, batches[:2])  # flushed before the group
    group = [(i, b, b.columns()) for i, b in enumerate(batches[2:6], start=2)]
    refuse = engine.apply

    def apply(partition: int, source: str, seq: int, cols: Any) -> Any:
        if seq == batches[3].seq:  # half-applies, then fails, as a kernel bound would
            refuse(partition, source, seq, cols)
            raise ValueError("more bars than the buffer holds")
        return refuse(partition, source, seq, cols)

    engine.apply = apply  # type: ignore[method-assign]
    results, failed = apply_group(engine, 0, group)
    engine.flush(0)
    assert [i for i, _ in failed] == [3] and len(results) == 3
    assert _reloaded(store) == _reloaded(straight_store)
