"""The payments ledger: wallets, holds, transfers, payments, refunds, deposits, payouts, escrow.

Each operation is one PostgreSQL transaction (a savepoint when the caller already has one)
on a connection the caller passes in. Every operation that moves money:
  * takes the id of its effect from the caller (a payment id, an idempotency-derived id, an
    event id) and is a no-op returning the first result when that id was already used:
    redelivery and client retries never double an effect;
  * locks in the global order (balances by ascending account id, then holds, then the
    entity row) so concurrent operations cannot deadlock;
  * validates input before taking locks, checks funds under the locks, and writes through
    db.payments.write_journal, which checks the projected balances before the write and
    compares them with what it reads back.
docs/PAYMENTS.md lists the invariants and where each one is enforced.
"""

from __future__ import annotations

import asyncio
import base64
import uuid
from collections import defaultdict, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, ClassVar, Final
from uuid import UUID

import asyncpg
import msgspec

from db import payments as db
from db.payments import (
    Account,
    Balance,
    Deposit,
    Entry,
    Escrow,
    Hold,
    Leg,
    OutboxMessage,
    Payment,
    Payout,
    Refund,
    StatementEntry,
    TrialBalanceLine,
    invariant,
    system_account_id,
)
from services import payments_events as events
from services.gateway import PaymentGateway, WebhookEvent
from services.money import CURRENCY_EXPONENTS, MAX_AMOUNT_MINOR

# Bounds (TigerBeetle style): every batch, page and timeout has a limit.
MAX_BATCH: Final = 8_192
DEFAULT_HOLD_TTL_S: Final = 15 * 60
MAX_HOLD_TTL_S: Final = 30 * 24 * 3600
EXPIRE_BATCH_MAX: Final = 5_000
STATEMENT_PAGE_MAX: Final = 200
STATEMENT_PAGE_DEFAULT: Final = 50
MAX_DESCRIPTION_CHARS: Final = 500
# Ids of effects derived from another id (a payment's hold, a refund's journal transaction).
_DERIVED_NAMESPACE: Final = UUID("2f1d4b8e-61c3-4c55-8f0e-3b7a9d2c6e10")


# ---------------------------------------------------------------------------------- errors

class PaymentsError(Exception):
    """A request the ledger refuses; `status` and `slug` become the API's problem+json."""

    status: ClassVar[int] = 422
    slug: ClassVar[str] = "invalid-payment-request"

    def __init__(self, detail: str, *, field: str | None = None, **extra: object) -> None:
        super().__init__(detail)
        self.detail = detail
        self.field = field
        self.extra = extra


class InvalidRequest(PaymentsError):
    pass


class CurrencyMismatch(PaymentsError):
    slug = "currency-mismatch"


class SameAccount(PaymentsError):
    slug = "same-account"


class NotFound(PaymentsError):
    status = 404
    slug = "not-found"


class InsufficientFunds(PaymentsError):
    status = 409
    slug = "insufficient-funds"


class InvalidState(PaymentsError):
    status = 409
    slug = "invalid-state"


class RefundExceedsCaptured(PaymentsError):
    slug = "refund-exceeds-captured"


class WalletExists(PaymentsError):
    status = 409
    slug = "wallet-exists"


class IdReused(PaymentsError):
    """An effect id came back with different parameters: a caller bug, never a retry."""

    status = 409
    slug = "id-reused"


_ERROR_BY_REASON: Final[dict[str, type[PaymentsError]]] = {
    "unknown_account": NotFound, "currency_mismatch": CurrencyMismatch, "same_account": SameAccount,
    "insufficient_funds": InsufficientFunds, "invalid_amount": InvalidRequest, "unknown_hold": NotFound,
    "hold_not_pending": InvalidState, "hold_expired": InvalidState, "hold_account_mismatch": InvalidRequest,
    "hold_amount_exceeded": InvalidRequest, "invalid_kind": InvalidRequest, "id_reused": IdReused,
}


def derived_id(parent: UUID, purpose: str) -> UUID:
    """The id of an effect that belongs to another (a payment's hold, its capture, ...)."""
    return UUID(bytes=events.uuid5_bytes(_DERIVED_NAMESPACE, f"{parent}:{purpose}"))


# ------------------------------------------------------------------------------ validation

def _check_amount(amount_minor: int, field: str = "amount_minor") -> int:
    if isinstance(amount_minor, bool) or not isinstance(amount_minor, int):
        raise InvalidRequest("amount must be an integer number of minor units", field=field)
    if not 0 < amount_minor <= MAX_AMOUNT_MINOR:
        raise InvalidRequest(f"amount must be between 1 and {MAX_AMOUNT_MINOR} minor units", field=field)
    return amount_minor


def _check_currency(currency: str) -> str:
    if currency not in CURRENCY_EXPONENTS:
        raise InvalidRequest(f"unsupported currency {str(currency)[:8]!r}", field="currency")
    return currency


def _check_text(text: str, field: str, max_chars: int = MAX_DESCRIPTION_CHARS) -> str:
    if len(text) > max_chars:
        raise InvalidRequest(f"{field} is longer than {max_chars} characters", field=field)
    return text


def _require_wallet(account: Account | None, *, owner_id: UUID | None, field: str) -> Account:
    """The account if it is a wallet (owned by owner_id when given); another's is 'not found'."""
    if account is None or account.kind != "wallet" or (owner_id is not None and account.owner_id != owner_id):
        raise NotFound("no such wallet", field=field)
    return account


# --------------------------------------------------------------------------------- wallets

@dataclass(frozen=True, slots=True)
class WalletView:
    account: Account
    balance: Balance


async def open_wallet(conn: asyncpg.Connection, owner_id: UUID, currency: str) -> Account:
    """A new wallet for owner_id in currency; WalletExists (with its id) if there is one."""
    _check_currency(currency)
    async with conn.transaction():
        account = await db.insert_wallet(conn, uuid.uuid4(), owner_id, currency)
        if account is None:
            existing = await db.find_wallet(conn, owner_id, currency)
            invariant(existing is not None, "wallet insert conflicted but no wallet exists")
            raise WalletExists(f"you already have a {currency} wallet", wallet_id=str(existing.id))
        # Its first balance (zero) goes out like every other, so the hot projection knows it.
        opened = await db.get_balance(conn, account.id)
        invariant(opened is not None and opened.posted_minor == opened.reserved_minor == 0, "new wallet not at zero")
        assert opened is not None
        await db.insert_outbox(conn, [events.ledger_balance(opened)])
    invariant(account.owner_id == owner_id and account.currency == currency, "wallet row mismatch")
    return account


async def get_wallet(conn: asyncpg.Connection, wallet_id: UUID, *, owner_id: UUID | None) -> WalletView:
    """The wallet and its balances; NotFound unless owner_id owns it (None: staff, any wallet)."""
    account = _require_wallet(await db.get_account(conn, wallet_id), owner_id=owner_id, field="wallet_id")
    balance = await db.get_balance(conn, wallet_id)
    invariant(balance is not None, f"wallet {wallet_id} has no balance row")
    invariant(balance.available_minor >= 0, f"wallet {wallet_id} has negative available balance")
    return WalletView(account, balance)


# ------------------------------------------------------------------------ batch transfers

class TransferRequest(msgspec.Struct, frozen=True, kw_only=True):
    """One two-leg journal transaction for post_batch; `id` is its idempotency key."""

    id: UUID
    from_account_id: UUID
    to_account_id: UUID
    amount_minor: int
    currency: str
    # Post (capture) this pending hold on from_account instead of spending available funds;
    # the whole reservation is released and amount_minor (<= reserved) moves.
    hold_id: UUID | None = None
    reference_id: UUID | None = None
    kind: str = "transfer"
    description: str = ""


class TransferResult(msgspec.Struct, frozen=True):
    id: UUID
    status: str  # posted | duplicate | rejected
    reason: str | None = None


_BATCH_KINDS: Final = frozenset({"transfer", "payment", "refund"})


def _shape_reason(r: TransferRequest) -> str | None:
    if isinstance(r.amount_minor, bool) or not isinstance(r.amount_minor, int) \
            or not 0 < r.amount_minor <= MAX_AMOUNT_MINOR:
        return "invalid_amount"
    if r.currency not in CURRENCY_EXPONENTS:
        return "currency_mismatch"
    if r.from_account_id == r.to_account_id:
        return "same_account"
    if r.kind not in _BATCH_KINDS or len(r.description) > MAX_DESCRIPTION_CHARS:
        return "invalid_kind"
    return None


class _Working:
    """Balances as a batch applies item after item, so each item sees the ones before it."""

    def __init__(self, locked: dict[UUID, Balance]) -> None:
        self.locked = locked
        self.posted = {a: b.posted_minor for a, b in locked.items()}
        self.reserved = {a: b.reserved_minor for a, b in locked.items()}

    def try_apply(self, posted_deltas: dict[UUID, int], reserved_deltas: dict[UUID, int]) -> bool:
        for a in posted_deltas.keys() | reserved_deltas.keys():
            if not self.locked[a].allow_overdraft and \
                    self.posted[a] + posted_deltas.get(a, 0) < self.reserved[a] + reserved_deltas.get(a, 0):
                return False
        for a, d in posted_deltas.items():
            self.posted[a] += d
        for a, d in reserved_deltas.items():
            self.reserved[a] += d
        return True


def _admit(r: TransferRequest, work: _Working, holds: dict[UUID, Hold], used_holds: set[UUID],
           db_now: datetime | None) -> str | None:
    """Why r cannot post on top of the items before it (None: it can, and it is applied)."""
    locked = work.locked
    if r.from_account_id not in locked or r.to_account_id not in locked:
        return "unknown_account"
    if locked[r.from_account_id].currency != r.currency or locked[r.to_account_id].currency != r.currency:
        return "currency_mismatch"
    reserved_deltas: dict[UUID, int] = {}
    if r.hold_id is not None:
        hold = holds.get(r.hold_id)
        if hold is None:
            return "unknown_hold"
        if hold.status != "pending" or r.hold_id in used_holds:
            return "hold_not_pending"
        if hold.account_id != r.from_account_id:
            return "hold_account_mismatch"
        assert db_now is not None
        if db_now >= hold.expires_at:
            return "hold_expired"
        if r.amount_minor > hold.amount_minor:
            return "hold_amount_exceeded"
        reserved_deltas[r.from_account_id] = -hold.amount_minor
    posted = {r.from_account_id: -r.amount_minor, r.to_account_id: r.amount_minor}
    if not work.try_apply(posted, reserved_deltas):
        return "insufficient_funds"
    if r.hold_id is not None:
        used_holds.add(r.hold_id)
    return None


