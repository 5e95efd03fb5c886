"""Payment gateways behind one interface: an embedded simulator and a Stripe-style HTTP adapter.

`PaymentGateway` is what the ledger needs from a gateway: charge a customer into a wallet
(deposit intent, optional capture), pay out to a bank account, and authenticate webhooks.
Every call carries our own id as the gateway's idempotency key, so a retried call can never
charge or pay twice.

Webhooks are signed Stripe-style: header `t=<unix seconds>,v1=<hex HMAC-SHA256 of
"<t>.<raw body>">` (several v1 entries allowed while a secret rotates). A signature is
accepted only within `tolerance_s` of now; replays inside that window are rejected by
event id where the event is applied (payments.gateway_events, services.payments).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final, Literal, Protocol
from uuid import UUID

import httpx
import msgspec

DEFAULT_TOLERANCE_S: Final = 300
MAX_WEBHOOK_BYTES: Final = 64 * 1024
SIGNATURE_HEADER: Final = "Webhook-Signature"
_MAX_SIGNATURES: Final = 8


class GatewayError(Exception):
    """The gateway could not be reached or failed (5xx) after bounded retries."""


class GatewayRejected(GatewayError):
    """The gateway refused the request (4xx): retrying the same request will not help."""


class WebhookError(ValueError):
    """A webhook we refuse: `reason` is bad_signature, stale, malformed or too_large."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class DepositIntent(msgspec.Struct, frozen=True):
    gateway_ref: str
    status: Literal["pending", "succeeded", "failed"]
    failure_reason: str | None = None


class PayoutResult(msgspec.Struct, frozen=True):
    gateway_ref: str
    status: Literal["pending", "paid", "failed"]
    failure_reason: str | None = None


WebhookType = Literal["deposit.succeeded", "deposit.failed", "payout.paid", "payout.failed", "ignored"]


class WebhookEvent(msgspec.Struct, frozen=True):
    """A verified gateway event in our terms: which of our deposits/payouts it settles."""

    id: str
    type: WebhookType
    reference_id: UUID | None  # our deposit or payout id
    gateway_ref: str | None
    failure_reason: str | None = None


class PaymentGateway(Protocol):
    name: str

    async def create_deposit_intent(self, *, intent_id: UUID, amount_minor: int, currency: str,
                                    payment_method: str) -> DepositIntent: ...

    async def capture(self, gateway_ref: str, *, amount_minor: int, intent_id: UUID) -> DepositIntent: ...

    async def create_payout(self, *, payout_id: UUID, amount_minor: int, currency: str,
                            destination: str) -> PayoutResult: ...

    def verify_webhook(self, headers: Mapping[str, str], body: bytes, *, now_s: int | None = None) -> WebhookEvent: ...


# ----------------------------------------------------------------------------- signatures

