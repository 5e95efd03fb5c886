"""The payment saga end to end on the real broker, database and Redis: REST and Kafka in,
the pass-through scorer, the WebSocket pushes, the hot projection, `fintide reconcile`.

One worker (a child process, as `fintide worker` runs it) serves the module.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from uuid import UUID

import asyncpg
import pytest
import websockets

from ops.embedded import EmbeddedStack
from services import payments
from services.payments import TransferRequest
from streams.fraud import REQUESTS, requests_of
from streams.payments import (
    PAYMENTS,
    PaymentEventBatch,
    PaymentRequested,
)
from streams.publisher import EventPublisher
from streams.topics import partition_for_key
from tests.helpers.api import served
from tests.helpers.auth import register_and_login
from tests.helpers.workers import metric, wait_for
from tests.integration.test_payments_saga_support import (
    REPO,
    SagaEnv,
    assert_projection_matches,
    assert_saga_sound,
    key,
    read_topic,
    saga_env,
    wait_terminal,
    wallets,
)
from tests.integration.test_payments_support import funded_wallet

Env = SagaEnv


@pytest.fixture(scope="module")
async def env(stack: EmbeddedStack, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[SagaEnv]:
    # A generous budget: these tests are about the happy paths, not timeouts.
    async with saga_env(stack, tmp_path_factory.mktemp("saga"), fraud_budget_ms=60_000) as state:
        yield state


async def api_wallet(client: object, user: object, amount_minor: int) -> str:
    response = await client.post("/api/v1/wallets", json={"currency": "INR"}, headers=user.headers)  # type: ignore[attr-defined]
    assert response.status_code == 201, response.text
    wallet_id = response.json()["id"]
    if amount_minor:
        deposit = await client.post(f"/api/v1/wallets/{wallet_id}/deposits", headers={**user.headers, **key()},  # type: ignore[attr-defined]
                                    json={"amount_minor": amount_minor, "currency": "INR"})
        assert deposit.status_code == 201, deposit.text
    return str(wallet_id)


async def next_status(ws: websockets.ClientConnection) -> dict[str, object]:
    async with asyncio.timeout(30):
        frame = json.loads(await ws.recv())
    assert frame["type"] == "payment.status", frame
    return dict(frame)


async def test_rest_payment_runs_the_saga_and_pushes_every_step(env: Env) -> None:
    async with served(env.settings) as client:
        payer, payee = await register_and_login(client), await register_and_login(client)
        source, target = await api_wallet(client, payer, 10_000), await api_wallet(client, payee, 0)
        env.accounts |= {UUID(source), UUID(target)}
        body = {"from_wallet": source, "to_wallet": target, "amount_minor": 2_500, "currency": "INR",
                "description": "lesson 4"}
        headers = {**payer.headers, **key(), "X-Device-Id": "device-7", "X-Country": "in"}
        async with websockets.connect(f"{client.ws_url}/ws/payments?token={payer.access_token}") as ws:  # type: ignore[attr-defined]
            assert json.loads(await ws.recv()) == {"type": "subscribed"}
            accepted = await client.post("/api/v1/payments", json=body, headers=headers)
            assert accepted.status_code == 202, accepted.text
            payment_id = accepted.json()["id"]
            assert accepted.json()["status"] == "funds_reserved"
            frames = [await next_status(ws)]
            while frames[-1]["status"] != "completed":
                frames.append(await next_status(ws))
        assert [f["status"] for f in frames] == ["initiated", "funds_reserved", "risk_assessed", "posted", "completed"]
        assert {f["payment_id"] for f in frames} == {payment_id}
        # The same key and body replays the first answer and starts nothing new.
        replay = await client.post("/api/v1/payments", json=body, headers=headers)
        assert replay.status_code == 202 and replay.json() == accepted.json()
        assert replay.headers["Idempotent-Replayed"] == "true"
        # The same key with another request is refused and starts nothing (balances below).
        reused = await client.post("/api/v1/payments", json={**body, "amount_minor": 2_501}, headers=headers)
        assert reused.status_code == 422 and reused.json()["type"].endswith("/idempotency-key-reused")
        seen = await client.get(f"/api/v1/payments/{payment_id}", headers=payer.headers)
        assert seen.status_code == 200
        payment = seen.json()
        assert payment["status"] == "completed" and payment["captured_minor"] == 2_500
        assert payment["failure_reason"] is None and payment["description"] == "lesson 4"
        assert [h["status"] for h in payment["history"]] == [
            "initiated", "funds_reserved", "risk_assessed", "posted", "completed"]
        assert "passthrough" in payment["history"][2]["detail"]
        balances = [(await client.get(f"/api/v1/wallets/{w}", headers=u.headers)).json()
                    for w, u in ((source, payer), (target, payee))]
        assert [(b["posted_minor"], b["reserved_minor"]) for b in balances] == [(7_500, 0), (2_500, 0)]
    # The fraud step saw what the client sent with the request.
    # The saga sends fraud.score_batch messages: read their requests.
    requests = await read_topic(env.settings, REQUESTS,
                                lambda vs: any(r.payment_id == payment_id for v in vs for r in requests_of(v)))
    asked = next(r for v in requests for r in requests_of(v) if r.payment_id == payment_id)
    assert (asked.device_id, asked.country, asked.ip, asked.amount_minor) == ("device-7", "IN", "127.0.0.1", 2_500)
    assert (asked.payer_wallet_id, asked.payee_wallet_id, asked.payer_user_id) == (source, target, str(payer.user_id))
    await assert_saga_sound(env.pool)


async def test_rest_payment_refusals_and_visibility(env: Env) -> None:
    async with served(env.settings) as client:
        payer, other = await register_and_login(client), await register_and_login(client)
        support = await register_and_login(client, roles=("support",))
        source, target = await api_wallet(client, payer, 1_000), await api_wallet(client, other, 0)
        env.accounts |= {UUID(source), UUID(target)}

        async def pay(amount: int, headers: dict[str, str] | None = None, **extra: object) -> object:
            return await client.post("/api/v1/payments", headers={**payer.headers, **key(), **(headers or {})},
                                     json={"from_wallet": source, "to_wallet": target, "amount_minor": amount,
                                           "currency": "INR", **extra})

        # Bad input: a clear problem, nothing written.
        before = await env.pool.fetchval("SELECT count(*) FROM payments.payments")
        for response, status in [(await pay(0), 422), (await pay(10.0), 422), (await pay(5, currency="USD"), 422),
                                 (await pay(5, to_wallet=source), 422), (await pay(5, to_wallet=str(uuid.uuid4())), 404),
                                 (await pay(5, {"X-Country": "India"}), 422)]:
            assert response.status_code == status, response.text  # type: ignore[attr-defined]
            assert response.headers["content-type"].startswith("application/problem+json")  # type: ignore[attr-defined]
        assert await env.pool.fetchval("SELECT count(*) FROM payments.payments") == before
        missing_key = await client.post("/api/v1/payments", headers=payer.headers,
                                        json={"from_wallet": source, "to_wallet": target, "amount_minor": 5,
                                              "currency": "INR"})
        assert missing_key.status_code == 400
        # Paying from someone else's wallet is "not found".
        stolen = await client.post("/api/v1/payments", headers={**other.headers, **key()},
                                   json={"from_wallet": source, "to_wallet": target, "amount_minor": 5,
                                         "currency": "INR"})
        assert stolen.status_code == 404
        # Too little money is not bad input: the payment exists and failed, nothing reserved.
        poor = await pay(1_001)
        assert poor.status_code == 202 and poor.json()["status"] == "failed"  # type: ignore[attr-defined]
        poor_id = poor.json()["id"]  # type: ignore[attr-defined]
        seen = (await client.get(f"/api/v1/payments/{poor_id}", headers=payer.headers)).json()
        assert seen["failure_reason"] == "insufficient_funds"
        assert [h["status"] for h in seen["history"]] == ["initiated", "failed"]
        # Only the payer and staff see a payment.
        assert (await client.get(f"/api/v1/payments/{poor_id}", headers=other.headers)).status_code == 404
        assert (await client.get(f"/api/v1/payments/{poor_id}", headers=support.headers)).status_code == 200
        assert (await client.get(f"/api/v1/payments/{uuid.uuid4()}", headers=payer.headers)).status_code == 404
        wallet = (await client.get(f"/api/v1/wallets/{source}", headers=payer.headers)).json()
        assert (wallet["posted_minor"], wallet["reserved_minor"]) == (1_000, 0)
        async with websockets.connect(f"{client.ws_url}/ws/payments?token=not-a-token") as ws:  # type: ignore[attr-defined]
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await ws.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4401
    await assert_saga_sound(env.pool)


async def test_payment_pushes_reach_only_the_payers_own_socket(env: Env) -> None:
    async with served(env.settings) as client:
        alice, bob, payee = [await register_and_login(client) for _ in range(3)]
        target = await api_wallet(client, payee, 0)
        sources = {u.user_id: await api_wallet(client, u, 5_000) for u in (alice, bob)}
        env.accounts |= {UUID(target), *(UUID(w) for w in sources.values())}

        async def pay(user: object) -> str:
            response = await client.post("/api/v1/payments", headers={**user.headers, **key()},  # type: ignore[attr-defined]
                                         json={"from_wallet": sources[user.user_id], "to_wallet": target,  # type: ignore[attr-defined]
                                               "amount_minor": 900, "currency": "INR", "description": "x"})
            assert response.status_code == 202, response.text
            return str(response.json()["id"])

        async def until_completed(ws: websockets.ClientConnection) -> list[dict[str, object]]:
            frames = [await next_status(ws)]
            while frames[-1]["status"] != "completed":
                frames.append(await next_status(ws))
            return frames

        ws_url = f"{client.ws_url}/ws/payments?token="  # type: ignore[attr-defined]
        async with websockets.connect(ws_url + alice.access_token) as alice_ws, \
                websockets.connect(ws_url + bob.access_token) as bob_ws:
            for ws in (alice_ws, bob_ws):
                assert json.loads(await ws.recv()) == {"type": "subscribed"}
            # Bob's whole saga is pushed while Alice's socket is open: had any of it leaked
            # there, it would arrive on her socket before her own payment's frames.
            bobs = await pay(bob)
            assert {f["payment_id"] for f in await until_completed(bob_ws)} == {bobs}
            alices = await pay(alice)
            assert {f["payment_id"] for f in await until_completed(alice_ws)} == {alices}
    await assert_saga_sound(env.pool)


async def test_kafka_in_requests_complete_once_and_bad_ones_are_dead_lettered(env: Env) -> None:
    payers = await wallets(env.pool, [5_000] * 6)
    payees = await wallets(env.pool, [0] * 6)
    env.accounts |= {w.id for w in payers + payees}

    def request(i: int, amount: int = 700) -> PaymentRequested:
        payer, payee = payers[i % 6], payees[(i + 1) % 6]
        assert payer.owner_id is not None
        return PaymentRequested(payment_id=uuid.uuid4(), payer_user_id=payer.owner_id, payer_wallet_id=payer.id,
                                payee_wallet_id=payee.id, amount_minor=amount, currency="INR")

    good = [request(i) for i in range(42)]  # 7 per payer: 4,900 of each payer's 5,000
    # A client that batches puts one partition's requests in one message.
    n = env.settings.topic_partitions
    by_partition: dict[int, list[PaymentRequested]] = {}
    for r in good[:30]:
        by_partition.setdefault(partition_for_key(str(r.payer_wallet_id), n), []).append(r)
    unknown = PaymentRequested(payment_id=uuid.uuid4(), payer_user_id=uuid.uuid4(), payer_wallet_id=payers[0].id,
                               payee_wallet_id=uuid.uuid4(), amount_minor=10, currency="INR")
    async with EventPublisher(env.settings) as publisher:
        await publisher.publish_many(PAYMENTS.name, [
            (None, PaymentEventBatch(payer_wallet_id=rs[0].payer_wallet_id, events=list(rs)))
            for rs in by_partition.values()])
        await publisher.publish_many(PAYMENTS.name, [(None, r) for r in good[30:]])
        await publisher.publish_many(PAYMENTS.name, [(None, good[0]), (None, unknown), (None, good[5])])
    counts = await wait_terminal(env.pool, [r.payment_id for r in good], worker=env.worker)
    assert counts == {"completed": 42}

    async def timed() -> bool:  # each saga's initiation-to-end time, as the dashboard charts it
        return await metric(env.worker, "fintide_payment_latency_seconds_count", {"outcome": "completed"}) >= 42

    await wait_for(timed, 30, "42 completed payments in fintide_payment_latency_seconds")
    assert await env.pool.fetchval("SELECT count(*) FROM payments.payments WHERE id = $1", unknown.payment_id) == 0
    letters = await read_topic(env.settings, PAYMENTS, lambda vs: len(vs) >= 1, dead_letters=True)
    assert [(v.agent, str(unknown.payment_id) in v.value, "unknown_account" in v.error) for v in letters] == [
        ("payments.saga", True, True)]
    for p in payers:
        row = await env.pool.fetchrow("SELECT posted_minor, reserved_minor FROM payments.balances WHERE account_id = $1",
                                      p.id)
        assert (row["posted_minor"], row["reserved_minor"]) == (5_000 - 7 * 700, 0)
    await assert_saga_sound(env.pool)


async def test_hot_projection_equals_postgres(env: Env) -> None:
    assert env.accounts, "runs after the tests that move money"
    await assert_projection_matches(env.worker, env.pool, env.accounts)


async def test_fintide_reconcile_reads_the_payments_dsn_and_fails_on_a_difference(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        a = await funded_wallet(conn, 1_000)
        b = await funded_wallet(conn, 0)
        await payments.transfer(conn, TransferRequest(id=uuid.uuid4(), from_account_id=a.id, to_account_id=b.id,
                                                      amount_minor=300, currency="INR"))

        def reconcile() -> subprocess.CompletedProcess[str]:
            # The main DSN points nowhere: only FINTIDE_DATABASE_URL_PAYMENTS can be used.
            env = {**{k: v for k, v in os.environ.items() if not k.startswith("FINTIDE_")},
                   "FINTIDE_DATABASE_URL": "postgresql://nobody@127.0.0.1:9/none",
                   "FINTIDE_DATABASE_URL_PAYMENTS": database_url}
            return subprocess.run([sys.executable, "-m", "ops.cli", "reconcile"], cwd=REPO, env=env,
                                   capture_output=True, text=True, timeout=60)

        agreed = reconcile()
        assert agreed.returncode == 0 and "agree" in agreed.stdout, agreed.stdout + agreed.stderr
        await conn.execute("UPDATE payments.balances SET posted_minor = posted_minor + 1 WHERE account_id = $1", b.id)
        differs = reconcile()
        assert differs.returncode == 1 and "balance.posted" in differs.stdout, differs.stdout + differs.stderr
    finally:
        await conn.close()


def test_the_http_gateway_is_used_when_a_gateway_url_is_set() -> None:
    from litestar.datastructures import State

    from api.payments import gateway_of
    from ops.settings import load_settings
    from services.gateway import HttpGateway, SimulatedGateway

    real = State({"settings": load_settings(environ={}, env="test", gateway_url="http://127.0.0.1:9",
                                            gateway_api_key="sk_test_123")})
    assert isinstance(gateway_of(real), HttpGateway) and gateway_of(real) is gateway_of(real)
    assert isinstance(gateway_of(State({"settings": load_settings(environ={}, env="test")})), SimulatedGateway)
    with pytest.raises(ValueError, match="GATEWAY_API_KEY"):
        load_settings(environ={}, env="test", gateway_url="http://127.0.0.1:9")
    assert load_settings(environ={}, env="test", gateway_api_key="sk_test_123").redacted()["gateway_api_key"] == "***"
