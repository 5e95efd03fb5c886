"""The payment saga, by choreography over Kafka, keyed by payer wallet.

    payment.requested (Kafka in) or POST /api/v1/payments
      -> initiated -> funds_reserved          (PostgreSQL: payment row + hold, one transaction)
      -> fraud.score_requested                (this module, to fraud.requests)
      <- fraud.risk_decided                   (the scorer, from fraud.decisions)
      -> risk_assessed + posted + completed   (allow: the hold posts to the payee, double entry,
                                               and the saga ends, one transaction, three events)
         | under_review (hold kept)           (review: waits for an analyst's decision)
         | failed{risk_blocked|review_declined|risk_timeout}   (the hold is voided)

Agents (each takes batches of messages: one PostgreSQL transaction and one publish per batch):
  payments.saga        payments.events: initiates Kafka-in requests, requests risk scores,
                       completes payments left `posted` (not the saga's own captures, which
                       complete as they post), keeps the `payments.sagas` table (what
                       waits for a decision until when) and pushes every status change to
                       the payer's WebSocket channel;
  payments.risk        fraud.decisions: applies decisions (services.payments.settle_risk);
  payments.projection  payments.ledger: the `payments.balances` hot projection.
Timers: the outbox relay (leader; it also republishes every balance and every open saga
from PostgreSQL once per worker start, which is how the projection and the saga state
rebuild after Kafka lost its memory), the fraud budget (per worker, for its partitions),
hold expiry and idempotency-key purge (leader).

PostgreSQL decides every transition (services.payments, idempotent by payment id and
applied only from the status a step expects), so redelivered, duplicated, reordered and
late messages change nothing. A batch is acknowledged to Kafka only after its effects are
committed and its messages published; transient failures (database or broker away) are
retried, and a worker that cannot make progress for RETRY_BUDGET_S exits without
committing, so the batch is redelivered to its successor.
"""

from __future__ import annotations

import asyncio
import functools
import heapq
import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Generic, TypeVar
from uuid import UUID

import asyncpg
import faust
import msgspec
from aiokafka.errors import KafkaError
from faust.exceptions import ProducerSendError
from faust.types import EventT
from mode import Service
from prometheus_client import Counter, Gauge, Histogram

from api import idempotency
from db import payments as db
from db.engine import create_pool, dsn_for
from services import payments
from services import payments_events as events
from streams.app import FintideApp, dead_letter_topic, event_topic, routed_table_view
from streams.codec import DecodeFailure, encode, to_builtins
from streams.dlq import EmptyValue, dead_letter
from streams.events import now_ms
from streams.fraud import DECISIONS, REQUESTS, RiskDecided, ScoreRequested, fraud_items_of, score_batches
from streams.metrics import EVENTS_DLQ, EVENTS_PROCESSED
from streams.payments import (
    LEDGER,
    PAYMENTS,
    LedgerBalance,
    PaymentCompleted,
    PaymentFailed,
    PaymentFundsReserved,
    PaymentPosted,
    PaymentRequested,
    PaymentRiskAssessed,
    PaymentStep,
    PaymentUnderReview,
    items_of,
)
from streams.publisher import EventPublisher
from streams.topics import TopicSpec, full_name, partition_for_key
from tables.payments import (
    SagaDraft,
    WalletBalance,
    balances_table,
    forget_tables_of_a_lost_broker,
    newer_balance,
    sagas_table,
    write_in_partition_of,
)

log = logging.getLogger("fintide.agents.payments")
T = TypeVar("T")

SAGA_AGENT: Final = "payments.saga"
RISK_AGENT: Final = "payments.risk"
PROJECTION_AGENT: Final = "payments.projection"
POOL_MAX_SIZE: Final = 6
# Transient failures are retried with capped exponential backoff for at most this long;
# then the worker exits without acknowledging the batch (its successor gets it again).
RETRY_BUDGET_S: Final = 60.0
RETRY_BACKOFF_MAX_S: Final = 2.0
EXIT_NO_PROGRESS: Final = 75
UNEXPECTED_ATTEMPTS: Final = 3
RELAY_BATCH: Final = 2_000
RELAY_MAX_BATCHES_PER_TICK: Final = 20
RECOVERY_PAGE: Final = 1_000
HOLD_SWEEP_INTERVAL_S: Final = 5.0
HOLD_SWEEP_MAX_BATCHES: Final = 10
KEY_PURGE_INTERVAL_S: Final = 600.0
# The fraud-budget timer re-reads the saga table this often, so budgets of sagas it did not
# start (after a restart or a rebalance) are enforced too.
DEADLINE_RESCAN_S: Final = 5.0
MAX_TRACKED_DEADLINES: Final = 200_000
MAX_WS_PUSHES_PER_BATCH: Final = 10_000

