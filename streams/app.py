"""The Faust app factory and the few helpers every service uses with it.

There is no module-level app: `create_app(settings)` builds one, and each agent module
has an `install(app)` function that declares its agents, tables and views on it (see
agents/__init__.py and docs/STREAMS.md). That keeps topic names (which carry the
settings' prefix) out of import time and lets tests run workers with their own settings.
"""

from __future__ import annotations

import asyncio
import socket
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import faust
import faust.streams as faust_streams
import msgspec
from faust.types import EventT, ProducerT, TopicT, TransportT
from faust.web import Request, Response, View

from ops.embedded import free_port
from ops.settings import Settings
from streams import kafka
from streams.codec import codec_for, encode, to_builtins
from streams.events import State
from streams.topics import TopicSpec, bootstrap_servers, dlq_name, full_name, get_spec


class FintideApp(faust.App):
    """A faust.App that knows its Fintide settings and caches its typed topics."""

    settings: Settings

    def __init__(self, settings: Settings, **options: Any) -> None:
        super().__init__(settings.app_id, **options)
        self.settings = settings
        self._event_topics: dict[str, TopicT] = {}
        self._producer_start_lock = asyncio.Lock()

    async def maybe_start_producer(self) -> ProducerT:
        """The started producer, at once: every topic.send() awaits this.

        faust.App's version is wrapped in mode's `stampede`, which yields to the event loop
        three times per call (asyncio.sleep(0)) even when the producer is long started; with
        two sends per message that was most of an agent's time in send (measured: 75 % of
        wall time in send, 18 % with this fast path; docs/benchmarks/market.md)."""
        if self.in_transaction:  # exactly-once (not used here): what faust.App returns
            return self.consumer.transactions  # type: ignore[return-value]
        producer = self.producer
        if not producer._started.is_set():  # mode's Service start flag
            # (Not super(): the stampede descriptor would cache itself on the instance and
            # shadow this method from then on.) One start, however many senders wait.
            async with self._producer_start_lock:
                await producer.maybe_start()
        return producer

    def _new_transport(self) -> TransportT:
        # Faust's aiokafka transport with end offsets corrected for Tansu, so table recovery
        # reads the whole changelog (streams/kafka.py). faust.App has no public hook for the
        # consumer transport class; this private factory method is where it is built.
        return kafka.Transport(self.conf.broker_consumer, self)


def worker_dir(settings: Settings) -> Path:
    """This worker's Faust data dir (RocksDB tables live under it)."""
    return settings.data_path / "worker" / settings.worker_id


def create_app(settings: Settings) -> FintideApp:
    """A Faust app configured from settings; agents are added by `install(app)` calls."""
    # Faust cannot listen on port 0 (its web_port must be >= 1, and the canonical URL used
    # by table routing must name the real port), so pick a free port up front.
    web_port = settings.worker_web_port or free_port()
    datadir = worker_dir(settings)
    datadir.mkdir(parents=True, exist_ok=True)
    return FintideApp(
        settings,
        broker=[f"kafka://{server}" for server in bootstrap_servers(settings)],
        # rocksdb:// picks the rocksdict driver when python-rocksdb is absent (it is not
        # installed); state survives restarts in datadir and is rebuilt from changelogs.
        store="rocksdb://",
        datadir=str(datadir),
        autodiscover=False,
        # Effects are idempotent (dedupe by event id); Faust's exactly_once is not used.
        processing_guarantee="at_least_once",
        consumer_auto_offset_reset="earliest",
        # Faust's defaults make a group join on Tansu take ~30 s; these take ~3 s.
        broker_rebalance_timeout=settings.broker_rebalance_timeout_s,
        broker_session_timeout=settings.broker_session_timeout_s,
        broker_heartbeat_interval=settings.broker_heartbeat_interval_s,
        # Bounded per-partition buffer: back-pressure instead of unbounded memory.
        stream_buffer_maxsize=settings.stream_buffer_maxsize,
        topic_partitions=settings.topic_partitions,
        topic_replication_factor=1,
        # Values are msgspec bytes decoded by our helpers; keys are plain strings.
        key_serializer="raw",
        value_serializer="raw",
        web_enabled=True,
        web_bind=settings.worker_web_bind,
        web_host=_advertised_host(settings),
        web_port=web_port,
        canonical_url=f"http://{_advertised_host(settings)}:{web_port}",
        # Views read tables, so they must run on the agents' event loop, not in a thread.
        web_in_thread=False,
        web_stats_enabled=True,
        web_metrics_enabled=True,
    )


