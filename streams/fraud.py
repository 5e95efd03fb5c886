"""Fraud events and topics: the payment saga's risk step and the scorer's answers.

* `fraud.requests`: `ScoreRequested`, one per payment the saga wants scored, keyed by
  the payer wallet (so one wallet's payments are scored in order, by one worker).
* `fraud.decisions`: `RiskDecided`, keyed by the payer wallet: the scorer's answer
  (`source="model"`) or an analyst's review decision (`source="review"`, allow|block).
* Both take batches too, as `payments.events` does: `ScoreBatch` / `DecisionBatch` hold
  the events of payer wallets that all hash to one partition, in order, keyed by the
  first one (`batches_by_partition`). A Faust agent pays ~70-200 µs per Kafka message
  whatever it holds, and these two topics were 2 of the ~5 messages per payment
  (docs/benchmarks/payments.md). A consumer reads a batch exactly as the same events one
  by one (`requests_of`, `decisions_of`); single events are still accepted, so a producer
  that does not batch (the review relay, the API) is still right, just slower.
* `fraud.by_entity`: `EntityBatch`, the scorer's internal repartition: payments whose payer
  features are computed, sent to the partitions of their payee wallet, paying user,
  device and IP in ascending partition order, so each of those rows is updated by the
  worker that owns its key. A payment visits each distinct partition once (one hop when
  all four keys share a partition) and is decided at the last. One message carries many
  payments (columns, like `market.ticks`), so a hop costs one Faust message per batch
  and partition rather than per payment.
* `fraud.alerts`: `FraudAlert` for every review or block, keyed by the payer wallet; the
  worker stores them and fans them out to `WS /ws/fraud/alerts`.

The saga (agents/payments.py) publishes requests and consumes decisions; the scorer
(agents/fraud.py) does the reverse. docs/FRAUD.md describes the whole pipeline.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, Union

import msgspec
import numpy as np

from streams.events import Event, check_batch_size
from streams.topics import TopicSpec, partition_for_key, register

# An EntityBatch holds at most this many payments: ~1 KB of JSON each (the feature row
# is most of it), so 512 stay well under Kafka's default 1 MiB message size.
MAX_ENTITY_BATCH = 512
# A ScoreBatch / DecisionBatch holds at most this many events (~0.4 / ~0.7 KB of JSON
# each: 1,000 stay under Kafka's default 1 MiB message).
MAX_FRAUD_BATCH = 1_000
# Keys an EntityBatch routes to, in its `partitions` column's order.
ENTITY_ROUTE = ("payee", "user", "device", "ip")
N_ROUTE = len(ENTITY_ROUTE)
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


class ScoreBatch(Event, tag="fraud.score_batch", kw_only=True, frozen=True):
    """ScoreRequested of payer wallets that all hash to one partition, in order."""

    payer_wallet_id: str  # the first request's: the message key
    requests: list[ScoreRequested]

    def __post_init__(self) -> None:
        super().__post_init__()
        check_batch_size(len(self.requests), "fraud.score_batch", MAX_FRAUD_BATCH)


class DecisionBatch(Event, tag="fraud.decision_batch", kw_only=True, frozen=True):
    """RiskDecided of payer wallets that all hash to one partition, in order."""

    payer_wallet_id: str  # the first decision's: the message key
    decisions: list[RiskDecided]

    def __post_init__(self) -> None:
        super().__post_init__()
        check_batch_size(len(self.decisions), "fraud.decision_batch", MAX_FRAUD_BATCH)


RequestsValue = Union[ScoreRequested, ScoreBatch]
DecisionsValue = Union[RiskDecided, DecisionBatch]


def requests_of(value: RequestsValue) -> Sequence[ScoreRequested]:
    """The requests a `fraud.requests` message carries: a batch's, or the request itself."""
    return value.requests if isinstance(value, ScoreBatch) else (value,)


