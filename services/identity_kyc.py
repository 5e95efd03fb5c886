"""KYC: customers submit identity documents; support/admin approve or reject.

none → pending (submit) → approved | rejected (decide); a rejected user may submit again.
Document numbers are encrypted at rest (identity_pii) and leave the service only masked.
Each change emits `kyc.updated` on identity.events.
"""

from __future__ import annotations

import re
import uuid
from datetime import date, datetime
from typing import Annotated, Literal

import msgspec

from api.problems import Problem
from db import identity as db
from services import identity_events as ev
from services import identity_pii
from services.identity_common import IdentityContext, mask_document_number, utcnow
from streams import identity as events

DocumentType = Literal["pan", "aadhaar", "passport", "driving_licence", "national_id"]
Decision = Literal["approved", "rejected"]
MIN_AGE_YEARS = 18
MAX_AGE_YEARS = 120
_DOCUMENT_RE: dict[str, re.Pattern[str]] = {
    "pan": re.compile(r"^[A-Z]{5}[0-9]{4}[A-Z]$"),
    "aadhaar": re.compile(r"^[0-9]{12}$"),
    "passport": re.compile(r"^[A-Z0-9]{6,12}$"),
    "driving_licence": re.compile(r"^[A-Z0-9]{8,20}$"),
    "national_id": re.compile(r"^[A-Z0-9]{5,20}$"),
}

Line = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]


class KycAddress(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    line1: Line
    city: Annotated[str, msgspec.Meta(min_length=1, max_length=100)]
    postal_code: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9 \-]{3,12}$")]
    country: Annotated[str, msgspec.Meta(pattern=r"^[A-Z]{2}$", description="ISO 3166-1 alpha-2")]
    line2: Annotated[str, msgspec.Meta(max_length=200)] | None = None
    state: Annotated[str, msgspec.Meta(max_length=100)] | None = None


class KycStatus(msgspec.Struct, frozen=True):
    user_id: uuid.UUID
    status: str
    document_type: str
    document_number_masked: str
    submitted_at: datetime
    decided_at: datetime | None = None
    reason: str | None = None


def _field_error(field: str, message: str) -> Problem:
    return Problem(422, "validation-error", f"Invalid {field}.",
                   errors=[{"field": field, "message": message, "source": "body"}])


def normalise_document(document_type: str, number: str) -> str:
    cleaned = re.sub(r"[\s\-]", "", number).upper()
    if not _DOCUMENT_RE[document_type].match(cleaned):
        raise _field_error("document_number", f"not a valid {document_type} number")
    return cleaned


def parse_birth_date(raw: str, today: date | None = None) -> date:
    today = today or utcnow().date()
    try:
        born = date.fromisoformat(raw)
    except ValueError:
        raise _field_error("date_of_birth", "must be a real date, YYYY-MM-DD") from None
    age = today.year - born.year - ((today.month, today.day) < (born.month, born.day))
    if not MIN_AGE_YEARS <= age <= MAX_AGE_YEARS:
        raise _field_error("date_of_birth", f"age must be {MIN_AGE_YEARS}-{MAX_AGE_YEARS} years")
    return born


def _status(row: db.KycRow) -> KycStatus:
    return KycStatus(row.user_id, row.status, row.document_type, mask_document_number(row.document_number_last4),
                     row.submitted_at, row.decided_at, row.reason)


async def submit(ctx: IdentityContext, user_id: uuid.UUID, *, document_type: DocumentType, document_number: str,
                 address: KycAddress, date_of_birth: str) -> KycStatus:
    number = normalise_document(document_type, document_number)
    born = parse_birth_date(date_of_birth)
    kyc_id = uuid.uuid4()
    async with ctx.pool.acquire() as conn, conn.transaction():
        if await db.lock_user(conn, user_id) is None:
            raise Problem(404, "not-found", "User not found.")
        latest = await db.latest_kyc(conn, user_id)
        if latest is not None and latest.status in ("pending", "approved"):
            raise Problem(409, "kyc-in-progress", f"KYC is already {latest.status}.")
        await db.insert_kyc(conn, kyc_id=kyc_id, user_id=user_id, document_type=document_type,
                            document_number_enc=identity_pii.encrypt(ctx.settings, number, user_id),
                            last4=number[-4:], address=msgspec.to_builtins(address), date_of_birth=born)
        await ev.record(conn, events.KycUpdated(**ev.new_meta(user_id), status="pending"))
        row = await db.latest_kyc(conn, user_id)
    await ev.relay(ctx)
    assert row is not None and row.id == kyc_id
    return _status(row)


async def decide(ctx: IdentityContext, *, actor_id: uuid.UUID, user_id: uuid.UUID, decision: Decision,
                 reason: str | None) -> KycStatus:
    if decision == "rejected" and not reason:
        raise _field_error("reason", "a rejection needs a reason the customer can act on")
    async with ctx.pool.acquire() as conn, conn.transaction():
        if await db.lock_user(conn, user_id) is None:
            raise Problem(404, "not-found", "User not found.")
        latest = await db.latest_kyc(conn, user_id)
        if latest is None:
            raise Problem(404, "not-found", "No KYC submission for this user.")
        if latest.status != "pending":
            raise Problem(409, "kyc-not-pending", f"KYC is {latest.status}, not pending.")
        await db.decide_kyc(conn, latest.id, decision, reason, actor_id)
        await db.set_kyc_status(conn, user_id, decision)
        await ev.record(conn, events.KycUpdated(**ev.new_meta(user_id), status=decision, decided_by=actor_id,
                                                reason=reason))
        row = await db.latest_kyc(conn, user_id)
    await ev.relay(ctx)
    assert row is not None
    return _status(row)


async def document_number(ctx: IdentityContext, user_id: uuid.UUID) -> str | None:
    """The decrypted number, for the KYC provider integration only; never for a response."""
    row = await db.latest_kyc(ctx.pool, user_id)
    return None if row is None else identity_pii.decrypt(ctx.settings, row.document_number_enc, user_id)
