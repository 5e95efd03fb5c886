"""Payments end to end: completed payments/s and request -> completed latency, next to a
plain SQL double-entry baseline on the same PostgreSQL.

    python -m ops.bench.payments [sql|kafka|rest|all] [--payments 20000] [--wallets 1000]
                                 [--runs 3] [--workers 1] [--fetch-wait-ms 0]

Each run starts from fresh topics and a fresh database cloned from a migrated template,
on this benchmark's own embedded servers (Tansu, PostgreSQL 18, Redis 6.2, fsync on,
synchronous_commit on: the journal is durable). --wallets funded wallets pay one another
(payer != payee, random pairs, amounts 1..5,000 minor), never running out of money.

sql: the baseline. Per payment one transaction, as a plain OLTP service would write it:
  lock both balance rows (ascending id), insert the journal transaction and its two legs
  (account_seq and running balance from the locked rows), update both balances; 32
  concurrent connections. Payments/s and p50/p99 commit latency.

kafka: a client publishes `payment.requested` events to `payments.events`, batched per
  partition as a batching client would, all at once; --workers saga workers
  (`agents.payments` + `agents.fraud_passthrough`) run the whole saga: reserve, score
  request, decision, capture (double entry), completion, every step a batch, every batch
  one transaction. Completed/s = payments / (last `completed` step - first publish);
  latency = the `completed` step's time (recorded in PostgreSQL) - the request's publish
  time, per payment: under a backlog of all of them, so it mostly measures the queue.

rest: an API process (`fintide api`: uvicorn, JWT auth, rate limits, Idempotency-Key,
  group commit of concurrent requests) and the saga workers; 64 HTTP connections POST
  /api/v1/payments between the wallets of max(20, n/500) users (no user reaches the
  600/min rate limit). Accepted/s (202s per second), completed/s and POST -> completed
  latency as above (latency from each POST).

--fetch-wait-ms: the workers' consumers wait at most this long per fetch. The embedded
  broker (Tansu) does not answer a waiting fetch when data arrives, so with Faust's
  built-in 1,500 ms (0 here: the platform as configured today) every idle hop of the saga
  costs up to 1.5 s; 5 shows what a platform setting would give (docs/benchmarks/payments.md).

Figures are medians over --runs runs. Every process shares this machine's cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import msgspec

from db import payments as db
from db.engine import create_pool
from db.migrate import migrate_all
from db.payments import Account
from ops.embedded import EmbeddedStack, free_port
from ops.settings import Settings, load_settings
from services import payments
from streams.payments import (
    PAYMENTS,
    PaymentEventBatch,
    PaymentRequested,
    partition_for_key,
)
from streams.publisher import EventPublisher
from streams.topics import ensure_topics

REPO = Path(__file__).resolve().parents[2]
TEMPLATE = "bench_template"
START_TIMEOUT_S = 120.0
FINISH_TIMEOUT_S = 900.0
SQL_CONNECTIONS = 32
REST_CONNECTIONS = 64
# Each user sends at most this many requests, so the 600/min per-user rate limit never bites.
REQUESTS_PER_USER = 500
REST_MIN_USERS = 20
FUNDS_MINOR = 10**12


# ------------------------------------------------------------------------------- servers

class Bench:
    """The benchmark's own embedded stack and a migrated template database."""

    def __init__(self, root: Path, stack: EmbeddedStack) -> None:
        self.root = root
        self.stack = stack
        self.admin_url = stack.database_url

    async def prepare(self) -> None:
        admin = await asyncpg.connect(self.admin_url)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{TEMPLATE}"')
            await admin.execute(f'CREATE DATABASE "{TEMPLATE}"')
        finally:
            await admin.close()
        await migrate_all(self._url(TEMPLATE))

    def _url(self, name: str) -> str:
        return self.admin_url.rsplit("/", 1)[0] + "/" + name

    async def fresh_database(self) -> str:
        name = f"bench_{uuid.uuid4().hex[:8]}"
        admin = await asyncpg.connect(self.admin_url)
        try:
            await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{TEMPLATE}"')
        finally:
            await admin.close()
        return self._url(name)

    def settings(self, database_url: str, **overrides: Any) -> Settings:
        prefix = f"b{uuid.uuid4().hex[:8]}."
        data = self.root / prefix.rstrip(".")
        data.mkdir(parents=True, exist_ok=True)
        return load_settings(environ={}, env="test", log_level="WARNING", data_dir=str(data),
                             kafka_bootstrap=self.stack.kafka_bootstrap, database_url=database_url,
                             redis_url=self.stack.redis_url, topic_prefix=prefix, app_id=f"fintide-{prefix[:-1]}",
                             worker_web_port=0, feed_enabled=False, fraud_budget_ms=600_000, **overrides)

    def stop(self) -> None:
        self.stack.stop()


