"""Fast tests of the RL step's pure stages: losses, advantages, batching, config, data, run dir."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from rlora.config import ConfigError, RLConfig, from_dict, load_config, parse_overrides
from rlora.data import DataError, arith_problems, batch_for_step, boxed_answer, gsm8k_answer, load_benchmark, read_jsonl
from rlora.rl.advantages import ADVANTAGES, center, center_std
from rlora.rl.batching import build_batch, minibatches
from rlora.rl.losses import (
    LOSSES,
    LossInputs,
    LossSpec,
    importance_sampling,
    kl_k3,
    objective,
    ppo_clip,
    ratio_stats,
    reinforce,
    sequence_mask,
    staleness_ratio_stats,
    truncated_importance_sampling,
)
from rlora.rl.steps import merge_stats
from rlora.rl.types import Group, Prompt, Rollout
from rlora.runs import RunDir

REPO = Path(__file__).resolve().parents[1]
TEST_DATA = REPO / "tests" / "data"  # a few dozen rows of each benchmark, committed


# ----------------------------------------------------------------------------- losses


def _inputs(lp_N, slp_N, adv_N, seq_id_N=None, ref_lp_N=None):
    """Tokens of one sequence each, unless `seq_id_N` groups them."""
    seq_id_N = torch.arange(len(lp_N)) if seq_id_N is None else seq_id_N
    return LossInputs(learner_lp_N=lp_N, sampler_lp_N=slp_N, adv_N=adv_N, seq_id_N=seq_id_N, num_seqs=int(seq_id_N.max()) + 1, ref_lp_N=ref_lp_N)


def _grads(loss_fn, lp_N, slp_N, adv_N, cap=2.0, seq_id_N=None, **spec):
    lp = lp_N.clone().requires_grad_(True)
    loss_fn(_inputs(lp, slp_N, adv_N, seq_id_N), LossSpec(cap=cap, **spec)).terms_N.sum().backward()
    return lp.grad


def test_on_policy_gradient_equals_reinforce():
    """With w = 1 (sampler == learner) every IS loss has the REINFORCE gradient -A * grad log p."""
    torch.manual_seed(0)
    lp_N = -torch.rand(50) * 3
    adv_N = torch.randn(50)
    expected = _grads(reinforce, lp_N, lp_N, adv_N)
    assert torch.allclose(expected, -adv_N)
    for name in ("is", "tis"):
        assert torch.allclose(_grads(LOSSES[name], lp_N, lp_N, adv_N), expected, atol=1e-6), name


def test_importance_weight_scales_gradient_and_truncation_caps_it():
    lp_N = torch.log(torch.tensor([0.5, 0.5, 0.5]))
    slp_N = torch.log(torch.tensor([0.5, 0.1, 0.4]))  # w = 1, 5, 1.25
    adv_N = torch.tensor([1.0, 1.0, -2.0])
    w_N = torch.tensor([1.0, 5.0, 1.25])
    g_is = _grads(importance_sampling, lp_N, slp_N, adv_N)
    assert torch.allclose(g_is, -w_N * adv_N, atol=1e-5)
    g_tis = _grads(truncated_importance_sampling, lp_N, slp_N, adv_N, cap=2.0)
    assert torch.allclose(g_tis, -torch.tensor([1.0, 2.0, 1.25]) * adv_N, atol=1e-5)
    # the reported value is the truncated objective
    value = truncated_importance_sampling(_inputs(lp_N, slp_N, adv_N), LossSpec(cap=2.0)).terms_N
    assert torch.allclose(value, -torch.tensor([1.0, 2.0, 1.25]) * adv_N, atol=1e-5)


def test_seq_mask_drops_whole_sequences_outside_the_band_and_keeps_tis_elsewhere():
    """Against a loop over sequences: mean log-ratio per sequence, dropped outside [-delta, delta]."""
    torch.manual_seed(0)
    seq_id_N = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3])
    lp_N = -torch.rand(10) * 2
    shift_S = torch.tensor([0.1, 0.8, -0.7, 0.45])  # sequence 1 above the band, 2 below, 0 and 3 inside
    slp_N = lp_N - shift_S[seq_id_N] + 0.05 * torch.randn(10) * torch.tensor([1, -1, 0] * 3 + [0])  # per-token noise, same mean
    adv_N = torch.randn(10)
    spec = LossSpec(loss="seq_mask", cap=1.3, seq_mask_delta=0.5)
    out = sequence_mask(_inputs(lp_N, slp_N, adv_N, seq_id_N), spec)
    tis = truncated_importance_sampling(_inputs(lp_N, slp_N, adv_N, seq_id_N), spec).terms_N
    g_mask = _grads(sequence_mask, lp_N, slp_N, adv_N, cap=1.3, seq_id_N=seq_id_N, seq_mask_delta=0.5)
    g_tis = _grads(truncated_importance_sampling, lp_N, slp_N, adv_N, cap=1.3, seq_id_N=seq_id_N)
    for s in range(4):
        on = seq_id_N == s
        dropped = abs(float((lp_N[on] - slp_N[on]).mean())) > 0.5
        assert bool(out.masked_N[on].all()) == dropped and bool(out.masked_N[on].any()) == dropped
        assert torch.equal(out.terms_N[on], torch.zeros(int(on.sum())) if dropped else tis[on]), s
        assert torch.equal(g_mask[on], torch.zeros(int(on.sum())) if dropped else g_tis[on]), s
    assert out.masked_N.tolist() == [False] * 3 + [True] * 6 + [False]
    assert not out.clipped_N.any()


@pytest.mark.parametrize(
    "ratio,adv,clipped",
    [(1.0, 1.0, False), (1.0, -1.0, False), (1.5, 1.0, True), (1.5, -1.0, False), (0.5, 1.0, False), (0.5, -1.0, True), (1.1, 1.0, False), (0.85, -1.0, False)],
)
def test_ppo_clip_table(ratio, adv, clipped):
    """-min(r A, clip(r, 0.8, 1.2) A): the value, and a zero gradient once r has moved past the clip the way A pushes it."""
    lp_N, slp_N, adv_N = torch.log(torch.tensor([0.5])), torch.log(torch.tensor([0.5 / ratio])), torch.tensor([adv])
    spec = LossSpec(loss="ppo_clip", clip_eps_low=0.2, clip_eps_high=0.2)
    out = ppo_clip(_inputs(lp_N, slp_N, adv_N), spec)
    clip = min(max(ratio, 0.8), 1.2)
    assert out.terms_N.item() == pytest.approx(-min(ratio * adv, clip * adv), rel=1e-6)
    assert out.clipped_N.item() == clipped
    grad = _grads(ppo_clip, lp_N, slp_N, adv_N, clip_eps_low=0.2, clip_eps_high=0.2)
    assert grad.item() == pytest.approx(0.0 if clipped else -ratio * adv, rel=1e-5)


def test_ppo_clip_high_bound_and_on_policy_equals_is():
    lp_N = -torch.rand(20) * 3
    adv_N = torch.randn(20)
    assert torch.allclose(_grads(ppo_clip, lp_N, lp_N, adv_N), _grads(importance_sampling, lp_N, lp_N, adv_N))
    r_N = torch.tensor([1.25, 1.25])  # inside [0.8, 1.28], outside [0.8, 1.2]
    lp = torch.log(torch.tensor([0.5, 0.5]))
    x = _inputs(lp, lp - torch.log(r_N), torch.ones(2))
    assert not ppo_clip(x, LossSpec(loss="ppo_clip", clip_eps_high=0.28)).clipped_N.any()
    assert ppo_clip(x, LossSpec(loss="ppo_clip", clip_eps_high=0.2)).clipped_N.all()


def test_kl_penalty_is_k3_added_to_every_token():
    lp_N = torch.log(torch.tensor([0.5, 0.2, 0.9]))
    ref_N = torch.log(torch.tensor([0.5, 0.4, 0.3]))
    adv_N = torch.tensor([1.0, -1.0, 0.5])
    d_N = ref_N - lp_N
    assert torch.allclose(kl_k3(lp_N, ref_N), torch.exp(d_N) - d_N - 1)
    assert kl_k3(lp_N, ref_N)[0] == 0 and (kl_k3(lp_N, ref_N) >= 0).all()
    spec = LossSpec(loss="seq_mask", seq_mask_delta=1e-9, kl_coef=0.1)  # every sequence with a log-ratio is dropped
    slp_N = lp_N - 1.0
    lp = lp_N.clone().requires_grad_(True)
    out = objective(_inputs(lp, slp_N, adv_N, ref_lp_N=ref_N), spec)
    out.terms_N.sum().backward()
    assert out.masked_N.all()  # the loss is masked, the penalty is not
    assert torch.allclose(out.terms_N, 0.1 * (torch.exp(d_N) - d_N - 1))
    assert torch.allclose(lp.grad, 0.1 * (1 - torch.exp(d_N)))  # d k3 / d log p_learner
    assert torch.equal(out.kl_ref_N, kl_k3(lp_N, ref_N))
    no_kl = objective(_inputs(lp_N, slp_N, adv_N), LossSpec(loss="tis"))
    assert no_kl.kl_ref_N is None
    with pytest.raises(AssertionError, match="reference"):
        objective(_inputs(lp_N, slp_N, adv_N), LossSpec(loss="tis", kl_coef=0.1))
    with pytest.raises(ValueError, match="'ppo'"):
        LossSpec(loss="ppo")


def test_staleness_ratio_stats_and_merging_steps():
    lp_N = torch.log(torch.tensor([0.5, 0.5, 0.5]))
    slp_N = torch.log(torch.tensor([0.5, 0.25, 1.0]))  # ratios 1, 2, 0.5
    stats = staleness_ratio_stats(lp_N, slp_N, torch.tensor([0, 2, 2]))
    assert stats["ratio_mean_s0"] == pytest.approx(1.0) and stats["ratio_mean_s2"] == pytest.approx(1.25)
    assert stats["kl_sample_train_s0"] == 0.0 and set(stats) == {"ratio_mean_s0", "ratio_mean_s2", "kl_sample_train_s0", "kl_sample_train_s2"}
    merged = merge_stats([{"loss": 1.0, "ratio_max": 3.0, "ratio_mean_s0": 1.0}, {"loss": 2.0, "ratio_max": 2.0, "ratio_mean_s1": 4.0}])
    assert merged == {"loss": 1.5, "ratio_max": 3.0, "ratio_mean_s0": 1.0, "ratio_mean_s1": 4.0}
    one = {"loss": 0.1, "entropy": 0.3, "ratio_mean": 1.0000001}
    assert merge_stats([one]) == one


def test_ratio_stats():
    lp_N = torch.log(torch.tensor([0.5, 0.5]))
    slp_N = torch.log(torch.tensor([0.5, 0.1]))
    stats = ratio_stats(lp_N, slp_N, cap=2.0)
    assert stats["ratio_max"] == pytest.approx(5.0, rel=1e-5)
    assert stats["ratio_mean"] == pytest.approx(3.0, rel=1e-5)
    assert stats["truncated_frac"] == 0.5
    assert stats["kl_sample_train"] == pytest.approx((0 + (5 - 1 - torch.log(torch.tensor(5.0)).item())) / 2, rel=1e-5)
    assert ratio_stats(lp_N, lp_N, 2.0)["kl_sample_train"] == 0.0


# ----------------------------------------------------------------------------- advantages


def test_centering():
    r_G = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0])
    adv_G = center(r_G)
    assert torch.allclose(adv_G, r_G - 0.6)
    assert adv_G.sum().abs() < 1e-6
    assert torch.all(center(torch.ones(4)) == 0)
    std = center_std(r_G)
    assert std.std(unbiased=False) == pytest.approx(1.0, rel=1e-4)
    assert set(ADVANTAGES) == {"center", "center_std"}


# ----------------------------------------------------------------------------- batching


def _group(prompt_ids, completions, rewards, lps=None):
    prompt = Prompt(problem_id="p", question="q", prompt_ids=tuple(prompt_ids), reference="1", reward_task="number")
    rollouts = tuple(
        Rollout(
            prompt_ids=tuple(prompt_ids),
            completion_ids=tuple(c),
            sampler_logprobs=tuple(lps[i] if lps else [-0.5] * len(c)),
            reward=r,
            text="",
            finish_reason="stop",
        )
        for i, (c, r) in enumerate(zip(completions, rewards))
    )
    return Group(prompt=prompt, rollouts=rollouts, policy_version=0)


def test_batch_alignment_masks_prompt_and_shifts_targets():
    g = _group([10, 11, 12], [[20, 21], [30, 31, 32, 33]], [1.0, 0.0], lps=[[-0.1, -0.2], [-1.0, -1.1, -1.2, -1.3]])
    batch = build_batch([g], center, pad_id=0)
    assert batch is not None
    # sorted longest first
    assert batch.tokens_B_T[0].tolist() == [10, 11, 12, 30, 31, 32, 33]
    assert batch.tokens_B_T[1].tolist() == [10, 11, 12, 20, 21, 0, 0]
    assert batch.lengths_B.tolist() == [7, 5]
    # position t predicts token t+1; only completion tokens are scored
    assert batch.targets_B_T[0].tolist()[:6] == [11, 12, 30, 31, 32, 33]
    assert batch.mask_B_T[0].tolist() == [0, 0, 1, 1, 1, 1, 0]
    assert batch.mask_B_T[1].tolist() == [0, 0, 1, 1, 0, 0, 0]
    on = batch.mask_B_T.bool()
    assert batch.targets_B_T[on].tolist() == [30, 31, 32, 33, 20, 21]
    assert torch.allclose(batch.sampler_logprobs_B_T[on], torch.tensor([-1.0, -1.1, -1.2, -1.3, -0.1, -0.2]))
    assert batch.advantages_B.tolist() == [-0.5, 0.5]
    assert batch.num_tokens == 6


def test_rows_carry_their_groups_staleness():
    old = Group(prompt=_group([1], [], []).prompt, rollouts=_group([1, 2], [[3], [4]], [0.0, 1.0]).rollouts, policy_version=5)
    new = Group(prompt=old.prompt, rollouts=_group([1, 2], [[5, 6], [7, 8]], [0.0, 1.0]).rollouts, policy_version=7)
    batch = build_batch([old, new], center, pad_id=0, current_version=7)
    assert batch is not None and batch.staleness_B.tolist() == [0, 0, 2, 2]  # longest rows (the new group's) first
    assert build_batch([old, new], center, pad_id=0).staleness_B.tolist() == [0, 0, 0, 0]
    with pytest.raises(AssertionError, match="newer"):
        build_batch([new], center, pad_id=0, current_version=6)


def test_minibatches_split_whole_sequences_deterministically():
    groups = [_group([1, 2, 3][: 1 + p % 3], [[5] * (1 + i + p) for i in range(4)], [0.0, 1.0, 0.0, 1.0]) for p in range(3)]
    batch = build_batch(groups, center, pad_id=0)
    assert batch is not None
    assert minibatches(batch, 1, 3, np.random.default_rng(0)) == [batch] * 3  # the batch itself, unshuffled
    mbs = minibatches(batch, 5, 2, np.random.default_rng([0, 4]))
    assert len(mbs) == 10 and {mb.tokens_B_T.shape[0] for mb in mbs} <= {2, 3}

    def rows(mb):
        return [
            tuple(mb.tokens_B_T[b, : mb.lengths_B[b]].tolist()) + (mb.advantages_B[b].item(), mb.sampler_logprobs_B_T[b].sum().item())
            for b in range(len(mb.lengths_B))
        ]

    whole = sorted(rows(batch))
    for substep in (mbs[:5], mbs[5:]):  # every row once per pass, whole and aligned
        assert sorted(r for mb in substep for r in rows(mb)) == whole
        assert sum(mb.num_tokens for mb in substep) == batch.num_tokens
    assert all(mb.lengths_B.tolist() == sorted(mb.lengths_B.tolist(), reverse=True) for mb in mbs)
    assert all(mb.tokens_B_T.shape[1] == mb.lengths_B.max() for mb in mbs)
    again = minibatches(batch, 5, 2, np.random.default_rng([0, 4]))
    assert all(torch.equal(a.tokens_B_T, b.tokens_B_T) for a, b in zip(mbs, again))
    assert len(minibatches(batch, 100, 1, np.random.default_rng(0))) == 12  # at most one minibatch per row


def test_constant_groups_are_dropped():
    flat = _group([1, 2], [[3], [4]], [1.0, 1.0])
    mixed = _group([1, 2], [[5], [6]], [0.0, 1.0])
    assert not flat.has_signal and mixed.has_signal
    batch = build_batch([flat, mixed], center, pad_id=0)
    assert batch is not None and batch.tokens_B_T.shape[0] == 2
    assert set(batch.targets_B_T[batch.mask_B_T.bool()].tolist()) == {5, 6}
    assert build_batch([flat], center, pad_id=0) is None


# ----------------------------------------------------------------------------- config


def test_config_defaults_and_overrides():
    cfg = load_config(RLConfig, None, ["rank=full", "lr=3e-5", "max_steps=7"])
    assert cfg.rank == "full" and cfg.is_full and cfg.lr == 3e-5 and cfg.max_steps == 7
    assert parse_overrides(["a=1", "b=true", "c=x"]) == {"a": 1, "b": True, "c": "x"}


@pytest.mark.parametrize(
    "override,key",
    [
        ("clip_eps=0", "clip_eps"),
        ("clip_eps=1.0", "clip_eps"),
        ("clip_eps_high=-0.1", "clip_eps_high"),
        ("num_substeps=0", "num_substeps"),
        ("num_minibatches=0", "num_minibatches"),
        ("kl_coef=-0.01", "kl_coef"),
        ("seq_mask_delta=0", "seq_mask_delta"),
        ("is_cap=0", "is_cap"),
    ],
)
def test_off_policy_config_errors_name_the_key(override, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config(RLConfig, None, [override])


def test_off_policy_config_defaults_are_the_blogs_single_on_policy_step():
    cfg = load_config(RLConfig, None, ["loss=ppo_clip", "clip_eps_high=0.28", "kl_coef=0.01", "num_substeps=2", "num_minibatches=4"])
    assert (cfg.loss, cfg.clip_eps, cfg.clip_eps_high, cfg.kl_coef, cfg.num_substeps, cfg.num_minibatches) == ("ppo_clip", 0.2, 0.28, 0.01, 2, 4)
    default = RLConfig()
    assert (default.kl_coef, default.num_substeps, default.num_minibatches, default.loss) == (0.0, 1, 1, "tis")
    with pytest.raises(ConfigError, match="'kl_coef'.*fsdp"):
        load_config(RLConfig, None, ["rank=full", "learner_parallel=fsdp", "kl_coef=0.1"])


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="'lerning_rate'"):
        load_config(RLConfig, None, ["lerning_rate=1"])
    with pytest.raises(ConfigError, match="'max_steps'.*int"):
        load_config(RLConfig, None, ["max_steps=many"])
    with pytest.raises(ConfigError, match="'rank'"):
        load_config(RLConfig, None, ["rank=0"])
    with pytest.raises(ConfigError, match="'rank'"):
        load_config(RLConfig, None, ["rank=half"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: 1.0e-4\ngroup_sise: 8\n")
    with pytest.raises(ConfigError, match=r"'group_sise' in .*bad\.yaml"):
        load_config(RLConfig, bad)
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(RLConfig, tmp_path / "nope.yaml")
    nested = tmp_path / "nested.yaml"
    nested.write_text("lr:\n  a: 1\n")
    with pytest.raises(ConfigError, match="flat"):
        load_config(RLConfig, nested)


# flat RL presets; rl_multi_*.yaml are multi-run files (tests/test_multi.py loads them)
@pytest.mark.parametrize("preset", sorted(p.name for p in (REPO / "configs").glob("rl_*.yaml") if not p.name.startswith("rl_multi")))
def test_presets_load(preset):
    cfg = load_config(RLConfig, REPO / "configs" / preset)
    assert cfg.is_full == ("full" in preset)


def test_config_round_trips_through_json(tmp_path):
    cfg = load_config(RLConfig, None, ["rank=4", "alpha_c=2.5"])
    again = from_dict(RLConfig, json.loads(json.dumps(cfg.__dict__)))
    assert again == cfg


# ----------------------------------------------------------------------------- data


def test_jsonl_errors_name_file_and_line(tmp_path):
    f = tmp_path / "rows.jsonl"
    f.write_text('{"question": "q", "answer": "#### 1"}\n{oops\n')
    with pytest.raises(DataError, match=r"rows\.jsonl:2"):
        read_jsonl(f, ["question"])
    f.write_text('{"question": "q"}\n')
    with pytest.raises(DataError, match=r"rows\.jsonl:1: missing field 'answer'"):
        read_jsonl(f, ["question", "answer"])
    with pytest.raises(DataError, match="does not exist"):
        read_jsonl(tmp_path / "missing.jsonl")


def test_answer_parsing():
    assert gsm8k_answer("so 3+4=7\n#### 1,234") == "1234"
    assert boxed_answer(r"thus \boxed{\frac{1}{2}} and finally \boxed{\{1, 2\}}") == r"\{1, 2\}"
    with pytest.raises(DataError):
        gsm8k_answer("no marker")


def test_step_batches_are_deterministic_and_cover_epochs():
    problems = arith_problems(10, 9, seed=0)
    assert all(str(eval(p.question.split("?")[0].replace("What is", ""))) == p.reference for p in problems)
    assert batch_for_step(problems, 3, 4, seed=1) == batch_for_step(problems, 3, 4, seed=1)
    epoch = [p.problem_id for s in range(5) for p in batch_for_step(problems, s, 2, seed=1)]
    assert sorted(epoch) == sorted(p.problem_id for p in problems)  # each problem once per epoch


@pytest.mark.parametrize("name,count,task", [("math500", 40, "math"), ("aime24", 30, "aime"), ("aime25", 30, "aime"), ("gsm8k", 40, "gsm8k")])
def test_benchmarks_load_from_local_dir(name, count, task):
    problems = load_benchmark(name, str(TEST_DATA))
    assert len(problems) == count and all(p.reward_task == task and p.reference for p in problems)
    assert len(load_benchmark(name, str(TEST_DATA), limit=5)) == 5


def test_unknown_benchmark_and_missing_file(tmp_path):
    with pytest.raises(DataError, match="unknown benchmark 'math501'"):
        load_benchmark("math501", str(tmp_path))
    with pytest.raises(DataError, match="math500.jsonl does not exist"):
        load_benchmark("math500", str(tmp_path))


# ----------------------------------------------------------------------------- run dir


def test_metrics_truncation_drops_later_steps_and_torn_lines(tmp_path):
    run = RunDir(tmp_path)
    for step in range(5):
        run.log({"step": step, "reward_mean": step / 10})
    with run.metrics_path.open("a") as f:
        f.write('{"step": 5, "rew')  # killed mid-write
    assert [r["step"] for r in run.read_metrics()] == [0, 1, 2, 3, 4]
    run.truncate_metrics(3)
    assert [r["step"] for r in run.read_metrics()] == [0, 1, 2]
    assert run.metrics_path.read_text().endswith("\n")


def test_checkpoint_roundtrip_and_latest_pointer(tmp_path):
    run = RunDir(tmp_path)
    assert run.latest_checkpoint() is None
    state = {"trainable": {"w": torch.ones(2)}, "optimizer": {}}
    run.save_checkpoint(2, state)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    run.save_checkpoint(4, {"trainable": {"w": torch.full((2,), 4.0)}, "optimizer": {}})
    torch.rand(3)  # move the RNG on; loading must restore it
    path = run.latest_checkpoint()
    assert path is not None and path.name == "step_000004"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_000002", "step_000004"]
    assert sorted(p.name for p in run.checkpoint_at(2).iterdir()) == ["state.json", "trainable.pt"]  # policy only
    with pytest.raises(FileNotFoundError, match=r"steps \[2, 4\]"):
        run.checkpoint_at(3)
    next_step, loaded = RunDir.load_checkpoint(path)
    assert next_step == 4 and torch.equal(loaded["trainable"]["w"], torch.full((2,), 4.0))
    assert torch.equal(torch.rand(3), expected)
