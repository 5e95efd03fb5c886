"""Rows and SQL of the `market` schema (db/migrations/market/).

Writers are the market worker's persistence agents: every write is one statement over
arrays (`unnest`), at most MAX_ROWS_PER_WRITE rows, idempotent on the natural key, so a
redelivered batch changes nothing. Readers are api/market.py (through services/market.py
for anything cached in Redis).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from uuid import UUID

import asyncpg
import msgspec

from services.market import OutcomeView, SignalView
from streams.market import Bar, BarColumns, Signal, SignalOutcome, interval_name

MAX_ROWS_PER_WRITE = 5_000
MAX_SUBSCRIPTIONS = 200
PERSISTED_INTERVALS_MIN_MS = 60_000


class Instrument(msgspec.Struct, frozen=True):
    symbol: str
    first_bar_ms: int
    last_bar_ms: int
    last_close: float


class Performance(msgspec.Struct, frozen=True, kw_only=True):
    strategy: str
    symbol: str
    interval: str
    horizon_bars: int
    count: int
    hit_rate: float
    avg_return: float
    gross_profit: float
    gross_loss: float
    # gross profit / gross loss; null when there was no loss (infinite) or no outcome.
    profit_factor: float | None
    # mean / sample standard deviation of per-signal returns, not annualised; null below
    # two outcomes or with zero spread.
    sharpe: float | None
    # Largest drop of the cumulative return curve (sum of returns in resolution order)
    # below its running peak, which starts at 0.
    max_drawdown: float
    cum_return: float


# -- writes (worker) ---------------------------------------------------------------------------

async def insert_signals(conn: asyncpg.Connection, signals: Sequence[Signal]) -> int:
    total = 0
    for chunk in _chunks(signals):
        status = await conn.execute(
            """INSERT INTO market.signals (signal_id, event_id, symbol, interval, signal_ts_ms, action, price,
                                          price_target, stop_loss, confidence, strategy, indicators)
               SELECT * FROM unnest($1::text[], $2::uuid[], $3::text[], $4::text[], $5::bigint[], $6::text[],
                                    $7::float8[], $8::float8[], $9::float8[], $10::float8[], $11::text[],
                                    $12::jsonb[])
               ON CONFLICT (signal_id) DO NOTHING""",
            [s.signal_id for s in chunk], [s.id for s in chunk], [s.symbol for s in chunk],
            [s.interval for s in chunk], [s.signal_ts_ms for s in chunk], [s.action for s in chunk],
            [s.price for s in chunk], [s.price_target for s in chunk], [s.stop_loss for s in chunk],
            [s.confidence for s in chunk], [s.strategy for s in chunk], [s.indicators for s in chunk])
        total += _count(status)
    return total


async def insert_outcomes(conn: asyncpg.Connection, outcomes: Sequence[SignalOutcome]) -> int:
    total = 0
    for chunk in _chunks(outcomes):
        status = await conn.execute(
            """INSERT INTO market.signal_outcomes (signal_id, horizon_bars, symbol, interval, strategy, action,
                                                  realised_return, hit, exit, resolved_ts_ms)
               SELECT * FROM unnest($1::text[], $2::int[], $3::text[], $4::text[], $5::text[], $6::text[],
                                    $7::float8[], $8::bool[], $9::text[], $10::bigint[])
               ON CONFLICT (signal_id, horizon_bars) DO NOTHING""",
            [o.signal_id for o in chunk], [o.horizon_bars for o in chunk], [o.symbol for o in chunk],
            [o.interval for o in chunk], [o.strategy for o in chunk], [o.action for o in chunk],
            [o.realised_return for o in chunk], [o.hit for o in chunk], [o.exit for o in chunk],
            [o.resolved_ts_ms for o in chunk])
        total += _count(status)
    return total


async def insert_bars(conn: asyncpg.Connection, batches: Sequence[BarColumns]) -> int:
    """Bars of `PERSISTED_INTERVALS_MIN_MS` and coarser (1 s bars live in Redis and Kafka only)."""
    rows: list[tuple[Any, ...]] = []
    for c in batches:
        keep = c.interval_ms >= PERSISTED_INTERVALS_MIN_MS
        if not keep.any():
            continue
        names = [c.symbols[i] for i in c.sym[keep].tolist()]
        intervals = [interval_name(ms) for ms in c.interval_ms[keep].tolist()]
        rows.extend(zip(names, intervals, c.open_ts_ms[keep].tolist(), c.open[keep].tolist(), c.high[keep].tolist(),
                        c.low[keep].tolist(), c.close[keep].tolist(), c.volume[keep].tolist(),
                        c.n_ticks[keep].tolist(), strict=True))
    total = 0
    for chunk in _chunks(rows):
        status = await conn.execute(
            """INSERT INTO market.bars (symbol, interval, open_ts_ms, open, high, low, close, volume, n_ticks)
               SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::float8[], $5::float8[], $6::float8[],
                                    $7::float8[], $8::float8[], $9::int[])
               ON CONFLICT DO NOTHING""", *map(list, zip(*chunk, strict=True)))
        total += _count(status)
    return total


async def upsert_instruments(conn: asyncpg.Connection, batches: Sequence[BarColumns]) -> None:
    """Every symbol with a closed bar: first and last bar time, last close."""
    latest: dict[str, tuple[int, int, float]] = {}
    for c in batches:
        for i, t, close in zip(c.sym.tolist(), c.open_ts_ms.tolist(), c.close.tolist(), strict=True):
            symbol = c.symbols[i]
            first, last, _ = latest.get(symbol, (t, t, close))
            latest[symbol] = (min(first, t), max(last, t), close if t >= last else latest[symbol][2])
    if not latest:
        return
    symbols = sorted(latest)
    await conn.execute(
        """INSERT INTO market.instruments (symbol, first_bar_ms, last_bar_ms, last_close)
           SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::float8[])
           ON CONFLICT (symbol) DO UPDATE SET
               first_bar_ms = least(market.instruments.first_bar_ms, excluded.first_bar_ms),
               last_close = CASE WHEN excluded.last_bar_ms >= market.instruments.last_bar_ms
                                 THEN excluded.last_close ELSE market.instruments.last_close END,
               last_bar_ms = greatest(market.instruments.last_bar_ms, excluded.last_bar_ms),
               updated_at = now()""",
        symbols, [latest[s][0] for s in symbols], [latest[s][1] for s in symbols], [latest[s][2] for s in symbols])


# -- reads (API) ---------------------------------------------------------------------------------

async def instruments(conn: asyncpg.Connection) -> list[Instrument]:
    rows = await conn.fetch("SELECT symbol, first_bar_ms, last_bar_ms, last_close FROM market.instruments "
                            "ORDER BY symbol")
    return [Instrument(r["symbol"], r["first_bar_ms"], r["last_bar_ms"], r["last_close"]) for r in rows]


async def known_symbols(conn: asyncpg.Connection, symbols: Sequence[str]) -> set[str]:
    rows = await conn.fetch("SELECT symbol FROM market.instruments WHERE symbol = ANY($1::text[])", list(symbols))
    return {r["symbol"] for r in rows}


async def latest_signals(conn: asyncpg.Connection, symbols: Sequence[str]) -> dict[str, SignalView]:
    rows = await conn.fetch(
        f"""SELECT DISTINCT ON (symbol) {_SIGNAL_COLUMNS} FROM market.signals WHERE symbol = ANY($1::text[])
            ORDER BY symbol, signal_ts_ms DESC, signal_id DESC""", list(symbols))
    return {r["symbol"]: _signal_view(r) for r in rows}


async def signal_history(conn: asyncpg.Connection, *, symbol: str | None, from_ms: int | None, to_ms: int | None,
                         before: tuple[int, str] | None, limit: int) -> list[SignalView]:
    """Newest first; `before` is the (signal_ts_ms, signal_id) of the last row of the previous page."""
    rows = await conn.fetch(
        f"""SELECT {_SIGNAL_COLUMNS} FROM market.signals
            WHERE ($1::text IS NULL OR symbol = $1)
              AND ($2::bigint IS NULL OR signal_ts_ms >= $2)
              AND ($3::bigint IS NULL OR signal_ts_ms < $3)
              AND ($4::bigint IS NULL OR (signal_ts_ms, signal_id) < ($4, $5::text))
            ORDER BY signal_ts_ms DESC, signal_id DESC
            LIMIT $6""",
        symbol, from_ms, to_ms, before[0] if before else None, before[1] if before else None, limit)
    return [_signal_view(r) for r in rows]


async def outcomes_of(conn: asyncpg.Connection, signal_ids: Sequence[str]) -> list[OutcomeView]:
    rows = await conn.fetch(
        """SELECT signal_id, symbol, interval, strategy, action, horizon_bars, realised_return, hit, exit,
                  resolved_ts_ms FROM market.signal_outcomes WHERE signal_id = ANY($1::text[])
           ORDER BY signal_id, horizon_bars""", list(signal_ids))
    return [OutcomeView(**dict(r)) for r in rows]


async def performance(conn: asyncpg.Connection, *, symbol: str | None, strategy: str | None,
                      horizon_bars: int | None, interval: str | None) -> list[Performance]:
    """Per (strategy, symbol, interval, horizon), over every persisted outcome; the same
    definitions as indicators/outcomes.py (returns in resolution order)."""
    rows = await conn.fetch(
        """WITH o AS (
               SELECT strategy, symbol, interval, horizon_bars, realised_return AS r, resolved_ts_ms, signal_id
               FROM market.signal_outcomes
               WHERE ($1::text IS NULL OR symbol = $1) AND ($2::text IS NULL OR strategy = $2)
                 AND ($3::int IS NULL OR horizon_bars = $3) AND ($4::text IS NULL OR interval = $4)),
           curve AS (
               SELECT *, sum(r) OVER w AS cum FROM o
               WINDOW w AS (PARTITION BY strategy, symbol, interval, horizon_bars
                            ORDER BY resolved_ts_ms, signal_id ROWS UNBOUNDED PRECEDING)),
           drawdown AS (
               SELECT *, greatest(0, max(cum) OVER w) - cum AS dd FROM curve
               WINDOW w AS (PARTITION BY strategy, symbol, interval, horizon_bars
                            ORDER BY resolved_ts_ms, signal_id ROWS UNBOUNDED PRECEDING))
           SELECT strategy, symbol, interval, horizon_bars, count(*) AS count,
                  avg((r > 0)::int)::float8 AS hit_rate, avg(r) AS avg_return,
                  coalesce(sum(r) FILTER (WHERE r > 0), 0) AS gross_profit,
                  coalesce(-sum(r) FILTER (WHERE r <= 0), 0) AS gross_loss,
                  stddev_samp(r) AS std, max(dd) AS max_drawdown, sum(r) AS cum_return
           FROM drawdown GROUP BY strategy, symbol, interval, horizon_bars
           ORDER BY strategy, symbol, interval, horizon_bars""",
        symbol, strategy, horizon_bars, interval)
    return [_performance(r) for r in rows]


async def bars(conn: asyncpg.Connection, symbol: str, interval: str, limit: int) -> list[Bar]:
    """The latest `limit` persisted bars, oldest first."""
    rows = await conn.fetch(
        """SELECT * FROM (SELECT symbol, interval, open_ts_ms, open, high, low, close, volume, n_ticks
                          FROM market.bars WHERE symbol = $1 AND interval = $2
                          ORDER BY open_ts_ms DESC LIMIT $3) latest ORDER BY open_ts_ms""",
        symbol, interval, limit)
    return [Bar(**dict(r)) for r in rows]


async def subscriptions(conn: asyncpg.Connection, user_id: UUID) -> list[str]:
    rows = await conn.fetch("SELECT symbol FROM market.subscriptions WHERE user_id = $1 ORDER BY symbol", user_id)
    return [r["symbol"] for r in rows]


class TooManySubscriptions(ValueError):
    pass


async def subscribe(conn: asyncpg.Connection, user_id: UUID, symbols: Sequence[str]) -> list[str]:
    """Add symbols to the user's list (idempotent); refuses to grow past MAX_SUBSCRIPTIONS."""
    async with conn.transaction():
        # One user's concurrent requests serialise here, so the bound holds.
        await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1::text, 0))", str(user_id))
        await conn.execute(
            "INSERT INTO market.subscriptions (user_id, symbol) SELECT $1, unnest($2::text[]) ON CONFLICT DO NOTHING",
            user_id, list(symbols))
        current = await subscriptions(conn, user_id)
        if len(current) > MAX_SUBSCRIPTIONS:
            raise TooManySubscriptions(f"at most {MAX_SUBSCRIPTIONS} symbols per user")
    return current


