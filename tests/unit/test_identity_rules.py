"""Pure identity rules: email normalisation, password policy, PII sealing, masking,
client IP resolution behind proxies, cursors, KYC field checks, notifier URLs."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import date, datetime, timezone

import msgspec
import pytest
from cryptography.exceptions import InvalidTag
from hypothesis import given
from hypothesis import strategies as st

from api.identity_common import decode_cursor, encode_cursor
from api.problems import Problem
from api.ratelimit import client_ip
from ops.settings import load_settings
from services import identity_kyc, identity_pii
from services.identity_auth import password_problems
from services.identity_common import mask_document_number, normalise_email, normalise_phone
from services.identity_otp import mask_destination
from services.notify import ChannelRouter, DevOutbox, SendGridEmailNotifier, SmtpNotifier, TwilioSmsNotifier, notifier_from_url

SETTINGS = load_settings(environ={})


def test_emails_are_trimmed_nfkc_and_lower_cased() -> None:
    assert normalise_email("  Ada.Lovelace@EXAMPLE.com\t") == "ada.lovelace@example.com"
    assert normalise_email("ｕｓｅｒ@example.com") == "user@example.com"  # fullwidth forms fold (NFKC)


@given(st.emails())
def test_email_normalisation_is_idempotent(email: str) -> None:
    try:
        once = normalise_email(email)
    except Problem:
        return  # hypothesis emails can exceed our 64-char local part; rejection is fine
    assert normalise_email(once) == once == once.lower()


@pytest.mark.parametrize("bad", ["", "plain", "a@b", "a b@c.de", "a@@b.cd", "@b.cd", "a@b.c", "a\x00@b.cd"])
def test_invalid_emails_are_rejected(bad: str) -> None:
    with pytest.raises(Problem) as raised:
        normalise_email(bad)
    assert raised.value.status_code == 422


def test_phones_must_be_e164() -> None:
    assert normalise_phone("+1 (555) 000-1111") == "+15550001111"
    for bad in ("5550001111", "+0123456789", "+1234"):
        with pytest.raises(Problem):
            normalise_phone(bad)


def test_password_policy_names_every_problem() -> None:
    assert password_problems("Sturdy-Passw0rd!", "ada@example.com") == []
    assert len(password_problems("short", "ada@example.com")) == 2  # too short, letters only
    assert password_problems("x" * 129 + "1", "ada@example.com") == ["must be at most 128 characters"]
    assert "is too common" in password_problems("Password123", "ada@example.com")
    assert "must not contain your email name" in password_problems("my-lovelace-99", "lovelace@example.com")


def test_pii_round_trips_and_is_bound_to_its_owner() -> None:
    owner, other = uuid.uuid4(), uuid.uuid4()
    sealed = identity_pii.encrypt(SETTINGS, "ABCDE1234F", owner)
    assert b"ABCDE1234F" not in sealed and sealed[0] == 1
    assert identity_pii.decrypt(SETTINGS, sealed, owner) == "ABCDE1234F"
    assert identity_pii.encrypt(SETTINGS, "ABCDE1234F", owner) != sealed  # fresh nonce every time
    with pytest.raises(InvalidTag):
        identity_pii.decrypt(SETTINGS, sealed, other)
    tampered = sealed[:-1] + bytes([sealed[-1] ^ 1])
    with pytest.raises(InvalidTag):
        identity_pii.decrypt(SETTINGS, tampered, owner)


def test_pii_key_setting_takes_precedence_over_the_jwt_secret() -> None:
    owner = uuid.uuid4()
    with_key = msgspec.structs.replace(SETTINGS, pii_key="a-dedicated-pii-key-0123456789abcdef")
    sealed = identity_pii.encrypt(with_key, "12345678", owner)
    with pytest.raises(InvalidTag):
        identity_pii.decrypt(SETTINGS, sealed, owner)
    assert identity_pii.decrypt(with_key, sealed, owner) == "12345678"


def test_masks_show_only_the_tail() -> None:
    assert mask_document_number("234F") == "XXXXXX234F"
    assert mask_destination("email", "ada@example.com") == "a***@example.com"
    assert mask_destination("sms", "+919812345678") == "+91********78"


@dataclass
class _Client:
    host: str


@dataclass
class _Conn:
    client: _Client | None
    headers: dict[str, str]


@pytest.mark.parametrize(("trusted", "peer", "xff", "expected"), [
    ("", "203.0.113.9", "1.2.3.4", "203.0.113.9"),                      # nothing trusted: XFF ignored
    ("10.0.0.0/8", "198.51.100.7", "1.2.3.4", "198.51.100.7"),          # peer is not a trusted proxy
    ("10.0.0.0/8", "10.0.0.2", "1.2.3.4", "1.2.3.4"),                   # one trusted hop
    ("10.0.0.0/8", "10.0.0.2", "6.6.6.6, 1.2.3.4, 10.0.0.9", "1.2.3.4"),  # spoofed left part skipped
    ("10.0.0.0/8", "10.0.0.2", "", "10.0.0.2"),                         # no header: the proxy itself
    ("10.0.0.0/8", "10.0.0.2", "not-an-ip", "10.0.0.2"),                # garbage: fall back to the peer
    ("proxy,::1", "proxy", "2001:db8::1", "2001:db8::1"),                # host names and IPv6
])
def test_client_ip_honours_forwarded_for_only_from_trusted_proxies(trusted: str, peer: str, xff: str,
                                                                  expected: str) -> None:
    settings = msgspec.structs.replace(SETTINGS, trusted_proxies=trusted)
    conn = _Conn(_Client(peer), {"x-forwarded-for": xff} if xff else {})
    assert client_ip(conn, settings) == expected  # type: ignore[arg-type]


@given(st.datetimes(timezones=st.just(timezone.utc)), st.uuids())
def test_cursors_round_trip(created_at: datetime, item_id: uuid.UUID) -> None:
    assert decode_cursor(encode_cursor(created_at, item_id)) == (created_at, item_id)


@pytest.mark.parametrize("bad", ["%%%", "bm9wZQ", encode_cursor(datetime(2024, 1, 1), uuid.uuid4())])
def test_tampered_cursors_are_400(bad: str) -> None:
    with pytest.raises(Problem) as raised:
        decode_cursor(bad)
    assert raised.value.status_code == 400


def test_kyc_document_numbers_and_birth_dates_are_checked() -> None:
    assert identity_kyc.normalise_document("pan", "abcde 1234 f") == "ABCDE1234F"
    assert identity_kyc.normalise_document("aadhaar", "1234-5678-9012") == "123456789012"
    with pytest.raises(Problem):
        identity_kyc.normalise_document("pan", "ABCD1234F")
    today = date(2026, 6, 15)
    assert identity_kyc.parse_birth_date("2008-06-15", today) == date(2008, 6, 15)  # 18 today
    for bad in ("2008-06-16", "1900-01-01", "2001-02-29", "15/06/1990"):
        with pytest.raises(Problem):
            identity_kyc.parse_birth_date(bad, today)


def test_notifier_urls_pick_the_adapter() -> None:
    assert isinstance(notifier_from_url("outbox", None), DevOutbox)  # type: ignore[arg-type]
    smtp = notifier_from_url("smtp://u:p%40ss@mail.local:587?from=a@b.co&starttls=1", None)  # type: ignore[arg-type]
    assert isinstance(smtp, SmtpNotifier) and smtp.password == "p@ss" and smtp.starttls and smtp.port == 587
    sendgrid = notifier_from_url("sendgrid://SG.key@api.sendgrid.com?from=a@b.co", None)  # type: ignore[arg-type]
    assert isinstance(sendgrid, SendGridEmailNotifier) and sendgrid.base_url == "https://api.sendgrid.com"
    twilio = notifier_from_url("twilio://AC1:tok@api.twilio.com?from=%2B15550001111", None)  # type: ignore[arg-type]
    assert isinstance(twilio, TwilioSmsNotifier) and twilio.from_number == "+15550001111"
    assert isinstance(ChannelRouter(smtp, twilio).by_channel["sms"], TwilioSmsNotifier)
