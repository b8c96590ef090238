"""Supervised fine-tuning with LoRA or FullFT: the learning-rate sweeps of LoRA Without Regret.

The blog compares LoRA and FullFT on SFT by the log loss they reach on held-out data (not by
sampling evals), each at its own best learning rate. One run here, top to bottom:
  1. data      chats from local JSONL, a Hub dataset, or (the offline default) arithmetic word
               problems with worked solutions generated in code; a fixed held-out split is cut
               by hashing each chat, so it is the same for every run, seed and learning rate
  2. tokenize  the model's chat template; the loss mask covers assistant turns only
  3. learn     AdamW on the mean log loss over the batch's assistant tokens, constant learning
               rate, no warm-up (as in the blog); the same model code as RL (`rlora.train.learner`)
  4. evaluate  log loss (nats per assistant token) on the held-out split every `eval_every` steps

Every value in metrics row `step` is measured on the model after `step` updates: the row's
`train_loss` is the loss of the batch that update `step` then trains on, and the last row
(`step = max_steps`) holds only the final held-out loss. So `eval_loss` against `step` is the
learning curve, and the sweep analysis reads the last row.

Departures from the blog: no sampling evals, no learning-rate schedule at all (the blog uses a
constant rate too); batch sizes and step counts are whatever the config says, so on CPU runs are
far shorter than the blog's.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch
from tqdm import tqdm

from rlora.config import ConfigError, TrainConfig
from rlora.data import DataError, load_rows
from rlora.devices import resolve_device, resolve_precision
from rlora.rl.types import Tokenizer
from rlora.runs import RunDir, create_run, reopen_run
from rlora.train.learner import Learner
from rlora.train.models import resolve_model
from rlora.train.setup import learner_spec, restore, save_if_due

Messages = list[dict[str, str]]


@dataclass(frozen=True, kw_only=True)
class SFTConfig(TrainConfig):
    """Everything one SFT run needs. Defaults run on CPU: rank-16 LoRA on generated word problems.

    Model, LoRA, optimizer, run and device keys are `TrainConfig`'s, with the same meanings as in RL.
    """

    rank: int | str = 16
    micro_batch: int = 8  # chats per forward/backward; bounds memory, not the result
    max_steps: int = 50
    checkpoint_every: int = 0  # 0 = none (a killed run restarts from step 0); else every N steps and at the end
    # data
    train_data: str = ""  # "" = generated word problems; a local .jsonl; or a Hub dataset name
    hub_config: str = ""  # the Hub dataset's config ("" = none)
    hub_split: str = "train"
    max_examples: int = 0  # read at most this many rows (Hub: split[:N]); 0 = all
    synthetic_examples: int = 4000  # size of the generated dataset when train_data is ""
    eval_fraction: float = 0.05  # share of chats held out (chosen by a hash of each chat)
    eval_examples: int = 64  # held-out chats scored at each eval; 0 = all of them
    max_seq_len: int = 256  # longer chats are cut on the right (a chat left with no assistant token is dropped)
    # batches
    batch_size: int = 8  # chats per optimizer step
    # evaluation
    eval_every: int = 10  # held-out loss every this many steps, and always after the last one
    eval_at_start: bool = True  # also at step 0 (the base model: the same for every LoRA run of a sweep)

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("batch_size", "max_seq_len", "synthetic_examples", "eval_every"):
            if getattr(self, key) < 1:
                raise ConfigError(f"config key {key!r} must be >= 1, got {getattr(self, key)!r}")
        for key in ("max_examples", "eval_examples"):
            if getattr(self, key) < 0:
                raise ConfigError(f"config key {key!r} must be >= 0, got {getattr(self, key)!r}")
        if not 0 < self.eval_fraction < 1:
            raise ConfigError(f"config key 'eval_fraction' must be in (0, 1), got {self.eval_fraction!r}")


@dataclass(frozen=True)
class Example:
    """One tokenized chat: ids and, aligned with them, 1 where the token belongs to an assistant turn."""

    token_ids: tuple[int, ...]
    assistant: tuple[int, ...]  # len == len(token_ids); the loss is on next-token targets with assistant == 1

    @property
    def num_targets(self) -> int:
        return sum(self.assistant[1:])


@dataclass(frozen=True)
class SFTBatch:
    """Right-padded rows; position t of targets is token t + 1, and mask is 1 where it is an assistant token."""

    tokens_B_T: torch.Tensor  # (B, T) int64
    targets_B_T: torch.Tensor  # (B, T) int64, tokens shifted left by one
    mask_B_T: torch.Tensor  # (B, T) float32, 1 on assistant targets
    lengths_B: torch.Tensor  # (B,) int64, unpadded lengths

    @property
    def num_tokens(self) -> int:
        return int(self.mask_B_T.sum().item())


# ------------------------------------------------------------------------------------ data


SYNTHETIC_SYSTEM = "Solve the problem."
NAMES = ("Ava", "Ben", "Chloe", "Dan", "Emma", "Finn", "Grace", "Hugo", "Iris", "Jack", "Lena", "Omar")
ITEMS = ("apple", "pencil", "marble", "sticker", "cookie", "book", "shell", "card")


def _word_problem(rng: random.Random) -> tuple[str, str]:
    """One (question, worked solution): the arithmetic, then 'The answer is N.' (short, so most of
    the loss is on the numbers, which a 135M model cannot learn in a few steps)."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    kind = rng.randrange(5)
    if kind == 0:
        a, b = rng.randint(2, 60), rng.randint(2, 60)
        q = f"{name} has {a} {item}s and gets {b} more. How many {item}s does {name} have now?"
        s = f"{a} + {b} = {a + b}."
        answer = a + b
    elif kind == 1:
        a = rng.randint(10, 90)
        b = rng.randint(1, a - 1)
        q = f"{name} has {a} {item}s and gives {b} away. How many {item}s are left?"
        s = f"{a} - {b} = {a - b}."
        answer = a - b
    elif kind == 2:
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        q = f"{name} buys {a} boxes with {b} {item}s in each box. How many {item}s is that?"
        s = f"{a} * {b} = {a * b}."
        answer = a * b
    elif kind == 3:
        b, k = rng.randint(2, 9), rng.randint(2, 12)
        q = f"{name} shares {b * k} {item}s equally among {b} friends. How many {item}s does each friend get?"
        s = f"{b * k} / {b} = {k}."
        answer = k
    else:
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        c = rng.randint(1, a * b - 1)
        q = f"{name} buys {a} packs of {b} {item}s and then loses {c}. How many {item}s are left?"
        s = f"{a} * {b} = {a * b}, then {a * b} - {c} = {a * b - c}."
        answer = a * b - c
    return q, f"{s} The answer is {answer}."


