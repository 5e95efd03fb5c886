"""OTP send/verify through the dev outbox: hashing, TTL, attempts, cooldown, brute force."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient
from redis.asyncio import Redis

from api.app import create_app
from ops.settings import Settings
from services import identity_otp
from tests.helpers.auth import LoggedIn, register_and_login


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[AsyncTestClient[Litestar]]:
    async with AsyncTestClient(app=create_app(settings)) as client:
        yield client


async def latest_code(client: AsyncTestClient[Litestar], to: str) -> str:
    outbox = (await client.get("/api/v1/dev/outbox", params={"to": to})).json()["items"]
    assert outbox, f"nothing sent to {to}"
    match = re.search(r"\b(\d{6})\b", outbox[0]["body"])
    assert match is not None
    return match.group(1)


def wrong(code: str) -> str:
    return f"{(int(code) + 1) % 1_000_000:06d}"


async def send(client: AsyncTestClient[Litestar], me: LoggedIn, channel: str = "email") -> int:
    return (await client.post("/api/v1/auth/otp/send", headers=me.headers, json={"channel": channel})).status_code


async def test_email_code_verifies_the_email_and_is_single_use(client: AsyncTestClient[Litestar]) -> None:
    me = await register_and_login(client)
    sent = await client.post("/api/v1/auth/otp/send", headers=me.headers, json={"channel": "email"})
    assert sent.status_code == 202
    assert sent.json()["sent_to"].endswith("@example.com") and me.email not in sent.text
    code = await latest_code(client, me.email)
    ok = await client.post("/api/v1/auth/otp/verify", headers=me.headers, json={"channel": "email", "code": code})
    assert ok.status_code == 200 and ok.json()["email_verified"] is True and ok.json()["both_verified"] is False
    profile = (await client.get("/api/v1/users/me", headers=me.headers)).json()
    assert profile["verification"] == {"email": True, "phone": False, "both": False}
    again = await client.post("/api/v1/auth/otp/verify", headers=me.headers, json={"channel": "email", "code": code})
    assert again.status_code == 400


async def test_sms_and_email_together_make_the_user_fully_verified(client: AsyncTestClient[Litestar]) -> None:
    me = await register_and_login(client, phone="+919812345678")
    for channel, to in (("email", me.email), ("sms", "+919812345678")):
        assert await send(client, me, channel) == 202
        code = await latest_code(client, to)
        result = await client.post("/api/v1/auth/otp/verify", headers=me.headers, json={"channel": channel, "code": code})
        assert result.status_code == 200
    assert result.json()["both_verified"] is True
    assert (await client.get("/api/v1/users/me", headers=me.headers)).json()["verification"]["both"] is True


async def test_sms_without_a_phone_is_409(client: AsyncTestClient[Litestar]) -> None:
    me = await register_and_login(client)
    assert await send(client, me, "sms") == 409


async def test_codes_are_stored_hashed_with_a_ttl(client: AsyncTestClient[Litestar], settings: Settings) -> None:
    me = await register_and_login(client)
    await send(client, me)
    code = await latest_code(client, me.email)
    redis = Redis.from_url(settings.redis_url)
    try:
        key = f"identity:otp:{me.user_id}:email"
        stored = await redis.hgetall(key)
        assert code.encode() not in b"".join(stored.values())
        assert 0 < await redis.ttl(key) <= identity_otp.OTP_TTL_S
        # Once the TTL passes the code is gone: simulate it by expiring the key now.
        await redis.expire(key, 1)
        await redis.delete(key)
    finally:
        await redis.aclose()
    gone = await client.post("/api/v1/auth/otp/verify", headers=me.headers, json={"channel": "email", "code": code})
    assert gone.status_code == 400 and gone.json()["type"].endswith("/otp-expired")


async def test_brute_force_burns_the_code_after_max_attempts(client: AsyncTestClient[Litestar]) -> None:
    me = await register_and_login(client)
    await send(client, me)
    code = await latest_code(client, me.email)
    lefts = []
    for _ in range(identity_otp.MAX_ATTEMPTS):
        response = await client.post("/api/v1/auth/otp/verify", headers=me.headers,
                                     json={"channel": "email", "code": wrong(code)})
        assert response.status_code == 400
        lefts.append(response.json()["attempts_left"])
    assert lefts == list(range(identity_otp.MAX_ATTEMPTS - 1, -1, -1))
    # Even the right code fails now: the guesser has to ask for (and wait for) a new one.
    late = await client.post("/api/v1/auth/otp/verify", headers=me.headers, json={"channel": "email", "code": code})
    assert late.status_code == 400 and late.json()["type"].endswith("/otp-expired")
    assert (await client.get("/api/v1/users/me", headers=me.headers)).json()["verification"]["email"] is False


async def test_resend_waits_for_the_cooldown_and_sends_are_capped(client: AsyncTestClient[Litestar],
                                                                  settings: Settings) -> None:
    me = await register_and_login(client)
    assert await send(client, me) == 202
    cooldown = await client.post("/api/v1/auth/otp/send", headers=me.headers, json={"channel": "email"})
    assert cooldown.status_code == 429
    assert 0 < int(cooldown.headers["retry-after"]) <= identity_otp.RESEND_COOLDOWN_S
    redis = Redis.from_url(settings.redis_url)
    try:
        for _ in range(identity_otp.MAX_SENDS_PER_HOUR - 1):
            await redis.delete(f"identity:otp:{me.user_id}:email:cooldown")  # skip the wait, not the cap
            assert await send(client, me) == 202
        await redis.delete(f"identity:otp:{me.user_id}:email:cooldown")
    finally:
        await redis.aclose()
    capped = await client.post("/api/v1/auth/otp/send", headers=me.headers, json={"channel": "email"})
    assert capped.status_code == 429 and capped.json()["type"].endswith("/otp-send-limit")


async def test_malformed_codes_are_422_and_do_not_spend_attempts(client: AsyncTestClient[Litestar]) -> None:
    me = await register_and_login(client)
    await send(client, me)
    code = await latest_code(client, me.email)
    for bad in ("12345", "abcdef", "1234567"):
        response = await client.post("/api/v1/auth/otp/verify", headers=me.headers, json={"channel": "email", "code": bad})
        assert response.status_code == 422
    assert (await client.post("/api/v1/auth/otp/verify", headers=me.headers,
                              json={"channel": "email", "code": code})).status_code == 200


async def test_otp_routes_need_a_login(client: AsyncTestClient[Litestar]) -> None:
    assert (await client.post("/api/v1/auth/otp/send", json={"channel": "email"})).status_code == 401
    assert (await client.post("/api/v1/auth/otp/verify", json={"channel": "email", "code": "123456"})).status_code == 401


async def test_dev_outbox_is_404_outside_dev_and_test(settings: Settings) -> None:
    import msgspec

    prod = msgspec.structs.replace(settings, env="prod")
    async with AsyncTestClient(app=create_app(prod)) as client:
        assert (await client.get("/api/v1/dev/outbox")).status_code == 404
