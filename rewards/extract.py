"""Find the final answer in a model's response: extraction policies, task by task.

Two named policies (`POLICIES`; `describe_policy(name)` gives the text that runs record):

- `default`: the first of these that finds anything wins.
  1. `<answer>...</answer>` tags (R1 style): the last tag; a box inside it is unwrapped.
  2. `\\boxed{...}` / `\\fbox{...}`: every box (see `boxed`).
  3. "final answer" phrases: the last "the (final) answer is X", "Answer: X", a `## Answer`
     heading, Minerva's "Final Answer: The final answer is $X$. I hope it is correct.", or a
     closing `A: X` line.
  4. GSM8K's `#### N` (first for the gsm8k task).
  5. a bare answer: the whole response when it is short and not prose (`5`, `$x=3$`, `Evelyn`).
  6. a closing statement: the last line saying "... is X" / "... = X" (`The largest $n$ is 34.`).
  7. the last math of the response (`$...$`, `\\[...\\]`, `\\(...\\)`, `$$...$$`, or a last line in
     square brackets); math spans joined by "and" / "," form a list, by "or" a hedge.
  8. for tasks that ask for a number (gsm8k, number), the last number.
- `strict`: boxes only (and GSM8K's `####` for the gsm8k task), for RL runs that reward the
  requested format and nothing else; with a `<think>` block only the text after `</think>`
  counts, and an unfinished `<think>` has no answer.

Before extraction, `prepare` normalises the response: LaTeX escaped twice (JSON dumps:
`\\\\frac`, `\\\\boxed`) is unescaped, chat-template text after the answer (`<|im_end|>`,
`<|im_start|>user ...`, `<|eot_id|>`, ...) is cut, and with a `<think>` block the text after
`</think>` is searched first (the default policy falls back to the whole response when that
part states nothing).

- `boxed`: every `\\boxed{...}` / `\\fbox{...}` with balanced braces (escaped `\\{` `\\}` do not
  count). All boxes are returned: the grader requires all of them to be right, unless the gold
  has several parts and the boxes together spell it (`\\boxed{-2} and \\boxed{1}` for `1, -2`).
  Two boxes with different values for a single-valued gold score 0. Empty boxes are ignored
  when there is a non-empty one (models echo "put your answer in \\boxed{}"); an empty box alone
  is no answer. A truncated, unclosed box is ignored; one longer than MAX_BOX_CHARS is wrong.

Responses longer than MAX_RESPONSE_CHARS are not searched (no answer).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

MAX_RESPONSE_CHARS = 400_000  # ~100k tokens; anything longer is a runaway generation
MAX_BOXES = 64
MAX_BOX_CHARS = 2000
POLICY_VERSION = "2"  # bump when what counts as the final answer changes

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![a-zA-Z])\s*")
_HASHES_RE = re.compile(r"####[ \t]*([^\n]*)")
_ANSWER_IS_RE = re.compile(
    # possessive quantifiers (*+): "answer" followed by 400k spaces is linear, not quadratic
    r"(?:final\s++answer|\banswer)\s*+(?:\*\*\s*+)?(?:is\s*+:?|:|=)|final\s++answer[ \t]*+(?:\*\*[ \t]*+)?\n"
    r"|(?<!#)#{1,6}+[ \t]*+(?:final\s++)?answer[ \t]*+:?[ \t]*+\n|(?:^|\n)[ \t]*+answer[ \t]*+:?[ \t]*+\n"
    r"|\banswer\s++(?:to|for|of)\s[^.\n$]{0,50}?\s(?:is|=)\s*+:?",  # "the answer to the question is 5"
    re.IGNORECASE,
)
_SENTENCE_END_RE = re.compile(
    r"\.(?:\s|\*|$)|\n|\s+(?:because|since|which|where|as\s+(?:required|desired|expected))\b"
    r"|,\s+(?:so|which|since|because)\b|\s+I\s+hope\b",
    re.IGNORECASE,
)
_NUMBER_RE = re.compile(r"(?<![\w.])(?:(?<![\w)\]}])-)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?")
_NUMBER_TAIL_CHARS = 2000
_TAIL_CHARS = 3000  # closing statements and the last math are looked for in the response's tail

# Text a chat template adds around a turn: the model's answer ends at the first of these.
_TURN_END_RE = re.compile(
    r"<\|im_end\|>|<\|im_start\|>|<\|endoftext\|>|<\|eot_id\|>|<\|start_header_id\|>|<\|end_of_text\|>"
    r"|<\|end\|>|<\|user\|>|<\|assistant\|>|<\|system\|>|<\uff5cend\u2581of\u2581sentence\uff5c>"
    r"|<\uff5cUser\uff5c>|</s>|<end_of_turn>|<start_of_turn>"
)
_DOUBLE_ESCAPED_RE = re.compile(
    r"(?<!\\)\\\\(?:boxed|fbox|frac|dfrac|tfrac|sqrt|text|textbf|pi|cdot|times|left|right|leq?|geq?|infty|circ"
    r"|pm|mathrm|mathbf|begin|end|cup|cap|in|alpha|beta|theta|sin|cos|tan|log|ln)(?![a-zA-Z])"
)
_MATH_RE = re.compile(r"\$\$(?P<dd>.+?)\$\$|(?<![\\$])\$(?P<d>[^$]+?)(?<!\\)\$|\\\[(?P<b>.+?)\\\]|\\\((?P<p>.+?)\\\)", re.DOTALL)
_CONNECTOR_RE = re.compile(r"\s*\(?\s*(?:,?\s*(?:and|or|&)\s*|,\s*|;\s*|\\text\{\s*(?:and|or|,)\s*\}\s*)", re.IGNORECASE)
_COPULA_RE = re.compile(
    r"(?:\b(?:is|are|was|were|equals|be|becomes?|gives?|yields?|get|obtain)\b(?:\s+equal\s+to\b)?"
    r"|\bequal\s+to\b|=)\s*:?\s*",
    re.IGNORECASE,
)
# A list item: a value, or a name and its value (`x = 1`, `x_1 = 2`, `(p, q) = (3, 2)`), not a step `k - 1 = 1`.
_LIST_ITEM_RE = re.compile(r"^(?:[^=]+|\s*(?:\\?[A-Za-z]+(?:_\{?\w+\}?)?|\([^()=]*\))\s*=\s*[^=]+)$")
_ENV_EDGE_RE = re.compile(r"\\(?:begin|end)\{(?:align|aligned|equation|gather|eqnarray|array)\*?\}|\\\\\s*$")
_BRACKET_LINE_RE = re.compile(r"^\[\s*(.+?)\s*\]\s*\.?$", re.DOTALL)
_LEAD_RE = re.compile(  # "So 7.", "Total: 40", "Result = 40": the value after a leading word or label
    r"^(?:(?:so|thus|therefore|hence|finally)\b[,:]?\s*)?(?:[A-Za-z][A-Za-z ]{1,24}?\s*(?::|=(?!=))\s*(?=[^=]+$))?",
    re.IGNORECASE,
)
_IS_THE_ANSWER_RE = re.compile(r"^(?:so|thus|therefore|hence)?[,\s]*(.{1,120}?)\s+is\s+(?:the|our|my)\s+(?:final\s+)?answer\b", re.IGNORECASE)
_STOP_SPANS = {"the answer", "done", "correct", "right", "wrong", "true", "false", "as follows", "follows", "it"}
_A_LINE_RE = re.compile(r"A\s*:\s*(\S.{0,200})$")
_PROSE_WORD_RE = re.compile(r"(?<![\\a-zA-Z])[a-zA-Z]{2,}")


# ----------------------------------------------------------------------------------------------
# Preparing the text


def unescape_latex(text: str) -> str:
    """`\\\\frac{1}{2}` (LaTeX escaped twice, as in JSON dumps) -> `\\frac{1}{2}`; else unchanged."""
    if "\\\\" not in text or _DOUBLE_ESCAPED_RE.search(text) is None:
        return text
    if re.search(r"(?<!\\)\\(?:boxed|frac|sqrt|text)(?![a-zA-Z])", text):
        return text  # single-escaped commands too: a matrix row break before a word, leave it
    return text.replace("\\\\", "\\")


def cut_turn(text: str) -> str:
    """Drop chat-template text that follows the model's turn (and template tokens before it)."""
    start = 0
    while True:
        m = _TURN_END_RE.match(text, start)
        if m is None:
            break
        start = m.end()
        while start < len(text) and text[start] in " \t\r\n":
            start += 1
        if text.startswith("assistant", start):  # <|im_start|>assistant
            start += len("assistant")
    m = _TURN_END_RE.search(text, start)
    return text[start : m.start()] if m else text[start:]


