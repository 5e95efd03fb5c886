"""Binance public trade stream over WebSocket.

Speaks Binance's `<symbol>@trade` payload, either raw (`/ws/<symbol>@trade`):

    {"e":"trade","E":1672515782136,"s":"BNBBTC","t":12345,"p":"0.001","q":"100",
     "T":1672515782136,"m":true,"M":true}

or wrapped by a combined stream (`/stream?streams=a@trade/b@trade`):

    {"stream":"bnbbtc@trade","data":{...the payload above...}}

A trade becomes one tick: symbol `s`, event time `T` (trade time, ms), price `p`, size
`q`. Other event types are counted and skipped; a message that does not decode, or has a
non-positive price, is counted and skipped with a rate-limited warning (one bad message
must not stop a market feed).

Connection: reconnects after 0.5 s, with the wait doubling (to 30 s) while connections
fail or deliver nothing; after `max_failures` such connections in a row the feed gives
up with an error, so the
supervisor (fintide up) restarts it and logs it. Binance closes connections after 24 h;
that is an ordinary reconnect. Back-pressure: the websockets library buffers at most
`max_queue` frames; when the pipeline is slow the TCP window closes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import msgspec
import numpy as np
from websockets.asyncio.client import connect
from websockets.exceptions import WebSocketException

from ops.feeds.pipeline import TickChunk

log = logging.getLogger("fintide.feed.binance")

BINANCE_WS = "wss://stream.binance.com:9443"
MAX_BACKOFF_S = 30.0
WARN_EVERY_S = 10.0
MAX_MESSAGE_BYTES = 1 << 16  # a trade message is ~200 bytes
MAX_QUEUE_FRAMES = 256


class FeedGaveUp(RuntimeError):
    """The exchange could not be reached `max_failures` times in a row."""


class Trade(msgspec.Struct):
    e: str
    E: int
    s: str
    t: int
    p: str
    q: str
    T: int


class Envelope(msgspec.Struct):
    # Combined streams wrap the payload; a raw stream sends the payload's fields at the top.
    stream: str | None = None
    data: Trade | None = None
    e: str | None = None
    E: int | None = None
    s: str | None = None
    t: int | None = None
    p: str | None = None
    q: str | None = None
    T: int | None = None


_decoder = msgspec.json.Decoder(Envelope)


def default_url(symbols: tuple[str, ...]) -> str:
    streams = "/".join(f"{s.lower()}@trade" for s in symbols)
    return f"{BINANCE_WS}/stream?streams={streams}"


def parse_trade(message: str | bytes) -> tuple[str, int, float, float] | None:
    """(symbol, trade time ms, price, size) of a trade message; None for other events.

    Raises ValueError (msgspec errors are ValueErrors) for a malformed message.
    """
    env = _decoder.decode(message)
    if env.data is not None:
        trade = env.data
        kind, symbol, t, p, q = trade.e, trade.s, trade.T, trade.p, trade.q
    else:
        kind, symbol, t, p, q = env.e, env.s, env.T, env.p, env.q
    if kind != "trade":
        return None
    if symbol is None or t is None or p is None or q is None:
        raise ValueError("trade message without s, T, p or q")
    price, size = float(p), float(q)
    if not (price > 0.0 and size >= 0.0 and np.isfinite(price) and np.isfinite(size)):
        raise ValueError(f"trade with price {p!r} / size {q!r}")
    return symbol, t, price, size


@dataclass
class BinanceStats:
    trades: int = 0
    skipped: int = 0
    malformed: int = 0
    connects: int = 0


class BinanceTrades:
    def __init__(self, url: str, symbol_id: Callable[[str], int], max_failures: int = 10) -> None:
        assert max_failures >= 1
        self.url = url
        self.symbol_id = symbol_id
        self.max_failures = max_failures
        self.stats = BinanceStats()
        self._last_warning = 0.0

    async def run(self, push: Callable[[TickChunk], Awaitable[None]], stop: asyncio.Event) -> None:
        """Read trades until cancelled or `stop`; reconnect on any loss of the connection."""
        failures = 0  # consecutive connections that delivered nothing
        while not stop.is_set():
            received = 0
            try:
                async with connect(self.url, max_size=MAX_MESSAGE_BYTES, max_queue=MAX_QUEUE_FRAMES,
                                   open_timeout=10) as ws:
                    self.stats.connects += 1
                    log.info("connected", extra={"url": self.url})
                    async for message in ws:
                        received += 1
                        await self._handle(message, push)
                        if stop.is_set():
                            return
                reason = "closed by the server"
            except (OSError, WebSocketException, TimeoutError) as exc:
                reason = f"{type(exc).__name__}: {exc}"
            failures = 0 if received else failures + 1
            if failures >= self.max_failures:
                raise FeedGaveUp(f"{self.url}: {failures} connections in a row failed; last: {reason}")
            backoff = min(MAX_BACKOFF_S, 0.5 * 2 ** failures)
            log.warning("connection lost; reconnecting", extra={"reason": reason, "in_s": backoff})
            await _sleep_or_stop(stop, backoff)

    async def _handle(self, message: str | bytes, push: Callable[[TickChunk], Awaitable[None]]) -> None:
        try:
            trade = parse_trade(message)
        except ValueError as exc:
            self.stats.malformed += 1
            self._warn(f"malformed message skipped: {exc}")
            return
        if trade is None:
            self.stats.skipped += 1
            return
        symbol, t, price, size = trade
        self.stats.trades += 1
        await push(TickChunk(np.array([self.symbol_id(symbol)], np.int32), np.array([t], np.int64),
                             np.array([price]), np.array([size])))

    def _warn(self, text: str) -> None:
        now = time.monotonic()
        if now - self._last_warning >= WARN_EVERY_S:
            self._last_warning = now
            log.warning(text, extra={"malformed_total": self.stats.malformed})


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        pass
