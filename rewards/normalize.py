"""Turn an answer string (LaTeX or plain text) into a small typed value that can be compared.

Two stages:

1. `clean(s)` rewrites surface forms to one spelling: math delimiters, `\\left`/`\\right`,
   spacing commands, `\\dfrac`, `\\frac12`, thousands separators (`10,\\!000`, `1{,}000`,
   `1\\,000`), degrees, dollars, `\\text{}` wrappers and trailing units (`5.4 \\text{ cents}`,
   `864 square inches`), a leading `x \\in`, a trailing full stop.
2. `parse_answer(s)` reads the cleaned string into one of the `Value` types below: a scalar
   expression (a tiny AST of tuples, no sympy), a tuple or interval (brackets kept), a set or an
   unordered bare list, a union of intervals, a matrix, an equation, a multiple-choice letter, a
   number in another base, or plain text. A `\\pm` inside a list element expands it into two.

Everything here is pure Python over strings whose size the caller has already capped
(`equivalence.MAX_ANSWER_CHARS`); nothing imports sympy. A string that cannot be read becomes
`Unparsed` and can then only match by exact cleaned spelling.

The AST is built from tuples so that it is hashable, cheap, and can be sent as JSON to the
sympy worker (`rewards._worker`):
    ("n", Fraction)            exact rational literal (decimals and 1.5e-3 are exact too)
    ("s", name)                variable, e.g. "x", "a_1", "theta"
    ("c", "pi"|"e"|"i"|"oo")   constants
    ("+", a, b) ("*", a, b) ("/", a, b) ("^", a, b) ("neg", a)
    ("f", name, a)             sin, cos, ..., ln, exp, abs, floor, ceil
    ("log", a, base) ("root", a, index) ("!", a) ("binom", a, b)
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from fractions import Fraction

Node = tuple  # an AST node as described in the module docstring

MAX_DIGITS = 400  # a longer literal is a bomb, not an answer
MAX_SCI_EXPONENT = 400  # 1e400 is still exact; 1e99999 would build a 100k-digit integer
MAX_ITEMS = 64  # list, tuple, set and matrix entries
MAX_DEPTH = 40  # bracket nesting


class ParseError(ValueError):
    """The string is not an expression this parser understands."""


class Bomb(ValueError):
    """The string describes a number too large to handle (e.g. 9^{9^{9^9}}, 10^5!, 1e99999)."""


# ----------------------------------------------------------------------------------------------
# Values


@dataclass(frozen=True)
class Scalar:
    """One mathematical expression. `percent` is set when it was written with a % sign."""

    node: Node
    percent: bool = False


@dataclass(frozen=True)
class Seq:
    """A tuple, point or interval: order matters and so do the brackets, e.g. ("(", "]")."""

    open: str
    close: str
    items: tuple[Value, ...]


@dataclass(frozen=True)
class Bag:
    """An unordered collection: a set `\\{1, 2\\}` or a bare list `1, 2` of solutions."""

    items: tuple[Value, ...]
    braces: bool  # written as a set with \\{ \\}


@dataclass(frozen=True)
class Union:
    """A union of intervals; the order of the pieces does not matter."""

    items: tuple[Value, ...]


@dataclass(frozen=True)
class Matrix:
    """A matrix or vector written with \\begin{pmatrix} (or bmatrix, matrix, array)."""

    rows: tuple[tuple[Value, ...], ...]


@dataclass(frozen=True)
class Labelled:
    """Named values `k = 45, n = 2` or `AB = 4, CD = 5`: several different labels, each with a value."""

    labels: tuple[str, ...]
    items: tuple[Value, ...]


@dataclass(frozen=True)
class Equation:
    """`lhs = rhs` whose left side is not a lone variable (e.g. a plane `x + y - z = 1`)."""

    lhs: Node
    rhs: Node


@dataclass(frozen=True)
class Chain:
    """`x = 2 \\cdot 3 = 6`: several expressions claimed equal; each must match the gold."""

    parts: tuple[Node, ...]


@dataclass(frozen=True)
class Choice:
    """A multiple-choice letter written as (C) or \\text{(C)}."""

    letter: str


@dataclass(frozen=True)
class BaseNumber:
    """A numeral in another base, e.g. 52_8: compared digit for digit."""

    digits: str
    base: int


@dataclass(frozen=True)
class Text:
    """A word answer (a name, a direction, 'even'), lower-cased, letters and digits only."""

    text: str


@dataclass(frozen=True)
class Unparsed:
    """Anything else: it can only match by identical cleaned spelling."""

    text: str


Value = Scalar | Seq | Bag | Labelled | Union | Matrix | Equation | Chain | Choice | BaseNumber | Text | Unparsed


# ----------------------------------------------------------------------------------------------
# Cleaning

_UNICODE = {
    "\u2208": r"\in ",
    "\u2205": r"\emptyset ",
    "\u211d": r"\mathbb{R}",
    "\u2212": "-",
    "\u2013": "-",
    "\u2014": "-",
    "\u00d7": r"\times ",
    "\u00b7": r"\cdot ",
    "\u22c5": r"\cdot ",
    "\u00f7": r"\div ",
    "\u03c0": r"\pi ",
    "\u00b0": r"^\circ ",
    "\u221a": r"\sqrt",
    "\u221e": r"\infty ",
    "\u2264": r"\le ",
    "\u2265": r"\ge ",
    "\u00b1": r"\pm ",
    "\u2213": r"\mp ",
    "\u222a": r"\cup ",
    "\u2260": r"\ne ",
    "\u00a0": " ",
    "\u2009": " ",
    "\u202f": " ",
    "\u200b": "",
    "\u2248": r"\approx ",
}
_UNICODE_RE = re.compile("|".join(map(re.escape, _UNICODE)))

_DELIMS_RE = re.compile(r"\$|\\\(|\\\)|\\\[|\\\]|\\displaystyle|\\textstyle")
_SIZING_RE = re.compile(r"\\(?:left|right|bigl|bigr|Bigl|Bigr|biggl|biggr|big|Big|bigg|Bigg)(?![a-zA-Z])\s*")
_THOUSANDS_MARK_RE = re.compile(r"(?<=\d)(?:,\\!\s*|\{,\}|\\,(?=\d{3}(?!\d)))(?=\d)")
_SPACING_RE = re.compile(r"\\[,;:! ]|\\q?quad(?![a-zA-Z])|\\enspace|\\thinspace|~")
_FRAC_ALIAS_RE = re.compile(r"\\[dtc]frac(?![a-zA-Z])")
_FRAC_DIGITS_RE = re.compile(r"\\(frac|binom)\s*(\d)\s*(\d)")
_FRAC_DIGIT_GROUP_RE = re.compile(r"\\(frac|binom)\s*([0-9a-zA-Z])\s*\{")
_FRAC_GROUP_DIGIT_RE = re.compile(r"\\(frac|binom)\s*\{([^{}]*)\}\s*([0-9a-zA-Z])")
_SQRT_CHAR_RE = re.compile(r"\\sqrt\s*([0-9a-zA-Z])")
_DEGREES_RE = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|\\circ|\\degree|\^\s*\{\s*\\text\{o\}\s*\}")
_DOLLAR_RE = re.compile(r"\\\$|\\textdollar")
_TEXT_UNIT_RE = re.compile(  # 5\text{ m}, 3 \mathrm{km/h}, 9\,\text{cm}^2: a short unit after a number
    r"(?<=[\d}])\s*(?:\\[,;: ]\s*)*\\(?:text|mathrm|textnormal|textrm|mbox)\s*\{\s*[a-zA-Z]{1,3}(?:/[a-zA-Z]{1,3})?"
    r"(?:\^\{?[23]\}?)?\s*\}(?:\s*\^\s*\{?[23]\}?)?\s*$"
)
_SLASH_UNIT_RE = re.compile(r"(?<=\d)\s*[a-zA-Z]{1,3}/[a-zA-Z]{1,3}$")  # 12 m/s, 60 km/h
_SETS = [
    (re.compile(r"\\mathbb\s*\{?\s*R\s*\}?"), r"(-\\infty, \\infty)"),
    (re.compile(r"\\(?:varnothing|emptyset)(?![a-zA-Z])|\\\{\s*\\\}|^\{\s*\}$"), r"\\emptyset"),
    (re.compile(r"\b(?:infinity|inf)\b", re.IGNORECASE), r"\\infty"),
    (re.compile(r"\*\*"), "^"),  # Python's power
]
_TEXT_CMD_RE = re.compile(
    r"\\(?:text|textbf|textit|textrm|textsf|texttt|textnormal|textup|mbox|hbox|mathrm|mathbf|mathit|mathsf|mathtt|"
    r"operatorname|emph|boldsymbol|bm)\s*\{([^{}]*)\}"
)
_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_X_IN_RE = re.compile(r"^\\?[a-zA-Z]+\s*\\in(?![a-zA-Z])\s*")
_APPROX_TAIL_RE = re.compile(r"^(.*?[\d}].*?)\s*(?:\\approx|\\sim|\\simeq)\s*-?[\d.,]+[^=]*$")
_PLAIN_THOUSANDS_RE = re.compile(r"-?[1-9]\d{0,2}(?:,\d{3})+(?:\.\d+)?")
_SPACE_THOUSANDS_RE = re.compile(r"-?[1-9]\d{0,2}(?: \d{3})+(?:\.\d+)?")

# Trailing words that are not units and must survive (so that "2 or 3" stays a hack and
# "288 pi" stays a number times pi).
_NOT_UNITS = {
    "or",
    "and",
    "to",
    "pi",
    "sin",
    "cos",
    "tan",
    "cot",
    "sec",
    "csc",
    "log",
    "ln",
    "exp",
    "sqrt",
    "infty",
    "infinity",
    "not",
    "nor",
    "either",
    "i",
    "e",
    "percent",
}
_ATTACHED_UNITS_RE = re.compile(
    r"(?<=\d)\s*(?:cm|mm|km|ft|yd|mi|in|kg|mg|lbs|lb|oz|sec|min|hrs|hr|mph|ml|mL|cents?|"
    r"dollars?|degrees?|units?|inches|feet|meters|metres|miles|hours|minutes|seconds|days|"
    r"years|pounds|ounces|grams|liters|litres|gallons)(?:\s*\^\s*\{?[23]\}?)?\.?$"
)
_TRAILING_WORD_RE = re.compile(r"\s+([a-zA-Z]{2,}\.?)(?:\s*\^\s*\{?[23]\}?)?\s*$")


def _unwrap_boxed(s: str) -> str:
    """`\\boxed{x}` anywhere -> the content of the last box (answers are sometimes passed boxed)."""
    last = None
    for m in _BOXED_RE.finditer(s):
        last = m
    if last is None:
        return s
    depth, i = 1, last.end()
    while i < len(s):
        ch = s[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return s[last.end() : i]
        i += 1
    return s


def _strip_units(s: str) -> str:
    """Drop trailing unit words ('cm^2', 'square inches', 'dollars') after a number."""
    s = _ATTACHED_UNITS_RE.sub("", s).rstrip()
    for _ in range(4):  # "cubic centimeters per second" is as long as units get
        m = _TRAILING_WORD_RE.search(s)
        if m is None or m.group(1).rstrip(".").lower() in _NOT_UNITS:
            return s
        rest = s[: m.start()].rstrip()
        if not re.search(r"[\d}]|\\pi", rest):
            return s
        s = rest
    return s


@functools.lru_cache(maxsize=8192)
def clean(s: str) -> str:
    """One spelling per answer: see the module docstring for the list of rewrites."""
    s = _UNICODE_RE.sub(lambda m: _UNICODE[m.group(0)], s)
    s = _unwrap_boxed(s.strip())
    s = s.replace("\\\\", r" \cr ")  # matrix row breaks, before \, and friends are read
    s = _DOLLAR_RE.sub(" ", s).replace("`", " ")
    s = re.sub(r"\\(?:blacksquare|square|qed|Box)(?![a-zA-Z])|\\hfill", " ", s)  # end-of-proof marks
    s = _DELIMS_RE.sub(" ", s).strip()
    s = _TEXT_UNIT_RE.sub("", s)
    for pattern, spelling in _SETS:
        s = pattern.sub(spelling, s)
    s = s.replace(r"\left.", "").replace(r"\right.", "").replace(r"\langle", "(").replace(r"\rangle", ")")
    s = _SIZING_RE.sub("", s)
    s = _THOUSANDS_MARK_RE.sub("", s)
    s = _SPACING_RE.sub(" ", s)
    s = _FRAC_ALIAS_RE.sub(r"\\frac", s)
    s = _FRAC_DIGITS_RE.sub(r"\\\1{\2}{\3}", s)
    s = _FRAC_DIGIT_GROUP_RE.sub(r"\\\1{\2}{", s)
    s = _FRAC_GROUP_DIGIT_RE.sub(r"\\\1{\2}{\3}", s)
    s = _SQRT_CHAR_RE.sub(r"\\sqrt{\1}", s)
    s = _DEGREES_RE.sub(" ", s)
    s = s.replace(r"\%", "%").replace(r"\mid", "|")
    # Unwrap \text{..} (innermost first); a unit at the end is dropped by _strip_units below.
    for _ in range(4):
        s2 = _TEXT_CMD_RE.sub(lambda m: " " + m.group(1) + " ", s)
        if s2 == s:
            break
        s = s2
    s = _X_IN_RE.sub("", s.strip())
    s = re.sub(r"^(?:approximately|approx\.?|about|around|roughly|exactly|precisely)\s+", "", s, flags=re.IGNORECASE)
    m = _APPROX_TAIL_RE.match(s)  # "\frac{\sqrt3}{3} \approx 0.577": the exact value is the answer
    if m:
        s = m.group(1)
    s = re.sub(r"\s+and\s+", ", ", s)  # "3 and 5" is the list 3, 5
    s = " ".join(s.split())
    s = s.rstrip(".;, ").lstrip(":")
    s = re.sub(r"\s*\^\s*", "^", s)
    s = _SLASH_UNIT_RE.sub("", s)
    s = _strip_units(s)
    s = re.sub(r"^(?:degrees?|percent)\b|\b(?:degrees?)$", "", s).strip()
    s = re.sub(r"\s*percent$", "%", s)
    # 1,000 and 1 000 are one number when that is the whole answer (not a list like 1,-2).
    if _PLAIN_THOUSANDS_RE.fullmatch(s) or _SPACE_THOUSANDS_RE.fullmatch(s):
        s = s.replace(",", "").replace(" ", "")
    return s.strip()


# ----------------------------------------------------------------------------------------------
# Tokens

_FUNCS = {
    "sin",
    "cos",
    "tan",
    "cot",
    "sec",
    "csc",
    "arcsin",
    "arccos",
    "arctan",
    "sinh",
    "cosh",
    "tanh",
    "ln",
    "log",
    "exp",
}
_GREEK = {
    "alpha",
    "beta",
    "gamma",
    "delta",
    "epsilon",
    "varepsilon",
    "zeta",
    "eta",
    "theta",
    "vartheta",
    "iota",
    "kappa",
    "lambda",
    "mu",
    "nu",
    "xi",
    "rho",
    "sigma",
    "tau",
    "upsilon",
    "phi",
    "varphi",
    "chi",
    "psi",
    "omega",
    "Gamma",
    "Delta",
    "Theta",
    "Lambda",
    "Xi",
    "Sigma",
    "Phi",
    "Psi",
    "Omega",
}
_RELATIONS = {
    "<": "<",
    ">": ">",
    r"\lt": "<",
    r"\gt": ">",
    r"\le": "<=",
    r"\leq": "<=",
    r"\leqslant": "<=",
    r"\ge": ">=",
    r"\geq": ">=",
    r"\geqslant": ">=",
    "<=": "<=",
    ">=": ">=",
}
_EQUALS = {"=", r"\approx", r"\equiv"}
_TIMES = {"*", r"\cdot", r"\times", r"\ast"}
_DIVIDE = {"/", r"\div", r"\over"}
_TOKEN_RE = re.compile(
    r"(?P<num>(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+(?![a-zA-Z]))?)"
    r"|(?P<bare>(?:arcsin|arccos|arctan|sinh|cosh|tanh|sin|cos|tan|cot|sec|csc|log|ln|exp|sqrt|pi)(?![a-zA-Z]))"
    r"|(?P<cmd>\\[a-zA-Z]+|\\[{}|])"
    r"|(?P<rel><=|>=)"
    r"|(?P<char>[a-zA-Z+\-*/^_(){}\[\]|!,;:=<>%&'])"
    r"|(?P<space>\s+)"
)
_OPENERS = {"(": ")", "[": "]", "{": "}", r"\{": r"\}", r"\lfloor": r"\rfloor", r"\lceil": r"\rceil"}
_CLOSERS = {")", "]", "}", r"\}", r"\rfloor", r"\rceil"}


@functools.lru_cache(maxsize=8192)
def tokenize(s: str) -> tuple[str, ...]:
    """Split a cleaned string into tokens; raise ParseError on a character we do not know."""
    tokens: list[str] = []
    pos = 0
    while pos < len(s):
        m = _TOKEN_RE.match(s, pos)
        if m is None:
            raise ParseError(f"unexpected character {s[pos]!r}")
        pos = m.end()
        kind = m.lastgroup
        if kind == "space":
            continue
        text = m.group(0)
        if kind == "bare":
            text = "\\" + text
        elif kind == "num" and len(text) > MAX_DIGITS:
            raise Bomb("numeric literal too long")
        tokens.append(text)
    return tuple(tokens)


def _split_top(tokens: tuple[str, ...], seps: set[str]) -> list[tuple[str, ...]]:
    """Split at separators that are not inside brackets. Raise ParseError on unbalanced input.

    `(` may close with `]` and `[` with `)`: that is how half-open intervals are written.
    """
    parts: list[tuple[str, ...]] = []
    depth, start = 0, 0
    for i, tok in enumerate(tokens):
        if tok in _OPENERS:
            depth += 1
            if depth > MAX_DEPTH:
                raise ParseError("nesting too deep")
        elif tok in _CLOSERS:
            depth -= 1
            if depth < 0:
                raise ParseError("unbalanced brackets")
        elif depth == 0 and tok in seps:
            parts.append(tokens[start:i])
            start = i + 1
    if depth != 0:
        raise ParseError("unbalanced brackets")
    parts.append(tokens[start:])
    return parts


def _wraps_all(tokens: tuple[str, ...]) -> bool:
    """True if the first token is an opener whose partner is the last token."""
    if len(tokens) < 2 or tokens[0] not in _OPENERS or tokens[-1] not in _CLOSERS:
        return False
    depth = 0
    for i, tok in enumerate(tokens):
        if tok in _OPENERS:
            depth += 1
        elif tok in _CLOSERS:
            depth -= 1
            if depth == 0:
                return i == len(tokens) - 1
    return False


# ----------------------------------------------------------------------------------------------
# Expressions


class _ExprParser:
    """Recursive descent over tokens: sums of products of powers of atoms, LaTeX flavoured.

    Implicit multiplication (`2x`, `3\\sqrt{2}`, `(a+5)(b+2)`) binds like `*`; an integer
    written right before `\\frac{int}{int}` is a mixed number (`1\\frac{4}{5}` = 9/5), as in
    MATH's answers. A function without parentheses takes the following product as its argument
    (`\\sin 2x` = sin(2x)) and stops before the next function (`\\sin x \\cos x`).
    """

    def __init__(self, tokens: tuple[str, ...]):
        self.toks = tokens
        self.i = 0

    def parse(self) -> Node:
        if not self.toks:
            raise ParseError("empty expression")
        node = self.expr()
        if self.i != len(self.toks):
            raise ParseError(f"unexpected token {self.toks[self.i]!r}")
        return node

    def peek(self) -> str | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self, expected: str | None = None) -> str:
        tok = self.peek()
        if tok is None or (expected is not None and tok != expected):
            raise ParseError(f"expected {expected!r}, got {tok!r}")
        self.i += 1
        return tok

    def expr(self) -> Node:
        node = self.term()
        while self.peek() in ("+", "-"):
            op = self.take()
            rhs = self.term()
            node = ("+", node, rhs if op == "+" else ("neg", rhs))
        return node

    def starts_atom(self, tok: str | None) -> bool:
        if tok is None:
            return False
        if tok[0].isdigit() or tok[0] == "." or tok.isalpha() or tok in ("(", "{"):
            return True
        return tok.startswith("\\") and (
            tok[1:] in _FUNCS or tok[1:] in _GREEK or tok in (r"\frac", r"\sqrt", r"\pi", r"\infty", r"\binom", r"\lfloor", r"\lceil")
        )

    def term(self) -> Node:
        node = self.unary()
        while True:
            tok = self.peek()
            if tok in _TIMES:
                self.take()
                node = ("*", node, self.unary())
            elif tok in _DIVIDE:
                self.take()
                node = ("/", node, self.unary())
            elif self.starts_atom(tok):
                literal_int = _is_int_literal(node) or (node[0] == "neg" and _is_int_literal(node[1]))
                frac_start = tok == r"\frac"
                rhs = self.power()
                if literal_int and frac_start and _is_simple_fraction(rhs):
                    node = ("neg", ("+", node[1], rhs)) if node[0] == "neg" else ("+", node, rhs)
                else:
                    node = ("*", node, rhs)
            else:
                return node

    def unary(self) -> Node:
        if self.peek() == "-":
            self.take()
            return ("neg", self.unary())
        if self.peek() == "+":
            self.take()
            return self.unary()
        return self.power()

    def power(self) -> Node:
        base = self.postfix()
        if self.peek() == "^":
            self.take()
            return ("^", base, self.exponent())
        return base

    def exponent(self) -> Node:
        if self.peek() == "-":
            self.take()
            return ("neg", self.exponent())
        if self.peek() == "{":
            return self.group()
        return self.power()

    def postfix(self) -> Node:
        node = self.atom()
        while self.peek() == "!":
            self.take()
            node = ("!", node)
        return node

    def group(self, close: str = "}") -> Node:
        self.take()
        node = self.expr()
        self.take(close)
        return node

    def atom(self) -> Node:
        tok = self.peek()
        if tok is None:
            raise ParseError("unexpected end")
        if tok[0].isdigit() or tok[0] == ".":
            self.take()
            return ("n", _number(tok))
        if tok.isalpha():
            self.take()
            return self.symbol(tok)
        if tok == "(":
            return self.group(")")
        if tok == "[":
            return self.group("]")
        if tok == "{":
            return self.group("}")
        if tok == "|":
            self.take()
            node = self.expr()
            self.take("|")
            return ("f", "abs", node)
        if tok == r"\lfloor":
            return ("f", "floor", self.group(r"\rfloor"))
        if tok == r"\lceil":
            return ("f", "ceil", self.group(r"\rceil"))
        if tok == r"\frac":
            self.take()
            num = self.braced()
            return ("/", num, self.braced())
        if tok == r"\binom":
            self.take()
            top = self.braced()
            return ("binom", top, self.braced())
        if tok == r"\sqrt":
            self.take()
            index = None
            if self.peek() == "[":
                index = self.group("]")
            arg = self.braced() if self.peek() == "{" else self.power()
            return ("root", arg, index) if index is not None else ("^", arg, ("n", Fraction(1, 2)))
        if tok == r"\pi":
            self.take()
            return ("c", "pi")
        if tok == r"\infty":
            self.take()
            return ("c", "oo")
        if tok.startswith("\\") and tok[1:] in _GREEK:
            self.take()
            return self.symbol(tok[1:])
        if tok.startswith("\\") and tok[1:] in _FUNCS:
            return self.function()
        raise ParseError(f"unexpected token {tok!r}")

    def braced(self) -> Node:
        if self.peek() != "{":
            raise ParseError("expected {")
        return self.group("}")

    def symbol(self, name: str) -> Node:
        if self.peek() == "_":
            self.take()
            if self.peek() == "{":
                self.take()
                sub = []
                while self.peek() not in ("}", None):
                    sub.append(self.take())
                self.take("}")
                name = f"{name}_{''.join(sub)}"
            else:
                name = f"{name}_{self.take()}"
        if name == "i":
            return ("c", "i")
        if name == "e":
            return ("c", "e")
        return ("s", name)

    def function(self) -> Node:
        name = self.take()[1:]
        base: Node | None = None
        power: Node | None = None
        if name == "log" and self.peek() == "_":
            self.take()
            base = self.braced() if self.peek() == "{" else self.atom()
        if self.peek() == "^":
            self.take()
            power = self.exponent()
        if self.peek() in ("(", "["):
            arg = self.group(")" if self.peek() == "(" else "]")
        elif self.peek() == "{":
            arg = self.group("}")
        else:
            arg = self.power()
            while self.starts_atom(self.peek()) and not _is_function_token(self.peek()):
                arg = ("*", arg, self.power())
        if name == "log" and base is not None:
            node: Node = ("log", arg, base)
        elif name in ("log", "ln"):
            node = ("f", "ln", arg)
        else:
            node = ("f", name, arg)
        if power is not None:
            node = ("^", node, power)
        return node


def has_symbols(node: Node) -> bool:
    """True if a variable occurs anywhere in the AST."""
    if node[0] == "s":
        return True
    return any(isinstance(c, tuple) and has_symbols(c) for c in node[1:])


def _is_function_token(tok: str | None) -> bool:
    return tok is not None and tok.startswith("\\") and tok[1:] in _FUNCS


def _is_int_literal(node: Node) -> bool:
    return node[0] == "n" and node[1].denominator == 1 and node[1] >= 0


def _is_simple_fraction(node: Node) -> bool:
    return node[0] == "/" and _is_int_literal(node[1]) and _is_int_literal(node[2])


def _number(tok: str) -> Fraction:
    mantissa, _, exp = tok.lower().partition("e")
    if exp and abs(int(exp)) > MAX_SCI_EXPONENT:
        raise Bomb("scientific exponent too large")
    return Fraction(mantissa) * (Fraction(10) ** int(exp) if exp else 1)


def parse_expr(tokens: tuple[str, ...]) -> Node:
    """Parse tokens as one scalar expression."""
    return _ExprParser(tokens).parse()


# ----------------------------------------------------------------------------------------------
# Values from strings

_MATRIX_RE = re.compile(r"^\\begin\{(?P<env>[pbvBV]?matrix|array)\}(?:\{[^{}]*\})?(?P<body>.*)\\end\{(?P=env)\}$", re.DOTALL)
_CHOICE_RE = re.compile(r"^\(\s*([A-Ea-e])\s*\)$")
_BASE_RE = re.compile(r"^([0-9A-Za-z]+)_\{?(\d+)\}?$")
_WORD_RE = re.compile(r"(?<!\\)\b[a-zA-Z]{3,}")
_KNOWN_WORDS = _FUNCS | {"sqrt", "pi", "infty", "frac", "dfrac", "cdot", "times", "cup", "pm", "mp"}


def _looks_like_text(s: str) -> bool:
    """A word of three or more letters that is not a LaTeX command or a function name."""
    stripped = re.sub(r"\\[a-zA-Z]+|_\{[^{}]*\}", " ", s)  # commands and subscripts (S_{ABC}) are not words
    if "=" in stripped:
        stripped = re.sub(r"\b[A-Z]{2,4}\b", " ", stripped)  # points named in a labelled value: AB = 4
    if _SHORT_WORD_RE.search(stripped):
        return True  # "no", "2 to 5": words, not the products n*o or t*o
    return any(w.group(0).lower() not in _KNOWN_WORDS for w in _WORD_RE.finditer(stripped))


_SHORT_WORD_RE = re.compile(r"(?<![\\\w])(?:no|No|NO|to|of|is)(?![\w(])")


def _text_key(s: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9]+", " ", s.lower()).split())


def _expand_pm(tokens: tuple[str, ...]) -> list[tuple[str, ...]]:
    """`1 \\pm \\sqrt{5}` -> [`1 + \\sqrt{5}`, `1 - \\sqrt{5}`] (top level, at most two signs)."""
    variants = [tokens]
    for _ in range(2):
        out = []
        for toks in variants:
            idx = _top_level_index(toks, (r"\pm", r"\mp"))
            if idx is None:
                out.append(toks)
                continue
            first, second = ("+", "-") if toks[idx] == r"\pm" else ("-", "+")
            out.append(toks[:idx] + (first,) + toks[idx + 1 :])
            out.append(toks[:idx] + (second,) + toks[idx + 1 :])
        variants = out
    if any(_top_level_index(toks, (r"\pm", r"\mp")) is not None for toks in variants):
        raise ParseError("too many \\pm")
    return variants


def _top_level_index(tokens: tuple[str, ...], targets: tuple[str, ...]) -> int | None:
    depth = 0
    for i, tok in enumerate(tokens):
        if tok in _OPENERS:
            depth += 1
        elif tok in _CLOSERS:
            depth -= 1
        elif depth == 0 and tok in targets:
            return i
    return None


def _relation_to_interval(parts: list[tuple[str, ...]], ops: list[str]) -> Value:
    """`a < x <= b`, `x > a`, `x \\le b` -> an interval Seq; anything else is Unparsed."""
    nodes = [parse_expr(p) for p in parts]
    lone = [i for i, n in enumerate(nodes) if n[0] == "s"]
    oo = ("c", "oo")
    if len(nodes) == 2 and len(lone) >= 1:
        var = lone[0]
        other = nodes[1 - var]
        op = ops[0] if var == 0 else {"<": ">", ">": "<", "<=": ">=", ">=": "<="}[ops[0]]
        # now read as `x op other`
        if op in ("<", "<="):
            return Seq("(", ")" if op == "<" else "]", (Scalar(("neg", oo)), Scalar(other)))
        return Seq("(" if op == ">" else "[", ")", (Scalar(other), Scalar(oo)))
    if len(nodes) == 3 and nodes[1][0] == "s":
        if ops[0][0] == ops[1][0] == "<":
            lo, hi, lop, hop = nodes[0], nodes[2], ops[0], ops[1]
        elif ops[0][0] == ops[1][0] == ">":
            lo, hi, lop, hop = nodes[2], nodes[0], ops[1], ops[0]
        else:
            raise ParseError("mixed inequality")
        return Seq("(" if lop in ("<", ">") else "[", ")" if hop in ("<", ">") else "]", (Scalar(lo), Scalar(hi)))
    raise ParseError("unsupported inequality")


def _parse_element(tokens: tuple[str, ...]) -> Value:
    """One item of a list (or the whole answer when it is not a list)."""
    if not tokens:
        raise ParseError("empty item")
    if _wraps_all(tokens) and tokens[0] in ("(", "[") and tokens[-1] in (")", "]"):
        inner = tokens[1:-1]
        items = _split_top(inner, {","})
        if len(items) > 1:
            if len(items) > MAX_ITEMS:
                raise Bomb("too many items")
            return Seq(tokens[0], tokens[-1], tuple(_parse_element(t) for t in items))
        if len(inner) == 1 and inner[0].isalpha() and inner[0].upper() in "ABCDE":
            return Choice(inner[0].upper())
    if _wraps_all(tokens) and (tokens[0] == r"\{" or (tokens[0] == "{" and "," in tokens)):  # {1, 2} is a set
        items = _split_top(tokens[1:-1], {","})
        return Bag(tuple(v for t in items for v in _parse_items(t)), braces=True)
    rel_parts = _split_top(tokens, set(_RELATIONS))
    if len(rel_parts) > 1:
        ops, idx = [], 0
        for part in rel_parts[:-1]:
            idx += len(part)
            ops.append(_RELATIONS[tokens[idx]])
            idx += 1
        return _relation_to_interval(rel_parts, ops)
    eq_parts = _split_top(tokens, _EQUALS)
    if len(eq_parts) == 2 and _is_label(eq_parts[0]) and eq_parts[1]:
        return _parse_element(eq_parts[1])  # (p, q) = (3, 2), AB = 4, f(x) = x^2: the value counts
    if len(eq_parts) > 1:
        try:
            nodes = [parse_expr(p) for p in eq_parts]
        except ParseError:
            if len(eq_parts) < 3:
                raise
            nodes = [parse_expr(p) for p in eq_parts[1:]]  # "9 \& 2 = \frac{...}{...} = v": the values
        if nodes[0][0] == "s":  # x = 3, y = 2x + 3: the value is the right side
            nodes = nodes[1:]
        if len(nodes) == 1:
            return Scalar(nodes[0])
        if len(eq_parts) == 2 and any(map(has_symbols, nodes)):
            return Equation(nodes[0], nodes[1])
        return Chain(tuple(nodes))
    ratio = _split_top(tokens, {":"})
    if len(ratio) > 1:
        return Seq(":", ":", tuple(_parse_element(t) for t in ratio))
    percent = tokens[-1] == "%"
    if percent:
        tokens = tokens[:-1]
    return Scalar(parse_expr(tokens), percent)


_LABEL_TOKENS = {"(", ")", "{", "}", "_", ",", ":", "'", r"\angle", r"\triangle", r"\overline", r"\vec"}


def _is_label(tokens: tuple[str, ...]) -> bool:
    """A name rather than a value: letters (with subscripts), `f(x)`, `(p, q)`, `S_{ABC}:S`."""
    if not tokens or not any(t.isalpha() or t[1:] in _GREEK for t in tokens):
        return False
    sub_depth = 0  # inside a subscript group, where digits are part of the name (x_{12})
    for i, tok in enumerate(tokens):
        in_subscript = sub_depth > 0 or (i > 0 and tokens[i - 1] == "_")
        if tok == "{" and i > 0 and tokens[i - 1] == "_":
            sub_depth = 1
        elif tok == "{" and sub_depth:
            sub_depth += 1
        elif tok == "}" and sub_depth:
            sub_depth -= 1
        elif not (tok.isalpha() or tok in _LABEL_TOKENS or tok[1:] in _GREEK or (in_subscript and tok.isdigit())):
            return False
    return True


def _label_key(tokens: tuple[str, ...]) -> str:
    return "".join(tokens)


def _labelled(items: list[tuple[str, ...]]) -> Labelled | None:
    """`k = 45, n = 2`: every item `label = value` with different labels (`x = 1, x = 2` is a list)."""
    if len(items) < 2:
        return None
    labels, values = [], []
    for item in items:
        parts = _split_top(item, {"="})
        if len(parts) != 2 or not _is_label(parts[0]) or not parts[1]:
            return None
        labels.append(_label_key(parts[0]))
        values.append(_parse_element(parts[1]))
    if len(set(labels)) != len(labels):
        return None
    return Labelled(tuple(labels), tuple(values))


def _parse_items(tokens: tuple[str, ...]) -> list[Value]:
    """A list item, with `\\pm` expanded into two items."""
    return [_parse_element(t) for t in _expand_pm(tokens)]


@functools.lru_cache(maxsize=8192)
def parse_answer(s: str) -> Value:
    """Read an answer string into a Value. Raises Bomb for absurdly large inputs."""
    text = clean(s)
    if not text:
        return Unparsed("")
    try:
        return _parse_cleaned(text)
    except ParseError:
        return Unparsed(text)
    except RecursionError:
        raise Bomb("nesting too deep") from None


def _parse_cleaned(text: str) -> Value:
    named = re.match(r"^[a-zA-Z](?:_\{?\w+\}?)?\s*=\s*(\\begin\{.*)$", text, re.DOTALL)
    if named:  # v = \begin{pmatrix} ... \end{pmatrix}
        text = named.group(1)
    m = _MATRIX_RE.match(text)
    if m:
        rows = [r for r in re.split(r"\\cr(?![a-zA-Z])", m.group("body")) if r.strip()]
        cells = [[c.strip() for c in r.split("&")] for r in rows]
        if sum(len(r) for r in cells) > MAX_ITEMS:
            raise Bomb("matrix too large")
        if len({len(r) for r in cells}) != 1:
            raise ParseError("ragged matrix")
        return Matrix(tuple(tuple(_parse_element(tokenize(c)) for c in r) for r in cells))
    m = _BASE_RE.match(text)
    if m and m.group(1)[0].isdigit():
        return BaseNumber(m.group(1).upper(), int(m.group(2)))
    m = _CHOICE_RE.match(text)
    if m:
        return Choice(m.group(1).upper())
    pieces = re.split(r"\s+or\s+", text)  # inequalities joined by "or" form a union
    if len(pieces) > 1 and all(re.search(r"[<>]|\\[lg]e", p) for p in pieces):
        return Union(tuple(_parse_element(tokenize(p)) for p in pieces))
    if len(pieces) > 1 and not _looks_like_text(text):
        text = ", ".join(pieces)  # "2 or 3" lists two values (a hedge unless the gold says so too)
    if _looks_like_text(text):
        return Text(_text_key(text))
    tokens = tokenize(text)
    cup_pieces = _split_top(tokens, {r"\cup"})
    if len(cup_pieces) > 1:
        if len(cup_pieces) > MAX_ITEMS:
            raise Bomb("too many items")
        return Union(tuple(_parse_element(p) for p in cup_pieces))
    items = _split_top(tokens, {",", ";"})
    if len(items) > MAX_ITEMS:
        raise Bomb("too many items")
    labelled = _labelled(items)
    if labelled is not None:
        return labelled
    values = [v for t in items for v in _parse_items(t)]
    if len(values) == 1:
        return values[0]
    return Bag(tuple(values), braces=False)
