"""Rows and queries of the `identity` schema; only the identity service calls these.

Every function takes an asyncpg connection or pool (both have fetch/fetchrow/execute), so
callers choose the transaction. Rows come back as frozen msgspec Structs.
"""

from __future__ import annotations

import uuid
from datetime import date, datetime
from typing import Any, Protocol

import msgspec


class Queryable(Protocol):
    async def fetch(self, query: str, *args: Any) -> list[Any]: ...
    async def fetchrow(self, query: str, *args: Any) -> Any: ...
    async def fetchval(self, query: str, *args: Any) -> Any: ...
    async def execute(self, query: str, *args: Any) -> str: ...


class EmailRow(msgspec.Struct, frozen=True):
    id: uuid.UUID
    email: str
    verified_at: datetime | None
    created_at: datetime


class UserRow(msgspec.Struct, frozen=True):
    id: uuid.UUID
    email_address_id: uuid.UUID
    email: str
    email_verified_at: datetime | None
    kind: str
    password_hash: str
    status: str
    kyc_status: str
    created_at: datetime
    first_name: str | None
    surname: str | None
    username: str | None
    phone: str | None
    phone_verified_at: datetime | None
    roles: list[str]


class SessionRow(msgspec.Struct, frozen=True):
    id: uuid.UUID
    user_id: uuid.UUID
    created_at: datetime
    last_used_at: datetime
    expires_at: datetime
    revoked_at: datetime | None
    user_agent: str | None
    ip: str | None


class KycRow(msgspec.Struct, frozen=True):
    id: uuid.UUID
    user_id: uuid.UUID
    document_type: str
    document_number_enc: bytes
    document_number_last4: str
    address: dict[str, Any]
    date_of_birth: date
    status: str
    reason: str | None
    submitted_at: datetime
    decided_at: datetime | None
    decided_by: uuid.UUID | None


class ApiKeyRow(msgspec.Struct, frozen=True):
    id: uuid.UUID
    prefix: str
    secret_hash: bytes
    name: str
    scopes: list[str]
    created_by: uuid.UUID
    created_at: datetime
    revoked_at: datetime | None
    last_used_at: datetime | None


def _row(cls: type[Any], record: Any) -> Any:
    return None if record is None else msgspec.convert(dict(record), cls)


# --- email registry ---------------------------------------------------------------------

async def upsert_email(db: Queryable, email: str) -> tuple[EmailRow, bool]:
    """The registry row for an already-normalised email, and whether it was created now."""
    record = await db.fetchrow(
        "INSERT INTO identity.email_addresses (id, email) VALUES ($1, $2) "
        "ON CONFLICT (email) DO NOTHING RETURNING id, email, verified_at, created_at",
        uuid.uuid4(), email)
    if record is not None:
        return _row(EmailRow, record), True
    existing = await get_email(db, email)
    assert existing is not None, "an email that conflicted on insert must exist"
    return existing, False


async def get_email(db: Queryable, email: str) -> EmailRow | None:
    return _row(EmailRow, await db.fetchrow(
        "SELECT id, email, verified_at, created_at FROM identity.email_addresses WHERE email = $1", email))


async def get_email_by_id(db: Queryable, email_id: uuid.UUID) -> EmailRow | None:
    return _row(EmailRow, await db.fetchrow(
        "SELECT id, email, verified_at, created_at FROM identity.email_addresses WHERE id = $1", email_id))


async def mark_email_verified(db: Queryable, email_id: uuid.UUID) -> None:
    await db.execute("UPDATE identity.email_addresses SET verified_at = coalesce(verified_at, now()), "
                     "updated_at = now() WHERE id = $1", email_id)


# --- users ------------------------------------------------------------------------------

_USER_SELECT = """
SELECT u.id, u.email_address_id, e.email, e.verified_at AS email_verified_at, u.kind,
       u.password_hash, u.status, u.kyc_status, u.created_at,
       p.first_name, p.surname, p.username, m.phone, m.verified_at AS phone_verified_at,
       coalesce((SELECT array_agg(r.role ORDER BY r.role) FROM identity.user_roles r
                 WHERE r.user_id = u.id), '{}') AS roles
FROM identity.users u
JOIN identity.email_addresses e ON e.id = u.email_address_id
LEFT JOIN identity.people p ON p.user_id = u.id
LEFT JOIN identity.mobile_numbers m ON m.user_id = u.id
"""


