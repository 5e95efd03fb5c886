"""Payments REST: wallets, statements, deposits, payments, refunds, payouts, escrow, trial
balance, webhooks; and `WS /ws/payments`, the status changes of the user's own payments.

Thin handlers: parse (msgspec, strict: an amount is an integer count of minor units, a
float or string is a 422), check who may act, call services.payments, shape the answer.
Money-moving POSTs require an Idempotency-Key (api/idempotency.py). Another user's
wallet, payment or escrow is a 404, never a 403, so ids do not leak.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime
from typing import Annotated, Any, Final
from uuid import UUID

import msgspec
from litestar import Request, Response, Router, WebSocket, get, post, websocket
from litestar.channels import ChannelsPlugin
from litestar.datastructures import State
from litestar.exceptions import WebSocketDisconnect
from msgspec import Meta

from api.auth import AuthUser, ensure_owner_or_staff, requires_roles
from api.idempotency import idempotent
from api.problems import Problem, problem_response
from api.ratelimit import client_ip
from api.resources import Resources
from api.ws_auth import authenticate_websocket
from db import payments as db
from services import payments
from services.gateway import (
    GatewayError,
    HttpGateway,
    PaymentGateway,
    SimulatedGateway,
    WebhookError,
)
from services.money import (
    CURRENCY_EXPONENTS,
    MAX_AMOUNT_MINOR,
    MoneyError,
    check_amount_minor,
)
from services.payments_events import user_channel

log = logging.getLogger("fintide.api.payments")
IDEMPOTENCY_TABLE: Final = "payments.idempotency_keys"
# A WebSocket client that falls this many status messages behind is closed (1013, try
# again later); it catches up with GET /payments/{id}.
WS_MAX_BACKLOG: Final = 1_000
WS_TRY_AGAIN_LATER: Final = 1013
# Staff who may move money on a customer's behalf (auditors only read).
MONEY_STAFF: Final = frozenset({"support", "admin"})

AmountMinor = Annotated[int, Meta(ge=1, le=MAX_AMOUNT_MINOR, description="Integer count of the currency's minor unit "
                                  "(12345 INR is ₹123.45). Floats and strings are refused.", examples=[12345])]
Currency = Annotated[str, Meta(pattern="^[A-Z]{3}$", description="ISO 4217 code", examples=["INR"])]


# ------------------------------------------------------------------------------ schemas

class WalletIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    currency: Currency


class DepositIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    amount_minor: AmountMinor
    currency: Currency
    # The gateway's payment method token; the simulator declines "sim_card_declined".
    payment_method: Annotated[str, Meta(min_length=1, max_length=100)] = "sim_card_ok"


class RefundIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    amount_minor: AmountMinor | None = None  # absent: refund everything not yet refunded
    reason: Annotated[str, Meta(max_length=500)] = ""


class PayoutIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    wallet_id: UUID
    amount_minor: AmountMinor
    currency: Currency
    destination: Annotated[str, Meta(min_length=1, max_length=100, description="Bank account reference at the gateway")]


class EscrowIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    from_wallet: UUID
    to_wallet: UUID
    amount_minor: AmountMinor
    currency: Currency
    release_condition: Annotated[str, Meta(min_length=1, max_length=500)]


class PaymentIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    from_wallet: UUID
    to_wallet: UUID
    amount_minor: AmountMinor
    currency: Currency
    description: Annotated[str, Meta(max_length=payments.MAX_DESCRIPTION_CHARS)] = ""


class PaymentAccepted(msgspec.Struct, frozen=True):
    id: UUID
    status: str


class PaymentStepOut(msgspec.Struct, frozen=True, omit_defaults=True):
    status: str
    at: str
    detail: str | None = None


class PaymentOut(msgspec.Struct, frozen=True):
    id: UUID
    status: str
    payer_id: UUID
    from_wallet: UUID
    to_wallet: UUID
    amount_minor: int
    currency: str
    description: str
    failure_reason: str | None
    captured_minor: int
    refunded_minor: int
    history: list[PaymentStepOut]
    created_at: datetime
    updated_at: datetime


class WalletOut(msgspec.Struct, frozen=True):
    id: UUID
    owner_id: UUID
    currency: str
    exponent: int
    posted_minor: int
    reserved_minor: int
    available_minor: int
    created_at: datetime


class StatementOut(msgspec.Struct, frozen=True):
    wallet_id: UUID
    currency: str
    entries: list[db.StatementEntry]
    next_cursor: str | None


class DepositOut(msgspec.Struct, frozen=True):
    id: UUID
    wallet_id: UUID
    amount_minor: int
    currency: str
    status: str
    gateway: str
    gateway_ref: str | None
    created_at: datetime


class RefundOut(msgspec.Struct, frozen=True):
    id: UUID
    payment_id: UUID
    amount_minor: int
    currency: str
    reason: str
    transaction_id: UUID
    created_at: datetime


class PayoutOut(msgspec.Struct, frozen=True):
    id: UUID
    wallet_id: UUID
    amount_minor: int
    fee_minor: int
    currency: str
    destination: str
    status: str
    failure_reason: str | None
    created_at: datetime


class EscrowOut(msgspec.Struct, frozen=True):
    id: UUID
    payer_id: UUID
    payee_id: UUID
    from_wallet: UUID
    to_wallet: UUID
    amount_minor: int
    commission_minor: int
    currency: str
    release_condition: str
    status: str
    created_at: datetime
    resolved_at: datetime | None


class TrialBalanceLineOut(msgspec.Struct, frozen=True):
    currency: str
    debits_minor: int
    credits_minor: int
    transactions: int
    balanced: bool


class TrialBalanceOut(msgspec.Struct, frozen=True):
    balanced: bool
    currencies: list[TrialBalanceLineOut]


class WebhookOut(msgspec.Struct, frozen=True):
    status: str  # applied | duplicate | ignored


def _payment_out(p: db.Payment) -> PaymentOut:
    history = [PaymentStepOut(str(step.get("status")), str(step.get("at")), step.get("detail")) for step in p.steps]
    return PaymentOut(p.id, p.status, p.payer_id, p.from_account_id, p.to_account_id, p.amount_minor, p.currency,
                      p.description, p.failure_reason, p.captured_minor, p.refunded_minor, history, p.created_at,
                      p.updated_at)


def _wallet_out(view: payments.WalletView) -> WalletOut:
    a, b = view.account, view.balance
    assert a.owner_id is not None
    return WalletOut(a.id, a.owner_id, a.currency, CURRENCY_EXPONENTS[a.currency], b.posted_minor, b.reserved_minor,
                     b.available_minor, a.created_at)


def _deposit_out(d: db.Deposit) -> DepositOut:
    return DepositOut(d.id, d.account_id, d.amount_minor, d.currency, d.status, d.gateway, d.gateway_ref, d.created_at)


def _payout_out(p: db.Payout) -> PayoutOut:
    return PayoutOut(p.id, p.account_id, p.amount_minor, p.fee_minor, p.currency, p.destination, p.status,
                     p.failure_reason, p.created_at)


def _escrow_out(e: db.Escrow) -> EscrowOut:
    return EscrowOut(e.id, e.payer_id, e.payee_id, e.from_account_id, e.to_account_id, e.amount_minor,
                     e.commission_minor, e.currency, e.release_condition, e.status, e.created_at, e.resolved_at)


# ---------------------------------------------------------------------------- plumbing

def _user(request: Request[Any, Any, Any]) -> AuthUser:
    user = request.user
    assert isinstance(user, AuthUser), "route is authenticated"
    return user


async def _strict_amount(request: Request[Any, Any, Any]) -> None:
    """Refuse a float amount even when it is integral (100.0): msgspec would accept it as an
    int, but a client sending floats has the wrong idea of the format (minor units)."""
    raw = msgspec.json.decode(await request.body() or b"null")
    if isinstance(raw, dict) and raw.get("amount_minor") is not None:
        try:
            check_amount_minor(raw["amount_minor"])
        except MoneyError as exc:
            raise Problem(422, "validation-error", exc.message,
                          errors=[{"field": exc.field, "message": exc.message, "source": "body"}]) from exc


def gateway_of(state: State) -> PaymentGateway:
    """The app's gateway: `app.state.payment_gateway` if set, else the Stripe-style HTTP
    gateway at settings.gateway_url, else the embedded simulator."""
    gateway = getattr(state, "payment_gateway", None)
    if gateway is None:
        settings = state.settings
        if settings.gateway_url:
            gateway = HttpGateway(settings.gateway_url, settings.gateway_api_key, [settings.gateway_webhook_secret])
        else:
            gateway = SimulatedGateway(settings.gateway_webhook_secret)
        state.payment_gateway = gateway
    return gateway


def _can_move_money_for_others(user: AuthUser) -> bool:
    return user.kind == "user" and bool(user.roles & MONEY_STAFF)


def _payments_error(request: Request[Any, Any, Any], exc: payments.PaymentsError) -> Response[dict[str, Any]]:
    errors = [{"field": exc.field, "message": exc.detail, "source": "body"}] if exc.field else None
    title = exc.slug.replace("-", " ").capitalize()
    extra = {k: v for k, v in exc.extra.items() if isinstance(v, str | int)}
    return problem_response(request, exc.status, exc.slug, title, exc.detail, errors=errors, **extra)


def _gateway_error(request: Request[Any, Any, Any], exc: GatewayError) -> Response[dict[str, Any]]:
    return problem_response(request, 502, "gateway-unavailable", "Payment gateway unavailable",
                            "The payment gateway did not answer; retry with the same Idempotency-Key.",
                            headers={"Retry-After": "5"})


# ------------------------------------------------------------------------------ wallets

@post("/wallets", summary="Open a wallet in a currency (one per currency)")
async def open_wallet(request: Request[Any, Any, Any], data: WalletIn, resources: Resources) -> Response[bytes]:
    user = _user(request)
    pool = await resources.pool("payments")

    async def work(_: UUID) -> tuple[int, WalletOut]:
        async with pool.acquire() as conn:
            account = await payments.open_wallet(conn, user.id, data.currency)
            return 201, _wallet_out(await payments.get_wallet(conn, account.id, owner_id=user.id))

    return await idempotent(request, pool, owner_id=user.id, table=IDEMPOTENCY_TABLE, work=work, required=False)


@get("/wallets/{wallet_id:uuid}", summary="A wallet's balances: posted, reserved, available")
async def get_wallet(request: Request[Any, Any, Any], wallet_id: UUID, resources: Resources) -> WalletOut:
    user = _user(request)
    async with (await resources.pool("payments")).acquire() as conn:
        view = await payments.get_wallet(conn, wallet_id, owner_id=None)
    assert view.account.owner_id is not None
    ensure_owner_or_staff(user, view.account.owner_id, what="Wallet")
    return _wallet_out(view)


@get("/wallets/{wallet_id:uuid}/statement", summary="Every movement, newest first, with the running balance")
async def wallet_statement(request: Request[Any, Any, Any], wallet_id: UUID, resources: Resources,
                           cursor: str | None = None,
                           limit: Annotated[int, Meta(ge=1, le=payments.STATEMENT_PAGE_MAX)] = payments.STATEMENT_PAGE_DEFAULT
                           ) -> StatementOut:
    user = _user(request)
    async with (await resources.pool("payments")).acquire() as conn:
        view = await payments.get_wallet(conn, wallet_id, owner_id=None)
        assert view.account.owner_id is not None
        ensure_owner_or_staff(user, view.account.owner_id, what="Wallet")
        page = await payments.statement(conn, wallet_id, cursor=cursor, limit=limit)
    return StatementOut(wallet_id, view.account.currency, page.entries, page.next_cursor)


@post("/wallets/{wallet_id:uuid}/deposits", summary="Add money through the payment gateway",
      description="201 when the gateway settled at once, 202 while it settles by webhook; 402 when declined.")
async def create_deposit(request: Request[Any, Any, Any], wallet_id: UUID, data: DepositIn,
                         resources: Resources) -> Response[bytes]:
    user = _user(request)
    await _strict_amount(request)
    pool = await resources.pool("payments")
    gateway = gateway_of(request.app.state)

    async def work(effect_id: UUID) -> tuple[int, DepositOut]:
        deposit = await payments.deposit_via_gateway(
            pool, gateway, deposit_id=effect_id, owner_id=user.id, wallet_id=wallet_id,
            amount_minor=data.amount_minor, currency=data.currency, payment_method=data.payment_method)
        return (201 if deposit.status == "succeeded" else 202), _deposit_out(deposit)

    return await idempotent(request, pool, owner_id=user.id, table=IDEMPOTENCY_TABLE, work=work)


# ----------------------------------------------------------------------------- payments

def _payment_context(request: Request[Any, Any, Any]) -> payments.PaymentContext:
    """Device, address and country for the fraud step; a malformed header is a 422."""
    context = payments.PaymentContext(device_id=request.headers.get("x-device-id", "").strip(),
                                      ip=client_ip(request, request.app.state.settings),
                                      country=request.headers.get("x-country", "").strip().upper())
    try:
        return context.check()
    except payments.PaymentsError as exc:
        raise Problem(422, "validation-error", exc.detail,
                      errors=[{"field": "X-Device-Id" if exc.field == "device_id" else "X-Country",
                               "message": exc.detail, "source": "header"}]) from exc


@post("/payments", status_code=202, summary="Pay from your wallet to another wallet (the saga runs after 202)",
      description="202 with the payment's id and status (funds_reserved, or failed for insufficient funds); "
                  "follow it with GET /payments/{id} or WS /ws/payments. Optional headers X-Device-Id and "
                  "X-Country (ISO 3166 alpha-2) inform the fraud step.")
async def create_payment(request: Request[Any, Any, Any], data: PaymentIn, resources: Resources) -> Response[bytes]:
    user = _user(request)
    await _strict_amount(request)
    context = _payment_context(request)
    pool = await resources.pool("payments")

    intake = _intake_of(request.app.state, pool)

    async def work(effect_id: UUID) -> tuple[int, PaymentAccepted]:
        asked = payments.PaymentRequest(payment_id=effect_id, payer_id=user.id, from_account_id=data.from_wallet,
                                        to_account_id=data.to_wallet, amount_minor=data.amount_minor,
                                        currency=data.currency, description=data.description, context=context)
        async with pool.acquire() as conn:
            await payments.check_payment_request(conn, asked)  # precise problems before batching
        result = await intake.submit(asked)  # one transaction for every request arriving meanwhile
        payments.raise_rejection(result)
        return 202, PaymentAccepted(result.payment_id, result.status)

    return await idempotent(request, pool, owner_id=user.id, table=IDEMPOTENCY_TABLE, work=work)


def _intake_of(state: State, pool: Any) -> payments.PaymentIntake:
    """The app's group-commit intake for payment requests (services.payments.PaymentIntake)."""
    intake = getattr(state, "payment_intake", None)
    if intake is None or intake.pool is not pool:
        intake = payments.PaymentIntake(pool)
        state.payment_intake = intake
    return intake