@dataclass(frozen=True)
class Prepared:
    """A response ready for the extractors."""

    text: str  # the whole response, unescaped, without chat-template text after the answer
    after_think: str | None  # the text after the last </think>, or None without a think block
    unfinished_think: bool  # <think> opened and never closed


def _drop_asy(text: str) -> str:
    """Remove [asy]...[/asy] blocks (Asymptote drawing code is not prose or math), in linear time."""
    out, pos = [], 0
    while True:
        start = text.find("[asy]", pos)
        end = text.find("[/asy]", start) if start != -1 else -1
        if end == -1:
            out.append(text[pos:])
            return " ".join(out)
        out.append(text[pos:start])
        pos = end + len("[/asy]")


def prepare(response: str) -> Prepared:
    text = cut_turn(unescape_latex(response))
    if "[/asy]" in text:
        text = _drop_asy(text)
    after: str | None = None
    cut = text.rfind("</think>")
    if cut != -1:
        after = text[cut + len("</think>") :]
    unfinished = cut == -1 and "<think>" in text
    return Prepared(text, after, unfinished)


# ----------------------------------------------------------------------------------------------
# Extractors: text -> list of answer strings (empty when nothing is found)


def _braced(text: str, start: int) -> str | None:
    """Content of the group opening at text[start] == '{'; None if unclosed; '' if too long."""
    depth = 0
    end = min(len(text), start + MAX_BOX_CHARS + 2)
    i = start
    while i < end:
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i]
        i += 1
    return "" if end < len(text) else None


