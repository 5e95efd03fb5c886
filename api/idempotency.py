"""Idempotency-Key for unsafe POSTs, reusable by any service.

    return await idempotent(request, pool, owner_id=user.id, table="payments.idempotency_keys",
                            work=lambda effect_id: do_it(effect_id))

`work(effect_id)` returns `(status_code, payload)`. The first successful response is stored
(PostgreSQL, keyed by owner + route + key, with a hash of method, path and canonical body)
and replayed byte for byte for the same key and body, with `Idempotent-Replayed: true`.
The same key with a different body → 422; a request whose key is still in flight → 409
with Retry-After. Keys are kept at least 24 h (`purge_expired` deletes older ones).

`effect_id` is derived from the key (uuid5), so the work uses it as the id of what it
creates: should a process die after the effect committed but before the response was
stored, the retry (allowed once the in-flight lock lapses) finds the effect by that id and
does not repeat it. When the work raises, the claim is released (nothing was stored),
following Stripe: a failed request may be retried with the same key.

A service's table (in its own schema) has the columns of payments.idempotency_keys in
db/migrations/payments/0001_ledger.sql; copy that DDL into the service's migration.
"""

from __future__ import annotations

import hashlib
import logging
import re
import uuid
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any, Final
from uuid import UUID

import asyncpg
import msgspec
from litestar import Request, Response

from api.problems import Problem

log = logging.getLogger("fintide.api.idempotency")

HEADER: Final = "Idempotency-Key"
REPLAYED_HEADER: Final = "Idempotent-Replayed"
KEY_TTL: Final = timedelta(hours=24)
# A request that has not finished within this time is presumed dead; its key may be retried.
IN_FLIGHT_LOCK: Final = timedelta(seconds=60)
MAX_BODY_BYTES: Final = 1024 * 1024
_KEY_PATTERN: Final = re.compile(r"^[\x21-\x7e]{1,255}$")  # printable ASCII, no spaces
_TABLE_PATTERN: Final = re.compile(r"^[a-z_][a-z0-9_]*\.[a-z_][a-z0-9_]*$")
_NAMESPACE: Final = UUID("9b2e3d4c-5a6f-4e1d-8c7b-0a9f8e7d6c5b")
_JSON: Final = "application/json"

Work = Callable[[UUID], Awaitable[tuple[int, Any]]]


class Scope(msgspec.Struct, frozen=True):
    """Who used which key on which route, and what they sent."""

    table: str
    owner_id: UUID
    route: str
    key: str
    request_hash: bytes

    @property
    def effect_id(self) -> UUID:
        return uuid.uuid5(_NAMESPACE, f"{self.table}|{self.owner_id}|{self.route}|{self.key}")


def request_hash(method: str, path: str, body: bytes) -> bytes:
    """Hash of method, path and the body; JSON bodies are canonicalised (key order, spacing)."""
    try:
        canonical = msgspec.json.encode(msgspec.json.decode(body), order="sorted") if body else b""
    except msgspec.DecodeError:
        canonical = body
    return hashlib.sha256(f"{method.upper()} {path}\n".encode() + canonical).digest()


def _encode(payload: Any) -> bytes:
    return payload if isinstance(payload, bytes) else msgspec.json.encode(payload)


async def idempotent(request: Request[Any, Any, Any], pool: asyncpg.Pool, *, owner_id: UUID, table: str,
                     work: Work, required: bool = True) -> Response[bytes]:
    """Run `work` at most once per Idempotency-Key (see the module docstring)."""
    key = request.headers.get(HEADER)
    if key is None:
        if required:
            raise Problem(400, "idempotency-key-required", f"This request moves money: send an {HEADER} header.",
                          errors=[{"field": HEADER, "message": "required", "source": "header"}])
        status, payload = await work(uuid.uuid4())
        return Response(_encode(payload), status_code=status, media_type=_JSON)
    if not _KEY_PATTERN.match(key):
        raise Problem(400, "invalid-idempotency-key", f"{HEADER} must be 1-255 printable ASCII characters.",
                      errors=[{"field": HEADER, "message": "invalid", "source": "header"}])
    body = await request.body()
    route = f"{request.method} {request.scope['path_template'] if 'path_template' in request.scope else request.url.path}"
    scope = Scope(table, owner_id, route[:200], key, request_hash(request.method, request.url.path, body))
    return await run(pool, scope, work)


