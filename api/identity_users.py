"""/api/v1/users/*: own profile, profiles and preferences by id (owner or staff), sessions."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any

import msgspec
from litestar import Request, Response, Router, delete, get, put
from litestar.params import Parameter

from api.auth import ensure_owner_or_staff
from api.identity_common import DEPENDENCIES, PAGE_DEFAULT, PAGE_MAX, caller, decode_cursor, encode_cursor
from api.identity_docs import ERRORS
from api.problems import Problem
from services import identity, identity_auth
from services.identity import PreferenceValue, Preferences, Profile
from services.identity_common import IdentityContext

Limit = Annotated[int, Parameter(ge=1, le=PAGE_MAX, description="page size")]
Cursor = Annotated[str | None, Parameter(max_length=200, description="next_cursor of the previous page")]


class SessionView(msgspec.Struct, frozen=True):
    id: uuid.UUID
    created_at: datetime
    last_used_at: datetime
    expires_at: datetime
    user_agent: str | None
    ip: str | None
    current: bool


class SessionPage(msgspec.Struct, frozen=True):
    items: list[SessionView]
    next_cursor: str | None


class PreferencesUpdate(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    preferences: dict[Annotated[str, msgspec.Meta(max_length=64)], PreferenceValue]


def _user_caller(request: Request[Any, Any, Any]) -> Any:
    user = caller(request)
    if user.kind != "user":
        raise Problem(403, "forbidden", "API keys have no user profile.")
    return user


@get("/me", responses=ERRORS, summary="The caller's own profile (PAN/ID masked)")
async def me(request: Request[Any, Any, Any], ctx: IdentityContext) -> Profile:
    return await identity.get_profile(ctx, _user_caller(request).id)


@get("/{user_id:uuid}/profile", responses=ERRORS, summary="A user's profile: owner or staff, else 404")
async def profile(request: Request[Any, Any, Any], user_id: uuid.UUID, ctx: IdentityContext) -> Profile:
    ensure_owner_or_staff(caller(request), user_id, what="User")
    return await identity.get_profile(ctx, user_id)


@get("/{user_id:uuid}/preferences", responses=ERRORS, summary="A user's preferences: owner or staff")
async def get_preferences(request: Request[Any, Any, Any], user_id: uuid.UUID, ctx: IdentityContext) -> Preferences:
    ensure_owner_or_staff(caller(request), user_id, what="User")
    return await identity.get_preferences(ctx, user_id)


@put("/{user_id:uuid}/preferences", responses=ERRORS, summary="Replace a user's preferences: owner or admin")
async def put_preferences(request: Request[Any, Any, Any], user_id: uuid.UUID, data: PreferencesUpdate,
                          ctx: IdentityContext) -> Preferences:
    user = caller(request)
    ensure_owner_or_staff(user, user_id, what="User")
    if user.id != user_id and "admin" not in user.roles:
        # Support and auditors may read other people's settings, not change them.
        raise Problem(403, "forbidden", "Only the owner or an admin may change preferences.")
    return await identity.put_preferences(ctx, user_id, dict(data.preferences))


@get("/me/sessions", responses=ERRORS, summary="The caller's live sessions, newest first")
async def list_sessions(request: Request[Any, Any, Any], ctx: IdentityContext, limit: Limit = PAGE_DEFAULT,
                        cursor: Cursor = None) -> SessionPage:
    user = _user_caller(request)
    rows = await identity_auth.list_sessions(ctx, user.id, after=decode_cursor(cursor), limit=limit + 1)
    page = rows[:limit]
    items = [SessionView(r.id, r.created_at, r.last_used_at, r.expires_at, r.user_agent, r.ip,
                         str(r.id) == user.session_id) for r in page]
    more = len(rows) > limit
    return SessionPage(items, encode_cursor(page[-1].created_at, page[-1].id) if more else None)


@delete("/me/sessions/{session_id:uuid}", status_code=204, responses=ERRORS, summary="Revoke one of your sessions")
async def revoke_session(request: Request[Any, Any, Any], session_id: uuid.UUID, ctx: IdentityContext) -> Response[None]:
    user = _user_caller(request)
    if not await identity_auth.revoke_session(ctx, user.id, session_id, reason="revoked-by-user"):
        raise Problem(404, "not-found", "Session not found.")
    return Response(None, status_code=204)


router = Router(path="/api/v1/users", route_handlers=[me, profile, get_preferences, put_preferences,
                                                      list_sessions, revoke_session],
                dependencies=DEPENDENCIES, tags=["identity: users"])