def synthetic_word_problems(n: int, seed: int = 0) -> list[Messages]:
    """`n` arithmetic word problems with worked solutions, a pure function of (n, seed): the offline default."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        q, a = _word_problem(rng)
        # A short system turn: without one SmolLM2's template inserts a 20-token default, a
        # quarter of every sequence, which costs CPU time and teaches nothing.
        out.append([{"role": "system", "content": SYNTHETIC_SYSTEM}, {"role": "user", "content": q}, {"role": "assistant", "content": a}])
    return out


def _from_messages(row: dict[str, object]) -> Messages:
    turns = cast(list[dict[str, object]], row["messages"])  # a malformed row raises KeyError/TypeError: row_to_messages names it
    return [{"role": str(m["role"]), "content": str(m["content"])} for m in turns]


SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def _from_conversations(row: dict[str, object]) -> Messages:
    turns = cast(list[dict[str, object]], row["conversations"])
    return [{"role": SHAREGPT_ROLES[str(m["from"])], "content": str(m["value"])} for m in turns]


def _from_question_answer(row: dict[str, object]) -> Messages:
    # GSM8K's solutions end in '#### N'; keep them verbatim, that is what SFT on GSM8K imitates.
    return [{"role": "user", "content": str(row["question"])}, {"role": "assistant", "content": str(row["answer"])}]


def _from_prompt_completion(row: dict[str, object]) -> Messages:
    return [{"role": "user", "content": str(row["prompt"])}, {"role": "assistant", "content": str(row["completion"])}]


# Row schemas, tried in order by their key field: tulu-3 (`messages`), OpenThoughts / ShareGPT
# (`conversations`), GSM8K (`question`/`answer`), and plain `prompt`/`completion`.
ROW_FORMATS: dict[str, Callable[[dict[str, object]], Messages]] = {
    "messages": _from_messages,
    "conversations": _from_conversations,
    "question": _from_question_answer,
    "prompt": _from_prompt_completion,
}


def row_to_messages(row: dict[str, object], where: str) -> Messages:
    for key, convert in ROW_FORMATS.items():
        if key in row:
            try:
                messages = convert(row)
            except (KeyError, TypeError) as e:
                raise DataError(f"{where}: malformed {key!r} row ({type(e).__name__}: {e})") from None
            if not any(m["role"] == "assistant" for m in messages):
                raise DataError(f"{where}: chat has no assistant turn")
            return messages
    raise DataError(f"{where}: row has none of the fields {list(ROW_FORMATS)} (has {sorted(row)})")


def load_chats(cfg: SFTConfig) -> list[Messages]:
    """All chats of the configured source, in source order."""
    if not cfg.train_data:
        return synthetic_word_problems(cfg.synthetic_examples)
    local = cfg.train_data.endswith(".jsonl") or Path(cfg.train_data).exists()
    split = cfg.hub_split if local or not cfg.max_examples else f"{cfg.hub_split}[:{cfg.max_examples}]"
    rows = load_rows(cfg.train_data, cfg.hub_config or None, split, ())
    if cfg.max_examples:
        rows = rows[: cfg.max_examples]
    return [row_to_messages(row, f"{cfg.train_data} row {i}") for i, row in enumerate(rows)]


def is_held_out(messages: Messages, fraction: float) -> bool:
    """A fixed split: a chat is held out when the hash of its text falls in the first `fraction`."""
    digest = hashlib.sha1(json.dumps(messages, sort_keys=True).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def tokenize_chat(messages: Messages, tokenizer: Tokenizer, max_seq_len: int) -> Example | None:
    """Template the chat turn by turn and mark assistant tokens; None if none survive truncation.

    Each assistant turn i is the text between template(messages[:i], generation prompt) and
    template(messages[:i + 1]), so its end-of-turn token is trained on and its header is not.
    """
    ids: list[int] = []
    assistant: list[int] = []
    text_done = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True, tokenize=False)
        turn = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (prefix.startswith(text_done) and turn.startswith(prefix)):
            raise DataError("the chat template does not extend its own prefixes; cannot mark assistant turns")
        for piece, flag in ((prefix[len(text_done) :], 0), (turn[len(prefix) :], 1)):
            piece_ids = tokenizer.encode(piece, add_special_tokens=False)
            ids.extend(piece_ids)
            assistant.extend([flag] * len(piece_ids))
        text_done = turn
    example = Example(tuple(ids[:max_seq_len]), tuple(assistant[:max_seq_len]))
    return example if example.num_targets > 0 else None


def collate(examples: Sequence[Example], pad_id: int) -> SFTBatch:
    B, T = len(examples), max(len(e.token_ids) for e in examples)
    tokens_B_T = torch.full((B, T), pad_id, dtype=torch.long)
    mask_B_T = torch.zeros(B, T, dtype=torch.float32)
    for b, e in enumerate(examples):
        tokens_B_T[b, : len(e.token_ids)] = torch.tensor(e.token_ids)
        # target t is token t + 1: trained on when token t + 1 is an assistant token
        mask_B_T[b, : len(e.token_ids) - 1] = torch.tensor(e.assistant[1:], dtype=torch.float32)
    targets_B_T = torch.roll(tokens_B_T, -1, dims=1)
    targets_B_T[:, -1] = pad_id
    lengths_B = torch.tensor([len(e.token_ids) for e in examples])
    return SFTBatch(tokens_B_T, targets_B_T, mask_B_T, lengths_B)


def batch_indices(n: int, step: int, batch_size: int, seed: int) -> list[int]:
    """Indices of step `step`'s batch: epochs of seeded shuffles, a pure function of (step, seed)."""
    out: list[int] = []
    epoch, offset = divmod(step * batch_size, n)
    while len(out) < batch_size:
        order = list(range(n))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        out.extend(order[offset : offset + batch_size - len(out)])
        epoch, offset = epoch + 1, 0
    return out


