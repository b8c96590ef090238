"""Prompt formats (config `prompt_format`): a model without a chat template never crashes.

The default model's tokenizer, stripped of its chat template, stands in for a base checkpoint
such as Llama-3.1-8B: sampling prompts, evaluation prompts and the handoff probe all render.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from rlora.config import CHOICES, ConfigError, RLConfig
from rlora.data import PLAIN_STOP, PROMPT_FORMATS, Problem, make_prompt, render_turn
from rlora.rl.handoff import probe_ids
from rlora.train.models import resolve_model

PROBLEM = Problem("g1", "Tom has 3 apples and gets 4 more. How many?\nPlease box it.", "7", "gsm8k")


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model("default"))


@pytest.fixture
def base_tokenizer(tokenizer):
    """The same tokenizer as a base checkpoint ships it: no chat template."""
    import copy

    stripped = copy.deepcopy(tokenizer)
    stripped.chat_template = None
    return stripped


def test_choices_are_the_formats():
    assert set(CHOICES["prompt_format"]) == {"auto", *PROMPT_FORMATS}
    with pytest.raises(ConfigError, match="config key 'prompt_format'"):
        RLConfig(prompt_format="alpaca")


def test_auto_is_the_chat_template_where_there_is_one(tokenizer):
    prompt = make_prompt(PROBLEM, tokenizer)
    text = tokenizer.apply_chat_template([{"role": "user", "content": PROBLEM.question}], add_generation_prompt=True, tokenize=False)
    assert prompt.prompt_ids == tuple(tokenizer.encode(text, add_special_tokens=False)) and prompt.stop == ()
    assert make_prompt(PROBLEM, tokenizer, "chat") == prompt


def test_a_tokenizer_without_template_gets_plain_prompts(base_tokenizer):
    prompt = make_prompt(PROBLEM, base_tokenizer)  # auto
    text = base_tokenizer.decode(prompt.prompt_ids)
    assert text.startswith("Question: Tom has 3 apples") and text.endswith("Please box it.\nAnswer:")
    assert prompt.stop == PLAIN_STOP == ("\nQuestion:",)
    assert make_prompt(PROBLEM, base_tokenizer, "plain") == prompt
    with pytest.raises(ConfigError, match="config key 'prompt_format': chat needs a tokenizer with a chat template"):
        make_prompt(PROBLEM, base_tokenizer, "chat")


def test_fewshot_puts_boxed_worked_examples_first(base_tokenizer):
    gsm8k = base_tokenizer.decode(make_prompt(PROBLEM, base_tokenizer, "fewshot").prompt_ids)
    assert gsm8k.count("Question: ") == 5 and gsm8k.count("\\boxed{") == 4 and gsm8k.endswith("Please box it.\nAnswer:")
    assert "15 trees" in gsm8k
    math = render_turn("What is $1+1$?", "", "math", base_tokenizer, "fewshot")
    assert "domain of the expression" in math and math.endswith("What is $1+1$?\nAnswer:")


def test_probe_follows_the_format(tokenizer, base_tokenizer):
    chat = tokenizer.decode(probe_ids(tokenizer))
    # from the question on: the template's default system prompt costs forward tokens and checks nothing more
    assert chat.startswith("What is 12 + 30?<|im_end|>") and "assistant\n12 + 30 = 42.<|im_end|>" in chat and "system" not in chat
    plain = probe_ids(base_tokenizer)  # auto: no template, no crash
    assert base_tokenizer.decode(plain).startswith("Question: What is 12 + 30?")
    assert probe_ids(tokenizer, "plain") == plain
    assert probe_ids(base_tokenizer, "fewshot") == plain  # without the worked examples
    with pytest.raises(ConfigError):
        probe_ids(base_tokenizer, "chat")


def test_evaluation_prompts_follow_the_format(base_tokenizer):
    from rlora.eval.evaluate import _prompts

    prompts = _prompts([PROBLEM], base_tokenizer, "plain")
    assert prompts[0].stop == PLAIN_STOP


@pytest.fixture
def base_model_folder(tmp_path) -> Path:
    """The default model's folder without its chat template (weights linked, not copied)."""
    src = Path(resolve_model("default"))
    out = tmp_path / "base-model"
    out.mkdir()
    for f in src.iterdir():
        if f.name == "chat_template.jinja":
            continue
        if f.name == "tokenizer_config.json":
            import json

            config = json.loads(f.read_text())
            config.pop("chat_template", None)
            (out / f.name).write_text(json.dumps(config))
        elif f.suffix == ".safetensors":
            (out / f.name).symlink_to(f)
        else:
            shutil.copy(f, out / f.name)
    return out


@pytest.mark.slow
def test_rl_step_on_a_model_without_chat_template(base_model_folder, tmp_path):
    """One RL step with evaluation end to end (real vLLM engine): sampling, eval and probe in plain format."""
    import json

    from transformers import AutoTokenizer

    from rlora.rl.loop import run_rl

    assert not AutoTokenizer.from_pretrained(base_model_folder).chat_template
    data = Path(__file__).parent / "data"
    cfg = RLConfig(
        model=str(base_model_folder),
        max_steps=1,
        prompts_per_step=2,
        group_size=4,
        max_tokens=16,
        micro_batch=8,
        dtype="float32",
        device="cpu",
        checkpoint_every=0,
        eval_every=1,
        eval_benchmarks="gsm8k",
        eval_limit=2,
        eval_data_dir=str(data),
        run_dir=str(tmp_path / "run"),
    )
    run = run_rl(cfg, progress=False)
    rows = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 0 and "eval/gsm8k/avg@1" in rows[0]
    completions = (run.path / "eval" / "step_000000" / "completions.jsonl").read_text()
    assert "\nQuestion:" not in "".join(json.loads(line)["completion"] for line in completions.splitlines())
