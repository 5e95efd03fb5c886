"""Columnar tick batches: codec round trip, malformed batches, partition grouping, batcher."""

from __future__ import annotations

from collections.abc import Callable

import msgspec
import numpy as np
import pytest
from aiokafka.partitioner import DefaultPartitioner

from ops.feeds.pipeline import TickBatcher, TickChunk
from streams.codec import encode
from streams.market import (BARS, MAX_BATCH_TICKS, SIGNALS, TICKS, BatchFailure, MalformedBatch, Signal,
                            SignalOutcome, TickBatch, bar_batch, encode_ticks, partition_for_symbol, tick_batch)


def sample(n: int = 1_000, n_symbols: int = 7, seed: int = 0) -> TickBatch:
    rng = np.random.default_rng(seed)
    return tick_batch(partition=2, source="test", seq=9, symbols=[f"S{i}" for i in range(n_symbols)],
                      sym=rng.integers(0, n_symbols, n).astype(np.int32),
                      ts_ms=1_700_000_000_000 + np.arange(n, dtype=np.int64),
                      price=rng.uniform(1, 1e5, n), size=rng.uniform(0, 10, n))


@pytest.mark.parametrize("wire", [encode_ticks, encode], ids=["msgpack", "json"])
def test_round_trip_is_exact_and_decodes_to_aligned_arrays(wire: Callable[[TickBatch], bytes]) -> None:
    batch = sample()
    decoded = TICKS.decode(wire(batch))
    assert isinstance(decoded, TickBatch) and decoded.id == batch.id and decoded.version == 1
    cols = decoded.columns()
    want = batch.columns()
    assert cols.symbols == want.symbols and len(cols) == 1_000
    for name in ("sym", "ts_ms", "price", "size"):
        got, expected = getattr(cols, name), getattr(want, name)
        assert got.dtype == expected.dtype and np.array_equal(got, expected)
        assert got.flags.aligned and got.dtype.isnative
    assert cols.sym.dtype == np.int32 and cols.ts_ms.dtype == np.int64
    assert decoded.key == "S0"


def test_an_empty_batch_is_valid() -> None:
    batch = tick_batch(partition=0, source="t", seq=0, symbols=[], sym=np.zeros(0, np.int32),
                       ts_ms=np.zeros(0, np.int64), price=np.zeros(0), size=np.zeros(0))
    assert len(TICKS.decode(encode(batch)).columns()) == 0


def test_msgpack_carries_the_columns_as_binary_and_bad_msgpack_is_a_decode_failure() -> None:
    batch = sample()
    packed = encode_ticks(batch)
    assert len(packed) < 0.8 * len(encode(batch))  # no base64 text
    raw = msgspec.msgpack.decode(packed)
    raw["count"] = 5  # decodes, but the columns no longer match it: refused like a JSON batch
    with pytest.raises(MalformedBatch):
        TICKS.decode(msgspec.msgpack.encode(raw)).columns()
    for bad in (packed[:-3], b"\x93\x01\x02\x03", msgspec.msgpack.encode({**raw, "type": "market.bar_batch"})):
        with pytest.raises(BatchFailure):
            TICKS.decode(bad)


def _tamper(batch: TickBatch, **changes: object) -> bytes:
    raw = msgspec.json.decode(encode(batch))
    raw.update(changes)
    return msgspec.json.encode(raw)


@pytest.mark.parametrize("changes, message", [
    ({"count": 999}, "column 'sym' has 4000 bytes, expected 999"),
    ({"count": MAX_BATCH_TICKS + 1}, "outside"),
    ({"count": -1}, "outside"),
    ({"symbols": ["S0", "S1"]}, "symbol ids span"),
    ({"symbols": []}, "needs a symbol table"),
    ({"symbols": ["x" * 65] * 7}, "1..64 characters"),
])
def test_malformed_batches_raise_a_clear_error(changes: dict[str, object], message: str) -> None:
    decoded = TICKS.decode(_tamper(sample(), **changes))
    with pytest.raises(MalformedBatch, match=message):
        decoded.columns()


def test_a_truncated_column_is_malformed() -> None:
    batch = sample(10)
    short = msgspec.structs.replace(batch, price=batch.price[:-3])
    with pytest.raises(MalformedBatch, match="'price' has 77 bytes"):
        TICKS.decode(encode(short)).columns()


@pytest.mark.parametrize("bad_price", [np.nan, np.inf, 0.0, -1.0])
def test_prices_must_be_finite_and_positive(bad_price: float) -> None:
    batch = sample(5)
    price = np.frombuffer(batch.price, "<f8").copy()
    price[3] = bad_price
    with pytest.raises(MalformedBatch, match="price"):
        TICKS.decode(encode(msgspec.structs.replace(batch, price=price.tobytes()))).columns()


def test_sizes_must_be_finite_and_not_negative() -> None:
    batch = sample(5)
    size = np.frombuffer(batch.size, "<f8").copy()
    size[0] = -0.5
    with pytest.raises(MalformedBatch, match="size"):
        TICKS.decode(encode(msgspec.structs.replace(batch, size=size.tobytes()))).columns()


