"""`WS /ws/signals/stream`: live bars, indicators and signals per symbol.

Protocol (JSON text frames; docs/MARKET.md, "WebSocket"):

    client: {"op": "subscribe", "symbols": ["BTCUSD"], "channels": ["signals", "bars", "indicators"]}
    server: {"type": "ack", "op": "subscribe", "subscriptions": {"BTCUSD": ["bars", "indicators", "signals"]}}
            {"type": "snapshot", "symbol": "BTCUSD", "seq": 41, "bars": {...}, "indicators": {...}, "signal": ...}
            {"type": "bars" | "indicators" | "signal" | "outcome", "symbol": "BTCUSD", "seq": 42, ...}
            {"type": "heartbeat", "ts_ms": ..., "seq": {"BTCUSD": 42}}          (every second)
    client: {"op": "unsubscribe", "symbols": ["BTCUSD"]}     (optionally "channels": [...])
    server: {"type": "ack", "op": "unsubscribe", "subscriptions": {}}
    errors: {"type": "error", "code": "unknown_op" | "unknown_symbol" | "unknown_channel" |
             "bad_request" | "too_many_symbols" | "slow_consumer", "detail": ..., ...}

Authentication first (`?token=` or the `access_token` cookie; 4401 otherwise). Errors
are messages, the connection stays open, except `slow_consumer`, which is followed by a
close (1008).

Fan-out: one Litestar channels subscriber per Redis channel per API process (`Hub`), so an
update is decoded once per process however many clients follow the symbol; the hub puts
each symbol's updates back in seq order (they arrive on three channels) and hands the raw
payload to each interested session. Any API replica serves any client.

Per-session bounds: at most MAX_SYMBOLS symbols; an outbound queue of MAX_QUEUE messages.
When it is full, queued updates are coalesced to the latest per (symbol, kind) (a client
then sees a gap in `seq`); a client that stays behind for SLOW_CONSUMER_S, or whose queue
coalescing cannot shrink, gets `slow_consumer` and is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import msgspec
from litestar import WebSocket, websocket
from litestar.channels import ChannelsPlugin
from litestar.channels.subscriber import Subscriber
from litestar.exceptions import WebSocketDisconnect

from api.resources import Resources
from api.ws_auth import authenticate_websocket
from db import market as db
from services import market as live
from services.market import KINDS, UpdateHeader

log = logging.getLogger("fintide.api.market_ws")

PATH = "/ws/signals/stream"
MAX_SYMBOLS = 100
MAX_QUEUE = 256
SLOW_CONSUMER_S = 5.0
HEARTBEAT_S = 1.0
# A slow client still gets its error and close frame if it reads within this time.
CLOSE_TIMEOUT_S = 10.0
WS_SLOW_CONSUMER = 1008
MAX_MESSAGE_CHARS = 64 * 1024
# Headers of recent payloads, shared by every session of the process.
HEADER_CACHE = 4_096
# Out-of-order updates held per symbol while an earlier seq is missing (see Hub).
REORDER_MAX = 64
REORDER_WAIT_S = 0.2
KIND_OF_TYPE = {"bars": "bars", "indicators": "indicators", "signal": "signals", "outcome": "signals"}


class Op(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    op: str
    symbols: list[str] = []
    channels: list[str] | None = None


_op_decoder = msgspec.json.Decoder(Op)


# -- the per-process hub -------------------------------------------------------------------------

@dataclass
class _Order:
    """Restores one symbol's seq order across its three channels (each has its own pump)."""

    next_seq: int | None = None
    held: dict[int, tuple[str, UpdateHeader, bytes]] = field(default_factory=dict)
    held_since: float = 0.0


