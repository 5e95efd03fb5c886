"""Notification adapters against local servers speaking the providers' protocols:
SMTP (aiosmtpd), a SendGrid-shaped and a Twilio-shaped HTTP API; plus OTP delivery by SMTP
end to end through the API."""

from __future__ import annotations

import asyncio
import base64
import re
import socket
from collections.abc import AsyncIterator, Iterator
from email import message_from_bytes
from typing import Any

import msgspec
import pytest
import uvicorn
from aiosmtpd.controller import Controller
from litestar import Litestar, Request, Response, post
from litestar.testing import AsyncTestClient

from api.app import create_app
from ops.settings import Settings
from services.notify import (DeliveryError, Message, SendGridEmailNotifier, SmtpNotifier, TwilioSmsNotifier,
                             notifier_from_url)
from tests.helpers.auth import register_and_login


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Inbox:
    def __init__(self) -> None:
        self.messages: list[tuple[str, list[str], bytes]] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802 - aiosmtpd hook
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.content))
        return "250 OK"


@pytest.fixture
def smtp_server() -> Iterator[tuple[int, Inbox]]:
    inbox = Inbox()
    controller = Controller(inbox, hostname="127.0.0.1", port=free_port())
    controller.start()
    try:
        yield controller.port, inbox
    finally:
        controller.stop()


# --- fake SendGrid and Twilio: the request shapes their public APIs document -----------------

RECEIVED: list[dict[str, Any]] = []


@post("/v3/mail/send", status_code=202)
async def sendgrid_send(request: Request[Any, Any, Any]) -> Response[None]:
    if request.headers.get("authorization") != "Bearer SG.good-key":
        return Response(None, status_code=401)
    RECEIVED.append({"provider": "sendgrid", "json": await request.json()})
    return Response(None, status_code=202)


@post("/2010-04-01/Accounts/{sid:str}/Messages.json", status_code=201)
async def twilio_send(request: Request[Any, Any, Any], sid: str) -> Response[dict[str, str]]:
    expected = "Basic " + base64.b64encode(f"{sid}:tw-token".encode()).decode()
    if request.headers.get("authorization") != expected:
        return Response({"message": "Authenticate"}, status_code=401)
    form = dict(await request.form())
    if not re.match(r"^\+\d{7,15}$", form.get("To", "")):
        return Response({"code": "21211", "message": "Invalid 'To' Phone Number"}, status_code=400)
    RECEIVED.append({"provider": "twilio", "sid": sid, "form": form})
    return Response({"sid": "SM123", "status": "queued"}, status_code=201)


@pytest.fixture
async def provider_url() -> AsyncIterator[str]:
    RECEIVED.clear()
    app = Litestar(route_handlers=[sendgrid_send, twilio_send])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning",
                                           lifespan="off"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        await task


async def test_smtp_notifier_delivers_to_a_real_smtp_server(smtp_server: tuple[int, Inbox]) -> None:
    port, inbox = smtp_server
    await SmtpNotifier("127.0.0.1", port, "no-reply@fintide.test").send(
        Message(channel="email", to="ada@example.com", subject="Hello", body="code 123456"))
    assert len(inbox.messages) == 1
    mail_from, rcpt, content = inbox.messages[0]
    parsed = message_from_bytes(content)
    assert mail_from == "no-reply@fintide.test" and rcpt == ["ada@example.com"]
    assert parsed["Subject"] == "Hello" and "code 123456" in parsed.get_payload()


async def test_smtp_notifier_reports_an_unreachable_server_as_delivery_error() -> None:
    with pytest.raises(DeliveryError):
        await SmtpNotifier("127.0.0.1", free_port(), "x@fintide.test").send(
            Message(channel="email", to="a@example.com", subject="s", body="b"))


