"""Passwords, logins, sessions, refresh-token rotation and the per-request authz lookup.

A session is one login: a refresh-token family. Access tokens carry its id (`sid`);
refresh tokens are opaque random strings stored only as SHA-256. Each refresh marks the
presented token used and issues a new one; presenting a used token again means it was
stolen or replayed, so the whole session is revoked.

Per-request state lives in Redis, written through from PostgreSQL:
  identity:sess:<sid>   "1" live / "0" revoked (TTL = session lifetime)
  identity:authz:<uid>  {"roles": [...], "kind": ..., "active": bool} (TTL 1 h, refreshed
                        on every role or status change, so changes apply on the next request)
A cache miss falls back to PostgreSQL and refills the key.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import uuid
from datetime import datetime, timedelta

import msgspec
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from api.problems import Problem
from db import identity as db
from services import identity_events as ev
from services.identity_common import (NIL_UUID, IdentityContext, incr_window, keyed_hash, redis_text, sha256,
                                      utcnow)
from streams import identity as events

log = logging.getLogger("fintide.identity.auth")

# OWASP's argon2id minimum (19 MiB, t=2, p=1): ~45 ms here, so a login burst does not
# starve two cores; parameters live in each hash, so raising them later rehashes on login.
_hasher = PasswordHasher(time_cost=2, memory_cost=19456, parallelism=1)
# Verified when an email matches no account, so unknown and known emails take equal time.
_DUMMY_HASH = _hasher.hash("fintide-dummy-password-for-timing")

PASSWORD_MIN_LEN = 10
PASSWORD_MAX_LEN = 128  # argon2 cost is per byte hashed only up to a point; cap input anyway
_COMMON_PASSWORDS = frozenset({
    "password123", "password1234", "1234567890", "qwertyuiop", "iloveyou123", "letmein123",
    "welcome123", "admin12345", "passw0rd123", "abc1234567", "qwerty12345", "1q2w3e4r5t",
})

AUTHZ_TTL_S = 3600
LOGIN_WINDOW_S = 15 * 60
LOGIN_MAX_FAILURES_PER_ACCOUNT = 5
LOGIN_MAX_FAILURES_PER_IP = 20
SESSIONS_PAGE_MAX = 100


class Authz(msgspec.Struct, frozen=True):
    roles: list[str]
    kind: str
    active: bool


class Grant(msgspec.Struct, frozen=True):
    """What a successful login or refresh yields; the API turns it into tokens."""
    user_id: uuid.UUID
    session_id: uuid.UUID
    roles: list[str]
    refresh_token: str
    refresh_expires_at: datetime


# --- passwords --------------------------------------------------------------------------

def password_problems(password: str, email: str) -> list[str]:
    """Why a password is too weak (empty when acceptable)."""
    found: list[str] = []
    if len(password) < PASSWORD_MIN_LEN:
        found.append(f"must be at least {PASSWORD_MIN_LEN} characters")
    if len(password) > PASSWORD_MAX_LEN:
        found.append(f"must be at most {PASSWORD_MAX_LEN} characters")
    if not any(c.isalpha() for c in password) or not any(not c.isalpha() for c in password):
        found.append("must mix letters with digits or symbols")
    if password.lower() in _COMMON_PASSWORDS:
        found.append("is too common")
    local = email.split("@", 1)[0]
    if len(local) >= 4 and local in password.lower():
        found.append("must not contain your email name")
    return found


def check_password_policy(password: str, email: str) -> None:
    if found := password_problems(password, email):
        raise Problem(422, "weak-password", "The password does not meet the policy.",
                      errors=[{"field": "password", "message": m, "source": "body"} for m in found])


async def hash_password(password: str) -> str:
    # Hashing is deliberately slow CPU work: keep it off the event loop.
    return await asyncio.to_thread(_hasher.hash, password)


async def verify_password(password_hash: str, password: str) -> bool:
    def check() -> bool:
        try:
            return _hasher.verify(password_hash, password)
        except (VerificationError, InvalidHashError):
            return False
    return await asyncio.to_thread(check)


# --- authz cache --------------------------------------------------------------------------

def _authz_key(user_id: uuid.UUID) -> str:
    return f"identity:authz:{user_id}"


def _session_key(session_id: uuid.UUID | str) -> str:
    return f"identity:sess:{session_id}"


async def refresh_authz(ctx: IdentityContext, user_id: uuid.UUID) -> Authz | None:
    """Reload a user's roles and status from PostgreSQL into Redis (call after changes)."""
    user = await db.user_by_id(ctx.pool, user_id)
    if user is None:
        await ctx.redis.delete(_authz_key(user_id))
        return None
    authz = Authz(roles=user.roles, kind=user.kind, active=user.status == "active")
    await ctx.redis.set(_authz_key(user_id), msgspec.json.encode(authz), ex=AUTHZ_TTL_S)
    return authz


