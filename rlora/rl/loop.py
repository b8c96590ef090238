"""Policy-gradient RL on math with LoRA (rank 1 upward) or full fine-tuning, as in LoRA Without Regret.

One step, top to bottom:
  1. problems   P problems for this step (a pure function of step and seed, so resumes see the same data)
  2. sample     G completions each from the sampler (vLLM), with the sampler's own token logprobs
  3. grade      reward = rewards.grade(completion, gold, task): 1 or 0
  4. centre     advantage = reward - mean reward of the group (GRPO-style, no std division)
  5. batch      groups whose rewards are all equal carry no gradient: counted, then dropped
  6. learn      loss = -(1/N) sum over tokens of w * A, w = p_learner / p_sampler (truncated at C)
  7. hand off   the new adapter (or full weights) goes to the running engine; every engine worker's
                fingerprint of what it serves must equal the learner's, and a fixed probe sequence
                must score the same under sampler and learner, else the run stops (rlora.rl.handoff)

Departures from the blog: the default loss truncates the importance weight at C = 2 (config
`loss=is` gives the untruncated objective); rollouts are strictly on-policy (one optimizer step
per batch), so w differs from 1 only through sampler/learner numerics, which the run logs as
`kl_sample_train` and `ratio_*` every step.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from tqdm import tqdm

import rewards
from rlora.config import RLConfig
from rlora.data import batch_for_step, load_task, make_prompt
from rlora.devices import resolve_device, resolve_precision
from rlora.engine.sampler import EngineSpec, Sampler
from rlora.engine.weight_sync import choose_transfer
from rlora.eval.evaluate import eval_policy, load_benchmarks, parse_benchmarks
from rlora.plan import check_before_loading
from rlora.rl.handoff import make_probe, publish
from rlora.rl.steps import learn, reward_group, step_metrics
from rlora.runs import RunDir, create_run, reopen_run
from rlora.train import distributed
from rlora.train.learner import Learner
from rlora.train.models import resolve_model
from rlora.train.placement import placement_for
from rlora.train.setup import learner_spec, load_latest, restore, save_if_due, seed_everything


def follow_rank0(run: RunDir, learner: Learner) -> RunDir:
    """Learner ranks > 0 (torchrun): the same checkpoint as rank 0, then its step calls until it stops."""
    assert isinstance(learner, distributed.DataParallelLearner), "ranks > 0 exist only with several learner processes"
    load_latest(run, learner)
    distributed.follow(learner)
    distributed.close_world()
    return run


# ------------------------------------------------------------------------------------ the loop


def train(cfg: RLConfig, run: RunDir, progress: bool = True) -> RunDir:
    cfg = resolve_precision(cfg)  # dtype auto -> bfloat16 or float32 (run_rl saves the resolved value)
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    world = distributed.init_world()  # one process, or one of torchrun's (README "Scaling out")
    place = placement_for(cfg, device, world)
    check_before_loading(cfg, device, world.size)  # a config that cannot fit fails here, naming the key
    # FullFT to an engine in its own process: in GPU memory (ipc/nccl) on CUDA, a file on CPU; fails here if impossible
    transfer = choose_transfer(cfg.weight_transfer, device.split(":")[0], place.engine_in_process, cfg.placement) if cfg.is_full else "file"
    model_path = resolve_model(cfg.model)
    problems = load_task(cfg.task, cfg.train_data, cfg.arith_max, cfg.seed)
    # periodic eval: one greedy sample per problem (rlora.eval.evaluate.eval_policy); loaded now so a bad name fails first
    eval_sets = load_benchmarks(parse_benchmarks(cfg.eval_benchmarks), cfg.eval_limit, cfg.eval_data_dir) if cfg.eval_every else {}
    learner = distributed.make_learner(learner_spec(cfg, model_path, place.learner_device), cfg.learner_parallel)
    if not world.is_main:
        return follow_rank0(run, learner)
    start_step = restore(run, learner)
    run.record({"reward_policy": rewards.describe_policy(cfg.reward_policy), "dtype": cfg.dtype})
    handle = distributed.lead(learner)  # rank 0's handle; the learner itself in one process
    sampler = Sampler(
        EngineSpec(
            model_path=model_path,
            device=device.split(":")[0],
            dtype=cfg.dtype,
            lora_rank=None if cfg.is_full else int(cfg.rank),
            kv_cache_gib=cfg.kv_cache_gib,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            max_model_len=cfg.max_model_len,
            max_num_seqs=max(256, cfg.prompts_per_step * cfg.group_size),
            seed=cfg.seed + start_step,
            device_ids=place.sampler_gpus,
            tensor_parallel_size=cfg.tensor_parallel_size,
            in_process=place.engine_in_process,
            sleep_mode=place.sleep,
            cpu_threads_bind=place.cpu_threads_bind,
            weight_transfer=transfer if transfer in ("ipc", "nccl") else "",
        )
    )
    if sampler.spec.weight_transfer:  # every learner rank joins vLLM's trainer-side transfer engine
        handle.init_weight_transfer(transfer, cfg.tensor_parallel_size, sampler.weight_sync_client())
    tokenizer = sampler.tokenizer
    probe = make_probe(tokenizer, cfg.dtype, cfg.probe_tol, cfg.prompt_format)  # tolerance calibrated at the first handoff
    publish(handle, sampler, start_step, probe)

    bar = tqdm(range(start_step, cfg.max_steps), initial=start_step, total=cfg.max_steps, desc="rl", disable=not progress, file=sys.stderr)
    for step in bar:
        # policy v{step}, which this step samples from and checkpoint step_{step} holds
        evals = (
            eval_policy(sampler, eval_sets, cfg.max_tokens, cfg.prompt_format, run.path / "eval" / f"step_{step:06d}", cfg.reward_policy)
            if eval_sets and step % cfg.eval_every == 0
            else {}
        )
        t0 = time.perf_counter()
        prompts_P = [make_prompt(p, tokenizer, cfg.prompt_format) for p in batch_for_step(problems, step, cfg.prompts_per_step, cfg.seed)]
        samples_P_G = sampler.sample(prompts_P, cfg.group_size, cfg.max_tokens, cfg.temperature)
        t1 = time.perf_counter()
        groups_P = [reward_group(p, s, sampler.version, cfg.reward_policy) for p, s in zip(prompts_P, samples_P_G)]
        t2 = time.perf_counter()
        assert all(g.policy_version == step for g in groups_P), "rollouts must come from the current policy"
        with sampler.asleep(handle.empty_cache):  # placement=sleep: the engine frees its GPU memory for the learner
            stats, train_tokens = learn(handle, groups_P, cfg, tokenizer.pad_token_id or 0)
        t3 = time.perf_counter()
        handoff = publish(handle, sampler, step + 1, probe)
        timings = {
            "sample_s": t1 - t0,
            "grade_s": t2 - t1,
            "learn_s": t3 - t2,
            **handoff,
            "handoff_bytes": sampler.handoff_bytes,
            "step_s": time.perf_counter() - t0,
        }
        row = {**step_metrics(step, groups_P, stats, train_tokens), **timings, **evals}
        run.log(row)
        save_if_due(run, cfg, handle, step + 1)
        bar.set_postfix(reward=f"{row['reward_mean']:.3f}", signal=f"{row['signal_groups']:.2f}")
    if eval_sets:  # the final policy (checkpoint step_<max_steps>) gets a row of its own
        run.log(
            {
                "step": cfg.max_steps,
                **eval_policy(sampler, eval_sets, cfg.max_tokens, cfg.prompt_format, run.path / "eval" / f"step_{cfg.max_steps:06d}", cfg.reward_policy),
            }
        )
    sampler.close()
    run.close()
    distributed.shutdown(handle)  # releases ranks > 0 from follow_rank0
    return run


def run_rl(cfg: RLConfig, name: str = "rl", progress: bool = True) -> RunDir:
    cfg = resolve_precision(cfg)  # config.json records the dtype the run uses, not "auto"
    device = resolve_device(cfg.device)
    placement_for(cfg, device, distributed.World())  # before the run directory exists: placement errors name the machine,
    check_before_loading(cfg, device, distributed.world_size_from_env())  # the memory plan names the key to change
    return train(cfg, distributed.from_rank0(lambda: create_run(cfg, name, "rl")), progress)


def resume_rl(run_dir: str | Path, overrides: dict[str, object] | None = None, progress: bool = True) -> RunDir:
    cfg, run = distributed.from_rank0(lambda: reopen_run(RLConfig, run_dir, overrides))
    return train(cfg, run, progress)
