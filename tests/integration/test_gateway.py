"""Gateways: signature verification, the simulator, and the Stripe-style HTTP adapter against a
fake gateway served over real HTTP on 127.0.0.1 (started here), all applied to the real ledger."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import msgspec
import pytest
from aiohttp import web

from services import payments
from services.gateway import (
    SIGNATURE_HEADER,
    GatewayError,
    GatewayRejected,
    HttpGateway,
    SimulatedGateway,
    WebhookError,
    sign,
    verify_signature,
)
from tests.integration.test_payments_support import assert_ledger_sound, available

SECRET = "whsec_test_secret"


# ---------------------------------------------------------------------------- signatures

def test_signature_round_trip_and_rotation() -> None:
    body = b'{"id":"evt_1"}'
    header = sign(SECRET, body, 1_700_000_000)
    assert verify_signature([SECRET], header, body, now_s=1_700_000_100) == 1_700_000_000
    # During rotation the old and new secrets are both accepted.
    assert verify_signature(["new-secret", SECRET], header, body, now_s=1_700_000_000) == 1_700_000_000
    both = f"{header},v1={sign('new-secret', body, 1_700_000_000).split('v1=')[1]}"
    assert verify_signature(["new-secret"], both, body, now_s=1_700_000_000) == 1_700_000_000


@pytest.mark.parametrize(("header", "body", "now_s", "reason"), [
    (sign(SECRET, b"{}", 1_000_000), b'{"x":1}', 1_000_000, "bad_signature"),        # tampered body
    (sign("other", b"{}", 1_000_000), b"{}", 1_000_000, "bad_signature"),             # wrong secret
    (sign(SECRET, b"{}", 1_000_000), b"{}", 1_000_301, "stale"),                      # too old
    (sign(SECRET, b"{}", 1_000_000), b"{}", 999_699, "stale"),                        # from the future
    ("v1=abc", b"{}", 1_000_000, "bad_signature"),                                    # no timestamp
    ("t=1000000", b"{}", 1_000_000, "bad_signature"),                                 # no signature
    ("", b"{}", 1_000_000, "bad_signature"),
    (None, b"{}", 1_000_000, "bad_signature"),
    (sign(SECRET, b"x" * 70_000, 1_000_000), b"x" * 70_000, 1_000_000, "too_large"),
])
def test_signature_rejections(header: str | None, body: bytes, now_s: int, reason: str) -> None:
    with pytest.raises(WebhookError) as err:
        verify_signature([SECRET], header, body, now_s=now_s)
    assert err.value.reason == reason


# ----------------------------------------------------------------------------- simulator

async def _wallet(conn: asyncpg.Connection, currency: str = "INR") -> payments.Account:
    return await payments.open_wallet(conn, uuid.uuid4(), currency)


async def test_simulator_immediate_deposit_and_decline(pg_pool: asyncpg.Pool) -> None:
    gateway = SimulatedGateway(SECRET)
    async with pg_pool.acquire() as conn:
        wallet = await _wallet(conn)
    deposit_id = uuid.uuid4()
    kwargs = {"owner_id": wallet.owner_id, "wallet_id": wallet.id, "amount_minor": 5_000, "currency": "INR"}
    done = await payments.deposit_via_gateway(pg_pool, gateway, deposit_id=deposit_id, payment_method="sim_card_ok", **kwargs)
    again = await payments.deposit_via_gateway(pg_pool, gateway, deposit_id=deposit_id, payment_method="sim_card_ok", **kwargs)
    assert done.status == again.status == "succeeded" and done.gateway_ref == f"sim_pi_{deposit_id.hex}"
    declined_id = uuid.uuid4()
    with pytest.raises(payments.DepositDeclined):
        await payments.deposit_via_gateway(pg_pool, gateway, deposit_id=declined_id, payment_method="sim_card_declined", **kwargs)
    async with pg_pool.acquire() as conn:
        assert await available(conn, wallet.id) == 5_000
        assert (await conn.fetchval("SELECT status FROM payments.deposits WHERE id = $1", declined_id)) == "failed"
        await assert_ledger_sound(conn)


async def test_simulator_webhook_settlement_applies_once(pg_pool: asyncpg.Pool) -> None:
    gateway = SimulatedGateway(SECRET, settle="webhook")
    async with pg_pool.acquire() as conn:
        wallet = await _wallet(conn)
    deposit = await payments.deposit_via_gateway(pg_pool, gateway, deposit_id=uuid.uuid4(), owner_id=wallet.owner_id,
                                                 wallet_id=wallet.id, amount_minor=700, currency="INR",
                                                 payment_method="sim_card_ok")
    assert deposit.status == "pending" and deposit.gateway_ref is not None
    (hook,) = gateway.take_webhooks()
    event = gateway.verify_webhook(hook.headers, hook.body)
    async with pg_pool.acquire() as conn:
        assert await available(conn, wallet.id) == 0
        assert await payments.apply_gateway_event(conn, gateway.name, event) == "applied"
        assert await payments.apply_gateway_event(conn, gateway.name, event) == "duplicate"
        assert await available(conn, wallet.id) == 700
        await assert_ledger_sound(conn)


async def test_simulator_payouts_pay_or_reverse(pg_pool: asyncpg.Pool) -> None:
    gateway = SimulatedGateway(SECRET)
    async with pg_pool.acquire() as conn:
        wallet = await _wallet(conn)
    await payments.deposit_via_gateway(pg_pool, gateway, deposit_id=uuid.uuid4(), owner_id=wallet.owner_id,
                                       wallet_id=wallet.id, amount_minor=10_000, currency="INR", payment_method="x")
    paid = await payments.payout_via_gateway(pg_pool, gateway, payout_id=uuid.uuid4(), owner_id=wallet.owner_id,
                                             wallet_id=wallet.id, amount_minor=3_000, currency="INR", destination="acct_1")
    failed = await payments.payout_via_gateway(pg_pool, gateway, payout_id=uuid.uuid4(), owner_id=wallet.owner_id,
                                               wallet_id=wallet.id, amount_minor=3_000, currency="INR",
                                               destination="sim_bank_fail")
    assert (paid.status, failed.status, failed.failure_reason) == ("paid", "failed", "account_closed")
    async with pg_pool.acquire() as conn:
        assert await available(conn, wallet.id) == 7_000
        await assert_ledger_sound(conn)


def test_simulator_webhooks_expire_outside_tolerance() -> None:
    now = [1_000_000.0]
    gateway = SimulatedGateway(SECRET, settle="webhook", clock=lambda: now[0])
    import asyncio
    asyncio.run(gateway.create_deposit_intent(intent_id=uuid.uuid4(), amount_minor=1, currency="INR", payment_method="m"))
    (hook,) = gateway.take_webhooks()
    now[0] += 301
    with pytest.raises(WebhookError) as err:
        gateway.verify_webhook(hook.headers, hook.body)
    assert err.value.reason == "stale"


# --------------------------------------------------------------- fake Stripe-style server

@dataclass
class FakeGateway:
    """Just enough of a Stripe-style API: intents, capture, payouts, idempotency, webhooks."""

    api_key: str = "sk_test_fake"
    fail_next: int = 0  # answer this many requests with 500 first
    responses: dict[str, dict[str, Any]] = field(default_factory=dict)  # by Idempotency-Key
    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    events: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    seq: int = 0

    def _event(self, kind: str, obj: dict[str, Any]) -> None:
        self.seq += 1
        now_s = int(time.time())
        body = msgspec.json.encode({"id": f"evt_{self.seq}", "type": kind, "created": now_s, "data": {"object": obj}})
        self.events.append(({"Stripe-Signature": sign(SECRET, body, now_s)}, body))

    async def handle(self, request: web.Request) -> web.Response:
        form = dict(await request.post())
        key = request.headers.get("Idempotency-Key", "")
        self.requests.append((request.path, key, {k: str(v) for k, v in form.items()}))
        if request.headers.get("Authorization") != f"Bearer {self.api_key}":
            return web.json_response({"error": {"message": "bad key"}}, status=401)
        if self.fail_next > 0:
            self.fail_next -= 1
            return web.json_response({"error": {"message": "try again"}}, status=500)
        if key in self.responses:
            return web.json_response(self.responses[key])
        body = self._create(request.path, {k: str(v) for k, v in form.items()})
        if body is None:
            return web.json_response({"error": {"message": "bad request"}}, status=400)
        self.responses[key] = body
        return web.json_response(body)

    def _create(self, path: str, form: dict[str, str]) -> dict[str, Any] | None:
        meta = {"fintide_id": form.get("metadata[fintide_id]", "")}
        if path == "/v1/payment_intents":
            if not form.get("amount", "").isdigit():
                return None
            if form.get("payment_method") == "pm_card_chargeDeclined":
                obj = {"id": f"pi_{len(self.responses)}", "status": "requires_payment_method", "metadata": meta,
                       "last_payment_error": {"code": "card_declined"}}
                self._event("payment_intent.payment_failed", obj)
                return obj
            status = "processing" if form.get("payment_method") == "pm_async" else "succeeded"
            obj = {"id": f"pi_{len(self.responses)}", "status": status, "metadata": meta}
            if status == "processing":
                self._event("payment_intent.succeeded", {**obj, "status": "succeeded"})
            return obj
        if path == "/v1/payouts":
            obj = {"id": f"po_{len(self.responses)}", "status": "in_transit", "metadata": meta}
            failing = form.get("destination") == "ba_closed"
            self._event("payout.failed" if failing else "payout.paid",
                        {**obj, "status": "failed" if failing else "paid",
                         **({"failure_code": "account_closed"} if failing else {})})
            return obj
        return None


@pytest.fixture
async def fake_gateway() -> AsyncIterator[tuple[FakeGateway, str]]:
    fake = FakeGateway()
    app = web.Application()
    app.router.add_route("POST", "/{tail:.*}", fake.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield fake, f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def test_http_gateway_deposit_succeeds_over_http(pg_pool: asyncpg.Pool, fake_gateway: tuple[FakeGateway, str]) -> None:
    fake, url = fake_gateway
    gateway = HttpGateway(url, fake.api_key, [SECRET], backoff_s=0.01)
    async with pg_pool.acquire() as conn:
        wallet = await _wallet(conn)
    deposit_id = uuid.uuid4()
    deposit = await payments.deposit_via_gateway(pg_pool, gateway, deposit_id=deposit_id, owner_id=wallet.owner_id,
                                                 wallet_id=wallet.id, amount_minor=2_500, currency="INR",
                                                 payment_method="pm_card_visa")
    assert deposit.status == "succeeded" and deposit.gateway_ref == "pi_0"
    path, key, form = fake.requests[0]
    assert (path, key) == ("/v1/payment_intents", f"deposit-{deposit_id}")
    assert form["amount"] == "2500" and form["currency"] == "inr" and form["metadata[fintide_id]"] == str(deposit_id)
    async with pg_pool.acquire() as conn:
        assert await available(conn, wallet.id) == 2_500
    await gateway.aclose()


async def test_http_gateway_retries_5xx_with_the_same_idempotency_key(pg_pool: asyncpg.Pool,
                                                                       fake_gateway: tuple[FakeGateway, str]) -> None:
    fake, url = fake_gateway
    fake.fail_next = 2
    gateway = HttpGateway(url, fake.api_key, [SECRET], backoff_s=0.01, max_attempts=3)
    intent = await gateway.create_deposit_intent(intent_id=uuid.uuid4(), amount_minor=100, currency="USD",
                                                 payment_method="pm_card_visa")
    assert intent.status == "succeeded"
    assert len(fake.requests) == 3 and len({key for _, key, _ in fake.requests}) == 1
    fake.fail_next = 3
    with pytest.raises(GatewayError):
        await gateway.create_deposit_intent(intent_id=uuid.uuid4(), amount_minor=100, currency="USD", payment_method="m")
    bad_key = HttpGateway(url, "sk_wrong", [SECRET])
    with pytest.raises(GatewayRejected):
        await bad_key.create_deposit_intent(intent_id=uuid.uuid4(), amount_minor=100, currency="USD", payment_method="m")
    await gateway.aclose()
    await bad_key.aclose()


async def test_http_gateway_unreachable_leaves_deposit_pending_and_retry_settles(
        pg_pool: asyncpg.Pool, fake_gateway: tuple[FakeGateway, str]) -> None:
    fake, url = fake_gateway
    async with pg_pool.acquire() as conn:
        wallet = await _wallet(conn)
    deposit_id = uuid.uuid4()
    kwargs = {"deposit_id": deposit_id, "owner_id": wallet.owner_id, "wallet_id": wallet.id, "amount_minor": 900,
              "currency": "INR", "payment_method": "pm_card_visa"}
    down = HttpGateway("http://127.0.0.1:9", fake.api_key, [SECRET], backoff_s=0.01, max_attempts=2, timeout_s=1)
    with pytest.raises(GatewayError):
        await payments.deposit_via_gateway(pg_pool, down, **kwargs)
    async with pg_pool.acquire() as conn:
        assert await conn.fetchval("SELECT status FROM payments.deposits WHERE id = $1", deposit_id) == "pending"
        assert await available(conn, wallet.id) == 0
    up = HttpGateway(url, fake.api_key, [SECRET], name=down.name)
    assert (await payments.deposit_via_gateway(pg_pool, up, **kwargs)).status == "succeeded"
    async with pg_pool.acquire() as conn:
        assert await available(conn, wallet.id) == 900
        await assert_ledger_sound(conn)
    await down.aclose()
    await up.aclose()


async def test_http_gateway_webhooks_settle_async_deposits_and_payouts_once(
        pg_pool: asyncpg.Pool, fake_gateway: tuple[FakeGateway, str]) -> None:
    fake, url = fake_gateway
    gateway = HttpGateway(url, fake.api_key, [SECRET], backoff_s=0.01)
    async with pg_pool.acquire() as conn:
        wallet = await _wallet(conn)
    common = {"owner_id": wallet.owner_id, "wallet_id": wallet.id, "currency": "INR"}
    pending = await payments.deposit_via_gateway(pg_pool, gateway, deposit_id=uuid.uuid4(), amount_minor=10_000,
                                                 payment_method="pm_async", **common)
    assert pending.status == "pending"
    with pytest.raises(payments.DepositDeclined):
        await payments.deposit_via_gateway(pg_pool, gateway, deposit_id=uuid.uuid4(), amount_minor=10_000,
                                           payment_method="pm_card_chargeDeclined", **common)
    async with pg_pool.acquire() as conn:
        for headers, body in list(fake.events):
            await payments.apply_gateway_event(conn, gateway.name, gateway.verify_webhook(headers, body))
        assert await available(conn, wallet.id) == 10_000
    fake.events.clear()
    ok = await payments.payout_via_gateway(pg_pool, gateway, payout_id=uuid.uuid4(), amount_minor=4_000,
                                           destination="ba_ok", **common)
    closed = await payments.payout_via_gateway(pg_pool, gateway, payout_id=uuid.uuid4(), amount_minor=4_000,
                                               destination="ba_closed", **common)
    assert ok.status == closed.status == "pending"
    async with pg_pool.acquire() as conn:
        assert await available(conn, wallet.id) == 2_000
        outcomes = [await payments.apply_gateway_event(conn, gateway.name, gateway.verify_webhook(h, b))
                    for h, b in fake.events * 2]  # every event delivered twice
        assert outcomes == ["applied", "applied", "duplicate", "duplicate"]
        assert await available(conn, wallet.id) == 6_000
        statuses = await conn.fetch("SELECT destination, status, failure_reason FROM payments.payouts ORDER BY destination")
        assert [tuple(r) for r in statuses] == [("ba_closed", "failed", "account_closed"), ("ba_ok", "paid", None)]
        await assert_ledger_sound(conn)
    await gateway.aclose()


async def test_http_gateway_webhook_signature_and_shape_checked(fake_gateway: tuple[FakeGateway, str]) -> None:
    fake, url = fake_gateway
    gateway = HttpGateway(url, fake.api_key, [SECRET])
    body = b'{"id":"evt_9","type":"payout.paid","data":{"object":{"id":"po_9","metadata":{}}}}'
    now_s = int(time.time())
    assert gateway.verify_webhook({"stripe-signature": sign(SECRET, body, now_s)}, body).type == "ignored"
    with pytest.raises(WebhookError):
        gateway.verify_webhook({"Stripe-Signature": sign("wrong", body, now_s)}, body)
    with pytest.raises(WebhookError) as err:
        gateway.verify_webhook({"Stripe-Signature": sign(SECRET, b"[]", now_s)}, b"[]")
    assert err.value.reason == "malformed"
    with pytest.raises(WebhookError):
        gateway.verify_webhook({SIGNATURE_HEADER: sign(SECRET, body, now_s)}, body)  # wrong header name
    await gateway.aclose()
