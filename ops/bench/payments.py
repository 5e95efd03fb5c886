"""Payments end to end: completed payments/s and request -> completed latency, next to a
plain SQL double-entry baseline on the same PostgreSQL.

    python -m ops.bench.payments [sql|kafka|rest|all] [--payments 20000] [--wallets 1000]
                                 [--runs 3] [--workers 1] [--rate 0] [--trace] ...  (--help)

Each run starts from fresh topics and a fresh database cloned from a migrated template,
on this benchmark's own embedded servers (Tansu, PostgreSQL 18, Redis 6.2, fsync on,
synchronous_commit on: the journal is durable). --wallets funded wallets pay one another
(payer != payee, random pairs, amounts 1..5,000 minor), never running out of money.

sql: the baseline. Per payment one transaction, as a plain OLTP service would write it:
  lock both balance rows (ascending id), insert the journal transaction and its two legs
  (account_seq and running balance from the locked rows), update both balances; 32
  concurrent connections. Payments/s and p50/p99 commit latency.

steps: the saga's PostgreSQL transactions alone, in this process, no Kafka, no worker:
  initiate_payments and settle_risk (capture, which also completes the payment), --batch
  payments per transaction, one after another; and post_batch (the bare double-entry
  transfer) on the same pairs. The ceiling of the database part of the saga on this
  machine. (complete_payments is timed too: it finds nothing posted, an unlocked read.)

kafka: a client publishes `payment.requested` events to `payments.events`, batched per
  partition as a batching client would; --workers saga workers (`agents.payments` +
  `agents.fraud_passthrough`) run the whole saga: reserve, score request, decision,
  capture (double entry) and completion, every step a batch, every batch one transaction.
  Without --rate all payments go at once (a burst: the throughput figure; latency is then
  mostly time in the queue). With --rate R the client publishes R payments/s in ticks of
  100 ms and each payment is timed from its tick (the latency figure at a load the
  pipeline sustains). Completed/s = payments / (last `completed` - first publish).

rest: an API process (`fintide api`: uvicorn, JWT auth, rate limits, Idempotency-Key,
  group commit of concurrent requests) and the saga workers; --rest-connections (64) POST
  /api/v1/payments between the wallets of max(20, n/500) users (no user reaches the
  600/min rate limit), from an aiohttp client in this process. Accepted/s (202s per
  second), completed/s and POST -> completed latency as above (latency from each POST).

Latency ends at the `completed` step's time (payments.completed_at), stamped by the worker
in the transaction that records it (after locking the batch's payments, before their
update and the commit;
PostgreSQL and this client share the machine's clock).

Every saga run also reports, between the first request and the last completion: CPU
milliseconds per payment of each process group (workers, api, postgres, kafka, redis,
this client), how many of the 2 cores the pipeline used and how many other processes
took meanwhile (the machine is shared), and the Kafka messages per payment of each topic
(changelogs included). --trace adds the wall time of the saga's steps inside worker-1
(batches, PostgreSQL transactions, relay, publishes). --fetch-wait-ms and --batch-wait-ms
override the workers' FINTIDE_BROKER_FETCH_MAX_WAIT_MS and FINTIDE_PAYMENTS_BATCH_WAIT_MS
(0: the platform defaults, 10 ms each).

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
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import httpx
import msgspec
import psutil

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
)
from streams.publisher import EventPublisher
from streams.topics import ensure_topics, partition_for_key

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
TICK_S = 0.1  # --rate: the client publishes every TICK_S


# ------------------------------------------------------------------------------- servers

class Bench:
    """The benchmark's own embedded stack and a migrated template database."""

    def __init__(self, root: Path, stack: EmbeddedStack) -> None:
        self.root = root
        self.stack = stack
        self.admin_url = stack.database_url

    async def prepare(self) -> dict[str, str]:
        """The template database; returns the durability settings every run uses."""
        admin = await asyncpg.connect(self.admin_url)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{TEMPLATE}"')
            await admin.execute(f'CREATE DATABASE "{TEMPLATE}"')
            durability = {name: await admin.fetchval(f"SHOW {name}") for name in
                          ("fsync", "synchronous_commit", "full_page_writes", "wal_sync_method", "server_version")}
        finally:
            await admin.close()
        assert durability["fsync"] == "on" and durability["synchronous_commit"] == "on", durability
        await migrate_all(self._url(TEMPLATE))
        return durability

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


