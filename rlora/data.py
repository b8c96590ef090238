"""Training tasks and evaluation benchmarks: rows in, `Problem`s out.

A task is data plus a reward: each `Problem` carries its gold answer and the name of the
`rewards` task that grades it, so `rewards.grade(completion, problem.reference, problem.reward_task)`
is the whole reward. Sources are the Hub datasets for real users or local JSONL files in the
same schema (`train_data=path.jsonl`), so the product never needs the network when given files.

Training tasks (config `task`):
- `arith`: synthetic `a + b` generated in code, the offline default. SmolLM2-135M-Instruct almost
  never boxes an answer, so it is graded by its last number (`rewards` task `number`): about a
  quarter to a half of its samples are right, and most groups of 8 have mixed rewards.
- `arith_chain`: synthetic chains of `arith_terms` operands in 1..arith_max joined by + and -,
  every partial result non-negative, graded by the last number. Its held-out split (benchmark
  `arith_chain`) is the tenth of all questions whose text hashes to bucket 0, which training
  never sees; docs/study_rl_cpu.md calibrates its difficulty for the default model.
- `gsm8k`: `openai/gsm8k` (config main), answers after `####`.
- `math`: MATH train (`EleutherAI/hendrycks_math`, all subjects) with every MATH500 problem removed
  by its normalised text, since MATH500 is our held-out benchmark.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from rlora.config import ConfigError
from rlora.rl.types import Prompt, Tokenizer

BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
ARITH_INSTRUCTION = "Reply with just the number."


class DataError(ValueError):
    """A missing file, an unknown dataset or a malformed row; the message names which."""


@dataclass(frozen=True)
class Problem:
    """One question with its gold answer and how to grade it."""

    problem_id: str
    question: str  # the user message, instruction included
    reference: str  # gold answer
    reward_task: str  # the rewards task that grades it: math | gsm8k | aime | number
    meta: tuple[tuple[str, str], ...] = ()  # e.g. (("subject", "Algebra"), ("level", "3")) for breakdowns


# --------------------------------------------------------------------------------------------
# Reading rows


def read_jsonl(path: str | Path, required: Sequence[str] = ()) -> list[dict[str, object]]:
    """Rows of a JSONL file; a bad line or a missing field is an error naming file and line."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file {path} does not exist")
    rows: list[dict[str, object]] = []
    with path.open() as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            missing = [k for k in required if k not in row]
            if missing:
                raise DataError(f"{path}:{lineno}: missing field {missing[0]!r} (has {sorted(row)})")
            rows.append(row)
    if not rows:
        raise DataError(f"data file {path} has no rows")
    return rows


def load_rows(source: str, hub_config: str | None, split: str, required: Sequence[str]) -> list[dict[str, object]]:
    """A local JSONL path, or a Hub dataset name loaded with `datasets`."""
    if source.endswith(".jsonl") or Path(source).exists():
        return read_jsonl(source, required)
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - datasets is a core dependency
        raise DataError("loading Hub datasets needs the `datasets` package") from e
    try:
        ds = datasets.load_dataset(source, hub_config, split=split)
    except Exception as e:  # the Hub raises many types; say which dataset failed
        raise DataError(f"could not load dataset {source!r} (config {hub_config!r}, split {split!r}): {e}") from e
    rows = [dict(r) for r in ds]
    for i, row in enumerate(rows):
        missing = [k for k in required if k not in row]
        if missing:
            raise DataError(f"{source} row {i}: missing field {missing[0]!r}")
    return rows


def gsm8k_answer(solution: str) -> str:
    """The number after `####` in a GSM8K solution, thousands separators removed."""
    if "####" not in solution:
        raise DataError(f"GSM8K solution has no '#### answer': {solution[-80:]!r}")
    return solution.split("####")[-1].strip().replace(",", "")


