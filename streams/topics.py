"""The topic registry: every Kafka topic, its event types and its key, declared once.

A service declares its topics in `streams/<service>.py` and lists that module in
`CATALOG_MODULES` below:

    TICKS: TopicSpec[TickBatch] = register(TopicSpec(
        "market.ticks", TickBatch, key_field="symbol", doc="tick batches, keyed by symbol"))

Kafka names get `settings.topic_prefix` (tests use a prefix per test on one broker);
every topic has a dead-letter twin `<name>.dlq` carrying `DeadLetter` records.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import logging
import re
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.partitioner import murmur2

from ops.settings import Settings
from streams.codec import decode
from streams.events import Event, event_types, wire_type

log = logging.getLogger("fintide.streams.topics")

# The decoded value type: an Event subclass or a Union of them.
E = TypeVar("E")

# Modules that declare topics; ensure_topics imports them all. Services append theirs.
CATALOG_MODULES: list[str] = ["streams.ops", "streams.identity", "streams.market", "streams.fraud",
                              "streams.payments"]

@functools.lru_cache(maxsize=1 << 16)
def partition_for_key(key: str, n_partitions: int) -> int:
    """Kafka's default partition for `key` (murmur2, as aiokafka and the Java client use):
    where a message keyed `key` lands and where Faust's table router looks for it.
    Cached: aiokafka's murmur2 is pure Python, and keys come back again and again."""
    assert n_partitions >= 1, n_partitions
    return (murmur2(key.encode("utf-8")) & 0x7FFFFFFF) % n_partitions


DLQ_SUFFIX = ".dlq"
_NAME = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$")
# Kafka error codes that mean "nothing to do" for CreateTopics.
_NO_ERROR = 0
_TOPIC_ALREADY_EXISTS = 36
ADMIN_TIMEOUT_S = 15.0


@dataclass(frozen=True)
class TopicSpec(Generic[E]):
    """One topic: logical name `<service>.<stream>`, event type(s), key and partitions."""

    name: str
    # An Event subclass or a Union of Event subclasses.
    value_type: Any
    # The event field whose value is the message key (ordering is per key); None when
    # messages are keyed some other way, described in `doc`.
    key_field: str | None = None
    doc: str = ""
    # None: settings.topic_partitions. Tables written from this topic use the same count.
    partitions: int | None = None
    types: tuple[type[Event], ...] = field(init=False, repr=False, compare=False)
    _wire_type: Any = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not _NAME.match(self.name) or self.name.endswith(DLQ_SUFFIX):
            raise ValueError(f"topic name {self.name!r} must look like 'service.stream' (lowercase)")
        if self.partitions is not None and self.partitions < 1:
            raise ValueError(f"{self.name}: partitions must be >= 1")
        types = event_types(self.value_type)
        if self.key_field is not None:
            for cls in types:
                if self.key_field not in cls.__struct_fields__:
                    raise ValueError(f"{self.name}: key_field {self.key_field!r} is not a field of {cls.__name__}")
        object.__setattr__(self, "types", types)
        object.__setattr__(self, "_wire_type", wire_type(self.value_type))

    def decode(self, data: bytes) -> E:
        """Decode one message value; raises msgspec.DecodeError / ValidationError."""
        return decode(data, self._wire_type)  # type: ignore[no-any-return]

    def accepts(self, event: Any) -> bool:
        return isinstance(event, self.types)

    def key_of(self, event: E) -> str | None:
        if self.key_field is None:
            return None
        return str(getattr(event, self.key_field))

    def message_key(self, key: str | bytes | None, event: Any) -> bytes | None:
        """The Kafka key for publishing `event`: `key`, or the event's key_field (both
        must agree when both exist), after checking the event belongs on this topic."""
        if not self.accepts(event):
            raise TypeError(f"{type(event).__name__} is not an event type of topic {self.name!r}")
        derived = self.key_of(event)
        if key is None:
            key = derived
        elif derived is not None:
            # Per-key ordering (and table routing) depends on the key being the declared field.
            text = key.decode() if isinstance(key, bytes) else key
            if text != derived:
                raise ValueError(f"{self.name}: key {text!r} differs from {self.key_field}={derived!r}")
        return key.encode() if isinstance(key, str) else key

    def partition_count(self, settings: Settings) -> int:
        return self.partitions or settings.topic_partitions