def _env(settings: Settings, worker_id: str = "worker-1", fetch_wait_ms: int = 0) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FINTIDE_")}
    for name in ("env", "log_level", "kafka_bootstrap", "database_url", "redis_url", "data_dir", "topic_prefix",
                 "app_id", "topic_partitions", "fraud_budget_ms", "api_port"):
        env[f"FINTIDE_{name.upper()}"] = str(getattr(settings, name))
    env.update({"FINTIDE_WORKER_ID": worker_id, "FINTIDE_WORKER_WEB_PORT": "0",
                "FINTIDE_BENCH_FETCH_WAIT_MS": str(fetch_wait_ms)})
    return env


def _spawn(settings: Settings, argv: list[str], name: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    log = open(Path(settings.data_dir) / f"{name}.log", "ab")  # noqa: SIM115 - the child writes it
    return subprocess.Popen([sys.executable, *argv], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)


def start_workers(settings: Settings, n: int, fetch_wait_ms: int) -> list[subprocess.Popen[bytes]]:
    return [_spawn(settings, ["-m", "ops.bench.payments", "_worker", "--agents",
                              "agents.payments,agents.fraud_passthrough"], f"worker-{i}",
                   _env(settings, f"worker-{i}", fetch_wait_ms)) for i in range(1, n + 1)]


def stop(procs: Sequence[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


# --------------------------------------------------------------------------------- money

async def fund_wallets(pool: asyncpg.Pool, n: int) -> list[Account]:
    async with pool.acquire() as conn:
        out = []
        for _ in range(n):
            wallet = await payments.open_wallet(conn, uuid.uuid4(), "INR")
            await _deposit(conn, wallet)
            out.append(wallet)
        return out


async def _deposit(conn: asyncpg.Connection, wallet: Account) -> None:
    assert wallet.owner_id is not None
    deposit = await payments.begin_deposit(conn, deposit_id=uuid.uuid4(), owner_id=wallet.owner_id,
                                           wallet_id=wallet.id, amount_minor=FUNDS_MINOR, currency="INR",
                                           gateway="bench")
    await payments.settle_deposit(conn, deposit.id, gateway_ref=None)


def pairs(n_wallets: int, n: int, seed: int) -> list[tuple[int, int, int]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randrange(n_wallets), rng.randrange(n_wallets - 1)
        out.append((a, b if b < a else b + 1, rng.randint(1, 5_000)))
    return out


def summary(n: int, first_sent: float, done: list[float], latencies_ms: list[float]) -> dict[str, float]:
    latencies_ms.sort()
    return {"payments": n, "completed_per_s": round(n / (max(done) - first_sent)),
            "latency_p50_ms": round(_pct(latencies_ms, 50), 1), "latency_p99_ms": round(_pct(latencies_ms, 99), 1)}


def _pct(sorted_values: list[float], p: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * p / 100))]


# ------------------------------------------------------------------------------ baseline

_BASELINE_SQL = """
WITH locked AS (
    SELECT account_id, posted_minor, last_seq FROM payments.balances
    WHERE account_id = ANY($1::uuid[]) ORDER BY account_id FOR UPDATE
), tx AS (
    INSERT INTO payments.transactions (id, kind, reference_id) VALUES ($2, 'transfer', $2) RETURNING id
), legs AS (
    INSERT INTO payments.legs (transaction_id, account_id, currency, amount_minor, account_seq, balance_after_minor)
    SELECT (SELECT id FROM tx), l.account_id, 'INR', d.amount, l.last_seq + 1, l.posted_minor + d.amount
    FROM locked l JOIN unnest($1::uuid[], $3::bigint[]) AS d (account_id, amount) USING (account_id)
    RETURNING account_id, amount_minor
)
UPDATE payments.balances b SET posted_minor = b.posted_minor + legs.amount_minor, last_seq = b.last_seq + 1,
                               updated_at = now()
FROM legs WHERE b.account_id = legs.account_id
"""


async def sql_run(bench: Bench, n: int, n_wallets: int, seed: int) -> dict[str, float]:
    """One transaction per payment, 32 connections: the same double entry, no saga."""
    url = await bench.fresh_database()
    pool = await create_pool(url, min_size=SQL_CONNECTIONS, max_size=SQL_CONNECTIONS)
    try:
        wallets = await fund_wallets(pool, n_wallets)
        todo = pairs(n_wallets, n, seed)
        latencies: list[float] = []
        queue: asyncio.Queue[tuple[int, int, int]] = asyncio.Queue()
        for item in todo:
            queue.put_nowait(item)

        async def client() -> None:
            async with pool.acquire() as conn:
                while not queue.empty():
                    a, b, amount = queue.get_nowait()
                    start = time.perf_counter()
                    async with conn.transaction():
                        await conn.execute(_BASELINE_SQL, [wallets[a].id, wallets[b].id], uuid.uuid4(),
                                           [-amount, amount])
                    latencies.append((time.perf_counter() - start) * 1000)

        begin = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(SQL_CONNECTIONS)))
        elapsed = time.perf_counter() - begin
        async with pool.acquire() as conn:
            assert await payments.find_differences(conn) == [], "the baseline broke the ledger"
    finally:
        await pool.close()
    latencies.sort()
    return {"payments": n, "completed_per_s": round(n / elapsed), "latency_p50_ms": round(_pct(latencies, 50), 1),
            "latency_p99_ms": round(_pct(latencies, 99), 1)}