def decisions_of(value: DecisionsValue) -> Sequence[RiskDecided]:
    """The decisions a `fraud.decisions` message carries."""
    return value.decisions if isinstance(value, DecisionBatch) else (value,)


def fraud_items_of(value: RequestsValue | DecisionsValue) -> Sequence[ScoreRequested | RiskDecided]:
    """Either topic's events, batches unpacked (the payments agents' `decode_items`)."""
    if isinstance(value, ScoreBatch):
        return value.requests
    if isinstance(value, DecisionBatch):
        return value.decisions
    return (value,)


B = TypeVar("B")
W = TypeVar("W", ScoreRequested, RiskDecided)


def batches_by_partition(events: Sequence[W], n_partitions: int, make: Callable[[str, list[W]], B]) -> list[B]:
    """Events grouped by the partition of their payer wallet (order kept within each
    group), at most MAX_FRAUD_BATCH per batch; `make(first payer wallet, events)` builds
    one message, which its key (the first wallet) sends to that partition."""
    groups: dict[int, list[W]] = {}
    for event in events:
        groups.setdefault(partition_for_key(event.payer_wallet_id, n_partitions), []).append(event)
    return [make(group[lo].payer_wallet_id, group[lo:lo + MAX_FRAUD_BATCH])
            for group in groups.values() for lo in range(0, len(group), MAX_FRAUD_BATCH)]


def score_batches(requests: Sequence[ScoreRequested], n_partitions: int) -> list[ScoreBatch]:
    return batches_by_partition(requests, n_partitions,
                                lambda first, group: ScoreBatch(payer_wallet_id=first, requests=group))


def decision_batches(decisions: Sequence[RiskDecided], n_partitions: int) -> list[DecisionBatch]:
    return batches_by_partition(decisions, n_partitions,
                                lambda first, group: DecisionBatch(payer_wallet_id=first, decisions=group))


