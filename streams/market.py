"""Market-data events and topics: columnar tick and bar batches, signals, outcomes.

Topics (logical names; Kafka names get `settings.topic_prefix`):

* `market.ticks`: `TickBatch`, many ticks per message as columns (symbol id, event time,
  price, size). Written by `fintide feed`.
* `market.bars`: `BarBatch`, closed bars as columns. Written by the market agent.
* `market.signals`: `Signal` and `SignalOutcome`, one per message, keyed by symbol.

Why columns: a Faust agent spends tens of microseconds per message, so the hot path moves
thousands of ticks per message and decodes them straight into numpy arrays
(`TickBatch.columns()`): no Python runs per tick.

Wire format: the platform's codec (msgspec JSON, streams/codec.py). Each column is the raw
little-endian bytes of a numpy array, which msgspec writes as base64 in JSON; decoding
goes base64 -> bytes -> `np.frombuffer` (zero copy). JSON+base64 costs ~33 % more bytes
than msgpack would, and still runs at 6-25 M ticks/s per core each way on 4k-16k tick
batches (ops/bench/ticks_codec.py, docs/MARKET.md);
in exchange the tick topic uses the same codec, `TopicSpec.decode` and dead-letter path as
every other topic. `columns()` validates everything a kernel relies on (lengths, symbol
ids in range, finite positive prices, finite non-negative sizes) and raises
`MalformedBatch`, which agents treat like a decode error (dead letter, carry on).

Symbols: each batch carries its own symbol table `symbols`; `sym[i]` is an index into it,
so a batch is self-describing and no id registry has to be shared between feed and
workers. Consumers map names to their own state rows once per batch (a few dict look-ups
per batch, then one vectorised gather).

Partitioning: a symbol's partition is Kafka's default partitioner applied to the symbol
name, `murmur2(symbol) % partitions` (`partition_for_symbol`). The feed groups ticks by
that partition, so every batch holds symbols of one partition only, is produced to that
partition explicitly, and is keyed by its first symbol (the only one for a single-symbol
batch); any of its symbols would route to the same partition. Because of this choice a
Faust table keyed by symbol and written while processing a tick batch is stored in
exactly the partition its router computes from the symbol, and a signal keyed by symbol
lands on the same partition as the ticks it came from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import msgspec
import numpy as np

from streams.codec import DecodeFailure, decode_msgpack, encode_msgpack
from streams.events import Event
from streams.topics import TopicSpec, partition_for_key, register

# Bounds (decided up front). 16384 ticks are ~610 KB of JSON: under Kafka's default
# 1 MiB max message size with room for the symbol table.
MAX_BATCH_TICKS = 16_384
MAX_BATCH_SYMBOLS = 4_096
MAX_SYMBOL_LEN = 64
MAX_BATCH_BARS = 16_384

# Bar intervals the platform aggregates, by name; values in milliseconds.
INTERVALS_MS: dict[str, int] = {"1s": 1_000, "1m": 60_000, "5m": 300_000, "1h": 3_600_000}
_INTERVAL_NAMES = {ms: name for name, ms in INTERVALS_MS.items()}

# Column dtypes on the wire: explicit little-endian so hosts of any byte order agree.
SYM_DTYPE = np.dtype("<i4")
TS_DTYPE = np.dtype("<i8")
F64_DTYPE = np.dtype("<f8")
COUNT_DTYPE = np.dtype("<i4")


class MalformedBatch(ValueError):
    """A batch whose columns do not fit together; the agent dead-letters it."""


# The errors a consumer of `market.ticks` / `market.bars` catches per message.
BatchFailure = (*DecodeFailure, MalformedBatch)


def partition_for_symbol(symbol: str, n_partitions: int) -> int:
    """Kafka's default partition for key `symbol` (streams.topics.partition_for_key, cached)."""
    return partition_for_key(symbol, n_partitions)


def interval_name(interval_ms: int) -> str:
    """"1s", "1m", ... for a configured interval; other values print as "<ms>ms"."""
    return _INTERVAL_NAMES.get(interval_ms, f"{interval_ms}ms")


