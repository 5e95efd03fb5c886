"""Market REST and WebSocket on a real uvicorn server, PostgreSQL and Redis.

The data comes from the market engine itself (simulated ticks -> the same code the worker
runs), written with the worker's own writers: db.market for PostgreSQL, RedisFanout for
the Redis cache and PUBLISH. WebSocket updates then travel the real path: Redis pub/sub ->
Litestar channels plugin -> the session's queue -> the socket.
"""

from __future__ import annotations

import asyncio
import json
import math
import socket
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import httpx
import msgspec
import numpy as np
import pytest
import uvicorn
from redis.asyncio import Redis
from websockets.asyncio.client import ClientConnection, connect
from websockets.client import ClientProtocol
from websockets.exceptions import ConnectionClosed
from websockets.frames import Opcode
from websockets.protocol import State
from websockets.uri import parse_uri

from agents.market import BatchResult, DictStore, MarketEngine
from api import market_ws
from api.app import create_app
from db import market as db
from indicators.signals import STRATEGIES
from ops.embedded import EmbeddedStack, free_port
from ops.settings import Settings, load_settings
from services import market as live
from streams.market import Bar, TickBatch
from tables.market import performance_cells
from tests.conftest import TEMPLATE_DB, _db_url
from tests.helpers.auth import LoggedIn, register_and_login
from tests.integration.test_market_support import simulate

SYMBOLS = ("APIAAA", "APIBBB", "APICCC", "APIDDD")
N_PARTITIONS = 4
WS_TIMEOUT_S = 10.0


@dataclass
class Market:
    """The engine that produced the seeded data; `feed` runs more batches through it and
    writes their outputs exactly as the worker would."""

    engine: MarketEngine
    store: DictStore
    results: list[BatchResult]
    later: list[TickBatch]
    settings: Settings

    @property
    def signals(self) -> list[Any]:
        return [s for r in self.results for s in r.signals]

    @property
    def outcomes(self) -> list[Any]:
        return [o for r in self.results for o in r.outcomes]

    def bars(self, symbol: str, interval: str) -> list[Bar]:
        return [b for r in self.results for batch in r.bars for b in batch.rows()
                if b.symbol == symbol and b.interval == interval]

    async def feed(self, batches: list[TickBatch]) -> list[BatchResult]:
        results = [self.engine.process(b.partition, b.source, b.seq, b.columns()) for b in batches]
        await write(self.settings, results)
        self.results.extend(results)
        return results


async def write(settings: Settings, results: list[BatchResult]) -> None:
    conn = await asyncpg.connect(settings.database_url)
    try:
        from db.engine import _init_connection

        await _init_connection(conn)
        await db.insert_signals(conn, [s for r in results for s in r.signals])
        await db.insert_outcomes(conn, [o for r in results for o in r.outcomes])
        columns = [b.columns() for r in results for b in r.bars]
        await db.insert_bars(conn, columns)
        await db.upsert_instruments(conn, columns)
    finally:
        await conn.close()
    redis = Redis.from_url(settings.redis_url)
    try:
        batches = [r.fanout for r in results]
        for lo in range(0, len(batches), 64):
            await live.RedisFanout(redis).write(batches[lo:lo + 64])
    finally:
        await redis.aclose()