class EntityBatch(Event, tag="fraud.entity_batch", kw_only=True, frozen=True):
    """Payments on their way through the entity stage, for one partition (internal to the
    scorer). Each carries the partitions of its payee, user, device and IP keys (-1: no
    such key) and its feature row so far; the stage at a partition updates the rows of
    the keys that hash there, fills their feature columns, and forwards the payment to
    its next larger partition or, at the last, decides it.

    Identity columns are string lists; numbers are little-endian column bytes
    (`columns()`), decoded to numpy without per-payment Python."""

    partition: int
    count: int
    request_ids: list[str]
    payment_ids: list[str]
    payer_wallet_ids: list[str]
    payer_user_ids: list[str]
    payee_wallet_ids: list[str]
    device_ids: list[str]
    ips: list[str]
    currencies: list[str]
    time_ms: bytes  # int64[count]: the requests' event times
    amount_minor: bytes  # int64[count]
    failed_attempts: bytes  # int64[count]
    hashes: bytes  # int64[count * 3]: payment id, payer wallet, user (services.fraud.stable_hash)
    partitions: bytes  # int64[count * N_ROUTE]: partition of each ENTITY_ROUTE key, -1 when absent
    features: bytes  # float64[count * n_features], row-major: the feature row so far
    n_features: int

    def columns(self, n_features: int) -> EntityColumns:
        """The numeric columns, validated (`n_features`: the row width this code reads)."""
        n = self.count
        if not 1 <= n <= MAX_ENTITY_BATCH or self.n_features != n_features:
            raise ValueError(f"entity batch of {n} payments x {self.n_features} features (expected {n_features})")
        for name in ("request_ids", "payment_ids", "payer_wallet_ids", "payer_user_ids", "payee_wallet_ids",
                     "device_ids", "ips", "currencies"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries, expected {n}")
        partitions = _column(self.partitions, I64, n * N_ROUTE, "partitions").reshape(n, N_ROUTE)
        if not (partitions == self.partition).any(axis=1).all():
            raise ValueError(f"a payment of the batch has no key on partition {self.partition}")
        return EntityColumns(
            ts_ms=_column(self.time_ms, I64, n, "time_ms"), amount=_column(self.amount_minor, I64, n, "amount_minor"),
            failed=_column(self.failed_attempts, I64, n, "failed_attempts"),
            hashes=_column(self.hashes, I64, n * 3, "hashes").reshape(n, 3), partitions=partitions,
            # A copy: the stage fills the row's columns in place.
            features=_column(self.features, F64, n * n_features, "features").reshape(n, n_features).copy())


@dataclass(frozen=True)
class EntityColumns:
    ts_ms: np.ndarray
    amount: np.ndarray
    failed: np.ndarray
    hashes: np.ndarray  # [n, 3]
    partitions: np.ndarray  # [n, N_ROUTE]
    features: np.ndarray  # [n, n_features], writable


def _column(raw: bytes, dtype: np.dtype, n: int, name: str) -> np.ndarray:
    if len(raw) != n * dtype.itemsize:
        raise ValueError(f"{name} has {len(raw)} bytes, expected {n * dtype.itemsize}")
    return np.frombuffer(raw, dtype=dtype)


def entity_batch(partition: int, ids: dict[str, list[str]], ts_ms: np.ndarray, amount: np.ndarray,
                 failed: np.ndarray, hashes: np.ndarray, partitions: np.ndarray, features: np.ndarray) -> EntityBatch:
    """An EntityBatch of payments (same order in every column) for `partition`."""
    n = ts_ms.shape[0]
    assert 1 <= n <= MAX_ENTITY_BATCH and features.shape[0] == n and partitions.shape == (n, N_ROUTE), n
    assert all(len(v) == n for v in ids.values()), {k: len(v) for k, v in ids.items()}
    return EntityBatch(
        partition=partition, count=n, **ids, time_ms=np.ascontiguousarray(ts_ms, dtype=I64).tobytes(),
        amount_minor=np.ascontiguousarray(amount, dtype=I64).tobytes(),
        failed_attempts=np.ascontiguousarray(failed, dtype=I64).tobytes(),
        hashes=np.ascontiguousarray(hashes, dtype=I64).tobytes(),
        partitions=np.ascontiguousarray(partitions, dtype=I64).tobytes(),
        features=np.ascontiguousarray(features, dtype=F64).tobytes(), n_features=int(features.shape[1]))


def alerts_channel(settings: Any) -> str:
    """The Redis pub/sub channel alerts are fanned out on (the API's channels plugin
    subscribes to it); it carries the topic prefix, since pub/sub channels are shared by
    every Redis database."""
    return settings.topic_prefix + "fraud.alerts"


def entity_key(kind: str, value: str) -> str:
    """The `fraud.entity_features` key of a user, device or IP ("device:<id>"): one table
    holds the three kinds, the prefix keeps their values apart."""
    return f"{kind}:{value}"


REQUESTS: TopicSpec[RequestsValue] = register(TopicSpec(
    "fraud.requests", RequestsValue, key_field="payer_wallet_id",
    doc="payments to score (the saga's risk step), keyed by payer wallet (batches: one partition each)"))

DECISIONS: TopicSpec[DecisionsValue] = register(TopicSpec(
    "fraud.decisions", DecisionsValue, key_field="payer_wallet_id",
    doc="risk decisions (model or analyst review), keyed by payer wallet (batches: one partition each)"))

BY_ENTITY: TopicSpec[EntityBatch] = register(TopicSpec(
    "fraud.by_entity", EntityBatch, key_field=None,
    doc="payer-scored payments routed through the partitions of their payee, user, device "
        "and IP keys (sent to each partition explicitly, no key)"))

ALERTS: TopicSpec[FraudAlert] = register(TopicSpec(
    "fraud.alerts", FraudAlert, key_field="payer_wallet_id",
    doc="reviews and blocks for analysts, keyed by payer wallet"))