def _env(settings: Settings, worker_id: str = "worker-1", fetch_wait_ms: int = 0, trace: bool = False) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FINTIDE_")}
    for name in ("env", "log_level", "kafka_bootstrap", "database_url", "redis_url", "data_dir", "topic_prefix",
                 "app_id", "topic_partitions", "fraud_budget_ms", "api_port"):
        env[f"FINTIDE_{name.upper()}"] = str(getattr(settings, name))
    env.update({"FINTIDE_WORKER_ID": worker_id, "FINTIDE_WORKER_WEB_PORT": "0"})
    if fetch_wait_ms > 0:
        env["FINTIDE_BROKER_FETCH_MAX_WAIT_MS"] = str(fetch_wait_ms)
    if trace:
        env["FINTIDE_BENCH_TRACE"] = str(trace_path(settings, worker_id))
    return env


def trace_path(settings: Settings, worker_id: str) -> Path:
    return Path(settings.data_dir) / f"{worker_id}.trace.json"


def _spawn(settings: Settings, argv: list[str], name: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    log = open(Path(settings.data_dir) / f"{name}.log", "ab")  # noqa: SIM115 - the child writes it
    return subprocess.Popen([sys.executable, *argv], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)


def start_workers(settings: Settings, opts: argparse.Namespace) -> list[subprocess.Popen[bytes]]:
    procs = []
    for i in range(1, opts.workers + 1):
        env = _env(settings, f"worker-{i}", opts.fetch_wait_ms, opts.trace)
        if opts.batch_wait_ms:
            env["FINTIDE_PAYMENTS_BATCH_WAIT_MS"] = str(opts.batch_wait_ms)
        procs.append(_spawn(settings, ["-m", "ops.bench.payments", "_worker", "--agents",
                                       "agents.payments,agents.fraud_passthrough"], f"worker-{i}", env))
    return procs


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


# ------------------------------------------------------------------------- CPU accounting

class Meter:
    """CPU seconds spent by each of the benchmark's processes (and their children) between
    start() and stop(), and by the whole machine: how much of the two cores the pipeline
    used and how much other processes (other engineers' runs) took meanwhile."""

    def __init__(self, groups: dict[str, list[int]], trace_path: Path | None = None) -> None:
        self.groups = groups
        self.trace_path = trace_path

    @staticmethod
    def _cpu(pid: int) -> float:
        try:
            proc = psutil.Process(pid)
            t = proc.cpu_times()
            total = t.user + t.system + t.children_user + t.children_system
            for child in proc.children(recursive=True):
                try:
                    c = child.cpu_times()
                    total += c.user + c.system
                except psutil.Error:
                    pass
            return total
        except psutil.Error:
            return 0.0

    def _snapshot(self) -> dict[str, Any]:
        machine = psutil.cpu_times()
        trace: dict[str, Any] = {}
        if self.trace_path is not None and self.trace_path.exists():
            trace = json.loads(self.trace_path.read_text())
        groups = {g: sum(self._cpu(p) for p in pids) for g, pids in self.groups.items()}
        me = os.times()
        groups["client"] = me.user + me.system  # this process only (its children are counted above)
        return {"at": time.perf_counter(), "groups": groups,
                "busy": machine.user + machine.nice + machine.system + machine.irq + machine.softirq + machine.steal,
                "trace": trace}

    def start(self) -> None:
        self._start = self._snapshot()

    def stop(self, n: int) -> dict[str, Any]:
        end = self._snapshot()
        wall = end["at"] - self._start["at"]
        ours = {g: end["groups"][g] - self._start["groups"][g] for g in end["groups"]}
        busy = end["busy"] - self._start["busy"]
        out: dict[str, Any] = {
            "wall_s": round(wall, 2),
            "cpu_ms_per_payment": {g: round(v * 1000 / n, 3) for g, v in ours.items()},
            "cores_used": {"pipeline": round(sum(ours.values()) / wall, 2),
                           "others": round(max(0.0, busy - sum(ours.values())) / wall, 2)},
        }
        if self.trace_path is not None:
            time.sleep(1.2)  # the worker writes its trace every second
            end["trace"] = json.loads(self.trace_path.read_text()) if self.trace_path.exists() else {}
            before = self._start["trace"]
            out["worker_wall_s"] = {
                k: {"calls": v["calls"] - before.get(k, {}).get("calls", 0),
                    "items": v["items"] - before.get(k, {}).get("items", 0),
                    "seconds": round(v["seconds"] - before.get(k, {}).get("seconds", 0.0), 2)}
                for k, v in sorted(end["trace"].items())}
        return out


async def messages_per_topic(settings: Settings) -> dict[str, int]:
    """Kafka messages each of the run's topics holds (end offsets; changelogs included)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from streams.topics import bootstrap_servers

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap_servers(settings), enable_auto_commit=False)
    await consumer.start()
    try:
        names = [t for t in await consumer.topics() if t.startswith((settings.topic_prefix, settings.app_id))]
        partitions = [TopicPartition(t, p) for t in names for p in consumer.partitions_for_topic(t) or ()]
        ends = await consumer.end_offsets(partitions) if partitions else {}
    finally:
        await consumer.stop()
    out: dict[str, int] = {}
    for tp, end in ends.items():
        name = tp.topic.removeprefix(settings.topic_prefix).removeprefix(settings.app_id + "-")
        out[name] = out.get(name, 0) + end
    return {k: v for k, v in sorted(out.items()) if v}


def stack_pids(stack: EmbeddedStack) -> dict[str, list[int]]:
    return {s.name: [s.proc.pid] for s in stack.servers if s.proc is not None}


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


async def steps_run(bench: Bench, n: int, n_wallets: int, batch: int, seed: int) -> dict[str, Any]:
    """The saga's PostgreSQL steps alone, in this process, no Kafka: initiate_payments,
    settle_risk (capture and completion), `batch` payments per transaction, one after
    another, then complete_payments as the saga agent would call it (nothing is left
    posted: an unlocked read); and post_batch (the bare double-entry transfer) on the
    same pairs. The ceiling of the database part of the saga on this machine.
    python_cpu_ms_per_payment is this process's CPU over all of it, post_batch included."""
    url = await bench.fresh_database()
    pool = await create_pool(url, min_size=1, max_size=2)
    try:
        wallets = await fund_wallets(pool, n_wallets)
        todo = pairs(n_wallets, n, seed)
        spent = {"initiate": 0.0, "settle": 0.0, "complete": 0.0, "post_batch": 0.0}
        cpu_before = os.times()
        async with pool.acquire() as conn:
            for start in range(0, n, batch):
                chunk = todo[start:start + batch]
                asks = [payments.PaymentRequest(
                    payment_id=uuid.uuid4(), payer_id=wallets[a].owner_id or uuid.uuid4(), from_account_id=wallets[a].id,
                    to_account_id=wallets[b].id, amount_minor=amount, currency="INR",
                    context=payments.PaymentContext(f"d{a}", "", "IN")) for a, b, amount in chunk]
                t0 = time.perf_counter()
                started = await payments.initiate_payments(conn, asks)
                t1 = time.perf_counter()
                settled = await payments.settle_risk(conn, [payments.RiskOutcome(
                    payment_id=r.payment_id, expect="funds_reserved", action="capture", detail="bench") for r in asks])
                t2 = time.perf_counter()
                completed = await payments.complete_payments(conn, [r.payment_id for r in asks])
                t3 = time.perf_counter()
                posted = await payments.post_batch(conn, [payments.TransferRequest(
                    id=uuid.uuid4(), from_account_id=wallets[a].id, to_account_id=wallets[b].id, amount_minor=amount,
                    currency="INR") for a, b, amount in chunk])
                t4 = time.perf_counter()
                assert all(r.status == "funds_reserved" for r in started) and all(r.applied for r in settled)
                assert all(r.status == "completed" for r in settled) and completed == [], "capture did not complete"
                assert all(r.status == "posted" for r in posted), "a step refused"
                for name, took in zip(spent, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
                    spent[name] += took
            cpu = os.times()
            assert await payments.find_differences(conn) == [], "the steps broke the ledger"
    finally:
        await pool.close()
    saga_s = spent["initiate"] + spent["settle"] + spent["complete"]
    return {"payments": n, "batch": batch, "completed_per_s": round(n / saga_s),
            **{f"{k}_per_s": round(n / v) for k, v in spent.items()},
            "python_cpu_ms_per_payment": round(((cpu.user + cpu.system) - (cpu_before.user + cpu_before.system))
                                               * 1000 / n, 3)}


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
        rows = await pool.fetch("SELECT id, status, completed_at FROM payments.payments WHERE id = ANY($1::uuid[])",
                                ids)
        async with pool.acquire() as conn:
            assert await payments.find_differences(conn) == [], "the ledger disagrees with its projection"
    finally:
        await pool.close()
    assert all(r["status"] == "completed" for r in rows), "a payment failed (wallets are funded for all)"
    return {r["id"]: r["completed_at"].timestamp() for r in rows}


async def kafka_run(bench: Bench, n: int, n_wallets: int, opts: argparse.Namespace, seed: int) -> dict[str, Any]:
    settings = bench.settings(await bench.fresh_database())
    pool = await create_pool(settings.database_url, max_size=4)
    try:
        wallets = await fund_wallets(pool, n_wallets)
    finally:
        await pool.close()
    await ensure_topics(settings)
    procs = start_workers(settings, opts)
    meter = Meter({"workers": [p.pid for p in procs], **stack_pids(bench.stack)},
                  trace_path(settings, "worker-1") if opts.trace else None)
    try:
        await wait_ready(settings, procs, wallets)
        requests = []
        for a, b, amount in pairs(n_wallets, n, seed):
            payer = wallets[a]
            assert payer.owner_id is not None
            requests.append(PaymentRequested(payment_id=uuid.uuid4(), payer_user_id=payer.owner_id,
                                             payer_wallet_id=payer.id, payee_wallet_id=wallets[b].id,
                                             amount_minor=amount, currency="INR", device_id=f"d{a}", country="IN"))
        # Burst: everything at once (throughput; latency is mostly time in the queue).
        # Paced (--rate): a tick's worth every TICK_S, each payment timed from its tick.
        per_tick = len(requests) if not opts.rate else max(1, round(opts.rate * TICK_S))
        sent: dict[uuid.UUID, float] = {}
        async with EventPublisher(settings) as publisher:
            meter.start()
            first_sent = time.time()
            for k, start in enumerate(range(0, len(requests), per_tick)):
                if opts.rate:
                    await asyncio.sleep(max(0.0, first_sent + k * TICK_S - time.time()))
                tick = requests[start:start + per_tick]
                at = time.time()
                await publisher.publish_many(PAYMENTS.name, [(None, b) for b in _client_batches(tick, settings)])
                sent.update(dict.fromkeys((r.payment_id for r in tick), at))
        done = await completed_at(settings, list(sent), procs)
        used = meter.stop(n)
        used["messages_per_payment"] = {t: round(m / n, 2) for t, m in (await messages_per_topic(settings)).items()}
    finally:
        stop(procs)
    return {**summary(n, first_sent, list(done.values()), [(done[p] - sent[p]) * 1000 for p in done]), **used}


def _client_batches(requests: list[PaymentRequested], settings: Settings) -> list[PaymentEventBatch]:
    """Requests batched per partition (<= 500 per message), as a batching client sends them."""
    by_partition: dict[int, list[PaymentRequested]] = {}
    for r in requests:
        by_partition.setdefault(partition_for_key(str(r.payer_wallet_id), settings.topic_partitions), []).append(r)
    return [PaymentEventBatch(payer_wallet_id=rs[i].payer_wallet_id, events=rs[i:i + 500])
            for rs in by_partition.values() for i in range(0, len(rs), 500)]


async def rest_run(bench: Bench, n: int, opts: argparse.Namespace, seed: int) -> dict[str, Any]:
    settings = msgspec.structs.replace(bench.settings(await bench.fresh_database()), api_port=free_port())
    await ensure_topics(settings)
    procs = start_workers(settings, opts)
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
            meter = Meter({"workers": [p.pid for p in procs[:-1]], "api": [procs[-1].pid], **stack_pids(bench.stack)},
                          trace_path(settings, "worker-1") if opts.trace else None)
            sent: dict[uuid.UUID, float] = {}
            in_flight = asyncio.Semaphore(opts.rest_connections)
            todo = pairs(len(wallets), n, seed)

            async def one(burst: aiohttp.ClientSession, a: int, b: int, amount: int) -> None:
                (source, headers), (target, _) = wallets[a], wallets[b]
                key = {**headers, "Idempotency-Key": uuid.uuid4().hex}
                body = {"from_wallet": str(source), "to_wallet": str(target), "amount_minor": amount, "currency": "INR"}
                async with in_flight:
                    at = time.time()
                    for attempt in range(5):
                        # A client retries a dropped connection with the same key (the
                        # Idempotency-Key makes that safe: a replay, or 409 while the first
                        # is in flight); timed from the first attempt.
                        try:
                            async with burst.post("/api/v1/payments", headers=key, json=body) as response:
                                status, text = response.status, await response.text()
                        except aiohttp.ClientConnectionError:
                            if attempt == 4:
                                raise
                            continue
                        if status != 409 or attempt == 4:
                            break
                        await asyncio.sleep(0.5)
                assert status == 202, text
                sent[uuid.UUID(json.loads(text)["id"])] = at

        # Fresh connections for the measured burst: the setup's keep-alive connections sat
        # idle while the workers started, and the server may have closed them. aiohttp, not
        # httpx, for the burst: httpx cost the client ~9 ms of CPU per request, so the
        # client (one process on the same 2 cores) was what set the pace (46/s, client at
        # 64 % of a core, API at 27 %).
        async with aiohttp.ClientSession(base_url=base, timeout=aiohttp.ClientTimeout(total=60),
                                         connector=aiohttp.TCPConnector(limit=opts.rest_connections)) as burst:
            meter.start()
            first_sent = time.time()
            await asyncio.gather(*(one(burst, *t) for t in todo))
            accepted_s = time.time() - first_sent
        done = await completed_at(settings, list(sent), procs)
        used = meter.stop(n)
    finally:
        stop(procs)
    return {**summary(n, first_sent, list(done.values()), [(done[p] - sent[p]) * 1000 for p in done]),
            "accepted_per_s": round(n / accepted_s), **used}


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
        out["postgres"] = await bench.prepare()
        kinds = ["sql", "steps", "kafka", "rest"] if args.command == "all" else [args.command]
        runs: dict[str, list[dict[str, Any]]] = {kind: [] for kind in kinds}
        # Interleaved (sql, kafka, rest, sql, ...): load from other processes changes over
        # minutes, and the ratios compare runs made under similar load.
        for i in range(args.runs):
            for kind in kinds:
                if kind == "sql":
                    run = await sql_run(bench, min(args.payments, args.sql_payments), args.wallets, seed=i)
                elif kind == "steps":
                    run = await steps_run(bench, args.payments, args.wallets, args.batch, seed=i)
                elif kind == "kafka":
                    run = await kafka_run(bench, args.payments, args.wallets, args, i)
                else:
                    run = await rest_run(bench, min(args.payments, args.rest_payments), args, i)
                run["load_avg_1m"] = round(os.getloadavg()[0], 1)
                runs[kind].append(run)
                print(kind, {k: v for k, v in run.items() if not isinstance(v, dict)}, file=sys.stderr, flush=True)
        for kind, done in runs.items():
            out[kind] = {"runs": done, "median": {k: statistics.median(r[k] for r in done) for k, v in done[0].items()
                                                  if isinstance(v, int | float)}}
        if "sql" in out:
            base = out["sql"]["median"]["completed_per_s"]
            out["vs_sql"] = {kind: round(out[kind]["median"]["completed_per_s"] / base, 2) for kind in kinds}
        out["machine"]["load_avg_1m_end"] = round(os.getloadavg()[0], 1)
        failed = False
    finally:
        bench.stop()
        if failed:
            print(f"logs kept in {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)
    return out


# What the worker's trace times (module, attribute): the saga's PostgreSQL transactions,
# the relay, the publishes and pushes, and each agent's whole batch.
_TRACED = (("services.payments", "initiate_payments"), ("services.payments", "settle_risk"),
           ("services.payments", "complete_payments"), ("db.payments", "get_payments"),
           ("services.payments_events", "relay_outbox_once"), ("agents.payments", "send_rows"),
           ("agents.payments", "request_scores"), ("agents.payments", "push_status"),
           ("agents.payments", "decode_items"), ("agents.payments", "process_batch"))


def _install_trace(path: str) -> None:
    """Time the saga's steps inside the worker (calls, items, wall seconds per step),
    written to `path` as JSON every second. Wall time includes waiting for PostgreSQL or
    the broker; steps nest (process_batch holds the others)."""
    import importlib

    stats: dict[str, list[float]] = {}

    def size(args: tuple[Any, ...]) -> int:
        for a in args:
            if isinstance(a, list | tuple) and not isinstance(a, str):
                return len(a)
        return 0

    for module_name, attr in _TRACED:
        module = importlib.import_module(module_name)
        original = getattr(module, attr)

        def wrap(fn: Any, name: str) -> Any:
            async def timed(*args: Any, **kwargs: Any) -> Any:
                if name == "process_batch":  # (app, spec, batch, agent, work)
                    name_ = f"batch {args[3]}"
                    n = len(args[2])
                else:
                    name_, n = name, size(args)
                start = time.perf_counter()
                try:
                    return await fn(*args, **kwargs)
                finally:
                    s = stats.setdefault(name_, [0, 0, 0.0])
                    s[0] += 1
                    s[1] += n
                    s[2] += time.perf_counter() - start
            return timed

        setattr(module, attr, wrap(original, attr))

    import threading

    def dump() -> None:
        while True:
            time.sleep(1.0)
            tmp = f"{path}.tmp"
            with open(tmp, "w") as f:
                json.dump({k: {"calls": int(v[0]), "items": int(v[1]), "seconds": round(v[2], 3)}
                           for k, v in list(stats.items())}, f)
            os.replace(tmp, path)

    threading.Thread(target=dump, daemon=True).start()


def _worker_main(argv: list[str]) -> None:
    """`streams.worker`, with --trace timings of the saga's steps."""
    if os.environ.get("FINTIDE_BENCH_TRACE"):
        _install_trace(os.environ["FINTIDE_BENCH_TRACE"])
    from streams.worker import main as worker_main

    worker_main(argv)


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_worker"]:
        _worker_main(argv[1:])
        return
    parser = argparse.ArgumentParser(prog="python -m ops.bench.payments", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["sql", "steps", "kafka", "rest", "all"])
    parser.add_argument("--payments", type=int, default=20_000)
    parser.add_argument("--rest-payments", type=int, default=5_000, help="payments per REST run (the client is slow)")
    parser.add_argument("--sql-payments", type=int, default=5_000, help="payments per baseline run")
    parser.add_argument("--batch", type=int, default=1_000, help="steps: payments per transaction")
    parser.add_argument("--rest-connections", type=int, default=REST_CONNECTIONS, help="rest: concurrent HTTP clients")
    parser.add_argument("--batch-wait-ms", type=int, default=0,
                        help="the workers' FINTIDE_PAYMENTS_BATCH_WAIT_MS (0: the platform default)")
    parser.add_argument("--wallets", type=int, default=1_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--fetch-wait-ms", type=int, default=0)
    parser.add_argument("--trace", action="store_true", help="time the saga's steps inside worker-1")
    parser.add_argument("--rate", type=float, default=0.0,
                        help="kafka: publish this many payments/s (paced) instead of all at once")
    args = parser.parse_args(argv)
    result = asyncio.run(_main(args))
    print(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()

