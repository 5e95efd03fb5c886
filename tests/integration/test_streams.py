"""The streams foundation on a real broker: a Faust worker (a child process, exactly as
`fintide worker` runs it) consumes heartbeats into a RocksDB table, dead-letters bad
messages, and serves its ops views; a second worker proves routed table reads.

One worker serves the whole module (a group join costs seconds). A `Ledger` counts every
message the tests put on the topic, so offsets and counters are checked exactly.
The last test stops the worker, so it must stay last.
"""

from __future__ import annotations

import base64
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from ops.embedded import EmbeddedStack
from ops.settings import Settings, load_settings
from streams.codec import decode, encode
from streams.events import DeadLetter
from streams.ops import HEARTBEATS, Heartbeat
from streams.publisher import EventPublisher
from streams.topics import dlq_name, ensure_topics, full_name
from streams.worker import web_url_path
from tests.helpers.workers import START_TIMEOUT_S, WorkerProcess, get_json, wait_for
from tests.helpers.workers import start_worker as start_workers_process
from tables.ops import HEARTBEAT_TABLE, HeartbeatState

WAIT_TIMEOUT_S = 25.0


async def start_worker(settings: Settings) -> WorkerProcess:
    # Ready when this worker holds heartbeat-table partitions: the group join has completed.
    return await start_workers_process(settings, ("agents.ops",), ready=_owns_partitions)


async def _owns_partitions(worker: WorkerProcess) -> bool:
    report = await get_json(worker.url + "/ops/")
    return bool(report and table_report(report)["active_partitions"])


@dataclass
class Ledger:
    """What the tests wrote to the heartbeat topic, to check offsets and counters exactly."""

    valid: int = 0
    dead: int = 0
    # source -> heartbeats sent
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def sent(self) -> int:
        return self.valid + self.dead


def table_report(report: dict[str, Any]) -> dict[str, Any]:
    return next(t for t in report["tables"] if t["name"] == HEARTBEAT_TABLE)


def topic_report(report: dict[str, Any]) -> dict[str, Any]:
    return next(t for t in report["topics"] if t["topic"] == HEARTBEATS.name)


def metric_value(text: str, name: str, labels: dict[str, str]) -> float | None:
    wanted = {f'{k}="{v}"' for k, v in labels.items()}
    for line in text.splitlines():
        if line.startswith(name + "{"):
            series, value = line.rsplit(" ", 1)
            if set(series[len(name):].strip("{}").split(",")) == wanted:
                return float(value)
    return None


