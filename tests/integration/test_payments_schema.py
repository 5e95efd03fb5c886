"""The schema's own guarantees: append-only journal, resolve-once rows, balance CHECKs, and
reconcile catching a projection broken on purpose."""

from __future__ import annotations

import asyncio
import json
import shutil
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest

from db import payments as db
from db.migrate import MIGRATIONS_DIR, migrate
from db.payments import SYSTEM_ACCOUNT_KINDS, system_account_id
from services import payments
from services.money import CURRENCY_EXPONENTS
from services.payments import TransferRequest
from tests.integration.test_payments_support import (
    assert_ledger_sound,
    available,
    funded_wallet,
)


@pytest.fixture
async def conn(pg_pool: asyncpg.Pool) -> AsyncIterator[asyncpg.Connection]:
    async with pg_pool.acquire() as connection:
        yield connection


async def test_currencies_and_system_accounts_match_the_code(conn: asyncpg.Connection) -> None:
    rows = await conn.fetch("SELECT code, exponent FROM payments.currencies")
    assert {r["code"]: r["exponent"] for r in rows} == CURRENCY_EXPONENTS
    for currency in CURRENCY_EXPONENTS:
        for kind in SYSTEM_ACCOUNT_KINDS:
            row = await conn.fetchrow("SELECT kind, currency, allow_overdraft FROM payments.accounts WHERE id = $1",
                                      system_account_id(kind, currency))
            assert (row["kind"], row["currency"], row["allow_overdraft"]) == (kind, currency, kind == "gateway_clearing")


async def _one_transfer(conn: asyncpg.Connection) -> uuid.UUID:
    a = await funded_wallet(conn, 1_000)
    b = await funded_wallet(conn, 0)
    tid = uuid.uuid4()
    await payments.transfer(conn, TransferRequest(id=tid, from_account_id=a.id, to_account_id=b.id,
                                                  amount_minor=100, currency="INR"))
    return tid


@pytest.mark.parametrize("sql", [
    "UPDATE payments.legs SET amount_minor = amount_minor * 2 WHERE transaction_id = $1",
    "DELETE FROM payments.legs WHERE transaction_id = $1",
    "UPDATE payments.transactions SET description = 'edited' WHERE id = $1",
    "DELETE FROM payments.transactions WHERE id = $1",
])
async def test_journal_rejects_update_and_delete(conn: asyncpg.Connection, sql: str) -> None:
    tid = await _one_transfer(conn)
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
        await conn.execute(sql, tid)
    for table in ("legs", "transactions"):
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
            await conn.execute(f"TRUNCATE payments.{table} CASCADE")
    await assert_ledger_sound(conn)


async def test_journal_rejects_unbalanced_or_appended_legs(conn: asyncpg.Connection) -> None:
    a = await funded_wallet(conn, 1_000)
    tid = uuid.uuid4()
    async with conn.transaction():
        await conn.execute("INSERT INTO payments.transactions (id, kind) VALUES ($1, 'transfer')", tid)
        with pytest.raises(asyncpg.CheckViolationError, match="does not net to zero"):
            await conn.execute("INSERT INTO payments.legs (transaction_id, account_id, currency, amount_minor, "
                               "account_seq, balance_after_minor) VALUES ($1, $2, 'INR', 5, 99, 0)", tid, a.id)
    existing = await _one_transfer(conn)
    fees = system_account_id("fees", "INR")
    with pytest.raises(asyncpg.CheckViolationError, match="already has legs"):
        await conn.execute("INSERT INTO payments.legs (transaction_id, account_id, currency, amount_minor, account_seq, "
                           "balance_after_minor) VALUES ($1, $2, 'INR', 5, 1, 5), ($1, $3, 'INR', -5, 99, 0)",
                           existing, fees, a.id)
    with pytest.raises(asyncpg.ForeignKeyViolationError):  # a USD leg on an INR account
        await conn.execute("INSERT INTO payments.legs (transaction_id, account_id, currency, amount_minor, account_seq, "
                           "balance_after_minor) VALUES ($1, $2, 'USD', 5, 1, 5), ($1, $3, 'USD', -5, 99, 0)",
                           existing, fees, a.id)