async def run(pool: asyncpg.Pool, scope: Scope, work: Work) -> Response[bytes]:
    """The framework-free core of `idempotent`: claim, work, store (or replay / refuse)."""
    assert _TABLE_PATTERN.match(scope.table), "table must be schema.table"
    token = uuid.uuid4()
    claimed = await _claim(pool, scope, token)
    if not claimed:
        return await _existing(pool, scope)
    try:
        status, payload = await work(scope.effect_id)
    except BaseException:
        await _release(pool, scope, token)
        raise
    content = _encode(payload)
    await _store(pool, scope, token, status, content)
    return Response(content, status_code=status, media_type=_JSON)


async def _claim(pool: asyncpg.Pool, scope: Scope, token: UUID) -> bool:
    """Insert the key in flight, or take over one whose holder is presumed dead."""
    row = await pool.fetchval(
        f"""INSERT INTO {scope.table} AS k (owner_id, route, key, request_hash, effect_id, status, lock_token,
                                            locked_until, expires_at)
            VALUES ($1, $2, $3, $4, $5, 'in_flight', $6, now() + $7::interval, now() + $8::interval)
            ON CONFLICT (owner_id, route, key) DO UPDATE
                SET lock_token = EXCLUDED.lock_token, locked_until = EXCLUDED.locked_until
                WHERE k.status = 'in_flight' AND k.locked_until < now() AND k.request_hash = EXCLUDED.request_hash
            RETURNING true""",
        scope.owner_id, scope.route, scope.key, scope.request_hash, scope.effect_id, token, IN_FLIGHT_LOCK, KEY_TTL)
    return bool(row)


async def _existing(pool: asyncpg.Pool, scope: Scope) -> Response[bytes]:
    row = await pool.fetchrow(
        f"""SELECT request_hash, status, response_status, response_body, response_content_type,
                   greatest(1, ceil(extract(epoch FROM locked_until - now())))::int AS retry_after_s
            FROM {scope.table} WHERE owner_id = $1 AND route = $2 AND key = $3""",
        scope.owner_id, scope.route, scope.key)
    if row is None:
        # Released between our claim attempt and this read (the holder failed): try again.
        raise Problem(409, "idempotency-key-in-flight", "A request with this key just finished; retry.",
                      headers={"Retry-After": "1"})
    if bytes(row["request_hash"]) != scope.request_hash:
        raise Problem(422, "idempotency-key-reused",
                      f"This {HEADER} was used with a different request; use a new key for a new request.")
    if row["status"] != "done":
        raise Problem(409, "idempotency-key-in-flight", f"A request with this {HEADER} is still being processed.",
                      headers={"Retry-After": str(row["retry_after_s"])})
    return Response(bytes(row["response_body"]), status_code=row["response_status"],
                    media_type=row["response_content_type"], headers={REPLAYED_HEADER: "true"})


async def _store(pool: asyncpg.Pool, scope: Scope, token: UUID, status: int, content: bytes) -> None:
    stored = await pool.execute(
        f"""UPDATE {scope.table} SET status = 'done', response_status = $5, response_body = $6,
                   response_content_type = $7, lock_token = NULL, locked_until = NULL
            WHERE owner_id = $1 AND route = $2 AND key = $3 AND lock_token = $4 AND status = 'in_flight'""",
        scope.owner_id, scope.route, scope.key, token, status, content, _JSON)
    if stored != "UPDATE 1":
        # Our lock lapsed and a retry took the key over; the effect is keyed by effect_id,
        # so it still happened once. The retry stores its own (equivalent) response.
        log.warning("idempotency key %s on %s was taken over before its response was stored", scope.key, scope.route)


async def _release(pool: asyncpg.Pool, scope: Scope, token: UUID) -> None:
    try:
        await pool.execute(f"DELETE FROM {scope.table} WHERE owner_id = $1 AND route = $2 AND key = $3 "
                           "AND lock_token = $4 AND status = 'in_flight'", scope.owner_id, scope.route, scope.key, token)
    except (asyncpg.PostgresError, OSError):
        # The lock lapses on its own after IN_FLIGHT_LOCK; the original error matters more.
        log.exception("could not release idempotency key %s", scope.key)


async def purge_expired(pool: asyncpg.Pool, table: str, *, limit: int = 10_000) -> int:
    """Delete up to `limit` finished keys past their expiry (at least 24 h old)."""
    assert _TABLE_PATTERN.match(table) and 0 < limit <= 100_000
    status = await pool.execute(
        f"""DELETE FROM {table} WHERE ctid = ANY(ARRAY(
                SELECT ctid FROM {table} WHERE expires_at < now() AND status = 'done' LIMIT $1))""", limit)
    return int(status.split()[-1])
