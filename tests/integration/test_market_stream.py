"""The market agents on the real broker, PostgreSQL and Redis: worker child processes
(as `fintide worker` runs them) against the reference: one in-process engine fed the same
tick batches without interruption. Everything they emit and store must be identical."""

from __future__ import annotations

import base64
from typing import Any

import asyncpg
import msgspec
import numpy as np
import pytest
from redis.asyncio import Redis

from agents.market import DictStore
from ops.settings import Settings
from services import market as live
from streams.codec import encode
from streams.market import (
    BARS,
    SIGNALS,
    TICKS,
    Signal,
    SignalOutcome,
    partition_for_symbol,
    tick_batch,
)
from tables.market import STREAM_TABLES, partition_anchor_key
from tests.helpers.workers import get_json, metric, wait_for
from tests.integration.test_market_support import (
    MarketWorker,
    Ticks,
    owned_partitions,
    publish,
    read_topic,
    reference,
    simulate,
    start_worker,
    without_header,
)

SYMBOLS = ("AAPL", "BTCUSD", "ETHUSD", "EURUSD", "MSFT", "NVDA")
WAIT_S = 90.0


def _ticks(settings: Settings, seconds: float) -> Ticks:
    return simulate(SYMBOLS, seconds=seconds, rate=300, seed=7, n_partitions=settings.topic_partitions)


async def processed(worker: MarketWorker, ticks: Ticks, n_batches: int) -> bool:
    """Every symbol's state says it applied its last batch among the first n_batches."""
    for symbol, seq in ticks.last_seq_after(n_batches).items():
        state = await get_json(f"{worker.url}/market/symbols/{symbol}")
        if not state or state["applied"].get(ticks.source) != seq:
            return False
    return True


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


async def assert_tables_equal(worker: MarketWorker, store: DictStore) -> None:
    """Every market table, read through the routed views, holds the reference's state.

    Streams, last signals, models and watermarks byte-exact. A symbol's state is checked
    as the worker would reload it (its own row or the partition row's newer copy): how
    often the worker checkpoints (once per take of messages, not per message) decides which
    of the two holds it and their version counters, not the state."""
    n = worker.settings.topic_partitions
    hot: dict[str, Any] = {}
    for partition, state in store.partitions.items():
        got = await get_json(f"{worker.url}/table/market.partitions/{partition_anchor_key(partition, n)}/")
        assert (got["max_event_ms"], got["models"]) == (state.max_event_ms, _b64(state.models)), partition
        hot.update(got["hot"])
    ref_hot = {symbol: s for p in store.partitions.values() for symbol, s in p.hot.items()}
    for symbol, state in store.symbols.items():
        own = await get_json(f"{worker.url}/table/market.symbols/{symbol}/")
        ref_own, ref_copy = msgspec.to_builtins(state), msgspec.to_builtins(ref_hot.get(symbol))
        assert _effective(own, hot.get(symbol)) == _effective(ref_own, ref_copy), symbol
    for (interval, symbol), stream in store.streams.items():
        got = await get_json(f"{worker.url}/table/{STREAM_TABLES[interval]}/{symbol}/")
        assert got == msgspec.to_builtins(stream), (interval, symbol)
    for symbol, last in store.last_signals.items():
        got = await get_json(f"{worker.url}/table/market.last_signal/{symbol}/")
        assert without_header(got["signal"]) == without_header(last.signal) and got["count"] == last.count


def _effective(row: dict[str, Any] | None, hot: dict[str, Any] | None) -> dict[str, Any]:
    """tables.market.latest_symbol on rendered rows, without the checkpoint bookkeeping."""
    state = row if hot is None or (row is not None and row["version"] > hot["version"]) else hot
    assert state is not None
    return {k: v for k, v in state.items() if k not in ("version", "partition_max_ms")}


def _sorted(events: list[Any]) -> list[dict[str, Any]]:
    return sorted((without_header(e) for e in events), key=lambda d: msgspec.json.encode(d))


