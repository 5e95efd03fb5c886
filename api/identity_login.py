"""/api/v1/auth/*: register, login, refresh, logout, OTP and KYC submission (thin handlers)."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

import msgspec
from litestar import Request, Response, Router, post

from api.auth import issue_access_token
from api.problems import Problem
from api.identity_common import DEPENDENCIES, caller, request_ip, user_agent
from api.identity_docs import AUTH_ERRORS, PUBLIC_ERRORS
from services import identity, identity_auth, identity_kyc, identity_otp
from services.identity import Profile
from services.identity_auth import Grant
from services.identity_common import IdentityContext, utcnow
from services.identity_kyc import KycAddress, KycStatus
from services.identity_otp import OtpSent, OtpVerified
from services.notify import Notifier

# Auth bodies are tiny; refuse anything larger long before JSON parsing.
AUTH_BODY_MAX_BYTES = 16 * 1024

Email = Annotated[str, msgspec.Meta(min_length=3, max_length=320, examples=["ada@example.com"])]
Password = Annotated[str, msgspec.Meta(min_length=1, max_length=1024)]
Name = Annotated[str, msgspec.Meta(max_length=100)]


class RegisterRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    email: Email
    password: Password
    phone: Annotated[str, msgspec.Meta(max_length=32)] | None = None
    first_name: Name | None = None
    last_name: Name | None = None
    username: Annotated[str, msgspec.Meta(max_length=32)] | None = None


class LoginRequest(msgspec.Struct, frozen=True):
    email: Email
    password: Password


class RefreshRequest(msgspec.Struct, frozen=True):
    refresh_token: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]


class TokenPair(msgspec.Struct, frozen=True):
    access_token: str
    refresh_token: str
    token_type: str
    expires_in: int
    refresh_expires_in: int
    user_id: str
    session_id: str


class OtpSendRequest(msgspec.Struct, frozen=True):
    channel: identity_otp.Channel


class OtpVerifyRequest(msgspec.Struct, frozen=True):
    channel: identity_otp.Channel
    code: Annotated[str, msgspec.Meta(min_length=1, max_length=12)]


class KycRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    document_type: identity_kyc.DocumentType
    document_number: Annotated[str, msgspec.Meta(min_length=4, max_length=32)]
    address: KycAddress
    date_of_birth: Annotated[str, msgspec.Meta(pattern=r"^\d{4}-\d{2}-\d{2}$", examples=["1990-04-21"])]


def _token_pair(request: Request[Any, Any, Any], grant: Grant) -> TokenPair:
    settings = request.app.state.settings
    access = issue_access_token(settings, grant.user_id, grant.roles, grant.session_id)
    refresh_in = int((grant.refresh_expires_at - utcnow()).total_seconds())
    return TokenPair(access_token=access.token, refresh_token=grant.refresh_token, token_type="Bearer",
                     expires_in=access.expires_in, refresh_expires_in=max(refresh_in, 0),
                     user_id=str(grant.user_id), session_id=str(grant.session_id))


@post("/register", exclude_from_auth=True, status_code=201, responses=PUBLIC_ERRORS,
      summary="Register a customer account")
async def register(data: RegisterRequest, ctx: IdentityContext) -> Profile:
    return await identity.register(ctx, email=data.email, password=data.password, phone=data.phone,
                                   first_name=data.first_name, last_name=data.last_name, username=data.username)


@post("/login", exclude_from_auth=True, status_code=200, responses=PUBLIC_ERRORS,
      summary="Log in; returns an access token and a rotating refresh token")
async def login(request: Request[Any, Any, Any], data: LoginRequest, ctx: IdentityContext) -> TokenPair:
    grant = await identity_auth.login(ctx, email=_login_email(data.email), password=data.password,
                                      ip=request_ip(request), user_agent=user_agent(request))
    return _token_pair(request, grant)


def _login_email(raw: str) -> str:
    # A malformed email cannot match an account: answer exactly like wrong credentials.
    try:
        return identity.normalise_email(raw)
    except Problem:
        return raw.strip().lower()[:320]


@post("/refresh", exclude_from_auth=True, status_code=200, responses=PUBLIC_ERRORS,
      summary="Rotate a refresh token; reusing an old one revokes the whole session")
async def refresh(request: Request[Any, Any, Any], data: RefreshRequest, ctx: IdentityContext) -> TokenPair:
    return _token_pair(request, await identity_auth.refresh(ctx, data.refresh_token))


@post("/logout", status_code=204, responses=AUTH_ERRORS, summary="Revoke the current session")
async def logout(request: Request[Any, Any, Any], ctx: IdentityContext) -> Response[None]:
    user = caller(request)
    if user.session_id is not None:
        await identity_auth.revoke_session(ctx, user.id, uuid.UUID(user.session_id))
    return Response(None, status_code=204)


@post("/otp/send", status_code=202, responses=AUTH_ERRORS, summary="Send a 6-digit code by email or SMS")
async def otp_send(request: Request[Any, Any, Any], data: OtpSendRequest, ctx: IdentityContext,
                   notifier: Notifier) -> OtpSent:
    return await identity_otp.send_code(ctx, caller(request).id, data.channel, notifier)


@post("/otp/verify", status_code=200, responses=AUTH_ERRORS, summary="Verify a code; marks the channel verified")
async def otp_verify(request: Request[Any, Any, Any], data: OtpVerifyRequest, ctx: IdentityContext) -> OtpVerified:
    return await identity_otp.verify_code(ctx, caller(request).id, data.channel, data.code)


@post("/verify-kyc", status_code=202, responses=AUTH_ERRORS, summary="Submit KYC details; status becomes pending")
async def verify_kyc(request: Request[Any, Any, Any], data: KycRequest, ctx: IdentityContext) -> KycStatus:
    return await identity_kyc.submit(ctx, caller(request).id, document_type=data.document_type,
                                     document_number=data.document_number, address=data.address,
                                     date_of_birth=data.date_of_birth)


router = Router(path="/api/v1/auth", route_handlers=[register, login, refresh, logout, otp_send, otp_verify,
                                                     verify_kyc],
                dependencies=DEPENDENCIES, tags=["identity: auth"], request_max_body_size=AUTH_BODY_MAX_BYTES)
