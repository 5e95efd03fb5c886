"""PostgreSQL access: one asyncpg pool per DSN, and which DSN each service uses.

Every service owns one schema. By default all schemas live in FINTIDE_DATABASE_URL; a
service can be split onto its own server with FINTIDE_DATABASE_URL_<SERVICE>.
"""

from __future__ import annotations

import json
import os

import asyncpg

SERVICES = ("identity", "accounts", "market", "trading", "payments", "fraud", "billing",
            "education", "notify", "audit", "marketing", "marketplace")
POOL_MAX_SIZE = 20
COMMAND_TIMEOUT_S = 30.0
# "The database is away or dropped us": worth retrying the same statements later, unlike
# an error about the data itself. InternalClientError is asyncpg's state after a
# connection was terminated mid-operation.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    OSError, TimeoutError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError,
    asyncpg.exceptions.InternalClientError, asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InsufficientResourcesError, asyncpg.exceptions.TransactionRollbackError)


def dsn_for(database_url: str, service: str, environ: dict[str, str] | None = None) -> str:
    assert service in SERVICES, f"unknown service {service!r}"
    environ = os.environ if environ is None else environ
    return environ.get(f"FINTIDE_DATABASE_URL_{service.upper()}", database_url)


async def _init_connection(conn: asyncpg.Connection) -> None:
    # JSON columns come back as Python values, not strings.
    for kind in ("json", "jsonb"):
        await conn.set_type_codec(kind, encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


async def create_pool(dsn: str, *, min_size: int = 1, max_size: int = POOL_MAX_SIZE) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(dsn, min_size=min_size, max_size=max_size,
                                     command_timeout=COMMAND_TIMEOUT_S, init=_init_connection)
    assert pool is not None
    return pool
