"""Shared by the market tests (no tests here): market workers as child processes (through
tests/helpers/workers.py); deterministic tick batches; the reference engine run.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
import numpy as np
from aiokafka import AIOKafkaConsumer, TopicPartition

from agents.market import BatchResult, DictStore, MarketEngine
from ops.feeds.pipeline import TickBatcher, TickChunk, TickPublisher
from ops.feeds.simulator import SimConfig, Simulator
from ops.settings import Settings
from streams.codec import decode
from streams.events import DeadLetter
from streams.market import TickBatch
from streams.topics import TopicSpec, dlq_name, full_name
from tests.helpers import workers
from tests.helpers.workers import WorkerProcess, get_json

MarketWorker = WorkerProcess


async def start_worker(settings: Settings, *, wait_for_partitions: bool = True) -> WorkerProcess:
    """A market worker child process, returned once it holds market.ticks partitions (or
    at once, with wait_for_partitions=False: a second worker joining a group)."""
    async def ready(worker: WorkerProcess) -> bool:
        return not wait_for_partitions or bool(await owned_partitions(worker))

    return await workers.start_worker(settings, ["agents.market"], ready)


async def owned_partitions(worker: WorkerProcess) -> list[int] | None:
    """The market.ticks partitions this worker holds as active, or None while it holds none."""
    report = await get_json(worker.url + "/ops/")
    if not report:
        return None
    for table in report["tables"]:
        if table["name"] == "market.symbols":
            return table["active_partitions"] or None
    return None


# -- ticks --------------------------------------------------------------------------------------

@dataclass
class Ticks:
    """Deterministic tick batches of a simulated market, as the feed would publish them."""

    batches: list[TickBatch]
    symbols: tuple[str, ...]
    # symbol -> (source, seq of the last batch that carried it), per prefix of `batches`
    source: str = ""
    last_seq: dict[str, int] = field(default_factory=dict)

    def last_seq_after(self, n_batches: int) -> dict[str, int]:
        out: dict[str, int] = {}
        for batch in self.batches[:n_batches]:
            for s in batch.symbols:
                out[s] = batch.seq
        return out


def simulate(symbols: Sequence[str], *, seconds: float, rate: float, seed: int, n_partitions: int,
             batch_ms: float = 500.0, start_ms: int = 1_700_000_000_000) -> Ticks:
    """Simulator ticks closed into batches by event time (so the batches are reproducible)."""
    sim = Simulator(SimConfig(symbols=tuple(symbols), ticks_per_s=rate, seed=seed), start_ms=start_ms)
    batcher = TickBatcher(n_partitions, 4_096, batch_ms, source="test")
    ids = np.array([batcher.symbol_id(s) for s in symbols], dtype=np.int32)
    batches: list[TickBatch] = []
    for _ in range(int(seconds * 1000 / sim.config.step_ms)):
        sym, ts, price, size = sim.step()
        now = float(sim.t_ms)
        batcher.add(TickChunk(ids[sym], ts, price, size), now)
        batcher.close_due(now)
        batches.extend(batcher.ready)
        batcher.ready.clear()
    batcher.close_all()
    batches.extend(batcher.ready)
    return Ticks(batches, tuple(symbols), source=batcher.source)


async def publish(settings: Settings, batches: Sequence[TickBatch]) -> None:
    publisher = TickPublisher(settings, linger_ms=2)
    await publisher.start()
    try:
        for batch in batches:
            await publisher.publish(batch)
    finally:
        await publisher.stop()


@dataclass
class Reference:
    """What an uninterrupted single engine produces from the same batches."""

    store: DictStore
    results: list[BatchResult]

    @property
    def signals(self) -> list[Any]:
        return [s for r in self.results for s in r.signals]

    @property
    def outcomes(self) -> list[Any]:
        return [o for r in self.results for o in r.outcomes]


def reference(batches: Sequence[TickBatch], n_partitions: int) -> Reference:
    store = DictStore(n_partitions)
    engine = MarketEngine(store)
    results = [engine.process(b.partition, b.source, b.seq, b.columns()) for b in batches]
    return Reference(store, results)


def without_header(event: Any) -> dict[str, Any]:
    """An event as a dict without its per-emission header (id, ts_ms differ run to run)."""
    data = msgspec.to_builtins(event)
    for name in ("id", "ts_ms", "version"):
        data.pop(name, None)
    return data


async def read_topic(settings: Settings, spec: TopicSpec[Any], *, want: int | None = None,
                     quiet_s: float = 2.0, timeout_s: float = 60.0, dead_letters: bool = False) -> list[Any]:
    """Every event on a topic (or its dead letters), read from the beginning until `want`
    arrived (or it stayed quiet for quiet_s)."""
    topic = full_name(settings, dlq_name(spec.name) if dead_letters else spec.name)
    decode_value = (lambda v: decode(v, DeadLetter)) if dead_letters else spec.decode
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, enable_auto_commit=False,
                                auto_offset_reset="earliest")
    await consumer.start()
    try:
        consumer.assign([TopicPartition(topic, p) for p in range(spec.partition_count(settings))])
        await consumer.seek_to_beginning()
        got: list[Any] = []
        deadline = time.monotonic() + timeout_s
        last_new = time.monotonic()
        while time.monotonic() < deadline:
            records = await consumer.getmany(timeout_ms=300)
            for messages in records.values():
                got.extend(decode_value(m.value) for m in messages)
                last_new = time.monotonic() if messages else last_new
            if want is not None and len(got) >= want:
                break
            if want is None and time.monotonic() - last_new > quiet_s:
                break
        return got
    finally:
        await consumer.stop()
