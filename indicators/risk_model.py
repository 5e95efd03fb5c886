"""Risk score and rules: one Numba call scores and decides a whole batch of payments.

Input: the feature matrix ``X[n, N_FEATURES]`` (columns named by ``FEATURES``: the payer
features, the payee features, the user / device / IP features, then ``score``, which
:func:`score_batch` fills in).

**Model** (logistic regression, weights from ``ops/models/fraud_weights.json``):
each model feature is transformed (``T_IDENTITY``, ``T_LOG1P`` for counts, sums and
seconds, ``T_CLIP`` for the z-score), standardised with the training mean and standard
deviation, and weighted: ``z = bias + sum_j w_j * s_j``; the score is
``round(100 * sigmoid(z))`` (0..100). Each term ``w_j * s_j`` is that feature's
contribution to the log-odds; the ``TOP_K`` largest are reported with the decision.

**Rules** are compiled by ``services.fraud_rules`` into a small stack program each (an
opcode and an argument per instruction, ``OP_*`` below), evaluated for every payment;
a rule fires when its program leaves a non-zero, non-NaN value. Comparisons with NaN are
false (IEEE), so a rule dividing by zero fires for no payment rather than for all.

**Decision**: the first action class with a fired rule decides, in the order block →
review → allow; with no rule fired, the model's thresholds decide (score >= block_at →
block, >= review_at → review, else allow).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from indicators.fraud_features import (
    ENTITY_FEATURES,
    N_ENTITY_FEATURES,
    N_PAYEE_FEATURES,
    N_PAYER_FEATURES,
    PAYEE_FEATURES,
    PAYER_FEATURES,
)

FEATURES: tuple[str, ...] = (*PAYER_FEATURES, *PAYEE_FEATURES, *ENTITY_FEATURES, "score")
N_FEATURES = len(FEATURES)
FEATURE_INDEX = {name: i for i, name in enumerate(FEATURES)}
PAYEE_COL = N_PAYER_FEATURES
# First column of each entity kind's block (indicators.fraud_features.ENTITY_KINDS order).
ENTITY_COL = PAYEE_COL + N_PAYEE_FEATURES
ENTITY_COLS = tuple(ENTITY_COL + k * N_ENTITY_FEATURES for k in range(3))
SCORE_COL = N_FEATURES - 1

ALLOW, REVIEW, BLOCK = 0, 1, 2
DECISIONS = ("allow", "review", "block")
ACTION_CODES = {"allow": ALLOW, "review": REVIEW, "block": BLOCK}

T_IDENTITY, T_LOG1P, T_CLIP = 0, 1, 2
Z_CLIP = 8.0
TOP_K = 3

# Rule program opcodes.
OP_CONST, OP_FEATURE = 0, 1
OP_ADD, OP_SUB, OP_MUL, OP_DIV, OP_NEG = 2, 3, 4, 5, 6
OP_LT, OP_LE, OP_GT, OP_GE, OP_EQ, OP_NE = 7, 8, 9, 10, 11, 12
OP_AND, OP_OR, OP_NOT = 13, 14, 15
OP_ABS, OP_MIN, OP_MAX = 16, 17, 18
MAX_PROGRAM = 64  # instructions per rule
MAX_STACK = 32
MAX_RULES = 256


@njit(cache=True, inline="always")
def _transform(kind: int, x: float) -> float:
    if kind == T_LOG1P:
        return np.log1p(max(x, 0.0))
    if kind == T_CLIP:
        return min(max(x, -Z_CLIP), Z_CLIP)
    return x


@njit(cache=True, inline="always")
def _truthy(x: float) -> bool:
    return x == x and x != 0.0


@njit(cache=True, inline="always")
def _run(ops: np.ndarray, args: np.ndarray, length: int, x: np.ndarray, stack: np.ndarray) -> float:
    top = 0
    for k in range(length):
        op = ops[k]
        if op == OP_CONST:
            stack[top] = args[k]
            top += 1
        elif op == OP_FEATURE:
            stack[top] = x[int(args[k])]
            top += 1
        elif op == OP_NEG:
            stack[top - 1] = -stack[top - 1]
        elif op == OP_NOT:
            stack[top - 1] = 0.0 if _truthy(stack[top - 1]) else 1.0
        elif op == OP_ABS:
            stack[top - 1] = abs(stack[top - 1])
        else:
            b = stack[top - 1]
            a = stack[top - 2]
            top -= 1
            if op == OP_ADD:
                r = a + b
            elif op == OP_SUB:
                r = a - b
            elif op == OP_MUL:
                r = a * b
            elif op == OP_DIV:
                r = a / b
            elif op == OP_LT:
                r = 1.0 if a < b else 0.0
            elif op == OP_LE:
                r = 1.0 if a <= b else 0.0
            elif op == OP_GT:
                r = 1.0 if a > b else 0.0
            elif op == OP_GE:
                r = 1.0 if a >= b else 0.0
            elif op == OP_EQ:
                r = 1.0 if a == b else 0.0
            elif op == OP_NE:
                r = 1.0 if a != b else 0.0
            elif op == OP_AND:
                r = 1.0 if (_truthy(a) and _truthy(b)) else 0.0
            elif op == OP_OR:
                r = 1.0 if (_truthy(a) or _truthy(b)) else 0.0
            elif a != a or b != b:  # min/max of NaN is NaN, whatever the argument order
                r = np.nan
            elif op == OP_MIN:
                r = min(a, b)
            else:  # OP_MAX
                r = max(a, b)
            stack[top - 1] = r
    return stack[0]


@njit(cache=True, error_model="numpy")
def score_batch(x: np.ndarray, transform: np.ndarray, mean: np.ndarray, std: np.ndarray,
                weights: np.ndarray, bias: float, ops: np.ndarray, args: np.ndarray, lens: np.ndarray,
                actions: np.ndarray, review_at: int, block_at: int, scores: np.ndarray,
                contrib: np.ndarray, top: np.ndarray, fired: np.ndarray, decision: np.ndarray) -> None:
    """Score, rule and decide payments 0..n-1 of `x` (fills x[:, SCORE_COL]).

    Model arrays are per feature column (weight 0 for columns the model does not use);
    rule arrays are per rule (ops/args [R, MAX_PROGRAM], lens [R], actions [R])."""
    n, f = x.shape
    stack = np.empty(MAX_STACK, dtype=np.float64)
    for i in range(n):
        z = bias
        for j in range(f):
            if weights[j] != 0.0:
                c = weights[j] * (_transform(transform[j], x[i, j]) - mean[j]) / std[j]
                contrib[i, j] = c
                z += c
            else:
                contrib[i, j] = 0.0
        s = int(np.floor(100.0 / (1.0 + np.exp(-z)) + 0.5))
        scores[i] = s
        x[i, SCORE_COL] = float(s)
        # Top contributions by insertion into a TOP_K-long sorted list.
        for k in range(TOP_K):
            top[i, k] = -1
        for j in range(f):
            if weights[j] == 0.0:
                continue
            c = contrib[i, j]
            k = TOP_K
            while k > 0 and (top[i, k - 1] < 0 or contrib[i, top[i, k - 1]] < c):
                k -= 1
            if k < TOP_K:
                for m in range(TOP_K - 1, k, -1):
                    top[i, m] = top[i, m - 1]
                top[i, k] = j
        any_block = False
        any_review = False
        any_allow = False
        for r in range(lens.shape[0]):
            hit = _truthy(_run(ops[r], args[r], lens[r], x[i], stack))
            fired[i, r] = hit
            if hit:
                a = actions[r]
                if a == BLOCK:
                    any_block = True
                elif a == REVIEW:
                    any_review = True
                else:
                    any_allow = True
        if any_block:
            decision[i] = BLOCK
        elif any_review:
            decision[i] = REVIEW
        elif any_allow:
            decision[i] = ALLOW
        elif s >= block_at:
            decision[i] = BLOCK
        elif s >= review_at:
            decision[i] = REVIEW
        else:
            decision[i] = ALLOW


@njit(cache=True, error_model="numpy")
def model_scores(x: np.ndarray, transform: np.ndarray, mean: np.ndarray, std: np.ndarray,
                 weights: np.ndarray, bias: float, out: np.ndarray) -> None:
    """The model's log-odds only (no rules), for fitting and evaluation over many rows."""
    n, f = x.shape
    for i in range(n):
        z = bias
        for j in range(f):
            if weights[j] != 0.0:
                z += weights[j] * (_transform(transform[j], x[i, j]) - mean[j]) / std[j]
        out[i] = z


@njit(cache=True, error_model="numpy")
def transform_matrix(x: np.ndarray, transform: np.ndarray, out: np.ndarray) -> None:
    """out[i, j] = transform_j(x[i, j]): the model's inputs before standardising."""
    n, f = x.shape
    for i in range(n):
        for j in range(f):
            out[i, j] = _transform(transform[j], x[i, j])
