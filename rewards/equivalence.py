"""Is an extracted answer the same as the gold answer?

The gold decides the shape: `parse_answer` turns both strings into typed values and the
comparator for the gold's type (`COMPARATORS`) checks the prediction. Scalars go through a
ladder of checks, cheapest first:

1. identical AST;
2. exact rational arithmetic with `fractions.Fraction` (integers, decimals, fractions,
   percents, scientific notation, mixed numbers): most pairs stop here;
3. numeric evaluation at three fixed pseudo-random points (complex floats): a clear difference
   is a wrong answer without asking sympy;
4. sympy (`simplify(a - b) == 0`, then `equals`) in a worker subprocess with a hard deadline
   (`rewards._limits`); if sympy cannot decide in time, the numeric check of step 3 decides.

Before any of this, cheap guards reject inputs that could only be attacks or accidents: answers
over MAX_ANSWER_CHARS, bracket nesting over MAX_DEPTH, more than MAX_ITEMS entries, literal
numbers over MAX_DIGITS digits, integer exponents over MAX_EXPONENT (or results over
MAX_RESULT_BITS), factorials of more than MAX_FACTORIAL. Such answers are wrong at once,
not after a timeout. Hedges are wrong too: `\\pm` when the gold has none, `2 or 3`, a list or
interval where the gold is one value, an empty answer, text addressed to the grader.

Policy decisions (documented here because reasonable graders differ):
- decimals must be exact: 0.33 is not 1/3, 1.414 is not sqrt(2);
- 50% equals 50 and 0.5; degrees, dollars, units and `x =` are ignored;
- a vector may be written as a tuple; a bare list of solutions may be written as a set;
  a tuple is not a bare list, and brackets of tuples and intervals must match;
- a numeral in another base (52_8) also matches its digits without the base (52).
"""

from __future__ import annotations

import math
import random
import re
import threading
import time
from collections.abc import Callable
from fractions import Fraction
from typing import TypeVar

from rewards import _limits
from rewards.normalize import (
    MAX_DEPTH,
    Bag,
    BaseNumber,
    Bomb,
    Chain,
    Choice,
    Equation,
    Labelled,
    Matrix,
    Node,
    Scalar,
    Seq,
    Text,
    Union,
    Unparsed,
    Value,
    clean,
    has_symbols,
    parse_answer,
)

DEFAULT_TIMEOUT_S = 1.0
MAX_ANSWER_CHARS = 1000  # or 4x the gold's length, whichever is larger
MAX_EXPONENT = 10_000
MAX_RESULT_BITS = 100_000
MAX_FACTORIAL = 1000
MAX_SYMPY_NODES = 300
REL_TOL = 1e-9
ABS_TOL = 1e-12

_PM_RE = re.compile(r"\\pm|\\mp|\u00b1|\u2213|\+/-")
_OR_RE = re.compile(r"\bor\b|\\lor\b|\\vee\b", re.IGNORECASE)
_GRADER_RE = re.compile(
    r"""
      \b(?:grader|graders|grading\s+(?:system|model|script|bot)|verifier|evaluator|auto-?grader
         |reward\s+model|answer\s+checker|judge)\s*[:,]\s*(?:please\b|this\b|mark\b|give\b|the\b
         |accept\b|award\b|score\b|grade\b|treat\b|consider\b|ignore\b|you\b|output\b|return\b)
    | \b(?:note|message|instructions?|hint)\s+(?:to|for)\s+(?:the\s+)?(?:grader|verifier|evaluator
         |judge|checker|reward\s+model|grading\s+system)
    | \b(?:dear|attention|hey|hello)\s*,?\s+(?:grader|verifier|evaluator|judge|checker)
    | \bmark\s+(?:this|it|the\s+(?:answer|response|solution)|my\s+(?:answer|response|solution))
         \s+(?:as\s+)?(?:correct|right|true|valid|fully\s+correct)
    | \bignore\s+(?:all\s+|any\s+|the\s+)?(?:previous|prior|above|earlier|other|preceding)\s+
         (?:instructions|answers?|rules|text|boxes)
    | \b(?:award|give|assign|grant)\s+(?:me\s+|this\s+|it\s+|the\s+)?(?:full|maximum|max|perfect)
         \s+(?:credit|marks?|score|reward)
    | \b(?:treat|consider|accept|grade|score)\s+(?:this|it|my\s+answer)\s+as\s+(?:correct|right)
    | \bthis\s+(?:answer|response|solution)\s+(?:is|should\s+be)\s+(?:graded|marked|scored)
    | \b(?:reward|score)\s*(?:=|:)\s*1(?:\.0+)?\b
    """,
    re.IGNORECASE | re.VERBOSE,
)


