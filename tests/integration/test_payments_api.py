"""Payments REST on the real app: auth, ownership, strict money input, idempotency, webhooks."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient

from api import idempotency
from api.app import create_app
from api.problems import Problem
from ops.settings import Settings
from services import payments
from services.gateway import SIGNATURE_HEADER, SimulatedGateway, sign
from tests.helpers.auth import LoggedIn, register_and_login
from tests.integration.test_payments_support import assert_ledger_sound

Client = AsyncTestClient[Litestar]


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[Client]:
    async with AsyncTestClient(app=create_app(settings)) as client:
        yield client


def key() -> dict[str, str]:
    return {"Idempotency-Key": uuid.uuid4().hex}


async def wallet(client: Client, user: LoggedIn, currency: str = "INR") -> str:
    response = await client.post("/api/v1/wallets", json={"currency": currency}, headers=user.headers)
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


async def fund(client: Client, user: LoggedIn, wallet_id: str, amount_minor: int) -> None:
    response = await client.post(f"/api/v1/wallets/{wallet_id}/deposits", headers={**user.headers, **key()},
                                 json={"amount_minor": amount_minor, "currency": "INR"})
    assert response.status_code == 201, response.text


async def balance(client: Client, user: LoggedIn, wallet_id: str) -> dict[str, Any]:
    response = await client.get(f"/api/v1/wallets/{wallet_id}", headers=user.headers)
    assert response.status_code == 200, response.text
    return dict(response.json())


async def counts(pool: asyncpg.Pool) -> tuple[int, int, int]:
    row = await pool.fetchrow("SELECT (SELECT count(*) FROM payments.transactions) AS t, "
                              "(SELECT count(*) FROM payments.deposits) AS d, (SELECT count(*) FROM payments.outbox) AS o")
    return row["t"], row["d"], row["o"]


# ------------------------------------------------------------------------------ wallets

async def test_wallet_lifecycle_and_ownership(client: Client) -> None:
    alice = await register_and_login(client)
    bob = await register_and_login(client)
    support = await register_and_login(client, roles=("support",))
    wallet_id = await wallet(client, alice)
    again = await client.post("/api/v1/wallets", json={"currency": "INR"}, headers=alice.headers)
    assert again.status_code == 409 and again.json()["wallet_id"] == wallet_id
    assert again.headers["content-type"].startswith("application/problem+json")
    body = await balance(client, alice, wallet_id)
    assert (body["currency"], body["exponent"], body["available_minor"], body["owner_id"]) == ("INR", 2, 0, str(alice.user_id))
    assert (await client.get(f"/api/v1/wallets/{wallet_id}", headers=bob.headers)).status_code == 404
    assert (await client.get(f"/api/v1/wallets/{uuid.uuid4()}", headers=alice.headers)).status_code == 404
    assert (await client.get(f"/api/v1/wallets/{wallet_id}", headers=support.headers)).status_code == 200
    assert (await client.get(f"/api/v1/wallets/{wallet_id}")).status_code == 401


@pytest.mark.parametrize("body", [{"currency": "BTC"}, {"currency": "inr"}, {}, {"currency": "INR", "x": 1}])
async def test_wallet_bad_input(client: Client, body: dict[str, Any]) -> None:
    alice = await register_and_login(client)
    response = await client.post("/api/v1/wallets", json=body, headers=alice.headers)
    assert response.status_code == 422, response.text
    assert response.headers["content-type"].startswith("application/problem+json")


# ----------------------------------------------------------------------------- deposits

async def test_deposit_is_idempotent_per_key(client: Client, pg_pool: asyncpg.Pool) -> None:
    alice = await register_and_login(client)
    wallet_id = await wallet(client, alice)
    headers = {**alice.headers, "Idempotency-Key": "deposit-1"}
    first = await client.post(f"/api/v1/wallets/{wallet_id}/deposits", headers=headers,
                              json={"amount_minor": 12_345, "currency": "INR"})
    assert first.status_code == 201, first.text
    # Same key, same body (different key order and spacing): the stored response, once.
    replay = await client.post(f"/api/v1/wallets/{wallet_id}/deposits", headers={**headers, "Content-Type": "application/json"},
                               content=b'{ "currency": "INR",  "amount_minor": 12345 }')
    assert replay.status_code == 201 and replay.content == first.content
    assert replay.headers["idempotent-replayed"] == "true"
    changed = await client.post(f"/api/v1/wallets/{wallet_id}/deposits", headers=headers,
                                json={"amount_minor": 999, "currency": "INR"})
    assert changed.status_code == 422 and changed.json()["type"].endswith("/idempotency-key-reused")
    assert (await balance(client, alice, wallet_id))["available_minor"] == 12_345
    assert await pg_pool.fetchval("SELECT count(*) FROM payments.deposits") == 1


@pytest.mark.parametrize(("body", "status", "slug"), [
    ({"amount_minor": 12.5, "currency": "INR"}, 422, "validation-error"),        # over-precision / float
    ({"amount_minor": 100.0, "currency": "INR"}, 422, "validation-error"),       # floats never, even integral
    ({"amount_minor": "100", "currency": "INR"}, 422, "validation-error"),
    ({"amount": "123.45", "currency": "INR"}, 422, "validation-error"),          # decimal strings are not the format
    ({"amount_minor": 0, "currency": "INR"}, 422, "validation-error"),
    ({"amount_minor": -100, "currency": "INR"}, 422, "validation-error"),
    ({"amount_minor": 10**15 + 1, "currency": "INR"}, 422, "validation-error"),
    ({"amount_minor": True, "currency": "INR"}, 422, "validation-error"),
    ({"amount_minor": 100, "currency": "USD"}, 422, "currency-mismatch"),
    ({"amount_minor": 100, "currency": "XYZ"}, 422, "invalid-payment-request"),
])
async def test_deposit_bad_input_is_a_clear_4xx_and_writes_nothing(client: Client, pg_pool: asyncpg.Pool,
                                                                    body: dict[str, Any], status: int, slug: str) -> None:
    alice = await register_and_login(client)
    wallet_id = await wallet(client, alice)
    before = await counts(pg_pool)
    response = await client.post(f"/api/v1/wallets/{wallet_id}/deposits", headers={**alice.headers, **key()}, json=body)
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.json()["type"].endswith("/" + slug)
    assert await counts(pg_pool) == before
    assert await pg_pool.fetchval("SELECT count(*) FROM payments.idempotency_keys") == 0


async def test_deposit_into_another_users_wallet_is_404(client: Client, pg_pool: asyncpg.Pool) -> None:
    alice = await register_and_login(client)
    bob = await register_and_login(client)
    wallet_id = await wallet(client, alice)
    response = await client.post(f"/api/v1/wallets/{wallet_id}/deposits", headers={**bob.headers, **key()},
                                 json={"amount_minor": 100, "currency": "INR"})
    assert response.status_code == 404
    assert await pg_pool.fetchval("SELECT count(*) FROM payments.deposits") == 0


async def test_money_moving_post_requires_idempotency_key(client: Client) -> None:
    alice = await register_and_login(client)
    wallet_id = await wallet(client, alice)
    response = await client.post(f"/api/v1/wallets/{wallet_id}/deposits", headers=alice.headers,
                                 json={"amount_minor": 100, "currency": "INR"})
    assert response.status_code == 400 and response.json()["type"].endswith("/idempotency-key-required")
    bad = await client.post(f"/api/v1/wallets/{wallet_id}/deposits", headers={**alice.headers, "Idempotency-Key": "a b"},
                            json={"amount_minor": 100, "currency": "INR"})
    assert bad.status_code == 400


async def test_declined_deposit_is_402_and_credits_nothing(client: Client) -> None:
    alice = await register_and_login(client)
    wallet_id = await wallet(client, alice)
    response = await client.post(f"/api/v1/wallets/{wallet_id}/deposits", headers={**alice.headers, **key()},
                                 json={"amount_minor": 100, "currency": "INR", "payment_method": "sim_card_declined"})
    assert response.status_code == 402 and response.json()["type"].endswith("/payment-declined")
    assert (await balance(client, alice, wallet_id))["available_minor"] == 0


async def test_statement_with_cursor(client: Client) -> None:
    alice = await register_and_login(client)
    bob = await register_and_login(client)
    wallet_id = await wallet(client, alice)
    for amount in (100, 200, 300):
        await fund(client, alice, wallet_id, amount)
    first = await client.get(f"/api/v1/wallets/{wallet_id}/statement?limit=2", headers=alice.headers)
    assert first.status_code == 200
    page = first.json()
    assert [(e["amount_minor"], e["balance_after_minor"]) for e in page["entries"]] == [(300, 600), (200, 300)]
    rest = await client.get(f"/api/v1/wallets/{wallet_id}/statement",
                            params={"limit": 2, "cursor": page["next_cursor"]}, headers=alice.headers)
    assert [e["balance_after_minor"] for e in rest.json()["entries"]] == [100] and rest.json()["next_cursor"] is None
    assert (await client.get(f"/api/v1/wallets/{wallet_id}/statement", headers=bob.headers)).status_code == 404
    assert (await client.get(f"/api/v1/wallets/{wallet_id}/statement?cursor=zzz", headers=alice.headers)).status_code == 422
    assert (await client.get(f"/api/v1/wallets/{wallet_id}/statement?limit=0", headers=alice.headers)).status_code in (400, 422)


# ------------------------------------------------------------------------------ refunds

async def _captured(client: Client, pg_pool: asyncpg.Pool, payer: LoggedIn, payee: LoggedIn, amount_minor: int) -> str:
    payer_wallet = await wallet(client, payer)
    payee_wallet = await wallet(client, payee)
    await fund(client, payer, payer_wallet, amount_minor)
    pid = uuid.uuid4()
    async with pg_pool.acquire() as conn:
        await payments.initiate_payment(conn, payment_id=pid, payer_id=payer.user_id,
                                        from_account_id=uuid.UUID(payer_wallet), to_account_id=uuid.UUID(payee_wallet),
                                        amount_minor=amount_minor, currency="INR")
        await payments.capture_payment(conn, pid)
    return str(pid)


async def test_refunds_by_payee_and_support_capped_at_captured(client: Client, pg_pool: asyncpg.Pool) -> None:
    payer = await register_and_login(client)
    payee = await register_and_login(client)
    stranger = await register_and_login(client)
    support = await register_and_login(client, roles=("support",))
    pid = await _captured(client, pg_pool, payer, payee, 1_000)
    url = f"/api/v1/payments/{pid}/refunds"
    assert (await client.post(url, json={"amount_minor": 100}, headers={**stranger.headers, **key()})).status_code == 404
    assert (await client.post(url, json={"amount_minor": 100}, headers={**payer.headers, **key()})).status_code == 403
    part = await client.post(url, json={"amount_minor": 400, "reason": "damaged"}, headers={**payee.headers, **key()})
    assert part.status_code == 201, part.text
    assert (part.json()["amount_minor"], part.json()["payment_id"]) == (400, pid)
    too_much = await client.post(url, json={"amount_minor": 601}, headers={**support.headers, **key()})
    assert too_much.status_code == 422 and too_much.json()["type"].endswith("/refund-exceeds-captured")
    rest = await client.post(url, headers={**support.headers, **key()})
    assert rest.status_code == 201 and rest.json()["amount_minor"] == 600
    none_left = await client.post(url, json={"amount_minor": 1}, headers={**payee.headers, **key()})
    assert none_left.status_code == 422
    unknown = await client.post(f"/api/v1/payments/{uuid.uuid4()}/refunds", headers={**payee.headers, **key()})
    assert unknown.status_code == 404
    async with pg_pool.acquire() as conn:
        assert (await payments.get_payment(conn, uuid.UUID(pid))).refunded_minor == 1_000
        await assert_ledger_sound(conn)


# ------------------------------------------------------------------------------ payouts

async def test_payouts_paid_failed_and_refused(client: Client, pg_pool: asyncpg.Pool) -> None:
    alice = await register_and_login(client)
    bob = await register_and_login(client)
    wallet_id = await wallet(client, alice)
    await fund(client, alice, wallet_id, 10_000)
    paid = await client.post("/api/v1/payouts", headers={**alice.headers, **key()},
                             json={"wallet_id": wallet_id, "amount_minor": 3_000, "currency": "INR", "destination": "acct_1"})
    assert paid.status_code == 201 and paid.json()["status"] == "paid"
    failed = await client.post("/api/v1/payouts", headers={**alice.headers, **key()},
                               json={"wallet_id": wallet_id, "amount_minor": 3_000, "currency": "INR",
                                     "destination": "sim_bank_fail"})
    assert failed.status_code == 201 and failed.json()["status"] == "failed"
    too_much = await client.post("/api/v1/payouts", headers={**alice.headers, **key()},
                                 json={"wallet_id": wallet_id, "amount_minor": 7_001, "currency": "INR", "destination": "a"})
    assert too_much.status_code == 409 and too_much.json()["type"].endswith("/insufficient-funds")
    foreign = await client.post("/api/v1/payouts", headers={**bob.headers, **key()},
                                json={"wallet_id": wallet_id, "amount_minor": 1, "currency": "INR", "destination": "a"})
    assert foreign.status_code == 404
    assert (await balance(client, alice, wallet_id))["available_minor"] == 7_000
    async with pg_pool.acquire() as conn:
        await assert_ledger_sound(conn)


# ------------------------------------------------------------------------------- escrow

async def test_escrow_release_and_refund_rules(client: Client, pg_pool: asyncpg.Pool) -> None:
    buyer = await register_and_login(client)
    seller = await register_and_login(client)
    stranger = await register_and_login(client)
    buyer_wallet, seller_wallet = await wallet(client, buyer), await wallet(client, seller)
    await fund(client, buyer, buyer_wallet, 10_000)
    body = {"from_wallet": buyer_wallet, "to_wallet": seller_wallet, "amount_minor": 4_000, "currency": "INR",
            "release_condition": "documents verified"}
    same = await client.post("/api/v1/escrow", headers={**buyer.headers, **key()}, json={**body, "to_wallet": buyer_wallet})
    assert same.status_code == 422 and same.json()["type"].endswith("/same-account")
    stolen = await client.post("/api/v1/escrow", headers={**stranger.headers, **key()}, json=body)
    assert stolen.status_code == 404
    first = await client.post("/api/v1/escrow", headers={**buyer.headers, **key()}, json=body)
    second = await client.post("/api/v1/escrow", headers={**buyer.headers, **key()}, json=body)
    assert first.status_code == second.status_code == 201
    one, two = first.json()["id"], second.json()["id"]
    assert (await client.get(f"/api/v1/escrow/{one}", headers=stranger.headers)).status_code == 404
    assert (await client.get(f"/api/v1/escrow/{one}", headers=seller.headers)).status_code == 200
    assert (await client.post(f"/api/v1/escrow/{one}/release", headers={**seller.headers, **key()})).status_code == 403
    released = await client.post(f"/api/v1/escrow/{one}/release", headers={**buyer.headers, **key()})
    assert released.status_code == 200 and released.json()["status"] == "released"
    assert (await client.post(f"/api/v1/escrow/{one}/refund", headers={**seller.headers, **key()})).status_code == 409
    refunded = await client.post(f"/api/v1/escrow/{two}/refund", headers={**seller.headers, **key()})
    assert refunded.status_code == 200 and refunded.json()["status"] == "refunded"
    assert (await balance(client, buyer, buyer_wallet))["available_minor"] == 6_000
    assert (await balance(client, seller, seller_wallet))["available_minor"] == 4_000
    async with pg_pool.acquire() as conn:
        await assert_ledger_sound(conn)


# ------------------------------------------------------------------------ trial balance

async def test_trial_balance_for_auditors_only(client: Client) -> None:
    alice = await register_and_login(client)
    auditor = await register_and_login(client, roles=("auditor",))
    wallet_id = await wallet(client, alice)
    await fund(client, alice, wallet_id, 5_000)
    assert (await client.get("/api/v1/ledger/trial-balance", headers=alice.headers)).status_code == 403
    response = await client.get("/api/v1/ledger/trial-balance", headers=auditor.headers)
    assert response.status_code == 200
    assert response.json() == {"balanced": True, "currencies": [
        {"currency": "INR", "debits_minor": 5_000, "credits_minor": 5_000, "transactions": 1, "balanced": True}]}


# ----------------------------------------------------------------------------- webhooks

async def test_webhook_settles_async_deposit_once_and_rejects_forgeries(client: Client, settings: Settings) -> None:
    gateway = SimulatedGateway(settings.gateway_webhook_secret, settle="webhook")
    client.app.state.payment_gateway = gateway
    alice = await register_and_login(client)
    wallet_id = await wallet(client, alice)
    pending = await client.post(f"/api/v1/wallets/{wallet_id}/deposits", headers={**alice.headers, **key()},
                                json={"amount_minor": 2_000, "currency": "INR"})
    assert pending.status_code == 202 and pending.json()["status"] == "pending"
    (hook,) = gateway.take_webhooks()
    url = "/api/v1/gateway/webhooks"
    forged = await client.post(url, content=hook.body, headers={SIGNATURE_HEADER: sign("not-the-secret", hook.body, int(time.time()))})
    assert forged.status_code == 400 and forged.json()["type"].endswith("/webhook-bad-signature")
    stale = await client.post(url, content=hook.body,
                              headers={SIGNATURE_HEADER: sign(settings.gateway_webhook_secret, hook.body, int(time.time()) - 3600)})
    assert stale.status_code == 400 and stale.json()["type"].endswith("/webhook-stale")
    assert (await balance(client, alice, wallet_id))["available_minor"] == 0
    applied = await client.post(url, content=hook.body, headers=hook.headers)  # public: no bearer token
    replayed = await client.post(url, content=hook.body, headers=hook.headers)
    assert (applied.status_code, applied.json()) == (200, {"status": "applied"})
    assert (replayed.status_code, replayed.json()) == (200, {"status": "duplicate"})
    assert (await balance(client, alice, wallet_id))["available_minor"] == 2_000


# -------------------------------------------------------------------------- idempotency

async def test_key_in_flight_is_409_then_replays(pg_pool: asyncpg.Pool) -> None:
    owner = uuid.uuid4()
    scope = idempotency.Scope("payments.idempotency_keys", owner, "POST /x", "k1",
                              idempotency.request_hash("POST", "/x", b'{"a":1}'))
    started, release = asyncio.Event(), asyncio.Event()
    effects: list[uuid.UUID] = []

    async def slow(effect_id: uuid.UUID) -> tuple[int, dict[str, str]]:
        started.set()
        await release.wait()
        effects.append(effect_id)
        return 201, {"id": str(effect_id)}

    first = asyncio.create_task(idempotency.run(pg_pool, scope, slow))
    await started.wait()
    with pytest.raises(Problem) as err:
        await idempotency.run(pg_pool, scope, slow)
    assert err.value.status_code == 409 and err.value.headers and "Retry-After" in err.value.headers
    release.set()
    response = await first
    replay = await idempotency.run(pg_pool, scope, slow)
    assert replay.content == response.content and replay.headers[idempotency.REPLAYED_HEADER] == "true"
    assert effects == [scope.effect_id]
    expires = await pg_pool.fetchval("SELECT expires_at - created_at FROM payments.idempotency_keys")
    assert expires.total_seconds() >= 24 * 3600


async def test_failed_work_releases_the_key_and_lapsed_locks_can_be_retried(pg_pool: asyncpg.Pool) -> None:
    scope = idempotency.Scope("payments.idempotency_keys", uuid.uuid4(), "POST /y", "k2", b"h" * 32)

    async def boom(_: uuid.UUID) -> tuple[int, dict[str, str]]:
        raise payments.InsufficientFunds("no")

    with pytest.raises(payments.InsufficientFunds):
        await idempotency.run(pg_pool, scope, boom)
    assert await pg_pool.fetchval("SELECT count(*) FROM payments.idempotency_keys") == 0

    async def ok(effect_id: uuid.UUID) -> tuple[int, dict[str, str]]:
        return 201, {"id": str(effect_id)}

    # A holder that died mid-flight: its lock lapsed, so the same request may run again
    # (and finds its effect by the same effect_id).
    await pg_pool.execute("INSERT INTO payments.idempotency_keys (owner_id, route, key, request_hash, effect_id, "
                          "status, lock_token, locked_until, expires_at) VALUES ($1, $2, $3, $4, $5, 'in_flight', "
                          "gen_random_uuid(), now() - interval '1 second', now() + interval '1 day')",
                          scope.owner_id, scope.route, scope.key, scope.request_hash, scope.effect_id)
    response = await idempotency.run(pg_pool, scope, ok)
    assert response.status_code == 201
    assert await pg_pool.fetchval("SELECT status FROM payments.idempotency_keys") == "done"
    assert await idempotency.purge_expired(pg_pool, "payments.idempotency_keys") == 0
