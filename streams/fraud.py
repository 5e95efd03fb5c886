"""Fraud events and topics: the payment saga's risk step and the scorer's answers.

* `fraud.requests`: `ScoreRequested`, one per payment the saga wants scored, keyed by
  the payer wallet (so one wallet's payments are scored in order, by one worker).
* `fraud.decisions`: `RiskDecided`, keyed by the payer wallet: the scorer's answer
  (`source="model"`) or an analyst's review decision (`source="review"`, allow|block).

The saga (agents/payments.py) publishes requests and consumes decisions; the scorer
(agents/fraud.py) does the reverse. docs/FRAUD.md describes the whole pipeline.
"""

from __future__ import annotations

import msgspec

from streams.events import Event
from streams.topics import TopicSpec, register


class ScoreRequested(Event, tag="fraud.score_requested", kw_only=True, frozen=True):
    payment_id: str
    payer_user_id: str
    payer_wallet_id: str
    payee_wallet_id: str
    amount_minor: int
    currency: str
    device_id: str = ""
    ip: str = ""
    country: str = ""
    # Failed attempts (declined cards, wrong PINs/OTPs) the client saw before this request.
    failed_attempts: int = 0


class FeatureContribution(msgspec.Struct, frozen=True):
    name: str
    value: float
    contribution: float


class RiskDecided(Event, tag="fraud.risk_decided", kw_only=True, frozen=True):
    payment_id: str
    payer_wallet_id: str
    score: int  # 0..100
    decision: str  # "allow" | "review" | "block"
    source: str  # "model" | "review"
    rules_fired: list[str] = []
    top_features: list[FeatureContribution] = []
    model_version: str = ""


REQUESTS: TopicSpec[ScoreRequested] = register(TopicSpec(
    "fraud.requests", ScoreRequested, key_field="payer_wallet_id",
    doc="payments to score (the saga's risk step), keyed by payer wallet"))

DECISIONS: TopicSpec[RiskDecided] = register(TopicSpec(
    "fraud.decisions", RiskDecided, key_field="payer_wallet_id",
    doc="risk decisions (model or analyst review), keyed by payer wallet"))