# -- tick batches --------------------------------------------------------------------------

class TickBatch(Event, tag="market.tick_batch"):
    """Ticks of the symbols of one partition group, as little-endian column bytes."""

    # The partition every symbol in `symbols` hashes to (see module docstring).
    partition: int
    # Who wrote it (a feed instance, e.g. "sim-3f2a9c") and its per-partition sequence:
    # consumers can drop a re-delivered batch with seq <= the last one seen from source.
    source: str
    seq: int
    count: int
    symbols: list[str]
    sym: bytes  # int32[count], index into symbols
    # int64[count], event time, epoch ms (`ts_ms` is the event header's own field)
    time_ms: bytes
    price: bytes  # float64[count]
    size: bytes  # float64[count]

    @property
    def key(self) -> str:
        return self.symbols[0] if self.symbols else ""

    def columns(self) -> TickColumns:
        """The ticks as numpy arrays (views on this batch's bytes), validated."""
        return _tick_columns(self)


@dataclass(frozen=True, slots=True)
class TickColumns:
    symbols: list[str]
    sym: np.ndarray  # int32
    ts_ms: np.ndarray  # int64
    price: np.ndarray  # float64
    size: np.ndarray  # float64

    def __len__(self) -> int:
        return int(self.sym.shape[0])


def tick_batch(*, partition: int, source: str, seq: int, symbols: list[str], sym: np.ndarray,
               ts_ms: np.ndarray, price: np.ndarray, size: np.ndarray) -> TickBatch:
    """Build a TickBatch from arrays (copied into the message's column bytes)."""
    count = int(sym.shape[0])
    if not 0 <= count <= MAX_BATCH_TICKS:
        raise ValueError(f"a tick batch holds 0..{MAX_BATCH_TICKS} ticks, got {count}")
    for name, arr in (("ts_ms", ts_ms), ("price", price), ("size", size)):
        if arr.shape != (count,):
            raise ValueError(f"{name} has shape {arr.shape}, expected ({count},)")
    return TickBatch(partition=partition, source=source, seq=seq, count=count, symbols=list(symbols),
                     sym=_column_bytes(sym, SYM_DTYPE), time_ms=_column_bytes(ts_ms, TS_DTYPE),
                     price=_column_bytes(price, F64_DTYPE), size=_column_bytes(size, F64_DTYPE))


def _tick_columns(batch: TickBatch) -> TickColumns:
    n = _check_count(batch.count, MAX_BATCH_TICKS, "ticks")
    _check_symbols(batch.symbols, n)
    sym = _column(batch.sym, SYM_DTYPE, n, "sym")
    ts = _column(batch.time_ms, TS_DTYPE, n, "time_ms")
    price = _column(batch.price, F64_DTYPE, n, "price")
    size = _column(batch.size, F64_DTYPE, n, "size")
    if n:
        _check_ids(sym, len(batch.symbols))
        # Kernels do arithmetic on these without further checks.
        if not (np.isfinite(price).all() and (price > 0.0).all()):
            raise MalformedBatch("price must be finite and > 0")
        if not (np.isfinite(size).all() and (size >= 0.0).all()):
            raise MalformedBatch("size must be finite and >= 0")
    return TickColumns(batch.symbols, sym, ts, price, size)


# -- bar batches ---------------------------------------------------------------------------

class BarBatch(Event, tag="market.bar_batch"):
    """Closed bars (any symbols of one partition, any intervals) as column bytes."""

    partition: int
    count: int
    symbols: list[str]
    sym: bytes  # int32[count], index into symbols
    interval_ms: bytes  # int64[count]
    open_ts_ms: bytes  # int64[count], bar start (inclusive); the bar covers [open, open+interval)
    open: bytes  # float64[count]
    high: bytes
    low: bytes
    close: bytes
    volume: bytes
    n_ticks: bytes  # int32[count]

    @property
    def key(self) -> str:
        return self.symbols[0] if self.symbols else ""

    def columns(self) -> BarColumns:
        return _bar_columns(self)

    def rows(self) -> list[Bar]:
        """One `Bar` per bar (Python objects: for API and WebSocket edges, not kernels)."""
        c = self.columns()
        return [Bar(symbol=c.symbols[int(c.sym[i])], interval=interval_name(int(c.interval_ms[i])),
                    open_ts_ms=int(c.open_ts_ms[i]), open=float(c.open[i]), high=float(c.high[i]),
                    low=float(c.low[i]), close=float(c.close[i]), volume=float(c.volume[i]),
                    n_ticks=int(c.n_ticks[i])) for i in range(len(c))]