@get("/payments/{payment_id:uuid}", summary="A payment: status, history of saga steps, failure reason",
     description="The payer or staff; anyone else gets 404.")
async def get_payment(request: Request[Any, Any, Any], payment_id: UUID, resources: Resources) -> PaymentOut:
    user = _user(request)
    async with (await resources.pool("payments")).acquire() as conn:
        payment = await db.get_payment(conn, payment_id)
    if payment is None:
        raise Problem(404, "not-found", "Payment not found.")
    ensure_owner_or_staff(user, payment.payer_id, what="Payment")
    return _payment_out(payment)


@websocket("/ws/payments")
async def payment_updates(socket: WebSocket[Any, Any, Any], channels: ChannelsPlugin) -> None:
    """Status changes of the user's own payments as JSON text frames: first
    {"type": "subscribed"} once the subscription is live, then one {"type": "payment.status",
    payment_id, status, failure_reason, amount_minor, currency, from_wallet, to_wallet, ts_ms}
    per saga step."""
    user = await authenticate_websocket(socket)
    await socket.accept()
    async with channels.start_subscription([user_channel(user.id)]) as subscriber:
        await socket.send_text('{"type":"subscribed"}')
        sender = asyncio.create_task(_forward(socket, subscriber))
        receiver = asyncio.create_task(_until_disconnect(socket))
        try:
            done, _ = await asyncio.wait({sender, receiver}, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task.exception() is not None:
                    log.warning("payments WebSocket ended by an error: %r", task.exception())
        finally:
            for task in (sender, receiver):
                task.cancel()
            await asyncio.gather(sender, receiver, return_exceptions=True)


async def _forward(socket: WebSocket[Any, Any, Any], subscriber: Any) -> None:
    async for message in subscriber.iter_events():
        await socket.send_text(message.decode() if isinstance(message, bytes) else message)
        if subscriber.qsize > WS_MAX_BACKLOG:
            log.info("slow payments WebSocket closed: %d messages behind", subscriber.qsize)
            await socket.close(code=WS_TRY_AGAIN_LATER, reason="too far behind; read GET /api/v1/payments/{id}")
            return


async def _until_disconnect(socket: WebSocket[Any, Any, Any]) -> None:
    try:
        while True:
            await socket.receive_data(mode="text")  # clients say nothing; this notices them leave
    except WebSocketDisconnect:
        return


# ------------------------------------------------------------------------------ refunds

@post("/payments/{payment_id:uuid}/refunds", summary="Refund a captured payment, fully or in part",
      description="The payee or support/admin; Σ refunds never exceeds the captured amount.")
async def refund_payment(request: Request[Any, Any, Any], payment_id: UUID, resources: Resources,
                         data: RefundIn | None = None) -> Response[bytes]:
    user = _user(request)
    await _strict_amount(request)
    body = data or RefundIn()
    pool = await resources.pool("payments")
    async with pool.acquire() as conn:
        payment = await payments.get_payment(conn, payment_id)
        payee = await db.get_account(conn, payment.to_account_id)
    assert payee is not None and payee.owner_id is not None
    if user.id != payee.owner_id and not _can_move_money_for_others(user):
        if user.id == payment.payer_id:
            raise Problem(403, "forbidden", "Refunds are issued by the payee or by support.")
        raise Problem(404, "not-found", "Payment not found.")

    async def work(effect_id: UUID) -> tuple[int, RefundOut]:
        async with pool.acquire() as conn:
            refund = await payments.refund_payment(conn, refund_id=effect_id, payment_id=payment_id,
                                                   requested_by=user.id, amount_minor=body.amount_minor,
                                                   reason=body.reason)
        return 201, RefundOut(refund.id, refund.payment_id, refund.amount_minor, refund.currency, refund.reason,
                              refund.transaction_id, refund.created_at)

    return await idempotent(request, pool, owner_id=user.id, table=IDEMPOTENCY_TABLE, work=work)


# ------------------------------------------------------------------------------ payouts

@post("/payouts", summary="Pay out from a wallet to an external bank account through the gateway")
async def create_payout(request: Request[Any, Any, Any], data: PayoutIn, resources: Resources) -> Response[bytes]:
    user = _user(request)
    await _strict_amount(request)
    pool = await resources.pool("payments")
    gateway = gateway_of(request.app.state)

    async def work(effect_id: UUID) -> tuple[int, PayoutOut]:
        payout = await payments.payout_via_gateway(
            pool, gateway, payout_id=effect_id, owner_id=user.id, wallet_id=data.wallet_id,
            amount_minor=data.amount_minor, currency=data.currency, destination=data.destination)
        return (202 if payout.status == "pending" else 201), _payout_out(payout)

    return await idempotent(request, pool, owner_id=user.id, table=IDEMPOTENCY_TABLE, work=work)


# ------------------------------------------------------------------------------- escrow

@post("/escrow", summary="Hold money in escrow until released to the payee or refunded")
async def create_escrow(request: Request[Any, Any, Any], data: EscrowIn, resources: Resources) -> Response[bytes]:
    user = _user(request)
    await _strict_amount(request)
    pool = await resources.pool("payments")

    async def work(effect_id: UUID) -> tuple[int, EscrowOut]:
        async with pool.acquire() as conn:
            escrow = await payments.hold_escrow(
                conn, escrow_id=effect_id, payer_id=user.id, from_account_id=data.from_wallet,
                to_account_id=data.to_wallet, amount_minor=data.amount_minor, currency=data.currency,
                release_condition=data.release_condition)
        return 201, _escrow_out(escrow)

    return await idempotent(request, pool, owner_id=user.id, table=IDEMPOTENCY_TABLE, work=work)


async def _visible_escrow(request: Request[Any, Any, Any], resources: Resources, escrow_id: UUID) -> db.Escrow:
    user = _user(request)
    async with (await resources.pool("payments")).acquire() as conn:
        escrow = await payments.get_escrow(conn, escrow_id)
    if user.id not in (escrow.payer_id, escrow.payee_id):
        ensure_owner_or_staff(user, escrow.payer_id, what="Escrow")
    return escrow


@get("/escrow/{escrow_id:uuid}", summary="An escrow (payer, payee or staff)")
async def get_escrow(request: Request[Any, Any, Any], escrow_id: UUID, resources: Resources) -> EscrowOut:
    return _escrow_out(await _visible_escrow(request, resources, escrow_id))


async def _resolve_escrow(request: Request[Any, Any, Any], resources: Resources, escrow_id: UUID,
                          action: str) -> Response[bytes]:
    user = _user(request)
    escrow = await _visible_escrow(request, resources, escrow_id)
    # The payer releases (the condition is met for them); the payee refunds (gives up).
    allowed = escrow.payer_id if action == "release" else escrow.payee_id
    if user.id != allowed and not _can_move_money_for_others(user):
        raise Problem(403, "forbidden", f"Only the {'payer' if action == 'release' else 'payee'} or support can {action} this escrow.")
    pool = await resources.pool("payments")
    resolve = payments.release_escrow if action == "release" else payments.refund_escrow

    async def work(_: UUID) -> tuple[int, EscrowOut]:
        async with pool.acquire() as conn:
            return 200, _escrow_out(await resolve(conn, escrow_id, actor_id=user.id))

    return await idempotent(request, pool, owner_id=user.id, table=IDEMPOTENCY_TABLE, work=work)


@post("/escrow/{escrow_id:uuid}/release", summary="Release escrowed money to the payee (payer or support)")
async def release_escrow(request: Request[Any, Any, Any], escrow_id: UUID, resources: Resources) -> Response[bytes]:
    return await _resolve_escrow(request, resources, escrow_id, "release")


@post("/escrow/{escrow_id:uuid}/refund", summary="Return escrowed money to the payer (payee or support)")
async def refund_escrow(request: Request[Any, Any, Any], escrow_id: UUID, resources: Resources) -> Response[bytes]:
    return await _resolve_escrow(request, resources, escrow_id, "refund")


# ------------------------------------------------------------------------------- ledger

@get("/ledger/trial-balance", guards=[requires_roles("auditor")],
     summary="Σ debits and Σ credits per currency over the journal (auditor, admin)")
async def trial_balance(resources: Resources) -> TrialBalanceOut:
    async with (await resources.pool("payments")).acquire() as conn:
        lines = await payments.trial_balance(conn)
    out = [TrialBalanceLineOut(x.currency, x.debits_minor, x.credits_minor, x.transactions, x.balanced) for x in lines]
    return TrialBalanceOut(all(x.balanced for x in out), out)


@post("/gateway/webhooks", exclude_from_auth=True, status_code=200,
      summary="Gateway webhooks (public; HMAC-SHA256 signed, replay-protected)")
async def gateway_webhook(request: Request[Any, Any, Any], resources: Resources) -> WebhookOut:
    gateway = gateway_of(request.app.state)
    body = await request.body()
    try:
        event = gateway.verify_webhook(dict(request.headers), body)
    except WebhookError as exc:
        raise Problem(400, f"webhook-{exc.reason.replace('_', '-')}", str(exc)) from exc
    async with (await resources.pool("payments")).acquire() as conn:
        return WebhookOut(await payments.apply_gateway_event(conn, gateway.name, event))


rest = Router(
    path="/api/v1",
    route_handlers=[open_wallet, get_wallet, wallet_statement, create_deposit, create_payment, get_payment,
                    refund_payment, create_payout, create_escrow, get_escrow, release_escrow, refund_escrow,
                    trial_balance, gateway_webhook],
    tags=["payments"],
    exception_handlers={payments.PaymentsError: _payments_error, GatewayError: _gateway_error},  # type: ignore[dict-item]
)
router = Router(path="/", route_handlers=[rest, payment_updates])