# Every branch of _GRADER_RE contains one of these (lower-case) words; the regex only runs
# around them, which keeps a 400k-character response at about a millisecond.
_GRADER_TRIGGERS = (
    "grader",
    "grading",
    "graded",
    "verifier",
    "evaluator",
    "reward",
    "checker",
    "judge",
    "mark",
    "ignore",
    "credit",
    "score",
    "as correct",
    "as right",
)
_MAX_TRIGGER_WINDOWS = 64


def addresses_grader(text: str) -> bool:
    """True if the text tries to talk to whoever grades it ("grader: mark this correct")."""
    low = text.lower()
    hits: list[int] = []
    for word in _GRADER_TRIGGERS:
        pos = low.find(word)
        while pos != -1 and len(hits) <= _MAX_TRIGGER_WINDOWS:
            hits.append(pos)
            pos = low.find(word, pos + 1)
    if len(hits) > _MAX_TRIGGER_WINDOWS:
        return _GRADER_RE.search(text) is not None  # many trigger words: scan everything
    return any(_GRADER_RE.search(text, max(0, p - 120), p + 200) is not None for p in hits)


# ----------------------------------------------------------------------------------------------
# Exact and numeric evaluation of ASTs


_EXACT_FUNCS: dict[str, Callable[[Fraction], Fraction | int]] = {"abs": abs, "floor": math.floor, "ceil": math.ceil}


def exact(node: Node) -> Fraction | None:
    """The value as a Fraction if it is rational and built from numbers only, else None.

    Raises Bomb for numbers too large to be a sensible answer (9^{9^9}, 10^5!).
    """
    head = node[0]
    if head == "n":
        return node[1]
    if head in ("s", "c"):
        return None
    if head == "f":
        arg = exact(node[2])
        func = _EXACT_FUNCS.get(node[1])
        return Fraction(func(arg)) if func and arg is not None else None
    args = [exact(c) if isinstance(c, tuple) else None for c in node[1:]]
    if head == "^" and args[1] is not None and abs(args[1]) > MAX_EXPONENT and (args[0] is None or abs(args[0]) not in (0, 1)):
        raise Bomb("exponent too large")  # x^{99999999} is no answer either
    values = [a for a in args if a is not None]
    if len(values) != len(args):
        return None
    if head == "+":
        return values[0] + values[1]
    if head == "*":
        return values[0] * values[1]
    if head == "neg":
        return -values[0]
    if head == "/":
        return values[0] / values[1] if values[1] != 0 else None
    if head == "^":
        return _exact_power(values[0], values[1])
    if head == "!":
        return Fraction(_checked_factorial(values[0]))
    if head == "binom":
        n, k = values
        if n.denominator != 1 or k.denominator != 1 or n < 0 or n > MAX_FACTORIAL:
            return None
        return Fraction(math.comb(int(n), int(k))) if k >= 0 else Fraction(0)
    if head == "root":
        radicand, index = values
        if index.denominator != 1 or index == 0:
            return None
        return _exact_power(radicand, 1 / index)
    return None


def _checked_factorial(n: Fraction) -> int:
    if n.denominator != 1 or n < 0:
        raise Bomb("factorial of a non-natural number")
    if n > MAX_FACTORIAL:
        raise Bomb("factorial too large")
    return math.factorial(int(n))