@dataclass(frozen=True)
class SFTData:
    train: tuple[Example, ...]
    held_out: tuple[Example, ...]  # the chats scored at every eval (capped at eval_examples)
    dropped: int  # chats with no assistant token left after truncation


DATA_KEYS = ("train_data", "hub_config", "hub_split", "max_examples", "synthetic_examples", "eval_fraction", "eval_examples", "max_seq_len")
_data_cache: dict[tuple[object, ...], SFTData] = {}  # a sweep's runs in one process tokenize once


def prepare_data(cfg: SFTConfig, tokenizer: Tokenizer, model_path: str = "") -> SFTData:
    """Tokenized training and held-out chats; cached per (model_path, data keys) when model_path is given."""
    if not model_path:
        return _prepare_data(cfg, tokenizer)
    key = (model_path, *(getattr(cfg, k) for k in DATA_KEYS))
    if key not in _data_cache:
        _data_cache[key] = _prepare_data(cfg, tokenizer)
    return _data_cache[key]


def _prepare_data(cfg: SFTConfig, tokenizer: Tokenizer) -> SFTData:
    train: list[Example] = []
    held_out: list[Example] = []
    dropped = 0
    for messages in load_chats(cfg):
        example = tokenize_chat(messages, tokenizer, cfg.max_seq_len)
        if example is None:
            dropped += 1
        elif is_held_out(messages, cfg.eval_fraction):
            held_out.append(example)
        else:
            train.append(example)
    if cfg.eval_examples:
        held_out = held_out[: cfg.eval_examples]
    if not train or not held_out:
        raise DataError(f"{cfg.train_data or 'generated data'}: {len(train)} training and {len(held_out)} held-out chats; need both")
    return SFTData(tuple(train), tuple(held_out), dropped)


