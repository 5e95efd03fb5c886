"""The worker's leader timer drains identity's outbox to Kafka: events committed while the
API could not reach Kafka are not lost."""

from __future__ import annotations

import msgspec
from litestar.testing import AsyncTestClient

from api.app import create_app
from db.engine import create_pool
from ops.embedded import free_port
from ops.settings import Settings
from streams import identity as events
from streams.topics import ensure_topics
from tests.helpers.auth import register_and_login
from tests.helpers.workers import get_json, start_worker, wait_for
from tests.integration.test_identity_events import consume


async def test_worker_relays_identity_events_committed_while_kafka_was_away(settings: Settings) -> None:
    await ensure_topics(settings, [events.EVENTS])
    away = msgspec.structs.replace(settings, kafka_bootstrap=f"127.0.0.1:{free_port()}")
    async with AsyncTestClient(app=create_app(away)) as client:
        me = await register_and_login(client)
    pool = await create_pool(settings.database_url)

    async def pending() -> int:
        return await pool.fetchval("SELECT count(*) FROM identity.outbox WHERE published_at IS NULL")

    async def serving(w) -> bool:  # no tables here: ready once the web views answer
        return await get_json(w.url + "/ops/") is not None

    try:
        waiting = await pending()
        assert waiting >= 2
        worker = await start_worker(settings, agents=("agents.identity",), ready=serving)
        try:
            await wait_for(lambda: _drained(pending), 30, "the outbox to drain")
        finally:
            assert worker.stop() == 0
    finally:
        await pool.close()
    received = await consume(settings, want=waiting)
    assert {e.user_id for _, e in received} == {me.user_id}
    assert {type(e).__struct_config__.tag for _, e in received} >= {"identity.user_created",
                                                                      "identity.login_succeeded"}


async def _drained(pending) -> bool:
    return await pending() == 0
