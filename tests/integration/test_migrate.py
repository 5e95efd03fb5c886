import asyncpg
import pytest

from db.engine import SERVICES
from db.migrate import MigrationError, migrate, migrate_all


async def test_every_service_has_its_own_schema(database_url):
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch("SELECT schema_name FROM information_schema.schemata")
    finally:
        await conn.close()
    assert set(SERVICES) <= {r["schema_name"] for r in rows}


async def test_migrations_are_idempotent_on_rerun(database_url):
    assert await migrate_all(database_url) == []
    assert await migrate_all(database_url) == []


async def test_an_edited_applied_migration_is_refused(database_url, tmp_path):
    root = tmp_path / "migrations"
    (root / "foundation").mkdir(parents=True)
    sql = root / "foundation" / "9999_probe.sql"
    sql.write_text("CREATE TABLE public.probe (v int);")
    assert await migrate(database_url, root) == ["foundation/9999_probe"]
    sql.write_text("CREATE TABLE public.probe (v bigint);")
    with pytest.raises(MigrationError, match="changed after it was applied"):
        await migrate(database_url, root)


async def test_a_failing_migration_leaves_nothing_half_applied(database_url, tmp_path):
    root = tmp_path / "migrations"
    (root / "foundation").mkdir(parents=True)
    (root / "foundation" / "9998_bad.sql").write_text("CREATE TABLE public.half (v int); SELECT nope();")
    with pytest.raises(asyncpg.PostgresError):
        await migrate(database_url, root)
    conn = await asyncpg.connect(database_url)
    try:
        assert await conn.fetchval("SELECT to_regclass('public.half')") is None
    finally:
        await conn.close()
