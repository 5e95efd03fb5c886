"""Stateful property test of the saga's steps on real PostgreSQL: invariants 4 and 7.

Hypothesis plays the broker at its worst: it sends payment requests (some malformed),
fraud decisions of every kind and source (through the agent's own `outcome_of`), budget
timeouts, completions and hold expiry, and at any point redelivers any message sent so
far, alone or in shuffled batches. After every step:
  4. one effect per payment id, however often and in whatever order messages come:
     at most one payment row and one capture per id, a history that is one of the saga's
     paths and ends at the payment's status (a capture ends it: posted and completed in
     one transaction), a finished payment's history never changing again, at most one
     pending hold per payment, and balances equal to a model that counts each payment
     once (captured amounts moved, open ones reserved);
  7. nothing stays reserved for a payment that ended, and at the end, once every open
     payment got its decision, timeout or expiry, every saga is completed or failed and
     no wallet has anything reserved.
The ledger's own invariants (reconcile finds nothing, Σ debits = Σ credits) are checked
each step too.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Coroutine
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar
from uuid import UUID

import asyncpg
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule, run_state_machine_as_test

from agents.payments import outcome_of
from db import payments as db
from services import payments
from services.payments import PaymentRequest, RiskOutcome
from streams.fraud import RiskDecided
from tests.integration.test_payments_support import funded_wallet

T = TypeVar("T")
WALLETS = 4
FUNDS = 20_000
FAIL_OPEN_LIMIT = 1_500
DECISIONS = st.sampled_from([("model", "allow"), ("model", "review"), ("model", "block"),
                             ("review", "allow"), ("review", "block"), ("review", "review"), ("oracle", "allow")])
Message = tuple[str, Any]  # (kind, payload) as the agents would receive it
# Every history a payment may have in the saga (db.payments.Payment.steps, statuses only).
_RESERVED = ("initiated", "funds_reserved")
_CAPTURED = ("risk_assessed", "posted", "completed")
SAGA_PATHS = {("initiated", "failed"), _RESERVED, (*_RESERVED, "failed"), (*_RESERVED, "under_review"),
              (*_RESERVED, "under_review", "failed"), (*_RESERVED, *_CAPTURED), (*_RESERVED, "under_review", *_CAPTURED)}


class SagaMachine(RuleBasedStateMachine):
    def __init__(self, loop: asyncio.AbstractEventLoop, conn: asyncpg.Connection) -> None:
        super().__init__()
        self.loop, self.conn = loop, conn
        self.wallets: list[UUID] = []
        self.owners: list[UUID] = []
        self.payments: dict[UUID, PaymentRequest] = {}
        self.sent: list[Message] = []
        self.finished: dict[UUID, list[dict[str, Any]]] = {}  # payment -> its history once it ended

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)

    @initialize()
    def open_wallets(self) -> None:
        for _ in range(WALLETS):
            account = self.run(funded_wallet(self.conn, FUNDS))
            assert account.owner_id is not None
            self.wallets.append(account.id)
            self.owners.append(account.owner_id)

    # ------------------------------------------------------------------- what arrives

    def deliver(self, messages: list[Message]) -> None:
        """Apply messages as the agents would: requests, decisions, timeouts, completions."""
        requests = [p for kind, p in messages if kind == "request"]
        if requests:
            results = self.run(payments.initiate_payments(self.conn, requests))
            for request, result in zip(requests, results, strict=True):
                if result.status != "rejected":
                    self.payments.setdefault(request.payment_id, request)
        outcomes = [o for kind, p in messages if kind == "decision" for o in (outcome_of(p),) if o is not None]
        outcomes += [p for kind, p in messages if kind == "timeout"]
        if outcomes:
            self.run(payments.settle_risk(self.conn, outcomes))
        completions = [p for kind, p in messages if kind == "complete"]
        if completions:
            self.run(payments.complete_payments(self.conn, completions))

    def send(self, messages: list[Message]) -> None:
        self.sent += messages
        self.deliver(messages)

    @rule(items=st.lists(st.tuples(st.integers(0, WALLETS - 1), st.integers(0, WALLETS - 1),
                                   st.integers(1, 6_000), st.booleans()), min_size=1, max_size=6))
    def request(self, items: list[tuple[int, int, int, bool]]) -> None:
        batch: list[Message] = []
        for i, j, amount, own in items:
            # Not always the payer's own wallet, and sometimes into itself: bad input is refused.
            payer = self.owners[i] if own else self.owners[(i + 1) % WALLETS]
            batch.append(("request", PaymentRequest(payment_id=uuid.uuid4(), payer_id=payer,
                                                    from_account_id=self.wallets[i], to_account_id=self.wallets[j],
                                                    amount_minor=amount, currency="INR")))
        self.send(batch)

    @precondition(lambda self: self.payments)
    @rule(data=st.data())
    def decide(self, data: st.DataObject) -> None:
        picked = data.draw(st.lists(st.sampled_from(sorted(self.payments)), min_size=1, max_size=4))
        batch: list[Message] = []
        for pid in picked:
            source, decision = data.draw(DECISIONS)
            p = self.payments[pid]
            batch.append(("decision", RiskDecided(payment_id=str(pid), payer_wallet_id=str(p.from_account_id),
                                                  score=data.draw(st.integers(0, 100)), decision=decision,
                                                  source=source)))
        self.send(batch)

    @precondition(lambda self: self.payments)
    @rule(data=st.data())
    def budget_runs_out(self, data: st.DataObject) -> None:
        picked = data.draw(st.lists(st.sampled_from(sorted(self.payments)), min_size=1, max_size=4))
        self.send([("timeout", self.timeout(pid)) for pid in picked])

    def timeout(self, pid: UUID) -> RiskOutcome:
        small = self.payments[pid].amount_minor <= FAIL_OPEN_LIMIT
        return RiskOutcome(payment_id=pid, expect="funds_reserved", action="capture" if small else "fail",
                           reason=None if small else "risk_timeout", detail="budget")

    @precondition(lambda self: self.payments)
    @rule(data=st.data())
    def complete(self, data: st.DataObject) -> None:
        picked = data.draw(st.lists(st.sampled_from(sorted(self.payments)), min_size=1, max_size=4))
        self.send([("complete", pid) for pid in picked])

    @precondition(lambda self: self.sent)
    @rule(data=st.data())
    def redeliver(self, data: st.DataObject) -> None:
        """Any messages again, in any order: duplicates, replays and reorderings."""
        again = data.draw(st.lists(st.sampled_from(self.sent), min_size=1, max_size=8))
        self.deliver(list(data.draw(st.permutations(again))))

    @precondition(lambda self: self.payments)
    @rule()
    def time_passes(self) -> None:
        """Every hold of this example's wallets expires: their open payments fail."""
        far = datetime.now(UTC) + timedelta(seconds=payments.REVIEW_HOLD_TTL_S + 3600)
        while self.run(payments.expire_holds(self.conn, as_of=far, limit=1_000)):
            pass

    # ------------------------------------------------------------------------ checks

    def rows(self) -> list[asyncpg.Record]:
        return self.run(self.conn.fetch(
            "SELECT p.id, p.status, p.amount_minor, p.captured_minor, p.from_account_id, p.to_account_id, "
            "       (SELECT count(*) FROM payments.transactions t WHERE t.reference_id = p.id) AS captures, "
            "       (SELECT count(*) FROM payments.holds h WHERE h.reference_id = p.id AND h.status = 'pending') AS pending "
            "FROM payments.payments p WHERE p.id = ANY($1::uuid[])", list(self.payments)))

    @invariant()
    def one_effect_per_payment(self) -> None:
        rows = self.rows()
        assert len(rows) == len(self.payments)
        posted = {w: FUNDS for w in self.wallets}
        reserved = dict.fromkeys(self.wallets, 0)
        histories = {pid: p.steps for pid, p in self.run(db.get_payments(self.conn, list(self.payments))).items()}
        for r in rows:
            history = histories[r["id"]]
            path = tuple(s["status"] for s in history)
            assert path in SAGA_PATHS and path[-1] == r["status"], f"{r['status']} after {path}"
            if r["status"] in ("completed", "failed"):
                # Redelivered, late or reordered messages record nothing more, not even a time.
                assert self.finished.setdefault(r["id"], history) == history
            captured = r["status"] in ("posted", "completed")
            assert r["captures"] == (1 if captured else 0) and r["captured_minor"] == (r["amount_minor"] if captured else 0)
            assert r["pending"] == (1 if r["status"] in ("funds_reserved", "under_review") else 0)
            if captured:
                posted[r["from_account_id"]] -= r["amount_minor"]
                posted[r["to_account_id"]] += r["amount_minor"]
            elif r["pending"]:
                reserved[r["from_account_id"]] += r["amount_minor"]
        balances = self.run(self.conn.fetch("SELECT account_id, posted_minor, reserved_minor FROM payments.balances "
                                            "WHERE account_id = ANY($1::uuid[])", self.wallets))
        assert {b["account_id"]: (b["posted_minor"], b["reserved_minor"]) for b in balances} == {
            w: (posted[w], reserved[w]) for w in self.wallets}

    @invariant()
    def ledger_sound(self) -> None:
        assert self.run(payments.find_differences(self.conn)) == []

    def teardown(self) -> None:
        """Drain: every open payment gets a decision, a timeout or its hold's expiry."""
        if self.payments:
            self.deliver([("timeout", self.timeout(pid)) for pid in self.payments])
            self.deliver([("decision", RiskDecided(payment_id=str(pid), payer_wallet_id=str(p.from_account_id),
                                                   score=0, decision="allow", source="review"))
                          for pid, p in self.payments.items()])
            self.deliver([("complete", pid) for pid in self.payments])
            self.time_passes()
            rows = self.rows()
            assert {r["status"] for r in rows} <= {"completed", "failed"}, {r["status"] for r in rows}
            assert sum(r["pending"] for r in rows) == 0
            self.one_effect_per_payment()
        reserved = self.run(self.conn.fetchval("SELECT coalesce(sum(reserved_minor), 0) FROM payments.balances "
                                               "WHERE account_id = ANY($1::uuid[])", self.wallets))
        assert reserved == 0


def test_saga_steps_have_one_effect_and_every_saga_ends(database_url: str) -> None:
    loop = asyncio.new_event_loop()
    conn: asyncpg.Connection = loop.run_until_complete(asyncpg.connect(database_url))
    try:
        run_state_machine_as_test(
            lambda: SagaMachine(loop, conn),
            settings=settings(max_examples=25, stateful_step_count=20, deadline=None,
                              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]))
    finally:
        loop.run_until_complete(conn.close())
        loop.close()