async def post_batch(conn: asyncpg.Connection, requests: Sequence[TransferRequest],
                     extra_events: Sequence[OutboxMessage] = ()) -> list[TransferResult]:
    """Post many two-leg transfers in one transaction with a constant number of round trips.

    Items apply in order (each sees the balances the earlier ones left); an item that
    cannot post is `rejected` with a reason and writes nothing, one whose id is already in
    the journal is a `duplicate` and writes nothing, every other item is `posted`. The
    whole batch commits together: this is the unit the saga batches for throughput.
    """
    invariant(len(requests) <= MAX_BATCH, f"batch of {len(requests)} exceeds {MAX_BATCH}")
    results: list[TransferResult | None] = [None] * len(requests)
    candidates: list[int] = []
    for i, r in enumerate(requests):
        reason = _shape_reason(r)
        if reason is None:
            candidates.append(i)
        else:
            results[i] = TransferResult(r.id, "rejected", reason)
    async with conn.transaction():
        accepted, locked = await _admit_batch(conn, requests, candidates, results)
        await _write_batch(conn, locked, accepted, extra_events)
    final = [r for r in results if r is not None]
    invariant(len(final) == len(requests), "a batch item got no result")
    return final


@dataclass(frozen=True, slots=True)
class _Accepted:
    request: TransferRequest
    hold: Hold | None


async def _admit_batch(conn: asyncpg.Connection, requests: Sequence[TransferRequest], candidates: list[int],
                       results: list[TransferResult | None]) -> tuple[list[_Accepted], dict[UUID, Balance]]:
    wanted = [requests[i] for i in candidates]
    locked = await db.lock_balances(conn, {a for r in wanted for a in (r.from_account_id, r.to_account_id)})
    # Checked under the locks: a concurrent batch with the same id has committed or waits.
    existing = await db.existing_transaction_ids(conn, [r.id for r in wanted])
    hold_ids = {r.hold_id for r in wanted if r.hold_id is not None}
    holds, db_now = await db.lock_holds(conn, hold_ids) if hold_ids else ({}, None)
    work = _Working(locked)
    seen: set[UUID] = set()
    used_holds: set[UUID] = set()
    accepted: list[_Accepted] = []
    for i in candidates:
        r = requests[i]
        if r.id in existing or r.id in seen:
            results[i] = TransferResult(r.id, "duplicate")
            continue
        reason = _admit(r, work, holds, used_holds, db_now)
        if reason is not None:
            results[i] = TransferResult(r.id, "rejected", reason)
            continue
        seen.add(r.id)
        accepted.append(_Accepted(r, holds.get(r.hold_id) if r.hold_id else None))
        results[i] = TransferResult(r.id, "posted")
    return accepted, locked


async def _write_batch(conn: asyncpg.Connection, locked: dict[UUID, Balance], accepted: list[_Accepted],
                       extra_events: Sequence[OutboxMessage]) -> None:
    entries: list[Entry] = []
    reserved: dict[UUID, int] = defaultdict(int)
    resolutions: list[tuple[UUID, str, int | None, UUID | None, UUID | None]] = []
    outbox: list[OutboxMessage] = []
    for a in accepted:
        r = a.request
        entry = Entry(r.id, r.kind, r.currency, (Leg(r.from_account_id, -r.amount_minor), Leg(r.to_account_id, r.amount_minor)),
                      reference_id=r.reference_id, description=r.description)
        entries.append(entry)
        outbox.append(events.transaction_posted(entry))
        if a.hold is not None:
            reserved[r.from_account_id] -= a.hold.amount_minor
            resolutions.append((a.hold.id, "posted", r.amount_minor, r.to_account_id, r.id))
            outbox.append(events.hold_resolved(a.hold, "posted", r.amount_minor, r.id))
    if not entries and not extra_events:
        return
    await db.write_journal(conn, locked, entries, reserved, [*outbox, *extra_events])
    resolved = await db.resolve_holds(conn, resolutions)
    invariant(all(h.posted_minor is not None and h.posted_minor <= h.amount_minor for h in resolved),
              "a hold posted more than it reserved")


def _raise_rejection(result: TransferResult) -> None:
    if result.status == "rejected":
        assert result.reason is not None
        raise _ERROR_BY_REASON.get(result.reason, InvalidRequest)(result.reason.replace("_", " "))


async def transfer(conn: asyncpg.Connection, request: TransferRequest) -> TransferResult:
    """One immediate transfer between accounts; raises instead of returning `rejected`."""
    (result,) = await post_batch(conn, [request])
    _raise_rejection(result)
    return result


# ----------------------------------------------------------------------------------- holds

async def reserve(conn: asyncpg.Connection, *, hold_id: UUID, account_id: UUID, amount_minor: int, currency: str,
                  ttl_s: int = DEFAULT_HOLD_TTL_S, reference_id: UUID | None = None,
                  extra_events: Sequence[OutboxMessage] = ()) -> Hold:
    """Reserve funds: available drops by amount_minor until the hold is posted, voided or expires."""
    _check_amount(amount_minor)
    _check_currency(currency)
    if not 1 <= ttl_s <= MAX_HOLD_TTL_S:
        raise InvalidRequest(f"hold ttl must be between 1 and {MAX_HOLD_TTL_S} seconds", field="ttl_s")
    async with conn.transaction():
        locked = await db.lock_balances(conn, [account_id])
        if account_id not in locked:
            raise NotFound("no such account", field="account_id")
        existing = await db.get_hold(conn, hold_id)
        if existing is not None:
            if (existing.account_id, existing.amount_minor, existing.currency) != (account_id, amount_minor, currency):
                raise IdReused(f"hold {hold_id} exists with other parameters")
            return existing
        balance = locked[account_id]
        if balance.currency != currency:
            raise CurrencyMismatch(f"the account holds {balance.currency}, not {currency}", field="currency")
        if not balance.allow_overdraft and balance.available_minor < amount_minor:
            raise InsufficientFunds("available balance is lower than the amount")
        hold = await db.insert_hold(conn, hold_id, account_id, currency, amount_minor, ttl_s, reference_id)
        reserved_event = events.hold_reserved(hold_id, account_id, currency, amount_minor, reference_id, hold.expires_at)
        after = await db.write_journal(conn, locked, [], {account_id: amount_minor}, [reserved_event, *extra_events])
    invariant(after[account_id].reserved_minor == balance.reserved_minor + amount_minor, "reservation not recorded")
    return hold


async def post_hold(conn: asyncpg.Connection, hold_id: UUID, *, to_account_id: UUID, amount_minor: int | None = None,
                    transaction_id: UUID | None = None, kind: str = "transfer", reference_id: UUID | None = None,
                    description: str = "") -> Hold:
    """Capture a pending hold (all of it, or a part: the rest is released) into to_account_id."""
    hold = await db.get_hold(conn, hold_id)
    if hold is None:
        raise NotFound("no such hold", field="hold_id")
    amount = hold.amount_minor if amount_minor is None else _check_amount(amount_minor)
    request = TransferRequest(id=transaction_id or derived_id(hold_id, "post"), from_account_id=hold.account_id,
                              to_account_id=to_account_id, amount_minor=amount, currency=hold.currency,
                              hold_id=hold_id, reference_id=reference_id or hold.reference_id, kind=kind,
                              description=description)
    (result,) = await post_batch(conn, [request])
    if result.status == "duplicate":
        posted = await db.get_hold(conn, hold_id)
        assert posted is not None
        if posted.transaction_id != request.id:
            raise IdReused(f"transaction {request.id} exists and did not post hold {hold_id}")
        return posted
    _raise_rejection(result)
    posted = await db.get_hold(conn, hold_id)
    assert posted is not None
    invariant(posted.status == "posted" and posted.posted_minor == amount, f"hold {hold_id} not posted as asked")
    return posted


async def void_hold(conn: asyncpg.Connection, hold_id: UUID, *, extra_events: Sequence[OutboxMessage] = ()) -> Hold:
    """Release a pending hold without moving money. Voiding a voided hold returns it."""
    return await _release_hold(conn, hold_id, "voided", extra_events)


async def _release_hold(conn: asyncpg.Connection, hold_id: UUID, status: str,
                        extra_events: Sequence[OutboxMessage]) -> Hold:
    found = await db.get_hold(conn, hold_id)
    if found is None:
        raise NotFound("no such hold", field="hold_id")
    async with conn.transaction():
        locked = await db.lock_balances(conn, [found.account_id])
        holds, _ = await db.lock_holds(conn, [hold_id])
        hold = holds[hold_id]
        if hold.status == status:
            return hold
        if hold.status != "pending":
            raise InvalidState(f"the hold is already {hold.status}")
        await db.write_journal(conn, locked, [], {hold.account_id: -hold.amount_minor},
                               [events.hold_resolved(hold, status, None, None), *extra_events])
        (released,) = await db.resolve_holds(conn, [(hold_id, status, None, None, None)])
    invariant(released.status == status and released.posted_minor is None, "hold release not recorded")
    return released


