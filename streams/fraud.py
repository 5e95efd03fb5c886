"""Fraud events and topics: the payment saga's risk step and the scorer's answers.

* `fraud.requests`: `ScoreRequested`, one per payment the saga wants scored, keyed by
  the payer wallet (so one wallet's payments are scored in order, by one worker).
* `fraud.decisions`: `RiskDecided`, keyed by the payer wallet: the scorer's answer
  (`source="model"`) or an analyst's review decision (`source="review"`, allow|block).
* `fraud.by_payee`: `PayeeBatch`, the scorer's internal repartition: payments whose payer
  features are computed, grouped by the partition of their *payee* wallet, so the payee's
  fan-in state (kept on the payee key) is updated by the worker that owns it. One message
  carries many payments (columns, like `market.ticks`), so the second stage costs one
  Faust message per batch rather than per payment.
* `fraud.alerts`: `FraudAlert` for every review or block, keyed by the payer wallet; the
  worker stores them and fans them out to `WS /ws/fraud/alerts`.

The saga (agents/payments.py) publishes requests and consumes decisions; the scorer
(agents/fraud.py) does the reverse. docs/FRAUD.md describes the whole pipeline.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec
import numpy as np
from aiokafka.partitioner import murmur2

from streams.events import Event
from streams.topics import TopicSpec, register

# A PayeeBatch holds at most this many payments (~1.2 MB of JSON would exceed Kafka's
# default 1 MiB message size at about 4,000).
MAX_PAYEE_BATCH = 2_048
I64 = np.dtype("<i8")
F64 = np.dtype("<f8")


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
    # Added for analysts and the review queue (optional: the pass-through scorer leaves
    # them empty). A review decision names its review, the analyst and their note.
    payer_user_id: str = ""
    payee_wallet_id: str = ""
    amount_minor: int = 0
    currency: str = ""
    review_id: str = ""
    reviewer_id: str = ""
    note: str = ""


class FraudAlert(Event, tag="fraud.alert", kw_only=True, frozen=True):
    """A payment the scorer sent to review or blocked, for analysts."""

    payment_id: str
    payer_wallet_id: str
    payer_user_id: str
    payee_wallet_id: str
    amount_minor: int
    currency: str
    score: int
    decision: str
    severity: Literal["medium", "high"]  # review, block
    rules_fired: list[str] = []
    top_features: list[FeatureContribution] = []
    model_version: str = ""


class PayeeBatch(Event, tag="fraud.payee_batch", kw_only=True, frozen=True):
    """Payments of one payee partition with their payer features (internal to the scorer).

    Identity columns are string lists; numbers are little-endian column bytes
    (`columns()`), decoded to numpy without per-payment Python."""

    partition: int
    count: int
    request_ids: list[str]
    payment_ids: list[str]
    payer_wallet_ids: list[str]
    payer_user_ids: list[str]
    payee_wallet_ids: list[str]
    currencies: list[str]
    time_ms: bytes  # int64[count]: the requests' event times
    amount_minor: bytes  # int64[count]
    payer_features: bytes  # float64[count * n_features], row-major
    n_features: int

    @property
    def key(self) -> str:
        return self.payee_wallet_ids[0]

    def columns(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(time_ms, amount_minor, payer_features[count, n_features]), validated."""
        n = self.count
        if not 1 <= n <= MAX_PAYEE_BATCH or self.n_features < 1:
            raise ValueError(f"payee batch of {n} payments x {self.n_features} features")
        for name in ("request_ids", "payment_ids", "payer_wallet_ids", "payer_user_ids",
                     "payee_wallet_ids", "currencies"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries, expected {n}")
        ts = _column(self.time_ms, I64, n, "time_ms")
        amount = _column(self.amount_minor, I64, n, "amount_minor")
        features = _column(self.payer_features, F64, n * self.n_features, "payer_features")
        return ts, amount, features.reshape(n, self.n_features)


def _column(raw: bytes, dtype: np.dtype, n: int, name: str) -> np.ndarray:
    if len(raw) != n * dtype.itemsize:
        raise ValueError(f"{name} has {len(raw)} bytes, expected {n * dtype.itemsize}")
    return np.frombuffer(raw, dtype=dtype)


def payee_batch(partition: int, reqs: list[ScoreRequested], features: np.ndarray) -> PayeeBatch:
    """A PayeeBatch of requests and their payer feature rows (same order)."""
    n = len(reqs)
    assert 1 <= n <= MAX_PAYEE_BATCH and features.shape[0] == n, (n, features.shape)
    return PayeeBatch(
        partition=partition, count=n, request_ids=[r.id for r in reqs], payment_ids=[r.payment_id for r in reqs],
        payer_wallet_ids=[r.payer_wallet_id for r in reqs], payer_user_ids=[r.payer_user_id for r in reqs],
        payee_wallet_ids=[r.payee_wallet_id for r in reqs], currencies=[r.currency for r in reqs],
        time_ms=np.array([r.ts_ms for r in reqs], dtype=I64).tobytes(),
        amount_minor=np.array([r.amount_minor for r in reqs], dtype=I64).tobytes(),
        payer_features=np.ascontiguousarray(features, dtype=F64).tobytes(), n_features=int(features.shape[1]))


def alerts_channel(settings: Any) -> str:
    """The Redis pub/sub channel alerts are fanned out on (the API's channels plugin
    subscribes to it); it carries the topic prefix, since pub/sub channels are shared by
    every Redis database."""
    return settings.topic_prefix + "fraud.alerts"


def partition_for_key(key: str, n_partitions: int) -> int:
    """Kafka's default partition for `key` (murmur2, as aiokafka and the Java client):
    where a message keyed `key` lands, and where the table router looks for `key`."""
    assert n_partitions >= 1, n_partitions
    return (murmur2(key.encode("utf-8")) & 0x7FFFFFFF) % n_partitions


REQUESTS: TopicSpec[ScoreRequested] = register(TopicSpec(
    "fraud.requests", ScoreRequested, key_field="payer_wallet_id",
    doc="payments to score (the saga's risk step), keyed by payer wallet"))

DECISIONS: TopicSpec[RiskDecided] = register(TopicSpec(
    "fraud.decisions", RiskDecided, key_field="payer_wallet_id",
    doc="risk decisions (model or analyst review), keyed by payer wallet"))

BY_PAYEE: TopicSpec[PayeeBatch] = register(TopicSpec(
    "fraud.by_payee", PayeeBatch, key_field=None,
    doc="payer-scored payments grouped by payee partition (sent to that partition, keyed "
        "by the first payee: every payee in a batch hashes there)"))

ALERTS: TopicSpec[FraudAlert] = register(TopicSpec(
    "fraud.alerts", FraudAlert, key_field="payer_wallet_id",
    doc="reviews and blocks for analysts, keyed by payer wallet"))
