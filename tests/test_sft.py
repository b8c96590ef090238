"""SFT tests on a tiny random Llama with a byte-level ChatML tokenizer: data formats, the
assistant-only loss mask, batching, the fixed held-out split, and real training (loss falls,
a killed run resumes to the same result, FullFT and LoRA share the learner)."""

from __future__ import annotations

import json
import re

import pytest
import torch

from rlora.config import ConfigError, from_dict, load_config
from rlora.data import DataError
from rlora.sft import loop as sft
from rlora.sft.loop import (
    SFTConfig,
    batch_indices,
    collate,
    is_held_out,
    load_chats,
    resume_sft,
    row_to_messages,
    run_sft,
    synthetic_word_problems,
    tokenize_chat,
)

CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def byte_tokenizer():
    """A byte-level tokenizer (one token per byte) with ChatML special tokens and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>")
    fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    fast.chat_template = CHATML
    return fast


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    path = tmp_path_factory.mktemp("tiny_sft")
    LlamaForCausalLM(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def _cfg(model: str, tmp_path, **kw) -> SFTConfig:
    base = dict(
        model=model,
        rank=4,
        lr=1e-2,
        batch_size=4,
        micro_batch=2,
        max_steps=6,
        eval_every=3,
        eval_examples=8,
        synthetic_examples=300,
        max_seq_len=160,
        device="cpu",
        dtype="float32",
        run_dir=str(tmp_path / "run"),
    )
    return SFTConfig(**{**base, **kw})


# ----------------------------------------------------------------------------- data


def test_synthetic_problems_are_deterministic_and_correct():
    a, b = synthetic_word_problems(200, seed=3), synthetic_word_problems(200, seed=3)
    assert a == b and a != synthetic_word_problems(200, seed=4)
    for chat in a:
        assert [m["role"] for m in chat] == ["system", "user", "assistant"]
        solution = chat[2]["content"]
        answer = int(re.search(r"The answer is (\d+)\.$", solution).group(1))
        steps = re.findall(r"(\d+) ([-+*/]) (\d+) = (\d+)", solution)
        assert steps, solution
        for x, op, y, z in steps:  # every worked step is right
            assert eval(f"{x} {op} {y}") == int(z), solution
        assert int(steps[-1][3]) == answer


@pytest.mark.parametrize(
    "row, expected",
    [
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}, [("user", "hi"), ("assistant", "yo")]),
        ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}, [("user", "q"), ("assistant", "a")]),
        ({"question": "2+2?", "answer": "2+2=4\n#### 4"}, [("user", "2+2?"), ("assistant", "2+2=4\n#### 4")]),
        ({"prompt": "p", "completion": "c"}, [("user", "p"), ("assistant", "c")]),
    ],
    ids=["tulu-messages", "sharegpt-openthoughts", "gsm8k", "prompt-completion"],
)
def test_row_formats(row, expected):
    assert [(m["role"], m["content"]) for m in row_to_messages(row, "x")] == expected


@pytest.mark.parametrize(
    "row, message",
    [
        ({"text": "no chat"}, "none of the fields"),
        ({"messages": [{"role": "user", "content": "only a question"}]}, "no assistant turn"),
        ({"conversations": [{"from": "robot", "value": "?"}]}, "malformed 'conversations'"),
    ],
)
def test_bad_rows_name_the_problem(row, message):
    with pytest.raises(DataError, match=message):
        row_to_messages(row, "file.jsonl row 7")


def test_local_jsonl_with_max_examples(tmp_path):
    path = tmp_path / "gsm.jsonl"
    path.write_text("".join(json.dumps({"question": f"q{i}", "answer": f"#### {i}"}) + "\n" for i in range(10)))
    chats = load_chats(SFTConfig(train_data=str(path), max_examples=4))
    assert [c[0]["content"] for c in chats] == ["q0", "q1", "q2", "q3"]


def test_held_out_split_is_fixed_and_about_the_fraction():
    chats = synthetic_word_problems(4000)
    held = [is_held_out(c, 0.1) for c in chats]
    assert held == [is_held_out(c, 0.1) for c in chats]  # a pure function of the chat
    assert 0.08 < sum(held) / len(held) < 0.12
    assert all(is_held_out(c, 0.2) for c, h in zip(chats, held) if h)  # nested: a larger fraction keeps these


# ----------------------------------------------------------------------------- tokens and mask


def _masked_text(tokenizer, example) -> str:
    return tokenizer.decode([t for t, a in zip(example.token_ids, example.assistant) if a])


def test_mask_covers_assistant_turns_only(tokenizer):
    chat = [
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "5"},
        {"role": "user", "content": "And 4 + 4?"},
        {"role": "assistant", "content": "It is 8."},
    ]
    example = tokenize_chat(chat, tokenizer, 1000)
    full = tokenizer.apply_chat_template(chat, tokenize=False)
    assert tokenizer.decode(list(example.token_ids)) == full  # the pieces add up to the templated chat
    assert _masked_text(tokenizer, example) == "5<|im_end|>\nIt is 8.<|im_end|>\n"


def test_truncation_and_chats_with_nothing_left(tokenizer):
    chat = [{"role": "user", "content": "x" * 50}, {"role": "assistant", "content": "answer"}]
    full = tokenize_chat(chat, tokenizer, 1000)
    prompt_len = full.assistant.index(1)
    cut = tokenize_chat(chat, tokenizer, prompt_len + 3)
    assert len(cut.token_ids) == prompt_len + 3 and cut.num_targets == 3
    assert tokenize_chat(chat, tokenizer, prompt_len) is None


def test_collate_aligns_targets_with_the_mask(tokenizer):
    chats = synthetic_word_problems(3)
    examples = [tokenize_chat(c, tokenizer, 500) for c in chats]
    batch = collate(examples, pad_id=tokenizer.pad_token_id)
    assert batch.num_tokens == sum(e.num_targets for e in examples)
    for b, e in enumerate(examples):
        n = len(e.token_ids)
        on = batch.mask_B_T[b].bool()
        targets = batch.targets_B_T[b][on].tolist()
        # the targets under the mask are exactly the assistant tokens, in order
        assert targets == [t for t, a in zip(e.token_ids, e.assistant) if a]
        assert batch.tokens_B_T[b, 1:n].tolist() == batch.targets_B_T[b, : n - 1].tolist()
        assert not on[n - 1 :].any()


def test_batch_order_is_a_pure_function_of_step_and_seed():
    n, bs = 10, 4
    first_epoch = [i for step in range(2) for i in batch_indices(n, step, bs, seed=1)] + batch_indices(n, 2, bs, seed=1)[:2]
    assert sorted(first_epoch) == list(range(n))  # an epoch sees every chat once
    assert batch_indices(n, 7, bs, 1) == batch_indices(n, 7, bs, 1)
    assert batch_indices(n, 0, bs, 1) != batch_indices(n, 0, bs, 2)


# ----------------------------------------------------------------------------- config


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="'eval_fraction'"):
        SFTConfig(eval_fraction=1.5)
    with pytest.raises(ConfigError, match="'alpha_rule'"):
        SFTConfig(alpha_rule="quadratic")
    with pytest.raises(ConfigError, match="'rank'"):
        SFTConfig(rank=0)
    with pytest.raises(ConfigError, match="unknown config key 'lr_warmup'"):
        from_dict(SFTConfig, {"lr_warmup": 10})


def test_presets_load():
    for name in ("sft_cpu",):
        cfg = load_config(SFTConfig, f"configs/{name}.yaml")
        assert cfg.model == "default" and cfg.lora_targets == "all-linear"


# ----------------------------------------------------------------------------- training


def _final_loss(run) -> float:
    return float(run.read_metrics()[-1]["eval_loss"])


@pytest.mark.parametrize("rank", [4, "full"])
def test_training_lowers_held_out_loss(tiny_model, tmp_path, rank):
    run = run_sft(_cfg(tiny_model, tmp_path, rank=rank, lr=1e-2 if rank != "full" else 3e-3, max_steps=8, eval_every=8), progress=False)
    rows = run.read_metrics()
    assert [r["step"] for r in rows] == list(range(9))
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    assert len(evals) == 2 and evals[1] < evals[0] - 0.3, evals
    assert rows[0]["trainable_params"] > 0
    assert all("train_loss" in r for r in rows[:-1]) and "train_loss" not in rows[-1]


def test_zero_b_starts_at_the_base_model(tiny_model, tmp_path):
    """B = 0: every LoRA rank and FullFT see the same step-0 loss."""
    losses = [
        run_sft(_cfg(tiny_model, tmp_path / str(r), rank=r, max_steps=0, run_dir=str(tmp_path / str(r))), progress=False).read_metrics()[0]["eval_loss"]
        for r in (1, 8, "full")
    ]
    assert losses == pytest.approx([losses[0]] * 3, abs=1e-5)


def test_killed_run_resumes_to_the_same_result(tiny_model, tmp_path, monkeypatch):
    straight = run_sft(_cfg(tiny_model, tmp_path, checkpoint_every=2, run_dir=str(tmp_path / "straight")), progress=False)

    real_step = sft.train_step
    calls = {"n": 0}

    def dies_at_step_3(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # steps 0, 1, 2 train; the 4th update never happens
            raise KeyboardInterrupt("killed")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(sft, "train_step", dies_at_step_3)
    cfg = _cfg(tiny_model, tmp_path, checkpoint_every=2, run_dir=str(tmp_path / "killed"))
    with pytest.raises(KeyboardInterrupt):
        run_sft(cfg, progress=False)
    monkeypatch.setattr(sft, "train_step", real_step)
    resumed = resume_sft(tmp_path / "killed", progress=False)
    rows = resumed.read_metrics()
    assert [r["step"] for r in rows] == list(range(7))  # every step once, rows after the checkpoint dropped
    assert _final_loss(resumed) == pytest.approx(_final_loss(straight), abs=1e-5)
    assert (resumed.path / "checkpoints" / "step_000006" / "adapter" / "adapter_config.json").exists()


def test_diverged_run_is_closed_with_nan(tiny_model, tmp_path, monkeypatch):
    real_step = sft.train_step

    def nan_loss(learner, examples, pad_id):
        return {**real_step(learner, examples, pad_id), "train_loss": float("nan")}

    monkeypatch.setattr(sft, "train_step", nan_loss)
    rows = run_sft(_cfg(tiny_model, tmp_path), progress=False).read_metrics()
    assert [r["step"] for r in rows] == [0, 6]  # stopped at once, closed with a final row
    assert rows[-1]["diverged"] and rows[-1]["eval_loss"] != rows[-1]["eval_loss"]  # NaN