async def test_worker_emits_stores_and_serves_what_the_reference_computes(settings: Settings) -> None:
    ticks = _ticks(settings, 150)
    # After the run, its last 40 batches again (an at-least-once replay), then a new symbol
    # whose batches mark the end (they are processed after the replays).
    replayed = ticks.batches[-40:]
    marker = simulate(("ZZMARK",), seconds=2, rate=50, seed=1, n_partitions=settings.topic_partitions)
    ref = reference([*ticks.batches, *replayed, *marker.batches], settings.topic_partitions)
    assert len(ref.signals) > 20 and len(ref.outcomes) > 20  # the run exercises every stage
    assert not any(r.signals or r.outcomes or r.bars for r in ref.results[len(ticks.batches):][:len(replayed)])
    worker = await start_worker(settings)
    try:
        await publish(settings, ticks.batches)
        await wait_for(lambda: processed(worker, ticks, len(ticks.batches)), WAIT_S, "every batch")
        # Every tick message's wait in front of the agent is measured (ops read it in Grafana).
        assert await metric(worker, "fintide_market_consume_lag_seconds_count", {}) >= len(ticks.batches)
        await _check_redelivery_is_a_no_op(worker, ticks, replayed, marker, settings)
        await assert_tables_equal(worker, ref.store)
        # Signals and outcomes on market.signals, bars on market.bars: exactly the reference's.
        emitted = await read_topic(settings, SIGNALS, want=len(ref.signals) + len(ref.outcomes))
        assert _sorted([e for e in emitted if isinstance(e, Signal)]) == _sorted(ref.signals)
        assert _sorted([e for e in emitted if isinstance(e, SignalOutcome)]) == _sorted(ref.outcomes)
        bar_batches = await read_topic(settings, BARS, want=sum(len(r.bars) for r in ref.results))
        assert _sorted(bar_batches) == _sorted([b for r in ref.results for b in r.bars])
        await _check_views(worker, ref, settings)
        await _check_dead_letters(worker, settings)
        await _check_postgres(settings, ref)
        await _check_redis(settings, ref)
    finally:
        worker.stop()


async def _check_views(worker: MarketWorker, ref: Any, settings: Settings) -> None:
    symbol = ref.signals[-1].symbol
    view = await get_json(f"{worker.url}/market/symbols/{symbol}")
    assert view["symbol"] == symbol and view["ticks_accepted"] > 0 and "1s" in view["open_bars"]
    stream = await get_json(f"{worker.url}/market/streams/1s/{symbol}")
    assert stream["initialized"] and stream["bars_seen"] >= stream["warmup_bars"]
    assert set(stream["values"]) >= {"rsi", "macd", "adx", "vwap"} and stream["performance"]
    last = await get_json(f"{worker.url}/market/last_signal/{symbol}")
    assert last["signal"]["signal_id"] == [s for s in ref.signals if s.symbol == symbol][-1].signal_id
    for p in range(settings.topic_partitions):
        part = await get_json(f"{worker.url}/market/partitions/{p}")
        if p not in ref.store.partitions:  # no symbol of this run hashes to p
            assert part is None
            continue
        assert part["partition"] == p and part["max_event_ms"] == ref.store.partitions[p].max_event_ms
        assert set(part["models"]) == {"trend_ema", "trend_macd", "rsi_reversion", "bb_reversion", "breakout"}
    assert await get_json(f"{worker.url}/market/partitions/{settings.topic_partitions}") is None
    assert await get_json(f"{worker.url}/market/symbols/NOPE") is None


async def _check_redelivery_is_a_no_op(worker: MarketWorker, ticks: Ticks, replayed: list[Any], marker: Ticks,
                                       settings: Settings) -> None:
    """Batches delivered twice (an at-least-once replay) change nothing and emit nothing."""
    key = f"{worker.url}/market/symbols/{ticks.batches[-1].symbols[0]}"
    before = await get_json(key)
    signals_before = await read_topic(settings, SIGNALS, quiet_s=1.0)
    await publish(settings, replayed)
    await publish(settings, marker.batches)
    await wait_for(lambda: processed(worker, marker, len(marker.batches)), WAIT_S, "the marker batches")
    assert await get_json(key) == before
    assert len(await read_topic(settings, SIGNALS, quiet_s=1.0)) == len(signals_before)


async def _check_dead_letters(worker: MarketWorker, settings: Settings) -> None:
    n = settings.topic_partitions
    home = next(s for s in ("X", "Y", "Z", "W") if partition_for_symbol(s, n) == 0)
    stranger = next(s for s in ("X", "Y", "Z", "W") if partition_for_symbol(s, n) != 0)
    good = tick_batch(partition=0, source="bad", seq=0, symbols=[home], sym=np.zeros(2, np.int32),
                      ts_ms=np.array([1, 2]), price=np.array([1.0, 2.0]), size=np.ones(2))
    short = msgspec.structs.replace(good, count=3)  # columns hold 2 ticks
    wrong_partition = msgspec.structs.replace(good, partition=(good.partition + 1) % n)
    misplaced = msgspec.structs.replace(good, symbols=[stranger])  # hashes to another partition
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap)
    await producer.start()
    try:
        topic = settings.topic_prefix + TICKS.name
        for value in (b"{not json", encode(short), encode(wrong_partition), encode(misplaced)):
            await producer.send_and_wait(topic, value, key=b"X", partition=0)
    finally:
        await producer.stop()
    letters = await read_topic(settings, TICKS, want=4, dead_letters=True)
    errors = sorted(letter.error.split(":")[0] for letter in letters)
    assert errors == ["DecodeError", "MalformedBatch", "MalformedBatch", "MalformedBatch"], errors
    assert any("do not belong to partition 0" in letter.error for letter in letters)
    assert await owned_partitions(worker)  # still running


