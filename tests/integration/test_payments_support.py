"""Shared helpers for the payments tests (no tests here): wallets funded the real way."""

from __future__ import annotations

import uuid
from uuid import UUID

import asyncpg

from db.payments import Account
from services import payments


async def funded_wallet(conn: asyncpg.Connection, amount_minor: int, currency: str = "INR",
                        owner_id: UUID | None = None) -> Account:
    """A new wallet credited through a settled deposit (the same path the API uses)."""
    owner_id = owner_id or uuid.uuid4()
    wallet = await payments.open_wallet(conn, owner_id, currency)
    if amount_minor:
        await deposit(conn, wallet, amount_minor)
    return wallet


async def deposit(conn: asyncpg.Connection, wallet: Account, amount_minor: int) -> None:
    assert wallet.owner_id is not None
    pending = await payments.begin_deposit(conn, deposit_id=uuid.uuid4(), owner_id=wallet.owner_id,
                                           wallet_id=wallet.id, amount_minor=amount_minor,
                                           currency=wallet.currency, gateway="test")
    await payments.settle_deposit(conn, pending.id, gateway_ref=None)


async def available(conn: asyncpg.Connection, account_id: UUID) -> int:
    view = await payments.get_wallet(conn, account_id, owner_id=None)
    return view.balance.available_minor


async def assert_ledger_sound(conn: asyncpg.Connection) -> None:
    """Every invariant reconcile checks holds, and no non-overdraft account is below zero."""
    differences = await payments.find_differences(conn)
    assert differences == [], differences
    negative = await conn.fetchval("SELECT count(*) FROM payments.balances "
                                   "WHERE NOT allow_overdraft AND posted_minor - reserved_minor < 0")
    assert negative == 0
    for line in await payments.trial_balance(conn):
        assert line.debits_minor == line.credits_minor, line
