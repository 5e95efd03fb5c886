"""`fintide simulate payments`: labelled synthetic payment traffic with injected fraud.

    fintide simulate payments --fraud-rate 0.05 --n 20000 --seed 1             # offline report
    fintide simulate payments --n 20000 --seed 1 --online [--rate 2000]         # through Kafka
    fintide simulate payments --n 100000 --seed 7 --fit ops/models/fraud_weights.json

Normal users pay their usual contacts and merchants from their own devices, IPs and
country, with log-normal amounts, the odd new device, trip abroad, new contact, legit
large purchase and failed attempt; some share a device with another user (a household
tablet) and some payments come from shared public IPs (cafés, carrier NAT), so a device
or IP seen with several users is not by itself fraud. Four fraud patterns are injected
until they make up `--fraud-rate` of the payments (every payment of an episode is
labelled fraud):

* account takeover: a campaign from one attacker device and IP (often abroad) that takes
  over 1-3 victims' wallets in turn, minutes apart; each victim, after failed attempts,
  makes a burst of 3-8 payments within minutes to new wallets, well above their usual
  amount (the device and IP are new to each victim and shared across the accounts);
* card testing: from one device and IP, 1-3 wallets (a victim's or fresh ones) each make
  3-6 small payments within minutes, then one or two large ones;
* mule fan-in: 8-25 different payers (recruited or compromised accounts, from their
  own devices) pay one new wallet within the hour;
* amount outlier: a user pays a new wallet 15-60x their usual amount.

Offline (the default) scores the traffic through the same kernels the worker runs
(services.fraud.traffic_features + decide) and reports precision/recall of the decision
(review or block = flagged), of block alone, recall per pattern, and the ROC AUC of the
score. Online publishes one `ScoreRequested` per payment to `fraud.requests` (event
times replayed so the traffic ends now), waits for the decisions on `fraud.decisions`
and reports the same figures from what the live scorer answered (lockstep by default, so
they must equal the offline ones; `--rate` makes it a load test instead). `--fit` fits the
logistic model on the traffic (L2-regularised, Newton/IRLS in numpy, so the seed fixes
the result) and writes the weights file the worker loads.
"""

from __future__ import annotations

import argparse
import asyncio
import calendar
import hashlib
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from indicators import fraud_features as ff
from indicators import risk_model as rm
from ops.settings import Settings

GENERATOR_VERSION = 2
PATTERNS = ("normal", "account_takeover", "card_testing", "mule_fan_in", "amount_outlier")
# Share of fraud payments per pattern (in PATTERNS order, normal excluded).
PATTERN_SHARES = (0.3, 0.25, 0.25, 0.2)
COUNTRIES = ("IN", "US", "GB", "DE", "SG", "AE", "FR", "BR", "NG", "JP")
COUNTRY_WEIGHTS = (0.45, 0.15, 0.1, 0.06, 0.06, 0.05, 0.05, 0.04, 0.02, 0.02)
MAX_N = 2_000_000
DAY_MS = 86_400_000
MINUTE_MS = 60_000

# The model's inputs, their transforms (risk_model.T_*) and the fitting settings.
MODEL_FEATURES: tuple[tuple[str, str], ...] = (
    ("amount_minor", "log1p"), ("failed_attempts", "log1p"),
    ("payer_count_1m", "log1p"), ("payer_count_1h", "log1p"), ("payer_count_24h", "log1p"),
    ("payer_sum_1h", "log1p"), ("payer_sum_24h", "log1p"),
    ("small_count_1h", "log1p"), ("failed_1h", "log1p"), ("failed_24h", "log1p"),
    ("amount_z", "clip"), ("secs_since_last", "log1p"), ("payments_seen", "log1p"),
    ("new_payee", "identity"), ("new_device", "identity"), ("new_ip", "identity"), ("new_country", "identity"),
    ("small_then_large", "log1p"),
    ("payee_fanin_1h", "log1p"), ("payee_fanin_24h", "log1p"), ("payee_count_1h", "log1p"),
    # Device and IP: payments, distinct users and failed attempts from them. The user_*
    # features are left to rules: here every user has one wallet, so they repeat the payer's.
    ("device_count_1h", "log1p"), ("device_users_1h", "log1p"), ("device_users_24h", "log1p"),
    ("device_failed_1h", "log1p"), ("ip_count_1h", "log1p"), ("ip_users_1h", "log1p"),
    ("ip_users_24h", "log1p"), ("ip_failed_1h", "log1p"),
)
L2 = 1.0
# Thresholds chosen on the training traffic: block where precision reaches this.
BLOCK_PRECISION = 0.97