def sign(secret: str, body: bytes, timestamp_s: int) -> str:
    """The signature header value for body at timestamp_s."""
    digest = hmac.new(secret.encode(), f"{timestamp_s}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp_s},v1={digest}"


def verify_signature(secrets: Sequence[str], header: str | None, body: bytes, *, now_s: int,
                     tolerance_s: int = DEFAULT_TOLERANCE_S) -> int:
    """The signed timestamp if `header` signs `body` with one of `secrets` within tolerance."""
    assert secrets and all(secrets), "a webhook secret is required"
    assert 0 < tolerance_s <= 3600, "tolerance out of bounds"
    if len(body) > MAX_WEBHOOK_BYTES:
        raise WebhookError("too_large", "webhook body too large")
    if not header or len(header) > 1024:
        raise WebhookError("bad_signature", "missing signature header")
    timestamp_s: int | None = None
    candidates: list[str] = []
    for part in header.split(","):
        name, _, value = part.strip().partition("=")
        if name == "t" and value.isdigit() and len(value) <= 12:
            timestamp_s = int(value)
        elif name == "v1" and len(candidates) < _MAX_SIGNATURES:
            candidates.append(value)
    if timestamp_s is None or not candidates:
        raise WebhookError("bad_signature", "malformed signature header")
    if abs(now_s - timestamp_s) > tolerance_s:
        raise WebhookError("stale", "signature timestamp outside the tolerance window")
    signed = f"{timestamp_s}.".encode() + body
    for secret in secrets:
        expected = hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()
        # compare_digest on every candidate: no early exit that would leak timing.
        if any(hmac.compare_digest(expected, c) for c in candidates):
            return timestamp_s
    raise WebhookError("bad_signature", "signature does not match")


def _header(headers: Mapping[str, str], name: str) -> str | None:
    lowered = name.lower()
    return next((v for k, v in headers.items() if k.lower() == lowered), None)


# ---------------------------------------------------------------------------- simulator

class _SimWebhook(msgspec.Struct, frozen=True):
    id: str
    type: str
    created: int
    reference_id: str
    gateway_ref: str
    failure_reason: str | None = None


class SignedWebhook(msgspec.Struct, frozen=True):
    headers: dict[str, str]
    body: bytes


DECLINED_METHOD: Final = "sim_card_declined"
FAILING_DESTINATION: Final = "sim_bank_fail"


class SimulatedGateway:
    """An in-process gateway with no account: deterministic ids and outcomes.

    settle="immediate": deposits succeed (or fail for payment_method "sim_card_declined")
    and payouts pay (or fail for destination "sim_bank_fail") in the call itself.
    settle="webhook": calls answer "pending" and the outcome comes as a signed webhook,
    collected by `take_webhooks()` for delivery to POST /api/v1/gateway/webhooks.
    """

    name = "simulated"
    MAX_REMEMBERED: Final = 100_000

    def __init__(self, webhook_secret: str, *, settle: Literal["immediate", "webhook"] = "immediate",
                 clock: Callable[[], float] = time.time, tolerance_s: int = DEFAULT_TOLERANCE_S) -> None:
        assert webhook_secret, "the simulator signs its webhooks; give it the webhook secret"
        self._secret = webhook_secret
        self.settle = settle
        self._clock = clock
        self._tolerance_s = tolerance_s
        self._results: OrderedDict[UUID, Any] = OrderedDict()
        self._webhooks: list[SignedWebhook] = []

    def _remember(self, key: UUID, value: Any) -> Any:
        self._results[key] = value
        while len(self._results) > self.MAX_REMEMBERED:  # bounded memory: oldest forgotten first
            self._results.popitem(last=False)
        return value

    def _queue(self, kind: str, reference_id: UUID, gateway_ref: str, failure_reason: str | None) -> None:
        now_s = int(self._clock())
        event = _SimWebhook(id="evt_" + hashlib.sha256(f"{gateway_ref}:{kind}".encode()).hexdigest()[:24],
                            type=kind, created=now_s, reference_id=str(reference_id), gateway_ref=gateway_ref,
                            failure_reason=failure_reason)
        body = msgspec.json.encode(event)
        if len(self._webhooks) < self.MAX_REMEMBERED:
            self._webhooks.append(SignedWebhook({SIGNATURE_HEADER: sign(self._secret, body, now_s)}, body))

    def take_webhooks(self) -> list[SignedWebhook]:
        taken, self._webhooks = self._webhooks, []
        return taken

    async def create_deposit_intent(self, *, intent_id: UUID, amount_minor: int, currency: str,
                                    payment_method: str) -> DepositIntent:
        assert amount_minor > 0
        if intent_id in self._results:
            return self._results[intent_id]
        ref = f"sim_pi_{intent_id.hex}"
        declined = payment_method == DECLINED_METHOD
        if self.settle == "webhook":
            self._queue("deposit.failed" if declined else "deposit.succeeded", intent_id, ref,
                        "card_declined" if declined else None)
            return self._remember(intent_id, DepositIntent(ref, "pending"))
        outcome = DepositIntent(ref, "failed", "card_declined") if declined else DepositIntent(ref, "succeeded")
        return self._remember(intent_id, outcome)

    async def capture(self, gateway_ref: str, *, amount_minor: int, intent_id: UUID) -> DepositIntent:
        known = self._results.get(intent_id)
        if known is None or known.gateway_ref != gateway_ref:
            raise GatewayRejected(f"no intent {gateway_ref}")
        return known

    async def create_payout(self, *, payout_id: UUID, amount_minor: int, currency: str,
                            destination: str) -> PayoutResult:
        if payout_id in self._results:
            return self._results[payout_id]
        ref = f"sim_po_{payout_id.hex}"
        failing = destination == FAILING_DESTINATION
        if self.settle == "webhook":
            self._queue("payout.failed" if failing else "payout.paid", payout_id, ref,
                        "account_closed" if failing else None)
            return self._remember(payout_id, PayoutResult(ref, "pending"))
        outcome = PayoutResult(ref, "failed", "account_closed") if failing else PayoutResult(ref, "paid")
        return self._remember(payout_id, outcome)

    def verify_webhook(self, headers: Mapping[str, str], body: bytes, *, now_s: int | None = None) -> WebhookEvent:
        verify_signature([self._secret], _header(headers, SIGNATURE_HEADER), body,
                         now_s=int(self._clock()) if now_s is None else now_s, tolerance_s=self._tolerance_s)
        try:
            raw = msgspec.json.decode(body, type=_SimWebhook)
            reference = UUID(raw.reference_id)
        except (msgspec.DecodeError, ValueError) as exc:
            raise WebhookError("malformed", "webhook body is not a gateway event") from exc
        kind: WebhookType = raw.type if raw.type in ("deposit.succeeded", "deposit.failed", "payout.paid",
                                                     "payout.failed") else "ignored"  # type: ignore[assignment]
        return WebhookEvent(raw.id, kind, reference, raw.gateway_ref, raw.failure_reason)


# ------------------------------------------------------------------------- HTTP adapter

class _StripeObject(msgspec.Struct):
    id: str
    status: str = ""
    metadata: dict[str, str] = {}
    last_payment_error: dict[str, Any] | None = None
    failure_code: str | None = None


class _StripeEventData(msgspec.Struct):
    object: _StripeObject


class _StripeEvent(msgspec.Struct):
    id: str
    type: str
    data: _StripeEventData
    created: int = 0


_EVENT_TYPES: Final[dict[str, WebhookType]] = {
    "payment_intent.succeeded": "deposit.succeeded", "payment_intent.payment_failed": "deposit.failed",
    "payout.paid": "payout.paid", "payout.failed": "payout.failed",
}
_INTENT_STATUS: Final[dict[str, Literal["pending", "succeeded", "failed"]]] = {
    "succeeded": "succeeded", "canceled": "failed", "processing": "pending", "requires_capture": "pending",
    "requires_action": "pending", "requires_confirmation": "pending", "requires_payment_method": "pending",
}
_PAYOUT_STATUS: Final[dict[str, Literal["pending", "paid", "failed"]]] = {
    "paid": "paid", "failed": "failed", "canceled": "failed", "pending": "pending", "in_transit": "pending",
}
METADATA_KEY: Final = "fintide_id"


class HttpGateway:
    """A Stripe-style REST gateway: form-encoded POSTs with Bearer auth and Idempotency-Key.

    Transport errors, 429 and 5xx are retried (at most `max_attempts`, with backoff) under
    the same idempotency key; 4xx raise GatewayRejected at once.
    """

    def __init__(self, base_url: str, api_key: str, webhook_secrets: Sequence[str], *, name: str = "stripe",
                 client: httpx.AsyncClient | None = None, timeout_s: float = 10.0, max_attempts: int = 3,
                 backoff_s: float = 0.2, signature_header: str = "Stripe-Signature",
                 tolerance_s: int = DEFAULT_TOLERANCE_S) -> None:
        assert api_key and webhook_secrets, "api key and webhook secret are required"
        assert 1 <= max_attempts <= 10 and 0 < timeout_s <= 60, "retry/timeout bounds"
        self.name = name
        self._secrets = list(webhook_secrets)
        self._client = client or httpx.AsyncClient(base_url=base_url, timeout=timeout_s)
        self._headers = {"Authorization": f"Bearer {api_key}"}
        self._max_attempts = max_attempts
        self._backoff_s = backoff_s
        self._signature_header = signature_header
        self._tolerance_s = tolerance_s

    async def aclose(self) -> None:
        await self._client.aclose()

    async def _post(self, path: str, form: dict[str, str], idempotency_key: str) -> _StripeObject:
        headers = {**self._headers, "Idempotency-Key": idempotency_key}
        last_error = ""
        for attempt in range(self._max_attempts):
            if attempt:
                await asyncio.sleep(self._backoff_s * 2 ** (attempt - 1))
            try:
                response = await self._client.post(path, data=form, headers=headers)
            except httpx.TransportError as exc:
                last_error = f"{type(exc).__name__}: {exc}"
                continue
            if response.status_code == 429 or response.status_code >= 500:
                last_error = f"HTTP {response.status_code}"
                continue
            if response.status_code >= 400:
                raise GatewayRejected(f"{self.name} refused {path}: HTTP {response.status_code} {response.text[:200]}")
            return msgspec.json.decode(response.content, type=_StripeObject)
        raise GatewayError(f"{self.name} unavailable for {path} after {self._max_attempts} attempts: {last_error}")

    async def create_deposit_intent(self, *, intent_id: UUID, amount_minor: int, currency: str,
                                    payment_method: str) -> DepositIntent:
        obj = await self._post("/v1/payment_intents", {
            "amount": str(amount_minor), "currency": currency.lower(), "confirm": "true",
            "payment_method": payment_method, f"metadata[{METADATA_KEY}]": str(intent_id)}, f"deposit-{intent_id}")
        return self._intent(obj)

    async def capture(self, gateway_ref: str, *, amount_minor: int, intent_id: UUID) -> DepositIntent:
        obj = await self._post(f"/v1/payment_intents/{gateway_ref}/capture",
                               {"amount_to_capture": str(amount_minor)}, f"capture-{intent_id}")
        return self._intent(obj)

    def _intent(self, obj: _StripeObject) -> DepositIntent:
        status = _INTENT_STATUS.get(obj.status, "pending")
        if obj.status == "requires_payment_method" and obj.last_payment_error:
            return DepositIntent(obj.id, "failed", str(obj.last_payment_error.get("code", "declined"))[:100])
        return DepositIntent(obj.id, status, "canceled" if status == "failed" else None)

    async def create_payout(self, *, payout_id: UUID, amount_minor: int, currency: str,
                            destination: str) -> PayoutResult:
        obj = await self._post("/v1/payouts", {
            "amount": str(amount_minor), "currency": currency.lower(), "destination": destination,
            f"metadata[{METADATA_KEY}]": str(payout_id)}, f"payout-{payout_id}")
        status = _PAYOUT_STATUS.get(obj.status, "pending")
        return PayoutResult(obj.id, status, (obj.failure_code or "failed") if status == "failed" else None)

    def verify_webhook(self, headers: Mapping[str, str], body: bytes, *, now_s: int | None = None) -> WebhookEvent:
        verify_signature(self._secrets, _header(headers, self._signature_header), body,
                         now_s=int(time.time()) if now_s is None else now_s, tolerance_s=self._tolerance_s)
        try:
            event = msgspec.json.decode(body, type=_StripeEvent)
            raw_reference = event.data.object.metadata.get(METADATA_KEY)
            reference = UUID(raw_reference) if raw_reference else None
        except (msgspec.DecodeError, ValueError) as exc:
            raise WebhookError("malformed", "webhook body is not a gateway event") from exc
        kind = _EVENT_TYPES.get(event.type, "ignored")
        obj = event.data.object
        failure = None
        if kind.endswith("failed"):
            failure = str((obj.last_payment_error or {}).get("code") or obj.failure_code or "failed")[:100]
        return WebhookEvent(event.id, kind if reference else "ignored", reference, obj.id, failure)
