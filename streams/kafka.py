"""End offsets that are right on Tansu too, for our lag reader and for Faust's table recovery.

Tansu (the embedded broker) answers ListOffsets(latest) with the base offset of the
partition's last record batch + 1: after one batch holding offsets 6..8 it says 7, not 9.
The high watermark in a Fetch response is right. Faust recovers a table by reading its
changelog up to ListOffsets(latest), so on Tansu a table rebuilt from its changelog (a new
worker, a moved partition, a lost data dir) silently missed the tail of the last batch
(verified: 50 writes to one key recovered as 49).

`fetch_highwaters` asks for the high watermark with one small Fetch per partition leader;
`corrected_end_offsets` takes the larger of the two answers, so on Apache Kafka, where they
agree, nothing changes. `Transport` is Faust's aiokafka transport with that correction in
the consumer's `highwaters()`, which is what table recovery calls.

Tansu also answers a waiting Fetch only when its wait expires, not when records arrive, so
Faust's hard-coded `fetch_max_wait_ms=1500` made 1.5 s the latency of every record that
reached an idle consumer. The worker consumer here waits `broker_fetch_max_wait_ms`
(10 ms by default); on Apache Kafka, which answers as soon as data arrives, it only sets
how often an idle consumer polls.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.client import AIOKafkaClient
from aiokafka.protocol.fetch import FetchRequest
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP

# The high-watermark Fetch: wait at most this long, ask for one byte per partition (the
# broker still returns the first batch whole), and at most this much in total.
HIGHWATER_FETCH_WAIT_MS = 10
HIGHWATER_FETCH_MAX_BYTES = 1024 * 1024
# What faust.transport.drivers.aiokafka passes to the worker consumer.
FAUST_FETCH_MAX_WAIT_MS = 1500


def fetch_max_wait_ms(app: Any) -> int:
    """The worker consumer's fetch wait: FINTIDE_BROKER_FETCH_MAX_WAIT_MS (a FintideApp's
    settings), else Faust's own 1,500 ms."""
    settings = getattr(app, "settings", None)
    return settings.broker_fetch_max_wait_ms if settings is not None else FAUST_FETCH_MAX_WAIT_MS


async def fetch_highwaters(client: AIOKafkaClient, starts: Mapping[TopicPartition, int]) -> dict[TopicPartition, int]:
    """The high watermark of each partition, fetching from `starts` (valid offsets)."""
    metadata = await client.fetch_all_metadata()
    by_leader: dict[int, dict[str, list[tuple[int, int, int]]]] = defaultdict(lambda: defaultdict(list))
    for tp, offset in starts.items():
        leader = metadata.leader_for_partition(tp)
        if leader is not None and leader >= 0:
            by_leader[leader][tp.topic].append((tp.partition, max(offset, 0), 1))
    highwaters: dict[TopicPartition, int] = {}
    for leader, topics in by_leader.items():
        request = FetchRequest(HIGHWATER_FETCH_WAIT_MS, 0, HIGHWATER_FETCH_MAX_BYTES, 0, list(topics.items()))
        response = await client.send(leader, request)
        for topic, partitions in response.topics:
            for partition, error_code, highwater, *_ in partitions:
                if error_code == 0:
                    highwaters[TopicPartition(topic, partition)] = highwater
    return highwaters


async def corrected_end_offsets(client: AIOKafkaClient, listed: Mapping[Any, int]) -> dict[Any, int]:
    """max(ListOffsets answer, Fetch high watermark) per partition."""
    starts = {TopicPartition(tp.topic, tp.partition): offset for tp, offset in listed.items()}
    highwaters = await fetch_highwaters(client, starts)
    return {tp: max(offset, highwaters.get(TopicPartition(tp.topic, tp.partition), -1))
            for tp, offset in listed.items()}


class _ConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport: faust_aiokafka.Transport) -> AIOKafkaConsumer:
        consumer = super()._create_worker_consumer(transport)
        # Faust passes fetch_max_wait_ms=1500 with no setting to change it, and Tansu answers
        # a waiting fetch only when the wait expires: records arriving meanwhile wait for it.
        # AIOKafkaConsumer hands this attribute to its Fetcher in start(), which runs later.
        consumer._fetch_max_wait_ms = fetch_max_wait_ms(self.app)
        return consumer

    async def _highwaters(self, partitions: list[TP]) -> Mapping[TP, int]:
        listed = await super()._highwaters(partitions)
        if self.consumer.in_transaction:
            return listed
        consumer: AIOKafkaConsumer = self._ensure_consumer()
        # The consumer's own client: it lives on this consumer thread's event loop.
        return await corrected_end_offsets(consumer._client, listed)


class _Consumer(faust_aiokafka.Consumer):
    def _new_consumer_thread(self) -> faust_aiokafka.AIOKafkaConsumerThread:
        return _ConsumerThread(self, loop=self.loop, beacon=self.beacon)


class Transport(faust_aiokafka.Transport):
    """Faust's aiokafka transport, with end offsets corrected for Tansu."""

    Consumer = _Consumer
