"""Fraud agents: the payment saga's real-time risk scorer, and what analysts read.

Pipeline (docs/FRAUD.md has the picture):

1. `fraud.payer` consumes `fraud.requests` (key: payer wallet) in `take_events` batches:
   one Numba call updates the payer rows of the batch and computes the payer features;
   the payments are then grouped by the partition of their *payee* wallet and sent, one
   `PayeeBatch` per partition, to `fraud.by_payee` (the repartition that puts a payee's
   fan-in state on the worker that owns the payee key).
2. `fraud.payee` consumes `fraud.by_payee`: one Numba call updates the payee rows (fan-in),
   one scores, rules and decides every payment; it publishes a `RiskDecided` per payment on
   `fraud.decisions` (key: payer wallet) and a `FraudAlert` per review or block.
3. `fraud.recorder` stores decisions in PostgreSQL (scores, the review queue);
   `fraud.alerts` stores alerts and fans them out on Redis to `WS /ws/fraud/alerts`;
   a leader-only timer re-publishes analysts' review decisions the API could not publish.

At-least-once: every message a batch sends (next stage, decisions, alerts, dead letters)
is sent immediately and awaited before the batch is acknowledged, so its offsets are only
committed after its effects reached Kafka. (`send_event` attaches sends to the offset
commit instead, which would hold each decision back for up to Faust's commit interval —
seconds — on the payment's critical path.) The stages send through their own aiokafka
producer (`FraudStore.send`, acks=all, 5 ms linger, as the payments agents do), not
Faust's topic.send: on the shared producer each batch waited ~30-40 ms for its sends
behind the tables' changelog traffic (measured in the saga benchmark: ~1 payment per
batch, ~30 payments/s). A redelivered request is recognised by the
rows' ring of recent payment ids: scored again (the saga keeps the first answer) without
counting twice.

Rules are reloaded without a restart: `RulesService` polls `fraud.rules_version` every
`RULES_POLL_S` and recompiles when it moved. Scoring waits for the first load (so no
payment is decided without the block rules); a later database outage keeps the last rules.

The scorer runs when the `fraud_scorer` setting selects it ("model", the default here);
the saga's pass-through scorer (agents/fraud_passthrough.py) answers otherwise.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections import defaultdict
from collections.abc import Awaitable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import asyncpg
import faust.streams as faust_streams
import msgspec
import numpy as np
from aiokafka import AIOKafkaProducer
from faust.types import EventT, TopicT
from faust.web import Request, Response, View
from mode import Service
from prometheus_client import Counter, Gauge, Histogram
from redis.exceptions import RedisError

from db import fraud as db
from db.engine import create_pool, dsn_for
from indicators import fraud_features as ff
from indicators import risk_model as rm
from services import fraud as scoring
from services.fraud_rules import RuleError, RuleSet, compile_rules
from streams.app import FintideApp, dead_letter_topic, event_topic, routed_table_view
from streams.codec import DecodeFailure, encode
from streams.dlq import EmptyValue, dead_letter
from streams.fraud import (
    ALERTS,
    BY_PAYEE,
    DECISIONS,
    MAX_PAYEE_BATCH,
    REQUESTS,
    FraudAlert,
    PayeeBatch,
    RiskDecided,
    ScoreRequested,
    alerts_channel,
    partition_for_key,
    payee_batch,
)
from streams.metrics import EVENTS_DLQ, EVENTS_PROCESSED
from streams.topics import TopicSpec, bootstrap_servers
from tables.fraud import (
    payee_row,
    payee_state,
    payee_table,
    payee_view,
    payer_row,
    payer_state,
    payer_table,
    payer_view,
)

log = logging.getLogger("fintide.agents.fraud")
E = TypeVar("E")

SCORER_NAME = "model"
AGENT_PAYER, AGENT_PAYEE = "fraud.payer", "fraud.payee"
AGENT_RECORDER, AGENT_ALERTS = "fraud.recorder", "fraud.alerts"
# Batches: at most this many messages per take; an idle stage waits at most this long
# for more (the latency a lone payment pays per stage).
TAKE_MAX = 1_024
TAKE_WITHIN_S = 0.001
RECORD_MAX = 2_000
RECORD_WITHIN_S = 0.2
RULES_POLL_S = 1.0
RELAY_INTERVAL_S = 1.0
RELAY_BATCH = 200
# A decision the API could not publish is re-published once it is this old.
RELAY_AFTER_S = 5.0
DB_RETRY_MAX_S = 5.0
PRODUCER_LINGER_MS = 5

DECISIONS_TOTAL = Counter("fintide_fraud_decisions_total", "Model decisions published.", ["decision"])
REDELIVERED = Counter("fintide_fraud_redelivered_total", "Requests scored again after a redelivery.", ["stage"])
BATCH_SECONDS = Histogram("fintide_fraud_batch_seconds", "Time to process one take() batch.", ["stage"],
                          buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5))
RULES_VERSION = Gauge("fintide_fraud_rules_version", "Version of the rules this worker scores with.")
RULES_INVALID = Counter("fintide_fraud_rules_invalid_total", "Stored rules that failed to compile (skipped).")
ALERTS_UNDELIVERED = Counter("fintide_fraud_alerts_undelivered_total", "Alerts not fanned out (Redis down).")


def scorer_selected(app: FintideApp) -> bool:
    # `fraud_scorer` is the payments saga's setting; without it this scorer is the one.
    return str(getattr(app.settings, "fraud_scorer", SCORER_NAME)) == SCORER_NAME


def install(app: FintideApp) -> None:
    store = FraudStore(app)
    app.service(store)
    if scorer_selected(app):
        _install_scorer(app, store)
    _install_recorders(app, store)

    @app.timer(RELAY_INTERVAL_S, on_leader=True)
    async def relay_review_decisions() -> None:
        await relay_reviews(app, store)


# ----------------------------------------------------------------------------- services

class RulesService(Service):
    """The compiled rules, reloaded whenever `fraud.rules_version` moves."""

    def __init__(self, store: FraudStore, **kwargs: Any) -> None:
        self.store = store
        self.ruleset: RuleSet | None = None
        self._loaded = asyncio.Event()
        super().__init__(**kwargs)

    async def current(self) -> RuleSet:
        """The rules to score with; waits for the first load."""
        if self.ruleset is None:
            await self._loaded.wait()
        assert self.ruleset is not None
        return self.ruleset

    @Service.task
    async def _poll(self) -> None:
        while not self.should_stop:
            try:
                await self.refresh()
            except (asyncio.TimeoutError, OSError, asyncpg.PostgresError) as exc:
                log.warning("fraud rules not refreshed", extra={"error": f"{type(exc).__name__}: {exc}"})
            await self.sleep(RULES_POLL_S)

    async def refresh(self) -> bool:
        pool = await self.store.pool()
        version = await db.rules_version(pool)
        if self.ruleset is not None and version == self.ruleset.version:
            return False
        async with pool.acquire() as conn:
            version, rows = await db.load_rules(conn)
        self.ruleset = compile_valid(rows, version)
        RULES_VERSION.set(version)
        self._loaded.set()
        log.info("fraud rules loaded", extra={"version": version, "rules": list(self.ruleset.ids)})
        return True


def compile_valid(rows: Sequence[db.RuleRow], version: int) -> RuleSet:
    """Compile the stored rules, skipping (and counting) any that no longer compile: the
    API validates every edit, so this only happens when a feature was renamed."""
    good = []
    for row in rows:
        try:
            compile_rules([row.rule()])
        except RuleError as exc:
            RULES_INVALID.inc()
            log.error("fraud rule skipped", extra={"rule": row.id, "error": str(exc)})
            continue
        good.append(row.rule())
    return compile_rules(good, version)


class FraudStore(Service):
    """The fraud schema's pool, the Redis client and the stages' Kafka producer, opened on
    first use (the worker must start, and say why it waits, while PostgreSQL, Redis or the
    broker is still coming up)."""

    def __init__(self, app: FintideApp, **kwargs: Any) -> None:
        self.app = app
        self._pool: asyncpg.Pool | None = None
        self._redis: Any = None
        self._producer: AIOKafkaProducer | None = None
        self._lock = asyncio.Lock()
        super().__init__(**kwargs)

    async def producer(self) -> AIOKafkaProducer:
        if self._producer is None:
            async with self._lock:
                if self._producer is None:
                    producer = AIOKafkaProducer(
                        bootstrap_servers=bootstrap_servers(self.app.settings),
                        client_id=f"{self.app.settings.app_id}-fraud", acks="all",
                        # A few ms of linger lets a batch's sends share produce requests.
                        linger_ms=PRODUCER_LINGER_MS)
                    await producer.start()
                    self._producer = producer
        return self._producer

    async def send(self, topic: TopicT, key: str | bytes | None, value: bytes,
                   partition: int | None = None) -> Awaitable[Any]:
        """Hand a message to the producer; the caller awaits the returned future (its
        acknowledgement) before acknowledging the batch that caused it."""
        encoded = key.encode() if isinstance(key, str) else key
        producer = await self.producer()
        return await producer.send(topic.get_topic_name(), value=value, key=encoded, partition=partition)

    async def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            async with self._lock:
                if self._pool is None:
                    settings = self.app.settings
                    self._pool = await create_pool(dsn_for(settings.database_url, "fraud"), min_size=1, max_size=4)
        return self._pool

    def redis(self) -> Any:
        if self._redis is None:
            from redis.asyncio import Redis

            self._redis = Redis.from_url(self.app.settings.redis_url, socket_timeout=2.0)
        return self._redis

    async def on_stop(self) -> None:
        if self._producer is not None:
            await self._producer.stop()  # flushes what is still buffered
        if self._pool is not None:
            await self._pool.close()
        if self._redis is not None:
            await self._redis.aclose()


# ----------------------------------------------------------------------------- batches

@contextmanager
def acting_for(event: EventT) -> Iterator[None]:
    """Make `event` Faust's current event while reading or writing one key's table row.

    Faust stores a key in the RocksDB partition (and changelog partition) of the current
    event's message. A take_events() batch mixes partitions, so before touching a key the
    agent makes the message that carried that key current: Faust's own per-message path,
    one key at a time. (faust.streams keeps the current event in a private ContextVar.)"""
    token = faust_streams._current_event.set(weakref.ref(event))
    try:
        yield
    finally:
        faust_streams._current_event.reset(token)


async def decode_events(app: FintideApp, spec: TopicSpec[E], events: Sequence[EventT], agent: str,
                        pending: list[Awaitable[Any]]) -> list[tuple[EventT, E]]:
    """`typed_stream` for a batch: decoded events, the rest dead-lettered."""
    decoded: list[tuple[EventT, E]] = []
    for event in events:
        value = event.message.value
        try:
            if not value:
                raise EmptyValue("message has no value")
            decoded.append((event, spec.decode(value)))
        except (*DecodeFailure, EmptyValue) as exc:
            pending.append(await reject_event(app, spec, event, exc, agent))
    return decoded


async def reject_event(app: FintideApp, spec: TopicSpec[Any], event: EventT, exc: Exception,
                       agent: str) -> Awaitable[Any]:
    message = event.message
    record = dead_letter(spec.name, message.partition, message.offset, message.key, message.value, exc, agent,
                         message_ts_ms=int(message.timestamp * 1000) if message.timestamp else None)
    log.warning("dead letter", extra={"topic": spec.name, "partition": message.partition,
                                      "offset": message.offset, "error": record.error})
    EVENTS_DLQ.labels(spec.name).inc()
    return await dead_letter_topic(app, spec).send(key=message.key, value=encode(record), force=True)


# ----------------------------------------------------------------------------- scorer

def _install_scorer(app: FintideApp, store: FraudStore) -> None:
    payers = payer_table(app)
    payees = payee_table(app)
    model = scoring.load_model()
    rules = RulesService(store)
    app.service(rules)
    by_payee = event_topic(app, BY_PAYEE)

    @app.agent(event_topic(app, REQUESTS), name=AGENT_PAYER)
    async def payer_stage(stream: Any) -> None:
        async for events in stream.take_events(TAKE_MAX, within=TAKE_WITHIN_S):
            started = time.perf_counter()
            pending: list[Awaitable[Any]] = []
            batch = await decode_events(app, REQUESTS, events, AGENT_PAYER, pending)
            valid = []
            for event, request in batch:
                problem = scoring.check_request(request)
                if problem:
                    pending.append(await reject_event(app, REQUESTS, event, ValueError(problem), AGENT_PAYER))
                else:
                    valid.append((event, request))
            if valid:
                pending += await score_payers(app, store, payers, by_payee, valid)
            await asyncio.gather(*pending)
            EVENTS_PROCESSED.labels(REQUESTS.name, AGENT_PAYER).inc(len(valid))
            BATCH_SECONDS.labels("payer").observe(time.perf_counter() - started)

    @app.agent(by_payee, name=AGENT_PAYEE)
    async def payee_stage(stream: Any) -> None:
        async for events in stream.take_events(TAKE_MAX, within=TAKE_WITHIN_S):
            started = time.perf_counter()
            pending: list[Awaitable[Any]] = []
            batches = await decode_events(app, BY_PAYEE, events, AGENT_PAYEE, pending)
            columns = []
            for event, batch in batches:
                try:
                    columns.append((event, batch, batch.columns()))
                except ValueError as exc:
                    pending.append(await reject_event(app, BY_PAYEE, event, exc, AGENT_PAYEE))
            if columns:
                pending += await decide_payments(app, store, payees, model, await rules.current(), columns)
            await asyncio.gather(*pending)
            EVENTS_PROCESSED.labels(BY_PAYEE.name, AGENT_PAYEE).inc(len(columns))
            BATCH_SECONDS.labels("payee").observe(time.perf_counter() - started)

    routed_table_view(app, payers, "/fraud/payers/{key}", render=payer_view)
    routed_table_view(app, payees, "/fraud/payees/{key}", render=payee_view)

    class StatusView(View):
        async def get(self, request: Request) -> Response:
            ruleset = rules.ruleset
            return self.json({"scorer": SCORER_NAME, "model_version": model.version,
                              "rules_version": ruleset.version if ruleset else None,
                              "rules": list(ruleset.ids) if ruleset else []})

    app.page("/fraud/status", name="fraud-status")(StatusView)


def _key_events(keys: Sequence[str], events: Sequence[EventT]) -> tuple[list[str], dict[str, int], list[EventT]]:
    """Distinct keys in first-seen order, their row index, and one carrying event each."""
    index: dict[str, int] = {}
    carriers: list[EventT] = []
    for key, event in zip(keys, events, strict=True):
        if key not in index:
            index[key] = len(carriers)
            carriers.append(event)
    return list(index), index, carriers


async def score_payers(app: FintideApp, store: FraudStore, table: Any, by_payee: TopicT,
                       batch: Sequence[tuple[EventT, ScoreRequested]]) -> list[Awaitable[Any]]:
    """Payer features for a batch; rows written back; one PayeeBatch per payee partition."""
    requests = [r for _, r in batch]
    keys, index, carriers = _key_events([r.payer_wallet_id for r in requests], [e for e, _ in batch])
    rows = np.empty((len(keys), ff.PAYER_WIDTH))
    for k, key in enumerate(keys):
        with acting_for(carriers[k]):
            rows[k] = payer_row(table.get(key))
    row_idx = np.fromiter((index[r.payer_wallet_id] for r in requests), dtype=np.int64, count=len(requests))
    features, dup = scoring.run_payer(rows, row_idx, scoring.payer_columns(requests))
    changed = np.zeros(len(keys), dtype=np.bool_)
    changed[row_idx[~dup]] = True
    for k in np.flatnonzero(changed):
        with acting_for(carriers[k]):
            table[keys[k]] = payer_state(rows[k])
    if dup.any():
        REDELIVERED.labels("payer").inc(int(dup.sum()))
    return await forward_to_payees(app, store, by_payee, requests, features)


async def forward_to_payees(app: FintideApp, store: FraudStore, by_payee: TopicT, requests: Sequence[ScoreRequested],
                            features: np.ndarray) -> list[Awaitable[Any]]:
    n_partitions = BY_PAYEE.partition_count(app.settings)
    groups: dict[int, list[int]] = defaultdict(list)
    for i, r in enumerate(requests):
        groups[partition_for_key(r.payee_wallet_id, n_partitions)].append(i)
    pending = []
    for partition, members in groups.items():
        for lo in range(0, len(members), MAX_PAYEE_BATCH):
            part = members[lo:lo + MAX_PAYEE_BATCH]
            batch = payee_batch(partition, [requests[i] for i in part], features[part])
            pending.append(await store.send(by_payee, batch.key, encode(batch), partition))
    return pending


async def decide_payments(app: FintideApp, store: FraudStore, table: Any, model: scoring.Model, rules: RuleSet,
                          columns: Sequence[tuple[EventT, PayeeBatch, tuple[np.ndarray, ...]]]) -> list[Awaitable[Any]]:
    """Payee features, then score, rules and decision for every payment of the batches."""
    carriers_per_payment = [event for event, batch, _ in columns for _ in range(batch.count)]
    payees = [p for _, batch, _ in columns for p in batch.payee_wallet_ids]
    payers = [p for _, batch, _ in columns for p in batch.payer_wallet_ids]
    payments = [p for _, batch, _ in columns for p in batch.payment_ids]
    ts = np.concatenate([c[0] for _, _, c in columns])
    amount = np.concatenate([c[1] for _, _, c in columns])
    payer_features = np.vstack([c[2] for _, _, c in columns])
    keys, index, carriers = _key_events(payees, carriers_per_payment)
    rows = np.empty((len(keys), ff.PAYEE_WIDTH))
    for k, key in enumerate(keys):
        with acting_for(carriers[k]):
            rows[k] = payee_row(table.get(key))
    row_idx = np.fromiter((index[p] for p in payees), dtype=np.int64, count=len(payees))
    payer_h = np.fromiter((scoring.stable_hash(p) for p in payers), dtype=np.int64, count=len(payers))
    payment_h = np.fromiter((scoring.stable_hash(p) for p in payments), dtype=np.int64, count=len(payments))
    payee_features, dup = scoring.run_payee(rows, row_idx, ts, amount, payer_h, payment_h)
    changed = np.zeros(len(keys), dtype=np.bool_)
    changed[row_idx[~dup]] = True
    for k in np.flatnonzero(changed):
        with acting_for(carriers[k]):
            table[keys[k]] = payee_state(rows[k])
    if dup.any():
        REDELIVERED.labels("payee").inc(int(dup.sum()))
    scored = scoring.decide(scoring.feature_matrix(payer_features, payee_features), model, rules)
    return await publish_decisions(app, store, model, rules, columns, scored)


async def publish_decisions(app: FintideApp, store: FraudStore, model: scoring.Model, rules: RuleSet,
                            columns: Sequence[tuple[EventT, PayeeBatch, tuple[np.ndarray, ...]]],
                            scored: scoring.Scored) -> list[Awaitable[Any]]:
    decisions_topic = event_topic(app, DECISIONS)
    alerts_topic = event_topic(app, ALERTS)
    pending = []
    i = 0
    for _, batch, _ in columns:
        for j in range(batch.count):
            code = int(scored.decisions[i])
            fired = scoring.rules_fired(scored, i, rules)
            top = scoring.top_features(scored, i)
            decided = RiskDecided(
                payment_id=batch.payment_ids[j], payer_wallet_id=batch.payer_wallet_ids[j],
                score=int(scored.scores[i]), decision=rm.DECISIONS[code], source="model", rules_fired=fired,
                top_features=top, model_version=model.version, payer_user_id=batch.payer_user_ids[j],
                payee_wallet_id=batch.payee_wallet_ids[j], amount_minor=int(scored.x[i, 0]),
                currency=batch.currencies[j])
            pending.append(await store.send(decisions_topic, decided.payer_wallet_id, encode(decided)))
            if code != rm.ALLOW:
                alert = alert_for(decided)
                pending.append(await store.send(alerts_topic, alert.payer_wallet_id, encode(alert)))
            i += 1
    for code, name in enumerate(rm.DECISIONS):
        count = int((scored.decisions == code).sum())
        if count:
            DECISIONS_TOTAL.labels(name).inc(count)
    return pending


def alert_for(decided: RiskDecided) -> FraudAlert:
    return FraudAlert(
        payment_id=decided.payment_id, payer_wallet_id=decided.payer_wallet_id,
        payer_user_id=decided.payer_user_id, payee_wallet_id=decided.payee_wallet_id,
        amount_minor=decided.amount_minor, currency=decided.currency, score=decided.score,
        decision=decided.decision, severity="high" if decided.decision == "block" else "medium",
        rules_fired=decided.rules_fired, top_features=decided.top_features, model_version=decided.model_version)


# ----------------------------------------------------------------------------- recorders

def _install_recorders(app: FintideApp, store: FraudStore) -> None:
    @app.agent(event_topic(app, DECISIONS), name=AGENT_RECORDER)
    async def record_decisions(stream: Any) -> None:
        async for events in stream.take_events(RECORD_MAX, within=RECORD_WITHIN_S):
            pending: list[Awaitable[Any]] = []
            decided = await decode_events(app, DECISIONS, events, AGENT_RECORDER, pending)
            rows = [score_row(d) for _, d in decided if d.source == "model"]
            if rows:
                await with_db_retry(store, lambda conn: db.record_scores(conn, rows))
            await asyncio.gather(*pending)
            EVENTS_PROCESSED.labels(DECISIONS.name, AGENT_RECORDER).inc(len(decided))

    @app.agent(event_topic(app, ALERTS), name=AGENT_ALERTS)
    async def record_alerts(stream: Any) -> None:
        channel = alerts_channel(app.settings)
        async for events in stream.take_events(RECORD_MAX, within=RECORD_WITHIN_S):
            pending: list[Awaitable[Any]] = []
            alerts = [a for _, a in await decode_events(app, ALERTS, events, AGENT_ALERTS, pending)]
            if alerts:
                rows = [alert_row(a) for a in alerts]
                await with_db_retry(store, lambda conn: db.record_alerts(conn, rows))
                await fan_out(store, channel, alerts)
            await asyncio.gather(*pending)
            EVENTS_PROCESSED.labels(ALERTS.name, AGENT_ALERTS).inc(len(alerts))


def score_row(d: RiskDecided) -> db.ScoreRow:
    return db.ScoreRow(
        payment_id=d.payment_id, event_id=d.id, payer_wallet_id=d.payer_wallet_id, payer_user_id=d.payer_user_id,
        payee_wallet_id=d.payee_wallet_id, amount_minor=max(0, d.amount_minor), currency=d.currency,
        score=min(100, max(0, d.score)), decision=d.decision, rules_fired=list(d.rules_fired),
        top_features=[msgspec.to_builtins(f) for f in d.top_features], model_version=d.model_version,
        decided_at=db.ms_to_dt(d.ts_ms))


def alert_row(a: FraudAlert) -> db.AlertRow:
    return db.AlertRow(id=a.id, payment_id=a.payment_id, payer_wallet_id=a.payer_wallet_id, severity=a.severity,
                       score=a.score, decision=a.decision, rules_fired=list(a.rules_fired),
                       body=msgspec.to_builtins(a), raised_at=db.ms_to_dt(a.ts_ms))


async def with_db_retry(store: FraudStore, work: Any) -> Any:
    """Run `work(conn)`, retrying with backoff while PostgreSQL is unreachable. The batch is
    not acknowledged meanwhile (nothing is lost; the stream waits, as the saga does)."""
    delay = 0.1
    while True:
        try:
            pool = await store.pool()
            async with pool.acquire() as conn:
                return await work(conn)
        except (asyncio.TimeoutError, OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError) as exc:
            log.warning("fraud store unavailable; retrying", extra={"error": f"{type(exc).__name__}: {exc}",
                                                                    "retry_s": delay})
            await asyncio.sleep(delay)
            delay = min(delay * 2, DB_RETRY_MAX_S)


async def fan_out(store: FraudStore, channel: str, alerts: Sequence[FraudAlert]) -> None:
    """Publish alerts to Redis pub/sub for WebSocket subscribers. Best effort: alerts are
    durable on Kafka and in PostgreSQL; a Redis outage only loses the live push."""
    try:
        redis = store.redis()
        async with redis.pipeline(transaction=False) as pipe:
            for alert in alerts:
                pipe.publish(channel, encode(alert))
            await pipe.execute()
    except (asyncio.TimeoutError, RedisError, OSError) as exc:
        ALERTS_UNDELIVERED.inc(len(alerts))
        log.warning("alerts not fanned out", extra={"error": f"{type(exc).__name__}: {exc}", "alerts": len(alerts)})


async def relay_reviews(app: FintideApp, store: FraudStore) -> int:
    """Publish analysts' decisions the API committed but could not publish."""
    try:
        pool = await store.pool()
        async with pool.acquire() as conn:
            reviews = await db.unpublished_reviews(conn, RELAY_BATCH, RELAY_AFTER_S)
    except (asyncio.TimeoutError, OSError, asyncpg.PostgresError) as exc:
        log.warning("review relay skipped", extra={"error": f"{type(exc).__name__}: {exc}"})
        return 0
    if not reviews:
        return 0
    topic = event_topic(app, DECISIONS)
    pending = [await store.send(topic, r.payer_wallet_id, encode(scoring.review_decision_event(r))) for r in reviews]
    await asyncio.gather(*pending)
    await db.mark_published(pool, [r.id for r in reviews])
    log.info("review decisions relayed", extra={"count": len(reviews)})
    return len(reviews)