FRAUD_TIMEOUTS = Counter("fintide_fraud_timeouts_total",
                         "Payments whose fraud decision did not arrive within the budget, by the policy applied.",
                         ["policy"])
RISK_DECISIONS = Counter("fintide_payments_risk_decisions_total",
                         "Fraud decisions the saga received, and whether they changed a payment.",
                         ["source", "decision", "applied"])
SAGA_STEPS = Counter("fintide_payments_saga_steps_total", "Saga step events the saga agent saw.", ["status"])
SAGA_SECONDS = Histogram("fintide_payment_latency_seconds",
                         "From a payment's initiation to its saga's end, as the saga agent sees the end.",
                         ["outcome"], buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0))
RELAYED = Counter("fintide_payments_outbox_relayed_total", "Outbox rows published to Kafka.")
RECOVERED = Gauge("fintide_payments_recovered", "1 once this worker republished balances and open sagas "
                  "from PostgreSQL (the leader does it at start).")

# InternalClientError: asyncpg's state after a connection was terminated mid-operation.
TRANSIENT: Final = (OSError, TimeoutError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError,
                    asyncpg.exceptions.InternalClientError,
                    asyncpg.exceptions.OperatorInterventionError, asyncpg.exceptions.InsufficientResourcesError,
                    asyncpg.exceptions.TransactionRollbackError, KafkaError, ProducerSendError)


# --------------------------------------------------------------------------- resources

class Runtime:
    """The worker's PostgreSQL pool, event publisher and Redis, opened on first use."""

    def __init__(self, app: FintideApp) -> None:
        self.app = app
        self.settings = app.settings
        self._pool: asyncpg.Pool | None = None
        self._publisher: EventPublisher | None = None
        self._redis: Any = None
        self._lock = asyncio.Lock()

    async def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            async with self._lock:
                if self._pool is None:
                    self._pool = await create_pool(dsn_for(self.settings.database_url, "payments"),
                                                   max_size=POOL_MAX_SIZE)
        return self._pool

    async def publisher(self) -> EventPublisher:
        if self._publisher is None:
            async with self._lock:
                if self._publisher is None:
                    publisher = EventPublisher(self.settings, client_id=f"{self.settings.app_id}-payments")
                    await publisher.start()
                    self._publisher = publisher
        return self._publisher

    def redis(self) -> Any:
        if self._redis is None:
            from redis.asyncio import Redis

            self._redis = Redis.from_url(self.settings.redis_url, socket_timeout=2.0)
        return self._redis

    async def publish_many(self, spec: TopicSpec[Any], values: Sequence[Any]) -> None:
        """Publish events (keyed by the topic's key field); returns when all are acknowledged."""
        publisher = await self.publisher()
        for start in range(0, len(values), 10_000):
            await publisher.publish_many(spec.name, [(None, v) for v in values[start:start + 10_000]])

    async def close(self) -> None:
        if self._publisher is not None:
            await self._publisher.stop()
        if self._pool is not None:
            await self._pool.close()
        if self._redis is not None:
            await self._redis.aclose()


