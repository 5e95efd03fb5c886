"""Fraud agents: the payment saga's real-time risk scorer, and what analysts read.

Pipeline (docs/FRAUD.md has the picture):

1. `fraud.payer` consumes `fraud.requests` (key: payer wallet) in `take_events` batches:
   one Numba call updates the payer rows of the batch and computes the payer features;
   each payment's payee wallet, user, device and IP keys are hashed to their partitions.
   The keys on partitions this worker owns (all of them when one worker runs the
   scorer) are updated at once, in payment order (one Numba call for the payees, one for
   the users / devices / IPs), and a payment with no key left is decided there. The rest
   go, one `EntityBatch` per partition, to the smallest partition still to visit on
   `fraud.by_entity` (the keys already updated marked -1).
2. `fraud.entity` consumes `fraud.by_entity`: it updates the keys on the batch's
   partition and on any other it owns, then decides each payment or sends it on the
   same way. A route key's update reads only the payment's own request columns, never
   another key's features, so where it happens changes no value. The alternative,
   sending each key's work to its partition at once and joining the partial rows by
   payment id, is always two hops but needs the join's pending rows in a changelogged
   table (a write and a tombstone per payment, and a sweep for partials a redelivery
   orphans). Before keys were updated where they are owned, a single worker sent each
   payment through 2.7 `fraud.by_entity` hops on average; see docs/benchmarks/fraud.md.
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
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, NamedTuple, TypeVar

import asyncpg
import msgspec
import numpy as np
from aiokafka import AIOKafkaProducer
from faust import Event
from faust.types import EventT, Message, TopicT
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
from streams.app import (
    FintideApp,
    acting_for,
    dead_letter_topic,
    event_topic,
    routed_table_view,
)
from streams.codec import DecodeFailure, encode
from streams.dlq import EmptyValue, dead_letter
from streams.fraud import (
    ALERTS,
    BY_ENTITY,
    DECISIONS,
    MAX_ENTITY_BATCH,
    N_ROUTE,
    REQUESTS,
    EntityBatch,
    EntityColumns,
    FraudAlert,
    RiskDecided,
    ScoreBatch,
    ScoreRequested,
    alerts_channel,
    decision_batches,
    decisions_of,
    entity_batch,
    entity_key,
    requests_of,
)
from streams.metrics import EVENTS_DLQ, EVENTS_PROCESSED
from streams.topics import TopicSpec, bootstrap_servers, partition_for_key
from tables.fraud import (
    entity_row,
    entity_state,
    entity_table,
    entity_view,
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
AGENT_PAYER, AGENT_ENTITY = "fraud.payer", "fraud.entity"
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
            except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
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
                       agent: str, value: bytes | None = None) -> Awaitable[Any]:
    """Dead-letter a message, or (`value`: its encoding) one event of a batch message."""
    message = event.message
    record = dead_letter(spec.name, message.partition, message.offset, message.key,
                         value if value is not None else message.value, exc, agent,
                         message_ts_ms=int(message.timestamp * 1000) if message.timestamp else None)
    log.warning("dead letter", extra={"topic": spec.name, "partition": message.partition,
                                      "offset": message.offset, "error": record.error})
    EVENTS_DLQ.labels(spec.name).inc()
    return await dead_letter_topic(app, spec).send(key=message.key, value=encode(record), force=True)


# ----------------------------------------------------------------------------- scorer

def _install_scorer(app: FintideApp, store: FraudStore) -> None:
    payers = payer_table(app)
    payees = payee_table(app)
    entities = entity_table(app)
    model = scoring.load_model()
    rules = RulesService(store)
    app.service(rules)
    by_entity = event_topic(app, BY_ENTITY)
    stage = EntityStage(app, store, payees, entities, model, rules, by_entity)

    @app.agent(event_topic(app, REQUESTS), name=AGENT_PAYER)
    async def payer_stage(stream: Any) -> None:
        async for events in stream.take_events(TAKE_MAX, within=TAKE_WITHIN_S):
            started = time.perf_counter()
            pending: list[Awaitable[Any]] = []
            batch = await decode_events(app, REQUESTS, events, AGENT_PAYER, pending)
            valid = []
            n_partitions = REQUESTS.partition_count(app.settings)
            for event, value in batch:
                in_batch = isinstance(value, ScoreBatch)
                for request in requests_of(value):
                    problem = scoring.check_request(request)
                    if problem is None and partition_for_key(request.payer_wallet_id, n_partitions) != event.message.partition:
                        # The payer row is stored in the partition of the message that carried it.
                        problem = f"payer wallet hashes to another partition than {event.message.partition}"
                    if problem:
                        pending.append(await reject_event(app, REQUESTS, event, ValueError(problem), AGENT_PAYER,
                                                          value=encode(request) if in_batch else None))
                    else:
                        valid.append((event, request))
            if valid:
                pending += await score_payers(stage, payers, valid)
            await asyncio.gather(*pending)
            EVENTS_PROCESSED.labels(REQUESTS.name, AGENT_PAYER).inc(len(valid))
            BATCH_SECONDS.labels("payer").observe(time.perf_counter() - started)

    @app.agent(by_entity, name=AGENT_ENTITY)
    async def entity_stage(stream: Any) -> None:
        async for events in stream.take_events(TAKE_MAX, within=TAKE_WITHIN_S):
            started = time.perf_counter()
            pending: list[Awaitable[Any]] = []
            batches = await decode_events(app, BY_ENTITY, events, AGENT_ENTITY, pending)
            columns = []
            for event, batch in batches:
                try:
                    if batch.partition != event.message.partition:
                        raise ValueError(f"batch for partition {batch.partition} read from "
                                         f"partition {event.message.partition}")
                    columns.append((event, batch, batch.columns(rm.N_FEATURES)))
                except ValueError as exc:
                    pending.append(await reject_event(app, BY_ENTITY, event, exc, AGENT_ENTITY))
            if columns:
                pending += await visit_entities(stage, columns)
            await asyncio.gather(*pending)
            EVENTS_PROCESSED.labels(BY_ENTITY.name, AGENT_ENTITY).inc(len(columns))
            BATCH_SECONDS.labels("entity").observe(time.perf_counter() - started)

    routed_table_view(app, payers, "/fraud/payers/{key}", render=payer_view)
    routed_table_view(app, payees, "/fraud/payees/{key}", render=payee_view)
    routed_table_view(app, entities, "/fraud/entities/{key}", render=entity_view)

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


# The identity columns an EntityBatch carries (EntityBatch field names).
ID_COLUMNS = ("request_ids", "payment_ids", "payer_wallet_ids", "payer_user_ids", "payee_wallet_ids",
              "device_ids", "ips", "currencies")
NO_PARTITION = np.iinfo(np.int64).max


class EntityStage:
    """What updating route keys needs: the payee and entity tables, the model and rules,
    fraud.by_entity, and this worker's share of its partitions."""

    def __init__(self, app: FintideApp, store: FraudStore, payees: Any, entities: Any, model: scoring.Model,
                 rules: RulesService, by_entity: TopicT) -> None:
        self.app, self.store, self.payees, self.entities = app, store, payees, entities
        self.model, self.rules, self.by_entity = model, rules, by_entity
        self.topic_name = by_entity.get_topic_name()

    def owned(self) -> frozenset[int]:
        """fraud.by_entity partitions this worker owns as active: their payee and entity
        rows are its own, so a stage updates them in place instead of sending payments
        there through Kafka (Faust's assignor gives partition p of every 4-partition topic
        to one worker, and one worker owns them all). Read per batch: a rebalance waits
        for in-flight batches before partitions move."""
        return frozenset(tp.partition for tp in self.app.assignor.assigned_actives() if tp.topic == self.topic_name)

    def carriers(self, partitions: np.ndarray) -> dict[int, EventT]:
        """A stand-in fraud.by_entity event per partition: Faust reads and writes a table
        key in the RocksDB and changelog partition of the current event's message."""
        return {p: partition_event(self.app, self.topic_name, p) for p in np.unique(partitions).tolist() if p >= 0}


