"""Codec, event and topic-spec rules: round trips, tagged unions, strict decoding."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any, Union

import msgspec
import pytest
from faust.serializers import codecs as faust_codecs
from faust.utils import json as faust_json

from streams.codec import FAUST_CODEC_NAME, MsgspecCodec, codec_for, decode, encode
from streams.dlq import MAX_DEAD_VALUE_BYTES, dead_letter
from streams.events import DeadLetter, Event, State, wire_type
from streams.topics import TOPICS, TopicSpec, register


class Opened(Event, tag="unit.opened"):
    account: str
    amount_minor: int


class Closed(Event, tag="unit.closed"):
    VERSION = 2
    READS = frozenset({1, 2})
    account: str
    reason: str = ""


AccountEvent = Union[Opened, Closed]  # noqa: UP007 - a runtime union value, as services declare them


class Balance(State):
    account: str
    available_minor: int


HEADER = {"version": 1, "id": "0b7a5d0c-4d2e-4a8e-9d43-1d7a3c1e9a11", "ts_ms": 1_700_000_000_000}


@pytest.fixture
def clean_registry() -> Iterator[None]:
    saved = dict(TOPICS)
    try:
        yield
    finally:
        TOPICS.clear()
        TOPICS.update(saved)


def wire(**fields: Any) -> bytes:
    return encode({**HEADER, **fields})


def test_event_round_trip_keeps_header_and_fields() -> None:
    event = Opened(account="a-1", amount_minor=1250)
    data = encode(event)
    assert msgspec.json.decode(data)["type"] == "unit.opened"
    assert decode(data, wire_type(Opened)) == event


def test_built_event_gets_header_filled_in() -> None:
    first, second = Opened(account="a", amount_minor=1), Opened(account="a", amount_minor=1)
    assert first.version == 1 and second.version == 1
    assert first.id != second.id and len(first.id) == 36
    assert first.ts_ms > 1_600_000_000_000
    assert Closed(account="a").version == 2
    explicit = Opened(account="a", amount_minor=1, **HEADER)
    assert (explicit.version, explicit.id, explicit.ts_ms) == (1, HEADER["id"], HEADER["ts_ms"])


def test_tagged_union_decodes_each_member() -> None:
    union = wire_type(AccountEvent)
    opened = decode(wire(type="unit.opened", account="a", amount_minor=5), union)
    closed = decode(wire(type="unit.closed", account="a", reason="done", version=2), union)
    assert isinstance(opened, Opened) and opened.amount_minor == 5
    assert isinstance(closed, Closed) and closed.reason == "done"


def test_unknown_type_is_a_validation_error() -> None:
    with pytest.raises(msgspec.ValidationError, match="Invalid value 'unit.nope'"):
        decode(wire(type="unit.nope", account="a"), wire_type(AccountEvent))
    with pytest.raises(msgspec.ValidationError, match="Invalid value 'unit.closed'"):
        decode(wire(type="unit.closed", account="a"), wire_type(Opened))


def test_type_tag_is_required_even_for_a_single_event_type() -> None:
    with pytest.raises(msgspec.ValidationError, match="missing required field `type`"):
        decode(wire(account="a", amount_minor=1), wire_type(Opened))
    # The sentinel that enforces the tag is itself never a valid event.
    with pytest.raises(msgspec.ValidationError, match="not an event type"):
        decode(wire(type="fintide.require-tag"), wire_type(Opened))


def test_decoding_requires_the_header_that_building_fills_in() -> None:
    data = encode({"type": "unit.opened", "account": "a", "amount_minor": 1})
    with pytest.raises(msgspec.ValidationError, match="header field.*version, id, ts_ms"):
        decode(data, wire_type(Opened))
    with pytest.raises(msgspec.ValidationError, match="id"):
        decode(wire(type="unit.opened", account="a", amount_minor=1, id=""), wire_type(Opened))


def test_failing_validation_names_the_field() -> None:
    with pytest.raises(msgspec.ValidationError, match=r"Expected `int`, got `str` - at `\$.amount_minor`"):
        decode(wire(type="unit.opened", account="a", amount_minor="12"), wire_type(Opened))
    with pytest.raises(msgspec.ValidationError, match="missing required field `account`"):
        decode(wire(type="unit.opened", amount_minor=1), wire_type(Opened))
    with pytest.raises(msgspec.DecodeError, match="malformed"):
        decode(b"{not json", wire_type(Opened))


def test_versions_outside_reads_are_refused() -> None:
    with pytest.raises(msgspec.ValidationError, match="unsupported version 3 of 'unit.closed'"):
        decode(wire(type="unit.closed", account="a", version=3), wire_type(Closed))
    assert decode(wire(type="unit.closed", account="a", version=1), wire_type(Closed)).version == 1
    with pytest.raises(ValueError, match="unsupported version 2"):
        Opened(account="a", amount_minor=1, version=2)


def test_an_event_class_must_read_the_version_it_writes() -> None:
    with pytest.raises(AssertionError, match="VERSION 2 not in READS"):
        class Broken(Event, tag="unit.broken"):  # noqa: F841 - defining it is the test
            VERSION = 2


def test_faust_codec_registry_has_msgspec() -> None:
    codec = faust_codecs.get_codec(FAUST_CODEC_NAME)
    assert isinstance(codec, MsgspecCodec)
    assert codec.loads(codec.dumps({"a": [1, 2]})) == {"a": [1, 2]}


def test_typed_faust_codec_decodes_into_the_struct() -> None:
    codec = codec_for(Balance)
    assert codec is codec_for(Balance)
    value = Balance(account="a", available_minor=7)
    assert codec.loads(codec.dumps(value)) == value
    # Faust chains codecs with `|`, which clones: the type must survive the clone.
    chained = codec | faust_codecs.get_codec("binary")
    data = chained.dumps(value)
    assert base64.b64decode(data) == encode(value)
    assert chained.loads(data) == value


def test_structs_render_in_faust_json_views() -> None:
    assert faust_json.loads(faust_json.dumps(Balance(account="a", available_minor=7))) == {
        "account": "a", "available_minor": 7}
    assert faust_json.loads(faust_json.dumps(Opened(account="a", amount_minor=1, **HEADER)))["type"] == "unit.opened"


def test_topic_spec_checks_names_types_and_key_field() -> None:
    with pytest.raises(ValueError, match="must look like 'service.stream'"):
        TopicSpec("Accounts", Opened)
    with pytest.raises(ValueError, match="must look like"):
        TopicSpec("unit.accounts.dlq", Opened)
    with pytest.raises(TypeError, match="not an Event subclass"):
        TopicSpec("unit.accounts", Balance)
    with pytest.raises(ValueError, match="'reason' is not a field of Opened"):
        TopicSpec("unit.accounts", AccountEvent, key_field="reason")
    spec = TopicSpec("unit.accounts", AccountEvent, key_field="account")
    assert spec.types == (Opened, Closed)
    assert spec.decode(encode(Opened(account="a", amount_minor=1))).account == "a"


def test_message_key_comes_from_key_field_and_must_agree() -> None:
    spec = TopicSpec("unit.accounts", AccountEvent, key_field="account")
    event = Opened(account="acc-9", amount_minor=1)
    assert spec.message_key(None, event) == b"acc-9"
    assert spec.message_key("acc-9", event) == b"acc-9"
    with pytest.raises(ValueError, match="differs from account='acc-9'"):
        spec.message_key("other", event)
    with pytest.raises(TypeError, match="DeadLetter is not an event type of topic"):
        spec.message_key(None, dead_letter("t.x", 0, 0, None, b"", ValueError("x"), "-"))
    unkeyed = TopicSpec("unit.audit", Opened)
    assert unkeyed.message_key(None, event) is None
    assert unkeyed.message_key("anything", event) == b"anything"


def test_register_is_idempotent_and_refuses_a_conflicting_spec(clean_registry: None) -> None:
    spec = register(TopicSpec("unit.accounts", AccountEvent, key_field="account"))
    assert register(TopicSpec("unit.accounts", AccountEvent, key_field="account")) == spec
    assert TOPICS["unit.accounts"] == spec
    with pytest.raises(ValueError, match="already registered"):
        register(TopicSpec("unit.accounts", Opened))


def test_dead_letter_keeps_text_or_base64_and_is_bounded() -> None:
    text = dead_letter("unit.accounts", 3, 42, b"acc-1", b'{"type":"x"}', ValueError("bad"), "agent.x",
                       message_ts_ms=5)
    assert (text.value, text.value_encoding, text.key, text.error) == ('{"type":"x"}', "text", "acc-1",
                                                                       "ValueError: bad")
    assert decode(encode(text), DeadLetter) == text
    binary = dead_letter("unit.accounts", 0, 1, None, b"\xff\x00", ValueError("bad"), "agent.x")
    assert binary.value_encoding == "base64" and base64.b64decode(binary.value) == b"\xff\x00"
    huge = dead_letter("unit.accounts", 0, 2, None, b"a" * (MAX_DEAD_VALUE_BYTES * 2), ValueError("x" * 10_000), "-")
    assert len(huge.value) == MAX_DEAD_VALUE_BYTES and len(huge.error) <= 2000
