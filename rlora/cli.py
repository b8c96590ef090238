"""`rlora` command line: thin wrappers over the library's entry points."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def cmd_fetch_model(args: argparse.Namespace) -> None:
    from rlora.train.models import fetch_default_model

    print(fetch_default_model(force=args.force))


def cmd_rl(args: argparse.Namespace) -> None:
    from rlora.config import RLConfig, load_config, parse_overrides
    from rlora.rl.loop import resume_rl, run_rl

    if args.resume:
        if args.config:
            raise SystemExit("rlora rl: give --config or --resume, not both")
        run = resume_rl(args.resume, parse_overrides(args.overrides))
    else:
        cfg = load_config(RLConfig, args.config, args.overrides)
        run = run_rl(cfg, name=Path(args.config).stem if args.config else "rl")
    print(run.path)


def cmd_demo(args: argparse.Namespace) -> None:
    from rlora.experiments.demo import main as demo_main

    demo_main(out=args.out, steps=args.steps)


def cmd_sft(args: argparse.Namespace) -> None:
    from rlora.config import load_config, parse_overrides
    from rlora.sft.loop import SFTConfig, resume_sft, run_sft

    if args.resume:
        if args.config:
            raise SystemExit("rlora sft: give --config or --resume, not both")
        run = resume_sft(args.resume, parse_overrides(args.overrides))
    else:
        cfg = load_config(SFTConfig, args.config, args.overrides)
        run = run_sft(cfg, name=Path(args.config).stem if args.config else "sft")
    print(run.path)


def report_outcome(out: object, outcome: dict[str, list[str]], summary: str, logs: str) -> None:
    """One line of counts; the failed runs on stderr and exit 1 (the other runs went on)."""
    print(f"{out}: {len(outcome['done'])} trained, {summary}, {len(outcome['failed'])} failed")
    if outcome["failed"]:
        print(f"failed (see {logs} in each): " + ", ".join(outcome["failed"]), file=sys.stderr)
        raise SystemExit(1)


def cmd_sweep(args: argparse.Namespace) -> None:
    from rlora.experiments.sweep import load_sweep, run_sweep, run_worker

    sweep = load_sweep(args.config, out=args.out)
    now = sweep  # the runs known today: a study's seeds join once their arm's lr grid is done
    if sweep.seed_phase is not None:
        from rlora.experiments.study import add_seed_points

        now = add_seed_points(sweep)
    if args.dry_run:
        for point in now.points:
            print(point.name)
        print(f"{len(now.points)} runs of kind {sweep.kind} in {sweep.out}")
        if sweep.seed_phase is not None:
            print(f"and seeds {list(sweep.seed_phase.seeds)} at the best lr of each selected arm, once its lr grid is done")
        return
    log = lambda line: print(line, flush=True)  # noqa: E731
    if args.device:  # one worker of a multi-device sweep (or a sweep pinned to one device)
        outcome = run_worker(now, args.device, args.progress, log, args.budget_s)
    elif sweep.seed_phase is not None:
        from rlora.experiments.study import run_study

        outcome = run_study(sweep, args.progress, log, args.budget_s)
    else:
        outcome = run_sweep(sweep, args.progress, log, args.budget_s)
    summary = f"{len(outcome['skipped'])} already done or taken, {len(outcome['left'])} left for the next invocation"
    report_outcome(sweep.out, outcome, summary, "error.txt")


def cmd_analyze(args: argparse.Namespace) -> None:
    from rlora.experiments.study import analyze_study

    a, _ = analyze_study(args.sweep_dir, out=args.out, tol=args.tol, kind=args.kind, study=args.study)
    out = Path(args.out) if args.out else Path(args.sweep_dir) / "analysis"
    print((out / "report.md").read_text(), end="")
    print(f"\nreport, summary.json and plots in {out}/ ({a.runs} runs)")


def cmd_suggest_lr(args: argparse.Namespace) -> None:
    from rlora.experiments.suggest import suggest_lr

    s = suggest_lr(args.hidden_size, args.family, args.lora)
    print(f"{s.lr:.3g}")
    print(s.explain(), file=sys.stderr)


def cmd_eval(args: argparse.Namespace) -> None:
    from rlora.data import ArithChain
    from rlora.eval.evaluate import EvalRequest, default_arith, markdown, parse_benchmarks, recompute, resolve_policy, run_eval

    if args.recompute:
        recomputed = {"benchmarks": recompute(Path(args.recompute) / "completions.jsonl", regrade=args.regrade, reward_policy=args.reward_policy)}
        print(markdown(recomputed), end="")
        return
    policy = resolve_policy(args.model, args.adapter, args.checkpoint, args.run, args.step, args.dtype)
    base = policy.arith or default_arith()  # a run's own difficulty, else RLConfig's defaults; flags override each key
    arith = ArithChain(args.arith_max or base.max_operand, args.arith_terms or base.terms)
    req = EvalRequest(
        policy=policy,
        benchmarks=tuple(parse_benchmarks(args.benchmarks)),
        samples=args.samples,
        temperature=args.temperature,
        max_tokens=args.max_tokens,
        limit=args.limit,
        data_dir=args.data_dir,
        out=Path(args.out),
        device=args.device,
        kv_cache_gib=args.kv_cache_gib,
        max_num_seqs=args.max_num_seqs,
        seed=args.seed,
        reward_policy=args.reward_policy,
        prompt_format=args.prompt_format,
        arith=arith,
    )
    results = run_eval(req)
    print((Path(args.out) / "results.md").read_text(), end="")
    rt = results["runtime"]
    assert isinstance(rt, dict)
    print(f"\nresults, table and completions in {args.out}/ (engine ready in {rt['engine_ready_s']:.1f} s)")


def cmd_compare(args: argparse.Namespace) -> None:
    from rlora.experiments.compare import compare

    print(compare(args.runs, args.out, smooth=args.smooth), end="")
    print(f"\ntable and plots in {args.out}/")


def cmd_plan(args: argparse.Namespace) -> None:
    import dataclasses

    from rlora.devices import resolve_precision
    from rlora.plan import cpu_node, gpu_node, load_rl_config, plan_json, plan_run, table

    cfg = load_rl_config(args.config, args.overrides)
    if args.cpu:
        cfg = resolve_precision(dataclasses.replace(cfg, device="cpu"))
    node = cpu_node() if args.cpu else gpu_node(args.gpus, args.gpu_memory_gib)
    plan = plan_run(cfg, node, args.learners or None)
    print(plan_json(plan) if args.json else table(plan), end="\n" if args.json else "")
    if not plan.fits:
        raise SystemExit(1)


def cmd_launch(args: argparse.Namespace) -> None:
    from rlora.experiments.launch import check_memory, dry_run, launch, load_plan, make_node

    plan = load_plan(args.plan, out=args.out)
    node = make_node(args.gpus, args.cpu_slots, plan.share)
    check_memory(plan, node, args.gpu_memory_gib)
    if args.dry_run:
        print(dry_run(plan, node), end="")
        return
    outcome = launch(plan, node, args.refresh_s)
    summary = f"{len(outcome['skipped'])} already done, {len(outcome['taken'])} held by another launcher"
    report_outcome(plan.sweep.out, outcome, summary, "error.txt and launch.log")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="rlora", description="RL of language models with LoRA versus full fine-tuning.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("fetch-model", help="download and convert the offline default model (SmolLM2-135M-Instruct)")
    p.add_argument("--force", action="store_true", help="convert again even if cached")
    p.set_defaults(func=cmd_fetch_model)

    p = sub.add_parser("rl", help="train with RL: rlora rl --config configs/X.yaml key=value ... | --resume RUN_DIR")
    p.add_argument("--config", help="flat YAML preset (configs/*.yaml)")
    p.add_argument("--resume", help="continue a run directory from its last checkpoint")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    p.set_defaults(func=cmd_rl)

    p = sub.add_parser("rl-multi", help="K LoRA runs on one engine and one frozen base: rlora rl-multi --config MULTI.yaml | --resume OUT")
    p.add_argument("--config", help="multi-run file: base, out, fixed, and runs (a list) or grid (configs/rl_multi_*.yaml)")
    p.add_argument("--out", help="where the run directories go (default: the file's `out`, else runs/<file stem>)")
    p.add_argument("--resume", metavar="OUT", help="continue every run under OUT from its last checkpoint")
    p.add_argument("overrides", nargs="*", help="key=value for every run (with --config: added to the file's `fixed`)")
    p.set_defaults(func=lambda args: __import__("rlora.rl.multi", fromlist=["cmd_rl_multi"]).cmd_rl_multi(args))  # lazy, like every command

    p = sub.add_parser("demo", help="rank-1 LoRA vs FullFT on the CPU default, side by side")
    p.add_argument("--out", default="runs/demo", help="where the two runs, the table and the plots go")
    p.add_argument("--steps", type=int, default=0, help="steps per run (0 = the presets' max_steps)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("sft", help="supervised fine-tuning, held-out log loss: rlora sft --config configs/X.yaml key=value ... | --resume RUN_DIR")
    p.add_argument("--config", help="flat YAML preset (configs/*.yaml)")
    p.add_argument("--resume", help="continue a run directory from its last checkpoint")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    p.set_defaults(func=cmd_sft)

    p = sub.add_parser("sweep", help="a grid of sft or rl runs, one run dir each, resumable: rlora sweep --config SWEEP.yaml")
    p.add_argument("--config", required=True, help="sweep file (configs/sweep_*.yaml)")
    p.add_argument("--out", help="sweep directory (default: the file's `out`, else runs/<file stem>)")
    p.add_argument("--device", help="run every point on this device in this process (how multi-device workers start)")
    p.add_argument("--progress", action="store_true", help="a progress bar per run")
    p.add_argument("--dry-run", action="store_true", help="list the runs and stop")
    p.add_argument("--budget-s", type=float, default=0.0, help="start no new run after this many seconds (0 = no limit); run again to go on")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("analyze", help="heatmaps, U-curves, best lr per rank, reusable bands and report.md of a sweep; a study's seeds and CIs")
    p.add_argument("sweep_dir", help="a sweep directory (its run dirs below it)")
    p.add_argument("--out", help="folder for the report and plots (default: SWEEP_DIR/analysis)")
    p.add_argument("--tol", type=float, help="band tolerance (sft: relative, default 0.05; rl: absolute reward, default 0.05)")
    p.add_argument("--kind", choices=["sft", "rl"], help="default: from SWEEP_DIR/sweep.json")
    p.add_argument(
        "--study",
        action=argparse.BooleanOptionalAction,
        help="RL study tables (seeds, 95%% intervals, reward bands); default: when some arm has several seeds at one lr",
    )
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("suggest-lr", help="the blog's fitted lr: base * M_LoRA * (2000 / hidden_size) ** model_pow")
    p.add_argument("--hidden-size", type=int, required=True)
    p.add_argument("--family", choices=["llama", "qwen"], required=True)
    p.add_argument("--lora", action="store_true", help="LoRA (M_LoRA = 9.8) instead of FullFT (1)")
    p.set_defaults(func=cmd_suggest_lr)

    p = sub.add_parser("eval", help="avg@K, pass@k on math500/aime24/aime25/gsm8k of a model, adapter or run checkpoint")
    p.add_argument("--model", help="base model: 'default', a local folder or a Hub name (default: the run's, else 'default')")
    p.add_argument("--adapter", help="PEFT adapter folder served on top of --model")
    p.add_argument("--checkpoint", help="a run checkpoint folder (checkpoints/step_N): its adapter, or its full weights")
    p.add_argument("--run", help="a run directory; with --step N its checkpoint after N updates, else the latest")
    p.add_argument("--step", type=int, help="checkpoint step of --run")
    p.add_argument("--benchmarks", default="math500,aime24,aime25,gsm8k", help="comma list of math500, aime24, aime25, gsm8k, arith_chain")
    p.add_argument("--samples", type=int, default=4, help="K completions per problem")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max-tokens", type=int, default=1024, help="new tokens per completion")
    p.add_argument("--limit", type=int, default=0, help="first L problems of each benchmark (0 = all)")
    p.add_argument("--data-dir", default="", help="folder with math500.jsonl, aime24.jsonl, aime25.jsonl, gsm8k_test.jsonl (default: the Hub)")
    p.add_argument("--out", default="eval", help="folder for results.json, results.md, completions.jsonl")
    p.add_argument("--arith-max", type=int, help="arith_chain benchmark: operands 1..N (default: the run's arith_max, else 9)")
    p.add_argument("--arith-terms", type=int, help="arith_chain benchmark: operands per question (default: the run's arith_terms, else 3)")
    p.add_argument("--dtype", help="engine dtype (default: the run's, else auto: bfloat16 where native, else float32)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--kv-cache-gib", type=float, default=2.0, help="vLLM KV cache on CPU")
    p.add_argument("--max-num-seqs", type=int, default=256, help="sequences the engine runs at once")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reward-policy", default="default", choices=("default", "strict"), help="how rewards finds the final answer (rewards.POLICIES)")
    p.add_argument(
        "--prompt-format", default="", choices=["", "auto", "chat", "plain", "fewshot"], help="how questions become prompts (default: the run's, else auto)"
    )
    p.add_argument("--recompute", metavar="OUT", help="print the table again from OUT/completions.jsonl (no sampling)")
    p.add_argument("--regrade", action="store_true", help="with --recompute: grade the saved completions again")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("compare", help="runs side by side: one table and one set of plots")
    p.add_argument("runs", nargs="+", help="run directories")
    p.add_argument("--out", required=True, help="folder for compare.md and the PNGs")
    p.add_argument("--smooth", type=int, default=1, help="moving average of the training reward over this many steps")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("launch", help="a plan of runs placed on this node's GPUs, one child process each: rlora launch PLAN.yaml --gpus 0-7")
    p.add_argument("plan", help="plan file: a sweep file plus gpus_per_run and share (configs/launch_*.yaml)")
    p.add_argument("--gpus", help="GPU ids to use: 0-7, 0,2,5 or 0-3,6")
    p.add_argument("--cpu-slots", type=int, default=0, help="instead of --gpus: N CPU workers (device=cpu), for machines without GPUs")
    p.add_argument("--out", help="plan directory (default: the file's `out`, else runs/<file stem>)")
    p.add_argument("--dry-run", action="store_true", help="print the placement and every command, start nothing")
    p.add_argument("--refresh-s", type=float, default=5.0, help="status table refresh on a terminal")
    p.add_argument("--gpu-memory-gib", type=float, default=0.0, help="memory of each GPU for the memory plan (default: what torch sees, else 80)")
    p.set_defaults(func=cmd_launch)

    p = sub.add_parser("plan", help="memory and time plan of an RL config on a node, from the model's config alone: rlora plan CONFIG --gpus 8")
    p.add_argument("config", help="flat YAML preset (configs/*.yaml)")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    p.add_argument("--gpus", type=int, default=1, help="GPUs the run gets (learner processes: all of them, or all but the engine's under split)")
    p.add_argument("--gpu-memory-gib", type=float, default=79.6, help="memory of each GPU (H100 80GB: 79.6; H200: 139.8)")
    p.add_argument("--learners", type=int, default=0, help="learner processes (default: from --gpus and placement)")
    p.add_argument("--cpu", action="store_true", help="plan for this host's CPU instead of GPUs")
    p.add_argument("--json", action="store_true", help="the plan as JSON")
    p.set_defaults(func=cmd_plan)

    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        # bad config keys, missing files, malformed data: one clear line, no traceback
        print(f"rlora {args.command}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
