"""Shared helpers for the payments saga and fault tests (no tests here).

Workers run as child processes exactly as `fintide worker` runs them, against the
session's real Tansu broker, PostgreSQL and Redis (or a stack a test starts itself); the
API is served by uvicorn in the test's event loop, so tests reach it over real HTTP and
WebSocket connections.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from uuid import UUID

import asyncpg
import httpx
import uvicorn
from aiokafka import AIOKafkaConsumer

from api.app import create_app
from db.payments import Account
from ops.settings import Settings, load_settings
from services import payments
from streams.codec import decode
from streams.events import DeadLetter
from streams.topics import TopicSpec, dlq_name, full_name
from streams.worker import web_url_path
from tests.integration.test_payments_support import assert_ledger_sound, funded_wallet

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 20.0
SAGA_AGENTS = "agents.payments,agents.fraud_passthrough"
TERMINAL = ("completed", "failed")
T = TypeVar("T")


# -------------------------------------------------------------------------------- workers

@dataclass
class Worker:
    settings: Settings
    agents: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    url: str = ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

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

    def kill(self) -> None:
        """SIGKILL: no clean-up, no offset commit, RocksDB as it was at that instant."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


def worker_env(settings: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FINTIDE_")}
    for name in ("env", "kafka_bootstrap", "database_url", "redis_url", "data_dir", "topic_prefix", "app_id",
                 "worker_id", "topic_partitions", "fraud_scorer", "fraud_budget_ms", "fraud_fail_open_limit_minor",
                 "payments_batch_max", "payments_batch_wait_ms", "payments_relay_interval_ms"):
        env[f"FINTIDE_{name.upper()}"] = str(getattr(settings, name))
    env.update({"FINTIDE_WORKER_WEB_PORT": "0", "FINTIDE_LOG_LEVEL": "INFO"})
    return env


async def start_worker(settings: Settings, agents: str = SAGA_AGENTS) -> Worker:
    """A worker child process, returned once it owns every partition of its tables and has
    republished PostgreSQL's balances and open sagas (what it does first as the leader)."""
    log_path = Path(settings.data_dir) / f"{settings.worker_id}-{time.monotonic_ns()}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    web_url_path(settings).unlink(missing_ok=True)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "streams.worker", "--agents", agents], cwd=REPO,
                                env=worker_env(settings), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    worker = Worker(settings, agents, proc, log_path)
    try:
        worker.url = await wait_for(lambda: _read_url(worker), START_TIMEOUT_S, "the worker's web.url")
        await wait_for(lambda: _owns_everything(worker), START_TIMEOUT_S, "partition assignment")
        await wait_for(lambda: _recovered(worker), START_TIMEOUT_S, "the republish from PostgreSQL")
    except BaseException:
        worker.kill()
        raise
    return worker


async def _read_url(worker: Worker) -> str | None:
    assert worker.proc.poll() is None, f"worker exited with {worker.proc.returncode}:\n{worker.log_tail()}"
    path = web_url_path(worker.settings)
    return path.read_text().strip() if path.exists() else None


async def _owns_everything(worker: Worker) -> bool:
    assert worker.proc.poll() is None, f"worker exited with {worker.proc.returncode}:\n{worker.log_tail()}"
    report = await get_json(worker.url + "/ops/")
    if not report:
        return False
    tables = {t["name"]: t for t in report["tables"]}
    wanted = list(range(worker.settings.topic_partitions))
    return all(tables.get(name, {}).get("active_partitions") == wanted
               for name in ("payments.sagas", "payments.balances"))


async def _recovered(worker: Worker) -> bool:
    assert worker.proc.poll() is None, f"worker exited with {worker.proc.returncode}:\n{worker.log_tail()}"
    return await metric(worker, "fintide_payments_recovered", {}) == 1.0


async def wait_for(probe: Callable[[], Awaitable[T | None]], timeout_s: float, what: str) -> T:
    deadline = time.monotonic() + timeout_s
    while True:
        result = await probe()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.1)


async def get_json(url: str) -> Any:
    async with httpx.AsyncClient(timeout=10) as client:
        try:
            response = await client.get(url)
        except httpx.TransportError:
            return None
    return response.json() if response.status_code == 200 else None


async def metric(worker: Worker, name: str, labels: dict[str, str]) -> float:
    async with httpx.AsyncClient(timeout=10) as client:
        text = (await client.get(worker.url + "/metrics")).text
    wanted = {f'{k}="{v}"' for k, v in labels.items()}
    for line in text.splitlines():
        if not labels and line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
        if line.startswith(name + "{"):
            series, value = line.rsplit(" ", 1)
            if set(series[len(name):].strip("{}").split(",")) == wanted:
                return float(value)
    return 0.0


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


# ------------------------------------------------------------------------------- the API

@asynccontextmanager
async def served(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The app on a real uvicorn server in this event loop; `client.ws_url` for WebSockets."""
    app = create_app(settings)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        assert not task.done(), "the API did not start"
        await asyncio.sleep(0.02)
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30, limits=limits) as client:
            client.app = app  # type: ignore[attr-defined]  # tests.helpers.auth reads app.state.settings
            client.ws_url = f"ws://127.0.0.1:{port}"  # type: ignore[attr-defined]
            yield client
    finally:
        server.should_exit = True
        await task


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
                     timeout_s: float = 30.0, *, raw: bool = False) -> list[Any]:
    """Read a topic from the beginning until `until(values)` holds."""
    consumer = AIOKafkaConsumer(full_name(settings, spec.name), bootstrap_servers=settings.kafka_bootstrap,
                                auto_offset_reset="earliest", enable_auto_commit=False,
                                group_id=f"t-{uuid.uuid4().hex[:8]}")
    await consumer.start()
    values: list[Any] = []
    try:
        async with asyncio.timeout(timeout_s):
            while not until(values):
                batch = await consumer.getmany(timeout_ms=200)
                for records in batch.values():
                    values += [r if raw else spec.decode(r.value) for r in records]
    finally:
        await consumer.stop()
    return values


async def read_dead_letters(settings: Settings, topic: str, until: Callable[[list[DeadLetter]], bool],
                            timeout_s: float = 30.0) -> list[DeadLetter]:
    """Read `<topic>.dlq` from the beginning until `until(letters)` holds."""
    consumer = AIOKafkaConsumer(full_name(settings, dlq_name(topic)), bootstrap_servers=settings.kafka_bootstrap,
                                auto_offset_reset="earliest", enable_auto_commit=False,
                                group_id=f"t-{uuid.uuid4().hex[:8]}")
    await consumer.start()
    letters: list[DeadLetter] = []
    try:
        async with asyncio.timeout(timeout_s):
            while not until(letters):
                batch = await consumer.getmany(timeout_ms=200)
                for records in batch.values():
                    letters += [decode(r.value, DeadLetter) for r in records]
    finally:
        await consumer.stop()
    return letters
