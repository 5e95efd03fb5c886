"""Value types: `Event` (every Kafka value: a tagged, versioned msgspec Struct) and `State`
(the base of table values).

    class PaymentInitiated(Event, tag="payments.initiated"):
        payment_id: str
        amount_minor: int
        currency: str

    PaymentEvent = PaymentInitiated | PaymentPosted | PaymentFailed   # a tagged union

On the wire an event is JSON with its `type` tag, `version`, `id` (a UUID string, the
dedupe key for at-least-once delivery) and `ts_ms` (epoch milliseconds). Built in code,
the header is filled in (`version` = the class's VERSION, a fresh `id`, now as `ts_ms`);
decoded from Kafka, a missing header, a wrong tag or a version the class cannot read is
a validation error, so the message goes to the dead-letter topic instead of into state.

A new version of an event sets `VERSION = 2` and `READS = frozenset({1, 2})` while old
messages may still be on the topic, then drops 1 from READS once they are gone.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, ClassVar, Literal, Union, get_args

import msgspec

from streams.codec import is_decoding


def new_event_id() -> str:
    return str(uuid.uuid4())


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class Event(msgspec.Struct, tag_field="type", kw_only=True, frozen=True):
    """Base of every event. Subclasses give `tag="<service>.<event>"` and their fields."""

    # The version this code writes, and the versions it can read.
    VERSION: ClassVar[int] = 1
    READS: ClassVar[frozenset[int]] = frozenset({1})

    # 0 / "" mean "fill in" when built in code; decoding requires real values.
    version: int = 0
    id: str = ""
    ts_ms: int = 0

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        assert cls.VERSION in cls.READS, f"{cls.__name__}: VERSION {cls.VERSION} not in READS {set(cls.READS)}"

    def __post_init__(self) -> None:
        # msgspec turns a ValueError raised here during decoding into a ValidationError.
        if is_decoding():
            _check_header(self)
        else:
            _fill_header(self)
        if self.version not in type(self).READS:
            raise ValueError(f"unsupported version {self.version} of {event_tag(type(self))!r}; "
                             f"this code reads {sorted(type(self).READS)}")

    def __json__(self) -> Any:
        # Faust's own JSON views (e.g. /table/<name>/<key>/) serialise values through this.
        return msgspec.to_builtins(self)


def check_batch_size(count: int, what: str, limit: int) -> None:
    """A batch event must hold 1..limit events. Raised while decoding, this becomes a
    validation error: the message is dead-lettered."""
    if not 1 <= count <= limit:
        raise ValueError(f"{what} holds {count} events; 1..{limit} allowed")


def _check_header(event: Event) -> None:
    missing = [name for name in ("version", "id", "ts_ms") if not getattr(event, name)]
    if missing:
        raise ValueError(f"event header field(s) missing or empty: {', '.join(missing)}")


def _fill_header(event: Event) -> None:
    # Structs are frozen; force_setattr is msgspec's sanctioned way to finish one in __post_init__.
    if not event.version:
        msgspec.structs.force_setattr(event, "version", type(event).VERSION)
    if not event.id:
        msgspec.structs.force_setattr(event, "id", new_event_id())
    if not event.ts_ms:
        msgspec.structs.force_setattr(event, "ts_ms", now_ms())


class _RequireTag(Event, tag="fintide.require-tag"):
    """Never valid. Added to every topic's decoder union so that msgspec demands the `type`
    tag even on a topic with one event type (a lone Struct would accept a missing tag)."""

    def __post_init__(self) -> None:
        raise ValueError("'fintide.require-tag' is not an event type")


def event_tag(cls: type[Event]) -> str:
    tag = cls.__struct_config__.tag
    assert isinstance(tag, str), f"{cls.__name__} has no string type tag"
    return tag


def event_types(value_type: Any) -> tuple[type[Event], ...]:
    """The Event classes in `value_type`: one class or a Union of classes."""
    members = get_args(value_type) or (value_type,)
    for member in members:
        if not (isinstance(member, type) and issubclass(member, Event)):
            raise TypeError(f"{member!r} is not an Event subclass")
    return tuple(members)


def wire_type(value_type: Any) -> Any:
    """The type a topic's messages decode to: its events plus the tag-requiring sentinel."""
    return Union[(*event_types(value_type), _RequireTag)]  # noqa: UP007 - built at runtime


class State(msgspec.Struct, frozen=True, kw_only=True):
    """Base of table values: a frozen Struct (replace it, never mutate it in place: a Faust
    table only writes its changelog on assignment) that Faust's JSON views can render."""

    def __json__(self) -> Any:
        return msgspec.to_builtins(self)


class DeadLetter(Event, tag="streams.dead_letter"):
    """A message an agent could not decode, kept on `<topic>.dlq` with the reason."""

    topic: str
    partition: int
    offset: int
    key: str | None
    # The original bytes: as text when they are UTF-8, else base64.
    value: str
    value_encoding: Literal["text", "base64"]
    error: str
    agent: str
    # When the original message was written to Kafka (epoch ms), if the broker said.
    message_ts_ms: int | None = None
