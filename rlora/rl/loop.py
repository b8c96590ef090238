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

Steps 1-3 run on the engine's thread and 4-6 on the learner's: with `max_staleness: k` > 0 the
sampler works on the next batches (from the newest verified policy, at most k versions behind the
learner) while the learner trains the current one (`run_steps`).

Departures from the blog: the default loss truncates the importance weight at C = 2 (config
`loss=is` gives the untruncated objective; `seq_mask` and `ppo_clip` are the off-policy ones,
rlora.rl.losses). With max_staleness 0 and one optimizer step per batch (the defaults) rollouts
are on-policy, so w differs from 1 only through sampler/learner numerics; with k > 0 (or
num_substeps/num_minibatches > 1) it also corrects for the policy lag. The run logs `kl_sample_train`,
`ratio_*` and `staleness` every step.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import ParamSpec, TypeVar

from tqdm import tqdm

import rewards
from rlora.config import RLConfig
from rlora.data import ArithChain, Problem, batch_for_step, load_task, make_prompt
from rlora.devices import resolve_device, resolve_precision
from rlora.engine.sampler import EngineSpec, Sampler
from rlora.engine.weight_sync import choose_transfer
from rlora.eval.evaluate import eval_policy, load_benchmarks, parse_benchmarks
from rlora.plan import check_before_loading
from rlora.rl.handoff import Probe, judge_deferred, make_probe, publish
from rlora.rl.steps import learn, reward_group, step_metrics
from rlora.rl.types import Group
from rlora.runs import RunDir, create_run, reopen_run
from rlora.train import distributed
from rlora.train.learner import Learner, LearnerHandle
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
    problems = load_task(cfg.task, cfg.train_data, cfg.arith_max, cfg.seed, cfg.arith_terms)
    # periodic eval: one greedy sample per problem (rlora.eval.evaluate.eval_policy); loaded now so a bad name fails first.
    # A synthetic benchmark (arith_chain) is the held-out split at the run's own difficulty.
    arith = ArithChain(cfg.arith_max, cfg.arith_terms)
    eval_sets = load_benchmarks(parse_benchmarks(cfg.eval_benchmarks), cfg.eval_limit, cfg.eval_data_dir, arith) if cfg.eval_every else {}
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
    # tolerance calibrated at the first handoff; FullFT fingerprints sampled between whole read-backs
    probe = make_probe(tokenizer, cfg.dtype, cfg.probe_tol, cfg.prompt_format, cfg.fingerprint_fraction, cfg.fingerprint_full_every)
    publish(handle, sampler, start_step, probe, defer_probe=start_step < cfg.max_steps)  # calibrated in step start_step's sampling call
    try:
        run_steps(cfg, run, handle, sampler, probe, problems, eval_sets, start_step, progress)
    finally:
        sampler.close()
    run.close()
    distributed.shutdown(handle)  # releases ranks > 0 from follow_rank0
    return run


# ------------------------------------------------------------------------------------ the steps

P = ParamSpec("P")
R = TypeVar("R")


@dataclass(frozen=True)
class Sampled:
    """A step's batch, sampled and graded, waiting for the learner."""

    step: int  # the step that trains it
    groups_P: list[Group]  # every group sampled from policy `version`
    version: int
    sample_s: float
    grade_s: float
    probe: dict[str, float] = field(default_factory=dict)  # the verdict on policy `version`'s deferred handoff probe


def sample_step(sampler: Sampler, problems: list[Problem], step: int, cfg: RLConfig, probe: Probe) -> Sampled:
    """Steps 1-3: this step's problems, G completions each from the engine's current policy, graded.

    The first sampling call after a FullFT handoff also scores that handoff's probe (one more
    request, `rlora.rl.handoff.publish`): a policy the engine does not serve stops the run here,
    before any of the batch is trained."""
    t0 = time.perf_counter()
    prompts_P = [make_prompt(p, sampler.tokenizer, cfg.prompt_format) for p in batch_for_step(problems, step, cfg.prompts_per_step, cfg.seed)]
    score_ids = probe.token_ids if probe.pending is not None else None
    samples_P_G, probe_lp = sampler.sample_scoring(prompts_P, cfg.group_size, cfg.max_tokens, cfg.temperature, score_ids=score_ids)
    verdict = judge_deferred(probe, probe_lp, sampler.version) if probe_lp is not None else {}
    t1 = time.perf_counter()
    groups_P = [reward_group(p, s, sampler.version, cfg.reward_policy) for p, s in zip(prompts_P, samples_P_G)]
    return Sampled(step=step, groups_P=groups_P, version=sampler.version, sample_s=t1 - t0, grade_s=time.perf_counter() - t1, probe=verdict)


