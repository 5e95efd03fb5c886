"""Authentication and authorisation for every Fintide route (the contract in docs/IDENTITY.md).

- Litestar's JWTAuth, HS256 only (so `alg: none` and other algorithms are rejected), with
  `iss`/`aud` checked and `sub` (user id), `sid` (session id), `jti`, `roles` claims.
- Every request re-checks, in Redis, that the session is live and reads the user's current
  roles (services/identity_auth.principal), so logout, revocation, disabling and role
  changes all apply on the next request; the `roles` claim is informational only.
- `X-API-Key` authenticates service-to-service callers (kind "api_key", with scopes).
- Guards: `requires_roles(*roles)` (admin passes every role check), `requires_scope(scope)`;
  `is_staff(user)` and `ensure_owner_or_staff(user, owner_id)` for ownership checks.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from copy import copy
from dataclasses import asdict
from datetime import datetime, timedelta, timezone
from typing import Any

import msgspec
from litestar.config.app import AppConfig
from litestar.connection import ASGIConnection
from litestar.exceptions import NotAuthorizedException
from litestar.handlers.base import BaseRouteHandler
from litestar.middleware.authentication import AuthenticationResult
from litestar.openapi.spec import Components, SecurityScheme
from litestar.security.jwt import JWTAuth, JWTAuthenticationMiddleware, Token
from litestar.types import Guard

import jwt as pyjwt
from api.problems import Problem
from api.ratelimit import RateLimits, rate_limit_configs
from api.resources import Resources
from ops.settings import Settings
from services import identity_auth, identity_keys
from services.identity_common import ROLES, STAFF_ROLES, IdentityContext

ALGORITHM = "HS256"
ISSUER = "fintide"
AUDIENCE = "fintide-api"
API_KEY_HEADER = "X-API-Key"
# Paths that never need a token: ops probes, the OpenAPI docs, and the public auth routes
# (those also carry exclude_from_auth=True; listing them here keeps the contract in one place).
EXCLUDED_PATHS = [
    "^/health$", "^/ready$", "^/metrics", "^/schema",
    "^/api/v1/auth/(register|login|refresh)$", "^/api/v1/dev/outbox$",
]


class AuthUser(msgspec.Struct, frozen=True):
    """`request.user` on every authenticated route."""
    id: uuid.UUID  # the user id, or the API key id when kind == "api_key"
    roles: frozenset[str]
    session_id: str | None
    kind: str  # "user" | "api_key"
    scopes: frozenset[str] = frozenset()


class AccessToken(Token):
    """Litestar's Token with our custom claims at the top level of the JWT payload.

    Litestar's own encode nests custom claims under "extras"; we flatten them so `roles`
    and `sid` are ordinary claims any JWT library reads.
    """

    def encode(self, secret: str, algorithm: str) -> str:
        payload = {k: v for k, v in asdict(self).items() if v is not None and k != "extras"}
        payload.update(self.extras)
        return pyjwt.encode(payload, key=secret, algorithm=algorithm)


class IssuedToken(msgspec.Struct, frozen=True):
    token: str
    jti: str
    expires_in: int


def issue_access_token(settings: Settings, user_id: uuid.UUID, roles: list[str] | frozenset[str],
                       session_id: uuid.UUID) -> IssuedToken:
    jti = uuid.uuid4().hex
    token = AccessToken(sub=str(user_id), exp=datetime.now(timezone.utc) + timedelta(seconds=settings.access_token_ttl_s),
                        iss=ISSUER, aud=AUDIENCE, jti=jti,
                        extras={"roles": sorted(roles), "sid": str(session_id)})
    return IssuedToken(token.encode(settings.jwt_secret, ALGORITHM), jti, settings.access_token_ttl_s)


def decode_access_token(settings: Settings, encoded: str) -> AccessToken:
    """Verify signature, algorithm, issuer, audience, expiry and required claims (401 otherwise)."""
    return AccessToken.decode(encoded_token=encoded, secret=settings.jwt_secret, algorithm=ALGORITHM,
                              audience=[AUDIENCE], issuer=[ISSUER],
                              require_claims=["exp", "iat", "sub", "jti", "sid"])


async def identity_context(resources: Resources) -> IdentityContext:
    return IdentityContext(settings=resources.settings, pool=await resources.pool("identity"),
                           redis=resources.redis, publisher=resources.publisher)


def _context_of(connection: ASGIConnection[Any, Any, Any, Any]) -> Resources:
    return connection.app.state.resources


def _unauthorized(detail: str) -> Problem:
    return Problem(401, "unauthorized", detail, headers={"WWW-Authenticate": 'Bearer realm="fintide"'})


async def user_for_token(connection: ASGIConnection[Any, Any, Any, Any], token: Token) -> AuthUser | None:
    """The live principal behind a verified token; None when its session or user is gone."""
    try:
        user_id = uuid.UUID(token.sub)
        session_id = uuid.UUID(str(token.extras.get("sid")))
    except ValueError:
        return None
    ctx = await identity_context(_context_of(connection))
    authz = await identity_auth.principal(ctx, user_id, session_id)
    if authz is None:
        return None
    return AuthUser(id=user_id, roles=frozenset(authz.roles), session_id=str(session_id), kind="user")


async def authenticate_bearer(connection: ASGIConnection[Any, Any, Any, Any], encoded: str) -> AuthUser:
    """Shared by the HTTP middleware and the WebSocket helper."""
    settings: Settings = connection.app.state.settings
    try:
        token = decode_access_token(settings, encoded)
    except NotAuthorizedException:
        raise _unauthorized("The access token is invalid or expired.") from None
    user = await user_for_token(connection, token)
    if user is None:
        raise _unauthorized("The session has ended; log in again.")
    return user


async def authenticate_api_key(connection: ASGIConnection[Any, Any, Any, Any], presented: str) -> AuthUser:
    ctx = await identity_context(_context_of(connection))
    principal = await identity_keys.authenticate_key(ctx, presented.strip())
    if principal is None:
        raise Problem(401, "unauthorized", "The API key is invalid or revoked.")
    return AuthUser(id=principal.key_id, roles=frozenset(), session_id=None, kind="api_key",
                    scopes=frozenset(principal.scopes))


class FintideAuthMiddleware(JWTAuthenticationMiddleware):
    """JWT bearer auth (Litestar's middleware), plus `X-API-Key` for service callers."""

    async def authenticate_request(self, connection: ASGIConnection[Any, Any, Any, Any]) -> AuthenticationResult:
        if api_key := connection.headers.get(API_KEY_HEADER):
            return AuthenticationResult(user=await authenticate_api_key(connection, api_key), auth=None)
        scheme, _, encoded = connection.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not encoded.strip():
            raise _unauthorized("A bearer access token is required.")
        user = await authenticate_bearer(connection, encoded.strip())
        return AuthenticationResult(user=user, auth=None)


async def _unused_retrieve_user(token: Token, connection: ASGIConnection[Any, Any, Any, Any]) -> AuthUser | None:
    # JWTAuth requires a handler; FintideAuthMiddleware calls user_for_token itself.
    return await user_for_token(connection, token)


def build_jwt_auth(settings: Settings) -> JWTAuth[AuthUser, AccessToken]:
    return JWTAuth[AuthUser, AccessToken](
        retrieve_user_handler=_unused_retrieve_user,
        token_secret=settings.jwt_secret,
        algorithm=ALGORITHM,
        default_token_expiration=timedelta(seconds=settings.access_token_ttl_s),
        token_cls=AccessToken,
        accepted_issuers=[ISSUER],
        accepted_audiences=[AUDIENCE],
        require_claims=["exp", "iat", "sub", "jti", "sid"],
        exclude=EXCLUDED_PATHS,
        # WebSockets authenticate in the handler (api.ws_auth) so a failure can close with 4401.
        scopes={"http"},  # type: ignore[arg-type]
        authentication_middleware_class=FintideAuthMiddleware,
        description="Access token from POST /api/v1/auth/login.",
    )


def install(settings: Settings) -> Callable[[AppConfig], AppConfig]:
    """An on_app_init hook: rate limits (outer) then auth, after the app's own middleware.

    Rate limits run before auth so floods of bad tokens are limited too (per IP).
    """
    jwt_auth = build_jwt_auth(settings)
    limits = RateLimits.from_settings(settings)

    def on_app_init(config: AppConfig) -> AppConfig:
        # The limiters count in the app's Redis (app.state.resources; api/ratelimit.py).
        config.middleware.extend([c.middleware for c in rate_limit_configs(limits)])
        config.state["rate_limits"] = limits  # WebSocket handshakes (api/ws_auth.py)
        config.middleware.append(jwt_auth.middleware)
        if config.openapi_config:
            config.openapi_config = copy(config.openapi_config)
            config.openapi_config.components = [jwt_auth.openapi_components, _api_key_component()]
            config.openapi_config.security = [jwt_auth.security_requirement]
        return config

    return on_app_init


def _api_key_component() -> Components:
    return Components(security_schemes={"ApiKey": SecurityScheme(
        type="apiKey", name=API_KEY_HEADER, security_scheme_in="header",
        description="Service API key created by an admin (POST /api/v1/admin/api-keys).")})


# --- guards and ownership ------------------------------------------------------------------

def _user_of(connection: ASGIConnection[Any, Any, Any, Any]) -> AuthUser:
    user = connection.scope.get("user")
    if not isinstance(user, AuthUser):
        raise _unauthorized("Authentication required.")
    return user


def requires_roles(*roles: str) -> Guard:
    """A guard passing users holding any of `roles`; admin passes every role check."""
    unknown = set(roles) - ROLES
    assert roles and not unknown, f"unknown roles {unknown}"
    wanted = frozenset(roles)

    def guard(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
        user = _user_of(connection)
        if user.kind == "user" and ("admin" in user.roles or user.roles & wanted):
            return
        raise Problem(403, "forbidden", "Your roles do not allow this.")

    return guard


def requires_scope(scope: str, *, allow_admin: bool = True) -> Guard:
    """A guard passing API keys holding `scope` (and admin users unless allow_admin=False)."""

    def guard(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
        user = _user_of(connection)
        if user.kind == "api_key" and scope in user.scopes:
            return
        if allow_admin and user.kind == "user" and "admin" in user.roles:
            return
        raise Problem(403, "forbidden", f"Requires scope {scope!r}.")

    return guard


def is_staff(user: AuthUser) -> bool:
    """Support, auditor or admin: may read other users' resources."""
    return user.kind == "user" and bool(user.roles & STAFF_ROLES)


def ensure_owner_or_staff(user: AuthUser, owner_id: uuid.UUID, *, what: str = "Resource") -> None:
    """404 (not 403) for non-owners, so ids of other people's things do not leak."""
    if user.kind == "user" and (user.id == owner_id or is_staff(user)):
        return
    raise Problem(404, "not-found", f"{what} not found.")