TOPICS: dict[str, TopicSpec[Any]] = {}


def register(spec: TopicSpec[E]) -> TopicSpec[E]:
    """Add a topic to the registry and return it (re-registering the same spec is a no-op)."""
    existing = TOPICS.get(spec.name)
    if existing is not None and existing != spec:
        raise ValueError(f"topic {spec.name!r} is already registered with a different spec: {existing}")
    TOPICS[spec.name] = spec
    return spec


def get_spec(name: str) -> TopicSpec[Any]:
    try:
        return TOPICS[name]
    except KeyError:
        raise KeyError(f"unknown topic {name!r}: declare it with streams.topics.register() in "
                       f"streams/<service>.py and list the module in CATALOG_MODULES") from None


def load_catalog() -> dict[str, TopicSpec[Any]]:
    """Import every module in CATALOG_MODULES so the registry is complete."""
    for module in CATALOG_MODULES:
        importlib.import_module(module)
    return TOPICS


def full_name(settings: Settings, name: str) -> str:
    """The Kafka topic name for logical `name`."""
    return settings.topic_prefix + name


def dlq_name(name: str) -> str:
    return name + DLQ_SUFFIX


def bootstrap_servers(settings: Settings) -> list[str]:
    servers = [s.strip() for s in settings.kafka_bootstrap.split(",") if s.strip()]
    if not servers:
        raise ValueError("FINTIDE_KAFKA_BOOTSTRAP is empty: start the embedded stack (`fintide up`) or set it")
    return servers


async def ensure_topics(settings: Settings, specs: list[TopicSpec[Any]] | None = None) -> list[str]:
    """Create every registered topic and its `.dlq`; existing topics are fine if their
    partition count matches (tables are co-partitioned with their source topics).
    Returns the Kafka names created or found."""
    if specs is None:
        specs = list(load_catalog().values())
    wanted = {full_name(settings, name): spec.partition_count(settings)
              for spec in specs for name in (spec.name, dlq_name(spec.name))}
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers(settings),
                                request_timeout_ms=int(ADMIN_TIMEOUT_S * 1000))
    await asyncio.wait_for(admin.start(), ADMIN_TIMEOUT_S)
    try:
        await _create(admin, wanted)
        await _check_partitions(admin, wanted)
    finally:
        await admin.close()
    return sorted(wanted)


async def _create(admin: AIOKafkaAdminClient, wanted: dict[str, int]) -> None:
    if not wanted:
        return
    new = [NewTopic(name, partitions, 1) for name, partitions in wanted.items()]
    response = await asyncio.wait_for(admin.create_topics(new), ADMIN_TIMEOUT_S)
    # aiokafka reports per-topic errors in the response instead of raising.
    for topic, code, message in (tuple(e)[:3] for e in response.topic_errors):
        if code == _TOPIC_ALREADY_EXISTS:
            log.debug("topic exists", extra={"topic": topic})
        elif code != _NO_ERROR:
            raise RuntimeError(f"cannot create Kafka topic {topic!r}: error {code} {message}")
        else:
            log.info("topic created", extra={"topic": topic, "partitions": wanted[topic]})


async def _check_partitions(admin: AIOKafkaAdminClient, wanted: dict[str, int]) -> None:
    described = await asyncio.wait_for(admin.describe_topics(list(wanted)), ADMIN_TIMEOUT_S)
    for topic in described:
        count = len(topic["partitions"])
        if topic["error_code"] != _NO_ERROR or count != wanted[topic["topic"]]:
            raise RuntimeError(
                f"Kafka topic {topic['topic']!r} has {count} partitions (error {topic['error_code']}), "
                f"expected {wanted[topic['topic']]}: tables need the same count as their source topic")

