"""The payment saga with the real fraud scorer (FINTIDE_FRAUD_SCORER=model): PostgreSQL,
the broker, Redis, a saga worker, a fraud worker and the API on uvicorn.

Rules added through the API make the scorer block, hold for review or allow particular
amounts; the saga then fails the payment (`risk_blocked`, funds released), keeps it
`under_review` with the money reserved until an analyst approves (completed) or declines
(failed, funds released) through `POST /api/v1/fraud/reviews/{id}/decision`. With the
scorer down, the saga's budget policy applies: fail-open below the limit, fail-closed above.

The saga and the scorer run as two workers (two consumer groups) so the last test can stop
the scorer alone; `fintide up` runs both in one worker, which is the same agents.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any
from uuid import UUID

import asyncpg
import httpx
import pytest
from msgspec.structs import replace

from db.engine import create_pool
from db.payments import Account
from ops.embedded import EmbeddedStack
from ops.settings import Settings
from services.payments import NotFound
from streams.payments import PAYMENTS, PaymentRequested
from streams.publisher import EventPublisher
from tests.helpers.auth import LoggedIn, register_and_login
from tests.integration.test_fraud_support import FraudWorker, module_settings, serve_api, start_worker, wait_for
from tests.integration.test_payments_saga_support import (
    _owns_everything,
    _recovered,
    assert_saga_sound,
    payment_row,
    wait_terminal,
    wallets,
)

BUDGET_MS = 3_000
FAIL_OPEN_LIMIT = 5_000
BLOCK_AMOUNT, REVIEW_AMOUNTS, ALLOW_AMOUNT = 4_321, (2_345, 1_234), 1_111


@dataclass
class Env:
    settings: Settings
    pool: asyncpg.Pool
    saga: FraudWorker
    scorer: FraudWorker
    client: httpx.AsyncClient
    analyst: LoggedIn
    publisher: EventPublisher


async def _saga_ready(worker: FraudWorker) -> bool:
    return await _owns_everything(worker) and await _recovered(worker)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def saga_settings(stack: EmbeddedStack, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    base = module_settings(stack, tmp_path_factory.mktemp("fraud-saga"), "fraud_saga", redis_db=8)
    return replace(base, fraud_budget_ms=BUDGET_MS, fraud_fail_open_limit_minor=FAIL_OPEN_LIMIT)


@pytest.fixture(scope="module")
async def env(saga_settings: Settings) -> AsyncIterator[Env]:
    settings = saga_settings
    saga = await start_worker(replace(settings, worker_id="saga", app_id=settings.app_id + "-saga"),
                              agents="agents.payments", ready=_saga_ready)
    scorer = await start_worker(replace(settings, worker_id="scorer"))
    pool = await create_pool(settings.database_url)
    try:
        async for address in serve_api(settings):
            async with httpx.AsyncClient(base_url=f"http://{address}", timeout=20) as client, \
                    EventPublisher(settings) as publisher:
                client.app = SimpleNamespace(state=SimpleNamespace(settings=settings))  # type: ignore[attr-defined]
                admin = await register_and_login(client, roles=("admin",))
                await _rules(client, admin)
                await wait_for(lambda: _rules_loaded(scorer), 15, "the scorer to load the test rules")
                yield Env(settings, pool, saga, scorer, client, admin, publisher)
    finally:
        await pool.close()
        scorer.stop()
        assert saga.stop() == 0, saga.log_tail()


async def _rules(client: httpx.AsyncClient, admin: LoggedIn) -> None:
    for rule_id, expression, action in (
            ("t-block", f"amount_minor == {BLOCK_AMOUNT}", "block"),
            ("t-review", " or ".join(f"amount_minor == {a}" for a in REVIEW_AMOUNTS), "review"),
            ("t-allow", f"amount_minor == {ALLOW_AMOUNT} or amount_minor == {FAIL_OPEN_LIMIT}"
                        f" or amount_minor == {FAIL_OPEN_LIMIT + 1}", "allow")):
        response = await client.post("/api/v1/fraud/rules", headers=admin.headers,
                                     json={"id": rule_id, "expression": expression, "action": action})
        assert response.status_code == 201, response.text


async def _rules_loaded(scorer: FraudWorker) -> bool:
    async with httpx.AsyncClient(timeout=5) as c:
        status = (await c.get(f"{scorer.url}/fraud/status")).json()
    return {"t-block", "t-review", "t-allow"} <= set(status["rules"])


async def pay(env: Env, payer: Account, payee: Account, amount_minor: int) -> UUID:
    assert payer.owner_id is not None
    request = PaymentRequested(payment_id=uuid.uuid4(), payer_user_id=payer.owner_id, payer_wallet_id=payer.id,
                               payee_wallet_id=payee.id, amount_minor=amount_minor, currency="INR",
                               device_id="phone-1", ip="203.0.113.9", country="IN")
    await env.publisher.publish(PAYMENTS.name, None, request)
    return request.payment_id


async def balance(env: Env, account: Account) -> tuple[int, int]:
    row = await env.pool.fetchrow("SELECT posted_minor, reserved_minor FROM payments.balances WHERE account_id = $1",
                                  account.id)
    return row["posted_minor"], row["reserved_minor"]


async def status_is(env: Env, payment_id: UUID, status: str) -> Any:
    async def there() -> Any:
        try:
            p = await payment_row(env.pool, payment_id)
        except NotFound:  # not initiated yet
            return None
        return p if p.status == status else None

    return await wait_for(there, 30, f"payment {payment_id} to be {status}")


async def _score(env: Env, payment_id: UUID) -> dict[str, Any] | None:
    response = await env.client.get(f"/api/v1/fraud/scores/{payment_id}", headers=env.analyst.headers)
    return response.json() if response.status_code == 200 else None


async def review_of(env: Env, payment_id: UUID) -> dict[str, Any]:
    async def listed() -> dict[str, Any] | None:
        items = (await env.client.get("/api/v1/fraud/reviews?limit=200", headers=env.analyst.headers)).json()["items"]
        return next((r for r in items if r["payment_id"] == str(payment_id)), None)

    return await wait_for(listed, 30, f"the review of {payment_id}")


async def test_block_fails_the_payment_and_releases_the_funds(env: Env) -> None:
    payer, payee = await wallets(env.pool, [10_000, 0])
    allowed = await pay(env, payer, payee, ALLOW_AMOUNT)
    assert await wait_terminal(env.pool, [allowed], worker=env.saga) == {"completed": 1}  # type: ignore[arg-type]
    blocked = await pay(env, payer, payee, BLOCK_AMOUNT)
    assert await wait_terminal(env.pool, [blocked], worker=env.saga) == {"failed": 1}  # type: ignore[arg-type]
    p = await payment_row(env.pool, blocked)
    assert p.failure_reason == "risk_blocked"
    assert await balance(env, payer) == (10_000 - ALLOW_AMOUNT, 0)
    assert await balance(env, payee) == (ALLOW_AMOUNT, 0)
    score = await wait_for(lambda: _score(env, blocked), 10, "the recorded score")
    assert score["decision"] == "block" and "t-block" in score["rules_fired"] and len(score["top_features"]) == 3
    await assert_saga_sound(env.pool)


async def test_review_waits_for_the_analyst_approve_completes_decline_releases(env: Env) -> None:
    payer, payee = await wallets(env.pool, [10_000, 0])
    approve, decline = [await pay(env, payer, payee, amount) for amount in REVIEW_AMOUNTS]
    for pid in (approve, decline):
        await status_is(env, pid, "under_review")
    assert await balance(env, payer) == (10_000, sum(REVIEW_AMOUNTS))  # still reserved
    reviews = {pid: await review_of(env, pid) for pid in (approve, decline)}
    assert all(r["status"] == "open" and "t-review" in r["rules_fired"] for r in reviews.values())
    for pid, decision in ((approve, "approve"), (decline, "decline")):
        response = await env.client.post(f"/api/v1/fraud/reviews/{reviews[pid]['id']}/decision",
                                         headers=env.analyst.headers, json={"decision": decision, "note": "checked"})
        assert response.status_code == 200 and response.json()["published"] is True, response.text
    counts = await wait_terminal(env.pool, [approve, decline], worker=env.saga)  # type: ignore[arg-type]
    assert counts == {"completed": 1, "failed": 1}
    assert (await payment_row(env.pool, approve)).status == "completed"
    assert (await payment_row(env.pool, decline)).failure_reason == "review_declined"
    assert await balance(env, payer) == (10_000 - REVIEW_AMOUNTS[0], 0)  # the declined one is released
    assert await balance(env, payee) == (REVIEW_AMOUNTS[0], 0)
    await assert_saga_sound(env.pool)


async def test_scorer_down_the_budget_policy_applies(env: Env) -> None:
    """Must stay last: it stops the scorer."""
    assert env.scorer.stop() == 0
    payer, payee = await wallets(env.pool, [20_000, 0])
    small, large = await pay(env, payer, payee, FAIL_OPEN_LIMIT), await pay(env, payer, payee, FAIL_OPEN_LIMIT + 1)
    counts = await wait_terminal(env.pool, [small, large], timeout_s=BUDGET_MS / 1000 + 30,
                                 worker=env.saga)  # type: ignore[arg-type]
    assert counts == {"completed": 1, "failed": 1}
    assert (await payment_row(env.pool, small)).status == "completed"
    assert (await payment_row(env.pool, large)).failure_reason == "risk_timeout"
    assert await balance(env, payer) == (20_000 - FAIL_OPEN_LIMIT, 0)
    await assert_saga_sound(env.pool)
