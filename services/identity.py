"""Identity domain operations shared by the API handlers and the CLI.

Users, the email registry, profiles, preferences, roles and the bootstrap admin. Login,
sessions and tokens are in identity_auth; OTP in identity_otp; KYC in identity_kyc; API
keys in identity_keys. Every operation takes an IdentityContext.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable
from datetime import datetime
from typing import Any

import asyncpg
import msgspec
from redis.asyncio import Redis

from api.problems import Problem
from db import identity as db
from db.engine import create_pool, dsn_for
from ops.settings import Settings
from services import identity_auth, identity_events as ev
from services.identity_common import (ROLES, STAFF_ROLES, IdentityContext, mask_document_number, normalise_email,
                                      normalise_phone)
from streams import identity as events

USERNAME_RE = re.compile(r"^[A-Za-z0-9_.\-]{3,32}$")
NAME_MAX_LEN = 100
PREFERENCES_MAX_KEYS = 64
PREFERENCE_KEY_RE = re.compile(r"^[a-z0-9_.\-]{1,64}$")
PREFERENCE_VALUE_MAX_LEN = 256

PreferenceValue = str | int | float | bool | None


# --- response shapes (msgspec Structs the handlers return as they are) ----------------

class Verification(msgspec.Struct, frozen=True):
    email: bool
    phone: bool
    both: bool


class KycSummary(msgspec.Struct, frozen=True):
    status: str  # none | pending | approved | rejected
    document_type: str | None = None
    document_number_masked: str | None = None
    submitted_at: datetime | None = None
    decided_at: datetime | None = None
    reason: str | None = None


class Profile(msgspec.Struct, frozen=True):
    id: uuid.UUID
    email: str
    email_address_id: uuid.UUID
    kind: str
    status: str
    roles: list[str]
    first_name: str | None
    last_name: str | None
    username: str | None
    phone: str | None
    verification: Verification
    kyc: KycSummary
    created_at: datetime


class Preferences(msgspec.Struct, frozen=True):
    user_id: uuid.UUID
    preferences: dict[str, PreferenceValue]


class EmailRecord(msgspec.Struct, frozen=True):
    email_address_id: uuid.UUID
    email: str
    verified: bool
    created_at: datetime


class RolesChanged(msgspec.Struct, frozen=True):
    user_id: uuid.UUID
    roles: list[str]
    granted: list[str]
    revoked: list[str]


# --- registration --------------------------------------------------------------------------

def _clean_name(value: str | None, field: str) -> str | None:
    if value is None:
        return None
    value = value.strip()
    if len(value) > NAME_MAX_LEN or any(ord(c) < 32 for c in value):
        raise Problem(422, "validation-error", f"Invalid {field}.",
                      errors=[{"field": field, "message": f"at most {NAME_MAX_LEN} printable characters",
                               "source": "body"}])
    return value or None


def _check_username(username: str | None) -> str | None:
    if username is None:
        return None
    if not USERNAME_RE.match(username):
        raise Problem(422, "validation-error", "Invalid username.",
                      errors=[{"field": "username", "message": "3-32 letters, digits, '_', '.', '-'",
                               "source": "body"}])
    return username


async def register(ctx: IdentityContext, *, email: str, password: str, phone: str | None = None,
                   first_name: str | None = None, last_name: str | None = None, username: str | None = None,
                   kind: str = "customer", roles: Iterable[str] = ("user",),
                   granted_by: uuid.UUID | None = None) -> Profile:
    """Create a user. 409 when the email (or username) already belongs to a user.

    The email may already be in the registry (upserted by another service): registering
    attaches the new user to that registry entry rather than creating a duplicate.
    """
    assert kind in ("customer", "platform")
    email = normalise_email(email)
    identity_auth.check_password_policy(password, email)
    role_set = _checked_roles(set(roles) | {"user"}, kind)
    phone = normalise_phone(phone) if phone else None
    first_name, last_name = _clean_name(first_name, "first_name"), _clean_name(last_name, "last_name")
    username = _check_username(username)
    password_hash = await identity_auth.hash_password(password)
    user_id = uuid.uuid4()
    try:
        async with ctx.pool.acquire() as conn, conn.transaction():
            email_row, _ = await db.upsert_email(conn, email)
            # Serialise concurrent registrations of one address on its registry row.
            await conn.execute("SELECT 1 FROM identity.email_addresses WHERE id = $1 FOR UPDATE", email_row.id)
            if await db.user_exists_for_email(conn, email_row.id):
                raise Problem(409, "email-taken", "An account with this email already exists.")
            if username and await db.username_taken(conn, username):
                raise Problem(409, "username-taken", "This username is taken.")
            await db.insert_user(conn, user_id=user_id, email_id=email_row.id, kind=kind,
                                 password_hash=password_hash, first_name=first_name, surname=last_name,
                                 username=username, phone=phone)
            await db.grant_roles(conn, user_id, sorted(role_set), granted_by)
            await ev.record(conn, events.UserCreated(**ev.new_meta(user_id), kind=kind,
                                                     email_address_id=email_row.id))
    except asyncpg.UniqueViolationError:
        # Backstop for a race the row lock did not cover (e.g. the username index).
        raise Problem(409, "conflict", "An account with these details already exists.") from None
    await ev.relay(ctx)
    return await get_profile(ctx, user_id)


def _checked_roles(roles: set[str], kind: str) -> set[str]:
    unknown = roles - ROLES
    if unknown:
        raise Problem(422, "validation-error", "Unknown roles.",
                      errors=[{"field": "roles", "message": f"unknown: {sorted(unknown)}; allowed: {sorted(ROLES)}",
                               "source": "body"}])
    if kind == "customer" and roles & STAFF_ROLES:
        raise Problem(422, "staff-role-needs-platform-user",
                      "Support, auditor and admin roles can only be held by platform users.",
                      errors=[{"field": "roles", "message": f"customers cannot hold {sorted(roles & STAFF_ROLES)}",
                               "source": "body"}])
    return roles


async def create_admin(settings: Settings, email: str, password: str) -> uuid.UUID:
    """Create (or confirm) a platform admin; returns the user id. Idempotent.

    For `fintide admin create` and `fintide up`: the schema must be migrated first. An
    existing platform user with this email is granted admin (its password is left as it
    is); an existing customer is refused, since staff and customers stay apart.
    Raises api.problems.Problem (422 weak password / bad email, 409 customer email).
    """
    pool = await create_pool(dsn_for(settings.database_url, "identity"), min_size=1, max_size=2)
    # Redis is optional here (`fintide admin create` may run with only a database URL):
    # registering never touches it; it only refreshes the authz cache of an existing user.
    redis = Redis.from_url(settings.redis_url) if settings.redis_url else None
    ctx = IdentityContext(settings=settings, pool=pool, redis=redis)  # type: ignore[arg-type]
    try:
        existing = await db.user_by_email(pool, normalise_email(email))
        if existing is None:
            profile = await register(ctx, email=email, password=password, kind="platform",
                                     roles=("user", "admin"))
            return profile.id
        if existing.kind != "platform":
            raise Problem(409, "email-taken", "This email belongs to a customer; admins must be platform users.")
        if "admin" not in existing.roles:
            await db.grant_roles(pool, existing.id, ["admin"], None)
            if redis is not None:
                await identity_auth.refresh_authz(ctx, existing.id)
        return existing.id
    finally:
        await pool.close()
        if redis is not None:
            await redis.aclose()


# --- profiles and preferences ------------------------------------------------------------------

async def get_profile(ctx: IdentityContext, user_id: uuid.UUID) -> Profile:
    user = await db.user_by_id(ctx.pool, user_id)
    if user is None:
        raise Problem(404, "not-found", "User not found.")
    kyc = await db.latest_kyc(ctx.pool, user_id)
    email_ok, phone_ok = user.email_verified_at is not None, user.phone_verified_at is not None
    summary = KycSummary(status=user.kyc_status) if kyc is None else KycSummary(
        status=user.kyc_status, document_type=kyc.document_type,
        document_number_masked=mask_document_number(kyc.document_number_last4),
        submitted_at=kyc.submitted_at, decided_at=kyc.decided_at, reason=kyc.reason)
    return Profile(id=user.id, email=user.email, email_address_id=user.email_address_id, kind=user.kind,
                   status=user.status, roles=user.roles, first_name=user.first_name, last_name=user.surname,
                   username=user.username, phone=user.phone,
                   verification=Verification(email_ok, phone_ok, email_ok and phone_ok),
                   kyc=summary, created_at=user.created_at)


async def get_preferences(ctx: IdentityContext, user_id: uuid.UUID) -> Preferences:
    await _require_user(ctx, user_id)
    return Preferences(user_id, await db.get_preferences(ctx.pool, user_id))


async def put_preferences(ctx: IdentityContext, user_id: uuid.UUID, data: dict[str, Any]) -> Preferences:
    _check_preferences(data)
    await _require_user(ctx, user_id)
    await db.put_preferences(ctx.pool, user_id, data)
    return Preferences(user_id, data)


def _check_preferences(data: dict[str, Any]) -> None:
    errors: list[dict[str, Any]] = []
    if len(data) > PREFERENCES_MAX_KEYS:
        errors.append({"field": "preferences", "message": f"at most {PREFERENCES_MAX_KEYS} keys"})
    for key, value in data.items():
        if not PREFERENCE_KEY_RE.match(key):
            errors.append({"field": key[:64], "message": "keys are 1-64 of [a-z0-9_.-]"})
        elif isinstance(value, str) and len(value) > PREFERENCE_VALUE_MAX_LEN:
            errors.append({"field": key, "message": f"at most {PREFERENCE_VALUE_MAX_LEN} characters"})
    if errors:
        raise Problem(422, "validation-error", "Invalid preferences.",
                      errors=[{**e, "source": "body"} for e in errors[:20]])


async def _require_user(ctx: IdentityContext, user_id: uuid.UUID) -> None:
    if await db.user_by_id(ctx.pool, user_id) is None:
        raise Problem(404, "not-found", "User not found.")


# --- roles ------------------------------------------------------------------------------

async def set_roles(ctx: IdentityContext, *, actor_id: uuid.UUID, user_id: uuid.UUID,
                    roles: Iterable[str]) -> RolesChanged:
    """Replace a user's roles (grant the new, revoke the missing); effective next request."""
    wanted = set(roles) | {"user"}
    async with ctx.pool.acquire() as conn, conn.transaction():
        kind = await db.lock_user(conn, user_id)
        if kind is None:
            raise Problem(404, "not-found", "User not found.")
        wanted = _checked_roles(wanted, kind)
        if actor_id == user_id and "admin" not in wanted:
            raise Problem(409, "cannot-drop-own-admin", "Admins cannot remove their own admin role.")
        current = set(await db.roles_of(conn, user_id))
        granted, revoked = sorted(wanted - current), sorted(current - wanted)
        await db.grant_roles(conn, user_id, granted, actor_id)
        await db.revoke_roles(conn, user_id, revoked)
        if granted or revoked:
            await ev.record(conn, events.RoleChanged(**ev.new_meta(user_id), roles=sorted(wanted),
                                                     granted=granted, revoked=revoked, changed_by=actor_id))
    await identity_auth.refresh_authz(ctx, user_id)
    await ev.relay(ctx)
    return RolesChanged(user_id, sorted(wanted), granted, revoked)


# --- email registry (003: the single source of truth for addresses) -----------------------

async def upsert_email(ctx: IdentityContext, email: str) -> tuple[EmailRecord, bool]:
    row, created = await db.upsert_email(ctx.pool, normalise_email(email))
    return EmailRecord(row.id, row.email, row.verified_at is not None, row.created_at), created


async def lookup_email(ctx: IdentityContext, email: str) -> EmailRecord:
    row = await db.get_email(ctx.pool, normalise_email(email))
    if row is None:
        raise Problem(404, "not-found", "Email address not registered.")
    return EmailRecord(row.id, row.email, row.verified_at is not None, row.created_at)
