"""Rate limits on every route: Litestar's RateLimitMiddleware with an atomic Redis counter.

Two tiers, each its own middleware (so their Redis keys differ):
- general: every API route, per authenticated user (verified JWT `sub`), per API key
  prefix, else per client IP;
- auth: stricter, on /api/v1/auth/* only, always per client IP (these routes are what
  credential stuffing and OTP guessing hit, and mostly run before a user is known).
Over the limit → 429 problem+json with Retry-After. /health, /ready and /metrics are not
limited: probes and scrapers must never be turned away.

Litestar's middleware decides which requests count and whose they are (config, exclusions,
identifiers, RateLimit-* headers); only its bookkeeping is replaced. It keeps a JSON list
of timestamps per client in a Store and reads, then writes it under a process-wide lock:
every request of every client waited for two Redis round trips of the request before it,
and replicas racing between the read and the write could both let a request through.
`hit` is one Lua call instead: atomic across replicas, no lock. The semantics are the
same as Litestar's: a window opens at a client's first request and lasts a minute.

WebSocket handshakes, which Litestar's middleware does not see (it limits HTTP scopes
only), are limited by `limit_websocket` from the shared WS auth helper (api/ws_auth.py):
per user once authenticated, and failed authentications per client IP at the auth tier's
rate; the socket closes with 4429 and the seconds to wait.

The client IP honours X-Forwarded-For only when the peer is a trusted proxy
(settings.trusted_proxies: comma-separated IPs, CIDRs or exact host names).
"""

from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import jwt
from litestar import Request
from litestar.connection import ASGIConnection
from litestar.datastructures import MutableScopeHeaders
from litestar.middleware.rate_limit import DURATION_VALUES, RateLimitConfig, RateLimitMiddleware
from litestar.types import Message, Receive, Scope, Send
from redis.asyncio import Redis

from api.problems import Problem
from ops.settings import Settings

KEY_PREFIX = "fintide:ratelimit:"
WS_WINDOW_S = 60
# Count a hit; the first hit of a window starts its expiry. Returns {hits, ms until reset}.
_HIT = """
local hits = redis.call('INCR', KEYS[1])
if hits == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
local ttl = redis.call('PTTL', KEYS[1])
if ttl < 0 then redis.call('PEXPIRE', KEYS[1], ARGV[1]); ttl = tonumber(ARGV[1]) end
return {hits, ttl}
"""
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


async def hit(redis: Redis, key: str, window_s: int) -> tuple[int, int]:
    """Count one hit on `key`: (hits in the current window, whole seconds until it resets)."""
    hits, ttl_ms = await redis.eval(_HIT, 1, KEY_PREFIX + key, window_s * 1000)  # type: ignore[misc]
    return int(hits), max(math.ceil(int(ttl_ms) / 1000), 1)


class _ProblemRateLimit(RateLimitMiddleware):
    """Litestar's limiter counting with `hit`, answering 429 as problem+json with Retry-After."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request: Request[Any, Any, Any] = scope["litestar_app"].request_class(scope)
        if not await self.should_check_request(request=request):
            await self.app(scope, receive, send)
            return
        window_s = DURATION_VALUES[self.unit]
        hits, reset_s = await hit(request.app.state.resources.redis, self.cache_key_from_request(request), window_s)
        headers = {
            self.config.rate_limit_policy_header_key: f"{self.max_requests}; w={window_s}",
            self.config.rate_limit_limit_header_key: str(self.max_requests),
            self.config.rate_limit_remaining_header_key: str(max(self.max_requests - hits, 0)),
            self.config.rate_limit_reset_header_key: str(reset_s),
        }
        if hits > self.max_requests:
            raise Problem(429, "rate-limited", "Too many requests; slow down.",
                          headers={**headers, "Retry-After": str(reset_s)})
        await self.app(scope, receive, _with_headers(send, headers))


def _with_headers(send: Send, headers: dict[str, str]) -> Send:
    async def send_with_headers(message: Message) -> None:
        if message["type"] == "http.response.start":
            message.setdefault("headers", [])
            scope_headers = MutableScopeHeaders(message)
            for name, value in headers.items():
                scope_headers[name] = value
        await send(message)

    return send_with_headers


class GeneralRateLimit(_ProblemRateLimit):
    pass


class AuthRateLimit(_ProblemRateLimit):
    pass


def rate_limit_configs(limits: RateLimits) -> list[RateLimitConfig]:
    assert min(limits.general_per_minute, limits.auth_per_minute, limits.ws_connects_per_minute) > 0
    general = RateLimitConfig(rate_limit=("minute", limits.general_per_minute), exclude=UNLIMITED_PATHS,
                              identifier_for_request=_general_identifier, middleware_class=GeneralRateLimit)
    auth = RateLimitConfig(rate_limit=("minute", limits.auth_per_minute), exclude=UNLIMITED_PATHS,
                           identifier_for_request=_auth_identifier, check_throttle_handler=_is_auth_route,
                           middleware_class=AuthRateLimit)
    return [general, auth]


async def limit_websocket(redis: Redis, identity: str, per_minute: int) -> int:
    """Count one handshake for `identity`; 0 if it may go on, else the seconds to wait."""
    hits, reset_s = await hit(redis, f"ws::{identity}", WS_WINDOW_S)
    return 0 if hits <= per_minute else reset_s