async def principal(ctx: IdentityContext, user_id: uuid.UUID, session_id: uuid.UUID) -> Authz | None:
    """Roles of a live, active user on a live session; None means: reject the token."""
    raw_authz, raw_session = await ctx.redis.mget(_authz_key(user_id), _session_key(session_id))
    session_state = redis_text(raw_session)
    if session_state is None:
        session_state = await _reload_session_state(ctx, session_id, user_id)
    if session_state != "1":
        return None
    authz = (msgspec.json.decode(raw_authz, type=Authz) if raw_authz is not None
             else await refresh_authz(ctx, user_id))
    if authz is None or not authz.active:
        return None
    return authz


async def _reload_session_state(ctx: IdentityContext, session_id: uuid.UUID, user_id: uuid.UUID) -> str:
    session = await db.get_session(ctx.pool, session_id)
    live = (session is not None and session.user_id == user_id and session.revoked_at is None
            and session.expires_at > utcnow())
    # A revoked state is cached for one access-token lifetime: long enough for any token
    # that names this session to have expired.
    ttl = _session_ttl_s(session.expires_at) if live and session else ctx.settings.access_token_ttl_s
    await ctx.redis.set(_session_key(session_id), "1" if live else "0", ex=max(ttl, 1))
    return "1" if live else "0"


def _session_ttl_s(expires_at: datetime) -> int:
    return max(int((expires_at - utcnow()).total_seconds()), 1)


async def _mark_sessions_revoked(ctx: IdentityContext, session_ids: list[uuid.UUID]) -> None:
    if not session_ids:
        return
    pipe = ctx.redis.pipeline()
    for sid in session_ids:
        pipe.set(_session_key(sid), "0", ex=ctx.settings.access_token_ttl_s)
    await pipe.execute()


# --- login throttling -----------------------------------------------------------------------

def _fail_keys(ctx: IdentityContext, email: str, ip: str) -> tuple[str, str]:
    # Keyed by a hash of the email whether or not an account exists: same answer either way.
    return (f"identity:loginfail:acct:{keyed_hash(ctx.settings, 'login-throttle', email)}",
            f"identity:loginfail:ip:{ip}")


async def _check_throttle(ctx: IdentityContext, email: str, ip: str) -> None:
    acct_key, ip_key = _fail_keys(ctx, email, ip)
    pipe = ctx.redis.pipeline()
    pipe.get(acct_key).ttl(acct_key).get(ip_key).ttl(ip_key)
    acct, acct_ttl, by_ip, ip_ttl = await pipe.execute()
    for count, ttl, limit in ((acct, acct_ttl, LOGIN_MAX_FAILURES_PER_ACCOUNT),
                              (by_ip, ip_ttl, LOGIN_MAX_FAILURES_PER_IP)):
        if count is not None and int(count) >= limit:
            retry_after = str(max(int(ttl), 1))
            raise Problem(429, "login-throttled", "Too many failed logins; try again later.",
                          headers={"Retry-After": retry_after})


async def _count_failure(ctx: IdentityContext, email: str, ip: str) -> None:
    for key in _fail_keys(ctx, email, ip):
        # The window starts at the first failure, so steady guessing cannot extend it.
        await incr_window(ctx.redis, key, LOGIN_WINDOW_S)


# --- login, refresh, logout -------------------------------------------------------------

INVALID_CREDENTIALS = "Invalid email or password."


async def login(ctx: IdentityContext, *, email: str, password: str, ip: str, user_agent: str | None) -> Grant:
    await _check_throttle(ctx, email, ip)
    user = await db.user_by_email(ctx.pool, email)
    ok = await verify_password(user.password_hash if user else _DUMMY_HASH, password)
    if user is None or not ok or user.status != "active":
        await _count_failure(ctx, email, ip)
        await _record_login_failure(ctx, user.id if user else NIL_UUID, ip,
                                    "disabled" if user and ok else "credentials")
        raise Problem(401, "invalid-credentials", INVALID_CREDENTIALS)
    await ctx.redis.delete(_fail_keys(ctx, email, ip)[0])
    if _hasher.check_needs_rehash(user.password_hash):
        await db.set_password_hash(ctx.pool, user.id, await hash_password(password))
    return await _open_session(ctx, user.id, user.roles, ip, user_agent)