async def expire_holds(conn: asyncpg.Connection, *, as_of: datetime | None = None,
                       limit: int = 1_000) -> list[Hold]:
    """Expire up to `limit` pending holds past their expiry (as of the database clock, or
    `as_of`), releasing their reservations and failing the payments they belonged to."""
    invariant(0 < limit <= EXPIRE_BATCH_MAX, "expire batch out of bounds")
    candidates = await db.expired_hold_ids(conn, as_of, limit)
    if not candidates:
        return []
    async with conn.transaction():
        locked = await db.lock_balances(conn, {account_id for _, account_id in candidates})
        holds, db_now = await db.lock_holds(conn, [hold_id for hold_id, _ in candidates])
        cutoff = as_of or db_now
        due = [h for h in holds.values() if h.status == "pending" and h.expires_at <= cutoff]
        if not due:
            return []
        reserved: dict[UUID, int] = defaultdict(int)
        for h in due:
            reserved[h.account_id] -= h.amount_minor
        await db.write_journal(conn, locked, [], reserved, [events.hold_resolved(h, "expired", None, None) for h in due])
        expired = await db.resolve_holds(conn, [(h.id, "expired", None, None, None) for h in due])
        await _fail_payments_of(conn, [h.reference_id for h in due if h.reference_id is not None], "reservation_expired")
    return expired


async def _fail_payments_of(conn: asyncpg.Connection, payment_ids: Sequence[UUID], reason: str) -> None:
    """Fail open payments whose reservation went away (no saga stays open without funds)."""
    for payment_id in sorted(payment_ids):
        payment = await db.update_payment_status(conn, payment_id, _OPEN_BEFORE_POSTING, "failed", _now(),
                                                 reason, failure_reason=reason)
        if payment is not None:
            await db.insert_outbox(conn, [events.payment_event(payment)])


# -------------------------------------------------------------------------------- payments

_OPEN_BEFORE_POSTING: Final = ("initiated", "funds_reserved", "risk_assessed", "under_review")
# Saga transitions other than posting and failing, which have their own functions.
_ADVANCE_FROM: Final[dict[str, tuple[str, ...]]] = {
    "risk_assessed": ("funds_reserved", "under_review"),
    "under_review": ("funds_reserved", "risk_assessed"),
    "completed": ("posted",),
}
PAYMENT_HOLD_TTL_S: Final = DEFAULT_HOLD_TTL_S


def _now() -> datetime:
    """When a saga step happens (its history column; db.payments.Payment.steps)."""
    return datetime.now(UTC)


class PaymentContext(msgspec.Struct, frozen=True):
    """What the client sent with a payment request, for the fraud step (kept on the
    payment row, so a saga re-driven from PostgreSQL still has it)."""

    device_id: str = ""
    ip: str = ""
    country: str = ""

    def check(self) -> PaymentContext:
        if len(self.device_id) > 100 or len(self.ip) > 64:
            raise InvalidRequest("device id (<= 100) or ip (<= 64 characters) too long", field="device_id")
        if self.country and not (len(self.country) == 2 and self.country.isascii() and self.country.isupper()):
            raise InvalidRequest("country must be an ISO 3166 alpha-2 code such as IN", field="country")
        return self


def _context_columns(context: PaymentContext | None) -> dict[str, str]:
    return msgspec.structs.asdict(context or PaymentContext())


async def initiate_payment(conn: asyncpg.Connection, *, payment_id: UUID, payer_id: UUID, from_account_id: UUID,
                           to_account_id: UUID, amount_minor: int, currency: str, description: str = "",
                           hold_ttl_s: int = PAYMENT_HOLD_TTL_S, context: PaymentContext | None = None) -> Payment:
    """Record a payment and reserve its funds in one transaction, with its saga events.

    Bad input (unknown wallets, another user's wallet, wrong currency, paying into the
    same wallet, bad amount) raises and writes nothing. Too little available money is not
    an input error: the payment is recorded as failed with reason `insufficient_funds`.
    The same payment_id again returns the first payment (IdReused if the fields differ).
    """
    await check_payment_request(conn, PaymentRequest(
        payment_id=payment_id, payer_id=payer_id, from_account_id=from_account_id, to_account_id=to_account_id,
        amount_minor=amount_minor, currency=currency, description=description,
        context=context or PaymentContext(), hold_ttl_s=hold_ttl_s))
    async with conn.transaction():
        locked = await db.lock_balances(conn, [from_account_id])
        existing = await db.get_payment(conn, payment_id)
        if existing is not None:
            _check_same_payment(existing, payer_id, from_account_id, to_account_id, amount_minor, currency)
            return existing
        fields = {"id": payment_id, "payer_id": payer_id, "from_account_id": from_account_id,
                  "to_account_id": to_account_id, "currency": currency, "amount_minor": amount_minor,
                  "description": description, **_context_columns(context)}
        if locked[from_account_id].available_minor < amount_minor:
            payment = await db.insert_payment(conn, {
                **fields, "status": "failed", "hold_id": None, "failure_reason": "insufficient_funds",
                "failed_at": _now(), "failed_detail": "insufficient_funds"})
            await db.insert_outbox(conn, [events.payment_event(payment, "initiated"),
                                                          events.payment_event(payment)])
            return payment
        hold_id = derived_id(payment_id, "hold")
        await reserve(conn, hold_id=hold_id, account_id=from_account_id, amount_minor=amount_minor,
                      currency=currency, ttl_s=hold_ttl_s, reference_id=payment_id)
        payment = await db.insert_payment(conn, {
            **fields, "status": "funds_reserved", "hold_id": hold_id, "failure_reason": None,
            "reserved_at": _now()})
        await db.insert_outbox(conn, [events.payment_event(payment, "initiated"),
                                                      events.payment_event(payment)])
    return payment


def _check_same_payment(p: Payment, payer_id: UUID, from_id: UUID, to_id: UUID, amount: int, currency: str) -> None:
    if (p.payer_id, p.from_account_id, p.to_account_id, p.amount_minor, p.currency) != (payer_id, from_id, to_id, amount, currency):
        raise IdReused(f"payment {p.id} exists with other parameters")


async def get_payment(conn: asyncpg.Connection, payment_id: UUID) -> Payment:
    payment = await db.get_payment(conn, payment_id)
    if payment is None:
        raise NotFound("no such payment", field="payment_id")
    return payment


async def advance_payment(conn: asyncpg.Connection, payment_id: UUID, status: str, *, detail: str | None = None) -> Payment:
    """Record a saga step that moves no money: risk_assessed, under_review or completed.

    Repeating the step the payment is already at returns it unchanged (redelivery).
    """
    if status not in _ADVANCE_FROM:
        raise InvalidRequest(f"cannot advance a payment to {status!r}", field="status")
    if detail and status not in db.DETAIL_COLUMNS:
        raise InvalidRequest(f"a {status} step carries no detail", field="detail")
    async with conn.transaction():
        payment = await db.update_payment_status(conn, payment_id, _ADVANCE_FROM[status], status, _now(),
                                                 detail or None)
        if payment is None:
            current = await get_payment(conn, payment_id)
            if current.status == status:
                return current
            raise InvalidState(f"payment is {current.status}; cannot move to {status}")
        await db.insert_outbox(conn, [events.payment_event(payment)])
    return payment


class CaptureResult(msgspec.Struct, frozen=True):
    payment_id: UUID
    status: str  # the payment's status afterwards
    reason: str | None = None


async def capture_payments(conn: asyncpg.Connection, payment_ids: Sequence[UUID]) -> list[CaptureResult]:
    """Post the holds of many payments to their payees in one transaction (the saga's batch).

    Payments already posted are reported as they are; payments not in a capturable state
    or whose hold cannot post (expired, say) are reported with a reason and left alone.
    """
    invariant(len(payment_ids) <= MAX_BATCH, "capture batch too large")
    payments = await db.get_payments(conn, payment_ids)
    requests: list[TransferRequest] = []
    for pid in dict.fromkeys(payment_ids):
        p = payments.get(pid)
        if p is not None and p.status in ("funds_reserved", "risk_assessed") and p.hold_id is not None:
            requests.append(TransferRequest(id=derived_id(pid, "capture"), from_account_id=p.from_account_id,
                                            to_account_id=p.to_account_id, amount_minor=p.amount_minor,
                                            currency=p.currency, hold_id=p.hold_id, reference_id=pid,
                                            kind="payment", description=p.description))
    async with conn.transaction():
        results = {r.reference_id: res for r, res in zip(requests, await post_batch(conn, requests), strict=True)}
        posted_ids = [pid for pid, res in results.items() if res.status == "posted"]
        updated = await _mark_posted(conn, [payments[pid] for pid in sorted(posted_ids)])
        invariant(len(updated) == len(posted_ids), "a captured payment changed state meanwhile")
    out: list[CaptureResult] = []
    for pid in payment_ids:
        p = updated.get(pid) or payments.get(pid)
        res = results.get(pid)
        if p is None:
            out.append(CaptureResult(pid, "unknown", "unknown_payment"))
        elif res is not None and res.status == "rejected":
            out.append(CaptureResult(pid, p.status, res.reason))
        elif p.status in ("posted", "completed"):
            out.append(CaptureResult(pid, p.status))
        else:
            out.append(CaptureResult(pid, p.status, "not_capturable"))
    return out


async def _mark_posted(conn: asyncpg.Connection, payments: list[Payment]) -> dict[UUID, Payment]:
    rows = await db.mark_payments_posted(conn, [p.id for p in payments],
                                         [derived_id(p.id, "capture") for p in payments], _now())
    await db.insert_outbox(conn, [events.payment_event(p) for p in rows])
    return {p.id: p for p in rows}


async def capture_payment(conn: asyncpg.Connection, payment_id: UUID) -> Payment:
    """Post one payment's hold to its payee; raises when it cannot."""
    (result,) = await capture_payments(conn, [payment_id])
    if result.reason == "unknown_payment":
        raise NotFound("no such payment", field="payment_id")
    if result.reason is not None:
        error = _ERROR_BY_REASON.get(result.reason, InvalidState)
        raise error(f"payment cannot be captured: {result.reason.replace('_', ' ')}")
    return await get_payment(conn, payment_id)


