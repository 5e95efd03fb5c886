"""Ownership (404 for others), staff access, KYC with encrypted/masked PII, API keys and
the email registry, rate limits with Retry-After, trusted proxies, and the event outbox."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import asyncpg
import msgspec
import pytest
from cryptography.exceptions import InvalidTag
from litestar import Litestar
from litestar.testing import AsyncTestClient

from api.app import create_app
from ops.settings import Settings
from services import identity_pii
from tests.helpers.api import served
from tests.helpers.auth import admin_login, register_and_login

KYC = {"document_type": "pan", "document_number": "abcde1234f", "date_of_birth": "1990-04-21",
       "address": {"line1": "12 MG Road", "city": "Bengaluru", "postal_code": "560001", "country": "IN"}}


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[AsyncTestClient[Litestar]]:
    async with AsyncTestClient(app=create_app(settings)) as client:
        yield client


async def outbox_types(settings: Settings) -> list[str]:
    conn = await asyncpg.connect(settings.database_url)
    try:
        return [r["type"] for r in await conn.fetch("SELECT type FROM identity.outbox ORDER BY seq")]
    finally:
        await conn.close()


# --- ownership -------------------------------------------------------------------------------

async def test_users_reach_only_their_own_profile_and_preferences(client: AsyncTestClient[Litestar]) -> None:
    alice, bob = await register_and_login(client), await register_and_login(client)
    assert (await client.get(f"/api/v1/users/{alice.user_id}/profile", headers=alice.headers)).status_code == 200
    put = await client.put(f"/api/v1/users/{alice.user_id}/preferences", headers=alice.headers,
                           json={"preferences": {"theme": "dark", "alerts.email": True, "risk": 3}})
    assert put.status_code == 200 and put.json()["preferences"]["theme"] == "dark"
    got = await client.get(f"/api/v1/users/{alice.user_id}/preferences", headers=alice.headers)
    assert got.json()["preferences"] == {"theme": "dark", "alerts.email": True, "risk": 3}
    nobody = "00000000-0000-0000-0000-0000000000aa"
    for path in (f"/api/v1/users/{alice.user_id}/profile", f"/api/v1/users/{alice.user_id}/preferences",
                 f"/api/v1/users/{nobody}/profile"):
        response = await client.get(path, headers=bob.headers)
        assert response.status_code == 404, path
    # Someone else's existing id and a non-existent id are indistinguishable.
    theirs = (await client.get(f"/api/v1/users/{alice.user_id}/profile", headers=bob.headers)).json()
    missing = (await client.get(f"/api/v1/users/{nobody}/profile", headers=bob.headers)).json()
    assert theirs["detail"] == missing["detail"] and theirs["type"] == missing["type"]
    assert (await client.put(f"/api/v1/users/{alice.user_id}/preferences", headers=bob.headers,
                             json={"preferences": {"theme": "light"}})).status_code == 404


async def test_staff_read_anyone_but_only_admins_change_preferences(client: AsyncTestClient[Litestar]) -> None:
    alice = await register_and_login(client)
    support = await register_and_login(client, roles=("support",))
    auditor = await register_and_login(client, roles=("auditor",))
    admin = await admin_login(client)
    for staff in (support, auditor, admin):
        assert (await client.get(f"/api/v1/users/{alice.user_id}/profile", headers=staff.headers)).status_code == 200
    prefs = {"preferences": {"lang": "hi"}}
    assert (await client.put(f"/api/v1/users/{alice.user_id}/preferences", headers=support.headers,
                             json=prefs)).status_code == 403
    assert (await client.put(f"/api/v1/users/{alice.user_id}/preferences", headers=admin.headers,
                             json=prefs)).status_code == 200


async def test_invalid_preferences_are_422(client: AsyncTestClient[Litestar]) -> None:
    me = await register_and_login(client)
    url = f"/api/v1/users/{me.user_id}/preferences"
    assert (await client.put(url, headers=me.headers, json={"preferences": {"Bad Key": 1}})).status_code == 422
    many = {f"k{i}": i for i in range(65)}
    assert (await client.put(url, headers=me.headers, json={"preferences": many})).status_code == 422
    assert (await client.put(url, headers=me.headers, json={"preferences": {"nested": {"a": 1}}})).status_code == 422


# --- KYC ------------------------------------------------------------------------------------

async def test_kyc_submit_is_pending_masked_and_encrypted_at_rest(client: AsyncTestClient[Litestar],
                                                                  settings: Settings) -> None:
    me = await register_and_login(client)
    submitted = await client.post("/api/v1/auth/verify-kyc", headers=me.headers, json=KYC)
    assert submitted.status_code == 202, submitted.text
    assert submitted.json()["status"] == "pending"
    assert submitted.json()["document_number_masked"] == "XXXXXX234F"
    profile = await client.get("/api/v1/users/me", headers=me.headers)
    assert profile.json()["kyc"]["status"] == "pending"
    for response in (submitted, profile):
        assert "ABCDE1234F" not in response.text and "abcde1234f" not in response.text
    conn = await asyncpg.connect(settings.database_url)
    try:
        row = await conn.fetchrow("SELECT * FROM identity.kyc_submissions WHERE user_id = $1", me.user_id)
    finally:
        await conn.close()
    assert b"ABCDE1234F" not in row["document_number_enc"]
    assert identity_pii.decrypt(settings, row["document_number_enc"], me.user_id) == "ABCDE1234F"
    with pytest.raises(InvalidTag):  # bound to its owner: under another user id it does not decrypt
        identity_pii.decrypt(settings, row["document_number_enc"], uuid.UUID(int=1))
    again = await client.post("/api/v1/auth/verify-kyc", headers=me.headers, json=KYC)
    assert again.status_code == 409


async def test_kyc_decisions_by_support_update_the_profile_and_emit_events(client: AsyncTestClient[Litestar],
                                                                           settings: Settings) -> None:
    me = await register_and_login(client)
    support = await register_and_login(client, roles=("support",))
    await client.post("/api/v1/auth/verify-kyc", headers=me.headers, json=KYC)
    denied = await client.put(f"/api/v1/admin/kyc/{me.user_id}", headers=me.headers, json={"decision": "approved"})
    assert denied.status_code == 403
    no_reason = await client.put(f"/api/v1/admin/kyc/{me.user_id}", headers=support.headers, json={"decision": "rejected"})
    assert no_reason.status_code == 422
    rejected = await client.put(f"/api/v1/admin/kyc/{me.user_id}", headers=support.headers,
                                json={"decision": "rejected", "reason": "blurry scan"})
    assert rejected.status_code == 200 and rejected.json()["status"] == "rejected"
    assert (await client.get("/api/v1/users/me", headers=me.headers)).json()["kyc"]["reason"] == "blurry scan"
    assert (await client.post("/api/v1/auth/verify-kyc", headers=me.headers, json=KYC)).status_code == 202
    approved = await client.put(f"/api/v1/admin/kyc/{me.user_id}", headers=support.headers, json={"decision": "approved"})
    assert approved.json()["status"] == "approved"
    twice = await client.put(f"/api/v1/admin/kyc/{me.user_id}", headers=support.headers, json={"decision": "approved"})
    assert twice.status_code == 409
    assert (await client.get("/api/v1/users/me", headers=me.headers)).json()["kyc"]["status"] == "approved"
    types = await outbox_types(settings)
    assert types.count("identity.kyc_updated") == 4  # pending, rejected, pending, approved


@pytest.mark.parametrize(("patch", "field"), [
    ({"document_number": "1234"}, "document_number"),
    ({"date_of_birth": "2019-01-01"}, "date_of_birth"),
    ({"date_of_birth": "1990-02-30"}, "date_of_birth"),
    ({"document_type": "aadhaar", "document_number": "12345"}, "document_number"),
])
async def test_invalid_kyc_details_are_422(client: AsyncTestClient[Litestar], patch: dict[str, str], field: str) -> None:
    me = await register_and_login(client)
    response = await client.post("/api/v1/auth/verify-kyc", headers=me.headers, json={**KYC, **patch})
    assert response.status_code == 422
    assert response.json()["errors"][0]["field"] == field


# --- API keys and the email registry -----------------------------------------------------------

async def test_api_keys_are_shown_once_scoped_and_revocable(client: AsyncTestClient[Litestar],
                                                            settings: Settings) -> None:
    admin = await admin_login(client)
    created = await client.post("/api/v1/admin/api-keys", headers=admin.headers,
                                json={"name": "marketing", "scopes": ["identity:email:write", "identity:email:read"]})
    assert created.status_code == 201
    key, key_id = created.json()["key"], created.json()["api_key"]["id"]
    listing = await client.get("/api/v1/admin/api-keys", headers=admin.headers)
    assert key not in listing.text and listing.json()["items"][0]["id"] == key_id
    conn = await asyncpg.connect(settings.database_url)
    try:
        stored = await conn.fetchrow("SELECT * FROM identity.api_keys WHERE id = $1", created.json()["api_key"]["id"])
    finally:
        await conn.close()
    assert key.split("_")[2].encode() not in bytes(stored["secret_hash"])

    service = {"X-API-Key": key}
    upserted = await client.post("/api/v1/identity/email/upsert", headers=service, json={"email": " New@Lead.COM "})
    assert upserted.status_code == 201 and upserted.json()["email"] == "new@lead.com"
    same = await client.post("/api/v1/identity/email/upsert", headers=service, json={"email": "new@lead.com"})
    assert same.status_code == 200 and same.json()["email_address_id"] == upserted.json()["email_address_id"]
    found = await client.get("/api/v1/identity/email/NEW@lead.com", headers=service)
    assert found.json()["email_address_id"] == upserted.json()["email_address_id"]
    assert (await client.get("/api/v1/identity/email/none@lead.com", headers=service)).status_code == 404
    # An API key is not a user: user routes refuse it.
    assert (await client.get("/api/v1/users/me", headers=service)).status_code == 403

    assert (await client.delete(f"/api/v1/admin/api-keys/{key_id}", headers=admin.headers)).status_code == 204
    assert (await client.get("/api/v1/identity/email/new@lead.com", headers=service)).status_code == 401
    assert (await client.delete(f"/api/v1/admin/api-keys/{key_id}", headers=admin.headers)).status_code == 404


async def test_api_key_scopes_and_the_registry_guards(client: AsyncTestClient[Litestar]) -> None:
    admin = await admin_login(client)
    reader = (await client.post("/api/v1/admin/api-keys", headers=admin.headers,
                                json={"name": "billing", "scopes": ["identity:email:read"]})).json()["key"]
    assert (await client.post("/api/v1/identity/email/upsert", headers={"X-API-Key": reader},
                              json={"email": "x@lead.com"})).status_code == 403
    user = await register_and_login(client)
    assert (await client.get("/api/v1/identity/email/x@lead.com", headers=user.headers)).status_code == 403
    assert (await client.get("/api/v1/identity/email/x@lead.com")).status_code == 401
    for forged in ("ftk_000000000000_" + "A" * 43, reader[:-1] + ("B" if reader[-1] != "B" else "C"), "nonsense"):
        assert (await client.get("/api/v1/identity/email/x@lead.com", headers={"X-API-Key": forged})).status_code == 401
    bad_scope = await client.post("/api/v1/admin/api-keys", headers=admin.headers, json={"name": "x", "scopes": ["ALL"]})
    assert bad_scope.status_code == 422
    assert (await client.post("/api/v1/admin/api-keys", headers=user.headers,
                              json={"name": "x", "scopes": ["identity:email:read"]})).status_code == 403


async def test_api_key_listing_pages_with_a_cursor(client: AsyncTestClient[Litestar]) -> None:
    admin = await admin_login(client)
    for i in range(3):
        await client.post("/api/v1/admin/api-keys", headers=admin.headers, json={"name": f"k{i}", "scopes": ["a:b"]})
    first = (await client.get("/api/v1/admin/api-keys?limit=2", headers=admin.headers)).json()
    second = (await client.get(f"/api/v1/admin/api-keys?limit=2&cursor={first['next_cursor']}",
                               headers=admin.headers)).json()
    assert [k["name"] for k in first["items"] + second["items"]] == ["k2", "k1", "k0"]
    assert second["next_cursor"] is None


# --- rate limits and proxies -------------------------------------------------------------------

async def test_auth_routes_are_rate_limited_per_ip_with_retry_after(settings: Settings) -> None:
    settings = msgspec.structs.replace(settings, rate_limit_per_minute=1000, rate_limit_auth_per_minute=5)
    async with AsyncTestClient(app=create_app(settings)) as client:
        statuses = [(await client.post("/api/v1/auth/refresh", json={"refresh_token": "x" * 43})).status_code
                    for _ in range(6)]
        assert statuses == [401] * 5 + [429]
        limited = await client.post("/api/v1/auth/login", json={"email": "a@b.co", "password": "x"})
        assert limited.status_code == 429
        assert limited.headers["content-type"].startswith("application/problem+json")
        assert 0 < int(limited.headers["retry-after"]) <= 60
        assert (await client.get("/health")).status_code == 200  # probes are never limited


async def test_general_limit_is_per_user_not_shared_between_users(settings: Settings) -> None:
    settings = msgspec.structs.replace(settings, rate_limit_per_minute=12, rate_limit_auth_per_minute=100)
    async with AsyncTestClient(app=create_app(settings)) as client:
        alice, bob = await register_and_login(client), await register_and_login(client)
        statuses = [(await client.get("/api/v1/users/me", headers=alice.headers)).status_code for _ in range(13)]
        assert statuses == [200] * 12 + [429]
        assert "retry-after" in (await client.get("/api/v1/users/me", headers=alice.headers)).headers
        assert (await client.get("/api/v1/users/me", headers=bob.headers)).status_code == 200


async def test_replicas_sharing_redis_let_exactly_the_limit_through(settings: Settings) -> None:
    # Two API replicas, one user, concurrent requests on both: the count is one atomic
    # Redis counter, so neither replica can let a request through that the other counted.
    settings = msgspec.structs.replace(settings, rate_limit_per_minute=25, rate_limit_auth_per_minute=100)
    async with served(settings) as one, served(settings) as two:
        me = await register_and_login(one)
        responses = await asyncio.gather(*(client.get("/api/v1/users/me", headers=me.headers)
                                           for client in [one, two] * 20))
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] * 25 + [429] * 15
    remaining = sorted(int(r.headers["ratelimit-remaining"]) for r in responses if r.status_code == 200)
    assert remaining == list(range(25))  # every hit saw its own count


async def test_x_forwarded_for_counts_only_from_trusted_proxies(settings: Settings) -> None:
    settings = msgspec.structs.replace(settings, rate_limit_per_minute=1000, rate_limit_auth_per_minute=2)

    async def burst(client: AsyncTestClient[Litestar], ip: str) -> list[int]:
        return [(await client.post("/api/v1/auth/refresh", json={"refresh_token": "x" * 43},
                                   headers={"x-forwarded-for": ip})).status_code for _ in range(3)]

    async with AsyncTestClient(app=create_app(settings)) as untrusted:
        # The test client's peer is not trusted: spoofed XFF values all count as one client.
        assert await burst(untrusted, "1.1.1.1") == [401, 401, 429]
        assert (await burst(untrusted, "2.2.2.2"))[0] == 429
    trusted_settings = msgspec.structs.replace(settings, trusted_proxies="testclient,10.0.0.0/8")
    async with AsyncTestClient(app=create_app(trusted_settings)) as trusted:
        assert await burst(trusted, "3.3.3.3") == [401, 401, 429]
        assert await burst(trusted, "4.4.4.4, 10.1.2.3") == [401, 401, 429]  # proxy chain: nearest untrusted hop
        assert (await burst(trusted, "9.9.9.9"))[0] == 401


# --- events -------------------------------------------------------------------------------

async def test_audit_worthy_actions_are_recorded_as_identity_events(client: AsyncTestClient[Litestar],
                                                                    settings: Settings) -> None:
    me = await register_and_login(client, roles=("trader",))
    await client.post("/api/v1/auth/login", json={"email": me.email, "password": "Wrong-Passw0rd!"})
    types = await outbox_types(settings)
    for expected in ("identity.user_created", "identity.role_changed", "identity.login_succeeded",
                     "identity.login_failed"):
        assert expected in types, (expected, types)
    conn = await asyncpg.connect(settings.database_url)
    try:
        payloads = [r["payload"] for r in await conn.fetch("SELECT payload::text FROM identity.outbox")]
    finally:
        await conn.close()
    assert not any(me.email in p or me.password in p for p in payloads)  # ids and states only
