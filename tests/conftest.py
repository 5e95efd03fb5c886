"""Session-wide real servers (Tansu Kafka, PostgreSQL, Redis) and per-test isolation.

The servers start once per test session on free loopback ports. Each test that asks for
`settings` gets its own Kafka topic prefix, its own PostgreSQL database (cloned from a
migrated template, so every schema exists) and a flushed Redis database.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from hypothesis import settings as hypothesis_settings

from ops.embedded import LOOPBACK, PG_USER, EmbeddedStack
from ops.settings import Settings, load_settings

# CI runs every property test on a fixed sequence of examples, so a red run is reproducible
# and never depends on a lucky draw; local runs keep exploring new examples.
hypothesis_settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    hypothesis_settings.load_profile("ci")

TEMPLATE_DB = "fintide_template"
_db_counter = itertools.count()


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedStack]:
    servers = EmbeddedStack(tmp_path_factory.mktemp("stack")).start()
    try:
        _create_template_database(servers)
        yield servers
    finally:
        servers.stop()


def _create_template_database(servers: EmbeddedStack) -> None:
    """Migrate one template database; each test clones it (CREATE DATABASE ... TEMPLATE)."""
    import asyncpg

    from db.migrate import migrate

    async def build() -> None:
        admin = await asyncpg.connect(_db_url(servers, "postgres"))
        try:
            await admin.execute(f'CREATE DATABASE "{TEMPLATE_DB}"')
        finally:
            await admin.close()
        await migrate(_db_url(servers, TEMPLATE_DB))

    asyncio.run(build())


def _db_url(servers: EmbeddedStack, database: str) -> str:
    return f"postgresql://{PG_USER}@{LOOPBACK}:{servers.server('postgres').port}/{database}"


@pytest.fixture
def database_url(stack: EmbeddedStack) -> Iterator[str]:
    """A fresh, fully migrated database for one test, dropped afterwards."""
    import asyncpg

    name = f"t_{os.getpid()}_{next(_db_counter)}"

    async def run(sql: str) -> None:
        admin = await asyncpg.connect(_db_url(stack, "postgres"))
        try:
            await admin.execute(sql)
        finally:
            await admin.close()

    asyncio.run(run(f'CREATE DATABASE "{name}" TEMPLATE "{TEMPLATE_DB}"'))
    yield _db_url(stack, name)
    asyncio.run(run(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def redis_url(stack: EmbeddedStack) -> str:
    import redis

    client = redis.Redis.from_url(stack.redis_url)
    client.flushdb()
    client.close()
    return stack.redis_url


@pytest.fixture
def topic_prefix() -> str:
    return f"t{uuid.uuid4().hex[:10]}."


@pytest.fixture
def settings(stack: EmbeddedStack, database_url: str, redis_url: str, topic_prefix: str,
             tmp_path: Path) -> Settings:
    """Settings pointing at the session's servers, isolated for this test."""
    return load_settings(
        environ={},
        env="test",
        data_dir=str(tmp_path / "data"),
        kafka_bootstrap=stack.kafka_bootstrap,
        database_url=database_url,
        redis_url=redis_url,
        topic_prefix=topic_prefix,
        app_id=f"fintide-{topic_prefix.rstrip('.')}",
        worker_web_port=0,
        feed_enabled=False,
    )


@pytest.fixture
async def pg_pool(settings: Settings) -> AsyncIterator[object]:
    from db.engine import create_pool

    pool = await create_pool(settings.database_url)
    try:
        yield pool
    finally:
        await pool.close()