def boxed(text: str) -> list[str]:
    """Contents of all balanced \\boxed{} and \\fbox{} groups, in order."""
    found: list[str] = []
    for m in _BOX_RE.finditer(text):
        if len(found) >= MAX_BOXES:
            return [""]  # a response with this many boxes is not giving one final answer
        i = m.end()
        if i < len(text) and text[i] == "{":
            content = _braced(text, i)
            if content is None:
                continue
            found.append(content.strip() if content.strip() else "")
        else:
            token = re.match(r"[^\s$]+", text[i : i + 100])  # \boxed 5
            if token:
                found.append(token.group(0))
    nonempty = [f for f in found if f]
    return nonempty or found


def answer_tags(text: str) -> list[str]:
    """The content of the last <answer>...</answer> (its boxes, if it has any)."""
    low = text.lower()
    end = low.rfind("</answer>")
    start = low.rfind("<answer>", 0, end) if end != -1 else -1
    if start == -1:
        return []
    content = text[start + len("<answer>") : end].strip()
    return boxed(content) or ([content] if content else [])


def hashes(text: str) -> list[str]:
    """The values after GSM8K's `####` markers."""
    return [m.group(1).strip().rstrip(".") for m in _HASHES_RE.finditer(text)]


def _first_span(rest: str) -> str:
    """The answer at the start of `rest`: a $...$ group or text up to the end of the sentence."""
    rest = rest.lstrip(" \t*:").strip()
    for opener, closer in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if rest.startswith(opener):
            end = re.compile(r"(?<!\\)" + re.escape(closer)).search(rest, len(opener))
            if end is not None:
                span = rest[len(opener) : end.start()].strip()
                return _with_more_spans(span, rest[end.end() :])
    m = _SENTENCE_END_RE.search(rest)
    sentence = (rest[: m.start()] if m else rest).strip().rstrip("*").strip()
    if _MATH_RE.search(sentence) and _is_prose(sentence, 0):
        found = last_math(sentence)  # "the larger of the two: $x=1$"
        return found[0] if found else sentence
    return sentence


def _with_more_spans(span: str, rest: str) -> str:
    """`$2$ or $3$`, `$x=1$ and $x=2$`: math spans joined by connectors are one answer."""
    parts = [span]
    joiners: list[str] = []
    while True:
        m = _CONNECTOR_RE.match(rest)
        if m is None or not rest[m.end() :].startswith("$") or rest[m.end() :].startswith("$$"):
            break
        nxt = re.compile(r"(?<!\\)\$").search(rest, m.end() + 1)
        if nxt is None:
            break
        joiners.append("or" if re.search(r"\bor\b", m.group(0), re.IGNORECASE) else ",")
        parts.append(rest[m.end() + 1 : nxt.start()].strip())
        rest = rest[nxt.end() :]
        if len(parts) >= 16:
            break
    return _join(parts, joiners)


def _join(parts: list[str], joiners: list[str]) -> str:
    out = parts[0]
    for joiner, part in zip(joiners, parts[1:]):
        out += (" \\text{ or } " if joiner == "or" else ", ") + part
    return out