class Hub:
    """The channels subscriptions of every symbol some session of this process follows.

    A followed symbol's three channels are all subscribed (sessions filter kinds), so the
    hub sees every seq of the symbol and hands updates to sessions in seq order: each
    channel has its own pump, so arrivals interleave across channels. An update that
    arrives ahead of a missing seq waits up to REORDER_WAIT_S (or REORDER_MAX updates);
    then the gap is given up (the worker dropped that update) and delivery resumes.
    """

    def __init__(self, channels: ChannelsPlugin) -> None:
        self.channels = channels
        self.sessions: dict[str, set[Session]] = {}
        self.pumps: dict[str, tuple[Subscriber, asyncio.Task[None]]] = {}
        self.order: dict[str, _Order] = {}
        self.gaps = 0
        self._headers: dict[bytes, UpdateHeader] = {}
        self._lock = asyncio.Lock()
        self._sweeper: asyncio.Task[None] | None = None

    async def follow(self, session: Session, symbols: Iterable[str]) -> None:
        async with self._lock:
            if self._sweeper is None or self._sweeper.done():
                self._sweeper = asyncio.create_task(self._sweep())
            for symbol in symbols:
                members = self.sessions.setdefault(symbol, set())
                members.add(session)
                if len(members) == 1:
                    self.order[symbol] = _Order()
                    for kind in KINDS:
                        name = live.channel(symbol, kind)
                        subscriber = await self.channels.subscribe([name])
                        self.pumps[name] = (subscriber, asyncio.create_task(self._pump(kind, subscriber)))

    async def unfollow(self, session: Session, symbols: Iterable[str]) -> None:
        async with self._lock:
            for symbol in symbols:
                members = self.sessions.get(symbol)
                if members is None or session not in members:
                    continue
                members.discard(session)
                if members:
                    continue
                del self.sessions[symbol]
                del self.order[symbol]
                for kind in KINDS:
                    name = live.channel(symbol, kind)
                    subscriber, _task = self.pumps.pop(name)
                    # Ends the pump: the plugin puts a None sentinel in the subscriber's stream.
                    await self.channels.unsubscribe(subscriber, [name])

    async def _pump(self, kind: str, subscriber: Subscriber) -> None:
        async for payload in subscriber.iter_events():
            header = self._header(payload)
            if header is not None:
                self._arrive(kind, header, payload)

    def _arrive(self, kind: str, header: UpdateHeader, payload: bytes) -> None:
        order = self.order.get(header.symbol)
        if order is None:
            return
        if order.next_seq is None or header.seq == order.next_seq:
            self._dispatch(order, kind, header, payload)
            self._release(order)
        elif header.seq > order.next_seq:
            if not order.held:
                order.held_since = time.monotonic()
            order.held[header.seq] = (kind, header, payload)
            if len(order.held) > REORDER_MAX:
                self._skip_gap(order)
        # else: older than what was delivered (a replay): sessions have moved past it.

    def _dispatch(self, order: _Order, kind: str, header: UpdateHeader, payload: bytes) -> None:
        order.next_seq = header.seq + 1
        for session in tuple(self.sessions.get(header.symbol, ())):
            session.deliver(kind, header, payload)

    def _release(self, order: _Order) -> None:
        while order.next_seq in order.held:
            self._dispatch(order, *order.held.pop(order.next_seq))
        if order.held:
            order.held_since = time.monotonic()

    def _skip_gap(self, order: _Order) -> None:
        self.gaps += 1
        order.next_seq = min(order.held)
        self._release(order)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(REORDER_WAIT_S / 2)
            now = time.monotonic()
            for order in list(self.order.values()):
                if order.held and now - order.held_since > REORDER_WAIT_S:
                    self._skip_gap(order)

    def _header(self, payload: bytes) -> UpdateHeader | None:
        header = self._headers.get(payload)
        if header is None:
            try:
                header = live.decode_header(payload)
            except msgspec.DecodeError:
                log.warning("undecodable market update on the fan-out channel dropped")
                return None
            if len(self._headers) >= HEADER_CACHE:
                self._headers.clear()
            self._headers[payload] = header
        return header


def hub_for(socket: WebSocket[Any, Any, Any], channels: ChannelsPlugin) -> Hub:
    state = socket.app.state
    hub = getattr(state, "market_hub", None)
    if hub is None or hub.channels is not channels:
        hub = Hub(channels)
        state.market_hub = hub
    return hub


# -- the outbound queue ------------------------------------------------------------------------------

class SlowConsumer(Exception):
    pass