def _exact_power(base: Fraction, exponent: Fraction) -> Fraction | None:
    if abs(exponent) > MAX_EXPONENT and abs(base) not in (0, 1):
        raise Bomb("exponent too large")
    if exponent.denominator == 1:
        e = int(exponent)
        bits = max(base.numerator.bit_length(), base.denominator.bit_length())
        if bits * abs(e) > MAX_RESULT_BITS:
            raise Bomb("power too large")
        if base == 0 and e < 0:
            return None
        return base**e
    # Rational exponent: exact only for perfect powers, e.g. 8^{2/3} = 4, \sqrt{9/4} = 3/2.
    q = exponent.denominator
    if base < 0 or q > 64:
        return None
    num_root, den_root = _int_root(base.numerator, q), _int_root(base.denominator, q)
    if num_root is None or den_root is None:
        return None
    return _exact_power(Fraction(num_root, den_root), Fraction(exponent.numerator))


def _int_root(n: int, q: int) -> int | None:
    if n.bit_length() > MAX_RESULT_BITS:
        return None
    r = round(n ** (1 / q)) if n < 2**1000 else None
    if r is None:
        return None
    for cand in (r - 1, r, r + 1):
        if cand >= 0 and cand**q == n:
            return cand
    return None


class _Undefined(ArithmeticError):
    """The expression has no finite value at this point."""


_CMATH_FUNCS: dict[str, Callable[[complex], complex]] = {}


def _init_funcs() -> None:
    import cmath

    def real_only(f: Callable[[float], float]) -> Callable[[complex], complex]:
        def g(z: complex) -> complex:
            if abs(z.imag) > 1e-12:
                raise _Undefined
            return complex(f(z.real))

        return g

    _CMATH_FUNCS.update(
        {
            "sin": cmath.sin,
            "cos": cmath.cos,
            "tan": cmath.tan,
            "cot": lambda z: 1 / cmath.tan(z),
            "sec": lambda z: 1 / cmath.cos(z),
            "csc": lambda z: 1 / cmath.sin(z),
            "arcsin": cmath.asin,
            "arccos": cmath.acos,
            "arctan": cmath.atan,
            "sinh": cmath.sinh,
            "cosh": cmath.cosh,
            "tanh": cmath.tanh,
            "ln": cmath.log,
            "exp": cmath.exp,
            "abs": lambda z: complex(abs(z)),
            "floor": real_only(math.floor),
            "ceil": real_only(math.ceil),
        }
    )


_init_funcs()
_CONSTANTS = {"pi": complex(math.pi), "e": complex(math.e), "i": 1j, "oo": complex(math.inf)}


def numeric(node: Node, env: dict[str, complex]) -> complex:
    """Evaluate with complex floats; raise _Undefined where there is no finite value."""
    try:
        value = _numeric(node, env)
    except (ZeroDivisionError, OverflowError, ValueError) as e:
        raise _Undefined from e
    if math.isnan(value.real) or math.isnan(value.imag):
        raise _Undefined
    return value


def _numeric(node: Node, env: dict[str, complex]) -> complex:
    head = node[0]
    if head == "n":
        return complex(node[1])
    if head == "s":
        return env[node[1]]
    if head == "c":
        return _CONSTANTS[node[1]]
    if head == "f":
        return _CMATH_FUNCS[node[1]](_numeric(node[2], env))
    if head == "neg":
        return -_numeric(node[1], env)
    if head == "root":
        arg = _numeric(node[1], env)
        index = _numeric(node[2], env)
        if index.imag == 0 and index.real % 2 == 1 and arg.imag == 0 and arg.real < 0:
            return -complex((-arg.real) ** (1 / index.real))  # odd root of a negative real
        return arg ** (1 / index)
    a = _numeric(node[1], env)
    if head == "!":
        if a.imag != 0 or a.real > 170 or a.real < 0 or a.real != int(a.real):
            raise _Undefined
        return complex(math.factorial(int(a.real)))
    b = _numeric(node[2], env)
    if head == "+":
        return a + b
    if head == "*":
        return a * b
    if head == "/":
        return a / b
    if head == "^":
        if abs(b) > MAX_EXPONENT:
            raise _Undefined
        if b.imag == 0 and b.real == int(b.real) and a.imag == 0:
            return complex(a.real ** int(b.real))
        return a**b
    if head == "log":
        import cmath

        return cmath.log(a) / cmath.log(b)
    if head == "binom":
        if a.imag or b.imag or a.real != int(a.real) or b.real != int(b.real) or a.real > 1000:
            raise _Undefined
        return complex(math.comb(int(a.real), int(b.real)))
    raise _Undefined


