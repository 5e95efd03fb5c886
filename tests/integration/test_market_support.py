"""Shared by the market tests (no tests here): market workers as child processes, exactly
as `fintide worker` runs them; deterministic tick batches; the reference engine run.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
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
from streams.worker import web_url_path

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
T = TypeVar("T")


@dataclass
class MarketWorker:
    settings: Settings
    proc: subprocess.Popen[bytes]
    log_path: Path
    url: str = ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> int:
        """SIGTERM, as an orchestrator would; kill the group only if it hangs."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
                raise AssertionError(f"worker ignored SIGTERM for {STOP_TIMEOUT_S} s:\n{self.log_tail()}") from None
        return self.proc.returncode


def worker_env(settings: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FINTIDE_")}
    env.update({
        "FINTIDE_ENV": "test", "FINTIDE_LOG_LEVEL": "INFO",
        "FINTIDE_KAFKA_BOOTSTRAP": settings.kafka_bootstrap, "FINTIDE_DATA_DIR": settings.data_dir,
        "FINTIDE_TOPIC_PREFIX": settings.topic_prefix, "FINTIDE_APP_ID": settings.app_id,
        "FINTIDE_WORKER_ID": settings.worker_id, "FINTIDE_WORKER_WEB_PORT": "0",
        "FINTIDE_DATABASE_URL": settings.database_url, "FINTIDE_REDIS_URL": settings.redis_url,
    })
    return env


def spawn_worker(settings: Settings) -> MarketWorker:
    log_path = Path(settings.data_dir) / f"{settings.worker_id}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "streams.worker", "--agents", "agents.market"],
                                cwd=REPO, env=worker_env(settings), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    return MarketWorker(settings, proc, log_path)


async def start_worker(settings: Settings, *, wait_for_partitions: bool = True) -> MarketWorker:
    worker = spawn_worker(settings)
    try:
        worker.url = await wait_for(lambda: _read_url(worker), START_TIMEOUT_S, "web.url")
        if wait_for_partitions:
            await wait_for(lambda: owned_partitions(worker), START_TIMEOUT_S, "partition assignment")
    except BaseException:
        worker.proc.kill()
        worker.proc.wait(5)
        raise
    return worker


async def _read_url(worker: MarketWorker) -> str | None:
    assert worker.alive(), f"worker exited with {worker.proc.returncode}:\n{worker.log_tail()}"
    path = web_url_path(worker.settings)
    return path.read_text().strip() if path.exists() else None


async def owned_partitions(worker: MarketWorker) -> list[int] | None:
    """The market.ticks partitions this worker holds as active, or None while it holds none."""
    report = await get_json(worker.url + "/ops/")
    if not report:
        return None
    for table in report["tables"]:
        if table["name"] == "market.symbols":
            return table["active_partitions"] or None
    return None


async def wait_for(probe: Callable[[], Awaitable[T | None]], timeout_s: float, what: str) -> T:
    deadline = time.monotonic() + timeout_s
    while True:
        result = await probe()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.2)


async def get_json(url: str) -> Any:
    async with httpx.AsyncClient(timeout=10) as client:
        try:
            response = await client.get(url)
        except httpx.TransportError:
            return None
    return response.json() if response.status_code == 200 else None


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
