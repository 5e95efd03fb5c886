"""Payments events into the transactional outbox, and the relay that takes them to Kafka.

Every journal change writes its events to `payments.outbox` in the same PostgreSQL
transaction (db.payments.write_journal, insert_outbox), so a committed change cannot be
lost between the database and Kafka; `relay_outbox_once` publishes unpublished rows in id
order and stamps them, at least once. The event types live in streams/payments.py.

Ledger events carry the balances of the accounts they touched *after* the write
(`BalanceAfter`, versioned). The ledger computes those inside write_journal, under the
balance row locks, so the builders here return `LedgerOutbox` objects that write_journal
renders with the balances it is about to write.

Batch operations of the saga write one outbox row per topic holding all their events
(`payment_envelopes`, `ledger_envelope`): a batch of 1,000 payments costs two rows, not
thousands. The relay (`relay_messages`) splits rows and envelopes into events, regroups
them by Kafka partition of their key (order kept per partition, so per key), derives one
`ledger.balance` per account from the balances the ledger events carry (highest version
in the batch) and wraps each partition's events into `payment.batch` / `ledger.batch`
messages of at most MAX_BATCH_EVENTS. Consumers dedupe by event id / payment id and keep
the highest balance version, so the at-least-once relay never doubles an effect.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Union
from uuid import UUID

import asyncpg
import msgspec

from db.payments import Balance, Entry, Hold, OutboxMessage, Payment
from streams.codec import decode as decode_wire
from streams.dlq import dead_letter
from streams.events import now_ms, wire_type
from streams.payments import (
    LEDGER,
    MAX_BATCH_EVENTS,
    PAYMENTS,
    STEP_BY_STATUS,
    BalanceAfter,
    HoldReserved,
    HoldResolved,
    LedgerBalance,
    LedgerValue,
    PaymentRefunded,
    PaymentStep,
    PaymentsValue,
    PostedLeg,
    TransactionPosted,
)
from streams.topics import DLQ_SUFFIX, dlq_name, partition_for_key

__all__ = ["HoldReserved", "HoldResolved", "LedgerBalance", "PaymentRefunded", "PaymentStep", "TransactionPosted"]

LEDGER_TOPIC: Final = LEDGER.name
PAYMENTS_TOPIC: Final = PAYMENTS.name
# Any fixed namespace works; it only has to stay the same so event ids stay deterministic.
_EVENT_NAMESPACE: Final = UUID("6c0f6a0e-7d1b-4d0e-9a57-5b1f3c2e9a41")
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_sha1 = hashlib.sha1
# Bounds for the relay (TigerBeetle style: every loop and batch has one).
RELAY_MAX_BATCH: Final = 5_000
_RELAY_LOCK_ID: Final = 0x5041594F  # one relay at a time keeps per-key order

_encoder = msgspec.json.Encoder()
_ANY_EVENT: Final = wire_type(Union[PaymentsValue, LedgerValue])


def decode_event(payload: bytes | str) -> PaymentsValue | LedgerValue:
    """Any payments or ledger event (or batch) from its JSON; strict, like a consumer."""
    return decode_wire(payload, _ANY_EVENT)  # type: ignore[no-any-return]


def uuid5_bytes(namespace: UUID, name: str) -> bytes:
    """uuid.uuid5(namespace, name).bytes without building UUID objects on the way: the
    saga derives ~11 ids per payment, and the stdlib's path was ~10 % of its Python time."""
    digest = bytearray(_sha1(namespace.bytes + name.encode(), usedforsecurity=False).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x50  # version 5
    digest[8] = (digest[8] & 0x3F) | 0x80  # RFC 4122 variant
    return bytes(digest)


def uuid5_str(namespace: UUID, name: str) -> str:
    """str(uuid.uuid5(namespace, name)), the same text, computed directly."""
    x = uuid5_bytes(namespace, name).hex()
    return f"{x[:8]}-{x[8:12]}-{x[12:16]}-{x[16:20]}-{x[20:]}"


def event_id(*parts: object) -> str:
    """Deterministic: the same change always gets the same id, so redelivery dedupes."""
    return uuid5_str(_EVENT_NAMESPACE, ":".join(map(str, parts)))


def version_us(at: datetime) -> int:
    """A balance's version: microseconds since the epoch of its `updated_at` (exact)."""
    return (at - _EPOCH) // timedelta(microseconds=1)


def at_version(version: int) -> datetime:
    return _EPOCH + timedelta(microseconds=version)


def balance_after(balance: Balance) -> BalanceAfter:
    assert balance.updated_at is not None, "balance read without its version"
    return BalanceAfter(account_id=balance.account_id, currency=balance.currency, posted_minor=balance.posted_minor,
                        reserved_minor=balance.reserved_minor, last_seq=balance.last_seq,
                        version_us=version_us(balance.updated_at))


# ------------------------------------------------------------------------- ledger events

@dataclass(frozen=True, slots=True)
class LedgerOutbox:
    """A ledger event whose balances are filled in by write_journal (`render`)."""

    key: UUID
    accounts: tuple[UUID, ...]
    build: Callable[[list[BalanceAfter]], Any]

    def render(self, after: Mapping[UUID, Balance]) -> OutboxMessage:
        return self.render_from({a: balance_after(after[a]) for a in self.accounts})

    def render_from(self, afters: Mapping[UUID, BalanceAfter]) -> OutboxMessage:
        event = self.build([afters[a] for a in self.accounts])
        return OutboxMessage(LEDGER_TOPIC, str(self.key), _encoder.encode(event))


def transaction_posted(entry: Entry) -> LedgerOutbox:
    debited = next(leg.account_id for leg in entry.legs if leg.amount_minor < 0)
    accounts = tuple(dict.fromkeys(leg.account_id for leg in entry.legs))
    legs = [PostedLeg(leg.account_id, leg.amount_minor) for leg in entry.legs]

    def build(balances: list[BalanceAfter]) -> TransactionPosted:
        return TransactionPosted(
            id=event_id("transaction_posted", entry.id), account_id=debited, transaction_id=entry.id,
            kind=entry.kind, currency=entry.currency, legs=legs, reference_id=entry.reference_id,
            corrects_id=entry.corrects_id, balances=balances)

    return LedgerOutbox(debited, accounts, build)


def hold_reserved(hold_id: UUID, account_id: UUID, currency: str, amount_minor: int,
                  reference_id: UUID | None, expires_at: datetime) -> LedgerOutbox:
    def build(balances: list[BalanceAfter]) -> HoldReserved:
        return HoldReserved(id=event_id("hold_reserved", hold_id), account_id=account_id, hold_id=hold_id,
                            currency=currency, amount_minor=amount_minor, reference_id=reference_id,
                            expires_at_ms=version_us(expires_at) // 1000, balances=balances)

    return LedgerOutbox(account_id, (account_id,), build)


def hold_resolved(hold: Hold, status: str, posted_minor: int | None, transaction_id: UUID | None) -> LedgerOutbox:
    def build(balances: list[BalanceAfter]) -> HoldResolved:
        return HoldResolved(id=event_id("hold_resolved", hold.id), account_id=hold.account_id, hold_id=hold.id,
                            currency=hold.currency, amount_minor=hold.amount_minor, status=status,
                            posted_minor=posted_minor, transaction_id=transaction_id, balances=balances)

    return LedgerOutbox(hold.account_id, (hold.account_id,), build)


def ledger_balance(balance: Balance) -> OutboxMessage:
    """One account's current balance (the projection's rebuild from PostgreSQL)."""
    snapshot = balance_after(balance)
    event = LedgerBalance(id=event_id("balance", balance.account_id, snapshot.version_us),
                          account_id=balance.account_id, balance=snapshot)
    return OutboxMessage(LEDGER_TOPIC, str(balance.account_id), _encoder.encode(event))


# ------------------------------------------------------------------------ payment events

def payment_context(payment: Payment) -> dict[str, str]:
    """Device, IP and country the request came with (kept on the payment row)."""
    return {"device_id": payment.device_id, "ip": payment.ip, "country": payment.country}


def payment_step(payment: Payment, status: str | None = None) -> PaymentStep:
    """The saga event for `payment` having reached `status` (default: its current one)."""
    status = status or payment.status
    return STEP_BY_STATUS[status](id=event_id("payment", payment.id, status), **_payment_fields(payment, status))


def payment_event(payment: Payment, status: str | None = None) -> OutboxMessage:
    return OutboxMessage(PAYMENTS_TOPIC, str(payment.from_account_id), _encoder.encode(payment_step(payment, status)))


def payment_events(payment: Payment, statuses: Sequence[str]) -> list[OutboxMessage]:
    """The events of several steps of one payment, in the given order (the same events as
    payment_event per status, with the payment's fields read once)."""
    key, common = str(payment.from_account_id), _payment_fields(payment, "")
    out: list[OutboxMessage] = []
    for status in statuses:
        fields = {**common, "status": status, "failure_reason": payment.failure_reason if status == "failed" else None}
        event = STEP_BY_STATUS[status](id=event_id("payment", payment.id, status), **fields)
        out.append(OutboxMessage(PAYMENTS_TOPIC, key, _encoder.encode(event)))
    return out


def payment_refunded(payment: Payment, refund_id: UUID, refund_minor: int) -> OutboxMessage:
    event = PaymentRefunded(id=event_id("payment_refunded", refund_id), refund_id=refund_id,
                            refund_minor=refund_minor, **_payment_fields(payment, payment.status))
    return OutboxMessage(PAYMENTS_TOPIC, str(payment.from_account_id), _encoder.encode(event))


def _payment_fields(payment: Payment, status: str) -> dict[str, Any]:
    return {"payment_id": payment.id, "payer_user_id": payment.payer_id, "payer_wallet_id": payment.from_account_id,
            "payee_wallet_id": payment.to_account_id, "currency": payment.currency,
            "amount_minor": payment.amount_minor, "status": status,
            "failure_reason": payment.failure_reason if status == "failed" else None, "hold_id": payment.hold_id,
            "captured_minor": payment.captured_minor, "refunded_minor": payment.refunded_minor,
            "initiated_ms": int(payment.created_at.timestamp() * 1000), **payment_context(payment)}


def user_channel(user_id: UUID | str) -> str:
    """The channel that carries a payer's status changes (agents/payments.py publishes,
    WS /ws/payments in api/payments.py subscribes)."""
    return f"payments.user.{user_id}"


# ------------------------------------------------------------------------------ envelopes

class _RawPaymentBatch(msgspec.Struct, kw_only=True, tag_field="type", tag="payment.batch"):
    """PaymentEventBatch with its events already encoded (no re-encoding of each event)."""

    version: int
    id: str
    ts_ms: int
    payer_wallet_id: str
    events: list[msgspec.Raw]


class _RawLedgerBatch(msgspec.Struct, kw_only=True, tag_field="type", tag="ledger.batch"):
    version: int
    id: str
    ts_ms: int
    account_id: str
    events: list[msgspec.Raw]


def _envelope(topic: str, key: str, payloads: Sequence[bytes], ids: Sequence[str]) -> bytes:
    assert 1 <= len(payloads) <= MAX_BATCH_EVENTS, len(payloads)
    common = {"version": 1, "id": event_id("batch", topic, ids[0], ids[-1], len(ids)), "ts_ms": now_ms(),
              "events": [msgspec.Raw(p) for p in payloads]}
    if topic == PAYMENTS_TOPIC:
        return _encoder.encode(_RawPaymentBatch(payer_wallet_id=key, **common))
    return _encoder.encode(_RawLedgerBatch(account_id=key, **common))


def payment_envelopes(messages: Sequence[OutboxMessage]) -> list[OutboxMessage]:
    """Payment events of one batch operation as few outbox rows (<= MAX_BATCH_EVENTS each)."""
    out: list[OutboxMessage] = []
    for start in range(0, len(messages), MAX_BATCH_EVENTS):
        chunk = messages[start:start + MAX_BATCH_EVENTS]
        if len(chunk) == 1:
            out.append(chunk[0])
            continue
        ids = [_peek(m.payload).id for m in (chunk[0], chunk[-1])]
        out.append(OutboxMessage(PAYMENTS_TOPIC, chunk[0].key,
                                 _envelope(PAYMENTS_TOPIC, chunk[0].key, [m.payload for m in chunk], ids)))
    return out


@dataclass(frozen=True, slots=True)
class LedgerEnvelope:
    """Ledger events of one batch operation as one outbox row, rendered by write_journal."""

    items: tuple[LedgerOutbox, ...]

    def render(self, after: Mapping[UUID, Balance]) -> OutboxMessage:
        # Every event of the envelope carries its accounts' balances after the whole write:
        # one BalanceAfter per account, shared, not one per event and account.
        afters = {a: balance_after(after[a]) for a in {a for item in self.items for a in item.accounts}}
        rendered = [item.render_from(afters) for item in self.items]
        if len(rendered) == 1:
            return rendered[0]
        ids = [_peek(m.payload).id for m in (rendered[0], rendered[-1])]
        return OutboxMessage(LEDGER_TOPIC, rendered[0].key,
                             _envelope(LEDGER_TOPIC, rendered[0].key, [m.payload for m in rendered], ids))


def ledger_envelopes(items: Sequence[LedgerOutbox]) -> list[LedgerEnvelope]:
    return [LedgerEnvelope(tuple(items[i:i + MAX_BATCH_EVENTS])) for i in range(0, len(items), MAX_BATCH_EVENTS)]


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
    next time: at-least-once, with consumers deduping by event id. An advisory lock keeps
    a single relay active, so rows of one key are never published out of order (writers
    of one account or payment hold its row lock, so their rows' ids follow commit order).
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


class _Peek(msgspec.Struct):
    """Just what the relay needs from an event: which one it is, its key, what it holds."""

    type: str
    id: str = ""
    version: int = 0
    ts_ms: int = 0
    payer_wallet_id: str | None = None
    account_id: str | None = None
    events: list[msgspec.Raw] | None = None
    balances: list[BalanceAfter] | None = None


_peek_decoder = msgspec.json.Decoder(_Peek)


def _peek(payload: bytes) -> _Peek:
    return _peek_decoder.decode(payload)


class KafkaMessage(msgspec.Struct, frozen=True):
    topic: str  # logical name
    partition: int
    key: bytes
    value: bytes


@dataclass(slots=True)
class _Group:
    keys: list[str]
    ids: list[str]
    payloads: list[bytes]


def relay_messages(rows: Iterable[OutboxRow], partitions: Mapping[str, int]) -> list[KafkaMessage]:
    """The Kafka messages for outbox rows: events regrouped per partition, batched, in order,
    plus one `ledger.balance` per account the ledger events touched (its newest version)."""
    groups: dict[tuple[str, int], _Group] = {}
    newest: dict[UUID, BalanceAfter] = {}
    for row in rows:
        try:
            inner = _row_items(row)
        except (msgspec.DecodeError, msgspec.ValidationError, KeyError) as exc:
            # Not ours to read (a row written by an older version, say): it still goes out,
            # whole, to the topic's dead-letter twin, so the relay never stalls on it.
            letter = dead_letter(row.topic, -1, row.id, row.key.encode(), row.payload, exc, "payments.relay")
            _add(groups, dlq_name(row.topic), partition_for_key(row.key, partitions[row.topic]), row.key,
                 str(row.id), _encoder.encode(letter))
            continue
        for key, item, payload in inner:
            _add(groups, row.topic, partition_for_key(key, partitions[row.topic]), key, item.id, payload)
            for b in item.balances or ():
                if b.account_id not in newest or newest[b.account_id].version_us < b.version_us:
                    newest[b.account_id] = b
    for account_id, b in newest.items():
        event = LedgerBalance(id=event_id("balance", account_id, b.version_us), account_id=account_id, balance=b)
        key = str(account_id)
        _add(groups, LEDGER_TOPIC, partition_for_key(key, partitions[LEDGER_TOPIC]), key, event.id,
             _encoder.encode(event))
    return [m for (topic, partition), g in groups.items() for m in _messages(topic, partition, g)]


def _row_items(row: OutboxRow) -> list[tuple[str, _Peek, bytes]]:
    """(key, peek, payload) of each event in a row: an envelope's events, or the row's own."""
    key_field = "payer_wallet_id" if row.topic == PAYMENTS_TOPIC else "account_id"
    outer = _peek(row.payload)
    if outer.events is None:
        return [(_checked(outer, key_field, row.key), outer, row.payload)]
    out: list[tuple[str, _Peek, bytes]] = []
    for raw in outer.events:
        item = _peek(bytes(raw))
        out.append((_checked(item, key_field, None), item, bytes(raw)))
    return out


def _checked(item: _Peek, key_field: str, row_key: str | None) -> str:
    """The event's key, after the cheap checks that keep one bad event from spoiling the
    batch it would be put in: a header and a key (our encoders wrote the rest)."""
    key = getattr(item, key_field) or row_key
    if not (item.id and item.ts_ms and item.version and key):
        raise KeyError(f"{item.type} on the outbox lacks its header or its {key_field}")
    return key


def _add(groups: dict[tuple[str, int], _Group], topic: str, partition: int, key: str, item_id: str,
         payload: bytes) -> None:
    group = groups.setdefault((topic, partition), _Group([], [], []))
    group.keys.append(key)
    group.ids.append(item_id)
    group.payloads.append(payload)


def _messages(topic: str, partition: int, group: _Group) -> Iterable[KafkaMessage]:
    if topic.endswith(DLQ_SUFFIX):  # dead letters travel one per message
        yield from (KafkaMessage(topic, partition, k.encode(), v) for k, v in zip(group.keys, group.payloads))
        return
    for start in range(0, len(group.payloads), MAX_BATCH_EVENTS):
        end = start + MAX_BATCH_EVENTS
        payloads, keys = group.payloads[start:end], group.keys[start:end]
        value = payloads[0] if len(payloads) == 1 else _envelope(topic, keys[0], payloads, group.ids[start:end])
        yield KafkaMessage(topic, partition, keys[0].encode(), value)
