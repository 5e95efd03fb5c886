"""Sending notifications: one small interface, a dev outbox and real adapters.

`Notifier.send(Message)` is all callers see. Implementations:
- DevOutbox: keeps messages in Redis (newest first, capped) for GET /api/v1/dev/outbox,
  which answers only when settings.env is dev or test.
- SmtpNotifier: plain SMTP (optionally STARTTLS + login) via the standard library, in a
  worker thread so the event loop never blocks on a mail server.
- SendGridEmailNotifier: SendGrid's v3 `POST /v3/mail/send` JSON API (Bearer key).
- TwilioSmsNotifier: Twilio's `POST /2010-04-01/Accounts/{sid}/Messages.json` form API
  (basic auth with account SID and auth token).
- ChannelRouter: email and SMS to different notifiers.

Configuration (settings `notify_email` / `notify_sms`, read by `notifier_for`):
  FINTIDE_NOTIFY_EMAIL = outbox | smtp://user:pass@host:587?from=no-reply@x&starttls=1
                         | sendgrid://API_KEY@api.sendgrid.com?from=no-reply@x
  FINTIDE_NOTIFY_SMS   = outbox | twilio://ACCOUNT_SID:AUTH_TOKEN@api.twilio.com?from=%2B15550001111
  (`scheme=http` in the query points an HTTP adapter at a plain-HTTP server, e.g. a fake.)
Message bodies can hold one-time codes: they are never logged.
"""

from __future__ import annotations

import asyncio
import logging
import smtplib
import uuid
from collections.abc import Mapping
from datetime import datetime, timezone
from email.message import EmailMessage
from typing import Literal, Protocol, runtime_checkable
from urllib.parse import parse_qs, unquote, urlsplit

import httpx
import msgspec
from redis.asyncio import Redis

from ops.settings import Settings

log = logging.getLogger("fintide.notify")

Channel = Literal["email", "sms"]
HTTP_TIMEOUT_S = 10.0
SMTP_TIMEOUT_S = 10.0
OUTBOX_KEY = "fintide:notify:outbox"
OUTBOX_MAX = 500  # the dev outbox keeps the newest 500 messages


class Message(msgspec.Struct, frozen=True):
    channel: Channel
    to: str
    subject: str
    body: str


class OutboxEntry(msgspec.Struct, frozen=True):
    id: str
    sent_at: datetime
    channel: Channel
    to: str
    subject: str
    body: str


class DeliveryError(RuntimeError):
    """The provider refused or could not be reached; the message was not sent."""


@runtime_checkable
class Notifier(Protocol):
    async def send(self, message: Message) -> None: ...


class DevOutbox:
    def __init__(self, redis: Redis, key: str = OUTBOX_KEY) -> None:
        self.redis = redis
        self.key = key

    async def send(self, message: Message) -> None:
        entry = OutboxEntry(id=uuid.uuid4().hex, sent_at=datetime.now(timezone.utc), **msgspec.structs.asdict(message))
        pipe = self.redis.pipeline(transaction=True)
        pipe.lpush(self.key, msgspec.json.encode(entry)).ltrim(self.key, 0, OUTBOX_MAX - 1)
        await pipe.execute()

    async def read(self, limit: int = 50, to: str | None = None) -> list[OutboxEntry]:
        """Newest first; `to` filters on the recipient."""
        raw = await self.redis.lrange(self.key, 0, OUTBOX_MAX - 1)
        entries = [msgspec.json.decode(item, type=OutboxEntry) for item in raw]
        if to is not None:
            entries = [e for e in entries if e.to == to]
        return entries[:limit]


class SmtpNotifier:
    def __init__(self, host: str, port: int, sender: str, *, username: str | None = None,
                 password: str | None = None, starttls: bool = False) -> None:
        self.host, self.port, self.sender = host, port, sender
        self.username, self.password, self.starttls = username, password, starttls

    async def send(self, message: Message) -> None:
        assert message.channel == "email", "SmtpNotifier sends email only"
        mail = EmailMessage()
        mail["From"], mail["To"], mail["Subject"] = self.sender, message.to, message.subject
        mail.set_content(message.body)
        try:
            await asyncio.to_thread(self._deliver, mail)
        except (smtplib.SMTPException, OSError) as exc:
            raise DeliveryError(f"SMTP delivery failed: {type(exc).__name__}") from exc

    def _deliver(self, mail: EmailMessage) -> None:
        with smtplib.SMTP(self.host, self.port, timeout=SMTP_TIMEOUT_S) as smtp:
            if self.starttls:
                smtp.starttls()
            if self.username:
                smtp.login(self.username, self.password or "")
            smtp.send_message(mail)


