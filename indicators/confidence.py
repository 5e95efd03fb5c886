"""Signal confidence: online logistic regression per model row, in Numba.

A model row (one per strategy, or per partition x strategy so a table row lives with the
partition that writes it; the caller picks the row) learns P(hit | features) from resolved
outcomes: label 1 for a hit, 0 for a miss (indicators/outcomes.py). confidence =
sigmoid(bias + w . z), always in [0, 1]; with no training yet every signal scores 0.5.

Standardisation: z_j = clip((x_j - mean_j) / std_j, -CLIP, CLIP) with mean and variance
kept online (Welford) over the training inputs seen so far; std = 1 until two examples
have been seen or when the variance is ~0. Inputs are clamped to +/-MAX_ABS_INPUT first
(features are scale-free ratios; larger values are garbage, and squaring them would
overflow the variance); non-finite inputs count as the running mean (z = 0).

Training: one SGD step per outcome, in the order given:
    lr_t   = max(lr_min, lr0 / (1 + t / t_half))          t = steps taken so far
    w     -= lr_t * ((p - y) * z + l2 * w)                 (no L2 on the bias)
    bias  -= lr_t * (p - y)
where p is the model's prediction for z before the step. Same inputs in the same order
give bit-identical weights (no randomness, no threads).

Row layout (ROW_WIDTH = 2 + 3 * M + 1 with M = N_MODEL_FEATURES):
    [0] STEPS  SGD steps taken
    [1] SEEN   examples in the running mean/variance
    [2 .. 2+M)       running mean
    [2+M .. 2+2M)    running sum of squared deviations (Welford's M2)
    [2+2M .. 2+3M)   weights
    [2+3M]           bias
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit

from indicators.bars import grow_rows
from indicators.signals import N_MODEL_FEATURES

M = N_MODEL_FEATURES
STEPS = 0
SEEN = 1
MEAN = 2
M2 = MEAN + M
WEIGHTS = M2 + M
BIAS = WEIGHTS + M
ROW_WIDTH = BIAS + 1

# hyper-parameter vector positions
H_LR0 = 0
H_T_HALF = 1
H_LR_MIN = 2
H_L2 = 3
H_CLIP = 4
N_HYPER = 5

MAX_ABS_INPUT = 1e9
MAX_ROWS = 1 << 20
MAX_BATCH = 1 << 20


@dataclass(frozen=True, slots=True)
class ConfidenceConfig:
    lr0: float = 0.1
    t_half: float = 500.0
    lr_min: float = 0.005
    l2: float = 1e-3
    clip: float = 5.0

    def __post_init__(self) -> None:
        if not (self.lr0 > 0 and self.t_half > 0 and 0 < self.lr_min <= self.lr0 and self.l2 >= 0 and self.clip > 0):
            raise ValueError("need lr0 > 0, t_half > 0, 0 < lr_min <= lr0, l2 >= 0, clip > 0")

    def hyper(self) -> np.ndarray:
        return np.array([self.lr0, self.t_half, self.lr_min, self.l2, self.clip], dtype=np.float64)


@njit(cache=True)
def sigmoid(a: float) -> float:
    # Two branches so exp never overflows: the result is exact-ish at both tails.
    if a >= 0.0:
        return 1.0 / (1.0 + np.exp(-a))
    e = np.exp(a)
    return e / (1.0 + e)


@njit(cache=True)
def _clamp(v: float) -> float:
    return min(MAX_ABS_INPUT, max(-MAX_ABS_INPUT, v))


@njit(cache=True)
def _standardise(row: np.ndarray, x: np.ndarray, clip: float, z: np.ndarray) -> None:
    seen = row[SEEN]
    for j in range(M):
        v = x[j]
        if not np.isfinite(v):
            z[j] = 0.0
            continue
        std = 1.0
        if seen >= 2.0:
            var = row[M2 + j] / (seen - 1.0)
            if var > 1e-24:
                std = np.sqrt(var)
        zj = (_clamp(v) - row[MEAN + j]) / std
        z[j] = min(clip, max(-clip, zj))


@njit(cache=True)
def _logit(row: np.ndarray, z: np.ndarray) -> float:
    a = row[BIAS]
    for j in range(M):
        a += row[WEIGHTS + j] * z[j]
    return a


@njit(cache=True)
def score(models: np.ndarray, hyper: np.ndarray, model: np.ndarray, x: np.ndarray, out: np.ndarray) -> None:
    """out[i] = confidence of features x[i] under model row model[i]."""
    z = np.empty(M, dtype=np.float64)
    for i in range(model.shape[0]):
        row = models[model[i]]
        _standardise(row, x[i], hyper[H_CLIP], z)
        out[i] = sigmoid(_logit(row, z))


@njit(cache=True)
def _observe(row: np.ndarray, x: np.ndarray) -> None:
    # Welford: numerically stable running mean and M2; a non-finite input counts as the
    # mean (no change to it), matching how it standardises (z = 0).
    row[SEEN] += 1.0
    n = row[SEEN]
    for j in range(M):
        v = _clamp(x[j]) if np.isfinite(x[j]) else row[MEAN + j]
        delta = v - row[MEAN + j]
        row[MEAN + j] += delta / n
        row[M2 + j] += delta * (v - row[MEAN + j])


@njit(cache=True)
def learn(models: np.ndarray, hyper: np.ndarray, model: np.ndarray, x: np.ndarray, y: np.ndarray) -> None:
    """One SGD step per example, in order: model row model[i], features x[i], label y[i]."""
    z = np.empty(M, dtype=np.float64)
    for i in range(model.shape[0]):
        row = models[model[i]]
        _observe(row, x[i])
        _standardise(row, x[i], hyper[H_CLIP], z)
        err = sigmoid(_logit(row, z)) - (1.0 if y[i] > 0 else 0.0)
        lr = max(hyper[H_LR_MIN], hyper[H_LR0] / (1.0 + row[STEPS] / hyper[H_T_HALF]))
        for j in range(M):
            w = row[WEIGHTS + j]
            row[WEIGHTS + j] = w - lr * (err * z[j] + hyper[H_L2] * w)
        row[BIAS] -= lr * err
        row[STEPS] += 1.0


class ConfidenceModel:
    """`n_models` logistic models over the signal features (indicators.signals.MODEL_FEATURES)."""

    def __init__(self, config: ConfidenceConfig | None = None, n_models: int = 0) -> None:
        self.config = config or ConfidenceConfig()
        self.hyper = self.config.hyper()
        self._buf = np.zeros((0, ROW_WIDTH), dtype=np.float64)
        self._n = 0
        self.grow(n_models)

    @property
    def n_models(self) -> int:
        return self._n

    @property
    def state(self) -> np.ndarray:
        return self._buf[: self._n]

    def grow(self, n_models: int) -> None:
        if not 0 <= n_models <= MAX_ROWS:
            raise ValueError(f"n_models must be in [0, {MAX_ROWS}]")
        if n_models > self._n:
            self._buf = grow_rows(self._buf, self._n, n_models)
            self._buf[self._n:n_models] = 0.0  # zero weights: confidence 0.5 until trained
            self._n = n_models

    def score(self, model: np.ndarray, x: np.ndarray) -> np.ndarray:
        model, x = self._check(model, x)
        out = np.empty(model.shape[0], dtype=np.float64)
        score(self.state, self.hyper, model, x, out)
        return out

    def learn(self, model: np.ndarray, x: np.ndarray, hit: np.ndarray) -> None:
        model, x = self._check(model, x)
        assert hit.shape == (model.shape[0],), "one label per example"
        learn(self.state, self.hyper, model, x, np.ascontiguousarray(hit, dtype=np.float64))

    def _check(self, model: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = int(model.shape[0])
        assert n <= MAX_BATCH, f"{n} examples exceed {MAX_BATCH}"
        assert x.shape == (n, M), f"x must be [{n}, {M}], got {x.shape}"
        if n and (int(model.min()) < 0 or int(model.max()) >= self._n):
            raise IndexError(f"model rows outside [0, {self._n}); grow() first")
        return np.ascontiguousarray(model, dtype=np.int64), np.ascontiguousarray(x, dtype=np.float64)