async def test_statement_level_reference_checks_refuse_what_the_foreign_keys_refused(conn: asyncpg.Connection) -> None:
    """Migration 0003 replaced per-row foreign keys on legs, holds and payments with one
    check per statement: a row naming a missing account, currency, hold or transaction is
    still refused, and the rows references point at can no longer be deleted or re-keyed."""
    a, b = await funded_wallet(conn, 1_000), await funded_wallet(conn, 0)
    assert a.owner_id is not None
    missing = uuid.uuid4()
    with pytest.raises(asyncpg.ForeignKeyViolationError, match="names no transaction"):
        await conn.execute("INSERT INTO payments.legs (transaction_id, account_id, currency, amount_minor, account_seq, "
                           "balance_after_minor) VALUES ($1, $2, 'INR', 5, 90, 5), ($1, $3, 'INR', -5, 90, 0)",
                           missing, a.id, b.id)
    hold_sql = ("INSERT INTO payments.holds (id, account_id, currency, amount_minor, expires_at) "
                "VALUES ($1, $2, $3, 10, now() + interval '1 hour')")
    for account, currency in ((missing, "INR"), (a.id, "USD")):
        with pytest.raises(asyncpg.ForeignKeyViolationError, match="hold .* does not exist"):
            await conn.execute(hold_sql, uuid.uuid4(), account, currency)
    hold = await payments.reserve(conn, hold_id=uuid.uuid4(), account_id=a.id, amount_minor=100, currency="INR")
    with pytest.raises(asyncpg.ForeignKeyViolationError, match="hold .* does not exist"):
        await conn.execute("UPDATE payments.holds SET status = 'posted', posted_minor = 1, resolved_at = now(), "
                           "transaction_id = $2, destination_account_id = $3 WHERE id = $1", hold.id, missing, b.id)
    payment_sql = ("INSERT INTO payments.payments (id, payer_id, from_account_id, to_account_id, currency, amount_minor, "
                   "status, hold_id) VALUES ($1, $2, $3, $4, 'INR', 10, 'funds_reserved', $5)")
    for to_account, hold_id in ((missing, hold.id), (b.id, missing)):
        with pytest.raises(asyncpg.ForeignKeyViolationError, match="payment .* does not exist"):
            await conn.execute(payment_sql, uuid.uuid4(), a.owner_id, a.id, to_account, hold_id)
    pid = uuid.uuid4()
    await conn.execute(payment_sql, pid, a.owner_id, a.id, b.id, hold.id)
    with pytest.raises(asyncpg.ForeignKeyViolationError, match="payment .* does not exist"):
        await conn.execute("UPDATE payments.payments SET hold_id = $2 WHERE id = $1", pid, missing)
    for sql in ("DELETE FROM payments.accounts WHERE id = $1", "UPDATE payments.accounts SET currency = 'USD' WHERE id = $1"):
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="referenced by the ledger"):
            await conn.execute(sql, a.id)
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="referenced by the ledger"):
        await conn.execute("TRUNCATE payments.holds")  # no foreign key refuses it any more


async def test_non_overdraft_balance_cannot_go_below_zero_counting_holds(conn: asyncpg.Connection) -> None:
    a = await funded_wallet(conn, 1_000)
    with pytest.raises(asyncpg.CheckViolationError, match="balances_available_not_negative"):
        await conn.execute("UPDATE payments.balances SET reserved_minor = 1001 WHERE account_id = $1", a.id)
    with pytest.raises(asyncpg.CheckViolationError, match="balances_available_not_negative"):
        await conn.execute("UPDATE payments.balances SET posted_minor = -1, reserved_minor = 0 WHERE account_id = $1", a.id)
    # Gateway clearing may be negative: it mirrors money the gateway holds for us.
    clearing = system_account_id("gateway_clearing", "INR")
    assert await conn.fetchval("SELECT posted_minor FROM payments.balances WHERE account_id = $1", clearing) == -1_000


