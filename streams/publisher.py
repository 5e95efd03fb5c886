"""EventPublisher: typed events to Kafka from processes without a Faust app (API, relays, feed).

    async with EventPublisher(settings) as publisher:
        await publisher.publish("payments.events", wallet_id, PaymentInitiated(...))

Every publish waits for the broker's acknowledgement from all in-sync replicas (acks=all),
so a returned call means the event is stored. The producer is not idempotent by default:
Tansu (the embedded broker) answers InitProducerId with an error, so a retried send can
duplicate a message; consumers dedupe by event id anyway. Pass `idempotent=True` on a
real Kafka cluster.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from types import TracebackType
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.structs import RecordMetadata

from ops.settings import Settings
from streams.codec import encode
from streams.topics import TopicSpec, bootstrap_servers, full_name, get_spec

Key = str | bytes | None
# Bound on one publish_many call: beyond this the caller should split its batch.
MAX_BATCH_EVENTS = 10_000
START_TIMEOUT_S = 15.0


class EventPublisher:
    def __init__(self, settings: Settings, *, linger_ms: int = 5, idempotent: bool = False,
                 request_timeout_ms: int = 30_000, client_id: str = "fintide-publisher") -> None:
        self.settings = settings
        self._producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap_servers(settings), client_id=client_id,
            acks="all", enable_idempotence=idempotent,
            # A few ms of linger lets concurrent publishes share one produce request.
            linger_ms=linger_ms, request_timeout_ms=request_timeout_ms)
        self._started = False

    async def start(self) -> None:
        await asyncio.wait_for(self._producer.start(), START_TIMEOUT_S)
        self._started = True

    async def stop(self) -> None:
        # stop() flushes pending sends first.
        await self._producer.stop()
        self._started = False

    async def __aenter__(self) -> EventPublisher:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()

    async def publish(self, topic: str, key: Key, event: Any) -> RecordMetadata:
        """Publish one event to logical `topic`; key None means the topic's key_field."""
        future = await self._send(get_spec(topic), key, event)
        return await future

    async def publish_many(self, topic: str, items: Iterable[tuple[Key, Any]]) -> list[RecordMetadata]:
        """Publish (key, event) pairs in order; returns once all are acknowledged."""
        spec = get_spec(topic)
        batch = list(items)
        if len(batch) > MAX_BATCH_EVENTS:
            raise ValueError(f"publish_many takes at most {MAX_BATCH_EVENTS} events per call, got {len(batch)}")
        futures = [await self._send(spec, key, event) for key, event in batch]
        return list(await asyncio.gather(*futures))

    async def _send(self, spec: TopicSpec[Any], key: Key, event: Any) -> asyncio.Future[RecordMetadata]:
        assert self._started, "EventPublisher.start() was not called"
        message_key = spec.message_key(key, event)
        return await self._producer.send(full_name(self.settings, spec.name), value=encode(event),
                                         key=message_key)