def answer_is(text: str) -> list[str]:
    """The answer stated by the last 'the answer is ...' / 'Final Answer: ...' phrase, or by a
    last line `A: 42` (the few-shot "Q: ... A: ..." convention)."""
    m = _A_LINE_RE.match(_last_line(text))
    if m:
        return [m.group(1).strip().rstrip(".")]
    last = None
    for m in _ANSWER_IS_RE.finditer(text):
        last = m
    if last is None:
        return []
    rest = text[last.end() : last.end() + 1000]
    if not rest.split("\n", 1)[0].strip(" \t*:"):
        rest = rest.lstrip(" \t*:\n")  # "Final Answer:\n\n42"
    span = _first_span(rest)
    if span.startswith("[") and span.endswith("]") and "," not in span:
        span = span[1:-1].strip()  # "Answer: [42]"
    return [span] if span else []


def _is_prose(text: str, max_words: int) -> bool:
    """More than `max_words` words of two letters or more outside LaTeX commands and math."""
    outside = _MATH_RE.sub(" ", text)
    outside = re.sub(r"\\(?:text|textbf|mathrm|textnormal|mbox)\s*\{[^{}]*\}", " ", outside)
    return len(_PROSE_WORD_RE.findall(outside)) > max_words


def bare(text: str) -> list[str]:
    """The whole response when it is just an answer: short, one line of math or a few words."""
    s = _LEAD_RE.sub("", text.strip().strip("*`").strip())
    if not s or len(s) > 300 or s.count("\n") > 2 or _BOX_RE.search(s) or s.count("{") != s.count("}"):
        return []  # an unclosed box is a truncated response, not an answer
    words = 0 if "\n" in s or _MATH_RE.search(s) else 1  # "$x=3$." or "5 apples", not "So, $x=3$."
    if _is_prose(s, words) or re.search(r"[.!?:]\s+[A-Za-z]", _MATH_RE.sub(" ", s)):
        return []
    return [s]


def _last_line(text: str) -> str:
    for line in reversed(text[-_TAIL_CHARS:].splitlines()):
        line = _ENV_EDGE_RE.sub("", line.strip()).strip().strip("*#>&").strip()
        if line and not re.fullmatch(r"\\\]|\\\[|\$\$|[-=_*]{3,}", line):
            return line
    return ""


def closing_statement(text: str) -> list[str]:
    """The value of the last line's final "... is X." / "... = X." (`The largest $n$ is 34.`)."""
    line = _last_line(text)
    if not line or len(line) > 600:
        return []
    m = _IS_THE_ANSWER_RE.match(line)  # "x = 4 is the answer."
    if m:
        return [m.group(1).strip()]
    outside = _MATH_RE.sub(lambda m: "\0" * len(m.group(0)), line)  # copulas inside math do not count
    last = None
    for m in _COPULA_RE.finditer(outside):
        last = m
    if last is None:
        return []
    rest = line[last.end() :].lstrip(" \t*:")
    span = _first_span(rest)
    spans = list(_MATH_RE.finditer(rest))
    if spans and (len(spans) > 1 or not rest.startswith(("$", "\\(", "\\["))):
        return []  # "... is 29, so you had $29 \cdot 7 = 203$ coins": the last math decides
    if not re.search(r"[\w\\]", span) or _is_prose(span, 2) or len(span) > 200:
        return []
    if not re.search(r"[\d\\$]", span) and (_MATH_RE.search(line) or span.lower().strip(" .") in _STOP_SPANS):
        return []  # "..., and we are done.": a word after math is not the answer; the math is
    return [span]


def last_math(text: str) -> list[str]:
    """The last math span of the response's tail; spans joined by connectors form one answer."""
    tail = text[-_TAIL_CHARS:].rstrip()
    line = _last_line(tail)
    m = _BRACKET_LINE_RE.match(line)
    if m and not _is_prose(m.group(1), 2):
        return [m.group(1)]
    spans = list(_MATH_RE.finditer(tail))
    if not spans:
        return []
    group = [spans[-1]]
    joiners: list[str] = []
    for prev in reversed(spans[:-1]):
        between = tail[prev.end() : group[0].start()]
        if not _CONNECTOR_RE.fullmatch(between):
            break
        joiners.insert(0, "or" if re.search(r"\bor\b", between, re.IGNORECASE) else ",")
        group.insert(0, prev)
    parts = [next(g for g in m.groups() if g is not None).strip() for m in group]
    parts = [p for p in parts if p]
    if not parts or len(parts) != len(group):
        return []
    parts = [p.rstrip(".,;").strip() for p in parts]
    listable = all(_LIST_ITEM_RE.match(p) for p in parts) and (set(joiners) != {","} or len({"=" in p for p in parts}) == 1)
    if len(parts) > 1 and not listable:
        parts, joiners = parts[-1:], []  # "$k-1=1$, and $k=2$", "Because $x$ cannot be $0$, $x=5$"
    return [_join(parts, joiners)]