class InlineExecutor(Executor):
    """max_staleness 0: the learner's step runs on the calling thread when submitted (the synchronous loop)."""

    def submit(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> Future[R]:
        future: Future[R] = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as e:  # handed to whoever reads the result, as a thread pool would
            future.set_exception(e)
        return future


def run_steps(
    cfg: RLConfig, run: RunDir, handle: LearnerHandle, sampler: Sampler, probe: Probe, problems: list[Problem], eval_sets: dict, start_step: int, progress: bool
) -> None:
    """Steps start_step..max_steps-1, sampling up to `max_staleness` policy versions ahead of the learner.

    Everything that touches the engine (sampling, evaluation, the handoff and its verification)
    runs on this thread; the learner's steps run on a thread of their own, so sampling the next
    batch overlaps learning the current one. Batch n may be sampled once the engine serves
    version n - max_staleness or newer, and is trained at version n: no batch is trained more
    than `max_staleness` versions after the policy that sampled it. With 0 the learner runs
    here, in turn with the sampler: the synchronous loop. The handoff happens only while the
    learner is idle, so the fingerprints and the probe see weights that do not move, and a
    checkpoint after it holds exactly the steps trained; batches sampled ahead are not saved (a
    resumed run samples them again, from the restored policy, for the same problems).
    """
    k = cfg.max_staleness
    pad_id = sampler.tokenizer.pad_token_id or 0
    evals_dir = run.path / "eval"

    def evaluate(version: int, final: bool = False) -> dict[str, float | None]:
        """Periodic eval: one greedy sample per problem (rlora.eval.evaluate.eval_policy), of the policy the engine serves."""
        if not eval_sets or (version % cfg.eval_every and not final):
            return {}
        return eval_policy(sampler, eval_sets, cfg.max_tokens, cfg.prompt_format, evals_dir / f"step_{version:06d}", cfg.reward_policy)

    def learn_batch(batch: Sampled) -> tuple[dict[str, float], int, float]:
        t = time.perf_counter()
        with sampler.asleep(handle.empty_cache):  # placement=sleep (max_staleness 0): the engine frees its GPU memory for the learner
            stats, tokens = learn(handle, batch.groups_P, cfg, pad_id, current_version=batch.step)
        return stats, tokens, time.perf_counter() - t

    pool: Executor = InlineExecutor() if k == 0 else ThreadPoolExecutor(max_workers=1, thread_name_prefix="rlora-learner")
    pending: deque[Sampled] = deque()  # sampled, not yet trained
    training: tuple[Sampled, Future[tuple[dict[str, float], int, float]]] | None = None
    next_sample, step = start_step, start_step  # `step`: the next step to train, = the learner's policy version
    evals = evaluate(step)
    last_done = time.perf_counter()  # when the previous step finished (or the loop started)
    idle_since, learner_wait, sampler_wait = last_done, 0.0, 0.0
    bar = tqdm(range(start_step, cfg.max_steps), initial=start_step, total=cfg.max_steps, desc="rl", disable=not progress, file=sys.stderr)
    try:
        while step < cfg.max_steps:
            # 7. the learner finished: hand off the new policy, log, checkpoint (once the engine has
            # scored the previous handoff's deferred probe: every version's probe is judged)
            if training is not None and training[1].done() and probe.pending is None:
                batch, (stats, train_tokens, learn_s) = training[0], training[1].result()
                training = None
                # FullFT: the probe rides in the next sampling call at this version, if there is one
                handoff = publish(handle, sampler, step + 1, probe, defer_probe=next_sample < cfg.max_steps)
                now = time.perf_counter()
                timings = {"sample_s": batch.sample_s, "grade_s": batch.grade_s, "learn_s": learn_s, **handoff, "handoff_bytes": sampler.handoff_bytes}
                timings["step_s"] = now - last_done
                overlap = {"sampler_wait_s": sampler_wait, "learner_wait_s": learner_wait}  # staleness_mean/max come from `learn`
                # probe_gap: of the policy that sampled this batch; the last handoff's own, if it was probed
                row = {**step_metrics(step, batch.groups_P, stats, train_tokens), **batch.probe, **timings, **overlap, **evals}
                run.log(row)
                save_if_due(run, cfg, handle, step + 1)
                step += 1
                bar.update(1)
                bar.set_postfix(reward=f"{row['reward_mean']:.3f}", signal=f"{row['signal_groups']:.2f}")
                evals = evaluate(step) if step < cfg.max_steps else {}
                # the next step starts now: the checkpoint and the eval just done are not part of it
                last_done = idle_since = time.perf_counter()
                learner_wait, sampler_wait = 0.0, 0.0
            elif training is None and pending:  # 4-6. the learner is idle and a batch is ready: learn it
                batch = pending.popleft()
                assert batch.step == step and step - batch.version <= k, f"batch {batch.step} from v{batch.version} at step {step} (max_staleness {k})"
                learner_wait += time.perf_counter() - idle_since
                training = (batch, pool.submit(learn_batch, batch))
            elif next_sample < cfg.max_steps and next_sample - sampler.version <= k:  # 1-3. sample ahead, within the bound
                pending.append(sample_step(sampler, problems, next_sample, cfg, probe))
                next_sample += 1
            else:  # nothing to sample yet: wait for the learner
                assert training is not None and probe.pending is None, "the pipeline stalled"
                t = time.perf_counter()
                wait([training[1]])
                sampler_wait += time.perf_counter() - t
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # never leave an optimizer step running behind an error
        bar.close()
    if eval_sets:  # the final policy (checkpoint step_<max_steps>) gets a row of its own
        run.log({"step": cfg.max_steps, **evaluate(cfg.max_steps, final=True)})


def run_rl(cfg: RLConfig, name: str = "rl", progress: bool = True) -> RunDir:
    cfg = resolve_precision(cfg)  # config.json records the dtype the run uses, not "auto"
    device = resolve_device(cfg.device)
    placement_for(cfg, device, distributed.World())  # before the run directory exists: placement errors name the machine,
    check_before_loading(cfg, device, distributed.world_size_from_env())  # the memory plan names the key to change
    return train(cfg, distributed.from_rank0(lambda: create_run(cfg, name, "rl")), progress)


def resume_rl(run_dir: str | Path, overrides: dict[str, object] | None = None, progress: bool = True) -> RunDir:
    cfg, run = distributed.from_rank0(lambda: reopen_run(RLConfig, run_dir, overrides))
    return train(cfg, run, progress)
