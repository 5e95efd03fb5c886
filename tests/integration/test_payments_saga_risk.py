"""The saga's risk step against a scorer the test plays: block, review (and the analyst's
allow or block), the budget's fail-open and fail-closed policies, late and repeated
decisions. The worker runs with FINTIDE_FRAUD_SCORER=model and no scorer installed, so
only the test answers `fraud.requests`.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from uuid import UUID

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer

from db.engine import create_pool
from db.payments import Account
from ops.embedded import EmbeddedStack
from ops.settings import Settings
from streams.fraud import DECISIONS, REQUESTS, RiskDecided, ScoreRequested, requests_of
from streams.payments import PAYMENTS, PaymentRequested
from streams.publisher import EventPublisher
from streams.topics import full_name
from tests.conftest import TEMPLATE_DB, _db_url
from tests.integration.test_payments_saga_support import (
    Worker,
    assert_projection_matches,
    assert_saga_sound,
    fresh_database,
    metric,
    payment_row,
    saga_settings,
    start_worker,
    wait_for,
    wait_terminal,
    wallets,
)

BUDGET_MS = 4_000  # > the worst decision path here (the broker answers idle fetches after 1.5 s)
FAIL_OPEN_LIMIT = 5_000


class Scorer:
    """Reads fraud.requests like the fraud service would; the test decides what to answer."""

    def __init__(self, settings: Settings, publisher: EventPublisher) -> None:
        self.settings = settings
        self.publisher = publisher
        self.seen: dict[str, list[ScoreRequested]] = {}
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        consumer = AIOKafkaConsumer(full_name(self.settings, REQUESTS.name), auto_offset_reset="earliest",
                                    bootstrap_servers=self.settings.kafka_bootstrap, fetch_max_wait_ms=50,
                                    group_id=f"scorer-{uuid.uuid4().hex[:8]}")
        await consumer.start()
        self._task = asyncio.create_task(self._read(consumer))

    async def _read(self, consumer: AIOKafkaConsumer) -> None:
        try:
            async for record in consumer:
                for request in requests_of(REQUESTS.decode(record.value)):
                    self.seen.setdefault(request.payment_id, []).append(request)
        finally:
            await consumer.stop()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def request(self, payment_id: UUID) -> ScoreRequested:
        async def asked() -> ScoreRequested | None:
            found = self.seen.get(str(payment_id))
            return found[0] if found else None

        return await wait_for(asked, 30, f"the score request of {payment_id}")

    async def decide(self, request: ScoreRequested, decision: str, *, source: str = "model", score: int = 50,
                     times: int = 1) -> None:
        event = RiskDecided(payment_id=request.payment_id, payer_wallet_id=request.payer_wallet_id, score=score,
                            decision=decision, source=source, rules_fired=["test_rule"], model_version="test")
        await self.publisher.publish_many(DECISIONS.name, [(None, event)] * times)


@dataclass
class Env:
    settings: Settings
    pool: asyncpg.Pool
    worker: Worker
    scorer: Scorer
    publisher: EventPublisher
    accounts: set[UUID] = field(default_factory=set)


@pytest.fixture(scope="module")
async def env(stack: EmbeddedStack, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Env]:
    async with fresh_database(_db_url(stack, "postgres"), TEMPLATE_DB) as url:
        settings = saga_settings(stack.kafka_bootstrap, url, stack.redis_url, tmp_path_factory.mktemp("risk"),
                                 fraud_scorer="model", fraud_budget_ms=BUDGET_MS,
                                 fraud_fail_open_limit_minor=FAIL_OPEN_LIMIT)
        pool = await create_pool(url)
        worker = await start_worker(settings, agents="agents.payments")
        async with EventPublisher(settings) as publisher:
            scorer = Scorer(settings, publisher)
            await scorer.start()
            try:
                yield Env(settings, pool, worker, scorer, publisher)
            finally:
                await scorer.stop()
                assert worker.stop() == 0, worker.log_tail()
                await pool.close()


async def pay(env: Env, payer: Account, payee: Account, amount_minor: int) -> UUID:
    assert payer.owner_id is not None
    env.accounts |= {payer.id, payee.id}
    request = PaymentRequested(payment_id=uuid.uuid4(), payer_user_id=payer.owner_id, payer_wallet_id=payer.id,
                               payee_wallet_id=payee.id, amount_minor=amount_minor, currency="INR",
                               device_id="phone-1", ip="203.0.113.9", country="DE")
    await env.publisher.publish(PAYMENTS.name, None, request)
    return request.payment_id


async def reach(env: Env, payment_id: UUID, status: str) -> asyncpg.Record:
    async def there() -> object | None:
        p = await payment_row(env.pool, payment_id)
        return p if p.status == status else None

    return await wait_for(there, 30, f"payment {payment_id} to be {status}")


async def balance(env: Env, account: Account) -> tuple[int, int]:
    row = await env.pool.fetchrow("SELECT posted_minor, reserved_minor FROM payments.balances WHERE account_id = $1",
                                  account.id)
    return row["posted_minor"], row["reserved_minor"]


async def test_block_fails_the_payment_and_releases_the_reservation(env: Env) -> None:
    payer, payee = await wallets(env.pool, [10_000, 0])
    pid = await pay(env, payer, payee, 3_000)
    request = await env.scorer.request(pid)
    assert (request.amount_minor, request.device_id, request.ip, request.country, request.failed_attempts) == (
        3_000, "phone-1", "203.0.113.9", "DE", 0)
    assert await balance(env, payer) == (10_000, 3_000)  # reserved while the scorer thinks
    await env.scorer.decide(request, "block", score=97)
    assert await wait_terminal(env.pool, [pid], worker=env.worker) == {"failed": 1}
    p = await payment_row(env.pool, pid)
    assert p.failure_reason == "risk_blocked" and "model block score 97" in p.steps[-1]["detail"]
    assert await balance(env, payer) == (10_000, 0)
    # The wallet's failure counts for its next payment's fraud check.
    second = await pay(env, payer, payee, 100)
    assert (await env.scorer.request(second)).failed_attempts == 1
    await env.scorer.decide(await env.scorer.request(second), "allow")
    assert await wait_terminal(env.pool, [second], worker=env.worker) == {"completed": 1}
    await assert_saga_sound(env.pool)


async def test_review_keeps_the_money_reserved_until_an_analyst_decides(env: Env) -> None:
    payer, payee = await wallets(env.pool, [10_000, 0])
    allowed, declined = await pay(env, payer, payee, 2_000), await pay(env, payer, payee, 1_500)
    for pid in (allowed, declined):
        await env.scorer.decide(await env.scorer.request(pid), "review", score=70)
        await reach(env, pid, "under_review")
    assert await balance(env, payer) == (10_000, 3_500)
    # The hold moved to one that lasts for the review (pending holds are never extended in place).
    holds = await env.pool.fetch("SELECT status, expires_at FROM payments.holds WHERE reference_id = $1 "
                                 "ORDER BY created_at", allowed)
    assert [h["status"] for h in holds] == ["voided", "pending"]
    assert holds[1]["expires_at"] > datetime.now(UTC) + timedelta(days=2)
    # Well past the budget: a payment under review is not subject to the timeout policy.
    await asyncio.sleep(BUDGET_MS / 1000 + 1)
    assert (await payment_row(env.pool, allowed)).status == "under_review"
    # A late model decision changes nothing; the analyst's does.
    await env.scorer.decide(await env.scorer.request(allowed), "allow")
    await env.scorer.decide(await env.scorer.request(allowed), "allow", source="review", score=10)
    await env.scorer.decide(await env.scorer.request(declined), "block", source="review")
    counts = await wait_terminal(env.pool, [allowed, declined], worker=env.worker)
    assert counts == {"completed": 1, "failed": 1}
    assert (await payment_row(env.pool, declined)).failure_reason == "review_declined"
    assert [s["status"] for s in (await payment_row(env.pool, allowed)).steps] == [
        "initiated", "funds_reserved", "under_review", "risk_assessed", "posted", "completed"]
    assert await balance(env, payer) == (8_000, 0) and await balance(env, payee) == (2_000, 0)
    await assert_saga_sound(env.pool)


async def test_no_decision_within_the_budget_fails_open_small_and_closed_large(env: Env) -> None:
    open_before = await metric(env.worker, "fintide_fraud_timeouts_total", {"policy": "fail_open"})
    closed_before = await metric(env.worker, "fintide_fraud_timeouts_total", {"policy": "fail_closed"})
    payer, payee = await wallets(env.pool, [20_000, 0])
    small, large = await pay(env, payer, payee, FAIL_OPEN_LIMIT), await pay(env, payer, payee, FAIL_OPEN_LIMIT + 1)
    requests = [await env.scorer.request(pid) for pid in (small, large)]
    counts = await wait_terminal(env.pool, [small, large], timeout_s=BUDGET_MS / 1000 + 30, worker=env.worker)
    assert counts == {"completed": 1, "failed": 1}
    assert (await payment_row(env.pool, small)).status == "completed"
    timed_out = await payment_row(env.pool, large)
    assert timed_out.failure_reason == "risk_timeout" and "fail-closed" in timed_out.steps[-1]["detail"]
    assert await metric(env.worker, "fintide_fraud_timeouts_total", {"policy": "fail_open"}) == open_before + 1
    assert await metric(env.worker, "fintide_fraud_timeouts_total", {"policy": "fail_closed"}) == closed_before + 1
    # Decisions that arrive after the timeout are ignored, however often they come.
    await env.scorer.decide(requests[0], "block", times=2)
    await env.scorer.decide(requests[1], "allow", times=2)
    await asyncio.sleep(3)
    assert (await payment_row(env.pool, small)).status == "completed"
    assert (await payment_row(env.pool, large)).status == "failed"
    assert await balance(env, payer) == (20_000 - FAIL_OPEN_LIMIT, 0)
    assert await metric(env.worker, "fintide_payments_risk_decisions_total",
                        {"source": "model", "decision": "block", "applied": "no"}) >= 2
    await assert_saga_sound(env.pool)


async def test_repeated_and_reordered_decisions_have_one_effect(env: Env) -> None:
    payer, payee = await wallets(env.pool, [10_000, 0])
    pid = await pay(env, payer, payee, 4_000)
    request = await env.scorer.request(pid)
    await env.scorer.decide(request, "allow", times=3)
    await env.scorer.decide(request, "block")
    await env.scorer.decide(request, "block", source="review")
    assert await wait_terminal(env.pool, [pid], worker=env.worker) == {"completed": 1}
    await asyncio.sleep(2)  # let the late ones arrive
    assert await balance(env, payer) == (6_000, 0) and await balance(env, payee) == (4_000, 0)
    captures = await env.pool.fetchval("SELECT count(*) FROM payments.transactions WHERE reference_id = $1", pid)
    assert captures == 1
    await assert_saga_sound(env.pool)
    await assert_projection_matches(env.worker, env.pool, env.accounts)
