"""Online logistic confidence: learns, stays in [0, 1], deterministic, order-faithful."""

from __future__ import annotations

import numpy as np
import pytest

from indicators.confidence import BIAS, MEAN, SEEN, STEPS, WEIGHTS, ConfidenceConfig, ConfidenceModel, M

W_TRUE = np.array([2.0, -1.5, 0.0, 1.0, 0.0, 0.0, 0.5, 0.0])


def separable(n: int, seed: int, scale: float = 1.0, shift: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(shift, scale, size=(n, M))
    y = ((x - shift) / scale @ W_TRUE > 0).astype(np.float64)
    return x, y


def test_untrained_models_say_one_half() -> None:
    model = ConfidenceModel(n_models=3)
    x, _ = separable(10, 0)
    assert model.score(np.zeros(10, np.int64), x).tolist() == [0.5] * 10


def test_learns_a_separable_problem_online() -> None:
    model = ConfidenceModel(n_models=1)
    # Raw features on an awkward scale and offset: online standardisation must cope.
    x, y = separable(6_000, 1, scale=30.0, shift=500.0)
    for lo in range(0, 6_000, 250):  # outcomes arrive in batches
        model.learn(np.zeros(250, np.int64), x[lo:lo + 250], y[lo:lo + 250])
    x_test, y_test = separable(2_000, 2, scale=30.0, shift=500.0)
    p = model.score(np.zeros(2_000, np.int64), x_test)
    accuracy = float(((p > 0.5) == (y_test > 0.5)).mean())
    assert accuracy > 0.95
    # Confident and right on the clear cases, not just above a coin flip.
    margin = np.abs((x_test - 500.0) / 30.0 @ W_TRUE)
    clear = margin > 2.0
    assert p[clear & (y_test > 0.5)].mean() > 0.85
    assert p[clear & (y_test < 0.5)].mean() < 0.15
    row = model.state[0]
    assert row[STEPS] == 6_000 and row[SEEN] == 6_000
    assert abs(row[MEAN] - 500.0) < 2.0
    # The weights point the way the true ones do (weights of zero-truth features stay small).
    w = row[WEIGHTS:WEIGHTS + M]
    assert w[0] > 1.0 and w[1] < -0.7 and w[3] > 0.5 and abs(w[2]) < 0.3


def test_models_learn_independently() -> None:
    model = ConfidenceModel(n_models=2)
    x, y = separable(2_000, 3)
    model.learn(np.zeros(2_000, np.int64), x, y)
    assert np.all(model.state[1] == 0.0)
    assert model.score(np.ones(1, np.int64), x[:1])[0] == 0.5


def test_confidence_stays_in_0_1_for_extreme_and_broken_inputs() -> None:
    model = ConfidenceModel(ConfidenceConfig(lr0=5.0, lr_min=1.0), n_models=1)
    x, y = separable(500, 4)
    model.learn(np.zeros(500, np.int64), x * 1e6, y)  # huge steps: big weights
    extreme = np.array([[1e308] * M, [-1e308] * M, [np.inf] * M, [np.nan] * M, [-np.inf, np.nan, 0, 1, 2, 3, 4, 5]])
    p = model.score(np.zeros(len(extreme), np.int64), extreme)
    assert np.isfinite(p).all() and (p >= 0).all() and (p <= 1).all()
    model.learn(np.zeros(len(extreme), np.int64), extreme, np.array([1.0, 0, 1, 0, 1]))
    assert np.isfinite(model.state).all()


def test_deterministic_and_independent_of_batching() -> None:
    x, y = separable(1_000, 5)
    models = np.array([0, 1] * 500)
    a = ConfidenceModel(n_models=2)
    a.learn(models, x, y)
    b = ConfidenceModel(n_models=2)
    cuts = [0, 1, 7, 300, 999, 1_000]
    for lo, hi in zip(cuts, cuts[1:]):
        b.learn(models[lo:hi], x[lo:hi], y[lo:hi])
    assert a.state.tobytes() == b.state.tobytes()
    c = ConfidenceModel(n_models=2)
    c.learn(models, x, y)
    assert a.state.tobytes() == c.state.tobytes()


def test_learning_rate_schedule_and_l2_match_the_documented_step() -> None:
    config = ConfidenceConfig(lr0=0.2, t_half=10.0, lr_min=0.01, l2=0.1)
    model = ConfidenceModel(config, n_models=1)
    x = np.array([[1.0, 2, 3, 4, 5, 6, 7, 8], [2.0, 0, 1, 4, 9, 6, 5, 8]])
    model.learn(np.zeros(1, np.int64), x[:1], np.array([1.0]))
    # Step 1: one example seen, std = 1, z = x - mean = 0: only the bias moves.
    assert model.state[0, BIAS] == pytest.approx(0.2 * 0.5)
    model.learn(np.zeros(1, np.int64), x[1:], np.array([0.0]))
    row = model.state[0]
    mean = x.mean(axis=0)
    std = x.std(axis=0, ddof=1)
    z = np.where(std > 0, (x[1] - mean) / np.where(std > 0, std, 1), 0.0)
    bias1 = 0.1
    p = 1 / (1 + np.exp(-bias1))  # weights were still zero
    lr = max(0.01, 0.2 / (1 + 1 / 10.0))
    assert row[WEIGHTS:WEIGHTS + M] == pytest.approx(-lr * (p - 0.0) * z)
    assert row[BIAS] == pytest.approx(bias1 - lr * p)


def test_boundaries_are_checked() -> None:
    model = ConfidenceModel(n_models=1)
    with pytest.raises(IndexError):
        model.score(np.array([1]), np.zeros((1, M)))
    with pytest.raises(AssertionError):
        model.score(np.array([0]), np.zeros((1, M - 1)))
    with pytest.raises(AssertionError):
        model.learn(np.array([0, 0]), np.zeros((2, M)), np.zeros(3))
    with pytest.raises(ValueError):
        ConfidenceConfig(lr_min=1.0, lr0=0.1)
