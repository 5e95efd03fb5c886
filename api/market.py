"""Market REST (any logged-in user) and the live WebSocket (api/market_ws.py).

Thin handlers: parse, check the symbol exists, read the Redis cache the market agent keeps
(live values) or PostgreSQL (history, performance, subscriptions), shape the answer.
Unknown symbol: 404 problem; a bad parameter: 422 problem with the field.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from litestar import Request, Router, delete, get, post
from litestar.params import Parameter

from api.auth import AuthUser
from api.market_ws import known_symbols, signal_stream
from api.problems import Problem
from api.resources import Resources
from db import market as db
from indicators.signals import STRATEGIES
from services import market as live
from services.market import IndicatorsView, OutcomeView, SignalView
from streams.market import INTERVALS_MS, Bar

HISTORY_PAGE_MAX = 500
HISTORY_PAGE_DEFAULT = 50
BARS_MAX = 1_000
BARS_DEFAULT = 100
SymbolsParam = Annotated[str | None, Parameter(max_length=6_500, description="comma-separated symbols, e.g. BTCUSD,AAPL")]


# ------------------------------------------------------------------------------ schemas

class LiveSignal(msgspec.Struct, frozen=True):
    symbol: str
    signal: SignalView | None


class LiveSignalsOut(msgspec.Struct, frozen=True):
    signals: list[LiveSignal]


class SignalRecord(SignalView, frozen=True, kw_only=True):
    outcomes: list[OutcomeView]


class HistoryOut(msgspec.Struct, frozen=True):
    signals: list[SignalRecord]
    next_cursor: str | None


class PerformanceOut(msgspec.Struct, frozen=True):
    performance: list[db.Performance]


class SymbolsIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    symbols: Annotated[list[Annotated[str, msgspec.Meta(min_length=1, max_length=64)]],
                       msgspec.Meta(min_length=1, max_length=live.MAX_QUERY_SYMBOLS)]


class SubscriptionsOut(msgspec.Struct, frozen=True):
    symbols: list[str]


class BarsOut(msgspec.Struct, frozen=True):
    symbol: str
    interval: str
    bars: list[Bar]


class IndicatorsOut(msgspec.Struct, frozen=True):
    symbol: str
    intervals: dict[str, IndicatorsView]


class SymbolsOut(msgspec.Struct, frozen=True):
    symbols: list[db.Instrument]


# ------------------------------------------------------------------------------ helpers

def _user(request: Request[Any, Any, Any]) -> AuthUser:
    user = request.user
    assert isinstance(user, AuthUser), "route is authenticated"
    return user


def _bad(exc: live.BadParameter) -> Problem:
    return Problem(422, "validation-error", str(exc), errors=[{"field": exc.field, "message": str(exc),
                                                              "source": "query"}])


def _parse_symbols(text: str | None) -> list[str]:
    try:
        return live.parse_symbols(text)
    except live.BadParameter as exc:
        raise _bad(exc) from None


async def _require_known(resources: Resources, symbols: list[str]) -> None:
    unknown = [s for s in symbols if s not in await known_symbols(resources, symbols)]
    if unknown:
        raise Problem(404, "unknown-symbol", f"No market data for {', '.join(unknown)}.", symbols=unknown)


# ------------------------------------------------------------------------------ signals

@get("/signals/live", summary="The latest signal of each symbol (the caller's subscriptions by default)")
async def live_signals(request: Request[Any, Any, Any], resources: Resources,
                       symbols: SymbolsParam = None) -> LiveSignalsOut:
    wanted = _parse_symbols(symbols)
    pool = await resources.pool("market")
    if symbols is None:
        async with pool.acquire() as conn:
            wanted = await db.subscriptions(conn, _user(request).id)
    await _require_known(resources, wanted)
    latest = await live.live_signals(resources.redis, wanted)
    missing = [s for s, v in latest.items() if v is None]
    if missing:  # the cache was flushed or never had it: PostgreSQL has every signal
        async with pool.acquire() as conn:
            latest.update(await db.latest_signals(conn, missing))
    return LiveSignalsOut([LiveSignal(s, latest.get(s)) for s in wanted])


@get("/signals/history", summary="Signals, newest first, with their outcomes (cursor pagination)")
async def signal_history(
        resources: Resources,
        symbol: Annotated[str | None, Parameter(min_length=1, max_length=64)] = None,
        from_: Annotated[str | None, Parameter(query="from", max_length=40,
                                               description="epoch ms or ISO 8601, inclusive")] = None,
        to: Annotated[str | None, Parameter(max_length=40, description="epoch ms or ISO 8601, exclusive")] = None,
        limit: Annotated[int, Parameter(ge=1, le=HISTORY_PAGE_MAX)] = HISTORY_PAGE_DEFAULT,
        cursor: Annotated[str | None, Parameter(max_length=200)] = None) -> HistoryOut:
    try:
        from_ms, to_ms = live.parse_time_ms(from_, "from"), live.parse_time_ms(to, "to")
        before = live.decode_cursor(cursor) if cursor else None
    except live.BadParameter as exc:
        raise _bad(exc) from None
    if from_ms is not None and to_ms is not None and from_ms >= to_ms:
        raise _bad(live.BadParameter("from", "from must be before to"))
    if symbol is not None:
        await _require_known(resources, [symbol])
    async with (await resources.pool("market")).acquire() as conn:
        page = await db.signal_history(conn, symbol=symbol, from_ms=from_ms, to_ms=to_ms, before=before, limit=limit)
        outcomes = await db.outcomes_of(conn, [s.signal_id for s in page])
    by_signal: dict[str, list[OutcomeView]] = {}
    for o in outcomes:
        by_signal.setdefault(o.signal_id, []).append(o)
    records = [SignalRecord(**msgspec.structs.asdict(s), outcomes=by_signal.get(s.signal_id, [])) for s in page]
    last = page[-1] if len(page) == limit else None
    return HistoryOut(records, live.encode_cursor(last.signal_ts_ms, last.signal_id) if last else None)


@get("/signals/performance", summary="Hit rate, returns, profit factor, Sharpe, drawdown per strategy/symbol/horizon")
async def signal_performance(
        resources: Resources,
        symbol: Annotated[str | None, Parameter(min_length=1, max_length=64)] = None,
        strategy: Annotated[str | None, Parameter(max_length=64, description=f"one of {', '.join(STRATEGIES)}")] = None,
        horizon: Annotated[int | None, Parameter(ge=1, le=100_000, description="bars after the signal")] = None,
        interval: Annotated[str | None, Parameter(max_length=8, description="bar interval, e.g. 1s, 1m")] = None,
) -> PerformanceOut:
    if strategy is not None and strategy not in STRATEGIES:
        raise _bad(live.BadParameter("strategy", f"strategy must be one of {', '.join(STRATEGIES)}"))
    if interval is not None and interval not in INTERVALS_MS:
        raise _bad(live.BadParameter("interval", f"interval must be one of {', '.join(INTERVALS_MS)}"))
    if symbol is not None:
        await _require_known(resources, [symbol])
    async with (await resources.pool("market")).acquire() as conn:
        rows = await db.performance(conn, symbol=symbol, strategy=strategy, horizon_bars=horizon, interval=interval)
    return PerformanceOut(rows)


@get("/signals/subscriptions", summary="The symbols the caller follows")
async def list_subscriptions(request: Request[Any, Any, Any], resources: Resources) -> SubscriptionsOut:
    async with (await resources.pool("market")).acquire() as conn:
        return SubscriptionsOut(await db.subscriptions(conn, _user(request).id))


@post("/signals/subscribe", status_code=200, summary="Follow symbols; returns every symbol followed")
async def subscribe(request: Request[Any, Any, Any], data: SymbolsIn, resources: Resources) -> SubscriptionsOut:
    symbols = list(dict.fromkeys(data.symbols))
    await _require_known(resources, symbols)
    async with (await resources.pool("market")).acquire() as conn:
        try:
            return SubscriptionsOut(await db.subscribe(conn, _user(request).id, symbols))
        except db.TooManySubscriptions as exc:
            raise Problem(422, "too-many-subscriptions", str(exc)) from None


@delete("/signals/subscribe", status_code=200, summary="Stop following symbols; returns every symbol still followed")
async def unsubscribe(request: Request[Any, Any, Any], resources: Resources,
                      symbols: Annotated[str, Parameter(min_length=1, max_length=6_500)]) -> SubscriptionsOut:
    wanted = _parse_symbols(symbols)
    async with (await resources.pool("market")).acquire() as conn:
        return SubscriptionsOut(await db.unsubscribe(conn, _user(request).id, wanted))


# ------------------------------------------------------------------------------ market data

@get("/market/symbols", summary="Every symbol with market data")
async def market_symbols(resources: Resources) -> SymbolsOut:
    async with (await resources.pool("market")).acquire() as conn:
        return SymbolsOut(await db.instruments(conn))


@get("/market/{symbol:str}/bars", summary="The latest closed bars of a symbol, oldest first")
async def market_bars(resources: Resources, symbol: str,
                      interval: Annotated[str, Parameter(max_length=8, description="1s, 1m, 5m or 1h")] = "1m",
                      limit: Annotated[int, Parameter(ge=1, le=BARS_MAX)] = BARS_DEFAULT) -> BarsOut:
    if interval not in INTERVALS_MS:
        raise _bad(live.BadParameter("interval", f"interval must be one of {', '.join(INTERVALS_MS)}"))
    await _require_known(resources, [symbol])
    if interval == "1s":  # 1 s bars are not persisted: the cache holds the last BAR_CACHE["1s"]
        bars = await live.cached_bars(resources.redis, symbol, interval, limit)
    else:
        async with (await resources.pool("market")).acquire() as conn:
            bars = await db.bars(conn, symbol, interval, limit)
    return BarsOut(symbol, interval, bars)


@get("/market/{symbol:str}/indicators", summary="Latest indicator values and warm-up state per interval")
async def market_indicators(resources: Resources, symbol: str) -> IndicatorsOut:
    await _require_known(resources, [symbol])
    return IndicatorsOut(symbol, await live.indicators(resources.redis, symbol))


rest = Router(path="/api/v1", tags=["market"],
              route_handlers=[live_signals, signal_history, signal_performance, list_subscriptions, subscribe,
                              unsubscribe, market_symbols, market_bars, market_indicators])
router = Router(path="/", route_handlers=[rest, signal_stream])