# ------------------------------------------------------------------------------- the saga

async def wait_ready(settings: Settings, procs: Sequence[subprocess.Popen[bytes]], probe_wallets: list[Account]) -> None:
    """Workers are ready when a probe payment completes (group joined, republish done)."""
    pool = await create_pool(settings.database_url, max_size=2)
    try:
        payer, payee = probe_wallets[0], probe_wallets[1]
        assert payer.owner_id is not None
        probe = PaymentRequested(payment_id=uuid.uuid4(), payer_user_id=payer.owner_id, payer_wallet_id=payer.id,
                                 payee_wallet_id=payee.id, amount_minor=1, currency="INR")
        async with EventPublisher(settings) as publisher:
            await publisher.publish(PAYMENTS.name, None, probe)
        deadline = time.monotonic() + START_TIMEOUT_S
        while await pool.fetchval("SELECT status FROM payments.payments WHERE id = $1", probe.payment_id) != "completed":
            for proc in procs:
                assert proc.poll() is None, f"a worker exited with {proc.returncode}; see {settings.data_dir}"
            assert time.monotonic() < deadline, "workers did not complete a probe payment"
            await asyncio.sleep(0.2)
    finally:
        await pool.close()


async def completed_at(settings: Settings, ids: list[uuid.UUID], procs: Sequence[subprocess.Popen[bytes]]) -> dict[uuid.UUID, float]:
    """When each payment's saga completed (its `completed` step in PostgreSQL), epoch s."""
    pool = await create_pool(settings.database_url, max_size=2)
    try:
        deadline = time.monotonic() + FINISH_TIMEOUT_S
        while await pool.fetchval("SELECT count(*) FROM payments.payments WHERE id = ANY($1::uuid[]) "
                                  "AND status IN ('completed', 'failed')", ids) < len(ids):
            for proc in procs:
                assert proc.poll() is None, f"a process exited with {proc.returncode}; see {settings.data_dir}"
            assert time.monotonic() < deadline, "payments did not finish"
            await asyncio.sleep(0.5)
        rows = await pool.fetch("SELECT id, status, steps->-1->>'at' AS at FROM payments.payments "
                                "WHERE id = ANY($1::uuid[])", ids)
        async with pool.acquire() as conn:
            assert await payments.find_differences(conn) == [], "the ledger disagrees with its projection"
    finally:
        await pool.close()
    assert all(r["status"] == "completed" for r in rows), "a payment failed (wallets are funded for all)"
    return {r["id"]: datetime.fromisoformat(r["at"]).timestamp() for r in rows}