def last_number(text: str) -> list[str]:
    """The last number (integer, decimal, 1,000-style, or a/b) in the response."""
    for chunk in (text[-_NUMBER_TAIL_CHARS:], text):
        last = None
        for m in _NUMBER_RE.finditer(chunk):
            last = m
        if last is not None:
            return [last.group(0)]
    return []


# ----------------------------------------------------------------------------------------------
# Tasks and policies


def _gold_as_is(gold: str) -> str:
    return gold


def _gsm8k_gold(gold: str) -> str:
    """A GSM8K solution ends in '#### N'; a bare N is taken as is."""
    return gold.rsplit("####", 1)[-1].strip() if "####" in gold else gold


def _any_answer(answer: str) -> bool:
    return True


def _aime_answer(answer: str) -> bool:
    """AIME answers are integers from 0 to 999 (leading zeros allowed)."""
    from rewards.equivalence import exact
    from rewards.normalize import Scalar, parse_answer

    try:
        value = parse_answer(answer)
        number = exact(value.node) if isinstance(value, Scalar) and not value.percent else None
    except ValueError:
        return False
    return number is not None and number.denominator == 1 and 0 <= number <= 999


Extractor = Callable[[str], list[str]]

_DEFAULT_CHAIN: tuple[Extractor, ...] = (answer_tags, boxed, answer_is)
_LOOSE_CHAIN: tuple[Extractor, ...] = (bare, closing_statement, last_math)


@dataclass(frozen=True)
class Task:
    """How to grade one kind of problem."""

    extractors: tuple[Extractor, ...]  # the default policy: tried in order, the first hit wins
    strict: tuple[Extractor, ...] = (boxed,)  # the strict policy
    gold: Callable[[str], str] = _gold_as_is  # reads the gold column into an answer string
    valid: Callable[[str], bool] = _any_answer  # every extracted answer must pass this


TASKS: dict[str, Task] = {
    "math": Task(_DEFAULT_CHAIN + (hashes,) + _LOOSE_CHAIN),
    "gsm8k": Task(
        (answer_tags, hashes, boxed, answer_is, bare, last_number),  # $ is money here, not math
        strict=(hashes, boxed),
        gold=_gsm8k_gold,
    ),
    "aime": Task(_DEFAULT_CHAIN + (hashes,) + _LOOSE_CHAIN, valid=_aime_answer),
    "number": Task(_DEFAULT_CHAIN + (last_number,)),
}

POLICIES: dict[str, str] = {
    "default": (
        "first hit wins: <answer> tags; every \\boxed{} (all must be right, or together spell a multi-part gold); "
        "the last 'final answer is / Answer:' phrase; the task's marker (#### for gsm8k); a bare short answer; "
        "the last line's '... is X' / '= X'; the last math span; the last number (gsm8k, number tasks). "
        "Text after </think> first; chat-template text after the answer cut; double-escaped LaTeX unescaped."
    ),
    "strict": (
        "\\boxed{} only (plus #### for gsm8k); with a <think> block only the text after </think> counts and an "
        "unfinished <think> has no answer; chat-template text after the answer cut; double-escaped LaTeX unescaped."
    ),
}


def describe_policy(name: str = "default") -> str:
    """A stable one-paragraph description of a policy, with the version, for run records."""
    get_policy(name)
    return f"rewards/{name}/v{POLICY_VERSION}: {POLICIES[name]}"


def get_policy(name: str) -> str:
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; known policies: {', '.join(POLICIES)}")
    return name


def get_task(task: str) -> Task:
    try:
        return TASKS[task]
    except KeyError:
        raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(TASKS)}") from None


def _run(chain: tuple[Extractor, ...], text: str) -> list[str]:
    for extractor in chain:
        found = extractor(text)
        if found:
            return found
    return []


def candidates(response: str, task: str = "math", policy: str = "default") -> list[str]:
    """Every final-answer candidate of the first extractor that finds one (maybe none)."""
    spec = get_task(task)
    get_policy(policy)
    if not isinstance(response, str) or len(response) > MAX_RESPONSE_CHARS:
        return []
    prepared = prepare(response)
    if policy == "strict":
        if prepared.unfinished_think:
            return []
        text = prepared.after_think if prepared.after_think is not None else prepared.text
        return _run(spec.strict, text)
    if prepared.after_think is not None:
        found = _run(spec.extractors, prepared.after_think)
        if found:
            return found
    return _run(spec.extractors, prepared.text)


def extract_answer(response: str, task: str = "math", policy: str = "default") -> str | None:
    """The final answer (the last candidate), or None if the response states none."""
    found = candidates(response, task, policy)
    return found[-1] if found and found[-1] else None
