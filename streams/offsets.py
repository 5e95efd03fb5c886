"""Consumer lag of a consumer group, read from the broker (so it covers every worker).

Committed offsets come from the group coordinator (OffsetFetch); end offsets are the high
watermark, corrected for Tansu's ListOffsets (see streams/kafka.py). Tansu also drops the
connection on an OffsetFetch for "all partitions", so partitions are always listed
explicitly, from the topic metadata.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.client import AIOKafkaClient

from streams.kafka import corrected_end_offsets

CALL_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class PartitionLag:
    topic: str
    partition: int
    # None: the group has committed nothing on this partition yet.
    committed: int | None
    end: int

    @property
    def lag(self) -> int:
        # Faust starts an uncommitted partition at the earliest offset, so all of it is lag.
        return self.end - (self.committed or 0)


class LagReader:
    """Reads committed and end offsets of `group_id` on given topics; stop() when done."""

    def __init__(self, bootstrap_servers: list[str], group_id: str) -> None:
        self.bootstrap_servers = bootstrap_servers
        self.group_id = group_id
        self._admin: AIOKafkaAdminClient | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._client: AIOKafkaClient | None = None
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        """Connect; read() calls this on first use, so ops pages work during recovery too."""
        # aiokafka clients bind to the running loop, so they are made here, not in __init__.
        timeout_ms = int(CALL_TIMEOUT_S * 1000)
        self._admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap_servers,
                                          request_timeout_ms=timeout_ms)
        # No group_id: this consumer only asks for end offsets, it never joins the group.
        self._consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap_servers,
                                          request_timeout_ms=timeout_ms, enable_auto_commit=False)
        self._client = AIOKafkaClient(bootstrap_servers=self.bootstrap_servers, request_timeout_ms=timeout_ms)
        await asyncio.wait_for(self._admin.start(), CALL_TIMEOUT_S)
        await asyncio.wait_for(self._consumer.start(), CALL_TIMEOUT_S)
        await asyncio.wait_for(self._client.bootstrap(), CALL_TIMEOUT_S)

    async def stop(self) -> None:
        if self._client is not None:
            await self._client.close()
        if self._consumer is not None:
            await self._consumer.stop()
        if self._admin is not None:
            await self._admin.close()
        self._admin = self._consumer = self._client = None

    async def read(self, topics: list[str]) -> list[PartitionLag]:
        """Per-partition offsets of `topics`, sorted by topic and partition."""
        if not topics:
            return []
        # Concurrent HTTP requests take turns: a burst of page loads makes one broker
        # round trip at a time instead of a burst of them.
        async with self._lock:
            if self._client is None:
                await self.start()
            assert self._admin and self._consumer and self._client
            tps = await self._partitions(self._admin, topics)
            committed = await asyncio.wait_for(
                self._admin.list_consumer_group_offsets(self.group_id, partitions=tps), CALL_TIMEOUT_S)
            listed = await asyncio.wait_for(self._consumer.end_offsets(tps), CALL_TIMEOUT_S)
            ends = await asyncio.wait_for(corrected_end_offsets(self._client, listed), CALL_TIMEOUT_S)
        rows = [PartitionLag(tp.topic, tp.partition, _offset(committed.get(tp)), ends[tp]) for tp in tps]
        return sorted(rows, key=lambda row: (row.topic, row.partition))

    @staticmethod
    async def _partitions(admin: AIOKafkaAdminClient, topics: list[str]) -> list[TopicPartition]:
        described = await asyncio.wait_for(admin.describe_topics(topics), CALL_TIMEOUT_S)
        return [TopicPartition(topic["topic"], part["partition"])
                for topic in described if topic["error_code"] == 0 for part in topic["partitions"]]


def _offset(meta: object) -> int | None:
    offset = getattr(meta, "offset", -1)
    return offset if isinstance(offset, int) and offset >= 0 else None