async def in_transaction_retry(rt: Runtime, work: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
    """Run `work` on a pooled connection, retrying transient failures (see `retrying`)."""
    async def attempt() -> T:
        async with (await rt.pool()).acquire() as conn:
            return await work(conn)

    return await retrying(attempt)


async def retrying(attempt: Callable[[], Awaitable[T]], *, budget_s: float = RETRY_BUDGET_S) -> T:
    """Retry `attempt` on transient errors (database connection dropped, broker away) with
    capped backoff; past `budget_s` exit the process so nothing unapplied is acknowledged.
    Every effect retried here is idempotent by payment / event id."""
    deadline = time.monotonic() + budget_s
    delay_s = 0.05
    while True:
        try:
            return await attempt()
        except TRANSIENT as exc:
            if time.monotonic() + delay_s > deadline:
                log.critical("no progress for %.0f s, exiting without acknowledging: %r", budget_s, exc)
                logging.shutdown()
                os._exit(EXIT_NO_PROGRESS)
            log.warning("transient failure, retrying in %.2f s: %r", delay_s, exc)
            await asyncio.sleep(delay_s)
            delay_s = min(delay_s * 2, RETRY_BACKOFF_MAX_S)


# ------------------------------------------------------------------- batches and letters

@dataclass(frozen=True, slots=True)
class Item(Generic[T]):
    """One event and the Kafka message it came in (several events share a batch message)."""

    value: T
    message: EventT[Any]


async def decode_items(app: FintideApp, spec: TopicSpec[Any], batch: Sequence[EventT[Any]], agent: str,
                       unpack: Callable[[Any], Sequence[Any]] = items_of) -> list[Item[Any]]:
    """The events of a batch of messages, batches unpacked (`unpack`: the topic's batch
    form, `streams.fraud.fraud_items_of` for the fraud topics); bad messages dead-lettered."""
    items: list[Item[Any]] = []
    for message_event in batch:
        value = message_event.message.value
        try:
            if not value:
                raise EmptyValue("message has no value")
            decoded = spec.decode(value)
        except (*DecodeFailure, EmptyValue) as exc:
            await send_dead_letter(app, spec, message_event, exc, agent)
            continue
        items += [Item(v, message_event) for v in unpack(decoded)]
    return items


async def send_dead_letter(app: FintideApp, spec: TopicSpec[Any], message_event: EventT[Any], exc: BaseException,
                           agent: str, value: bytes | None = None) -> None:
    """Keep a message (or one event of a batch, `value`) on `<topic>.dlq` with the reason."""
    message = message_event.message
    record = dead_letter(spec.name, message.partition, message.offset, message.key,
                         value if value is not None else message.value, exc, agent)
    log.warning("dead letter", extra={"topic": spec.name, "partition": message.partition,
                                      "offset": message.offset, "error": record.error})
    future = await dead_letter_topic(app, spec).send(key=message.key, value=encode(record))
    await future
    EVENTS_DLQ.labels(spec.name).inc()


async def reject_item(app: FintideApp, spec: TopicSpec[Any], item: Item[Any], reason: str, agent: str) -> None:
    await send_dead_letter(app, spec, item.message, ValueError(reason), agent, value=encode(item.value))


def owns(item: Item[Any], key: str, n_partitions: int) -> bool:
    """Whether `key` belongs to the partition the item came from: table writes land there,
    so a batch that mixes partitions (or a mis-keyed message) is refused, not stored."""
    return partition_for_key(key, n_partitions) == item.message.message.partition


async def process_batch(app: FintideApp, spec: TopicSpec[Any], batch: Sequence[EventT[Any]], agent: str,
                        work: Callable[[], Awaitable[int]]) -> None:
    """Run one batch's work. Transient errors are retried inside `work`; any other error is
    retried UNEXPECTED_ATTEMPTS times too (the work is idempotent, and an error we did not
    foresee may still be passing), then the batch's messages go to the dead-letter topic
    with it, so nothing is lost and the agent goes on."""
    for attempt in range(1, UNEXPECTED_ATTEMPTS + 1):
        try:
            processed = await work()
        except Exception as exc:
            if attempt < UNEXPECTED_ATTEMPTS:
                log.warning("batch failed (attempt %d), retrying: %r", attempt, exc)
                await asyncio.sleep(0.5 * attempt)
                continue
            log.exception("batch failed %d times; dead-lettering its %d message(s)", attempt, len(batch))
            for message_event in batch:
                await send_dead_letter(app, spec, message_event, exc, agent)
            return
        EVENTS_PROCESSED.labels(spec.name, agent).inc(processed)
        return


def never_raises(fn: Callable[[], Awaitable[None]]) -> Callable[[], Awaitable[None]]:
    """A timer body whose failure is logged and retried at the next tick: an exception
    escaping a Faust timer crashes the whole worker."""
    @functools.wraps(fn)
    async def run() -> None:
        try:
            await fn()
        except Exception:
            log.exception("%s failed; the next tick retries", fn.__name__)

    return run


# ---------------------------------------------------------------------- fraud deadlines

class Deadlines:
    """Payments of this worker's partitions waiting for a fraud decision, by deadline."""

    def __init__(self) -> None:
        self._heap: list[tuple[int, str, str, int]] = []
        self._due_ms: dict[str, int] = {}

    def add(self, payment_id: str, wallet_id: str, amount_minor: int, deadline_ms: int) -> None:
        if payment_id in self._due_ms or len(self._due_ms) >= MAX_TRACKED_DEADLINES:
            return  # tracked already, or full: the next table rescan picks it up
        self._due_ms[payment_id] = deadline_ms
        heapq.heappush(self._heap, (deadline_ms, payment_id, wallet_id, amount_minor))

    def discard(self, payment_id: str) -> None:
        self._due_ms.pop(payment_id, None)

    def pop_due(self, now: int, limit: int) -> list[tuple[str, str, int]]:
        due: list[tuple[str, str, int]] = []
        while self._heap and self._heap[0][0] <= now and len(due) < limit:
            deadline, payment_id, wallet_id, amount = heapq.heappop(self._heap)
            if self._due_ms.get(payment_id) == deadline:
                del self._due_ms[payment_id]
                due.append((payment_id, wallet_id, amount))
        return due

    def __len__(self) -> int:
        return len(self._due_ms)


# ------------------------------------------------------------------------------ install

@dataclass
class Saga:
    """Everything the payments agents and timers share in one worker."""

    app: FintideApp
    rt: Runtime
    sagas: faust.Table
    balances: faust.Table
    deadlines: Deadlines = field(default_factory=Deadlines)
    recovered: bool = False

    @property
    def partitions(self) -> int:
        return PAYMENTS.partition_count(self.app.settings)


def runtime_of(app: FintideApp) -> Runtime:
    """The worker's one Runtime (the saga and the pass-through scorer share it), closed
    when the worker stops."""
    rt = getattr(app, "_payments_runtime", None)
    if rt is None:
        rt = Runtime(app)
        app._payments_runtime = rt  # type: ignore[attr-defined]

        @app.service
        class PaymentsCloser(Service):  # closes what the agents opened, when the worker stops
            async def on_stop(self) -> None:
                await rt.close()

    return rt


def install(app: FintideApp) -> None:
    settings = app.settings
    saga = Saga(app, runtime_of(app), sagas_table(app), balances_table(app))
    forget_tables_of_a_lost_broker(app, [saga.sagas, saga.balances])
    batch_max, within_s = settings.payments_batch_max, settings.payments_batch_wait_ms / 1000

    @app.agent(event_topic(app, PAYMENTS), name=SAGA_AGENT)
    async def saga_agent(stream: Any) -> None:
        async for batch in stream.take_events(batch_max, within=within_s):
            items = await decode_items(app, PAYMENTS, batch, SAGA_AGENT)
            await process_batch(app, PAYMENTS, batch, SAGA_AGENT, functools.partial(on_payment_events, saga, items))

    @app.agent(event_topic(app, DECISIONS), name=RISK_AGENT)
    async def risk_agent(stream: Any) -> None:
        async for batch in stream.take_events(batch_max, within=within_s):
            items = await decode_items(app, DECISIONS, batch, RISK_AGENT, fraud_items_of)
            await process_batch(app, DECISIONS, batch, RISK_AGENT, functools.partial(on_decisions, saga, items))

    @app.agent(event_topic(app, LEDGER), name=PROJECTION_AGENT)
    async def projection_agent(stream: Any) -> None:
        async for batch in stream.take_events(batch_max, within=within_s):
            items = await decode_items(app, LEDGER, batch, PROJECTION_AGENT)
            await process_batch(app, LEDGER, batch, PROJECTION_AGENT, functools.partial(on_ledger_events, saga, items))

    @never_raises
    async def relay() -> None:
        if not saga.recovered:
            await recover(saga)
        await relay_outbox(saga)

    @app.task
    async def relay_loop() -> None:
        # A loop rather than a timer: a 20 ms timer whose tick takes longer is reported as
        # "overlapping" on every tick. Only the leader relays (and the advisory lock in
        # relay_outbox_once keeps it one at a time even across groups).
        while True:
            if app.is_leader():
                await relay()
            await asyncio.sleep(settings.payments_relay_interval_ms / 1000)

    @app.timer(max(0.05, settings.fraud_budget_ms / 4000))
    @never_raises
    async def fraud_budget() -> None:
        await enforce_budgets(saga)

    @app.timer(DEADLINE_RESCAN_S)
    @never_raises
    async def rescan_budgets() -> None:
        rescan_deadlines(saga)

    @app.timer(HOLD_SWEEP_INTERVAL_S, on_leader=True)
    @never_raises
    async def sweep_holds() -> None:
        await expire_holds(saga)

    @app.timer(KEY_PURGE_INTERVAL_S, on_leader=True)
    @never_raises
    async def purge_keys() -> None:
        pool = await saga.rt.pool()
        await retrying(lambda: idempotency.purge_expired(pool, "payments.idempotency_keys"))

    routed_table_view(app, saga.balances, "/payments/balances/{key}", render=render_balance)
    routed_table_view(app, saga.sagas, "/payments/sagas/{key}")


def render_balance(balance: WalletBalance) -> dict[str, Any]:
    return {**to_builtins(balance), "available_minor": balance.available_minor}


# ------------------------------------------------------------------ payments.events batch

@dataclass
class _Batch:
    """One payments.events batch: the saga states it changes and what it must send."""

    saga: Saga
    now_ms: int
    drafts: dict[str, SagaDraft] = field(default_factory=dict)
    writers: dict[str, EventT[Any]] = field(default_factory=dict)
    to_score: dict[UUID, tuple[Item[Any], db.Payment]] = field(default_factory=dict)
    to_check: dict[UUID, Item[PaymentStep]] = field(default_factory=dict)
    # Posted payments not seen completed in this batch (an ordered set). The saga's own
    # captures complete in their capture transaction and their `completed` event follows
    # `posted` in the same relayed batch, so this is normally empty again by the batch's end.
    to_complete: dict[UUID, None] = field(default_factory=dict)
    pushes: list[PaymentStep] = field(default_factory=list)

    def draft(self, wallet: str, item: Item[Any]) -> SagaDraft:
        """The wallet's state for this batch (read from the table once)."""
        if wallet not in self.drafts:
            self.drafts[wallet] = SagaDraft.of(wallet, self.saga.sagas.get(wallet))
        self.writers[wallet] = item.message
        return self.drafts[wallet]


async def on_payment_events(saga: Saga, items: list[Item[Any]]) -> int:
    b = _Batch(saga, now_ms())
    requests: list[Item[PaymentRequested]] = []
    for item in items:
        wallet = str(item.value.payer_wallet_id)
        if not owns(item, wallet, saga.partitions):
            await reject_item(saga.app, PAYMENTS, item, "payer wallet does not hash to this partition", SAGA_AGENT)
        elif isinstance(item.value, PaymentRequested):
            requests.append(item)
        else:
            fold_step(b, item)
    if requests:
        await initiate(b, requests)
    if b.to_check:
        await check_unknown_reservations(b)
    if b.to_complete:
        ids = list(b.to_complete)
        await in_transaction_retry(saga.rt, lambda conn: _chunked(payments.complete_payments, conn, ids))
    if b.to_score:
        await request_scores(b)
    write_states(b)
    await push_status(saga.rt, b.pushes)
    return len(items)


def fold_step(b: _Batch, item: Item[PaymentStep]) -> None:
    """Fold one saga step into its wallet's state (PostgreSQL already made the step)."""
    e = item.value
    wallet, pid = str(e.payer_wallet_id), str(e.payment_id)
    SAGA_STEPS.labels(e.status).inc()
    if isinstance(e, PaymentCompleted | PaymentFailed) and e.initiated_ms:
        SAGA_SECONDS.labels(e.status).observe(max(0.0, (e.ts_ms - e.initiated_ms) / 1000))
    b.pushes.append(e)
    draft = b.draft(wallet, item)
    if isinstance(e, PaymentFundsReserved):
        if not draft.knows(pid) and e.payment_id not in b.to_score:
            b.to_check[e.payment_id] = item
        return
    b.to_check.pop(e.payment_id, None)
    b.saga.deadlines.discard(pid)
    if isinstance(e, PaymentUnderReview):
        draft.to_review(pid)
    elif isinstance(e, PaymentFailed):
        draft.fail(pid, e.ts_ms)
    elif isinstance(e, PaymentRiskAssessed | PaymentPosted | PaymentCompleted):
        draft.settle(pid)
        if isinstance(e, PaymentPosted):
            b.to_complete[e.payment_id] = None
        elif isinstance(e, PaymentCompleted):
            b.to_complete.pop(e.payment_id, None)


async def initiate(b: _Batch, requests: list[Item[PaymentRequested]]) -> None:
    """Kafka-in: record the payments and reserve their funds (one transaction)."""
    asks = [payments.PaymentRequest(
        payment_id=r.value.payment_id, payer_id=r.value.payer_user_id, from_account_id=r.value.payer_wallet_id,
        to_account_id=r.value.payee_wallet_id, amount_minor=r.value.amount_minor, currency=r.value.currency,
        description=r.value.description, context=payments.PaymentContext(r.value.device_id, r.value.ip, r.value.country))
        for r in requests]
    results = await in_transaction_retry(b.saga.rt, lambda conn: _chunked(payments.initiate_payments, conn, asks))
    for item, result in zip(requests, results, strict=True):
        if result.status == "rejected":
            await reject_item(b.saga.app, PAYMENTS, item, f"payment request refused: {result.reason}", SAGA_AGENT)
        elif result.status == "funds_reserved" and result.payment is not None:
            b.draft(str(item.value.payer_wallet_id), item)
            b.to_score[result.payment_id] = (item, result.payment)


async def check_unknown_reservations(b: _Batch) -> None:
    """funds_reserved for payments this worker has no saga state for (the REST path, a
    restart, a replay): ask PostgreSQL which still wait for a decision."""
    ids = list(b.to_check)
    found = await in_transaction_retry(b.saga.rt, lambda conn: db.get_payments(conn, ids))
    for pid, item in b.to_check.items():
        p = found.get(pid)
        if p is not None and p.status == "funds_reserved":
            b.to_score[pid] = (item, p)


async def request_scores(b: _Batch) -> None:
    """Ask the fraud scorer about each payment; its budget starts now. Published before
    the state is written: a crash in between re-requests (harmless), never forgets."""
    settings = b.saga.app.settings
    deadline = b.now_ms + settings.fraud_budget_ms
    asks: list[ScoreRequested] = []
    for pid, (item, p) in b.to_score.items():
        wallet = str(p.from_account_id)
        draft = b.draft(wallet, item)
        asks.append(ScoreRequested(
            id=events.event_id("score_requested", pid), payment_id=str(pid), payer_user_id=str(p.payer_id),
            payer_wallet_id=wallet, payee_wallet_id=str(p.to_account_id), amount_minor=p.amount_minor,
            currency=p.currency, failed_attempts=draft.failed_attempts(b.now_ms), **events.payment_context(p)))
        draft.await_risk(str(pid), p.amount_minor, deadline)
    # One message per payer-wallet partition (fraud.score_batch): the scorer pays per message.
    batches = score_batches(asks, REQUESTS.partition_count(settings))
    await retrying(lambda: b.saga.rt.publish_many(REQUESTS, batches))
    for pid, (_, p) in b.to_score.items():
        b.saga.deadlines.add(str(pid), str(p.from_account_id), p.amount_minor, deadline)


def write_states(b: _Batch) -> None:
    """One table write per wallet the batch changed (an empty state is deleted)."""
    for wallet, draft in b.drafts.items():
        if not draft.changed:
            continue
        state = draft.state()
        with write_in_partition_of(b.writers[wallet]):
            if state is None:
                b.saga.sagas.pop(wallet, None)
            else:
                b.saga.sagas[wallet] = state


class StatusPush(msgspec.Struct, frozen=True, kw_only=True):
    """One frame of WS /ws/payments."""

    type: str = "payment.status"
    payment_id: UUID
    status: str
    failure_reason: str | None
    amount_minor: int
    currency: str
    from_wallet: UUID
    to_wallet: UUID
    ts_ms: int


async def push_status(rt: Runtime, steps: list[PaymentStep]) -> None:
    """Status changes to the payers' WebSocket channels (Litestar channels on Redis).

    Best effort: a notification is not part of the saga, so Redis being away is logged
    and the saga goes on. One pipeline per batch."""
    if not steps:
        return
    try:
        async with rt.redis().pipeline(transaction=False) as pipe:
            for e in steps[:MAX_WS_PUSHES_PER_BATCH]:
                push = StatusPush(payment_id=e.payment_id, status=e.status, failure_reason=e.failure_reason,
                                  amount_minor=e.amount_minor, currency=e.currency, from_wallet=e.payer_wallet_id,
                                  to_wallet=e.payee_wallet_id, ts_ms=e.ts_ms)
                # Litestar's RedisChannelsPubSubBackend uses channel names as Redis channels.
                pipe.publish(events.user_channel(e.payer_user_id), encode(push))
            await pipe.execute()
    except Exception as exc:
        log.warning("status push failed: %r", exc)


async def _chunked(op: Callable[[asyncpg.Connection, list[Any]], Awaitable[list[T]]], conn: asyncpg.Connection,
                   values: Sequence[Any]) -> list[T]:
    out: list[T] = []
    for start in range(0, len(values), payments.SAGA_BATCH_MAX):
        out += await op(conn, list(values[start:start + payments.SAGA_BATCH_MAX]))
    return out


# ------------------------------------------------------------------ fraud.decisions batch

def outcome_of(d: RiskDecided) -> payments.RiskOutcome | None:
    """What a decision means for the saga; None for one that means nothing (a review
    decision to review again) or is malformed."""
    try:
        pid = UUID(d.payment_id)
    except ValueError:
        return None
    detail = f"{d.source} {d.decision} score {d.score} {d.model_version} {','.join(d.rules_fired)}".strip()
    if d.source == "model":
        action = {"allow": "capture", "review": "review", "block": "fail"}.get(d.decision)
        reason = "risk_blocked"
        expect = "funds_reserved"
    elif d.source == "review":
        action = {"allow": "capture", "block": "fail"}.get(d.decision)
        reason = "review_declined"
        expect = "under_review"
    else:
        return None
    if action is None:
        return None
    return payments.RiskOutcome(payment_id=pid, expect=expect, action=action,
                                reason=reason if action == "fail" else None, detail=detail[:200])


async def on_decisions(saga: Saga, items: list[Item[RiskDecided]]) -> int:
    outcomes: list[payments.RiskOutcome] = []
    decided: list[RiskDecided] = []
    for item in items:
        outcome = outcome_of(item.value)
        if outcome is None:
            RISK_DECISIONS.labels(item.value.source[:16], item.value.decision[:16], "ignored").inc()
            continue
        outcomes.append(outcome)
        decided.append(item.value)
    if outcomes:
        results = await in_transaction_retry(saga.rt, lambda conn: _chunked(payments.settle_risk, conn, outcomes))
        for d, r in zip(decided, results, strict=True):
            RISK_DECISIONS.labels(d.source, d.decision, "yes" if r.applied else "no").inc()
    return len(items)


# ------------------------------------------------------------------ payments.ledger batch

async def on_ledger_events(saga: Saga, items: list[Item[Any]]) -> int:
    """Keep the newest balance per account (versions only grow, so order does not matter)."""
    newest: dict[str, Item[LedgerBalance]] = {}
    n_partitions = LEDGER.partition_count(saga.app.settings)
    for item in items:
        if not isinstance(item.value, LedgerBalance):
            continue  # transactions and holds carry balances, but only for their own key
        key = str(item.value.account_id)
        if not owns(item, key, n_partitions):
            await reject_item(saga.app, LEDGER, item, "account does not hash to this partition", PROJECTION_AGENT)
            continue
        if key not in newest or newest[key].value.balance.version_us < item.value.balance.version_us:
            newest[key] = item
    for key, item in newest.items():
        updated = newer_balance(saga.balances.get(key), item.value.balance)
        if updated is not None:
            with write_in_partition_of(item.message):
                saga.balances[key] = updated
    return len(items)


# ------------------------------------------------------------------------------- timers

async def relay_outbox(saga: Saga) -> None:
    """Publish committed outbox rows (leader only; bounded batches per tick)."""
    pool = await saga.rt.pool()

    async def publish(rows: Sequence[events.OutboxRow]) -> None:
        await send_rows(saga, rows)
        RELAYED.inc(len(rows))

    for _ in range(RELAY_MAX_BATCHES_PER_TICK):
        sent = await retrying(lambda: events.relay_outbox_once(pool, publish, batch_size=RELAY_BATCH))
        if sent < RELAY_BATCH:
            return


async def recover(saga: Saga) -> None:
    """Once per worker start (leader): publish every balance and every open saga again.

    Kafka may have lost everything (the embedded broker keeps it in memory) and this
    worker's tables may be new: PostgreSQL has it all. Balances carry their versions and
    saga steps are idempotent, so publishing them again is always safe."""
    n_balances = await _republish_balances(saga)
    n_open = await _redrive_open_payments(saga)
    saga.recovered = True
    RECOVERED.set(1)
    log.info("payments state republished from PostgreSQL", extra={"balances": n_balances, "open_payments": n_open})


async def _republish_balances(saga: Saga) -> int:
    after: UUID | None = None
    total = 0
    while True:
        page = await in_transaction_retry(saga.rt, functools.partial(_balances_after, after))
        if not page:
            return total
        await retrying(functools.partial(_publish_outbox_messages, saga, [events.ledger_balance(b) for b in page]))
        after, total = page[-1].account_id, total + len(page)


async def _redrive_open_payments(saga: Saga) -> int:
    after: UUID | None = None
    total = 0
    while True:
        page = await in_transaction_retry(saga.rt, functools.partial(_open_after, after))
        if not page:
            return total
        assessed = [payments.RiskOutcome(payment_id=p.id, expect="risk_assessed", action="capture", detail="recovery")
                    for p in page if p.status == "risk_assessed"]
        if assessed:  # assessed but not posted (left by an older step function): post them now
            await in_transaction_retry(saga.rt, functools.partial(_settle, assessed))
        steps = [events.payment_event(p) for p in page if p.status != "risk_assessed"]
        await retrying(functools.partial(_publish_outbox_messages, saga, steps))
        after, total = page[-1].id, total + len(page)


async def send_rows(saga: Saga, rows: Sequence[events.OutboxRow]) -> None:
    """Publish outbox rows (batched per partition, events.relay_messages); returns once the
    broker acknowledged all of them."""
    settings = saga.app.settings
    partitions = {PAYMENTS.name: PAYMENTS.partition_count(settings), LEDGER.name: LEDGER.partition_count(settings)}
    producer = saga.app.producer
    futures = [await producer.send(full_name(settings, m.topic), m.key, m.value, m.partition, None, None)
               for m in events.relay_messages(rows, partitions)]
    await asyncio.gather(*futures)


async def _balances_after(after: UUID | None, conn: asyncpg.Connection) -> list[db.Balance]:
    return await db.balances_page(conn, after, RECOVERY_PAGE)


async def _open_after(after: UUID | None, conn: asyncpg.Connection) -> list[db.Payment]:
    return await db.open_payments_page(conn, after, RECOVERY_PAGE)


async def _settle(outcomes: list[payments.RiskOutcome], conn: asyncpg.Connection) -> list[payments.SettleResult]:
    return await payments.settle_risk(conn, outcomes)


async def _publish_outbox_messages(saga: Saga, messages: Sequence[db.OutboxMessage]) -> None:
    """Publish messages built like outbox rows, without writing them (republishing)."""
    await send_rows(saga, [events.OutboxRow(0, m.topic, m.key, m.payload) for m in messages])


async def enforce_budgets(saga: Saga) -> None:
    """Apply the timeout policy to payments whose fraud decision is overdue: fail-open
    (capture) up to fraud_fail_open_limit_minor, fail-closed (risk_timeout) above.
    PostgreSQL applies it only if the payment still waits, so a decision that won the
    race wins, and one arriving after the timeout changes nothing."""
    due = saga.deadlines.pop_due(now_ms(), payments.SAGA_BATCH_MAX)
    awaiting: dict[str, dict[str, Any]] = {}
    for _, wallet, _ in due:
        if wallet not in awaiting:  # one table read per wallet
            state = saga.sagas.get(wallet)
            awaiting[wallet] = state.awaiting_risk if state is not None else {}
    waiting = [(pid, amount) for pid, wallet, amount in due if pid in awaiting[wallet]]
    if not waiting:
        return
    limit = saga.app.settings.fraud_fail_open_limit_minor
    outcomes = [payments.RiskOutcome(payment_id=UUID(pid), expect="funds_reserved",
                                     action="capture" if amount <= limit else "fail",
                                     reason=None if amount <= limit else "risk_timeout",
                                     detail=f"no fraud decision within {saga.app.settings.fraud_budget_ms} ms: "
                                            f"{'fail-open' if amount <= limit else 'fail-closed'}")
                for pid, amount in waiting]
    results = await in_transaction_retry(saga.rt, functools.partial(_settle, outcomes))
    stale: list[UUID] = []
    for outcome, result in zip(outcomes, results, strict=True):
        if result.applied:
            FRAUD_TIMEOUTS.labels("fail_open" if outcome.action == "capture" else "fail_closed").inc()
        elif result.status != "unknown":
            stale.append(outcome.payment_id)
    if stale:
        await _resend_steps(saga, stale)


async def _resend_steps(saga: Saga, payment_ids: list[UUID]) -> None:
    """The saga state still waits for payments PostgreSQL has moved on (their step events
    are on their way, or were lost): send their current step so the state catches up."""
    found = await in_transaction_retry(saga.rt, lambda conn: db.get_payments(conn, payment_ids))
    steps = [events.payment_event(p) for p in found.values() if p.status != "funds_reserved"]
    await retrying(functools.partial(_publish_outbox_messages, saga, steps))


def rescan_deadlines(saga: Saga) -> None:
    """Track the budgets of every waiting payment in this worker's table partitions."""
    for wallet, state in saga.sagas.items():
        for pid, waiting in state.awaiting_risk.items():
            saga.deadlines.add(pid, wallet, waiting.amount_minor, waiting.deadline_ms)


async def expire_holds(saga: Saga) -> None:
    """Release reservations past their expiry and fail their payments (leader only)."""
    for _ in range(HOLD_SWEEP_MAX_BATCHES):
        expired = await in_transaction_retry(saga.rt, lambda conn: payments.expire_holds(conn, limit=1_000))
        if len(expired) < 1_000:
            return

