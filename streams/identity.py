"""Events on `identity.events`: who was created, verified, logged in, changed role or KYC.

Every value is a streams Event (tagged by `type`, e.g. "identity.user_created", with the
`version`/`id`/`ts_ms` header), keyed by `user_id` so one user's events stay in order.
Events carry ids and states only, never emails, names, passwords or document numbers
(consumers ask identity for those).
"""

from __future__ import annotations

import uuid

from streams.events import Event
from streams.topics import TopicSpec, register


class UserCreated(Event, tag="identity.user_created", kw_only=True, frozen=True):
    user_id: uuid.UUID
    kind: str  # "customer" | "platform"
    email_address_id: uuid.UUID


class UserVerified(Event, tag="identity.user_verified", kw_only=True, frozen=True):
    user_id: uuid.UUID
    # Which channels are verified after this change; `both` is 003's "dual verification".
    email: bool
    phone: bool
    both: bool


class KycUpdated(Event, tag="identity.kyc_updated", kw_only=True, frozen=True):
    user_id: uuid.UUID
    status: str  # pending | approved | rejected
    decided_by: uuid.UUID | None = None
    reason: str | None = None


class RoleChanged(Event, tag="identity.role_changed", kw_only=True, frozen=True):
    user_id: uuid.UUID
    roles: list[str]
    granted: list[str]
    revoked: list[str]
    changed_by: uuid.UUID


class LoginSucceeded(Event, tag="identity.login_succeeded", kw_only=True, frozen=True):
    user_id: uuid.UUID
    session_id: uuid.UUID
    ip: str


class LoginFailed(Event, tag="identity.login_failed", kw_only=True, frozen=True):
    # user_id is the nil UUID when the email matched no account.
    user_id: uuid.UUID
    ip: str
    reason: str  # "credentials" | "disabled"


class RefreshReused(Event, tag="identity.refresh_reused", kw_only=True, frozen=True):
    user_id: uuid.UUID
    session_id: uuid.UUID


IdentityEvent = UserCreated | UserVerified | KycUpdated | RoleChanged | LoginSucceeded | LoginFailed | RefreshReused

EVENTS: TopicSpec[IdentityEvent] = register(TopicSpec(
    "identity.events", IdentityEvent, key_field="user_id",
    doc="identity changes and audit-worthy actions (users, verification, KYC, roles, logins), keyed by user id"))
TOPIC = EVENTS.name
