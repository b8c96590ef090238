"""Find the final answer in a model's response, task by task.

An extractor maps a response to the list of final-answer candidates it finds (possibly empty).
A task (`TASKS`) is a small named policy: an ordered tuple of extractors, of which the first
that finds anything wins, plus how to read the gold column and what a valid answer looks like.

- `boxed`: every `\\boxed{...}` / `\\fbox{...}` with balanced braces (escaped `\\{` `\\}` do not
  count). All boxes are returned: the grader requires all of them to be right, so two boxes
  with different values score 0 while repeated agreeing boxes are fine. Empty boxes are ignored
  when there is a non-empty one (models echo "put your answer in \\boxed{}"); an empty box alone
  is no answer. A truncated, unclosed box is ignored; one longer than MAX_BOX_CHARS is wrong.
- `hashes`: every GSM8K-style `#### N`.
- `answer_is`: the LAST "the (final) answer is X" / "Answer: X" / Minerva's "Final Answer: The
  final answer is $X$. I hope it is correct." Only the last one counts (self-correction).
- `last_number`: the last number in the response, for tasks that ask for it.

Responses longer than MAX_RESPONSE_CHARS are not searched (no answer).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

MAX_RESPONSE_CHARS = 400_000  # ~100k tokens; anything longer is a runaway generation
MAX_BOXES = 64
MAX_BOX_CHARS = 2000

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![a-zA-Z])\s*")
_HASHES_RE = re.compile(r"####[ \t]*([^\n]*)")
_ANSWER_IS_RE = re.compile(
    r"(?:final\s+answer|\banswer)\s*(?:\*\*)?\s*(?:is\s*:?|:|=)|final\s+answer\s*(?:\*\*)?\s*\n",
    re.IGNORECASE,
)
_SENTENCE_END_RE = re.compile(
    r"\.(?:\s|\*|$)|\n|\s+(?:because|since|which|where|as\s+(?:required|desired|expected))\b"
    r"|,\s+(?:so|which|since|because)\b|\s+I\s+hope\b",
    re.IGNORECASE,
)
_NUMBER_RE = re.compile(r"(?<![\w.])(?:(?<![\w)\]}])-)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?")
_NUMBER_TAIL_CHARS = 2000


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
                return rest[len(opener) : end.start()].strip()
    m = _SENTENCE_END_RE.search(rest)
    return (rest[: m.start()] if m else rest).strip().rstrip("*").strip()


def answer_is(text: str) -> list[str]:
    """The answer stated by the last 'the answer is ...' / 'Final Answer: ...' phrase."""
    last = None
    for m in _ANSWER_IS_RE.finditer(text):
        last = m
    if last is None:
        return []
    rest = text[last.end() : last.end() + 1000]
    if not rest.split("\n", 1)[0].strip(" \t*:"):
        rest = rest.lstrip(" \t*:\n")  # "Final Answer:\n\n42"
    span = _first_span(rest)
    return [span] if span else []


def last_number(text: str) -> list[str]:
    """The last number (integer, decimal, 1,000-style, or a/b) in the response."""
    for chunk in (text[-_NUMBER_TAIL_CHARS:], text):
        last = None
        for m in _NUMBER_RE.finditer(chunk):
            last = m
        if last is not None:
            return [last.group(0)]
    return []


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


@dataclass(frozen=True)
class Task:
    """How to grade one kind of problem."""

    extractors: tuple[Callable[[str], list[str]], ...]  # tried in order; the first hit wins
    gold: Callable[[str], str] = _gold_as_is  # reads the gold column into an answer string
    valid: Callable[[str], bool] = _any_answer  # every extracted answer must pass this


TASKS: dict[str, Task] = {
    "math": Task((boxed, answer_is)),
    "gsm8k": Task((hashes, boxed, answer_is, last_number), gold=_gsm8k_gold),
    "aime": Task((boxed, answer_is), valid=_aime_answer),
    "number": Task((boxed, answer_is, last_number)),
}


def get_task(task: str) -> Task:
    try:
        return TASKS[task]
    except KeyError:
        raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(TASKS)}") from None


def candidates(response: str, task: str = "math") -> list[str]:
    """Every final-answer candidate of the first extractor that finds one (maybe none)."""
    policy = get_task(task)
    if not isinstance(response, str) or len(response) > MAX_RESPONSE_CHARS:
        return []
    for extractor in policy.extractors:
        found = extractor(response)
        if found:
            return found
    return []


def extract_answer(response: str, task: str = "math") -> str | None:
    """The final answer (the last candidate), or None if the response states none."""
    found = candidates(response, task)
    return found[-1] if found and found[-1] else None
