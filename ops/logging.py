"""JSON structured logging with request/event ids, and a filter that keeps secrets out.

Every line is one JSON object: ts, level, logger, msg, the current request_id / event_id
(from context variables set by the API middleware and the agents), and any `extra` fields.
"""

from __future__ import annotations

import contextvars
import logging
import re
import sys
import time
from typing import Any

import msgspec

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
event_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("event_id", default=None)

_STANDARD_ATTRS = frozenset(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}
# Values that look like credentials are masked wherever they appear in a message.
_SECRET_PATTERNS = (
    re.compile(r"(?i)(password|passwd|secret|token|api[_-]?key|authorization)(\"?\s*[:=]\s*\"?)([^\s\",}]+)"),
    re.compile(r"(?i)(bearer\s+)([A-Za-z0-9\-_.=]+)"),
    re.compile(r"(postgres(?:ql)?://[^:/@\s]+:)([^@\s]+)(@)"),
)
_encoder = msgspec.json.Encoder()


def redact(text: str, secrets: tuple[str, ...] = ()) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    # Bearer first: the key pattern would otherwise consume the word "Bearer" and keep the token.
    text = _SECRET_PATTERNS[1].sub(r"\1***", text)
    text = _SECRET_PATTERNS[0].sub(r"\1\2***", text)
    return _SECRET_PATTERNS[2].sub(r"\1***\3", text)


class JsonFormatter(logging.Formatter):
    def __init__(self, secrets: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.secrets = secrets

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": redact(record.getMessage(), self.secrets),
        }
        for key, var in (("request_id", request_id_var), ("event_id", event_id_var)):
            value = var.get()
            if value:
                entry[key] = value
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = redact(self.formatException(record.exc_info), self.secrets)
        return _encoder.encode(_jsonable(entry)).decode()


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def configure_logging(level: str = "INFO", secrets: tuple[str, ...] = (), stream: Any = None) -> None:
    """Send every logger's records to stderr (or `stream`) as JSON lines."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter(secrets))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Faust and aiokafka are chatty at INFO about every rebalance step.
    for noisy in ("aiokafka", "faust.transport", "mode", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(max(root.level, logging.WARNING))
