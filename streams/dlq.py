"""Typed agent streams with dead letters: the one way agents read events.

    @app.agent(event_topic(app, PAYMENTS), name="payments.saga")
    async def saga(stream):
        async for event in typed_stream(stream, PAYMENTS):
            ...

`typed_stream` decodes each raw message with the topic's msgspec decoder. A message that
does not decode (bad JSON, unknown `type`, failed validation, unsupported version,
missing value) becomes a `DeadLetter` on `<topic>.dlq` and the agent carries on.
An event that decodes but fails a check the agent makes itself (e.g. a tick batch whose
columns do not fit together) is rejected the same way:

        async for batch in typed_stream(stream, TICKS):
            try:
                columns = batch.columns()
            except MalformedBatch as exc:
                await reject(stream, TICKS, exc)
                continue

It counts `fintide_events_processed_total{topic,agent}` when the agent's body finishes
an event (an event whose body raised, or that was rejected, is not counted) and
`fintide_events_dlq_total{topic}`. It also sets the logging `event_id` context for the body.
"""

from __future__ import annotations

import base64
import contextvars
import logging
from collections.abc import AsyncIterator
from typing import Any, TypeVar

from faust.agents.agent import current_agent
from faust.types import EventT, StreamT

from ops.logging import event_id_var
from streams.app import FintideApp, dead_letter_topic
from streams.codec import DecodeFailure, encode
from streams.events import DeadLetter
from streams.metrics import EVENTS_DLQ, EVENTS_PROCESSED
from streams.topics import TopicSpec, full_name

log = logging.getLogger("fintide.streams.dlq")

E = TypeVar("E")
# A dead letter keeps at most this much of the original value and error text, so one huge
# bad message cannot become an equally huge record on the DLQ.
MAX_DEAD_VALUE_BYTES = 64 * 1024
MAX_ERROR_CHARS = 2000

# The message `reject` dead-lettered, so typed_stream does not count it as processed.
# The agent body and typed_stream run in the same task, so they share this variable.
_rejected: contextvars.ContextVar[EventT[Any] | None] = contextvars.ContextVar("fintide_rejected", default=None)


async def typed_stream(stream: StreamT[Any], spec: TopicSpec[E]) -> AsyncIterator[E]:
    """Yield `spec`'s decoded events from an agent's stream; dead-letter the rest."""
    app = stream.app
    assert isinstance(app, FintideApp), "typed_stream needs an app from streams.app.create_app"
    _check_source(app, stream, spec)
    agent = current_agent()
    agent_name = agent.name if agent is not None else "-"
    processed = EVENTS_PROCESSED.labels(spec.name, agent_name)
    dead = EVENTS_DLQ.labels(spec.name)
    async for message_event in stream.events():
        try:
            event = _decode(spec, message_event)
        except (*DecodeFailure, EmptyValue) as exc:
            event_id_var.set(None)
            await _dead_letter(app, spec, message_event, exc, agent_name)
            dead.inc()
            continue
        event_id_var.set(getattr(event, "id", None))
        yield event
        if _rejected.get() is not message_event:
            processed.inc()
    event_id_var.set(None)


async def reject(stream: StreamT[Any], spec: TopicSpec[Any], error: Exception) -> None:
    """Dead-letter the event the agent is processing (from typed_stream) because of `error`."""
    app = stream.app
    message_event = stream.current_event
    assert isinstance(app, FintideApp) and message_event is not None, "reject() outside a typed_stream body"
    _check_source(app, stream, spec)
    agent = current_agent()
    await _dead_letter(app, spec, message_event, error, agent.name if agent is not None else "-")
    EVENTS_DLQ.labels(spec.name).inc()
    _rejected.set(message_event)


class EmptyValue(ValueError):
    """A message without a value (a tombstone) on an event topic."""


async def dead_letter_event(app: FintideApp, spec: TopicSpec[Any], message_event: EventT[Any], error: Exception,
                            agent_name: str) -> None:
    """Dead-letter one event of a take_events() batch (`reject` is for typed_stream bodies)."""
    await _dead_letter(app, spec, message_event, error, agent_name)
    EVENTS_DLQ.labels(spec.name).inc()


def _decode(spec: TopicSpec[E], message_event: EventT[Any]) -> E:
    value = message_event.message.value
    if not value:
        raise EmptyValue("message has no value")
    return spec.decode(value)


def _check_source(app: FintideApp, stream: StreamT[Any], spec: TopicSpec[Any]) -> None:
    # Decoding one topic's messages with another topic's types would dead-letter everything.
    expected = full_name(app.settings, spec.name)
    topics = set(getattr(stream.channel, "topics", ()) or ())
    assert topics == {expected}, f"typed_stream for {spec.name!r} reads a stream of {sorted(topics)}"


async def _dead_letter(app: FintideApp, spec: TopicSpec[Any], message_event: EventT[Any],
                       exc: Exception, agent_name: str) -> None:
    message = message_event.message
    record = dead_letter(spec.name, message.partition, message.offset, message.key, message.value,
                         exc, agent_name, message_ts_ms=_timestamp_ms(message.timestamp))
    log.warning("dead letter", extra={"topic": spec.name, "partition": message.partition,
                                      "offset": message.offset, "error": record.error})
    # Attached to the message being processed: published before its offset is committed.
    await dead_letter_topic(app, spec).send(key=message.key, value=encode(record))


def dead_letter(topic: str, partition: int, offset: int, key: bytes | None, value: bytes | None,
                exc: BaseException, agent: str, *, message_ts_ms: int | None = None) -> DeadLetter:
    """The DeadLetter record for one undecodable message."""
    raw = (value or b"")[:MAX_DEAD_VALUE_BYTES]
    text, encoding = _as_text(raw)
    error = f"{type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS]
    return DeadLetter(topic=topic, partition=partition, offset=offset,
                      key=key.decode("utf-8", "backslashreplace") if key is not None else None,
                      value=text, value_encoding=encoding, error=error, agent=agent,
                      message_ts_ms=message_ts_ms)


def _as_text(raw: bytes) -> tuple[str, Any]:
    try:
        return raw.decode("utf-8"), "text"
    except UnicodeDecodeError:
        return base64.b64encode(raw).decode("ascii"), "base64"


def _timestamp_ms(timestamp: float | None) -> int | None:
    # Faust gives message timestamps in seconds as a float.
    return int(timestamp * 1000) if timestamp else None