@dataclass(frozen=True, slots=True)
class BarColumns:
    symbols: list[str]
    sym: np.ndarray
    interval_ms: np.ndarray
    open_ts_ms: np.ndarray
    open: np.ndarray
    high: np.ndarray
    low: np.ndarray
    close: np.ndarray
    volume: np.ndarray
    n_ticks: np.ndarray

    def __len__(self) -> int:
        return int(self.sym.shape[0])


class Bar(msgspec.Struct, frozen=True, kw_only=True):
    """One bar at the API/WebSocket edge."""

    symbol: str
    interval: str
    open_ts_ms: int
    open: float
    high: float
    low: float
    close: float
    volume: float
    n_ticks: int


def bar_batch(*, partition: int, symbols: list[str], sym: np.ndarray, interval_ms: np.ndarray,
              open_ts_ms: np.ndarray, ohlcv: np.ndarray, n_ticks: np.ndarray) -> BarBatch:
    """Build a BarBatch; `ohlcv` is [count, 5] (open, high, low, close, volume)."""
    count = int(sym.shape[0])
    if not 0 <= count <= MAX_BATCH_BARS:
        raise ValueError(f"a bar batch holds 0..{MAX_BATCH_BARS} bars, got {count}")
    if ohlcv.shape != (count, 5) or interval_ms.shape != (count,) or open_ts_ms.shape != (count,) \
            or n_ticks.shape != (count,):
        raise ValueError("bar columns must all have the same length (ohlcv: [count, 5])")
    f = [_column_bytes(ohlcv[:, j], F64_DTYPE) for j in range(5)]
    return BarBatch(partition=partition, count=count, symbols=list(symbols), sym=_column_bytes(sym, SYM_DTYPE),
                    interval_ms=_column_bytes(interval_ms, TS_DTYPE), open_ts_ms=_column_bytes(open_ts_ms, TS_DTYPE),
                    open=f[0], high=f[1], low=f[2], close=f[3], volume=f[4],
                    n_ticks=_column_bytes(n_ticks, COUNT_DTYPE))


def _bar_columns(batch: BarBatch) -> BarColumns:
    n = _check_count(batch.count, MAX_BATCH_BARS, "bars")
    _check_symbols(batch.symbols, n)
    sym = _column(batch.sym, SYM_DTYPE, n, "sym")
    if n:
        _check_ids(sym, len(batch.symbols))
    cols = [_column(getattr(batch, name), F64_DTYPE, n, name) for name in ("open", "high", "low", "close", "volume")]
    return BarColumns(batch.symbols, sym, _column(batch.interval_ms, TS_DTYPE, n, "interval_ms"),
                      _column(batch.open_ts_ms, TS_DTYPE, n, "open_ts_ms"), *cols,
                      _column(batch.n_ticks, COUNT_DTYPE, n, "n_ticks"))


# -- signals and outcomes ------------------------------------------------------------------

class Signal(Event, tag="market.signal"):
    """A trading signal from a rule on one symbol's bars (see docs/MARKET.md)."""

    # Deterministic: f"{symbol}:{interval}:{bar open_ts_ms}:{strategy}", so a replayed
    # batch produces the same id and consumers dedupe on it.
    signal_id: str
    symbol: str
    interval: str
    # Event time the signal became known: the close of its bar (open_ts_ms + interval).
    signal_ts_ms: int
    action: Literal["buy", "sell"]
    price: float
    price_target: float
    stop_loss: float
    confidence: float  # 0..1, from the online model of the strategy
    strategy: str
    indicators: dict[str, float]


