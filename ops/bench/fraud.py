"""Fraud scoring benchmarks on the embedded servers (Tansu, PostgreSQL 18, Redis 6.2).

    python -m ops.bench.fraud all [--runs 3]            # everything below, side by side
    python -m ops.bench.fraud quality [--quality-n 20000 --fraud-rate 0.05 --seeds 1 2 3]
    python -m ops.bench.fraud kernels [--n-kernels 100000] [--repeat 5]
    python -m ops.bench.fraud saga    [--payments 3000 --paced 1000 --saga-rate 100] [--runs 3]
    python -m ops.bench.fraud scorer  [--n 20000 --rate 500 --seconds 15] [--runs 3]

quality: precision / recall (flagged = review or block; and block alone), recall per
  injected pattern and AUC of the score on labelled generator traffic
  (`fintide simulate payments`) of seeds the model was not fitted on; the worker's
  kernels run offline over it (the live pipeline decides the same, payment for payment:
  tests/integration/test_fraud_pipeline.py). Median over the seeds.

kernels: the Numba work per payment (payer features, payee features, model + rules +
  decision) in batches of 1, 16, 256 and 4,096 payments, and the per-payment Python
  around it in the agents (hashing ids, building and encoding the decision).

saga: a worker running the payment saga with each scorer (`agents.payments` +
  `agents.fraud`, or + `agents.fraud_passthrough`: the saga cannot run without a risk
  step, so the pass-through scorer, which answers allow at once, is the "saga without
  the fraud step"). First --paced payments at --saga-rate per second: the risk step's
  p50 / p99, funds_reserved -> risk_assessed from the payment's own step history (the
  saga asks fraud.requests and applies the answer from fraud.decisions). Then a backlog
  of --payments published at once: completed payments/s (last completion minus first
  publish). Every payment must complete: payers pay their usual payees from their own
  device, and an allow rule keeps the model's review threshold from holding any for an
  analyst (the model still scores every payment and every rule is still evaluated).

scorer: a worker running only the scorer (model or pass-through) on `fraud.requests`.
  Latency: with a warm worker, requests at --rate per second for --seconds; for each,
  publish -> decision read back from fraud.decisions (first 2 s dropped); p50 / p99.
  Throughput: --n requests published at once; decisions/s from the first to the last.

Both scorers run interleaved (pass-through first in odd runs, model first in even ones),
so each ratio compares runs that met the same load on this shared machine; ratios and
added latencies are medians of the per-pair figures. The 1-minute load average is
recorded per run.

--fetch-wait-ms: workers' Kafka consumers wait at most this long for data per fetch
  (FINTIDE_BROKER_FETCH_MAX_WAIT_MS; 0, the default, keeps the setting's default, 10 ms).
  Tansu answers a waiting fetch only when the wait expires, so the wait is a latency floor
  per hop on the embedded broker. Apache Kafka answers at once, whatever the wait.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ops.embedded import EmbeddedStack
from ops.settings import Settings, load_settings

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 120.0
BATCHES = (1, 16, 256, 4_096)
WARM_DROP_S = 2.0
SETTLE_S = 2.0
PAYEES_PER_PAYER = 4


# ----------------------------------------------------------------------------- kernels

def bench_kernels(n: int, repeat: int) -> dict[str, Any]:
    import numpy as np

    from indicators import fraud_features as ff
    from ops.simulate import generate
    from services import fraud as scoring
    from streams.codec import encode
    from streams.fraud import RiskDecided

    data = generate(n, 0.05, 11)
    tr = data.traffic
    model, rules = scoring.load_model(), scoring.default_ruleset()
    scoring.traffic_features(generate(200, 0.05, 12).traffic, 400)  # compile / load the kernel cache
    results: dict[str, Any] = {}
    for batch in BATCHES:
        times = []
        for _ in range(repeat):
            payer_rows, payee_rows = ff.new_payer_rows(data.n_wallets), ff.new_payee_rows(data.n_wallets)
            # User, device and IP rows: one table and one kernel call in the agents.
            kinds = ((tr.user, tr.payer_h), (tr.device, tr.user_h), (tr.ip, tr.user_h))
            offsets = np.cumsum([0] + [int(index.max()) + 1 for index, _ in kinds])
            entity_rows = ff.new_entity_rows(int(offsets[-1]))
            entity_idx = np.concatenate([index + offsets[k] for k, (index, _) in enumerate(kinds)])
            entity_other = np.concatenate([other for _, other in kinds])
            entity_pay = np.concatenate([np.arange(n)] * 3)
            start = time.perf_counter()
            for lo in range(0, n, batch):
                s = slice(lo, lo + batch)
                cols = scoring.PayerColumns(tr.ts_ms[s], tr.amount[s], tr.failed[s], tr.payee_h[s], tr.device_h[s],
                                            tr.ip_h[s], tr.country_h[s], tr.payment_h[s])
                payer, _ = scoring.run_payer(payer_rows, tr.payer[s], cols)
                payee, _ = scoring.run_payee(payee_rows, tr.payee[s], tr.ts_ms[s], tr.amount[s], tr.payer_h[s],
                                             tr.payment_h[s])
                items = np.concatenate([np.arange(lo, min(lo + batch, n)) + k * n for k in range(3)])
                pay = entity_pay[items]
                out, _ = scoring.run_entity(entity_rows, entity_idx[items], tr.ts_ms[pay], tr.amount[pay],
                                            tr.failed[pay], entity_other[items], tr.payment_h[pay])
                m = pay.shape[0] // 3
                entity = np.hstack([out[k * m:(k + 1) * m] for k in range(3)])
                scoring.decide(scoring.feature_matrix(payer, payee, entity), model, rules)
            times.append((time.perf_counter() - start) / n * 1e6)
        results[f"numba_us_per_payment_batch_{batch}"] = round(statistics.median(times), 3)
    # The Python each agent spends per payment around the kernels.
    ids = data.payment_ids[:20_000]
    start = time.perf_counter()
    for pid in ids:
        scoring.stable_hash(pid)
    results["hash_us_per_id"] = round((time.perf_counter() - start) / len(ids) * 1e6, 3)
    start = time.perf_counter()
    for pid in ids:
        encode(RiskDecided(payment_id=pid, payer_wallet_id="w", score=12, decision="allow", source="model",
                           rules_fired=[], model_version=model.version))
    results["decision_build_encode_us"] = round((time.perf_counter() - start) / len(ids) * 1e6, 3)
    return results


# ----------------------------------------------------------------------------- processes

def _env(settings: Settings, fetch_wait_ms: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FINTIDE_")}
    for name in ("env", "kafka_bootstrap", "database_url", "redis_url", "data_dir", "topic_prefix", "app_id",
                 "worker_id", "fraud_scorer", "fraud_budget_ms", "fraud_fail_open_limit_minor"):
        env[f"FINTIDE_{name.upper()}"] = str(getattr(settings, name))
    env.update({"FINTIDE_WORKER_WEB_PORT": "0", "FINTIDE_LOG_LEVEL": "WARNING",
                # 0: the platform's default fetch wait (streams/kafka.py applies the setting).
                **({"FINTIDE_BROKER_FETCH_MAX_WAIT_MS": str(fetch_wait_ms)} if fetch_wait_ms > 0 else {})})
    return env


def _spawn(settings: Settings, agents: str, fetch_wait_ms: int) -> subprocess.Popen[bytes]:
    log = open(Path(settings.data_dir) / f"{settings.worker_id}.log", "ab")  # noqa: SIM115 - the child owns it
    return subprocess.Popen([sys.executable, "-m", "streams.worker", "--agents", agents], cwd=REPO,
                            env=_env(settings, fetch_wait_ms), stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(pid: int) -> float:
    """CPU time of a process and its live descendants, plus what its reaped children used
    (PostgreSQL: the postmaster, its backends and background workers)."""
    total = 0.0
    for child in Path("/proc").iterdir():
        if not child.name.isdigit():
            continue
        try:
            stat = (child / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        if int(child.name) == pid or _descends(int(child.name), pid):
            total += sum(int(f) for f in stat[11:15])
    return total / os.sysconf("SC_CLK_TCK")


def _descends(pid: int, ancestor: int) -> bool:
    while pid > 1:
        try:
            pid = int((Path(f"/proc/{pid}/stat")).read_text().rsplit(")", 1)[1].split()[1])
        except OSError:
            return False
        if pid == ancestor:
            return True
    return False


async def topic_offsets(settings: Settings) -> dict[str, int]:
    """Messages ever written per topic of this run (the sum of its partitions' end offsets),
    named without the run's prefix; tables' changelogs ("<app id>-<table>-changelog") as
    "<table>-changelog"."""
    from aiokafka import AIOKafkaConsumer
    from aiokafka.structs import TopicPartition

    from streams.topics import bootstrap_servers

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap_servers(settings))
    await consumer.start()
    try:
        owners = (settings.topic_prefix, f"{settings.app_id}-")
        names = [t for t in await consumer.topics() if t.startswith(owners)]
        tps = [TopicPartition(t, p) for t in names for p in (consumer.partitions_for_topic(t) or ())]
        ends = await consumer.end_offsets(tps) if tps else {}
    finally:
        await consumer.stop()
    out: dict[str, int] = {}
    for tp, end in ends.items():
        owner = next(o for o in owners if tp.topic.startswith(o))
        name = tp.topic[len(owner):]
        out[name] = out.get(name, 0) + end
    return out


class CostMeter:
    """CPU seconds of the worker, Tansu and PostgreSQL, and Kafka messages per topic, over
    a phase, with each process's idle CPU rate (measured just before) subtracted."""

    def __init__(self, settings: Settings, pids: dict[str, int]) -> None:
        self.settings, self.pids = settings, pids

    def _cpu(self) -> dict[str, float]:
        return {name: tree_cpu_seconds(pid) for name, pid in self.pids.items()}

    async def idle(self, seconds: float) -> None:
        before = self._cpu()
        await asyncio.sleep(seconds)
        after = self._cpu()
        self.idle_per_s = {k: (after[k] - before[k]) / seconds for k in before}

    async def start(self) -> None:
        self.cpu0, self.offsets0, self.t0 = self._cpu(), await topic_offsets(self.settings), time.perf_counter()

    async def stop(self, n: int) -> dict[str, float]:
        cpu, offsets, wall = self._cpu(), await topic_offsets(self.settings), time.perf_counter() - self.t0
        out = {f"cpu_ms_per_payment_{k}": round((cpu[k] - self.cpu0[k] - self.idle_per_s[k] * wall) / n * 1000, 3)
               for k in cpu}
        out.update({f"msgs_per_payment_{t}": round((end - self.offsets0.get(t, 0)) / n, 3)
                    for t, end in sorted(offsets.items()) if end > self.offsets0.get(t, 0)})
        return out


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _settings(base: Settings, tag: str, scorer: str, **extra: Any) -> Settings:
    prefix = f"bf{tag}{uuid.uuid4().hex[:6]}."
    data_dir = Path(base.data_dir) / prefix.rstrip(".")
    data_dir.mkdir(parents=True, exist_ok=True)
    return load_settings(environ={}, env="test", kafka_bootstrap=base.kafka_bootstrap,
                         database_url=base.database_url, redis_url=base.redis_url, data_dir=str(data_dir),
                         topic_prefix=prefix, app_id=f"fintide-{prefix.rstrip('.')}", worker_web_port=0,
                         feed_enabled=False, fraud_scorer=scorer, **extra)


class Decisions:
    """A consumer of fraud.decisions recording when each payment's first decision arrived."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.at: dict[str, float] = {}
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        from aiokafka import AIOKafkaConsumer

        from streams.fraud import DECISIONS
        from streams.topics import bootstrap_servers, ensure_topics, full_name

        await ensure_topics(self.settings)
        self._consumer = AIOKafkaConsumer(full_name(self.settings, DECISIONS.name),
                                          bootstrap_servers=bootstrap_servers(self.settings),
                                          auto_offset_reset="earliest", fetch_max_wait_ms=5)
        await self._consumer.start()
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        import msgspec

        class Head(msgspec.Struct):
            payment_id: str

        class Message(msgspec.Struct):
            # A single decision, or a fraud.decision_batch of them.
            payment_id: str = ""
            decisions: list[Head] = []

        decoder = msgspec.json.Decoder(Message)
        while True:
            batch = await self._consumer.getmany(timeout_ms=100, max_records=10_000)
            now = time.perf_counter()
            for records in batch.values():
                for record in records:
                    message = decoder.decode(record.value)
                    for head in message.decisions or [message]:
                        self.at.setdefault(head.payment_id, now)

    async def wait(self, ids: Sequence[str], timeout_s: float, proc: subprocess.Popen[bytes] | None = None) -> None:
        deadline = time.monotonic() + timeout_s
        while not all(i in self.at for i in ids):
            assert proc is None or proc.poll() is None, "the worker died"
            assert time.monotonic() < deadline, f"{sum(i not in self.at for i in ids)} decisions missing"
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._consumer.stop()


def _requests(n: int, seed: int) -> list[Any]:
    from ops.simulate import generate, request_at

    data = generate(n, 0.05, seed, days=1.0)
    shift = int(time.time() * 1000) - int(data.traffic.ts_ms[-1])
    return [request_at(data, i, shift) for i in range(n)]


async def _publish(settings: Settings, topic: str, events: Sequence[Any], rate: float | None = None,
                   sent: dict[str, float] | None = None) -> None:
    from streams.publisher import EventPublisher

    step = 500 if rate is None else max(1, int(rate // 50))
    start = time.perf_counter()
    async with EventPublisher(settings) as publisher:
        for lo in range(0, len(events), step):
            chunk = events[lo:lo + step]
            if sent is not None:
                now = time.perf_counter()
                for e in chunk:
                    sent[str(e.payment_id)] = now
            await publisher.publish_many(topic, [(None, e) for e in chunk])
            if rate is not None:
                ahead = (lo + step) / rate - (time.perf_counter() - start)
                if ahead > 0:
                    await asyncio.sleep(ahead)


def _agents(scorer: str) -> str:
    return "agents.fraud" if scorer == "model" else "agents.fraud_passthrough"


async def scorer_run(base: Settings, scorer: str, n: int, rate: float, seconds: float,
                     fetch_wait_ms: int) -> dict[str, float]:
    """Latency first (a warm, idle worker), then throughput (a backlog published at once)."""
    settings = _settings(base, "s", scorer)
    decisions = Decisions(settings)
    await decisions.start()
    proc = _spawn(settings, _agents(scorer), fetch_wait_ms)
    try:
        probe = _requests(20, seed=20)
        await _publish(settings, "fraud.requests", probe)
        await decisions.wait([r.payment_id for r in probe], START_TIMEOUT_S, proc)
        idle0 = cpu_seconds(proc.pid)
        await asyncio.sleep(3)
        idle_cpu_per_s = (cpu_seconds(proc.pid) - idle0) / 3  # timers, heartbeats, empty fetches
        live = _requests(int(rate * seconds), seed=22)
        sent: dict[str, float] = {}
        await _publish(settings, "fraud.requests", live, rate, sent)
        await decisions.wait([r.payment_id for r in live], 60, proc)
        t0 = min(sent.values())
        lat = [(decisions.at[p] - t) * 1000 for p, t in sent.items() if t - t0 >= WARM_DROP_S]
        await asyncio.sleep(5)  # let the recorder and the alert fan-out finish the live phase
        backlog = _requests(n, seed=21)
        cpu0 = cpu_seconds(proc.pid)
        await _publish(settings, "fraud.requests", backlog)
        await decisions.wait([r.payment_id for r in backlog], 60 + n / 200, proc)
        first = min(decisions.at[r.payment_id] for r in backlog)
        last = max(decisions.at[r.payment_id] for r in backlog)
        await asyncio.sleep(3)  # the recorder's share of this backlog belongs to its cost
        cpu = cpu_seconds(proc.pid) - cpu0 - 3 * idle_cpu_per_s
    finally:
        _stop(proc)
        await decisions.stop()
    return {"scored_per_s": round(n / max(last - first, 1e-9)),
            "cpu_us_per_payment": round(cpu / n * 1e6),
            "idle_cpu_pct": round(idle_cpu_per_s * 100, 1),
            "latency_p50_ms": round(float(np.percentile(lat, 50)), 2),
            "latency_p99_ms": round(float(np.percentile(lat, 99)), 2)}


# ----------------------------------------------------------------------------- saga

async def _fund(settings: Settings, n_wallets: int, amount_minor: int) -> list[Any]:
    from db.engine import create_pool
    from services import payments

    pool = await create_pool(settings.database_url)
    wallets = []
    try:
        async with pool.acquire() as conn:
            for _ in range(n_wallets):
                owner = uuid.uuid4()
                wallet = await payments.open_wallet(conn, owner, "INR")
                pending = await payments.begin_deposit(conn, deposit_id=uuid.uuid4(), owner_id=owner,
                                                       wallet_id=wallet.id, amount_minor=amount_minor,
                                                       currency="INR", gateway="bench")
                await payments.settle_deposit(conn, pending.id, gateway_ref=None)
                wallets.append(wallet)
    finally:
        await pool.close()
    return wallets


async def _allow_everything(settings: Settings) -> None:
    import asyncpg

    conn = await asyncpg.connect(settings.database_url)
    try:
        await conn.execute("INSERT INTO fraud.rules (id, expression, action, priority, description) VALUES "
                           "('bench-allow', 'amount_minor > 0', 'allow', 0, 'benchmark: every payment completes') "
                           "ON CONFLICT (id) DO NOTHING")
    finally:
        await conn.close()


async def _finished(settings: Settings, ids: Sequence[uuid.UUID], timeout_s: float,
                    proc: subprocess.Popen[bytes]) -> dict[uuid.UUID, dict[str, float]]:
    """Per payment, when each saga step happened (epoch seconds), once all are completed."""
    import asyncpg

    conn = await asyncpg.connect(settings.database_url)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            rows = await conn.fetch("SELECT id, status, reserved_at, assessed_at, completed_at FROM payments.payments "
                                    "WHERE id = ANY($1::uuid[]) AND status IN ('completed', 'failed', 'under_review')",
                                    list(ids))
            if len(rows) == len(ids):
                break
            assert proc.poll() is None, "the worker died"
            assert time.monotonic() < deadline, f"{len(ids) - len(rows)} payments unfinished"
            await asyncio.sleep(0.25)
    finally:
        await conn.close()
    failed = [r["id"] for r in rows if r["status"] != "completed"]
    assert not failed, f"{len(failed)} payments failed"
    out = {}
    for r in rows:
        # The steps' times are columns of the payment row (db/migrations/payments/0002).
        out[r["id"]] = {status: r[column].timestamp() for status, column in
                        (("funds_reserved", "reserved_at"), ("risk_assessed", "assessed_at"), ("completed", "completed_at"))}
    return out


def _risk_step_ms(done: dict[uuid.UUID, dict[str, float]]) -> list[float]:
    """funds_reserved -> risk_assessed: the saga asks fraud.requests and applies the answer
    from fraud.decisions; everything else in the saga is outside this interval."""
    return [(s["risk_assessed"] - s["funds_reserved"]) * 1000 for s in done.values()]


async def _saga_probe(settings: Settings, wallets: list[Any], proc: subprocess.Popen[bytes]) -> None:
    """One payment through the warm-up (group join, JIT, recovery) before measuring."""
    from streams.payments import PaymentRequested

    probe = PaymentRequested(payment_id=uuid.uuid4(), payer_user_id=wallets[0].owner_id, payer_wallet_id=wallets[0].id,
                             payee_wallet_id=wallets[1].id, amount_minor=100, currency="INR")
    await _publish(settings, "payments.events", [probe])
    await _finished(settings, [probe.payment_id], START_TIMEOUT_S, proc)


def _payments(wallets: list[Any], n: int, seed: int) -> list[Any]:
    from streams.payments import PaymentRequested

    # Ordinary customers: each payer pays one of its PAYEES_PER_PAYER usual payees from its
    # own device, so no default rule fires (random pairs among all wallets would look like
    # mule fan-in: many payers, each new to the payee) and every payment completes.
    rng = np.random.default_rng(seed)
    payers = rng.integers(0, len(wallets), size=n)
    offsets = rng.integers(1, PAYEES_PER_PAYER + 1, size=n)
    return [PaymentRequested(payment_id=uuid.uuid4(), payer_user_id=wallets[a].owner_id,
                             payer_wallet_id=wallets[a].id, payee_wallet_id=wallets[(a + k) % len(wallets)].id,
                             amount_minor=int(rng.integers(100, 5_000)), currency="INR",
                             device_id=f"dev-{a}", ip=f"10.0.0.{a % 250}", country="IN")
            for a, k in zip(payers.tolist(), offsets.tolist(), strict=True)]


async def saga_run(base: Settings, scorer: str, n: int, paced: int, rate: float, fetch_wait_ms: int,
                   servers: dict[str, int]) -> dict[str, float]:
    """One worker running the saga with `scorer`: latency at a paced rate, then throughput
    on a backlog of `n` payments published at once, with the CPU each process spent on it
    (idle rates subtracted) and the Kafka messages per topic, per payment."""
    settings = _settings(base, "p", scorer, fraud_budget_ms=60_000)
    wallets = await _fund(settings, 100, 10_000_000)
    if scorer == "model":
        await _allow_everything(settings)
    load = os.getloadavg()[0]
    proc = _spawn(settings, f"agents.payments,{_agents(scorer)}", fetch_wait_ms)
    try:
        await _saga_probe(settings, wallets, proc)
        live = _payments(wallets, paced, seed=4)
        await _publish(settings, "payments.events", live, rate)
        paced_done = await _finished(settings, [e.payment_id for e in live], 300, proc)
        backlog = _payments(wallets, n, seed=5)
        meter = CostMeter(settings, {"worker": proc.pid, **servers})
        await asyncio.sleep(2)  # the recorder and alert fan-out of the paced phase
        await meter.idle(3)
        await meter.start()
        sent: dict[str, float] = {}
        wall0, perf0 = time.time(), time.perf_counter()
        await _publish(settings, "payments.events", backlog, None, sent)
        done = await _finished(settings, [e.payment_id for e in backlog], 600, proc)
        await asyncio.sleep(SETTLE_S)  # the recorder's and the changelogs' share belongs to the cost
        cost = await meter.stop(n)
    finally:
        _stop(proc)
    first_sent = wall0 + (min(sent.values()) - perf0)
    risk = _risk_step_ms(paced_done)
    return {"completed_per_s": round(n / (max(s["completed"] for s in done.values()) - first_sent)),
            "risk_step_p50_ms": round(float(np.percentile(risk, 50)), 1),
            "risk_step_p99_ms": round(float(np.percentile(risk, 99)), 1),
            "load_1m": round(load, 2), **cost}


# ----------------------------------------------------------------------------- quality

def quality(n: int, fraud_rate: float, seeds: Sequence[int]) -> dict[str, Any]:
    """The score on labelled generator traffic the model was not fitted on (it was fitted on
    seed 7, ops/models/fraud_weights.json): the worker's kernels, offline, in event order
    (tests/integration/test_fraud_pipeline.py checks the live pipeline decides the same)."""
    from ops.simulate import generate, report, score_offline

    per_seed = []
    for seed in seeds:
        data = generate(n, fraud_rate, seed)
        scores, decisions, _ = score_offline(data)
        r = report(data, scores, decisions)
        per_seed.append({"seed": seed, "auc": r["auc"],
                         "flagged_precision": r["flagged"]["precision"], "flagged_recall": r["flagged"]["recall"],
                         "blocked_precision": r["blocked"]["precision"], "blocked_recall": r["blocked"]["recall"],
                         "normal_flag_rate": r["normal_flag_rate"],
                         **{f"recall_{k}": v["flagged_recall"] for k, v in r["patterns"].items()}})
    return {"command": f"fintide simulate payments --n {n} --fraud-rate {fraud_rate} --seed S",
            "median": _median_runs([{k: v for k, v in r.items() if k != "seed"} for r in per_seed]),
            "seeds": per_seed}


# ----------------------------------------------------------------------------- main

def _median_runs(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: round(statistics.median(r[k] for r in runs), 4) for k in runs[0]}


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


async def _interleaved(runs: int, run: Any) -> dict[str, Any]:
    """`run(scorer)` for both scorers, alternating which goes first, so both sides of every
    ratio met the same load on this shared machine."""
    pairs = []
    for i in range(runs):
        order = ("passthrough", "model") if i % 2 == 0 else ("model", "passthrough")
        pair = {scorer: await run(scorer) for scorer in order}
        pairs.append(pair)
        print(json.dumps({"run": i + 1, **pair}), file=sys.stderr, flush=True)
    return {"passthrough": _median_runs([p["passthrough"] for p in pairs]),
            "model": _median_runs([p["model"] for p in pairs]), "runs": pairs}


def _saga_ratios(pairs: list[dict[str, dict[str, float]]]) -> dict[str, float]:
    """Per interleaved pair: model throughput / pass-through's, and the latency the model adds."""
    ratio = [p["model"]["completed_per_s"] / p["passthrough"]["completed_per_s"] for p in pairs]
    add50 = [p["model"]["risk_step_p50_ms"] - p["passthrough"]["risk_step_p50_ms"] for p in pairs]
    add99 = [p["model"]["risk_step_p99_ms"] - p["passthrough"]["risk_step_p99_ms"] for p in pairs]
    return {"throughput_ratio_median": round(statistics.median(ratio), 3),
            "throughput_ratios": [round(r, 3) for r in ratio],
            "added_p50_ms_median": round(statistics.median(add50), 1),
            "added_p99_ms_median": round(statistics.median(add99), 1)}


async def _main(args: argparse.Namespace, base: Settings, servers: dict[str, int] | None = None) -> None:
    servers = servers or {}
    out: dict[str, Any] = {"machine": machine(), "load_before": _load(), "fetch_wait_ms": args.fetch_wait_ms}
    if args.command in ("quality", "all"):
        out["quality"] = quality(args.quality_n, args.fraud_rate, args.seeds)
    if args.command in ("kernels", "all"):
        out["kernels"] = bench_kernels(args.n_kernels, args.repeat)
    if args.command in ("saga", "all"):
        saga = await _interleaved(args.runs, lambda scorer: saga_run(
            base, scorer, args.payments, args.paced, args.saga_rate, args.fetch_wait_ms, servers))
        saga["vs_pass_through"] = _saga_ratios(saga["runs"])
        out["saga"] = saga
    if args.command in ("scorer", "all"):
        out["scorer"] = await _interleaved(args.runs, lambda scorer: scorer_run(
            base, scorer, args.n, args.rate, args.seconds, args.fetch_wait_ms))
    out["load_after"] = _load()
    print(json.dumps(out, indent=2))


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m ops.bench.fraud", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["quality", "kernels", "scorer", "saga", "all"])
    parser.add_argument("--quality-n", type=int, default=20_000, help="quality: payments per seed")
    parser.add_argument("--fraud-rate", type=float, default=0.05, help="quality: share of fraud payments")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="quality: generator seeds")
    parser.add_argument("--n-kernels", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--n", type=int, default=20_000, help="scorer: backlog of requests")
    parser.add_argument("--rate", type=float, default=500.0, help="scorer: requests/s for the latency run")
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--payments", type=int, default=3_000, help="saga: backlog for throughput")
    parser.add_argument("--paced", type=int, default=1_000, help="saga: paced payments for latency")
    parser.add_argument("--saga-rate", type=float, default=100.0, help="saga: paced payments/s")
    parser.add_argument("--runs", type=int, default=3, help="interleaved runs per side (medians over them)")
    parser.add_argument("--fetch-wait-ms", type=int, default=0,
                        help="workers' consumer fetch wait (FINTIDE_BROKER_FETCH_MAX_WAIT_MS); 0: the setting's default")
    args = parser.parse_args(argv)
    if args.command in ("kernels", "quality"):
        asyncio.run(_main(args, load_settings(environ={})))
        return
    with tempfile.TemporaryDirectory(prefix="fintide-bench-fraud-") as tmp:
        stack = EmbeddedStack(Path(tmp) / "stack").start()
        try:
            from db.migrate import migrate_all

            asyncio.run(migrate_all(stack.database_url))
            base = load_settings(environ={}, env="test", data_dir=str(Path(tmp) / "data"),
                                 kafka_bootstrap=stack.kafka_bootstrap, database_url=stack.database_url,
                                 redis_url=stack.redis_url)
            pids = {name: s.proc.pid for name in ("kafka", "postgres") if (s := stack.server(name)).proc}
            asyncio.run(_main(args, base, pids))
        finally:
            stack.stop()



if __name__ == "__main__":
    main()
