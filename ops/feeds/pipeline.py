"""Tick batching and publishing for every feed source.

Flow: a source pushes `TickChunk`s -> `TickBatcher` appends them to one open batch per
partition group and closes a batch when it holds `max_ticks` ticks or its oldest tick has
waited `max_age_ms` -> closed batches queue up in close order -> one publisher task sends
them to `market.ticks`, explicitly to their partition.

Bounds: each open batch has a fixed capacity (`max_ticks`); the closed-batch queue holds
at most `max_ready` batches, and `FeedPipeline.push` waits while it is full (so a fast
source slows down rather than grows memory); at most `max_in_flight` sends await broker
acknowledgement. One publisher task and synchronous closing keep every partition's
batches in close order, so a symbol's ticks reach Kafka in the order the source gave them.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
from aiokafka import AIOKafkaProducer

from ops.settings import Settings
from streams.market import (
    MAX_BATCH_TICKS,
    MAX_SYMBOL_LEN,
    TICKS,
    TickBatch,
    encode_ticks,
    partition_for_symbol,
    tick_batch,
)
from streams.topics import bootstrap_servers, ensure_topics, full_name

log = logging.getLogger("fintide.feed")

MAX_SYMBOLS = 100_000
START_TIMEOUT_S = 15.0


class TickChunk(NamedTuple):
    """Ticks from a source: feed-wide symbol ids (TickBatcher.symbol_id) and columns."""

    sym: np.ndarray  # int32
    ts_ms: np.ndarray  # int64, event time
    price: np.ndarray  # float64
    size: np.ndarray  # float64


def now_ms() -> float:
    return time.time() * 1000.0


@dataclass
class _OpenBatch:
    capacity: int
    sym: np.ndarray = field(init=False)
    ts_ms: np.ndarray = field(init=False)
    price: np.ndarray = field(init=False)
    size: np.ndarray = field(init=False)
    n: int = 0
    opened_ms: float = 0.0
    seq: int = 0

    def __post_init__(self) -> None:
        self.sym = np.empty(self.capacity, np.int32)
        self.ts_ms = np.empty(self.capacity, np.int64)
        self.price = np.empty(self.capacity, np.float64)
        self.size = np.empty(self.capacity, np.float64)


class TickBatcher:
    """One open batch per partition group; closed batches wait in `ready` (FIFO)."""

    def __init__(self, n_partitions: int, max_ticks: int = 4_096, max_age_ms: float = 50.0,
                 source: str = "feed") -> None:
        if not 1 <= max_ticks <= MAX_BATCH_TICKS:
            raise ValueError(f"batch ticks must be in [1, {MAX_BATCH_TICKS}], got {max_ticks}")
        if not max_age_ms > 0:
            raise ValueError("batch age must be > 0 ms")
        assert n_partitions >= 1, n_partitions
        self.n_partitions = n_partitions
        self.max_ticks = max_ticks
        self.max_age_ms = max_age_ms
        # A feed instance id: consumers dedupe re-delivered batches by (source, partition, seq).
        self.source = f"{source}-{uuid.uuid4().hex[:8]}"
        self.symbols: list[str] = []
        self._ids: dict[str, int] = {}
        self._partitions: list[int] = []
        self._partition_of = np.empty(0, np.int32)  # cache of _partitions for vector look-ups
        self._open = [_OpenBatch(max_ticks) for _ in range(n_partitions)]
        self.ready: deque[TickBatch] = deque()
        self.ticks_in = 0

    def symbol_id(self, name: str) -> int:
        """The feed-wide id of `name`, registering it (and its partition) on first use."""
        sid = self._ids.get(name)
        if sid is not None:
            return sid
        if not name or len(name) > MAX_SYMBOL_LEN:
            raise ValueError(f"symbol {name!r} must be 1..{MAX_SYMBOL_LEN} characters")
        if len(self.symbols) >= MAX_SYMBOLS:
            raise ValueError(f"more than {MAX_SYMBOLS} symbols")
        sid = len(self.symbols)
        self.symbols.append(name)
        self._ids[name] = sid
        self._partitions.append(partition_for_symbol(name, self.n_partitions))
        return sid

    def partition_of(self, name: str) -> int:
        return self._partitions[self.symbol_id(name)]

    def add(self, chunk: TickChunk, at_ms: float) -> None:
        """Append ticks (grouped by partition, order kept within a group)."""
        n = int(chunk.sym.shape[0])
        if n == 0:
            return
        self.ticks_in += n
        if self.n_partitions == 1:
            self._append(0, chunk, np.arange(n), at_ms)
            return
        if self._partition_of.shape[0] != len(self._partitions):
            self._partition_of = np.array(self._partitions, dtype=np.int32)
        part = self._partition_of[chunk.sym]
        order = np.argsort(part, kind="stable")
        counts = np.bincount(part, minlength=self.n_partitions)
        lo = 0
        for p in np.flatnonzero(counts):
            hi = lo + int(counts[p])
            self._append(int(p), chunk, order[lo:hi], at_ms)
            lo = hi

    def _append(self, p: int, chunk: TickChunk, idx: np.ndarray, at_ms: float) -> None:
        batch = self._open[p]
        done = 0
        while done < idx.shape[0]:
            if batch.n == 0:
                batch.opened_ms = at_ms
            take = min(batch.capacity - batch.n, idx.shape[0] - done)
            part = idx[done:done + take]
            end = batch.n + take
            batch.sym[batch.n:end] = chunk.sym[part]
            batch.ts_ms[batch.n:end] = chunk.ts_ms[part]
            batch.price[batch.n:end] = chunk.price[part]
            batch.size[batch.n:end] = chunk.size[part]
            batch.n = end
            done += take
            if batch.n == batch.capacity:
                self._close(p)

    def close_due(self, at_ms: float) -> None:
        """Close every batch whose oldest tick has waited max_age_ms."""
        for p, batch in enumerate(self._open):
            if batch.n and at_ms - batch.opened_ms >= self.max_age_ms:
                self._close(p)

    def close_all(self) -> None:
        for p, batch in enumerate(self._open):
            if batch.n:
                self._close(p)

    def _close(self, p: int) -> None:
        batch = self._open[p]
        n = batch.n
        # The message carries only the symbols it uses, re-numbered 0..k-1.
        used, local = np.unique(batch.sym[:n], return_inverse=True)
        self.ready.append(tick_batch(partition=p, source=self.source, seq=batch.seq,
                                     symbols=[self.symbols[i] for i in used], sym=local.astype(np.int32),
                                     ts_ms=batch.ts_ms[:n], price=batch.price[:n], size=batch.size[:n]))
        batch.seq += 1
        batch.n = 0


class TickPublisher:
    """Sends TickBatches to `market.ticks`, each to its partition, keyed by its first symbol."""

    def __init__(self, settings: Settings, *, linger_ms: int = 5, max_in_flight: int = 64,
                 compression: str | None = None) -> None:
        self.settings = settings
        self.topic = full_name(settings, TICKS.name)
        self.max_in_flight = max_in_flight
        self._producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap_servers(settings), client_id="fintide-feed", acks="all",
            linger_ms=linger_ms, compression_type=compression,
            # One batch message is < 1 MiB (MAX_BATCH_TICKS); leave Kafka's limits alone.
            max_batch_size=1 << 20, max_request_size=1 << 20)
        self._in_flight: deque[asyncio.Future[object]] = deque()
        self.batches_out = 0
        self.ticks_out = 0
        self.bytes_out = 0

    async def start(self) -> int:
        """Create the topic if needed, connect; returns its partition count."""
        await ensure_topics(self.settings, [TICKS])
        await asyncio.wait_for(self._producer.start(), START_TIMEOUT_S)
        partitions = await self._producer.partitions_for(self.topic)
        return len(partitions)

    async def publish(self, batch: TickBatch) -> None:
        value = encode_ticks(batch)
        future = await self._producer.send(self.topic, value=value, key=TICKS.message_key(batch.key, batch),
                                           partition=batch.partition)
        self._in_flight.append(future)
        self.batches_out += 1
        self.ticks_out += batch.count
        self.bytes_out += len(value)
        while len(self._in_flight) > self.max_in_flight:
            await self._in_flight.popleft()

    async def stop(self) -> None:
        try:
            while self._in_flight:
                await self._in_flight.popleft()
        finally:
            # stop() flushes whatever the producer still holds.
            await self._producer.stop()


class FeedPipeline:
    """Joins a batcher and a publisher: `push` from sources, `run` publishes until stopped."""

    def __init__(self, batcher: TickBatcher, publisher: TickPublisher, *, max_ready: int = 64) -> None:
        assert max_ready >= 1
        self.batcher = batcher
        self.publisher = publisher
        self.max_ready = max_ready
        self._wake = asyncio.Event()
        self._space = asyncio.Event()
        self._space.set()
        self._closed = False

    async def push(self, chunk: TickChunk) -> None:
        """Add ticks; waits while max_ready closed batches are queued (back-pressure)."""
        assert not self._closed, "push after close"
        while len(self.batcher.ready) >= self.max_ready:
            self._space.clear()
            await self._space.wait()
        self.batcher.add(chunk, now_ms())
        if self.batcher.ready:
            self._wake.set()

    async def run(self) -> None:
        """Publish closed batches in order; close batches by age; return after close()."""
        ticker = asyncio.create_task(self._tick())
        try:
            while True:
                while self.batcher.ready:
                    await self.publisher.publish(self.batcher.ready.popleft())
                    self._space.set()
                if self._closed:
                    return
                self._wake.clear()
                await self._wake.wait()
        finally:
            ticker.cancel()

    def close(self) -> None:
        """No more ticks: close every open batch; `run` returns once they are sent."""
        self._closed = True
        self.batcher.close_all()
        self._wake.set()

    async def _tick(self) -> None:
        # Check ages a few times per max_age so a batch waits at most ~1.25 x max_age.
        period_s = max(0.001, self.batcher.max_age_ms / 4000.0)
        while True:
            await asyncio.sleep(period_s)
            self.batcher.close_due(now_ms())
            if self.batcher.ready:
                self._wake.set()
