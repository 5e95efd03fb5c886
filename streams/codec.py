"""msgspec JSON codecs: one encoder and one cached decoder per type, shared by every process.

Events and table values go over Kafka as msgspec JSON. `encode`/`decode` are the only
functions producers and consumers call; `MsgspecCodec` plugs the same code into Faust's
codec registry (name "msgspec") for table values and Faust topics. Keys are plain
strings/bytes and use Faust's "raw" codec.

Decoding is strict about event headers (id, ts_ms, version must be on the wire), while
constructing an event in code fills them in: `decoding()` tells the two apart (see
streams/events.py).
"""

from __future__ import annotations

import contextvars
import functools
from typing import Any

import msgspec
from faust.serializers import codecs as faust_codecs

FAUST_CODEC_NAME = "msgspec"

_encoder = msgspec.json.Encoder()
_msgpack_encoder = msgspec.msgpack.Encoder()
_decoding: contextvars.ContextVar[bool] = contextvars.ContextVar("fintide_decoding", default=False)

# The errors `decode` raises for bad input; callers catch exactly these.
DecodeFailure = (msgspec.DecodeError, msgspec.ValidationError)


def encode(value: Any) -> bytes:
    """Encode a Struct (or any msgspec-supported value) as JSON bytes."""
    return _encoder.encode(value)


@functools.cache
def json_decoder(type_: Any) -> msgspec.json.Decoder[Any]:
    """The one reusable decoder for `type_` (a Struct, a Union of Structs, or Any)."""
    return msgspec.json.Decoder(type_)


def decode(data: bytes | str, type_: Any) -> Any:
    """Decode JSON into `type_`; raises msgspec.DecodeError / msgspec.ValidationError."""
    token = _decoding.set(True)
    try:
        return json_decoder(type_).decode(data)
    finally:
        _decoding.reset(token)


@functools.cache
def msgpack_decoder(type_: Any) -> msgspec.msgpack.Decoder[Any]:
    return msgspec.msgpack.Decoder(type_)


def encode_msgpack(value: Any) -> bytes:
    """msgpack for the one topic whose payload is bulk binary (market.ticks: raw numpy
    columns travel as msgpack bin, not as base64 text inside JSON)."""
    return _msgpack_encoder.encode(value)


def decode_msgpack(data: bytes, type_: Any) -> Any:
    """`decode` for msgpack; raises the same DecodeFailure errors."""
    token = _decoding.set(True)
    try:
        return msgpack_decoder(type_).decode(data)
    finally:
        _decoding.reset(token)


def is_decoding() -> bool:
    """True while `decode` is building values (Struct __post_init__ hooks ask this)."""
    return _decoding.get()


def to_builtins(value: Any) -> Any:
    """A Struct as plain dicts/lists, for JSON views that do their own encoding."""
    return msgspec.to_builtins(value)


class MsgspecCodec(faust_codecs.Codec):
    """Faust codec: msgspec JSON, decoding into `type_` (Any gives plain dicts and lists)."""

    def __init__(self, type_: Any = Any, children: tuple[Any, ...] | None = None, **kwargs: Any) -> None:
        # `type_` travels in kwargs so Faust's Codec.clone() (used by `codec | other`) keeps it.
        super().__init__(children=children, type_=type_, **kwargs)
        self.type_ = type_

    def _dumps(self, value: Any) -> bytes:
        return encode(value)

    def _loads(self, data: bytes) -> Any:
        return decode(data, self.type_)


@functools.cache
def codec_for(type_: Any) -> MsgspecCodec:
    """A Faust codec for values of `type_`, e.g. `value_serializer=codec_for(MyState)`."""
    return MsgspecCodec(type_)


faust_codecs.register(FAUST_CODEC_NAME, MsgspecCodec())