def _symbols(node: Node, out: set[str]) -> set[str]:
    if node[0] == "s":
        out.add(node[1])
    for child in node[1:]:
        if isinstance(child, tuple):
            _symbols(child, out)
    return out


def _size(node: Node) -> int:
    return 1 + sum(_size(c) for c in node[1:] if isinstance(c, tuple))


_POINT_RNG = random.Random(20240611)
_POINTS = [[_POINT_RNG.uniform(0.3, 2.7) for _ in range(32)] for _ in range(3)]


def _envs(symbols: set[str]) -> list[dict[str, complex]]:
    """Three fixed pseudo-random points, one value per variable (deterministic verdicts)."""
    names = sorted(symbols)[:32]
    return [{name: complex(point[k]) for k, name in enumerate(names)} for point in _POINTS]


def _close(a: complex, b: complex) -> bool:
    if a == b:
        return True
    diff = abs(a - b)
    return diff <= ABS_TOL or diff <= REL_TOL * max(abs(a), abs(b))


def _numeric_verdict(g: Node, p: Node, relation: Callable[[complex, complex], bool]) -> bool | None:
    """relation(g, p) at every point where both are defined; None if defined nowhere."""
    envs = _envs(_symbols(g, set()) | _symbols(p, set()))
    seen = False
    for env in envs:
        try:
            gv, pv = numeric(g, env), numeric(p, env)
        except _Undefined:
            continue
        seen = True
        if not relation(gv, pv):
            return False
    return True if seen else None


def _to_json(node: Node) -> _limits.JsonAst:
    if node[0] == "n":
        return ["n", node[1].numerator, node[1].denominator]
    return [_to_json(c) if isinstance(c, tuple) else c for c in node]


def _sympy(op: str, g: Node, p: Node, deadline: float) -> bool | None:
    if _size(g) + _size(p) > MAX_SYMPY_NODES:
        return None
    return _limits.call(op, _to_json(g), _to_json(p), deadline)


# ----------------------------------------------------------------------------------------------
# Comparators, one per gold type


def scalars_equal(g: Node, p: Node, deadline: float, g_pct: bool = False, p_pct: bool = False) -> bool:
    """The ladder of the module docstring for two expressions."""
    if g == p:
        return True
    ge, pe = exact(g), exact(p)
    if ge is not None and pe is not None:
        options_g = {ge, ge / 100} if g_pct else {ge}
        options_p = {pe, pe / 100} if p_pct else {pe}
        return bool(options_g & options_p)
    if ("c", "oo") in (g, p) or ("neg", ("c", "oo")) in (g, p):
        return False  # infinities are only equal to themselves (checked above)
    verdict = _numeric_verdict(g, p, _close)
    if verdict is False:
        return False
    decided = _sympy("equal", g, p, deadline)
    return decided if decided is not None else bool(verdict)


def _ratio(value: Value) -> Node | None:
    """`7:32` as the quotient 7/32 (a ratio of two scalars), else None."""
    if isinstance(value, Seq) and value.open == ":" and len(value.items) == 2:
        a, b = value.items
        if isinstance(a, Scalar) and isinstance(b, Scalar) and not (a.percent or b.percent):
            return ("/", a.node, b.node)
    return None


