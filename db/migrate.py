"""Schema migrations: plain SQL files per service, applied once, in order, under a lock.

Layout: db/migrations/<service>/<NNNN>_<name>.sql. Each file runs in its own transaction
and is recorded with its checksum in public.fintide_migrations; an applied file that was
edited afterwards is an error (write a new migration instead). Re-running is a no-op.
We keep SQL rather than piccolo's migration runner because that runner binds to one global
engine from piccolo_conf, while Fintide needs per-test databases and per-service DSNs.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from db.engine import SERVICES, dsn_for

log = logging.getLogger("fintide.migrate")

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
# Any constant works; it only has to be the same for every process that migrates.
ADVISORY_LOCK_ID = 0x46494E54

LEDGER_SQL = """
CREATE TABLE IF NOT EXISTS public.fintide_migrations (
    service text NOT NULL,
    version text NOT NULL,
    checksum text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (service, version)
)"""


@dataclass(frozen=True)
class Migration:
    service: str
    version: str
    path: Path

    @property
    def sql(self) -> str:
        return self.path.read_text()

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()


class MigrationError(RuntimeError):
    pass


async def migrate_all(database_url: str, environ: dict[str, str] | None = None) -> list[str]:
    """Migrate every service's schema on the DSN that service uses (see db.engine.dsn_for)."""
    by_dsn: dict[str, set[str]] = {}
    for service in SERVICES:
        by_dsn.setdefault(dsn_for(database_url, service, environ), set()).add(service)
    applied: list[str] = []
    for dsn, services in by_dsn.items():
        applied += await migrate(dsn, services=services)
    return applied


def discover(root: Path = MIGRATIONS_DIR) -> list[Migration]:
    found = [Migration(path.parent.name, path.stem, path)
             for path in sorted(root.glob("*/*.sql"))]
    # foundation first (it creates shared things), then services in name order.
    return sorted(found, key=lambda m: (m.service != "foundation", m.service, m.version))


async def migrate(database_url: str, root: Path = MIGRATIONS_DIR,
                  services: set[str] | None = None) -> list[str]:
    """Apply every pending migration (of `services` only, when given); return those applied now."""
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", ADVISORY_LOCK_ID)
        try:
            await conn.execute(LEDGER_SQL)
            wanted = [m for m in discover(root)
                      if services is None or m.service in services or m.service == "foundation"]
            return await _apply_pending(conn, wanted)
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", ADVISORY_LOCK_ID)
    finally:
        await conn.close()


async def _apply_pending(conn: asyncpg.Connection, migrations: list[Migration]) -> list[str]:
    rows = await conn.fetch("SELECT service, version, checksum FROM public.fintide_migrations")
    applied = {(r["service"], r["version"]): r["checksum"] for r in rows}
    done: list[str] = []
    for m in migrations:
        key = (m.service, m.version)
        if key in applied:
            if applied[key] != m.checksum:
                raise MigrationError(f"migration {m.service}/{m.version} changed after it was applied")
            continue
        async with conn.transaction():
            await conn.execute(m.sql)
            await conn.execute("INSERT INTO public.fintide_migrations (service, version, checksum) "
                               "VALUES ($1, $2, $3)", m.service, m.version, m.checksum)
        log.info("applied migration %s/%s", m.service, m.version)
        done.append(f"{m.service}/{m.version}")
    return done
