"""Helpers for the fraud integration tests: module-scoped settings on the session's real
servers, fraud worker child processes, the API on uvicorn, and a decision reader.

Workers and the decision reader use a 5 ms Kafka fetch wait: the embedded broker (Tansu)
does not answer a waiting fetch when data arrives but holds it for the whole wait (see
docs/FRAUD.md, "Latency on the embedded broker"), so the wait is paid per hop. Nothing the
tests assert depends on it; only how long they take.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import asyncpg
import uvicorn
from aiokafka import AIOKafkaConsumer

from ops.embedded import EmbeddedStack, free_port
from ops.settings import Settings, load_settings
from streams.fraud import DECISIONS, RiskDecided, ScoreRequested, decisions_of
from streams.publisher import EventPublisher
from streams.topics import bootstrap_servers, full_name
from tests.conftest import TEMPLATE_DB, _db_url
from tests.helpers import workers
from tests.helpers.workers import WorkerProcess, get_json, wait_for

START_TIMEOUT_S = 120.0
TEST_FETCH_MAX_WAIT_MS = 5


def module_settings(stack: EmbeddedStack, data_dir: Path, name: str, redis_db: int) -> Settings:
    """Settings with their own database (cloned from the migrated template), topic
    prefix, Redis database and data dir, for one test module."""
    db_name = f"{name}_{uuid.uuid4().hex[:8]}"

    async def create() -> None:
        admin = await asyncpg.connect(_db_url(stack, "postgres"))
        try:
            await admin.execute(f'CREATE DATABASE "{db_name}" TEMPLATE "{TEMPLATE_DB}"')
        finally:
            await admin.close()

    asyncio.run(create())
    return load_settings(environ={}, env="test", data_dir=str(data_dir), kafka_bootstrap=stack.kafka_bootstrap,
                         database_url=_db_url(stack, db_name),
                         redis_url=stack.redis_url.rsplit("/", 1)[0] + f"/{redis_db}",
                         topic_prefix=f"{db_name}.", app_id=f"fintide-{db_name}", worker_web_port=0,
                         api_port=free_port(), feed_enabled=False, fraud_scorer="model",
                         broker_fetch_max_wait_ms=TEST_FETCH_MAX_WAIT_MS)


# ----------------------------------------------------------------------------- workers

FraudWorker = WorkerProcess
FRAUD_ENV_FIELDS = ("fraud_scorer", "fraud_budget_ms", "fraud_fail_open_limit_minor", "broker_fetch_max_wait_ms")


async def start_worker(settings: Settings, agents: str = "agents.fraud",
                       ready: Callable[[WorkerProcess], Awaitable[bool]] | None = None) -> WorkerProcess:
    """A worker child process running `agents`, returned once `ready` (default: it owns
    fraud table partitions and has loaded the rules)."""
    return await workers.start_worker(settings, agents.split(","), ready or _ready, env_fields=FRAUD_ENV_FIELDS,
                                      timeout_s=START_TIMEOUT_S)


async def _ready(worker: FraudWorker) -> bool:
    assert worker.proc.poll() is None, f"worker exited with {worker.proc.returncode}:\n{worker.log_tail()}"
    status = await get_json(f"{worker.url}/fraud/status")
    report = await get_json(f"{worker.url}/ops/")
    if not status or status["rules_version"] is None or not report:
        return False
    tables = {t["name"]: t for t in report["tables"]}
    return bool(tables.get("fraud.payer_features", {}).get("active_partitions"))


# ----------------------------------------------------------------------------- API

async def serve_api(settings: Settings) -> AsyncIterator[str]:
    from api.app import create_app

    config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=settings.api_port, lifespan="on",
                            log_config=None, access_log=False)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        assert not task.done(), "uvicorn exited during start"
        await asyncio.sleep(0.05)
    try:
        yield f"127.0.0.1:{settings.api_port}"
    finally:
        server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(task), 10)
        except TimeoutError:  # a connection that will not close must not hang the session
            server.force_exit = True
            await asyncio.wait_for(task, 10)


# ----------------------------------------------------------------------------- Kafka

def request(payer: str, payee: str, amount_minor: int, *, ts_ms: int, payment_id: str | None = None,
            device: str = "dev-1", ip: str = "10.0.0.1", country: str = "IN", failed: int = 0) -> ScoreRequested:
    return ScoreRequested(payment_id=payment_id or f"pay-{uuid.uuid4().hex[:12]}", payer_user_id=f"user-{payer}",
                          payer_wallet_id=payer, payee_wallet_id=payee, amount_minor=amount_minor, currency="INR",
                          device_id=device, ip=ip, country=country, failed_attempts=failed, ts_ms=ts_ms)


class Decisions:
    """Reads fraud.decisions from where it was when created; keeps every decision."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.seen: list[RiskDecided] = []
        self._consumer: AIOKafkaConsumer | None = None

    async def __aenter__(self) -> Decisions:
        self._consumer = AIOKafkaConsumer(full_name(self.settings, DECISIONS.name),
                                          bootstrap_servers=bootstrap_servers(self.settings),
                                          auto_offset_reset="latest", enable_auto_commit=False,
                                          fetch_max_wait_ms=TEST_FETCH_MAX_WAIT_MS)
        await self._consumer.start()
        await wait_for(self._assigned, 60, "decision partitions")
        await self._consumer.seek_to_end()
        for tp in self._consumer.assignment():
            await self._consumer.position(tp)
        return self

    async def _assigned(self) -> bool:
        assert self._consumer is not None
        return bool(self._consumer.assignment())

    async def __aexit__(self, *exc: Any) -> None:
        assert self._consumer is not None
        await self._consumer.stop()

    async def collect(self, payment_ids: Sequence[str], timeout_s: float = 60.0, *,
                      source: str = "model") -> dict[str, RiskDecided]:
        """The first decision of `source` for each payment id (waits for all)."""
        wanted = set(payment_ids)

        def found() -> dict[str, RiskDecided]:
            first: dict[str, RiskDecided] = {}
            for d in self.seen:
                if d.payment_id in wanted and d.source == source:
                    first.setdefault(d.payment_id, d)
            return first

        await self.until(lambda: len(found()) == len(wanted), timeout_s, f"decisions of {len(wanted)} payments")
        return found()

    async def count(self, payment_id: str, n: int, timeout_s: float = 60.0) -> None:
        """Wait until `payment_id` has at least `n` decisions (a redelivery is answered again)."""
        await self.until(lambda: sum(d.payment_id == payment_id for d in self.seen) >= n, timeout_s,
                         f"{n} decisions of {payment_id}")

    async def until(self, done: Callable[[], bool], timeout_s: float, what: str) -> None:
        """Read decisions into `seen` until `done()`: the test of a condition always sees
        the decisions that arrived meanwhile (a check over `seen` alone would not)."""
        assert self._consumer is not None
        deadline = time.monotonic() + timeout_s
        while not done():
            assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
            batch = await self._consumer.getmany(timeout_ms=200)
            for records in batch.values():
                self.seen += [d for r in records for d in decisions_of(DECISIONS.decode(r.value))]


async def publish(settings: Settings, requests: Sequence[ScoreRequested]) -> None:
    async with EventPublisher(settings) as publisher:
        for lo in range(0, len(requests), 5_000):
            await publisher.publish_many("fraud.requests", [(None, r) for r in requests[lo:lo + 5_000]])
