"""Staff and service routes: roles, platform users, KYC decisions, API keys, the email
registry for other services, and the dev outbox."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any

import msgspec
from litestar import Request, Response, Router, delete, get, post, put
from litestar.params import Parameter

from api.auth import requires_roles, requires_scope
from api.identity_common import DEPENDENCIES, PAGE_DEFAULT, PAGE_MAX, caller, decode_cursor, encode_cursor
from api.identity_docs import ERRORS
from api.problems import Problem
from api.resources import Resources
from services import identity, identity_keys, identity_kyc
from services.identity import EmailRecord, Profile, RolesChanged
from services.identity_common import IdentityContext
from services.identity_kyc import KycStatus
from services.notify import DevOutbox, OutboxEntry

EMAIL_READ_SCOPE = "identity:email:read"
EMAIL_WRITE_SCOPE = "identity:email:write"

Role = Annotated[str, msgspec.Meta(max_length=32)]


class RolesUpdate(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    roles: Annotated[list[Role], msgspec.Meta(max_length=16)]


class PlatformUserCreate(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    email: Annotated[str, msgspec.Meta(min_length=3, max_length=320)]
    password: Annotated[str, msgspec.Meta(min_length=1, max_length=1024)]
    roles: Annotated[list[Role], msgspec.Meta(max_length=16)] = []
    first_name: Annotated[str, msgspec.Meta(max_length=100)] | None = None
    last_name: Annotated[str, msgspec.Meta(max_length=100)] | None = None


class KycDecision(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    decision: identity_kyc.Decision
    reason: Annotated[str, msgspec.Meta(max_length=500)] | None = None


class ApiKeyCreate(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=100)]
    scopes: Annotated[list[Annotated[str, msgspec.Meta(max_length=64)]], msgspec.Meta(min_length=1, max_length=32)]


class ApiKeyView(msgspec.Struct, frozen=True):
    id: uuid.UUID
    name: str
    prefix: str
    scopes: list[str]
    created_at: datetime
    revoked_at: datetime | None
    last_used_at: datetime | None


class ApiKeyCreated(msgspec.Struct, frozen=True):
    key: str  # shown once; only its hash is kept
    api_key: ApiKeyView


class ApiKeyPage(msgspec.Struct, frozen=True):
    items: list[ApiKeyView]
    next_cursor: str | None


class EmailUpsert(msgspec.Struct, frozen=True):
    email: Annotated[str, msgspec.Meta(min_length=3, max_length=320)]


class OutboxPage(msgspec.Struct, frozen=True):
    items: list[OutboxEntry]


def _key_view(row: Any) -> ApiKeyView:
    return ApiKeyView(row.id, row.name, row.prefix, row.scopes, row.created_at, row.revoked_at, row.last_used_at)


# --- admin -----------------------------------------------------------------------------

@put("/users/{user_id:uuid}/roles", guards=[requires_roles("admin")], responses=ERRORS,
     summary="Set a user's roles (grants and revokes); effective on the user's next request")
async def set_roles(request: Request[Any, Any, Any], user_id: uuid.UUID, data: RolesUpdate,
                    ctx: IdentityContext) -> RolesChanged:
    return await identity.set_roles(ctx, actor_id=caller(request).id, user_id=user_id, roles=data.roles)


@post("/platform-users", guards=[requires_roles("admin")], status_code=201, responses=ERRORS,
      summary="Create a platform (staff) user, e.g. support or auditor")
async def create_platform_user(request: Request[Any, Any, Any], data: PlatformUserCreate,
                               ctx: IdentityContext) -> Profile:
    return await identity.register(ctx, email=data.email, password=data.password, first_name=data.first_name,
                                   last_name=data.last_name, kind="platform", roles=data.roles,
                                   granted_by=caller(request).id)


@put("/kyc/{user_id:uuid}", guards=[requires_roles("support")], responses=ERRORS,
     summary="Approve or reject a pending KYC submission (support/admin)")
async def decide_kyc(request: Request[Any, Any, Any], user_id: uuid.UUID, data: KycDecision,
                     ctx: IdentityContext) -> KycStatus:
    return await identity_kyc.decide(ctx, actor_id=caller(request).id, user_id=user_id, decision=data.decision,
                                     reason=data.reason)


@post("/api-keys", guards=[requires_roles("admin")], status_code=201, responses=ERRORS,
      summary="Create a service API key; the key is shown only in this response")
async def create_api_key(request: Request[Any, Any, Any], data: ApiKeyCreate, ctx: IdentityContext) -> ApiKeyCreated:
    created = await identity_keys.create_key(ctx, name=data.name, scopes=data.scopes, created_by=caller(request).id)
    return ApiKeyCreated(created.key, _key_view(created.row))


@get("/api-keys", guards=[requires_roles("admin")], responses=ERRORS, summary="API keys, newest first")
async def list_api_keys(ctx: IdentityContext, limit: Annotated[int, Parameter(ge=1, le=PAGE_MAX)] = PAGE_DEFAULT,
                        cursor: Annotated[str | None, Parameter(max_length=200)] = None) -> ApiKeyPage:
    rows = await identity_keys.list_keys(ctx, after=decode_cursor(cursor), limit=limit + 1)
    page = rows[:limit]
    more = len(rows) > limit
    return ApiKeyPage([_key_view(r) for r in page], encode_cursor(page[-1].created_at, page[-1].id) if more else None)


@delete("/api-keys/{key_id:uuid}", guards=[requires_roles("admin")], status_code=204, responses=ERRORS,
        summary="Revoke an API key; effective on its next request")
async def revoke_api_key(key_id: uuid.UUID, ctx: IdentityContext) -> Response[None]:
    if not await identity_keys.revoke_key(ctx, key_id):
        raise Problem(404, "not-found", "API key not found or already revoked.")
    return Response(None, status_code=204)


# --- email registry for other services (003) -------------------------------------------------

@post("/email/upsert", guards=[requires_scope(EMAIL_WRITE_SCOPE)], responses=ERRORS,
      summary="Register an email (or find it); returns its email_address_id. 201 when created")
async def upsert_email(data: EmailUpsert, ctx: IdentityContext) -> Response[EmailRecord]:
    record, created = await identity.upsert_email(ctx, data.email)
    return Response(record, status_code=201 if created else 200)


@get("/email/{email:str}", guards=[requires_scope(EMAIL_READ_SCOPE)], responses=ERRORS,
     summary="Look up an email's email_address_id")
async def lookup_email(email: Annotated[str, Parameter(max_length=320)], ctx: IdentityContext) -> EmailRecord:
    return await identity.lookup_email(ctx, email)


# --- dev outbox ---------------------------------------------------------------------------

@get("/outbox", exclude_from_auth=True, responses=ERRORS,
     summary="Messages the dev outbox received (dev and test only; 404 otherwise)")
async def dev_outbox(request: Request[Any, Any, Any], resources: Resources,
                     to: Annotated[str | None, Parameter(max_length=320)] = None,
                     limit: Annotated[int, Parameter(ge=1, le=PAGE_MAX)] = 50) -> OutboxPage:
    if request.app.state.settings.env not in ("dev", "test"):
        raise Problem(404, "not-found", "Not found.")
    return OutboxPage(await DevOutbox(resources.redis).read(limit=limit, to=to))


admin_router = Router(path="/api/v1/admin", route_handlers=[set_roles, create_platform_user, decide_kyc,
                                                            create_api_key, list_api_keys, revoke_api_key],
                      dependencies=DEPENDENCIES, tags=["identity: admin"])
registry_router = Router(path="/api/v1/identity", route_handlers=[upsert_email, lookup_email],
                         dependencies=DEPENDENCIES, tags=["identity: email registry"],
                         security=[{"ApiKey": []}])
dev_router = Router(path="/api/v1/dev", route_handlers=[dev_outbox], tags=["dev"])