def partition_event(app: FintideApp, topic: str, partition: int) -> EventT:
    message = Message(topic, partition, -1, time.time(), 0, None, None, None, None)
    return Event(app, None, None, None, message)


def route_partitions(requests: Sequence[ScoreRequested], n_partitions: int) -> np.ndarray:
    """[n, N_ROUTE]: the partition of each payment's payee, user, device and IP key (-1
    for a value not sent)."""
    parts = np.empty((len(requests), N_ROUTE), dtype=np.int64)
    for i, r in enumerate(requests):
        parts[i, 0] = partition_for_key(r.payee_wallet_id, n_partitions)
        parts[i, 1] = partition_for_key(entity_key("user", r.payer_user_id), n_partitions) if r.payer_user_id else -1
        parts[i, 2] = partition_for_key(entity_key("device", r.device_id), n_partitions) if r.device_id else -1
        parts[i, 3] = partition_for_key(entity_key("ip", r.ip), n_partitions) if r.ip else -1
    return parts


async def score_payers(stage: EntityStage, table: Any,
                       batch: Sequence[tuple[EventT, ScoreRequested]]) -> list[Awaitable[Any]]:
    """Payer features for a batch; rows written back; the route keys on this worker's
    partitions updated at once; each payment decided, or sent on to the first partition
    of its route this worker does not own (one EntityBatch per partition)."""
    requests = [r for _, r in batch]
    keys, index, carriers = _key_events([r.payer_wallet_id for r in requests], [e for e, _ in batch])
    rows = np.empty((len(keys), ff.PAYER_WIDTH))
    for k, key in enumerate(keys):
        with acting_for(carriers[k]):
            rows[k] = payer_row(table.get(key))
    row_idx = np.fromiter((index[r.payer_wallet_id] for r in requests), dtype=np.int64, count=len(requests))
    cols = scoring.payer_columns(requests)
    features, dup = scoring.run_payer(rows, row_idx, cols)
    changed = np.zeros(len(keys), dtype=np.bool_)
    changed[row_idx[~dup]] = True
    for k in np.flatnonzero(changed):
        with acting_for(carriers[k]):
            table[keys[k]] = payer_state(rows[k])
    if dup.any():
        REDELIVERED.labels("payer").inc(int(dup.sum()))
    n = len(requests)
    x = np.zeros((n, rm.N_FEATURES))
    x[:, :rm.PAYEE_COL] = features
    hashes = np.empty((n, 3), dtype=np.int64)
    hashes[:, 0] = cols.payment_h
    for i, r in enumerate(requests):
        hashes[i, 1] = scoring.stable_hash(r.payer_wallet_id)
        hashes[i, 2] = scoring.stable_hash(r.payer_user_id)
    parts = route_partitions(requests, BY_ENTITY.partition_count(stage.app.settings))
    ids = {"request_ids": [r.id for r in requests], "payment_ids": [r.payment_id for r in requests],
           "payer_wallet_ids": [r.payer_wallet_id for r in requests],
           "payer_user_ids": [r.payer_user_id for r in requests],
           "payee_wallet_ids": [r.payee_wallet_id for r in requests], "device_ids": [r.device_id for r in requests],
           "ips": [r.ip for r in requests], "currencies": [r.currency for r in requests]}
    local = np.isin(parts, list(stage.owned())) & (parts >= 0)
    return await advance(stage, RouteColumns(ids, cols.ts_ms, cols.amount, cols.failed, hashes, parts, x), local)


