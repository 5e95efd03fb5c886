"""ASGI middleware: a request id on every request, its response and its log lines."""

from __future__ import annotations

import re
import uuid
from typing import Any

from litestar.types import ASGIApp, Message, Receive, Scope, Send

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