async def user_by_id(db: Queryable, user_id: uuid.UUID) -> UserRow | None:
    return _row(UserRow, await db.fetchrow(_USER_SELECT + "WHERE u.id = $1", user_id))


async def user_by_email(db: Queryable, email: str) -> UserRow | None:
    return _row(UserRow, await db.fetchrow(_USER_SELECT + "WHERE e.email = $1", email))


async def user_exists_for_email(db: Queryable, email_id: uuid.UUID) -> bool:
    return bool(await db.fetchval(
        "SELECT EXISTS (SELECT 1 FROM identity.users WHERE email_address_id = $1)", email_id))


async def insert_user(db: Queryable, *, user_id: uuid.UUID, email_id: uuid.UUID, kind: str,
                      password_hash: str, first_name: str | None, surname: str | None,
                      username: str | None, phone: str | None) -> None:
    await db.execute("INSERT INTO identity.users (id, email_address_id, kind, password_hash) "
                     "VALUES ($1, $2, $3, $4)", user_id, email_id, kind, password_hash)
    await db.execute("INSERT INTO identity.people (user_id, first_name, surname, username) "
                     "VALUES ($1, $2, $3, $4)", user_id, first_name, surname, username)
    if phone is not None:
        await db.execute("INSERT INTO identity.mobile_numbers (user_id, phone) VALUES ($1, $2)",
                         user_id, phone)


async def username_taken(db: Queryable, username: str) -> bool:
    return bool(await db.fetchval(
        "SELECT EXISTS (SELECT 1 FROM identity.people WHERE lower(username) = lower($1))", username))


async def set_password_hash(db: Queryable, user_id: uuid.UUID, password_hash: str) -> None:
    await db.execute("UPDATE identity.users SET password_hash = $2, updated_at = now() WHERE id = $1",
                     user_id, password_hash)


async def mark_phone_verified(db: Queryable, user_id: uuid.UUID) -> None:
    await db.execute("UPDATE identity.mobile_numbers SET verified_at = coalesce(verified_at, now()), "
                     "updated_at = now() WHERE user_id = $1", user_id)


async def lock_user(db: Queryable, user_id: uuid.UUID) -> str | None:
    """Lock the user's row for this transaction; return its kind (None when absent)."""
    return await db.fetchval("SELECT kind FROM identity.users WHERE id = $1 FOR UPDATE", user_id)


# --- roles ------------------------------------------------------------------------------

async def roles_of(db: Queryable, user_id: uuid.UUID) -> list[str]:
    rows = await db.fetch("SELECT role FROM identity.user_roles WHERE user_id = $1 ORDER BY role", user_id)
    return [r["role"] for r in rows]


async def grant_roles(db: Queryable, user_id: uuid.UUID, roles: list[str], granted_by: uuid.UUID | None) -> None:
    await db.execute("INSERT INTO identity.user_roles (user_id, role, granted_by) "
                     "SELECT $1, unnest($2::text[]), $3 ON CONFLICT DO NOTHING", user_id, roles, granted_by)


async def revoke_roles(db: Queryable, user_id: uuid.UUID, roles: list[str]) -> None:
    await db.execute("DELETE FROM identity.user_roles WHERE user_id = $1 AND role = ANY($2::text[])",
                     user_id, roles)


# --- preferences ------------------------------------------------------------------------

async def get_preferences(db: Queryable, user_id: uuid.UUID) -> dict[str, Any]:
    data = await db.fetchval("SELECT data FROM identity.preferences WHERE user_id = $1", user_id)
    return data if data is not None else {}


async def put_preferences(db: Queryable, user_id: uuid.UUID, data: dict[str, Any]) -> None:
    await db.execute("INSERT INTO identity.preferences (user_id, data) VALUES ($1, $2) "
                     "ON CONFLICT (user_id) DO UPDATE SET data = excluded.data, updated_at = now()",
                     user_id, data)


# --- sessions and refresh tokens ------------------------------------------------------

