"""The labelled traffic generator, the offline evaluation and the reproducible fit.

Offline scoring runs the worker's kernels (services.fraud.traffic_features + decide) over
the generated payments with the committed weights and the default rules; every injected
pattern must be caught.
"""

from __future__ import annotations

import argparse
import json
import shlex

import numpy as np
import pytest

from indicators import risk_model as rm
from ops.simulate import PATTERNS, add_arguments, fit_model, generate, report, roc_auc, run_simulate, score_offline
from ops.settings import load_settings
from services.fraud import WEIGHTS_PATH, load_model


@pytest.fixture(scope="module")
def traffic_1():  # the example: --fraud-rate 0.05 --n 20000 --seed 1
    return generate(20_000, 0.05, 1)


def test_same_seed_same_traffic_other_seed_other_traffic() -> None:
    a, b, c = generate(3_000, 0.05, 11), generate(3_000, 0.05, 11), generate(3_000, 0.05, 12)
    for name in ("payer", "payee", "ts_ms", "amount", "failed", "device_h", "payment_h"):
        np.testing.assert_array_equal(getattr(a.traffic, name), getattr(b.traffic, name))
    assert a.payment_ids == b.payment_ids and (a.pattern == b.pattern).all()
    assert not np.array_equal(a.traffic.amount, c.traffic.amount)


def test_traffic_is_in_event_order_with_the_requested_fraud_share(traffic_1) -> None:
    tr = traffic_1.traffic
    assert len(traffic_1) == 20_000
    assert (np.diff(tr.ts_ms) >= 0).all()
    assert abs(traffic_1.label.mean() - 0.05) < 0.003
    assert (tr.amount > 0).all() and (tr.failed >= 0).all()
    counts = np.bincount(traffic_1.pattern, minlength=len(PATTERNS))
    assert all(counts[1:] > 100), counts  # every pattern is present
    assert 0.2 < counts[1] / counts[1:].sum() < 0.4  # shares follow PATTERN_SHARES (0.3 for takeovers)


def test_every_pattern_is_caught_offline(traffic_1) -> None:
    scores, decisions, _ = score_offline(traffic_1)
    result = report(traffic_1, scores, decisions)
    assert result["auc"] >= 0.98, result
    assert result["flagged"]["precision"] >= 0.85 and result["flagged"]["recall"] >= 0.85, result
    assert result["normal_flag_rate"] <= 0.01, result
    for name, figures in result["patterns"].items():
        assert figures["flagged_recall"] >= 0.8, (name, figures)


def test_auc_matches_a_pairwise_count() -> None:
    rng = np.random.default_rng(5)
    for _ in range(20):
        scores = rng.integers(0, 6, 60)  # many ties
        label = rng.random(60) < 0.3
        pos, neg = scores[label], scores[~label]
        pairs = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg)
        assert roc_auc(scores, label) == pytest.approx(pairs / (len(pos) * len(neg)))


def test_committed_weights_are_reproduced_by_their_command() -> None:
    committed = json.loads(WEIGHTS_PATH.read_text())
    args = shlex.split(committed["fitted"]["command"])
    assert args[:3] == ["fintide", "simulate", "payments"]
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    ns = parser.parse_args(args[2:])
    refit = fit_model(generate(ns.n, ns.fraud_rate, ns.seed, ns.days), committed["fitted"]["command"])
    assert refit == committed
    model = load_model()
    assert model.version == committed["version"] and 0 < model.review_at <= model.block_at <= 100
    assert set(model.features) <= set(rm.FEATURES) - {"score"}


def test_cli_offline_report(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["payments", "--n", "2000", "--seed", "4", "--json"])
    assert run_simulate(load_settings(environ={}), args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["payments"] == 2000 and 0.0 <= out["auc"] <= 1.0 and "patterns" in out
