"""Market service: live updates, the Redis cache behind them, and the queries the API answers.

Shared by the market agent (which publishes updates and keeps the cache) and the API
(REST and WebSocket, which read them). See docs/MARKET.md, "Live data".

Live updates. For every symbol the agent numbers its updates 1, 2, 3, ... (`seq`, one
sequence per symbol across every kind) and publishes each on a Redis pub/sub channel per
symbol and kind; Litestar's channels plugin on the API subscribes to the same names, so
any API replica serves any client:

| channel | update `type` |
|---|---|
| `market:<symbol>:bars` | `bars`: the bars of the symbol that closed in one tick batch |
| `market:<symbol>:indicators` | `indicators`: one interval's indicator values after its latest bar |
| `market:<symbol>:signals` | `signal`, and `outcome` when a signal's horizon resolves |

Every update carries `event_ms`: the event time of the symbol's earliest tick in the batch
that produced it, so `now - event_ms` bounds the tick-to-client latency from above.

Cache (kept by the agent in the same MULTI/EXEC as the PUBLISH, so a snapshot and the
update stream agree on `seq`):

    market:symbols                    set of every symbol the agent has seen
    market:state:<symbol>             hash: seq, signal (latest), ind:<interval> (latest indicators)
    market:bars:<symbol>:<interval>   list of the last BAR_CACHE[interval] bars, oldest first
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import msgspec
from redis.asyncio import Redis

from streams.market import INTERVALS_MS, MAX_SYMBOL_LEN, Bar, Signal, SignalOutcome

log = logging.getLogger("fintide.market")

KINDS = ("bars", "indicators", "signals")
SYMBOLS_KEY = "market:symbols"
# Bars kept per interval in the cache: 10 min of 1 s bars, ~8 h of 1 m bars, and so on.
BAR_CACHE = {"1s": 600, "1m": 500, "5m": 300, "1h": 200}
SNAPSHOT_BARS = 60
# Fan-out batches waiting for Redis in the worker; at the bound the oldest is dropped
# (live data: the next batch carries newer values, and clients see the seq gap).
MAX_FANOUT_BATCHES = 1_024
# Batches merged into one MULTI/EXEC when Redis falls behind.
MAX_BATCHES_PER_PIPELINE = 64
REDIS_RETRY_S = 1.0
MAX_QUERY_SYMBOLS = 100


def channel(symbol: str, kind: str) -> str:
    assert kind in KINDS, kind
    return f"market:{symbol}:{kind}"


def state_key(symbol: str) -> str:
    return f"market:state:{symbol}"


def bars_key(symbol: str, interval: str) -> str:
    return f"market:bars:{symbol}:{interval}"


# -- live update schemas -------------------------------------------------------------------

class SignalView(msgspec.Struct, frozen=True, kw_only=True):
    """A signal at the API/WebSocket edge (the event without its Kafka header)."""

    signal_id: str
    symbol: str
    interval: str
    signal_ts_ms: int
    action: Literal["buy", "sell"]
    price: float
    price_target: float
    stop_loss: float
    confidence: float
    strategy: str
    indicators: dict[str, float]

    @classmethod
    def of(cls, s: Signal) -> SignalView:
        return cls(signal_id=s.signal_id, symbol=s.symbol, interval=s.interval, signal_ts_ms=s.signal_ts_ms,
                   action=s.action, price=s.price, price_target=s.price_target, stop_loss=s.stop_loss,
                   confidence=s.confidence, strategy=s.strategy, indicators=s.indicators)


class OutcomeView(msgspec.Struct, frozen=True, kw_only=True):
    signal_id: str
    symbol: str
    interval: str
    strategy: str
    action: Literal["buy", "sell"]
    horizon_bars: int
    realised_return: float
    hit: bool
    exit: Literal["target", "stop", "horizon"]
    resolved_ts_ms: int

    @classmethod
    def of(cls, o: SignalOutcome) -> OutcomeView:
        return cls(signal_id=o.signal_id, symbol=o.symbol, interval=o.interval, strategy=o.strategy,
                   action=o.action, horizon_bars=o.horizon_bars, realised_return=o.realised_return, hit=o.hit,
                   exit=o.exit, resolved_ts_ms=o.resolved_ts_ms)


class _Update(msgspec.Struct, frozen=True, kw_only=True, tag_field="type"):
    symbol: str
    seq: int
    event_ms: int


class BarsUpdate(_Update, tag="bars"):
    bars: list[Bar]


class IndicatorsUpdate(_Update, tag="indicators"):
    interval: str
    bar_open_ts_ms: int
    bars_seen: int
    warmup_bars: int
    initialized: bool
    # NaN while an indicator warms up -> null in JSON.
    values: dict[str, float | None]


class SignalUpdate(_Update, tag="signal"):
    signal: SignalView


class OutcomeUpdate(_Update, tag="outcome"):
    outcome: OutcomeView


Update = BarsUpdate | IndicatorsUpdate | SignalUpdate | OutcomeUpdate
KIND_OF = {BarsUpdate: "bars", IndicatorsUpdate: "indicators", SignalUpdate: "signals", OutcomeUpdate: "signals"}


class UpdateHeader(msgspec.Struct, frozen=True):
    """The fields a fan-out hop needs to route an update without decoding all of it."""

    type: str
    symbol: str
    seq: int
    event_ms: int = 0


_encoder = msgspec.json.Encoder()
_header_decoder = msgspec.json.Decoder(UpdateHeader)


def encode(value: Any) -> bytes:
    return _encoder.encode(value)


def decode_header(payload: bytes) -> UpdateHeader:
    return _header_decoder.decode(payload)


# -- the worker side: publish and cache ----------------------------------------------------------

@dataclass
class FanoutBatch:
    """What one tick batch changes in the live view (built by the agent, written in one MULTI)."""

    updates: list[Update] = field(default_factory=list)
    new_symbols: list[str] = field(default_factory=list)


class RedisFanout:
    """Publishes updates and keeps the cache from a bounded queue, off the agent's path.

    `submit` never waits: the agent must not stall on Redis. At the bound the oldest
    waiting batch is dropped and counted (`dropped_batches`); if Redis fails, the batch in
    hand is dropped, the error logged, and the loop retries after REDIS_RETRY_S.
    """

    def __init__(self, redis: Redis, *, max_batches: int = MAX_FANOUT_BATCHES) -> None:
        self.redis = redis
        self._queue: deque[FanoutBatch] = deque()
        self._max = max_batches
        self._ready = asyncio.Event()
        self.dropped_batches = 0
        self.failed_batches = 0
        self.published = 0

    def submit(self, batch: FanoutBatch) -> None:
        if not batch.updates and not batch.new_symbols:
            return
        if len(self._queue) >= self._max:
            self._queue.popleft()
            self.dropped_batches += 1
        self._queue.append(batch)
        self._ready.set()

    @property
    def waiting(self) -> int:
        return len(self._queue)

    async def run(self) -> None:
        while True:
            await self._ready.wait()
            self._ready.clear()
            while self._queue:
                taken = [self._queue.popleft() for _ in range(min(len(self._queue), MAX_BATCHES_PER_PIPELINE))]
                try:
                    await self.write(taken)
                except Exception as exc:  # noqa: BLE001 - any Redis failure: decided below
                    # Live data only: log, drop what we hold, keep serving the next batches.
                    self.failed_batches += len(taken)
                    log.warning("market fan-out to Redis failed; dropped %d batch(es): %s", len(taken), exc)
                    await asyncio.sleep(REDIS_RETRY_S)

    async def write(self, batches: Sequence[FanoutBatch]) -> None:
        """One MULTI/EXEC: cache first, then PUBLISH, so a snapshot never runs ahead of `seq`."""
        pipe = self.redis.pipeline(transaction=True)
        n = 0
        for batch in batches:
            if batch.new_symbols:
                pipe.sadd(SYMBOLS_KEY, *batch.new_symbols)
            for update in batch.updates:
                payload = encode(update)
                _cache(pipe, update, payload)
                pipe.publish(channel(update.symbol, KIND_OF[type(update)]), payload)
                n += 1
        await pipe.execute()
        self.published += n


def _cache(pipe: Any, update: Update, payload: bytes) -> None:
    key = state_key(update.symbol)
    if isinstance(update, BarsUpdate):
        by_interval: dict[str, list[bytes]] = {}
        for bar in update.bars:
            by_interval.setdefault(bar.interval, []).append(encode(bar))
        for interval, bars in by_interval.items():
            pipe.rpush(bars_key(update.symbol, interval), *bars)
            pipe.ltrim(bars_key(update.symbol, interval), -BAR_CACHE.get(interval, 100), -1)
    elif isinstance(update, IndicatorsUpdate):
        pipe.hset(key, f"ind:{update.interval}", payload)
    elif isinstance(update, SignalUpdate):
        pipe.hset(key, "signal", encode(update.signal))
    pipe.hset(key, "seq", update.seq)


# -- the API side: read the cache ---------------------------------------------------------------

class IndicatorsView(msgspec.Struct, frozen=True, kw_only=True):
    interval: str
    bar_open_ts_ms: int
    bars_seen: int
    warmup_bars: int
    initialized: bool
    values: dict[str, float | None]


class Snapshot(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", tag="snapshot"):
    """Everything a client needs to draw a symbol before the first update."""

    symbol: str
    seq: int
    bars: dict[str, list[Bar]]
    indicators: dict[str, IndicatorsView]
    signal: SignalView | None


_bar_decoder = msgspec.json.Decoder(Bar)
_signal_decoder = msgspec.json.Decoder(SignalView)
_indicators_decoder = msgspec.json.Decoder(IndicatorsView)


async def snapshot(redis: Redis, symbol: str, *, bars: int = SNAPSHOT_BARS) -> Snapshot:
    pipe = redis.pipeline(transaction=True)
    pipe.hgetall(state_key(symbol))
    for interval in INTERVALS_MS:
        pipe.lrange(bars_key(symbol, interval), -bars, -1)
    state, *bar_lists = await pipe.execute()
    return Snapshot(symbol=symbol, seq=int(state.get(b"seq", 0)),
                    bars={i: [_bar_decoder.decode(b) for b in rows] for i, rows in zip(INTERVALS_MS, bar_lists, strict=True)
                          if rows},
                    indicators=_indicators(state),
                    signal=_signal_decoder.decode(state[b"signal"]) if b"signal" in state else None)


def _indicators(state: dict[bytes, bytes]) -> dict[str, IndicatorsView]:
    out = {}
    for interval in INTERVALS_MS:
        raw = state.get(f"ind:{interval}".encode())
        if raw is not None:
            out[interval] = _indicators_decoder.decode(raw)
    return out


async def indicators(redis: Redis, symbol: str) -> dict[str, IndicatorsView]:
    return _indicators(await redis.hgetall(state_key(symbol)))


async def live_signals(redis: Redis, symbols: Sequence[str]) -> dict[str, SignalView | None]:
    """The latest signal of each symbol from the cache (None: no signal yet)."""
    pipe = redis.pipeline(transaction=False)
    for symbol in symbols:
        pipe.hget(state_key(symbol), "signal")
    raw = await pipe.execute()
    return {s: (_signal_decoder.decode(r) if r is not None else None) for s, r in zip(symbols, raw, strict=True)}


async def cached_bars(redis: Redis, symbol: str, interval: str, limit: int) -> list[Bar]:
    return [_bar_decoder.decode(b) for b in await redis.lrange(bars_key(symbol, interval), -limit, -1)]


async def cached_symbols(redis: Redis, symbols: Sequence[str]) -> set[str]:
    """Which of `symbols` the agent has seen (Redis only; callers fall back to PostgreSQL)."""
    if not symbols:
        return set()
    flags = await redis.smismember(SYMBOLS_KEY, list(symbols))
    return {s for s, f in zip(symbols, flags, strict=True) if f}


# -- query parameters ----------------------------------------------------------------------------

class BadParameter(ValueError):
    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(message)
        self.field = field_name


def parse_symbols(text: str | None, *, field_name: str = "symbols") -> list[str]:
    """`A,B,C` -> ["A", "B", "C"] (order kept, duplicates dropped, bounded)."""
    if text is None:
        return []
    symbols = list(dict.fromkeys(s.strip() for s in text.split(",") if s.strip()))
    check_symbols(symbols, field_name=field_name)
    return symbols


def check_symbols(symbols: Iterable[str], *, field_name: str = "symbols") -> None:
    count = 0
    for s in symbols:
        count += 1
        if not 1 <= len(s) <= MAX_SYMBOL_LEN or any(c.isspace() or c == "," for c in s):
            raise BadParameter(field_name, f"{s!r} is not a symbol (1..{MAX_SYMBOL_LEN} characters, no spaces or commas)")
    if count > MAX_QUERY_SYMBOLS:
        raise BadParameter(field_name, f"at most {MAX_QUERY_SYMBOLS} symbols")


def parse_time_ms(text: str | None, field_name: str) -> int | None:
    """Epoch milliseconds, or an ISO 8601 time (UTC when it has no zone)."""
    if text is None or text == "":
        return None
    if text.lstrip("-").isdigit():
        return int(text)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise BadParameter(field_name, "expected epoch milliseconds or an ISO 8601 time") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


def encode_cursor(ts_ms: int, signal_id: str) -> str:
    return base64.urlsafe_b64encode(f"{ts_ms}|{signal_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[int, str]:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        ts, signal_id = text.split("|", 1)
        return int(ts), signal_id
    except (ValueError, UnicodeDecodeError):
        raise BadParameter("cursor", "malformed cursor") from None


def now_ms() -> int:
    return time.time_ns() // 1_000_000