@pytest.mark.parametrize("raw", [
    b"not json", b'{"type":"market.tick_batch"}', b'{"type":"market.other","version":1}',
    b'{"type":"market.tick_batch","version":7,"id":"x","ts_ms":1,"partition":0,"source":"s","seq":0,'
    b'"count":0,"symbols":[],"sym":"","time_ms":"","price":"","size":""}',
    b'{"type":"market.tick_batch","version":1,"id":"x","ts_ms":1,"partition":0,"source":"s","seq":0,'
    b'"count":0,"symbols":[],"sym":"!!!","time_ms":"","price":"","size":""}',
])
def test_undecodable_messages_raise_errors_the_dead_letter_path_catches(raw: bytes) -> None:
    with pytest.raises(BatchFailure):
        TICKS.decode(raw).columns()


def test_partition_for_symbol_is_kafkas_default_partitioner() -> None:
    partitioner = DefaultPartitioner()
    for n in (1, 3, 4, 12):
        for symbol in ("BTCUSD", "ETHUSD", "AAPL", "MSFT", "EURUSD", "x", "ÄÖ€"):
            assert partition_for_symbol(symbol, n) == partitioner(symbol.encode(), list(range(n)), list(range(n)))


def test_bar_batches_round_trip_and_rows() -> None:
    ohlcv = np.array([[1.0, 2.0, 0.5, 1.5, 10.0], [2.0, 2.5, 1.5, 2.0, 3.0]])
    batch = bar_batch(partition=1, symbols=["A", "B"], sym=np.array([1, 0]), interval_ms=np.array([1_000, 60_000]),
                      open_ts_ms=np.array([5_000, 0]), ohlcv=ohlcv, n_ticks=np.array([4, 9]))
    decoded = BARS.decode(encode(batch))
    rows = decoded.rows()
    assert [(r.symbol, r.interval, r.open_ts_ms, r.close, r.n_ticks) for r in rows] == \
        [("B", "1s", 5_000, 1.5, 4), ("A", "1m", 0, 2.0, 9)]
    with pytest.raises(MalformedBatch):
        BARS.decode(_tamper(batch, count=3)).columns()


def test_signals_and_outcomes_share_a_topic_keyed_by_symbol() -> None:
    signal = Signal(signal_id="AAPL:1s:1000:trend_ema", symbol="AAPL", interval="1s", signal_ts_ms=2_000,
                    action="buy", price=10.0, price_target=11.0, stop_loss=9.5, confidence=0.5,
                    strategy="trend_ema", indicators={"rsi": 55.0})
    outcome = SignalOutcome(signal_id=signal.signal_id, symbol="AAPL", interval="1s", strategy="trend_ema",
                            action="buy", horizon_bars=5, realised_return=0.01, hit=True, exit="target",
                            resolved_ts_ms=7_000)
    assert SIGNALS.decode(encode(signal)) == signal
    assert SIGNALS.decode(encode(outcome)) == outcome
    assert SIGNALS.message_key(None, signal) == b"AAPL"


# -- the feed's batcher --------------------------------------------------------------------

def chunk(batcher: TickBatcher, names: list[str], t0: int = 0) -> TickChunk:
    n = len(names)
    return TickChunk(np.array([batcher.symbol_id(s) for s in names], np.int32), t0 + np.arange(n, dtype=np.int64),
                     np.arange(1, n + 1, dtype=np.float64), np.ones(n))


def test_batcher_groups_by_partition_and_keeps_order_within_a_symbol() -> None:
    batcher = TickBatcher(4, max_ticks=1_000, max_age_ms=50)
    names = [f"SYM{i % 13}" for i in range(500)]
    batcher.add(chunk(batcher, names), at_ms=0)
    batcher.close_all()
    seen: dict[str, list[int]] = {}
    for batch in batcher.ready:
        cols = batch.columns()
        assert {partition_for_symbol(s, 4) for s in cols.symbols} == {batch.partition}
        assert batch.key in cols.symbols
        assert sorted(set(cols.sym.tolist())) == list(range(len(cols.symbols)))  # table holds used symbols only
        for i in range(len(cols)):
            seen.setdefault(cols.symbols[cols.sym[i]], []).append(int(cols.ts_ms[i]))
    assert sum(len(v) for v in seen.values()) == 500
    for name, times in seen.items():
        assert times == [i for i in range(500) if names[i] == name]


def test_batch_closes_at_n_ticks_with_increasing_seq() -> None:
    batcher = TickBatcher(1, max_ticks=100, max_age_ms=1e9)
    batcher.add(chunk(batcher, ["A"] * 250), at_ms=0)
    assert [b.count for b in batcher.ready] == [100, 100]
    batcher.close_all()
    assert [b.count for b in batcher.ready] == [100, 100, 50]
    assert [b.seq for b in batcher.ready] == [0, 1, 2]
    assert len({b.source for b in batcher.ready}) == 1
    ts = np.concatenate([b.columns().ts_ms for b in batcher.ready])
    assert ts.tolist() == list(range(250))


def test_batch_closes_when_its_oldest_tick_is_max_age_old() -> None:
    batcher = TickBatcher(1, max_ticks=100, max_age_ms=50)
    batcher.add(chunk(batcher, ["A"] * 3), at_ms=1_000)
    batcher.add(chunk(batcher, ["A"] * 2), at_ms=1_040)
    batcher.close_due(1_049.9)
    assert not batcher.ready
    batcher.close_due(1_050)
    assert [b.count for b in batcher.ready] == [5]
    batcher.close_due(5_000)  # nothing open: nothing closes
    assert len(batcher.ready) == 1


def test_batcher_bounds() -> None:
    with pytest.raises(ValueError):
        TickBatcher(1, max_ticks=MAX_BATCH_TICKS + 1)
    batcher = TickBatcher(1)
    with pytest.raises(ValueError):
        batcher.symbol_id("")