@pytest.fixture(scope="module")
def module_settings(stack: EmbeddedStack, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    prefix = f"s{os.getpid()}{int(time.time() * 1000) % 10**8}."
    return load_settings(environ={}, env="test", data_dir=str(tmp_path_factory.mktemp("streams")),
                         kafka_bootstrap=stack.kafka_bootstrap, topic_prefix=prefix,
                         app_id=f"fintide-{prefix.rstrip('.')}", worker_id="worker-1",
                         worker_web_port=0, feed_enabled=False)


@pytest.fixture(scope="module")
async def worker(module_settings: Settings) -> AsyncIterator[WorkerProcess]:
    process = await start_worker(module_settings)
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
async def publisher(module_settings: Settings) -> AsyncIterator[EventPublisher]:
    async with EventPublisher(module_settings) as events:
        yield events


@pytest.fixture(scope="module")
def ledger() -> Ledger:
    return Ledger()


async def publish(publisher: EventPublisher, ledger: Ledger, source: str) -> Heartbeat:
    seq = ledger.counts.get(source, 0) + 1
    heartbeat = Heartbeat(source=source, seq=seq)
    await publisher.publish(HEARTBEATS.name, None, heartbeat)
    ledger.counts[source] = seq
    ledger.valid += 1
    return heartbeat


async def heartbeat_state(url: str, source: str, count: int) -> dict[str, Any] | None:
    state = await get_json(f"{url}/ops/heartbeats/{source}")
    return state if state and state["count"] == count else None


async def test_ensure_topics_creates_every_topic_once(module_settings: Settings) -> None:
    settings = msgspec.structs.replace(module_settings, topic_prefix="ensure" + module_settings.topic_prefix)
    first = await ensure_topics(settings)
    second = await ensure_topics(settings)
    assert first == second
    assert full_name(settings, HEARTBEATS.name) in first
    assert full_name(settings, dlq_name(HEARTBEATS.name)) in first
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        described = {t["topic"]: len(t["partitions"]) for t in await admin.describe_topics(first)}
        assert set(described) == set(first)
        for name in (HEARTBEATS.name, dlq_name(HEARTBEATS.name)):
            assert described[full_name(settings, name)] == settings.topic_partitions
        # A topic with the wrong partition count would break table co-partitioning: refused.
        wrong = msgspec.structs.replace(settings, topic_prefix="wrong" + settings.topic_prefix)
        await admin.create_topics([NewTopic(full_name(wrong, HEARTBEATS.name), 1, 1)])
    finally:
        await admin.close()
    with pytest.raises(RuntimeError, match="has 1 partitions"):
        await ensure_topics(wrong)


async def test_event_lands_in_rocksdb_table_and_is_served_over_http(
        worker: WorkerProcess, publisher: EventPublisher, ledger: Ledger) -> None:
    await publish(publisher, ledger, "alpha")
    second = await publish(publisher, ledger, "alpha")
    state = await wait_for(lambda: heartbeat_state(worker.url, "alpha", 2), WAIT_TIMEOUT_S, "alpha's state")
    assert state == {"source": "alpha", "count": 2, "last_id": second.id, "last_seq": 2,
                     "last_ts_ms": second.ts_ms}
    # Faust's own table view reads the same RocksDB entry.
    assert await get_json(f"{worker.url}/table/{HEARTBEAT_TABLE}/alpha/") == state
    # A burst for one key: the changelog gets multi-record batches, which the recovery in
    # the last test must read to the end (see streams/kafka.py).
    burst = [(None, Heartbeat(source="burst", seq=seq)) for seq in range(1, 51)]
    await publisher.publish_many(HEARTBEATS.name, burst)
    ledger.valid += len(burst)
    ledger.counts["burst"] = len(burst)
    await wait_for(lambda: heartbeat_state(worker.url, "burst", 50), WAIT_TIMEOUT_S, "the burst")
    async with httpx.AsyncClient() as client:
        missing = await client.get(f"{worker.url}/ops/heartbeats/nobody")
    assert missing.status_code == 404


async def test_bad_messages_are_dead_lettered_and_the_agent_keeps_running(
        worker: WorkerProcess, publisher: EventPublisher, ledger: Ledger,
        module_settings: Settings) -> None:
    good = Heartbeat(source="bad", seq=1)
    header = {"version": 1, "id": "7f1c1c4e-2b1a-4c8e-9d43-1d7a3c1e9a11", "ts_ms": 1}
    bad_values: list[tuple[bytes | None, str]] = [
        (b"\xff\xfe not json", "DecodeError: JSON is malformed"),
        (encode({"type": "ops.unknown", **header, "source": "bad"}), "Invalid value 'ops.unknown'"),
        (encode({"type": "ops.heartbeat", **header}), "missing required field `source`"),
        (encode({"type": "ops.heartbeat", **header, "version": 7, "source": "bad"}), "unsupported version 7"),
        (encode({"type": "ops.heartbeat", "source": "bad", "seq": 1}), "header field(s) missing"),
        (None, "EmptyValue: message has no value"),
    ]
    producer = AIOKafkaProducer(bootstrap_servers=module_settings.kafka_bootstrap)
    await producer.start()
    try:
        for value, _ in bad_values:
            await producer.send_and_wait(full_name(module_settings, HEARTBEATS.name), value=value, key=b"bad")
    finally:
        await producer.stop()
    # Well-formed, but fails the agent's own check (reject()): stamped an hour ahead.
    future = Heartbeat(source="bad", seq=9, ts_ms=int(time.time() * 1000) + 3_600_000)
    await publisher.publish(HEARTBEATS.name, None, future)
    bad_values.append((encode(future), "ValueError: ts_ms is"))
    ledger.dead += len(bad_values)
    # Same key, so same partition, sent after the bad ones: processed only if the agent survived.
    await publisher.publish(HEARTBEATS.name, None, good)
    ledger.valid += 1
    ledger.counts["bad"] = 1
    state = await wait_for(lambda: heartbeat_state(worker.url, "bad", 1), WAIT_TIMEOUT_S, "the good message")
    assert state["last_id"] == good.id

    letters = await read_dead_letters(module_settings, len(bad_values))
    for letter, (value, error) in zip(letters, bad_values, strict=True):
        assert letter.topic == HEARTBEATS.name and letter.key == "bad"
        assert letter.agent == "ops.heartbeats"
        assert error in letter.error, (letter.error, error)
        original = (base64.b64decode(letter.value) if letter.value_encoding == "base64"
                    else letter.value.encode())
        assert original == (value or b"")
    assert [letter.value_encoding for letter in letters[:2]] == ["base64", "text"]


async def read_dead_letters(settings: Settings, count: int) -> list[DeadLetter]:
    consumer = AIOKafkaConsumer(full_name(settings, dlq_name(HEARTBEATS.name)),
                                bootstrap_servers=settings.kafka_bootstrap, auto_offset_reset="earliest",
                                enable_auto_commit=False)
    await consumer.start()
    letters: list[DeadLetter] = []
    deadline = time.monotonic() + WAIT_TIMEOUT_S
    try:
        while len(letters) < count and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=500)
            for messages in batches.values():
                letters += [decode(m.value, DeadLetter) for m in messages]
    finally:
        await consumer.stop()
    assert len(letters) == count, f"expected {count} dead letters, got {letters}"
    return sorted(letters, key=lambda letter: letter.offset)