@pytest.fixture(scope="module")
def api_settings(stack: EmbeddedStack, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    name = f"market_api_{uuid.uuid4().hex[:8]}"

    async def create() -> None:
        admin = await asyncpg.connect(_db_url(stack, "postgres"))
        try:
            await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{TEMPLATE_DB}"')
        finally:
            await admin.close()
        redis = Redis.from_url(stack.redis_url.rsplit("/", 1)[0] + "/5")
        await redis.flushdb()
        await redis.aclose()

    asyncio.run(create())
    return load_settings(environ={}, env="test", data_dir=str(tmp_path_factory.mktemp("market-api")),
                         kafka_bootstrap=stack.kafka_bootstrap, database_url=_db_url(stack, name),
                         redis_url=stack.redis_url.rsplit("/", 1)[0] + "/5", topic_prefix=f"{name}.",
                         api_port=free_port(), feed_enabled=False)


@pytest.fixture(scope="module")
async def market(api_settings: Settings) -> Market:
    ticks = simulate(SYMBOLS, seconds=140, rate=240, seed=21, n_partitions=N_PARTITIONS)
    cut = len(ticks.batches) * 6 // 7
    store = DictStore(N_PARTITIONS)
    engine = MarketEngine(store)
    results = [engine.process(b.partition, b.source, b.seq, b.columns()) for b in ticks.batches[:cut]]
    await write(api_settings, results)
    return Market(engine, store, results, ticks.batches[cut:], api_settings)


@pytest.fixture(scope="module")
async def server(api_settings: Settings, market: Market) -> AsyncIterator[str]:
    config = uvicorn.Config(create_app(api_settings), host="127.0.0.1", port=api_settings.api_port,
                            lifespan="on", log_config=None, access_log=False)
    instance = uvicorn.Server(config)
    task = asyncio.create_task(instance.serve())
    while not instance.started:
        assert not task.done(), "uvicorn exited during start"
        await asyncio.sleep(0.05)
    try:
        yield f"127.0.0.1:{api_settings.api_port}"
    finally:
        instance.should_exit = True
        await task


@pytest.fixture(scope="module")
async def client(server: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=f"http://{server}", timeout=20) as c:
        yield c


@pytest.fixture(scope="module")
async def user(client: httpx.AsyncClient) -> LoggedIn:
    return await register_and_login(client)


def _problem(response: httpx.Response, status: int, slug: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["type"].endswith("/" + slug), body
    return body


# -- REST ------------------------------------------------------------------------------------------

async def test_rest_requires_login(client: httpx.AsyncClient) -> None:
    for path in ("/api/v1/market/symbols", "/api/v1/signals/live?symbols=APIAAA", "/api/v1/signals/history"):
        _problem(await client.get(path), 401, "unauthorized")


async def test_symbols_live_signals_and_unknown_symbols(client: httpx.AsyncClient, user: LoggedIn,
                                                         market: Market) -> None:
    body = (await client.get("/api/v1/market/symbols", headers=user.headers)).json()
    assert [s["symbol"] for s in body["symbols"]] == sorted(SYMBOLS)
    live_body = (await client.get("/api/v1/signals/live?symbols=APIAAA,APIBBB", headers=user.headers)).json()
    for item in live_body["signals"]:
        last = [s for s in market.signals if s.symbol == item["symbol"]]
        assert item["signal"] == (msgspec.to_builtins(live.SignalView.of(last[-1])) if last else None)
    assert [i["symbol"] for i in live_body["signals"]] == ["APIAAA", "APIBBB"]
    problem = _problem(await client.get("/api/v1/signals/live?symbols=APIAAA,NOSUCH", headers=user.headers),
                       404, "unknown-symbol")
    assert problem["symbols"] == ["NOSUCH"]
    _problem(await client.get("/api/v1/signals/live?symbols=A%20B", headers=user.headers), 422, "validation-error")
    _problem(await client.get("/api/v1/market/NOSUCH/indicators", headers=user.headers), 404, "unknown-symbol")


async def test_subscriptions_are_per_user_and_feed_live_signals(client: httpx.AsyncClient, user: LoggedIn) -> None:
    other = await register_and_login(client)
    h = user.headers
    assert (await client.get("/api/v1/signals/live", headers=h)).json() == {"signals": []}
    r = await client.post("/api/v1/signals/subscribe", json={"symbols": ["APIBBB", "APIAAA"]}, headers=h)
    assert r.status_code == 200 and r.json() == {"symbols": ["APIAAA", "APIBBB"]}
    r = await client.post("/api/v1/signals/subscribe", json={"symbols": ["APIBBB", "APICCC"]}, headers=h)
    assert r.json() == {"symbols": ["APIAAA", "APIBBB", "APICCC"]}
    _problem(await client.post("/api/v1/signals/subscribe", json={"symbols": ["NOSUCH"]}, headers=h),
             404, "unknown-symbol")
    _problem(await client.post("/api/v1/signals/subscribe", json={"symbols": []}, headers=h), 422, "validation-error")
    r = await client.delete("/api/v1/signals/subscribe?symbols=APIAAA", headers=h)
    assert r.status_code == 200 and r.json() == {"symbols": ["APIBBB", "APICCC"]}
    assert (await client.get("/api/v1/signals/subscriptions", headers=h)).json() == {"symbols": ["APIBBB", "APICCC"]}
    live_body = (await client.get("/api/v1/signals/live", headers=h)).json()
    assert [i["symbol"] for i in live_body["signals"]] == ["APIBBB", "APICCC"]
    assert (await client.get("/api/v1/signals/subscriptions", headers=other.headers)).json() == {"symbols": []}


async def test_history_pages_through_every_signal_newest_first(client: httpx.AsyncClient, user: LoggedIn,
                                                                market: Market) -> None:
    symbol = max(SYMBOLS, key=lambda s: sum(1 for x in market.signals if x.symbol == s))
    expected = sorted((s for s in market.signals if s.symbol == symbol),
                      key=lambda s: (s.signal_ts_ms, s.signal_id), reverse=True)
    assert len(expected) > 7
    seen: list[dict[str, Any]] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"symbol": symbol, "limit": 3, **({"cursor": cursor} if cursor else {})}
        page = (await client.get("/api/v1/signals/history", params=params, headers=user.headers)).json()
        seen.extend(page["signals"])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert [s["signal_id"] for s in seen] == [s.signal_id for s in expected]
    outcomes = {(o.signal_id, o.horizon_bars): o for o in market.outcomes}
    for record in seen:
        for o in record["outcomes"]:
            assert o == msgspec.to_builtins(live.OutcomeView.of(outcomes[(o["signal_id"], o["horizon_bars"])]))
    # A window [from, to): ISO and epoch ms forms.
    t_from, t_to = expected[-3].signal_ts_ms, expected[1].signal_ts_ms
    window = (await client.get("/api/v1/signals/history", headers=user.headers,
                               params={"symbol": symbol, "from": str(t_from), "to": str(t_to)})).json()
    assert {s["signal_id"] for s in window["signals"]} == {s.signal_id for s in expected if t_from <= s.signal_ts_ms < t_to}
    iso = np.datetime_as_string(np.datetime64(t_from, "ms")) + "Z"
    assert (await client.get("/api/v1/signals/history", headers=user.headers,
                             params={"symbol": symbol, "from": iso, "to": str(t_to)})).json() == window
    everything = (await client.get("/api/v1/signals/history?limit=500", headers=user.headers)).json()
    assert len(everything["signals"]) == len(market.signals) and everything["next_cursor"] is None
    for params in ({"cursor": "!!!"}, {"from": "yesterday"}, {"from": "5", "to": "5"}, {"limit": "0"}):
        _problem(await client.get("/api/v1/signals/history", params=params, headers=user.headers),
                 422, "validation-error")
    _problem(await client.get("/api/v1/signals/history?symbol=NOSUCH", headers=user.headers), 404, "unknown-symbol")


async def test_performance_equals_the_kernels_running_figures(client: httpx.AsyncClient, user: LoggedIn,
                                                               market: Market) -> None:
    rows = (await client.get("/api/v1/signals/performance", headers=user.headers)).json()["performance"]
    assert rows and sum(r["count"] for r in rows) == len(market.outcomes)
    engine = market.engine
    horizons = tuple(int(h) for h in engine.tracker.horizons)
    for row in rows:
        stream = engine.row_of[row["symbol"]] * engine.n_int + engine.interval_names.index(row["interval"])
        perf = engine.tracker.perf[stream].reshape(len(STRATEGIES), len(horizons), -1)
        cell = performance_cells(perf, horizons)[row["strategy"]][str(row["horizon_bars"])]
        for name in ("count", "hit_rate", "avg_return", "gross_profit", "gross_loss", "max_drawdown", "cum_return",
                     "profit_factor", "sharpe"):
            want, got = cell[name], row[name]
            assert (want is None and got is None) or math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-12), \
                (name, row, cell)
    strategy = rows[0]["strategy"]
    one = (await client.get("/api/v1/signals/performance", headers=user.headers,
                            params={"strategy": strategy, "horizon": 5, "symbol": rows[0]["symbol"]})).json()
    assert one["performance"] == [r for r in rows if r["strategy"] == strategy and r["horizon_bars"] == 5
                                  and r["symbol"] == rows[0]["symbol"]]
    for params in ({"strategy": "astrology"}, {"horizon": "0"}, {"interval": "2m"}):
        _problem(await client.get("/api/v1/signals/performance", params=params, headers=user.headers),
                 422, "validation-error")


