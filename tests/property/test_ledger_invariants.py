"""Stateful property test of the ledger against the real PostgreSQL.

Hypothesis drives random sequences of deposits, transfers, batches, holds (reserve, full
or partial post, void, expiry), payments with refunds and idempotent retries; a Python
model predicts every balance. After every step the invariants of issue 5 are checked:
  1. every journal transaction nets to zero per currency, Σ debits = Σ credits;
  2. balances rebuilt from the journal equal the projection (reconcile finds nothing,
     rebuild_balances changes nothing);
  3. no non-overdraft account has available < 0, counting holds;
  4. one effect per idempotency key / effect id, however often it is retried;
  5. a hold resolves at most once and posts no more than it reserved;
  6. Σ refunds ≤ captured per payment.
Examples share one database (each example opens its own wallets), so the global checks
also cover everything earlier examples left behind.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Coroutine
from datetime import timedelta
from typing import Any, TypeVar
from uuid import UUID

import asyncpg
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule, run_state_machine_as_test

from api import idempotency
from services import payments
from services.payments import TransferRequest

T = TypeVar("T")
INR_WALLETS = 3
AMOUNT = st.integers(min_value=1, max_value=5_000)


class LedgerMachine(RuleBasedStateMachine):
    def __init__(self, loop: asyncio.AbstractEventLoop, conn: asyncpg.Connection) -> None:
        super().__init__()
        self.loop, self.conn = loop, conn
        self.wallets: list[UUID] = []
        self.owners: list[UUID] = []
        self.currency: dict[UUID, str] = {}
        self.posted: dict[UUID, int] = {}
        self.reserved: dict[UUID, int] = {}
        self.holds: dict[UUID, tuple[UUID, int]] = {}  # pending: id -> (account, amount)
        self.resolved: dict[UUID, str] = {}
        self.posted_transfers: list[TransferRequest] = []
        self.captured: dict[UUID, tuple[int, int]] = {}  # payment -> (captured, refunded)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)

    def available(self, w: UUID) -> int:
        return self.posted[w] - self.reserved[w]

    @initialize()
    def open_wallets(self) -> None:
        for currency in ["INR"] * INR_WALLETS + ["JPY"]:
            owner = uuid.uuid4()
            account = self.run(payments.open_wallet(self.conn, owner, currency))
            self.wallets.append(account.id)
            self.owners.append(owner)
            self.currency[account.id] = currency
            self.posted[account.id] = self.reserved[account.id] = 0

    def wallet(self, i: int) -> UUID:
        return self.wallets[i % len(self.wallets)]

    # ----------------------------------------------------------------------- money in

    @rule(i=st.integers(0, 3), amount=st.integers(1, 20_000))
    def deposit(self, i: int, amount: int) -> None:
        w = self.wallet(i)
        d = self.run(payments.begin_deposit(self.conn, deposit_id=uuid.uuid4(), owner_id=self.owners[i % 4],
                                            wallet_id=w, amount_minor=amount, currency=self.currency[w], gateway="prop"))
        for _ in range(2):  # a gateway confirming twice credits once
            self.run(payments.settle_deposit(self.conn, d.id, gateway_ref=None))
        self.posted[w] += amount

    @rule(i=st.integers(0, 3), amount=st.integers(1, 20_000), attempts=st.integers(1, 3))
    def idempotent_deposit(self, i: int, amount: int, attempts: int) -> None:
        w = self.wallet(i)
        owner = self.owners[i % 4]
        scope = idempotency.Scope("payments.idempotency_keys", owner, "POST /deposits", uuid.uuid4().hex,
                                  idempotency.request_hash("POST", f"/w/{w}", str(amount).encode()))

        async def work(effect_id: UUID) -> tuple[int, dict[str, str]]:
            d = await payments.begin_deposit(self.conn, deposit_id=effect_id, owner_id=owner, wallet_id=w,
                                             amount_minor=amount, currency=self.currency[w], gateway="prop")
            await payments.settle_deposit(self.conn, d.id, gateway_ref=None)
            return 201, {"id": str(d.id)}

        bodies = {self.run(idempotency.run(self.conn, scope, work)).content for _ in range(attempts)}  # type: ignore[arg-type]
        assert len(bodies) == 1
        self.posted[w] += amount

    # ---------------------------------------------------------------------- transfers

    def _expect_transfer(self, a: UUID, b: UUID, amount: int) -> str | None:
        if a == b:
            return "same_account"
        if self.currency[a] != self.currency[b]:
            return "currency_mismatch"
        if self.available(a) < amount:
            return "insufficient_funds"
        return None

    @rule(i=st.integers(0, 3), j=st.integers(0, 3), amount=AMOUNT)
    def transfer(self, i: int, j: int, amount: int) -> None:
        a, b = self.wallet(i), self.wallet(j)
        request = TransferRequest(id=uuid.uuid4(), from_account_id=a, to_account_id=b, amount_minor=amount,
                                  currency=self.currency[a])
        expected = self._expect_transfer(a, b, amount)
        (result,) = self.run(payments.post_batch(self.conn, [request]))
        assert (result.status, result.reason) == (("posted", None) if expected is None else ("rejected", expected))
        if expected is None:
            self.posted[a] -= amount
            self.posted[b] += amount
            self.posted_transfers.append(request)

    @precondition(lambda self: self.posted_transfers)
    @rule(data=st.data())
    def replay_transfer(self, data: st.DataObject) -> None:
        request = data.draw(st.sampled_from(self.posted_transfers))
        (result,) = self.run(payments.post_batch(self.conn, [request]))
        assert result.status == "duplicate"

    @rule(items=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3), AMOUNT), min_size=1, max_size=12))
    def batch(self, items: list[tuple[int, int, int]]) -> None:
        requests = [TransferRequest(id=uuid.uuid4(), from_account_id=self.wallet(i), to_account_id=self.wallet(j),
                                    amount_minor=amount, currency=self.currency[self.wallet(i)]) for i, j, amount in items]
        results = self.run(payments.post_batch(self.conn, requests))
        for request, result in zip(requests, results, strict=True):
            a, b, amount = request.from_account_id, request.to_account_id, request.amount_minor
            expected = self._expect_transfer(a, b, amount)
            assert (result.status, result.reason) == (("posted", None) if expected is None else ("rejected", expected))
            if expected is None:  # items apply in order: later ones see earlier ones
                self.posted[a] -= amount
                self.posted[b] += amount

    # -------------------------------------------------------------------------- holds

    @rule(i=st.integers(0, 3), amount=AMOUNT)
    def reserve(self, i: int, amount: int) -> None:
        w = self.wallet(i)
        hold_id = uuid.uuid4()
        try:
            self.run(payments.reserve(self.conn, hold_id=hold_id, account_id=w, amount_minor=amount,
                                      currency=self.currency[w]))
        except payments.InsufficientFunds:
            assert self.available(w) < amount
            return
        assert self.available(w) >= amount
        self.reserved[w] += amount
        self.holds[hold_id] = (w, amount)

    @precondition(lambda self: self.holds)
    @rule(data=st.data(), j=st.integers(0, 3))
    def post_hold(self, data: st.DataObject, j: int) -> None:
        hold_id = data.draw(st.sampled_from(list(self.holds)))
        account, amount = self.holds[hold_id]
        dest = self.wallet(j)
        part = data.draw(st.integers(1, amount))
        if dest == account or self.currency[dest] != self.currency[account]:
            return
        hold = self.run(payments.post_hold(self.conn, hold_id, to_account_id=dest, amount_minor=part))
        assert hold.status == "posted" and hold.posted_minor == part <= hold.amount_minor
        del self.holds[hold_id]
        self.resolved[hold_id] = "posted"
        self.reserved[account] -= amount
        self.posted[account] -= part
        self.posted[dest] += part

    @precondition(lambda self: self.holds)
    @rule(data=st.data())
    def void_hold(self, data: st.DataObject) -> None:
        hold_id = data.draw(st.sampled_from(list(self.holds)))
        account, amount = self.holds.pop(hold_id)
        assert self.run(payments.void_hold(self.conn, hold_id)).status == "voided"
        self.resolved[hold_id] = "voided"
        self.reserved[account] -= amount

    @precondition(lambda self: self.resolved)
    @rule(data=st.data(), j=st.integers(0, 3))
    def resolve_again(self, data: st.DataObject, j: int) -> None:
        hold_id = data.draw(st.sampled_from(list(self.resolved)))
        status = self.resolved[hold_id]
        for attempt in (payments.void_hold(self.conn, hold_id),
                        payments.post_hold(self.conn, hold_id, to_account_id=self.wallet(j), transaction_id=uuid.uuid4())):
            try:
                hold = self.run(attempt)
            except (payments.InvalidState, payments.SameAccount, payments.CurrencyMismatch):
                continue
            # Only repeating the very resolution it already had is allowed, and it is a no-op.
            assert hold.status == status == "voided"

    @precondition(lambda self: self.holds)
    @rule()
    def expire_everything_due(self) -> None:
        # Every pending hold is due a day after its expiry; earlier examples' holds too.
        far = self.run(self.conn.fetchval("SELECT max(expires_at) FROM payments.holds WHERE status = 'pending'"))
        while self.run(payments.expire_holds(self.conn, as_of=far + timedelta(days=1), limit=1_000)):
            pass
        for hold_id, (account, amount) in self.holds.items():
            self.reserved[account] -= amount
            self.resolved[hold_id] = "expired"
        self.holds.clear()

    # ----------------------------------------------------------------- payments, refunds

    @rule(i=st.integers(0, 2), j=st.integers(0, 2), amount=AMOUNT)
    def pay_and_capture(self, i: int, j: int, amount: int) -> None:
        a, b = self.wallet(i), self.wallet(j)
        if a == b:
            return
        pid = uuid.uuid4()
        payment = self.run(payments.initiate_payment(self.conn, payment_id=pid, payer_id=self.owners[i], from_account_id=a,
                                                     to_account_id=b, amount_minor=amount, currency="INR"))
        if payment.status == "failed":
            assert self.available(a) < amount
            return
        for _ in range(2):  # redelivered capture: one effect
            self.run(payments.capture_payment(self.conn, pid))
        self.posted[a] -= amount
        self.posted[b] += amount
        self.captured[pid] = (amount, 0)

    @precondition(lambda self: self.captured)
    @rule(data=st.data(), amount=AMOUNT)
    def refund(self, data: st.DataObject, amount: int) -> None:
        pid = data.draw(st.sampled_from(list(self.captured)))
        captured, refunded = self.captured[pid]
        payment = self.run(payments.get_payment(self.conn, pid))
        payer, payee = payment.from_account_id, payment.to_account_id
        try:
            refund = self.run(payments.refund_payment(self.conn, refund_id=uuid.uuid4(), payment_id=pid,
                                                      requested_by=uuid.uuid4(), amount_minor=amount))
        except payments.RefundExceedsCaptured:
            assert refunded + amount > captured
            return
        except payments.InsufficientFunds:
            assert self.available(payee) < amount
            return
        assert refunded + refund.amount_minor <= captured and self.available(payee) >= amount
        self.captured[pid] = (captured, refunded + amount)
        self.posted[payee] -= amount
        self.posted[payer] += amount

    # ----------------------------------------------------------------------- invariants

    @invariant()
    def balances_match_the_model(self) -> None:
        for w in self.wallets:
            balance = self.run(payments.get_wallet(self.conn, w, owner_id=None)).balance
            assert (balance.posted_minor, balance.reserved_minor) == (self.posted[w], self.reserved[w]), w
            assert balance.available_minor >= 0

    @invariant()
    def journal_and_projection_agree(self) -> None:
        assert self.run(payments.find_differences(self.conn)) == []
        for line in self.run(payments.trial_balance(self.conn)):
            assert line.debits_minor == line.credits_minor
        negative = self.run(self.conn.fetchval(
            "SELECT count(*) FROM payments.balances WHERE NOT allow_overdraft AND posted_minor - reserved_minor < 0"))
        assert negative == 0

    @invariant()
    def holds_and_refunds_bounded(self) -> None:
        bad_holds = self.run(self.conn.fetchval(
            "SELECT count(*) FROM payments.holds WHERE posted_minor > amount_minor "
            "OR (status = 'pending') <> (resolved_at IS NULL)"))
        bad_refunds = self.run(self.conn.fetchval(
            "SELECT count(*) FROM payments.payments p WHERE (SELECT coalesce(sum(amount_minor), 0) "
            "FROM payments.refunds r WHERE r.payment_id = p.id) > p.captured_minor"))
        one_effect = self.run(self.conn.fetchval(
            "SELECT count(*) FROM (SELECT reference_id FROM payments.transactions WHERE kind = 'deposit' "
            "GROUP BY reference_id HAVING count(*) > 1) d"))
        assert (bad_holds, bad_refunds, one_effect) == (0, 0, 0)

    def teardown(self) -> None:
        # The projection must equal its rebuild from the journal after any sequence.
        assert self.run(payments.rebuild_balances(self.conn)) == 0


def test_ledger_invariants_hold_for_any_sequence(database_url: str) -> None:
    loop = asyncio.new_event_loop()
    conn: asyncpg.Connection = loop.run_until_complete(asyncpg.connect(database_url))
    try:
        run_state_machine_as_test(
            lambda: LedgerMachine(loop, conn),
            settings=settings(max_examples=50, stateful_step_count=25, deadline=None,
                              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]))
    finally:
        loop.run_until_complete(conn.close())
        loop.close()