class RouteColumns(NamedTuple):
    """Payments on their route: identities, request columns, the partition of each route
    key still to update (-1: none, or already updated) and the feature rows so far."""
    ids: dict[str, list[str]]
    ts: np.ndarray
    amount: np.ndarray
    failed: np.ndarray
    hashes: np.ndarray
    parts: np.ndarray
    x: np.ndarray


async def advance(stage: EntityStage, cols: RouteColumns, local: np.ndarray) -> list[Awaitable[Any]]:
    """Update the route keys marked `local` ([n, N_ROUTE]: on a partition this worker
    owns), in payment order; decide the payments with no key left, send the others on to
    their smallest remaining partition (the keys updated here marked -1, so no stage
    updates them twice)."""
    update_rows(stage, cols, local)
    parts = np.where(local, -1, cols.parts)
    later = np.where(parts >= 0, parts, NO_PARTITION).min(axis=1)
    done = later == NO_PARTITION
    pending = await forward_entities(stage.store, stage.by_entity, cols._replace(parts=parts),
                                     np.flatnonzero(~done), later)
    if done.any():
        decided = np.flatnonzero(done)
        ruleset = await stage.rules.current()
        scored = scoring.decide(np.ascontiguousarray(cols.x[decided]), stage.model, ruleset)
        pending += await publish_decisions(stage.app, stage.store, stage.model, ruleset, cols.ids, decided, scored)
    return pending