async def test_ops_page_lists_agent_offsets_lag_and_table_size(
        worker: WorkerProcess, publisher: EventPublisher, ledger: Ledger) -> None:
    await publish(publisher, ledger, "ops-page")
    await wait_for(lambda: heartbeat_state(worker.url, "ops-page", 1), WAIT_TIMEOUT_S, "ops-page state")

    async def caught_up() -> dict[str, Any] | None:
        # Faust commits every few seconds; wait until every message's offset is committed.
        report = await get_json(worker.url + "/ops/")
        topic = topic_report(report)
        return report if topic["lag"] == 0 and topic["dead_letters"] == ledger.dead else None

    report = await wait_for(caught_up, WAIT_TIMEOUT_S, "committed offsets")
    assert {"name": "ops.heartbeats", "topics": [HEARTBEATS.name]} in report["agents"]
    topic = topic_report(report)
    assert len(topic["partitions"]) == worker.settings.topic_partitions
    assert sum(p["end"] for p in topic["partitions"]) == ledger.sent
    assert all(p["committed"] in (None, p["end"]) and p["lag"] == 0 for p in topic["partitions"])
    table = table_report(report)
    assert table["keys"] == len(ledger.counts) and not table["keys_capped"]
    assert table["active_partitions"] == list(range(worker.settings.topic_partitions))

    async with httpx.AsyncClient() as client:
        page = await client.get(worker.url + "/ops/", params={"format": "html"})
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "<table" in page.text and HEARTBEAT_TABLE in page.text and "ops.heartbeats" in page.text


async def test_worker_metrics_count_processed_and_dead_lettered_events(
        worker: WorkerProcess, ledger: Ledger) -> None:
    async def counted() -> str | None:
        async with httpx.AsyncClient() as client:
            text = (await client.get(worker.url + "/metrics")).text
        processed = metric_value(text, "fintide_events_processed_total",
                                 {"topic": HEARTBEATS.name, "agent": "ops.heartbeats"})
        return text if processed == ledger.valid else None

    text = await wait_for(counted, WAIT_TIMEOUT_S, "processed counter")
    assert metric_value(text, "fintide_events_dlq_total", {"topic": HEARTBEATS.name}) == ledger.dead
    lag = [metric_value(text, "fintide_consumer_lag", {"topic": HEARTBEATS.name, "partition": str(p)})
           for p in range(worker.settings.topic_partitions)]
    assert all(value is not None and value >= 0 for value in lag), lag


