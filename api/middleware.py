"""ASGI middleware: a request id on every request, its response and its log lines; the
number of open WebSocket connections per route (`fintide_ws_clients`)."""

from __future__ import annotations

import re
import uuid
from typing import Any

from litestar.types import ASGIApp, Message, Receive, Scope, Send
from prometheus_client import Gauge

from ops.logging import request_id_var

REQUEST_ID_HEADER = b"x-request-id"
# A client-supplied id is echoed only when it is short and plain, so it cannot inject log noise.
_SAFE_ID = re.compile(rb"^[A-Za-z0-9._\-]{1,64}$")


def request_id_middleware(app: ASGIApp) -> ASGIApp:
    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await app(scope, receive, send)
            return
        incoming = dict(scope["headers"]).get(REQUEST_ID_HEADER, b"")
        request_id = incoming.decode() if _SAFE_ID.match(incoming) else uuid.uuid4().hex
        token = request_id_var.set(request_id)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers: list[Any] = list(message.get("headers", []))
                headers.append((REQUEST_ID_HEADER, request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await app(scope, receive, send_with_id)
        finally:
            request_id_var.reset(token)

    return middleware


WS_CLIENTS = Gauge("fintide_ws_clients", "Open WebSocket connections of this API process.", ["path"])


def ws_clients_middleware(app: ASGIApp) -> ASGIApp:
    """Count a WebSocket connection from its handler's start to its end (any close)."""
    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "websocket":
            await app(scope, receive, send)
            return
        # The handler's declared path (routing ran before app middleware): a bounded label.
        handler = scope.get("route_handler")
        path = min(handler.paths) if handler is not None and handler.paths else "other"
        gauge = WS_CLIENTS.labels(path)
        gauge.inc()
        try:
            await app(scope, receive, send)
        finally:
            gauge.dec()

    return middleware