async def forward_entities(store: FraudStore, by_entity: TopicT, cols: RouteColumns, members: np.ndarray,
                           dest: np.ndarray) -> list[Awaitable[Any]]:
    """Send payments `members` to partition `dest[i]` of fraud.by_entity, one EntityBatch
    (at most MAX_ENTITY_BATCH payments) per partition, in payment order."""
    pending = []
    for partition in np.unique(dest[members]).tolist():
        group = members[dest[members] == partition]
        for lo in range(0, len(group), MAX_ENTITY_BATCH):
            part = group[lo:lo + MAX_ENTITY_BATCH]
            chosen = part.tolist()
            batch = entity_batch(int(partition), {name: [cols.ids[name][i] for i in chosen] for name in ID_COLUMNS},
                                 cols.ts[part], cols.amount[part], cols.failed[part], cols.hashes[part],
                                 cols.parts[part], cols.x[part])
            pending.append(await store.send(by_entity, None, encode(batch), int(partition)))
    return pending


async def visit_entities(stage: EntityStage,
                         columns: Sequence[tuple[EventT, EntityBatch, EntityColumns]]) -> list[Awaitable[Any]]:
    """The payments of fraud.by_entity batches: their keys on this batch's partition, and
    on any other this worker owns, updated; each payment then decided or sent on."""
    ids = {name: [v for _, batch, _ in columns for v in getattr(batch, name)] for name in ID_COLUMNS}
    cols = RouteColumns(ids, np.concatenate([c.ts_ms for _, _, c in columns]),
                        np.concatenate([c.amount for _, _, c in columns]),
                        np.concatenate([c.failed for _, _, c in columns]),
                        np.concatenate([c.hashes for _, _, c in columns]),
                        np.concatenate([c.partitions for _, _, c in columns]),
                        np.concatenate([c.features for _, _, c in columns]))
    here = np.concatenate([np.full(batch.count, batch.partition, dtype=np.int64) for _, batch, _ in columns])
    local = (cols.parts == here[:, None]) | (np.isin(cols.parts, list(stage.owned())) & (cols.parts >= 0))
    return await advance(stage, cols, local)


def update_rows(stage: EntityStage, cols: RouteColumns, local: np.ndarray) -> None:
    """Update the payee, user, device and IP rows of the `local` route keys (each in the
    partition its key hashes to) and fill their feature columns. A row's update depends
    only on the payment's own request columns, so keys of several partitions are updated
    in one pass, in payment order."""
    ids, x, parts = cols.ids, cols.x, cols.parts
    carrier = stage.carriers(parts[local])
    payee_i = np.flatnonzero(local[:, 0])
    if payee_i.size:
        keys, index, carriers = _key_events([ids["payee_wallet_ids"][i] for i in payee_i.tolist()],
                                            [carrier[p] for p in parts[payee_i, 0].tolist()])
        rows = np.empty((len(keys), ff.PAYEE_WIDTH))
        for k, key in enumerate(keys):
            with acting_for(carriers[k]):
                rows[k] = payee_row(stage.payees.get(key))
        row_idx = np.fromiter((index[ids["payee_wallet_ids"][i]] for i in payee_i.tolist()), dtype=np.int64,
                              count=payee_i.size)
        out, dup = scoring.run_payee(rows, row_idx, cols.ts[payee_i], cols.amount[payee_i], cols.hashes[payee_i, 1],
                                     cols.hashes[payee_i, 0])
        _write_back(stage.payees, keys, carriers, rows, row_idx, dup, lambda key, row: payee_state(row))
        x[payee_i, rm.PAYEE_COL:rm.ENTITY_COL] = out
        if dup.any():
            REDELIVERED.labels("payee").inc(int(dup.sum()))

    # User, device and IP items, in payment order (then kind order): one row layout, one call.
    item_pay, item_kind = np.nonzero(local[:, 1:])
    if item_pay.size:
        values = (ids["payer_user_ids"], ids["device_ids"], ids["ips"])
        item_keys = [entity_key(ff.ENTITY_KINDS[k], values[k][i])
                     for i, k in zip(item_pay.tolist(), item_kind.tolist(), strict=True)]
        keys, index, carriers = _key_events(item_keys, [carrier[p] for p in parts[item_pay, item_kind + 1].tolist()])
        rows = np.empty((len(keys), ff.ENTITY_WIDTH))
        for k, key in enumerate(keys):
            with acting_for(carriers[k]):
                rows[k] = entity_row(stage.entities.get(key))
        row_idx = np.fromiter((index[key] for key in item_keys), dtype=np.int64, count=len(item_keys))
        # What a row's distinct count counts: wallets for a user, users for a device or IP.
        other_h = np.where(item_kind == 0, cols.hashes[item_pay, 1], cols.hashes[item_pay, 2])
        out, dup = scoring.run_entity(rows, row_idx, cols.ts[item_pay], cols.amount[item_pay],
                                      cols.failed[item_pay], other_h, cols.hashes[item_pay, 0])
        _write_back(stage.entities, keys, carriers, rows, row_idx, dup,
                    lambda key, row: entity_state(key.split(":", 1)[0], row))
        first_col = np.asarray(rm.ENTITY_COLS, dtype=np.int64)[item_kind]
        x[item_pay[:, None], first_col[:, None] + np.arange(ff.N_ENTITY_FEATURES)] = out
        if dup.any():
            REDELIVERED.labels("entity").inc(int(dup.sum()))