class SendGridEmailNotifier:
    def __init__(self, api_key: str, sender: str, *, base_url: str = "https://api.sendgrid.com") -> None:
        self.api_key, self.sender, self.base_url = api_key, sender, base_url.rstrip("/")

    async def send(self, message: Message) -> None:
        assert message.channel == "email", "SendGridEmailNotifier sends email only"
        payload = {"personalizations": [{"to": [{"email": message.to}]}], "from": {"email": self.sender},
                   "subject": message.subject, "content": [{"type": "text/plain", "value": message.body}]}
        await _post(f"{self.base_url}/v3/mail/send", json=payload,
                    headers={"Authorization": f"Bearer {self.api_key}"}, provider="sendgrid")


class TwilioSmsNotifier:
    def __init__(self, account_sid: str, auth_token: str, from_number: str, *,
                 base_url: str = "https://api.twilio.com") -> None:
        self.account_sid, self.auth_token, self.from_number = account_sid, auth_token, from_number
        self.base_url = base_url.rstrip("/")

    async def send(self, message: Message) -> None:
        assert message.channel == "sms", "TwilioSmsNotifier sends SMS only"
        url = f"{self.base_url}/2010-04-01/Accounts/{self.account_sid}/Messages.json"
        await _post(url, data={"To": message.to, "From": self.from_number, "Body": message.body},
                    auth=(self.account_sid, self.auth_token), provider="twilio")


async def _post(url: str, *, provider: str, json: object = None, data: Mapping[str, str] | None = None,
                headers: Mapping[str, str] | None = None, auth: tuple[str, str] | None = None) -> None:
    try:
        async with httpx.AsyncClient(timeout=HTTP_TIMEOUT_S) as client:
            response = await client.post(url, json=json, data=data, headers=headers, auth=auth)
    except httpx.HTTPError as exc:
        raise DeliveryError(f"{provider} unreachable: {type(exc).__name__}") from exc
    if not 200 <= response.status_code < 300:
        # The provider's error body names the problem (bad number, bad key) and holds no secret of ours.
        raise DeliveryError(f"{provider} answered {response.status_code}: {response.text[:200]}")


class ChannelRouter:
    def __init__(self, email: Notifier, sms: Notifier) -> None:
        self.by_channel: dict[str, Notifier] = {"email": email, "sms": sms}

    async def send(self, message: Message) -> None:
        await self.by_channel[message.channel].send(message)


def notifier_from_url(url: str, redis: Redis) -> Notifier:
    """One notifier from a FINTIDE_NOTIFY_* value (see the module docstring)."""
    if url in ("", "outbox"):
        return DevOutbox(redis)
    parts = urlsplit(url)
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    web = f"{query.get('scheme', 'https')}://{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    user, secret = unquote(parts.username or ""), unquote(parts.password or "")
    if parts.scheme == "smtp":
        return SmtpNotifier(parts.hostname or "localhost", parts.port or 25, query["from"],
                            username=user or None, password=secret or None,
                            starttls=query.get("starttls") in ("1", "true"))
    if parts.scheme == "sendgrid":
        return SendGridEmailNotifier(user, query["from"], base_url=web)
    if parts.scheme == "twilio":
        return TwilioSmsNotifier(user, secret, query["from"], base_url=web)
    raise ValueError(f"unknown notifier scheme {parts.scheme!r}")


def notifier_for(settings: Settings, redis: Redis) -> Notifier:
    """The email and SMS notifiers chosen by FINTIDE_NOTIFY_EMAIL / FINTIDE_NOTIFY_SMS."""
    if settings.env == "prod" and "outbox" in (settings.notify_email, settings.notify_sms):
        log.warning("notifications go to the dev outbox in prod; set FINTIDE_NOTIFY_EMAIL / FINTIDE_NOTIFY_SMS")
    return ChannelRouter(email=notifier_from_url(settings.notify_email, redis),
                         sms=notifier_from_url(settings.notify_sms, redis))
