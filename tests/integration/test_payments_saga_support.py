"""Shared helpers for the payments saga and fault tests (no tests here).

Workers run as child processes exactly as `fintide worker` runs them, against the
session's real Tansu broker, PostgreSQL and Redis (or a stack a test starts itself); the
API is served by uvicorn in the test's event loop, so tests reach it over real HTTP and
WebSocket connections.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import UUID

import asyncpg
from aiokafka import AIOKafkaConsumer

from db.engine import create_pool
from db.payments import Account
from ops.embedded import EmbeddedStack
from ops.settings import Settings, load_settings
from services import payments
from streams.codec import decode
from streams.events import DeadLetter
from streams.topics import TopicSpec, dlq_name, full_name
from tests.conftest import TEMPLATE_DB, _db_url
from tests.helpers import workers
from tests.helpers.workers import WorkerProcess, get_json, metric, wait_for
from tests.integration.test_payments_support import assert_ledger_sound, funded_wallet

REPO = Path(__file__).resolve().parents[2]
SAGA_AGENTS = "agents.payments,agents.fraud_passthrough"
TERMINAL = ("completed", "failed")


# -------------------------------------------------------------------------------- workers

Worker = WorkerProcess
# What a saga worker reads beyond the base settings (tests vary them).
SAGA_ENV_FIELDS = ("topic_partitions", "fraud_scorer", "fraud_budget_ms", "fraud_fail_open_limit_minor",
                   "payments_batch_max", "payments_batch_wait_ms", "payments_relay_interval_ms")


async def start_worker(settings: Settings, agents: str = SAGA_AGENTS) -> WorkerProcess:
    """A worker child process, returned once it owns every partition of its tables and has
    republished PostgreSQL's balances and open sagas (what it does first as the leader)."""
    async def ready(worker: WorkerProcess) -> bool:
        return await _owns_everything(worker) and await _recovered(worker)

    return await workers.start_worker(settings, agents.split(","), ready, env_fields=SAGA_ENV_FIELDS)


async def _owns_everything(worker: WorkerProcess) -> bool:
    assert worker.proc.poll() is None, f"worker exited with {worker.proc.returncode}:\n{worker.log_tail()}"
    report = await get_json(worker.url + "/ops/")
    if not report:
        return False
    tables = {t["name"]: t for t in report["tables"]}
    wanted = list(range(worker.settings.topic_partitions))
    return all(tables.get(name, {}).get("active_partitions") == wanted
               for name in ("payments.sagas", "payments.balances"))


async def _recovered(worker: WorkerProcess) -> bool:
    assert worker.proc.poll() is None, f"worker exited with {worker.proc.returncode}:\n{worker.log_tail()}"
    return await metric(worker, "fintide_payments_recovered", {}) == 1.0


# ------------------------------------------------------------------------ settings and dbs

def saga_settings(kafka_bootstrap: str, database_url: str, redis_url: str, data_dir: Path,
                  **overrides: Any) -> Settings:
    prefix = f"p{uuid.uuid4().hex[:10]}."
    return load_settings(environ={}, env="test", data_dir=str(data_dir), kafka_bootstrap=kafka_bootstrap,
                         database_url=database_url, redis_url=redis_url, topic_prefix=prefix,
                         app_id=f"fintide-{prefix.rstrip('.')}", worker_web_port=0, feed_enabled=False,
                         **overrides)


@asynccontextmanager
async def fresh_database(admin_url: str, template: str) -> AsyncIterator[str]:
    """A database cloned from the migrated template, dropped afterwards."""
    name = f"saga_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(admin_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    finally:
        await admin.close()
    try:
        yield admin_url.rsplit("/", 1)[0] + "/" + name
    finally:
        admin = await asyncpg.connect(admin_url)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


@dataclass
class SagaEnv:
    """A module's saga: its settings, a pool on its database and its (replaceable) worker;
    `accounts` collects the wallets a test created, for the projection checks."""
    settings: Settings
    pool: asyncpg.Pool
    worker: WorkerProcess
    accounts: set[UUID] = field(default_factory=set)


@asynccontextmanager
async def saga_env(stack: EmbeddedStack, data_dir: Path, *, clean_stop: bool = True,
                   **overrides: Any) -> AsyncIterator[SagaEnv]:
    """A fresh database, settings and a started saga worker; on exit the current worker is
    stopped (and must exit 0 with `clean_stop`, i.e. unless the tests kill workers)."""
    async with fresh_database(_db_url(stack, "postgres"), TEMPLATE_DB) as url:
        settings = saga_settings(stack.kafka_bootstrap, url, stack.redis_url, data_dir, **overrides)
        pool = await create_pool(url)
        env = SagaEnv(settings, pool, await start_worker(settings))
        try:
            yield env
        finally:
            code = env.worker.stop()
            await pool.close()
            assert code == 0 or not clean_stop, env.worker.log_tail()


# ------------------------------------------------------------------------------- the API

def key() -> dict[str, str]:
    return {"Idempotency-Key": uuid.uuid4().hex}


# ------------------------------------------------------------------------- money and state

async def wallets(pool: asyncpg.Pool, amounts: Sequence[int], owners: Sequence[UUID] | None = None) -> list[Account]:
    async with pool.acquire() as conn:
        return [await funded_wallet(conn, amount, owner_id=owners[i] if owners else None)
                for i, amount in enumerate(amounts)]


