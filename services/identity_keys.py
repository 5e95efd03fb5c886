"""Service-to-service API keys: created by admins, shown once, stored hashed, scoped, revocable.

A key reads `ftk_<prefix>_<secret>`. The prefix (public, unique) finds the row; only the
SHA-256 of the secret is stored. Secrets are 256 random bits, so a fast hash is enough
(no password-style stretching needed), and the comparison is constant-time.
"""

from __future__ import annotations

import hmac
import re
import secrets
import uuid
from datetime import datetime

import msgspec

from api.problems import Problem
from db import identity as db
from services.identity_common import IdentityContext, sha256

KEY_PREFIX = "ftk"
_KEY_RE = re.compile(r"^ftk_([0-9a-f]{12})_([A-Za-z0-9_\-]{43})$")
SCOPE_RE = re.compile(r"^[a-z][a-z0-9_]*(:[a-z][a-z0-9_]*){1,3}$")
MAX_SCOPES = 32
KEYS_PAGE_MAX = 100
# last_used_at is written at most once per key per minute, not on every request.
_TOUCH_EVERY_S = 60


class ApiKeyPrincipal(msgspec.Struct, frozen=True):
    key_id: uuid.UUID
    name: str
    scopes: list[str]


class CreatedKey(msgspec.Struct, frozen=True):
    row: db.ApiKeyRow
    key: str  # the only time the full key exists outside the caller


def validate_scopes(scopes: list[str]) -> list[str]:
    bad = [s for s in scopes if not SCOPE_RE.match(s)]
    if bad or not scopes or len(scopes) > MAX_SCOPES:
        raise Problem(422, "validation-error", "Invalid scopes.",
                      errors=[{"field": "scopes", "source": "body",
                               "message": f"1..{MAX_SCOPES} scopes like 'identity:email:read'"}])
    return sorted(set(scopes))


async def create_key(ctx: IdentityContext, *, name: str, scopes: list[str], created_by: uuid.UUID) -> CreatedKey:
    scopes = validate_scopes(scopes)
    prefix = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    row = await db.insert_api_key(ctx.pool, key_id=uuid.uuid4(), prefix=prefix, secret_hash=sha256(secret),
                                  name=name, scopes=scopes, created_by=created_by)
    return CreatedKey(row, f"{KEY_PREFIX}_{prefix}_{secret}")


async def authenticate_key(ctx: IdentityContext, presented: str) -> ApiKeyPrincipal | None:
    """The key's principal, or None for a malformed, unknown, wrong or revoked key."""
    match = _KEY_RE.match(presented)
    if match is None:
        return None
    prefix, secret = match.groups()
    row = await db.api_key_by_prefix(ctx.pool, prefix)
    if row is None or row.revoked_at is not None:
        return None
    if not hmac.compare_digest(row.secret_hash, sha256(secret)):
        return None
    if await ctx.redis.set(f"identity:keyused:{row.id}", "1", ex=_TOUCH_EVERY_S, nx=True):
        await db.touch_api_key(ctx.pool, row.id)
    return ApiKeyPrincipal(row.id, row.name, row.scopes)


async def list_keys(ctx: IdentityContext, *, after: tuple[datetime, uuid.UUID] | None,
                    limit: int) -> list[db.ApiKeyRow]:
    assert 1 <= limit <= KEYS_PAGE_MAX + 1  # +1: the page plus a peek at the next
    return await db.list_api_keys(ctx.pool, after=after, limit=limit)


async def revoke_key(ctx: IdentityContext, key_id: uuid.UUID) -> bool:
    return await db.revoke_api_key(ctx.pool, key_id) is not None