async def insert_session(db: Queryable, *, session_id: uuid.UUID, user_id: uuid.UUID, expires_at: datetime,
                         user_agent: str | None, ip: str | None) -> None:
    await db.execute("INSERT INTO identity.sessions (id, user_id, expires_at, user_agent, ip) "
                     "VALUES ($1, $2, $3, $4, $5)", session_id, user_id, expires_at, user_agent, ip)


async def get_session(db: Queryable, session_id: uuid.UUID) -> SessionRow | None:
    return _row(SessionRow, await db.fetchrow(
        "SELECT id, user_id, created_at, last_used_at, expires_at, revoked_at, user_agent, ip "
        "FROM identity.sessions WHERE id = $1", session_id))


async def list_sessions(db: Queryable, user_id: uuid.UUID, *, after: tuple[datetime, uuid.UUID] | None,
                        limit: int) -> list[SessionRow]:
    """Live sessions, newest first, keyset-paginated on (created_at, id)."""
    query = ("SELECT id, user_id, created_at, last_used_at, expires_at, revoked_at, user_agent, ip "
             "FROM identity.sessions WHERE user_id = $1 AND revoked_at IS NULL AND expires_at > now() ")
    args: list[Any] = [user_id]
    if after is not None:
        query += "AND (created_at, id) < ($2, $3) "
        args += [after[0], after[1]]
    query += f"ORDER BY created_at DESC, id DESC LIMIT {int(limit)}"
    return [_row(SessionRow, r) for r in await db.fetch(query, *args)]


async def revoke_session(db: Queryable, session_id: uuid.UUID, reason: str) -> bool:
    status = await db.execute("UPDATE identity.sessions SET revoked_at = now(), revoked_reason = $2 "
                              "WHERE id = $1 AND revoked_at IS NULL", session_id, reason)
    return status.endswith(" 1")


async def revoke_user_sessions(db: Queryable, user_id: uuid.UUID, reason: str) -> list[uuid.UUID]:
    rows = await db.fetch("UPDATE identity.sessions SET revoked_at = now(), revoked_reason = $2 "
                          "WHERE user_id = $1 AND revoked_at IS NULL RETURNING id", user_id, reason)
    return [r["id"] for r in rows]


async def touch_session(db: Queryable, session_id: uuid.UUID) -> None:
    await db.execute("UPDATE identity.sessions SET last_used_at = now() WHERE id = $1", session_id)


async def insert_refresh_token(db: Queryable, token_hash: bytes, session_id: uuid.UUID,
                               expires_at: datetime) -> None:
    await db.execute("INSERT INTO identity.refresh_tokens (token_hash, session_id, expires_at) "
                     "VALUES ($1, $2, $3)", token_hash, session_id, expires_at)


class RefreshUse(msgspec.Struct, frozen=True):
    session_id: uuid.UUID
    already_used: bool
    expired: bool


async def use_refresh_token(db: Queryable, token_hash: bytes) -> RefreshUse | None:
    """Mark a refresh token used, atomically; None when it was never issued.

    The conditional UPDATE makes two concurrent refreshes with one token race safely:
    exactly one wins, the other sees `already_used` (and so revokes the family).
    """
    record = await db.fetchrow(
        "UPDATE identity.refresh_tokens SET used_at = now() WHERE token_hash = $1 AND used_at IS NULL "
        "RETURNING session_id, expires_at <= now() AS expired", token_hash)
    if record is not None:
        return RefreshUse(record["session_id"], False, record["expired"])
    record = await db.fetchrow("SELECT session_id FROM identity.refresh_tokens WHERE token_hash = $1",
                               token_hash)
    return None if record is None else RefreshUse(record["session_id"], True, False)


# --- KYC --------------------------------------------------------------------------------

_KYC_COLUMNS = ("id, user_id, document_type, document_number_enc, document_number_last4, address, "
                "date_of_birth, status, reason, submitted_at, decided_at, decided_by")


async def latest_kyc(db: Queryable, user_id: uuid.UUID) -> KycRow | None:
    return _row(KycRow, await db.fetchrow(
        f"SELECT {_KYC_COLUMNS} FROM identity.kyc_submissions WHERE user_id = $1 "
        "ORDER BY submitted_at DESC, id DESC LIMIT 1", user_id))