async def test_bars_and_indicators(client: httpx.AsyncClient, user: LoggedIn, market: Market) -> None:
    symbol = SYMBOLS[0]
    minute = (await client.get(f"/api/v1/market/{symbol}/bars?interval=1m&limit=1000", headers=user.headers)).json()
    assert minute["bars"] == [msgspec.to_builtins(b) for b in market.bars(symbol, "1m")] and minute["bars"]
    second = (await client.get(f"/api/v1/market/{symbol}/bars?interval=1s&limit=30", headers=user.headers)).json()
    assert second["bars"] == [msgspec.to_builtins(b) for b in market.bars(symbol, "1s")[-30:]]
    for query in ("interval=2m", "limit=0", "limit=1001"):
        _problem(await client.get(f"/api/v1/market/{symbol}/bars?{query}", headers=user.headers), 422,
                 "validation-error")
    _problem(await client.get("/api/v1/market/NOSUCH/bars", headers=user.headers), 404, "unknown-symbol")
    body = (await client.get(f"/api/v1/market/{symbol}/indicators", headers=user.headers)).json()
    stream = market.engine.row_of[symbol] * market.engine.n_int
    values = market.engine.bank.values(stream)
    one_s = body["intervals"]["1s"]
    assert one_s["values"] == {k: (v if math.isfinite(v) else None) for k, v in values.items()}
    assert one_s["initialized"] and one_s["bars_seen"] == market.engine.bank.bar_count(stream)
    assert body["intervals"]["1m"]["initialized"] is False  # two minutes of data: still warming up