# ----------------------------------------------------------------------------- generator

@dataclass
class _User:
    wallet: int
    country: str
    devices: list[str]
    ips: list[str]
    contacts: list[int]
    mu: float  # ln amount
    sigma: float


@dataclass(frozen=True)
class Labelled:
    """Generated payments in event order with labels, as the kernels take them
    (`traffic`) and as strings for publishing."""

    traffic: Any  # services.fraud.Traffic
    label: np.ndarray  # bool
    pattern: np.ndarray  # int8, index into PATTERNS
    n_wallets: int
    wallet_ids: list[str]  # wallet index -> id
    payment_ids: list[str]
    devices: list[str]
    ips: list[str]
    countries: list[str]

    def __len__(self) -> int:
        return len(self.payment_ids)


class _Gen:
    """Builds raw events (ts, payer, payee, amount, failed, device, ip, country, pattern)."""

    def __init__(self, seed: int, n_users: int, span_ms: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.span_ms = span_ms
        self.events: list[tuple[int, int, int, int, int, str, str, str, int]] = []
        self.n_wallets = 0
        self.merchants = [self._wallet() for _ in range(max(5, n_users // 20))]
        self.users = [self._user() for _ in range(n_users)]
        for user in self.users:
            others = self.rng.choice(n_users, size=int(self.rng.integers(2, 10)), replace=False)
            user.contacts = [self.users[i].wallet for i in others.tolist() if self.users[i].wallet != user.wallet]
            shops = self.rng.choice(self.merchants, size=int(self.rng.integers(1, 5)), replace=False)
            user.contacts += [int(m) for m in shops]
        # Households: some users also pay from another user's device.
        for user in self.users:
            if self.rng.random() < 0.05:
                user.devices.append(self.users[int(self.rng.integers(0, n_users))].devices[0])
        self.public_ips = [f"pub-ip-{k}" for k in range(max(3, n_users // 40))]

    def _wallet(self) -> int:
        self.n_wallets += 1
        return self.n_wallets - 1

    def _user(self) -> _User:
        rng = self.rng
        wallet = self._wallet()
        country = str(rng.choice(COUNTRIES, p=COUNTRY_WEIGHTS))
        return _User(wallet=wallet, country=country,
                     devices=[f"dev-{wallet}-{k}" for k in range(int(rng.integers(1, 3)))],
                     ips=[f"ip-{wallet}-{k}" for k in range(int(rng.integers(1, 4)))], contacts=[],
                     mu=float(rng.normal(np.log(2_500), 0.8)), sigma=float(rng.uniform(0.3, 0.8)))

    def _amount(self, user: _User, factor: float = 1.0) -> int:
        return max(1, int(np.exp(self.rng.normal(user.mu, user.sigma)) * factor))

    def _add(self, ts: int, payer: int, payee: int, amount: int, failed: int, device: str, ip: str,
             country: str, pattern: int) -> None:
        self.events.append((ts, payer, payee, max(1, amount), failed, device, ip, country, pattern))

    # -- normal traffic
    def normal(self, n: int) -> None:
        rng = self.rng
        # Users differ in how active they are (heavy-tailed, capped: a wallet paying
        # thousands of times a week is a business account, outside this population).
        activity = np.minimum(rng.pareto(1.5, len(self.users)) + 0.2, 20.0)
        payers = rng.choice(len(self.users), size=n, p=activity / activity.sum())
        times = np.sort(rng.integers(0, self.span_ms, size=n))
        for ts, u in zip(times.tolist(), payers.tolist(), strict=True):
            self._normal_payment(self.users[u], int(ts))

    def _normal_payment(self, user: _User, ts: int) -> None:
        rng = self.rng
        if rng.random() < 0.01:
            user.devices.append(f"dev-{user.wallet}-{len(user.devices)}")
        if rng.random() < 0.03:
            user.ips.append(f"ip-{user.wallet}-{len(user.ips)}")
        if rng.random() < 0.08 or not user.contacts:
            candidate = int(rng.integers(0, len(self.users)))
            new = self.users[candidate].wallet if rng.random() < 0.7 else int(rng.choice(self.merchants))
            if new != user.wallet:
                user.contacts.append(new)
        payee = user.contacts[int(rng.integers(0, len(user.contacts)))] if user.contacts else self.merchants[0]
        country = user.country if rng.random() > 0.005 else str(rng.choice(COUNTRIES))
        # Now and then a legitimately large purchase, to a known payee.
        factor = float(rng.uniform(3, 8)) if rng.random() < 0.02 else 1.0
        failed = int(rng.choice([0, 1, 2], p=[0.94, 0.05, 0.01]))
        ip = user.ips[int(rng.integers(0, len(user.ips)))] if rng.random() > 0.05 else \
            self.public_ips[int(rng.integers(0, len(self.public_ips)))]
        self._add(ts, user.wallet, payee, self._amount(user, factor), failed,
                  user.devices[int(rng.integers(0, len(user.devices)))] if rng.random() > 0.02 else user.devices[-1],
                  ip, country, 0)

    # -- fraud patterns
    def _start(self) -> int:
        # Episodes start after a fifth of the span, so victims usually have history.
        return int(self.rng.integers(self.span_ms // 5, self.span_ms))

    def account_takeover(self) -> int:
        rng = self.rng
        t = self._start()
        # One attacker device and IP for the whole campaign: new to every victim, shared
        # across their accounts within the hour.
        device, ip = f"atk-dev-{len(self.events)}", f"atk-ip-{len(self.events)}"
        attacker_country = str(rng.choice(COUNTRIES))
        n = 0
        for _ in range(int(rng.integers(1, 4))):
            victim = self.users[int(rng.integers(0, len(self.users)))]
            country = victim.country if rng.random() < 0.3 else attacker_country
            payees = [self._wallet() for _ in range(int(rng.integers(1, 4)))]
            burst = int(rng.integers(3, 9))
            for k in range(burst):
                t += int(rng.integers(10_000, 3 * MINUTE_MS))
                failed = int(rng.integers(1, 4)) if k == 0 else int(rng.integers(0, 2))
                self._add(t, victim.wallet, payees[k % len(payees)],
                          self._amount(victim, float(rng.uniform(3, 20))), failed, device, ip, country, 1)
            n += burst
            t += int(rng.integers(2 * MINUTE_MS, 20 * MINUTE_MS))
        return n

    def card_testing(self) -> int:
        rng = self.rng
        device, ip = f"ct-dev-{len(self.events)}", f"ct-ip-{len(self.events)}"
        t = self._start()
        n = 0
        for _ in range(int(rng.integers(1, 4))):  # wallets tested from the same device
            if rng.random() < 0.5:
                user = self.users[int(rng.integers(0, len(self.users)))]
                wallet, country = user.wallet, user.country
            else:  # a fresh wallet opened for the purpose
                wallet, country = self._wallet(), str(rng.choice(COUNTRIES))
            n_small, n_large = int(rng.integers(3, 7)), int(rng.integers(1, 3))
            for _ in range(n_small):
                t += int(rng.integers(5_000, 4 * MINUTE_MS))
                payee = int(rng.choice(self.merchants)) if rng.random() < 0.5 else self._wallet()
                self._add(t, wallet, payee, int(rng.integers(50, ff.SMALL_AMOUNT_MINOR + 1)),
                          int(rng.integers(0, 3)), device, ip, country, 2)
            cash_out = self._wallet()
            for _ in range(n_large):
                t += int(rng.integers(30_000, 10 * MINUTE_MS))
                self._add(t, wallet, cash_out, int(rng.integers(ff.LARGE_AMOUNT_MINOR, 200_000)),
                          int(rng.integers(0, 2)), device, ip, country, 2)
            n += n_small + n_large
        return n

    def mule_fan_in(self) -> int:
        rng = self.rng
        mule = self._wallet()
        t = self._start()
        n = int(rng.integers(8, 26))
        payers = rng.choice(len(self.users), size=min(n, len(self.users)), replace=False)
        for u in payers.tolist():
            user = self.users[u]
            t += int(rng.integers(20_000, 4 * MINUTE_MS))
            self._add(t, user.wallet, mule, int(rng.integers(5_000, 50_000)), 0,
                      user.devices[0], user.ips[0], user.country, 3)
        return len(payers)

    def amount_outlier(self) -> int:
        rng = self.rng
        user = self.users[int(rng.integers(0, len(self.users)))]
        device = user.devices[0] if rng.random() < 0.5 else f"ao-dev-{len(self.events)}"
        self._add(self._start(), user.wallet, self._wallet(), self._amount(user, float(rng.uniform(15, 60))),
                  int(rng.integers(0, 2)), device, user.ips[0], user.country, 4)
        return 1


def generate(n: int, fraud_rate: float, seed: int, days: float = 7.0) -> Labelled:
    """`n` payments (about `fraud_rate` of them fraud) over `days`, in event order."""
    from services.fraud import Traffic, stable_hash

    assert 1 <= n <= MAX_N and 0.0 <= fraud_rate < 0.5 and days > 0, (n, fraud_rate, days)
    gen = _Gen(seed, n_users=max(50, n // 30), span_ms=int(days * DAY_MS))
    target = int(round(n * fraud_rate))
    makers = (gen.account_takeover, gen.card_testing, gen.mule_fan_in, gen.amount_outlier)
    made = [0, 0, 0, 0]
    while sum(made) < target:
        # The pattern furthest below its share goes next: shares hold at any n.
        k = int(np.argmin([made[i] / PATTERN_SHARES[i] for i in range(4)]))
        made[k] += makers[k]()
    gen.normal(max(0, n - len(gen.events)))
    base = calendar.timegm((2026, 1, 5, 0, 0, 0)) * 1000  # a fixed Monday (UTC): runs repeat
    events = sorted(gen.events, key=lambda e: e[0])
    wallet_ids = [f"sim{seed}-w{i}" for i in range(gen.n_wallets)]
    wallet_h = np.array([stable_hash(w) for w in wallet_ids], dtype=np.int64)
    payment_ids = [f"sim{seed}-p{i}" for i in range(len(events))]
    col = list(zip(*events, strict=True))
    payer = np.array(col[1], dtype=np.int64)
    payee = np.array(col[2], dtype=np.int64)
    devices, ips, countries = list(col[5]), list(col[6]), list(col[7])
    # The paying user: one per wallet here (request_at sends "user-<wallet>").
    user_h = np.array([stable_hash(f"user-{w}") for w in wallet_ids], dtype=np.int64)
    traffic = Traffic(
        payer=payer, payee=payee, ts_ms=np.array(col[0], dtype=np.int64) + base,
        amount=np.array(col[3], dtype=np.int64), failed=np.array(col[4], dtype=np.int64),
        payer_h=wallet_h[payer], payee_h=wallet_h[payee],
        device_h=np.array([stable_hash(d) for d in devices], dtype=np.int64),
        ip_h=np.array([stable_hash(i) for i in ips], dtype=np.int64),
        country_h=np.array([stable_hash(c) for c in countries], dtype=np.int64),
        payment_h=np.array([stable_hash(p) for p in payment_ids], dtype=np.int64),
        user=payer, device=_dense(devices), ip=_dense(ips), user_h=user_h[payer])
    pattern = np.array(col[8], dtype=np.int8)
    return Labelled(traffic=traffic, label=pattern > 0, pattern=pattern, n_wallets=gen.n_wallets,
                    wallet_ids=wallet_ids, payment_ids=payment_ids, devices=devices, ips=ips, countries=countries)


def _dense(values: Sequence[str]) -> np.ndarray:
    """Row numbers of distinct values in first-seen order; -1 for "" (not sent)."""
    index: dict[str, int] = {}
    return np.array([index.setdefault(v, len(index)) if v else -1 for v in values], dtype=np.int64)


# ----------------------------------------------------------------------------- metrics

def roc_auc(scores: np.ndarray, label: np.ndarray) -> float:
    """Mann-Whitney AUC with average ranks for ties (scores are integers 0..100)."""
    pos, neg = int(label.sum()), int((~label).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return float((ranks[label].sum() - pos * (pos + 1) / 2.0) / (pos * neg))


def _pr(flag: np.ndarray, label: np.ndarray) -> dict[str, float]:
    tp = int((flag & label).sum())
    fp = int((flag & ~label).sum())
    fn = int((~flag & label).sum())
    return {"precision": round(tp / (tp + fp), 4) if tp + fp else 0.0,
            "recall": round(tp / (tp + fn), 4) if tp + fn else 0.0, "tp": tp, "fp": fp, "fn": fn}


def report(data: Labelled, scores: np.ndarray, decisions: np.ndarray) -> dict[str, Any]:
    """Precision/recall of flagged (review or block) and of block, recall per pattern, AUC."""
    label = data.label
    flagged = decisions != rm.ALLOW
    blocked = decisions == rm.BLOCK
    per_pattern = {}
    for k, name in enumerate(PATTERNS):
        mask = data.pattern == k
        if k and mask.any():
            per_pattern[name] = {"payments": int(mask.sum()), "flagged_recall": round(float(flagged[mask].mean()), 4),
                                 "blocked": round(float(blocked[mask].mean()), 4)}
    normal = ~label
    return {
        "payments": len(data), "fraud": int(label.sum()), "auc": round(roc_auc(scores, label), 4),
        "flagged": _pr(flagged, label), "blocked": _pr(blocked, label),
        "normal_flag_rate": round(float(flagged[normal].mean()), 4) if normal.any() else 0.0,
        "patterns": per_pattern,
        "decisions": {name: int((decisions == code).sum()) for code, name in enumerate(rm.DECISIONS)},
    }


def score_offline(data: Labelled, model: Any = None, rules: Any = None) -> tuple[np.ndarray, np.ndarray, float]:
    """(scores, decisions, seconds) through the worker's kernels, in event order."""
    from services.fraud import decide, default_ruleset, load_model, traffic_features

    model = model or load_model()
    rules = rules or default_ruleset()
    start = time.perf_counter()
    x = traffic_features(data.traffic, data.n_wallets)
    scored = decide(x, model, rules)
    return scored.scores, scored.decisions, time.perf_counter() - start


# ----------------------------------------------------------------------------- fitting

def fit_model(data: Labelled, command: str) -> dict[str, Any]:
    """L2-regularised logistic regression by Newton's method (IRLS) on the traffic's
    features; deterministic for a given traffic. Returns the weights file's content."""
    from services.fraud import TRANSFORMS, Model, decide, default_ruleset, traffic_features
    from services.fraud_rules import compile_rules

    x_all = traffic_features(data.traffic, data.n_wallets)
    cols = [rm.FEATURE_INDEX[name] for name, _ in MODEL_FEATURES]
    transform = np.array([TRANSFORMS[t] for _, t in MODEL_FEATURES], dtype=np.int64)
    t = np.empty((x_all.shape[0], len(cols)))
    rm.transform_matrix(np.ascontiguousarray(x_all[:, cols]), transform, t)
    mean = t.mean(axis=0)
    std = np.maximum(t.std(axis=0), 1e-6)
    s = (t - mean) / std
    y = data.label.astype(np.float64)
    w, b = _irls(s, y)
    spec = {"features": [n for n, _ in MODEL_FEATURES], "transform": [tr for _, tr in MODEL_FEATURES],
            "mean": mean.round(10).tolist(), "std": std.round(10).tolist(), "weights": w.round(10).tolist(),
            "bias": round(float(b), 10)}
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:8]
    provisional = {"version": f"lr-{digest}", "thresholds": {"review": 50, "block": 100}, "model": spec}
    model = Model.from_dict(provisional)
    scores = decide(x_all.copy(), model, compile_rules([])).scores
    review_at, block_at = _thresholds(scores, data.label)
    weights_file = {**provisional, "thresholds": {"review": review_at, "block": block_at}}
    final = Model.from_dict(weights_file)
    train = report(data, *score_offline(data, final, default_ruleset())[:2])
    weights_file["fitted"] = {
        "method": f"logistic regression, L2 penalty {L2} on standardised transformed features, "
                  "Newton/IRLS in numpy (ops/simulate.py fit_model); thresholds: review at the score "
                  f"maximising F1 of flagged, block at the lowest score with precision >= {BLOCK_PRECISION}",
        "command": command, "generator_version": GENERATOR_VERSION,
        "feature_layout_version": ff.LAYOUT_VERSION,
        "train": {"payments": len(data), "fraud": int(data.label.sum()), "auc": train["auc"],
                  "flagged": train["flagged"], "blocked": train["blocked"]},
    }
    return weights_file


def _irls(s: np.ndarray, y: np.ndarray, iterations: int = 50) -> tuple[np.ndarray, float]:
    n, f = s.shape
    a = np.hstack([np.ones((n, 1)), s])
    beta = np.zeros(f + 1)
    penalty = np.eye(f + 1) * L2
    penalty[0, 0] = 0.0  # the intercept is not penalised
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-(a @ beta)))
        grad = a.T @ (y - p) - penalty @ beta
        hess = (a * (p * (1 - p))[:, None]).T @ a + penalty
        step = np.linalg.solve(hess, grad)
        beta += step
        if np.abs(step).max() < 1e-9:
            break
    return beta[1:], float(beta[0])


def _thresholds(scores: np.ndarray, label: np.ndarray) -> tuple[int, int]:
    best_f1, review_at = -1.0, 50
    block_at = 100
    for cut in range(1, 101):
        flag = scores >= cut
        pr = _pr(flag, label)
        f1 = 2 * pr["precision"] * pr["recall"] / (pr["precision"] + pr["recall"]) if pr["tp"] else 0.0
        if f1 > best_f1:
            best_f1, review_at = f1, cut
    for cut in range(review_at, 101):
        pr = _pr(scores >= cut, label)
        if pr["tp"] and pr["precision"] >= BLOCK_PRECISION:
            block_at = cut
            break
    return review_at, max(block_at, review_at)


# ----------------------------------------------------------------------------- online

# Event times are shifted by a whole number of hours (a multiple of every bucket width),
# so the replayed payments fall into the same window buckets as offline.
SHIFT_UNIT_MS = 3_600_000
FETCH_MAX_WAIT_MS = 5


def lockstep_chunks(traffic: Any) -> list[tuple[int, int]]:
    """Consecutive [lo, hi) ranges in which no payee, user, device or IP repeats. Replayed
    one range at a time, each entity row sees its payments in event order (payments of
    one payer keep their order anyway: one key, one partition; but payments reach a
    payee, user, device or IP row from many partitions, over routes of different
    lengths); within a range, payments to different rows may be processed in any order
    without changing any feature."""
    chunks, lo, seen = [], 0, set()
    keys = zip(traffic.payee.tolist(), traffic.user.tolist(), traffic.device.tolist(), traffic.ip.tolist(),
               strict=True)
    for i, (payee, user, device, ip) in enumerate(keys):
        mine = {("payee", payee), ("user", user), ("device", device), ("ip", ip)}
        mine -= {("device", -1), ("ip", -1), ("user", -1)}
        if mine & seen:
            chunks.append((lo, i))
            lo, seen = i, set()
        seen |= mine
    chunks.append((lo, len(traffic.payee)))
    return chunks


class DecisionCollector:
    """Reads `fraud.decisions` from its end (positioned before anything is published) and
    keeps the first model decision per payment id of interest."""

    def __init__(self, settings: Settings, wanted: set[str]) -> None:
        self.settings = settings
        self.wanted = wanted
        self.found: dict[str, tuple[int, str]] = {}
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._consumer: Any = None

    async def start(self) -> None:
        from aiokafka import AIOKafkaConsumer

        from streams.fraud import DECISIONS
        from streams.topics import bootstrap_servers, full_name

        # A short fetch wait: the embedded broker (Tansu) does not answer a waiting fetch
        # when data arrives, so the wait would be added to every decision's latency.
        self._consumer = AIOKafkaConsumer(full_name(self.settings, DECISIONS.name),
                                          bootstrap_servers=bootstrap_servers(self.settings),
                                          auto_offset_reset="latest", enable_auto_commit=False,
                                          fetch_max_wait_ms=FETCH_MAX_WAIT_MS)
        await self._consumer.start()
        deadline = time.monotonic() + 30
        while not self._consumer.assignment():
            assert time.monotonic() < deadline, "no partitions of fraud.decisions assigned"
            await asyncio.sleep(0.05)
        await self._consumer.seek_to_end()
        for tp in self._consumer.assignment():
            await self._consumer.position(tp)  # resolve "end" now, before publishing
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        from streams.fraud import DECISIONS, decisions_of

        while True:
            batch = await self._consumer.getmany(timeout_ms=200, max_records=5_000)
            for records in batch.values():
                for record in records:
                    for event in decisions_of(DECISIONS.decode(record.value)):
                        if event.source == "model" and event.payment_id in self.wanted:
                            self.found.setdefault(event.payment_id, (event.score, event.decision))
            if batch:
                self._changed.set()

    async def wait_for(self, ids: Sequence[str], timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while True:
            self._changed.clear()  # before the check: a batch landing after it sets it again
            if all(i in self.found for i in ids):
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                return False

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._consumer is not None:
            await self._consumer.stop()


def request_at(data: Labelled, i: int, shift_ms: int) -> Any:
    from streams.fraud import ScoreRequested

    tr = data.traffic
    payer = data.wallet_ids[int(tr.payer[i])]
    return ScoreRequested(
        payment_id=data.payment_ids[i], payer_user_id=f"user-{payer}", payer_wallet_id=payer,
        payee_wallet_id=data.wallet_ids[int(tr.payee[i])], amount_minor=int(tr.amount[i]), currency="INR",
        device_id=data.devices[i], ip=data.ips[i], country=data.countries[i], failed_attempts=int(tr.failed[i]),
        ts_ms=int(tr.ts_ms[i]) + shift_ms)


async def publish_online(settings: Settings, data: Labelled, rate: float | None, wait_s: float) -> dict[str, Any]:
    """Publish every payment as a ScoreRequested and report the live decisions.

    rate None: lockstep (`lockstep_chunks`), so the live decisions must equal offline ones.
    Otherwise payments go out at `rate` per second, in event order, without waiting:
    a load test. Replaying days of traffic in seconds compresses time ~100,000-fold, so
    the entity stage then sees payments hours out of event order across payer partitions
    (real traffic arrives milliseconds apart), and its fan-in, user, device and IP
    features differ from offline."""
    from streams.fraud import REQUESTS, score_batches
    from streams.publisher import EventPublisher

    behind = int(time.time() * 1000) - int(data.traffic.ts_ms[-1])
    shift = (behind // SHIFT_UNIT_MS) * SHIFT_UNIT_MS  # the traffic ends within the last hour
    n = REQUESTS.partition_count(settings)  # requests go out as one fraud.score_batch per partition, like the saga's
    collector = DecisionCollector(settings, set(data.payment_ids))
    await collector.start()
    started = time.perf_counter()
    try:
        async with EventPublisher(settings) as publisher:
            if rate is None:
                for lo, hi in lockstep_chunks(data.traffic):
                    events = [request_at(data, i, shift) for i in range(lo, hi)]
                    await publisher.publish_many(REQUESTS.name, [(None, b) for b in score_batches(events, n)])
                    if not await collector.wait_for([e.payment_id for e in events], wait_s):
                        break
            else:
                step = max(1, min(1_000, int(rate // 20) or 1))
                for lo in range(0, len(data), step):
                    events = [request_at(data, i, shift) for i in range(lo, min(lo + step, len(data)))]
                    await publisher.publish_many(REQUESTS.name, [(None, b) for b in score_batches(events, n)])
                    ahead = (lo + step) / rate - (time.perf_counter() - started)
                    if ahead > 0:
                        await asyncio.sleep(ahead)
        await collector.wait_for(data.payment_ids, wait_s)
    finally:
        await collector.stop()
    elapsed_s = time.perf_counter() - started
    return online_report(data, collector.found, elapsed_s, "lockstep" if rate is None else f"{rate:g}/s")


def online_report(data: Labelled, found: dict[str, tuple[int, str]], elapsed_s: float, mode: str) -> dict[str, Any]:
    index = {p: i for i, p in enumerate(data.payment_ids)}
    scores = np.zeros(len(data), dtype=np.int64)
    decisions = np.full(len(data), -1, dtype=np.int64)
    for payment_id, (score, decision) in found.items():
        scores[index[payment_id]] = score
        decisions[index[payment_id]] = rm.ACTION_CODES[decision]
    answered = decisions >= 0
    result = report(data, scores, np.where(answered, decisions, rm.ALLOW))
    offline_scores, offline_decisions, _ = score_offline(data)
    result["online"] = {"mode": mode, "seconds": round(elapsed_s, 2), "answered": int(answered.sum()),
                        "same_score_as_offline": int((answered & (scores == offline_scores)).sum()),
                        "same_decision_as_offline": int((answered & (decisions == offline_decisions)).sum())}
    return result


# ----------------------------------------------------------------------------- CLI

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("kind", choices=["payments"], help="what to simulate")
    parser.add_argument("--n", type=int, default=20_000, help="payments to generate (default 20000)")
    parser.add_argument("--fraud-rate", type=float, default=0.05, help="share of fraud payments (default 0.05)")
    parser.add_argument("--seed", type=int, default=1, help="random seed; the same seed gives the same traffic")
    parser.add_argument("--days", type=float, default=7.0, help="time span of the traffic (default 7 days)")
    parser.add_argument("--online", action="store_true",
                        help="publish ScoreRequested to Kafka and report the live decisions")
    parser.add_argument("--rate", type=float, default=None,
                        help="online: publish at this many payments/s without waiting (a load test); "
                             "default: lockstep, so live decisions can be compared with offline ones")
    parser.add_argument("--wait", type=float, default=120.0, help="online: seconds to wait for decisions")
    parser.add_argument("--fit", metavar="PATH", help="fit the model on this traffic and write the weights file")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def run_simulate(settings: Settings, args: argparse.Namespace) -> int:
    if not 1 <= args.n <= MAX_N:
        raise SystemExit(f"--n must be within 1..{MAX_N}")
    if not 0.0 <= args.fraud_rate < 0.5:
        raise SystemExit("--fraud-rate must be within [0, 0.5)")
    data = generate(args.n, args.fraud_rate, args.seed, args.days)
    if args.fit:
        command = (f"fintide simulate payments --n {args.n} --fraud-rate {args.fraud_rate} --seed {args.seed} "
                   f"--days {args.days} --fit {args.fit}")
        weights = fit_model(data, command)
        Path(args.fit).write_text(json.dumps(weights, indent=2) + "\n")
        result: dict[str, Any] = {"wrote": args.fit, "version": weights["version"],
                                  "thresholds": weights["thresholds"], "train": weights["fitted"]["train"]}
    elif args.online:
        result = asyncio.run(publish_online(settings, data, args.rate, args.wait))
    else:
        scores, decisions, seconds = score_offline(data)
        result = report(data, scores, decisions)
        result["scored_per_s"] = round(len(data) / seconds)
    print(json.dumps(result, indent=None if args.json else 2))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from ops.settings import load_settings

    parser = argparse.ArgumentParser(prog="fintide simulate", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run_simulate(load_settings(), parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