# ------------------------------------------------------------------------------------ learning


def nll_sum(learner: Learner, batch: SFTBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of -log p over the batch's assistant targets, their mean entropy), on the learner's model."""
    T = int(batch.lengths_B.max())  # crop padding to the longest row
    lp_N, entropy_N = learner.token_logprobs(batch.tokens_B_T[:, :T], batch.targets_B_T[:, :T], batch.mask_B_T[:, :T], batch.lengths_B, temperature=1.0)
    return -lp_N.sum(), entropy_N.mean()


def train_step(learner: Learner, examples: Sequence[Example], pad_id: int) -> dict[str, float]:
    """One optimizer step on the mean log loss over all assistant tokens of `examples`."""
    learner.model.train()
    learner.optimizer.zero_grad(set_to_none=True)
    micro = learner.spec.micro_batch
    batches = [collate(examples[i : i + micro], pad_id) for i in range(0, len(examples), micro)]
    num_tokens = sum(b.num_tokens for b in batches)
    assert num_tokens > 0, "a training batch without assistant tokens"
    loss_sum, entropy = 0.0, 0.0
    for batch in batches:
        nll, ent = nll_sum(learner, batch)
        (nll / num_tokens).backward()
        loss_sum += nll.item()
        entropy += ent.item() * batch.num_tokens
    grad_norm = learner.optimizer_step()  # clip and AdamW, exactly as in RL
    return {"train_loss": loss_sum / num_tokens, "entropy": entropy / num_tokens, "grad_norm": grad_norm, "train_tokens": num_tokens}


@torch.no_grad()
def evaluate(learner: Learner, examples: Sequence[Example], pad_id: int) -> dict[str, float]:
    """Held-out log loss: nats per assistant token over all of `examples`."""
    learner.model.eval()
    micro = learner.spec.micro_batch
    total, tokens = 0.0, 0
    for i in range(0, len(examples), micro):
        batch = collate(examples[i : i + micro], pad_id)
        nll, _ = nll_sum(learner, batch)
        total += nll.item()
        tokens += batch.num_tokens
    return {"eval_loss": total / tokens, "eval_tokens": tokens}


# ------------------------------------------------------------------------------------ the loop


def train(cfg: SFTConfig, run: RunDir, progress: bool = True) -> RunDir:
    cfg = resolve_precision(cfg)  # dtype auto -> bfloat16 or float32 (run_sft saves the resolved value)
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    model_path = resolve_model(cfg.model)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    data = prepare_data(cfg, tokenizer, model_path)
    learner = Learner(learner_spec(cfg, model_path, device))
    start_step = restore(run, learner)
    info = {
        "train_chats": len(data.train),
        "eval_chats": len(data.held_out),
        "dropped_chats": data.dropped,
        "trainable_params": sum(p.numel() for p in learner.trainable),
    }

    bar = tqdm(range(start_step, cfg.max_steps + 1), initial=start_step, total=cfg.max_steps, desc="sft", disable=not progress, file=sys.stderr)
    for step in bar:
        t0 = time.perf_counter()
        row: dict[str, object] = {"step": step}
        if step == cfg.max_steps or (step % cfg.eval_every == 0 and (step > 0 or cfg.eval_at_start)):
            row.update(evaluate(learner, data.held_out, pad_id))
        t1 = time.perf_counter()
        if step < cfg.max_steps:
            examples = [data.train[i] for i in batch_indices(len(data.train), step, cfg.batch_size, cfg.seed)]
            row.update(train_step(learner, examples, pad_id))
        row.update({"eval_s": t1 - t0, "step_s": time.perf_counter() - t0, **(info if step == start_step else {})})
        diverged = not all(math.isfinite(float(v)) for k, v in row.items() if k.endswith("loss"))  # type: ignore[arg-type]
        run.log({**row, "diverged": True} if diverged else row)
        if diverged and step < cfg.max_steps:
            # Not raised: a too-high lr in a sweep is a data point. NaN stays NaN, so stop here and
            # close the run with a NaN final loss, which the analysis reads as "diverged".
            run.log({"step": cfg.max_steps, "eval_loss": float("nan"), "diverged": True})
            break
        if step < cfg.max_steps:
            save_if_due(run, cfg, learner, step + 1)
        if "eval_loss" in row:
            bar.set_postfix(eval_loss=f"{float(row['eval_loss']):.4f}")  # type: ignore[arg-type]
    run.close()
    return run


def run_sft(cfg: SFTConfig, name: str = "sft", progress: bool = True) -> RunDir:
    cfg = resolve_precision(cfg)  # config.json records the dtype the run uses, not "auto"
    return train(cfg, create_run(cfg, name, "sft"), progress)


def resume_sft(run_dir: str | Path, overrides: dict[str, object] | None = None, progress: bool = True) -> RunDir:
    cfg, run = reopen_run(SFTConfig, run_dir, overrides)
    return train(cfg, run, progress)
