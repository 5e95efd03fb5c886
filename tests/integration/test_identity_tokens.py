"""Login, tokens and sessions: enumeration resistance, throttling, tampering, expiry,
refresh rotation with reuse detection, logout, session listing and revocation."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone

import jwt
import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient

from api.app import create_app
from api.auth import AUDIENCE, ISSUER
from ops.settings import Settings
from services import identity_auth
from tests.helpers.auth import DEFAULT_PASSWORD, admin_login, register_and_login

ME = "/api/v1/users/me"


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[AsyncTestClient[Litestar]]:
    async with AsyncTestClient(app=create_app(settings)) as client:
        yield client


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def claims_of(token: str) -> dict[str, object]:
    return jwt.decode(token, options={"verify_signature": False})


async def test_login_returns_a_token_pair_with_the_documented_claims(client: AsyncTestClient[Litestar],
                                                                     settings: Settings) -> None:
    me = await register_and_login(client)
    claims = claims_of(me.access_token)
    assert claims["sub"] == str(me.user_id) and claims["sid"] == me.session_id
    assert claims["roles"] == ["user"] and claims["iss"] == ISSUER and claims["aud"] == AUDIENCE
    assert isinstance(claims["jti"], str) and len(claims["jti"]) == 32
    assert int(claims["exp"]) - int(claims["iat"]) == settings.access_token_ttl_s
    assert jwt.get_unverified_header(me.access_token)["alg"] == "HS256"


async def test_wrong_password_and_unknown_email_get_the_same_401(client: AsyncTestClient[Litestar]) -> None:
    me = await register_and_login(client)
    wrong_password = await client.post("/api/v1/auth/login", json={"email": me.email, "password": "Wrong-Passw0rd!"})
    unknown_email = await client.post("/api/v1/auth/login", json={"email": "nobody@example.com",
                                                                  "password": DEFAULT_PASSWORD})
    malformed_email = await client.post("/api/v1/auth/login", json={"email": "nobody", "password": DEFAULT_PASSWORD})
    bodies = []
    for response in (wrong_password, unknown_email, malformed_email):
        assert response.status_code == 401
        body = response.json()
        bodies.append((body["type"], body["title"], body["detail"]))
    assert len(set(bodies)) == 1 and bodies[0][2] == "Invalid email or password."


async def test_failed_logins_are_throttled_per_account_even_for_unknown_emails(client: AsyncTestClient[Litestar]) -> None:
    me = await register_and_login(client)
    for email in (me.email, "ghost@example.com"):
        for _ in range(identity_auth.LOGIN_MAX_FAILURES_PER_ACCOUNT):
            response = await client.post("/api/v1/auth/login", json={"email": email, "password": "Wrong-Passw0rd!"})
            assert response.status_code == 401
        throttled = await client.post("/api/v1/auth/login", json={"email": email, "password": "Wrong-Passw0rd!"})
        assert throttled.status_code == 429, throttled.text
        assert 0 < int(throttled.headers["retry-after"]) <= identity_auth.LOGIN_WINDOW_S
    # Even the right password waits out the throttle on that account.
    right = await client.post("/api/v1/auth/login", json={"email": me.email, "password": DEFAULT_PASSWORD})
    assert right.status_code == 429


async def test_failed_logins_are_throttled_per_ip_across_accounts(client: AsyncTestClient[Litestar],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(identity_auth, "LOGIN_MAX_FAILURES_PER_IP", 4)
    for i in range(4):
        response = await client.post("/api/v1/auth/login", json={"email": f"spray{i}@example.com", "password": "Nope-12345"})
        assert response.status_code == 401
    blocked = await client.post("/api/v1/auth/login", json={"email": "fresh@example.com", "password": "Nope-12345"})
    assert blocked.status_code == 429 and "retry-after" in blocked.headers


async def test_tampered_tokens_are_401(client: AsyncTestClient[Litestar], settings: Settings) -> None:
    me = await register_and_login(client)
    header, payload, signature = me.access_token.split(".")
    claims = claims_of(me.access_token)
    promoted = base64.urlsafe_b64encode(json.dumps({**claims, "roles": ["admin"]}).encode()).decode().rstrip("=")
    none_alg = jwt.encode(claims, key="", algorithm="none")
    wrong_key = jwt.encode(claims, key="an-entirely-different-secret-0123456789", algorithm="HS256")
    hs512 = jwt.encode(claims, key=settings.jwt_secret, algorithm="HS512")
    wrong_aud = jwt.encode({**claims, "aud": "someone-else"}, key=settings.jwt_secret, algorithm="HS256")
    no_sid = jwt.encode({k: v for k, v in claims.items() if k != "sid"}, key=settings.jwt_secret, algorithm="HS256")
    other_sub = jwt.encode({**claims, "sub": "00000000-0000-0000-0000-000000000042"}, key=settings.jwt_secret,
                           algorithm="HS256")
    for token in (f"{header}.{promoted}.{signature}", none_alg, wrong_key, hs512, wrong_aud, no_sid, other_sub,
                  me.access_token[:-3] + "abc", "garbage"):
        response = await client.get(ME, headers=bearer(token))
        assert response.status_code == 401, (token, response.text)
        assert response.headers["content-type"].startswith("application/problem+json")
    assert (await client.get(ME, headers=me.headers)).status_code == 200


async def test_missing_or_non_bearer_credentials_are_401(client: AsyncTestClient[Litestar]) -> None:
    me = await register_and_login(client)
    assert (await client.get(ME)).status_code == 401
    assert (await client.get(ME, headers={"Authorization": f"Basic {me.access_token}"})).status_code == 401
    assert (await client.get(ME, headers={"Authorization": "Bearer "})).status_code == 401


async def test_expired_access_tokens_are_401(client: AsyncTestClient[Litestar], settings: Settings) -> None:
    me = await register_and_login(client)
    claims = claims_of(me.access_token)
    past = datetime.now(timezone.utc) - timedelta(seconds=5)
    expired = jwt.encode({**claims, "iat": int(past.timestamp()) - 60, "exp": int(past.timestamp())},
                         key=settings.jwt_secret, algorithm="HS256")
    response = await client.get(ME, headers=bearer(expired))
    assert response.status_code == 401 and "expired" in response.json()["detail"]


async def test_refresh_rotates_and_reusing_an_old_token_revokes_the_family(client: AsyncTestClient[Litestar]) -> None:
    me = await register_and_login(client)
    first = await client.post("/api/v1/auth/refresh", json={"refresh_token": me.refresh_token})
    assert first.status_code == 200
    rotated = first.json()
    assert rotated["refresh_token"] != me.refresh_token and rotated["session_id"] == me.session_id
    second = await client.post("/api/v1/auth/refresh", json={"refresh_token": rotated["refresh_token"]})
    assert second.status_code == 200
    latest = second.json()
    assert (await client.get(ME, headers=bearer(latest["access_token"]))).status_code == 200
    # The first token again: a replay. The whole family dies, including the newest tokens.
    replay = await client.post("/api/v1/auth/refresh", json={"refresh_token": me.refresh_token})
    assert replay.status_code == 401
    assert (await client.post("/api/v1/auth/refresh", json={"refresh_token": latest["refresh_token"]})).status_code == 401
    for token in (me.access_token, rotated["access_token"], latest["access_token"]):
        assert (await client.get(ME, headers=bearer(token))).status_code == 401
    # Other logins of the same user are other families and survive.
    other = await client.post("/api/v1/auth/login", json={"email": me.email, "password": me.password})
    assert (await client.get(ME, headers=bearer(other.json()["access_token"]))).status_code == 200


async def test_concurrent_refreshes_with_one_token_let_at_most_one_win(client: AsyncTestClient[Litestar]) -> None:
    me = await register_and_login(client)
    results = await asyncio.gather(*(client.post("/api/v1/auth/refresh", json={"refresh_token": me.refresh_token})
                                     for _ in range(3)))
    assert sum(r.status_code == 200 for r in results) <= 1
    assert all(r.status_code in (200, 401) for r in results)


async def test_unknown_refresh_tokens_are_401(client: AsyncTestClient[Litestar]) -> None:
    for token in ("x", "a" * 43, "b" * 200):
        response = await client.post("/api/v1/auth/refresh", json={"refresh_token": token})
        assert response.status_code in (401, 422)
    assert (await client.post("/api/v1/auth/refresh", json={"refresh_token": "a" * 43})).status_code == 401


async def test_logout_revokes_the_session_on_the_next_request(client: AsyncTestClient[Litestar]) -> None:
    me = await register_and_login(client)
    assert (await client.post("/api/v1/auth/logout", headers=me.headers)).status_code == 204
    assert (await client.get(ME, headers=me.headers)).status_code == 401
    assert (await client.post("/api/v1/auth/refresh", json={"refresh_token": me.refresh_token})).status_code == 401


async def test_revocation_survives_a_redis_flush(client: AsyncTestClient[Litestar], settings: Settings) -> None:
    from redis.asyncio import Redis

    me = await register_and_login(client)
    await client.post("/api/v1/auth/logout", headers=me.headers)
    redis = Redis.from_url(settings.redis_url)
    await redis.flushdb()
    await redis.aclose()
    # PostgreSQL is the record: with Redis empty the revoked session stays revoked.
    assert (await client.get(ME, headers=me.headers)).status_code == 401


async def test_sessions_are_listed_with_cursor_pages_and_revocable_one_by_one(client: AsyncTestClient[Litestar]) -> None:
    me = await register_and_login(client)
    others: list[str] = []
    for agent in ("phone", "tablet"):
        response = await client.post("/api/v1/auth/login", json={"email": me.email, "password": me.password},
                                     headers={"user-agent": agent})
        others.append(response.json()["session_id"])
    first = (await client.get("/api/v1/users/me/sessions?limit=2", headers=me.headers)).json()
    assert len(first["items"]) == 2 and first["next_cursor"]
    second = (await client.get(f"/api/v1/users/me/sessions?limit=2&cursor={first['next_cursor']}",
                               headers=me.headers)).json()
    assert second["next_cursor"] is None
    ids = [s["id"] for s in first["items"] + second["items"]]
    assert sorted(ids) == sorted([me.session_id, *others])
    assert [s["current"] for s in first["items"] + second["items"] if s["id"] == me.session_id] == [True]
    assert {s["user_agent"] for s in first["items"]} == {"phone", "tablet"}
    assert (await client.delete(f"/api/v1/users/me/sessions/{others[0]}", headers=me.headers)).status_code == 204
    remaining = (await client.get("/api/v1/users/me/sessions", headers=me.headers)).json()["items"]
    assert others[0] not in [s["id"] for s in remaining]
    assert (await client.get("/api/v1/users/me/sessions?cursor=%%%bad", headers=me.headers)).status_code == 400


async def test_a_user_cannot_revoke_someone_elses_session(client: AsyncTestClient[Litestar]) -> None:
    alice, bob = await register_and_login(client), await register_and_login(client)
    response = await client.delete(f"/api/v1/users/me/sessions/{bob.session_id}", headers=alice.headers)
    assert response.status_code == 404
    assert (await client.get(ME, headers=bob.headers)).status_code == 200


async def test_role_changes_apply_on_the_next_request_without_a_new_token(client: AsyncTestClient[Litestar]) -> None:
    me = await register_and_login(client)
    admin = await admin_login(client)
    granted = await client.put(f"/api/v1/admin/users/{me.user_id}/roles", headers=admin.headers,
                               json={"roles": ["trader", "instructor"]})
    assert granted.status_code == 200 and granted.json()["granted"] == ["instructor", "trader"]
    assert (await client.get(ME, headers=me.headers)).json()["roles"] == ["instructor", "trader", "user"]
    revoked = await client.put(f"/api/v1/admin/users/{me.user_id}/roles", headers=admin.headers, json={"roles": []})
    assert revoked.json()["revoked"] == ["instructor", "trader"]
    assert (await client.get(ME, headers=me.headers)).json()["roles"] == ["user"]


async def test_role_rules_customers_cannot_be_staff_and_admins_keep_their_admin(client: AsyncTestClient[Litestar]) -> None:
    me = await register_and_login(client)
    admin = await admin_login(client)
    staff = await client.put(f"/api/v1/admin/users/{me.user_id}/roles", headers=admin.headers, json={"roles": ["admin"]})
    assert staff.status_code == 422
    unknown = await client.put(f"/api/v1/admin/users/{me.user_id}/roles", headers=admin.headers, json={"roles": ["wizard"]})
    assert unknown.status_code == 422
    own = await client.put(f"/api/v1/admin/users/{admin.user_id}/roles", headers=admin.headers, json={"roles": ["support"]})
    assert own.status_code == 409
    missing = await client.put("/api/v1/admin/users/00000000-0000-0000-0000-000000000009/roles", headers=admin.headers,
                               json={"roles": ["trader"]})
    assert missing.status_code == 404
    not_admin = await client.put(f"/api/v1/admin/users/{me.user_id}/roles", headers=me.headers, json={"roles": ["trader"]})
    assert not_admin.status_code == 403


async def test_create_admin_is_idempotent_and_refuses_customer_emails(client: AsyncTestClient[Litestar],
                                                                      settings: Settings) -> None:
    from api.problems import Problem
    from services.identity import create_admin

    first = await create_admin(settings, "Root@Fintide.test", "Strong-Passw0rd-1")
    again = await create_admin(settings, "root@fintide.test", "ignored-Passw0rd-2")
    assert first == again
    login = await client.post("/api/v1/auth/login", json={"email": "root@fintide.test", "password": "Strong-Passw0rd-1"})
    assert claims_of(login.json()["access_token"])["roles"] == ["admin", "user"]
    customer = await register_and_login(client)
    with pytest.raises(Problem) as refused:
        await create_admin(settings, customer.email, "Strong-Passw0rd-1")
    assert refused.value.status_code == 409
    with pytest.raises(Problem):
        await create_admin(settings, "weak@fintide.test", "weak")


async def test_login_ends_with_rehash_free_argon2id_hashes(settings: Settings, pg_pool: object) -> None:
    from services.identity_auth import hash_password

    hashed = await hash_password("Some-Passw0rd")
    assert hashed.startswith("$argon2id$")
    assert await identity_auth.verify_password(hashed, "Some-Passw0rd")
    assert not await identity_auth.verify_password(hashed, "some-passw0rd")
    assert not await identity_auth.verify_password("not-a-hash", "x")




async def test_create_admin_works_with_only_a_database_url(settings: Settings) -> None:
    import msgspec

    from services.identity import create_admin

    no_redis = msgspec.structs.replace(settings, redis_url="")
    first = await create_admin(no_redis, "cli-admin@fintide.test", "Strong-Passw0rd-1")
    assert await create_admin(no_redis, "cli-admin@fintide.test", "Strong-Passw0rd-1") == first