async def unsubscribe(conn: asyncpg.Connection, user_id: UUID, symbols: Sequence[str]) -> list[str]:
    await conn.execute("DELETE FROM market.subscriptions WHERE user_id = $1 AND symbol = ANY($2::text[])",
                       user_id, list(symbols))
    return await subscriptions(conn, user_id)


# -- helpers ------------------------------------------------------------------------------------

_SIGNAL_COLUMNS = ("signal_id, symbol, interval, signal_ts_ms, action, price, price_target, stop_loss, confidence, "
                   "strategy, indicators")


def _signal_view(r: asyncpg.Record) -> SignalView:
    return SignalView(signal_id=r["signal_id"], symbol=r["symbol"], interval=r["interval"],
                      signal_ts_ms=r["signal_ts_ms"], action=r["action"], price=r["price"],
                      price_target=r["price_target"], stop_loss=r["stop_loss"], confidence=r["confidence"],
                      strategy=r["strategy"], indicators=r["indicators"])


def _performance(r: asyncpg.Record) -> Performance:
    std = r["std"]
    gross_loss = r["gross_loss"]
    return Performance(strategy=r["strategy"], symbol=r["symbol"], interval=r["interval"],
                       horizon_bars=r["horizon_bars"], count=r["count"], hit_rate=r["hit_rate"],
                       avg_return=r["avg_return"], gross_profit=r["gross_profit"], gross_loss=gross_loss,
                       profit_factor=r["gross_profit"] / gross_loss if gross_loss > 0 else None,
                       sharpe=r["avg_return"] / std if std is not None and std > 0 else None,
                       max_drawdown=r["max_drawdown"], cum_return=r["cum_return"])


def _chunks(items: Sequence[Any]) -> list[Sequence[Any]]:
    return [items[i:i + MAX_ROWS_PER_WRITE] for i in range(0, len(items), MAX_ROWS_PER_WRITE)]


def _count(status: str) -> int:
    # asyncpg returns the command tag, e.g. "INSERT 0 42".
    return int(status.rsplit(" ", 1)[-1])