async def test_holds_resolve_exactly_once_in_the_database(conn: asyncpg.Connection) -> None:
    a = await funded_wallet(conn, 1_000)
    hold = await payments.reserve(conn, hold_id=uuid.uuid4(), account_id=a.id, amount_minor=100, currency="INR")
    with pytest.raises(asyncpg.CheckViolationError, match="may only fill in nothing"):
        await conn.execute("UPDATE payments.holds SET amount_minor = 50 WHERE id = $1", hold.id)
    await payments.void_hold(conn, hold.id)
    with pytest.raises(asyncpg.CheckViolationError, match="already voided"):
        await conn.execute("UPDATE payments.holds SET status = 'expired', resolved_at = now() WHERE id = $1", hold.id)
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="never deleted"):
        await conn.execute("DELETE FROM payments.holds WHERE id = $1", hold.id)
    other = await payments.reserve(conn, hold_id=uuid.uuid4(), account_id=a.id, amount_minor=100, currency="INR")
    tid = await _one_transfer(conn)
    with pytest.raises(asyncpg.CheckViolationError, match="holds_posted_within_reserved"):
        await conn.execute("UPDATE payments.holds SET status = 'posted', posted_minor = 101, resolved_at = now(), "
                           "transaction_id = $2, destination_account_id = $3 WHERE id = $1", other.id, tid,
                           system_account_id("fees", "INR"))


@pytest.mark.parametrize(("tamper", "check"), [
    ("UPDATE payments.balances SET posted_minor = posted_minor + 1 WHERE account_id = $1", "balance.posted"),
    ("UPDATE payments.balances SET reserved_minor = reserved_minor + 1 WHERE account_id = $1", "balance.reserved"),
    ("UPDATE payments.balances SET last_seq = last_seq + 1 WHERE account_id = $1", "balance.last_seq"),
])
async def test_reconcile_catches_a_tampered_projection_and_rebuild_repairs_it(
        conn: asyncpg.Connection, settings: object, tamper: str, check: str) -> None:
    a = await funded_wallet(conn, 1_000)
    assert await payments.reconcile(settings.database_url) == []  # type: ignore[attr-defined]
    await conn.execute(tamper, a.id)
    differences = await payments.reconcile(settings.database_url)  # type: ignore[attr-defined]
    assert [(d.check, d.subject) for d in differences] == [(check, str(a.id))]
    assert differences[0].expected != differences[0].actual
    assert await payments.rebuild_balances(conn) == 1
    assert await payments.reconcile(settings.database_url) == []  # type: ignore[attr-defined]
    assert await payments.rebuild_balances(conn) == 0
    assert await available(conn, a.id) == 1_000


async def test_reconcile_catches_a_journal_written_around_the_trigger(conn: asyncpg.Connection) -> None:
    a = await funded_wallet(conn, 1_000)
    # Simulate damage only a superuser could do (triggers disabled): an unbalanced leg.
    await conn.execute("SET session_replication_role = replica")
    tid = uuid.uuid4()
    await conn.execute("INSERT INTO payments.transactions (id, kind) VALUES ($1, 'transfer')", tid)
    await conn.execute("INSERT INTO payments.legs (transaction_id, account_id, currency, amount_minor, account_seq, "
                       "balance_after_minor) VALUES ($1, $2, 'INR', 7, 2, 1007)", tid, a.id)
    await conn.execute("SET session_replication_role = origin")
    checks = {d.check for d in await payments.find_differences(conn)}
    assert {"trial_balance", "transaction.unbalanced", "balance.posted", "balance.last_seq"} <= checks


async def test_reconcile_catches_refund_bookkeeping_drift(conn: asyncpg.Connection) -> None:
    payer = await funded_wallet(conn, 1_000)
    payee = await funded_wallet(conn, 0)
    assert payer.owner_id is not None
    pid = uuid.uuid4()
    await payments.initiate_payment(conn, payment_id=pid, payer_id=payer.owner_id, from_account_id=payer.id,
                                    to_account_id=payee.id, amount_minor=500, currency="INR")
    await payments.capture_payment(conn, pid)
    await conn.execute("UPDATE payments.payments SET refunded_minor = 10 WHERE id = $1", pid)
    assert [(d.check, d.expected, d.actual) for d in await payments.find_differences(conn)] == [("payment.refunds", 0, 10)]