async def test_routed_view_reads_a_key_from_the_worker_that_owns_it(
        worker: WorkerProcess, publisher: EventPublisher, ledger: Ledger) -> None:
    settings_2 = msgspec.structs.replace(worker.settings, worker_id="worker-2")
    second = await start_worker(settings_2)
    try:
        owners = await wait_for(lambda: split_assignment(worker, second), START_TIMEOUT_S, "a shared assignment")
        partitions: dict[str, int] = {}
        # routed-0..7 hash to partitions 0, 1 and 2, so each worker owns at least one of them
        # whichever two partitions it is given; the assertion below checks that.
        for n in range(8):
            source = f"routed-{n}"
            meta = await publisher.publish(HEARTBEATS.name, None, Heartbeat(source=source, seq=1))
            partitions[source] = meta.partition
            ledger.valid += 1
            ledger.counts[source] = 1
        assert {owners[p] for p in partitions.values()} == {"worker-1", "worker-2"}, partitions
        for source in partitions:
            # Each worker answers for every key: one locally, the other by forwarding.
            for url in (worker.url, second.url):
                state = await wait_for(lambda u=url, s=source: heartbeat_state(u, s, 1), WAIT_TIMEOUT_S,
                                       f"{source} via {url}")
                assert state["source"] == source
    finally:
        assert second.stop() == 0, second.log_tail()
    # Back to one worker, which owns every partition again.
    await wait_for(lambda: owns_all(worker), START_TIMEOUT_S, "worker-1 owning every partition")


async def split_assignment(first: WorkerProcess, second: WorkerProcess) -> dict[int, str] | None:
    owners: dict[int, str] = {}
    for process in (first, second):
        report = await get_json(process.url + "/ops/")
        if not report:
            return None
        for partition in table_report(report)["active_partitions"]:
            owners[partition] = process.settings.worker_id
    both = set(owners.values()) == {"worker-1", "worker-2"}
    return owners if both and len(owners) == first.settings.topic_partitions else None


async def owns_all(worker: WorkerProcess) -> bool:
    report = await get_json(worker.url + "/ops/")
    return bool(report) and len(table_report(report)["active_partitions"]) == worker.settings.topic_partitions


async def test_worker_stops_on_sigterm_and_its_table_is_on_disk(worker: WorkerProcess, ledger: Ledger) -> None:
    """Last test: it stops the module's worker."""
    for source, count in ledger.counts.items():
        await wait_for(lambda s=source, c=count: heartbeat_state(worker.url, s, c), WAIT_TIMEOUT_S, source)
    assert worker.stop() == 0, worker.log_tail()
    assert not web_url_path(worker.settings).exists()
    on_disk = read_table_from_disk(Path(worker.settings.data_dir) / "worker" / "worker-1", HEARTBEAT_TABLE)
    assert {source: state.count for source, state in on_disk.items()} == ledger.counts

    # A worker with an empty data dir rebuilds the whole table from its changelog.
    fresh = await start_worker(msgspec.structs.replace(worker.settings, worker_id="worker-3"))
    try:
        for source, count in ledger.counts.items():
            await wait_for(lambda s=source, c=count: heartbeat_state(fresh.url, s, c), WAIT_TIMEOUT_S,
                           f"{source} recovered")
    finally:
        assert fresh.stop() == 0, fresh.log_tail()


def read_table_from_disk(datadir: Path, table: str) -> dict[str, HeartbeatState]:
    """Open the stopped worker's RocksDB partitions directly (as Faust's rocksdict driver does)."""
    from rocksdict import AccessType, Options, Rdict

    found: dict[str, HeartbeatState] = {}
    paths = sorted(datadir.rglob(f"{table}-*.db"))
    assert paths, f"no RocksDB files for {table} under {datadir}"
    for path in paths:
        db = Rdict(str(path), options=Options(raw_mode=True), access_type=AccessType.read_only())
        try:
            for key, value in db.items():
                if not key.startswith(b"__faust"):
                    found[key.decode()] = decode(value, HeartbeatState)
        finally:
            db.close()
    return found