async def _record_login_failure(ctx: IdentityContext, user_id: uuid.UUID, ip: str, reason: str) -> None:
    await ev.record(ctx.pool, events.LoginFailed(**ev.new_meta(user_id), ip=ip, reason=reason))
    await ev.relay(ctx)


async def _open_session(ctx: IdentityContext, user_id: uuid.UUID, roles: list[str], ip: str,
                        user_agent: str | None) -> Grant:
    session_id = uuid.uuid4()
    expires_at = utcnow() + timedelta(seconds=ctx.settings.refresh_token_ttl_s)
    refresh_token = secrets.token_urlsafe(32)
    async with ctx.pool.acquire() as conn, conn.transaction():
        await db.insert_session(conn, session_id=session_id, user_id=user_id, expires_at=expires_at,
                                user_agent=(user_agent or "")[:256] or None, ip=ip)
        await db.insert_refresh_token(conn, sha256(refresh_token), session_id, expires_at)
        await ev.record(conn, events.LoginSucceeded(**ev.new_meta(user_id), session_id=session_id, ip=ip))
    await ctx.redis.set(_session_key(session_id), "1", ex=_session_ttl_s(expires_at))
    await refresh_authz(ctx, user_id)
    await ev.relay(ctx)
    return Grant(user_id, session_id, roles, refresh_token, expires_at)


async def refresh(ctx: IdentityContext, refresh_token: str) -> Grant:
    """Rotate a refresh token. A reused token revokes its whole session (family) → 401."""
    rejected = Problem(401, "invalid-refresh-token", "The refresh token is invalid or expired.")
    if not 16 <= len(refresh_token) <= 128:
        raise rejected
    new_token = secrets.token_urlsafe(32)
    async with ctx.pool.acquire() as conn, conn.transaction():
        use = await db.use_refresh_token(conn, sha256(refresh_token))
        if use is None:
            raise rejected
        session = await db.get_session(conn, use.session_id)
        assert session is not None, "refresh tokens cascade-delete with their session"
        if use.already_used:
            revoked = await db.revoke_session(conn, session.id, "refresh-token-reuse")
            if revoked:
                await ev.record(conn, events.RefreshReused(**ev.new_meta(session.user_id), session_id=session.id))
        elif session.revoked_at is None and session.expires_at > utcnow() and not use.expired:
            await db.insert_refresh_token(conn, sha256(new_token), session.id, session.expires_at)
            await db.touch_session(conn, session.id)
        else:
            use = None
    # Decided outside the transaction so a reuse's revocation is committed before the 401.
    if use is None or use.already_used:
        if use is not None:
            log.warning("refresh token reuse; session family revoked", extra={"session_id": str(session.id)})
            await _mark_sessions_revoked(ctx, [session.id])
            await ev.relay(ctx)
        raise rejected
    authz = await principal(ctx, session.user_id, session.id)
    if authz is None:
        raise rejected
    return Grant(session.user_id, session.id, authz.roles, new_token, session.expires_at)


async def revoke_session(ctx: IdentityContext, user_id: uuid.UUID, session_id: uuid.UUID,
                         reason: str = "logout") -> bool:
    """Revoke one of the user's sessions; False when it is not theirs or already gone."""
    session = await db.get_session(ctx.pool, session_id)
    if session is None or session.user_id != user_id:
        return False
    revoked = await db.revoke_session(ctx.pool, session_id, reason)
    await _mark_sessions_revoked(ctx, [session_id])
    return revoked


async def revoke_all_sessions(ctx: IdentityContext, user_id: uuid.UUID, reason: str) -> int:
    revoked = await db.revoke_user_sessions(ctx.pool, user_id, reason)
    await _mark_sessions_revoked(ctx, revoked)
    return len(revoked)


async def list_sessions(ctx: IdentityContext, user_id: uuid.UUID, *, after: tuple[datetime, uuid.UUID] | None,
                        limit: int) -> list[db.SessionRow]:
    assert 1 <= limit <= SESSIONS_PAGE_MAX + 1  # +1: the page plus a peek at the next
    return await db.list_sessions(ctx.pool, user_id, after=after, limit=limit)
