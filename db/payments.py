"""Rows and SQL of the `payments` schema; the ledger's only writer of balances and journal.

Everything here runs on a connection the caller holds inside a transaction. The rules that
keep it deadlock-free and correct (docs/PAYMENTS.md):
  * lock order: balance rows (ascending account id, one statement), then holds (ascending
    id), then the entity row (payment, escrow, deposit, payout);
  * `write_journal` is the one place journal legs, balance deltas and outbox rows are
    written: one statement per call however many transactions it carries, with the
    projected balances checked before the write and compared after reading them back.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol
from uuid import UUID

import asyncpg
import msgspec

SYSTEM_ACCOUNT_KINDS = ("gateway_clearing", "fees", "escrow", "platform_revenue")
# Only gateway clearing may go negative (migration: accounts_overdraft_by_kind).
OVERDRAFT_KINDS = frozenset({"gateway_clearing"})
MAX_ROWS_PER_WRITE = 50_000


class InvariantViolation(RuntimeError):
    """A ledger invariant failed inside our own code: a bug, never a client error.

    Raised rather than `assert`ed so that running Python with -O cannot switch it off.
    """


def invariant(condition: bool, message: str) -> None:
    if not condition:
        raise InvariantViolation(message)


def system_account_id(kind: str, currency: str) -> UUID:
    """The id of a system account, the same md5 the migration seeds with (no query needed)."""
    invariant(kind in SYSTEM_ACCOUNT_KINDS, f"unknown system account kind {kind!r}")
    digest = hashlib.md5(f"fintide.payments.system:{kind}:{currency}".encode(), usedforsecurity=False)
    return UUID(digest.hexdigest())


# ---------------------------------------------------------------------------------- rows

class Account(msgspec.Struct, frozen=True):
    id: UUID
    kind: str
    owner_id: UUID | None
    currency: str
    allow_overdraft: bool
    created_at: datetime


class Balance(msgspec.Struct, frozen=True):
    account_id: UUID
    currency: str
    allow_overdraft: bool
    posted_minor: int
    reserved_minor: int
    last_seq: int
    # The balance's version: strictly increasing with every change of the row (write_journal
    # sets it under the row lock), so consumers of balance events can order them.
    updated_at: datetime | None = None

    @property
    def available_minor(self) -> int:
        return self.posted_minor - self.reserved_minor


class Hold(msgspec.Struct, frozen=True):
    id: UUID
    account_id: UUID
    currency: str
    amount_minor: int
    status: str
    posted_minor: int | None
    destination_account_id: UUID | None
    transaction_id: UUID | None
    reference_id: UUID | None
    expires_at: datetime
    created_at: datetime
    resolved_at: datetime | None


class Payment(msgspec.Struct, frozen=True):
    id: UUID
    payer_id: UUID
    from_account_id: UUID
    to_account_id: UUID
    currency: str
    amount_minor: int
    description: str
    status: str
    hold_id: UUID | None
    transaction_id: UUID | None
    captured_minor: int
    refunded_minor: int
    failure_reason: str | None
    created_at: datetime
    updated_at: datetime
    # The saga history (migration 0002): when each step happened (`initiated` is
    # created_at), the detail of the three steps that carry one, and the request's context.
    reserved_at: datetime | None = None
    review_at: datetime | None = None
    assessed_at: datetime | None = None
    posted_at: datetime | None = None
    completed_at: datetime | None = None
    failed_at: datetime | None = None
    review_detail: str | None = None
    assessed_detail: str | None = None
    failed_detail: str | None = None
    device_id: str = ""
    ip: str = ""
    country: str = ""

    @property
    def steps(self) -> list[dict[str, Any]]:
        """The saga steps so far, in the order they happened: {status, at, detail?}
        (`initiated` also carries the request's device_id, ip and country when given)."""
        first: dict[str, Any] = {"status": "initiated", "at": self.created_at.isoformat()}
        first.update((k, v) for k, v in (("device_id", self.device_id), ("ip", self.ip), ("country", self.country)) if v)
        out = [first]
        # Only under_review and risk_assessed occur in either order (a model review then
        # the analyst's allow, or an assessment sent to review); the rest is the saga's order.
        decided = [s for s in ("under_review", "risk_assessed") if getattr(self, STEP_COLUMNS[s]) is not None]
        decided.sort(key=lambda s: getattr(self, STEP_COLUMNS[s]))
        for status in ("funds_reserved", *decided, "posted", "completed", "failed"):
            at = getattr(self, STEP_COLUMNS[status])
            if at is None:
                continue
            step: dict[str, Any] = {"status": status, "at": at.isoformat()}
            detail = getattr(self, DETAIL_COLUMNS[status]) if status in DETAIL_COLUMNS else None
            if detail:
                step["detail"] = detail
            out.append(step)
        return out


# The column recording when a payment reached each saga status (`initiated`: created_at),
# and the columns of the steps that carry a detail.
STEP_COLUMNS: dict[str, str] = {"funds_reserved": "reserved_at", "under_review": "review_at",
                                "risk_assessed": "assessed_at", "posted": "posted_at",
                                "completed": "completed_at", "failed": "failed_at"}
DETAIL_COLUMNS: dict[str, str] = {"under_review": "review_detail", "risk_assessed": "assessed_detail",
                                  "failed": "failed_detail"}
STEP_DETAIL_MAX_CHARS = 200


class Refund(msgspec.Struct, frozen=True):
    id: UUID
    payment_id: UUID
    currency: str
    amount_minor: int
    transaction_id: UUID
    requested_by: UUID
    reason: str
    created_at: datetime


class Deposit(msgspec.Struct, frozen=True):
    id: UUID
    account_id: UUID
    owner_id: UUID
    currency: str
    amount_minor: int
    status: str
    gateway: str
    gateway_ref: str | None
    transaction_id: UUID | None
    failure_reason: str | None
    created_at: datetime
    resolved_at: datetime | None


class Payout(msgspec.Struct, frozen=True):
    id: UUID
    account_id: UUID
    owner_id: UUID
    currency: str
    amount_minor: int
    fee_minor: int
    destination: str
    status: str
    gateway: str
    gateway_ref: str | None
    transaction_id: UUID
    reversal_transaction_id: UUID | None
    failure_reason: str | None
    created_at: datetime
    resolved_at: datetime | None


class Escrow(msgspec.Struct, frozen=True):
    id: UUID
    payer_id: UUID
    payee_id: UUID
    from_account_id: UUID
    to_account_id: UUID
    currency: str
    amount_minor: int
    commission_minor: int
    release_condition: str
    status: str
    hold_transaction_id: UUID
    resolution_transaction_id: UUID | None
    resolved_by: UUID | None
    created_at: datetime
    resolved_at: datetime | None


class StatementEntry(msgspec.Struct, frozen=True):
    seq: int
    transaction_id: UUID
    kind: str
    amount_minor: int
    balance_after_minor: int
    reference_id: UUID | None
    description: str
    created_at: datetime


class TrialBalanceLine(msgspec.Struct, frozen=True):
    currency: str
    debits_minor: int
    credits_minor: int
    transactions: int

    @property
    def balanced(self) -> bool:
        return self.debits_minor == self.credits_minor


def _row(cls: type[Any], record: asyncpg.Record | None) -> Any:
    if record is None:
        return None
    fields = cls.__struct_fields__
    if tuple(record.keys()) == fields:
        # The query returned the struct's columns in its order (SELECT * of its table, or its
        # column list): positional construction costs ~0.5 us against ~5 us through a dict,
        # and the saga builds ~13 rows per payment. A currency padded by char(n) takes the
        # dict path below (ours have three letters and never are).
        built = cls(*record)
        if "currency" not in fields or not built.currency.endswith(" "):
            return built
    values = dict(record)
    if "currency" in values:
        values["currency"] = values["currency"].strip()
    return cls(**values)


# ------------------------------------------------------------------------------ accounts

async def insert_wallet(conn: asyncpg.Connection, account_id: UUID, owner_id: UUID, currency: str) -> Account | None:
    """A new wallet and its zero balance row; None when the owner has one in that currency."""
    record = await conn.fetchrow(
        """INSERT INTO payments.accounts (id, kind, owner_id, currency, allow_overdraft)
           VALUES ($1, 'wallet', $2, $3, false)
           ON CONFLICT (owner_id, currency) WHERE kind = 'wallet' DO NOTHING
           RETURNING *""", account_id, owner_id, currency)
    if record is None:
        return None
    await conn.execute("INSERT INTO payments.balances (account_id, currency, allow_overdraft) "
                       "VALUES ($1, $2, false)", account_id, currency)
    return _row(Account, record)


async def get_account(conn: asyncpg.Connection, account_id: UUID) -> Account | None:
    return _row(Account, await conn.fetchrow("SELECT * FROM payments.accounts WHERE id = $1", account_id))


async def find_wallet(conn: asyncpg.Connection, owner_id: UUID, currency: str) -> Account | None:
    return _row(Account, await conn.fetchrow(
        "SELECT * FROM payments.accounts WHERE kind = 'wallet' AND owner_id = $1 AND currency = $2",
        owner_id, currency))


async def get_accounts(conn: asyncpg.Connection, account_ids: Iterable[UUID]) -> dict[UUID, Account]:
    rows = await conn.fetch("SELECT * FROM payments.accounts WHERE id = ANY($1::uuid[])", list(account_ids))
    return {r["id"]: _row(Account, r) for r in rows}


_BALANCE_COLUMNS = "account_id, currency, allow_overdraft, posted_minor, reserved_minor, last_seq, updated_at"


async def get_balance(conn: asyncpg.Connection, account_id: UUID) -> Balance | None:
    return _row(Balance, await conn.fetchrow(
        f"SELECT {_BALANCE_COLUMNS} FROM payments.balances WHERE account_id = $1", account_id))


async def lock_balances(conn: asyncpg.Connection, account_ids: Iterable[UUID]) -> dict[UUID, Balance]:
    """Lock balance rows in ascending account id order (one statement), the global lock order.

    The sort sits below the row-locking step in the plan, so every transaction takes these
    locks in the same order and two of them can never wait on each other in a cycle.
    """
    ids = sorted(set(account_ids))
    invariant(len(ids) <= MAX_ROWS_PER_WRITE, "too many accounts in one write")
    rows = await conn.fetch(
        f"SELECT {_BALANCE_COLUMNS} FROM payments.balances WHERE account_id = ANY($1::uuid[]) "
        "ORDER BY account_id FOR UPDATE", ids)
    return {r["account_id"]: _row(Balance, r) for r in rows}


# ------------------------------------------------------------------------------- journal

@dataclass(frozen=True, slots=True)
class Leg:
    account_id: UUID
    amount_minor: int  # > 0 credits the account, < 0 debits it


@dataclass(frozen=True, slots=True)
class Entry:
    """One journal transaction to write: legs in one currency that sum to zero."""

    id: UUID
    kind: str
    currency: str
    legs: tuple[Leg, ...]
    reference_id: UUID | None = None
    corrects_id: UUID | None = None
    description: str = ""


@dataclass(frozen=True, slots=True)
class OutboxMessage:
    topic: str
    key: str
    payload: bytes  # JSON


class LateOutbox(Protocol):
    """An outbox message that needs the balances as they will be after the write (a ledger
    event carrying them); write_journal renders it with its projection."""

    def render(self, after: Mapping[UUID, Balance]) -> OutboxMessage: ...


@dataclass(slots=True)
class _Projection:
    posted_minor: int
    reserved_minor: int
    last_seq: int


def project(locked: Mapping[UUID, Balance], entries: Sequence[Entry],
            reserved_delta_by_account: Mapping[UUID, int]) -> tuple[dict[UUID, _Projection], list[tuple[Any, ...]]]:
    """The balances after `entries` and reservation changes, and the leg rows to insert.

    Pure: the caller has locked every account involved, so nothing else moves them meanwhile.
    """
    projected = {a: _Projection(b.posted_minor, b.reserved_minor, b.last_seq) for a, b in locked.items()}
    leg_rows: list[tuple[Any, ...]] = []
    for entry in entries:
        # Plain ifs, not invariant(..., f"..."): this loop runs per leg on the hot path and
        # must not format messages that are only needed on failure.
        if len(entry.legs) < 2 or sum(leg.amount_minor for leg in entry.legs) != 0:
            raise InvariantViolation(f"transaction {entry.id} does not have two or more legs netting to zero")
        for leg in entry.legs:
            balance = locked.get(leg.account_id)
            if balance is None or balance.currency != entry.currency or leg.amount_minor == 0:
                raise InvariantViolation(f"transaction {entry.id}: leg {leg} is zero, unlocked or in another currency")
            p = projected[leg.account_id]
            p.last_seq += 1
            p.posted_minor += leg.amount_minor
            leg_rows.append((entry.id, leg.account_id, entry.currency, leg.amount_minor, p.last_seq, p.posted_minor))
    for account_id, delta in reserved_delta_by_account.items():
        invariant(account_id in locked, f"account {account_id} was not locked")
        projected[account_id].reserved_minor += delta
    return projected, leg_rows


def check_projection(locked: Mapping[UUID, Balance], projected: Mapping[UUID, _Projection]) -> None:
    """Before the write: reservations are never negative, non-overdraft accounts never below zero."""
    for account_id, p in projected.items():
        if p.reserved_minor < 0 or (not locked[account_id].allow_overdraft and p.posted_minor < p.reserved_minor):
            raise InvariantViolation(f"account {account_id} would have posted {p.posted_minor}, reserved {p.reserved_minor}")


_WRITE_JOURNAL = """
WITH new_transactions AS (
    INSERT INTO payments.transactions (id, kind, reference_id, corrects_id, description)
    SELECT * FROM unnest($1::uuid[], $2::text[], $3::uuid[], $4::uuid[], $5::text[])
    RETURNING 1
), new_legs AS (
    INSERT INTO payments.legs (transaction_id, account_id, currency, amount_minor, account_seq,
                               balance_after_minor)
    SELECT * FROM unnest($6::uuid[], $7::uuid[], $8::text[], $9::bigint[], $10::bigint[], $11::bigint[])
    RETURNING 1
), new_outbox AS (
    INSERT INTO payments.outbox (topic, key, payload)
    SELECT o.topic, o.key, o.payload FROM unnest($12::text[], $13::text[], $14::text[]) AS o (topic, key, payload)
    RETURNING 1
)
UPDATE payments.balances AS b
SET posted_minor = b.posted_minor + d.posted_delta,
    reserved_minor = b.reserved_minor + d.reserved_delta,
    last_seq = b.last_seq + d.seq_delta,
    updated_at = d.updated_at
FROM unnest($15::uuid[], $16::bigint[], $17::bigint[], $18::bigint[], $19::timestamptz[])
     AS d (account_id, posted_delta, reserved_delta, seq_delta, updated_at)
WHERE b.account_id = d.account_id
RETURNING b.account_id, b.currency, b.allow_overdraft, b.posted_minor, b.reserved_minor, b.last_seq, b.updated_at
"""
_ONE_MICROSECOND = timedelta(microseconds=1)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def next_versions(locked: Mapping[UUID, Balance], account_ids: Iterable[UUID]) -> dict[UUID, datetime]:
    """New `updated_at` for changed balances: now, but always after the previous version
    (held under the row lock), so versions grow strictly even if clocks disagree."""
    now = _EPOCH + timedelta(microseconds=time.time_ns() // 1000)
    out: dict[UUID, datetime] = {}
    for a in account_ids:
        previous = locked[a].updated_at
        out[a] = now if previous is None or now > previous else previous + _ONE_MICROSECOND
    return out


async def write_journal(conn: asyncpg.Connection, locked: Mapping[UUID, Balance], entries: Sequence[Entry],
                        reserved_delta_by_account: Mapping[UUID, int],
                        outbox: Sequence[OutboxMessage | LateOutbox]) -> dict[UUID, Balance]:
    """Write journal transactions, balance changes and outbox rows in one statement.

    `locked` must hold every account the entries and reservation changes touch, locked by
    `lock_balances` in this transaction. Returns the balances read back after the write.
    """
    invariant(conn.is_in_transaction(), "write_journal outside a transaction")
    projected, leg_rows = project(locked, entries, reserved_delta_by_account)
    check_projection(locked, projected)
    invariant(len(leg_rows) + len(outbox) <= MAX_ROWS_PER_WRITE, "write too large; split the batch")
    changed = {a: p for a, p in projected.items()
               if (p.posted_minor, p.reserved_minor, p.last_seq)
               != (locked[a].posted_minor, locked[a].reserved_minor, locked[a].last_seq)}
    versions = next_versions(locked, changed)
    expected = {**locked, **{a: msgspec.structs.replace(locked[a], posted_minor=p.posted_minor,
                                                        reserved_minor=p.reserved_minor, last_seq=p.last_seq,
                                                        updated_at=versions[a]) for a, p in changed.items()}}
    outbox = [m if isinstance(m, OutboxMessage) else m.render(expected) for m in outbox]
    rows = await conn.fetch(
        _WRITE_JOURNAL,
        [e.id for e in entries], [e.kind for e in entries], [e.reference_id for e in entries],
        [e.corrects_id for e in entries], [e.description for e in entries],
        [r[0] for r in leg_rows], [r[1] for r in leg_rows], [r[2] for r in leg_rows],
        [r[3] for r in leg_rows], [r[4] for r in leg_rows], [r[5] for r in leg_rows],
        [m.topic for m in outbox], [m.key for m in outbox], [m.payload.decode() for m in outbox],
        list(changed), [p.posted_minor - locked[a].posted_minor for a, p in changed.items()],
        [p.reserved_minor - locked[a].reserved_minor for a, p in changed.items()],
        [p.last_seq - locked[a].last_seq for a, p in changed.items()], [versions[a] for a in changed])
    after = {r["account_id"]: _row(Balance, r) for r in rows}
    # After the read-back: the database holds exactly the balances we projected (and the
    # balances the ledger events in the outbox carry).
    invariant(set(after) == set(changed), "balance rows updated differ from the rows projected")
    for account_id, balance in after.items():
        if balance != expected[account_id]:
            raise InvariantViolation(f"account {account_id} read back {balance} but {expected[account_id]} was projected")
    return {**locked, **after}


async def insert_outbox(conn: asyncpg.Connection, outbox: Sequence[OutboxMessage]) -> None:
    """Outbox rows for a change that touches no balance (a saga step), in the caller's transaction."""
    invariant(conn.is_in_transaction(), "outbox written outside a transaction")
    invariant(len(outbox) <= MAX_ROWS_PER_WRITE, "too many outbox rows in one write")
    if outbox:
        await conn.execute("INSERT INTO payments.outbox (topic, key, payload) SELECT o.topic, o.key, o.payload "
                           "FROM unnest($1::text[], $2::text[], $3::text[]) AS o (topic, key, payload)",
                           [m.topic for m in outbox], [m.key for m in outbox], [m.payload.decode() for m in outbox])


async def existing_transaction_ids(conn: asyncpg.Connection, ids: Sequence[UUID]) -> set[UUID]:
    rows = await conn.fetch("SELECT id FROM payments.transactions WHERE id = ANY($1::uuid[])", list(ids))
    return {r["id"] for r in rows}


async def transaction_legs(conn: asyncpg.Connection, transaction_id: UUID) -> list[tuple[UUID, int]]:
    rows = await conn.fetch("SELECT account_id, amount_minor FROM payments.legs WHERE transaction_id = $1 "
                            "ORDER BY id", transaction_id)
    return [(r["account_id"], r["amount_minor"]) for r in rows]


async def get_transaction(conn: asyncpg.Connection, transaction_id: UUID) -> asyncpg.Record | None:
    return await conn.fetchrow(
        "SELECT id, kind, reference_id, corrects_id, description, created_at FROM payments.transactions "
        "WHERE id = $1", transaction_id)


# --------------------------------------------------------------------------------- holds

async def insert_hold(conn: asyncpg.Connection, hold_id: UUID, account_id: UUID, currency: str,
                      amount_minor: int, ttl_s: int, reference_id: UUID | None) -> Hold:
    return _row(Hold, await conn.fetchrow(
        """INSERT INTO payments.holds (id, account_id, currency, amount_minor, reference_id, expires_at)
           VALUES ($1, $2, $3, $4, $5, now() + make_interval(secs => $6)) RETURNING *""",
        hold_id, account_id, currency, amount_minor, reference_id, ttl_s))


async def get_hold(conn: asyncpg.Connection, hold_id: UUID) -> Hold | None:
    return _row(Hold, await conn.fetchrow("SELECT * FROM payments.holds WHERE id = $1", hold_id))


async def get_holds(conn: asyncpg.Connection, hold_ids: Iterable[UUID]) -> dict[UUID, Hold]:
    rows = await conn.fetch("SELECT * FROM payments.holds WHERE id = ANY($1::uuid[])", list(hold_ids))
    return {r["id"]: _row(Hold, r) for r in rows}


async def lock_holds(conn: asyncpg.Connection, hold_ids: Iterable[UUID]) -> tuple[dict[UUID, Hold], datetime]:
    """Lock holds in ascending id order (callers lock the holds' balances first).

    Also returns the transaction's timestamp, the clock every expiry decision uses.
    """
    ids = sorted(set(hold_ids))
    rows = await conn.fetch("SELECT * FROM payments.holds WHERE id = ANY($1::uuid[]) ORDER BY id FOR UPDATE", ids)
    db_now: datetime = await conn.fetchval("SELECT now()")
    return {r["id"]: _row(Hold, r) for r in rows}, db_now


async def expired_hold_ids(conn: asyncpg.Connection, as_of: datetime | None, limit: int) -> list[tuple[UUID, UUID]]:
    """(hold id, account id) of pending holds past expiry, oldest first; no locks taken."""
    rows = await conn.fetch(
        "SELECT id, account_id FROM payments.holds WHERE status = 'pending' "
        "AND expires_at <= coalesce($1, now()) ORDER BY expires_at, id LIMIT $2", as_of, limit)
    return [(r["id"], r["account_id"]) for r in rows]


async def resolve_holds(conn: asyncpg.Connection,
                        resolutions: Sequence[tuple[UUID, str, int | None, UUID | None, UUID | None]]) -> list[Hold]:
    """Move pending holds to (status, posted_minor, destination, transaction_id) in one statement."""
    if not resolutions:
        return []
    rows = await conn.fetch(
        """UPDATE payments.holds AS h
           SET status = r.status, posted_minor = r.posted_minor, destination_account_id = r.destination,
               transaction_id = r.transaction_id, resolved_at = now()
           FROM unnest($1::uuid[], $2::text[], $3::bigint[], $4::uuid[], $5::uuid[])
                AS r (id, status, posted_minor, destination, transaction_id)
           WHERE h.id = r.id AND h.status = 'pending'
           RETURNING h.*""",
        [r[0] for r in resolutions], [r[1] for r in resolutions], [r[2] for r in resolutions],
        [r[3] for r in resolutions], [r[4] for r in resolutions])
    invariant(len(rows) == len(resolutions), "a hold resolved twice or was not pending")
    return [_row(Hold, r) for r in rows]


# ------------------------------------------------------------------------------ payments

_INSERT_COLUMNS = ("id", "payer_id", "from_account_id", "to_account_id", "currency", "amount_minor", "description",
                   "status", "hold_id", "failure_reason", "reserved_at", "failed_at", "failed_detail", "device_id",
                   "ip", "country")


async def insert_payment(conn: asyncpg.Connection, payment: Mapping[str, Any]) -> Payment:
    """Insert one payment row (the keys of _INSERT_COLUMNS; the history columns may be absent)."""
    (inserted,) = await insert_payments(conn, [payment])
    return inserted


async def get_payment(conn: asyncpg.Connection, payment_id: UUID, *, lock: bool = False) -> Payment | None:
    sql = "SELECT * FROM payments.payments WHERE id = $1" + (" FOR UPDATE" if lock else "")
    return _row(Payment, await conn.fetchrow(sql, payment_id))


async def update_payment_status(conn: asyncpg.Connection, payment_id: UUID, from_statuses: Sequence[str],
                                status: str, at: datetime, detail: str | None = None, *,
                                failure_reason: str | None = None, transaction_id: UUID | None = None,
                                captured_minor: int | None = None) -> Payment | None:
    """Move a payment along its saga when it is in one of `from_statuses`; None otherwise.
    The step is recorded at `at` (with `detail` if the status carries one)."""
    invariant(status in STEP_COLUMNS, f"no saga step {status!r}")
    detail_column = DETAIL_COLUMNS.get(status)
    invariant(detail is None or detail_column is not None, f"a {status} step carries no detail")
    # Column names come from the fixed maps above, never from input.
    detail_set = f", {detail_column} = $8" if detail_column else ""
    return _row(Payment, await conn.fetchrow(
        f"""UPDATE payments.payments
           SET status = $3, failure_reason = coalesce($4, failure_reason),
               transaction_id = coalesce($5, transaction_id), captured_minor = coalesce($6, captured_minor),
               {STEP_COLUMNS[status]} = $7{detail_set}, updated_at = now()
           WHERE id = $1 AND status = ANY($2::text[]) RETURNING *""",
        payment_id, list(from_statuses), status, failure_reason, transaction_id, captured_minor, at,
        *([detail[:STEP_DETAIL_MAX_CHARS] if detail else None] if detail_column else [])))


async def mark_payments_posted(conn: asyncpg.Connection, payment_ids: Sequence[UUID],
                               transaction_ids: Sequence[UUID], at: datetime) -> list[Payment]:
    """Payments captured in full by the given transactions, in one statement (capture_payments)."""
    if not payment_ids:
        return []
    rows = await conn.fetch(
        """UPDATE payments.payments AS p
           SET status = 'posted', transaction_id = u.transaction_id, captured_minor = p.amount_minor,
               posted_at = $3, updated_at = now()
           FROM unnest($1::uuid[], $2::uuid[]) AS u (id, transaction_id)
           WHERE p.id = u.id AND p.status IN ('funds_reserved', 'risk_assessed')
           RETURNING p.*""", list(payment_ids), list(transaction_ids), at)
    return [_row(Payment, r) for r in rows]


async def get_payments(conn: asyncpg.Connection, payment_ids: Iterable[UUID]) -> dict[UUID, Payment]:
    rows = await conn.fetch("SELECT * FROM payments.payments WHERE id = ANY($1::uuid[])", list(set(payment_ids)))
    return {r["id"]: _row(Payment, r) for r in rows}


# --------------------------------------------------------------------- saga batch writes

class PaymentHead(msgspec.Struct, frozen=True):
    """A payment without its step history: what a saga step decides on (cheap to read)."""

    id: UUID
    payer_id: UUID
    from_account_id: UUID
    to_account_id: UUID
    currency: str
    amount_minor: int
    description: str
    status: str
    hold_id: UUID | None
    failure_reason: str | None


_HEAD_COLUMNS = ", ".join(PaymentHead.__struct_fields__)


async def payment_heads(conn: asyncpg.Connection, payment_ids: Iterable[UUID], *,
                        lock: bool = False) -> dict[UUID, PaymentHead]:
    """Payments without their steps; with `lock`, locked in ascending id order (after their
    balances and holds, the global lock order)."""
    ids = sorted(set(payment_ids))
    invariant(len(ids) <= MAX_ROWS_PER_WRITE, "too many payments in one read")
    rows = await conn.fetch(f"SELECT {_HEAD_COLUMNS} FROM payments.payments WHERE id = ANY($1::uuid[]) ORDER BY id"
                            + (" FOR UPDATE" if lock else ""), ids)
    return {r["id"]: _row(PaymentHead, r) for r in rows}


async def lock_payments(conn: asyncpg.Connection, payment_ids: Iterable[UUID]) -> dict[UUID, PaymentHead]:
    """Lock payment rows in ascending id order (after their balances and holds)."""
    return await payment_heads(conn, payment_ids, lock=True)


async def insert_holds(conn: asyncpg.Connection, holds: Sequence[tuple[UUID, UUID, str, int, int, UUID | None]]) -> dict[UUID, Hold]:
    """Insert pending holds (id, account, currency, amount, ttl_s, reference) in one statement."""
    if not holds:
        return {}
    rows = await conn.fetch(
        """INSERT INTO payments.holds (id, account_id, currency, amount_minor, expires_at, reference_id)
           SELECT h.id, h.account_id, h.currency, h.amount_minor, now() + make_interval(secs => h.ttl_s), h.reference_id
           FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::bigint[], $5::float8[], $6::uuid[])
                AS h (id, account_id, currency, amount_minor, ttl_s, reference_id)
           RETURNING *""",
        [h[0] for h in holds], [h[1] for h in holds], [h[2] for h in holds], [h[3] for h in holds],
        [float(h[4]) for h in holds], [h[5] for h in holds])
    invariant(len(rows) == len(holds), "a hold was not inserted")
    return {r["id"]: _row(Hold, r) for r in rows}


async def insert_payments(conn: asyncpg.Connection, payments: Sequence[Mapping[str, Any]]) -> list[Payment]:
    """Insert payment rows (the keys of _INSERT_COLUMNS; history columns may be absent) in
    one statement."""
    if not payments:
        return []
    rows = await conn.fetch(
        """INSERT INTO payments.payments (id, payer_id, from_account_id, to_account_id, currency, amount_minor,
                                         description, status, hold_id, failure_reason, reserved_at, failed_at,
                                         failed_detail, device_id, ip, country)
           SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::uuid[], $5::text[], $6::bigint[], $7::text[],
                                $8::text[], $9::uuid[], $10::text[], $11::timestamptz[], $12::timestamptz[],
                                $13::text[], $14::text[], $15::text[], $16::text[])
           RETURNING *""",
        *([p.get(k, "" if k in ("device_id", "ip", "country") else None) for p in payments] for k in _INSERT_COLUMNS))
    invariant(len(rows) == len(payments), "a payment was not inserted")
    by_id = {r["id"]: _row(Payment, r) for r in rows}
    return [by_id[p["id"]] for p in payments]


class PaymentUpdate(msgspec.Struct, frozen=True, kw_only=True):
    """One saga transition for update_payments: applied only from `expect`.

    `steps` are the statuses the transition records, in order, ending with `status`
    (risk_assessed, posted and completed for a capture), all at `at`; `detail` goes to the
    first of them that carries one."""

    id: UUID
    expect: str
    status: str
    steps: tuple[str, ...]
    at: datetime
    detail: str | None = None
    hold_id: UUID | None = None
    transaction_id: UUID | None = None
    captured_minor: int | None = None
    failure_reason: str | None = None


_UPDATE_STEPS = tuple(STEP_COLUMNS.values())
_UPDATE_DETAILS = tuple(DETAIL_COLUMNS.values())
_UPDATE_PAYMENTS = f"""
UPDATE payments.payments AS p
SET status = u.status, hold_id = coalesce(u.hold_id, p.hold_id),
    transaction_id = coalesce(u.transaction_id, p.transaction_id),
    captured_minor = coalesce(u.captured_minor, p.captured_minor),
    failure_reason = coalesce(u.failure_reason, p.failure_reason), updated_at = now(),
    {", ".join(f"{c} = coalesce(u.{c}, p.{c})" for c in (*_UPDATE_STEPS, *_UPDATE_DETAILS))}
FROM unnest($1::uuid[], $2::text[], $3::text[], $4::uuid[], $5::uuid[], $6::bigint[], $7::text[],
            {", ".join(f"${8 + i}::timestamptz[]" for i in range(len(_UPDATE_STEPS)))},
            {", ".join(f"${8 + len(_UPDATE_STEPS) + i}::text[]" for i in range(len(_UPDATE_DETAILS)))})
     AS u (id, expect, status, hold_id, transaction_id, captured_minor, failure_reason,
           {", ".join((*_UPDATE_STEPS, *_UPDATE_DETAILS))})
WHERE p.id = u.id AND p.status = u.expect
RETURNING p.*
"""


async def update_payments(conn: asyncpg.Connection, updates: Sequence[PaymentUpdate]) -> list[Payment]:
    """Apply saga transitions to many payments in one statement; each only from its `expect`
    status (callers hold the row locks and checked it, so every update must apply). Each
    transition sets the history columns of its steps; no other step's column changes."""
    if not updates:
        return []
    step_at: dict[str, list[datetime | None]] = {s: [] for s in STEP_COLUMNS}
    details: dict[str, list[str | None]] = {s: [] for s in DETAIL_COLUMNS}
    for u in updates:
        invariant(bool(u.steps) and u.steps[-1] == u.status and set(u.steps) <= STEP_COLUMNS.keys(),
                  f"payment {u.id}: steps {u.steps} do not end at {u.status}")
        detailed = next((s for s in u.steps if s in DETAIL_COLUMNS), None)
        for s, column in step_at.items():
            column.append(u.at if s in u.steps else None)
        for s, column in details.items():
            column.append(u.detail[:STEP_DETAIL_MAX_CHARS] if u.detail and s == detailed else None)
    rows = await conn.fetch(
        _UPDATE_PAYMENTS,
        [u.id for u in updates], [u.expect for u in updates], [u.status for u in updates],
        [u.hold_id for u in updates], [u.transaction_id for u in updates], [u.captured_minor for u in updates],
        [u.failure_reason for u in updates], *step_at.values(), *details.values())
    invariant(len(rows) == len(updates), f"{len(updates) - len(rows)} payment(s) changed state under their lock")
    by_id = {r["id"]: _row(Payment, r) for r in rows}
    return [by_id[u.id] for u in updates]


async def open_payments_page(conn: asyncpg.Connection, after_id: UUID | None, limit: int) -> list[Payment]:
    """Payments not yet completed or failed, by id (keyset pages; no locks)."""
    rows = await conn.fetch(
        "SELECT * FROM payments.payments WHERE status NOT IN ('completed', 'failed') "
        "AND id > coalesce($1, '00000000-0000-0000-0000-000000000000'::uuid) ORDER BY id LIMIT $2", after_id, limit)
    return [_row(Payment, r) for r in rows]


async def balances_page(conn: asyncpg.Connection, after_id: UUID | None, limit: int) -> list[Balance]:
    """Balance rows by account id (keyset pages; no locks): the projection's source."""
    rows = await conn.fetch(
        f"SELECT {_BALANCE_COLUMNS} FROM payments.balances "
        "WHERE account_id > coalesce($1, '00000000-0000-0000-0000-000000000000'::uuid) "
        "ORDER BY account_id LIMIT $2", after_id, limit)
    return [_row(Balance, r) for r in rows]


async def insert_refund(conn: asyncpg.Connection, refund_id: UUID, payment_id: UUID, currency: str,
                        amount_minor: int, transaction_id: UUID, requested_by: UUID, reason: str) -> Refund:
    return _row(Refund, await conn.fetchrow(
        """INSERT INTO payments.refunds (id, payment_id, currency, amount_minor, transaction_id, requested_by, reason)
           VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING *""",
        refund_id, payment_id, currency, amount_minor, transaction_id, requested_by, reason))


async def get_refund(conn: asyncpg.Connection, refund_id: UUID) -> Refund | None:
    return _row(Refund, await conn.fetchrow("SELECT * FROM payments.refunds WHERE id = $1", refund_id))


async def refunds_of(conn: asyncpg.Connection, payment_id: UUID) -> list[Refund]:
    rows = await conn.fetch("SELECT * FROM payments.refunds WHERE payment_id = $1 ORDER BY created_at, id",
                            payment_id)
    return [_row(Refund, r) for r in rows]


# ------------------------------------------------------------------------------ deposits

async def insert_deposit(conn: asyncpg.Connection, deposit_id: UUID, account_id: UUID, owner_id: UUID,
                         currency: str, amount_minor: int, gateway: str) -> Deposit | None:
    return _row(Deposit, await conn.fetchrow(
        """INSERT INTO payments.deposits (id, account_id, owner_id, currency, amount_minor, gateway)
           VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (id) DO NOTHING RETURNING *""",
        deposit_id, account_id, owner_id, currency, amount_minor, gateway))


async def get_deposit(conn: asyncpg.Connection, deposit_id: UUID, *, lock: bool = False) -> Deposit | None:
    sql = "SELECT * FROM payments.deposits WHERE id = $1" + (" FOR UPDATE" if lock else "")
    return _row(Deposit, await conn.fetchrow(sql, deposit_id))


async def set_deposit_ref(conn: asyncpg.Connection, deposit_id: UUID, gateway_ref: str) -> None:
    await conn.execute("UPDATE payments.deposits SET gateway_ref = $2 WHERE id = $1 AND gateway_ref IS NULL",
                       deposit_id, gateway_ref)


async def resolve_deposit(conn: asyncpg.Connection, deposit_id: UUID, status: str, *, gateway_ref: str | None,
                          transaction_id: UUID | None, failure_reason: str | None) -> Deposit:
    record = await conn.fetchrow(
        """UPDATE payments.deposits SET status = $2, gateway_ref = coalesce(gateway_ref, $3),
               transaction_id = $4, failure_reason = $5, resolved_at = now()
           WHERE id = $1 AND status = 'pending' RETURNING *""",
        deposit_id, status, gateway_ref, transaction_id, failure_reason)
    invariant(record is not None, f"deposit {deposit_id} was not pending")
    return _row(Deposit, record)


# ------------------------------------------------------------------------------- payouts

async def insert_payout(conn: asyncpg.Connection, payout: Mapping[str, Any]) -> Payout:
    return _row(Payout, await conn.fetchrow(
        """INSERT INTO payments.payouts (id, account_id, owner_id, currency, amount_minor, fee_minor,
               destination, gateway, transaction_id)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING *""",
        payout["id"], payout["account_id"], payout["owner_id"], payout["currency"], payout["amount_minor"],
        payout["fee_minor"], payout["destination"], payout["gateway"], payout["transaction_id"]))


async def get_payout(conn: asyncpg.Connection, payout_id: UUID, *, lock: bool = False) -> Payout | None:
    sql = "SELECT * FROM payments.payouts WHERE id = $1" + (" FOR UPDATE" if lock else "")
    return _row(Payout, await conn.fetchrow(sql, payout_id))


async def set_payout_ref(conn: asyncpg.Connection, payout_id: UUID, gateway_ref: str) -> None:
    await conn.execute("UPDATE payments.payouts SET gateway_ref = $2 WHERE id = $1 AND gateway_ref IS NULL",
                       payout_id, gateway_ref)


async def resolve_payout(conn: asyncpg.Connection, payout_id: UUID, status: str, *, gateway_ref: str | None,
                         reversal_transaction_id: UUID | None, failure_reason: str | None) -> Payout:
    record = await conn.fetchrow(
        """UPDATE payments.payouts SET status = $2, gateway_ref = coalesce(gateway_ref, $3),
               reversal_transaction_id = $4, failure_reason = $5, resolved_at = now()
           WHERE id = $1 AND status = 'pending' RETURNING *""",
        payout_id, status, gateway_ref, reversal_transaction_id, failure_reason)
    invariant(record is not None, f"payout {payout_id} was not pending")
    return _row(Payout, record)


# -------------------------------------------------------------------------------- escrow

async def insert_escrow(conn: asyncpg.Connection, escrow: Mapping[str, Any]) -> Escrow:
    return _row(Escrow, await conn.fetchrow(
        """INSERT INTO payments.escrows (id, payer_id, payee_id, from_account_id, to_account_id, currency,
               amount_minor, commission_minor, release_condition, hold_transaction_id)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) RETURNING *""",
        escrow["id"], escrow["payer_id"], escrow["payee_id"], escrow["from_account_id"], escrow["to_account_id"],
        escrow["currency"], escrow["amount_minor"], escrow["commission_minor"], escrow["release_condition"],
        escrow["hold_transaction_id"]))


async def get_escrow(conn: asyncpg.Connection, escrow_id: UUID, *, lock: bool = False) -> Escrow | None:
    sql = "SELECT * FROM payments.escrows WHERE id = $1" + (" FOR UPDATE" if lock else "")
    return _row(Escrow, await conn.fetchrow(sql, escrow_id))


async def resolve_escrow(conn: asyncpg.Connection, escrow_id: UUID, status: str, transaction_id: UUID,
                         resolved_by: UUID) -> Escrow:
    record = await conn.fetchrow(
        """UPDATE payments.escrows SET status = $2, resolution_transaction_id = $3, resolved_by = $4,
               resolved_at = now()
           WHERE id = $1 AND status = 'held' RETURNING *""", escrow_id, status, transaction_id, resolved_by)
    invariant(record is not None, f"escrow {escrow_id} was not held")
    return _row(Escrow, record)


# ---------------------------------------------------------------------- reads and checks

async def statement_page(conn: asyncpg.Connection, account_id: UUID, before_seq: int | None,
                         limit: int) -> list[StatementEntry]:
    rows = await conn.fetch(
        """SELECT l.account_seq AS seq, l.transaction_id, t.kind, l.amount_minor, l.balance_after_minor,
                  t.reference_id, t.description, t.created_at
           FROM payments.legs l JOIN payments.transactions t ON t.id = l.transaction_id
           WHERE l.account_id = $1 AND l.account_seq < coalesce($2, 9223372036854775807)
           ORDER BY l.account_seq DESC LIMIT $3""", account_id, before_seq, limit)
    return [_row(StatementEntry, r) for r in rows]


async def trial_balance(conn: asyncpg.Connection) -> list[TrialBalanceLine]:
    # sum(bigint) is numeric in PostgreSQL (no overflow); asyncpg returns Decimal, made int here.
    rows = await conn.fetch(
        """SELECT currency,
                  coalesce(sum(-amount_minor) FILTER (WHERE amount_minor < 0), 0) AS debits_minor,
                  coalesce(sum(amount_minor) FILTER (WHERE amount_minor > 0), 0) AS credits_minor,
                  count(DISTINCT transaction_id) AS transactions
           FROM payments.legs GROUP BY currency ORDER BY currency""")
    return [TrialBalanceLine(r["currency"].strip(), int(r["debits_minor"]), int(r["credits_minor"]),
                             int(r["transactions"])) for r in rows]


# The projection as the journal says it should be, beside the projection as stored.
JOURNAL_VS_BALANCES = """
WITH journal AS (
    SELECT account_id, sum(amount_minor) AS posted, max(account_seq) AS last_seq, count(*) AS legs
    FROM payments.legs GROUP BY account_id
), last_leg AS (
    SELECT DISTINCT ON (account_id) account_id, balance_after_minor
    FROM payments.legs ORDER BY account_id, account_seq DESC
), pending AS (
    SELECT account_id, sum(amount_minor) AS reserved FROM payments.holds
    WHERE status = 'pending' GROUP BY account_id
)
SELECT a.id AS account_id, b.account_id IS NOT NULL AS has_balance,
       coalesce(b.posted_minor, 0) AS posted_minor, coalesce(j.posted, 0)::numeric AS journal_posted,
       coalesce(b.reserved_minor, 0) AS reserved_minor, coalesce(p.reserved, 0)::numeric AS journal_reserved,
       coalesce(b.last_seq, 0) AS last_seq, coalesce(j.last_seq, 0) AS journal_last_seq,
       coalesce(j.legs, 0) AS journal_legs, coalesce(l.balance_after_minor, 0) AS last_balance_after
FROM payments.accounts a
LEFT JOIN payments.balances b ON b.account_id = a.id
LEFT JOIN journal j ON j.account_id = a.id
LEFT JOIN last_leg l ON l.account_id = a.id
LEFT JOIN pending p ON p.account_id = a.id
"""