# -- WebSocket ---------------------------------------------------------------------------------------

async def ws_connect(server: str, token: str | None, **kwargs: Any) -> ClientConnection:
    query = f"?token={token}" if token else ""
    return await connect(f"ws://{server}{market_ws.PATH}{query}", open_timeout=WS_TIMEOUT_S, **kwargs)


async def recv(ws: ClientConnection, *, skip_heartbeats: bool = True) -> dict[str, Any]:
    while True:
        message = json.loads(await asyncio.wait_for(ws.recv(), WS_TIMEOUT_S))
        if not (skip_heartbeats and message["type"] == "heartbeat"):
            return message


async def test_websocket_rejects_missing_and_bad_tokens(server: str) -> None:
    for token in (None, "not-a-jwt"):
        ws = await ws_connect(server, token)
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), WS_TIMEOUT_S)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4401
        assert closed.value.rcvd.reason.startswith("unauthorized")


async def test_websocket_subscribe_snapshot_updates_heartbeat_errors_unsubscribe(
        server: str, user: LoggedIn, market: Market) -> None:
    async with await ws_connect(server, user.access_token) as ws:
        await ws.send(json.dumps({"op": "subscribe", "symbols": ["APIAAA", "APIBBB", "NOSUCH"]}))
        error = await recv(ws)
        assert error["type"] == "error" and error["code"] == "unknown_symbol" and error["symbols"] == ["NOSUCH"]
        ack = await recv(ws)
        assert ack == {"type": "ack", "op": "subscribe",
                       "subscriptions": {s: ["bars", "indicators", "signals"] for s in ("APIAAA", "APIBBB")}}
        snapshots = {m["symbol"]: m for m in [await recv(ws), await recv(ws)]}
        for symbol, snap in snapshots.items():
            assert snap["type"] == "snapshot" and snap["seq"] == market.store.symbol_state(symbol).seq  # type: ignore[union-attr]
            assert snap["bars"]["1s"][-1] == msgspec.to_builtins(market.bars(symbol, "1s")[-1])
            last = [s for s in market.signals if s.symbol == symbol]
            assert snap["signal"] == (msgspec.to_builtins(live.SignalView.of(last[-1])) if last else None)
            assert snap["indicators"]["1s"]["initialized"]
        # Errors are messages; the connection stays usable.
        for bad, code in (({"op": "dance"}, "unknown_op"), ("{not json", "bad_request"),
                          ({"op": "subscribe", "symbols": ["APIAAA"], "channels": ["gossip"]}, "unknown_channel")):
            await ws.send(bad if isinstance(bad, str) else json.dumps(bad))
            message = await recv(ws)
            assert message["type"] == "error" and message["code"] == code, message
        # Updates: every update of the fed batches, in order, numbered on from the snapshot.
        results = await market.feed(market.later[: len(market.later) // 2])
        expected = [u for r in results for u in r.fanout.updates if u.symbol in snapshots]
        assert any(isinstance(u, live.SignalUpdate) for u in expected) or len(expected) > 20
        got = [await recv(ws) for _ in expected]
        assert _by_symbol(got) == _by_symbol([msgspec.to_builtins(u) for u in expected])  # per symbol: in seq order
        for symbol, snap in snapshots.items():
            seqs = [m["seq"] for m in got if m["symbol"] == symbol]
            assert seqs == list(range(snap["seq"] + 1, snap["seq"] + 1 + len(seqs)))  # no gap, no repeat
        beat = await recv(ws, skip_heartbeats=False)
        while beat["type"] != "heartbeat":
            beat = await recv(ws, skip_heartbeats=False)
        assert beat["seq"] == {s: market.store.symbol_state(s).seq for s in snapshots}  # type: ignore[union-attr]
        # Unsubscribe: acked with the remaining list, and nothing of APIAAA follows.
        await ws.send(json.dumps({"op": "unsubscribe", "symbols": ["APIAAA"]}))
        ack = await recv(ws)
        assert ack == {"type": "ack", "op": "unsubscribe", "subscriptions": {"APIBBB": ["bars", "indicators", "signals"]}}
        results = await market.feed(market.later[len(market.later) // 2:])
        expected = [u for r in results for u in r.fanout.updates if u.symbol == "APIBBB"]
        assert expected
        got = [await recv(ws) for _ in expected]
        assert got == [msgspec.to_builtins(u) for u in expected]


def _by_symbol(messages: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for m in messages:
        out.setdefault(m["symbol"], []).append(m)
    return out


async def test_websocket_channel_filter(server: str, user: LoggedIn, market: Market) -> None:
    async with await ws_connect(server, user.access_token) as ws:
        await ws.send(json.dumps({"op": "subscribe", "symbols": ["APICCC"], "channels": ["bars"]}))
        assert (await recv(ws))["subscriptions"] == {"APICCC": ["bars"]}
        assert (await recv(ws))["type"] == "snapshot"
        after = max(p.max_event_ms for p in market.store.partitions.values()) + 1_000
        extra = simulate(("APICCC",), seconds=4, rate=60, seed=5, n_partitions=N_PARTITIONS, start_ms=after)
        results = await market.feed(extra.batches)
        updates = [u for r in results for u in r.fanout.updates if u.symbol == "APICCC"]
        expected = [u for u in updates if isinstance(u, live.BarsUpdate)]
        assert expected and len(expected) < len(updates)  # indicators (at least) are filtered out
        assert [await recv(ws) for _ in expected] == [msgspec.to_builtins(u) for u in expected]


class StalledClient:
    """A WebSocket client that can stop reading for real: a raw socket with a small receive
    buffer driven by websockets' sans-I/O protocol (the asyncio client keeps reading into
    memory whatever its max_queue), so TCP back-pressure reaches the server."""

    def __init__(self, server: str, token: str) -> None:
        host, port = server.split(":")
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.connect((host, int(port)))
        self.sock.setblocking(False)
        self.proto = ClientProtocol(parse_uri(f"ws://{server}{market_ws.PATH}?token={token}"), max_size=None)
        self.proto.send_request(self.proto.connect())
        self.messages: list[dict[str, Any]] = []

    async def flush(self) -> None:
        loop = asyncio.get_running_loop()
        for data in self.proto.data_to_send():
            if data:
                await loop.sock_sendall(self.sock, data)

    async def send(self, message: dict[str, Any]) -> None:
        self.proto.send_text(json.dumps(message).encode())
        await self.flush()

    async def read_until(self, done: Any, timeout_s: float = 30.0) -> None:
        """Read frames into `messages` until done(self) or the server closed."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not done(self) and self.proto.close_rcvd is None:
            data = await asyncio.wait_for(loop.sock_recv(self.sock, 1 << 16), max(0.1, deadline - loop.time()))
            self.proto.receive_data(data) if data else self.proto.receive_eof()
            for event in self.proto.events_received():
                if getattr(event, "opcode", None) == Opcode.TEXT:
                    self.messages.append(json.loads(event.data))
            await self.flush()
            if not data:
                break

    def close(self) -> None:
        self.sock.close()


async def test_slow_consumer_gets_latest_per_symbol_then_an_error_and_close(
        server: str, user: LoggedIn, api_settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(market_ws, "MAX_QUEUE", 16)
    monkeypatch.setattr(market_ws, "SLOW_CONSUMER_S", 0.5)
    client = StalledClient(server, user.access_token)
    try:
        await client.flush()
        await client.read_until(lambda c: c.proto.state is State.OPEN)
        await client.send({"op": "subscribe", "symbols": ["APIDDD"], "channels": ["bars"]})
        await client.read_until(lambda c: len(c.messages) >= 2)
        assert [m["type"] for m in client.messages] == ["ack", "snapshot"]
        redis = Redis.from_url(api_settings.redis_url)
        big = [Bar(symbol="APIDDD", interval="1s", open_ts_ms=i, open=1.0, high=1.0, low=1.0, close=1.0, volume=1.0,
                   n_ticks=1) for i in range(1_000)]
        n_updates = 200  # ~25 MB: more than the socket buffers hold, then the queue
        try:
            for seq in range(10**6, 10**6 + n_updates):
                await redis.publish(live.channel("APIDDD", "bars"),
                                    live.encode(live.BarsUpdate(symbol="APIDDD", seq=seq, event_ms=0, bars=big)))
                if seq % 10 == 0:
                    await asyncio.sleep(0.05)  # stay well inside Redis's pub/sub output buffer limit
        finally:
            await redis.aclose()
        await asyncio.sleep(1.0)
        # Now read everything: the backlog the socket held, the error, then the close.
        await client.read_until(lambda c: False)
        assert client.proto.close_rcvd is not None and client.proto.close_rcvd.code == market_ws.WS_SLOW_CONSUMER
        last = client.messages[-1]
        assert last["type"] == "error" and last["code"] == "slow_consumer"
        bars = [m for m in client.messages if m["type"] == "bars"]
        assert 0 < len(bars) < n_updates  # the client got some, and not every update
        seqs = [m["seq"] for m in bars]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    finally:
        client.close()