async def test_outbox_rows_commit_with_their_journal_change(conn: asyncpg.Connection, pg_pool: asyncpg.Pool) -> None:
    from services import payments_events

    a = await funded_wallet(conn, 1_000)
    b = await funded_wallet(conn, 0)
    before = await conn.fetchval("SELECT count(*) FROM payments.outbox")
    with pytest.raises(RuntimeError):
        async with conn.transaction():
            await payments.transfer(conn, TransferRequest(id=uuid.uuid4(), from_account_id=a.id, to_account_id=b.id,
                                                          amount_minor=10, currency="INR"))
            raise RuntimeError("crash before commit")
    assert await conn.fetchval("SELECT count(*) FROM payments.outbox") == before
    tid = uuid.uuid4()
    await payments.transfer(conn, TransferRequest(id=tid, from_account_id=a.id, to_account_id=b.id, amount_minor=10,
                                                  currency="INR"))
    published: list[payments_events.OutboxRow] = []

    async def publish(rows: object) -> None:
        published.extend(rows)  # type: ignore[arg-type]

    while await payments_events.relay_outbox_once(pg_pool, publish, batch_size=2):
        pass
    assert len(published) == before + 1 and [r.id for r in published] == sorted(r.id for r in published)
    last = payments_events.decode_event(published[-1].payload)
    assert isinstance(last, payments_events.TransactionPosted) and last.transaction_id == tid
    assert published[-1].key == str(a.id) and published[-1].topic == payments_events.LEDGER_TOPIC
    assert await payments_events.unpublished_count(conn) == 0

    async def broker_down(rows: object) -> None:
        raise ConnectionError("broker down")

    await payments.transfer(conn, TransferRequest(id=uuid.uuid4(), from_account_id=a.id, to_account_id=b.id,
                                                  amount_minor=10, currency="INR"))
    with pytest.raises(ConnectionError):
        await payments_events.relay_outbox_once(pg_pool, broker_down)
    assert await payments_events.unpublished_count(conn) == 1  # nothing lost: it goes next time


# ------------------------------------------------------------------------ concurrency

async def test_a_thousand_concurrent_transfers_on_one_hot_wallet(pg_pool: asyncpg.Pool) -> None:
    async with pg_pool.acquire() as conn:
        hot = await funded_wallet(conn, 600 * 7)  # enough for 600 of the 1,000 transfers
        sinks = [await funded_wallet(conn, 0) for _ in range(10)]
        inbound = await funded_wallet(conn, 1_000)

    async def one(i: int) -> str:
        async with pg_pool.acquire() as conn:
            if i % 50 == 0:  # money also flows *into* the hot wallet meanwhile
                request = TransferRequest(id=uuid.uuid4(), from_account_id=inbound.id, to_account_id=hot.id,
                                          amount_minor=1, currency="INR")
            else:
                request = TransferRequest(id=uuid.uuid4(), from_account_id=hot.id, to_account_id=sinks[i % 10].id,
                                          amount_minor=7, currency="INR")
            try:
                return (await payments.transfer(conn, request)).status
            except payments.InsufficientFunds:
                return "insufficient"

    outcomes = await asyncio.gather(*(one(i) for i in range(1_000)))
    posted_out = sum(1 for i, o in enumerate(outcomes) if o == "posted" and i % 50 != 0)
    posted_in = sum(1 for i, o in enumerate(outcomes) if o == "posted" and i % 50 == 0)
    assert posted_in == 20
    assert 600 <= posted_out <= 602 and outcomes.count("insufficient") == 980 - posted_out
    async with pg_pool.acquire() as conn:
        assert await available(conn, hot.id) == 600 * 7 + posted_in - 7 * posted_out >= 0
        assert sum([await available(conn, s.id) for s in sinks]) == 7 * posted_out
        statement = await payments.statement(conn, hot.id, limit=200)
        assert statement.entries[0].balance_after_minor == await available(conn, hot.id)
        await assert_ledger_sound(conn)


