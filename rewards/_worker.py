"""The sympy side of the checker, run in a separate process by `rewards._limits`.

Protocol (one JSON object per line): the parent writes {"op": "equal"|"proportional",
"a": AST, "b": AST}; the worker answers {"result": true|false|null}. null means sympy could not
decide (or raised). The worker announces itself with {"ready": true} once sympy is imported.
ASTs are the tuples of `rewards.normalize` as JSON lists, a rational literal as ["n", p, q].

The parent only sends expressions that passed its structural guards (sizes of numbers,
exponents, factorials) and kills this process when an answer is late; nothing here needs to
police time itself.
"""

from __future__ import annotations

import json
import os
import sys

AS_LIMIT_BYTES = 2 << 30  # a runaway simplify dies with MemoryError instead of swapping


def _to_sympy(node: list, sp):
    """JSON AST -> sympy expression."""
    head = node[0]
    if head == "n":
        return sp.Rational(node[1], node[2])
    if head == "s":
        return sp.Symbol(node[1])
    if head == "c":
        return {"pi": sp.pi, "e": sp.E, "i": sp.I, "oo": sp.oo}[node[1]]
    args = [_to_sympy(child, sp) if isinstance(child, list) else child for child in node[1:]]
    if head == "+":
        return args[0] + args[1]
    if head == "*":
        return args[0] * args[1]
    if head == "/":
        return args[0] / args[1]
    if head == "^":
        return args[0] ** args[1]
    if head == "neg":
        return -args[0]
    if head == "!":
        return sp.factorial(args[0])
    if head == "binom":
        return sp.binomial(args[0], args[1])
    if head == "log":
        return sp.log(args[0], args[1])
    if head == "root":
        arg, index = args
        if index.is_integer and index.is_odd and arg.is_real:
            return sp.real_root(arg, index)
        return sp.root(arg, index)
    if head == "f":
        funcs = {
            "sin": sp.sin,
            "cos": sp.cos,
            "tan": sp.tan,
            "cot": sp.cot,
            "sec": sp.sec,
            "csc": sp.csc,
            "arcsin": sp.asin,
            "arccos": sp.acos,
            "arctan": sp.atan,
            "sinh": sp.sinh,
            "cosh": sp.cosh,
            "tanh": sp.tanh,
            "ln": sp.log,
            "exp": sp.exp,
            "abs": sp.Abs,
            "floor": sp.floor,
            "ceil": sp.ceiling,
        }
        return funcs[node[1]](_to_sympy(node[2], sp))
    raise ValueError(f"unknown node {head!r}")


def _equal(a, b, sp) -> bool | None:
    diff = a - b
    if diff == 0:
        return True
    if sp.simplify(diff) == 0:
        return True
    return diff.equals(0)


def _proportional(a, b, sp) -> bool | None:
    """a = k * b for a nonzero constant k (the same equation written twice)."""
    if b == 0:
        return a == 0
    ratio = sp.simplify(a / b)
    if ratio.free_symbols:
        return False
    return bool(ratio != 0 and ratio.is_finite)


OPS = {"equal": _equal, "proportional": _proportional}


def main() -> None:
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (AS_LIMIT_BYTES, AS_LIMIT_BYTES))
    except (ImportError, ValueError, OSError):
        pass
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything sympy prints goes to stderr, never into the protocol
    import sympy as sp

    out.write('{"ready": true}\n')
    for line in sys.stdin:
        try:
            req = json.loads(line)
            result = OPS[req["op"]](_to_sympy(req["a"], sp), _to_sympy(req["b"], sp), sp)
            result = None if result is None else bool(result)
        except Exception:  # noqa: BLE001 (any sympy failure means "cannot decide")
            result = None
        out.write(json.dumps({"result": result}) + "\n")


if __name__ == "__main__":
    main()
