"""WebSocket authentication shared by every WS route.

Browsers cannot set headers on a WebSocket handshake, so the access token comes in the
`?token=` query parameter or the `access_token` cookie. On failure the socket is accepted
and then closed with code 4401 and a reason: a close before accept would reach the client
as a bare HTTP 403 with no code or reason to act on.

Handshakes are rate-limited here too (Litestar's limiter sees HTTP only): per user, and
failed authentications per client IP; over the limit the socket closes with 4429 and a
reason saying how many seconds to wait.

Usage in a handler, before anything else:
    user = await authenticate_websocket(socket)   # then socket.user is the same AuthUser
"""

from __future__ import annotations

from typing import Any, NoReturn

from litestar import WebSocket
from litestar.exceptions import HTTPException, WebSocketException

from api.auth import AuthUser, authenticate_bearer
from api.ratelimit import RateLimits, client_ip, limit_websocket

WS_UNAUTHORIZED = 4401
WS_RATE_LIMITED = 4429
TOKEN_QUERY_PARAM = "token"
TOKEN_COOKIE = "access_token"


async def authenticate_websocket(socket: WebSocket[Any, Any, Any]) -> AuthUser:
    """The socket's user; otherwise close 4401 (no valid token) or 4429 (too many handshakes)
    with a reason, and raise WebSocketException."""
    token = socket.query_params.get(TOKEN_QUERY_PARAM) or socket.cookies.get(TOKEN_COOKIE)
    try:
        if not token:
            raise HTTPException(status_code=401, detail="An access token is required (?token= or cookie).")
        user = await authenticate_bearer(socket, token)
    except HTTPException as exc:
        limits = _limits(socket)
        await _refuse_if_limited(socket, f"ip:{client_ip(socket, socket.app.state.settings)}", limits.auth_per_minute)
        await _close(socket, WS_UNAUTHORIZED, f"unauthorized: {exc.detail}")
    await _refuse_if_limited(socket, f"user:{user.id}", _limits(socket).ws_connects_per_minute)
    socket.scope["user"] = user
    return user


def _limits(socket: WebSocket[Any, Any, Any]) -> RateLimits:
    return socket.app.state.rate_limits


async def _refuse_if_limited(socket: WebSocket[Any, Any, Any], identity: str, per_minute: int) -> None:
    retry_after = await limit_websocket(socket.app.state.resources.redis, identity, per_minute)
    if retry_after:
        await _close(socket, WS_RATE_LIMITED, f"rate-limited: retry after {retry_after} s")


async def _close(socket: WebSocket[Any, Any, Any], code: int, reason: str) -> NoReturn:
    if socket.connection_state == "init":
        await socket.accept()
    # Litestar's exception middleware turns this into websocket.close(code, reason).
    raise WebSocketException(detail=reason[:120], code=code) from None
