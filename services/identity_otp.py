"""One-time codes that verify a user's email or phone.

A code is 6 random digits, stored in Redis only as an HMAC (see keyed_hash) with a TTL.
Bounds, so guessing cannot win: MAX_ATTEMPTS wrong tries burn the code, a new code needs
RESEND_COOLDOWN_S, and at most MAX_SENDS_PER_HOUR codes per channel per hour — at most
25 guesses an hour against 10^6 codes. Attempts are counted atomically (HINCRBY) before
comparing, so concurrent guesses cannot exceed the bound.
"""

from __future__ import annotations

import hmac
import secrets
import uuid
from typing import Literal

import msgspec

from api.problems import Problem
from db import identity as db
from services import identity_events as ev
from services.identity_common import IdentityContext, incr_window, keyed_hash, redis_text
from services.notify import DeliveryError, Message, Notifier
from streams import identity as events

Channel = Literal["email", "sms"]
CODE_DIGITS = 6
OTP_TTL_S = 300
MAX_ATTEMPTS = 5
RESEND_COOLDOWN_S = 60
MAX_SENDS_PER_HOUR = 5


class OtpSent(msgspec.Struct, frozen=True):
    channel: Channel
    sent_to: str  # masked
    expires_in: int
    resend_after: int


class OtpVerified(msgspec.Struct, frozen=True):
    channel: Channel
    email_verified: bool
    phone_verified: bool
    both_verified: bool


def _keys(user_id: uuid.UUID, channel: Channel) -> tuple[str, str, str]:
    base = f"identity:otp:{user_id}:{channel}"
    return base, base + ":cooldown", base + ":sends"


def mask_destination(channel: Channel, to: str) -> str:
    if channel == "sms":
        return to[:3] + "*" * max(len(to) - 5, 0) + to[-2:]
    local, _, domain = to.partition("@")
    return f"{local[:1]}***@{domain}"


async def send_code(ctx: IdentityContext, user_id: uuid.UUID, channel: Channel, notifier: Notifier) -> OtpSent:
    user = await db.user_by_id(ctx.pool, user_id)
    if user is None:
        raise Problem(404, "not-found", "User not found.")
    destination = user.email if channel == "email" else user.phone
    if destination is None:
        raise Problem(409, "no-phone", "Add a phone number before verifying it.")
    code_key, cooldown_key, sends_key = _keys(user_id, channel)
    await _reserve_send(ctx, cooldown_key, sends_key)
    code = f"{secrets.randbelow(10 ** CODE_DIGITS):0{CODE_DIGITS}d}"
    pipe = ctx.redis.pipeline(transaction=True)
    pipe.delete(code_key).hset(code_key, mapping={"h": _digest(ctx, user_id, channel, code), "a": 0})
    pipe.expire(code_key, OTP_TTL_S)
    await pipe.execute()
    try:
        await notifier.send(Message(channel=channel, to=destination, subject="Your Fintide verification code",
                                    body=f"Your Fintide code is {code}. It expires in {OTP_TTL_S // 60} minutes."))
    except DeliveryError:
        await ctx.redis.delete(code_key, cooldown_key)
        raise Problem(503, "delivery-failed", "The code could not be delivered; try again later.") from None
    return OtpSent(channel, mask_destination(channel, destination), OTP_TTL_S, RESEND_COOLDOWN_S)


async def _reserve_send(ctx: IdentityContext, cooldown_key: str, sends_key: str) -> None:
    if not await ctx.redis.set(cooldown_key, "1", ex=RESEND_COOLDOWN_S, nx=True):
        wait = await ctx.redis.ttl(cooldown_key)
        raise Problem(429, "otp-cooldown", "A code was sent moments ago; wait before asking again.",
                      headers={"Retry-After": str(max(int(wait), 1))})
    sends, ttl = await incr_window(ctx.redis, sends_key, 3600)
    if sends > MAX_SENDS_PER_HOUR:
        raise Problem(429, "otp-send-limit", "Too many codes requested; try again later.",
                      headers={"Retry-After": str(max(int(ttl), 1))})


def _digest(ctx: IdentityContext, user_id: uuid.UUID, channel: Channel, code: str) -> str:
    return keyed_hash(ctx.settings, "otp", f"{user_id}:{channel}:{code}")


async def verify_code(ctx: IdentityContext, user_id: uuid.UUID, channel: Channel, code: str) -> OtpVerified:
    if len(code) != CODE_DIGITS or not code.isdigit():
        raise Problem(422, "validation-error", "The code is 6 digits.",
                      errors=[{"field": "code", "message": "must be exactly 6 digits", "source": "body"}])
    code_key = _keys(user_id, channel)[0]
    stored = redis_text(await ctx.redis.hget(code_key, "h"))
    if stored is None:
        raise Problem(400, "otp-expired", "No active code; request a new one.")
    attempts = int(await ctx.redis.hincrby(code_key, "a", 1))
    if attempts > MAX_ATTEMPTS:
        await ctx.redis.delete(code_key)
        raise Problem(400, "otp-expired", "No active code; request a new one.")
    if not hmac.compare_digest(stored, _digest(ctx, user_id, channel, code)):
        left = MAX_ATTEMPTS - attempts
        if left <= 0:
            await ctx.redis.delete(code_key)  # burnt: the next guess needs a new code
        raise Problem(400, "otp-invalid", "The code is wrong.", attempts_left=left)
    await ctx.redis.delete(code_key)
    return await _mark_verified(ctx, user_id, channel)


async def _mark_verified(ctx: IdentityContext, user_id: uuid.UUID, channel: Channel) -> OtpVerified:
    async with ctx.pool.acquire() as conn, conn.transaction():
        user = await db.user_by_id(conn, user_id)
        if user is None:
            raise Problem(404, "not-found", "User not found.")
        if channel == "email":
            await db.mark_email_verified(conn, user.email_address_id)
        else:
            await db.mark_phone_verified(conn, user_id)
        email_ok = channel == "email" or user.email_verified_at is not None
        phone_ok = channel == "sms" or user.phone_verified_at is not None
        await ev.record(conn, events.UserVerified(**ev.new_meta(user_id), email=email_ok, phone=phone_ok,
                                                  both=email_ok and phone_ok))
    await ev.relay(ctx)
    return OtpVerified(channel, email_ok, phone_ok, email_ok and phone_ok)
