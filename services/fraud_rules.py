"""The fraud rule language: a safe parser and compiler to Numba stack programs.

A rule's expression is a Python-syntax expression over feature names and numbers:

    amount_minor > 500000 and new_device and new_country
    payee_fanin_1h >= 8 and new_payee
    small_then_large >= 3 or (failed_1h >= 5 and amount_z > 3)
    payer_sum_1h / max(payer_count_24h, 1) > 20000

Allowed: numbers (ints, floats; `True`/`False` read as 1/0), feature names from
`indicators.risk_model.FEATURES`, `+ - * /`, unary `-` / `+`, comparisons `< <= > >= == !=`
(chained too: `1 < x < 5`), `and`, `or`, `not`, parentheses and the functions `abs`,
`min`, `max` (two arguments). Everything else — attribute access, subscripts, calls to
anything else, strings, lambdas, comprehensions, names that are not features — is refused
with a `RuleError` that says where. `eval` is never used: the expression is parsed with
`ast` and walked against this whitelist, then compiled to postfix instructions
(`indicators.risk_model.OP_*`) that `score_batch` runs for every payment.

Bounds: expression text ≤ 500 characters, ≤ 64 instructions, stack depth ≤ 32 — so a
rule's cost per payment is bounded, whatever an admin types.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from indicators import risk_model as rm

MAX_EXPRESSION_CHARS = 500
ACTIONS = ("allow", "review", "block")

_BINOPS: dict[type[ast.operator], int] = {ast.Add: rm.OP_ADD, ast.Sub: rm.OP_SUB, ast.Mult: rm.OP_MUL,
                                          ast.Div: rm.OP_DIV}
_CMPOPS: dict[type[ast.cmpop], int] = {ast.Lt: rm.OP_LT, ast.LtE: rm.OP_LE, ast.Gt: rm.OP_GT,
                                       ast.GtE: rm.OP_GE, ast.Eq: rm.OP_EQ, ast.NotEq: rm.OP_NE}
_FUNCS: dict[str, tuple[int, int]] = {"abs": (rm.OP_ABS, 1), "min": (rm.OP_MIN, 2), "max": (rm.OP_MAX, 2)}


class RuleError(ValueError):
    """An expression the rule language does not accept; `column` is 1-based when known."""

    def __init__(self, message: str, column: int | None = None, unknown: Sequence[str] = ()) -> None:
        super().__init__(message if column is None else f"{message} (at column {column})")
        self.column = column
        self.unknown = tuple(unknown)


@dataclass(frozen=True)
class Program:
    """A compiled expression: opcodes and arguments, and the features it reads."""

    ops: tuple[int, ...]
    args: tuple[float, ...]
    features: tuple[str, ...]


def compile_expression(text: str) -> Program:
    """Parse and compile one expression, or raise RuleError."""
    if not text or not text.strip():
        raise RuleError("the expression is empty")
    if len(text) > MAX_EXPRESSION_CHARS:
        raise RuleError(f"the expression is longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as exc:
        raise RuleError(f"syntax error: {exc.msg}", exc.offset) from None
    unknown = sorted({n.id for n in ast.walk(tree) if isinstance(n, ast.Name)
                      and n.id not in rm.FEATURE_INDEX and n.id not in _FUNCS and n.id not in ("True", "False")})
    if unknown:
        raise RuleError(f"unknown feature(s): {', '.join(unknown)}", unknown=unknown)
    out: list[tuple[int, float]] = []
    features: list[str] = []
    _emit(tree.body, out, features)
    if len(out) > rm.MAX_PROGRAM:
        raise RuleError(f"the expression compiles to {len(out)} instructions; the limit is {rm.MAX_PROGRAM}")
    _check_stack(out)
    return Program(tuple(op for op, _ in out), tuple(arg for _, arg in out), tuple(dict.fromkeys(features)))


def _emit(node: ast.expr, out: list[tuple[int, float]], features: list[str]) -> None:
    if isinstance(node, ast.Constant):
        out.append((rm.OP_CONST, _number(node)))
    elif isinstance(node, ast.Name):
        out.append(_name(node, features))
    elif isinstance(node, ast.UnaryOp):
        _emit_unary(node, out, features)
    elif isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        _emit(node.left, out, features)
        _emit(node.right, out, features)
        out.append((_BINOPS[type(node.op)], 0.0))
    elif isinstance(node, ast.BoolOp):
        _emit(node.values[0], out, features)
        op = rm.OP_AND if isinstance(node.op, ast.And) else rm.OP_OR
        for value in node.values[1:]:
            _emit(value, out, features)
            out.append((op, 0.0))
    elif isinstance(node, ast.Compare):
        _emit_compare(node, out, features)
    elif isinstance(node, ast.Call):
        _emit_call(node, out, features)
    else:
        raise RuleError(f"{type(node).__name__} is not allowed in a rule", _col(node))


def _number(node: ast.Constant) -> float:
    value = node.value
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, (int, float)) and not isinstance(value, complex):
        number = float(value)
        if not math.isfinite(number):
            raise RuleError("numbers must be finite", _col(node))
        return number
    raise RuleError(f"constant {value!r} is not a number", _col(node))


def _name(node: ast.Name, features: list[str]) -> tuple[int, float]:
    if node.id in ("True", "False"):  # only reachable on Pythons that parse them as names
        return rm.OP_CONST, 1.0 if node.id == "True" else 0.0
    if node.id not in rm.FEATURE_INDEX:
        raise RuleError(f"{node.id!r} is not a feature", _col(node), unknown=[node.id])
    features.append(node.id)
    return rm.OP_FEATURE, float(rm.FEATURE_INDEX[node.id])


def _emit_unary(node: ast.UnaryOp, out: list[tuple[int, float]], features: list[str]) -> None:
    _emit(node.operand, out, features)
    if isinstance(node.op, ast.USub):
        out.append((rm.OP_NEG, 0.0))
    elif isinstance(node.op, ast.Not):
        out.append((rm.OP_NOT, 0.0))
    elif not isinstance(node.op, ast.UAdd):
        raise RuleError(f"operator {type(node.op).__name__} is not allowed", _col(node))


def _emit_compare(node: ast.Compare, out: list[tuple[int, float]], features: list[str]) -> None:
    # a < b < c  ==  (a < b) and (b < c); `b` is emitted twice (no side effects to repeat).
    left = node.left
    for i, (op, right) in enumerate(zip(node.ops, node.comparators, strict=True)):
        if type(op) not in _CMPOPS:
            raise RuleError(f"comparison {type(op).__name__} is not allowed", _col(node))
        _emit(left, out, features)
        _emit(right, out, features)
        out.append((_CMPOPS[type(op)], 0.0))
        if i:
            out.append((rm.OP_AND, 0.0))
        left = right


def _emit_call(node: ast.Call, out: list[tuple[int, float]], features: list[str]) -> None:
    if not isinstance(node.func, ast.Name) or node.func.id not in _FUNCS:
        raise RuleError("only abs(), min() and max() may be called", _col(node))
    op, arity = _FUNCS[node.func.id]
    if node.keywords or len(node.args) != arity:
        raise RuleError(f"{node.func.id}() takes {arity} argument(s)", _col(node))
    for arg in node.args:
        if isinstance(arg, ast.Starred):
            raise RuleError("* arguments are not allowed", _col(arg))
        _emit(arg, out, features)
    out.append((op, 0.0))


def _check_stack(program: list[tuple[int, float]]) -> None:
    depth = 0
    for op, _ in program:
        if op in (rm.OP_CONST, rm.OP_FEATURE):
            depth += 1
        elif op not in (rm.OP_NEG, rm.OP_NOT, rm.OP_ABS):
            depth -= 1
        if depth > rm.MAX_STACK:
            raise RuleError(f"the expression nests deeper than {rm.MAX_STACK} values")
    assert depth == 1, f"compiled program leaves {depth} values"


def _col(node: ast.AST) -> int | None:
    offset = getattr(node, "col_offset", None)
    return offset + 1 if offset is not None else None


# ----------------------------------------------------------------------------- rule sets

@dataclass(frozen=True)
class Rule:
    id: str
    expression: str
    action: str
    priority: int = 100
    enabled: bool = True
    description: str = ""


@dataclass(frozen=True)
class RuleSet:
    """Enabled rules compiled into the arrays `score_batch` takes, in evaluation order:
    block, review, allow, then by priority (lower first) and id."""

    version: int
    rules: tuple[Rule, ...]
    ops: np.ndarray  # int32 [R, MAX_PROGRAM]
    args: np.ndarray  # float64 [R, MAX_PROGRAM]
    lens: np.ndarray  # int32 [R]
    actions: np.ndarray  # int32 [R]

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(rule.id for rule in self.rules)


_ACTION_ORDER = {"block": 0, "review": 1, "allow": 2}


def compile_rules(rules: Sequence[Rule], version: int = 0) -> RuleSet:
    """Compile the enabled rules; raises RuleError naming the first bad rule."""
    enabled = sorted((r for r in rules if r.enabled), key=lambda r: (_ACTION_ORDER[r.action], r.priority, r.id))
    if len(enabled) > rm.MAX_RULES:
        raise RuleError(f"{len(enabled)} enabled rules; the limit is {rm.MAX_RULES}")
    n = len(enabled)
    ops = np.zeros((n, rm.MAX_PROGRAM), dtype=np.int32)
    args = np.zeros((n, rm.MAX_PROGRAM), dtype=np.float64)
    lens = np.zeros(n, dtype=np.int32)
    actions = np.zeros(n, dtype=np.int32)
    for i, rule in enumerate(enabled):
        if rule.action not in _ACTION_ORDER:
            raise RuleError(f"rule {rule.id}: action must be one of {', '.join(ACTIONS)}")
        try:
            program = compile_expression(rule.expression)
        except RuleError as exc:
            raise RuleError(f"rule {rule.id}: {exc}", exc.column, exc.unknown) from None
        length = len(program.ops)
        ops[i, :length] = program.ops
        args[i, :length] = program.args
        lens[i] = length
        actions[i] = rm.ACTION_CODES[rule.action]
    return RuleSet(version=version, rules=tuple(enabled), ops=ops, args=args, lens=lens, actions=actions)


def evaluate_python(expression: str, features: dict[str, float]) -> float:
    """A plain-Python evaluation of an expression over named values, by walking the
    same whitelisted AST: the reference the compiled programs are tested against."""
    tree = ast.parse(expression.strip(), mode="eval")
    compile_expression(expression)  # the same acceptance rules
    return float(_walk(tree.body, features))


def _walk(node: ast.expr, env: dict[str, float]) -> float:  # noqa: PLR0911 - one case per node kind
    if isinstance(node, ast.Constant):
        return float(node.value)
    if isinstance(node, ast.Name):
        return float(env[node.id]) if node.id in env else float(node.id == "True")
    if isinstance(node, ast.UnaryOp):
        v = _walk(node.operand, env)
        if isinstance(node.op, ast.Not):
            return 0.0 if (v == v and v != 0.0) else 1.0
        return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.BinOp):
        a, b = _walk(node.left, env), _walk(node.right, env)
        if isinstance(node.op, ast.Div):
            return float(np.float64(a) / np.float64(b)) if b == 0 else a / b
        return {ast.Add: a + b, ast.Sub: a - b, ast.Mult: a * b}[type(node.op)]
    if isinstance(node, ast.BoolOp):
        truth = [(v == v and v != 0.0) for v in (_walk(x, env) for x in node.values)]
        return float(all(truth) if isinstance(node.op, ast.And) else any(truth))
    if isinstance(node, ast.Compare):
        values = [_walk(node.left, env), *(_walk(c, env) for c in node.comparators)]
        ops = {ast.Lt: np.less, ast.LtE: np.less_equal, ast.Gt: np.greater, ast.GtE: np.greater_equal,
               ast.Eq: np.equal, ast.NotEq: np.not_equal}
        return float(all(bool(ops[type(op)](values[i], values[i + 1])) for i, op in enumerate(node.ops)))
    if isinstance(node, ast.Call):
        assert isinstance(node.func, ast.Name)
        vals = [_walk(a, env) for a in node.args]
        if node.func.id == "abs":
            return abs(vals[0])
        a, b = vals
        if a != a or b != b:  # the kernel's min/max propagate NaN (unlike Python's)
            return math.nan
        return min(a, b) if node.func.id == "min" else max(a, b)
    raise AssertionError(f"unreachable: {type(node).__name__}")