def _advertised_host(settings: Settings) -> str:
    """How other workers (table routing) and Prometheus reach this worker's web server."""
    if settings.worker_web_host:
        return settings.worker_web_host
    if settings.worker_web_bind in ("0.0.0.0", "::"):
        return socket.gethostname()
    return settings.worker_web_bind


def event_topic(app: FintideApp, spec: TopicSpec[Any]) -> TopicT:
    """The Faust topic for `spec` (raw bytes; agents decode with streams.dlq.typed_stream)."""
    return _raw_topic(app, spec.name, spec.partition_count(app.settings))


def dead_letter_topic(app: FintideApp, spec: TopicSpec[Any]) -> TopicT:
    """The Faust topic for `<spec.name>.dlq`."""
    return _raw_topic(app, dlq_name(spec.name), spec.partition_count(app.settings))


def _raw_topic(app: FintideApp, name: str, partitions: int) -> TopicT:
    # One Topic object per name and app: agents and senders share it.
    topic = app._event_topics.get(name)
    if topic is None:
        topic = app.topic(full_name(app.settings, name), key_serializer="raw", value_serializer="raw",
                          partitions=partitions)
        app._event_topics[name] = topic
    return topic


async def send_event(app: FintideApp, topic: str | TopicSpec[Any], event: Any,
                     key: str | bytes | None = None) -> None:
    """Send an event from inside an agent. Faust attaches the send to the message being
    processed and publishes it before that message's offset is committed (at-least-once)."""
    spec = get_spec(topic) if isinstance(topic, str) else topic
    message_key = spec.message_key(key, event)
    await event_topic(app, spec).send(key=message_key, value=encode(event))


def state_table(app: FintideApp, name: str, value_type: Any, *, source: TopicSpec[Any],
                help: str = "") -> faust.Table:
    """A RocksDB-backed table of msgspec values, co-partitioned with the topic that writes it.

    Write it only from an agent consuming `source`, keyed by that topic's message key:
    Faust stores a key in the partition of the message being processed, and the table
    router finds it again by hashing the key, so the two must agree. Declaring the same
    name twice returns the first table.
    """
    if name in app.tables:
        return app.tables[name]  # type: ignore[return-value]
    if isinstance(value_type, type) and issubclass(value_type, msgspec.Struct):
        # Faust's /table views render values through __json__, which State provides.
        assert issubclass(value_type, State), f"table {name!r}: {value_type.__name__} must subclass State"
    # What app.Table() does, with one step between building and registering: Faust derives
    # serializers from key_type/value_type (str -> "json"), and registering creates the
    # changelog topic with them. Raw keys matter: the router hashes the key bytes, which
    # must equal the source message's key bytes. key_type=str hands keys back as str.
    table = app.conf.Table(app, name=name, partitions=source.partition_count(app.settings),
                           key_type=str, help=help, beacon=app.tables.beacon)
    table.key_serializer = "raw"
    table.value_serializer = codec_for(value_type)
    app.tables.add(table)
    assert table.changelog_topic.key_serializer == "raw", "changelog topic built before serializers were set"
    return table


@contextmanager
def acting_for(event: EventT) -> Iterator[None]:
    """Make `event` Faust's current event while reading or writing its partition's table rows.

    Faust stores a key in the RocksDB partition (and changelog partition) of the current
    event's message. A take_events() batch mixes partitions, so before touching a key the
    agent makes a message of that key's partition current: Faust's own per-message path.
    (faust.streams keeps the current event in a private ContextVar.)"""
    token = faust_streams._current_event.set(weakref.ref(event))
    try:
        yield
    finally:
        faust_streams._current_event.reset(token)


def routed_table_view(app: FintideApp, table: faust.Table, path: str, *,
                      render: Callable[[Any], Any] = to_builtins) -> type[View]:
    """Serve `GET <path>` (which must contain `{key}`) with `render(table[key])` as JSON.

    The request is forwarded to the worker that owns the key's partition (Faust's
    `app.table_route`), because a worker's table holds only its own partitions.
    404 when the key is absent, 503 while partitions are being assigned.
    """
    assert "{key}" in path, f"routed view path {path!r} needs a {{key}} segment"

    @app.table_route(table=table, match_info="key")
    async def get(view: View, request: Request, key: str) -> Response:
        value = table.get(key)
        if value is None:
            raise view.NotFound("key not found", key=key, table=table.name)
        return view.json(render(value))

    view_class = type(f"RoutedTableView_{table.name}", (View,), {"get": get})
    return app.page(path, name=f"table-key:{table.name}")(view_class)
