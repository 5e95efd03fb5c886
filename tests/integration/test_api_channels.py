"""The WebSocket fan-out backend (api/channels.py) on the session's real Redis."""

from __future__ import annotations

import asyncio

from redis.asyncio import Redis

from api.channels import SerialPubSubBackend
from ops.settings import Settings


async def test_channels_subscribed_at_the_same_moment_all_receive(settings: Settings) -> None:
    redis = Redis.from_url(settings.redis_url)
    backend = SerialPubSubBackend(redis=redis, key_prefix="test")
    names = [f"fanout.{i}" for i in range(4)]
    try:
        # A fresh backend's first subscribes, concurrent: each must land on the one connection read.
        await asyncio.gather(*(backend.subscribe([name]) for name in names))
        for name in names:
            await redis.publish(name, name.encode())
        received: set[str] = set()
        events = backend.stream_events()
        async with asyncio.timeout(10):
            while received != set(names):
                channel, data = await anext(events)
                assert data == channel.encode()
                received.add(channel)
        await events.aclose()
    finally:
        await backend.on_shutdown()
        await redis.aclose()