class Outbox:
    """A bounded FIFO of frames. Updates carry a key (symbol, kind); at the bound the queue
    keeps only the latest frame per key; a client that stays behind gets SlowConsumer."""

    def __init__(self, max_frames: int = MAX_QUEUE, slow_after_s: float = SLOW_CONSUMER_S) -> None:
        self.max_frames = max_frames
        self.slow_after_s = slow_after_s
        self._frames: deque[tuple[tuple[str, str] | None, str | bytes]] = deque()
        self._ready = asyncio.Event()
        self.behind_since: float | None = None
        self.coalesced = 0

    def __len__(self) -> int:
        return len(self._frames)

    def put(self, frame: str | bytes, key: tuple[str, str] | None = None) -> None:
        """Queue a frame; raises SlowConsumer when the client cannot keep up."""
        if len(self._frames) >= self.max_frames:
            self._coalesce()
            now = time.monotonic()
            if self.behind_since is None:
                self.behind_since = now
            if len(self._frames) >= self.max_frames or now - self.behind_since > self.slow_after_s:
                raise SlowConsumer(f"{len(self._frames)} frames queued, behind for {now - self.behind_since:.1f} s")
        self._frames.append((key, frame))
        self._ready.set()

    def _coalesce(self) -> None:
        latest: dict[tuple[str, str], int] = {}
        for i, (key, _) in enumerate(self._frames):
            if key is not None:
                latest[key] = i
        kept = deque(f for i, f in enumerate(self._frames) if f[0] is None or latest[f[0]] == i)
        self.coalesced += len(self._frames) - len(kept)
        self._frames = kept

    def drop(self, keys: set[tuple[str, str]]) -> None:
        self._frames = deque(f for f in self._frames if f[0] not in keys)

    async def get(self) -> str | bytes:
        while not self._frames:
            self._ready.clear()
            await self._ready.wait()
        frame = self._frames.popleft()[1]
        if self.behind_since is not None and len(self._frames) < self.max_frames // 2:
            self.behind_since = None  # caught up
        return frame


# -- one connection ----------------------------------------------------------------------------------

def _frame(kind: str, **fields: Any) -> bytes:
    return msgspec.json.encode({"type": kind, **fields})