async def kafka_run(bench: Bench, n: int, n_wallets: int, workers: int, fetch_wait_ms: int,
                    seed: int) -> dict[str, float]:
    settings = bench.settings(await bench.fresh_database())
    pool = await create_pool(settings.database_url, max_size=4)
    try:
        wallets = await fund_wallets(pool, n_wallets)
    finally:
        await pool.close()
    await ensure_topics(settings)
    procs = start_workers(settings, workers, fetch_wait_ms)
    try:
        await wait_ready(settings, procs, wallets)
        requests = []
        for a, b, amount in pairs(n_wallets, n, seed):
            payer = wallets[a]
            assert payer.owner_id is not None
            requests.append(PaymentRequested(payment_id=uuid.uuid4(), payer_user_id=payer.owner_id,
                                             payer_wallet_id=payer.id, payee_wallet_id=wallets[b].id,
                                             amount_minor=amount, currency="INR", device_id=f"d{a}", country="IN"))
        by_partition: dict[int, list[PaymentRequested]] = {}
        for r in requests:
            by_partition.setdefault(partition_for_key(str(r.payer_wallet_id), settings.topic_partitions), []).append(r)
        batches = [PaymentEventBatch(payer_wallet_id=rs[i].payer_wallet_id, events=rs[i:i + 500])
                   for rs in by_partition.values() for i in range(0, len(rs), 500)]
        first_sent = time.time()
        async with EventPublisher(settings) as publisher:
            await publisher.publish_many(PAYMENTS.name, [(None, b) for b in batches])
        sent = dict.fromkeys((r.payment_id for r in requests), first_sent)  # one burst
        done = await completed_at(settings, list(sent), procs)
    finally:
        stop(procs)
    return summary(n, first_sent, list(done.values()), [(done[p] - sent[p]) * 1000 for p in done])


