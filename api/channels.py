"""The Channels plugin's Redis backend (WebSocket fan-out for every WS route).

redis-py's asyncio PubSub opens its connection lazily inside a SUBSCRIBE and does not
guard that: two sockets subscribing at the same moment on a fresh app each open a
connection, the PubSub keeps the second, and the channels SUBSCRIBEd on the first stay
subscribed in Redis on a connection nobody reads — those users silently get no pushes
until the API restarts (seen in tests/integration/test_payments_saga.py, two users
connecting at once). Serialising (un)subscribes is enough: the first one leaves the
connection in place, and the plugin only starts reading after it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from litestar.channels.backends.redis import RedisChannelsPubSubBackend
from redis.asyncio import Redis


class SerialPubSubBackend(RedisChannelsPubSubBackend):
    """Litestar's pub/sub backend with subscribe and unsubscribe one at a time."""

    def __init__(self, *, redis: Redis, key_prefix: str) -> None:
        super().__init__(redis=redis, key_prefix=key_prefix)
        self._subscriptions = asyncio.Lock()

    async def subscribe(self, channels: Iterable[str]) -> None:
        async with self._subscriptions:
            await super().subscribe(channels)

    async def unsubscribe(self, channels: Iterable[str]) -> None:
        async with self._subscriptions:
            await super().unsubscribe(channels)
