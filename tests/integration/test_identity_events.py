"""Identity events reach Kafka (the real broker) from the transactional outbox."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import msgspec
from aiokafka import AIOKafkaConsumer
from litestar.testing import AsyncTestClient
from redis.asyncio import Redis

from api.app import create_app
from db.engine import create_pool
from ops.embedded import free_port
from ops.settings import Settings
from services import identity_events
from services.identity_common import IdentityContext
from streams import identity as events
from streams.publisher import EventPublisher
from streams.topics import bootstrap_servers, ensure_topics, full_name
from tests.helpers.api import served
from tests.helpers.auth import admin_login, register_and_login


async def consume(settings: Settings, want: int, timeout_s: float = 20.0) -> list[tuple[bytes, events.IdentityEvent]]:
    consumer = AIOKafkaConsumer(full_name(settings, events.TOPIC), bootstrap_servers=bootstrap_servers(settings),
                                auto_offset_reset="earliest", group_id=f"t-{uuid.uuid4().hex[:8]}")
    await consumer.start()
    got: list[tuple[bytes, events.IdentityEvent]] = []
    try:
        async with asyncio.timeout(timeout_s):
            while len(got) < want:
                batch = await consumer.getmany(timeout_ms=500)
                for records in batch.values():
                    got.extend((r.key, events.EVENTS.decode(r.value)) for r in records)
    finally:
        await consumer.stop()
    return got


async def test_events_are_published_to_kafka_keyed_by_user_and_marked_in_the_outbox(settings: Settings) -> None:
    await ensure_topics(settings, [events.EVENTS])
    async with EventPublisher(settings) as publisher, served(settings) as client:
        # Wired as the API is meant to be: with a publisher, each change is relayed right after commit.
        client.app.state.resources.publisher = publisher  # type: ignore[attr-defined]
        me = await register_and_login(client)
        admin = await admin_login(client)
        await client.put(f"/api/v1/admin/users/{me.user_id}/roles", headers=admin.headers, json={"roles": ["trader"]})
        received = await consume(settings, want=5)
    mine = [(k, e) for k, e in received if e.user_id == me.user_id]
    by_type = {type(e).__struct_config__.tag: (k, e) for k, e in mine}
    key, created = by_type["identity.user_created"]
    assert isinstance(created, events.UserCreated) and created.user_id == me.user_id and key == str(me.user_id).encode()
    _, changed = by_type["identity.role_changed"]
    assert isinstance(changed, events.RoleChanged) and changed.granted == ["trader"] and changed.changed_by == admin.user_id
    assert "identity.login_succeeded" in by_type
    assert len({e.id for _, e in received}) == len(received)  # unique ids: the consumers' dedupe key
    conn = await asyncpg.connect(settings.database_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM identity.outbox WHERE published_at IS NULL") == 0
    finally:
        await conn.close()


async def test_events_recorded_while_kafka_is_away_are_relayed_later(settings: Settings) -> None:
    await ensure_topics(settings, [events.EVENTS])
    # The API starts while Kafka is unreachable: no publisher, so events wait in the outbox.
    away = msgspec.structs.replace(settings, kafka_bootstrap=f"127.0.0.1:{free_port()}")
    async with AsyncTestClient(app=create_app(away)) as client:
        me = await register_and_login(client)
    pool, redis = await create_pool(settings.database_url), Redis.from_url(settings.redis_url)
    try:
        pending = await pool.fetchval("SELECT count(*) FROM identity.outbox WHERE published_at IS NULL")
        assert pending >= 2
        async with EventPublisher(settings) as publisher:
            stop = asyncio.Event()
            relay = asyncio.create_task(identity_events.run_relay(IdentityContext(settings, pool, redis), publisher, stop))
            received = await consume(settings, want=pending)
            stop.set()
            await relay
        assert await pool.fetchval("SELECT count(*) FROM identity.outbox WHERE published_at IS NULL") == 0
    finally:
        await pool.close()
        await redis.aclose()
    assert {e.user_id for _, e in received} == {me.user_id}
    assert {type(e).__struct_config__.tag for _, e in received} >= {"identity.user_created", "identity.login_succeeded"}
