"""Fraud scoring: the pipeline shared by the worker's agents, the simulator and the
benchmarks, and the model it loads.

    payer stage   rows[payer] --payer_update--> payer features      (agents: key = payer wallet)
    entity stage  rows[payee] --payee_update--> payee features      (agents: key = payee wallet)
                  rows[user|device|ip] --entity_update--> user / device / IP features
                                                                    (keys "user:<id>", ...)
    decision      X = [payer | payee | user | device | ip | score]
                      --score_batch--> score, rules fired, decision

The agents (agents/fraud.py) gather the rows of a batch's keys from RocksDB tables, call
these functions once per batch and write the rows back; the simulator (ops/simulate.py)
calls the same functions over whole arrays. Either way the same kernels compute every
number. docs/FRAUD.md describes the features, the model and the rules.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from aiokafka.errors import KafkaError

from indicators import fraud_features as ff
from indicators import risk_model as rm
from services.fraud_rules import Rule, RuleSet, compile_rules

if TYPE_CHECKING:
    from db.fraud import ReviewRow
from streams.fraud import FeatureContribution, RiskDecided, ScoreRequested

log = logging.getLogger("fintide.services.fraud")
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


def run_entity(rows: np.ndarray, row_idx: np.ndarray, ts_ms: np.ndarray, amount: np.ndarray, failed: np.ndarray,
               other_h: np.ndarray, payment_h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """User / device / IP features [n, N_ENTITY_FEATURES] and the redelivery flags; rows
    updated in place. `other_h`: the payer wallet (user rows) or the user (device, IP rows)."""
    n = row_idx.shape[0]
    assert rows.shape[1] == ff.ENTITY_WIDTH
    assert ts_ms.shape == amount.shape == failed.shape == other_h.shape == payment_h.shape == (n,)
    assert n == 0 or (0 <= row_idx.min() and row_idx.max() < rows.shape[0])
    out = np.empty((n, ff.N_ENTITY_FEATURES))
    dup = np.zeros(n, dtype=np.bool_)
    ff.entity_update(rows, row_idx, ts_ms, amount, failed, other_h, payment_h, out, dup)
    return out, dup


def feature_matrix(payer: np.ndarray, payee: np.ndarray, entity: np.ndarray | None = None) -> np.ndarray:
    """X for scoring. `entity` [n, 3 * N_ENTITY_FEATURES] holds the user, device and IP
    blocks; None (a payment without them) reads 0 for each."""
    n = payer.shape[0]
    assert payer.shape == (n, ff.N_PAYER_FEATURES) and payee.shape == (n, ff.N_PAYEE_FEATURES)
    x = np.zeros((n, rm.N_FEATURES))
    x[:, :rm.PAYEE_COL] = payer
    x[:, rm.PAYEE_COL:rm.ENTITY_COL] = payee
    if entity is not None:
        assert entity.shape == (n, rm.SCORE_COL - rm.ENTITY_COL), entity.shape
        x[:, rm.ENTITY_COL:rm.SCORE_COL] = entity
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
    user: np.ndarray
    device: np.ndarray
    ip: np.ndarray
    user_h: np.ndarray

    def __len__(self) -> int:
        return int(self.ts_ms.shape[0])


def traffic_features(traffic: Traffic, n_wallets: int) -> np.ndarray:
    """Every payment's feature matrix (score column 0), through the same kernels."""
    cols = PayerColumns(traffic.ts_ms, traffic.amount, traffic.failed, traffic.payee_h, traffic.device_h,
                        traffic.ip_h, traffic.country_h, traffic.payment_h)
    payer, _ = run_payer(ff.new_payer_rows(n_wallets), traffic.payer, cols)
    payee, _ = run_payee(ff.new_payee_rows(n_wallets), traffic.payee, traffic.ts_ms, traffic.amount,
                         traffic.payer_h, traffic.payment_h)
    entity = np.zeros((len(traffic), 3 * ff.N_ENTITY_FEATURES))
    # Rows of different keys are independent, so each kind can run over the whole traffic.
    for k, (index, other_h) in enumerate(((traffic.user, traffic.payer_h), (traffic.device, traffic.user_h),
                                          (traffic.ip, traffic.user_h))):
        present = np.flatnonzero(index >= 0)
        if present.size == 0:
            continue
        out, _ = run_entity(ff.new_entity_rows(int(index.max()) + 1), index[present], traffic.ts_ms[present],
                            traffic.amount[present], traffic.failed[present], other_h[present],
                            traffic.payment_h[present])
        entity[present, k * ff.N_ENTITY_FEATURES:(k + 1) * ff.N_ENTITY_FEATURES] = out
    return feature_matrix(payer, payee, entity)


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


# ----------------------------------------------------------------------------- API operations

REVIEW_STATUS = {"approve": "approved", "decline": "declined"}
PUBLISH_TIMEOUT_S = 5.0