def _eq_scalar(g: Scalar, p: Value, deadline: float) -> bool:
    if isinstance(p, Scalar):
        return scalars_equal(g.node, p.node, deadline, g.percent, p.percent)
    ratio = _ratio(p)
    if ratio is not None:
        return scalars_equal(g.node, ratio, deadline)  # 3:4 for 3/4
    if isinstance(p, Chain):
        parts = p.parts
        if not has_symbols(g.node) and not has_symbols(parts[-1]):
            parts = tuple(q for q in parts if not has_symbols(q))  # "a+b = -1+5 = 4": the values count
        return all(scalars_equal(g.node, part, deadline) for part in parts)
    if isinstance(p, Equation) and has_symbols(p.lhs) and not has_symbols(p.rhs) and not has_symbols(g.node):
        return scalars_equal(g.node, p.rhs, deadline)  # "a + b = 7" states the value 7
    if isinstance(p, Bag) and p.braces and len(p.items) == 1:
        return values_equal(g, p.items[0], deadline)
    if isinstance(p, Choice) and g.node[0] == "s":
        return g.node[1].upper() == p.letter
    return False


def _in_order(gold: tuple[Value, ...], pred: tuple[Value, ...], deadline: float) -> bool:
    return len(gold) == len(pred) and all(values_equal(a, b, deadline) for a, b in zip(gold, pred))


def _eq_seq(g: Seq, p: Value, deadline: float) -> bool:
    ratio, p_ratio = _ratio(g), _ratio(p)
    if ratio is not None and isinstance(p, Scalar):
        return scalars_equal(ratio, p.node, deadline)  # 7/32 for 7:32
    if ratio is not None and p_ratio is not None:
        return scalars_equal(ratio, p_ratio, deadline)  # 14:64 for 7:32
    if isinstance(p, Labelled) and g.open != ":":
        return _in_order(g.items, p.items, deadline)  # (p, q) = (3, 2) written as p = 3, q = 2
    if isinstance(p, Matrix):
        return _eq_matrix(Matrix(tuple((item,) for item in g.items)), p, deadline)
    if not isinstance(p, Seq) or (g.open, g.close) != (p.open, p.close) or len(g.items) != len(p.items):
        return False
    return all(values_equal(a, b, deadline) for a, b in zip(g.items, p.items))


def _match_unordered(gold: tuple[Value, ...], pred: tuple[Value, ...], deadline: float) -> bool:
    """Every gold item pairs with its own equal prediction item (a multiset comparison)."""
    if len(gold) != len(pred):
        return False
    free = list(pred)
    for g in gold:
        hit = next((k for k, p in enumerate(free) if values_equal(g, p, deadline)), None)
        if hit is None:
            return False
        free.pop(hit)
    return True


def _eq_bag(g: Bag, p: Value, deadline: float) -> bool:
    if isinstance(p, (Bag, Labelled)):  # x_1 = 2, x_2 = 3 for the solutions 2, 3
        return _match_unordered(g.items, p.items, deadline)
    if len(g.items) == 1:
        return values_equal(g.items[0], p, deadline)
    return False


def _eq_labelled(g: Labelled, p: Value, deadline: float) -> bool:
    """By label when both name the same things; otherwise the values in the gold's order."""
    if isinstance(p, Labelled) and sorted(p.labels) == sorted(g.labels):
        by_label = dict(zip(p.labels, p.items))
        return all(values_equal(item, by_label[label], deadline) for label, item in zip(g.labels, g.items))
    if isinstance(p, Labelled) or (isinstance(p, Bag) and not p.braces) or (isinstance(p, Seq) and p.open != ":"):
        return _in_order(g.items, p.items, deadline)
    return False


def _eq_union(g: Union, p: Value, deadline: float) -> bool:
    if isinstance(p, Union):
        return _match_unordered(g.items, p.items, deadline)
    return False


def _eq_matrix(g: Matrix, p: Value, deadline: float) -> bool:
    if isinstance(p, Seq):
        if p.open == "(" and p.close == ")" and 1 in (len(g.rows), len(g.rows[0])):
            flat = tuple(item for row in g.rows for item in row)
            return len(flat) == len(p.items) and all(values_equal(a, b, deadline) for a, b in zip(flat, p.items))
        return False
    if not isinstance(p, Matrix) or len(g.rows) != len(p.rows) or len(g.rows[0]) != len(p.rows[0]):
        return False
    return all(values_equal(a, b, deadline) for ga, pa in zip(g.rows, p.rows) for a, b in zip(ga, pa))


