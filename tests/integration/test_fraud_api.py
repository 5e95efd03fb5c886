"""Fraud REST and WebSocket on a real uvicorn server, PostgreSQL, Redis and Kafka.

Scores and reviews are written with the recorder's own function (db.fraud.record_scores),
as the worker would; the scorer itself runs in tests/integration/test_fraud_pipeline.py.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import asyncpg
import httpx
import pytest
from redis.asyncio import Redis
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from db import fraud as db
from db.engine import create_pool, dsn_for
from ops.embedded import EmbeddedStack
from ops.settings import Settings
from services.fraud import DEFAULT_RULES
from streams.codec import encode
from streams.fraud import FeatureContribution, FraudAlert, alerts_channel
from tests.helpers.auth import LoggedIn, register_and_login
from tests.integration.test_fraud_support import Decisions, module_settings, serve_api

WS_TIMEOUT_S = 10.0


@pytest.fixture(scope="module")
def api_settings(stack: EmbeddedStack, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return module_settings(stack, tmp_path_factory.mktemp("fraud-api"), "fraud_api", redis_db=6)


@pytest.fixture(scope="module")
async def server(api_settings: Settings) -> AsyncIterator[str]:
    async for address in serve_api(api_settings):
        yield address


@pytest.fixture(scope="module")
async def client(server: str, api_settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=f"http://{server}", timeout=20) as c:
        # tests/helpers/auth.py creates the bootstrap admin with the app's settings.
        c.app = SimpleNamespace(state=SimpleNamespace(settings=api_settings))  # type: ignore[attr-defined]
        yield c


@pytest.fixture(scope="module")
async def pool(api_settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    p = await create_pool(dsn_for(api_settings.database_url, "fraud"))
    yield p
    await p.close()


@dataclass(frozen=True)
class Users:
    support: LoggedIn
    auditor: LoggedIn
    admin: LoggedIn
    customer: LoggedIn


@pytest.fixture(scope="module")
async def users(client: httpx.AsyncClient) -> Users:
    return Users(support=await register_and_login(client, roles=("support",)),
                 auditor=await register_and_login(client, roles=("auditor",)),
                 admin=await register_and_login(client, roles=("admin",)),
                 customer=await register_and_login(client))


def score_row(payment_id: str, decision: str, score: int, *, ts: float | None = None,
              rules: list[str] | None = None) -> db.ScoreRow:
    return db.ScoreRow(
        payment_id=payment_id, event_id=str(uuid.uuid4()), payer_wallet_id=f"w-{payment_id}",
        payer_user_id="u-1", payee_wallet_id="w-payee", amount_minor=12_345, currency="INR", score=score,
        decision=decision, rules_fired=rules or [], model_version="lr-test",
        top_features=[{"name": "amount_z", "value": 3.5, "contribution": 2.25}],
        decided_at=db.ms_to_dt(int((ts or time.time()) * 1000)))


def _problem(response: httpx.Response, status: int, slug: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["type"].endswith("/" + slug), body
    return dict(body)


# ------------------------------------------------------------------------------ scores

async def test_score_is_for_analysts_with_rules_and_top_features(client: httpx.AsyncClient, users: Users,
                                                                  pool: asyncpg.Pool) -> None:
    pid = f"p-{uuid.uuid4().hex[:8]}"
    async with pool.acquire() as conn:
        assert await db.record_scores(conn, [score_row(pid, "block", 97, rules=["card-testing"])]) == 1
        # A redelivered decision for the same payment does not replace the first one.
        assert await db.record_scores(conn, [score_row(pid, "allow", 3)]) == 0
    for user in (users.support, users.auditor, users.admin):
        body = (await client.get(f"/api/v1/fraud/scores/{pid}", headers=user.headers)).json()
        assert (body["score"], body["decision"], body["rules_fired"]) == (97, "block", ["card-testing"])
        assert body["top_features"] == [{"name": "amount_z", "value": 3.5, "contribution": 2.25}]
        assert body["review"] is None and body["model_version"] == "lr-test"
    _problem(await client.get(f"/api/v1/fraud/scores/{pid}", headers=users.customer.headers), 403, "forbidden")
    assert (await client.get(f"/api/v1/fraud/scores/{pid}")).status_code == 401
    _problem(await client.get("/api/v1/fraud/scores/nope", headers=users.auditor.headers), 404, "score-not-found")


# ------------------------------------------------------------------------------ reviews

async def test_review_queue_pages_and_decisions_publish_for_the_saga(
        client: httpx.AsyncClient, users: Users, pool: asyncpg.Pool, api_settings: Settings) -> None:
    ids = [f"r-{uuid.uuid4().hex[:8]}" for _ in range(5)]
    async with pool.acquire() as conn:
        await db.record_scores(conn, [score_row(p, "review", 60 + i, ts=time.time() - 100 + i)
                                      for i, p in enumerate(ids)])
    seen: list[str] = []
    cursor = None
    while True:
        params = {"status": "open", "limit": 2, **({"cursor": cursor} if cursor else {})}
        page = (await client.get("/api/v1/fraud/reviews", params=params, headers=users.auditor.headers)).json()
        seen += [r["payment_id"] for r in page["items"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert [p for p in seen if p in ids] == ids  # oldest first, every one once
    open_reviews = {r["payment_id"]: r for r in
                    (await client.get("/api/v1/fraud/reviews?limit=200", headers=users.support.headers)).json()["items"]}
    approve, decline = open_reviews[ids[0]]["id"], open_reviews[ids[1]]["id"]

    async with Decisions(api_settings) as decisions:
        # Auditors read; only support and admins decide.
        _problem(await client.post(f"/api/v1/fraud/reviews/{approve}/decision", json={"decision": "approve"},
                                   headers=users.auditor.headers), 403, "forbidden")
        ok = await client.post(f"/api/v1/fraud/reviews/{approve}/decision",
                               json={"decision": "approve", "note": "known customer"},
                               headers={**users.support.headers, "Idempotency-Key": "k-approve-1"})
        assert ok.status_code == 200, ok.text
        assert (ok.json()["status"], ok.json()["note"], ok.json()["published"]) == ("approved", "known customer", True)
        replay = await client.post(f"/api/v1/fraud/reviews/{approve}/decision",
                                   json={"decision": "approve", "note": "known customer"},
                                   headers={**users.support.headers, "Idempotency-Key": "k-approve-1"})
        assert replay.status_code == 200 and replay.headers.get("idempotent-replayed") == "true"
        again = _problem(await client.post(f"/api/v1/fraud/reviews/{approve}/decision", json={"decision": "decline"},
                                           headers=users.admin.headers), 409, "review-already-decided")
        assert again["review_status"] == "approved"
        declined = await client.post(f"/api/v1/fraud/reviews/{decline}/decision", json={"decision": "decline"},
                                     headers=users.admin.headers)
        assert declined.status_code == 200 and declined.json()["status"] == "declined"
        found = await decisions.collect([ids[0], ids[1]], source="review")
    allow, block = found[ids[0]], found[ids[1]]
    assert (allow.decision, allow.source, allow.review_id, allow.note) == ("allow", "review", approve, "known customer")
    assert allow.reviewer_id == str(users.support.user_id) and allow.payer_wallet_id == f"w-{ids[0]}"
    assert (block.decision, block.source, block.score) == ("block", "review", 61)
    assert allow.top_features == [FeatureContribution("amount_z", 3.5, 2.25)]
    _problem(await client.post(f"/api/v1/fraud/reviews/{uuid.uuid4()}/decision", json={"decision": "approve"},
                               headers=users.support.headers), 404, "review-not-found")
    _problem(await client.post(f"/api/v1/fraud/reviews/{approve}/decision", json={"decision": "maybe"},
                               headers=users.support.headers), 422, "validation-error")
    approved = (await client.get("/api/v1/fraud/reviews?status=approved", headers=users.auditor.headers)).json()
    assert approve in [r["id"] for r in approved["items"]]
    _problem(await client.get("/api/v1/fraud/reviews?cursor=garbage", headers=users.auditor.headers),
             400, "invalid-cursor")


async def test_reviews_resolve_once_in_the_database(pool: asyncpg.Pool) -> None:
    pid = f"o-{uuid.uuid4().hex[:8]}"
    async with pool.acquire() as conn:
        await db.record_scores(conn, [score_row(pid, "review", 70)])
        review_id = db.review_id_for(pid)
        await db.resolve_review(conn, review_id, "declined", "", uuid.uuid4(), uuid.uuid4())
        with pytest.raises(asyncpg.CheckViolationError):
            await conn.execute("UPDATE fraud.reviews SET status = 'approved' WHERE id = $1", review_id)
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("DELETE FROM fraud.reviews WHERE id = $1", review_id)
        await db.mark_published(conn, [review_id])
        with pytest.raises(asyncpg.CheckViolationError):  # published_at is set once
            await conn.execute("UPDATE fraud.reviews SET published_at = now() + interval '1 day' WHERE id = $1",
                               review_id)


# ------------------------------------------------------------------------------ rules

async def test_rules_are_validated_and_admin_only(client: httpx.AsyncClient, users: Users) -> None:
    listed = (await client.get("/api/v1/fraud/rules", headers=users.auditor.headers)).json()
    assert {r["id"] for r in listed["rules"]} >= {r.id for r in DEFAULT_RULES}
    version = listed["version"]
    rule_id = f"big-{uuid.uuid4().hex[:6]}"
    body = {"id": rule_id, "expression": "amount_minor > 9000000 and new_device", "action": "review"}
    _problem(await client.post("/api/v1/fraud/rules", json=body, headers=users.support.headers), 403, "forbidden")
    created = await client.post("/api/v1/fraud/rules", json=body, headers=users.admin.headers)
    assert created.status_code == 201, created.text
    assert created.json()["features"] == ["amount_minor", "new_device"] and created.json()["priority"] == 100
    _problem(await client.post("/api/v1/fraud/rules", json=body, headers=users.admin.headers), 409, "rule-exists")
    bad = _problem(await client.post("/api/v1/fraud/rules", headers=users.admin.headers,
                                     json={**body, "id": "bad-1", "expression": "velocity > 3 and ip_risk > 1"}),
                   422, "invalid-rule-expression")
    assert bad["errors"][0]["field"] == "expression"
    assert bad["errors"][0]["unknown_features"] == ["ip_risk", "velocity"]
    for expression in ("__import__('os').system('id')", "amount_minor.__class__", "amount_minor >"):
        _problem(await client.post("/api/v1/fraud/rules", headers=users.admin.headers,
                                   json={**body, "id": "bad-2", "expression": expression}),
                 422, "invalid-rule-expression")
    for invalid in ({**body, "action": "panic"}, {**body, "id": "Bad Id"}, {**body, "priority": -1},
                    {**body, "extra": 1}):
        _problem(await client.post("/api/v1/fraud/rules", json=invalid, headers=users.admin.headers),
                 422, "validation-error")
    updated = await client.put(f"/api/v1/fraud/rules/{rule_id}", headers=users.admin.headers,
                               json={"expression": "amount_minor > 5000000", "action": "block", "enabled": False})
    assert updated.status_code == 200 and updated.json()["enabled"] is False
    assert updated.json()["updated_by"] == str(users.admin.user_id)
    _problem(await client.put("/api/v1/fraud/rules/nope", headers=users.admin.headers,
                              json={"expression": "score > 1", "action": "block"}), 404, "rule-not-found")
    _problem(await client.put(f"/api/v1/fraud/rules/{rule_id}", headers=users.admin.headers,
                              json={"expression": "nope > 1", "action": "block"}), 422, "invalid-rule-expression")
    after = (await client.get("/api/v1/fraud/rules", headers=users.support.headers)).json()
    assert after["version"] == version + 2  # one insert, one update; refused edits changed nothing
    mine = next(r for r in after["rules"] if r["id"] == rule_id)
    assert (mine["expression"], mine["action"], mine["enabled"]) == ("amount_minor > 5000000", "block", False)


async def test_rule_history_is_append_only(pool: asyncpg.Pool, client: httpx.AsyncClient, users: Users) -> None:
    rule_id = f"hist-{uuid.uuid4().hex[:6]}"
    await client.post("/api/v1/fraud/rules", headers=users.admin.headers,
                      json={"id": rule_id, "expression": "score > 98", "action": "block"})
    await client.put(f"/api/v1/fraud/rules/{rule_id}", headers=users.admin.headers,
                     json={"expression": "score > 99", "action": "block"})
    rows = await pool.fetch("SELECT operation, before->>'expression' AS b, after->>'expression' AS a, changed_by "
                            "FROM fraud.rule_changes WHERE rule_id = $1 ORDER BY id", rule_id)
    assert [(r["operation"], r["b"], r["a"]) for r in rows] == [("INSERT", None, "score > 98"),
                                                                ("UPDATE", "score > 98", "score > 99")]
    assert all(r["changed_by"] == users.admin.user_id for r in rows)
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await pool.execute("DELETE FROM fraud.rule_changes WHERE rule_id = $1", rule_id)


# ------------------------------------------------------------------------------ stats

async def test_stats_count_decisions_and_the_false_positive_rate(client: httpx.AsyncClient, users: Users,
                                                                 api_settings: Settings) -> None:
    # A database of its own, so the other tests' rows do not count.
    settings = api_settings
    fresh = await create_pool(dsn_for(settings.database_url, "fraud"))
    try:
        before = (await client.get("/api/v1/fraud/stats?window=1h", headers=users.auditor.headers)).json()
        now = time.time()
        rows = [score_row(f"s-{uuid.uuid4().hex[:8]}", d, 50, ts=now - 60)
                for d in ["allow"] * 7 + ["block"] * 2 + ["review"] * 4]
        async with fresh.acquire() as conn:
            await db.record_scores(conn, rows)
            old = score_row(f"s-{uuid.uuid4().hex[:8]}", "block", 99, ts=now - 7_200)  # outside 1 h
            await db.record_scores(conn, [old])
            reviews = [r for r in rows if r.decision == "review"]
            for i, r in enumerate(reviews[:3]):
                await db.resolve_review(conn, db.review_id_for(r.payment_id), "approved" if i < 2 else "declined",
                                        "", uuid.uuid4(), uuid.uuid4())
    finally:
        await fresh.close()
    after = (await client.get("/api/v1/fraud/stats?window=1h", headers=users.auditor.headers)).json()
    delta = {k: after["totals"][k] - before["totals"][k] for k in ("allow", "review", "block")}
    assert delta == {"allow": 7, "review": 4, "block": 2}
    assert sum(b["allow"] + b["review"] + b["block"] for b in after["buckets"]) == sum(after["totals"].values())
    assert after["reviews"]["approved"] - before["reviews"]["approved"] == 2
    assert after["reviews"]["declined"] - before["reviews"]["declined"] == 1
    decided = after["reviews"]["approved"] + after["reviews"]["declined"]
    assert after["false_positive_rate"] == round(after["reviews"]["approved"] / decided, 4)
    day = (await client.get("/api/v1/fraud/stats?window=24h", headers=users.auditor.headers)).json()
    assert day["totals"]["block"] >= after["totals"]["block"] + 1 and day["bucket_s"] == 3_600
    _problem(await client.get("/api/v1/fraud/stats?window=5y", headers=users.auditor.headers), 422,
             "validation-error")
    _problem(await client.get("/api/v1/fraud/stats", headers=users.customer.headers), 403, "forbidden")


# ------------------------------------------------------------------------------ features

async def test_features_without_a_worker_is_503(client: httpx.AsyncClient, users: Users,
                                                api_settings: Settings) -> None:
    assert not list(Path(api_settings.data_dir).glob("worker/*/web.url"))
    _problem(await client.get("/api/v1/fraud/accounts/w-1/features", headers=users.auditor.headers),
             503, "workers-unavailable")
    _problem(await client.get("/api/v1/fraud/accounts/w-1/features", headers=users.customer.headers),
             403, "forbidden")


# ------------------------------------------------------------------------------ WebSocket

async def test_alerts_websocket_is_for_analysts(server: str, users: Users, api_settings: Settings) -> None:
    url = f"ws://{server}/ws/fraud/alerts"
    alert = FraudAlert(payment_id="p-ws", payer_wallet_id="w-ws", payer_user_id="u", payee_wallet_id="w-2",
                       amount_minor=500, currency="INR", score=91, decision="block", severity="high",
                       rules_fired=["card-testing"])
    redis = Redis.from_url(api_settings.redis_url)
    try:
        async with connect(f"{url}?token={users.auditor.access_token}", open_timeout=WS_TIMEOUT_S) as ws:
            received = None
            for _ in range(50):  # the subscription is live once a publish reaches someone
                if await redis.publish(alerts_channel(api_settings), encode(alert)):
                    received = json.loads(await asyncio.wait_for(ws.recv(), WS_TIMEOUT_S))
                    break
                await asyncio.sleep(0.1)
            assert received is not None and received["payment_id"] == "p-ws"
            assert (received["type"], received["severity"], received["rules_fired"]) == \
                ("fraud.alert", "high", ["card-testing"])
        for token, code in ((users.customer.access_token, 4403), ("not-a-token", 4401)):
            async with connect(f"{url}?token={token}", open_timeout=WS_TIMEOUT_S) as ws:
                with pytest.raises(ConnectionClosed) as closed:
                    await asyncio.wait_for(ws.recv(), WS_TIMEOUT_S)
                assert closed.value.rcvd is not None and closed.value.rcvd.code == code
    finally:
        await redis.aclose()