async def rest_run(bench: Bench, n: int, n_wallets: int, workers: int, fetch_wait_ms: int,
                   seed: int) -> dict[str, float]:
    settings = msgspec.structs.replace(bench.settings(await bench.fresh_database()), api_port=free_port())
    await ensure_topics(settings)
    procs = start_workers(settings, workers, fetch_wait_ms)
    # Users are registered from distinct (proxied) addresses: /auth/* allows 30 per minute
    # per address, which a benchmark registering dozens of users would otherwise hit.
    procs.append(_spawn(settings, ["-m", "ops.cli", "api"], "api",
                        {**_env(settings), "FINTIDE_TRUSTED_PROXIES": "127.0.0.1"}))
    base = f"http://127.0.0.1:{settings.api_port}"
    try:
        async with httpx.AsyncClient(base_url=base, timeout=60, limits=httpx.Limits(
                max_connections=REST_CONNECTIONS, max_keepalive_connections=REST_CONNECTIONS)) as client:
            await _wait_api(client, procs)
            users = [await _user(client) for _ in range(max(REST_MIN_USERS, -(-n // REQUESTS_PER_USER)))]
            wallets = [await _api_wallet(client, u, FUNDS_MINOR) for u in users]
            pool = await create_pool(settings.database_url, max_size=2)
            try:
                accounts = [a for a in (await payments_accounts(pool, [w for w, _ in wallets]))]
            finally:
                await pool.close()
            await wait_ready(settings, procs, accounts)
            sent: dict[uuid.UUID, float] = {}
            in_flight = asyncio.Semaphore(REST_CONNECTIONS)
            todo = pairs(len(wallets), n, seed)

            async def one(a: int, b: int, amount: int) -> None:
                (source, headers), (target, _) = wallets[a], wallets[b]
                async with in_flight:
                    at = time.time()
                    response = await client.post("/api/v1/payments", headers={**headers, "Idempotency-Key": uuid.uuid4().hex},
                                                 json={"from_wallet": str(source), "to_wallet": str(target),
                                                       "amount_minor": amount, "currency": "INR"})
                assert response.status_code == 202, response.text
                sent[uuid.UUID(response.json()["id"])] = at

            first_sent = time.time()
            await asyncio.gather(*(one(*t) for t in todo))
            accepted_s = time.time() - first_sent
        done = await completed_at(settings, list(sent), procs)
    finally:
        stop(procs)
    return {**summary(n, first_sent, list(done.values()), [(done[p] - sent[p]) * 1000 for p in done]),
            "accepted_per_s": round(n / accepted_s)}


async def _wait_api(client: httpx.AsyncClient, procs: Sequence[subprocess.Popen[bytes]]) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        assert procs[-1].poll() is None, "the API exited"
        try:
            if (await client.get("/health")).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "the API did not start"
        await asyncio.sleep(0.2)


async def _user(client: httpx.AsyncClient) -> dict[str, str]:
    email, password = f"bench-{uuid.uuid4().hex[:12]}@example.com", "Correct-Horse-42"
    proxied = {"X-Forwarded-For": f"10.{random.randrange(256)}.{random.randrange(256)}.{random.randrange(1, 255)}"}
    registered = await client.post("/api/v1/auth/register", json={"email": email, "password": password},
                                   headers=proxied)
    assert registered.status_code == 201, registered.text
    login = await client.post("/api/v1/auth/login", json={"email": email, "password": password}, headers=proxied)
    return {"Authorization": f"Bearer {login.json()['access_token']}"}


async def _api_wallet(client: httpx.AsyncClient, headers: dict[str, str], amount_minor: int) -> tuple[uuid.UUID, dict[str, str]]:
    wallet = (await client.post("/api/v1/wallets", json={"currency": "INR"}, headers=headers)).json()["id"]
    deposit = await client.post(f"/api/v1/wallets/{wallet}/deposits", json={"amount_minor": min(amount_minor, 10**14),
                                                                            "currency": "INR"},
                                headers={**headers, "Idempotency-Key": uuid.uuid4().hex})
    assert deposit.status_code == 201, deposit.text
    return uuid.UUID(wallet), headers


async def payments_accounts(pool: asyncpg.Pool, ids: list[uuid.UUID]) -> list[Account]:
    async with pool.acquire() as conn:
        found = await db.get_accounts(conn, ids)
    return [found[i] for i in ids]


# ---------------------------------------------------------------------------------- main

def machine() -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"nproc": os.cpu_count(), "cpu": cpu, "python": platform.python_version(),
            "load_avg_1m": round(os.getloadavg()[0], 1)}


async def _main(args: argparse.Namespace) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="fintide-bench-payments-"))
    # EmbeddedStack.start() runs its own event loop: off this one.
    bench = Bench(root, await asyncio.to_thread(EmbeddedStack(root / "stack").start))
    out: dict[str, Any] = {"machine": machine(), "args": vars(args)}
    failed = True
    try:
        await bench.prepare()
        kinds = ["sql", "kafka", "rest"] if args.command == "all" else [args.command]
        for kind in kinds:
            runs = []
            for i in range(args.runs):
                if kind == "sql":
                    runs.append(await sql_run(bench, args.payments, args.wallets, seed=i))
                elif kind == "kafka":
                    runs.append(await kafka_run(bench, args.payments, args.wallets, args.workers, args.fetch_wait_ms, i))
                else:
                    runs.append(await rest_run(bench, min(args.payments, args.rest_payments), args.wallets,
                                               args.workers, args.fetch_wait_ms, i))
                print(kind, runs[-1], f"load {os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)
            out[kind] = {"runs": runs, "median": {k: statistics.median(r[k] for r in runs) for k in runs[0]}}
        out["machine"]["load_avg_1m_end"] = round(os.getloadavg()[0], 1)
        failed = False
    finally:
        bench.stop()
        if failed:
            print(f"logs kept in {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)
    return out


def _worker_main(argv: list[str]) -> None:
    """`streams.worker` with the benchmark's consumer fetch wait (see the module docstring)."""
    wait_ms = int(os.environ.get("FINTIDE_BENCH_FETCH_WAIT_MS", "0"))
    if wait_ms > 0:
        import aiokafka

        original = aiokafka.AIOKafkaConsumer.__init__

        def init(self: Any, *a: Any, **kw: Any) -> None:
            kw["fetch_max_wait_ms"] = min(int(kw.get("fetch_max_wait_ms", 500)), wait_ms)
            original(self, *a, **kw)

        aiokafka.AIOKafkaConsumer.__init__ = init  # type: ignore[method-assign]
    from streams.worker import main as worker_main

    worker_main(argv)


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_worker"]:
        _worker_main(argv[1:])
        return
    parser = argparse.ArgumentParser(prog="python -m ops.bench.payments", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["sql", "kafka", "rest", "all"])
    parser.add_argument("--payments", type=int, default=20_000)
    parser.add_argument("--rest-payments", type=int, default=5_000, help="payments per REST run (the client is slow)")
    parser.add_argument("--wallets", type=int, default=1_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--fetch-wait-ms", type=int, default=0)
    args = parser.parse_args(argv)
    result = asyncio.run(_main(args))
    print(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()

