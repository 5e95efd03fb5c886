"""Small pieces the identity handlers share: the context dependency, cursors, client info."""

from __future__ import annotations

import base64
import binascii
import uuid
from datetime import datetime
from typing import Any

from litestar import Request
from litestar.datastructures import State
from litestar.di import Provide

from api.auth import AuthUser, identity_context
from api.problems import Problem
from api.ratelimit import client_ip
from api.resources import Resources
from services.notify import Notifier, notifier_for

PAGE_DEFAULT = 20
PAGE_MAX = 100



async def provide_notifier(state: State, resources: Resources) -> Notifier:
    """One notifier per app, built from the environment on first use."""
    notifier = getattr(state, "notifier", None)
    if notifier is None:
        notifier = notifier_for(resources.settings, resources.redis)
        state.notifier = notifier
    return notifier


# Handlers declare `ctx: IdentityContext` (and `notifier: Notifier`); identity routers provide them.
DEPENDENCIES = {"ctx": Provide(identity_context), "notifier": Provide(provide_notifier)}


def encode_cursor(created_at: datetime, item_id: uuid.UUID) -> str:
    raw = f"{created_at.isoformat()}|{item_id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str | None) -> tuple[datetime, uuid.UUID] | None:
    """An opaque keyset cursor back to (created_at, id); 400 when it was tampered with."""
    if not cursor:
        return None
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        created_at, item_id = raw.split("|", 1)
        parsed = datetime.fromisoformat(created_at)
        if parsed.tzinfo is None:
            raise ValueError("naive timestamp")
        return parsed, uuid.UUID(item_id)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise Problem(400, "invalid-cursor", "The cursor is not valid.") from None


def caller(request: Request[Any, Any, Any]) -> AuthUser:
    user = request.scope.get("user")
    assert isinstance(user, AuthUser), "route must run behind FintideAuthMiddleware"
    return user


def request_ip(request: Request[Any, Any, Any]) -> str:
    return client_ip(request, request.app.state.settings)


def user_agent(request: Request[Any, Any, Any]) -> str | None:
    return request.headers.get("user-agent")