async def fail_payment(conn: asyncpg.Connection, payment_id: UUID, reason: str) -> Payment:
    """End a payment before posting: release its reservation and record why. Idempotent."""
    _check_text(reason, "reason", 200)
    payment = await get_payment(conn, payment_id)
    if payment.status == "failed":
        return payment
    if payment.status not in _OPEN_BEFORE_POSTING:
        raise InvalidState(f"payment is {payment.status}; it can no longer fail")
    async with conn.transaction():
        if payment.hold_id is not None:
            hold = await db.get_hold(conn, payment.hold_id)
            if hold is not None and hold.status == "pending":
                await void_hold(conn, payment.hold_id)
        failed = await db.update_payment_status(conn, payment_id, _OPEN_BEFORE_POSTING, "failed", _now(),
                                                reason, failure_reason=reason)
        if failed is None:
            raise InvalidState("payment changed state meanwhile; retry")
        await db.insert_outbox(conn, [events.payment_event(failed)])
    return failed


# ---------------------------------------------------------------------------- saga batches
# The saga's steps for many payments at once (agents/payments.py): one transaction and a
# constant number of round trips per batch, in the global lock order (balances, holds,
# payments), every step idempotent by payment id and applied only from the status it
# expects, so redelivered, reordered or late messages change nothing.

SAGA_BATCH_MAX: Final = 4_096
MAX_RISK_ROUNDS: Final = 3
# A payment under review keeps its money reserved this long for an analyst's decision;
# after that the hold expires and the payment fails (nothing stays reserved forever).
REVIEW_HOLD_TTL_S: Final = 3 * 24 * 3600


class PaymentRequest(msgspec.Struct, frozen=True, kw_only=True):
    """One payment to initiate; `payment_id` is its idempotency key."""

    payment_id: UUID
    payer_id: UUID
    from_account_id: UUID
    to_account_id: UUID
    amount_minor: int
    currency: str
    description: str = ""
    context: PaymentContext = PaymentContext()
    hold_ttl_s: int = PAYMENT_HOLD_TTL_S


class InitiateResult(msgspec.Struct, frozen=True):
    payment_id: UUID
    # funds_reserved | failed (recorded, e.g. insufficient funds) | rejected (bad input:
    # nothing written) | any status of a payment that already existed (new=False)
    status: str
    payment: Payment | None = None
    reason: str | None = None
    new: bool = False


def _request_reason(r: PaymentRequest, accounts: dict[UUID, Account]) -> str | None:
    """Why a request is bad input (nothing is written for it), or None."""
    if isinstance(r.amount_minor, bool) or not isinstance(r.amount_minor, int) \
            or not 0 < r.amount_minor <= MAX_AMOUNT_MINOR:
        return "invalid_amount"
    if r.currency not in CURRENCY_EXPONENTS:
        return "invalid_currency"
    if len(r.description) > MAX_DESCRIPTION_CHARS or not 1 <= r.hold_ttl_s <= MAX_HOLD_TTL_S:
        return "invalid_request"
    try:
        r.context.check()
    except InvalidRequest:
        return "invalid_context"
    if r.from_account_id == r.to_account_id:
        return "same_account"
    payer, payee = accounts.get(r.from_account_id), accounts.get(r.to_account_id)
    if payer is None or payer.kind != "wallet" or payer.owner_id != r.payer_id \
            or payee is None or payee.kind != "wallet":
        return "unknown_account"
    if payer.currency != r.currency or payee.currency != r.currency:
        return "currency_mismatch"
    return None


async def initiate_payments(conn: asyncpg.Connection, requests: Sequence[PaymentRequest]) -> list[InitiateResult]:
    """Record many payments and reserve their funds in one transaction (Kafka-in batches).

    Like initiate_payment per item: bad input is `rejected` and writes nothing, too little
    available money records the payment as failed (`insufficient_funds`), an id that
    exists returns that payment (a redelivered request; `rejected`/`id_reused` if its
    fields differ). Items reserve in order, each seeing the ones before it.
    """
    invariant(len(requests) <= SAGA_BATCH_MAX, f"initiate batch of {len(requests)} exceeds {SAGA_BATCH_MAX}")
    accounts = await db.get_accounts(conn, {a for r in requests for a in (r.from_account_id, r.to_account_id)})
    results: list[InitiateResult | None] = [None] * len(requests)
    candidates: list[int] = []
    for i, r in enumerate(requests):
        reason = _request_reason(r, accounts)
        if reason is None:
            candidates.append(i)
        else:
            results[i] = InitiateResult(r.payment_id, "rejected", reason=reason)
    if candidates:
        async with conn.transaction():
            await _initiate_locked(conn, requests, candidates, results)
    final = [r for r in results if r is not None]
    invariant(len(final) == len(requests), "an initiate item got no result")
    return final


async def _initiate_locked(conn: asyncpg.Connection, requests: Sequence[PaymentRequest], candidates: list[int],
                           results: list[InitiateResult | None]) -> None:
    locked = await db.lock_balances(conn, {requests[i].from_account_id for i in candidates})
    # Checked under the payers' locks: a concurrent batch with the same id has committed or waits.
    existing = await db.get_payments(conn, [requests[i].payment_id for i in candidates])
    work = _Working(locked)
    fresh: dict[UUID, tuple[int, bool]] = {}  # payment id -> (request index, reserved?)
    for i in candidates:
        r = requests[i]
        prior = existing.get(r.payment_id)
        if prior is not None:
            results[i] = InitiateResult(r.payment_id, prior.status, prior) if _same_request(r, prior) \
                else InitiateResult(r.payment_id, "rejected", reason="id_reused")
        elif r.payment_id in fresh:
            if _request_key(r) != _request_key(requests[fresh[r.payment_id][0]]):
                results[i] = InitiateResult(r.payment_id, "rejected", reason="id_reused")
        else:
            fresh[r.payment_id] = (i, work.try_apply({}, {r.from_account_id: r.amount_minor}))
    holds = await db.insert_holds(conn, [
        (derived_id(pid, "hold"), r.from_account_id, r.currency, r.amount_minor, r.hold_ttl_s, pid)
        for pid, (i, ok) in fresh.items() if ok for r in (requests[i],)])
    reserved: dict[UUID, int] = defaultdict(int)
    for h in holds.values():
        reserved[h.account_id] += h.amount_minor
    ledger = [events.hold_reserved(h.id, h.account_id, h.currency, h.amount_minor, h.reference_id, h.expires_at)
              for h in holds.values()]
    if ledger:
        await db.write_journal(conn, locked, [], reserved, events.ledger_envelopes(ledger))
    at = _now()
    rows = [_new_payment_row(requests[i], ok, at) for i, ok in fresh.values()]
    created = {p.id: p for p in await db.insert_payments(conn, rows)}
    await db.insert_outbox(conn, events.payment_envelopes(
        [m for p in created.values() for m in events.payment_events(p, ("initiated", p.status))]))
    for i in candidates:
        pid = requests[i].payment_id
        if results[i] is None:
            p = created[pid]
            results[i] = InitiateResult(pid, p.status, p, p.failure_reason, new=fresh[pid][0] == i)


async def check_payment_request(conn: asyncpg.Connection, r: PaymentRequest) -> None:
    """Raise the problem initiate_payment raises for bad input (unknown wallets, another
    user's wallet, wrong currency, paying into the same wallet, bad amount or context),
    without locking or writing anything."""
    _check_amount(r.amount_minor)
    _check_currency(r.currency)
    _check_text(r.description, "description")
    r.context.check()
    if not 1 <= r.hold_ttl_s <= MAX_HOLD_TTL_S:
        raise InvalidRequest(f"hold ttl must be between 1 and {MAX_HOLD_TTL_S} seconds", field="hold_ttl_s")
    if r.from_account_id == r.to_account_id:
        raise SameAccount("cannot pay into the wallet the money comes from", field="to_wallet")
    accounts = await db.get_accounts(conn, [r.from_account_id, r.to_account_id])
    payer = _require_wallet(accounts.get(r.from_account_id), owner_id=r.payer_id, field="from_wallet")
    payee = _require_wallet(accounts.get(r.to_account_id), owner_id=None, field="to_wallet")
    for account, field in ((payer, "from_wallet"), (payee, "to_wallet")):
        if account.currency != r.currency:
            raise CurrencyMismatch(f"{field} holds {account.currency}, not {r.currency}", field=field)


class Busy(PaymentsError):
    status = 503
    slug = "busy"


