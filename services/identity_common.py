"""What every identity operation is given, and the small rules they share.

`IdentityContext` bundles settings, the identity pool, Redis and the event publisher so the
same operations run from API handlers and from the CLI (`create_admin`).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import unicodedata
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import asyncpg
from redis.asyncio import Redis

from api.problems import Problem
from ops.settings import Settings

ROLES = frozenset({"user", "trader", "instructor", "support", "auditor", "admin",
                   "seller", "buyer", "agent", "nbfc"})
# Staff roles: held only by platform users, never by customers.
STAFF_ROLES = frozenset({"support", "auditor", "admin"})
NIL_UUID = uuid.UUID(int=0)

EMAIL_MAX_LEN = 254
_EMAIL_RE = re.compile(r"^[^@\s\x00-\x1f]{1,64}@[^@\s\x00-\x1f]+\.[^@\s\x00-\x1f.]{2,}$")
_PHONE_RE = re.compile(r"^\+[1-9][0-9]{6,14}$")


@dataclass(frozen=True)
class IdentityContext:
    settings: Settings
    pool: asyncpg.Pool
    redis: Redis
    # The streams publisher (None while Kafka is not wired); events are kept in the outbox.
    publisher: Any = None


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def normalise_email(raw: str, field: str = "email") -> str:
    """NFKC, trimmed, lower-cased: the one spelling stored in the registry.

    The whole address is lower-cased (local part too) because the registry promises
    case-insensitive uniqueness; two customers can never hold Foo@x and foo@x.
    """
    email = unicodedata.normalize("NFKC", raw).strip().lower()
    if len(email) > EMAIL_MAX_LEN or not _EMAIL_RE.match(email):
        raise Problem(422, "validation-error", "Invalid email address.",
                      errors=[{"field": field, "message": "must be a valid email address", "source": "body"}])
    return email


def normalise_phone(raw: str) -> str:
    phone = re.sub(r"[\s\-().]", "", raw)
    if not _PHONE_RE.match(phone):
        raise Problem(422, "validation-error", "Invalid phone number.",
                      errors=[{"field": "phone", "message": "must be E.164, e.g. +919812345678",
                               "source": "body"}])
    return phone


def keyed_hash(settings: Settings, purpose: str, value: str) -> str:
    """HMAC-SHA256 under a key derived from jwt_secret, for values we must not store raw.

    Used for OTP codes (a plain SHA-256 of a 6-digit code is reversed by trying 10^6
    values) and for throttle keys derived from emails (no addresses in Redis key names).
    """
    key = hashlib.sha256(f"fintide:{purpose}:{settings.jwt_secret}".encode()).digest()
    return hmac.new(key, value.encode(), hashlib.sha256).hexdigest()


def mask_document_number(last4: str) -> str:
    """Only the last 4 characters of an identity document ever leave the service."""
    return "XXXXXX" + last4


def sha256(value: str) -> bytes:
    return hashlib.sha256(value.encode()).digest()


# INCR with a fixed window that starts at the first hit (EXPIRE NX needs Redis 7; we ship 6.2).
_INCR_WINDOW_LUA = """
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('EXPIRE', KEYS[1], ARGV[1]) end
return {n, redis.call('TTL', KEYS[1])}
"""


async def incr_window(redis: Redis, key: str, window_s: int) -> tuple[int, int]:
    """Count one hit in a fixed window; return (hits so far, seconds until the window ends)."""
    count, ttl = await redis.eval(_INCR_WINDOW_LUA, 1, key, window_s)
    return int(count), int(ttl)


def redis_text(value: bytes | str | None) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else value