async def statuses(pool: asyncpg.Pool, ids: Iterable[UUID]) -> Counter[str]:
    rows = await pool.fetch("SELECT status, count(*) AS n FROM payments.payments WHERE id = ANY($1::uuid[]) "
                            "GROUP BY status", list(ids))
    return Counter({r["status"]: r["n"] for r in rows})


async def wait_terminal(pool: asyncpg.Pool, ids: Sequence[UUID], timeout_s: float = 60.0,
                        worker: Worker | None = None) -> Counter[str]:
    """Wait until every payment is completed or failed; the final status counts."""
    async def done() -> Counter[str] | None:
        if worker is not None:
            assert worker.proc.poll() is None, f"worker died:\n{worker.log_tail()}"
        counts = await statuses(pool, ids)
        return counts if sum(counts[s] for s in TERMINAL) == len(set(ids)) else None

    try:
        return await wait_for(done, timeout_s, f"{len(ids)} payments to finish")
    except AssertionError:
        tail = worker.log_tail() if worker is not None else ""
        raise AssertionError(f"payments not finished: {dict(await statuses(pool, ids))}\n{tail}") from None


async def assert_saga_sound(pool: asyncpg.Pool) -> None:
    """Every ledger invariant, plus the saga's: nothing reserved for a finished payment,
    one capture per payment, and every posted or completed payment captured exactly once."""
    async with pool.acquire() as conn:
        await assert_ledger_sound(conn)
        leaked = await conn.fetchval(
            "SELECT count(*) FROM payments.holds h JOIN payments.payments p ON p.id = h.reference_id "
            "WHERE h.status = 'pending' AND p.status IN ('completed', 'failed')")
        doubled = await conn.fetchval(
            "SELECT count(*) FROM (SELECT reference_id FROM payments.transactions WHERE kind = 'payment' "
            "GROUP BY reference_id HAVING count(*) > 1) d")
        uncaptured = await conn.fetchval(
            "SELECT count(*) FROM payments.payments p WHERE p.status IN ('posted', 'completed') AND "
            "(p.captured_minor <> p.amount_minor OR NOT EXISTS (SELECT 1 FROM payments.transactions t "
            " WHERE t.id = p.transaction_id AND t.reference_id = p.id AND t.kind = 'payment'))")
        captured_failed = await conn.fetchval(
            "SELECT count(*) FROM payments.transactions t JOIN payments.payments p ON p.id = t.reference_id "
            "WHERE t.kind = 'payment' AND p.status NOT IN ('posted', 'completed')")
    assert (leaked, doubled, uncaptured, captured_failed) == (0, 0, 0, 0), \
        f"leaked holds {leaked}, doubled captures {doubled}, uncaptured {uncaptured}, captured but failed {captured_failed}"


async def assert_projection_matches(worker: Worker, pool: asyncpg.Pool, account_ids: Iterable[UUID],
                                    timeout_s: float = 30.0) -> None:
    """The worker's hot projection equals PostgreSQL's balances for every account."""
    ids = list(account_ids)
    differences: list[tuple[Any, ...]] = []

    async def agree() -> bool:
        rows = await pool.fetch("SELECT account_id, posted_minor, reserved_minor FROM payments.balances "
                                "WHERE account_id = ANY($1::uuid[])", ids)
        assert len(rows) == len(ids)
        differences.clear()
        for r in rows:
            hot = await get_json(f"{worker.url}/payments/balances/{r['account_id']}")
            if hot is None or (hot["posted_minor"], hot["reserved_minor"]) != (r["posted_minor"], r["reserved_minor"]):
                differences.append((r["account_id"], r["posted_minor"], r["reserved_minor"], hot))
            else:
                assert hot["available_minor"] == r["posted_minor"] - r["reserved_minor"]
        return not differences

    try:
        await wait_for(agree, timeout_s, "the hot projection to equal PostgreSQL")
    except AssertionError:
        raise AssertionError(f"projection differs from PostgreSQL: {differences[:5]}\n{worker.log_tail()}") from None


async def payment_row(pool: asyncpg.Pool, payment_id: UUID) -> Any:
    async with pool.acquire() as conn:
        return await payments.get_payment(conn, payment_id)


# ------------------------------------------------------------------------------- kafka

async def read_topic(settings: Settings, spec: TopicSpec[Any], until: Callable[[list[Any]], bool],
                     timeout_s: float = 30.0, *, raw: bool = False, dead_letters: bool = False) -> list[Any]:
    """Read a topic (or its dead letters) from the beginning until `until(values)` holds."""
    topic = dlq_name(spec.name) if dead_letters else spec.name
    consumer = AIOKafkaConsumer(full_name(settings, topic), bootstrap_servers=settings.kafka_bootstrap,
                                auto_offset_reset="earliest", enable_auto_commit=False,
                                group_id=f"t-{uuid.uuid4().hex[:8]}")
    await consumer.start()
    values: list[Any] = []
    try:
        async with asyncio.timeout(timeout_s):
            while not until(values):
                batch = await consumer.getmany(timeout_ms=200)
                for records in batch.values():
                    values += [r if raw else _decode(spec, r.value, dead_letters) for r in records]
    finally:
        await consumer.stop()
    return values


def _decode(spec: TopicSpec[Any], value: bytes, dead_letter: bool) -> Any:
    return decode(value, DeadLetter) if dead_letter else spec.decode(value)