class PaymentIntake:
    """Group commit for payments requested one at a time (POST /payments).

    Each request would otherwise be its own transaction, and all of one hot wallet's
    requests would queue on its balance row lock, each holding it across several round
    trips. Here requests wait in a bounded in-process queue; one flush at a time takes
    everything queued (up to SAGA_BATCH_MAX) into one initiate_payments transaction, so a
    thousand concurrent payments cost a handful of transactions. No timer adds latency:
    a request arriving at an idle intake is flushed at once, and whatever arrives while a
    flush runs goes in the next. Past `max_pending` queued requests, Busy (503).
    """

    def __init__(self, pool: asyncpg.Pool, *, max_pending: int = 10_000) -> None:
        assert 0 < max_pending <= 100_000, "intake bound"
        self.pool = pool
        self.max_pending = max_pending
        self._queued: deque[tuple[PaymentRequest, asyncio.Future[InitiateResult]]] = deque()
        self._flusher: asyncio.Task[None] | None = None

    async def submit(self, request: PaymentRequest) -> InitiateResult:
        if len(self._queued) >= self.max_pending:
            raise Busy(f"{len(self._queued)} payment requests are waiting; retry shortly")
        future: asyncio.Future[InitiateResult] = asyncio.get_running_loop().create_future()
        self._queued.append((request, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        return await future

    async def _flush(self) -> None:
        while self._queued:
            batch = [self._queued.popleft() for _ in range(min(len(self._queued), SAGA_BATCH_MAX))]
            try:
                async with self.pool.acquire() as conn:
                    results = await initiate_payments(conn, [request for request, _ in batch])
            except Exception as exc:  # noqa: BLE001 - every waiting request gets the error (and may retry)
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)


def raise_rejection(result: InitiateResult) -> None:
    """The problem for a request initiate_payments refused (a race past the pre-check)."""
    if result.status == "rejected":
        assert result.reason is not None
        raise _ERROR_BY_REASON.get(result.reason, InvalidRequest)(result.reason.replace("_", " "))


def _request_key(r: PaymentRequest) -> tuple[UUID, UUID, UUID, int, str]:
    return r.payer_id, r.from_account_id, r.to_account_id, r.amount_minor, r.currency


def _same_request(r: PaymentRequest, p: Payment) -> bool:
    return _request_key(r) == (p.payer_id, p.from_account_id, p.to_account_id, p.amount_minor, p.currency)


def _new_payment_row(r: PaymentRequest, reserved: bool, at: datetime) -> dict[str, Any]:
    return {"id": r.payment_id, "payer_id": r.payer_id, "from_account_id": r.from_account_id,
            "to_account_id": r.to_account_id, "currency": r.currency, "amount_minor": r.amount_minor,
            "description": r.description, "status": "funds_reserved" if reserved else "failed",
            "hold_id": derived_id(r.payment_id, "hold") if reserved else None,
            "failure_reason": None if reserved else "insufficient_funds",
            "reserved_at": at if reserved else None, "failed_at": None if reserved else at,
            "failed_detail": None if reserved else "insufficient_funds", **_context_columns(r.context)}


class RiskOutcome(msgspec.Struct, frozen=True, kw_only=True):
    """What to do with a payment once its risk is known (or its budget ran out)."""

    payment_id: UUID
    # The status the outcome applies to: funds_reserved for a model decision or a timeout,
    # under_review for an analyst's decision. A payment in any other status is left alone.
    expect: str
    action: str  # capture | review | fail
    reason: str | None = None  # the failure reason, for action == "fail"
    detail: str = ""  # recorded on the step (score, source, policy)


class SettleResult(msgspec.Struct, frozen=True):
    payment_id: UUID
    applied: bool
    status: str  # the payment's status afterwards; "unknown" when there is no such payment
    reason: str | None = None


_RISK_ACTIONS: Final = frozenset({"capture", "review", "fail"})


@dataclass(slots=True)
class _SettlePlan:
    """What one settle_risk transaction writes, collected before a single write_journal."""

    entries: list[Entry]
    reserved: dict[UUID, int]
    resolutions: list[tuple[UUID, str, int | None, UUID | None, UUID | None]]
    new_holds: list[tuple[UUID, UUID, str, int, int, UUID | None]]
    ledger: list[events.LedgerOutbox]
    updates: list[db.PaymentUpdate]
    at: datetime  # when this transaction's steps happen (their history columns)
    captured: set[UUID]  # payments this transaction captures (and completes)


async def settle_risk(conn: asyncpg.Connection, outcomes: Sequence[RiskOutcome]) -> list[SettleResult]:
    """Apply risk outcomes to many payments, in order, one transaction per round.

    capture: risk_assessed, posted and completed at once (the hold moves to the payee and
    the saga ends in the same transaction; the three step events go out in that order); review: the
    payment waits under_review with its money still reserved (the hold is replaced by one
    that lasts REVIEW_HOLD_TTL_S); fail: the hold is voided and the payment fails with
    `reason`. An outcome for a payment that is not in its `expect` status (a late or
    repeated decision) is not applied. A hold that expired meanwhile fails the payment.

    Each round applies, per payment, the first outcome that fits its current status;
    outcomes after it for the same payment get another round (a model "review" and the
    analyst's decision can arrive in one batch). A payment moves at most MAX_RISK_ROUNDS
    times per call: funds_reserved -> under_review -> decided.
    """
    invariant(len(outcomes) <= SAGA_BATCH_MAX, "settle batch too large")
    for o in outcomes:
        if o.action not in _RISK_ACTIONS or (o.action == "fail") != (o.reason is not None):
            raise InvalidRequest(f"bad risk outcome {o.action!r} (reason {o.reason!r})", field="action")
    applied_at: dict[int, Payment] = {}
    pending = list(range(len(outcomes)))
    latest: dict[UUID, Payment | db.PaymentHead] = {}
    for _ in range(MAX_RISK_ROUNDS):
        if not pending:
            break
        latest.update(await db.payment_heads(conn, {outcomes[i].payment_id for i in pending}))
        chosen: dict[UUID, int] = {}
        for i in pending:
            o, p = outcomes[i], latest.get(outcomes[i].payment_id)
            if p is not None and p.status == o.expect and o.payment_id not in chosen:
                chosen[o.payment_id] = i
        if not chosen:
            break
        async with conn.transaction():
            moved = await _settle_locked(conn, [outcomes[i] for i in chosen.values()], latest)
        applied_at |= {i: moved[pid] for pid, i in chosen.items() if pid in moved}
        latest |= moved
        # Only what came after an applied outcome for the same payment can apply now.
        pending = [i for i in pending if i not in applied_at and outcomes[i].payment_id in moved
                   and i > chosen[outcomes[i].payment_id]]
    out: list[SettleResult] = []
    for i, o in enumerate(outcomes):
        p = applied_at.get(i) or latest.get(o.payment_id)
        if p is None:
            out.append(SettleResult(o.payment_id, False, "unknown", "unknown_payment"))
        else:
            out.append(SettleResult(o.payment_id, i in applied_at, p.status, p.failure_reason))
    return out


async def _settle_locked(conn: asyncpg.Connection, todo: list[RiskOutcome],
                         seen: Mapping[UUID, Payment | db.PaymentHead]) -> dict[UUID, Payment]:
    accounts = {a for o in todo for p in (seen[o.payment_id],)
                for a in ((p.from_account_id, p.to_account_id) if o.action == "capture" else (p.from_account_id,))}
    locked = await db.lock_balances(conn, accounts)
    holds, db_now = await db.lock_holds(conn, [seen[o.payment_id].hold_id for o in todo if seen[o.payment_id].hold_id])
    current = await db.lock_payments(conn, [o.payment_id for o in todo])
    plan = _SettlePlan([], defaultdict(int), [], [], [], [], _now(), set())
    work = _Working(locked)
    for o in todo:
        p = current[o.payment_id]
        if p.status != o.expect:
            continue  # moved on between the unlocked read and the locks
        hold = holds.get(p.hold_id) if p.hold_id else None
        invariant(hold is not None and hold.status == "pending",
                  f"payment {p.id} is {p.status} but its hold is {hold.status if hold else 'missing'}")
        assert hold is not None
        if o.action == "capture":
            _plan_capture(plan, p, o, hold, work, db_now)
        elif o.action == "review":
            _plan_review(plan, p, o, hold)
        else:
            _plan_fail(plan, p, hold, "voided", o.reason or "failed", o.detail)
    new_holds = await db.insert_holds(conn, plan.new_holds)
    plan.ledger += [events.hold_reserved(h.id, h.account_id, h.currency, h.amount_minor, h.reference_id, h.expires_at)
                    for h in new_holds.values()]
    if plan.entries or plan.ledger:
        await db.write_journal(conn, locked, plan.entries, plan.reserved, events.ledger_envelopes(plan.ledger))
    resolved = await db.resolve_holds(conn, plan.resolutions)
    invariant(all(h.posted_minor is None or h.posted_minor <= h.amount_minor for h in resolved),
              "a hold posted more than it reserved")
    updated = await db.update_payments(conn, plan.updates)
    messages: list[OutboxMessage] = []
    for p in updated:
        if p.id in plan.captured:
            # Every step is an event, in saga order: consumers and WebSocket clients see
            # posted before completed although one transaction recorded both.
            steps = ("posted", "completed") if seen[p.id].status == "risk_assessed" \
                else ("risk_assessed", "posted", "completed")
            messages += events.payment_events(p, steps)
        else:
            messages.append(events.payment_event(p))
    await db.insert_outbox(conn, events.payment_envelopes(messages))
    return {p.id: p for p in updated}


def _plan_capture(plan: _SettlePlan, p: db.PaymentHead, o: RiskOutcome, hold: Hold, work: _Working,
                  db_now: datetime) -> None:
    request = TransferRequest(id=derived_id(p.id, "capture"), from_account_id=p.from_account_id,
                              to_account_id=p.to_account_id, amount_minor=p.amount_minor, currency=p.currency,
                              hold_id=hold.id, reference_id=p.id, kind="payment", description=p.description)
    reason = _admit(request, work, {hold.id: hold}, set(), db_now)
    if reason == "hold_expired":
        # The reservation ran out before the decision: nothing may move; release and fail.
        _plan_fail(plan, p, hold, "expired", "reservation_expired")
        return
    invariant(reason is None, f"payment {p.id} could not post its own hold: {reason}")
    plan.entries.append(Entry(request.id, "payment", p.currency,
                              (Leg(p.from_account_id, -p.amount_minor), Leg(p.to_account_id, p.amount_minor)),
                              reference_id=p.id, description=p.description))
    plan.reserved[p.from_account_id] -= hold.amount_minor
    plan.resolutions.append((hold.id, "posted", p.amount_minor, p.to_account_id, request.id))
    plan.ledger += [events.transaction_posted(plan.entries[-1]),
                    events.hold_resolved(hold, "posted", p.amount_minor, request.id)]
    # Posted and completed together: nothing is left to do between them, so the saga ends
    # here rather than in another transaction after another Kafka hop.
    steps = ("posted", "completed") if p.status == "risk_assessed" else ("risk_assessed", "posted", "completed")
    plan.updates.append(db.PaymentUpdate(id=p.id, expect=p.status, status="completed", steps=steps, at=plan.at,
                                         detail=o.detail or None, transaction_id=request.id,
                                         captured_minor=p.amount_minor))
    plan.captured.add(p.id)


def _plan_review(plan: _SettlePlan, p: db.PaymentHead, o: RiskOutcome, hold: Hold) -> None:
    # Holds cannot be extended (a pending hold is immutable), so the reservation moves to
    # a longer hold in the same transaction: the money never becomes available meanwhile.
    review_hold = derived_id(p.id, "review-hold")
    plan.resolutions.append((hold.id, "voided", None, None, None))
    plan.ledger.append(events.hold_resolved(hold, "voided", None, None))
    plan.new_holds.append((review_hold, p.from_account_id, p.currency, p.amount_minor, REVIEW_HOLD_TTL_S, p.id))
    plan.reserved[p.from_account_id] += p.amount_minor - hold.amount_minor
    plan.updates.append(db.PaymentUpdate(id=p.id, expect=p.status, status="under_review",
                                         steps=("under_review",), at=plan.at, detail=o.detail or None,
                                         hold_id=review_hold))


def _plan_fail(plan: _SettlePlan, p: db.PaymentHead, hold: Hold, hold_status: str, reason: str, detail: str = "") -> None:
    plan.resolutions.append((hold.id, hold_status, None, None, None))
    plan.ledger.append(events.hold_resolved(hold, hold_status, None, None))
    plan.reserved[p.from_account_id] -= hold.amount_minor
    plan.updates.append(db.PaymentUpdate(id=p.id, expect=p.status, status="failed", steps=("failed",), at=plan.at,
                                         detail=f"{reason}: {detail}" if detail else reason, failure_reason=reason))


async def complete_payments(conn: asyncpg.Connection, payment_ids: Sequence[UUID]) -> list[Payment]:
    """Close the saga of posted payments (the last step); others are left alone.

    The saga's captures complete in their own transaction (settle_risk), so this only
    closes payments posted otherwise (capture_payments, or rows an older version left at
    `posted`): an unlocked read first, and no transaction when none is posted."""
    invariant(len(payment_ids) <= SAGA_BATCH_MAX, "complete batch too large")
    heads = await db.payment_heads(conn, payment_ids)
    posted = [pid for pid, p in heads.items() if p.status == "posted"]
    if not posted:
        return []
    async with conn.transaction():
        current = await db.lock_payments(conn, posted)
        at = _now()
        done = await db.update_payments(conn, [
            db.PaymentUpdate(id=p.id, expect="posted", status="completed", steps=("completed",), at=at)
            for p in current.values() if p.status == "posted"])
        await db.insert_outbox(conn, events.payment_envelopes([events.payment_event(p) for p in done]))
    return done


# --------------------------------------------------------------------------------- refunds

async def refund_payment(conn: asyncpg.Connection, *, refund_id: UUID, payment_id: UUID, requested_by: UUID,
                         amount_minor: int | None = None, reason: str = "") -> Refund:
    """Move money back from payee to payer for a captured payment, fully or in part.

    Σ refunds never exceeds the captured amount (checked here under the payment's lock,
    and by the payments_refunds_within_captured constraint). The same refund_id again
    returns the first refund.
    """
    _check_text(reason, "reason")
    payment = await get_payment(conn, payment_id)
    if payment.status not in ("posted", "completed"):
        raise InvalidState(f"payment is {payment.status}; only captured payments can be refunded")
    async with conn.transaction():
        locked = await db.lock_balances(conn, [payment.from_account_id, payment.to_account_id])
        payment = await db.get_payment(conn, payment_id, lock=True)
        assert payment is not None
        existing = await db.get_refund(conn, refund_id)
        if existing is not None:
            if existing.payment_id != payment_id or (amount_minor is not None and existing.amount_minor != amount_minor):
                raise IdReused(f"refund {refund_id} exists with other parameters")
            return existing
        remaining = payment.captured_minor - payment.refunded_minor
        amount = remaining if amount_minor is None else _check_amount(amount_minor)
        if remaining == 0:
            raise RefundExceedsCaptured("the payment is already fully refunded", field="amount_minor")
        if amount > remaining:
            raise RefundExceedsCaptured(f"at most {remaining} minor units can still be refunded", field="amount_minor")
        if locked[payment.to_account_id].available_minor < amount:
            raise InsufficientFunds("the payee's available balance is lower than the refund")
        entry = Entry(derived_id(refund_id, "refund"), "refund", payment.currency,
                      (Leg(payment.to_account_id, -amount), Leg(payment.from_account_id, amount)),
                      reference_id=payment_id, description=reason)
        await db.write_journal(conn, locked, [entry], {}, [events.transaction_posted(entry)])
        refund = await db.insert_refund(conn, refund_id, payment_id, payment.currency, amount, entry.id,
                                        requested_by, reason)
        after = await db.get_payment(conn, payment_id)
        assert after is not None
        invariant(after.refunded_minor == payment.refunded_minor + amount <= after.captured_minor,
                  "refund not accounted on its payment")
        await db.insert_outbox(conn, [events.payment_refunded(after, refund_id, amount)])
    return refund


# -------------------------------------------------------------------------------- deposits

async def begin_deposit(conn: asyncpg.Connection, *, deposit_id: UUID, owner_id: UUID, wallet_id: UUID,
                        amount_minor: int, currency: str, gateway: str) -> Deposit:
    """Record a pending deposit into the owner's wallet (the gateway charge comes next)."""
    _check_amount(amount_minor)
    _check_currency(currency)
    wallet = _require_wallet(await db.get_account(conn, wallet_id), owner_id=owner_id, field="wallet_id")
    if wallet.currency != currency:
        raise CurrencyMismatch(f"the wallet holds {wallet.currency}, not {currency}", field="currency")
    deposit = await db.insert_deposit(conn, deposit_id, wallet_id, owner_id, currency, amount_minor, gateway)
    if deposit is None:
        deposit = await db.get_deposit(conn, deposit_id)
        assert deposit is not None
        if (deposit.account_id, deposit.amount_minor, deposit.currency) != (wallet_id, amount_minor, currency):
            raise IdReused(f"deposit {deposit_id} exists with other parameters")
    return deposit


async def settle_deposit(conn: asyncpg.Connection, deposit_id: UUID, *, gateway_ref: str | None) -> Deposit:
    """Credit the wallet for a deposit the gateway confirmed: once, however often confirmed."""
    found = await db.get_deposit(conn, deposit_id)
    if found is None:
        raise NotFound("no such deposit", field="deposit_id")
    clearing = system_account_id("gateway_clearing", found.currency)
    async with conn.transaction():
        locked = await db.lock_balances(conn, [found.account_id, clearing])
        deposit = await db.get_deposit(conn, deposit_id, lock=True)
        assert deposit is not None
        if deposit.status == "succeeded":
            return deposit
        if deposit.status != "pending":
            raise InvalidState(f"the deposit is {deposit.status}")
        entry = Entry(derived_id(deposit_id, "deposit"), "deposit", deposit.currency,
                      (Leg(clearing, -deposit.amount_minor), Leg(deposit.account_id, deposit.amount_minor)),
                      reference_id=deposit_id)
        await db.write_journal(conn, locked, [entry], {}, [events.transaction_posted(entry)])
        settled = await db.resolve_deposit(conn, deposit_id, "succeeded", gateway_ref=gateway_ref,
                                           transaction_id=entry.id, failure_reason=None)
    return settled


async def fail_deposit(conn: asyncpg.Connection, deposit_id: UUID, *, reason: str, gateway_ref: str | None = None) -> Deposit:
    """Mark a pending deposit failed (declined at the gateway); no money moved."""
    async with conn.transaction():
        deposit = await db.get_deposit(conn, deposit_id, lock=True)
        if deposit is None:
            raise NotFound("no such deposit", field="deposit_id")
        if deposit.status != "pending":
            return deposit
        return await db.resolve_deposit(conn, deposit_id, "failed", gateway_ref=gateway_ref, transaction_id=None,
                                        failure_reason=reason[:200])


class DepositDeclined(PaymentsError):
    status = 402
    slug = "payment-declined"


async def deposit_via_gateway(pool: asyncpg.Pool, gateway: PaymentGateway, *, deposit_id: UUID, owner_id: UUID,
                              wallet_id: UUID, amount_minor: int, currency: str, payment_method: str) -> Deposit:
    """Charge through the gateway and credit the wallet when it succeeds.

    Three steps, none holding a database transaction across the network call: record the
    pending deposit, create the gateway intent (keyed by deposit_id, so a retry of this
    whole function reuses the same intent), then settle or fail. A gateway that answers
    "pending" settles later through its webhook (apply_gateway_event). Safe to call again
    with the same deposit_id after any crash.
    """
    if not 1 <= len(payment_method) <= 100:
        raise InvalidRequest("payment_method must be 1 to 100 characters", field="payment_method")
    async with pool.acquire() as conn:
        deposit = await begin_deposit(conn, deposit_id=deposit_id, owner_id=owner_id, wallet_id=wallet_id,
                                      amount_minor=amount_minor, currency=currency, gateway=gateway.name)
    if deposit.status == "pending":
        intent = await gateway.create_deposit_intent(intent_id=deposit_id, amount_minor=amount_minor,
                                                     currency=currency, payment_method=payment_method)
        async with pool.acquire() as conn:
            if intent.status == "succeeded":
                deposit = await settle_deposit(conn, deposit_id, gateway_ref=intent.gateway_ref)
            elif intent.status == "failed":
                deposit = await fail_deposit(conn, deposit_id, reason=intent.failure_reason or "declined",
                                             gateway_ref=intent.gateway_ref)
            else:
                await db.set_deposit_ref(conn, deposit_id, intent.gateway_ref)
                deposit = await db.get_deposit(conn, deposit_id) or deposit
    if deposit.status == "failed":
        raise DepositDeclined(f"the gateway declined the deposit: {deposit.failure_reason}", deposit_id=str(deposit_id))
    return deposit


async def payout_via_gateway(pool: asyncpg.Pool, gateway: PaymentGateway, *, payout_id: UUID, owner_id: UUID,
                             wallet_id: UUID, amount_minor: int, currency: str, destination: str,
                             fee_minor: int = 0) -> Payout:
    """Debit the wallet, ask the gateway to pay out, then settle or reverse (or wait for its webhook)."""
    async with pool.acquire() as conn:
        payout = await create_payout(conn, payout_id=payout_id, owner_id=owner_id, wallet_id=wallet_id,
                                     amount_minor=amount_minor, currency=currency, destination=destination,
                                     gateway=gateway.name, fee_minor=fee_minor)
    if payout.status != "pending":
        return payout
    result = await gateway.create_payout(payout_id=payout_id, amount_minor=amount_minor, currency=currency,
                                         destination=destination)
    async with pool.acquire() as conn:
        if result.status == "paid":
            return await settle_payout(conn, payout_id, gateway_ref=result.gateway_ref)
        if result.status == "failed":
            return await fail_payout(conn, payout_id, reason=result.failure_reason or "failed",
                                     gateway_ref=result.gateway_ref)
        await db.set_payout_ref(conn, payout_id, result.gateway_ref)
        found = await db.get_payout(conn, payout_id)
        assert found is not None
        return found


async def apply_gateway_event(conn: asyncpg.Connection, gateway_name: str, event: WebhookEvent) -> str:
    """Apply a verified webhook once: 'applied', 'duplicate' (event id seen) or 'ignored'.

    The event id is recorded in the same transaction as its effect, so a replayed or
    redelivered event can never apply twice.
    """
    async with conn.transaction():
        inserted = await conn.fetchval(
            "INSERT INTO payments.gateway_events (gateway, event_id, type, payload) VALUES ($1, $2, $3, $4::text::jsonb) "
            "ON CONFLICT DO NOTHING RETURNING true", gateway_name, event.id, event.type,
            msgspec.json.encode(event).decode())
        if not inserted:
            return "duplicate"
        if event.type == "ignored" or event.reference_id is None:
            return "ignored"
        ref = event.reference_id
        if event.type == "deposit.succeeded" and await db.get_deposit(conn, ref):
            await settle_deposit(conn, ref, gateway_ref=event.gateway_ref)
        elif event.type == "deposit.failed" and await db.get_deposit(conn, ref):
            await fail_deposit(conn, ref, reason=event.failure_reason or "declined", gateway_ref=event.gateway_ref)
        elif event.type == "payout.paid" and await db.get_payout(conn, ref):
            await settle_payout(conn, ref, gateway_ref=event.gateway_ref)
        elif event.type == "payout.failed" and await db.get_payout(conn, ref):
            await fail_payout(conn, ref, reason=event.failure_reason or "failed", gateway_ref=event.gateway_ref)
        else:
            return "ignored"
    return "applied"


# --------------------------------------------------------------------------------- payouts

async def create_payout(conn: asyncpg.Connection, *, payout_id: UUID, owner_id: UUID, wallet_id: UUID,
                        amount_minor: int, currency: str, destination: str, gateway: str,
                        fee_minor: int = 0) -> Payout:
    """Debit the wallet for a payout to an external account; the money waits in gateway
    clearing until the gateway pays it out (settle_payout) or fails (fail_payout reverses)."""
    _check_amount(amount_minor)
    _check_currency(currency)
    if not 1 <= len(destination) <= 100:
        raise InvalidRequest("destination must be 1 to 100 characters", field="destination")
    if isinstance(fee_minor, bool) or not isinstance(fee_minor, int) or not 0 <= fee_minor <= MAX_AMOUNT_MINOR:
        raise InvalidRequest("fee must be a non-negative integer", field="fee_minor")
    wallet = _require_wallet(await db.get_account(conn, wallet_id), owner_id=owner_id, field="wallet_id")
    if wallet.currency != currency:
        raise CurrencyMismatch(f"the wallet holds {wallet.currency}, not {currency}", field="currency")
    clearing, fees = system_account_id("gateway_clearing", currency), system_account_id("fees", currency)
    async with conn.transaction():
        locked = await db.lock_balances(conn, [wallet_id, clearing, fees])
        existing = await db.get_payout(conn, payout_id)
        if existing is not None:
            if (existing.account_id, existing.amount_minor, existing.currency) != (wallet_id, amount_minor, currency):
                raise IdReused(f"payout {payout_id} exists with other parameters")
            return existing
        if locked[wallet_id].available_minor < amount_minor + fee_minor:
            raise InsufficientFunds("available balance is lower than the payout and its fee")
        legs = [Leg(wallet_id, -(amount_minor + fee_minor)), Leg(clearing, amount_minor)]
        if fee_minor:
            legs.append(Leg(fees, fee_minor))
        entry = Entry(derived_id(payout_id, "payout"), "payout", currency, tuple(legs), reference_id=payout_id)
        await db.write_journal(conn, locked, [entry], {}, [events.transaction_posted(entry)])
        payout = await db.insert_payout(conn, {"id": payout_id, "account_id": wallet_id, "owner_id": owner_id,
                                               "currency": currency, "amount_minor": amount_minor,
                                               "fee_minor": fee_minor, "destination": destination,
                                               "gateway": gateway, "transaction_id": entry.id})
    return payout


async def settle_payout(conn: asyncpg.Connection, payout_id: UUID, *, gateway_ref: str | None) -> Payout:
    """The gateway paid the money out: the payout is final. Idempotent."""
    async with conn.transaction():
        payout = await db.get_payout(conn, payout_id, lock=True)
        if payout is None:
            raise NotFound("no such payout", field="payout_id")
        if payout.status == "paid":
            return payout
        if payout.status != "pending":
            raise InvalidState(f"the payout is {payout.status}")
        return await db.resolve_payout(conn, payout_id, "paid", gateway_ref=gateway_ref,
                                       reversal_transaction_id=None, failure_reason=None)


async def fail_payout(conn: asyncpg.Connection, payout_id: UUID, *, reason: str, gateway_ref: str | None = None) -> Payout:
    """The gateway could not pay out: reverse the debit with a linked correction. Idempotent."""
    found = await db.get_payout(conn, payout_id)
    if found is None:
        raise NotFound("no such payout", field="payout_id")
    original = await db.transaction_legs(conn, found.transaction_id)
    async with conn.transaction():
        locked = await db.lock_balances(conn, [account_id for account_id, _ in original])
        payout = await db.get_payout(conn, payout_id, lock=True)
        assert payout is not None
        if payout.status == "failed":
            return payout
        if payout.status != "pending":
            raise InvalidState(f"the payout is {payout.status}")
        reversal = _reversal(derived_id(payout_id, "reversal"), "payout_reversal", payout.currency, payout.transaction_id,
                             original, payout_id, f"payout failed: {reason}"[:MAX_DESCRIPTION_CHARS])
        await db.write_journal(conn, locked, [reversal], {}, [events.transaction_posted(reversal)])
        return await db.resolve_payout(conn, payout_id, "failed", gateway_ref=gateway_ref,
                                       reversal_transaction_id=reversal.id, failure_reason=reason[:200])


def _reversal(entry_id: UUID, kind: str, currency: str, original_id: UUID, original_legs: list[tuple[UUID, int]],
              reference_id: UUID | None, description: str) -> Entry:
    invariant(len(original_legs) >= 2 and sum(a for _, a in original_legs) == 0, "reversing an unbalanced transaction")
    return Entry(entry_id, kind, currency, tuple(Leg(account_id, -amount) for account_id, amount in original_legs),
                 reference_id=reference_id, corrects_id=original_id, description=description)


async def correct_transaction(conn: asyncpg.Connection, *, correction_id: UUID, transaction_id: UUID,
                              description: str) -> UUID:
    """Reverse a journal transaction with a new one linked to it (the journal never changes).

    Refused when it would overdraw an account (the money has moved on: correct that first).
    """
    _check_text(description, "description")
    original = await db.get_transaction(conn, transaction_id)
    if original is None:
        raise NotFound("no such transaction", field="transaction_id")
    legs = await db.transaction_legs(conn, transaction_id)
    currency = (await db.get_accounts(conn, [legs[0][0]]))[legs[0][0]].currency
    async with conn.transaction():
        locked = await db.lock_balances(conn, [a for a, _ in legs])
        if correction_id in await db.existing_transaction_ids(conn, [correction_id]):
            return correction_id
        if await conn.fetchval("SELECT 1 FROM payments.transactions WHERE corrects_id = $1", transaction_id):
            raise InvalidState("the transaction was already corrected")
        entry = _reversal(correction_id, "correction", currency, transaction_id, legs, original["reference_id"], description)
        work = _Working(locked)
        deltas: dict[UUID, int] = defaultdict(int)
        for leg in entry.legs:
            deltas[leg.account_id] += leg.amount_minor
        if not work.try_apply(dict(deltas), {}):
            raise InsufficientFunds("the correction would overdraw an account")
        try:
            await db.write_journal(conn, locked, [entry], {}, [events.transaction_posted(entry)])
        except asyncpg.UniqueViolationError as exc:
            raise InvalidState("the transaction was already corrected") from exc
    return correction_id


# ---------------------------------------------------------------------------------- escrow

async def hold_escrow(conn: asyncpg.Connection, *, escrow_id: UUID, payer_id: UUID, from_account_id: UUID,
                      to_account_id: UUID, amount_minor: int, currency: str, release_condition: str,
                      commission_minor: int = 0) -> Escrow:
    """Move the payer's money into escrow until it is released to the payee or refunded."""
    _check_amount(amount_minor)
    _check_currency(currency)
    if not 1 <= len(release_condition) <= MAX_DESCRIPTION_CHARS:
        raise InvalidRequest("release_condition must be 1 to 500 characters", field="release_condition")
    if isinstance(commission_minor, bool) or not isinstance(commission_minor, int) \
            or not 0 <= commission_minor < amount_minor:
        raise InvalidRequest("commission must be a non-negative integer below the amount", field="commission_minor")
    if from_account_id == to_account_id:
        raise SameAccount("payer and payee wallets must differ", field="to_wallet")
    accounts = await db.get_accounts(conn, [from_account_id, to_account_id])
    payer = _require_wallet(accounts.get(from_account_id), owner_id=payer_id, field="from_wallet")
    payee = _require_wallet(accounts.get(to_account_id), owner_id=None, field="to_wallet")
    for account, field in ((payer, "from_wallet"), (payee, "to_wallet")):
        if account.currency != currency:
            raise CurrencyMismatch(f"{field} holds {account.currency}, not {currency}", field=field)
    escrow_account = system_account_id("escrow", currency)
    async with conn.transaction():
        locked = await db.lock_balances(conn, [from_account_id, escrow_account])
        existing = await db.get_escrow(conn, escrow_id)
        if existing is not None:
            if (existing.from_account_id, existing.to_account_id, existing.amount_minor) != (from_account_id, to_account_id, amount_minor):
                raise IdReused(f"escrow {escrow_id} exists with other parameters")
            return existing
        if locked[from_account_id].available_minor < amount_minor:
            raise InsufficientFunds("available balance is lower than the amount")
        entry = Entry(derived_id(escrow_id, "hold"), "escrow_hold", currency,
                      (Leg(from_account_id, -amount_minor), Leg(escrow_account, amount_minor)), reference_id=escrow_id)
        await db.write_journal(conn, locked, [entry], {}, [events.transaction_posted(entry)])
        assert payee.owner_id is not None
        return await db.insert_escrow(conn, {
            "id": escrow_id, "payer_id": payer_id, "payee_id": payee.owner_id, "from_account_id": from_account_id,
            "to_account_id": to_account_id, "currency": currency, "amount_minor": amount_minor,
            "commission_minor": commission_minor, "release_condition": release_condition,
            "hold_transaction_id": entry.id})


async def get_escrow(conn: asyncpg.Connection, escrow_id: UUID) -> Escrow:
    escrow = await db.get_escrow(conn, escrow_id)
    if escrow is None:
        raise NotFound("no such escrow", field="escrow_id")
    return escrow


async def release_escrow(conn: asyncpg.Connection, escrow_id: UUID, *, actor_id: UUID) -> Escrow:
    """The condition is met: pay the payee, less the platform's commission. Exactly once."""
    return await _resolve_escrow(conn, escrow_id, "released", actor_id)


async def refund_escrow(conn: asyncpg.Connection, escrow_id: UUID, *, actor_id: UUID) -> Escrow:
    """The deal is off: return the whole amount to the payer. Exactly once."""
    return await _resolve_escrow(conn, escrow_id, "refunded", actor_id)


async def _resolve_escrow(conn: asyncpg.Connection, escrow_id: UUID, status: str, actor_id: UUID) -> Escrow:
    found = await get_escrow(conn, escrow_id)
    escrow_account = system_account_id("escrow", found.currency)
    revenue = system_account_id("platform_revenue", found.currency)
    async with conn.transaction():
        locked = await db.lock_balances(conn, [escrow_account, found.from_account_id, found.to_account_id, revenue])
        escrow = await db.get_escrow(conn, escrow_id, lock=True)
        assert escrow is not None
        if escrow.status == status:
            return escrow
        if escrow.status != "held":
            raise InvalidState(f"the escrow is already {escrow.status}")
        amount = escrow.amount_minor
        if status == "released":
            legs = [Leg(escrow_account, -amount), Leg(escrow.to_account_id, amount - escrow.commission_minor)]
            if escrow.commission_minor:
                legs.append(Leg(revenue, escrow.commission_minor))
            kind = "escrow_release"
        else:
            legs, kind = [Leg(escrow_account, -amount), Leg(escrow.from_account_id, amount)], "escrow_refund"
        entry = Entry(derived_id(escrow_id, status), kind, escrow.currency, tuple(legs), reference_id=escrow_id)
        await db.write_journal(conn, locked, [entry], {}, [events.transaction_posted(entry)])
        return await db.resolve_escrow(conn, escrow_id, status, entry.id, actor_id)


# ---------------------------------------------------------------------- statements, audit

class StatementPage(msgspec.Struct, frozen=True):
    entries: list[StatementEntry]
    next_cursor: str | None


def _encode_cursor(seq: int) -> str:
    return base64.urlsafe_b64encode(f"s{seq}".encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> int:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        seq = int(text[1:]) if text.startswith("s") and text[1:].isdigit() else -1
    except (ValueError, UnicodeDecodeError):
        seq = -1
    if seq <= 0 or len(cursor) > 40:
        raise InvalidRequest("malformed cursor", field="cursor")
    return seq


async def statement(conn: asyncpg.Connection, account_id: UUID, *, cursor: str | None = None,
                    limit: int = STATEMENT_PAGE_DEFAULT) -> StatementPage:
    """Every posted movement of an account, newest first, with the balance after each."""
    if not 1 <= limit <= STATEMENT_PAGE_MAX:
        raise InvalidRequest(f"limit must be between 1 and {STATEMENT_PAGE_MAX}", field="limit")
    before_seq = _decode_cursor(cursor) if cursor else None
    entries = await db.statement_page(conn, account_id, before_seq, limit)
    for newer, older in zip(entries, entries[1:]):
        # Running balance pair-check: each entry's balance is the one before plus its amount.
        invariant(newer.balance_after_minor == older.balance_after_minor + newer.amount_minor,
                  f"statement of {account_id} breaks its running balance at seq {newer.seq}")
    last = entries[-1].seq if entries else None
    return StatementPage(entries, _encode_cursor(last) if last is not None and last > 1 and len(entries) == limit else None)


async def trial_balance(conn: asyncpg.Connection) -> list[TrialBalanceLine]:
    """Σ debits and Σ credits per currency over the whole journal; each pair must be equal."""
    return await db.trial_balance(conn)


async def rebuild_balances(conn: asyncpg.Connection) -> int:
    """Recompute every balance row from the journal and pending holds; returns rows changed.

    Blocks ledger writers for its duration (SHARE ROW EXCLUSIVE), so the result is exact.
    """
    async with conn.transaction():
        await conn.execute("LOCK TABLE payments.balances IN SHARE ROW EXCLUSIVE MODE")
        status = await conn.execute(f"""
            WITH expected AS ({db.JOURNAL_VS_BALANCES})
            UPDATE payments.balances b
            SET posted_minor = e.journal_posted, reserved_minor = e.journal_reserved,
                last_seq = e.journal_last_seq,
                -- A balance's version only grows (consumers of balance events order by it).
                updated_at = greatest(now(), b.updated_at + interval '1 microsecond')
            FROM expected e
            WHERE b.account_id = e.account_id
              AND (b.posted_minor, b.reserved_minor, b.last_seq)
                  IS DISTINCT FROM (e.journal_posted, e.journal_reserved, e.journal_last_seq)""")
    return int(status.split()[-1])


class Difference(msgspec.Struct, frozen=True):
    """One disagreement between the projection and the journal (or a broken invariant)."""

    check: str
    subject: str
    expected: int  # what the journal says
    actual: int    # what the projection (or the checked row) says
    detail: str = ""


async def find_differences(conn: asyncpg.Connection) -> list[Difference]:
    """Compare the balance projection with the journal and re-check the ledger's invariants.

    Runs in one REPEATABLE READ snapshot so concurrent writes cannot create false alarms.
    """
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        diffs = await _balance_differences(conn)
        diffs += await _journal_differences(conn)
        diffs += await _payment_differences(conn)
    return diffs


async def _balance_differences(conn: asyncpg.Connection) -> list[Difference]:
    diffs: list[Difference] = []
    for r in await conn.fetch(db.JOURNAL_VS_BALANCES):
        subject = str(r["account_id"])
        if not r["has_balance"]:
            diffs.append(Difference("balance.missing", subject, 1, 0, "account has no balance row"))
            continue
        for check, expected, actual in (("balance.posted", r["journal_posted"], r["posted_minor"]),
                                        ("balance.reserved", r["journal_reserved"], r["reserved_minor"]),
                                        ("balance.last_seq", r["journal_last_seq"], r["last_seq"]),
                                        ("journal.seq_gap", r["journal_legs"], r["journal_last_seq"]),
                                        ("journal.running_balance", r["journal_posted"], r["last_balance_after"])):
            if int(expected) != int(actual):
                diffs.append(Difference(check, subject, int(expected), int(actual)))
    return diffs


async def _journal_differences(conn: asyncpg.Connection) -> list[Difference]:
    diffs = [Difference("trial_balance", line.currency, line.debits_minor, line.credits_minor,
                        "Σ debits != Σ credits") for line in await db.trial_balance(conn) if not line.balanced]
    for r in await conn.fetch("SELECT transaction_id, currency, sum(amount_minor) AS net FROM payments.legs "
                              "GROUP BY transaction_id, currency HAVING sum(amount_minor) <> 0"):
        diffs.append(Difference("transaction.unbalanced", str(r["transaction_id"]), 0, int(r["net"]), r["currency"]))
    for r in await conn.fetch("SELECT t.id FROM payments.transactions t WHERE NOT EXISTS "
                              "(SELECT 1 FROM payments.legs l WHERE l.transaction_id = t.id)"):
        diffs.append(Difference("transaction.no_legs", str(r["id"]), 2, 0))
    return diffs


async def _payment_differences(conn: asyncpg.Connection) -> list[Difference]:
    diffs: list[Difference] = []
    for r in await conn.fetch("""
            SELECT p.id, p.refunded_minor, p.captured_minor, coalesce(sum(f.amount_minor), 0) AS refunds
            FROM payments.payments p LEFT JOIN payments.refunds f ON f.payment_id = p.id
            GROUP BY p.id HAVING p.refunded_minor <> coalesce(sum(f.amount_minor), 0)
                              OR coalesce(sum(f.amount_minor), 0) > p.captured_minor"""):
        diffs.append(Difference("payment.refunds", str(r["id"]), int(r["refunds"]), int(r["refunded_minor"]),
                                f"captured {r['captured_minor']}"))
    for r in await conn.fetch("SELECT id, amount_minor, posted_minor FROM payments.holds "
                              "WHERE posted_minor > amount_minor"):
        diffs.append(Difference("hold.overposted", str(r["id"]), int(r["amount_minor"]), int(r["posted_minor"])))
    return diffs


async def reconcile(database_url: str) -> list[Difference]:
    """`fintide reconcile`: every difference between the projection and the journal (empty: none)."""
    conn = await asyncpg.connect(database_url)
    try:
        return await find_differences(conn)
    finally:
        await conn.close()