def _write_back(table: Any, keys: Sequence[str], carriers: Sequence[EventT], rows: np.ndarray, row_idx: np.ndarray,
                dup: np.ndarray, state: Callable[[str, np.ndarray], Any]) -> None:
    """Store the rows a batch changed (a row only redelivered payments touched is as it was)."""
    changed = np.zeros(len(keys), dtype=np.bool_)
    changed[row_idx[~dup]] = True
    for k in np.flatnonzero(changed):
        with acting_for(carriers[k]):
            table[keys[k]] = state(keys[k], rows[k])


async def publish_decisions(app: FintideApp, store: FraudStore, model: scoring.Model, rules: RuleSet,
                            ids: dict[str, list[str]], decided: np.ndarray,
                            scored: scoring.Scored) -> list[Awaitable[Any]]:
    decisions_topic = event_topic(app, DECISIONS)
    alerts_topic = event_topic(app, ALERTS)
    pending = []
    decisions: list[RiskDecided] = []
    for i, j in enumerate(decided.tolist()):
        code = int(scored.decisions[i])
        decision = RiskDecided(
            payment_id=ids["payment_ids"][j], payer_wallet_id=ids["payer_wallet_ids"][j],
            score=int(scored.scores[i]), decision=rm.DECISIONS[code], source="model",
            rules_fired=scoring.rules_fired(scored, i, rules), top_features=scoring.top_features(scored, i),
            model_version=model.version, payer_user_id=ids["payer_user_ids"][j],
            payee_wallet_id=ids["payee_wallet_ids"][j], amount_minor=int(scored.x[i, 0]),
            currency=ids["currencies"][j])
        decisions.append(decision)
        if code != rm.ALLOW:
            alert = alert_for(decision)
            pending.append(await store.send(alerts_topic, alert.payer_wallet_id, encode(alert)))
    # One message per payer-wallet partition: the saga's risk agent pays per message.
    for batch in decision_batches(decisions, DECISIONS.partition_count(app.settings)):
        pending.append(await store.send(decisions_topic, batch.payer_wallet_id, encode(batch)))
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
            decided = [d for _, value in await decode_events(app, DECISIONS, events, AGENT_RECORDER, pending)
                       for d in decisions_of(value)]
            rows = [score_row(d) for d in decided if d.source == "model"]
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
        except (TimeoutError, OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError) as exc:
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
    except (TimeoutError, RedisError, OSError) as exc:
        ALERTS_UNDELIVERED.inc(len(alerts))
        log.warning("alerts not fanned out", extra={"error": f"{type(exc).__name__}: {exc}", "alerts": len(alerts)})


async def relay_reviews(app: FintideApp, store: FraudStore) -> int:
    """Publish analysts' decisions the API committed but could not publish."""
    try:
        pool = await store.pool()
        async with pool.acquire() as conn:
            reviews = await db.unpublished_reviews(conn, RELAY_BATCH, RELAY_AFTER_S)
    except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
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