def boxed_answer(solution: str) -> str:
    """The last \\boxed{...} of a MATH solution (balanced braces)."""
    start = solution.rfind("\\boxed")
    if start < 0:
        raise DataError(f"MATH solution has no \\boxed answer: {solution[-80:]!r}")
    i = solution.find("{", start)
    depth = 0
    for j in range(i, len(solution)):
        depth += {"{": 1, "}": -1}.get(solution[j], 0)
        if depth == 0:
            return solution[i + 1 : j]
    raise DataError(f"unbalanced \\boxed in MATH solution: {solution[start : start + 80]!r}")


def normalize_problem_text(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


# --------------------------------------------------------------------------------------------
# Training tasks


def arith_problems(n: int, max_operand: int, seed: int) -> list[Problem]:
    """`n` synthetic additions a + b with a, b in 1..max_operand (the offline default task)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, b = rng.randint(1, max_operand), rng.randint(1, max_operand)
        out.append(Problem(f"arith-{i}", f"What is {a} + {b}? {ARITH_INSTRUCTION}", str(a + b), "number"))
    return out


# Arithmetic chains (task and benchmark `arith_chain`). A question's split is a function of its text
# alone (sha256 mod 10: bucket 0 is held out), so train and test never share a question, whatever
# the seeds. Problem `index` of a stream is a pure function of (stream seed, index, difficulty):
# training draws from the run's seed, the held-out set from one fixed stream, so every run of a
# study (any seed, any arm) is evaluated on the same problems.

HELD_OUT_BUCKETS = 10
HELD_OUT_STREAM = "held-out"
HELD_OUT_SIZE = 200  # problems of the `arith_chain` benchmark when no limit is given (fewer where fewer exist) ...
HELD_OUT_MIN = 50  # ... but at least this many: a smaller held-out set could not tell arms apart
TRAIN_SIZE = 20_000  # training problems of the `arith_chain` task (batch_for_step cycles through them)


@dataclass(frozen=True)
class ArithChain:
    """The difficulty of `arith_chain` problems: config keys `arith_max` and `arith_terms`."""

    max_operand: int  # operands drawn from 1..max_operand
    terms: int  # operands per question (terms - 1 operations)

    def __post_init__(self) -> None:
        if self.max_operand < 1:
            raise ConfigError(f"config key 'arith_max' must be >= 1, got {self.max_operand!r}")
        if self.terms < 2:
            raise ConfigError(f"config key 'arith_terms' must be >= 2 (operands per arith_chain question), got {self.terms!r}")


def is_held_out(question: str) -> bool:
    """Whether a question belongs to the held-out split: its text's sha256 falls in bucket 0 of 10."""
    return int.from_bytes(hashlib.sha256(question.encode()).digest()[:8], "big") % HELD_OUT_BUCKETS == 0


def arith_chain_problem(index: int, stream: int | str, chain: ArithChain) -> Problem:
    """Problem `index` of stream `stream`: `terms` operands left to right, each added or subtracted with
    equal odds (added while the running total is 0); a subtracted operand is drawn from 1..total, so
    no partial result is negative."""
    rng = random.Random(f"arith_chain/{stream}/{index}")  # str seeds hash with sha512: stable across processes
    total = rng.randint(1, chain.max_operand)
    text = str(total)
    for _ in range(chain.terms - 1):
        if rng.random() < 0.5 and total > 0:
            b = rng.randint(1, min(total, chain.max_operand))
            total, text = total - b, f"{text} - {b}"
        else:
            b = rng.randint(1, chain.max_operand)
            total, text = total + b, f"{text} + {b}"
    return Problem(f"arith_chain-{stream}-{index}", f"What is {text}? {ARITH_INSTRUCTION}", str(total), "number")


def arith_chain_problems(n: int, chain: ArithChain, stream: int | str, held_out: bool, minimum: int = 0) -> list[Problem]:
    """The first `n` problems of `stream` in one split; the held-out split without repeated questions.

    A difficulty with too few distinct questions to give `minimum` problems (default: all `n`) is an
    error naming the config keys.
    """
    out: list[Problem] = []
    seen: set[str] = set()
    budget = 50 * n + 1000  # candidates drawn before giving up: about 10 per held-out problem suffice
    for index in range(budget):
        problem = arith_chain_problem(index, stream, chain)
        if is_held_out(problem.question) != held_out or (held_out and problem.question in seen):
            continue
        seen.add(problem.question)
        out.append(problem)
        if len(out) == n:
            return out
    if len(out) >= (minimum or n):
        return out
    split = "held-out" if held_out else "training"
    raise DataError(
        f"arith_chain with arith_max={chain.max_operand}, arith_terms={chain.terms} has too few distinct {split} questions "
        f"({len(out)} of {minimum or n} wanted): raise config key 'arith_max' or 'arith_terms'"
    )


def gsm8k_problems(rows: list[dict[str, object]], prefix: str = "gsm8k") -> list[Problem]:
    return [Problem(f"{prefix}-{i}", f"{row['question']}\n{BOXED_INSTRUCTION}", gsm8k_answer(str(row["answer"])), "gsm8k") for i, row in enumerate(rows)]


def math_problems(rows: list[dict[str, object]], prefix: str = "math", task: str = "math") -> list[Problem]:
    out = []
    for i, row in enumerate(rows):
        answer = str(row["answer"]) if row.get("answer") not in (None, "") else boxed_answer(str(row["solution"]))
        meta = tuple((k, str(row[k])) for k in ("subject", "type", "level") if k in row)
        pid = str(row.get("unique_id") or row.get("id") or f"{prefix}-{i}")
        out.append(Problem(pid, f"{row['problem']}\n{BOXED_INSTRUCTION}", answer, task, meta))
    return out


MATH_SUBJECTS = (
    "algebra",
    "counting_and_probability",
    "geometry",
    "intermediate_algebra",
    "number_theory",
    "prealgebra",
    "precalculus",
)


def load_math_train(source: str, math500_source: str) -> list[Problem]:
    """MATH train minus MATH500, matched on normalised problem text."""
    if source:
        rows = load_rows(source, None, "train", ["problem"])
    else:
        rows = [r for subject in MATH_SUBJECTS for r in load_rows("EleutherAI/hendrycks_math", subject, "train", ["problem", "solution"])]
    held_out = {normalize_problem_text(str(r["problem"])) for r in load_rows(math500_source, None, "test", ["problem"])}
    kept = [r for r in rows if normalize_problem_text(str(r["problem"])) not in held_out]
    return math_problems(kept, prefix="math-train")


@dataclass(frozen=True)
class TaskSpec:
    load: Callable[[str, ArithChain, int], list[Problem]]  # (train_data, synthetic difficulty, seed) -> problems
    doc: str


TRAIN_TASKS: dict[str, TaskSpec] = {
    "arith": TaskSpec(lambda src, k, seed: arith_problems(100_000, k.max_operand, seed), "synthetic a + b, graded by last number"),
    "arith_chain": TaskSpec(
        lambda src, k, seed: arith_chain_problems(TRAIN_SIZE, k, seed, held_out=False), "synthetic a + b - c ..., training split, graded by last number"
    ),
    "gsm8k": TaskSpec(lambda src, k, seed: gsm8k_problems(load_rows(src or "openai/gsm8k", "main", "train", ["question", "answer"])), "GSM8K train"),
    "math": TaskSpec(lambda src, k, seed: load_math_train(src, "HuggingFaceH4/MATH-500"), "MATH train minus MATH500"),
}


def load_task(task: str, train_data: str, arith_max: int, seed: int, arith_terms: int = 3) -> list[Problem]:
    if task not in TRAIN_TASKS:
        raise DataError(f"unknown task {task!r}; known: {', '.join(TRAIN_TASKS)}")
    return TRAIN_TASKS[task].load(train_data, ArithChain(arith_max, arith_terms), seed)


# --------------------------------------------------------------------------------------------
# Evaluation benchmarks


@dataclass(frozen=True)
class Benchmark:
    hub_name: str
    hub_config: str | None
    split: str
    filename: str  # name inside --data-dir
    required: tuple[str, ...]
    to_problems: Callable[[list[dict[str, object]]], list[Problem]]


BENCHMARKS: dict[str, Benchmark] = {
    "math500": Benchmark("HuggingFaceH4/MATH-500", None, "test", "math500.jsonl", ("problem", "answer"), lambda rows: math_problems(rows, "math500")),
    "aime24": Benchmark(
        "HuggingFaceH4/aime_2024", None, "train", "aime24.jsonl", ("problem", "answer"), lambda rows: math_problems(rows, "aime24", task="aime")
    ),
    "aime25": Benchmark(
        "opencompass/AIME2025", "AIME2025-I", "test", "aime25.jsonl", ("problem", "answer"), lambda rows: math_problems(rows, "aime25", task="aime")
    ),
    "gsm8k": Benchmark("openai/gsm8k", "main", "test", "gsm8k_test.jsonl", ("question", "answer"), lambda rows: gsm8k_problems(rows, "gsm8k-test")),
}


# Benchmarks generated in code from the run's task settings (config keys arith_max, arith_terms):
# (difficulty, limit) -> the held-out problems. They read no file, so `data_dir` does not apply.
SYNTHETIC_BENCHMARKS: dict[str, Callable[[ArithChain, int], list[Problem]]] = {
    "arith_chain": lambda chain, limit: arith_chain_problems(limit or HELD_OUT_SIZE, chain, HELD_OUT_STREAM, held_out=True, minimum=limit or HELD_OUT_MIN),
}


def load_benchmark(name: str, data_dir: str = "", limit: int = 0, arith: ArithChain | None = None) -> list[Problem]:
    """A benchmark's problems from `data_dir/<file>` when given, else from the Hub; a synthetic one
    (SYNTHETIC_BENCHMARKS) is generated from `arith`, the difficulty the policy was trained at."""
    if name in SYNTHETIC_BENCHMARKS:
        if arith is None:
            raise DataError(f"benchmark {name!r} is generated from the run's arith_max and arith_terms; none were given")
        return SYNTHETIC_BENCHMARKS[name](arith, limit)
    if name not in BENCHMARKS:
        raise DataError(f"unknown benchmark {name!r}; known: {', '.join([*BENCHMARKS, *SYNTHETIC_BENCHMARKS])}")
    bench = BENCHMARKS[name]
    if data_dir:
        path = Path(data_dir) / bench.filename
        if not path.exists():
            raise DataError(f"benchmark {name!r}: {path} does not exist")
        rows = read_jsonl(path, bench.required)
    else:
        rows = load_rows(bench.hub_name, bench.hub_config, bench.split, bench.required)
    problems = bench.to_problems(rows)
    return problems[:limit] if limit else problems


# --------------------------------------------------------------------------------------------
# Order of training problems


def batch_for_step(problems: Sequence[Problem], step: int, per_step: int, seed: int) -> list[Problem]:
    """The problems of step `step`: a pure function of (step, seed), so a resumed run sees the same data."""
    n = len(problems)
    start = step * per_step
    epoch, offset = divmod(start, n)
    out: list[Problem] = []
    while len(out) < per_step:
        order = list(range(n))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        take = order[offset : offset + per_step - len(out)]
        out.extend(problems[i] for i in take)
        epoch, offset = epoch + 1, 0
    return out


# --------------------------------------------------------------------------------------------
# Prompt formats (config `prompt_format`)
#
# An instruct model answers under its chat template. A base checkpoint (Llama-3.1-8B, Qwen3-8B-Base)
# ships none, so it gets text it has seen in pre-training: a question/answer layout, optionally
# after worked examples (the few-shot formats of the GSM8K chain-of-thought and Minerva MATH
# evaluations, with every example answer boxed so that `rewards` grades it). A base model does
# not stop after its answer; it goes on with the next "Question:", which is the format's stop
# string: sampling ends there (vLLM `stop`), the text excludes it, and its tokens stay in the
# completion like an EOS. Sampling, evaluation and the handoff probe all render through here.

QUESTION, ANSWER = "Question: ", "Answer:"
PLAIN_STOP = ("\nQuestion:",)

# Wei et al. 2022 (chain-of-thought), the first four of the 8 GSM8K exemplars, final answers boxed.
GSM8K_SHOTS = (
    (
        "There are 15 trees in the grove. Grove workers will plant trees in the grove today. After they are done, there will be 21 trees. "
        "How many trees did the grove workers plant today?",
        "There are 15 trees originally. Then there were 21 trees after some more were planted. So there must have been 21 - 15 = 6. The answer is \\boxed{6}.",
    ),
    (
        "If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the parking lot?",
        "There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5. The answer is \\boxed{5}.",
    ),
    (
        "Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they have left in total?",
        "Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = 74. After eating 35, they had 74 - 35 = 39. "
        "The answer is \\boxed{39}.",
    ),
    (
        "Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. How many lollipops did Jason give to Denny?",
        "Jason started with 20 lollipops. Then he had 12 after giving some to Denny. So he gave Denny 20 - 12 = 8. The answer is \\boxed{8}.",
    ),
)
# Lewkowycz et al. 2022 (Minerva), the 4-shot MATH prompt, solutions ending in their boxed answer.
MATH_SHOTS = (
    (
        "Find the domain of the expression $\\frac{\\sqrt{x-2}}{\\sqrt{5-x}}$.",
        "The expressions inside each square root must be non-negative. Therefore, $x-2 \\ge 0$, so $x\\ge2$, and $5 - x \\ge 0$, so "
        "$x \\le 5$. Also, the denominator cannot be equal to zero, so $5-x>0$, which gives $x<5$. Therefore, the domain of the "
        "expression is $\\boxed{[2,5)}$.",
    ),
    (
        "If $\\det \\mathbf{A} = 2$ and $\\det \\mathbf{B} = 12,$ then find $\\det (\\mathbf{A} \\mathbf{B}).$",
        "We have that $\\det (\\mathbf{A} \\mathbf{B}) = (\\det \\mathbf{A})(\\det \\mathbf{B}) = (2)(12) = \\boxed{24}.$",
    ),
    (
        "Terrell usually lifts two 20-pound weights 12 times. If he uses two 15-pound weights instead, how many times must Terrell "
        "lift them in order to lift the same total weight?",
        "If Terrell lifts two 20-pound weights 12 times, he lifts a total of $2\\cdot 12\\cdot20=480$ pounds of weight. If he lifts "
        "two 15-pound weights instead for $n$ times, he will lift a total of $2\\cdot15\\cdot n=30n$ pounds of weight. Equating this "
        "to 480 pounds, we can solve for $n$: $30n=480$, so $n=480/30=\\boxed{16}$.",
    ),
    (
        "If the system of equations $6x-4y=a$, $6y-9x =b$ has a solution $(x, y)$ where $x$ and $y$ are both nonzero, find "
        "$\\frac{a}{b},$ assuming $b$ is nonzero.",
        "If we multiply the first equation by $-\\frac{3}{2}$, we obtain $6y-9x=-\\frac{3}{2}a.$ Since we also know that $6y-9x=b$, "
        "we have $-\\frac{3}{2}a=b$, so $\\frac{a}{b}=\\boxed{-\\frac{2}{3}}.$",
    ),
)
SHOTS_BY_TASK = {"gsm8k": GSM8K_SHOTS, "number": GSM8K_SHOTS, "math": MATH_SHOTS, "aime": MATH_SHOTS}


class PromptFormatError(ConfigError):
    """A prompt format the tokenizer cannot render (e.g. `chat` without a chat template)."""


def has_chat_template(tokenizer: Tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def qa_text(turns: Sequence[tuple[str, str]]) -> str:
    """`Question: q\nAnswer: a` blocks separated by blank lines; an empty last answer leaves `Answer:` open."""
    return "\n\n".join(f"{QUESTION}{q}\n{ANSWER}{' ' + a if a else ''}" for q, a in turns)


def render_chat(question: str, answer: str, reward_task: str, tokenizer: Tokenizer) -> str:
    if not has_chat_template(tokenizer):
        raise PromptFormatError(
            "config key 'prompt_format': chat needs a tokenizer with a chat template; this one has none (a base model?): use plain or fewshot"
        )
    messages = [{"role": "user", "content": question}]
    if answer:
        return str(tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": answer}], tokenize=False))
    return str(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))


def render_plain(question: str, answer: str, reward_task: str, tokenizer: Tokenizer) -> str:
    return qa_text([(question, answer)])


def render_fewshot(question: str, answer: str, reward_task: str, tokenizer: Tokenizer) -> str:
    return qa_text([*SHOTS_BY_TASK.get(reward_task, GSM8K_SHOTS), (question, answer)])


@dataclass(frozen=True)
class PromptFormat:
    # (question, answer or "" for a generation prompt, reward task, tokenizer) -> text
    render: Callable[[str, str, str, Tokenizer], str]
    stop: tuple[str, ...]  # strings that end a completion besides EOS
    doc: str


PROMPT_FORMATS: dict[str, PromptFormat] = {
    "chat": PromptFormat(render_chat, (), "the user turn under the tokenizer's chat template (instruct models)"),
    "plain": PromptFormat(render_plain, PLAIN_STOP, "Question: ...\\nAnswer: (base models), stops at the next Question:"),
    "fewshot": PromptFormat(render_fewshot, PLAIN_STOP, "4 worked examples (GSM8K CoT, or Minerva MATH for math/aime) before the plain format"),
}


def resolve_prompt_format(prompt_format: str, tokenizer: Tokenizer) -> str:
    """`auto` is `chat` where the tokenizer has a chat template, else `plain`; other names pass through."""
    if prompt_format == "auto":
        return "chat" if has_chat_template(tokenizer) else "plain"
    if prompt_format not in PROMPT_FORMATS:
        raise PromptFormatError(f"config key 'prompt_format' must be auto or one of {list(PROMPT_FORMATS)}, got {prompt_format!r}")
    return prompt_format


def render_turn(question: str, answer: str, reward_task: str, tokenizer: Tokenizer, prompt_format: str = "auto") -> str:
    """The text of one exchange in `prompt_format`; `answer=""` gives the prompt the policy continues."""
    fmt = PROMPT_FORMATS[resolve_prompt_format(prompt_format, tokenizer)]
    return fmt.render(question, answer, reward_task, tokenizer)


def make_prompt(problem: Problem, tokenizer: Tokenizer, prompt_format: str = "auto") -> Prompt:
    """The problem as the policy sees it, as token ids, with the format's stop strings (see PROMPT_FORMATS)."""
    name = resolve_prompt_format(prompt_format, tokenizer)
    text = PROMPT_FORMATS[name].render(problem.question, "", problem.reward_task, tokenizer)
    # a template carries its own BOS; plain text needs the tokenizer's (Llama-3 base expects <|begin_of_text|>)
    ids = tokenizer.encode(text, add_special_tokens=name != "chat")
    return Prompt(
        problem_id=problem.problem_id,
        question=problem.question,
        prompt_ids=tuple(ids),
        reference=problem.reference,
        reward_task=problem.reward_task,
        stop=PROMPT_FORMATS[name].stop,
    )
