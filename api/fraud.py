"""Fraud REST and WebSocket for analysts (support, auditor, admin; admins edit rules).

    GET  /api/v1/fraud/scores/{payment_id}               score, decision, rules fired, top features, review
    GET  /api/v1/fraud/accounts/{wallet_id}/features     live feature rows, from the worker owning the key
    GET  /api/v1/fraud/entities/{kind}/{id}/features     a user's, device's or IP's live row, likewise
    GET  /api/v1/fraud/reviews?status=open               the review queue (cursor pagination)
    POST /api/v1/fraud/reviews/{id}/decision             {decision: approve|decline, note} (support, admin)
    GET  /api/v1/fraud/rules, POST /rules, PUT /rules/{id}   rules (writes: admin); bad expressions -> 422
    GET  /api/v1/fraud/stats?window=24h                  decisions per bucket, false-positive rate
    WS   /ws/fraud/alerts                                reviews and blocks as they are decided

Thin handlers: parse (msgspec, strict), check roles, call db.fraud / services.fraud,
shape the answer. docs/FRAUD.md describes each endpoint.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Final
from uuid import UUID

import msgspec
from litestar import Request, Response, Router, WebSocket, get, post, put, websocket
from litestar.channels import ChannelsPlugin
from litestar.exceptions import WebSocketDisconnect
from litestar.params import Parameter
from msgspec import Meta

from api.auth import AuthUser, requires_roles
from api.idempotency import idempotent
from api.problems import Problem
from api.resources import Resources
from api.ws_auth import authenticate_websocket
from db import fraud as db
from services import fraud as service
from services.fraud_rules import ACTIONS, Rule, RuleError, compile_expression
from streams.fraud import alerts_channel

log = logging.getLogger("fintide.api.fraud")

ANALYSTS: Final = ("support", "auditor")  # admin passes every role check
DECIDERS: Final = ("support",)
IDEMPOTENCY_TABLE: Final = "fraud.idempotency_keys"
WS_PATH: Final = "/ws/fraud/alerts"
WS_FORBIDDEN: Final = 4403
WS_SLOW_CONSUMER: Final = 1008
# Alerts waiting for one WebSocket client; past this the client is closed (slow_consumer).
WS_MAX_BACKLOG: Final = 1_000
WS_SEND_TIMEOUT_S: Final = 10.0
WINDOWS: Final = {"1h": (3_600, 300), "24h": (86_400, 3_600), "7d": (7 * 86_400, 86_400),
                  "30d": (30 * 86_400, 86_400)}

RuleId = Annotated[str, Meta(pattern=r"^[a-z0-9][a-z0-9_.-]{0,63}$", description="lower-case slug")]
Expression = Annotated[str, Meta(min_length=1, max_length=500,
                                 description="Python-syntax expression over feature names (docs/FRAUD.md)",
                                 examples=["payee_fanin_1h >= 8 and new_payee"])]
Action = Annotated[str, Meta(pattern="^(allow|review|block)$")]
Priority = Annotated[int, Meta(ge=0, le=1_000_000, description="lower runs first within its action")]
Description = Annotated[str, Meta(max_length=500)]


# ------------------------------------------------------------------------------ schemas

class RuleIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    id: RuleId
    expression: Expression
    action: Action
    priority: Priority = 100
    enabled: bool = True
    description: Description = ""


class RuleUpdate(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    expression: Expression
    action: Action
    priority: Priority = 100
    enabled: bool = True
    description: Description = ""


class RuleOut(msgspec.Struct, frozen=True):
    id: str
    expression: str
    action: str
    priority: int
    enabled: bool
    description: str
    features: list[str]
    created_at: datetime
    updated_at: datetime
    updated_by: UUID | None


class RulesOut(msgspec.Struct, frozen=True):
    version: int
    rules: list[RuleOut]


class FeatureOut(msgspec.Struct, frozen=True):
    name: str
    value: float
    contribution: float


class ReviewBrief(msgspec.Struct, frozen=True):
    id: UUID
    status: str
    decided_at: datetime | None
    note: str


class ScoreOut(msgspec.Struct, frozen=True):
    payment_id: str
    score: int
    decision: str
    rules_fired: list[str]
    top_features: list[FeatureOut]
    model_version: str
    decided_at: datetime
    payer_wallet_id: str
    payee_wallet_id: str
    amount_minor: int
    currency: str
    review: ReviewBrief | None


class ReviewOut(msgspec.Struct, frozen=True):
    id: UUID
    payment_id: str
    status: str
    opened_at: datetime
    decided_at: datetime | None
    decided_by: UUID | None
    note: str
    published: bool
    score: int
    rules_fired: list[str]
    top_features: list[FeatureOut]
    model_version: str
    payer_wallet_id: str
    payee_wallet_id: str
    amount_minor: int
    currency: str


class ReviewsOut(msgspec.Struct, frozen=True):
    items: list[ReviewOut]
    next_cursor: str | None


class DecisionIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    decision: Annotated[str, Meta(pattern="^(approve|decline)$")]
    note: Annotated[str, Meta(max_length=2_000)] = ""


class BucketOut(msgspec.Struct, frozen=True):
    start: datetime
    allow: int
    review: int
    block: int


class StatsOut(msgspec.Struct, frozen=True):
    window: str
    since: datetime
    bucket_s: int
    totals: dict[str, int]
    buckets: list[BucketOut]
    reviews: dict[str, int]
    # Share of decided reviews that analysts approved: payments the scorer held that were
    # legitimate. None until a review has been decided in the window.
    false_positive_rate: float | None


class FeaturesOut(msgspec.Struct, frozen=True):
    wallet_id: str
    worker: str
    as_payer: dict[str, Any] | None
    as_payee: dict[str, Any] | None


class EntityFeaturesOut(msgspec.Struct, frozen=True):
    kind: str
    id: str
    worker: str
    features: dict[str, Any]



# ------------------------------------------------------------------------------ scores

@get("/scores/{payment_id:str}", guards=[requires_roles(*ANALYSTS)],
     summary="A payment's risk score, decision, rules fired and top features (analysts)")
async def score(payment_id: Annotated[str, Parameter(max_length=100)], resources: Resources) -> ScoreOut:
    row = await db.get_score(await resources.pool("fraud"), payment_id)
    if row is None:
        raise Problem(404, "score-not-found", f"No fraud score for payment {payment_id}.")
    review = ReviewBrief(row["review_id"], row["review_status"], row["reviewed_at"], row["review_note"]) \
        if row["review_id"] else None
    return ScoreOut(payment_id=row["payment_id"], score=row["score"], decision=row["decision"],
                    rules_fired=list(row["rules_fired"]), top_features=_features(row["top_features"]),
                    model_version=row["model_version"], decided_at=row["decided_at"],
                    payer_wallet_id=row["payer_wallet_id"], payee_wallet_id=row["payee_wallet_id"],
                    amount_minor=row["amount_minor"], currency=row["currency"], review=review)


def _features(raw: list[dict[str, Any]]) -> list[FeatureOut]:
    return [FeatureOut(str(f["name"]), float(f["value"]), float(f["contribution"])) for f in raw]


@get("/accounts/{wallet_id:str}/features", guards=[requires_roles(*ANALYSTS)],
     summary="A wallet's live fraud features (as payer and as payee), read from the owning worker")
async def account_features(wallet_id: Annotated[str, Parameter(max_length=100)],
                           resources: Resources) -> FeaturesOut:
    try:
        found = await service.account_features(resources.settings, wallet_id)
    except service.WorkersUnavailable as exc:
        raise Problem(503, "workers-unavailable", f"No fraud worker answered: {exc}",
                      headers={"Retry-After": "2"}) from None
    if found["as_payer"] is None and found["as_payee"] is None:
        raise Problem(404, "features-not-found", f"No fraud features for wallet {wallet_id}.")
    return FeaturesOut(**found)


@get("/entities/{kind:str}/{entity_id:str}/features", guards=[requires_roles(*ANALYSTS)],
     summary="A paying user's, device's or IP's live fraud features, read from the owning worker")
async def entity_features(kind: Annotated[str, Parameter(pattern=r"^(user|device|ip)$")],
                          entity_id: Annotated[str, Parameter(max_length=200)],
                          resources: Resources) -> EntityFeaturesOut:
    try:
        found = await service.entity_features(resources.settings, kind, entity_id)
    except service.WorkersUnavailable as exc:
        raise Problem(503, "workers-unavailable", f"No fraud worker answered: {exc}",
                      headers={"Retry-After": "2"}) from None
    if found is None:
        raise Problem(404, "features-not-found", f"No fraud features for {kind} {entity_id}.")
    return EntityFeaturesOut(kind=kind, id=entity_id, worker=found[0], features=found[1])


# ------------------------------------------------------------------------------ reviews

def _encode_cursor(opened_at: datetime, review_id: UUID) -> str:
    return base64.urlsafe_b64encode(f"{opened_at.isoformat()}|{review_id}".encode()).decode()


def _decode_cursor(cursor: str) -> tuple[datetime, UUID]:
    try:
        stamp, review_id = base64.urlsafe_b64decode(cursor.encode()).decode().split("|")
        return datetime.fromisoformat(stamp), UUID(review_id)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise Problem(400, "invalid-cursor", "The cursor is not one this API returned.") from None


def _review_out(r: db.ReviewRow) -> ReviewOut:
    return ReviewOut(id=r.id, payment_id=r.payment_id, status=r.status, opened_at=r.opened_at,
                     decided_at=r.decided_at, decided_by=r.decided_by, note=r.note,
                     published=r.published_at is not None, score=r.score, rules_fired=list(r.rules_fired),
                     top_features=_features(r.top_features), model_version=r.model_version,
                     payer_wallet_id=r.payer_wallet_id, payee_wallet_id=r.payee_wallet_id,
                     amount_minor=r.amount_minor, currency=r.currency)


@get("/reviews", guards=[requires_roles(*ANALYSTS)], summary="The review queue, oldest first (analysts)")
async def reviews(resources: Resources,
                  status: Annotated[str, Parameter(pattern="^(open|approved|declined)$")] = "open",
                  limit: Annotated[int, Parameter(ge=1, le=db.MAX_PAGE)] = 50,
                  cursor: Annotated[str | None, Parameter(max_length=300)] = None) -> ReviewsOut:
    after = _decode_cursor(cursor) if cursor else None
    rows = await db.list_reviews(await resources.pool("fraud"), status, limit + 1, after)
    page = rows[:limit]
    more = len(rows) > limit
    return ReviewsOut([_review_out(r) for r in page],
                      _encode_cursor(page[-1].opened_at, page[-1].id) if more and page else None)


@post("/reviews/{review_id:uuid}/decision", guards=[requires_roles(*DECIDERS)], status_code=200,
      summary="Approve (the payment completes) or decline (it fails, funds released) a review")
async def decide(request: Request[AuthUser, Any, Any], review_id: UUID, data: DecisionIn,
                 resources: Resources) -> Response[bytes]:
    pool = await resources.pool("fraud")

    async def work(_effect_id: UUID) -> tuple[int, Any]:
        try:
            review, _ = await service.decide_review(pool, resources.publisher, review_id, data.decision,
                                                    data.note, request.user.id)
        except db.ReviewConflict as exc:
            raise Problem(409, "review-already-decided", f"The review is already {exc.status}.",
                          review_status=exc.status) from None
        if review is None:
            raise Problem(404, "review-not-found", f"No review {review_id}.")
        fresh = await db.get_review(pool, review.id)  # `published` as it is now
        return 200, _review_out(fresh or review)

    return await idempotent(request, pool, owner_id=request.user.id, table=IDEMPOTENCY_TABLE, work=work,
                            required=False)


# ------------------------------------------------------------------------------ rules

def _rule_out(row: db.RuleRow) -> RuleOut:
    try:
        features = list(compile_expression(row.expression).features)
    except RuleError:
        features = []
    return RuleOut(id=row.id, expression=row.expression, action=row.action, priority=row.priority,
                   enabled=row.enabled, description=row.description, features=features,
                   created_at=row.created_at, updated_at=row.updated_at, updated_by=row.updated_by)


def _validated(rule: Rule) -> Rule:
    """422 with field errors for an expression the rule language refuses (unknown
    features are named), before anything is written."""
    assert rule.action in ACTIONS
    try:
        compile_expression(rule.expression)
    except RuleError as exc:
        error: dict[str, Any] = {"field": "expression", "message": str(exc), "source": "body"}
        if exc.unknown:
            error["unknown_features"] = list(exc.unknown)
        raise Problem(422, "invalid-rule-expression", str(exc), errors=[error]) from None
    return rule


@get("/rules", guards=[requires_roles(*ANALYSTS)], summary="Every rule and the rules version (analysts)")
async def list_rules(resources: Resources) -> RulesOut:
    async with (await resources.pool("fraud")).acquire() as conn:
        version, rows = await db.load_rules(conn)
    return RulesOut(version, [_rule_out(r) for r in rows])


@post("/rules", guards=[requires_roles("admin")], status_code=201,
      summary="Add a rule (admin); workers pick it up within a second, without a restart")
async def create_rule(request: Request[AuthUser, Any, Any], data: RuleIn, resources: Resources) -> RuleOut:
    rule = _validated(Rule(data.id, data.expression, data.action, data.priority, data.enabled, data.description))
    async with (await resources.pool("fraud")).acquire() as conn:
        row = await db.insert_rule(conn, rule, request.user.id)
    if row is None:
        raise Problem(409, "rule-exists", f"Rule {data.id} exists; PUT /api/v1/fraud/rules/{data.id} changes it.")
    return _rule_out(row)


@put("/rules/{rule_id:str}", guards=[requires_roles("admin")], summary="Replace a rule (admin)")
async def update_rule(request: Request[AuthUser, Any, Any], rule_id: Annotated[str, Parameter(max_length=64)],
                      data: RuleUpdate, resources: Resources) -> RuleOut:
    rule = _validated(Rule(rule_id, data.expression, data.action, data.priority, data.enabled, data.description))
    async with (await resources.pool("fraud")).acquire() as conn:
        row = await db.update_rule(conn, rule, request.user.id)
    if row is None:
        raise Problem(404, "rule-not-found", f"No rule {rule_id}.")
    return _rule_out(row)


# ------------------------------------------------------------------------------ stats

@get("/stats", guards=[requires_roles(*ANALYSTS)],
     summary="Decisions per time bucket and review outcomes (false-positive rate) over a window")
async def stats(resources: Resources,
                window: Annotated[str, Parameter(pattern="^(1h|24h|7d|30d)$")] = "24h") -> StatsOut:
    span_s, bucket_s = WINDOWS[window]
    since = datetime.now(UTC) - timedelta(seconds=span_s)
    found = await db.decision_stats(await resources.pool("fraud"), since, bucket_s)
    buckets = [BucketOut(b["bucket"], b["allow"], b["review"], b["block"]) for b in found["buckets"]]
    totals = {name: sum(getattr(b, name) for b in buckets) for name in ("allow", "review", "block")}
    reviews_ = {k: int(v) for k, v in found["reviews"].items()}
    decided = reviews_["approved"] + reviews_["declined"]
    return StatsOut(window=window, since=since, bucket_s=bucket_s, totals=totals, buckets=buckets,
                    reviews=reviews_,
                    false_positive_rate=round(reviews_["approved"] / decided, 4) if decided else None)


# ------------------------------------------------------------------------------ WebSocket

@websocket(WS_PATH)
async def alerts_stream(socket: WebSocket[Any, Any, Any], channels: ChannelsPlugin) -> None:
    """Every FraudAlert (JSON text frames, as the worker published them), analysts only.
    A client that lets WS_MAX_BACKLOG alerts pile up is told `slow_consumer` and closed."""
    user = await authenticate_websocket(socket)
    await socket.accept()
    if user.kind != "user" or not user.roles & {"support", "auditor", "admin"}:
        await socket.close(code=WS_FORBIDDEN, reason="forbidden: analysts only")
        return
    channel = alerts_channel(socket.app.state.settings)
    subscriber = await channels.subscribe([channel])
    sender = asyncio.create_task(_send_alerts(socket, subscriber))
    receiver = asyncio.create_task(_until_disconnect(socket))
    try:
        await asyncio.wait({sender, receiver}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (sender, receiver):
            task.cancel()
        await asyncio.gather(sender, receiver, return_exceptions=True)
        await channels.unsubscribe(subscriber, [channel])


async def _send_alerts(socket: WebSocket[Any, Any, Any], subscriber: Any) -> None:
    async for payload in subscriber.iter_events():
        if subscriber.qsize > WS_MAX_BACKLOG:  # a property
            with contextlib.suppress(Exception):
                await asyncio.wait_for(socket.send_json({"type": "error", "code": "slow_consumer"}), 1.0)
                await socket.close(code=WS_SLOW_CONSUMER, reason="slow consumer")
            return
        await asyncio.wait_for(socket.send_data(payload.decode()), WS_SEND_TIMEOUT_S)


async def _until_disconnect(socket: WebSocket[Any, Any, Any]) -> None:
    # The client only listens; reading is how its departure is noticed.
    with contextlib.suppress(WebSocketDisconnect):
        while True:
            await socket.receive_text()


rest = Router(path="/api/v1/fraud", tags=["fraud"],
              route_handlers=[score, account_features, entity_features, reviews, decide, list_rules, create_rule, update_rule,
                              stats])
router = Router(path="/", route_handlers=[rest, alerts_stream])