async def test_migration_0002_moves_jsonb_step_histories_into_columns(database_url: str, tmp_path: Path) -> None:
    """A database at payments/0001 with payments whose history is the old `steps` jsonb:
    after 0002 the API's history (Payment.steps) is the same steps, times and details."""
    fresh = f"m0002_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(database_url.rsplit("/", 1)[0] + "/postgres")
    await admin.execute(f'CREATE DATABASE "{fresh}"')
    url = database_url.rsplit("/", 1)[0] + f"/{fresh}"
    try:
        old_root = tmp_path / "migrations"
        for service, version in (("foundation", "0001_schemas"), ("payments", "0001_ledger")):
            (old_root / service).mkdir(parents=True, exist_ok=True)
            shutil.copy(MIGRATIONS_DIR / service / f"{version}.sql", old_root / service)
        assert await migrate(url, old_root, services={"payments"}) == ["foundation/0001_schemas", "payments/0001_ledger"]
        conn = await asyncpg.connect(url)
        try:
            # Raw rows: today's code writes the schema of the latest migration, not 0001's.
            payer, payee = [await db.insert_wallet(conn, uuid.uuid4(), uuid.uuid4(), "INR") for _ in range(2)]
            assert payer is not None and payee is not None
            capture = uuid.uuid4()
            await conn.execute("INSERT INTO payments.transactions (id, kind) VALUES ($1, 'payment')", capture)
            t0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)

            def at(s: int) -> str:
                return (t0 + timedelta(seconds=s)).isoformat()

            histories = {
                "completed": [{"status": "initiated", "at": at(0), "device_id": "dev-1", "country": "IN"},
                              {"status": "funds_reserved", "at": at(0)},
                              {"status": "under_review", "at": at(1), "detail": "model review score 61"},
                              {"status": "risk_assessed", "at": at(9), "detail": "review allow score 61"},
                              {"status": "posted", "at": at(9)}, {"status": "completed", "at": at(10)}],
                "failed": [{"status": "initiated", "at": at(0), "ip": "10.0.0.1"},
                           {"status": "failed", "at": at(0), "detail": "insufficient_funds"}],
            }
            ids = {status: uuid.uuid4() for status in histories}
            for status, steps in histories.items():
                done = status == "completed"
                await conn.execute(
                    "INSERT INTO payments.payments (id, payer_id, from_account_id, to_account_id, currency, amount_minor,"
                    " status, transaction_id, captured_minor, failure_reason, steps, created_at) "
                    "VALUES ($1, $2, $3, $4, 'INR', 700, $5, $6, $7, $8, $9::text::jsonb, $10)",
                    ids[status], payer.owner_id, payer.id, payee.id, status, capture if done else None,
                    700 if done else 0, None if done else "insufficient_funds", json.dumps(steps), t0)
        finally:
            await conn.close()
        assert await migrate(url, services={"payments"}) == ["payments/0002_payment_step_columns",
                                                            "payments/0003_statement_level_checks"]
        conn = await asyncpg.connect(url)
        try:
            migrated = await db.get_payments(conn, ids.values())
            assert "steps" not in {r["column_name"] for r in await conn.fetch(
                "SELECT column_name FROM information_schema.columns WHERE table_schema = 'payments' "
                "AND table_name = 'payments'")}
        finally:
            await conn.close()
        for status, steps in histories.items():
            got = migrated[ids[status]].steps
            assert [(s["status"], datetime.fromisoformat(s["at"]), s.get("detail")) for s in got] == [
                (s["status"], datetime.fromisoformat(s["at"]), s.get("detail")) for s in steps]
            assert {k: v for k, v in got[0].items() if k not in ("status", "at")} == {
                k: v for k, v in steps[0].items() if k not in ("status", "at")}
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{fresh}" WITH (FORCE)')
        await admin.close()
