"""WebSocket authentication shared by every WS route.

Browsers cannot set headers on a WebSocket handshake, so the access token comes in the
`?token=` query parameter or the `access_token` cookie. On failure the socket is accepted
and then closed with code 4401 and a reason: a close before accept would reach the client
as a bare HTTP 403 with no code or reason to act on.

Usage in a handler, before anything else:
    user = await authenticate_websocket(socket)   # then socket.user is the same AuthUser
"""

from __future__ import annotations

from typing import Any

from litestar import WebSocket
from litestar.exceptions import HTTPException, WebSocketException

from api.auth import AuthUser, authenticate_bearer

WS_UNAUTHORIZED = 4401
TOKEN_QUERY_PARAM = "token"
TOKEN_COOKIE = "access_token"


async def authenticate_websocket(socket: WebSocket[Any, Any, Any]) -> AuthUser:
    """The socket's user; otherwise close 4401 with a reason and raise WebSocketException."""
    token = socket.query_params.get(TOKEN_QUERY_PARAM) or socket.cookies.get(TOKEN_COOKIE)
    try:
        if not token:
            raise HTTPException(status_code=401, detail="An access token is required (?token= or cookie).")
        user = await authenticate_bearer(socket, token)
    except HTTPException as exc:
        if socket.connection_state == "init":
            await socket.accept()
        # Litestar's exception middleware turns this into websocket.close(4401, reason).
        raise WebSocketException(detail=f"unauthorized: {exc.detail}"[:120], code=WS_UNAUTHORIZED) from None
    socket.scope["user"] = user
    return user