class SignalOutcome(Event, tag="market.signal_outcome"):
    """What happened `horizon_bars` bars after a signal (see docs/MARKET.md)."""

    signal_id: str
    symbol: str
    interval: str
    strategy: str
    action: Literal["buy", "sell"]
    horizon_bars: int
    # Return of the trade, signed by direction: exit/entry - 1 for a buy, 1 - exit/entry
    # for a sell; exit is the target or stop if touched first, else the close at horizon.
    realised_return: float
    hit: bool  # realised_return > 0
    exit: Literal["target", "stop", "horizon"]
    resolved_ts_ms: int


# -- topics --------------------------------------------------------------------------------

class TickTopicSpec(TopicSpec[TickBatch]):
    """market.ticks carries msgpack (`encode_ticks`): the columns are raw bytes, which JSON
    can only carry as base64 text (33 % larger, and decoding it was ~10 % of a worker's time
    per tick). JSON batches (a message starting with `{`; msgpack maps never do) still
    decode, so producers may switch at any time. Bad bytes raise DecodeFailure either way:
    the same dead-letter path."""

    def decode(self, data: bytes) -> TickBatch:
        if data[:1] == b"{":
            return super().decode(data)
        return decode_msgpack(data, self._wire_type)  # type: ignore[no-any-return]


def encode_ticks(batch: TickBatch) -> bytes:
    """The market.ticks wire format (msgpack; see TickTopicSpec)."""
    return encode_msgpack(batch)


TICKS: TopicSpec[TickBatch] = register(TickTopicSpec(
    "market.ticks", TickBatch, key_field=None,
    doc="columnar tick batches; one partition group per batch, produced to that partition, "
        "keyed by the batch's first symbol (all its symbols hash to the partition)"))
BARS: TopicSpec[BarBatch] = register(TopicSpec(
    "market.bars", BarBatch, key_field=None,
    doc="columnar closed bars, same partition as the ticks they came from, keyed by first symbol"))
SIGNALS: TopicSpec[Signal | SignalOutcome] = register(TopicSpec(
    "market.signals", Signal | SignalOutcome, key_field="symbol",
    doc="signals and their outcomes, keyed by symbol"))


# -- column helpers --------------------------------------------------------------------------

def _column_bytes(arr: np.ndarray, dtype: np.dtype) -> bytes:
    return np.ascontiguousarray(arr, dtype=dtype).tobytes()


def _column(buf: bytes, dtype: np.dtype, n: int, name: str) -> np.ndarray:
    if len(buf) != n * dtype.itemsize:
        raise MalformedBatch(f"column {name!r} has {len(buf)} bytes, expected {n} x {dtype.itemsize}")
    arr = np.frombuffer(buf, dtype=dtype)
    # Kernels are compiled for aligned native arrays; a copy is the rare fallback.
    if not arr.flags.aligned or not dtype.isnative:
        arr = arr.astype(dtype.newbyteorder("="), copy=True)
    return arr


def _check_count(count: int, bound: int, what: str) -> int:
    if not 0 <= count <= bound:
        raise MalformedBatch(f"batch count {count} outside 0..{bound} {what}")
    return count


def _check_symbols(symbols: list[str], n: int) -> None:
    if len(symbols) > MAX_BATCH_SYMBOLS:
        raise MalformedBatch(f"{len(symbols)} symbols exceed the bound of {MAX_BATCH_SYMBOLS}")
    if n and not symbols:
        raise MalformedBatch("a non-empty batch needs a symbol table")
    for s in symbols:
        if not s or len(s) > MAX_SYMBOL_LEN:
            raise MalformedBatch(f"symbol {s!r} must be 1..{MAX_SYMBOL_LEN} characters")


def _check_ids(sym: np.ndarray, n_symbols: int) -> None:
    low, high = int(sym.min()), int(sym.max())
    if low < 0 or high >= n_symbols:
        raise MalformedBatch(f"symbol ids span {low}..{high}, table has {n_symbols}")