async def _check_postgres(settings: Settings, ref: Any) -> None:
    conn = await asyncpg.connect(settings.database_url)
    try:
        async def counts() -> tuple[int, int] | None:
            n_sig = await conn.fetchval("SELECT count(*) FROM market.signals")
            n_out = await conn.fetchval("SELECT count(*) FROM market.signal_outcomes")
            return (n_sig, n_out) if (n_sig, n_out) == (len(ref.signals), len(ref.outcomes)) else None

        await wait_for(counts, WAIT_S, "signals and outcomes in PostgreSQL")
        row = await conn.fetchrow("SELECT * FROM market.signals WHERE signal_id = $1", ref.signals[0].signal_id)
        assert row["confidence"] == ref.signals[0].confidence and row["price"] == ref.signals[0].price
        minute_bars = [b for r in ref.results for batch in r.bars for b in batch.rows() if b.interval != "1s"]
        n_bars = await conn.fetchval("SELECT count(*) FROM market.bars")
        assert n_bars == len(minute_bars) > 0
        symbols = await conn.fetch("SELECT symbol FROM market.instruments ORDER BY symbol")
        assert [r["symbol"] for r in symbols] == sorted({*SYMBOLS, "ZZMARK"})
    finally:
        await conn.close()


async def _check_redis(settings: Settings, ref: Any) -> None:
    redis = Redis.from_url(settings.redis_url)
    try:
        last = ref.signals[-1]
        snap = await live.snapshot(redis, last.symbol)
        assert snap.signal is not None
        assert snap.signal.signal_id == [s for s in ref.signals if s.symbol == last.symbol][-1].signal_id
        assert snap.seq == ref.store.symbol_state(last.symbol).seq  # type: ignore[union-attr]
        assert snap.bars["1s"] and snap.indicators["1s"].initialized
        assert await live.cached_symbols(redis, [*SYMBOLS, "NOPE"]) == set(SYMBOLS)
    finally:
        await redis.aclose()


@pytest.mark.timeout(240)
async def test_rebalance_and_restart_continue_exactly_like_an_uninterrupted_run(settings: Settings) -> None:
    ticks = _ticks(settings, 120)
    ref = reference(ticks.batches, settings.topic_partitions)
    thirds = [len(ticks.batches) // 3, 2 * len(ticks.batches) // 3, len(ticks.batches)]
    one = await start_worker(msgspec.structs.replace(settings, worker_id="worker-1"))
    two = await start_worker(msgspec.structs.replace(settings, worker_id="worker-2"), wait_for_partitions=False)
    try:
        # Both hold partitions: the group has rebalanced onto two workers.
        await wait_for(lambda: _split(one, two, settings), 60, "partitions split over two workers")
        await publish(settings, ticks.batches[:thirds[0]])
        await wait_for(lambda: processed(one, ticks, thirds[0]), WAIT_S, "phase 1")
        two.stop()  # worker-1 takes over worker-2's partitions, restoring them from changelogs
        await wait_for(lambda: _owns_all(one, settings), 60, "worker-1 owning every partition")
        await publish(settings, ticks.batches[thirds[0]:thirds[1]])
        await wait_for(lambda: processed(one, ticks, thirds[1]), WAIT_S, "phase 2")
        one.stop()  # restart: the same worker id and data dir (its RocksDB files) comes back
        one = await start_worker(msgspec.structs.replace(settings, worker_id="worker-1"))
        await publish(settings, ticks.batches[thirds[1]:])
        await wait_for(lambda: processed(one, ticks, thirds[2]), WAIT_S, "phase 3")
        await assert_tables_equal(one, ref.store)
        emitted = await read_topic(settings, SIGNALS, want=len(ref.signals) + len(ref.outcomes))
        assert _sorted([e for e in emitted if isinstance(e, Signal)]) == _sorted(ref.signals)
        assert _sorted([e for e in emitted if isinstance(e, SignalOutcome)]) == _sorted(ref.outcomes)
        bar_batches = await read_topic(settings, BARS, want=sum(len(r.bars) for r in ref.results))
        assert _sorted(bar_batches) == _sorted([b for r in ref.results for b in r.bars])
    finally:
        one.stop()
        two.stop()


async def _split(one: MarketWorker, two: MarketWorker, settings: Settings) -> bool:
    a, b = await owned_partitions(one), await owned_partitions(two)
    return bool(a and b and sorted(a + b) == list(range(settings.topic_partitions)))


async def _owns_all(worker: MarketWorker, settings: Settings) -> bool:
    return await owned_partitions(worker) == list(range(settings.topic_partitions))