async def decide_review(pool: Any, publisher: Any, review_id: Any, decision: str, note: str,
                        by: Any) -> tuple[ReviewRow | None, bool]:
    """Resolve an open review and publish its RiskDecided for the saga.

    The decision commits first (with the id its event will carry); the event is then
    published and the review marked published. If Kafka is unreachable the decision
    stands and the worker's review relay publishes it (agents/fraud.py), so an analyst's
    decision always reaches the saga, at least once, with the same event id.
    Returns (review or None when it does not exist, published now)."""
    import uuid as _uuid

    from db import fraud as db
    from streams.fraud import DECISIONS

    assert decision in REVIEW_STATUS, decision
    async with pool.acquire() as conn:
        review = await db.resolve_review(conn, review_id, REVIEW_STATUS[decision], note, by, _uuid.uuid4())
    if review is None or publisher is None:
        return review, False
    try:
        await asyncio.wait_for(publisher.publish(DECISIONS.name, None, review_decision_event(review)),
                               PUBLISH_TIMEOUT_S)
    except (OSError, asyncio.TimeoutError, KafkaError) as exc:
        log.warning("review decision not published; the relay will", extra={"review": str(review.id),
                                                                            "error": f"{type(exc).__name__}: {exc}"})
        return review, False
    await db.mark_published(pool, [review.id])
    return review, True


def worker_urls(settings: Any) -> list[str]:
    """Where the API finds fraud workers: every `<data_dir>/worker/*/web.url` a worker on
    this machine wrote (`fintide up`, tests), then the configured worker address
    (`FINTIDE_WORKER_WEB_HOST`/`_BIND` and `_PORT`: one reachable worker is enough in a
    cluster, since each routes a key's request to the worker that owns it)."""
    urls: list[str] = []
    for path in sorted(Path(settings.data_path / "worker").glob("*/web.url")):
        try:
            url = path.read_text().strip()
        except OSError:
            continue
        if url:
            urls.append(url)
    if settings.worker_web_port:
        host = settings.worker_web_host or settings.worker_web_bind
        host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        urls.append(f"http://{host}:{settings.worker_web_port}")
    return list(dict.fromkeys(urls))


class WorkersUnavailable(Exception):
    """No fraud worker answered."""


async def account_features(settings: Any, wallet_id: str, timeout_s: float = 3.0) -> dict[str, Any]:
    """The live feature rows of a wallet, as payer and as payee, from the worker that owns
    them (any worker forwards to the owner). None for a role the wallet never played."""
    import httpx

    from urllib.parse import quote

    key = quote(wallet_id, safe="")
    errors = []
    async with httpx.AsyncClient(timeout=timeout_s) as client:
        for url in worker_urls(settings):
            try:
                payer, payee = await asyncio.gather(client.get(f"{url}/fraud/payers/{key}"),
                                                    client.get(f"{url}/fraud/payees/{key}"))
            except httpx.HTTPError as exc:
                errors.append(f"{url}: {type(exc).__name__}")
                continue
            if all(r.status_code in (200, 404) for r in (payer, payee)) and all(
                    r.status_code == 200 or _absent(r) for r in (payer, payee)):
                return {"wallet_id": wallet_id, "worker": url,
                        "as_payer": payer.json() if payer.status_code == 200 else None,
                        "as_payee": payee.json() if payee.status_code == 200 else None}
            errors.append(f"{url}: {payer.status_code}/{payee.status_code}")
    raise WorkersUnavailable("; ".join(errors) or "no worker address known")


async def entity_features(settings: Any, kind: str, value: str,
                          timeout_s: float = 3.0) -> tuple[str, dict[str, Any]] | None:
    """(worker url, the live row of a user, device or IP as named values) from the worker
    that owns its key, or None when the scorer never saw it."""
    import httpx

    from urllib.parse import quote

    from streams.fraud import entity_key

    assert kind in ff.ENTITY_KINDS, kind
    key = quote(entity_key(kind, value), safe="")
    errors = []
    async with httpx.AsyncClient(timeout=timeout_s) as client:
        for url in worker_urls(settings):
            try:
                response = await client.get(f"{url}/fraud/entities/{key}")
            except httpx.HTTPError as exc:
                errors.append(f"{url}: {type(exc).__name__}")
                continue
            if response.status_code == 200:
                return url, response.json()
            if _absent(response):
                return None
            errors.append(f"{url}: {response.status_code}")
    raise WorkersUnavailable("; ".join(errors) or "no worker address known")


def _absent(response: Any) -> bool:
    # The routed view's own 404 (the key is not in the table), not a worker without the
    # fraud views (Faust's plain 404 page).
    try:
        body = response.json()
    except ValueError:
        return False
    return isinstance(body, dict) and "key not found" in str(body)
