"""Fraud scoring: the pipeline shared by the worker's agents, the simulator and the
benchmarks, and the model it loads.

    payer stage   rows[payer] --payer_update--> payer features      (agents: key = payer wallet)
    payee stage   rows[payee] --payee_update--> payee features      (agents: key = payee wallet)
    decision      X = [payer | payee | score] --score_batch--> score, rules fired, decision

The agents (agents/fraud.py) gather the rows of a batch's keys from RocksDB tables, call
these functions once per batch and write the rows back; the simulator (ops/simulate.py)
calls the same functions over whole arrays. Either way the same kernels compute every
number. docs/FRAUD.md describes the features, the model and the rules.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from indicators import fraud_features as ff
from indicators import risk_model as rm
from services.fraud_rules import Rule, RuleSet, compile_rules

if TYPE_CHECKING:
    from db.fraud import ReviewRow
from streams.fraud import FeatureContribution, RiskDecided, ScoreRequested

WEIGHTS_PATH = Path(__file__).resolve().parents[1] / "ops" / "models" / "fraud_weights.json"
_HASH_MASK = (1 << 52) - 1
TRANSFORMS = {"identity": rm.T_IDENTITY, "log1p": rm.T_LOG1P, "clip": rm.T_CLIP}

# The rules the fraud migration seeds (db/migrations/fraud/0001_fraud.sql; a unit test
# checks they agree). Admins change them at runtime through the API.
DEFAULT_RULES: tuple[Rule, ...] = (
    Rule("card-testing", "small_then_large >= 3", "block", 10,
         description="three or more small payments within the hour, then a large one"),
    Rule("failed-attempts-burst", "failed_1h >= 8", "block", 20,
         description="eight or more failed attempts within the hour"),
    Rule("mule-fan-in", "payee_fanin_1h >= 8 and new_payee", "review", 10,
         description="first payment to a wallet that eight or more payers paid within the hour"),
    Rule("takeover-burst", "new_device and new_ip and payer_count_1h >= 3 and amount_z > 1", "review", 20,
         description="several payments within the hour from a new device and IP, above the usual amount"),
)


def stable_hash(text: str) -> int:
    """A 52-bit hash of `text` (exact in a float64 state slot), stable across processes
    (Python's hash() is salted per process); 0 for the empty string ("no value")."""
    if not text:
        return 0
    value = int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little") & _HASH_MASK
    return value or 1


# ----------------------------------------------------------------------------- the model

@dataclass(frozen=True)
class Model:
    """Logistic-regression weights over FEATURES columns (0 for columns not used)."""

    version: str
    features: tuple[str, ...]
    transform: np.ndarray  # int64 [N_FEATURES]
    mean: np.ndarray  # float64 [N_FEATURES]
    std: np.ndarray  # float64 [N_FEATURES]
    weights: np.ndarray  # float64 [N_FEATURES]
    bias: float
    review_at: int
    block_at: int

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Model:
        spec = data["model"]
        names = tuple(spec["features"])
        unknown = [n for n in names if n not in rm.FEATURE_INDEX or n == "score"]
        assert not unknown, f"model features not in the feature set: {unknown}"
        assert len(set(names)) == len(names), "duplicate model features"
        transform = np.zeros(rm.N_FEATURES, dtype=np.int64)
        mean = np.zeros(rm.N_FEATURES)
        std = np.ones(rm.N_FEATURES)
        weights = np.zeros(rm.N_FEATURES)
        for k, name in enumerate(names):
            j = rm.FEATURE_INDEX[name]
            transform[j] = TRANSFORMS[spec["transform"][k]]
            mean[j] = float(spec["mean"][k])
            std[j] = float(spec["std"][k])
            weights[j] = float(spec["weights"][k])
            assert std[j] > 0 and np.isfinite([mean[j], std[j], weights[j]]).all(), name
        review_at, block_at = int(data["thresholds"]["review"]), int(data["thresholds"]["block"])
        assert 0 < review_at <= block_at <= 100, (review_at, block_at)
        return cls(version=str(data["version"]), features=names, transform=transform, mean=mean, std=std,
                   weights=weights, bias=float(spec["bias"]), review_at=review_at, block_at=block_at)


def load_model(path: Path = WEIGHTS_PATH) -> Model:
    return Model.from_dict(json.loads(Path(path).read_text()))


# ----------------------------------------------------------------------------- payer stage

@dataclass(frozen=True)
class PayerColumns:
    """The payer kernel's inputs for a batch of requests (arrays, same order)."""

    ts_ms: np.ndarray
    amount: np.ndarray
    failed: np.ndarray
    payee_h: np.ndarray
    device_h: np.ndarray
    ip_h: np.ndarray
    country_h: np.ndarray
    payment_h: np.ndarray


def payer_columns(requests: Sequence[ScoreRequested]) -> PayerColumns:
    n = len(requests)
    ts = np.empty(n, dtype=np.int64)
    amount = np.empty(n, dtype=np.int64)
    failed = np.empty(n, dtype=np.int64)
    hashes = np.empty((5, n), dtype=np.int64)
    for i, r in enumerate(requests):
        ts[i], amount[i], failed[i] = r.ts_ms, r.amount_minor, r.failed_attempts
        hashes[0, i] = stable_hash(r.payee_wallet_id)
        hashes[1, i] = stable_hash(r.device_id)
        hashes[2, i] = stable_hash(r.ip)
        hashes[3, i] = stable_hash(r.country)
        hashes[4, i] = stable_hash(r.payment_id)
    return PayerColumns(ts, amount, failed, *hashes)


def check_request(r: ScoreRequested) -> str | None:
    """Why the scorer cannot use a request (it is dead-lettered), or None."""
    if r.amount_minor <= 0:
        return "amount_minor must be positive"
    if r.failed_attempts < 0:
        return "failed_attempts must not be negative"
    if not r.payment_id or not r.payer_wallet_id or not r.payee_wallet_id:
        return "payment_id, payer_wallet_id and payee_wallet_id are required"
    return None


def run_payer(rows: np.ndarray, row_idx: np.ndarray, cols: PayerColumns) -> tuple[np.ndarray, np.ndarray]:
    """Payer features [n, N_PAYER_FEATURES] and the redelivery flags; rows updated in place."""
    n = row_idx.shape[0]
    assert rows.shape[1] == ff.PAYER_WIDTH and cols.ts_ms.shape == (n,)
    assert n == 0 or (0 <= row_idx.min() and row_idx.max() < rows.shape[0])
    assert n == 0 or cols.amount.min() > 0, "amounts must be positive (checked at the boundary)"
    out = np.empty((n, ff.N_PAYER_FEATURES))
    dup = np.zeros(n, dtype=np.bool_)
    ff.payer_update(rows, row_idx, cols.ts_ms, cols.amount, cols.failed, cols.payee_h, cols.device_h,
                    cols.ip_h, cols.country_h, cols.payment_h, out, dup)
    return out, dup


# ----------------------------------------------------------------------------- payee stage

def run_payee(rows: np.ndarray, row_idx: np.ndarray, ts_ms: np.ndarray, amount: np.ndarray,
              payer_h: np.ndarray, payment_h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Payee features [n, N_PAYEE_FEATURES] and the redelivery flags; rows updated in place."""
    n = row_idx.shape[0]
    assert rows.shape[1] == ff.PAYEE_WIDTH and ts_ms.shape == amount.shape == payer_h.shape == (n,)
    assert n == 0 or (0 <= row_idx.min() and row_idx.max() < rows.shape[0])
    out = np.empty((n, ff.N_PAYEE_FEATURES))
    dup = np.zeros(n, dtype=np.bool_)
    ff.payee_update(rows, row_idx, ts_ms, amount, payer_h, payment_h, out, dup)
    return out, dup


# ----------------------------------------------------------------------------- decision

@dataclass(frozen=True)
class Scored:
    x: np.ndarray  # [n, N_FEATURES], the score column filled
    scores: np.ndarray  # int64 [n]
    decisions: np.ndarray  # int64 [n]: rm.ALLOW / REVIEW / BLOCK
    fired: np.ndarray  # bool [n, n_rules]
    top: np.ndarray  # int64 [n, TOP_K]: feature columns, -1 when fewer
    contrib: np.ndarray  # float64 [n, N_FEATURES]


def feature_matrix(payer: np.ndarray, payee: np.ndarray) -> np.ndarray:
    n = payer.shape[0]
    assert payer.shape == (n, ff.N_PAYER_FEATURES) and payee.shape == (n, ff.N_PAYEE_FEATURES)
    x = np.empty((n, rm.N_FEATURES))
    x[:, :rm.PAYEE_COL] = payer
    x[:, rm.PAYEE_COL:rm.SCORE_COL] = payee
    x[:, rm.SCORE_COL] = 0.0
    return x


def decide(x: np.ndarray, model: Model, rules: RuleSet) -> Scored:
    """One Numba call: model score, every rule, the decision, for every row of x."""
    n = x.shape[0]
    assert x.shape == (n, rm.N_FEATURES) and x.flags.c_contiguous
    r = rules.lens.shape[0]
    scores = np.empty(n, dtype=np.int64)
    decisions = np.empty(n, dtype=np.int64)
    fired = np.zeros((n, r), dtype=np.bool_)
    top = np.empty((n, rm.TOP_K), dtype=np.int64)
    contrib = np.empty((n, rm.N_FEATURES))
    rm.score_batch(x, model.transform, model.mean, model.std, model.weights, model.bias, rules.ops, rules.args,
                   rules.lens, rules.actions, model.review_at, model.block_at, scores, contrib, top, fired,
                   decisions)
    assert n == 0 or (0 <= scores.min() and scores.max() <= 100)
    return Scored(x=x, scores=scores, decisions=decisions, fired=fired, top=top, contrib=contrib)


def top_features(scored: Scored, i: int) -> list[FeatureContribution]:
    return [FeatureContribution(rm.FEATURES[j], float(scored.x[i, j]), round(float(scored.contrib[i, j]), 4))
            for j in scored.top[i] if j >= 0]


def rules_fired(scored: Scored, i: int, rules: RuleSet) -> list[str]:
    return [rules.rules[r].id for r in np.flatnonzero(scored.fired[i])]


# ----------------------------------------------------------------------------- whole arrays

@dataclass(frozen=True)
class Traffic:
    """Payments as columns, in event order (the simulator's output; also a test fixture).
    `payer` and `payee` are dense wallet numbers (row indexes), `payer_h` / `payee_h`
    their stable hashes."""

    payer: np.ndarray
    payee: np.ndarray
    ts_ms: np.ndarray
    amount: np.ndarray
    failed: np.ndarray
    payer_h: np.ndarray
    payee_h: np.ndarray
    device_h: np.ndarray
    ip_h: np.ndarray
    country_h: np.ndarray
    payment_h: np.ndarray

    def __len__(self) -> int:
        return int(self.ts_ms.shape[0])


def traffic_features(traffic: Traffic, n_wallets: int) -> np.ndarray:
    """Every payment's feature matrix (score column 0), through the same kernels."""
    cols = PayerColumns(traffic.ts_ms, traffic.amount, traffic.failed, traffic.payee_h, traffic.device_h,
                        traffic.ip_h, traffic.country_h, traffic.payment_h)
    payer, _ = run_payer(ff.new_payer_rows(n_wallets), traffic.payer, cols)
    payee, _ = run_payee(ff.new_payee_rows(n_wallets), traffic.payee, traffic.ts_ms, traffic.amount,
                         traffic.payer_h, traffic.payment_h)
    return feature_matrix(payer, payee)


def default_ruleset() -> RuleSet:
    return compile_rules(DEFAULT_RULES)


# ----------------------------------------------------------------------------- reviews

def review_decision_event(review: ReviewRow) -> RiskDecided:
    """The RiskDecided an analyst's decision publishes (source "review"): approve -> allow
    (the saga captures), decline -> block (the saga fails the payment, releasing the hold).
    Its id is the one stored with the decision, so a re-publish is the same event."""
    assert review.status in ("approved", "declined") and review.event_id is not None, review
    return RiskDecided(
        id=str(review.event_id), payment_id=review.payment_id, payer_wallet_id=review.payer_wallet_id,
        score=review.score, decision="allow" if review.status == "approved" else "block", source="review",
        rules_fired=list(review.rules_fired),
        top_features=[FeatureContribution(str(f["name"]), float(f["value"]), float(f["contribution"]))
                      for f in review.top_features],
        model_version=review.model_version, payer_user_id=review.payer_user_id,
        payee_wallet_id=review.payee_wallet_id, amount_minor=review.amount_minor, currency=review.currency,
        review_id=str(review.id), reviewer_id=str(review.decided_by or ""), note=review.note)
