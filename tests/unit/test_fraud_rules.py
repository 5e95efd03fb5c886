"""The rule language (parser, whitelist, compiler) and the decision kernel.

Compiled programs run in Numba; their reference is a plain walk of the same AST
(`evaluate_python`). Hypothesis draws expressions from the whole grammar and feature
values that include zeros (division by zero), negatives and NaN.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from indicators import risk_model as rm
from services.fraud import DEFAULT_RULES, Model, decide, default_ruleset, rules_fired, top_features
from services.fraud_rules import (
    MAX_EXPRESSION_CHARS,
    Rule,
    RuleError,
    compile_expression,
    compile_rules,
    evaluate_python,
)

NAMES = ("amount_minor", "payer_count_1h", "amount_z", "new_device", "payee_fanin_1h", "score")


def run_compiled(expression: str, values: dict[str, float]) -> bool:
    rules = compile_rules([Rule("r", expression, "review")])
    x = np.zeros((1, rm.N_FEATURES))
    for name, value in values.items():
        x[0, rm.FEATURE_INDEX[name]] = value
    scored = decide(x.copy(), _model(score_bias=_logit(values.get("score", 0.0))), rules)
    return bool(scored.fired[0, 0])


def _logit(score: float) -> float:
    p = min(max(score / 100.0, 1e-6), 1 - 1e-6)
    return math.log(p / (1 - p))


def _model(weights: dict[str, float] | None = None, score_bias: float = -5.0, review_at: int = 50,
           block_at: int = 90) -> Model:
    weights = weights or {"amount_minor": 0.0}
    names = list(weights)
    return Model.from_dict({"version": "test", "thresholds": {"review": review_at, "block": block_at},
                            "model": {"features": names, "transform": ["identity"] * len(names),
                                      "mean": [0.0] * len(names), "std": [1.0] * len(names),
                                      "weights": list(weights.values()), "bias": score_bias}})


# ----------------------------------------------------------------------------- grammar

@pytest.mark.parametrize("expression", [
    "amount_minor > 500000 and new_device and new_country",
    "payee_fanin_1h >= 8 and new_payee",
    "small_then_large >= 3 or (failed_1h >= 5 and amount_z > 3)",
    "payer_sum_1h / max(payer_count_24h, 1) > 20000",
    "1 < payer_count_1h <= 5",
    "not new_payee and -amount_z < -2.5",
    "abs(amount_z) > 4 or score >= 97",
    "True",
])
def test_valid_expressions_compile(expression: str) -> None:
    program = compile_expression(expression)
    assert 1 <= len(program.ops) <= rm.MAX_PROGRAM


@pytest.mark.parametrize(("expression", "fragment"), [
    ("amount > 5", "unknown feature(s): amount"),
    ("foo and bar > 1", "unknown feature(s): bar, foo"),
    ("__import__('os').system('true')", "unknown feature(s): __import__"),
    ("amount_minor.real > 1", "Attribute is not allowed"),
    ("amount_minor[0] > 1", "Subscript is not allowed"),
    ("len(amount_minor) > 1", "unknown feature(s): len"),
    ("'x' == 'x'", "is not a number"),
    ("amount_minor ** 2 > 1", "BinOp is not allowed"),
    ("amount_minor % 2 == 1", "BinOp is not allowed"),
    ("new_device | new_ip", "BinOp is not allowed"),
    ("amount_minor in (1, 2)", "comparison In is not allowed"),
    ("amount_minor is 1", "comparison Is is not allowed"),
    ("(lambda: 1)()", "only abs(), min() and max() may be called"),
    ("[amount_minor for amount_minor in (1,)]", "ListComp is not allowed"),
    ("amount_minor if new_ip else 0", "IfExp is not allowed"),
    ("max(amount_minor)", "max() takes 2 argument(s)"),
    ("abs(x=amount_minor)", "abs() takes 1 argument(s)"),
    ("amount_minor >", "syntax error"),
    ("amount_minor > 1; 2", "syntax error"),
    ("", "empty"),
    ("1e999 > amount_minor", "finite"),
    ("amount_minor > " + "1" * MAX_EXPRESSION_CHARS, "longer than"),
    (" + ".join(["new_ip"] * 40) + " > 1", "instructions"),
    ("(" * 40 + "amount_minor" + ")" * 40 + " > 1", None),  # parentheses alone cost nothing
])
def test_rejected_expressions_say_why(expression: str, fragment: str | None) -> None:
    if fragment is None:
        compile_expression(expression)
        return
    with pytest.raises(RuleError) as info:
        compile_expression(expression)
    assert fragment in str(info.value)


def test_unknown_features_are_listed_for_the_api() -> None:
    with pytest.raises(RuleError) as info:
        compile_expression("velocity > 3 and amount_minor > 1 and ip_risk")
    assert info.value.unknown == ("ip_risk", "velocity")


def test_deep_nesting_is_bounded() -> None:
    # Right-nested sums push one value per name: a program within MAX_PROGRAM cannot
    # hold more than MAX_STACK values, so the kernel's fixed stack is never overrun.
    assert (rm.MAX_PROGRAM + 1) // 2 <= rm.MAX_STACK
    deepest = "new_ip" + " + (new_ip" * 30 + ")" * 30 + " > 1"
    compile_expression(deepest)
    with pytest.raises(RuleError, match="deeper|instructions"):
        compile_expression("new_ip" + " + (new_ip" * 32 + ")" * 32 + " > 1")


# ----------------------------------------------------------------------------- semantics

VALUES = st.sampled_from([0.0, 1.0, -1.0, 2.5, 3.0, 100.0, -0.0, 7e5, math.nan])


def expressions() -> st.SearchStrategy[str]:
    leaves = st.one_of(st.sampled_from(NAMES), st.sampled_from(["0", "1", "2.5", "3", "100", "True", "False"]))

    def extend(inner: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
        binary = st.tuples(inner, st.sampled_from(["+", "-", "*", "/", "<", "<=", ">", ">=", "==", "!=",
                                                   "and", "or"]), inner)
        return st.one_of(
            binary.map(lambda t: f"({t[0]} {t[1]} {t[2]})"),
            inner.map(lambda e: f"(not {e})"),
            inner.map(lambda e: f"(-{e})"),
            inner.map(lambda e: f"abs({e})"),
            st.tuples(st.sampled_from(["min", "max"]), inner, inner).map(lambda t: f"{t[0]}({t[1]}, {t[2]})"),
            st.tuples(inner, inner, inner).map(lambda t: f"({t[0]} < {t[1]} <= {t[2]})"),
        )

    return st.recursive(leaves, extend, max_leaves=8)


@settings(max_examples=300, deadline=None)
@given(expressions(), st.fixed_dictionaries({name: VALUES for name in NAMES if name != "score"}),
       st.sampled_from([0.0, 12.0, 50.0, 99.0]))
@example("(-(not min(new_device, amount_minor)))", {**dict.fromkeys(NAMES[:-1], 0.0), "new_device": 1.0,
                                                        "amount_minor": math.nan}, 0.0)
@example("max(amount_minor, new_device) > 0", {**dict.fromkeys(NAMES[:-1], 0.0), "new_device": math.nan,
                                                "amount_minor": 1.0}, 0.0)
def test_compiled_rules_agree_with_a_plain_evaluation(expression: str, values: dict[str, float],
                                                      score: float) -> None:
    try:
        compile_expression(expression)
    except RuleError:
        return  # too long or too deep: refused, nothing to compare
    env = {**values, "score": score}
    with np.errstate(all="ignore"):
        expected = evaluate_python(expression, env)
    expected_fired = expected == expected and expected != 0.0
    assert run_compiled(expression, env) == expected_fired, expression


# ----------------------------------------------------------------------------- decisions

def test_block_beats_review_beats_allow_beats_the_model() -> None:
    rules = compile_rules([
        Rule("allow-small", "amount_minor < 55", "allow", 5),
        Rule("review-new-device", "new_device", "review", 5),
        Rule("block-huge", "amount_minor > 1000000", "block", 5),
        Rule("disabled", "amount_minor > 0", "block", 1, enabled=False),
    ])
    assert rules.ids == ("block-huge", "review-new-device", "allow-small")
    model = _model({"amount_minor": 1.0}, score_bias=-60.0, review_at=40, block_at=80)
    # amount drives the score: sigmoid(amount - 60)
    cases = {  # amount, new_device -> decision, fired
        (50, 0): ("allow", ["allow-small"]),
        (50, 1): ("review", ["review-new-device", "allow-small"]),
        (2_000_000, 1): ("block", ["block-huge", "review-new-device"]),
        (59, 0): ("allow", []),  # no rule: score 27 < review_at
        (200, 0): ("block", []),  # no rule: the model's block threshold (score 100)
        (61, 0): ("review", []),  # score 73 -> review
    }
    x = np.zeros((len(cases), rm.N_FEATURES))
    for i, (amount, device) in enumerate(cases):
        x[i, rm.FEATURE_INDEX["amount_minor"]] = amount
        x[i, rm.FEATURE_INDEX["new_device"]] = device
    scored = decide(x, model, rules)
    for i, (decision, fired) in enumerate(cases.values()):
        assert rm.DECISIONS[scored.decisions[i]] == decision, list(cases)[i]
        assert rules_fired(scored, i, rules) == fired, list(cases)[i]


def test_rules_can_use_the_score() -> None:
    rules = compile_rules([Rule("high-score", "score >= 70", "block", 1)])
    model = _model({"amount_z": 1.0}, score_bias=0.0, review_at=95, block_at=99)
    x = np.zeros((2, rm.N_FEATURES))
    x[0, rm.FEATURE_INDEX["amount_z"]] = 0.5  # score 62
    x[1, rm.FEATURE_INDEX["amount_z"]] = 1.0  # score 73
    scored = decide(x, model, rules)
    assert scored.scores.tolist() == [62, 73]
    assert [rm.DECISIONS[d] for d in scored.decisions] == ["allow", "block"]
    assert scored.x[:, rm.SCORE_COL].tolist() == [62.0, 73.0]


def test_score_is_the_rounded_logistic_and_top_features_are_the_largest_contributions() -> None:
    weights = {"amount_z": 2.0, "new_device": 1.0, "payer_count_1h": -0.5, "failed_1h": 0.25}
    model = _model(weights, score_bias=-1.0)
    x = np.zeros((1, rm.N_FEATURES))
    for name, value in {"amount_z": 1.5, "new_device": 1.0, "payer_count_1h": 4.0, "failed_1h": 2.0}.items():
        x[0, rm.FEATURE_INDEX[name]] = value
    scored = decide(x, model, compile_rules([]))
    z = -1.0 + 3.0 + 1.0 - 2.0 + 0.5
    assert scored.scores[0] == round(100 / (1 + math.exp(-z)))
    top = top_features(scored, 0)
    assert [(t.name, t.contribution) for t in top] == [("amount_z", 3.0), ("new_device", 1.0),
                                                        ("failed_1h", 0.5)]


def test_default_rules_compile_in_evaluation_order() -> None:
    ruleset = default_ruleset()
    assert set(ruleset.ids) == {r.id for r in DEFAULT_RULES}
    order = [rm.ACTION_CODES[r.action] for r in ruleset.rules]
    assert order == sorted(order, reverse=True)  # block (2) first, then review (1), then allow (0)


def test_too_many_rules_are_refused() -> None:
    with pytest.raises(RuleError, match="limit"):
        compile_rules([Rule(f"r{i}", "amount_minor > 1", "review") for i in range(rm.MAX_RULES + 1)])


def test_a_bad_rule_is_named() -> None:
    with pytest.raises(RuleError, match="rule r2: unknown feature"):
        compile_rules([Rule("r1", "amount_minor > 1", "review"), Rule("r2", "nope > 1", "block")])