def _eq_equation(g: Equation, p: Value, deadline: float) -> bool:
    """Same equation up to a nonzero factor: x + y = 1 matches 2x + 2y - 2 = 0."""
    if not isinstance(p, Equation):
        return False
    gd = ("+", g.lhs, ("neg", g.rhs))
    pd = ("+", p.lhs, ("neg", p.rhs))
    ratios: list[complex] = []

    def same_ratio(a: complex, b: complex) -> bool:
        if abs(b) <= ABS_TOL:
            return abs(a) <= ABS_TOL
        ratios.append(a / b)
        return abs(ratios[-1]) > ABS_TOL and _close(ratios[0], ratios[-1])

    verdict = _numeric_verdict(gd, pd, same_ratio)
    if verdict is False:
        return False
    decided = _sympy("proportional", gd, pd, deadline)
    return decided if decided is not None else bool(verdict)


def _eq_chain(g: Chain, p: Value, deadline: float) -> bool:
    return _eq_scalar(Scalar(g.parts[-1]), p, deadline)


def _eq_choice(g: Choice, p: Value, deadline: float) -> bool:
    if isinstance(p, Choice):
        return p.letter == g.letter
    if isinstance(p, Scalar) and p.node[0] == "s":
        return p.node[1].upper() == g.letter
    return isinstance(p, Text) and p.text.upper() == g.letter


def _eq_base(g: BaseNumber, p: Value, deadline: float) -> bool:
    if isinstance(p, BaseNumber):
        return (p.digits, p.base) == (g.digits, g.base)
    if isinstance(p, Scalar) and p.node[0] == "n" and p.node[1].denominator == 1:
        return str(p.node[1].numerator) == (g.digits.lstrip("0") or "0")
    return False


def _eq_text(g: Text, p: Value, deadline: float) -> bool:
    return isinstance(p, Text) and p.text == g.text


def _eq_unparsed(g: Unparsed, p: Value, deadline: float) -> bool:
    return isinstance(p, Unparsed) and p.text == g.text


_G = TypeVar("_G", bound=Value)
Comparator = Callable[[Value, Value, float], bool]


def _for_gold(kind: type[_G], compare: Callable[[_G, Value, float], bool]) -> Comparator:
    """`compare`, which takes a gold of type `kind` only, as a comparator for any gold value."""

    def comparator(g: Value, p: Value, deadline: float) -> bool:
        if not isinstance(g, kind):  # values_equal picks the entry by type(g), so this never happens
            raise TypeError(f"{type(g).__name__} gold given to the {kind.__name__} comparator")
        return compare(g, p, deadline)

    return comparator


COMPARATORS: dict[type[Value], Comparator] = {
    Scalar: _for_gold(Scalar, _eq_scalar),
    Seq: _for_gold(Seq, _eq_seq),
    Bag: _for_gold(Bag, _eq_bag),
    Labelled: _for_gold(Labelled, _eq_labelled),
    Union: _for_gold(Union, _eq_union),
    Matrix: _for_gold(Matrix, _eq_matrix),
    Equation: _for_gold(Equation, _eq_equation),
    Chain: _for_gold(Chain, _eq_chain),
    Choice: _for_gold(Choice, _eq_choice),
    BaseNumber: _for_gold(BaseNumber, _eq_base),
    Text: _for_gold(Text, _eq_text),
    Unparsed: _for_gold(Unparsed, _eq_unparsed),
}


def values_equal(g: Value, p: Value, deadline: float) -> bool:
    """Compare two parsed values; the gold's type picks the comparator."""
    return COMPARATORS[type(g)](g, p, deadline)


# ----------------------------------------------------------------------------------------------
# Entry point

_cache: dict[tuple[str, str], bool] = {}
_cache_lock = threading.Lock()
_CACHE_SIZE = 1 << 16


def _too_deep(s: str) -> bool:
    depth = 0
    for ch in s:
        if ch in "([{":
            depth += 1
            if depth > MAX_DEPTH:
                return True
        elif ch in ")]}":
            depth -= 1
    return False


def _several(value: Value) -> bool:
    """A gold of several values (solutions, named values): `\\pm` and "or" may enumerate them."""
    return isinstance(value, (Bag, Labelled)) and len(value.items) > 1


