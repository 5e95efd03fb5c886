"""Ledger operations on real PostgreSQL: each operation, its invariants and its bad inputs."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import timedelta

import asyncpg
import pytest

from db import payments as db
from db.payments import system_account_id
from services import payments
from services.payments import TransferRequest
from streams.payments import PAYMENTS, items_of
from tests.integration.test_payments_support import (
    assert_ledger_sound,
    available,
    deposit,
    funded_wallet,
)


@pytest.fixture
async def conn(pg_pool: asyncpg.Pool) -> AsyncIterator[asyncpg.Connection]:
    async with pg_pool.acquire() as connection:
        yield connection
        await assert_ledger_sound(connection)


# ------------------------------------------------------------------------------ wallets

async def test_open_wallet_once_per_currency(conn: asyncpg.Connection) -> None:
    owner = uuid.uuid4()
    inr = await payments.open_wallet(conn, owner, "INR")
    usd = await payments.open_wallet(conn, owner, "USD")
    assert inr.id != usd.id and inr.kind == "wallet" and not inr.allow_overdraft
    with pytest.raises(payments.WalletExists) as err:
        await payments.open_wallet(conn, owner, "INR")
    assert err.value.extra["wallet_id"] == str(inr.id)
    view = await payments.get_wallet(conn, inr.id, owner_id=owner)
    assert (view.balance.posted_minor, view.balance.reserved_minor, view.balance.available_minor) == (0, 0, 0)


async def test_open_wallet_rejects_unknown_currency(conn: asyncpg.Connection) -> None:
    with pytest.raises(payments.InvalidRequest):
        await payments.open_wallet(conn, uuid.uuid4(), "BTC")
    assert await conn.fetchval("SELECT count(*) FROM payments.accounts WHERE kind = 'wallet'") == 0


async def test_another_users_wallet_is_not_found(conn: asyncpg.Connection) -> None:
    wallet = await payments.open_wallet(conn, uuid.uuid4(), "INR")
    with pytest.raises(payments.NotFound):
        await payments.get_wallet(conn, wallet.id, owner_id=uuid.uuid4())
    with pytest.raises(payments.NotFound):
        await payments.get_wallet(conn, system_account_id("fees", "INR"), owner_id=None)


# ----------------------------------------------------------------------------- deposits

async def test_deposit_credits_wallet_from_gateway_clearing_once(conn: asyncpg.Connection) -> None:
    owner = uuid.uuid4()
    wallet = await payments.open_wallet(conn, owner, "INR")
    pending = await payments.begin_deposit(conn, deposit_id=uuid.uuid4(), owner_id=owner, wallet_id=wallet.id,
                                           amount_minor=12_345, currency="INR", gateway="test")
    assert pending.status == "pending" and await available(conn, wallet.id) == 0
    settled = await payments.settle_deposit(conn, pending.id, gateway_ref="ref-1")
    again = await payments.settle_deposit(conn, pending.id, gateway_ref="ref-1")
    assert settled.status == again.status == "succeeded" and settled.transaction_id == again.transaction_id
    assert await available(conn, wallet.id) == 12_345
    clearing = await conn.fetchval("SELECT posted_minor FROM payments.balances WHERE account_id = $1",
                                   system_account_id("gateway_clearing", "INR"))
    assert clearing == -12_345


@pytest.mark.parametrize(("amount", "currency", "error"), [
    (0, "INR", payments.InvalidRequest), (-5, "INR", payments.InvalidRequest),
    (10**15 + 1, "INR", payments.InvalidRequest), (100, "USD", payments.CurrencyMismatch),
    (100, "BTC", payments.InvalidRequest),
])
async def test_deposit_bad_input_writes_nothing(conn: asyncpg.Connection, amount: int, currency: str,
                                                error: type[Exception]) -> None:
    owner = uuid.uuid4()
    wallet = await payments.open_wallet(conn, owner, "INR")
    with pytest.raises(error):
        await payments.begin_deposit(conn, deposit_id=uuid.uuid4(), owner_id=owner, wallet_id=wallet.id,
                                     amount_minor=amount, currency=currency, gateway="test")
    assert await conn.fetchval("SELECT count(*) FROM payments.deposits") == 0


async def test_deposit_into_someone_elses_wallet_is_not_found(conn: asyncpg.Connection) -> None:
    wallet = await payments.open_wallet(conn, uuid.uuid4(), "INR")
    with pytest.raises(payments.NotFound):
        await payments.begin_deposit(conn, deposit_id=uuid.uuid4(), owner_id=uuid.uuid4(), wallet_id=wallet.id,
                                     amount_minor=100, currency="INR", gateway="test")
    with pytest.raises(payments.NotFound):
        await payments.begin_deposit(conn, deposit_id=uuid.uuid4(), owner_id=uuid.uuid4(), wallet_id=uuid.uuid4(),
                                     amount_minor=100, currency="INR", gateway="test")
    assert await conn.fetchval("SELECT count(*) FROM payments.deposits") == 0


async def test_failed_deposit_moves_nothing(conn: asyncpg.Connection) -> None:
    owner = uuid.uuid4()
    wallet = await payments.open_wallet(conn, owner, "INR")
    pending = await payments.begin_deposit(conn, deposit_id=uuid.uuid4(), owner_id=owner, wallet_id=wallet.id,
                                           amount_minor=500, currency="INR", gateway="test")
    failed = await payments.fail_deposit(conn, pending.id, reason="card_declined")
    assert failed.status == "failed" and failed.failure_reason == "card_declined"
    with pytest.raises(payments.InvalidState):
        await payments.settle_deposit(conn, pending.id, gateway_ref=None)
    assert await available(conn, wallet.id) == 0


# ---------------------------------------------------------------------------- transfers

async def test_transfer_moves_money_and_is_idempotent(conn: asyncpg.Connection) -> None:
    a = await funded_wallet(conn, 1_000)
    b = await funded_wallet(conn, 0)
    request = TransferRequest(id=uuid.uuid4(), from_account_id=a.id, to_account_id=b.id, amount_minor=300, currency="INR")
    assert (await payments.transfer(conn, request)).status == "posted"
    assert (await payments.transfer(conn, request)).status == "duplicate"
    assert (await available(conn, a.id), await available(conn, b.id)) == (700, 300)


@pytest.mark.parametrize("case", ["insufficient", "same", "currency", "unknown", "zero"])
async def test_transfer_rejections_write_nothing(conn: asyncpg.Connection, case: str) -> None:
    a = await funded_wallet(conn, 1_000)
    b = await funded_wallet(conn, 0)
    usd = await funded_wallet(conn, 0, "USD")
    to, amount, currency, error = {
        "insufficient": (b.id, 1_001, "INR", payments.InsufficientFunds),
        "same": (a.id, 10, "INR", payments.SameAccount),
        "currency": (usd.id, 10, "INR", payments.CurrencyMismatch),
        "unknown": (uuid.uuid4(), 10, "INR", payments.NotFound),
        "zero": (b.id, 0, "INR", payments.InvalidRequest),
    }[case]
    before = await conn.fetchval("SELECT count(*) FROM payments.transactions")
    with pytest.raises(error):
        await payments.transfer(conn, TransferRequest(id=uuid.uuid4(), from_account_id=a.id, to_account_id=to,
                                                      amount_minor=amount, currency=currency))
    assert await conn.fetchval("SELECT count(*) FROM payments.transactions") == before
    assert await available(conn, a.id) == 1_000


async def test_post_batch_applies_items_in_order(conn: asyncpg.Connection) -> None:
    a = await funded_wallet(conn, 100)
    b = await funded_wallet(conn, 0)
    c = await funded_wallet(conn, 0)
    first = uuid.uuid4()
    batch = [
        TransferRequest(id=first, from_account_id=a.id, to_account_id=b.id, amount_minor=60, currency="INR"),
        TransferRequest(id=uuid.uuid4(), from_account_id=a.id, to_account_id=c.id, amount_minor=60, currency="INR"),
        TransferRequest(id=uuid.uuid4(), from_account_id=b.id, to_account_id=c.id, amount_minor=50, currency="INR"),
        TransferRequest(id=first, from_account_id=a.id, to_account_id=b.id, amount_minor=60, currency="INR"),
        TransferRequest(id=uuid.uuid4(), from_account_id=a.id, to_account_id=a.id, amount_minor=1, currency="INR"),
    ]
    results = await payments.post_batch(conn, batch)
    assert [(r.status, r.reason) for r in results] == [
        ("posted", None), ("rejected", "insufficient_funds"), ("posted", None), ("duplicate", None),
        ("rejected", "same_account")]
    assert [await available(conn, w.id) for w in (a, b, c)] == [40, 10, 50]
    # The whole batch again: every item is a duplicate or rejected, nothing moves.
    again = await payments.post_batch(conn, batch)
    assert [r.status for r in again] == ["duplicate", "rejected", "duplicate", "duplicate", "rejected"]
    assert [await available(conn, w.id) for w in (a, b, c)] == [40, 10, 50]


# -------------------------------------------------------------------------------- holds

async def test_hold_reserve_then_partial_post_releases_the_rest(conn: asyncpg.Connection) -> None:
    a = await funded_wallet(conn, 1_000)
    b = await funded_wallet(conn, 0)
    hold = await payments.reserve(conn, hold_id=uuid.uuid4(), account_id=a.id, amount_minor=400, currency="INR")
    view = await payments.get_wallet(conn, a.id, owner_id=None)
    assert (view.balance.posted_minor, view.balance.reserved_minor, view.balance.available_minor) == (1_000, 400, 600)
    with pytest.raises(payments.InsufficientFunds):
        await payments.reserve(conn, hold_id=uuid.uuid4(), account_id=a.id, amount_minor=601, currency="INR")
    posted = await payments.post_hold(conn, hold.id, to_account_id=b.id, amount_minor=250)
    assert (posted.status, posted.posted_minor) == ("posted", 250)
    view = await payments.get_wallet(conn, a.id, owner_id=None)
    assert (view.balance.posted_minor, view.balance.reserved_minor) == (750, 0)
    assert await available(conn, b.id) == 250
    # Posting the same hold again is the same effect; voiding or re-posting differently is refused.
    assert (await payments.post_hold(conn, hold.id, to_account_id=b.id, amount_minor=250)).transaction_id == posted.transaction_id
    with pytest.raises(payments.InvalidState):
        await payments.void_hold(conn, hold.id)
    with pytest.raises(payments.InvalidState):
        await payments.post_hold(conn, hold.id, to_account_id=b.id, amount_minor=100, transaction_id=uuid.uuid4())


async def test_hold_cannot_post_more_than_reserved(conn: asyncpg.Connection) -> None:
    a = await funded_wallet(conn, 1_000)
    b = await funded_wallet(conn, 0)
    hold = await payments.reserve(conn, hold_id=uuid.uuid4(), account_id=a.id, amount_minor=100, currency="INR")
    with pytest.raises(payments.InvalidRequest):
        await payments.post_hold(conn, hold.id, to_account_id=b.id, amount_minor=101)
    assert (await payments.void_hold(conn, hold.id)).status == "voided"
    assert (await payments.void_hold(conn, hold.id)).status == "voided"
    assert await available(conn, a.id) == 1_000


async def test_expired_holds_release_and_cannot_post(conn: asyncpg.Connection) -> None:
    a = await funded_wallet(conn, 1_000)
    b = await funded_wallet(conn, 0)
    hold = await payments.reserve(conn, hold_id=uuid.uuid4(), account_id=a.id, amount_minor=300, currency="INR", ttl_s=60)
    assert await payments.expire_holds(conn) == []  # not due yet
    later = hold.expires_at + timedelta(seconds=1)
    expired = await payments.expire_holds(conn, as_of=later)
    assert [(h.id, h.status) for h in expired] == [(hold.id, "expired")]
    assert await payments.expire_holds(conn, as_of=later) == []
    assert await available(conn, a.id) == 1_000
    with pytest.raises(payments.InvalidState):
        await payments.post_hold(conn, hold.id, to_account_id=b.id)


async def test_hold_past_expiry_cannot_post_before_the_sweeper_runs(conn: asyncpg.Connection) -> None:
    a = await funded_wallet(conn, 1_000)
    b = await funded_wallet(conn, 0)
    hold = await payments.reserve(conn, hold_id=uuid.uuid4(), account_id=a.id, amount_minor=300, currency="INR", ttl_s=1)
    await conn.execute("SELECT pg_sleep(1.1)")
    with pytest.raises(payments.InvalidState, match="hold expired"):
        await payments.post_hold(conn, hold.id, to_account_id=b.id)
    assert len(await payments.expire_holds(conn)) == 1


# ----------------------------------------------------------------------------- payments

async def test_a_captured_payment_posts_and_completes_in_one_transaction(conn: asyncpg.Connection) -> None:
    payer, payee = await funded_wallet(conn, 1_000), await funded_wallet(conn, 0)
    assert payer.owner_id is not None
    ids = [uuid.uuid4(), uuid.uuid4()]
    await payments.initiate_payments(conn, [payments.PaymentRequest(
        payment_id=pid, payer_id=payer.owner_id, from_account_id=payer.id, to_account_id=payee.id,
        amount_minor=300, currency="INR") for pid in ids])
    last_row = await conn.fetchval("SELECT max(id) FROM payments.outbox")
    capture = [payments.RiskOutcome(payment_id=pid, expect="funds_reserved", action="capture", detail="model allow score 3")
               for pid in ids]
    settled = await payments.settle_risk(conn, capture)
    assert [(r.applied, r.status) for r in settled] == [(True, "completed")] * 2
    for pid in ids:
        # The journal transaction and the completed payment row were written by the same
        # PostgreSQL transaction.
        xmins = await conn.fetchrow(
            "SELECT p.xmin::text AS payment, t.xmin::text AS capture FROM payments.payments p "
            "JOIN payments.transactions t ON t.id = p.transaction_id WHERE p.id = $1", pid)
        assert xmins["payment"] == xmins["capture"]
        (p,) = (await db.get_payments(conn, [pid])).values()
        assert [(s["status"], s.get("detail")) for s in p.steps] == [
            ("initiated", None), ("funds_reserved", None), ("risk_assessed", "model allow score 3"), ("posted", None),
            ("completed", None)]
        assert p.posted_at == p.completed_at and p.captured_minor == 300
    # Every step still goes out, in saga order per payment, in the capture's one outbox row.
    rows = await conn.fetch("SELECT payload::text AS payload FROM payments.outbox "
                            "WHERE topic = 'payments.events' AND id > $1", last_row)
    assert len(rows) == 1
    sent = items_of(PAYMENTS.decode(rows[0]["payload"].encode()))
    for pid in ids:
        assert [e.status for e in sent if e.payment_id == pid] == ["risk_assessed", "posted", "completed"]
    # Nothing is left for the completion step, and a redelivered decision changes nothing.
    before = await conn.fetchval("SELECT max(id) FROM payments.outbox")
    assert await payments.complete_payments(conn, ids) == []
    assert [r.applied for r in await payments.settle_risk(conn, capture)] == [False, False]
    assert await conn.fetchval("SELECT max(id) FROM payments.outbox") == before
    assert (await available(conn, payer.id), await available(conn, payee.id)) == (400, 600)


async def test_complete_payments_closes_a_payment_left_posted(conn: asyncpg.Connection) -> None:
    payer, payee = await funded_wallet(conn, 1_000), await funded_wallet(conn, 0)
    assert payer.owner_id is not None
    pid = uuid.uuid4()
    await payments.initiate_payment(conn, payment_id=pid, payer_id=payer.owner_id, from_account_id=payer.id,
                                    to_account_id=payee.id, amount_minor=250, currency="INR")
    assert (await payments.capture_payment(conn, pid)).status == "posted"
    (done,) = await payments.complete_payments(conn, [pid, pid])
    assert done.status == "completed" and [s["status"] for s in done.steps][-2:] == ["posted", "completed"]
    assert await payments.complete_payments(conn, [pid]) == []


async def test_payment_saga_steps_and_full_capture(conn: asyncpg.Connection) -> None:
    payer = await funded_wallet(conn, 1_000)
    payee = await funded_wallet(conn, 0)
    pid = uuid.uuid4()
    assert payer.owner_id is not None
    payment = await payments.initiate_payment(conn, payment_id=pid, payer_id=payer.owner_id, from_account_id=payer.id,
                                              to_account_id=payee.id, amount_minor=700, currency="INR",
                                              description="course fee")
    assert payment.status == "funds_reserved" and await available(conn, payer.id) == 300
    again = await payments.initiate_payment(conn, payment_id=pid, payer_id=payer.owner_id, from_account_id=payer.id,
                                            to_account_id=payee.id, amount_minor=700, currency="INR")
    assert again.id == pid and await available(conn, payer.id) == 300
    await payments.advance_payment(conn, pid, "risk_assessed", detail="score 0.02")
    posted = await payments.capture_payment(conn, pid)
    assert (posted.status, posted.captured_minor) == ("posted", 700)
    assert (await payments.capture_payments(conn, [pid]))[0].status == "posted"
    completed = await payments.advance_payment(conn, pid, "completed")
    assert [s["status"] for s in completed.steps] == ["initiated", "funds_reserved", "risk_assessed", "posted", "completed"]
    assert (await available(conn, payer.id), await available(conn, payee.id)) == (300, 700)
    topics = await conn.fetch("SELECT payload::jsonb->>'type' AS type FROM payments.outbox WHERE topic = 'payments.events' ORDER BY id")
    assert [r["type"] for r in topics] == ["payment.initiated", "payment.funds_reserved", "payment.risk_assessed",
                                           "payment.posted", "payment.completed"]


async def test_payment_with_too_little_money_fails_without_reserving(conn: asyncpg.Connection) -> None:
    payer = await funded_wallet(conn, 100)
    payee = await funded_wallet(conn, 0)
    assert payer.owner_id is not None
    payment = await payments.initiate_payment(conn, payment_id=uuid.uuid4(), payer_id=payer.owner_id,
                                              from_account_id=payer.id, to_account_id=payee.id,
                                              amount_minor=101, currency="INR")
    assert (payment.status, payment.failure_reason, payment.hold_id) == ("failed", "insufficient_funds", None)
    assert await available(conn, payer.id) == 100


async def test_failing_a_payment_releases_its_reservation(conn: asyncpg.Connection) -> None:
    payer = await funded_wallet(conn, 1_000)
    payee = await funded_wallet(conn, 0)
    assert payer.owner_id is not None
    pid = uuid.uuid4()
    await payments.initiate_payment(conn, payment_id=pid, payer_id=payer.owner_id, from_account_id=payer.id,
                                    to_account_id=payee.id, amount_minor=400, currency="INR")
    await payments.advance_payment(conn, pid, "under_review")
    failed = await payments.fail_payment(conn, pid, "fraud_suspected")
    assert (failed.status, failed.failure_reason) == ("failed", "fraud_suspected")
    assert (await payments.fail_payment(conn, pid, "again")).failure_reason == "fraud_suspected"
    assert await available(conn, payer.id) == 1_000
    with pytest.raises(payments.InvalidState):
        await payments.capture_payment(conn, pid)


async def test_expired_payment_reservation_fails_the_payment(conn: asyncpg.Connection) -> None:
    payer = await funded_wallet(conn, 1_000)
    payee = await funded_wallet(conn, 0)
    assert payer.owner_id is not None
    pid = uuid.uuid4()
    payment = await payments.initiate_payment(conn, payment_id=pid, payer_id=payer.owner_id, from_account_id=payer.id,
                                              to_account_id=payee.id, amount_minor=400, currency="INR", hold_ttl_s=60)
    hold = await conn.fetchrow("SELECT expires_at FROM payments.holds WHERE id = $1", payment.hold_id)
    await payments.expire_holds(conn, as_of=hold["expires_at"] + timedelta(seconds=1))
    failed = await payments.get_payment(conn, pid)
    assert (failed.status, failed.failure_reason) == ("failed", "reservation_expired")
    assert await available(conn, payer.id) == 1_000


@pytest.mark.parametrize("case", ["same", "currency", "foreign_payer", "unknown_payee", "amount", "system_payee"])
async def test_initiate_payment_bad_input_writes_nothing(conn: asyncpg.Connection, case: str) -> None:
    payer = await funded_wallet(conn, 1_000)
    payee = await funded_wallet(conn, 0)
    usd = await funded_wallet(conn, 0, "USD")
    assert payer.owner_id is not None
    kwargs = {"payer_id": payer.owner_id, "from_account_id": payer.id, "to_account_id": payee.id,
              "amount_minor": 100, "currency": "INR"}
    changes, error = {
        "same": ({"to_account_id": payer.id}, payments.SameAccount),
        "currency": ({"to_account_id": usd.id}, payments.CurrencyMismatch),
        "foreign_payer": ({"payer_id": uuid.uuid4()}, payments.NotFound),
        "unknown_payee": ({"to_account_id": uuid.uuid4()}, payments.NotFound),
        "amount": ({"amount_minor": -1}, payments.InvalidRequest),
        "system_payee": ({"to_account_id": system_account_id("fees", "INR")}, payments.NotFound),
    }[case]
    with pytest.raises(error):
        await payments.initiate_payment(conn, payment_id=uuid.uuid4(), **{**kwargs, **changes})  # type: ignore[arg-type]
    assert await conn.fetchval("SELECT count(*) FROM payments.payments") == 0
    assert await conn.fetchval("SELECT count(*) FROM payments.holds") == 0


# ------------------------------------------------------------------------------ refunds

async def _captured_payment(conn: asyncpg.Connection, amount_minor: int) -> payments.Payment:  # type: ignore[name-defined]
    payer = await funded_wallet(conn, amount_minor)
    payee = await funded_wallet(conn, 0)
    assert payer.owner_id is not None
    pid = uuid.uuid4()
    await payments.initiate_payment(conn, payment_id=pid, payer_id=payer.owner_id, from_account_id=payer.id,
                                    to_account_id=payee.id, amount_minor=amount_minor, currency="INR")
    return await payments.capture_payment(conn, pid)


async def test_partial_then_full_refunds_never_exceed_captured(conn: asyncpg.Connection) -> None:
    payment = await _captured_payment(conn, 1_000)
    staff = uuid.uuid4()
    first_id = uuid.uuid4()
    first = await payments.refund_payment(conn, refund_id=first_id, payment_id=payment.id, requested_by=staff,
                                          amount_minor=300, reason="partial")
    assert (await payments.refund_payment(conn, refund_id=first_id, payment_id=payment.id, requested_by=staff,
                                          amount_minor=300)).transaction_id == first.transaction_id
    with pytest.raises(payments.RefundExceedsCaptured):
        await payments.refund_payment(conn, refund_id=uuid.uuid4(), payment_id=payment.id, requested_by=staff,
                                      amount_minor=701)
    rest = await payments.refund_payment(conn, refund_id=uuid.uuid4(), payment_id=payment.id, requested_by=staff)
    assert rest.amount_minor == 700
    with pytest.raises(payments.RefundExceedsCaptured):
        await payments.refund_payment(conn, refund_id=uuid.uuid4(), payment_id=payment.id, requested_by=staff,
                                      amount_minor=1)
    after = await payments.get_payment(conn, payment.id)
    assert (after.captured_minor, after.refunded_minor) == (1_000, 1_000)
    assert await available(conn, payment.from_account_id) == 1_000
    assert await available(conn, payment.to_account_id) == 0


async def test_refund_of_uncaptured_payment_is_refused(conn: asyncpg.Connection) -> None:
    payer = await funded_wallet(conn, 1_000)
    payee = await funded_wallet(conn, 0)
    assert payer.owner_id is not None
    pid = uuid.uuid4()
    await payments.initiate_payment(conn, payment_id=pid, payer_id=payer.owner_id, from_account_id=payer.id,
                                    to_account_id=payee.id, amount_minor=100, currency="INR")
    with pytest.raises(payments.InvalidState):
        await payments.refund_payment(conn, refund_id=uuid.uuid4(), payment_id=pid, requested_by=uuid.uuid4())
    with pytest.raises(payments.NotFound):
        await payments.refund_payment(conn, refund_id=uuid.uuid4(), payment_id=uuid.uuid4(), requested_by=uuid.uuid4())


async def test_refund_needs_the_payee_to_still_have_the_money(conn: asyncpg.Connection) -> None:
    payment = await _captured_payment(conn, 1_000)
    elsewhere = await funded_wallet(conn, 0)
    await payments.transfer(conn, TransferRequest(id=uuid.uuid4(), from_account_id=payment.to_account_id,
                                                  to_account_id=elsewhere.id, amount_minor=900, currency="INR"))
    with pytest.raises(payments.InsufficientFunds):
        await payments.refund_payment(conn, refund_id=uuid.uuid4(), payment_id=payment.id, requested_by=uuid.uuid4(),
                                      amount_minor=101)
    assert (await payments.get_payment(conn, payment.id)).refunded_minor == 0


async def test_database_caps_refunds_at_captured_whatever_the_code_path(conn: asyncpg.Connection) -> None:
    payment = await _captured_payment(conn, 1_000)
    await payments.refund_payment(conn, refund_id=uuid.uuid4(), payment_id=payment.id, requested_by=uuid.uuid4(),
                                  amount_minor=900)
    tx_id = payment.transaction_id  # any journal transaction not yet used by a refund
    with pytest.raises(asyncpg.CheckViolationError, match="payments_refunds_within_captured"):
        # A refund row that bypasses refund_payment: the trigger + CHECK still refuse it.
        await conn.execute("INSERT INTO payments.refunds (id, payment_id, currency, amount_minor, transaction_id, "
                           "requested_by) VALUES ($1, $2, 'INR', 101, $3, $4)",
                           uuid.uuid4(), payment.id, tx_id, uuid.uuid4())


# ------------------------------------------------------------------------------ payouts

async def test_payout_debits_wallet_with_fee_and_settles(conn: asyncpg.Connection) -> None:
    wallet = await funded_wallet(conn, 10_000)
    assert wallet.owner_id is not None
    payout = await payments.create_payout(conn, payout_id=uuid.uuid4(), owner_id=wallet.owner_id, wallet_id=wallet.id,
                                          amount_minor=5_000, currency="INR", destination="acct_123", gateway="test",
                                          fee_minor=25)
    assert payout.status == "pending" and await available(conn, wallet.id) == 4_975
    paid = await payments.settle_payout(conn, payout.id, gateway_ref="po_1")
    assert paid.status == "paid" and (await payments.settle_payout(conn, payout.id, gateway_ref="po_1")).status == "paid"
    fees = await conn.fetchval("SELECT posted_minor FROM payments.balances WHERE account_id = $1",
                               system_account_id("fees", "INR"))
    assert fees == 25
    with pytest.raises(payments.InvalidState):
        await payments.fail_payout(conn, payout.id, reason="late failure")


async def test_failed_payout_is_reversed_by_a_linked_correction(conn: asyncpg.Connection) -> None:
    wallet = await funded_wallet(conn, 10_000)
    assert wallet.owner_id is not None
    payout = await payments.create_payout(conn, payout_id=uuid.uuid4(), owner_id=wallet.owner_id, wallet_id=wallet.id,
                                          amount_minor=5_000, currency="INR", destination="acct_123", gateway="test",
                                          fee_minor=25)
    failed = await payments.fail_payout(conn, payout.id, reason="account closed")
    assert failed.status == "failed" and await available(conn, wallet.id) == 10_000
    link = await conn.fetchval("SELECT corrects_id FROM payments.transactions WHERE id = $1",
                               failed.reversal_transaction_id)
    assert link == payout.transaction_id
    assert (await payments.fail_payout(conn, payout.id, reason="again")).reversal_transaction_id == failed.reversal_transaction_id


async def test_payout_bad_input_writes_nothing(conn: asyncpg.Connection) -> None:
    wallet = await funded_wallet(conn, 1_000)
    assert wallet.owner_id is not None
    base = {"owner_id": wallet.owner_id, "wallet_id": wallet.id, "amount_minor": 100, "currency": "INR",
            "destination": "acct", "gateway": "test"}
    for changes, error in (({"amount_minor": 1_000, "fee_minor": 1}, payments.InsufficientFunds),
                           ({"currency": "USD"}, payments.CurrencyMismatch),
                           ({"owner_id": uuid.uuid4()}, payments.NotFound),
                           ({"destination": ""}, payments.InvalidRequest),
                           ({"fee_minor": -1}, payments.InvalidRequest)):
        with pytest.raises(error):
            await payments.create_payout(conn, payout_id=uuid.uuid4(), **{**base, **changes})  # type: ignore[arg-type]
    assert await conn.fetchval("SELECT count(*) FROM payments.payouts") == 0
    assert await available(conn, wallet.id) == 1_000


# ------------------------------------------------------------------------------- escrow

async def test_escrow_release_pays_payee_less_commission_once(conn: asyncpg.Connection) -> None:
    buyer = await funded_wallet(conn, 10_000)
    seller = await funded_wallet(conn, 0)
    assert buyer.owner_id is not None and seller.owner_id is not None
    escrow = await payments.hold_escrow(conn, escrow_id=uuid.uuid4(), payer_id=buyer.owner_id, from_account_id=buyer.id,
                                        to_account_id=seller.id, amount_minor=8_000, currency="INR",
                                        release_condition="deal closed", commission_minor=200)
    assert escrow.status == "held" and escrow.payee_id == seller.owner_id
    assert await available(conn, buyer.id) == 2_000
    released = await payments.release_escrow(conn, escrow.id, actor_id=buyer.owner_id)
    assert released.status == "released"
    assert (await payments.release_escrow(conn, escrow.id, actor_id=buyer.owner_id)).resolution_transaction_id \
        == released.resolution_transaction_id
    with pytest.raises(payments.InvalidState):
        await payments.refund_escrow(conn, escrow.id, actor_id=seller.owner_id)
    assert await available(conn, seller.id) == 7_800
    revenue = await conn.fetchval("SELECT posted_minor FROM payments.balances WHERE account_id = $1",
                                  system_account_id("platform_revenue", "INR"))
    escrow_balance = await conn.fetchval("SELECT posted_minor FROM payments.balances WHERE account_id = $1",
                                         system_account_id("escrow", "INR"))
    assert (revenue, escrow_balance) == (200, 0)


async def test_escrow_refund_returns_everything_to_the_payer(conn: asyncpg.Connection) -> None:
    buyer = await funded_wallet(conn, 10_000)
    seller = await funded_wallet(conn, 0)
    assert buyer.owner_id is not None and seller.owner_id is not None
    escrow = await payments.hold_escrow(conn, escrow_id=uuid.uuid4(), payer_id=buyer.owner_id, from_account_id=buyer.id,
                                        to_account_id=seller.id, amount_minor=8_000, currency="INR",
                                        release_condition="deal closed", commission_minor=200)
    refunded = await payments.refund_escrow(conn, escrow.id, actor_id=seller.owner_id)
    assert refunded.status == "refunded" and await available(conn, buyer.id) == 10_000
    with pytest.raises(payments.InvalidState):
        await payments.release_escrow(conn, escrow.id, actor_id=buyer.owner_id)


async def test_escrow_bad_input_writes_nothing(conn: asyncpg.Connection) -> None:
    buyer = await funded_wallet(conn, 1_000)
    seller = await funded_wallet(conn, 0)
    assert buyer.owner_id is not None
    base = {"payer_id": buyer.owner_id, "from_account_id": buyer.id, "to_account_id": seller.id,
            "amount_minor": 500, "currency": "INR", "release_condition": "x"}
    for changes, error in (({"amount_minor": 1_001}, payments.InsufficientFunds),
                           ({"to_account_id": buyer.id}, payments.SameAccount),
                           ({"commission_minor": 500}, payments.InvalidRequest),
                           ({"release_condition": ""}, payments.InvalidRequest),
                           ({"payer_id": uuid.uuid4()}, payments.NotFound)):
        with pytest.raises(error):
            await payments.hold_escrow(conn, escrow_id=uuid.uuid4(), **{**base, **changes})  # type: ignore[arg-type]
    assert await conn.fetchval("SELECT count(*) FROM payments.escrows") == 0


# -------------------------------------------------------------------- statement, audit

async def test_statement_pages_with_running_balance(conn: asyncpg.Connection) -> None:
    wallet = await funded_wallet(conn, 0)
    other = await funded_wallet(conn, 0)
    for amount in (100, 200, 300, 400, 500):
        await deposit(conn, wallet, amount)
    await payments.transfer(conn, TransferRequest(id=uuid.uuid4(), from_account_id=wallet.id, to_account_id=other.id,
                                                  amount_minor=250, currency="INR"))
    first = await payments.statement(conn, wallet.id, limit=4)
    assert [(e.seq, e.amount_minor, e.balance_after_minor, e.kind) for e in first.entries] == [
        (6, -250, 1_250, "transfer"), (5, 500, 1_500, "deposit"), (4, 400, 1_000, "deposit"), (3, 300, 600, "deposit")]
    assert first.next_cursor is not None
    second = await payments.statement(conn, wallet.id, cursor=first.next_cursor, limit=4)
    assert [(e.seq, e.balance_after_minor) for e in second.entries] == [(2, 300), (1, 100)]
    assert second.next_cursor is None
    with pytest.raises(payments.InvalidRequest):
        await payments.statement(conn, wallet.id, cursor="garbage!")
    with pytest.raises(payments.InvalidRequest):
        await payments.statement(conn, wallet.id, limit=1_000)


async def test_trial_balance_per_currency(conn: asyncpg.Connection) -> None:
    await funded_wallet(conn, 1_000, "INR")
    await funded_wallet(conn, 7, "JPY")
    lines = {line.currency: line for line in await payments.trial_balance(conn)}
    assert (lines["INR"].debits_minor, lines["INR"].credits_minor) == (1_000, 1_000)
    assert (lines["JPY"].debits_minor, lines["JPY"].credits_minor) == (7, 7)


async def test_correction_reverses_and_links_once(conn: asyncpg.Connection) -> None:
    a = await funded_wallet(conn, 1_000)
    b = await funded_wallet(conn, 0)
    tid = uuid.uuid4()
    await payments.transfer(conn, TransferRequest(id=tid, from_account_id=a.id, to_account_id=b.id, amount_minor=400,
                                                  currency="INR"))
    cid = await payments.correct_transaction(conn, correction_id=uuid.uuid4(), transaction_id=tid, description="sent in error")
    assert (await available(conn, a.id), await available(conn, b.id)) == (1_000, 0)
    assert await conn.fetchval("SELECT corrects_id FROM payments.transactions WHERE id = $1", cid) == tid
    with pytest.raises(payments.InvalidState):
        await payments.correct_transaction(conn, correction_id=uuid.uuid4(), transaction_id=tid, description="twice")


async def test_correction_that_would_overdraw_is_refused(conn: asyncpg.Connection) -> None:
    a = await funded_wallet(conn, 1_000)
    b = await funded_wallet(conn, 0)
    c = await funded_wallet(conn, 0)
    tid = uuid.uuid4()
    await payments.transfer(conn, TransferRequest(id=tid, from_account_id=a.id, to_account_id=b.id, amount_minor=400, currency="INR"))
    await payments.transfer(conn, TransferRequest(id=uuid.uuid4(), from_account_id=b.id, to_account_id=c.id, amount_minor=400, currency="INR"))
    with pytest.raises(payments.InsufficientFunds):
        await payments.correct_transaction(conn, correction_id=uuid.uuid4(), transaction_id=tid, description="too late")
