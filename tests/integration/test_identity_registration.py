"""Registration, the email registry rules, and bad input that must be a clear 4xx."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient

from api.app import create_app
from ops.settings import Settings
from tests.helpers.auth import register_and_login

PASSWORD = "Sturdy-Passw0rd!"


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[AsyncTestClient[Litestar]]:
    async with AsyncTestClient(app=create_app(settings)) as client:
        yield client


async def test_register_returns_201_with_a_normalised_email_and_the_user_role(client: AsyncTestClient[Litestar]) -> None:
    response = await client.post("/api/v1/auth/register", json={
        "email": "  Ada.Lovelace@Example.COM ", "password": PASSWORD, "first_name": "Ada",
        "last_name": "Lovelace", "phone": "+91 98123 45678", "username": "ada_l"})
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["email"] == "ada.lovelace@example.com"
    assert body["roles"] == ["user"] and body["kind"] == "customer"
    assert body["phone"] == "+919812345678" and body["username"] == "ada_l"
    assert body["verification"] == {"email": False, "phone": False, "both": False}
    assert body["kyc"]["status"] == "none"
    assert "password" not in response.text and "argon2" not in response.text


async def test_duplicate_email_in_any_case_is_409_problem(client: AsyncTestClient[Litestar]) -> None:
    assert (await client.post("/api/v1/auth/register", json={"email": "dup@example.com", "password": PASSWORD})).status_code == 201
    response = await client.post("/api/v1/auth/register", json={"email": "DUP@Example.com", "password": PASSWORD})
    assert response.status_code == 409
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.json()["type"].endswith("/email-taken")


async def test_duplicate_username_is_409(client: AsyncTestClient[Litestar]) -> None:
    await client.post("/api/v1/auth/register", json={"email": "u1@example.com", "password": PASSWORD, "username": "Neo"})
    response = await client.post("/api/v1/auth/register", json={"email": "u2@example.com", "password": PASSWORD,
                                                                "username": "neo"})
    assert response.status_code == 409 and response.json()["type"].endswith("/username-taken")


@pytest.mark.parametrize(("password", "message"), [
    ("short1!", "at least 10 characters"),
    ("onlyletterslong", "mix letters"),
    ("password123", "too common"),
    ("weakling-user-9", "email name"),
])
async def test_weak_passwords_are_422_with_field_errors(client: AsyncTestClient[Litestar], password: str,
                                                        message: str) -> None:
    response = await client.post("/api/v1/auth/register", json={"email": "weakling-user@example.com",
                                                                "password": password})
    assert response.status_code == 422
    errors = response.json()["errors"]
    assert all(e["field"] == "password" for e in errors)
    assert any(message in e["message"] for e in errors), errors


@pytest.mark.parametrize("email", ["not-an-email", "a@b", "two@@example.com", "sp ace@example.com", "x" * 250 + "@e.com"])
async def test_invalid_emails_are_422_on_the_email_field(client: AsyncTestClient[Litestar], email: str) -> None:
    response = await client.post("/api/v1/auth/register", json={"email": email, "password": PASSWORD})
    assert response.status_code == 422
    assert any(e["field"] == "email" for e in response.json()["errors"])


async def test_invalid_phone_is_422(client: AsyncTestClient[Litestar]) -> None:
    response = await client.post("/api/v1/auth/register", json={"email": "p@example.com", "password": PASSWORD,
                                                                "phone": "12345"})
    assert response.status_code == 422 and response.json()["errors"][0]["field"] == "phone"


async def test_missing_field_and_unknown_field_are_422(client: AsyncTestClient[Litestar]) -> None:
    missing = await client.post("/api/v1/auth/register", json={"email": "m@example.com"})
    unknown = await client.post("/api/v1/auth/register", json={"email": "m@example.com", "password": PASSWORD,
                                                               "is_admin": True})
    assert missing.status_code == 422 and unknown.status_code == 422


@pytest.mark.parametrize("body", [b"{", b"not json", b'{"email": "a@b.co", "password": }', b"\xff\xfe", b"[]", b"null"])
async def test_malformed_json_is_a_4xx_problem_never_500(client: AsyncTestClient[Litestar], body: bytes) -> None:
    for path in ("/api/v1/auth/register", "/api/v1/auth/login", "/api/v1/auth/refresh"):
        response = await client.post(path, content=body, headers={"content-type": "application/json"})
        assert response.status_code in (400, 422), (path, body, response.status_code, response.text)
        assert response.headers["content-type"].startswith("application/problem+json")


async def test_oversized_bodies_are_413(client: AsyncTestClient[Litestar]) -> None:
    huge_auth = b'{"email": "a@example.com", "password": "' + b"x" * 20_000 + b'"}'
    response = await client.post("/api/v1/auth/register", content=huge_auth, headers={"content-type": "application/json"})
    assert response.status_code == 413
    me = await register_and_login(client)
    huge_app = b'{"preferences": {"k": "' + b"x" * (2 * 1024 * 1024) + b'"}}'
    response = await client.put(f"/api/v1/users/{me.user_id}/preferences", content=huge_app,
                                headers={"content-type": "application/json", **me.headers})
    assert response.status_code == 413
    assert response.headers["content-type"].startswith("application/problem+json")


async def test_an_email_upserted_by_another_service_can_then_register(client: AsyncTestClient[Litestar],
                                                                      settings: Settings) -> None:
    from services.identity import upsert_email
    from services.identity_common import IdentityContext
    from db.engine import create_pool
    from redis.asyncio import Redis

    pool, redis = await create_pool(settings.database_url), Redis.from_url(settings.redis_url)
    try:
        record, created = await upsert_email(IdentityContext(settings, pool, redis), "Lead@Example.com")
        assert created
        response = await client.post("/api/v1/auth/register", json={"email": "lead@example.com", "password": PASSWORD})
        assert response.status_code == 201
        assert response.json()["email_address_id"] == str(record.email_address_id)
    finally:
        await pool.close()
        await redis.aclose()
