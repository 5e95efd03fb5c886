"""Events on `identity.events`: who was created, verified, logged in, changed role or KYC.

Every value is a msgspec Struct tagged by `type` (e.g. "identity.user_created") with the
streams header (`version`, `id` = event UUID for dedupe, `ts_ms`), keyed by user id so
one user's events stay in order. Events carry ids and states only,
never emails, names, passwords or document numbers (consumers ask identity for those).
"""

from __future__ import annotations

import uuid

import msgspec

TOPIC = "identity.events"


class IdentityEvent(msgspec.Struct, frozen=True, kw_only=True, tag_field="type"):
    id: str  # event id (UUID text): the dedupe key under at-least-once delivery
    ts_ms: int
    user_id: uuid.UUID
    version: int = 1


class UserCreated(IdentityEvent, tag="identity.user_created"):
    kind: str  # "customer" | "platform"
    email_address_id: uuid.UUID


class UserVerified(IdentityEvent, tag="identity.user_verified"):
    # Which channels are verified after this change; `both` is the 003 "dual verification".
    email: bool
    phone: bool
    both: bool


class KycUpdated(IdentityEvent, tag="identity.kyc_updated"):
    status: str  # pending | approved | rejected
    decided_by: uuid.UUID | None = None
    reason: str | None = None


class RoleChanged(IdentityEvent, tag="identity.role_changed"):
    roles: list[str]
    granted: list[str]
    revoked: list[str]
    changed_by: uuid.UUID


class LoginSucceeded(IdentityEvent, tag="identity.login_succeeded"):
    session_id: uuid.UUID
    ip: str


class LoginFailed(IdentityEvent, tag="identity.login_failed"):
    # user_id is the nil UUID when the email matched no account.
    ip: str
    reason: str  # "credentials" | "throttled" | "disabled"


class RefreshReused(IdentityEvent, tag="identity.refresh_reused"):
    session_id: uuid.UUID


Event = UserCreated | UserVerified | KycUpdated | RoleChanged | LoginSucceeded | LoginFailed | RefreshReused

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Event)


def encode(event: Event) -> bytes:
    return _encoder.encode(event)


def decode(data: bytes) -> Event:
    return _decoder.decode(data)


def event_type(event: Event) -> str:
    return type(event).__struct_config__.tag  # type: ignore[return-value]