class Session:
    def __init__(self, socket: WebSocket[Any, Any, Any], hub: Hub, resources: Resources) -> None:
        self.socket = socket
        self.hub = hub
        self.resources = resources
        self.subscriptions: dict[str, set[str]] = {}
        self.outbox = Outbox(MAX_QUEUE, SLOW_CONSUMER_S)
        # Per symbol: the snapshot's seq (older updates are dropped) and the latest seq seen.
        self.snapshot_seq: dict[str, int] = {}
        self.last_seq: dict[str, int] = {}
        # Updates that arrive while a symbol's snapshot is being read; bounded by MAX_QUEUE.
        self.held: dict[str, list[tuple[str, UpdateHeader, bytes]]] = {}
        self.slow = asyncio.Event()

    # fan-out side (sync: called by the hub for every update)
    def deliver(self, kind: str, header: UpdateHeader, payload: bytes) -> None:
        symbol = header.symbol
        kinds = self.subscriptions.get(symbol)
        if kinds is None:
            return
        # Every update of the symbol counts for the heartbeat, followed kind or not, so a
        # client can tell "nothing happened" from "I missed something".
        self.last_seq[symbol] = max(self.last_seq.get(symbol, 0), header.seq)
        if kind not in kinds:
            return
        held = self.held.get(symbol)
        if held is not None:
            if len(held) < MAX_QUEUE:
                held.append((kind, header, payload))
            return
        if header.seq <= self.snapshot_seq.get(symbol, 0):
            return
        self._put(payload, (symbol, KIND_OF_TYPE.get(header.type, kind)))

    def _put(self, frame: str | bytes, key: tuple[str, str] | None = None) -> None:
        if self.slow.is_set():
            return
        try:
            self.outbox.put(frame, key)
        except SlowConsumer as exc:
            log.info("slow WebSocket consumer closed: %s", exc)
            self.slow.set()

    # connection side
    async def run(self) -> None:
        sender = asyncio.create_task(self._send_loop())
        beat = asyncio.create_task(self._heartbeats())
        receiver = asyncio.create_task(self._receive_loop())
        slow = asyncio.create_task(self.slow.wait())
        try:
            done, _ = await asyncio.wait({sender, receiver, slow}, return_when=asyncio.FIRST_COMPLETED)
            if slow in done:
                sender.cancel()
                await self._close_slow()
        finally:
            for task in (sender, beat, receiver, slow):
                task.cancel()
            await asyncio.gather(sender, beat, receiver, slow, return_exceptions=True)
            await self.hub.unfollow(self, list(self.subscriptions))

    async def _send_loop(self) -> None:
        while True:
            frame = await self.outbox.get()
            await self.socket.send_data(frame)

    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            seq = {s: self.last_seq.get(s, self.snapshot_seq.get(s, 0)) for s in self.subscriptions}
            self._put(_frame("heartbeat", ts_ms=live.now_ms(), seq=seq), ("", "heartbeat"))

    async def _receive_loop(self) -> None:
        try:
            while True:
                text = await self.socket.receive_text()
                await self._handle(text)
        except WebSocketDisconnect:
            return

    async def _close_slow(self) -> None:
        """Tell the client why, then close; give up on a client that does not read at all."""
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.socket.send_data(_frame("error", code="slow_consumer",
                                                                detail="the client did not keep up; closing")),
                                   CLOSE_TIMEOUT_S)
            await asyncio.wait_for(self.socket.close(WS_SLOW_CONSUMER, "slow_consumer"), CLOSE_TIMEOUT_S)

    # ops
    async def _handle(self, text: str) -> None:
        if len(text) > MAX_MESSAGE_CHARS:
            self._error("bad_request", f"messages are at most {MAX_MESSAGE_CHARS} characters")
            return
        try:
            op = _op_decoder.decode(text)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            self._error("bad_request", str(exc))
            return
        if op.op not in ("subscribe", "unsubscribe"):
            self._error("unknown_op", f"unknown op {op.op!r}; use subscribe or unsubscribe", op=op.op)
            return
        kinds = set(op.channels) if op.channels is not None else set(KINDS)
        unknown_kinds = sorted(kinds - set(KINDS))
        if unknown_kinds or not kinds:
            self._error("unknown_channel", f"channels are {list(KINDS)}", channels=unknown_kinds)
            return
        try:
            live.check_symbols(op.symbols)
        except live.BadParameter as exc:
            self._error("bad_request", str(exc))
            return
        if op.op == "subscribe":
            await self._subscribe(list(dict.fromkeys(op.symbols)), kinds)
        else:
            await self._unsubscribe(list(dict.fromkeys(op.symbols)), kinds if op.channels is not None else None)

    async def _subscribe(self, symbols: list[str], kinds: set[str]) -> None:
        known = await known_symbols(self.resources, symbols)
        unknown = [s for s in symbols if s not in known]
        if unknown:
            self._error("unknown_symbol", "no market data for these symbols", symbols=unknown)
        wanted = [s for s in symbols if s in known]
        if len(set(self.subscriptions) | set(wanted)) > MAX_SYMBOLS:
            self._error("too_many_symbols", f"at most {MAX_SYMBOLS} symbols per connection")
            return
        new = [s for s in wanted if s not in self.subscriptions]
        for s in new:
            self.held[s] = []
        for s in wanted:
            self.subscriptions.setdefault(s, set()).update(kinds)
        # Follow before reading snapshots, so no update falls between the two.
        await self.hub.follow(self, new)
        self._ack("subscribe")
        for s in new:
            await self._snapshot(s)

    async def _snapshot(self, symbol: str) -> None:
        snap = await live.snapshot(self.resources.redis, symbol)
        self.snapshot_seq[symbol] = snap.seq
        self.last_seq[symbol] = max(self.last_seq.get(symbol, 0), snap.seq)
        self._put(live.encode(snap))
        for kind, header, payload in self.held.pop(symbol, []):
            if header.seq > snap.seq and kind in self.subscriptions.get(symbol, ()):
                self._put(payload, (symbol, KIND_OF_TYPE.get(header.type, kind)))

    async def _unsubscribe(self, symbols: list[str], kinds: set[str] | None) -> None:
        removed: dict[str, set[str]] = {}
        dropped: list[str] = []
        for s in symbols:
            current = self.subscriptions.get(s)
            if current is None:
                continue
            gone = current & kinds if kinds is not None else set(current)
            current -= gone
            removed[s] = gone
            if not current:
                dropped.append(s)
                del self.subscriptions[s]
                self.snapshot_seq.pop(s, None)
                self.last_seq.pop(s, None)
                self.held.pop(s, None)
        await self.hub.unfollow(self, dropped)
        # Nothing of an unsubscribed channel follows the ack.
        self.outbox.drop({(s, k) for s, gone in removed.items() for k in gone})
        self._ack("unsubscribe")

    def _ack(self, op: str) -> None:
        subs = {s: sorted(kinds) for s, kinds in sorted(self.subscriptions.items())}
        self._put(_frame("ack", op=op, subscriptions=subs))

    def _error(self, code: str, detail: str, **fields: Any) -> None:
        self._put(_frame("error", code=code, detail=detail, **fields))


async def known_symbols(resources: Resources, symbols: list[str]) -> set[str]:
    """Symbols with market data: the agent's Redis set, then PostgreSQL for the rest."""
    known = await live.cached_symbols(resources.redis, symbols)
    missing = [s for s in symbols if s not in known]
    if missing:
        async with (await resources.pool("market")).acquire() as conn:
            known |= await db.known_symbols(conn, missing)
    return known


@websocket(PATH)
async def signal_stream(socket: WebSocket[Any, Any, Any], channels: ChannelsPlugin, resources: Resources) -> None:
    """Live market updates; see the module docstring for the protocol."""
    await authenticate_websocket(socket)
    await socket.accept()
    session = Session(socket, hub_for(socket, channels), resources)
    await session.run()