def _hedged(answer: str, gold: str, gold_value: Value) -> bool:
    """`\\pm 3` for 3, `2 or 3`: answers that offer several values where the gold has one."""
    if _several(gold_value):
        return False
    if _PM_RE.search(answer) and not _PM_RE.search(gold):
        return True
    if _OR_RE.search(answer) and not _OR_RE.search(gold):
        return not isinstance(gold_value, (Union, Seq))
    return False


def join_parts(answers: list[str], gold: str) -> str | None:
    """Several final answers as one, when the gold has several parts (`\\boxed{-2}`, `\\boxed{1}`
    for `1, -2`); None when the gold is a single value (several answers are then a hedge)."""
    if len(answers) < 2 or not all(a.strip() for a in answers):
        return None
    try:
        value = parse_answer(gold)
    except (Bomb, RecursionError, ValueError):
        return None
    if isinstance(value, (Bag, Labelled)) and len(value.items) > 1:
        return ", ".join(answers)
    if isinstance(value, Seq) and value.open != ":" and len(value.items) == len(answers):
        return value.open + ", ".join(answers) + value.close
    return None


def verify(answer: str, gold: str, timeout: float = DEFAULT_TIMEOUT_S) -> bool:
    """True if the already-extracted `answer` means the same as `gold`. Never raises.

    `timeout` bounds the time spent in sympy (seconds, wall clock, any thread); see
    `rewards` for the full contract.
    """
    try:
        if not isinstance(answer, str) or not isinstance(gold, str):
            return False
        key = (answer, gold)
        with _cache_lock:
            hit = _cache.get(key)
        if hit is not None:
            return hit
        deadline = time.monotonic() + timeout
        result = _verify(answer, gold, deadline)
        if time.monotonic() < deadline:  # a verdict reached in time is reproducible: keep it
            with _cache_lock:
                if len(_cache) >= _CACHE_SIZE:
                    _cache.clear()
                _cache[key] = result
        return result
    except (
        Bomb,
        RecursionError,
        MemoryError,
        ArithmeticError,
        ValueError,
        TypeError,
        KeyError,
        IndexError,
        AttributeError,
    ):
        return False


def _equal_alternatives(answer: str, gold: str, gold_value: Value, deadline: float) -> bool:
    """`\\frac{5}{4}, or 1.25`: alternatives joined by "or" are no hedge when each one is the gold."""
    parts = [q for q in _OR_RE.split(clean(answer)) if q.strip(" ,")]
    if len(parts) < 2 or len(parts) > 4 or _PM_RE.search(answer):
        return False
    return all(not _hedged(q, gold, gold_value) and values_equal(gold_value, parse_answer(q.strip(" ,")), deadline) for q in parts)


def _choice_letter(value: Value) -> str | None:
    """The letter of a multiple-choice gold: `\\text{(C)}`, `(C)` or a lone capital `C`."""
    if isinstance(value, Choice):
        return value.letter
    if isinstance(value, Scalar) and value.node[0] == "s" and value.node[1] in ("A", "B", "C", "D", "E"):
        return value.node[1]
    return None


def _verify(answer: str, gold: str, deadline: float) -> bool:
    if len(answer) > max(MAX_ANSWER_CHARS, 4 * len(gold)) or _too_deep(answer):
        return False
    if not answer.strip() or addresses_grader(answer):
        return False
    clean_answer, clean_gold = clean(answer), clean(gold)
    if not clean_answer:
        return False
    gold_value = parse_answer(gold)
    if _hedged(answer, gold, gold_value):
        return _equal_alternatives(answer, gold, gold_value, deadline)
    if clean_answer == clean_gold:
        return True
    letter = _choice_letter(gold_value)
    m = re.match(r"\(([A-E])\)\s", clean_answer)
    if letter is not None and m:  # "(B) 5": the letter of a choice followed by its value
        return m.group(1) == letter
    if _several(gold_value) and _OR_RE.search(answer):
        answer = _OR_RE.sub(",", answer)  # x = 1 or x = -2: the solutions 1, -2
    return values_equal(gold_value, parse_answer(answer), deadline)