async def test_sendgrid_notifier_posts_the_v3_mail_send_shape(provider_url: str) -> None:
    await SendGridEmailNotifier("SG.good-key", "no-reply@fintide.test", base_url=provider_url).send(
        Message(channel="email", to="ada@example.com", subject="Hi", body="code 654321"))
    assert RECEIVED == [{"provider": "sendgrid", "json": {
        "personalizations": [{"to": [{"email": "ada@example.com"}]}], "from": {"email": "no-reply@fintide.test"},
        "subject": "Hi", "content": [{"type": "text/plain", "value": "code 654321"}]}}]
    with pytest.raises(DeliveryError, match="401"):
        await SendGridEmailNotifier("SG.bad-key", "x@fintide.test", base_url=provider_url).send(
            Message(channel="email", to="a@example.com", subject="s", body="b"))


async def test_twilio_notifier_posts_the_messages_form_with_basic_auth(provider_url: str) -> None:
    await TwilioSmsNotifier("AC123", "tw-token", "+15550001111", base_url=provider_url).send(
        Message(channel="sms", to="+919812345678", subject="", body="code 111222"))
    assert RECEIVED == [{"provider": "twilio", "sid": "AC123",
                         "form": {"To": "+919812345678", "From": "+15550001111", "Body": "code 111222"}}]
    with pytest.raises(DeliveryError, match="21211"):
        await TwilioSmsNotifier("AC123", "tw-token", "+15550001111", base_url=provider_url).send(
            Message(channel="sms", to="not-a-number", subject="", body="b"))


async def test_notifier_urls_build_the_configured_adapters(provider_url: str) -> None:
    host = provider_url.removeprefix("http://")
    twilio = notifier_from_url(f"twilio://AC123:tw-token@{host}?from=%2B15550001111&scheme=http", None)  # type: ignore[arg-type]
    await twilio.send(Message(channel="sms", to="+919812345678", subject="", body="via url"))
    assert RECEIVED[-1]["form"]["From"] == "+15550001111"
    sendgrid = notifier_from_url(f"sendgrid://SG.good-key@{host}?from=a@fintide.test&scheme=http", None)  # type: ignore[arg-type]
    await sendgrid.send(Message(channel="email", to="b@example.com", subject="s", body="via url"))
    assert RECEIVED[-1]["json"]["from"] == {"email": "a@fintide.test"}
    with pytest.raises(ValueError):
        notifier_from_url("carrier-pigeon://x", None)  # type: ignore[arg-type]


async def test_otp_by_email_goes_out_over_smtp_when_configured(settings: Settings,
                                                                smtp_server: tuple[int, Inbox]) -> None:
    port, inbox = smtp_server
    smtp = msgspec.structs.replace(settings, notify_email=f"smtp://127.0.0.1:{port}?from=no-reply@fintide.test")
    async with AsyncTestClient(app=create_app(smtp)) as client:
        me = await register_and_login(client)
        sent = await client.post("/api/v1/auth/otp/send", headers=me.headers, json={"channel": "email"})
        assert sent.status_code == 202
        code = re.search(r"\b(\d{6})\b", message_from_bytes(inbox.messages[-1][2]).get_payload()).group(1)  # type: ignore[union-attr]
        assert inbox.messages[-1][1] == [me.email]
        assert (await client.get("/api/v1/dev/outbox", params={"to": me.email})).json()["items"] == []
        verified = await client.post("/api/v1/auth/otp/verify", headers=me.headers,
                                     json={"channel": "email", "code": code})
        assert verified.status_code == 200


async def test_failed_delivery_is_503_and_leaves_no_usable_code(settings: Settings) -> None:
    dead = msgspec.structs.replace(settings, notify_email=f"smtp://127.0.0.1:{free_port()}?from=no-reply@fintide.test")
    async with AsyncTestClient(app=create_app(dead)) as client:
        me = await register_and_login(client)
        failed = await client.post("/api/v1/auth/otp/send", headers=me.headers, json={"channel": "email"})
        assert failed.status_code == 503
        # No cooldown either: the user may retry at once.
        assert (await client.post("/api/v1/auth/otp/send", headers=me.headers,
                                  json={"channel": "email"})).status_code == 503