async def insert_kyc(db: Queryable, *, kyc_id: uuid.UUID, user_id: uuid.UUID, document_type: str,
                     document_number_enc: bytes, last4: str, address: dict[str, Any],
                     date_of_birth: date) -> None:
    await db.execute(
        "INSERT INTO identity.kyc_submissions (id, user_id, document_type, document_number_enc, "
        "document_number_last4, address, date_of_birth, status) VALUES ($1, $2, $3, $4, $5, $6, $7, 'pending')",
        kyc_id, user_id, document_type, document_number_enc, last4, address, date_of_birth)
    await set_kyc_status(db, user_id, "pending")


async def decide_kyc(db: Queryable, kyc_id: uuid.UUID, status: str, reason: str | None,
                     decided_by: uuid.UUID) -> None:
    await db.execute("UPDATE identity.kyc_submissions SET status = $2, reason = $3, decided_at = now(), "
                     "decided_by = $4 WHERE id = $1", kyc_id, status, reason, decided_by)


async def set_kyc_status(db: Queryable, user_id: uuid.UUID, status: str) -> None:
    await db.execute("UPDATE identity.users SET kyc_status = $2, updated_at = now() WHERE id = $1",
                     user_id, status)


# --- API keys ---------------------------------------------------------------------------

_KEY_COLUMNS = "id, prefix, secret_hash, name, scopes, created_by, created_at, revoked_at, last_used_at"


async def insert_api_key(db: Queryable, *, key_id: uuid.UUID, prefix: str, secret_hash: bytes, name: str,
                         scopes: list[str], created_by: uuid.UUID) -> ApiKeyRow:
    return _row(ApiKeyRow, await db.fetchrow(
        "INSERT INTO identity.api_keys (id, prefix, secret_hash, name, scopes, created_by) "
        f"VALUES ($1, $2, $3, $4, $5, $6) RETURNING {_KEY_COLUMNS}",
        key_id, prefix, secret_hash, name, scopes, created_by))


async def api_key_by_prefix(db: Queryable, prefix: str) -> ApiKeyRow | None:
    return _row(ApiKeyRow, await db.fetchrow(
        f"SELECT {_KEY_COLUMNS} FROM identity.api_keys WHERE prefix = $1", prefix))


async def list_api_keys(db: Queryable, *, after: tuple[datetime, uuid.UUID] | None, limit: int) -> list[ApiKeyRow]:
    query = f"SELECT {_KEY_COLUMNS} FROM identity.api_keys "
    args: list[Any] = []
    if after is not None:
        query += "WHERE (created_at, id) < ($1, $2) "
        args = [after[0], after[1]]
    query += f"ORDER BY created_at DESC, id DESC LIMIT {int(limit)}"
    return [_row(ApiKeyRow, r) for r in await db.fetch(query, *args)]


async def revoke_api_key(db: Queryable, key_id: uuid.UUID) -> str | None:
    """Revoke a key; return its prefix (None when no live key has that id)."""
    return await db.fetchval("UPDATE identity.api_keys SET revoked_at = now() "
                             "WHERE id = $1 AND revoked_at IS NULL RETURNING prefix", key_id)


async def touch_api_key(db: Queryable, key_id: uuid.UUID) -> None:
    await db.execute("UPDATE identity.api_keys SET last_used_at = now() WHERE id = $1", key_id)


# --- outbox -----------------------------------------------------------------------------

async def insert_outbox(db: Queryable, *, event_id: uuid.UUID, type_: str, key: str, payload: Any) -> None:
    await db.execute("INSERT INTO identity.outbox (event_id, type, key, payload) VALUES ($1, $2, $3, $4)",
                     event_id, type_, key, payload)


async def unpublished(db: Queryable, limit: int) -> list[Any]:
    return await db.fetch("SELECT seq, event_id, type, key, payload FROM identity.outbox "
                          f"WHERE published_at IS NULL ORDER BY seq LIMIT {int(limit)}")


async def mark_published(db: Queryable, seqs: list[int]) -> None:
    await db.execute("UPDATE identity.outbox SET published_at = now() WHERE seq = ANY($1::bigint[])", seqs)
