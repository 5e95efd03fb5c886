"""Payments events and the transactional outbox relay.

Every journal change writes its events to `payments.outbox` in the same PostgreSQL
transaction (db.payments.write_journal), so a committed change cannot be lost between the
database and Kafka; `relay_outbox_once` publishes unpublished rows in id order and stamps
them, at least once. Consumers dedupe by `event_id` (deterministic: the same change always
yields the same id) and order per account by `account_seq`.

Topics (logical names; the publisher adds the deployment's prefix):
  payments.ledger  - every posted journal transaction and hold change, keyed by the debited
                     (or holding) account: what the hot balance projection consumes.
  payments.events  - payment saga steps, keyed by the payer wallet.
Each value is a msgspec Struct with a `type` tag and a `version` (docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Final
from uuid import UUID

import asyncpg
import msgspec

from db.payments import Entry, Hold, OutboxMessage, Payment

LEDGER_TOPIC: Final = "payments.ledger"
PAYMENTS_TOPIC: Final = "payments.events"
EVENT_VERSION: Final = 1
# Any fixed namespace works; it only has to stay the same so event ids stay deterministic.
_EVENT_NAMESPACE: Final = UUID("6c0f6a0e-7d1b-4d0e-9a57-5b1f3c2e9a41")
# Bounds for the relay (TigerBeetle style: every loop and batch has one).
RELAY_MAX_BATCH: Final = 5_000
_RELAY_LOCK_ID: Final = 0x5041594F  # one relay at a time keeps per-key order


class Event(msgspec.Struct, frozen=True, kw_only=True, tag_field="type"):
    event_id: UUID
    occurred_at: datetime
    version: int = EVENT_VERSION


class PostedLeg(msgspec.Struct, frozen=True):
    account_id: UUID
    amount_minor: int


class TransactionPosted(Event, frozen=True, kw_only=True, tag="ledger.transaction_posted"):
    transaction_id: UUID
    kind: str
    currency: str
    legs: list[PostedLeg]
    reference_id: UUID | None = None
    corrects_id: UUID | None = None


class HoldReserved(Event, frozen=True, kw_only=True, tag="ledger.hold_reserved"):
    hold_id: UUID
    account_id: UUID
    currency: str
    amount_minor: int
    reference_id: UUID | None
    expires_at: datetime


class HoldResolved(Event, frozen=True, kw_only=True, tag="ledger.hold_resolved"):
    hold_id: UUID
    account_id: UUID
    currency: str
    amount_minor: int
    status: str  # posted | voided | expired
    posted_minor: int | None
    transaction_id: UUID | None


class PaymentEvent(Event, frozen=True, kw_only=True):
    payment_id: UUID
    payer_id: UUID
    from_account_id: UUID
    to_account_id: UUID
    currency: str
    amount_minor: int
    status: str
    hold_id: UUID | None
    captured_minor: int
    refunded_minor: int
    failure_reason: str | None


class PaymentInitiated(PaymentEvent, frozen=True, kw_only=True, tag="payment.initiated"):
    pass


class PaymentFundsReserved(PaymentEvent, frozen=True, kw_only=True, tag="payment.funds_reserved"):
    pass


class PaymentRiskAssessed(PaymentEvent, frozen=True, kw_only=True, tag="payment.risk_assessed"):
    pass


class PaymentUnderReview(PaymentEvent, frozen=True, kw_only=True, tag="payment.under_review"):
    pass


class PaymentPosted(PaymentEvent, frozen=True, kw_only=True, tag="payment.posted"):
    pass


class PaymentCompleted(PaymentEvent, frozen=True, kw_only=True, tag="payment.completed"):
    pass


class PaymentFailed(PaymentEvent, frozen=True, kw_only=True, tag="payment.failed"):
    pass


class PaymentRefunded(PaymentEvent, frozen=True, kw_only=True, tag="payment.refunded"):
    refund_id: UUID
    refund_minor: int


PAYMENT_EVENT_BY_STATUS: Final[dict[str, type[PaymentEvent]]] = {
    "initiated": PaymentInitiated, "funds_reserved": PaymentFundsReserved,
    "risk_assessed": PaymentRiskAssessed, "under_review": PaymentUnderReview,
    "posted": PaymentPosted, "completed": PaymentCompleted, "failed": PaymentFailed,
}
PaymentsEvent = (TransactionPosted | HoldReserved | HoldResolved | PaymentInitiated | PaymentFundsReserved
                 | PaymentRiskAssessed | PaymentUnderReview | PaymentPosted | PaymentCompleted
                 | PaymentFailed | PaymentRefunded)
_encoder = msgspec.json.Encoder()
_decoder: msgspec.json.Decoder[PaymentsEvent] = msgspec.json.Decoder(PaymentsEvent)


def decode_event(payload: bytes | str) -> PaymentsEvent:
    return _decoder.decode(payload)


def event_id(*parts: object) -> UUID:
    """Deterministic: the same change always gets the same id, so redelivery dedupes."""
    return uuid.uuid5(_EVENT_NAMESPACE, ":".join(str(p) for p in parts))


def _now() -> datetime:
    return datetime.now(UTC)


def transaction_posted(entry: Entry) -> OutboxMessage:
    debited = next(leg.account_id for leg in entry.legs if leg.amount_minor < 0)
    event = TransactionPosted(
        event_id=event_id("transaction_posted", entry.id), occurred_at=_now(), transaction_id=entry.id,
        kind=entry.kind, currency=entry.currency, reference_id=entry.reference_id,
        corrects_id=entry.corrects_id, legs=[PostedLeg(leg.account_id, leg.amount_minor) for leg in entry.legs])
    return OutboxMessage(LEDGER_TOPIC, str(debited), _encoder.encode(event))


def hold_reserved(hold_id: UUID, account_id: UUID, currency: str, amount_minor: int,
                  reference_id: UUID | None, expires_at: datetime) -> OutboxMessage:
    event = HoldReserved(event_id=event_id("hold_reserved", hold_id), occurred_at=_now(), hold_id=hold_id,
                         account_id=account_id, currency=currency, amount_minor=amount_minor,
                         reference_id=reference_id, expires_at=expires_at)
    return OutboxMessage(LEDGER_TOPIC, str(account_id), _encoder.encode(event))


def hold_resolved(hold: Hold, status: str, posted_minor: int | None, transaction_id: UUID | None) -> OutboxMessage:
    event = HoldResolved(event_id=event_id("hold_resolved", hold.id), occurred_at=_now(), hold_id=hold.id,
                         account_id=hold.account_id, currency=hold.currency, amount_minor=hold.amount_minor,
                         status=status, posted_minor=posted_minor, transaction_id=transaction_id)
    return OutboxMessage(LEDGER_TOPIC, str(hold.account_id), _encoder.encode(event))


def payment_event(payment: Payment, status: str | None = None) -> OutboxMessage:
    """The saga event for `payment` having reached `status` (default: its current one)."""
    status = status or payment.status
    cls = PAYMENT_EVENT_BY_STATUS[status]
    event = cls(event_id=event_id("payment", payment.id, status), occurred_at=_now(), **_payment_fields(payment, status))
    return OutboxMessage(PAYMENTS_TOPIC, str(payment.from_account_id), _encoder.encode(event))


def payment_refunded(payment: Payment, refund_id: UUID, refund_minor: int) -> OutboxMessage:
    event = PaymentRefunded(event_id=event_id("payment_refunded", refund_id), occurred_at=_now(),
                            refund_id=refund_id, refund_minor=refund_minor, **_payment_fields(payment, payment.status))
    return OutboxMessage(PAYMENTS_TOPIC, str(payment.from_account_id), _encoder.encode(event))


def _payment_fields(payment: Payment, status: str) -> dict[str, object]:
    return {"payment_id": payment.id, "payer_id": payment.payer_id, "from_account_id": payment.from_account_id,
            "to_account_id": payment.to_account_id, "currency": payment.currency,
            "amount_minor": payment.amount_minor, "status": status, "hold_id": payment.hold_id,
            "captured_minor": payment.captured_minor, "refunded_minor": payment.refunded_minor,
            "failure_reason": payment.failure_reason}


# ----------------------------------------------------------------------------- the relay

class OutboxRow(msgspec.Struct, frozen=True):
    id: int
    topic: str
    key: str
    payload: bytes


Publish = Callable[[Sequence[OutboxRow]], Awaitable[None]]


async def relay_outbox_once(pool: asyncpg.Pool, publish: Publish, *, batch_size: int = 1_000) -> int:
    """Publish one batch of unpublished outbox rows in id order; returns how many.

    `publish` must return only once the broker acknowledged every row (e.g. awaiting the
    aiokafka send futures). If it raises, nothing is stamped and the same rows go again
    next time: at-least-once, with consumers deduping by event_id. An advisory lock keeps
    a single relay active, so rows of one key are never published out of order.
    """
    assert 0 < batch_size <= RELAY_MAX_BATCH, "relay batch out of bounds"
    async with pool.acquire() as conn, conn.transaction():
        if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", _RELAY_LOCK_ID):
            return 0
        rows = await conn.fetch(
            "SELECT id, topic, key, payload::text AS payload FROM payments.outbox "
            "WHERE published_at IS NULL ORDER BY id LIMIT $1", batch_size)
        if not rows:
            return 0
        batch = [OutboxRow(r["id"], r["topic"], r["key"], r["payload"].encode()) for r in rows]
        await publish(batch)
        stamped = await conn.execute("UPDATE payments.outbox SET published_at = now() "
                                     "WHERE id = ANY($1::bigint[]) AND published_at IS NULL", [r.id for r in batch])
        assert stamped == f"UPDATE {len(batch)}", "outbox rows stamped by someone else while we held the lock"
        return len(batch)


async def unpublished_count(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval("SELECT count(*) FROM payments.outbox WHERE published_at IS NULL"))
