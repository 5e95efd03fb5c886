"""What every API handler may be given: settings, PostgreSQL pools, Redis, Kafka.

Created once per process in the app's lifespan and reached through dependency injection
(`resources: Resources` in a handler's signature).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import msgspec
from aiokafka import AIOKafkaClient
from redis.asyncio import Redis

from db.engine import create_pool, dsn_for
from ops.settings import Settings

log = logging.getLogger("fintide.api")
READY_TIMEOUT_S = 2.0


class DependencyStatus(msgspec.Struct, frozen=True):
    name: str
    ok: bool
    latency_ms: float
    error: str | None = None


@dataclass
class Resources:
    settings: Settings
    redis: Redis
    kafka: AIOKafkaClient
    pools: dict[str, asyncpg.Pool] = field(default_factory=dict)
    # Set by the streams publisher when the app starts; None while Kafka is unreachable.
    publisher: Any = None

    async def pool(self, service: str) -> asyncpg.Pool:
        """The pool for a service's schema; services sharing a DSN share a pool."""
        dsn = dsn_for(self.settings.database_url, service)
        if dsn not in self.pools:
            self.pools[dsn] = await create_pool(dsn)
        return self.pools[dsn]

    async def close(self) -> None:
        if self.publisher is not None:
            await self.publisher.stop()
        for pool in self.pools.values():
            await pool.close()
        await self.kafka.close()
        await self.redis.aclose()

    async def check(self) -> list[DependencyStatus]:
        """Each dependency's reachability and round-trip time, checked concurrently."""
        checks: dict[str, Callable[[], Awaitable[Any]]] = {
            "kafka": self.kafka.fetch_all_metadata,
            "postgres": self._check_postgres,
            "redis": self.redis.ping,
        }
        return list(await asyncio.gather(*(_timed(name, fn) for name, fn in checks.items())))

    async def _check_postgres(self) -> None:
        pool = await self.pool("identity")
        await pool.fetchval("SELECT 1")


async def _timed(name: str, fn: Callable[[], Awaitable[Any]]) -> DependencyStatus:
    start = time.perf_counter()
    try:
        await asyncio.wait_for(fn(), READY_TIMEOUT_S)
    except Exception as exc:  # noqa: BLE001 - any failure means "not ready"; report it
        return DependencyStatus(name, False, _ms_since(start), f"{type(exc).__name__}: {exc}"[:200])
    return DependencyStatus(name, True, _ms_since(start))


def _ms_since(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 2)


async def open_resources(settings: Settings) -> Resources:
    redis = Redis.from_url(settings.redis_url, socket_timeout=READY_TIMEOUT_S)
    kafka = AIOKafkaClient(bootstrap_servers=settings.kafka_bootstrap, request_timeout_ms=5000)
    # Start lazily tolerant: the API must come up (and say "not ready") while Kafka is down.
    try:
        await asyncio.wait_for(kafka.bootstrap(), READY_TIMEOUT_S * 2)
    except Exception:  # noqa: BLE001
        log.warning("Kafka unreachable at start; /ready reports it")
    return Resources(settings=settings, redis=redis, kafka=kafka, publisher=await _start_publisher(settings))


async def _start_publisher(settings: Settings) -> Any:
    """A producer for services that publish directly; None (events wait in outboxes) if Kafka is down."""
    from streams.publisher import EventPublisher

    publisher = EventPublisher(settings)
    try:
        await asyncio.wait_for(publisher.start(), READY_TIMEOUT_S * 2)
    except Exception:  # noqa: BLE001
        log.warning("event publisher not started: Kafka unreachable")
        await publisher.stop()
        return None
    return publisher
