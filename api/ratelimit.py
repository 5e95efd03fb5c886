"""Rate limits on every route: Litestar's RateLimitMiddleware over a Redis store.

Two tiers, each its own middleware (so their Redis keys differ):
- general: every API route, per authenticated user (verified JWT `sub`), per API key
  prefix, else per client IP;
- auth: stricter, on /api/v1/auth/* only, always per client IP (these routes are what
  credential stuffing and OTP guessing hit, and mostly run before a user is known).
Over the limit → 429 problem+json with Retry-After. /health, /ready and /metrics are not
limited: probes and scrapers must never be turned away.

WebSocket handshakes, which Litestar's middleware does not see (it limits HTTP scopes
only), are limited by `limit_websocket` from the shared WS auth helper (api/ws_auth.py):
per user once authenticated, and failed authentications per client IP at the auth tier's
rate; the socket closes with 4429 and the seconds to wait.

The client IP honours X-Forwarded-For only when the peer is a trusted proxy
(settings.trusted_proxies: comma-separated IPs, CIDRs or exact host names).
"""

from __future__ import annotations

import ipaddress
import time
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import jwt
from litestar import Request
from litestar.connection import ASGIConnection
from litestar.exceptions import TooManyRequestsException
from litestar.middleware.rate_limit import RateLimitConfig, RateLimitMiddleware
from litestar.types import Receive, Scope, Send
from redis.asyncio import Redis

from api.problems import Problem
from ops.settings import Settings

RATE_LIMIT_STORE = "rate_limit"
WS_KEY_PREFIX = "fintide:ratelimit:ws:"
WINDOW_S = 60
AUTH_PATH_PREFIX = "/api/v1/auth/"
UNLIMITED_PATHS = ["^/health$", "^/ready$", "^/metrics"]


@dataclass(frozen=True)
class RateLimits:
    general_per_minute: int
    auth_per_minute: int
    ws_connects_per_minute: int

    @classmethod
    def from_settings(cls, settings: Settings) -> RateLimits:
        return cls(settings.rate_limit_per_minute, settings.rate_limit_auth_per_minute,
                   settings.rate_limit_ws_per_minute)

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@lru_cache(maxsize=16)
def _trusted(spec: str) -> tuple[tuple[_Network, ...], frozenset[str]]:
    networks: list[_Network] = []
    names: set[str] = set()
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            names.add(item)  # e.g. a host name such as a compose service or "testclient"
    return tuple(networks), frozenset(names)


def _is_trusted(host: str, spec: str) -> bool:
    networks, names = _trusted(spec)
    if host in names:
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return any(address in net for net in networks)


def client_ip(connection: ASGIConnection[Any, Any, Any, Any], settings: Settings) -> str:
    """The caller's address: the peer, or the nearest untrusted X-Forwarded-For hop.

    Walks X-Forwarded-For from the right (the hop our trusted proxy appended) and stops at
    the first address not in trusted_proxies; entries left of it are client-controlled.
    """
    peer = connection.client.host if connection.client else "unknown"
    if not settings.trusted_proxies or not _is_trusted(peer, settings.trusted_proxies):
        return peer
    hops = [h.strip() for h in connection.headers.get("x-forwarded-for", "").split(",") if h.strip()]
    for hop in reversed(hops[-16:]):  # bounded: a long header cannot cost more than 16 checks
        if not _is_trusted(hop, settings.trusted_proxies):
            try:
                return str(ipaddress.ip_address(hop))
            except ValueError:
                return peer  # garbage from the client side of the chain: fall back to the proxy
    return peer


def _bearer_subject(request: Request[Any, Any, Any], settings: Settings) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        return None
    try:
        claims = jwt.decode(token.strip(), settings.jwt_secret, algorithms=["HS256"],
                            options={"verify_aud": False})
    except jwt.InvalidTokenError:
        return None  # unverifiable tokens are limited by IP, so forged subs cannot dodge it
    sub = claims.get("sub")
    return sub if isinstance(sub, str) and len(sub) <= 64 else None


def _general_identifier(request: Request[Any, Any, Any]) -> str:
    settings: Settings = request.app.state.settings
    if sub := _bearer_subject(request, settings):
        return f"user:{sub}"
    key = request.headers.get("x-api-key", "")
    if key.startswith("ftk_") and len(key) == 60:
        return f"key:{key[4:16]}"
    return f"ip:{client_ip(request, settings)}"


def _auth_identifier(request: Request[Any, Any, Any]) -> str:
    return f"ip:{client_ip(request, request.app.state.settings)}"


def _is_auth_route(request: Request[Any, Any, Any]) -> bool:
    return request.url.path.startswith(AUTH_PATH_PREFIX)


class _ProblemRateLimit(RateLimitMiddleware):
    """Litestar's limiter, answering 429 as problem+json with Retry-After."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except TooManyRequestsException as exc:
            # Only the limiter raises this class (services raise Problem), so this is ours.
            headers = dict(exc.headers or {})
            headers["Retry-After"] = str(max(int(headers.get("RateLimit-Reset", "1")), 1))
            raise Problem(429, "rate-limited", "Too many requests; slow down.", headers=headers) from None


class GeneralRateLimit(_ProblemRateLimit):
    pass


class AuthRateLimit(_ProblemRateLimit):
    pass


def rate_limit_configs(limits: RateLimits) -> list[RateLimitConfig]:
    assert min(limits.general_per_minute, limits.auth_per_minute, limits.ws_connects_per_minute) > 0
    general = RateLimitConfig(rate_limit=("minute", limits.general_per_minute), exclude=UNLIMITED_PATHS,
                              identifier_for_request=_general_identifier, middleware_class=GeneralRateLimit,
                              store=RATE_LIMIT_STORE)
    auth = RateLimitConfig(rate_limit=("minute", limits.auth_per_minute), exclude=UNLIMITED_PATHS,
                           identifier_for_request=_auth_identifier, check_throttle_handler=_is_auth_route,
                           middleware_class=AuthRateLimit, store=RATE_LIMIT_STORE)
    return [general, auth]


async def limit_websocket(redis: Redis, identity: str, per_minute: int) -> int:
    """Count one handshake for `identity` in the current minute; 0 if it may go on, else
    the seconds until the window resets (a fixed window, like the HTTP limiter's)."""
    now = time.time()
    key = f"{WS_KEY_PREFIX}{identity}:{int(now // WINDOW_S)}"
    async with redis.pipeline(transaction=True) as pipe:
        count, _ = await pipe.incr(key).expire(key, 2 * WINDOW_S).execute()
    return 0 if count <= per_minute else max(int(WINDOW_S - now % WINDOW_S), 1)
